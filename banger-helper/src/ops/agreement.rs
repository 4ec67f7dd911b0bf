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
//! and no loop device or dm target ever existing. Policies with a `[jailer]` (allow or force
//! mode, a small uid range, tight vCPU and memory totals) and kernels with or without a running
//! launcher add jail launches (with drives of the caller's, someone else's, or the VM's dm
//! device) and kills: every jail the kernel holds is a settled or intended entry's, no two share
//! a uid, and no user's jails go past their totals.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use banger_policy::{
    BackingFile, Decision, DevNum, EntryState, FdAccess, FileId, LedgerEntry, Object, ObjectKind, Observed,
    Peer, Policy, Uplink, authorize,
};
use banger_protocol::{
    HelperError, InstallId, JailFiles, LoopRole, PROTOCOL_VERSION, Request, Response, VmId, VmShape,
    min_cow_bytes,
};
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
    let jailer = prop::option::weighted(
        0.75,
        (prop::sample::select(vec!["allow", "force"]), 1u32..4, 1u32..5, 300u32..2000),
    );
    (users, quotas, overrides, prefixes, uplink, ports, any::<(bool, bool, bool)>(), jailer).prop_map(
        |(users, (vms, taps, loops), overrides, (pool, lease, vm), uplink, ports, (ipv6, g2g, all), jailer)| {
            let list = |v: &[&str]| v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
            // With a [jailer], uid 1000 is always admitted, so that jails are launched often.
            let mut users = users;
            if jailer.is_some() {
                users.push("1000");
            }
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
            if let Some((mode, uids, vcpus, mem)) = jailer {
                text.push_str(&format!(
                    "\n[jailer]\njailer = \"/usr/bin/jailer\"\nfirecracker = \"/usr/bin/firecracker\"\n\
                     chroot_base = \"/srv/jails\"\nuid_range = \"900000-{}\"\nmode = {mode:?}\n",
                    900_000 + uids - 1
                ));
                text = text.replacen(
                    "max_loops",
                    &format!("max_vcpus = {vcpus}\nmax_memory_mib = {mem}\nmax_loops"),
                    1,
                );
            }
            text
        },
    )
}

/// Valid policies with a `[jailer]` admitting uids 1000 and 1001, with tight totals, for the
/// jails' own run.
fn jail_policy_text() -> impl Strategy<Value = String> {
    (prop::sample::select(vec!["allow", "force"]), 1u32..4, 1u32..5, 300u32..2000, 1u32..4).prop_map(
        |(mode, uids, vcpus, mem, vms)| {
            format!(
                "[access]\nusers = [\"1000\", \"1001\"]\n\n[quotas]\nmax_vms = {vms}\nmax_vcpus = {vcpus}\n\
                 max_memory_mib = {mem}\n\n[network]\npool = \"10.9.0.0/24\"\nlease_prefix = 26\n\n\
                 [jailer]\njailer = \"/usr/bin/jailer\"\nfirecracker = \"/usr/bin/firecracker\"\n\
                 chroot_base = \"/srv/jails\"\nuid_range = \"900000-{}\"\nmode = {mode:?}\n",
                900_000 + uids - 1
            )
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

/// The drive that comes with a jail launch.
#[derive(Debug, Clone, Copy)]
enum Drive {
    Own,
    Foreign,
    /// The block device of the VM's dm target if it has one (else of no target).
    Dm,
    /// One descriptor short.
    Short,
}

#[derive(Debug, Clone)]
enum Step {
    Hello { peer: usize, install: usize },
    Request { peer: usize, request: Request, backing: Backing },
    Jail { peer: usize, request: Request, drive: Drive },
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
        2 => prop::collection::vec(vm.clone(), 0..3).prop_map(|vms| Request::TeardownVms { vms }),
    ];
    let shape = (prop::sample::select(vec![1u8, 1, 2, 0]), prop::sample::select(vec![128u32, 256, 700, 64]))
        .prop_map(|(vcpus, mem_mib)| VmShape { vcpus, mem_mib });
    let jail = prop_oneof![
        3 => (vm.clone(), shape, any::<(bool, bool)>()).prop_map(|(vm, shape, (initrd, work))| {
            Request::JailLaunch { vm, shape, files: JailFiles { initrd, work } }
        }),
        2 => vm.clone().prop_map(|vm| Request::JailKill { vm }),
    ];
    let drive = prop_oneof![
        6 => Just(Drive::Own),
        1 => Just(Drive::Foreign),
        2 => Just(Drive::Dm),
        1 => Just(Drive::Short),
    ];
    prop_oneof![
        2 => (0..PEERS.len(), 0..INSTALLS.len()).prop_map(|(peer, install)| Step::Hello { peer, install }),
        5 => (0..PEERS.len(), request, backing).prop_map(|(peer, request, backing)| Step::Request { peer, request, backing }),
        4 => (0..PEERS.len(), jail, drive).prop_map(|(peer, request, drive)| Step::Jail { peer, request, drive }),
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
        rdev: None,
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
    (fds, Observed { fds: count, backing, device_mapper, ..Observed::default() })
}

/// The descriptors of a jail launch (none for a kill), registered with the fake kernel, and what
/// the helper will find when it inspects them: a kernel (and initrd) of root's read-only, then
/// drives as `drive` says. `dm` is the device of the VM's dm target, if it has one.
fn jail_descriptors(
    kernel: &FakeKernel,
    uid: u32,
    request: &Request,
    drive: Drive,
    dm: Option<DevNum>,
) -> (Vec<OwnedFd>, Option<Vec<Result<BackingFile, HelperError>>>) {
    let Request::JailLaunch { files, .. } = request else { return (vec![], None) };
    let file = |uid, access, ino, rdev: Option<DevNum>| BackingFile {
        regular: rdev.is_none(),
        uid,
        fs_type: "ext4".into(),
        access,
        id: FileId { dev: 1, ino },
        size: BASE_BYTES,
        rdev,
    };
    let mut wanted = vec![file(0, FdAccess::ReadOnly, 1, None)];
    if files.initrd {
        wanted.push(file(0, FdAccess::ReadOnly, 2, None));
    }
    let drive_file = match drive {
        Drive::Own | Drive::Short => file(uid, FdAccess::ReadWrite, 3, None),
        Drive::Foreign => file(uid + 1, FdAccess::ReadWrite, 3, None),
        Drive::Dm => file(0, FdAccess::ReadWrite, 3, Some(dm.unwrap_or(DevNum { major: 254, minor: 999 }))),
    };
    wanted.push(drive_file.clone());
    if files.work {
        wanted.push(drive_file);
    }
    if matches!(drive, Drive::Short) {
        wanted.pop();
    }
    let fds: Vec<OwnedFd> = wanted
        .iter()
        .map(|f| {
            let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
            kernel.register_backing(fd.as_fd(), f.clone());
            fd
        })
        .collect();
    let inspected = (wanted.len() == request.expected_fds()).then(|| wanted.into_iter().map(Ok).collect());
    (fds, inspected)
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
        (Request::TeardownVms { .. } | Request::JailKill { .. }, Response::Teardown(t)) => {
            t.failures.is_empty()
        }
        (Request::JailLaunch { .. }, Response::Jail(_)) => true,
        _ => false,
    }
}

async fn run(
    policy: Policy,
    device_mapper: bool,
    launcher: bool,
    steps: Vec<Step>,
) -> Result<(), TestCaseError> {
    let kernel = Arc::new(if device_mapper { FakeKernel::new() } else { FakeKernel::without_dm() });
    kernel.world().jails_available = launcher;
    let jails = launcher && policy.jailer.is_some();
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
            Step::Request { .. } | Step::Jail { .. } => {
                let (p, request, fds, observed) = match step {
                    Step::Request { peer, request, backing } => {
                        let p = &peers[peer];
                        let (fds, mut observed) =
                            descriptors(&kernel, p.uid, &request, backing, device_mapper);
                        observed.jails = jails;
                        (p, request, fds, observed)
                    }
                    Step::Jail { peer, request, drive } => {
                        let p = &peers[peer];
                        let ledger = helper.snapshot().await;
                        let dm = match (&p.install, &request) {
                            (Some(install), Request::JailLaunch { vm, .. }) => {
                                match ledger.find(p.uid, install, vm, ObjectKind::Dm) {
                                    Some(LedgerEntry { object: Object::Dm { dev, .. }, .. }) => Some(*dev),
                                    _ => None,
                                }
                            }
                            _ => None,
                        };
                        let (fds, jail_files) = jail_descriptors(&kernel, p.uid, &request, drive, dm);
                        let observed = Observed {
                            fds: fds.len(),
                            device_mapper,
                            jail_files,
                            jails,
                            ..Observed::default()
                        };
                        (p, request, fds, observed)
                    }
                    Step::Hello { .. } => unreachable!(),
                };
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
                    // (With the jailer forced, every TAP is root's until its jail takes it.)
                    let owner = if policy.force_jailer() { u32::MAX } else { p.uid };
                    let taps = w.links.values().filter(|l| l.tap_owner == Some(owner)).count() as u32;
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
                    let owner = if policy.force_jailer() { 0 } else { e.uid };
                    prop_assert_eq!(node, Some((*dev, owner, 0o600)));
                }
                // Every jail is an entry's, no two share a uid, every uid is the range's, and
                // nobody's jails go past their totals.
                let entries: Vec<&LedgerEntry> =
                    ledger.entries.iter().filter(|e| e.kind() == ObjectKind::Jail).collect();
                prop_assert_eq!(w.jails.len(), entries.len());
                prop_assert_eq!(ledger.jail_uids().len(), entries.len());
                for e in &entries {
                    let Object::Jail { id, jail_uid, .. } = &e.object else { unreachable!() };
                    let order = w.jails.get(id).map(|j| j.order.clone());
                    prop_assert_eq!(order.as_ref().map(|o| (o.uid, o.caller)), Some((*jail_uid, e.uid)));
                    let order = order.expect("checked");
                    let cgroup = policy.jailer.as_ref().map(|j| j.user_cgroup(e.uid));
                    prop_assert_eq!(Some(order.user_cgroup), cgroup);
                    // The TAP it was given is the VM's own (a TAP goes only after its VM's jail).
                    if let Some(tap) = &order.tap {
                        let held = match ledger.find(e.uid, &e.install, &e.vm, ObjectKind::Tap) {
                            Some(LedgerEntry { object: Object::Tap { name, .. }, .. }) => Some(name),
                            _ => None,
                        };
                        prop_assert_eq!(held, Some(tap), "a jail was given another vm's tap");
                    }
                    let (first, last) = policy.jailer.as_ref().map(|j| j.uids).unwrap_or((1, 0));
                    prop_assert!((first..=last).contains(jail_uid));
                }
                for p in &peers {
                    let q = policy.quotas_for_uid(p.user.as_deref(), p.uid);
                    let (vcpus, mem) = ledger.jail_totals(p.uid);
                    prop_assert!(vcpus <= q.max_vcpus && mem <= u64::from(q.max_memory_mib));
                    // (Root's own TAPs are root's anyway.)
                    if policy.force_jailer() && p.uid != 0 {
                        prop_assert!(
                            !w.links.values().any(|l| l.tap_owner == Some(p.uid)),
                            "a tap handed out"
                        );
                    }
                }
                if !jails {
                    prop_assert!(w.jails.is_empty(), "a jail without [jailer] or its launcher");
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
        launcher in prop::bool::weighted(0.8),
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
        rt.block_on(run(policy, device_mapper, launcher, steps))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// The same agreement on policies that all have a `[jailer]` and admit two of the peers, so
    /// that jail launches, kills and teardowns of jailed VMs are served often.
    #[test]
    fn jail_requests_agree_with_the_policy(
        text in jail_policy_text(),
        device_mapper in prop::bool::weighted(0.8),
        launcher in prop::bool::weighted(0.9),
        steps in prop::collection::vec(step(), 1..60),
    ) {
        let policy = Policy::from_toml("policy.toml", &text).expect("a valid policy");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(policy, device_mapper, launcher, steps))?;
    }
}
