//! The plugin configuration: the `spec` of an Istio `telemetry.istio.io` Telemetry resource
//! (or the whole resource as `kubectl get -o json` prints it), plus what Istio keeps in
//! ProxyConfig / the bootstrap: `reporter`, `disableHostHeaderFallback`,
//! `tcpReportingInterval`, `maxSeries`.
//!
//! ```json
//! {"metrics": [{"overrides": [
//!    {"match": {"metric": "REQUEST_COUNT", "mode": "CLIENT"},
//!     "tagOverrides": {"request_protocol": {"value": "request.protocol"},
//!                      "response_flags": {"operation": "REMOVE"}}},
//!    {"match": {"metric": "REQUEST_DURATION"}, "disabled": true}]}],
//!  "maxSeries": 10000}
//! ```
//!
//! Overrides apply in order; a later one wins over an earlier one for the same tag. The
//! result is one tag plan per (metric, mode), computed here once.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use meshwasm_sdk_ext::config::{from_value, Path};
use meshwasm_sdk_ext::ConfigError;

use crate::expr::{self, Expr};

/// Istio's standard metrics, in `Metric::ALL` order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    RequestCount,
    RequestDuration,
    RequestSize,
    ResponseSize,
    GrpcRequestMessages,
    GrpcResponseMessages,
    TcpOpened,
    TcpClosed,
    TcpSent,
    TcpReceived,
}

impl Metric {
    pub const ALL: [Metric; 10] = [
        Metric::RequestCount,
        Metric::RequestDuration,
        Metric::RequestSize,
        Metric::ResponseSize,
        Metric::GrpcRequestMessages,
        Metric::GrpcResponseMessages,
        Metric::TcpOpened,
        Metric::TcpClosed,
        Metric::TcpSent,
        Metric::TcpReceived,
    ];

    /// The Telemetry API name (`match.metric`).
    pub fn api_name(self) -> &'static str {
        match self {
            Metric::RequestCount => "REQUEST_COUNT",
            Metric::RequestDuration => "REQUEST_DURATION",
            Metric::RequestSize => "REQUEST_SIZE",
            Metric::ResponseSize => "RESPONSE_SIZE",
            Metric::GrpcRequestMessages => "GRPC_REQUEST_MESSAGES",
            Metric::GrpcResponseMessages => "GRPC_RESPONSE_MESSAGES",
            Metric::TcpOpened => "TCP_OPENED_CONNECTIONS",
            Metric::TcpClosed => "TCP_CLOSED_CONNECTIONS",
            Metric::TcpSent => "TCP_SENT_BYTES",
            Metric::TcpReceived => "TCP_RECEIVED_BYTES",
        }
    }

    /// The Prometheus name.
    pub fn prom_name(self) -> &'static str {
        match self {
            Metric::RequestCount => "istio_requests_total",
            Metric::RequestDuration => "istio_request_duration_milliseconds",
            Metric::RequestSize => "istio_request_bytes",
            Metric::ResponseSize => "istio_response_bytes",
            Metric::GrpcRequestMessages => "istio_request_messages_total",
            Metric::GrpcResponseMessages => "istio_response_messages_total",
            Metric::TcpOpened => "istio_tcp_connections_opened_total",
            Metric::TcpClosed => "istio_tcp_connections_closed_total",
            Metric::TcpSent => "istio_tcp_sent_bytes_total",
            Metric::TcpReceived => "istio_tcp_received_bytes_total",
        }
    }

    pub fn index(self) -> usize {
        Metric::ALL.iter().position(|m| *m == self).unwrap_or(0)
    }

    fn is_tcp(self) -> bool {
        matches!(self, Metric::TcpOpened | Metric::TcpClosed | Metric::TcpSent | Metric::TcpReceived)
    }

    /// How many of `STANDARD_TAGS` (a prefix) the metric carries, as istio/proxy emits them:
    /// 25 for HTTP; 23 for TCP (no `response_code`, `grpc_response_status`); 20 for the gRPC
    /// message counters, which istio/proxy reports while the stream runs, before the
    /// protocol, flags, security policy and response labels exist.
    pub fn standard_tag_count(self) -> usize {
        match self {
            Metric::GrpcRequestMessages | Metric::GrpcResponseMessages => 20,
            m if m.is_tcp() => 23,
            _ => 25,
        }
    }
}

/// The standard labels, in the order Istio emits them. HTTP metrics have all 25, TCP
/// metrics the first 23, the gRPC message counters the first 20
/// (`Metric::standard_tag_count`).
pub const STANDARD_TAGS: [&str; 25] = [
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
    "response_code",
    "grpc_response_status",
];

/// Which side of the call this proxy reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporter {
    /// `reporter="source"`: the outbound side (Telemetry mode `CLIENT`).
    Client,
    /// `reporter="destination"`: the inbound side (Telemetry mode `SERVER`).
    Server,
}

impl Reporter {
    pub fn index(self) -> usize {
        match self {
            Reporter::Client => 0,
            Reporter::Server => 1,
        }
    }
}

/// Where a label's value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The standard value (index into `STANDARD_TAGS`).
    Standard(usize),
    /// A tag override expression (index into `Config::exprs`).
    Expr(usize),
}

/// The labels of one metric for one reporter, and whether it is recorded at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub enabled: bool,
    pub tags: Vec<(String, Source)>,
}

#[derive(Debug)]
pub struct Config {
    /// `None`: from the listener's `traffic_direction` (INBOUND → server, else client).
    pub reporter: Option<Reporter>,
    pub disable_host_header_fallback: bool,
    pub tcp_reporting_interval: Duration,
    /// Network filter: exchange peer metadata in-band at the start of each connection
    /// (istio/proxy's TCP frame). Both proxies must have it on.
    pub tcp_metadata_exchange: bool,
    /// Per metric, per worker VM: distinct label sets past this fold into one overflow series.
    pub max_series: Option<usize>,
    pub exprs: Vec<Expr>,
    /// `plans[reporter.index()][metric.index()]`.
    pub plans: [Vec<Plan>; 2],
    /// `accessLogging` (see `accesslog.rs`).
    pub access_log: crate::accesslog::AccessLogConfig,
    /// `tracing` (see `trace.rs`).
    pub tracing: crate::trace::TraceConfig,
    /// Collectors the providers export to (taken by the plugin at creation).
    pub exporters: Vec<crate::export::ExporterConfig>,
}

impl Config {
    pub fn plan(&self, reporter: Reporter, metric: Metric) -> Option<&Plan> {
        self.plans.get(reporter.index()).and_then(|p| p.get(metric.index()))
    }

    /// Whether any plan evaluates expressions (the filter skips building an attribute view
    /// otherwise).
    pub fn has_exprs(&self) -> bool {
        !self.exprs.is_empty()
    }
}

// === raw (serde) shapes ===

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawSpec {
    /// Workload selection is the control plane's business: accepted and ignored.
    #[serde(default)]
    selector: Option<Value>,
    #[serde(default)]
    target_ref: Option<Value>,
    #[serde(default)]
    target_refs: Option<Value>,
    #[serde(default)]
    metrics: Vec<RawMetrics>,
    #[serde(default)]
    access_logging: Option<Value>,
    #[serde(default)]
    tracing: Option<Value>,
    /// MeshConfig `extensionProviders`: where access logs (and traces) go.
    #[serde(default)]
    extension_providers: Option<Value>,
    #[serde(default)]
    reporter: Option<String>,
    #[serde(default)]
    disable_host_header_fallback: bool,
    #[serde(default, deserialize_with = "meshwasm_sdk_ext::duration::de_opt")]
    tcp_reporting_interval: Option<Duration>,
    #[serde(default)]
    tcp_metadata_exchange: bool,
    #[serde(default)]
    max_series: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawMetrics {
    #[serde(default)]
    providers: Option<Vec<RawProvider>>,
    #[serde(default)]
    overrides: Vec<RawOverride>,
    #[serde(default)]
    reporting_interval: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawOverride {
    #[serde(default, rename = "match")]
    matches: Option<RawMatch>,
    #[serde(default)]
    disabled: Option<bool>,
    #[serde(default)]
    tag_overrides: BTreeMap<String, RawTagOverride>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawMatch {
    #[serde(default)]
    metric: Option<String>,
    #[serde(default)]
    custom_metric: Option<String>,
    #[serde(default)]
    mode: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawTagOverride {
    #[serde(default)]
    operation: Option<String>,
    #[serde(default)]
    value: Option<String>,
}

/// The prometheus provider's names: a `metrics` entry naming only other providers does not
/// apply to this filter.
const PROVIDERS: &[&str] = &["prometheus"];

fn valid_label(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl Config {
    pub fn from_json(bytes: &[u8]) -> Result<Config, ConfigError> {
        let text = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}".as_slice() } else { bytes };
        let value: Value =
            serde_json::from_slice(text).map_err(|e| ConfigError::new("", format!("invalid JSON: {e}")))?;
        Self::from_value(&value)
    }

    pub fn from_value(value: &Value) -> Result<Config, ConfigError> {
        // A whole resource (`apiVersion`, `kind`, `metadata`, `spec`) or just its spec.
        let (spec, base) = match value.as_object() {
            Some(o) if o.contains_key("spec") || o.contains_key("kind") || o.contains_key("apiVersion") => {
                for k in o.keys() {
                    if !matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "spec" | "status") {
                        return Err(Path::root().field(k).err("unknown field of a Telemetry resource"));
                    }
                }
                if let Some(kind) = o.get("kind") {
                    if kind != "Telemetry" {
                        return Err(Path::root().field("kind").err(format!("must be \"Telemetry\", got {kind}")));
                    }
                }
                (o.get("spec").cloned().unwrap_or(Value::Object(Default::default())), Path::root().field("spec"))
            }
            _ => (value.clone(), Path::root()),
        };
        let raw: RawSpec = from_value(&spec).map_err(|e| e.within(base.as_str()))?;
        let _ = (&raw.selector, &raw.target_ref, &raw.target_refs);
        let providers = crate::observe::providers(raw.extension_providers.as_ref(), &base)?;
        let mut exporters = Vec::new();
        let access_log = crate::accesslog::AccessLogConfig::from_spec(
            raw.access_logging.as_ref(),
            &providers,
            &base,
            &mut exporters,
        )?;
        let tracing = crate::trace::TraceConfig::from_spec(raw.tracing.as_ref(), &providers, &base, &mut exporters)?;
        let reporter = match raw.reporter.as_deref() {
            None => None,
            Some("CLIENT") => Some(Reporter::Client),
            Some("SERVER") => Some(Reporter::Server),
            Some(other) => {
                return Err(base.field("reporter").err(format!("must be \"CLIENT\" or \"SERVER\", got {other:?}")))
            }
        };
        let max_series = match raw.max_series {
            None => None,
            Some(0) => return Err(base.field("maxSeries").err("must be at least 1")),
            Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        };
        let tcp_reporting_interval = raw.tcp_reporting_interval.unwrap_or(Duration::from_secs(5));
        if tcp_reporting_interval.is_zero() {
            return Err(base.field("tcpReportingInterval").err("must be positive"));
        }

        let standard = |m: Metric| Plan {
            enabled: true,
            tags: STANDARD_TAGS
                .iter()
                .enumerate()
                .take(m.standard_tag_count())
                .map(|(i, t)| ((*t).to_string(), Source::Standard(i)))
                .collect(),
        };
        let mut plans = [Metric::ALL.map(standard).to_vec(), Metric::ALL.map(standard).to_vec()];
        let mut exprs: Vec<Expr> = Vec::new();
        let mut expr_ids: BTreeMap<String, usize> = BTreeMap::new();

        for (mi, metrics) in raw.metrics.iter().enumerate() {
            let mpath = base.field("metrics").index(mi);
            let _ = &metrics.reporting_interval;
            if let Some(providers) = &metrics.providers {
                if !providers.iter().any(|p| PROVIDERS.contains(&p.name.as_str())) {
                    continue;
                }
            }
            for (oi, o) in metrics.overrides.iter().enumerate() {
                let opath = mpath.field("overrides").index(oi);
                let m = o.matches.as_ref();
                if m.and_then(|m| m.custom_metric.as_ref()).is_some() {
                    return Err(opath.field("match").field("customMetric").err("custom metrics are not supported"));
                }
                let metric = match m.and_then(|m| m.metric.as_deref()) {
                    None | Some("ALL_METRICS") => None,
                    Some(name) => match Metric::ALL.iter().find(|x| x.api_name() == name) {
                        Some(x) => Some(*x),
                        None => {
                            return Err(opath
                                .field("match")
                                .field("metric")
                                .err(format!("unknown metric {name:?} (ALL_METRICS, REQUEST_COUNT, REQUEST_DURATION, REQUEST_SIZE, RESPONSE_SIZE, GRPC_REQUEST_MESSAGES, GRPC_RESPONSE_MESSAGES, TCP_OPENED_CONNECTIONS, TCP_CLOSED_CONNECTIONS, TCP_SENT_BYTES, TCP_RECEIVED_BYTES)")))
                        }
                    },
                };
                let modes: &[Reporter] = match m.and_then(|m| m.mode.as_deref()) {
                    None | Some("CLIENT_AND_SERVER") => &[Reporter::Client, Reporter::Server],
                    Some("CLIENT") => &[Reporter::Client],
                    Some("SERVER") => &[Reporter::Server],
                    Some(other) => {
                        return Err(opath
                            .field("match")
                            .field("mode")
                            .err(format!("must be CLIENT_AND_SERVER, CLIENT or SERVER, got {other:?}")))
                    }
                };
                // Validate and compile the tag operations once.
                let mut ops: Vec<(String, Option<usize>)> = Vec::new();
                for (tag, t) in &o.tag_overrides {
                    let tpath = opath.field("tagOverrides").key(tag);
                    if !valid_label(tag) {
                        return Err(tpath.err("a tag name must match [a-z_][a-z0-9_]* (a Prometheus label name)"));
                    }
                    match t.operation.as_deref().unwrap_or("UPSERT") {
                        "REMOVE" => {
                            if t.value.is_some() {
                                return Err(tpath.field("value").err("must be empty for operation REMOVE"));
                            }
                            ops.push((tag.clone(), None));
                        }
                        "UPSERT" => {
                            let Some(src) = t.value.as_deref() else {
                                return Err(tpath.field("value").err("required for operation UPSERT"));
                            };
                            let id = match expr_ids.get(src) {
                                Some(id) => *id,
                                None => {
                                    let e = expr::parse(src)
                                        .map_err(|e| tpath.field("value").err(format!("does not parse: {e}")))?;
                                    exprs.push(e);
                                    expr_ids.insert(src.to_string(), exprs.len() - 1);
                                    exprs.len() - 1
                                }
                            };
                            ops.push((tag.clone(), Some(id)));
                        }
                        other => {
                            return Err(tpath
                                .field("operation")
                                .err(format!("must be UPSERT or REMOVE, got {other:?}")))
                        }
                    }
                }
                for r in modes {
                    let Some(per_metric) = plans.get_mut(r.index()) else { continue };
                    for (i, plan) in per_metric.iter_mut().enumerate() {
                        if metric.is_some_and(|x| x.index() != i) {
                            continue;
                        }
                        let base = Metric::ALL.get(i).map_or(25, |m| m.standard_tag_count());
                        if let Some(d) = o.disabled {
                            plan.enabled = !d;
                        }
                        for (tag, op) in &ops {
                            let at = plan.tags.iter().position(|(t, _)| t == tag);
                            match (op, at) {
                                (None, Some(at)) => {
                                    plan.tags.remove(at);
                                }
                                (None, None) => {}
                                (Some(id), Some(at)) => {
                                    if let Some(slot) = plan.tags.get_mut(at) {
                                        slot.1 = Source::Expr(*id);
                                    }
                                }
                                // As istio/proxy: a standard label the metric does not
                                // carry (`response_code` on a TCP metric) is not added;
                                // one removed by an earlier override comes back.
                                (Some(id), None) => match STANDARD_TAGS.iter().position(|t| t == tag) {
                                    Some(pos) if pos >= base => {}
                                    _ => plan.tags.push((tag.clone(), Source::Expr(*id))),
                                },
                            }
                        }
                    }
                }
            }
        }
        Ok(Config {
            reporter,
            disable_host_header_fallback: raw.disable_host_header_fallback,
            tcp_reporting_interval,
            tcp_metadata_exchange: raw.tcp_metadata_exchange,
            max_series,
            exprs,
            plans,
            access_log,
            tracing,
            exporters,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: Value) -> String {
        Config::from_value(&v).unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_istios_standard_labels() {
        let c = Config::from_json(b"").unwrap();
        assert_eq!(c.reporter, None);
        assert!(!c.disable_host_header_fallback);
        assert_eq!(c.tcp_reporting_interval, Duration::from_secs(5));
        let p = c.plan(Reporter::Client, Metric::RequestCount).unwrap();
        assert!(p.enabled);
        assert_eq!(p.tags.len(), 25);
        assert_eq!(c.plan(Reporter::Server, Metric::TcpSent).unwrap().tags.len(), 23);
        let g = c.plan(Reporter::Client, Metric::GrpcRequestMessages).unwrap();
        assert_eq!(g.tags.len(), 20);
        assert_eq!(g.tags.last().unwrap().0, "destination_cluster");
    }

    #[test]
    fn upserting_a_standard_label_a_metric_lacks_does_not_add_it() {
        let c = Config::from_value(&json!({"metrics": [{"overrides": [
            {"tagOverrides": {"response_code": {"value": "'x'"}, "extra": {"value": "'y'"},
                              "request_protocol": {"operation": "REMOVE"}}},
            {"match": {"metric": "TCP_SENT_BYTES"}, "tagOverrides": {"request_protocol": {"value": "'tcp2'"}}}
        ]}]}))
        .unwrap();
        let names = |m: Metric| -> Vec<String> {
            c.plan(Reporter::Client, m).unwrap().tags.iter().map(|(t, _)| t.clone()).collect()
        };
        let tcp = names(Metric::TcpSent);
        assert!(!tcp.contains(&"response_code".to_string()), "{tcp:?}");
        assert!(tcp.contains(&"extra".to_string()));
        assert!(tcp.contains(&"request_protocol".to_string()), "removed, then upserted again");
        assert!(!names(Metric::TcpOpened).contains(&"request_protocol".to_string()));
        let grpc = names(Metric::GrpcResponseMessages);
        assert_eq!(grpc.len(), 21, "{grpc:?}");
        assert!(names(Metric::RequestCount).contains(&"response_code".to_string()));
    }

    #[test]
    fn overrides_apply_in_order_per_metric_and_mode() {
        let c = Config::from_value(&json!({"metrics": [{"overrides": [
            {"tagOverrides": {"response_flags": {"operation": "REMOVE"}, "source_principal": {"operation": "REMOVE"}}},
            {"match": {"metric": "REQUEST_COUNT", "mode": "CLIENT"},
             "tagOverrides": {"configurable_metric_a": {"value": "'gateway'"}, "request_protocol": {"value": "request.protocol"}}},
            {"match": {"metric": "REQUEST_DURATION"}, "disabled": true},
            {"tagOverrides": {"source_principal": {"value": "'malicious'"}}}
        ]}]}))
        .unwrap();
        let p = c.plan(Reporter::Client, Metric::RequestCount).unwrap();
        let names: Vec<&str> = p.tags.iter().map(|(t, _)| t.as_str()).collect();
        assert!(!names.contains(&"response_flags"));
        assert!(names.contains(&"configurable_metric_a"));
        assert_eq!(p.tags.iter().find(|(t, _)| t == "source_principal").unwrap().1, Source::Expr(2));
        let s = c.plan(Reporter::Server, Metric::RequestCount).unwrap();
        assert!(!s.tags.iter().any(|(t, _)| t == "configurable_metric_a"), "mode CLIENT only");
        assert!(!c.plan(Reporter::Client, Metric::RequestDuration).unwrap().enabled);
        assert!(c.plan(Reporter::Client, Metric::RequestSize).unwrap().enabled);
        assert_eq!(c.exprs.len(), 3);
    }

    #[test]
    fn resource_wrapper_and_errors_name_the_path() {
        let c = Config::from_value(&json!({"apiVersion": "telemetry.istio.io/v1", "kind": "Telemetry",
            "metadata": {"name": "x"}, "spec": {"maxSeries": 5}}))
        .unwrap();
        assert_eq!(c.max_series, Some(5));
        assert_eq!(err(json!({"kind": "Sidecar"})), "kind: must be \"Telemetry\", got \"Sidecar\"");
        assert_eq!(
            err(json!({"metrics": [{"overrides": [{"tagOverrides": {"destination_app": {"value": "cannot _ parse | 1"}}}]}]})),
            "metrics[0].overrides[0].tagOverrides.destination_app.value: does not parse: at 15: unexpected character '|'"
        );
        assert!(err(json!({"metrics": [{"overrides": [{"match": {"metric": "NOPE"}}]}]}))
            .starts_with("metrics[0].overrides[0].match.metric: unknown metric"));
        assert!(err(json!({"metrics": [{"overrides": [{"match": {"mode": "BOTH"}}]}]})).contains("match.mode"));
        assert!(err(json!({"metrics": [{"overrides": [{"tagOverrides": {"Bad-Name": {"value": "'x'"}}}]}]}))
            .contains("Prometheus label"));
        assert!(err(json!({"metrics": [{"overrides": [{"tagOverrides": {"a": {}}}]}]})).contains("required"));
        assert!(err(json!({"maxSeries": 0})).starts_with("maxSeries"));
        assert!(err(json!({"spec": {"tracing": [{"randomSamplingPercentage": 1}]}}))
            .starts_with("spec.tracing[0].providers"));
        assert!(err(json!({"accessLogging": [{"providers": [{"name": "nope"}]}]}))
            .starts_with("accessLogging[0].providers[0].name: no extensionProviders entry named \"nope\""));
        assert!(err(json!({"metricz": []})).contains("metricz"));
        assert!(err(json!({"reporter": "GATEWAY"})).starts_with("reporter"));
        // A metrics entry for another provider does not apply.
        let c = Config::from_value(&json!({"metrics": [{"providers": [{"name": "stackdriver"}],
            "overrides": [{"disabled": true}]}]}))
        .unwrap();
        assert!(c.plan(Reporter::Client, Metric::RequestCount).unwrap().enabled);
    }
}
