//! Differential test: meshwasm's fault filter against Envoy's native
//! `envoy.filters.http.fault`, in one Envoy, on twin listeners, with the same requests.
//!
//! Compared per request: HTTP status, body (for local replies), content-type,
//! grpc-status, grpc-message, whether the upstream saw it, and whether it was delayed.
//! Any difference is a bug in the filter (the native filter is the reference): the test
//! prints every differing request with both results.

use std::fmt;
use std::time::Duration;

use meshwasm_tests::{Envoy, Filter, Listener, Request, Response, Upstream};
use serde_json::json;

const DELAY_MS: u64 = 150;

fn native_fault(typed_config_body: &str) -> Filter {
    let body = typed_config_body.lines().map(|l| format!("  {l}\n")).collect::<String>();
    Filter::native(&format!(
        "name: envoy.filters.http.fault\ntyped_config:\n  \"@type\": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault\n{body}"
    ))
}

#[derive(Debug, Clone)]
struct Outcome {
    status: u16,
    /// The body of a local reply; `<upstream>` for the upstream's echo (which differs
    /// between listeners by request id and port).
    body: String,
    content_type: Option<String>,
    grpc_status: Option<String>,
    grpc_message: Option<String>,
    upstream: bool,
    delayed: bool,
    /// Shown, not compared.
    elapsed: Duration,
}

impl PartialEq for Outcome {
    fn eq(&self, o: &Self) -> bool {
        (
            self.status,
            &self.body,
            &self.content_type,
            &self.grpc_status,
            &self.grpc_message,
            self.upstream,
            self.delayed,
        ) == (o.status, &o.body, &o.content_type, &o.grpc_status, &o.grpc_message, o.upstream, o.delayed)
    }
}

impl Outcome {
    fn of(rsp: &Response) -> Self {
        let raw = |n: &str| rsp.trailer(n).or_else(|| rsp.header(n)).map(str::to_string);
        let upstream = rsp.from_upstream();
        Self {
            status: rsp.status,
            body: if upstream { "<upstream>".into() } else { rsp.text() },
            content_type: rsp.header("content-type").map(str::to_string),
            grpc_status: raw("grpc-status"),
            grpc_message: raw("grpc-message"),
            upstream,
            // Envoy's timers may fire a few µs "early" as the client measures; undelayed
            // requests take ~1 ms, so classify at 90 % of the delay.
            delayed: rsp.elapsed >= Duration::from_millis(DELAY_MS * 9 / 10),
            elapsed: rsp.elapsed,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "status={} body={:?} content-type={:?} grpc-status={:?} grpc-message={:?} upstream={} delayed={} ({:?})",
            self.status,
            self.body,
            self.content_type,
            self.grpc_status,
            self.grpc_message,
            self.upstream,
            self.delayed,
            self.elapsed
        )
    }
}

fn describe(req: &Request) -> String {
    let kind = match (req.proto, req.headers.iter().any(|(k, v)| k == "content-type" && v == "application/grpc")) {
        (_, true) => "gRPC",
        (meshwasm_tests::Proto::Http2, false) => "HTTP/2",
        _ => "HTTP/1.1",
    };
    let hs: Vec<String> = req
        .headers
        .iter()
        .filter(|(k, _)| k.starts_with("x-envoy-fault"))
        .map(|(k, v)| format!("{k}: {v:?}"))
        .collect();
    format!("{kind} {} {} [{}]", req.method, req.path, hs.join(", "))
}

/// Sends every request to listener `ours` and listener `native`; returns the differences.
fn compare(envoy: &Envoy, ours: usize, native: usize, reqs: &[Request]) -> Vec<String> {
    let mut diffs = Vec::new();
    for req in reqs {
        let mut a = Outcome::of(&envoy.send_to(ours, req.clone()));
        let mut b = Outcome::of(&envoy.send_to(native, req.clone()));
        // Differing only in "delayed": a loaded machine can make an undelayed request slow.
        // A real difference is deterministic (percentages are 0 or 100 here): retry twice.
        for _ in 0..2 {
            let only_delay_differs = a.delayed != b.delayed && (Outcome { delayed: b.delayed, ..a.clone() }) == b;
            if !only_delay_differs {
                break;
            }
            a = Outcome::of(&envoy.send_to(ours, req.clone()));
            b = Outcome::of(&envoy.send_to(native, req.clone()));
        }
        if a != b {
            diffs.push(format!("{}\n    native:   {b}\n    meshwasm: {a}", describe(req)));
        }
    }
    diffs
}

fn http_and_grpc(headers: &[(&str, &str)]) -> Vec<Request> {
    vec![
        Request::get("/diff").headers(headers.iter().copied()),
        Request::post("/diff", "body").h2().headers(headers.iter().copied()),
        Request::grpc("/pkg.Svc/Call", b"msg").headers(headers.iter().copied()),
    ]
}

#[test]
fn header_control_matches_native_fault_filter() {
    let up = Upstream::start();
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .upstream_h2()
        .listener(Listener::new().name("meshwasm").filter(Filter::wasm("fault", json!({"headerControl": true}))))
        .listener(Listener::new().name("native").filter(native_fault(
            "abort: { header_abort: {}, percentage: { numerator: 100 } }\ndelay: { header_delay: {}, percentage: { numerator: 100 } }",
        )))
        .start();

    let a = "x-envoy-fault-abort-request";
    let g = "x-envoy-fault-abort-grpc-request";
    let ap = "x-envoy-fault-abort-request-percentage";
    let d = "x-envoy-fault-delay-request";
    let dp = "x-envoy-fault-delay-request-percentage";
    let delay = DELAY_MS.to_string();
    let d2 = (DELAY_MS * 2).to_string();
    let table: Vec<Vec<(&str, &str)>> = vec![
        vec![],
        // http abort values: valid, edges, invalid
        vec![(a, "503")],
        vec![(a, "200")],
        vec![(a, "204")],
        vec![(a, "302")],
        vec![(a, "404")],
        vec![(a, "429")],
        vec![(a, "599")],
        vec![(a, "199")],
        vec![(a, "600")],
        vec![(a, "0")],
        vec![(a, "-503")],
        vec![(a, "+503")],
        vec![(a, "0503")],
        vec![(a, "503.0")],
        vec![(a, "5e2")],
        vec![(a, "abc")],
        vec![(a, "")],
        vec![(a, "99999999999999999999")],
        // gRPC abort values
        vec![(g, "14")],
        vec![(g, "0")],
        vec![(g, "1")],
        vec![(g, "16")],
        vec![(g, "17")],
        vec![(g, "99")],
        vec![(g, "-1")],
        vec![(g, "abc")],
        vec![(g, "")],
        // both
        vec![(a, "503"), (g, "4")],
        vec![(a, "700"), (g, "4")],
        vec![(a, "abc"), (g, "8")],
        // abort percentage
        vec![(a, "503"), (ap, "100")],
        vec![(a, "503"), (ap, "0")],
        vec![(a, "503"), (ap, "150")],
        vec![(a, "503"), (ap, "abc")],
        vec![(a, "503"), (ap, "-1")],
        vec![(a, "503"), (ap, "")],
        vec![(g, "14"), (ap, "0")],
        vec![(ap, "100")],
        // delays
        vec![(d, &delay)],
        vec![(d, &delay), (dp, "100")],
        vec![(d, &delay), (dp, "0")],
        vec![(d, &delay), (dp, "500")],
        vec![(d, &delay), (dp, "abc")],
        vec![(d, "0")],
        vec![(d, "-150")],
        vec![(d, "abc")],
        vec![(d, "")],
        vec![(d, "150ms")],
        vec![(d, "150.5")],
        vec![(dp, "100")],
        // delay and abort
        vec![(d, &d2), (a, "503")],
        vec![(d, &delay), (g, "14")],
        vec![(d, &delay), (a, "503"), (ap, "0")],
        vec![(d, &delay), (dp, "0"), (a, "503")],
    ];
    let reqs: Vec<Request> = table.iter().flat_map(|h| http_and_grpc(h)).collect();
    let diffs = compare(&envoy, 0, 1, &reqs);
    assert!(
        diffs.is_empty(),
        "{} of {} requests differ between meshwasm (header control) and the native fault filter:\n{}",
        diffs.len(),
        reqs.len(),
        diffs.join("\n")
    );
}

#[test]
fn fixed_faults_match_native_fault_filter() {
    let up = Upstream::start();
    let pct = json!({"value": 100});
    // (meshwasm fault JSON, native typed_config body)
    let pairs = [
        (json!({"abort": {"httpStatus": 503, "percentage": pct}}), "abort: { http_status: 503, percentage: { numerator: 100 } }"),
        (json!({"abort": {"httpStatus": 200, "percentage": pct}}), "abort: { http_status: 200, percentage: { numerator: 100 } }"),
        (json!({"abort": {"httpStatus": 404, "percentage": pct}}), "abort: { http_status: 404, percentage: { numerator: 100 } }"),
        (json!({"abort": {"grpcStatus": "UNAVAILABLE", "percentage": pct}}), "abort: { grpc_status: 14, percentage: { numerator: 100 } }"),
        (json!({"abort": {"grpcStatus": 0, "percentage": pct}}), "abort: { grpc_status: 0, percentage: { numerator: 100 } }"),
        (
            json!({"delay": {"fixedDelay": "300ms", "percentage": pct}, "abort": {"httpStatus": 503, "percentage": pct}}),
            "delay: { fixed_delay: 0.3s, percentage: { numerator: 100 } }\nabort: { http_status: 503, percentage: { numerator: 100 } }",
        ),
        (
            json!({"delay": {"fixedDelay": "300ms", "percentage": pct}}),
            "delay: { fixed_delay: 0.3s, percentage: { numerator: 100 } }",
        ),
        (
            json!({"abort": {"httpStatus": 503, "percentage": {"value": 0}}}),
            "abort: { http_status: 503, percentage: { numerator: 0 } }",
        ),
    ];
    let mut b = Envoy::builder().upstream(up.addr()).upstream_h2();
    for (i, (ours, native)) in pairs.iter().enumerate() {
        b = b
            .listener(
                Listener::new()
                    .name(&format!("meshwasm_{i}"))
                    .filter(Filter::wasm("fault", json!({"rules": [{"name": format!("pair-{i}"), "fault": ours}]}))),
            )
            .listener(Listener::new().name(&format!("native_{i}")).filter(native_fault(native)));
    }
    let envoy = b.start();
    let mut diffs = Vec::new();
    for (i, (ours, native)) in pairs.iter().enumerate() {
        for d in compare(&envoy, 2 * i, 2 * i + 1, &http_and_grpc(&[])) {
            diffs.push(format!("config meshwasm {ours} / native `{}`: {d}", native.replace('\n', " ")));
        }
    }
    assert!(diffs.is_empty(), "{} differences against the native fault filter:\n{}", diffs.len(), diffs.join("\n"));
}
