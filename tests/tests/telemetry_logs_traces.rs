//! Access logs through a real Envoy: the record `telemetry.wasm` builds in the log phase,
//! printed by Envoy's native file logger from filter state (the ordering proven for every
//! request), compared field by field with what Envoy's own formatter prints for Istio's
//! default JSON format, filtered by `accessLogging` expressions, and exported in batches over
//! OTLP/HTTP JSON to a real collector that parses it with the OpenTelemetry model, strictly.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use meshwasm_tests::collector::{self, Collector};
use meshwasm_tests::{eventually, Envoy, Filter, Listener, Request, Upstream};

const WAIT: Duration = Duration::from_secs(20);

/// Istio's default JSON access log format (`EnvoyJSONLogFormatIstio`), for Envoy's native
/// logger: the reference the filter's record is compared with.
fn istio_json_format() -> Value {
    json!({
        "start_time": "%START_TIME%",
        "route_name": "%ROUTE_NAME%",
        "method": "%REQ(:METHOD)%",
        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "protocol": "%PROTOCOL%",
        "response_code": "%RESPONSE_CODE%",
        "response_flags": "%RESPONSE_FLAGS%",
        "response_code_details": "%RESPONSE_CODE_DETAILS%",
        "connection_termination_details": "%CONNECTION_TERMINATION_DETAILS%",
        "upstream_transport_failure_reason": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
        "bytes_received": "%BYTES_RECEIVED%",
        "bytes_sent": "%BYTES_SENT%",
        "duration": "%DURATION%",
        "upstream_service_time": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
        "x_forwarded_for": "%REQ(X-FORWARDED-FOR)%",
        "user_agent": "%REQ(USER-AGENT)%",
        "request_id": "%REQ(X-REQUEST-ID)%",
        "authority": "%REQ(:AUTHORITY)%",
        "upstream_host": "%UPSTREAM_HOST%",
        "upstream_cluster": "%UPSTREAM_CLUSTER%",
        "upstream_local_address": "%UPSTREAM_LOCAL_ADDRESS%",
        "downstream_local_address": "%DOWNSTREAM_LOCAL_ADDRESS%",
        "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
        "requested_server_name": "%REQUESTED_SERVER_NAME%",
    })
}

fn temp_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let d = std::env::temp_dir().join(format!("meshwasm-logs-{tag}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// A native file logger writing `format` (text) to `path`.
fn file_logger_text(path: &Path, text: &str) -> Value {
    json!({"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": path.display().to_string(),
        "log_format": {"text_format_source": {"inline_string": text}}}})
}

fn file_logger_json(path: &Path, format: Value) -> Value {
    json!({"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": path.display().to_string(),
        "log_format": {"json_format": format}}})
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_string).collect()
}

/// Wait until `path` holds `n` lines (Envoy flushes access log files every second).
fn wait_lines(path: &Path, n: usize) -> Vec<String> {
    eventually(&format!("{n} lines in {}", path.display()), WAIT, || {
        let l = lines(path);
        (l.len() >= n).then_some(l)
    })
}

fn envoy_with_logs(config: Value, loggers: Vec<Value>, upstream: &Upstream, concurrency: u32) -> Envoy {
    Envoy::builder()
        .upstream(upstream.addr())
        .concurrency(concurrency)
        .listener(
            Listener::new()
                .filter(Filter::wasm("telemetry", config))
                .hcm_option("access_log", &Value::Array(loggers).to_string()),
        )
        .start()
}

/// The filter's record for the built-in `envoy` provider, printed by a native logger.
const RECORD: &str = "%FILTER_STATE(wasm.meshwasm.access_log.envoy:PLAIN)%\n";

#[test]
fn native_file_logger_prints_the_record_of_every_request_and_it_matches_envoys_own_fields() {
    let upstream = Upstream::start();
    let dir = temp_dir("diff");
    let (records, native) = (dir.join("records.log"), dir.join("native.log"));
    let mut reference = istio_json_format();
    reference["meshwasm"] = json!("%FILTER_STATE(wasm.meshwasm.access_log.envoy:PLAIN)%");
    let envoy = envoy_with_logs(
        json!({"reporter": "SERVER", "accessLogging": [{"providers": [{"name": "envoy"}]}]}),
        vec![file_logger_text(&records, RECORD), file_logger_json(&native, reference)],
        &upstream,
        2,
    );

    // Varied requests: methods, escaped paths, statuses, bodies, HTTP/1.1 and HTTP/2, header
    // values with quotes, backslashes, tabs and non-ASCII (JSON escaping).
    let mut sent = BTreeSet::new();
    for i in 0..40u32 {
        let id = format!("req-{i}-\"quoted\"\\");
        let mut req = match i % 4 {
            0 => Request::get(&format!("/a/{i}?q=%22x%22&u=%C3%A9&b=\\")),
            1 => Request::post(&format!("/post/{i}"), vec![b'x'; (i as usize) * 7]),
            2 => Request::get(&format!("/status/{i}"))
                .header("x-upstream-status", if i % 8 == 2 { "503" } else { "404" }),
            _ => Request::get(&format!("/h2/{i}")).h2(),
        };
        req = req
            .header("x-request-id", &id)
            .header("user-agent", &format!("agent/{i}\ttab \"ü\""))
            .header("x-forwarded-for", "203.0.113.7");
        let resp = envoy.send(req);
        assert!(resp.status > 0);
        sent.insert(id);
    }

    // Ordering: the native logger saw, for every request, the record the Wasm log phase of
    // that same request wrote (a logger running first would print `-`).
    let recs = wait_lines(&records, sent.len());
    let mut seen = BTreeSet::new();
    for line in &recs {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("record is not JSON ({e}): {line}"));
        assert_eq!(v.as_object().map(|o| o.len()), Some(24), "Istio's 24 fields: {line}");
        seen.insert(v["request_id"].as_str().unwrap_or_else(|| panic!("request_id in {line}")).to_string());
    }
    assert_eq!(seen, sent, "one record per request, each in its own request's log line");

    // Field by field, the record equals what Envoy's own formatter prints for Istio's format.
    let natives = wait_lines(&native, sent.len());
    eprintln!("a native line, with the record: {}", natives[0]);
    for line in &natives {
        let mut n: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("native line ({e}): {line}"));
        let record: Value = serde_json::from_str(n["meshwasm"].as_str().unwrap_or_else(|| panic!("no record: {line}")))
            .expect("record JSON");
        n.as_object_mut().expect("object").remove("meshwasm");
        let native: BTreeMap<String, Value> = serde_json::from_value(n).expect("map");
        let ours: BTreeMap<String, Value> = serde_json::from_value(record).expect("map");
        assert_eq!(ours.keys().collect::<Vec<_>>(), native.keys().collect::<Vec<_>>());
        for (k, v) in &native {
            assert_eq!(&ours[k], v, "field {k}: ours {} vs Envoy's {v}\nnative: {line}", ours[k]);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn filter_expression_mode_disabled_and_classic_fields() {
    let upstream = Upstream::start();
    let dir = temp_dir("filter");
    let (errors, classic, off) = (dir.join("errors.log"), dir.join("classic.log"), dir.join("off.log"));
    let config = json!({"reporter": "SERVER",
        "accessLogging": [
            {"providers": [{"name": "errors"}], "filter": {"expression": "response.code >= 400 && request.headers['x-log'] != 'no'"}},
            {"providers": [{"name": "classic"}]},
            {"match": {"mode": "SERVER"}, "providers": [{"name": "off"}], "disabled": true},
            {"match": {"mode": "CLIENT"}, "providers": [{"name": "envoy"}]}],
        "extensionProviders": [
            {"name": "errors", "envoyFileAccessLog": {"path": "/dev/stdout"}},
            {"name": "classic", "envoyFileAccessLog": {"logFormat": {"preset": "classic"}}},
            {"name": "off", "envoyFileAccessLog": {}}]});
    let envoy = envoy_with_logs(
        config,
        vec![
            file_logger_text(&errors, "%REQ(X-REQUEST-ID)% %FILTER_STATE(wasm.meshwasm.access_log.errors:PLAIN)%\n"),
            file_logger_text(&classic, "%FILTER_STATE(wasm.meshwasm.access_log.classic:PLAIN)%\n"),
            file_logger_text(&off, "%REQ(X-REQUEST-ID)% %FILTER_STATE(wasm.meshwasm.access_log.off:PLAIN)% %FILTER_STATE(wasm.meshwasm.access_log.envoy:PLAIN)%\n"),
        ],
        &upstream,
        1,
    );
    let cases = [("a", "200", "yes"), ("b", "503", "yes"), ("c", "404", "no"), ("d", "429", "yes")];
    for (id, status, log) in cases {
        let r = envoy.send(
            Request::get("/x").header("x-request-id", id).header("x-upstream-status", status).header("x-log", log),
        );
        assert_eq!(r.status.to_string(), status);
    }
    let got: BTreeMap<String, String> = wait_lines(&errors, cases.len())
        .iter()
        .map(|l| {
            let (id, rec) = l.split_once(' ').expect("id record");
            (id.to_string(), rec.to_string())
        })
        .collect();
    assert_eq!(got["a"], "-", "200 filtered out");
    assert_eq!(got["c"], "-", "x-log: no filtered out");
    for id in ["b", "d"] {
        let v: Value = serde_json::from_str(&got[id]).expect("record");
        assert_eq!(v["request_id"], id);
    }
    // disabled, and an entry for the other mode: nothing.
    for l in wait_lines(&off, cases.len()) {
        assert!(l.ends_with(" - -"), "{l}");
    }
    // The classic set, as Istio's Mixer-era access log named it.
    for l in wait_lines(&classic, cases.len()) {
        let v: Value = serde_json::from_str(&l).expect("classic record");
        for k in [
            "connection_security_policy",
            "destinationApp",
            "destinationIp",
            "destinationName",
            "destinationNamespace",
            "destinationPrincipal",
            "destinationServiceHost",
            "destinationWorkload",
            "httpAuthority",
            "latency",
            "method",
            "protocol",
            "requestId",
            "requestedServerName",
            "responseCode",
            "responseFlags",
            "sourceApp",
            "sourceIp",
            "sourceName",
            "sourceNamespace",
            "sourcePrincipal",
            "sourceWorkload",
            "url",
            "userAgent",
            "xForwardedFor",
        ] {
            assert!(v.get(k).is_some(), "{k} in {l}");
        }
        assert_eq!(v["reporter"], "destination");
        assert_eq!(v["sourceIp"], "127.0.0.1");
        assert_eq!(v["destinationIp"], "127.0.0.1");
        assert_eq!(v["connection_security_policy"], "none");
        assert_eq!(v["url"], "/x");
        assert!(v["latency"].as_str().is_some_and(|s| s.ends_with('s')), "Go duration: {l}");
        let id = v["requestId"].as_str().expect("id");
        let status: i64 = cases.iter().find(|c| c.0 == id).expect("case").1.parse().expect("status");
        assert_eq!(v["responseCode"], status);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn otel_config(max_queue: usize, flush: &str) -> Value {
    json!({"reporter": "SERVER",
        "accessLogging": [{"providers": [{"name": "otel"}]}],
        "extensionProviders": [{"name": "otel", "envoyOtelAls": {"cluster": "collector", "logName": "access",
            "http": {"headers": [{"name": "x-tenant", "value": "t1"}]},
            "batch": {"maxQueue": max_queue, "maxBatch": 16, "flushInterval": flush}}}]})
}

fn envoy_with_collector(config: Value, upstream: &Upstream, collector: &Collector) -> Envoy {
    Envoy::builder()
        .upstream(upstream.addr())
        .concurrency(2)
        .http_cluster("collector", collector.addr())
        .listener(Listener::new().filter(Filter::wasm("telemetry", config)))
        .start()
}

const SENT: &str = "wasmcustom.meshwasm.telemetry.export.otel.records_sent";
const DROPPED: &str = "wasmcustom.meshwasm.telemetry.export.otel.records_dropped";
const FAILED: &str = "wasmcustom.meshwasm.telemetry.export.otel.records_failed";

#[test]
fn otlp_http_export_in_batches_parsed_strictly_by_the_otel_model() {
    let upstream = Upstream::start();
    let collector = Collector::start();
    let envoy = envoy_with_collector(otel_config(1000, "0.1s"), &upstream, &collector);
    let n = 60u32;
    for i in 0..n {
        let r = envoy.send(Request::get(&format!("/otel/{i}")).header("x-request-id", &format!("otel-{i}")));
        assert_eq!(r.status, 200);
    }
    let records = eventually("every record at the collector", WAIT, || {
        let r = collector.log_records();
        (r.len() >= n as usize).then_some(r)
    });
    assert_eq!(records.len(), n as usize, "each record exactly once");
    let ids: BTreeSet<String> =
        records.iter().map(|r| collector::attribute(&r.attributes, "request_id").expect("request_id")).collect();
    assert_eq!(ids, (0..n).map(|i| format!("otel-{i}")).collect());
    for r in &records {
        let body: Value = serde_json::from_str(collector::body_string(r).expect("string body")).expect("JSON body");
        assert_eq!(
            Some(body["request_id"].as_str().expect("id").to_string()),
            collector::attribute(&r.attributes, "request_id")
        );
        assert_eq!(collector::attribute(&r.attributes, "response_code").as_deref(), Some("200"));
        assert_eq!(collector::attribute(&r.attributes, "method").as_deref(), Some("GET"));
        assert!(r.time_unix_nano > 1_600_000_000_000_000_000 && r.observed_time_unix_nano >= r.time_unix_nano);
        assert_eq!(r.severity_number, 9);
    }
    let exports = collector.otlp_logs();
    assert!(exports.len() < n as usize, "batched: {} exports for {n} records", exports.len());
    for e in &exports {
        let rl = &e.resource_logs[0];
        assert_eq!(rl.scope_logs[0].scope.as_ref().map(|s| s.name.as_str()), Some("access"));
        assert!(rl.resource.as_ref().is_some_and(|r| collector::attribute(&r.attributes, "service.name").is_some()));
    }
    for r in collector.received("/v1/logs") {
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("x-tenant"), Some("t1"));
    }
    eventually("records_sent", WAIT, || (envoy.stat_or_zero(SENT) == u64::from(n)).then_some(()));
    assert_eq!(envoy.stat_or_zero(DROPPED), 0);
    assert_eq!(envoy.stat_or_zero(FAILED), 0);
}

#[test]
fn export_queue_is_bounded_and_failures_are_counted() {
    let upstream = Upstream::start();
    let collector = Collector::start();
    // A long flush interval: nothing leaves during the burst, so the queue (5 per worker)
    // overflows and the rest is dropped and counted.
    let envoy = envoy_with_collector(otel_config(5, "60s"), &upstream, &collector);
    for i in 0..30 {
        envoy.send(Request::get(&format!("/burst/{i}")));
    }
    let dropped = envoy.stat_or_zero(DROPPED);
    assert!((20..=30).contains(&dropped), "2 workers × 5 queued at most, the rest dropped: {dropped}");
    assert!(collector.received("/v1/logs").is_empty());
    drop(envoy);

    // A collector that refuses: the batch is lost and counted, then exports resume.
    let envoy = envoy_with_collector(otel_config(100, "0.1s"), &upstream, &collector);
    collector.set_status(503);
    for i in 0..5 {
        envoy.send(Request::get(&format!("/refused/{i}")));
    }
    eventually("records_failed", WAIT, || (envoy.stat_or_zero(FAILED) == 5).then_some(()));
    collector.set_status(200);
    for i in 0..3 {
        envoy.send(Request::get(&format!("/after/{i}")));
    }
    eventually("records_sent", WAIT, || (envoy.stat_or_zero(SENT) == 3).then_some(()));
    assert_eq!(envoy.stat_or_zero(FAILED), 5);
}

#[test]
fn bad_access_log_configuration_is_refused_with_its_path() {
    let upstream = Upstream::start();
    let failed = Envoy::builder()
        .upstream(upstream.addr())
        .listener(Listener::new().filter(Filter::wasm(
            "telemetry",
            json!({"accessLogging": [{"filter": {"expression": "response.code >= "}}]}),
        )))
        .expect_failure();
    assert!(failed.log.contains("accessLogging[0].filter.expression: does not parse"), "{}", failed.log);
}

// === tracing ===

const TP_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TP_SPAN: &str = "00f067aa0ba902b7";

fn tracing_config(pct: f64, mode: &str) -> Value {
    json!({"reporter": mode,
        "tracing": [{"providers": [{"name": "zipkin"}, {"name": "otel"}], "randomSamplingPercentage": pct,
            "customTags": {
                "team": {"literal": {"value": "payments"}},
                "user": {"header": {"name": "x-user", "defaultValue": "anonymous"}},
                "pod": {"environment": {"name": "MESHWASM_TEST_POD", "defaultValue": "none"}}}}],
        "extensionProviders": [
            {"name": "zipkin", "zipkin": {"cluster": "collector", "service": "zipkin.istio-system.svc.cluster.local", "maxTagLength": 8,
                "batch": {"flushInterval": "0.1s"}}},
            {"name": "otel", "opentelemetry": {"cluster": "collector", "batch": {"flushInterval": "0.1s"}}}]})
}

/// Envoy with the tracing config; the VM sees `MESHWASM_TEST_POD=pod-7` (environment tag).
fn envoy_tracing(config: Value, upstream: &Upstream, collector: &Collector) -> Envoy {
    let mut f = Filter::wasm("telemetry", config);
    let yaml = f.yaml().replace(
        "      runtime: envoy.wasm.runtime.v8\n",
        "      runtime: envoy.wasm.runtime.v8\n      environment_variables: { key_values: { MESHWASM_TEST_POD: pod-7 } }\n",
    );
    assert_ne!(yaml, f.yaml(), "vm_config found");
    f = Filter::native(&yaml);
    Envoy::builder()
        .upstream(upstream.addr())
        .concurrency(2)
        .http_cluster("collector", collector.addr())
        .listener(Listener::new().filter(f))
        .start()
}

/// Send one request keyed `key` and return the headers the upstream saw.
fn upstream_headers(
    envoy: &Envoy,
    upstream: &Upstream,
    key: &str,
    headers: &[(&str, &str)],
) -> BTreeMap<String, String> {
    let mut req = Request::get(&format!("/trace/{key}?q=1")).header("x-flaky-key", key);
    for (k, v) in headers {
        req = req.header(k, v);
    }
    assert_eq!(envoy.send(req).status, 200);
    let attempts = upstream.attempts(key);
    assert_eq!(attempts.len(), 1);
    attempts[0].headers.iter().cloned().collect()
}

fn hexn(s: &str, n: usize) -> bool {
    s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) && s.bytes().any(|b| b != b'0')
}

#[test]
fn trace_context_is_extracted_propagated_and_garbage_left_untraced() {
    let upstream = Upstream::start();
    let collector = Collector::start();
    let envoy = envoy_tracing(tracing_config(0.0, "SERVER"), &upstream, &collector);

    // W3C in: same trace, a new span whose parent is the caller's, the caller's decision.
    let tp = format!("00-{TP_TRACE}-{TP_SPAN}-01");
    let h = upstream_headers(&envoy, &upstream, "w3c", &[("traceparent", &tp), ("tracestate", "vendor=x,o=1")]);
    let parts: Vec<&str> = h["traceparent"].split('-').collect();
    assert_eq!((parts[0], parts[1], parts[3]), ("00", TP_TRACE, "01"), "{h:?}");
    assert!(hexn(parts[2], 16) && parts[2] != TP_SPAN);
    assert_eq!(h["tracestate"], "vendor=x,o=1");
    assert_eq!((h["x-b3-traceid"].as_str(), h["x-b3-spanid"].as_str()), (TP_TRACE, parts[2]));
    assert_eq!((h["x-b3-parentspanid"].as_str(), h["x-b3-sampled"].as_str()), (TP_SPAN, "1"));

    // B3 single in, not sampled: propagated unsampled.
    let b3 = "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0";
    let h = upstream_headers(&envoy, &upstream, "b3single", &[("b3", b3)]);
    assert!(
        h["b3"].starts_with("80f198ee56343ba864fe8b2a57d3eff7-") && h["b3"].contains("-0-e457b5a2e4d86bd1"),
        "{h:?}"
    );
    assert!(h["traceparent"].ends_with("-00"));

    // B3 multi in, 64-bit trace id, sampled.
    let h = upstream_headers(
        &envoy,
        &upstream,
        "b3multi",
        &[("x-b3-traceid", "463ac35c9f6413ad"), ("x-b3-spanid", "a2fb4a1d1a96d312"), ("x-b3-sampled", "1")],
    );
    assert_eq!(h["x-b3-traceid"], "0000000000000000463ac35c9f6413ad");
    assert_eq!(h["x-b3-parentspanid"], "a2fb4a1d1a96d312");
    assert_eq!(h["x-b3-sampled"], "1");

    // Malformed context (zero ids, junk, one B3 id alone): as Envoy's tracers, the request is
    // not traced and its headers pass through untouched; the request is served.
    for (i, bad) in [
        vec![("traceparent", "00-00000000000000000000000000000000-00f067aa0ba902b7-01")],
        vec![("traceparent", "00-xyz-%%%-zz"), ("b3", "----")],
        vec![("b3", "xyz-0-1")],
        vec![("x-b3-traceid", "zz"), ("x-b3-spanid", "a2fb4a1d1a96d312")],
        vec![("x-b3-traceid", "463ac35c9f6413ad")],
    ]
    .into_iter()
    .enumerate()
    {
        let h = upstream_headers(&envoy, &upstream, &format!("bad{i}"), &bad);
        for (k, v) in &bad {
            assert_eq!(h.get(*k).map(String::as_str), Some(*v), "untouched: {bad:?} → {h:?}");
        }
        for k in ["traceparent", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled", "x-b3-parentspanid"] {
            assert_eq!(h.contains_key(k), bad.iter().any(|(b, _)| *b == k), "{k} not added: {bad:?} → {h:?}");
        }
    }
    // Only the two requests sampled by their caller are reported (0 % sampling otherwise).
    let spans = eventually("the 2 sampled spans", WAIT, || {
        let s = collector.zipkin_spans();
        (s.len() >= 2).then_some(s)
    });
    let traces: BTreeSet<String> = spans.iter().map(|s| s.trace_id().to_string()).collect();
    assert_eq!(traces, BTreeSet::from([TP_TRACE.to_string(), "0000000000000000463ac35c9f6413ad".to_string()]));
}

#[test]
fn sampled_spans_reach_zipkin_and_otlp_collectors_with_custom_tags() {
    let upstream = Upstream::start();
    let collector = Collector::start();
    let envoy = envoy_tracing(tracing_config(100.0, "SERVER"), &upstream, &collector);
    let tp = format!("00-{TP_TRACE}-{TP_SPAN}-01");
    let h = upstream_headers(&envoy, &upstream, "span1", &[("traceparent", &tp), ("x-user", "ana-long-name")]);
    let span_id = h["x-b3-spanid"].clone();
    let h2 = upstream_headers(&envoy, &upstream, "span2", &[]);
    assert_eq!(envoy.send(Request::get("/x").header("x-upstream-status", "503")).status, 503);

    let zipkin = eventually("3 Zipkin spans", WAIT, || {
        let s = collector.zipkin_spans();
        (s.len() >= 3).then_some(s)
    });
    assert_eq!(zipkin.len(), 3);
    let z = zipkin.iter().find(|s| s.id().to_string() == span_id).expect("the span of the W3C request");
    assert_eq!(z.trace_id().to_string(), TP_TRACE);
    assert_eq!(z.parent_id().map(|p| p.to_string()).as_deref(), Some(TP_SPAN));
    assert!(matches!(z.kind(), Some(zipkin_types::Kind::Server)), "SERVER kind");
    assert_eq!(z.tags().get("team").map(String::as_str), Some("payments"));
    assert_eq!(z.tags().get("user").map(String::as_str), Some("ana-long"), "maxTagLength 8");
    assert_eq!(z.tags().get("pod").map(String::as_str), Some("pod-7"), "environment tag");
    assert_eq!(z.tags().get("http.status_code").map(String::as_str), Some("200"));
    assert_eq!(z.tags().get("http.method").map(String::as_str), Some("GET"));
    assert!(z.name().is_some_and(|n| n.ends_with("/trace/span1")), "{:?}", z.name());
    let root = zipkin.iter().find(|s| s.id().to_string() == h2["x-b3-spanid"]).expect("root span");
    assert!(root.parent_id().is_none());
    assert_eq!(root.tags().get("user").map(String::as_str), Some("anonymou"), "default, truncated");
    let err = zipkin.iter().find(|s| s.tags().get("http.status_code").map(String::as_str) == Some("503")).expect("503");
    assert_eq!(err.tags().get("error").map(String::as_str), Some("true"));

    let otlp = eventually("3 OTLP spans", WAIT, || {
        let s = collector.otlp_spans();
        (s.len() >= 3).then_some(s)
    });
    assert_eq!(otlp.len(), 3);
    let o = otlp.iter().find(|s| collector::hex(&s.span_id) == span_id).expect("the span of the W3C request");
    assert_eq!(collector::hex(&o.trace_id), TP_TRACE);
    assert_eq!(collector::hex(&o.parent_span_id), TP_SPAN);
    assert_eq!(o.kind, 2, "SPAN_KIND_SERVER");
    assert!(o.end_time_unix_nano >= o.start_time_unix_nano && o.start_time_unix_nano > 1_600_000_000_000_000_000);
    assert_eq!(collector::attribute(&o.attributes, "team").as_deref(), Some("payments"));
    assert!(otlp.iter().any(|s| s.status.as_ref().is_some_and(|st| st.code == 2)), "the 503 is an error");
    eventually("spans counted", WAIT, || {
        (envoy.stat_or_zero("wasmcustom.meshwasm.telemetry.export.zipkin.records_sent") == 3
            && envoy.stat_or_zero("wasmcustom.meshwasm.telemetry.export.otel.records_sent") == 3)
            .then_some(())
    });
}

#[test]
fn random_sampling_within_binomial_bounds_and_request_id_reason() {
    let upstream = Upstream::start();
    let collector = Collector::start();
    let envoy = envoy_tracing(tracing_config(25.0, "SERVER"), &upstream, &collector);
    let n = 400u64;
    let mut sampled = 0u64;
    for i in 0..n {
        let h = upstream_headers(&envoy, &upstream, &format!("s{i}"), &[]);
        let flag = h["traceparent"].rsplit('-').next().expect("flags").to_string();
        // Envoy's trace reason, packed into the x-request-id: '9' sampled, '4' (as generated) not.
        let reason = h["x-request-id"].as_bytes()[14];
        match flag.as_str() {
            "01" => {
                sampled += 1;
                assert_eq!(reason, b'9', "{h:?}");
            }
            "00" => assert_eq!(reason, b'4', "{h:?}"),
            other => panic!("flags {other}"),
        }
    }
    meshwasm_tests::assert_binomial(sampled, n, 0.25);
    // Forced: x-client-trace-id samples at any percentage (x-envoy-force-trace too, when
    // Envoy lets it through: the connection manager removes it from external requests).
    let envoy0 = envoy_tracing(tracing_config(0.0, "SERVER"), &upstream, &collector);
    let h = upstream_headers(&envoy0, &upstream, "client", &[("x-client-trace-id", "abc")]);
    assert!(h["traceparent"].ends_with("-01"));
    assert_eq!(h["x-request-id"].as_bytes()[14], b'b', "client-forced");
    let h = upstream_headers(&envoy0, &upstream, "none", &[]);
    assert!(h["traceparent"].ends_with("-00"));
}

#[test]
fn otlp_log_records_carry_the_requests_trace_context() {
    let upstream = Upstream::start();
    let collector = Collector::start();
    let mut config = tracing_config(100.0, "SERVER");
    config["accessLogging"] = json!([{"providers": [{"name": "otel-logs"}]}]);
    config["extensionProviders"].as_array_mut().expect("providers").push(
        json!({"name": "otel-logs", "envoyOtelAls": {"cluster": "collector", "batch": {"flushInterval": "0.1s"}}}),
    );
    let envoy = envoy_tracing(config, &upstream, &collector);
    let tp = format!("00-{TP_TRACE}-{TP_SPAN}-01");
    let h = upstream_headers(&envoy, &upstream, "corr", &[("traceparent", &tp), ("x-request-id", "corr-1")]);
    let records = eventually("the log record", WAIT, || {
        let r = collector.log_records();
        (!r.is_empty()).then_some(r)
    });
    assert_eq!(records.len(), 1);
    assert_eq!(collector::hex(&records[0].trace_id), TP_TRACE);
    assert_eq!(collector::hex(&records[0].span_id), h["x-b3-spanid"], "the span this proxy started");
    assert_eq!(records[0].flags & 1, 1, "sampled");
    assert_eq!(collector::attribute(&records[0].attributes, "request_id").as_deref(), Some("corr-1"));
}

/// A v4 UUID from a counter (deterministic, well spread: splitmix64).
fn uuid(i: u64) -> String {
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let (a, b) = (mix(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)), mix(i ^ 0xdead_beef));
    let h = format!("{a:016x}{b:016x}");
    format!("{}-{}-4{}-8{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
}

#[test]
fn sampling_decisions_equal_native_envoy_tracing_for_the_same_request_ids() {
    let upstream = Upstream::start();
    let collector = Collector::start();
    // Native: the connection manager's tracing with a Zipkin tracer at 25 %.
    let native = Envoy::builder()
        .upstream(upstream.addr())
        .http_cluster("collector", collector.addr())
        .listener(Listener::new().hcm_option(
            "tracing",
            r#"{ random_sampling: { value: 25 }, provider: { name: envoy.tracers.zipkin, typed_config: { "@type": type.googleapis.com/envoy.config.trace.v3.ZipkinConfig, collector_cluster: collector, collector_endpoint: /api/v2/spans, collector_endpoint_version: HTTP_JSON } } }"#,
        ))
        .start();
    let ours = envoy_tracing(tracing_config(25.0, "SERVER"), &upstream, &collector);
    let n = 200u64;
    let mut sampled = 0;
    for i in 0..n {
        let id = uuid(i);
        let seen = |envoy: &Envoy, tag: &str| {
            let h = upstream_headers(envoy, &upstream, &format!("{tag}{i}"), &[("x-request-id", &id)]);
            (h["x-request-id"].clone(), h["x-b3-sampled"].clone())
        };
        let (n_id, n_sampled) = seen(&native, "native");
        let (o_id, o_sampled) = seen(&ours, "ours");
        assert_eq!(o_id, n_id, "the trace reason packed into the x-request-id, for {id}");
        assert_eq!(o_sampled, n_sampled, "the sampling decision, for {id}");
        sampled += u64::from(o_sampled == "1");
    }
    meshwasm_tests::assert_binomial(sampled, n, 0.25);
}

fn native_tracing(upstream: &Upstream, collector: &Collector, provider: &str) -> Envoy {
    Envoy::builder()
        .upstream(upstream.addr())
        .http_cluster("collector", collector.addr())
        .listener(
            Listener::new()
                .hcm_option("tracing", &format!("{{ random_sampling: {{ value: 100 }}, provider: {provider} }}")),
        )
        .start()
}

#[test]
fn traceparent_handling_equals_envoys_opentelemetry_tracer_and_b3_its_zipkin_tracer() {
    let upstream = Upstream::start();
    let collector = Collector::start();
    let otel = native_tracing(
        &upstream,
        &collector,
        r#"{ name: envoy.tracers.opentelemetry, typed_config: { "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig, http_service: { http_uri: { uri: "http://collector/v1/traces", cluster: collector, timeout: 1s } }, service_name: native } }"#,
    );
    let zipkin = native_tracing(
        &upstream,
        &collector,
        r#"{ name: envoy.tracers.zipkin, typed_config: { "@type": type.googleapis.com/envoy.config.trace.v3.ZipkinConfig, collector_cluster: collector, collector_endpoint: /api/v2/spans, collector_endpoint_version: HTTP_JSON } }"#,
    );
    let ours = envoy_tracing(tracing_config(100.0, "SERVER"), &upstream, &collector);
    let cases = [
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-xyz-%%%-zz",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
    ];
    for (i, tp) in cases.iter().enumerate() {
        let n = upstream_headers(&otel, &upstream, &format!("otel{i}"), &[("traceparent", tp)])["traceparent"].clone();
        let o = upstream_headers(&ours, &upstream, &format!("ours{i}"), &[("traceparent", tp)])["traceparent"].clone();
        if n == *tp {
            assert_eq!(o, *tp, "Envoy left {tp} untouched (not traced)");
        } else {
            // Continued: same version, trace id and flags; a new span id.
            let (np, op): (Vec<&str>, Vec<&str>) = (n.split('-').collect(), o.split('-').collect());
            assert_eq!((np[0], np[1], np[3]), (op[0], op[1], op[3]), "{tp}: Envoy {n}, ours {o}");
            assert!(hexn(op[2], 16) && op[2] != "00f067aa0ba902b7");
        }
    }
    // Malformed B3: Envoy's Zipkin tracer leaves it untouched and untraced; so do we.
    for (i, bad) in [vec![("x-b3-traceid", "zz"), ("x-b3-spanid", "a2fb4a1d1a96d312")], vec![("b3", "xyz-0-1")]]
        .into_iter()
        .enumerate()
    {
        let pick = |h: BTreeMap<String, String>| -> BTreeMap<String, String> {
            h.into_iter().filter(|(k, _)| k.starts_with("x-b3-") || k == "b3").collect()
        };
        let n = pick(upstream_headers(&zipkin, &upstream, &format!("zipkin{i}"), &bad));
        let o = pick(upstream_headers(&ours, &upstream, &format!("oursb3{i}"), &bad));
        assert_eq!(o, n, "{bad:?}");
    }
}
