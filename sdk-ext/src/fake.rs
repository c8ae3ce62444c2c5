//! An in-memory `Host` for tests: headers, properties, a settable clock, recorded local
//! replies and resumes, metrics and shared data with real CAS semantics.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::filter::{HttpReply, HttpResponse};
use crate::host::{GrpcCall, HeaderMap, Host, HostError, HttpCall, LocalReply, LogLevel, MetricKind};

/// A gRPC call the filter started, as recorded by the fake host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedGrpcCall {
    pub token: u32,
    pub cluster: String,
    pub service: String,
    pub method: String,
    pub message: Vec<u8>,
    pub timeout: Duration,
}

/// An HTTP call the filter started, as recorded by the fake host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedHttpCall {
    pub token: u32,
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout: Duration,
}

impl RecordedHttpCall {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A complete HTTP callout reply, as Envoy hands it to `on_http_reply`: `:status`, then
/// `headers`, and the whole body.
pub fn http_reply(status: &str, headers: &[(&str, &str)], body: impl AsRef<[u8]>) -> HttpReply {
    let mut hs = vec![(":status".to_string(), status.to_string())];
    hs.extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let body = body.as_ref().to_vec();
    HttpReply::Response(HttpResponse { headers: hs, body_size: body.len(), body, trailers: vec![] })
}

#[derive(Default)]
pub struct FakeHost {
    pub request_headers: RefCell<Vec<(String, String)>>,
    pub request_trailers: RefCell<Vec<(String, String)>>,
    pub response_headers: RefCell<Vec<(String, String)>>,
    pub response_trailers: RefCell<Vec<(String, String)>>,
    /// What `request_body` returns (the body Envoy buffered).
    pub request_body: RefCell<Vec<u8>>,
    pub properties: RefCell<HashMap<String, Vec<u8>>>,
    /// What `set_property` wrote, by path joined with `.` (the filter-state key after `wasm.`).
    pub written_properties: RefCell<HashMap<String, Vec<u8>>>,
    pub clock: Cell<Duration>,
    pub replies: RefCell<Vec<LocalReply>>,
    pub resumed_requests: Cell<u32>,
    pub resumed_responses: Cell<u32>,
    /// When set, resume/reply calls fail as they do for a stream that went away.
    pub stream_gone: Cell<bool>,
    pub metrics: RefCell<Vec<(MetricKind, String, i64)>>,
    pub shared: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    /// Make the next N `set_shared_data` calls with a CAS fail, as a concurrent writer would.
    pub cas_conflicts: Cell<u32>,
    pub logs: RefCell<Vec<(LogLevel, String)>>,
    pub grpc_calls: RefCell<Vec<RecordedGrpcCall>>,
    /// When set, `grpc_call` fails with this error (an unknown cluster, for example).
    pub grpc_call_error: Cell<Option<HostError>>,
    pub http_calls: RefCell<Vec<RecordedHttpCall>>,
    /// When set, `http_call` fails with this error.
    pub http_call_error: Cell<Option<HostError>>,
    /// The network data being delivered (`network_data`), from the downstream and upstream.
    pub downstream_data: RefCell<Vec<u8>>,
    pub upstream_data: RefCell<Vec<u8>>,
    /// Every hostcall made, in order, in `filters/floor`'s vocabulary (`headers`, `header
    /// NAME`, `set NAME VALUE`, `add NAME VALUE`, `remove NAME`, `property a.b`, `counter`,
    /// `histogram`, `time`, `clock`; others by their method's name): what a benchmark floor
    /// must repeat to cost what a filter's hostcalls cost.
    pub calls: RefCell<Vec<String>>,
}

impl FakeHost {
    fn note(&self, call: impl Into<String>) {
        self.calls.borrow_mut().push(call.into());
    }

    /// The hostcalls made since the last call (see `calls`), and forget them.
    pub fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut *self.calls.borrow_mut())
    }

    pub fn new() -> Self {
        let h = Self::default();
        h.clock.set(Duration::from_secs(1_700_000_000));
        h
    }

    pub fn with_request(headers: &[(&str, &str)]) -> Self {
        let h = Self::new();
        *h.request_headers.borrow_mut() = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        h
    }

    pub fn advance(&self, d: Duration) {
        self.clock.set(self.clock.get() + d);
    }

    pub fn set_property(&self, path: &[&str], value: &[u8]) {
        self.properties.borrow_mut().insert(path.join("."), value.to_vec());
    }

    /// The current value of a metric by name (counters and gauges).
    pub fn metric_value(&self, name: &str) -> i64 {
        self.metrics.borrow().iter().find(|(_, n, _)| n == name).map(|(_, _, v)| *v).unwrap_or(0)
    }

    pub fn shared_u64(&self, key: &str) -> Option<u64> {
        self.shared.borrow().get(key).and_then(|(v, _)| crate::shared::decode_u64(v))
    }

    fn map(&self, map: HeaderMap) -> &RefCell<Vec<(String, String)>> {
        match map {
            HeaderMap::RequestHeaders => &self.request_headers,
            HeaderMap::RequestTrailers => &self.request_trailers,
            HeaderMap::ResponseHeaders => &self.response_headers,
            HeaderMap::ResponseTrailers => &self.response_trailers,
        }
    }
}

impl Host for FakeHost {
    fn header(&self, map: HeaderMap, name: &str) -> Option<String> {
        self.note(format!("header {name}"));
        self.map(map).borrow().iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone())
    }
    fn headers(&self, map: HeaderMap) -> Vec<(String, String)> {
        self.note("headers");
        self.map(map).borrow().clone()
    }
    fn set_header(&self, map: HeaderMap, name: &str, value: Option<&str>) -> Result<(), HostError> {
        self.note(match value {
            Some(v) => format!("set {name} {v}"),
            None => format!("remove {name}"),
        });
        let mut m = self.map(map).borrow_mut();
        m.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        if let Some(v) = value {
            m.push((name.to_string(), v.to_string()));
        }
        Ok(())
    }
    fn add_header(&self, map: HeaderMap, name: &str, value: &str) -> Result<(), HostError> {
        self.note(format!("add {name} {value}"));
        self.map(map).borrow_mut().push((name.to_string(), value.to_string()));
        Ok(())
    }
    fn request_body(&self, max: usize) -> Vec<u8> {
        self.note("request_body");
        let b = self.request_body.borrow();
        b.get(..max.min(b.len())).unwrap_or_default().to_vec()
    }
    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.note(format!("property {}", path.join(".")));
        self.properties.borrow().get(&path.join(".")).cloned()
    }
    fn set_property(&self, path: &[&str], value: &[u8]) -> Result<(), HostError> {
        self.written_properties.borrow_mut().insert(path.join("."), value.to_vec());
        Ok(())
    }
    fn now(&self) -> SystemTime {
        self.note("time");
        UNIX_EPOCH + self.clock.get()
    }
    fn monotonic_ns(&self) -> u64 {
        self.note("clock");
        u64::try_from(self.clock.get().as_nanos()).unwrap_or(u64::MAX)
    }
    fn send_local_reply(&self, reply: &LocalReply) -> Result<(), HostError> {
        self.note("send_local_reply");
        if self.stream_gone.get() {
            return Err(HostError::NotFound);
        }
        self.replies.borrow_mut().push(reply.clone());
        Ok(())
    }
    fn resume_request(&self) -> Result<(), HostError> {
        if self.stream_gone.get() {
            return Err(HostError::NotFound);
        }
        self.resumed_requests.set(self.resumed_requests.get() + 1);
        Ok(())
    }
    fn resume_response(&self) -> Result<(), HostError> {
        if self.stream_gone.get() {
            return Err(HostError::NotFound);
        }
        self.resumed_responses.set(self.resumed_responses.get() + 1);
        Ok(())
    }
    fn define_metric(&self, kind: MetricKind, name: &str) -> Result<u32, HostError> {
        self.note("define_metric");
        let mut m = self.metrics.borrow_mut();
        if let Some(i) = m.iter().position(|(k, n, _)| *k == kind && n == name) {
            return u32::try_from(i).map_err(|_| HostError::BadArgument);
        }
        m.push((kind, name.to_string(), 0));
        u32::try_from(m.len() - 1).map_err(|_| HostError::BadArgument)
    }
    fn increment_metric(&self, id: u32, delta: i64) -> Result<(), HostError> {
        self.note("counter");
        let mut m = self.metrics.borrow_mut();
        let e = m.get_mut(id as usize).ok_or(HostError::NotFound)?;
        e.2 += delta;
        Ok(())
    }
    fn record_metric(&self, id: u32, value: u64) -> Result<(), HostError> {
        self.note("histogram");
        let mut m = self.metrics.borrow_mut();
        let e = m.get_mut(id as usize).ok_or(HostError::NotFound)?;
        e.2 = i64::try_from(value).unwrap_or(i64::MAX);
        Ok(())
    }
    fn metric(&self, id: u32) -> Result<u64, HostError> {
        let m = self.metrics.borrow();
        let e = m.get(id as usize).ok_or(HostError::NotFound)?;
        Ok(u64::try_from(e.2).unwrap_or(0))
    }
    fn shared_data(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        self.note("shared_data");
        match self.shared.borrow().get(key) {
            Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            None => (None, None),
        }
    }
    fn set_shared_data(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError> {
        self.note("set_shared_data");
        let mut s = self.shared.borrow_mut();
        if cas.is_some() && self.cas_conflicts.get() > 0 {
            self.cas_conflicts.set(self.cas_conflicts.get() - 1);
            // Someone else wrote in between: bump the version without changing the value.
            if let Some(e) = s.get_mut(key) {
                e.1 += 1;
            }
            return Err(HostError::CasMismatch);
        }
        let current = s.get(key).map(|(_, c)| *c);
        if let (Some(want), Some(have)) = (cas, current) {
            if want != have {
                return Err(HostError::CasMismatch);
            }
        }
        let next = current.unwrap_or(0) + 1;
        s.insert(key.to_string(), (value.to_vec(), next));
        Ok(())
    }
    fn grpc_call(&self, call: &GrpcCall<'_>) -> Result<u32, HostError> {
        self.note("grpc_call");
        if let Some(e) = self.grpc_call_error.get() {
            return Err(e);
        }
        let mut calls = self.grpc_calls.borrow_mut();
        let token = u32::try_from(calls.len() + 1).map_err(|_| HostError::BadArgument)?;
        calls.push(RecordedGrpcCall {
            token,
            cluster: call.cluster.to_string(),
            service: call.service.to_string(),
            method: call.method.to_string(),
            message: call.message.to_vec(),
            timeout: call.timeout,
        });
        Ok(token)
    }
    fn http_call(&self, call: &HttpCall<'_>) -> Result<u32, HostError> {
        self.note("http_call");
        if let Some(e) = self.http_call_error.get() {
            return Err(e);
        }
        let mut calls = self.http_calls.borrow_mut();
        // Odd tokens, so they never equal a recorded gRPC call's token in tests.
        let token = u32::try_from(2 * calls.len() + 1).map_err(|_| HostError::BadArgument)?;
        calls.push(RecordedHttpCall {
            token,
            cluster: call.cluster.to_string(),
            headers: call.headers.to_vec(),
            body: call.body.to_vec(),
            timeout: call.timeout,
        });
        Ok(token)
    }
    fn log(&self, level: LogLevel, message: &str) {
        self.note("log");
        self.logs.borrow_mut().push((level, message.to_string()));
    }
    fn network_data(&self, upstream: bool, max: usize) -> Vec<u8> {
        let b = if upstream { &self.upstream_data } else { &self.downstream_data }.borrow();
        b.get(..max.min(b.len())).unwrap_or_default().to_vec()
    }
    fn set_network_data(&self, upstream: bool, prepend: bool, data: &[u8]) -> Result<(), HostError> {
        let mut b = if upstream { &self.upstream_data } else { &self.downstream_data }.borrow_mut();
        if prepend {
            b.splice(0..0, data.iter().copied());
        } else {
            *b = data.to_vec();
        }
        Ok(())
    }
}
