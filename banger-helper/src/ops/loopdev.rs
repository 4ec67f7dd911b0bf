//! Loop attach, and the release of a loop device that teardown and the start-up reconcile use.
//!
//! A loop device is only ever the base or copy-on-write half of a VM's dm-snapshot
//! ([`super::dm`]): where the helper cannot make one, the policy refuses every attach and the
//! daemon gives the VM a file of its own instead.
//!
//! Attach, in order: the backing file arrives as a descriptor the client opened (proving it may
//! open it); it is inspected before the state lock is taken, on a blocking thread with a time
//! limit, from cached attributes and the mount table only (never asking its filesystem), and the
//! policy decides on what was found (a regular file of the caller's on a local filesystem;
//! read-write only when asked and the descriptor is writable). Then, for each try:
//!
//! 1. a device is created for this attach (`LOOP_CTL_ADD`): a device that did not exist a moment
//!    ago cannot be held open by anyone, so no descriptor kept on some loop node ever reaches
//!    this caller's disk;
//! 2. the entry (device, backing identity and size) is written to the ledger as an intent, so a
//!    helper that stops after this leaves a device the ledger counts and the reconcile releases;
//! 3. its node is given to `root:root` 0600 and stays so;
//! 4. the file is attached in one `LOOP_CONFIGURE`, without autoclear (another root tool that
//!    bound the new device first keeps it: the entry goes and the next try takes another);
//! 5. the entry is settled.
//!
//! A failure after step 2 releases the device ([`release_loop`]) and records what that came to
//! ([`record_release`]): the entry goes once the kernel has let the device go, and stays,
//! released and counted, while it has not; teardown and the reconcile try again. So the helper
//! never leaves a device it made (attached or empty) without an entry.
//!
//! A loop node is never handed to a user: whoever holds a loop device open can rebind it
//! (`LOOP_CLR_FD`, `LOOP_SET_FD`, `LOOP_CHANGE_FD`) without any capability, which would void
//! every check made on the backing file. The device number in the answer is informational.
//!
//! Release ([`release_loop`]) touches only a device still attached to the recorded file (or
//! free): it is detached, then removed (`LOOP_CTL_REMOVE`). The kernel refuses to remove a
//! device someone holds open; such an entry stays in the ledger as released, counted, until a
//! later teardown or reconcile sees the kernel let it go.

use std::os::fd::{AsFd, OwnedFd};

use banger_policy::{BackingFile, EntryState, FileId, Ledger, LedgerEntry, Object, ObjectKind};
use banger_protocol::{HelperError, LoopInfo, LoopRole, VmId};
use nix::errno::Errno;

use super::{Caller, Done, Helper, State};
use crate::kernel::{KResult, Kernel, Loops};

/// How long inspecting a backing file may take before the attach is refused.
pub const INSPECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How often an attach is retried when another attach takes the free device first.
const ATTACH_TRIES: usize = 16;

/// The device number of `/dev/loopN`.
pub(crate) fn loop_number(device: &str) -> Option<u32> {
    device.strip_prefix("/dev/loop")?.parse().ok()
}

/// What releasing a loop or dm entry came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Release {
    /// The kernel has let the device go (or it is no longer the entry's): the entry goes.
    Gone,
    /// Given up, but the kernel keeps the device while someone holds it open: the entry stays,
    /// released and counted.
    Held,
}

/// Releases the device of a loop entry: detached only while it holds the recorded file, then
/// removed. A device attached to another file is someone else's now and is not touched.
pub(crate) fn release_loop<L: Loops>(loops: &L, entry: &LedgerEntry) -> KResult<Release> {
    let Object::Loop { device, backing, .. } = &entry.object else { return Ok(Release::Gone) };
    let Some(n) = loop_number(device) else { return Ok(Release::Gone) };
    match loops.status(n)? {
        Some(s) if (FileId { dev: s.backing_dev, ino: s.backing_ino }) == *backing => loops.detach(n)?,
        Some(_) => {
            tracing::warn!("{device} holds another file now; not touched");
            return Ok(Release::Gone);
        }
        None => {}
    }
    // Anyone may open a loop device for a moment (`losetup -a` opens every one, udev probes new
    // ones), and the kernel refuses the removal meanwhile: a few tries before calling it held.
    for wait in REMOVE_RETRIES {
        match loops.remove(n) {
            Ok(()) => return Ok(Release::Gone),
            Err(e) if e.errno_value() == Some(Errno::ENODEV) => return Ok(Release::Gone),
            Err(e) if e.errno_value() == Some(Errno::EBUSY) => std::thread::sleep(wait),
            Err(e) => return Err(e),
        }
    }
    tracing::warn!("{device} is held open by someone; it stays in the ledger until it can be removed");
    Ok(Release::Held)
}

/// The pauses between tries of a device removal the kernel refused as busy (150 ms in all).
const REMOVE_RETRIES: [std::time::Duration; 4] = [
    std::time::Duration::from_millis(10),
    std::time::Duration::from_millis(20),
    std::time::Duration::from_millis(40),
    std::time::Duration::from_millis(80),
];

/// Records what releasing the device of `entry` after a failed `make` (attach, create) came to; a
/// release that failed leaves the intent in the ledger for teardown and the reconcile.
pub(crate) fn settle_undo(
    st: &mut State,
    entry: &LedgerEntry,
    make: &str,
    release: Result<Release, impl std::fmt::Display>,
) {
    match release {
        Ok(release) => {
            if let Err(e) = st.commit(|l| record_release(l, entry, release)) {
                tracing::error!(
                    "{}: its entry stays in the ledger for the next teardown: {e}",
                    describe(entry)
                );
            }
        }
        Err(e) => tracing::error!(
            "{}: cannot release it after a failed {make} ({e}); its entry stays in the ledger for the next teardown",
            describe(entry)
        ),
    }
}

/// Records what releasing `entry` came to: gone from the ledger, or kept as released.
pub(crate) fn record_release(l: &mut Ledger, entry: &LedgerEntry, release: Release) {
    match release {
        Release::Gone => l.entries.retain(|e| e != entry),
        Release::Held => {
            if let Some(e) = l.entries.iter_mut().find(|e| *e == entry) {
                e.state = EntryState::Released;
            }
        }
    }
}

impl<K: Kernel> Helper<K> {
    /// Inspects a backing file descriptor on a blocking thread, before any lock is taken, and
    /// gives up after [`Helper::inspect_timeout`]: nothing the file's filesystem does can hold up
    /// other requests. The descriptor comes back unless the inspection is still running.
    pub(crate) async fn inspect_backing(
        &self,
        fd: OwnedFd,
    ) -> (Option<OwnedFd>, Result<BackingFile, HelperError>) {
        let kernel = self.kernel.clone();
        let job = tokio::task::spawn_blocking(move || {
            let r = kernel.loops().inspect(fd.as_fd());
            (fd, r)
        });
        match tokio::time::timeout(self.inspect_timeout, job).await {
            Err(_) => (
                None,
                Err(HelperError::invalid(format!(
                    "the backing file could not be inspected within {} s; put it on a local filesystem",
                    self.inspect_timeout.as_secs_f32()
                ))),
            ),
            Ok(Err(e)) => {
                (None, Err(HelperError::internal(format!("the inspection of the backing file failed: {e}"))))
            }
            Ok(Ok((fd, r))) => (Some(fd), r.map_err(HelperError::from)),
        }
    }

    /// Releases the device of `entry` after a failed attach and records what that came to; a
    /// release that fails leaves the intent for teardown and the reconcile.
    fn give_back(&self, st: &mut State, entry: &LedgerEntry) {
        settle_undo(st, entry, "attach", release_loop(self.kernel.loops(), entry));
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn loop_attach(
        &self,
        st: &mut State,
        c: Caller<'_>,
        vm: &VmId,
        role: LoopRole,
        read_only: bool,
        backing: FileId,
        size: u64,
        fd: OwnedFd,
    ) -> Done<LoopInfo> {
        let mut names = Vec::new();
        let loops = self.kernel.loops();
        let kind = ObjectKind::Loop(role);
        for _ in 0..ATTACH_TRIES {
            // Step 1: a new device.
            let n = match loops.add() {
                Ok(n) => n,
                Err(e) => return Done::new(names, Err(e.into())),
            };
            let device = format!("/dev/loop{n}");
            names.push(device.clone());
            // Step 2: the intent. Any other entry naming this new device is stale (the number
            // was free) and goes, so no one's record ever vouches for it.
            let object = Object::Loop { role, device: device.clone(), read_only, backing, size };
            let mut entry = LedgerEntry::new(c.uid, c.install.clone(), vm.clone(), object);
            entry.state = EntryState::Intent;
            let intent = st.commit(|l| {
                l.entries.retain(|e| !matches!(&e.object, Object::Loop { device: d, .. } if *d == device));
                l.insert(entry.clone());
            });
            if let Err(e) = intent {
                // Nothing records the device: it goes now, empty.
                if let Err(undo) = release_loop(loops, &entry) {
                    tracing::error!("{device}: cannot remove the new device: {undo}");
                }
                return Done::new(names, Err(e));
            }
            // Steps 3 and 4: root's, then the attach.
            match loops.make_root_only(n).and_then(|()| loops.attach(n, fd.as_fd(), read_only)) {
                Err(e) if matches!(e.errno_value(), Some(Errno::EBUSY | Errno::ENOENT | Errno::ENXIO)) => {
                    // Another root tool bound it (or removed it) first: it is theirs now.
                    if let Err(e) = st.commit(|l| l.entries.retain(|x| *x != entry)) {
                        return Done::new(names, Err(e));
                    }
                    continue;
                }
                Err(e) => {
                    self.give_back(st, &entry);
                    return Done::new(names, Err(e.into()));
                }
                Ok(()) => {}
            }
            // Step 5: settled.
            let settled = st.commit(|l| {
                if let Some(e) = l.entries.iter_mut().find(|e| e.is(c.uid, c.install, vm, kind)) {
                    e.state = EntryState::Settled;
                }
            });
            if let Err(e) = settled {
                self.give_back(st, &entry);
                return Done::new(names, Err(e));
            }
            let info = LoopInfo { install: c.install.clone(), vm: vm.clone(), role, device, read_only };
            return Done::new(names, Ok(info));
        }
        let error = HelperError::Kernel {
            op: "LOOP_CONFIGURE".into(),
            errno: Errno::EBUSY as i32,
            detail: format!(
                "every new loop device was taken by someone else {ATTACH_TRIES} times in a row; retry"
            ),
        };
        Done::new(names, Err(error))
    }
}

/// `loop /dev/loopN` or `dm NAME`: an entry's object, for logs and reports.
pub(crate) fn describe(e: &LedgerEntry) -> String {
    match &e.object {
        Object::Tap { name, .. } => format!("tap {name}"),
        Object::Nat { guest_ip, .. } => format!("nat {guest_ip}"),
        Object::Loop { device, .. } => format!("loop {device}"),
        Object::Dm { name, .. } => format!("dm {name}"),
        Object::Jail { id, .. } => format!("jail {id}"),
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, OwnedFd};
    use std::sync::Arc;
    use std::time::Duration;

    use banger_policy::{EntryState, FileId, LedgerEntry};
    use banger_protocol::{HelperError, LoopRole, Request, Response, TeardownReport};
    use nix::errno::Errno;

    use crate::kernel::fake::FakeKernel;
    use crate::kernel::fake::NodeState;
    use crate::kernel::{BackingFile, FdAccess};
    use crate::ops::testing::*;

    const ROOT_ONLY: NodeState = NodeState { uid: 0, gid: 0, mode: 0o600 };

    fn register(kernel: &FakeKernel, uid: u32, access: FdAccess, ino: u64) -> OwnedFd {
        backing_fd(kernel, uid, access, ino, BASE_BYTES)
    }

    fn file(t: &TestHelper, uid: u32, access: FdAccess, ino: u64) -> OwnedFd {
        register(&t.kernel, uid, access, ino)
    }

    fn attach(role: LoopRole, read_only: bool) -> Request {
        Request::LoopAttach { vm: vm("dev"), role, read_only }
    }

    async fn teardown(t: &TestHelper, p: &banger_policy::Peer) -> TeardownReport {
        let Response::Teardown(r) = t.req(p, Request::TeardownVms { vms: vec![vm("dev")] }).await else {
            panic!()
        };
        r
    }

    #[tokio::test]
    async fn attach_binds_a_new_root_only_device_and_teardown_removes_it() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        let f = file(&t, 1000, FdAccess::ReadWrite, 10);
        let Response::Loop(info) = t.req_fds(&p, attach(LoopRole::Cow, false), vec![f]).await else {
            panic!()
        };
        assert_eq!(info.device, "/dev/loop0");
        assert!(!info.read_only);
        {
            let w = t.kernel.world();
            assert_eq!(w.loops[&0].node, ROOT_ONLY, "the node is never the caller's");
            assert!(w.loops[&0].status.is_some());
        }
        let calls = t.kernel.calls();
        let at =
            |p: &str| calls.iter().position(|c| c.starts_with(p)).unwrap_or_else(|| panic!("{p}: {calls:?}"));
        let order = [at("loop_add any"), at("loop_root_only /dev/loop0"), at("loop_attach")];
        assert!(order.is_sorted(), "{calls:?}");
        assert!(!calls.iter().any(|c| c.contains("1000:")), "nothing is handed to the caller: {calls:?}");
        assert!(matches!(
            &t.helper.snapshot().await.entries[..],
            [LedgerEntry { state: EntryState::Settled, .. }]
        ));

        let before = t.kernel.calls().len();
        assert!(teardown(&t, &p).await.failures.is_empty());
        let calls = t.kernel.calls()[before..].to_vec();
        let at =
            |p: &str| calls.iter().position(|c| c.starts_with(p)).unwrap_or_else(|| panic!("{p}: {calls:?}"));
        assert!(at("loop_detach /dev/loop0") < at("loop_remove /dev/loop0"), "{calls:?}");
        assert!(!t.kernel.world().loops.contains_key(&0));
        assert!(t.helper.snapshot().await.entries.is_empty());
    }

    #[tokio::test]
    async fn read_write_needs_a_writable_descriptor() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        let f = file(&t, 1000, FdAccess::ReadOnly, 10);
        let Response::Loop(info) = t.req_fds(&p, attach(LoopRole::Base, false), vec![f]).await else {
            panic!()
        };
        assert!(info.read_only);
        let f = file(&t, 1000, FdAccess::ReadWrite, 11);
        let Response::Loop(info) = t.req_fds(&p, attach(LoopRole::Cow, true), vec![f]).await else {
            panic!()
        };
        assert!(info.read_only, "read-only was asked for");
        assert!(t.kernel.calls().iter().all(|c| !c.starts_with("loop_attach") || c.ends_with("ro=true")));
    }

    /// The backing file rules are the policy's; here only that a refused file touches nothing.
    #[tokio::test]
    async fn a_refused_backing_file_touches_no_device() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        let r = t.req_fds(&p, attach(LoopRole::Base, true), vec![file(&t, 0, FdAccess::ReadWrite, 10)]).await;
        assert!(
            matches!(&r, Response::Error(HelperError::Denied { rule, .. }) if rule == "loop.backing_owner"),
            "{r:?}"
        );
        let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let id = FileId { dev: 1, ino: 2 };
        let fuse = BackingFile {
            regular: true,
            uid: 1000,
            fs_type: "fuse.sshfs".into(),
            access: FdAccess::ReadOnly,
            id,
            size: BASE_BYTES,
            rdev: None,
        };
        t.kernel.register_backing(fd.as_fd(), fuse);
        let r = t.req_fds(&p, attach(LoopRole::Base, true), vec![fd]).await;
        assert!(
            matches!(&r, Response::Error(HelperError::InvalidRequest { reason }) if reason.contains("of type \"fuse.sshfs\"")),
            "{r:?}"
        );
        assert!(!t.kernel.calls().iter().any(|c| c.starts_with("loop_add")));
    }

    #[tokio::test]
    async fn wrong_descriptor_counts_are_refused() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        let r = t.req_fds(&p, attach(LoopRole::Base, true), vec![]).await;
        assert!(matches!(r, Response::Error(HelperError::InvalidRequest { .. })), "{r:?}");
        let fds = vec![file(&t, 1000, FdAccess::ReadOnly, 1), file(&t, 1000, FdAccess::ReadOnly, 2)];
        let r = t.req_fds(&p, attach(LoopRole::Base, true), fds).await;
        assert!(matches!(r, Response::Error(HelperError::InvalidRequest { .. })), "{r:?}");
        let r = t.req_fds(&p, Request::Ping, vec![file(&t, 1000, FdAccess::ReadOnly, 3)]).await;
        assert!(matches!(r, Response::Error(HelperError::InvalidRequest { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn a_lost_race_retries_on_another_device() {
        let t = TestHelper::new();
        t.kernel.fail("loop_attach", "/dev/loop0", Errno::EBUSY, 1);
        let p = t.peer(1000, "home");
        let f = file(&t, 1000, FdAccess::ReadOnly, 10);
        let Response::Loop(info) = t.req_fds(&p, attach(LoopRole::Base, true), vec![f]).await else {
            panic!()
        };
        assert_eq!(info.device, "/dev/loop1");
        let calls = t.kernel.calls();
        assert_eq!(calls.iter().filter(|c| c.starts_with("loop_attach")).count(), 2, "{calls:?}");
        // devtmpfs makes new nodes root:disk 0660; each is made root's before the attach.
        assert!(calls.iter().any(|c| c == "loop_root_only /dev/loop0"));
        assert!(calls.iter().any(|c| c == "loop_root_only /dev/loop1"));
        let ledger = t.helper.snapshot().await;
        assert_eq!(ledger.entries.len(), 1, "the lost device's intent went: {ledger:?}");
    }

    #[tokio::test]
    async fn a_failed_attach_removes_its_device_and_its_intent() {
        let t = TestHelper::new();
        t.kernel.fail("loop_attach", "/dev/loop0", Errno::EIO, 1);
        let p = t.peer(1000, "home");
        let r =
            t.req_fds(&p, attach(LoopRole::Base, true), vec![file(&t, 1000, FdAccess::ReadOnly, 10)]).await;
        assert!(matches!(r, Response::Error(HelperError::Kernel { .. })), "{r:?}");
        assert!(t.kernel.calls().iter().any(|c| c == "loop_remove /dev/loop0"));
        assert!(t.kernel.world().loops.is_empty());
        assert!(t.helper.snapshot().await.entries.is_empty());
    }

    /// A device the helper made and could not remove after a failed attach (the kernel said it
    /// was busy: someone opened it for a moment) is never left without an entry: it stays in the
    /// ledger, released and counted, until a teardown sees the kernel let it go.
    #[tokio::test]
    async fn a_device_a_failed_attach_cannot_remove_yet_stays_counted_until_it_goes() {
        for failing in ["loop_root_only", "loop_attach"] {
            let mut policy = test_policy();
            policy.quotas.max_loops = 1;
            let t = TestHelper::with_policy(policy);
            t.kernel.fail(failing, "/dev/loop0", Errno::EIO, 1);
            t.kernel.fail("loop_remove", "/dev/loop0", Errno::EBUSY, super::REMOVE_RETRIES.len());
            let p = t.peer(1000, "home");
            let r = t
                .req_fds(&p, attach(LoopRole::Base, true), vec![file(&t, 1000, FdAccess::ReadOnly, 10)])
                .await;
            assert!(matches!(r, Response::Error(HelperError::Kernel { .. })), "{failing}: {r:?}");
            assert!(t.kernel.world().loops.contains_key(&0), "{failing}: the device is still there");
            assert!(
                matches!(
                    &t.helper.snapshot().await.entries[..],
                    [LedgerEntry { state: EntryState::Released, .. }]
                ),
                "{failing}"
            );
            let r = t
                .req_fds(&p, attach(LoopRole::Cow, false), vec![file(&t, 1000, FdAccess::ReadWrite, 11)])
                .await;
            assert_eq!(r, Response::Error(HelperError::QuotaExceeded { resource: "loops".into(), limit: 1 }));
            assert!(teardown(&t, &p).await.failures.is_empty(), "{failing}");
            assert!(t.kernel.world().loops.is_empty(), "{failing}");
            assert!(t.helper.snapshot().await.entries.is_empty(), "{failing}");
        }
    }

    #[tokio::test]
    async fn a_second_attach_for_the_same_role_conflicts_until_torn_down() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        let r =
            t.req_fds(&p, attach(LoopRole::Base, true), vec![file(&t, 1000, FdAccess::ReadOnly, 10)]).await;
        assert!(matches!(r, Response::Loop(_)), "{r:?}");
        let again =
            t.req_fds(&p, attach(LoopRole::Base, true), vec![file(&t, 1000, FdAccess::ReadOnly, 10)]).await;
        assert!(matches!(again, Response::Error(HelperError::Conflict { .. })), "{again:?}");
        assert!(teardown(&t, &p).await.failures.is_empty());
        let r =
            t.req_fds(&p, attach(LoopRole::Base, true), vec![file(&t, 1000, FdAccess::ReadOnly, 11)]).await;
        assert!(matches!(r, Response::Loop(_)), "{r:?}");
    }

    #[tokio::test]
    async fn teardown_never_touches_another_owners_device_or_a_reused_one() {
        let t = TestHelper::new();
        let a = t.peer(1000, "home");
        let b = t.peer(1001, "home");
        let Response::Loop(la) =
            t.req_fds(&a, attach(LoopRole::Base, true), vec![file(&t, 1000, FdAccess::ReadOnly, 10)]).await
        else {
            panic!()
        };
        assert!(teardown(&t, &b).await.failures.is_empty());
        assert!(t.kernel.world().loops[&0].status.is_some(), "b released a's device");
        // The device now holds another file (released and bound again behind the helper's
        // back): a's teardown drops a's entry and leaves the device.
        t.kernel.world().loops.get_mut(&0).unwrap().status.as_mut().unwrap().backing_ino = 99;
        assert!(teardown(&t, &a).await.failures.is_empty());
        assert!(t.kernel.world().loops[&0].status.is_some(), "a reused device was detached");
        assert!(t.helper.snapshot().await.entries.is_empty());
        assert_eq!(la.device, "/dev/loop0");
    }

    #[tokio::test]
    async fn loop_quota() {
        let mut policy = test_policy();
        policy.quotas.max_loops = 1;
        let t = TestHelper::with_policy(policy);
        let p = t.peer(1000, "home");
        assert!(matches!(
            t.req_fds(&p, attach(LoopRole::Base, true), vec![file(&t, 1000, FdAccess::ReadOnly, 1)]).await,
            Response::Loop(_)
        ));
        let r = t.req_fds(&p, attach(LoopRole::Cow, true), vec![file(&t, 1000, FdAccess::ReadOnly, 2)]).await;
        assert_eq!(r, Response::Error(HelperError::QuotaExceeded { resource: "loops".into(), limit: 1 }));
    }

    /// A device someone (root) holds open cannot be removed: it stays in the ledger, released and
    /// counted, until a later teardown sees the kernel let it go. Nobody gets it meanwhile.
    #[tokio::test]
    async fn a_device_held_open_stays_counted_until_the_kernel_lets_it_go() {
        let mut policy = test_policy();
        policy.quotas.max_loops = 1;
        let t = TestHelper::with_policy(policy);
        let a = t.peer(1000, "home");
        let b = t.peer(1001, "home");
        let Response::Loop(la) =
            t.req_fds(&a, attach(LoopRole::Cow, false), vec![file(&t, 1000, FdAccess::ReadWrite, 10)]).await
        else {
            panic!()
        };
        t.kernel.world().loops.get_mut(&0).unwrap().held_open = true;
        let report = teardown(&t, &a).await;
        assert!(matches!(&report.failures[..], [f] if f.object == "loop /dev/loop0"), "{report:?}");
        assert_eq!(t.kernel.world().loops[&0].status, None, "detached");
        assert!(matches!(
            &t.helper.snapshot().await.entries[..],
            [LedgerEntry { state: EntryState::Released, .. }]
        ));
        let r =
            t.req_fds(&a, attach(LoopRole::Base, true), vec![file(&t, 1000, FdAccess::ReadOnly, 11)]).await;
        assert_eq!(r, Response::Error(HelperError::QuotaExceeded { resource: "loops".into(), limit: 1 }));
        let Response::Loop(lb) =
            t.req_fds(&b, attach(LoopRole::Cow, false), vec![file(&t, 1001, FdAccess::ReadWrite, 12)]).await
        else {
            panic!()
        };
        assert_ne!(lb.device, la.device, "b got the device someone holds open");
        t.kernel.world().loops.get_mut(&0).unwrap().held_open = false;
        assert!(teardown(&t, &a).await.failures.is_empty());
        assert!(!t.kernel.world().loops.contains_key(&0));
        assert!(t.helper.snapshot().await.entries.iter().all(|e| e.uid == 1001));
    }

    #[tokio::test]
    async fn attach_binds_a_device_created_for_it_and_never_an_existing_one() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        let r =
            t.req_fds(&p, attach(LoopRole::Base, true), vec![file(&t, 1000, FdAccess::ReadOnly, 10)]).await;
        assert!(matches!(r, Response::Loop(_)), "{r:?}");
        let existing: Vec<u32> = t.kernel.world().loops.keys().copied().collect();
        let before = t.kernel.calls().len();
        let r =
            t.req_fds(&p, attach(LoopRole::Cow, true), vec![file(&t, 1000, FdAccess::ReadOnly, 11)]).await;
        let Response::Loop(l) = r else { panic!("{r:?}") };
        let n = super::loop_number(&l.device).unwrap();
        assert!(!existing.contains(&n), "{n} existed before");
        let calls = t.kernel.calls()[before..].to_vec();
        for e in existing {
            assert!(
                !calls
                    .iter()
                    .any(|c| c.contains(&format!("/dev/loop{e} ")) || c.ends_with(&format!("/dev/loop{e}"))),
                "{calls:?}"
            );
        }
    }

    /// a's device went behind the helper's back and b got the same number: a's entry naming it
    /// is stale and dropped, so a's teardown can never take b's device.
    #[tokio::test]
    async fn attaching_a_device_drops_every_stale_entry_naming_it() {
        let t = TestHelper::new();
        let a = t.peer(1000, "home");
        let b = t.peer(1001, "home");
        let Response::Loop(la) =
            t.req_fds(&a, attach(LoopRole::Base, true), vec![file(&t, 1000, FdAccess::ReadOnly, 10)]).await
        else {
            panic!()
        };
        t.kernel.world().loops.remove(&0);
        let Response::Loop(lb) =
            t.req_fds(&b, attach(LoopRole::Base, true), vec![file(&t, 1001, FdAccess::ReadOnly, 20)]).await
        else {
            panic!()
        };
        assert_eq!((la.device.as_str(), lb.device.as_str()), ("/dev/loop0", "/dev/loop0"));
        let ledger = t.helper.snapshot().await;
        assert!(ledger.entries.iter().all(|e| e.uid == 1001), "{:?}", ledger.entries);
        assert!(teardown(&t, &a).await.failures.is_empty());
        assert!(t.kernel.world().loops[&0].status.is_some(), "a's stale entry released b's device");
    }

    #[tokio::test]
    async fn a_failed_ledger_write_leaves_the_ledger_and_no_device() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        let helper = open_helper(dir.path(), &kernel);
        // The objects file cannot be replaced: its temporary name is taken by a directory.
        std::fs::create_dir(dir.path().join("objects.json.tmp")).unwrap();
        let fd = register(&kernel, 1000, FdAccess::ReadOnly, 10);
        let p = TestHelper::new().peer(1000, "home");
        let r = helper.handle(&p, attach(LoopRole::Base, true), vec![fd]).await;
        assert!(
            matches!(&r, Response::Error(HelperError::Internal { what }) if what.contains("ledger")),
            "{r:?}"
        );
        assert!(helper.snapshot().await.entries.is_empty());
        let w = kernel.world();
        assert!(w.loops.is_empty(), "a device was left: {:?}", w.loops);
        assert!(
            !w.calls.iter().any(|c| c.starts_with("loop_attach")),
            "attached before the intent was saved"
        );
    }

    /// A backing file whose filesystem does not answer: the attach gives up, and other requests
    /// go on meanwhile (the inspection holds no lock).
    #[tokio::test]
    async fn a_backing_file_that_does_not_answer_holds_up_nobody() {
        let mut t = TestHelper::new();
        t.helper.inspect_timeout = std::time::Duration::from_millis(300);
        t.kernel.world().inspect_delay = Some(std::time::Duration::from_millis(1500));
        let p = t.peer(1000, "home");
        let f = file(&t, 1000, FdAccess::ReadOnly, 10);
        let start = std::time::Instant::now();
        let attach_req = t.req_fds(&p, attach(LoopRole::Base, true), vec![f]);
        let other = async {
            let r = t.req(&p, Request::TapCreate { vm: vm("other") }).await;
            (r, start.elapsed())
        };
        let (r, (tap, tap_took)) = tokio::join!(attach_req, other);
        assert!(
            matches!(&r, Response::Error(HelperError::InvalidRequest { reason }) if reason.contains("within")),
            "{r:?}"
        );
        assert!(start.elapsed() < std::time::Duration::from_millis(1200), "{:?}", start.elapsed());
        assert!(matches!(tap, Response::Tap(_)), "{tap:?}");
        assert!(tap_took < std::time::Duration::from_millis(250), "another request waited {tap_took:?}");
        assert!(!t.kernel.calls().iter().any(|c| c.starts_with("loop_attach")));
    }

    /// A helper killed between the attach and settling its entry: the intent written before makes
    /// the device the ledger's, and the next helper's reconcile detaches and removes it; teardown
    /// then finds nothing left and nothing stuck.
    #[test]
    fn a_helper_killed_right_after_a_loop_attach_leaves_no_device() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        let p = TestHelper::new().peer(1000, "home");
        let first = Arc::new(open_helper(dir.path(), &kernel));
        kernel.hang_after("loop_attach");
        let fd = register(&kernel, 1000, FdAccess::ReadWrite, 10);
        let (h, peer) = (first.clone(), p.clone());
        // The attach is a synchronous call: it stops for good on a thread of its own.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(h.handle(&peer, attach(LoopRole::Cow, false), vec![fd]));
        });
        let attached = (0..400).any(|_| {
            std::thread::sleep(Duration::from_millis(5));
            kernel.world().loops.get(&0).is_some_and(|l| l.status.is_some())
        });
        assert!(attached, "{:?}", kernel.calls());
        kill_9((), first, dir.path());

        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let second = open_helper(dir.path(), &kernel);
            let ledger = second.snapshot().await;
            assert!(
                matches!(&ledger.entries[..], [LedgerEntry { state: EntryState::Intent, .. }]),
                "{ledger:?}"
            );
            let report = second.reconcile().await;
            assert_eq!(report.dropped, vec!["loop /dev/loop0".to_owned()], "{report:?}");
            assert!(kernel.world().loops.is_empty(), "a device was left: {:?}", kernel.world().loops);
            let Response::Teardown(t) =
                second.handle(&p, Request::TeardownVms { vms: vec![vm("dev")] }, vec![]).await
            else {
                panic!()
            };
            assert!(t.failures.is_empty(), "{t:?}");
            assert!(second.snapshot().await.entries.is_empty());
        });
    }
}
