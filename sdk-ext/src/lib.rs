//! meshwasm-sdk-ext: the shared layer every meshwasm filter stands on.
//!
//! - [`config`]: JSON → typed config with path-naming errors; [`duration`], [`percent`].
//! - [`matcher`]: Istio `HTTPMatchRequest` + route names.
//! - [`host`]: the small `Host` trait; [`fake`] implements it in memory for tests, `wasm`
//!   (wasm32 only) implements it with the proxy's hostcalls and drives [`filter`]s.
//! - [`scheduler`]: per-stream delays on the root tick; [`shared`]: CAS state across workers;
//!   [`metrics`]: labelled stats with cached ids; [`route`]: per-route overrides from route
//!   metadata; [`props`]: decoding property values.

pub mod config;
pub mod duration;
pub mod fake;
pub mod filter;
pub mod headers;
pub mod host;
pub mod matcher;
pub mod metrics;
pub mod obj;
pub mod percent;
pub mod props;
pub mod proto;
pub mod rng;
pub mod route;
pub mod scheduler;
pub mod shared;
pub mod value_de;
#[cfg(target_arch = "wasm32")]
pub mod wasm;

pub use config::{ConfigError, Path};
pub use filter::{Flow, GrpcReply, HttpFilter, HttpReply, HttpResponse, NetworkFilter, NetworkPlugin, Plugin};
pub use headers::Headers;
pub use host::{GrpcCall, HeaderMap, Host, HostError, HttpCall, LocalReply, LogLevel, MetricKind};
