//! banger: the `banger` CLI and the per-user `bangerd` daemon.
//!
//! The daemon owns durable intent ([`store`], the SQLite `vms` table), momentary reality
//! ([`handles`], an in-memory cache mirrored to each VM's `handles.json`), liveness
//! ([`liveness`]) and reconciliation after crashes ([`reconcile`]). It reaches the kernel only
//! through the root helper ([`helper_client`]) and talks to each VMM through its API socket
//! ([`firecracker`]).

pub mod api;
pub mod api_types;
pub mod cli;
pub mod client;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod firecracker;
pub mod handles;
pub mod helper_client;
pub mod ids;
pub mod images;
pub mod liveness;
pub mod logfile;
pub mod model;
pub mod paths;
pub mod personalize;
pub mod reconcile;
pub mod ssh;
pub mod startup;
pub mod storage;
pub mod store;
pub mod vmm;
