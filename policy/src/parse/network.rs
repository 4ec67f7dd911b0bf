//! `[network]`: the pool, prefixes, uplink and what guests may reach.

use std::collections::BTreeSet;

use banger_protocol::IfName;
use ipnet::Ipv4Net;

use super::{Doc, PolicyError, Value, sorted};
use crate::{FirewallChoice, GuestToHost, Network, Policy, PortRule, Proto, Uplink};

/// Networks a pool must not overlap: guests there would shadow the host's own addressing.
const RESERVED: [(&str, &str); 4] = [
    ("0.0.0.0/8", "\"this network\""),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("224.0.0.0/3", "multicast and reserved"),
];

const NETWORK_KEYS: &[&str] =
    &["pool", "lease_prefix", "vm_prefix", "uplink", "ipv6", "guest_to_guest", "guest_to_host", "firewall"];
const GUEST_TO_HOST_KEYS: &[&str] = &["allow_all", "allow"];

pub(super) fn read_network(doc: &Doc<'_>, value: &Value<'_>) -> Result<Network, PolicyError> {
    let mut network = Policy::default_policy().network;
    let (mut pool_at, mut lease_at, mut vm_at) = (None, None, None);
    for (name, key, value) in sorted(doc.table("network", value)?) {
        match name {
            "pool" => {
                network.pool = read_pool(doc, value)?;
                pool_at = Some(value.span());
            }
            "lease_prefix" => {
                network.lease_prefix =
                    prefix(doc.integer("network.lease_prefix", value, 0, 30, "an integer from 0 to 30")?);
                lease_at = Some(value.span());
            }
            "vm_prefix" => {
                let what = "an integer from 0 to 30 (a guest and its gateway need at least a /30)";
                network.vm_prefix = prefix(doc.integer("network.vm_prefix", value, 0, 30, what)?);
                vm_at = Some(value.span());
            }
            "uplink" => network.uplink = read_uplink(doc, value)?,
            "ipv6" => network.ipv6 = doc.boolean("network.ipv6", value)?,
            "guest_to_guest" => network.guest_to_guest = doc.boolean("network.guest_to_guest", value)?,
            "guest_to_host" => network.guest_to_host = read_guest_to_host(doc, value)?,
            "firewall" => {
                network.firewall = match doc.string("network.firewall", value)? {
                    "auto" => FirewallChoice::Auto,
                    "nftables" => FirewallChoice::Nftables,
                    "iptables" => FirewallChoice::Iptables,
                    other => {
                        return Err(doc.at(
                            &value.span(),
                            format!("network.firewall must be \"auto\", \"nftables\" or \"iptables\", got {other:?}"),
                        ));
                    }
                }
            }
            _ => return Err(doc.unknown("network", key, NETWORK_KEYS)),
        }
    }
    let (pool, lease, vm) = (network.pool, network.lease_prefix, network.vm_prefix);
    if lease < pool.prefix_len() {
        let span = lease_at.or(pool_at).unwrap_or(0..0);
        return Err(doc.at(
            &span,
            format!(
                "network.lease_prefix ({lease}) must be at least the prefix length of network.pool \
                 {pool} ({}): a lease must fit in the pool; use a larger pool or a longer lease_prefix",
                pool.prefix_len()
            ),
        ));
    }
    if vm < lease {
        let span = vm_at.or(lease_at).unwrap_or(0..0);
        return Err(doc.at(
            &span,
            format!(
                "network.vm_prefix ({vm}) must be at least network.lease_prefix ({lease}): a VM subnet \
                 must fit in a lease"
            ),
        ));
    }
    Ok(network)
}

fn prefix(n: u32) -> u8 {
    u8::try_from(n).expect("range-checked to 0..=30")
}

fn read_pool(doc: &Doc<'_>, value: &Value<'_>) -> Result<Ipv4Net, PolicyError> {
    let text = doc.string("network.pool", value)?;
    let span = value.span();
    let pool: Ipv4Net = text.parse().map_err(|_| {
        doc.at(&span, format!("network.pool must be an IPv4 network like \"172.30.0.0/16\", got {text:?}"))
    })?;
    if pool != pool.trunc() {
        return Err(doc.at(
            &span,
            format!("network.pool {text} has bits set past its prefix; did you mean \"{}\"?", pool.trunc()),
        ));
    }
    for (reserved, what) in RESERVED {
        let reserved: Ipv4Net = reserved.parse().expect("valid constant");
        if reserved.contains(&pool.network()) || pool.contains(&reserved.network()) {
            return Err(doc.at(
                &span,
                format!(
                    "network.pool {pool} overlaps the {what} range {reserved}; use a private range such as \
                     172.30.0.0/16"
                ),
            ));
        }
    }
    Ok(pool)
}

/// The uplink is an [`IfName`]: the same type, and so the same rule, as the helper's.
fn read_uplink(doc: &Doc<'_>, value: &Value<'_>) -> Result<Uplink, PolicyError> {
    let text = doc.string("network.uplink", value)?;
    if text == "auto" {
        return Ok(Uplink::Auto);
    }
    IfName::new(text).map(Uplink::Named).map_err(|e| {
        doc.at(&value.span(), format!("network.uplink must be \"auto\" or an interface name: {e}"))
    })
}

fn read_guest_to_host(doc: &Doc<'_>, value: &Value<'_>) -> Result<GuestToHost, PolicyError> {
    let path = "network.guest_to_host";
    let mut out = GuestToHost { allow_all: false, allow: Vec::new() };
    for (name, key, value) in sorted(doc.table(path, value)?) {
        match name {
            "allow_all" => out.allow_all = doc.boolean("network.guest_to_host.allow_all", value)?,
            "allow" => {
                let mut seen = BTreeSet::new();
                for (entry, span) in doc.strings("network.guest_to_host.allow", value)? {
                    let rule = parse_port_rule(entry).ok_or_else(|| {
                        doc.at(
                            &span,
                            format!(
                                "network.guest_to_host.allow entries must look like \"udp/53\" (tcp or udp, \
                                 port 1 to 65535), got {entry:?}"
                            ),
                        )
                    })?;
                    if !seen.insert(rule) {
                        return Err(doc.at(&span, format!("network.guest_to_host.allow lists {rule} twice")));
                    }
                    out.allow.push(rule);
                }
            }
            _ => return Err(doc.unknown(path, key, GUEST_TO_HOST_KEYS)),
        }
    }
    Ok(out)
}

/// `tcp/22`, `udp/53`: lowercase protocol, decimal port 1–65535 without sign or leading zeros.
fn parse_port_rule(text: &str) -> Option<PortRule> {
    let (proto, port) = text.split_once('/')?;
    let proto = match proto {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        _ => return None,
    };
    if port.is_empty() || port.starts_with('0') || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    Some(PortRule { proto, port })
}
