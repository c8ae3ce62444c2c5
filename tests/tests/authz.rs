//! The authz filter end to end: `dist/authz.wasm` in a stock Envoy at `--concurrency 2`
//! with a real upstream. Each test pins one user-visible behaviour on responses and admin
//! stats. The decision-by-decision comparison with native RBAC configured by istiod is in
//! `authz_differential.rs`; CUSTOM (ext_authz) is in `authz_custom.rs`.

use meshwasm_tests::{Envoy, Filter, Listener, Request, Response, Upstream};
use serde_json::{json, Value};

fn policy(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
           "metadata": {"name": name, "namespace": "foo", "uid": "ignored", "resourceVersion": "1"},
           "spec": spec})
}

fn dry(mut p: Value) -> Value {
    p["metadata"]["annotations"] = json!({"istio.io/dry-run": "true"});
    p
}

fn envoy(up: &Upstream, policies: Vec<Value>) -> Envoy {
    Envoy::builder()
        .upstream(up.addr())
        .listener(Listener::new().filter(Filter::wasm("authz", json!({"policies": policies}))))
        .start()
}

fn stat(envoy: &Envoy, label: &str, stat: &str) -> u64 {
    envoy.stat_or_zero(&format!("wasmcustom.meshwasm.authz.rule.{label}.{stat}"))
}

#[track_caller]
fn assert_denied(rsp: &Response) {
    assert_eq!(rsp.status, 403, "expected RBAC's denial, got {} {:?}", rsp.status, rsp.text());
    assert_eq!(rsp.text(), "RBAC: access denied");
    assert!(!rsp.from_upstream(), "a denied request must not reach the upstream");
}

#[track_caller]
fn assert_allowed(rsp: &Response) {
    assert_eq!(rsp.status, 200, "expected the upstream, got {} {:?}", rsp.status, rsp.text());
    assert!(rsp.from_upstream());
}

#[test]
fn allow_policy_allows_matching_requests_and_denies_the_rest_like_rbac() {
    let up = Upstream::start();
    let envoy = envoy(
        &up,
        vec![policy(
            "api",
            json!({"action": "ALLOW", "rules": [{"to": [{"operation": {"methods": ["GET"], "paths": ["/api/*"]}}],
                                                  "when": [{"key": "request.headers[x-team]", "values": ["blue"]}]}]}),
        )],
    );
    assert_allowed(&envoy.send(Request::get("/api/v1").header("x-team", "blue")));
    assert_denied(&envoy.send(Request::get("/api/v1")));
    assert_denied(&envoy.send(Request::post("/api/v1", "x").header("x-team", "blue")));
    assert_denied(&envoy.send(Request::get("/other").header("x-team", "blue")));
    let h2 = envoy.send(Request::get("/api/v1").header("x-team", "blue").h2());
    assert_allowed(&h2);
    assert_eq!(stat(&envoy, "foo_api", "allowed"), 2);
    assert_eq!(envoy.stat_or_zero("wasmcustom.meshwasm.authz.denied"), 3);
    assert_eq!(envoy.stat_or_zero("wasmcustom.meshwasm.authz.allowed"), 2);
}

#[test]
fn grpc_requests_are_denied_with_permission_denied() {
    let up = Upstream::start();
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .upstream_h2()
        .listener(Listener::new().filter(Filter::wasm(
            "authz",
            json!({"policies": [policy("deny-admin", json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin.Admin/*"]}}]}]}))]}),
        )))
        .start();
    let rsp = envoy.send(Request::grpc("/admin.Admin/Drop", b"x"));
    assert_eq!(rsp.grpc_status(), Some(7), "PERMISSION_DENIED, as native RBAC: {:?}", rsp.headers);
    assert_eq!(rsp.grpc_message().as_deref(), Some("RBAC: access denied"));
    let ok = envoy.send(Request::grpc("/svc.Svc/Get", b"x"));
    assert_eq!(ok.grpc_status(), Some(0));
    assert_eq!(stat(&envoy, "foo_deny-admin", "denied"), 1);
}

#[test]
fn deny_wins_over_allow_and_no_allow_policy_means_allow() {
    let up = Upstream::start();
    let deny =
        policy("no-delete", json!({"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}]}));
    let envoy1 = envoy(&up, vec![deny.clone()]);
    assert_allowed(&envoy1.send(Request::get("/anything")));
    assert_denied(&envoy1.send(Request::new("DELETE", "/anything")));
    drop(envoy1);
    let allow_all = policy("allow-all", json!({"rules": [{}]}));
    let envoy2 = envoy(&up, vec![allow_all, deny]);
    assert_allowed(&envoy2.send(Request::get("/x")));
    assert_denied(&envoy2.send(Request::new("DELETE", "/x")));
    assert_eq!(stat(&envoy2, "foo_no-delete", "denied"), 1);
    assert_eq!(stat(&envoy2, "foo_allow-all", "allowed"), 1);
}

#[test]
fn allow_policy_without_rules_denies_everything() {
    let up = Upstream::start();
    let envoy = envoy(&up, vec![policy("allow-nothing", json!({}))]);
    assert_denied(&envoy.send(Request::get("/")));
    assert_eq!(up.requests(), 0);
}

#[test]
fn audit_counts_and_never_denies() {
    let up = Upstream::start();
    let envoy = envoy(
        &up,
        vec![policy(
            "audit-admin",
            json!({"action": "AUDIT", "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]}),
        )],
    );
    assert_allowed(&envoy.send(Request::get("/admin")));
    assert_allowed(&envoy.send(Request::get("/public")));
    assert_eq!(stat(&envoy, "foo_audit-admin", "audited"), 1);
    assert!(envoy.log().contains("audit: policy foo/audit-admin"), "audit is logged");
}

#[test]
fn dry_run_policies_count_shadow_results_and_never_enforce() {
    let up = Upstream::start();
    let envoy = envoy(
        &up,
        vec![
            dry(policy(
                "would-deny",
                json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/secret"]}}]}]}),
            )),
            // An only-dry-run ALLOW policy creates no default deny.
            dry(policy("would-allow", json!({"rules": [{"to": [{"operation": {"paths": ["/public"]}}]}]}))),
        ],
    );
    assert_allowed(&envoy.send(Request::get("/secret")));
    assert_allowed(&envoy.send(Request::get("/public")));
    assert_allowed(&envoy.send(Request::get("/other")));
    assert_eq!(stat(&envoy, "foo_would-deny", "shadow_denied"), 1);
    assert_eq!(stat(&envoy, "foo_would-allow", "shadow_allowed"), 1);
    // ALLOW shadow engine: /secret and /other matched no dry-run ALLOW policy.
    assert_eq!(envoy.stat_or_zero("wasmcustom.meshwasm.authz.shadow_denied"), 1 + 2);
    assert_eq!(envoy.stat_or_zero("wasmcustom.meshwasm.authz.denied"), 0);
    assert!(envoy.log().contains("dry-run DENY: the request would be denied (policy foo/would-deny"));
}

#[test]
fn prometheus_shows_the_policy_as_a_label() {
    let up = Upstream::start();
    let envoy = envoy(&up, vec![policy("api", json!({"rules": [{"to": [{"operation": {"paths": ["/ok"]}}]}]}))]);
    assert_allowed(&envoy.send(Request::get("/ok")));
    let prom = envoy.prometheus();
    assert!(prom.contains(r#"meshwasm_authz_allowed{rule="foo_api"} 1"#), "{prom}");
}

fn rejected(config: &str) -> String {
    let failed = Envoy::builder().listener(Listener::new().filter(Filter::wasm_raw("authz", config))).expect_failure();
    assert!(!failed.status.success());
    failed.log
}

#[test]
fn configurations_istiod_would_weaken_are_rejected_with_the_path() {
    let p = |spec: &str| {
        format!(
            r#"{{"policies": [{{"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                "metadata": {{"name": "p", "namespace": "foo"}}, "spec": {spec}}}]}}"#
        )
    };
    let cases = [
        (p(r#"{"rules": [{"when": [{"key": "request.foo", "values": ["x"]}]}]}"#), "policies[0].spec.rules[0].when[0].key: unknown attribute \"request.foo\""),
        (p(r#"{"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.300"]}}]}]}"#), "policies[0].spec.rules[0].from[0].source.ipBlocks[0]: invalid IP address"),
        (p(r#"{"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}"#), "policies[0].spec.rules[0].to[0].operation.ports[0]: invalid port"),
        (p(r#"{"action": "DENY"}"#), "policies[0].spec.rules: a DENY policy without rules"),
        (p(r#"{"action": "CUSTOM", "provider": {"name": "nope"}, "rules": [{}]}"#), "policies[0].spec.provider.name: unknown provider \"nope\""),
        (p(r#"{"action": "ALLOW", "rulez": []}"#), "unknown field `rulez`"),
        (r#"{"policies": [{"apiVersion": "v1", "kind": "AuthorizationPolicy", "metadata": {"name": "p"}, "spec": {}}]}"#.to_string(), "policies[0].apiVersion: must be security.istio.io/v1"),
    ];
    for (config, want) in cases {
        let log = rejected(&config);
        assert!(log.contains(want), "want {want:?} in Envoy's log:\n{log}");
    }
}
