//! End to end, two users: B can neither see nor touch A's VM through banger, and the helper
//! refuses B's direct requests on A's objects, even when B knows A's VM id and install id.

use banger_protocol::{Request, Response, VmId};
use banger_tests::e2e::{Who, World, helper::session_as, proc};

const A: Who = Who::A;
const B: Who = Who::B;

#[test]
#[ignore = "needs root: creates users, namespaces and TAPs"]
fn user_b_cannot_see_stop_or_delete_user_a_vm_nor_touch_its_objects_through_the_helper() {
    let world = World::new();
    world.import_image(B);
    world.vm_run(A, "e2e", &["true"]).ok();
    let vm = world.show(A, "e2e");
    let (pid, tap) = (vm.pid.expect("pid"), vm.tap.clone().expect("tap"));
    let tag = format!("vm={}", vm.id);
    let rules_before = world.firewall_lines_with(&tag);
    assert!(!rules_before.is_empty(), "A's VM has no NAT rules");

    // Through banger: B's daemon knows nothing of A's VM.
    assert!(world.list(B).is_empty(), "B sees VMs: {:#?}", world.list(B));
    world.banger(B, &["vm", "show", "e2e", "--json"]).failed().mentions_any(&["not found", "no vm named"]);
    world.banger(B, &["vm", "stop", "e2e"]).failed().mentions_any(&["not found", "no vm named"]);
    world.banger(B, &["vm", "delete", "e2e"]).failed().mentions_any(&["not found", "no vm named"]);
    world.banger(B, &["vm", "ssh", "e2e", "--", "true"]).failed().mentions_any(&["not found", "no vm named"]);

    // Directly to the helper, as B, naming A's VM — with its own install id and with A's.
    let a_install = world.daemon_status(A).get("install_id").and_then(|v| v.as_str()).map(str::to_owned);
    let vm_id = VmId::new(vm.id.clone()).expect("the daemon's VM ids are valid protocol ids");
    let attack = [
        Request::TapCreate { vm: vm_id.clone() },
        Request::NatUp { vm: vm_id.clone() },
        Request::TeardownVms { vms: vec![vm_id.clone()] },
        Request::ListOwned,
    ];
    let mut installs = vec!["e2e-intruder".to_owned()];
    installs.extend(a_install.clone());
    for install in &installs {
        let s = world.helper_session(B, install, &attack);
        assert!(matches!(s.hello, Ok(Response::Hello(_))), "B's hello was refused: {s:?}");
        assert_eq!(s.answers.len(), attack.len(), "the helper cut B off: {s:?}");
        match s.answers.last() {
            Some(Ok(Response::Owned(o))) => {
                assert!(o.taps.iter().all(|t| t.name != tap), "B's list shows A's TAP: {o:?}");
                assert!(o.nat.is_empty() && o.loops.is_empty() && o.taps.is_empty(), "B owns objects: {o:?}");
            }
            other => panic!("B's ListOwned: {other:?}"),
        }
        // Whatever the helper answered, A's objects are intact.
        assert!(world.link_exists(&tap), "B's requests (install {install}) removed A's TAP: {s:?}");
        assert_eq!(world.tap_owner(&tap), Some(world.account(A).uid));
        assert_eq!(
            world.firewall_lines_with(&tag),
            rules_before,
            "B's requests (install {install}) changed A's rules: {s:?}"
        );
    }
    if a_install.is_none() {
        eprintln!("note: `daemon status --json` of A has no install_id; B tried its own install id only");
    }

    // C is not even allowed to connect.
    match session_as(world.account(Who::C), &world.helper().socket, "e2e-intruder", &[Request::ListOwned]) {
        Err(e) => assert!(format!("{e:#}").to_lowercase().contains("permission denied"), "{e:#}"),
        Ok(s) => assert!(
            matches!(&s.hello, Ok(Response::Error(_)) | Err(_)) && s.answers.is_empty(),
            "C got through: {s:?}"
        ),
    }

    // A's VM kept running, with its TAP and rules.
    assert!(proc::alive(pid), "A's VMM died");
    let still = world.show(A, "e2e");
    assert_eq!((still.state.as_str(), still.pid), ("running", Some(pid)), "{still:#?}");
    world.ssh(A, "e2e", &["true"]).ok();

    world.banger_ok(A, &["vm", "delete", "e2e"]);
    world.assert_no_leaks();
}
