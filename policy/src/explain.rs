//! The policy in plain sentences, for `banger-helper policy explain`.
//!
//! One sentence per line, in the order of the file's sections: who may connect, how much each
//! user may hold, the addresses and what guests may reach, the audit log. Asked
//! about one user, only what applies to that user is said. Group membership lives in the account
//! databases, which this crate does not read: [`explain`] says which groups would admit a user
//! known only by name, and [`explain_peer`] takes an account as the helper would identify it (a
//! caller looked up its uid and groups) and decides with [`Access::admits`](crate::Access::admits),
//! the very check the helper makes.

use crate::authorize::{entry_names, is_account_id};
use crate::{Admission, AuditTarget, FirewallChoice, Peer, Policy, Quotas, Uplink};

/// Describes what the policy lets each user (or only `user`) do, one sentence per line.
pub fn explain(policy: &Policy, user: Option<&str>) -> String {
    let lines = match user {
        None => everyone(policy),
        Some(user) => one_user(policy, user, verdict(policy, user)),
    };
    finish(lines)
}

/// Describes what the account `peer` may do, one sentence per line: whether it may connect is
/// decided by [`Access::admits`](crate::Access::admits), as the helper decides it, and said with
/// the entry that admits it; a peer outside the socket's group is told so too.
pub fn explain_peer(policy: &Policy, peer: &Peer) -> String {
    let user = peer.user.clone().unwrap_or_else(|| peer.uid.to_string());
    let label = user_label(&user);
    let verdict = match policy.access.admits(peer) {
        Some(Admission::User(entry)) => {
            Verdict::Yes(format!("{label} may connect (listed in access.users as \"{entry}\")."))
        }
        Some(Admission::Group(entry)) => Verdict::Yes(format!(
            "{label} may connect (a member of {}, listed in access.groups).",
            group_label(&entry)
        )),
        None => Verdict::No,
    };
    let mut lines = one_user(policy, &user, verdict);
    let socket_group = &policy.access.socket_group;
    let in_socket_group = peer.group_names.iter().any(|g| entry_names(socket_group, Some(g), None))
        || peer.groups.iter().any(|g| entry_names(socket_group, None, Some(*g)));
    if !in_socket_group {
        lines.insert(
            1,
            format!(
                "{label} is not in {} and so cannot reach the socket: add it (usermod -aG {socket_group} {user}).",
                group_label(socket_group)
            ),
        );
    }
    finish(lines)
}

fn finish(lines: Vec<String>) -> String {
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

/// `alice` or `uid 1005`, for an `access.users` entry or a `quotas.users` key.
fn user_label(entry: &str) -> String {
    if is_account_id(entry) { format!("uid {entry}") } else { entry.to_owned() }
}

/// `group kvm` or `gid 300`, for an `access.groups` entry.
fn group_label(entry: &str) -> String {
    if is_account_id(entry) { format!("gid {entry}") } else { format!("group {entry}") }
}

fn count(n: u32, one: &str, many: &str) -> String {
    if n == 1 { format!("1 {one}") } else { format!("{n} {many}") }
}

/// `a`, `a and b`, `a, b and c` (or `or`).
fn list(items: &[String], last_word: &str) -> String {
    match items {
        [] => String::new(),
        [only] => only.clone(),
        [rest @ .., last] => format!("{} {last_word} {last}", rest.join(", ")),
    }
}

fn limits(q: Quotas) -> String {
    format!(
        "{}, {} and {}, and over its jailed VMs {} and {} MiB of memory",
        count(q.max_vms, "VM", "VMs"),
        count(q.max_taps, "TAP device", "TAP devices"),
        count(q.max_loops, "loop device", "loop devices"),
        count(q.max_vcpus, "vCPU", "vCPUs"),
        q.max_memory_mib
    )
}

/// What `[jailer]` says, or that there is none.
fn jailer(policy: &Policy) -> Vec<String> {
    let Some(j) = &policy.jailer else {
        return vec![
            "VMs run only in direct mode (as their user): the policy has no [jailer] section.".to_owned(),
        ];
    };
    let (first, last) = j.uids;
    let cgroup = match j.cgroup {
        crate::CgroupVersion::Auto => {
            "cgroup v2 where it has the cpu and memory controllers, else v1".to_owned()
        }
        version => format!("cgroup {}", version.as_str()),
    };
    vec![
        format!(
            "Jailed VMs run {} through {} in chroots under {}, each as a uid of its own from {first}-{last} (at most {} jails at once on this host).",
            j.firecracker.display(),
            j.jailer.display(),
            j.chroot_base.display(),
            u64::from(last - first) + 1
        ),
        format!(
            "A user's jails share the cgroup {}/u<uid> ({cgroup}), limited to the user's vCPU and memory totals.",
            j.cgroup_parent
        ),
        match j.mode {
            crate::JailerMode::Allow => {
                "Users choose direct or jailed VMs (jailer.mode = \"allow\").".to_owned()
            }
            crate::JailerMode::Force => {
                "Every VM runs jailed (jailer.mode = \"force\"): the helper hands no TAP \
                 device or block device to a user."
                    .to_owned()
            }
        },
    ]
}

fn everyone(policy: &Policy) -> Vec<String> {
    let access = &policy.access;
    let mut lines = Vec::new();
    if access.users.is_empty() && access.groups.is_empty() {
        lines.push(
            "Nobody may connect: access.users and access.groups are both empty, so every request is refused."
                .to_owned(),
        );
    } else {
        for entry in &access.users {
            lines.push(format!("{} may connect (listed in access.users).", user_label(entry)));
        }
        for entry in &access.groups {
            lines.push(format!("Members of {} may connect (listed in access.groups).", group_label(entry)));
        }
        lines.push(
            "Nobody else may connect; root is not allowed unless listed like any other user.".to_owned(),
        );
    }
    lines.push(socket_sentence(policy, "a user"));
    lines.push(format!("Each user may run at most {}.", limits(policy.quotas)));
    for (name, quotas) in &policy.user_quotas {
        lines.push(format!(
            "{} may run at most {} (quotas.users.{name}).",
            user_label(name),
            limits(*quotas)
        ));
    }
    lines.extend(network(policy, "each user a"));
    lines.push(format!(
        "The pool has room for {}; a user keeps its lease.",
        count(policy.network.lease_count(), "user", "users")
    ));
    lines.extend(jailer(policy));
    lines.push(audit(policy));
    lines
}

/// How `user` gets in, or the sentence saying it cannot.
enum Verdict {
    /// Admitted, and why.
    Yes(String),
    /// Admitted only through group membership this crate cannot check.
    Maybe(String),
    /// Refused.
    No,
}

/// The verdict for a user known only by name or uid, without its groups.
fn verdict(policy: &Policy, user: &str) -> Verdict {
    let access = &policy.access;
    let (name, uid) = if is_account_id(user) { (None, user.parse().ok()) } else { (Some(user), None) };
    if access.users.iter().any(|e| entry_names(e, name, uid)) {
        return Verdict::Yes(format!("{} may connect (listed in access.users).", user_label(user)));
    }
    if access.groups.is_empty() {
        return Verdict::No;
    }
    let groups: Vec<String> = access.groups.iter().map(|g| group_label(g)).collect();
    Verdict::Maybe(format!(
        "{} is not in access.users and may connect only as a member of {} (access.groups).",
        user_label(user),
        list(&groups, "or")
    ))
}

fn one_user(policy: &Policy, user: &str, verdict: Verdict) -> Vec<String> {
    let label = user_label(user);
    let mut lines = match verdict {
        Verdict::No => {
            return vec![format!(
                "{label} may not connect: add {user} to access.users or one of its groups to access.groups."
            )];
        }
        Verdict::Yes(line) | Verdict::Maybe(line) => vec![line],
    };
    lines.push(socket_sentence(policy, &label));
    let (quotas, source) = match policy.user_quotas.get(user) {
        Some(q) => (*q, format!("quotas.users.{user}")),
        None => (policy.quotas, "the default quotas".to_owned()),
    };
    lines.push(format!("{label} may run at most {} ({source}).", limits(quotas)));
    lines.extend(network(policy, &format!("{label} gets a")));
    lines.extend(jailer(policy));
    lines.push(audit(policy));
    lines
}

fn socket_sentence(policy: &Policy, who: &str) -> String {
    let group = group_label(&policy.access.socket_group);
    format!(
        "The helper's socket belongs to {group} (mode 0660), so {who} must also be in {group} to reach it."
    )
}

/// The address plan and what guests may reach; `lease_phrase` is `each user a` or `alice gets a`.
fn network(policy: &Policy, lease_phrase: &str) -> Vec<String> {
    let n = &policy.network;
    let mut lines = vec![format!(
        "Guests get addresses from {}: {lease_phrase} /{} ({} of a /{} each).",
        n.pool,
        n.lease_prefix,
        count(n.slots_per_lease(), "VM", "VMs"),
        n.vm_prefix
    )];
    lines.push(match &n.uplink {
        Uplink::Auto => "Guest traffic leaves, masqueraded, through the interface of the default route \
                         (network.uplink = \"auto\")."
            .to_owned(),
        Uplink::Named(name) => format!("Guest traffic leaves, masqueraded, through {name} (network.uplink)."),
    });
    lines.push(match n.firewall {
        FirewallChoice::Auto => "The helper writes guests' firewall rules in its own nftables table where the \
                                 kernel has nf_tables, else with the iptables tools (network.firewall = \"auto\")."
            .to_owned(),
        FirewallChoice::Nftables => {
            "The helper writes guests' firewall rules in its own nftables table (network.firewall).".to_owned()
        }
        FirewallChoice::Iptables => {
            "The helper writes guests' firewall rules with the iptables tools (network.firewall).".to_owned()
        }
    });
    lines.push(
        if n.guest_to_guest { "Guests may reach each other." } else { "Guests may not reach each other." }
            .to_owned(),
    );
    let to_host = &n.guest_to_host;
    lines.push(if to_host.allow_all {
        "Guests may open any connection to the host.".to_owned()
    } else if to_host.allow.is_empty() {
        "Guests may not open connections to the host; they only get replies to connections the host opens."
            .to_owned()
    } else {
        let ports: Vec<String> = to_host.allow.iter().map(ToString::to_string).collect();
        format!(
            "Guests may not open connections to the host, except {} on their gateway.",
            list(&ports, "and")
        )
    });
    lines
        .push(if n.ipv6 { "TAP devices keep IPv6." } else { "TAP devices have IPv6 turned off." }.to_owned());
    lines
}

fn audit(policy: &Policy) -> String {
    match &policy.audit.target {
        AuditTarget::Stderr => {
            "Every request is logged to the helper's standard error (the journal under systemd).".to_owned()
        }
        AuditTarget::File(path) => {
            format!("Every request is appended as one JSON line to {}.", path.display())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Policy {
        Policy::from_toml("test.toml", text).unwrap()
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    const SAMPLE: &str = r#"
[access]
users = ["alice", "1005"]
groups = ["kvm", "300"]

[quotas.users.bob]
max_vms = 1
max_taps = 1
max_loops = 1

[network.guest_to_host]
allow = ["udp/53", "tcp/53"]

[audit]
log = "/var/log/banger/audit.log"
"#;

    #[test]
    fn the_jailer_section_and_totals_are_described() {
        let text = explain(
            &policy(
                "[quotas]\nmax_vcpus = 1\nmax_memory_mib = 512\n[jailer]\njailer = \"/opt/jailer\"\n\
                 firecracker = \"/opt/firecracker\"\nchroot_base = \"/srv/jails\"\nuid_range = \"900000-900009\"\n\
                 cgroup = \"v1\"\nmode = \"force\"\n",
            ),
            None,
        );
        for needle in [
            "Each user may run at most 16 VMs, 16 TAP devices and 32 loop devices, and over its jailed VMs 1 vCPU \
             and 512 MiB of memory.",
            "Jailed VMs run /opt/firecracker through /opt/jailer in chroots under /srv/jails, each as a uid of its \
             own from 900000-900009 (at most 10 jails at once on this host).",
            "A user's jails share the cgroup banger/u<uid> (cgroup v1), limited to the user's vCPU and memory totals.",
            "Every VM runs jailed (jailer.mode = \"force\"): the helper hands no TAP device or block device to a user.",
        ] {
            assert!(text.lines().any(|l| l == needle), "missing {needle:?} in\n{text}");
        }
        let alice = explain(&policy("[access]\nusers = [\"alice\"]\n"), Some("alice"));
        assert!(alice.contains("no [jailer] section"), "{alice}");
    }

    #[test]
    fn default_policy_reads_as_sentences() {
        let text = explain(&Policy::default_policy(), None);
        assert_eq!(
            lines(&text),
            [
                "Nobody may connect: access.users and access.groups are both empty, so every request is refused.",
                "The helper's socket belongs to group banger (mode 0660), so a user must also be in group banger \
                 to reach it.",
                "Each user may run at most 16 VMs, 16 TAP devices and 32 loop devices, and over its jailed VMs \
                 32 vCPUs and 32768 MiB of memory.",
                "Guests get addresses from 172.30.0.0/16: each user a /24 (64 VMs of a /30 each).",
                "Guest traffic leaves, masqueraded, through the interface of the default route \
                 (network.uplink = \"auto\").",
                "The helper writes guests' firewall rules in its own nftables table where the kernel has nf_tables, \
                 else with the iptables tools (network.firewall = \"auto\").",
                "Guests may not reach each other.",
                "Guests may not open connections to the host; they only get replies to connections the host opens.",
                "TAP devices have IPv6 turned off.",
                "The pool has room for 256 users; a user keeps its lease.",
                "VMs run only in direct mode (as their user): the policy has no [jailer] section.",
                "Every request is logged to the helper's standard error (the journal under systemd).",
            ]
        );
        assert!(text.ends_with(".\n"));
    }

    #[test]
    fn listed_users_groups_and_overrides_are_named() {
        let text = explain(&policy(SAMPLE), None);
        for needle in [
            "alice may connect (listed in access.users).",
            "uid 1005 may connect (listed in access.users).",
            "Members of group kvm may connect (listed in access.groups).",
            "Members of gid 300 may connect (listed in access.groups).",
            "Nobody else may connect; root is not allowed unless listed like any other user.",
            "bob may run at most 1 VM, 1 TAP device and 1 loop device, and over its jailed VMs 32 vCPUs and \
             32768 MiB of memory (quotas.users.bob).",
            "Guests may not open connections to the host, except udp/53 and tcp/53 on their gateway.",
            "Every request is appended as one JSON line to /var/log/banger/audit.log.",
        ] {
            assert!(text.lines().any(|l| l == needle), "missing {needle:?} in\n{text}");
        }
    }

    #[test]
    fn one_listed_user_sees_only_its_own_terms() {
        let text = explain(&policy(SAMPLE), Some("alice"));
        assert_eq!(lines(&text)[0], "alice may connect (listed in access.users).");
        assert!(text.contains(
            "alice may run at most 16 VMs, 16 TAP devices and 32 loop devices, and over its jailed VMs 32 vCPUs \
             and 32768 MiB of memory (the default quotas)."
        ));
        assert!(text.contains("alice gets a /24 (64 VMs of a /30 each)."));
        assert!(!text.contains("uid 1005") && !text.contains("bob"), "{text}");
        let text = explain(&policy(SAMPLE), Some("1005"));
        assert_eq!(lines(&text)[0], "uid 1005 may connect (listed in access.users).");
    }

    #[test]
    fn user_outside_access_is_told_what_the_admin_must_add() {
        let p = policy("[access]\nusers = [\"alice\"]\n");
        assert_eq!(
            explain(&p, Some("bob")),
            "bob may not connect: add bob to access.users or one of its groups to access.groups.\n"
        );
        let text = explain(&Policy::default_policy(), Some("root"));
        assert!(text.starts_with("root may not connect"), "{text}");
    }

    #[test]
    fn group_membership_is_conditional_unless_the_groups_are_known() {
        let p = policy(SAMPLE);
        let text = explain(&p, Some("bob"));
        assert_eq!(
            lines(&text)[0],
            "bob is not in access.users and may connect only as a member of group kvm or gid 300 (access.groups)."
        );
        assert!(text.contains(
            "bob may run at most 1 VM, 1 TAP device and 1 loop device, and over its jailed VMs 32 vCPUs and \
             32768 MiB of memory (quotas.users.bob)."
        ));
    }

    fn account(user: &str, uid: u32, groups: &[(&str, u32)]) -> Peer {
        Peer {
            uid,
            gid: uid,
            pid: 1,
            user: Some(user.into()),
            groups: groups.iter().map(|(_, gid)| *gid).collect(),
            group_names: groups.iter().map(|(name, _)| (*name).to_owned()).collect(),
            install: None,
        }
    }

    #[test]
    fn an_account_is_decided_as_the_helper_decides() {
        let p = policy(SAMPLE);
        let bob = account("bob", 1002, &[("users", 100), ("kvm", 994), ("banger", 995)]);
        assert!(p.access.admits(&bob).is_some());
        let text = explain_peer(&p, &bob);
        assert_eq!(lines(&text)[0], "bob may connect (a member of group kvm, listed in access.groups).");
        assert!(text.contains("bob may run at most 1 VM"), "{text}");
        let text = explain_peer(&p, &account("bob", 1002, &[("staff", 300), ("banger", 995)]));
        assert_eq!(lines(&text)[0], "bob may connect (a member of gid 300, listed in access.groups).");
        let text = explain_peer(&p, &account("carol", 1005, &[("banger", 995)]));
        assert_eq!(lines(&text)[0], "carol may connect (listed in access.users as \"1005\").");
        let nobody = account("bob", 1002, &[("users", 100), ("banger", 995)]);
        assert_eq!(p.access.admits(&nobody), None);
        assert_eq!(
            explain_peer(&p, &nobody),
            "bob may not connect: add bob to access.users or one of its groups to access.groups.\n"
        );
    }

    #[test]
    fn an_account_outside_the_socket_group_is_told_to_join_it() {
        let p = policy(SAMPLE);
        let text = explain_peer(&p, &account("alice", 1001, &[("users", 100)]));
        assert_eq!(
            lines(&text)[..2],
            [
                "alice may connect (listed in access.users as \"alice\").",
                "alice is not in group banger and so cannot reach the socket: add it (usermod -aG banger alice)."
            ]
        );
    }

    #[test]
    fn network_variants_are_described() {
        let text = explain(
            &policy(
                "[network]\npool = \"10.1.0.0/16\"\nlease_prefix = 30\nuplink = \"eth1\"\nipv6 = true\n\
                 guest_to_guest = true\n[network.guest_to_host]\nallow_all = true\n",
            ),
            None,
        );
        for needle in [
            "Guests get addresses from 10.1.0.0/16: each user a /30 (1 VM of a /30 each).",
            "Guest traffic leaves, masqueraded, through eth1 (network.uplink).",
            "Guests may reach each other.",
            "Guests may open any connection to the host.",
            "TAP devices keep IPv6.",
            "The pool has room for 16384 users; a user keeps its lease.",
        ] {
            assert!(text.lines().any(|l| l == needle), "missing {needle:?} in\n{text}");
        }
    }
}
