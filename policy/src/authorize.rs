//! The pure decision every request goes through.
//!
//! [`authorize`] looks only at its arguments: the policy, the peer the helper authenticated, the
//! decoded request and the ledger as it stands. It answers before anything is touched, so the
//! helper runs it first and acts only on [`Decision::Allow`]. The checks, in order:
//!
//! 1. **Access** (rule `access`): the peer's user name or decimal uid is in `access.users`, or
//!    one of its groups (by name or decimal gid) is in `access.groups`. Nothing else grants
//!    access: uid 0 is treated like any other uid and is refused unless listed. An entry made
//!    only of digits is an id; anything else is a name.
//! 2. **Handshake**: every request but `Hello` needs the install the connection said `Hello`
//!    for, because objects are keyed by `(uid, install, vm)`.
//! 3. **Per operation**, always against the caller's own entries only (the ledger queries take
//!    the caller's uid), with the caller's quotas ([`Policy::quotas_for_uid`]):
//!    - `TapCreate`: allowed at once if this VM of this install already has its TAP (the helper
//!      answers with it); else `quotas.max_taps`, then `quotas.max_vms` if the VM has no object
//!      yet, then a free VM subnet in the caller's lease, then (for a caller without a lease) a
//!      free lease in the pool (rule `network.pool`).
//!    - `LeaseSubnet`: a caller without a lease needs a free one in the pool (`network.pool`).
//!    - `NatUp`: the caller's TAP for that VM of this install must be in the ledger.
//!    - `LoopAttach`: refused if that VM and role already has a device, else `quotas.max_loops`,
//!      then `quotas.max_vms` if the VM has no object yet.
//!    - `SysctlSet`: the key and the value must be in the sysctl allowlist (rule `sysctl`).
//!    - `TeardownVms`: at most [`MAX_TEARDOWN_VMS`] VMs.
//!    - `Ping`, `ListOwned`, `TapDelete`, `NatDown`, `LoopDetach`: allowed; they act only on
//!      the caller's own objects, found by the helper under the caller's key, and removing what
//!      is absent is success.
//!
//! A lease that a policy change left outside the pool is refused (rule `network.pool`) rather
//! than handed out, so no address outside `network.pool` is ever used.

use banger_protocol::{HelperError, InstallId, MAX_TEARDOWN_VMS, Request, VmId};

use crate::{Access, Ledger, ObjectKind, Policy, Quotas};

/// Who is asking, as the helper established it (SO_PEERCRED and the account databases).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The peer's uid.
    pub uid: u32,
    /// The peer's primary gid.
    pub gid: u32,
    /// The peer's pid at connect time.
    pub pid: i32,
    /// The user name of `uid`, when it has one.
    pub user: Option<String>,
    /// Every group the peer is in (primary and supplementary), as gids.
    pub groups: Vec<u32>,
    /// The names of those groups that have one.
    pub group_names: Vec<String>,
    /// The install this connection said `Hello` for (`None` before the handshake).
    pub install: Option<InstallId>,
}

/// The outcome of [`authorize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Allow,
    /// Refuse with this error; every refusal names the policy rule (or ledger fact) that decided.
    Refuse(HelperError),
}

impl Decision {
    /// Whether the decision is [`Decision::Allow`].
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// Which `[access]` entry lets a peer in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// This entry of `access.users` (a user name or decimal uid).
    User(String),
    /// This entry of `access.groups` (a group name or decimal gid).
    Group(String),
}

/// Whether an access entry names the account `name` / `id`: an all-digit entry is an id, any
/// other entry a name.
pub(crate) fn entry_names(entry: &str, name: Option<&str>, id: Option<u32>) -> bool {
    if !entry.is_empty() && entry.bytes().all(|b| b.is_ascii_digit()) {
        id.is_some() && entry.parse::<u32>().ok() == id
    } else {
        name == Some(entry)
    }
}

impl Access {
    /// The entry that admits `peer`, if any: its user first, then its groups.
    pub fn admits(&self, peer: &Peer) -> Option<Admission> {
        if let Some(entry) = self.users.iter().find(|e| entry_names(e, peer.user.as_deref(), Some(peer.uid)))
        {
            return Some(Admission::User(entry.clone()));
        }
        self.groups
            .iter()
            .find(|e| {
                peer.groups.iter().any(|gid| entry_names(e, None, Some(*gid)))
                    || peer.group_names.iter().any(|name| entry_names(e, Some(name), None))
            })
            .map(|e| Admission::Group(e.clone()))
    }
}

/// Decides whether `peer` may make `request` now, given the policy and the ledger.
pub fn authorize(policy: &Policy, peer: &Peer, request: &Request, ledger: &Ledger) -> Decision {
    match check(policy, peer, request, ledger) {
        Ok(()) => Decision::Allow,
        Err(error) => Decision::Refuse(error),
    }
}

fn check(policy: &Policy, peer: &Peer, request: &Request, ledger: &Ledger) -> Result<(), HelperError> {
    if policy.access.admits(peer).is_none() {
        return Err(not_admitted(peer));
    }
    let install = match (request, &peer.install) {
        (Request::Hello { .. }, _) => return Ok(()),
        (_, Some(install)) => install,
        (_, None) => {
            return Err(HelperError::invalid(format!(
                "{} before the handshake: say Hello first",
                request.op_name()
            )));
        }
    };
    let uid = peer.uid;
    let quotas = policy.quotas_for_uid(peer.user.as_deref(), uid);
    match request {
        Request::Hello { .. }
        | Request::Ping
        | Request::ListOwned
        | Request::TapDelete { .. }
        | Request::NatDown { .. }
        | Request::LoopDetach { .. } => Ok(()),
        Request::LeaseSubnet => lease_for(policy, ledger, uid).map(|_| ()),
        Request::TapCreate { vm } => tap_create(policy, ledger, uid, install, vm, quotas),
        Request::NatUp { vm } => match ledger.find(uid, install, vm, ObjectKind::Tap) {
            Some(_) => Ok(()),
            None => Err(HelperError::NotFound {
                what: format!("no tap for vm {vm} of this install: create it first"),
            }),
        },
        Request::SysctlSet { key, value } => sysctl(policy, key, value),
        Request::LoopAttach { vm, role, .. } => {
            if ledger.find(uid, install, vm, ObjectKind::Loop(*role)).is_some() {
                return Err(HelperError::Conflict {
                    what: format!(
                        "loop device for vm {vm} role {} already attached; detach it first",
                        role.as_str()
                    ),
                });
            }
            if ledger.count_loops(uid) >= quotas.max_loops {
                return Err(quota("loops", quotas.max_loops));
            }
            new_vm_fits(ledger, uid, install, vm, quotas)
        }
        Request::TeardownVms { vms } => {
            if vms.len() > MAX_TEARDOWN_VMS {
                return Err(HelperError::invalid(format!(
                    "teardown names {} vms; at most {MAX_TEARDOWN_VMS} per request",
                    vms.len()
                )));
            }
            Ok(())
        }
    }
}

fn not_admitted(peer: &Peer) -> HelperError {
    let (who, entry) = match &peer.user {
        Some(name) => (format!("uid {} ({name})", peer.uid), name.clone()),
        None => (format!("uid {}", peer.uid), format!("\"{}\"", peer.uid)),
    };
    HelperError::Denied {
        rule: "access".to_owned(),
        reason: format!(
            "{who} may not use banger-helper; an admin must add {entry} to access.users, or one of \
             its groups to access.groups, in the helper's policy"
        ),
    }
}

fn quota(resource: &str, limit: u32) -> HelperError {
    HelperError::QuotaExceeded { resource: resource.to_owned(), limit }
}

/// A VM that has no object yet must fit under `quotas.max_vms`.
fn new_vm_fits(
    ledger: &Ledger,
    uid: u32,
    install: &InstallId,
    vm: &VmId,
    quotas: Quotas,
) -> Result<(), HelperError> {
    if !ledger.has_vm(uid, install, vm) && ledger.count_vms(uid) >= quotas.max_vms {
        return Err(quota("vms", quotas.max_vms));
    }
    Ok(())
}

fn tap_create(
    policy: &Policy,
    ledger: &Ledger,
    uid: u32,
    install: &InstallId,
    vm: &VmId,
    quotas: Quotas,
) -> Result<(), HelperError> {
    if ledger.find(uid, install, vm, ObjectKind::Tap).is_some() {
        return Ok(());
    }
    if ledger.count_taps(uid) >= quotas.max_taps {
        return Err(quota("taps", quotas.max_taps));
    }
    new_vm_fits(ledger, uid, install, vm, quotas)?;
    let slots = policy.network.slots_per_lease();
    if ledger.free_slot(uid, slots).is_none() {
        return Err(quota("vm subnets", slots));
    }
    lease_for(policy, ledger, uid).map(|_| ())
}

/// The lease `uid` has or would get now.
fn lease_for(policy: &Policy, ledger: &Ledger, uid: u32) -> Result<u32, HelperError> {
    let network = &policy.network;
    let total = network.lease_count();
    let denied = |reason: String| HelperError::Denied { rule: "network.pool".to_owned(), reason };
    match ledger.lease_of(uid) {
        Some(index) if index < total => Ok(index),
        Some(index) => Err(denied(format!(
            "uid {uid} holds lease {index}, which network.pool {} (/{} leases) no longer contains since \
             the policy changed; an admin must restore the pool or release the lease",
            network.pool, network.lease_prefix
        ))),
        None => ledger.next_free_lease(total).ok_or_else(|| {
            denied(format!(
                "the address pool {} is exhausted: all {total} leases of /{} are taken; an admin must \
                 enlarge network.pool or raise network.lease_prefix",
                network.pool, network.lease_prefix
            ))
        }),
    }
}

/// At most this much of a client-supplied string is quoted back.
const QUOTE_MAX: usize = 64;

fn quoted(text: &str) -> String {
    let short: String = text.chars().take(QUOTE_MAX).collect();
    if short.len() < text.len() { format!("{short:?}…") } else { format!("{short:?}") }
}

fn sysctl(policy: &Policy, key: &str, value: &str) -> Result<(), HelperError> {
    let denied = |reason: String| HelperError::Denied { rule: "sysctl".to_owned(), reason };
    match policy.sysctl_rule(key) {
        Some(rule) if rule.allows(value) => Ok(()),
        Some(rule) => Err(denied(format!(
            "{key} may only be set to {} (policy [[sysctl]]), not {}",
            one_of(&rule.values),
            quoted(value)
        ))),
        None if policy.sysctls.is_empty() => {
            Err(denied(format!("{} may not be set: the policy allows no sysctl", quoted(key))))
        }
        None => {
            let keys: Vec<&str> = policy.sysctls.iter().map(|rule| rule.key.as_str()).collect();
            Err(denied(format!(
                "{} is not in the policy's sysctl allowlist (allowed: {})",
                quoted(key),
                keys.join(", ")
            )))
        }
    }
}

/// `1`, `0 or 1`, `0, 1 or 2`.
pub(crate) fn one_of(values: &[String]) -> String {
    match values {
        [] => String::new(),
        [only] => only.clone(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use banger_protocol::{HelperError, LoopRole, PROTOCOL_VERSION};
    use proptest::prelude::*;

    use super::*;
    use crate::{LedgerEntry, Object};

    const ALICE: u32 = 1000;
    const BOB: u32 = 1001;
    const CAROL: u32 = 1002;
    const KVM_GID: u32 = 120;

    /// alice and bob by name, uid 1005 by number, members of group `kvm` and of gid 300.
    /// Pool of 4 leases of 4 VM subnets each; small quotas so every limit is reachable.
    fn policy() -> Policy {
        Policy::from_toml(
            "test.toml",
            r#"
[access]
users = ["alice", "bob", "1005"]
groups = ["kvm", "300"]

[quotas]
max_vms = 3
max_taps = 3
max_loops = 4

[quotas.users.bob]
max_taps = 1

[network]
pool = "10.0.0.0/24"
lease_prefix = 26
vm_prefix = 28

[[sysctl]]
key = "net.ipv4.ip_forward"
values = ["1"]

[[sysctl]]
key = "net.ipv4.conf.all.forwarding"
values = ["0", "1"]
"#,
        )
        .unwrap()
    }

    fn install(s: &str) -> InstallId {
        InstallId::new(s).unwrap()
    }

    fn vm(s: &str) -> VmId {
        VmId::new(s).unwrap()
    }

    fn peer(uid: u32, user: Option<&str>) -> Peer {
        Peer {
            uid,
            gid: uid,
            pid: 4242,
            user: user.map(str::to_owned),
            groups: vec![uid],
            group_names: user.map(|u| vec![u.to_owned()]).unwrap_or_default(),
            install: Some(install("main")),
        }
    }

    fn alice() -> Peer {
        peer(ALICE, Some("alice"))
    }

    fn bob() -> Peer {
        peer(BOB, Some("bob"))
    }

    fn carol() -> Peer {
        peer(CAROL, Some("carol"))
    }

    fn entry(uid: u32, inst: &str, v: &str, kind: ObjectKind, slot: u32) -> LedgerEntry {
        let object = match kind {
            ObjectKind::Tap => Object::Tap {
                name: format!("bg{uid:x}{slot}"),
                slot,
                host_ip: Ipv4Addr::new(10, 0, 0, 1),
                guest_ip: Ipv4Addr::new(10, 0, 0, 2),
            },
            ObjectKind::Nat => Object::Nat { guest_ip: Ipv4Addr::new(10, 0, 0, 2), uplink: "eth0".into() },
            ObjectKind::Loop(role) => Object::Loop { role, device: "/dev/loop0".into(), read_only: false },
        };
        LedgerEntry { uid, install: install(inst), vm: vm(v), object }
    }

    fn ledger(entries: &[LedgerEntry], leases: &[(u32, u32)]) -> Ledger {
        let mut l = Ledger::default();
        for e in entries {
            l.insert(e.clone());
        }
        l.leases.extend(leases.iter().copied());
        l
    }

    fn decide(p: &Peer, r: Request, l: &Ledger) -> Decision {
        authorize(&policy(), p, &r, l)
    }

    fn refused(d: Decision) -> HelperError {
        match d {
            Decision::Refuse(e) => e,
            Decision::Allow => panic!("allowed"),
        }
    }

    fn denied_rule(d: Decision) -> (String, String) {
        match refused(d) {
            HelperError::Denied { rule, reason } => (rule, reason),
            other => panic!("not a denial: {other:?}"),
        }
    }

    fn tap_create(v: &str) -> Request {
        Request::TapCreate { vm: vm(v) }
    }

    fn loop_attach(v: &str, role: LoopRole) -> Request {
        Request::LoopAttach { vm: vm(v), role, read_only: true }
    }

    fn every_request() -> Vec<Request> {
        vec![
            Request::Hello { version: PROTOCOL_VERSION, install_id: install("main") },
            Request::Ping,
            Request::LeaseSubnet,
            tap_create("v1"),
            Request::TapDelete { vm: vm("v1") },
            Request::NatUp { vm: vm("v1") },
            Request::NatDown { vm: vm("v1") },
            Request::SysctlSet { key: "net.ipv4.ip_forward".into(), value: "1".into() },
            loop_attach("v1", LoopRole::Base),
            Request::LoopDetach { vm: vm("v1"), role: LoopRole::Base },
            Request::ListOwned,
            Request::TeardownVms { vms: vec![vm("v1")] },
        ]
    }

    // --- access ---

    #[test]
    fn listed_users_by_name_or_uid_and_listed_groups_are_admitted() {
        let access = &policy().access;
        assert_eq!(access.admits(&alice()), Some(Admission::User("alice".into())));
        assert_eq!(access.admits(&peer(1005, None)), Some(Admission::User("1005".into())));
        assert_eq!(access.admits(&peer(1005, Some("zed"))), Some(Admission::User("1005".into())));
        let mut in_kvm = carol();
        in_kvm.groups.push(KVM_GID);
        in_kvm.group_names.push("kvm".into());
        assert_eq!(access.admits(&in_kvm), Some(Admission::Group("kvm".into())));
        let mut in_300 = peer(2000, None);
        in_300.groups.push(300);
        assert_eq!(access.admits(&in_300), Some(Admission::Group("300".into())));
        assert_eq!(access.admits(&carol()), None);
        // A name made of digits matches nothing but the id: "1005" is not a user called 1005.
        assert_eq!(access.admits(&peer(7, Some("1005"))), None);
        // A gid is not matched against user entries, nor a uid against group entries.
        let mut uid_300 = peer(300, None);
        uid_300.groups = vec![100];
        assert_eq!(access.admits(&uid_300), None);
    }

    #[test]
    fn unlisted_peer_is_denied_by_access_for_every_request_naming_what_to_add() {
        let l = Ledger::default();
        for r in every_request() {
            let (rule, reason) = denied_rule(decide(&carol(), r.clone(), &l));
            assert_eq!(rule, "access");
            assert!(
                reason.contains("uid 1002 (carol)") && reason.contains("add carol to access.users"),
                "{reason}"
            );
            let (_, reason) = denied_rule(decide(&peer(4321, None), r, &l));
            assert!(reason.contains("add \"4321\" to access.users"), "{reason}");
        }
    }

    #[test]
    fn root_is_not_implicitly_allowed() {
        let root = peer(0, Some("root"));
        for r in every_request() {
            assert_eq!(denied_rule(decide(&root, r, &Ledger::default())).0, "access");
        }
        let mut p = policy();
        p.access.users = vec!["0".into()];
        assert_eq!(authorize(&p, &root, &Request::Ping, &Ledger::default()), Decision::Allow);
        p.access.users = vec!["root".into()];
        assert_eq!(authorize(&p, &root, &Request::Ping, &Ledger::default()), Decision::Allow);
    }

    #[test]
    fn an_empty_policy_admits_nobody() {
        let p = Policy::from_toml("empty.toml", "").unwrap();
        for who in [alice(), peer(0, Some("root")), peer(1005, None)] {
            let d = authorize(&p, &who, &Request::Ping, &Ledger::default());
            assert_eq!(denied_rule(d).0, "access");
        }
    }

    // --- handshake ---

    #[test]
    fn hello_is_allowed_without_install_and_everything_else_needs_it() {
        let mut p = alice();
        p.install = None;
        let l = Ledger::default();
        for r in every_request() {
            let d = decide(&p, r.clone(), &l);
            if matches!(r, Request::Hello { .. }) {
                assert_eq!(d, Decision::Allow);
            } else {
                match refused(d) {
                    HelperError::InvalidRequest { reason } => {
                        assert!(
                            reason.contains("say Hello first") && reason.contains(r.op_name()),
                            "{reason}"
                        )
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
    }

    // --- operations that act on the caller's own objects only ---

    #[test]
    fn deletes_lists_and_pings_are_allowed_to_admitted_peers() {
        let full = ledger(&[entry(BOB, "main", "v1", ObjectKind::Tap, 0)], &[(BOB, 0)]);
        for r in [
            Request::Ping,
            Request::ListOwned,
            Request::TapDelete { vm: vm("v1") },
            Request::NatDown { vm: vm("v1") },
            Request::LoopDetach { vm: vm("v1"), role: LoopRole::Cow },
            Request::TeardownVms { vms: vec![] },
            Request::TeardownVms { vms: vec![vm("v1"), vm("v2")] },
        ] {
            assert_eq!(decide(&alice(), r, &full), Decision::Allow);
        }
    }

    #[test]
    fn teardown_is_bounded() {
        let vms = vec![vm("v1"); MAX_TEARDOWN_VMS];
        assert_eq!(decide(&alice(), Request::TeardownVms { vms }, &Ledger::default()), Decision::Allow);
        let vms = vec![vm("v1"); MAX_TEARDOWN_VMS + 1];
        match refused(decide(&alice(), Request::TeardownVms { vms }, &Ledger::default())) {
            HelperError::InvalidRequest { reason } => assert!(reason.contains("at most 256"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    // --- leases ---

    #[test]
    fn lease_is_allowed_while_the_pool_has_room_or_the_caller_has_one() {
        let l = ledger(&[], &[(BOB, 0), (CAROL, 1), (1005, 2)]);
        assert_eq!(decide(&alice(), Request::LeaseSubnet, &l), Decision::Allow);
        let full = ledger(&[], &[(BOB, 0), (CAROL, 1), (1005, 2), (7, 3)]);
        let (rule, reason) = denied_rule(decide(&alice(), Request::LeaseSubnet, &full));
        assert_eq!(rule, "network.pool");
        assert!(
            reason.contains("exhausted") && reason.contains("10.0.0.0/24") && reason.contains("4 leases")
        );
        assert_eq!(decide(&bob(), Request::LeaseSubnet, &full), Decision::Allow, "bob keeps his");
    }

    #[test]
    fn a_lease_outside_a_shrunk_pool_is_refused() {
        let l = ledger(&[], &[(ALICE, 9)]);
        for r in [Request::LeaseSubnet, tap_create("v1")] {
            let (rule, reason) = denied_rule(decide(&alice(), r, &l));
            assert_eq!(rule, "network.pool");
            assert!(reason.contains("lease 9") && reason.contains("no longer contains"), "{reason}");
        }
    }

    // --- TAP create ---

    #[test]
    fn tap_create_is_idempotent_even_at_the_limit() {
        let l = ledger(
            &[
                entry(ALICE, "main", "v1", ObjectKind::Tap, 0),
                entry(ALICE, "main", "v2", ObjectKind::Tap, 1),
                entry(ALICE, "main", "v3", ObjectKind::Tap, 2),
            ],
            &[(ALICE, 0)],
        );
        assert_eq!(decide(&alice(), tap_create("v2"), &l), Decision::Allow);
        assert_eq!(
            refused(decide(&alice(), tap_create("v4"), &l)),
            HelperError::QuotaExceeded { resource: "taps".into(), limit: 3 }
        );
    }

    #[test]
    fn tap_quota_counts_every_install_and_uses_the_per_user_override() {
        let l = ledger(
            &[entry(ALICE, "a", "v1", ObjectKind::Tap, 0), entry(ALICE, "b", "v1", ObjectKind::Tap, 1)],
            &[(ALICE, 0)],
        );
        assert_eq!(decide(&alice(), tap_create("v1"), &l), Decision::Allow, "third tap, new key in main");
        let l = ledger(&[entry(BOB, "other", "v1", ObjectKind::Tap, 0)], &[(BOB, 1)]);
        assert_eq!(
            refused(decide(&bob(), tap_create("v1"), &l)),
            HelperError::QuotaExceeded { resource: "taps".into(), limit: 1 },
            "bob's override is max_taps = 1"
        );
    }

    #[test]
    fn tap_for_a_new_vm_respects_max_vms_but_a_vm_with_loops_does_not_count_twice() {
        let loops = |v: &str| entry(ALICE, "main", v, ObjectKind::Loop(LoopRole::Base), 0);
        let l = ledger(&[loops("v1"), loops("v2"), loops("v3")], &[(ALICE, 0)]);
        assert_eq!(decide(&alice(), tap_create("v2"), &l), Decision::Allow);
        assert_eq!(
            refused(decide(&alice(), tap_create("v4"), &l)),
            HelperError::QuotaExceeded { resource: "vms".into(), limit: 3 }
        );
    }

    #[test]
    fn tap_needs_a_free_vm_subnet_in_the_lease() {
        let mut p = policy();
        p.quotas = Quotas { max_vms: 10, max_taps: 10, max_loops: 10 };
        let taps: Vec<_> =
            (0..4).map(|slot| entry(ALICE, "main", &format!("v{slot}"), ObjectKind::Tap, slot)).collect();
        let l = ledger(&taps, &[(ALICE, 0)]);
        assert_eq!(
            refused(authorize(&p, &alice(), &tap_create("v9"), &l)),
            HelperError::QuotaExceeded { resource: "vm subnets".into(), limit: 4 }
        );
        let l = ledger(&taps[..3], &[(ALICE, 0)]);
        assert_eq!(authorize(&p, &alice(), &tap_create("v9"), &l), Decision::Allow);
    }

    #[test]
    fn first_tap_of_a_user_needs_a_free_lease() {
        let full = ledger(&[], &[(BOB, 0), (CAROL, 1), (1005, 2), (7, 3)]);
        let (rule, _) = denied_rule(decide(&alice(), tap_create("v1"), &full));
        assert_eq!(rule, "network.pool");
        let room = ledger(&[], &[(BOB, 0), (CAROL, 1), (1005, 2)]);
        assert_eq!(decide(&alice(), tap_create("v1"), &room), Decision::Allow);
    }

    // --- NAT ---

    #[test]
    fn nat_up_needs_the_callers_own_tap_of_this_install() {
        let mine = ledger(&[entry(ALICE, "main", "v1", ObjectKind::Tap, 0)], &[(ALICE, 0)]);
        assert_eq!(decide(&alice(), Request::NatUp { vm: vm("v1") }, &mine), Decision::Allow);
        let with_nat = ledger(
            &[entry(ALICE, "main", "v1", ObjectKind::Tap, 0), entry(ALICE, "main", "v1", ObjectKind::Nat, 0)],
            &[(ALICE, 0)],
        );
        assert_eq!(
            decide(&alice(), Request::NatUp { vm: vm("v1") }, &with_nat),
            Decision::Allow,
            "idempotent"
        );
        let cases = [
            ledger(&[], &[]),
            ledger(&[entry(BOB, "main", "v1", ObjectKind::Tap, 0)], &[(BOB, 0)]),
            ledger(&[entry(ALICE, "other", "v1", ObjectKind::Tap, 0)], &[(ALICE, 0)]),
            ledger(&[entry(ALICE, "main", "v2", ObjectKind::Tap, 0)], &[(ALICE, 0)]),
            ledger(&[entry(ALICE, "main", "v1", ObjectKind::Nat, 0)], &[(ALICE, 0)]),
        ];
        for l in cases {
            assert_eq!(
                refused(decide(&alice(), Request::NatUp { vm: vm("v1") }, &l)),
                HelperError::NotFound { what: "no tap for vm v1 of this install: create it first".into() }
            );
        }
    }

    // --- loops ---

    #[test]
    fn loop_attach_twice_for_one_role_conflicts() {
        let l = ledger(&[entry(ALICE, "main", "v1", ObjectKind::Loop(LoopRole::Base), 0)], &[]);
        assert_eq!(
            refused(decide(&alice(), loop_attach("v1", LoopRole::Base), &l)),
            HelperError::Conflict {
                what: "loop device for vm v1 role base already attached; detach it first".into()
            }
        );
        assert_eq!(decide(&alice(), loop_attach("v1", LoopRole::Cow), &l), Decision::Allow);
        let other_install = ledger(&[entry(ALICE, "other", "v1", ObjectKind::Loop(LoopRole::Base), 0)], &[]);
        assert_eq!(decide(&alice(), loop_attach("v1", LoopRole::Base), &other_install), Decision::Allow);
    }

    #[test]
    fn loop_attach_respects_max_loops_and_max_vms() {
        let l = ledger(
            &[
                entry(ALICE, "main", "v1", ObjectKind::Loop(LoopRole::Base), 0),
                entry(ALICE, "main", "v1", ObjectKind::Loop(LoopRole::Cow), 0),
                entry(ALICE, "main", "v2", ObjectKind::Loop(LoopRole::Base), 0),
                entry(ALICE, "main", "v2", ObjectKind::Loop(LoopRole::Cow), 0),
            ],
            &[],
        );
        assert_eq!(
            refused(decide(&alice(), loop_attach("v1", LoopRole::Work), &l)),
            HelperError::QuotaExceeded { resource: "loops".into(), limit: 4 }
        );
        let l = ledger(
            &[
                entry(ALICE, "main", "v1", ObjectKind::Tap, 0),
                entry(ALICE, "main", "v2", ObjectKind::Tap, 1),
                entry(ALICE, "x", "v1", ObjectKind::Tap, 2),
            ],
            &[(ALICE, 0)],
        );
        assert_eq!(decide(&alice(), loop_attach("v2", LoopRole::Base), &l), Decision::Allow);
        assert_eq!(
            refused(decide(&alice(), loop_attach("v3", LoopRole::Base), &l)),
            HelperError::QuotaExceeded { resource: "vms".into(), limit: 3 }
        );
    }

    // --- sysctl ---

    #[test]
    fn sysctl_key_and_value_must_be_allowlisted() {
        let l = Ledger::default();
        let set = |k: &str, v: &str| Request::SysctlSet { key: k.into(), value: v.into() };
        assert_eq!(decide(&alice(), set("net.ipv4.ip_forward", "1"), &l), Decision::Allow);
        assert_eq!(decide(&alice(), set("net.ipv4.conf.all.forwarding", "0"), &l), Decision::Allow);
        let (rule, reason) = denied_rule(decide(&alice(), set("net.ipv4.ip_forward", "0"), &l));
        assert_eq!(rule, "sysctl");
        assert_eq!(reason, "net.ipv4.ip_forward may only be set to 1 (policy [[sysctl]]), not \"0\"");
        let (_, reason) = denied_rule(decide(&alice(), set("net.ipv4.conf.all.forwarding", "2"), &l));
        assert!(reason.contains("to 0 or 1"), "{reason}");
        let (rule, reason) = denied_rule(decide(&alice(), set("kernel.modprobe", "/tmp/x"), &l));
        assert_eq!(rule, "sysctl");
        assert!(reason.contains("\"kernel.modprobe\" is not in") && reason.contains("net.ipv4.ip_forward"));
        for key in
            ["net/ipv4/ip_forward", "../../../etc/passwd", "net.ipv4.ip_forward ", "NET.IPV4.IP_FORWARD"]
        {
            assert_eq!(denied_rule(decide(&alice(), set(key, "1"), &l)).0, "sysctl", "{key}");
        }
        let (_, reason) = denied_rule(decide(&alice(), set(&"k".repeat(5000), "1"), &l));
        assert!(reason.len() < 300, "a long key is not echoed whole");
        let mut none = policy();
        none.sysctls.clear();
        let (_, reason) = denied_rule(authorize(&none, &alice(), &set("net.ipv4.ip_forward", "1"), &l));
        assert!(reason.contains("allows no sysctl"), "{reason}");
    }

    #[test]
    fn one_of_reads_naturally() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(one_of(&v(&["1"])), "1");
        assert_eq!(one_of(&v(&["0", "1"])), "0 or 1");
        assert_eq!(one_of(&v(&["0", "1", "2"])), "0, 1 or 2");
    }

    // --- cross-user isolation, by example ---

    #[test]
    fn another_users_objects_never_help_or_hurt() {
        // Bob owns a TAP, NAT and loops for alice's VM id in alice's install id.
        let bobs = ledger(
            &[
                entry(BOB, "main", "v1", ObjectKind::Tap, 0),
                entry(BOB, "main", "v1", ObjectKind::Nat, 0),
                entry(BOB, "main", "v1", ObjectKind::Loop(LoopRole::Base), 0),
                entry(BOB, "main", "v2", ObjectKind::Loop(LoopRole::Cow), 0),
                entry(BOB, "main", "v3", ObjectKind::Loop(LoopRole::Cow), 0),
                entry(BOB, "main", "v4", ObjectKind::Loop(LoopRole::Cow), 0),
            ],
            &[(BOB, 0)],
        );
        assert!(matches!(
            refused(decide(&alice(), Request::NatUp { vm: vm("v1") }, &bobs)),
            HelperError::NotFound { .. }
        ));
        // Bob's loops neither conflict with alice's attach nor use up her quota.
        assert_eq!(decide(&alice(), loop_attach("v1", LoopRole::Base), &bobs), Decision::Allow);
        // Bob's TAP for v1 does not make alice's TapCreate "already there": her quotas apply.
        assert_eq!(decide(&alice(), tap_create("v1"), &bobs), Decision::Allow);
    }

    // --- properties ---

    const UIDS: [(u32, Option<&str>); 5] =
        [(ALICE, Some("alice")), (BOB, Some("bob")), (CAROL, Some("carol")), (1005, None), (0, Some("root"))];
    const INSTALLS: [&str; 2] = ["main", "other"];
    const VMS: [&str; 5] = ["v0", "v1", "v2", "v3", "v4"];

    fn any_kind() -> impl Strategy<Value = ObjectKind> {
        prop_oneof![
            Just(ObjectKind::Tap),
            Just(ObjectKind::Nat),
            proptest::sample::select(LoopRole::ALL.to_vec()).prop_map(ObjectKind::Loop),
        ]
    }

    fn any_entry(uids: Vec<u32>) -> impl Strategy<Value = LedgerEntry> {
        (proptest::sample::select(uids), 0..INSTALLS.len(), 0..VMS.len(), any_kind(), 0u32..5)
            .prop_map(|(uid, i, v, kind, slot)| entry(uid, INSTALLS[i], VMS[v], kind, slot))
    }

    fn any_ledger() -> impl Strategy<Value = Ledger> {
        let uids: Vec<u32> = UIDS.iter().map(|(u, _)| *u).collect();
        (
            proptest::collection::vec(any_entry(uids.clone()), 0..24),
            proptest::collection::vec(proptest::option::of(0u32..6), UIDS.len()),
        )
            .prop_map(move |(entries, lease_choice)| {
                let mut l = ledger(&entries, &[]);
                for (uid, index) in uids.iter().zip(lease_choice) {
                    if let Some(index) = index
                        && !l.leases.values().any(|&taken| taken == index)
                    {
                        l.leases.insert(*uid, index);
                    }
                }
                l
            })
    }

    fn any_vm() -> impl Strategy<Value = VmId> {
        proptest::sample::select(VMS.to_vec()).prop_map(vm)
    }

    fn any_request() -> impl Strategy<Value = Request> {
        let role = proptest::sample::select(LoopRole::ALL.to_vec());
        let key = proptest::sample::select(vec![
            "net.ipv4.ip_forward",
            "net.ipv4.conf.all.forwarding",
            "kernel.modprobe",
            "",
        ]);
        let value = proptest::sample::select(vec!["0", "1", "2", "", "/tmp/x"]);
        prop_oneof![
            proptest::sample::select(INSTALLS.to_vec())
                .prop_map(|i| Request::Hello { version: PROTOCOL_VERSION, install_id: install(i) }),
            Just(Request::Ping),
            Just(Request::LeaseSubnet),
            Just(Request::ListOwned),
            any_vm().prop_map(|vm| Request::TapCreate { vm }),
            any_vm().prop_map(|vm| Request::TapDelete { vm }),
            any_vm().prop_map(|vm| Request::NatUp { vm }),
            any_vm().prop_map(|vm| Request::NatDown { vm }),
            (key, value).prop_map(|(k, v)| Request::SysctlSet { key: k.into(), value: v.into() }),
            (any_vm(), role.clone(), any::<bool>()).prop_map(|(vm, role, read_only)| Request::LoopAttach {
                vm,
                role,
                read_only
            }),
            (any_vm(), role).prop_map(|(vm, role)| Request::LoopDetach { vm, role }),
            proptest::collection::vec(any_vm(), 0..4).prop_map(|vms| Request::TeardownVms { vms }),
            Just(Request::TeardownVms { vms: vec![vm("v0"); MAX_TEARDOWN_VMS + 1] }),
        ]
    }

    fn any_peer() -> impl Strategy<Value = Peer> {
        (0..UIDS.len(), proptest::option::of(proptest::sample::select(INSTALLS.to_vec())), any::<bool>())
            .prop_map(|(i, inst, in_kvm)| {
                let (uid, user) = UIDS[i];
                let mut p = peer(uid, user);
                p.install = inst.map(install);
                if in_kvm {
                    p.groups.push(KVM_GID);
                    p.group_names.push("kvm".into());
                }
                p
            })
    }

    /// The ledger with every entry of other uids removed (leases kept: the pool is shared).
    fn only_of(l: &Ledger, uid: u32) -> Ledger {
        Ledger { leases: l.leases.clone(), entries: l.entries_of(uid).cloned().collect() }
    }

    /// What the helper would record after an allowed request (a model of its bookkeeping).
    fn apply(policy: &Policy, p: &Peer, r: &Request, l: &mut Ledger) {
        let (uid, Some(inst)) = (p.uid, p.install.clone()) else { return };
        let total = policy.network.lease_count();
        match r {
            Request::LeaseSubnet => {
                l.lease_or_assign(uid, total).expect("allowed means a lease exists or is free");
            }
            Request::TapCreate { vm } => {
                if l.find(uid, &inst, vm, ObjectKind::Tap).is_none() {
                    let lease = l.lease_or_assign(uid, total).expect("lease");
                    let slot = l.free_slot(uid, policy.network.slots_per_lease()).expect("slot");
                    assert!(policy.network.vm_subnet(lease, slot).is_some());
                    l.insert(entry(uid, inst.as_str(), vm.as_str(), ObjectKind::Tap, slot));
                }
            }
            Request::NatUp { vm } => {
                l.insert(entry(uid, inst.as_str(), vm.as_str(), ObjectKind::Nat, 0));
            }
            Request::LoopAttach { vm, role, .. } => {
                l.insert(entry(uid, inst.as_str(), vm.as_str(), ObjectKind::Loop(*role), 0));
            }
            Request::TapDelete { vm } => {
                l.remove(uid, &inst, vm, ObjectKind::Tap);
            }
            Request::NatDown { vm } => {
                l.remove(uid, &inst, vm, ObjectKind::Nat);
            }
            Request::LoopDetach { vm, role } => {
                l.remove(uid, &inst, vm, ObjectKind::Loop(*role));
            }
            Request::TeardownVms { vms } => {
                l.entries.retain(|e| !(e.uid == uid && e.install == inst && vms.contains(&e.vm)))
            }
            Request::Hello { .. } | Request::Ping | Request::ListOwned | Request::SysctlSet { .. } => {}
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// (a) Other uids' objects never change a decision for uid A: A's decision on the full
        /// ledger equals its decision on the ledger holding only A's objects.
        #[test]
        fn objects_of_other_uids_never_matter(p in any_peer(), r in any_request(), l in any_ledger()) {
            let policy = policy();
            prop_assert_eq!(authorize(&policy, &p, &r, &l), authorize(&policy, &p, &r, &only_of(&l, p.uid)));
        }

        /// (a) Adding other uids' objects and leases to a ledger where A already holds a lease
        /// never changes A's decision (a full ledger of B's never consumes A's quota).
        #[test]
        fn adding_foreign_objects_never_matters(
            p in any_peer(),
            r in any_request(),
            l in any_ledger(),
            extra in proptest::collection::vec(any_entry(vec![BOB, CAROL, 0, 1005, ALICE]), 0..40),
        ) {
            let policy = policy();
            let mut bigger = l.clone();
            for e in extra.into_iter().filter(|e| e.uid != p.uid) {
                bigger.insert(e);
            }
            if l.lease_of(p.uid).is_some() {
                for uid in [BOB, CAROL, 0, 1005, ALICE].into_iter().filter(|u| *u != p.uid) {
                    bigger.lease_or_assign(uid, policy.network.lease_count());
                }
            }
            prop_assert_eq!(authorize(&policy, &p, &r, &l), authorize(&policy, &p, &r, &bigger));
        }

        /// (a) An allowed request that uses an existing object uses one of the caller's own.
        #[test]
        fn allowed_nat_up_has_the_callers_own_tap(p in any_peer(), v in any_vm(), l in any_ledger()) {
            let r = Request::NatUp { vm: v.clone() };
            if authorize(&policy(), &p, &r, &l).is_allow() {
                let inst = p.install.as_ref().expect("allowed after hello");
                let tap = l.find(p.uid, inst, &v, ObjectKind::Tap).expect("own tap");
                prop_assert_eq!(tap.uid, p.uid);
            }
        }

        /// (b) A peer the access rules do not admit is refused, with rule `access`, whatever it
        /// asks and whatever the ledger holds.
        #[test]
        fn unadmitted_peers_are_always_refused(
            p in any_peer(), r in any_request(), l in any_ledger(),
        ) {
            let policy = policy();
            if policy.access.admits(&p).is_none() {
                match authorize(&policy, &p, &r, &l) {
                    Decision::Refuse(HelperError::Denied { rule, .. }) => prop_assert_eq!(rule, "access"),
                    other => prop_assert!(false, "{:?}", other),
                }
            }
            let mut nobody = policy.clone();
            nobody.access.users.clear();
            nobody.access.groups.clear();
            prop_assert!(!authorize(&nobody, &p, &r, &l).is_allow());
        }

        /// (c) The decision is a function of its inputs: the same on every call, on clones, and
        /// whatever the order of the ledger's entries.
        #[test]
        fn decisions_are_deterministic(p in any_peer(), r in any_request(), l in any_ledger()) {
            let policy = policy();
            let first = authorize(&policy, &p, &r, &l);
            prop_assert_eq!(&first, &authorize(&policy, &p, &r, &l));
            prop_assert_eq!(&first, &authorize(&policy.clone(), &p.clone(), &r.clone(), &l.clone()));
            let mut reversed = l.clone();
            reversed.entries.reverse();
            prop_assert_eq!(&first, &authorize(&policy, &p, &r, &reversed));
        }

    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Running any sequence of requests from several users through `authorize`, and recording
        /// what the allowed ones make, never takes anyone past their quotas, never gives two of a
        /// user's VMs one subnet, never gives two users one lease, and never leaves a lease
        /// outside the pool.
        #[test]
        fn allowed_sequences_keep_every_limit(
            steps in proptest::collection::vec((any_peer(), any_request()), 1..80),
        ) {
            let policy = policy();
            let mut l = Ledger::default();
            for (p, r) in &steps {
                if authorize(&policy, p, r, &l).is_allow() {
                    apply(&policy, p, r, &mut l);
                }
                for (uid, user) in UIDS {
                    let q = policy.quotas_for_uid(user, uid);
                    prop_assert!(l.count_taps(uid) <= q.max_taps);
                    prop_assert!(l.count_loops(uid) <= q.max_loops);
                    prop_assert!(l.count_vms(uid) <= q.max_vms);
                    let mut slots: Vec<u32> = l.entries_of(uid).filter_map(|e| match e.object {
                        Object::Tap { slot, .. } => Some(slot),
                        _ => None,
                    }).collect();
                    let n = slots.len();
                    slots.sort_unstable();
                    slots.dedup();
                    prop_assert_eq!(slots.len(), n, "two TAPs of uid {} share a subnet", uid);
                    prop_assert!(slots.iter().all(|s| *s < policy.network.slots_per_lease()));
                }
                let mut leases: Vec<u32> = l.leases.values().copied().collect();
                let n = leases.len();
                leases.sort_unstable();
                leases.dedup();
                prop_assert_eq!(leases.len(), n, "two uids share a lease");
                prop_assert!(leases.iter().all(|i| *i < policy.network.lease_count()));
                let admitted: Vec<u32> = steps.iter()
                    .filter(|(p, _)| policy.access.admits(p).is_some())
                    .map(|(p, _)| p.uid)
                    .collect();
                prop_assert!(l.uids().iter().all(|u| admitted.contains(u)), "only admitted uids own objects");
            }
        }
    }
}
