//! The retry filter end to end: `dist/retry.wasm` in a stock Envoy at `--concurrency 2`, the
//! shipped carrier route (`envoy-configs/retry-carrier.yaml`), and the echo upstream in flaky
//! mode (the first N attempts of a keyed request fail with a status, a gRPC status, a reset or
//! a delay; every attempt is recorded with its headers and body).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use meshwasm_tests::{eventually, Envoy, Filter, Listener, Request, Response, Route, Upstream};
use serde_json::{json, Value};

// === helpers ===

/// The shipped carrier route action.
fn carrier() -> String {
    let path = meshwasm_tests::workspace_root().join("envoy-configs/retry-carrier.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Envoy 1.40 deems no address internal by default, and then its connection manager removes
/// the client's `x-envoy-*` router headers itself. With 127.0.0.1 internal (a sidecar's view
/// of its own app) they survive to the filter, which is what it must guard against.
const INTERNAL_LOOPBACK: &str =
    "use_remote_address: true\ninternal_address_config:\n  cidr_ranges:\n  - { address_prefix: 127.0.0.1, prefix_len: 32 }\n";

fn retry_listener(config: Value) -> Listener {
    Listener::new()
        .filter(Filter::wasm("retry", config))
        .route(Route::new("default", "/").action_yaml(&carrier()))
        .hcm_yaml(INTERNAL_LOOPBACK)
}

fn retry_envoy(up: &Upstream, config: Value) -> Envoy {
    Envoy::builder().upstream(up.addr()).upstream_h2().listener(retry_listener(config)).start()
}

static NEXT_KEY: AtomicU64 = AtomicU64::new(0);

/// A unique request key.
fn key(what: &str) -> String {
    format!("{what}-{}", NEXT_KEY.fetch_add(1, Ordering::Relaxed))
}

/// A request whose first `fail` attempts fail as `mode` says.
fn flaky(req: Request, key: &str, fail: u32, mode: &str) -> Request {
    req.header("x-flaky-key", key).header("x-flaky-fail", &fail.to_string()).header("x-flaky-mode", mode)
}

fn stat(envoy: &Envoy, rule: &str, s: &str) -> u64 {
    envoy.stat_or_zero(&format!("wasmcustom.meshwasm.retry.rule.{rule}.{s}"))
}

#[track_caller]
fn assert_status(rsp: &Response, status: u16) {
    assert_eq!(rsp.status, status, "body {:?} headers {:?}", rsp.text(), rsp.headers);
}

// === retries on status codes, resets, bodies replayed ===

#[test]
fn istio_default_policy_retries_503_twice() {
    let up = Upstream::start();
    let envoy = retry_envoy(&up, json!({"rules": [{"name": "default"}], "observeAttempts": true}));
    // Two failures: Istio's default 2 retries recover.
    let k = key("default-ok");
    let rsp = envoy.send(flaky(Request::get("/"), &k, 2, "status=503"));
    assert_status(&rsp, 200);
    assert_eq!(up.attempts(&k).len(), 3);
    // Three failures: the retries are exhausted and the client sees the third 503.
    let k = key("default-exhausted");
    let rsp = envoy.send(flaky(Request::get("/"), &k, 3, "status=503"));
    assert_status(&rsp, 503);
    assert_eq!(rsp.text(), "flaky failure 3");
    assert_eq!(up.attempts(&k).len(), 3);
    // 500 is not in Istio's default conditions: no retry.
    let k = key("default-500");
    assert_status(&envoy.send(flaky(Request::get("/"), &k, 1, "status=500")), 500);
    assert_eq!(up.attempts(&k).len(), 1);
    eventually("log-phase stats", Duration::from_secs(5), || {
        (stat(&envoy, "default", "retries_observed") == 4 && stat(&envoy, "default", "retries_exhausted") == 1)
            .then_some(())
    });
    assert_eq!(stat(&envoy, "default", "requests"), 3);
    assert_eq!(stat(&envoy, "default", "retries_requested"), 3);
}

#[test]
fn retry_on_split_status_codes_and_conditions() {
    let up = Upstream::start();
    let envoy = retry_envoy(
        &up,
        json!({"rules": [{"name": "split", "retries": {"attempts": 4, "retryOn": "gateway-error,409"}}]}),
    );
    for (status, fail, attempts, want) in [(409, 2, 3, 200), (502, 5, 5, 502), (500, 1, 1, 500), (429, 1, 1, 429)] {
        let k = key("split");
        let rsp = envoy.send(flaky(Request::get("/"), &k, fail, &format!("status={status}")));
        assert_status(&rsp, want);
        assert_eq!(up.attempts(&k).len(), attempts, "status {status}");
    }
}

#[test]
fn resets_are_retried_and_bodies_replayed_byte_identical() {
    let up = Upstream::start();
    let envoy = retry_envoy(&up, json!({"rules": [{"retries": {"attempts": 2, "retryOn": "reset"}}]}));
    let body: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let k = key("reset-put");
    let rsp = envoy.send(flaky(Request::new("PUT", "/").body(body.clone()), &k, 2, "reset"));
    assert_status(&rsp, 200);
    let attempts = up.attempts(&k);
    assert_eq!(attempts.len(), 3);
    for a in &attempts {
        assert_eq!(a.body.as_ref(), body.as_slice(), "every attempt carries the same bytes");
    }
    // POST without an idempotency key: `reset` may re-execute, so no retry.
    let k = key("reset-post");
    let rsp = envoy.send(flaky(Request::post("/", body.clone()), &k, 1, "reset"));
    assert_status(&rsp, 503);
    assert_eq!(up.attempts(&k).len(), 1);
    // With the key, it is retried.
    let k = key("reset-post-key");
    let req = flaky(Request::post("/", body.clone()), &k, 1, "reset").header("idempotency-key", "abc");
    assert_status(&envoy.send(req), 200);
    let attempts = up.attempts(&k);
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].body, attempts[1].body);
    assert_eq!(stat(&envoy, "rule-0", "idempotency_skipped"), 1);
}

#[test]
fn idempotency_guard_keeps_connect_failure_and_can_be_turned_off() {
    let up = Upstream::start();
    let envoy = retry_envoy(
        &up,
        json!({"rules": [
            {"name": "off", "match": [{"uri": {"prefix": "/off"}}], "retries": {"attempts": 2, "retryOn": "5xx"}, "idempotentOnly": false},
            {"name": "methods", "match": [{"uri": {"prefix": "/methods"}}], "retries": {"attempts": 2, "retryOn": "5xx"}, "idempotentMethods": ["POST"]},
            {"name": "on", "retries": {"attempts": 2, "retryOn": "5xx"}}
        ]}),
    );
    for (path, method, attempts) in [
        ("/off", "POST", 2),
        ("/methods", "POST", 2),
        ("/methods", "GET", 1),
        ("/on", "PATCH", 1),
        ("/on", "DELETE", 2),
    ] {
        let k = key("idem");
        let rsp = envoy.send(flaky(Request::new(method, path), &k, 1, "status=503"));
        assert_eq!(up.attempts(&k).len(), attempts, "{method} {path}");
        assert_status(&rsp, if attempts == 2 { 200 } else { 503 });
    }
}

// === client headers ===

#[test]
fn client_router_headers_are_stripped_unless_trusted() {
    let up = Upstream::start();
    let injected = [
        ("x-envoy-retry-on", "5xx"),
        ("x-envoy-max-retries", "5"),
        ("x-envoy-upstream-rq-timeout-alt-response", "204"),
        ("x-envoy-hedge-on-per-try-timeout", "true"),
    ];
    // Retries disabled by the rule; the client tries to turn them on.
    let envoy = retry_envoy(&up, json!({"rules": [{"retries": {"attempts": 0}}]}));
    let k = key("strip");
    let rsp = envoy.send(flaky(Request::get("/").headers(injected), &k, 1, "status=503"));
    assert_status(&rsp, 503);
    let attempts = up.attempts(&k);
    assert_eq!(attempts.len(), 1, "the client's x-envoy-retry-on must not cause a retry");
    for (h, _) in injected {
        assert_eq!(attempts[0].header(h), None, "{h} reached the upstream");
    }
    drop(envoy);
    // Trusted: a request no rule selects keeps the client's retry headers.
    let envoy =
        retry_envoy(&up, json!({"rules": [{"match": [{"uri": {"prefix": "/never"}}]}], "trustClientHeaders": true}));
    let k = key("trusted");
    let rsp = envoy.send(flaky(Request::get("/").headers(injected), &k, 1, "status=503"));
    assert_status(&rsp, 200);
    assert_eq!(up.attempts(&k).len(), 2);
}

// === timeouts, per-try timeouts, hedging ===

#[test]
fn rule_timeout_ends_the_request_with_504_and_counts_it() {
    let up = Upstream::start();
    let envoy = retry_envoy(&up, json!({"rules": [{"name": "t", "timeout": "300ms"}], "observeAttempts": true}));
    let k = key("timeout");
    let rsp = envoy.send(flaky(Request::get("/"), &k, 1, "delay=3000"));
    assert_status(&rsp, 504);
    assert!(
        rsp.elapsed >= Duration::from_millis(295) && rsp.elapsed < Duration::from_millis(2500),
        "{:?}",
        rsp.elapsed
    );
    eventually("timeouts stat", Duration::from_secs(5), || (stat(&envoy, "t", "timeouts") == 1).then_some(()));
    // The next hop was told its budget.
    let a = up.attempts(&k);
    assert_eq!(a[0].header("x-envoy-expected-rq-timeout-ms"), Some("300"));
}

#[test]
fn per_try_timeout_retries_and_hedging_keeps_the_first_attempt() {
    let up = Upstream::start();
    let envoy = retry_envoy(
        &up,
        json!({"rules": [
            {"name": "hedge", "match": [{"uri": {"prefix": "/hedge"}}],
             "retries": {"attempts": 1, "perTryTimeout": "200ms", "retryOn": "5xx"}, "hedgeOnPerTryTimeout": true},
            {"name": "pertry", "retries": {"attempts": 1, "perTryTimeout": "200ms", "retryOn": "5xx"}}
        ]}),
    );
    // Plain per-try timeout: the first attempt is abandoned after 200 ms, the second answers.
    let k = key("pertry");
    let rsp = envoy.send(flaky(Request::get("/"), &k, 1, "delay=800"));
    assert_status(&rsp, 200);
    assert_eq!(rsp.header("x-flaky-attempt"), Some("2"));
    assert_eq!(up.attempts(&k).len(), 2);
    assert_eq!(up.attempts(&k)[0].header("x-envoy-expected-rq-timeout-ms"), Some("200"));
    // The same pattern, hedged and not: the first attempt answers after 300 ms, the second
    // 150 ms after it starts (at 350 ms). Hedged, the first attempt keeps running and wins;
    // not hedged, it was abandoned at 200 ms and the second answers.
    for (path, winner) in [("/hedge", "1"), ("/", "2")] {
        let k = key("hedge");
        let req = flaky(Request::get(path), &k, 1, "delay=300").header("x-upstream-delay-ms", "150");
        let rsp = envoy.send(req);
        assert_status(&rsp, 200);
        assert_eq!(rsp.header("x-flaky-attempt"), Some(winner), "{path}");
        assert_eq!(up.attempts(&k).len(), 2);
    }
}

// === gRPC ===

#[test]
fn grpc_conditions_on_a_grpc_upstream_and_deadline_propagation() {
    let up = Upstream::start();
    let envoy = retry_envoy(&up, json!({"rules": [{"name": "grpc", "timeout": "5s"}]}));
    // Istio's default retries `unavailable` (14) …
    let k = key("grpc-14");
    let rsp = envoy.send(flaky(Request::grpc("/pkg.Svc/M", b"hello"), &k, 2, "grpc=14").header("idempotency-key", "1"));
    assert_status(&rsp, 200);
    assert_eq!(rsp.grpc_status(), Some(0));
    assert_eq!(up.attempts(&k).len(), 3);
    // … even without an idempotency key (gRPC conditions are not guarded) …
    let k = key("grpc-14-nokey");
    let rsp = envoy.send(flaky(Request::grpc("/pkg.Svc/M", b"hello"), &k, 1, "grpc=14"));
    assert_eq!(rsp.grpc_status(), Some(0));
    assert_eq!(up.attempts(&k).len(), 2);
    // … but not `internal` (13).
    let k = key("grpc-13");
    let rsp = envoy.send(flaky(Request::grpc("/pkg.Svc/M", b"hello"), &k, 1, "grpc=13"));
    assert_eq!(rsp.grpc_status(), Some(13));
    assert_eq!(up.attempts(&k).len(), 1);
    // The client's deadline (300 ms) is tighter than the rule's 5 s: it bounds the request
    // and is what the next hop is told.
    let k = key("grpc-deadline");
    let rsp = envoy.send(flaky(Request::grpc("/pkg.Svc/M", b"x"), &k, 1, "delay=3000").header("grpc-timeout", "300m"));
    assert!(rsp.elapsed < Duration::from_millis(2500), "{:?}", rsp.elapsed);
    // Envoy's router answers a gRPC timeout with UNAVAILABLE.
    assert_eq!(rsp.grpc_status(), Some(14), "{:?}", rsp.headers);
    assert_eq!(rsp.grpc_message().as_deref(), Some("upstream request timeout"));
    let a = up.attempts(&k);
    assert_eq!(a[0].header("grpc-timeout"), Some("300m"));
    assert_eq!(a[0].header("x-envoy-expected-rq-timeout-ms"), Some("300"));
}

// === Envoy's own limits, as the log phase sees them ===

#[test]
fn log_phase_counts_agree_with_envoys_cluster_counters() {
    let up = Upstream::start();
    let envoy = retry_envoy(
        &up,
        json!({"rules": [{"name": "limits", "retries": {"attempts": 2, "retryOn": "5xx"}}], "observeAttempts": true}),
    );
    // 10 concurrent always-failing requests: the cluster's max_retries circuit breaker
    // (default 3 concurrent retries) overflows some (UO); the rest exhaust their retries (URX).
    let results = meshwasm_tests::fire(envoy.listener_addr(), 60, 10, |i| {
        flaky(Request::get("/").header("x-upstream-delay-ms", "20"), &format!("limits-{i}"), 1000, "status=503")
    });
    assert!(results.iter().all(|r| r.as_ref().is_ok_and(|r| r.status == 503)));
    let retries = up.requests() - 60;
    let cluster = |s: &str| envoy.stat_or_zero(&format!("cluster.upstream.{s}"));
    eventually("log-phase stats", Duration::from_secs(5), || {
        (stat(&envoy, "limits", "retries_observed") == retries).then_some(())
    });
    assert!(cluster("upstream_rq_retry_overflow") > 0, "the load must overflow the breaker");
    assert_eq!(stat(&envoy, "limits", "overflowed"), cluster("upstream_rq_retry_overflow"));
    assert_eq!(stat(&envoy, "limits", "retries_exhausted"), cluster("upstream_rq_retry_limit_exceeded"));
    assert_eq!(retries, cluster("upstream_rq_retry"));
}

#[test]
fn trusted_expected_timeout_is_a_deadline_untrusted_is_not() {
    let up = Upstream::start();
    let rule = json!({"name": "d", "timeout": "5s"});
    for (trusted, want_ms) in [(true, "250"), (false, "5000")] {
        let envoy = retry_envoy(&up, json!({"rules": [rule.clone()], "trustClientHeaders": trusted}));
        let k = key("expected");
        let req = flaky(Request::get("/"), &k, 1, "delay=800").header("x-envoy-expected-rq-timeout-ms", "250");
        let rsp = envoy.send(req);
        assert_status(&rsp, if trusted { 504 } else { 200 });
        assert_eq!(up.attempts(&k)[0].header("x-envoy-expected-rq-timeout-ms"), Some(want_ms), "trusted {trusted}");
    }
}

// === the carrier's back-off ===

/// The gaps between the attempts of one request.
fn gaps(up: &Upstream, key: &str) -> Duration {
    let a = up.attempts(key);
    a.last().unwrap().at.duration_since(a.first().unwrap().at)
}

#[test]
fn the_carriers_back_off_spaces_the_retries() {
    let up = Upstream::start();
    let config = json!({"rules": [{"retries": {"attempts": 3, "retryOn": "5xx"}}]});
    // Envoy's jittered back-off draws retry n's delay from [0, (2^n − 1) × base), capped at
    // max: with the shipped carrier (base 25 ms) three retries wait < 25 + 75 + 175 ms.
    let envoy = retry_envoy(&up, config.clone());
    let k = key("backoff-default");
    assert_status(&envoy.send(flaky(Request::get("/"), &k, 3, "status=503")), 200);
    assert_eq!(up.attempts(&k).len(), 4);
    let default_gaps = gaps(&up, &k);
    assert!(default_gaps < Duration::from_millis(400), "{default_gaps:?}");
    drop(envoy);
    // A carrier with base = max = 2 s: three retries wait three draws from [0, 2 s), more
    // than 280 ms except with probability 0.14³/6 ≈ 5·10⁻⁴.
    let slow = carrier().replace(
        "  host_selection_retry_max_attempts: 5",
        "  host_selection_retry_max_attempts: 5\n  retry_back_off: { base_interval: 2s, max_interval: 2s }",
    );
    assert!(slow.contains("retry_back_off"));
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .upstream_h2()
        .listener(
            Listener::new()
                .filter(Filter::wasm("retry", config))
                .route(Route::new("default", "/").action_yaml(&slow))
                .hcm_yaml(INTERNAL_LOOPBACK),
        )
        .start();
    let k = key("backoff-slow");
    assert_status(&envoy.send(flaky(Request::get("/"), &k, 3, "status=503")), 200);
    let slow_gaps = gaps(&up, &k);
    assert!(slow_gaps > Duration::from_millis(280), "{slow_gaps:?} (default carrier: {default_gaps:?})");
}

// === per-route overrides ===

#[test]
fn route_metadata_overrides_the_plugin_rules() {
    let up = Upstream::start();
    let listener = Listener::new()
        .filter(Filter::wasm("retry", json!({"rules": [{"retries": {"attempts": 0}}], "routeOverrides": true})))
        .route(Route::new("ovr", "/ovr").action_yaml(&carrier()).meshwasm_override(
            "retry",
            json!({"rules": [{"name": "route", "retries": {"attempts": 4, "retryOn": "5xx"}}]}),
        ))
        .route(Route::new("default", "/").action_yaml(&carrier()))
        .hcm_yaml(INTERNAL_LOOPBACK);
    let envoy = Envoy::builder().upstream(up.addr()).upstream_h2().listener(listener).start();
    let k = key("ovr");
    assert_status(&envoy.send(flaky(Request::get("/ovr"), &k, 3, "status=503")), 200);
    assert_eq!(up.attempts(&k).len(), 4);
    let k = key("plugin");
    assert_status(&envoy.send(flaky(Request::get("/"), &k, 1, "status=503")), 503);
    assert_eq!(up.attempts(&k).len(), 1);
    assert_eq!(stat(&envoy, "route", "requests"), 1);
}
