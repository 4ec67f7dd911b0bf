//! The host's upstream DNS resolvers, for the guest's `/etc/resolv.conf` (written by
//! [`crate::daemon::personalize`]). A guest reaches the host's network through NAT, so a
//! resolver on the host's loopback (systemd-resolved's stub `127.0.0.53`, a local dnsmasq) is
//! useless to it: when `/etc/resolv.conf` names only such resolvers, the upstream ones are read
//! from systemd-resolved's `/run/systemd/resolve/resolv.conf`. Loopback addresses are never
//! handed on.

use std::net::IpAddr;
use std::path::Path;

/// Where systemd-resolved lists the upstream resolvers it uses.
pub const RESOLVED_UPSTREAM: &str = "/run/systemd/resolve/resolv.conf";

/// The most nameservers a resolv.conf uses (glibc's MAXNS).
const MAX_NAMESERVERS: usize = 3;

/// The guest's resolv.conf from the host's files: `/etc/resolv.conf`, else (when it names only
/// loopback resolvers) `resolved`. `None` when neither names a resolver a guest can reach.
pub fn guest_resolv_conf(etc_resolv: &Path, resolved: &Path) -> Option<String> {
    [etc_resolv, resolved].iter().find_map(|path| {
        let text = std::fs::read_to_string(path).ok()?;
        let servers = upstream_nameservers(&text);
        (!servers.is_empty()).then(|| {
            let mut out =
                format!("# the resolvers of the host banger started this vm on (from {})\n", path.display());
            for s in servers {
                out.push_str(&format!("nameserver {s}\n"));
            }
            out
        })
    })
}

/// The `nameserver` addresses of a resolv.conf that are not loopback, at most three.
fn upstream_nameservers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next()?.parse::<IpAddr>().ok())?
        })
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .take(MAX_NAMESERVERS)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stub_resolver_is_replaced_by_the_upstream_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (etc, resolved) = (dir.path().join("resolv.conf"), dir.path().join("upstream.conf"));
        std::fs::write(&etc, "# stub\nnameserver 127.0.0.53\noptions edns0 trust-ad\nsearch lan\n").unwrap();
        std::fs::write(&resolved, "nameserver 192.0.2.53\nnameserver 2001:db8::53\nnameserver ::1\n")
            .unwrap();
        let out = guest_resolv_conf(&etc, &resolved).unwrap();
        assert!(out.contains("nameserver 192.0.2.53\nnameserver 2001:db8::53\n"), "{out}");
        assert!(!out.contains("127.0.0.53") && !out.contains("::1\n"), "{out}");
        assert!(out.contains(&resolved.display().to_string()), "{out}");
    }

    #[test]
    fn upstream_resolvers_in_etc_are_used_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("resolv.conf");
        std::fs::write(
            &etc,
            "nameserver 10.0.0.2\nnameserver 10.0.0.3\nnameserver 10.0.0.4\nnameserver 10.0.0.5\n",
        )
        .unwrap();
        let out = guest_resolv_conf(&etc, &dir.path().join("missing")).unwrap();
        assert_eq!(out.matches("nameserver").count(), 3, "{out}");
        assert!(out.contains("nameserver 10.0.0.2\n"), "{out}");
    }

    #[test]
    fn only_loopback_resolvers_give_none() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("resolv.conf");
        std::fs::write(&etc, "nameserver 127.0.0.1\nnameserver bogus\n").unwrap();
        assert_eq!(guest_resolv_conf(&etc, &dir.path().join("missing")), None);
    }
}
