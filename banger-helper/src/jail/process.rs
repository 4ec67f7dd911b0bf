//! A jailed VMM as a process: held by a pidfd (so a PID number recycled for another process is
//! never signalled), checked to run as the jail's uid, killed through the pidfd and waited for.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// A process held by a pidfd.
#[derive(Debug)]
pub struct Process {
    pid: i32,
    fd: OwnedFd,
}

/// What a PID turned out to be.
#[derive(Debug)]
pub enum Found {
    /// A live process running as the expected uid (real, effective, saved and filesystem).
    Jailed(Process),
    /// No such process (or only a zombie).
    Gone,
    /// A live process running as another uid: not the jail's VMM.
    Foreign,
}

fn pidfd_open(pid: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open takes a PID and flags by value and returns a new descriptor or -1.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = Errno::result(r)?;
    // SAFETY: the syscall returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn pidfd_send_signal(fd: &OwnedFd, signal: i32) -> Result<(), Errno> {
    // SAFETY: the descriptor is a valid pidfd; a null siginfo and zero flags are allowed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    Errno::result(r).map(drop)
}

/// The four uids of `/proc/<pid>/status`'s `Uid:` line.
pub fn status_uids(status: &str) -> Option<[u32; 4]> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let v: Vec<u32> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    v.try_into().ok()
}

/// Whether `/proc/<pid>/status` says zombie.
fn is_zombie(status: &str) -> bool {
    status.lines().any(|l| l.starts_with("State:") && l.contains('Z'))
}

/// Opens `pid` and checks it runs as `uid`: the pidfd is taken first, the uids read from
/// `/proc`, then the pidfd asked whether its process still lives, so the uids read were that
/// process's and not those of a later one given the same number.
pub fn find(pid: i32, uid: u32) -> Result<Found, Errno> {
    if pid <= 1 {
        return Ok(Found::Foreign);
    }
    let fd = match pidfd_open(pid) {
        Ok(fd) => fd,
        Err(Errno::ESRCH) => return Ok(Found::Gone),
        Err(e) => return Err(e),
    };
    let status = match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Found::Gone),
        Err(e) => return Err(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))),
    };
    match pidfd_send_signal(&fd, 0) {
        Ok(()) => {}
        Err(Errno::ESRCH) => return Ok(Found::Gone),
        Err(e) => return Err(e),
    }
    if is_zombie(&status) {
        return Ok(Found::Gone);
    }
    Ok(match status_uids(&status) {
        Some(uids) if uids == [uid; 4] => Found::Jailed(Process { pid, fd }),
        _ => Found::Foreign,
    })
}

impl Process {
    /// Its PID.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends SIGKILL through the pidfd (a process already gone counts).
    pub fn kill(&self) -> Result<(), Errno> {
        match pidfd_send_signal(&self.fd, libc::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Waits at most `timeout` for the process to end (the pidfd becomes readable when it
    /// exits, zombie or reaped); returns whether it did.
    pub fn wait(&self, timeout: Duration) -> Result<bool, Errno> {
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        loop {
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(n) => return Ok(n > 0),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether it has ended, without waiting.
    pub fn ended(&self) -> bool {
        self.wait(Duration::ZERO).unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_uid_line() {
        let status =
            "Name:\tfirecracker\nState:\tS (sleeping)\nUid:\t64000\t64000\t64000\t64000\nGid:\t1\t1\t1\t1\n";
        assert_eq!(status_uids(status), Some([64000; 4]));
        assert!(!is_zombie(status));
        assert_eq!(status_uids("Uid:\t1\t2\n"), None);
        assert!(is_zombie("State:\tZ (zombie)\n"));
    }

    #[test]
    fn a_process_of_another_uid_is_foreign_and_a_missing_one_gone() {
        let me = std::process::id() as i32;
        let uid = nix::unistd::getuid().as_raw();
        assert!(matches!(find(me, uid.wrapping_add(1)).unwrap(), Found::Foreign));
        let Found::Jailed(p) = find(me, uid).unwrap() else { panic!("this process runs as {uid}") };
        assert_eq!(p.pid(), me);
        assert!(!p.ended());
        assert!(matches!(find(1, 0).unwrap(), Found::Foreign), "init is never a VMM");
        // A child that exited and was reaped: its PID names nothing (until reused).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        assert!(matches!(find(pid, uid).unwrap(), Found::Gone | Found::Foreign));
    }
}
