//! banger: the `banger` CLI and the per-user `bangerd` daemon.
//!
//! - [`cli`]: what the `banger` command does: its arguments, the commands, and the client of the
//!   daemon's API (which starts `bangerd` on demand).
//! - [`daemon`]: `bangerd`. It owns durable intent ([`daemon::store`], the SQLite `vms` table),
//!   momentary reality ([`daemon::handles`], an in-memory cache mirrored to each VM's
//!   `handles.json`), liveness ([`daemon::liveness`]) and reconciliation after crashes
//!   ([`daemon::reconcile`]). It reaches the kernel only through the root helper
//!   ([`daemon::helper_client`]) and talks to each VMM through its API socket
//!   ([`daemon::firecracker`]).
//! - Shared by both: the API's bodies ([`api_types`]), settings ([`config`]), where an install
//!   keeps its files ([`paths`]), VM names and ids ([`ids`]), what a VM is ([`model`]), SSH
//!   ([`ssh`]), building the default image without root ([`image_build`]), sizes as users type them ([`size`]), replacing files atomically ([`atomic_file`]) and starting processes in their
//!   own session ([`detach`]).

pub mod api_types;
pub mod atomic_file;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod detach;
pub mod doctor;
pub mod ids;
pub mod image_build;
pub mod model;
pub mod paths;
pub mod size;
pub mod ssh;
