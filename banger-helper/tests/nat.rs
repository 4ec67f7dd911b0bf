//! NAT up and down through the real helper, with each firewall backend: checked with
//! `iptables -S` and `nft list table ip banger` inside the namespace.

mod common;

use banger_protocol::{HelperError, Request, Response};
use common::*;

/// `uid`'s VM `name` (install `n`) given its TAP and NAT.
fn bring_up(h: &Helper, uid: u32, name: &str) {
    let r = session(h, uid, "n", vec![Request::TapCreate { vm: vm(name) }, Request::NatUp { vm: vm(name) }]);
    assert!(matches!(r[2], Response::Nat(_)), "{r:?}\n{}", h.log_text());
}

/// Proves neither iptables nor nftables holds a banger rule, then stops the helper and removes
/// the namespace.
fn no_rules_left(h: Helper, ns: Netns) {
    assert!(ns.banger_rules().is_empty(), "{:?}", ns.banger_rules());
    drop(h);
    ns.finish();
}

/// `uid`'s VM `name` (install `n`) torn down, without failures.
fn tear_down(h: &Helper, uid: u32, name: &str) {
    let r = session(h, uid, "n", vec![Request::TeardownVms { vms: vec![vm(name)] }]);
    assert!(matches!(&r[1], Response::Teardown(t) if t.failures.is_empty()), "{r:?}");
}

#[test]
#[ignore = "needs root: network namespace, iptables and the real helper"]
fn iptables_nat_up_is_idempotent_and_down_removes_everything() {
    if !root_or_skip("iptables_nat_up_is_idempotent_and_down_removes_everything") {
        return;
    }
    let (a, b) = (61021, 61022);
    let ns = Netns::new("nat");
    let forwarding_before = ns.read("/proc/sys/net/ipv4/ip_forward");
    assert_eq!(forwarding_before.as_deref(), Some("0"), "a new namespace starts without forwarding");
    let extra = "[network]\nfirewall = \"iptables\"\n[network.guest_to_host]\nallow = [\"udp/53\"]\n";
    let h = Helper::start(&ns, &policy(&[a, b], extra));
    let r = session(
        &h,
        a,
        "n",
        vec![
            Request::NatUp { vm: vm("web") },
            Request::TapCreate { vm: vm("web") },
            Request::NatUp { vm: vm("web") },
        ],
    );
    assert!(matches!(r[1], Response::Error(HelperError::NotFound { .. })), "nat before tap: {:?}", r[1]);
    let Response::Tap(tap) = &r[2] else { panic!("{r:?}") };
    let Response::Nat(nat) = &r[3] else { panic!("{:?}\n{}", r[3], h.log_text()) };
    assert_eq!(nat.uplink, "up0", "the default route's interface");
    assert_eq!(nat.guest_ip, tap.guest_ip);
    assert_eq!(ns.read("/proc/sys/net/ipv4/ip_forward").as_deref(), Some("1"));

    let tag = format!("banger uid={a} inst=n vm=web");
    let rules = ns.banger_rules();
    let tagged: Vec<&String> = rules.iter().filter(|l| l.contains(&tag)).collect();
    let g = tap.guest_ip;
    let t = &tap.name;
    let want = [
        format!("-A BANGER-POSTROUTING -s {g}/32 -o up0 -m comment --comment \"{tag}\" -j MASQUERADE"),
        format!("-A BANGER-FORWARD -s {g}/32 -i {t} -o up0 -m comment --comment \"{tag}\" -j ACCEPT"),
        format!(
            "-A BANGER-FORWARD -d {g}/32 -i up0 -o {t} -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment \"{tag}\" -j ACCEPT"
        ),
        format!("-A BANGER-FORWARD -i {t} -m comment --comment \"{tag}\" -j DROP"),
        format!("-A BANGER-FORWARD -o {t} -m comment --comment \"{tag}\" -j DROP"),
        format!(
            "-A BANGER-INPUT -i {t} -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment \"{tag}\" -j ACCEPT"
        ),
        format!(
            "-A BANGER-INPUT -s {g}/32 -d {}/32 -i {t} -p udp -m udp --dport 53 -m comment --comment \"{tag}\" -j ACCEPT",
            tap.host_ip
        ),
        format!("-A BANGER-INPUT -i {t} -m comment --comment \"{tag}\" -j DROP"),
    ];
    for w in &want {
        assert!(rules.contains(w), "missing {w}\nin {rules:#?}");
    }
    assert_eq!(tagged.len(), want.len(), "{rules:#?}");
    for jump in
        ["-A FORWARD -j BANGER-FORWARD", "-A INPUT -j BANGER-INPUT", "-A POSTROUTING -j BANGER-POSTROUTING"]
    {
        assert_eq!(rules.iter().filter(|l| *l == jump).count(), 1, "{jump} in {rules:#?}");
    }

    // Up again: the same rules, not twice.
    let r = session(&h, a, "n", vec![Request::NatUp { vm: vm("web") }]);
    assert_eq!(&r[1], &Response::Nat(nat.clone()));
    assert_eq!(ns.banger_rules(), rules, "up twice changed the rules");

    // Someone else removes one of the rules: the helper notices and puts it back on the next up.
    ns.sh(&["iptables", "-D", "BANGER-FORWARD", "-o", t, "-m", "comment", "--comment", &tag, "-j", "DROP"]);
    assert_ne!(ns.banger_rules(), rules);
    let r = session(&h, a, "n", vec![Request::NatUp { vm: vm("web") }]);
    assert_eq!(&r[1], &Response::Nat(nat.clone()));
    assert_eq!(ns.banger_rules(), rules, "an outside change was not noticed");

    // b cannot remove a's rules, whatever it names.
    tear_down(&h, b, "web");
    assert_eq!(ns.banger_rules(), rules, "b changed a's rules");
    // The helper turned forwarding on itself; no client can set a sysctl.
    assert_eq!(ns.read("/proc/sys/net/ipv4/ip_forward").as_deref(), Some("1"));

    // Teardown, twice: everything gone, chains and jumps included.
    let teardown = Request::TeardownVms { vms: vec![vm("web")] };
    let r = session(&h, a, "n", vec![teardown.clone(), teardown, Request::ListOwned]);
    assert!(r[1..3].iter().all(|x| matches!(x, Response::Teardown(t) if t.failures.is_empty())), "{r:?}");
    assert_eq!(ns.banger_rules(), Vec::<String>::new());
    let Response::Owned(o) = &r[3] else { panic!("{r:?}") };
    assert!(o.taps.is_empty() && o.nat.is_empty() && o.loops.is_empty(), "{o:?}");
    assert!(ns.taps().is_empty());
    // The helper turned forwarding on for the NAT, so with the last NAT gone it is off again.
    assert_eq!(ns.read("/proc/sys/net/ipv4/ip_forward"), forwarding_before, "{}", h.log_text());
    drop(h);
    ns.finish();
}

#[test]
#[ignore = "needs root: network namespace, iptables and the real helper"]
fn teardown_of_many_vms_leaves_nothing() {
    if !root_or_skip("teardown_of_many_vms_leaves_nothing") {
        return;
    }
    let a = 61023;
    let ns = Netns::new("natmany");
    let h = Helper::start(&ns, &policy(&[a], ""));
    let names: Vec<String> = (0..8).map(|i| format!("vm{i}")).collect();
    let mut reqs = Vec::new();
    for n in &names {
        reqs.push(Request::TapCreate { vm: vm(n) });
        reqs.push(Request::NatUp { vm: vm(n) });
    }
    let r = session(&h, a, "many", reqs);
    assert!(r[1..].iter().all(|x| matches!(x, Response::Tap(_) | Response::Nat(_))), "{r:?}");
    assert_eq!(ns.taps().len(), 8);
    let r = session(&h, a, "many", vec![Request::TeardownVms { vms: names.iter().map(|n| vm(n)).collect() }]);
    let Response::Teardown(t) = &r[1] else { panic!("{r:?}") };
    assert!(t.failures.is_empty(), "{t:?}");
    assert_eq!(t.torn_down.len(), 8);
    assert!(ns.taps().is_empty(), "{:?}", ns.taps());
    no_rules_left(h, ns);
}

/// The nftables backend: the helper's own table, whose per-VM part is set elements carrying the
/// VM's tag as their comment; up twice changes nothing, an element someone removed comes back
/// on the next up, another user's teardown touches nothing, and the table goes with the last VM.
#[test]
#[ignore = "needs root: network namespace, nf_tables and the real helper"]
fn nftables_nat_is_set_elements_and_the_table_goes_with_the_last_vm() {
    if !root_or_skip("nftables_nat_is_set_elements_and_the_table_goes_with_the_last_vm") {
        return;
    }
    let (a, b) = (61024, 61025);
    let ns = Netns::new("natnft");
    let extra = "[network]\nfirewall = \"nftables\"\n[network.guest_to_host]\nallow = [\"udp/53\"]\n";
    let h = Helper::start(&ns, &policy(&[a, b], extra));
    let reqs = vec![Request::TapCreate { vm: vm("web") }, Request::NatUp { vm: vm("web") }];
    let r = session(&h, a, "n", reqs);
    let Response::Hello(hello) = &r[0] else { panic!("{r:?}") };
    assert_eq!(hello.capabilities.firewall, banger_protocol::FirewallBackend::Nftables);
    let Response::Tap(tap) = &r[1] else { panic!("{r:?}") };
    let Response::Nat(nat) = &r[2] else { panic!("{:?}\n{}", r[2], h.log_text()) };
    assert_eq!(nat.uplink, "up0");
    assert!(ns.sh(&["iptables-save"]).lines().all(|l| !l.contains("BANGER")), "no iptables rule");

    let table = ns.nft_table();
    let (t, g, gw) = (&tap.name, tap.guest_ip, tap.host_ip);
    let tag = format!("comment \"banger uid={a} inst=n vm=web\"");
    for want in [
        format!("\"{t}\" {tag}"),
        format!("\"{t}\" . {g} {tag}"),
        format!("\"{t}\" . {g} . \"up0\" {tag}"),
        format!("{g} . \"up0\" {tag}"),
        format!("\"{t}\" . {g} . {gw} {tag}"),
        "ip saddr . oifname @masq masquerade".to_owned(),
        "iifname . ip saddr . oifname @egress accept".to_owned(),
        "iifname @taps drop".to_owned(),
        "oifname @taps drop".to_owned(),
        "udp dport 53 accept".to_owned(),
    ] {
        assert!(table.contains(&want), "missing {want:?} in\n{table}");
    }
    assert!(!table.contains("@guests oifname @taps accept"), "guest_to_guest is off:\n{table}");

    // Up again: nothing changes.
    let r = session(&h, a, "n", vec![Request::NatUp { vm: vm("web") }]);
    assert_eq!(&r[1], &Response::Nat(nat.clone()));
    assert_eq!(ns.nft_table(), table, "up twice changed the table");

    // Someone removes one element: the next up puts it back.
    ns.sh(&["nft", "delete", "element", "ip", "banger", "taps", &format!("{{ \"{t}\" }}")]);
    assert_ne!(ns.nft_table(), table);
    let r = session(&h, a, "n", vec![Request::NatUp { vm: vm("web") }]);
    assert_eq!(&r[1], &Response::Nat(nat.clone()));
    assert_eq!(ns.nft_table(), table, "an outside change was not noticed");

    // b's VM beside a's; b's teardown naming a's VM id touches only b's own.
    bring_up(&h, b, "db");
    let both = ns.nft_table();
    tear_down(&h, b, "web");
    assert_eq!(ns.nft_table(), both, "b changed a's elements");
    tear_down(&h, b, "db");
    assert_eq!(ns.nft_table(), table, "b's teardown left a's elements as they were");

    // The last VM's teardown takes the table with it.
    tear_down(&h, a, "web");
    assert_eq!(ns.nft_table(), "", "the table outlived its last VM");
    no_rules_left(h, ns);
}

/// A helper started with another policy rewrites the nftables table's rules from it at start,
/// keeping the running VMs' elements.
#[test]
#[ignore = "needs root: network namespace, nf_tables and the real helper"]
fn a_restarted_helper_rewrites_the_nftables_rules_from_its_policy() {
    if !root_or_skip("a_restarted_helper_rewrites_the_nftables_rules_from_its_policy") {
        return;
    }
    let a = 61026;
    let ns = Netns::new("natpol");
    let h = Helper::start(&ns, &policy(&[a], "[network]\nfirewall = \"nftables\"\n"));
    bring_up(&h, a, "web");
    let before = ns.nft_table();
    assert!(
        !before.contains("@guests oifname @taps accept") && !before.contains("@guests accept"),
        "{before}"
    );

    let dir = h.stop();
    let open = "[network]\nfirewall = \"nftables\"\nguest_to_guest = true\n[network.guest_to_host]\nallow_all = true\n";
    let h = Helper::start_in(&ns, dir, &policy(&[a], open));
    let after = ns.nft_table();
    for want in ["iifname . ip saddr @guests oifname @taps accept", "iifname . ip saddr @guests accept"] {
        assert!(after.contains(want), "missing {want:?} in\n{after}\n{}", h.log_text());
    }
    let elements =
        |t: &str| t.lines().filter(|l| l.contains("elements")).map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(elements(&after), elements(&before), "the VM's elements changed");
    tear_down(&h, a, "web");
    no_rules_left(h, ns);
}

/// The table flushed or its rules edited behind the helper's back: the next change of any VM
/// puts back every VM's elements the ledger holds and the policy's rules.
#[test]
#[ignore = "needs root: network namespace, nf_tables and the real helper"]
fn the_next_change_repairs_a_flushed_nftables_table_for_every_vm() {
    if !root_or_skip("the_next_change_repairs_a_flushed_nftables_table_for_every_vm") {
        return;
    }
    let (a, b) = (61027, 61028);
    let ns = Netns::new("natfix");
    let h = Helper::start(&ns, &policy(&[a, b], "[network]\nfirewall = \"nftables\"\n"));
    for (uid, name) in [(a, "web"), (b, "db")] {
        let r =
            session(&h, uid, "n", vec![Request::TapCreate { vm: vm(name) }, Request::NatUp { vm: vm(name) }]);
        assert!(matches!(r[2], Response::Nat(_)), "{r:?}");
    }
    let table = ns.nft_table();

    // A rule gone: b's next up writes the rules again.
    ns.sh(&["nft", "flush", "chain", "ip", "banger", "input"]);
    assert!(!ns.nft_table().contains("iifname @taps drop\n\t}\n}"), "{}", ns.nft_table());
    let r = session(&h, b, "n", vec![Request::NatUp { vm: vm("db") }]);
    assert!(matches!(r[1], Response::Nat(_)), "{r:?}");
    assert_eq!(ns.nft_table(), table, "the rules were not written again");

    // The whole table gone (e.g. `nft flush ruleset` of a firewall reload): b's next up brings
    // back a's elements too, not only its own.
    ns.sh(&["nft", "delete", "table", "ip", "banger"]);
    let r = session(&h, b, "n", vec![Request::NatUp { vm: vm("db") }]);
    assert!(matches!(r[1], Response::Nat(_)), "{r:?}");
    assert_eq!(ns.nft_table(), table, "a's elements were not put back");

    // So does a teardown: b's VM goes, a's elements come back.
    ns.sh(&["nft", "delete", "table", "ip", "banger"]);
    tear_down(&h, b, "db");
    let left = ns.nft_table();
    assert!(left.contains("vm=web") && !left.contains("vm=db"), "{left}");
    tear_down(&h, a, "web");
    no_rules_left(h, ns);
}

/// A table named `banger` that is not the helper's (a set of another type): NAT up fails with
/// the kernel's error, records nothing and changes nothing.
#[test]
#[ignore = "needs root: network namespace, nf_tables and the real helper"]
fn a_foreign_banger_table_fails_nat_up_and_records_nothing() {
    if !root_or_skip("a_foreign_banger_table_fails_nat_up_and_records_nothing") {
        return;
    }
    let a = 61029;
    let ns = Netns::new("natforeign");
    let h = Helper::start(&ns, &policy(&[a], "[network]\nfirewall = \"nftables\"\n"));
    ns.sh(&["nft", "add", "table", "ip", "banger"]);
    ns.sh(&["nft", "add", "set", "ip", "banger", "taps", "{ type ipv4_addr; }"]);
    ns.sh(&["nft", "add", "element", "ip", "banger", "taps", "{ 10.9.9.9 }"]);
    let before = ns.nft_table();
    let r = session(
        &h,
        a,
        "n",
        vec![Request::TapCreate { vm: vm("web") }, Request::NatUp { vm: vm("web") }, Request::ListOwned],
    );
    assert!(matches!(&r[2], Response::Error(HelperError::Kernel { .. })), "{:?}", r[2]);
    let Response::Owned(o) = &r[3] else { panic!("{r:?}") };
    assert!(o.nat.is_empty(), "{o:?}");
    assert_eq!(ns.nft_table(), before, "the batch was applied in part");
    let r = session(&h, a, "n", vec![Request::TeardownVms { vms: vec![vm("web")] }]);
    assert!(matches!(&r[1], Response::Teardown(_)), "{r:?}");
    drop(h);
    ns.sh(&["nft", "delete", "table", "ip", "banger"]);
    ns.finish();
}

/// `auto` on a host whose ledger holds VMs' NAT in iptables rules (no nftables table): the
/// helper keeps the iptables tools for them; started again without VMs, it uses nftables.
#[test]
#[ignore = "needs root: network namespace, nf_tables, iptables and the real helper"]
fn auto_keeps_iptables_while_vms_have_iptables_rules() {
    if !root_or_skip("auto_keeps_iptables_while_vms_have_iptables_rules") {
        return;
    }
    let a = 61030;
    let ns = Netns::new("natauto");
    let h = Helper::start(&ns, &policy(&[a], "[network]\nfirewall = \"iptables\"\n"));
    bring_up(&h, a, "web");
    let rules = ns.banger_rules();
    let firewall = |r: &[Response]| match &r[0] {
        Response::Hello(h) => h.capabilities.firewall,
        other => panic!("{other:?}"),
    };
    let h = Helper::start_in(&ns, h.stop(), &policy(&[a], ""));
    let r = session(&h, a, "n", vec![Request::NatUp { vm: vm("web") }]);
    assert_eq!(firewall(&r), banger_protocol::FirewallBackend::Iptables, "{}", h.log_text());
    assert!(matches!(r[1], Response::Nat(_)), "{r:?}");
    assert_eq!(ns.banger_rules(), rules, "the VM's rules moved");
    tear_down(&h, a, "web");
    assert!(ns.banger_rules().is_empty(), "{:?}", ns.banger_rules());
    let h = Helper::start_in(&ns, h.stop(), &policy(&[a], ""));
    let r = session(&h, a, "n", vec![Request::Ping]);
    assert_eq!(firewall(&r), banger_protocol::FirewallBackend::Nftables);
    drop(h);
    ns.finish();
}

/// A helper restarted after the firewall was flushed (a reboot-less `nft flush ruleset`) puts
/// back at start the elements of every VM whose TAP is there — 250 of them, in one batch of
/// many messages — and keeps their NAT.
#[test]
#[ignore = "needs root: network namespace, nf_tables and the real helper"]
fn a_restarted_helper_puts_back_a_flushed_tables_vms_at_start() {
    if !root_or_skip("a_restarted_helper_puts_back_a_flushed_tables_vms_at_start") {
        return;
    }
    const N: usize = 250;
    let a = 61031;
    let ns = Netns::new("natboot");
    let text = policy(
        &[a],
        "[quotas]\nmax_vms = 512\nmax_taps = 512\n[network]\nfirewall = \"nftables\"\nlease_prefix = 21\n",
    );
    let h = Helper::start(&ns, &text);
    let names: Vec<String> = (0..N).map(|i| format!("vm{i}")).collect();
    let mut reqs = Vec::new();
    for n in &names {
        reqs.push(Request::TapCreate { vm: vm(n) });
        reqs.push(Request::NatUp { vm: vm(n) });
    }
    let r = session(&h, a, "n", reqs);
    assert!(r[1..].iter().all(|x| matches!(x, Response::Tap(_) | Response::Nat(_))), "{:?}", r.last());
    let count = |t: &str| t.matches(&format!("banger uid={a} inst=n vm=")).count();
    let table = ns.nft_table();
    assert_eq!(count(&table), 5 * N, "five elements per VM");

    let dir = h.stop();
    ns.sh(&["nft", "flush", "ruleset"]);
    let h = Helper::start_in(&ns, dir, &text);
    assert_eq!(count(&ns.nft_table()), 5 * N, "{}", h.log_text());
    let r = session(&h, a, "n", vec![Request::ListOwned]);
    let Response::Owned(o) = &r[1] else { panic!("{r:?}") };
    assert_eq!(o.nat.len(), N, "the NAT entries stay");
    let r = session(&h, a, "n", vec![Request::TeardownVms { vms: names.iter().map(|n| vm(n)).collect() }]);
    assert!(matches!(&r[1], Response::Teardown(t) if t.failures.is_empty()), "{r:?}");
    no_rules_left(h, ns);
}
