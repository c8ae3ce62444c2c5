//! Remote key sets (`jwksUri`) through a real Envoy with two workers (`--concurrency 2`) and a
//! real JWKS server (`meshwasm_tests::jwks_server`) serving keys the test generated, switched
//! to slow, down, 503, garbage and rotated keys while Envoy runs. Where the outcome is
//! observable on a request, native `jwt_authn` configured as istiod configures a `jwksUri`
//! (`remote_jwks` with the rule's timeout, no `async_fetch`) runs on a twin listener against
//! its own JWKS server in the same mode, and both must answer alike.

use std::time::Duration;

use jsonwebtoken::Algorithm;
use meshwasm_tests::client::send_and_disconnect;
use meshwasm_tests::jwks_server::{JwksServer, Mode};
use meshwasm_tests::jwt::*;
use meshwasm_tests::{eventually, Envoy, Filter, Listener, Request, Upstream};
use serde_json::{json, Value};

const JWKS_PATH: &str = "/.well-known/jwks.json";

struct Setup {
    envoy: Envoy,
    native_keys: JwksServer,
    wasm_keys: JwksServer,
    _up: Upstream,
}

/// Listener 0: native jwt_authn with `rule` (its `jwksUri` pointing at `native_keys`);
/// listener 1: authz.wasm with the same rule pointing at `wasm_keys`.
fn setup(rule: Value, cache: &str, jwks: &Value, mode: Mode) -> Setup {
    let native_keys = JwksServer::start(jwks);
    let wasm_keys = JwksServer::start(jwks);
    native_keys.set_mode(mode.clone());
    wasm_keys.set_mode(mode);
    let with_uri = |s: &JwksServer| {
        let mut r = rule.clone();
        r["jwksUri"] = json!(s.uri(JWKS_PATH));
        r
    };
    let (nr, wr) = (with_uri(&native_keys), with_uri(&wasm_keys));
    let sources =
        |s: &JwksServer, cluster: &str| json!({ s.uri(JWKS_PATH): {"cluster": cluster, "cacheDuration": cache} });
    let up = Upstream::start();
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .concurrency(2)
        .component_log_level("wasm:debug")
        .http_cluster("jwks_native", native_keys.addr())
        .http_cluster("jwks_wasm", wasm_keys.addr())
        .listener(Listener::new().name("native").filter(Filter::native(&istiod_jwt_authn_remote(
            std::slice::from_ref(&nr),
            &sources(&native_keys, "jwks_native"),
        ))))
        .listener(Listener::new().name("wasm").filter(Filter::wasm(
            "authz",
            json!({"authentication": [request_authentication(json!([wr]))], "jwks": sources(&wasm_keys, "jwks_wasm")}),
        )))
        .start();
    Setup { envoy, native_keys, wasm_keys, _up: up }
}

fn rule() -> Value {
    json!({"issuer": ISS, "audiences": ["api.example"], "outputClaimToHeaders": [{"header": "x-sub", "claim": "sub"}]})
}

fn get(path: &str, token: Option<&str>) -> Req {
    let headers: Vec<String> = token.map(bearer).into_iter().collect();
    req(path, path, &headers)
}

/// Both listeners' answer to `r` (asserted equal).
fn both(s: &Setup, r: &Req) -> Seen {
    let b = r.bytes();
    let n = seen(s.envoy.listener_addr_of(0), &b);
    let w = seen(s.envoy.listener_addr_of(1), &b);
    assert_eq!(w, n, "{}: wasm vs native", r.name);
    w
}

fn fetch_failed(realm_path: &str) -> Seen {
    Seen {
        status: 401,
        body: "Jwks remote fetch is failed".into(),
        www: Some(format!("Bearer realm=\"http://example.com{realm_path}\", error=\"invalid_token\"")),
        upstream: None,
    }
}

fn temp_keys(tag: &str) -> Keys {
    let dir = std::env::temp_dir().join(format!("meshwasm-jwks-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let k = keys(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    k
}

#[test]
fn remote_jwks_decides_like_native_with_one_fetch_per_process() {
    let k = temp_keys("corpus");
    let mut r = rule();
    r["audiences"] = json!(["api.example", "https://other/"]);
    r["outputPayloadToHeader"] = json!("x-jwt-payload");
    r["outputClaimToHeaders"] = json!([{"header": "x-sub", "claim": "sub"}, {"header": "x-groups", "claim": "groups"},
                                       {"header": "x-nested", "claim": "nested.role"}, {"header": "x-exp", "claim": "exp"}]);
    let s = setup(r, "300s", &k.jwks, Mode::Serve);
    let reqs = corpus(&k);
    let rejected = compare(&s.envoy, 0, 1, &reqs);
    println!(
        "{} requests, {rejected} rejected by both; JWKS fetches: native {}, wasm {}",
        reqs.len(),
        s.native_keys.fetches(),
        s.wasm_keys.fetches()
    );
    assert!(rejected > 40 && rejected < reqs.len() - 20, "corpus too one-sided");
    // Two workers, one fetch: the other worker read the shared copy.
    assert_eq!(s.wasm_keys.fetches(), 1);
    assert_eq!(s.envoy.stat("wasmcustom.meshwasm.authz.jwt.jwks_fetch_success"), Some(1));
    assert_eq!(s.envoy.stat_or_zero("wasmcustom.meshwasm.authz.jwt.jwks_fetch_failed"), 0);
    let prom = s.envoy.prometheus();
    let label = format!("http___{}_{}__well-known_jwks_json", "127_0_0_1", s.wasm_keys.addr().port());
    assert!(prom.contains(&format!("meshwasm_authz_jwks_fetch_success{{rule=\"{label}\"}} 1")), "{prom}");
}

#[test]
fn first_requests_wait_for_a_slow_first_fetch() {
    let k = temp_keys("slow");
    let s = setup(rule(), "300s", &k.jwks, Mode::Slow(Duration::from_millis(1500)));
    let good = mint(&k.rsa1, Algorithm::RS256, Some("rsa1"), &claims());
    // A client that gives up while its request waits for the keys.
    let wasm = s.envoy.listener_addr_of(1);
    let gone = send_and_disconnect(
        wasm,
        &Request::get("/gone").header("authorization", &format!("Bearer {good}")),
        Duration::from_millis(100),
    );
    assert!(gone.is_empty(), "answered before the keys arrived: {}", String::from_utf8_lossy(&gone));
    // A request without a token is not held by the missing keys.
    let none = both(&s, &get("/none", None));
    assert_eq!(none.status, 200);
    // Requests with a token wait for the fetch (1.5 s, within the 5 s timeout), on both workers.
    let mut handles = Vec::new();
    for i in 0..6 {
        let b = get(&format!("/wait{i}"), Some(&good)).bytes();
        handles.push(std::thread::spawn(move || seen(wasm, &b)));
    }
    for h in handles {
        let r = h.join().unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.upstream.as_ref().unwrap()["x-sub"], json!("alice"));
    }
    assert_eq!(both(&s, &get("/after", Some(&good))).status, 200);
    assert_eq!(s.wasm_keys.fetches(), 1, "one fetch for the process");
    let mut envoy = s.envoy;
    envoy.assert_healthy();
    assert_eq!(envoy.stat("wasmcustom.meshwasm.authz.jwt.jwks_fetch_success"), Some(1));
}

#[test]
fn keys_that_cannot_be_had_fail_tokens_like_native() {
    let k = temp_keys("down");
    let mut r = rule();
    r["timeout"] = json!("1s");
    let mut s = setup(r, "300s", &k.jwks, Mode::Garbage);
    let good = mint(&k.rsa1, Algorithm::RS256, Some("rsa1"), &claims());
    let mut expired = claims();
    expired["exp"] = json!(now() - 3600);
    let old = mint(&k.rsa1, Algorithm::RS256, Some("rsa1"), &expired);
    let check = |s: &Setup, what: &str| {
        let p = format!("/{what}");
        assert_eq!(both(s, &get(&p, Some(&good))), fetch_failed(&p), "{what}");
        // Without a token: no identity, no wait; a token failing before the keys are needed
        // fails for its own reason.
        assert_eq!(both(s, &get(&p, None)).status, 200, "{what}");
        assert_eq!(both(s, &get(&p, Some(&old))).body, "Jwt is expired", "{what}");
    };
    check(&s, "garbage");
    for m in [Mode::Status(503), Mode::Status(404), Mode::Slow(Duration::from_secs(3))] {
        s.native_keys.set_mode(m.clone());
        s.wasm_keys.set_mode(m.clone());
        check(&s, &format!("{m:?}").replace(['(', ')', ' ', '.'], "_"));
    }
    s.native_keys.down();
    s.wasm_keys.down();
    check(&s, "down");
    let failed = s.envoy.stat_or_zero("wasmcustom.meshwasm.authz.jwt.jwks_fetch_failed");
    assert!(failed >= 5, "{failed}");
    assert_eq!(s.envoy.stat_or_zero("wasmcustom.meshwasm.authz.jwt.jwks_fetch_success"), 0);
    assert!(s.envoy.stat_or_zero("wasmcustom.meshwasm.authz.jwt.denied_jwks_fetch") >= 5);
    // Back up: tokens verify again, on both.
    s.native_keys.set_mode(Mode::Serve);
    s.wasm_keys.set_mode(Mode::Serve);
    s.native_keys.up();
    s.wasm_keys.up();
    eventually("the keys after the server came back", Duration::from_secs(10), || {
        (seen(s.envoy.listener_addr_of(1), &get("/up", Some(&good)).bytes()).status == 200).then_some(())
    });
    assert_eq!(both(&s, &get("/up", Some(&good))).status, 200);
}

#[test]
fn rotation_refresh_failure_and_expiry() {
    let k = temp_keys("rotate");
    let set = |keys: &[&str]| json!({"keys": k.jwks["keys"].as_array().unwrap().iter().filter(|j| keys.contains(&j["kid"].as_str().unwrap())).collect::<Vec<_>>()});
    // 10 s cache: refreshed 5 s after a fetch, expired 10 s after it.
    let s = setup(rule(), "10s", &set(&["rsa1"]), Mode::Serve);
    let wasm = s.envoy.listener_addr_of(1);
    let one = mint(&k.rsa1, Algorithm::RS256, Some("rsa1"), &claims());
    let two = mint(&k.rsa2, Algorithm::RS256, Some("rsa2"), &claims());
    let status = |t: &str| seen(wasm, &get("/r", Some(t)).bytes());
    assert_eq!(both(&s, &get("/r", Some(&one))).status, 200);
    assert_eq!(both(&s, &get("/r", Some(&two))).body, "Jwks doesn't have key to match kid or alg from Jwt");
    // The refresh fails: the fetched set stays in use until it expires.
    s.wasm_keys.set_mode(Mode::Status(503));
    let before = s.wasm_keys.fetches();
    eventually("a failed refresh", Duration::from_secs(10), || (s.wasm_keys.fetches() > before).then_some(()));
    assert_eq!(status(&one).status, 200, "kept after a failed refresh");
    // …and then tokens fail: the keys cannot be had, verification is never skipped.
    eventually("the set to expire", Duration::from_secs(15), || (status(&one).status == 401).then_some(()));
    assert_eq!(status(&one), fetch_failed("/r"));
    // Rotation: the server now has rsa2 only; the next fetch replaces the set.
    s.wasm_keys.set_keys(&set(&["rsa2"]));
    s.wasm_keys.set_mode(Mode::Serve);
    eventually("the rotated set", Duration::from_secs(10), || (status(&two).status == 200).then_some(()));
    assert_eq!(status(&one).body, "Jwks doesn't have key to match kid or alg from Jwt");
    // A refresh that adds a key: both verify once every worker has the new version.
    s.wasm_keys.set_keys(&set(&["rsa1", "rsa2"]));
    eventually("the refreshed set on every worker", Duration::from_secs(15), || {
        (0..6).all(|_| status(&one).status == 200).then_some(())
    });
    assert_eq!(status(&two).status, 200);
    assert!(s.envoy.stat_or_zero("wasmcustom.meshwasm.authz.jwt.jwks_fetch_failed") >= 1);
    assert!(s.envoy.stat_or_zero("wasmcustom.meshwasm.authz.jwt.jwks_fetch_success") >= 3);
}
