//! `[jailer]`: launching VMMs through Firecracker's jailer.
//!
//! `jailer`, `firecracker`, `chroot_base` and `uid_range` are required once the section is
//! there (a missing one is reported at the section's line); `cgroup` defaults to `auto`,
//! `cgroup_parent` to `banger`, `mode` to `allow`. What the host must look like for these values
//! (owners, modes, a static Firecracker, a uid range no account uses) is checked by the helper
//! against the host, not here: this crate never touches the filesystem.

use std::path::{Path, PathBuf};

use super::{Doc, Key, PolicyError, Value, sorted};
use crate::{CgroupVersion, Jailer, JailerMode};

const JAILER_KEYS: &[&str] =
    &["jailer", "firecracker", "chroot_base", "uid_range", "cgroup", "cgroup_parent", "mode"];

/// The uids a jail range may never contain: root, `nobody` (65534), the 16-bit `-1` (65535) and
/// the 32-bit `-1`, which the kernel reads as "no change".
const RESERVED_UIDS: [u32; 4] = [0, 65534, 65535, u32::MAX];

/// The most uids a range may hold: one per jailed VM at once, far more than any host runs.
pub const MAX_JAIL_UIDS: u32 = 1 << 20;

/// An absolute, normal path (no `.`/`..`/empty parts, no trailing `/`, printable).
fn check_path(path: &str, text: &str) -> Result<PathBuf, String> {
    let bad = |why: &str| Err(format!("{path} must be an absolute path, got {text:?}: {why}"));
    if !Path::new(text).is_absolute() {
        return bad("the path is not absolute");
    }
    if text.len() > 1 && text.ends_with('/') {
        return bad("write it without the trailing '/'");
    }
    if text.chars().any(char::is_control) {
        return bad("the path has control characters");
    }
    if text.len() > 4095 {
        return bad("the path is too long");
    }
    if text.len() > 1 && text.split('/').skip(1).any(|part| matches!(part, "" | "." | "..")) {
        return bad("write the path without '.', '..' or '//'");
    }
    Ok(PathBuf::from(text))
}

/// `A-B`, decimal, `A <= B`, no reserved uid inside, at most [`MAX_JAIL_UIDS`] uids.
fn check_range(text: &str) -> Result<(u32, u32), String> {
    let bad = |why: String| {
        Err(format!(
            "jailer.uid_range must be \"FIRST-LAST\" (decimal uids, e.g. \"900000-965535\"), got {text:?}: {why}"
        ))
    };
    let Some((a, b)) = text.split_once('-') else { return bad("there is no '-'".into()) };
    let parse = |s: &str| s.trim().parse::<u32>().ok().filter(|_| !s.trim().is_empty());
    let (Some(first), Some(last)) = (parse(a), parse(b)) else {
        return bad("both ends must be decimal numbers below 4294967295".into());
    };
    if first > last {
        return bad(format!("{first} is above {last}; write the lower uid first"));
    }
    if let Some(r) = RESERVED_UIDS.iter().find(|r| (first..=last).contains(r)) {
        return bad(format!(
            "it contains uid {r}, which no jail may run as (0 is root, 65534 nobody, 65535 and 4294967295 are -1); pick a range above 65535"
        ));
    }
    if last - first >= MAX_JAIL_UIDS {
        return bad(format!("it holds more than {MAX_JAIL_UIDS} uids; a smaller range is enough"));
    }
    Ok((first, last))
}

/// A relative cgroup path: `/`-separated parts of ASCII letters, digits, `_`, `.` and `-`, none
/// `.` or `..`, none empty.
fn check_cgroup_parent(text: &str) -> Result<String, String> {
    let bad = |why: &str| {
        Err(format!(
            "jailer.cgroup_parent must be a relative cgroup path such as \"banger\" or \"system.slice/banger\", got {text:?}: {why}"
        ))
    };
    if text.is_empty() || text.len() > 255 {
        return bad("it must have 1 to 255 characters");
    }
    if text.starts_with('/') {
        return bad("write it without the leading '/' (it is relative to each cgroup hierarchy)");
    }
    for part in text.split('/') {
        if matches!(part, "" | "." | "..") {
            return bad("write it without '.', '..' or '//'");
        }
        if !part.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
            return bad("use only letters, digits, '_', '.' and '-' between the '/'");
        }
    }
    Ok(text.to_owned())
}

pub(super) fn read_jailer(
    doc: &Doc<'_>,
    section: &Key<'_>,
    value: &Value<'_>,
) -> Result<Jailer, PolicyError> {
    let (mut jailer, mut firecracker, mut chroot_base, mut uids) = (None, None, None, None);
    let (mut cgroup, mut cgroup_parent, mut mode) =
        (CgroupVersion::Auto, "banger".to_owned(), JailerMode::Allow);
    for (name, key, value) in sorted(doc.table("jailer", value)?) {
        let path = format!("jailer.{name}");
        let at = |reason: String| doc.at(&value.span(), reason);
        match name {
            "jailer" | "firecracker" | "chroot_base" => {
                let p = check_path(&path, doc.string(&path, value)?).map_err(at)?;
                match name {
                    "jailer" => jailer = Some(p),
                    "firecracker" => firecracker = Some(p),
                    _ => chroot_base = Some(p),
                }
            }
            "uid_range" => uids = Some(check_range(doc.string(&path, value)?).map_err(at)?),
            "cgroup" => {
                cgroup = match doc.string(&path, value)? {
                    "auto" => CgroupVersion::Auto,
                    "v1" => CgroupVersion::V1,
                    "v2" => CgroupVersion::V2,
                    other => {
                        return Err(at(format!(
                            "jailer.cgroup must be \"auto\", \"v1\" or \"v2\", got {other:?}"
                        )));
                    }
                }
            }
            "cgroup_parent" => cgroup_parent = check_cgroup_parent(doc.string(&path, value)?).map_err(at)?,
            "mode" => {
                mode = match doc.string(&path, value)? {
                    "allow" => JailerMode::Allow,
                    "force" => JailerMode::Force,
                    other => {
                        return Err(at(format!(
                            "jailer.mode must be \"allow\" (users choose direct or jailer launch) or \"force\" (jailer only), got {other:?}"
                        )));
                    }
                }
            }
            _ => return Err(doc.unknown("jailer", key, JAILER_KEYS)),
        }
    }
    let missing = |key: &str, example: &str| {
        doc.at(&section.span(), format!("[jailer] needs {key}: add e.g. {key} = {example}"))
    };
    let jailer = jailer.ok_or_else(|| missing("jailer", "\"/usr/local/bin/jailer\""))?;
    let firecracker = firecracker.ok_or_else(|| missing("firecracker", "\"/usr/local/bin/firecracker\""))?;
    let chroot_base = chroot_base.ok_or_else(|| missing("chroot_base", "\"/srv/banger/jails\""))?;
    let uids = uids.ok_or_else(|| missing("uid_range", "\"900000-965535\""))?;
    if jailer == firecracker {
        return Err(doc.at(
            &section.span(),
            "jailer.jailer and jailer.firecracker name the same file; name each binary",
        ));
    }
    Ok(Jailer { jailer, firecracker, chroot_base, uids, cgroup, cgroup_parent, mode })
}

#[cfg(test)]
mod tests {
    use crate::{CgroupVersion, JailerMode, Policy};

    const FULL: &str = r#"[jailer]
jailer = "/usr/local/bin/jailer"
firecracker = "/usr/local/bin/firecracker"
chroot_base = "/srv/jails"
uid_range = "900000-900099"
"#;

    fn refuse(text: &str) -> (usize, String) {
        let e = Policy::from_toml("p.toml", text).expect_err("accepted");
        assert!(!e.reason.ends_with('.'), "{e}");
        (e.line, e.reason)
    }

    #[test]
    fn a_full_section_is_read_with_its_defaults() {
        let p = Policy::from_toml("p.toml", FULL).unwrap();
        let j = p.jailer.unwrap();
        assert_eq!(j.jailer, std::path::PathBuf::from("/usr/local/bin/jailer"));
        assert_eq!(j.chroot_base, std::path::PathBuf::from("/srv/jails"));
        assert_eq!(j.uids, (900000, 900099));
        assert_eq!(
            (j.cgroup, j.cgroup_parent.as_str(), j.mode),
            (CgroupVersion::Auto, "banger", JailerMode::Allow)
        );
        assert_eq!(j.user_cgroup(1000), "banger/u1000");
        let p = Policy::from_toml(
            "p.toml",
            &format!("{FULL}cgroup = \"v1\"\ncgroup_parent = \"system.slice/bg\"\nmode = \"force\"\n"),
        )
        .unwrap();
        assert!(p.force_jailer());
        let j = p.jailer.unwrap();
        assert_eq!((j.cgroup, j.cgroup_parent.as_str()), (CgroupVersion::V1, "system.slice/bg"));
        assert!(!Policy::default_policy().force_jailer());
    }

    #[test]
    fn each_required_key_is_named_at_the_section() {
        for (key, line) in [("jailer =", 2), ("firecracker =", 3), ("chroot_base =", 4), ("uid_range =", 5)] {
            let text: String = format!("\n{FULL}")
                .lines()
                .filter(|l| !l.starts_with(key))
                .map(|l| format!("{l}\n"))
                .collect();
            let (at, reason) = refuse(&text);
            assert_eq!(at, 2, "{reason} (removed line {line})");
            assert!(reason.contains(key.trim_end_matches(" =")) && reason.contains("add e.g."), "{reason}");
        }
    }

    #[test]
    fn bad_values_name_their_key_and_line() {
        let cases: &[(&str, &str, &[&str])] = &[
            ("jailer = \"jailer\"", "jailer.jailer", &["not absolute"]),
            ("firecracker = \"/usr/bin/../bin/fc\"", "jailer.firecracker", &["'..'"]),
            ("chroot_base = \"/srv/jails/\"", "jailer.chroot_base", &["trailing"]),
            ("chroot_base = 3", "jailer.chroot_base", &["a string"]),
            ("uid_range = \"9-1\"", "jailer.uid_range", &["lower uid first"]),
            ("uid_range = \"0-100\"", "jailer.uid_range", &["uid 0"]),
            ("uid_range = \"60000-70000\"", "jailer.uid_range", &["uid 65534"]),
            ("uid_range = \"100000\"", "jailer.uid_range", &["no '-'"]),
            ("uid_range = \"a-b\"", "jailer.uid_range", &["decimal"]),
            ("uid_range = \"100000-9000000\"", "jailer.uid_range", &["more than"]),
            ("cgroup = \"v3\"", "jailer.cgroup", &["\"auto\", \"v1\" or \"v2\""]),
            ("cgroup_parent = \"/banger\"", "jailer.cgroup_parent", &["leading '/'"]),
            ("cgroup_parent = \"a/../b\"", "jailer.cgroup_parent", &["'..'"]),
            ("cgroup_parent = \"a b\"", "jailer.cgroup_parent", &["letters"]),
            ("mode = \"always\"", "jailer.mode", &["\"force\""]),
            ("chroot = \"/x\"", "jailer.chroot", &["unknown key", "chroot_base"]),
        ];
        for (line, key, needles) in cases {
            let name = line.split(" =").next().unwrap();
            let text: String = FULL
                .lines()
                .filter(|l| !l.starts_with(&format!("{name} =")))
                .chain([*line])
                .map(|l| format!("{l}\n"))
                .collect();
            let (at, reason) = refuse(&text);
            assert_eq!(at, text.lines().count(), "{line}: {reason}");
            assert!(reason.contains(key), "{line}: {reason}");
            for n in *needles {
                assert!(reason.contains(n), "{line}: {reason} lacks {n}");
            }
        }
    }

    #[test]
    fn the_two_binaries_must_differ() {
        let text = FULL.replace("/usr/local/bin/firecracker", "/usr/local/bin/jailer");
        assert!(refuse(&text).1.contains("same file"));
    }
}
