//! Socket activation: a listening socket handed over by systemd (`LISTEN_PID`, `LISTEN_FDS`,
//! descriptor 3), checked to be a listening unix stream socket before it is used.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    AddressFamily, SockType, SockaddrLike, SockaddrStorage, getsockname, getsockopt, sockopt,
};
use nix::sys::stat::{SFlag, fstat};

/// The first descriptor systemd passes.
pub const LISTEN_FDS_START: RawFd = 3;

/// Why the passed socket cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    /// The variables are malformed.
    #[error("LISTEN_FDS={0:?} is not a number")]
    BadCount(String),
    /// The descriptor is not what the unit should pass.
    #[error(
        "descriptor 3 from systemd is not a listening unix stream socket; check ListenStream= in banger-helper.socket"
    )]
    NotAListener,
}

/// Takes the listening socket systemd passed to this process, if any (and unsets the variables).
pub fn take_listener() -> Result<Option<OwnedFd>, SystemdError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    // SAFETY: start-up is single-threaded; nothing reads the environment concurrently.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    let (Some(pid), Some(fds)) = (pid, fds) else { return Ok(None) };
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    let count: u32 = fds.parse().map_err(|_| SystemdError::BadCount(fds.clone()))?;
    if count == 0 {
        return Ok(None);
    }
    // SAFETY: F_GETFD only reads the descriptor's flags; on a closed descriptor it fails (EBADF).
    if unsafe { libc::fcntl(LISTEN_FDS_START, libc::F_GETFD) } == -1 {
        return Err(SystemdError::NotAListener);
    }
    // SAFETY: LISTEN_PID names this process, so systemd handed descriptor 3 to it and nothing
    // else in the process owns it (it was just checked to be open).
    let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
    let st = fstat(&fd).map_err(|_| SystemdError::NotAListener)?;
    if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFSOCK {
        return Err(SystemdError::NotAListener);
    }
    let listening = getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false);
    let stream = getsockopt(&fd, sockopt::SockType).ok() == Some(SockType::Stream);
    let unix = getsockname::<SockaddrStorage>(LISTEN_FDS_START).ok().and_then(|a| a.family())
        == Some(AddressFamily::Unix);
    if !(listening && stream && unix) {
        return Err(SystemdError::NotAListener);
    }
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
        .map_err(|_| SystemdError::NotAListener)?;
    Ok(Some(fd))
}
