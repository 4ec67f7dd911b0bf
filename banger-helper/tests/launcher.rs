//! The real helper with a `[jailer]` in its policy: the jail launcher it forks before confining
//! itself, that launcher's privileges and confinement, and its end with the helper.

mod common;

use std::time::{Duration, Instant};

use banger_helper::launcher::{NAME, confine};
use banger_protocol::{Request, Response};
use common::*;

/// A `[jailer]` the host checks accept: root's binaries (a statically linked one standing in for
/// Firecracker; no jail is launched here) and a chroot base of root's that others cannot write.
fn jailer_policy(base: &std::path::Path) -> String {
    policy(
        &[61051],
        &format!(
            "[jailer]\njailer = \"/usr/bin/true\"\nfirecracker = \"/usr/sbin/ldconfig\"\nchroot_base = \"{}\"\n\
             uid_range = \"910000-910999\"\ncgroup = \"v1\"\n",
            base.display()
        ),
    )
}

fn status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default()
}

fn field(status: &str, key: &str) -> String {
    status.lines().find_map(|l| l.strip_prefix(key)).map(str::trim).unwrap_or("").to_owned()
}

/// The helper's children (the launcher alone, when there is one).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

/// Whether `pid` is gone or a zombie waiting for its new parent.
fn ended(pid: u32) -> bool {
    let s = status(pid);
    s.is_empty() || field(&s, "State:").starts_with('Z')
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(10), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[ignore = "needs root: the real helper and its jail launcher in a network namespace"]
fn the_launcher_runs_with_the_jailers_privileges_and_dies_with_the_helper() {
    if !root_or_skip("the_launcher_runs_with_the_jailers_privileges_and_dies_with_the_helper") {
        return;
    }
    let ns = Netns::new("launcher");
    let base = temp_dir();
    let h = Helper::start_with_cgroups(&ns, &jailer_policy(base.path()));
    let kids = children(h.pid());
    assert_eq!(kids.len(), 1, "one launcher: {kids:?}");
    let launcher = kids[0];
    let l = status(launcher);
    assert_eq!(field(&l, "Name:"), NAME.to_str().unwrap());
    let kept = format!("{:016x}", confine::kept_bits());
    for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(field(&l, set), kept, "launcher {set}");
    }
    assert_eq!(field(&l, "CapInh:"), "0000000000000000");
    assert_eq!(field(&l, "CapAmb:"), "0000000000000000");
    assert_eq!(field(&l, "NoNewPrivs:"), "1");
    assert_eq!(field(&l, "Seccomp:"), "2");
    assert_eq!(field(&l, "Seccomp_filters:"), "2", "the denylist and the clone3 filter");
    // One socket: its end of the socketpair, not the helper's listening socket.
    let sockets = std::fs::read_dir(format!("/proc/{launcher}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .filter(|t| t.to_string_lossy().starts_with("socket:"))
        .count();
    assert_eq!(sockets, 1, "the launcher holds its channel alone");
    let log = h.log_text();
    assert!(log.contains("jail launcher started"), "{log}");
    assert!(log.contains("landlock fully enforced"), "{log}");

    // The helper itself is confined exactly as without a [jailer].
    let s = status(h.pid());
    assert_eq!(field(&s, "NoNewPrivs:"), "1");
    assert_eq!(field(&s, "Seccomp_filters:"), "2");
    assert_eq!(field(&s, "CapBnd:"), "0000000000003000");
    let device_mapper = log.contains("with the snapshot target");
    let helper_kept = if device_mapper { "0000000008203001" } else { "0000000000003001" };
    assert_eq!(field(&s, "CapEff:"), helper_kept);

    let hello = session(&h, 61051, "c", vec![]);
    assert!(matches!(&hello[0], Response::Hello(r) if r.capabilities.jailer), "{hello:?}");

    // The launcher dies with the helper.
    drop(h.kill_9());
    wait_until("the launcher ends with the helper", || ended(launcher));
    ns.finish();
}

#[test]
#[ignore = "needs root: the real helper and its jail launcher in a network namespace"]
fn a_helper_whose_launcher_is_gone_refuses_launches_and_serves_on() {
    if !root_or_skip("a_helper_whose_launcher_is_gone_refuses_launches_and_serves_on") {
        return;
    }
    let ns = Netns::new("nolauncher");
    let base = temp_dir();
    let h = Helper::start_with_cgroups(&ns, &jailer_policy(base.path()));
    let launcher = children(h.pid())[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(launcher as i32), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    wait_until("the launcher is gone", || ended(launcher));
    // A launch now fails with an error that says what to do; the helper serves on.
    let files = temp_dir();
    let (kernel, rootfs) = (files.path().join("vmlinux"), files.path().join("rootfs"));
    std::fs::write(&kernel, b"k").unwrap();
    std::fs::write(&rootfs, b"r").unwrap();
    std::os::unix::fs::chown(&rootfs, Some(61051), Some(61051)).unwrap();
    let socket = h.socket.clone();
    let answers = as_uid(61051, move || {
        let (c, hello) = match Client::connect(&socket, "c") {
            Ok(c) => c,
            Err(e) => return vec![client_error(e)],
        };
        let opened =
            (std::fs::File::open(&kernel), std::fs::OpenOptions::new().read(true).write(true).open(&rootfs));
        let (Ok(k), Ok(r)) = opened else { return vec![client_error("cannot open the files".into())] };
        let launch = Request::JailLaunch {
            vm: vm("v1"),
            shape: banger_protocol::VmShape { vcpus: 1, mem_mib: 128 },
            files: banger_protocol::JailFiles { initrd: false, work: false },
        };
        use std::os::fd::AsFd;
        vec![hello, c.call_fds(launch, &[k.as_fd(), r.as_fd()]), c.call(Request::Ping)]
    });
    assert!(matches!(&answers[0], Response::Hello(_)), "{answers:?}");
    let refused = format!("{:?}", answers[1]);
    assert!(
        refused.contains("jail launcher is not running") && refused.contains("restart banger-helper"),
        "{refused}"
    );
    assert!(matches!(answers[2], Response::Pong), "the helper serves on: {answers:?}");
    assert!(h.log_text().contains("the jail launcher (PID"), "the helper says why in its log");
    drop(h);
    ns.finish();
}

/// A whole launch and removal through the forked, confined launcher, with the jailer double
/// jailing the static Firecracker double (no TAP: nothing here touches the network): the
/// launcher's capabilities, no-new-privileges flag and filters let the jail functions and the
/// jailer do all of it, and the VMM runs as the jail uid.
#[test]
#[ignore = "needs root: a jail built by the real launcher, v1 cgroups"]
fn a_jail_launched_through_the_launcher_runs_as_its_uid_and_goes_without_a_trace() {
    use std::os::unix::fs::PermissionsExt;

    use banger_helper::jail::cgroup::v1_mount;
    use banger_helper::kernel::linux::LinuxJails;
    use banger_helper::kernel::{JailOrder, Jails, UserLimits};
    use banger_policy::{CgroupVersion, Jailer, JailerMode};
    use banger_protocol::{JailFiles, VmShape};

    if !root_or_skip("a_jail_launched_through_the_launcher_runs_as_its_uid_and_goes_without_a_trace") {
        return;
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let (Some(cpu), Some(memory)) = (v1_mount(&mounts, "cpu"), v1_mount(&mounts, "memory")) else {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "no v1 cpu and memory cgroups, and CI=true");
        eprintln!("SKIPPED: this machine has no v1 cpu and memory cgroup hierarchies");
        return;
    };
    const CALLER: u32 = 62_401;
    const JAIL_UID: u32 = 64_801;
    let dir = temp_dir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::copy(build("jailer-double", false), bin.join("jailer")).unwrap();
    std::fs::copy(build("firecracker-double", true), bin.join("firecracker")).unwrap();
    let base = dir.path().join("base");
    std::fs::create_dir(&base).unwrap();
    let parent = format!("banger-lt-{}", std::process::id());
    let policy = Jailer {
        jailer: bin.join("jailer"),
        firecracker: bin.join("firecracker"),
        chroot_base: base,
        uids: (64_800, 64_899),
        cgroup: CgroupVersion::V1,
        cgroup_parent: parent.clone(),
        mode: JailerMode::Allow,
    };
    let caller_file = |name: &str, mode: u32| {
        let p = dir.path().join(name);
        std::fs::write(&p, vec![0u8; 1 << 16]).unwrap();
        std::os::unix::fs::chown(&p, Some(CALLER), Some(CALLER)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    };
    let kernel = std::fs::File::open(caller_file("vmlinux", 0o644)).unwrap();
    let drive =
        std::fs::OpenOptions::new().read(true).write(true).open(caller_file("rootfs.ext4", 0o600)).unwrap();

    let launcher = banger_helper::launcher::start(&policy, &[]).unwrap();
    let launcher_pid = launcher.pid;
    let jails = LinuxJails::new(launcher);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let id = format!("bg-lt-{}", std::process::id());
    let order = JailOrder {
        id: id.clone(),
        uid: JAIL_UID,
        caller: CALLER,
        shape: VmShape { vcpus: 1, mem_mib: 128 },
        user_cgroup: format!("{parent}/u{CALLER}"),
        user_limits: UserLimits { vcpus: 2, mem_mib: 512 },
        tap: None,
        files: JailFiles { initrd: false, work: false },
    };
    let launched = rt.block_on(jails.launch(&order, vec![kernel.into(), drive.into()]));
    let root = std::path::PathBuf::from(jails.root(&id));
    let checked = launched.as_ref().map(|pid| {
        let s = status(*pid as u32);
        (field(&s, "Uid:"), root.join("run/firecracker.socket").exists())
    });
    let removed = launched.as_ref().ok().map(|pid| rt.block_on(jails.remove(&id, JAIL_UID, Some(*pid))));
    for hierarchy in [&cpu, &memory] {
        let _ = std::fs::remove_dir(hierarchy.join(&parent));
    }
    let pid = *launched.as_ref().expect("the launch through the launcher");
    let uid = JAIL_UID.to_string();
    assert_eq!(
        checked.unwrap(),
        (format!("{uid}\t{uid}\t{uid}\t{uid}"), true),
        "the VMM as the jail uid, its socket"
    );
    assert_eq!(removed, Some(Ok(())));
    assert!(!root.exists(), "{} is left", root.display());
    assert!(ended(pid as u32), "the VMM is gone");
    for hierarchy in [&cpu, &memory] {
        assert!(!hierarchy.join(&parent).exists(), "the cgroups are gone");
    }
    drop(jails);
    wait_until("the launcher ends with its channel", || ended(launcher_pid.as_raw() as u32));
    let _ = nix::sys::wait::waitpid(launcher_pid, None);
}
