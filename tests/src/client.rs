//! HTTP clients: HTTP/1.1 and HTTP/2 (h2c, prior knowledge), request trailers, gRPC
//! unary, a client that disconnects mid-flight, a concurrent load helper, and TLS
//! (HTTP/1.1 or HTTP/2 by ALPN, optionally with a client certificate: [`TlsClient`]).
//!
//! Each request uses its own connection, so with `--concurrency 2` the kernel's
//! SO_REUSEPORT hashing spreads requests over both Envoy workers.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// Which protocol the client speaks to Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Http1,
    /// HTTP/2 cleartext with prior knowledge (what gRPC clients do).
    Http2,
}

/// A request to send; build it with [`Request::get`], [`Request::post`], [`Request::grpc`].
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub authority: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub trailers: Vec<(String, String)>,
    pub proto: Proto,
    pub timeout: Duration,
}

/// A complete response, with the time from sending the request to the end of its body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
    pub elapsed: Duration,
}

// === impl Request ===

impl Request {
    pub fn new(method: &str, path: &str) -> Self {
        Self {
            method: method.to_string(),
            path: path.to_string(),
            authority: "meshwasm.test".to_string(),
            headers: Vec::new(),
            body: Bytes::new(),
            trailers: Vec::new(),
            proto: Proto::Http1,
            timeout: Duration::from_secs(30),
        }
    }

    pub fn get(path: &str) -> Self {
        Self::new("GET", path)
    }

    pub fn post(path: &str, body: impl Into<Bytes>) -> Self {
        Self::new("POST", path).body(body)
    }

    /// A unary gRPC call over h2c: POST, `content-type: application/grpc`, `te: trailers`,
    /// one length-prefixed (uncompressed) message frame.
    pub fn grpc(path: &str, message: &[u8]) -> Self {
        let mut frame = Vec::with_capacity(5 + message.len());
        frame.push(0u8);
        frame.extend_from_slice(&u32::try_from(message.len()).expect("grpc message too big").to_be_bytes());
        frame.extend_from_slice(message);
        Self::new("POST", path).h2().header("content-type", "application/grpc").header("te", "trailers").body(frame)
    }

    #[must_use]
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    #[must_use]
    pub fn headers<'a>(mut self, hs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        for (k, v) in hs {
            self.headers.push((k.to_string(), v.to_string()));
        }
        self
    }

    #[must_use]
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// Adds a request trailer (sent after the body; use HTTP/2 to be sure it is forwarded).
    #[must_use]
    pub fn trailer(mut self, name: &str, value: &str) -> Self {
        self.trailers.push((name.to_string(), value.to_string()));
        self
    }

    #[must_use]
    pub fn authority(mut self, authority: &str) -> Self {
        self.authority = authority.to_string();
        self
    }

    #[must_use]
    pub fn method(mut self, method: &str) -> Self {
        self.method = method.to_string();
        self
    }

    #[must_use]
    pub fn proto(mut self, proto: Proto) -> Self {
        self.proto = proto;
        self
    }

    #[must_use]
    pub fn h2(self) -> Self {
        self.proto(Proto::Http2)
    }

    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn to_hyper(&self) -> hyper::Request<ReqBody> {
        self.to_hyper_scheme("http")
    }

    fn to_hyper_scheme(&self, scheme: &str) -> hyper::Request<ReqBody> {
        let uri = match self.proto {
            Proto::Http1 => self.path.clone(),
            Proto::Http2 => format!("{scheme}://{}{}", self.authority, self.path),
        };
        let mut b = hyper::Request::builder().method(self.method.as_str()).uri(uri);
        if self.proto == Proto::Http1 {
            b = b.header("host", self.authority.as_str());
        }
        for (k, v) in &self.headers {
            b = b.header(k.as_str(), v.as_str());
        }
        let trailers = if self.trailers.is_empty() { None } else { Some(header_map(&self.trailers)) };
        let body = ReqBody { data: (!self.body.is_empty()).then(|| self.body.clone()), trailers };
        b.body(body).expect("valid request")
    }
}

fn header_map(pairs: &[(String, String)]) -> HeaderMap {
    let mut m = HeaderMap::new();
    for (k, v) in pairs {
        m.append(
            HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            HeaderValue::from_str(v).expect("header value"),
        );
    }
    m
}

/// A request body: optional data, then optional trailers.
struct ReqBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        if let Some(t) = self.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.data, &self.trailers) {
            (d, None) => SizeHint::with_exact(d.as_ref().map_or(0, |d| d.len() as u64)),
            _ => SizeHint::default(),
        }
    }
}

// === impl Response ===

impl Response {
    /// A response header as a string (`None` when absent or not UTF-8).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn trailer(&self, name: &str) -> Option<&str> {
        self.trailers.as_ref()?.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON (the upstream's echo); panics with the body otherwise.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("response body is not JSON ({e}): status {} body {:?}", self.status, self.text())
        })
    }

    /// `grpc-status` from the trailers, else from the headers (trailers-only reply).
    pub fn grpc_status(&self) -> Option<i32> {
        self.trailer("grpc-status").or_else(|| self.header("grpc-status")).and_then(|s| s.trim().parse().ok())
    }

    /// `grpc-message` from the trailers, else from the headers (percent-decoded).
    pub fn grpc_message(&self) -> Option<String> {
        self.trailer("grpc-message").or_else(|| self.header("grpc-message")).map(percent_decode)
    }

    /// True when this response came from the upstream echo server (not a local reply).
    pub fn from_upstream(&self) -> bool {
        self.header("x-meshwasm-upstream").is_some()
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// === sending ===

/// Send one request on a new connection to `addr` (async).
pub async fn send_async(addr: SocketAddr, req: &Request) -> Result<Response, String> {
    let timeout = req.timeout;
    match tokio::time::timeout(timeout, send_inner(addr, req)).await {
        Ok(r) => r,
        Err(_) => Err(format!("request {} {} timed out after {timeout:?}", req.method, req.path)),
    }
}

async fn send_inner(addr: SocketAddr, req: &Request) -> Result<Response, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    exchange(TokioIo::new(tcp), req.proto, req.to_hyper()).await
}

/// Sends `hreq` over `io` with `proto` and reads the whole response.
async fn exchange<IO>(io: IO, proto: Proto, hreq: hyper::Request<ReqBody>) -> Result<Response, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let start = Instant::now();
    let rsp = match proto {
        Proto::Http1 => {
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(io).await.map_err(|e| format!("h1 handshake: {e}"))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            sender.send_request(hreq).await.map_err(|e| format!("h1 request: {e}"))?
        }
        Proto::Http2 => {
            let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| format!("h2 handshake: {e}"))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            sender.send_request(hreq).await.map_err(|e| format!("h2 request: {e}"))?
        }
    };
    let (parts, body) = rsp.into_parts();
    let collected = body.collect().await.map_err(|e| format!("response body: {e}"))?;
    let trailers = collected.trailers().cloned();
    let body = collected.to_bytes();
    Ok(Response { status: parts.status.as_u16(), headers: parts.headers, body, trailers, elapsed: start.elapsed() })
}

// === TLS ===

/// A TLS client's settings: the CA it trusts, the server name it sends (SNI) and verifies,
/// and optionally a client certificate. ALPN offers `h2` for [`Proto::Http2`] requests and
/// `http/1.1` otherwise (rustls with the ring provider; TLS 1.2 and 1.3).
#[derive(Debug, Clone)]
pub struct TlsClient {
    pub ca: PathBuf,
    pub server_name: String,
    /// Certificate chain and private key (PEM files).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl TlsClient {
    /// Trusts `ca`, verifies the server as `localhost`, presents no client certificate.
    pub fn new(ca: &Path) -> Self {
        Self { ca: ca.to_path_buf(), server_name: "localhost".into(), client_cert: None }
    }

    /// Presents this client certificate (e.g. `certs.client(SPIFFE_CLIENT)`).
    #[must_use]
    pub fn client_cert(mut self, files: &crate::certs::CertFiles) -> Self {
        self.client_cert = Some((files.cert.clone(), files.key.clone()));
        self
    }

    #[must_use]
    pub fn server_name(mut self, name: &str) -> Self {
        self.server_name = name.into();
        self
    }

    fn config(&self, proto: Proto) -> Result<Arc<rustls::ClientConfig>, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&self.ca).map_err(|e| format!("CA {}: {e}", self.ca.display()))? {
            let c = c.map_err(|e| format!("CA {}: {e}", self.ca.display()))?;
            roots.add(c).map_err(|e| format!("CA {}: {e}", self.ca.display()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS versions: {e}"))?
            .with_root_certificates(roots);
        let mut config = match &self.client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                    .map_err(|e| format!("cert {}: {e}", cert.display()))?
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("cert {}: {e}", cert.display()))?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("key {}: {e}", key.display()))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| format!("client cert: {e}"))?
            }
        };
        config.alpn_protocols = match proto {
            Proto::Http1 => vec![b"http/1.1".to_vec()],
            Proto::Http2 => vec![b"h2".to_vec()],
        };
        Ok(Arc::new(config))
    }
}

/// Sends one request over TLS on a new connection (async). A failed handshake (an untrusted
/// server, a refused or missing client certificate) is an `Err` naming the TLS error.
pub async fn send_tls_async(addr: SocketAddr, req: &Request, tls: &TlsClient) -> Result<Response, String> {
    let timeout = req.timeout;
    let fut = async {
        let config = tls.config(req.proto)?;
        let name = rustls::pki_types::ServerName::try_from(tls.server_name.clone())
            .map_err(|e| format!("server name {}: {e}", tls.server_name))?;
        let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
        exchange(TokioIo::new(stream), req.proto, req.to_hyper_scheme("https")).await
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("TLS request {} {} timed out after {timeout:?}", req.method, req.path)),
    }
}

/// Sends one request over TLS (blocking); panics on a transport or TLS error.
pub fn send_tls(addr: SocketAddr, req: &Request, tls: &TlsClient) -> Response {
    try_send_tls(addr, req, tls).unwrap_or_else(|e| panic!("{e}"))
}

/// Sends one request over TLS (blocking), returning transport and TLS errors.
pub fn try_send_tls(addr: SocketAddr, req: &Request, tls: &TlsClient) -> Result<Response, String> {
    crate::block_on(send_tls_async(addr, req, tls))
}

/// Send one request (blocking); panics on a transport error.
pub fn send(addr: SocketAddr, req: &Request) -> Response {
    try_send(addr, req).unwrap_or_else(|e| panic!("{e}"))
}

/// Send one request (blocking), returning transport errors.
pub fn try_send(addr: SocketAddr, req: &Request) -> Result<Response, String> {
    crate::block_on(send_async(addr, req))
}

/// Send `n` requests with `workers` concurrent connections; `make(i)` builds request `i`.
/// Results are returned in request order.
pub fn fire(
    addr: SocketAddr,
    n: usize,
    workers: usize,
    make: impl Fn(usize) -> Request + Send + Sync + 'static,
) -> Vec<Result<Response, String>> {
    let make = Arc::new(make);
    let next = Arc::new(AtomicUsize::new(0));
    crate::block_on(async move {
        let mut tasks = Vec::new();
        for _ in 0..workers.max(1) {
            let make = make.clone();
            let next = next.clone();
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let req = make(i);
                    out.push((i, send_async(addr, &req).await));
                }
                out
            }));
        }
        let mut all: Vec<(usize, Result<Response, String>)> = Vec::with_capacity(n);
        for t in tasks {
            all.extend(t.await.expect("load worker panicked"));
        }
        all.sort_by_key(|(i, _)| *i);
        all.into_iter().map(|(_, r)| r).collect()
    })
}

/// One HTTP/2 (h2c) connection carrying several streams, for stream-level behaviour
/// (for example resetting one stream while the connection and its other streams live on).
pub struct H2Connection {
    sender: hyper::client::conn::http2::SendRequest<ReqBody>,
    authority: String,
}

impl H2Connection {
    pub fn open(addr: SocketAddr) -> Self {
        crate::block_on(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let _ = tcp.set_nodelay(true);
            let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("h2 handshake");
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Self { sender, authority: "meshwasm.test".into() }
        })
    }

    fn hyper_request(&self, req: &Request) -> hyper::Request<ReqBody> {
        let mut r = req.clone().h2();
        r.authority.clone_from(&self.authority);
        r.to_hyper()
    }

    /// Sends `req` on a new stream of this connection and waits for the whole response.
    pub fn send(&mut self, req: &Request) -> Response {
        let hreq = self.hyper_request(req);
        let timeout = req.timeout;
        let mut sender = self.sender.clone();
        crate::block_on(async move {
            let start = Instant::now();
            let fut = async {
                let rsp = sender.send_request(hreq).await.map_err(|e| format!("h2 request: {e}"))?;
                let (parts, body) = rsp.into_parts();
                let collected = body.collect().await.map_err(|e| format!("response body: {e}"))?;
                let trailers = collected.trailers().cloned();
                Ok::<_, String>(Response {
                    status: parts.status.as_u16(),
                    headers: parts.headers,
                    body: collected.to_bytes(),
                    trailers,
                    elapsed: start.elapsed(),
                })
            };
            match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r.unwrap_or_else(|e| panic!("{e}")),
                Err(_) => panic!("h2 request timed out after {timeout:?}"),
            }
        })
    }

    /// Sends `req` on a new stream and resets that stream (RST_STREAM CANCEL) after `hold`
    /// unless the response headers came first; returns whether they did.
    pub fn send_and_reset(&mut self, req: &Request, hold: Duration) -> bool {
        let hreq = self.hyper_request(req);
        let mut sender = self.sender.clone();
        crate::block_on(async move { tokio::time::timeout(hold, sender.send_request(hreq)).await.is_ok() })
    }
}

/// Opens an HTTP/1.1 connection, sends `req` (headers and body), waits `hold`, then
/// closes the connection without reading the response: a client that gives up
/// mid-flight (for example during an injected delay). Returns whatever response bytes
/// had arrived before the close (normally none).
pub fn send_and_disconnect(addr: SocketAddr, req: &Request, hold: Duration) -> Vec<u8> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    let mut head = format!("{} {} HTTP/1.1\r\nhost: {}\r\n", req.method, req.path, req.authority);
    for (k, v) in &req.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("content-length: {}\r\n\r\n", req.body.len()));
    s.write_all(head.as_bytes()).expect("write request");
    s.write_all(&req.body).expect("write body");
    s.flush().ok();
    std::thread::sleep(hold);
    s.set_nonblocking(true).ok();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
    got
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("fault%20filter%20abort"), "fault filter abort");
        assert_eq!(percent_decode("plain"), "plain");
        assert_eq!(percent_decode("50%"), "50%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
