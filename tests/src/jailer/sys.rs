//! The jailer's system calls that have no safe wrapper: closing descriptors by range, forking,
//! and changing the environment (unsafe since edition 2024 because of threads).

use std::io;

use nix::unistd::{ForkResult, Pid};

/// Closes every descriptor from 3 up (`close_range(3, ~0, CLOSE_RANGE_UNSHARE)`).
pub fn close_from_3() -> io::Result<()> {
    // SAFETY: close_range takes plain integers and touches only this process's descriptor table;
    // nothing in the jailer holds a descriptor above 2 when it is called (it is the first step).
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_UNSHARE) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Removes one environment variable.
pub fn remove_env_var(name: &str) {
    // SAFETY: the jailer never starts a thread, so nothing reads the environment concurrently.
    unsafe { std::env::remove_var(name) }
}

/// Forks; `Some(child)` in the parent, `None` in the child.
pub fn fork_single_threaded() -> nix::Result<Option<Pid>> {
    // SAFETY: the jailer never starts a thread, so the child is a complete copy with no lock
    // held by a vanished thread.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Parent { child } => Ok(Some(child)),
        ForkResult::Child => Ok(None),
    }
}
