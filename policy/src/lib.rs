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
//! max_vms = 16                  # VMs holding any object (TAP, NAT, loop, dm) at once
//! max_taps = 16
//! max_loops = 32
//! max_vcpus = 32                # vCPUs over all of a user's jailed VMs (1..=65536)
//! max_memory_mib = 32768        # MiB of guest memory over them (1..=16777216)
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
//! firewall = "auto"             # "auto" (nftables where the kernel has it), "nftables" or "iptables"
//!
//! [network.guest_to_host]       # new connections from a guest to the host itself
//! allow_all = false
//! allow = ["udp/53", "tcp/53"]  # "tcp/PORT" or "udp/PORT" on the guest's gateway (default: none)
//!
//! [audit]
//! log = "stderr"                # or an absolute path: one JSON line per request
//!
//! [jailer]                      # optional: launch VMMs through Firecracker's jailer
//! jailer = "/usr/local/bin/jailer"            # absolute; root's, not group/other-writable
//! firecracker = "/usr/local/bin/firecracker"  # the same, and statically linked
//! chroot_base = "/srv/banger/jails"           # root's directory, not other-writable
//! uid_range = "900000-965535"   # one uid per jail; no account, group or subordinate id in it
//! cgroup = "auto"               # "auto" (v2 with cpu and memory, else v1), "v1" or "v2"
//! cgroup_parent = "banger"      # each user's jails share <cgroup_parent>/u<uid>
//! mode = "allow"                # or "force": every VM jailed, no TAP or block device to users
//! ```
//!
//! Access entries made only of digits are ids; anything else is a name. Nothing is implied:
//! uid 0 may connect only if `access` lists it like any other account.
//!
//! Values are checked where they are read: names are non-empty without whitespace, control
//! characters, wildcards or `: , / \`; the uplink is a [`banger_protocol::IfName`], the type the
//! helper puts in its firewall rules (1–15 ASCII letters, digits, `_`, `.` or `-`, not starting
//! with `-`); a user override, port or list entry may appear only once. The `[[sysctl]]`
//! allowlist of earlier releases is refused with a message saying to delete it: no client sets
//! a sysctl, the helper turns `net.ipv4.ip_forward` on by itself for NAT.
//!
//! # The ledger and addresses
//!
//! [`Ledger`] is the helper's record of which uid, install and VM own each object, with the
//! queries [`authorize`](fn@authorize) and the helper need ([`Ledger::find`], [`Ledger::count_vms`],
//! [`Ledger::free_slot`], …). [`addr`] turns a lease index and a VM slot into addresses.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod addr;
pub mod authorize;
pub mod explain;
pub mod ledger;
pub mod model;
pub mod parse;

pub use addr::VmSubnet;
pub use authorize::{
    Admission, BackingFile, Decision, DmGrant, FdAccess, Grant, JailGrant, LOCAL_FILESYSTEMS, Observed, Peer,
    authorize, is_account_id,
};
pub use explain::{explain, explain_peer};
pub use ledger::{DevNum, EntryState, FileId, Ledger, LedgerEntry, Object, ObjectKind, jail_info};
pub use model::*;
pub use parse::PolicyError;

/// Where the helper reads its policy unless told otherwise.
pub const DEFAULT_POLICY_PATH: &str = "/etc/banger/policy.toml";
