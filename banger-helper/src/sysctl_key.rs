//! A validated sysctl key: the only way a `/proc/sys` path is formed. The helper writes only the
//! keys it derives itself (`net.ipv4.ip_forward` for NAT, `net.ipv6.conf.<tap>.disable_ipv6` for
//! a TAP it made): no client names a sysctl, so the sandbox needs `/proc/sys/net` only.
//!
//! A key is dotted (`net.ipv4.ip_forward`), made of non-empty components of `[a-z0-9_-]`, so the
//! derived path `/proc/sys/net/ipv4/ip_forward` can never leave `/proc/sys`.

use std::fmt;
use std::path::{Path, PathBuf};

use banger_protocol::quoted;

/// Why a key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sysctl key {0} is malformed: use dotted components of [a-z0-9_-], e.g. net.ipv4.ip_forward")]
pub struct BadSysctlKey(pub String);

/// A well-formed dotted sysctl key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SysctlKey(String);

impl SysctlKey {
    /// The longest key accepted.
    pub const MAX_LEN: usize = 128;

    /// Checks and wraps a key.
    pub fn new(key: &str) -> Result<Self, BadSysctlKey> {
        let ok = !key.is_empty()
            && key.len() <= Self::MAX_LEN
            && key.split('.').all(|c| {
                !c.is_empty()
                    && c.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
            });
        if ok { Ok(SysctlKey(key.to_owned())) } else { Err(BadSysctlKey(quoted(key))) }
    }

    /// The dotted key.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The file under `root` (normally `/proc/sys`) holding this key.
    pub fn path_under(&self, root: &Path) -> PathBuf {
        let mut p = root.to_path_buf();
        for c in self.0.split('.') {
            p.push(c);
        }
        p
    }

    /// The key `net.ipv6.conf.<link>.disable_ipv6` of a link the helper named.
    pub fn disable_ipv6(link: &str) -> Result<Self, BadSysctlKey> {
        Self::new(&format!("net.ipv6.conf.{link}.disable_ipv6"))
    }

    /// `net.ipv4.ip_forward`.
    pub fn ip_forward() -> Self {
        SysctlKey("net.ipv4.ip_forward".to_owned())
    }
}

impl fmt::Display for SysctlKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_keys_map_under_the_root() {
        let k = SysctlKey::new("net.ipv4.conf.bg0123456789abc.forwarding").unwrap();
        assert_eq!(
            k.path_under(Path::new("/proc/sys")),
            PathBuf::from("/proc/sys/net/ipv4/conf/bg0123456789abc/forwarding")
        );
        assert_eq!(SysctlKey::ip_forward().as_str(), "net.ipv4.ip_forward");
    }

    #[test]
    fn a_long_bad_key_is_quoted_short() {
        let long = "X".repeat(60_000);
        let e = SysctlKey::new(&long).unwrap_err().to_string();
        assert!(e.len() < 300 && e.contains('…'), "{} bytes", e.len());
    }

    #[test]
    fn paths_cannot_escape() {
        for bad in
            ["", ".", "net..ipv4", "../etc", "net/ipv4", "net.ipv4.", ".net", "Net.x", "a b", "a.\0", "net.*"]
        {
            assert!(SysctlKey::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(SysctlKey::new(&"a".repeat(129)).is_err());
    }
}
