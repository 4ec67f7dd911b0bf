//! Shared fixtures for the operations' unit tests: a helper over the fake kernel with an
//! in-memory ledger and audit log.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};

use banger_policy::{
    Access, Audit, AuditTarget, CgroupVersion, FileId, GuestToHost, Jailer, JailerMode, Ledger, Network,
    Peer, Policy, PortRule, Proto, Quotas, Uplink,
};
use banger_protocol::{InstallId, LoopInfo, LoopRole, Request, Response, VmId, min_cow_bytes};

use super::Helper;
use crate::audit::AuditLog;
use crate::kernel::fake::FakeKernel;
use crate::kernel::{BackingFile, FdAccess};

/// The size of the base images of the tests.
pub(crate) const BASE_BYTES: u64 = 1 << 20;

/// A descriptor the fake kernel inspects as a regular file of `uid` on ext4, opened with
/// `access`, with inode `ino`, of `size` bytes.
pub(crate) fn backing_fd(kernel: &FakeKernel, uid: u32, access: FdAccess, ino: u64, size: u64) -> OwnedFd {
    let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    let id = FileId { dev: 1, ino };
    kernel.register_backing(
        fd.as_fd(),
        BackingFile { regular: true, uid, fs_type: "ext4".into(), access, id, size, rdev: None },
    );
    fd
}

/// Uids the test policy lets in.
pub(crate) const ALLOWED: [u32; 6] = [1, 2, 3, 1000, 1001, 1002];

pub(crate) fn test_policy() -> Policy {
    Policy {
        access: Access {
            users: ALLOWED.iter().map(|u| u.to_string()).collect(),
            groups: vec![],
            socket_group: "banger".into(),
        },
        quotas: Quotas { max_vms: 16, max_taps: 16, max_loops: 32, max_vcpus: 32, max_memory_mib: 32768 },
        user_quotas: BTreeMap::new(),
        network: Network {
            pool: "172.30.0.0/16".parse().unwrap(),
            lease_prefix: 24,
            vm_prefix: 30,
            uplink: Uplink::Auto,
            ipv6: false,
            guest_to_guest: false,
            guest_to_host: GuestToHost {
                allow_all: false,
                allow: vec![PortRule { proto: Proto::Udp, port: 53 }],
            },
            firewall: banger_policy::FirewallChoice::Auto,
        },
        audit: Audit { target: AuditTarget::Stderr },
        jailer: None,
    }
}

/// The first uid of the jail range of [`jail_policy`] (ten uids).
pub(crate) const JAIL_FIRST: u32 = 900_000;

/// [`test_policy`] with a `[jailer]` of ten uids, in `mode`.
pub(crate) fn jail_policy(mode: JailerMode) -> Policy {
    Policy {
        jailer: Some(Jailer {
            jailer: "/usr/local/bin/jailer".into(),
            firecracker: "/usr/local/bin/firecracker".into(),
            chroot_base: "/srv/jails".into(),
            uids: (JAIL_FIRST, JAIL_FIRST + 9),
            cgroup: CgroupVersion::Auto,
            cgroup_parent: "banger".into(),
            mode,
        }),
        ..test_policy()
    }
}

/// A fake kernel whose jails can be made.
pub(crate) fn jail_kernel() -> FakeKernel {
    let k = FakeKernel::new();
    k.world().jails_available = true;
    k
}

/// A kernel descriptor (root's, read-only) and a root drive descriptor (`uid`'s, read-write,
/// inode `ino`), registered with the fake kernel, as bangerd sends them with a jail launch.
pub(crate) fn jail_fds(kernel: &FakeKernel, uid: u32, ino: u64) -> Vec<OwnedFd> {
    vec![
        backing_fd(kernel, 0, FdAccess::ReadOnly, ino, BASE_BYTES),
        backing_fd(kernel, uid, FdAccess::ReadWrite, ino + 1, BASE_BYTES),
    ]
}

pub(crate) fn vm(s: &str) -> VmId {
    VmId::new(s).unwrap()
}

pub(crate) struct TestHelper {
    pub(crate) helper: Helper<FakeKernel>,
    pub(crate) kernel: Arc<FakeKernel>,
    pub(crate) audit: Arc<Mutex<Vec<u8>>>,
}

impl TestHelper {
    pub(crate) fn new() -> Self {
        Self::with_policy(test_policy())
    }

    pub(crate) fn with_policy(policy: Policy) -> Self {
        Self::with_kernel(policy, FakeKernel::new())
    }

    /// A helper over `kernel` (e.g. one without device-mapper).
    pub(crate) fn with_kernel(policy: Policy, kernel: FakeKernel) -> Self {
        let kernel = Arc::new(kernel);
        let (audit, buf) = AuditLog::memory();
        let helper = Helper::new(policy, kernel.clone(), Ledger::default(), None, audit);
        TestHelper { helper, kernel, audit: buf }
    }

    pub(crate) fn peer(&self, uid: u32, install: &str) -> Peer {
        Peer {
            uid,
            gid: uid,
            pid: 4242,
            user: None,
            groups: vec![uid],
            group_names: vec![],
            install: Some(InstallId::new(install).unwrap()),
        }
    }

    pub(crate) async fn req(&self, peer: &Peer, request: Request) -> Response {
        self.helper.handle(peer, request, vec![]).await
    }

    pub(crate) async fn req_fds(&self, peer: &Peer, request: Request, fds: Vec<OwnedFd>) -> Response {
        self.helper.handle(peer, request, fds).await
    }

    /// Attaches `vm`'s base image read-only and a copy-on-write file just large enough for it
    /// read-write (inodes `ino` and `ino + 1`), as bangerd does before a dm-create.
    pub(crate) async fn attach_disks(&self, peer: &Peer, vm_id: &str, ino: u64) -> (LoopInfo, LoopInfo) {
        let base = backing_fd(&self.kernel, peer.uid, FdAccess::ReadOnly, ino, BASE_BYTES);
        let cow = backing_fd(&self.kernel, peer.uid, FdAccess::ReadWrite, ino + 1, min_cow_bytes(BASE_BYTES));
        let mut infos = Vec::new();
        for (role, read_only, fd) in [(LoopRole::Base, true, base), (LoopRole::Cow, false, cow)] {
            let r =
                self.req_fds(peer, Request::LoopAttach { vm: vm(vm_id), role, read_only }, vec![fd]).await;
            let Response::Loop(info) = r else { panic!("{role:?}: {r:?}") };
            infos.push(info);
        }
        let cow = infos.pop().unwrap();
        (infos.pop().unwrap(), cow)
    }

    pub(crate) fn audit_lines(&self) -> Vec<crate::audit::Record> {
        let buf = self.audit.lock().unwrap();
        String::from_utf8_lossy(&buf).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

/// A helper over `kernel` whose ledger lives in `dir`.
pub(crate) fn open_helper(dir: &std::path::Path, kernel: &Arc<FakeKernel>) -> Helper<FakeKernel> {
    let (store, ledger) = crate::ledger_store::LedgerStore::open(dir).unwrap();
    Helper::new(test_policy(), kernel.clone(), ledger, Some(store), AuditLog::memory().0)
}

/// What `kill -9` of the helper does, in-process: no destructor of the operation in flight or of
/// the helper runs, and the kernel closes the dead helper's descriptors — of which the one that
/// matters to the next helper is its lock on the state directory `dir`.
pub(crate) fn kill_9<T, H>(op: T, helper: H, dir: &std::path::Path) {
    std::mem::forget(op);
    std::mem::forget(helper);
    close_descriptors_of(&dir.join("lock"));
}

/// Closes every descriptor of this process open on `path`.
pub(crate) fn close_descriptors_of(path: &std::path::Path) {
    for fd in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        if std::fs::read_link(fd.path()).is_ok_and(|target| target == path)
            && let Ok(n) = fd.file_name().to_string_lossy().parse::<i32>()
        {
            let _ = nix::unistd::close(n);
        }
    }
}
