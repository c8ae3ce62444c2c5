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
//!
//! Flaky mode (for retries), per request key `x-flaky-key: K`: every attempt with that key is
//! recorded ([`Upstream::attempts`]: its headers, body and arrival time), and the first
//! `x-flaky-fail: N` attempts fail as `x-flaky-mode` says, after the body was read:
//! - `status=503` (the default mode): that status, body `flaky failure <attempt>`;
//! - `grpc=14`: a trailers-only gRPC reply with that `grpc-status`;
//! - `reset`: no response, the stream is reset (HTTP/1.1: the connection is closed);
//! - `delay=300`: the normal reply, 300 ms late (instead of any `x-upstream-delay-ms`).
//!
//! Every reply with a key carries `x-flaky-attempt: <n>` (1-based).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    flaky: Flaky,
}

/// One attempt of a keyed (flaky-mode) request, as the upstream received it.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// Header names lower case, in arrival order, repeated headers as separate entries.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub at: Instant,
}

impl Attempt {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// The attempts seen per request key (shared by the server's connections).
#[derive(Debug, Clone, Default)]
pub struct Flaky {
    by_key: Arc<Mutex<HashMap<String, Vec<Attempt>>>>,
}

impl Flaky {
    pub fn attempts(&self, key: &str) -> Vec<Attempt> {
        self.by_key.lock().map(|m| m.get(key).cloned().unwrap_or_default()).unwrap_or_default()
    }

    /// Record an attempt; returns its 1-based number.
    fn record(&self, key: &str, attempt: Attempt) -> usize {
        let Ok(mut m) = self.by_key.lock() else { return 1 };
        let v = m.entry(key.to_string()).or_default();
        v.push(attempt);
        v.len()
    }
}

/// The attempt failed on purpose with a reset: hyper resets the stream (HTTP/2) or closes
/// the connection (HTTP/1.1).
#[derive(Debug)]
pub struct FlakyReset;

impl std::fmt::Display for FlakyReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("flaky reset")
    }
}

impl std::error::Error for FlakyReset {}

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
        let flaky = Flaky::default();
        let state = flaky.clone();
        let server =
            ServerThread::spawn("meshwasm-upstream", addr, move |listener| serve_flaky(listener, counter, state));
        Self { server, requests, flaky }
    }

    /// The attempts received with `x-flaky-key: key`, in arrival order.
    pub fn attempts(&self, key: &str) -> Vec<Attempt> {
        self.flaky.attempts(key)
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
    serve_flaky(listener, requests, Flaky::default()).await;
}

/// [`serve`], recording keyed attempts in `flaky`.
pub async fn serve_flaky(listener: tokio::net::TcpListener, requests: Arc<AtomicU64>, flaky: Flaky) {
    accept_loop(listener, move |stream| {
        let requests = requests.clone();
        let flaky = flaky.clone();
        async move {
            let svc = hyper::service::service_fn(move |req| {
                let requests = requests.clone();
                let flaky = flaky.clone();
                async move { handle(req, requests, flaky).await }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        }
    })
    .await;
}

async fn handle(
    req: hyper::Request<Incoming>,
    requests: Arc<AtomicU64>,
    flaky: Flaky,
) -> Result<hyper::Response<RspBody>, FlakyReset> {
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

    let mut attempt = None;
    let mut delayed = false;
    if let Some(key) = header("x-flaky-key") {
        let headers = parts
            .headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let n = flaky.record(&key, Attempt { headers, body: body.clone(), at: Instant::now() });
        attempt = Some(n);
        let fail = header("x-flaky-fail").and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
        if n <= fail {
            let mode = header("x-flaky-mode").unwrap_or_else(|| "status=503".into());
            let (kind, arg) = mode.split_once('=').unwrap_or((mode.as_str(), ""));
            let reply = |status: u16, extra: Option<(&str, String)>| {
                let mut b = hyper::Response::builder()
                    .status(status)
                    .header("x-meshwasm-upstream", "1")
                    .header("x-flaky-attempt", n.to_string());
                if let Some((k, v)) = extra {
                    b = b.header("content-type", "application/grpc").header(k, v);
                    return b.body(Full::new(Bytes::new()).boxed()).expect("grpc failure");
                }
                b.header("content-type", "text/plain")
                    .body(Full::new(Bytes::from(format!("flaky failure {n}"))).boxed())
                    .expect("flaky failure")
            };
            match kind {
                "reset" => return Err(FlakyReset),
                "delay" => {
                    tokio::time::sleep(Duration::from_millis(arg.parse().unwrap_or(1000))).await;
                    delayed = true;
                }
                "grpc" => return Ok(reply(200, Some(("grpc-status", arg.to_string())))),
                _ => return Ok(reply(arg.parse().unwrap_or(503), None)),
            }
        }
    }
    let attempt_header = attempt.map(|n| n.to_string()).unwrap_or_default();

    if let Some(ms) = header("x-upstream-delay-ms").and_then(|v| v.parse::<u64>().ok()).filter(|_| !delayed) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    if is_grpc {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        let frame = Bytes::from_static(&[0, 0, 0, 0, 0]);
        let body = Full::new(frame).with_trailers(async move { Some(Ok(t)) }).boxed();
        let mut b = hyper::Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .header("x-meshwasm-upstream", "1");
        if attempt.is_some() {
            b = b.header("x-flaky-attempt", attempt_header);
        }
        return Ok(b.body(body).expect("grpc response"));
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
    let mut b = hyper::Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("x-meshwasm-upstream", "1");
    if attempt.is_some() {
        b = b.header("x-flaky-attempt", attempt_header);
    }
    Ok(b.body(Full::new(out).boxed()).unwrap_or_else(|_| {
        hyper::Response::builder()
            .status(500)
            .body(Full::new(Bytes::from_static(b"bad x-upstream-status")).boxed())
            .expect("500")
    }))
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
