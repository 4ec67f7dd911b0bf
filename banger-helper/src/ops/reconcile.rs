//! Start-up reconcile: the ledger is checked against the kernel before the first request.
//!
//! - a TAP, NAT rule set or loop device in the ledger that the kernel no longer has leaves the
//!   ledger (a loop device counts as gone when it is free or attached to another file);
//! - a banger-named TAP or tagged rule the ledger does not know is reported in the log, not
//!   touched: the helper never deletes what it cannot prove is its own;
//! - leases stay: they are the uid's for good.

use std::collections::BTreeSet;

use banger_policy::{Object, ObjectKind};

use super::Helper;
use super::loopdev::loop_number;
use crate::kernel::{Firewall as _, Kernel, Links as _, Loops as _};
use crate::names::{VmKey, is_banger_tap_name};

/// What the reconcile found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Ledger entries dropped because their object is gone, as `kind name`.
    pub dropped: Vec<String>,
    /// Banger-looking objects the ledger does not know.
    pub unknown: Vec<String>,
    /// Checks that could not run.
    pub errors: Vec<String>,
}

impl<K: Kernel> Helper<K> {
    /// Checks the ledger against the kernel, drops what is gone and reports what is unknown.
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
        let view = match self.kernel.firewall().read().await {
            Ok(v) => Some(v),
            Err(e) => {
                report.errors.push(format!("cannot read the firewall: {e}"));
                None
            }
        };
        let loops = self.kernel.loops();
        let before = st.stored.ledger.entries.len();
        let mut dropped = Vec::new();
        let mut kept = Vec::new();
        for e in std::mem::take(&mut st.stored.ledger.entries) {
            let key = VmKey::new(e.uid, &e.install, &e.vm);
            let present = match &e.object {
                Object::Tap { name, .. } => links.as_ref().is_none_or(|l| l.contains(name)),
                Object::Nat { .. } => {
                    view.as_ref().is_none_or(|v| v.tagged(&key.rule_tag()).next().is_some())
                }
                Object::Loop { device, .. } => match loop_number(device).map(|n| (n, loops.node(n))) {
                    None => false,
                    // Still the owner's node: still theirs, whatever they did with it.
                    Some((_, Ok(node))) if node.uid == e.uid && e.uid != 0 => true,
                    Some((n, Ok(node))) if node.uid == 0 => match loops.status(n) {
                        Ok(Some(s)) => st
                            .stored
                            .backing_of(&e)
                            .is_some_and(|b| (b.dev, b.ino) == (s.backing_dev, s.backing_ino)),
                        Ok(None) => false,
                        Err(err) => {
                            report.errors.push(format!("cannot read {device}: {err}"));
                            true
                        }
                    },
                    Some((_, Ok(_))) => false,
                    Some((_, Err(err))) if err.errno_value() == Some(nix::errno::Errno::ENOENT) => false,
                    Some((_, Err(err))) => {
                        report.errors.push(format!("cannot stat {device}: {err}"));
                        true
                    }
                },
            };
            if present {
                kept.push(e);
            } else {
                dropped.push(e);
            }
        }
        st.stored.ledger.entries = kept;
        for e in dropped {
            st.stored.remove_entry(&e);
            let what = match &e.object {
                Object::Tap { name, .. } => format!("tap {name}"),
                Object::Nat { guest_ip, .. } => format!("nat {guest_ip}"),
                Object::Loop { device, .. } => format!("loop {device}"),
            };
            tracing::info!(
                "uid {} install {} vm {}: {what} is gone from the kernel; dropped from the ledger",
                e.uid,
                e.install,
                e.vm
            );
            report.dropped.push(what);
        }
        let known_taps: BTreeSet<&str> = st
            .stored
            .ledger
            .entries
            .iter()
            .filter_map(|e| match &e.object {
                Object::Tap { name, .. } => Some(name.as_str()),
                Object::Nat { .. } | Object::Loop { .. } => None,
            })
            .collect();
        for name in
            links.iter().flatten().filter(|n| is_banger_tap_name(n) && !known_taps.contains(n.as_str()))
        {
            tracing::warn!("tap {name} looks like banger's but is not in the ledger; left alone");
            report.unknown.push(format!("tap {name}"));
        }
        if let Some(v) = &view {
            for key in v.vms() {
                let known = st.stored.find(key.uid, &key.install, &key.vm, ObjectKind::Nat).is_some();
                if !known {
                    tracing::warn!(
                        "firewall rules tagged `{}` are not in the ledger; left alone",
                        key.rule_tag()
                    );
                    report.unknown.push(format!("rules {}", key.rule_tag()));
                }
            }
        }
        if st.stored.ledger.entries.len() != before
            && let Err(e) = st.persist()
        {
            report.errors.push(format!("cannot save the reconciled ledger: {e}"));
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use banger_protocol::{LoopRole, Request, Response};

    use crate::kernel::{BackingFile, FdAccess};
    use crate::ops::testing::*;

    #[tokio::test]
    async fn drops_what_is_gone_and_reports_what_is_unknown() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        for v in ["a", "b"] {
            t.req(&p, Request::TapCreate { vm: vm(v) }).await;
            t.req(&p, Request::NatUp { vm: vm(v) }).await;
        }
        let fd: std::os::fd::OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        t.kernel.register_backing(
            std::os::fd::AsFd::as_fd(&fd),
            BackingFile {
                regular: true,
                uid: 1000,
                fs_type: "ext4".into(),
                access: FdAccess::ReadOnly,
                dev: 1,
                ino: 5,
            },
        );
        let r = t
            .req_fds(&p, Request::LoopAttach { vm: vm("a"), role: LoopRole::Base, read_only: true }, vec![fd])
            .await;
        let Response::Loop(l) = r else { panic!("{r:?}") };
        let Response::Owned(owned) = t.req(&p, Request::ListOwned).await else { panic!() };
        let tap_a = owned.taps.iter().find(|x| x.vm == vm("a")).unwrap().name.clone();
        {
            let mut w = t.kernel.world();
            // a's TAP vanished, the loop was released and handed to someone else, b's rules were
            // flushed; a stray TAP appeared.
            w.links.remove(&tap_a);
            w.loops.get_mut(&0).unwrap().node.uid = 1001;
            let tag_b = crate::names::VmKey::new(1000, p.install.as_ref().unwrap(), &vm("b")).rule_tag();
            w.firewall.rules.retain(|r| r.tag() != Some(tag_b.as_str()));
            w.links.insert("bg0000000000000".into(), Default::default());
        }
        let report = t.helper.reconcile().await;
        assert_eq!(report.dropped.len(), 3, "{report:?}");
        assert!(report.dropped.contains(&format!("tap {tap_a}")));
        assert!(report.dropped.contains(&format!("loop {}", l.device)));
        assert_eq!(report.unknown, vec!["tap bg0000000000000".to_owned()]);
        assert!(report.errors.is_empty());
        let snap = t.helper.snapshot().await;
        assert_eq!(snap.ledger.entries.len(), 2, "b's tap and a's nat remain: {:?}", snap.ledger.entries);
        assert!(snap.loop_backings.is_empty());
        // Nothing changes on a second run.
        let again = t.helper.reconcile().await;
        assert!(again.dropped.is_empty());
    }
}
