//! Leasing the caller's subnet: one slice of the policy's pool per uid, the lowest free one,
//! kept for good in the ledger so the uid always gets the same one back.

use banger_protocol::{HelperError, LeaseInfo};

use super::{Caller, Helper, State};
use crate::kernel::Kernel;

impl<K: Kernel> Helper<K> {
    /// The caller's lease, leasing one (and saving the ledger) if it has none.
    pub(crate) fn lease(&self, st: &mut State, c: Caller<'_>) -> Result<LeaseInfo, HelperError> {
        let (index, new) = self.lease_index(st, c)?;
        if new && let Err(e) = st.persist() {
            st.stored.ledger.leases.remove(&c.uid);
            return Err(e);
        }
        self.lease_info(index)
    }

    /// The caller's lease index and whether it was just taken (not yet saved).
    pub(crate) fn lease_index(&self, st: &mut State, c: Caller<'_>) -> Result<(u32, bool), HelperError> {
        if let Some(i) = st.stored.ledger.lease_of(c.uid) {
            return Ok((i, false));
        }
        let net = &self.policy.network;
        let count = net.lease_count();
        let i = st.stored.ledger.next_free_lease(count).ok_or_else(|| HelperError::Conflict {
            what: format!(
                "the address pool {} is exhausted: all {count} leases of /{} are held; enlarge network.pool in the policy",
                net.pool, net.lease_prefix
            ),
        })?;
        st.stored.ledger.leases.insert(c.uid, i);
        Ok((i, true))
    }

    fn lease_info(&self, index: u32) -> Result<LeaseInfo, HelperError> {
        let net = self.policy.network.lease(index).ok_or_else(|| HelperError::Conflict {
            what: format!("lease {index} is outside the policy's pool; it shrank since the lease was taken"),
        })?;
        Ok(LeaseInfo { network: net.network(), prefix_len: net.prefix_len() })
    }
}

#[cfg(test)]
mod tests {
    use banger_protocol::{Request, Response};

    use crate::ops::testing::*;

    #[tokio::test]
    async fn leases_are_stable_per_uid_and_lowest_free() {
        let t = TestHelper::new();
        let a = t.peer(1000, "home");
        let b = t.peer(1001, "home");
        let la = t.req(&a, Request::LeaseSubnet).await;
        let lb = t.req(&b, Request::LeaseSubnet).await;
        let (Response::Lease(la), Response::Lease(lb)) = (la, lb) else { panic!("not leases") };
        assert_eq!(la.network.to_string(), "172.30.0.0");
        assert_eq!(lb.network.to_string(), "172.30.1.0");
        assert_eq!(la.prefix_len, 24);
        // Again, and from another install of the same uid: the same lease.
        let a2 = t.peer(1000, "work");
        assert_eq!(t.req(&a2, Request::LeaseSubnet).await, Response::Lease(la));
        assert_eq!(t.helper.snapshot().await.ledger.leases.len(), 2);
    }

    #[tokio::test]
    async fn an_exhausted_pool_is_refused_naming_the_pool() {
        let mut policy = test_policy();
        policy.network.pool = "172.30.0.0/23".parse().unwrap();
        let t = TestHelper::with_policy(policy);
        for uid in [1, 2] {
            assert!(matches!(t.req(&t.peer(uid, "i"), Request::LeaseSubnet).await, Response::Lease(_)));
        }
        let r = t.req(&t.peer(3, "i"), Request::LeaseSubnet).await;
        let Response::Error(banger_protocol::HelperError::Denied { rule, reason }) = r else {
            panic!("{r:?}")
        };
        assert_eq!(rule, "network.pool");
        assert!(reason.contains("172.30.0.0/23"), "{reason}");
    }
}
