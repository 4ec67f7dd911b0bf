//! Guests' firewall rules as data, for each backend: [`iptables`] (the helper's chains in the
//! `filter` and `nat` tables, changed with `iptables-restore`) and [`nft`] (the helper's own
//! nftables table, whose rules are written once and whose per-VM part is set elements).

use std::net::Ipv4Addr;

use crate::names::VmKey;

pub mod iptables;
pub mod nft;

/// Everything needed to write one VM's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRules {
    /// Whose VM.
    pub key: VmKey,
    /// Its TAP.
    pub tap: String,
    /// The guest's address.
    pub guest_ip: Ipv4Addr,
    /// The host side of the VM's subnet (the guest's gateway).
    pub host_ip: Ipv4Addr,
    /// The uplink.
    pub uplink: String,
}
