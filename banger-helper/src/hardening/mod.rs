//! The helper sanitises and confines itself before it serves anyone, in this order:
//!
//! 1. [`close_inherited_fds`]: every descriptor beyond stdio (and systemd's socket) is closed;
//! 2. [`clear_environment`]: the environment is emptied but for a fixed `PATH` and `LC_ALL=C`;
//! 3. `umask 077`;
//! 4. [`raise_nofile`]: the soft descriptor limit is raised to the hard one, so the connection caps
//!    (not the kernel's default soft limit of 1024) bound how many descriptors clients can make
//!    the helper hold;
//! 5. then, in [`lock_down`], after everything that needs broader access was opened (and
//!    device-mapper looked for): no new privileges, every capability but the few the operations
//!    need dropped ([`caps`]; those of device-mapper only where it was found), the filesystem
//!    confined with landlock ([`landlock`]), and the system calls with a seccomp allowlist
//!    ([`seccomp`]).
//!
//! Landlock and seccomp apply to the calling thread and every thread and child made after, so
//! [`lock_down`] runs before the tokio runtime starts; the iptables tools the helper runs inherit
//! all of it.

use std::os::fd::RawFd;
use std::path::PathBuf;

pub mod caps;
pub mod landlock;
pub mod seccomp;

use crate::kernel::linux::iptables::SAFE_PATH;

/// Why the helper could not confine itself.
#[derive(Debug, thiserror::Error)]
pub enum HardeningError {
    /// `PR_SET_NO_NEW_PRIVS` failed.
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] nix::errno::Errno),
    /// Capabilities could not be dropped.
    #[error("cannot drop capabilities")]
    Caps(#[source] ::caps::errors::CapsError),
    /// Landlock failed (not merely unsupported).
    #[error("cannot apply the landlock ruleset")]
    Landlock(#[source] ::landlock::RulesetError),
    /// Seccomp failed.
    #[error("cannot install the seccomp filter")]
    Seccomp(#[source] ::seccompiler::Error),
    /// The descriptor limit could not be read or raised.
    #[error("cannot raise the open-file limit (RLIMIT_NOFILE) to its hard limit")]
    NoFile(#[source] nix::errno::Errno),
}

/// Closes every inherited descriptor above stderr, except `keep` (systemd's socket).
pub fn close_inherited_fds(keep: Option<RawFd>) {
    let first = match keep {
        Some(3) => 4,
        _ => 3,
    };
    // SAFETY: close_range only closes descriptors; none above stderr is owned by anything yet
    // (start-up is single-threaded and nothing was opened before), except `keep`, which is below
    // `first`.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first as libc::c_uint, libc::c_uint::MAX, 0) };
    if rc != 0 {
        for fd in first..1024 {
            // SAFETY: as above; closing a descriptor that is not open is harmless (EBADF).
            unsafe { libc::close(fd) };
        }
    }
}

/// Empties the environment but for a fixed `PATH` and `LC_ALL=C`.
pub fn clear_environment() {
    let keys: Vec<_> = std::env::vars_os().map(|(k, _)| k).collect();
    for k in keys {
        // SAFETY: start-up is single-threaded; nothing reads the environment concurrently.
        unsafe { std::env::remove_var(k) };
    }
    // SAFETY: as above.
    unsafe {
        std::env::set_var("PATH", SAFE_PATH);
        std::env::set_var("LC_ALL", "C");
    }
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new limit.
pub fn raise_nofile() -> Result<u64, HardeningError> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(HardeningError::NoFile)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(HardeningError::NoFile)?;
    }
    Ok(hard.max(soft))
}

/// What the confined helper still reaches, besides the system's libraries and tools.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// The state directory (read-write).
    pub state_dir: PathBuf,
    /// The legacy iptables lock file, if the legacy backend is in use (read-write).
    pub xtables_lock: Option<PathBuf>,
    /// The dm node directory, where device-mapper was found (block nodes made and removed there);
    /// `None` keeps the capabilities and system calls of device-mapper dropped too.
    pub node_dir: Option<PathBuf>,
}

/// How far the confinement went (landlock depends on the kernel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockDownReport {
    /// The capabilities kept.
    pub kept: Vec<String>,
    /// Landlock's status: fully, partially or not enforced.
    pub landlock: String,
    /// How many system calls the seccomp filter allows.
    pub seccomp_syscalls: usize,
}

/// Confines the process: no new privileges, capabilities, landlock, seccomp — in that order.
/// Must run while the process is single-threaded.
pub fn lock_down(sandbox: &Sandbox) -> Result<LockDownReport, HardeningError> {
    let device_mapper = sandbox.node_dir.is_some();
    nix::sys::prctl::set_no_new_privs().map_err(HardeningError::NoNewPrivs)?;
    let kept = caps::drop_unneeded(device_mapper).map_err(HardeningError::Caps)?;
    let landlock = landlock::restrict(sandbox)?;
    let seccomp_syscalls = seccomp::install(device_mapper).map_err(HardeningError::Seccomp)?;
    Ok(LockDownReport { kept, landlock, seccomp_syscalls })
}

/// Helpers of the confinement tests.
#[cfg(test)]
pub(crate) mod testing {
    /// Runs `check` in a forked child, where confining the process leaves the test harness alone,
    /// and asserts the child exited 0: `check` returns `Err(code)` to say which of its steps failed.
    pub(crate) fn in_forked_child(check: impl FnOnce() -> Result<(), i32>) {
        use nix::sys::wait::{WaitStatus, waitpid};
        use nix::unistd::{ForkResult, fork};
        // SAFETY: the child only runs `check` (system calls, a thread or a program at most) and
        // leaves with _exit.
        match unsafe { fork() }.unwrap() {
            ForkResult::Child => {
                let code = check().err().unwrap_or(0);
                // SAFETY: leaving the child without running the test harness's destructors.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => {
                let status = waitpid(child, None).unwrap();
                assert_eq!(status, WaitStatus::Exited(child, 0), "see the codes in the child");
            }
        }
    }
}
