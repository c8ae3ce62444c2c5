//! The proxy-wasm side: the only place hostcalls are made.
//!
//! The `proxy-wasm` crate dispatches callbacks into our contexts, but its hostcall wrappers
//! panic on statuses they do not expect (a resumed stream that went away, a header read in
//! the wrong phase), and a panic traps the VM and fails every request on the worker. So the
//! few hostcalls we need are bound here directly and every status becomes a `Result`.

#![allow(unsafe_code)]

use std::cell::RefCell;
use std::ptr::{null, null_mut};
use std::rc::{Rc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use crate::filter::{Flow, HttpFilter, Plugin};
use crate::host::{HeaderMap, Host, HostError, LocalReply, LogLevel, MetricKind};
use crate::rng::{Rng, WyRand};
use crate::scheduler::Scheduler;

// === raw hostcalls (ABI v0.2.1) ===

mod raw {
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
        pub fn proxy_get_header_map_pairs(map_type: u32, return_map_data: *mut *mut u8, return_map_size: *mut usize) -> u32;
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
        pub fn proxy_define_metric(metric_type: u32, name_data: *const u8, name_size: usize, return_id: *mut u32) -> u32;
        pub fn proxy_get_metric(metric_id: u32, return_value: *mut u64) -> u32;
        pub fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
        pub fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
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

/// Take ownership of a buffer the host allocated through `proxy_on_memory_allocate`
/// (the proxy-wasm crate's allocator, which hands out `Vec<u8>` storage of exactly `size`).
fn owned(ptr: *mut u8, size: usize) -> Vec<u8> {
    if ptr.is_null() || size == 0 {
        return Vec::new();
    }
    // SAFETY: the host wrote `size` bytes into memory obtained from proxy_on_memory_allocate,
    // which allocates with Vec::with_capacity(size) and forgets it.
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
    let read_u32 = |at: usize| -> Option<usize> {
        let s = b.get(at..at + 4)?;
        Some(u32::from_le_bytes(s.try_into().ok()?) as usize)
    };
    let mut out = Vec::new();
    let Some(n) = read_u32(0) else { return out };
    let mut sizes = 4;
    let mut data = 4 + n.saturating_mul(8);
    for _ in 0..n {
        let (Some(ks), Some(vs)) = (read_u32(sizes), read_u32(sizes + 4)) else { return out };
        sizes += 8;
        let k = b.get(data..data + ks).map(|s| String::from_utf8_lossy(s).into_owned());
        data += ks + 1;
        let v = b.get(data..data + vs).map(|s| String::from_utf8_lossy(s).into_owned());
        data += vs + 1;
        match (k, v) {
            (Some(k), Some(v)) => out.push((k, v)),
            _ => return out,
        }
    }
    out
}

// === impl ProxyHost ===

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

    pub fn plugin_configuration(&self, size: usize) -> Vec<u8> {
        let mut ptr = null_mut();
        let mut len = 0;
        // SAFETY: out-pointers to locals; buffer type 7 is PluginConfiguration.
        let s = unsafe { raw::proxy_get_buffer_bytes(7, 0, size, &mut ptr, &mut len) };
        match status(s) {
            Ok(()) => owned(ptr, len),
            Err(_) => Vec::new(),
        }
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
        let s = unsafe { raw::proxy_get_header_map_value(header_map(map), name.as_ptr(), name.len(), &mut ptr, &mut len) };
        match status(s) {
            Ok(()) if !ptr.is_null() => String::from_utf8(owned(ptr, len)).ok(),
            Ok(()) => Some(String::new()),
            Err(_) => None,
        }
    }

    fn headers(&self, map: HeaderMap) -> Vec<(String, String)> {
        let mut ptr = null_mut();
        let mut len = 0;
        // SAFETY: out-pointers to locals.
        let s = unsafe { raw::proxy_get_header_map_pairs(header_map(map), &mut ptr, &mut len) };
        match status(s) {
            Ok(()) => deserialize_pairs(&owned(ptr, len)),
            Err(_) => Vec::new(),
        }
    }

    fn set_header(&self, map: HeaderMap, name: &str, value: Option<&str>) -> Result<(), HostError> {
        // SAFETY: slices are valid for the call.
        status(unsafe {
            match value {
                Some(v) => raw::proxy_replace_header_map_value(header_map(map), name.as_ptr(), name.len(), v.as_ptr(), v.len()),
                None => raw::proxy_remove_header_map_value(header_map(map), name.as_ptr(), name.len()),
            }
        })
    }

    fn add_header(&self, map: HeaderMap, name: &str, value: &str) -> Result<(), HostError> {
        // SAFETY: slices are valid for the call.
        status(unsafe { raw::proxy_add_header_map_value(header_map(map), name.as_ptr(), name.len(), value.as_ptr(), value.len()) })
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

    fn now(&self) -> SystemTime {
        let mut t = 0u64;
        // SAFETY: out-pointer to a local.
        let s = unsafe { raw::proxy_get_current_time_nanoseconds(&mut t) };
        match status(s) {
            Ok(()) => UNIX_EPOCH + Duration::from_nanos(t),
            Err(_) => SystemTime::now(),
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
        status(unsafe { raw::proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas.unwrap_or(0)) })
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

// === glue: Plugin → RootContext, HttpFilter → HttpContext ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Request,
    Response,
}

struct Pending<F> {
    filter: Weak<RefCell<F>>,
    phase: Phase,
}

type SharedScheduler<F> = Rc<RefCell<Scheduler<Pending<F>>>>;

fn since_epoch(t: SystemTime) -> Duration {
    t.duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Register plugin `P` as this module's root context. Call from `proxy_wasm::main!`.
pub fn start<P: Plugin>() {
    std::panic::set_hook(Box::new(|info| {
        ProxyHost.log(LogLevel::Critical, &format!("meshwasm: panic (this is a bug; the VM will trap): {info}"));
    }));
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> { Box::new(Root::<P>::new(id)) });
}

struct Root<P: Plugin> {
    id: u32,
    plugin: Option<Rc<P>>,
    scheduler: SharedScheduler<P::Filter>,
    rng: RefCell<WyRand>,
}

impl<P: Plugin> Root<P> {
    fn new(id: u32) -> Self {
        Self { id, plugin: None, scheduler: Rc::default(), rng: RefCell::new(WyRand::from_entropy()) }
    }
}

impl<P: Plugin> Context for Root<P> {}

impl<P: Plugin> RootContext for Root<P> {
    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let host = ProxyHost;
        let bytes = host.plugin_configuration(plugin_configuration_size);
        match P::configure(&bytes, &host) {
            Ok(p) => {
                self.plugin = Some(Rc::new(p));
                host.log(LogLevel::Info, &format!("meshwasm.{}: configured", P::NAME));
                true
            }
            Err(e) => {
                host.log(LogLevel::Error, &format!("meshwasm.{}: invalid configuration: {e}", P::NAME));
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let host = ProxyHost;
        let now = since_epoch(host.now());
        let due = self.scheduler.borrow_mut().pop_due(now);
        for (id, pending) in due {
            let Some(filter) = pending.filter.upgrade() else { continue };
            if host.set_effective_context(id).is_err() {
                continue; // the stream went away
            }
            let flow = filter.borrow_mut().on_timer(&host);
            let resumed = match flow {
                Flow::Continue => match pending.phase {
                    Phase::Request => host.resume_request(),
                    Phase::Response => host.resume_response(),
                },
                Flow::Pause => Ok(()),
                Flow::Delay(d) => {
                    self.scheduler.borrow_mut().schedule(id, now + d, Pending { filter: Rc::downgrade(&filter), phase: pending.phase });
                    Ok(())
                }
            };
            if let Err(e) = resumed {
                host.log(LogLevel::Debug, &format!("meshwasm.{}: resume stream {id}: {e}", P::NAME));
            }
        }
        let _ = host.set_effective_context(self.id);
        let period = self.scheduler.borrow_mut().tick_period_ms(since_epoch(host.now()));
        host.set_tick_period_ms(period);
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Without a valid configuration Envoy does not create streams; pass through if it does.
        let filter = self.plugin.as_ref().map(|p| Rc::new(RefCell::new(p.new_filter(context_id, self.rng.borrow_mut().next_u64()))));
        Some(Box::new(Stream::<P> { id: context_id, filter, scheduler: self.scheduler.clone(), done: false }))
    }
}

struct Stream<P: Plugin> {
    id: u32,
    filter: Option<Rc<RefCell<P::Filter>>>,
    scheduler: SharedScheduler<P::Filter>,
    done: bool,
}

impl<P: Plugin> Stream<P> {
    fn run(&mut self, phase: Phase, f: impl FnOnce(&mut P::Filter, &ProxyHost) -> Flow) -> Action {
        let Some(filter) = &self.filter else { return Action::Continue };
        let host = ProxyHost;
        let flow = f(&mut filter.borrow_mut(), &host);
        match flow {
            Flow::Continue => Action::Continue,
            Flow::Pause => Action::Pause,
            Flow::Delay(d) => {
                let now = since_epoch(host.now());
                let mut s = self.scheduler.borrow_mut();
                let earlier = s.next_deadline().is_none_or(|n| now + d < n);
                s.schedule(self.id, now + d, Pending { filter: Rc::downgrade(filter), phase });
                if earlier {
                    host.set_tick_period_ms(s.tick_period_ms(now));
                }
                Action::Pause
            }
        }
    }

    fn finish(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        self.scheduler.borrow_mut().cancel(self.id);
        if let Some(filter) = &self.filter {
            filter.borrow_mut().on_done(&ProxyHost);
        }
    }
}

impl<P: Plugin> Drop for Stream<P> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<P: Plugin> Context for Stream<P> {
    fn on_done(&mut self) -> bool {
        self.finish();
        true
    }
}

impl<P: Plugin> HttpContext for Stream<P> {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        self.run(Phase::Request, |f, h| f.on_request_headers(h, end_of_stream))
    }
    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.run(Phase::Request, |f, h| f.on_request_body(h, size, end_of_stream))
    }
    fn on_http_request_trailers(&mut self, _: usize) -> Action {
        self.run(Phase::Request, |f, h| f.on_request_trailers(h))
    }
    fn on_http_response_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        self.run(Phase::Response, |f, h| f.on_response_headers(h, end_of_stream))
    }
    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.run(Phase::Response, |f, h| f.on_response_body(h, size, end_of_stream))
    }
    fn on_log(&mut self) {
        self.finish();
    }
}
