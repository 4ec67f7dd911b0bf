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
use message::{Answer, Failure, Order};

/// The name the launcher runs under (`/proc/<pid>/comm`).
pub const NAME: &str = "banger-launcher";

/// Why the launcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    /// The policy's `[jailer]` cannot be used.
    #[error(transparent)]
    Setup(#[from] JailSetupError),
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
    let _ = nix::sys::prctl::set_name(c"banger-launcher");
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
    match serve(config, channel.as_fd()) {
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

/// Serves orders on `channel` until the helper closes it.
pub fn serve(config: &JailConfig, channel: BorrowedFd<'_>) -> Result<(), ConversationError> {
    loop {
        let (order, fds) = match frame::recv_blocking::<Order>(channel) {
            Ok(got) => got,
            Err(FrameError::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        order.check(fds.len())?;
        let answer = answer(config, order, fds);
        frame::send_blocking(channel, &answer, &[])?;
    }
}

/// Carries out one checked order.
fn answer(config: &JailConfig, order: Order, fds: Vec<OwnedFd>) -> Answer {
    match order {
        Order::Launch(o) => match jail::launch(config, &o.to_order(), fds) {
            Ok(pid) => Answer::Launched(pid),
            Err(e) => Answer::Failed(Failure::from(e)),
        },
        Order::Remove { id, uid, pid } => match jail::remove(config, &id, uid, pid) {
            Ok(()) => Answer::Removed,
            Err(e) => Answer::Failed(Failure::from(e)),
        },
        Order::List => match jail::list(config) {
            Ok(jails) => Answer::listed(jails),
            Err(e) => Answer::Failed(Failure::from(e)),
        },
    }
}
