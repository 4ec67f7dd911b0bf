//! An in-memory [`ProcessTable`] for tests of code built on liveness.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::*;

/// One fake process.
#[derive(Debug, Clone)]
pub struct FakeProcess {
    /// Its state.
    pub state: PidState,
    /// Its command line.
    pub cmdline: Vec<OsString>,
    /// Paths of unix sockets it listens at.
    pub listening: Vec<PathBuf>,
    /// Its real uid.
    pub uid: u32,
}

/// The uid of the fake's own user (whose direct-mode VMMs run as it).
pub const FAKE_USER_UID: u32 = 1000;

#[derive(Debug, Default)]
struct Inner {
    procs: BTreeMap<i32, FakeProcess>,
    kills: Vec<i32>,
    reads: Vec<Read>,
    broken: bool,
    survive_kill: bool,
}

/// One question asked of a [`FakeProcesses`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Read {
    /// [`ProcessTable::pid_state`] of this PID.
    State(i32),
    /// [`ProcessTable::cmdline`] of this PID.
    Cmdline(i32),
    /// [`ProcessTable::listening_pids`] at this socket: the whole process table searched.
    Listening(PathBuf),
    /// [`ProcessTable::pid_listens_at`]: whether this one PID listens at this socket.
    ListensAt(i32, PathBuf),
    /// [`ProcessTable::pid_uid`] of this PID.
    Uid(i32),
    /// [`ProcessTable::socket_answers`] at this socket.
    Answers(PathBuf),
}

/// A process table held in memory. Killing a process makes it [`PidState::Gone`] (or leaves
/// it running, see [`FakeProcesses::survive_kills`]); every kill and every question asked is
/// recorded.
#[derive(Debug, Default)]
pub struct FakeProcesses {
    /// Guards the fake processes and the record of kills.
    inner: Mutex<Inner>,
}

impl FakeProcesses {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a running VMM with PID `pid` listening at `socket`.
    pub fn add_vmm(&self, pid: i32, socket: &Path) {
        self.add(
            pid,
            FakeProcess {
                state: PidState::Live('S'),
                cmdline: vec!["firecracker".into(), "--api-sock".into(), socket.as_os_str().to_owned()],
                listening: vec![socket.to_owned()],
                uid: FAKE_USER_UID,
            },
        );
    }

    /// Adds (or replaces) a process.
    pub fn add(&self, pid: i32, process: FakeProcess) {
        self.inner().procs.insert(pid, process);
    }

    /// Removes `pid`, as if it exited and was reaped.
    pub fn remove(&self, pid: i32) {
        self.inner().procs.remove(&pid);
    }

    /// Turns `pid` into a zombie (it keeps no sockets, as in the kernel).
    pub fn make_zombie(&self, pid: i32) {
        if let Some(p) = self.inner().procs.get_mut(&pid) {
            p.state = PidState::Zombie;
            p.cmdline.clear();
            p.listening.clear();
        }
    }

    /// Makes every call fail as if `/proc` were unreadable.
    pub fn set_broken(&self, broken: bool) {
        self.inner().broken = broken;
    }

    /// Makes killed processes keep running (a VMM stuck in the kernel).
    pub fn survive_kills(&self, survive: bool) {
        self.inner().survive_kill = survive;
    }

    /// The PIDs signalled so far, in order.
    pub fn kills(&self) -> Vec<i32> {
        self.inner().kills.clone()
    }

    /// The questions asked so far, in order.
    pub fn reads(&self) -> Vec<Read> {
        self.inner().reads.clone()
    }

    /// Forgets the questions asked so far.
    pub fn clear_reads(&self) {
        self.inner().reads.clear();
    }

    /// [`FakeProcesses::check`], with `read` recorded.
    fn ask(&self, read: Read) -> Result<std::sync::MutexGuard<'_, Inner>, LivenessError> {
        let mut inner = self.check()?;
        inner.reads.push(read);
        Ok(inner)
    }

    fn check(&self) -> Result<std::sync::MutexGuard<'_, Inner>, LivenessError> {
        let inner = self.inner();
        if inner.broken {
            return Err(LivenessError::Proc {
                path: PathBuf::from("/proc/net/unix"),
                source: io::Error::from_raw_os_error(libc::EACCES),
            });
        }
        Ok(inner)
    }
}

impl ProcessTable for FakeProcesses {
    fn pid_state(&self, pid: i32) -> Result<PidState, LivenessError> {
        Ok(self.ask(Read::State(pid))?.procs.get(&pid).map_or(PidState::Gone, |p| p.state))
    }

    fn cmdline(&self, pid: i32) -> Result<Option<Vec<OsString>>, LivenessError> {
        Ok(self.ask(Read::Cmdline(pid))?.procs.get(&pid).map(|p| p.cmdline.clone()))
    }

    fn listening_pids(&self, socket: &Path) -> Result<Vec<i32>, LivenessError> {
        Ok(self
            .ask(Read::Listening(socket.to_owned()))?
            .procs
            .iter()
            .filter(|(_, p)| p.listening.iter().any(|l| l == socket))
            .map(|(&pid, _)| pid)
            .collect())
    }

    fn pid_listens_at(&self, pid: i32, socket: &Path) -> Result<bool, LivenessError> {
        Ok(self
            .ask(Read::ListensAt(pid, socket.to_owned()))?
            .procs
            .get(&pid)
            .is_some_and(|p| p.listening.iter().any(|l| l == socket)))
    }

    fn pid_uid(&self, pid: i32) -> Result<Option<u32>, LivenessError> {
        Ok(self.ask(Read::Uid(pid))?.procs.get(&pid).map(|p| p.uid))
    }

    fn socket_answers(&self, socket: &Path) -> Result<bool, LivenessError> {
        // A socket answers while a live process listens at it.
        Ok(self
            .ask(Read::Answers(socket.to_owned()))?
            .procs
            .values()
            .any(|p| matches!(p.state, PidState::Live(_)) && p.listening.iter().any(|l| l == socket)))
    }

    fn jail_socket_answers(&self, _root: &Path, socket: &Path) -> Result<bool, LivenessError> {
        self.socket_answers(socket)
    }

    fn kill_vmm(&self, pid: i32, socket: &Path) -> Result<bool, LivenessError> {
        let mut inner = self.check()?;
        let serving = inner.procs.get(&pid).is_some_and(|p| p.listening.iter().any(|l| l == socket));
        if !serving {
            return Ok(false);
        }
        inner.kills.push(pid);
        if !inner.survive_kill {
            inner.procs.remove(&pid);
        }
        Ok(true)
    }
}
