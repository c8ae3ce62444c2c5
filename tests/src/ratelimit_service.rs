//! A real global rate-limit service: gRPC `envoy.service.ratelimit.v3.RateLimitService/
//! ShouldRateLimit` (the protocol of envoyproxy/ratelimit and Limitador) over h2c,
//! counting fixed windows in a real Redis (through redis-rs), so two instances on one Redis share counts.
//!
//! ```no_run
//! use meshwasm_tests::{Limit, RateLimitService, Redis, ServiceConfig, Unit};
//! use meshwasm_tests::ratelimit_service::proto::{Code, RateLimitDescriptor, RateLimitRequest};
//! use meshwasm_tests::ratelimit_service::proto::{RateLimitDescriptorExt as _, RateLimitRequestExt as _};
//! let redis = Redis::start();
//! let svc = RateLimitService::builder()
//!     .redis(redis.addr())
//!     .config(ServiceConfig::new("meshwasm", vec![Limit::new(&[("client", None)], 3, Unit::Minute)]))
//!     .start();
//! let req = RateLimitRequest::new("meshwasm", vec![RateLimitDescriptor::new(&[("client", "a")])]);
//! assert_eq!(svc.call(&req).unwrap().overall_code(), Code::Ok);
//! ```
//!
//! # Protocol
//! Served by tonic with envoy-types' generated `RateLimitServiceServer` (the same stack as
//! the ext_authz test authorizer); a thin layer in front of it counts the calls, answers
//! malformed requests with INVALID_ARGUMENT (tonic's own decoder would say INTERNAL) and
//! [`Behaviour::Garbage`]. [`call`] reads the raw reply (the harness's gRPC client) so a
//! test can tell `grpc-status: 0` with an undecodable message from a gRPC error, which a
//! tonic client folds into INTERNAL.
//!
//! A unary gRPC call over HTTP/2 cleartext (prior knowledge, as Envoy's gRPC client speaks
//! to a STATIC cluster with `http2_protocol_options`): `POST` [`SHOULD_RATE_LIMIT_PATH`],
//! the body one length-prefixed message (1 byte compressed flag = 0, 4 bytes big-endian
//! length, a [`proto::RateLimitRequest`]). The answer is `:status 200`,
//! `content-type: application/grpc`, one framed [`proto::RateLimitResponse`] and trailers
//! `grpc-status: 0`. Errors are trailers-only replies (`grpc-status` in the headers):
//! unknown path → 12 UNIMPLEMENTED, malformed request (bad framing, not protobuf, empty
//! domain, no descriptors, a descriptor without entries) → 3 INVALID_ARGUMENT, Redis
//! unreachable → 14 UNAVAILABLE, an error reply from Redis → 13 INTERNAL.
//!
//! # Semantics (fixed window, like envoyproxy/ratelimit)
//! The service holds one [`ServiceConfig`] per domain. A request descriptor matches a
//! [`Limit`] when it has exactly the limit's keys in the same order and every value
//! matches (a limit entry without a value matches any value, and each distinct value gets
//! its own counter). When several limits match, the most specific wins: entry by entry, an
//! exact value beats a wildcard (envoyproxy/ratelimit's precedence); on a tie the first in
//! the configuration. A descriptor without a matching limit (or of an unknown domain) is
//! OK, has no `current_limit`, and is not counted.
//!
//! Counting: per matched descriptor, in one `MULTI … EXEC` transaction for the whole
//! request, `INCRBY meshwasm_rl:<domain>:<k1>_<v1>:<k2>_<v2>:<window_start> <hits>` and
//! `EXPIRE <key> <unit seconds>`, where `window_start` is the epoch second the current
//! window of the limit's unit began (windows are aligned on the epoch, UTC). `hits` is
//! the descriptor's own `hits_addend` when set (0 then checks without counting), else the
//! request's `hits_addend`, 0 meaning 1. A descriptor is OVER_LIMIT when its counter after
//! the increment exceeds `requests_per_unit`; `limit_remaining` is the limit minus the
//! counter (at least 0), `duration_until_reset` the time to the window's end. The overall
//! code is OVER_LIMIT when any descriptor is.
//!
//! Without a Redis ([`RateLimitServiceBuilder::redis`] not called; the binary without
//! `--redis`, or with `--memory`) the same keys count in the service's own memory, like
//! Limitador's default storage: one lock per request stands for the transaction, each
//! increment renews the key's lifetime, expired keys are dropped; two instances do not share
//! counts and a restart starts from zero.
//!
//! With [`ServiceConfig::rate_limit_headers`] (envoyproxy/ratelimit's
//! `LIMIT_RESPONSE_HEADERS_ENABLED`) the response asks the client to add
//! `x-ratelimit-limit`, `x-ratelimit-remaining` and `x-ratelimit-reset` (seconds, rounded
//! up) of the most restrictive descriptor (lowest `limit_remaining`, first on a tie) to
//! its response; the fixed [`ServiceConfig::response_headers`] and
//! [`ServiceConfig::request_headers`] follow in `response_headers_to_add` and
//! `request_headers_to_add`, on OK and OVER_LIMIT answers alike.
//!
//! # Test controls
//! [`RateLimitService::calls`] counts the calls to `ShouldRateLimit` (malformed ones
//! included), [`RateLimitService::last_request`] / [`RateLimitService::requests`] give
//! the decoded requests, and [`RateLimitService::set_behaviour`] switches, at run time,
//! between answering normally, slowly, with garbage, with a gRPC error or with
//! overall_code UNKNOWN (see [`Behaviour`]). [`RateLimitService::stop`] closes the port
//! and every connection; [`RateLimitServiceBuilder::port`] restarts on the same port.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::Either;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tonic::codegen::Service as _;

use crate::server::{accept_loop, ServerThread};
use proto::{
    Code, DescriptorStatus, DurationExt as _, RateLimitDescriptor, RateLimitRequest, RateLimitResponse,
    RateLimitServiceApi, RateLimitServiceServer,
};

/// The gRPC method path.
pub const SHOULD_RATE_LIMIT_PATH: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

/// The Redis key prefix of every counter.
pub const KEY_PREFIX: &str = "meshwasm_rl";

/// How long one Redis transaction (connect included) may take before the call fails with
/// UNAVAILABLE.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest request body accepted.
const MAX_REQUEST: usize = 1 << 20;

type RspBody = BoxBody<Bytes, Infallible>;

/// gRPC status codes used by the service.
pub mod grpc_code {
    pub const OK: u32 = 0;
    pub const UNKNOWN: u32 = 2;
    pub const INVALID_ARGUMENT: u32 = 3;
    pub const DEADLINE_EXCEEDED: u32 = 4;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const INTERNAL: u32 = 13;
    pub const UNAVAILABLE: u32 = 14;
}

/// The protobuf messages and the generated tonic server/client of
/// `envoy/service/ratelimit/v3/rls.proto`, from envoy-types, plus extension traits with the
/// constructors and accessors the tests use (bring them into scope to call
/// `RateLimitRequest::new`, `RateLimitDescriptor::new`, `pairs`, `to_std`, …).
pub mod proto {
    pub use envoy_types::pb::envoy::config::core::v3::HeaderValue;
    pub use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
        Entry, RateLimitOverride,
    };
    pub use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
    pub use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit as RateLimitUnit;
    pub use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus, RateLimit};
    pub use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
    pub use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
        RateLimitService as RateLimitServiceApi, RateLimitServiceServer,
    };
    pub use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
    pub use envoy_types::pb::google::protobuf::{Duration, UInt64Value};

    /// Constructors of [`RateLimitRequest`].
    pub trait RateLimitRequestExt: Sized {
        /// A request for `domain` with `descriptors` and `hits_addend` 0 (one hit).
        fn new(domain: &str, descriptors: Vec<RateLimitDescriptor>) -> Self;
        #[must_use]
        fn with_hits_addend(self, hits: u32) -> Self;
    }

    impl RateLimitRequestExt for RateLimitRequest {
        fn new(domain: &str, descriptors: Vec<RateLimitDescriptor>) -> Self {
            Self { domain: domain.to_string(), descriptors, hits_addend: 0 }
        }

        fn with_hits_addend(mut self, hits: u32) -> Self {
            self.hits_addend = hits;
            self
        }
    }

    /// Constructors and accessors of [`RateLimitDescriptor`].
    pub trait RateLimitDescriptorExt: Sized {
        /// A descriptor of `(key, value)` entries.
        fn new(entries: &[(&str, &str)]) -> Self;
        /// Sets the per-descriptor `hits_addend`.
        #[must_use]
        fn with_hits_addend(self, hits: u64) -> Self;
        /// The entries as `(key, value)` pairs (handy in assertions).
        fn pairs(&self) -> Vec<(String, String)>;
    }

    impl RateLimitDescriptorExt for RateLimitDescriptor {
        fn new(entries: &[(&str, &str)]) -> Self {
            Self {
                entries: entries
                    .iter()
                    .map(|(k, v)| Entry { key: (*k).to_string(), value: (*v).to_string() })
                    .collect(),
                ..Default::default()
            }
        }

        fn with_hits_addend(mut self, hits: u64) -> Self {
            self.hits_addend = Some(UInt64Value { value: hits });
            self
        }

        fn pairs(&self) -> Vec<(String, String)> {
            self.entries.iter().map(|e| (e.key.clone(), e.value.clone())).collect()
        }
    }

    /// Accessors of [`RateLimitResponse`].
    pub trait RateLimitResponseExt {
        /// `response_headers_to_add` as `(key, value)` pairs.
        fn response_headers(&self) -> Vec<(String, String)>;
        /// `request_headers_to_add` as `(key, value)` pairs.
        fn request_headers(&self) -> Vec<(String, String)>;
    }

    impl RateLimitResponseExt for RateLimitResponse {
        fn response_headers(&self) -> Vec<(String, String)> {
            self.response_headers_to_add.iter().map(|h| (h.key.clone(), h.value.clone())).collect()
        }

        fn request_headers(&self) -> Vec<(String, String)> {
            self.request_headers_to_add.iter().map(|h| (h.key.clone(), h.value.clone())).collect()
        }
    }

    /// `google.protobuf.Duration` → `std::time::Duration` (negative parts as 0).
    pub trait DurationExt {
        fn to_std(&self) -> std::time::Duration;
    }

    impl DurationExt for Duration {
        fn to_std(&self) -> std::time::Duration {
            let secs = u64::try_from(self.seconds).unwrap_or(0);
            let nanos = u32::try_from(self.nanos).unwrap_or(0);
            std::time::Duration::new(secs, nanos)
        }
    }
}

// === configuration ===

/// The unit of a limit's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    #[serde(alias = "SECOND")]
    Second,
    #[serde(alias = "MINUTE")]
    Minute,
    #[serde(alias = "HOUR")]
    Hour,
    #[serde(alias = "DAY")]
    Day,
}

/// One entry of a limit: a descriptor key and, optionally, the value it must have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitEntry {
    pub key: String,
    /// `None`: any value, each distinct value with its own counter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// A limit: descriptors with exactly these entries get `requests_per_unit` hits per
/// `unit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limit {
    pub entries: Vec<LimitEntry>,
    pub requests_per_unit: u32,
    pub unit: Unit,
    /// Reported in `current_limit.name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A header to add (`{"key": …, "value": …}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub key: String,
    pub value: String,
}

/// The limits of one domain, and the headers to send with its answers. JSON:
/// `{"domain", "limits": [{"entries": [{"key", "value"?}], "requestsPerUnit", "unit",
/// "name"?}], "rateLimitHeaders"?, "responseHeaders"?: [{"key","value"}],
/// "requestHeaders"?: [..]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceConfig {
    pub domain: String,
    #[serde(default)]
    pub limits: Vec<Limit>,
    /// Add `x-ratelimit-limit`, `x-ratelimit-remaining`, `x-ratelimit-reset` of the most
    /// restrictive descriptor to `response_headers_to_add`.
    #[serde(default)]
    pub rate_limit_headers: bool,
    /// Fixed headers for `response_headers_to_add` (after the rate-limit headers).
    #[serde(default)]
    pub response_headers: Vec<Header>,
    /// Fixed headers for `request_headers_to_add`.
    #[serde(default)]
    pub request_headers: Vec<Header>,
}

// === impl Unit ===

impl Unit {
    /// The window length in seconds.
    pub fn seconds(self) -> u64 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3600,
            Unit::Day => 86_400,
        }
    }

    pub fn to_proto(self) -> proto::RateLimitUnit {
        match self {
            Unit::Second => proto::RateLimitUnit::Second,
            Unit::Minute => proto::RateLimitUnit::Minute,
            Unit::Hour => proto::RateLimitUnit::Hour,
            Unit::Day => proto::RateLimitUnit::Day,
        }
    }
}

// === impl Limit ===

impl Limit {
    /// A limit on descriptors with exactly these `(key, value)` entries (`None`: any
    /// value).
    pub fn new(entries: &[(&str, Option<&str>)], requests_per_unit: u32, unit: Unit) -> Self {
        Self {
            entries: entries
                .iter()
                .map(|(k, v)| LimitEntry { key: (*k).to_string(), value: v.map(str::to_string) })
                .collect(),
            requests_per_unit,
            unit,
            name: None,
        }
    }

    /// Names the limit (reported in `current_limit.name`).
    #[must_use]
    pub fn named(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    /// How specifically this limit matches `d` (per entry: exact value or wildcard), or
    /// `None` when it does not match.
    fn specificity(&self, d: &RateLimitDescriptor) -> Option<Vec<bool>> {
        if self.entries.len() != d.entries.len() {
            return None;
        }
        self.entries
            .iter()
            .zip(&d.entries)
            .map(|(l, e)| match &l.value {
                _ if l.key != e.key => None,
                Some(v) if *v != e.value => None,
                Some(_) => Some(true),
                None => Some(false),
            })
            .collect()
    }
}

// === impl Header ===

impl Header {
    pub fn new(key: &str, value: &str) -> Self {
        Self { key: key.to_string(), value: value.to_string() }
    }

    fn to_proto(&self) -> proto::HeaderValue {
        proto::HeaderValue { key: self.key.clone(), value: self.value.clone(), ..Default::default() }
    }
}

// === impl ServiceConfig ===

impl ServiceConfig {
    /// `domain` with `limits`, no headers.
    pub fn new(domain: &str, limits: Vec<Limit>) -> Self {
        Self {
            domain: domain.to_string(),
            limits,
            rate_limit_headers: false,
            response_headers: Vec::new(),
            request_headers: Vec::new(),
        }
    }

    #[must_use]
    pub fn rate_limit_headers(mut self, on: bool) -> Self {
        self.rate_limit_headers = on;
        self
    }

    #[must_use]
    pub fn response_header(mut self, key: &str, value: &str) -> Self {
        self.response_headers.push(Header::new(key, value));
        self
    }

    #[must_use]
    pub fn request_header(mut self, key: &str, value: &str) -> Self {
        self.request_headers.push(Header::new(key, value));
        self
    }

    /// Checks what serde cannot: a domain, and entries (with keys) in every limit.
    pub fn validate(&self) -> Result<(), String> {
        if self.domain.is_empty() {
            return Err("rate-limit config: empty domain".into());
        }
        for (i, l) in self.limits.iter().enumerate() {
            if l.entries.is_empty() {
                return Err(format!("rate-limit config {}: limit {i} has no entries", self.domain));
            }
            if l.entries.iter().any(|e| e.key.is_empty()) {
                return Err(format!("rate-limit config {}: limit {i} has an entry with an empty key", self.domain));
            }
        }
        Ok(())
    }

    /// Parses a JSON configuration file: one [`ServiceConfig`] object, or an array of
    /// them (one per domain); validates each.
    pub fn from_json(text: &str) -> Result<Vec<ServiceConfig>, String> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("rate-limit config: {e}"))?;
        let configs: Vec<ServiceConfig> = if value.is_array() {
            serde_json::from_value(value)
        } else {
            serde_json::from_value(value).map(|c| vec![c])
        }
        .map_err(|e| format!("rate-limit config: {e}"))?;
        check_configs(&configs)?;
        Ok(configs)
    }

    /// The most specific limit matching `d`.
    fn limit_for(&self, d: &RateLimitDescriptor) -> Option<&Limit> {
        let mut best: Option<(Vec<bool>, &Limit)> = None;
        for l in &self.limits {
            if let Some(spec) = l.specificity(d) {
                if best.as_ref().is_none_or(|(b, _)| spec > *b) {
                    best = Some((spec, l));
                }
            }
        }
        best.map(|(_, l)| l)
    }
}

fn check_configs(configs: &[ServiceConfig]) -> Result<(), String> {
    for (i, c) in configs.iter().enumerate() {
        c.validate()?;
        if configs.iter().take(i).any(|o| o.domain == c.domain) {
            return Err(format!("rate-limit config: domain {} configured twice", c.domain));
        }
    }
    Ok(())
}

// === the decision ===

/// One descriptor to count: its Redis key, the hits to add, its limit.
#[derive(Debug)]
struct Counted<'a> {
    key: String,
    hits: u64,
    limit: &'a Limit,
}

/// Why a call failed: a gRPC status code and message.
type Failure = (u32, String);

/// Checks `req` and decides, per descriptor, what to count at time `now` (since the
/// epoch); `None` for descriptors that are not limited.
fn plan<'a>(
    config: Option<&'a ServiceConfig>,
    req: &RateLimitRequest,
    now: Duration,
) -> Result<Vec<Option<Counted<'a>>>, Failure> {
    let invalid = |m: &str| Err((grpc_code::INVALID_ARGUMENT, m.to_string()));
    if req.domain.is_empty() {
        return invalid("rate limit domain must not be empty");
    }
    if req.descriptors.is_empty() {
        return invalid("rate limit descriptor list must not be empty");
    }
    if req.descriptors.iter().any(|d| d.entries.is_empty()) {
        return invalid("rate limit descriptor must have entries");
    }
    let Some(config) = config else {
        return Ok(req.descriptors.iter().map(|_| None).collect());
    };
    let request_hits = u64::from(req.hits_addend.max(1));
    Ok(req
        .descriptors
        .iter()
        .map(|d| {
            let limit = config.limit_for(d)?;
            let unit = limit.unit.seconds();
            let window_start = now.as_secs() - now.as_secs() % unit;
            let mut key = format!("{KEY_PREFIX}:{}", config.domain);
            for e in &d.entries {
                let _ = write!(key, ":{}_{}", e.key, e.value);
            }
            let _ = write!(key, ":{window_start}");
            let hits = d.hits_addend.map_or(request_hits, |h| h.value);
            Some(Counted { key, hits, limit })
        })
        .collect())
}

/// The Redis transaction counting `counted` (non-empty): `MULTI`, per descriptor `INCRBY key
/// hits` and `EXPIRE key <unit seconds>`, `EXEC`; its value is the counters after the
/// increments, in order.
fn transaction(counted: &[&Counted<'_>]) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for c in counted {
        pipe.incr(&c.key, c.hits).expire(&c.key, i64::try_from(c.limit.unit.seconds()).unwrap_or(i64::MAX)).ignore();
    }
    pipe
}

/// The response, given the plan and the counters (in the order of the counted
/// descriptors).
fn respond(
    config: Option<&ServiceConfig>,
    planned: &[Option<Counted<'_>>],
    counts: &[u64],
    now: Duration,
) -> RateLimitResponse {
    let mut counts = counts.iter();
    let mut rsp = RateLimitResponse { overall_code: Code::Ok as i32, ..Default::default() };
    for p in planned {
        let status = match p {
            None => DescriptorStatus { code: Code::Ok as i32, ..Default::default() },
            Some(c) => {
                let count = counts.next().copied().unwrap_or(0);
                let limit = c.limit.requests_per_unit;
                let over = count > u64::from(limit);
                let unit = c.limit.unit.seconds();
                let window_end = Duration::from_secs(now.as_secs() - now.as_secs() % unit + unit);
                let reset = window_end.saturating_sub(now);
                DescriptorStatus {
                    code: if over { Code::OverLimit } else { Code::Ok } as i32,
                    current_limit: Some(proto::RateLimit {
                        requests_per_unit: limit,
                        unit: c.limit.unit.to_proto() as i32,
                        name: c.limit.name.clone().unwrap_or_default(),
                    }),
                    limit_remaining: u32::try_from(u64::from(limit).saturating_sub(count)).unwrap_or(0),
                    duration_until_reset: Some(proto::Duration {
                        seconds: i64::try_from(reset.as_secs()).unwrap_or(i64::MAX),
                        nanos: i32::try_from(reset.subsec_nanos()).unwrap_or(0),
                    }),
                    ..Default::default()
                }
            }
        };
        if status.code == Code::OverLimit as i32 {
            rsp.overall_code = Code::OverLimit as i32;
        }
        rsp.statuses.push(status);
    }
    if let Some(config) = config {
        if config.rate_limit_headers {
            let tightest = rsp.statuses.iter().filter(|s| s.current_limit.is_some()).reduce(|a, b| {
                if b.limit_remaining < a.limit_remaining {
                    b
                } else {
                    a
                }
            });
            if let Some(s) = tightest {
                let limit = s.current_limit.as_ref().map_or(0, |l| l.requests_per_unit);
                let reset = s.duration_until_reset.as_ref().map_or(Duration::ZERO, |d| d.to_std());
                let reset_secs = reset.as_secs() + u64::from(reset.subsec_nanos() > 0);
                let h = |k: &str, v: String| proto::HeaderValue { key: k.to_string(), value: v, ..Default::default() };
                rsp.response_headers_to_add.extend([
                    h("x-ratelimit-limit", limit.to_string()),
                    h("x-ratelimit-remaining", s.limit_remaining.to_string()),
                    h("x-ratelimit-reset", reset_secs.to_string()),
                ]);
            }
        }
        rsp.response_headers_to_add.extend(config.response_headers.iter().map(Header::to_proto));
        rsp.request_headers_to_add.extend(config.request_headers.iter().map(Header::to_proto));
    }
    rsp
}

fn now_since_epoch() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO)
}

// === behaviour ===

/// How the service answers `ShouldRateLimit`; switchable at run time with
/// [`RateLimitService::set_behaviour`]. Every call is counted and recorded whatever the
/// behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Behaviour {
    /// Count in Redis and answer.
    #[default]
    Normal,
    /// Wait this long, then behave [`Behaviour::Normal`] (counting after the wait; a
    /// call the client cancelled meanwhile counts nothing).
    Slow(Duration),
    /// 200, `grpc-status: 0`, and a framed message that is not a `RateLimitResponse`
    /// (`ff ff ff ff`, a truncated varint). Counts nothing.
    Garbage,
    /// A trailers-only reply with this `grpc-status` (and a `grpc-message`). Counts nothing.
    GrpcError(u32),
    /// A valid response with `overall_code: UNKNOWN` and no statuses. Counts nothing.
    Unknown,
}

// === the service ===

/// Builds and starts a [`RateLimitService`].
#[derive(Debug, Clone)]
pub struct RateLimitServiceBuilder {
    listen: SocketAddr,
    redis: Option<SocketAddr>,
    configs: Vec<ServiceConfig>,
    behaviour: Behaviour,
}

/// A running rate-limit service on its own runtime thread; stopped on drop.
pub struct RateLimitService {
    server: ServerThread,
    state: Arc<State>,
}

/// A failed [`call`]: the `grpc-status` (`None` for a transport or HTTP error) and what
/// went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    pub grpc_status: Option<u32>,
    pub message: String,
}

/// What the connections share.
struct State {
    configs: Vec<ServiceConfig>,
    backend: Backend,
    behaviour: Mutex<Behaviour>,
    calls: AtomicU64,
    requests: Mutex<Vec<RateLimitRequest>>,
}

/// Where the counters live.
enum Backend {
    /// A Redis (shared by every instance pointed at it).
    Redis(Box<RedisStore>),
    /// This process's memory, like Limitador's default storage: counters are private to
    /// the instance and lost when it ends. One mutex makes a request's increments atomic,
    /// as `MULTI … EXEC` does in Redis; each increment renews the key's lifetime (unit
    /// seconds), as `EXPIRE` does.
    Memory(Mutex<HashMap<String, MemoryCounter>>),
}

#[derive(Debug, Clone, Copy)]
struct MemoryCounter {
    value: u64,
    expires_at: Duration,
}

impl Backend {
    fn new(redis: Option<SocketAddr>) -> Self {
        match redis {
            Some(addr) => Backend::Redis(Box::new(RedisStore::new(addr))),
            None => Backend::Memory(Mutex::new(HashMap::new())),
        }
    }

    /// Increments every counter by its hits and returns the new values, in order.
    async fn count(&self, counted: &[&Counted<'_>], now: Duration) -> Result<Vec<u64>, Failure> {
        match self {
            Backend::Redis(store) => store.count(&transaction(counted), counted.len()).await,
            Backend::Memory(map) => {
                Ok(count_in_memory(&mut map.lock().unwrap_or_else(PoisonError::into_inner), counted, now))
            }
        }
    }
}

fn count_in_memory(map: &mut HashMap<String, MemoryCounter>, counted: &[&Counted<'_>], now: Duration) -> Vec<u64> {
    map.retain(|_, c| c.expires_at > now);
    counted
        .iter()
        .map(|c| {
            let entry = map.entry(c.key.clone()).or_insert(MemoryCounter { value: 0, expires_at: now });
            entry.value = entry.value.saturating_add(c.hits);
            entry.expires_at = now + Duration::from_secs(c.limit.unit.seconds());
            entry.value
        })
        .collect()
}

/// A Redis through redis-rs: one multiplexed connection that every call pipelines its
/// transaction on, replaced when it breaks. The lock is never held across an await.
struct RedisStore {
    addr: SocketAddr,
    client: redis::Client,
    conn: Mutex<Option<redis::aio::MultiplexedConnection>>,
}

// === impl RateLimitServiceBuilder ===

impl RateLimitServiceBuilder {
    /// The Redis to count in; without it the service counts in its own memory.
    #[must_use]
    pub fn redis(mut self, addr: SocketAddr) -> Self {
        self.redis = Some(addr);
        self
    }

    /// Adds the configuration of one domain (call once per domain).
    #[must_use]
    pub fn config(mut self, config: ServiceConfig) -> Self {
        self.configs.push(config);
        self
    }

    /// Listen on `127.0.0.1:port` (default: a free port), e.g. to restart a stopped
    /// service on its port.
    #[must_use]
    pub fn port(mut self, port: u16) -> Self {
        self.listen = SocketAddr::from(([127, 0, 0, 1], port));
        self
    }

    /// Listen on `addr` (port 0: a free port).
    #[must_use]
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// The behaviour from the start (default [`Behaviour::Normal`]).
    #[must_use]
    pub fn behaviour(mut self, b: Behaviour) -> Self {
        self.behaviour = b;
        self
    }

    /// Binds, starts serving on a new runtime thread, and returns once the port accepts.
    /// Panics on an invalid configuration, a missing `.redis(…)`, or a failed bind.
    pub fn start(self) -> RateLimitService {
        if let Err(e) = check_configs(&self.configs) {
            panic!("{e}");
        }
        let state = Arc::new(State {
            configs: self.configs,
            backend: Backend::new(self.redis),
            behaviour: Mutex::new(self.behaviour),
            calls: AtomicU64::new(0),
            requests: Mutex::new(Vec::new()),
        });
        let shared = state.clone();
        let server =
            ServerThread::spawn("meshwasm-ratelimit", self.listen, move |listener| serve_state(listener, shared));
        RateLimitService { server, state }
    }
}

// === impl RateLimitService ===

impl RateLimitService {
    /// A builder listening on `127.0.0.1:<free port>`, with no domain configured.
    pub fn builder() -> RateLimitServiceBuilder {
        RateLimitServiceBuilder {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            redis: None,
            configs: Vec::new(),
            behaviour: Behaviour::Normal,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// How many `ShouldRateLimit` calls arrived (malformed ones included).
    pub fn calls(&self) -> u64 {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// The last request that decoded, if any.
    pub fn last_request(&self) -> Option<RateLimitRequest> {
        self.state.requests.lock().unwrap_or_else(PoisonError::into_inner).last().cloned()
    }

    /// Every request that decoded, in arrival order.
    pub fn requests(&self) -> Vec<RateLimitRequest> {
        self.state.requests.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Switches how the following calls are answered.
    pub fn set_behaviour(&self, b: Behaviour) {
        *self.state.behaviour.lock().unwrap_or_else(PoisonError::into_inner) = b;
    }

    pub fn behaviour(&self) -> Behaviour {
        *self.state.behaviour.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Calls `ShouldRateLimit` on this service (see [`call`]).
    pub fn call(&self, req: &RateLimitRequest) -> Result<RateLimitResponse, CallError> {
        call(self.addr(), req)
    }

    /// Stops listening and closes every connection (the port refuses afterwards);
    /// idempotent. The counters ([`RateLimitService::calls`], recorded requests) remain.
    pub fn stop(&mut self) {
        self.server.stop();
    }
}

/// Serves `configs` on `listener`, counting in the Redis at `redis` (in memory when
/// `None`), until the future is
/// dropped (for the standalone binary; tests use [`RateLimitService`]).
pub async fn serve(listener: tokio::net::TcpListener, redis: Option<SocketAddr>, configs: Vec<ServiceConfig>) {
    let state = Arc::new(State {
        configs,
        backend: Backend::new(redis),
        behaviour: Mutex::new(Behaviour::Normal),
        calls: AtomicU64::new(0),
        requests: Mutex::new(Vec::new()),
    });
    serve_state(listener, state).await;
}

/// Accepts connections forever, serving each with HTTP/2 (prior knowledge).
/// The tonic service: envoy-types' generated `RateLimitServiceServer` around this.
struct Rls(Arc<State>);

#[tonic::async_trait]
impl RateLimitServiceApi for Rls {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        let request = request.into_inner();
        let state = &self.0;
        state.requests.lock().unwrap_or_else(PoisonError::into_inner).push(request.clone());
        let behaviour = *state.behaviour.lock().unwrap_or_else(PoisonError::into_inner);
        match behaviour {
            // Garbage is answered before tonic (see `handle`).
            Behaviour::Normal | Behaviour::Garbage => {}
            Behaviour::Slow(d) => tokio::time::sleep(d).await,
            Behaviour::GrpcError(code) => {
                return Err(status(code, "meshwasm rate-limit service: Behaviour::GrpcError".into()))
            }
            Behaviour::Unknown => {
                return Ok(tonic::Response::new(RateLimitResponse {
                    overall_code: Code::Unknown as i32,
                    ..Default::default()
                }))
            }
        }
        state.should_rate_limit(&request).await.map(tonic::Response::new).map_err(|(code, m)| status(code, m))
    }
}

fn status(code: u32, message: String) -> tonic::Status {
    tonic::Status::new(tonic::Code::from(i32::try_from(code).unwrap_or(2)), message)
}

type ServiceBody = Either<tonic::body::Body, RspBody>;

async fn serve_state(listener: tokio::net::TcpListener, state: Arc<State>) {
    let svc = RateLimitServiceServer::new(Rls(state.clone())).max_decoding_message_size(MAX_REQUEST);
    accept_loop(listener, move |stream| {
        let state = state.clone();
        let svc = svc.clone();
        async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                let svc = svc.clone();
                async move { Ok::<_, Infallible>(handle(req, &state, svc).await) }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    })
    .await;
}

/// In front of tonic: counts every `ShouldRateLimit` call, answers a malformed one with
/// INVALID_ARGUMENT (tonic would say INTERNAL) and [`Behaviour::Garbage`] with a framed
/// message that is not protobuf; everything else (unknown methods too) goes to tonic.
async fn handle(
    req: hyper::Request<Incoming>,
    state: &State,
    mut svc: RateLimitServiceServer<Rls>,
) -> hyper::Response<ServiceBody> {
    let (parts, body) = req.into_parts();
    let body = if parts.uri.path() == SHOULD_RATE_LIMIT_PATH {
        state.calls.fetch_add(1, Ordering::SeqCst);
        let body = match Limited::new(body, MAX_REQUEST).collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) => return grpc_error(grpc_code::INVALID_ARGUMENT, &format!("request body: {e}")).map(Either::Right),
        };
        let request = match unframe(&body).and_then(|m| RateLimitRequest::decode(m).map_err(|e| e.to_string())) {
            Ok(r) => r,
            Err(e) => {
                return grpc_error(grpc_code::INVALID_ARGUMENT, &format!("malformed RateLimitRequest: {e}"))
                    .map(Either::Right)
            }
        };
        if *state.behaviour.lock().unwrap_or_else(PoisonError::into_inner) == Behaviour::Garbage {
            state.requests.lock().unwrap_or_else(PoisonError::into_inner).push(request);
            return grpc_message(Bytes::from_static(&[0xff, 0xff, 0xff, 0xff])).map(Either::Right);
        }
        Full::new(body).map_err(|never| match never {}).boxed()
    } else {
        body.boxed()
    };
    match svc.call(hyper::Request::from_parts(parts, body)).await {
        Ok(rsp) => rsp.map(Either::Left),
        Err(never) => match never {},
    }
}

// === impl State ===

impl State {
    async fn should_rate_limit(&self, req: &RateLimitRequest) -> Result<RateLimitResponse, Failure> {
        let now = now_since_epoch();
        let config = self.configs.iter().find(|c| c.domain == req.domain);
        let planned = plan(config, req, now)?;
        let counted: Vec<&Counted<'_>> = planned.iter().flatten().collect();
        let counts = if counted.is_empty() { Vec::new() } else { self.backend.count(&counted, now).await? };
        Ok(respond(config, &planned, &counts, now))
    }
}

// === impl RedisStore ===

impl RedisStore {
    fn new(addr: SocketAddr) -> Self {
        let client = redis::Client::open(format!("redis://{addr}/")).expect("a redis:// URL from a socket address");
        Self { addr, client, conn: Mutex::new(None) }
    }

    /// Runs the transaction `pipe` (of `n` counters) and returns the counters. Transport
    /// failures (Redis down, no answer within [`REDIS_TIMEOUT`]) are UNAVAILABLE, error
    /// replies INTERNAL.
    ///
    /// A connection that broke while idle (Redis restarted) fails its next command with a
    /// dropped-connection error: the call then runs once more on a new connection. The
    /// transaction is `MULTI … EXEC`, so the old server ran all of it or nothing, and a
    /// connection found dead at the first write never reached it.
    async fn count(&self, pipe: &redis::Pipeline, n: usize) -> Result<Vec<u64>, Failure> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT));
        let work = async {
            let cached = self.conn.lock().unwrap_or_else(PoisonError::into_inner).clone();
            if let Some(mut conn) = cached {
                match pipe.query_async::<Vec<u64>>(&mut conn).await {
                    Ok(counts) => return Ok(counts),
                    Err(e) if e.is_connection_dropped() => {}
                    Err(e) => return Err(e),
                }
            }
            let mut conn = self.client.get_multiplexed_async_connection_with_config(&config).await?;
            let counts = pipe.query_async::<Vec<u64>>(&mut conn).await?;
            *self.conn.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn);
            Ok(counts)
        };
        let result = match tokio::time::timeout(REDIS_TIMEOUT, work).await {
            Ok(r) => r,
            Err(_) => {
                return Err((
                    grpc_code::UNAVAILABLE,
                    format!("redis {}: no answer within {REDIS_TIMEOUT:?}", self.addr),
                ))
            }
        };
        match result {
            Ok(counts) if counts.len() == n => Ok(counts),
            Ok(counts) => {
                Err((grpc_code::INTERNAL, format!("redis EXEC: {} counters for {n} descriptors", counts.len())))
            }
            Err(e) => {
                let transport = e.is_io_error() || e.is_connection_dropped() || e.is_timeout();
                if transport {
                    *self.conn.lock().unwrap_or_else(PoisonError::into_inner) = None;
                }
                let code = if transport { grpc_code::UNAVAILABLE } else { grpc_code::INTERNAL };
                Err((code, format!("redis {}: {e}", self.addr)))
            }
        }
    }
}

// === gRPC framing ===

/// The message of a gRPC body holding exactly one uncompressed length-prefixed message.
fn unframe(body: &[u8]) -> Result<&[u8], String> {
    let (header, message) = body.split_at_checked(5).ok_or("body shorter than a gRPC frame header")?;
    let [flag, l0, l1, l2, l3] = <[u8; 5]>::try_from(header).map_err(|_| "frame header")?;
    if flag != 0 {
        return Err("compressed messages are not supported".into());
    }
    let len = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
    if len != message.len() {
        return Err(format!("frame says {len} bytes, body holds {}", message.len()));
    }
    Ok(message)
}

/// `message` as one length-prefixed gRPC frame.
pub fn frame(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(0);
    out.extend_from_slice(&u32::try_from(message.len()).expect("gRPC message over 4 GiB").to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// 200, one framed message, trailers `grpc-status: 0`.
fn grpc_message(message: Bytes) -> hyper::Response<RspBody> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let body = Full::new(Bytes::from(frame(&message))).with_trailers(async move { Some(Ok(trailers)) }).boxed();
    hyper::Response::builder().status(200).header("content-type", "application/grpc").body(body).expect("gRPC response")
}

/// A trailers-only reply: 200, `grpc-status` and `grpc-message` in the headers, no body.
fn grpc_error(code: u32, message: &str) -> hyper::Response<RspBody> {
    hyper::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .header("grpc-status", code.to_string())
        .header("grpc-message", percent_encode(message))
        .body(Full::new(Bytes::new()).boxed())
        .expect("gRPC error response")
}

/// gRPC's `grpc-message` encoding: printable ASCII but `%` as is, the rest `%XX`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

// === client ===

/// Calls `ShouldRateLimit` at `addr` over a new h2c connection (blocking, on the shared
/// client runtime) and decodes the answer. `Err` on a transport error, a non-200 status, a
/// non-zero `grpc-status`, or a body that is not one framed `RateLimitResponse`
/// (`grpc_status: Some(0)` then).
pub fn call(addr: SocketAddr, req: &RateLimitRequest) -> Result<RateLimitResponse, CallError> {
    let http =
        crate::client::Request::grpc(SHOULD_RATE_LIMIT_PATH, &req.encode_to_vec()).timeout(Duration::from_secs(10));
    let rsp = crate::client::try_send(addr, &http).map_err(|message| CallError { grpc_status: None, message })?;
    if rsp.status != 200 {
        return Err(CallError { grpc_status: None, message: format!("HTTP status {}", rsp.status) });
    }
    let status = rsp.grpc_status().and_then(|s| u32::try_from(s).ok());
    if status != Some(grpc_code::OK) {
        return Err(CallError {
            grpc_status: status,
            message: rsp.grpc_message().unwrap_or_else(|| "no grpc-status".into()),
        });
    }
    let bad = |message: String| CallError { grpc_status: Some(grpc_code::OK), message };
    let message = unframe(&rsp.body).map_err(bad)?;
    RateLimitResponse::decode(message).map_err(|e| bad(format!("malformed RateLimitResponse: {e}")))
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.grpc_status {
            Some(code) => write!(f, "grpc-status {code}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for CallError {}

#[cfg(test)]
mod tests {
    use super::proto::{RateLimitDescriptorExt as _, RateLimitRequestExt as _};
    use super::*;

    fn desc(entries: &[(&str, &str)]) -> RateLimitDescriptor {
        RateLimitDescriptor::new(entries)
    }

    #[test]
    fn config_json_round_trips_and_accepts_one_or_many() {
        let json = r#"{"domain": "d", "limits": [
            {"entries": [{"key": "client"}], "requestsPerUnit": 3, "unit": "minute"},
            {"entries": [{"key": "client", "value": "vip"}], "requestsPerUnit": 9, "unit": "HOUR", "name": "vip"}],
            "rateLimitHeaders": true, "responseHeaders": [{"key": "x-a", "value": "1"}]}"#;
        let configs = ServiceConfig::from_json(json).unwrap();
        let expected = ServiceConfig::new(
            "d",
            vec![
                Limit::new(&[("client", None)], 3, Unit::Minute),
                Limit::new(&[("client", Some("vip"))], 9, Unit::Hour).named("vip"),
            ],
        )
        .rate_limit_headers(true)
        .response_header("x-a", "1");
        assert_eq!(configs, vec![expected.clone()]);
        let text = serde_json::to_string(&vec![expected.clone()]).unwrap();
        assert_eq!(ServiceConfig::from_json(&text).unwrap(), vec![expected]);

        assert!(ServiceConfig::from_json(r#"{"domain": "d", "limits": [], "extra": 1}"#).is_err());
        assert!(ServiceConfig::from_json(
            r#"{"domain": "d", "limits": [{"entries": [], "requestsPerUnit": 1, "unit": "second"}]}"#
        )
        .is_err());
        assert!(ServiceConfig::from_json(r#"[{"domain": "d"}, {"domain": "d"}]"#).is_err());
        assert!(ServiceConfig::from_json(
            r#"{"domain": "d", "limits": [{"entries": [{"key": "k"}], "requestsPerUnit": 1, "unit": "week"}]}"#
        )
        .is_err());
    }

    #[test]
    fn most_specific_limit_wins_and_keys_must_match_in_order() {
        let c = ServiceConfig::new(
            "d",
            vec![
                Limit::new(&[("a", None), ("b", None)], 1, Unit::Second).named("any-any"),
                Limit::new(&[("a", None), ("b", Some("x"))], 1, Unit::Second).named("any-x"),
                Limit::new(&[("a", Some("1")), ("b", None)], 1, Unit::Second).named("1-any"),
                Limit::new(&[("a", None)], 1, Unit::Second).named("a"),
            ],
        );
        let name = |d: RateLimitDescriptor| c.limit_for(&d).and_then(|l| l.name.clone());
        assert_eq!(name(desc(&[("a", "2"), ("b", "y")])).as_deref(), Some("any-any"));
        assert_eq!(name(desc(&[("a", "2"), ("b", "x")])).as_deref(), Some("any-x"));
        assert_eq!(name(desc(&[("a", "1"), ("b", "x")])).as_deref(), Some("1-any"));
        assert_eq!(name(desc(&[("a", "1")])).as_deref(), Some("a"));
        assert_eq!(name(desc(&[("b", "x"), ("a", "1")])), None);
        assert_eq!(name(desc(&[("a", "1"), ("b", "x"), ("c", "z")])), None);
    }

    #[test]
    fn plans_keys_hits_and_windows() {
        let c = ServiceConfig::new(
            "dom",
            vec![
                Limit::new(&[("client", None)], 3, Unit::Minute),
                Limit::new(&[("client", None), ("path", Some("/p"))], 3, Unit::Hour),
            ],
        );
        let now = Duration::new(7_265, 500_000_000); // 2h 1m 5.5s
        let req = RateLimitRequest::new(
            "dom",
            vec![
                desc(&[("client", "a")]),
                desc(&[("client", "a"), ("path", "/p")]).with_hits_addend(0),
                desc(&[("other", "x")]),
            ],
        )
        .with_hits_addend(4);
        let p = plan(Some(&c), &req, now).unwrap();
        let p0 = p[0].as_ref().unwrap();
        assert_eq!((p0.key.as_str(), p0.hits), ("meshwasm_rl:dom:client_a:7260", 4));
        let p1 = p[1].as_ref().unwrap();
        assert_eq!((p1.key.as_str(), p1.hits), ("meshwasm_rl:dom:client_a:path_/p:7200", 0));
        assert!(p[2].is_none());
        let req1 = RateLimitRequest::new("dom", vec![desc(&[("client", "a")])]);
        assert_eq!(plan(Some(&c), &req1, now).unwrap()[0].as_ref().unwrap().hits, 1);
        assert!(plan(None, &req1, now).unwrap()[0].is_none());

        let rsp = respond(Some(&c), &p, &[4, 3], now);
        assert_eq!(rsp.overall_code(), Code::OverLimit);
        assert_eq!(rsp.statuses[0].code(), Code::OverLimit);
        assert_eq!(rsp.statuses[0].limit_remaining, 0);
        assert_eq!(rsp.statuses[0].duration_until_reset.unwrap().to_std(), Duration::from_millis(54_500));
        assert_eq!(rsp.statuses[1].code(), Code::Ok);
        assert_eq!(rsp.statuses[1].current_limit.as_ref().unwrap().unit(), proto::RateLimitUnit::Hour);
        assert_eq!(rsp.statuses[2], DescriptorStatus { code: Code::Ok as i32, ..Default::default() });
    }

    #[test]
    fn rejects_malformed_requests() {
        let now = Duration::from_secs(1);
        let bad = |r: RateLimitRequest| plan(None, &r, now).unwrap_err().0;
        assert_eq!(bad(RateLimitRequest::new("", vec![desc(&[("a", "b")])])), grpc_code::INVALID_ARGUMENT);
        assert_eq!(bad(RateLimitRequest::new("d", vec![])), grpc_code::INVALID_ARGUMENT);
        assert_eq!(bad(RateLimitRequest::new("d", vec![desc(&[])])), grpc_code::INVALID_ARGUMENT);
        assert!(unframe(&[0, 0, 0, 0]).is_err());
        assert!(unframe(&[1, 0, 0, 0, 0]).is_err());
        assert!(unframe(&[0, 0, 0, 0, 2, 1]).is_err());
        assert_eq!(unframe(&frame(b"abc")).unwrap(), b"abc");
    }

    #[test]
    fn memory_counters_add_renew_and_expire() {
        let limit = Limit::new(&[("k", None)], 1, Unit::Minute);
        let c = |key: &str, hits| Counted { key: key.into(), hits, limit: &limit };
        let mut map = HashMap::new();
        let t0 = Duration::from_secs(120);
        assert_eq!(count_in_memory(&mut map, &[&c("a", 2), &c("b", 1)], t0), vec![2, 1]);
        assert_eq!(count_in_memory(&mut map, &[&c("a", 0)], t0 + Duration::from_secs(59)), vec![2]);
        // "a" was renewed at t0+59s, "b" expired at t0+60s and is dropped.
        assert_eq!(count_in_memory(&mut map, &[&c("a", 1)], t0 + Duration::from_secs(100)), vec![3]);
        assert!(!map.contains_key("b"));
        assert_eq!(count_in_memory(&mut map, &[&c("a", 1)], t0 + Duration::from_secs(200)), vec![1]);
    }

    #[test]
    fn garbage_is_not_a_response() {
        assert!(RateLimitResponse::decode(&[0xff, 0xff, 0xff, 0xff][..]).is_err());
    }

    #[test]
    fn percent_encodes_grpc_messages() {
        assert_eq!(percent_encode("a b%\n"), "a b%25%0A");
    }
}
