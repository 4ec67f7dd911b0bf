//! The pure decision every request goes through.

use banger_protocol::{HelperError, InstallId, Request};

use crate::{Ledger, Policy};

/// Who is asking, as the helper established it (SO_PEERCRED and the account databases).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The peer's uid.
    pub uid: u32,
    /// The peer's primary gid.
    pub gid: u32,
    /// The peer's pid at connect time.
    pub pid: i32,
    /// The user name of `uid`, when it has one.
    pub user: Option<String>,
    /// Every group the peer is in (primary and supplementary), as gids.
    pub groups: Vec<u32>,
    /// The names of those groups that have one.
    pub group_names: Vec<String>,
    /// The install this connection said `Hello` for (`None` before the handshake).
    pub install: Option<InstallId>,
}

/// The outcome of [`authorize`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Allow,
    /// Refuse with this error; every refusal names the policy rule (or ledger fact) that decided.
    Refuse(HelperError),
}

/// Decides whether `peer` may make `request` now, given the policy and the ledger.
pub fn authorize(policy: &Policy, peer: &Peer, request: &Request, ledger: &Ledger) -> Decision {
    let _ = (policy, peer, request, ledger);
    todo!("implemented by the policy module")
}
