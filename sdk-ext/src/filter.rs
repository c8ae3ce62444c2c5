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
}
