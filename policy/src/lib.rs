//! The admin's policy for `banger-helper`: what the TOML file says ([`Policy`]), how it is read
//! and checked ([`Policy::from_toml`]), how it reads to a person ([`explain`]), and the pure
//! decision every request goes through ([`authorize`]).
//!
//! Nothing here touches the kernel or the filesystem (the helper reads the file and hands over its
//! text); every decision is a pure function of the policy, the peer, the request and the ledger.
#![deny(missing_docs)]

pub mod addr;
pub mod authorize;
pub mod explain;
pub mod ledger;
pub mod model;
pub mod parse;

pub use addr::VmSubnet;
pub use authorize::{Admission, Decision, Peer, authorize};
pub use explain::explain;
pub use ledger::{Ledger, LedgerEntry, Object, ObjectKind};
pub use model::*;
pub use parse::PolicyError;

/// Where the helper reads its policy unless told otherwise.
pub const DEFAULT_POLICY_PATH: &str = "/etc/banger/policy.toml";
