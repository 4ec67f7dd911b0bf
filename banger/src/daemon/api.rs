//! The daemon's HTTP server: JSON over HTTP/1.1 on the daemon's unix socket, one endpoint per verb
//! (the table is in [`crate::api_types`]). Each connection is served on its own task; a handler
//! error becomes a 4xx/5xx answer with an [`ErrorBody`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixListener;

use crate::api_types::{ErrorBody, ImportImage, ProgressEvent};
use crate::daemon::images::ImportProgress;
use crate::daemon::lifecycle::{MAX_STOP_GRACE, Shutdown, StartStep};
use crate::daemon::{Daemon, DaemonError, chain};

/// The largest request body accepted.
const MAX_BODY: usize = 64 * 1024;

/// Serves the API until the daemon is asked to stop.
pub async fn serve(listener: UnixListener, daemon: Arc<Daemon>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = daemon.shutdown.notified() => return,
        };
        let (stream, _) = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let daemon = daemon.clone();
                async move { Ok::<_, Infallible>(handle(&daemon, req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "api connection ended with an error");
            }
        });
    }
}

/// An answer's body: whole, or a stream of lines.
type Body = BoxBody<Bytes, Infallible>;

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("api answers serialize");
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("static response parts are valid")
}

fn error(status: u16, message: String) -> Response<Body> {
    json(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &ErrorBody { error: message },
    )
}

fn answer<T: Serialize>(status: StatusCode, r: Result<T, DaemonError>) -> Response<Body> {
    match r {
        Ok(v) => json(status, &v),
        Err(e) => error(e.status(), chain(&e)),
    }
}

async fn body<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, DaemonError> {
    let bytes =
        Limited::new(req.into_body(), MAX_BODY).collect().await.map_err(DaemonError::BodyRead)?.to_bytes();
    serde_json::from_slice(&bytes).map_err(DaemonError::Body)
}

fn query_u64(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// The `key=value` pairs of the request's query.
fn query_pairs(req: &Request<Incoming>) -> Vec<(&str, &str)> {
    let query = req.uri().query().unwrap_or("");
    query.split('&').filter(|kv| !kv.is_empty()).map(|kv| kv.split_once('=').unwrap_or((kv, ""))).collect()
}

/// How a stop or delete ends a running guest: `?timeout=SECS` (the grace period after
/// Ctrl-Alt-Del) or `?force=true` (kill the VMM at once); neither: the daemon's grace period.
fn shutdown_query(req: &Request<Incoming>) -> Result<Shutdown, DaemonError> {
    let bad = |key: &str, value: &str, expected: String| DaemonError::Query {
        key: key.to_owned(),
        value: value.to_owned(),
        expected,
    };
    let mut how = Shutdown::Guest;
    for (key, value) in query_pairs(req) {
        how = match (key, how) {
            ("force", _) if value != "true" => return Err(bad(key, value, "only force=true".into())),
            ("timeout", Shutdown::Kill) | ("force", Shutdown::GuestWithin(_)) => {
                return Err(bad(key, value, "give a timeout or force, not both".into()));
            }
            ("force", _) => Shutdown::Kill,
            ("timeout", _) => {
                let max = MAX_STOP_GRACE.as_secs();
                match value.parse::<u64>() {
                    Ok(secs) if secs <= max => Shutdown::GuestWithin(Duration::from_secs(secs)),
                    _ => return Err(bad(key, value, format!("whole seconds from 0 to {max}"))),
                }
            }
            _ => return Err(bad(key, value, "this endpoint takes only timeout and force".into())),
        };
    }
    Ok(how)
}

/// Where streamed work tells its progress: each call sends one [`ProgressEvent`] line. Cheap to
/// clone and usable from any thread; once the client has gone away, sending does nothing (the
/// work goes on).
#[derive(Clone)]
struct ProgressLines(futures::channel::mpsc::UnboundedSender<Bytes>);

impl ProgressLines {
    fn send<T: Serialize>(&self, event: &ProgressEvent<T>) {
        let mut line = serde_json::to_vec(event).expect("progress events serialize");
        line.push(b'\n');
        let _ = self.0.unbounded_send(Bytes::from(line));
    }

    fn step(&self, step: impl std::fmt::Display) {
        self.send(&ProgressEvent::<()>::Step(step.to_string()));
    }

    fn bytes(&self, done: u64, total: u64) {
        self.send(&ProgressEvent::<()>::Bytes { done, total });
    }
}

/// A request with `progress=true`: `work` runs on its own task (it finishes even if the client
/// goes away), telling its steps through the [`ProgressLines`] it is given; the answer is 200 at
/// once, then one [`ProgressEvent`] a line, the last being the outcome.
fn stream_progress<T, Fut>(work: impl FnOnce(ProgressLines) -> Fut) -> Response<Body>
where
    T: Serialize + Send + 'static,
    Fut: std::future::Future<Output = Result<T, DaemonError>> + Send + 'static,
{
    let (tx, rx) = futures::channel::mpsc::unbounded::<Bytes>();
    let lines = ProgressLines(tx);
    let work = work(lines.clone());
    tokio::spawn(async move {
        let outcome = match work.await {
            Ok(done) => ProgressEvent::Done(Box::new(done)),
            Err(e) => ProgressEvent::Failed { status: e.status(), error: chain(&e) },
        };
        lines.send(&outcome);
    });
    let body = StreamBody::new(rx.map(|line| Ok::<_, Infallible>(Frame::data(line))));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/x-ndjson")
        .body(BodyExt::boxed(body))
        .expect("static response parts are valid")
}

/// `POST /v1/vms/{name}/start?progress=true`: the start's steps, then the VM. An unknown VM is
/// answered at once, as by the plain start.
fn start_with_progress(daemon: &Arc<Daemon>, name: &str) -> Response<Body> {
    // A name that is no VM is refused before the stream begins, with its own status.
    if let Err(e) = daemon.find(name) {
        return error(e.status(), chain(&e));
    }
    let (daemon, name) = (daemon.clone(), name.to_owned());
    stream_progress(move |lines| async move {
        daemon.start_reporting(&name, &move |step: StartStep| lines.step(step)).await
    })
}

/// `POST /v1/images?progress=true`: the import's steps and bytes, then the image. A bad body
/// or an invalid or taken name is answered at once, as by the plain import.
async fn import_with_progress(daemon: &Arc<Daemon>, req: Request<Incoming>) -> Response<Body> {
    let checked = match body::<ImportImage>(req).await {
        Ok(b) => daemon.check_import(&b).map(|()| b),
        Err(e) => Err(e),
    };
    let req = match checked {
        Ok(b) => b,
        Err(e) => return error(e.status(), chain(&e)),
    };
    let daemon = daemon.clone();
    stream_progress(move |lines| async move {
        let told = move |p: ImportProgress| match p {
            ImportProgress::Step(step) => lines.step(step),
            ImportProgress::Bytes { done, total } => lines.bytes(done, total),
        };
        daemon.import_image_reporting(req, told).await
    })
}

/// Routes one request.
pub async fn handle(daemon: &Arc<Daemon>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    let ok = StatusCode::OK;
    match (&method, segments.as_slice()) {
        (&Method::GET, ["v1", "status"]) => {
            let checks = !query_pairs(&req).contains(&("checks", "false"));
            answer(ok, daemon.status(checks).await)
        }
        (&Method::POST, ["v1", "daemon", "stop"]) => {
            daemon.shutdown.notify_one();
            json(ok, &serde_json::json!({}))
        }
        (&Method::GET, ["v1", "vms"]) => answer(ok, daemon.list().await),
        (&Method::POST, ["v1", "vms"]) => match body(req).await {
            Ok(b) => answer(StatusCode::CREATED, daemon.create(b).await),
            Err(e) => answer::<()>(ok, Err(e)),
        },
        (&Method::GET, ["v1", "vms", name]) => answer(ok, daemon.show(name).await),
        (&Method::DELETE, ["v1", "vms", name]) => {
            let deleted = match shutdown_query(&req) {
                Ok(how) => daemon.delete(name, how).await,
                Err(e) => Err(e),
            };
            answer(
                ok,
                deleted.map(|w| w.map_or(serde_json::json!({}), |w| serde_json::json!({ "warning": w }))),
            )
        }
        (&Method::POST, ["v1", "vms", name, "start"]) if query_pairs(&req) == [("progress", "true")] => {
            start_with_progress(daemon, name)
        }
        (&Method::POST, ["v1", "vms", name, "start"]) => answer(ok, daemon.start(name).await),
        (&Method::POST, ["v1", "vms", name, "stop"]) => match shutdown_query(&req) {
            Ok(how) => answer(ok, daemon.stop(name, how).await),
            Err(e) => answer::<()>(ok, Err(e)),
        },
        (&Method::POST, ["v1", "vms", name, "restart"]) => answer(ok, daemon.restart(name).await),
        (&Method::GET, ["v1", "vms", name, "logs"]) => {
            let bytes = query_u64(&req, "bytes").unwrap_or(16 * 1024);
            let pairs = query_pairs(&req);
            let vmm = pairs.contains(&("vmm", "true"));
            let current_run = pairs.contains(&("run", "current"));
            match daemon.logs(name, bytes, vmm, current_run).await {
                Ok(text) => Response::builder()
                    .status(ok)
                    .header("content-type", "text/plain; charset=utf-8")
                    .body(Full::new(Bytes::from(text)).boxed())
                    .expect("static response parts are valid"),
                Err(e) => error(e.status(), chain(&e)),
            }
        }
        (&Method::GET, ["v1", "images"]) => answer(ok, daemon.images().await),
        (&Method::POST, ["v1", "images"]) if query_pairs(&req) == [("progress", "true")] => {
            import_with_progress(daemon, req).await
        }
        (&Method::POST, ["v1", "images"]) => match body(req).await {
            Ok(b) => answer(StatusCode::CREATED, daemon.import_image(b).await),
            Err(e) => answer::<()>(ok, Err(e)),
        },
        (&Method::DELETE, ["v1", "images", name]) => {
            answer(ok, daemon.remove_image(name).await.map(|()| serde_json::json!({})))
        }
        _ => error(404, format!("no endpoint {method} {path}: see the table in the api documentation")),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api_types::{ImageView, StartEvent, VmView};
    use crate::cli::client::{ClientError, DaemonClient};
    use crate::config::Config;
    use crate::daemon::Deps;
    use crate::daemon::guest_prep::fake::FakePrep;
    use crate::daemon::helper_client::fake::FakeHelper;
    use crate::daemon::lifecycle::Timeouts;
    use crate::daemon::liveness::fake::FakeProcesses;
    use crate::daemon::store::Store;
    use crate::daemon::vmm::fake::{FakeVmm, VmmCall};
    use crate::paths::Paths;
    use std::path::{Path, PathBuf};

    /// A daemon over fakes, served on its socket in a temp install.
    pub(crate) struct Served {
        /// The install's directory.
        pub dir: tempfile::TempDir,
        /// A client of the daemon's socket.
        pub client: DaemonClient,
        /// The daemon.
        pub daemon: Arc<Daemon>,
        /// Its VMM.
        pub vmm: Arc<FakeVmm>,
        /// Its helper.
        pub helper: Arc<FakeHelper>,
    }

    /// A small importable image in `dir`: an x86-64 ELF header as its kernel, an ext4 superblock
    /// magic in a sparse root filesystem of `rootfs_len` bytes.
    pub(crate) fn small_image(dir: &Path, rootfs_len: u64) -> (PathBuf, PathBuf) {
        let kernel = dir.join("vmlinux");
        let mut k = vec![0u8; 4096];
        k[..4].copy_from_slice(b"\x7fELF");
        (k[4], k[5]) = (2, 1);
        k[18..20].copy_from_slice(&62u16.to_le_bytes());
        std::fs::write(&kernel, k).unwrap();
        let rootfs = dir.join("rootfs.ext4");
        let f = std::fs::File::create(&rootfs).unwrap();
        f.set_len(rootfs_len).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &0xEF53u16.to_le_bytes(), 1024 + 56).unwrap();
        (kernel, rootfs)
    }

    /// A daemon over fakes with no image, its VMM binary not found.
    async fn served() -> (tempfile::TempDir, DaemonClient, Arc<Daemon>) {
        let s = serve_fakes(false).await;
        (s.dir, s.client, s.daemon)
    }

    /// A daemon over fakes; with `image`, image `base` imported and a VMM binary that exists
    /// (the fake VMM never runs it), so VMs start.
    pub(crate) async fn serve_fakes(image: bool) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::under(&dir.path().join("h"), nix::unistd::getuid().as_raw()).unwrap();
        paths.ensure_dirs().unwrap();
        let store = Store::open_in_memory().unwrap();
        let mut config = Config::default();
        if image {
            crate::daemon::lifecycle::tests::import_test_image(&store, &paths, dir.path());
            config.firecracker = "/bin/true".into();
        }
        let fake = Arc::new(FakeHelper::new(store.install_id().clone()));
        let helper = fake.clone();
        let procs = Arc::new(FakeProcesses::new());
        let vmm = Arc::new(FakeVmm::new(procs.clone()));
        let deps =
            Deps { helper, procs: procs.clone(), vmm: vmm.clone(), prep: Arc::new(FakePrep::default()) };
        let daemon = Daemon::new(paths.clone(), config, store, deps).with_timeouts(Timeouts {
            stop_grace: std::time::Duration::from_millis(200),
            kill_wait: std::time::Duration::from_millis(200),
        });
        let daemon = Arc::new(daemon);
        let sock = paths.daemon_socket();
        let listener = UnixListener::bind(&sock).unwrap();
        tokio::spawn(serve(listener, daemon.clone()));
        Served { dir, client: DaemonClient::new(sock), daemon, vmm, helper: fake }
    }

    #[tokio::test]
    async fn the_status_says_why_the_helper_is_unreachable() {
        let Served { dir: _dir, client, helper, .. } = serve_fakes(false).await;
        let status = client.status().await.unwrap();
        assert!(status.helper_reachable == Some(true) && status.helper_problem.is_none(), "{status:?}");
        helper.set_unreachable(true);
        let status = client.status().await.unwrap();
        assert_eq!(status.helper_reachable, Some(false));
        let why = status.helper_problem.unwrap();
        assert!(why.starts_with("banger-helper is not running"), "{why}");
        assert!(why.contains("; fix: sudo systemctl start banger-helper.socket"), "{why}");
        helper.set_unreachable(false);
        helper.fail(
            "ping",
            banger_protocol::HelperError::Denied { rule: "access".into(), reason: "not admitted".into() },
        );
        let why = client.status().await.unwrap().helper_problem.unwrap();
        assert!(why.starts_with("banger-helper refuses this user: denied by policy rule `access`"), "{why}");
    }

    #[tokio::test]
    async fn the_cli_probe_asks_neither_the_helper_nor_any_vm() {
        let Served { dir: _dir, client, daemon, helper, .. } = serve_fakes(false).await;
        helper.clear_calls();
        let probe = client.probe().await.unwrap();
        assert_eq!(probe.install_id, daemon.install_id().to_string());
        assert_eq!((probe.helper_reachable, probe.helper_problem, probe.running_vms), (None, None, None));
        assert!(helper.calls().is_empty(), "{:?}", helper.calls());
        // Without the parameter the checks are made.
        let status = client.status().await.unwrap();
        assert_eq!((status.helper_reachable, status.running_vms), (Some(true), Some(0)));
        assert_eq!(helper.calls(), [banger_protocol::Request::Ping]);
    }

    #[tokio::test]
    async fn the_api_answers_json_and_typed_errors() {
        let (_dir, client, daemon) = served().await;
        let status = client.status().await.unwrap();
        assert_eq!(status.install_id, daemon.install_id().to_string());
        assert_eq!(status.running_vms, Some(0));

        let list: serde_json::Value = client.call::<(), _>(Method::GET, "/v1/vms", None).await.unwrap();
        assert_eq!(list, serde_json::json!([]));

        // Unknown VM: 404 with a message naming it.
        let err = client.call::<(), serde_json::Value>(Method::GET, "/v1/vms/ghost", None).await.unwrap_err();
        match err {
            ClientError::Api { status: 404, message } => assert!(message.contains("ghost"), "{message}"),
            other => panic!("{other:?}"),
        }
        // A body with an unknown field: 400.
        let bad = serde_json::json!({"name": "x", "colour": "red"});
        let err = client.call::<_, serde_json::Value>(Method::POST, "/v1/vms", Some(&bad)).await.unwrap_err();
        assert!(matches!(err, ClientError::Api { status: 400, .. }), "{err:?}");
        // No image imported: the create is refused with what to do.
        let body = serde_json::json!({"name": "dev"});
        let err =
            client.call::<_, serde_json::Value>(Method::POST, "/v1/vms", Some(&body)).await.unwrap_err();
        match err {
            ClientError::Api { status: 400, message } => assert!(message.contains("--image"), "{message}"),
            other => panic!("{other:?}"),
        }
        // Unknown endpoint.
        let (code, _) = client.raw(Method::PUT, "/v1/nothing", None).await.unwrap();
        assert_eq!(code, StatusCode::NOT_FOUND);
        // Stop: the server loop ends.
        let _: serde_json::Value = client.call::<(), _>(Method::POST, "/v1/daemon/stop", None).await.unwrap();
    }

    #[tokio::test]
    async fn stop_and_delete_take_how_the_guest_ends_from_the_query() {
        let s = serve_fakes(true).await;
        let create = serde_json::json!({"name": "dev", "image": "base"});
        let _: serde_json::Value = s.client.call(Method::POST, "/v1/vms", Some(&create)).await.unwrap();
        let _: serde_json::Value =
            s.client.call::<(), _>(Method::POST, "/v1/vms/dev/start", None).await.unwrap();
        for bad in ["?force=yes", "?timeout=ten", "?timeout=3601", "?timeout=5&force=true", "?grace=5"] {
            let path = format!("/v1/vms/dev/stop{bad}");
            match s.client.call::<(), serde_json::Value>(Method::POST, &path, None).await.unwrap_err() {
                ClientError::Api { status: 400, message } => {
                    assert!(message.starts_with("invalid "), "{message}")
                }
                other => panic!("{bad}: {other:?}"),
            }
            assert_eq!(s.daemon.show("dev").await.unwrap().state, "running", "{bad} stopped nothing");
        }
        let vm: serde_json::Value =
            s.client.call::<(), _>(Method::POST, "/v1/vms/dev/stop?force=true", None).await.unwrap();
        assert_eq!(vm["state"], "stopped");
        let shutdowns =
            |calls: Vec<VmmCall>| calls.iter().filter(|c| matches!(c, VmmCall::Shutdown(_))).count();
        assert_eq!(shutdowns(s.vmm.calls()), 0, "forced: the guest is not asked");
        let _: serde_json::Value =
            s.client.call::<(), _>(Method::POST, "/v1/vms/dev/start", None).await.unwrap();
        let _: serde_json::Value =
            s.client.call::<(), _>(Method::DELETE, "/v1/vms/dev?timeout=0", None).await.unwrap();
        assert_eq!(shutdowns(s.vmm.calls()), 1, "asked, then killed at once");
        assert!(s.daemon.list().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn logs_are_the_console_or_the_vmm_log_of_the_current_run_or_both() {
        let s = serve_fakes(true).await;
        let create = serde_json::json!({"name": "dev", "image": "base"});
        let vm: crate::api_types::VmView =
            s.client.call(Method::POST, "/v1/vms", Some(&create)).await.unwrap();
        let rotated = |p: &std::path::Path| crate::daemon::logs::rotated_path(p);
        std::fs::write(rotated(&vm.log_path), "console, last run\n").unwrap();
        std::fs::write(&vm.log_path, "console, this run\n").unwrap();
        std::fs::write(&vm.vmm_log_path, "vmm, this run\n").unwrap();
        let get = |query: &'static str| {
            let client = s.client.clone();
            async move {
                let (code, body) =
                    client.raw(Method::GET, &format!("/v1/vms/dev/logs{query}"), None).await.unwrap();
                assert_eq!(code, StatusCode::OK);
                String::from_utf8(body.to_vec()).unwrap()
            }
        };
        assert_eq!(get("").await, "console, last run\nconsole, this run\n");
        assert_eq!(get("?run=current").await, "console, this run\n");
        assert_eq!(get("?bytes=10&run=current").await, "", "no line starts in the last 10 bytes");
        assert_eq!(get("?vmm=true").await, "vmm, this run\n");
    }

    #[tokio::test]
    async fn a_start_with_progress_streams_its_steps_then_the_outcome() {
        let s = serve_fakes(true).await;
        let create = serde_json::json!({"name": "dev", "image": "base"});
        let _: serde_json::Value = s.client.call(Method::POST, "/v1/vms", Some(&create)).await.unwrap();
        let mut events =
            s.client.with_progress::<(), VmView>(Method::POST, "/v1/vms/dev/start", None).await.unwrap();
        let mut seen = Vec::new();
        while let Some(event) = events.next().await.unwrap() {
            seen.push(event);
        }
        let steps: Vec<String> = [
            StartStep::Image,
            StartStep::Network,
            StartStep::RootDisk,
            StartStep::Personalize,
            StartStep::Spawn,
            StartStep::Configure,
            StartStep::Boot,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (last, before) = seen.split_last().unwrap();
        assert_eq!(
            before,
            steps.into_iter().map(StartEvent::Step).collect::<Vec<_>>(),
            "no dm steps without dm"
        );
        assert!(matches!(last, StartEvent::Done(vm) if vm.state == "running"), "{last:?}");

        // A failure is the last event, with the status a plain start answers.
        let _: serde_json::Value =
            s.client.call::<(), _>(Method::POST, "/v1/vms/dev/stop", None).await.unwrap();
        s.vmm.fail(crate::daemon::vmm::fake::VmmOp::Boot);
        let mut events =
            s.client.with_progress::<(), VmView>(Method::POST, "/v1/vms/dev/start", None).await.unwrap();
        let mut last = None;
        while let Some(event) = events.next().await.unwrap() {
            last = Some(event);
        }
        match last.unwrap() {
            StartEvent::Failed { status: 500, error } => {
                assert!(error.starts_with("cannot start vm dev: booting the guest failed"), "{error}")
            }
            other => panic!("{other:?}"),
        }
        // An unknown vm is refused before any stream.
        let err = s
            .client
            .with_progress::<(), VmView>(Method::POST, "/v1/vms/ghost/start", None)
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Api { status: 404, .. }), "{err:?}");
    }

    #[tokio::test]
    async fn an_import_with_progress_streams_its_steps_and_bytes_then_the_image_or_the_error() {
        let s = serve_fakes(false).await;
        let (kernel, rootfs) = small_image(s.dir.path(), 8 << 20);
        let body = ImportImage {
            name: "small".into(),
            kernel: kernel.clone(),
            rootfs: rootfs.clone(),
            initrd: None,
        };

        let mut events =
            s.client.with_progress::<_, ImageView>(Method::POST, "/v1/images", Some(&body)).await.unwrap();
        let mut seen = Vec::new();
        while let Some(event) = events.next().await.unwrap() {
            seen.push(event);
        }
        let (last, before) = seen.split_last().unwrap();
        let steps: Vec<&str> = before
            .iter()
            .filter_map(|e| match e {
                ProgressEvent::Step(step) => Some(step.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(
            steps,
            [
                "checking the kernel",
                "checking the root filesystem",
                "copying the kernel (4 KiB)",
                "hashing the kernel (4 KiB)",
                "copying the root filesystem (8 MiB)",
                "hashing the root filesystem (8 MiB)",
            ]
        );
        assert!(
            before.contains(&ProgressEvent::Bytes { done: 8 << 20, total: 8 << 20 }),
            "the root filesystem's bytes: {before:?}"
        );
        match last {
            ProgressEvent::Done(img) => {
                assert_eq!(img.name, "small");
                assert_eq!(img.size_bytes, 4096 + (8 << 20));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.daemon.images().await.unwrap().len(), 1);

        // A taken name is refused before any stream, with the plain import's status.
        let err = s
            .client
            .with_progress::<_, ImageView>(Method::POST, "/v1/images", Some(&body))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Api { status: 409, message } if message.contains("image rm small")),
            "{err:?}"
        );

        // A file that fails its check is the last event, with the status a plain import answers.
        let bad = ImportImage {
            name: "bad".into(),
            kernel,
            rootfs: rootfs.clone(),
            initrd: Some(s.dir.path().to_owned()),
        };
        let mut events =
            s.client.with_progress::<_, ImageView>(Method::POST, "/v1/images", Some(&bad)).await.unwrap();
        let mut last = None;
        while let Some(event) = events.next().await.unwrap() {
            last = Some(event);
        }
        match last.unwrap() {
            ProgressEvent::Failed { status: 400, error } => assert!(error.contains("initrd"), "{error}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.daemon.images().await.unwrap().len(), 1, "nothing imported");
    }
}
