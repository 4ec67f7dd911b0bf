//! Address arithmetic over the policy's pool: leases per user, point-to-point subnets per VM.
//!
//! The pool (`network.pool`, e.g. `172.30.0.0/16`) is cut into equal leases of
//! `network.lease_prefix` (e.g. `/24`), numbered from 0 at the start of the pool; a uid keeps its
//! lease index in the ledger. Each lease is cut into VM subnets ("slots") of `network.vm_prefix`
//! (e.g. `/30`), numbered from 0 at the start of the lease. In a VM subnet the first usable
//! address is the host side (the guest's gateway, set on the TAP) and the second is the guest.
//!
//! Every function here is total: an index outside the pool or the lease, or a [`Network`] whose
//! prefixes are inconsistent (a validated policy never has one), gives `None` or 0, never a panic.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::Network;

/// One VM's point-to-point subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSubnet {
    /// The subnet.
    pub net: Ipv4Net,
    /// The host side (the guest's gateway): the first usable address.
    pub host_ip: Ipv4Addr,
    /// The guest: the second usable address.
    pub guest_ip: Ipv4Addr,
}

/// `2^(inner - outer)` as a count of sub-networks, or 0 when `inner` is not inside `outer`.
fn subdivisions(outer: u8, inner: u8) -> u32 {
    if inner < outer || inner > 32 {
        return 0;
    }
    // At most 2^32, which does not fit: saturate (only a /0 cut into /32s gets there).
    u32::try_from(1u64 << (inner - outer)).unwrap_or(u32::MAX)
}

/// The size in addresses of a network with this prefix, as a u64 (2^32 for /0).
fn block_size(prefix: u8) -> u64 {
    1u64 << (32 - u32::from(prefix.min(32)))
}

/// The network of `prefix` whose first address is `start + index * size(prefix)`, if it fits.
fn nth_block(start: Ipv4Addr, prefix: u8, index: u32) -> Option<Ipv4Net> {
    let offset = u64::from(index).checked_mul(block_size(prefix))?;
    let addr = u32::try_from(u64::from(u32::from(start)) + offset).ok()?;
    Ipv4Net::new(Ipv4Addr::from(addr), prefix).ok()
}

impl Network {
    /// How many leases the pool holds.
    pub fn lease_count(&self) -> u32 {
        subdivisions(self.pool.prefix_len(), self.lease_prefix)
    }

    /// The lease with this index, if the pool has it.
    pub fn lease(&self, index: u32) -> Option<Ipv4Net> {
        if index >= self.lease_count() {
            return None;
        }
        nth_block(self.pool.network(), self.lease_prefix, index)
    }

    /// How many VM subnets one lease holds.
    pub fn slots_per_lease(&self) -> u32 {
        if self.lease_prefix < self.pool.prefix_len() {
            return 0;
        }
        subdivisions(self.lease_prefix, self.vm_prefix)
    }

    /// The VM subnet `slot` of lease `lease_index`.
    pub fn vm_subnet(&self, lease_index: u32, slot: u32) -> Option<VmSubnet> {
        // A guest and its gateway need two usable addresses: a /30 at the smallest.
        if self.vm_prefix > 30 || slot >= self.slots_per_lease() {
            return None;
        }
        let lease = self.lease(lease_index)?;
        let net = nth_block(lease.network(), self.vm_prefix, slot)?;
        let first = u32::from(net.network());
        Some(VmSubnet { net, host_ip: Ipv4Addr::from(first + 1), guest_ip: Ipv4Addr::from(first + 2) })
    }

    /// The index of the lease that contains `addr`, if the pool has one.
    pub fn lease_index_of(&self, addr: Ipv4Addr) -> Option<u32> {
        if !self.pool.contains(&addr) || self.lease_count() == 0 {
            return None;
        }
        let offset = u64::from(u32::from(addr) - u32::from(self.pool.network()));
        u32::try_from(offset / block_size(self.lease_prefix)).ok()
    }
}

/// The MAC address a guest NIC uses, derived from its IPv4 address: `06:00:` followed by the
/// four address bytes (a locally administered unicast address, the convention of Firecracker's
/// network examples). Two guests never share a MAC because they never share an address.
pub fn guest_mac(guest_ip: Ipv4Addr) -> String {
    guest_mac_bytes(guest_ip).map(|b| format!("{b:02x}")).join(":")
}

/// [`guest_mac`] as bytes.
pub fn guest_mac_bytes(guest_ip: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = guest_ip.octets();
    [0x06, 0x00, a, b, c, d]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GuestToHost, Uplink};

    fn network(pool: &str, lease_prefix: u8, vm_prefix: u8) -> Network {
        Network {
            pool: pool.parse().unwrap(),
            lease_prefix,
            vm_prefix,
            uplink: Uplink::Auto,
            ipv6: false,
            guest_to_guest: false,
            guest_to_host: GuestToHost { allow_all: false, allow: Vec::new() },
            firewall: crate::FirewallChoice::Auto,
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn default_pool_has_256_leases_of_64_slots() {
        let n = network("172.30.0.0/16", 24, 30);
        assert_eq!(n.lease_count(), 256);
        assert_eq!(n.slots_per_lease(), 64);
    }

    #[test]
    fn first_lease_is_the_start_of_the_pool() {
        let n = network("172.30.0.0/16", 24, 30);
        assert_eq!(n.lease(0), Some("172.30.0.0/24".parse().unwrap()));
        assert_eq!(n.lease(1), Some("172.30.1.0/24".parse().unwrap()));
        assert_eq!(n.lease(255), Some("172.30.255.0/24".parse().unwrap()));
        assert_eq!(n.lease(256), None);
        assert_eq!(n.lease(u32::MAX), None);
    }

    #[test]
    fn vm_subnet_host_is_first_and_guest_second() {
        let n = network("172.30.0.0/16", 24, 30);
        let s = n.vm_subnet(0, 0).unwrap();
        assert_eq!(s.net, "172.30.0.0/30".parse().unwrap());
        assert_eq!((s.host_ip, s.guest_ip), (ip("172.30.0.1"), ip("172.30.0.2")));
        let s = n.vm_subnet(2, 1).unwrap();
        assert_eq!(s.net, "172.30.2.4/30".parse().unwrap());
        assert_eq!((s.host_ip, s.guest_ip), (ip("172.30.2.5"), ip("172.30.2.6")));
        let last = n.vm_subnet(255, 63).unwrap();
        assert_eq!(last.net, "172.30.255.252/30".parse().unwrap());
        assert_eq!(last.guest_ip, ip("172.30.255.254"));
    }

    #[test]
    fn out_of_range_is_none() {
        let n = network("172.30.0.0/16", 24, 30);
        assert_eq!(n.vm_subnet(0, 64), None);
        assert_eq!(n.vm_subnet(256, 0), None);
        assert_eq!(n.vm_subnet(u32::MAX, u32::MAX), None);
    }

    #[test]
    fn larger_vm_subnets_still_use_the_first_two_addresses() {
        let n = network("10.0.0.0/8", 16, 29);
        assert_eq!(n.slots_per_lease(), 8192);
        let s = n.vm_subnet(3, 1).unwrap();
        assert_eq!(s.net, "10.3.0.8/29".parse().unwrap());
        assert_eq!((s.host_ip, s.guest_ip), (ip("10.3.0.9"), ip("10.3.0.10")));
    }

    #[test]
    fn one_lease_pool_and_one_slot_lease() {
        let n = network("192.168.5.0/30", 30, 30);
        assert_eq!((n.lease_count(), n.slots_per_lease()), (1, 1));
        let s = n.vm_subnet(0, 0).unwrap();
        assert_eq!((s.host_ip, s.guest_ip), (ip("192.168.5.1"), ip("192.168.5.2")));
        assert_eq!(n.vm_subnet(0, 1), None);
        assert_eq!(n.vm_subnet(1, 0), None);
    }

    #[test]
    fn pool_at_the_top_of_the_address_space_does_not_overflow() {
        let n = network("255.255.255.0/24", 28, 30);
        assert_eq!(n.lease_count(), 16);
        assert_eq!(n.lease(15), Some("255.255.255.240/28".parse().unwrap()));
        assert_eq!(n.vm_subnet(15, 3).unwrap().guest_ip, ip("255.255.255.254"));
        assert_eq!(n.lease(16), None);
    }

    #[test]
    fn inconsistent_prefixes_give_nothing() {
        let n = network("172.30.0.0/16", 12, 30);
        assert_eq!((n.lease_count(), n.slots_per_lease()), (0, 0));
        assert_eq!(n.lease(0), None);
        let n = network("172.30.0.0/16", 24, 20);
        assert_eq!(n.slots_per_lease(), 0);
        assert_eq!(n.vm_subnet(0, 0), None);
        let n = network("172.30.0.0/16", 24, 31);
        assert_eq!(n.vm_subnet(0, 0), None);
    }

    #[test]
    fn lease_index_of_finds_the_containing_lease() {
        let n = network("172.30.0.0/16", 24, 30);
        assert_eq!(n.lease_index_of(ip("172.30.0.2")), Some(0));
        assert_eq!(n.lease_index_of(ip("172.30.7.200")), Some(7));
        assert_eq!(n.lease_index_of(ip("172.31.0.1")), None);
        for i in [0, 1, 77, 255] {
            let s = n.vm_subnet(i, 5).unwrap();
            assert_eq!(n.lease_index_of(s.guest_ip), Some(i));
        }
    }

    #[test]
    fn vm_subnets_of_a_lease_are_disjoint_and_inside_it() {
        let n = network("172.30.0.0/16", 24, 30);
        let lease = n.lease(9).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for slot in 0..n.slots_per_lease() {
            let s = n.vm_subnet(9, slot).unwrap();
            assert!(lease.contains(&s.net), "{s:?} outside {lease}");
            assert!(s.net.contains(&s.host_ip) && s.net.contains(&s.guest_ip));
            assert_ne!(s.host_ip, s.net.network());
            assert_ne!(s.guest_ip, s.net.broadcast());
            assert!(seen.insert(s.net.network()));
        }
    }

    #[test]
    fn guest_mac_is_locally_administered_unicast_from_the_address() {
        let mac = guest_mac(ip("172.30.0.2"));
        assert_eq!(mac, "06:00:ac:1e:00:02");
        let first = u8::from_str_radix(&mac[..2], 16).unwrap();
        assert_eq!(first & 0b11, 0b10, "locally administered, not multicast");
    }
}
