//! The hostcall floors make exactly their filters' hostcalls: each filter and its floor run
//! the benchmark's request on the fake host (which logs every hostcall in the floor's
//! vocabulary), and the calls of each phase must be the same. A filter that gains or loses a
//! hostcall on that request fails here until its floor follows, so a floor row cannot drift
//! into measuring something else.

use std::rc::Rc;

use hmac::{KeyInit, Mac};
use meshwasm_authz::AuthzPlugin;
use meshwasm_floor::Floor;
use meshwasm_sdk_ext::fake::FakeHost;
use meshwasm_sdk_ext::{HttpFilter, Plugin};
use meshwasm_telemetry::TelemetryPlugin;

use super::{AUTHZ_POLICY, FLOOR_AUTHZ, FLOOR_TELEMETRY, TELEMETRY_CLIENT};

/// The request as Envoy hands it to the filters in the benchmark (wrk's `GET /` with the
/// bench header; Envoy adds the rest), `extra` appended.
fn host(extra: &[(&str, &str)]) -> FakeHost {
    let mut headers = vec![
        (":authority", "127.0.0.1:10000"),
        (":path", "/"),
        (":method", "GET"),
        (":scheme", "http"),
        ("x-bench-client", "wrk"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "7b0e2d52-6a43-4bb6-9b3a-0d3f1c2e5a77"),
    ];
    headers.extend_from_slice(extra);
    let h = FakeHost::with_request(&headers);
    *h.response_headers.borrow_mut() = vec![(":status".into(), "200".into()), ("content-length".into(), "2".into())];
    for (path, v) in [
        ("response.code", 200i64),
        ("response.flags", 0),
        ("request.duration", 1_500_000),
        ("request.total_size", 120),
        ("response.total_size", 90),
    ] {
        let path: Vec<&str> = path.split('.').collect();
        h.set_property(&path, &v.to_le_bytes());
    }
    h.set_property(&["xds", "cluster_name"], b"upstream");
    h
}

/// The hostcalls of each phase (request headers, response headers, log) of the `n`th request
/// through `plugin`, values of written headers dropped (a floor writes placeholders), sorted.
fn phases<P: Plugin>(plugin: &Rc<P>, h: &FakeHost, n: u32) -> [Vec<String>; 3] {
    let mut f = plugin.new_filter(n + 2, 0);
    let take = || {
        let mut calls: Vec<String> = h
            .take_calls()
            .into_iter()
            .map(|c| {
                let mut words = c.splitn(3, ' ');
                match (words.next(), words.next(), words.next()) {
                    (Some(verb @ ("set" | "add")), Some(name), Some(_value)) => format!("{verb} {name}"),
                    _ => c,
                }
            })
            .collect();
        calls.sort();
        calls
    };
    take();
    f.on_request_headers(h, true);
    let request = take();
    f.on_response_headers(h, true);
    let response = take();
    f.on_log(h);
    let log = take();
    f.on_done(h);
    [request, response, log]
}

/// The filter's second request (the first defines metrics, fills caches, verifies a token)
/// against the floor's.
fn check<P: Plugin>(what: &str, config: &str, floor_config: &str, extra: &[(&str, &str)]) {
    let h = host(extra);
    let filter = Rc::new(P::configure(config.as_bytes(), &h).unwrap_or_else(|e| panic!("{what}: {e}")));
    phases(&filter, &h, 0);
    *h.request_headers.borrow_mut() = host(extra).request_headers.take();
    let filter_calls = phases(&filter, &h, 1);
    let fh = host(extra);
    let floor = Rc::new(Floor::configure(floor_config.as_bytes(), &fh).unwrap_or_else(|e| panic!("{what}: {e}")));
    phases(&floor, &fh, 0);
    *fh.request_headers.borrow_mut() = host(extra).request_headers.take();
    let floor_calls = phases(&floor, &fh, 1);
    for (i, phase) in ["request headers", "response headers", "log"].iter().enumerate() {
        assert_eq!(
            floor_calls[i], filter_calls[i],
            "{what}: the floor's hostcalls at {phase} differ from the filter's"
        );
    }
    assert!(h.replies.borrow().is_empty(), "{what}: the filter replied locally: {:?}", h.replies.borrow());
}

#[test]
fn the_authz_floor_makes_the_authz_filters_hostcalls() {
    check::<AuthzPlugin>("authz", AUTHZ_POLICY, FLOOR_AUTHZ, &[]);
}

#[test]
fn the_telemetry_floor_makes_the_telemetry_filters_hostcalls() {
    check::<TelemetryPlugin>("telemetry", TELEMETRY_CLIENT, FLOOR_TELEMETRY, &[]);
}

fn b64url(bytes: &[u8]) -> String {
    meshwasm_authz::jwt::b64_encode(bytes).trim_end_matches('=').replace('+', "-").replace('/', "_")
}

#[test]
fn the_jwt_floor_makes_the_cached_token_paths_hostcalls() {
    // The bench's rule and policy with an HMAC key in place of its RSA one: a cached token's
    // path does not depend on the algorithm.
    let secret = b"0123456789abcdef0123456789abcdef";
    let jwks = format!(r#"{{"keys":[{{"kty":"oct","kid":"k","alg":"HS256","k":"{}"}}]}}"#, b64url(secret));
    let header = b64url(br#"{"alg":"HS256","kid":"k","typ":"JWT"}"#);
    let payload = b64url(
        br#"{"iss":"https://issuer.example","sub":"alice","aud":"api.example","groups":["bench"],"exp":1700003600}"#,
    );
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret).unwrap_or_else(|e| panic!("{e}"));
    mac.update(format!("{header}.{payload}").as_bytes());
    let token = format!("{header}.{payload}.{}", b64url(&mac.finalize().into_bytes()));
    let bearer = format!("Bearer {token}");
    let config = super::jwt::plugin_config(&jwks);
    check::<AuthzPlugin>("authz with a cached JWT", &config, super::jwt::FLOOR, &[("authorization", &bearer)]);
}
