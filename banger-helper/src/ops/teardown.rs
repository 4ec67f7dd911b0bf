//! Tearing down several VMs of the caller's install in one request.
//!
//! Three things run at the same time, because each mostly waits on the kernel: one firewall batch
//! removing the rules of every listed VM, the deletion of all their TAPs together, and the
//! release of their loop devices. A TAP is deleted only when the ledger holds it for that VM and
//! the kernel says it belongs to the caller. Absent objects count as removed; a failure is
//! reported for its object and the rest still goes. A VM is reported torn down when nothing of it failed. A report
//! too large for one answer is cut (failures first), so a VM can then be in neither list: it had
//! failures that did not fit.

use std::collections::BTreeSet;

use banger_policy::Object;
use banger_protocol::{HelperError, Response, TeardownFailure, TeardownReport, VmId};

use super::list::{CutFrom, fit_lists};
use super::tap::OwnTap;
use super::{Caller, Helper, State};
use crate::firewall::plan_vm_rules;
use crate::kernel::{Firewall as _, Kernel, Links as _};
use crate::names::VmKey;
use banger_policy::ObjectKind;

impl<K: Kernel> Helper<K> {
    pub(crate) async fn teardown(
        &self,
        st: &mut State,
        c: Caller<'_>,
        vms: &[VmId],
        names: &mut Vec<String>,
    ) -> Result<TeardownReport, HelperError> {
        let vms: Vec<VmId> = vms.iter().cloned().collect::<BTreeSet<_>>().into_iter().collect();
        let keys: Vec<VmKey> = vms.iter().map(|vm| VmKey::new(c.uid, c.install, vm)).collect();
        let taps: Vec<String> = keys.iter().map(VmKey::tap_name).collect();
        names.extend(taps.iter().cloned());

        let firewall = async {
            let view = self.kernel.firewall().read().await?;
            let batch = plan_vm_rules(&view, &[], &keys);
            let affected: BTreeSet<VmKey> = view.vms().into_iter().filter(|k| keys.contains(k)).collect();
            if !batch.is_empty() {
                self.kernel.firewall().apply(&batch).await?;
            }
            Ok::<_, crate::kernel::KernelError>(affected)
        };
        // Only TAPs the ledger holds for these VMs and the kernel says are the caller's.
        let mut tap_checks = Vec::with_capacity(vms.len());
        for (vm, tap) in vms.iter().zip(&taps) {
            tap_checks.push(self.own_tap(st, c, vm, tap).await);
        }
        let doomed: Vec<String> = taps
            .iter()
            .zip(&tap_checks)
            .filter(|(_, check)| matches!(check, Ok(OwnTap::Delete)))
            .map(|(tap, _)| tap.clone())
            .collect();
        let links = self.kernel.links().delete(&doomed);
        let loops = async {
            let mut results = Vec::new();
            for vm in &vms {
                for e in st.stored.ledger.entries_of(c.uid).filter(|e| &e.install == c.install && &e.vm == vm)
                {
                    if let Object::Loop { role, device, .. } = &e.object {
                        results.push((vm.clone(), *role, device.clone(), self.release_loop(st, e)));
                    }
                }
            }
            results
        };
        let (fw, link_results, loop_results) = tokio::join!(firewall, links, loops);

        let mut report = TeardownReport::default();
        match fw {
            Ok(_) => {
                for vm in &vms {
                    st.stored.remove(c.uid, c.install, vm, ObjectKind::Nat);
                }
            }
            Err(e) => {
                for key in &keys {
                    report.failures.push(TeardownFailure {
                        vm: key.vm.clone(),
                        object: format!("nat {}", key.rule_tag()),
                        error: e.to_helper(),
                    });
                }
            }
        }
        let mut link_results = link_results.into_iter();
        for ((vm, tap), check) in vms.iter().zip(&taps).zip(tap_checks) {
            let r = match check {
                Ok(OwnTap::Delete) => link_results.next().unwrap_or(Ok(())),
                Ok(OwnTap::Gone | OwnTap::NotInLedger | OwnTap::NotOurs(_)) => Ok(()),
                Err(e) => Err(e),
            };
            match r {
                Ok(()) => {
                    st.stored.remove(c.uid, c.install, vm, ObjectKind::Tap);
                }
                Err(e) => report.failures.push(TeardownFailure {
                    vm: vm.clone(),
                    object: format!("tap {tap}"),
                    error: e.into(),
                }),
            }
        }
        for (vm, role, device, r) in loop_results {
            names.push(device.clone());
            match r {
                Ok(()) => {
                    st.stored.remove(c.uid, c.install, &vm, ObjectKind::Loop(role));
                }
                Err(error) => {
                    report.failures.push(TeardownFailure { vm, object: format!("loop {device}"), error })
                }
            }
        }
        if let Err(e) = st.persist() {
            tracing::error!("teardown done but the ledger could not be saved: {e}");
        }
        let failed: BTreeSet<&VmId> = report.failures.iter().map(|f| &f.vm).collect();
        report.torn_down = vms.iter().filter(|vm| !failed.contains(vm)).cloned().collect();
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
        Ok(report)
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
                dev: 1,
                ino,
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
        assert!(snap.ledger.entries.iter().all(|e| e.uid == 1001));
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
        assert_eq!(snap.ledger.entries.len(), 2, "{:?}", snap.ledger.entries);
        let Response::Teardown(retry) = t.req(&p, Request::TeardownVms { vms: vec![vm("a"), vm("b")] }).await
        else {
            panic!()
        };
        assert!(retry.failures.is_empty());
        assert!(t.helper.snapshot().await.ledger.entries.is_empty());
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
