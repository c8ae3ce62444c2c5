//! The upstream server: HTTP/1.1 and h2c (prior knowledge) on one port, detected per
//! connection.
//!
//! Behaviour, per request:
//! - gRPC (`content-type: application/grpc…`): 200, `content-type: application/grpc`, one
//!   empty message frame, trailers `grpc-status: 0`.
//! - otherwise 200 with a JSON echo of the request:
//!   `{"method","path","protocol","headers":{..},"body_len","body_fnv1a64","trailers":{..}}`
//!   (`path` includes the query string; header names are lower case, repeated values are
//!   joined with `,`; `body_fnv1a64` is the FNV-1a 64 hash of the body as 16 hex digits).
//! - `x-upstream-status: N` sets the status, `x-upstream-delay-ms: N` delays the response
//!   (after the request body was read), `x-upstream-body: text` replaces the echo body.
//!
//! Every response carries `x-meshwasm-upstream: 1`, so a test can tell an upstream reply
//! from a local reply of Envoy. [`Upstream::requests`] counts the requests received.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::server::{accept_loop, ServerThread};

type RspBody = BoxBody<Bytes, Infallible>;

/// A running upstream on its own runtime thread; stopped on drop.
pub struct Upstream {
    server: ServerThread,
    requests: Arc<AtomicU64>,
}

// === impl Upstream ===

impl Upstream {
    /// Starts an upstream on `127.0.0.1:<free port>`.
    pub fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("addr"))
    }

    /// Starts an upstream on `addr` (port 0 picks a free port).
    pub fn start_on(addr: SocketAddr) -> Self {
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        let server = ServerThread::spawn("meshwasm-upstream", addr, move |listener| serve(listener, counter));
        Self { server, requests }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// How many requests reached this upstream so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// The shared counter itself (to hand to other threads).
    pub fn request_counter(&self) -> Arc<AtomicU64> {
        self.requests.clone()
    }
}

/// Accepts connections forever, serving each with HTTP/1.1 or HTTP/2 (auto-detected).
pub async fn serve(listener: tokio::net::TcpListener, requests: Arc<AtomicU64>) {
    accept_loop(listener, move |stream| {
        let requests = requests.clone();
        async move {
            let svc = hyper::service::service_fn(move |req| {
                let requests = requests.clone();
                async move { Ok::<_, Infallible>(handle(req, requests).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        }
    })
    .await;
}

async fn handle(req: hyper::Request<Incoming>, requests: Arc<AtomicU64>) -> hyper::Response<RspBody> {
    requests.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    let is_grpc = parts
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);

    // Read the whole request (body and trailers) before answering.
    let (body, trailers) = match body.collect().await {
        Ok(c) => {
            let t = c.trailers().cloned();
            (c.to_bytes(), t)
        }
        Err(_) => (Bytes::new(), None),
    };

    if let Some(ms) = header("x-upstream-delay-ms").and_then(|v| v.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    if is_grpc {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        let frame = Bytes::from_static(&[0, 0, 0, 0, 0]);
        let body = Full::new(frame).with_trailers(async move { Some(Ok(t)) }).boxed();
        return hyper::Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .header("x-meshwasm-upstream", "1")
            .body(body)
            .expect("grpc response");
    }

    let status = header("x-upstream-status").and_then(|v| v.parse::<u16>().ok()).unwrap_or(200);
    let (content_type, out) = match header("x-upstream-body") {
        Some(text) => ("text/plain", Bytes::from(text)),
        None => {
            let echo = serde_json::json!({
                "method": parts.method.as_str(),
                "path": parts.uri.path_and_query().map_or("/", |p| p.as_str()),
                "protocol": format!("{:?}", parts.version),
                "headers": headers_json(&parts.headers),
                "body_len": body.len(),
                "body_fnv1a64": format!("{:016x}", fnv1a64(&body)),
                "trailers": trailers.as_ref().map_or(serde_json::json!({}), headers_json),
            });
            ("application/json", Bytes::from(echo.to_string()))
        }
    };
    hyper::Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("x-meshwasm-upstream", "1")
        .body(Full::new(out).boxed())
        .unwrap_or_else(|_| {
            hyper::Response::builder()
                .status(500)
                .body(Full::new(Bytes::from_static(b"bad x-upstream-status")).boxed())
                .expect("500")
        })
}

fn headers_json(h: &HeaderMap) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for name in h.keys() {
        let joined = h
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(",");
        m.insert(name.as_str().to_string(), serde_json::Value::String(joined));
    }
    serde_json::Value::Object(m)
}

/// FNV-1a, 64 bit: a simple checksum so tests can check a body arrived intact.
pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
