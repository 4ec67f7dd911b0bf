//! Tearing down several VMs of the caller's install in one request: the one way every object
//! goes.
//!
//! The VMs' jails go first, together ([`super::jail`]): a jailed VMM holds its VM's TAP and
//! drives. A VM whose jail could not be removed keeps everything else as well, and is reported.
//! Then three things run at the same time, because each mostly waits on the kernel: one firewall batch
//! removing the rules of every listed VM (found by their tag), the deletion of their TAPs
//! together, and the release of their disk devices, each VM's on blocking threads of its own so
//! the kernel's waits overlap. A VM's disk devices go in one order: its dm-snapshot target first
//! ([`super::dm::release_dm`]: the node back to root and unlinked, then the target), and only
//! once the kernel has let the target go its loop devices ([`super::loopdev::release_loop`]). A
//! target someone holds open stays, released and counted, and so do its loop devices, untouched
//! (the target holds them anyway); the failure is reported and a later teardown tries again.
//!
//! Which TAP goes:
//!
//! - a TAP the ledger holds for the VM (settled or only intended) is deleted, whatever the kernel
//!   says its owner is now: its owner may have given it away with `TUNSETOWNER`, and it stays
//!   theirs, counted, until it is gone;
//! - a link of the derived name that the ledger does not hold is deleted only when the kernel says
//!   it is the caller's (left by a helper of an earlier release); anyone else's is left alone.
//!
//! Absent objects count as removed; a failure is reported for its object and the rest still goes;
//! what failed stays in the ledger so a retry finds it. A VM is reported torn down when nothing
//! of it failed. A report too large for one answer is cut (failures first), so a VM can then be
//! in neither list: it had failures that did not fit.

use std::collections::BTreeSet;

use banger_policy::{LedgerEntry, Object, ObjectKind};
use banger_protocol::{HelperError, Response, TeardownFailure, TeardownReport, VmId};

use super::dm::release_dm;
use super::list::{CutFrom, fit_lists};
use super::loopdev::{Release, describe, record_release, release_loop};
use super::{Caller, Done, Helper, State};
use crate::kernel::{KResult, Kernel, LinkOwner, Links as _};
use crate::names::VmKey;

impl<K: Kernel> Helper<K> {
    /// Releases one VM's disk devices in order: the dm target, then (once it is gone) the loop
    /// devices, each on a blocking thread. One result per device acted on.
    async fn release_disks(
        &self,
        dm: Option<LedgerEntry>,
        loops: Vec<LedgerEntry>,
    ) -> Result<Vec<(LedgerEntry, KResult<Release>)>, tokio::task::JoinError> {
        let mut results = Vec::new();
        if let Some(entry) = dm {
            let kernel = self.kernel.clone();
            let r = tokio::task::spawn_blocking(move || {
                let r = release_dm(kernel.dm(), &entry);
                (entry, r)
            })
            .await?;
            let gone = matches!(r.1, Ok(Release::Gone));
            results.push(r);
            if !gone {
                return Ok(results);
            }
        }
        let releases = futures::future::join_all(loops.into_iter().map(|e| {
            let kernel = self.kernel.clone();
            tokio::task::spawn_blocking(move || {
                let r = release_loop(kernel.loops(), &e);
                (e, r)
            })
        }));
        for r in releases.await {
            results.push(r?);
        }
        Ok(results)
    }

    /// Removes the jails of `vms` (all at once) before anything else of them: a jailed VMM holds
    /// its VM's TAP and drives. Returns the failures; the jails removed have left the ledger.
    async fn remove_jails(
        &self,
        st: &mut State,
        c: Caller<'_>,
        vms: &[VmId],
        names: &mut Vec<String>,
    ) -> Result<Vec<TeardownFailure>, HelperError> {
        let jails: Vec<LedgerEntry> = vms
            .iter()
            .filter_map(|vm| st.ledger.find(c.uid, c.install, vm, ObjectKind::Jail).cloned())
            .collect();
        let taps: Vec<Option<String>> = jails.iter().map(|e| super::jail::jail_tap(&st.ledger, e)).collect();
        let results = futures::future::join_all(
            jails.iter().zip(&taps).map(|(e, tap)| self.remove_jail(e, tap.as_deref())),
        )
        .await;
        let mut failures = Vec::new();
        let mut gone = Vec::new();
        for (entry, r) in jails.into_iter().zip(results) {
            names.extend(super::jail::jail_names(&entry));
            match r {
                Ok(()) => gone.push(entry.vm),
                Err(e) => failures.push(TeardownFailure {
                    vm: entry.vm.clone(),
                    object: describe(&entry),
                    error: e.into(),
                }),
            }
        }
        st.commit(|l| {
            for vm in &gone {
                l.remove(c.uid, c.install, vm, ObjectKind::Jail);
            }
        })?;
        Ok(failures)
    }

    pub(crate) async fn teardown(&self, st: &mut State, c: Caller<'_>, vms: &[VmId]) -> Done<TeardownReport> {
        let all: Vec<VmId> = vms.iter().cloned().collect::<BTreeSet<_>>().into_iter().collect();
        let mut names = Vec::new();
        // Jails first; a VM whose jail could not be removed keeps everything else too (its VMM
        // may still hold it) and is reported.
        let jail_failures = match self.remove_jails(st, c, &all, &mut names).await {
            Ok(f) => f,
            Err(e) => return Done::new(names, Err(e)),
        };
        let held: BTreeSet<&VmId> = jail_failures.iter().map(|f| &f.vm).collect();
        let vms: Vec<VmId> = all.iter().filter(|vm| !held.contains(vm)).cloned().collect();
        let keys: Vec<VmKey> = vms.iter().map(|vm| VmKey::new(c.uid, c.install, vm)).collect();

        // Which TAPs go, by the rule above.
        let mut taps = Vec::new();
        for (vm, key) in vms.iter().zip(&keys) {
            let held = st.ledger.tap_name(c.uid, c.install, vm).map(str::to_owned);
            let name = held.clone().unwrap_or_else(|| key.tap_name());
            names.push(name.clone());
            let doomed = match held {
                Some(_) => Ok(true),
                None => match self.kernel.links().owner(&name).await {
                    Ok(LinkOwner::Uid(u)) if u == c.uid => Ok(true),
                    Ok(_) => Ok(false),
                    Err(e) => Err(e),
                },
            };
            taps.push((vm.clone(), name, doomed));
        }
        let doomed: Vec<String> =
            taps.iter().filter(|(_, _, d)| matches!(d, Ok(true))).map(|(_, n, _)| n.clone()).collect();
        // Each VM's disk devices: its dm target, if any, and its loop devices.
        let mut disks = Vec::new();
        for vm in &vms {
            let mut dm = None;
            let mut loops = Vec::new();
            for e in st.ledger.entries_of_vm(c.uid, c.install, vm) {
                match &e.object {
                    Object::Dm { name, .. } => {
                        names.push(name.clone());
                        dm = Some(e.clone());
                    }
                    Object::Loop { device, .. } => {
                        names.push(device.clone());
                        loops.push(e.clone());
                    }
                    Object::Tap { .. } | Object::Nat { .. } | Object::Jail { .. } => {}
                }
            }
            if dm.is_some() || !loops.is_empty() {
                disks.push((dm, loops));
            }
        }

        let others = super::nat::ledger_nats(&st.ledger, &keys);
        let firewall = super::nat::take_out(self.kernel.firewall(), &self.policy.network, &others, &keys);
        let links = self.kernel.links().delete(&doomed);
        let storage =
            futures::future::join_all(disks.into_iter().map(|(dm, loops)| self.release_disks(dm, loops)));
        let (fw, link_results, disk_results) = tokio::join!(firewall, links, storage);
        let disk_results = match disk_results.into_iter().collect::<Result<Vec<_>, _>>() {
            Ok(r) => r.into_iter().flatten(),
            Err(e) => {
                return Done::new(
                    names,
                    Err(HelperError::internal(format!("a disk device release failed: {e}"))),
                );
            }
        };

        let mut report = TeardownReport { failures: jail_failures, ..TeardownReport::default() };
        let mut nat_gone = false;
        let (repair, fw) = fw;
        if let Some(e) = repair {
            tracing::warn!(
                "putting back the other VMs' rules failed ({e}); these VMs' rules were taken out alone"
            );
        }
        match fw {
            Ok(()) => nat_gone = true,
            Err(e) => report.failures.extend(keys.iter().map(|key| TeardownFailure {
                vm: key.vm.clone(),
                object: format!("nat {}", key.rule_tag()),
                error: e.clone().into(),
            })),
        }
        let mut link_results = link_results.into_iter();
        let mut taps_gone = Vec::new();
        for (vm, name, doomed) in taps {
            let r = match doomed {
                Ok(true) => link_results.next().unwrap_or(Ok(())),
                Ok(false) => Ok(()),
                Err(e) => Err(e),
            };
            match r {
                Ok(()) => taps_gone.push(vm),
                Err(e) => report.failures.push(TeardownFailure {
                    vm,
                    object: format!("tap {name}"),
                    error: e.into(),
                }),
            }
        }
        let mut released = Vec::new();
        for (entry, r) in disk_results {
            let object = describe(&entry);
            match r {
                Ok(release) => {
                    if release == Release::Held {
                        let what = match &entry.object {
                            Object::Dm { name, .. } => format!(
                                "dm {name} is still open (its VMM may still run): its node is gone, but the target and its loop devices stay counted until it is closed; tear the vm down again then"
                            ),
                            _ => format!(
                                "{object} is detached but held open by someone; it stays counted until the kernel lets it go"
                            ),
                        };
                        let error = HelperError::Conflict { what };
                        report.failures.push(TeardownFailure { vm: entry.vm.clone(), object, error });
                    }
                    released.push((entry, release));
                }
                Err(e) => {
                    report.failures.push(TeardownFailure { vm: entry.vm.clone(), object, error: e.into() })
                }
            }
        }
        let recorded = st.commit(|l| {
            for vm in &vms {
                if nat_gone {
                    l.remove(c.uid, c.install, vm, ObjectKind::Nat);
                }
            }
            for vm in &taps_gone {
                l.remove(c.uid, c.install, vm, ObjectKind::Tap);
            }
            for (entry, release) in &released {
                record_release(l, entry, *release);
            }
        });
        if let Err(e) = recorded {
            return Done::new(names, Err(e));
        }
        if nat_gone {
            self.restore_forwarding(st);
        }
        let failed: BTreeSet<&VmId> = report.failures.iter().map(|f| &f.vm).collect();
        report.torn_down = all.iter().filter(|vm| !failed.contains(vm)).cloned().collect();
        let dropped = fit_lists(
            &mut report,
            CutFrom::InOrder,
            |r| vec![&mut r.failures, &mut r.torn_down],
            |r| Response::Teardown(r.clone()),
        );
        if dropped > 0 {
            tracing::warn!(
                "teardown report for uid {} cut to fit one answer: {dropped} entries left out",
                c.uid
            );
        }
        Done::new(names, Ok(report))
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, OwnedFd};

    use banger_protocol::{LoopRole, Request, Response};
    use nix::errno::Errno;

    use crate::kernel::{BackingFile, FdAccess};
    use crate::ops::testing::*;

    async fn make_vm(t: &TestHelper, p: &banger_policy::Peer, name: &str, ino: u64) {
        assert!(matches!(t.req(p, Request::TapCreate { vm: vm(name) }).await, Response::Tap(_)));
        assert!(matches!(t.req(p, Request::NatUp { vm: vm(name) }).await, Response::Nat(_)));
        let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        t.kernel.register_backing(
            fd.as_fd(),
            BackingFile {
                regular: true,
                uid: p.uid,
                fs_type: "ext4".into(),
                access: FdAccess::ReadOnly,
                id: banger_policy::FileId { dev: 1, ino },
                size: BASE_BYTES,
                rdev: None,
            },
        );
        let r = t
            .req_fds(p, Request::LoopAttach { vm: vm(name), role: LoopRole::Base, read_only: true }, vec![fd])
            .await;
        assert!(matches!(r, Response::Loop(_)), "{r:?}");
    }

    #[tokio::test]
    async fn many_vms_in_one_firewall_batch_and_one_link_call() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        for i in 0..5 {
            make_vm(&t, &p, &format!("vm{i}"), i).await;
        }
        let keep = t.peer(1001, "home");
        make_vm(&t, &keep, "vm0", 100).await;
        let batches = t.kernel.world().firewall_batches;
        let vms = (0..5).map(|i| vm(&format!("vm{i}"))).chain([vm("never-existed")]).collect();
        let Response::Teardown(report) = t.req(&p, Request::TeardownVms { vms }).await else { panic!() };
        assert!(report.failures.is_empty(), "{:?}", report.failures);
        assert_eq!(report.torn_down.len(), 6);
        {
            let w = t.kernel.world();
            assert_eq!(w.firewall_batches, batches + 1);
            assert_eq!(w.calls.iter().filter(|c| c.starts_with("delete_links")).count(), 1);
            assert_eq!(w.links.len(), 2, "uplink and the other user's tap: {:?}", w.links.keys());
            assert_eq!(w.loops.values().filter(|l| l.status.is_some()).count(), 1);
            assert!(!w.firewall.rules.is_empty(), "the other user's rules stay");
        }
        let snap = t.helper.snapshot().await;
        assert!(snap.entries.iter().all(|e| e.uid == 1001));
        // Again: nothing left, all done.
        let Response::Teardown(again) = t.req(&p, Request::TeardownVms { vms: vec![vm("vm1")] }).await else {
            panic!()
        };
        assert_eq!((again.torn_down.len(), again.failures.len()), (1, 0));
    }

    #[tokio::test]
    async fn a_failure_is_reported_and_the_rest_still_goes() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        make_vm(&t, &p, "a", 1).await;
        make_vm(&t, &p, "b", 2).await;
        let tap_a = crate::names::VmKey::new(1000, p.install.as_ref().unwrap(), &vm("a")).tap_name();
        t.kernel.fail("delete_link", &tap_a, Errno::EIO, 1);
        t.kernel.fail("loop_detach", "/dev/loop1", Errno::EIO, 1);
        let Response::Teardown(report) =
            t.req(&p, Request::TeardownVms { vms: vec![vm("a"), vm("b")] }).await
        else {
            panic!()
        };
        assert_eq!(report.torn_down, Vec::<banger_protocol::VmId>::new());
        assert_eq!(report.failures.len(), 2, "{:?}", report.failures);
        assert!(report.failures.iter().any(|f| f.vm == vm("a") && f.object.starts_with("tap")));
        assert!(report.failures.iter().any(|f| f.vm == vm("b") && f.object == "loop /dev/loop1"));
        {
            let w = t.kernel.world();
            assert!(w.firewall.rules.is_empty(), "rules of both went");
            assert!(w.links.contains_key(&tap_a));
            assert!(w.loops.get(&0).is_none_or(|l| l.status.is_none()), "a's loop went");
        }
        // What failed stays in the ledger, so a retry finds it.
        let snap = t.helper.snapshot().await;
        assert_eq!(snap.entries.len(), 2, "{:?}", snap.entries);
        let Response::Teardown(retry) = t.req(&p, Request::TeardownVms { vms: vec![vm("a"), vm("b")] }).await
        else {
            panic!()
        };
        assert!(retry.failures.is_empty());
        assert!(t.helper.snapshot().await.entries.is_empty());
    }

    #[tokio::test]
    async fn a_vms_rules_go_even_when_putting_back_anothers_fails() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        make_vm(&t, &p, "a", 1).await;
        make_vm(&t, &p, "b", 2).await;
        let tag = |v: &str| crate::names::VmKey::new(1000, p.install.as_ref().unwrap(), &vm(v)).rule_tag();
        // b's rules were flushed behind the helper's back, and putting them back fails once.
        t.kernel.world().firewall.rules.retain(|r| r.tag() != Some(tag("b").as_str()));
        t.kernel.fail("firewall_apply", &tag("b"), Errno::EIO, 1);
        let Response::Teardown(report) = t.req(&p, Request::TeardownVms { vms: vec![vm("a")] }).await else {
            panic!()
        };
        assert!(report.failures.is_empty(), "{:?}", report.failures);
        assert_eq!(report.torn_down, vec![vm("a")]);
        assert!(t.kernel.world().firewall.rules.iter().all(|r| r.tag() != Some(tag("a").as_str())));
        // The next change puts b's back.
        let Response::Teardown(_) = t.req(&p, Request::TeardownVms { vms: vec![vm("a")] }).await else {
            panic!()
        };
        assert!(t.kernel.world().firewall.rules.iter().any(|r| r.tag() == Some(tag("b").as_str())));
    }

    #[test]
    fn a_report_too_large_for_one_answer_is_cut_failures_first() {
        use banger_protocol::{HelperError, Response, TeardownFailure, TeardownReport};
        let id = |i: usize| vm(&format!("vm-with-a-rather-long-name-{i:05}"));
        let mut report = TeardownReport {
            torn_down: (0..200).map(id).collect(),
            failures: (0..900)
                .map(|i| TeardownFailure {
                    vm: id(i),
                    object: format!("loop /dev/loop{i}"),
                    error: HelperError::Kernel {
                        op: "LOOP_CLR_FD".into(),
                        errno: 5,
                        detail: "x".repeat(200),
                    },
                })
                .collect(),
        };
        let dropped = crate::ops::list::fit_lists(
            &mut report,
            crate::ops::list::CutFrom::InOrder,
            |r| vec![&mut r.failures, &mut r.torn_down],
            |r| Response::Teardown(r.clone()),
        );
        assert_eq!(dropped, 1100 - report.failures.len() - report.torn_down.len());
        assert_eq!(report.torn_down.len(), 200, "failures go first");
        assert!(crate::ops::list::travels(&Response::Teardown(report)));
    }
}
