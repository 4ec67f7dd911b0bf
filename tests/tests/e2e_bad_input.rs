//! End to end, bad input: invalid and duplicate names, an unknown image, a missing VMM binary, the
//! helper down, and a user the policy does not allow. Each is a clear error, and none creates a
//! kernel object or a process.

use banger_tests::e2e::world::IMAGE;
use banger_tests::e2e::{Output, Who, World, proc};

const A: Who = Who::A;

/// No TAP, rule, loop or VMM/guest process exists in the world.
#[track_caller]
fn nothing_created(world: &World, after: &Output) {
    assert!(world.taps().is_empty(), "TAPs after a failed command {:?}:\n{after}", world.taps());
    assert!(
        world.firewall_lines().is_empty(),
        "rules after a failed command {:#?}:\n{after}",
        world.firewall_lines()
    );
    assert!(world.loops().is_empty(), "loops after a failed command {:?}:\n{after}", world.loops());
    let uids: Vec<u32> = Who::ALL.iter().map(|w| world.account(*w).uid).collect();
    let vmms = proc::find(|p| uids.contains(&p.uid) && p.comm != "bangerd");
    assert!(vmms.is_empty(), "processes after a failed command {vmms:#?}:\n{after}");
}

#[test]
#[ignore = "needs root: creates users, namespaces and TAPs"]
fn bad_input_is_a_clear_error_and_creates_nothing() {
    let world = World::new();

    // Invalid names.
    let long = "a".repeat(64);
    for name in ["Upper", "under_score", "dot.ted", "spa ce", "", long.as_str(), "caf\u{e9}"] {
        let out = world.banger(A, &["vm", "create", "--name", name]);
        out.failed().mentions(&["name"]);
        nothing_created(&world, &out);
    }
    assert!(world.list(A).is_empty(), "an invalid name created a VM: {:#?}", world.list(A));

    // Duplicate names.
    world.banger_ok(A, &["vm", "create", "--name", "dup"]);
    let out = world.banger(A, &["vm", "create", "--name", "dup"]);
    out.failed().mentions(&["dup"]);
    out.mentions_any(&["exists", "already", "taken", "in use"]);
    let names: Vec<String> = world.list(A).into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["dup"]);
    world.banger_ok(A, &["vm", "delete", "dup"]);

    // Unknown image.
    let out = world.banger(A, &["vm", "create", "--name", "noimg", "--image", "nosuch"]);
    out.failed().mentions(&["nosuch", "image"]);
    nothing_created(&world, &out);
    assert!(world.list(A).is_empty(), "{:#?}", world.list(A));

    // A missing VMM binary: a daemon started with it refuses to start the VM, saying which
    // binary, and undoes everything.
    world.stop_daemon(A);
    let no_vmm = || world.cli(A).env("BANGER_FIRECRACKER", "/nonexistent/firecracker");
    no_vmm().banger(&["vm", "create", "--name", "novmm"]).ok();
    let out = no_vmm().banger(&["vm", "start", "novmm"]);
    out.failed().mentions(&["/nonexistent/firecracker"]);
    nothing_created(&world, &out);
    let vm = world.show(A, "novmm");
    assert_ne!(vm.state, "running", "{vm:#?}");
    // `vm run --rm` removes the VM it made when the start fails, and says why once.
    let out = no_vmm().banger(&["vm", "run", "--name", "novmm-rm", "--rm", "--", "true"]);
    out.failed().mentions(&["/nonexistent/firecracker", "$BANGER_FIRECRACKER"]);
    assert_eq!(out.stderr.matches("vmm binary /nonexistent/firecracker").count(), 1, "{out}");
    let names: Vec<String> = world.list(A).into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["novmm"], "--rm removed the vm whose start failed");
    world.stop_daemon(A);

    // The helper unreachable: the error names the helper (and how to get it running).
    let nowhere = world.temp.join("helper/nowhere.sock");
    let no_helper = || world.cli(A).env("BANGER_HELPER_SOCKET", nowhere.display().to_string());
    let out = no_helper().banger(&["vm", "start", "novmm"]);
    out.failed().mentions(&["helper"]);
    nothing_created(&world, &out);
    // Reading needs no helper.
    let vms = banger_tests::e2e::cli::parse_list(no_helper().banger(&["vm", "list", "--json"]).ok());
    assert_eq!(vms.len(), 1, "{vms:#?}");
    assert!(!nowhere.exists());
    world.stop_daemon(A);

    // A user the policy does not allow (C is not in the group): a clear refusal and no kernel
    // object. The VM that `vm run` defined stays in C's own database, stopped; removing it goes
    // through the helper too, which refuses C, so it is left to the world's teardown.
    // An import needs no helper. Its steps go to standard error, one plain line each when that
    // is not a terminal (here a pipe); with --json, only the image on standard output.
    let (k, r) = (world.kernel.display().to_string(), world.rootfs.display().to_string());
    let out = world.banger_ok(Who::C, &["image", "import", IMAGE, "--kernel", &k, "--rootfs", &r]);
    for step in ["checking the kernel", "copying the root filesystem", "hashing the root filesystem"] {
        assert!(out.stderr.lines().any(|l| l.starts_with(&format!("image {IMAGE}: {step}"))), "{out}");
    }
    assert!(!out.stderr.contains('\r') && !out.stderr.contains('\x1b'), "{out}");
    let out =
        world.banger_ok(Who::C, &["image", "import", "other", "--kernel", &k, "--rootfs", &r, "--json"]);
    assert_eq!(out.stderr, "", "{out}");
    let img: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(img["name"], "other", "{out}");
    let out = world.vm_run(Who::C, "c1", &["true"]);
    out.failed().mentions_any(&["denied", "not allowed"]);
    nothing_created(&world, &out);
    let c_vms = world.list(Who::C);
    assert!(c_vms.iter().all(|v| v.state != "running"), "{c_vms:#?}");

    world.banger_ok(A, &["vm", "delete", "novmm"]);
    assert!(world.list(A).is_empty());
    world.assert_no_leaks();
}
