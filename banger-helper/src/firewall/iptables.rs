//! The iptables backend's rules as data: what it reads back from `iptables-save`, what a VM's NAT
//! should look like, and the batch of changes that takes one to the other.
//!
//! The helper only ever touches its own chains — `BANGER-FORWARD` and `BANGER-INPUT` in `filter`,
//! `BANGER-POSTROUTING` in `nat` — and the single jump into each from the built-in chain. Every rule
//! in them carries the tag of its VM (`banger uid=U inst=I vm=V`, see [`crate::names`]), so the
//! rules of one VM are found by tag, never by position.
//!
//! Flow of a change: [`FirewallView::parse_save`] reads the current state, [`plan_vm_rules`] works
//! out the difference for some VMs, and [`FirewallBatch::render`] turns it into one
//! `iptables-restore --noflush` input. Rules are written in the canonical order `iptables-save`
//! prints, so an unchanged rule set compares equal and "up twice" is a no-op.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use banger_policy::{Network, Proto};

use super::VmRules;
use crate::names::VmKey;

/// An iptables table the helper uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// `filter`.
    Filter,
    /// `nat`.
    Nat,
}

impl Table {
    /// The table's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Table::Filter => "filter",
            Table::Nat => "nat",
        }
    }
}

/// The helper's forward chain (filter).
pub const FORWARD_CHAIN: &str = "BANGER-FORWARD";
/// The helper's input chain (filter).
pub const INPUT_CHAIN: &str = "BANGER-INPUT";
/// The helper's postrouting chain (nat).
pub const POSTROUTING_CHAIN: &str = "BANGER-POSTROUTING";

/// The helper's chains: table, built-in chain that jumps to it, and its name.
pub const CHAINS: [(Table, &str, &str); 3] = [
    (Table::Filter, "FORWARD", FORWARD_CHAIN),
    (Table::Filter, "INPUT", INPUT_CHAIN),
    (Table::Nat, "POSTROUTING", POSTROUTING_CHAIN),
];

/// One rule in one of the helper's chains: `-A <chain> <spec>` in `iptables-save` form.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    /// The table.
    pub table: Table,
    /// The chain (one of [`CHAINS`]).
    pub chain: &'static str,
    /// Everything after `-A <chain> `.
    pub spec: String,
}

impl Rule {
    /// The tag in the rule's comment, if it has one.
    pub fn tag(&self) -> Option<&str> {
        let start = self.spec.find("--comment \"")? + "--comment \"".len();
        let len = self.spec[start..].find('"')?;
        Some(&self.spec[start..start + len])
    }
}

/// What the helper's part of the firewall looks like now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirewallView {
    /// The helper's chains that exist, by table.
    pub chains: BTreeSet<(Table, &'static str)>,
    /// Jumps from a built-in chain into one of the helper's chains, with how often each appears.
    pub jumps: BTreeMap<(Table, &'static str), usize>,
    /// The rules in the helper's chains, in order.
    pub rules: Vec<Rule>,
}

/// Why `iptables-save` output could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot read iptables-save output line {line}: {reason}")]
pub struct SaveParseError {
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

fn our_chain(name: &str) -> Option<(Table, &'static str)> {
    CHAINS.iter().find(|(_, _, c)| *c == name).map(|(t, _, c)| (*t, *c))
}

impl FirewallView {
    /// Reads the helper's chains, jumps and rules out of `iptables-save` output (any tables; only
    /// `filter` and `nat` are looked at, and in them only the helper's chains and jumps).
    pub fn parse_save(text: &str) -> Result<FirewallView, SaveParseError> {
        let mut view = FirewallView::default();
        let mut table: Option<Table> = None;
        let mut in_other_table = false;
        for (i, line) in text.lines().enumerate() {
            let err = |reason: &str| SaveParseError { line: i + 1, reason: reason.to_owned() };
            let line = line.trim_end();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('*') {
                table = match name {
                    "filter" => Some(Table::Filter),
                    "nat" => Some(Table::Nat),
                    _ => None,
                };
                in_other_table = table.is_none();
                continue;
            }
            if line == "COMMIT" {
                table = None;
                in_other_table = false;
                continue;
            }
            if in_other_table {
                continue;
            }
            let Some(t) = table else {
                return Err(err("rule or chain outside of a table"));
            };
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split(' ').next().unwrap_or_default();
                if let Some((ct, c)) = our_chain(name)
                    && ct == t
                {
                    view.chains.insert((t, c));
                }
                continue;
            }
            let Some(rest) = line.strip_prefix("-A ") else {
                return Err(err("expected `-A`, a chain declaration or COMMIT"));
            };
            let (chain, spec) = rest.split_once(' ').ok_or_else(|| err("rule without a specification"))?;
            if let Some((ct, c)) = our_chain(chain) {
                if ct == t {
                    view.rules.push(Rule { table: t, chain: c, spec: spec.to_owned() });
                }
                continue;
            }
            for (ct, parent, c) in CHAINS {
                if ct == t && chain == parent && spec == format!("-j {c}") {
                    *view.jumps.entry((t, c)).or_default() += 1;
                }
            }
        }
        Ok(view)
    }

    /// The rules carrying exactly this tag.
    pub fn tagged<'a>(&'a self, tag: &'a str) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules.iter().filter(move |r| r.tag() == Some(tag))
    }

    /// Every VM that has at least one tagged rule.
    pub fn vms(&self) -> BTreeSet<VmKey> {
        self.rules.iter().filter_map(|r| r.tag()).filter_map(VmKey::parse_rule_tag).collect()
    }
}

/// One change to the firewall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Create one of the helper's chains.
    CreateChain(Table, &'static str),
    /// Insert the jump into a helper chain at the top of its built-in chain.
    InsertJump(Table, &'static str),
    /// Delete a rule.
    Delete(Rule),
    /// Append a rule.
    Append(Rule),
    /// Delete the jump into a helper chain.
    DeleteJump(Table, &'static str),
    /// Delete an (empty) helper chain.
    DeleteChain(Table, &'static str),
}

/// A set of changes applied as one `iptables-restore --noflush` run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirewallBatch {
    /// The changes; [`FirewallBatch::render`] orders them per table.
    pub changes: Vec<Change>,
}

fn parent_of(chain: &str) -> &'static str {
    CHAINS.iter().find(|(_, _, c)| *c == chain).map(|(_, p, _)| *p).unwrap_or("FORWARD")
}

impl FirewallBatch {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The `iptables-restore --noflush` input: per table, chains first, then deletions, appends,
    /// jumps, and finally the removal of jumps and chains that are no longer used.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for table in [Table::Filter, Table::Nat] {
            let mut lines: [Vec<String>; 6] = Default::default();
            for c in &self.changes {
                match c {
                    Change::CreateChain(t, name) if *t == table => lines[0].push(format!(":{name} - [0:0]")),
                    Change::Delete(r) if r.table == table => {
                        lines[1].push(format!("-D {} {}", r.chain, r.spec))
                    }
                    Change::Append(r) if r.table == table => {
                        lines[2].push(format!("-A {} {}", r.chain, r.spec))
                    }
                    Change::InsertJump(t, name) if *t == table => {
                        lines[3].push(format!("-I {} -j {name}", parent_of(name)))
                    }
                    Change::DeleteJump(t, name) if *t == table => {
                        lines[4].push(format!("-D {} -j {name}", parent_of(name)))
                    }
                    Change::DeleteChain(t, name) if *t == table => lines[5].push(format!("-X {name}")),
                    Change::CreateChain(..)
                    | Change::Delete(_)
                    | Change::Append(_)
                    | Change::InsertJump(..)
                    | Change::DeleteJump(..)
                    | Change::DeleteChain(..) => {}
                }
            }
            if lines.iter().all(Vec::is_empty) {
                continue;
            }
            let _ = writeln!(out, "*{}", table.as_str());
            for l in lines.iter().flatten() {
                out.push_str(l);
                out.push('\n');
            }
            out.push_str("COMMIT\n");
        }
        out
    }
}

/// The rules one VM's NAT consists of, in `iptables-save`'s canonical form and in order:
///
/// - nat: MASQUERADE what the guest sends out of the uplink;
/// - forward: accept from the guest's own address on its TAP to the uplink, accept replies back,
///   accept guest to guest only if the policy allows it, then drop everything else from or to the
///   TAP (spoofed sources, other interfaces);
/// - input: accept replies, the policy's ports on the gateway address (or everything from the
///   guest's own address if the policy allows all), drop the rest from the TAP.
pub fn vm_rules(vm: &VmRules, net: &Network) -> Vec<Rule> {
    let tag = format!("-m comment --comment \"{}\"", vm.key.rule_tag());
    let (g, h, tap, up) = (vm.guest_ip, vm.host_ip, vm.tap.as_str(), vm.uplink.as_str());
    let est = "-m conntrack --ctstate RELATED,ESTABLISHED";
    let mut rules = Vec::new();
    let mut push = |table, chain, spec: String| rules.push(Rule { table, chain, spec });
    push(Table::Nat, POSTROUTING_CHAIN, format!("-s {g}/32 -o {up} {tag} -j MASQUERADE"));
    push(Table::Filter, FORWARD_CHAIN, format!("-s {g}/32 -i {tap} -o {up} {tag} -j ACCEPT"));
    push(Table::Filter, FORWARD_CHAIN, format!("-d {g}/32 -i {up} -o {tap} {est} {tag} -j ACCEPT"));
    if net.guest_to_guest {
        let any_tap = format!("{}+", crate::names::TAP_PREFIX);
        push(Table::Filter, FORWARD_CHAIN, format!("-s {g}/32 -i {tap} -o {any_tap} {tag} -j ACCEPT"));
        push(Table::Filter, FORWARD_CHAIN, format!("-d {g}/32 -i {any_tap} -o {tap} {tag} -j ACCEPT"));
    }
    push(Table::Filter, FORWARD_CHAIN, format!("-i {tap} {tag} -j DROP"));
    push(Table::Filter, FORWARD_CHAIN, format!("-o {tap} {tag} -j DROP"));
    push(Table::Filter, INPUT_CHAIN, format!("-i {tap} {est} {tag} -j ACCEPT"));
    if net.guest_to_host.allow_all {
        push(Table::Filter, INPUT_CHAIN, format!("-s {g}/32 -i {tap} {tag} -j ACCEPT"));
    } else {
        let mut ports = net.guest_to_host.allow.clone();
        ports.sort();
        ports.dedup();
        for p in ports {
            let proto = match p.proto {
                Proto::Tcp => "tcp",
                Proto::Udp => "udp",
            };
            push(
                Table::Filter,
                INPUT_CHAIN,
                format!(
                    "-s {g}/32 -d {h}/32 -i {tap} -p {proto} -m {proto} --dport {} {tag} -j ACCEPT",
                    p.port
                ),
            );
        }
    }
    push(Table::Filter, INPUT_CHAIN, format!("-i {tap} {tag} -j DROP"));
    rules
}

/// The batch that makes the firewall hold exactly `wanted` for the VMs in `up` and nothing for the
/// VMs in `down`, starting from `view`. Other VMs' rules are never touched. Chains and jumps are
/// created when rules are about to be added and removed when no rule is left in any helper chain.
pub fn plan_vm_rules(view: &FirewallView, up: &[(VmKey, Vec<Rule>)], down: &[VmKey]) -> FirewallBatch {
    let mut batch = FirewallBatch::default();
    let mut remaining: Vec<&Rule> = view.rules.iter().collect();
    let mut appends = Vec::new();
    for (key, wanted) in up {
        let tag = key.rule_tag();
        let have: Vec<&Rule> = view.tagged(&tag).collect();
        if have.len() == wanted.len() && have.iter().zip(wanted).all(|(a, b)| *a == b) {
            continue;
        }
        for r in have {
            batch.changes.push(Change::Delete(r.clone()));
        }
        remaining.retain(|r| r.tag() != Some(tag.as_str()));
        appends.extend(wanted.iter().cloned());
    }
    for key in down {
        let tag = key.rule_tag();
        for r in view.tagged(&tag) {
            batch.changes.push(Change::Delete(r.clone()));
        }
        remaining.retain(|r| r.tag() != Some(tag.as_str()));
    }
    let empty_after = remaining.is_empty() && appends.is_empty();
    if !appends.is_empty() {
        for (t, _, c) in CHAINS {
            if !view.chains.contains(&(t, c)) {
                batch.changes.push(Change::CreateChain(t, c));
            }
        }
    }
    if !appends.is_empty() || !empty_after {
        for (t, _, c) in CHAINS {
            if view.jumps.get(&(t, c)).copied().unwrap_or(0) == 0 {
                batch.changes.push(Change::InsertJump(t, c));
            }
        }
    }
    batch.changes.extend(appends.into_iter().map(Change::Append));
    if empty_after && !view.rules.is_empty() {
        for (t, _, c) in CHAINS {
            for _ in 0..view.jumps.get(&(t, c)).copied().unwrap_or(0) {
                batch.changes.push(Change::DeleteJump(t, c));
            }
            if view.chains.contains(&(t, c)) {
                batch.changes.push(Change::DeleteChain(t, c));
            }
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use banger_policy::PortRule;
    use banger_protocol::{InstallId, VmId};

    use std::net::Ipv4Addr;

    use super::*;
    use crate::kernel::fake::apply_to_view;

    /// The test policy's network, with udp/53 and tcp/53 allowed to the host.
    fn net() -> Network {
        let mut n = crate::ops::testing::test_policy().network;
        n.guest_to_host.allow =
            vec![PortRule { proto: Proto::Udp, port: 53 }, PortRule { proto: Proto::Tcp, port: 53 }];
        n
    }

    fn key(vm: &str) -> VmKey {
        VmKey::new(1000, &InstallId::new("home").unwrap(), &VmId::new(vm).unwrap())
    }

    fn vm(name: &str, guest: [u8; 4]) -> VmRules {
        let k = key(name);
        VmRules {
            tap: k.tap_name(),
            key: k,
            guest_ip: guest.into(),
            host_ip: Ipv4Addr::from(u32::from(Ipv4Addr::from(guest)) - 1),
            uplink: "eth0".into(),
        }
    }

    /// What `iptables-save` printed for these exact rules on this kind of machine (nf_tables and
    /// legacy backends print the same).
    const SAVED: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:BANGER-FORWARD - [0:0]
:BANGER-INPUT - [0:0]
-A INPUT -j BANGER-INPUT
-A FORWARD -j BANGER-FORWARD
-A FORWARD -i docker0 -j ACCEPT
-A BANGER-FORWARD -s 172.30.0.2/32 -i bgabc -o eth0 -m comment --comment "banger uid=1 inst=a vm=b" -j ACCEPT
-A BANGER-FORWARD -d 172.30.0.2/32 -i eth0 -o bgabc -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment "banger uid=1 inst=a vm=b" -j ACCEPT
-A BANGER-INPUT -s 172.30.0.2/32 -d 172.30.0.1/32 -i bgabc -p udp -m udp --dport 53 -m comment --comment "banger uid=1 inst=a vm=b" -j ACCEPT
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
-A PREROUTING -j BANGER-FORWARD
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:BANGER-POSTROUTING - [0:0]
-A POSTROUTING -j BANGER-POSTROUTING
-A BANGER-POSTROUTING -s 172.30.0.2/32 -o eth0 -m comment --comment "banger uid=1 inst=a vm=b" -j MASQUERADE
COMMIT
"#;

    #[test]
    fn parses_only_the_helper_chains() {
        let v = FirewallView::parse_save(SAVED).unwrap();
        assert_eq!(v.chains.len(), 3);
        assert_eq!(v.jumps.len(), 3);
        assert_eq!(v.rules.len(), 4);
        assert!(v.rules.iter().all(|r| r.tag() == Some("banger uid=1 inst=a vm=b")));
        assert_eq!(v.vms().len(), 1);
        assert_eq!(v.rules[3].table, Table::Nat);
    }

    #[test]
    fn refuses_garbage() {
        assert!(FirewallView::parse_save("-A FORWARD -j X\n").is_err());
        assert!(FirewallView::parse_save("*filter\nbogus\n").is_err());
    }

    #[test]
    fn rules_use_the_canonical_form() {
        let rules = vm_rules(&vm("b", [172, 30, 0, 2]), &net());
        let tag = key("b").rule_tag();
        assert!(rules.iter().all(|r| r.tag() == Some(tag.as_str())));
        let tap = key("b").tap_name();
        let specs: Vec<&str> = rules.iter().map(|r| r.spec.as_str()).collect();
        assert_eq!(
            specs[0],
            format!("-s 172.30.0.2/32 -o eth0 -m comment --comment \"{tag}\" -j MASQUERADE")
        );
        assert_eq!(
            specs[2],
            format!(
                "-d 172.30.0.2/32 -i eth0 -o {tap} -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment \"{tag}\" -j ACCEPT"
            )
        );
        // Ports are sorted (tcp before udp) and only on the gateway address.
        assert!(specs.iter().any(|s| s.starts_with("-s 172.30.0.2/32 -d 172.30.0.1/32 -i")
            && s.contains("-p tcp -m tcp --dport 53")));
        // The last input and forward rules drop.
        assert!(rules.last().unwrap().spec.ends_with("-j DROP"));
        assert!(!specs.iter().any(|s| s.contains("bg+")), "guest to guest is off by default");
    }

    #[test]
    fn policy_switches_change_the_rules() {
        let mut n = net();
        n.guest_to_guest = true;
        n.guest_to_host.allow_all = true;
        let rules = vm_rules(&vm("b", [172, 30, 0, 2]), &n);
        assert!(rules.iter().any(|r| r.spec.contains("-o bg+")));
        assert!(!rules.iter().any(|r| r.spec.contains("--dport")));
    }

    #[test]
    fn up_on_an_empty_firewall_creates_chains_jumps_and_rules_once() {
        let empty = FirewallView::default();
        let wanted = vm_rules(&vm("b", [172, 30, 0, 2]), &net());
        let batch = plan_vm_rules(&empty, &[(key("b"), wanted.clone())], &[]);
        let after = apply_to_view(&empty, &batch).unwrap();
        assert_eq!(after.rules, wanted);
        assert_eq!(after.chains.len(), 3);
        assert_eq!(after.jumps.values().sum::<usize>(), 3);
        let text = batch.render();
        assert!(text.starts_with("*filter\n:BANGER-FORWARD - [0:0]\n"), "{text}");
        assert!(text.contains("-I FORWARD -j BANGER-FORWARD\n"));
        assert!(text.contains("*nat\n:BANGER-POSTROUTING - [0:0]\n"));
        assert_eq!(text.matches("COMMIT").count(), 2);
        // Up again: nothing to do.
        assert!(plan_vm_rules(&after, &[(key("b"), wanted)], &[]).is_empty());
    }

    #[test]
    fn up_repairs_a_partial_rule_set_and_keeps_other_vms() {
        let wanted_b = vm_rules(&vm("b", [172, 30, 0, 2]), &net());
        let wanted_c = vm_rules(&vm("c", [172, 30, 0, 6]), &net());
        let mut view = FirewallView::default();
        view = apply_to_view(&view, &plan_vm_rules(&view, &[(key("b"), wanted_b.clone())], &[])).unwrap();
        view = apply_to_view(&view, &plan_vm_rules(&view, &[(key("c"), wanted_c.clone())], &[])).unwrap();
        // Someone removed one of c's rules.
        let lost = view.rules.iter().position(|r| r == &wanted_c[1]).unwrap();
        view.rules.remove(lost);
        let batch = plan_vm_rules(&view, &[(key("c"), wanted_c.clone())], &[]);
        let after = apply_to_view(&view, &batch).unwrap();
        assert_eq!(after.tagged(&key("c").rule_tag()).count(), wanted_c.len());
        assert_eq!(after.tagged(&key("b").rule_tag()).cloned().collect::<Vec<_>>(), wanted_b);
        assert!(!batch.changes.iter().any(|c| matches!(c, Change::CreateChain(..) | Change::InsertJump(..))));
    }

    #[test]
    fn down_removes_only_that_vm_and_the_chains_with_the_last() {
        let wanted_b = vm_rules(&vm("b", [172, 30, 0, 2]), &net());
        let wanted_c = vm_rules(&vm("c", [172, 30, 0, 6]), &net());
        let mut view = FirewallView::default();
        let up = plan_vm_rules(&view, &[(key("b"), wanted_b), (key("c"), wanted_c.clone())], &[]);
        view = apply_to_view(&view, &up).unwrap();
        let down_b = plan_vm_rules(&view, &[], &[key("b")]);
        assert!(!down_b.changes.iter().any(|c| matches!(c, Change::DeleteChain(..))));
        view = apply_to_view(&view, &down_b).unwrap();
        assert_eq!(view.rules, wanted_c);
        // Down when absent: nothing to do.
        assert!(plan_vm_rules(&view, &[], &[key("b")]).is_empty());
        let down_c = plan_vm_rules(&view, &[], &[key("c")]);
        let text = down_c.render();
        let (jump, chain) = (text.find("-D FORWARD -j BANGER-FORWARD\n"), text.find("-X BANGER-FORWARD\n"));
        assert!(jump.is_some() && chain.is_some() && jump < chain, "{text}");
        view = apply_to_view(&view, &down_c).unwrap();
        assert_eq!(view, FirewallView::default());
    }

    #[test]
    fn many_vms_go_down_in_one_batch() {
        let mut view = FirewallView::default();
        let vms: Vec<(VmKey, Vec<Rule>)> = (0..20u8)
            .map(|i| {
                let name = format!("vm{i}");
                (key(&name), vm_rules(&vm(&name, [172, 30, 0, 4 * i + 2]), &net()))
            })
            .collect();
        view = apply_to_view(&view, &plan_vm_rules(&view, &vms, &[])).unwrap();
        let keys: Vec<VmKey> = vms.iter().map(|(k, _)| k.clone()).collect();
        let batch = plan_vm_rules(&view, &[], &keys);
        assert_eq!(apply_to_view(&view, &batch).unwrap(), FirewallView::default());
        assert_eq!(batch.render().matches("COMMIT").count(), 2);
    }

    #[test]
    fn a_missing_jump_is_restored_while_rules_remain() {
        let wanted = vm_rules(&vm("b", [172, 30, 0, 2]), &net());
        let mut view = FirewallView::default();
        view = apply_to_view(&view, &plan_vm_rules(&view, &[(key("b"), wanted.clone())], &[])).unwrap();
        view.jumps.remove(&(Table::Filter, FORWARD_CHAIN));
        let batch = plan_vm_rules(&view, &[(key("b"), wanted)], &[]);
        assert_eq!(batch.changes, vec![Change::InsertJump(Table::Filter, FORWARD_CHAIN)]);
    }

    proptest::proptest! {
        /// Whatever the order of ups and downs, every plan applies cleanly, applying it again is a
        /// no-op, exactly the VMs that are up have exactly their rules, and the chains and jumps
        /// exist (once each) exactly while some VM is up.
        #[test]
        fn any_sequence_of_ups_and_downs_converges(
            steps in proptest::collection::vec((0u8..6, proptest::bool::ANY), 1..40)
        ) {
            let mut view = FirewallView::default();
            let mut up = std::collections::BTreeSet::new();
            let rules_of = |i: u8| vm_rules(&vm(&format!("vm{i}"), [172, 30, 0, 4 * i + 2]), &net());
            for (i, is_up) in steps {
                let k = key(&format!("vm{i}"));
                let plan = |v: &FirewallView| {
                    if is_up { plan_vm_rules(v, &[(k.clone(), rules_of(i))], &[]) } else { plan_vm_rules(v, &[], std::slice::from_ref(&k)) }
                };
                view = apply_to_view(&view, &plan(&view)).map_err(proptest::test_runner::TestCaseError::fail)?;
                proptest::prop_assert!(plan(&view).is_empty());
                if is_up { up.insert(i); } else { up.remove(&i); }
                for j in 0u8..6 {
                    let have: Vec<Rule> = view.tagged(&key(&format!("vm{j}")).rule_tag()).cloned().collect();
                    let want = if up.contains(&j) { rules_of(j) } else { vec![] };
                    proptest::prop_assert_eq!(have, want);
                }
                let expect_chains = if up.is_empty() { 0 } else { 3 };
                proptest::prop_assert_eq!(view.chains.len(), expect_chains);
                proptest::prop_assert_eq!(view.jumps.values().filter(|n| **n == 1).count(), expect_chains);
            }
        }
    }
}
