//! End to end, one VM of one user: `vm run` (hostname, exit codes, `--rm`), NAT to the outside
//! with the host itself closed to the guest, and `vm delete` leaving nothing behind.

use std::path::Path;

use banger_tests::e2e::netns::{HOST_IP, HOST_SERVICE_PORT, OUTSIDE_IP};
use banger_tests::e2e::{Who, World, proc};

const A: Who = Who::A;

#[test]
#[ignore = "needs root: creates users, namespaces and TAPs"]
fn vm_run_prints_the_hostname_and_passes_exit_codes_through() {
    let world = World::new();

    let out = world.vm_run(A, "e2e", &["cat", "/etc/hostname"]);
    out.ok();
    assert_eq!(out.stdout.trim(), "e2e", "{out}");

    // The second run reuses the running VM; the command's arguments survive the trip intact.
    let out = world.vm_run(A, "e2e", &["sh", "-c", "exit 7"]);
    assert_eq!(out.code, Some(7), "`vm run -- sh -c 'exit 7'` must exit 7:\n{out}");
    let vms = world.list(A);
    assert_eq!(vms.len(), 1, "{vms:#?}");
    assert_eq!((vms[0].name.as_str(), vms[0].state.as_str()), ("e2e", "running"), "{vms:#?}");
    assert!(vms[0].guest_ip.is_some(), "{vms:#?}");

    // --rm deletes the VM afterwards, whatever the command's exit code.
    let out =
        world.banger(A, &["vm", "run", "--name", "e2e-rm", "--rm", "--", "sh", "-c", "hostname; exit 3"]);
    assert_eq!(out.code, Some(3), "{out}");
    assert_eq!(out.stdout.trim(), "e2e-rm", "{out}");
    let names: Vec<String> = world.list(A).into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["e2e"], "--rm left its VM behind");

    world.banger_ok(A, &["vm", "delete", "e2e"]);
    assert!(world.list(A).is_empty());
    world.assert_no_leaks();
}

#[test]
#[ignore = "needs root: creates users, namespaces and TAPs"]
fn the_guest_reaches_the_outside_through_nat_but_not_the_host() {
    let world = World::new();
    world.vm_run(A, "e2e", &["true"]).ok();
    let vm = world.show(A, "e2e");
    let tap = vm.tap.clone().unwrap_or_else(|| panic!("`vm show --json` has no tap: {vm:#?}"));
    let gateway = world.link_ipv4(&tap).unwrap_or_else(|| panic!("TAP {tap} has no IPv4 address"));

    // Out through the host's uplink, masqueraded: the outside answers.
    let out = world.ssh(A, "e2e", &["curl", "-s", "-m", "5", &format!("http://{OUTSIDE_IP}/from-guest")]);
    out.ok();
    assert_eq!(
        out.stdout,
        format!("outside {}\npeer {HOST_IP}\n", world.names.suffix),
        "not masqueraded:\n{out}"
    );

    // The host service listens on every host address (reachable from the host itself) …
    let probe = world
        .host_ns()
        .exec("curl", &["-s", "-m", "3", &format!("http://{gateway}:{HOST_SERVICE_PORT}/")])
        .unwrap();
    assert!(probe.success(), "the host service does not answer on {gateway} from the host:\n{probe}");
    // … but not to the guest, neither on its gateway nor on the uplink address (policy default).
    let script = format!(
        "for a in {gateway} {HOST_IP}; do (curl -s -m 3 http://$a:{HOST_SERVICE_PORT}/; echo \"$a rc=$?\") & done; wait"
    );
    let out = world.ssh(A, "e2e", &["sh", "-c", &script]);
    assert!(!out.stdout.contains("host service"), "the guest reached the host service:\n{out}");
    for addr in [gateway.as_str(), HOST_IP] {
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!("{addr} rc=")))
            .unwrap_or_else(|| panic!("{out}"));
        assert_ne!(line, format!("{addr} rc=0"), "the guest reached {addr}:{HOST_SERVICE_PORT}:\n{out}");
    }

    world.banger_ok(A, &["vm", "delete", "e2e"]);
    world.assert_no_leaks();
}

#[test]
#[ignore = "needs root: creates users, namespaces and TAPs"]
fn vm_delete_leaves_no_tap_loop_rule_process_or_file() {
    let world = World::new();
    world.vm_run(A, "e2e", &["true"]).ok();
    let vm = world.show(A, "e2e");
    let (tap, pid) = (vm.tap.clone().expect("tap in vm show"), vm.pid.expect("pid in vm show"));
    let vm_dir = vm.vm_dir.clone().expect("vm_dir in vm show");
    assert!(world.link_exists(&tap) && proc::alive(pid) && vm_dir.is_dir(), "{vm:#?}");
    assert!(
        !world.firewall_lines_with(&format!("vm={}", vm.id)).is_empty(),
        "no NAT rules tagged with the VM"
    );

    world.banger_ok(A, &["vm", "delete", "e2e"]);

    assert!(!world.link_exists(&tap), "TAP {tap} is left");
    assert!(!proc::alive(pid), "VMM {pid} still runs");
    let rules = world.firewall_lines_with(&format!("vm={}", vm.id));
    assert!(rules.is_empty(), "rules left: {rules:#?}");
    assert!(world.loops().is_empty(), "loops left: {:?}", world.loops());
    assert!(!vm_dir.exists(), "{} is left", vm_dir.display());
    for f in [vm.api_socket.as_deref(), vm.log_path.as_deref()].into_iter().flatten() {
        assert!(!Path::new(f).exists(), "{} is left", f.display());
    }
    let guest_procs = proc::find(|p| p.uid == world.account(A).uid && p.comm != "bangerd");
    assert!(guest_procs.is_empty(), "{guest_procs:#?}");
    assert!(world.list(A).is_empty());
    world
        .banger(A, &["vm", "show", "e2e", "--json"])
        .failed()
        .mentions(&["e2e"])
        .mentions_any(&["not found", "no vm named"]);
    world.assert_no_leaks();
}
