//! The VMM, behind the [`Vmm`] trait the daemon is given (like the helper and the process table):
//! start one, send it the VM's configuration, boot it, ask its guest to shut down. Killing a VMM
//! goes through the process table ([`crate::daemon::liveness::kill_and_wait`]), which checks that
//! the PID still serves the VM's socket.
//!
//! [`DirectVmm`] is direct mode: Firecracker (or anything that speaks its API, named by
//! `BANGER_FIRECRACKER`) runs as the user, in a session of its own so it outlives the daemon,
//! with its console on a pipe into a size-capped serial log written by a small relay process
//! (`bangerd serial-relay`), since a guest decides how much it prints. It talks to the VMM
//! through [`FirecrackerClient`].
//!
//! A VMM launched through the jailer (by banger-helper) is not spawned here; the daemon talks to
//! it through its jail's API socket like to any other, and its console, which the jailer's
//! daemonized VMM cannot write to a pipe of ours, goes through `PUT /serial` into a named pipe
//! in the jail that the same relay reads ([`relay_fifo`]).
//!
//! Flow of [`spawn_direct`]: remove a stale API socket (a killed VMM leaves it behind and
//! Firecracker refuses to start on an existing path), start the relay, start the VMM with its
//! stdout and stderr on the relay's pipe, then wait (bounded) until the API socket answers. If the
//! VMM exits first, the error carries the tail of the serial log and, where the log shows a device
//! it could not open, the fix.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::net::UnixStream;
use tokio::process::Child;

use crate::daemon::firecracker::{ApiTimings, FirecrackerClient, FirecrackerError, VmConfig};
use crate::daemon::logs;
use crate::detach::detached_command;

#[cfg(test)]
pub(crate) mod fake;

/// How long a VMM may take to open its API socket.
pub const API_SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the API socket is tried while a VMM starts: Firecracker opens it about 2 ms after
/// it is spawned, so a coarser pause would be most of the wait.
const API_SOCKET_POLL: Duration = Duration::from_millis(1);

/// Why a VMM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The VMM binary is not there.
    #[error(
        "vmm binary {path} not found: install firecracker or point BANGER_FIRECRACKER (or `firecracker` in config.toml) at it"
    )]
    BinaryMissing {
        /// The path looked for.
        path: PathBuf,
    },
    /// A process could not be spawned.
    #[error("cannot start {what} {path}")]
    Spawn {
        /// Which process.
        what: &'static str,
        /// Its binary.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A stale socket could not be removed.
    #[error("cannot remove stale socket {path}")]
    StaleSocket {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The VMM exited before its API answered.
    #[error(
        "vmm exited ({status}) {}{hint}; serial log tail:\n{tail}",
        if *.socket_opened { "after opening its api socket, before it answered" } else { "before opening its api socket" }
    )]
    ExitedEarly {
        /// How it exited.
        status: String,
        /// Whether it had created its API socket (a killed VMM leaves the file behind).
        socket_opened: bool,
        /// A fix, when the log names one.
        hint: String,
        /// The end of its console output.
        tail: String,
    },
    /// A jailed VMM's console pipe could not be relayed.
    #[error("cannot relay the vmm's console from {path}")]
    SerialFifo {
        /// The named pipe.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VMM did not open its API socket in time.
    #[error("vmm did not open its api socket {path} within {secs} s; serial log tail:\n{tail}")]
    SocketTimeout {
        /// The socket.
        path: PathBuf,
        /// The timeout.
        secs: u64,
        /// The end of its console output.
        tail: String,
    },
}

/// A started VMM.
#[derive(Debug)]
pub struct Spawned {
    /// Its pid.
    pub pid: i32,
}

/// What a VMM needs to start.
#[derive(Debug, Clone, Copy)]
pub struct SpawnSpec<'a> {
    /// The VMM binary (absolute).
    pub vmm: &'a Path,
    /// The VM id, passed as `--id`.
    pub id: &'a str,
    /// The API socket path.
    pub api_socket: &'a Path,
    /// The serial log.
    pub serial_log: &'a Path,
    /// The serial log's cap in bytes.
    pub serial_cap: u64,
}

/// Where a VMM's API is: its socket, and for a jailed VMM the jail root the socket is reached
/// below ([`FirecrackerClient::beneath`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Api<'a> {
    /// The API socket (on the host).
    pub socket: &'a Path,
    /// The jail root, for a jailed VMM.
    pub jail_root: Option<&'a Path>,
}

impl<'a> Api<'a> {
    /// The API of the VM's VMM now: its jail's socket, or the VM's own (direct mode).
    pub fn of(vm: &'a crate::model::VmRuntime, handles: &'a crate::model::VmHandles) -> Api<'a> {
        match &handles.jail {
            Some(jail) => Api { socket: &jail.api_socket, jail_root: Some(&jail.root) },
            None => Api { socket: &vm.api_socket, jail_root: None },
        }
    }

    /// A client for it.
    pub fn client(self) -> FirecrackerClient {
        let client = FirecrackerClient::new(self.socket);
        match self.jail_root {
            Some(root) => client.beneath(root),
            None => client,
        }
    }
}

/// What the daemon asks of a VMM. Implemented by [`DirectVmm`]; tests use a recording fake.
pub trait Vmm: Send + Sync {
    /// Starts a VMM serving its API at `spec.api_socket`; returns once the socket answers.
    fn spawn<'a>(&'a self, spec: SpawnSpec<'a>) -> BoxFuture<'a, Result<Spawned, VmmError>>;

    /// Sends the VM's whole pre-boot configuration to the VMM at `api`, in order; returns how
    /// long each request took.
    fn configure<'a>(
        &'a self,
        api: Api<'a>,
        config: &'a VmConfig,
    ) -> BoxFuture<'a, Result<ApiTimings, FirecrackerError>>;

    /// Boots the configured guest (`InstanceStart`).
    fn boot<'a>(&'a self, api: Api<'a>) -> BoxFuture<'a, Result<(), FirecrackerError>>;

    /// Asks the guest to shut down (Ctrl-Alt-Del); the VMM exits when the guest has.
    fn shutdown<'a>(&'a self, api: Api<'a>) -> BoxFuture<'a, Result<(), FirecrackerError>>;

    /// Starts the serial relay on the named pipe a booted VMM writes its console to
    /// (`PUT /serial`), at `in_jail` below the jail root `jail_root`, into `serial_log` capped
    /// at `serial_cap`; it ends when the VMM does.
    fn relay_serial<'a>(
        &'a self,
        jail_root: &'a Path,
        in_jail: &'a str,
        serial_log: &'a Path,
        serial_cap: u64,
    ) -> BoxFuture<'a, Result<(), VmmError>>;
}

/// [`Vmm`] in direct mode: spawned by the daemon as the user (see the module docs).
#[derive(Debug, Clone)]
pub struct DirectVmm {
    /// The serial relay (this daemon's own executable, run as `bangerd serial-relay`).
    relay: PathBuf,
}

impl DirectVmm {
    /// Direct mode, relaying serial consoles through `relay`.
    pub fn new(relay: impl Into<PathBuf>) -> Self {
        Self { relay: relay.into() }
    }
}

impl Vmm for DirectVmm {
    fn spawn<'a>(&'a self, spec: SpawnSpec<'a>) -> BoxFuture<'a, Result<Spawned, VmmError>> {
        spawn_direct(spec, &self.relay).boxed()
    }

    fn configure<'a>(
        &'a self,
        api: Api<'a>,
        config: &'a VmConfig,
    ) -> BoxFuture<'a, Result<ApiTimings, FirecrackerError>> {
        async move { api.client().configure(config).await }.boxed()
    }

    fn boot<'a>(&'a self, api: Api<'a>) -> BoxFuture<'a, Result<(), FirecrackerError>> {
        async move { api.client().instance_start().await }.boxed()
    }

    fn shutdown<'a>(&'a self, api: Api<'a>) -> BoxFuture<'a, Result<(), FirecrackerError>> {
        async move { api.client().send_ctrl_alt_del().await }.boxed()
    }

    fn relay_serial<'a>(
        &'a self,
        jail_root: &'a Path,
        in_jail: &'a str,
        serial_log: &'a Path,
        serial_cap: u64,
    ) -> BoxFuture<'a, Result<(), VmmError>> {
        async move { relay_fifo(&self.relay, jail_root, in_jail, serial_log, serial_cap) }.boxed()
    }
}

/// Starts the relay (`RELAY_EXE serial-relay LOG CAP`) reading the named pipe at `in_jail` below
/// `jail_root`. The pipe is opened without blocking (a pipe with no writer yet would block the
/// open) and must be a FIFO: Firecracker, which opens it read-write at boot, holds the write end,
/// so the relay reads until the VMM exits. Anything else there is refused (a regular file would
/// be read once, to its end). Below the jail root no symbolic link is followed and nothing
/// outside it is reached: the jail's directories belong to its VMM's uid, which could otherwise
/// point the daemon at any file of the user's. The jail root itself (in the helper's directory,
/// which the VMM cannot change) must not be a link.
pub fn relay_fifo(
    relay_exe: &Path,
    jail_root: &Path,
    in_jail: &str,
    serial_log: &Path,
    serial_cap: u64,
) -> Result<(), VmmError> {
    use nix::fcntl::OFlag;
    let fifo = jail_root.join(in_jail.trim_start_matches('/'));
    let err = |source| VmmError::SerialFifo { path: fifo.clone(), source };
    let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
    let file = crate::daemon::beneath::open_beneath(jail_root, Path::new(in_jail), flags).map_err(err)?;
    let file = std::fs::File::from(file);
    let meta = file.metadata().map_err(err)?;
    if !meta.file_type().is_fifo() {
        return Err(err(std::io::Error::other("not a named pipe")));
    }
    // The relay reads blocking.
    let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL).map_err(|e| err(e.into()))?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) - nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(|e| err(e.into()))?;
    let mut relay = detached_command(relay_exe);
    relay
        .arg("serial-relay")
        .arg(serial_log)
        .arg(serial_cap.to_string())
        .stdin(Stdio::from(file))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // Reaped by the runtime once dropped.
    relay.spawn().map(drop).map_err(|source| VmmError::Spawn {
        what: "serial relay",
        path: relay_exe.into(),
        source,
    })
}

/// Hints for errors a VMM prints when the user cannot open a device it needs.
pub fn device_hint(log: &str) -> String {
    let lower = log.to_lowercase();
    let denied = lower.contains("permission denied") || lower.contains("os error 13");
    if denied && lower.contains("kvm") {
        return " (the user cannot open /dev/kvm: add the user to the kvm group or grant an ACL, e.g. `sudo setfacl -m u:$USER:rw /dev/kvm`)".into();
    }
    if denied && (lower.contains("/dev/net/tun") || lower.contains("tap")) {
        return " (the user cannot open /dev/net/tun or the vm's tap: /dev/net/tun must be mode 0666, e.g. `sudo chmod 0666 /dev/net/tun`)".into();
    }
    String::new()
}

/// Removes a socket file a killed VMM left behind (Firecracker refuses to bind an existing path).
/// Callers make sure no live VMM serves it.
pub fn remove_stale_socket(path: &Path) -> Result<(), VmmError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() || m.is_file() => std::fs::remove_file(path)
            .map_err(|source| VmmError::StaleSocket { path: path.to_owned(), source }),
        _ => Ok(()),
    }
}

/// Starts the relay (`RELAY_EXE serial-relay LOG CAP`) and the VMM; returns once the API socket
/// answers.
pub async fn spawn_direct(spec: SpawnSpec<'_>, relay_exe: &Path) -> Result<Spawned, VmmError> {
    if !spec.vmm.is_file() {
        return Err(VmmError::BinaryMissing { path: spec.vmm.to_owned() });
    }
    remove_stale_socket(spec.api_socket)?;
    let mut relay = detached_command(relay_exe);
    relay
        .arg("serial-relay")
        .arg(spec.serial_log)
        .arg(spec.serial_cap.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut relay = relay.spawn().map_err(|source| VmmError::Spawn {
        what: "serial relay",
        path: relay_exe.into(),
        source,
    })?;
    let pipe = relay.stdin.take().expect("stdin was piped");
    let pipe = pipe.into_owned_fd().map_err(|source| VmmError::Spawn {
        what: "serial relay",
        path: relay_exe.into(),
        source,
    })?;
    let pipe2 = pipe.try_clone().map_err(|source| VmmError::Spawn {
        what: "serial relay",
        path: relay_exe.into(),
        source,
    })?;
    let mut vmm = detached_command(spec.vmm);
    vmm.arg("--api-sock").arg(spec.api_socket).arg("--id").arg(spec.id).stdout(pipe).stderr(pipe2);
    let child =
        vmm.spawn().map_err(|source| VmmError::Spawn { what: "vmm", path: spec.vmm.into(), source })?;
    // Our copies of the pipe went into the Command and are closed with it; the relay ends when
    // the VMM does. Both children are reaped by the runtime once dropped.
    drop(vmm);
    drop(relay);
    wait_for_api(child, spec).await
}

/// Waits until the API socket answers, the VMM exits, or [`API_SOCKET_TIMEOUT`] passes. The
/// socket is tried first: a VMM that answered is started even if it exits right after (that is
/// for the caller's next request to find). A VMM that exited is reported with whether it had
/// created its socket (any stale one was removed before it started, so the file is its own).
async fn wait_for_api(mut child: Child, spec: SpawnSpec<'_>) -> Result<Spawned, VmmError> {
    let pid = child.id().map(|p| p as i32).unwrap_or(0);
    let deadline = Instant::now() + API_SOCKET_TIMEOUT;
    loop {
        if UnixStream::connect(spec.api_socket).await.is_ok() {
            return Ok(Spawned { pid });
        }
        if let Ok(Some(status)) = child.try_wait() {
            let socket_opened = std::fs::symlink_metadata(spec.api_socket).is_ok();
            // Give the relay a moment to write what the VMM printed last.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let tail = logs::run_tail(spec.serial_log, 2048).unwrap_or_default();
            return Err(VmmError::ExitedEarly {
                status: status.to_string(),
                socket_opened,
                hint: device_hint(&tail),
                tail,
            });
        }
        if Instant::now() >= deadline {
            let _ = child.start_kill();
            let _ = child.wait().await;
            let tail = logs::run_tail(spec.serial_log, 2048).unwrap_or_default();
            return Err(VmmError::SocketTimeout {
                path: spec.api_socket.to_owned(),
                secs: API_SOCKET_TIMEOUT.as_secs(),
                tail,
            });
        }
        tokio::time::sleep(API_SOCKET_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_name_the_device_and_the_fix() {
        let kvm = device_hint("Error creating KVM object: Permission denied (os error 13)");
        assert!(kvm.contains("/dev/kvm") && kvm.contains("kvm group"), "{kvm}");
        let tun = device_hint(
            "Open tap device failed: Error while creating ifreq structure: Permission denied (os error 13). Invalid TUN/TAP Backend provided by bg123. Check our documentation on setting up the network devices.",
        );
        assert!(tun.contains("/dev/net/tun") && tun.contains("0666"), "{tun}");
        assert_eq!(device_hint("all good"), "");
    }

    #[tokio::test]
    async fn missing_binary_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let spec = SpawnSpec {
            vmm: &dir.path().join("nope"),
            id: "x",
            api_socket: &dir.path().join("api.sock"),
            serial_log: &dir.path().join("serial.log"),
            serial_cap: 1024,
        };
        let e = spawn_direct(spec, Path::new("/bin/cat")).await.unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("BANGER_FIRECRACKER"), "{e}");
    }

    /// Writes an executable shell script.
    fn script(path: &Path, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[tokio::test]
    async fn a_vmm_killed_after_opening_its_socket_is_not_said_to_have_exited_before() {
        let dir = tempfile::tempdir().unwrap();
        // Makes its api socket (`--api-sock PATH` is $2), then is killed before it answers.
        let vmm = dir.path().join("vmm");
        script(&vmm, ": > \"$2\"\nkill -9 $$");
        let relay = dir.path().join("relay");
        script(&relay, "[ \"$1\" = serial-relay ] && cat > \"$2\"");
        let spec = SpawnSpec {
            vmm: &vmm,
            id: "x",
            api_socket: &dir.path().join("api.sock"),
            serial_log: &dir.path().join("serial.log"),
            serial_cap: 1024,
        };
        let e = spawn_direct(spec, &relay).await.unwrap_err();
        assert!(matches!(e, VmmError::ExitedEarly { socket_opened: true, .. }), "{e:?}");
        let e = e.to_string();
        assert!(e.starts_with("vmm exited (signal: 9"), "{e}");
        assert!(e.contains("after opening its api socket") && !e.contains("before opening"), "{e}");
    }

    #[tokio::test]
    async fn a_vmm_that_answers_is_started() {
        let dir = tempfile::tempdir().unwrap();
        let api = dir.path().join("api.sock");
        // Something already serves the socket when the vmm looks: the socket is tried first.
        let vmm = dir.path().join("vmm");
        script(&vmm, "exec sleep 30");
        let relay = dir.path().join("relay");
        script(&relay, "[ \"$1\" = serial-relay ] && cat > \"$2\"");
        let spec = SpawnSpec {
            vmm: &vmm,
            id: "x",
            api_socket: &api,
            serial_log: &dir.path().join("serial.log"),
            serial_cap: 1024,
        };
        let server = tokio::spawn({
            let api = api.clone();
            async move {
                // After spawn_direct removed any stale file.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let l = tokio::net::UnixListener::bind(&api).unwrap();
                loop {
                    let _ = l.accept().await;
                }
            }
        });
        let spawned = spawn_direct(spec, &relay).await.unwrap();
        assert!(spawned.pid > 0);
        server.abort();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(spawned.pid), nix::sys::signal::Signal::SIGKILL)
            .unwrap();
    }

    #[tokio::test]
    async fn a_fifo_console_is_relayed_until_its_writer_closes_and_anything_else_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let relay = dir.path().join("relay");
        script(&relay, "[ \"$1\" = serial-relay ] && cat > \"$2\"");
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("run")).unwrap();
        let fifo = root.join("run/serial");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // The VMM's end, opened as Firecracker opens it at boot (read-write, non-blocking).
        let mut writer = std::fs::OpenOptions::new().read(true).write(true).open(&fifo).unwrap();
        let log = dir.path().join("serial.log");
        relay_fifo(&relay, &root, "/run/serial", &log, 1024).unwrap();
        std::io::Write::write_all(&mut writer, b"Linux version 6.1\n").unwrap();
        drop(writer);
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&log).unwrap_or_default() != "Linux version 6.1\n" {
            assert!(Instant::now() < deadline, "the console did not reach the log");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        std::fs::write(root.join("plain"), "x").unwrap();
        let e = relay_fifo(&relay, &root, "/plain", &log, 1024).unwrap_err().to_string();
        assert!(e.contains("plain"), "{e}");
        let e = relay_fifo(&relay, &root, "/absent", &log, 1024).unwrap_err().to_string();
        assert!(e.contains("absent"), "{e}");
        // A link below the jail root (the jail's uid owns its directories) is not followed,
        // nor is anything outside the root reached.
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        nix::unistd::mkfifo(&outside.join("serial"), nix::sys::stat::Mode::from_bits_truncate(0o600))
            .unwrap();
        std::os::unix::fs::symlink(&outside, root.join("linked")).unwrap();
        std::os::unix::fs::symlink(outside.join("serial"), root.join("serial-link")).unwrap();
        std::os::unix::fs::symlink("../outside/serial", root.join("relative")).unwrap();
        // The jail root itself must not be a link.
        std::os::unix::fs::symlink(&root, dir.path().join("root-link")).unwrap();
        let e = relay_fifo(&relay, &dir.path().join("root-link"), "/run/serial", &log, 1024).unwrap_err();
        assert!(
            matches!(&e, VmmError::SerialFifo { source, .. } if source.raw_os_error() == Some(libc::ENOTDIR)),
            "{e:?}"
        );
        for linked in ["/linked/serial", "/serial-link", "/relative", "/../outside/serial"] {
            let e = relay_fifo(&relay, &root, linked, &log, 1024).unwrap_err();
            assert!(
                matches!(&e, VmmError::SerialFifo { source, .. } if matches!(source.raw_os_error(), Some(libc::ELOOP | libc::EXDEV))),
                "{e:?}"
            );
        }
    }

    #[tokio::test]
    async fn early_exit_reports_the_console_tail() {
        let dir = tempfile::tempdir().unwrap();
        // A "vmm" that prints and exits; the relay is a shell loop copying stdin to the log.
        let vmm = dir.path().join("vmm");
        std::fs::write(
            &vmm,
            "#!/bin/sh\necho 'Error creating KVM object: Permission denied (os error 13)'\nexit 1\n",
        )
        .unwrap();
        let relay = dir.path().join("relay");
        std::fs::write(&relay, "#!/bin/sh\n[ \"$1\" = serial-relay ] && cat > \"$2\"\n").unwrap();
        for p in [&vmm, &relay] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let log = dir.path().join("serial.log");
        let spec = SpawnSpec {
            vmm: &vmm,
            id: "x",
            api_socket: &dir.path().join("api.sock"),
            serial_log: &log,
            serial_cap: 1024,
        };
        // The previous run's console (kept by the start as `serial.log.1`) is not this run's.
        std::fs::write(logs::rotated_path(&log), "an earlier run\n").unwrap();
        let e = spawn_direct(spec, &relay).await.unwrap_err().to_string();
        assert!(e.contains("exited") && e.contains("KVM object") && e.contains("kvm group"), "{e}");
        assert!(!e.contains("earlier run"), "{e}");
        assert!(e.contains("before opening its api socket"), "{e}");
    }
}
