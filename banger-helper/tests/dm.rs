//! dm-snapshot roots through the real helper: loop devices that never reach a user, a dm node
//! that does. These need device-mapper and run in the kernel tier (`tests/kernel-tier.list`),
//! one at a time (the guest has two emulated CPUs); the host's run skips them.

mod common;

mod in_kernel_tier {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsFd;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::path::{Path, PathBuf};
    use std::sync::{Mutex, MutexGuard};

    use banger_protocol::{DmInfo, HelperError, LoopInfo, LoopRole, Request, Response, min_cow_bytes};
    use nix::sys::signal::{Signal, kill};
    use nix::sys::wait::waitpid;
    use nix::unistd::{ForkResult, Gid, Pid, Uid, fork};

    use super::common::*;

    /// One helper at a time.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn serial() -> MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The base images' size and their bytes.
    const BASE: u64 = 4 << 20;
    const BASE_BYTE: u8 = 0xb5;

    /// A VM's base image (filled with [`BASE_BYTE`]) and a sparse copy-on-write file of `cow`
    /// bytes, both `uid`'s.
    fn disk_files(files: &mut BackingFiles, uid: u32, vm: &str, cow: u64) -> (PathBuf, PathBuf) {
        let base = files.file(&format!("{vm}-base.img"), uid, BASE);
        std::fs::write(&base, vec![BASE_BYTE; BASE as usize]).unwrap();
        let cow = files.file(&format!("{vm}-cow.img"), uid, cow);
        (base, cow)
    }

    /// As `uid`: attaches the base read-only and the copy-on-write file read-write for `vm`, then
    /// asks for its dm root. Hello's answer first, then one answer per request.
    fn make_root(h: &Helper, uid: u32, vm_id: &str, base: &Path, cow: &Path) -> Vec<Response> {
        let (socket, base, cow, vm_id) =
            (h.socket.clone(), base.to_owned(), cow.to_owned(), vm_id.to_owned());
        as_uid(uid, move || {
            let (c, hello) = Client::connect(&socket, "dm").unwrap();
            let b = std::fs::File::open(&base).unwrap();
            let w = std::fs::OpenOptions::new().read(true).write(true).open(&cow).unwrap();
            let attach = |role, read_only| Request::LoopAttach { vm: vm(&vm_id), role, read_only };
            vec![
                hello,
                c.call_fds(attach(LoopRole::Base, true), &[b.as_fd()]),
                c.call_fds(attach(LoopRole::Cow, false), &[w.as_fd()]),
                c.call(Request::DmCreate { vm: vm(&vm_id) }),
            ]
        })
    }

    fn made(r: &[Response], h: &Helper) -> (LoopInfo, LoopInfo, DmInfo) {
        match r {
            [Response::Hello(hello), Response::Loop(b), Response::Loop(c), Response::Dm(d)] => {
                assert!(hello.capabilities.device_mapper, "{hello:?}");
                (b.clone(), c.clone(), d.clone())
            }
            _ => panic!("{r:?}\n{}", h.log_text()),
        }
    }

    fn teardown(h: &Helper, uid: u32, vms: &[&str]) -> banger_protocol::TeardownReport {
        let r =
            session(h, uid, "dm", vec![Request::TeardownVms { vms: vms.iter().map(|v| vm(v)).collect() }]);
        match &r[1] {
            Response::Teardown(t) => t.clone(),
            other => panic!("{other:?}"),
        }
    }

    /// Runs `f` as `uid` and returns what it said went wrong, if anything.
    fn as_user(uid: u32, f: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
        let r = as_uid_with(uid, false, move || {
            vec![match f() {
                Ok(()) => Response::Pong,
                Err(e) => client_error(e),
            }]
        });
        match &r[0] {
            Response::Pong => Ok(()),
            Response::Error(HelperError::Kernel { detail, .. }) => Err(detail.clone()),
            other => panic!("{other:?}"),
        }
    }

    /// Every dm target's name, from sysfs.
    fn targets() -> Vec<(String, String)> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
            let dir = e.path();
            if let Ok(name) = std::fs::read_to_string(dir.join("dm/name")) {
                let dev = std::fs::read_to_string(dir.join("dev")).unwrap();
                out.push((name.trim().to_owned(), dev.trim().to_owned()));
            }
        }
        out
    }

    fn banger_targets() -> Vec<String> {
        targets().into_iter().map(|(n, _)| n).filter(|n| n.starts_with("banger-")).collect()
    }

    /// The device number of target `name`, `major:minor`, from sysfs.
    fn target_dev(name: &str) -> Option<String> {
        targets().into_iter().find(|(n, _)| n == name).map(|(_, d)| d)
    }

    /// A node as `lstat` sees it: block device or not, `major:minor`, owner, mode.
    fn node(path: &str) -> Option<(bool, String, u32, u32)> {
        let m = std::fs::symlink_metadata(path).ok()?;
        let rdev = format!("{}:{}", libc::major(m.rdev()), libc::minor(m.rdev()));
        Some((m.file_type().is_block_device(), rdev, m.uid(), m.mode() & 0o7777))
    }

    fn empty_dir(dir: &Path) -> bool {
        std::fs::read_dir(dir).map(|mut d| d.next().is_none()).unwrap_or(true)
    }

    /// A process of `uid` that holds `path` open until dropped.
    struct Holder(Pid);

    impl Holder {
        fn open_as(uid: u32, path: &str) -> Holder {
            let (rd, wr) = nix::unistd::pipe().unwrap();
            // SAFETY: the child makes system calls only and leaves with _exit (or is killed).
            match unsafe { fork() }.unwrap() {
                ForkResult::Child => {
                    drop(rd);
                    // SAFETY: alarm only arms a timer.
                    unsafe { libc::alarm(120) };
                    let ok = nix::unistd::setgroups(&[]).is_ok()
                        && nix::unistd::setresgid(Gid::from_raw(uid), Gid::from_raw(uid), Gid::from_raw(uid))
                            .is_ok()
                        && nix::unistd::setresuid(Uid::from_raw(uid), Uid::from_raw(uid), Uid::from_raw(uid))
                            .is_ok();
                    let held = ok
                        .then(|| std::fs::OpenOptions::new().read(true).write(true).open(path).ok())
                        .flatten();
                    let mut w = std::fs::File::from(wr);
                    let _ = w.write_all(&[u8::from(held.is_some())]);
                    drop(w);
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(1));
                    }
                }
                ForkResult::Parent { child } => {
                    drop(wr);
                    let mut b = [0u8; 1];
                    std::fs::File::from(rd).read_exact(&mut b).unwrap();
                    let holder = Holder(child);
                    assert_eq!(b[0], 1, "uid {uid} could not open {path}");
                    holder
                }
            }
        }
    }

    impl Drop for Holder {
        fn drop(&mut self) {
            let _ = kill(self.0, Signal::SIGKILL);
            let _ = waitpid(self.0, None);
        }
    }

    #[test]
    #[ignore = "needs device-mapper: runs in the kernel tier"]
    fn the_caller_gets_a_dm_node_whose_writes_land_in_the_cow_file_and_no_loop_node() {
        if !in_kernel_tier_or_skip(
            "the_caller_gets_a_dm_node_whose_writes_land_in_the_cow_file_and_no_loop_node",
        ) {
            return;
        }
        let _one = serial();
        let a = 61101;
        let ns = Netns::new("dm");
        let mut files = BackingFiles::new();
        let h = Helper::start(&ns, &policy(&[a], ""));
        let (base, cow) = disk_files(&mut files, a, "disk", min_cow_bytes(BASE));
        let (lb, lc, d) = made(&make_root(&h, a, "disk", &base, &cow), &h);
        assert!(lb.read_only && !lc.read_only);
        assert_eq!(d.sectors, BASE / 512);
        // With device-mapper the helper keeps CAP_SYS_ADMIN (21) and CAP_MKNOD (27) besides
        // CAP_CHOWN, CAP_NET_ADMIN and CAP_NET_RAW; the programs it runs can gain the last two only.
        let status = std::fs::read_to_string(format!("/proc/{}/status", h.pid())).unwrap();
        let field =
            |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).map(str::trim).unwrap_or("").to_owned();
        assert_eq!(
            (field("CapEff:"), field("CapPrm:")),
            ("0000000008203001".into(), "0000000008203001".into())
        );
        assert_eq!(field("CapBnd:"), "0000000000003000");
        assert_eq!(field("Seccomp:"), "2");

        // The node: in the helper's directory, a block device of the target's number, the
        // caller's alone.
        assert_eq!(Path::new(&d.device).parent(), Some(h.node_dir.as_path()));
        let dev = target_dev(&d.name).expect("the target exists");
        assert_eq!(node(&d.device), Some((true, dev.clone(), a, 0o600)));
        let table = std::process::Command::new("dmsetup").args(["table", &d.name]).output().unwrap();
        let table = String::from_utf8_lossy(&table.stdout).into_owned();
        let number = |dev: &str| {
            std::fs::read_to_string(format!("/sys/block/{}/dev", dev.trim_start_matches("/dev/"))).unwrap()
        };
        let expected = format!(
            "0 {} snapshot {} {} P 8",
            BASE / 512,
            number(&lb.device).trim(),
            number(&lc.device).trim()
        );
        assert_eq!(table.trim(), expected);
        let dir = std::fs::metadata(&h.node_dir).unwrap();
        assert_eq!((dir.uid(), dir.mode() & 0o7777), (0, 0o711));

        // Through the node, as the caller: the base shows through, a write lands in the
        // copy-on-write file and never in the base.
        let base_before = std::fs::read(&base).unwrap();
        let path = d.device.clone();
        let r = as_user(a, move || {
            let mut f =
                std::fs::OpenOptions::new().read(true).write(true).open(&path).map_err(|e| e.to_string())?;
            let mut first = vec![0u8; 4096];
            f.read_exact(&mut first).map_err(|e| e.to_string())?;
            if first.iter().any(|b| *b != BASE_BYTE) {
                return Err("the base does not show through".into());
            }
            f.seek(SeekFrom::Start(1 << 20)).map_err(|e| e.to_string())?;
            f.write_all(&[0x42; 4096]).map_err(|e| e.to_string())?;
            f.sync_all().map_err(|e| e.to_string())?;
            Ok(())
        });
        assert_eq!(r, Ok(()));
        assert!(std::fs::read(&base).unwrap() == base_before, "a write reached the base image");
        let cow_bytes = std::fs::read(&cow).unwrap();
        assert!(
            cow_bytes.windows(4096).any(|w| w.iter().all(|b| *b == 0x42)),
            "the write is not in the cow file"
        );

        // The loop nodes stay root's: the caller cannot open either (EACCES).
        for dev in [lb.device.clone(), lc.device.clone()] {
            assert_eq!(node(&dev).map(|n| (n.2, n.3)), Some((0, 0o600)));
            let r = as_user(a, move || {
                std::fs::File::open(&dev).map(drop).map_err(|e| format!("{:?}", e.kind()))
            });
            assert_eq!(r, Err("PermissionDenied".into()));
        }

        // Teardown: the node, the target, the loops; nothing left.
        let report = teardown(&h, a, &["disk"]);
        assert!(report.failures.is_empty(), "{report:?}\n{}", h.log_text());
        assert!(node(&d.device).is_none() && target_dev(&d.name).is_none());
        assert!(loops_of(&base).is_empty() && loops_of(&cow).is_empty());
        assert!(empty_dir(&h.node_dir));
        drop(h);
        ns.finish();
    }

    #[test]
    #[ignore = "needs device-mapper: runs in the kernel tier"]
    fn another_user_cannot_use_or_tear_down_a_vms_root_and_quotas_hold() {
        if !in_kernel_tier_or_skip("another_user_cannot_use_or_tear_down_a_vms_root_and_quotas_hold") {
            return;
        }
        let _one = serial();
        let (a, b) = (61102, 61103);
        let ns = Netns::new("dmown");
        let mut files = BackingFiles::new();
        let h = Helper::start(&ns, &policy(&[a, b], "[quotas]\nmax_vms = 1\n"));
        let (base, cow) = disk_files(&mut files, a, "disk", min_cow_bytes(BASE));
        let (_, _, d) = made(&make_root(&h, a, "disk", &base, &cow), &h);

        // b can neither open a's node, nor have it made, answered, listed or torn down.
        let path = d.device.clone();
        let r =
            as_user(b, move || std::fs::File::open(&path).map(drop).map_err(|e| format!("{:?}", e.kind())));
        assert_eq!(r, Err("PermissionDenied".into()));
        let r = session(&h, b, "dm", vec![Request::DmCreate { vm: vm("disk") }, Request::ListOwned]);
        assert!(matches!(r[1], Response::Error(HelperError::NotFound { .. })), "{r:?}");
        assert!(matches!(&r[2], Response::Owned(o) if o.dms.is_empty() && o.loops.is_empty()), "{r:?}");
        assert!(teardown(&h, b, &["disk"]).failures.is_empty());
        assert!(target_dev(&d.name).is_some(), "b tore down a's target");
        assert_eq!(node(&d.device).map(|n| n.2), Some(a));

        // a's quota: one VM, so a second VM gets no loop device (nor a root).
        let (base2, cow2) = disk_files(&mut files, a, "two", min_cow_bytes(BASE));
        let r = make_root(&h, a, "two", &base2, &cow2);
        assert_eq!(r[1], Response::Error(HelperError::QuotaExceeded { resource: "vms".into(), limit: 1 }));
        assert!(matches!(r[3], Response::Error(HelperError::NotFound { .. })), "{r:?}");
        assert!(loops_of(&base2).is_empty() && loops_of(&cow2).is_empty());

        assert!(teardown(&h, a, &["disk", "two"]).failures.is_empty());
        assert!(banger_targets().is_empty() && loops_of(&base).is_empty() && loops_of(&cow).is_empty());
        drop(h);
        ns.finish();
    }

    /// While the VMM (here, a process of the caller) holds the node open, the target cannot go:
    /// teardown takes the node back and unlinks it first, then reports the target as still open,
    /// and leaves the target and its loop devices, counted. Once it is closed, teardown finishes.
    #[test]
    #[ignore = "needs device-mapper: runs in the kernel tier"]
    fn the_node_goes_first_and_an_open_target_keeps_its_loops_until_closed() {
        if !in_kernel_tier_or_skip("the_node_goes_first_and_an_open_target_keeps_its_loops_until_closed") {
            return;
        }
        let _one = serial();
        let a = 61104;
        let ns = Netns::new("dmbusy");
        let mut files = BackingFiles::new();
        let h = Helper::start(&ns, &policy(&[a], ""));
        let (base, cow) = disk_files(&mut files, a, "disk", min_cow_bytes(BASE));
        let (lb, lc, d) = made(&make_root(&h, a, "disk", &base, &cow), &h);
        let holder = Holder::open_as(a, &d.device);
        let report = teardown(&h, a, &["disk"]);
        assert!(
            matches!(&report.failures[..], [f] if f.object == format!("dm {}", d.name) && f.error.to_string().contains("still open")),
            "{report:?}"
        );
        assert!(node(&d.device).is_none(), "the node outlived the teardown");
        assert!(target_dev(&d.name).is_some(), "an open target went");
        assert_eq!(loops_of(&base), vec![lb.device.clone()]);
        assert_eq!(loops_of(&cow), vec![lc.device.clone()]);
        let r = session(&h, a, "dm", vec![Request::ListOwned, Request::DmCreate { vm: vm("disk") }]);
        assert!(matches!(&r[1], Response::Owned(o) if o.dms.len() == 1 && o.loops.len() == 2), "{r:?}");
        assert!(matches!(r[2], Response::Error(HelperError::Conflict { .. })), "{r:?}");

        drop(holder);
        let report = teardown(&h, a, &["disk"]);
        assert!(report.failures.is_empty(), "{report:?}");
        assert!(target_dev(&d.name).is_none() && loops_of(&base).is_empty() && loops_of(&cow).is_empty());
        assert!(empty_dir(&h.node_dir));
        drop(h);
        ns.finish();
    }

    #[test]
    #[ignore = "needs device-mapper: runs in the kernel tier"]
    fn create_is_idempotent_a_lost_node_is_made_again_and_a_small_cow_is_refused() {
        if !in_kernel_tier_or_skip(
            "create_is_idempotent_a_lost_node_is_made_again_and_a_small_cow_is_refused",
        ) {
            return;
        }
        let _one = serial();
        let a = 61105;
        let ns = Netns::new("dmidem");
        let mut files = BackingFiles::new();
        let h = Helper::start(&ns, &policy(&[a], ""));
        let (base, cow) = disk_files(&mut files, a, "disk", min_cow_bytes(BASE));
        let (_, _, d) = made(&make_root(&h, a, "disk", &base, &cow), &h);
        let dev = target_dev(&d.name).unwrap();
        let again = session(&h, a, "dm", vec![Request::DmCreate { vm: vm("disk") }]);
        assert_eq!(again[1], Response::Dm(d.clone()));
        assert_eq!(banger_targets(), vec![d.name.clone()]);
        // A node removed behind the helper's back is made again, for the same target.
        std::fs::remove_file(&d.device).unwrap();
        let again = session(&h, a, "dm", vec![Request::DmCreate { vm: vm("disk") }]);
        assert_eq!(again[1], Response::Dm(d.clone()));
        assert_eq!(node(&d.device), Some((true, dev, a, 0o600)));

        // A copy-on-write file a chunk too small for its base: refused, nothing made.
        let (base2, cow2) = disk_files(&mut files, a, "small", min_cow_bytes(BASE) - 4096);
        let r = make_root(&h, a, "small", &base2, &cow2);
        assert!(matches!(r[2], Response::Loop(_)), "{r:?}");
        assert!(
            matches!(&r[3], Response::Error(HelperError::InvalidRequest { reason }) if reason.contains("needs at least")),
            "{r:?}"
        );
        assert_eq!(banger_targets(), vec![d.name.clone()]);

        assert!(teardown(&h, a, &["disk", "small"]).failures.is_empty());
        assert!(banger_targets().is_empty() && empty_dir(&h.node_dir));
        for f in [&base, &cow, &base2, &cow2] {
            assert!(loops_of(f).is_empty(), "{f:?}");
        }
        drop(h);
        ns.finish();
    }

    /// A helper killed (SIGKILL) after one VM's loop devices and before its dm-create, with
    /// another VM's root made: the next helper keeps both (they settled), makes the first VM's
    /// root, and teardown leaves nothing.
    #[test]
    #[ignore = "needs device-mapper: runs in the kernel tier"]
    fn a_helper_killed_between_the_loops_and_the_dm_leaves_nothing_after_restart_and_teardown() {
        if !in_kernel_tier_or_skip(
            "a_helper_killed_between_the_loops_and_the_dm_leaves_nothing_after_restart_and_teardown",
        ) {
            return;
        }
        let _one = serial();
        let a = 61106;
        let ns = Netns::new("dmkill");
        let pol = policy(&[a], "");
        let mut files = BackingFiles::new();
        let h = Helper::start(&ns, &pol);
        let (base1, cow1) = disk_files(&mut files, a, "one", min_cow_bytes(BASE));
        let (base2, cow2) = disk_files(&mut files, a, "two", min_cow_bytes(BASE));
        let (_, _, two) = made(&make_root(&h, a, "two", &base2, &cow2), &h);
        // "one": its loop devices, and the helper is killed before its dm-create.
        let (socket, b1, c1) = (h.socket.clone(), base1.clone(), cow1.clone());
        let r = as_uid(a, move || {
            let (c, hello) = Client::connect(&socket, "dm").unwrap();
            let b = std::fs::File::open(&b1).unwrap();
            let w = std::fs::OpenOptions::new().read(true).write(true).open(&c1).unwrap();
            vec![
                hello,
                c.call_fds(
                    Request::LoopAttach { vm: vm("one"), role: LoopRole::Base, read_only: true },
                    &[b.as_fd()],
                ),
                c.call_fds(
                    Request::LoopAttach { vm: vm("one"), role: LoopRole::Cow, read_only: false },
                    &[w.as_fd()],
                ),
            ]
        });
        assert!(matches!((&r[1], &r[2]), (Response::Loop(_), Response::Loop(_))), "{r:?}");
        let dir = h.kill_9();

        let h = Helper::start_in(&ns, dir, &pol);
        assert!(h.log_text().contains("ledger reconciled: 0 dropped"), "{}", h.log_text());
        let r = session(&h, a, "dm", vec![Request::DmCreate { vm: vm("one") }, Request::ListOwned]);
        let Response::Dm(one) = &r[1] else { panic!("{r:?}\n{}", h.log_text()) };
        let Response::Owned(owned) = &r[2] else { panic!("{r:?}") };
        assert_eq!((owned.loops.len(), owned.dms.len()), (4, 2));
        assert!(owned.dms.contains(&two));
        assert!(node(&one.device).is_some() && node(&two.device).is_some());

        let report = teardown(&h, a, &["one", "two"]);
        assert!(report.failures.is_empty(), "{report:?}");
        assert!(banger_targets().is_empty() && empty_dir(&h.node_dir));
        for f in [&base1, &cow1, &base2, &cow2] {
            assert!(loops_of(f).is_empty(), "{f:?}");
        }
        drop(h);
        ns.finish();
    }

    /// Where the snapshot target is not loaded yet, the helper has the kernel load it at start.
    #[test]
    #[ignore = "needs device-mapper: runs in the kernel tier"]
    fn the_snapshot_target_is_loaded_at_start_when_missing() {
        if !in_kernel_tier_or_skip("the_snapshot_target_is_loaded_at_start_when_missing") {
            return;
        }
        let _one = serial();
        let unloaded = std::process::Command::new("modprobe").args(["-r", "dm_snapshot"]).status().unwrap();
        if !unloaded.success() || Path::new("/sys/module/dm_snapshot").exists() {
            eprintln!("SKIPPED: dm_snapshot cannot be unloaded here (built in, or in use)");
            return;
        }
        let ns = Netns::new("dmload");
        let h = Helper::start(&ns, &policy(&[61107], ""));
        assert!(Path::new("/sys/module/dm_snapshot").exists(), "{}", h.log_text());
        let r = session(&h, 61107, "dm", vec![]);
        assert!(matches!(&r[0], Response::Hello(hello) if hello.capabilities.device_mapper), "{r:?}");
        assert!(!targets().iter().any(|(n, _)| n == "banger-probe"), "the transient target stayed");
        drop(h);
        ns.finish();
    }
}
