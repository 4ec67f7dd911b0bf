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
//! The number of connections per uid is capped, so one user cannot exhaust the helper's
//! descriptors for everyone else.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use banger_protocol::frame::{self, FrameError};
use banger_protocol::{HelperError, Request, Response};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::timeout;

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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            hello_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections_per_uid: 64,
        }
    }
}

/// Open connections per uid.
type Counts = Arc<Mutex<HashMap<u32, usize>>>;

/// Releases a connection's slot when the connection ends.
struct Slot {
    counts: Counts,
    uid: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = c.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.uid);
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

/// Why a connection ended early, for the log.
fn frame_problem(e: &FrameError) -> Option<String> {
    match e {
        FrameError::Closed => None,
        FrameError::Truncated
        | FrameError::TooLarge(_)
        | FrameError::TooManyFds
        | FrameError::Codec(_)
        | FrameError::Io(_) => Some(e.to_string()),
    }
}

async fn connection<K: Kernel>(
    helper: Arc<Helper<K>>,
    stream: UnixStream,
    config: ServerConfig,
    counts: Counts,
) {
    let mut peer = match peer::identify(&stream) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("{e}: {:?}", std::error::Error::source(&e));
            return;
        }
    };
    let slot = {
        let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = c.entry(peer.uid).or_default();
        if *n >= config.max_connections_per_uid {
            None
        } else {
            *n += 1;
            Some(Slot { counts: counts.clone(), uid: peer.uid })
        }
    };
    let Some(_slot) = slot else {
        tracing::warn!(
            "uid {} already holds {} connections; refusing another",
            peer.uid,
            config.max_connections_per_uid
        );
        let e = HelperError::Conflict {
            what: format!("too many connections from uid {}; close some first", peer.uid),
        };
        send(&stream, &Response::Error(e)).await;
        return;
    };

    match timeout(config.hello_timeout, frame::recv::<Request>(&stream)).await {
        Err(_) => {
            tracing::debug!("uid {} pid {}: no hello in time", peer.uid, peer.pid);
            return;
        }
        Ok(Err(e)) => {
            if let Some(p) = frame_problem(&e) {
                tracing::info!("uid {} pid {}: bad first frame: {p}", peer.uid, peer.pid);
                if matches!(e, FrameError::Codec(_)) {
                    send(&stream, &Response::Error(HelperError::invalid(e.to_string()))).await;
                }
            }
            return;
        }
        Ok(Ok((Request::Hello { version, install_id }, fds))) => {
            if !fds.is_empty() {
                drop(fds);
                send(&stream, &Response::Error(HelperError::invalid("hello takes no file descriptors")))
                    .await;
                return;
            }
            match helper.hello(&mut peer, version, install_id) {
                Ok(reply) => {
                    if !send(&stream, &Response::Hello(reply)).await {
                        return;
                    }
                }
                Err(e) => {
                    send(&stream, &Response::Error(e)).await;
                    return;
                }
            }
        }
        Ok(Ok((other, fds))) => {
            drop(fds);
            let e = HelperError::invalid(format!("the first request must be hello, not {}", other.op_name()));
            send(&stream, &Response::Error(e)).await;
            return;
        }
    }

    loop {
        let (request, fds) = match timeout(config.idle_timeout, frame::recv::<Request>(&stream)).await {
            Err(_) => {
                tracing::debug!("uid {} pid {}: idle, closing", peer.uid, peer.pid);
                return;
            }
            Ok(Err(e)) => {
                if let Some(p) = frame_problem(&e) {
                    tracing::info!("uid {} pid {}: closing after a bad frame: {p}", peer.uid, peer.pid);
                    if matches!(e, FrameError::Codec(_)) {
                        send(&stream, &Response::Error(HelperError::invalid(e.to_string()))).await;
                    }
                }
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
