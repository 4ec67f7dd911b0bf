//! End to end, crash recovery: the daemon killed while its VM runs, the VMM killed while the
//! daemon is down, and a corrupt `handles.json` — each time the next CLI call starts a daemon
//! that finds out what is really true.

use banger_tests::e2e::{VmView, Who, World, proc};

const A: Who = Who::A;

/// Starts VM `e2e` of A and returns its view, checking it runs with a live VMM and a TAP.
#[track_caller]
fn running_vm(world: &World) -> VmView {
    world.vm_run(A, "e2e", &["true"]).ok();
    let vm = world.show(A, "e2e");
    assert_eq!(vm.state, "running", "{vm:#?}");
    let pid = vm.pid.unwrap_or_else(|| panic!("`vm show --json` has no pid: {vm:#?}"));
    assert!(proc::alive(pid), "VMM {pid} is not alive: {vm:#?}");
    let tap = vm.tap.clone().unwrap_or_else(|| panic!("`vm show --json` has no tap: {vm:#?}"));
    assert!(world.link_exists(&tap), "TAP {tap} does not exist");
    vm
}

/// `handles.json` of `vm`, parsed.
#[track_caller]
fn handles(vm: &VmView) -> serde_json::Value {
    let path = vm.handles_path().unwrap_or_else(|| panic!("no vm_dir: {vm:#?}"));
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON ({e}): {text}", path.display()))
}

#[test]
#[ignore = "needs root: creates users, namespaces and TAPs"]
fn kill_9_of_the_daemon_keeps_the_vm_and_the_next_call_restarts_the_daemon() {
    let world = World::new();
    let before = running_vm(&world);

    let status = world.daemon_status(A);
    let daemon = status
        .get("pid")
        .and_then(|p| p.as_u64())
        .unwrap_or_else(|| panic!("no pid in daemon status: {status:?}")) as u32;
    assert_eq!(world.daemon_pids(A), [daemon], "daemon status and the process table disagree");
    proc::kill9(daemon);
    proc::wait_dead(daemon);

    // The next call starts a new daemon, which finds the VM still running.
    let vms = world.list(A);
    let new_daemons = world.daemon_pids(A);
    assert!(new_daemons.len() == 1 && new_daemons[0] != daemon, "daemons now: {new_daemons:?}");
    assert_eq!(vms.len(), 1, "{vms:#?}");
    let after = &vms[0];
    assert_eq!(after.state, "running", "{after:#?}");
    assert_eq!(
        (after.pid, &after.tap),
        (before.pid, &before.tap),
        "the VM's handles changed across the crash"
    );
    assert!(proc::alive(before.pid.expect("pid")));
    world.ssh(A, "e2e", &["true"]).ok();

    // The scratch file and the daemon's cache agree.
    let h = handles(after);
    assert_eq!(h["pid"].as_u64(), after.pid.map(u64::from), "handles.json {h} vs daemon {after:#?}");
    assert_eq!(h["tap"].as_str(), after.tap.as_deref(), "handles.json {h} vs daemon {after:#?}");

    world.banger_ok(A, &["vm", "delete", "e2e"]);
    world.assert_no_leaks();
}

#[test]
#[ignore = "needs root: creates users, namespaces and TAPs"]
fn kill_9_of_the_vmm_while_the_daemon_is_down_is_found_and_cleaned_at_the_next_call() {
    let world = World::new();
    let before = running_vm(&world);
    let (pid, tap) = (before.pid.expect("pid"), before.tap.clone().expect("tap"));
    let tag = format!("vm={}", before.id);
    assert!(!world.firewall_lines_with(&tag).is_empty(), "no NAT rules tagged {tag}");

    world.stop_daemon(A);
    assert!(proc::alive(pid), "`banger daemon stop` stopped the VM too");
    proc::kill9(pid);
    proc::wait_dead(pid);

    // The very next call reports the truth: stopped, with the reason.
    let vms = world.list(A);
    assert_eq!(vms.len(), 1, "{vms:#?}");
    let vm = &vms[0];
    assert_eq!(vm.state, "stopped", "the first call after the VMM died must show it stopped: {vm:#?}");
    let err = vm.last_error.clone().unwrap_or_default();
    assert!(!err.trim().is_empty(), "no last_error for a VM whose VMM died: {vm:#?}");
    // Its kernel objects are gone.
    assert!(!world.link_exists(&tap), "TAP {tap} of the dead VM is left");
    assert!(
        world.firewall_lines_with(&tag).is_empty(),
        "rules of the dead VM are left: {:#?}",
        world.firewall_lines_with(&tag)
    );
    assert!(world.loops().is_empty(), "{:?}", world.loops());
    // The dead VMM's vsock socket must go as well: Firecracker binds it at `PUT /vsock` and
    // refuses an existing path, so a leftover breaks the next start. (Its API socket is removed
    // before each spawn, by design.)
    let api = vm.api_socket.clone().expect("api_socket in vm list");
    let run_dir = api.parent().expect("the api socket is in a directory");
    let left: Vec<_> = std::fs::read_dir(run_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| *p != api && p.to_string_lossy().contains(&vm.id))
        .collect();
    assert!(left.is_empty(), "the dead VMM's other sockets are left after the VM was demoted: {left:?}");

    // And it starts again.
    world.banger_ok(A, &["vm", "start", "e2e"]);
    let again = world.show(A, "e2e");
    assert_eq!(again.state, "running", "{again:#?}");
    assert!(again.pid.is_some_and(proc::alive), "{again:#?}");
    world.ssh(A, "e2e", &["true"]).ok();

    world.banger_ok(A, &["vm", "delete", "e2e"]);
    world.assert_no_leaks();
}

#[test]
#[ignore = "needs root: creates users, namespaces and TAPs"]
fn a_corrupt_handles_file_does_not_stop_the_daemon_or_the_vm() {
    let world = World::new();
    let before = running_vm(&world);
    let pid = before.pid.expect("pid");
    let path = before.handles_path().expect("vm_dir");
    assert!(path.is_file(), "{} does not exist", path.display());

    world.stop_daemon(A);
    // Overwrite in place (owner and mode stay the user's).
    std::fs::write(&path, b"{\"version\": 1, \"pid\": \x00garbage\xff").unwrap();

    let vms = world.list(A);
    assert_eq!(vms.len(), 1, "{vms:#?}");
    let vm = &vms[0];
    assert_eq!(vm.state, "running", "the daemon lost a live VM over a corrupt handles.json: {vm:#?}");
    assert_eq!(vm.pid, Some(pid), "the VMM was not rediscovered by its API socket: {vm:#?}");
    assert_eq!(vm.tap, before.tap, "{vm:#?}");
    assert!(proc::alive(pid));
    world.ssh(A, "e2e", &["true"]).ok();
    // The cache was seeded and mirrored again.
    let h = handles(vm);
    assert_eq!(
        h["pid"].as_u64(),
        Some(u64::from(pid)),
        "handles.json was not rewritten from what was rediscovered: {h}"
    );

    world.banger_ok(A, &["vm", "delete", "e2e"]);
    world.assert_no_leaks();
}
