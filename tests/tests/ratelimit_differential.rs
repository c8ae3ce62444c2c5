//! Differential test: meshwasm's rate limiter against Envoy's native
//! `envoy.filters.http.local_ratelimit`, in one Envoy, on twin listeners, with the same
//! request sequence (each request goes to the native listener, then at once to ours, so both
//! buckets see the same times).
//!
//! Compared per request: status, body, content-type, `grpc-status`, `grpc-message`, whether
//! the upstream saw it, and the `x-ratelimit-limit` / `-remaining` / `-reset` headers.
//! Not compared: `retry-after`, which only meshwasm sends (documented). Sleeps put the
//! checks well away from token and whole-second boundaries, so timing cannot flip a result.

use std::time::Duration;

use meshwasm_tests::{Envoy, Filter, Listener, Request, Response, Upstream};
use serde_json::json;

#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    status: u16,
    body: String,
    content_type: Option<String>,
    grpc_status: Option<String>,
    grpc_message: Option<String>,
    upstream: bool,
    limit: Option<String>,
    remaining: Option<String>,
    reset: Option<String>,
}

impl Outcome {
    fn of(rsp: &Response) -> Self {
        let raw = |n: &str| rsp.trailer(n).or_else(|| rsp.header(n)).map(str::to_string);
        let upstream = rsp.from_upstream();
        Self {
            status: rsp.status,
            body: if upstream { "<upstream>".into() } else { rsp.text() },
            content_type: if upstream { None } else { rsp.header("content-type").map(str::to_string) },
            grpc_status: raw("grpc-status"),
            grpc_message: raw("grpc-message"),
            upstream,
            limit: raw("x-ratelimit-limit"),
            remaining: raw("x-ratelimit-remaining"),
            reset: raw("x-ratelimit-reset"),
        }
    }
}

/// A step of a sequence: send `n` requests, then sleep.
struct Step {
    n: usize,
    sleep_ms: u64,
}

const fn step(n: usize, sleep_ms: u64) -> Step {
    Step { n, sleep_ms }
}

fn native(max: u64, per_fill: u64, interval_s: u64) -> Filter {
    Filter::native(&format!(
        r#"name: envoy.filters.http.local_ratelimit
typed_config:
  "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
  stat_prefix: native_rl
  enable_x_ratelimit_headers: DRAFT_VERSION_03
  token_bucket: {{ max_tokens: {max}, tokens_per_fill: {per_fill}, fill_interval: {interval_s}s }}
  filter_enabled: {{ runtime_key: rl_enabled, default_value: {{ numerator: 100, denominator: HUNDRED }} }}
  filter_enforced: {{ runtime_key: rl_enforced, default_value: {{ numerator: 100, denominator: HUNDRED }} }}
"#
    ))
}

fn meshwasm(max: u64, per_fill: u64, interval_s: u64) -> Filter {
    Filter::wasm(
        "ratelimit",
        json!({"rateLimitHeaders": true, "rules": [{"tokenBucket":
            {"maxTokens": max, "tokensPerFill": per_fill, "fillInterval": format!("{interval_s}s")}}]}),
    )
}

/// Run `steps` against both listeners of a fresh Envoy; return every differing request.
fn compare(bucket: (u64, u64, u64), steps: &[Step], request: impl Fn() -> Request) -> Vec<String> {
    let (max, per_fill, interval) = bucket;
    let up = Upstream::start();
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .upstream_h2()
        .listener(Listener::new().filter(native(max, per_fill, interval)))
        .listener(Listener::new().filter(meshwasm(max, per_fill, interval)))
        .start();
    let mut diffs = Vec::new();
    let mut i = 0;
    let mut limited = 0;
    for s in steps {
        for _ in 0..s.n {
            let n = Outcome::of(&envoy.send_to(0, request()));
            let m = Outcome::of(&envoy.send_to(1, request()));
            limited += usize::from(!n.upstream);
            if n != m {
                diffs.push(format!("request {i}:\n  native:   {n:?}\n  meshwasm: {m:?}"));
            }
            i += 1;
        }
        std::thread::sleep(Duration::from_millis(s.sleep_ms));
    }
    assert!(limited > 0 && limited < i, "the sequence must exercise both outcomes ({limited} of {i} limited)");
    diffs
}

#[track_caller]
fn assert_same(diffs: Vec<String>) {
    assert!(diffs.is_empty(), "{} requests differ from the native filter:\n{}", diffs.len(), diffs.join("\n"));
}

/// One token per fill: burst, partial refill (still empty), one token back, burst again.
#[test]
fn same_as_native_one_token_per_fill_http1() {
    assert_same(compare((3, 1, 4), &[step(5, 1300), step(2, 3200), step(3, 0)], || Request::get("/")));
}

/// Several tokens per fill, continuous refill between whole fills, over HTTP/2.
#[test]
fn same_as_native_several_tokens_per_fill_http2() {
    assert_same(compare((5, 2, 3), &[step(7, 800), step(2, 1700), step(4, 0)], || Request::get("/").h2()));
}

/// gRPC clients: the trailers-only reply and its status and message.
#[test]
fn same_as_native_grpc() {
    assert_same(compare((2, 1, 10), &[step(4, 0)], || Request::grpc("/pkg.Svc/Method", b"")));
}
