//! Access logs: the Telemetry API's `accessLogging`, one JSON record per request, built in
//! Envoy's log phase (`proxy_on_log`) where the final attributes are readable.
//!
//! Where a record goes is a provider (MeshConfig `extensionProviders`, carried in the plugin
//! configuration):
//! - `envoyFileAccessLog` (and the built-in provider `envoy`): the record is written into the
//!   stream's filter state as `wasm.meshwasm.access_log.<provider>`; a native
//!   `envoy.access_loggers.file` prints it with `%FILTER_STATE(wasm.meshwasm.access_log.<provider>:PLAIN)%`.
//!   Envoy runs the Wasm filter's log callback before the connection manager's access
//!   loggers, so the native logger sees the record of the same request (proven through a real
//!   Envoy in `tests/tests/telemetry_logs_traces.rs`).
//! - `envoyOtelAls`: the record is queued per worker and exported in batches over OTLP/HTTP
//!   JSON (`export.rs`) from the root context's tick.
//!
//! Formats: Istio's default JSON field set (`EnvoyJSONLogFormatIstio`, the `%…%` operators,
//! each computed here as Envoy prints it), the classic (Mixer-era) field set with
//! `preset: "classic"`, or `logFormat.labels` with the supported `%…%` operators.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

use meshwasm_sdk_ext::config::Path;
use meshwasm_sdk_ext::obj::Obj;
use meshwasm_sdk_ext::props::decode_int;
use meshwasm_sdk_ext::{ConfigError, HeaderMap, Host};

use crate::config::{Reporter, STANDARD_TAGS};
use crate::expr::{self, Expr};
use crate::labels;
use crate::peer::Workload;

/// The filter-state key prefix of file providers (Envoy adds `wasm.`).
pub const FILTER_STATE_PREFIX: &str = "meshwasm.access_log.";
/// Istio's built-in file provider.
pub const BUILTIN_PROVIDER: &str = "envoy";

// === configuration ===

/// One operator of Envoy's substitution format (`%…%`) this filter computes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    StartTime,
    RouteName,
    /// `%REQ(A?B)%`: the first of these request headers present.
    Req(Vec<String>),
    Resp(Vec<String>),
    Protocol,
    ResponseCode,
    ResponseFlags,
    ResponseCodeDetails,
    ConnectionTerminationDetails,
    UpstreamTransportFailureReason,
    BytesReceived,
    BytesSent,
    Duration,
    UpstreamHost,
    UpstreamCluster,
    UpstreamLocalAddress,
    DownstreamLocalAddress,
    DownstreamRemoteAddress,
    RequestedServerName,
    // The classic (Mixer-era) attributes.
    /// One of the standard labels (index into `STANDARD_TAGS`), empty when `unknown`.
    Label(usize),
    /// The pod name (`NAME`) of the source / destination workload.
    SourceName,
    DestinationName,
    SourceIp,
    DestinationIp,
    /// `response.duration` as a Go duration (`1.474522ms`).
    Latency,
    Scheme,
    /// An integer property (`request.size`, `response.total_size`, …).
    IntProperty(&'static str, &'static str),
}

const NAMED_OPS: &[(&str, Op)] = &[
    ("START_TIME", Op::StartTime),
    ("ROUTE_NAME", Op::RouteName),
    ("PROTOCOL", Op::Protocol),
    ("RESPONSE_CODE", Op::ResponseCode),
    ("RESPONSE_FLAGS", Op::ResponseFlags),
    ("RESPONSE_CODE_DETAILS", Op::ResponseCodeDetails),
    ("CONNECTION_TERMINATION_DETAILS", Op::ConnectionTerminationDetails),
    ("UPSTREAM_TRANSPORT_FAILURE_REASON", Op::UpstreamTransportFailureReason),
    ("BYTES_RECEIVED", Op::BytesReceived),
    ("BYTES_SENT", Op::BytesSent),
    ("DURATION", Op::Duration),
    ("UPSTREAM_HOST", Op::UpstreamHost),
    ("UPSTREAM_CLUSTER", Op::UpstreamCluster),
    ("UPSTREAM_LOCAL_ADDRESS", Op::UpstreamLocalAddress),
    ("DOWNSTREAM_LOCAL_ADDRESS", Op::DownstreamLocalAddress),
    ("DOWNSTREAM_REMOTE_ADDRESS", Op::DownstreamRemoteAddress),
    ("REQUESTED_SERVER_NAME", Op::RequestedServerName),
];

/// A label value: literal text and operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Lit(String),
    Op(Op),
}

/// Parse a substitution format string (`%REQ(:METHOD)% %PROTOCOL%`).
pub fn parse_template(s: &str) -> Result<Vec<Piece>, String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find('%') {
        if let Some(lit) = rest.get(..start).filter(|l| !l.is_empty()) {
            out.push(Piece::Lit(lit.to_string()));
        }
        let after = rest.get(start + 1..).unwrap_or_default();
        let Some(end) = after.find('%') else {
            return Err(format!("unterminated operator at {}", s.len() - rest.len() + start));
        };
        let op = after.get(..end).unwrap_or_default();
        out.push(Piece::Op(parse_op(op)?));
        rest = after.get(end + 1..).unwrap_or_default();
    }
    if !rest.is_empty() {
        out.push(Piece::Lit(rest.to_string()));
    }
    Ok(out)
}

fn parse_op(op: &str) -> Result<Op, String> {
    if let Some((_, o)) = NAMED_OPS.iter().find(|(n, _)| *n == op) {
        return Ok(o.clone());
    }
    for (prefix, resp) in [("REQ(", false), ("RESP(", true)] {
        if let Some(inner) = op.strip_prefix(prefix) {
            let Some(inner) = inner.strip_suffix(')') else {
                return Err(format!("%{op}%: expected `)`"));
            };
            // A `:N` length limit is not supported.
            if inner.contains(')') || inner.is_empty() {
                return Err(format!("%{op}%: expected one header name or two joined by `?`"));
            }
            let names: Vec<String> = inner.split('?').map(str::to_ascii_lowercase).collect();
            return Ok(if resp { Op::Resp(names) } else { Op::Req(names) });
        }
    }
    Err(format!(
        "%{op}% is not supported (supported: REQ(…), RESP(…), {})",
        NAMED_OPS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
    ))
}

/// Istio's default JSON access log (`EnvoyJSONLogFormatIstio`).
pub fn istio_format() -> Vec<(String, Vec<Piece>)> {
    let op = |o: Op| vec![Piece::Op(o)];
    let req = |h: &[&str]| vec![Piece::Op(Op::Req(h.iter().map(|s| (*s).to_string()).collect()))];
    let mut f = vec![
        ("start_time", op(Op::StartTime)),
        ("route_name", op(Op::RouteName)),
        ("method", req(&[":method"])),
        ("path", req(&["x-envoy-original-path", ":path"])),
        ("protocol", op(Op::Protocol)),
        ("response_code", op(Op::ResponseCode)),
        ("response_flags", op(Op::ResponseFlags)),
        ("response_code_details", op(Op::ResponseCodeDetails)),
        ("connection_termination_details", op(Op::ConnectionTerminationDetails)),
        ("upstream_transport_failure_reason", op(Op::UpstreamTransportFailureReason)),
        ("bytes_received", op(Op::BytesReceived)),
        ("bytes_sent", op(Op::BytesSent)),
        ("duration", op(Op::Duration)),
        ("upstream_service_time", vec![Piece::Op(Op::Resp(vec!["x-envoy-upstream-service-time".into()]))]),
        ("x_forwarded_for", req(&["x-forwarded-for"])),
        ("user_agent", req(&["user-agent"])),
        ("request_id", req(&["x-request-id"])),
        ("authority", req(&[":authority"])),
        ("upstream_host", op(Op::UpstreamHost)),
        ("upstream_cluster", op(Op::UpstreamCluster)),
        ("upstream_local_address", op(Op::UpstreamLocalAddress)),
        ("downstream_local_address", op(Op::DownstreamLocalAddress)),
        ("downstream_remote_address", op(Op::DownstreamRemoteAddress)),
        ("requested_server_name", op(Op::RequestedServerName)),
    ];
    f.sort_by(|a, b| a.0.cmp(b.0));
    f.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn label(name: &str) -> Op {
    Op::Label(STANDARD_TAGS.iter().position(|t| *t == name).unwrap_or(0))
}

/// The classic access log of Istio's Mixer era (the `accesslog` logentry's variables).
pub fn classic_format() -> Vec<(String, Vec<Piece>)> {
    let req = |h: &str| Op::Req(vec![h.to_string()]);
    let f: Vec<(&str, Op)> = vec![
        ("connection_security_policy", label("connection_security_policy")),
        ("destinationApp", label("destination_app")),
        ("destinationIp", Op::DestinationIp),
        ("destinationName", Op::DestinationName),
        ("destinationNamespace", label("destination_workload_namespace")),
        ("destinationPrincipal", label("destination_principal")),
        ("destinationServiceHost", label("destination_service")),
        ("destinationWorkload", label("destination_workload")),
        ("httpAuthority", req(":authority")),
        ("latency", Op::Latency),
        ("method", req(":method")),
        ("protocol", Op::Scheme),
        ("receivedBytes", Op::IntProperty("request", "total_size")),
        ("referer", req("referer")),
        ("reporter", label("reporter")),
        ("requestId", req("x-request-id")),
        ("requestSize", Op::IntProperty("request", "size")),
        ("requestedServerName", Op::RequestedServerName),
        ("responseCode", Op::ResponseCode),
        ("responseFlags", Op::ResponseFlags),
        ("responseSize", Op::IntProperty("response", "size")),
        ("sentBytes", Op::IntProperty("response", "total_size")),
        ("sourceApp", label("source_app")),
        ("sourceIp", Op::SourceIp),
        ("sourceName", Op::SourceName),
        ("sourceNamespace", label("source_workload_namespace")),
        ("sourcePrincipal", label("source_principal")),
        ("sourceWorkload", label("source_workload")),
        ("url", req(":path")),
        ("userAgent", req("user-agent")),
        ("xForwardedFor", req("x-forwarded-for")),
    ];
    f.into_iter().map(|(k, v)| (k.to_string(), vec![Piece::Op(v)])).collect()
}

/// Where one provider's records go.
#[derive(Debug)]
pub enum Sink {
    /// Filter state key (without Envoy's `wasm.` prefix).
    FilterState(String),
    /// Index into the plugin's exporters.
    Export(usize),
}

#[derive(Debug)]
pub struct LogProvider {
    pub name: String,
    pub fields: Vec<(String, Vec<Piece>)>,
    pub sink: Sink,
}

/// The validated `accessLogging` configuration.
#[derive(Debug, Default)]
pub struct AccessLogConfig {
    pub providers: Vec<LogProvider>,
    /// Filter expressions, one per `accessLogging` entry that has one.
    pub filters: Vec<Expr>,
    /// `plans[reporter.index()][provider]`: `None` = not logged; `Some(None)` = logged;
    /// `Some(Some(i))` = logged when `filters[i]` is true.
    pub plans: [Vec<Option<Option<usize>>>; 2],
}

impl AccessLogConfig {
    pub fn is_empty(&self) -> bool {
        self.plans.iter().all(|p| p.iter().all(Option::is_none))
    }

    /// Parse `accessLogging` against the providers; OTLP providers register an exporter.
    pub fn from_spec(
        access_logging: Option<&Value>,
        providers: &BTreeMap<String, (Path, Value)>,
        base: &Path,
        exporters: &mut Vec<crate::export::ExporterConfig>,
    ) -> Result<AccessLogConfig, ConfigError> {
        let mut cfg = AccessLogConfig::default();
        let entries: Vec<Value> = match access_logging {
            None | Some(Value::Null) => return Ok(cfg),
            Some(Value::Array(a)) => a.clone(),
            Some(_) => return Err(base.field("accessLogging").err("must be a list")),
        };
        for (i, entry) in entries.iter().enumerate() {
            let path = base.field("accessLogging").index(i);
            let o = Obj::new(entry, &path, "struct AccessLogging", &["match", "providers", "disabled", "filter"])?;
            let modes = crate::observe::modes(&o)?;
            let filter = match o.get("filter") {
                None => None,
                Some(f) => {
                    let f = Obj::new(f, &o.path("filter"), "struct Filter", &["expression"])?;
                    let e = expr::parse(f.str("expression")?)
                        .map_err(|e| f.path("expression").err(format!("does not parse: {e}")))?;
                    cfg.filters.push(e);
                    Some(cfg.filters.len() - 1)
                }
            };
            let disabled = o.opt_bool("disabled")? == Some(true);
            let mut names = crate::observe::provider_names(&o)?;
            if names.is_empty() {
                names.push((o.path("providers"), BUILTIN_PROVIDER.to_string()));
            }
            for (ppath, name) in &names {
                let at = match cfg.providers.iter().position(|p| &p.name == name) {
                    Some(at) => at,
                    None => {
                        let p = provider(name, providers, ppath, exporters)?;
                        cfg.providers.push(p);
                        for plan in &mut cfg.plans {
                            plan.push(None);
                        }
                        cfg.providers.len() - 1
                    }
                };
                for r in modes {
                    if let Some(slot) = cfg.plans.get_mut(r.index()).and_then(|p| p.get_mut(at)) {
                        *slot = if disabled { None } else { Some(filter) };
                    }
                }
            }
        }
        Ok(cfg)
    }
}

fn log_format(v: Option<&Value>, path: &Path) -> Result<Vec<(String, Vec<Piece>)>, ConfigError> {
    let Some(v) = v else { return Ok(istio_format()) };
    let f = Obj::new(v, path, "struct LogFormat", &["text", "labels", "preset"])?;
    if f.get("text").is_some() {
        return Err(f
            .path("text")
            .err("text formats are not supported: records are JSON (use labels, or print the record with a native logger's format)"));
    }
    match (f.get("labels"), f.opt_str("preset")?) {
        (Some(_), Some(_)) => Err(f.path("preset").err("give labels or preset, not both")),
        (Some(_), None) => {
            let mut out = Vec::new();
            for (k, v) in f.string_map("labels")? {
                let t = parse_template(&v).map_err(|e| f.path("labels").key(&k).err(e))?;
                out.push((k, t));
            }
            Ok(out)
        }
        (None, None | Some("istio")) => Ok(istio_format()),
        (None, Some("classic")) => Ok(classic_format()),
        (None, Some(other)) => Err(f.path("preset").err(format!("must be \"istio\" or \"classic\", got {other:?}"))),
    }
}

fn provider(
    name: &str,
    providers: &BTreeMap<String, (Path, Value)>,
    at: &Path,
    exporters: &mut Vec<crate::export::ExporterConfig>,
) -> Result<LogProvider, ConfigError> {
    let Some((ppath, def)) = providers.get(name) else {
        if name == BUILTIN_PROVIDER {
            return Ok(LogProvider {
                name: name.to_string(),
                fields: istio_format(),
                sink: Sink::FilterState(format!("{FILTER_STATE_PREFIX}{name}")),
            });
        }
        return Err(at.err(format!("no extensionProviders entry named {name:?}")));
    };
    if let Some(v) = def.get("envoyFileAccessLog") {
        let path = ppath.field("envoyFileAccessLog");
        // `path`: the native logger's decides; accepted for pasted providers.
        let o = Obj::new(v, &path, "struct EnvoyFileAccessLog", &["path", "logFormat"])?;
        let _ = o.opt_str("path")?;
        return Ok(LogProvider {
            name: name.to_string(),
            fields: log_format(o.get("logFormat"), &o.path("logFormat"))?,
            sink: Sink::FilterState(format!("{FILTER_STATE_PREFIX}{name}")),
        });
    }
    if let Some(v) = def.get("envoyOtelAls") {
        let path = ppath.field("envoyOtelAls");
        let o = Obj::new(
            v,
            &path,
            "struct EnvoyOtelAls",
            &["service", "port", "cluster", "logName", "logFormat", "http", "batch"],
        )?;
        let fields = log_format(o.get("logFormat"), &o.path("logFormat"))?;
        let (cluster, authority) = crate::export::cluster_of(&o)?;
        let log_name = o.opt_string("logName")?.unwrap_or_else(|| name.to_string());
        let export = crate::export::ExporterConfig::new(
            name,
            crate::export::Kind::OtlpLogs { log_name },
            cluster,
            authority,
            "/v1/logs",
            crate::export::RawHttp::parse(o.get("http"), &o.path("http"))?.as_ref(),
            crate::export::RawBatch::parse(o.get("batch"), &o.path("batch"))?.as_ref(),
            &path,
        )?;
        exporters.push(export);
        return Ok(LogProvider { name: name.to_string(), fields, sink: Sink::Export(exporters.len() - 1) });
    }
    Err(at.err(format!("provider {name:?} is not an access log provider (envoyFileAccessLog or envoyOtelAls)")))
}

// === records ===

/// A field's value, typed as Envoy's JSON formatter types it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    Str(String),
    Int(i64),
    Null,
}

/// What a record needs beyond the proxy's properties and headers.
pub struct LogCtx<'a> {
    pub reporter: Reporter,
    /// The standard label values (index-aligned with `STANDARD_TAGS`).
    pub standard: &'a [String],
    pub local: &'a Workload,
    pub peer: Option<&'a Workload>,
}

fn prop_str(host: &dyn Host, path: &[&str]) -> Option<String> {
    host.property(path).and_then(|b| String::from_utf8(b).ok()).filter(|s| !s.is_empty())
}

fn prop_i64(host: &dyn Host, path: &[&str]) -> Option<i64> {
    host.property(path).and_then(|b| decode_int(&b))
}

fn ip_of(addr: &str) -> String {
    // `1.2.3.4:80`, `[::1]:80`
    match addr.rsplit_once(':') {
        Some((ip, port)) if port.chars().all(|c| c.is_ascii_digit()) => {
            ip.trim_start_matches('[').trim_end_matches(']').to_string()
        }
        _ => addr.to_string(),
    }
}

/// `%START_TIME%`: `2024-05-01T12:34:56.789Z`.
pub fn format_start_time(unix_nanos: i64) -> String {
    let ms = unix_nanos.div_euclid(1_000_000);
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil from days (proleptic Gregorian), Howard Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", sod / 3600, sod % 3600 / 60, sod % 60, ms.rem_euclid(1000))
}

/// A duration as Go prints it (`1.474522ms`, `2.5s`, `350ns`): the classic `latency`.
pub fn go_duration(ns: i64) -> String {
    fn frac(v: i64, unit: i64, suffix: &str) -> String {
        let whole = v / unit;
        let rest = v % unit;
        if rest == 0 {
            return format!("{whole}{suffix}");
        }
        let digits = unit.to_string().len() - 1;
        let f = format!("{rest:0digits$}");
        format!("{whole}.{}{suffix}", f.trim_end_matches('0'))
    }
    let ns = ns.max(0);
    match ns {
        0 => "0s".into(),
        n if n < 1_000 => format!("{n}ns"),
        n if n < 1_000_000 => frac(n, 1_000, "µs"),
        n if n < 1_000_000_000 => frac(n, 1_000_000, "ms"),
        n => {
            let (h, m) = (n / 3_600_000_000_000, n / 60_000_000_000 % 60);
            let s = frac(n % 60_000_000_000, 1_000_000_000, "s");
            match (h, m) {
                (0, 0) => s,
                (0, m) => format!("{m}m{s}"),
                (h, m) => format!("{h}h{m}m{s}"),
            }
        }
    }
}

/// Computes operator values for one request, reading each property at most once.
pub struct Fields<'a> {
    host: &'a dyn Host,
    ctx: &'a LogCtx<'a>,
}

impl<'a> Fields<'a> {
    pub fn new(host: &'a dyn Host, ctx: &'a LogCtx<'a>) -> Self {
        Self { host, ctx }
    }

    fn header(&self, map: HeaderMap, names: &[String]) -> Out {
        for n in names {
            if let Some(v) = self.host.header(map, n) {
                return Out::Str(v);
            }
        }
        Out::Null
    }

    fn s(&self, path: &[&str]) -> Out {
        prop_str(self.host, path).map_or(Out::Null, Out::Str)
    }

    pub fn op(&self, op: &Op) -> Out {
        let h = self.host;
        match op {
            Op::StartTime => prop_i64(h, &["request", "time"]).map_or(Out::Null, |t| Out::Str(format_start_time(t))),
            Op::RouteName => self.s(&["xds", "route_name"]),
            Op::Req(names) => self.header(HeaderMap::RequestHeaders, names),
            Op::Resp(names) => self.header(HeaderMap::ResponseHeaders, names),
            Op::Protocol => self.s(&["request", "protocol"]),
            Op::ResponseCode => Out::Int(prop_i64(h, &["response", "code"]).unwrap_or(0)),
            Op::ResponseFlags => {
                Out::Str(labels::response_flags(prop_i64(h, &["response", "flags"]).map_or(0, |f| f as u64)))
            }
            Op::ResponseCodeDetails => self.s(&["response", "code_details"]),
            Op::ConnectionTerminationDetails => self.s(&["connection", "termination_details"]),
            Op::UpstreamTransportFailureReason => self.s(&["upstream", "transport_failure_reason"]),
            Op::BytesReceived => Out::Int(prop_i64(h, &["request", "size"]).unwrap_or(0)),
            Op::BytesSent => Out::Int(prop_i64(h, &["response", "size"]).unwrap_or(0)),
            Op::Duration => prop_i64(h, &["request", "duration"]).map_or(Out::Null, |ns| Out::Int(ns / 1_000_000)),
            Op::UpstreamHost => self.s(&["upstream", "address"]),
            Op::UpstreamCluster => self.s(&["xds", "cluster_name"]),
            Op::UpstreamLocalAddress => self.s(&["upstream", "local_address"]),
            Op::DownstreamLocalAddress => self.s(&["destination", "address"]),
            Op::DownstreamRemoteAddress => self.s(&["source", "address"]),
            Op::RequestedServerName => self.s(&["connection", "requested_server_name"]),
            Op::Label(i) => match self.ctx.standard.get(*i).map(String::as_str) {
                None | Some(labels::UNKNOWN) => Out::Str(String::new()),
                Some(v) => Out::Str(v.to_string()),
            },
            Op::SourceName | Op::DestinationName => {
                let local_is_source = self.ctx.reporter == Reporter::Client;
                let want_source = *op == Op::SourceName;
                let w = if local_is_source == want_source { Some(self.ctx.local) } else { self.ctx.peer };
                Out::Str(w.map(|w| w.name.clone()).unwrap_or_default())
            }
            Op::SourceIp => Out::Str(prop_str(h, &["source", "address"]).map(|a| ip_of(&a)).unwrap_or_default()),
            Op::DestinationIp => {
                let side = if self.ctx.reporter == Reporter::Server { "destination" } else { "upstream" };
                Out::Str(prop_str(h, &[side, "address"]).map(|a| ip_of(&a)).unwrap_or_default())
            }
            Op::Latency => Out::Str(go_duration(prop_i64(h, &["request", "duration"]).unwrap_or(0))),
            Op::Scheme => Out::Str(
                h.header(HeaderMap::RequestHeaders, ":scheme")
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "http".into()),
            ),
            Op::IntProperty(a, b) => Out::Int(prop_i64(h, &[a, b]).unwrap_or(0)),
        }
    }

    /// One field: a lone operator keeps its type; text with operators is a string where a
    /// missing value prints `-` (as Envoy's formatter does).
    pub fn field(&self, pieces: &[Piece]) -> Out {
        match pieces {
            [Piece::Op(op)] => self.op(op),
            _ => {
                let mut s = String::new();
                for p in pieces {
                    match p {
                        Piece::Lit(l) => s.push_str(l),
                        Piece::Op(op) => match self.op(op) {
                            Out::Str(v) => s.push_str(&v),
                            Out::Int(i) => {
                                let _ = write!(s, "{i}");
                            }
                            Out::Null => s.push('-'),
                        },
                    }
                }
                Out::Str(s)
            }
        }
    }
}

/// Append `s` as a JSON string.
pub fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The record as one JSON object (keys in the format's order).
pub fn render_json(values: &[(&str, Out)]) -> String {
    let mut s = String::with_capacity(64 * values.len());
    s.push('{');
    for (i, (k, v)) in values.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        push_json_str(&mut s, k);
        s.push(':');
        match v {
            Out::Str(v) => push_json_str(&mut s, v),
            Out::Int(n) => {
                let _ = write!(s, "{n}");
            }
            Out::Null => s.push_str("null"),
        }
    }
    s.push('}');
    s
}

/// Evaluate one provider's fields.
pub fn record<'f>(fields: &Fields<'_>, format: &'f [(String, Vec<Piece>)]) -> Vec<(&'f str, Out)> {
    format.iter().map(|(k, p)| (k.as_str(), fields.field(p))).collect()
}

/// The log phase: for each provider this reporter logs to, evaluate its filter (once per
/// expression), build the record and hand it to the provider's sink.
pub fn emit(
    host: &dyn Host,
    cfg: &AccessLogConfig,
    exporters: &crate::export::Exporters,
    ctx: &LogCtx<'_>,
    attrs: &mut dyn expr::Attributes,
    trace: Option<&crate::trace::Active>,
) {
    let Some(plan) = cfg.plans.get(ctx.reporter.index()) else { return };
    let fields = Fields::new(host, ctx);
    let mut verdicts: Vec<Option<bool>> = vec![None; cfg.filters.len()];
    for (i, provider) in cfg.providers.iter().enumerate() {
        let Some(Some(filter)) = plan.get(i) else { continue };
        if let Some(f) = filter {
            let pass = match verdicts.get(*f).copied().flatten() {
                Some(v) => v,
                None => {
                    // As Envoy's CEL access-log filter: anything but `true` (an error, a
                    // missing attribute, a non-boolean) does not log.
                    let v = cfg.filters.get(*f).and_then(|e| e.eval(attrs)) == Some(expr::Val::Bool(true));
                    if let Some(slot) = verdicts.get_mut(*f) {
                        *slot = Some(v);
                    }
                    v
                }
            };
            if !pass {
                continue;
            }
        }
        let values = record(&fields, &provider.fields);
        let json = render_json(&values);
        match &provider.sink {
            Sink::FilterState(key) => {
                if let Err(e) = host.set_property(&[key.as_str()], json.as_bytes()) {
                    host.log(
                        meshwasm_sdk_ext::LogLevel::Debug,
                        &format!("meshwasm.telemetry: cannot write the access log to filter state {key}: {e}"),
                    );
                }
            }
            Sink::Export(at) => {
                let Some(exporter) = exporters.list.get(*at) else { continue };
                let now = host.now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                let now = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
                let start = prop_i64(host, &["request", "time"]).and_then(|t| u64::try_from(t).ok()).unwrap_or(now);
                let mut record = crate::export::otlp_log_record(start, now, &json, &values);
                if let Some(t) = trace {
                    // Log-trace correlation: the request's span (OTLP `traceId`, `spanId`,
                    // `flags` with the sampled bit).
                    record.pop();
                    let _ = write!(
                        record,
                        ",\"traceId\":\"{}\",\"spanId\":\"{}\",\"flags\":{}}}",
                        crate::trace::hex(&t.ctx.trace_id),
                        crate::trace::hex(&t.ctx.span_id),
                        u8::from(t.sampled)
                    );
                }
                exporter.push(host, record);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse_and_reject_unknown_operators() {
        assert_eq!(
            parse_template("%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% x").unwrap(),
            vec![
                Piece::Op(Op::Req(vec![":method".into()])),
                Piece::Lit(" ".into()),
                Piece::Op(Op::Req(vec!["x-envoy-original-path".into(), ":path".into()])),
                Piece::Lit(" x".into()),
            ]
        );
        assert!(parse_template("%DYNAMIC_METADATA(a:b)%").unwrap_err().contains("not supported"));
        assert!(parse_template("%REQ(:PATH").unwrap_err().contains("unterminated"));
        assert!(parse_template("%REQ()%").is_err());
        assert_eq!(istio_format().len(), 24);
    }

    #[test]
    fn time_and_duration_formats() {
        assert_eq!(format_start_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_start_time(1_714_566_896_789_123_456), "2024-05-01T12:34:56.789Z");
        assert_eq!(format_start_time(951_782_400_000_000_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(go_duration(1_474_522), "1.474522ms");
        assert_eq!(go_duration(2_500_000_000), "2.5s");
        assert_eq!(go_duration(350), "350ns");
        assert_eq!(go_duration(61_000_000_000), "1m1s");
        assert_eq!(go_duration(1_000), "1µs");
        assert_eq!(go_duration(0), "0s");
    }

    #[test]
    fn json_escapes_hostile_values() {
        let s = render_json(&[("a\"b", Out::Str("x\n\"\\\u{1}y".into())), ("n", Out::Int(-3)), ("z", Out::Null)]);
        assert_eq!(s, r#"{"a\"b":"x\n\"\\\u0001y","n":-3,"z":null}"#);
        let v: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["a\"b"], "x\n\"\\\u{1}y");
    }

    #[test]
    fn log_phase_writes_filter_state_and_queues_exports() {
        use crate::config::Config;
        use crate::filter::TelemetryPlugin;
        use meshwasm_sdk_ext::fake::FakeHost;
        use meshwasm_sdk_ext::{HttpFilter, Plugin};
        use serde_json::json;
        use std::rc::Rc;

        let cfg = json!({"reporter": "SERVER",
            "accessLogging": [
                {"providers": [{"name": "envoy"}, {"name": "classic"}, {"name": "otel"}]},
                {"providers": [{"name": "otel"}], "filter": {"expression": "response.code >= 400"}},
                {"match": {"mode": "CLIENT"}, "providers": [{"name": "envoy"}], "disabled": true}],
            "extensionProviders": [
                {"name": "classic", "envoyFileAccessLog": {"path": "/dev/stdout", "logFormat": {"preset": "classic"}}},
                {"name": "otel", "envoyOtelAls": {"cluster": "otel", "batch": {"maxQueue": 10}}}]});
        let plugin = Rc::new(TelemetryPlugin::new(
            Config::from_value(&cfg).unwrap(),
            "node".into(),
            json!({"NAME": "ratings-v1-pod", "NAMESPACE": "default", "WORKLOAD_NAME": "ratings-v1"}),
        ));
        let run = |code: i64| {
            let h = FakeHost::with_request(&[
                (":method", "GET"),
                (":path", "/a?b=\"c\""),
                (":authority", "ratings"),
                ("x-request-id", "r1"),
                ("user-agent", "ua"),
            ]);
            h.set_property(&["response", "code"], &code.to_le_bytes());
            h.set_property(&["request", "duration"], &1_474_522i64.to_le_bytes());
            h.set_property(&["request", "time"], &1_714_566_896_789_123_456i64.to_le_bytes());
            h.set_property(&["request", "protocol"], b"HTTP/1.1");
            h.set_property(&["source", "address"], b"10.0.0.1:5555");
            h.set_property(&["destination", "address"], b"10.0.0.2:8080");
            let mut f = plugin.new_filter(2, 0);
            f.on_request_headers(&h, true);
            f.on_log(&h);
            h
        };
        let h = run(200);
        let props = h.written_properties.borrow();
        let rec: Value = serde_json::from_slice(&props["meshwasm.access_log.envoy"]).unwrap();
        assert_eq!(rec["method"], "GET");
        assert_eq!(rec["path"], "/a?b=\"c\"");
        assert_eq!(rec["response_code"], 200);
        assert_eq!(rec["duration"], 1);
        assert_eq!(rec["start_time"], "2024-05-01T12:34:56.789Z");
        assert_eq!(rec["downstream_remote_address"], "10.0.0.1:5555");
        assert_eq!(rec["upstream_host"], Value::Null);
        assert_eq!(rec.as_object().unwrap().len(), 24);
        let classic: Value = serde_json::from_slice(&props["meshwasm.access_log.classic"]).unwrap();
        assert_eq!(classic["latency"], "1.474522ms");
        assert_eq!(classic["sourceIp"], "10.0.0.1");
        assert_eq!(classic["destinationIp"], "10.0.0.2");
        assert_eq!(classic["destinationWorkload"], "ratings-v1");
        assert_eq!(classic["destinationName"], "ratings-v1-pod");
        assert_eq!(classic["sourceWorkload"], "", "unknown peer");
        assert_eq!(classic["reporter"], "destination");
        assert_eq!(classic["connection_security_policy"], "none");
        assert_eq!(classic["responseCode"], 200);
        assert_eq!(plugin.export.list[0].queued(), 0, "the later entry's filter decides for otel");
        drop(props);
        let _ = run(503);
        assert_eq!(plugin.export.list[0].queued(), 1);
    }

    #[test]
    fn config_errors_name_the_path() {
        use crate::config::Config;
        use serde_json::json;
        let err = |v: Value| Config::from_value(&v).unwrap_err().to_string();
        assert_eq!(
            err(json!({"accessLogging": [{"filter": {"expression": "response.code >="}}]})),
            "accessLogging[0].filter.expression: does not parse: at 16: unexpected end of expression"
        );
        assert!(err(json!({"accessLogging": [{"providers": [{"name": "f"}]}],
            "extensionProviders": [{"name": "f", "envoyFileAccessLog": {"logFormat": {"labels": {"x": "%FOO%"}}}}]}))
        .starts_with("extensionProviders[0].envoyFileAccessLog.logFormat.labels.x: %FOO% is not supported"));
        assert!(err(json!({"accessLogging": [{"providers": [{"name": "o"}]}],
            "extensionProviders": [{"name": "o", "envoyOtelAls": {}}]}))
        .starts_with("extensionProviders[0].envoyOtelAls.cluster: needs `cluster`"));
        assert!(err(json!({"accessLogging": [{"match": {"mode": "X"}}]})).starts_with("accessLogging[0].match.mode"));
        assert!(err(json!({"extensionProviders": [{"name": "a", "envoyFileAccessLog": {}}, {"name": "a", "envoyFileAccessLog": {}}]}))
            .starts_with("extensionProviders[1].name: duplicate"));
    }

    #[test]
    fn ip_of_addresses() {
        assert_eq!(ip_of("10.0.0.1:8080"), "10.0.0.1");
        assert_eq!(ip_of("[::1]:80"), "::1");
        assert_eq!(ip_of("unix:/x"), "unix:/x");
    }
}
