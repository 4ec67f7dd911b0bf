//! Start-up reconcile: the ledger is checked against the kernel before the first request, with
//! the rules teardown follows.
//!
//! - jails before anything else (a VMM holds its TAP and drives), against the jails under the
//!   chroot base ([`crate::kernel::Jails::list`]): a settled entry stays while its jail is there
//!   and its VMM runs; an intent, or an entry whose VMM or jail is gone, is removed
//!   ([`crate::kernel::Jails::remove`] with its uid and PID) and leaves the ledger once that
//!   succeeded; a jail the ledger does not hold is removed when nothing runs in it (no process to
//!   kill: only its directory and cgroups), and reported, not touched, while something does;
//! - dm entries next: a settled one stays while its target is there with its uuid (the node is
//!   left as it is); one whose target is gone (or holds another uuid) leaves the ledger, its node
//!   taken back and unlinked; an intent or a released one is released
//!   ([`super::dm::release_dm`]: node, then target) and leaves the ledger once the kernel has let
//!   the target go;
//! - a TAP the ledger holds as an intent (a helper stopped between the ledger write and
//!   settling it) is deleted, whatever the kernel says its owner is, and then leaves the ledger;
//!   a settled TAP stays while its link exists, whatever its owner;
//! - a loop entry stays while its device holds the recorded file and is settled; an intent or a
//!   released entry is released ([`super::loopdev::release_loop`]: detached, removed) and leaves
//!   the ledger once the kernel has let the device go; an entry whose device is gone or holds
//!   another file leaves the ledger;
//! - first NAT: the firewall is brought to hold the rules of every VM whose NAT entry's TAP is
//!   settled, for the same guest address, and there (put back if the firewall was flushed while
//!   the helper was down; written from this helper's policy) and none of the others', whose NAT
//!   entries then leave the ledger;
//! - a banger-named TAP or dm target, or a tagged rule, that the ledger does not know is reported
//!   in the log, not touched: the helper never deletes what it cannot prove is its own;
//! - a node in the node directory that no dm entry names is taken back and unlinked: that
//!   directory is the helper's alone, so whatever is in it is a node the helper made, and a node
//!   left there could name a device number the kernel hands out again;
//! - leases stay: they are the uid's for good;
//! - with no NAT left, `net.ipv4.ip_forward` goes back to the value it had before the helper
//!   turned it on, if it did ([`super::forwarding`]).

use std::collections::BTreeSet;

use banger_policy::{EntryState, LedgerEntry, Object, ObjectKind};

use super::Helper;
use super::dm::release_dm;
use super::loopdev::{Release, describe, loop_number, record_release, release_loop};
use crate::kernel::{Dm as _, Firewall as _, Jails as _, Kernel, Links as _, Loops as _};
use crate::names::{VmKey, is_banger_dm_name, is_banger_tap_name};

/// What the reconcile found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Ledger entries dropped because their object is gone (or was removed), as `kind name`.
    pub dropped: Vec<String>,
    /// Banger-looking objects the ledger does not know.
    pub unknown: Vec<String>,
    /// Checks that could not run.
    pub errors: Vec<String>,
}

impl<K: Kernel> Helper<K> {
    /// Checks the ledger against the kernel, removes what never settled, drops what is gone and
    /// reports what is unknown.
    pub async fn reconcile(&self) -> ReconcileReport {
        let mut st = self.state.lock().await;
        let mut report = ReconcileReport::default();
        let links = match self.kernel.links().list().await {
            Ok(l) => Some(l.into_iter().collect::<BTreeSet<String>>()),
            Err(e) => {
                report.errors.push(format!("cannot list links: {e}"));
                None
            }
        };
        let loops = self.kernel.loops();
        let dm = self.kernel.dm();
        // What releasing each entry came to: gone from the kernel, or held there.
        let mut released: Vec<(LedgerEntry, Release)> = Vec::new();
        // NAT: each VM's rules are put back where its TAP is there (the firewall may have been
        // flushed while the helper was down), written from this helper's policy; a VM whose TAP
        // is gone (or never settled) loses its rules, and then its entry.
        let nat_rules = super::nat::ledger_nats(&st.ledger, &[]);
        let (mut live, mut gone) = (Vec::new(), Vec::new());
        for e in st.ledger.entries.iter().filter(|e| e.kind() == ObjectKind::Nat) {
            let key = VmKey::new(e.uid, &e.install, &e.vm);
            match nat_rules.iter().find(|r| r.key == key) {
                Some(r) if links.as_ref().is_none_or(|l| l.contains(&r.tap)) => live.push(r.clone()),
                _ => gone.push((key, e.clone())),
            }
        }
        let gone_keys: Vec<VmKey> = gone.iter().map(|(k, _)| k.clone()).collect();
        let firewall = self.kernel.firewall();
        let net = &self.policy.network;
        let (first, updated) = super::nat::take_out(firewall, net, &live, &gone_keys).await;
        if let Some(e) = first {
            report.errors.push(format!("cannot bring the firewall to the ledger's NAT: {e}"));
        }
        match updated {
            Ok(()) => released.extend(gone.into_iter().map(|(_, e)| (e, Release::Gone))),
            Err(e) => report.errors.push(format!("cannot remove the rules of VMs whose TAP is gone: {e}")),
        }
        // NAT kept needs forwarding, which may have been turned off meanwhile.
        if !live.is_empty()
            && let Err(e) = self.enable_forwarding(&mut st)
        {
            report.errors.push(format!("cannot turn net.ipv4.ip_forward on for the VMs' NAT: {e}"));
        }
        let with_rules = match self.kernel.firewall().vms().await {
            Ok(v) => Some(v),
            Err(e) => {
                report.errors.push(format!("cannot read the firewall: {e}"));
                None
            }
        };
        // Jails before anything else: a VMM holds its TAP and drives.
        let jails = match self.kernel.jails().list() {
            Ok(j) => Some(j),
            Err(e) => {
                report.errors.push(format!("cannot list jails: {e}"));
                None
            }
        };
        if let Some(jails) = &jails {
            for e in st.ledger.entries.iter().filter(|e| e.kind() == ObjectKind::Jail) {
                let Object::Jail { id, .. } = &e.object else { continue };
                let found = jails.iter().find(|j| j.id == *id);
                if e.state == EntryState::Settled && found.is_some_and(|j| j.alive) {
                    continue;
                }
                // Never settled, its VMM is gone, or the jail is: removed (a jail already gone
                // counts as removed), then dropped.
                match self.remove_jail(e, super::jail::jail_tap(&st.ledger, e).as_deref()).await {
                    Ok(()) => released.push((e.clone(), Release::Gone)),
                    Err(err) => report.errors.push(format!("cannot remove jail {id}: {err}")),
                }
            }
            // A live jail no entry holds keeps its uid out of the pool: another VM given it
            // could reach that VMM's files and process.
            let unheld: Vec<_> = jails.iter().filter(|j| !st.ledger.holds_jail(&j.id)).collect();
            st.ledger.unheld_jail_uids = unheld.iter().filter(|j| j.alive).filter_map(|j| j.uid).collect();
            for j in unheld {
                if j.alive {
                    tracing::warn!("jail {} is not in the ledger but its VMM runs; left alone", j.id);
                    report.unknown.push(format!("jail {}", j.id));
                    continue;
                }
                // No process to kill (`None`, and none runs as its uid): only the directory, its
                // ACL entries and cgroups of a jail no entry holds, which only the helper makes
                // under its chroot base; uid 0 when its jailer never gave it one.
                match self.kernel.jails().remove(&j.id, j.uid.unwrap_or(0), None).await {
                    Ok(()) => {
                        tracing::info!("jail {} named no entry of the ledger and ran nothing; removed", j.id);
                        report.dropped.push(format!("jail directory {}", j.id));
                    }
                    Err(err) => report.errors.push(format!("cannot remove jail {}: {err}", j.id)),
                }
            }
        }
        // dm entries first: a target holds its loop devices.
        let mut entries = st.ledger.entries.clone();
        entries.sort_by_key(|e| e.kind() != ObjectKind::Dm);
        for e in entries {
            match &e.object {
                Object::Jail { .. } | Object::Nat { .. } => {}
                Object::Tap { name, .. } if e.state != EntryState::Settled => {
                    match self.kernel.links().delete(std::slice::from_ref(name)).await.pop() {
                        Some(Err(err)) => {
                            report.errors.push(format!("cannot delete unsettled tap {name}: {err}"))
                        }
                        _ => released.push((e, Release::Gone)),
                    }
                }
                Object::Tap { name, .. } => {
                    if links.as_ref().is_some_and(|l| !l.contains(name)) {
                        released.push((e, Release::Gone));
                    }
                }
                Object::Dm { name, uuid, .. } => {
                    let live = match dm.info(name) {
                        Ok(status) => Ok(status.is_some_and(|s| s.uuid == *uuid)),
                        Err(err) => Err(err),
                    };
                    let release = match live {
                        Ok(true) if e.state == EntryState::Settled => continue,
                        // Gone from the kernel: only its node may be left.
                        Ok(false) if e.state == EntryState::Settled => {
                            dm.release_node(name).map(|()| Release::Gone)
                        }
                        Ok(_) => release_dm(dm, &e),
                        Err(err) => {
                            report.errors.push(format!("cannot read dm {name}: {err}"));
                            continue;
                        }
                    };
                    match release {
                        Ok(release) => released.push((e, release)),
                        Err(err) => report.errors.push(format!("cannot release dm {name}: {err}")),
                    }
                }
                Object::Loop { device, backing, .. } => {
                    let in_use = match loop_number(device).map(|n| loops.status(n)) {
                        None => Ok(false),
                        Some(Ok(status)) => Ok(status
                            .is_some_and(|s| (s.backing_dev, s.backing_ino) == (backing.dev, backing.ino))),
                        Some(Err(err)) => Err(err),
                    };
                    match in_use {
                        Ok(true) if e.state == EntryState::Settled => {}
                        Ok(_) => match release_loop(loops, &e) {
                            Ok(release) => released.push((e, release)),
                            Err(err) => report.errors.push(format!("cannot release {device}: {err}")),
                        },
                        Err(err) => report.errors.push(format!("cannot read {device}: {err}")),
                    }
                }
            }
        }
        for (e, _) in released.iter().filter(|(_, r)| *r == Release::Gone) {
            tracing::info!(
                "uid {} install {} vm {}: {} is gone from the kernel (or never settled and was removed); dropped from the ledger",
                e.uid,
                e.install,
                e.vm,
                describe(e)
            );
            report.dropped.push(describe(e));
        }
        let committed = st.commit(|l| {
            for (e, release) in &released {
                record_release(l, e, *release);
            }
        });
        if let Err(e) = committed {
            report.errors.push(format!("cannot save the reconciled ledger: {e}"));
        }
        for name in links.iter().flatten().filter(|n| is_banger_tap_name(n) && !st.ledger.holds_tap(n)) {
            tracing::warn!("tap {name} looks like banger's but is not in the ledger; left alone");
            report.unknown.push(format!("tap {name}"));
        }
        match dm.list() {
            Ok(targets) => {
                for name in targets.iter().filter(|n| is_banger_dm_name(n) && !st.ledger.holds_dm(n)) {
                    tracing::warn!("dm {name} looks like banger's but is not in the ledger; left alone");
                    report.unknown.push(format!("dm {name}"));
                }
            }
            Err(e) => report.errors.push(format!("cannot list dm targets: {e}")),
        }
        match dm.nodes() {
            Ok(nodes) => {
                for name in nodes.iter().filter(|n| !st.ledger.holds_dm(n)) {
                    match dm.release_node(name) {
                        Ok(()) => {
                            tracing::info!(
                                "node {} named no target of the ledger; removed",
                                dm.node_path(name)
                            );
                            report.dropped.push(format!("node {}", dm.node_path(name)));
                        }
                        Err(e) => {
                            report.errors.push(format!("cannot remove node {}: {e}", dm.node_path(name)))
                        }
                    }
                }
            }
            Err(e) => report.errors.push(format!("cannot list the node directory: {e}")),
        }
        if let Some(v) = &with_rules {
            for key in v {
                if st.ledger.find(key.uid, &key.install, &key.vm, ObjectKind::Nat).is_none() {
                    tracing::warn!(
                        "firewall rules tagged `{}` are not in the ledger; left alone",
                        key.rule_tag()
                    );
                    report.unknown.push(format!("rules {}", key.rule_tag()));
                }
            }
        }
        self.restore_forwarding(&mut st);
        report
    }
}

#[cfg(test)]
mod tests {
    use banger_policy::{EntryState, FileId};
    use banger_protocol::{LoopRole, Request, Response};

    use crate::kernel::{BackingFile, FdAccess};
    use crate::ops::testing::*;

    #[tokio::test]
    async fn drops_what_is_gone_removes_what_never_settled_and_reports_what_is_unknown() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        for v in ["a", "b", "c"] {
            t.req(&p, Request::TapCreate { vm: vm(v) }).await;
            t.req(&p, Request::NatUp { vm: vm(v) }).await;
        }
        let fd: std::os::fd::OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let id = FileId { dev: 1, ino: 5 };
        let file = BackingFile {
            regular: true,
            uid: 1000,
            fs_type: "ext4".into(),
            access: FdAccess::ReadOnly,
            id,
            size: 1,
            rdev: None,
        };
        t.kernel.register_backing(std::os::fd::AsFd::as_fd(&fd), file);
        let r = t
            .req_fds(&p, Request::LoopAttach { vm: vm("a"), role: LoopRole::Base, read_only: true }, vec![fd])
            .await;
        let Response::Loop(l) = r else { panic!("{r:?}") };
        let Response::Owned(owned) = t.req(&p, Request::ListOwned).await else { panic!() };
        let tap = |v: &str| owned.taps.iter().find(|x| x.vm == vm(v)).unwrap().name.clone();
        {
            let mut w = t.kernel.world();
            // a's TAP vanished; the loop device now holds another file; b's rules were flushed
            // (its TAP is there: they come back); c's TAP was given away (it stays the
            // ledger's); a stray banger-named TAP appeared.
            w.links.remove(&tap("a"));
            w.loops.get_mut(&0).unwrap().status.as_mut().unwrap().backing_ino = 99;
            let tag_b = crate::names::VmKey::new(1000, p.install.as_ref().unwrap(), &vm("b")).rule_tag();
            w.firewall.rules.retain(|r| r.tag() != Some(tag_b.as_str()));
            w.links.get_mut(&tap("c")).unwrap().tap_owner = Some(1001);
            w.links.insert("bg0000000000000".into(), Default::default());
        }
        let tag = |v: &str| crate::names::VmKey::new(1000, p.install.as_ref().unwrap(), &vm(v)).rule_tag();
        let report = t.helper.reconcile().await;
        assert_eq!(report.dropped.len(), 3, "{report:?}");
        assert!(report.dropped.contains(&format!("tap {}", tap("a"))));
        assert!(report.dropped.contains(&"nat 172.30.0.2".to_owned()), "a's guest address: {report:?}");
        assert!(report.dropped.contains(&format!("loop {}", l.device)));
        let rules = t.kernel.world().firewall.rules.clone();
        assert!(rules.iter().any(|r| r.tag() == Some(tag("b").as_str())), "b's rules are back");
        assert!(rules.iter().all(|r| r.tag() != Some(tag("a").as_str())), "a's rules went with its TAP");
        assert_eq!(report.unknown, vec!["tap bg0000000000000".to_owned()]);
        assert!(report.errors.is_empty());
        assert!(t.kernel.world().loops[&0].status.is_some(), "a device holding another file was touched");
        let ledger = t.helper.snapshot().await;
        assert_eq!(ledger.entries.len(), 4, "b's and c's taps and nat: {:?}", ledger.entries);
        assert!(t.kernel.world().links.contains_key(&tap("c")));
        // An intent that never settled: its TAP is removed, whoever the kernel says owns it, and
        // its NAT goes with it.
        t.helper.state.lock().await.ledger.entries.iter_mut().for_each(|e| {
            if e.vm == vm("c") && matches!(e.object, banger_policy::Object::Tap { .. }) {
                e.state = EntryState::Intent;
            }
        });
        let again = t.helper.reconcile().await;
        assert_eq!(
            again.dropped,
            vec!["nat 172.30.0.10".to_owned(), format!("tap {}", tap("c"))],
            "{again:?}"
        );
        assert!(t.kernel.world().firewall.rules.iter().all(|r| r.tag() != Some(tag("c").as_str())));
        assert!(!t.kernel.world().links.contains_key(&tap("c")));
        assert!(t.helper.reconcile().await.dropped.is_empty(), "nothing changes on a third run");
    }
}
