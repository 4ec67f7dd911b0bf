//! Listing what the caller owns, across all of its installs, straight from the ledger.
//!
//! An answer must fit the protocol: at most [`MAX_LIST_LEN`] elements per list and one frame of
//! [`banger_protocol::MAX_FRAME_LEN`] bytes. Only a policy whose quotas go beyond that can make a uid own more;
//! then the answer is cut ([`fit_lists`]) and the cut is logged.

use banger_protocol::{MAX_LIST_LEN, OwnedObjects, Response, codec};

use super::{Caller, Helper, State};
use crate::kernel::{Jails as _, Kernel};

/// Whether `response` goes through the wire: it encodes within one frame and the receiving side
/// decodes it (the decoder also bounds what a message may make it allocate).
pub(crate) fn travels(response: &Response) -> bool {
    codec::encode(response).and_then(|b| codec::decode::<Response>(&b)).is_ok()
}

/// Which list [`fit_lists`] cuts first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CutFrom {
    /// The longest, so every kind keeps a share.
    Longest,
    /// The first that is not empty, in the order given.
    InOrder,
}

/// Cuts `lists` (parts of `value`) until each has at most [`MAX_LIST_LEN`] elements and
/// `wrap(value)` [`travels`], dropping from the end of a list chosen by `from`. Returns how many
/// elements were dropped.
pub(crate) fn fit_lists<T>(
    value: &mut T,
    from: CutFrom,
    lens: impl Fn(&mut T) -> Vec<&mut dyn Cut>,
    wrap: impl Fn(&T) -> Response,
) -> usize {
    let mut dropped = 0;
    for list in lens(value) {
        dropped += list.cut_to(MAX_LIST_LEN);
    }
    while !travels(&wrap(value)) {
        let mut lists = lens(value);
        let mut candidates = lists.iter_mut().filter(|l| l.len() > 0);
        let list = match from {
            CutFrom::Longest => candidates.max_by_key(|l| l.len()),
            CutFrom::InOrder => candidates.next(),
        };
        let Some(list) = list else { break };
        // A sixteenth of the list at a time: a few rounds, never much more than needed.
        let keep = list.len() - list.len().div_ceil(16);
        dropped += list.cut_to(keep);
    }
    dropped
}

/// A list [`fit_lists`] may cut.
pub(crate) trait Cut {
    /// Its length.
    fn len(&self) -> usize;
    /// Keeps the first `n` elements; returns how many were dropped.
    fn cut_to(&mut self, n: usize) -> usize;
}

impl<T> Cut for Vec<T> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn cut_to(&mut self, n: usize) -> usize {
        let dropped = Vec::len(self).saturating_sub(n);
        self.truncate(n);
        dropped
    }
}

impl<K: Kernel> Helper<K> {
    pub(crate) fn list_owned(&self, st: &State, c: Caller<'_>) -> OwnedObjects {
        let jails = self.kernel.jails();
        let mut owned = st.ledger.owned_objects(c.uid, &self.policy.network, &|id| jails.root(id));
        let dropped = fit_lists(
            &mut owned,
            CutFrom::Longest,
            |o| vec![&mut o.taps, &mut o.nat, &mut o.loops, &mut o.dms, &mut o.jails],
            |o| Response::Owned(o.clone()),
        );
        if dropped > 0 {
            tracing::warn!(
                "uid {} owns more than one answer can list: {dropped} objects left out (the policy's quotas exceed what the protocol carries)",
                c.uid
            );
        }
        owned
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

    #[test]
    fn an_answer_too_large_for_the_protocol_is_cut_to_fit() {
        use banger_protocol::{MAX_LIST_LEN, Response};
        let info = |i: usize| banger_protocol::TapInfo {
            install: banger_protocol::InstallId::new(format!("install-with-a-long-name-{i:07}")).unwrap(),
            vm: vm(&format!("vm-with-a-rather-long-name-{i:05}")),
            name: format!("bg{i:013}"),
            host_ip: std::net::Ipv4Addr::new(10, 0, 0, 1),
            guest_ip: std::net::Ipv4Addr::new(10, 0, 0, 2),
            prefix_len: 30,
            guest_mac: "06:00:0a:00:00:02".into(),
        };
        let nat = |i: usize| banger_protocol::NatInfo {
            install: info(i).install,
            vm: info(i).vm,
            guest_ip: std::net::Ipv4Addr::new(10, 0, 0, 2),
            uplink: "uplink-interface".into(),
        };
        let lp = |i: usize| banger_protocol::LoopInfo {
            install: info(i).install,
            vm: info(i).vm,
            role: banger_protocol::LoopRole::Base,
            device: format!("/dev/loop{i}"),
            read_only: true,
        };
        let mut owned = banger_protocol::OwnedObjects {
            lease: None,
            taps: (0..1000).map(info).collect(),
            nat: (0..1000).map(nat).collect(),
            loops: (0..1000).map(lp).collect(),
            dms: Vec::new(),
            jails: Vec::new(),
        };
        let dropped = super::fit_lists(
            &mut owned,
            super::CutFrom::Longest,
            |o| vec![&mut o.taps, &mut o.nat, &mut o.loops],
            |o| Response::Owned(o.clone()),
        );
        let kept = owned.taps.len() + owned.nat.len() + owned.loops.len();
        assert_eq!(dropped, 3000 - kept);
        for len in [owned.taps.len(), owned.nat.len(), owned.loops.len()] {
            assert!(len <= MAX_LIST_LEN && len > 100, "{len}");
        }
        assert!(kept < 3 * MAX_LIST_LEN, "the frame cap was not reached: {kept}");
        let bytes = banger_protocol::codec::encode(&Response::Owned(owned.clone())).unwrap();
        let back: Response = banger_protocol::codec::decode(&bytes).unwrap();
        assert_eq!(back, Response::Owned(owned));
    }
}
