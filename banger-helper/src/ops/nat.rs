//! NAT up and down for one VM.
//!
//! Up, in order: the VM's TAP must be in the ledger (its guest address comes from there, never
//! from the client); the uplink is the policy's or the default route's interface; `ip_forward` is
//! turned on; the helper reads its chains, works out the difference to the VM's rules
//! ([`crate::firewall::vm_rules`]) and applies it as one batch — nothing when already in place.
//! Down removes every rule carrying the VM's tag in one batch; nothing there is done.

use banger_policy::{LedgerEntry, Object, Uplink};
use banger_protocol::{HelperError, NatInfo, VmId};

use super::{Caller, Helper, State};
use crate::firewall::{FirewallView, VmRules, apply_to_view, plan_vm_rules, vm_rules};
use crate::kernel::{Firewall as _, Kernel, Links as _, Sysctl as _};
use crate::names::VmKey;
use crate::sysctl_key::SysctlKey;
use banger_policy::ObjectKind;

/// Whether an interface name can go into a rule line as it is.
pub(crate) fn rule_safe_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b'-'))
}

impl<K: Kernel> Helper<K> {
    /// The interface guests' traffic leaves by, checked to be safe in a rule: iptables would read
    /// a trailing `+` as a wildcard, and quotes or `#` would change how a rule line is parsed.
    async fn uplink(&self) -> Result<String, HelperError> {
        let name = self.uplink_name().await?;
        if !rule_safe_ifname(&name) {
            return Err(HelperError::Conflict {
                what: format!(
                    "uplink {name:?} cannot be used in firewall rules (only letters, digits, '_', '.', '@' and '-'); \
                     name another interface in the policy (network.uplink)"
                ),
            });
        }
        Ok(name)
    }

    async fn uplink_name(&self) -> Result<String, HelperError> {
        match &self.policy.network.uplink {
            Uplink::Named(name) => Ok(name.clone()),
            Uplink::Auto => self.kernel.links().default_route_interface().await?.ok_or_else(|| {
                HelperError::Conflict {
                what: "no uplink: there is no IPv4 default route to masquerade through; add one, or name the \
                       interface in the policy (network.uplink)"
                    .into(),
            }
            }),
        }
    }

    /// Turns IPv4 forwarding on in this network namespace (left on afterwards: other users of
    /// the host may rely on it too).
    fn enable_forwarding(&self) -> Result<(), HelperError> {
        let key = SysctlKey::ip_forward();
        let sysctl = self.kernel.sysctl();
        if sysctl.read(&key)? != "1" {
            sysctl.write(&key, "1")?;
        }
        Ok(())
    }

    pub(crate) async fn nat_up(
        &self,
        st: &mut State,
        c: Caller<'_>,
        vm: &VmId,
        names: &mut Vec<String>,
    ) -> Result<NatInfo, HelperError> {
        let key = VmKey::new(c.uid, c.install, vm);
        names.push(key.rule_tag());
        let Some(LedgerEntry { object: Object::Tap { name: tap, host_ip, guest_ip, .. }, .. }) =
            st.stored.find(c.uid, c.install, vm, ObjectKind::Tap).cloned()
        else {
            return Err(HelperError::NotFound {
                what: format!("tap of vm {vm} (install {}); create it before nat-up", c.install),
            });
        };
        let uplink = self.uplink().await?;
        names.push(uplink.clone());
        self.enable_forwarding()?;
        let firewall = self.kernel.firewall();
        let view = firewall.read().await?;
        let wanted = vm_rules(
            &VmRules { key: key.clone(), tap, guest_ip, host_ip, uplink: uplink.clone() },
            &self.policy.network,
        );
        let batch = plan_vm_rules(&view, &[(key.clone(), wanted)], &[]);
        if !batch.is_empty() {
            firewall.apply(&batch).await?;
        }
        let previous = st.stored.remove(c.uid, c.install, vm, ObjectKind::Nat);
        let object = Object::Nat { guest_ip, uplink: uplink.clone() };
        st.stored.insert(LedgerEntry {
            uid: c.uid,
            install: c.install.clone(),
            vm: vm.clone(),
            object: object.clone(),
        });
        if previous.as_ref().map(|p| &p.object) != Some(&object)
            && let Err(e) = st.persist()
        {
            st.stored.remove(c.uid, c.install, vm, ObjectKind::Nat);
            if let Some(p) = previous {
                st.stored.insert(p);
            } else if !batch.is_empty() {
                self.undo_rules(&view, &batch, &key).await;
            }
            return Err(e);
        }
        Ok(NatInfo { install: c.install.clone(), vm: vm.clone(), guest_ip, uplink })
    }

    /// Takes rules just added back out, when they could not be recorded.
    async fn undo_rules(&self, before: &FirewallView, applied: &crate::firewall::FirewallBatch, key: &VmKey) {
        let Ok(after) = apply_to_view(before, applied) else { return };
        let undo = plan_vm_rules(&after, &[], std::slice::from_ref(key));
        if let Err(e) = self.kernel.firewall().apply(&undo).await {
            tracing::error!("rollback: cannot remove the rules of {}: {e}", key.rule_tag());
        }
    }

    pub(crate) async fn nat_down(
        &self,
        st: &mut State,
        c: Caller<'_>,
        vm: &VmId,
        names: &mut Vec<String>,
    ) -> Result<(), HelperError> {
        let key = VmKey::new(c.uid, c.install, vm);
        names.push(key.rule_tag());
        let firewall = self.kernel.firewall();
        let view = firewall.read().await?;
        let batch = plan_vm_rules(&view, &[], std::slice::from_ref(&key));
        if !batch.is_empty() {
            firewall.apply(&batch).await?;
        }
        if st.stored.remove(c.uid, c.install, vm, ObjectKind::Nat).is_some()
            && let Err(e) = st.persist()
        {
            tracing::error!("rules of {} removed but the ledger could not be saved: {e}", key.rule_tag());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use banger_policy::Uplink;
    use banger_protocol::{HelperError, Request, Response};
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
    async fn up_twice_is_one_batch_and_down_twice_is_one_batch() {
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
        assert_eq!(t.req(&p, Request::NatDown { vm: vm("dev") }).await, Response::Done);
        assert_eq!(t.req(&p, Request::NatDown { vm: vm("dev") }).await, Response::Done);
        let w = t.kernel.world();
        assert_eq!(w.firewall_batches, 2);
        assert!(w.firewall.rules.is_empty() && w.firewall.chains.is_empty() && w.firewall.jumps.is_empty());
    }

    #[tokio::test]
    async fn down_never_touches_another_owners_rules() {
        let t = TestHelper::new();
        let a = t.peer(1000, "home");
        let b = t.peer(1001, "home");
        for p in [&a, &b] {
            t.req(p, Request::TapCreate { vm: vm("dev") }).await;
            assert!(matches!(t.req(p, Request::NatUp { vm: vm("dev") }).await, Response::Nat(_)));
        }
        let before = t.kernel.world().firewall.rules.len();
        assert_eq!(t.req(&b, Request::NatDown { vm: vm("dev") }).await, Response::Done);
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
        policy.network.uplink = Uplink::Named("wan0".into());
        let t = TestHelper::with_policy(policy);
        t.kernel.world().default_route = None;
        t.req(&p, Request::TapCreate { vm: vm("dev") }).await;
        let Response::Nat(nat) = t.req(&p, Request::NatUp { vm: vm("dev") }).await else { panic!() };
        assert_eq!(nat.uplink, "wan0");
    }

    #[tokio::test]
    async fn an_uplink_name_that_would_change_a_rule_is_refused() {
        for bad in ["eth+", "we\"ird", "a#b", "-x"] {
            let mut policy = test_policy();
            policy.network.uplink = Uplink::Named(bad.into());
            let t = TestHelper::with_policy(policy);
            let p = t.peer(1000, "home");
            t.req(&p, Request::TapCreate { vm: vm("dev") }).await;
            let r = t.req(&p, Request::NatUp { vm: vm("dev") }).await;
            assert!(matches!(r, Response::Error(HelperError::Conflict { .. })), "{bad}: {r:?}");
            assert_eq!(t.kernel.world().firewall_batches, 0);
        }
        assert!(super::rule_safe_ifname("br-lan.10") && super::rule_safe_ifname("eth0@if5"));
    }

    #[tokio::test]
    async fn a_failed_batch_records_nothing() {
        let t = TestHelper::new();
        let p = t.peer(1000, "home");
        t.req(&p, Request::TapCreate { vm: vm("dev") }).await;
        t.kernel.fail("firewall_apply", "", Errno::EIO, 1);
        let r = t.req(&p, Request::NatUp { vm: vm("dev") }).await;
        assert!(matches!(r, Response::Error(HelperError::Kernel { .. })), "{r:?}");
        assert_eq!(t.helper.snapshot().await.ledger.entries.len(), 1, "only the tap");
        assert!(t.kernel.world().firewall.rules.is_empty());
    }
}
