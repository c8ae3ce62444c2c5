//! The rate limiter end to end: `dist/ratelimit.wasm` in a stock Envoy at `--concurrency 2`,
//! a real upstream, real clients, and for global limits a real rate-limit service counting in
//! a real Redis. Each test pins one user-visible behaviour on responses and on admin stats.
//!
//! The differential test against Envoy's native `local_ratelimit` is in
//! `ratelimit_differential.rs`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meshwasm_tests::envoy::free_port;
use meshwasm_tests::ratelimit_service::proto::RateLimitDescriptorExt as _;
use meshwasm_tests::{
    fire, Behaviour, Envoy, EnvoyBuilder, Filter, Limit, Listener, RateLimitService, Redis, Request, Response, Route,
    ServiceConfig, Unit, Upstream,
};
use serde_json::{json, Value};

// === helpers ===

fn envoy(up: &Upstream, config: Value) -> Envoy {
    Envoy::builder()
        .upstream(up.addr())
        .upstream_h2()
        .listener(Listener::new().filter(Filter::wasm("ratelimit", config)))
        .start()
}

fn stat(envoy: &Envoy, rule: &str, stat: &str) -> u64 {
    envoy.stat_or_zero(&format!("wasmcustom.meshwasm.ratelimit.rule.{rule}.{stat}"))
}

fn gstat(envoy: &Envoy, stat: &str) -> u64 {
    envoy.stat_or_zero(&format!("wasmcustom.meshwasm.ratelimit.global.{stat}"))
}

fn bucket(max: u64, per_fill: u64, interval: &str) -> Value {
    json!({"maxTokens": max, "tokensPerFill": per_fill, "fillInterval": interval})
}

fn ok(results: Vec<Result<Response, String>>) -> Vec<Response> {
    results.into_iter().enumerate().map(|(i, r)| r.unwrap_or_else(|e| panic!("request {i}: {e}"))).collect()
}

fn count(rsps: &[Response], status: u16) -> usize {
    rsps.iter().filter(|r| r.status == status).count()
}

#[track_caller]
fn assert_limited(rsp: &Response) {
    assert_eq!(rsp.status, 429, "expected a rejection, got {} {:?}", rsp.status, rsp.text());
    assert_eq!(rsp.text(), "local_rate_limited");
    assert!(!rsp.from_upstream(), "a rejected request must not reach the upstream");
}

#[track_caller]
fn assert_passed(rsp: &Response) {
    assert_eq!(rsp.status, 200, "expected the upstream's 200, got {} {:?}", rsp.status, rsp.text());
    assert!(rsp.from_upstream());
}

fn h<'a>(rsp: &'a Response, name: &str) -> Option<&'a str> {
    rsp.header(name)
}

fn get_with(path: &str, headers: &[(&str, &str)]) -> Request {
    Request::get(path).headers(headers.iter().copied())
}

// === local limits ===

/// The headline: thousands of concurrent requests on fresh connections, spread over both
/// workers, and the bucket admits exactly its tokens — no more, no less.
#[test]
fn local_limit_is_exact_across_workers_under_concurrent_load() {
    let up = Upstream::start();
    let envoy = envoy(&up, json!({"rules": [{"name": "all", "tokenBucket": bucket(150, 1, "1h")}]}));
    let n = 3000;
    let rsps = ok(fire(envoy.listener_addr(), n, 32, |_| Request::get("/")));
    assert_eq!(count(&rsps, 200), 150, "admitted exactly maxTokens");
    assert_eq!(count(&rsps, 429), n - 150);
    assert_eq!(up.requests(), 150);
    let port = envoy.listener_addr().port();
    for w in 0..2 {
        let conns = envoy.stat_or_zero(&format!("listener.127.0.0.1_{port}.worker_{w}.downstream_cx_total"));
        assert!(conns > 100, "worker {w} served only {conns} connections: the load must cross workers");
    }
    assert_eq!(stat(&envoy, "all", "enabled"), n as u64);
    assert_eq!(stat(&envoy, "all", "ok"), 150);
    assert_eq!(stat(&envoy, "all", "rate_limited"), n as u64 - 150);
    assert_eq!(stat(&envoy, "all", "enforced"), n as u64 - 150);
    let prom = envoy.prometheus();
    assert!(prom.contains(r#"meshwasm_ratelimit_ok{rule="all"} 150"#), "the rule label in Prometheus:\n{prom}");
}

#[test]
fn rejection_reply_and_rate_limit_headers() {
    let up = Upstream::start();
    let envoy = envoy(&up, json!({"rateLimitHeaders": true, "rules": [{"tokenBucket": bucket(2, 1, "10s")}]}));
    let a = envoy.get("/");
    assert_passed(&a);
    assert_eq!(
        (h(&a, "x-ratelimit-limit"), h(&a, "x-ratelimit-remaining"), h(&a, "x-ratelimit-reset")),
        (Some("2"), Some("1"), Some("0"))
    );
    let b = envoy.get("/");
    assert_passed(&b);
    assert_eq!((h(&b, "x-ratelimit-remaining"), h(&b, "x-ratelimit-reset")), (Some("0"), Some("10")));
    assert!(h(&b, "retry-after").is_none(), "retry-after only on rejections");
    let c = envoy.get("/");
    assert_limited(&c);
    assert_eq!((h(&c, "x-ratelimit-limit"), h(&c, "x-ratelimit-remaining")), (Some("2"), Some("0")));
    let reset: u64 = h(&c, "x-ratelimit-reset").unwrap().parse().unwrap();
    assert!((9..=10).contains(&reset), "{reset}");
    assert_eq!(h(&c, "retry-after"), Some(reset.to_string().as_str()));
}

#[test]
fn headers_are_off_by_default_and_custom_status() {
    let up = Upstream::start();
    let envoy = envoy(&up, json!({"statusCode": 503, "rules": [{"tokenBucket": bucket(1, 1, "1h")}]}));
    let a = envoy.get("/");
    assert_passed(&a);
    assert!(h(&a, "x-ratelimit-limit").is_none());
    let b = envoy.get("/");
    assert_eq!((b.status, b.text().as_str()), (503, "local_rate_limited"));
    assert!(h(&b, "x-ratelimit-remaining").is_none());
    assert_eq!(h(&b, "retry-after"), Some("3600"));
}

#[test]
fn refill_is_computed_from_time() {
    let up = Upstream::start();
    // 2 tokens, refilled at 2 per second (one per 500 ms).
    let envoy = envoy(&up, json!({"rules": [{"tokenBucket": bucket(2, 2, "1s")}]}));
    let burst = |n| (0..n).map(|_| envoy.get("/").status).collect::<Vec<_>>();
    assert_eq!(burst(3), [200, 200, 429]);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(burst(2), [200, 429], "~1.2 tokens after 600 ms");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(burst(3), [200, 200, 429], "refill caps at maxTokens");
}

#[test]
fn keyed_buckets_quota_and_match() {
    let up = Upstream::start();
    let envoy = envoy(
        &up,
        json!({"rules": [{"name": "daily-quota", "match": [{"uri": {"prefix": "/api"}}],
            "descriptors": [{"requestHeader": {"name": "x-api-key", "key": "api_key"}}],
            "tokenBucket": bucket(3, 3, "24h")}]}),
    );
    let send = |key: &str, path: &str| envoy.send(get_with(path, &[("x-api-key", key)])).status;
    assert_eq!((0..4).map(|_| send("alice", "/api/a")).collect::<Vec<_>>(), [200, 200, 200, 429]);
    assert_eq!((0..4).map(|_| send("bob", "/api/b")).collect::<Vec<_>>(), [200, 200, 200, 429], "own bucket");
    assert_eq!(send("alice", "/other"), 200, "the rule's match restricts it to /api");
    // No key: the descriptor cannot be built, so the rule does not apply (Envoy's rule).
    assert!((0..5).all(|_| envoy.get("/api/x").status == 200));
    assert_eq!(stat(&envoy, "daily-quota", "rate_limited"), 2);
}

#[test]
fn every_matching_rule_needs_a_token_and_rejections_refund() {
    let up = Upstream::start();
    let envoy = envoy(
        &up,
        json!({"rules": [
            {"name": "site", "tokenBucket": bucket(5, 1, "1h")},
            {"name": "per-user", "descriptors": [{"requestHeader": {"name": "x-user"}}], "tokenBucket": bucket(2, 1, "1h")}
        ]}),
    );
    let send = |u: &str| envoy.send(get_with("/", &[("x-user", u)])).status;
    // alice: 2 ok, the third is rejected by per-user and its site token is given back.
    assert_eq!([send("alice"), send("alice"), send("alice")], [200, 200, 429]);
    assert_eq!([send("bob"), send("bob")], [200, 200]);
    // site has 1 token left (5 − 4 admitted), not 0.
    assert_eq!([send("carol"), send("carol")], [200, 429]);
    assert_eq!(stat(&envoy, "site", "rate_limited"), 1);
    assert_eq!(stat(&envoy, "per-user", "rate_limited"), 1);
}

#[test]
fn remote_address_behind_trusted_proxies() {
    let up = Upstream::start();
    let envoy = envoy(
        &up,
        json!({"rules": [{"descriptors": [{"remoteAddress": {"xffNumTrustedHops": 1}}], "tokenBucket": bucket(1, 1, "1h")}]}),
    );
    let send = |xff: &str| envoy.send(get_with("/", &[("x-forwarded-for", xff)])).status;
    assert_eq!(send("198.51.100.1"), 200);
    assert_eq!(send("198.51.100.1"), 429);
    assert_eq!(send("198.51.100.2"), 200, "another client");
    assert_eq!(send("203.0.113.9, 198.51.100.1"), 429, "a forged entry left of the trusted hop is ignored");
    // Without the header, the peer address (127.0.0.1) is the key.
    assert_eq!(envoy.get("/").status, 200);
    assert_eq!(envoy.get("/").status, 429);
}

#[test]
fn path_method_generic_and_header_value_match_descriptors() {
    let up = Upstream::start();
    let envoy = envoy(
        &up,
        json!({"rules": [{"name": "writes",
            "descriptors": [{"path": {}}, {"method": {}}, {"genericKey": {"value": "w"}},
                            {"headerValueMatch": {"value": "json", "match": {"headers": {"content-type": {"prefix": "application/json"}}}}}],
            "tokenBucket": bucket(1, 1, "1h")}]}),
    );
    let post = |path: &str, ct: &str| envoy.send(Request::post(path, "{}").header("content-type", ct)).status;
    assert_eq!(post("/a?x=1", "application/json"), 200);
    assert_eq!(post("/a?x=2", "application/json"), 429, "the path key ignores the query");
    assert_eq!(post("/b", "application/json"), 200, "another path");
    assert_eq!(post("/a", "text/plain"), 200, "header value does not match: the rule does not apply");
    assert_eq!(
        envoy.send(Request::new("PUT", "/a").header("content-type", "application/json")).status,
        200,
        "another method"
    );
}

#[test]
fn a_flood_of_keys_is_bounded_by_max_keys() {
    let up = Upstream::start();
    let envoy = envoy(
        &up,
        json!({"maxKeys": 32, "rules": [{"name": "k", "descriptors": [{"requestHeader": {"name": "x-key"}}], "tokenBucket": bucket(1, 1, "1h")}]}),
    );
    let send = |k: &str| envoy.send(get_with("/", &[("x-key", k)])).status;
    assert_eq!([send("victim"), send("victim")], [200, 429]);
    let n = 2000;
    let rsps = ok(fire(envoy.listener_addr(), n, 16, |i| get_with("/", &[("x-key", &format!("flood-{i}"))])));
    assert_eq!(count(&rsps, 200), n, "every new key starts with a full bucket");
    let evicted = stat(&envoy, "k", "keys_evicted");
    assert!(evicted >= (n - 32) as u64, "{evicted} evictions for {n} keys in 32 slots");
    // The victim's bucket was evicted along the way: it starts full again (documented).
    assert_eq!(send("victim"), 200);
    let mem = envoy.admin_get("/memory").json();
    assert!(mem["allocated"].as_str().unwrap().parse::<u64>().unwrap() < 512 << 20);
}

#[test]
fn dry_run_counts_and_logs_but_lets_everything_through() {
    let up = Upstream::start();
    let envoy = envoy(&up, json!({"mode": "dryRun", "rules": [{"name": "shadow", "tokenBucket": bucket(2, 1, "1h")}]}));
    for _ in 0..5 {
        assert_passed(&envoy.get("/"));
    }
    assert_eq!(stat(&envoy, "shadow", "ok"), 2);
    assert_eq!(stat(&envoy, "shadow", "rate_limited"), 3);
    assert_eq!(stat(&envoy, "shadow", "enforced"), 0);
    assert!(envoy.log().contains("dry run: rule shadow would rate limit"), "{}", envoy.log());
}

#[test]
fn grpc_requests_get_a_grpc_status() {
    let up = Upstream::start();
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .upstream_h2()
        .listener(
            Listener::new().filter(Filter::wasm("ratelimit", json!({"rules": [{"tokenBucket": bucket(1, 1, "1h")}]}))),
        )
        .listener(
            Listener::new().filter(
                Filter::wasm(
                    "ratelimit",
                    json!({"grpcStatus": "RESOURCE_EXHAUSTED", "rules": [{"tokenBucket": bucket(1, 1, "1h")}]}),
                )
                .plugin_name("second"),
            ),
        )
        .start();
    let call = |i| envoy.send_to(i, Request::grpc("/pkg.Svc/Method", b""));
    for (i, code) in [(0, 14), (1, 8)] {
        let a = call(i);
        assert_eq!(a.grpc_status(), Some(0), "listener {i}: first call passes");
        let b = call(i);
        assert_eq!(b.status, 200);
        assert_eq!(b.grpc_status(), Some(code), "listener {i}");
        assert_eq!(b.grpc_message().as_deref(), Some("local_rate_limited"));
    }
}

#[test]
fn per_route_override_from_route_metadata() {
    let up = Upstream::start();
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .listener(
            Listener::new()
                .filter(Filter::wasm(
                    "ratelimit",
                    json!({"rules": [{"name": "plugin", "tokenBucket": bucket(100, 1, "1h")}]}),
                ))
                .route(Route::new("strict", "/strict").meshwasm_override(
                    "ratelimit",
                    json!({"rules": [{"name": "plugin", "tokenBucket": bucket(1, 1, "1h")}]}),
                ))
                .route(Route::new("open", "/open").meshwasm_override("ratelimit", json!({})))
                .route(Route::new("default", "/")),
        )
        .start();
    assert_eq!([envoy.get("/strict").status, envoy.get("/strict").status], [200, 429]);
    assert!((0..5).all(|_| envoy.get("/").status == 200), "the plugin's bucket is not the route's");
    assert!((0..150).all(|_| envoy.get("/open").status == 200), "an empty override: no limits on that route");
}

// === configuration errors ===

fn rejected(config: &str) -> String {
    let failed =
        Envoy::builder().listener(Listener::new().filter(Filter::wasm_raw("ratelimit", config))).expect_failure();
    assert!(!failed.status.success(), "Envoy exited {:?}", failed.status);
    failed.log
}

#[test]
fn bad_config_is_rejected_with_the_json_path() {
    let cases = [
        (
            r#"{"rules": [{"tokenBucket": {"maxTokens": 1, "fillInterval": "0s"}}]}"#,
            "rules[0].tokenBucket.fillInterval: must be at least 1ms",
        ),
        (
            r#"{"rules": [{"tokenBucket": {"maxTokens": 2, "tokensPerFill": 5, "fillInterval": "1s"}}]}"#,
            "rules[0].tokenBucket.tokensPerFill: must be in 1..=maxTokens (2), got 5",
        ),
        (
            r#"{"rules": [{"descriptors": [{"cookie": {"name": "a"}}], "tokenBucket": {"maxTokens": 1, "fillInterval": "1s"}}]}"#,
            "rules[0].descriptors[0]: unknown variant `cookie`",
        ),
        (r#"{"rateLimitService": {"domain": "d"}}"#, "rateLimitService.cluster: is required"),
        (
            r#"{"rules": [{"descriptors": [{"genericKey": {"value": "v"}}], "global": true}]}"#,
            "rules[0].global: needs rateLimitService",
        ),
    ];
    for (config, want) in cases {
        let log = rejected(config);
        assert!(
            log.contains("meshwasm.ratelimit: invalid configuration: ") && log.contains(want),
            "want {want:?} in:\n{log}"
        );
    }
}

// === global limits ===

const DOMAIN: &str = "meshwasm-test";

/// Keep a short test inside one fixed window of the service (hour windows, epoch aligned).
fn avoid_hour_end() {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let left = 3600 - now % 3600;
    if left < 20 {
        std::thread::sleep(Duration::from_secs(left + 1));
    }
}

fn rls_cluster(svc: &RateLimitService) -> String {
    rls_cluster_at("ratelimit", svc.addr().port())
}

fn rls_cluster_at(name: &str, port: u16) -> String {
    format!(
        r#"name: {name}
type: STATIC
connect_timeout: 1s
typed_extension_protocol_options:
  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
    "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
    explicit_http_config:
      http2_protocol_options: {{}}
load_assignment:
  cluster_name: {name}
  endpoints:
  - lb_endpoints:
    - endpoint:
        address:
          socket_address: {{ address: 127.0.0.1, port_value: {port} }}
"#
    )
}

fn global_config(extra: Value) -> Value {
    let mut c = json!({
        "rateLimitService": {"cluster": "ratelimit", "domain": DOMAIN, "timeout": "200ms"},
        "rules": [{"name": "fleet", "descriptors": [{"requestHeader": {"name": "x-client", "key": "client"}}], "global": true}]
    });
    if let (Value::Object(c), Value::Object(e)) = (&mut c, extra) {
        for (k, v) in e {
            if k == "rateLimitService" {
                for (sk, sv) in v.as_object().unwrap() {
                    c["rateLimitService"][sk] = sv.clone();
                }
            } else {
                c.insert(k, v);
            }
        }
    }
    c
}

fn service(redis: &Redis, limit: u32, headers: bool) -> RateLimitService {
    RateLimitService::builder()
        .redis(redis.addr())
        .config(
            ServiceConfig::new(DOMAIN, vec![Limit::new(&[("client", None)], limit, Unit::Hour)])
                .rate_limit_headers(headers)
                .request_header("x-ratelimit-checked", "yes"),
        )
        .start()
}

fn global_envoy(up: &Upstream, svc_port: u16, configs: &[Value]) -> Envoy {
    let mut b: EnvoyBuilder = Envoy::builder().upstream(up.addr()).cluster_yaml(&rls_cluster_at("ratelimit", svc_port));
    for c in configs {
        b = b.listener(Listener::new().filter(Filter::wasm("ratelimit", c.clone())));
    }
    b.start()
}

#[test]
fn global_limit_through_the_rate_limit_service() {
    avoid_hour_end();
    let redis = Redis::start();
    let svc = service(&redis, 3, true);
    let up = Upstream::start();
    let envoy = global_envoy(&up, svc.addr().port(), &[global_config(json!({}))]);
    let send = |c: &str| envoy.send(get_with("/", &[("x-client", c)]));
    for i in 0..3 {
        let r = send("acme");
        assert_passed(&r);
        assert_eq!(h(&r, "x-ratelimit-remaining"), Some((2 - i).to_string().as_str()), "the service's headers");
        assert_eq!(
            r.json()["headers"]["x-ratelimit-checked"],
            "yes",
            "the service's request headers reach the upstream"
        );
    }
    let r = send("acme");
    assert_limited(&r);
    assert_eq!(h(&r, "x-ratelimit-limit"), Some("3"));
    assert_eq!(h(&r, "x-envoy-ratelimited"), Some("true"), "as Envoy's rate limit filter marks it");
    assert!(h(&r, "retry-after").is_some_and(|s| s.parse::<u64>().unwrap() <= 3600));
    assert_passed(&send("other"));
    // What the service received: our domain, the descriptor, hits_addend 1.
    let last = svc.last_request().unwrap();
    assert_eq!(last.domain, DOMAIN);
    assert_eq!(last.descriptors.len(), 1);
    assert_eq!(last.descriptors[0].pairs(), [("client".to_string(), "other".to_string())]);
    assert_eq!(last.hits_addend, 1);
    assert!(redis.keys("meshwasm_rl:*").len() == 2, "{:?}", redis.keys("*"));
    assert_eq!((gstat(&envoy, "ok"), gstat(&envoy, "over_limit")), (4, 1));
    assert_eq!(stat(&envoy, "fleet", "rate_limited"), 1);
    // A request the rule does not apply to (no x-client) makes no call.
    let calls = svc.calls();
    assert_passed(&envoy.get("/"));
    assert_eq!(svc.calls(), calls);
}

#[test]
fn two_envoys_share_one_global_limit() {
    avoid_hour_end();
    let redis = Redis::start();
    // Two service replicas on one Redis: Redis is the shared state, as in production.
    let (svc_a, svc_b) = (service(&redis, 10, false), service(&redis, 10, false));
    let up = Upstream::start();
    let a = global_envoy(&up, svc_a.addr().port(), &[global_config(json!({}))]);
    let b = global_envoy(&up, svc_b.addr().port(), &[global_config(json!({}))]);
    let mut results = Vec::new();
    for i in 0..30 {
        let envoy = if i % 2 == 0 { &a } else { &b };
        results.push(envoy.send(get_with("/", &[("x-client", "shared")])).status);
    }
    assert_eq!(results.iter().filter(|s| **s == 200).count(), 10, "{results:?}");
    assert!(svc_a.calls() == 15 && svc_b.calls() == 15);
    assert_eq!(gstat(&a, "ok") + gstat(&b, "ok"), 10);
}

#[test]
fn local_rules_are_checked_first_so_a_local_rejection_costs_no_callout() {
    let redis = Redis::start();
    let svc = service(&redis, 100, false);
    let up = Upstream::start();
    let mut config = global_config(json!({}));
    config["rules"].as_array_mut().unwrap().push(json!({"name": "local", "tokenBucket": bucket(2, 1, "1h")}));
    let envoy = global_envoy(&up, svc.addr().port(), &[config]);
    let rsps: Vec<u16> = (0..5).map(|_| envoy.send(get_with("/", &[("x-client", "c")])).status).collect();
    assert_eq!(rsps, [200, 200, 429, 429, 429]);
    assert_eq!(svc.calls(), 2);
}

#[test]
fn global_dry_run_lets_over_limit_through() {
    avoid_hour_end();
    let redis = Redis::start();
    let svc = service(&redis, 1, false);
    let up = Upstream::start();
    let envoy = global_envoy(&up, svc.addr().port(), &[global_config(json!({"mode": "dryRun"}))]);
    for _ in 0..3 {
        assert_passed(&envoy.send(get_with("/", &[("x-client", "c")])));
    }
    assert_eq!(gstat(&envoy, "over_limit"), 2);
    assert_eq!((stat(&envoy, "fleet", "rate_limited"), stat(&envoy, "fleet", "enforced")), (2, 0));
}

/// Dry run never blocks, not even when the service fails under `failureMode: deny`.
#[test]
fn dry_run_does_not_deny_on_service_failure() {
    let up = Upstream::start();
    let config = global_config(json!({"mode": "dryRun", "rateLimitService": {"failureMode": "deny"}}));
    let envoy = global_envoy(&up, free_port(), &[config]);
    assert_passed(&envoy.send(get_with("/", &[("x-client", "c")])));
    assert_eq!(gstat(&envoy, "error"), 1);
    assert!(envoy.log().contains("would deny"), "{}", envoy.log());
}

/// Each way the service can fail, on two listeners: failureMode allow and deny.
#[test]
fn service_failures_follow_the_failure_mode() {
    let redis = Redis::start();
    let mut svc = service(&redis, 1000, false);
    let up = Upstream::start();
    let envoy = global_envoy(
        &up,
        svc.addr().port(),
        &[
            global_config(json!({"rateLimitService": {"failureMode": "allow", "timeout": "100ms"}})),
            global_config(json!({"rateLimitService": {"failureMode": "deny", "timeout": "100ms"}})),
        ],
    );
    let check = |what: &str| {
        let allow = envoy.send_to(0, get_with("/", &[("x-client", "c")]));
        assert_passed(&allow);
        let deny = envoy.send_to(1, get_with("/", &[("x-client", "c")]));
        assert_eq!((deny.status, deny.text().as_str()), (500, "rate_limit_service_error"), "{what}");
        assert!(!deny.from_upstream());
        (allow, deny)
    };
    let mut errors = 0;
    for (what, b) in [
        ("slow", Behaviour::Slow(Duration::from_millis(1500))),
        ("garbage", Behaviour::Garbage),
        ("grpc error", Behaviour::GrpcError(13)),
        ("overall UNKNOWN", Behaviour::Unknown),
    ] {
        svc.set_behaviour(b);
        let start = Instant::now();
        let (allow, _) = check(what);
        if what == "slow" {
            assert!(allow.elapsed < Duration::from_millis(1000), "the timeout bounds the wait: {:?}", allow.elapsed);
            assert!(start.elapsed() < Duration::from_millis(2500));
        }
        errors += 2;
        assert_eq!(gstat(&envoy, "error"), errors, "{what}");
    }
    svc.set_behaviour(Behaviour::Normal);
    assert_passed(&envoy.send_to(1, get_with("/", &[("x-client", "c")])));
    svc.stop();
    check("stopped");
    assert_eq!(gstat(&envoy, "failure_mode_allowed"), 5);
}

#[test]
fn a_cluster_missing_from_envoy_is_a_service_failure() {
    let up = Upstream::start();
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .listener(
            Listener::new()
                .filter(Filter::wasm("ratelimit", global_config(json!({"rateLimitService": {"cluster": "nope"}})))),
        )
        .listener(Listener::new().filter(Filter::wasm(
            "ratelimit",
            global_config(
                json!({"rateLimitService": {"cluster": "nope", "failureMode": "deny", "statusOnError": 503}}),
            ),
        )))
        .start();
    assert_passed(&envoy.send_to(0, get_with("/", &[("x-client", "c")])));
    assert_eq!(envoy.send_to(1, get_with("/", &[("x-client", "c")])).status, 503);
    assert!(envoy.log().contains("rate-limit service"), "the failure is logged");
}

#[test]
fn grpc_clients_over_a_global_limit_get_the_configured_status() {
    avoid_hour_end();
    let redis = Redis::start();
    let svc = service(&redis, 1, false);
    let up = Upstream::start();
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .upstream_h2()
        .cluster_yaml(&rls_cluster(&svc))
        .listener(
            Listener::new()
                .filter(Filter::wasm("ratelimit", global_config(json!({"grpcStatus": "RESOURCE_EXHAUSTED"})))),
        )
        .start();
    let call = || envoy.send(Request::grpc("/pkg.Svc/M", b"").header("x-client", "g"));
    assert_eq!(call().grpc_status(), Some(0));
    let r = call();
    assert_eq!((r.grpc_status(), r.grpc_message().as_deref()), (Some(8), Some("local_rate_limited")));
}

// === state scope and hostile input ===

/// Buckets are keyed by the plugin's name: listeners (or filter chains) that load the plugin
/// under one name share its limits; another name has its own.
#[test]
fn buckets_are_shared_by_plugin_name() {
    let up = Upstream::start();
    let config = json!({"rules": [{"name": "r", "tokenBucket": bucket(2, 1, "1h")}]});
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .listener(Listener::new().filter(Filter::wasm("ratelimit", config.clone())))
        .listener(Listener::new().filter(Filter::wasm("ratelimit", config.clone())))
        .listener(Listener::new().filter(Filter::wasm("ratelimit", config).plugin_name("other")))
        .start();
    let s = |i| envoy.send_to(i, Request::get("/")).status;
    assert_eq!([s(0), s(1), s(0), s(1)], [200, 200, 429, 429], "one bucket for both listeners");
    assert_eq!([s(2), s(2), s(2)], [200, 200, 429], "its own bucket");
}

/// Keys built from hostile headers stay bounded and distinct, and never break the filter.
#[test]
fn huge_and_odd_key_values_are_handled() {
    let up = Upstream::start();
    let envoy = envoy(
        &up,
        json!({"rules": [{"descriptors": [{"requestHeader": {"name": "x-key"}}, {"remoteAddress": {"xffNumTrustedHops": 3}}],
            "tokenBucket": bucket(1, 1, "1h")}]}),
    );
    let big_a = "a".repeat(8_000);
    let big_b = format!("{}b", "a".repeat(7_999));
    let send = |k: &str, xff: &str| envoy.send(get_with("/", &[("x-key", k), ("x-forwarded-for", xff)])).status;
    assert_eq!([send(&big_a, ""), send(&big_a, "")], [200, 429]);
    assert_eq!(send(&big_b, ""), 200, "long keys that differ only at the end are distinct");
    for xff in [",,,", " , ", "not-an-ip", "1.2.3.4:99, [::1]:5, x"] {
        assert!(matches!(send("k", xff), 200 | 429));
    }
    assert_eq!(envoy.get("/").status, 200, "still serving");
    assert!(!envoy.log().contains("panic"), "{}", envoy.log());
}
