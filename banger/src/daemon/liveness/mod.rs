//! Is a VM's VMM alive, and which process is it? The single answer to both lives here.
//!
//! [`vm_alive`] is the only liveness check in banger. A VM counts as alive when all of:
//! 1. its intent is to run ([`crate::model::VmState::wants_running`]);
//! 2. its handles name a PID, and that PID exists and is not a zombie (`Z`) or dead (`X`): a
//!    killed VMM can linger as a zombie until its parent reaps it;
//! 3. that PID holds the unix socket *listening* at the VM's API socket path. A PID recycled by
//!    an unrelated process never passes this, since it cannot be serving that socket.
//!
//! A VMM launched through the jailer (its handles name a jail) runs as the jail's uid, so the
//! user cannot see its descriptors; for it, 3. is: that PID runs as the jail's uid (a uid the
//! helper gives this jail alone; `/proc/PID/status` is readable by anyone) and the jail's API
//! socket (reachable by the user only) answers a connection. The PID and the jail come from
//! the helper's answer to the launch, and after a daemon restart from `handles.json` checked
//! against the helper's `list-owned` (reconcile).
//!
//! [`rediscover_handles`] rebuilds a VM's handles after a daemon restart. It asks the OS first
//! (which process listens at the API socket: the PID the scratch file records, checked alone,
//! and only when that one does not, every process; not for a jailed VMM, whose descriptors are
//! not the user's to see), then merges in the scratch file, which is the only record of the TAP and
//! loop names and of a jail. When the process is gone it still returns the scratch
//! contents so that cleanup can tear down what the VMM held.
//!
//! The kernel is reached only through the [`ProcessTable`] trait. [`ProcFs`] implements it over
//! a `/proc` whose root is a parameter (tests point it at a fake tree): the listening socket's
//! inode comes from `net/unix` (flag `__SO_ACCEPTCON`, path compared byte for byte with what
//! the VMM passed to `bind`, so the VMM must be started with the VM's `api_socket` exactly), and
//! the PID holding it from the `socket:[INODE]` links in `PID/fd`. For a known PID the check
//! reads that PID's own `net/unix`, so it also works for a VMM in another network namespace.
//! Processes whose `fd` directory cannot be read (other users') are never counted as holders.
//! [`fake::FakeProcesses`] is an in-memory, recording implementation for tests.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::daemon::handles::{self, HandlesError};
use crate::model::{VmHandles, VmRuntime};

/// `__SO_ACCEPTCON` in `/proc/net/unix`'s flags column: the socket is listening.
const SO_ACCEPTCON: u32 = 0x0001_0000;

/// Why the process table could not be read or a signal not sent.
#[derive(Debug, thiserror::Error)]
pub enum LivenessError {
    /// A file under `/proc` could not be read.
    #[error("cannot read {path}: is /proc mounted and readable?")]
    Proc {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A signal could not be sent.
    #[error("cannot send SIGKILL to vmm process {pid}")]
    Signal {
        /// The process.
        pid: i32,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A jailed VMM's API socket could not be tried.
    #[error("cannot connect to the vmm's api socket {path}")]
    Socket {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A killed VMM did not exit in time (stuck in the kernel, e.g. on a device).
    #[error("vmm pid {pid} did not exit within {waited:?} of SIGKILL")]
    Survived {
        /// The process.
        pid: i32,
        /// How long it was waited for.
        waited: Duration,
    },
}

/// What the kernel says about a PID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PidState {
    /// No such process.
    Gone,
    /// Exited, not yet reaped (`Z`), or being torn down (`X`).
    Zombie,
    /// Exists; the state letter from `/proc/PID/stat` (`R`, `S`, `D`, `T`, …).
    Live(char),
}

/// Narrow read access to the process table, plus killing a VMM.
pub trait ProcessTable: Send + Sync {
    /// The state of `pid`.
    fn pid_state(&self, pid: i32) -> Result<PidState, LivenessError>;

    /// The command line of `pid`, `None` when the process is gone (empty for a zombie).
    fn cmdline(&self, pid: i32) -> Result<Option<Vec<OsString>>, LivenessError>;

    /// Every PID holding a unix socket listening at `socket`, ascending.
    fn listening_pids(&self, socket: &Path) -> Result<Vec<i32>, LivenessError>;

    /// The real uid of `pid`, `None` when the process is gone.
    fn pid_uid(&self, pid: i32) -> Result<Option<u32>, LivenessError>;

    /// Whether something accepts connections at the unix socket `socket` (tried without
    /// blocking; the connection is closed at once).
    fn socket_answers(&self, socket: &Path) -> Result<bool, LivenessError>;

    /// [`ProcessTable::socket_answers`] for a socket inside a jail: reached below `root`
    /// following no link there (the jail's directories belong to the VMM's uid, which could
    /// otherwise point the check at another socket of the user's); a path that leaves `root` or
    /// crosses a link does not answer.
    fn jail_socket_answers(&self, root: &Path, socket: &Path) -> Result<bool, LivenessError>;

    /// Whether `pid` holds a unix socket listening at `socket`.
    fn pid_listens_at(&self, pid: i32, socket: &Path) -> Result<bool, LivenessError> {
        Ok(self.listening_pids(socket)?.contains(&pid))
    }

    /// Sends SIGKILL to `pid` if, and only if, it still listens at `socket` (so a recycled PID
    /// is never signalled). Returns whether a signal was sent. Does not wait for the exit.
    fn kill_vmm(&self, pid: i32, socket: &Path) -> Result<bool, LivenessError>;

    /// The table to ask for one pass over many VMs (reconcile), when it can answer such a pass
    /// for less than one question at a time ([`ProcFs::one_pass`]).
    fn one_pass(&self) -> Option<Box<dyn ProcessTable>> {
        None
    }
}

/// The liveness rule (see the module docs), with errors from the process table surfaced.
pub fn vm_liveness(
    vm: &VmRuntime,
    handles: &VmHandles,
    procs: &dyn ProcessTable,
) -> Result<bool, LivenessError> {
    if !vm.state.wants_running() {
        return Ok(false);
    }
    let Some(pid) = handles.pid else { return Ok(false) };
    match procs.pid_state(pid)? {
        PidState::Gone | PidState::Zombie => Ok(false),
        PidState::Live(_) => match &handles.jail {
            None => procs.pid_listens_at(pid, &vm.api_socket),
            Some(jail) => Ok(procs.pid_uid(pid)? == Some(jail.uid)
                && procs.jail_socket_answers(&jail.root, &jail.api_socket)?),
        },
    }
}

/// The API socket the VM's VMM serves now: its jail's, or the VM's own (direct mode).
pub fn api_socket<'a>(vm: &'a VmRuntime, handles: &'a VmHandles) -> &'a Path {
    handles.jail.as_ref().map_or(&vm.api_socket, |j| &j.api_socket)
}

/// Whether the VM's VMM is alive: the one liveness check (see the module docs). When the
/// process table cannot be read the answer is `false` and the error is logged; callers that
/// must not act on an unknown answer (reconcile) use [`vm_liveness`].
pub fn vm_alive(vm: &VmRuntime, handles: &VmHandles, procs: &dyn ProcessTable) -> bool {
    vm_liveness(vm, handles, procs).unwrap_or_else(|e| {
        tracing::warn!(vm = %vm.id, error = %e, "cannot tell whether the vmm is alive; treating it as not");
        false
    })
}

/// How often [`wait_gone`] looks at the process again.
const WAIT_POLL: Duration = Duration::from_millis(20);

/// Waits until `pid` has exited (gone, or a zombie waiting to be reaped), for at most `limit`.
/// Returns whether it did.
pub async fn wait_gone(procs: &dyn ProcessTable, pid: i32, limit: Duration) -> Result<bool, LivenessError> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match procs.pid_state(pid)? {
            PidState::Gone | PidState::Zombie => return Ok(true),
            PidState::Live(_) if tokio::time::Instant::now() >= deadline => return Ok(false),
            PidState::Live(_) => tokio::time::sleep(WAIT_POLL).await,
        }
    }
}

/// Kills the VMM `pid` if, and only if, it still serves `socket` ([`ProcessTable::kill_vmm`]),
/// then waits at most `limit` for it to exit. Returns whether a signal was sent: `false` means
/// no process of this VM was there to kill (gone, or the PID now belongs to another process),
/// and nothing is waited for. A VMM still running after `limit` is [`LivenessError::Survived`].
pub async fn kill_and_wait(
    procs: &dyn ProcessTable,
    pid: i32,
    socket: &Path,
    limit: Duration,
) -> Result<bool, LivenessError> {
    if !procs.kill_vmm(pid, socket)? {
        return Ok(false);
    }
    if wait_gone(procs, pid, limit).await? {
        Ok(true)
    } else {
        Err(LivenessError::Survived { pid, waited: limit })
    }
}

/// Where rediscovered handles came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandleSource {
    /// A process listens at the VM's API socket; its PID is the handle (scratch fields merged).
    Os,
    /// No process serves the socket; the scratch file's contents (PID possibly stale).
    Scratch,
    /// Neither knows anything.
    None,
}

/// What [`rediscover_handles`] found.
#[derive(Debug)]
pub struct Rediscovered {
    /// The best handles known: the OS's PID, the scratch file's TAP and loops.
    pub handles: VmHandles,
    /// Where `handles` came from.
    pub source: HandleSource,
    /// [`vm_liveness`] of `handles`; meaningless when `os_error` is set.
    pub alive: bool,
    /// The scratch file was unreadable, corrupt or too new (treated as missing).
    pub scratch_error: Option<HandlesError>,
    /// The process table could not be read, so the OS could not be asked.
    pub os_error: Option<LivenessError>,
}

/// Rebuilds a VM's handles from the OS and its scratch file (see the module docs).
pub fn rediscover_handles(vm: &VmRuntime, procs: &dyn ProcessTable) -> Rediscovered {
    let (scratch, scratch_error) = match handles::read_scratch(&vm.vm_dir) {
        Ok(s) => (s, None),
        Err(e) => (None, Some(e)),
    };
    let mut os_error = None;
    // A jailed VMM's descriptors are not the user's to see: its PID is the recorded one.
    let jailed = scratch.as_ref().is_some_and(|s| s.jail.is_some());
    let found = if jailed { Ok(None) } else { find_vmm(vm, scratch.as_ref().and_then(|s| s.pid), procs) };
    let (os_pid, verified) = match found {
        Ok(Some(Found { pid, verified })) => (Some(pid), verified),
        Ok(None) => (None, false),
        Err(e) => {
            os_error = Some(e);
            (None, false)
        }
    };
    let (handles, source) = match (os_pid, scratch) {
        (Some(pid), scratch) => {
            let mut h = scratch.unwrap_or_default();
            if h.pid.is_some_and(|p| p != pid) {
                tracing::info!(vm = %vm.id, scratch_pid = ?h.pid, os_pid = pid, "the vmm's pid differs from handles.json; using the os's");
            }
            h.pid = Some(pid);
            (h, HandleSource::Os)
        }
        (None, Some(h)) => (h, HandleSource::Scratch),
        (None, None) => (VmHandles::default(), HandleSource::None),
    };
    // The recorded PID, found live and listening at the VM's socket, passed the liveness rule
    // already: its socket table is not read twice.
    let checked = if verified { Ok(vm.state.wants_running()) } else { vm_liveness(vm, &handles, procs) };
    let alive = match checked {
        Ok(a) => a,
        Err(e) => {
            os_error.get_or_insert(e);
            false
        }
    };
    // A jailed VMM that passes the liveness rule was found by the OS too (its PID runs as the
    // jail's uid and the jail's socket answers).
    let source = if jailed && alive { HandleSource::Os } else { source };
    Rediscovered { handles, source, alive, scratch_error, os_error }
}

/// The VMM [`find_vmm`] found.
struct Found {
    pid: i32,
    /// It passed the liveness rule on the way (the recorded PID, live and listening).
    verified: bool,
}

/// The live process serving the VM's API socket: the scratch PID when it is one of the holders,
/// else a holder whose command line names the socket, else the lowest holder.
///
/// The scratch PID is asked first, alone (its state and its own descriptors): searching every
/// process's descriptors for the holders costs by the number of processes, so doing it for every
/// VM made reconcile grow with the square of the number of VMs. Only a VM whose recorded PID
/// does not serve its socket pays for the search.
fn find_vmm(
    vm: &VmRuntime,
    hint: Option<i32>,
    procs: &dyn ProcessTable,
) -> Result<Option<Found>, LivenessError> {
    if let Some(h) = hint
        && matches!(procs.pid_state(h)?, PidState::Live(_))
        && procs.pid_listens_at(h, &vm.api_socket)?
    {
        return Ok(Some(Found { pid: h, verified: true }));
    }
    let mut holders = Vec::new();
    for pid in procs.listening_pids(&vm.api_socket)? {
        if matches!(procs.pid_state(pid)?, PidState::Live(_)) {
            holders.push(pid);
        }
    }
    let found = |pid| Some(Found { pid, verified: false });
    if let Some(h) = hint.filter(|h| holders.contains(h)) {
        return Ok(found(h));
    }
    let socket = vm.api_socket.as_os_str();
    for &pid in &holders {
        if procs.cmdline(pid)?.is_some_and(|args| args.iter().any(|a| a.as_os_str() == socket)) {
            return Ok(found(pid));
        }
    }
    Ok(holders.first().copied().and_then(found))
}

/// The listening unix sockets of one network namespace: (inode, path), read once.
type Listeners = Arc<Vec<(u64, Vec<u8>)>>;

/// [`ProcessTable`] over a `/proc` tree.
#[derive(Debug, Clone)]
pub struct ProcFs {
    root: PathBuf,
    /// For one pass ([`ProcFs::one_pass`]): each network namespace's listening sockets, by the
    /// namespace's identity (`net:[INODE]`), read from `net/unix` the first time they are needed.
    tables: Option<Arc<Mutex<HashMap<PathBuf, Listeners>>>>,
}

impl Default for ProcFs {
    fn default() -> Self {
        Self::new("/proc")
    }
}

impl ProcFs {
    /// A process table read from `root` (normally `/proc`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into(), tables: None }
    }

    /// The same table for one pass over many VMs (reconcile): each network namespace's unix
    /// socket table (`net/unix`, which lists every socket of the namespace, all the VMMs' among
    /// them) is read once and the listening sockets kept, instead of once per question. Which
    /// process holds a socket, and every process's state, are still read at each question.
    pub fn one_pass(&self) -> Self {
        Self { root: self.root.clone(), tables: Some(Arc::default()) }
    }

    fn proc_err(path: PathBuf) -> impl FnOnce(io::Error) -> LivenessError {
        move |source| LivenessError::Proc { path, source }
    }

    /// Inodes of sockets listening at `socket` according to the `net/unix` file of `dir` (the
    /// root, for this process's namespace, or a PID's directory), whose namespace link is `ns`.
    fn listening_inodes(&self, dir: &Path, ns: &Path, socket: &Path) -> Result<Vec<u64>, LivenessError> {
        let want = socket.as_os_str().as_bytes();
        Ok(self.listeners(dir, ns)?.iter().filter(|(_, p)| p == want).map(|(i, _)| *i).collect())
    }

    /// The listening sockets of `dir`'s `net/unix`: from the pass's tables when this namespace
    /// was read already.
    fn listeners(&self, dir: &Path, ns: &Path) -> Result<Listeners, LivenessError> {
        let key = self.tables.as_ref().and_then(|_| fs::read_link(ns).ok());
        if let (Some(t), Some(k)) = (&self.tables, &key)
            && let Some(hit) = t.lock().unwrap_or_else(|p| p.into_inner()).get(k)
        {
            return Ok(hit.clone());
        }
        let table = dir.join("net/unix");
        let text = fs::read(&table).map_err(Self::proc_err(table.clone()))?;
        let found: Listeners = Arc::new(
            parse_net_unix(&text)
                .filter(|e| e.flags & SO_ACCEPTCON != 0)
                .map(|e| (e.inode, e.path.to_vec()))
                .collect(),
        );
        if let (Some(t), Some(k)) = (&self.tables, key) {
            t.lock().unwrap_or_else(|p| p.into_inner()).insert(k, found.clone());
        }
        Ok(found)
    }

    /// Whether any descriptor of `pid` is one of `inodes`. Unreadable or vanished processes
    /// hold nothing.
    fn holds_any(&self, pid: i32, inodes: &[u64]) -> bool {
        let Ok(dir) = fs::read_dir(self.root.join(pid.to_string()).join("fd")) else { return false };
        dir.flatten().any(|entry| {
            fs::read_link(entry.path())
                .ok()
                .and_then(|l| socket_inode(l.as_os_str().as_bytes()))
                .is_some_and(|ino| inodes.contains(&ino))
        })
    }
}

impl ProcessTable for ProcFs {
    fn pid_state(&self, pid: i32) -> Result<PidState, LivenessError> {
        if pid <= 0 {
            return Ok(PidState::Gone);
        }
        let path = self.root.join(pid.to_string()).join("stat");
        match fs::read(&path) {
            Ok(stat) => Ok(parse_stat_state(&stat).map_or(PidState::Gone, |c| match c {
                'Z' | 'X' | 'x' => PidState::Zombie,
                other => PidState::Live(other),
            })),
            Err(e) if gone(&e) => Ok(PidState::Gone),
            Err(e) => Err(LivenessError::Proc { path, source: e }),
        }
    }

    fn cmdline(&self, pid: i32) -> Result<Option<Vec<OsString>>, LivenessError> {
        if pid <= 0 {
            return Ok(None);
        }
        let path = self.root.join(pid.to_string()).join("cmdline");
        match fs::read(&path) {
            Ok(raw) => Ok(Some(
                raw.split(|&b| b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| OsString::from_vec(a.to_vec()))
                    .collect(),
            )),
            Err(e) if gone(&e) => Ok(None),
            Err(e) => Err(LivenessError::Proc { path, source: e }),
        }
    }

    fn listening_pids(&self, socket: &Path) -> Result<Vec<i32>, LivenessError> {
        let inodes = self.listening_inodes(&self.root, &self.root.join("self/ns/net"), socket)?;
        if inodes.is_empty() {
            return Ok(Vec::new());
        }
        let dir = fs::read_dir(&self.root).map_err(Self::proc_err(self.root.clone()))?;
        let mut pids: Vec<i32> = dir
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
            .filter(|&pid| self.holds_any(pid, &inodes))
            .collect();
        pids.sort_unstable();
        Ok(pids)
    }

    fn pid_uid(&self, pid: i32) -> Result<Option<u32>, LivenessError> {
        if pid <= 0 {
            return Ok(None);
        }
        let path = self.root.join(pid.to_string()).join("status");
        match fs::read(&path) {
            Ok(status) => Ok(parse_status_uid(&status)),
            Err(e) if gone(&e) => Ok(None),
            Err(e) => Err(LivenessError::Proc { path, source: e }),
        }
    }

    fn socket_answers(&self, socket: &Path) -> Result<bool, LivenessError> {
        socket_answers(socket)
    }

    fn jail_socket_answers(&self, root: &Path, socket: &Path) -> Result<bool, LivenessError> {
        let err = |source: io::Error| LivenessError::Socket { path: socket.to_owned(), source };
        let Ok(in_jail) = socket.strip_prefix(root) else { return Ok(false) };
        match crate::daemon::beneath::open_beneath(root, in_jail, nix::fcntl::OFlag::O_PATH) {
            Ok(fd) => socket_answers(Path::new(&format!("/proc/self/fd/{}", fd.as_raw_fd()))),
            // Gone, or reached only through a link or out of the jail: not the VMM's socket.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT | libc::ELOOP | libc::EXDEV | libc::ENOTDIR)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(err(e)),
        }
    }

    fn pid_listens_at(&self, pid: i32, socket: &Path) -> Result<bool, LivenessError> {
        if pid <= 0 {
            return Ok(false);
        }
        // The PID's own view of unix sockets: right even when it lives in another netns.
        let dir = self.root.join(pid.to_string());
        let inodes = match self.listening_inodes(&dir, &dir.join("ns/net"), socket) {
            Ok(i) => i,
            Err(LivenessError::Proc { source, .. }) if gone(&source) => return Ok(false),
            Err(e) => return Err(e),
        };
        Ok(!inodes.is_empty() && self.holds_any(pid, &inodes))
    }

    fn one_pass(&self) -> Option<Box<dyn ProcessTable>> {
        Some(Box::new(ProcFs::one_pass(self)))
    }

    fn kill_vmm(&self, pid: i32, socket: &Path) -> Result<bool, LivenessError> {
        if pid <= 0 {
            return Ok(false);
        }
        // Pin the process first: once we hold a pidfd, the signal can only reach the process
        // we checked, even if it exits and its PID is reused in between.
        let pidfd = match sys::pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(false),
            Err(source) => return Err(LivenessError::Signal { pid, source }),
        };
        if !self.pid_listens_at(pid, socket)? {
            return Ok(false);
        }
        match sys::pidfd_send_signal(&pidfd, libc::SIGKILL) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
            Err(source) => Err(LivenessError::Signal { pid, source }),
        }
    }
}

/// Errors that mean the process is gone (or was never visible).
fn gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESRCH))
}

/// Whether something listens at the unix socket `socket`: a non-blocking connect that succeeds
/// or finds the backlog full (`EAGAIN`) says yes; no file, no listener or not a socket says no.
/// Anything else (no permission, for one) is an error naming the socket.
fn socket_answers(socket: &Path) -> Result<bool, LivenessError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket as open_socket};
    let err = |errno: nix::errno::Errno| LivenessError::Socket {
        path: socket.to_owned(),
        source: io::Error::from_raw_os_error(errno as i32),
    };
    let addr = UnixAddr::new(socket).map_err(err)?;
    let fd = open_socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(err)?;
    match connect(fd.as_raw_fd(), &addr) {
        Ok(()) | Err(nix::errno::Errno::EAGAIN) => Ok(true),
        Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ECONNREFUSED | nix::errno::Errno::ENOTSOCK) => {
            Ok(false)
        }
        Err(e) => Err(err(e)),
    }
}

/// The real uid in a `/proc/PID/status` file (`Uid:` real, effective, saved, filesystem).
fn parse_status_uid(status: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(status).ok()?;
    let line = text.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    line.split_ascii_whitespace().next()?.parse().ok()
}

/// The state letter of a `/proc/PID/stat` line: the first field after the last `)` (the
/// command name in parentheses may itself contain `)` and spaces).
fn parse_stat_state(stat: &[u8]) -> Option<char> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    stat[close + 1..].iter().find(|b| !b.is_ascii_whitespace()).map(|&b| b as char)
}

/// The inode in a `socket:[INODE]` link target.
fn socket_inode(link: &[u8]) -> Option<u64> {
    let inner = link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    std::str::from_utf8(inner).ok()?.parse().ok()
}

/// One line of `/proc/net/unix`.
#[derive(Debug, PartialEq, Eq)]
struct UnixEntry<'a> {
    flags: u32,
    inode: u64,
    path: &'a [u8],
}

/// Parses `/proc/net/unix`: `Num RefCount Protocol Flags Type St Inode [Path]`. The path is
/// everything after the single space that follows the inode (it may contain spaces).
fn parse_net_unix(text: &[u8]) -> impl Iterator<Item = UnixEntry<'_>> {
    text.split(|&b| b == b'\n').skip(1).filter_map(|line| {
        let mut rest = line;
        let mut fields: [&[u8]; 7] = [&[]; 7];
        for field in &mut fields {
            let start = rest.iter().position(|b| *b != b' ')?;
            rest = &rest[start..];
            let end = rest.iter().position(|b| *b == b' ').unwrap_or(rest.len());
            *field = &rest[..end];
            rest = &rest[end..];
        }
        let flags = u32::from_str_radix(std::str::from_utf8(fields[3]).ok()?, 16).ok()?;
        let inode = std::str::from_utf8(fields[6]).ok()?.parse().ok()?;
        let path = rest.strip_prefix(b" ").unwrap_or(&[]);
        Some(UnixEntry { flags, inode, path })
    })
}

/// The two pidfd syscalls (not wrapped by nix 0.31).
mod sys {
    use super::*;

    pub(super) fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no memory
        // is shared with the kernel.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    pub(super) fn pidfd_send_signal(pidfd: &OwnedFd, signal: i32) -> io::Result<()> {
        // SAFETY: the pidfd is a live descriptor we own; a null siginfo asks the kernel to fill
        // in the default one; flags must be 0.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }
}

#[cfg(test)]
pub(crate) mod fake;

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;
    use std::os::unix::net::UnixListener;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use banger_protocol::VmId;

    use super::fake::{FakeProcess, FakeProcesses, Read};
    use super::*;
    use crate::model::VmState;

    fn vm_in(dir: &Path, state: VmState) -> VmRuntime {
        VmRuntime {
            id: VmId::new("vm1").unwrap(),
            name: "dev".into(),
            state,
            vcpus: 1,
            memory_mib: 128,
            image: "base".into(),
            guest_ip: None,
            gateway_ip: None,
            api_socket: dir.join("fc.sock"),
            vsock_path: dir.join("vsock"),
            vsock_cid: 3,
            log_path: dir.join("serial.log"),
            metrics_path: dir.join("metrics"),
            dns_name: "dev.banger.internal".into(),
            vm_dir: dir.to_owned(),
            overlay_path: dir.join("root.ext4"),
            work_disk_path: None,
            work_disk_bytes: None,
            storage: None,
            launch: None,
            last_error: None,
            created_at: 0,
            updated_at: 0,
            cleanup_pending: None,
        }
    }

    fn pid_handles(pid: i32) -> VmHandles {
        VmHandles { pid: Some(pid), ..Default::default() }
    }

    #[test]
    fn net_unix_lines_are_parsed_with_paths_containing_spaces() {
        let text = b"Num       RefCount Protocol Flags    Type St Inode Path\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 22345 /run/fc one.sock\n\
            0000000000000000: 00000003 00000000 00000000 0001 03 22346 /run/fc one.sock\n\
            0000000000000000: 00000002 00000000 00000000 0002 01  1234\n\
            0000000000000000: 00000002 00000000 00010000 0001 01     7 @abstract\n";
        let entries: Vec<_> = parse_net_unix(text).collect();
        assert_eq!(
            entries,
            [
                UnixEntry { flags: 0x10000, inode: 22345, path: b"/run/fc one.sock" },
                UnixEntry { flags: 0, inode: 22346, path: b"/run/fc one.sock" },
                UnixEntry { flags: 0, inode: 1234, path: b"" },
                UnixEntry { flags: 0x10000, inode: 7, path: b"@abstract" },
            ]
        );
    }

    #[test]
    fn stat_state_survives_odd_command_names() {
        assert_eq!(parse_stat_state(b"42 (firecracker) S 1 42 42 0"), Some('S'));
        assert_eq!(parse_stat_state(b"42 (a) b) Z 1 2"), Some('Z'));
        assert_eq!(parse_stat_state(b"42 (no close"), None);
        assert_eq!(socket_inode(b"socket:[991]"), Some(991));
        assert_eq!(socket_inode(b"pipe:[991]"), None);
        assert_eq!(socket_inode(b"/dev/null"), None);
    }

    /// Builds a fake /proc tree: `procs` are (pid, state letter, socket inodes it holds).
    fn fake_tree(root: &Path, net_unix: &str, procs: &[(i32, char, &[u64])]) {
        let header = "Num       RefCount Protocol Flags    Type St Inode Path\n";
        fs::create_dir_all(root.join("net")).unwrap();
        fs::write(root.join("net/unix"), format!("{header}{net_unix}")).unwrap();
        for &(pid, state, inodes) in procs {
            let p = root.join(pid.to_string());
            fs::create_dir_all(p.join("fd")).unwrap();
            fs::create_dir_all(p.join("net")).unwrap();
            fs::write(p.join("net/unix"), format!("{header}{net_unix}")).unwrap();
            fs::write(p.join("stat"), format!("{pid} (fire cracker) {state} 1 1 1")).unwrap();
            fs::write(p.join("cmdline"), b"firecracker\0--api-sock\0/x\0").unwrap();
            symlink("/dev/null", p.join("fd/0")).unwrap();
            for (i, ino) in inodes.iter().enumerate() {
                symlink(format!("socket:[{ino}]"), p.join(format!("fd/{}", i + 3))).unwrap();
            }
        }
    }

    #[test]
    fn proc_tree_finds_the_holder_of_a_listening_socket_only() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let net = "0000000000000000: 00000002 00000000 00010000 0001 01 500 /run/fc.sock\n\
                   0000000000000000: 00000003 00000000 00000000 0001 03 501 /run/fc.sock\n\
                   0000000000000000: 00000002 00000000 00010000 0001 01 600 /run/other.sock\n";
        // 10 listens, 11 holds only an accepted connection, 12 listens elsewhere, 13 is a zombie.
        fake_tree(root, net, &[(10, 'S', &[500]), (11, 'R', &[501]), (12, 'S', &[600]), (13, 'Z', &[])]);
        let procs = ProcFs::new(root);
        let sock = Path::new("/run/fc.sock");
        assert_eq!(procs.listening_pids(sock).unwrap(), [10]);
        assert!(procs.pid_listens_at(10, sock).unwrap());
        assert!(!procs.pid_listens_at(11, sock).unwrap());
        assert!(!procs.pid_listens_at(99, sock).unwrap(), "a missing pid listens nowhere");
        assert_eq!(procs.pid_state(10).unwrap(), PidState::Live('S'));
        assert_eq!(procs.pid_state(13).unwrap(), PidState::Zombie);
        assert_eq!(procs.pid_state(99).unwrap(), PidState::Gone);
        assert_eq!(procs.pid_state(-1).unwrap(), PidState::Gone);
        assert_eq!(
            procs.cmdline(10).unwrap().unwrap(),
            [OsString::from("firecracker"), "--api-sock".into(), "/x".into()]
        );
        assert_eq!(procs.cmdline(99).unwrap(), None);
        assert!(procs.listening_pids(Path::new("/run/none.sock")).unwrap().is_empty());
    }

    #[test]
    fn one_pass_reads_each_namespaces_socket_table_once() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let net = "0000000000000000: 00000002 00000000 00010000 0001 01 500 /run/a.sock\n\
                   0000000000000000: 00000002 00000000 00010000 0001 01 501 /run/b.sock\n";
        fake_tree(root, net, &[(10, 'S', &[500]), (11, 'S', &[501])]);
        for dir in ["self", "10", "11"] {
            fs::create_dir_all(root.join(dir).join("ns")).unwrap();
            symlink("net:[4026531840]", root.join(dir).join("ns/net")).unwrap();
        }
        let (a, b) = (Path::new("/run/a.sock"), Path::new("/run/b.sock"));
        let pass = ProcFs::new(root).one_pass();
        assert!(pass.pid_listens_at(10, a).unwrap());
        // Every table of the namespace is gone: the pass answers from what it read.
        for dir in ["10", "11"] {
            fs::remove_file(root.join(dir).join("net/unix")).unwrap();
        }
        fs::remove_file(root.join("net/unix")).unwrap();
        assert!(pass.pid_listens_at(11, b).unwrap());
        assert!(!pass.pid_listens_at(11, a).unwrap(), "11 does not hold a's socket");
        assert_eq!(pass.listening_pids(b).unwrap(), [11]);
        // Without a pass, each question reads the table again.
        let plain = ProcFs::new(root);
        assert!(!plain.pid_listens_at(11, b).unwrap(), "its table is gone");
        assert!(plain.listening_pids(b).is_err());
    }

    #[test]
    fn unreadable_proc_is_an_error_naming_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let procs = ProcFs::new(tmp.path().join("missing"));
        let err = procs.listening_pids(Path::new("/run/fc.sock")).unwrap_err();
        assert!(err.to_string().contains("net/unix"), "{err}");
    }

    #[test]
    fn vm_alive_needs_intent_pid_not_zombie_and_the_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let procs = FakeProcesses::new();
        let vm = vm_in(tmp.path(), VmState::Running);
        procs.add_vmm(100, &vm.api_socket);
        assert!(vm_alive(&vm, &pid_handles(100), &procs));
        // Intent not to run.
        for state in [VmState::Created, VmState::Stopped, VmState::Failed] {
            assert!(!vm_alive(&vm_in(tmp.path(), state), &pid_handles(100), &procs), "{state}");
        }
        for state in [VmState::Starting, VmState::Stopping] {
            assert!(vm_alive(&vm_in(tmp.path(), state), &pid_handles(100), &procs), "{state}");
        }
        // No pid, a gone pid.
        assert!(!vm_alive(&vm, &VmHandles::default(), &procs));
        assert!(!vm_alive(&vm, &pid_handles(101), &procs));
        // A recycled pid: alive, but serving nothing of ours.
        procs.add(
            102,
            FakeProcess {
                state: PidState::Live('S'),
                cmdline: vec!["bash".into()],
                listening: vec![],
                uid: 1000,
            },
        );
        assert!(!vm_alive(&vm, &pid_handles(102), &procs));
        // A zombie, even one the fake still lists as listening.
        procs.add(
            103,
            FakeProcess {
                state: PidState::Zombie,
                cmdline: vec![],
                listening: vec![vm.api_socket.clone()],
                uid: 1000,
            },
        );
        assert!(!vm_alive(&vm, &pid_handles(103), &procs));
        // An unreadable process table: unknown is reported as an error, and as not alive.
        procs.set_broken(true);
        assert!(vm_liveness(&vm, &pid_handles(100), &procs).is_err());
        assert!(!vm_alive(&vm, &pid_handles(100), &procs));
    }

    #[test]
    fn a_jailed_vmm_is_alive_while_its_pid_runs_as_the_jails_uid_and_the_jails_socket_answers() {
        let tmp = tempfile::tempdir().unwrap();
        let procs = FakeProcesses::new();
        let vm = vm_in(tmp.path(), VmState::Running);
        let jail = crate::model::JailHandles {
            id: "j1".into(),
            uid: 900_000,
            root: tmp.path().join("jail/root"),
            api_socket: tmp.path().join("jail/root/run/firecracker.socket"),
        };
        let handles = VmHandles { pid: Some(500), jail: Some(jail.clone()), ..Default::default() };
        let vmm = |uid, listening: Vec<PathBuf>| FakeProcess {
            state: PidState::Live('S'),
            cmdline: vec![],
            listening,
            uid,
        };
        procs.add(500, vmm(900_000, vec![jail.api_socket.clone()]));
        assert!(vm_alive(&vm, &handles, &procs));
        assert_eq!(api_socket(&vm, &handles), jail.api_socket);
        assert_eq!(api_socket(&vm, &VmHandles::default()), vm.api_socket);
        // The user's own view of the VM's direct socket plays no part.
        assert!(!procs.reads().contains(&Read::Listening(vm.api_socket.clone())));
        // A recycled PID running as another uid.
        procs.add(500, vmm(1000, vec![jail.api_socket.clone()]));
        assert!(!vm_alive(&vm, &handles, &procs));
        // The jail's uid, but nothing answers at the jail's socket.
        procs.add(500, vmm(900_000, vec![]));
        assert!(!vm_alive(&vm, &handles, &procs));
        // Gone, or not meant to run.
        procs.add(500, vmm(900_000, vec![jail.api_socket.clone()]));
        assert!(!vm_alive(&vm_in(tmp.path(), VmState::Stopped), &handles, &procs));
        procs.remove(500);
        assert!(!vm_alive(&vm, &handles, &procs));

        // Rediscovery of a jailed VM trusts its recorded PID (the OS cannot show it whose
        // descriptors they are) and asks the jail rule.
        procs.add(500, vmm(900_000, vec![jail.api_socket.clone()]));
        handles::write_scratch(tmp.path(), &handles).unwrap();
        procs.clear_reads();
        let r = rediscover_handles(&vm, &procs);
        assert_eq!((r.source, r.alive, r.handles.pid), (HandleSource::Os, true, Some(500)));
        assert!(!procs.reads().iter().any(|r| matches!(r, Read::Listening(_))), "{:?}", procs.reads());
        procs.remove(500);
        let r = rediscover_handles(&vm, &procs);
        assert_eq!((r.source, r.alive), (HandleSource::Scratch, false));
        assert_eq!(r.handles.jail, Some(jail));
    }

    #[test]
    fn status_uid_and_real_sockets_are_read() {
        assert_eq!(
            parse_status_uid(b"Name:\tfirecracker\nUid:\t900000\t900000\t900000\t900000\n"),
            Some(900_000)
        );
        assert_eq!(parse_status_uid(b"Name:\tx\n"), None);
        let me = nix::unistd::getuid().as_raw();
        let procs = ProcFs::default();
        assert_eq!(procs.pid_uid(std::process::id() as i32).unwrap(), Some(me));
        assert_eq!(procs.pid_uid(-1).unwrap(), None);

        let tmp = tempfile::tempdir().unwrap();
        let sock = tmp.path().join("api.sock");
        assert!(!procs.socket_answers(&sock).unwrap(), "no file");
        let listener = UnixListener::bind(&sock).unwrap();
        assert!(procs.socket_answers(&sock).unwrap());
        drop(listener);
        assert!(!procs.socket_answers(&sock).unwrap(), "a socket file nobody listens at");
        let plain = tmp.path().join("plain");
        fs::write(&plain, b"").unwrap();
        assert!(!procs.socket_answers(&plain).unwrap());
    }

    #[test]
    fn a_jails_socket_answers_only_below_its_root_and_through_no_link() {
        let procs = ProcFs::default();
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fs::create_dir_all(root.join("run")).unwrap();
        let sock = root.join("run/firecracker.socket");
        assert!(!procs.jail_socket_answers(&root, &sock).unwrap(), "no socket yet");
        let _listener = UnixListener::bind(&sock).unwrap();
        assert!(procs.jail_socket_answers(&root, &sock).unwrap());
        // The jail's uid points its socket path at another socket of the user's.
        let other = tmp.path().join("other.sock");
        let _other = UnixListener::bind(&other).unwrap();
        fs::remove_file(&sock).unwrap();
        std::os::unix::fs::symlink(&other, &sock).unwrap();
        assert!(procs.socket_answers(&sock).unwrap(), "followed by path, it would answer");
        assert!(!procs.jail_socket_answers(&root, &sock).unwrap(), "never through a link");
        fs::remove_file(&sock).unwrap();
        fs::remove_dir(root.join("run")).unwrap();
        std::os::unix::fs::symlink(tmp.path(), root.join("run")).unwrap();
        fs::rename(&other, tmp.path().join("firecracker.socket")).unwrap();
        assert!(!procs.jail_socket_answers(&root, &sock).unwrap(), "nor through a linked directory");
        assert!(!procs.jail_socket_answers(&root, &other).unwrap(), "nor outside the jail");
    }

    #[test]
    fn rediscover_prefers_the_os_and_keeps_scratch_fields() {
        let tmp = tempfile::tempdir().unwrap();
        let vm = vm_in(tmp.path(), VmState::Running);
        let scratch = VmHandles {
            version: crate::model::HANDLES_VERSION,
            pid: Some(4000),
            tap: Some("bgabc".into()),
            cow_loop: Some("/dev/loop9".into()),
            ..Default::default()
        };
        handles::write_scratch(tmp.path(), &scratch).unwrap();
        let procs = FakeProcesses::new();
        procs.add_vmm(200, &vm.api_socket);
        let r = rediscover_handles(&vm, &procs);
        assert_eq!(r.source, HandleSource::Os);
        assert!(r.alive);
        assert_eq!(r.handles, VmHandles { pid: Some(200), ..scratch.clone() });
        assert!(r.scratch_error.is_none() && r.os_error.is_none());
    }

    #[test]
    fn rediscover_picks_the_scratch_pid_or_the_one_naming_the_socket_among_several() {
        let tmp = tempfile::tempdir().unwrap();
        let vm = vm_in(tmp.path(), VmState::Running);
        let procs = FakeProcesses::new();
        // 300 inherited the listener but is something else; 301 is the VMM.
        procs.add(
            300,
            FakeProcess {
                state: PidState::Live('S'),
                cmdline: vec!["sh".into()],
                listening: vec![vm.api_socket.clone()],
                uid: 1000,
            },
        );
        procs.add_vmm(301, &vm.api_socket);
        assert_eq!(rediscover_handles(&vm, &procs).handles.pid, Some(301));
        handles::write_scratch(tmp.path(), &pid_handles(300)).unwrap();
        assert_eq!(rediscover_handles(&vm, &procs).handles.pid, Some(300));
    }

    #[test]
    fn rediscover_asks_the_recorded_pid_alone_when_it_serves_the_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let vm = vm_in(tmp.path(), VmState::Running);
        handles::write_scratch(tmp.path(), &pid_handles(400)).unwrap();
        let procs = FakeProcesses::new();
        procs.add_vmm(400, &vm.api_socket);
        let r = rediscover_handles(&vm, &procs);
        assert_eq!((r.source, r.alive, r.handles.pid), (HandleSource::Os, true, Some(400)));
        // No search of every process's descriptors.
        assert!(!procs.reads().iter().any(|r| matches!(r, Read::Listening(_))), "{:?}", procs.reads());
        let asked =
            procs.reads().iter().filter(|r| **r == Read::ListensAt(400, vm.api_socket.clone())).count();
        assert_eq!(asked, 1, "its socket table read once: {:?}", procs.reads());

        // A recorded PID that no longer serves the socket: the search finds the one that does.
        procs.remove(400);
        procs.add_vmm(401, &vm.api_socket);
        procs.clear_reads();
        let r = rediscover_handles(&vm, &procs);
        assert_eq!((r.source, r.alive, r.handles.pid), (HandleSource::Os, true, Some(401)));
        assert!(procs.reads().contains(&Read::Listening(vm.api_socket.clone())));
    }

    #[test]
    fn rediscover_returns_scratch_when_the_process_is_dead() {
        let tmp = tempfile::tempdir().unwrap();
        let vm = vm_in(tmp.path(), VmState::Running);
        let scratch = VmHandles { tap: Some("bgdead".into()), ..pid_handles(555) };
        handles::write_scratch(tmp.path(), &scratch).unwrap();
        let procs = FakeProcesses::new();
        // The pid was recycled by an unrelated process.
        procs.add(
            555,
            FakeProcess { state: PidState::Live('R'), cmdline: vec![], listening: vec![], uid: 1000 },
        );
        let r = rediscover_handles(&vm, &procs);
        assert_eq!(r.source, HandleSource::Scratch);
        assert!(!r.alive);
        assert_eq!(r.handles.tap.as_deref(), Some("bgdead"));
        assert_eq!(r.handles.pid, Some(555));
    }

    #[test]
    fn rediscover_survives_missing_and_corrupt_scratch() {
        let tmp = tempfile::tempdir().unwrap();
        let vm = vm_in(tmp.path(), VmState::Running);
        let procs = FakeProcesses::new();
        let r = rediscover_handles(&vm, &procs);
        assert_eq!((r.source, r.alive, r.handles.is_empty()), (HandleSource::None, false, true));
        assert!(r.scratch_error.is_none());

        fs::write(handles::scratch_path(tmp.path()), b"{garbage").unwrap();
        let r = rediscover_handles(&vm, &procs);
        assert_eq!(r.source, HandleSource::None);
        assert!(matches!(r.scratch_error, Some(HandlesError::Corrupt { .. })));

        procs.add_vmm(700, &vm.api_socket);
        let r = rediscover_handles(&vm, &procs);
        assert_eq!((r.source, r.alive, r.handles.pid), (HandleSource::Os, true, Some(700)));
        assert!(r.scratch_error.is_some());
    }

    #[test]
    fn rediscover_reports_an_unreadable_process_table() {
        let tmp = tempfile::tempdir().unwrap();
        let vm = vm_in(tmp.path(), VmState::Running);
        handles::write_scratch(tmp.path(), &pid_handles(42)).unwrap();
        let procs = FakeProcesses::new();
        procs.set_broken(true);
        let r = rediscover_handles(&vm, &procs);
        assert!(r.os_error.is_some());
        assert_eq!((r.source, r.alive), (HandleSource::Scratch, false));
    }

    /// A child (`sleep`) whose stdin is a unix socket listening at `path`; the test's own copy of
    /// the listener is closed, so the child is the only holder. Killed and reaped on drop.
    struct Holder(Child);

    impl Holder {
        fn spawn(path: &Path) -> Holder {
            let listener = UnixListener::bind(path).unwrap();
            let child = Command::new("sleep")
                .arg("60")
                .stdin(Stdio::from(OwnedFd::from(listener)))
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            Holder(child)
        }

        fn pid(&self) -> i32 {
            self.0.id() as i32
        }
    }

    impl Drop for Holder {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn wait_for(mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "condition not reached in time");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn real_proc_finds_the_listener_and_sees_its_zombie() {
        let tmp = tempfile::tempdir().unwrap();
        let vm = vm_in(tmp.path(), VmState::Running);
        let procs = ProcFs::default();
        let mut holder = Holder::spawn(&vm.api_socket);
        let pid = holder.pid();

        // Another test's child may hold a copy between its fork and exec: wait for it to pass.
        wait_for(|| procs.listening_pids(&vm.api_socket).unwrap() == [pid]);
        assert!(procs.pid_listens_at(pid, &vm.api_socket).unwrap());
        assert!(matches!(procs.pid_state(pid).unwrap(), PidState::Live(_)));
        assert!(vm_alive(&vm, &pid_handles(pid), &procs));
        let r = rediscover_handles(&vm, &procs);
        assert_eq!((r.source, r.alive, r.handles.pid), (HandleSource::Os, true, Some(pid)));

        // Our own pid is alive but does not serve the socket: a recycled pid never counts.
        let me = std::process::id() as i32;
        assert!(!vm_alive(&vm, &pid_handles(me), &procs));

        // Killed but not reaped: a zombie, holding nothing.
        holder.0.kill().unwrap();
        wait_for(|| procs.pid_state(pid).unwrap() == PidState::Zombie);
        assert!(!vm_alive(&vm, &pid_handles(pid), &procs));
        assert!(procs.listening_pids(&vm.api_socket).unwrap().is_empty());
        let r = rediscover_handles(&vm, &procs);
        assert_eq!((r.source, r.alive), (HandleSource::None, false));

        // Reaped: gone.
        holder.0.wait().unwrap();
        assert_eq!(procs.pid_state(pid).unwrap(), PidState::Gone);
        assert_eq!(procs.cmdline(pid).unwrap(), None);
    }

    #[test]
    fn real_kill_signals_only_the_process_serving_the_socket() {
        use std::os::unix::process::ExitStatusExt;

        let tmp = tempfile::tempdir().unwrap();
        let sock = tmp.path().join("fc.sock");
        let procs = ProcFs::default();
        let mut holder = Holder::spawn(&sock);
        let mut bystander = Holder(Command::new("sleep").arg("60").spawn().unwrap());

        assert!(!procs.kill_vmm(bystander.pid(), &sock).unwrap(), "a process not serving the socket");
        assert!(bystander.0.try_wait().unwrap().is_none(), "the bystander must not be signalled");

        assert!(procs.kill_vmm(holder.pid(), &sock).unwrap());
        let status = holder.0.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(!procs.kill_vmm(holder.pid(), &sock).unwrap(), "a reaped process is not signalled again");
        bystander.0.kill().unwrap();
    }

    #[tokio::test]
    async fn kill_and_wait_kills_only_the_vmm_and_reports_one_that_survives() {
        let procs = FakeProcesses::new();
        let sock = Path::new("/run/fc.sock");
        procs.add_vmm(9, sock);
        let limit = Duration::from_millis(100);
        assert!(!kill_and_wait(&procs, 9, Path::new("/run/other.sock"), limit).await.unwrap());
        assert!(!kill_and_wait(&procs, 10, sock, limit).await.unwrap(), "nothing to kill");
        assert!(kill_and_wait(&procs, 9, sock, limit).await.unwrap());
        assert_eq!(procs.pid_state(9).unwrap(), PidState::Gone);

        procs.add_vmm(11, sock);
        procs.survive_kills(true);
        let err = kill_and_wait(&procs, 11, sock, limit).await.unwrap_err();
        assert!(matches!(err, LivenessError::Survived { pid: 11, .. }), "{err:?}");
        assert!(err.to_string().contains("did not exit"), "{err}");
        assert_eq!(procs.kills(), [9, 11]);
    }

    #[test]
    fn fake_kill_records_and_removes() {
        let procs = FakeProcesses::new();
        let sock = Path::new("/run/fc.sock");
        procs.add_vmm(9, sock);
        assert!(!procs.kill_vmm(9, Path::new("/run/other.sock")).unwrap());
        assert!(procs.kill_vmm(9, sock).unwrap());
        assert_eq!(procs.kills(), [9]);
        assert_eq!(procs.pid_state(9).unwrap(), PidState::Gone);
    }
}
