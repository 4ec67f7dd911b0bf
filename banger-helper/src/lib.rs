//! `banger-helper`: the minimal root helper of banger.
//!
//! It answers typed requests from unprivileged `bangerd` daemons over a unix socket and does only
//! small, audited kernel operations for them: TAPs, NAT rules, loop devices and the dm-snapshot
//! roots over them, each decided by the admin's policy (`banger_policy::authorize`) and recorded
//! in an ownership ledger.
//!
//! Map of the crate:
//!
//! - [`cli`]: the command line (`serve`, `policy check`, `policy explain`);
//! - [`serve`]: start-up in order — sanitise the process, read the policy, bind the socket
//!   ([`socket`]), load the ledger, harden ([`hardening`]), then run the [`server`];
//! - [`server`]: accept loop, peer credentials ([`peer`]), connection caps ([`slots`]), handshake,
//!   one task per connection;
//! - [`launcher`]: the root process `serve` forks before confining itself when the policy has a
//!   `[jailer]`, which builds jails ([`jail`]) and starts Firecracker's jailer for the helper;
//! - [`ops`]: every operation, behind [`ops::Helper::respond`];
//! - [`jail`]: building jails, starting Firecracker's jailer in them, killing jailed VMMs and
//!   removing their jails (blocking, run by the launcher process with root's privileges);
//! - [`kernel`]: the narrow kernel traits with their Linux implementation (and, in the unit
//!   tests only, a fake);
//! - [`firewall`], [`names`], [`sysctl_key`]: pure rules, names and keys the helper derives;
//! - [`ledger_store`]: the ownership ledger on disk; [`audit`]: one JSON line per request (routine
//!   successes summarised per connection).

pub mod audit;
pub mod cli;
pub mod firewall;
pub mod hardening;
pub mod jail;
pub mod kernel;
pub mod launcher;
pub mod ledger_store;
pub mod names;
pub mod ops;
pub mod peer;
pub mod policy_cmd;
pub mod serve;
pub mod server;
pub mod slots;
pub mod socket;
pub mod sysctl_key;
pub mod systemd;
