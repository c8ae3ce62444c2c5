//! Any bytes as a JWT and as the request it is extracted from: jwt_verify_lib's parser
//! (`jwt::Jwt::parse`) and `jwt_authn` as `authn::authenticate` runs it (extraction from
//! headers, query and cookies, verification with inline keys of every family and a remote
//! set that is ready, pending or failed, the verified-token cache, the header effects, the
//! local reply) never panic. The first byte picks the shape of the rest:
//!
//! - raw (even): the rest is the token, sent in `Authorization: Bearer`, `access_token`, the
//!   custom header and the cookie, and, split into lines, extra request headers. The input
//!   holds no private key, so nothing may verify: no identity, no claim header added.
//! - signed (odd): the rest is `header JSON 0xff payload JSON 0xff tail`, base64url-encoded
//!   and signed here with the HMAC key the providers trust, so the claim paths (issuer, time
//!   window, audiences, claim headers, space-delimited claims) run on hostile payloads;
//!   whatever verifies carries a configured issuer.
//!
//! Always: a parsed token's pieces are consistent, the cache is transparent (a second run
//! with the cache warm gives the same status, payload and header effects), output headers
//! are removed before they are added, and only configured output headers are added.
#![no_main]

#[path = "common/jwt_fixtures.rs"]
mod jwt_fixtures;

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use hmac::{KeyInit, Mac};
use jwt_fixtures::{b64u, JWKS, TOKENS};
use libfuzzer_sys::fuzz_target;
use meshwasm_authz::authn::{
    authenticate, rejection, Authn, Env, JwksSourceJson, KeyState, Keys, Op, Outcome, Request, RequestAuthSpecJson,
};
use meshwasm_authz::config::ResourceJson;
use meshwasm_authz::jwks::Jwks;
use meshwasm_authz::jwt::{Jwt, Status, ALGS, CLOCK_SKEW_SECONDS};
use meshwasm_sdk_ext::config::Path;
use meshwasm_sdk_ext::Headers;
use serde_json::{json, Value};

const SECRET: &[u8] = b"fuzz target HMAC secret, 32 b..";
const REMOTE: &str = "http://keys.example/jwks.json";
const ISSUERS: [&str; 3] = ["https://issuer.example", "issuer-two", "remote"];
const NOW: u64 = 1_700_000_000;

struct Setup {
    /// One provider (`requires_any {p, allow_missing}`), and three (`requires_any` with
    /// `requires_all`), as istiod emits them.
    single: Authn,
    multi: Authn,
    remote_keys: Rc<Jwks>,
    output_headers: Vec<String>,
}

impl Setup {
    fn new() -> Self {
        let one = json!({"issuer": ISSUERS[0], "jwks": JWKS, "audiences": ["api.example", "https://other/"],
            "outputPayloadToHeader": "x-jwt-payload", "spaceDelimitedClaims": ["roles"],
            "outputClaimToHeaders": [{"header": "x-sub", "claim": "sub"}, {"header": "x-nested", "claim": "a.b"},
                                     {"header": "x-groups", "claim": "groups"}]});
        let two = json!({"issuer": ISSUERS[1], "jwks": JWKS, "forwardOriginalToken": true,
            "fromHeaders": [{"name": "x-token", "prefix": "Token "}, {"name": "authorization", "prefix": "Bearer "}],
            "fromParams": ["tok"], "fromCookies": ["session"],
            "outputClaimToHeaders": [{"header": "x-sub2", "claim": "sub"}]});
        let three = json!({"issuer": ISSUERS[2], "jwksUri": REMOTE, "fromParams": ["access_token"]});
        let sources: BTreeMap<String, JwksSourceJson> =
            serde_json::from_value(json!({REMOTE: {"cluster": "keys"}})).unwrap();
        let authn = |rules: Value, sources: &BTreeMap<String, JwksSourceJson>| {
            let res: Vec<ResourceJson<RequestAuthSpecJson>> = serde_json::from_value(json!([{
                "apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
                "metadata": {"name": "ra", "namespace": "foo"}, "spec": {"jwtRules": rules}}]))
            .unwrap();
            Authn::parse(&res, sources, &Path::root()).unwrap()
        };
        let single = authn(json!([one]), &BTreeMap::new());
        let multi = authn(json!([one, two, three]), &sources);
        let output_headers = multi.output_headers().map(String::from).collect();
        let remote_keys = Rc::new(Jwks::parse(JWKS.as_bytes()).unwrap().0);
        let s = Self { single, multi, remote_keys, output_headers };
        for t in TOKENS {
            let headers = Headers::from_pairs(&[
                (":path".to_string(), "/".to_string()),
                ("authorization".into(), format!("Bearer {t}")),
            ]);
            let mut env = FuzzEnv { authn: &s.single, remote_keys: &s.remote_keys, remote: 2, cache: HashMap::new() };
            let o = authenticate(&s.single, &headers, &mut env).unwrap();
            assert_eq!(o.status, Status::Ok, "{t}");
            assert_eq!(o.payload.unwrap()["sub"], "alice");
        }
        s
    }
}

thread_local! {
    static SETUP: Setup = Setup::new();
}

struct FuzzEnv<'a> {
    authn: &'a Authn,
    remote_keys: &'a Rc<Jwks>,
    /// 0: the remote set is pending, 1: failed, 2: ready.
    remote: u8,
    cache: HashMap<(usize, String, u64), Rc<Jwt>>,
}

impl Env for FuzzEnv<'_> {
    fn keys(&self, provider: usize) -> KeyState {
        match self.authn.providers.get(provider).map(|p| &p.keys) {
            Some(Keys::Inline(j)) => KeyState::Ready(Rc::clone(j), 0),
            Some(Keys::Remote(_)) => match self.remote {
                0 => KeyState::Pending,
                1 => KeyState::Failed,
                _ => KeyState::Ready(Rc::clone(self.remote_keys), 7),
            },
            None => KeyState::Failed,
        }
    }
    fn now(&self) -> u64 {
        NOW
    }
    fn cached(&mut self, provider: usize, token: &str, generation: u64) -> Option<Rc<Jwt>> {
        self.cache.get(&(provider, token.to_string(), generation)).cloned()
    }
    fn remember(&mut self, provider: usize, token: &str, generation: u64, jwt: Rc<Jwt>) {
        self.cache.insert((provider, token.to_string(), generation), jwt);
    }
}

/// What must hold of any token the parser accepts.
fn check_parsed(token: &str) {
    let Ok(jwt) = Jwt::parse(token) else { return };
    assert!(ALGS.contains(&jwt.alg.as_str()), "{}", jwt.alg);
    assert!(!jwt.header_b64.is_empty() && !jwt.header_b64.contains('.'));
    assert!(!jwt.payload_b64.is_empty() && !jwt.payload_b64.contains('.'));
    assert_eq!(jwt.signed_data(), format!("{}.{}", jwt.header_b64, jwt.payload_b64).into_bytes());
    for now in [0, NOW, u64::MAX] {
        let _ = jwt.check_time(now, CLOCK_SKEW_SECONDS);
    }
    if jwt.exp != 0 && jwt.exp < u64::MAX / 2 && jwt.nbf <= jwt.exp {
        assert_eq!(jwt.check_time(jwt.exp + CLOCK_SKEW_SECONDS + 1, CLOCK_SKEW_SECONDS), Status::JwtExpired);
        assert_eq!(jwt.check_time(jwt.exp, CLOCK_SKEW_SECONDS), Status::Ok);
    }
}

fn check_outcome(o: &Outcome, output_headers: &[String], forgeable: bool) {
    let mut removed: Vec<&str> = Vec::new();
    for op in &o.ops {
        match op {
            Op::Remove(h) => removed.push(h),
            Op::Add(h, _) => {
                assert!(output_headers.contains(h), "added {h:?}, not an output header");
                assert!(removed.contains(&h.as_str()), "{h:?} added before a client's copy was removed");
                assert!(forgeable, "a claim header from a token nobody signed: {op:?}");
            }
            Op::SetPath(_) => {}
        }
    }
    if let Some(p) = &o.payload {
        assert!(forgeable, "an identity from a token nobody signed: {p:?}");
        let iss = p.get("iss").and_then(Value::as_str).unwrap_or("");
        assert!(ISSUERS.contains(&iss), "verified a token of issuer {iss:?}");
    }
    let (code, body, www, details) = rejection(o.status, "http://h/x");
    assert!(code == 401 || code == 403);
    assert!(!body.is_empty() && www.starts_with("Bearer realm=") && details.starts_with("jwt_authn_access_denied{"));
}

fn run(authn: &Authn, s: &Setup, headers: &[(String, String)], remote: u8, forgeable: bool) {
    let headers = Headers::from_pairs(headers);
    let _ = Request::new(&headers).original_uri();
    let mut env = FuzzEnv { authn, remote_keys: &s.remote_keys, remote, cache: HashMap::new() };
    let Ok(cold) = authenticate(authn, &headers, &mut env) else { return };
    check_outcome(&cold, &s.output_headers, forgeable);
    let Ok(warm) = authenticate(authn, &headers, &mut env) else {
        panic!("waits for keys the first run did not need")
    };
    assert_eq!(
        (&warm.status, &warm.payload, &warm.ops),
        (&cold.status, &cold.payload, &cold.ops),
        "cache changed the outcome"
    );
    // The same tokens reach the same checks; a verified one comes from the cache the second time.
    assert_eq!(warm.verified + warm.cache_hits, cold.verified + cold.cache_hits);
    assert!(warm.verified <= cold.verified);
}

fn hs256(header: &[u8], payload: &[u8], tail: &[u8]) -> String {
    let data = format!("{}.{}", b64u(header), b64u(payload));
    let mut m = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(SECRET).unwrap();
    m.update(data.as_bytes());
    let sig = b64u(&m.finalize().into_bytes());
    // The tail decorates the token: padding, extra dots, whitespace, another segment.
    let deco = String::from_utf8_lossy(tail);
    format!("{data}.{sig}{deco}")
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let signed = mode & 1 == 1;
    let (token, extra) = if signed {
        let mut parts = rest.splitn(3, |b| *b == 0xff);
        let h = parts.next().unwrap_or_default();
        let p = parts.next().unwrap_or_default();
        let t = parts.next().unwrap_or_default();
        let (tail, extra) = t.split_at(t.len().min(4));
        (hs256(h, p, tail), String::from_utf8_lossy(extra).into_owned())
    } else {
        let text = String::from_utf8_lossy(rest).into_owned();
        let (t, e) = text.split_once('\n').unwrap_or((&text, ""));
        (t.to_string(), e.to_string())
    };
    check_parsed(&token);
    SETUP.with(|s| {
        let mut headers: Vec<(String, String)> =
            vec![(":method".into(), "GET".into()), (":authority".into(), "h".into())];
        let path = match (mode >> 1) & 3 {
            0 => "/x".to_string(),
            1 => format!("/x?a=1&access_token={token}&b=%zz"),
            2 => format!("/x?tok={token}&tok=second"),
            _ => format!("/x?{extra}"),
        };
        headers.push((":path".into(), path));
        match (mode >> 3) & 3 {
            0 => headers.push(("authorization".into(), format!("Bearer {token}"))),
            1 => headers.push(("x-token".into(), format!("Token {token}"))),
            2 => headers.push(("cookie".into(), format!("a=b; session=\"{token}\""))),
            _ => {
                headers.push(("authorization".into(), format!("Basic x, Bearer {token}")));
                headers.push(("authorization".into(), format!("Bearer {token}")));
            }
        }
        for line in extra.lines().take(16) {
            let (k, v) = line.split_once(':').unwrap_or((line, ""));
            headers.push((k.to_ascii_lowercase(), v.trim_start().to_string()));
        }
        let remote = (mode >> 5) % 3;
        run(&s.single, s, &headers, remote, signed);
        run(&s.multi, s, &headers, remote, signed);
    });
});
