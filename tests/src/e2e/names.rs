//! Names of everything a test creates, unique per test and recognisable afterwards.
//!
//! The suffix is eight hex digits: six of the test process's pid and two of a per-process counter,
//! so tests running in parallel (threads of one process, or several processes) never collide, and
//! leftovers of a killed run can be traced back to a pid that no longer exists ([`Names::parse`]).
//! Interface names stay within the kernel's 15 bytes.

use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Every name of one test's world.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The eight-hex-digit suffix.
    pub suffix: String,
}

/// Prefix of the host namespace's name.
pub const HOST_NS_PREFIX: &str = "bgeh-";
/// Prefix of the outside namespace's name.
pub const OUTSIDE_NS_PREFIX: &str = "bgeo-";
/// Prefix of the helper access group.
pub const GROUP_PREFIX: &str = "bge";
/// Prefixes of the three users.
pub const USER_PREFIXES: [&str; 3] = ["bgea", "bgeb", "bgec"];
/// Prefix of the temporary directory (in `/tmp`).
pub const TEMP_PREFIX: &str = "bge-";

impl Names {
    /// A fresh suffix for this process.
    pub fn fresh() -> Names {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        Names { suffix: format!("{:06x}{:02x}", std::process::id() & 0xff_ffff, n & 0xff) }
    }

    /// The pid encoded in a suffix (for recognising leftovers of dead runs).
    pub fn pid_of(suffix: &str) -> Option<u32> {
        if suffix.len() != 8 || !suffix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u32::from_str_radix(&suffix[..6], 16).ok()
    }

    /// The suffix of a harness-made name with `prefix`, if `name` is one.
    pub fn parse<'a>(prefix: &str, name: &'a str) -> Option<&'a str> {
        let s = name.strip_prefix(prefix)?;
        Self::pid_of(s).map(|_| s)
    }

    /// The "host" network namespace.
    pub fn host_ns(&self) -> String {
        format!("{HOST_NS_PREFIX}{}", self.suffix)
    }
    /// The "outside" network namespace.
    pub fn outside_ns(&self) -> String {
        format!("{OUTSIDE_NS_PREFIX}{}", self.suffix)
    }
    /// The veth end in the host namespace (the helper's uplink).
    pub fn veth_host(&self) -> String {
        format!("veh{}", self.suffix)
    }
    /// The veth end in the outside namespace.
    pub fn veth_outside(&self) -> String {
        format!("veo{}", self.suffix)
    }
    /// The group the policy allows.
    pub fn group(&self) -> String {
        format!("{GROUP_PREFIX}{}", self.suffix)
    }
    /// User `i` (0 = A, 1 = B, 2 = C).
    pub fn user(&self, i: usize) -> String {
        format!("{}{}", USER_PREFIXES[i], self.suffix)
    }
    /// The temporary directory's name prefix.
    pub fn temp_prefix(&self) -> String {
        format!("{TEMP_PREFIX}{}-", self.suffix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_short_and_parse_back() {
        let a = Names::fresh();
        let b = Names::fresh();
        assert_ne!(a, b);
        for n in
            [a.host_ns(), a.outside_ns(), a.veth_host(), a.veth_outside(), a.group(), a.user(0), a.user(2)]
        {
            assert!(n.len() <= 15, "{n} is longer than an interface name may be");
        }
        assert_eq!(Names::pid_of(&a.suffix), Some(std::process::id() & 0xff_ffff));
        assert_eq!(Names::parse(HOST_NS_PREFIX, &a.host_ns()), Some(a.suffix.as_str()));
        assert_eq!(Names::parse(HOST_NS_PREFIX, "bgeh-zz"), None);
        assert_eq!(Names::parse(USER_PREFIXES[1], &a.user(1)), Some(a.suffix.as_str()));
        assert_eq!(Names::parse(USER_PREFIXES[0], &a.user(1)), None);
    }
}
