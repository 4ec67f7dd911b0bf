//! The launcher: a root process forked by `serve` before the helper confines itself, which
//! builds jails and starts Firecracker's jailer in them for the helper.
//!
//! Landlock and seccomp are inherited across `exec`, so a jailer started by the confined helper
//! would run (and exec Firecracker) under the helper's rules, without the capabilities and system
//! calls a jail needs. The launcher is forked instead while the helper is still single-threaded,
//! with the policy's `[jailer]` read and its [`JailConfig`] made, joined to the helper by a
//! socketpair; then it confines itself ([`confine`]) to what a launch needs, and serves the
//! helper's orders ([`message`]) one at a time, each through the jail functions
//! ([`crate::jail`]). Only the helper's end of the socketpair reaches it: nothing a client sends
//! passes to it unparsed, every value of an order is the helper's (derived or the policy's), and
//! the launcher checks each again. A message that does not decode or check, or the helper's end
//! closing, ends the launcher; it also dies with the helper (`PR_SET_PDEATHSIG`).

pub mod confine;
pub mod message;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use banger_policy::Jailer;
use banger_protocol::frame::{self, FrameError};
use nix::unistd::{ForkResult, Pid};

use crate::jail::{self, JailConfig, JailSetupError};
use crate::kernel::{JailOrder, JailState, KResult, KernelError};
use message::{Answer, Failure, Order};

/// The open-file limit (soft and hard) Firecracker's jailer sets before it execs the VMM: only
/// lowering a hard limit needs no capability.
pub const JAILER_NOFILE: u64 = 2048;

/// The name the launcher runs under (`/proc/<pid>/comm`).
pub const NAME: &std::ffi::CStr = c"banger-launcher";

/// Why the launcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    /// The policy's `[jailer]` cannot be used.
    #[error(transparent)]
    Setup(#[from] JailSetupError),
    /// The hard open-file limit is below what the jailer sets.
    #[error(
        "the hard open-file limit is {0}, below the {JAILER_NOFILE} the jailer sets for each VMM (the launcher keeps no CAP_SYS_RESOURCE to raise it): raise it (LimitNOFILE= in the unit, or ulimit -Hn)"
    )]
    NoFile(u64),
    /// No socketpair or no fork.
    #[error("cannot start the jail launcher: {what}")]
    Start {
        /// The step.
        what: &'static str,
        /// Why.
        #[source]
        source: nix::errno::Errno,
    },
}

/// The helper's side of a running launcher.
#[derive(Debug)]
pub struct Launcher {
    /// The helper's end of the socketpair.
    pub channel: UnixStream,
    /// The launcher's PID.
    pub pid: Pid,
    /// The jail configuration (the helper's copy: host paths of jails).
    pub config: JailConfig,
}

/// Starts the launcher for the policy's `[jailer]`. Must run while the process is
/// single-threaded (before the runtime starts), before the helper confines itself; `close` are
/// descriptors the helper holds that the launcher must not (systemd's socket).
pub fn start(policy: &Jailer, close: &[BorrowedFd<'_>]) -> Result<Launcher, LauncherError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_err(|source| LauncherError::Start { what: "getrlimit", source })?;
    if hard < JAILER_NOFILE {
        return Err(LauncherError::NoFile(hard));
    }
    let config = JailConfig::new(policy)?;
    let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC)
        .map_err(|source| LauncherError::Start { what: "socketpair", source })?;
    let helper = nix::unistd::getpid();
    let close: Vec<i32> = close.iter().map(AsRawFd::as_raw_fd).chain([ours.as_raw_fd()]).collect();
    // SAFETY: the process is single-threaded (the caller's contract), so the child holds no lock
    // another thread took; it never returns into the caller and leaves with _exit.
    match unsafe { nix::unistd::fork() }.map_err(|source| LauncherError::Start { what: "fork", source })? {
        ForkResult::Child => {
            for fd in close {
                // SAFETY: descriptors the helper holds that the launcher never uses; nothing in
                // this process reads them after this point.
                unsafe { libc::close(fd) };
            }
            let code = run(helper, &config, theirs);
            // SAFETY: leaving the launcher without running the helper's destructors.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop(theirs);
            Ok(Launcher { channel: UnixStream::from(ours), pid: child, config })
        }
    }
}

/// The launcher's life: confine, then serve until the helper's end closes. Returns the exit code.
fn run(helper: Pid, config: &JailConfig, channel: OwnedFd) -> i32 {
    let _ = nix::sys::prctl::set_name(NAME);
    if let Err(e) = confine::die_with(helper) {
        tracing::error!("jail launcher: {e}");
        return 1;
    }
    match confine::confine() {
        Ok(c) => tracing::info!(
            "jail launcher {} confined: capabilities {:?}; landlock {}; seccomp denies {} system calls",
            nix::unistd::getpid(),
            confine::KEPT.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            c.landlock,
            c.denied
        ),
        Err(e) => {
            tracing::error!("jail launcher: {e}");
            return 1;
        }
    }
    match serve(&JailFunctions(config), channel.as_fd()) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(
                "jail launcher: {e}; it ends, and the helper makes no more jails until restarted"
            );
            2
        }
    }
}

/// Why the launcher's conversation ended other than by the helper closing its end.
#[derive(Debug, thiserror::Error)]
pub enum ConversationError {
    /// A frame could not be read or written, or did not decode.
    #[error("the channel to the helper failed")]
    Frame(#[from] FrameError),
    /// An order decoded but does not check.
    #[error("refused an order")]
    Malformed(#[from] message::Malformed),
}

/// What carries out the launcher's orders: the jail functions ([`JailFunctions`]), or in the
/// channel's tests a recording double.
pub trait Backend {
    /// [`crate::jail::launch`].
    fn launch(&self, order: &JailOrder, fds: Vec<OwnedFd>) -> KResult<i32>;
    /// [`crate::jail::remove`].
    fn remove(&self, id: &str, uid: u32, pid: Option<i32>) -> KResult<()>;
    /// [`crate::jail::list`].
    fn list(&self) -> KResult<Vec<JailState>>;
}

/// The jail functions, with the policy's configuration.
#[derive(Debug)]
pub struct JailFunctions<'a>(pub &'a JailConfig);

impl Backend for JailFunctions<'_> {
    fn launch(&self, order: &JailOrder, fds: Vec<OwnedFd>) -> KResult<i32> {
        jail::launch(self.0, order, fds)
    }
    fn remove(&self, id: &str, uid: u32, pid: Option<i32>) -> KResult<()> {
        jail::remove(self.0, id, uid, pid)
    }
    fn list(&self) -> KResult<Vec<JailState>> {
        jail::list(self.0)
    }
}

/// Serves orders on `channel` until the helper closes it.
pub fn serve(backend: &impl Backend, channel: BorrowedFd<'_>) -> Result<(), ConversationError> {
    loop {
        let (order, fds) = match frame::recv_blocking::<Order>(channel) {
            Ok(got) => got,
            Err(FrameError::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        order.check(fds.len())?;
        let answer = answer(backend, order, fds);
        frame::send_blocking(channel, &answer, &[])?;
    }
}

/// Carries out one checked order.
fn answer(backend: &impl Backend, order: Order, fds: Vec<OwnedFd>) -> Answer {
    let failed = |e: KernelError| Answer::Failed(Failure::from(e));
    match order {
        Order::Launch(o) => backend.launch(&o, fds).map_or_else(failed, Answer::Launched),
        Order::Remove { id, uid, pid } => {
            backend.remove(&id, uid, pid).map_or_else(failed, |()| Answer::Removed)
        }
        Order::List => backend.list().map_or_else(failed, Answer::listed),
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::path::{Path, PathBuf};

    use banger_policy::{CgroupVersion, JailerMode};
    use nix::sys::signal::Signal;
    use nix::sys::wait::{WaitStatus, waitpid};

    use super::*;

    fn root_or_skip(what: &str) -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        assert!(std::env::var_os("CI").is_none_or(|v| v != "true"), "{what} needs root under CI=true");
        eprintln!("SKIPPED {what}: needs root");
        false
    }

    fn policy(base: &Path) -> Jailer {
        Jailer {
            // Root's binaries, one statically linked; no jail is launched here.
            jailer: PathBuf::from("/usr/bin/true"),
            firecracker: PathBuf::from("/usr/sbin/ldconfig"),
            chroot_base: base.to_owned(),
            uids: (900_000, 900_999),
            cgroup: CgroupVersion::V1,
            cgroup_parent: "banger".to_owned(),
            mode: JailerMode::Allow,
        }
    }

    fn status(pid: Pid) -> String {
        std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default()
    }

    /// Waits (bounded) for the launcher to end; kills it and fails after 10 s.
    fn wait_exit(pid: Pid) -> WaitStatus {
        use nix::sys::wait::WaitPidFlag;
        for _ in 0..1000 {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)).unwrap() {
                WaitStatus::StillAlive => std::thread::sleep(std::time::Duration::from_millis(10)),
                done => return done,
            }
        }
        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        let _ = waitpid(pid, None);
        panic!("the launcher {pid} did not end");
    }

    /// Waits (bounded) until the launcher's status shows it confined.
    fn wait_confined(pid: Pid) -> String {
        for _ in 0..200 {
            let s = status(pid);
            if s.contains("NoNewPrivs:\t1") && s.lines().any(|l| l.starts_with("Seccomp_filters:\t2")) {
                return s;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("the launcher {pid} never confined itself: {}", status(pid));
    }

    /// The real launcher process, as root: its name, capabilities (exactly [`confine::KEPT`],
    /// the bounding set too), no new privileges, both seccomp filters, none of the helper's
    /// descriptors; it ends cleanly when the helper's end closes, and at once on a malformed
    /// order.
    #[test]
    #[ignore = "needs root: forks the real launcher, which keeps root's capabilities for the jailer"]
    fn the_launcher_runs_confined_and_ends_with_its_channel() {
        if !root_or_skip("the_launcher_runs_confined_and_ends_with_its_channel") {
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let secret = std::fs::File::open("/etc/hostname").unwrap();
        let launcher = start(&policy(base.path()), &[secret.as_fd()]).unwrap();
        let pid = launcher.pid;
        let s = wait_confined(pid);
        let field =
            |k: &str| s.lines().find_map(|l| l.strip_prefix(k)).map(str::trim).unwrap_or("").to_owned();
        assert_eq!(field("Name:"), NAME.to_str().unwrap());
        let kept = format!("{:016x}", confine::kept_bits());
        for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
            assert_eq!(field(set), kept, "{set}");
        }
        assert_eq!(field("CapInh:"), "0000000000000000");
        assert_eq!(field("CapAmb:"), "0000000000000000");
        assert_eq!(field("Seccomp:"), "2");
        let targets: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
            .collect();
        assert!(
            !targets.iter().any(|t| t == Path::new("/etc/hostname")),
            "the helper's descriptor leaked: {targets:?}"
        );
        drop(launcher.channel);
        assert_eq!(wait_exit(pid), WaitStatus::Exited(pid, 0));

        let launcher = start(&policy(base.path()), &[]).unwrap();
        frame::write_frame_blocking(launcher.channel.as_fd(), &[0xff; 7], &[]).unwrap();
        assert_eq!(wait_exit(launcher.pid), WaitStatus::Exited(launcher.pid, 2));
    }

    /// The launcher dies with the process that forked it (`PR_SET_PDEATHSIG` follows the forking
    /// thread, which in the helper is its main thread): here a thread that starts it and ends.
    #[test]
    #[ignore = "needs root: forks the real launcher, which keeps root's capabilities for the jailer"]
    fn the_launcher_dies_with_the_helper() {
        if !root_or_skip("the_launcher_dies_with_the_helper") {
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let jailer = policy(base.path());
        // The thread ends once the launcher is confined: its parent-death signal is set by then.
        let launcher = std::thread::spawn(move || {
            let launcher = start(&jailer, &[]).unwrap();
            wait_confined(launcher.pid);
            launcher
        })
        .join()
        .unwrap();
        let pid = launcher.pid;
        assert_eq!(wait_exit(pid), WaitStatus::Signaled(pid, Signal::SIGKILL, false));
        drop(launcher);
    }
}
