//! The few process-level system calls the guest emulation needs that have no safe wrapper:
//! placing descriptors at fixed numbers in a child before `exec`, forking the guest's PID 1, and
//! taking ownership of descriptors received with `SCM_RIGHTS`.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use nix::unistd::{ForkResult, Pid};
use tokio::io::unix::AsyncFd;

/// Arranges for the child of `cmd` to get `fds[i].0` at descriptor number `fds[i].1` (without
/// close-on-exec) and to be killed with SIGKILL when the thread that spawned it dies.
///
/// The spawning thread must live as long as the child should (the double spawns from its main
/// thread, which lives for the whole process).
pub fn child_fds_and_death_signal(cmd: &mut tokio::process::Command, fds: Vec<(RawFd, RawFd)>) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe functions
    // (fcntl, dup2, prctl, getppid) on descriptors that stay open in the parent until spawn
    // returns; it allocates nothing (the Vec is moved in and only read).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            // First move every source above the targets, so a later source is never
            // overwritten by an earlier target.
            let mut moved = [0 as RawFd; 8];
            for (i, (src, _)) in fds.iter().enumerate().take(moved.len()) {
                let fd = libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, 64);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                moved[i] = fd;
            }
            for (i, (_, dst)) in fds.iter().enumerate().take(moved.len()) {
                if libc::dup2(moved[i], *dst) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Forks the calling process. Only for the guest init, which is single-threaded when it forks.
pub fn fork_single_threaded() -> nix::Result<Option<Pid>> {
    // SAFETY: the guest init calls this before it has started any thread, so the child is a
    // complete copy with no lock held by a vanished thread.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Parent { child } => Ok(Some(child)),
        ForkResult::Child => Ok(None),
    }
}

/// Takes ownership of descriptors just received with `SCM_RIGHTS`.
pub fn own_received(fds: Vec<RawFd>) -> Vec<OwnedFd> {
    fds.into_iter()
        // SAFETY: the kernel installed these descriptors in our table for this message only;
        // nothing else refers to them.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect()
}

/// The control socket the VMM placed at descriptor 3 before exec.
pub fn inherited_control_fd() -> OwnedFd {
    // SAFETY: the double put the guest's end of the control socket at descriptor 3 (see
    // `child_fds_and_death_signal`) and nothing in this process has claimed it.
    unsafe { OwnedFd::from_raw_fd(super::CONTROL_FD) }
}

/// Registers an owned descriptor with the tokio reactor.
pub fn async_fd(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd keeps its descriptor open, and always returns the same one, until it is
    // dropped, which only happens when the AsyncFd is dropped.
    Ok(unsafe { AsyncFd::register(fd) }?)
}
