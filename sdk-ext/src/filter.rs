//! The one small trait every meshwasm HTTP filter implements, and the plugin (root) trait.
//! The proxy-wasm glue in `crate::wasm` drives them; tests drive them with the fake host.
//! Keeping filters behind this trait is what lets one module chain several of them later.

use std::rc::Rc;
use std::time::Duration;

use crate::config::ConfigError;
use crate::host::Host;

/// What a filter callback wants the proxy to do with the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on to the next filter.
    Continue,
    /// Stop here: a local reply was sent, or the filter is waiting (body/trailers while delayed).
    Pause,
    /// Stop, and call `on_timer` after this long (the glue arms the root tick and resumes
    /// the stream if `on_timer` returns `Continue`).
    Delay(Duration),
}

/// How a gRPC callout ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcReply {
    /// The response message (serialized).
    Message(Vec<u8>),
    /// The call failed with this gRPC status: 4 DEADLINE_EXCEEDED after the call's timeout,
    /// 14 UNAVAILABLE when the service cannot be reached, or whatever the service answered.
    Failed(u32),
}

/// The answer to an HTTP callout (`Host::http_call`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpReply {
    Response(HttpResponse),
    /// No response: the call timed out, the connection failed or was reset (Envoy reports
    /// all of these as a reply without headers).
    Failed,
}

/// A response to an HTTP callout. `body` holds at most [`MAX_CALLOUT_BODY`] bytes;
/// `body_size` is the size Envoy received, so a filter can refuse oversized answers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HttpResponse {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub body_size: usize,
    pub trailers: Vec<(String, String)>,
}

/// The most of a callout's response body copied into the VM.
pub const MAX_CALLOUT_BODY: usize = 1 << 20;

impl HttpResponse {
    /// The `:status` pseudo-header, if it is a number.
    pub fn status(&self) -> Option<u32> {
        self.header(":status").and_then(|s| s.parse().ok())
    }

    /// The first value of header `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

pub trait HttpFilter {
    fn on_request_headers(&mut self, _host: &dyn Host, _end_of_stream: bool) -> Flow {
        Flow::Continue
    }
    fn on_request_body(&mut self, _host: &dyn Host, _size: usize, _end_of_stream: bool) -> Flow {
        Flow::Continue
    }
    fn on_request_trailers(&mut self, _host: &dyn Host) -> Flow {
        Flow::Continue
    }
    fn on_response_headers(&mut self, _host: &dyn Host, _end_of_stream: bool) -> Flow {
        Flow::Continue
    }
    fn on_response_body(&mut self, _host: &dyn Host, _size: usize, _end_of_stream: bool) -> Flow {
        Flow::Continue
    }
    /// A delay asked for with `Flow::Delay` has elapsed. `Continue` resumes the stream.
    fn on_timer(&mut self, _host: &dyn Host) -> Flow {
        Flow::Continue
    }
    /// A gRPC call this stream started (`Host::grpc_call`) has ended. `Continue` resumes the
    /// stream (it must have paused for the call), `Pause` leaves it paused (a local reply was
    /// sent).
    fn on_grpc_reply(&mut self, _host: &dyn Host, _token: u32, _reply: GrpcReply) -> Flow {
        Flow::Continue
    }
    /// An HTTP call this stream started (`Host::http_call`) has ended; `Continue` resumes
    /// the stream, `Pause` leaves it paused (a local reply was sent).
    fn on_http_reply(&mut self, _host: &dyn Host, _token: u32, _reply: HttpReply) -> Flow {
        Flow::Continue
    }
    /// Periodic work on a stream that keeps flowing, without pausing it (telemetry's reports
    /// on long gRPC streams). Asked once, after the stream's first callback
    /// (`on_request_headers`): `Some(d)` calls `on_periodic` after `d`, driven by the root
    /// tick. Each `on_periodic` returns the next interval, or `None` to stop. Nothing is
    /// called once the stream is done.
    fn periodic(&self) -> Option<Duration> {
        None
    }
    fn on_periodic(&mut self, _host: &dyn Host) -> Option<Duration> {
        None
    }
    /// The access-log phase (`proxy_on_log`): the stream's final attributes (`response.code`,
    /// `response.flags`, `upstream.request_attempt_count`, sizes, durations) are readable.
    /// Called at most once, for streams that reached Envoy's access logging; Envoy may call
    /// it before or after `on_done`.
    fn on_log(&mut self, _host: &dyn Host) {}
    /// The stream is finished (completed, reset or destroyed). Called exactly once.
    fn on_done(&mut self, _host: &dyn Host) {}
}

/// A filter's root: the validated, immutable configuration plus anything shared by the
/// streams of one worker (metric ids, per-route config cache).
pub trait Plugin: Sized + 'static {
    /// Short filter name: stats prefix `meshwasm.<NAME>`, route metadata key, log prefix.
    const NAME: &'static str;
    type Filter: HttpFilter + 'static;

    /// Parse and validate the plugin configuration. Errors are logged and the configuration
    /// is rejected (on_configure returns false).
    fn configure(config: &[u8], host: &dyn Host) -> Result<Self, ConfigError>;

    /// A new stream; `seed` seeds the stream's random generator.
    fn new_filter(self: &Rc<Self>, context_id: u32, seed: u64) -> Self::Filter;

    /// Root-context work that belongs to no stream (refreshing a key set, flushing a batch).
    /// Called once right after a successful `configure`, then again when the returned delay
    /// has elapsed; `None` means no further call until a callout reply asks for one. Callouts
    /// started here reply to `on_http_reply` / `on_grpc_reply` below. State the plugin
    /// changes here lives behind interior mutability (the plugin is shared by the streams).
    fn tick(&self, _host: &dyn Host) -> Option<Duration> {
        None
    }

    /// An HTTP call started from `tick` (or from these callbacks) has ended. A returned delay
    /// (re)schedules `tick`.
    fn on_http_reply(&self, _host: &dyn Host, _token: u32, _reply: HttpReply) -> Option<Duration> {
        None
    }

    /// A gRPC call started from `tick` (or from these callbacks) has ended. A returned delay
    /// (re)schedules `tick`.
    fn on_grpc_reply(&self, _host: &dyn Host, _token: u32, _reply: GrpcReply) -> Option<Duration> {
        None
    }
}

/// A network (TCP) filter: one per connection, for modules loaded as
/// `envoy.filters.network.wasm` (exported with `export_network_filter!`). Envoy calls the
/// data callbacks with the bytes of one read; `Host::network_data` /
/// `Host::set_network_data` read and rewrite them.
pub trait NetworkFilter {
    /// The connection was accepted (its upstream is not chosen yet).
    fn on_new_connection(&mut self, _host: &dyn Host) {}
    /// Bytes from the downstream (`size` buffered). `Flow::Pause` keeps them buffered and
    /// calls again when more arrive.
    fn on_downstream_data(&mut self, _host: &dyn Host, _size: usize, _end_of_stream: bool) -> Flow {
        Flow::Continue
    }
    /// Bytes from the upstream, likewise.
    fn on_upstream_data(&mut self, _host: &dyn Host, _size: usize, _end_of_stream: bool) -> Flow {
        Flow::Continue
    }
    /// The connection is over (either side closed it, or Envoy destroyed it). Called once.
    fn on_close(&mut self, _host: &dyn Host) {}
    /// Periodic work while the connection is open, as `HttpFilter::periodic`: asked once,
    /// after `on_new_connection`.
    fn periodic(&self) -> Option<Duration> {
        None
    }
    fn on_periodic(&mut self, _host: &dyn Host) -> Option<Duration> {
        None
    }
}

/// A plugin that is also a network filter: one `NetworkFilter` per connection.
pub trait NetworkPlugin: Plugin {
    fn new_connection(self: &Rc<Self>, context_id: u32) -> Box<dyn NetworkFilter>;
}
