//! `helper-bench`: how fast the root helper does its work, measured against doing the same kernel
//! work by shelling out to `ip`, `iptables`, `sysctl`, `losetup` and `dmsetup`, and against
//! calling the helper's operations in-process without the socket (the floor).
//!
//! Run as root, after building the helper (the benchmark starts the real binary):
//!
//! ```text
//! cargo build --release -p banger-helper
//! cargo run --release -p banger-tests --bin helper-bench
//! ```
//!
//! Everything happens in a network namespace of its own (with a veth uplink carrying the default
//! route), which the benchmark enters before it starts anything, so the helper, the shell commands
//! and the in-process operations all work in it. What is measured:
//!
//! 1. ping round trip through the socket (p50, p99), against the same frame echoed by a process
//!    that does nothing else (this program again, with `--echo`, reading its standard input), the
//!    two alternating in blocks of 5,000: the floor any helper has on this machine, two processes
//!    waking each other;
//! 2. one VM's host setup (TAP, NAT up, and where the helper can make dm-snapshot roots two loop
//!    attaches and the dm-snapshot with its node — where it cannot, it attaches no loop device
//!    and bangerd copies the image instead, which is not the helper's work; the lease is taken by
//!    the first TAP, in a warm-up round) and its teardown (one `TeardownVms`, as bangerd sends
//!    it; by shelling out, the same steps one command each), through the helper, by shelling out,
//!    and in-process, the three alternating round by round;
//! 3. tearing down 20 VMs in one request against tearing down one;
//! 4. the helper's resident set with 100 VMs (TAP and NAT) of 10 users connected at once, against
//!    the same helper idle.
//!
//! Loop devices and dm targets are global: the benchmark removes whatever it made, even on
//! failure.

use std::fs::File;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use banger_helper::kernel::linux::{LinuxDm, LinuxKernel};
use banger_helper::ops::Helper;
use banger_policy::{Peer, Policy};
use banger_protocol::frame::{recv_blocking, send_blocking};
use banger_protocol::{InstallId, LoopRole, PROTOCOL_VERSION, Request, Response, VmId, min_cow_bytes};
use banger_tests::bench::figure::Figure;
use clap::Parser;

/// Benchmark of banger-helper against shelling out and against the in-process floor.
#[derive(Debug, Parser)]
struct Args {
    /// Setup/teardown rounds per path.
    #[arg(long, default_value_t = 30)]
    rounds: usize,
    /// Pings to time.
    #[arg(long, default_value_t = 20_000)]
    pings: usize,
    /// Rounds of the 20-VM against 1-VM teardown.
    #[arg(long, default_value_t = 8)]
    bulk_rounds: usize,
    /// VMs in the bulk teardown.
    #[arg(long, default_value_t = 20)]
    bulk_vms: usize,
    /// Users for the helper's memory figure, each with `--rss-vms-per-user` VMs (TAP and NAT).
    #[arg(long, default_value_t = 10)]
    rss_users: u32,
    /// VMs per user for the helper's memory figure.
    #[arg(long, default_value_t = 10)]
    rss_vms_per_user: usize,
    /// The helper binary (default: `banger-helper` next to this program).
    #[arg(long)]
    helper: Option<PathBuf>,
    /// Also print one JSON line per figure (`metric`, `value`, `unit`, `baseline`, `ratio`,
    /// `n`, `p90`), as `bench` reads them.
    #[arg(long)]
    json: bool,
    /// Echo every frame read on standard input (a Unix socket) back to it, until it closes: the
    /// ping baseline's other process.
    #[arg(long, hide = true)]
    echo: bool,
}

/// `--echo`: the baseline's server.
fn echo() -> anyhow::Result<()> {
    use banger_protocol::frame::{FrameError, read_frame_blocking, write_frame_blocking};
    let stdin = std::io::stdin();
    loop {
        match read_frame_blocking(stdin.as_fd()) {
            Ok(frame) => write_frame_blocking(stdin.as_fd(), &frame.payload, &[])?,
            Err(FrameError::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// The baseline's client: a child process echoing frames ([`echo`]).
struct Echo {
    sock: UnixStream,
    child: Child,
}

impl Echo {
    fn spawn() -> anyhow::Result<Echo> {
        let (sock, theirs) = UnixStream::pair()?;
        let exe = std::env::current_exe().context("cannot find this program for --echo")?;
        let child = Command::new(exe).arg("--echo").stdin(Stdio::from(OwnedFd::from(theirs))).spawn()?;
        Ok(Echo { sock, child })
    }

    /// One `Ping` sent and its echo read back, as [`Client::call`] does.
    fn ping(&self) -> anyhow::Result<()> {
        send_blocking(self.sock.as_fd(), &Request::Ping, &[])?;
        let (r, _) = recv_blocking::<Request>(self.sock.as_fd())?;
        anyhow::ensure!(matches!(r, Request::Ping), "the echo sent back {r:?}");
        Ok(())
    }

    fn stop(self) -> anyhow::Result<()> {
        let Echo { sock, mut child } = self;
        drop(sock);
        let status = child.wait()?;
        anyhow::ensure!(status.success(), "the echo process ended with {status}");
        Ok(())
    }
}

const UPLINK: &str = "up0";

/// The policy the helper (and the in-process floor) runs with: root may connect, room for the
/// bulk teardown, no guest-to-host ports.
fn policy_text(audit: &Path, users: u32) -> String {
    let mut listed = vec!["\"0\"".to_owned()];
    listed.extend((0..users).map(|i| format!("\"{}\"", RSS_UID + i)));
    format!(
        "[access]\nusers = [{}]\nsocket_group = \"0\"\n\n[quotas]\nmax_vms = 64\nmax_taps = 64\nmax_loops = 128\n\n\
         [audit]\nlog = \"{}\"\n",
        listed.join(", "),
        audit.display()
    )
}

/// The first uid of the memory figure's users (uids without an account, admitted by number).
const RSS_UID: u32 = 2_000_000_000;

/// Connects to the helper as `uid` (and says hello as install `install`): the connection is made
/// on a thread of its own whose effective uid alone is changed (the raw system call changes only
/// the calling thread's credentials, and the thread ends there), so the helper sees that uid as
/// its peer.
fn connect_as(socket: &Path, uid: u32, install: &str) -> anyhow::Result<Client> {
    let (socket, install) = (socket.to_owned(), install.to_owned());
    std::thread::spawn(move || -> anyhow::Result<Client> {
        // SAFETY: setresuid with -1 for the real and saved uid changes only this thread's
        // effective uid (the raw call, unlike libc's wrapper, is not broadcast to other threads).
        let rc = unsafe { libc::syscall(libc::SYS_setresuid, -1i64, i64::from(uid), -1i64) };
        if rc != 0 {
            bail!("cannot take uid {uid}: {}", std::io::Error::last_os_error());
        }
        Ok(Client::connect(&socket, &install)?.0)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the connecting thread panicked"))?
}

/// `VmRSS` of `pid` in MiB, sampled `n` times 20 ms apart.
fn rss_samples(pid: u32, n: usize) -> anyhow::Result<Vec<f64>> {
    (0..n)
        .map(|i| {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
            banger_tests::bench::figure::rss_mib(pid)
        })
        .collect()
}

/// The helper's resident set idle (one connection, nothing held) and with `users` users of
/// `per_user` VMs each (their TAP and NAT made through the helper, the users connected), then
/// every VM torn down; the idle figure is the baseline.
fn helper_rss(socket: &Path, pid: u32, users: u32, per_user: usize) -> anyhow::Result<Figure> {
    let idle = rss_samples(pid, 10)?;
    let clients = (0..users)
        .map(|i| connect_as(socket, RSS_UID + i, &format!("rss{i}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut made: Vec<(usize, Vec<VmId>)> = Vec::new();
    let result = (|| -> anyhow::Result<Vec<f64>> {
        for (u, client) in clients.iter().enumerate() {
            made.push((u, Vec::new()));
            for v in 0..per_user {
                let id = format!("m{u}-{v}");
                made.last_mut().expect("pushed").1.push(vm(&id));
                for req in setup_requests(&id, false) {
                    client.call(req, &[])?;
                }
            }
        }
        rss_samples(pid, 10)
    })();
    for (u, vms) in made {
        if let Err(e) = clients[u].call(Request::TeardownVms { vms }, &[]) {
            eprintln!("helper-bench: teardown of the memory figure's vms of user {u} failed: {e:#}");
        }
    }
    let name = format!("helper rss with {} vms of {users} users vs idle", users as usize * per_user);
    Ok(Figure::new(name, "MiB", result?).against(idle))
}

fn run(cmd: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A network namespace of the benchmark (with a veth uplink carrying the default route), deleted
/// on drop.
struct Netns {
    name: String,
    /// `/run/netns/<name>`, to enter it.
    file: File,
}

impl Netns {
    fn create(role: &str) -> anyhow::Result<Netns> {
        let name = format!("bgbench-{role}-{}", std::process::id());
        run(&["ip", "netns", "add", &name])?;
        let file = File::open(format!("/run/netns/{name}"))?;
        let ns = Netns { name, file };
        let n = ns.name.as_str();
        run(&["ip", "-n", n, "link", "set", "lo", "up"])?;
        run(&["ip", "-n", n, "link", "add", UPLINK, "type", "veth", "peer", "name", "up1"])?;
        run(&["ip", "-n", n, "link", "set", UPLINK, "up"])?;
        run(&["ip", "-n", n, "link", "set", "up1", "up"])?;
        run(&["ip", "-n", n, "addr", "add", "10.201.0.1/24", "dev", UPLINK])?;
        run(&["ip", "-n", n, "route", "add", "default", "via", "10.201.0.2", "dev", UPLINK])?;
        Ok(ns)
    }

    /// Moves the calling thread (and the threads and children it creates after) into it.
    fn enter(&self) -> anyhow::Result<()> {
        nix::sched::setns(self.file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).context("setns")
    }

    /// Makes `cmd` run inside it.
    fn put(&self, cmd: &mut Command) {
        let fd = self.file.as_raw_fd();
        // SAFETY: setns is async-signal-safe; the child only enters the namespace before exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// The real helper process; stopped on drop.
struct HelperProcess {
    child: Child,
}

/// Where the helper (`helper`) and the floor (`floor`) make their dm nodes: on devtmpfs.
fn node_dir(role: &str) -> PathBuf {
    PathBuf::from(format!("/dev/bgbench-{role}-{}", std::process::id()))
}

impl HelperProcess {
    fn start(bin: &Path, dir: &Path, policy: &Path, ns: &Netns) -> anyhow::Result<(HelperProcess, PathBuf)> {
        let socket = dir.join("helper.sock");
        let log = dir.join("helper.log");
        let mut cmd = Command::new(bin);
        ns.put(&mut cmd);
        let child = cmd
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--policy")
            .arg(policy)
            .arg("--state-dir")
            .arg(dir.join("helper-state"))
            .arg("--node-dir")
            .arg(node_dir("helper"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut p = HelperProcess { child };
        let start = Instant::now();
        while UnixStream::connect(&socket).is_err() {
            if let Some(status) = p.child.try_wait()? {
                bail!("helper exited ({status}): {}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!("helper not serving after 20 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok((p, socket))
    }
}

impl Drop for HelperProcess {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let start = Instant::now();
        while matches!(self.child.try_wait(), Ok(None)) {
            if start.elapsed() > Duration::from_secs(10) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The benchmark's backing files; any dm target over a loop device still attached to them is
/// removed on drop, then the device detached.
struct Files {
    base: PathBuf,
    cow: PathBuf,
}

/// The base image's size.
const BASE_BYTES: u64 = 64 << 20;

impl Files {
    fn create(dir: &Path) -> anyhow::Result<Files> {
        let base = dir.join("base.img");
        let cow = dir.join("cow.img");
        File::create(&base)?.set_len(BASE_BYTES)?;
        File::create(&cow)?.set_len(min_cow_bytes(BASE_BYTES))?;
        Ok(Files { base, cow })
    }

    fn open(&self) -> anyhow::Result<(OwnedFd, OwnedFd)> {
        let base = File::open(&self.base)?;
        let cow = std::fs::OpenOptions::new().read(true).write(true).open(&self.cow)?;
        Ok((base.into(), cow.into()))
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        for f in [&self.base, &self.cow] {
            let out = Command::new("losetup").arg("-j").arg(f).output();
            let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
            for dev in text.lines().filter_map(|l| l.split(':').next()) {
                let holders = format!("/sys/block/{}/holders", dev.trim_start_matches("/dev/"));
                for holder in std::fs::read_dir(holders).into_iter().flatten().flatten() {
                    let name = std::fs::read_to_string(holder.path().join("dm/name")).unwrap_or_default();
                    eprintln!("helper-bench: removing leftover dm target {}", name.trim());
                    let _ = Command::new("dmsetup").args(["--noudevsync", "remove", name.trim()]).output();
                }
                eprintln!("helper-bench: detaching leftover {dev}");
                let _ = std::os::unix::fs::chown(dev, Some(0), Some(0));
                let _ = Command::new("losetup").args(["-d", dev]).output();
            }
        }
    }
}

/// A blocking client on the helper socket.
struct Client {
    sock: UnixStream,
}

impl Client {
    /// Connects and says hello; returns the client and whether the helper can make dm-snapshot
    /// roots.
    fn connect(socket: &Path, install: &str) -> anyhow::Result<(Client, bool)> {
        let c = Client { sock: UnixStream::connect(socket)? };
        let hello =
            c.call(Request::Hello { version: PROTOCOL_VERSION, install_id: InstallId::new(install)? }, &[])?;
        let Response::Hello(hello) = hello else { bail!("hello refused: {hello:?}") };
        Ok((c, hello.capabilities.device_mapper))
    }

    fn call(&self, req: Request, fds: &[BorrowedFd<'_>]) -> anyhow::Result<Response> {
        send_blocking(self.sock.as_fd(), &req, fds)?;
        let (r, _) = recv_blocking::<Response>(self.sock.as_fd())?;
        if let Response::Error(e) = &r {
            bail!("{} failed: {e}", req.op_name());
        }
        Ok(r)
    }
}

fn vm(s: &str) -> VmId {
    VmId::new(s).expect("valid vm id")
}

/// A VM's setup as bangerd asks for it: its TAP and NAT, and where the helper can make
/// dm-snapshot roots (`dm`), its two loop devices and its root.
fn setup_requests(id: &str, dm: bool) -> Vec<Request> {
    let mut reqs = vec![Request::TapCreate { vm: vm(id) }, Request::NatUp { vm: vm(id) }];
    if dm {
        reqs.extend([
            Request::LoopAttach { vm: vm(id), role: LoopRole::Base, read_only: true },
            Request::LoopAttach { vm: vm(id), role: LoopRole::Cow, read_only: false },
            Request::DmCreate { vm: vm(id) },
        ]);
    }
    reqs
}

/// Teardown is one request, as bangerd sends it.
fn teardown_requests(id: &str) -> [Request; 1] {
    [Request::TeardownVms { vms: vec![vm(id)] }]
}

/// One way of doing a VM's host setup and teardown.
trait Path3 {
    fn name(&self) -> &'static str;
    fn setup(&mut self, id: &str, files: &Files) -> anyhow::Result<Duration>;
    fn teardown(&mut self, id: &str) -> anyhow::Result<Duration>;
}

/// Through the helper's socket.
struct ViaHelper {
    client: Client,
    /// The helper makes dm-snapshot roots.
    dm: bool,
    /// Time of each request by operation, for the breakdown.
    per_op: std::collections::BTreeMap<&'static str, Vec<Duration>>,
}

impl ViaHelper {
    fn timed(&mut self, req: Request, fds: &[BorrowedFd<'_>]) -> anyhow::Result<Response> {
        let op = req.op_name();
        let t = Instant::now();
        let r = self.client.call(req, fds)?;
        self.per_op.entry(op).or_default().push(t.elapsed());
        Ok(r)
    }
}

impl Path3 for ViaHelper {
    fn name(&self) -> &'static str {
        "helper"
    }

    fn setup(&mut self, id: &str, files: &Files) -> anyhow::Result<Duration> {
        let (base, cow) = files.open()?;
        let start = Instant::now();
        for req in setup_requests(id, self.dm) {
            let fds: Vec<BorrowedFd<'_>> = match &req {
                Request::LoopAttach { role: LoopRole::Base, .. } => vec![base.as_fd()],
                Request::LoopAttach { .. } => vec![cow.as_fd()],
                _ => vec![],
            };
            self.timed(req, &fds)?;
        }
        Ok(start.elapsed())
    }

    fn teardown(&mut self, id: &str) -> anyhow::Result<Duration> {
        let start = Instant::now();
        for req in teardown_requests(id) {
            self.timed(req, &[])?;
        }
        Ok(start.elapsed())
    }
}

/// The helper's operations called in-process, without socket or process boundary (the floor).
struct InProcess {
    rt: Arc<tokio::runtime::Runtime>,
    helper: Arc<Helper<LinuxKernel>>,
    peer: Peer,
    /// The helper makes dm-snapshot roots.
    dm: bool,
}

impl InProcess {
    fn call(&self, req: Request, fds: Vec<OwnedFd>) -> anyhow::Result<Response> {
        let op = req.op_name();
        let r = self.rt.block_on(self.helper.handle(&self.peer, req, fds));
        if let Response::Error(e) = &r {
            bail!("{op} failed: {e}");
        }
        Ok(r)
    }
}

impl Path3 for InProcess {
    fn name(&self) -> &'static str {
        "in-process"
    }

    fn setup(&mut self, id: &str, files: &Files) -> anyhow::Result<Duration> {
        let (base, cow) = files.open()?;
        let (mut base, mut cow) = (Some(base), Some(cow));
        let start = Instant::now();
        for req in setup_requests(id, self.dm) {
            let fds = match &req {
                Request::LoopAttach { role: LoopRole::Base, .. } => base.take().into_iter().collect(),
                Request::LoopAttach { .. } => cow.take().into_iter().collect(),
                _ => vec![],
            };
            self.call(req, fds)?;
        }
        Ok(start.elapsed())
    }

    fn teardown(&mut self, id: &str) -> anyhow::Result<Duration> {
        let start = Instant::now();
        for req in teardown_requests(id) {
            self.call(req, vec![])?;
        }
        Ok(start.elapsed())
    }
}

/// The same kernel work by shelling out, one command per step, in a namespace of its own.
struct Shell {
    devices: Vec<String>,
    /// The dm target made (and its node), if any.
    target: Option<(String, PathBuf)>,
    /// Make dm-snapshot roots too.
    dm: bool,
    ns: Netns,
}

impl Shell {
    fn run(&self, cmd: &[&str]) -> anyhow::Result<()> {
        self.run_out(cmd).map(|_| ())
    }

    fn run_out(&self, cmd: &[&str]) -> anyhow::Result<String> {
        let mut c = Command::new(cmd[0]);
        c.args(&cmd[1..]).stdin(Stdio::null());
        self.ns.put(&mut c);
        let out = c.output().with_context(|| format!("{cmd:?}"))?;
        if !out.status.success() {
            bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

const SH_FWD: &str = "SHELL-FORWARD";
const SH_IN: &str = "SHELL-INPUT";
const SH_POST: &str = "SHELL-POSTROUTING";

impl Shell {
    fn addresses(id: &str) -> (String, Ipv4Addr, Ipv4Addr) {
        let i: u32 = id.trim_start_matches(|c: char| !c.is_ascii_digit()).parse().unwrap_or(0);
        let base = u32::from(Ipv4Addr::new(172, 31, 0, 0)) + 4 * (i % 16_000);
        (format!("bgsh{i:011}"), Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
    }

    /// The rules, as `iptables` arguments after the table and `-A`/`-D`.
    fn rules(id: &str) -> Vec<Vec<String>> {
        let (tap, _host, guest) = Self::addresses(id);
        let tag = format!("banger uid=0 inst=shell vm={id}");
        let g = format!("{guest}/32");
        let sv = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<String>>();
        let c = ["-m", "comment", "--comment", tag.as_str()];
        let est = ["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED"];
        vec![
            sv(&[&["-t", "nat", SH_POST, "-s", &g, "-o", UPLINK][..], &c, &["-j", "MASQUERADE"]].concat()),
            sv(&[&["-t", "filter", SH_FWD, "-s", &g, "-i", &tap, "-o", UPLINK][..], &c, &["-j", "ACCEPT"]]
                .concat()),
            sv(&[
                &["-t", "filter", SH_FWD, "-d", &g, "-i", UPLINK, "-o", &tap][..],
                &est,
                &c,
                &["-j", "ACCEPT"],
            ]
            .concat()),
            sv(&[&["-t", "filter", SH_FWD, "-i", &tap][..], &c, &["-j", "DROP"]].concat()),
            sv(&[&["-t", "filter", SH_FWD, "-o", &tap][..], &c, &["-j", "DROP"]].concat()),
            sv(&[&["-t", "filter", SH_IN, "-i", &tap][..], &est, &c, &["-j", "ACCEPT"]].concat()),
            sv(&[&["-t", "filter", SH_IN, "-i", &tap][..], &c, &["-j", "DROP"]].concat()),
        ]
    }

    fn iptables(&self, action: &str, rule: &[String]) -> anyhow::Result<()> {
        // rule = ["-t", table, chain, spec...]
        let mut args: Vec<&str> =
            vec!["iptables", "-w", rule[0].as_str(), rule[1].as_str(), action, rule[2].as_str()];
        args.extend(rule[3..].iter().map(String::as_str));
        self.run(&args)
    }
}

impl Path3 for Shell {
    fn name(&self) -> &'static str {
        "shell"
    }

    fn setup(&mut self, id: &str, files: &Files) -> anyhow::Result<Duration> {
        let (tap, host, guest) = Self::addresses(id);
        let base = files.base.to_string_lossy().into_owned();
        let cow = files.cow.to_string_lossy().into_owned();
        let start = Instant::now();
        self.run(&["ip", "tuntap", "add", "dev", &tap, "mode", "tap", "vnet_hdr", "user", "0"])?;
        self.run(&["sysctl", "-q", "-w", &format!("net.ipv6.conf.{tap}.disable_ipv6=1")])?;
        self.run(&["ip", "addr", "add", &format!("{host}/30"), "dev", &tap])?;
        let mac = banger_policy::addr::guest_mac_bytes(guest).map(|b| format!("{b:02x}")).join(":");
        let (guest, host_ip) = (guest.to_string(), host.to_string());
        self.run(&["ip", "neigh", "add", &guest, "lladdr", &mac, "dev", &tap, "nud", "permanent"])?;
        self.run(&["ip", "link", "set", &tap, "up"])?;
        self.run(&[
            "ip",
            "route",
            "add",
            &format!("{guest}/32"),
            "dev",
            &tap,
            "src",
            &host_ip,
            "quickack",
            "1",
        ])?;
        self.run(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;
        for (table, chain, parent) in
            [("filter", SH_FWD, "FORWARD"), ("filter", SH_IN, "INPUT"), ("nat", SH_POST, "POSTROUTING")]
        {
            self.run(&["iptables", "-w", "-t", table, "-N", chain])?;
            self.run(&["iptables", "-w", "-t", table, "-I", parent, "-j", chain])?;
        }
        for rule in Self::rules(id) {
            self.iptables("-A", &rule)?;
        }
        if !self.dm {
            return Ok(start.elapsed());
        }
        for (file, ro) in [(&base, true), (&cow, false)] {
            let mut args = vec!["losetup", "--find", "--show"];
            if ro {
                args.push("--read-only");
            }
            args.push(file);
            let dev = self.run_out(&args)?;
            self.run(&["chmod", "600", &dev])?;
            self.run(&["chown", "0:0", &dev])?;
            self.devices.push(dev);
        }
        let number = |dev: &str| {
            self.run_out(&["cat", &format!("/sys/block/{}/dev", dev.trim_start_matches("/dev/"))])
        };
        let table = format!(
            "0 {} snapshot {} {} P 8",
            BASE_BYTES / 512,
            number(&self.devices[0])?,
            number(&self.devices[1])?
        );
        let name = format!("bgsh-{id}-{}", std::process::id());
        self.run(&["dmsetup", "--noudevsync", "create", &name, "--table", &table])?;
        let dev = self.run_out(&["dmsetup", "info", "-c", "--noheadings", "-o", "major,minor", &name])?;
        let (major, minor) = dev.split_once(':').context("dmsetup info")?;
        let node = node_dir("shell").join(&name);
        self.target = Some((name, node.clone()));
        let node = node.to_string_lossy().into_owned();
        self.run(&["mknod", "-m", "600", &node, "b", major.trim(), minor.trim()])?;
        self.run(&["chown", "0:0", &node])?;
        Ok(start.elapsed())
    }

    fn teardown(&mut self, id: &str) -> anyhow::Result<Duration> {
        let (tap, _, _) = Self::addresses(id);
        let devices = std::mem::take(&mut self.devices);
        let target = self.target.take();
        let start = Instant::now();
        if let Some((name, node)) = &target {
            let node = node.to_string_lossy().into_owned();
            self.run(&["chown", "0:0", &node])?;
            self.run(&["rm", &node])?;
            self.run(&["dmsetup", "--noudevsync", "remove", name])?;
        }
        for dev in devices.iter().rev() {
            self.run(&["chown", "0:0", dev])?;
            self.run(&["losetup", "-d", dev])?;
        }
        for rule in Self::rules(id) {
            self.iptables("-D", &rule)?;
        }
        for (table, chain, parent) in
            [("filter", SH_FWD, "FORWARD"), ("filter", SH_IN, "INPUT"), ("nat", SH_POST, "POSTROUTING")]
        {
            self.run(&["iptables", "-w", "-t", table, "-D", parent, "-j", chain])?;
            self.run(&["iptables", "-w", "-t", table, "-X", chain])?;
        }
        self.run(&["ip", "link", "del", &tap])?;
        Ok(start.elapsed())
    }
}

/// Sorted samples.
struct Stats(Vec<Duration>);

impl Stats {
    fn new(mut v: Vec<Duration>) -> Stats {
        v.sort();
        Stats(v)
    }
    fn pct(&self, p: usize) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        self.0[(self.0.len() * p / 100).min(self.0.len() - 1)]
    }
    fn median(&self) -> Duration {
        self.pct(50)
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

/// One figure as a JSON line: the median of `value` in `unit` (`1e3`: ms, `1e6`: µs), its p90,
/// and against the median of `baseline` where there is one.
fn json_line(metric: &str, scale: f64, unit: &str, value: &Stats, baseline: Option<&Stats>) -> String {
    let r = |d: Duration| (d.as_secs_f64() * scale * 1000.0).round() / 1000.0;
    serde_json::json!({
        "metric": metric,
        "value": r(value.median()),
        "unit": unit,
        "baseline": baseline.map(|b| r(b.median())),
        "ratio": baseline.map(|b| (ratio(value.median(), b.median()) * 1000.0).round() / 1000.0),
        "n": value.0.len(),
        "p90": r(value.pct(90)),
    })
    .to_string()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.echo {
        return echo();
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("helper-bench must run as root: it starts the helper and creates TAPs, rules and loop devices");
    }
    let helper_bin = match &args.helper {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("banger-helper"),
    };
    if !helper_bin.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p banger-helper) or pass --helper",
            helper_bin.display()
        );
    }
    let work = tempfile::Builder::new().prefix("helper-bench-").tempdir()?;
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755))?;
    // One namespace per path, so that no path's firewall changes are another's.
    let helper_ns = Netns::create("helper")?;
    let shell_ns = Netns::create("shell")?;
    let floor_ns = Netns::create("floor")?;
    floor_ns.enter()?;
    let files = Files::create(work.path())?;
    let policy_file = work.path().join("policy.toml");
    let audit = work.path().join("audit.log");
    std::fs::write(&policy_file, policy_text(&audit, args.rss_users))?;
    let (helper_proc, socket) = HelperProcess::start(&helper_bin, work.path(), &policy_file, &helper_ns)?;
    println!(
        "helper-bench: helper {} in netns {}; shell in {}; in-process in {}; {} rounds",
        helper_bin.display(),
        helper_ns.name,
        shell_ns.name,
        floor_ns.name,
        args.rounds
    );

    // The floor: the same operations, same policy, a ledger on disk, no socket.
    let rt = Arc::new(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?);
    let policy = Policy::from_toml("policy.toml", &std::fs::read_to_string(&policy_file)?)?;
    let floor_helper = banger_tests::bench::in_process_helper(
        &rt,
        policy,
        &work.path().join("floor-state"),
        &work.path().join("floor-audit.log"),
        || Ok(LinuxDm::detect(&node_dir("floor")).unwrap_or_else(|_| LinuxDm::absent())),
    )?;
    let peer = banger_tests::bench::root_peer("floor")?;
    let (client, dm) = Client::connect(&socket, "sock")?;
    let mut floor = InProcess { rt: rt.clone(), helper: floor_helper, peer, dm };
    let mut via = ViaHelper { client, dm, per_op: Default::default() };
    if dm {
        std::fs::create_dir_all(node_dir("shell"))?;
    }
    let mut shell = Shell { devices: Vec::new(), target: None, dm, ns: shell_ns };

    // 1. Ping, against the bare echo, alternating block by block: a ping right after the other
    // process's finds the CPUs awake, so alternating ping by ping would favour one of them.
    let bare = Echo::spawn()?;
    for _ in 0..1000 {
        via.client.call(Request::Ping, &[])?;
        bare.ping()?;
    }
    let (mut samples, mut bare_samples) = (Vec::with_capacity(args.pings), Vec::with_capacity(args.pings));
    const BLOCK: usize = 5000;
    while samples.len() < args.pings {
        let n = BLOCK.min(args.pings - samples.len());
        for _ in 0..n {
            let t = Instant::now();
            via.client.call(Request::Ping, &[])?;
            samples.push(t.elapsed());
        }
        for _ in 0..n {
            let t = Instant::now();
            bare.ping()?;
            bare_samples.push(t.elapsed());
        }
    }
    bare.stop()?;
    let ping = Stats::new(samples);
    let bare = Stats::new(bare_samples);

    // 2. One VM, three ways, alternating.
    let mut setup: [Vec<Duration>; 3] = Default::default();
    let mut teardown: [Vec<Duration>; 3] = Default::default();
    let warmup = 2;
    for round in 0..args.rounds + warmup {
        for k in 0..3 {
            let which = (round + k) % 3;
            let path: &mut dyn Path3 = match which {
                0 => &mut via,
                1 => &mut shell,
                _ => &mut floor,
            };
            let id = format!("v{round}");
            let s = path.setup(&id, &files).with_context(|| format!("{} setup", path.name()))?;
            let t = path.teardown(&id).with_context(|| format!("{} teardown", path.name()))?;
            if round >= warmup {
                setup[which].push(s);
                teardown[which].push(t);
            }
        }
    }
    let setup = setup.map(Stats::new);
    let teardown = teardown.map(Stats::new);
    let per_op: Vec<(&str, Stats)> =
        std::mem::take(&mut via.per_op).into_iter().map(|(k, v)| (k, Stats::new(v))).collect();

    // 3. Bulk teardown: N VMs in one request against one VM, through the helper and in-process.
    let mut bulk: [Vec<Duration>; 4] = Default::default();
    for round in 0..args.bulk_rounds {
        for (k, count) in [(0, args.bulk_vms), (1, 1)] {
            let ids: Vec<String> = (0..count).map(|i| format!("b{round}-{k}-{i}")).collect();
            for id in &ids {
                via.setup(id, &files)?;
                floor.setup(id, &files)?;
            }
            let vms: Vec<VmId> = ids.iter().map(|i| vm(i)).collect();
            let t = Instant::now();
            let r = via.client.call(Request::TeardownVms { vms: vms.clone() }, &[])?;
            bulk[k].push(t.elapsed());
            let t = Instant::now();
            let f = floor.call(Request::TeardownVms { vms }, vec![])?;
            bulk[2 + k].push(t.elapsed());
            for r in [r, f] {
                if let Response::Teardown(rep) = r
                    && !rep.failures.is_empty()
                {
                    bail!("bulk teardown failures: {:?}", rep.failures);
                }
            }
        }
    }
    let bulk = bulk.map(Stats::new);

    // 4. The helper's memory with many VMs of many users.
    let rss = helper_rss(&socket, helper_proc.child.id(), args.rss_users, args.rss_vms_per_user)?;

    let [h_s, sh_s, f_s] = &setup;
    let [h_t, sh_t, f_t] = &teardown;
    let mut out = std::io::stdout().lock();
    writeln!(out)?;
    writeln!(
        out,
        "ping round trip:  p50 {}  p99 {}   (target p50 <= 50 µs, p99 <= 200 µs)",
        us(ping.median()),
        us(ping.pct(99))
    )?;
    writeln!(
        out,
        "  bare echo:       p50 {}  p99 {}   (helper / bare: {:.2}x)",
        us(bare.median()),
        us(bare.pct(99)),
        ratio(ping.median(), bare.median())
    )?;
    writeln!(out)?;
    writeln!(out, "one VM (medians of {} rounds)   helper      shell       in-process", args.rounds)?;
    if !dm {
        writeln!(out, "  (no device-mapper here: no loop devices, no dm-snapshot)")?;
    }
    writeln!(
        out,
        "  setup ({:<22} {:<11} {:<11} {}",
        if dm { "tap, nat, 2 loops, dm)" } else { "tap, nat)" },
        ms(h_s.median()),
        ms(sh_s.median()),
        ms(f_s.median())
    )?;
    writeln!(
        out,
        "  teardown (one request)         {:<11} {:<11} {}",
        ms(h_t.median()),
        ms(sh_t.median()),
        ms(f_t.median())
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "  setup:    shell / helper = {:.1}x faster through the helper (target >= 4x); helper / in-process = {:.2} (target median <= 5 ms)",
        ratio(sh_s.median(), h_s.median()),
        ratio(h_s.median(), f_s.median())
    )?;
    writeln!(
        out,
        "  teardown: shell / helper = {:.1}x; helper / in-process = {:.2} (target <= 1.2)",
        ratio(sh_t.median(), h_t.median()),
        ratio(h_t.median(), f_t.median())
    )?;
    writeln!(
        out,
        "  p90: setup helper {} shell {} in-process {}; teardown helper {} shell {} in-process {}",
        ms(h_s.pct(90)),
        ms(sh_s.pct(90)),
        ms(f_s.pct(90)),
        ms(h_t.pct(90)),
        ms(sh_t.pct(90)),
        ms(f_t.pct(90))
    )?;
    let ops: Vec<String> = per_op.iter().map(|(op, st)| format!("{op} {}", ms(st.median()))).collect();
    writeln!(out, "  per request through the helper (median): {}", ops.join(", "))?;
    writeln!(out)?;
    writeln!(out, "bulk teardown, one request (medians of {} rounds)", args.bulk_rounds)?;
    writeln!(
        out,
        "  helper:     {} VMs {}   1 VM {}   ratio {:.2} (target <= 3)",
        args.bulk_vms,
        ms(bulk[0].median()),
        ms(bulk[1].median()),
        ratio(bulk[0].median(), bulk[1].median())
    )?;
    writeln!(
        out,
        "  in-process: {} VMs {}   1 VM {}   ratio {:.2}",
        args.bulk_vms,
        ms(bulk[2].median()),
        ms(bulk[3].median()),
        ratio(bulk[2].median(), bulk[3].median())
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{}: {:.2} MiB (idle {:.2} MiB; target <= 10 MiB)",
        rss.name,
        rss.median(),
        rss.baseline().unwrap_or(f64::NAN)
    )?;
    if args.json {
        let lines = [
            json_line("helper ping round trip vs bare echo", 1e6, "us", &ping, Some(&bare)),
            json_line("host setup: helper vs shell", 1e3, "ms", h_s, Some(sh_s)),
            json_line("host setup: helper vs in-process", 1e3, "ms", h_s, Some(f_s)),
            json_line("host teardown: helper vs shell", 1e3, "ms", h_t, Some(sh_t)),
            json_line("host teardown: helper vs in-process", 1e3, "ms", h_t, Some(f_t)),
            json_line(
                &format!("{} vms torn down in one request vs one", args.bulk_vms),
                1e3,
                "ms",
                &bulk[0],
                Some(&bulk[1]),
            ),
            rss.json().to_string(),
        ];
        writeln!(out)?;
        for l in lines {
            writeln!(out, "{l}")?;
        }
    }
    drop(out);

    drop(via);
    drop(helper_proc);
    drop(floor);
    if let Ok(rt) = Arc::try_unwrap(rt) {
        rt.shutdown_timeout(Duration::from_secs(2));
    }
    drop(shell);
    drop(files);
    for role in ["helper", "floor", "shell"] {
        let _ = std::fs::remove_dir(node_dir(role));
    }
    drop(helper_ns);
    drop(floor_ns);
    Ok(())
}
