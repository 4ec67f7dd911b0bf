//! Loop attach and detach.
//!
//! Attach, in order: the backing file arrives as a descriptor the client opened (proving it may
//! open it); it must be a regular file owned by the caller and not on FUSE. It is attached
//! read-only unless the client asked for read-write *and* the descriptor is open read-write. A
//! free device is found; if its node is not root-owned 0600 it is reset first (device-node
//! hygiene); the attach is one `LOOP_CONFIGURE` without autoclear, retried on another device when
//! a concurrent attach won the race; only then is the node given to the caller (0600).
//!
//! Detach touches only a device the ledger gives to this caller for this VM and role, and only
//! while it is still attached to the recorded file: the node goes back to root (0600) first, then
//! the device is detached, so a reused device number never reaches its former owner.

use std::os::fd::{AsFd, OwnedFd};

use banger_policy::{LedgerEntry, Object};
use banger_protocol::{HelperError, LoopInfo, LoopRole, VmId};
use nix::errno::Errno;

use super::rollback::Rollback;
use super::{Caller, Helper, State};
use crate::kernel::{FdAccess, Kernel, Loops as _};
use banger_policy::ObjectKind;

use crate::ledger_store::Backing;

/// `statfs.f_type` of FUSE filesystems.
pub const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// How often an attach is retried when another attach takes the free device first.
const ATTACH_TRIES: usize = 16;

/// The device number of `/dev/loopN`.
pub(crate) fn loop_number(device: &str) -> Option<u32> {
    device.strip_prefix("/dev/loop")?.parse().ok()
}

impl<K: Kernel> Helper<K> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn loop_attach(
        &self,
        st: &mut State,
        c: Caller<'_>,
        vm: &VmId,
        role: LoopRole,
        read_only: bool,
        fd: OwnedFd,
        names: &mut Vec<String>,
    ) -> Result<LoopInfo, HelperError> {
        let loops = self.kernel.loops();
        let file = loops.inspect(fd.as_fd())?;
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
        if file.fs_magic == FUSE_SUPER_MAGIC {
            return Err(HelperError::invalid(
                "the backing file is on a FUSE filesystem, which a loop device must not depend on; copy it to a local filesystem",
            ));
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

        let n = self.attach_free(fd.as_fd(), read_only)?;
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
        st.stored.insert(entry.clone());
        st.stored.loop_backing.insert(device, backing);
        if let Err(e) = st.persist() {
            st.stored.remove(c.uid, c.install, vm, ObjectKind::Loop(role));
            return Err(e);
        }
        undo.commit();
        Ok(self.loop_info(&entry))
    }

    /// Attaches `fd` to a free device whose node is root's, returning its number.
    fn attach_free(&self, fd: std::os::fd::BorrowedFd<'_>, read_only: bool) -> Result<u32, HelperError> {
        let loops = self.kernel.loops();
        for _ in 0..ATTACH_TRIES {
            let n = loops.get_free()?;
            let node = loops.node(n)?;
            if (node.uid, node.gid, node.mode) != (0, 0, 0o600) {
                tracing::warn!(
                    "free /dev/loop{n} had owner {}:{} mode {:o}; reset to root 0600 before use",
                    node.uid,
                    node.gid,
                    node.mode
                );
                loops.set_node(n, 0, 0, 0o600)?;
            }
            match loops.attach(n, fd, read_only) {
                Ok(()) => return Ok(n),
                Err(e) if e.errno_value() == Some(Errno::EBUSY) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(HelperError::Kernel {
            op: "LOOP_CONFIGURE".into(),
            errno: Errno::EBUSY as i32,
            detail: format!(
                "every free loop device was taken by someone else {ATTACH_TRIES} times in a row; retry"
            ),
        })
    }

    /// Takes back a device the ledger gives to `uid`, deciding by its node, which the helper never
    /// opens while a user owns it:
    ///
    /// - node owned by `uid`: it is still the one handed out (whatever is attached there now, the
    ///   owner attached it) — the node goes back to root first, then the device is detached;
    /// - node owned by root: detached only while it holds the recorded file (a crash between the
    ///   two steps above, or an attach that never reached the chown);
    /// - node owned by anyone else: it was released and handed to someone else; left alone.
    pub(crate) fn release_loop(&self, st: &State, uid: u32, device: &str) -> Result<(), HelperError> {
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
        } else if node.uid == 0 {
            match loops.status(n)? {
                Some(s)
                    if st.stored.loop_backing.get(device)
                        == Some(&Backing { dev: s.backing_dev, ino: s.backing_ino }) =>
                {
                    loops.detach(n)?;
                }
                Some(_) => tracing::warn!("{device} holds another file now; not touched"),
                None => {}
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
        let Some(LedgerEntry { object: Object::Loop { device, .. }, .. }) =
            st.stored.find(c.uid, c.install, vm, ObjectKind::Loop(role)).cloned()
        else {
            return Ok(());
        };
        names.push(device.clone());
        self.release_loop(st, c.uid, &device)?;
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

    use super::FUSE_SUPER_MAGIC;
    use crate::kernel::{BackingFile, FdAccess, NodeState};
    use crate::ops::testing::*;

    fn file(t: &TestHelper, uid: u32, access: FdAccess, ino: u64) -> OwnedFd {
        let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        t.kernel.register_backing(
            fd.as_fd(),
            BackingFile { regular: true, uid, fs_magic: 0xEF53, access, dev: 1, ino },
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
        let hygiene = calls.iter().position(|c| c.starts_with("loop_set_node /dev/loop0 0:0")).unwrap();
        let attach_at = calls.iter().position(|c| c.starts_with("loop_attach")).unwrap();
        let give = calls.iter().position(|c| c.starts_with("loop_set_node /dev/loop0 1000:0")).unwrap();
        assert!(hygiene < attach_at && attach_at < give, "{calls:?}");

        let before = t.kernel.calls().len();
        let r = t.req(&p, Request::LoopDetach { vm: vm("dev"), role: LoopRole::Cow }).await;
        assert_eq!(r, Response::Done);
        let calls = t.kernel.calls()[before..].to_vec();
        let reset = calls.iter().position(|c| c.starts_with("loop_set_node /dev/loop0 0:0 600")).unwrap();
        let detach = calls.iter().position(|c| c.starts_with("loop_detach")).unwrap();
        assert!(reset < detach, "{calls:?}");
        assert!(t.kernel.world().loops[&0].status.is_none());
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
                fs_magic: FUSE_SUPER_MAGIC,
                access: FdAccess::ReadOnly,
                dev: 1,
                ino: 2,
            },
        );
        let r = t.req_fds(&p, attach(LoopRole::Base, true), vec![fd]).await;
        assert!(
            matches!(&r, Response::Error(HelperError::InvalidRequest { reason }) if reason.contains("FUSE")),
            "{r:?}"
        );
        let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        t.kernel.register_backing(
            fd.as_fd(),
            BackingFile {
                regular: false,
                uid: 1000,
                fs_magic: 1,
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
        t.kernel.world().loops.get_mut(&0).unwrap().node = NodeState { uid: 1001, gid: 1001, mode: 0o600 };
        t.kernel.fail("loop_attach", "/dev/loop0", Errno::EBUSY, 1);
        // The fake hands out loop0 again after the lost race; make the second try use loop1.
        let p = t.peer(1000, "home");
        let f = file(&t, 1000, FdAccess::ReadOnly, 10);
        let Response::Loop(info) = t.req_fds(&p, attach(LoopRole::Base, true), vec![f]).await else {
            panic!()
        };
        assert_eq!(info.device, "/dev/loop0");
        let calls = t.kernel.calls();
        assert_eq!(calls.iter().filter(|c| c.starts_with("loop_attach")).count(), 2, "{calls:?}");
        assert!(calls.iter().any(|c| c == "loop_set_node /dev/loop0 0:0 600"));
    }

    #[tokio::test]
    async fn a_failure_after_attach_detaches_and_resets_the_node() {
        let t = TestHelper::new();
        t.kernel.fail("loop_set_node", "1000:0", Errno::EIO, 1);
        let p = t.peer(1000, "home");
        let f = file(&t, 1000, FdAccess::ReadOnly, 10);
        let r = t.req_fds(&p, attach(LoopRole::Base, true), vec![f]).await;
        assert!(matches!(r, Response::Error(HelperError::Kernel { .. })), "{r:?}");
        {
            let w = t.kernel.world();
            assert!(w.loops[&0].status.is_none());
            assert_eq!(w.loops[&0].node, NodeState { uid: 0, gid: 0, mode: 0o600 });
        }
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
}
