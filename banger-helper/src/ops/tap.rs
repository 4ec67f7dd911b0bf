//! TAP create.
//!
//! The policy granted either the VM's TAP the ledger holds ([`Helper::tap_existing`]: the same
//! answer again, or made again in its slot when the kernel lost it or it never settled) or a new
//! one in a lease and slot ([`Helper::tap_new`]). Making one, in order:
//!
//! 1. the name `bg` + 13 hex digits is derived from `(uid, install, vm)`; a name the ledger holds
//!    for another VM, or a link of that name that is not the caller's and not held for this VM,
//!    is a conflict (the name alone proves nothing: another key may derive it);
//! 2. the entry is written to the ledger as an intent, with the lease when it is the caller's
//!    first, *before* the kernel is asked: a helper that stops at any point after this leaves a
//!    TAP that the ledger counts and that teardown and the start-up reconcile remove;
//! 3. the TAP is created persistent and owned by the caller (by root when the policy forces the
//!    jailer: the jail's uid takes it at launch), with the flags Firecracker opens it
//!    with; IPv6 is turned off on it unless the policy keeps it; it gets the host address of the
//!    VM's point-to-point subnet, a permanent neighbour entry for the guest's address at the
//!    guest's MAC ([`banger_policy::addr::guest_mac`]), is set up, and gets a `/32` route to the
//!    guest with quick acknowledgements;
//! 4. the entry is settled. A failure after the TAP exists deletes it and takes the entry (and a
//!    lease taken for it) back out.
//!
//! A TAP the ledger holds for the caller's VM stays the caller's, counted and removed by
//! teardown, whatever the kernel says its owner is now: its owner can attach to it and give it
//! away with `TUNSETOWNER`, which must not take it out of the quota.

use banger_policy::{EntryState, LedgerEntry, Object, ObjectKind};
use banger_protocol::{HelperError, TapInfo, VmId};

use super::rollback::Rollback;
use super::{Caller, Done, Helper, State};
use crate::kernel::{Kernel, LinkOwner, Links as _, Sysctl as _};
use crate::names::VmKey;
use crate::sysctl_key::SysctlKey;

impl<K: Kernel> Helper<K> {
    /// The wire form of a recorded TAP.
    pub(crate) fn tap_info(&self, entry: &LedgerEntry) -> Result<TapInfo, HelperError> {
        let Object::Tap { name, host_ip, guest_ip, .. } = &entry.object else {
            return Err(HelperError::internal(format!(
                "the ledger's tap entry of vm {} is not a tap",
                entry.vm
            )));
        };
        Ok(TapInfo {
            install: entry.install.clone(),
            vm: entry.vm.clone(),
            name: name.clone(),
            host_ip: *host_ip,
            guest_ip: *guest_ip,
            prefix_len: self.policy.network.vm_prefix,
            guest_mac: banger_policy::addr::guest_mac(*guest_ip),
        })
    }

    /// `TapCreate` of a VM whose TAP the ledger holds.
    pub(crate) async fn tap_existing(
        &self,
        st: &mut State,
        c: Caller<'_>,
        entry: LedgerEntry,
    ) -> Done<TapInfo> {
        let Object::Tap { name, slot, host_ip, guest_ip } = entry.object.clone() else {
            return Done::new(vec![], self.tap_info(&entry));
        };
        let names = vec![name.clone()];
        let result = async {
            let present = self.kernel.links().owner(&name).await? != LinkOwner::Absent;
            if present && entry.state == EntryState::Settled {
                return self.tap_info(&entry);
            }
            tracing::warn!(
                "tap {name} of uid {} is in the ledger but not in use in the kernel; making it again",
                c.uid
            );
            if present {
                // Held for this very VM: the caller's, whatever the kernel says its owner is now.
                self.delete_link(&name).await?;
            }
            let object = Object::Tap { name: name.clone(), slot, host_ip, guest_ip };
            self.make_tap(st, c, &entry.vm, object, None).await
        }
        .await;
        Done::new(names, result)
    }

    /// `TapCreate` of a new TAP in the granted lease and slot.
    pub(crate) async fn tap_new(
        &self,
        st: &mut State,
        c: Caller<'_>,
        vm: &VmId,
        lease: u32,
        new_lease: bool,
        slot: u32,
    ) -> Done<TapInfo> {
        let name = VmKey::new(c.uid, c.install, vm).tap_name();
        let result = async {
            if st.ledger.holds_tap(&name) {
                return Err(name_taken(&name, "a TAP of another VM"));
            }
            match self.kernel.links().owner(&name).await? {
                LinkOwner::Absent => {}
                // The caller's own TAP that no ledger entry holds (left by a helper of an earlier
                // release that stopped between the two): replacing it touches nobody else's.
                LinkOwner::Uid(u) if u == c.uid => {
                    tracing::warn!("tap {name} of uid {u} exists without a ledger entry; replacing it");
                    self.delete_link(&name).await?;
                }
                LinkOwner::Uid(u) => return Err(name_taken(&name, &format!("a TAP of uid {u}"))),
                LinkOwner::Unowned => return Err(name_taken(&name, "a link the helper did not create")),
            }
            let subnet = self.policy.network.vm_subnet(lease, slot).ok_or_else(|| {
                HelperError::internal(format!(
                    "the policy granted slot {slot} of lease {lease}, outside its pool"
                ))
            })?;
            let object =
                Object::Tap { name: name.clone(), slot, host_ip: subnet.host_ip, guest_ip: subnet.guest_ip };
            self.make_tap(st, c, vm, object, new_lease.then_some(lease)).await
        }
        .await;
        Done::new(vec![name], result)
    }

    async fn delete_link(&self, name: &str) -> Result<(), HelperError> {
        match self.kernel.links().delete(&[name.to_owned()]).await.pop() {
            Some(Err(e)) => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Steps 2 to 4 of the module doc: intent, TAP, settled.
    async fn make_tap(
        &self,
        st: &mut State,
        c: Caller<'_>,
        vm: &VmId,
        object: Object,
        new_lease: Option<u32>,
    ) -> Result<TapInfo, HelperError> {
        let Object::Tap { name, host_ip, guest_ip, .. } = object.clone() else {
            return Err(HelperError::internal("make_tap was given another object"));
        };
        let mut entry = LedgerEntry::new(c.uid, c.install.clone(), vm.clone(), object);
        entry.state = EntryState::Intent;
        st.commit(|l| {
            if let Some(lease) = new_lease {
                l.leases.insert(c.uid, lease);
            }
            l.insert(entry.clone());
        })?;
        let mut undo = Rollback::new(self.kernel.clone());
        let made = self.configure_tap(&mut undo, self.handed_owner(c.uid), &name, host_ip, guest_ip).await;
        let settled = made.and_then(|()| {
            st.commit(|l| {
                if let Some(e) = l.entries.iter_mut().find(|e| e.is(c.uid, c.install, vm, ObjectKind::Tap)) {
                    e.state = EntryState::Settled;
                }
            })
        });
        if let Err(e) = settled {
            undo.undo().await;
            let taken_back = st.commit(|l| {
                l.remove(c.uid, c.install, vm, ObjectKind::Tap);
                if new_lease.is_some() {
                    l.leases.remove(&c.uid);
                }
            });
            if let Err(e) = taken_back {
                tracing::error!("tap {name}: its intent stays in the ledger for the next teardown: {e}");
            }
            return Err(e);
        }
        undo.commit();
        entry.state = EntryState::Settled;
        self.tap_info(&entry)
    }

    /// Step 3: the kernel's part, each step registered with `undo` as soon as it is made.
    async fn configure_tap(
        &self,
        undo: &mut Rollback<K>,
        owner: u32,
        name: &str,
        host_ip: std::net::Ipv4Addr,
        guest_ip: std::net::Ipv4Addr,
    ) -> Result<(), HelperError> {
        let links = self.kernel.links();
        links.create_tap(name, owner).await?;
        undo.link(name.to_owned());
        if !self.policy.network.ipv6 {
            let key = SysctlKey::disable_ipv6(name).map_err(|e| HelperError::internal(e.to_string()))?;
            if self.kernel.sysctl().exists(&key) {
                self.kernel.sysctl().write(&key, "1")?;
            }
        }
        links.add_address(name, host_ip, self.policy.network.vm_prefix).await?;
        // The guest's MAC is fixed by its address: the host never has to ask for it, so its
        // first packet to a guest still booting waits for no address resolution retry.
        links.add_neighbour(name, guest_ip, banger_policy::addr::guest_mac_bytes(guest_ip)).await?;
        links.set_up(name).await?;
        // OpenSSH's server sends its small messages with Nagle's algorithm on: without quick
        // acknowledgements each one after another waits up to 40 ms for the host's.
        links.add_guest_route(name, guest_ip, host_ip).await?;
        Ok(())
    }
}

/// The error for a derived TAP name already taken by `whose`.
fn name_taken(name: &str, whose: &str) -> HelperError {
    HelperError::Conflict {
        what: format!(
            "the interface name {name} derived for this VM is taken by {whose}; use another VM id, or ask the admin to remove that interface"
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use banger_policy::{EntryState, LedgerEntry};
    use banger_protocol::{HelperError, Request, Response};
    use nix::errno::Errno;

    use crate::kernel::fake::FakeKernel;
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
            assert_eq!(link.neighbours, vec![(tap.guest_ip, [0x06, 0x00, 172, 30, 0, 2])]);
            assert_eq!(link.guest_routes, vec![(tap.guest_ip, tap.host_ip)]);
            assert_eq!(tap.guest_mac, "06:00:ac:1e:00:02");
            assert!(link.up);
            assert_eq!(w.sysctls[&format!("net.ipv6.conf.{}.disable_ipv6", tap.name)], "1");
        }
        let ledger = t.helper.snapshot().await;
        assert_eq!(ledger.entries[0].state, EntryState::Settled);
        assert_eq!(ledger.lease_of(1000), Some(0));
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
        for step in ["set_up", "add_guest_route"] {
            let t = TestHelper::new();
            t.kernel.fail(step, "bg", Errno::EIO, 1);
            let p = t.peer(1000, "home");
            let r = t.req(&p, Request::TapCreate { vm: vm("dev") }).await;
            assert!(
                matches!(&r, Response::Error(HelperError::Kernel { op, errno: 5, .. }) if op == step),
                "{step}: {r:?}"
            );
            assert_eq!(t.kernel.world().links.len(), 1, "{step}: only the uplink is left");
            let ledger = t.helper.snapshot().await;
            assert!(ledger.entries.is_empty(), "{step}");
            assert!(ledger.leases.is_empty(), "{step}: the lease taken for it is returned");
            assert!(matches!(t.req(&p, Request::TapCreate { vm: vm("dev") }).await, Response::Tap(_)));
        }
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
        assert!(matches!(
            t.req(&t.peer(1001, "home"), Request::TapCreate { vm: vm("c") }).await,
            Response::Tap(_)
        ));
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
        t.kernel.world().links.get_mut(&name).unwrap().tap_owner = None;
        let r = t.req(&a, Request::TapCreate { vm: vm("dev") }).await;
        assert!(matches!(r, Response::Error(HelperError::Conflict { .. })), "{r:?}");
    }

    /// The owner of a TAP attaches to it and gives it away (`TUNSETOWNER`): it stays theirs in
    /// the ledger, counted against `max_taps`, and teardown removes it.
    #[tokio::test]
    async fn a_tap_given_away_stays_counted_and_goes_with_teardown() {
        let mut policy = test_policy();
        policy.quotas.max_taps = 1;
        let t = TestHelper::with_policy(policy);
        let a = t.peer(1000, "home");
        let Response::Tap(tap) = t.req(&a, Request::TapCreate { vm: vm("dev") }).await else { panic!() };
        t.kernel.world().links.get_mut(&tap.name).unwrap().tap_owner = Some(1001);
        assert_eq!(t.req(&a, Request::TapCreate { vm: vm("dev") }).await, Response::Tap(tap.clone()));
        let r = t.req(&a, Request::TapCreate { vm: vm("more") }).await;
        assert_eq!(r, Response::Error(HelperError::QuotaExceeded { resource: "taps".into(), limit: 1 }));
        let Response::Teardown(report) = t.req(&a, Request::TeardownVms { vms: vec![vm("dev")] }).await
        else {
            panic!()
        };
        assert!(report.failures.is_empty() && report.torn_down == vec![vm("dev")], "{report:?}");
        assert!(!t.kernel.world().links.contains_key(&tap.name));
        assert!(t.helper.snapshot().await.entries.is_empty());
        assert!(matches!(t.req(&a, Request::TapCreate { vm: vm("more") }).await, Response::Tap(_)));
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

    /// A helper killed between creating a TAP and settling it: the intent written before the
    /// kernel call makes the TAP the ledger's, so the next helper removes it (at its start-up
    /// reconcile, or at the VM's teardown) and nothing is left or stuck.
    #[tokio::test]
    async fn a_helper_killed_right_after_creating_a_tap_leaks_nothing() {
        for reconcile_first in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let kernel = Arc::new(FakeKernel::new());
            let p = TestHelper::new().peer(1000, "home");
            let name = derived(1000, "home", "dev");
            let first = open_helper(dir.path(), &kernel);
            kernel.hang_after("create_tap");
            let mut op = Box::pin(first.handle(&p, Request::TapCreate { vm: vm("dev") }, vec![]));
            assert!(tokio::time::timeout(Duration::from_millis(200), &mut op).await.is_err(), "it stops");
            assert!(kernel.world().links.contains_key(&name));
            std::mem::forget(op);
            kill_9((), first, dir.path());

            let second = open_helper(dir.path(), &kernel);
            let ledger = second.snapshot().await;
            assert!(
                matches!(&ledger.entries[..], [LedgerEntry { state: EntryState::Intent, .. }]),
                "{ledger:?}"
            );
            if reconcile_first {
                let report = second.reconcile().await;
                assert_eq!(report.dropped, vec![format!("tap {name}")], "{report:?}");
                assert!(!kernel.world().links.contains_key(&name));
            }
            let Response::Teardown(report) =
                second.handle(&p, Request::TeardownVms { vms: vec![vm("dev")] }, vec![]).await
            else {
                panic!()
            };
            assert!(report.failures.is_empty(), "{report:?}");
            assert!(!kernel.world().links.contains_key(&name), "the tap leaked");
            assert!(second.snapshot().await.entries.is_empty());
            assert!(matches!(
                second.handle(&p, Request::TapCreate { vm: vm("dev") }, vec![]).await,
                Response::Tap(_)
            ));
        }
    }
}
