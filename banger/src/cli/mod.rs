//! The `banger` command: its arguments ([`args`]), what each command does ([`commands`]) and the
//! daemon API's client, which starts `bangerd` when none answers ([`client`]).

pub mod args;
pub mod client;
pub mod commands;
