//! A client for Firecracker's HTTP API on a VM's unix socket.
//!
//! Each call opens a fresh connection to the API socket, performs one HTTP/1.1 exchange (hyper
//! 1, `Host: localhost`, JSON bodies) and closes it; a VMM that restarts between calls is simply
//! reached again. Every call is bounded by the client's timeout.
//!
//! Firecracker answers `204 No Content` to a successful `PUT`, `200` with JSON to `GET /`, and
//! `400` with `{"fault_message": "..."}` to everything it refuses; such a refusal becomes
//! [`FirecrackerError::Api`] carrying the status, the fault message and the request path. The
//! bodies are in [`api`]. Resource ids in paths (drives, network interfaces) are checked before anything is sent: Firecracker accepts only
//! ASCII letters, digits and `_`.
//!
//! [`FirecrackerClient::wait_ready`] polls `GET /` until a freshly spawned VMM serves its socket.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

/// How long one API call may take by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The most bytes of a non-JSON error body kept in an error.
const MAX_FAULT_LEN: usize = 512;

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum FirecrackerError {
    /// The API socket could not be reached.
    #[error("cannot connect to the vmm api socket {socket}: is the vmm running?")]
    Connect {
        /// The API socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The HTTP exchange broke off.
    #[error("http exchange with the vmm api socket {socket} failed during {path}")]
    Http {
        /// The API socket.
        socket: PathBuf,
        /// The request path.
        path: String,
        /// Why.
        #[source]
        source: hyper::Error,
    },
    /// Firecracker refused the request.
    #[error("firecracker refused {path} (http {status}): {fault_message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// Firecracker's `fault_message` (or the raw body when it sent no JSON).
        fault_message: String,
        /// The request path.
        path: String,
    },
    /// No answer in time.
    #[error("the vmm at {socket} did not answer {path} within {timeout:?}")]
    Timeout {
        /// The API socket.
        socket: PathBuf,
        /// The request path.
        path: String,
        /// The limit.
        timeout: Duration,
    },
    /// The answer was not what the API promises.
    #[error("unexpected answer from the vmm at {socket} to {path}: {detail}")]
    BadResponse {
        /// The API socket.
        socket: PathBuf,
        /// The request path.
        path: String,
        /// What was wrong.
        detail: String,
    },
    /// A resource id Firecracker would refuse.
    #[error("invalid firecracker {kind} id {id:?}: use only letters, digits and '_'")]
    InvalidId {
        /// `drive` or `network interface`.
        kind: &'static str,
        /// The id.
        id: String,
    },
    /// The request could not be encoded (e.g. a path that is not UTF-8).
    #[error("cannot encode the request to {path}")]
    Encode {
        /// The request path.
        path: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A freshly started VMM never served its socket.
    #[error("the vmm did not serve its api socket {socket} within {waited:?}; see the vm's serial log")]
    NotReady {
        /// The API socket.
        socket: PathBuf,
        /// How long it was waited for.
        waited: Duration,
        /// The last connection error.
        #[source]
        source: Box<FirecrackerError>,
    },
}

pub mod api;

use self::api::Action;
pub use self::api::{
    ActionType, BootSource, CacheType, Drive, HugePages, InstanceInfo, InstanceState, IoEngine, LogLevel,
    Logger, MachineConfig, Metrics, NetworkInterface, Serial, VmConfig, Vsock,
};

/// How long each request of [`FirecrackerClient::configure`] took: its path, its duration.
pub type ApiTimings = Vec<(String, std::time::Duration)>;

/// Runs `call`, a request to `path`, adding its duration to `timings` when it succeeds.
async fn timed(
    timings: &mut ApiTimings,
    path: String,
    call: impl Future<Output = Result<(), FirecrackerError>>,
) -> Result<(), FirecrackerError> {
    let at = std::time::Instant::now();
    call.await?;
    timings.push((path, at.elapsed()));
    Ok(())
}

/// Client for one VMM's API socket.
#[derive(Debug, Clone)]
pub struct FirecrackerClient {
    socket: PathBuf,
    timeout: Duration,
    /// The jail root the socket must be reached below, for a jailed VMM.
    beneath: Option<PathBuf>,
}

impl FirecrackerClient {
    /// A client for the API socket at `socket`, with [`DEFAULT_TIMEOUT`] per call.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self { socket: socket.into(), timeout: DEFAULT_TIMEOUT, beneath: None }
    }

    /// The same client for a jailed VMM's socket, reached only below the jail root `root`,
    /// following no link there ([`crate::daemon::beneath`]): the jail's directories belong to
    /// the VMM's uid, which could otherwise point the daemon at another socket of the user's.
    /// The socket is opened `O_PATH` that way and connected through `/proc/self/fd/N`.
    pub fn beneath(mut self, root: impl Into<PathBuf>) -> Self {
        self.beneath = Some(root.into());
        self
    }

    /// Connects to the socket (see [`FirecrackerClient::beneath`]).
    async fn connect(&self) -> std::io::Result<UnixStream> {
        let Some(root) = &self.beneath else { return UnixStream::connect(&self.socket).await };
        let in_jail = self.socket.strip_prefix(root).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "the api socket is not inside its jail")
        })?;
        let fd = crate::daemon::beneath::open_beneath(root, in_jail, nix::fcntl::OFlag::O_PATH)?;
        let pinned = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
        let stream = UnixStream::connect(pinned).await;
        drop(fd);
        stream
    }

    /// The same client with another per-call timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `PUT /machine-config`.
    pub async fn put_machine_config(&self, config: &MachineConfig) -> Result<(), FirecrackerError> {
        self.put("/machine-config".into(), config).await
    }

    /// `PUT /boot-source`.
    pub async fn put_boot_source(&self, boot: &BootSource) -> Result<(), FirecrackerError> {
        self.put("/boot-source".into(), boot).await
    }

    /// `PUT /drives/{drive_id}`.
    pub async fn put_drive(&self, drive: &Drive) -> Result<(), FirecrackerError> {
        check_id("drive", &drive.drive_id)?;
        self.put(format!("/drives/{}", drive.drive_id), drive).await
    }

    /// `PUT /network-interfaces/{iface_id}`.
    pub async fn put_network_interface(&self, iface: &NetworkInterface) -> Result<(), FirecrackerError> {
        check_id("network interface", &iface.iface_id)?;
        self.put(format!("/network-interfaces/{}", iface.iface_id), iface).await
    }

    /// `PUT /vsock`.
    pub async fn put_vsock(&self, vsock: &Vsock) -> Result<(), FirecrackerError> {
        self.put("/vsock".into(), vsock).await
    }

    /// `PUT /logger`.
    pub async fn put_logger(&self, logger: &Logger) -> Result<(), FirecrackerError> {
        self.put("/logger".into(), logger).await
    }

    /// `PUT /metrics`.
    pub async fn put_metrics(&self, metrics: &Metrics) -> Result<(), FirecrackerError> {
        self.put("/metrics".into(), metrics).await
    }

    /// Sends every part of `config` in its order (see [`VmConfig`]); stops at the first refusal.
    /// Returns how long each request took, by path, in order.
    pub async fn configure(&self, config: &VmConfig) -> Result<ApiTimings, FirecrackerError> {
        let mut t = ApiTimings::new();
        if let Some(logger) = &config.logger {
            timed(&mut t, "/logger".into(), self.put_logger(logger)).await?;
        }
        if let Some(metrics) = &config.metrics {
            timed(&mut t, "/metrics".into(), self.put_metrics(metrics)).await?;
        }
        if let Some(serial) = &config.serial {
            timed(&mut t, "/serial".into(), self.put("/serial".into(), serial)).await?;
        }
        timed(&mut t, "/machine-config".into(), self.put_machine_config(&config.machine)).await?;
        timed(&mut t, "/boot-source".into(), self.put_boot_source(&config.boot_source)).await?;
        for drive in &config.drives {
            timed(&mut t, format!("/drives/{}", drive.drive_id), self.put_drive(drive)).await?;
        }
        for iface in &config.network_interfaces {
            let path = format!("/network-interfaces/{}", iface.iface_id);
            timed(&mut t, path, self.put_network_interface(iface)).await?;
        }
        if let Some(vsock) = &config.vsock {
            timed(&mut t, "/vsock".into(), self.put_vsock(vsock)).await?;
        }
        Ok(t)
    }

    /// `PUT /actions {"action_type": "InstanceStart"}`.
    pub async fn instance_start(&self) -> Result<(), FirecrackerError> {
        self.action(ActionType::InstanceStart).await
    }

    /// `PUT /actions {"action_type": "SendCtrlAltDel"}`.
    pub async fn send_ctrl_alt_del(&self) -> Result<(), FirecrackerError> {
        self.action(ActionType::SendCtrlAltDel).await
    }

    /// `PUT /actions` with any action.
    pub async fn action(&self, action_type: ActionType) -> Result<(), FirecrackerError> {
        self.put("/actions".into(), &Action { action_type }).await
    }

    /// `GET /`.
    pub async fn get_instance_info(&self) -> Result<InstanceInfo, FirecrackerError> {
        let path = "/";
        let body = self.exchange(Method::GET, path, None).await?;
        serde_json::from_slice(&body).map_err(|e| FirecrackerError::BadResponse {
            socket: self.socket.clone(),
            path: path.into(),
            detail: format!("not instance info JSON: {e}"),
        })
    }

    /// Polls `GET /` every 10 ms until the VMM answers, for at most `within`. Only "not there
    /// yet" errors (no socket file, connection refused) are retried; anything else is returned.
    pub async fn wait_ready(&self, within: Duration) -> Result<InstanceInfo, FirecrackerError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match self.get_instance_info().await {
                Err(FirecrackerError::Connect { socket, source })
                    if matches!(
                        source.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(FirecrackerError::NotReady {
                            socket: self.socket.clone(),
                            waited: within,
                            source: Box::new(FirecrackerError::Connect { socket, source }),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                other => return other,
            }
        }
    }

    async fn put<T: Serialize>(&self, path: String, body: &T) -> Result<(), FirecrackerError> {
        let json = serde_json::to_vec(body)
            .map_err(|source| FirecrackerError::Encode { path: path.clone(), source })?;
        self.exchange(Method::PUT, &path, Some(json)).await.map(drop)
    }

    /// One request on a fresh connection, bounded by the timeout. Returns the body of a 2xx.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, FirecrackerError> {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.exchange_unbounded(method, path, body)).await {
            Ok(r) => r,
            Err(_) => {
                Err(FirecrackerError::Timeout { socket: self.socket.clone(), path: path.into(), timeout })
            }
        }
    }

    async fn exchange_unbounded(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, FirecrackerError> {
        let http = |source| FirecrackerError::Http { socket: self.socket.clone(), path: path.into(), source };
        let stream = self
            .connect()
            .await
            .map_err(|source| FirecrackerError::Connect { socket: self.socket.clone(), source })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(http)?;

        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "localhost")
            .header(ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|e| {
            FirecrackerError::BadResponse {
                socket: self.socket.clone(),
                path: path.into(),
                detail: format!("cannot build the request: {e}"),
            }
        })?;

        let exchange = async {
            let resp = sender.send_request(req).await.map_err(http)?;
            let status = resp.status();
            let bytes = resp.into_body().collect().await.map_err(http)?.to_bytes();
            Ok::<_, FirecrackerError>((status, bytes))
        };
        // Drive the connection beside the exchange; it ends when `sender` is dropped. If the
        // connection finishes first (the VMM closed it), the exchange still gets whatever answer
        // was read, or hyper's "closed before message completed" error.
        tokio::pin!(exchange);
        let (status, bytes) = tokio::select! {
            biased;
            r = &mut exchange => r?,
            c = conn => match c {
                Err(e) => return Err(http(e)),
                Ok(()) => exchange.await?,
            },
        };
        if status.is_success() {
            return Ok(bytes);
        }
        Err(FirecrackerError::Api {
            status: status.as_u16(),
            fault_message: fault_message(status, &bytes),
            path: path.into(),
        })
    }
}

/// Firecracker's `fault_message`, or the raw body (trimmed, bounded), or the status' reason.
fn fault_message(status: StatusCode, body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Fault {
        fault_message: String,
    }
    if let Ok(f) = serde_json::from_slice::<Fault>(body) {
        return f.fault_message;
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return status.canonical_reason().unwrap_or("no reason given").to_owned();
    }
    let mut cut = text.len().min(MAX_FAULT_LEN);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text[..cut].to_owned()
}

fn check_id(kind: &'static str, id: &str) -> Result<(), FirecrackerError> {
    if !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        Ok(())
    } else {
        Err(FirecrackerError::InvalidId { kind, id: id.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};

    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper::{Response, StatusCode};
    use serde_json::{Value, json};
    use tokio::net::UnixListener;

    use super::*;

    /// One request as the fake VMM saw it.
    #[derive(Debug, Clone)]
    struct Seen {
        method: Method,
        path: String,
        host: Option<String>,
        content_type: Option<String>,
        body: Option<Value>,
    }

    /// Firecracker's pre-boot state, enough to answer like it does.
    #[derive(Debug, Default)]
    struct VmmState {
        seen: Vec<Seen>,
        kernel: bool,
        started: bool,
    }

    fn fault(msg: &str) -> (StatusCode, String) {
        (StatusCode::BAD_REQUEST, json!({ "fault_message": msg }).to_string())
    }

    /// Answers like Firecracker: 204 on success, 400 + fault_message on refusal, 200 + JSON for
    /// `GET /`. Paths starting with `/raw-error` answer a non-JSON 500 for the error-body test.
    fn answer(
        state: &mut VmmState,
        method: &Method,
        path: &str,
        body: Option<&Value>,
    ) -> (StatusCode, String) {
        const AFTER: &str = "The requested operation is not supported after starting the microVM.";
        const BEFORE: &str = "The requested operation is not supported before starting the microVM.";
        let ok = (StatusCode::NO_CONTENT, String::new());
        let preboot = |state: &VmmState| if state.started { Some(fault(AFTER)) } else { None };
        match (method.as_str(), path) {
            ("GET", "/") => {
                let st = if state.started { "Running" } else { "Not started" };
                let info = json!({"id": "anonymous-instance", "state": st, "vmm_version": "1.16.0", "app_name": "Firecracker"});
                (StatusCode::OK, info.to_string())
            }
            ("PUT", "/machine-config" | "/logger" | "/metrics" | "/vsock") => preboot(state).unwrap_or(ok),
            ("PUT", "/boot-source") => {
                if let Some(f) = preboot(state) {
                    return f;
                }
                state.kernel = true;
                ok
            }
            ("PUT", p) if p.starts_with("/drives/") || p.starts_with("/network-interfaces/") => {
                let (key, id) = if let Some(id) = p.strip_prefix("/drives/") {
                    ("drive_id", id)
                } else {
                    ("iface_id", p.trim_start_matches("/network-interfaces/"))
                };
                if body.and_then(|b| b[key].as_str()) != Some(id) {
                    return fault("The id from the path does not match the id from the body!");
                }
                preboot(state).unwrap_or(ok)
            }
            ("PUT", "/actions") => match body.and_then(|b| b["action_type"].as_str()) {
                Some("InstanceStart") if state.started => fault(AFTER),
                Some("InstanceStart") if !state.kernel => {
                    fault("Start microvm error: Cannot start microvm without kernel configuration.")
                }
                Some("InstanceStart") => {
                    state.started = true;
                    ok
                }
                Some("SendCtrlAltDel") if !state.started => fault(BEFORE),
                Some("SendCtrlAltDel") => ok,
                _ => {
                    fault("An error occurred when deserializing the json body of a request: unknown variant.")
                }
            },
            _ if path.starts_with("/raw-error") => {
                (StatusCode::INTERNAL_SERVER_ERROR, "  plain text failure \n".into())
            }
            _ => fault(&format!("Invalid request method and/or path: {method} {path}.")),
        }
    }

    struct FakeVmm {
        _dir: tempfile::TempDir,
        socket: PathBuf,
        state: Arc<Mutex<VmmState>>,
        server: tokio::task::JoinHandle<()>,
    }

    impl Drop for FakeVmm {
        fn drop(&mut self) {
            self.server.abort();
        }
    }

    impl FakeVmm {
        fn seen(&self) -> Vec<Seen> {
            self.state.lock().unwrap().seen.clone()
        }

        fn client(&self) -> FirecrackerClient {
            FirecrackerClient::new(&self.socket).with_timeout(Duration::from_secs(5))
        }
    }

    async fn serve(listener: UnixListener, state: Arc<Mutex<VmmState>>) {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<Incoming>| {
                    let state = Arc::clone(&state);
                    async move {
                        let method = req.method().clone();
                        let path = req.uri().path().to_owned();
                        let header = |name| {
                            req.headers()
                                .get(name)
                                .and_then(|v: &hyper::header::HeaderValue| v.to_str().ok())
                                .map(str::to_owned)
                        };
                        let host = header(HOST);
                        let content_type = header(CONTENT_TYPE);
                        let raw = req.into_body().collect().await.unwrap().to_bytes();
                        let body: Option<Value> =
                            if raw.is_empty() { None } else { Some(serde_json::from_slice(&raw).unwrap()) };
                        let mut st = state.lock().unwrap();
                        st.seen.push(Seen {
                            method: method.clone(),
                            path: path.clone(),
                            host,
                            content_type,
                            body: body.clone(),
                        });
                        let (status, text) = answer(&mut st, &method, &path, body.as_ref());
                        let mut resp = Response::new(Full::new(Bytes::from(text)));
                        *resp.status_mut() = status;
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }

    fn fake_vmm() -> FakeVmm {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("fc.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let state = Arc::new(Mutex::new(VmmState::default()));
        let server = tokio::spawn(serve(listener, Arc::clone(&state)));
        FakeVmm { _dir: dir, socket, state, server }
    }

    fn root_drive() -> Drive {
        Drive {
            drive_id: "rootfs".into(),
            is_root_device: true,
            path_on_host: "/state/vms/a/root.ext4".into(),
            is_read_only: false,
            cache_type: None,
            io_engine: None,
            partuuid: None,
        }
    }

    #[tokio::test]
    async fn a_full_boot_sends_what_firecracker_expects() {
        let vmm = fake_vmm();
        let fc = vmm.client();
        assert_eq!(fc.get_instance_info().await.unwrap().state, InstanceState::NotStarted);
        fc.put_machine_config(&MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 512,
            smt: None,
            track_dirty_pages: None,
            huge_pages: None,
        })
        .await
        .unwrap();
        fc.put_boot_source(&BootSource {
            kernel_image_path: "/images/base/vmlinux".into(),
            boot_args: Some(
                "console=ttyS0 reboot=k panic=1 ip=172.30.0.2::172.30.0.1:255.255.255.252::eth0:off".into(),
            ),
            initrd_path: None,
        })
        .await
        .unwrap();
        fc.put_drive(&root_drive()).await.unwrap();
        fc.put_network_interface(&NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "bg0123456789ab".into(),
            guest_mac: Some("06:00:ac:1e:00:02".into()),
        })
        .await
        .unwrap();
        fc.put_vsock(&Vsock { guest_cid: 3, uds_path: "/state/vms/a/vsock".into() }).await.unwrap();
        fc.put_logger(&Logger {
            log_path: "/state/vms/a/fc.log".into(),
            level: Some(LogLevel::Warning),
            show_level: None,
            show_log_origin: None,
        })
        .await
        .unwrap();
        fc.put_metrics(&Metrics { metrics_path: "/state/vms/a/metrics".into() }).await.unwrap();
        fc.instance_start().await.unwrap();
        let info = fc.get_instance_info().await.unwrap();
        assert_eq!(info.state, InstanceState::Running);
        assert_eq!(info.app_name, "Firecracker");
        fc.send_ctrl_alt_del().await.unwrap();

        let seen = vmm.seen();
        let puts: Vec<(String, Value)> = seen
            .iter()
            .filter(|s| s.method == Method::PUT)
            .map(|s| (s.path.clone(), s.body.clone().unwrap()))
            .collect();
        assert_eq!(
            puts,
            [
                ("/machine-config".to_owned(), json!({"vcpu_count": 2, "mem_size_mib": 512})),
                (
                    "/boot-source".to_owned(),
                    json!({"kernel_image_path": "/images/base/vmlinux",
                           "boot_args": "console=ttyS0 reboot=k panic=1 ip=172.30.0.2::172.30.0.1:255.255.255.252::eth0:off"})
                ),
                (
                    "/drives/rootfs".to_owned(),
                    json!({"drive_id": "rootfs", "is_root_device": true,
                           "path_on_host": "/state/vms/a/root.ext4", "is_read_only": false})
                ),
                (
                    "/network-interfaces/eth0".to_owned(),
                    json!({"iface_id": "eth0", "host_dev_name": "bg0123456789ab", "guest_mac": "06:00:ac:1e:00:02"})
                ),
                ("/vsock".to_owned(), json!({"guest_cid": 3, "uds_path": "/state/vms/a/vsock"})),
                ("/logger".to_owned(), json!({"log_path": "/state/vms/a/fc.log", "level": "Warning"})),
                ("/metrics".to_owned(), json!({"metrics_path": "/state/vms/a/metrics"})),
                ("/actions".to_owned(), json!({"action_type": "InstanceStart"})),
                ("/actions".to_owned(), json!({"action_type": "SendCtrlAltDel"})),
            ]
        );
        for s in &seen {
            assert_eq!(s.host.as_deref(), Some("localhost"), "{s:?}");
            let want_ct = if s.method == Method::PUT { Some("application/json") } else { None };
            assert_eq!(s.content_type.as_deref(), want_ct, "{s:?}");
        }
        let gets: Vec<_> = seen
            .iter()
            .filter(|s| s.method == Method::GET)
            .map(|s| (s.path.as_str(), s.body.is_none()))
            .collect();
        assert_eq!(gets, [("/", true), ("/", true)]);
    }

    #[tokio::test]
    async fn configure_sends_every_part_in_order_and_stops_at_a_refusal() {
        let vmm = fake_vmm();
        let fc = vmm.client();
        let config = VmConfig {
            logger: Some(Logger {
                log_path: "/state/vms/a/vmm.log".into(),
                level: Some(LogLevel::Info),
                show_level: Some(true),
                show_log_origin: None,
            }),
            metrics: Some(Metrics { metrics_path: "/state/vms/a/metrics".into() }),
            serial: None,
            machine: MachineConfig {
                vcpu_count: 1,
                mem_size_mib: 128,
                smt: None,
                track_dirty_pages: None,
                huge_pages: None,
            },
            boot_source: BootSource { kernel_image_path: "/k".into(), boot_args: None, initrd_path: None },
            drives: vec![root_drive()],
            network_interfaces: vec![NetworkInterface {
                iface_id: "eth0".into(),
                host_dev_name: "tap0".into(),
                guest_mac: None,
            }],
            vsock: Some(Vsock { guest_cid: 3, uds_path: "/state/vms/a/vsock".into() }),
        };
        let timings = fc.configure(&config).await.unwrap();
        let paths: Vec<String> = vmm.seen().into_iter().map(|s| s.path).collect();
        // Each request's duration, by the path it went to.
        assert_eq!(timings.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(), paths);
        assert_eq!(
            paths,
            [
                "/logger",
                "/metrics",
                "/machine-config",
                "/boot-source",
                "/drives/rootfs",
                "/network-interfaces/eth0",
                "/vsock"
            ]
        );

        // After boot every pre-boot part is refused: the first refusal ends it.
        fc.instance_start().await.unwrap();
        let err = fc.configure(&config).await.unwrap_err();
        assert!(matches!(&err, FirecrackerError::Api { path, .. } if path == "/logger"), "{err:?}");
        assert_eq!(vmm.seen().len(), 9);
    }

    #[tokio::test]
    async fn refusals_carry_status_fault_message_and_path() {
        let vmm = fake_vmm();
        let fc = vmm.client();
        let err = fc.instance_start().await.unwrap_err();
        match &err {
            FirecrackerError::Api { status, fault_message, path } => {
                assert_eq!(*status, 400);
                assert_eq!(
                    fault_message,
                    "Start microvm error: Cannot start microvm without kernel configuration."
                );
                assert_eq!(path, "/actions");
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("http 400") && err.to_string().contains("without kernel"), "{err}");

        let err = fc.send_ctrl_alt_del().await.unwrap_err();
        assert!(
            matches!(&err, FirecrackerError::Api { fault_message, .. } if fault_message.contains("before starting")),
            "{err:?}"
        );

        fc.put_boot_source(&BootSource {
            kernel_image_path: "/k".into(),
            boot_args: None,
            initrd_path: None,
        })
        .await
        .unwrap();
        fc.instance_start().await.unwrap();
        let err = fc
            .put_machine_config(&MachineConfig {
                vcpu_count: 1,
                mem_size_mib: 128,
                smt: Some(false),
                track_dirty_pages: None,
                huge_pages: Some(HugePages::None),
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, FirecrackerError::Api { status: 400, path, fault_message } if path == "/machine-config" && fault_message.contains("after starting")),
            "{err:?}"
        );
        let last = vmm.seen().pop().unwrap();
        assert_eq!(
            last.body.unwrap(),
            json!({"vcpu_count": 1, "mem_size_mib": 128, "smt": false, "huge_pages": "None"})
        );
    }

    #[tokio::test]
    async fn non_json_error_bodies_are_kept_as_text() {
        let vmm = fake_vmm();
        let fc = vmm.client();
        let err = fc.exchange(Method::GET, "/raw-error", None).await.unwrap_err();
        assert!(
            matches!(&err, FirecrackerError::Api { status: 500, fault_message, .. } if fault_message == "plain text failure"),
            "{err:?}"
        );
        assert_eq!(fault_message(StatusCode::BAD_REQUEST, b""), "Bad Request");
        assert_eq!(fault_message(StatusCode::BAD_REQUEST, "é".repeat(600).as_bytes()).len(), MAX_FAULT_LEN);
    }

    #[tokio::test]
    async fn bad_ids_are_refused_before_sending() {
        let vmm = fake_vmm();
        let fc = vmm.client();
        for bad in ["", "root-fs", "a/b", "../x", "é"] {
            let d = Drive { drive_id: bad.into(), ..root_drive() };
            let err = fc.put_drive(&d).await.unwrap_err();
            assert!(matches!(err, FirecrackerError::InvalidId { kind: "drive", .. }), "{bad:?}: {err:?}");
        }
        let err = fc
            .put_network_interface(&NetworkInterface {
                iface_id: "eth 0".into(),
                host_dev_name: "x".into(),
                guest_mac: None,
            })
            .await
            .unwrap_err();
        assert!(matches!(err, FirecrackerError::InvalidId { kind: "network interface", .. }));
        assert!(vmm.seen().is_empty());
    }

    #[tokio::test]
    async fn a_missing_socket_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("gone.sock");
        let err = FirecrackerClient::new(&socket).instance_start().await.unwrap_err();
        assert!(matches!(err, FirecrackerError::Connect { .. }), "{err:?}");
        assert!(err.to_string().contains(&socket.display().to_string()), "{err}");
    }

    #[tokio::test]
    async fn a_silent_vmm_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("mute.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let hold = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                conns.push(s);
            }
        });
        let fc = FirecrackerClient::new(&socket).with_timeout(Duration::from_millis(200));
        let err = fc.get_instance_info().await.unwrap_err();
        assert!(matches!(&err, FirecrackerError::Timeout { path, .. } if path == "/"), "{err:?}");
        hold.abort();
    }

    #[tokio::test]
    async fn a_vmm_that_hangs_up_is_an_http_error() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("rude.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let server = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                drop(s);
            }
        });
        let err = FirecrackerClient::new(&socket).instance_start().await.unwrap_err();
        assert!(matches!(&err, FirecrackerError::Http { path, .. } if path == "/actions"), "{err:?}");
        server.abort();
    }

    #[tokio::test]
    async fn wait_ready_polls_until_the_socket_serves() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("late.sock");
        let err = FirecrackerClient::new(&socket).wait_ready(Duration::from_millis(50)).await.unwrap_err();
        assert!(matches!(err, FirecrackerError::NotReady { .. }), "{err:?}");

        let state = Arc::new(Mutex::new(VmmState::default()));
        let late = socket.clone();
        let st = Arc::clone(&state);
        let server = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            serve(UnixListener::bind(&late).unwrap(), st).await;
        });
        let info = FirecrackerClient::new(&socket).wait_ready(Duration::from_secs(5)).await.unwrap();
        assert_eq!(info.state, InstanceState::NotStarted);
        server.abort();
    }

    #[tokio::test]
    async fn a_jailed_socket_is_reached_only_below_its_root_without_links() {
        let vmm = fake_vmm();
        let root = vmm._dir.path().join("root");
        std::fs::create_dir_all(root.join("run")).unwrap();
        // The VMM's socket, moved into its jail (a renamed socket still answers).
        let api = root.join("run/firecracker.socket");
        std::fs::rename(&vmm.socket, &api).unwrap();
        let fc = FirecrackerClient::new(&api).beneath(&root).with_timeout(Duration::from_secs(5));
        fc.get_instance_info().await.unwrap();
        assert_eq!(vmm.seen().last().unwrap().path, "/");

        // The jail's uid replaced `run` with a link to elsewhere: nothing is reached.
        let elsewhere = vmm._dir.path().join("elsewhere");
        std::fs::rename(root.join("run"), &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, root.join("run")).unwrap();
        let before = vmm.seen().len();
        let err = fc.send_ctrl_alt_del().await.unwrap_err();
        assert!(
            matches!(&err, FirecrackerError::Connect { source, .. } if source.raw_os_error() == Some(libc::ELOOP)),
            "{err:?}"
        );
        assert!(err.to_string().contains(&api.display().to_string()), "{err}");
        assert_eq!(vmm.seen().len(), before);
        // Without `beneath` the link would have been followed.
        FirecrackerClient::new(&api).with_timeout(Duration::from_secs(5)).get_instance_info().await.unwrap();
        // A socket path outside the root is refused.
        let outside = FirecrackerClient::new(elsewhere.join("firecracker.socket")).beneath(&root);
        assert!(outside.get_instance_info().await.is_err());
    }

    #[test]
    fn unknown_instance_states_still_decode() {
        let info: InstanceInfo = serde_json::from_str(
            r#"{"id":"x","state":"Hibernating","vmm_version":"9","app_name":"Firecracker"}"#,
        )
        .unwrap();
        assert_eq!(info.state, InstanceState::Unknown);
    }
}
