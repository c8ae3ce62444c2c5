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
