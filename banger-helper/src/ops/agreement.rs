//! The policy and the helper agree, for every policy `banger-helper policy check` accepts.
//!
//! A property test: policy texts of every shape (access lists, quotas with per-user overrides,
//! pools and prefixes, uplinks good and bad, guest-to-host ports) are read with
//! [`Policy::from_toml`]; every text it accepts loads in the helper (over the fake kernel), and
//! random sequences of requests from several peers (admitted or not, with or without their
//! `Hello`) go through one helper, over a kernel with or without device-mapper. For each request,
//! `authorize`'s decision on the ledger as it stood just before is compared with the helper's
//! answer: a refusal is exactly the same error (code and rule or reason), and an allowed request
//! is served. Without device-mapper that includes every loop attach and dm-create being refused,
//! and no loop device or dm target ever existing.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use banger_policy::{
    BackingFile, Decision, EntryState, FdAccess, FileId, LedgerEntry, Object, ObjectKind, Observed, Peer,
    Policy, Uplink, authorize,
};
use banger_protocol::{InstallId, LoopRole, PROTOCOL_VERSION, Request, Response, VmId, min_cow_bytes};
use proptest::prelude::*;

use super::Helper;
use crate::audit::AuditLog;
use crate::kernel::fake::FakeKernel;
use crate::ops::testing::BASE_BYTES;

/// The peers: uid, user name. 1002 is in no policy's access list.
const PEERS: [(u32, Option<&str>); 4] =
    [(1000, Some("alice")), (1001, None), (1002, None), (0, Some("root"))];
const INSTALLS: [&str; 2] = ["a", "b"];
const VMS: [&str; 3] = ["v0", "v1", "v2"];

fn policy_text() -> impl Strategy<Value = String> {
    let users = prop::collection::vec(prop::sample::select(vec!["1000", "alice", "1001", "0"]), 0..4);
    let quotas = (1u32..4, 1u32..4, 1u32..5);
    let overrides = prop::collection::vec((prop::sample::select(vec!["alice", "1001"]), 1u32..3), 0..3);
    let pool = prop::sample::select(vec!["10.9.0.0/24", "10.9.0.0/26", "172.30.0.0/22", "127.0.0.0/24"]);
    let prefixes = (pool, 21u8..=31, 24u8..=31);
    let uplink = prop::sample::select(vec![
        "auto",
        "eth0",
        "wan0",
        "br-lan.10",
        "ipv6",
        "eth0+",
        "a#b",
        "-x",
        "we\"ird",
        "sixteen-bytes-xx",
    ]);
    let ports = prop::collection::vec(prop::sample::select(vec!["udp/53", "tcp/22", "tcp/8080"]), 0..3);
    (users, quotas, overrides, prefixes, uplink, ports, any::<(bool, bool, bool)>()).prop_map(
        |(users, (vms, taps, loops), overrides, (pool, lease, vm), uplink, ports, (ipv6, g2g, all))| {
            let list = |v: &[&str]| v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
            let mut text = format!(
                "[access]\nusers = [{}]\n\n[quotas]\nmax_vms = {vms}\nmax_taps = {taps}\nmax_loops = {loops}\n",
                list(&users)
            );
            for (user, taps) in overrides {
                text.push_str(&format!("\n[quotas.users.{user:?}]\nmax_taps = {taps}\n"));
            }
            text.push_str(&format!(
                "\n[network]\npool = {pool:?}\nlease_prefix = {lease}\nvm_prefix = {vm}\nuplink = {uplink:?}\n\
                 ipv6 = {ipv6}\nguest_to_guest = {g2g}\n\n[network.guest_to_host]\nallow_all = {all}\nallow = [{}]\n",
                list(&ports)
            ));
            text
        },
    )
}

/// What comes with a loop attach: the backing file (whose, on what, how opened, how large) or
/// wrong counts.
#[derive(Debug, Clone, Copy)]
enum Backing {
    Own(FdAccess, u64),
    Foreign,
    Fuse,
    NoFd,
    TwoFds,
}

#[derive(Debug, Clone)]
enum Step {
    Hello { peer: usize, install: usize },
    Request { peer: usize, request: Request, backing: Backing },
}

fn step() -> impl Strategy<Value = Step> {
    let vm = prop::sample::select(VMS.to_vec()).prop_map(|v| VmId::new(v).unwrap());
    // Sizes: a base image, a copy-on-write file just large enough for it, one a byte too small,
    // and less than a sector.
    let size =
        prop::sample::select(vec![BASE_BYTES, min_cow_bytes(BASE_BYTES), min_cow_bytes(BASE_BYTES) - 1, 100]);
    let backing = prop_oneof![
        4 => (prop::sample::select(vec![FdAccess::ReadWrite, FdAccess::ReadOnly, FdAccess::WriteOnly]), size)
            .prop_map(|(access, size)| Backing::Own(access, size)),
        1 => Just(Backing::Foreign),
        1 => Just(Backing::Fuse),
        1 => Just(Backing::NoFd),
        1 => Just(Backing::TwoFds),
    ];
    let request = prop_oneof![
        1 => Just(Request::Ping),
        1 => Just(Request::ListOwned),
        3 => vm.clone().prop_map(|vm| Request::TapCreate { vm }),
        2 => vm.clone().prop_map(|vm| Request::NatUp { vm }),
        3 => (vm.clone(), prop::sample::select(LoopRole::ALL.to_vec()), any::<bool>())
            .prop_map(|(vm, role, read_only)| Request::LoopAttach { vm, role, read_only }),
        2 => vm.clone().prop_map(|vm| Request::DmCreate { vm }),
        2 => prop::collection::vec(vm, 0..3).prop_map(|vms| Request::TeardownVms { vms }),
    ];
    prop_oneof![
        1 => (0..PEERS.len(), 0..INSTALLS.len()).prop_map(|(peer, install)| Step::Hello { peer, install }),
        5 => (0..PEERS.len(), request, backing).prop_map(|(peer, request, backing)| Step::Request { peer, request, backing }),
    ]
}

fn peer(i: usize) -> Peer {
    let (uid, user) = PEERS[i];
    Peer {
        uid,
        gid: uid,
        pid: 4242,
        user: user.map(str::to_owned),
        groups: vec![uid],
        group_names: vec![],
        install: None,
    }
}

/// The descriptors a step sends, registered with the fake kernel, and what the helper will find
/// when it inspects them.
fn descriptors(
    kernel: &FakeKernel,
    uid: u32,
    request: &Request,
    backing: Backing,
    device_mapper: bool,
) -> (Vec<OwnedFd>, Observed) {
    if !matches!(request, Request::LoopAttach { .. }) {
        return (vec![], Observed { device_mapper, ..Observed::default() });
    }
    let file = |uid, fs_type: &str, access, size| BackingFile {
        regular: true,
        uid,
        fs_type: fs_type.into(),
        access,
        id: FileId { dev: 1, ino: u64::from(uid) * 100 },
        size,
    };
    let (count, file) = match backing {
        Backing::Own(access, size) => (1, file(uid, "ext4", access, size)),
        Backing::Foreign => (1, file(uid + 1, "ext4", FdAccess::ReadWrite, BASE_BYTES)),
        Backing::Fuse => (1, file(uid, "fuse.sshfs", FdAccess::ReadWrite, BASE_BYTES)),
        Backing::NoFd => (0, file(uid, "ext4", FdAccess::ReadWrite, BASE_BYTES)),
        Backing::TwoFds => (2, file(uid, "ext4", FdAccess::ReadWrite, BASE_BYTES)),
    };
    let fds: Vec<OwnedFd> = (0..count)
        .map(|_| {
            let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
            kernel.register_backing(fd.as_fd(), file.clone());
            fd
        })
        .collect();
    // Without device-mapper the helper does not inspect the file: nothing is attached anyway.
    let backing = (count == 1 && device_mapper).then_some(Ok(file));
    (fds, Observed { fds: count, backing, device_mapper })
}

/// Whether `response` is the success answer of `request`.
fn served(request: &Request, response: &Response) -> bool {
    match (request, response) {
        (Request::Ping, Response::Pong)
        | (Request::ListOwned, Response::Owned(_))
        | (Request::TapCreate { .. }, Response::Tap(_))
        | (Request::NatUp { .. }, Response::Nat(_))
        | (Request::LoopAttach { .. }, Response::Loop(_))
        | (Request::DmCreate { .. }, Response::Dm(_)) => true,
        (Request::TeardownVms { .. }, Response::Teardown(t)) => t.failures.is_empty(),
        _ => false,
    }
}

async fn run(policy: Policy, device_mapper: bool, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let kernel = Arc::new(if device_mapper { FakeKernel::new() } else { FakeKernel::without_dm() });
    let helper = Helper::new(policy.clone(), kernel.clone(), Default::default(), None, AuditLog::memory().0);
    let mut peers: Vec<Peer> = (0..PEERS.len()).map(peer).collect();
    for step in steps {
        match step {
            Step::Hello { peer, install } => {
                let install = InstallId::new(INSTALLS[install]).unwrap();
                let request = Request::Hello { version: PROTOCOL_VERSION, install_id: install.clone() };
                let mut p = peers[peer].clone();
                let decision = authorize(&policy, &p, &request, &Default::default(), &Observed::default());
                let answer = helper.hello(&mut p, PROTOCOL_VERSION, install);
                match decision {
                    Decision::Refuse(e) => prop_assert_eq!(answer.err(), Some(e)),
                    Decision::Allow(_) => prop_assert!(answer.is_ok(), "{:?}", answer),
                }
                peers[peer] = p;
            }
            Step::Request { peer, request, backing } => {
                let p = &peers[peer];
                let (fds, observed) = descriptors(&kernel, p.uid, &request, backing, device_mapper);
                let ledger = helper.snapshot().await;
                let decision = authorize(&policy, p, &request, &ledger, &observed);
                let response = helper.handle(p, request.clone(), fds).await;
                match decision {
                    Decision::Refuse(e) => prop_assert_eq!(response, Response::Error(e), "{:?}", request),
                    Decision::Allow(grant) => {
                        prop_assert!(
                            served(&request, &response),
                            "{:?} granted {:?}: {:?}",
                            request,
                            grant,
                            response
                        )
                    }
                }
                // And what the kernel holds stays within every peer's quotas.
                let ledger = helper.snapshot().await;
                let w = kernel.world();
                for p in &peers {
                    let q = policy.quotas_for_uid(p.user.as_deref(), p.uid);
                    let taps = w.links.values().filter(|l| l.tap_owner == Some(p.uid)).count() as u32;
                    prop_assert!(taps <= q.max_taps && ledger.count_taps(p.uid) <= q.max_taps);
                    prop_assert!(
                        ledger.count_loops(p.uid) <= q.max_loops && ledger.count_vms(p.uid) <= q.max_vms
                    );
                }
                let attached = w.loops.values().filter(|l| l.status.is_some()).count();
                prop_assert_eq!(
                    attached,
                    ledger.entries.iter().filter(|e| e.kind().to_string().starts_with("loop")).count()
                );
                // Every dm target is a settled entry's, and its node (the only one) is its owner's.
                let dms: Vec<&LedgerEntry> =
                    ledger.entries.iter().filter(|e| e.kind() == ObjectKind::Dm).collect();
                prop_assert_eq!(w.dms.len(), dms.len());
                prop_assert_eq!(w.nodes.len(), dms.len());
                for e in dms {
                    let Object::Dm { name, dev, .. } = &e.object else { unreachable!() };
                    prop_assert_eq!(e.state, EntryState::Settled);
                    prop_assert_eq!(w.dms.get(name).map(|d| d.dev), Some(*dev));
                    let node = w.nodes.get(name).map(|n| (n.rdev, n.node.uid, n.node.mode));
                    prop_assert_eq!(node, Some((*dev, e.uid, 0o600)));
                }
                if !device_mapper {
                    prop_assert!(
                        w.loops.is_empty() && w.dms.is_empty(),
                        "a loop or dm without device-mapper"
                    );
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_accepted_policy_is_served_and_every_refusal_is_the_policys(
        text in policy_text(),
        device_mapper in prop::bool::weighted(0.8),
        steps in prop::collection::vec(step(), 1..60),
    ) {
        let Ok(policy) = Policy::from_toml("policy.toml", &text) else {
            // Refused: only what the helper could not serve is refused for the uplink.
            let bad = ["eth0+", "a#b", "-x", "we\"ird", "sixteen-bytes-xx"];
            prop_assume!(!bad.iter().any(|b| text.contains(&format!("uplink = {b:?}"))));
            return Ok(());
        };
        if let Uplink::Named(name) = &policy.network.uplink {
            prop_assert!(!["eth0+", "a#b", "-x"].contains(&name.as_str()));
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(policy, device_mapper, steps))?;
    }
}
