//! End to end, one VM of one user: `vm run` (hostname, exit codes, `--rm`), NAT to the outside
//! with the host itself closed to the guest, `vm delete` leaving nothing behind, and a work disk
//! made as the user, mounted through the root's fstab, kept across stops and deleted with the VM
//! (the image read-only and kept while the VM uses it).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use banger_tests::e2e::netns::{HOST_IP, HOST_SERVICE_PORT, OUTSIDE_IP};
use banger_tests::e2e::run::root;
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

/// `debugfs -R "cat PATH"` of the ext4 file `image`, as root.
fn read_in(image: &Path, path: &str) -> String {
    let image = image.display().to_string();
    root("debugfs", &["-R", &format!("cat {path}"), &image]).unwrap_or_else(|e| panic!("{e:#}")).stdout
}

#[test]
#[ignore = "needs root: creates users, namespaces and TAPs"]
fn a_work_disk_is_made_as_the_user_kept_across_stops_and_deleted_with_the_vm() {
    let world = World::new();
    let account = world.account(A).clone();
    world.banger_ok(A, &["vm", "create", "--name", "e2e", "--disk", "64M"]);
    let vm = world.show(A, "e2e");
    let disk =
        PathBuf::from(vm.extra["work_disk"].as_str().unwrap_or_else(|| panic!("no work_disk: {vm:#?}")));
    assert_eq!(vm.extra["work_disk_bytes"], 64 << 20, "{vm:#?}");
    let meta = std::fs::metadata(&disk).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777, meta.len()), (account.uid, 0o600, 64 << 20));
    assert!(meta.blocks() * 512 < 16 << 20, "the work disk is sparse: {} bytes", meta.blocks() * 512);
    let out = world.banger_ok(A, &["vm", "show", "e2e"]);
    assert!(out.stdout.contains("64 MiB, mounted at /work"), "{out}");

    // The VMM opens it as the second drive; the root says where to mount it.
    world.banger_ok(A, &["vm", "start", "e2e"]);
    let vm = world.show(A, "e2e");
    let storage = vm.extra["storage"].as_str().unwrap_or_default().to_owned();
    assert!(["reflink", "sparse-copy", "dm-snapshot"].contains(&storage.as_str()), "{vm:#?}");
    world.banger_ok(A, &["vm", "stop", "e2e"]);
    assert_eq!(std::fs::metadata(&disk).unwrap().ino(), meta.ino(), "the work disk is kept across a stop");
    if storage != "dm-snapshot" {
        let root_file = vm.vm_dir.clone().expect("vm_dir").join("root.ext4");
        let fstab = read_in(&root_file, "/etc/fstab");
        assert!(fstab.contains("/dev/vdb\t/work\text4\tdefaults,nofail\t0\t2"), "{fstab}");
    }
    let label = root("dumpe2fs", &["-h", &disk.display().to_string()]).unwrap().stdout;
    assert!(label.contains("banger-work"), "{label}");

    // The image stays read-only, and cannot go while the VM uses it.
    let image = world.home(A).join("state/images/e2e/rootfs.ext4");
    assert_eq!(std::fs::metadata(&image).unwrap().permissions().mode() & 0o7777, 0o444);
    world.banger(A, &["image", "rm", "e2e"]).failed().mentions(&["used by vm(s) e2e", "delete them first"]);

    world.banger_ok(A, &["vm", "start", "e2e"]);
    world.banger_ok(A, &["vm", "delete", "e2e"]);
    assert!(!disk.exists(), "{} is left", disk.display());
    world.banger_ok(A, &["image", "rm", "e2e"]);
    world.assert_no_leaks();
}
