//! Loop attach and detach through the real helper, checked with `losetup` and the device nodes.
//!
//! A loop device is only ever half of a dm-snapshot, so the helper attaches one only where it
//! can make dm-snapshot targets: on this kind of host (no device-mapper) every attach is refused
//! (the first test); the tests of real loop devices run in the kernel tier (`in_kernel_tier`).

mod common;

use std::os::fd::AsFd;

use banger_protocol::{HelperError, LoopRole, Request, Response};
use common::*;

fn attach(role: LoopRole, read_only: bool) -> Request {
    Request::LoopAttach { vm: vm("disk"), role, read_only }
}

/// The helper attaches loop devices exactly where its `Hello` says it can make dm-snapshot
/// roots; where it cannot (this kind of host), `LoopAttach` and `DmCreate` are refused with the
/// same clear error, and no loop device appears.
#[test]
#[ignore = "needs root: the real helper"]
fn loop_attach_and_dm_create_follow_the_device_mapper_capability() {
    if !root_or_skip("loop_attach_and_dm_create_follow_the_device_mapper_capability") {
        return;
    }
    let a = 61030;
    let ns = Netns::new("nodm");
    let mut files = BackingFiles::new();
    let h = Helper::start(&ns, &policy(&[a], ""));
    let img = files.file("img", a, 1 << 20);
    let socket = h.socket.clone();
    let img_c = img.clone();
    let r = as_uid(a, move || {
        let (c, hello) = Client::connect(&socket, "l").unwrap();
        let f = std::fs::File::open(&img_c).unwrap();
        vec![
            hello,
            c.call_fds(attach(LoopRole::Base, true), &[f.as_fd()]),
            c.call(Request::DmCreate { vm: vm("disk") }),
            c.call(Request::TeardownVms { vms: vec![vm("disk")] }),
        ]
    });
    let Response::Hello(hello) = &r[0] else { panic!("{r:?}") };
    if hello.capabilities.device_mapper {
        assert!(matches!(r[1], Response::Loop(_)), "{r:?}");
        assert!(matches!(r[2], Response::Error(HelperError::NotFound { .. })), "no cow yet: {r:?}");
    } else {
        for refused in &r[1..3] {
            assert!(
                matches!(refused, Response::Error(HelperError::Conflict { what })
                    if what.contains("no device-mapper") && what.contains("use file storage")),
                "{refused:?}"
            );
        }
        assert!(h.log_text().contains("no dm-snapshot roots on this host"), "{}", h.log_text());
        assert!(!h.node_dir.exists(), "a node directory without device-mapper");
    }
    assert!(matches!(&r[3], Response::Teardown(t) if t.failures.is_empty()), "{r:?}");
    assert!(loops_of(&img).is_empty(), "loop device leaked");
    drop(h);
    ns.finish();
}

/// Real loop devices: these need a helper that can make dm-snapshot roots.
mod in_kernel_tier {
    use super::*;

    #[test]
    #[ignore = "needs device-mapper: runs in the kernel tier"]
    fn loop_attach_read_only_and_read_write_then_detach() {
        if !in_kernel_tier_or_skip("loop_attach_read_only_and_read_write_then_detach") {
            return;
        }
        let (a, b) = (61031, 61032);
        let ns = Netns::new("loop");
        let mut files = BackingFiles::new();
        let h = Helper::start(&ns, &policy(&[a, b], ""));
        let base = files.file("base.img", a, 4 << 20);
        let cow = files.file("cow.img", a, 4 << 20);
        let foreign = files.file("foreign.img", b, 1 << 20);
        std::fs::set_permissions(&foreign, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();

        let socket = h.socket.clone();
        let (base_c, cow_c, foreign_c) = (base.clone(), cow.clone(), foreign.clone());
        let r = as_uid(a, move || {
            let (c, hello) = Client::connect(&socket, "l").unwrap();
            let ro_fd = std::fs::File::open(&base_c).unwrap();
            let rw_fd = std::fs::OpenOptions::new().read(true).write(true).open(&cow_c).unwrap();
            let cow_ro_fd = std::fs::File::open(&cow_c).unwrap();
            let foreign_fd = std::fs::File::open(&foreign_c).unwrap();
            vec![
                hello,
                // Read-write asked for, but the descriptor is read-only: read-only.
                c.call_fds(attach(LoopRole::Base, false), &[ro_fd.as_fd()]),
                c.call_fds(attach(LoopRole::Cow, false), &[rw_fd.as_fd()]),
                // A file of another user, opened (it is world-readable), is still refused.
                c.call_fds(attach(LoopRole::Cow, true), &[foreign_fd.as_fd()]),
                // No descriptor, two descriptors: refused.
                c.call(attach(LoopRole::Cow, true)),
                c.call_fds(attach(LoopRole::Cow, true), &[cow_ro_fd.as_fd(), ro_fd.as_fd()]),
                c.call(Request::ListOwned),
            ]
        });
        let Response::Loop(l_base) = &r[1] else { panic!("{:?}\n{}", r[1], h.log_text()) };
        let Response::Loop(l_cow) = &r[2] else { panic!("{:?}\n{}", r[2], h.log_text()) };
        assert!(l_base.read_only && !l_cow.read_only);
        assert!(matches!(r[3], Response::Error(HelperError::Denied { .. })), "{:?}", r[3]);
        assert!(matches!(r[4], Response::Error(HelperError::InvalidRequest { .. })), "{:?}", r[4]);
        assert!(matches!(r[5], Response::Error(HelperError::InvalidRequest { .. })), "{:?}", r[5]);
        let Response::Owned(o) = &r[6] else { panic!("{r:?}") };
        assert_eq!(o.loops.len(), 2);

        assert_eq!(loops_of(&base), vec![l_base.device.clone()]);
        assert_eq!(loops_of(&cow), vec![l_cow.device.clone()]);
        assert!(loops_of(&foreign).is_empty());
        assert!(loop_read_only(&l_base.device));
        assert!(!loop_read_only(&l_cow.device));
        // The nodes stay root's: whoever holds a loop device open could rebind it.
        assert_eq!(node_owner(&l_base.device), (0, 0o600));
        assert_eq!(node_owner(&l_cow.device), (0, 0o600));
        let autoclear = std::fs::read_to_string(format!(
            "/sys/block/{}/loop/autoclear",
            l_cow.device.trim_start_matches("/dev/")
        ))
        .unwrap();
        assert_eq!(autoclear.trim(), "0", "a device is released by the helper, never by autoclear");
        // a cannot open its own devices (root's 0600): nothing can rebind them.
        let devices = [l_base.device.clone(), l_cow.device.clone()];
        let r = as_uid(a, move || {
            devices
                .iter()
                .map(|d| match std::fs::OpenOptions::new().read(true).open(d) {
                    Ok(_) => client_error(format!("{d} opened")),
                    Err(e) => client_error(e.to_string()),
                })
                .collect()
        });
        assert!(
            r.iter().all(|x| matches!(x, Response::Error(HelperError::Kernel { detail, .. }) if detail.contains("ermission denied"))),
            "{r:?}"
        );

        // b cannot release a's devices, by any name.
        let r = session(&h, b, "l", vec![Request::TeardownVms { vms: vec![vm("disk")] }]);
        assert!(matches!(&r[1], Response::Teardown(t) if t.failures.is_empty()), "{r:?}");
        assert_eq!(loops_of(&base), vec![l_base.device.clone()], "b detached a's device");

        // a tears down, twice: both released and removed, and absent is done.
        let teardown = Request::TeardownVms { vms: vec![vm("disk")] };
        let r = session(&h, a, "l", vec![teardown.clone(), teardown, Request::ListOwned]);
        assert!(r[1..3].iter().all(|x| matches!(x, Response::Teardown(t) if t.failures.is_empty())), "{r:?}");
        assert!(loops_of(&base).is_empty() && loops_of(&cow).is_empty());
        assert!(matches!(&r[3], Response::Owned(o) if o.loops.is_empty()), "{r:?}");
        drop(h);
        ns.finish();
        assert!(loops_of(&base).is_empty() && loops_of(&cow).is_empty(), "loop device leaked");
    }

    #[test]
    #[ignore = "needs device-mapper: runs in the kernel tier"]
    fn loop_quota_is_a_typed_error() {
        if !in_kernel_tier_or_skip("loop_quota_is_a_typed_error") {
            return;
        }
        let a = 61033;
        let ns = Netns::new("loopq");
        let mut files = BackingFiles::new();
        let h = Helper::start(&ns, &policy(&[a], "[quotas]\nmax_loops = 1\n"));
        let one = files.file("one.img", a, 1 << 20);
        let two = files.file("two.img", a, 1 << 20);
        let socket = h.socket.clone();
        let (one_c, two_c) = (one.clone(), two.clone());
        let r = as_uid(a, move || {
            let (c, hello) = Client::connect(&socket, "q").unwrap();
            let f1 = std::fs::File::open(&one_c).unwrap();
            let f2 = std::fs::File::open(&two_c).unwrap();
            vec![
                hello,
                c.call_fds(attach(LoopRole::Base, true), &[f1.as_fd()]),
                c.call_fds(attach(LoopRole::Cow, true), &[f2.as_fd()]),
                c.call(Request::TeardownVms { vms: vec![vm("disk")] }),
            ]
        });
        assert!(matches!(r[1], Response::Loop(_)), "{r:?}");
        assert_eq!(r[2], Response::Error(HelperError::QuotaExceeded { resource: "loops".into(), limit: 1 }));
        assert!(matches!(&r[3], Response::Teardown(t) if t.failures.is_empty()), "{r:?}");
        assert!(loops_of(&two).is_empty(), "a refused attach left a device");
        assert!(loops_of(&one).is_empty());
        drop(h);
        ns.finish();
    }

    /// A descriptor a former owner kept on a loop device must never see the next owner's disk: uid a
    /// tries to open its device to detach or rebind it behind the helper's back (`LOOP_CLR_FD` on
    /// the node) or to keep a descriptor for the next owner's disk: the node is root's, so it cannot.
    /// Then the device goes with teardown and b attaches its own.
    #[test]
    #[ignore = "needs device-mapper: runs in the kernel tier"]
    fn a_kept_descriptor_never_reaches_the_next_owners_disk() {
        if !in_kernel_tier_or_skip("a_kept_descriptor_never_reaches_the_next_owners_disk") {
            return;
        }
        nix::ioctl_none_bad!(loop_clr_fd, linux_raw_sys::loop_device::LOOP_CLR_FD);
        let (a, b) = (61034, 61035);
        let ns = Netns::new("loopkeep");
        let mut files = BackingFiles::new();
        let h = Helper::start(&ns, &policy(&[a, b], ""));
        let a_img = files.file("a.img", a, 1 << 20);
        let b_img = files.file("b.img", b, 1 << 20);
        let secret = vec![0x5a_u8; 4096];
        std::fs::write(&b_img, &secret).unwrap();
        std::fs::OpenOptions::new().write(true).open(&b_img).unwrap().set_len(1 << 20).unwrap();

        let socket = h.socket.clone();
        let a_img_c = a_img.clone();
        let r = as_uid(a, move || {
            let (c, hello) = Client::connect(&socket, "k").unwrap();
            let f = std::fs::OpenOptions::new().read(true).write(true).open(&a_img_c).unwrap();
            vec![hello, c.call_fds(attach(LoopRole::Cow, false), &[f.as_fd()])]
        });
        let Response::Loop(la) = &r[1] else { panic!("{:?}\n{}", r[1], h.log_text()) };
        let device_a = la.device.clone();
        assert_eq!(node_owner(&device_a), (0, 0o600), "the node is never handed to the user");

        // As a: open the device to rebind it (LOOP_CLR_FD / LOOP_SET_FD / LOOP_CHANGE_FD need only an
        // open descriptor) or to keep a descriptor for later. The node is root's 0600: refused.
        let dev = device_a.clone();
        let r = as_uid(a, move || {
            let attempt = (|| {
                let d = std::fs::OpenOptions::new().read(true).write(true).open(&dev)?;
                // SAFETY: LOOP_CLR_FD takes no argument; `d` is an open loop device.
                unsafe { loop_clr_fd(std::os::fd::AsRawFd::as_raw_fd(&d)) }.map_err(std::io::Error::from)?;
                std::fs::File::open(&dev)
            })();
            vec![match attempt {
                Ok(_) => client_error("the device was opened and cleared".into()),
                Err(e) => client_error(e.to_string()),
            }]
        });
        assert!(
            matches!(&r[0], Response::Error(HelperError::Kernel { detail, .. }) if detail.contains("ermission denied")),
            "{r:?}"
        );
        assert_eq!(loops_of(&a_img), vec![device_a.clone()], "a cleared its device");

        let r = session(&h, a, "k", vec![Request::TeardownVms { vms: vec![vm("disk")] }]);
        assert!(matches!(&r[1], Response::Teardown(t) if t.failures.is_empty()), "{r:?}");
        assert!(loops_of(&a_img).is_empty());

        let socket = h.socket.clone();
        let b_img_c = b_img.clone();
        let r = as_uid(b, move || {
            let (c, hello) = Client::connect(&socket, "k").unwrap();
            let f = std::fs::OpenOptions::new().read(true).write(true).open(&b_img_c).unwrap();
            vec![hello, c.call_fds(attach(LoopRole::Cow, false), &[f.as_fd()])]
        });
        let Response::Loop(lb) = &r[1] else { panic!("{:?}\n{}", r[1], h.log_text()) };
        assert_eq!(loops_of(&b_img), vec![lb.device.clone()]);
        assert_eq!(node_owner(&lb.device), (0, 0o600));
        let r = session(&h, b, "k", vec![Request::TeardownVms { vms: vec![vm("disk")] }]);
        assert!(matches!(&r[1], Response::Teardown(t) if t.failures.is_empty()), "{r:?}");
        drop(h);
        ns.finish();
        assert!(loops_of(&b_img).is_empty(), "loop device leaked");
    }

    /// A mount made for one test, unmounted (lazily, so a failing test cannot keep it) on drop.
    struct TempMount {
        dir: tempfile::TempDir,
    }

    impl TempMount {
        fn new(fs: &str) -> TempMount {
            let dir = temp_dir();
            let out = std::process::Command::new("mount")
                .args(["-t", fs, "-o", "mode=0755", fs])
                .arg(dir.path())
                .output()
                .unwrap();
            assert!(out.status.success(), "mount {fs}: {}", String::from_utf8_lossy(&out.stderr));
            TempMount { dir }
        }
    }

    impl Drop for TempMount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).output();
        }
    }

    #[test]
    #[ignore = "needs device-mapper: runs in the kernel tier"]
    fn only_files_on_local_filesystems_are_attached() {
        if !in_kernel_tier_or_skip("only_files_on_local_filesystems_are_attached") {
            return;
        }
        let a = 61036;
        let ns = Netns::new("loopfs");
        // Mounted before the helper starts, so its mount table has them.
        let (ramfs, tmpfs) = (TempMount::new("ramfs"), TempMount::new("tmpfs"));
        let h = Helper::start(&ns, &policy(&[a], ""));
        let mut paths = Vec::new();
        for m in [&ramfs, &tmpfs] {
            let p = m.dir.path().join("disk.img");
            let f = std::fs::File::create(&p).unwrap();
            f.set_len(1 << 20).unwrap();
            std::os::unix::fs::chown(&p, Some(a), Some(a)).unwrap();
            paths.push(p);
        }
        let socket = h.socket.clone();
        let paths_c = paths.clone();
        let r = as_uid(a, move || {
            let (c, hello) = Client::connect(&socket, "fs").unwrap();
            let on_ramfs = std::fs::File::open(&paths_c[0]).unwrap();
            let on_tmpfs = std::fs::File::open(&paths_c[1]).unwrap();
            vec![
                hello,
                c.call_fds(attach(LoopRole::Base, true), &[on_ramfs.as_fd()]),
                c.call_fds(attach(LoopRole::Base, true), &[on_tmpfs.as_fd()]),
                c.call(Request::TeardownVms { vms: vec![vm("disk")] }),
            ]
        });
        assert!(
            matches!(&r[1], Response::Error(HelperError::InvalidRequest { reason }) if reason.contains("of type \"ramfs\"")),
            "{:?}",
            r[1]
        );
        assert!(matches!(r[2], Response::Loop(_)), "{:?}\n{}", r[2], h.log_text());
        assert!(matches!(&r[3], Response::Teardown(t) if t.failures.is_empty()), "{r:?}");
        assert!(loops_of(&paths[0]).is_empty() && loops_of(&paths[1]).is_empty(), "loop device leaked");
        drop(h);
        ns.finish();
    }
}
