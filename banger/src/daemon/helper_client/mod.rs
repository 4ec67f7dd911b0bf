//! The daemon's side of the root helper's socket.
//!
//! [`HelperApi`] is the narrow seam through which bangerd asks for kernel objects: one method
//! per helper request, each naming VMs by id (the helper derives every kernel-visible name).
//! [`SocketHelper`] implements it over the helper's unix socket; the tests of code built on it use
//! an in-memory, recording implementation (`fake::FakeHelper`, compiled only for tests).
//!
//! A [`SocketHelper`] connection's life:
//! 1. On first use it connects to the socket (`/run/banger/helper.sock` unless configured) and
//!    sends `Hello { PROTOCOL_VERSION, install_id }`. A helper speaking another version answers
//!    with [`HelperError::VersionMismatch`], returned as [`HelperClientError::Helper`]. The
//!    reply's capabilities (whether the helper can make dm-snapshot roots here) are kept, and
//!    renewed with every new connection ([`HelperApi::capabilities`]).
//! 2. The connection is kept and reused; requests take turns on it (a mutex), each one frame
//!    answered by one frame. `LoopAttach` carries its backing file as an fd (SCM_RIGHTS),
//!    `JailLaunch` the VM's files (kernel, initrd, root and work drives).
//! 3. If the connection turns out to be broken (the helper restarted, e.g. under socket
//!    activation), the client reconnects, says `Hello` again and resends the request, once.
//!    Resending is safe because every request the daemon sends is idempotent: `TapCreate`,
//!    `LoopAttach`, `DmCreate` and `JailLaunch` return the object that already exists for the
//!    VM (and role), `NatUp` applies only the difference, a teardown or `JailKill` treats
//!    "absent" as done, and the rest only read.
//!    A second break is [`HelperClientError::ConnectionLost`].
//! 4. A helper that cannot be reached at all is [`HelperClientError::Unreachable`], whose message
//!    says how to start it. Each exchange (including connecting) is bounded by a timeout; after a
//!    timeout or a malformed answer the connection is dropped so no late answer is misread.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_protocol::frame::{self, FrameError};
use banger_protocol::{
    Capabilities, DmInfo, HelperError, InstallId, JailFiles, JailInfo, LoopInfo, LoopRole, MAX_TEARDOWN_VMS,
    NatInfo, OwnedObjects, PROTOCOL_VERSION, Request, Response, TapInfo, TeardownReport, VmId, VmShape,
};
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::net::UnixStream;

/// How long one exchange with the helper may take by default. Generous: a teardown of many
/// VMs runs the firewall tools.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a helper request failed.
#[derive(Debug, thiserror::Error)]
pub enum HelperClientError {
    /// Nothing answers at the helper's socket.
    #[error(
        "cannot reach banger-helper at {socket}: is banger-helper running? start it with `sudo systemctl start banger-helper.socket` or `sudo banger-helper serve`"
    )]
    Unreachable {
        /// The helper's socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The socket exists but this user may not open it.
    #[error("permission denied on banger-helper's socket {socket}: {problem}")]
    NoAccess {
        /// The helper's socket.
        socket: PathBuf,
        /// What stands in the way, as found on disk.
        problem: AccessProblem,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The helper answered with a typed error.
    #[error("banger-helper refused the request: {0}")]
    Helper(HelperError),
    /// The conversation broke the protocol (malformed or oversized frame).
    #[error(
        "protocol error talking to banger-helper at {socket}; install matching banger and banger-helper releases"
    )]
    Protocol {
        /// The helper's socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: FrameError,
    },
    /// The helper answered with a response that does not fit the request.
    #[error(
        "banger-helper at {socket} answered {op} with {got}; install matching banger and banger-helper releases"
    )]
    UnexpectedResponse {
        /// The helper's socket.
        socket: PathBuf,
        /// The request.
        op: &'static str,
        /// What came back.
        got: String,
    },
    /// The connection broke again after reconnecting.
    #[error(
        "the connection to banger-helper at {socket} broke twice during {op}: the helper may be restarting or crashing; see its log (`journalctl -u banger-helper`)"
    )]
    ConnectionLost {
        /// The helper's socket.
        socket: PathBuf,
        /// The request.
        op: &'static str,
        /// The last break.
        #[source]
        source: FrameError,
    },
    /// No answer in time.
    #[error("banger-helper at {socket} did not answer {op} within {timeout:?}")]
    Timeout {
        /// The helper's socket.
        socket: PathBuf,
        /// The request.
        op: &'static str,
        /// The limit.
        timeout: Duration,
    },
}

/// Why this user may not open the helper's socket, as the files say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessProblem {
    /// A directory on the way to the socket cannot be searched by this user.
    DirNotSearchable {
        /// The directory.
        dir: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// This user is not in the group that owns the socket.
    NotInGroup {
        /// The socket's group, by name when it has one.
        group: String,
    },
    /// This user is in the socket's group, but the socket is not writable by it.
    SocketMode {
        /// The socket's permission bits.
        mode: u32,
    },
    /// Nothing on disk explains it (e.g. a security module refused).
    Unexplained,
}

impl std::fmt::Display for AccessProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccessProblem::DirNotSearchable { dir, mode } => write!(
                f,
                "the directory {} (mode {mode:04o}) is not searchable by your user; banger-helper \
                 makes its socket directory 0755 when it starts: ask an admin to restart it, or to \
                 run `chmod 0755 {}`",
                dir.display(),
                dir.display()
            ),
            AccessProblem::NotInGroup { group } => write!(
                f,
                "your user is not in group `{group}`, which may use the socket; ask an admin to add \
                 you (`usermod -aG {group} USER`) and to admit you in the helper's policy, then log \
                 in again (or run `newgrp {group}`)"
            ),
            AccessProblem::SocketMode { mode } => write!(
                f,
                "the socket is mode {mode:04o}, not writable by its group; banger-helper makes it \
                 0660 when it starts: ask an admin to restart it"
            ),
            AccessProblem::Unexplained => f.write_str(
                "the socket's directories and group allow you, so something else refused (a \
                 security module?); ask an admin to check the helper's socket",
            ),
        }
    }
}

/// Works out, from the socket's path, its directories and the user's groups, why a `connect()`
/// was refused.
pub fn access_problem(socket: &Path) -> AccessProblem {
    use nix::unistd::{AccessFlags, Gid, Group, access};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut dirs: Vec<&Path> = socket.ancestors().skip(1).filter(|d| !d.as_os_str().is_empty()).collect();
    dirs.reverse();
    for dir in dirs {
        if access(dir, AccessFlags::X_OK) == Err(nix::errno::Errno::EACCES) {
            let mode = std::fs::metadata(dir).map(|m| m.permissions().mode() & 0o7777).unwrap_or(0);
            return AccessProblem::DirNotSearchable { dir: dir.to_owned(), mode };
        }
    }
    let Ok(meta) = std::fs::metadata(socket) else { return AccessProblem::Unexplained };
    let gid = meta.gid();
    let mine = nix::unistd::getgroups().unwrap_or_default();
    let in_group = nix::unistd::getegid().as_raw() == gid || mine.iter().any(|g| g.as_raw() == gid);
    if !in_group {
        let group =
            Group::from_gid(Gid::from_raw(gid)).ok().flatten().map_or_else(|| gid.to_string(), |g| g.name);
        return AccessProblem::NotInGroup { group };
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o020 == 0 {
        return AccessProblem::SocketMode { mode };
    }
    AccessProblem::Unexplained
}

/// What a failed `connect()` to the helper's socket means for the user.
fn connect_error(socket: PathBuf, source: io::Error) -> HelperClientError {
    match source.kind() {
        io::ErrorKind::PermissionDenied => {
            let problem = access_problem(&socket);
            HelperClientError::NoAccess { socket, problem, source }
        }
        _ => HelperClientError::Unreachable { socket, source },
    }
}

impl HelperClientError {
    /// Whether the helper could not be reached or opened (as opposed to answering with an error).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, HelperClientError::Unreachable { .. } | HelperClientError::NoAccess { .. })
    }
}

/// The helper's operations, as the daemon uses them.
pub trait HelperApi: Send + Sync {
    /// Health check.
    fn ping(&self) -> BoxFuture<'_, Result<(), HelperClientError>>;
    /// What the helper offers on this host (from its answer to `Hello`), asking it if needed.
    fn capabilities(&self) -> BoxFuture<'_, Result<Capabilities, HelperClientError>>;
    /// Creates (or returns the existing) TAP of `vm`.
    fn tap_create(&self, vm: &VmId) -> BoxFuture<'_, Result<TapInfo, HelperClientError>>;
    /// Installs the NAT of `vm` (idempotent).
    fn nat_up(&self, vm: &VmId) -> BoxFuture<'_, Result<NatInfo, HelperClientError>>;
    /// Attaches a loop device to the open file `file` (passed as an fd, never a path).
    fn loop_attach(
        &self,
        vm: &VmId,
        role: LoopRole,
        read_only: bool,
        file: OwnedFd,
    ) -> BoxFuture<'_, Result<LoopInfo, HelperClientError>>;
    /// Makes (or returns the existing) dm-snapshot root of `vm` over its base and copy-on-write
    /// loop devices; its device node is the caller's.
    fn dm_create(&self, vm: &VmId) -> BoxFuture<'_, Result<DmInfo, HelperClientError>>;
    /// Everything the caller owns, across all of its installs (each object tagged).
    fn list_owned(&self) -> BoxFuture<'_, Result<OwnedObjects, HelperClientError>>;
    /// Tears down everything of `vms` for this install (any number; sent in batches): NAT,
    /// TAPs, dm-snapshots and loop devices, absent objects counting as removed.
    fn teardown_vms(&self, vms: &[VmId]) -> BoxFuture<'_, Result<TeardownReport, HelperClientError>>;
    /// Launches the VMM of `vm` through the jailer (or returns the jail that already runs it),
    /// with the VM's files as descriptors in the order `files` says: kernel, [initrd], root
    /// drive, [work drive].
    fn jail_launch(
        &self,
        vm: &VmId,
        shape: VmShape,
        files: JailFiles,
        fds: Vec<OwnedFd>,
    ) -> BoxFuture<'_, Result<JailInfo, HelperClientError>>;
    /// Kills the jailed VMM of `vm` and removes its jail (absent counts as removed).
    fn jail_kill(&self, vm: &VmId) -> BoxFuture<'_, Result<TeardownReport, HelperClientError>>;
}

/// The answer one kind of request expects: each maps to one [`Response`] variant.
trait Answer: Sized {
    /// Takes the expected variant out of `response`, or gives `response` back (boxed: it is large).
    fn from_response(response: Response) -> Result<Self, Box<Response>>;
}

/// The answer to `Ping`.
struct Pong;

impl Answer for Pong {
    fn from_response(response: Response) -> Result<Self, Box<Response>> {
        match response {
            Response::Pong => Ok(Pong),
            other => Err(Box::new(other)),
        }
    }
}

/// `impl Answer for T` taking `Response::Variant(t)`.
macro_rules! answer {
    ($($answer:ty => $variant:ident),* $(,)?) => {$(
        impl Answer for $answer {
            fn from_response(response: Response) -> Result<Self, Box<Response>> {
                match response {
                    Response::$variant(answer) => Ok(answer),
                    other => Err(Box::new(other)),
                }
            }
        }
    )*};
}

answer! {
    TapInfo => Tap,
    NatInfo => Nat,
    LoopInfo => Loop,
    DmInfo => Dm,
    OwnedObjects => Owned,
    TeardownReport => Teardown,
    JailInfo => Jail,
}

/// One attempt's failure: a broken connection may be retried, anything else may not.
enum AttemptError {
    Broken(FrameError),
    Fatal(HelperClientError),
}

/// Whether a frame error means the connection is gone (rather than a malformed conversation).
fn is_broken(e: &FrameError) -> bool {
    match e {
        FrameError::Closed | FrameError::Truncated => true,
        FrameError::Io(io) => matches!(
            io.kind(),
            io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::NotConnected
                | io::ErrorKind::UnexpectedEof
        ),
        FrameError::TooLarge(_) | FrameError::TooManyFds | FrameError::Codec(_) => false,
    }
}

/// A short name of a response variant, for errors: `pong`, `tap`, ..., or the error.
fn response_name(r: &Response) -> String {
    match r {
        Response::Error(e) => format!("error {e}"),
        other => {
            let debug = format!("{other:?}");
            debug.split(['(', ' ', '{']).next().unwrap_or_default().to_lowercase()
        }
    }
}

/// [`HelperApi`] over the helper's unix socket.
#[derive(Debug)]
pub struct SocketHelper {
    socket: PathBuf,
    install_id: InstallId,
    timeout: Duration,
    /// Guards the one connection to the helper (`None` before first use and after a failure).
    /// Held for a whole exchange, so requests and answers never interleave.
    conn: tokio::sync::Mutex<Option<UnixStream>>,
    /// Guards the capabilities of the last accepted `Hello` (`None` before the first).
    capabilities: std::sync::Mutex<Option<Capabilities>>,
}

impl SocketHelper {
    /// A client for the helper at `socket`, tagging its objects with `install_id`. Nothing is
    /// connected until the first request.
    pub fn new(socket: impl Into<PathBuf>, install_id: InstallId) -> Self {
        Self {
            socket: socket.into(),
            install_id,
            timeout: DEFAULT_TIMEOUT,
            conn: tokio::sync::Mutex::new(None),
            capabilities: std::sync::Mutex::new(None),
        }
    }

    /// The same client with another per-exchange timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The helper's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The install id sent in `Hello`.
    pub fn install_id(&self) -> &InstallId {
        &self.install_id
    }

    fn protocol(&self, source: FrameError) -> HelperClientError {
        HelperClientError::Protocol { socket: self.socket.clone(), source }
    }

    fn unexpected(&self, op: &'static str, got: &Response) -> HelperClientError {
        HelperClientError::UnexpectedResponse { socket: self.socket.clone(), op, got: response_name(got) }
    }

    /// Connects and says `Hello`.
    async fn connect(&self) -> Result<UnixStream, AttemptError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|source| AttemptError::Fatal(connect_error(self.socket.clone(), source)))?;
        let hello = Request::Hello { version: PROTOCOL_VERSION, install_id: self.install_id.clone() };
        match self.exchange(&stream, &hello, &[]).await? {
            Response::Hello(reply) if reply.version == PROTOCOL_VERSION => {
                tracing::debug!(socket = %self.socket.display(), helper = %reply.helper_version, capabilities = ?reply.capabilities, "connected to banger-helper");
                *self.capabilities.lock().unwrap_or_else(|p| p.into_inner()) = Some(reply.capabilities);
                Ok(stream)
            }
            Response::Hello(reply) => {
                Err(AttemptError::Fatal(HelperClientError::Helper(HelperError::VersionMismatch {
                    client: PROTOCOL_VERSION,
                    helper: reply.version,
                })))
            }
            Response::Error(e) => Err(AttemptError::Fatal(HelperClientError::Helper(e))),
            other => Err(AttemptError::Fatal(self.unexpected("hello", &other))),
        }
    }

    /// Sends one request and reads its answer. Descriptors arriving with an answer are closed.
    async fn exchange(
        &self,
        stream: &UnixStream,
        req: &Request,
        fds: &[OwnedFd],
    ) -> Result<Response, AttemptError> {
        let classify = |e: FrameError| {
            if is_broken(&e) { AttemptError::Broken(e) } else { AttemptError::Fatal(self.protocol(e)) }
        };
        let fds: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        frame::send(stream, req, &fds).await.map_err(classify)?;
        let (resp, _fds) = frame::recv::<Response>(stream).await.map_err(classify)?;
        Ok(resp)
    }

    /// One attempt on the current (or a fresh) connection.
    async fn attempt(
        &self,
        conn: &mut Option<UnixStream>,
        req: &Request,
        fds: &[OwnedFd],
    ) -> Result<Response, AttemptError> {
        if conn.is_none() {
            *conn = Some(self.connect().await?);
        }
        let stream = conn.as_ref().expect("connected just above");
        self.exchange(stream, req, fds).await
    }

    /// Sends `req` (with its descriptors `fds`) and returns the answer it expects; a typed error
    /// answer becomes [`HelperClientError::Helper`], any other answer
    /// [`HelperClientError::UnexpectedResponse`].
    async fn call<R: Answer>(&self, req: Request, fds: &[OwnedFd]) -> Result<R, HelperClientError> {
        let op = req.op_name();
        R::from_response(self.send(req, fds).await?).map_err(|other| self.unexpected(op, &other))
    }

    /// Sends `req` and returns the helper's answer; a typed error answer becomes
    /// [`HelperClientError::Helper`]. Reconnects once on a broken connection.
    async fn send(&self, req: Request, fds: &[OwnedFd]) -> Result<Response, HelperClientError> {
        let op = req.op_name();
        let mut conn = self.conn.lock().await;
        let mut retried = false;
        loop {
            let attempt = tokio::time::timeout(self.timeout, self.attempt(&mut conn, &req, fds)).await;
            let err = match attempt {
                Ok(Ok(Response::Error(e))) => return Err(HelperClientError::Helper(e)),
                Ok(Ok(resp)) => return Ok(resp),
                Ok(Err(e)) => e,
                Err(_) => {
                    *conn = None;
                    return Err(HelperClientError::Timeout {
                        socket: self.socket.clone(),
                        op,
                        timeout: self.timeout,
                    });
                }
            };
            *conn = None;
            match err {
                AttemptError::Broken(source) if !retried => {
                    tracing::info!(socket = %self.socket.display(), op, error = %source, "connection to banger-helper broke; reconnecting");
                    retried = true;
                }
                AttemptError::Broken(source) => {
                    return Err(HelperClientError::ConnectionLost {
                        socket: self.socket.clone(),
                        op,
                        source,
                    });
                }
                AttemptError::Fatal(e) => return Err(e),
            }
        }
    }
}

impl HelperApi for SocketHelper {
    fn ping(&self) -> BoxFuture<'_, Result<(), HelperClientError>> {
        async move { self.call::<Pong>(Request::Ping, &[]).await.map(drop) }.boxed()
    }

    fn capabilities(&self) -> BoxFuture<'_, Result<Capabilities, HelperClientError>> {
        async move {
            // A ping makes sure a connection (and so a `Hello` answer) exists; a helper restarted
            // since the last one is asked again.
            self.call::<Pong>(Request::Ping, &[]).await?;
            let caps = self.capabilities.lock().unwrap_or_else(|p| p.into_inner()).clone();
            Ok(caps.unwrap_or_default())
        }
        .boxed()
    }

    fn tap_create(&self, vm: &VmId) -> BoxFuture<'_, Result<TapInfo, HelperClientError>> {
        let vm = vm.clone();
        async move { self.call(Request::TapCreate { vm }, &[]).await }.boxed()
    }

    fn nat_up(&self, vm: &VmId) -> BoxFuture<'_, Result<NatInfo, HelperClientError>> {
        let vm = vm.clone();
        async move { self.call(Request::NatUp { vm }, &[]).await }.boxed()
    }

    fn loop_attach(
        &self,
        vm: &VmId,
        role: LoopRole,
        read_only: bool,
        file: OwnedFd,
    ) -> BoxFuture<'_, Result<LoopInfo, HelperClientError>> {
        let vm = vm.clone();
        // `file` stays open here until the answer (or the retry) is done.
        async move { self.call(Request::LoopAttach { vm, role, read_only }, std::slice::from_ref(&file)).await }.boxed()
    }

    fn dm_create(&self, vm: &VmId) -> BoxFuture<'_, Result<DmInfo, HelperClientError>> {
        let vm = vm.clone();
        async move { self.call(Request::DmCreate { vm }, &[]).await }.boxed()
    }

    fn list_owned(&self) -> BoxFuture<'_, Result<OwnedObjects, HelperClientError>> {
        async move { self.call(Request::ListOwned, &[]).await }.boxed()
    }

    fn teardown_vms(&self, vms: &[VmId]) -> BoxFuture<'_, Result<TeardownReport, HelperClientError>> {
        let vms = vms.to_vec();
        async move {
            let mut total = TeardownReport::default();
            for batch in vms.chunks(MAX_TEARDOWN_VMS) {
                let r: TeardownReport = self.call(Request::TeardownVms { vms: batch.to_vec() }, &[]).await?;
                total.torn_down.extend(r.torn_down);
                total.failures.extend(r.failures);
            }
            Ok(total)
        }
        .boxed()
    }

    fn jail_launch(
        &self,
        vm: &VmId,
        shape: VmShape,
        files: JailFiles,
        fds: Vec<OwnedFd>,
    ) -> BoxFuture<'_, Result<JailInfo, HelperClientError>> {
        let vm = vm.clone();
        // The descriptors stay open here until the answer (or the retry) is done.
        async move { self.call(Request::JailLaunch { vm, shape, files }, &fds).await }.boxed()
    }

    fn jail_kill(&self, vm: &VmId) -> BoxFuture<'_, Result<TeardownReport, HelperClientError>> {
        let vm = vm.clone();
        async move { self.call(Request::JailKill { vm }, &[]).await }.boxed()
    }
}

#[cfg(test)]
pub(crate) mod fake;

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::sync::{Arc, Mutex};

    use banger_protocol::{Capabilities, HelloReply};
    use tokio::net::UnixListener;

    use super::fake::FakeHelper;

    /// The socket a child run of [`access_problems_are_told_apart`] diagnoses.
    const CHILD_SOCKET: &str = "BANGER_TEST_ACCESS_SOCKET";

    /// Run as root: each refusal is diagnosed by a child run of this test as uid/gid 65534
    /// without supplementary groups, which prints what it found.
    #[test]
    #[ignore = "needs root: the diagnosis runs as another uid"]
    fn access_problems_are_told_apart() {
        use std::os::unix::fs::{PermissionsExt, chown};
        use std::os::unix::process::CommandExt;
        if let Some(socket) = std::env::var_os(CHILD_SOCKET) {
            println!("PROBLEM {:?}", access_problem(Path::new(&socket)));
            return;
        }
        if !nix::unistd::geteuid().is_root() {
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "needs root, and CI=true");
            eprintln!("SKIPPED: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path();
        std::fs::set_permissions(top, std::fs::Permissions::from_mode(0o755)).unwrap();
        let make = |sub: &str, dir_mode: u32, gid: u32, sock_mode: u32| {
            let d = top.join(sub);
            std::fs::create_dir(&d).unwrap();
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(dir_mode)).unwrap();
            let sock = d.join("helper.sock");
            let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
            chown(&sock, Some(0), Some(gid)).unwrap();
            std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(sock_mode)).unwrap();
            (sock, listener)
        };
        let cases = [
            (make("closed", 0o700, 65534, 0o660), "DirNotSearchable"),
            (make("othergroup", 0o755, 0, 0o660), "NotInGroup"),
            (make("readonly", 0o755, 65534, 0o640), "SocketMode"),
        ];
        let me = std::env::current_exe().unwrap();
        for ((sock, _listener), want) in &cases {
            let out = std::process::Command::new(&me)
                .args(["--exact", "daemon::helper_client::tests::access_problems_are_told_apart"])
                .args(["--include-ignored", "--nocapture", "--test-threads=1"])
                .env(CHILD_SOCKET, sock)
                .uid(65534)
                .gid(65534)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text
                .lines()
                .find_map(|l| l.split_once("PROBLEM ").map(|(_, p)| p))
                .unwrap_or_else(|| panic!("{text}"));
            assert!(line.contains(want), "{}: {line}", sock.display());
            // Connecting really is refused, and the message says why.
            let e = connect_error(sock.clone(), io::Error::from(io::ErrorKind::PermissionDenied));
            assert!(e.to_string().contains(&sock.display().to_string()), "{e}");
        }
        let closed = &cases[0].0.0;
        let text = AccessProblem::DirNotSearchable { dir: closed.parent().unwrap().to_owned(), mode: 0o700 }
            .to_string();
        assert!(
            text.contains("not searchable") && text.contains("0700") && text.contains("chmod 0755"),
            "{text}"
        );
        let text = AccessProblem::NotInGroup { group: "banger".into() }.to_string();
        assert!(text.contains("not in group `banger`") && text.contains("newgrp banger"), "{text}");
    }
    use super::*;

    fn install() -> InstallId {
        InstallId::new("00112233aabbccdd").unwrap()
    }

    fn vm(s: &str) -> VmId {
        VmId::new(s).unwrap()
    }

    /// What the test server does with one request.
    #[derive(Clone)]
    enum Act {
        /// Answer through the fake helper.
        Backend,
        /// Answer through the fake helper, then hang up.
        BackendThenClose,
        /// Hang up without answering.
        Close,
        /// Answer with bytes that are no message.
        Garbage,
        /// Never answer.
        Silent,
        /// Answer this.
        Reply(Response),
    }

    type Script = Arc<dyn Fn(usize, usize, &Request) -> Act + Send + Sync>;

    #[derive(Debug, Default)]
    struct Log {
        connections: usize,
        hellos: Vec<Request>,
        requests: Vec<(usize, Request)>,
        fds: Vec<(u64, u64)>,
    }

    struct Server {
        _dir: tempfile::TempDir,
        socket: PathBuf,
        backend: Arc<FakeHelper>,
        log: Arc<Mutex<Log>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Server {
        fn log(&self) -> std::sync::MutexGuard<'_, Log> {
            self.log.lock().unwrap()
        }

        fn client(&self) -> SocketHelper {
            SocketHelper::new(&self.socket, install()).with_timeout(Duration::from_secs(5))
        }
    }

    fn ok_hello() -> Response {
        Response::Hello(HelloReply {
            version: PROTOCOL_VERSION,
            helper_version: "0.1.0".into(),
            capabilities: Capabilities::default(),
        })
    }

    /// Maps a request onto the fake helper, as the real helper's dispatch would.
    async fn dispatch(fake: &FakeHelper, req: Request, mut fds: Vec<OwnedFd>) -> Response {
        let r = match req {
            Request::Ping => fake.ping().await.map(|()| Response::Pong),
            Request::TapCreate { vm } => fake.tap_create(&vm).await.map(Response::Tap),
            Request::NatUp { vm } => fake.nat_up(&vm).await.map(Response::Nat),
            Request::LoopAttach { vm, role, read_only } => match fds.pop() {
                Some(fd) => fake.loop_attach(&vm, role, read_only, fd).await.map(Response::Loop),
                None => return Response::Error(HelperError::invalid("no fd")),
            },
            Request::ListOwned => fake.list_owned().await.map(Response::Owned),
            Request::TeardownVms { vms } => fake.teardown_vms(&vms).await.map(Response::Teardown),
            Request::DmCreate { vm } => fake.dm_create(&vm).await.map(Response::Dm),
            Request::JailLaunch { vm, shape, files } => {
                fake.jail_launch(&vm, shape, files, fds).await.map(Response::Jail)
            }
            Request::JailKill { vm } => fake.jail_kill(&vm).await.map(Response::Teardown),
            // Requests the daemon never sends.
            _ => return Response::Error(HelperError::invalid("not sent by bangerd")),
        };
        match r {
            Ok(resp) => resp,
            Err(HelperClientError::Helper(e)) => Response::Error(e),
            Err(other) => Response::Error(HelperError::invalid(other.to_string())),
        }
    }

    async fn serve_conn(
        stream: UnixStream,
        conn: usize,
        hello: Response,
        script: Script,
        backend: Arc<FakeHelper>,
        log: Arc<Mutex<Log>>,
    ) {
        let Ok((h, _)) = frame::recv::<Request>(&stream).await else { return };
        log.lock().unwrap().hellos.push(h);
        if frame::send(&stream, &hello, &[]).await.is_err() || !matches!(hello, Response::Hello(_)) {
            return;
        }
        for n in 0.. {
            let Ok((req, fds)) = frame::recv::<Request>(&stream).await else { return };
            {
                let mut l = log.lock().unwrap();
                l.requests.push((conn, req.clone()));
                for fd in &fds {
                    let st = nix::sys::stat::fstat(fd).unwrap();
                    l.fds.push((st.st_dev, st.st_ino));
                }
            }
            match script(conn, n, &req) {
                Act::Backend => {
                    let resp = dispatch(&backend, req, fds).await;
                    let _ = frame::send(&stream, &resp, &[]).await;
                }
                Act::BackendThenClose => {
                    let resp = dispatch(&backend, req, fds).await;
                    let _ = frame::send(&stream, &resp, &[]).await;
                    return;
                }
                Act::Close => return,
                Act::Garbage => {
                    let _ = frame::write_frame(&stream, &[0xff; 7], &[]).await;
                }
                Act::Silent => std::future::pending::<()>().await,
                Act::Reply(r) => {
                    let _ = frame::send(&stream, &r, &[]).await;
                }
            }
        }
    }

    fn server_with(
        hello: Response,
        script: impl Fn(usize, usize, &Request) -> Act + Send + Sync + 'static,
    ) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("helper.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let backend = Arc::new(FakeHelper::new(install()));
        let log = Arc::new(Mutex::new(Log::default()));
        let script: Script = Arc::new(script);
        let (b, l) = (Arc::clone(&backend), Arc::clone(&log));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let conn = {
                    let mut l = l.lock().unwrap();
                    l.connections += 1;
                    l.connections - 1
                };
                tokio::spawn(serve_conn(
                    stream,
                    conn,
                    hello.clone(),
                    Arc::clone(&script),
                    Arc::clone(&b),
                    Arc::clone(&l),
                ));
            }
        });
        Server { _dir: dir, socket, backend, log, task }
    }

    fn server() -> Server {
        server_with(ok_hello(), |_, _, _| Act::Backend)
    }

    #[tokio::test]
    async fn hello_then_typed_calls_on_one_connection() {
        let srv = server();
        let c = srv.client();
        c.ping().await.unwrap();
        let tap = c.tap_create(&vm("dev")).await.unwrap();
        assert_eq!(tap, FakeHelper::tap_for(&install(), &vm("dev"), 0));
        let nat = c.nat_up(&vm("dev")).await.unwrap();
        assert_eq!(nat.guest_ip, tap.guest_ip);
        let owned = c.list_owned().await.unwrap();
        assert_eq!((owned.taps.len(), owned.nat.len()), (1, 1));
        let report = c.teardown_vms(&[vm("dev")]).await.unwrap();
        assert_eq!(report.torn_down, [vm("dev")]);

        let log = srv.log();
        assert_eq!(log.connections, 1, "the connection is reused");
        assert_eq!(log.hellos, [Request::Hello { version: PROTOCOL_VERSION, install_id: install() }]);
        let ops: Vec<&str> = log.requests.iter().map(|(_, r)| r.op_name()).collect();
        assert_eq!(ops, ["ping", "tap-create", "nat-up", "list-owned", "teardown-vms"]);
    }

    #[tokio::test]
    async fn jail_launch_passes_the_files_as_fds_in_order_and_jail_kill_answers_a_teardown() {
        let srv = server();
        let c = srv.client();
        let dir = tempfile::tempdir().unwrap();
        let names = ["vmlinux", "initrd", "rootfs", "work"];
        let mut want = Vec::new();
        let mut fds = Vec::new();
        for name in names {
            let path = dir.path().join(name);
            std::fs::write(&path, name).unwrap();
            let meta = std::fs::metadata(&path).unwrap();
            want.push((meta.dev(), meta.ino()));
            fds.push(OwnedFd::from(std::fs::File::open(&path).unwrap()));
        }
        let shape = VmShape { vcpus: 2, mem_mib: 512 };
        let files = JailFiles { initrd: true, work: true };
        srv.backend.set_jailer(true);
        let jail = c.jail_launch(&vm("dev"), shape, files, fds).await.unwrap();
        assert_eq!((jail.vm.as_str(), jail.shape), ("dev", shape));
        assert!(jail.api_socket.starts_with(&jail.root), "{jail:?}");
        assert_eq!(srv.log().fds, want, "every file, in the protocol's order");
        assert_eq!(srv.backend.jail_launches()[0].fds, want);
        assert_eq!(c.list_owned().await.unwrap().jails, [jail]);
        let report = c.jail_kill(&vm("dev")).await.unwrap();
        assert_eq!(report.torn_down, [vm("dev")]);
        assert!(c.list_owned().await.unwrap().jails.is_empty());
        let ops: Vec<&str> = srv.log().requests.iter().map(|(_, r)| r.op_name()).collect();
        assert_eq!(ops, ["jail-launch", "list-owned", "jail-kill", "list-owned"]);
    }

    #[tokio::test]
    async fn loop_attach_passes_the_file_as_an_fd() {
        let srv = server();
        let c = srv.client();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cow.img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let meta = std::fs::metadata(&path).unwrap();

        let ro = std::fs::File::open(&path).unwrap();
        let info = c.loop_attach(&vm("dev"), LoopRole::Base, false, ro.into()).await.unwrap();
        assert!(info.read_only, "a read-only fd can only give a read-only device");
        assert_eq!((info.role, info.device.as_str()), (LoopRole::Base, "/dev/loop0"));

        let rw = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let info = c.loop_attach(&vm("dev"), LoopRole::Cow, false, rw.into()).await.unwrap();
        assert!(!info.read_only);

        let log = srv.log();
        assert_eq!(log.fds, [(meta.dev(), meta.ino()), (meta.dev(), meta.ino())], "the helper got our file");
        assert_eq!(
            log.requests[0].1,
            Request::LoopAttach { vm: vm("dev"), role: LoopRole::Base, read_only: false }
        );
    }

    #[tokio::test]
    async fn capabilities_come_from_the_hello_and_dm_create_answers_the_dm_node() {
        let srv = server();
        let c = srv.client();
        assert!(!c.capabilities().await.unwrap().device_mapper, "the test helper offers none");

        let caps = Capabilities { device_mapper: true, ..Capabilities::default() };
        let hello = Response::Hello(HelloReply {
            version: PROTOCOL_VERSION,
            helper_version: "0.1.0".into(),
            capabilities: caps.clone(),
        });
        let srv = server_with(hello, |_, _, _| Act::Backend);
        srv.backend.set_device_mapper(true);
        let c = srv.client();
        assert_eq!(c.capabilities().await.unwrap(), caps);
        let dir = tempfile::tempdir().unwrap();
        let (base, cow) = (dir.path().join("base"), dir.path().join("cow"));
        std::fs::write(&base, vec![0u8; 8192]).unwrap();
        std::fs::write(&cow, vec![0u8; 4096]).unwrap();
        let rw = |p: &Path| std::fs::OpenOptions::new().read(true).write(true).open(p).unwrap();
        c.loop_attach(&vm("dev"), LoopRole::Base, true, std::fs::File::open(&base).unwrap().into())
            .await
            .unwrap();
        c.loop_attach(&vm("dev"), LoopRole::Cow, false, rw(&cow).into()).await.unwrap();
        let dm = c.dm_create(&vm("dev")).await.unwrap();
        assert_eq!((dm.vm.clone(), dm.sectors), (vm("dev"), 16));
        assert_eq!(c.dm_create(&vm("dev")).await.unwrap(), dm, "dm-create is idempotent");
        let ops: Vec<&str> = srv.log().requests.iter().map(|(_, r)| r.op_name()).collect();
        assert_eq!(ops, ["ping", "loop-attach", "loop-attach", "dm-create", "dm-create"]);
        assert_eq!(srv.log().connections, 1);
    }

    #[tokio::test]
    async fn a_refused_dm_create_is_a_typed_error() {
        let srv = server();
        let err = srv.client().dm_create(&vm("dev")).await.unwrap_err();
        assert!(matches!(err, HelperClientError::Helper(HelperError::Conflict { .. })), "{err:?}");
    }

    #[tokio::test]
    async fn typed_errors_pass_through_and_keep_the_connection() {
        let srv = server();
        let quota = HelperError::QuotaExceeded { resource: "taps".into(), limit: 4 };
        srv.backend.fail("tap-create", quota.clone());
        let c = srv.client();
        let err = c.tap_create(&vm("dev")).await.unwrap_err();
        match &err {
            HelperClientError::Helper(e) => assert_eq!(e, &quota),
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("at most 4 taps"), "{err}");
        c.ping().await.unwrap();
        assert_eq!(srv.log().connections, 1);
    }

    #[tokio::test]
    async fn reconnects_when_the_helper_dropped_an_idle_connection() {
        // The first connection is closed right after its first answer (a helper restart).
        let srv = server_with(
            ok_hello(),
            |conn, _, _| if conn == 0 { Act::BackendThenClose } else { Act::Backend },
        );
        let c = srv.client();
        c.ping().await.unwrap();
        // Let the server's close land before the next request.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let tap = c.tap_create(&vm("dev")).await.unwrap();
        assert_eq!(tap.vm, vm("dev"));
        let log = srv.log();
        assert_eq!(log.connections, 2);
        assert_eq!(log.hellos.len(), 2, "hello is said again on the new connection");
    }

    #[tokio::test]
    async fn reconnects_and_resends_when_the_helper_dies_mid_request() {
        let srv = server_with(ok_hello(), |conn, _, _| if conn == 0 { Act::Close } else { Act::Backend });
        let c = srv.client();
        let tap = c.tap_create(&vm("dev")).await.unwrap();
        assert_eq!(tap, FakeHelper::tap_for(&install(), &vm("dev"), 0));
        let log = srv.log();
        assert_eq!(log.connections, 2);
        let seen: Vec<(usize, &str)> = log.requests.iter().map(|(c, r)| (*c, r.op_name())).collect();
        assert_eq!(seen, [(0, "tap-create"), (1, "tap-create")]);
    }

    #[tokio::test]
    async fn a_second_break_is_connection_lost() {
        let srv = server_with(ok_hello(), |_, _, _| Act::Close);
        let c = srv.client();
        let err = c.nat_up(&vm("dev")).await.unwrap_err();
        assert!(matches!(err, HelperClientError::ConnectionLost { op: "nat-up", .. }), "{err:?}");
        assert!(err.to_string().contains("journalctl"), "{err}");
        assert_eq!(srv.log().connections, 2, "exactly one reconnect");
    }

    #[tokio::test]
    async fn an_absent_helper_is_unreachable_with_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("helper.sock");
        let c = SocketHelper::new(&missing, install());
        let err = c.ping().await.unwrap_err();
        assert!(err.is_unreachable(), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&missing.display().to_string()), "{msg}");
        assert!(
            msg.contains("sudo systemctl start banger-helper.socket")
                && msg.contains("sudo banger-helper serve")
        );

        // A socket file nobody listens on (a helper that died): refused, also unreachable.
        drop(std::os::unix::net::UnixListener::bind(&missing).unwrap());
        assert!(c.ping().await.unwrap_err().is_unreachable());
    }

    #[test]
    fn a_socket_the_user_may_not_open_says_so_rather_than_start_the_helper() {
        let err =
            connect_error("/run/banger/helper.sock".into(), io::Error::from(io::ErrorKind::PermissionDenied));
        assert!(err.is_unreachable());
        let msg = err.to_string();
        assert!(msg.contains("permission denied") && msg.contains("/run/banger/helper.sock"), "{msg}");
        assert!(!msg.contains("systemctl start"), "{msg}");
    }

    #[tokio::test]
    async fn version_mismatch_is_a_typed_error() {
        let refusing = server_with(
            Response::Error(HelperError::VersionMismatch { client: PROTOCOL_VERSION, helper: 99 }),
            |_, _, _| Act::Backend,
        );
        let err = refusing.client().ping().await.unwrap_err();
        assert!(
            matches!(err, HelperClientError::Helper(HelperError::VersionMismatch { helper: 99, .. })),
            "{err:?}"
        );

        let newer = server_with(
            Response::Hello(HelloReply {
                version: PROTOCOL_VERSION + 1,
                helper_version: "9".into(),
                capabilities: Capabilities::default(),
            }),
            |_, _, _| Act::Backend,
        );
        let err = newer.client().ping().await.unwrap_err();
        assert!(
            matches!(err, HelperClientError::Helper(HelperError::VersionMismatch { helper, .. }) if helper == PROTOCOL_VERSION + 1),
            "{err:?}"
        );
        assert!(newer.log().requests.is_empty(), "no request after a failed hello");
    }

    #[tokio::test]
    async fn a_silent_helper_times_out_and_the_next_call_reconnects() {
        let srv = server_with(ok_hello(), |conn, _, _| if conn == 0 { Act::Silent } else { Act::Backend });
        let c = srv.client().with_timeout(Duration::from_millis(200));
        let err = c.list_owned().await.unwrap_err();
        assert!(matches!(err, HelperClientError::Timeout { op: "list-owned", .. }), "{err:?}");
        c.ping().await.unwrap();
        assert_eq!(srv.log().connections, 2);
    }

    #[tokio::test]
    async fn malformed_and_mismatched_answers_are_errors() {
        let srv = server_with(ok_hello(), |conn, n, _| match (conn, n) {
            (0, 0) => Act::Garbage,
            (1, 0) => Act::Reply(Response::Pong),
            _ => Act::Backend,
        });
        let c = srv.client();
        let err = c.ping().await.unwrap_err();
        assert!(matches!(err, HelperClientError::Protocol { source: FrameError::Codec(_), .. }), "{err:?}");
        let err = c.tap_create(&vm("dev")).await.unwrap_err();
        assert!(
            matches!(&err, HelperClientError::UnexpectedResponse { op: "tap-create", got, .. } if got == "pong"),
            "{err:?}"
        );
        c.ping().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_callers_share_one_connection() {
        let srv = server();
        let c = Arc::new(srv.client());
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let c = Arc::clone(&c);
                tokio::spawn(async move { c.tap_create(&vm(&format!("vm{i}"))).await })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            let tap = t.await.unwrap().unwrap();
            assert_eq!(tap.vm, vm(&format!("vm{i}")), "each caller gets its own answer");
        }
        let log = srv.log();
        assert_eq!((log.connections, log.requests.len()), (1, 32));
    }

    #[tokio::test]
    async fn large_teardowns_go_in_batches() {
        let srv = server();
        let vms: Vec<VmId> = (0..MAX_TEARDOWN_VMS + 44).map(|i| vm(&format!("vm{i}"))).collect();
        let report = srv.client().teardown_vms(&vms).await.unwrap();
        assert_eq!(report.torn_down, vms);
        let sizes: Vec<usize> = srv
            .log()
            .requests
            .iter()
            .map(|(_, r)| match r {
                Request::TeardownVms { vms } => vms.len(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(sizes, [MAX_TEARDOWN_VMS, 44]);
    }

    #[tokio::test]
    async fn fake_keeps_installs_apart_and_fails_on_demand() {
        let fake = FakeHelper::new(install());
        let other = InstallId::new("ffffffffffffffff").unwrap();
        fake.insert_tap(FakeHelper::tap_for(&other, &vm("dev"), 9));
        let mine = fake.tap_create(&vm("dev")).await.unwrap();
        assert_eq!(fake.tap_create(&vm("dev")).await.unwrap(), mine, "tap-create is idempotent");
        assert!(matches!(
            fake.nat_up(&vm("nonat")).await,
            Err(HelperClientError::Helper(HelperError::NotFound { .. }))
        ));
        fake.nat_up(&vm("dev")).await.unwrap();
        let r = fake.teardown_vms(&[vm("dev")]).await.unwrap();
        assert_eq!(r.torn_down, [vm("dev")]);
        let left = fake.owned();
        assert_eq!(left.taps.len(), 1);
        assert_eq!(left.taps[0].install, other, "another install's tap is untouched");
        assert!(left.nat.is_empty());

        fake.fail_teardown_of(&vm("stuck"), HelperError::kernel("TUNSETPERSIST", nix::errno::Errno::EBUSY));
        fake.tap_create(&vm("stuck")).await.unwrap();
        let r = fake.teardown_vms(&[vm("stuck")]).await.unwrap();
        assert_eq!((r.torn_down.len(), r.failures.len()), (0, 1));
        assert_eq!(fake.owned().taps.len(), 2);

        fake.set_unreachable(true);
        let before = fake.calls().len();
        assert!(fake.ping().await.unwrap_err().is_unreachable());
        assert_eq!(fake.calls().len(), before, "unreached requests are not recorded");
        fake.set_unreachable(false);

        let dir = tempfile::tempdir().unwrap();
        let not_a_file = std::fs::File::open(dir.path()).unwrap();
        assert!(matches!(
            fake.loop_attach(&vm("dev"), LoopRole::Base, true, not_a_file.into()).await,
            Err(HelperClientError::Helper(HelperError::InvalidRequest { .. }))
        ));
    }
}
