//! End to end, how a VM ends and what it leaves to read: a guest that ignores Ctrl-Alt-Del
//! (its image masks systemd's `ctrl-alt-del.target`) is killed after `vm stop --timeout`, or at
//! once by `vm delete --force`; the serial console and Firecracker's own log are apart
//! (`vm logs`, `vm logs --vmm`); a stopped VM shows no guest address; `vm start` shows its
//! steps as plain lines when not on a terminal, and nothing more with `--json`.

use std::time::{Duration, Instant};

use banger_tests::e2e::{Who, World};

const A: Who = Who::A;

#[test]
#[ignore = "needs root: creates users, namespaces and TAPs"]
fn a_guest_that_ignores_ctrl_alt_del_is_killed_after_the_timeout_or_at_once_when_forced() {
    let world = World::new();
    world.import_image_with(A, "stubborn", &|tree| {
        let units = tree.join("etc/systemd/system");
        std::fs::create_dir_all(&units)?;
        std::os::unix::fs::symlink("/dev/null", units.join("ctrl-alt-del.target"))
    });
    world.banger_ok(A, &["vm", "create", "cad", "--image", "stubborn"]);
    // Not on a terminal: one plain line per step on standard error.
    let started = world.banger_ok(A, &["vm", "start", "cad"]);
    for step in ["checking the image", "setting up the network", "spawning the vmm", "booting the guest"] {
        assert!(started.stderr.contains(&format!("vm cad: {step} (")), "{started}");
    }
    assert!(started.stdout.starts_with("vm cad running at "), "{started}");

    let begun = Instant::now();
    world.banger_ok(A, &["vm", "stop", "cad", "--timeout", "2"]);
    let took = begun.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(8),
        "the guest had the 2 s asked for, not the default 10 s: {took:?}"
    );
    let vm = world.show(A, "cad");
    assert_eq!((vm.state.as_str(), vm.guest_ip.as_deref(), vm.pid), ("stopped", None, None), "{vm:#?}");

    // The guest's console says it ignored the keys; Firecracker's own log is apart from it.
    let console = world.banger_ok(A, &["vm", "logs", "cad"]).stdout.clone();
    assert!(console.contains("ctrl-alt-del.target is masked"), "{console}");
    assert!(!console.contains("/machine-config"), "vmm log lines in the console:\n{console}");
    let vmm = world.banger_ok(A, &["vm", "logs", "cad", "--vmm"]).stdout.clone();
    assert!(vmm.contains("/machine-config"), "{vmm}");

    // With --json, only the JSON.
    let started = world.banger_ok(A, &["vm", "start", "cad", "--json"]);
    assert!(!started.stderr.contains("vm cad:"), "{started}");
    let begun = Instant::now();
    world.banger_ok(A, &["vm", "delete", "cad", "--force"]);
    assert!(begun.elapsed() < Duration::from_secs(2), "forced: no grace period: {:?}", begun.elapsed());
    assert!(world.list(A).is_empty());
    world.assert_no_leaks();
}
