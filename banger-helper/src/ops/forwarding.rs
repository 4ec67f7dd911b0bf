//! `net.ipv4.ip_forward`: on while the helper has a NAT, back to its earlier value after.
//!
//! NAT needs IPv4 forwarding. When it is off, the helper records (durably, before changing
//! anything: [`super::State::set_forwarding`]) the value it had, then turns it on. When the last
//! NAT of any user goes (a teardown, or the start-up reconcile finding none left) and the helper
//! had turned it on, the earlier value is written back and the record removed, unless someone
//! else changed the value meanwhile (it is then no longer `1`, and left as it is). Forwarding that
//! was on already is never touched: the host may need it for something else.

use banger_policy::ObjectKind;
use banger_protocol::HelperError;

use super::{Helper, State};
use crate::kernel::{Kernel, Sysctl as _};
use crate::sysctl_key::SysctlKey;

impl<K: Kernel> Helper<K> {
    /// Turns IPv4 forwarding on in this network namespace, recording first what it was.
    pub(crate) fn enable_forwarding(&self, st: &mut State) -> Result<(), HelperError> {
        let key = SysctlKey::ip_forward();
        let sysctl = self.kernel.sysctl();
        let now = sysctl.read(&key)?;
        if now == "1" {
            return Ok(());
        }
        if st.forwarding.is_none() {
            st.set_forwarding(Some(now))?;
        }
        sysctl.write(&key, "1")?;
        Ok(())
    }

    /// Puts `ip_forward` back to its earlier value if the helper turned it on and no NAT is left
    /// in the ledger. Never fails the request it ends: what cannot be done is logged, and the
    /// record kept for the next time.
    pub(crate) fn restore_forwarding(&self, st: &mut State) {
        let Some(earlier) = st.forwarding.clone() else { return };
        if st.ledger.entries.iter().any(|e| e.kind() == ObjectKind::Nat) {
            return;
        }
        let key = SysctlKey::ip_forward();
        let sysctl = self.kernel.sysctl();
        match sysctl.read(&key) {
            Ok(now) if now == "1" => {
                if let Err(e) = sysctl.write(&key, &earlier) {
                    tracing::error!("cannot put net.ipv4.ip_forward back to {earlier}: {e}");
                    return;
                }
                tracing::info!("the last NAT is gone: net.ipv4.ip_forward is {earlier} again, as before");
            }
            Ok(now) => tracing::info!(
                "net.ipv4.ip_forward was changed to {now} by someone else since the helper turned it on; left so"
            ),
            Err(e) => {
                tracing::error!("cannot read net.ipv4.ip_forward to put it back: {e}");
                return;
            }
        }
        if let Err(e) = st.set_forwarding(None) {
            tracing::error!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use banger_protocol::{Request, Response};
    use nix::errno::Errno;

    use crate::ops::testing::*;

    fn forward(t: &TestHelper) -> String {
        t.kernel.world().sysctls["net.ipv4.ip_forward"].clone()
    }

    async fn nat(t: &TestHelper, p: &banger_policy::Peer, name: &str) {
        t.req(p, Request::TapCreate { vm: vm(name) }).await;
        let r = t.req(p, Request::NatUp { vm: vm(name) }).await;
        assert!(matches!(r, Response::Nat(_)), "{r:?}");
    }

    async fn teardown(t: &TestHelper, p: &banger_policy::Peer, name: &str) {
        let r = t.req(p, Request::TeardownVms { vms: vec![vm(name)] }).await;
        assert!(matches!(&r, Response::Teardown(t) if t.failures.is_empty()), "{r:?}");
    }

    #[tokio::test]
    async fn forwarding_goes_back_off_when_the_last_nat_of_anyone_goes() {
        let t = TestHelper::new();
        assert_eq!(forward(&t), "0");
        let (a, b) = (t.peer(1000, "home"), t.peer(1001, "home"));
        nat(&t, &a, "one").await;
        assert_eq!(forward(&t), "1");
        nat(&t, &a, "two").await;
        nat(&t, &b, "one").await;
        teardown(&t, &a, "one").await;
        teardown(&t, &a, "two").await;
        assert_eq!(forward(&t), "1", "b still has a NAT");
        teardown(&t, &b, "one").await;
        assert_eq!(forward(&t), "0", "the last NAT is gone");
        // And on again for the next one.
        nat(&t, &a, "three").await;
        assert_eq!(forward(&t), "1");
        teardown(&t, &a, "three").await;
        assert_eq!(forward(&t), "0");
    }

    #[tokio::test]
    async fn forwarding_that_was_on_stays_on() {
        let t = TestHelper::new();
        t.kernel.world().sysctls.insert("net.ipv4.ip_forward".into(), "1".into());
        let a = t.peer(1000, "home");
        nat(&t, &a, "one").await;
        teardown(&t, &a, "one").await;
        assert_eq!(forward(&t), "1");
    }

    #[tokio::test]
    async fn a_value_someone_else_set_meanwhile_is_left_alone() {
        let t = TestHelper::new();
        let a = t.peer(1000, "home");
        nat(&t, &a, "one").await;
        t.kernel.world().sysctls.insert("net.ipv4.ip_forward".into(), "0".into());
        nat(&t, &a, "two").await;
        assert_eq!(forward(&t), "1", "turned on again for the new NAT");
        t.kernel.world().sysctls.insert("net.ipv4.ip_forward".into(), "2".into());
        teardown(&t, &a, "one").await;
        teardown(&t, &a, "two").await;
        assert_eq!(forward(&t), "2");
    }

    #[tokio::test]
    async fn a_failed_nat_puts_forwarding_back() {
        let t = TestHelper::new();
        let a = t.peer(1000, "home");
        t.req(&a, Request::TapCreate { vm: vm("one") }).await;
        t.kernel.fail("firewall_apply", "", Errno::EIO, 1);
        let r = t.req(&a, Request::NatUp { vm: vm("one") }).await;
        assert!(matches!(r, Response::Error(_)), "{r:?}");
        assert_eq!(forward(&t), "0");
    }

    #[tokio::test]
    async fn the_record_survives_a_restart_and_the_reconcile_restores() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = std::sync::Arc::new(crate::kernel::fake::FakeKernel::new());
        let t = TestHelper::new();
        let a = t.peer(1000, "home");
        let helper = open_helper(dir.path(), &kernel);
        helper.handle(&a, Request::TapCreate { vm: vm("one") }, vec![]).await;
        let r = helper.handle(&a, Request::NatUp { vm: vm("one") }, vec![]).await;
        assert!(matches!(r, Response::Nat(_)), "{r:?}");
        assert_eq!(kernel.world().sysctls["net.ipv4.ip_forward"], "1");
        assert!(dir.path().join("forwarding.json").exists());
        drop(helper);
        // A restart with the NAT still there keeps forwarding on.
        let helper = open_helper(dir.path(), &kernel);
        helper.reconcile().await;
        assert_eq!(kernel.world().sysctls["net.ipv4.ip_forward"], "1");
        drop(helper);
        // The rules vanish and forwarding is turned off while no helper runs: the next one's
        // reconcile puts both back, since the VM's TAP is there.
        kernel.world().firewall = Default::default();
        kernel.world().sysctls.insert("net.ipv4.ip_forward".into(), "0".into());
        let helper = open_helper(dir.path(), &kernel);
        helper.reconcile().await;
        assert!(!kernel.world().firewall.rules.is_empty());
        assert_eq!(kernel.world().sysctls["net.ipv4.ip_forward"], "1");
        drop(helper);
        // The TAP vanishes: the next reconcile drops the NAT, its rules and puts forwarding back.
        kernel.world().links.retain(|name, _| !name.starts_with("bg"));
        let helper = open_helper(dir.path(), &kernel);
        helper.reconcile().await;
        assert!(kernel.world().firewall.rules.is_empty());
        assert_eq!(kernel.world().sysctls["net.ipv4.ip_forward"], "0");
        assert!(!dir.path().join("forwarding.json").exists());
    }
}
