//! The emulated guest that `InstanceStart` boots.
//!
//! The double runs unprivileged, as Firecracker does in direct mode or in a jail. At
//! `InstanceStart` it re-executes itself (`/proc/self/exe --firecracker-double-guest`, or the path
//! it was started by in a jail, which has no `/proc`) as the guest's "kernel":
//!
//! 1. The child gets the guest description as JSON on stdin, a control socket at fd 3 and the
//!    root drive's file (opened by the VMM at `PUT /drives`) at fd 4, and dies with the double
//!    (`PR_SET_PDEATHSIG`).
//! 2. It unshares user, network, UTS, IPC, mount and PID namespaces, maps its uid and gid to 0,
//!    and forks the guest's PID 1 ([`init`]). Killing the double, even with SIGKILL, kills the
//!    child, whose death kills PID 1, whose death kills everything in the PID namespace.
//! 3. PID 1 sets up the guest (see [`init`]): its own `ethN` TAPs, `ip=` from the command line,
//!    host name, files from the root drive, and dropbear on port 22. It sends the `ethN`
//!    descriptors back over the control socket.
//! 4. The double copies frames between each host TAP and the matching `ethN` ([`relay`]),
//!    answers the vsock socket as a guest with no vsock listeners would, and forwards pause,
//!    resume and Ctrl+Alt+Del to PID 1 over the control socket.
//!
//! When the guest ends (Ctrl+Alt+Del reboots it; `reboot=k` makes a Firecracker guest's reboot
//! end the VMM), the double exits 0, as Firecracker does.

pub mod init;
mod netconf;
mod relay;
mod rootfs;
mod sys;

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt as _;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, recvmsg, send, socketpair};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::logger::{Level, Logger};
use super::tap;
use super::vm::{GuestLauncher, GuestSpec, RunningGuest};

/// Hidden command-line flag that turns the binary into the guest's kernel.
pub const GUEST_MODE_FLAG: &str = "--firecracker-double-guest";
/// Where the guest finds its control socket.
const CONTROL_FD: RawFd = 3;
/// Where the guest finds its root drive.
const ROOT_DRIVE_FD: RawFd = 4;
/// Most NICs a guest may have (descriptors sent in one message).
const MAX_NICS: usize = 8;

/// The guest description sent on the guest's stdin.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestConfig {
    /// Firecracker instance id.
    pub instance_id: String,
    /// vCPUs.
    pub vcpu_count: u8,
    /// Memory in MiB.
    pub mem_size_mib: usize,
    /// The full kernel command line.
    pub cmdline: String,
    /// Drives in guest order (vda, vdb, ...).
    pub drives: Vec<DriveInfo>,
    /// Whether drive 0 is the root device and is passed at fd 4.
    pub root_drive: bool,
    /// Network interfaces in guest order (eth0, eth1, ...).
    pub nics: Vec<NicInfo>,
}

/// One drive as the guest sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DriveInfo {
    /// Drive id from the API.
    pub id: String,
    /// Size in bytes.
    pub size: u64,
    /// Read-only.
    pub read_only: bool,
}

/// One NIC as the guest sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NicInfo {
    /// Guest interface name (`ethN`).
    pub name: String,
    /// MAC set by `guest_mac`.
    pub mac: Option<String>,
    /// MTU set by `mtu`.
    pub mtu: Option<u16>,
}

/// Messages on the control socket (one datagram each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    /// Guest to VMM: the `ethN` descriptors, in order, ride along.
    Nics,
    /// VMM to guest: stop every guest process.
    Pause,
    /// VMM to guest: continue them.
    Resume,
    /// VMM to guest: Ctrl+Alt+Del.
    CtrlAltDel,
}

impl Control {
    fn as_bytes(self) -> &'static [u8] {
        match self {
            Control::Nics => b"nics",
            Control::Pause => b"pause",
            Control::Resume => b"resume",
            Control::CtrlAltDel => b"ctrl-alt-del",
        }
    }

    fn parse(b: &[u8]) -> Option<Control> {
        [Control::Nics, Control::Pause, Control::Resume, Control::CtrlAltDel]
            .into_iter()
            .find(|c| c.as_bytes() == b)
    }
}

/// Boots guests as processes in fresh namespaces (see the module documentation).
#[derive(Debug)]
pub struct LinuxLauncher {
    exit: mpsc::UnboundedSender<()>,
    logger: Arc<Mutex<Logger>>,
}

impl LinuxLauncher {
    /// A launcher that signals `exit` when the guest has ended.
    pub fn new(exit: mpsc::UnboundedSender<()>, logger: Arc<Mutex<Logger>>) -> Self {
        LinuxLauncher { exit, logger }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct LinuxGuest {
    control: Arc<AsyncFd<OwnedFd>>,
    paused: watch::Sender<bool>,
}

impl LinuxGuest {
    fn send(&self, c: Control) -> io::Result<()> {
        send(self.control.get_ref().as_raw_fd(), c.as_bytes(), MsgFlags::empty()).map_err(io::Error::from)?;
        Ok(())
    }
}

impl RunningGuest for LinuxGuest {
    fn pause(&mut self) -> io::Result<()> {
        self.paused.send_replace(true);
        self.send(Control::Pause)
    }

    fn resume(&mut self) -> io::Result<()> {
        self.send(Control::Resume)?;
        self.paused.send_replace(false);
        Ok(())
    }

    fn ctrl_alt_del(&mut self) -> io::Result<()> {
        self.send(Control::CtrlAltDel)
    }
}

fn config_for(spec: &GuestSpec<'_>) -> io::Result<GuestConfig> {
    let drives = spec
        .drives
        .iter()
        .map(|d| {
            Ok(DriveInfo {
                id: d.config.drive_id.clone(),
                size: d.file.metadata()?.len(),
                read_only: d.read_only(),
            })
        })
        .collect::<io::Result<Vec<_>>>()?;
    let nics = spec
        .nets
        .iter()
        .enumerate()
        .map(|(i, n)| NicInfo {
            name: format!("eth{i}"),
            mac: n.config.guest_mac.map(|m| m.to_string()),
            mtu: n.config.mtu,
        })
        .collect();
    Ok(GuestConfig {
        instance_id: spec.instance_id.to_string(),
        vcpu_count: spec.machine.vcpu_count,
        mem_size_mib: spec.machine.mem_size_mib,
        cmdline: spec.cmdline.clone(),
        drives,
        root_drive: spec.drives.first().is_some_and(|d| d.config.is_root_device),
        nics,
    })
}

/// Receives the guest's `ethN` descriptors and starts one relay per NIC.
async fn connect_nics(
    control: Arc<AsyncFd<OwnedFd>>,
    host_taps: Vec<OwnedFd>,
    paused: watch::Receiver<bool>,
    logger: Arc<Mutex<Logger>>,
) {
    loop {
        let Ok(mut guard) = control.readable().await else { return };
        let mut buf = [0u8; 64];
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_NICS]);
        let received = guard.try_io(|fd| {
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(
                fd.get_ref().as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(io::Error::from)?;
            let mut fds = Vec::new();
            for c in msg.cmsgs().map_err(io::Error::from)? {
                if let nix::sys::socket::ControlMessageOwned::ScmRights(r) = c {
                    fds.extend(r);
                }
            }
            Ok((msg.bytes, sys::own_received(fds)))
        });
        let (n, guest_taps) = match received {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => return,
            Err(_would_block) => continue,
        };
        if n == 0 {
            return;
        }
        if Control::parse(&buf[..n]) != Some(Control::Nics) {
            continue;
        }
        for (host, guest) in host_taps.into_iter().zip(guest_taps) {
            if let Err(e) = relay::start(host, guest, paused.clone()) {
                lock(&logger).log(Level::Error, "fc_vmm", &format!("Cannot start the network device: {e}"));
            }
        }
        return;
    }
}

/// The host side of hybrid vsock for a guest with no vsock listeners: the `CONNECT <port>` line
/// is read and the connection closed, as Firecracker does when the guest resets it.
async fn vsock_without_listeners(listener: tokio::net::UnixListener) {
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut line = [0u8; 32];
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut line)).await;
        });
    }
}

/// The double's own executable: `/proc/self/exe`, or in a jail (no `/proc`) the path it was
/// started by (the jailer execs `/<exec file name>`).
fn own_executable() -> std::path::PathBuf {
    let proc_exe = std::path::Path::new("/proc/self/exe");
    if proc_exe.exists() {
        return proc_exe.to_path_buf();
    }
    std::env::args_os().next().map(Into::into).unwrap_or_else(|| proc_exe.to_path_buf())
}

impl GuestLauncher for LinuxLauncher {
    fn launch(&mut self, spec: GuestSpec<'_>) -> Result<Box<dyn RunningGuest>, String> {
        self.launch_inner(spec).map_err(|e| format!("cannot start the emulated guest: {e}"))
    }
}

impl LinuxLauncher {
    fn launch_inner(&mut self, spec: GuestSpec<'_>) -> io::Result<Box<dyn RunningGuest>> {
        if spec.nets.len() > MAX_NICS {
            return Err(io::Error::other(format!(
                "the double emulates at most {MAX_NICS} network interfaces"
            )));
        }
        let config = serde_json::to_vec(&config_for(&spec)?)?;
        let host_taps = spec.nets.iter().map(|n| n.tap.try_clone()).collect::<io::Result<Vec<_>>>()?;
        for t in &host_taps {
            // The emulated guest driver acks no offload feature.
            tap::set_offload(t, 0).map_err(io::Error::other)?;
        }
        let vsock = spec.vsock.map(|v| v.listener.try_clone()).transpose()?;
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .map_err(io::Error::from)?;
        let root = spec
            .drives
            .first()
            .filter(|d| d.config.is_root_device)
            .map(|d| d.file.try_clone())
            .transpose()?;

        let mut cmd = tokio::process::Command::new(own_executable());
        cmd.as_std_mut().arg0("firecracker-double-guest");
        let console = match spec.serial.as_ref().map(File::try_clone).transpose()? {
            Some(serial) => Stdio::from(serial),
            None => Stdio::inherit(),
        };
        cmd.arg(GUEST_MODE_FLAG).stdin(Stdio::piped()).stdout(console).stderr(Stdio::inherit());
        let mut fds = vec![(theirs.as_raw_fd(), CONTROL_FD)];
        if let Some(root) = &root {
            fds.push((root.as_raw_fd(), ROOT_DRIVE_FD));
        }
        sys::child_fds_and_death_signal(&mut cmd, fds);
        let mut child = cmd.spawn()?;
        drop(theirs);
        drop(root);

        let mut stdin = child.stdin.take().ok_or_else(|| io::Error::other("guest stdin missing"))?;
        tokio::spawn(async move {
            let _ = stdin.write_all(&config).await;
        });
        let control = Arc::new(sys::async_fd(ours)?);
        let (paused_tx, paused_rx) = watch::channel(false);
        tokio::spawn(connect_nics(control.clone(), host_taps, paused_rx, self.logger.clone()));
        if let Some(listener) = vsock {
            listener.set_nonblocking(true)?;
            tokio::spawn(vsock_without_listeners(tokio::net::UnixListener::from_std(listener)?));
        }
        let exit = self.exit.clone();
        let logger = self.logger.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            lock(&logger).log(Level::Info, "fc_vmm", &format!("Guest ended ({status:?}). Vmm is stopping."));
            let _ = exit.send(());
        });
        Ok(Box::new(LinuxGuest { control, paused: paused_tx }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_round_trip() {
        for c in [Control::Nics, Control::Pause, Control::Resume, Control::CtrlAltDel] {
            assert_eq!(Control::parse(c.as_bytes()), Some(c));
        }
        assert_eq!(Control::parse(b"reboot"), None);
    }
}
