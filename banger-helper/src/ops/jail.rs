//! jail-launch and jail-kill: a VM's VMM started through Firecracker's jailer, as a uid of its
//! own, in a chroot, under the caller's cgroup; and its removal, which teardown and the start-up
//! reconcile use too.
//!
//! The policy granted the launch ([`banger_policy::JailGrant`]): the jail uid (the lowest of the
//! policy's range that no jail of anyone holds), the VM's TAP from the ledger, the caller's
//! cgroup and its limits; it checked the descriptors as the helper inspected them. Launching, in
//! order:
//!
//! 1. the jail id (`bg-` and 32 hex digits) is derived from `(uid, install, vm)`; an id the
//!    ledger holds for another key is a conflict (never seen in practice: 128 bits);
//! 2. the entry, with the jail uid and the shape, is written to the ledger as an intent *before*
//!    the kernel is asked: from here the uid is taken and the VM counts against the caller's
//!    quotas, and a helper that stops leaves a jail that teardown and the reconcile remove;
//! 3. the order ([`JailOrder`]) is built from derived and policy values only — id, jail uid,
//!    caller, shape, the TAP, the caller's cgroup and totals, which descriptors came — and handed
//!    with the descriptors to [`Jails::launch`], which builds the jail and starts the jailer; a
//!    launch that fails is undone again as a removal ([`Helper::remove_jail`]: the jail removed,
//!    the TAP given back to whom a new TAP would be) and the entry taken back out only once that
//!    succeeded (else the intent, and so the uid, stays for teardown and the reconcile);
//! 4. the entry is settled with the VMM's PID, and the answer names the jail's root and API
//!    socket on the host ([`Jails::root`], [`banger_protocol::jail_paths`]).
//!
//! Removing a jail ([`Helper::remove_jail`]) goes through [`Jails::remove`] with the uid and PID
//! the ledger recorded (the VMM is killed only if that PID still runs as that uid); the entry
//! leaves the ledger only once the jail is gone, so its uid is never handed out while anything
//! of the jail may still run as it.

use std::os::fd::OwnedFd;

use banger_policy::{EntryState, JailGrant, Ledger, LedgerEntry, Object, ObjectKind, jail_info};
use banger_protocol::{HelperError, JailFiles, JailInfo, TeardownFailure, TeardownReport, VmId, VmShape};

use super::loopdev::describe;
use super::{Caller, Done, Helper, State};
use crate::kernel::{JailOrder, Jails as _, KResult, Kernel, Links as _, UserLimits};
use crate::names::VmKey;

/// The TAP the ledger holds for a jail entry's VM, if any.
pub(crate) fn jail_tap(ledger: &Ledger, entry: &LedgerEntry) -> Option<String> {
    ledger.tap_name(entry.uid, &entry.install, &entry.vm).map(str::to_owned)
}

/// The names an audit record of a jail carries: its id and its uid.
pub(crate) fn jail_names(entry: &LedgerEntry) -> Vec<String> {
    match &entry.object {
        Object::Jail { id, jail_uid, .. } => vec![id.clone(), format!("uid={jail_uid}")],
        _ => Vec::new(),
    }
}

impl<K: Kernel> Helper<K> {
    /// The wire form of a jail entry.
    pub(crate) fn jail_info(&self, entry: &LedgerEntry) -> Result<JailInfo, HelperError> {
        let Object::Jail { id, jail_uid, shape, pid } = &entry.object else {
            return Err(HelperError::internal(format!("the jail entry of vm {} is not a jail", entry.vm)));
        };
        Ok(jail_info(entry, id, *jail_uid, *shape, *pid, &self.kernel.jails().root(id)))
    }

    /// `JailLaunch`, on what the policy granted: steps 1 to 4 of the module doc.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn jail_launch(
        &self,
        st: &mut State,
        c: Caller<'_>,
        vm: &VmId,
        shape: VmShape,
        files: JailFiles,
        grant: JailGrant,
        fds: Vec<OwnedFd>,
    ) -> Done<JailInfo> {
        // Step 1.
        let id = VmKey::new(c.uid, c.install, vm).jail_id();
        let object = Object::Jail { id: id.clone(), jail_uid: grant.jail_uid, shape, pid: None };
        let mut entry = LedgerEntry::new(c.uid, c.install.clone(), vm.clone(), object);
        let mut names = jail_names(&entry);
        names.extend(grant.tap.iter().cloned());
        if st.ledger.holds_jail(&id) {
            return Done::new(
                names,
                Err(HelperError::Conflict {
                    what: format!("the jail id {id} is held by another vm; tear that vm down first"),
                }),
            );
        }
        // Step 2.
        entry.state = EntryState::Intent;
        if let Err(e) = st.commit(|l| {
            l.insert(entry.clone());
        }) {
            return Done::new(names, Err(e));
        }
        // Step 3.
        let order = JailOrder {
            id: id.clone(),
            uid: grant.jail_uid,
            caller: c.uid,
            shape,
            user_cgroup: grant.user_cgroup,
            user_limits: UserLimits { vcpus: grant.user_vcpus, mem_mib: grant.user_mem_mib },
            tap: grant.tap,
            files,
        };
        let pid = match self.kernel.jails().launch(&order, fds).await {
            Ok(pid) => pid,
            Err(e) => {
                // The launcher undid what it could, but only logs what it could not: the jail is
                // removed again here and the TAP given to whom a new TAP would be (the launcher
                // gave it to root), and the entry leaves the ledger, freeing the jail uid, only
                // once both succeeded; else the intent stays for teardown and the reconcile.
                match self.remove_jail(&entry, order.tap.as_deref()).await {
                    Ok(()) => {
                        if let Err(saved) = st.commit(|l| {
                            l.remove(c.uid, c.install, vm, ObjectKind::Jail);
                        }) {
                            tracing::error!(
                                "jail {id}: its intent stays in the ledger for the next teardown: {saved}"
                            );
                        }
                    }
                    Err(undo) => tracing::error!(
                        "jail {id}: cannot undo a failed launch ({undo}); its intent, and so its uid, \
                         stays in the ledger for the next teardown"
                    ),
                }
                return Done::new(names, Err(e.into()));
            }
        };
        // Step 4.
        let settled = st.commit(|l| {
            if let Some(e) = l.entries.iter_mut().find(|e| e.is(c.uid, c.install, vm, ObjectKind::Jail))
                && let Object::Jail { pid: p, .. } = &mut e.object
            {
                *p = Some(pid);
                e.state = EntryState::Settled;
            }
        });
        if let Err(e) = settled {
            // Unrecorded, the VMM must not run: kill it and remove the jail; the intent stays
            // for the next teardown if even that fails.
            if let Err(kill) = self.kernel.jails().remove(&id, order.uid, Some(pid)).await {
                tracing::error!(
                    "jail {id}: cannot remove it after the ledger failed ({kill}); teardown will"
                );
            }
            return Done::new(names, Err(e));
        }
        names.push(format!("pid={pid}"));
        let settled = st.ledger.find(c.uid, c.install, vm, ObjectKind::Jail).cloned();
        let result = match settled {
            Some(e) => self.jail_info(&e),
            None => Err(HelperError::internal(format!("the jail of vm {vm} left the ledger"))),
        };
        Done::new(names, result)
    }

    /// Kills the VMM of a jail entry (if it still runs as the jail's uid) and removes the jail,
    /// then takes the VM's TAP (`tap`, from the ledger) back from the jail's uid: it goes to whom
    /// a new TAP would (the caller, or root when the jailer is forced). Until that has happened
    /// the entry, and so the uid, stays held: a uid handed to another VM later never owns a TAP
    /// it could open.
    pub(crate) async fn remove_jail(&self, entry: &LedgerEntry, tap: Option<&str>) -> KResult<()> {
        let Object::Jail { id, jail_uid, pid, .. } = &entry.object else { return Ok(()) };
        self.kernel.jails().remove(id, *jail_uid, *pid).await?;
        match tap {
            Some(tap) => self.kernel.links().set_owner(tap, self.handed_owner(entry.uid)).await,
            None => Ok(()),
        }
    }

    /// `JailKill` of the caller's jail of that VM, if it has one: removed, then forgotten.
    pub(crate) async fn jail_kill(
        &self,
        st: &mut State,
        c: Caller<'_>,
        vm: &VmId,
        entry: Option<LedgerEntry>,
    ) -> Done<TeardownReport> {
        let Some(entry) = entry else {
            return Done::new(vec![], Ok(TeardownReport { torn_down: vec![vm.clone()], failures: vec![] }));
        };
        let names = jail_names(&entry);
        let mut report = TeardownReport::default();
        let tap = jail_tap(&st.ledger, &entry);
        match self.remove_jail(&entry, tap.as_deref()).await {
            Ok(()) => {
                if let Err(e) = st.commit(|l| {
                    l.remove(c.uid, c.install, vm, ObjectKind::Jail);
                }) {
                    return Done::new(names, Err(e));
                }
                report.torn_down.push(vm.clone());
            }
            Err(e) => report.failures.push(TeardownFailure {
                vm: vm.clone(),
                object: describe(&entry),
                error: e.into(),
            }),
        }
        Done::new(names, Ok(report))
    }
}

#[cfg(test)]
mod tests {
    use banger_policy::{EntryState, JailerMode, Object, Peer};
    use banger_protocol::{
        HelperError, JailFiles, JailInfo, Request, Response, TeardownReport, VmShape, jail_paths,
    };
    use nix::errno::Errno;

    use crate::kernel::fake::FAKE_JAIL_BASE;
    use crate::kernel::{FdAccess, UserLimits};
    use crate::names::VmKey;
    use crate::ops::testing::*;

    fn helper(mode: JailerMode) -> TestHelper {
        TestHelper::with_kernel(jail_policy(mode), jail_kernel())
    }

    fn launch(v: &str) -> Request {
        Request::JailLaunch {
            vm: vm(v),
            shape: VmShape { vcpus: 2, mem_mib: 512 },
            files: JailFiles { initrd: false, work: false },
        }
    }

    async fn launched(t: &TestHelper, p: &Peer, v: &str, ino: u64) -> JailInfo {
        match t.req_fds(p, launch(v), jail_fds(&t.kernel, p.uid, ino)).await {
            Response::Jail(info) => info,
            other => panic!("{other:?}"),
        }
    }

    fn kill(v: &str) -> Request {
        Request::JailKill { vm: vm(v) }
    }

    #[tokio::test]
    async fn a_launch_is_ordered_from_derived_and_policy_values_only() {
        let t = helper(JailerMode::Allow);
        let p = t.peer(1000, "home");
        let Response::Tap(tap) = t.req(&p, Request::TapCreate { vm: vm("dev") }).await else { panic!() };
        let info = launched(&t, &p, "dev", 10).await;
        let id = VmKey::new(1000, p.install.as_ref().unwrap(), &vm("dev")).jail_id();
        assert_eq!((info.id.as_str(), info.uid, info.vm.as_str()), (id.as_str(), JAIL_FIRST, "dev"));
        assert_eq!(info.root, format!("{FAKE_JAIL_BASE}/{id}/root"));
        assert_eq!(info.api_socket, format!("{}{}", info.root, jail_paths::API_SOCKET));
        let jail = t.kernel.world().jails[&id].clone();
        assert_eq!(info.pid, jail.pid);
        let o = &jail.order;
        assert_eq!((o.uid, o.caller, o.tap.as_deref()), (JAIL_FIRST, 1000, Some(tap.name.as_str())));
        assert_eq!(o.user_cgroup, "banger/u1000");
        assert_eq!(o.user_limits, UserLimits { vcpus: 32, mem_mib: 32768 });
        assert_eq!(o.shape, VmShape { vcpus: 2, mem_mib: 512 });
        assert_eq!(jail.fds, 2);
        // Settled with its pid; the next jail, of anyone, takes the next uid.
        let l = t.helper.snapshot().await;
        let e = l.entries.iter().find(|e| matches!(e.object, Object::Jail { .. })).unwrap();
        assert_eq!(e.state, EntryState::Settled);
        assert!(matches!(e.object, Object::Jail { pid: Some(_), jail_uid: JAIL_FIRST, .. }));
        let other = launched(&t, &t.peer(1001, "home"), "dev", 20).await;
        assert_eq!(other.uid, JAIL_FIRST + 1);
        // Audited with the derived names.
        let audit = t.audit_lines();
        let rec = audit.iter().find(|r| r.op == "jail-launch").unwrap();
        assert!(
            rec.names.contains(&id) && rec.names.contains(&format!("uid={JAIL_FIRST}")),
            "{:?}",
            rec.names
        );
        // Listed, and a second launch of the vm conflicts.
        let Response::Owned(owned) = t.req(&p, Request::ListOwned).await else { panic!() };
        assert_eq!(owned.jails, vec![info]);
        let r = t.req_fds(&p, launch("dev"), jail_fds(&t.kernel, 1000, 30)).await;
        assert!(matches!(r, Response::Error(HelperError::Conflict { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn a_failed_launch_leaves_nothing_and_frees_the_uid() {
        let t = helper(JailerMode::Allow);
        let p = t.peer(1000, "home");
        let id = VmKey::new(1000, p.install.as_ref().unwrap(), &vm("dev")).jail_id();
        t.kernel.fail("jail_launch", &id, Errno::EIO, 1);
        let r = t.req_fds(&p, launch("dev"), jail_fds(&t.kernel, 1000, 10)).await;
        assert!(matches!(r, Response::Error(HelperError::Kernel { .. })), "{r:?}");
        assert!(t.helper.snapshot().await.entries.is_empty());
        assert!(t.kernel.world().jails.is_empty());
        assert_eq!(launched(&t, &p, "dev", 10).await.uid, JAIL_FIRST, "the uid was given back");
    }

    #[tokio::test]
    async fn a_failed_launch_keeps_the_uid_until_the_jail_is_removed_and_gives_the_tap_back() {
        for (mode, owner) in [(JailerMode::Allow, 1000), (JailerMode::Force, 0)] {
            let t = helper(mode);
            let p = t.peer(1000, "home");
            let Response::Tap(tap) = t.req(&p, Request::TapCreate { vm: vm("dev") }).await else { panic!() };
            // What the launcher does with the TAP of a failed launch: root's.
            t.kernel.world().links.get_mut(&tap.name).unwrap().tap_owner = Some(0);
            let id = VmKey::new(1000, p.install.as_ref().unwrap(), &vm("dev")).jail_id();
            t.kernel.fail("jail_launch", &id, Errno::EIO, 1);
            // The launcher could not remove the jail, nor can the helper now.
            t.kernel.fail("jail_remove", &id, Errno::EBUSY, 1);
            let r = t.req_fds(&p, launch("dev"), jail_fds(&t.kernel, 1000, 10)).await;
            assert!(matches!(r, Response::Error(HelperError::Kernel { .. })), "{r:?}");
            let calls = t.kernel.calls();
            let removal = format!("jail_remove {id} uid={JAIL_FIRST} pid=None");
            assert!(calls.contains(&removal), "{mode:?}: {calls:?}");
            let l = t.helper.snapshot().await;
            assert_eq!(l.jail_uids().into_iter().collect::<Vec<_>>(), vec![JAIL_FIRST], "{mode:?}");
            let e = l.entries.iter().find(|e| matches!(e.object, Object::Jail { .. })).unwrap();
            assert_eq!(e.state, EntryState::Intent);
            // Another VM's jail does not get the held uid.
            assert_eq!(launched(&t, &p, "other", 20).await.uid, JAIL_FIRST + 1, "{mode:?}");
            // Teardown removes it and frees the uid.
            let Response::Teardown(report) = t.req(&p, kill("dev")).await else { panic!() };
            assert_eq!(report.torn_down, vec![vm("dev")], "{mode:?}");
            assert_eq!(t.helper.snapshot().await.jail_uids().len(), 1, "{mode:?}");
            // A failed launch whose removal works gives the TAP to whom a new TAP goes.
            t.kernel.world().links.get_mut(&tap.name).unwrap().tap_owner = Some(0);
            t.kernel.fail("jail_launch", &id, Errno::EIO, 1);
            let r = t.req_fds(&p, launch("dev"), jail_fds(&t.kernel, 1000, 30)).await;
            assert!(matches!(r, Response::Error(HelperError::Kernel { .. })), "{r:?}");
            assert_eq!(t.kernel.world().links[&tap.name].tap_owner, Some(owner), "{mode:?}");
            assert_eq!(t.helper.snapshot().await.jail_uids().len(), 1, "{mode:?}: only the other's");
        }
    }

    #[tokio::test]
    async fn a_launcher_that_dies_takes_jails_out_of_hello_and_refuses_launches() {
        let t = helper(JailerMode::Allow);
        let p = t.peer(1000, "home");
        assert!(t.helper.capabilities().jailer);
        t.kernel.world().jails_available = false;
        assert!(!t.helper.capabilities().jailer, "a dead launcher offers no jails");
        let r = t.req_fds(&p, launch("dev"), jail_fds(&t.kernel, 1000, 10)).await;
        assert!(matches!(r, Response::Error(HelperError::Conflict { .. })), "{r:?}");
        assert!(!t.kernel.calls().iter().any(|c| c.starts_with("jail_launch")));
    }

    #[tokio::test]
    async fn refusals_come_before_anything_is_made() {
        // Without [jailer]; without a launcher; a drive of someone else.
        let t = TestHelper::with_kernel(test_policy(), jail_kernel());
        let p = t.peer(1000, "home");
        let r = t.req_fds(&p, launch("dev"), jail_fds(&t.kernel, 1000, 10)).await;
        assert!(matches!(&r, Response::Error(HelperError::Denied { rule, .. }) if rule == "jailer"), "{r:?}");
        let t = TestHelper::with_policy(jail_policy(JailerMode::Allow));
        assert!(!t.helper.capabilities().jailer, "[jailer], but no launcher");
        let r = t.req_fds(&p, launch("dev"), jail_fds(&t.kernel, 1000, 10)).await;
        assert!(matches!(r, Response::Error(HelperError::Conflict { .. })), "{r:?}");
        let t = helper(JailerMode::Allow);
        let fds = vec![
            backing_fd(&t.kernel, 0, FdAccess::ReadOnly, 1, BASE_BYTES),
            backing_fd(&t.kernel, 1001, FdAccess::ReadWrite, 2, BASE_BYTES),
        ];
        let r = t.req_fds(&p, launch("dev"), fds).await;
        assert!(
            matches!(&r, Response::Error(HelperError::Denied { rule, .. }) if rule == "jail.drive_owner"),
            "{r:?}"
        );
        assert!(!t.kernel.calls().iter().any(|c| c.starts_with("jail_launch")));
        assert!(t.helper.snapshot().await.entries.is_empty());
    }

    #[tokio::test]
    async fn kill_takes_the_tap_back_from_the_jail_uid_before_its_uid_is_free_again() {
        for (mode, owner) in [(JailerMode::Allow, 1000), (JailerMode::Force, 0)] {
            let t = helper(mode);
            let p = t.peer(1000, "home");
            let Response::Tap(tap) = t.req(&p, Request::TapCreate { vm: vm("dev") }).await else { panic!() };
            let info = launched(&t, &p, "dev", 10).await;
            // What the launcher does at launch: the TAP is the jail uid's.
            t.kernel.world().links.get_mut(&tap.name).unwrap().tap_owner = Some(info.uid);
            // Taking it back fails: the jail is gone, but its entry (and so its uid) stays held.
            t.kernel.fail("set_owner", &tap.name, Errno::EBUSY, 1);
            let Response::Teardown(report) = t.req(&p, kill("dev")).await else { panic!() };
            assert_eq!((report.torn_down.len(), report.failures.len()), (0, 1), "{mode:?}");
            assert_eq!(t.helper.snapshot().await.jail_uids().len(), 1, "{mode:?}");
            assert_eq!(t.kernel.world().links[&tap.name].tap_owner, Some(info.uid));
            let Response::Teardown(report) = t.req(&p, kill("dev")).await else { panic!() };
            assert_eq!(report.torn_down, vec![vm("dev")], "{mode:?}");
            assert_eq!(t.kernel.world().links[&tap.name].tap_owner, Some(owner), "{mode:?}");
            assert!(t.helper.snapshot().await.jail_uids().is_empty(), "{mode:?}");
        }
    }

    #[tokio::test]
    async fn kill_removes_the_jail_with_its_recorded_uid_and_pid_and_is_idempotent() {
        let t = helper(JailerMode::Allow);
        let p = t.peer(1000, "home");
        let info = launched(&t, &p, "dev", 10).await;
        // Another user's kill of a vm of the same name touches nothing of this one.
        let r = t.req(&t.peer(1001, "home"), kill("dev")).await;
        assert_eq!(r, Response::Teardown(TeardownReport { torn_down: vec![vm("dev")], failures: vec![] }));
        assert!(t.kernel.world().jails.contains_key(&info.id));
        // A failed kill keeps the entry (and its uid) and reports.
        t.kernel.fail("jail_remove", &info.id, Errno::EIO, 1);
        let Response::Teardown(report) = t.req(&p, kill("dev")).await else { panic!() };
        assert_eq!(report.torn_down, vec![]);
        assert_eq!(report.failures[0].object, format!("jail {}", info.id));
        assert_eq!(t.helper.snapshot().await.jail_uids().len(), 1);
        let Response::Teardown(report) = t.req(&p, kill("dev")).await else { panic!() };
        assert_eq!((report.torn_down, report.failures.len()), (vec![vm("dev")], 0));
        let calls = t.kernel.calls();
        let expected = format!("jail_remove {} uid={} pid={:?}", info.id, info.uid, info.pid);
        assert_eq!(calls.iter().filter(|c| **c == expected).count(), 2, "{calls:?}");
        assert!(t.helper.snapshot().await.entries.is_empty());
        assert!(t.kernel.world().jails.is_empty());
        let Response::Teardown(again) = t.req(&p, kill("dev")).await else { panic!() };
        assert_eq!(again.torn_down, vec![vm("dev")]);
    }

    #[tokio::test]
    async fn teardown_removes_the_jail_first_and_keeps_the_vm_when_it_cannot() {
        let t = helper(JailerMode::Allow);
        let p = t.peer(1000, "home");
        for (v, ino) in [("a", 10), ("b", 20)] {
            assert!(matches!(t.req(&p, Request::TapCreate { vm: vm(v) }).await, Response::Tap(_)));
            launched(&t, &p, v, ino).await;
        }
        let id_b = VmKey::new(1000, p.install.as_ref().unwrap(), &vm("b")).jail_id();
        t.kernel.fail("jail_remove", &id_b, Errno::EBUSY, 1);
        let start = t.kernel.calls().len();
        let Response::Teardown(report) =
            t.req(&p, Request::TeardownVms { vms: vec![vm("a"), vm("b")] }).await
        else {
            panic!()
        };
        assert_eq!(report.torn_down, vec![vm("a")]);
        assert_eq!(report.failures.len(), 1);
        assert_eq!(report.failures[0].object, format!("jail {id_b}"));
        let calls = t.kernel.calls()[start..].to_vec();
        // A jail's removal is its remove and its TAP taken back from the jail's uid.
        let of_jails = |c: &String| c.starts_with("jail_remove") || c.starts_with("set_owner");
        let first_other = calls.iter().position(|c| !of_jails(c)).unwrap();
        assert!(calls[first_other..].iter().all(|c| !of_jails(c)), "jails first: {calls:?}");
        // b keeps its tap and its jail; a has nothing left.
        let l = t.helper.snapshot().await;
        assert_eq!(l.entries.len(), 2, "{:?}", l.entries);
        assert!(l.entries.iter().all(|e| e.vm == vm("b")));
        let Response::Teardown(retry) = t.req(&p, Request::TeardownVms { vms: vec![vm("b")] }).await else {
            panic!()
        };
        assert!(retry.failures.is_empty());
        assert!(t.helper.snapshot().await.entries.is_empty());
    }

    #[tokio::test]
    async fn force_mode_hands_no_tap_and_no_dm_node_to_the_user() {
        let t = helper(JailerMode::Force);
        let p = t.peer(1000, "home");
        let mut q = p.clone();
        q.install = None;
        let hello = t
            .helper
            .hello(
                &mut q,
                banger_protocol::PROTOCOL_VERSION,
                banger_protocol::InstallId::new("home").unwrap(),
            )
            .unwrap();
        assert!(hello.capabilities.jailer && !hello.capabilities.direct);
        let Response::Tap(tap) = t.req(&p, Request::TapCreate { vm: vm("dev") }).await else { panic!() };
        assert_eq!(t.kernel.world().links[&tap.name].tap_owner, Some(0));
        t.attach_disks(&p, "dev", 40).await;
        let Response::Dm(dm) = t.req(&p, Request::DmCreate { vm: vm("dev") }).await else { panic!() };
        assert_eq!(t.kernel.world().nodes[&dm.name].node.uid, 0);
        // Answered again, it stays root's.
        assert!(matches!(t.req(&p, Request::DmCreate { vm: vm("dev") }).await, Response::Dm(_)));
        assert_eq!(t.kernel.world().nodes[&dm.name].node.uid, 0);
        // The jail takes the vm's tap.
        let info = launched(&t, &p, "dev", 10).await;
        assert_eq!(t.kernel.world().jails[&info.id].order.tap.as_deref(), Some(tap.name.as_str()));
        // Allow mode: the caller's, and direct mode is offered.
        let t = helper(JailerMode::Allow);
        assert!(t.helper.capabilities().direct && t.helper.capabilities().jailer);
        let Response::Tap(tap) = t.req(&p, Request::TapCreate { vm: vm("dev") }).await else { panic!() };
        assert_eq!(t.kernel.world().links[&tap.name].tap_owner, Some(1000));
        // No [jailer]: no jails, direct mode.
        let t = TestHelper::with_kernel(test_policy(), jail_kernel());
        assert!(!t.helper.capabilities().jailer && t.helper.capabilities().direct);
    }

    #[tokio::test]
    async fn the_uid_of_a_live_jail_no_entry_holds_is_never_handed_out() {
        let t = helper(JailerMode::Allow);
        let p = t.peer(1000, "home");
        let lost = launched(&t, &p, "lost", 10).await;
        // The ledger lost its entry (an older ledger put back); its VMM runs on.
        t.helper.state.lock().await.ledger.entries.clear();
        let report = t.helper.reconcile().await;
        assert_eq!(report.unknown, vec![format!("jail {}", lost.id)]);
        assert!(t.kernel.world().jails.contains_key(&lost.id), "left alone");
        let next = launched(&t, &t.peer(1001, "home"), "dev", 20).await;
        assert_eq!(next.uid, lost.uid + 1, "the live jail's uid stays out of the pool");
        // Once it no longer runs, the next reconcile removes it and its uid is free again.
        t.kernel.world().jails.get_mut(&lost.id).unwrap().alive = false;
        assert!(t.helper.reconcile().await.errors.is_empty());
        assert!(!t.kernel.world().jails.contains_key(&lost.id));
        assert_eq!(launched(&t, &p, "again", 30).await.uid, lost.uid);
    }

    #[tokio::test]
    async fn reconcile_removes_dead_and_unsettled_jails_and_unheld_directories() {
        let t = helper(JailerMode::Allow);
        let p = t.peer(1000, "home");
        let live = launched(&t, &p, "live", 10).await;
        let dead = launched(&t, &p, "dead", 20).await;
        let gone = launched(&t, &p, "gone", 30).await;
        let unsettled = launched(&t, &p, "unsettled", 40).await;
        {
            let mut w = t.kernel.world();
            w.jails.get_mut(&dead.id).unwrap().alive = false;
            w.jails.remove(&gone.id);
            let mut stray = w.jails[&live.id].clone();
            stray.alive = false;
            w.jails.insert("bg-stray".into(), stray.clone());
            stray.alive = true;
            w.jails.insert("bg-running".into(), stray);
        }
        t.helper.state.lock().await.ledger.entries.iter_mut().for_each(|e| {
            if e.vm == vm("unsettled") {
                e.state = EntryState::Intent;
            }
        });
        let report = t.helper.reconcile().await;
        assert!(report.errors.is_empty(), "{report:?}");
        for id in [&dead.id, &gone.id, &unsettled.id] {
            assert!(report.dropped.contains(&format!("jail {id}")), "{id}: {report:?}");
        }
        assert!(report.dropped.contains(&"jail directory bg-stray".to_owned()), "{report:?}");
        assert_eq!(report.unknown, vec!["jail bg-running".to_owned()]);
        let left: std::collections::BTreeSet<String> = t.kernel.world().jails.keys().cloned().collect();
        assert_eq!(left, ["bg-running".to_owned(), live.id.clone()].into());
        let l = t.helper.snapshot().await;
        assert_eq!(l.jail_uids().into_iter().collect::<Vec<_>>(), vec![live.uid]);
        // A failing removal keeps the entry and is reported.
        t.kernel.world().jails.get_mut(&live.id).unwrap().alive = false;
        t.kernel.fail("jail_remove", &live.id, Errno::EIO, 1);
        let report = t.helper.reconcile().await;
        assert_eq!(report.errors.len(), 1, "{report:?}");
        assert_eq!(t.helper.snapshot().await.jail_uids().len(), 1);
        assert!(t.helper.reconcile().await.errors.is_empty());
        assert!(t.helper.snapshot().await.entries.is_empty());
    }
}
