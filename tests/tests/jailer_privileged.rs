//! `jailer-double` as root, jailing the statically linked Firecracker double, checked against
//! what the real jailer 1.16.1 does on this kind of machine: the jail's layout, modes, owners
//! and device nodes, the PID file, cgroups v1 (the real hierarchies) and v2 (the real unified
//! hierarchy with a controller it offers, and a fake tree behind a private `/proc/mounts`), the
//! VMM's credentials, environment, descriptors, session and namespaces, the API socket in the
//! jail, `--netns`, a second jailer for a running id, a dynamically linked exec file, and that
//! nothing is cleaned after the VMM dies. Each test works in its own temporary directories and
//! network namespace, and removes the jail, cgroups, TAPs and namespace it made.

use std::fs;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};

use banger_tests::double::harness::api_call;
use banger_tests::double::write_test_kernel;
use banger_tests::e2e::netns::Netns;
use banger_tests::jailer::config::userfaultfd_minor;
use banger_tests::jailer::harness::{
    CgroupDirs, Jail, JailedVmm, ProcView, exec_file_named_firecracker, inherit_fd, jailer_command,
    mode_owner, static_firecracker_double, v1_mount, v2_mount,
};

const JAILER: &str = env!("CARGO_BIN_EXE_jailer-double");
const DYNAMIC_DOUBLE: &str = env!("CARGO_BIN_EXE_firecracker-double");
const READY: Duration = Duration::from_secs(15);

/// True when this test may run; fails under CI=true when it cannot, skips visibly otherwise.
fn privileged_or_skip() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let why = "needs root: builds jails (mknod, chown, pivot_root), cgroups, network namespaces";
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}, and CI=true");
    eprintln!("SKIPPED: {why}");
    false
}

/// Skips (or fails under CI=true) when a precondition of the machine is missing.
fn machine_has(what: &str, ok: bool) -> bool {
    if !ok {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "this machine lacks {what}, and CI=true");
        eprintln!("SKIPPED: this machine lacks {what}");
    }
    ok
}

/// A test's directory: the static double as `firecracker`, a chroot base, files for the VM.
struct Setup {
    dir: tempfile::TempDir,
    exec: PathBuf,
    base: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let fc = static_firecracker_double().unwrap_or_else(|e| panic!("{e}"));
        Setup::with_exec(&fc)
    }

    fn with_exec(bin: &Path) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let exec = exec_file_named_firecracker(bin, dir.path()).unwrap();
        let base = dir.path().join("base");
        fs::create_dir(&base).unwrap();
        Setup { dir, exec, base }
    }

    fn jail(&self, id: &str) -> Jail {
        Jail::new(&self.base, "firecracker", id)
    }

    /// `--id ID --exec-file .. --uid U --gid G --chroot-base-dir ..` then `extra`.
    fn args(&self, id: &str, uid: u32, gid: u32, extra: &[&str]) -> Vec<String> {
        let mut words: Vec<String> = vec![
            "--id".into(),
            id.into(),
            "--exec-file".into(),
            self.exec.display().to_string(),
            "--uid".into(),
            uid.to_string(),
            "--gid".into(),
            gid.to_string(),
            "--chroot-base-dir".into(),
            self.base.display().to_string(),
        ];
        words.extend(extra.iter().map(|w| w.to_string()));
        words
    }
}

/// Restores a controller's absence from the unified root's `cgroup.subtree_control`.
struct SubtreeControl {
    file: PathBuf,
    controller: String,
    was_enabled: bool,
}

impl SubtreeControl {
    fn remember(unified: &Path, controller: &str) -> SubtreeControl {
        let file = unified.join("cgroup.subtree_control");
        let was_enabled = fs::read_to_string(&file).unwrap().split_whitespace().any(|c| c == controller);
        SubtreeControl { file, controller: controller.to_string(), was_enabled }
    }
}

impl Drop for SubtreeControl {
    fn drop(&mut self) {
        if !self.was_enabled
            && let Err(e) = fs::write(&self.file, format!("-{}", self.controller))
        {
            eprintln!("cannot disable {} in {}: {e}", self.controller, self.file.display());
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[track_caller]
fn assert_silent_success(out: &Output) {
    assert_eq!(
        (out.status.code(), text(&out.stdout), text(&out.stderr)),
        (Some(0), String::new(), String::new()),
        "the daemonized jailer exits 0 silently"
    );
}

#[track_caller]
fn assert_refused(out: &Output, message: &str, debug: &str) {
    assert_eq!(
        (out.status.code(), text(&out.stdout), text(&out.stderr)),
        (Some(1), String::new(), format!("{message}\nError: {debug}\n"))
    );
}

/// Every path under `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if p.is_dir() && !p.is_symlink() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[track_caller]
fn assert_node(jail: &Jail, inside: &str, major: u64, minor: u64, uid: u32, gid: u32) {
    let path = jail.host_path(inside);
    let m = fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(m.file_type().is_char_device(), "{inside} is a character device");
    let rdev = m.rdev();
    assert_eq!((nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev)), (major, minor), "{inside}");
    assert_eq!(mode_owner(&path).unwrap(), (0o600, uid, gid), "{inside}");
}

/// The jail a launch leaves: modes and owners as FIRECRACKER.md records them.
#[track_caller]
fn assert_layout(s: &Setup, jail: &Jail, uid: u32, gid: u32) {
    assert_eq!(mode_owner(&jail.base.join("firecracker")).unwrap(), (0o755, 0, 0));
    assert_eq!(mode_owner(&jail.dir()).unwrap(), (0o755, 0, 0));
    assert_eq!(mode_owner(&jail.root()).unwrap(), (0o700, uid, gid));
    let copy = jail.host_path("/firecracker");
    assert_eq!(mode_owner(&copy).unwrap(), (0o755, uid, gid));
    assert_eq!(fs::read(&copy).unwrap(), fs::read(&s.exec).unwrap(), "a byte copy of the exec file");
    assert_eq!(fs::metadata(&copy).unwrap().nlink(), 1, "a copy, not a link");
    assert_eq!(mode_owner(&jail.pid_file()).unwrap(), (0o644, 0, 0));
    for d in ["/dev", "/dev/net", "/run"] {
        assert_eq!(mode_owner(&jail.host_path(d)).unwrap(), (0o700, uid, gid), "{d}");
    }
    assert_node(jail, "/dev/kvm", 10, 232, uid, gid);
    assert_node(jail, "/dev/net/tun", 10, 200, uid, gid);
    assert_node(jail, "/dev/urandom", 1, 9, uid, gid);
    let mut expected = vec![
        "dev",
        "dev/kvm",
        "dev/net",
        "dev/net/tun",
        "dev/urandom",
        "firecracker",
        "firecracker.pid",
        "run",
        "run/firecracker.socket",
    ];
    if let Some(minor) = userfaultfd_minor(Path::new("/proc/misc")) {
        assert_node(jail, "/dev/userfaultfd", 10, u64::from(minor), uid, gid);
        expected.push("dev/userfaultfd");
        expected.sort();
    }
    assert_eq!(tree(&jail.root()), expected);
    let socket = fs::symlink_metadata(jail.socket()).unwrap();
    assert!(socket.file_type().is_socket());
    assert_eq!(mode_owner(&jail.socket()).unwrap(), (0o755, uid, gid), "the API socket, made by the VMM");
}

/// What a jailed VMM is: uid:gid everywhere, no groups, no environment, only its own
/// descriptors, the open-files limit (2048 unless `--resource-limit no-file=N`).
#[track_caller]
fn assert_jailed_process(view: &ProcView, uid: u32, gid: u32, no_file: u64) {
    assert_eq!(view.uids, [uid; 4]);
    assert_eq!(view.gids, [gid; 4]);
    assert_eq!(view.groups, Vec::<u32>::new(), "no supplementary groups");
    assert!(view.environ.is_empty(), "an empty environment: {:?}", text(&view.environ));
    assert_eq!(view.max_open_files, (no_file.to_string(), no_file.to_string()));
    for (fd, target) in &view.fds {
        assert!(
            *fd < 3 || target.starts_with("socket:") || target.starts_with("anon_inode:"),
            "fd {fd} -> {target}: only the VMM's own descriptors"
        );
    }
}

fn kernel_and_drive(s: &Setup, jail: &Jail, uid: u32, gid: u32) {
    let kernel = s.dir.path().join("vmlinux");
    write_test_kernel(&kernel).unwrap();
    let drive = s.dir.path().join("rootfs.ext4");
    fs::write(&drive, vec![0u8; 1 << 20]).unwrap();
    std::os::unix::fs::chown(&drive, Some(uid), Some(gid)).unwrap();
    fs::hard_link(&kernel, jail.host_path("/vmlinux")).unwrap();
    fs::hard_link(&drive, jail.host_path("/rootfs.ext4")).unwrap();
}

#[track_caller]
fn put(socket: &Path, path: &str, body: &str) -> (u16, String) {
    api_call(socket, "PUT", path, Some(body)).unwrap_or_else(|e| panic!("PUT {path}: {e}"))
}

#[test]
#[ignore = "needs root: builds a jail (mknod, chown, pivot_root) and v1 cgroups"]
fn jailer_daemonized_launch_in_a_new_pid_ns_with_v1_cgroups() {
    if !privileged_or_skip() {
        return;
    }
    let (Some(cpu), Some(memory)) = (v1_mount("cpu"), v1_mount("memory")) else {
        machine_has("v1 cpu and memory cgroup hierarchies", false);
        return;
    };
    let s = Setup::new();
    let (uid, gid) = (64_101, 64_102);
    let id = format!("jt-launch-{}", std::process::id());
    let jail = s.jail(&id);
    let mut cgroups = CgroupDirs::default();
    cgroups.expect(&cpu, &cpu.join("firecracker").join(&id));
    cgroups.expect(&memory, &memory.join("firecracker").join(&id));
    let args = s.args(
        &id,
        uid,
        gid,
        &[
            "--daemonize",
            "--new-pid-ns",
            "--cgroup-version",
            "1",
            "--cgroup",
            "cpu.cfs_quota_us=50000",
            "--cgroup",
            "memory.limit_in_bytes=134217728",
            "--",
            "--api-sock",
            "/run/firecracker.socket",
        ],
    );
    // An inherited descriptor and variable, both of which must not reach the VMM.
    let leaked: OwnedFd = fs::File::open(&s.exec).unwrap().into();
    let mut cmd = jailer_command(Path::new(JAILER), &args);
    cmd.env("BANGER_JAILER_TEST_VAR", "must-not-pass");
    inherit_fd(&mut cmd, &leaked, 42);
    let out = cmd.output().unwrap();
    drop(leaked);
    assert_silent_success(&out);
    let pid = jail.wait_ready(READY).expect("the VMM wrote no PID file or socket");
    let vmm = JailedVmm::new(pid);

    assert_layout(&s, &jail, uid, gid);
    assert_eq!(fs::read_to_string(jail.pid_file()).unwrap(), pid.to_string(), "the host PID, no newline");
    let view = ProcView::read(pid).unwrap();
    assert_jailed_process(&view, uid, gid, 2048);
    assert_eq!(view.ns_pids, [pid, 1], "PID 1 of its own PID namespace");
    assert_ne!(view.session, pid, "not a session leader");
    assert_ne!(view.pgrp, pid, "not a group leader");
    for fd in 0..3 {
        assert_eq!(view.fds[fd].1, "/dev/null", "fd {fd}");
    }
    assert!(!view.fds.iter().any(|(fd, _)| *fd == 42), "the inherited descriptor was closed");
    let cmdline = text(&fs::read(format!("/proc/{pid}/cmdline")).unwrap()).replace('\0', " ");
    assert!(cmdline.starts_with(&format!("/firecracker --id {id} --start-time-us ")), "{cmdline}");
    assert!(
        cmdline.contains(" --start-time-cpu-us ") && cmdline.contains(" --parent-cpu-time-us "),
        "{cmdline}"
    );
    assert!(cmdline.ends_with(" --api-sock /run/firecracker.socket "), "{cmdline}");

    for (hierarchy, name, file, value) in [
        (&cpu, "cpu", "cpu.cfs_quota_us", "50000"),
        (&memory, "memory", "memory.limit_in_bytes", "134217728"),
    ] {
        let group = hierarchy.join("firecracker").join(&id);
        assert_eq!(fs::read_to_string(group.join(file)).unwrap(), format!("{value}\n"));
        let procs = fs::read_to_string(group.join("cgroup.procs")).unwrap();
        assert!(procs.lines().any(|p| p == pid.to_string()), "{name}: {procs}");
        assert!(
            view.cgroups.iter().any(|l| l.ends_with(&format!(":{name}:/firecracker/{id}"))),
            "{:?}",
            view.cgroups
        );
    }

    // The API answers on the jail's socket; paths in requests are the jail's.
    let socket = jail.socket();
    let (status, body) = api_call(&socket, "GET", "/", None).unwrap();
    assert_eq!(status, 200, "{body}");
    let state: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((state["id"].as_str(), state["state"].as_str()), (Some(id.as_str()), Some("Not started")));
    kernel_and_drive(&s, &jail, uid, gid);
    let host_drive = s.dir.path().join("rootfs.ext4");
    let (status, body) = put(
        &socket,
        "/drives/rootfs",
        &format!(
            r#"{{"drive_id":"rootfs","path_on_host":"{}","is_root_device":true}}"#,
            host_drive.display()
        ),
    );
    assert_eq!(status, 400, "a host path does not exist inside the jail");
    assert!(body.contains("No such file or directory"), "{body}");
    for (path, body) in [
        ("/machine-config", r#"{"vcpu_count":1,"mem_size_mib":128}"#),
        ("/boot-source", r#"{"kernel_image_path":"/vmlinux","boot_args":"console=ttyS0 reboot=k panic=1"}"#),
        ("/drives/rootfs", r#"{"drive_id":"rootfs","path_on_host":"/rootfs.ext4","is_root_device":true}"#),
    ] {
        assert_eq!(put(&socket, path, body), (204, String::new()), "PUT {path}");
    }

    // After kill -9, nothing is cleaned: the jail (socket and PID file too) and the cgroups stay.
    let before = tree(&jail.root());
    assert!(vmm.kill(), "the VMM did not die");
    assert_eq!(tree(&jail.root()), before);
    assert!(cpu.join("firecracker").join(&id).is_dir() && memory.join("firecracker").join(&id).is_dir());

    // The same jail again, its VMM dead: the copy succeeds, the device nodes exist.
    let again = jailer_command(Path::new(JAILER), &args).output().unwrap();
    assert_refused(
        &again,
        "Failed to create /dev/net/tun via mknod inside the jail: File exists (os error 17)",
        "MknodDev(Os { code: 17, kind: AlreadyExists, message: \"File exists\" }, \"/dev/net/tun\")",
    );
    let failures = cgroups.remove();
    assert!(failures.is_empty(), "{failures:?}");
}

#[test]
#[ignore = "needs root: builds a jail, a network namespace and TAPs"]
fn jailer_joins_the_netns_and_refuses_a_running_id() {
    if !privileged_or_skip() {
        return;
    }
    let s = Setup::new();
    let (uid, gid) = (64_201, 64_202);
    let pid_tag = std::process::id();
    let id = format!("jt-netns-{pid_tag}");
    let jail = s.jail(&id);
    let netns = Netns::create(&format!("jt-netns-{pid_tag}")).unwrap();
    let (tap, foreign_tap) = (format!("jtap{}", pid_tag % 100_000), format!("jtaq{}", pid_tag % 100_000));
    netns.ip(&["tuntap", "add", "dev", &tap, "mode", "tap", "user", &uid.to_string(), "vnet_hdr"]).unwrap();
    netns.ip(&["tuntap", "add", "dev", &foreign_tap, "mode", "tap", "user", "0", "vnet_hdr"]).unwrap();
    let ns_path = format!("/run/netns/{}", netns.name);

    let args = s.args(
        &id,
        uid,
        gid,
        &[
            "--netns",
            &ns_path,
            "--daemonize",
            "--resource-limit",
            "no-file=1024",
            "--resource-limit",
            "fsize=1073741824",
            "--",
            "--api-sock",
            "/run/firecracker.socket",
        ],
    );
    let out = jailer_command(Path::new(JAILER), &args).output().unwrap();
    assert_silent_success(&out);
    let pid = jail.wait_ready(READY).expect("the VMM wrote no PID file or socket");
    let vmm = JailedVmm::new(pid);
    assert_layout(&s, &jail, uid, gid);
    assert_eq!(fs::read_to_string(jail.pid_file()).unwrap(), pid.to_string());
    let view = ProcView::read(pid).unwrap();
    assert_jailed_process(&view, uid, gid, 1024);
    assert_eq!(view.max_file_size, ("1073741824".to_string(), "1073741824".to_string()));
    assert_eq!(view.ns_pids, [pid], "no --new-pid-ns: the host's PID namespace");
    assert_eq!(view.netns, format!("net:[{}]", fs::metadata(&ns_path).unwrap().ino()));
    let me = ProcView::read(std::process::id()).unwrap();
    assert_eq!(view.cgroups, me.cgroups, "without --cgroup, cgroups are not touched");

    // The TAP is opened through the jail's /dev/net/tun, as the jail's user.
    let socket = jail.socket();
    let nic = |name: &str| format!(r#"{{"iface_id":"eth0","host_dev_name":"{name}"}}"#);
    let (status, body) = put(&socket, "/network-interfaces/eth0", &nic(&foreign_tap));
    assert_eq!(status, 400);
    assert!(
        body.contains(&format!(
            "Operation not permitted (os error 1). Invalid TUN/TAP Backend provided by {foreign_tap}"
        )),
        "{body}"
    );
    assert_eq!(put(&socket, "/network-interfaces/eth0", &nic(&tap)), (204, String::new()));

    // A second jailer for the same id while the VMM runs.
    let before = tree(&jail.root());
    let again = jailer_command(Path::new(JAILER), &args).output().unwrap();
    let copy = jail.host_path("/firecracker");
    assert_refused(
        &again,
        &format!("Failed to open {}: Text file busy (os error 26)", copy.display()),
        &format!("Open({copy:?}, Os {{ code: 26, kind: ExecutableFileBusy, message: \"Text file busy\" }})"),
    );
    assert_eq!(tree(&jail.root()), before);
    assert!(ProcView::read(pid).is_ok(), "the running VMM is untouched");

    drop(vmm);
    netns.ip(&["link", "del", &tap]).unwrap();
    netns.ip(&["link", "del", &foreign_tap]).unwrap();
}

#[test]
#[ignore = "needs root: builds a jail"]
fn jailer_without_daemonize_execs_in_place_and_a_dynamic_exec_file_fails_after_the_jail() {
    if !privileged_or_skip() {
        return;
    }
    // In place: the PID file holds the jailer's own PID, the VMM keeps the caller's stdio.
    let s = Setup::new();
    let (uid, gid) = (64_301, 64_302);
    let id = format!("jt-inplace-{}", std::process::id());
    let jail = s.jail(&id);
    let console = s.dir.path().join("console.log");
    let log = fs::File::create(&console).unwrap();
    let mut child = jailer_command(
        Path::new(JAILER),
        &s.args(&id, uid, gid, &["--", "--api-sock", "/run/firecracker.socket"]),
    )
    .stdin(Stdio::null())
    .stdout(log.try_clone().unwrap())
    .stderr(log)
    .spawn()
    .unwrap();
    let pid = jail.wait_ready(READY).expect("the VMM wrote no PID file or socket");
    let vmm = JailedVmm::new(pid);
    assert_eq!(pid, child.id(), "the jailer became the VMM");
    let view = ProcView::read(pid).unwrap();
    assert_jailed_process(&view, uid, gid, 2048);
    assert_eq!(view.fds[1].1, console.display().to_string(), "the caller's stdout");
    assert_layout(&s, &jail, uid, gid);
    assert!(vmm.kill());
    child.wait().unwrap();

    // A dynamically linked exec file: a whole jail, then exec fails for want of its loader.
    let s = Setup::with_exec(Path::new(DYNAMIC_DOUBLE));
    let id = format!("jt-dynamic-{}", std::process::id());
    let jail = s.jail(&id);
    let child = jailer_command(Path::new(JAILER), &s.args(&id, uid, gid, &[]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let jailer_pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert_refused(
        &out,
        "Failed to exec into Firecracker: No such file or directory (os error 2)",
        "Exec(Os { code: 2, kind: NotFound, message: \"No such file or directory\" })",
    );
    assert_eq!(
        fs::read_to_string(jail.pid_file()).unwrap(),
        jailer_pid.to_string(),
        "the jail is left behind"
    );
    assert!(jail.host_path("/dev/net/tun").exists() && jail.host_path("/firecracker").exists());
}

#[test]
#[ignore = "needs root: builds a jail, v2 cgroups in the machine's unified hierarchy"]
fn jailer_v2_cgroups_in_the_real_unified_hierarchy() {
    if !privileged_or_skip() {
        return;
    }
    let Some((unified, controllers)) = v2_mount() else {
        machine_has("a cgroup2 mount", false);
        return;
    };
    // A controller the unified hierarchy offers here, with a file its groups have.
    let Some((controller, file, value)) = [("pids", "pids.max", "64"), ("hugetlb", "hugetlb.2MB.max", "0")]
        .into_iter()
        .find(|(c, ..)| controllers.iter().any(|a| a == c))
    else {
        machine_has("a pids or hugetlb controller in cgroup v2", false);
        return;
    };
    let root_control = unified.join("cgroup.subtree_control");
    let enabled_before = fs::read_to_string(&root_control).unwrap();
    let restore = SubtreeControl::remember(&unified, controller);
    let s = Setup::new();
    let (uid, gid) = (64_401, 64_402);
    let tag = std::process::id();
    let (id, parent) = (format!("jt-v2-{tag}"), format!("banger-jt-v2-{tag}"));
    let jail = s.jail(&id);
    let mut cgroups = CgroupDirs::default();
    let group = unified.join(&parent).join(&id);
    cgroups.expect(&unified, &group);
    let setting = format!("{file}={value}");
    let args = s.args(
        &id,
        uid,
        gid,
        &["--daemonize", "--cgroup-version", "2", "--parent-cgroup", &parent, "--cgroup", &setting],
    );
    let out = jailer_command(Path::new(JAILER), &args).output().unwrap();
    assert_silent_success(&out);
    let pid = jail.wait_ready(READY).expect("the VMM wrote no PID file or socket");
    let vmm = JailedVmm::new(pid);
    assert_eq!(fs::read_to_string(group.join(file)).unwrap(), format!("{value}\n"));
    for control in [&root_control, &unified.join(&parent).join("cgroup.subtree_control")] {
        let enabled = fs::read_to_string(control).unwrap();
        assert!(enabled.split_whitespace().any(|c| c == controller), "{}: {enabled}", control.display());
    }
    assert!(fs::read_to_string(group.join("cgroup.procs")).unwrap().lines().any(|p| p == pid.to_string()));
    let view = ProcView::read(pid).unwrap();
    assert!(view.cgroups.contains(&format!("0::/{parent}/{id}")), "{:?}", view.cgroups);
    drop(vmm);

    // Without --cgroup, version 2 moves the jailer into an existing parent cgroup, no child made.
    let move_parent = format!("banger-jt-v2-move-{tag}");
    cgroups.expect(&unified, &unified.join(&move_parent));
    fs::create_dir(unified.join(&move_parent)).unwrap();
    let id2 = format!("jt-v2-move-{tag}");
    let args =
        s.args(&id2, uid, gid, &["--daemonize", "--cgroup-version", "2", "--parent-cgroup", &move_parent]);
    assert_silent_success(&jailer_command(Path::new(JAILER), &args).output().unwrap());
    let pid2 = s.jail(&id2).wait_ready(READY).expect("the second VMM did not start");
    let vmm2 = JailedVmm::new(pid2);
    assert!(ProcView::read(pid2).unwrap().cgroups.contains(&format!("0::/{move_parent}")));
    assert!(!unified.join(&move_parent).join(&id2).exists());
    drop(vmm2);

    let failures = cgroups.remove();
    assert!(failures.is_empty(), "{failures:?}");
    drop(restore);
    assert_eq!(fs::read_to_string(&root_control).unwrap(), enabled_before, "the root's controllers restored");
}

/// Version 2 with cpu and memory, which this machine's unified hierarchy lacks: the jailer
/// reads `/proc/mounts`, so it runs in a private mount namespace whose `/proc` is a tmpfs with a
/// `mounts` file naming a fake cgroup2 tree (plain files in the test's directory).
#[test]
#[ignore = "needs root: a private mount namespace with a fake /proc, builds a jail"]
fn jailer_v2_cgroups_with_cpu_and_memory_in_a_fake_tree() {
    if !privileged_or_skip() {
        return;
    }
    let s = Setup::new();
    let (uid, gid) = (64_501, 64_502);
    let id = format!("jt-v2fake-{}", std::process::id());
    let jail = s.jail(&id);
    let unified = s.dir.path().join("unified");
    fs::create_dir(&unified).unwrap();
    fs::write(unified.join("cgroup.controllers"), "cpuset cpu io memory pids\n").unwrap();
    fs::write(unified.join("cgroup.subtree_control"), "").unwrap();
    fs::create_dir(unified.join("firecracker")).unwrap();
    fs::write(unified.join("firecracker/cgroup.subtree_control"), "").unwrap();
    let fake_proc = s.dir.path().join("proc");
    fs::create_dir(&fake_proc).unwrap();
    fs::write(
        fake_proc.join("mounts"),
        format!("/dev/vda / ext4 rw 0 0\ncgroup2 {} cgroup2 rw,nosuid,nodev,noexec 0 0\n", unified.display()),
    )
    .unwrap();
    let mut args = s.args(
        &id,
        uid,
        gid,
        &[
            "--daemonize",
            "--cgroup-version",
            "2",
            "--cgroup",
            "cpu.max=50000 100000",
            "--cgroup",
            "memory.max=134217728",
        ],
    );
    let script = format!(
        "cp /proc/misc {fake}/misc && mount -t tmpfs tmpfs /proc && cp {fake}/mounts {fake}/misc /proc/ && \
         exec \"$0\" \"$@\"",
        fake = fake_proc.display()
    );
    let mut words = vec![
        "--mount".to_string(),
        "--propagation".into(),
        "private".into(),
        "sh".into(),
        "-c".into(),
        script,
        JAILER.into(),
    ];
    words.append(&mut args);
    let out = jailer_command(Path::new("unshare"), &words).output().unwrap();
    assert_silent_success(&out);
    let pid = jail.wait_ready(READY).expect("the VMM wrote no PID file or socket");
    let _vmm = JailedVmm::new(pid);
    let group = unified.join("firecracker").join(&id);
    assert_eq!(fs::read_to_string(group.join("cpu.max")).unwrap(), "50000 100000\n");
    assert_eq!(fs::read_to_string(group.join("memory.max")).unwrap(), "134217728\n");
    // The jailer's PID before it daemonized: the VMM is its grandchild.
    let procs = fs::read_to_string(group.join("cgroup.procs")).unwrap();
    assert!(procs.ends_with('\n') && procs.trim().parse::<u32>().is_ok(), "{procs:?}");
    // Plain files keep only the last write: memory, enabled after cpu, from the top down.
    for control in
        [unified.join("cgroup.subtree_control"), unified.join("firecracker/cgroup.subtree_control")]
    {
        assert_eq!(fs::read_to_string(&control).unwrap(), "+memory\n", "{}", control.display());
    }
    assert!(!group.join("cgroup.subtree_control").exists());
    assert_layout(&s, &jail, uid, gid);
}

/// Whether the guest's kernel answers a TCP connection to `addr` from inside `netns`, trying
/// once a second for `attempts` seconds. A refusal counts: nothing listens in a jailed guest,
/// but its kernel answers the SYN (after answering ARP) through the VMM's frame relay.
fn guest_answers(netns: &Netns, addr: SocketAddr, attempts: u32) -> bool {
    let ns = netns.file().unwrap();
    std::thread::spawn(move || {
        setns(&ns, CloneFlags::CLONE_NEWNET).unwrap();
        (0..attempts).any(|_| {
            let started = Instant::now();
            match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(_) => true,
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => true,
                Err(_) => {
                    std::thread::sleep(Duration::from_secs(1).saturating_sub(started.elapsed()));
                    false
                }
            }
        })
    })
    .join()
    .unwrap()
}

/// The Firecracker double in a jail (as the jail's user, in the jail's root, with only its
/// device nodes) boots a guest whose network is emulated as outside a jail: the guest's kernel
/// answers ARP and TCP over the TAP the VMM opened through the jail's `/dev/net/tun`. The console says what is
/// not emulated (no debugfs, no dropbear, no uid mapping); pause, resume and Ctrl+Alt+Del behave
/// as in direct mode.
#[test]
#[ignore = "needs root: builds a jail, a network namespace and a TAP"]
fn jailer_jailed_double_boots_a_guest_with_a_working_network() {
    if !privileged_or_skip() {
        return;
    }
    let s = Setup::new();
    let (uid, gid) = (64_601, 64_602);
    let tag = std::process::id();
    let n = tag % 250 + 1;
    let id = format!("jt-guest-{tag}");
    let jail = s.jail(&id);
    let netns = Netns::create(&format!("jt-guest-{tag}")).unwrap();
    let tap = format!("jtg{}", tag % 100_000);
    let (host_ip, guest_ip) = (format!("172.29.{n}.1"), format!("172.29.{n}.2"));
    netns.ip(&["tuntap", "add", "dev", &tap, "mode", "tap", "user", &uid.to_string(), "vnet_hdr"]).unwrap();
    netns.ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &tap]).unwrap();
    netns.ip(&["link", "set", &tap, "up"]).unwrap();
    let ns_path = format!("/run/netns/{}", netns.name);

    // Not daemonized, so the serial console (the VMM's stdout) goes to a file.
    let console = s.dir.path().join("console.log");
    let log = fs::File::create(&console).unwrap();
    let args = s.args(
        &id,
        uid,
        gid,
        &["--netns", &ns_path, "--new-pid-ns", "--", "--api-sock", "/run/firecracker.socket"],
    );
    let status = jailer_command(Path::new(JAILER), &args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(0), "the jailer exits 0 once the VMM is cloned");
    let pid = jail.wait_ready(READY).expect("the VMM wrote no PID file or socket");
    let vmm = JailedVmm::new(pid);
    let read_console = || fs::read_to_string(&console).unwrap_or_default();

    kernel_and_drive(&s, &jail, uid, gid);
    let socket = jail.socket();
    let boot_args = format!(
        "console=ttyS0 reboot=k panic=1 ip={guest_ip}::{host_ip}:255.255.255.252:jailed-guest:eth0:off"
    );
    for (path, body) in [
        ("/machine-config", r#"{"vcpu_count":1,"mem_size_mib":128}"#.to_string()),
        ("/boot-source", format!(r#"{{"kernel_image_path":"/vmlinux","boot_args":"{boot_args}"}}"#)),
        (
            "/drives/rootfs",
            r#"{"drive_id":"rootfs","path_on_host":"/rootfs.ext4","is_root_device":true}"#.to_string(),
        ),
        (
            "/network-interfaces/eth0",
            format!(r#"{{"iface_id":"eth0","host_dev_name":"{tap}","guest_mac":"06:00:ac:1d:{n:02x}:02"}}"#),
        ),
        ("/actions", r#"{"action_type":"InstanceStart"}"#.to_string()),
    ] {
        assert_eq!(put(&socket, path, &body), (204, String::new()), "PUT {path}\n{}", read_console());
    }
    let state = |socket: &Path| {
        let (status, body) = api_call(socket, "GET", "/", None).unwrap();
        assert_eq!(status, 200);
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(state(&socket), "Running");

    let guest: SocketAddr = format!("{guest_ip}:22").parse().unwrap();
    assert!(guest_answers(&netns, guest, 15), "the jailed guest does not answer\n{}", read_console());
    // The guest prints its login prompt last.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !read_console().contains("jailed-guest login:") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = read_console();
    for line in [
        "firecracker-double: the VMM runs in a jail (no /proc): only the guest's network",
        "firecracker-double: no debugfs in the VMM's jail: the root drive's /etc/hostname",
        "firecracker-double: no dropbear in the VMM's jail: no SSH server is emulated",
        &format!(
            "device=eth0, hwaddr=06:00:ac:1d:{n:02x}:02, ipaddr={guest_ip}, mask=255.255.255.252, gw={host_ip}"
        ),
        "jailed-guest login:",
    ] {
        assert!(text.contains(line), "console lacks {line:?}:\n{text}");
    }

    let patch =
        |state: &str| api_call(&socket, "PATCH", "/vm", Some(&format!(r#"{{"state":"{state}"}}"#))).unwrap();
    assert_eq!(patch("Paused"), (204, String::new()));
    assert_eq!(state(&socket), "Paused");
    assert!(!guest_answers(&netns, guest, 1), "a paused guest does not answer");
    assert_eq!(patch("Resumed"), (204, String::new()));
    assert!(guest_answers(&netns, guest, 5), "the resumed guest answers again");

    assert_eq!(put(&socket, "/actions", r#"{"action_type":"SendCtrlAltDel"}"#), (204, String::new()));
    assert!(vmm.ended(Duration::from_secs(20)), "the VMM ends when its guest reboots\n{}", read_console());
    assert!(read_console().contains("reboot: Restarting system"));
    assert!(socket.exists() && jail.pid_file().exists(), "nothing is cleaned after the VMM ends");
    netns.ip(&["link", "del", &tap]).unwrap();
}
