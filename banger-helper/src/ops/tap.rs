//! TAP create and delete.
//!
//! Create, in order: find the VM's slot in the caller's lease (or its existing TAP: then the same
//! answer again), create the TAP persistent and owned by the caller with the flags Firecracker
//! opens it with, turn IPv6 off on it unless the policy keeps it, give it the host address of the
//! VM's point-to-point subnet, set it up, and record it. A failure after the TAP exists deletes it.
//!
//! Delete removes only the TAP the ledger holds for the caller's own `(uid, install, vm)`, under
//! the name derived from it, and only while the kernel says it belongs to the caller's uid;
//! absent is done. A derived name proves nothing by itself: another key may derive the same one,
//! so create answers `conflict` rather than replace a link of that name that is not the caller's.

use banger_policy::{LedgerEntry, Object};
use banger_protocol::{HelperError, InstallId, TapInfo, VmId};

use super::rollback::Rollback;
use super::{Caller, Helper, State};
use crate::kernel::{Kernel, KernelError, LinkOwner, Links as _, Sysctl as _};
use crate::names::VmKey;
use crate::sysctl_key::SysctlKey;
use banger_policy::ObjectKind;

impl<K: Kernel> Helper<K> {
    /// The wire form of a recorded TAP.
    pub(crate) fn tap_info(&self, install: &InstallId, vm: &VmId, object: &Object) -> Option<TapInfo> {
        let Object::Tap { name, host_ip, guest_ip, .. } = object else { return None };
        Some(TapInfo {
            install: install.clone(),
            vm: vm.clone(),
            name: name.clone(),
            host_ip: *host_ip,
            guest_ip: *guest_ip,
            prefix_len: self.policy.network.vm_prefix,
            guest_mac: banger_policy::addr::guest_mac(*guest_ip),
        })
    }

    pub(crate) async fn tap_create(
        &self,
        st: &mut State,
        c: Caller<'_>,
        vm: &VmId,
        names: &mut Vec<String>,
    ) -> Result<TapInfo, HelperError> {
        let key = VmKey::new(c.uid, c.install, vm);
        let name = key.tap_name();
        names.push(name.clone());
        let links = self.kernel.links();
        let mut reuse_slot = None;
        if let Some(entry) = st.stored.find(c.uid, c.install, vm, ObjectKind::Tap) {
            let object = entry.object.clone();
            match links.owner(&name).await? {
                LinkOwner::Absent => {}
                LinkOwner::Uid(u) if u == c.uid => {
                    return self
                        .tap_info(c.install, vm, &object)
                        .ok_or_else(|| HelperError::invalid("ledger entry is not a tap"));
                }
                owner => return Err(name_taken(&name, owner)),
            }
            tracing::warn!(
                "tap {name} of uid {} is in the ledger but gone from the kernel; recreating it",
                c.uid
            );
            if let Object::Tap { slot, .. } = object {
                reuse_slot = Some(slot);
            }
            st.stored.remove(c.uid, c.install, vm, ObjectKind::Tap);
        } else {
            let new_vm = !st.stored.ledger.has_vm(c.uid, c.install, vm);
            self.check_quota(st, c, ObjectKind::Tap, new_vm)?;
        }
        let (lease, new_lease) = self.lease_index(st, c)?;
        let net = &self.policy.network;
        let slots = net.slots_per_lease();
        let slot = match reuse_slot {
            Some(s) => s,
            None => st.stored.ledger.free_slot(c.uid, slots).ok_or_else(|| HelperError::QuotaExceeded {
                resource: "VM subnets in the lease".into(),
                limit: slots,
            })?,
        };
        let subnet = net.vm_subnet(lease, slot).ok_or_else(|| HelperError::Conflict {
            what: format!("slot {slot} of lease {lease} is outside the policy's pool"),
        })?;
        match links.owner(&name).await? {
            LinkOwner::Absent => {}
            // The caller's own TAP that no ledger entry holds: left by a crash between its
            // creation and the ledger write. Replacing it touches nobody else's.
            LinkOwner::Uid(u) if u == c.uid && !st.stored.ledger_names_tap(&name) => {
                tracing::warn!(
                    "tap {name} of uid {u} exists without a ledger entry (left by a crash); replacing it"
                );
                if let Some(Err(e)) = links.delete(std::slice::from_ref(&name)).await.pop() {
                    return Err(e.into());
                }
            }
            owner => return Err(name_taken(&name, owner)),
        }

        links.create_tap(&name, c.uid).await?;
        let mut undo = Rollback::new(self.kernel.clone());
        undo.link(name.clone());
        let object =
            Object::Tap { name: name.clone(), slot, host_ip: subnet.host_ip, guest_ip: subnet.guest_ip };
        let configured = async {
            if !net.ipv6 {
                let k = SysctlKey::disable_ipv6(&name).map_err(|e| HelperError::invalid(e.to_string()))?;
                if self.kernel.sysctl().exists(&k) {
                    self.kernel.sysctl().write(&k, "1")?;
                }
            }
            links.add_address(&name, subnet.host_ip, net.vm_prefix).await?;
            links.set_up(&name).await?;
            Ok::<(), HelperError>(())
        }
        .await;
        if let Err(e) = configured {
            undo.undo().await;
            if new_lease {
                st.stored.ledger.leases.remove(&c.uid);
            }
            return Err(e);
        }
        st.stored.insert(LedgerEntry {
            uid: c.uid,
            install: c.install.clone(),
            vm: vm.clone(),
            object: object.clone(),
        });
        if let Err(e) = st.persist() {
            st.stored.remove(c.uid, c.install, vm, ObjectKind::Tap);
            if new_lease {
                st.stored.ledger.leases.remove(&c.uid);
            }
            undo.undo().await;
            return Err(e);
        }
        undo.commit();
        self.tap_info(c.install, vm, &object).ok_or_else(|| HelperError::invalid("not a tap"))
    }

    pub(crate) async fn tap_delete(
        &self,
        st: &mut State,
        c: Caller<'_>,
        vm: &VmId,
        names: &mut Vec<String>,
    ) -> Result<(), HelperError> {
        let name = VmKey::new(c.uid, c.install, vm).tap_name();
        names.push(name.clone());
        match self.own_tap(st, c, vm, &name).await? {
            OwnTap::Delete => {
                if let Some(Err(e)) = self.kernel.links().delete(std::slice::from_ref(&name)).await.pop() {
                    return Err(e.into());
                }
            }
            OwnTap::NotInLedger | OwnTap::Gone | OwnTap::NotOurs(_) => {}
        }
        if st.stored.remove(c.uid, c.install, vm, ObjectKind::Tap).is_some()
            && let Err(e) = st.persist()
        {
            // The TAP is gone; the stale file entry is dropped by the next start-up reconcile.
            tracing::error!("tap {name} deleted but the ledger could not be saved: {e}");
        }
        Ok(())
    }

    /// Whether the TAP `name` derived for the caller's `vm` is the caller's to delete: only when
    /// the ledger holds exactly that name for this `(uid, install, vm)` and the kernel says the
    /// TAP belongs to the uid. A name alone proves nothing (another key may derive it).
    pub(crate) async fn own_tap(
        &self,
        st: &State,
        c: Caller<'_>,
        vm: &VmId,
        name: &str,
    ) -> Result<OwnTap, KernelError> {
        let held = matches!(
            st.stored.find(c.uid, c.install, vm, ObjectKind::Tap),
            Some(LedgerEntry { object: Object::Tap { name: n, .. }, .. }) if n == name
        );
        if !held {
            return Ok(OwnTap::NotInLedger);
        }
        Ok(match self.kernel.links().owner(name).await? {
            LinkOwner::Absent => OwnTap::Gone,
            LinkOwner::Uid(u) if u == c.uid => OwnTap::Delete,
            owner => {
                tracing::warn!(
                    "tap {name} is in the ledger for uid {} but the kernel's link of that name belongs to {owner:?}; left alone",
                    c.uid
                );
                OwnTap::NotOurs(owner)
            }
        })
    }
}

/// What [`Helper::own_tap`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OwnTap {
    /// The caller's: delete it.
    Delete,
    /// In the ledger, gone from the kernel.
    Gone,
    /// The ledger does not hold this name for this VM: not the caller's to delete.
    NotInLedger,
    /// A link of that name exists but does not belong to the caller.
    NotOurs(LinkOwner),
}

/// The error for a derived TAP name already taken by a link that is not the caller's.
fn name_taken(name: &str, owner: LinkOwner) -> HelperError {
    let whose = match owner {
        LinkOwner::Uid(u) => format!("a TAP of uid {u}"),
        LinkOwner::Unowned | LinkOwner::Absent => "a link the helper did not create".to_owned(),
    };
    HelperError::Conflict {
        what: format!(
            "the interface name {name} derived for this VM is taken by {whose}; use another VM id, or ask the admin to remove that interface"
        ),
    }
}

#[cfg(test)]
mod tests {
    use banger_protocol::{HelperError, Request, Response};
    use nix::errno::Errno;

    use crate::ops::testing::*;

    #[tokio::test]
    async fn create_derives_everything_and_is_idempotent() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        let Response::Tap(tap) = t.req(&p, Request::TapCreate { vm: vm("dev") }).await else { panic!() };
        assert_eq!(tap.name.len(), 15);
        assert_eq!(tap.host_ip.to_string(), "172.30.0.1");
        assert_eq!(tap.guest_ip.to_string(), "172.30.0.2");
        assert_eq!(tap.prefix_len, 30);
        {
            let w = t.kernel.world();
            let link = &w.links[&tap.name];
            assert_eq!(link.tap_owner, Some(1000));
            assert_eq!(link.addresses, vec![(tap.host_ip, 30)]);
            assert!(link.up);
            assert_eq!(w.sysctls[&format!("net.ipv6.conf.{}.disable_ipv6", tap.name)], "1");
        }
        let calls_before = t.kernel.calls().len();
        assert_eq!(t.req(&p, Request::TapCreate { vm: vm("dev") }).await, Response::Tap(tap.clone()));
        let new_calls: Vec<String> = t.kernel.calls()[calls_before..].to_vec();
        assert!(!new_calls.iter().any(|c| c.starts_with("create_tap")), "{new_calls:?}");
        // A second VM takes the next slot.
        let Response::Tap(second) = t.req(&p, Request::TapCreate { vm: vm("other") }).await else { panic!() };
        assert_eq!(second.guest_ip.to_string(), "172.30.0.6");
    }

    #[tokio::test]
    async fn ipv6_is_left_alone_when_the_policy_keeps_it() {
        let mut policy = test_policy();
        policy.network.ipv6 = true;
        let t = TestHelper::with_policy(policy);
        let Response::Tap(tap) = t.req(&t.peer(1, "i"), Request::TapCreate { vm: vm("a") }).await else {
            panic!()
        };
        assert!(!t.kernel.world().sysctls.contains_key(&format!("net.ipv6.conf.{}.disable_ipv6", tap.name)));
    }

    #[tokio::test]
    async fn a_failure_after_creation_rolls_back() {
        let t = TestHelper::new();
        t.kernel.fail("set_up", "bg", Errno::EIO, 1);
        let p = t.peer(1000, "home");
        let r = t.req(&p, Request::TapCreate { vm: vm("dev") }).await;
        assert!(
            matches!(&r, Response::Error(HelperError::Kernel { op, errno: 5, .. }) if op == "set_up"),
            "{r:?}"
        );
        {
            let w = t.kernel.world();
            assert_eq!(w.links.len(), 1, "only the uplink is left: {:?}", w.links.keys());
        }
        let snap = t.helper.snapshot().await;
        assert!(snap.ledger.entries.is_empty());
        assert!(snap.ledger.leases.is_empty(), "the lease taken for it is returned");
        // The next attempt works.
        assert!(matches!(t.req(&p, Request::TapCreate { vm: vm("dev") }).await, Response::Tap(_)));
    }

    #[tokio::test]
    async fn a_tap_gone_from_the_kernel_is_recreated_in_its_slot() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        let Response::Tap(a) = t.req(&p, Request::TapCreate { vm: vm("a") }).await else { panic!() };
        let Response::Tap(_) = t.req(&p, Request::TapCreate { vm: vm("b") }).await else { panic!() };
        t.kernel.world().links.remove(&a.name);
        assert_eq!(t.req(&p, Request::TapCreate { vm: vm("a") }).await, Response::Tap(a.clone()));
        assert!(t.kernel.world().links.contains_key(&a.name));
    }

    #[tokio::test]
    async fn quotas_are_enforced() {
        let mut policy = test_policy();
        policy.quotas.max_taps = 2;
        let t = TestHelper::with_policy(policy);
        let p = t.peer(1000, "home");
        for v in ["a", "b"] {
            assert!(matches!(t.req(&p, Request::TapCreate { vm: vm(v) }).await, Response::Tap(_)));
        }
        let r = t.req(&p, Request::TapCreate { vm: vm("c") }).await;
        assert_eq!(r, Response::Error(HelperError::QuotaExceeded { resource: "taps".into(), limit: 2 }));
        // Another user is not affected.
        assert!(matches!(
            t.req(&t.peer(1001, "home"), Request::TapCreate { vm: vm("c") }).await,
            Response::Tap(_)
        ));
    }

    #[tokio::test]
    async fn delete_touches_only_the_callers_own_tap() {
        let t = TestHelper::new();
        let a = t.peer(1000, "home");
        let b = t.peer(1001, "home");
        let Response::Tap(ta) = t.req(&a, Request::TapCreate { vm: vm("dev") }).await else { panic!() };
        // Same VM id from another uid and from another install of the same uid: no effect on a's TAP.
        assert_eq!(t.req(&b, Request::TapDelete { vm: vm("dev") }).await, Response::Done);
        assert_eq!(t.req(&t.peer(1000, "work"), Request::TapDelete { vm: vm("dev") }).await, Response::Done);
        assert!(t.kernel.world().links.contains_key(&ta.name));
        assert_eq!(t.req(&a, Request::TapDelete { vm: vm("dev") }).await, Response::Done);
        assert!(!t.kernel.world().links.contains_key(&ta.name));
        assert!(t.helper.snapshot().await.ledger.entries.is_empty());
        // Absent: done.
        assert_eq!(t.req(&a, Request::TapDelete { vm: vm("dev") }).await, Response::Done);
    }

    fn derived(uid: u32, install: &str, v: &str) -> String {
        crate::names::VmKey::new(uid, &banger_protocol::InstallId::new(install).unwrap(), &vm(v)).tap_name()
    }

    fn link_owned_by(t: &TestHelper, name: &str, uid: u32) {
        t.kernel.world().links.insert(
            name.to_owned(),
            crate::kernel::fake::FakeLink { tap_owner: Some(uid), ..Default::default() },
        );
    }

    /// Another key deriving the same name (a second preimage): its TAP is never replaced or
    /// deleted by the caller, whose requests answer conflict or leave it alone.
    #[tokio::test]
    async fn a_link_of_the_derived_name_that_is_not_the_callers_is_never_touched() {
        let t = TestHelper::new();
        let a = t.peer(1000, "home");
        let name = derived(1000, "home", "dev");
        link_owned_by(&t, &name, 1001);
        let r = t.req(&a, Request::TapCreate { vm: vm("dev") }).await;
        assert!(
            matches!(&r, Response::Error(HelperError::Conflict { what }) if what.contains(&name) && what.contains("1001")),
            "{r:?}"
        );
        assert_eq!(t.req(&a, Request::TapDelete { vm: vm("dev") }).await, Response::Done);
        let Response::Teardown(report) = t.req(&a, Request::TeardownVms { vms: vec![vm("dev")] }).await
        else {
            panic!()
        };
        assert!(report.failures.is_empty(), "{report:?}");
        assert_eq!(t.kernel.world().links[&name].tap_owner, Some(1001), "another owner's tap was touched");
        let calls = t.kernel.calls();
        assert!(
            !calls.iter().any(|c| c.starts_with("delete_link ") || c.starts_with("create_tap")),
            "{calls:?}"
        );
        // A link the helper did not create (no owner) is not replaced either.
        t.kernel.world().links.get_mut(&name).unwrap().tap_owner = None;
        let r = t.req(&a, Request::TapCreate { vm: vm("dev") }).await;
        assert!(matches!(r, Response::Error(HelperError::Conflict { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn a_ledger_entry_whose_link_changed_hands_is_dropped_without_deleting_it() {
        let t = TestHelper::new();
        let a = t.peer(1000, "home");
        let Response::Tap(tap) = t.req(&a, Request::TapCreate { vm: vm("dev") }).await else { panic!() };
        t.kernel.world().links.get_mut(&tap.name).unwrap().tap_owner = Some(1001);
        let r = t.req(&a, Request::TapCreate { vm: vm("dev") }).await;
        assert!(matches!(r, Response::Error(HelperError::Conflict { .. })), "{r:?}");
        assert_eq!(t.req(&a, Request::TapDelete { vm: vm("dev") }).await, Response::Done);
        assert!(t.kernel.world().links.contains_key(&tap.name));
        assert!(t.helper.snapshot().await.ledger.entries.is_empty());
    }

    #[tokio::test]
    async fn the_callers_own_leftover_without_a_ledger_entry_is_replaced() {
        let t = TestHelper::new();
        let a = t.peer(1000, "home");
        let name = derived(1000, "home", "dev");
        link_owned_by(&t, &name, 1000);
        let Response::Tap(tap) = t.req(&a, Request::TapCreate { vm: vm("dev") }).await else { panic!() };
        assert_eq!(tap.name, name);
        let calls = t.kernel.calls();
        let del = calls.iter().position(|c| c == &format!("delete_link {name}")).unwrap();
        let create = calls.iter().position(|c| c == &format!("create_tap {name}")).unwrap();
        assert!(del < create, "{calls:?}");
    }
}
