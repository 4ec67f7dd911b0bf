//! End to end, dm-snapshot roots, in the kernel tier (device-mapper is there, not on the build
//! machines): the real helper makes each VM's snapshot over a read-only loop of its image and a
//! read-write loop of its copy-on-write file, the daemon boots the Firecracker test double from
//! the snapshot's node, and:
//!
//! - what the guest writes lands in the COW file, never in the image, and is there again after a
//!   stop and start and after a restart; every stop removes the snapshot and its loops;
//! - `vm run` (with a work disk), `kill -9` of bangerd, `vm delete`: nothing is left (no dm
//!   target, loop device, TAP, rule, process or file).
//!
//! The double does not write to its drives, so the test writes as the guest would: through the
//! VM's dm node, with debugfs, as root. Outside the tier these tests skip with a message (and
//! fail under `CI=true`); `tests/kernel-tier.list` runs them in the tier.

mod in_kernel_tier {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use banger_tests::e2e::run::{root, root_unchecked, wait_for};
    use banger_tests::e2e::{VmView, Who, World, proc};
    use banger_tests::kernel_tier::guest::inside_or_skip;

    const A: Who = Who::A;
    /// What the "guest" writes into its root.
    const GUEST_FILE: &str = "/guest-wrote";
    const GUEST_TEXT: &str = "written by the guest through its snapshot\n";

    /// A world whose user A makes dm-snapshot roots (and fails clearly where it cannot), with
    /// the users' homes (images, VM disks) on the tier's tmpfs `/run`: the helper attaches loop
    /// devices only to files on local filesystems it allows, and the tier's `/tmp` is an overlay.
    fn dm_world() -> World {
        let world = World::with_homes_in(Path::new("/run"));
        world.stop_daemon(A);
        world.add_config(A, "storage = \"dm-snapshot\"");
        world
    }

    /// `handles.json` of `vm`, parsed.
    #[track_caller]
    fn handles(vm: &VmView) -> serde_json::Value {
        let path = vm.handles_path().unwrap_or_else(|| panic!("no vm_dir: {vm:#?}"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}: {text}", path.display()))
    }

    /// The dm-snapshot of running `vm` as its handles name it, checked: its node a block device
    /// of A's (0600), its name known to device-mapper, both loops attached.
    #[track_caller]
    fn snapshot_of(world: &World, vm: &VmView) -> (String, PathBuf) {
        assert_eq!(vm.state, "running", "{vm:#?}");
        assert_eq!(vm.extra["storage"], "dm-snapshot", "{vm:#?}");
        let h = handles(vm);
        let field =
            |k: &str| h[k].as_str().unwrap_or_else(|| panic!("handles.json has no {k}: {h}")).to_owned();
        let (name, dev) = (field("dm_name"), PathBuf::from(field("dm_dev")));
        for k in ["base_loop", "cow_loop"] {
            let loop_dev = field(k);
            assert!(
                Path::new("/sys/block").join(loop_dev.trim_start_matches("/dev/")).exists(),
                "{k} {loop_dev}"
            );
        }
        let meta = std::fs::metadata(&dev).unwrap_or_else(|e| panic!("{}: {e}", dev.display()));
        assert!(meta.file_type().is_block_device(), "{} is not a block device", dev.display());
        assert_eq!((meta.uid(), meta.mode() & 0o777), (world.account(A).uid, 0o600), "{}", dev.display());
        assert!(dm_exists(&name), "device-mapper does not know {name}");
        (name, dev)
    }

    fn dm_exists(name: &str) -> bool {
        root_unchecked("dmsetup", &["info", name]).is_ok_and(|o| o.success())
    }

    /// The image A imported, and its digest.
    fn image(world: &World) -> (PathBuf, String) {
        let path = world.home(A).join("state/images/e2e/rootfs.ext4");
        let sum = root("sha256sum", &[&path.display().to_string()]).unwrap().stdout;
        (path, sum.split_whitespace().next().unwrap_or_default().to_owned())
    }

    fn cow_file(vm: &VmView) -> PathBuf {
        vm.vm_dir.clone().expect("vm_dir").join("root.cow")
    }

    /// Bytes the COW file takes on disk.
    fn cow_allocated(vm: &VmView) -> u64 {
        std::fs::metadata(cow_file(vm)).unwrap().blocks() * 512
    }

    /// `debugfs -R "cat PATH"` of the filesystem on `dev`, as root.
    fn read_in(dev: &Path, path: &str) -> String {
        root("debugfs", &["-R", &format!("cat {path}"), &dev.display().to_string()]).unwrap().stdout
    }

    #[test]
    #[ignore = "needs device-mapper: runs in the kernel tier"]
    fn the_guests_writes_stay_in_the_cow_file_across_stop_start_and_restart() {
        if !inside_or_skip() {
            return;
        }
        let world = dm_world();
        let (image_path, image_sum) = image(&world);
        world.banger_ok(A, &["vm", "create", "--name", "e2e"]);
        world.banger_ok(A, &["vm", "start", "e2e"]);
        let vm = world.show(A, "e2e");
        let (name, dev) = snapshot_of(&world, &vm);
        // The guest booted from the snapshot personalized for it (the double reads its drive).
        let out = world.ssh(A, "e2e", &["cat", "/etc/hostname"]);
        out.ok();
        assert_eq!(out.stdout.trim(), "e2e", "{out}");
        let cow_before = cow_allocated(&vm);

        // The guest writes, through its snapshot.
        let src = world.temp.join("guest-file");
        std::fs::write(&src, GUEST_TEXT).unwrap();
        let script = format!("write {} {}", src.display(), GUEST_FILE.trim_start_matches('/'));
        root("debugfs", &["-w", "-R", &script, &dev.display().to_string()]).unwrap();
        assert_eq!(read_in(&dev, GUEST_FILE), GUEST_TEXT);

        // Stop: the snapshot and its loops go; the COW file holds the writes; the image is intact.
        world.banger_ok(A, &["vm", "stop", "e2e"]);
        assert!(!dm_exists(&name), "{name} is left after the stop");
        assert!(world.loops().is_empty(), "loops left after the stop: {:?}", world.loops());
        assert!(cow_allocated(&vm) > cow_before, "the COW file did not grow with the guest's writes");
        assert_eq!(image(&world).1, image_sum, "the image {} changed", image_path.display());

        // Start and restart: the writes are there again, on a new snapshot each time.
        world.banger_ok(A, &["vm", "start", "e2e"]);
        let (_, dev) = snapshot_of(&world, &world.show(A, "e2e"));
        assert_eq!(read_in(&dev, GUEST_FILE), GUEST_TEXT, "lost across stop and start");
        world.banger_ok(A, &["vm", "restart", "e2e"]);
        let (_, dev) = snapshot_of(&world, &world.show(A, "e2e"));
        assert_eq!(read_in(&dev, GUEST_FILE), GUEST_TEXT, "lost across a restart");
        assert_eq!(read_in(&dev, "/etc/hostname").trim(), "e2e");
        assert_eq!(image(&world).1, image_sum, "the image changed");
        assert!(read_in(&image_path, GUEST_FILE).is_empty(), "the guest's file reached the image");

        world.banger_ok(A, &["vm", "delete", "e2e"]);
        assert!(!cow_file(&vm).exists());
        world.assert_no_leaks();
    }

    #[test]
    #[ignore = "needs device-mapper: runs in the kernel tier"]
    fn vm_run_then_kill_9_of_bangerd_then_vm_delete_leaves_nothing() {
        if !inside_or_skip() {
            return;
        }
        let world = dm_world();
        world.banger(A, &["vm", "run", "--name", "e2e", "--disk", "64M", "--", "true"]).ok();
        let vm = world.show(A, "e2e");
        let (name, _) = snapshot_of(&world, &vm);
        let (pid, tap) = (vm.pid.expect("pid"), vm.tap.clone().expect("tap"));
        let disk = PathBuf::from(vm.extra["work_disk"].as_str().expect("a work disk"));
        assert!(disk.is_file());

        let status = world.daemon_status(A);
        let daemon = status.get("pid").and_then(|p| p.as_u64()).expect("daemon pid") as u32;
        proc::kill9(daemon);
        let dead = wait_for(Duration::from_secs(10), Duration::from_millis(20), || {
            (!proc::alive(daemon)).then_some(())
        });
        assert!(dead.is_some(), "bangerd {daemon} survived SIGKILL");

        // The next call starts a daemon that finds the VM running, and deletes it.
        world.banger_ok(A, &["vm", "delete", "e2e"]);
        assert!(!proc::alive(pid), "the VMM {pid} still runs");
        assert!(!dm_exists(&name), "{name} is left");
        assert!(world.loops().is_empty(), "loops left: {:?}", world.loops());
        assert!(!world.link_exists(&tap), "TAP {tap} is left");
        assert!(!vm.vm_dir.clone().expect("vm_dir").exists() && !disk.exists());
        let left = root("dmsetup", &["ls"]).unwrap().stdout;
        assert!(!left.contains(&name), "dmsetup ls: {left}");
        world.assert_no_leaks();
    }
}
