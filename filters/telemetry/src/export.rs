//! Batched export to collectors over HTTP (OTLP/HTTP JSON), from the root context.
//!
//! Streams push finished items (a log record's OTLP JSON) into a bounded per-worker queue;
//! past `maxQueue` an item is dropped and counted. The root context's tick sends up to
//! `maxBatch` items in one `proxy_http_call` to the provider's cluster, one call in flight per
//! exporter; while items remain, the next tick comes at once. A failed or refused export
//! (no answer, non-2xx) loses its batch, counted. Nothing here blocks a stream.
//!
//! Stats per provider (Prometheus `meshwasm_telemetry_export_*`, `provider` in the name):
//! `records_sent`, `records_dropped` (queue full), `records_failed` (batch lost),
//! `batches_sent`.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

use meshwasm_sdk_ext::config::Path;
use meshwasm_sdk_ext::obj::Obj;
use meshwasm_sdk_ext::{ConfigError, Host, HttpCall, HttpReply, LogLevel, MetricKind};

use crate::accesslog::push_json_str;

/// Istio's `http` block of an OTLP provider (`path`, `timeout`, `headers`).
#[derive(Default)]
pub struct RawHttp {
    pub path: Option<String>,
    pub timeout: Option<Duration>,
    pub headers: Vec<(String, String)>,
}

impl RawHttp {
    pub fn parse(v: Option<&Value>, at: &Path) -> Result<Option<RawHttp>, ConfigError> {
        let Some(v) = v else { return Ok(None) };
        let o = Obj::new(v, at, "struct Http", &["path", "timeout", "headers"])?;
        let mut headers = Vec::new();
        for (p, h) in o.list("headers")? {
            let h = Obj::new(h, &p, "struct Header", &["name", "value"])?;
            headers.push((h.str("name")?.to_ascii_lowercase(), h.str("value")?.to_string()));
        }
        Ok(Some(RawHttp {
            path: o.opt_string("path")?,
            timeout: crate::observe::opt_duration(&o, "timeout")?,
            headers,
        }))
    }
}

/// meshwasm: the batching of one exporter (`maxQueue`, `maxBatch`, `flushInterval`).
#[derive(Default)]
pub struct RawBatch {
    max_queue: Option<u64>,
    max_batch: Option<u64>,
    flush_interval: Option<Duration>,
}

impl RawBatch {
    pub fn parse(v: Option<&Value>, at: &Path) -> Result<Option<RawBatch>, ConfigError> {
        let Some(v) = v else { return Ok(None) };
        let o = Obj::new(v, at, "struct Batch", &["maxQueue", "maxBatch", "flushInterval"])?;
        Ok(Some(RawBatch {
            max_queue: o.opt_u64("maxQueue")?,
            max_batch: o.opt_u64("maxBatch")?,
            flush_interval: crate::observe::opt_duration(&o, "flushInterval")?,
        }))
    }
}

pub const DEFAULT_MAX_QUEUE: usize = 2048;
pub const DEFAULT_MAX_BATCH: usize = 256;
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// What an exporter sends, and how a batch is wrapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// OTLP `ExportLogsServiceRequest` (JSON); items are `LogRecord`s.
    OtlpLogs { log_name: String },
    /// OTLP `ExportTraceServiceRequest` (JSON); items are `Span`s.
    OtlpTraces,
    /// Zipkin v2 JSON: a list of spans.
    Zipkin,
}

/// A provider's Envoy cluster: `cluster`, else Istio's `outbound|<port>||<service>`; and the
/// `:authority` of its calls (`service`, else the cluster).
pub fn cluster_of(o: &Obj<'_>) -> Result<(String, String), ConfigError> {
    let service = o.opt_string("service")?;
    let port = o.opt_u64("port")?;
    let cluster = match (o.opt_string("cluster")?, &service, port) {
        (Some(c), _, _) => c,
        (None, Some(s), Some(p)) => format!("outbound|{p}||{s}"),
        _ => return Err(o.path("cluster").err("needs `cluster`, or `service` and `port`")),
    };
    let authority = service.unwrap_or_else(|| cluster.clone());
    Ok((cluster, authority))
}

#[derive(Debug)]
pub struct ExporterConfig {
    pub name: String,
    pub kind: Kind,
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub timeout: Duration,
    pub headers: Vec<(String, String)>,
    pub max_queue: usize,
    pub max_batch: usize,
    pub flush_interval: Duration,
}

impl ExporterConfig {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        kind: Kind,
        cluster: String,
        authority: String,
        default_path: &str,
        http: Option<&RawHttp>,
        batch: Option<&RawBatch>,
        at: &Path,
    ) -> Result<ExporterConfig, ConfigError> {
        let path = http.and_then(|h| h.path.clone()).unwrap_or_else(|| default_path.to_string());
        if !path.starts_with('/') {
            return Err(at.field("http").field("path").err("must start with `/`"));
        }
        let timeout = http.and_then(|h| h.timeout).unwrap_or(DEFAULT_TIMEOUT);
        if timeout.is_zero() {
            return Err(at.field("http").field("timeout").err("must be positive"));
        }
        let size = |v: Option<u64>, d: usize| v.map_or(d, |n| usize::try_from(n).unwrap_or(usize::MAX));
        let max_queue = size(batch.and_then(|b| b.max_queue), DEFAULT_MAX_QUEUE);
        let max_batch = size(batch.and_then(|b| b.max_batch), DEFAULT_MAX_BATCH);
        let flush_interval = batch.and_then(|b| b.flush_interval).unwrap_or(DEFAULT_FLUSH_INTERVAL);
        if max_queue == 0 {
            return Err(at.field("batch").field("maxQueue").err("must be at least 1"));
        }
        if max_batch == 0 {
            return Err(at.field("batch").field("maxBatch").err("must be at least 1"));
        }
        if flush_interval < Duration::from_millis(10) {
            return Err(at.field("batch").field("flushInterval").err("must be at least 10ms"));
        }
        Ok(ExporterConfig {
            name: name.to_string(),
            kind,
            cluster,
            authority,
            path,
            timeout,
            headers: http.map(|h| h.headers.clone()).unwrap_or_default(),
            max_queue,
            max_batch,
            flush_interval,
        })
    }
}

#[derive(Default)]
struct Ids {
    sent: Option<u32>,
    dropped: Option<u32>,
    failed: Option<u32>,
    batches: Option<u32>,
}

/// One exporter's queue and in-flight call (per worker VM).
pub struct Exporter {
    pub config: ExporterConfig,
    queue: RefCell<VecDeque<String>>,
    /// Token and size of the batch in flight.
    in_flight: Cell<Option<(u32, usize)>>,
    ids: RefCell<Ids>,
}

pub fn stat_name(provider: &str, stat: &str) -> String {
    format!("meshwasm.telemetry.export.{}.{stat}", meshwasm_sdk_ext::metrics::sanitize_label(provider))
}

impl Exporter {
    pub fn new(config: ExporterConfig) -> Self {
        Self { config, queue: RefCell::default(), in_flight: Cell::new(None), ids: RefCell::default() }
    }

    /// Define the stats (so they show at 0 from the start).
    pub fn define_stats(&self, host: &dyn Host) {
        let d = |s| meshwasm_sdk_ext::metrics::define(host, MetricKind::Counter, &stat_name(&self.config.name, s));
        *self.ids.borrow_mut() = Ids {
            sent: d("records_sent"),
            dropped: d("records_dropped"),
            failed: d("records_failed"),
            batches: d("batches_sent"),
        };
    }

    fn count(&self, host: &dyn Host, which: fn(&Ids) -> Option<u32>, n: usize) {
        if let Some(id) = which(&self.ids.borrow()) {
            let _ = host.increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub fn queued(&self) -> usize {
        self.queue.borrow().len()
    }

    /// Queue one item; drops (and counts) it when the queue is full.
    pub fn push(&self, host: &dyn Host, item: String) {
        let mut q = self.queue.borrow_mut();
        if q.len() >= self.config.max_queue {
            drop(q);
            self.count(host, |i| i.dropped, 1);
            return;
        }
        q.push_back(item);
    }

    /// Send one batch if there is something to send and nothing in flight. `resource` is
    /// the OTLP resource's attributes JSON (`[{"key":…}]`).
    pub fn flush(&self, host: &dyn Host, resource: &str) {
        if self.in_flight.get().is_some() {
            return;
        }
        let items: Vec<String> = {
            let mut q = self.queue.borrow_mut();
            let n = q.len().min(self.config.max_batch);
            q.drain(..n).collect()
        };
        if items.is_empty() {
            return;
        }
        let body = self.envelope(resource, &items);
        let mut headers = vec![
            (":method".to_string(), "POST".to_string()),
            (":path".to_string(), self.config.path.clone()),
            (":authority".to_string(), self.config.authority.clone()),
            ("content-type".to_string(), "application/json".to_string()),
        ];
        headers.extend(self.config.headers.iter().cloned());
        let call = HttpCall {
            cluster: &self.config.cluster,
            headers: &headers,
            body: body.as_bytes(),
            timeout: self.config.timeout,
        };
        match host.http_call(&call) {
            Ok(token) => self.in_flight.set(Some((token, items.len()))),
            Err(e) => {
                host.log(
                    LogLevel::Warn,
                    &format!(
                        "meshwasm.telemetry: export to {} (cluster {}) failed to start: {e}",
                        self.config.name, self.config.cluster
                    ),
                );
                self.count(host, |i| i.failed, items.len());
            }
        }
    }

    /// The reply of a call; `false` if the token is not this exporter's.
    pub fn on_reply(&self, host: &dyn Host, token: u32, reply: &HttpReply) -> bool {
        let Some((t, n)) = self.in_flight.get() else { return false };
        if t != token {
            return false;
        }
        self.in_flight.set(None);
        let ok = matches!(reply, HttpReply::Response(r) if r.status().is_some_and(|s| (200..300).contains(&s)));
        if ok {
            self.count(host, |i| i.sent, n);
            self.count(host, |i| i.batches, 1);
        } else {
            let status = match reply {
                HttpReply::Response(r) => r.status().map_or_else(|| "no status".to_string(), |s| s.to_string()),
                HttpReply::Failed => "no response".to_string(),
            };
            host.log(LogLevel::Debug, &format!("meshwasm.telemetry: export to {} failed: {status}", self.config.name));
            self.count(host, |i| i.failed, n);
        }
        true
    }

    fn envelope(&self, resource: &str, items: &[String]) -> String {
        let mut s = String::with_capacity(items.iter().map(String::len).sum::<usize>() + 256);
        match &self.config.kind {
            Kind::OtlpLogs { log_name } => {
                s.push_str("{\"resourceLogs\":[{\"resource\":{\"attributes\":");
                s.push_str(resource);
                s.push_str("},\"scopeLogs\":[{\"scope\":{\"name\":");
                push_json_str(&mut s, log_name);
                s.push_str("},\"logRecords\":[");
                join(&mut s, items);
                s.push_str("]}]}]}");
            }
            Kind::OtlpTraces => {
                s.push_str("{\"resourceSpans\":[{\"resource\":{\"attributes\":");
                s.push_str(resource);
                s.push_str("},\"scopeSpans\":[{\"scope\":{\"name\":\"meshwasm.telemetry\"},\"spans\":[");
                join(&mut s, items);
                s.push_str("]}]}]}");
            }
            Kind::Zipkin => {
                s.push('[');
                join(&mut s, items);
                s.push(']');
            }
        }
        s
    }
}

fn join(s: &mut String, items: &[String]) {
    for (i, it) in items.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(it);
    }
}

/// OTLP attributes JSON (`[{"key":"k","value":{"stringValue":"v"}}]`) from string pairs.
pub fn otlp_attributes(pairs: &[(&str, &str)]) -> String {
    let mut s = String::from("[");
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str("{\"key\":");
        push_json_str(&mut s, k);
        s.push_str(",\"value\":{\"stringValue\":");
        push_json_str(&mut s, v);
        s.push_str("}}");
    }
    s.push(']');
    s
}

/// This proxy as an OTLP resource: `service.name` (canonical service, else workload),
/// `k8s.namespace.name`, `k8s.pod.name`, `node_name` (Envoy's node id, as Envoy's OTel logger).
pub fn resource_attributes(local: &crate::peer::Workload, node_id: &str) -> String {
    let service = [&local.canonical_service, &local.workload, &local.app]
        .into_iter()
        .find(|s| !s.is_empty())
        .map_or("unknown", String::as_str);
    let mut pairs: Vec<(&str, &str)> = vec![("service.name", service)];
    if !local.namespace.is_empty() {
        pairs.push(("k8s.namespace.name", &local.namespace));
    }
    if !local.name.is_empty() {
        pairs.push(("k8s.pod.name", &local.name));
    }
    if !node_id.is_empty() {
        pairs.push(("node_name", node_id));
    }
    otlp_attributes(&pairs)
}

/// All exporters of one plugin (worker VM).
#[derive(Default)]
pub struct Exporters {
    pub list: Vec<Exporter>,
    /// OTLP resource attributes of this proxy.
    pub resource: String,
}

impl Exporters {
    pub fn new(configs: Vec<ExporterConfig>, resource: String) -> Self {
        Self { list: configs.into_iter().map(Exporter::new).collect(), resource }
    }

    /// The root tick: flush every exporter; the next tick after the shortest interval, or at
    /// once while a full batch waits.
    pub fn tick(&self, host: &dyn Host) -> Option<Duration> {
        if self.list.is_empty() {
            return None;
        }
        for e in &self.list {
            e.flush(host, &self.resource);
        }
        Some(self.next(host))
    }

    fn next(&self, _host: &dyn Host) -> Duration {
        let backlog = self.list.iter().any(|e| e.in_flight.get().is_none() && e.queued() >= e.config.max_batch);
        if backlog {
            return Duration::from_millis(1);
        }
        self.list.iter().map(|e| e.config.flush_interval).min().unwrap_or(DEFAULT_FLUSH_INTERVAL)
    }

    pub fn on_reply(&self, host: &dyn Host, token: u32, reply: &HttpReply) -> Option<Duration> {
        let mine = self.list.iter().any(|e| e.on_reply(host, token, reply));
        if !mine {
            host.log(LogLevel::Debug, &format!("meshwasm.telemetry: reply for unknown call {token}"));
        }
        // A backlog waiting behind this call goes out now.
        self.list.iter().any(|e| e.queued() >= e.config.max_batch).then_some(Duration::from_millis(1))
    }
}

/// OTLP JSON of one log record: times, severity, the record as the body, the fields as
/// attributes.
pub fn otlp_log_record(
    time_unix_nanos: u64,
    observed_unix_nanos: u64,
    body: &str,
    fields: &[(&str, crate::accesslog::Out)],
) -> String {
    use crate::accesslog::Out;
    let mut s = String::with_capacity(body.len() * 2 + 128);
    let _ = write!(
        s,
        "{{\"timeUnixNano\":\"{time_unix_nanos}\",\"observedTimeUnixNano\":\"{observed_unix_nanos}\",\"severityNumber\":9,\"severityText\":\"INFO\",\"body\":{{\"stringValue\":"
    );
    push_json_str(&mut s, body);
    s.push_str("},\"attributes\":[");
    let mut first = true;
    for (k, v) in fields {
        let value = match v {
            Out::Str(x) => {
                let mut t = String::from("{\"stringValue\":");
                push_json_str(&mut t, x);
                t.push('}');
                t
            }
            Out::Int(n) => format!("{{\"intValue\":\"{n}\"}}"),
            Out::Null => continue,
        };
        if !first {
            s.push(',');
        }
        first = false;
        s.push_str("{\"key\":");
        push_json_str(&mut s, k);
        s.push_str(",\"value\":");
        s.push_str(&value);
        s.push('}');
    }
    s.push_str("]}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshwasm_sdk_ext::fake::{http_reply, FakeHost};
    use serde_json::Value;

    fn exporter(max_queue: usize, max_batch: usize) -> Exporter {
        let mut c = ExporterConfig::new(
            "otel",
            Kind::OtlpLogs { log_name: "n".into() },
            "collector".into(),
            "collector".into(),
            "/v1/logs",
            None,
            None,
            &Path::root(),
        )
        .unwrap();
        c.max_queue = max_queue;
        c.max_batch = max_batch;
        Exporter::new(c)
    }

    #[test]
    fn bounded_queue_batches_and_counts() {
        let h = FakeHost::new();
        let e = exporter(3, 2);
        e.define_stats(&h);
        for i in 0..5 {
            e.push(&h, format!("{{\"i\":{i}}}"));
        }
        assert_eq!(e.queued(), 3);
        assert_eq!(h.metric_value(&stat_name("otel", "records_dropped")), 2);
        e.flush(&h, "[]");
        e.flush(&h, "[]"); // one in flight at a time
        assert_eq!(h.http_calls.borrow().len(), 1);
        let call = h.http_calls.borrow()[0].clone();
        assert_eq!(call.cluster, "collector");
        assert_eq!(call.header(":path"), Some("/v1/logs"));
        let body: Value = serde_json::from_slice(&call.body).unwrap();
        assert_eq!(body["resourceLogs"][0]["scopeLogs"][0]["logRecords"].as_array().unwrap().len(), 2);
        assert!(!e.on_reply(&h, call.token + 100, &http_reply("200", &[], "")), "not its token");
        assert!(e.on_reply(&h, call.token, &http_reply("200", &[], "")));
        assert_eq!(h.metric_value(&stat_name("otel", "records_sent")), 2);
        e.flush(&h, "[]");
        let call = h.http_calls.borrow()[1].clone();
        assert!(e.on_reply(&h, call.token, &HttpReply::Failed));
        assert_eq!(h.metric_value(&stat_name("otel", "records_failed")), 1);
        assert_eq!(e.queued(), 0);
    }

    #[test]
    fn config_errors_name_the_path() {
        let at = Path::root().field("extensionProviders").index(0).field("envoyOtelAls");
        let http = RawHttp::parse(Some(&serde_json::json!({"path": "v1/logs"})), &at.field("http")).unwrap().unwrap();
        let e = ExporterConfig::new(
            "x",
            Kind::OtlpLogs { log_name: "x".into() },
            "c".into(),
            "c".into(),
            "/v1/logs",
            Some(&http),
            None,
            &at,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "extensionProviders[0].envoyOtelAls.http.path: must start with `/`");
    }

    #[test]
    fn log_record_json_is_otlp() {
        use crate::accesslog::Out;
        let r =
            otlp_log_record(5, 6, "{\"a\":1}", &[("a", Out::Int(1)), ("b", Out::Str("x\"".into())), ("c", Out::Null)]);
        let v: Value = serde_json::from_str(&r).unwrap();
        assert_eq!(v["timeUnixNano"], "5");
        assert_eq!(v["body"]["stringValue"], "{\"a\":1}");
        assert_eq!(v["attributes"][0]["value"]["intValue"], "1");
        assert_eq!(v["attributes"][1]["value"]["stringValue"], "x\"");
        assert_eq!(v["attributes"].as_array().unwrap().len(), 2);
    }
}
