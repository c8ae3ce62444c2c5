//! The JWT side of the tests: keys from `openssl genpkey` with their JWKs, tokens minted by
//! `jsonwebtoken` (hostile ones assembled by hand and signed with it), the `jwt_authn`
//! configuration istiod generates for RequestAuthentication rules (inline `local_jwks`, or
//! `remote_jwks` through a cluster), and the differential comparison of a native listener
//! with its `authz.wasm` twin on raw HTTP/1.1 requests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::raw_http::exchange;
use crate::Envoy;

// === keys ===

pub struct Keys {
    pub rsa1: EncodingKey,
    pub rsa1_pub_pem: Vec<u8>,
    pub rsa2: EncodingKey,
    pub ec256: EncodingKey,
    pub ec384: EncodingKey,
    pub ed: EncodingKey,
    pub hs: EncodingKey,
    pub jwks: Value,
}

pub fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl").args(args).output().expect("openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

pub fn genpkey(dir: &Path, name: &str, args: &[&str]) -> (PathBuf, Vec<u8>) {
    let path = dir.join(format!("{name}.pem"));
    let mut a = vec!["genpkey", "-out", path.to_str().unwrap()];
    a.extend_from_slice(args);
    openssl(&a);
    let pem = std::fs::read(&path).unwrap();
    (path, pem)
}

pub fn b64u(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for c in b.chunks(3) {
        let v =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        let n = c.len() + 1;
        for i in 0..n {
            out.push(T[((v >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

pub fn jwk(key: &EncodingKey, alg: Algorithm, kid: &str, pin_alg: bool) -> Value {
    let mut j = serde_json::to_value(jsonwebtoken::jwk::Jwk::from_encoding_key(key, alg).unwrap()).unwrap();
    j["kid"] = json!(kid);
    if !pin_alg {
        j.as_object_mut().unwrap().remove("alg");
    }
    j
}

pub fn keys(dir: &Path) -> Keys {
    let (rsa1_path, rsa1) = genpkey(dir, "rsa1", &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]);
    let (_, rsa2) = genpkey(dir, "rsa2", &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]);
    let (_, ec256) = genpkey(dir, "ec256", &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]);
    let (_, ec384) = genpkey(dir, "ec384", &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"]);
    let (ed_path, ed) = genpkey(dir, "ed", &["-algorithm", "ED25519"]);
    let rsa1_pub_pem = openssl(&["pkey", "-in", rsa1_path.to_str().unwrap(), "-pubout"]);
    let ed_der = openssl(&["pkey", "-in", ed_path.to_str().unwrap(), "-pubout", "-outform", "DER"]);
    let ed_x = &ed_der[ed_der.len() - 32..];
    let rsa1 = EncodingKey::from_rsa_pem(&rsa1).unwrap();
    let rsa2 = EncodingKey::from_rsa_pem(&rsa2).unwrap();
    let ec256 = EncodingKey::from_ec_pem(&ec256).unwrap();
    let ec384 = EncodingKey::from_ec_pem(&ec384).unwrap();
    let ed = EncodingKey::from_ed_pem(&ed).unwrap();
    let secret = b"an HMAC secret of thirty-two by.";
    let hs = EncodingKey::from_secret(secret);
    let jwks = json!({"keys": [
        jwk(&rsa1, Algorithm::RS256, "rsa1", false),
        jwk(&rsa2, Algorithm::RS256, "rsa2", true),
        jwk(&ec256, Algorithm::ES256, "ec256", false),
        jwk(&ec384, Algorithm::ES384, "ec384", true),
        {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": b64u(ed_x)},
        {"kty": "oct", "kid": "hs", "k": b64u(secret)},
    ]});
    Keys { rsa1, rsa1_pub_pem, rsa2, ec256, ec384, ed, hs, jwks }
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

pub const ISS: &str = "https://issuer.example";
pub const ISS2: &str = "issuer-two";

pub fn claims() -> Value {
    json!({"iss": ISS, "sub": "alice", "aud": "api.example", "exp": now() + 3600, "iat": now(),
           "groups": ["dev", "admin"], "scope": "read write", "nested": {"role": "x"}, "azp": "cli"})
}

pub fn mint(k: &EncodingKey, alg: Algorithm, kid: Option<&str>, c: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(String::from);
    jsonwebtoken::encode(&h, c, k).unwrap()
}

/// A token assembled from raw header and payload text, signed as `alg` with `k`.
pub fn raw_token(header: &str, payload: &str, k: &EncodingKey, alg: Algorithm) -> String {
    let data = format!("{}.{}", b64u(header.as_bytes()), b64u(payload.as_bytes()));
    let sig = jsonwebtoken::crypto::sign(data.as_bytes(), k, alg).unwrap();
    format!("{data}.{sig}")
}

// === configuration, as istiod generates it ===

pub fn request_authentication(rules: Value) -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
           "metadata": {"name": "jwt", "namespace": "foo"}, "spec": {"jwtRules": rules}})
}

/// istiod's `convertToEnvoyJwtConfig` for inline keys.
pub fn istiod_jwt_authn(rules: &[Value]) -> String {
    istiod_jwt_authn_remote(rules, &json!({}))
}

/// istiod's `convertToEnvoyJwtConfig` (`PILOT_JWT_ENABLE_REMOTE_JWKS=envoy`): a rule with a
/// `jwksUri` gets `remote_jwks` with the rule's `timeout` (5 s by default) through the cluster
/// the plugin's top-level `jwks` map names; its `cacheDuration` replaces istiod's fixed 5 m
/// (so tests can expire it), with 5 m when absent. No `async_fetch`, as istiod.
pub fn istiod_jwt_authn_remote(rules: &[Value], jwks_sources: &Value) -> String {
    let mut rules: Vec<&Value> = rules.iter().collect();
    rules.sort_by_key(|r| r["issuer"].as_str().unwrap_or("").to_string());
    let mut providers = serde_json::Map::new();
    let mut inner = Vec::new();
    let mut outer = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        let name = format!("origins-{i}");
        let mut spaced: Vec<String> = r["spaceDelimitedClaims"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        spaced.extend(["permission".into(), "scope".into()]);
        spaced.sort();
        spaced.dedup();
        let mut p = json!({
            "issuer": r["issuer"],
            "forward": r["forwardOriginalToken"].as_bool().unwrap_or(false),
            "payload_in_metadata": "payload",
            "normalize_payload_in_metadata": {"space_delimited_claims": spaced},
        });
        match r.get("jwksUri").and_then(Value::as_str) {
            Some(uri) => {
                let src = &jwks_sources[uri];
                p["remote_jwks"] = json!({
                    "http_uri": {"uri": uri, "cluster": src["cluster"], "timeout": r.get("timeout").cloned().unwrap_or(json!("5s"))},
                    "cache_duration": src.get("cacheDuration").cloned().unwrap_or(json!("300s")),
                });
            }
            None => p["local_jwks"] = json!({"inline_string": r["jwks"]}),
        }
        if let Some(a) = r.get("audiences") {
            p["audiences"] = a.clone();
        }
        if let Some(h) = r.get("outputPayloadToHeader") {
            p["forward_payload_header"] = h.clone();
        }
        if let Some(c) = r.get("outputClaimToHeaders") {
            p["claim_to_headers"] = json!(c
                .as_array()
                .unwrap()
                .iter()
                .map(|c| json!({"header_name": c["header"], "claim_name": c["claim"]}))
                .collect::<Vec<_>>());
        }
        if let Some(h) = r.get("fromHeaders") {
            p["from_headers"] = json!(h
                .as_array()
                .unwrap()
                .iter()
                .map(|h| json!({"name": h["name"], "value_prefix": h.get("prefix").cloned().unwrap_or(json!(""))}))
                .collect::<Vec<_>>());
        }
        for (k, n) in [("fromParams", "from_params"), ("fromCookies", "from_cookies")] {
            if let Some(v) = r.get(k) {
                p[n] = v.clone();
            }
        }
        providers.insert(name.clone(), p);
        inner.push(json!({"requires_any": {"requirements": [{"provider_name": name}, {"allow_missing": {}}]}}));
        outer.push(json!({"provider_name": name}));
    }
    let requires = if inner.len() == 1 {
        inner.remove(0)
    } else {
        outer.push(json!({"requires_all": {"requirements": inner}}));
        json!({"requires_any": {"requirements": outer}})
    };
    let cfg = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": providers,
        "rules": [{"match": {"prefix": "/"}, "requires": requires}],
        "bypass_cors_preflight": true,
    });
    format!("name: envoy.filters.http.jwt_authn\ntyped_config: {cfg}\n")
}

// === the differential comparison ===

/// What a client sees of one response.
#[derive(Debug, PartialEq)]
pub struct Seen {
    pub status: u16,
    pub body: String,
    pub www: Option<String>,
    /// From the upstream's echo: path and the token/claim headers.
    pub upstream: Option<Value>,
}

/// The request headers the comparison reads from the upstream's echo.
pub const ECHOED: [&str; 8] =
    ["authorization", "x-jwt-payload", "x-sub", "x-groups", "x-nested", "x-token", "cookie", "x-exp"];

/// One raw exchange, reduced to what the comparison looks at.
pub fn seen(addr: SocketAddr, request: &[u8]) -> Seen {
    let r = exchange(addr, request);
    let upstream = r.header("x-meshwasm-upstream").map(|_| {
        let v: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
        let mut out = json!({"path": v["path"]});
        for h in ECHOED {
            out[h] = v["headers"][h].clone();
        }
        out
    });
    Seen {
        status: r.status,
        body: if upstream.is_some() { String::new() } else { r.body.clone() },
        www: r.header("www-authenticate").map(str::to_string),
        upstream,
    }
}

/// A request of a corpus: written as `GET <path> HTTP/1.1` with `host: example.com`, the
/// header lines, and `connection: close`.
pub struct Req {
    pub name: String,
    pub method: &'static str,
    pub path: String,
    pub headers: Vec<String>,
}

pub fn req(name: &str, path: &str, headers: &[String]) -> Req {
    Req { name: name.into(), method: "GET", path: path.into(), headers: headers.to_vec() }
}

pub fn bearer(t: &str) -> String {
    format!("authorization: Bearer {t}")
}

impl Req {
    pub fn bytes(&self) -> Vec<u8> {
        let mut b = format!("{} {} HTTP/1.1\r\nhost: example.com\r\n", self.method, self.path);
        for h in &self.headers {
            b.push_str(h);
            b.push_str("\r\n");
        }
        b.push_str("connection: close\r\n\r\n");
        b.into_bytes()
    }
}

/// Send every request to listener `native` and to listener `wasm`; each must see the same
/// status, body, `www-authenticate` and upstream echo. Returns how many both rejected.
pub fn compare(envoy: &Envoy, native: usize, wasm: usize, reqs: &[Req]) -> usize {
    let mut rejected = 0;
    for r in reqs {
        let b = r.bytes();
        let n = seen(envoy.listener_addr_of(native), &b);
        let w = seen(envoy.listener_addr_of(wasm), &b);
        assert_eq!(w, n, "{}: wasm vs native", r.name);
        assert_ne!(n.status, 0, "{}: no response", r.name);
        rejected += usize::from(n.upstream.is_none());
        println!("{:<48} {} {}", r.name, n.status, n.body.lines().next().unwrap_or(""));
    }
    rejected
}

// === the corpus ===

/// The attack corpus against one provider with `ISS`, audiences `api.example` and
/// `https://other/`, the keys of [`keys`], claim headers `x-sub`, `x-groups`, `x-nested`,
/// `x-exp` and payload header `x-jwt-payload`.
pub fn corpus(k: &Keys) -> Vec<Req> {
    let c = claims();
    let rs = |c: &Value| mint(&k.rsa1, Algorithm::RS256, Some("rsa1"), c);
    let good = rs(&c);
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims();
        f(&mut c);
        rs(&c)
    };
    let n = now();
    let mut v = vec![req("no token", "/public", &[]), req("no token, policy needs identity", "/alice", &[])];
    for path in ["/public", "/alice", "/any", "/admin", "/write", "/nested", "/aud", "/other"] {
        v.push(req(&format!("valid RS256 {path}"), path, &[bearer(&good)]));
    }
    for (alg, key, kid) in [
        (Algorithm::RS384, &k.rsa1, "rsa1"),
        (Algorithm::RS512, &k.rsa1, "rsa1"),
        (Algorithm::PS256, &k.rsa1, "rsa1"),
        (Algorithm::PS384, &k.rsa1, "rsa1"),
        (Algorithm::PS512, &k.rsa1, "rsa1"),
        (Algorithm::RS256, &k.rsa2, "rsa2"),
        (Algorithm::ES256, &k.ec256, "ec256"),
        (Algorithm::ES384, &k.ec384, "ec384"),
        (Algorithm::EdDSA, &k.ed, "ed"),
        (Algorithm::HS256, &k.hs, "hs"),
        (Algorithm::HS384, &k.hs, "hs"),
        (Algorithm::HS512, &k.hs, "hs"),
    ] {
        v.push(req(&format!("valid {alg:?}"), "/alice", &[bearer(&mint(key, alg, Some(kid), &c))]));
        v.push(req(&format!("valid {alg:?} without kid"), "/alice", &[bearer(&mint(key, alg, None, &c))]));
    }
    // alg none, with and without a signature.
    let parts: Vec<&str> = good.split('.').collect();
    let none_h = b64u(br#"{"alg":"none"}"#);
    v.push(req("alg none", "/alice", &[bearer(&format!("{none_h}.{}.", parts[1]))]));
    v.push(req("alg none with signature", "/alice", &[bearer(&format!("{none_h}.{}.{}", parts[1], parts[2]))]));
    // HS256 signed with the RSA public key as the HMAC secret.
    let pubkey_secret = EncodingKey::from_secret(&k.rsa1_pub_pem);
    v.push(req(
        "HS256 with RSA public key",
        "/alice",
        &[bearer(&mint(&pubkey_secret, Algorithm::HS256, Some("rsa1"), &c))],
    ));
    v.push(req(
        "HS256 with RSA public key, no kid",
        "/alice",
        &[bearer(&mint(&pubkey_secret, Algorithm::HS256, None, &c))],
    ));
    // kid swaps and unknown kids.
    v.push(req("rsa2 key, kid rsa1", "/alice", &[bearer(&mint(&k.rsa2, Algorithm::RS256, Some("rsa1"), &c))]));
    v.push(req(
        "rsa1 key, kid rsa2 (alg pinned)",
        "/alice",
        &[bearer(&mint(&k.rsa1, Algorithm::RS256, Some("rsa2"), &c))],
    ));
    v.push(req("rsa1 key, kid ec256", "/alice", &[bearer(&mint(&k.rsa1, Algorithm::RS256, Some("ec256"), &c))]));
    v.push(req("unknown kid", "/alice", &[bearer(&mint(&k.rsa1, Algorithm::RS256, Some("nope"), &c))]));
    v.push(req(
        "ES384 key as RS384 (alg pinned)",
        "/alice",
        &[bearer(&raw_token(r#"{"alg":"RS384","kid":"ec384"}"#, &c.to_string(), &k.ec384, Algorithm::ES384))],
    ));
    v.push(req(
        "ES256 signature under alg RS256",
        "/alice",
        &[bearer(&raw_token(r#"{"alg":"RS256","kid":"ec256"}"#, &c.to_string(), &k.ec256, Algorithm::ES256))],
    ));
    v.push(req(
        "PS256 under alg RS256",
        "/alice",
        &[bearer(&raw_token(r#"{"alg":"RS256","kid":"rsa1"}"#, &c.to_string(), &k.rsa1, Algorithm::PS256))],
    ));
    // Time.
    for (name, f) in [
        ("exp -59s", &(|c: &mut Value| c["exp"] = json!(now() - 59)) as &dyn Fn(&mut Value)),
        ("exp -61s", &|c: &mut Value| c["exp"] = json!(now() - 61)),
        ("nbf +59s", &|c: &mut Value| c["nbf"] = json!(now() + 59)),
        ("nbf +61s", &|c: &mut Value| c["nbf"] = json!(now() + 61)),
        ("no exp", &|c: &mut Value| {
            c.as_object_mut().unwrap().remove("exp");
        }),
        ("exp as string", &|c: &mut Value| c["exp"] = json!(n.to_string())),
        ("exp negative", &|c: &mut Value| c["exp"] = json!(-1)),
        ("exp fractional", &|c: &mut Value| c["exp"] = json!(n as f64 + 3600.5)),
        ("wrong aud", &|c: &mut Value| c["aud"] = json!("other.example")),
        ("aud list", &|c: &mut Value| c["aud"] = json!(["other", "api.example"])),
        ("aud https form", &|c: &mut Value| c["aud"] = json!("https://api.example/")),
        ("aud trailing slash", &|c: &mut Value| c["aud"] = json!("api.example/")),
        ("aud not string", &|c: &mut Value| c["aud"] = json!([1])),
        ("no aud", &|c: &mut Value| {
            c.as_object_mut().unwrap().remove("aud");
        }),
        ("unknown issuer", &|c: &mut Value| c["iss"] = json!("https://evil.example")),
        ("empty iss", &|c: &mut Value| c["iss"] = json!("")),
        ("no iss", &|c: &mut Value| {
            c.as_object_mut().unwrap().remove("iss");
        }),
        ("no sub", &|c: &mut Value| {
            c.as_object_mut().unwrap().remove("sub");
        }),
        ("sub not string", &|c: &mut Value| c["sub"] = json!(7)),
        ("groups string", &|c: &mut Value| c["groups"] = json!("admin")),
        ("scope list", &|c: &mut Value| c["scope"] = json!(["write"])),
        ("scope spaces", &|c: &mut Value| c["scope"] = json!("  write  ")),
        ("claims numbers and bools", &|c: &mut Value| {
            c["sub"] = json!("bob");
            c["groups"] = json!(true);
            c["nested"] = json!({"role": 3.5});
        }),
    ] {
        let t = with(f);
        for path in ["/any", "/admin", "/write", "/nested", "/aud"] {
            v.push(req(&format!("{name} {path}"), path, &[bearer(&t)]));
        }
    }
    // Shapes.
    let (h, p, s) = (parts[0], parts[1], parts[2]);
    for (name, t) in [
        ("h.p.", format!("{h}.{p}.")),
        ("h.p.s.", format!("{h}.{p}.{s}.")),
        ("h..p.s", format!("{h}..{p}.{s}")),
        ("two parts", format!("{h}.{p}")),
        ("four parts", format!("{h}.{p}.{s}.{s}")),
        ("padded header", format!("{h}==.{p}.{s}")),
        ("bad base64 payload", format!("{h}.{p}*.{s}")),
        ("payload not json", format!("{h}.{}.{s}", b64u(b"not json"))),
        ("standard base64 signature", format!("{h}.{p}.{}", s.replace('-', "+").replace('_', "/"))),
        ("tampered signature", format!("{h}.{p}.{}A", &s[..s.len() - 1])),
    ] {
        v.push(req(name, "/alice", &[bearer(&t)]));
    }
    let dup = format!(r#"{{"iss":"{ISS}","sub":"alice","sub":"root","aud":"api.example","exp":{}}}"#, n + 3600);
    v.push(req(
        "duplicate JSON keys",
        "/alice",
        &[bearer(&raw_token(r#"{"alg":"RS256","kid":"rsa1"}"#, &dup, &k.rsa1, Algorithm::RS256))],
    ));
    for depth in [50, 98, 99, 100, 101, 130] {
        let nested = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let body = format!(r#"{{"iss":"{ISS}","sub":"alice","aud":"api.example","exp":{},"deep":{nested}}}"#, n + 3600);
        v.push(req(
            &format!("nesting {depth}"),
            "/alice",
            &[bearer(&raw_token(r#"{"alg":"RS256","kid":"rsa1"}"#, &body, &k.rsa1, Algorithm::RS256))],
        ));
    }
    let big = with(&|c: &mut Value| c["pad"] = json!("x".repeat(40 * 1024)));
    v.push(req("40 KiB token", "/alice", &[bearer(&big)]));
    let huge = with(&|c: &mut Value| c["pad"] = json!("x".repeat(48 * 1024)));
    v.push(req("64 KiB token", "/alice", &[bearer(&huge)]));
    // Locations.
    v.push(req("lowercase bearer", "/alice", &[format!("authorization: bearer {good}")]));
    v.push(req("Bearer with spaces", "/alice", &[format!("authorization: Bearer    {good}")]));
    v.push(req("Bearer only", "/alice", &["authorization: Bearer".into()]));
    v.push(req("Bearer junk", "/alice", &["authorization: Bearer !!!".into()]));
    v.push(req("prefix later in value", "/alice", &[format!("authorization: Basic eA==, Bearer {good}")]));
    v.push(req(
        "two Authorization, both valid",
        "/alice",
        &[bearer(&good), bearer(&mint(&k.ec256, Algorithm::ES256, Some("ec256"), &c))],
    ));
    v.push(req("two Authorization, second bad", "/alice", &[bearer(&good), bearer("x.y.z")]));
    v.push(req("two Authorization, first bad", "/alice", &[bearer("x.y.z"), bearer(&good)]));
    v.push(req("header and query", &format!("/alice?a=1&access_token={good}&b=2"), &[bearer(&good)]));
    v.push(req("header good, query bad", "/alice?access_token=bad", &[bearer(&good)]));
    v.push(req("query only", &format!("/alice?z=%41&access_token={good}&flag"), &[]));
    v.push(req("query twice", &format!("/alice?access_token={good}&access_token=bad"), &[]));
    // Spoofed output headers.
    v.push(req("spoofed claim headers, no token", "/public", &["x-sub: root".into(), "x-jwt-payload: e30".into()]));
    v.push(req(
        "spoofed claim headers, token",
        "/public",
        &["x-sub: root".into(), "x-groups: admin".into(), bearer(&good)],
    ));
    // CORS preflight with an invalid token.
    let mut pre = req(
        "CORS preflight, bad token",
        "/public",
        &["origin: https://a.example".into(), "access-control-request-method: GET".into(), bearer("x.y.z")],
    );
    pre.method = "OPTIONS";
    v.push(pre);
    let mut opt = req("OPTIONS without preflight headers, bad token", "/public", &[bearer("x.y.z")]);
    opt.method = "OPTIONS";
    v.push(opt);
    v.push(req("long path realm", &format!("/{}", "p".repeat(300)), &[bearer("x.y.z")]));
    v
}

/// Requests for the second configuration: two issuers, custom locations, forwarding.
/// Two providers sharing and not sharing locations (`ISS2` in `x-token: Token`, `tok`,
/// cookie `session`; `ISS` in the default ones).
pub fn corpus_multi(k: &Keys) -> Vec<Req> {
    let c = claims();
    let one = mint(&k.rsa1, Algorithm::RS256, Some("rsa1"), &c);
    let mut c2 = claims();
    c2["iss"] = json!(ISS2);
    let two = mint(&k.ec256, Algorithm::ES256, Some("ec256"), &c2);
    let mut c3 = claims();
    c3["iss"] = json!("third");
    let three = mint(&k.rsa1, Algorithm::RS256, Some("rsa1"), &c3);
    let mut expired = claims();
    expired["exp"] = json!(now() - 100);
    let old = mint(&k.rsa1, Algorithm::RS256, Some("rsa1"), &expired);
    vec![
        req("none", "/public", &[]),
        req("issuer one, default header", "/public", &[bearer(&one)]),
        req("issuer two, default header", "/public", &[bearer(&two)]),
        req("unknown issuer", "/public", &[bearer(&three)]),
        req("issuer two in its own header", "/public", &[format!("x-token: Token {two}")]),
        req("issuer one in issuer two's header", "/public", &[format!("x-token: Token {one}")]),
        req("issuer two in its cookie", "/public", &[format!("cookie: a=b; session=\"{two}\"")]),
        req("issuer two in its param", &format!("/public?tok={two}"), &[]),
        req("both issuers", "/public", &[bearer(&one), format!("x-token: Token {two}")]),
        req("expired in one location", "/public", &[bearer(&old), format!("x-token: Token {two}")]),
        req("expired alone", "/public", &[bearer(&old)]),
        req("issuer two, alice", "/alice", &[bearer(&two)]),
        req("issuer one, alice", "/alice", &[bearer(&one)]),
    ]
}
