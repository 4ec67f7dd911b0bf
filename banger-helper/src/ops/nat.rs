//! NAT up for one VM.
//!
//! The policy granted the VM's TAP from the ledger (its guest address comes from there, never
//! from the client). In order: the uplink is the policy's or the interface of the IPv4 default
//! route, which must be an [`IfName`] (the policy's already is); `ip_forward` is turned on
//! ([`super::forwarding`]: put back after the last NAT, and at once if this one fails); the
//! firewall is brought to hold the VM's rules, and those of every other VM whose NAT the ledger
//! holds ([`ledger_nats`]), in one atomic change ([`crate::kernel::Firewall::update`]) — nothing
//! when already in place;
//! the NAT is recorded. The rules go with [`super::teardown`], found by their tag.

use std::net::Ipv4Addr;

use banger_policy::{EntryState, Ledger, LedgerEntry, Network, Object, ObjectKind, Uplink};
use banger_protocol::{HelperError, IfName, NatInfo, VmId};

use super::{Caller, Done, Helper, State};
use crate::firewall::VmRules;
use crate::kernel::{Firewall, KResult, Kernel, KernelError, Links as _};
use crate::names::VmKey;

/// The rules of every VM whose NAT the ledger holds, with its TAP's entry settled and for the
/// same guest address, but `except`'s: each firewall change also puts back what of theirs is
/// missing (a table flushed behind the helper's back), so one VM's change never leaves the
/// others unfiltered.
pub(crate) fn ledger_nats(ledger: &Ledger, except: &[VmKey]) -> Vec<VmRules> {
    ledger
        .entries
        .iter()
        .filter_map(|e| {
            let Object::Nat { guest_ip, uplink } = &e.object else { return None };
            let key = VmKey::new(e.uid, &e.install, &e.vm);
            if except.contains(&key) {
                return None;
            }
            let tap = ledger.find(e.uid, &e.install, &e.vm, ObjectKind::Tap)?;
            if tap.state != EntryState::Settled {
                return None;
            }
            match &tap.object {
                Object::Tap { name, host_ip, guest_ip: tap_guest, .. } if tap_guest == guest_ip => {
                    Some(VmRules {
                        key,
                        tap: name.clone(),
                        guest_ip: *guest_ip,
                        host_ip: *host_ip,
                        uplink: uplink.clone(),
                    })
                }
                _ => None,
            }
        })
        .collect()
}

/// Takes the rules of `down` out of `firewall` while putting back those of `up` (the other VMs'
/// NAT, [`ledger_nats`]), in one change; when that change fails, in a second one `down`'s alone:
/// another VM's trouble never keeps a VM's rules in place. Returns the first change's error when
/// the second one was needed, and the outcome for `down`.
pub(crate) async fn take_out<F: Firewall>(
    firewall: &F,
    net: &Network,
    up: &[VmRules],
    down: &[VmKey],
) -> (Option<KernelError>, KResult<()>) {
    match firewall.update(net, up, down).await {
        Ok(_) => (None, Ok(())),
        Err(first) => (Some(first), firewall.update(net, &[], down).await.map(|_| ())),
    }
}

impl<K: Kernel> Helper<K> {
    /// The interface guests' traffic leaves by.
    async fn uplink(&self) -> Result<IfName, HelperError> {
        let auto = match &self.policy.network.uplink {
            Uplink::Named(name) => return Ok(name.clone()),
            Uplink::Auto => self.kernel.links().default_route_interface().await?,
        };
        let Some(name) = auto else {
            return Err(HelperError::Conflict {
                what:
                    "no uplink: there is no IPv4 default route to masquerade through; add one, or name the \
                       interface in the policy (network.uplink)"
                        .into(),
            });
        };
        IfName::new(name).map_err(|e| HelperError::Conflict {
            what: format!(
                "the default route's interface cannot be used in firewall rules ({e}); name another interface \
                 in the policy (network.uplink)"
            ),
        })
    }

    pub(crate) async fn nat_up(
        &self,
        st: &mut State,
        c: Caller<'_>,
        vm: &VmId,
        tap: String,
        host_ip: Ipv4Addr,
        guest_ip: Ipv4Addr,
    ) -> Done<NatInfo> {
        let key = VmKey::new(c.uid, c.install, vm);
        let mut names = vec![key.rule_tag()];
        let result = async {
            let uplink = self.uplink().await?;
            names.push(uplink.to_string());
            self.enable_forwarding(st)?;
            let firewall = self.kernel.firewall();
            let net = &self.policy.network;
            let rules = VmRules { key: key.clone(), tap, guest_ip, host_ip, uplink: uplink.to_string() };
            let mut up = vec![rules];
            up.extend(ledger_nats(&st.ledger, std::slice::from_ref(&key)));
            let changed = firewall.update(net, &up, &[]).await?;
            let object = Object::Nat { guest_ip, uplink: uplink.to_string() };
            let entry = LedgerEntry::new(c.uid, c.install.clone(), vm.clone(), object);
            let had = st.ledger.find(c.uid, c.install, vm, ObjectKind::Nat).is_some();
            if let Err(e) = st.commit(|l| {
                l.insert(entry);
            }) {
                // Take the rules just added back out: they could not be recorded (unless the
                // ledger already held this VM's NAT, which then stays as it was).
                if changed
                    && !had
                    && let Err(e) = firewall.update(net, &up[1..], std::slice::from_ref(&key)).await
                {
                    tracing::error!("rollback: cannot remove the rules of {}: {e}", key.rule_tag());
                }
                return Err(e);
            }
            Ok(NatInfo { install: c.install.clone(), vm: vm.clone(), guest_ip, uplink: uplink.to_string() })
        }
        .await;
        if result.is_err() {
            self.restore_forwarding(st);
        }
        Done::new(names, result)
    }
}

#[cfg(test)]
mod tests {
    use banger_policy::Uplink;
    use banger_protocol::{HelperError, IfName, Request, Response};
    use nix::errno::Errno;

    use crate::names::VmKey;
    use crate::ops::testing::*;

    #[tokio::test]
    async fn up_needs_the_tap_first() {
        let t = TestHelper::new();
        let r = t.req(&t.peer(1000, "home"), Request::NatUp { vm: vm("dev") }).await;
        assert!(matches!(r, Response::Error(HelperError::NotFound { .. })), "{r:?}");
        assert_eq!(t.kernel.world().firewall_batches, 0);
    }

    #[tokio::test]
    async fn up_twice_is_one_batch_and_teardown_removes_everything() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        let Response::Tap(tap) = t.req(&p, Request::TapCreate { vm: vm("dev") }).await else { panic!() };
        let Response::Nat(nat) = t.req(&p, Request::NatUp { vm: vm("dev") }).await else { panic!() };
        assert_eq!(nat.guest_ip, tap.guest_ip);
        assert_eq!(nat.uplink, "eth0");
        let rules = t.kernel.world().firewall.rules.clone();
        assert!(!rules.is_empty());
        assert_eq!(t.kernel.world().sysctls["net.ipv4.ip_forward"], "1");
        assert_eq!(t.req(&p, Request::NatUp { vm: vm("dev") }).await, Response::Nat(nat));
        assert_eq!(t.kernel.world().firewall_batches, 1);
        assert_eq!(t.kernel.world().firewall.rules, rules);
        for _ in 0..2 {
            let r = t.req(&p, Request::TeardownVms { vms: vec![vm("dev")] }).await;
            assert!(matches!(&r, Response::Teardown(t) if t.failures.is_empty()), "{r:?}");
        }
        let w = t.kernel.world();
        assert_eq!(w.firewall_batches, 2);
        assert!(w.firewall.rules.is_empty() && w.firewall.chains.is_empty() && w.firewall.jumps.is_empty());
    }

    #[tokio::test]
    async fn teardown_never_touches_another_owners_rules() {
        let t = TestHelper::new();
        let a = t.peer(1000, "home");
        let b = t.peer(1001, "home");
        for p in [&a, &b] {
            t.req(p, Request::TapCreate { vm: vm("dev") }).await;
            assert!(matches!(t.req(p, Request::NatUp { vm: vm("dev") }).await, Response::Nat(_)));
        }
        let before = t.kernel.world().firewall.rules.len();
        let r = t.req(&b, Request::TeardownVms { vms: vec![vm("dev")] }).await;
        assert!(matches!(r, Response::Teardown(_)), "{r:?}");
        let w = t.kernel.world();
        assert_eq!(w.firewall.rules.len(), before / 2);
        let tag_a = VmKey::new(1000, &a.install.clone().unwrap(), &vm("dev")).rule_tag();
        assert!(w.firewall.rules.iter().all(|r| r.tag() == Some(tag_a.as_str())));
    }

    #[tokio::test]
    async fn no_default_route_is_a_clear_error_and_a_named_uplink_needs_none() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        t.req(&p, Request::TapCreate { vm: vm("dev") }).await;
        t.kernel.world().default_route = None;
        let r = t.req(&p, Request::NatUp { vm: vm("dev") }).await;
        let Response::Error(HelperError::Conflict { what }) = r else { panic!("{r:?}") };
        assert!(what.contains("default route") && what.contains("network.uplink"), "{what}");

        let mut policy = test_policy();
        policy.network.uplink = Uplink::Named(IfName::new("wan0").unwrap());
        let t = TestHelper::with_policy(policy);
        t.kernel.world().default_route = None;
        t.req(&p, Request::TapCreate { vm: vm("dev") }).await;
        let Response::Nat(nat) = t.req(&p, Request::NatUp { vm: vm("dev") }).await else { panic!() };
        assert_eq!(nat.uplink, "wan0");
    }

    /// A default route through an interface whose name would change a rule line: a conflict
    /// naming it and pointing at `network.uplink` (a policy cannot name such an interface).
    #[tokio::test]
    async fn a_default_route_interface_that_would_change_a_rule_is_refused() {
        for bad in ["eth+", "we\"ird", "a#b", "-x"] {
            let t = TestHelper::new();
            t.kernel.world().default_route = Some(bad.into());
            let p = t.peer(1000, "home");
            t.req(&p, Request::TapCreate { vm: vm("dev") }).await;
            let r = t.req(&p, Request::NatUp { vm: vm("dev") }).await;
            assert!(
                matches!(&r, Response::Error(HelperError::Conflict { what })
                    if what.contains("network.uplink") && what.contains(&format!("{bad:?}"))),
                "{bad}: {r:?}"
            );
            assert_eq!(t.kernel.world().firewall_batches, 0);
        }
    }

    #[tokio::test]
    async fn a_failed_batch_records_nothing() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        t.req(&p, Request::TapCreate { vm: vm("dev") }).await;
        t.kernel.fail("firewall_apply", "", Errno::EIO, 1);
        let r = t.req(&p, Request::NatUp { vm: vm("dev") }).await;
        assert!(matches!(r, Response::Error(HelperError::Kernel { .. })), "{r:?}");
        assert_eq!(t.helper.snapshot().await.entries.len(), 1, "only the tap");
        assert!(t.kernel.world().firewall.rules.is_empty());
    }
}
