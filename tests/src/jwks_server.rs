//! A JWKS server for the JWT tests (and `meshwasm-jwks serve`, the example's): HTTP/1.1 on
//! hyper, answering every `GET` with the key set the test gave it, switchable at run time:
//!
//! - [`Mode::Serve`]: 200, `content-type: application/json`, the current key set;
//! - [`Mode::Slow`]: the same, that much later;
//! - [`Mode::Status`]: that status (503, 404, …), a text body;
//! - [`Mode::Garbage`]: 200 with a body that is not a JWKS;
//! - [`JwksServer::down`]: the listener is closed, connections are refused; [`JwksServer::up`]
//!   listens on the same port again.
//!
//! [`JwksServer::set_keys`] rotates the set; [`JwksServer::fetches`] counts the requests
//! received (in every mode), so a test can tell how often a proxy fetched.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::server::{accept_loop, ServerThread};

/// How the server answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Serve,
    Slow(Duration),
    Status(u16),
    Garbage,
}

#[derive(Debug)]
struct Shared {
    mode: Mutex<(Mode, String)>,
    fetches: AtomicU64,
}

pub struct JwksServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: Option<ServerThread>,
}

impl JwksServer {
    /// Serves `jwks` on `127.0.0.1:<free port>`.
    pub fn start(jwks: &serde_json::Value) -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("addr"), jwks.to_string())
    }

    /// Serves the key set `jwks` (JSON text) on `addr` (port 0 picks one).
    pub fn start_on(addr: SocketAddr, jwks: String) -> Self {
        let shared = Arc::new(Shared { mode: Mutex::new((Mode::Serve, jwks)), fetches: AtomicU64::new(0) });
        let server = spawn(addr, shared.clone());
        Self { addr: server.addr(), shared, server: Some(server) }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr><path>`.
    pub fn uri(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Serve this key set from now on (a rotation).
    pub fn set_keys(&self, jwks: &serde_json::Value) {
        self.shared.mode.lock().expect("jwks server state").1 = jwks.to_string();
    }

    pub fn set_mode(&self, mode: Mode) {
        self.shared.mode.lock().expect("jwks server state").0 = mode;
    }

    /// Stop listening: connections to the port are refused.
    pub fn down(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.stop();
        }
    }

    /// Listen on the same port again.
    pub fn up(&mut self) {
        if self.server.is_none() {
            self.server = Some(spawn(self.addr, self.shared.clone()));
        }
    }

    /// Requests received so far.
    pub fn fetches(&self) -> u64 {
        self.shared.fetches.load(Ordering::SeqCst)
    }
}

fn spawn(addr: SocketAddr, shared: Arc<Shared>) -> ServerThread {
    ServerThread::spawn("meshwasm-jwks", addr, move |listener| serve_shared(listener, shared))
}

/// Serve the key set `jwks` (JSON text) on `listener` until the process ends (the
/// `meshwasm-jwks serve` binary).
pub async fn serve(listener: TcpListener, jwks: String) {
    serve_shared(listener, Arc::new(Shared { mode: Mutex::new((Mode::Serve, jwks)), fetches: AtomicU64::new(0) })).await
}

async fn serve_shared(listener: TcpListener, shared: Arc<Shared>) {
    accept_loop(listener, move |stream| {
        let shared = shared.clone();
        async move {
            let svc = hyper::service::service_fn(move |req| handle(req, shared.clone()));
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        }
    })
    .await;
}

async fn handle(
    _req: hyper::Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    shared.fetches.fetch_add(1, Ordering::SeqCst);
    let (mode, jwks) = shared.mode.lock().expect("jwks server state").clone();
    let reply = |status: u16, ct: &str, body: String| {
        let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
        r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_str(ct).expect("content type"));
        Ok(r)
    };
    match mode {
        Mode::Serve => reply(200, "application/json", jwks),
        Mode::Slow(d) => {
            tokio::time::sleep(d).await;
            reply(200, "application/json", jwks)
        }
        Mode::Status(s) => reply(s, "text/plain", "unavailable\n".into()),
        Mode::Garbage => reply(200, "application/json", "{\"keys\": [ this is not JSON".into()),
    }
}
