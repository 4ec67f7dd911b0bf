//! Loop attach and detach.
//!
//! Attach, in order: the backing file arrives as a descriptor the client opened (proving it may
//! open it); it is inspected before the state lock is taken, on a blocking thread with a time
//! limit, from cached attributes and the mount table only (never asking its filesystem); it must
//! be a regular file owned by the caller on a local filesystem ([`LOCAL_FILESYSTEMS`]). It is attached
//! read-only unless the client asked for read-write *and* the descriptor is open read-write. The
//! device is always one the helper creates for this attach (`LOOP_CTL_ADD`): a device that did not
//! exist a moment ago cannot be held open by anyone, so no descriptor a former owner kept on some
//! loop node can ever reach this caller's disk. Its node is given to root (0600), the attach is one
//! `LOOP_CONFIGURE` without autoclear, and only then is the node given to the caller (0600).
//!
//! Detach touches only a device the ledger gives to this caller for this VM and role, and only
//! while it is still attached to the recorded file: the node goes back to root (0600) first, then
//! the device is detached, then removed (`LOOP_CTL_REMOVE`, in the background: it waits for the
//! kernel and the caller need not). The kernel refuses to remove a device anyone still holds open;
//! such a device stays, empty and root's, and is never handed out again since the helper only ever
//! binds devices it has just created.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use banger_policy::{LedgerEntry, Object};
use banger_protocol::{HelperError, LoopInfo, LoopRole, VmId};
use nix::errno::Errno;

use super::rollback::Rollback;
use super::{Caller, Helper, State};
use crate::kernel::{BackingFile, FdAccess, KResult, Kernel, Loops, NodeState};
use banger_policy::ObjectKind;

use crate::ledger_store::Backing;

/// The filesystems a backing file may be on: local ones, which never wait on a server or a user
/// process.
pub const LOCAL_FILESYSTEMS: [&str; 7] = ["ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "tmpfs"];

/// How long inspecting a backing file may take before the attach is refused.
pub const INSPECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How often an attach is retried when another attach takes the free device first.
const ATTACH_TRIES: usize = 16;

/// The node every device has before the helper attaches it, and after it takes it back.
const ROOT_NODE: NodeState = NodeState { uid: 0, gid: 0, mode: 0o600 };

/// Gives `/dev/loopN` to root (0600) unless it already is.
pub(crate) fn root_node<L: Loops>(loops: &L, n: u32) -> KResult<()> {
    let node = loops.node(n)?;
    if node != ROOT_NODE {
        tracing::info!(
            "/dev/loop{n} had owner {}:{} mode {:o}; reset to root 0600",
            node.uid,
            node.gid,
            node.mode
        );
        loops.set_node(n, 0, 0, 0o600)?;
    }
    Ok(())
}

/// Removes a released device (its node already root's, the device detached). The kernel
/// refuses while anyone holds it open: such a device is left in place and, since only devices
/// created for an attach are ever bound, never handed out again.
pub(crate) fn remove_released<L: Loops>(loops: &L, n: u32) {
    match loops.remove(n) {
        Ok(()) => tracing::debug!("/dev/loop{n} removed"),
        Err(e) if e.errno_value() == Some(Errno::EBUSY) => tracing::warn!(
            "/dev/loop{n} is held open by someone (or attached outside the helper); left in place, never handed out again"
        ),
        Err(e) if e.errno_value() == Some(Errno::ENODEV) => {}
        Err(e) => tracing::warn!("cannot remove released /dev/loop{n}: {e}"),
    }
}

/// Whether an attach lost a race for its device (try another), or its error.
fn attach_raced(r: KResult<()>) -> Result<bool, HelperError> {
    match r {
        Ok(()) => Ok(false),
        Err(e) if matches!(e.errno_value(), Some(Errno::EBUSY | Errno::ENOENT | Errno::ENXIO)) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// The device number of `/dev/loopN`.
pub(crate) fn loop_number(device: &str) -> Option<u32> {
    device.strip_prefix("/dev/loop")?.parse().ok()
}

impl<K: Kernel> Helper<K> {
    /// Inspects a backing file descriptor on a blocking thread, before any lock is taken, and
    /// gives up after [`Helper::inspect_timeout`]: nothing the file's filesystem does can hold up
    /// other requests.
    pub(crate) async fn inspect_backing(&self, fd: OwnedFd) -> Result<(OwnedFd, BackingFile), HelperError> {
        let kernel = self.kernel.clone();
        let job = tokio::task::spawn_blocking(move || {
            let r = kernel.loops().inspect(fd.as_fd());
            (fd, r)
        });
        match tokio::time::timeout(self.inspect_timeout, job).await {
            Err(_) => Err(HelperError::invalid(format!(
                "the backing file could not be inspected within {} s; put it on a local filesystem",
                self.inspect_timeout.as_secs_f32()
            ))),
            Ok(Err(e)) => Err(HelperError::Kernel { op: "inspect".into(), errno: 0, detail: e.to_string() }),
            Ok(Ok((fd, r))) => Ok((fd, r?)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn loop_attach(
        &self,
        st: &mut State,
        c: Caller<'_>,
        vm: &VmId,
        role: LoopRole,
        read_only: bool,
        (fd, file): (OwnedFd, BackingFile),
        names: &mut Vec<String>,
    ) -> Result<LoopInfo, HelperError> {
        let loops = self.kernel.loops();
        if !file.regular {
            return Err(HelperError::invalid("the backing file must be a regular file"));
        }
        if file.uid != c.uid {
            return Err(HelperError::Denied {
                rule: "loop backing file owner".into(),
                reason: format!(
                    "the backing file belongs to uid {}, not to the caller (uid {}); only your own files can be attached",
                    file.uid, c.uid
                ),
            });
        }
        if !LOCAL_FILESYSTEMS.contains(&file.fs_type.as_str()) {
            let on = if file.fs_type == "unknown" {
                "a filesystem missing from the helper's mount table".to_owned()
            } else {
                format!("a filesystem of type {}", file.fs_type)
            };
            return Err(HelperError::invalid(format!(
                "the backing file is on {on}; loop devices are attached only over {} (a network or FUSE filesystem could hang the kernel); copy it to one of those",
                LOCAL_FILESYSTEMS.join(", ")
            )));
        }
        let read_only = match file.access {
            FdAccess::ReadWrite => read_only,
            FdAccess::ReadOnly => true,
            FdAccess::WriteOnly | FdAccess::Path => {
                return Err(HelperError::invalid("open the backing file for reading (O_RDONLY or O_RDWR)"));
            }
        };
        let backing = Backing { dev: file.dev, ino: file.ino };

        if let Some(LedgerEntry { object: Object::Loop { device, .. }, .. }) =
            st.stored.find(c.uid, c.install, vm, ObjectKind::Loop(role))
        {
            return Err(HelperError::Conflict {
                what: format!(
                    "vm {vm} already has a {} loop device ({device}); detach it first",
                    role.as_str()
                ),
            });
        }
        let new_vm = !st.stored.ledger.has_vm(c.uid, c.install, vm);
        self.check_quota(st, c, ObjectKind::Loop(role), new_vm)?;

        let n = self.attach_clean(fd.as_fd(), read_only)?;
        drop(fd);
        let device = format!("/dev/loop{n}");
        names.push(device.clone());
        let mut undo = Rollback::new(self.kernel.clone());
        undo.loop_device(n);
        loops.set_node(n, c.uid, 0, 0o600)?;
        let entry = LedgerEntry {
            uid: c.uid,
            install: c.install.clone(),
            vm: vm.clone(),
            object: Object::Loop { role, device: device.clone(), read_only },
        };
        // On a failed save the ledger is left exactly as it was, backing identity included.
        let before = st.stored.clone();
        for stale in st.stored.insert_loop(entry.clone(), backing) {
            tracing::info!(
                "{device} was free, so the entry of uid {} install {} vm {} naming it was stale; dropped",
                stale.uid,
                stale.install,
                stale.vm
            );
        }
        if let Err(e) = st.persist() {
            st.stored = before;
            return Err(e);
        }
        undo.commit();
        Ok(self.loop_info(&entry))
    }

    /// Attaches `fd` to a device created for it (so nobody can hold it open), whose node is
    /// root's, returning its number.
    fn attach_clean(&self, fd: BorrowedFd<'_>, read_only: bool) -> Result<u32, HelperError> {
        let loops = self.kernel.loops();
        for _ in 0..ATTACH_TRIES {
            let n = loops.add(None)?;
            root_node(loops, n)?;
            if attach_raced(loops.attach(n, fd, read_only))? {
                // Another root tool bound it first; it is theirs now.
                continue;
            }
            return Ok(n);
        }
        Err(HelperError::Kernel {
            op: "LOOP_CONFIGURE".into(),
            errno: Errno::EBUSY as i32,
            detail: format!(
                "every new loop device was taken by someone else {ATTACH_TRIES} times in a row; retry"
            ),
        })
    }

    /// Removes a released device in the background (removal waits for the kernel).
    pub(crate) fn retire(&self, n: u32) {
        let kernel = self.kernel.clone();
        let job = move || remove_released(kernel.loops(), n);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(job)),
            Err(_) => job(),
        }
    }

    /// Takes back a device the ledger gives to `uid`, deciding by its node, which the helper never
    /// opens while a user owns it:
    ///
    /// - node owned by `uid`: it is still the one handed out (whatever is attached there now, the
    ///   owner attached it) — the node goes back to root first, then the device is detached;
    /// - node owned by root: detached only while it holds the recorded file (a crash between the
    ///   two steps above, or an attach that never reached the chown);
    /// - node owned by anyone else: it was released and handed to someone else; left alone.
    pub(crate) fn release_loop(&self, st: &State, entry: &LedgerEntry) -> Result<(), HelperError> {
        let Object::Loop { device, .. } = &entry.object else { return Ok(()) };
        let uid = entry.uid;
        let Some(n) = loop_number(device) else { return Ok(()) };
        let loops = self.kernel.loops();
        let node = match loops.node(n) {
            Ok(node) => node,
            Err(e) if e.errno_value() == Some(Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if node.uid == uid && uid != 0 {
            loops.set_node(n, 0, 0, 0o600)?;
            if loops.status(n)?.is_some() {
                loops.detach(n)?;
            }
            self.retire(n);
        } else if node.uid == 0 {
            match loops.status(n)? {
                Some(s)
                    if st.stored.backing_of(entry)
                        == Some(Backing { dev: s.backing_dev, ino: s.backing_ino }) =>
                {
                    loops.detach(n)?;
                    self.retire(n);
                }
                Some(_) => tracing::warn!("{device} holds another file now; not touched"),
                None => self.retire(n),
            }
        } else {
            tracing::warn!("{device} now belongs to uid {}; not touched", node.uid);
        }
        Ok(())
    }

    pub(crate) fn loop_detach(
        &self,
        st: &mut State,
        c: Caller<'_>,
        vm: &VmId,
        role: LoopRole,
        names: &mut Vec<String>,
    ) -> Result<(), HelperError> {
        let Some(entry) = st.stored.find(c.uid, c.install, vm, ObjectKind::Loop(role)).cloned() else {
            return Ok(());
        };
        let Object::Loop { device, .. } = &entry.object else { return Ok(()) };
        names.push(device.clone());
        self.release_loop(st, &entry)?;
        st.stored.remove(c.uid, c.install, vm, ObjectKind::Loop(role));
        if let Err(e) = st.persist() {
            tracing::error!("{device} detached but the ledger could not be saved: {e}");
        }
        Ok(())
    }

    /// The wire form of a recorded loop device.
    pub(crate) fn loop_info(&self, entry: &LedgerEntry) -> LoopInfo {
        let (role, device, read_only) = match &entry.object {
            Object::Loop { role, device, read_only } => (*role, device.clone(), *read_only),
            Object::Tap { .. } | Object::Nat { .. } => (LoopRole::Base, String::new(), true),
        };
        LoopInfo { install: entry.install.clone(), vm: entry.vm.clone(), role, device, read_only }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, OwnedFd};

    use banger_protocol::{HelperError, LoopRole, Request, Response};
    use nix::errno::Errno;

    use crate::kernel::{BackingFile, FdAccess, NodeState};
    use crate::ops::testing::*;

    fn file(t: &TestHelper, uid: u32, access: FdAccess, ino: u64) -> OwnedFd {
        let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        t.kernel.register_backing(
            fd.as_fd(),
            BackingFile { regular: true, uid, fs_type: "ext4".into(), access, dev: 1, ino },
        );
        fd
    }

    fn attach(role: LoopRole, read_only: bool) -> Request {
        Request::LoopAttach { vm: vm("dev"), role, read_only }
    }

    #[tokio::test]
    async fn attach_gives_the_node_to_the_caller_and_detach_takes_it_back_first() {
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
            assert_eq!(w.loops[&0].node, NodeState { uid: 1000, gid: 0, mode: 0o600 });
            assert!(w.loops[&0].status.is_some());
        }
        let calls = t.kernel.calls();
        let at =
            |p: &str| calls.iter().position(|c| c.starts_with(p)).unwrap_or_else(|| panic!("{p}: {calls:?}"));
        // A device created for this attach (nobody can hold it open), its node root's, the
        // attach, and only then the node goes to the caller.
        let order = [
            at("loop_add any"),
            at("loop_set_node /dev/loop0 0:0 600"),
            at("loop_attach"),
            at("loop_set_node /dev/loop0 1000:0"),
        ];
        assert!(order.is_sorted(), "{calls:?}");

        let before = t.kernel.calls().len();
        let r = t.req(&p, Request::LoopDetach { vm: vm("dev"), role: LoopRole::Cow }).await;
        assert_eq!(r, Response::Done);
        removal_tried(&t, 0).await;
        let calls = t.kernel.calls()[before..].to_vec();
        let at =
            |p: &str| calls.iter().position(|c| c.starts_with(p)).unwrap_or_else(|| panic!("{p}: {calls:?}"));
        // Released: root's node, detached, then removed.
        let order = [at("loop_set_node /dev/loop0 0:0 600"), at("loop_detach"), at("loop_remove /dev/loop0")];
        assert!(order.is_sorted(), "{calls:?}");
        assert!(!t.kernel.world().loops.contains_key(&0));
        assert_eq!(
            t.req(&p, Request::LoopDetach { vm: vm("dev"), role: LoopRole::Cow }).await,
            Response::Done
        );
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
        let f = file(&t, 1000, FdAccess::WriteOnly, 12);
        let r = t.req_fds(&p, attach(LoopRole::Work, false), vec![f]).await;
        assert!(matches!(r, Response::Error(HelperError::InvalidRequest { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn refuses_other_owners_files_fuse_and_non_regular_files() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        let f = file(&t, 0, FdAccess::ReadWrite, 10);
        let r = t.req_fds(&p, attach(LoopRole::Base, true), vec![f]).await;
        assert!(matches!(r, Response::Error(HelperError::Denied { .. })), "{r:?}");
        let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        t.kernel.register_backing(
            fd.as_fd(),
            BackingFile {
                regular: true,
                uid: 1000,
                fs_type: "fuse.sshfs".into(),
                access: FdAccess::ReadOnly,
                dev: 1,
                ino: 2,
            },
        );
        let r = t.req_fds(&p, attach(LoopRole::Base, true), vec![fd]).await;
        assert!(
            matches!(&r, Response::Error(HelperError::InvalidRequest { reason }) if reason.contains("of type fuse.sshfs")),
            "{r:?}"
        );
        // Only local filesystems: network ones and filesystems the helper cannot see are refused too.
        for (fs, says) in [
            ("nfs4", "of type nfs4"),
            ("cifs", "of type cifs"),
            ("overlay", "of type overlay"),
            ("unknown", "missing from the helper's mount table"),
        ] {
            let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
            t.kernel.register_backing(
                fd.as_fd(),
                BackingFile {
                    regular: true,
                    uid: 1000,
                    fs_type: fs.into(),
                    access: FdAccess::ReadOnly,
                    dev: 1,
                    ino: 2,
                },
            );
            let r = t.req_fds(&p, attach(LoopRole::Base, true), vec![fd]).await;
            assert!(
                matches!(&r, Response::Error(HelperError::InvalidRequest { reason }) if reason.contains(says)),
                "{fs}: {r:?}"
            );
        }
        let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        t.kernel.register_backing(
            fd.as_fd(),
            BackingFile {
                regular: false,
                uid: 1000,
                fs_type: "ext4".into(),
                access: FdAccess::ReadOnly,
                dev: 1,
                ino: 3,
            },
        );
        let r = t.req_fds(&p, attach(LoopRole::Base, true), vec![fd]).await;
        assert!(matches!(r, Response::Error(HelperError::InvalidRequest { .. })), "{r:?}");
        assert!(!t.kernel.calls().iter().any(|c| c.starts_with("loop_attach")));
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
    async fn a_lost_race_retries_on_another_device_and_a_dirty_node_is_reset() {
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
        // devtmpfs makes new nodes root:disk 0660; each is reset to root 0600 before the attach.
        assert!(calls.iter().any(|c| c == "loop_set_node /dev/loop0 0:0 600"));
        assert!(calls.iter().any(|c| c == "loop_set_node /dev/loop1 0:0 600"));
    }

    #[tokio::test]
    async fn a_failure_after_attach_detaches_and_resets_the_node() {
        let t = TestHelper::new();
        t.kernel.fail("loop_set_node", "1000:0", Errno::EIO, 1);
        let p = t.peer(1000, "home");
        let f = file(&t, 1000, FdAccess::ReadOnly, 10);
        let r = t.req_fds(&p, attach(LoopRole::Base, true), vec![f]).await;
        assert!(matches!(r, Response::Error(HelperError::Kernel { .. })), "{r:?}");
        // Rolled back: root's node, detached, removed.
        let calls = t.kernel.calls();
        assert!(calls.iter().any(|c| c == "loop_remove /dev/loop0"), "{calls:?}");
        assert!(!t.kernel.world().loops.contains_key(&0));
        assert!(t.helper.snapshot().await.ledger.entries.is_empty());
    }

    #[tokio::test]
    async fn a_second_attach_for_the_same_role_conflicts_until_detached() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        let r =
            t.req_fds(&p, attach(LoopRole::Base, true), vec![file(&t, 1000, FdAccess::ReadOnly, 10)]).await;
        assert!(matches!(r, Response::Loop(_)), "{r:?}");
        let again =
            t.req_fds(&p, attach(LoopRole::Base, true), vec![file(&t, 1000, FdAccess::ReadOnly, 10)]).await;
        assert!(matches!(again, Response::Error(HelperError::Conflict { .. })), "{again:?}");
        assert_eq!(
            t.req(&p, Request::LoopDetach { vm: vm("dev"), role: LoopRole::Base }).await,
            Response::Done
        );
        let r =
            t.req_fds(&p, attach(LoopRole::Base, true), vec![file(&t, 1000, FdAccess::ReadOnly, 11)]).await;
        assert!(matches!(r, Response::Loop(_)), "{r:?}");
    }

    #[tokio::test]
    async fn detach_never_touches_another_owners_device_or_a_reused_one() {
        let t = TestHelper::new();
        let a = t.peer(1000, "home");
        let b = t.peer(1001, "home");
        let Response::Loop(la) =
            t.req_fds(&a, attach(LoopRole::Base, true), vec![file(&t, 1000, FdAccess::ReadOnly, 10)]).await
        else {
            panic!()
        };
        assert_eq!(
            t.req(&b, Request::LoopDetach { vm: vm("dev"), role: LoopRole::Base }).await,
            Response::Done
        );
        assert!(t.kernel.world().loops[&0].status.is_some(), "b detached a's device");
        // The device is released behind the helper's back and given to uid 1001: a's detach leaves it.
        t.kernel.world().loops.get_mut(&0).unwrap().node.uid = 1001;
        assert_eq!(
            t.req(&a, Request::LoopDetach { vm: vm("dev"), role: LoopRole::Base }).await,
            Response::Done
        );
        assert!(t.kernel.world().loops[&0].status.is_some(), "another owner's device was detached");
        // Root-owned and attached to another file: left alone too.
        let f = file(&t, 1000, FdAccess::ReadOnly, 20);
        let Response::Loop(l2) = t.req_fds(&a, attach(LoopRole::Cow, true), vec![f]).await else { panic!() };
        {
            let mut w = t.kernel.world();
            let l = w.loops.get_mut(&1).unwrap();
            l.node.uid = 0;
            l.status.as_mut().unwrap().backing_ino = 99;
        }
        assert_eq!(l2.device, "/dev/loop1");
        assert_eq!(
            t.req(&a, Request::LoopDetach { vm: vm("dev"), role: LoopRole::Cow }).await,
            Response::Done
        );
        assert!(t.kernel.world().loops[&1].status.is_some(), "a reused device was detached");
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

    /// Waits until the background removal of `/dev/loopN` has been tried.
    async fn removal_tried(t: &TestHelper, n: u32) {
        let call = format!("loop_remove /dev/loop{n}");
        for _ in 0..200 {
            if t.kernel.calls().contains(&call) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        panic!("{call} never happened: {:?}", t.kernel.calls());
    }

    /// The attack: a owns the node while attached, detaches the device himself, reopens the free
    /// node and keeps that descriptor. The kernel refuses to remove a device held open, so it
    /// stays, and b gets a device created for his attach.
    #[tokio::test]
    async fn a_device_someone_holds_open_is_never_handed_out() {
        let t = TestHelper::new();
        let a = t.peer(1000, "home");
        let b = t.peer(1001, "home");
        let Response::Loop(la) =
            t.req_fds(&a, attach(LoopRole::Cow, false), vec![file(&t, 1000, FdAccess::ReadWrite, 10)]).await
        else {
            panic!()
        };
        let held = super::loop_number(&la.device).unwrap();
        {
            let mut w = t.kernel.world();
            let l = w.loops.get_mut(&held).unwrap();
            l.status = None;
            l.held_open = true;
        }
        assert_eq!(
            t.req(&a, Request::LoopDetach { vm: vm("dev"), role: LoopRole::Cow }).await,
            Response::Done
        );
        removal_tried(&t, held).await;
        assert_eq!(t.kernel.world().loops[&held].node, NodeState { uid: 0, gid: 0, mode: 0o600 });
        let Response::Loop(lb) =
            t.req_fds(&b, attach(LoopRole::Cow, false), vec![file(&t, 1001, FdAccess::ReadWrite, 11)]).await
        else {
            panic!()
        };
        assert_ne!(lb.device, la.device, "b got the device a holds open");
        assert_eq!(t.kernel.world().loops[&held].status, None);
        // Even once a lets go, the number is not bound again by the helper while the device exists.
        t.kernel.world().loops.get_mut(&held).unwrap().held_open = false;
        let Response::Loop(l2) =
            t.req_fds(&b, attach(LoopRole::Base, true), vec![file(&t, 1001, FdAccess::ReadOnly, 12)]).await
        else {
            panic!()
        };
        assert_ne!(l2.device, la.device);
    }

    #[tokio::test]
    async fn attach_binds_a_device_created_for_it_and_never_an_existing_one() {
        let t = TestHelper::new();
        let existing: Vec<u32> = t.kernel.world().loops.keys().copied().collect();
        let p = t.peer(1000, "home");
        let Response::Loop(l) =
            t.req_fds(&p, attach(LoopRole::Base, true), vec![file(&t, 1000, FdAccess::ReadOnly, 10)]).await
        else {
            panic!()
        };
        let n = super::loop_number(&l.device).unwrap();
        assert!(!existing.contains(&n), "{n} existed before");
        let calls = t.kernel.calls();
        assert!(calls.iter().any(|c| c == "loop_add any"), "{calls:?}");
        for e in existing {
            assert!(
                !calls.iter().any(|c| c.ends_with(&format!("/dev/loop{e}"))),
                "touched loop{e}: {calls:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_released_node_goes_to_root_before_the_device_is_detached_and_removed() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        let Response::Loop(l) =
            t.req_fds(&p, attach(LoopRole::Base, true), vec![file(&t, 1000, FdAccess::ReadOnly, 10)]).await
        else {
            panic!()
        };
        let n = super::loop_number(&l.device).unwrap();
        assert_eq!(
            t.req(&p, Request::LoopDetach { vm: vm("dev"), role: LoopRole::Base }).await,
            Response::Done
        );
        removal_tried(&t, n).await;
        let calls = t.kernel.calls();
        let at =
            |c: String| calls.iter().position(|x| *x == c).unwrap_or_else(|| panic!("no {c}: {calls:?}"));
        let reset = at(format!("loop_set_node /dev/loop{n} 0:0 600"));
        let detach = calls.iter().rposition(|x| x.starts_with(&format!("loop_detach /dev/loop{n}"))).unwrap();
        let remove = at(format!("loop_remove /dev/loop{n}"));
        assert!(reset < detach && detach < remove, "{calls:?}");
        assert!(!t.kernel.world().loops.contains_key(&n), "removed");
    }

    /// a detached his device himself, so it was free and b got it: a's entry naming it is stale
    /// and dropped, so a's detach can never take b's device, even when b's node is root's.
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
        // a's device is gone behind the helper's back (a detached it himself and something removed
        // it), so the number is free and the next created device is that number again.
        t.kernel.world().loops.remove(&0);
        let Response::Loop(lb) =
            t.req_fds(&b, attach(LoopRole::Base, true), vec![file(&t, 1001, FdAccess::ReadOnly, 20)]).await
        else {
            panic!()
        };
        assert_eq!((la.device.as_str(), lb.device.as_str()), ("/dev/loop0", "/dev/loop0"));
        let snap = t.helper.snapshot().await;
        assert!(snap.ledger.entries.iter().all(|e| e.uid == 1001), "{:?}", snap.ledger.entries);
        assert_eq!(snap.loop_backings.len(), 1);
        assert_eq!(snap.loop_backings[0].uid, 1001);
        t.kernel.world().loops.get_mut(&0).unwrap().node.uid = 0;
        assert_eq!(
            t.req(&a, Request::LoopDetach { vm: vm("dev"), role: LoopRole::Base }).await,
            Response::Done
        );
        let Response::Teardown(_) = t.req(&a, Request::TeardownVms { vms: vec![vm("dev")] }).await else {
            panic!()
        };
        assert!(t.kernel.world().loops[&0].status.is_some(), "a's stale entry detached b's device");
    }

    #[tokio::test]
    async fn a_failed_ledger_write_leaves_the_ledger_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let (store, stored) = crate::ledger_store::LedgerStore::open(dir.path()).unwrap();
        let kernel = std::sync::Arc::new(crate::kernel::fake::FakeKernel::new());
        let helper = crate::ops::Helper::new(
            test_policy(),
            kernel.clone(),
            stored,
            Some(store),
            crate::audit::AuditLog::memory().0,
        );
        // The objects file cannot be replaced: its temporary name is taken by a directory.
        std::fs::create_dir(dir.path().join("objects.json.tmp")).unwrap();
        let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        kernel.register_backing(
            fd.as_fd(),
            BackingFile {
                regular: true,
                uid: 1000,
                fs_type: "ext4".into(),
                access: FdAccess::ReadOnly,
                dev: 1,
                ino: 10,
            },
        );
        let t = TestHelper::new();
        let r = helper.handle(&t.peer(1000, "home"), attach(LoopRole::Base, true), vec![fd]).await;
        assert!(
            matches!(&r, Response::Error(HelperError::Kernel { op, .. }) if op == "ledger-write"),
            "{r:?}"
        );
        let snap = helper.snapshot().await;
        assert!(snap.ledger.entries.is_empty() && snap.loop_backings.is_empty(), "{snap:?}");
        let w = kernel.world();
        assert!(w.loops.values().all(|l| l.status.is_none()), "the device stayed attached");
        assert!(w.loops.values().all(|l| l.node == NodeState { uid: 0, gid: 0, mode: 0o600 }));
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
}
