//! banger: the `banger` CLI and the per-user `bangerd` daemon.
//!
//! The daemon owns durable intent ([`store`], the SQLite `vms` table), momentary reality
//! ([`handles`], an in-memory cache mirrored to each VM's `handles.json`), liveness
//! ([`liveness`]) and reconciliation after crashes ([`reconcile`]). It reaches the kernel only
//! through the root helper ([`helper_client`]) and talks to each VMM through its API socket
//! ([`firecracker`]).

pub mod ids;
pub mod model;
pub mod store;
pub mod handles;
pub mod liveness;
pub mod firecracker;
pub mod helper_client;
pub mod reconcile;
pub mod paths;
pub mod config;
pub mod storage;
pub mod ssh;
pub mod personalize;
pub mod images;
pub mod api;
pub mod api_types;
pub mod cli;
pub mod client;
pub mod commands;
pub mod daemon;
pub mod logfile;
pub mod startup;
pub mod vmm;
