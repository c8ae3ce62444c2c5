//! The Proxy-Wasm side: the only place hostcalls are made, and the dispatcher that turns the
//! ABI's callbacks into `Plugin` / `HttpFilter` calls.
//!
//! We bind the ABI (v0.2.1) directly instead of using the `proxy-wasm` crate's dispatcher:
//! - its hostcall wrappers and dispatcher panic on statuses and ids they do not expect (a
//!   resumed stream that went away, an unknown context), and a panic traps the VM and fails
//!   every request on the worker; here every status is a `Result` and every id is checked;
//! - a module built with it exports every callback, so Envoy crosses into the VM for response
//!   headers, bodies and trailers even when the filter has nothing to do there. Each crossing
//!   costs about as much as the work of a simple filter; `export_http_filter!` exports only
//!   the phases a filter uses.

#![allow(unsafe_code)]

use std::alloc::Layout;
use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::ptr::{null, null_mut, NonNull};
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::filter::{
    Flow, GrpcReply, HttpFilter, HttpReply, HttpResponse, NetworkFilter, NetworkPlugin, Plugin, MAX_CALLOUT_BODY,
};
use crate::host::{GrpcCall, HeaderMap, Host, HostError, HttpCall, LocalReply, LogLevel, MetricKind};
use crate::rng::{Rng, WyRand};
use crate::scheduler::Scheduler;

// === raw hostcalls (ABI v0.2.1) ===

mod raw {
    #[link(wasm_import_module = "wasi_snapshot_preview1")]
    extern "C" {
        /// WASI `clock_time_get`; Envoy serves clock 1 (monotonic) from its monotonic clock.
        pub fn clock_time_get(clock_id: u32, precision: u64, time: *mut u64) -> u32;
    }

    #[link(wasm_import_module = "env")]
    extern "C" {
        pub fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
        pub fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
        pub fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
        pub fn proxy_get_buffer_bytes(
            buffer_type: u32,
            start: usize,
            max_size: usize,
            return_buffer_data: *mut *mut u8,
            return_buffer_size: *mut usize,
        ) -> u32;
        pub fn proxy_set_buffer_bytes(
            buffer_type: u32,
            start: usize,
            size: usize,
            buffer_data: *const u8,
            buffer_size: usize,
        ) -> u32;
        pub fn proxy_get_header_map_pairs(
            map_type: u32,
            return_map_data: *mut *mut u8,
            return_map_size: *mut usize,
        ) -> u32;
        pub fn proxy_get_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
            return_value_data: *mut *mut u8,
            return_value_size: *mut usize,
        ) -> u32;
        pub fn proxy_replace_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
        ) -> u32;
        pub fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
        pub fn proxy_add_header_map_value(
            map_type: u32,
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
        ) -> u32;
        pub fn proxy_get_property(
            path_data: *const u8,
            path_size: usize,
            return_value_data: *mut *mut u8,
            return_value_size: *mut usize,
        ) -> u32;
        pub fn proxy_set_property(
            path_data: *const u8,
            path_size: usize,
            value_data: *const u8,
            value_size: usize,
        ) -> u32;
        pub fn proxy_get_shared_data(
            key_data: *const u8,
            key_size: usize,
            return_value_data: *mut *mut u8,
            return_value_size: *mut usize,
            return_cas: *mut u32,
        ) -> u32;
        pub fn proxy_set_shared_data(
            key_data: *const u8,
            key_size: usize,
            value_data: *const u8,
            value_size: usize,
            cas: u32,
        ) -> u32;
        pub fn proxy_continue_stream(stream_type: u32) -> u32;
        pub fn proxy_send_local_response(
            status_code: u32,
            status_code_details_data: *const u8,
            status_code_details_size: usize,
            body_data: *const u8,
            body_size: usize,
            headers_data: *const u8,
            headers_size: usize,
            grpc_status: i32,
        ) -> u32;
        pub fn proxy_set_effective_context(context_id: u32) -> u32;
        pub fn proxy_define_metric(
            metric_type: u32,
            name_data: *const u8,
            name_size: usize,
            return_id: *mut u32,
        ) -> u32;
        pub fn proxy_get_metric(metric_id: u32, return_value: *mut u64) -> u32;
        pub fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
        pub fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
        pub fn proxy_grpc_call(
            service_data: *const u8,
            service_size: usize,
            service_name_data: *const u8,
            service_name_size: usize,
            method_name_data: *const u8,
            method_name_size: usize,
            initial_metadata_data: *const u8,
            initial_metadata_size: usize,
            request_data: *const u8,
            request_size: usize,
            timeout_milliseconds: u32,
            return_callout_id: *mut u32,
        ) -> u32;
        pub fn proxy_grpc_cancel(callout_id: u32) -> u32;
        pub fn proxy_http_call(
            upstream_data: *const u8,
            upstream_size: usize,
            headers_data: *const u8,
            headers_size: usize,
            body_data: *const u8,
            body_size: usize,
            trailers_data: *const u8,
            trailers_size: usize,
            timeout_milliseconds: u32,
            return_callout_id: *mut u32,
        ) -> u32;
    }
}

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;
const BAD_ARGUMENT: u32 = 2;
const CAS_MISMATCH: u32 = 8;

fn status(s: u32) -> Result<(), HostError> {
    match s {
        OK => Ok(()),
        NOT_FOUND => Err(HostError::NotFound),
        BAD_ARGUMENT => Err(HostError::BadArgument),
        CAS_MISMATCH => Err(HostError::CasMismatch),
        other => Err(HostError::Other(other)),
    }
}

/// `proxy_on_memory_allocate`: the host asks for `size` bytes to copy a value into; the
/// hostcall that triggered it hands the buffer to us and `owned` takes it back.
pub fn allocate(size: usize) -> *mut u8 {
    let Ok(layout) = Layout::array::<u8>(size) else { return null_mut() };
    if layout.size() == 0 {
        return NonNull::<u8>::dangling().as_ptr();
    }
    // SAFETY: non-zero size layout.
    unsafe { std::alloc::alloc(layout) }
}

/// Take ownership of a buffer the host filled after `allocate(size)`.
fn owned(ptr: *mut u8, size: usize) -> Vec<u8> {
    if ptr.is_null() || size == 0 {
        return Vec::new();
    }
    // SAFETY: `ptr` came from `allocate(size)` (Layout::array::<u8>(size)), the host wrote
    // `size` bytes into it, and nothing else owns it: a Vec with capacity `size` frees it
    // with the same layout.
    unsafe { Vec::from_raw_parts(ptr, size, size) }
}

fn header_map(m: HeaderMap) -> u32 {
    match m {
        HeaderMap::RequestHeaders => 0,
        HeaderMap::RequestTrailers => 1,
        HeaderMap::ResponseHeaders => 2,
        HeaderMap::ResponseTrailers => 3,
    }
}

fn serialize_pairs(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

fn deserialize_pairs(b: &[u8]) -> Vec<(String, String)> {
    crate::Headers::from_serialized(b).to_vec()
}

// === impl ProxyHost ===

/// A callout's kind: Envoy numbers gRPC and HTTP calls independently, so tokens are kept
/// per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CalloutKind {
    Grpc,
    Http,
}

thread_local! {
    /// Calls started during the current callback; the dispatcher maps them to the calling
    /// stream (or root) when the callback returns.
    static NEW_CALLOUTS: RefCell<Vec<(CalloutKind, u32)>> = const { RefCell::new(Vec::new()) };
}

fn take_new_callouts() -> Vec<(CalloutKind, u32)> {
    NEW_CALLOUTS.with(|c| std::mem::take(&mut *c.borrow_mut()))
}

/// The `Host` backed by the real proxy. Stateless: hostcalls act on the effective context.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProxyHost;

impl ProxyHost {
    pub fn set_tick_period_ms(&self, ms: u32) {
        // SAFETY: plain value arguments.
        let s = unsafe { raw::proxy_set_tick_period_milliseconds(ms) };
        if let Err(e) = status(s) {
            self.log(LogLevel::Warn, &format!("set_tick_period({ms}): {e}"));
        }
    }

    pub fn set_effective_context(&self, id: u32) -> Result<(), HostError> {
        // SAFETY: plain value arguments.
        status(unsafe { raw::proxy_set_effective_context(id) })
    }

    /// The first `size` bytes of a host buffer (empty if the host has none).
    fn buffer(&self, buffer_type: u32, size: usize) -> Vec<u8> {
        let mut ptr = null_mut();
        let mut len = 0;
        // SAFETY: out-pointers to locals.
        let s = unsafe { raw::proxy_get_buffer_bytes(buffer_type, 0, size, &mut ptr, &mut len) };
        match status(s) {
            Ok(()) => owned(ptr, len),
            Err(_) => Vec::new(),
        }
    }

    pub fn plugin_configuration(&self, size: usize) -> Vec<u8> {
        self.buffer(7, size) // PluginConfiguration
    }

    /// The message of the gRPC reply being delivered (`proxy_on_grpc_receive`).
    pub fn grpc_receive_buffer(&self, size: usize) -> Vec<u8> {
        self.buffer(5, size) // GrpcReceiveBuffer
    }

    /// The reply of the HTTP call being delivered (`proxy_on_http_call_response`). Envoy
    /// reports a failed call (timeout, reset, no connection) with no headers.
    pub fn http_call_response(&self, num_headers: usize, body_size: usize, num_trailers: usize) -> HttpReply {
        if num_headers == 0 {
            return HttpReply::Failed;
        }
        let headers = self.pairs(6); // HttpCallResponseHeaders
        if headers.is_empty() {
            return HttpReply::Failed;
        }
        let body = if body_size == 0 { Vec::new() } else { self.buffer(4, body_size.min(MAX_CALLOUT_BODY)) };
        let trailers = if num_trailers == 0 { Vec::new() } else { self.pairs(7) };
        HttpReply::Response(HttpResponse { headers, body, body_size, trailers })
    }

    fn pairs(&self, map_type: u32) -> Vec<(String, String)> {
        self.raw_pairs(map_type).map(|b| deserialize_pairs(&b)).unwrap_or_default()
    }

    /// `proxy_get_header_map_pairs`: the serialized map.
    fn raw_pairs(&self, map_type: u32) -> Option<Vec<u8>> {
        let mut ptr = null_mut();
        let mut len = 0;
        // SAFETY: out-pointers to locals.
        let s = unsafe { raw::proxy_get_header_map_pairs(map_type, &mut ptr, &mut len) };
        status(s).ok().map(|()| owned(ptr, len))
    }

    pub fn cancel_grpc_call(&self, token: u32) {
        // SAFETY: plain value argument. A call that already ended is not an error worth reporting.
        let _ = unsafe { raw::proxy_grpc_cancel(token) };
    }

    fn continue_stream(&self, stream: u32) -> Result<(), HostError> {
        // SAFETY: plain value arguments.
        status(unsafe { raw::proxy_continue_stream(stream) })
    }
}

impl Host for ProxyHost {
    fn header(&self, map: HeaderMap, name: &str) -> Option<String> {
        let mut ptr = null_mut();
        let mut len = 0;
        // SAFETY: key slice is valid for the call; out-pointers to locals.
        let s =
            unsafe { raw::proxy_get_header_map_value(header_map(map), name.as_ptr(), name.len(), &mut ptr, &mut len) };
        match status(s) {
            Ok(()) if !ptr.is_null() => String::from_utf8(owned(ptr, len)).ok(),
            Ok(()) => Some(String::new()),
            Err(_) => None,
        }
    }

    fn headers(&self, map: HeaderMap) -> Vec<(String, String)> {
        self.pairs(header_map(map))
    }

    fn header_block(&self, map: HeaderMap) -> crate::Headers {
        self.raw_pairs(header_map(map)).map(|b| crate::Headers::from_serialized(&b)).unwrap_or_default()
    }

    fn set_header(&self, map: HeaderMap, name: &str, value: Option<&str>) -> Result<(), HostError> {
        // SAFETY: slices are valid for the call.
        status(unsafe {
            match value {
                Some(v) => {
                    raw::proxy_replace_header_map_value(header_map(map), name.as_ptr(), name.len(), v.as_ptr(), v.len())
                }
                None => raw::proxy_remove_header_map_value(header_map(map), name.as_ptr(), name.len()),
            }
        })
    }

    fn add_header(&self, map: HeaderMap, name: &str, value: &str) -> Result<(), HostError> {
        // SAFETY: slices are valid for the call.
        status(unsafe {
            raw::proxy_add_header_map_value(header_map(map), name.as_ptr(), name.len(), value.as_ptr(), value.len())
        })
    }

    fn request_body(&self, max: usize) -> Vec<u8> {
        self.buffer(0, max) // HttpRequestBody
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        let joined = path.join("\0");
        let mut ptr = null_mut();
        let mut len = 0;
        // SAFETY: path slice valid for the call; out-pointers to locals.
        let s = unsafe { raw::proxy_get_property(joined.as_ptr(), joined.len(), &mut ptr, &mut len) };
        match status(s) {
            Ok(()) => Some(owned(ptr, len)),
            Err(_) => None,
        }
    }

    fn set_property(&self, path: &[&str], value: &[u8]) -> Result<(), HostError> {
        let joined = path.join(".");
        // SAFETY: both slices are valid for the call.
        status(unsafe { raw::proxy_set_property(joined.as_ptr(), joined.len(), value.as_ptr(), value.len()) })
    }

    fn now(&self) -> SystemTime {
        let mut t = 0u64;
        // SAFETY: out-pointer to a local.
        let s = unsafe { raw::proxy_get_current_time_nanoseconds(&mut t) };
        match status(s) {
            Ok(()) => UNIX_EPOCH + Duration::from_nanos(t),
            Err(_) => SystemTime::now(),
        }
    }

    fn monotonic_ns(&self) -> u64 {
        let mut t = 0u64;
        // SAFETY: out-pointer to a local. Clock 1 is CLOCK_MONOTONIC.
        match unsafe { raw::clock_time_get(1, 1, &mut t) } {
            0 => t,
            _ => u64::try_from(since_epoch(self.now()).as_nanos()).unwrap_or(u64::MAX),
        }
    }

    fn send_local_reply(&self, reply: &LocalReply) -> Result<(), HostError> {
        let headers = serialize_pairs(&reply.headers);
        // SAFETY: all slices are valid for the call.
        status(unsafe {
            raw::proxy_send_local_response(
                reply.status,
                reply.details.as_ptr(),
                reply.details.len(),
                if reply.body.is_empty() { null() } else { reply.body.as_ptr() },
                reply.body.len(),
                headers.as_ptr(),
                headers.len(),
                reply.grpc_status.and_then(|g| i32::try_from(g).ok()).unwrap_or(-1),
            )
        })
    }

    fn resume_request(&self) -> Result<(), HostError> {
        self.continue_stream(0)
    }

    fn resume_response(&self) -> Result<(), HostError> {
        self.continue_stream(1)
    }

    fn define_metric(&self, kind: MetricKind, name: &str) -> Result<u32, HostError> {
        let t = match kind {
            MetricKind::Counter => 0,
            MetricKind::Gauge => 1,
            MetricKind::Histogram => 2,
        };
        let mut id = 0;
        // SAFETY: name slice valid for the call; out-pointer to a local.
        status(unsafe { raw::proxy_define_metric(t, name.as_ptr(), name.len(), &mut id) })?;
        Ok(id)
    }

    fn increment_metric(&self, id: u32, delta: i64) -> Result<(), HostError> {
        // SAFETY: plain value arguments.
        status(unsafe { raw::proxy_increment_metric(id, delta) })
    }

    fn record_metric(&self, id: u32, value: u64) -> Result<(), HostError> {
        // SAFETY: plain value arguments.
        status(unsafe { raw::proxy_record_metric(id, value) })
    }

    fn metric(&self, id: u32) -> Result<u64, HostError> {
        let mut v = 0;
        // SAFETY: out-pointer to a local.
        status(unsafe { raw::proxy_get_metric(id, &mut v) })?;
        Ok(v)
    }

    fn shared_data(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        let mut ptr = null_mut();
        let mut len = 0;
        let mut cas = 0;
        // SAFETY: key slice valid; out-pointers to locals.
        let s = unsafe { raw::proxy_get_shared_data(key.as_ptr(), key.len(), &mut ptr, &mut len, &mut cas) };
        match status(s) {
            Ok(()) => (Some(owned(ptr, len)), if cas == 0 { None } else { Some(cas) }),
            Err(_) => (None, None),
        }
    }

    fn set_shared_data(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), HostError> {
        // SAFETY: slices valid for the call.
        status(unsafe {
            raw::proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas.unwrap_or(0))
        })
    }

    fn grpc_call(&self, call: &GrpcCall<'_>) -> Result<u32, HostError> {
        // Envoy parses the service argument as a serialized `envoy.config.core.v3.GrpcService`
        // (falling back to a bare cluster name); send the message so a cluster name can never
        // be misread as one: GrpcService { envoy_grpc = 1: EnvoyGrpc { cluster_name = 1 } }.
        let mut envoy_grpc = Vec::new();
        crate::proto::put_bytes(1, call.cluster.as_bytes(), &mut envoy_grpc);
        let mut service = Vec::new();
        crate::proto::put_bytes(1, &envoy_grpc, &mut service);
        let metadata = serialize_pairs(call.initial_metadata);
        let timeout = u32::try_from(call.timeout.as_millis()).unwrap_or(u32::MAX);
        let mut token = 0;
        // SAFETY: all slices are valid for the call; out-pointer to a local.
        status(unsafe {
            raw::proxy_grpc_call(
                service.as_ptr(),
                service.len(),
                call.service.as_ptr(),
                call.service.len(),
                call.method.as_ptr(),
                call.method.len(),
                metadata.as_ptr(),
                metadata.len(),
                call.message.as_ptr(),
                call.message.len(),
                timeout,
                &mut token,
            )
        })?;
        NEW_CALLOUTS.with(|c| c.borrow_mut().push((CalloutKind::Grpc, token)));
        Ok(token)
    }

    fn http_call(&self, call: &HttpCall<'_>) -> Result<u32, HostError> {
        let headers = serialize_pairs(call.headers);
        let trailers = serialize_pairs(&[]);
        let timeout = u32::try_from(call.timeout.as_millis()).unwrap_or(u32::MAX);
        let mut token = 0;
        // SAFETY: all slices are valid for the call; out-pointer to a local.
        status(unsafe {
            raw::proxy_http_call(
                call.cluster.as_ptr(),
                call.cluster.len(),
                headers.as_ptr(),
                headers.len(),
                if call.body.is_empty() { null() } else { call.body.as_ptr() },
                call.body.len(),
                trailers.as_ptr(),
                trailers.len(),
                timeout,
                &mut token,
            )
        })?;
        NEW_CALLOUTS.with(|c| c.borrow_mut().push((CalloutKind::Http, token)));
        Ok(token)
    }

    fn network_data(&self, upstream: bool, max: usize) -> Vec<u8> {
        self.buffer(if upstream { 3 } else { 2 }, max) // UpstreamData / DownstreamData
    }

    fn set_network_data(&self, upstream: bool, prepend: bool, data: &[u8]) -> Result<(), HostError> {
        // Envoy: start 0 and size 0 prepends; start 0 and a size at least the buffer's
        // replaces it all.
        let size = if prepend { 0 } else { usize::MAX >> 1 };
        // SAFETY: data slice valid for the call.
        status(unsafe { raw::proxy_set_buffer_bytes(if upstream { 3 } else { 2 }, 0, size, data.as_ptr(), data.len()) })
    }

    fn log(&self, level: LogLevel, message: &str) {
        let l = match level {
            LogLevel::Trace => 0,
            LogLevel::Debug => 1,
            LogLevel::Info => 2,
            LogLevel::Warn => 3,
            LogLevel::Error => 4,
            LogLevel::Critical => 5,
        };
        // SAFETY: message slice valid for the call. A failed log cannot be reported.
        let _ = unsafe { raw::proxy_log(l, message.as_ptr(), message.len()) };
    }
}

// === dispatcher: ABI callbacks → Plugin / HttpFilter ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Request,
    Response,
}

fn since_epoch(t: SystemTime) -> Duration {
    t.duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Context ids are small integers handed out by the host: hash them with one multiply
/// instead of SipHash (a lookup happens on every callback).
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.0 = u64::from(v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type IdMap<V> = HashMap<u32, V, BuildHasherDefault<IdHasher>>;

struct RootState<P: Plugin> {
    plugin: Option<Rc<P>>,
    /// Streams of this root paused for a delay, with the phase to resume.
    scheduler: Scheduler<Phase>,
    /// Streams and connections of this root due for `on_periodic` (not paused). The payload
    /// is unused: the same type as `scheduler` costs no more code.
    periodic: Scheduler<Phase>,
    /// When `Plugin::tick` is due next.
    plugin_wake: Option<Duration>,
    rng: WyRand,
}

impl<P: Plugin> RootState<P> {
    /// The earliest of the next stream deadline and the plugin's next tick.
    fn next_wake(&mut self) -> Option<Duration> {
        let min = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        min(min(self.scheduler.next_deadline(), self.periodic.next_deadline()), self.plugin_wake)
    }

    fn arm(&mut self, host: &ProxyHost) {
        let now = since_epoch(host.now());
        host.set_tick_period_ms(crate::scheduler::period_ms(self.next_wake(), now));
    }
}

struct StreamState<P: Plugin> {
    root: u32,
    /// `None` when the plugin had no valid configuration: the stream passes through.
    filter: Option<P::Filter>,
    /// A network filter's connection instead (`export_network_filter!`), from
    /// `proxy_on_new_connection` on (the context is created before Envoy says which it is).
    conn: Option<Box<dyn Connection>>,
    done: bool,
    logged: bool,
    /// `HttpFilter::periodic` was asked (once, after the first callback).
    periodic_asked: bool,
}

/// A connection's network filter behind calls that take no `&dyn Host` at the call site: the
/// host is bound where the connection is created (`on_new_connection`, compiled only into
/// modules that export network callbacks), so HTTP-only modules link none of it.
trait Connection {
    fn data(&mut self, upstream: bool, size: usize, end_of_stream: bool) -> Flow;
    fn periodic(&mut self) -> Option<Duration>;
    fn close(&mut self);
}

struct OnProxy(Box<dyn NetworkFilter>);

impl Connection for OnProxy {
    fn data(&mut self, upstream: bool, size: usize, end_of_stream: bool) -> Flow {
        if upstream {
            self.0.on_upstream_data(&ProxyHost, size, end_of_stream)
        } else {
            self.0.on_downstream_data(&ProxyHost, size, end_of_stream)
        }
    }
    fn periodic(&mut self) -> Option<Duration> {
        self.0.on_periodic(&ProxyHost)
    }
    fn close(&mut self) {
        self.0.on_close(&ProxyHost);
    }
}

/// Who gets a callout's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// A stream, resumed in this phase if its callback says so.
    Stream(u32, Phase),
    /// A root context's plugin.
    Root(u32),
}

/// Callouts in flight, per kind: token → owner.
#[derive(Default)]
struct Callouts {
    grpc: IdMap<Owner>,
    http: IdMap<Owner>,
}

impl Callouts {
    fn of(&mut self, kind: CalloutKind) -> &mut IdMap<Owner> {
        match kind {
            CalloutKind::Grpc => &mut self.grpc,
            CalloutKind::Http => &mut self.http,
        }
    }

    /// Forget (and cancel the gRPC calls of) every callout stream `id` started. Envoy has no
    /// cancel for HTTP calls in ABI 0.2.1: their replies arrive for a stream that is done and
    /// are dropped.
    fn drop_stream(&mut self, id: u32) {
        let mine = |o: &Owner| matches!(o, Owner::Stream(s, _) if *s == id);
        if !self.grpc.is_empty() {
            self.grpc.retain(|token, owner| {
                if mine(owner) {
                    ProxyHost.cancel_grpc_call(*token);
                }
                !mine(owner)
            });
        }
        if !self.http.is_empty() {
            self.http.retain(|_, owner| !mine(owner));
        }
    }
}

struct Contexts<P: Plugin> {
    roots: IdMap<RootState<P>>,
    streams: IdMap<StreamState<P>>,
    callouts: Callouts,
}

/// Resume a paused stream (it may have gone away: that is logged, not an error).
fn resume<P: Plugin>(host: &ProxyHost, id: u32, phase: Phase) {
    let resumed = match phase {
        Phase::Request => host.resume_request(),
        Phase::Response => host.resume_response(),
    };
    if let Err(e) = resumed {
        host.log(LogLevel::Debug, &format!("meshwasm.{}: resume stream {id}: {e}", P::NAME));
    }
}

impl<P: Plugin> Contexts<P> {
    /// Remember the calls started in the callback that just returned, for `owner`.
    fn adopt_callouts(&mut self, owner: Owner) {
        for (kind, token) in take_new_callouts() {
            self.callouts.of(kind).insert(token, owner);
        }
    }

    /// Turn a stream callback's `Flow` into the ABI's action (0 continue, 1 pause), arming
    /// the root tick for a delay.
    fn flow(&mut self, id: u32, phase: Phase, flow: Flow, host: &ProxyHost) -> u32 {
        match flow {
            Flow::Continue => 0,
            Flow::Pause => 1,
            Flow::Delay(d) => {
                let root_id = self.streams.get(&id).map(|s| s.root);
                if let Some(root) = root_id.and_then(|r| self.roots.get_mut(&r)) {
                    let now = since_epoch(host.now());
                    let earlier = root.next_wake().is_none_or(|n| now + d < n);
                    root.scheduler.schedule(id, now + d, phase);
                    if earlier {
                        root.arm(host);
                    }
                }
                1
            }
        }
    }

    /// Call `on_periodic` of stream `id` after `d`, arming the root tick if that is sooner.
    fn schedule_periodic(&mut self, root_id: u32, id: u32, d: Duration, host: &ProxyHost) {
        let Some(root) = self.roots.get_mut(&root_id) else { return };
        let now = since_epoch(host.now());
        let earlier = root.next_wake().is_none_or(|n| now + d < n);
        root.periodic.schedule(id, now + d, Phase::Request);
        if earlier {
            root.arm(host);
        }
    }

    /// Run the plugin's root work (`Plugin::tick`) and schedule its next call.
    fn plugin_tick(&mut self, root_id: u32, host: &ProxyHost) {
        let Some(plugin) = self.roots.get(&root_id).and_then(|r| r.plugin.clone()) else { return };
        let next = plugin.tick(host);
        self.adopt_callouts(Owner::Root(root_id));
        if let Some(root) = self.roots.get_mut(&root_id) {
            root.plugin_wake = next.map(|d| since_epoch(host.now()) + d);
        }
    }
}

/// All of one VM's contexts for plugin `P`. `export_http_filter!` keeps one in a thread-local
/// and forwards the ABI callbacks to it.
pub struct Vm<P: Plugin> {
    contexts: RefCell<Contexts<P>>,
}

impl<P: Plugin> Default for Vm<P> {
    fn default() -> Self {
        Self {
            contexts: RefCell::new(Contexts {
                roots: IdMap::default(),
                streams: IdMap::default(),
                callouts: Callouts::default(),
            }),
        }
    }
}

/// Log once per VM that the panic hook is in place; called from `_initialize`.
pub fn init() {
    std::panic::set_hook(Box::new(|info| {
        ProxyHost.log(LogLevel::Critical, &format!("meshwasm: panic (this is a bug; the VM will trap): {info}"));
    }));
}

impl<P: Plugin> Vm<P> {
    /// Run `f` with the contexts borrowed. A re-entrant callback (the host calling back into
    /// the VM from inside a hostcall, which Envoy does not do for the calls we make) is
    /// refused and logged rather than allowed to panic on the RefCell.
    fn with<R>(&self, default: R, f: impl FnOnce(&mut Contexts<P>) -> R) -> R {
        match self.contexts.try_borrow_mut() {
            Ok(mut c) => f(&mut c),
            Err(_) => {
                ProxyHost.log(LogLevel::Error, &format!("meshwasm.{}: re-entrant callback ignored", P::NAME));
                default
            }
        }
    }

    pub fn on_context_create(&self, id: u32, root_id: u32) {
        self.with((), |c| {
            if root_id == 0 {
                c.roots.insert(
                    id,
                    RootState {
                        plugin: None,
                        scheduler: Scheduler::default(),
                        periodic: Scheduler::default(),
                        plugin_wake: None,
                        rng: WyRand::from_entropy(),
                    },
                );
                return;
            }
            let filter = match c.roots.get_mut(&root_id) {
                Some(root) => {
                    let seed = root.rng.next_u64();
                    root.plugin.as_ref().map(|p| p.new_filter(id, seed))
                }
                None => None,
            };
            c.streams.insert(
                id,
                StreamState { root: root_id, filter, conn: None, done: false, logged: false, periodic_asked: false },
            );
        });
    }

    pub fn on_configure(&self, root_id: u32, size: usize) -> bool {
        self.with(false, |c| {
            let host = ProxyHost;
            let Some(root) = c.roots.get_mut(&root_id) else { return false };
            let bytes = host.plugin_configuration(size);
            match P::configure(&bytes, &host) {
                Ok(p) => {
                    root.plugin = Some(Rc::new(p));
                    host.log(LogLevel::Info, &format!("meshwasm.{}: configured", P::NAME));
                    c.plugin_tick(root_id, &host);
                    if let Some(root) = c.roots.get_mut(&root_id) {
                        root.arm(&host);
                    }
                    true
                }
                Err(e) => {
                    host.log(LogLevel::Error, &format!("meshwasm.{}: invalid configuration: {e}", P::NAME));
                    false
                }
            }
        })
    }

    pub fn on_tick(&self, root_id: u32) {
        self.with((), |c| {
            let host = ProxyHost;
            let now = since_epoch(host.now());
            let Some(root) = c.roots.get_mut(&root_id) else { return };
            let due = root.scheduler.pop_due(now);
            let periodic_due = root.periodic.pop_due(now);
            let plugin_due = root.plugin_wake.is_some_and(|w| w <= now);
            for (id, phase) in due {
                let Some(filter) = c.streams.get_mut(&id).and_then(|s| s.filter.as_mut()) else { continue };
                if host.set_effective_context(id).is_err() {
                    continue; // the stream went away
                }
                let flow = filter.on_timer(&host);
                c.adopt_callouts(Owner::Stream(id, phase));
                if c.flow(id, phase, flow, &host) == 0 {
                    resume::<P>(&host, id, phase);
                }
            }
            for (id, _) in periodic_due {
                if host.set_effective_context(id).is_err() {
                    continue; // the stream went away
                }
                let next = match c.streams.get_mut(&id) {
                    Some(s) if !s.done => match (s.filter.as_mut(), s.conn.as_mut()) {
                        (Some(f), _) => f.on_periodic(&host),
                        (None, Some(conn)) => conn.periodic(),
                        (None, None) => None,
                    },
                    _ => None,
                };
                c.adopt_callouts(Owner::Stream(id, Phase::Request));
                if let (Some(d), Some(root)) = (next, c.roots.get_mut(&root_id)) {
                    root.periodic.schedule(id, now + d, Phase::Request);
                }
            }
            let _ = host.set_effective_context(root_id);
            if plugin_due {
                c.plugin_tick(root_id, &host);
            }
            if let Some(root) = c.roots.get_mut(&root_id) {
                root.arm(&host);
            }
        });
    }

    /// Run a stream callback and turn its `Flow` into the ABI's action (0 continue, 1 pause).
    pub fn on_stream(&self, id: u32, phase: Phase, f: impl FnOnce(&mut P::Filter, &ProxyHost) -> Flow) -> u32 {
        self.with(0, |c| {
            let Some(stream) = c.streams.get_mut(&id) else { return 0 };
            let Some(filter) = stream.filter.as_mut() else { return 0 };
            let host = ProxyHost;
            let flow = f(filter, &host);
            let periodic = if stream.periodic_asked {
                None
            } else {
                stream.periodic_asked = true;
                filter.periodic().map(|d| (stream.root, d))
            };
            c.adopt_callouts(Owner::Stream(id, phase));
            if let Some((root_id, d)) = periodic {
                c.schedule_periodic(root_id, id, d, &host);
            }
            c.flow(id, phase, flow, &host)
        })
    }

    /// A gRPC call ended (`proxy_on_grpc_receive` with the message, or `proxy_on_grpc_close`
    /// with a status).
    pub fn on_grpc_reply(&self, token: u32, reply: impl FnOnce(&ProxyHost) -> GrpcReply) {
        self.on_reply(
            CalloutKind::Grpc,
            token,
            reply,
            |f, h, t, r| HttpFilter::on_grpc_reply(f, h, t, r),
            |p, h, t, r| Plugin::on_grpc_reply(p, h, t, r),
        );
    }

    /// An HTTP call ended (`proxy_on_http_call_response`).
    pub fn on_http_reply(&self, token: u32, reply: impl FnOnce(&ProxyHost) -> HttpReply) {
        self.on_reply(
            CalloutKind::Http,
            token,
            reply,
            |f, h, t, r| HttpFilter::on_http_reply(f, h, t, r),
            |p, h, t, r| Plugin::on_http_reply(p, h, t, r),
        );
    }

    /// Hand a callout's reply to whoever started it: a stream (resumed if its callback says
    /// so) or a root's plugin (whose answer may reschedule its tick). Tokens are ours to
    /// check: an unknown one is logged and dropped.
    fn on_reply<R>(
        &self,
        kind: CalloutKind,
        token: u32,
        read: impl FnOnce(&ProxyHost) -> R,
        to_stream: impl FnOnce(&mut P::Filter, &ProxyHost, u32, R) -> Flow,
        to_root: impl FnOnce(&P, &ProxyHost, u32, R) -> Option<Duration>,
    ) {
        self.with((), |c| {
            let host = ProxyHost;
            let Some(owner) = c.callouts.of(kind).remove(&token) else {
                host.log(LogLevel::Debug, &format!("meshwasm.{}: reply for unknown {kind:?} call {token}", P::NAME));
                return;
            };
            match owner {
                Owner::Stream(id, phase) => {
                    let reply = read(&host);
                    let Some(stream) = c.streams.get_mut(&id) else { return };
                    if stream.done {
                        return;
                    }
                    let Some(filter) = stream.filter.as_mut() else { return };
                    if host.set_effective_context(id).is_err() {
                        return; // the stream went away
                    }
                    let flow = to_stream(filter, &host, token, reply);
                    c.adopt_callouts(Owner::Stream(id, phase));
                    if c.flow(id, phase, flow, &host) == 0 {
                        resume::<P>(&host, id, phase);
                    }
                }
                Owner::Root(root_id) => {
                    let Some(plugin) = c.roots.get(&root_id).and_then(|r| r.plugin.clone()) else { return };
                    let reply = read(&host);
                    let _ = host.set_effective_context(root_id);
                    let next = to_root(&plugin, &host, token, reply);
                    c.adopt_callouts(Owner::Root(root_id));
                    if let (Some(d), Some(root)) = (next, c.roots.get_mut(&root_id)) {
                        root.plugin_wake = Some(since_epoch(host.now()) + d);
                        root.arm(&host);
                    }
                }
            }
        });
    }

    /// `proxy_on_log`: the filter's log phase (once), then the stream is over.
    pub fn on_log(&self, id: u32) {
        self.with((), |c| {
            if let Some(stream) = c.streams.get_mut(&id) {
                if !stream.logged {
                    stream.logged = true;
                    if let Some(filter) = stream.filter.as_mut() {
                        filter.on_log(&ProxyHost);
                    }
                }
            }
            Self::finish(c, id);
        });
    }

    /// The stream is over (`proxy_on_done`, `proxy_on_log` or `proxy_on_delete`, whichever
    /// comes first): cancel its timer and callouts and let the filter release what it holds,
    /// once.
    pub fn on_stream_done(&self, id: u32) {
        self.with((), |c| Self::finish(c, id));
    }

    fn finish(c: &mut Contexts<P>, id: u32) {
        let Some(stream) = c.streams.get_mut(&id) else { return };
        if stream.done {
            return;
        }
        stream.done = true;
        if let Some(root) = c.roots.get_mut(&stream.root) {
            root.scheduler.cancel(id);
            root.periodic.cancel(id);
        }
        c.callouts.drop_stream(id);
        if let Some(filter) = stream.filter.as_mut() {
            filter.on_done(&ProxyHost);
        }
        if let Some(conn) = stream.conn.as_mut() {
            conn.close();
        }
    }

    pub fn on_delete(&self, id: u32) {
        self.with((), |c| {
            Self::finish(c, id);
            if c.streams.remove(&id).is_none() {
                c.roots.remove(&id);
            }
        });
    }
    // --- network filters ---

    /// `proxy_on_new_connection`: context `id` is a connection, not an HTTP stream.
    pub fn on_new_connection(&self, id: u32) -> u32
    where
        P: NetworkPlugin,
    {
        self.with(0, |c| {
            let Some(stream) = c.streams.get_mut(&id) else { return 0 };
            let root_id = stream.root;
            let Some(plugin) = c.roots.get(&root_id).and_then(|r| r.plugin.clone()) else { return 0 };
            let host = ProxyHost;
            let mut conn = plugin.new_connection(id);
            conn.on_new_connection(&host);
            let periodic = conn.periodic();
            stream.filter = None;
            stream.conn = Some(Box::new(OnProxy(conn)));
            stream.periodic_asked = true;
            if let Some(d) = periodic {
                c.schedule_periodic(root_id, id, d, &host);
            }
            0
        })
    }

    /// `proxy_on_downstream_data` / `proxy_on_upstream_data`: 0 continue, 1 stop iteration.
    pub fn on_data(&self, id: u32, upstream: bool, size: usize, end_of_stream: bool) -> u32 {
        self.with(0, |c| {
            let Some(stream) = c.streams.get_mut(&id).filter(|s| !s.done) else { return 0 };
            let Some(conn) = stream.conn.as_mut() else { return 0 };
            let flow = conn.data(upstream, size, end_of_stream);
            u32::from(flow != Flow::Continue)
        })
    }

    /// `proxy_on_downstream_connection_close` / `proxy_on_upstream_connection_close`.
    pub fn on_connection_close(&self, id: u32) {
        self.with((), |c| Self::finish(c, id));
    }
}

/// Export the network-filter callbacks of `$plugin` (a `NetworkPlugin`), beside
/// `export_http_filter!` in the same module: the module then loads as
/// `envoy.filters.network.wasm` too. Modules without it export no network callbacks.
#[macro_export]
macro_rules! export_network_filter {
    ($plugin:ty) => {
        #[no_mangle]
        pub extern "C" fn proxy_on_new_connection(id: u32) -> u32 {
            __MESHWASM_VM.with(|vm| vm.on_new_connection(id))
        }
        #[no_mangle]
        pub extern "C" fn proxy_on_downstream_data(id: u32, size: usize, end_of_stream: u32) -> u32 {
            __MESHWASM_VM.with(|vm| vm.on_data(id, false, size, end_of_stream != 0))
        }
        #[no_mangle]
        pub extern "C" fn proxy_on_upstream_data(id: u32, size: usize, end_of_stream: u32) -> u32 {
            __MESHWASM_VM.with(|vm| vm.on_data(id, true, size, end_of_stream != 0))
        }
        #[no_mangle]
        pub extern "C" fn proxy_on_downstream_connection_close(id: u32, _peer: u32) {
            __MESHWASM_VM.with(|vm| vm.on_connection_close(id))
        }
        #[no_mangle]
        pub extern "C" fn proxy_on_upstream_connection_close(id: u32, _peer: u32) {
            __MESHWASM_VM.with(|vm| vm.on_connection_close(id))
        }
    };
}

/// Export the Proxy-Wasm ABI for plugin `$plugin`: the request phase only (`request`), plus
/// response headers (`request, response_headers`), or plus response headers and body
/// (`request, response`). Envoy crosses into the VM only for exported callbacks, so export
/// no more than the filter uses. Use once, in the filter's cdylib, on wasm32.
#[macro_export]
macro_rules! export_http_filter {
    ($plugin:ty, request) => {
        $crate::export_http_filter!(@common $plugin);
    };
    ($plugin:ty, request, response_headers) => {
        $crate::export_http_filter!(@common $plugin);
        $crate::export_http_filter!(@response_headers $plugin);
    };
    ($plugin:ty, request, response) => {
        $crate::export_http_filter!(@common $plugin);
        $crate::export_http_filter!(@response_headers $plugin);
        #[no_mangle]
        pub extern "C" fn proxy_on_response_body(id: u32, size: usize, end_of_stream: u32) -> u32 {
            __MESHWASM_VM.with(|vm| vm.on_stream(id, $crate::wasm::Phase::Response, |f, h| $crate::HttpFilter::on_response_body(f, h, size, end_of_stream != 0)))
        }
    };
    (@response_headers $plugin:ty) => {
        #[no_mangle]
        pub extern "C" fn proxy_on_response_headers(id: u32, _headers: usize, end_of_stream: u32) -> u32 {
            __MESHWASM_VM.with(|vm| vm.on_stream(id, $crate::wasm::Phase::Response, |f, h| $crate::HttpFilter::on_response_headers(f, h, end_of_stream != 0)))
        }
    };
    (@common $plugin:ty) => {
        thread_local! {
            static __MESHWASM_VM: $crate::wasm::Vm<$plugin> = $crate::wasm::Vm::default();
        }
        extern "C" {
            fn __wasm_call_ctors();
        }
        #[no_mangle]
        pub extern "C" fn _initialize() {
            // SAFETY: the reactor's static constructors, run once before any callback.
            unsafe { __wasm_call_ctors() };
            $crate::wasm::init();
        }
        #[no_mangle]
        pub extern "C" fn proxy_abi_version_0_2_1() {}
        #[no_mangle]
        pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
            $crate::wasm::allocate(size)
        }
        #[no_mangle]
        pub extern "C" fn proxy_on_context_create(id: u32, root_id: u32) {
            __MESHWASM_VM.with(|vm| vm.on_context_create(id, root_id))
        }
        #[no_mangle]
        pub extern "C" fn proxy_on_vm_start(_root_id: u32, _size: usize) -> u32 {
            1
        }
        #[no_mangle]
        pub extern "C" fn proxy_on_configure(root_id: u32, size: usize) -> u32 {
            __MESHWASM_VM.with(|vm| u32::from(vm.on_configure(root_id, size)))
        }
        #[no_mangle]
        pub extern "C" fn proxy_on_tick(root_id: u32) {
            __MESHWASM_VM.with(|vm| vm.on_tick(root_id))
        }
        #[no_mangle]
        pub extern "C" fn proxy_on_request_headers(id: u32, _headers: usize, end_of_stream: u32) -> u32 {
            __MESHWASM_VM.with(|vm| vm.on_stream(id, $crate::wasm::Phase::Request, |f, h| $crate::HttpFilter::on_request_headers(f, h, end_of_stream != 0)))
        }
        #[no_mangle]
        pub extern "C" fn proxy_on_request_body(id: u32, size: usize, end_of_stream: u32) -> u32 {
            __MESHWASM_VM.with(|vm| vm.on_stream(id, $crate::wasm::Phase::Request, |f, h| $crate::HttpFilter::on_request_body(f, h, size, end_of_stream != 0)))
        }
        #[no_mangle]
        pub extern "C" fn proxy_on_request_trailers(id: u32, _trailers: usize) -> u32 {
            __MESHWASM_VM.with(|vm| vm.on_stream(id, $crate::wasm::Phase::Request, |f, h| $crate::HttpFilter::on_request_trailers(f, h)))
        }
        #[no_mangle]
        pub extern "C" fn proxy_on_grpc_receive_initial_metadata(_id: u32, _token: u32, _headers: u32) {}
        #[no_mangle]
        pub extern "C" fn proxy_on_grpc_receive_trailing_metadata(_id: u32, _token: u32, _trailers: u32) {}
        #[no_mangle]
        pub extern "C" fn proxy_on_grpc_receive(_id: u32, token: u32, size: usize) {
            __MESHWASM_VM.with(|vm| vm.on_grpc_reply(token, |h| $crate::GrpcReply::Message(h.grpc_receive_buffer(size))))
        }
        #[no_mangle]
        pub extern "C" fn proxy_on_grpc_close(_id: u32, token: u32, status: u32) {
            __MESHWASM_VM.with(|vm| vm.on_grpc_reply(token, |_| $crate::GrpcReply::Failed(status)))
        }
        #[no_mangle]
        pub extern "C" fn proxy_on_http_call_response(_id: u32, token: u32, headers: usize, body_size: usize, trailers: usize) {
            __MESHWASM_VM.with(|vm| vm.on_http_reply(token, |h| h.http_call_response(headers, body_size, trailers)))
        }
        #[no_mangle]
        pub extern "C" fn proxy_on_done(id: u32) -> u32 {
            __MESHWASM_VM.with(|vm| vm.on_stream_done(id));
            1
        }
        #[no_mangle]
        pub extern "C" fn proxy_on_log(id: u32) {
            __MESHWASM_VM.with(|vm| vm.on_log(id))
        }
        #[no_mangle]
        pub extern "C" fn proxy_on_delete(id: u32) {
            __MESHWASM_VM.with(|vm| vm.on_delete(id))
        }
    };
}
