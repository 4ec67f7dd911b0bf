//! The admin's policy for `banger-helper`: what the TOML file says ([`Policy`]), how it is read
//! and checked ([`Policy::from_toml`]), how it reads to a person ([`explain`](fn@explain)), and the pure
//! decision every request goes through ([`authorize`](fn@authorize)).
//!
//! Nothing here touches the kernel or the filesystem (the helper reads the file and hands over its
//! text); every decision is a pure function of the policy, the peer, the request and the ledger.
//!
//! # The file
//!
//! Every key is optional; an empty file is the built-in default, which admits nobody. A key this
//! crate does not know is an error (with its line), so a typo never silently falls back to a
//! default. `packaging/policy.toml` is the commented default file.
//!
//! ```toml
//! [access]
//! users = ["alice", "1005"]     # user names, or decimal uids written as strings
//! groups = ["banger"]           # group names, or decimal gids written as strings
//! socket_group = "banger"       # group owning the helper socket (mode 0660)
//!
//! [quotas]                      # per user, across all of its installs; each 1..=65536
//! max_vms = 16                  # VMs holding any object (TAP, NAT, loop) at once
//! max_taps = 16
//! max_loops = 32
//!
//! [quotas.users.alice]          # override for one user (name or decimal uid);
//! max_vms = 4                   # keys left out take the [quotas] values
//!
//! [network]
//! pool = "172.30.0.0/16"        # IPv4 network, no host bits, not loopback/link-local/multicast
//! lease_prefix = 24             # one user's share: pool prefix <= lease_prefix <= vm_prefix
//! vm_prefix = 30                # one VM's point-to-point subnet: at most 30
//! uplink = "auto"               # "auto" (default route's interface) or an interface name
//! ipv6 = false                  # keep IPv6 on TAPs
//! guest_to_guest = false        # let guests reach each other
//!
//! [network.guest_to_host]       # new connections from a guest to the host itself
//! allow_all = false
//! allow = ["udp/53", "tcp/53"]  # "tcp/PORT" or "udp/PORT" on the guest's gateway (default: none)
//!
//! [[sysctl]]                    # the allowlist; any [[sysctl]] replaces the default, and
//! key = "net.ipv4.ip_forward"   # `sysctl = []` at the top allows none
//! values = ["1"]
//!
//! [audit]
//! log = "stderr"                # or an absolute path: one JSON line per request
//! ```
//!
//! Access entries made only of digits are ids; anything else is a name. Nothing is implied:
//! uid 0 may connect only if `access` lists it like any other account.
//!
//! Values are checked where they are read: names are non-empty without whitespace, control
//! characters, wildcards or `: , / \`; sysctl keys are `[a-z0-9_.-]` dotted words (no empty part,
//! at least two parts) and values printable ASCII without whitespace; the uplink is a name the
//! kernel would accept (1–15 bytes, no `/`, `:` or whitespace); a sysctl key, user override, port
//! or list entry may appear only once.
//!
//! # The ledger and addresses
//!
//! [`Ledger`] is the helper's record of which uid, install and VM own each object, with the
//! queries [`authorize`](fn@authorize) and the helper need ([`Ledger::find`], [`Ledger::count_vms`],
//! [`Ledger::free_slot`], …). [`addr`] turns a lease index and a VM slot into addresses.
#![deny(missing_docs)]

pub mod addr;
pub mod authorize;
pub mod explain;
pub mod ledger;
pub mod model;
pub mod parse;

pub use addr::VmSubnet;
pub use authorize::{Admission, Decision, Peer, authorize};
pub use explain::{explain, explain_with_groups};
pub use ledger::{Ledger, LedgerEntry, Object, ObjectKind};
pub use model::*;
pub use parse::PolicyError;

/// Where the helper reads its policy unless told otherwise.
pub const DEFAULT_POLICY_PATH: &str = "/etc/banger/policy.toml";
