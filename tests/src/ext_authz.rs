//! Real external authorizers, as Envoy's `envoy.filters.http.ext_authz` talks to them:
//!
//! - [`ExtAuthzGrpc`]: `envoy.service.auth.v3.Authorization/Check` over h2c, served by tonic
//!   with envoy-types' generated `AuthorizationServer` (a raw HTTP/2 path beside it answers
//!   [`Behaviour::Garbage`]).
//! - [`ExtAuthzHttp`]: an HTTP/1.1 server (hyper) as Envoy's HTTP ext_authz service: it
//!   receives the check request (the original method, `path_prefix` + the original path, the
//!   forwarded headers, optionally the body); 200 allows, any other status denies.
//!
//! Both decide with a [`Policy`], by default the one of Istio's sample ext-authz server:
//! request header `x-ext-authz: allow` allows, anything else denies with 403, body
//! [`DEFAULT_DENY_BODY`] and header `x-ext-authz-check-result: denied`; an allowed request
//! gets `x-ext-authz-check-result: allowed` towards the upstream.
//!
//! ```no_run
//! use meshwasm_tests::ext_authz::{Behaviour, ExtAuthzHttp, Policy};
//! let authz = ExtAuthzHttp::start(Policy::default());
//! // cluster "ext_authz_http" → authz.addr(); after some traffic:
//! assert_eq!(authz.calls(), 1);
//! let seen = authz.last_request().unwrap();
//! assert_eq!(seen.header("x-ext-authz"), Some("allow"));
//! authz.set_behaviour(Behaviour::Down); // port refused ...
//! authz.set_behaviour(Behaviour::Normal); // ... and serving again on the same port
//! ```
//!
//! # What each answers
//! | behaviour | gRPC | HTTP |
//! |---|---|---|
//! | `Normal` | `CheckResponse`: allow = status OK + `ok_response` (headers set / appended / removed towards the upstream, `response_headers_to_add`); deny = status PERMISSION_DENIED + `denied_response` (HTTP status, body, headers) | allow = 200 with the upstream, append and downstream headers (Envoy picks them per `allowed_upstream_headers`, `allowed_upstream_headers_to_append`, `allowed_client_headers_on_success`; removals in `x-envoy-auth-headers-to-remove`); deny = the policy's status, body and headers |
//! | `Slow(d)` | the normal answer after `d` | the same |
//! | `Down` | nothing listens on the port (connections refused); any other behaviour restarts it on the same port | the same |
//! | `Garbage` | 200 `application/grpc` with a frame that is not a `CheckResponse`, `grpc-status: 0` | `garbage, not HTTP` instead of a status line, then close |
//! | `Error` | gRPC status UNAVAILABLE | 500 |
//! | `GrpcError(code)` | that gRPC status | 500 |
//! | `HugeBody(n)` | the normal decision; a deny's body is `n` bytes, an allow carries `n` bytes of `dynamic_metadata` | the normal decision with an `n`-byte body |
//!
//! Every check is recorded before the behaviour applies (a malformed gRPC request is counted
//! but not recorded): [`ExtAuthzGrpc::requests`] gives the `CheckRequest`s as envoy-types
//! structs, [`ExtAuthzHttp::requests`] the [`HttpCheck`]s (method, path, headers, body).
//!
//! The HTTP server closes each connection after its answer (`connection: close`), so a
//! behaviour switch applies to the very next check even though Envoy pools connections.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction,
    HeaderValue, HeaderValueOption, HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind as ValueKind, BoolValue, Struct, Value};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderMap, HeaderName};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::codegen::Service as _;

use crate::server::{accept_loop, ServerThread};

/// The gRPC method path of `Check`.
pub const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// The deny body of the default [`Policy`].
pub const DEFAULT_DENY_BODY: &str = "denied by ext_authz for not found header x-ext-authz: allow in the request";

/// The header carrying the decision in both directions by default.
pub const RESULT_HEADER: &str = "x-ext-authz-check-result";

/// Largest request body (or gRPC message) accepted and recorded.
const MAX_REQUEST: usize = 16 << 20;

/// How the servers decide. [`Policy::default`] is Istio's sample ext-authz server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The request header that allows when it has this value (`x-ext-authz`, `allow`).
    pub allow_header: (String, String),
    /// Allow: headers set on the upstream request (gRPC `ok_response.headers` with
    /// OVERWRITE_IF_EXISTS_OR_ADD; HTTP: headers of the 200). Default
    /// `x-ext-authz-check-result: allowed`.
    pub upstream_headers: Vec<(String, String)>,
    /// Allow: headers appended to the upstream request (gRPC APPEND_IF_EXISTS_OR_ADD; HTTP:
    /// headers of the 200, for `allowed_upstream_headers_to_append`). Default none.
    pub append_headers: Vec<(String, String)>,
    /// Allow: headers removed from the upstream request (gRPC `headers_to_remove`; HTTP:
    /// `x-envoy-auth-headers-to-remove`). Default none.
    pub remove_headers: Vec<String>,
    /// Allow: headers added to the client's response (gRPC `response_headers_to_add`; HTTP:
    /// headers of the 200, for `allowed_client_headers_on_success`). Default none.
    pub downstream_headers: Vec<(String, String)>,
    /// Deny: the HTTP status (403).
    pub deny_status: u16,
    /// Deny: the body ([`DEFAULT_DENY_BODY`]).
    pub deny_body: String,
    /// Deny: headers for the client (`x-ext-authz-check-result: denied`).
    pub deny_headers: Vec<(String, String)>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            allow_header: ("x-ext-authz".into(), "allow".into()),
            upstream_headers: vec![(RESULT_HEADER.into(), "allowed".into())],
            append_headers: Vec::new(),
            remove_headers: Vec::new(),
            downstream_headers: Vec::new(),
            deny_status: 403,
            deny_body: DEFAULT_DENY_BODY.into(),
            deny_headers: vec![(RESULT_HEADER.into(), "denied".into())],
        }
    }
}

impl Policy {
    /// Allows when request header `name` has `value`.
    #[must_use]
    pub fn allow_when(mut self, name: &str, value: &str) -> Self {
        self.allow_header = (name.to_ascii_lowercase(), value.into());
        self
    }

    #[must_use]
    pub fn upstream_header(mut self, name: &str, value: &str) -> Self {
        self.upstream_headers.push((name.into(), value.into()));
        self
    }

    #[must_use]
    pub fn append_header(mut self, name: &str, value: &str) -> Self {
        self.append_headers.push((name.into(), value.into()));
        self
    }

    #[must_use]
    pub fn remove_header(mut self, name: &str) -> Self {
        self.remove_headers.push(name.into());
        self
    }

    #[must_use]
    pub fn downstream_header(mut self, name: &str, value: &str) -> Self {
        self.downstream_headers.push((name.into(), value.into()));
        self
    }

    #[must_use]
    pub fn deny(mut self, status: u16, body: &str) -> Self {
        self.deny_status = status;
        self.deny_body = body.into();
        self
    }

    #[must_use]
    pub fn deny_header(mut self, name: &str, value: &str) -> Self {
        self.deny_headers.push((name.into(), value.into()));
        self
    }

    /// True when the check request's headers allow (`get` looks a header up by lower-case name).
    fn allows(&self, get: impl Fn(&str) -> Option<String>) -> bool {
        get(&self.allow_header.0).is_some_and(|v| v == self.allow_header.1)
    }
}

/// What the servers do with the next checks; switch with `set_behaviour`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Behaviour {
    #[default]
    Normal,
    /// Answer normally after this delay.
    Slow(Duration),
    /// Stop listening (the port refuses); switching to anything else listens again on the same port.
    Down,
    /// gRPC: a 200 `application/grpc` answer whose message is not a `CheckResponse`;
    /// HTTP: a response that is not HTTP.
    Garbage,
    /// gRPC: status UNAVAILABLE; HTTP: 500.
    Error,
    /// gRPC: this status; HTTP: 500.
    GrpcError(tonic::Code),
    /// The normal decision with an answer padded to at least this many bytes.
    HugeBody(usize),
}

/// One check request the HTTP authorizer received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCheck {
    pub method: String,
    /// Path and query as received (`path_prefix` + the original path).
    pub path: String,
    /// Every header as received: names lower case, grouped by name in the order each name
    /// first arrived, repeated headers as separate entries in their order.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
}

impl HttpCheck {
    /// The first value of header `name` (UTF-8).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// Every value of header `name`, in order.
    pub fn header_values(&self, name: &str) -> Vec<String> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().filter(|(k, _)| *k == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned()).collect()
    }
}

/// Accessors on an envoy-types `CheckRequest` for assertions.
pub trait CheckRequestExt {
    /// `attributes.request.http`'s header `name` (from `headers`, else `header_map`).
    fn header(&self, name: &str) -> Option<String>;
    /// `attributes.request.http.path`.
    fn path(&self) -> String;
    /// `attributes.request.http.method`.
    fn method(&self) -> String;
    /// `attributes.source.principal` (the peer certificate's URI SAN, else its subject).
    fn source_principal(&self) -> String;
}

impl CheckRequestExt for CheckRequest {
    fn header(&self, name: &str) -> Option<String> {
        let http = self.attributes.as_ref()?.request.as_ref()?.http.as_ref()?;
        let name = name.to_ascii_lowercase();
        if let Some(v) = http.headers.get(&name) {
            return Some(v.clone());
        }
        http.header_map.as_ref()?.headers.iter().find(|h| h.key == name).map(|h| {
            if h.raw_value.is_empty() {
                h.value.clone()
            } else {
                String::from_utf8_lossy(&h.raw_value).into_owned()
            }
        })
    }

    fn path(&self) -> String {
        http_attr(self, |h| h.path.clone())
    }

    fn method(&self) -> String {
        http_attr(self, |h| h.method.clone())
    }

    fn source_principal(&self) -> String {
        self.attributes.as_ref().and_then(|a| a.source.as_ref()).map(|s| s.principal.clone()).unwrap_or_default()
    }
}

fn http_attr(
    req: &CheckRequest,
    f: impl Fn(&envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest) -> String,
) -> String {
    req.attributes.as_ref().and_then(|a| a.request.as_ref()).and_then(|r| r.http.as_ref()).map(f).unwrap_or_default()
}

// === shared state and the restartable server ===

#[derive(Debug, Default)]
struct State {
    policy: Mutex<Policy>,
    behaviour: Mutex<Behaviour>,
    calls: AtomicU64,
    grpc: Mutex<Vec<CheckRequest>>,
    http: Mutex<Vec<HttpCheck>>,
}

impl State {
    fn policy(&self) -> Policy {
        self.policy.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn behaviour(&self) -> Behaviour {
        *self.behaviour.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Grpc,
    Http,
}

struct Server {
    kind: Kind,
    addr: SocketAddr,
    state: Arc<State>,
    thread: Mutex<Option<ServerThread>>,
}

impl Server {
    fn start(kind: Kind, addr: SocketAddr, policy: Policy) -> Self {
        let state = Arc::new(State { policy: Mutex::new(policy), ..State::default() });
        let thread = spawn(kind, addr, state.clone());
        Self { kind, addr: thread.addr(), state, thread: Mutex::new(Some(thread)) }
    }

    fn set_behaviour(&self, b: Behaviour) {
        *self.state.behaviour.lock().unwrap_or_else(PoisonError::into_inner) = b;
        if b == Behaviour::Down {
            self.stop();
        } else {
            self.restart();
        }
    }

    fn stop(&self) {
        let t = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take();
        drop(t);
    }

    fn restart(&self) {
        let mut t = self.thread.lock().unwrap_or_else(PoisonError::into_inner);
        if t.is_none() {
            *t = Some(spawn(self.kind, self.addr, self.state.clone()));
        }
    }
}

fn spawn(kind: Kind, addr: SocketAddr, state: Arc<State>) -> ServerThread {
    match kind {
        Kind::Grpc => ServerThread::spawn("meshwasm-ext-authz-grpc", addr, move |l| serve_grpc(l, state)),
        Kind::Http => ServerThread::spawn("meshwasm-ext-authz-http", addr, move |l| serve_http(l, state)),
    }
}

macro_rules! common_api {
    () => {
        /// The address it listens on (kept across `Down` and restarts).
        pub fn addr(&self) -> SocketAddr {
            self.0.addr
        }

        pub fn port(&self) -> u16 {
            self.0.addr.port()
        }

        /// Check requests received so far (in every behaviour).
        pub fn calls(&self) -> u64 {
            self.0.state.calls.load(Ordering::SeqCst)
        }

        /// Switches the behaviour for the next checks ([`Behaviour::Down`] stops listening).
        pub fn set_behaviour(&self, b: Behaviour) {
            self.0.set_behaviour(b);
        }

        pub fn behaviour(&self) -> Behaviour {
            self.0.state.behaviour()
        }

        /// Replaces the policy for the next checks.
        pub fn set_policy(&self, p: Policy) {
            *self.0.state.policy.lock().unwrap_or_else(PoisonError::into_inner) = p;
        }

        /// Stops listening and closes every connection (like `set_behaviour(Down)` without
        /// changing the behaviour).
        pub fn stop(&self) {
            self.0.stop();
        }

        /// Listens again on the same port after [`Self::stop`]; no-op while running.
        pub fn restart(&self) {
            self.0.restart();
        }
    };
}

/// The gRPC authorizer (`envoy.service.auth.v3.Authorization`) on its own runtime thread;
/// stopped on drop.
pub struct ExtAuthzGrpc(Server);

impl ExtAuthzGrpc {
    /// Starts on `127.0.0.1:<free port>`.
    pub fn start(policy: Policy) -> Self {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), policy)
    }

    /// Starts on `addr` (port 0 picks a free port).
    pub fn start_on(addr: SocketAddr, policy: Policy) -> Self {
        Self(Server::start(Kind::Grpc, addr, policy))
    }

    common_api!();

    /// Every `CheckRequest` received, in order.
    pub fn requests(&self) -> Vec<CheckRequest> {
        self.0.state.grpc.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub fn last_request(&self) -> Option<CheckRequest> {
        self.0.state.grpc.lock().unwrap_or_else(PoisonError::into_inner).last().cloned()
    }

    /// A tonic client call to this server (for testing the server itself).
    pub fn call(&self, req: CheckRequest) -> Result<CheckResponse, tonic::Status> {
        let url = format!("http://{}", self.addr());
        crate::block_on(async move {
            use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
            let mut client =
                AuthorizationClient::connect(url).await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            client.check(req).await.map(tonic::Response::into_inner)
        })
    }
}

/// The HTTP authorizer on its own runtime thread; stopped on drop.
pub struct ExtAuthzHttp(Server);

impl ExtAuthzHttp {
    /// Starts on `127.0.0.1:<free port>`.
    pub fn start(policy: Policy) -> Self {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), policy)
    }

    /// Starts on `addr` (port 0 picks a free port).
    pub fn start_on(addr: SocketAddr, policy: Policy) -> Self {
        Self(Server::start(Kind::Http, addr, policy))
    }

    common_api!();

    /// Every check request received, in order.
    pub fn requests(&self) -> Vec<HttpCheck> {
        self.0.state.http.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub fn last_request(&self) -> Option<HttpCheck> {
        self.0.state.http.lock().unwrap_or_else(PoisonError::into_inner).last().cloned()
    }
}

// === gRPC ===

struct GrpcAuthz(Arc<State>);

#[tonic::async_trait]
impl Authorization for GrpcAuthz {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let req = request.into_inner();
        self.0.calls.fetch_add(1, Ordering::SeqCst);
        self.0.grpc.lock().unwrap_or_else(PoisonError::into_inner).push(req.clone());
        let behaviour = self.0.behaviour();
        let mut pad = 0;
        match behaviour {
            Behaviour::Slow(d) => tokio::time::sleep(d).await,
            Behaviour::Error => return Err(tonic::Status::unavailable("meshwasm ext_authz: Behaviour::Error")),
            Behaviour::GrpcError(code) => {
                return Err(tonic::Status::new(code, "meshwasm ext_authz: Behaviour::GrpcError"))
            }
            Behaviour::HugeBody(n) => pad = n,
            Behaviour::Normal | Behaviour::Down | Behaviour::Garbage => {}
        }
        let policy = self.0.policy();
        let allowed = policy.allows(|name| req.header(name));
        Ok(tonic::Response::new(grpc_response(&policy, allowed, pad)))
    }
}

/// A header mutation. Envoy 1.40's ext_authz reads the deprecated `append` first and
/// treats it unset as "set" whatever `append_action` says, so appending sets `append: true`
/// as well (measured through the native filter in tests/ext_authz_native.rs).
#[allow(deprecated)]
fn header_option(name: &str, value: &str, action: HeaderAppendAction) -> HeaderValueOption {
    let append = (action == HeaderAppendAction::AppendIfExistsOrAdd).then_some(BoolValue { value: true });
    HeaderValueOption {
        header: Some(HeaderValue { key: name.into(), value: value.into(), ..Default::default() }),
        append_action: action as i32,
        append,
        ..Default::default()
    }
}

/// The `CheckResponse` for a decision under `policy`, padded by `pad` bytes.
pub fn grpc_response(policy: &Policy, allowed: bool, pad: usize) -> CheckResponse {
    if allowed {
        let mut headers: Vec<HeaderValueOption> = policy
            .upstream_headers
            .iter()
            .map(|(k, v)| header_option(k, v, HeaderAppendAction::OverwriteIfExistsOrAdd))
            .collect();
        headers.extend(
            policy.append_headers.iter().map(|(k, v)| header_option(k, v, HeaderAppendAction::AppendIfExistsOrAdd)),
        );
        let ok = OkHttpResponse {
            headers,
            headers_to_remove: policy.remove_headers.clone(),
            response_headers_to_add: policy
                .downstream_headers
                .iter()
                .map(|(k, v)| header_option(k, v, HeaderAppendAction::OverwriteIfExistsOrAdd))
                .collect(),
            ..Default::default()
        };
        let dynamic_metadata = (pad > 0).then(|| Struct {
            fields: [("padding".to_string(), Value { kind: Some(ValueKind::StringValue("x".repeat(pad))) })].into(),
        });
        CheckResponse {
            status: Some(RpcStatus { code: tonic::Code::Ok as i32, ..Default::default() }),
            http_response: Some(HttpResponse::OkResponse(ok)),
            dynamic_metadata,
        }
    } else {
        let body = if pad > 0 { "x".repeat(pad) } else { policy.deny_body.clone() };
        let denied = DeniedHttpResponse {
            status: Some(HttpStatus { code: i32::from(policy.deny_status) }),
            headers: policy
                .deny_headers
                .iter()
                .map(|(k, v)| header_option(k, v, HeaderAppendAction::OverwriteIfExistsOrAdd))
                .collect(),
            body,
        };
        CheckResponse {
            status: Some(RpcStatus {
                code: tonic::Code::PermissionDenied as i32,
                message: "denied by meshwasm ext_authz".into(),
                ..Default::default()
            }),
            http_response: Some(HttpResponse::DeniedResponse(denied)),
            dynamic_metadata: None,
        }
    }
}

type GrpcBody = Either<tonic::body::Body, DataThenTrailers>;

async fn serve_grpc(listener: tokio::net::TcpListener, state: Arc<State>) {
    let svc = AuthorizationServer::new(GrpcAuthz(state.clone())).max_decoding_message_size(MAX_REQUEST);
    accept_loop(listener, move |stream| {
        let svc = svc.clone();
        let state = state.clone();
        async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let mut svc = svc.clone();
                let state = state.clone();
                async move {
                    if state.behaviour() == Behaviour::Garbage && req.uri().path() == CHECK_PATH {
                        return Ok::<_, Infallible>(grpc_garbage(req, &state).await);
                    }
                    let rsp = match svc.call(req).await {
                        Ok(r) => r,
                        Err(never) => match never {},
                    };
                    Ok(rsp.map(Either::Left))
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .http2_only()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    })
    .await;
}

/// Records the check (when it decodes), then answers a framed message that is not protobuf.
async fn grpc_garbage(req: hyper::Request<Incoming>, state: &State) -> hyper::Response<GrpcBody> {
    state.calls.fetch_add(1, Ordering::SeqCst);
    if let Ok(body) = Limited::new(req.into_body(), MAX_REQUEST).collect().await {
        let body = body.to_bytes();
        if let Some(msg) = body.get(5..) {
            if let Ok(check) = CheckRequest::decode(msg) {
                state.grpc.lock().unwrap_or_else(PoisonError::into_inner).push(check);
            }
        }
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
    let body = DataThenTrailers {
        data: Some(Bytes::from_static(&[0, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff])),
        trailers: Some(trailers),
    };
    let mut rsp = hyper::Response::new(Either::Right(body));
    rsp.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/grpc"));
    rsp
}

/// A body: one data frame, then trailers.
pub struct DataThenTrailers {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for DataThenTrailers {
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
}

// === HTTP ===

async fn serve_http(listener: tokio::net::TcpListener, state: Arc<State>) {
    accept_loop(listener, move |stream| {
        let state = state.clone();
        async move {
            if state.behaviour() == Behaviour::Garbage {
                http_garbage(stream, &state).await;
                return;
            }
            let service = hyper::service::service_fn(move |req| handle_http(req, state.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    })
    .await;
}

async fn handle_http(
    req: hyper::Request<Incoming>,
    state: Arc<State>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_REQUEST).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let check = HttpCheck {
        method: parts.method.to_string(),
        path: parts.uri.path_and_query().map_or_else(|| parts.uri.to_string(), ToString::to_string),
        headers: parts.headers.iter().map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec())).collect(),
        body,
    };
    state.calls.fetch_add(1, Ordering::SeqCst);
    state.http.lock().unwrap_or_else(PoisonError::into_inner).push(check);
    let mut pad = None;
    match state.behaviour() {
        Behaviour::Slow(d) => tokio::time::sleep(d).await,
        Behaviour::Error | Behaviour::GrpcError(_) => {
            return Ok(response(500, &[], Bytes::from_static(b"meshwasm ext_authz: Behaviour::Error")))
        }
        Behaviour::HugeBody(n) => pad = Some(Bytes::from(vec![b'x'; n])),
        Behaviour::Normal | Behaviour::Down | Behaviour::Garbage => {}
    }
    let policy = state.policy();
    let get = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    if policy.allows(get) {
        let mut headers: Vec<(String, String)> = policy.upstream_headers.clone();
        headers.extend(policy.append_headers.iter().cloned());
        headers.extend(policy.downstream_headers.iter().cloned());
        if !policy.remove_headers.is_empty() {
            headers.push(("x-envoy-auth-headers-to-remove".into(), policy.remove_headers.join(",")));
        }
        Ok(response(200, &headers, pad.unwrap_or_default()))
    } else {
        let body = pad.unwrap_or_else(|| Bytes::from(policy.deny_body.clone()));
        Ok(response(policy.deny_status, &policy.deny_headers, body))
    }
}

fn response(status: u16, headers: &[(String, String)], body: Bytes) -> hyper::Response<Full<Bytes>> {
    let mut rsp = hyper::Response::new(Full::new(body));
    *rsp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), hyper::header::HeaderValue::from_str(v)) {
            rsp.headers_mut().append(k, v);
        }
    }
    rsp
}

/// Reads the request head (and a `content-length` body), records it, answers bytes that
/// are not HTTP and closes.
async fn http_garbage(mut stream: tokio::net::TcpStream, state: &State) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
        }
        if buf.len() > MAX_REQUEST {
            return;
        }
    };
    let head = String::from_utf8_lossy(buf.get(..head_end).unwrap_or_default()).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let method = first.next().unwrap_or_default().to_string();
    let path = first.next().unwrap_or_default().to_string();
    let headers: Vec<(String, Vec<u8>)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().as_bytes().to_vec()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len.min(MAX_REQUEST) {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
        }
    }
    let body = Bytes::copy_from_slice(buf.get(head_end..).unwrap_or_default());
    state.calls.fetch_add(1, Ordering::SeqCst);
    state.http.lock().unwrap_or_else(PoisonError::into_inner).push(HttpCheck { method, path, headers, body });
    let _ = stream.write_all(b"garbage, not HTTP\r\n\r\n").await;
    let _ = stream.shutdown().await;
}
