//! VM ids (generated) and VM names (typed by users).

use banger_protocol::VmId;

/// Why a VM name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid vm name {name:?}: use 1 to 63 lowercase letters, digits or '-', not starting or ending with '-'"
)]
pub struct NameError {
    /// The refused name.
    pub name: String,
}

/// Checks that `name` is a DNS label: `[a-z0-9-]`, 1–63, no leading or trailing `-`.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok { Ok(()) } else { Err(NameError { name: name.to_owned() }) }
}

/// A fresh random VM id of 16 hex digits.
pub fn new_vm_id() -> VmId {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the kernel's random source is available");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    VmId::new(hex).expect("16 hex digits form a valid vm id")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels() {
        for ok in ["a", "dev", "e2e", "my-vm-2", &"a".repeat(63)] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "a b", &"a".repeat(64), "é"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_name("Bad_Name").unwrap_err().to_string().contains("\"Bad_Name\""));
    }

    #[test]
    fn ids_are_distinct_hex() {
        let a = new_vm_id();
        let b = new_vm_id();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 16);
        assert!(a.as_str().bytes().all(|c| c.is_ascii_hexdigit()));
    }
}
