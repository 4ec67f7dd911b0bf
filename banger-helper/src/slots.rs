//! Connection slots: how many connections the helper holds, in three pools that never borrow
//! from each other, each capped per uid and in total.
//!
//! 1. A connection takes an **arriving** slot as soon as the kernel has named its peer
//!    (`SO_PEERCRED`), before anything that can take time (the account lookups); over the caps it
//!    is refused at once.
//! 2. Once the policy has said whether it admits the peer, the slot moves to the **admitted**
//!    pool, or to the small **not admitted** pool, where it stays only until the refusal is sent.
//!
//! So peers that are not admitted (or not yet identified) never hold a slot meant for admitted
//! users, and one uid never holds a whole pool. A [`Slot`] is given back when dropped.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

/// The pools a connection's slot can be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// Named by the kernel, not yet by the account databases or the policy.
    Arriving,
    /// Admitted by the policy.
    Admitted,
    /// Not admitted by the policy: waiting for its first frame, to refuse it.
    NotAdmitted,
}

impl Pool {
    fn index(self) -> usize {
        match self {
            Pool::Arriving => 0,
            Pool::Admitted => 1,
            Pool::NotAdmitted => 2,
        }
    }
}

/// How many slots of one pool one uid, and all uids together, may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    /// Slots one uid may hold.
    pub per_uid: usize,
    /// Slots all uids together may hold.
    pub total: usize,
}

/// The caps of the three pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Connections being identified.
    pub arriving: Cap,
    /// Connections of admitted peers.
    pub admitted: Cap,
    /// Connections of peers the policy does not admit, until their refusal is sent.
    pub not_admitted: Cap,
}

impl Caps {
    fn of(&self, pool: Pool) -> Cap {
        match pool {
            Pool::Arriving => self.arriving,
            Pool::Admitted => self.admitted,
            Pool::NotAdmitted => self.not_admitted,
        }
    }
}

/// Slots held in one pool.
#[derive(Debug, Default)]
struct Held {
    per_uid: HashMap<u32, usize>,
    total: usize,
}

impl Held {
    fn take(&mut self, cap: Cap, pool: Pool, uid: u32) -> Result<(), Full> {
        let mine = self.per_uid.get(&uid).copied().unwrap_or(0);
        if mine >= cap.per_uid {
            return Err(Full { pool, uid: Some(uid), held: mine });
        }
        if self.total >= cap.total {
            return Err(Full { pool, uid: None, held: self.total });
        }
        *self.per_uid.entry(uid).or_default() += 1;
        self.total += 1;
        Ok(())
    }

    fn release(&mut self, uid: u32) {
        self.total = self.total.saturating_sub(1);
        if let Some(n) = self.per_uid.get_mut(&uid) {
            *n -= 1;
            if *n == 0 {
                self.per_uid.remove(&uid);
            }
        }
    }
}

/// The helper's connection slots (cheap to clone: clones share the counts).
#[derive(Debug, Clone)]
pub struct Slots {
    caps: Caps,
    /// What each pool holds, indexed by [`Pool::index`].
    held: Arc<Mutex<[Held; 3]>>,
}

/// A pool is full, for one uid or for everyone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Full {
    /// The pool.
    pub pool: Pool,
    /// The uid whose share is used up; `None` when the pool's total is.
    pub uid: Option<u32>,
    /// How many slots that uid, or the pool, holds.
    pub held: usize,
}

impl fmt::Display for Full {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let held = self.held;
        match (self.pool, self.uid) {
            (Pool::Arriving, Some(uid)) => write!(
                f,
                "uid {uid} already has {held} connections waiting to be identified, the most one uid may; retry shortly"
            ),
            (Pool::Arriving, None) => write!(
                f,
                "the helper is already identifying {held} connections, the most it takes at once; retry shortly"
            ),
            (Pool::Admitted, Some(uid)) => write!(
                f,
                "uid {uid} already holds {held} connections to the helper, the most one uid may; close some first"
            ),
            (Pool::Admitted, None) => write!(
                f,
                "the helper already serves {held} connections, the most it takes at once; retry shortly"
            ),
            (Pool::NotAdmitted, Some(uid)) => write!(
                f,
                "uid {uid} is not admitted by the helper's policy and already has {held} connections being refused, the most one such uid may"
            ),
            (Pool::NotAdmitted, None) => write!(
                f,
                "the helper is already refusing {held} connections of peers its policy does not admit, the most it takes at once; retry shortly"
            ),
        }
    }
}

impl Slots {
    /// Empty pools with these caps.
    pub fn new(caps: Caps) -> Slots {
        Slots { caps, held: Arc::default() }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, [Held; 3]> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a slot of `pool` for `uid`, unless that uid's share or the pool is used up.
    pub fn take(&self, pool: Pool, uid: u32) -> Result<Slot, Full> {
        self.held()[pool.index()].take(self.caps.of(pool), pool, uid)?;
        Ok(Slot { slots: self.clone(), pool, uid })
    }
}

/// One connection's slot; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Slots,
    pool: Pool,
    uid: u32,
}

impl Slot {
    /// Moves the slot to `pool`. If that pool has no room for the uid, the slot is given back
    /// and the connection must be refused.
    pub fn move_to(mut self, pool: Pool) -> Result<Slot, Full> {
        let mut held = self.slots.held();
        held[pool.index()].take(self.slots.caps.of(pool), pool, self.uid)?;
        held[self.pool.index()].release(self.uid);
        drop(held);
        self.pool = pool;
        Ok(self)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.held()[self.pool.index()].release(self.uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Slots {
        /// How many slots `pool` holds now.
        fn count(&self, pool: Pool) -> usize {
            self.held()[pool.index()].total
        }
    }

    fn caps() -> Caps {
        Caps {
            arriving: Cap { per_uid: 2, total: 3 },
            admitted: Cap { per_uid: 2, total: 3 },
            not_admitted: Cap { per_uid: 1, total: 2 },
        }
    }

    #[test]
    fn each_uid_and_each_pool_is_capped() {
        let s = Slots::new(caps());
        let a: Vec<Slot> = (0..2).map(|_| s.take(Pool::Arriving, 1).unwrap()).collect();
        assert_eq!(
            s.take(Pool::Arriving, 1).unwrap_err(),
            Full { pool: Pool::Arriving, uid: Some(1), held: 2 }
        );
        let b = s.take(Pool::Arriving, 2).unwrap();
        assert_eq!(s.take(Pool::Arriving, 3).unwrap_err(), Full { pool: Pool::Arriving, uid: None, held: 3 });
        // The other pools are untouched by a full one.
        let admitted = s.take(Pool::Admitted, 3).unwrap();
        let refused = s.take(Pool::NotAdmitted, 3).unwrap();
        assert_eq!((s.count(Pool::Arriving), s.count(Pool::Admitted), s.count(Pool::NotAdmitted)), (3, 1, 1));
        drop((a, b, admitted, refused));
        assert_eq!((s.count(Pool::Arriving), s.count(Pool::Admitted), s.count(Pool::NotAdmitted)), (0, 0, 0));
        assert!(s.held()[0].per_uid.is_empty());
    }

    #[test]
    fn peers_not_admitted_never_take_an_admitted_slot() {
        let s = Slots::new(caps());
        // Two uids the policy does not admit fill their pool...
        let n1 = s.take(Pool::Arriving, 10).unwrap().move_to(Pool::NotAdmitted).unwrap();
        let n2 = s.take(Pool::Arriving, 11).unwrap().move_to(Pool::NotAdmitted).unwrap();
        let full = s.take(Pool::Arriving, 12).unwrap().move_to(Pool::NotAdmitted).unwrap_err();
        assert_eq!(full, Full { pool: Pool::NotAdmitted, uid: None, held: 2 });
        // ...the refused move gave its arriving slot back, and admitted users still get all of theirs.
        assert_eq!(s.count(Pool::Arriving), 0);
        let admitted: Vec<Slot> = [1, 1, 2]
            .into_iter()
            .map(|uid| s.take(Pool::Arriving, uid).unwrap().move_to(Pool::Admitted).unwrap())
            .collect();
        assert_eq!((s.count(Pool::Admitted), s.count(Pool::NotAdmitted)), (3, 2));
        drop((n1, n2, admitted));
        assert_eq!(s.count(Pool::NotAdmitted) + s.count(Pool::Admitted), 0);
    }

    #[test]
    fn a_move_to_a_full_share_gives_the_slot_back() {
        let s = Slots::new(caps());
        let _held = s.take(Pool::NotAdmitted, 7).unwrap();
        let arriving = s.take(Pool::Arriving, 7).unwrap();
        assert_eq!(
            arriving.move_to(Pool::NotAdmitted).unwrap_err(),
            Full { pool: Pool::NotAdmitted, uid: Some(7), held: 1 }
        );
        assert_eq!((s.count(Pool::Arriving), s.count(Pool::NotAdmitted)), (0, 1));
    }

    #[test]
    fn refusals_name_the_cap() {
        let per_uid = Full { pool: Pool::Admitted, uid: Some(1000), held: 64 }.to_string();
        assert!(per_uid.contains("uid 1000 already holds 64 connections"), "{per_uid}");
        let total = Full { pool: Pool::NotAdmitted, uid: None, held: 32 }.to_string();
        assert!(total.contains("refusing 32 connections of peers its policy does not admit"), "{total}");
        let arriving = Full { pool: Pool::Arriving, uid: Some(5), held: 16 }.to_string();
        assert!(arriving.contains("16 connections waiting to be identified"), "{arriving}");
    }
}
