//! The nftables backend's rules as data: the helper's own table, `ip banger`, whose rules are
//! written once (and rewritten from the policy once per helper start), and whose per-VM part is
//! a few set elements, each carrying its VM's tag as its comment. `nft list table ip banger`
//! shows it as:
//!
//! ```text
//! table ip banger {
//!     set taps     { type ifname }                        # every guest's TAP
//!     set guests   { type ifname . ipv4_addr }            # TAP . guest address
//!     set egress   { type ifname . ipv4_addr . ifname }   # TAP . guest address . uplink
//!     set masq     { type ipv4_addr . ifname }            # guest address . uplink
//!     set gateways { type ifname . ipv4_addr . ipv4_addr } # TAP . guest address . gateway
//!     chain postrouting { type nat hook postrouting priority srcnat
//!         ip saddr . oifname @masq masquerade }
//!     chain forward { type filter hook forward priority filter
//!         iifname . ip saddr . oifname @egress accept
//!         ct state established,related oifname . ip daddr . iifname @egress accept
//!         iifname . ip saddr @guests oifname @taps accept      # only with guest_to_guest
//!         iifname @taps drop
//!         oifname @taps drop }
//!     chain input { type filter hook input priority filter
//!         iifname @taps ct state established,related accept
//!         iifname . ip saddr . ip daddr @gateways meta l4proto P th dport N accept  # per port
//!         iifname . ip saddr @guests accept                    # instead, with allow_all
//!         iifname @taps drop }
//! }
//! ```
//!
//! The same policy as the iptables backend's rules ([`super::iptables::vm_rules`]), with one
//! difference: guest-to-guest traffic is accepted only from the sending guest's own address
//! (the iptables rule on the receiving side does not look at the source).
//!
//! Flow of a change: the backend dumps the sets ([`NftView`]), [`plan`] works out the difference
//! for some VMs, and [`NftPlan::messages`] turns it into one netlink batch, which the kernel
//! applies atomically.

use std::collections::BTreeSet;

use banger_policy::{Network, Proto};
use netlink_packet_core::{
    DecodeError, DefaultNla, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST, NlasIterator,
};
use netlink_packet_netfilter::nftables::{
    Bitwise, ChainAttribute, ChainMessage, Cmp, DataAttribute, ExpressionAttribute, Expressions, Hook,
    HookNumber, Immediate, InetHookNumber, ListAttribute, Lookup, Meta, MetaKey, NfTablesMessage, Operator,
    Payload, Register, RuleAttribute, RuleMessage, SetAttribute, SetElementAttribute, SetElementList,
    SetElementMessage, SetMessage, TableAttribute, TableMessage, Verdict, VerdictAttribute,
};

use super::VmRules;
use crate::names::VmKey;

/// The helper's table (family `ip`).
pub const TABLE: &str = "banger";

/// A field of a set's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// An interface name: 16 bytes, zero-padded (`ifname`).
    IfName,
    /// An IPv4 address (`ipv4_addr`).
    Ipv4,
}

impl Field {
    fn len(self) -> usize {
        match self {
            Field::IfName => IFNAMSIZ,
            Field::Ipv4 => 4,
        }
    }

    /// nft's data type number, which `nft list` reads the key with.
    fn type_id(self) -> u32 {
        match self {
            Field::IfName => 41,
            Field::Ipv4 => 7,
        }
    }
}

const IFNAMSIZ: usize = 16;

/// The helper's sets and their keys' fields.
pub const SETS: [(&str, &[Field]); 5] = [
    ("taps", &[Field::IfName]),
    ("guests", &[Field::IfName, Field::Ipv4]),
    ("egress", &[Field::IfName, Field::Ipv4, Field::IfName]),
    ("masq", &[Field::Ipv4, Field::IfName]),
    ("gateways", &[Field::IfName, Field::Ipv4, Field::Ipv4]),
];

/// One element of one of the helper's sets, with its comment (its VM's tag).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Element {
    /// The set (one of [`SETS`]).
    pub set: &'static str,
    /// The key, as the kernel holds it.
    pub key: Vec<u8>,
    /// The comment, if it has one.
    pub tag: Option<String>,
}

fn ifname(name: &str) -> [u8; IFNAMSIZ] {
    let mut out = [0; IFNAMSIZ];
    let n = name.len().min(IFNAMSIZ - 1);
    out[..n].copy_from_slice(&name.as_bytes()[..n]);
    out
}

/// The elements that make up one VM's rules.
pub fn vm_elements(vm: &VmRules) -> Vec<Element> {
    let (tap, up) = (ifname(&vm.tap), ifname(&vm.uplink));
    let (g, h) = (vm.guest_ip.octets(), vm.host_ip.octets());
    let tag = Some(vm.key.rule_tag());
    let keys: [(&'static str, Vec<&[u8]>); 5] = [
        ("taps", vec![&tap[..]]),
        ("guests", vec![&tap[..], &g[..]]),
        ("egress", vec![&tap[..], &g[..], &up[..]]),
        ("masq", vec![&g[..], &up[..]]),
        ("gateways", vec![&tap[..], &g[..], &h[..]]),
    ];
    keys.into_iter().map(|(set, parts)| Element { set, key: parts.concat(), tag: tag.clone() }).collect()
}

/// An element's comment as nft stores it (user data: type 0, length, the text with its NUL).
pub fn comment(text: &str) -> Vec<u8> {
    let mut out = vec![0, u8::try_from(text.len() + 1).expect("a VM tag is shorter than 255 bytes")];
    out.extend_from_slice(text.as_bytes());
    out.push(0);
    out
}

/// The comment in an element's user data, if it has one.
pub fn parse_comment(mut data: &[u8]) -> Option<String> {
    while let [kind, len, rest @ ..] = data {
        let value = rest.get(..usize::from(*len))?;
        if *kind == 0 {
            let text = value.strip_suffix(&[0]).unwrap_or(value);
            return String::from_utf8(text.to_vec()).ok();
        }
        data = &rest[usize::from(*len)..];
    }
    None
}

/// What the helper's table holds now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftView {
    /// Whether the table exists.
    pub present: bool,
    /// The elements of its sets.
    pub elements: Vec<Element>,
    /// Its rules, in order: chain and comment.
    pub rules: Vec<(String, Option<String>)>,
}

impl NftView {
    /// Every VM that has at least one element.
    pub fn vms(&self) -> BTreeSet<VmKey> {
        self.elements.iter().filter_map(|e| e.tag.as_deref()).filter_map(VmKey::parse_rule_tag).collect()
    }
}

/// The rules `net` wants, as a dump reads them back: chain and comment. Each rule's comment
/// names its place and a digest of the whole rule set (`banger rule 3/9 1f2e3d4c5b6a`), so a
/// dump tells whether the table holds exactly these rules without comparing expressions.
pub fn wanted_rules(net: &Network) -> Vec<(String, Option<String>)> {
    use sha2::{Digest, Sha256};
    let rules = rules(net);
    let digest = Sha256::digest(format!("{rules:?}").as_bytes());
    let digest: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    let n = rules.len();
    rules
        .iter()
        .enumerate()
        .map(|(i, (chain, _))| ((*chain).to_owned(), Some(format!("banger rule {}/{n} {digest}", i + 1))))
        .collect()
}

/// The change that takes the table from a view to what is wanted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftPlan {
    /// Create the table, its sets, chains and rules.
    pub create: bool,
    /// Rewrite the rules of the existing table: they are not the ones the policy this helper
    /// runs with wants (another policy, or changed behind the helper's back).
    pub refresh: bool,
    /// Delete the table: nothing is left in it.
    pub delete: bool,
    /// Elements to delete (before the additions).
    pub del: Vec<Element>,
    /// Elements to add.
    pub add: Vec<Element>,
}

/// Works out the change that makes the table hold exactly the elements of each VM in `up` and
/// none of each VM in `down`, leaving other VMs' elements alone. An element with the key of one
/// of `up`'s but another comment is a stale one (the ledger gives a guest address and a TAP
/// name to one VM at a time) and is replaced. A table whose rules are not the ones `net` wants
/// ([`wanted_rules`]) gets them rewritten (even with no element to change). The table goes when
/// no element is left in it.
pub fn plan(view: &NftView, up: &[VmRules], down: &[VmKey], net: &Network) -> NftPlan {
    let wanted: Vec<Element> = up.iter().flat_map(vm_elements).collect();
    let wanted_set: BTreeSet<&Element> = wanted.iter().collect();
    let have: BTreeSet<&Element> = view.elements.iter().collect();
    let touched: BTreeSet<String> = up.iter().map(|r| &r.key).chain(down).map(VmKey::rule_tag).collect();
    let wanted_keys: BTreeSet<(&str, &[u8])> = wanted.iter().map(|e| (e.set, e.key.as_slice())).collect();
    let del: Vec<Element> = view
        .elements
        .iter()
        .filter(|e| !wanted_set.contains(e))
        .filter(|e| {
            e.tag.as_ref().is_some_and(|t| touched.contains(t))
                || wanted_keys.contains(&(e.set, e.key.as_slice()))
        })
        .cloned()
        .collect();
    let add: Vec<Element> = wanted.iter().filter(|w| !have.contains(w)).cloned().collect();
    if view.present && view.elements.len() - del.len() + add.len() == 0 {
        return NftPlan { delete: true, ..NftPlan::default() };
    }
    NftPlan {
        create: !view.present && !add.is_empty(),
        refresh: view.present && view.rules != wanted_rules(net),
        delete: false,
        del,
        add,
    }
}

/// One message of a batch, with its netlink flags.
pub type Message = (NfTablesMessage, u16);

const NEW: u16 = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE;
/// The most set elements one message carries.
pub const ELEMENTS_PER_MESSAGE: usize = 100;
const DEL: u16 = NLM_F_REQUEST | NLM_F_ACK;

impl NftPlan {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        !self.create && !self.refresh && !self.delete && self.del.is_empty() && self.add.is_empty()
    }

    /// The batch's messages, in order: the table, sets and chains (made if missing), the rules
    /// (the chains emptied first when refreshing), the deletions, then the additions, one message
    /// per set for each; or only the table's deletion.
    pub fn messages(&self, net: &Network) -> Vec<Message> {
        let table = || TableAttribute::Name(TABLE.into());
        if self.delete {
            return vec![(NfTablesMessage::DeleteTable(TableMessage { attributes: vec![table()] }), DEL)];
        }
        let mut out = Vec::new();
        if self.create || self.refresh {
            out.push((NfTablesMessage::NewTable(TableMessage { attributes: vec![table()] }), NEW));
            for (id, (name, fields)) in (1u32..).zip(SETS) {
                let key_type = fields.iter().fold(0, |t, f| (t << 6) | f.type_id());
                let key_len = fields.iter().map(|f| f.len()).sum::<usize>();
                let mut attributes = vec![
                    SetAttribute::Table(TABLE.into()),
                    SetAttribute::Name(name.into()),
                    SetAttribute::KeyType(key_type),
                    SetAttribute::KeyLen(u32::try_from(key_len).expect("at most 36 bytes")),
                    SetAttribute::Id(id),
                ];
                if let [Field::IfName] = fields {
                    // A lone interface name is a string in host byte order; without saying so,
                    // `nft list` would print it byte-swapped (empty). User data type 0 is the
                    // key's byte order, 1 host endian.
                    let mut order = vec![0, 4];
                    order.extend_from_slice(&1u32.to_ne_bytes());
                    attributes.push(SetAttribute::UserData(order));
                }
                out.push((NfTablesMessage::NewSet(SetMessage { attributes }), NEW));
            }
            for (chain, kind, hook, priority) in CHAINS {
                let attributes = vec![
                    ChainAttribute::Table(TABLE.into()),
                    ChainAttribute::Name(chain.into()),
                    ChainAttribute::Hook(vec![
                        Hook::Number(HookNumber::Inet(hook)),
                        Hook::Priority(priority),
                    ]),
                    ChainAttribute::Policy(NF_ACCEPT),
                    ChainAttribute::Type(kind.into()),
                ];
                out.push((NfTablesMessage::NewChain(ChainMessage { attributes }), NEW));
            }
            if self.refresh {
                for (chain, ..) in CHAINS {
                    let attributes =
                        vec![RuleAttribute::Table(TABLE.into()), RuleAttribute::Chain(chain.into())];
                    out.push((NfTablesMessage::DeleteRule(RuleMessage { attributes }), DEL));
                }
            }
            for ((chain, exprs), (_, tag)) in rules(net).into_iter().zip(wanted_rules(net)) {
                let attributes = vec![
                    RuleAttribute::Table(TABLE.into()),
                    RuleAttribute::Chain(chain.into()),
                    RuleAttribute::Expressions(exprs),
                    RuleAttribute::UserData(comment(tag.as_deref().unwrap_or_default())),
                ];
                out.push((NfTablesMessage::NewRule(RuleMessage { attributes }), NEW | NLM_F_APPEND));
            }
        }
        for (elements, new) in [(&self.del, false), (&self.add, true)] {
            for (set, _) in SETS {
                let list: Vec<_> = elements
                    .iter()
                    .filter(|e| e.set == set)
                    .map(|e| {
                        let mut attrs = vec![SetElementAttribute::Key(DataAttribute::Value(e.key.clone()))];
                        if new && let Some(tag) = &e.tag {
                            attrs.push(SetElementAttribute::UserData(comment(tag)));
                        }
                        ListAttribute::Element(attrs)
                    })
                    .collect();
                // A netlink attribute's length is 16 bits: at most ELEMENTS_PER_MESSAGE
                // elements (about 200 bytes each at most) go in one message.
                for chunk in list.chunks(ELEMENTS_PER_MESSAGE) {
                    let attributes = vec![
                        SetElementList::Table(TABLE.into()),
                        SetElementList::Set(set.into()),
                        SetElementList::Elements(chunk.to_vec()),
                    ];
                    let message = SetElementMessage { attributes };
                    out.push(if new {
                        (NfTablesMessage::NewSetElement(message), NEW)
                    } else {
                        (NfTablesMessage::DeleteSetElement(message), DEL)
                    });
                }
            }
        }
        out
    }
}

const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;

/// The chains: name, type, hook and priority (`srcnat` is 100, `filter` 0).
const CHAINS: [(&str, &str, InetHookNumber, u32); 3] = [
    ("postrouting", "nat", InetHookNumber::PostRouting, 100),
    ("forward", "filter", InetHookNumber::Forward, 0),
    ("input", "filter", InetHookNumber::LocalIn, 0),
];

type Expr = ListAttribute<ExpressionAttribute>;

/// A value loaded into the registers for a set lookup.
#[derive(Debug, Clone, Copy)]
enum Load {
    IifName,
    OifName,
    Saddr,
    Daddr,
}

/// The first 32-bit register (`NFT_REG32_00`); a concatenation fills the ones after it.
const REG32_00: u32 = 8;
/// The 16-byte register 1 (`NFT_REG_1`).
const REG_1: u32 = 1;
/// Payload bases (`NFT_PAYLOAD_NETWORK_HEADER`, `NFT_PAYLOAD_TRANSPORT_HEADER`).
const NETWORK_HEADER: u32 = 1;
const TRANSPORT_HEADER: u32 = 2;

fn meta(key: MetaKey, reg: u32) -> Expr {
    Expressions::Meta(vec![Meta::DestinationRegister(Register::from(reg)), Meta::Key(key)]).into()
}

fn payload(base: u32, offset: u32, len: u32, reg: u32) -> Expr {
    Expressions::Payload(vec![
        Payload::DestinationRegister(Register::from(reg)),
        Payload::Base(base),
        Payload::Offset(offset),
        Payload::Len(len),
    ])
    .into()
}

fn cmp(op: Operator, reg: u32, data: Vec<u8>) -> Expr {
    Expressions::Cmp(vec![
        Cmp::SourceRegister(Register::from(reg)),
        Cmp::Op(op),
        Cmp::Data(DataAttribute::Value(data)),
    ])
    .into()
}

/// `<loads joined by .> @set`.
fn lookup(set: &str, loads: &[Load]) -> Vec<Expr> {
    let mut out = Vec::new();
    let mut reg = REG32_00;
    for load in loads {
        let (expr, width) = match load {
            Load::IifName => (meta(MetaKey::Iifname, reg), 4),
            Load::OifName => (meta(MetaKey::Oifname, reg), 4),
            Load::Saddr => (payload(NETWORK_HEADER, 12, 4, reg), 1),
            Load::Daddr => (payload(NETWORK_HEADER, 16, 4, reg), 1),
        };
        out.push(expr);
        reg += width;
    }
    out.push(
        Expressions::Lookup(vec![Lookup::Set(set.into()), Lookup::SourceRegister(Register::from(REG32_00))])
            .into(),
    );
    out
}

/// `ct state established,related`: the state (host byte order) masked with both bits, not zero.
fn established() -> Vec<Expr> {
    const NFTA_CT_DREG: u16 = 1;
    const NFTA_CT_KEY: u16 = 2;
    const NFT_CT_STATE: u32 = 0;
    const ESTABLISHED_RELATED: u32 = (1 << 1) | (1 << 2);
    let ct = Expressions::Other {
        expression_type: "ct".into(),
        attributes: vec![
            DefaultNla::new(NFTA_CT_DREG, REG_1.to_be_bytes().to_vec()),
            DefaultNla::new(NFTA_CT_KEY, NFT_CT_STATE.to_be_bytes().to_vec()),
        ],
    };
    let bitwise = Expressions::Bitwise(vec![
        Bitwise::SourceRegister(Register::from(REG_1)),
        Bitwise::DestinationRegister(Register::from(REG_1)),
        Bitwise::Length(4),
        Bitwise::Mask(DataAttribute::Value(ESTABLISHED_RELATED.to_ne_bytes().to_vec())),
        Bitwise::Xor(DataAttribute::Value(0u32.to_ne_bytes().to_vec())),
    ]);
    vec![ct.into(), bitwise.into(), cmp(Operator::NotEqual, REG_1, 0u32.to_ne_bytes().to_vec())]
}

fn verdict(code: u32) -> Expr {
    Expressions::Immediate(vec![
        Immediate::DestinationRegister(Register::Verdict),
        Immediate::Data(DataAttribute::Verdict(vec![VerdictAttribute::Code(Verdict::Other(code))])),
    ])
    .into()
}

/// The table's rules for `net`'s policy, by chain, in order.
pub fn rules(net: &Network) -> Vec<(&'static str, Vec<Expr>)> {
    use Load::*;
    let masquerade = Expressions::Other { expression_type: "masq".into(), attributes: vec![] }.into();
    let mut out: Vec<(&'static str, Vec<Expr>)> = Vec::new();
    let mut push = |chain, parts: Vec<Vec<Expr>>| out.push((chain, parts.concat()));
    push("postrouting", vec![lookup("masq", &[Saddr, OifName]), vec![masquerade]]);
    push("forward", vec![lookup("egress", &[IifName, Saddr, OifName]), vec![verdict(NF_ACCEPT)]]);
    push(
        "forward",
        vec![established(), lookup("egress", &[OifName, Daddr, IifName]), vec![verdict(NF_ACCEPT)]],
    );
    if net.guest_to_guest {
        push(
            "forward",
            vec![lookup("guests", &[IifName, Saddr]), lookup("taps", &[OifName]), vec![verdict(NF_ACCEPT)]],
        );
    }
    push("forward", vec![lookup("taps", &[IifName]), vec![verdict(NF_DROP)]]);
    push("forward", vec![lookup("taps", &[OifName]), vec![verdict(NF_DROP)]]);
    push("input", vec![lookup("taps", &[IifName]), established(), vec![verdict(NF_ACCEPT)]]);
    if net.guest_to_host.allow_all {
        push("input", vec![lookup("guests", &[IifName, Saddr]), vec![verdict(NF_ACCEPT)]]);
    } else {
        let mut ports = net.guest_to_host.allow.clone();
        ports.sort();
        ports.dedup();
        for p in ports {
            let proto: u8 = match p.proto {
                Proto::Tcp => 6,
                Proto::Udp => 17,
            };
            push(
                "input",
                vec![
                    lookup("gateways", &[IifName, Saddr, Daddr]),
                    vec![
                        meta(MetaKey::L4Proto, REG_1),
                        cmp(Operator::Equal, REG_1, vec![proto]),
                        payload(TRANSPORT_HEADER, 2, 2, REG_1),
                        cmp(Operator::Equal, REG_1, p.port.to_be_bytes().to_vec()),
                        verdict(NF_ACCEPT),
                    ],
                ],
            );
        }
    }
    push("input", vec![lookup("taps", &[IifName]), vec![verdict(NF_DROP)]]);
    out
}

/// The elements in one message of a set's dump (the attributes after its netfilter header),
/// read with the netlink crate's attribute iterator: the element list
/// (`NFTA_SET_ELEM_LIST_ELEMENTS`) of elements (`NFTA_LIST_ELEM`), each with its key
/// (`NFTA_SET_ELEM_KEY` holding `NFTA_DATA_VALUE`) and its comment (`NFTA_SET_ELEM_USERDATA`).
pub fn elements_of(set: &'static str, attributes: &[u8]) -> Result<Vec<Element>, DecodeError> {
    const LIST_ELEMENTS: u16 = 3;
    const LIST_ELEM: u16 = 1;
    const ELEM_KEY: u16 = 1;
    const ELEM_USERDATA: u16 = 6;
    const DATA_VALUE: u16 = 1;
    let mut out = Vec::new();
    for list in NlasIterator::new(attributes) {
        let list = list?;
        if list.kind() != LIST_ELEMENTS {
            continue;
        }
        for item in NlasIterator::new(list.value()) {
            let item = item?;
            if item.kind() != LIST_ELEM {
                continue;
            }
            let (mut key, mut tag) = (None, None);
            for a in NlasIterator::new(item.value()) {
                let a = a?;
                match a.kind() {
                    ELEM_KEY => {
                        for d in NlasIterator::new(a.value()) {
                            let d = d?;
                            if d.kind() == DATA_VALUE {
                                key = Some(d.value().to_vec());
                            }
                        }
                    }
                    ELEM_USERDATA => tag = parse_comment(a.value()),
                    _ => {}
                }
            }
            if let Some(key) = key {
                out.push(Element { set, key, tag });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use banger_policy::PortRule;
    use banger_protocol::{InstallId, VmId};

    use super::*;

    /// The test policy's network, with guest to guest and allow_all as given and udp/53 (twice)
    /// and tcp/53 allowed to the host.
    fn net(guest_to_guest: bool, allow_all: bool) -> Network {
        let mut n = crate::ops::testing::test_policy().network;
        n.guest_to_guest = guest_to_guest;
        n.guest_to_host.allow_all = allow_all;
        n.guest_to_host.allow = vec![
            PortRule { proto: Proto::Udp, port: 53 },
            PortRule { proto: Proto::Tcp, port: 53 },
            PortRule { proto: Proto::Udp, port: 53 },
        ];
        n
    }

    fn key(uid: u32, vm: &str) -> VmKey {
        VmKey::new(uid, &InstallId::new("home").unwrap(), &VmId::new(vm).unwrap())
    }

    fn vm(uid: u32, name: &str, last: u8) -> VmRules {
        let key = key(uid, name);
        VmRules {
            tap: key.tap_name(),
            key,
            guest_ip: Ipv4Addr::new(172, 30, 0, last),
            host_ip: Ipv4Addr::new(172, 30, 0, last - 1),
            uplink: "eth0".into(),
        }
    }

    /// A table with these VMs' elements and the rules of `net(false, false)`.
    fn holding(vms: &[&VmRules]) -> NftView {
        NftView {
            present: true,
            elements: vms.iter().flat_map(|v| vm_elements(v)).collect(),
            rules: wanted_rules(&net(false, false)),
        }
    }

    #[test]
    fn a_vms_elements_are_its_tap_address_gateway_and_uplink_with_its_tag() {
        let v = vm(1000, "dev", 2);
        let e = vm_elements(&v);
        assert_eq!(
            e.iter().map(|e| e.set).collect::<Vec<_>>(),
            ["taps", "guests", "egress", "masq", "gateways"]
        );
        let tap = ifname(&v.tap);
        assert_eq!(tap.len(), 16);
        assert_eq!(&tap[..v.tap.len()], v.tap.as_bytes());
        assert!(tap[v.tap.len()..].iter().all(|b| *b == 0));
        assert_eq!(e[0].key, tap);
        assert_eq!(e[3].key, [&[172, 30, 0, 2][..], &ifname("eth0")].concat());
        assert_eq!(e[4].key, [&tap[..], &[172, 30, 0, 2], &[172, 30, 0, 1]].concat());
        for (e, (set, fields)) in e.iter().zip(SETS) {
            assert_eq!(e.set, set);
            assert_eq!(e.key.len(), fields.iter().map(|f| f.len()).sum::<usize>(), "{set}");
            assert_eq!(e.tag.as_deref(), Some(v.key.rule_tag().as_str()));
        }
    }

    #[test]
    fn comments_read_back_and_anything_else_is_none() {
        let tag = key(4_294_967_295, &"x".repeat(32)).rule_tag();
        let data = comment(&tag);
        assert_eq!((data[0], usize::from(data[1])), (0, tag.len() + 1));
        assert_eq!(parse_comment(&data).as_deref(), Some(tag.as_str()));
        // Another kind first, then the comment.
        let mut two = vec![1, 2, 9, 9];
        two.extend(&data);
        assert_eq!(parse_comment(&two).as_deref(), Some(tag.as_str()));
        for bad in [&[][..], &[0], &[0, 9, b'a'], &[1, 1, 0]] {
            assert_eq!(parse_comment(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_first_vm_makes_the_table_and_the_last_one_takes_it() {
        let a = vm(1000, "a", 2);
        let n = net(false, false);
        let p = plan(&NftView::default(), std::slice::from_ref(&a), &[], &n);
        assert!(p.create && !p.refresh && !p.delete && p.del.is_empty());
        assert_eq!(p.add, vm_elements(&a));
        let msgs = p.messages(&net(false, false));
        let kinds: Vec<&str> = msgs
            .iter()
            .map(|(m, _)| match m {
                NfTablesMessage::NewTable(_) => "table",
                NfTablesMessage::NewSet(_) => "set",
                NfTablesMessage::NewChain(_) => "chain",
                NfTablesMessage::NewRule(_) => "rule",
                NfTablesMessage::NewSetElement(_) => "elements",
                _ => "other",
            })
            .collect();
        let rules = rules(&net(false, false)).len();
        let want: Vec<&str> = ["table"]
            .into_iter()
            .chain(["set"; 5])
            .chain(["chain"; 3])
            .chain(std::iter::repeat_n("rule", rules))
            .chain(["elements"; 5])
            .collect();
        assert_eq!(kinds, want);
        assert!(msgs.iter().all(|(_, flags)| flags & NLM_F_ACK != 0), "every message is acknowledged");

        let p = plan(&holding(&[&a]), &[], std::slice::from_ref(&a.key), &n);
        assert_eq!(p, NftPlan { delete: true, ..NftPlan::default() });
        assert!(matches!(p.messages(&net(false, false))[..], [(NfTablesMessage::DeleteTable(_), _)]));
        // An empty table left behind goes too.
        let p = plan(&NftView { present: true, ..NftView::default() }, &[], std::slice::from_ref(&a.key), &n);
        assert!(p.delete);
        // Nothing to take down and no table: nothing at all.
        assert!(plan(&NftView::default(), &[], std::slice::from_ref(&a.key), &n).is_empty());
    }

    /// What the batch writes is what a dump reads back: the elements' messages, emitted by the
    /// netlink crate, read with [`elements_of`].
    #[test]
    fn elements_read_back_from_the_messages_that_add_them() {
        use netlink_packet_core::Emitable as _;
        let vms = [vm(1000, "a", 2), vm(1001, "b", 6)];
        let p = NftPlan { add: vms.iter().flat_map(vm_elements).collect(), ..NftPlan::default() };
        let mut read = Vec::new();
        for (m, _) in p.messages(&net(false, false)) {
            let NfTablesMessage::NewSetElement(m) = m else { panic!("{m:?}") };
            let set = m.attributes.iter().find_map(|a| match a {
                SetElementList::Set(s) => SETS.iter().map(|(n, _)| *n).find(|n| n == s),
                _ => None,
            });
            let mut buf = vec![0; m.attributes.as_slice().buffer_len()];
            m.attributes.as_slice().emit(&mut buf);
            read.extend(elements_of(set.unwrap(), &buf).unwrap());
        }
        read.sort();
        let mut want = p.add.clone();
        want.sort();
        assert_eq!(read, want);
        assert!(elements_of("taps", &[9, 0, 3, 0, 1]).is_err(), "a cut attribute is an error");
    }

    #[test]
    fn many_elements_go_in_messages_of_at_most_a_hundred() {
        let vms: Vec<VmRules> = (0..250u32)
            .map(|i| {
                let mut v = vm(1000 + i, "a", 6);
                v.guest_ip = Ipv4Addr::from(0xac1e_0002 + 4 * i);
                v
            })
            .collect();
        let p = plan(&NftView::default(), &vms, &[], &net(false, false));
        let sizes: Vec<usize> = p
            .messages(&net(false, false))
            .iter()
            .filter_map(|(m, _)| match m {
                NfTablesMessage::NewSetElement(m) => m.attributes.iter().find_map(|a| match a {
                    SetElementList::Elements(l) => Some(l.len()),
                    _ => None,
                }),
                _ => None,
            })
            .collect();
        assert_eq!(sizes, [100, 100, 50].repeat(5));
    }

    #[test]
    fn up_again_is_nothing_and_other_vms_are_left_alone() {
        let (a, b) = (vm(1000, "a", 2), vm(1001, "b", 6));
        let n = net(false, false);
        let view = holding(&[&a, &b]);
        assert!(plan(&view, std::slice::from_ref(&a), &[], &n).is_empty());
        // Rules of another policy, or one rule missing: rewritten, even with nothing else to do.
        let p = plan(&view, &[], &[], &net(true, false));
        assert_eq!(p, NftPlan { refresh: true, ..NftPlan::default() });
        let mut one_gone = view.clone();
        one_gone.rules.remove(3);
        assert_eq!(plan(&one_gone, &[], &[], &n), NftPlan { refresh: true, ..NftPlan::default() });
        let p = plan(&view, &[], std::slice::from_ref(&b.key), &n);
        assert!(!p.delete && !p.create && !p.refresh && p.add.is_empty());
        assert_eq!(p.del, vm_elements(&b));
        // A missing element of a's comes back; b's stay as they are.
        let mut view = holding(&[&a, &b]);
        view.elements.remove(2);
        let p = plan(&view, std::slice::from_ref(&a), &[], &n);
        assert_eq!((p.add.len(), p.del.len()), (1, 0));
        assert_eq!(p.add[0], vm_elements(&a)[2]);
    }

    #[test]
    fn a_stale_element_with_a_vms_key_is_replaced_and_a_moved_vm_loses_its_old_ones() {
        let a = vm(1000, "a", 2);
        // A leftover of a deleted VM with a's guest address and uplink, under its own tag.
        let mut stale = vm(1002, "old", 2);
        stale.tap = "bgold".into();
        let n = net(false, false);
        let view = holding(&[&stale]);
        let p = plan(&view, std::slice::from_ref(&a), &[], &n);
        let masq = |e: &&Element| e.set == "masq";
        assert_eq!(p.del.iter().filter(masq).count(), 1, "{p:?}");
        assert_eq!(p.del.iter().find(masq).unwrap().tag.as_deref(), Some(stale.key.rule_tag().as_str()));
        assert_eq!(p.add, vm_elements(&a));
        // a's uplink changed: its old elements go, the new ones come.
        let mut moved = a.clone();
        moved.uplink = "wan1".into();
        let p = plan(&holding(&[&a]), std::slice::from_ref(&moved), &[], &n);
        assert_eq!(p.del.iter().map(|e| e.set).collect::<Vec<_>>(), ["egress", "masq"]);
        assert_eq!(p.add.iter().map(|e| e.set).collect::<Vec<_>>(), ["egress", "masq"]);
    }

    #[test]
    fn each_rule_is_named_by_its_place_and_the_rule_sets_digest() {
        let (closed, open) = (wanted_rules(&net(false, false)), wanted_rules(&net(true, true)));
        assert_eq!(closed.len(), rules(&net(false, false)).len());
        assert_eq!(closed[0], ("postrouting".into(), Some(format!("banger rule 1/9 {}", digest(&closed)))));
        assert_ne!(digest(&closed), digest(&open), "another policy, another digest");
        assert_eq!(wanted_rules(&net(false, false)), closed, "the same policy, the same names");
        // The comment goes into each rule's user data.
        let msgs = NftPlan { create: true, ..NftPlan::default() }.messages(&net(false, false));
        let comments: Vec<Option<String>> = msgs
            .iter()
            .filter_map(|(m, _)| match m {
                NfTablesMessage::NewRule(r) => Some(r.attributes.iter().find_map(|a| match a {
                    RuleAttribute::UserData(d) => parse_comment(d),
                    _ => None,
                })),
                _ => None,
            })
            .collect();
        assert_eq!(comments, closed.into_iter().map(|(_, c)| c).collect::<Vec<_>>());
    }

    fn digest(rules: &[(String, Option<String>)]) -> String {
        rules[0].1.as_deref().unwrap().rsplit(' ').next().unwrap().to_owned()
    }

    #[test]
    fn the_rules_follow_the_policy() {
        let count = |net: &Network, chain: &str| rules(net).iter().filter(|(c, _)| *c == chain).count();
        // Two distinct ports (udp/53 listed twice), forward: out, replies, two drops.
        let n = net(false, false);
        assert_eq!((count(&n, "postrouting"), count(&n, "forward"), count(&n, "input")), (1, 4, 4));
        let n = net(true, true);
        assert_eq!((count(&n, "postrouting"), count(&n, "forward"), count(&n, "input")), (1, 5, 3));
        // Every lookup names one of the sets, and every rule ends in a verdict or masquerade.
        for (chain, exprs) in rules(&net(true, false)) {
            let names: Vec<String> = exprs
                .iter()
                .filter_map(|e| match e {
                    ListAttribute::Element(attrs) => attrs.iter().find_map(|a| match a {
                        ExpressionAttribute::Name(n) => Some(n.clone()),
                        _ => None,
                    }),
                    _ => None,
                })
                .collect();
            let last = names.last().unwrap();
            assert!(last == "immediate" || (chain == "postrouting" && last == "masq"), "{chain}: {names:?}");
            assert!(names.iter().any(|n| n == "lookup"), "{chain}: {names:?}");
        }
    }
}
