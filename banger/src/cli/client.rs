//! The CLI's side of the daemon API: HTTP/1.1 over the daemon's unix socket, and starting the
//! daemon on demand.
//!
//! [`connect_or_start`] first asks `GET /v1/status?checks=false` (the daemon's settings, without
//! pinging the helper or looking at any VM); when nothing answers it starts `bangerd`
//! detached (its own session, so it outlives this command), waits until the socket answers, and
//! if the daemon dies or hangs instead, says so with the daemon log's path.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use crate::api_types::{ErrorBody, ProgressEvent, Status};

/// How long a freshly started daemon may take to answer.
pub const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(20);

/// Why talking to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers on the socket.
    #[error("cannot reach bangerd at {socket}")]
    Unreachable {
        /// The socket.
        socket: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The daemon took the request, then its connection closed without an answer: it stopped
    /// (crashed or was killed) while handling it.
    #[error(
        "bangerd stopped while handling the request{}; the next banger command starts it again, and it checks every vm against what really runs: see where this one got to with `banger vm list`",
        log_note(.log.as_deref())
    )]
    DaemonStopped {
        /// The daemon log, when known.
        log: Option<PathBuf>,
        /// How the connection ended. Not shown: it only restates the symptom ("connection
        /// closed before message completed"); why the daemon stopped is in its log.
        ended: hyper::Error,
    },
    /// The HTTP exchange failed otherwise.
    #[error("talking to bangerd at {socket} failed")]
    Http {
        /// The socket.
        socket: PathBuf,
        /// The cause.
        #[source]
        source: hyper::Error,
    },
    /// A request could not be built (a path that is not a valid URI).
    #[error("invalid request to bangerd for {path:?}")]
    Request {
        /// The request path.
        path: String,
        /// The cause.
        #[source]
        source: hyper::http::Error,
    },
    /// The daemon answered with something that is not the expected JSON.
    #[error("unexpected answer from bangerd at {socket}")]
    BadAnswer {
        /// The socket.
        socket: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The daemon answered with an error.
    #[error("{message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The daemon's message.
        message: String,
    },
    /// The daemon could not be started.
    #[error("bangerd did not start: {reason}; see its log at {log}")]
    StartFailed {
        /// Why.
        reason: String,
        /// The daemon log.
        log: PathBuf,
    },
}

fn log_note(log: Option<&Path>) -> String {
    log.map(|l| format!(" (see its log at {})", l.display())).unwrap_or_default()
}

/// Whether a failed exchange means the daemon went away while it had the request: the
/// connection closed before a whole answer came, or was reset.
fn daemon_went_away(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
        return true;
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        cur = c.source();
    }
    false
}

/// A connection target for the daemon API.
#[derive(Debug, Clone)]
pub struct DaemonClient {
    socket: PathBuf,
    log: Option<PathBuf>,
}

impl DaemonClient {
    /// A client for the daemon listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self { socket: socket.into(), log: None }
    }

    /// The same client, naming the daemon's log in errors.
    pub fn with_log(mut self, log: impl Into<PathBuf>) -> Self {
        self.log = Some(log.into());
        self
    }

    /// The socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request and returns the status and body.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(|e| self.lost(e))?.to_bytes();
        Ok((status, bytes))
    }

    /// Once the daemon accepted the connection, a connection that ends without an answer
    /// means the daemon stopped.
    fn lost(&self, source: hyper::Error) -> ClientError {
        if daemon_went_away(&source) {
            ClientError::DaemonStopped { log: self.log.clone(), ended: source }
        } else {
            ClientError::Http { socket: self.socket.clone(), source }
        }
    }

    /// Sends one request; returns the answer with its body still to read.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Unreachable { socket: self.socket.clone(), source })?;
        let http = |source| ClientError::Http { socket: self.socket.clone(), source };
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http)?;
        tokio::spawn(conn);
        let has_body = body.is_some();
        let mut req = Request::builder().method(method).uri(path).header("host", "localhost");
        if has_body {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|source| ClientError::Request { path: path.to_owned(), source })?;
        sender.send_request(req).await.map_err(|e| self.lost(e))
    }

    /// A request with `progress=true` (`path` is without a query): the work's events, read one
    /// at a time with [`ProgressEvents::next`]. A request refused before any work is this
    /// error.
    pub async fn with_progress<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<ProgressEvents<T>, ClientError> {
        let body = body.map(|b| serde_json::to_vec(b).expect("request bodies serialize"));
        let resp = self.send(method, &format!("{path}?progress=true"), body).await?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp.into_body().collect().await.map_err(|e| self.lost(e))?.to_bytes();
            return Err(decode::<()>(&self.socket, status, &bytes).unwrap_err());
        }
        Ok(ProgressEvents {
            client: self.clone(),
            body: resp.into_body(),
            buf: Vec::new(),
            outcome: std::marker::PhantomData,
        })
    }

    /// Sends a request with an optional JSON body and decodes a JSON answer.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let body = body.map(|b| serde_json::to_vec(b).expect("request bodies serialize"));
        let (status, bytes) = self.raw(method, path, body).await?;
        decode(&self.socket, status, &bytes)
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<Status, ClientError> {
        self.call::<(), _>(Method::GET, "/v1/status", None).await
    }

    /// `GET /v1/status?checks=false`: the daemon's settings, without its checks (a daemon
    /// older than the parameter answers with them).
    pub async fn probe(&self) -> Result<Status, ClientError> {
        self.call::<(), _>(Method::GET, "/v1/status?checks=false", None).await
    }
}

/// The events of a request with `progress=true` as the daemon sends them (see
/// [`ProgressEvent`]); `T` is the outcome's type.
#[derive(Debug)]
pub struct ProgressEvents<T> {
    client: DaemonClient,
    body: Incoming,
    /// What has come of a line not yet whole.
    buf: Vec<u8>,
    outcome: std::marker::PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> ProgressEvents<T> {
    /// The next event; `None` once the daemon has sent them all.
    pub async fn next(&mut self) -> Result<Option<ProgressEvent<T>>, ClientError> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                return serde_json::from_slice(&line)
                    .map(Some)
                    .map_err(|source| ClientError::BadAnswer { socket: self.client.socket.clone(), source });
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => return Err(self.client.lost(e)),
            }
        }
    }
}

fn decode<T: DeserializeOwned>(socket: &Path, status: StatusCode, bytes: &[u8]) -> Result<T, ClientError> {
    if !status.is_success() {
        let message = serde_json::from_slice::<ErrorBody>(bytes)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(bytes).into_owned());
        return Err(ClientError::Api { status: status.as_u16(), message });
    }
    serde_json::from_slice(bytes)
        .map_err(|source| ClientError::BadAnswer { socket: socket.to_owned(), source })
}

/// The `bangerd` binary to start: beside this executable, else on PATH.
pub fn bangerd_binary() -> PathBuf {
    if let Ok(me) = std::env::current_exe() {
        let beside = me.with_file_name("bangerd");
        if beside.is_file() {
            return beside;
        }
    }
    PathBuf::from("bangerd")
}

/// Returns a client for a daemon that answers, starting `bangerd` if none does.
pub async fn connect_or_start(
    socket: &Path,
    daemon_log: &Path,
    env: &[(&str, std::ffi::OsString)],
) -> Result<(DaemonClient, Status), ClientError> {
    let client = DaemonClient::new(socket).with_log(daemon_log);
    match client.probe().await {
        Ok(status) => return Ok((client, status)),
        Err(ClientError::Unreachable { .. }) => {}
        Err(e) => return Err(e),
    }
    let failed = |reason: String| ClientError::StartFailed { reason, log: daemon_log.to_owned() };
    let bin = bangerd_binary();
    let mut cmd = crate::detach::detached_command(&bin);
    // Anything bangerd prints before its own logging starts lands in its log.
    let early_log = std::fs::OpenOptions::new().create(true).append(true).open(daemon_log);
    cmd.stdout(Stdio::null());
    cmd.stderr(early_log.map(Stdio::from).unwrap_or_else(|_| Stdio::null()));
    cmd.envs(env.iter().map(|(k, v)| (*k, v)));
    let mut child = cmd.spawn().map_err(|e| failed(format!("cannot run {}: {e}", bin.display())))?;
    let deadline = Instant::now() + DAEMON_START_TIMEOUT;
    loop {
        match client.probe().await {
            Ok(status) => return Ok((client, status)),
            Err(ClientError::Unreachable { .. }) => {}
            Err(e) => return Err(e),
        }
        if let Ok(Some(exit)) = child.try_wait() {
            // Another bangerd may have won the race to start; it answers soon.
            if exit.success()
                && let Ok(status) = wait_for(&client, deadline).await
            {
                return Ok((client, status));
            }
            return Err(failed(format!("{} exited ({exit})", bin.display())));
        }
        if Instant::now() >= deadline {
            return Err(failed(format!(
                "no answer on {} within {} s",
                socket.display(),
                DAEMON_START_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_for(client: &DaemonClient, deadline: Instant) -> Result<Status, ClientError> {
    loop {
        match client.probe().await {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    use super::*;

    #[tokio::test]
    async fn a_daemon_that_dies_with_the_request_is_reported_with_what_happens_next() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("bangerd.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        // A "daemon" that reads the request and dies before answering.
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
        });
        let log = dir.path().join("bangerd.log");
        let client = DaemonClient::new(&socket).with_log(&log);
        let err =
            client.call::<(), serde_json::Value>(Method::POST, "/v1/vms/dev/stop", None).await.unwrap_err();
        server.await.unwrap();
        assert!(matches!(err, ClientError::DaemonStopped { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.starts_with("bangerd stopped while handling the request"), "{msg}");
        assert!(msg.contains(&log.display().to_string()), "{msg}");
        assert!(
            msg.contains("the next banger command starts it again") && msg.contains("banger vm list"),
            "{msg}"
        );
        let shown = format!("{:#}", anyhow::Error::from(err));
        assert!(!shown.contains("connection closed"), "the cli shows the symptom: {shown}");
    }

    #[tokio::test]
    async fn nothing_listening_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let err = DaemonClient::new(dir.path().join("none.sock")).status().await.unwrap_err();
        assert!(matches!(err, ClientError::Unreachable { .. }), "{err:?}");
    }
}
