//! The `banger` command: its arguments ([`args`]), what each command does ([`commands`]), the
//! daemon API's client, which starts `bangerd` when none answers ([`client`]), and how a long
//! command shows where it is ([`progress`]).

pub mod args;
pub mod client;
pub mod commands;
pub mod progress;
