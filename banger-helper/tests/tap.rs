//! TAP create and teardown through the real helper, checked in sysfs inside the test's namespace.

mod common;

use banger_protocol::{HelperError, Request, Response};
use common::*;

#[test]
#[ignore = "needs root: network namespace, TAP devices and the real helper"]
fn tap_create_and_teardown_as_an_unprivileged_uid() {
    if !root_or_skip("tap_create_and_teardown_as_an_unprivileged_uid") {
        return;
    }
    let (a, b) = (61011, 61012);
    let ns = Netns::new("tap");
    let h = Helper::start(&ns, &policy(&[a, b], ""));

    let r = session(
        &h,
        a,
        "inst-a",
        vec![
            Request::TapCreate { vm: vm("vm-a") },
            Request::TapCreate { vm: vm("vm-a") },
            Request::ListOwned,
        ],
    );
    assert!(matches!(r[0], Response::Hello(_)), "{r:?}");
    let Response::Tap(tap) = &r[1] else { panic!("{:?}\n{}", r[1], h.log_text()) };
    assert_eq!(r[2], r[1], "create is idempotent");
    let Response::Owned(owned) = &r[3] else { panic!("{:?}", r[3]) };
    assert_eq!(owned.taps, vec![tap.clone()]);

    // What the kernel says: a persistent TAP, single queue, with vnet headers, owned by a.
    let sys = |f: &str| ns.read(&format!("/sys/class/net/{}/{f}", tap.name));
    assert_eq!(sys("owner").as_deref(), Some(a.to_string().as_str()));
    assert_eq!(sys("tun_flags").as_deref(), Some("0x5802"), "IFF_TAP|IFF_NO_PI|IFF_VNET_HDR|IFF_PERSIST");
    assert!(
        sys("flags").is_some_and(|f| u32::from_str_radix(f.trim_start_matches("0x"), 16).unwrap() & 1 == 1),
        "link up"
    );
    let addr = ns.sh(&["ip", "-4", "-o", "addr", "show", "dev", &tap.name]);
    assert!(addr.contains(&format!("inet {}/30", tap.host_ip)), "{addr}");
    assert_eq!(ns.read(&format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", tap.name)).as_deref(), Some("1"));
    assert_eq!(tap.guest_ip, std::net::Ipv4Addr::from(u32::from(tap.host_ip) + 1));
    // The guest is at its MAC for good: the host never asks.
    let neigh = ns.sh(&["ip", "-4", "neigh", "show", "dev", &tap.name]);
    assert_eq!(neigh.trim(), format!("{} lladdr {} PERMANENT", tap.guest_ip, tap.guest_mac), "{neigh}");
    // The host acknowledges what the guest sends at once (`linkdown` until a VMM opens the TAP).
    let route = ns.sh(&["ip", "-4", "route", "show", &format!("{}/32", tap.guest_ip)]);
    assert_eq!(
        route.trim(),
        format!(
            "{} dev {} proto static scope link src {} linkdown quickack 1",
            tap.guest_ip, tap.name, tap.host_ip
        ),
        "{route}"
    );

    // Firecracker, running as a, can open it with its flags; nobody else can.
    assert_eq!(open_tap_as(&ns, &tap.name, a), Ok(()));
    assert_eq!(open_tap_as(&ns, &tap.name, b), Err(libc::EPERM));

    // b names the same VM: its own (absent) TAP goes, a's stays.
    let r = session(&h, b, "inst-a", vec![Request::TeardownVms { vms: vec![vm("vm-a")] }]);
    assert!(matches!(&r[1], Response::Teardown(t) if t.failures.is_empty()), "{r:?}");
    assert_eq!(sys("owner").as_deref(), Some(a.to_string().as_str()), "b removed a's tap");

    let teardown = Request::TeardownVms { vms: vec![vm("vm-a")] };
    let r = session(&h, a, "inst-a", vec![teardown.clone(), teardown]);
    assert!(
        r[1..].iter().all(|x| matches!(x, Response::Teardown(t) if t.failures.is_empty())),
        "absent is done: {r:?}"
    );
    assert!(ns.taps().is_empty(), "{:?}", ns.taps());
    drop(h);
    ns.finish();
}

#[test]
#[ignore = "needs root: network namespace, TAP devices and the real helper"]
fn tap_quota_is_a_typed_error() {
    if !root_or_skip("tap_quota_is_a_typed_error") {
        return;
    }
    let a = 61013;
    let ns = Netns::new("tapq");
    let h = Helper::start(&ns, &policy(&[a], "[quotas]\nmax_taps = 2\n"));
    let r = session(
        &h,
        a,
        "q",
        vec![
            Request::TapCreate { vm: vm("one") },
            Request::TapCreate { vm: vm("two") },
            Request::TapCreate { vm: vm("three") },
        ],
    );
    assert!(matches!(r[1], Response::Tap(_)) && matches!(r[2], Response::Tap(_)), "{r:?}");
    assert_eq!(r[3], Response::Error(HelperError::QuotaExceeded { resource: "taps".into(), limit: 2 }));
    assert_eq!(ns.taps().len(), 2);
    let r = session(&h, a, "q", vec![Request::TeardownVms { vms: vec![vm("one"), vm("two"), vm("three")] }]);
    let Response::Teardown(t) = &r[1] else { panic!("{r:?}") };
    assert!(t.failures.is_empty() && t.torn_down.len() == 3, "{t:?}");
    assert!(ns.taps().is_empty());
    drop(h);
    ns.finish();
}

/// The quota escape: a TAP's owner attaches to it through `/dev/net/tun` as Firecracker does and
/// gives it away with `TUNSETOWNER`. The ledger still holds it for the owner's VM: it stays
/// counted against `max_taps`, and teardown removes it whatever the kernel says its owner is.
#[test]
#[ignore = "needs root: network namespace, TAP devices and the real helper"]
fn a_tap_given_away_stays_counted_and_goes_with_teardown() {
    if !root_or_skip("a_tap_given_away_stays_counted_and_goes_with_teardown") {
        return;
    }
    let (a, other) = (61014, 61015);
    let ns = Netns::new("tapgive");
    let h = Helper::start(&ns, &policy(&[a], "[quotas]\nmax_taps = 1\n"));
    let r = session(&h, a, "g", vec![Request::TapCreate { vm: vm("one") }]);
    let Response::Tap(tap) = &r[1] else { panic!("{r:?}\n{}", h.log_text()) };

    // As a, unprivileged: attach and give the TAP away.
    assert_eq!(give_tap_away_as(&ns, &tap.name, a, other), Ok(()));
    let owner = ns.read(&format!("/sys/class/net/{}/owner", tap.name));
    assert_eq!(owner.as_deref(), Some(other.to_string().as_str()), "the attack setup failed");

    let r = session(
        &h,
        a,
        "g",
        vec![
            Request::TapCreate { vm: vm("two") },
            Request::TeardownVms { vms: vec![vm("one")] },
            Request::ListOwned,
        ],
    );
    assert_eq!(
        r[1],
        Response::Error(HelperError::QuotaExceeded { resource: "taps".into(), limit: 1 }),
        "{r:?}"
    );
    assert!(
        matches!(&r[2], Response::Teardown(t) if t.failures.is_empty() && t.torn_down == [vm("one")]),
        "{r:?}"
    );
    assert!(matches!(&r[3], Response::Owned(o) if o.taps.is_empty()), "{r:?}");
    assert!(ns.taps().is_empty(), "the given-away tap was left: {:?}", ns.taps());
    let r = session(
        &h,
        a,
        "g",
        vec![Request::TapCreate { vm: vm("two") }, Request::TeardownVms { vms: vec![vm("two")] }],
    );
    assert!(matches!(r[1], Response::Tap(_)), "the quota is free again: {r:?}");
    assert!(ns.taps().is_empty());
    drop(h);
    ns.finish();
}
