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
/// Prefix of the cgroup under which the helper makes users' cgroups (it names banger, so the
/// suite's check for cgroups left behind sees it).
pub const CGROUP_PREFIX: &str = "banger-e2e-";
/// The first uid of the jail uid ranges: far above the accounts of any host (system and login
/// users, `nobody`) and the subordinate ranges `useradd` hands out (from 100000, 65536 each).
pub const JAIL_UID_BASE: u32 = 1 << 30;
/// How many jail uids each world has.
pub const JAIL_UIDS: u32 = 2;

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

    /// The pid of the run whose world has jail uid `uid`, if `uid` is in a world's range.
    pub fn pid_of_jail_uid(uid: u32) -> Option<u32> {
        let slot = uid.checked_sub(JAIL_UID_BASE)? / JAIL_UIDS;
        (slot < 1 << 30).then_some(slot >> 8)
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
    /// The policy's `cgroup_parent`.
    pub fn cgroup_parent(&self) -> String {
        format!("{CGROUP_PREFIX}{}", self.suffix)
    }
    /// The policy's jail uid range, first and last: [`JAIL_UIDS`] uids of this world alone,
    /// numbered after the suffix (22 bits of pid, 8 of counter) above [`JAIL_UID_BASE`].
    pub fn jail_uids(&self) -> (u32, u32) {
        let n = u32::from_str_radix(&self.suffix, 16).expect("the suffix is hex");
        let slot = ((n >> 8) & 0x3f_ffff) << 8 | (n & 0xff);
        let first = JAIL_UID_BASE + slot * JAIL_UIDS;
        (first, first + JAIL_UIDS - 1)
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
        assert_eq!(Names::parse(CGROUP_PREFIX, &a.cgroup_parent()), Some(a.suffix.as_str()));
        assert!(a.cgroup_parent().contains("banger"));
    }

    #[test]
    fn jail_uid_ranges_are_disjoint_per_suffix_and_stay_below_the_invalid_uid() {
        let range = |s: &str| Names { suffix: s.into() }.jail_uids();
        assert_eq!(range("00000000"), (JAIL_UID_BASE, JAIL_UID_BASE + 1));
        assert_eq!(range("00000001"), (JAIL_UID_BASE + 2, JAIL_UID_BASE + 3));
        assert_eq!(range("00000100"), (JAIL_UID_BASE + 512, JAIL_UID_BASE + 513));
        // The highest pid Linux allows (2^22) and counter.
        let (_, last) = range("3fffffff");
        assert!(last < u32::MAX - 1, "{last}");
        let (a, b) = (range("0012ab05"), range("0012ab06"));
        assert!(a.1 < b.0);
        assert_eq!(Names::pid_of_jail_uid(a.0), Some(0x12ab));
        assert_eq!(Names::pid_of_jail_uid(a.1), Some(0x12ab));
        assert_eq!(Names::pid_of_jail_uid(1000), None);
    }
}
