//! The end-to-end harness checked on its own, before any banger command runs: users, the two
//! namespaces and their servers, the private `/dev/net/tun`, the helper and its access rules, and
//! that the leak check sees real TAPs and firewall rules.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use banger_protocol::{Request, Response, VmId};
use banger_tests::e2e::netns::{HOST_IP, HOST_SERVICE_PORT, OUTSIDE_IP};
use banger_tests::e2e::{Who, World, leaks};

#[test]
#[ignore = "needs root: creates users, namespaces and TAPs"]
fn the_world_has_users_a_routed_network_a_private_tun_node_and_a_helper() {
    let tun_before = std::fs::metadata("/dev/net/tun").map(|m| (m.mode(), m.uid(), m.gid())).ok();
    let world = World::bare();
    let sfx = world.names.suffix.clone();

    // The outside answers through the veth and the host's default route; the host service
    // answers on the host's own address.
    let out = world.host_ns().exec("curl", &["-s", "-m", "5", &format!("http://{OUTSIDE_IP}/")]).unwrap();
    assert!(out.success() && out.stdout.contains(&format!("outside {sfx}")), "{out}");
    let out = world
        .host_ns()
        .exec("curl", &["-s", "-m", "5", &format!("http://{HOST_IP}:{HOST_SERVICE_PORT}/")])
        .unwrap();
    assert!(out.success() && out.stdout.contains(&format!("host service {sfx}")), "{out}");

    // A command as A runs as A (with the policy's group), in the host namespace, with a
    // /dev/net/tun it can open, and the machine's node is untouched.
    let a = world.account(Who::A).clone();
    let out = world.cli(Who::A).program(
        Path::new("/bin/sh"),
        &["-c", "id -u; id -G; ip -4 route show default; exec 3<>/dev/net/tun && echo tun-opened; echo home=$BANGER_HOME"],
    );
    out.ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], a.uid.to_string(), "{out}");
    assert!(lines[1].split_whitespace().any(|g| g == world.account(Who::A).groups[0].to_string()), "{out}");
    assert!(lines[2].contains(&format!("default via {OUTSIDE_IP}")), "{out}");
    assert_eq!(lines[3], "tun-opened", "{out}");
    assert_eq!(lines[4], format!("home={}", world.home(Who::A).display()), "{out}");
    let tun_after = std::fs::metadata("/dev/net/tun").map(|m| (m.mode(), m.uid(), m.gid())).ok();
    assert_eq!(tun_before, tun_after, "the machine's /dev/net/tun changed");
    // C is not in the group.
    let out = world.cli(Who::C).program(Path::new("/usr/bin/id"), &["-G"]);
    assert!(!out.ok().stdout.split_whitespace().any(|g| g == world.account(Who::A).groups[0].to_string()));

    // The helper: A and B may connect, C may not.
    for who in [Who::A, Who::B] {
        let s = world.helper_session(who, "e2e-harness", &[Request::Ping]);
        assert!(matches!(s.answers.as_slice(), [Ok(Response::Pong)]), "{who:?}: {s:?}");
    }
    let c = banger_tests::e2e::helper::session_as(
        world.account(Who::C),
        &world.helper().socket,
        "e2e-harness",
        &[Request::Ping],
    );
    match &c {
        Err(e) => assert!(format!("{e:#}").to_lowercase().contains("permission denied"), "{e:#}"),
        Ok(s) => assert!(matches!(s.hello, Ok(Response::Error(_)) | Err(_)) && s.answers.is_empty(), "{s:?}"),
    }

    // A TAP and NAT made through the helper are real, owned by A, and seen by the leak check;
    // removing them leaves nothing.
    let vm = VmId::new("harness-vm").unwrap();
    let s = world.helper_session(
        Who::A,
        "e2e-harness",
        &[Request::TapCreate { vm: vm.clone() }, Request::NatUp { vm: vm.clone() }],
    );
    let Some(Ok(Response::Tap(tap))) = s.answers.first() else { panic!("tap create: {s:?}") };
    assert!(matches!(s.answers.get(1), Some(Ok(Response::Nat(_)))), "nat up: {s:?}");
    assert_eq!(world.tap_owner(&tap.name), Some(a.uid));
    assert_eq!(world.link_ipv4(&tap.name), Some(tap.host_ip.to_string()));
    assert!(world.taps().contains(&tap.name));
    assert!(
        !world.firewall_lines_with("vm=harness-vm").is_empty(),
        "{}",
        leaks::firewall_dump(&world.names.host_ns())
    );
    let s = world.helper_session(Who::A, "e2e-harness", &[Request::TeardownVms { vms: vec![vm] }]);
    assert!(
        s.answers.iter().all(|a| matches!(a, Ok(Response::Teardown(t)) if t.failures.is_empty())),
        "{s:?}"
    );
    world.assert_no_leaks();
}
