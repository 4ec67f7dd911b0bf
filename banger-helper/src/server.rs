//! The socket server: one task per connection, served concurrently.
//!
//! A connection goes like this:
//!
//! 1. the kernel names the peer (`SO_PEERCRED`, `SO_PEERGROUPS`: [`peer::credentials`]) and the
//!    connection takes an arriving slot ([`crate::slots`]) at once, in the accept loop; a
//!    connection over the caps is answered, audited and closed right there, without a task;
//! 2. the peer's names are looked up ([`peer::Lookups`]), then the policy says whether it admits
//!    the peer, and the slot moves to the admitted pool or to the small pool of peers not
//!    admitted (over either pool's caps: refused, audited, closed);
//! 3. the first frame must be `Hello` within [`ServerConfig::hello_timeout`] (a peer the policy
//!    does not admit gets only [`ServerConfig::refusal_timeout`], and whatever it sends is
//!    refused); the policy and the protocol version decide, and a refused peer gets its error and
//!    is disconnected, its slot given back at once;
//! 4. then each frame is one request answered by one response, in order; a connection idle for
//!    [`ServerConfig::idle_timeout`] is closed;
//! 5. any frame that is oversized, truncated, undecodable or carries too many descriptors ends
//!    that connection only (an undecodable one is answered "invalid request" first).
//!
//! Every refusal on the way, before `Hello` as after it, is written to the audit log with the
//! peer's uid and pid ([`crate::audit::Record::refusal`]); each request's record goes through the
//! connection's [`Summaries`], which count routine successes instead of writing each one.
//!
//! The pools never borrow from each other, and each caps every uid as well as its total, so
//! peers that are not admitted can never keep admitted users out, and together all connections
//! cannot exhaust the helper's descriptors ([`ServerConfig::for_nofile`]).

use std::future::Future;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use banger_policy::Peer;
use banger_protocol::frame::{self, FrameError};
use banger_protocol::{HelperError, MAX_FDS_PER_FRAME, Request, Response};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::timeout;

use crate::audit::{self, AuditLog, OP_CONNECT, OP_FRAME, Record, Summaries};
use crate::kernel::Kernel;
use crate::ops::Helper;
use crate::peer::{self, Credentials, Lookups};
use crate::slots::{Cap, Caps, Pool, Slot, Slots};

/// Limits of the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// How long an admitted peer may take to send its `Hello`.
    pub hello_timeout: Duration,
    /// How long a peer the policy does not admit may take to send its first frame (which is
    /// refused whatever it is) before it is refused anyway.
    pub refusal_timeout: Duration,
    /// How long a connection may stay silent between requests.
    pub idle_timeout: Duration,
    /// How many connections each pool holds, per uid and in total.
    pub caps: Caps,
    /// How many account lookups may run at once ([`peer::Lookups`]).
    pub max_lookups: usize,
    /// How long a peer waits for its names before it goes by numbers only.
    pub names_timeout: Duration,
    /// How often at most a connection's routine successes are summarised in the audit log, per
    /// operation ([`Summaries`]).
    pub audit_summary_every: Duration,
}

/// Descriptors kept for the helper itself (ledger, audit log, netlink, the tools' pipes, the
/// account lookups in flight).
const RESERVED_FDS: u64 = 64;

/// Most admitted connections ever allowed at once, whatever the descriptor limit.
const MAX_CONNECTIONS: usize = 1024;

/// The default caps, when descriptors are plenty.
const DEFAULT_CAPS: Caps = Caps {
    arriving: Cap { per_uid: 16, total: 128 },
    admitted: Cap { per_uid: 64, total: MAX_CONNECTIONS },
    not_admitted: Cap { per_uid: 2, total: 32 },
};

impl ServerConfig {
    /// The default limits, with every connection the pools can hold kept within `nofile`
    /// descriptors: an arriving connection holds its socket; any other may also hold a frame's
    /// descriptors; one more is the connection the accept loop is refusing.
    pub fn for_nofile(nofile: u64) -> Self {
        let per_connection = 1 + MAX_FDS_PER_FRAME;
        let budget = usize::try_from(nofile.saturating_sub(RESERVED_FDS + 1)).unwrap_or(usize::MAX);
        let d = DEFAULT_CAPS;
        let arriving = (budget / 8).clamp(1, d.arriving.total);
        let not_admitted = (budget / 40).clamp(1, d.not_admitted.total);
        let admitted = (budget.saturating_sub(arriving + not_admitted * per_connection) / per_connection)
            .clamp(1, d.admitted.total);
        let cap = |c: Cap, total: usize| Cap { per_uid: c.per_uid.min(total), total };
        let caps = Caps {
            arriving: cap(d.arriving, arriving),
            admitted: cap(d.admitted, admitted),
            not_admitted: cap(d.not_admitted, not_admitted),
        };
        ServerConfig { caps, ..ServerConfig::default() }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            hello_timeout: Duration::from_secs(10),
            refusal_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(60),
            caps: DEFAULT_CAPS,
            max_lookups: peer::MAX_LOOKUPS,
            names_timeout: peer::NAMES_TIMEOUT,
            audit_summary_every: Duration::from_secs(60),
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
    let slots = Slots::new(config.caps);
    let lookups = Lookups::new(config.max_lookups, config.names_timeout);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let Some((creds, slot)) = arrive(&helper, &stream, &slots) else { continue };
                    let helper = helper.clone();
                    let config = config.clone();
                    let lookups = lookups.clone();
                    tokio::spawn(async move {
                        connection(helper, stream, config, lookups, creds, slot).await;
                    });
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

/// Reads a new connection's credentials and takes its arriving slot, in the accept loop, before
/// anything that can wait. A connection over the caps is refused here (recorded, answered if its
/// socket takes the answer at once, closed), so it never holds a descriptor past this call.
fn arrive<K: Kernel>(helper: &Helper<K>, stream: &UnixStream, slots: &Slots) -> Option<(Credentials, Slot)> {
    let creds = match peer::credentials(stream) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("{e}: {:?}", std::error::Error::source(&e));
            return None;
        }
    };
    match slots.take(Pool::Arriving, creds.uid) {
        Ok(slot) => Some((creds, slot)),
        Err(full) => {
            tracing::debug!("refusing a connection: {full}");
            let e = HelperError::Conflict { what: full.to_string() };
            helper.audit().write(&Record::refusal(&creds.peer(), OP_CONNECT, &e));
            // The socket is non-blocking: an answer that does not fit at once is dropped.
            let _ = frame::send_blocking(stream.as_fd(), &Response::Error(e), &[]);
            None
        }
    }
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
    lookups: Lookups,
    creds: Credentials,
    arriving: Slot,
) {
    let mut peer = lookups.identify(creds).await;
    let admitted = helper.policy().access.admits(&peer).is_some();
    let (pool, wait) = if admitted {
        (Pool::Admitted, config.hello_timeout)
    } else {
        (Pool::NotAdmitted, config.refusal_timeout)
    };
    let _slot = match arriving.move_to(pool) {
        Ok(slot) => slot,
        Err(full) => {
            tracing::debug!("refusing a connection: {full}");
            refuse(&helper, &stream, &peer, OP_CONNECT, HelperError::Conflict { what: full.to_string() })
                .await;
            return;
        }
    };
    // A peer the policy does not admit is refused by the handshake, whatever it sends.
    if !handshake(&helper, &stream, &mut peer, wait).await {
        return;
    }
    let mut pending = Pending { log: helper.audit(), summaries: Summaries::new(config.audit_summary_every) };
    requests(&helper, &stream, &peer, config.idle_timeout, &mut pending.summaries).await;
}

/// A connection's audit summaries, written out when the connection ends, however it ends (also
/// when the runtime drops the task at shutdown).
struct Pending<'a> {
    log: &'a AuditLog,
    summaries: Summaries,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.summaries.flush(self.log);
    }
}

/// Serves a connection's requests, one at a time, until it closes, sends a bad frame or stays
/// idle for `idle`. While waiting for a request, writes the audit summaries that fall due.
async fn requests<K: Kernel>(
    helper: &Helper<K>,
    stream: &UnixStream,
    peer: &Peer,
    idle: Duration,
    summaries: &mut Summaries,
) {
    loop {
        // One read for the whole wait: cancelling it half-way would lose a frame's bytes.
        let recv = frame::recv::<Request>(stream);
        let idle_at = tokio::time::sleep(idle);
        tokio::pin!(recv, idle_at);
        let received = loop {
            let due = summaries.due().map(tokio::time::Instant::from_std);
            tokio::select! {
                r = &mut recv => break Some(r),
                () = &mut idle_at => break None,
                () = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                    summaries.flush_due(helper.audit(), tokio::time::Instant::now().into_std());
                }
            }
        };
        let (request, fds) = match received {
            None => {
                tracing::debug!("uid {} pid {}: idle, closing", peer.uid, peer.pid);
                return;
            }
            Some(Err(e)) => {
                bad_frame(helper, stream, peer, &e).await;
                return;
            }
            Some(Ok(r)) => r,
        };
        let routine = audit::routine(&request);
        let (response, record) = helper.respond(peer, request, fds).await;
        summaries.record(helper.audit(), record, routine, tokio::time::Instant::now().into_std());
        if !send(stream, &response).await {
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
                "no hello within {} s; a client must say hello first",
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
            Arc::new(Helper::new(policy, Arc::new(FakeKernel::new()), Default::default(), None, audit));
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
            refusal_timeout: Duration::from_millis(200),
            idle_timeout: Duration::from_millis(300),
            caps: Caps {
                arriving: Cap { per_uid: 3, total: 4 },
                admitted: Cap { per_uid: 3, total: 5 },
                not_admitted: Cap { per_uid: 1, total: 2 },
            },
            ..ServerConfig::default()
        }
    }

    /// `quick` with other caps for admitted peers.
    fn admitting(per_uid: usize, total: usize) -> ServerConfig {
        let mut c = quick();
        c.caps.admitted = Cap { per_uid, total };
        c
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
        let config = admitting(10, 2);
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

    /// (op, result, count) of each audit record.
    fn kept(records: &std::sync::Mutex<Vec<u8>>) -> Vec<(String, String, Option<u64>)> {
        audit_lines(records).into_iter().map(|r| (r.op, r.result, r.count)).collect()
    }

    fn k(op: &str, result: &str, count: Option<u64>) -> (String, String, Option<u64>) {
        (op.to_owned(), result.to_owned(), count)
    }

    #[tokio::test]
    async fn routine_successes_are_summarised_when_the_connection_closes() {
        let (_dir, path, records) = server_audited(ServerConfig::default()).await;
        let s = hello(&path).await;
        for _ in 0..1000 {
            assert_eq!(ping(&s).await, Response::Pong);
        }
        send(&s, &Request::TapCreate { vm: banger_protocol::VmId::new("v").unwrap() }, &[]).await.unwrap();
        assert!(matches!(recv::<Response>(&s).await.unwrap().0, Response::Tap(_)));
        for _ in 0..3 {
            send(&s, &Request::ListOwned, &[]).await.unwrap();
            assert!(matches!(recv::<Response>(&s).await.unwrap().0, Response::Owned(_)));
        }
        let before_close = kept(&records);
        assert_eq!(
            before_close,
            [
                k("hello", "ok", None),
                k("ping", "ok", None),
                k("tap-create", "ok", None),
                k("list-owned", "ok", None)
            ]
        );
        drop(s);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let all = audit_lines(&records);
        assert_eq!(kept(&records)[4..], [k("ping", "ok", Some(999)), k("list-owned", "ok", Some(2))]);
        let me = (nix::unistd::getuid().as_raw(), std::process::id() as i32, Some("t"));
        for r in &all {
            assert_eq!((r.uid, r.pid, r.install.as_deref()), me, "{r:?}");
        }
    }

    #[tokio::test]
    async fn a_summary_falls_due_while_the_connection_is_quiet() {
        let config = ServerConfig {
            audit_summary_every: Duration::from_millis(100),
            idle_timeout: Duration::from_secs(5),
            ..quick()
        };
        let (_dir, path, records) = server_audited(config).await;
        let s = hello(&path).await;
        for _ in 0..3 {
            assert_eq!(ping(&s).await, Response::Pong);
        }
        assert_eq!(kept(&records), [k("hello", "ok", None), k("ping", "ok", None)]);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(kept(&records), [k("hello", "ok", None), k("ping", "ok", None), k("ping", "ok", Some(2))]);
        // The connection is still served, and its next requests counted again.
        assert_eq!(ping(&s).await, Response::Pong);
        drop(s);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(kept(&records).len(), 4);
    }

    #[test]
    fn counts_are_written_when_the_helper_stops() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (_dir, path, records) = rt.block_on(server_audited(ServerConfig::default()));
        let client = rt.block_on(async {
            let s = hello(&path).await;
            for _ in 0..3 {
                assert_eq!(ping(&s).await, Response::Pong);
            }
            s
        });
        assert_eq!(kept(&records), [k("hello", "ok", None), k("ping", "ok", None)]);
        // The runtime stops with the connection still open (as at shutdown).
        drop(rt);
        assert_eq!(kept(&records), [k("hello", "ok", None), k("ping", "ok", None), k("ping", "ok", Some(2))]);
        drop(client);
    }

    /// The most descriptors the connections can hold at once under these caps.
    fn max_connection_fds(config: &ServerConfig) -> usize {
        let per_connection = 1 + MAX_FDS_PER_FRAME;
        let c = &config.caps;
        c.arriving.total + (c.admitted.total + c.not_admitted.total) * per_connection + 1
    }

    #[test]
    fn the_caps_fit_the_descriptor_limit() {
        let plenty = ServerConfig::for_nofile(65536);
        assert_eq!(plenty.caps, DEFAULT_CAPS);
        assert!(max_connection_fds(&plenty) + 64 <= 65536);
        let tight = ServerConfig::for_nofile(1024);
        assert_eq!(
            tight.caps,
            Caps {
                arriving: Cap { per_uid: 16, total: 119 },
                admitted: Cap { per_uid: 64, total: (959 - 119 - 23 * 5) / 5 },
                not_admitted: Cap { per_uid: 2, total: 23 },
            }
        );
        assert!(max_connection_fds(&tight) + 64 <= 1024, "{}", max_connection_fds(&tight));
        let tiny = ServerConfig::for_nofile(10).caps;
        for cap in [tiny.arriving, tiny.admitted, tiny.not_admitted] {
            assert_eq!(cap, Cap { per_uid: 1, total: 1 });
        }
    }

    #[tokio::test]
    async fn a_peer_not_admitted_holds_few_slots_and_briefly() {
        let (_dir, path, records) = server_for(quick(), false).await;
        // The one slot a uid not admitted may hold, kept silent...
        let silent = UnixStream::connect(&path).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // ...so the next connection is refused at once, without waiting for its hello.
        let start = Instant::now();
        let extra = UnixStream::connect(&path).await.unwrap();
        let r = refused(&extra).await;
        assert!(start.elapsed() < Duration::from_millis(150), "{:?}", start.elapsed());
        assert!(
            matches!(&r, Some(Response::Error(HelperError::Conflict { what })) if what.contains("not admitted")),
            "{r:?}"
        );
        // The silent one is refused after the refusal timeout, and its slot given back.
        let r = refused(&silent).await;
        assert!(matches!(&r, Some(Response::Error(HelperError::InvalidRequest { .. }))), "{r:?}");
        let s = UnixStream::connect(&path).await.unwrap();
        let req = Request::Hello { version: PROTOCOL_VERSION, install_id: InstallId::new("t").unwrap() };
        send(&s, &req, &[]).await.unwrap();
        assert!(matches!(refused(&s).await, Some(Response::Error(HelperError::Denied { .. }))));

        let audit: Vec<_> = audit_lines(&records).into_iter().map(|r| (r.op, r.code.unwrap())).collect();
        let want = [("connect", "E003"), ("connect", "E005"), ("hello", "E001")];
        assert_eq!(audit, want.map(|(o, c)| (o.to_owned(), c.to_owned())));
    }

    #[tokio::test]
    async fn connections_waiting_for_their_names_are_capped() {
        // No lookup can start (as when every one is stuck in a database that does not answer).
        let config = ServerConfig { max_lookups: 0, names_timeout: Duration::from_millis(300), ..quick() };
        let (_dir, path, records) = server_audited(config).await;
        let waiting: Vec<UnixStream> = futures::future::join_all((0..3).map(|_| UnixStream::connect(&path)))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let start = Instant::now();
        let extra = UnixStream::connect(&path).await.unwrap();
        let r = refused(&extra).await;
        assert!(start.elapsed() < Duration::from_millis(200), "{:?}", start.elapsed());
        assert!(
            matches!(&r, Some(Response::Error(HelperError::Conflict { what })) if what.contains("waiting to be identified")),
            "{r:?}"
        );
        let audit = audit_lines(&records);
        assert_eq!(audit.len(), 1, "{audit:?}");
        assert_eq!((audit[0].op.as_str(), audit[0].code.as_deref()), ("connect", Some("E003")));
        // Past the names timeout the waiting ones go by numbers (the policy lists this uid by
        // number) and are served.
        let req = Request::Hello { version: PROTOCOL_VERSION, install_id: InstallId::new("t").unwrap() };
        for s in &waiting {
            send(s, &req, &[]).await.unwrap();
            assert!(matches!(recv::<Response>(s).await.unwrap().0, Response::Hello(_)));
        }
        assert_eq!(ping(&waiting[0]).await, Response::Pong);
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
