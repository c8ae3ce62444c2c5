//! RequestAuthentication against the real thing: native `envoy.filters.http.jwt_authn`
//! configured exactly as istiod configures it (providers `origins-<i>` sorted by issuer,
//! `requires_any {provider, allow_missing}`, `local_jwks` inline, payload in metadata with
//! space-delimited claims, `bypass_cors_preflight`) followed by native RBAC on one listener,
//! and `authz.wasm` with the same RequestAuthentication and AuthorizationPolicy resources on
//! its twin. Tokens are minted by `jsonwebtoken` with keys from `openssl genpkey`; hostile
//! tokens are assembled by hand and signed with the same library. Every request of the attack
//! corpus must get the same status, body and `www-authenticate`, and when it reaches the
//! upstream, the same path and token/claim headers.

use meshwasm_tests::jwt::*;
use meshwasm_tests::{Envoy, Filter, Listener, Upstream};
use serde_json::{json, Value};

fn meta(path: &[&str], value: Value) -> Value {
    json!({"metadata": {"filter": "envoy.filters.http.jwt_authn",
        "path": std::iter::once("payload").chain(path.iter().copied()).map(|k| json!({"key": k})).collect::<Vec<_>>(),
        "value": value}})
}

/// istiod's extended claim matcher: a string, or a list containing the string.
fn claim_matcher(path: &[&str], v: &str) -> Value {
    let or = json!({"stringMatch": {"exact": v}});
    meta(path, json!({"orMatch": {"valueMatchers": [{"listMatch": {"oneOf": or}}, or]}}))
}

fn request_principal(iss: Value, sub: Value) -> Value {
    json!({"andIds": {"ids": [meta(&["iss"], json!({"stringMatch": iss})), meta(&["sub"], json!({"stringMatch": sub}))]}})
}

/// The AuthorizationPolicy, and the native RBAC filter istiod emits for it.
fn policy() -> (Value, String) {
    let p = json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
    "metadata": {"name": "jwt", "namespace": "foo"},
    "spec": {"action": "ALLOW", "rules": [
        {"to": [{"operation": {"paths": ["/public*"]}}]},
        {"from": [{"source": {"requestPrincipals": [format!("{ISS}/alice")]}}], "to": [{"operation": {"paths": ["/alice*"]}}]},
        {"from": [{"source": {"requestPrincipals": ["*"]}}], "to": [{"operation": {"paths": ["/any*"]}}]},
        {"to": [{"operation": {"paths": ["/admin*"]}}], "when": [{"key": "request.auth.claims[groups]", "values": ["admin"]}]},
        {"to": [{"operation": {"paths": ["/write*"]}}], "when": [{"key": "request.auth.claims[scope]", "values": ["write"]}]},
        {"to": [{"operation": {"paths": ["/nested*"]}}], "when": [{"key": "request.auth.claims[nested][role]", "values": ["x"]}]},
        {"to": [{"operation": {"paths": ["/aud*"]}}], "when": [{"key": "request.auth.audiences", "values": ["api.example"]}, {"key": "request.auth.presenter", "values": ["cli"]}]},
    ]}});
    let rule = |i: usize, prefix: &str, principal: Value| {
        (
            format!("ns[foo]-policy[jwt]-rule[{i}]"),
            json!({"permissions": [{"urlPath": {"path": {"prefix": prefix}}}], "principals": [principal]}),
        )
    };
    let any = json!({"safeRegex": {"regex": ".+"}});
    let policies: serde_json::Map<String, Value> = [
        rule(0, "/public", json!({"any": true})),
        rule(1, "/alice", request_principal(json!({"exact": ISS}), json!({"exact": "alice"}))),
        rule(2, "/any", request_principal(any.clone(), any)),
        rule(3, "/admin", claim_matcher(&["groups"], "admin")),
        rule(4, "/write", claim_matcher(&["scope"], "write")),
        rule(5, "/nested", claim_matcher(&["nested", "role"], "x")),
        rule(
            6,
            "/aud",
            json!({"andIds": {"ids": [claim_matcher(&["aud"], "api.example"), claim_matcher(&["azp"], "cli")]}}),
        ),
    ]
    .into_iter()
    .collect();
    let rbac = json!({"@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
        "rules": {"action": "ALLOW", "policies": policies}});
    (p, format!("name: envoy.filters.http.rbac\ntyped_config: {rbac}\n"))
}

#[test]
fn jwt_authn_and_rbac_decide_like_native() {
    let dir = std::env::temp_dir().join(format!("meshwasm-jwt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let k = keys(&dir);
    let jwks = k.jwks.to_string();
    let single = vec![json!({
        "issuer": ISS, "jwks": jwks, "audiences": ["api.example", "https://other/"],
        "outputPayloadToHeader": "x-jwt-payload",
        "outputClaimToHeaders": [{"header": "x-sub", "claim": "sub"}, {"header": "x-groups", "claim": "groups"},
                                 {"header": "x-nested", "claim": "nested.role"}, {"header": "x-exp", "claim": "exp"}],
    })];
    let multi = vec![
        json!({"issuer": ISS2, "jwks": jwks, "forwardOriginalToken": true,
               "fromHeaders": [{"name": "x-token", "prefix": "Token "}, {"name": "Authorization", "prefix": "Bearer "}],
               "fromParams": ["tok"], "fromCookies": ["session"], "outputClaimToHeaders": [{"header": "x-sub", "claim": "sub"}]}),
        json!({"issuer": ISS, "jwks": jwks}),
    ];
    let (policy, rbac) = policy();
    let up = Upstream::start();
    let wasm = |rules: &[Value], policies: Value| {
        Filter::wasm("authz", json!({"authentication": [request_authentication(json!(rules))], "policies": policies}))
    };
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .listener(
            Listener::new()
                .name("native")
                .filter(Filter::native(&istiod_jwt_authn(&single)))
                .filter(Filter::native(&rbac)),
        )
        .listener(Listener::new().name("wasm").filter(wasm(&single, json!([policy]))))
        .listener(Listener::new().name("native_multi").filter(Filter::native(&istiod_jwt_authn(&multi))))
        .listener(Listener::new().name("wasm_multi").filter(wasm(&multi, json!([]))))
        .start();
    let reqs = corpus(&k);
    let rejected = compare(&envoy, 0, 1, &reqs);
    let multi_reqs = corpus_multi(&k);
    let rejected_multi = compare(&envoy, 2, 3, &multi_reqs);
    println!("{} + {} requests, {rejected} + {rejected_multi} rejected by both", reqs.len(), multi_reqs.len());
    assert!(reqs.len() > 150 && rejected > 40 && rejected < reqs.len() - 20, "corpus too one-sided");
    assert!(rejected_multi >= 3);
    let _ = std::fs::remove_dir_all(&dir);
}
