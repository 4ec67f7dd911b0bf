//! Reading and validating the TOML file.
//!
//! The file is parsed into a spanned document first (`toml::de::DeTable`), then walked section
//! by section in file order: every key is either known or an error naming its line (a misspelt
//! key must never silently fall back to a default), and every value is checked for type and
//! range where it is read. Checks that tie several keys together (the prefix lengths) run once the
//! section is read and point at the key the admin wrote. The first problem found is reported.
//!
//! The layout the file must follow is documented on the crate ([`crate`]).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use ipnet::Ipv4Net;
use toml::Spanned;
use toml::de::{DeString, DeTable, DeValue};

use crate::{Access, Audit, AuditTarget, FirewallChoice, GuestToHost, Network, Policy, Quotas, Uplink};

mod access;
mod audit;
mod jailer;
mod network;
mod quotas;

use access::read_access;
use audit::read_audit;
use jailer::read_jailer;
use network::read_network;
use quotas::read_quotas;

/// Why a policy file was refused: always with the line and a reason an admin can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {reason}")]
pub struct PolicyError {
    /// The file name as given (or `<policy>`).
    pub file: String,
    /// 1-based line (of the offending key or table; 1 when unknown).
    pub line: usize,
    /// What is wrong and what to write instead.
    pub reason: String,
}

/// What a policy that still has the `[[sysctl]]` allowlist is told.
const SYSCTL_REMOVED: &str = "the [[sysctl]] allowlist no longer exists: no client may set a sysctl, and \
     banger-helper turns net.ipv4.ip_forward on by itself when it sets up NAT; delete the [[sysctl]] \
     section (or `sysctl = ...`) from the policy";

/// The largest value any quota may take; higher would mean "unlimited", which the policy does not
/// offer.
pub const MAX_QUOTA: u32 = 65536;

/// The largest `max_memory_mib` (16 TiB).
pub const MAX_MEMORY_MIB: u32 = 16 << 20;

/// The default `max_vcpus`: sixteen VMs (the default `max_vms`) of two vCPUs.
pub const DEFAULT_MAX_VCPUS: u32 = 32;

/// The default `max_memory_mib` (32 GiB): sixteen VMs of 2 GiB.
pub const DEFAULT_MAX_MEMORY_MIB: u32 = 32768;

const TOP_KEYS: &[&str] = &["access", "quotas", "network", "audit", "jailer"];
pub(super) const QUOTA_KEYS: &[&str] = &["max_vms", "max_taps", "max_loops", "max_vcpus", "max_memory_mib"];
pub(super) const QUOTAS_KEYS: &[&str] =
    &["max_vms", "max_taps", "max_loops", "max_vcpus", "max_memory_mib", "users"];

impl Policy {
    /// Parses and validates a policy file's text. `file` is only used in error messages.
    pub fn from_toml(file: &str, text: &str) -> Result<Policy, PolicyError> {
        let doc = Doc { file, text };
        let root = DeTable::parse(text).map_err(|e| {
            let line = e.span().map_or(1, |span| doc.line(&span));
            doc.at_line(line, format!("not valid TOML: {}", e.message().trim_end_matches('.')))
        })?;
        let mut policy = Policy::default_policy();
        for (name, key, value) in sorted(root.get_ref()) {
            match name {
                "access" => policy.access = read_access(&doc, value)?,
                "quotas" => {
                    let (quotas, users) = read_quotas(&doc, value)?;
                    policy.quotas = quotas;
                    policy.user_quotas = users;
                }
                "network" => policy.network = read_network(&doc, value)?,
                "sysctl" => return Err(doc.at(&key.span(), SYSCTL_REMOVED)),
                "audit" => policy.audit = read_audit(&doc, value)?,
                "jailer" => policy.jailer = Some(read_jailer(&doc, key, value)?),
                _ => return Err(doc.unknown("", key, TOP_KEYS)),
            }
        }
        Ok(policy)
    }

    /// The policy used when the file is empty: every default, nobody allowed.
    pub fn default_policy() -> Policy {
        Policy {
            access: Access { users: Vec::new(), groups: Vec::new(), socket_group: "banger".to_owned() },
            quotas: Quotas {
                max_vms: 16,
                max_taps: 16,
                max_loops: 32,
                max_vcpus: DEFAULT_MAX_VCPUS,
                max_memory_mib: DEFAULT_MAX_MEMORY_MIB,
            },
            user_quotas: BTreeMap::new(),
            network: Network {
                pool: Ipv4Net::new(std::net::Ipv4Addr::new(172, 30, 0, 0), 16).expect("valid prefix"),
                lease_prefix: 24,
                vm_prefix: 30,
                uplink: Uplink::Auto,
                ipv6: false,
                guest_to_guest: false,
                guest_to_host: GuestToHost { allow_all: false, allow: Vec::new() },
                firewall: FirewallChoice::Auto,
            },
            audit: Audit { target: AuditTarget::Stderr },
            jailer: None,
        }
    }

    /// The quotas of `user` (its override, or the defaults).
    pub fn quotas_for(&self, user: Option<&str>) -> crate::Quotas {
        user.and_then(|name| self.user_quotas.get(name)).copied().unwrap_or(self.quotas)
    }

    /// The quotas of a peer: the override written for its user name, else the one written for
    /// its decimal uid, else the defaults.
    pub fn quotas_for_uid(&self, user: Option<&str>, uid: u32) -> crate::Quotas {
        user.and_then(|name| self.user_quotas.get(name))
            .or_else(|| self.user_quotas.get(&uid.to_string()))
            .copied()
            .unwrap_or(self.quotas)
    }
}

/// The text being parsed, for turning spans into lines.
pub(super) struct Doc<'t> {
    file: &'t str,
    text: &'t str,
}

pub(super) type Key<'i> = Spanned<DeString<'i>>;
pub(super) type Value<'i> = Spanned<DeValue<'i>>;

impl Doc<'_> {
    pub(super) fn line(&self, span: &Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
    }

    pub(super) fn at_line(&self, line: usize, reason: impl Into<String>) -> PolicyError {
        PolicyError { file: self.file.to_owned(), line, reason: reason.into() }
    }

    pub(super) fn at(&self, span: &Range<usize>, reason: impl Into<String>) -> PolicyError {
        self.at_line(self.line(span), reason)
    }

    /// The source text of a value, shortened for messages.
    pub(super) fn src(&self, span: &Range<usize>) -> String {
        let text = self.text.get(span.clone()).unwrap_or("").trim();
        let mut out: String = text.chars().take(40).collect();
        if out.len() < text.len() {
            out.push('…');
        }
        out
    }

    pub(super) fn unknown(&self, section: &str, key: &Key<'_>, known: &[&str]) -> PolicyError {
        let name = key.get_ref().as_ref();
        let path = join(section, name);
        let hint = match closest(name, known) {
            Some(guess) => format!("did you mean `{}`? ", join(section, guess)),
            None => String::new(),
        };
        let place =
            if section.is_empty() { "at the top level".to_owned() } else { format!("in [{section}]") };
        self.at(
            &key.span(),
            format!("unknown key `{path}`; {hint}(known keys {place}: {})", known.join(", ")),
        )
    }

    pub(super) fn wrong_type(&self, path: &str, want: &str, value: &Value<'_>) -> PolicyError {
        self.at(&value.span(), format!("{path} must be {want}, got {}", a_type(value.get_ref())))
    }

    pub(super) fn table<'a, 'i>(
        &self,
        path: &str,
        value: &'a Value<'i>,
    ) -> Result<&'a DeTable<'i>, PolicyError> {
        match value.get_ref() {
            DeValue::Table(t) => Ok(t),
            _ => Err(self.wrong_type(path, &format!("a table ([{path}])"), value)),
        }
    }

    pub(super) fn string<'a>(&self, path: &str, value: &'a Value<'_>) -> Result<&'a str, PolicyError> {
        match value.get_ref() {
            DeValue::String(s) => Ok(s.as_ref()),
            _ => Err(self.wrong_type(path, "a string (in double quotes)", value)),
        }
    }

    pub(super) fn boolean(&self, path: &str, value: &Value<'_>) -> Result<bool, PolicyError> {
        match value.get_ref() {
            DeValue::Boolean(b) => Ok(*b),
            _ => Err(self.wrong_type(path, "true or false", value)),
        }
    }

    /// An integer in `min..=max`, with `what` describing the range for the message.
    pub(super) fn integer(
        &self,
        path: &str,
        value: &Value<'_>,
        min: u32,
        max: u32,
        what: &str,
    ) -> Result<u32, PolicyError> {
        let bad =
            || self.at(&value.span(), format!("{path} must be {what}, got {}", self.src(&value.span())));
        match value.get_ref() {
            DeValue::Integer(int) => {
                let n = i64::from_str_radix(int.as_str(), int.radix()).map_err(|_| bad())?;
                u32::try_from(n).ok().filter(|n| (min..=max).contains(n)).ok_or_else(bad)
            }
            _ => Err(bad()),
        }
    }

    /// A list of strings, each with its span.
    pub(super) fn strings<'a>(
        &self,
        path: &str,
        value: &'a Value<'_>,
    ) -> Result<Vec<(&'a str, Range<usize>)>, PolicyError> {
        let DeValue::Array(items) = value.get_ref() else {
            return Err(self.wrong_type(path, "a list of strings, e.g. [\"a\", \"b\"]", value));
        };
        items
            .iter()
            .map(|item| match item.get_ref() {
                DeValue::String(s) => Ok((s.as_ref(), item.span())),
                _ => Err(self.wrong_type(
                    &format!("each entry of {path}"),
                    "a string (in double quotes)",
                    item,
                )),
            })
            .collect()
    }

    /// Refuses the second occurrence of any entry.
    pub(super) fn no_duplicates(
        &self,
        path: &str,
        items: &[(String, Range<usize>)],
    ) -> Result<(), PolicyError> {
        let mut seen = BTreeSet::new();
        for (item, span) in items {
            if !seen.insert(item.as_str()) {
                return Err(self.at(span, format!("{path} lists {item:?} twice; remove one")));
            }
        }
        Ok(())
    }
}

/// A table's entries in file order (the map itself is ordered by key).
pub(super) fn sorted<'a, 'i>(table: &'a DeTable<'i>) -> Vec<(&'a str, &'a Key<'i>, &'a Value<'i>)> {
    let mut out: Vec<_> = table.iter().map(|(k, v)| (k.get_ref().as_ref(), k, v)).collect();
    out.sort_by_key(|(_, k, v)| (k.span().start, v.span().start));
    out
}

pub(super) fn join(section: &str, key: &str) -> String {
    if section.is_empty() { key.to_owned() } else { format!("{section}.{key}") }
}

pub(super) fn a_type(value: &DeValue<'_>) -> &'static str {
    match value {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date",
        DeValue::Array(_) => "a list",
        DeValue::Table(_) => "a table",
    }
}

/// The known key nearest to a misspelt one, if it is close enough to be a typo.
fn closest<'k>(name: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(name, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4) && *d < k.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PortRule, Proto};
    use banger_protocol::IfName;

    fn parse(text: &str) -> Policy {
        Policy::from_toml("policy.toml", text).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The error's line and reason.
    fn refuse(text: &str) -> (usize, String) {
        match Policy::from_toml("policy.toml", text) {
            Ok(p) => panic!("accepted: {p:?}"),
            Err(e) => {
                assert_eq!(e.file, "policy.toml");
                assert!(!e.reason.ends_with('.'), "no trailing period: {e}");
                (e.line, e.reason)
            }
        }
    }

    fn assert_refused(text: &str, line: usize, needles: &[&str]) {
        let (got_line, reason) = refuse(text);
        assert_eq!(got_line, line, "wrong line for {reason:?}");
        for needle in needles {
            assert!(reason.contains(needle), "{reason:?} lacks {needle:?}");
        }
    }

    #[test]
    fn empty_file_is_the_default_policy_with_nobody_allowed() {
        for text in ["", "\n\n", "# only a comment\n"] {
            let p = parse(text);
            assert_eq!(p, Policy::default_policy());
            assert!(p.access.users.is_empty() && p.access.groups.is_empty());
        }
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let p = Policy::default_policy();
        assert_eq!(p.access.socket_group, "banger");
        assert_eq!(
            p.quotas,
            Quotas { max_vms: 16, max_taps: 16, max_loops: 32, max_vcpus: 32, max_memory_mib: 32768 }
        );
        assert_eq!(p.network.pool.to_string(), "172.30.0.0/16");
        assert_eq!((p.network.lease_prefix, p.network.vm_prefix), (24, 30));
        assert_eq!(p.network.uplink, Uplink::Auto);
        assert!(!p.network.ipv6 && !p.network.guest_to_guest);
        assert_eq!(p.network.firewall, FirewallChoice::Auto);
        assert_eq!(p.network.guest_to_host, GuestToHost { allow_all: false, allow: vec![] });
        assert_eq!(p.audit.target, AuditTarget::Stderr);
    }

    #[test]
    fn full_file_is_read() {
        let p = parse(
            r#"
[access]
users = ["alice", "1005"]
groups = ["kvm", "200"]
socket_group = "banger-users"

[quotas]
max_vms = 4
max_taps = 0x5
max_loops = 1_0

[quotas.users.alice]
max_vms = 8

[quotas.users.1005]
max_loops = 2

[network]
pool = "10.20.0.0/16"
lease_prefix = 26
vm_prefix = 29
uplink = "eth0"
ipv6 = true
guest_to_guest = true
firewall = "iptables"

[network.guest_to_host]
allow_all = false
allow = ["udp/53", "tcp/53", "tcp/8080"]

[audit]
log = "/var/log/banger/audit.log"
"#,
        );
        assert_eq!(p.access.users, ["alice", "1005"]);
        assert_eq!(p.access.groups, ["kvm", "200"]);
        assert_eq!(p.access.socket_group, "banger-users");
        assert_eq!(
            p.quotas,
            Quotas { max_vms: 4, max_taps: 5, max_loops: 10, max_vcpus: 32, max_memory_mib: 32768 }
        );
        assert_eq!(
            p.user_quotas["alice"],
            Quotas { max_vms: 8, max_taps: 5, max_loops: 10, max_vcpus: 32, max_memory_mib: 32768 }
        );
        assert_eq!(
            p.user_quotas["1005"],
            Quotas { max_vms: 4, max_taps: 5, max_loops: 2, max_vcpus: 32, max_memory_mib: 32768 }
        );
        assert_eq!(p.network.pool.to_string(), "10.20.0.0/16");
        assert_eq!((p.network.lease_prefix, p.network.vm_prefix), (26, 29));
        assert_eq!(p.network.uplink, Uplink::Named(IfName::new("eth0").unwrap()));
        assert!(p.network.ipv6 && p.network.guest_to_guest);
        assert_eq!(p.network.firewall, FirewallChoice::Iptables);
        assert_eq!(
            p.network.guest_to_host.allow,
            [
                PortRule { proto: Proto::Udp, port: 53 },
                PortRule { proto: Proto::Tcp, port: 53 },
                PortRule { proto: Proto::Tcp, port: 8080 }
            ]
        );
        assert_eq!(p.audit.target, AuditTarget::File("/var/log/banger/audit.log".into()));
    }

    #[test]
    fn jail_totals_are_quotas_with_overrides_and_bounds() {
        let p = parse(
            "[quotas]\nmax_vcpus = 8\nmax_memory_mib = 4096\n[quotas.users.bob]\nmax_memory_mib = 1024\n",
        );
        assert_eq!((p.quotas.max_vcpus, p.quotas.max_memory_mib), (8, 4096));
        assert_eq!((p.user_quotas["bob"].max_vcpus, p.user_quotas["bob"].max_memory_mib), (8, 1024));
        let d = Policy::default_policy().quotas;
        assert_eq!((d.max_vcpus, d.max_memory_mib), (DEFAULT_MAX_VCPUS, DEFAULT_MAX_MEMORY_MIB));
        assert_refused("[quotas]\nmax_vcpus = 0\n", 2, &["quotas.max_vcpus", "positive integer"]);
        assert_refused(
            &format!("[quotas]\nmax_memory_mib = {}\n", MAX_MEMORY_MIB + 1),
            2,
            &["quotas.max_memory_mib", &MAX_MEMORY_MIB.to_string()],
        );
        assert_refused("[quotas.users.bob]\nmax_vcpu = 1\n", 2, &["unknown key", "max_vcpus"]);
    }

    #[test]
    fn user_overrides_inherit_defaults_written_after_them() {
        let p = parse("[quotas.users.bob]\nmax_taps = 2\n\n[quotas]\nmax_vms = 3\n");
        assert_eq!(
            p.user_quotas["bob"],
            Quotas { max_vms: 3, max_taps: 2, max_loops: 32, max_vcpus: 32, max_memory_mib: 32768 }
        );
        assert_eq!(p.quotas_for(Some("bob")).max_taps, 2);
        assert_eq!(p.quotas_for(Some("carol")), p.quotas);
        assert_eq!(p.quotas_for(None), p.quotas);
    }

    #[test]
    fn quotas_by_uid_apply_when_the_name_has_none() {
        let p = parse("[quotas.users.1005]\nmax_vms = 1\n[quotas.users.alice]\nmax_vms = 2\n");
        assert_eq!(p.quotas_for_uid(Some("zed"), 1005).max_vms, 1);
        assert_eq!(p.quotas_for_uid(None, 1005).max_vms, 1);
        assert_eq!(p.quotas_for_uid(Some("alice"), 1005).max_vms, 2, "the name wins");
        assert_eq!(p.quotas_for_uid(None, 7).max_vms, 16);
    }

    #[test]
    fn inline_tables_and_dotted_keys_are_the_same_file() {
        let a = parse("access = { users = [\"a\"] }\nnetwork.guest_to_host.allow = [\"udp/53\"]\n");
        let b = parse("[access]\nusers = [\"a\"]\n[network.guest_to_host]\nallow = [\"udp/53\"]\n");
        assert_eq!(a, b);
    }

    #[test]
    fn a_sysctl_allowlist_is_refused_saying_to_delete_it() {
        for text in [
            "[[sysctl]]
key = \"net.ipv4.ip_forward\"
values = [\"1\"]
",
            "sysctl = []
",
            "[access]
users = []

[sysctl]
key = \"a.b\"
",
        ] {
            let (line, reason) = refuse(text);
            assert_eq!(line, text.lines().position(|l| l.contains("sysctl")).unwrap() + 1, "{text}");
            assert!(
                reason.contains("delete the [[sysctl]] section") && reason.contains("ip_forward"),
                "{reason}"
            );
        }
    }

    #[test]
    fn quota_errors_name_the_key_line_and_value() {
        let (line, reason) = refuse("[access]\nusers = []\n\n[quotas]\nmax_taps = 3\nmax_vms = -1\n");
        assert_eq!(line, 6);
        assert_eq!(reason, "quotas.max_vms must be a positive integer no larger than 65536, got -1");
        assert_eq!(
            Policy::from_toml("policy.toml", "[quotas]\nmax_vms = -1\n").unwrap_err().to_string(),
            "policy.toml:2: quotas.max_vms must be a positive integer no larger than 65536, got -1"
        );
        assert_refused("[quotas]\nmax_loops = 0\n", 2, &["quotas.max_loops", "got 0"]);
        assert_refused("[quotas]\nmax_loops = 65537\n", 2, &["got 65537"]);
        assert_refused("[quotas]\nmax_loops = 99999999999999999999999\n", 2, &["quotas.max_loops"]);
        assert_refused("[quotas]\nmax_loops = \"4\"\n", 2, &["got \"4\""]);
        assert_refused("[quotas]\nmax_loops = 4.0\n", 2, &["got 4.0"]);
        assert_refused("[quotas.users.alice]\n\nmax_taps = 0\n", 3, &["quotas.users.alice.max_taps"]);
        assert_refused("[quotas.users]\nalice = 3\n", 2, &["quotas.users.alice must be a table"]);
        assert_refused("[quotas.users.\"al ice\"]\nmax_vms = 1\n", 1, &["quotas.users.al ice", "whitespace"]);
        assert_refused("quotas = 3\n", 1, &["quotas must be a table ([quotas]), got an integer"]);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line_and_a_suggestion() {
        assert_refused(
            "[quotas]\nmax_vms = 2\nmax_vm = 3\n",
            3,
            &["unknown key `quotas.max_vm`", "did you mean `quotas.max_vms`?", "max_loops"],
        );
        assert_refused("[acess]\nusers = []\n", 1, &["unknown key `acess`", "did you mean `access`?"]);
        assert_refused("\n\n[network]\nuplnk = \"eth0\"\n", 4, &["`network.uplink`"]);
        assert_refused("[network.guest_to_host]\nallow_al = true\n", 2, &["network.guest_to_host.allow_all"]);
        assert_refused("[quotas.users.bob]\nmax_cpus = 2\n", 2, &["unknown key `quotas.users.bob.max_cpus`"]);
        assert_refused("[audit]\npath = \"/x\"\n", 2, &["unknown key `audit.path`", "log"]);
        assert_refused("[access]\nsocket_group = \"x\"\nwheel = 1\n", 3, &["unknown key `access.wheel`"]);
        let (_, reason) = refuse("[firecracker]\npath = \"/x\"\n");
        assert!(!reason.contains("did you mean"), "no far-fetched guess: {reason}");
    }

    #[test]
    fn toml_syntax_errors_carry_their_line() {
        assert_refused("[access]\nusers = [\"a\",\n", 2, &["not valid TOML"]);
        assert_refused("[quotas]\nmax_vms = 1\nmax_vms = 2\n", 3, &["not valid TOML", "duplicate key"]);
        assert_refused("[access]\n\nusers = alice\n", 3, &["not valid TOML"]);
    }

    #[test]
    fn access_lists_are_checked() {
        assert_refused("[access]\nusers = \"alice\"\n", 2, &["access.users must be a list of strings"]);
        assert_refused("[access]\nusers = [\n  \"alice\",\n  3,\n]\n", 4, &["each entry of access.users"]);
        assert_refused("[access]\nusers = [\"\"]\n", 2, &["access.users", "must not be empty"]);
        assert_refused("[access]\nusers = [\"*\"]\n", 2, &["wildcard"]);
        assert_refused("[access]\ngroups = [\"a b\"]\n", 2, &["access.groups", "whitespace"]);
        assert_refused("[access]\ngroups = [\"a:b\"]\n", 2, &["':'"]);
        assert_refused("[access]\nusers = [\"-rf\"]\n", 2, &["start with '-'"]);
        assert_refused("[access]\nusers = [\"4294967295\"]\n", 2, &["out of range"]);
        assert_refused("[access]\nusers = [\"99999999999\"]\n", 2, &["out of range"]);
        assert_refused("[access]\nusers = [\"alice\",\n \"alice\"]\n", 3, &["lists \"alice\" twice"]);
        assert_refused("[access]\nsocket_group = \"\"\n", 2, &["access.socket_group"]);
        assert_refused("[access]\nsocket_group = 5\n", 2, &["access.socket_group must be a string"]);
        assert_eq!(parse("[access]\nusers = [\"0\", \"root\"]\n").access.users, ["0", "root"]);
    }

    #[test]
    fn pool_is_a_proper_network_outside_reserved_ranges() {
        assert_refused("[network]\npool = \"172.30.0.0\"\n", 2, &["network.pool must be an IPv4 network"]);
        assert_refused("[network]\npool = \"fd00::/8\"\n", 2, &["IPv4"]);
        assert_refused("[network]\npool = \"172.30.1.0/16\"\n", 2, &["did you mean \"172.30.0.0/16\"?"]);
        assert_refused("[network]\npool = \"127.16.0.0/16\"\n", 2, &["loopback"]);
        assert_refused("[network]\npool = \"0.0.0.0/0\"\nlease_prefix = 16\n", 2, &["overlaps"]);
        assert_refused("[network]\npool = \"169.254.0.0/16\"\n", 2, &["link-local"]);
        assert_refused("[network]\npool = \"239.0.0.0/16\"\n", 2, &["multicast"]);
        assert_refused("[network]\npool = 17\n", 2, &["network.pool must be a string"]);
        assert_eq!(parse("[network]\npool = \"10.0.0.0/8\"\n").network.pool.to_string(), "10.0.0.0/8");
    }

    #[test]
    fn prefixes_must_nest_pool_lease_vm() {
        assert_refused("[network]\nvm_prefix = 31\n", 2, &["network.vm_prefix", "/30", "got 31"]);
        assert_refused("[network]\nlease_prefix = 33\n", 2, &["network.lease_prefix", "got 33"]);
        assert_refused("[network]\nlease_prefix = -1\n", 2, &["got -1"]);
        assert_refused(
            "[network]\nlease_prefix = 8\n",
            2,
            &["lease_prefix (8)", "network.pool 172.30.0.0/16 (16)"],
        );
        // The pool is what the admin wrote, so the pool's line is blamed.
        assert_refused("[network]\n\npool = \"10.0.0.0/25\"\n", 3, &["lease_prefix (24)", "(25)"]);
        assert_refused("[network]\nvm_prefix = 20\n", 2, &["vm_prefix (20)", "lease_prefix (24)"]);
        assert_refused("[network]\nlease_prefix = 30\nvm_prefix = 29\n", 3, &["vm_prefix (29)"]);
        assert_eq!(parse("[network]\nlease_prefix = 30\n").network.slots_per_lease(), 1);
        let p = parse("[network]\npool = \"10.9.8.0/24\"\nlease_prefix = 24\nvm_prefix = 24\n");
        assert_eq!((p.network.lease_count(), p.network.slots_per_lease()), (1, 1));
    }

    #[test]
    fn uplink_is_auto_or_an_interface_name() {
        assert_eq!(parse("network.uplink = \"auto\"\n").network.uplink, Uplink::Auto);
        for name in ["enp0s31f6", "br-lan.10"] {
            let text = format!("network.uplink = {name:?}\n");
            assert_eq!(parse(&text).network.uplink, Uplink::Named(IfName::new(name).unwrap()));
        }
        // The names the helper could not put in a rule are refused here already.
        let bad = [
            "",
            "a/b",
            "eth 0",
            "eth0:1",
            "sixteen-bytes-xx",
            ".",
            "..",
            "ä",
            "eth0+",
            "a#b",
            "-x",
            "we\"ird",
        ];
        for bad in bad {
            let text = format!("[network]\nuplink = {bad:?}\n");
            assert_refused(&text, 2, &["network.uplink must be \"auto\" or an interface name"]);
        }
    }

    #[test]
    fn booleans_are_booleans() {
        assert_refused(
            "[network]\nipv6 = \"no\"\n",
            2,
            &["network.ipv6 must be true or false, got a string"],
        );
        assert_refused("[network]\nguest_to_guest = 0\n", 2, &["network.guest_to_guest"]);
        assert_refused(
            "[network]\nfirewall = \"ebtables\"\n",
            2,
            &["network.firewall", "\"auto\", \"nftables\" or \"iptables\"", "ebtables"],
        );
        assert_refused("[network.guest_to_host]\nallow_all = 1\n", 2, &["allow_all"]);
    }

    #[test]
    fn guest_to_host_ports_are_proto_slash_port() {
        let p = parse("[network.guest_to_host]\nallow_all = true\nallow = [\"tcp/65535\", \"udp/1\"]\n");
        assert!(p.network.guest_to_host.allow_all);
        assert_eq!(p.network.guest_to_host.allow[0].to_string(), "tcp/65535");
        for bad in [
            "udp/0",
            "udp/65536",
            "udp",
            "53",
            "UDP/53",
            "sctp/5",
            "udp/-1",
            "udp/+53",
            "udp/053",
            "udp/5 3",
            "udp/",
        ] {
            let text = format!("[network.guest_to_host]\nallow = [\n  {bad:?},\n]\n");
            assert_refused(&text, 3, &["must look like \"udp/53\"", bad]);
        }
        assert_refused("[network.guest_to_host]\nallow = [\"udp/53\", \"udp/53\"]\n", 2, &["udp/53 twice"]);
        assert_refused("[network]\nguest_to_host = true\n", 2, &["network.guest_to_host must be a table"]);
    }

    #[test]
    fn audit_log_is_stderr_or_an_absolute_path() {
        assert_eq!(parse("audit.log = \"stderr\"\n").audit.target, AuditTarget::Stderr);
        assert_eq!(
            parse("audit.log = \"/var/log/b.log\"\n").audit.target,
            AuditTarget::File("/var/log/b.log".into())
        );
        for bad in [
            "",
            "audit.log",
            "var/log/x",
            "/var/log/",
            "/var/../etc/shadow",
            "/var/./x",
            "/a//b",
            "/a\nb",
            "STDERR",
        ] {
            let text = format!("[audit]\nlog = {bad:?}\n");
            assert_refused(&text, 2, &["audit.log must be \"stderr\" or an absolute file path"]);
        }
        assert_refused("[audit]\nlog = true\n", 2, &["audit.log must be a string"]);
    }

    #[test]
    fn first_problem_in_file_order_is_reported() {
        // The map orders keys alphabetically; the report must still follow the file.
        assert_refused("[quotas]\nmax_vms = 0\n[access]\nusers = [\"\"]\n", 2, &["quotas.max_vms"]);
        assert_refused("[network]\nvm_prefix = 99\npool = \"x\"\n", 2, &["vm_prefix"]);
    }

    const PACKAGED: &str = include_str!("../../../packaging/policy.toml");

    #[test]
    fn packaged_policy_is_valid_and_is_the_defaults_admitting_the_socket_group() {
        let p = Policy::from_toml("packaging/policy.toml", PACKAGED).unwrap_or_else(|e| panic!("{e}"));
        let mut want = Policy::default_policy();
        want.access.groups = vec![want.access.socket_group.clone()];
        assert_eq!(p, want, "the shipped file documents the built-in defaults, and admits group banger");
    }

    #[test]
    fn packaged_policy_examples_are_valid_when_uncommented() {
        let examples = [
            "# [quotas.users.alice]",
            "# max_vms = 4",
            "# max_taps = 4",
            "# max_loops = 8",
            "# max_memory_mib = 4096",
            "# allow = [\"udp/53\", \"tcp/53\"]",
            "# [jailer]",
            "# jailer = \"/usr/local/bin/jailer\"",
            "# firecracker = \"/usr/local/bin/firecracker\"",
            "# chroot_base = \"/srv/banger/jails\"",
            "# uid_range = \"900000-965535\"",
        ];
        let mut text = String::new();
        for line in PACKAGED.lines() {
            if line == "allow = []" {
                continue;
            }
            // The [jailer] keys with a comment after them are uncommented too.
            let keyed =
                ["# cgroup = ", "# cgroup_parent = ", "# mode = "].iter().any(|k| line.starts_with(k));
            match examples.iter().find(|e| **e == line) {
                Some(example) => text.push_str(&example[2..]),
                None if keyed => text.push_str(&line[2..]),
                None => text.push_str(line),
            }
            text.push('\n');
        }
        let p = parse(&text);
        assert_eq!(
            p.user_quotas["alice"],
            Quotas { max_vms: 4, max_taps: 4, max_loops: 8, max_vcpus: 32, max_memory_mib: 4096 }
        );
        let jailer = p.jailer.expect("the [jailer] example");
        assert_eq!((jailer.uids, jailer.mode), ((900000, 965535), crate::JailerMode::Allow));
        assert_eq!(p.network.guest_to_host.allow.len(), 2);
        // Every inline example `e.g. key = value` and `Example: key = value` is valid too.
        let mut checked = 0;
        for line in PACKAGED.lines() {
            for marker in ["Example: ", "e.g. "] {
                if let Some((_, example)) = line.split_once(marker)
                    && example.contains(" = ")
                {
                    let example = example.trim_end_matches('.');
                    let section = match example.split(' ').next() {
                        Some("users" | "groups") => "access",
                        Some("uplink") => "network",
                        Some("log") => "audit",
                        other => panic!("example of unknown key {other:?}"),
                    };
                    parse(&format!("[{section}]\n{example}\n"));
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 4, "users, groups, uplink and log examples");
    }

    #[test]
    fn edit_distance_and_suggestions() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(closest("max_vm", QUOTAS_KEYS), Some("max_vms"));
        assert_eq!(closest("zzz", QUOTAS_KEYS), None);
        assert_eq!(closest("x", &["y"]), None, "a one-letter key is not a typo of another");
    }
}
