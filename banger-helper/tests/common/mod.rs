//! Shared harness of the privileged integration tests: a network namespace per test, the real
//! helper binary started in it on a temporary socket with a test policy, and clients that run as
//! other uids in forked children (their answers come back over a pipe).
//!
//! Everything a test makes is removed by guards on drop (helper process, namespace, temporary
//! directory), and [`Netns::finish`] proves it: the namespace is gone, the helper process is gone.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use banger_protocol::frame::{recv_blocking, send_blocking, write_frame_blocking};
use banger_protocol::{InstallId, PROTOCOL_VERSION, Request, Response};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid, fork};

/// The helper binary under test.
pub const HELPER: &str = env!("CARGO_BIN_EXE_banger-helper");

/// The gid the test sockets are owned by; test clients carry it as a supplementary group.
pub const SOCKET_GID: u32 = 61000;

/// Whether the test can run: true as root. Not root: under `CI=true` the test fails (privileged
/// tests must run in CI); elsewhere it is reported as skipped with the reason.
pub fn root_or_skip(what: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{what} needs root, and CI=true: the privileged tests must run in CI");
    }
    eprintln!("SKIPPED: {what} needs root (run the test command as root)");
    false
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// A network namespace made for one test, with an uplink (`up0`, a veth whose peer `up1` stays in
/// the namespace) carrying the default route. Deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("bgh-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        for args in [
            "link set lo up",
            "link add up0 type veth peer name up1",
            "link set up0 up",
            "link set up1 up",
            "addr add 10.200.0.1/24 dev up0",
            "route add default via 10.200.0.2 dev up0",
        ] {
            let mut c = Command::new("ip");
            c.args(["-n", &ns.name]).args(args.split(' '));
            run(&mut c);
        }
        ns
    }

    /// Runs a command inside the namespace and returns its output (whatever the status).
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip").args(["netns", "exec", &self.name]).args(args).output().unwrap()
    }

    /// Runs a command inside the namespace, which must succeed, and returns its stdout.
    pub fn sh(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(out.status.success(), "{args:?} in {}: {}", self.name, String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A file's contents as seen inside the namespace (sysfs, procfs), trimmed.
    pub fn read(&self, path: &str) -> Option<String> {
        let out = self.exec(&["cat", path]);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// The TUN/TAP links in the namespace.
    pub fn taps(&self) -> Vec<String> {
        self.sh(&["ls", "/sys/class/net"])
            .split_whitespace()
            .filter(|l| self.read(&format!("/sys/class/net/{l}/tun_flags")).is_some())
            .map(str::to_owned)
            .collect()
    }

    /// Every iptables rule (both tables) that mentions banger, then the lines of the helper's
    /// nftables table (`nft list table ip banger`), if there is one.
    pub fn banger_rules(&self) -> Vec<String> {
        let mut out = Vec::new();
        for table in ["filter", "nat"] {
            out.extend(
                self.sh(&["iptables", "-t", table, "-S"])
                    .lines()
                    .filter(|l| l.contains("BANGER") || l.contains("banger"))
                    .map(str::to_owned),
            );
        }
        out.extend(self.nft_table().lines().map(|l| format!("nft: {}", l.trim())));
        out
    }

    /// `nft list table ip banger` in the namespace; empty when there is no such table.
    pub fn nft_table(&self) -> String {
        let out = self.exec(&["nft", "list", "table", "ip", "banger"]);
        if out.status.success() { String::from_utf8_lossy(&out.stdout).into_owned() } else { String::new() }
    }

    /// Deletes the namespace and proves it is gone.
    pub fn finish(self) {
        let name = self.name.clone();
        drop(self);
        let list =
            String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output().unwrap().stdout)
                .into_owned();
        assert!(!list.split_whitespace().any(|n| n == name), "namespace {name} leaked");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// A shell script that mounts the host's cgroup hierarchies (unnamed v1 ones and the unified one)
/// where the host has them, then execs its arguments.
fn remount_cgroups() -> String {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut script = String::from("set -e\n");
    for line in info.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else { continue };
        let (point, fstype, opts) =
            (fields[4], fields[dash + 1], fields.get(dash + 3).copied().unwrap_or(""));
        match fstype {
            "tmpfs" if point == "/sys/fs/cgroup" => {
                script += "mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup\n"
            }
            "cgroup" if !opts.contains("name=") => {
                script += &format!("mkdir -p {point}\nmount -t cgroup -o {opts} cgroup {point}\n");
            }
            "cgroup2" => script += &format!("mkdir -p {point}\nmount -t cgroup2 cgroup2 {point}\n"),
            _ => {}
        }
    }
    script + "exec \"$@\"\n"
}

/// A test policy: these uids allowed, the socket owned by [`SOCKET_GID`], `extra` TOML appended.
pub fn policy(uids: &[u32], extra: &str) -> String {
    let users: Vec<String> = uids.iter().map(|u| format!("\"{u}\"")).collect();
    format!("[access]\nusers = [{}]\nsocket_group = \"{SOCKET_GID}\"\n\n{extra}\n", users.join(", "))
}

/// A private directory the test uids can traverse (0755), removed on drop.
pub fn temp_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("bgh-test-").tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Whether a test of the kernel tier (device-mapper) can run: true inside the tier's guest
/// (`BANGER_KERNEL_TIER=1`). Outside it: under `CI=true` the test fails (it would otherwise pass
/// without having run); elsewhere it is reported as skipped with the reason.
pub fn in_kernel_tier_or_skip(what: &str) -> bool {
    if std::env::var("BANGER_KERNEL_TIER").as_deref() == Ok("1") {
        return true;
    }
    let why = "needs device-mapper and a real kernel: runs in the kernel tier \
               (tests/run, or `cargo run -p banger-tests --bin kernel-tier -- suite`)";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{what} {why}, and CI=true: not run outside the tier");
    }
    eprintln!("SKIPPED: {what} {why}");
    false
}

/// Where a helper whose state is `state` makes its dm nodes: a directory of its own under `/dev`
/// (device nodes need a filesystem mounted without `nodev`), named after the test's directory.
pub fn node_dir_for(state: &Path) -> PathBuf {
    let tag = state.parent().and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned());
    PathBuf::from("/dev").join(tag.unwrap_or_else(|| format!("bgh-nodes-{}", std::process::id())))
}

/// The real helper, running in a namespace on a temporary socket. Stopped on drop (and its node
/// directory removed, if empty).
pub struct Helper {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
    pub node_dir: PathBuf,
    ns: String,
}

impl Helper {
    /// Starts the helper in `ns` with `policy`, in a new temporary directory.
    pub fn start(ns: &Netns, policy: &str) -> Helper {
        Self::start_in(ns, temp_dir(), policy)
    }

    /// Starts the helper with its socket, state and policy in `dir` (to restart on a kept state).
    pub fn start_in(ns: &Netns, dir: tempfile::TempDir, policy: &str) -> Helper {
        Self::start_limited(ns, dir, policy, None)
    }

    /// [`Helper::start`] with the host's cgroup hierarchies mounted again in the helper's mount
    /// namespace (`ip netns exec` mounts a new `/sys` there, which hides them): for a policy with
    /// a `[jailer]`, whose configuration needs them.
    pub fn start_with_cgroups(ns: &Netns, policy: &str) -> Helper {
        let dir = temp_dir();
        let (socket, state) = (dir.path().join("helper.sock"), dir.path().join("state"));
        Self::launch_with(ns, dir, policy, socket, state, None, true)
    }

    /// [`Helper::start_in`], with the soft open-file limit the helper starts with set to
    /// `soft_nofile` (the hard one is left as it is).
    pub fn start_limited(
        ns: &Netns,
        dir: tempfile::TempDir,
        policy: &str,
        soft_nofile: Option<u64>,
    ) -> Helper {
        let (socket, state) = (dir.path().join("helper.sock"), dir.path().join("state"));
        Self::launch_with(ns, dir, policy, socket, state, soft_nofile, false)
    }

    /// Starts the helper with its policy and log in `dir`, on `socket`, with its state in `state`.
    pub fn start_at(
        ns: &Netns,
        dir: tempfile::TempDir,
        policy: &str,
        socket: PathBuf,
        state: PathBuf,
    ) -> Helper {
        Self::launch_with(ns, dir, policy, socket, state, None, false)
    }

    fn launch_with(
        ns: &Netns,
        dir: tempfile::TempDir,
        policy: &str,
        socket: PathBuf,
        state: PathBuf,
        soft_nofile: Option<u64>,
        cgroups: bool,
    ) -> Helper {
        let log = dir.path().join("helper.log");
        let policy_file = dir.path().join("policy.toml");
        std::fs::write(&policy_file, policy).unwrap();
        let mut cmd = Self::command_with(&ns.name, &socket, &policy_file, &state, &log, cgroups);
        if let Some(soft) = soft_nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: the closure runs between fork and exec and only makes two system calls.
            unsafe {
                cmd.pre_exec(move || {
                    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    lim.rlim_cur = soft.min(lim.rlim_max);
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().unwrap();
        let node_dir = node_dir_for(&state);
        let mut h = Helper { child: Some(child), dir, socket, state, log, node_dir, ns: ns.name.clone() };
        h.wait_ready();
        h
    }

    /// Runs `banger-helper serve` in `ns` without waiting for it.
    pub fn spawn(ns: &str, socket: &Path, policy: &Path, state: &Path, log: &Path) -> Child {
        Self::command(ns, socket, policy, state, log).spawn().unwrap()
    }

    /// The command [`Helper::spawn`] runs, with a umask of 077 (as `sudo` may leave it, and as
    /// the unit sets it), and its dm nodes in [`node_dir_for`] `state`.
    pub fn command(ns: &str, socket: &Path, policy: &Path, state: &Path, log: &Path) -> Command {
        Self::command_with(ns, socket, policy, state, log, false)
    }

    /// [`Helper::command`], with the host's cgroup hierarchies mounted again first when `cgroups`.
    fn command_with(
        ns: &str,
        socket: &Path,
        policy: &Path,
        state: &Path,
        log: &Path,
        cgroups: bool,
    ) -> Command {
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::create(log).unwrap();
        let mut cmd = Command::new("ip");
        // SAFETY: the closure runs between fork and exec and only calls umask.
        unsafe {
            cmd.pre_exec(|| {
                libc::umask(0o077);
                Ok(())
            });
        }
        cmd.args(["netns", "exec", ns]);
        if cgroups {
            cmd.args(["sh", "-c", &remount_cgroups(), "sh"]);
        }
        cmd.args([HELPER, "serve", "--socket"])
            .arg(socket)
            .arg("--policy")
            .arg(policy)
            .arg("--state-dir")
            .arg(state)
            .arg("--node-dir")
            .arg(node_dir_for(state))
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        cmd
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            if UnixStream::connect(&self.socket).is_ok() && self.log_text().contains("serving") {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("helper exited with {status} before serving:\n{}", self.log_text());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "helper not serving after 20 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The audit records the helper wrote so far (the test policy sends them to standard error,
    /// which is the helper's log file, one JSON line each).
    pub fn audit(&self) -> Vec<banger_helper::audit::Record> {
        self.log_text()
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad audit line {l:?}: {e}")))
            .collect()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Whether the helper process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Stops the helper (SIGTERM, then SIGKILL after 10 s) and proves the process is gone;
    /// returns its directory so it can be restarted on the same state.
    pub fn stop(mut self) -> tempfile::TempDir {
        self.terminate();
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    /// Kills the helper with SIGKILL, as a crash would (nothing of it runs after), and proves the
    /// process is gone; returns its directory so it can be restarted on the same state.
    pub fn kill_9(mut self) -> tempfile::TempDir {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
            assert!(!Path::new(&format!("/proc/{}", child.id())).exists());
        }
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    fn terminate(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!Path::new(&format!("/proc/{}", pid)).exists(), "helper process {pid} still exists");
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.terminate();
        let _ = std::fs::remove_dir(&self.node_dir);
    }
}

/// A client connection (used inside a forked child, or as root).
pub struct Client {
    pub sock: UnixStream,
}

impl Client {
    /// Connects and says hello; returns the client and the hello answer.
    pub fn connect(socket: &Path, install: &str) -> Result<(Client, Response), String> {
        let sock = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
        sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let c = Client { sock };
        let hello = c
            .call(Request::Hello { version: PROTOCOL_VERSION, install_id: InstallId::new(install).unwrap() });
        Ok((c, hello))
    }

    pub fn call(&self, req: Request) -> Response {
        self.call_fds(req, &[])
    }

    pub fn call_fds(&self, req: Request, fds: &[BorrowedFd<'_>]) -> Response {
        if let Err(e) = send_blocking(self.sock.as_fd(), &req, fds) {
            return client_error(format!("send: {e}"));
        }
        match recv_blocking::<Response>(self.sock.as_fd()) {
            Ok((r, _)) => r,
            Err(e) => client_error(format!("recv: {e}")),
        }
    }

    /// Sends raw bytes as a frame payload.
    pub fn send_raw_frame(&self, payload: &[u8]) -> Result<(), String> {
        write_frame_blocking(self.sock.as_fd(), payload, &[]).map_err(|e| e.to_string())
    }
}

/// A failure on the client side, carried like a helper error so it travels back from a child.
pub fn client_error(reason: String) -> Response {
    Response::Error(banger_protocol::HelperError::Kernel {
        op: "test-client".into(),
        errno: -1,
        detail: reason,
    })
}

/// Runs `f` in a forked child as `uid` (gid `uid`, supplementary group [`SOCKET_GID`] when
/// `socket_group`), and returns what it returned. The child has 60 s.
pub fn as_uid_with<F: FnOnce() -> Vec<Response>>(uid: u32, socket_group: bool, f: F) -> Vec<Response> {
    let groups: &[u32] = if socket_group { &[SOCKET_GID] } else { &[] };
    as_uid_groups(uid, groups, f)
}

/// Runs `f` in a forked child as `uid` (gid `uid`) with these supplementary groups.
pub fn as_uid_groups<F: FnOnce() -> Vec<Response>>(uid: u32, groups: &[u32], f: F) -> Vec<Response> {
    let (rd, wr) = nix::unistd::pipe().unwrap();
    // SAFETY: the child only runs the closure (syscalls and allocation; glibc's malloc is fork
    // safe) and leaves with _exit; it never returns into the test harness.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            drop(rd);
            // SAFETY: alarm only arms a timer.
            unsafe { libc::alarm(60) };
            let groups: Vec<Gid> = groups.iter().map(|g| Gid::from_raw(*g)).collect();
            let ok = nix::unistd::setgroups(&groups).is_ok()
                && nix::unistd::setresgid(Gid::from_raw(uid), Gid::from_raw(uid), Gid::from_raw(uid)).is_ok()
                && nix::unistd::setresuid(Uid::from_raw(uid), Uid::from_raw(uid), Uid::from_raw(uid)).is_ok();
            let code = if !ok {
                2
            } else {
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                    Ok(responses) => {
                        let bytes = banger_protocol::codec::encode(&responses).unwrap_or_default();
                        let mut w = std::fs::File::from(wr);
                        if w.write_all(&bytes).is_ok() { 0 } else { 3 }
                    }
                    Err(_) => 101,
                }
            };
            // SAFETY: leaving the child without running the harness's destructors.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop(wr);
            let mut bytes = Vec::new();
            std::fs::File::from(rd).read_to_end(&mut bytes).unwrap();
            let status = waitpid(child, None).unwrap();
            assert_eq!(status, WaitStatus::Exited(child, 0), "client child as uid {uid} failed");
            banger_protocol::codec::decode(&bytes).unwrap()
        }
    }
}

/// Connections a child running as `uid` (with the socket group) holds open until this is dropped.
pub struct HeldConnections {
    child: Pid,
    /// How many connections the child opened.
    pub opened: usize,
}

/// Opens up to `n` connections to `socket` as `uid`, eight every 10 ms, sending `Hello` on each if
/// `hello` (without reading any answer), and keeps them open, idle, until the result is dropped.
pub fn hold_connections(socket: &Path, uid: u32, n: usize, hello: bool) -> HeldConnections {
    let (ready_rd, ready_wr) = nix::unistd::pipe().unwrap();
    // SAFETY: the child makes syscalls and allocations only and leaves with _exit.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            drop(ready_rd);
            // SAFETY: alarm only arms a timer.
            unsafe { libc::alarm(60) };
            let ok = nix::unistd::setgroups(&[Gid::from_raw(SOCKET_GID)]).is_ok()
                && nix::unistd::setresgid(Gid::from_raw(uid), Gid::from_raw(uid), Gid::from_raw(uid)).is_ok()
                && nix::unistd::setresuid(Uid::from_raw(uid), Uid::from_raw(uid), Uid::from_raw(uid)).is_ok();
            let mut held = Vec::new();
            let req =
                Request::Hello { version: PROTOCOL_VERSION, install_id: InstallId::new("held").unwrap() };
            while ok && held.len() < n {
                let Ok(sock) = UnixStream::connect(socket) else { break };
                if hello {
                    // A connection the helper refused at once may already be closed: no matter.
                    let _ = send_blocking(sock.as_fd(), &req, &[]);
                }
                held.push(sock);
                // Paced, so that slots are taken by identified peers, not only by arriving ones.
                if held.len() % 8 == 0 {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let mut w = std::fs::File::from(ready_wr);
            let _ = w.write_all(&(held.len() as u32).to_le_bytes());
            drop(w);
            // Killed when the parent is done with the connections (or by the alarm).
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        ForkResult::Parent { child } => {
            drop(ready_wr);
            let mut b = [0u8; 4];
            std::fs::File::from(ready_rd).read_exact(&mut b).unwrap();
            HeldConnections { child, opened: u32::from_le_bytes(b) as usize }
        }
    }
}

impl Drop for HeldConnections {
    fn drop(&mut self) {
        let _ = kill(self.child, Signal::SIGKILL);
        let _ = waitpid(self.child, None);
    }
}

/// How many descriptors process `pid` has open.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// [`as_uid_with`] with the socket group.
pub fn as_uid<F: FnOnce() -> Vec<Response>>(uid: u32, f: F) -> Vec<Response> {
    as_uid_with(uid, true, f)
}

/// One connection as `uid` for `install`, making these requests; returns hello's answer and then
/// one answer per request.
pub fn session(h: &Helper, uid: u32, install: &str, reqs: Vec<Request>) -> Vec<Response> {
    let socket = h.socket.clone();
    let install = install.to_owned();
    as_uid(uid, move || match Client::connect(&socket, &install) {
        Ok((c, hello)) => std::iter::once(hello).chain(reqs.into_iter().map(|r| c.call(r))).collect(),
        Err(e) => vec![client_error(e)],
    })
}

pub fn vm(s: &str) -> banger_protocol::VmId {
    banger_protocol::VmId::new(s).unwrap()
}

/// Opens the TAP `name` in `ns` the way Firecracker does (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
/// single queue) as `uid`: `/dev/net/tun` is opened before the uid changes (the device node's
/// mode is the admin's business), the TUNSETIFF itself runs as `uid`. Returns the errno on failure.
pub fn open_tap_as(ns: &Netns, name: &str, uid: u32) -> Result<(), i32> {
    tap_as(ns, name, uid, None)
}

/// As [`open_tap_as`], then gives the TAP to `new_owner` with `TUNSETOWNER`, which the tun
/// driver lets the TAP's owner do without any capability.
pub fn give_tap_away_as(ns: &Netns, name: &str, uid: u32, new_owner: u32) -> Result<(), i32> {
    tap_as(ns, name, uid, Some(new_owner))
}

fn tap_as(ns: &Netns, name: &str, uid: u32, new_owner: Option<u32>) -> Result<(), i32> {
    nix::ioctl_write_ptr_bad!(tun_set_iff, linux_raw_sys::ioctl::TUNSETIFF, libc::ifreq);
    nix::ioctl_write_int_bad!(tun_set_owner, linux_raw_sys::ioctl::TUNSETOWNER);
    let netns = std::fs::File::open(format!("/run/netns/{}", ns.name)).unwrap();
    let (rd, wr) = nix::unistd::pipe().unwrap();
    // SAFETY: the child makes syscalls only and leaves with _exit.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            drop(rd);
            let code: i32 = (|| {
                nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| e as i32)?;
                let tun = nix::fcntl::open(
                    "/dev/net/tun",
                    nix::fcntl::OFlag::O_RDWR,
                    nix::sys::stat::Mode::empty(),
                )
                .map_err(|e| e as i32)?;
                nix::unistd::setgroups(&[]).map_err(|e| e as i32)?;
                nix::unistd::setresgid(Gid::from_raw(uid), Gid::from_raw(uid), Gid::from_raw(uid))
                    .map_err(|e| e as i32)?;
                nix::unistd::setresuid(Uid::from_raw(uid), Uid::from_raw(uid), Uid::from_raw(uid))
                    .map_err(|e| e as i32)?;
                // SAFETY: ifreq is plain old data.
                let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
                for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
                    *d = s as libc::c_char;
                }
                req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | 0x4000) as libc::c_short;
                // SAFETY: a valid ifreq on an open tun descriptor.
                unsafe { tun_set_iff(tun.as_raw_fd(), &req) }.map_err(|e| e as i32)?;
                if let Some(owner) = new_owner {
                    // SAFETY: TUNSETOWNER takes the uid by value, on the attached descriptor.
                    unsafe { tun_set_owner(tun.as_raw_fd(), owner as _) }.map_err(|e| e as i32)?;
                }
                Ok::<i32, i32>(0)
            })()
            .unwrap_or_else(|e| e);
            let mut w = std::fs::File::from(wr);
            let _ = w.write_all(&code.to_le_bytes());
            // SAFETY: leaving the child.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => {
            drop(wr);
            let mut b = [0u8; 4];
            std::fs::File::from(rd).read_exact(&mut b).unwrap();
            waitpid(child, None).unwrap();
            match i32::from_le_bytes(b) {
                0 => Ok(()),
                e => Err(e),
            }
        }
    }
}

/// Backing files for loop devices, in a private directory. On drop, any dm target over a loop
/// device still attached to one of them, then the device (a test that failed half-way), is
/// removed, so a failing test leaves no device behind either.
///
/// In the kernel tier the directory is a tmpfs of its own: the guest's `/tmp` is an overlay,
/// which the helper does not attach loop devices over. Make these before starting the helper,
/// so the mount is in its mount table.
pub struct BackingFiles {
    dir: tempfile::TempDir,
    files: Vec<PathBuf>,
    mounted: bool,
}

impl BackingFiles {
    pub fn new() -> Self {
        let dir = temp_dir();
        let in_tier = std::env::var("BANGER_KERNEL_TIER").as_deref() == Ok("1");
        if in_tier {
            run(Command::new("mount").args(["-t", "tmpfs", "-o", "mode=0755", "tmpfs"]).arg(dir.path()));
        }
        BackingFiles { dir, files: Vec::new(), mounted: in_tier }
    }

    /// A file of `size` bytes owned by `uid` (mode 0600).
    pub fn file(&mut self, name: &str, uid: u32, size: u64) -> PathBuf {
        let path = self.dir.path().join(name);
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(size).unwrap();
        std::os::unix::fs::chown(&path, Some(uid), Some(uid)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        self.files.push(path.clone());
        path
    }
}

impl Drop for BackingFiles {
    fn drop(&mut self) {
        for f in &self.files {
            for dev in loops_of(f) {
                let holders = format!("/sys/block/{}/holders", dev.trim_start_matches("/dev/"));
                for holder in std::fs::read_dir(holders).into_iter().flatten().flatten() {
                    let name = std::fs::read_to_string(holder.path().join("dm/name")).unwrap_or_default();
                    let _ = Command::new("dmsetup").args(["--noudevsync", "remove", name.trim()]).output();
                }
                let _ = std::os::unix::fs::chown(&dev, Some(0), Some(0));
                let _ = std::fs::set_permissions(&dev, std::fs::Permissions::from_mode(0o600));
                let _ = Command::new("losetup").args(["-d", &dev]).output();
            }
        }
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(self.dir.path()).output();
        }
    }
}

/// The loop devices attached to `file`, from `losetup -j`.
pub fn loops_of(file: &Path) -> Vec<String> {
    let out = Command::new("losetup").arg("-j").arg(file).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').next())
        .map(str::to_owned)
        .collect()
}

/// `losetup`'s read-only column for a device.
pub fn loop_read_only(device: &str) -> bool {
    let out = Command::new("losetup").args(["-n", "-O", "RO", device]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "1"
}

/// Owner uid and mode of a device node.
pub fn node_owner(device: &str) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(device).unwrap();
    (m.uid(), m.mode() & 0o7777)
}

/// Builds a binary of `banger-tests` with cargo (a no-op when up to date) and returns its path.
pub fn build(bin: &str, static_target: bool) -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace).args(["build", "-p", "banger-tests", "--bin", bin]);
    cmd.args(["--message-format", "json-render-diagnostics"]).stdin(Stdio::null()).stderr(Stdio::inherit());
    cmd.env_remove("CARGO_ENCODED_RUSTFLAGS");
    if static_target {
        // As `tests/run` builds it: a jail has no dynamic loader.
        cmd.env("RUSTFLAGS", "-C target-feature=+crt-static").args(["--target", "x86_64-unknown-linux-gnu"]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "building {bin} failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == bin)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo built no {bin}"))
}
