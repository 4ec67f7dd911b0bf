//! The HTTP/1.1 API server on the Unix socket (hyper), shaped like Firecracker's micro_http:
//! `Server: Firecracker API` and `Connection: keep-alive` on every response, JSON bodies,
//! `204` without a body on success, `400 {"fault_message": ...}` on error.
//!
//! Two refusals happen in micro_http before Firecracker sees the request, and keep its odd body
//! (`{ "error": "...\nAll previous unanswered requests will be dropped." }`, with a raw newline):
//! a method other than GET/PUT/PATCH/DELETE, and a `Content-Length` above the payload limit
//! (51200 bytes by default). The double then closes the connection.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, SERVER};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;

use super::api::{self, Method};
use super::logger::{Level, Logger, Metrics};
use super::vm::{Vmm, VmmData};

/// Firecracker's default `--http-api-max-payload-size`.
pub const HTTP_MAX_PAYLOAD_SIZE: usize = 51200;

/// What the request handlers share.
#[derive(Debug)]
pub struct ApiContext {
    /// The VMM; one request at a time, as Firecracker's API thread hands them to the VMM thread.
    pub vmm: Mutex<Vmm>,
    /// The process logger.
    pub logger: Arc<Mutex<Logger>>,
    /// Metrics counters.
    pub metrics: Arc<Mutex<Metrics>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn response(status: StatusCode, body: Option<String>, deprecated: bool) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.clone().unwrap_or_default())));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(SERVER, HeaderValue::from_static("Firecracker API"));
    h.insert(CONNECTION, HeaderValue::from_static("keep-alive"));
    if deprecated {
        h.insert("deprecation", HeaderValue::from_static("true"));
    }
    if body.is_some() {
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    r
}

fn fault(message: &str) -> Response<Full<Bytes>> {
    response(
        StatusCode::BAD_REQUEST,
        Some(serde_json::json!({ "fault_message": message }).to_string()),
        false,
    )
}

/// micro_http's answer to a request it cannot parse; the connection is closed after it.
fn parse_error(message: &str) -> Response<Full<Bytes>> {
    let body = format!("{{ \"error\": \"{message}\nAll previous unanswered requests will be dropped.\" }}");
    let mut r = response(StatusCode::BAD_REQUEST, Some(body), false);
    r.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    r
}

async fn handle(ctx: Arc<ApiContext>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let Some(method) = Method::parse(req.method().as_str()) else {
        return Ok(parse_error("Invalid HTTP Method: Unsupported HTTP method."));
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if declared > HTTP_MAX_PAYLOAD_SIZE as u64 {
        return Ok(parse_error(&format!(
            "Request payload with size {declared} is larger than the limit of {HTTP_MAX_PAYLOAD_SIZE} allowed by server."
        )));
    }
    let path = req.uri().path().to_string();
    let body = match Limited::new(req.into_body(), HTTP_MAX_PAYLOAD_SIZE).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Ok(parse_error(&format!(
                "Request payload with size {} is larger than the limit of {HTTP_MAX_PAYLOAD_SIZE} allowed by server.",
                HTTP_MAX_PAYLOAD_SIZE + 1
            )));
        }
    };
    let body = (!body.is_empty()).then_some(body);
    let description = match &body {
        Some(b) => format!("{method:?} request on {path:?} with body {:?}", String::from_utf8_lossy(b)),
        None => format!("{method:?} request on {path:?}"),
    };
    lock(&ctx.logger).log(Level::Info, "fc_api", &format!("The API server received a {description}."));

    let parsed = match api::parse_request(method, &path, body.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            lock(&ctx.logger).log(Level::Error, "fc_api", &format!("{e:?}"));
            lock(&ctx.metrics).api_requests_failed += 1;
            return Ok(fault(&e.to_string()));
        }
    };
    if let Some(msg) = parsed.deprecation {
        lock(&ctx.logger).log(Level::Warn, "fc_api", msg);
    }
    let outcome = lock(&ctx.vmm).handle(parsed.action);
    let deprecated = parsed.deprecation.is_some();
    let resp = match outcome {
        Ok(VmmData::Empty) => {
            lock(&ctx.logger).log(
                Level::Info,
                "fc_api",
                "The request was executed successfully. Status code: 204 No Content.",
            );
            response(StatusCode::NO_CONTENT, None, deprecated)
        }
        Ok(VmmData::Json(v)) => {
            lock(&ctx.logger).log(
                Level::Info,
                "fc_api",
                "The request was executed successfully. Status code: 200 OK.",
            );
            response(StatusCode::OK, Some(v), deprecated)
        }
        Err(e) => {
            let msg = e.to_string();
            lock(&ctx.logger).log(
                Level::Error,
                "fc_api",
                &format!("Received Error. Status code: 400 Bad Request. Message: {msg}"),
            );
            let mut r = fault(&msg);
            if deprecated {
                r.headers_mut().insert("deprecation", HeaderValue::from_static("true"));
            }
            r
        }
    };
    let mut m = lock(&ctx.metrics);
    if resp.status().is_success() {
        m.api_requests_ok += 1;
    } else {
        m.api_requests_failed += 1;
    }
    Ok(resp)
}

/// Serves the API on `listener` until the process ends.
pub async fn serve(listener: UnixListener, ctx: Arc<ApiContext>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                lock(&ctx.logger).log(
                    Level::Error,
                    "fc_api",
                    &format!("API Server error on retrieving incoming request: {e}"),
                );
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(ctx.clone(), req));
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.title_case_headers(true).auto_date_header(false).keep_alive(true);
            // A client that goes away mid-request is not an error worth reporting.
            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}
