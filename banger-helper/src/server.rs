//! The socket server: one task per connection, served concurrently.
//!
//! A connection goes like this:
//!
//! 1. the peer is identified from the socket ([`crate::peer`]); a peer that cannot be is dropped;
//! 2. the first frame must be `Hello` within [`ServerConfig::hello_timeout`]; the policy and the
//!    protocol version decide, and a refused peer gets its error and is disconnected;
//! 3. then each frame is one request answered by one response, in order; a connection idle for
//!    [`ServerConfig::idle_timeout`] is closed;
//! 4. any frame that is oversized, truncated, undecodable or carries too many descriptors ends
//!    that connection only (an undecodable one is answered "invalid request" first).
//!
//! Every refusal on the way, before `Hello` as after it, is written to the audit log with the
//! peer's uid and pid ([`crate::audit::Record::refusal`]).
//!
//! The number of connections is capped per uid, so one user cannot take every slot, and in total,
//! so all users together cannot exhaust the helper's descriptors (each connection holds its socket
//! and at most [`banger_protocol::MAX_FDS_PER_FRAME`] received descriptors at a time). A refused connection
//! is answered, audited and closed.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use banger_policy::Peer;
use banger_protocol::frame::{self, FrameError};
use banger_protocol::{HelperError, Request, Response};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::timeout;

use crate::audit::{OP_CONNECT, OP_FRAME, Record};
use crate::kernel::Kernel;
use crate::ops::Helper;
use crate::peer;

/// Limits of the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// How long a connection may wait before its `Hello`.
    pub hello_timeout: Duration,
    /// How long a connection may stay silent between requests.
    pub idle_timeout: Duration,
    /// Connections one uid may hold at once.
    pub max_connections_per_uid: usize,
    /// Connections all uids together may hold at once.
    pub max_connections: usize,
}

/// Descriptors kept for the helper itself (ledger, audit log, netlink, the tools' pipes).
const RESERVED_FDS: u64 = 64;

/// Most connections ever allowed at once, whatever the descriptor limit.
const MAX_CONNECTIONS: usize = 1024;

impl ServerConfig {
    /// The default limits, with the total number of connections kept within `nofile`
    /// descriptors: each connection may hold its socket and a frame's descriptors at once.
    pub fn for_nofile(nofile: u64) -> Self {
        let per_connection = 1 + banger_protocol::MAX_FDS_PER_FRAME as u64;
        let fit = nofile.saturating_sub(RESERVED_FDS) / per_connection;
        let max_connections = usize::try_from(fit).unwrap_or(usize::MAX).clamp(1, MAX_CONNECTIONS);
        ServerConfig { max_connections, ..ServerConfig::default() }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            hello_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections_per_uid: 64,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// Open connections, per uid and in total.
#[derive(Debug, Default)]
struct Open {
    per_uid: HashMap<u32, usize>,
    total: usize,
}

type Counts = Arc<Mutex<Open>>;

/// Releases a connection's slot when the connection ends.
struct Slot {
    counts: Counts,
    uid: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                c.per_uid.remove(&self.uid);
            }
        }
    }
}

/// Serves `listener` until `shutdown` completes, then waits for the request in progress (if any)
/// to finish so no operation is cut in half.
pub async fn run<K: Kernel>(
    helper: Arc<Helper<K>>,
    listener: UnixListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) {
    let counts: Counts = Arc::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let helper = helper.clone();
                    let config = config.clone();
                    let counts = counts.clone();
                    tokio::spawn(async move { connection(helper, stream, config, counts).await });
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }
    helper.quiesce().await;
}

async fn send(stream: &UnixStream, response: &Response) -> bool {
    match frame::send(stream, response, &[]).await {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!("cannot answer: {e}");
            false
        }
    }
}

/// Records a refusal in the audit log, then answers it.
async fn refuse<K: Kernel>(helper: &Helper<K>, stream: &UnixStream, peer: &Peer, op: &str, e: HelperError) {
    helper.audit().write(&Record::refusal(peer, op, &e));
    send(stream, &Response::Error(e)).await;
}

/// What to do about a frame that could not be read: `None` when the peer simply went away (closed,
/// hung up mid-frame, the socket failed), else the refusal to record. Only an undecodable frame is
/// answered: after an oversized one or one with too many descriptors the stream is out of step.
fn frame_refusal(e: &FrameError) -> Option<(HelperError, bool)> {
    match e {
        FrameError::Closed | FrameError::Truncated | FrameError::Io(_) => None,
        FrameError::Codec(_) => Some((HelperError::invalid(e.to_string()), true)),
        FrameError::TooLarge(_) | FrameError::TooManyFds => {
            Some((HelperError::invalid(e.to_string()), false))
        }
    }
}

/// Handles a frame that could not be read: records and (if it can) answers a refusal, or logs why
/// the connection ended.
async fn bad_frame<K: Kernel>(helper: &Helper<K>, stream: &UnixStream, peer: &Peer, e: &FrameError) {
    match frame_refusal(e) {
        Some((refusal, answer)) => {
            tracing::info!("uid {} pid {}: closing after a bad frame: {e}", peer.uid, peer.pid);
            helper.audit().write(&Record::refusal(peer, OP_FRAME, &refusal));
            if answer {
                send(stream, &Response::Error(refusal)).await;
            }
        }
        None => tracing::debug!("uid {} pid {}: connection ended: {e}", peer.uid, peer.pid),
    }
}

async fn connection<K: Kernel>(
    helper: Arc<Helper<K>>,
    stream: UnixStream,
    config: ServerConfig,
    counts: Counts,
) {
    let mut peer = match peer::identify(&stream).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("{e}: {:?}", std::error::Error::source(&e));
            return;
        }
    };
    let refused = {
        let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
        let held = c.per_uid.get(&peer.uid).copied().unwrap_or(0);
        if held >= config.max_connections_per_uid {
            Some(format!(
                "uid {} already holds {held} connections to the helper, the most one uid may; close some first",
                peer.uid
            ))
        } else if c.total >= config.max_connections {
            Some(format!(
                "the helper already serves {} connections, the most it takes at once; retry shortly",
                c.total
            ))
        } else {
            *c.per_uid.entry(peer.uid).or_default() += 1;
            c.total += 1;
            None
        }
    };
    if let Some(what) = refused {
        tracing::warn!("refusing a connection: {what}");
        refuse(&helper, &stream, &peer, OP_CONNECT, HelperError::Conflict { what }).await;
        return;
    }
    let _slot = Slot { counts: counts.clone(), uid: peer.uid };

    if !handshake(&helper, &stream, &mut peer, config.hello_timeout).await {
        return;
    }
    loop {
        let (request, fds) = match timeout(config.idle_timeout, frame::recv::<Request>(&stream)).await {
            Err(_) => {
                tracing::debug!("uid {} pid {}: idle, closing", peer.uid, peer.pid);
                return;
            }
            Ok(Err(e)) => {
                bad_frame(&helper, &stream, &peer, &e).await;
                return;
            }
            Ok(Ok(r)) => r,
        };
        let response = helper.handle(&peer, request, fds).await;
        if !send(&stream, &response).await {
            return;
        }
    }
}

/// Waits at most `wait` for the first frame, which must be a `Hello` without descriptors that the
/// helper accepts. Every refusal is recorded and answered; returns whether the connection goes on.
async fn handshake<K: Kernel>(
    helper: &Helper<K>,
    stream: &UnixStream,
    peer: &mut Peer,
    wait: Duration,
) -> bool {
    match timeout(wait, frame::recv::<Request>(stream)).await {
        Err(_) => {
            tracing::debug!("uid {} pid {}: no hello in time", peer.uid, peer.pid);
            let e = HelperError::invalid(format!(
                "no hello within {} s of connecting; a client must say hello first",
                wait.as_secs_f64()
            ));
            refuse(helper, stream, peer, OP_CONNECT, e).await;
            false
        }
        Ok(Err(e)) => {
            bad_frame(helper, stream, peer, &e).await;
            false
        }
        Ok(Ok((Request::Hello { version, install_id }, fds))) => {
            if !fds.is_empty() {
                drop(fds);
                let e = HelperError::invalid("hello takes no file descriptors; all were closed");
                refuse(helper, stream, peer, "hello", e).await;
                return false;
            }
            match helper.hello(peer, version, install_id) {
                Ok(reply) => send(stream, &Response::Hello(reply)).await,
                Err(e) => {
                    send(stream, &Response::Error(e)).await;
                    false
                }
            }
        }
        Ok(Ok((other, fds))) => {
            drop(fds);
            let e = HelperError::invalid(format!("the first request must be hello, not {}", other.op_name()));
            refuse(helper, stream, peer, other.op_name(), e).await;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use banger_protocol::frame::{read_frame, recv, send, write_frame};
    use banger_protocol::{InstallId, PROTOCOL_VERSION, Request, Response};
    use tokio::net::{UnixListener, UnixStream};

    use super::*;
    use crate::audit::AuditLog;
    use crate::kernel::fake::FakeKernel;
    use crate::ledger_store::Stored;

    /// A server over the fake kernel whose policy admits this process's uid, on a temporary socket.
    async fn server(config: ServerConfig) -> (tempfile::TempDir, std::path::PathBuf) {
        let (dir, path, _) = server_audited(config).await;
        (dir, path)
    }

    /// [`server`], with its audit log.
    async fn server_audited(
        config: ServerConfig,
    ) -> (tempfile::TempDir, std::path::PathBuf, Arc<std::sync::Mutex<Vec<u8>>>) {
        server_for(config, true).await
    }

    /// A server whose policy admits this process's uid, or nobody, with its audit log.
    async fn server_for(
        config: ServerConfig,
        admit_me: bool,
    ) -> (tempfile::TempDir, std::path::PathBuf, Arc<std::sync::Mutex<Vec<u8>>>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let mut policy = crate::ops::testing::test_policy();
        policy.access.users =
            if admit_me { vec![nix::unistd::getuid().as_raw().to_string()] } else { vec![] };
        policy.access.groups = vec![];
        let (audit, records) = AuditLog::memory();
        let helper =
            Arc::new(Helper::new(policy, Arc::new(FakeKernel::new()), Stored::default(), None, audit));
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(run(helper, listener, config, std::future::pending()));
        (dir, path, records)
    }

    fn audit_lines(records: &std::sync::Mutex<Vec<u8>>) -> Vec<crate::audit::Record> {
        let buf = records.lock().unwrap();
        String::from_utf8_lossy(&buf).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    async fn hello(path: &std::path::Path) -> UnixStream {
        let s = UnixStream::connect(path).await.unwrap();
        let req = Request::Hello { version: PROTOCOL_VERSION, install_id: InstallId::new("t").unwrap() };
        send(&s, &req, &[]).await.unwrap();
        let (r, _) = recv::<Response>(&s).await.unwrap();
        assert!(matches!(r, Response::Hello(_)), "{r:?}");
        s
    }

    async fn ping(s: &UnixStream) -> Response {
        send(s, &Request::Ping, &[]).await.unwrap();
        recv::<Response>(s).await.unwrap().0
    }

    fn quick() -> ServerConfig {
        ServerConfig {
            hello_timeout: Duration::from_millis(200),
            idle_timeout: Duration::from_millis(300),
            max_connections_per_uid: 3,
            max_connections: 5,
        }
    }

    #[tokio::test]
    async fn idle_and_silent_connections_are_closed() {
        let (_dir, path) = server(quick()).await;
        let silent = UnixStream::connect(&path).await.unwrap();
        let s = hello(&path).await;
        assert_eq!(ping(&s).await, Response::Pong);
        let start = Instant::now();
        assert!(matches!(read_frame(&s).await, Err(FrameError::Closed)));
        assert!(start.elapsed() >= Duration::from_millis(250), "{:?}", start.elapsed());
        let (r, _) = recv::<Response>(&silent).await.unwrap();
        assert!(
            matches!(&r, Response::Error(HelperError::InvalidRequest { reason }) if reason.contains("no hello within 0.2 s")),
            "{r:?}"
        );
        assert!(matches!(read_frame(&silent).await, Err(FrameError::Closed)));
    }

    /// Reads the answer to a refused first frame and proves the connection was closed after it.
    async fn refused(s: &UnixStream) -> Option<Response> {
        let first = match recv::<Response>(s).await {
            Ok((r, _)) => Some(r),
            Err(FrameError::Closed) => return None,
            Err(e) => panic!("{e}"),
        };
        assert!(matches!(read_frame(s).await, Err(FrameError::Closed)));
        first
    }

    #[tokio::test]
    async fn every_refusal_before_hello_is_audited() {
        let (_dir, path, records) = server_audited(quick()).await;
        let me = nix::unistd::getuid().as_raw();
        let invalid = Some("E005");
        // The first request is not hello.
        let s = UnixStream::connect(&path).await.unwrap();
        send(&s, &Request::ListOwned, &[]).await.unwrap();
        assert!(matches!(refused(&s).await, Some(Response::Error(HelperError::InvalidRequest { .. }))));
        // Hello with a descriptor.
        let s = UnixStream::connect(&path).await.unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let req = Request::Hello { version: PROTOCOL_VERSION, install_id: InstallId::new("t").unwrap() };
        send(&s, &req, &[null.as_fd()]).await.unwrap();
        assert!(matches!(refused(&s).await, Some(Response::Error(HelperError::InvalidRequest { .. }))));
        // An undecodable first frame, then an oversized one (closed without an answer).
        let s = UnixStream::connect(&path).await.unwrap();
        write_frame(&s, b"hello?", &[]).await.unwrap();
        assert!(matches!(refused(&s).await, Some(Response::Error(HelperError::InvalidRequest { .. }))));
        let s = UnixStream::connect(&path).await.unwrap();
        use tokio::io::AsyncWriteExt;
        let mut w = s;
        w.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        assert_eq!(refused(&w).await, None);
        // Silent until the hello timeout.
        let s = UnixStream::connect(&path).await.unwrap();
        assert!(matches!(refused(&s).await, Some(Response::Error(HelperError::InvalidRequest { .. }))));
        // A peer that hangs up before saying anything is not refused: nothing to record.
        drop(UnixStream::connect(&path).await.unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;

        let got: Vec<_> = audit_lines(&records)
            .into_iter()
            .map(|r| {
                assert_eq!((r.uid, r.pid, r.install.as_deref()), (me, std::process::id() as i32, None));
                (r.op, r.code, r.error.unwrap_or_default())
            })
            .collect();
        let want = [
            ("list-owned", "the first request must be hello, not list-owned"),
            ("hello", "hello takes no file descriptors"),
            ("frame", "invalid request"),
            ("frame", "over the"),
            ("connect", "no hello within 0.2 s"),
        ];
        assert_eq!(got.len(), want.len(), "{got:?}");
        for ((op, code, error), (want_op, want_error)) in got.iter().zip(want) {
            assert_eq!((op.as_str(), code.as_deref()), (want_op, invalid), "{got:?}");
            assert!(error.contains(want_error), "{error:?} lacks {want_error:?}");
        }
    }

    #[tokio::test]
    async fn a_peer_the_policy_does_not_admit_is_refused_and_audited() {
        let (_dir, path, records) = server_for(quick(), false).await;
        let s = UnixStream::connect(&path).await.unwrap();
        let req = Request::Hello { version: PROTOCOL_VERSION, install_id: InstallId::new("t").unwrap() };
        send(&s, &req, &[]).await.unwrap();
        let r = refused(&s).await;
        assert!(
            matches!(&r, Some(Response::Error(HelperError::Denied { rule, .. })) if rule == "access"),
            "{r:?}"
        );
        let audit = audit_lines(&records);
        assert_eq!(audit.len(), 1, "{audit:?}");
        assert_eq!((audit[0].op.as_str(), audit[0].code.as_deref()), ("hello", Some("E001")));
    }

    #[tokio::test]
    async fn a_bad_frame_ends_only_its_own_connection() {
        let (_dir, path) = server(ServerConfig::default()).await;
        let good = hello(&path).await;
        let bad = hello(&path).await;
        write_frame(&bad, &[0xde, 0xad], &[]).await.unwrap();
        let (r, _) = recv::<Response>(&bad).await.unwrap();
        assert!(matches!(r, Response::Error(HelperError::InvalidRequest { .. })), "{r:?}");
        assert!(matches!(read_frame(&bad).await, Err(FrameError::Closed)));
        let big = hello(&path).await;
        use tokio::io::AsyncWriteExt;
        let mut big_w = big;
        big_w.write_all(&(64u32 * 1024 * 1024).to_be_bytes()).await.unwrap();
        assert!(matches!(read_frame(&big_w).await, Err(FrameError::Closed)));
        assert_eq!(ping(&good).await, Response::Pong);
    }

    #[tokio::test]
    async fn too_many_descriptors_end_the_connection() {
        let (_dir, path) = server(ServerConfig::default()).await;
        let s = hello(&path).await;
        let files: Vec<std::fs::File> = (0..6).map(|_| std::fs::File::open("/dev/null").unwrap()).collect();
        let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
        let payload = banger_protocol::codec::encode(&Request::Ping).unwrap();
        write_frame(&s, &payload, &fds).await.unwrap();
        // Closed, or reset because the helper hung up on a frame it did not finish reading.
        let r = read_frame(&s).await;
        assert!(matches!(r, Err(FrameError::Closed | FrameError::Io(_))), "{r:?}");
        let again = hello(&path).await;
        assert_eq!(ping(&again).await, Response::Pong);
    }

    #[tokio::test]
    async fn connections_per_uid_are_capped() {
        let (_dir, path) = server(quick()).await;
        let held: Vec<UnixStream> = futures::future::join_all((0..3).map(|_| hello(&path))).await;
        let extra = UnixStream::connect(&path).await.unwrap();
        let (r, _) = recv::<Response>(&extra).await.unwrap();
        assert!(matches!(r, Response::Error(HelperError::Conflict { .. })), "{r:?}");
        drop(held);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let s = hello(&path).await;
        assert_eq!(ping(&s).await, Response::Pong);
    }

    #[tokio::test]
    async fn connections_in_total_are_capped_and_refusals_audited() {
        let config = ServerConfig { max_connections_per_uid: 10, max_connections: 2, ..quick() };
        let (_dir, path, records) = server_audited(config).await;
        let held: Vec<UnixStream> = futures::future::join_all((0..2).map(|_| hello(&path))).await;
        let extra = UnixStream::connect(&path).await.unwrap();
        let (r, _) = recv::<Response>(&extra).await.unwrap();
        assert!(
            matches!(&r, Response::Error(HelperError::Conflict { what }) if what.contains("2 connections")),
            "{r:?}"
        );
        let refused: Vec<_> = audit_lines(&records).into_iter().filter(|r| r.op == "connect").collect();
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(
            (refused[0].uid, refused[0].result.as_str(), refused[0].code.as_deref()),
            (
                nix::unistd::getuid().as_raw(),
                "error",
                Some(HelperError::Conflict { what: String::new() }.code().to_string().as_str())
            )
        );
        drop(held);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let s = hello(&path).await;
        assert_eq!(ping(&s).await, Response::Pong);
    }

    #[test]
    fn the_total_cap_fits_the_descriptor_limit() {
        assert_eq!(ServerConfig::for_nofile(1024).max_connections, (1024 - 64) / 5);
        assert_eq!(ServerConfig::for_nofile(65536).max_connections, 1024);
        assert_eq!(ServerConfig::for_nofile(10).max_connections, 1);
        assert_eq!(ServerConfig::for_nofile(65536).max_connections_per_uid, 64);
    }

    #[tokio::test]
    async fn the_first_frame_must_be_hello() {
        let (_dir, path) = server(ServerConfig::default()).await;
        let s = UnixStream::connect(&path).await.unwrap();
        send(&s, &Request::Ping, &[]).await.unwrap();
        let (r, _) = recv::<Response>(&s).await.unwrap();
        assert!(matches!(r, Response::Error(HelperError::InvalidRequest { .. })), "{r:?}");
        assert!(matches!(read_frame(&s).await, Err(FrameError::Closed)));
    }
}
