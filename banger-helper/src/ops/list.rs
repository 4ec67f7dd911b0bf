//! Listing what the caller owns, across all of its installs, straight from the ledger.

use banger_protocol::OwnedObjects;

use super::{Caller, Helper, State};
use crate::kernel::Kernel;

impl<K: Kernel> Helper<K> {
    pub(crate) fn list_owned(&self, st: &State, c: Caller<'_>) -> OwnedObjects {
        st.stored.ledger.owned_objects(c.uid, &self.policy.network)
    }
}

#[cfg(test)]
mod tests {
    use banger_protocol::{Request, Response};

    use crate::ops::testing::*;

    #[tokio::test]
    async fn lists_every_install_of_the_caller_and_nothing_of_others() {
        let t = TestHelper::new();
        let home = t.peer(1000, "home");
        let work = t.peer(1000, "work");
        let other = t.peer(1001, "home");
        for p in [&home, &work, &other] {
            t.req(p, Request::TapCreate { vm: vm("dev") }).await;
        }
        t.req(&home, Request::NatUp { vm: vm("dev") }).await;
        let Response::Owned(owned) = t.req(&home, Request::ListOwned).await else { panic!() };
        assert_eq!(owned.taps.len(), 2);
        assert_eq!(owned.nat.len(), 1);
        assert!(owned.lease.is_some());
        let installs: Vec<&str> = owned.taps.iter().map(|t| t.install.as_str()).collect();
        assert!(installs.contains(&"home") && installs.contains(&"work"));
        let Response::Owned(theirs) = t.req(&other, Request::ListOwned).await else { panic!() };
        assert_eq!(theirs.taps.len(), 1);
        assert!(theirs.nat.is_empty());
        let Response::Owned(none) = t.req(&t.peer(1002, "x"), Request::ListOwned).await else { panic!() };
        assert_eq!(none, Default::default());
    }
}
