//! The jailer's own process: sanitising it, joining the network namespace, resource limits,
//! daemonizing, the new PID namespace, and the final exec as uid:gid.

use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::resource::{Resource, setrlimit};
use nix::time::{ClockId, clock_gettime};
use nix::unistd::{Pid, dup2_stderr, dup2_stdin, dup2_stdout, getpid, getsid, setsid};

use super::{JailerError, jail::JailError, sys, unquoted};

/// The open-files limit the jailer sets unless told otherwise.
pub const DEFAULT_NO_FILE: u64 = 2048;

/// Process errors, worded and named as the jailer's.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// close_range failed.
    #[error("Failed to call close range syscall: {0}")]
    CloseRange(io::Error),
    /// The network namespace file could not be opened.
    #[error("Failed to open file {}: {}", unquoted(.0), .1)]
    FileOpen(PathBuf, io::Error),
    /// setns failed.
    #[error("Failed to join network namespace: netns: {0}")]
    SetNetNs(io::Error),
    /// setrlimit failed (for the resource named).
    #[error("Failed to set limit for resource: {0}")]
    Setrlimit(String),
    /// `/dev/null` could not be opened.
    #[error("Failed to open {0}: {1}")]
    Open(PathBuf, io::Error),
    /// fork failed while daemonizing.
    #[error("Failed to daemonize: {0}")]
    Daemonize(io::Error),
    /// setsid failed.
    #[error("Failed to daemonize: setsid: {0}")]
    SetSid(io::Error),
    /// dup2 failed.
    #[error("Failed to duplicate fd: {0}")]
    Dup2(io::Error),
    /// The PID namespace child could not be made.
    #[error("Failed cloning into a new child process: {0}")]
    Clone(io::Error),
    /// getsid failed.
    #[error("Failed to get SID (getsid): {0}")]
    GetSid(io::Error),
    /// exec failed.
    #[error("Failed to exec into Firecracker: {0}")]
    Exec(io::Error),
}

fn os(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Closes every descriptor from 3 up and clears the environment (the jailer's first step).
/// Like the jailer, it panics on a variable that is not UTF-8.
pub fn sanitize() -> Result<(), ProcessError> {
    sys::close_from_3().map_err(ProcessError::CloseRange)?;
    let names: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
    for name in names {
        sys::remove_env_var(&name);
    }
    Ok(())
}

/// Microseconds on a clock.
fn clock_us(clock: ClockId) -> u64 {
    clock_gettime(clock).map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000).unwrap_or(0)
}

/// The times the jailer passes to Firecracker (`--start-time-us`, `--start-time-cpu-us`,
/// `--parent-cpu-time-us`), measured as the jailer measures them.
#[derive(Debug, Clone, Copy)]
pub struct Clocks {
    start_us: u64,
    start_cpu_us: u64,
    jailer_cpu_us: u64,
}

impl Clocks {
    /// Starts measuring (after the arguments are parsed, as the jailer does).
    pub fn start() -> Clocks {
        Clocks {
            start_us: clock_us(ClockId::CLOCK_MONOTONIC),
            start_cpu_us: clock_us(ClockId::CLOCK_PROCESS_CPUTIME_ID),
            jailer_cpu_us: 0,
        }
    }

    /// The jailer's own work is done (before daemonizing).
    pub fn jailer_done(&mut self) {
        self.jailer_cpu_us = clock_us(ClockId::CLOCK_PROCESS_CPUTIME_ID).saturating_sub(self.start_cpu_us);
    }

    /// Adds this (forked) process's CPU time so far.
    fn add_own_cpu(&mut self) {
        self.jailer_cpu_us += clock_us(ClockId::CLOCK_PROCESS_CPUTIME_ID);
    }
}

/// Resource limits set on the jailer (and so on the VMM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceLimits {
    /// `fsize`: set only when given.
    pub file_size: Option<u64>,
    /// `no-file`: always set.
    pub no_file: u64,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        ResourceLimits { file_size: None, no_file: DEFAULT_NO_FILE }
    }
}

impl ResourceLimits {
    /// Sets the limits (soft and hard alike).
    pub fn install(&self) -> Result<(), ProcessError> {
        if let Some(n) = self.file_size {
            setrlimit(Resource::RLIMIT_FSIZE, n, n)
                .map_err(|_| ProcessError::Setrlimit("size of file".into()))?;
        }
        setrlimit(Resource::RLIMIT_NOFILE, self.no_file, self.no_file)
            .map_err(|_| ProcessError::Setrlimit("number of file descriptors".into()))
    }
}

/// Joins the network namespace at `path`.
pub fn join_netns(path: &Path) -> Result<(), ProcessError> {
    let ns = File::open(path).map_err(|e| ProcessError::FileOpen(path.to_path_buf(), e))?;
    setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| ProcessError::SetNetNs(os(e)))
}

/// Opens `/dev/null` (before the jail hides it).
pub fn open_dev_null() -> Result<File, ProcessError> {
    File::open("/dev/null").map_err(|e| ProcessError::Open("/dev/null".into(), e))
}

/// Forks twice with a `setsid` between, each parent exiting 0; the grandchild returns with its
/// standard descriptors on `dev_null`.
pub fn daemonize(dev_null: File, clocks: &mut Clocks) -> Result<(), ProcessError> {
    if sys::fork_single_threaded().map_err(|e| ProcessError::Daemonize(os(e)))?.is_some() {
        std::process::exit(0);
    }
    setsid().map_err(|e| ProcessError::SetSid(os(e)))?;
    clocks.add_own_cpu();
    if sys::fork_single_threaded().map_err(|e| ProcessError::Daemonize(os(e)))?.is_some() {
        std::process::exit(0);
    }
    dup2_stdin(&dev_null).map_err(|e| ProcessError::Dup2(os(e)))?;
    dup2_stdout(&dev_null).map_err(|e| ProcessError::Dup2(os(e)))?;
    dup2_stderr(&dev_null).map_err(|e| ProcessError::Dup2(os(e)))?;
    clocks.add_own_cpu();
    Ok(())
}

/// The final exec.
#[derive(Debug)]
pub struct Launch<'a> {
    /// The exec file inside the jail (`/firecracker`).
    pub exec_file: &'a Path,
    /// The instance id.
    pub id: &'a str,
    /// The VMM's uid.
    pub uid: u32,
    /// The VMM's gid.
    pub gid: u32,
    /// The words after `--`.
    pub extra: &'a [String],
    /// The times to pass.
    pub clocks: &'a Clocks,
}

impl Launch<'_> {
    /// Execs the VMM as uid:gid without supplementary groups, with the (cleared) environment and
    /// the standard descriptors as they are; returns only on failure.
    pub fn exec(&self) -> ProcessError {
        let err = Command::new(self.exec_file)
            .args(["--id", self.id])
            .args(["--start-time-us", &self.clocks.start_us.to_string()])
            .args(["--start-time-cpu-us", &clock_us(ClockId::CLOCK_PROCESS_CPUTIME_ID).to_string()])
            .args(["--parent-cpu-time-us", &self.clocks.jailer_cpu_us.to_string()])
            .stdin(Stdio::inherit())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .uid(self.uid)
            .gid(self.gid)
            .args(self.extra)
            .exec();
        ProcessError::Exec(err)
    }
}

/// Forks a child into a new PID namespace (its PID 1) that execs the VMM; the parent hands the
/// child's PID (as the host sees it) to `write_pid` and exits 0. A jailer that leads its session
/// (and is not daemonized) makes the child lead a new session, so the child gets no SIGHUP when
/// the jailer exits.
pub fn exec_in_new_pid_ns(
    launch: &Launch<'_>,
    daemonized: bool,
    write_pid: impl FnOnce(u32) -> Result<(), JailError>,
) -> Result<(), JailerError> {
    let session_leader = !daemonized && getsid(None).map_err(|e| ProcessError::GetSid(os(e)))? == getpid();
    unshare(CloneFlags::CLONE_NEWPID).map_err(|e| ProcessError::Clone(os(e)))?;
    match sys::fork_single_threaded().map_err(|e| ProcessError::Clone(os(e)))? {
        None => {
            if session_leader {
                setsid().map_err(|e| ProcessError::SetSid(os(e)))?;
            }
            Err(launch.exec().into())
        }
        Some(child) => {
            write_pid(pid_number(child))?;
            std::process::exit(0)
        }
    }
}

fn pid_number(pid: Pid) -> u32 {
    pid.as_raw() as u32
}
