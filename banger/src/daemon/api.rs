//! The daemon's HTTP server: JSON over HTTP/1.1 on the daemon's unix socket, one endpoint per verb
//! (the table is in [`crate::api_types`]). Each connection is served on its own task; a handler
//! error becomes a 4xx/5xx answer with an [`ErrorBody`].

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixListener;

use crate::api_types::ErrorBody;
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

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).expect("api answers serialize");
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

fn error(status: u16, message: String) -> Response<Full<Bytes>> {
    json(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &ErrorBody { error: message },
    )
}

fn answer<T: Serialize>(status: StatusCode, r: Result<T, DaemonError>) -> Response<Full<Bytes>> {
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

/// Routes one request.
pub async fn handle(daemon: &Daemon, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    let ok = StatusCode::OK;
    match (&method, segments.as_slice()) {
        (&Method::GET, ["v1", "status"]) => answer(ok, daemon.status().await),
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
            let deleted = daemon.delete(name).await;
            answer(
                ok,
                deleted.map(|w| w.map_or(serde_json::json!({}), |w| serde_json::json!({ "warning": w }))),
            )
        }
        (&Method::POST, ["v1", "vms", name, "start"]) => answer(ok, daemon.start(name).await),
        (&Method::POST, ["v1", "vms", name, "stop"]) => answer(ok, daemon.stop(name).await),
        (&Method::POST, ["v1", "vms", name, "restart"]) => answer(ok, daemon.restart(name).await),
        (&Method::GET, ["v1", "vms", name, "logs"]) => {
            let bytes = query_u64(&req, "bytes").unwrap_or(16 * 1024);
            match daemon.logs(name, bytes).await {
                Ok(text) => Response::builder()
                    .status(ok)
                    .header("content-type", "text/plain; charset=utf-8")
                    .body(Full::new(Bytes::from(text)))
                    .expect("static response parts are valid"),
                Err(e) => error(e.status(), chain(&e)),
            }
        }
        (&Method::GET, ["v1", "images"]) => answer(ok, daemon.images().await),
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
mod tests {
    use super::*;
    use crate::cli::client::{ClientError, DaemonClient};
    use crate::config::Config;
    use crate::daemon::Deps;
    use crate::daemon::guest_prep::fake::FakePrep;
    use crate::daemon::helper_client::fake::FakeHelper;
    use crate::daemon::liveness::fake::FakeProcesses;
    use crate::daemon::store::Store;
    use crate::daemon::vmm::fake::FakeVmm;
    use crate::paths::Paths;

    async fn served() -> (tempfile::TempDir, DaemonClient, Arc<Daemon>) {
        let (dir, client, daemon, _) = served_with_helper().await;
        (dir, client, daemon)
    }

    async fn served_with_helper() -> (tempfile::TempDir, DaemonClient, Arc<Daemon>, Arc<FakeHelper>) {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::under(&dir.path().join("h"), nix::unistd::getuid().as_raw()).unwrap();
        paths.ensure_dirs().unwrap();
        let store = Store::open_in_memory().unwrap();
        let fake = Arc::new(FakeHelper::new(store.install_id().clone()));
        let helper = fake.clone();
        let procs = Arc::new(FakeProcesses::new());
        let deps = Deps {
            helper,
            procs: procs.clone(),
            vmm: Arc::new(FakeVmm::new(procs)),
            prep: Arc::new(FakePrep::default()),
        };
        let daemon = Arc::new(Daemon::new(paths.clone(), Config::default(), store, deps));
        let sock = paths.daemon_socket();
        let listener = UnixListener::bind(&sock).unwrap();
        tokio::spawn(serve(listener, daemon.clone()));
        (dir, DaemonClient::new(sock), daemon, fake)
    }

    #[tokio::test]
    async fn the_status_says_why_the_helper_is_unreachable() {
        let (_dir, client, _daemon, helper) = served_with_helper().await;
        let status = client.status().await.unwrap();
        assert!(status.helper_reachable && status.helper_problem.is_none(), "{status:?}");
        helper.set_unreachable(true);
        let status = client.status().await.unwrap();
        assert!(!status.helper_reachable);
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
    async fn the_api_answers_json_and_typed_errors() {
        let (_dir, client, daemon) = served().await;
        let status = client.status().await.unwrap();
        assert_eq!(status.install_id, daemon.install_id().to_string());
        assert_eq!(status.running_vms, 0);

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
}
