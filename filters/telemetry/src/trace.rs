//! Tracing: the Telemetry API's `tracing` — trace context propagation (W3C `traceparent` /
//! `tracestate`, B3 single `b3` and multi `x-b3-*`), the sampling decision with Envoy's
//! semantics (incoming sampled flag, else `x-client-trace-id`, `x-envoy-force-trace`,
//! `randomSamplingPercentage` on the `x-request-id`, the trace reason packed into the
//! `x-request-id`), one span per request finished in the log phase and exported in batches as
//! Zipkin v2 JSON and OTLP/HTTP JSON with `customTags`.
//!
//! A request carrying a context that does not parse is left untraced with its headers
//! untouched, as Envoy 1.40's OpenTelemetry and Zipkin tracers leave it (the tests compare);
//! a request without context starts a new trace. Nothing here can panic on input.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

use meshwasm_sdk_ext::config::Path;
use meshwasm_sdk_ext::obj::Obj;
use meshwasm_sdk_ext::rng::Rng;
use meshwasm_sdk_ext::{ConfigError, HeaderMap, Host};

use crate::accesslog::push_json_str;
use crate::config::Reporter;

// === configuration ===

/// Where a custom tag's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tag {
    Literal(String),
    Header { name: String, default: Option<String> },
}

/// The tracing decision inputs of one reporter.
#[derive(Debug, Clone, PartialEq)]
pub struct TracePlan {
    /// Random sampling, per 10,000.
    pub sampling: u64,
    pub use_request_id: bool,
    /// Exporter indices the spans go to, each with its provider's `maxTagLength` (empty with
    /// `disableSpanReporting`).
    pub exporters: Vec<(usize, usize)>,
    pub tags: Vec<(String, Tag)>,
}

#[derive(Debug, Default)]
pub struct TraceConfig {
    /// `plans[reporter.index()]`; `None`: no tracing for that reporter.
    pub plans: [Option<TracePlan>; 2],
}

/// Istio's default `randomSamplingPercentage` (MeshConfig `defaultConfig.tracing.sampling`,
/// 1 %), per 10,000.
pub const DEFAULT_SAMPLING_PER_10K: u64 = 100;
/// Istio's default `maxTagLength`.
pub const DEFAULT_MAX_TAG_LENGTH: usize = 256;

impl TraceConfig {
    pub fn from_spec(
        tracing: Option<&Value>,
        providers: &BTreeMap<String, (Path, Value)>,
        base: &Path,
        exporters: &mut Vec<crate::export::ExporterConfig>,
    ) -> Result<TraceConfig, ConfigError> {
        let mut cfg = TraceConfig::default();
        let entries = match tracing {
            None | Some(Value::Null) => return Ok(cfg),
            Some(Value::Array(a)) => a.clone(),
            Some(_) => return Err(base.field("tracing").err("must be a list")),
        };
        let mut by_name: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for (i, entry) in entries.iter().enumerate() {
            let path = base.field("tracing").index(i);
            let o = Obj::new(
                entry,
                &path,
                "struct Tracing",
                &[
                    "match",
                    "providers",
                    "randomSamplingPercentage",
                    "disableSpanReporting",
                    "customTags",
                    "useRequestIdForTraceSampling",
                ],
            )?;
            let modes = crate::observe::modes(&o)?;
            // A percentage with up to two decimals, as a count per 10,000.
            let sampling = match o.get("randomSamplingPercentage") {
                None => DEFAULT_SAMPLING_PER_10K,
                Some(v) => match v.as_f64() {
                    Some(p) if (0.0..=100.0).contains(&p) => (p * 100.0).round() as u64,
                    _ => return Err(o.path("randomSamplingPercentage").err("must be a number in 0..=100")),
                },
            };
            let mut tags = Vec::new();
            if let Some(ct) = o.get("customTags") {
                let ct_path = o.path("customTags");
                let Value::Object(m) = ct else { return Err(ct_path.err("must be a map")) };
                for (name, t) in m {
                    let t = Obj::new(t, &ct_path.key(name), "struct CustomTag", &["literal", "header", "environment"])?;
                    let from = |k: &str| -> Result<Option<(String, Option<String>)>, ConfigError> {
                        let Some(v) = t.get(k) else { return Ok(None) };
                        let f = Obj::new(v, &t.path(k), "struct Tag", &["name", "defaultValue", "value"])?;
                        if k == "literal" {
                            return Ok(Some((f.str("value")?.to_string(), None)));
                        }
                        Ok(Some((f.str("name")?.to_string(), f.opt_string("defaultValue")?)))
                    };
                    let tag = match (from("literal")?, from("header")?, from("environment")?) {
                        (Some((v, _)), None, None) => Tag::Literal(v),
                        (None, Some((n, d)), None) => Tag::Header { name: n.to_ascii_lowercase(), default: d },
                        // The VM's environment (Envoy's vm_config.environment_variables), read once.
                        (None, None, Some((n, d))) => Tag::Literal(std::env::var(&n).ok().or(d).unwrap_or_default()),
                        _ => return Err(t.path("literal").err("needs exactly one of literal, header, environment")),
                    };
                    tags.push((name.clone(), tag));
                }
            }
            let names = crate::observe::provider_names(&o)?;
            if names.is_empty() {
                return Err(o.path("providers").err("name at least one tracing provider (zipkin or opentelemetry)"));
            }
            let mut idx = Vec::new();
            for (ppath, name) in &names {
                let (at, mtl) = match by_name.get(name) {
                    Some(v) => *v,
                    None => {
                        let v = provider(name, providers, ppath, exporters)?;
                        by_name.insert(name.clone(), v);
                        v
                    }
                };
                idx.push((at, mtl));
            }
            let plan = TracePlan {
                sampling,
                use_request_id: o.opt_bool("useRequestIdForTraceSampling")?.unwrap_or(true),
                exporters: if o.opt_bool("disableSpanReporting")? == Some(true) { Vec::new() } else { idx },
                tags,
            };
            for r in modes {
                if let Some(slot) = cfg.plans.get_mut(r.index()) {
                    *slot = Some(plan.clone());
                }
            }
        }
        Ok(cfg)
    }
}

fn provider(
    name: &str,
    providers: &BTreeMap<String, (Path, Value)>,
    at: &Path,
    exporters: &mut Vec<crate::export::ExporterConfig>,
) -> Result<(usize, usize), ConfigError> {
    let Some((ppath, def)) = providers.get(name) else {
        return Err(at.err(format!("no extensionProviders entry named {name:?}")));
    };
    let (kind, field, default_path) = if def.get("zipkin").is_some() {
        (crate::export::Kind::Zipkin, "zipkin", "/api/v2/spans")
    } else if def.get("opentelemetry").is_some() {
        (crate::export::Kind::OtlpTraces, "opentelemetry", "/v1/traces")
    } else {
        return Err(at.err(format!("provider {name:?} is not a tracing provider (zipkin or opentelemetry)")));
    };
    let path = ppath.field(field);
    let fields: &[&str] = if field == "zipkin" {
        &["service", "port", "cluster", "maxTagLength", "path", "batch"]
    } else {
        &["service", "port", "cluster", "maxTagLength", "http", "batch"]
    };
    let o = Obj::new(def.get(field).unwrap_or(&Value::Null), &path, "struct TracingProvider", fields)?;
    let (cluster, authority) = crate::export::cluster_of(&o)?;
    let mut http = crate::export::RawHttp::parse(o.get("http"), &o.path("http"))?;
    if let Some(p) = o.opt_string("path")? {
        http = Some(crate::export::RawHttp { path: Some(p), ..Default::default() });
    }
    let max_tag =
        o.opt_u64("maxTagLength")?.map_or(DEFAULT_MAX_TAG_LENGTH, |n| usize::try_from(n).unwrap_or(usize::MAX));
    let e = crate::export::ExporterConfig::new(
        name,
        kind,
        cluster,
        authority,
        default_path,
        http.as_ref(),
        crate::export::RawBatch::parse(o.get("batch"), &o.path("batch"))?.as_ref(),
        &path,
    )?;
    exporters.push(e);
    Ok((exporters.len() - 1, max_tag))
}

// === trace context ===

/// An incoming (or this span's) trace context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// `None`: the sender left the decision to us (B3 without a sampling state).
    pub sampled: Option<bool>,
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Lowercase-or-uppercase hex of exactly `N` bytes, right-aligned into `out` (B3 trace ids
/// may be 64-bit: the high half is zero).
fn parse_hex<const N: usize>(s: &str, lowercase_only: bool) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 2 * N || b.len() % 2 != 0 {
        return None;
    }
    if lowercase_only && b.iter().any(u8::is_ascii_uppercase) {
        return None;
    }
    let mut out = [0u8; N];
    let skip = N - b.len() / 2;
    for (i, pair) in b.chunks(2).enumerate() {
        let (Some(&h), Some(&l)) = (pair.first(), pair.get(1)) else { return None };
        let v = hex_val(h)? << 4 | hex_val(l)?;
        *out.get_mut(skip + i)? = v;
    }
    Some(out)
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn nonzero(b: &[u8]) -> bool {
    b.iter().any(|x| *x != 0)
}

/// W3C `traceparent`: `<2 hex>-<32 hex>-<16 hex>-<2 hex>`, version `00` exactly so, later
/// versions may append fields. Hex of either case, and any version, as Envoy 1.40's
/// OpenTelemetry tracer accepts them (the tests compare with it).
pub fn parse_traceparent(v: &str) -> Option<Context> {
    let v = v.trim();
    let mut parts = v.split('-');
    let (ver, tid, sid, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if ver.len() != 2 || tid.len() != 32 || sid.len() != 16 || flags.len() != 2 {
        return None;
    }
    let version = parse_hex::<1>(ver, false)?;
    if version == [0] && (parts.next().is_some() || v.len() != 55) {
        return None;
    }
    let trace_id = parse_hex::<16>(tid, false)?;
    let span_id = parse_hex::<8>(sid, false)?;
    let flags = parse_hex::<1>(flags, false)?;
    if !nonzero(&trace_id) || !nonzero(&span_id) {
        return None;
    }
    Some(Context { trace_id, span_id, sampled: Some(flags[0] & 1 == 1) })
}

fn b3_sampled(s: &str) -> Option<Option<bool>> {
    match s {
        "1" | "true" | "d" => Some(Some(true)),
        "0" | "false" => Some(Some(false)),
        _ => None,
    }
}

/// B3 single header: `<trace>-<span>[-<sampled>[-<parent>]]`, or only a sampling state
/// (`0`, `1`, `d`), which gives a decision but no context: `Err(decision)`.
pub fn parse_b3_single(v: &str) -> Option<Result<Context, bool>> {
    let v = v.trim();
    if let Some(Some(d)) = b3_sampled(v).filter(|_| v.len() == 1) {
        return Some(Err(d));
    }
    let mut parts = v.split('-');
    let tid = parts.next()?;
    let sid = parts.next()?;
    let sampled = match parts.next() {
        None => None,
        Some(s) => b3_sampled(s)?,
    };
    if let Some(parent) = parts.next() {
        if parent.len() != 16 || parse_hex::<8>(parent, true).is_none() {
            return None;
        }
    }
    if parts.next().is_some() || !(tid.len() == 16 || tid.len() == 32) || sid.len() != 16 {
        return None;
    }
    let trace_id = parse_hex::<16>(tid, true)?;
    let span_id = parse_hex::<8>(sid, true)?;
    if !nonzero(&trace_id) || !nonzero(&span_id) {
        return None;
    }
    Some(Ok(Context { trace_id, span_id, sampled }))
}

/// B3 multi headers: `None` when ids are present but malformed (or only one of them is);
/// `Err(decision)` for a sampling state without ids (`None` inside: no decision). A sampling
/// value that is not `0`/`1`/`true`/`false` reads as not sampled, as Envoy's Zipkin tracer.
pub fn parse_b3_multi(
    trace: Option<&str>,
    span: Option<&str>,
    sampled: Option<&str>,
    flags: Option<&str>,
) -> Option<Result<Context, Option<bool>>> {
    let decision = if flags.map(str::trim) == Some("1") {
        Some(true)
    } else {
        sampled.map(|s| b3_sampled(s.trim()).flatten().unwrap_or(false))
    };
    let (tid, sid) = match (trace.map(str::trim), span.map(str::trim)) {
        (None, None) => return Some(Err(decision)),
        (Some(t), Some(s)) => (t, s),
        _ => return None,
    };
    if !(tid.len() == 16 || tid.len() == 32) || sid.len() != 16 {
        return None;
    }
    let trace_id = parse_hex::<16>(tid, false)?;
    let span_id = parse_hex::<8>(sid, false)?;
    if !nonzero(&trace_id) || !nonzero(&span_id) {
        return None;
    }
    Some(Ok(Context { trace_id, span_id, sampled: decision }))
}

/// Envoy's trace reason, packed into the `x-request-id` (a UUID) at position 14.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    NotTraceable,
    Sampling,
    ServiceForced,
    ClientForced,
}

const REASON_AT: usize = 14;

pub fn trace_reason(request_id: &str) -> Reason {
    if request_id.len() != 36 {
        return Reason::NotTraceable;
    }
    match request_id.as_bytes().get(REASON_AT) {
        Some(b'9') => Reason::Sampling,
        Some(b'a') => Reason::ServiceForced,
        Some(b'b') => Reason::ClientForced,
        _ => Reason::NotTraceable,
    }
}

/// The `x-request-id` with `reason` packed in (unchanged if it is not a UUID).
pub fn with_reason(request_id: &str, reason: Reason) -> Option<String> {
    if request_id.len() != 36 || !request_id.is_char_boundary(REASON_AT) || !request_id.is_char_boundary(REASON_AT + 1)
    {
        return None;
    }
    // Envoy's UUID request-id extension: '4' (a fresh UUID v4) not traced, '9' sampled,
    // 'a' forced by the service, 'b' forced by the client.
    let c = match reason {
        Reason::NotTraceable => '4',
        Reason::Sampling => '9',
        Reason::ServiceForced => 'a',
        Reason::ClientForced => 'b',
    };
    let mut s = String::with_capacity(36);
    s.push_str(request_id.get(..REASON_AT)?);
    s.push(c);
    s.push_str(request_id.get(REASON_AT + 1..)?);
    Some(s)
}

/// The integer Envoy 1.40 samples on: the first 8 hex digits of the `x-request-id` (proven
/// against native tracing in the tests).
pub fn request_id_integer(request_id: &str) -> Option<u64> {
    let head = request_id.get(..8)?;
    if !head.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(head, 16).ok()
}

/// What the request carried that the decision reads.
pub struct Incoming<'a> {
    pub request_id: Option<&'a str>,
    pub client_trace_id: bool,
    pub force_trace: bool,
}

/// Envoy's decision (`mutateTracingRequestHeader`): the reason in the request id; a client
/// trace id forces; `x-envoy-force-trace` forces; else random sampling on the request id's
/// integer (or on `random` when the id has none or `useRequestIdForTraceSampling` is off).
/// A request not sampled keeps the reason it came with.
pub fn decide(plan: &TracePlan, inc: &Incoming<'_>, random: u64) -> Reason {
    let mut reason = inc.request_id.map_or(Reason::NotTraceable, trace_reason);
    let n = if plan.use_request_id { inc.request_id.and_then(request_id_integer).unwrap_or(random) } else { random };
    if inc.client_trace_id {
        reason = Reason::ClientForced;
    } else if inc.force_trace {
        reason = Reason::ServiceForced;
    } else if n % 10_000 < plan.sampling {
        reason = Reason::Sampling;
    }
    reason
}

// === the stream's span ===

/// One request's span, from the request headers to the log phase.
#[derive(Debug, Clone)]
pub struct Active {
    pub ctx: Context,
    pub parent: Option<[u8; 8]>,
    pub sampled: bool,
}

/// The request phase: decide (the connection manager's step: the `x-request-id` reason),
/// extract, start the span, set the outgoing headers. `None` when the request carries a
/// trace context that does not parse: as Envoy's tracers, such a request is not traced and
/// its headers pass through untouched.
pub fn start(plan: &TracePlan, host: &dyn Host, rng: &mut impl Rng) -> Option<Active> {
    let h = |n: &str| host.header(HeaderMap::RequestHeaders, n);
    let request_id = h("x-request-id");
    let reason = decide(
        plan,
        &Incoming {
            request_id: request_id.as_deref(),
            client_trace_id: h("x-client-trace-id").is_some(),
            force_trace: h("x-envoy-force-trace").is_some(),
        },
        rng.next_u64(),
    );
    if let Some(id) = request_id.as_deref().and_then(|id| with_reason(id, reason)) {
        if Some(id.as_str()) != request_id.as_deref() {
            let _ = host.set_header(HeaderMap::RequestHeaders, "x-request-id", Some(&id));
        }
    }
    let mut decision: Option<bool> = None;
    let incoming = if let Some(tp) = h("traceparent") {
        Some(parse_traceparent(&tp)?)
    } else if let Some(b3) = h("b3") {
        match parse_b3_single(&b3)? {
            Ok(c) => Some(c),
            Err(d) => {
                decision = Some(d);
                None
            }
        }
    } else {
        let (tid, sid) = (h("x-b3-traceid"), h("x-b3-spanid"));
        let (sampled, flags) = (h("x-b3-sampled"), h("x-b3-flags"));
        if tid.is_none() && sid.is_none() && sampled.is_none() && flags.is_none() {
            None
        } else {
            match parse_b3_multi(tid.as_deref(), sid.as_deref(), sampled.as_deref(), flags.as_deref())? {
                Ok(c) => Some(c),
                Err(d) => {
                    decision = d;
                    None
                }
            }
        }
    };
    let sampled = incoming.and_then(|c| c.sampled).or(decision).unwrap_or(reason != Reason::NotTraceable);
    let mut span_id = rng.next_u64().to_be_bytes();
    if !nonzero(&span_id) {
        span_id = [0, 0, 0, 0, 0, 0, 0, 1];
    }
    let trace_id = match incoming {
        Some(c) => c.trace_id,
        None => {
            let mut t = [0u8; 16];
            t[..8].copy_from_slice(&rng.next_u64().to_be_bytes());
            t[8..].copy_from_slice(&rng.next_u64().to_be_bytes());
            if !nonzero(&t) {
                t[15] = 1;
            }
            t
        }
    };
    let active = Active {
        ctx: Context { trace_id, span_id, sampled: Some(sampled) },
        parent: incoming.map(|c| c.span_id),
        sampled,
    };
    inject(host, &active);
    Some(active)
}

/// The outgoing headers: W3C (`traceparent`, `tracestate` passed through as it came) and B3
/// multi; a `b3` single header is replaced by the new context.
fn inject(host: &dyn Host, a: &Active) {
    let set = |k: &str, v: Option<&str>| {
        let _ = host.set_header(HeaderMap::RequestHeaders, k, v);
    };
    let (tid, sid) = (hex(&a.ctx.trace_id), hex(&a.ctx.span_id));
    let flag = if a.sampled { "1" } else { "0" };
    set("traceparent", Some(&format!("00-{tid}-{sid}-0{flag}")));
    set("x-b3-traceid", Some(&tid));
    set("x-b3-spanid", Some(&sid));
    set("x-b3-sampled", Some(flag));
    set("x-b3-flags", None);
    match a.parent {
        Some(p) => set("x-b3-parentspanid", Some(&hex(&p))),
        None => set("x-b3-parentspanid", None),
    }
    if host.header(HeaderMap::RequestHeaders, "b3").is_some() {
        let single = match a.parent {
            Some(p) => format!("{tid}-{sid}-{flag}-{}", hex(&p)),
            None => format!("{tid}-{sid}-{flag}"),
        };
        set("b3", Some(&single));
    }
}

/// What a finished span records.
pub struct Finished {
    pub name: String,
    pub kind_server: bool,
    pub start_micros: u64,
    pub duration_micros: u64,
    pub tags: Vec<(String, String)>,
    pub error: bool,
    pub local_service: String,
    pub local_ip: String,
    pub remote_ip: Option<String>,
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

/// The span as Zipkin v2 JSON.
pub fn zipkin_json(a: &Active, f: &Finished, max_tag: usize) -> String {
    let mut s = String::with_capacity(512);
    let _ = write!(s, "{{\"traceId\":\"{}\",\"id\":\"{}\"", hex(&a.ctx.trace_id), hex(&a.ctx.span_id));
    if let Some(p) = a.parent {
        let _ = write!(s, ",\"parentId\":\"{}\"", hex(&p));
    }
    s.push_str(",\"kind\":");
    s.push_str(if f.kind_server { "\"SERVER\"" } else { "\"CLIENT\"" });
    s.push_str(",\"name\":");
    push_json_str(&mut s, &f.name);
    let _ = write!(s, ",\"timestamp\":{},\"duration\":{}", f.start_micros, f.duration_micros.max(1));
    s.push_str(",\"localEndpoint\":{\"serviceName\":");
    push_json_str(&mut s, &f.local_service);
    if !f.local_ip.is_empty() && f.local_ip.parse::<std::net::Ipv4Addr>().is_ok() {
        s.push_str(",\"ipv4\":");
        push_json_str(&mut s, &f.local_ip);
    }
    s.push('}');
    if let Some(r) = f.remote_ip.as_deref().filter(|r| r.parse::<std::net::Ipv4Addr>().is_ok()) {
        s.push_str(",\"remoteEndpoint\":{\"ipv4\":");
        push_json_str(&mut s, r);
        s.push('}');
    }
    s.push_str(",\"tags\":{");
    for (i, (k, v)) in f.tags.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        push_json_str(&mut s, k);
        s.push(':');
        push_json_str(&mut s, truncate(v, max_tag));
    }
    if f.error {
        if !f.tags.is_empty() {
            s.push(',');
        }
        s.push_str("\"error\":\"true\"");
    }
    s.push_str("}}");
    s
}

/// The span as an OTLP JSON `Span`.
pub fn otlp_json(a: &Active, f: &Finished, max_tag: usize) -> String {
    let mut s = String::with_capacity(512);
    let _ = write!(s, "{{\"traceId\":\"{}\",\"spanId\":\"{}\"", hex(&a.ctx.trace_id), hex(&a.ctx.span_id));
    if let Some(p) = a.parent {
        let _ = write!(s, ",\"parentSpanId\":\"{}\"", hex(&p));
    }
    s.push_str(",\"name\":");
    push_json_str(&mut s, &f.name);
    let start = f.start_micros.saturating_mul(1000);
    let end = start.saturating_add(f.duration_micros.saturating_mul(1000));
    let _ = write!(
        s,
        ",\"kind\":{},\"startTimeUnixNano\":\"{start}\",\"endTimeUnixNano\":\"{end}\",\"attributes\":[",
        if f.kind_server { 2 } else { 3 }
    );
    for (i, (k, v)) in f.tags.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str("{\"key\":");
        push_json_str(&mut s, k);
        s.push_str(",\"value\":{\"stringValue\":");
        push_json_str(&mut s, truncate(v, max_tag));
        s.push_str("}}");
    }
    s.push(']');
    if f.error {
        s.push_str(",\"status\":{\"code\":2}");
    }
    s.push('}');
    s
}

/// The log phase: finish the span and queue it to the plan's exporters.
pub fn finish(plan: &TracePlan, a: &Active, host: &dyn Host, f: Finished, exporters: &crate::export::Exporters) {
    if !a.sampled {
        return;
    }
    let _ = host;
    for (at, max_tag) in &plan.exporters {
        let Some(e) = exporters.list.get(*at) else { continue };
        let item = match e.config.kind {
            crate::export::Kind::Zipkin => zipkin_json(a, &f, *max_tag),
            crate::export::Kind::OtlpTraces => otlp_json(a, &f, *max_tag),
            crate::export::Kind::OtlpLogs { .. } => continue,
        };
        e.push(host, item);
    }
}

fn ip(addr: Option<String>) -> Option<String> {
    let a = addr?;
    Some(match a.rsplit_once(':') {
        Some((ip, port)) if port.chars().all(|c| c.is_ascii_digit()) => {
            ip.trim_matches(|c| c == '[' || c == ']').to_string()
        }
        _ => a,
    })
}

/// Gather a finished span's fields in the log phase: the name (`<authority><path>` without
/// the query), times, Envoy's standard HTTP tags, Istio's workload tags, the custom tags.
pub fn finished(
    host: &dyn Host,
    reporter: Reporter,
    standard: &[String],
    local: &crate::peer::Workload,
    plan: &TracePlan,
) -> Finished {
    let h = |n: &str| host.header(HeaderMap::RequestHeaders, n).unwrap_or_default();
    let ps = |p: &[&str]| host.property(p).and_then(|b| String::from_utf8(b).ok()).filter(|s| !s.is_empty());
    let pi = |p: &[&str]| host.property(p).and_then(|b| meshwasm_sdk_ext::props::decode_int(&b)).unwrap_or(0);
    let (authority, path) = (h(":authority"), h(":path"));
    let path_only = path.split('?').next().unwrap_or_default().to_string();
    let code = pi(&["response", "code"]);
    let flags = crate::labels::response_flags(u64::try_from(pi(&["response", "flags"])).unwrap_or(0));
    let scheme = host.header(HeaderMap::RequestHeaders, ":scheme").unwrap_or_else(|| "http".into());
    let mut tags = vec![
        ("component".to_string(), "proxy".to_string()),
        ("guid:x-request-id".to_string(), h("x-request-id")),
        ("http.method".to_string(), h(":method")),
        ("http.protocol".to_string(), ps(&["request", "protocol"]).unwrap_or_default()),
        ("http.status_code".to_string(), code.to_string()),
        ("http.url".to_string(), format!("{scheme}://{authority}{path}")),
        ("istio.canonical_revision".to_string(), local.canonical_revision.clone()),
        ("istio.canonical_service".to_string(), local.canonical_service.clone()),
        ("istio.namespace".to_string(), local.namespace.clone()),
        ("response_flags".to_string(), flags),
        ("upstream_cluster".to_string(), ps(&["xds", "cluster_name"]).unwrap_or_default()),
        ("user_agent".to_string(), h("user-agent")),
    ];
    tags.retain(|(_, v)| !v.is_empty());
    if let Some(i) = crate::config::STANDARD_TAGS.iter().position(|t| *t == "connection_security_policy") {
        if let Some(v) = standard.get(i) {
            tags.push(("istio.connection_security_policy".to_string(), v.clone()));
        }
    }
    tags.extend(custom_tags(plan, host));
    let server = reporter == Reporter::Server;
    let service =
        if local.canonical_service.is_empty() { local.workload.clone() } else { local.canonical_service.clone() };
    let local_service = match (service.is_empty(), local.namespace.is_empty()) {
        (true, _) => "unknown".to_string(),
        (false, true) => service,
        (false, false) => format!("{service}.{}", local.namespace),
    };
    let start_ns = pi(&["request", "time"]);
    let dur_ns = pi(&["request", "duration"]);
    Finished {
        name: format!("{authority}{path_only}"),
        kind_server: server,
        start_micros: u64::try_from(start_ns / 1000).unwrap_or(0),
        duration_micros: u64::try_from(dur_ns / 1000).unwrap_or(0),
        tags,
        error: code == 0 || code >= 500,
        local_service,
        local_ip: ip(ps(&[if server { "destination" } else { "source" }, "address"])).unwrap_or_default(),
        remote_ip: ip(ps(&[if server { "source" } else { "upstream" }, "address"])),
    }
}

/// Custom tag values for this request.
pub fn custom_tags(plan: &TracePlan, host: &dyn Host) -> Vec<(String, String)> {
    plan.tags
        .iter()
        .filter_map(|(k, t)| {
            let v = match t {
                Tag::Literal(v) => Some(v.clone()),
                Tag::Header { name, default } => {
                    host.header(HeaderMap::RequestHeaders, name).or_else(|| default.clone())
                }
            };
            v.map(|v| (k.clone(), v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshwasm_sdk_ext::fake::FakeHost;
    use meshwasm_sdk_ext::rng::WyRand;
    use proptest::prelude::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn plan(pct: u64) -> TracePlan {
        TracePlan { sampling: pct * 100, use_request_id: true, exporters: vec![], tags: vec![] }
    }

    #[test]
    fn traceparent() {
        let c = parse_traceparent(TP).unwrap();
        assert_eq!(hex(&c.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.sampled, Some(true));
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
        assert!(parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-future").is_some());
        // As Envoy's OpenTelemetry tracer: any version, either case.
        assert!(parse_traceparent("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_some());
        assert_eq!(
            parse_traceparent("00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01")
                .map(|c| hex(&c.trace_id))
                .as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }

    #[test]
    fn b3() {
        let c =
            parse_b3_single("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90").unwrap().unwrap();
        assert_eq!(c.sampled, Some(true));
        assert_eq!(parse_b3_single("0"), Some(Err(false)));
        assert_eq!(parse_b3_single("d"), Some(Err(true)));
        let short = parse_b3_single("64fe8b2a57d3eff7-e457b5a2e4d86bd1").unwrap().unwrap();
        assert_eq!(hex(&short.trace_id), "000000000000000064fe8b2a57d3eff7");
        assert_eq!(short.sampled, None);
        for bad in ["x", "80f198ee56343ba8-e457b5a2e4d86bd1-7", "80f198ee56343ba-e457b5a2e4d86bd1", "a-b-c-d-e"] {
            assert_eq!(parse_b3_single(bad), None, "{bad}");
        }
        let m = parse_b3_multi(Some("463ac35c9f6413ad48485a3953bb6124"), Some("a2fb4a1d1a96d312"), Some("0"), None)
            .unwrap()
            .unwrap();
        assert_eq!(m.sampled, Some(false));
        assert_eq!(parse_b3_multi(None, None, Some("1"), None), Some(Err(Some(true))));
        assert_eq!(parse_b3_multi(Some("zz"), Some("a2fb4a1d1a96d312"), None, None), None);
        assert_eq!(parse_b3_multi(Some("463ac35c9f6413ad"), None, None, None), None, "one id alone");
        let junk = parse_b3_multi(Some("463ac35c9f6413ad"), Some("a2fb4a1d1a96d312"), Some("maybe"), None);
        assert_eq!(junk.unwrap().unwrap().sampled, Some(false), "as Envoy's Zipkin tracer");
        assert_eq!(
            parse_b3_multi(Some("463ac35c9f6413ad"), Some("a2fb4a1d1a96d312"), None, Some("1"))
                .unwrap()
                .unwrap()
                .sampled,
            Some(true)
        );
    }

    #[test]
    fn request_id_reason_and_sampling() {
        let id = "6f1a7d4c-9f3e-4b2a-8c1d-0123456789ab";
        assert_eq!(trace_reason(id), Reason::NotTraceable);
        let b = with_reason(id, Reason::Sampling).unwrap();
        assert_eq!(&b[14..15], "9");
        assert_eq!(trace_reason(&b), Reason::Sampling);
        assert_eq!(with_reason(id, Reason::NotTraceable).unwrap(), id, "a fresh v4 UUID stays as it is");
        assert_eq!(with_reason("short", Reason::Sampling), None);
        assert_eq!(request_id_integer(id), Some(0x6f1a7d4c));
        assert_eq!(request_id_integer("+1234567-"), None);
        let inc = |rid, c, f| Incoming { request_id: rid, client_trace_id: c, force_trace: f };
        // 0x6f1a7d4c % 10000 = 6988: sampled at 70 %, not at 69 %.
        assert_eq!(decide(&plan(70), &inc(Some(id), false, false), 0), Reason::Sampling);
        assert_eq!(decide(&plan(69), &inc(Some(id), false, false), 0), Reason::NotTraceable);
        assert_eq!(decide(&plan(0), &inc(Some(id), true, false), 0), Reason::ClientForced);
        assert_eq!(decide(&plan(0), &inc(Some(id), false, true), 0), Reason::ServiceForced);
        assert_eq!(decide(&plan(0), &inc(Some(&b), false, false), 0), Reason::Sampling, "an upstream proxy's decision");
        assert_eq!(decide(&plan(0), &inc(None, false, false), 5), Reason::NotTraceable);
    }

    #[test]
    fn decide_on_a_uuid_with_a_zero_prefix() {
        let id = "00000000-0000-4000-8e06-2702ec929eea";
        let inc = Incoming { request_id: Some(id), client_trace_id: false, force_trace: false };
        assert_eq!(decide(&plan(25), &inc, 9999), Reason::Sampling, "0 % 10000 < 2500");
    }

    #[test]
    fn start_propagates_and_leaves_garbage_untraced() {
        let h = FakeHost::with_request(&[("traceparent", TP), ("tracestate", "a=b")]);
        let mut rng = WyRand::new(1);
        let a = start(&plan(0), &h, &mut rng).unwrap();
        assert!(a.sampled, "the incoming flag decides");
        let tp = h.header(HeaderMap::RequestHeaders, "traceparent").unwrap();
        assert!(tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && tp.ends_with("-01"), "{tp}");
        assert_ne!(tp, TP, "a new span id");
        assert_eq!(h.header(HeaderMap::RequestHeaders, "x-b3-parentspanid").as_deref(), Some("00f067aa0ba902b7"));
        assert_eq!(h.header(HeaderMap::RequestHeaders, "tracestate").as_deref(), Some("a=b"));

        // Malformed context: not traced, the headers untouched (as Envoy's tracers).
        let h = FakeHost::with_request(&[("traceparent", "00-zz-zz-01"), ("x-b3-traceid", "nothex")]);
        assert!(start(&plan(100), &h, &mut rng).is_none());
        assert_eq!(h.header(HeaderMap::RequestHeaders, "traceparent").as_deref(), Some("00-zz-zz-01"));
        assert!(h.header(HeaderMap::RequestHeaders, "x-b3-spanid").is_none());
        // No context: a new trace.
        let h = FakeHost::with_request(&[]);
        let a = start(&plan(100), &h, &mut rng).unwrap();
        assert!(a.parent.is_none() && a.sampled);
        assert!(parse_traceparent(&h.header(HeaderMap::RequestHeaders, "traceparent").unwrap()).is_some());
    }

    #[test]
    fn span_json() {
        let a = Active { ctx: parse_traceparent(TP).unwrap(), parent: Some([1; 8]), sampled: true };
        let f = Finished {
            name: "svc/\"x\"".into(),
            kind_server: true,
            start_micros: 5,
            duration_micros: 7,
            tags: vec![("k".into(), "é".repeat(200))],
            error: true,
            local_service: "s".into(),
            local_ip: "10.0.0.1".into(),
            remote_ip: Some("::1".into()),
        };
        let z: Value = serde_json::from_str(&zipkin_json(&a, &f, 5)).unwrap();
        assert_eq!(z["parentId"], "0101010101010101");
        assert_eq!(z["tags"]["k"], "éé");
        assert_eq!(z["tags"]["error"], "true");
        let o: Value = serde_json::from_str(&otlp_json(&a, &f, 256)).unwrap();
        assert_eq!(o["endTimeUnixNano"], "12000");
        assert_eq!(o["status"]["code"], 2);
    }

    proptest! {
        #[test]
        fn parsers_never_panic(s in ".{0,80}") {
            let _ = parse_traceparent(&s);
            let _ = parse_b3_single(&s);
            let _ = parse_b3_multi(Some(&s), Some(&s), Some(&s), Some(&s));
            let _ = with_reason(&s, Reason::Sampling);
            let _ = request_id_integer(&s);
        }
    }
}
