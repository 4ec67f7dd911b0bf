//! TAP create and delete through the real helper, checked in sysfs inside the test's namespace.

mod common;

use banger_protocol::{HelperError, Request, Response};
use common::*;

#[test]
#[ignore = "needs root: network namespace, TAP devices and the real helper"]
fn tap_create_and_delete_as_an_unprivileged_uid() {
    if !root_or_skip("tap_create_and_delete_as_an_unprivileged_uid") {
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

    // Firecracker, running as a, can open it with its flags; nobody else can.
    assert_eq!(open_tap_as(&ns, &tap.name, a), Ok(()));
    assert_eq!(open_tap_as(&ns, &tap.name, b), Err(libc::EPERM));

    // b names the same VM: its own (absent) TAP is deleted, a's stays.
    let r = session(
        &h,
        b,
        "inst-a",
        vec![Request::TapDelete { vm: vm("vm-a") }, Request::TeardownVms { vms: vec![vm("vm-a")] }],
    );
    assert_eq!(r[1], Response::Done);
    assert!(matches!(&r[2], Response::Teardown(t) if t.failures.is_empty()), "{r:?}");
    assert_eq!(sys("owner").as_deref(), Some(a.to_string().as_str()), "b removed a's tap");

    let r = session(
        &h,
        a,
        "inst-a",
        vec![Request::TapDelete { vm: vm("vm-a") }, Request::TapDelete { vm: vm("vm-a") }],
    );
    assert_eq!((&r[1], &r[2]), (&Response::Done, &Response::Done), "absent is done");
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
