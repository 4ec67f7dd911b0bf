//! NAT up and down through the real helper, checked with `iptables -S` inside the namespace.

mod common;

use banger_protocol::{HelperError, Request, Response};
use common::*;

#[test]
#[ignore = "needs root: network namespace, iptables and the real helper"]
fn nat_up_is_idempotent_and_down_removes_everything() {
    if !root_or_skip("nat_up_is_idempotent_and_down_removes_everything") {
        return;
    }
    let (a, b) = (61021, 61022);
    let ns = Netns::new("nat");
    let forwarding_before = ns.read("/proc/sys/net/ipv4/ip_forward");
    assert_eq!(forwarding_before.as_deref(), Some("0"), "a new namespace starts without forwarding");
    let h = Helper::start(&ns, &policy(&[a, b], "[network.guest_to_host]\nallow = [\"udp/53\"]\n"));
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
    let r = session(&h, b, "n", vec![Request::TeardownVms { vms: vec![vm("web")] }]);
    assert!(matches!(&r[1], Response::Teardown(t) if t.failures.is_empty()), "{r:?}");
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
    assert!(ns.banger_rules().is_empty(), "{:?}", ns.banger_rules());
    drop(h);
    ns.finish();
}
