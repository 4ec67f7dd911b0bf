//! The emulated guest: its "kernel" (namespaces) and its PID 1.
//!
//! Boot, in order, printing kernel-like lines on the serial console (the double's stdout):
//!
//! 1. Read the [`GuestConfig`] from stdin; unshare user, network, UTS, IPC, mount and PID
//!    namespaces; map the double's uid and gid to 0 (`setgroups` denied, as an unprivileged
//!    mapping requires); fork PID 1. The forking process only waits for PID 1 and exits with it.
//! 2. PID 1 dies with its parent (`PR_SET_PDEATHSIG`), makes every mount private, mounts its own
//!    `/proc`, `/sys`, a devpts instance, and tmpfs on `/run`, `/tmp` and `/root`.
//! 3. Network, configured with ioctls ([`super::netconf`]): `lo` up; one TAP `ethN` per
//!    configured interface (MAC and MTU as configured), whose descriptors go to the VMM over the
//!    control socket; then the kernel's `ip=` autoconfiguration (address, netmask, default
//!    route via the gateway).
//! 4. Root drive (when there is one): `/etc/hostname` is copied out with debugfs and
//!    bind-mounted over `/etc/hostname`; `/root/.ssh/authorized_keys` is copied into the tmpfs
//!    `/root` (0700/0600); `/etc/ssh/ssh_host_{ed25519,ecdsa,rsa}_key` are converted with
//!    `dropbearconvert` into dropbear host keys.
//! 5. Host name: the root drive's `/etc/hostname` when present (as systemd would set it),
//!    else the `ip=` host name, else `localhost`.
//! 6. dropbear listens on port 22 (public-key logins only) when a host key was found. Mapped root
//!    may not call `setgroups` in a user namespace; dropbear calls it when a session starts, so a
//!    seccomp filter makes `setgroups` a successful no-op for the guest's processes.
//! 7. A `login:` prompt line, then PID 1 reaps orphans and serves the control socket: pause and
//!    resume stop and continue every guest process; Ctrl+Alt+Del terminates them and ends PID 1
//!    with status 0, a reboot, unless the root drive masks systemd's `ctrl-alt-del.target`
//!    (`/etc/systemd/system/ctrl-alt-del.target` a link to `/dev/null`), which systemd then
//!    refuses to start: the keys are ignored, as in such a guest. EOF on the control socket (the
//!    VMM is gone) ends it too.
//!
//! In a jail (the VMM's root has no `/proc`, as under Firecracker's jailer) the namespaces are
//! made the same way (a jail's root is its mount namespace's root, so the kernel allows a user
//! namespace), but without `/proc` no uid or gid can be mapped (the guest runs as the overflow
//! uid), and `/proc` and `/sys` cannot be mounted (the kernel requires a fully visible one in
//! the mount namespace, and a jail has none). So step 2 is skipped, steps 4 and 6 are reported
//! as not emulated (there is no `debugfs` or `dropbear` in a jail, nor a `/run` to keep their
//! files), and the network (step 3), the host name, the console and the control socket work as
//! outside. A missing `debugfs` or `dropbear` outside a jail is reported the same way.
//!
//! Where the VMM may not make a user namespace at all (`EPERM`: a seccomp filter it inherited,
//! as from banger-helper's jail launcher, or a sysctl), no guest is emulated: the console says so
//! after the boot banner, and the guest process only answers the control socket (Ctrl+Alt+Del
//! reboots, that is ends it; pause and resume have no guest process to stop). The VMM's API, TAP,
//! drives and state behave as with a guest.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use nix::mount::{MsFlags, mount};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{Signal, kill};
use nix::sys::socket::{ControlMessage, MsgFlags, recv, sendmsg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, getgid, getuid, sethostname};

use super::netconf::NetConf;
use super::rootfs::{GUEST_PATH, RootDrive, find_program, program};
use super::{Control, GuestConfig, ROOT_DRIVE_FD, sys};
use crate::double::cmdline::{self, IpParam, StaticIp};
use crate::double::tap;

/// Where PID 1 keeps the files it derives (inside its own tmpfs on `/run`).
const STATE_DIR: &str = "/run/firecracker-double";

/// Kernel-style console lines, timestamped from boot.
struct Console {
    start: Instant,
}

impl Console {
    fn line(&self, msg: &str) {
        let t = self.start.elapsed();
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "[{:5}.{:06}] {msg}", t.as_secs(), t.subsec_micros());
        let _ = out.flush();
    }

    fn raw(&self, text: &str) {
        let mut out = io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
}

/// Entry point of the guest process (`firecracker-double --firecracker-double-guest`).
pub fn main() -> ExitCode {
    let console = Console { start: Instant::now() };
    // Named like the VMM so process listings (and leak checks) attribute the guest to it.
    let _ = nix::sys::prctl::set_name(c"firecracker-gst");
    let config: GuestConfig = match serde_json::from_reader(io::stdin().lock()) {
        Ok(c) => c,
        Err(e) => {
            console.line(&format!("Kernel panic - not syncing: bad guest description on stdin: {e}"));
            return ExitCode::from(1);
        }
    };
    // Firecracker's jailer gives the VMM a root without /proc.
    let jailed = !Path::new("/proc/self").exists();
    if let Err(e) = enter_namespaces(!jailed) {
        if e.raw_os_error() == Some(libc::EPERM) {
            banner(&config, &console);
            console.line(&format!(
                "firecracker-double: the VMM may not make a user namespace here ({e}): no guest is emulated \
                 (no guest network, host name or SSH server); the API, TAP, drives and VM state work as usual"
            ));
            return ExitCode::from(without_guest(sys::inherited_control_fd(), &console) as u8);
        }
        console.line(&format!("Kernel panic - not syncing: cannot create the guest namespaces: {e}"));
        return ExitCode::from(1);
    }
    match sys::fork_single_threaded() {
        Ok(Some(pid1)) => loop {
            match waitpid(pid1, None) {
                Ok(WaitStatus::Exited(_, code)) => return ExitCode::from(code as u8),
                Ok(WaitStatus::Signaled(..)) => return ExitCode::from(1),
                Ok(_) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return ExitCode::from(1),
            }
        },
        Ok(None) => {
            let code = pid1(&config, &console, jailed);
            std::process::exit(code)
        }
        Err(e) => {
            console.line(&format!("Kernel panic - not syncing: cannot fork init: {e}"));
            ExitCode::from(1)
        }
    }
}

/// Unshares the guest's namespaces; maps the caller's uid and gid to 0 when `map_ids` (it needs
/// `/proc`).
fn enter_namespaces(map_ids: bool) -> io::Result<()> {
    let (uid, gid) = (getuid(), getgid());
    unshare(
        CloneFlags::CLONE_NEWUSER
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID,
    )?;
    if !map_ids {
        return Ok(());
    }
    fs::write("/proc/self/setgroups", "deny")?;
    fs::write("/proc/self/uid_map", format!("0 {uid} 1"))?;
    fs::write("/proc/self/gid_map", format!("0 {gid} 1"))?;
    Ok(())
}

fn mount_fs(source: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) -> nix::Result<()> {
    mount(Some(source), target, Some(fstype), flags, data)
}

/// PID 1 of the guest; returns its exit status.
fn pid1(config: &GuestConfig, console: &Console, jailed: bool) -> i32 {
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        console.line(&format!("Kernel panic - not syncing: cannot tie the guest to the VMM: {e}"));
        return 1;
    }
    let control = sys::inherited_control_fd();
    banner(config, console);
    if jailed {
        console.line(
            "firecracker-double: the VMM runs in a jail (no /proc): only the guest's network, host name \
             and console are emulated; its processes run unmapped (overflow uid), without /proc, /sys, \
             /dev/pts or /run, /tmp and /root of their own",
        );
    } else if let Err(e) = setup_mounts() {
        console.line(&format!("Kernel panic - not syncing: cannot set up the guest filesystems: {e}"));
        return 1;
    }
    let ip = cmdline::ip_param(&config.cmdline);
    match setup_network(config, &ip, &control, console) {
        Ok(()) => {}
        Err(e) => {
            console.line(&format!("Kernel panic - not syncing: cannot set up the guest network: {e}"));
            return 1;
        }
    }
    let files = read_root_drive(config, console, jailed);
    let hostname = files
        .hostname
        .clone()
        .or_else(|| match &ip {
            IpParam::Static(s) => s.hostname.clone(),
            _ => None,
        })
        .unwrap_or_else(|| "localhost".to_string());
    if let Err(e) = sethostname(&hostname) {
        console.line(&format!("hostname: cannot set {hostname}: {e}"));
    }
    let sshd = start_sshd(&files, console, jailed);
    console.raw(&format!("\nDebian GNU/Linux 12 {hostname} ttyS0\n\n{hostname} login: \n"));
    serve(control, sshd, console, files.ctrl_alt_del_masked)
}

fn banner(config: &GuestConfig, console: &Console) {
    console.line("Linux version 6.1.0-firecracker-double (emulated guest of firecracker-double) #1 SMP");
    console.line(&format!("Command line: {}", config.cmdline));
    console.line(&format!(
        "firecracker-double: instance {}, {} vCPU(s), {} MiB; no real kernel runs",
        config.instance_id, config.vcpu_count, config.mem_size_mib
    ));
    for (i, d) in config.drives.iter().enumerate() {
        let name = format!("vd{}", (b'a' + i as u8) as char);
        console.line(&format!(
            "virtio_blk virtio{i}: [{name}] {} 512-byte logical blocks ({}){}",
            d.size / 512,
            d.id,
            if d.read_only { " read-only" } else { "" }
        ));
    }
}

fn setup_mounts() -> io::Result<()> {
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)?;
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount_fs("proc", "/proc", "proc", nodev | MsFlags::MS_NOEXEC, None)?;
    // A sysfs for this network namespace shows the guest's own interfaces; not vital.
    let _ = mount_fs("sysfs", "/sys", "sysfs", nodev | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY, None);
    mount_fs("tmpfs", "/run", "tmpfs", nodev, Some("mode=0755"))?;
    mount_fs("tmpfs", "/tmp", "tmpfs", nodev, Some("mode=1777"))?;
    mount_fs("tmpfs", "/root", "tmpfs", nodev, Some("mode=0700"))?;
    // Terminals for interactive sessions: a private devpts instance, its ptmx over /dev/ptmx.
    if mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .is_ok()
    {
        let _ = mount(Some("/dev/pts/ptmx"), "/dev/ptmx", None::<&str>, MsFlags::MS_BIND, None::<&str>);
    }
    fs::create_dir_all(STATE_DIR)?;
    fs::set_permissions(STATE_DIR, fs::Permissions::from_mode(0o700))?;
    hide_tty_group();
    Ok(())
}

/// Only gid 0 exists in the guest's user namespace, so the host's `tty` group cannot own a
/// terminal; without a `tty` group, dropbear leaves new terminals with the user's group (0).
/// The guest therefore sees the host's `/etc/group` without its `tty` entry.
fn hide_tty_group() {
    let Ok(host) = fs::read_to_string("/etc/group") else { return };
    let guest: String = host.lines().filter(|l| !l.starts_with("tty:")).map(|l| format!("{l}\n")).collect();
    let path = Path::new(STATE_DIR).join("group");
    if fs::write(&path, guest).is_ok() {
        let _ = mount(Some(&path), "/etc/group", None::<&str>, MsFlags::MS_BIND, None::<&str>);
    }
}

/// Reports a failed configuration step on the console, as a boot script's failure would be.
fn report(console: &Console, what: &str, result: io::Result<()>) {
    if let Err(e) = result {
        console.line(&format!("{what}: {e}"));
    }
}

fn setup_network(config: &GuestConfig, ip: &IpParam, control: &OwnedFd, console: &Console) -> io::Result<()> {
    let net = NetConf::open()?;
    report(console, "lo: cannot bring up", net.up("lo"));
    let mut taps = Vec::new();
    for (i, nic) in config.nics.iter().enumerate() {
        let fd = tap::create_tap(&nic.name).map_err(io::Error::other)?;
        if let Some(mac) = &nic.mac {
            report(console, &format!("{}: cannot set MAC {mac}", nic.name), net.set_mac(&nic.name, mac));
        }
        if let Some(mtu) = nic.mtu {
            report(console, &format!("{}: cannot set MTU {mtu}", nic.name), net.set_mtu(&nic.name, mtu));
        }
        report(console, &format!("{}: cannot bring up", nic.name), net.up(&nic.name));
        console.line(&format!("virtio_net virtio{}: {} up", config.drives.len() + i, nic.name));
        taps.push(fd);
    }
    let raw: Vec<i32> = taps.iter().map(|t| t.as_raw_fd()).collect();
    let cmsgs: Vec<ControlMessage> =
        if raw.is_empty() { vec![] } else { vec![ControlMessage::ScmRights(&raw)] };
    sendmsg::<()>(
        control.as_raw_fd(),
        &[io::IoSlice::new(Control::Nics.as_bytes())],
        &cmsgs,
        MsgFlags::empty(),
        None,
    )?;
    drop(taps);

    match ip {
        IpParam::Off => {}
        IpParam::Dynamic(kind) => {
            console.line(&format!("IP-Config: {kind} autoconfiguration is not emulated"))
        }
        IpParam::Invalid(v) => {
            console.line(&format!("IP-Config: Incomplete network configuration information ({v})"))
        }
        IpParam::Static(s) => configure_static(config, s, &net, console),
    }
    Ok(())
}

fn configure_static(config: &GuestConfig, s: &StaticIp, net: &NetConf, console: &Console) {
    let Some(dev) = s.device.clone().or_else(|| config.nics.first().map(|n| n.name.clone())) else {
        console.line("IP-Config: No network devices available");
        return;
    };
    if !config.nics.iter().any(|n| n.name == dev) {
        console.line(&format!("IP-Config: Device `{dev}' not found"));
        return;
    }
    let address = net.set_address(&dev, s.address, s.netmask);
    report(console, &format!("IP-Config: cannot set {}/{} on {dev}", s.address, s.prefix_len()), address);
    if let Some(gw) = s.gateway {
        report(
            console,
            &format!("IP-Config: cannot add a default route via {gw}"),
            net.add_default_route(gw, &dev),
        );
    }
    let hwaddr = net.mac(&dev).unwrap_or_default();
    let gw = s.gateway.unwrap_or(Ipv4Addr::BROADCAST);
    console.line("IP-Config: Complete:");
    console.line(&format!(
        "     device={dev}, hwaddr={}, ipaddr={}, mask={}, gw={gw}",
        hwaddr, s.address, s.netmask
    ));
    console.line(&format!("     host={}, domain=, nis-domain=(none)", s.hostname.as_deref().unwrap_or("")));
    console.line("     bootserver=255.255.255.255, rootserver=255.255.255.255, rootpath=");
}

/// What the guest found on its root drive.
#[derive(Debug, Default)]
struct RootFiles {
    /// First line of `/etc/hostname`.
    hostname: Option<String>,
    /// Dropbear host keys converted from `/etc/ssh/ssh_host_*_key`.
    host_keys: Vec<String>,
    /// Whether `/root/.ssh/authorized_keys` was installed.
    authorized_keys: bool,
    /// Whether the image masks systemd's `ctrl-alt-del.target` (a link to `/dev/null`), so
    /// that init ignores Ctrl+Alt+Del.
    ctrl_alt_del_masked: bool,
}

/// systemd's unit for Ctrl+Alt+Del (it reboots); masking it makes systemd ignore the keys.
const CTRL_ALT_DEL_TARGET: &str = "/etc/systemd/system/ctrl-alt-del.target";

fn read_root_drive(config: &GuestConfig, console: &Console, jailed: bool) -> RootFiles {
    let mut files = RootFiles::default();
    if !tool_available(
        "debugfs",
        jailed,
        console,
        "the root drive's /etc/hostname, /root/.ssh/authorized_keys and SSH host keys are not read",
    ) {
        return files;
    }
    let state = Path::new(STATE_DIR);
    let hostname_file = state.join("hostname");
    let drive = RootDrive::new(format!("/proc/self/fd/{ROOT_DRIVE_FD}"));
    let dump = |inner: &str, out: &Path| -> bool {
        if !config.root_drive {
            return false;
        }
        match drive.dump(inner, out) {
            Ok(found) => found,
            Err(e) => {
                console.line(&format!("{e}"));
                false
            }
        }
    };

    let found_hostname = dump("/etc/hostname", &hostname_file);
    if config.root_drive {
        files.ctrl_alt_del_masked = drive
            .symlink_target(CTRL_ALT_DEL_TARGET)
            .is_ok_and(|target| target.as_deref() == Some("/dev/null"));
    }
    if config.root_drive {
        console.line("VFS: Mounted root (ext4 filesystem) on device 254:0.");
    } else {
        console.line("VFS: no root drive; the emulated guest boots without a root filesystem");
    }
    if !found_hostname {
        let _ = fs::write(&hostname_file, "");
    } else {
        files.hostname = fs::read_to_string(&hostname_file)
            .ok()
            .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
            .filter(|h| !h.is_empty());
    }
    if Path::new("/etc/hostname").exists()
        && let Err(e) =
            mount(Some(&hostname_file), "/etc/hostname", None::<&str>, MsFlags::MS_BIND, None::<&str>)
    {
        console.line(&format!("cannot show the root drive's /etc/hostname: {e}"));
    }

    let ssh_dir = Path::new("/root/.ssh");
    let keys = ssh_dir.join("authorized_keys");
    if fs::create_dir_all(ssh_dir)
        .and_then(|_| fs::set_permissions(ssh_dir, fs::Permissions::from_mode(0o700)))
        .is_ok()
        && dump("/root/.ssh/authorized_keys", &keys)
    {
        files.authorized_keys = fs::set_permissions(&keys, fs::Permissions::from_mode(0o600)).is_ok();
    }

    for kind in ["ed25519", "ecdsa", "rsa"] {
        let openssh = state.join(format!("ssh_host_{kind}_key"));
        if !dump(&format!("/etc/ssh/ssh_host_{kind}_key"), &openssh) {
            continue;
        }
        let _ = fs::set_permissions(&openssh, fs::Permissions::from_mode(0o600));
        let dropbear = state.join(format!("dropbear_{kind}_host_key"));
        let converted = Command::new(program("dropbearconvert"))
            .env("PATH", GUEST_PATH)
            .args([OsStr::new("openssh"), OsStr::new("dropbear"), openssh.as_os_str(), dropbear.as_os_str()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if converted {
            files.host_keys.push(dropbear.display().to_string());
        } else {
            console.line(&format!("dropbearconvert: cannot convert /etc/ssh/ssh_host_{kind}_key"));
        }
        let _ = fs::remove_file(&openssh);
    }
    files
}

/// Makes `setgroups` a successful no-op for the calling process and its descendants.
fn neutralise_setgroups() -> Result<(), seccompiler::Error> {
    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
    let arch: TargetArch = std::env::consts::ARCH.try_into()?;
    let rules = BTreeMap::from([(libc::SYS_setgroups, vec![])]);
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(0), arch)?;
    let program: BpfProgram = filter.try_into()?;
    seccompiler::apply_filter(&program)
}

/// Whether guest tool `name` can be used; if not, says on the console what is not emulated.
/// In a jail there are no tools (and no `/run` to keep their files in).
fn tool_available(name: &str, jailed: bool, console: &Console, consequence: &str) -> bool {
    let missing = if jailed {
        format!("no {name} in the VMM's jail")
    } else if find_program(name).is_none() {
        format!("{name} not found in {GUEST_PATH}")
    } else {
        return true;
    };
    console.line(&format!("firecracker-double: {missing}: {consequence}"));
    false
}

fn start_sshd(files: &RootFiles, console: &Console, jailed: bool) -> Option<Pid> {
    if !tool_available("dropbear", jailed, console, "no SSH server is emulated") {
        return None;
    }
    if files.host_keys.is_empty() {
        console.line("sshd: no hostkeys available -- exiting.");
        return None;
    }
    if !files.authorized_keys {
        console.line("sshd: /root/.ssh/authorized_keys not on the root drive: no login will be accepted");
    }
    if let Err(e) = neutralise_setgroups() {
        console.line(&format!("sshd: cannot install the setgroups filter: {e}"));
        return None;
    }
    let mut cmd = Command::new(program("dropbear"));
    cmd.env("PATH", GUEST_PATH).args(["-F", "-E", "-s", "-p", "22", "-P", "/run/dropbear.pid"]);
    for key in &files.host_keys {
        cmd.args(["-r", key]);
    }
    match cmd.stdin(Stdio::null()).spawn() {
        Ok(child) => {
            console.raw("[  OK  ] Started dropbear.service - Lightweight SSH server.\n");
            Some(Pid::from_raw(child.id() as i32))
        }
        Err(e) => {
            console.line(&format!("dropbear: cannot start: {e}"));
            None
        }
    }
}

/// Reaps every exited child; reports dropbear's end.
fn reap(sshd: &mut Option<Pid>, console: &Console) {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(status) => {
                if status.pid().is_some() && status.pid() == *sshd {
                    console.line(&format!("dropbear.service: main process ended: {status:?}"));
                    *sshd = None;
                }
            }
        }
    }
}

fn shutdown(console: &Console) -> i32 {
    console.raw("\n[  OK  ] Reached target shutdown.target - System Shutdown.\n");
    let _ = kill(Pid::from_raw(-1), Signal::SIGCONT);
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Err(nix::errno::Errno::ECHILD) => break,
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(20)),
            _ => {}
        }
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    while waitpid(None, None).is_ok() {}
    console.line("reboot: Restarting system");
    0
}

/// The control socket of a VMM without an emulated guest: Ctrl+Alt+Del or the VMM going away
/// end it (status 0, a reboot); pause and resume have nothing to stop. Signals nobody: without
/// a PID namespace of its own, every process of its uid would be hit.
fn without_guest(control: OwnedFd, console: &Console) -> i32 {
    loop {
        let mut fds = [PollFd::new(control.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                console.line(&format!("init: control channel failed: {e}"));
                return 0;
            }
        }
        let message = match read_control(&control) {
            Received::Nothing => continue,
            Received::Gone => return 0,
            Received::Message(m) => m,
        };
        if Control::parse(&message) == Some(Control::CtrlAltDel) {
            console.raw("\nReceived Ctrl+Alt+Del: rebooting\n");
            console.line("reboot: Restarting system");
            return 0;
        }
    }
}

/// What one read of the control socket gave.
enum Received {
    /// Nothing yet (or interrupted).
    Nothing,
    /// The VMM went away (end of file, or the socket failed).
    Gone,
    /// A datagram.
    Message(Vec<u8>),
}

fn read_control(control: &OwnedFd) -> Received {
    let mut buf = [0u8; 64];
    match recv(control.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
        Ok(0) => Received::Gone,
        Ok(n) => Received::Message(buf[..n].to_vec()),
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => Received::Nothing,
        Err(_) => Received::Gone,
    }
}

fn serve(control: OwnedFd, mut sshd: Option<Pid>, console: &Console, ctrl_alt_del_masked: bool) -> i32 {
    loop {
        let fd: BorrowedFd<'_> = control.as_fd();
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        let ready = poll(&mut fds, PollTimeout::from(500u16));
        reap(&mut sshd, console);
        match ready {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => {
                console.line(&format!("init: control channel failed: {e}"));
                return shutdown(console);
            }
        }
        let message = match read_control(&control) {
            Received::Nothing => continue,
            Received::Gone => {
                console.line("init: the VMM went away");
                return shutdown(console);
            }
            Received::Message(m) => m,
        };
        match Control::parse(&message) {
            Some(Control::Pause) => {
                let _ = kill(Pid::from_raw(-1), Signal::SIGSTOP);
            }
            Some(Control::Resume) => {
                let _ = kill(Pid::from_raw(-1), Signal::SIGCONT);
            }
            Some(Control::CtrlAltDel) if ctrl_alt_del_masked => {
                // What systemd says when the unit it would start is masked.
                console.line(
                    "systemd[1]: Failed to enqueue ctrl-alt-del.target job: Unit ctrl-alt-del.target is masked.",
                );
            }
            Some(Control::CtrlAltDel) => {
                console.raw("\nReceived Ctrl+Alt+Del: rebooting\n");
                return shutdown(console);
            }
            Some(Control::Nics) | None => {
                let text = String::from_utf8_lossy(&message);
                console.line(&format!("init: unexpected control message {text:?}"));
            }
        }
    }
}
