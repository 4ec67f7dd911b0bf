//! Conformance of the Firecracker test double's API: a transcript of requests with the statuses
//! and bodies Firecracker 1.16 answers, replayed against the `firecracker-double` binary.
//! Needs no root: the double runs as the test's user with a socket in a temporary directory, and
//! its guest (booted near the end, without network interfaces) lives in namespaces of its own.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use banger_tests::double::harness::{DoubleProcess, api_call, descendants, raw_call};
use banger_tests::double::write_test_kernel;

const BIN: &str = env!("CARGO_BIN_EXE_firecracker-double");

/// One exchange of the transcript.
struct Step {
    method: &'static str,
    path: String,
    body: Option<String>,
    status: u16,
    /// Expected body: exact JSON text, or empty for no body.
    expect: String,
}

fn step(method: &'static str, path: &str, body: Option<&str>, status: u16, expect: &str) -> Step {
    Step { method, path: path.into(), body: body.map(Into::into), status, expect: expect.into() }
}

fn fault(msg: &str) -> String {
    serde_json::json!({ "fault_message": msg }).to_string()
}

fn replay(socket: &Path, steps: &[Step]) {
    for (i, s) in steps.iter().enumerate() {
        let (status, body) = api_call(socket, s.method, &s.path, s.body.as_deref())
            .unwrap_or_else(|e| panic!("step {i} {} {}: {e}", s.method, s.path));
        assert_eq!(
            (status, body.as_str()),
            (s.status, s.expect.as_str()),
            "step {i}: {} {} {:?}",
            s.method,
            s.path,
            s.body
        );
    }
}

/// The fault for `PUT /network-interfaces` with a name longer than 15 bytes, which depends on
/// whether this user may open /dev/net/tun (Firecracker opens it before checking the name).
fn long_tap_name_fault() -> String {
    let prefix = "Network config error: Could not create the network device: Open tap device failed: ";
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun") {
        Ok(_) => fault(&format!("{prefix}Invalid interface name")),
        Err(e) => fault(&format!("{prefix}Couldn't open /dev/net/tun: {e}")),
    }
}

struct Files {
    _dir: tempfile::TempDir,
    dir: PathBuf,
}

impl Files {
    fn new() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        Files { _dir: dir, dir: path }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

#[test]
fn double_api_transcript_matches_firecracker() {
    let f = Files::new();
    write_test_kernel(Path::new(&f.path("vmlinux"))).unwrap();
    std::fs::write(f.path("bzImage"), [0x4d_u8; 512]).unwrap();
    std::fs::write(f.path("root.img"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(f.path("data.img"), vec![0u8; 1 << 20]).unwrap();
    let mut double = DoubleProcess::spawn(BIN.as_ref(), &f.dir, "conf-1").unwrap();
    let sock = double.socket().to_path_buf();

    let kernel_ok = format!(
        r#"{{"kernel_image_path":"{}","boot_args":"console=ttyS0 reboot=k panic=1"}}"#,
        f.path("vmlinux")
    );
    let kernel_bad = format!(r#"{{"kernel_image_path":"{}"}}"#, f.path("bzImage"));
    let root_ro = format!(
        r#"{{"drive_id":"rootfs","path_on_host":"{}","is_root_device":true,"is_read_only":true}}"#,
        f.path("root.img")
    );
    let data_as_root =
        format!(r#"{{"drive_id":"data","path_on_host":"{}","is_root_device":true}}"#, f.path("data.img"));
    let data =
        format!(r#"{{"drive_id":"data","path_on_host":"{}","is_root_device":false}}"#, f.path("data.img"));
    let missing = f.path("missing.img");
    let log = f.path("fc.log");
    let metrics = f.path("metrics.json");
    let vsock = f.path("v.sock");

    let mut steps = vec![
        step(
            "GET",
            "/",
            None,
            200,
            r#"{"id":"conf-1","state":"Not started","vmm_version":"1.16.1","app_name":"Firecracker"}"#,
        ),
        step("GET", "/version", None, 200, r#"{"firecracker_version":"1.16.1"}"#),
        step(
            "GET",
            "/machine-config",
            None,
            200,
            r#"{"vcpu_count":1,"mem_size_mib":128,"smt":false,"track_dirty_pages":false,"huge_pages":"None"}"#,
        ),
        step(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":0,"mem_size_mib":128}"#),
            400,
            &fault(
                "Machine config error: The number of vCPUs must be greater than 0, less than 32 and must be 1 or an even number if SMT is enabled.",
            ),
        ),
        step(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":2,"mem_size_mib":256,"foo":1}"#),
            400,
            &fault(
                "An error occurred when deserializing the json body of a request: unknown field `foo`, expected one of `vcpu_count`, `mem_size_mib`, `smt`, `cpu_template`, `track_dirty_pages`, `huge_pages` at line 1 column 40.",
            ),
        ),
        step(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":2}"#),
            400,
            &fault(
                "An error occurred when deserializing the json body of a request: missing field `mem_size_mib` at line 1 column 16.",
            ),
        ),
        step("PUT", "/machine-config", Some(r#"{"vcpu_count":2,"mem_size_mib":256}"#), 204, ""),
        step(
            "GET",
            "/machine-config",
            None,
            200,
            r#"{"vcpu_count":2,"mem_size_mib":256,"smt":false,"track_dirty_pages":false,"huge_pages":"None"}"#,
        ),
        step("PATCH", "/machine-config", Some("{}"), 400, &fault("Empty PATCH request.")),
        step(
            "PUT",
            "/boot-source",
            Some(r#"{"kernel_image_path":"/nonexistent/vmlinux"}"#),
            400,
            &fault(
                "Boot source error: The kernel file cannot be opened: No such file or directory (os error 2)",
            ),
        ),
        step(
            "PUT",
            "/boot-source",
            Some(r#"{"kernel_image_path":"#),
            400,
            &fault(
                "An error occurred when deserializing the json body of a request: EOF while parsing a value at line 1 column 21.",
            ),
        ),
        step("PUT", "/boot-source", None, 400, &fault("Empty PUT request.")),
        step(
            "PUT",
            "/actions",
            Some(r#"{"action_type":"InstanceStart"}"#),
            400,
            &fault("Start microvm error: Cannot start microvm without kernel configuration."),
        ),
        step(
            "PATCH",
            "/vm",
            Some(r#"{"state":"Paused"}"#),
            400,
            &fault("The requested operation is not supported before starting the microVM."),
        ),
        step(
            "PUT",
            "/actions",
            Some(r#"{"action_type":"SendCtrlAltDel"}"#),
            400,
            &fault("The requested operation is not supported before starting the microVM."),
        ),
        step(
            "PUT",
            "/drives/root-fs",
            Some(&root_ro),
            400,
            &fault("API Resource IDs can only contain alphanumeric characters and underscores."),
        ),
        step(
            "PUT",
            "/drives/other",
            Some(&root_ro),
            400,
            &fault("The id from the path does not match the id from the body!"),
        ),
        step(
            "PUT",
            "/drives/rootfs",
            Some(&format!(r#"{{"drive_id":"rootfs","path_on_host":"{missing}","is_root_device":true}}"#)),
            400,
            &fault(&format!(
                "Drive config error: Unable to create the virtio block device: Virtio backend error: Error manipulating the backing file: No such file or directory (os error 2) {missing}"
            )),
        ),
        step("PUT", "/drives/rootfs", Some(&root_ro), 204, ""),
        step(
            "PUT",
            "/drives/data",
            Some(&data_as_root),
            400,
            &fault("Drive config error: A root block device already exists!"),
        ),
        step("PUT", "/drives/data", Some(&data), 204, ""),
        step(
            "PUT",
            "/network-interfaces/eth0",
            Some(r#"{"iface_id":"eth1","host_dev_name":"tap0"}"#),
            400,
            &fault("The id from the path [eth0] does not match the id from the body [eth1]!"),
        ),
        step(
            "PUT",
            "/network-interfaces/eth0",
            Some(r#"{"iface_id":"eth0","host_dev_name":"a-name-far-too-long-for-linux"}"#),
            400,
            &long_tap_name_fault(),
        ),
        step("GET", "/foo", None, 400, &fault("Invalid request method and/or path: GET foo.")),
        step("GET", "/", Some("{}"), 400, &fault("GET request cannot have a body.")),
        step(
            "PUT",
            "/logger",
            Some(&format!(r#"{{"log_path":"{log}","level":"Info","show_level":true}}"#)),
            204,
            "",
        ),
        step("PUT", "/metrics", Some(&format!(r#"{{"metrics_path":"{metrics}"}}"#)), 204, ""),
        step(
            "PUT",
            "/metrics",
            Some(&format!(r#"{{"metrics_path":"{metrics}"}}"#)),
            400,
            &fault(
                "Metrics error: Cannot initialize the metrics system due to bad user input: Reinitialization of metrics not allowed.",
            ),
        ),
        step("PUT", "/vsock", Some(&format!(r#"{{"guest_cid":3,"uds_path":"{vsock}"}}"#)), 204, ""),
        step("PUT", "/boot-source", Some(&kernel_bad), 204, ""),
        step(
            "PUT",
            "/actions",
            Some(r#"{"action_type":"InstanceStart"}"#),
            400,
            &fault(
                "Start microvm error: System configuration error: Cannot load kernel due to invalid memory configuration or invalid kernel image: Kernel Loader: failed to load ELF kernel image: Kernel Loader: Invalid Elf magic number",
            ),
        ),
        step(
            "PUT",
            "/actions",
            Some(r#"{"action_type":"Reboot"}"#),
            400,
            &fault(
                "An error occurred when deserializing the json body of a request: unknown variant `Reboot`, expected one of `FlushMetrics`, `InstanceStart`, `SendCtrlAltDel` at line 1 column 23.",
            ),
        ),
        step("PUT", "/boot-source", Some(&kernel_ok), 204, ""),
        step(
            "PUT",
            "/serial",
            Some(r#"{"serial_out_path":"/s","x":1}"#),
            400,
            &fault(
                "An error occurred when deserializing the json body of a request: unknown field `x`, expected `serial_out_path` or `rate_limiter` at line 1 column 27.",
            ),
        ),
        step("PUT", "/serial", Some(&format!(r#"{{"serial_out_path":"{}"}}"#, f.path("console"))), 204, ""),
        step(
            "PUT",
            "/actions",
            Some(r#"{"action_type":"FlushMetrics"}"#),
            400,
            &fault("The requested operation is not supported before starting the microVM."),
        ),
        step("PUT", "/actions", Some(r#"{"action_type":"InstanceStart"}"#), 204, ""),
        step(
            "GET",
            "/",
            None,
            200,
            r#"{"id":"conf-1","state":"Running","vmm_version":"1.16.1","app_name":"Firecracker"}"#,
        ),
        step(
            "PUT",
            "/actions",
            Some(r#"{"action_type":"InstanceStart"}"#),
            400,
            &fault("The requested operation is not supported after starting the microVM."),
        ),
        step(
            "PUT",
            "/boot-source",
            Some(&kernel_ok),
            400,
            &fault("The requested operation is not supported after starting the microVM."),
        ),
        step(
            "PUT",
            "/serial",
            Some(r#"{"serial_out_path":"/s"}"#),
            400,
            &fault("The requested operation is not supported after starting the microVM."),
        ),
        step(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":1,"mem_size_mib":128}"#),
            400,
            &fault("The requested operation is not supported after starting the microVM."),
        ),
        step("PUT", "/drives/data", Some(&data), 400, &fault("PCI is not enabled")),
        step("PATCH", "/vm", Some(r#"{"state":"Paused"}"#), 204, ""),
        step(
            "GET",
            "/",
            None,
            200,
            r#"{"id":"conf-1","state":"Paused","vmm_version":"1.16.1","app_name":"Firecracker"}"#,
        ),
        step("PATCH", "/vm", Some(r#"{"state":"Resumed"}"#), 204, ""),
        step("PUT", "/actions", Some(r#"{"action_type":"FlushMetrics"}"#), 204, ""),
    ];
    assert!(steps.len() >= 20);
    replay(&sock, &steps);
    steps.clear();

    // micro_http refusals happen before routing, with their own body, and close the connection.
    let post = raw_call(&sock, "POST", "/", None).unwrap();
    assert_eq!(post.status, 400);
    assert_eq!(
        post.body,
        "{ \"error\": \"Invalid HTTP Method: Unsupported HTTP method.\nAll previous unanswered requests will be dropped.\" }"
    );
    let big = vec![b' '; 51201];
    let too_big = raw_call(&sock, "PUT", "/boot-source", Some(&big)).unwrap();
    assert_eq!(too_big.status, 400);
    assert_eq!(
        too_big.body,
        "{ \"error\": \"Request payload with size 51201 is larger than the limit of 51200 allowed by server.\nAll previous unanswered requests will be dropped.\" }"
    );
    let ok = raw_call(&sock, "GET", "/version", None).unwrap();
    assert_eq!(ok.header("server"), Some("Firecracker API"));
    assert_eq!(ok.header("content-type"), Some("application/json"));

    // Hybrid vsock with no guest listener: the connection is closed after CONNECT.
    let mut v = UnixStream::connect(&vsock).unwrap();
    v.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    v.write_all(b"CONNECT 52\n").unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(v.read(&mut buf).unwrap(), 0);

    // Ctrl+Alt+Del reboots the guest, which ends the VMM with status 0; the socket stays.
    let (status, _) =
        api_call(&sock, "PUT", "/actions", Some(r#"{"action_type":"SendCtrlAltDel"}"#)).unwrap();
    assert_eq!(status, 204);
    let exit =
        double.wait_timeout(Duration::from_secs(20)).unwrap().expect("the double exits after Ctrl+Alt+Del");
    assert_eq!(exit.code(), Some(0));
    assert!(sock.exists(), "Firecracker leaves its socket behind");

    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains(":INFO] The API server received a Put request on \"/actions\""), "{log_text}");
    let metrics_text = std::fs::read_to_string(&metrics).unwrap();
    assert!(metrics_text.lines().count() >= 2, "a flush and the final write: {metrics_text}");
    // The guest's console went to the file `PUT /serial` named (made at boot), not to stdout.
    let stdout = std::fs::read_to_string(f.dir.join("console.log")).unwrap();
    assert!(!stdout.contains("Command line:"), "{stdout}");
    let console = std::fs::read_to_string(f.path("console")).unwrap();
    assert!(
        console.contains("Command line: console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda ro"),
        "{console}"
    );
    assert!(console.contains("reboot: Restarting system"), "{console}");
}

#[test]
fn double_refuses_a_socket_in_use_like_firecracker() {
    let f = Files::new();
    let sock = f.dir.join("api.sock");
    std::fs::write(&sock, b"").unwrap();
    let out = Command::new(BIN).arg("--api-sock").arg(&sock).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "Failed to open the API socket at: {}. Check that it is not already used.",
            sock.display()
        )),
        "{stdout}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("FailedToBindSocket"));
}

#[test]
fn double_killed_leaves_socket_and_kills_guest() {
    let f = Files::new();
    write_test_kernel(Path::new(&f.path("vmlinux"))).unwrap();
    let mut double = DoubleProcess::spawn(BIN.as_ref(), &f.dir, "kill-1").unwrap();
    let sock = double.socket().to_path_buf();
    boot(&sock, &f.path("vmlinux"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut children = descendants(double.pid());
    while children.len() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        children = descendants(double.pid());
    }
    assert!(children.len() >= 2, "the guest's kernel process and its PID 1 run: {children:?}");
    let pid = double.pid();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    double.wait_timeout(Duration::from_secs(5)).unwrap().expect("killed");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while children.iter().any(|c| alive(*c)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for c in &children {
        assert!(!alive(*c), "guest process {c} outlived the double");
    }
    assert!(sock.exists());
}

/// Whether `pid` still runs (a zombie waiting for its reaper counts as gone).
/// Sets the boot source to `kernel` and starts the instance, both answered 204.
fn boot(sock: &Path, kernel: &str) {
    let body = format!(r#"{{"kernel_image_path":"{kernel}"}}"#);
    assert_eq!(api_call(sock, "PUT", "/boot-source", Some(&body)).unwrap().0, 204);
    assert_eq!(api_call(sock, "PUT", "/actions", Some(r#"{"action_type":"InstanceStart"}"#)).unwrap().0, 204);
}

fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// A VMM that may not make a user namespace (here a seccomp filter it inherits, as from
/// banger-helper's jail launcher) emulates no guest and says so on the console, while its API
/// and Ctrl+Alt+Del behave as with a guest.
#[test]
fn without_user_namespaces_no_guest_is_emulated_and_the_vmm_runs_on() {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    };
    use std::os::unix::process::CommandExt;

    let newuser = libc::CLONE_NEWUSER as u64;
    let condition =
        SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(newuser), newuser).unwrap();
    let rules = std::collections::BTreeMap::from([(
        libc::SYS_unshare,
        vec![SeccompRule::new(vec![condition]).unwrap()],
    )]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        std::env::consts::ARCH.try_into().unwrap(),
    )
    .unwrap();
    let program: seccompiler::BpfProgram = filter.try_into().unwrap();

    let f = Files::new();
    write_test_kernel(Path::new(&f.path("vmlinux"))).unwrap();
    let sock = f.dir.join("api.sock");
    let console = f.dir.join("console.log");
    let mut cmd = Command::new(BIN);
    cmd.arg("--api-sock").arg(&sock).arg("--id").arg("no-userns");
    // SAFETY: between fork and exec only prctl and seccomp system calls run, on a program built
    // before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            seccompiler::apply_filter(&program).map_err(std::io::Error::other)
        });
    }
    let mut double = DoubleProcess::spawn_command(cmd, &sock, &console).unwrap();
    boot(&sock, &f.path("vmlinux"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut text = String::new();
    while !text.contains("no guest is emulated") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        text = std::fs::read_to_string(&console).unwrap_or_default();
    }
    assert!(
        text.contains("may not make a user namespace") && text.contains("no guest is emulated"),
        "{text}"
    );
    assert!(!text.contains("Kernel panic"), "{text}");
    // The VMM runs on and serves its API; Ctrl+Alt+Del reboots, which ends it.
    std::thread::sleep(Duration::from_millis(300));
    assert!(double.wait_timeout(Duration::from_millis(10)).unwrap().is_none(), "the VMM exited:\n{text}");
    let (status, info) = api_call(&sock, "GET", "/", None).unwrap();
    assert_eq!(status, 200);
    assert!(info.contains("\"Running\""), "{info}");
    assert_eq!(
        api_call(&sock, "PUT", "/actions", Some(r#"{"action_type":"SendCtrlAltDel"}"#)).unwrap().0,
        204
    );
    let ended = double.wait_timeout(Duration::from_secs(10)).unwrap();
    assert!(ended.is_some(), "Ctrl+Alt+Del did not end the VMM");
    assert!(std::fs::read_to_string(&console).unwrap().contains("Received Ctrl+Alt+Del"));
}
