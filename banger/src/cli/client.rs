//! The CLI's side of the daemon API: HTTP/1.1 over the daemon's unix socket, and starting the
//! daemon on demand.
//!
//! [`connect_or_start`] first asks `GET /v1/status`; when nothing answers it starts `bangerd`
//! detached (its own session, so it outlives this command), waits until the socket answers, and
//! if the daemon dies or hangs instead, says so with the daemon log's path.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use crate::api_types::{ErrorBody, Status};

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
    /// The HTTP exchange failed.
    #[error("talking to bangerd at {socket} failed: {detail}")]
    Http {
        /// The socket.
        socket: PathBuf,
        /// What failed.
        detail: String,
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

/// A connection target for the daemon API.
#[derive(Debug, Clone)]
pub struct DaemonClient {
    socket: PathBuf,
}

impl DaemonClient {
    /// A client for the daemon listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self { socket: socket.into() }
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
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Unreachable { socket: self.socket.clone(), source })?;
        let http = |detail: String| ClientError::Http { socket: self.socket.clone(), detail };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http(e.to_string()))?;
        tokio::spawn(conn);
        let has_body = body.is_some();
        let mut req = Request::builder().method(method).uri(path).header("host", "localhost");
        if has_body {
            req = req.header("content-type", "application/json");
        }
        let req =
            req.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|e| http(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(|e| http(e.to_string()))?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(|e| http(e.to_string()))?.to_bytes();
        Ok((status, bytes))
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
}

fn decode<T: DeserializeOwned>(socket: &Path, status: StatusCode, bytes: &[u8]) -> Result<T, ClientError> {
    if !status.is_success() {
        let message = serde_json::from_slice::<ErrorBody>(bytes)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(bytes).into_owned());
        return Err(ClientError::Api { status: status.as_u16(), message });
    }
    serde_json::from_slice(bytes).map_err(|e| ClientError::Http {
        socket: socket.to_owned(),
        detail: format!("unexpected answer: {e}"),
    })
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
    let client = DaemonClient::new(socket);
    match client.status().await {
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
        match client.status().await {
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
        match client.status().await {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}
