//! The kernel tier's own checks, run as root inside its guest (`tests/kernel-tier.list`): that
//! the kernel features the product's device-mapper and network tests need are there and behave
//! as on a real host without udev.
//!
//! - a dm-snapshot over two loop devices on sparse files, created with `dmsetup`, reached through
//!   `/dev/dm-N` (no udev: no `/dev/mapper/NAME`), a write through it landing in the COW file and
//!   not the origin, removed in order (the dm target, then the loops) leaving nothing;
//! - a TAP in a fresh network namespace, and nf_tables rules there through `iptables-nft`, its
//!   modules loaded on demand by the kernel (module autoload reaching the shared root's modprobe);
//! - a job's root is its mount namespace's root (not a chroot), so an unprivileged user may make
//!   a user namespace there, as the Firecracker double's guests do.
//!
//! Outside the tier these tests skip with a message, and fail under `CI=true`.

mod in_kernel_tier {
    use std::fs::File;
    use std::os::unix::fs::{FileExt as _, FileTypeExt as _, MetadataExt as _};
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use banger_tests::kernel_tier::guest::inside_or_skip;

    const MIB: u64 = 1024 * 1024;

    /// Runs a command, returns its stdout; panics with its stderr when it fails.
    fn run(program: &str, args: &[&str]) -> String {
        let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn succeeds(program: &str, args: &[&str]) -> bool {
        Command::new(program).args(args).output().is_ok_and(|o| o.status.success())
    }

    /// A loop device over a file, detached on drop if the test has not detached it.
    struct Loop {
        dev: Option<String>,
        file: PathBuf,
    }

    impl Loop {
        fn attach(file: &Path) -> Loop {
            let dev = run("losetup", &["--find", "--show", &file.to_string_lossy()]).trim().to_string();
            assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
            Loop { dev: Some(dev), file: file.to_path_buf() }
        }

        fn path(&self) -> &str {
            self.dev.as_deref().expect("attached")
        }

        fn detach(&mut self) {
            let dev = self.dev.take().expect("attached");
            run("losetup", &["-d", &dev]);
            let holders = run("losetup", &["-j", &self.file.to_string_lossy()]);
            assert!(holders.trim().is_empty(), "{} still has loop devices: {holders}", self.file.display());
            let name = dev.trim_start_matches("/dev/");
            assert!(!Path::new(&format!("/sys/block/{name}/loop")).exists(), "{dev} is still bound");
        }
    }

    impl Drop for Loop {
        fn drop(&mut self) {
            if let Some(dev) = self.dev.take() {
                let _ = Command::new("losetup").args(["-d", &dev]).status();
            }
        }
    }

    /// A device-mapper target, removed on drop if the test has not removed it.
    struct Dm {
        name: Option<String>,
    }

    impl Dm {
        fn create(name: &str, table: &str) -> Dm {
            // No udev in the guest: do not wait for it.
            run("dmsetup", &["--noudevsync", "create", name, "--table", table]);
            Dm { name: Some(name.to_string()) }
        }

        fn name(&self) -> &str {
            self.name.as_deref().expect("created")
        }

        /// (major, minor) as device-mapper reports them.
        fn devnum(&self) -> (u64, u64) {
            let out = run("dmsetup", &["info", "-c", "--noheadings", "-o", "major,minor", self.name()]);
            let (major, minor) =
                out.trim().split_once(':').unwrap_or_else(|| panic!("dmsetup info: {out:?}"));
            (major.trim().parse().unwrap(), minor.trim().parse().unwrap())
        }

        fn remove(&mut self, minor: u64) {
            let name = self.name.take().expect("created");
            run("dmsetup", &["--noudevsync", "remove", &name]);
            assert!(!succeeds("dmsetup", &["info", &name]), "{name} is still known to device-mapper");
            assert!(!Path::new(&format!("/sys/block/dm-{minor}")).exists(), "dm-{minor} still exists");
        }
    }

    impl Drop for Dm {
        fn drop(&mut self) {
            if let Some(name) = self.name.take() {
                let _ = Command::new("dmsetup").args(["--noudevsync", "remove", &name]).status();
            }
        }
    }

    fn sparse_file(path: &Path, size: u64) -> File {
        let file = File::options().read(true).write(true).create_new(true).open(path).unwrap();
        file.set_len(size).unwrap();
        file
    }

    fn block(byte: u8) -> Vec<u8> {
        vec![byte; 4096]
    }

    #[test]
    #[ignore = "needs device-mapper: runs in the kernel tier"]
    fn dm_snapshot_over_two_loops_writes_to_the_cow_and_is_removed_in_order() {
        if !inside_or_skip() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (origin_path, cow_path) = (dir.path().join("origin"), dir.path().join("cow"));
        let origin = sparse_file(&origin_path, 64 * MIB);
        origin.write_all_at(&block(0xab), 0).unwrap();
        origin.write_all_at(&block(0xab), MIB).unwrap();
        origin.sync_all().unwrap();
        let cow = sparse_file(&cow_path, 16 * MIB);
        drop(cow);

        let mut origin_loop = Loop::attach(&origin_path);
        let mut cow_loop = Loop::attach(&cow_path);
        let name = format!("kt-smoke-{}", std::process::id());
        let sectors = 64 * MIB / 512;
        let table = format!("0 {sectors} snapshot {} {} P 8", origin_loop.path(), cow_loop.path());
        let mut dm = Dm::create(&name, &table);
        let (major, minor) = dm.devnum();
        let node = PathBuf::from(format!("/dev/dm-{minor}"));

        // The node is a block device of the target's number (no udev: /dev/mapper/NAME is not
        // to be relied on, and writing there could create a regular file on devtmpfs).
        let meta = std::fs::metadata(&node).unwrap();
        assert!(meta.file_type().is_block_device(), "{} is not a block device", node.display());
        assert_eq!(
            meta.rdev(),
            nix::sys::stat::makedev(major, minor),
            "{} has another number",
            node.display()
        );
        let sys_name = std::fs::read_to_string(format!("/sys/block/dm-{minor}/dm/name")).unwrap();
        assert_eq!(sys_name.trim(), name);
        let status = run("dmsetup", &["status", &name]);
        assert!(status.contains(&format!("0 {sectors} snapshot")), "{status}");

        // A write through the snapshot lands in the COW, and the origin keeps its data.
        let dev = File::options().read(true).write(true).open(&node).unwrap();
        let mut buf = block(0);
        dev.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, block(0xab), "the snapshot does not show the origin's data");
        dev.write_all_at(&block(0xcd), 0).unwrap();
        dev.sync_all().unwrap();
        dev.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, block(0xcd), "the snapshot does not show what was written to it");
        dev.read_exact_at(&mut buf, MIB).unwrap();
        assert_eq!(buf, block(0xab), "an unwritten chunk does not read through to the origin");
        drop(dev);
        origin.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, block(0xab), "the write reached the origin");
        let cow = std::fs::read(&cow_path).unwrap();
        assert!(
            cow.chunks(4096).any(|chunk| chunk == block(0xcd).as_slice()),
            "the written chunk is not in the COW file"
        );

        // Removal in order: the target, then the loops under it; nothing is left.
        dm.remove(minor);
        assert!(!node.exists(), "{} is still there", node.display());
        origin_loop.detach();
        cow_loop.detach();
        let left = run("dmsetup", &["ls"]);
        assert!(!left.contains(&name), "dmsetup ls still lists {name}: {left}");
    }

    #[test]
    #[ignore = "needs device-mapper: runs in the kernel tier"]
    fn tap_in_a_fresh_netns_and_nf_tables_rules_there() {
        if !inside_or_skip() {
            return;
        }
        // Everything happens in a network namespace that ends with the `unshare` process, with a
        // sysfs of its own (the guest's shows the guest's namespace).
        let script = "set -e
            mount -t sysfs sysfs /sys
            ip link set lo up
            ip tuntap add dev kt-tap0 mode tap
            ip link set kt-tap0 up
            flags=$(cat /sys/class/net/kt-tap0/tun_flags)
            echo tun_flags=$flags
            ip -d link show kt-tap0
            iptables-nft -t filter -N KT_SMOKE
            iptables-nft -t filter -A KT_SMOKE -i kt-tap0 -j ACCEPT
            iptables-nft -t filter -S KT_SMOKE";
        let out = run("unshare", &["--net", "--mount", "sh", "-c", script]);
        let flags = out
            .lines()
            .find_map(|l| l.strip_prefix("tun_flags=0x"))
            .and_then(|hex| u32::from_str_radix(hex.trim(), 16).ok())
            .unwrap_or_else(|| panic!("no tun_flags in {out}"));
        assert_eq!(flags & 0x0002, 0x0002, "kt-tap0 is not a TAP (IFF_TAP): {out}");
        assert!(out.contains("tun type tap"), "{out}");
        assert!(out.contains("-A KT_SMOKE -i kt-tap0 -j ACCEPT"), "{out}");
        // nf_tables came from the kernel's module autoload, not from the guest's set-up.
        let modules = std::fs::read_to_string("/proc/modules").unwrap();
        assert!(modules.lines().any(|l| l.starts_with("nf_tables ")), "nf_tables is not loaded");
        // The namespace took its TAP with it.
        assert!(!Path::new("/sys/class/net/kt-tap0").exists(), "kt-tap0 leaked into the guest's namespace");
    }

    #[test]
    #[ignore = "needs device-mapper: runs in the kernel tier"]
    fn a_job_is_not_chrooted_and_an_unprivileged_user_may_make_a_user_namespace() {
        if !inside_or_skip() {
            return;
        }
        // The kernel refuses CLONE_NEWUSER (EPERM) to a process whose root is not its mount
        // namespace's root, as in a chroot.
        let out = run(
            "setpriv",
            &[
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "unshare",
                "--user",
                "--map-root-user",
                "id",
                "-u",
            ],
        );
        assert_eq!(out.trim(), "0", "{out}");
    }
}
