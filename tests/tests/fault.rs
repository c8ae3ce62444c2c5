//! The fault filter end to end: `dist/fault.wasm` in a stock Envoy at `--concurrency 2`,
//! real upstream, real clients. Each test pins one user-visible behaviour, on responses and
//! on the filter's admin stats. Percentages are checked with binomial bounds (z = 5).
//!
//! The differential test against Envoy's native fault filter is in `fault_differential.rs`.

use std::time::{Duration, Instant};

use meshwasm_tests::envoy::free_port;
use meshwasm_tests::{
    assert_binomial, client, eventually, fire, Envoy, Filter, Listener, Request, Response, Route, Upstream,
};
use serde_json::{json, Value};

// === helpers ===

/// Envoy's timers run on its dispatcher's cached clock and can fire a hair before the
/// full duration as the client measures it (the native fault filter was observed at
/// 149.998 ms for a 150 ms delay). Lower bounds on delays allow this much.
const TIMER_SLACK: Duration = Duration::from_millis(5);

/// True when the response was held for at least `delay` (minus [`TIMER_SLACK`]).
fn was_delayed(rsp: &Response, delay: Duration) -> bool {
    rsp.elapsed + TIMER_SLACK >= delay
}

/// One listener with the fault filter; HTTP/2 to the upstream (so gRPC and trailers work).
fn fault_envoy(up: &Upstream, config: Value) -> Envoy {
    Envoy::builder()
        .upstream(up.addr())
        .upstream_h2()
        .listener(Listener::new().filter(Filter::wasm("fault", config)))
        .start()
}

fn stat_name(rule: &str, stat: &str) -> String {
    format!("wasmcustom.meshwasm.fault.rule.{rule}.{stat}")
}

/// A fault counter/gauge of `rule` (0 when the filter never defined it).
fn fstat(envoy: &Envoy, rule: &str, stat: &str) -> u64 {
    envoy.stat_or_zero(&stat_name(rule, stat))
}

fn ok(results: Vec<Result<Response, String>>) -> Vec<Response> {
    results.into_iter().enumerate().map(|(i, r)| r.unwrap_or_else(|e| panic!("request {i}: {e}"))).collect()
}

fn count_status(rsps: &[Response], status: u16) -> u64 {
    rsps.iter().filter(|r| r.status == status).count() as u64
}

#[track_caller]
fn assert_aborted(rsp: &Response, status: u16) {
    assert_eq!(rsp.status, status, "expected an abort with {status}, got {} body {:?}", rsp.status, rsp.text());
    assert_eq!(rsp.text(), "fault filter abort");
    assert!(!rsp.from_upstream(), "an aborted request must not reach the upstream");
}

#[track_caller]
fn assert_passed(rsp: &Response) {
    assert_eq!(rsp.status, 200, "expected the upstream's 200, got {} body {:?}", rsp.status, rsp.text());
    assert!(rsp.from_upstream(), "expected the upstream's reply: {:?}", rsp.headers);
}

fn abort_rule(name: &str, prefix: &str, status: u16) -> Value {
    json!({"name": name, "match": [{"uri": {"prefix": prefix}}],
           "fault": {"abort": {"httpStatus": status, "percentage": {"value": 100}}}})
}

// === aborts ===

#[test]
fn abort_at_100_and_0_percent_and_missing_percentage() {
    let up = Upstream::start();
    let envoy = fault_envoy(
        &up,
        json!({"rules": [
            {"name": "all", "match": [{"uri": {"prefix": "/all"}}],
             "fault": {"abort": {"httpStatus": 503, "percentage": {"value": 100}}}},
            {"name": "none", "match": [{"uri": {"prefix": "/none"}}],
             "fault": {"abort": {"httpStatus": 503, "percentage": {"value": 0}}}},
            {"name": "unset", "match": [{"uri": {"prefix": "/unset"}}],
             "fault": {"abort": {"httpStatus": 503}}}
        ]}),
    );
    let n = 60;
    let rsps = ok(fire(envoy.listener_addr(), n * 3, 6, move |i| Request::get(["/all", "/none", "/unset"][i % 3])));
    for (i, r) in rsps.iter().enumerate() {
        if i % 3 == 0 {
            assert_aborted(r, 503);
        } else {
            assert_passed(r);
        }
    }
    assert_eq!(up.requests(), 2 * n as u64);
    assert_eq!(fstat(&envoy, "all", "aborts_injected"), n as u64);
    assert_eq!(fstat(&envoy, "none", "aborts_injected"), 0);
    assert_eq!(fstat(&envoy, "unset", "aborts_injected"), 0);
    assert_eq!(fstat(&envoy, "all", "delays_injected"), 0);
}

#[test]
fn abort_percentages_follow_the_binomial() {
    // 50 %, a fractional 12.5 % and the legacy integer `percent: 25`, 400 requests each.
    let up = Upstream::start();
    let envoy = fault_envoy(
        &up,
        json!({"rules": [
            {"name": "half", "match": [{"uri": {"prefix": "/half"}}],
             "fault": {"abort": {"httpStatus": 500, "percentage": {"value": 50.0}}}},
            {"name": "eighth", "match": [{"uri": {"prefix": "/eighth"}}],
             "fault": {"abort": {"httpStatus": 500, "percentage": {"value": 12.5}}}},
            {"name": "legacy", "match": [{"uri": {"prefix": "/legacy"}}],
             "fault": {"abort": {"httpStatus": 500, "percent": 25}}}
        ]}),
    );
    let n = 400usize;
    let paths = ["/half", "/eighth", "/legacy"];
    let rsps = ok(fire(envoy.listener_addr(), n * 3, 8, move |i| Request::get(paths[i % 3])));
    let mut hits = [0u64; 3];
    for (i, r) in rsps.iter().enumerate() {
        match r.status {
            500 => {
                assert_aborted(r, 500);
                hits[i % 3] += 1;
            }
            _ => assert_passed(r),
        }
    }
    assert_binomial(hits[0], n as u64, 0.5);
    assert_binomial(hits[1], n as u64, 0.125);
    assert_binomial(hits[2], n as u64, 0.25);
    assert_eq!(fstat(&envoy, "half", "aborts_injected"), hits[0]);
    assert_eq!(fstat(&envoy, "eighth", "aborts_injected"), hits[1]);
    assert_eq!(fstat(&envoy, "legacy", "aborts_injected"), hits[2]);
    assert_eq!(up.requests(), 3 * n as u64 - hits.iter().sum::<u64>());
}

// === delays ===

#[test]
fn delay_percentage_follows_the_binomial() {
    let delay = Duration::from_millis(100);
    let up = Upstream::start();
    let envoy = fault_envoy(
        &up,
        json!({"rules": [{"name": "slow",
            "fault": {"delay": {"fixedDelay": "100ms", "percentage": {"value": 30.0}}}}]}),
    );
    let n = 400u64;
    let rsps = ok(fire(envoy.listener_addr(), n as usize, 16, |_| Request::get("/")));
    rsps.iter().for_each(assert_passed);
    // The counter is exact; the responses' timing must agree with it: every delayed
    // request is slow, so at least `counter` responses took the delay. On a loaded
    // machine an undelayed request can also be slow, so a few (5 %) extra are allowed.
    let counted = fstat(&envoy, "slow", "delays_injected");
    assert_binomial(counted, n, 0.3);
    let slow = rsps.iter().filter(|r| was_delayed(r, delay)).count() as u64;
    let mut elapsed: Vec<Duration> = rsps.iter().map(|r| r.elapsed).collect();
    elapsed.sort();
    assert!(
        slow >= counted && slow - counted <= n / 20,
        "delays_injected = {counted} but {slow} responses took >= {delay:?}; sorted elapsed: {elapsed:?}"
    );
    assert_eq!(fstat(&envoy, "slow", "aborts_injected"), 0);
    assert_eq!(up.requests(), n);
}

#[test]
fn delays_are_accurate() {
    // Every accepted duration syntax; elapsed must be >= the delay and < delay + 1 s.
    let up = Upstream::start();
    let cases = [("/d250", "0.250s", 250u64), ("/d300", "300ms", 300), ("/d1s", "1s", 1000)];
    let rules: Vec<Value> = cases
        .iter()
        .map(|(p, d, _)| {
            json!({"name": &p[1..], "match": [{"uri": {"prefix": p}}],
                   "fault": {"delay": {"fixedDelay": d, "percentage": {"value": 100}}}})
        })
        .collect();
    let envoy = fault_envoy(&up, json!({ "rules": rules }));
    let baseline = envoy.get("/nodelay");
    assert_passed(&baseline);
    for (path, syntax, ms) in cases {
        let rsp = envoy.get(path);
        assert_passed(&rsp);
        let d = Duration::from_millis(ms);
        assert!(
            was_delayed(&rsp, d) && rsp.elapsed < d + Duration::from_secs(1),
            "{path} ({syntax}): elapsed {:?}, expected {d:?} ..< {:?}",
            rsp.elapsed,
            d + Duration::from_secs(1)
        );
        assert_eq!(fstat(&envoy, &path[1..], "delays_injected"), 1, "{path}");
    }
    assert!(baseline.elapsed < Duration::from_millis(250), "undelayed request took {:?}", baseline.elapsed);
    assert_eq!(up.requests(), 4);
}

#[test]
fn abort_is_decided_after_the_delay() {
    let up = Upstream::start();
    let envoy = fault_envoy(
        &up,
        json!({"rules": [{"name": "both", "fault": {
            "delay": {"fixedDelay": "300ms", "percentage": {"value": 100}},
            "abort": {"httpStatus": 503, "percentage": {"value": 100}}}}]}),
    );
    // While the request is paused, it is counted as active and not answered yet.
    let addr = envoy.listener_addr();
    let pending = std::thread::spawn(move || client::send(addr, &Request::get("/")));
    eventually("active_faults == 1", Duration::from_secs(2), || {
        (fstat(&envoy, "both", "active_faults") == 1).then_some(())
    });
    let rsp = pending.join().expect("request thread");
    assert_aborted(&rsp, 503);
    assert!(was_delayed(&rsp, Duration::from_millis(300)), "abort came before the delay: {:?}", rsp.elapsed);
    assert!(rsp.elapsed < Duration::from_millis(1300), "elapsed {:?}", rsp.elapsed);
    assert_eq!(fstat(&envoy, "both", "delays_injected"), 1);
    assert_eq!(fstat(&envoy, "both", "aborts_injected"), 1);
    assert_eq!(fstat(&envoy, "both", "active_faults"), 0);
    assert_eq!(up.requests(), 0);
}

#[test]
fn delayed_request_keeps_body_and_trailers() {
    let up = Upstream::start();
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .upstream_h2()
        .listener(Listener::new().filter(Filter::wasm(
            "fault",
            json!({"rules": [{"name": "slow",
                "fault": {"delay": {"fixedDelay": "200ms", "percentage": {"value": 100}}}}]}),
        )))
        .start();
    let body: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let sum = format!("{:016x}", meshwasm_tests::upstream::fnv1a64(&body));

    // HTTP/2 with trailers.
    let rsp = envoy.send(Request::post("/upload", body.clone()).h2().trailer("x-checksum", &sum));
    assert_passed(&rsp);
    assert!(was_delayed(&rsp, Duration::from_millis(200)), "not delayed: {:?}", rsp.elapsed);
    let echo = rsp.json();
    assert_eq!(echo["body_len"], body.len());
    assert_eq!(echo["body_fnv1a64"], sum);
    assert_eq!(echo["trailers"]["x-checksum"], sum, "request trailers lost: {echo}");

    // HTTP/1.1 with a content-length body.
    let rsp = envoy.send(Request::post("/upload", body.clone()));
    assert_passed(&rsp);
    assert!(was_delayed(&rsp, Duration::from_millis(200)), "not delayed: {:?}", rsp.elapsed);
    assert_eq!(rsp.json()["body_fnv1a64"], sum);
    assert_eq!(fstat(&envoy, "slow", "delays_injected"), 2);
}

// === gRPC ===

#[test]
fn grpc_aborts_are_trailers_only_with_grpc_status() {
    let up = Upstream::start();
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .upstream_h2()
        .listener(Listener::new().filter(Filter::wasm(
            "fault",
            json!({"rules": [
                {"name": "by-name", "match": [{"uri": {"prefix": "/pkg.ByName/"}}],
                 "fault": {"abort": {"grpcStatus": "UNAVAILABLE", "percentage": {"value": 100}}}},
                {"name": "by-number", "match": [{"uri": {"prefix": "/pkg.ByNumber/"}}],
                 "fault": {"abort": {"grpcStatus": 14, "percentage": {"value": 100}}}},
                {"name": "http503", "match": [{"uri": {"prefix": "/pkg.Http503/"}}],
                 "fault": {"abort": {"httpStatus": 503, "percentage": {"value": 100}}}},
                {"name": "http403", "match": [{"uri": {"prefix": "/pkg.Http403/"}}],
                 "fault": {"abort": {"httpStatus": 403, "percentage": {"value": 100}}}},
                {"name": "delayed", "match": [{"uri": {"prefix": "/pkg.Delayed/"}}],
                 "fault": {"delay": {"fixedDelay": "200ms", "percentage": {"value": 100}},
                           "abort": {"grpcStatus": "RESOURCE_EXHAUSTED", "percentage": {"value": 100}}}}
            ]}),
        )))
        .start();
    let cases = [
        ("/pkg.ByName/Call", 14),
        ("/pkg.ByNumber/Call", 14),
        ("/pkg.Http503/Call", 14), // 503 → UNAVAILABLE
        ("/pkg.Http403/Call", 7),  // 403 → PERMISSION_DENIED
        ("/pkg.Delayed/Call", 8),
    ];
    for (path, code) in cases {
        let rsp = envoy.send(Request::grpc(path, b"payload"));
        assert_eq!(rsp.status, 200, "{path}: gRPC aborts are HTTP 200, got {}", rsp.status);
        assert_eq!(rsp.header("content-type"), Some("application/grpc"), "{path}");
        assert_eq!(rsp.grpc_status(), Some(code), "{path}: headers {:?} trailers {:?}", rsp.headers, rsp.trailers);
        assert_eq!(rsp.grpc_message().as_deref(), Some("fault filter abort"), "{path}");
        assert!(rsp.header("grpc-status").is_some(), "{path}: expected a trailers-only reply (grpc-status in headers)");
        assert!(rsp.body.is_empty(), "{path}: trailers-only reply has no body, got {:?}", rsp.body);
        assert!(!rsp.from_upstream());
    }
    // A gRPC call no rule matches reaches the upstream and gets its OK.
    let rsp = envoy.send(Request::grpc("/pkg.Other/Call", b"x"));
    assert_eq!((rsp.status, rsp.grpc_status()), (200, Some(0)));
    assert!(rsp.from_upstream());
    // The HTTP status still applies to a plain HTTP request on the same rule.
    let rsp = envoy.send(Request::get("/pkg.Http503/Call").h2());
    assert_aborted(&rsp, 503);
    assert_eq!(up.requests(), 1);
    assert_eq!(fstat(&envoy, "by-name", "aborts_injected"), 1);
    assert_eq!(fstat(&envoy, "http503", "aborts_injected"), 2);
    assert_eq!(fstat(&envoy, "delayed", "delays_injected"), 1);
}

// === header control ===

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Pass,
    Abort(u16),
    GrpcAbort(i32),
}

/// (request headers, gRPC request?, expected outcome, delayed?)
type HeaderCase<'a> = (Vec<(&'a str, &'a str)>, bool, Expect, bool);

#[test]
fn header_control_table() {
    const DELAY: Duration = Duration::from_millis(200);
    let up = Upstream::start();
    let envoy = fault_envoy(&up, json!({"headerControl": true}));
    let a = "x-envoy-fault-abort-request";
    let g = "x-envoy-fault-abort-grpc-request";
    let ap = "x-envoy-fault-abort-request-percentage";
    let d = "x-envoy-fault-delay-request";
    let dp = "x-envoy-fault-delay-request-percentage";
    use Expect::*;
    // (headers, grpc request?, expected outcome, delayed?)
    let table: Vec<HeaderCase> = vec![
        (vec![], false, Pass, false),
        (vec![(a, "503")], false, Abort(503), false),
        (vec![(a, "200")], false, Abort(200), false),
        (vec![(a, "599")], false, Abort(599), false),
        (vec![(a, "404")], false, Abort(404), false),
        (vec![(a, "0503")], false, Abort(503), false),
        (vec![(a, "199")], false, Pass, false),
        (vec![(a, "600")], false, Pass, false),
        (vec![(a, "-503")], false, Pass, false),
        (vec![(a, "abc")], false, Pass, false),
        (vec![(a, "503.0")], false, Pass, false),
        (vec![(a, "")], false, Pass, false),
        (vec![(a, "99999999999999999999")], false, Pass, false),
        // percentage: 100 and 0, out of range clamped to the cap (100), invalid → cap.
        (vec![(a, "503"), (ap, "100")], false, Abort(503), false),
        (vec![(a, "503"), (ap, "0")], false, Pass, false),
        (vec![(a, "503"), (ap, "150")], false, Abort(503), false),
        (vec![(a, "503"), (ap, "abc")], false, Abort(503), false),
        (vec![(a, "503"), (ap, "-1")], false, Abort(503), false),
        // gRPC code header.
        (vec![(g, "14")], true, GrpcAbort(14), false),
        (vec![(g, "0")], true, GrpcAbort(0), false),
        (vec![(g, "16")], true, GrpcAbort(16), false),
        (vec![(g, "abc")], true, Pass, false),
        (vec![(g, "-1")], true, Pass, false),
        // a valid http abort header wins over the gRPC one; an invalid one does not.
        (vec![(a, "503"), (g, "4")], true, GrpcAbort(14), false),
        (vec![(a, "700"), (g, "4")], true, GrpcAbort(4), false),
        (vec![(a, "503")], true, GrpcAbort(14), false),
        (vec![(a, "429")], true, GrpcAbort(14), false), // 429 → UNAVAILABLE
        // delays
        (vec![(d, "200")], false, Pass, true),
        (vec![(d, "200"), (dp, "100")], false, Pass, true),
        (vec![(d, "200"), (dp, "0")], false, Pass, false),
        (vec![(d, "200"), (dp, "500")], false, Pass, true),
        (vec![(d, "200"), (dp, "abc")], false, Pass, true),
        (vec![(d, "200"), (dp, "-1")], false, Pass, true),
        (vec![(dp, "100")], false, Pass, false),
        (vec![(ap, "100")], false, Pass, false),
        (vec![(d, "0")], false, Pass, false),
        (vec![(d, "-200")], false, Pass, false),
        (vec![(d, "abc")], false, Pass, false),
        (vec![(d, "200ms")], false, Pass, false),
        (vec![(d, "200")], true, Pass, true),
        // delay then abort
        (vec![(d, "200"), (a, "503")], false, Abort(503), true),
        (vec![(d, "200"), (g, "8")], true, GrpcAbort(8), true),
    ];
    let mut failures = Vec::new();
    let (mut aborts, mut delays, mut passed) = (0u64, 0u64, 0u64);
    for (headers, grpc, expect, delayed) in &table {
        let mut req = if *grpc { Request::grpc("/svc.S/M", b"m") } else { Request::get("/hc") };
        req = req.headers(headers.iter().copied());
        let mut rsp = envoy.send(req.clone());
        // An undelayed request that was slow only because the machine is loaded: retry
        // (a delay that really happens or not is deterministic at these percentages).
        for _ in 0..2 {
            if *delayed || !was_delayed(&rsp, DELAY) {
                break;
            }
            rsp = envoy.send(req.clone());
        }
        let got = if rsp.from_upstream() {
            Pass
        } else if *grpc {
            GrpcAbort(rsp.grpc_status().unwrap_or(-1))
        } else {
            Abort(rsp.status)
        };
        let got_delayed = was_delayed(&rsp, DELAY);
        let body_ok = match got {
            Abort(_) => rsp.text() == "fault filter abort",
            GrpcAbort(_) => rsp.status == 200 && rsp.grpc_message().as_deref() == Some("fault filter abort"),
            Pass => rsp.status == 200,
        };
        if got != *expect || got_delayed != *delayed || !body_ok {
            failures.push(format!(
                "headers {headers:?} grpc={grpc}: expected {expect:?} delayed={delayed}, got {got:?} delayed={got_delayed} \
                 (status {} elapsed {:?} grpc-status {:?} body {:?})",
                rsp.status,
                rsp.elapsed,
                rsp.grpc_status(),
                rsp.text()
            ));
        }
        match expect {
            Pass => passed += 1,
            _ => aborts += 1,
        }
        if *delayed {
            delays += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} header-control cases failed:\n{}",
        failures.len(),
        table.len(),
        failures.join("\n")
    );
    assert_eq!(fstat(&envoy, "header-control", "aborts_injected"), aborts);
    assert_eq!(fstat(&envoy, "header-control", "delays_injected"), delays);
    assert_eq!(up.requests(), passed);
}

#[test]
fn header_control_is_only_for_requests_no_rule_matched() {
    let up = Upstream::start();
    let envoy = fault_envoy(&up, json!({"rules": [abort_rule("explicit", "/rule", 418)], "headerControl": true}));
    // A request matching a rule gets the rule's fault, not the header's.
    let rsp = envoy.send(Request::get("/rule").header("x-envoy-fault-abort-request", "503"));
    assert_aborted(&rsp, 418);
    let rsp = envoy.send(Request::get("/other").header("x-envoy-fault-abort-request", "503"));
    assert_aborted(&rsp, 503);
    // Without headerControl the headers are ignored.
    let envoy2 = fault_envoy(&up, json!({"rules": [abort_rule("explicit", "/rule", 418)]}));
    assert_passed(&envoy2.send(Request::get("/other").header("x-envoy-fault-abort-request", "503")));
    assert_passed(&envoy2.send(Request::get("/other").header("x-envoy-fault-delay-request", "10")));
    assert_eq!(fstat(&envoy, "explicit", "aborts_injected"), 1);
    assert_eq!(fstat(&envoy, "header-control", "aborts_injected"), 1);
    assert_eq!(fstat(&envoy2, "header-control", "aborts_injected"), 0);
}

#[test]
fn header_percentages_are_capped() {
    let up = Upstream::start();
    let envoy = fault_envoy(
        &up,
        json!({"headerControl": {"abort": {"percentage": {"value": 20}}, "delay": {"percentage": {"value": 10}}}}),
    );
    let n = 400u64;
    // Abort: header asks for 100 % (or says nothing, which means "the cap"): 20 % happen.
    let rsps = ok(fire(envoy.listener_addr(), n as usize, 8, |i| {
        let r = Request::get("/").header("x-envoy-fault-abort-request", "503");
        if i % 2 == 0 {
            r.header("x-envoy-fault-abort-request-percentage", "100")
        } else {
            r
        }
    }));
    let aborted = count_status(&rsps, 503);
    assert_binomial(aborted, n, 0.2);
    // Below the cap the header's own value applies.
    let rsps = ok(fire(envoy.listener_addr(), n as usize, 8, |_| {
        Request::get("/")
            .header("x-envoy-fault-abort-request", "503")
            .header("x-envoy-fault-abort-request-percentage", "5")
    }));
    let aborted_low = count_status(&rsps, 503);
    assert_binomial(aborted_low, n, 0.05);
    // Delay: 100 % requested, 10 % cap.
    let rsps = ok(fire(envoy.listener_addr(), n as usize, 8, |_| {
        Request::get("/")
            .header("x-envoy-fault-delay-request", "5")
            .header("x-envoy-fault-delay-request-percentage", "100")
    }));
    rsps.iter().for_each(assert_passed);
    let delayed = fstat(&envoy, "header-control", "delays_injected");
    assert_binomial(delayed, n, 0.1);
    assert_eq!(fstat(&envoy, "header-control", "aborts_injected"), aborted + aborted_low);
}

// === max active faults ===

#[test]
fn max_active_faults_bounds_concurrent_delays_across_workers() {
    let up = Upstream::start();
    let envoy = fault_envoy(
        &up,
        json!({"maxActiveFaults": 5, "rules": [{"name": "slow",
            "fault": {"delay": {"fixedDelay": "1s", "percentage": {"value": 100}}}}]}),
    );
    let addr = envoy.listener_addr();
    let load = std::thread::spawn(move || fire(addr, 20, 20, |_| Request::get("/")));
    // While they are paused, exactly 5 are active.
    eventually("active_faults == 5", Duration::from_secs(3), || {
        (fstat(&envoy, "slow", "active_faults") == 5).then_some(())
    });
    let rsps = ok(load.join().expect("load thread"));
    rsps.iter().for_each(assert_passed);
    let delayed = rsps.iter().filter(|r| was_delayed(r, Duration::from_secs(1))).count();
    assert_eq!(delayed, 5, "elapsed: {:?}", rsps.iter().map(|r| r.elapsed).collect::<Vec<_>>());
    assert_eq!(fstat(&envoy, "slow", "delays_injected"), 5);
    assert_eq!(fstat(&envoy, "slow", "faults_overflow"), 15);
    eventually("active_faults back to 0", Duration::from_secs(2), || {
        (envoy.stat(&stat_name("slow", "active_faults")) == Some(0)).then_some(())
    });
    // The budget is free again.
    let rsp = envoy.get("/");
    assert!(was_delayed(&rsp, Duration::from_secs(1)), "not delayed after the burst: {:?}", rsp.elapsed);
    assert_eq!(up.requests(), 21);
}

#[test]
fn client_disconnect_during_delay_releases_the_fault() {
    let up = Upstream::start();
    let mut envoy = fault_envoy(
        &up,
        json!({"maxActiveFaults": 1, "rules": [{"name": "slow", "match": [{"uri": {"prefix": "/slow"}}],
            "fault": {"delay": {"fixedDelay": "1500ms", "percentage": {"value": 100}}}}]}),
    );
    let addr = envoy.listener_addr();
    let start = Instant::now();
    let client = std::thread::spawn(move || {
        client::send_and_disconnect(addr, &Request::get("/slow"), Duration::from_millis(400))
    });
    eventually("active_faults == 1", Duration::from_secs(2), || {
        (fstat(&envoy, "slow", "active_faults") == 1).then_some(())
    });
    let got = client.join().expect("client thread");
    assert!(got.is_empty(), "response arrived during the delay: {}", String::from_utf8_lossy(&got));
    // Released when the stream is reset, well before the delay would have ended.
    eventually("active_faults back to 0 after the reset", Duration::from_millis(900), || {
        (envoy.stat(&stat_name("slow", "active_faults")) == Some(0)).then_some(())
    });
    assert!(start.elapsed() < Duration::from_millis(1500), "released only when the timer fired");
    // Past the original delay: nothing was forwarded, the worker survived.
    std::thread::sleep(Duration::from_millis(1500).saturating_sub(start.elapsed()) + Duration::from_millis(300));
    envoy.assert_healthy();
    assert_eq!(up.requests(), 0, "the abandoned request was forwarded");
    // With maxActiveFaults 1, a leaked slot would make this request overflow (no delay).
    let rsp = envoy.get("/slow");
    assert_passed(&rsp);
    assert!(was_delayed(&rsp, Duration::from_millis(1500)), "slot leaked: not delayed ({:?})", rsp.elapsed);
    assert_eq!(fstat(&envoy, "slow", "faults_overflow"), 0);
    let log = envoy.log();
    assert!(!log.contains("panicked"), "wasm panic in log");
}

#[test]
fn h2_stream_reset_during_delay_releases_the_fault_and_keeps_the_connection() {
    let up = Upstream::start();
    let envoy = fault_envoy(
        &up,
        json!({"maxActiveFaults": 1, "rules": [{"name": "slow", "match": [{"uri": {"prefix": "/slow"}}],
            "fault": {"delay": {"fixedDelay": "2s", "percentage": {"value": 100}}}}]}),
    );
    let mut conn = client::H2Connection::open(envoy.listener_addr());
    let start = Instant::now();
    let answered = conn.send_and_reset(&Request::get("/slow"), Duration::from_millis(300));
    assert!(!answered, "the delayed stream was answered within 300 ms");
    eventually("active_faults back to 0 after RST_STREAM", Duration::from_millis(1000), || {
        (envoy.stat(&stat_name("slow", "active_faults")) == Some(0)).then_some(())
    });
    assert!(start.elapsed() < Duration::from_secs(2), "released only when the timer fired");
    // The same connection still carries streams, and the slot is free again (max 1).
    let rsp = conn.send(&Request::get("/fast"));
    assert_passed(&rsp);
    let rsp = conn.send(&Request::get("/slow").timeout(Duration::from_secs(10)));
    assert_passed(&rsp);
    assert!(was_delayed(&rsp, Duration::from_secs(2)), "slot leaked: not delayed ({:?})", rsp.elapsed);
    assert_eq!(fstat(&envoy, "slow", "delays_injected"), 2);
    assert_eq!(fstat(&envoy, "slow", "faults_overflow"), 0);
    assert_eq!(up.requests(), 2, "the reset stream must never reach the upstream");
}

// === matching ===

#[test]
fn matching_rules() {
    let up = Upstream::start();
    let port_listener = free_port();
    let rule = |name: &str, m: Value, status: u16| json!({"name": name, "match": m, "fault": {"abort": {"httpStatus": status, "percentage": {"value": 100}}}});
    let config = json!({"rules": [
        rule("first", json!([{"uri": {"prefix": "/first"}}]), 513),
        rule("second", json!([{"uri": {"prefix": "/first"}}]), 514),
        rule("exact", json!([{"uri": {"exact": "/exact"}}]), 501),
        rule("prefix", json!([{"uri": {"prefix": "/prefix"}}]), 502),
        rule("regex", json!([{"uri": {"regex": "/re/[0-9]+"}}]), 503),
        rule("hdr", json!([{"uri": {"prefix": "/hdr"}, "headers": {"end-user": {"exact": "jason"}}}]), 504),
        rule("hdr-re", json!([{"uri": {"prefix": "/hre"}, "headers": {"x-ver": {"regex": "v[12]"}}}]), 520),
        rule("nohdr", json!([{"uri": {"prefix": "/nohdr"}, "withoutHeaders": {"x-skip": {"exact": "1"}}}]), 505),
        rule("query", json!([{"uri": {"prefix": "/q"}, "queryParams": {"debug": {"exact": "1"}}}]), 506),
        rule("method", json!([{"uri": {"prefix": "/m"}, "method": {"exact": "DELETE"}}]), 507),
        rule("icase", json!([{"uri": {"exact": "/CaSe"}, "ignoreUriCase": true}]), 508),
        rule("or", json!([{"uri": {"prefix": "/or1"}}, {"uri": {"prefix": "/or2"}}]), 509),
        rule("route", json!([{"routes": ["special"]}]), 510),
        rule("authority", json!([{"uri": {"prefix": "/auth"}, "authority": {"exact": "foo.example"}}]), 511),
        rule("port", json!([{"uri": {"prefix": "/port"}, "port": port_listener}]), 512),
        rule("scheme", json!([{"uri": {"prefix": "/scheme"}, "scheme": {"exact": "http"}}]), 515),
        rule("scheme-https", json!([{"uri": {"prefix": "/shttps"}, "scheme": {"exact": "https"}}]), 516)
    ]});
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .listener(
            Listener::new()
                .filter(Filter::wasm("fault", config.clone()))
                .route(Route::new("special", "/special"))
                .route(Route::new("default", "/")),
        )
        .listener(Listener::new().port(port_listener).filter(Filter::wasm("fault", config)))
        .start();
    use Expect::*;
    let get = Request::get;
    let table: Vec<(Request, Expect)> = vec![
        (get("/first"), Abort(513)),
        (get("/exact"), Abort(501)),
        (get("/exact/"), Pass),
        (get("/exact?x=1"), Abort(501)), // uri matches the path without the query
        (get("/prefix/anything"), Abort(502)),
        (get("/pre"), Pass),
        (get("/re/123"), Abort(503)),
        (get("/re/123x"), Pass), // regex is a full match
        (get("/x/re/1"), Pass),
        (get("/hdr").header("end-user", "jason"), Abort(504)),
        (get("/hdr").header("end-user", "jasonx"), Pass),
        (get("/hdr"), Pass),
        (get("/hre").header("x-ver", "v2"), Abort(520)),
        (get("/hre").header("x-ver", "v3"), Pass),
        (get("/hre").header("x-ver", "v12"), Pass),
        (get("/nohdr"), Abort(505)),
        (get("/nohdr").header("x-skip", "2"), Abort(505)),
        (get("/nohdr").header("x-skip", "1"), Pass),
        (get("/q?debug=1"), Abort(506)),
        (get("/q?a=b&debug=1"), Abort(506)),
        (get("/q?debug=2"), Pass),
        (get("/q"), Pass),
        (get("/m").method("DELETE"), Abort(507)),
        (get("/m"), Pass),
        (get("/case"), Abort(508)),
        (get("/CASE"), Abort(508)),
        (get("/case/x"), Pass),
        (get("/or1"), Abort(509)),
        (get("/or2/x"), Abort(509)),
        (get("/or3"), Pass),
        (get("/special/x"), Abort(510)),
        (get("/auth").authority("foo.example"), Abort(511)),
        (get("/auth").authority("bar.example"), Pass),
        (get("/port"), Pass), // listener 0 is not the rule's port
        (get("/scheme"), Abort(515)),
        (get("/shttps"), Pass),
        (get("/nothing"), Pass),
    ];
    let mut failures = Vec::new();
    for (req, expect) in &table {
        let rsp = envoy.send(req.clone());
        let got = if rsp.from_upstream() && rsp.status == 200 { Pass } else { Abort(rsp.status) };
        if got != *expect {
            failures.push(format!(
                "{} {} {:?}: expected {expect:?}, got {got:?} ({})",
                req.method,
                req.path,
                req.headers,
                rsp.text()
            ));
        }
    }
    // The port rule only applies on its listener.
    let rsp = envoy.send_to(1, get("/port"));
    if rsp.status != 512 {
        failures.push(format!("GET /port on listener port {port_listener}: expected Abort(512), got {}", rsp.status));
    }
    assert!(
        failures.is_empty(),
        "{} of {} matching cases failed:\n{}",
        failures.len(),
        table.len() + 1,
        failures.join("\n")
    );
    assert_eq!(fstat(&envoy, "first", "aborts_injected"), 1);
    assert_eq!(fstat(&envoy, "second", "aborts_injected"), 0);
}

#[test]
fn rule_names_default_and_sanitized() {
    let up = Upstream::start();
    let envoy = fault_envoy(
        &up,
        json!({"rules": [
            {"match": [{"uri": {"prefix": "/a"}}], "fault": {"abort": {"httpStatus": 500, "percentage": {"value": 100}}}},
            {"name": "ratings.jason v2", "match": [{"uri": {"prefix": "/b"}}],
             "fault": {"abort": {"httpStatus": 500, "percentage": {"value": 100}}}},
            {"match": [{"uri": {"prefix": "/c"}}], "fault": {"abort": {"httpStatus": 500, "percentage": {"value": 100}}}}
        ]}),
    );
    for p in ["/a", "/b", "/b", "/c", "/c", "/c"] {
        assert_aborted(&envoy.get(p), 500);
    }
    assert_eq!(fstat(&envoy, "rule-0", "aborts_injected"), 1);
    assert_eq!(fstat(&envoy, "ratings_jason_v2", "aborts_injected"), 2);
    assert_eq!(fstat(&envoy, "rule-2", "aborts_injected"), 3);
}

// === per-route override ===

#[test]
fn route_metadata_overrides_the_plugin_config() {
    let up = Upstream::start();
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .listener(
            Listener::new()
                .filter(Filter::wasm("fault", json!({"rules": [abort_rule("plugin", "/", 500)]})))
                .route(
                    Route::new("teapot", "/teapot")
                        .meshwasm_override("fault", json!({"rules": [abort_rule("route-rule", "/teapot", 418)]})),
                )
                .route(Route::new("quiet", "/quiet").meshwasm_override("fault", json!({"rules": []})))
                .route(Route::new("headers", "/headers").meshwasm_override("fault", json!({"headerControl": true})))
                .route(Route::new("default", "/")),
        )
        .start();
    assert_aborted(&envoy.get("/anything"), 500);
    assert_aborted(&envoy.get("/teapot/1"), 418);
    assert_aborted(&envoy.get("/teapot/2"), 418);
    assert_passed(&envoy.get("/quiet"));
    assert_passed(&envoy.get("/headers"));
    assert_aborted(&envoy.send(Request::get("/headers").header("x-envoy-fault-abort-request", "429")), 429);
    // The plugin-wide header control is off: the header does nothing elsewhere.
    assert_aborted(&envoy.send(Request::get("/x").header("x-envoy-fault-abort-request", "429")), 500);
    assert_eq!(fstat(&envoy, "plugin", "aborts_injected"), 2);
    assert_eq!(fstat(&envoy, "route-rule", "aborts_injected"), 2);
    assert_eq!(fstat(&envoy, "header-control", "aborts_injected"), 1);
    assert_eq!(up.requests(), 2);
}

#[test]
fn invalid_route_override_is_logged_once_and_the_plugin_config_applies() {
    let up = Upstream::start();
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .concurrency(1)
        .listener(
            Listener::new()
                .filter(Filter::wasm("fault", json!({"rules": [abort_rule("plugin", "/", 500)]})))
                .route(Route::new("broken", "/broken").meshwasm_override(
                    "fault",
                    json!({"rules": [{"name": "bad", "fault": {"abort": {"httpStatus": 700}}}]}),
                ))
                .route(Route::new("default", "/")),
        )
        .start();
    for _ in 0..5 {
        assert_aborted(&envoy.get("/broken"), 500);
    }
    let log = envoy.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("route broken")).collect();
    assert_eq!(lines.len(), 1, "expected one error for the broken route (decoded once, cached):\n{}", lines.join("\n"));
    assert!(
        lines[0]
            .contains("filter_metadata.meshwasm.fault.rules[0].fault.abort.httpStatus: must be in 200..=599, got 700"),
        "{}",
        lines[0]
    );
    assert_eq!(fstat(&envoy, "plugin", "aborts_injected"), 5);
}

/// Envoy's YAML loader stores non-integer numbers of route metadata as *strings*
/// (`percentage: {value: 12.5}` in a bootstrap's `filter_metadata` arrives as
/// `"12.5"`; integers stay numbers; verified on Envoy 1.40 with `/config_dump`). A
/// per-route override written in YAML, the usual way, must still work.
#[test]
fn route_overrides_off_ignores_route_metadata_and_unnamed_routes_have_none() {
    let up = Upstream::start();
    let route_rule = json!({"rules": [abort_rule("route-rule", "/", 418)]});
    // routeOverrides: false — the plugin's rules apply everywhere, metadata is not read.
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .listener(
            Listener::new()
                .filter(Filter::wasm(
                    "fault",
                    json!({"rules": [abort_rule("plugin", "/", 500)], "routeOverrides": false}),
                ))
                .route(Route::new("teapot", "/teapot").meshwasm_override("fault", route_rule.clone()))
                .route(Route::new("default", "/")),
        )
        .start();
    assert_aborted(&envoy.get("/teapot"), 500);
    assert_aborted(&envoy.get("/other"), 500);
    drop(envoy);
    // Overrides are keyed by route name: on an unnamed route the override is ignored.
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .listener(
            Listener::new()
                .filter(Filter::wasm("fault", json!({"rules": [abort_rule("plugin", "/", 500)]})))
                .route(Route::new("", "/teapot").meshwasm_override("fault", route_rule))
                .route(Route::new("default", "/")),
        )
        .start();
    assert_aborted(&envoy.get("/teapot"), 500);
    // routeOverrides is plugin-wide: in route metadata it is an error (logged, ignored).
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .listener(
            Listener::new()
                .filter(Filter::wasm("fault", json!({"rules": []})))
                .route(Route::new("r", "/r").meshwasm_override("fault", json!({"routeOverrides": false})))
                .route(Route::new("default", "/")),
        )
        .start();
    assert_passed(&envoy.get("/r"));
    assert!(envoy.log().contains("filter_metadata.meshwasm.fault.routeOverrides: is plugin-wide"), "{}", envoy.log());
}

#[test]
fn route_metadata_with_fractional_percentages_from_yaml() {
    let up = Upstream::start();
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .listener(
            Listener::new()
                .filter(Filter::wasm("fault", json!({"rules": []})))
                .route(Route::new("frac", "/frac").meshwasm_override(
                    "fault",
                    json!({"rules": [{"name": "frac", "fault": {
                        "delay": {"fixedDelay": "1ms", "percentage": {"value": 0.0001}},
                        "abort": {"httpStatus": 418, "percentage": {"value": 100.0}}}}]}),
                ))
                .route(Route::new("default", "/")),
        )
        .start();
    assert_aborted(&envoy.get("/frac"), 418);
    assert_passed(&envoy.get("/other"));
    assert!(
        !envoy.log().contains("invalid per-route configuration"),
        "route override rejected:\n{}",
        envoy.log().lines().filter(|l| l.contains("per-route")).collect::<Vec<_>>().join("\n")
    );
}

// === telemetry ===

#[test]
fn prometheus_has_the_rule_label() {
    let up = Upstream::start();
    let envoy = fault_envoy(
        &up,
        json!({"rules": [{"name": "ratings-jason",
            "match": [{"uri": {"prefix": "/ratings"}, "headers": {"end-user": {"exact": "jason"}}}],
            "fault": {"delay": {"fixedDelay": "10ms", "percentage": {"value": 100}},
                      "abort": {"httpStatus": 500, "percentage": {"value": 100}}}}]}),
    );
    for _ in 0..3 {
        assert_aborted(&envoy.send(Request::get("/ratings/1").header("end-user", "jason")), 500);
    }
    let prom = envoy.prometheus();
    let ours: Vec<&str> = prom.lines().filter(|l| l.contains("meshwasm")).collect();
    eprintln!("/stats/prometheus, meshwasm lines:\n{}", ours.join("\n"));
    for want in [
        "# TYPE meshwasm_fault_delays_injected counter",
        "meshwasm_fault_delays_injected{rule=\"ratings-jason\"} 3",
        "meshwasm_fault_aborts_injected{rule=\"ratings-jason\"} 3",
        "# TYPE meshwasm_fault_active_faults gauge",
        "meshwasm_fault_active_faults{rule=\"ratings-jason\"} 0",
    ] {
        assert!(ours.contains(&want), "missing `{want}` in /stats/prometheus; meshwasm lines:\n{}", ours.join("\n"));
    }
    // And the flat name in /stats.
    assert_eq!(fstat(&envoy, "ratings-jason", "delays_injected"), 3);
}

// === bad config ===

fn rejected(config: &str) -> String {
    let failed = Envoy::builder().listener(Listener::new().filter(Filter::wasm_raw("fault", config))).expect_failure();
    assert!(!failed.status.success(), "Envoy exited {:?}", failed.status);
    failed.log
}

#[test]
fn bad_config_is_rejected_with_the_json_path() {
    let cases = [
        (
            r#"{"rules": [{"name": "r", "fault": {"abort": {"httpStatus": 700, "percentage": {"value": 100}}}}]}"#,
            "rules[0].fault.abort.httpStatus: must be in 200..=599, got 700",
        ),
        (r#"{"rules": [{"name": "r", "fault": {"abort": {"httpStatus": 500}}, "bogus": 1}]}"#, "bogus"),
        (r#"{"rules": [], "maxActiveFault": 3}"#, "maxActiveFault"),
        (
            r#"{"rules": [{"fault": {"delay": {"fixedDelay": "5s", "percentage": {"value": 101}}}}]}"#,
            "rules[0].fault.delay.percentage",
        ),
        (r#"{"rules": [{"fault": {"delay": {"fixedDelay": "soon"}}}]}"#, "rules[0].fault.delay.fixedDelay"),
        (r#"{"rules": [{"fault": {"abort": {"grpcStatus": "NOPE"}}}]}"#, "rules[0].fault.abort.grpcStatus"),
        (
            r#"{"rules": [{"match": [{"uri": {"regex": "("}}], "fault": {"abort": {"httpStatus": 500}}}]}"#,
            "rules[0].match[0].uri",
        ),
        (r#"{"rules": [ "#, "EOF while parsing"),
    ];
    let mut failures = Vec::new();
    for (config, want) in cases {
        let log = rejected(config);
        if !log.contains(want) {
            let wasm_lines: Vec<&str> =
                log.lines().filter(|l| l.contains("wasm") || l.contains("error") || l.contains("critical")).collect();
            failures.push(format!(
                "config {config}\n  expected log to contain {want:?}; relevant log lines:\n    {}",
                wasm_lines.join("\n    ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A valid config starts; guards against `rejected` passing for the wrong reason.
#[test]
fn good_config_starts() {
    let up = Upstream::start();
    let envoy = fault_envoy(
        &up,
        json!({"rules": [{"name": "ratings-jason",
            "match": [{"uri": {"prefix": "/ratings"}, "headers": {"end-user": {"exact": "jason"}}}],
            "fault": {"delay": {"fixedDelay": "5s", "percentage": {"value": 0.1}},
                      "abort": {"httpStatus": 500, "percentage": {"value": 50.0}}}}],
            "headerControl": true, "maxActiveFaults": 100}),
    );
    assert_passed(&envoy.get("/"));
    assert_passed(&envoy.send(Request::get("/ratings").header("end-user", "mike")));
    assert_aborted(&envoy.send(Request::get("/").header("x-envoy-fault-abort-request", "503")), 503);
}
