//! `meshwasm from-istio` output in a real Envoy, each filter loading what the conversion
//! printed:
//!
//! - a VirtualService's faults, as the fault filter's plugin JSON (rules scoped to the
//!   VirtualService's hosts) and as per-route overrides, behave as Istio would apply them;
//! - its `retries` and `timeout`, as retry rules (every route in order, Istio's default policy
//!   where a route sets none) and per-route overrides, retry and time out in Envoy's router;
//! - AuthorizationPolicy + RequestAuthentication (inline `jwks`) deny, allow and refuse tokens
//!   in the authz filter;
//! - a Telemetry resource's overrides shape the telemetry filter's `istio_*` stats.

use std::process::Command;

use meshwasm_cli::istio::{convert, Output, Resource};
use meshwasm_tests::{Envoy, Filter, Listener, Request, Route, Upstream};
use serde_json::{json, Value};

fn virtual_service() -> Resource {
    Resource {
        file: "test".into(),
        value: json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "ratings", "namespace": "bookinfo"},
            "spec": {"hosts": ["ratings"], "http": [
                {"name": "jason", "match": [{"headers": {"end-user": {"exact": "jason"}}}],
                 "fault": {"abort": {"httpStatus": 500, "percentage": {"value": 100}}},
                 "route": [{"destination": {"host": "ratings"}}]},
                {"name": "everyone", "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 100}}},
                 "route": [{"destination": {"host": "ratings"}}]},
            ]}
        }),
    }
}

fn get(envoy: &Envoy, path: &str, authority: &str, user: Option<&str>) -> u16 {
    let mut req = Request::get(path).authority(authority);
    if let Some(u) = user {
        req = req.header("end-user", u);
    }
    envoy.send(req).status
}

#[test]
fn converted_plugin_rules_fault_what_istio_would_and_only_for_the_virtual_services_hosts() {
    let out = convert(&[virtual_service()]);
    assert!(out.errors.is_empty() && out.unsupported.is_empty(), "{:?} {:?}", out.errors, out.unsupported);
    let up = Upstream::start();
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .listener(Listener::new().filter(Filter::wasm("fault", out.plugins["fault"].clone())))
        .start();
    assert_eq!(get(&envoy, "/ratings/1", "ratings:9080", Some("jason")), 500, "route 0 (first match)");
    assert_eq!(get(&envoy, "/ratings/1", "ratings.bookinfo.svc.cluster.local", None), 418, "route 1");
    assert_eq!(get(&envoy, "/ratings/1", "reviews:9080", Some("jason")), 200, "another host is not faulted");
    assert_eq!(up.requests(), 1);
}

#[test]
fn converted_route_overrides_fault_their_routes() {
    let out = convert(&[virtual_service()]);
    let meta = |i: usize| -> Value { out.routes[i]["metadata"]["filter_metadata"]["meshwasm"]["fault"].clone() };
    let up = Upstream::start();
    // Envoy routes as the VirtualService does: jason's requests on one route, the rest on another.
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .listener(
            Listener::new()
                .filter(Filter::wasm("fault", json!({})))
                .route(Route::new("jason", "/jason").meshwasm_override("fault", meta(0)))
                .route(Route::new("everyone", "/").meshwasm_override("fault", meta(1))),
        )
        .start();
    assert_eq!(get(&envoy, "/jason", "ratings", None), 500);
    assert_eq!(get(&envoy, "/other", "ratings", None), 418);
    assert_eq!(up.requests(), 0);
}

// === retries and timeouts ===

fn resource(kind: &str, api: &str, spec: Value) -> Resource {
    Resource {
        file: "test".into(),
        value: json!({"apiVersion": api, "kind": kind, "metadata": {"name": "r", "namespace": "ns"}, "spec": spec}),
    }
}

fn converted(resources: &[Resource]) -> Output {
    let out = convert(resources);
    assert!(out.errors.is_empty() && out.unsupported.is_empty(), "{:?} {:?}", out.errors, out.unsupported);
    out
}

fn retry_vs() -> Resource {
    resource(
        "VirtualService",
        "networking.istio.io/v1",
        json!({"hosts": ["*"], "http": [
            {"name": "flaky", "match": [{"uri": {"prefix": "/flaky"}}],
             "retries": {"attempts": 3, "retryOn": "503"}, "route": [{"destination": {"host": "a"}}]},
            {"name": "slow", "match": [{"uri": {"prefix": "/slow"}}], "timeout": "200ms",
             "retries": {"attempts": 0}, "route": [{"destination": {"host": "a"}}]},
            {"name": "rest", "route": [{"destination": {"host": "a"}}]},
        ]}),
    )
}

/// The shipped carrier route action (envoy-configs/retry-carrier.yaml).
fn carrier() -> String {
    std::fs::read_to_string(meshwasm_tests::workspace_root().join("envoy-configs/retry-carrier.yaml")).unwrap()
}

fn flaky(path: &str, key: &str, fail: u32) -> Request {
    Request::get(path)
        .header("x-flaky-key", key)
        .header("x-flaky-fail", &fail.to_string())
        .header("x-flaky-mode", "status=503")
}

/// Istio's behaviour on the three routes: `flaky` 3 retries on 503, `slow` a 200 ms timeout
/// and no retries, `rest` Istio's default policy (2 retries on 503 among others).
fn assert_istio_retries(envoy: &Envoy, up: &Upstream, tag: &str) {
    let k = format!("{tag}-flaky-ok");
    assert_eq!(envoy.send(flaky("/flaky", &k, 3)).status, 200);
    assert_eq!(up.attempts(&k).len(), 4, "attempts: 3 → four tries");
    let k = format!("{tag}-flaky-exhausted");
    assert_eq!(envoy.send(flaky("/flaky", &k, 4)).status, 503);
    assert_eq!(up.attempts(&k).len(), 4);
    let k = format!("{tag}-rest");
    assert_eq!(envoy.send(flaky("/rest", &k, 3)).status, 503);
    assert_eq!(up.attempts(&k).len(), 3, "Istio's default policy: 2 retries");
    let rsp = envoy.send(Request::get("/slow").header("x-upstream-delay-ms", "2000"));
    assert_eq!(rsp.status, 504, "the route's 200ms timeout: {:?}", rsp.text());
    assert_eq!(envoy.send(Request::get("/slow")).status, 200);
}

#[test]
fn converted_retry_rules_retry_and_time_out_as_istio_would() {
    let out = converted(&[retry_vs()]);
    let up = Upstream::start();
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .upstream_h2()
        .listener(
            Listener::new()
                .filter(Filter::wasm("retry", out.plugins["retry"].clone()))
                .route(Route::new("default", "/").action_yaml(&carrier())),
        )
        .start();
    assert_istio_retries(&envoy, &up, "plugin");
}

#[test]
fn converted_retry_route_overrides_retry_and_time_out_on_their_routes() {
    let out = converted(&[retry_vs()]);
    let meta = |route: &str| -> Value {
        let r = out.routes.iter().find(|r| r["route"] == route).unwrap_or_else(|| panic!("no override for {route}"));
        r["metadata"]["filter_metadata"]["meshwasm"]["retry"].clone()
    };
    assert!(out.routes.iter().all(|r| r["route"] != "rest"), "no override where the route sets neither field");
    let up = Upstream::start();
    // Envoy routes as the VirtualService does; `rest` falls back to the plugin's default rule.
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .upstream_h2()
        .listener(
            Listener::new()
                .filter(Filter::wasm("retry", json!({"routeOverrides": true, "rules": [{"name": "istio-default"}]})))
                .route(Route::new("flaky", "/flaky").action_yaml(&carrier()).meshwasm_override("retry", meta("flaky")))
                .route(Route::new("slow", "/slow").action_yaml(&carrier()).meshwasm_override("retry", meta("slow")))
                .route(Route::new("rest", "/").action_yaml(&carrier())),
        )
        .start();
    assert_istio_retries(&envoy, &up, "route");
}

// === AuthorizationPolicy + RequestAuthentication ===

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl").args(args).output().expect("openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// An RSA key from `openssl genpkey`: the signing key and its public JWK.
fn rsa_key(name: &str) -> (jsonwebtoken::EncodingKey, Value) {
    let dir = std::env::temp_dir().join(format!("meshwasm-from-istio-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.pem"));
    openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", path.to_str().unwrap()]);
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&std::fs::read(&path).unwrap()).unwrap();
    let mut jwk =
        serde_json::to_value(jsonwebtoken::jwk::Jwk::from_encoding_key(&key, jsonwebtoken::Algorithm::RS256).unwrap())
            .unwrap();
    jwk["kid"] = json!(name);
    (key, jwk)
}

fn token(key: &jsonwebtoken::EncodingKey, kid: &str, sub: &str) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    h.kid = Some(kid.into());
    let claims = json!({"iss": "https://issuer.example.com", "sub": sub, "exp": now + 3600, "iat": now});
    jsonwebtoken::encode(&h, &claims, key).unwrap()
}

#[test]
fn converted_authorization_policy_and_request_authentication_decide_in_envoy() {
    let (key, jwk) = rsa_key("k1");
    let (other, _) = rsa_key("k2");
    let jwks = json!({"keys": [jwk]}).to_string();
    let authn = resource(
        "RequestAuthentication",
        "security.istio.io/v1",
        json!({"jwtRules": [{"issuer": "https://issuer.example.com", "jwks": jwks}]}),
    );
    let allow = resource(
        "AuthorizationPolicy",
        "security.istio.io/v1",
        json!({"action": "ALLOW", "rules": [
            {"from": [{"source": {"requestPrincipals": ["https://issuer.example.com/*"]}}],
             "to": [{"operation": {"paths": ["/api/*"]}}]}]}),
    );
    let mut deny = resource(
        "AuthorizationPolicy",
        "security.istio.io/v1",
        json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/api/admin"]}}]}]}),
    );
    deny.value["metadata"]["name"] = json!("deny-admin");
    let out = converted(&[authn, allow, deny]);
    let up = Upstream::start();
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .listener(Listener::new().filter(Filter::wasm("authz", out.plugins["authz"].clone())))
        .start();
    let get = |path: &str, bearer: Option<&str>| {
        let mut req = Request::get(path);
        if let Some(t) = bearer {
            req = req.header("authorization", &format!("Bearer {t}"));
        }
        envoy.send(req).status
    };
    let alice = token(&key, "k1", "alice");
    assert_eq!(get("/api/orders", None), 403, "no token: no request principal, ALLOW does not match");
    assert_eq!(get("/api/orders", Some(&alice)), 200);
    assert_eq!(get("/api/orders", Some(&token(&other, "k1", "mallory"))), 401, "a token the jwks does not verify");
    assert_eq!(get("/api/admin", Some(&alice)), 403, "DENY wins");
    assert_eq!(get("/other", Some(&alice)), 403, "no ALLOW rule for the path");
    assert_eq!(up.requests(), 1);
}

// === Telemetry ===

#[test]
fn converted_telemetry_overrides_shape_the_istio_stats() {
    let tel = resource(
        "Telemetry",
        "telemetry.istio.io/v1",
        json!({"selector": {"matchLabels": {"app": "x"}}, "metrics": [{"providers": [{"name": "prometheus"}], "overrides": [
            {"match": {"metric": "REQUEST_COUNT"}, "tagOverrides": {"request_protocol": {"value": "request.method"}}},
            {"match": {"metric": "REQUEST_DURATION"}, "disabled": true}]}]}),
    );
    let out = convert(&[tel]);
    assert!(out.errors.is_empty() && out.unsupported.is_empty(), "{:?} {:?}", out.errors, out.unsupported);
    let up = Upstream::start();
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .no_stats_tags()
        .listener(Listener::new().filter(Filter::wasm("telemetry", out.plugins["telemetry"].clone())))
        .start();
    for _ in 0..3 {
        assert_eq!(envoy.send(Request::get("/")).status, 200);
    }
    meshwasm_tests::eventually("istio_requests_total", std::time::Duration::from_secs(5), || {
        envoy.stats().iter().any(|(k, v)| k.contains("istio_requests_total") && *v == 3).then_some(())
    });
    let stats = envoy.admin_get("/stats").text();
    let requests: Vec<&str> = stats.lines().filter(|l| l.contains("istio_requests_total")).collect();
    assert!(!requests.is_empty() && requests.iter().all(|l| l.contains("request_protocol=.=GET;.;")), "{requests:?}");
    assert!(!stats.contains("istio_request_duration_milliseconds"), "REQUEST_DURATION is disabled");
    assert!(stats.contains("istio_request_bytes"), "the other metrics stay");
}
