//! `examples/authz-jwt` through a real Envoy: the plugin configuration its envoy.yaml embeds
//! (which must be `authz.json` verbatim), with the example's `jwks` cluster pointing at a real
//! JWKS server serving keys from `openssl genpkey`, answers each request of the example's
//! README as the README says: token-less requests allowed or denied by the policy, a valid
//! token through with its claim headers and without the token, expired → 401, wrong audience
//! → 403, a token signed by another key → 401, the `groups` claim condition, spoofed claim
//! headers removed. (`cargo xtask test` validates the envoy.yaml itself with `--mode validate`.)

use jsonwebtoken::{Algorithm, EncodingKey};
use meshwasm_tests::jwks_server::JwksServer;
use meshwasm_tests::jwt::{keys, mint, now};
use meshwasm_tests::{workspace_root, Envoy, Filter, Listener, Request, Response, Upstream};
use serde_json::{json, Value};

const ISS: &str = "https://issuer.example";

/// The `value: '…'` of envoy.yaml's plugin configuration (YAML single-quoted: `''` is `'`).
fn embedded_plugin_config(envoy_yaml: &str) -> String {
    let line = envoy_yaml.lines().find(|l| l.trim_start().starts_with("value: '")).expect("a value: '...' line");
    let v = line.trim_start().trim_start_matches("value: '").trim_end();
    v.strip_suffix('\'').expect("closing quote").replace("''", "'")
}

fn upstream_saw(r: &Response) -> Value {
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["headers"].clone()
}

#[test]
fn example_config_answers_as_the_readme_says() {
    let dir = workspace_root().join("examples").join("authz-jwt");
    let config = std::fs::read_to_string(dir.join("authz.json")).unwrap();
    let envoy_yaml = std::fs::read_to_string(dir.join("envoy.yaml")).unwrap();
    assert_eq!(embedded_plugin_config(&envoy_yaml), config.trim(), "envoy.yaml must embed authz.json verbatim");
    let plugin: Value = serde_json::from_str(&config).unwrap();
    let uri = plugin["authentication"][0]["spec"]["jwtRules"][0]["jwksUri"].as_str().unwrap();
    assert_eq!(plugin["jwks"][uri]["cluster"], "jwks");

    let tmp = std::env::temp_dir().join(format!("meshwasm-jwt-example-{}", std::process::id()));
    std::fs::create_dir_all(tmp.join("other")).unwrap();
    let k = keys(&tmp);
    let other = keys(&tmp.join("other"));
    let _ = std::fs::remove_dir_all(&tmp);
    let server = JwksServer::start(&k.jwks);
    let up = Upstream::start();
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .http_cluster("jwks", server.addr())
        .listener(Listener::new().filter(Filter::wasm_raw("authz", &config)))
        .start();

    let token = |key: &EncodingKey, kid: &str, f: &dyn Fn(&mut Value)| {
        let mut c =
            json!({"iss": ISS, "sub": "alice", "aud": "api.example", "exp": now() + 3600, "scope": "read write"});
        f(&mut c);
        mint(key, Algorithm::RS256, Some(kid), &c)
    };
    let valid = token(&k.rsa1, "rsa1", &|_| {});
    let get = |path: &str, t: Option<&str>| {
        let mut r = Request::get(path);
        if let Some(t) = t {
            r = r.header("authorization", &format!("Bearer {t}"));
        }
        envoy.send(r)
    };
    let rejected = |r: &Response, status: u16, body: &str, path: &str| {
        assert_eq!((r.status, r.text().as_str()), (status, body), "{path}");
    };

    // No token: /public is open, /api needs a principal.
    assert_eq!(get("/public/hello", None).status, 200);
    rejected(&get("/api/items", None), 403, "RBAC: access denied", "/api/items without a token");
    // A valid token: through, with the claim headers and without the token.
    let seen = upstream_saw(&get("/api/items", Some(&valid)));
    assert_eq!(seen["x-jwt-sub"], "alice");
    assert_eq!(seen["x-jwt-scope"], "read write");
    assert!(seen.get("authorization").is_none(), "{seen}");
    assert_eq!(
        envoy.send(Request::post("/api/items", "x").header("authorization", &format!("Bearer {valid}"))).status,
        403
    );
    // Expired beyond the 60 s skew, another audience, another key.
    let expired = token(&k.rsa1, "rsa1", &|c| c["exp"] = json!(now() - 120));
    let r = get("/api/items", Some(&expired));
    rejected(&r, 401, "Jwt is expired", "expired");
    // The client's `host` is meshwasm.test.
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"http://meshwasm.test/api/items\", error=\"invalid_token\"")
    );
    let aud = token(&k.rsa1, "rsa1", &|c| c["aud"] = json!("other.example"));
    rejected(&get("/api/items", Some(&aud)), 403, "Audiences in Jwt are not allowed", "wrong audience");
    let forged = token(&other.rsa1, "rsa1", &|_| {});
    rejected(&get("/api/items", Some(&forged)), 401, "Jwt verification fails", "another key");
    // The claim condition.
    rejected(&get("/admin/users", Some(&valid)), 403, "RBAC: access denied", "/admin without the admin group");
    let admin = token(&k.rsa1, "rsa1", &|c| c["groups"] = json!(["dev", "admin"]));
    assert_eq!(upstream_saw(&get("/admin/users", Some(&admin)))["x-jwt-sub"], "alice");
    // A client's own claim header never reaches the upstream.
    let spoofed = envoy.send(Request::get("/public/hello").header("x-jwt-sub", "root"));
    assert!(upstream_saw(&spoofed).get("x-jwt-sub").is_none());
    assert_eq!(server.fetches(), 1);
    assert_eq!(envoy.stat("wasmcustom.meshwasm.authz.jwt.jwks_fetch_success"), Some(1));
}
