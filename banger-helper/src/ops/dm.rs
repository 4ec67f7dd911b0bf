//! dm-create: the VM's root block device, a dm-snapshot over its base and copy-on-write loop
//! devices, with a device node the helper makes and hands to the caller; and the release of a
//! target that teardown and the start-up reconcile use.
//!
//! The policy granted the VM's two settled loop devices (the base read-only, the copy-on-write
//! file read-write and large enough never to fill up) and the VM's target if the ledger has one.
//! Making a target, in order:
//!
//! 1. its name (`banger-` and 32 hex digits) and uuid (`BANGER-` and 64) are derived from
//!    `(uid, install, vm)`, the node's path from the name (in the helper's node directory); each
//!    loop device must still hold the file recorded at its attach, and its device number is read
//!    from its node; the table is the helper's own: `snapshot <base> <cow> P 8` over the whole
//!    base, devices by number;
//! 2. a target of that name already there is the helper's only if it has the derived uuid (one
//!    that never settled, or that a helper whose ledger was lost left): it is released as below;
//!    any other is a conflict and is not touched;
//! 3. the entry is written to the ledger as an intent;
//! 4. the target is created, its table loaded, and resumed;
//! 5. the node is made: a block device node for the target's number, root's 0600 as it is made,
//!    then given to the caller, still 0600 (it stays root's when the policy forces the jailer: the
//!    VM's jail gets a node of its own); and checked: the path answered is a block device of
//!    that number, the caller's, mode 0600;
//! 6. the entry is settled, with the target's number.
//!
//! A failure after step 3 releases what was made (the node, then the target) and records what
//! that came to: the entry goes once the target is gone, and stays, released and counted, while
//! someone holds the target open.
//!
//! An existing entry is answered again when its target is there with its uuid and number (the
//! node is made again if it is missing or not as it was made); otherwise (the kernel lost the
//! target, or it never settled) the target is made again as above.
//!
//! Release ([`release_dm`]): the node goes back to `root:root` 0600 (every hard link of it with
//! it) and is unlinked, and only then is the target removed, so a device number the kernel hands
//! out again later never reaches a node its former owner kept. A target that holds another uuid
//! is not the entry's and is left alone; one that someone holds open (`EBUSY`) stays, and so does
//! its entry, released and counted, with its loop devices untouched.

use banger_policy::{DevNum, DmGrant, EntryState, FileId, LedgerEntry, Object, ObjectKind};
use banger_protocol::{DmInfo, HelperError, VmId};
use nix::errno::Errno;

use super::loopdev::{Release, describe, loop_number, settle_undo};
use super::{Caller, Done, Helper, State};
use crate::kernel::{Dm, KResult, Kernel, Loops as _, NODE_MODE};
use crate::names::VmKey;

/// Releases the target of a dm entry: its node first (back to root, unlinked), then the target,
/// if it is still the entry's.
pub(crate) fn release_dm<D: Dm>(dm: &D, entry: &LedgerEntry) -> KResult<Release> {
    let Object::Dm { name, uuid, .. } = &entry.object else { return Ok(Release::Gone) };
    dm.release_node(name)?;
    match dm.info(name)? {
        None => Ok(Release::Gone),
        Some(s) if s.uuid != *uuid => {
            tracing::warn!("dm {name} holds another uuid now; not touched");
            Ok(Release::Gone)
        }
        Some(_) => match dm.remove(name) {
            Ok(()) => Ok(Release::Gone),
            Err(e) if e.errno_value() == Some(Errno::ENXIO) => Ok(Release::Gone),
            Err(e) if e.errno_value() == Some(Errno::EBUSY) => {
                tracing::warn!("dm {name} is held open; it stays in the ledger until it can be removed");
                Ok(Release::Held)
            }
            Err(e) => Err(e),
        },
    }
}

/// The device number of the loop device of `entry`, which must still hold the recorded file.
fn loop_device<K: Kernel>(k: &K, entry: &LedgerEntry) -> Result<DevNum, HelperError> {
    let Object::Loop { role, device, backing, .. } = &entry.object else {
        return Err(HelperError::internal(format!("a loop entry of vm {} is not a loop device", entry.vm)));
    };
    let n = loop_number(device)
        .ok_or_else(|| HelperError::internal(format!("the ledger names the loop device {device:?}")))?;
    match k.loops().status(n)? {
        Some(s) if (FileId { dev: s.backing_dev, ino: s.backing_ino }) == *backing => {
            Ok(k.loops().device_number(n)?)
        }
        _ => Err(HelperError::Conflict {
            what: format!(
                "the {} loop device of vm {} ({device}) no longer holds the file it was attached to; tear the vm down and attach it again",
                role.as_str(),
                entry.vm
            ),
        }),
    }
}

/// Step 5's check: the node of `name` is a block device for `dev`, `owner`'s, mode 0600.
fn check_node<D: Dm>(dm: &D, name: &str, dev: DevNum, owner: u32) -> Result<(), HelperError> {
    match dm.node(name)? {
        Some(n) if n.block && n.rdev == dev && n.uid == owner && n.mode == NODE_MODE => Ok(()),
        found => Err(HelperError::internal(format!(
            "the node {} is not the block device {dev} of uid {owner}, mode {NODE_MODE:04o}, that was made for it ({found:?})",
            dm.node_path(name)
        ))),
    }
}

/// Makes the node of `name` again when it is missing or not as it was made.
fn ensure_node<D: Dm>(dm: &D, name: &str, dev: DevNum, owner: u32) -> Result<(), HelperError> {
    if check_node(dm, name, dev, owner).is_ok() {
        return Ok(());
    }
    tracing::warn!("the node of dm {name} is missing or changed; making it again");
    dm.make_node(name, dev, owner)?;
    check_node(dm, name, dev, owner)
}

/// What the VM's target is made of.
struct Plan {
    name: String,
    uuid: String,
    node: String,
    sectors: u64,
}

impl<K: Kernel> Helper<K> {
    /// Runs `f` over the kernel on a blocking thread: device-mapper calls wait on I/O (a resume
    /// reads the copy-on-write header; a busy removal is retried for a while).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&K) -> Result<T, HelperError> + Send + 'static,
    ) -> Result<T, HelperError> {
        let kernel = self.kernel.clone();
        tokio::task::spawn_blocking(move || f(&kernel))
            .await
            .map_err(|e| HelperError::internal(format!("a device-mapper call failed: {e}")))?
    }

    /// `DmCreate`, on what the policy granted.
    pub(crate) async fn dm_create(
        &self,
        st: &mut State,
        c: Caller<'_>,
        vm: &VmId,
        grant: DmGrant,
    ) -> Done<DmInfo> {
        let DmGrant { existing, base, cow, sectors } = grant;
        let key = VmKey::new(c.uid, c.install, vm);
        let name = key.dm_name();
        let plan = Plan { node: self.kernel.dm().node_path(&name), uuid: key.dm_uuid(), name, sectors };
        let names = vec![plan.name.clone(), plan.node.clone()];
        let info = DmInfo {
            install: c.install.clone(),
            vm: vm.clone(),
            name: plan.name.clone(),
            device: plan.node.clone(),
            sectors,
        };
        let again = match &existing {
            Some(entry) => self.answer_again(entry, self.handed_owner(c.uid)).await,
            None => Ok(false),
        };
        let result = match again {
            Ok(true) => Ok(info),
            Ok(false) => self.make_dm(st, c, vm, plan, base, cow).await.map(|()| info),
            Err(e) => Err(e),
        };
        Done::new(names, result)
    }

    /// Whether the existing entry's target is there, settled, with its uuid and number (its node
    /// is made again if need be).
    async fn answer_again(&self, entry: &LedgerEntry, owner: u32) -> Result<bool, HelperError> {
        let Object::Dm { name, uuid, dev, .. } = entry.object.clone() else {
            return Err(HelperError::internal(format!("the dm entry of vm {} is not a dm target", entry.vm)));
        };
        if entry.state != EntryState::Settled {
            return Ok(false);
        }
        let live = self
            .blocking(move |k| match k.dm().info(&name)? {
                Some(s) if s.uuid == uuid && s.dev == dev => {
                    ensure_node(k.dm(), &name, dev, owner).map(|()| true)
                }
                _ => Ok(false),
            })
            .await?;
        if !live {
            tracing::warn!(
                "{} of uid {owner} is in the ledger but not in the kernel; making it again",
                describe(entry)
            );
        }
        Ok(live)
    }

    /// Steps 1 to 6 of the module doc.
    async fn make_dm(
        &self,
        st: &mut State,
        c: Caller<'_>,
        vm: &VmId,
        plan: Plan,
        base: LedgerEntry,
        cow: LedgerEntry,
    ) -> Result<(), HelperError> {
        // Step 1: the loop devices, by number.
        let (origin, cow_dev) =
            self.blocking(move |k| Ok((loop_device(k, &base)?, loop_device(k, &cow)?))).await?;
        let object = Object::Dm {
            name: plan.name.clone(),
            uuid: plan.uuid.clone(),
            node: plan.node.clone(),
            dev: DevNum::default(),
            sectors: plan.sectors,
        };
        let mut entry = LedgerEntry::new(c.uid, c.install.clone(), vm.clone(), object);
        entry.state = EntryState::Intent;
        // Step 2: a target of the name already there.
        let (name, uuid) = (plan.name.clone(), plan.uuid.clone());
        let stale = entry.clone();
        let there = self
            .blocking(move |k| match k.dm().info(&name)? {
                None => Ok(None),
                Some(s) if s.uuid == uuid => Ok(Some(release_dm(k.dm(), &stale)?)),
                Some(s) => Err(HelperError::Conflict {
                    what: format!(
                        "a device-mapper target named {name} (uuid {:?}) exists that banger-helper did not make for this vm; an admin must remove it (dmsetup remove {name})",
                        s.uuid
                    ),
                }),
            })
            .await?;
        if there == Some(Release::Held) {
            return Err(HelperError::Conflict {
                what: format!(
                    "dm {} of vm {vm} is still open; stop whatever holds it and tear the vm down",
                    plan.name
                ),
            });
        }
        // Step 3: the intent (it replaces an entry that never settled or whose target is gone).
        st.commit(|l| {
            l.insert(entry.clone());
        })?;
        // Steps 4 and 5.
        let owner = self.handed_owner(c.uid);
        let (name, uuid, sectors) = (plan.name.clone(), plan.uuid.clone(), plan.sectors);
        let made = self
            .blocking(move |k| {
                let dev = k.dm().create_snapshot(&name, &uuid, sectors, origin, cow_dev)?;
                k.dm().make_node(&name, dev, owner)?;
                check_node(k.dm(), &name, dev, owner)?;
                Ok(dev)
            })
            .await;
        // Step 6.
        let settled = made.and_then(|dev| {
            st.commit(|l| {
                if let Some(e) = l.entries.iter_mut().find(|e| e.is(c.uid, c.install, vm, ObjectKind::Dm))
                    && let Object::Dm { dev: d, .. } = &mut e.object
                {
                    *d = dev;
                    e.state = EntryState::Settled;
                }
            })
        });
        if let Err(e) = settled {
            self.undo(st, &entry).await;
            return Err(e);
        }
        Ok(())
    }

    /// Releases what a failed make left and records what that came to; a release that fails
    /// leaves the intent for teardown and the reconcile.
    async fn undo(&self, st: &mut State, entry: &LedgerEntry) {
        let e = entry.clone();
        let release = self.blocking(move |k| Ok(release_dm(k.dm(), &e)?)).await;
        settle_undo(st, entry, "create", release);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use banger_policy::{EntryState, Object, Peer};
    use banger_protocol::{DmInfo, HelperError, Request, Response, TeardownReport, min_cow_bytes};
    use nix::errno::Errno;

    use crate::kernel::fake::{DM_MAJOR, FakeKernel, LOOP_MAJOR};
    use crate::kernel::{DevNum, FdAccess};
    use crate::names::VmKey;
    use crate::ops::testing::*;

    fn create(v: &str) -> Request {
        Request::DmCreate { vm: vm(v) }
    }

    async fn dm(t: &TestHelper, p: &Peer, v: &str) -> DmInfo {
        match t.req(p, create(v)).await {
            Response::Dm(info) => info,
            other => panic!("{other:?}"),
        }
    }

    async fn teardown(t: &TestHelper, p: &Peer, v: &str) -> TeardownReport {
        let Response::Teardown(r) = t.req(p, Request::TeardownVms { vms: vec![vm(v)] }).await else {
            panic!()
        };
        r
    }

    fn position(calls: &[String], prefix: &str) -> usize {
        calls.iter().position(|c| c.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix}: {calls:?}"))
    }

    #[tokio::test]
    async fn create_builds_the_snapshot_over_the_vms_loops_and_hands_over_its_node_only() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        let (base, cow) = t.attach_disks(&p, "dev", 10).await;
        let before = t.kernel.calls().len();
        let info = dm(&t, &p, "dev").await;
        let key = VmKey::new(1000, p.install.as_ref().unwrap(), &vm("dev"));
        assert_eq!(info.name, key.dm_name());
        assert_eq!(info.device, format!("/dev/banger/{}", key.dm_name()));
        assert_eq!(info.sectors, BASE_BYTES / 512);
        let calls = {
            let w = t.kernel.world();
            let target = &w.dms[&info.name];
            assert_eq!(target.uuid, key.dm_uuid());
            let n = |d: &str| super::loop_number(d).unwrap();
            assert_eq!(
                target.params,
                format!("{LOOP_MAJOR}:{} {LOOP_MAJOR}:{} P 8", n(&base.device), n(&cow.device))
            );
            assert_eq!(target.sectors, BASE_BYTES / 512);
            let node = w.nodes[&info.name];
            assert!(node.block);
            assert_eq!((node.rdev, node.node.uid, node.node.mode), (target.dev, 1000, 0o600));
            assert_eq!(node.rdev.major, DM_MAJOR);
            // The loop nodes stay root's: only the dm node is the caller's.
            assert!(w.loops.values().all(|l| (l.node.uid, l.node.mode) == (0, 0o600)));
            w.calls[before..].to_vec()
        };
        // The target, then its node, then the check of the node.
        assert!(position(&calls, "dm_create") < position(&calls, "dm_node_make"), "{calls:?}");
        assert!(position(&calls, "dm_node_make") < position(&calls, "dm_node "), "checked after: {calls:?}");
        let ledger = t.helper.snapshot().await;
        let e = ledger.entries.iter().find(|e| matches!(e.object, Object::Dm { .. })).unwrap();
        assert_eq!(e.state, EntryState::Settled);
        assert!(matches!(e.object, Object::Dm { dev, .. } if dev == target_dev(&t, &info.name)));
        // Listed with the rest.
        let Response::Owned(owned) = t.req(&p, Request::ListOwned).await else { panic!() };
        assert_eq!(owned.dms, vec![info]);
        assert_eq!(owned.loops.len(), 2);
    }

    fn target_dev(t: &TestHelper, name: &str) -> DevNum {
        t.kernel.world().dms[name].dev
    }

    #[tokio::test]
    async fn create_is_idempotent_and_makes_a_lost_node_or_target_again() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        t.attach_disks(&p, "dev", 10).await;
        let first = dm(&t, &p, "dev").await;
        let before = t.kernel.calls();
        assert_eq!(dm(&t, &p, "dev").await, first);
        let again = t.kernel.calls()[before.len()..].to_vec();
        assert!(
            !again.iter().any(|c| c.starts_with("dm_create") || c.starts_with("dm_node_make")),
            "{again:?}"
        );
        // The node went (or was changed): made again for the same target.
        t.kernel.world().nodes.get_mut(&first.name).unwrap().node.mode = 0o666;
        assert_eq!(dm(&t, &p, "dev").await, first);
        assert_eq!(t.kernel.world().nodes[&first.name].node.mode, 0o600);
        t.kernel.world().nodes.remove(&first.name);
        assert_eq!(dm(&t, &p, "dev").await, first);
        assert!(t.kernel.world().nodes.contains_key(&first.name));
        // The kernel lost the target: made again, with a new number, and its node with it.
        let old = target_dev(&t, &first.name);
        t.kernel.world().dms.remove(&first.name);
        assert_eq!(dm(&t, &p, "dev").await, first);
        let new = target_dev(&t, &first.name);
        assert_ne!(new, old);
        assert_eq!(t.kernel.world().nodes[&first.name].rdev, new);
        let ledger = t.helper.snapshot().await;
        assert_eq!(ledger.entries.iter().filter(|e| matches!(e.object, Object::Dm { .. })).count(), 1);
    }

    #[tokio::test]
    async fn no_dm_without_both_loops_and_none_over_another_users_loops() {
        let t = TestHelper::new();
        let (a, b) = (t.peer(1000, "home"), t.peer(1001, "home"));
        let r = t.req(&a, create("dev")).await;
        assert!(
            matches!(&r, Response::Error(HelperError::NotFound { what }) if what.contains("base")),
            "{r:?}"
        );
        t.attach_disks(&a, "dev", 10).await;
        // b names a's VM in the same install id: b has no loops of its own there.
        let r = t.req(&b, create("dev")).await;
        assert!(matches!(r, Response::Error(HelperError::NotFound { .. })), "{r:?}");
        // Another install of a's: not that install's VM either.
        let r = t.req(&t.peer(1000, "work"), create("dev")).await;
        assert!(matches!(r, Response::Error(HelperError::NotFound { .. })), "{r:?}");
        assert!(t.kernel.world().dms.is_empty());
        assert!(!t.kernel.calls().iter().any(|c| c.starts_with("dm_create")));
    }

    #[tokio::test]
    async fn a_copy_on_write_file_too_small_is_refused_and_nothing_is_made() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        let base = backing_fd(&t.kernel, 1000, FdAccess::ReadOnly, 1, BASE_BYTES);
        let cow = backing_fd(&t.kernel, 1000, FdAccess::ReadWrite, 2, min_cow_bytes(BASE_BYTES) - 1);
        for (role, read_only, fd) in
            [(banger_protocol::LoopRole::Base, true, base), (banger_protocol::LoopRole::Cow, false, cow)]
        {
            let r = t.req_fds(&p, Request::LoopAttach { vm: vm("dev"), role, read_only }, vec![fd]).await;
            assert!(matches!(r, Response::Loop(_)), "{r:?}");
        }
        let r = t.req(&p, create("dev")).await;
        assert!(
            matches!(&r, Response::Error(HelperError::InvalidRequest { reason }) if reason.contains("needs at least")),
            "{r:?}"
        );
        assert!(t.kernel.world().dms.is_empty() && t.kernel.world().nodes.is_empty());
    }

    #[tokio::test]
    async fn without_device_mapper_nothing_is_attached_or_made() {
        let t = TestHelper::with_kernel(test_policy(), FakeKernel::without_dm());
        let p = t.peer(1000, "home");
        let fd = backing_fd(&t.kernel, 1000, FdAccess::ReadOnly, 1, BASE_BYTES);
        let r = t
            .req_fds(
                &p,
                Request::LoopAttach { vm: vm("dev"), role: banger_protocol::LoopRole::Base, read_only: true },
                vec![fd],
            )
            .await;
        for r in [r, t.req(&p, create("dev")).await] {
            assert!(
                matches!(&r, Response::Error(HelperError::Conflict { what }) if what.contains("no device-mapper") && what.contains("file storage")),
                "{r:?}"
            );
        }
        let calls = t.kernel.calls();
        assert!(!calls.iter().any(|c| c.starts_with("loop_") || c.starts_with("dm_")), "{calls:?}");
        assert!(t.helper.snapshot().await.entries.is_empty());
    }

    #[tokio::test]
    async fn a_loop_device_that_holds_another_file_now_is_not_built_on() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        let (_, cow) = t.attach_disks(&p, "dev", 10).await;
        let n = super::loop_number(&cow.device).unwrap();
        t.kernel.world().loops.get_mut(&n).unwrap().status.as_mut().unwrap().backing_ino = 99;
        let r = t.req(&p, create("dev")).await;
        assert!(
            matches!(&r, Response::Error(HelperError::Conflict { what }) if what.contains("no longer holds")),
            "{r:?}"
        );
        assert!(t.kernel.world().dms.is_empty());
        assert!(!t.helper.snapshot().await.entries.iter().any(|e| matches!(e.object, Object::Dm { .. })));
    }

    #[tokio::test]
    async fn a_failed_create_leaves_no_target_node_or_entry() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        t.attach_disks(&p, "dev", 10).await;
        let name = VmKey::new(1000, p.install.as_ref().unwrap(), &vm("dev")).dm_name();
        // The node cannot be made: the target that was made goes again, node first.
        t.kernel.fail("dm_node_make", &name, Errno::EPERM, 1);
        let r = t.req(&p, create("dev")).await;
        assert!(matches!(r, Response::Error(HelperError::Kernel { .. })), "{r:?}");
        {
            let w = t.kernel.world();
            assert!(w.dms.is_empty() && w.nodes.is_empty(), "{:?} {:?}", w.dms, w.nodes);
            let last = w.calls.len();
            let calls = &w.calls[last - 3..];
            assert!(
                calls[0].starts_with("dm_node_release") && calls[2].starts_with("dm_remove"),
                "{calls:?}"
            );
        }
        assert!(!t.helper.snapshot().await.entries.iter().any(|e| matches!(e.object, Object::Dm { .. })));
        // And the next try makes it.
        dm(&t, &p, "dev").await;
    }

    #[tokio::test]
    async fn a_target_of_the_name_the_helper_did_not_make_is_a_conflict_and_left_alone() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        t.attach_disks(&p, "dev", 10).await;
        let name = VmKey::new(1000, p.install.as_ref().unwrap(), &vm("dev")).dm_name();
        t.kernel.world().dms.insert(
            name.clone(),
            crate::kernel::fake::FakeDm {
                uuid: "LVM-someone-else".into(),
                dev: DevNum { major: DM_MAJOR, minor: 77 },
                sectors: 8,
                params: String::new(),
                held_open: false,
            },
        );
        let r = t.req(&p, create("dev")).await;
        assert!(
            matches!(&r, Response::Error(HelperError::Conflict { what }) if what.contains("dmsetup remove")),
            "{r:?}"
        );
        assert_eq!(t.kernel.world().dms[&name].uuid, "LVM-someone-else");
        // Teardown leaves it too: it is not the VM's.
        assert!(teardown(&t, &p, "dev").await.failures.is_empty());
        assert!(t.kernel.world().dms.contains_key(&name));
    }

    #[tokio::test]
    async fn teardown_takes_the_node_back_then_removes_the_target_then_the_loops() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        t.attach_disks(&p, "dev", 10).await;
        let info = dm(&t, &p, "dev").await;
        let before = t.kernel.calls().len();
        let report = teardown(&t, &p, "dev").await;
        assert!(report.failures.is_empty(), "{report:?}");
        assert_eq!(report.torn_down, vec![vm("dev")]);
        let calls = t.kernel.calls()[before..].to_vec();
        let node = position(&calls, &format!("dm_node_release {}", info.name));
        let target = position(&calls, &format!("dm_remove {}", info.name));
        let first_loop = position(&calls, "loop_status");
        assert!(node < target && target < first_loop, "{calls:?}");
        {
            let w = t.kernel.world();
            assert!(w.dms.is_empty() && w.nodes.is_empty() && w.loops.is_empty());
        }
        assert!(t.helper.snapshot().await.entries.is_empty());
    }

    /// A target someone holds open (the VM's VMM still runs) cannot be removed: its node is gone
    /// already, the target and both loops stay, counted, and the failure is reported; once it is
    /// closed, the next teardown finishes. Meanwhile it is not answered again.
    #[tokio::test]
    async fn a_busy_target_stays_counted_with_its_loops_until_it_is_closed() {
        let mut policy = test_policy();
        policy.quotas.max_vms = 1;
        let t = TestHelper::with_policy(policy);
        let p = t.peer(1000, "home");
        t.attach_disks(&p, "dev", 10).await;
        let info = dm(&t, &p, "dev").await;
        t.kernel.world().dms.get_mut(&info.name).unwrap().held_open = true;
        let report = teardown(&t, &p, "dev").await;
        assert!(
            matches!(&report.failures[..], [f] if f.object == format!("dm {}", info.name) && f.error.to_string().contains("still open")),
            "{report:?}"
        );
        assert!(report.torn_down.is_empty());
        {
            {
                let w = t.kernel.world();
                assert!(w.nodes.is_empty(), "the node goes first, whatever happens to the target");
                assert!(w.dms.contains_key(&info.name));
                assert_eq!(w.loops.values().filter(|l| l.status.is_some()).count(), 2, "loops untouched");
                assert!(!w.calls.iter().any(|c| c.starts_with("loop_detach")));
            }
            let ledger = t.helper.snapshot().await;
            assert_eq!(ledger.entries.len(), 3);
            assert!(
                ledger
                    .entries
                    .iter()
                    .any(|e| matches!(e.object, Object::Dm { .. }) && e.state == EntryState::Released)
            );
            // Still counted: no other VM fits. And the VM's target is not handed out again.
            let r = t.req(&p, Request::TapCreate { vm: vm("other") }).await;
            assert!(matches!(r, Response::Error(HelperError::QuotaExceeded { .. })), "{r:?}");
            let r = t.req(&p, create("dev")).await;
            assert!(
                matches!(&r, Response::Error(HelperError::Conflict { what }) if what.contains("still open")),
                "{r:?}"
            );
            // Closed: the next teardown removes the target, then the loops.
            t.kernel.world().dms.get_mut(&info.name).unwrap().held_open = false;
            assert!(teardown(&t, &p, "dev").await.failures.is_empty());
            let w = t.kernel.world();
            assert!(w.dms.is_empty() && w.loops.is_empty());
        }
        assert!(t.helper.snapshot().await.entries.is_empty());
    }

    #[tokio::test]
    async fn another_user_can_neither_use_nor_tear_down_a_vms_target() {
        let t = TestHelper::new();
        let (a, b) = (t.peer(1000, "home"), t.peer(1001, "home"));
        t.attach_disks(&a, "dev", 10).await;
        let info = dm(&t, &a, "dev").await;
        assert!(teardown(&t, &b, "dev").await.failures.is_empty());
        assert!(t.kernel.world().dms.contains_key(&info.name));
        assert_eq!(t.kernel.world().nodes[&info.name].node.uid, 1000);
        let Response::Owned(theirs) = t.req(&b, Request::ListOwned).await else { panic!() };
        assert!(theirs.dms.is_empty() && theirs.loops.is_empty());
        // b's own VM of the same id gets its own target.
        t.attach_disks(&b, "dev", 20).await;
        let bs = dm(&t, &b, "dev").await;
        assert_ne!(bs.name, info.name);
        assert_eq!(t.kernel.world().nodes[&bs.name].node.uid, 1001);
    }

    /// A helper killed after the target was made but before its entry settled: the next helper's
    /// reconcile removes the target (node first); teardown then releases the loops, and nothing
    /// is left.
    #[test]
    fn a_helper_killed_during_a_create_leaves_nothing_after_reconcile_and_teardown() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        let p = TestHelper::new().peer(1000, "home");
        let first = Arc::new(open_helper(dir.path(), &kernel));
        let (h, peer) = (first.clone(), p.clone());
        let k = kernel.clone();
        // The loops, then a create that stops for good right after the target is made.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                for (role, read_only, ino, size) in [
                    (banger_protocol::LoopRole::Base, true, 1, BASE_BYTES),
                    (banger_protocol::LoopRole::Cow, false, 2, min_cow_bytes(BASE_BYTES)),
                ] {
                    let access = if read_only { FdAccess::ReadOnly } else { FdAccess::ReadWrite };
                    let fd = backing_fd(&k, 1000, access, ino, size);
                    let r = h
                        .handle(&peer, Request::LoopAttach { vm: vm("dev"), role, read_only }, vec![fd])
                        .await;
                    assert!(matches!(r, Response::Loop(_)), "{r:?}");
                }
                k.hang_after("dm_create");
                h.handle(&peer, create("dev"), vec![]).await;
            });
        });
        let made = (0..400).any(|_| {
            std::thread::sleep(Duration::from_millis(5));
            !kernel.world().dms.is_empty()
        });
        assert!(made, "{:?}", kernel.calls());
        kill_9((), first, dir.path());

        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let second = open_helper(dir.path(), &kernel);
            let ledger = second.snapshot().await;
            let intent = ledger.entries.iter().find(|e| matches!(e.object, Object::Dm { .. })).unwrap();
            assert_eq!(intent.state, EntryState::Intent);
            let report = second.reconcile().await;
            assert_eq!(report.dropped.len(), 1, "{report:?}");
            assert!(report.dropped[0].starts_with("dm banger-"), "{report:?}");
            assert!(kernel.world().dms.is_empty());
            assert_eq!(kernel.world().loops.len(), 2, "the settled loops stay for the teardown");
            let Response::Teardown(t) =
                second.handle(&p, Request::TeardownVms { vms: vec![vm("dev")] }, vec![]).await
            else {
                panic!()
            };
            assert!(t.failures.is_empty(), "{t:?}");
            {
                let w = kernel.world();
                assert!(w.dms.is_empty() && w.nodes.is_empty() && w.loops.is_empty());
            }
            assert!(second.snapshot().await.entries.is_empty());
        });
    }

    #[tokio::test]
    async fn reconcile_keeps_live_targets_drops_lost_ones_and_clears_stray_nodes() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        t.attach_disks(&p, "keep", 10).await;
        t.attach_disks(&p, "lose", 20).await;
        let keep = dm(&t, &p, "keep").await;
        let lose = dm(&t, &p, "lose").await;
        {
            let mut w = t.kernel.world();
            // lose's target went behind the helper's back (its node stayed); a stray node, and a
            // banger-named target the ledger does not know, appeared.
            w.dms.remove(&lose.name);
            let stray = crate::kernel::fake::FakeNode {
                block: true,
                rdev: DevNum { major: DM_MAJOR, minor: 99 },
                node: crate::kernel::fake::NodeState { uid: 1001, gid: 0, mode: 0o600 },
            };
            w.nodes.insert("leftover".into(), stray);
            let unknown = VmKey::new(4242, p.install.as_ref().unwrap(), &vm("x")).dm_name();
            w.dms.insert(
                unknown,
                crate::kernel::fake::FakeDm {
                    uuid: "BANGER-x".into(),
                    dev: DevNum { major: DM_MAJOR, minor: 98 },
                    sectors: 8,
                    params: String::new(),
                    held_open: false,
                },
            );
        }
        let report = t.helper.reconcile().await;
        assert!(report.errors.is_empty(), "{report:?}");
        assert!(report.dropped.contains(&format!("dm {}", lose.name)), "{report:?}");
        assert!(report.dropped.contains(&"node /dev/banger/leftover".to_owned()), "{report:?}");
        assert_eq!(report.unknown.len(), 1, "{report:?}");
        assert!(report.unknown[0].starts_with("dm banger-"), "{report:?}");
        {
            let w = t.kernel.world();
            assert!(w.dms.contains_key(&keep.name) && w.nodes.contains_key(&keep.name));
            assert!(!w.nodes.contains_key(&lose.name) && !w.nodes.contains_key("leftover"));
            assert_eq!(w.dms.len(), 2, "the unknown target is left alone");
        }
        let ledger = t.helper.snapshot().await;
        assert_eq!(ledger.entries.iter().filter(|e| matches!(e.object, Object::Dm { .. })).count(), 1);
        assert_eq!(ledger.entries.len(), 5, "both VMs' loops and keep's target: {:?}", ledger.entries);
        // lose's target is made again on request, over its loops.
        assert_eq!(dm(&t, &p, "lose").await, lose);
    }
}
