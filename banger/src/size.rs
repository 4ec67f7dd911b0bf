//! Sizes as users type and read them: `512M`, `10G` (powers of 1024).

/// The units a size may carry, with their factors.
const UNITS: [(char, u64); 4] = [('K', 1 << 10), ('M', 1 << 20), ('G', 1 << 30), ('T', 1 << 40)];

/// Why a size was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {0:?}: use a whole number with a unit K, M, G or T (powers of 1024), like 512M or 10G")]
pub struct SizeError(pub String);

/// Parses `NUMBER UNIT` (`K`, `M`, `G`, `T`, optionally followed by `iB` or `B`, any case) into
/// bytes.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let err = || SizeError(text.to_owned());
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (number, unit) = t.split_at(digits);
    let number: u64 = number.parse().map_err(|_| err())?;
    let unit = unit.trim_start().to_ascii_uppercase();
    let unit = unit.strip_suffix("IB").or_else(|| unit.strip_suffix('B')).unwrap_or(&unit);
    let mut chars = unit.chars();
    let (Some(u), None) = (chars.next(), chars.next()) else { return Err(err()) };
    let factor = UNITS.iter().find(|(c, _)| *c == u).map(|(_, f)| *f).ok_or_else(err)?;
    number.checked_mul(factor).ok_or_else(err)
}

/// `bytes` in the largest unit that shows it exactly, else with one decimal: `10 GiB`,
/// `1.5 GiB`, `512 MiB`, `4096 B`.
pub fn format_size(bytes: u64) -> String {
    for (c, f) in UNITS.iter().rev() {
        if bytes >= *f {
            return if bytes.is_multiple_of(*f) {
                format!("{} {c}iB", bytes / f)
            } else {
                format!("{:.1} {c}iB", bytes as f64 / *f as f64)
            };
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_units_parse() {
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("4096K"), Ok(4 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("2 GB"), Ok(2 << 30));
        for bad in ["", "G", "10", "10X", "1.5G", "-1G", "10GG", "99999999999999999999T", "10 G B"] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.to_string().contains("like 512M or 10G"), "{bad:?}: {err}");
        }
        assert_eq!(
            parse_size("18446744073709551615T").unwrap_err(),
            SizeError("18446744073709551615T".into())
        );
    }

    #[test]
    fn sizes_are_shown_in_their_unit() {
        assert_eq!(format_size(10 << 30), "10 GiB");
        assert_eq!(format_size(512 << 20), "512 MiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size(100), "100 B");
        assert_eq!(format_size(1 << 40), "1 TiB");
    }
}
