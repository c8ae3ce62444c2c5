//! CUSTOM (ext_authz) end to end, differential against istiod + Envoy: for istiod's CUSTOM
//! golden cases (`../shared/istio/authz-golden/custom-*`), native `envoy.filters.http.rbac`
//! (the shadow rules that select the callout) + `envoy.filters.http.ext_authz` exactly as
//! istiod generates them (the `-out1`/`-out2` files, cluster names pointed at local servers)
//! on one listener, and `authz.wasm` configured with the AuthorizationPolicy and the mesh
//! provider on its twin. Each side has its own real authorizer (HTTP service and gRPC
//! `envoy.service.auth.v3`, tonic + envoy-types), answering the same way; the same requests
//! go to both, under each authorizer behaviour (allow/deny, 5xx/UNAVAILABLE, garbage, down,
//! slow past the timeout) and fail-open and fail-closed providers. Compared per request: the
//! client's status, body and headers, what the upstream saw, and what the authorizer saw.

use std::collections::BTreeMap;
use std::time::Duration;

use meshwasm_tests::authz_golden::{cases_index, yaml_docs};
use meshwasm_tests::ext_authz::{Behaviour, Policy};
use meshwasm_tests::{Envoy, ExtAuthzGrpc, ExtAuthzHttp, Filter, Listener, Request, Response, Upstream};
use serde_json::{json, Value};

fn native_filter(doc: &Value) -> Filter {
    Filter::native(&format!("name: {}\ntyped_config: {}\n", doc["name"].as_str().unwrap(), doc["typedConfig"]))
}

/// The authorizers' answers: allow when the check carries `x-custom-id: allow` (a header
/// istiod's HTTP provider forwards), with headers for the upstream and the client, some of
/// which the provider's allow lists must drop; deny with 401, a body and headers.
fn policy() -> Policy {
    Policy::default()
        .allow_when("x-custom-id", "allow")
        .upstream_header("x-prefix-up", "u1")
        .upstream_header("authorization", "Bearer from-authz")
        .upstream_header("not-forwarded", "n")
        .downstream_header("x-prefix-down", "d1")
        .downstream_header("set-cookie", "session=abc")
        .deny(401, "custom says no")
        .deny_header("x-prefix-deny", "z")
        .deny_header("not-for-client", "q")
}

/// One CUSTOM variant: the case's out files patched the same way on the native side as the
/// provider on the wasm side.
struct Variant {
    name: &'static str,
    case: &'static str,
    grpc: bool,
    /// Override of the provider timeout (istiod's gRPC case has 2 ms, which a loaded test
    /// machine misses now and then: both sides get the same, deterministic value).
    timeout: &'static str,
    fail_open: bool,
}

const VARIANTS: &[Variant] = &[
    Variant { name: "http", case: "custom-http-provider", grpc: false, timeout: "10s", fail_open: true },
    Variant { name: "grpc", case: "custom-grpc-provider", grpc: true, timeout: "5s", fail_open: true },
    Variant { name: "http-closed", case: "custom-http-provider", grpc: false, timeout: "0.3s", fail_open: false },
    Variant { name: "grpc-closed", case: "custom-grpc-provider", grpc: true, timeout: "0.3s", fail_open: false },
];

enum Authorizer {
    Http(ExtAuthzHttp),
    Grpc(ExtAuthzGrpc),
}

impl Authorizer {
    fn start(grpc: bool) -> Self {
        if grpc {
            Self::Grpc(ExtAuthzGrpc::start(policy()))
        } else {
            Self::Http(ExtAuthzHttp::start(policy()))
        }
    }
    fn addr(&self) -> std::net::SocketAddr {
        match self {
            Self::Http(s) => s.addr(),
            Self::Grpc(s) => s.addr(),
        }
    }
    fn set_behaviour(&self, b: Behaviour) {
        match self {
            Self::Http(s) => s.set_behaviour(b),
            Self::Grpc(s) => s.set_behaviour(b),
        }
    }
    fn calls(&self) -> u64 {
        match self {
            Self::Http(s) => s.calls(),
            Self::Grpc(s) => s.calls(),
        }
    }
    /// What the authorizer saw last, normalised for comparison (per-request ids dropped).
    fn last_seen(&self) -> Value {
        let skip = |k: &str| matches!(k, "x-request-id" | "x-envoy-expected-rq-timeout-ms" | "x-envoy-internal");
        match self {
            Self::Http(s) => s.last_request().map_or(Value::Null, |c| {
                let mut h: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for (k, v) in &c.headers {
                    if !skip(k) {
                        h.entry(k.clone()).or_default().push(String::from_utf8_lossy(v).into_owned());
                    }
                }
                json!({"method": c.method, "path": c.path, "headers": h, "body": String::from_utf8_lossy(&c.body)})
            }),
            Self::Grpc(s) => s.last_request().map_or(Value::Null, |c| {
                let req = c.attributes.as_ref().and_then(|a| a.request.as_ref()).and_then(|r| r.http.as_ref());
                req.map_or(Value::Null, |r| {
                    let h: BTreeMap<&String, &String> = r.headers.iter().filter(|(k, _)| !skip(k)).collect();
                    json!({"method": r.method, "path": r.path, "host": r.host, "scheme": r.scheme,
                           "protocol": r.protocol, "headers": h, "body": r.body,
                           "raw_body": String::from_utf8_lossy(&r.raw_body), "size": r.size})
                })
            }),
        }
    }
}

/// The fields where `a` and `b` differ, long strings shortened: readable failures.
fn diff(a: &Value, b: &Value) -> String {
    let short = |v: &Value| {
        let s = v.to_string();
        if s.len() > 120 {
            format!("{}…({} chars)", &s[..120], s.len())
        } else {
            s
        }
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut out = String::new();
            for k in x.keys().chain(y.keys().filter(|k| !x.contains_key(*k))) {
                let (va, vb) = (x.get(k).unwrap_or(&Value::Null), y.get(k).unwrap_or(&Value::Null));
                if va != vb {
                    out.push_str(&format!("\n  {k}: wasm {} | native {}", short(va), short(vb)));
                }
            }
            out
        }
        _ => format!("\n  wasm {} | native {}", short(a), short(b)),
    }
}

/// The client-visible part of a response: status, body, headers (minus per-response ones),
/// and, when it came from the upstream, the headers the upstream saw.
fn observed(r: &Response) -> Value {
    let mut h = BTreeMap::new();
    for (k, v) in &r.headers {
        if !matches!(k.as_str(), "date" | "server" | "x-envoy-upstream-service-time") {
            h.entry(k.as_str().to_string())
                .or_insert_with(Vec::new)
                .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
        }
    }
    let upstream = if r.from_upstream() {
        let mut e = r.json();
        if let Some(o) = e["headers"].as_object_mut() {
            o.remove("x-request-id");
            o.remove("x-envoy-expected-rq-timeout-ms");
        }
        e
    } else {
        Value::Null
    };
    let body = if r.from_upstream() { String::new() } else { r.text() };
    json!({"status": r.status, "headers": h, "body": body, "upstream": upstream})
}

fn requests() -> Vec<(&'static str, Request)> {
    let allow = |r: Request| r.header("x-custom-id", "allow");
    let common = |r: Request| r.header("x-prefix-a", "pa").header("b-suffix", "sb").header("x-other", "o");
    vec![
        ("allowed /httpbin1", common(allow(Request::get("/httpbin1")))),
        ("denied /httpbin1", common(Request::get("/httpbin1").header("x-custom-id", "nope"))),
        ("allowed /httpbin2", allow(Request::get("/httpbin2"))),
        ("denied /httpbin2 (no header)", Request::get("/httpbin2")),
        ("not selected /other", Request::get("/other")),
        ("query /httpbin1?q=1", allow(Request::get("/httpbin1?q=1&r=%2F"))),
        ("not selected //httpbin1", Request::get("//httpbin1")),
        ("not selected /HTTPBIN1", Request::get("/HTTPBIN1")),
        ("client authorization replaced", allow(Request::get("/httpbin1").header("authorization", "Bearer client"))),
        ("client copy of x-prefix-up", allow(Request::get("/httpbin1").header("x-prefix-up", "client"))),
        ("repeated x-prefix-r", allow(Request::get("/httpbin1").header("x-prefix-r", "1").header("x-prefix-r", "2"))),
        ("post small body", allow(Request::post("/httpbin1", "hello=world"))),
        ("post 5000-byte body", allow(Request::post("/httpbin1", "b".repeat(5000)))),
        ("post denied with body", Request::post("/httpbin2", "x".repeat(300))),
        ("h2 allowed", common(allow(Request::get("/httpbin1"))).h2()),
        ("h2 denied", Request::get("/httpbin2").h2()),
    ]
}

#[test]
fn custom_decides_like_native_ext_authz() {
    let up = Upstream::start();
    let mut builder = Envoy::builder().upstream(up.addr());
    let mut sides = Vec::new();
    for (i, v) in VARIANTS.iter().enumerate() {
        let native_auth = Authorizer::start(v.grpc);
        let wasm_auth = Authorizer::start(v.grpc);
        let (nc, wc) = (format!("ext_authz_native_{i}"), format!("ext_authz_wasm_{i}"));
        builder = if v.grpc {
            builder.grpc_cluster(&nc, native_auth.addr()).grpc_cluster(&wc, wasm_auth.addr())
        } else {
            builder.http_cluster(&nc, native_auth.addr()).http_cluster(&wc, wasm_auth.addr())
        };

        // Native: istiod's filters, cluster and timeout patched.
        let mut native = Listener::new().name(&format!("native_{}", v.name));
        for f in [format!("{}-out1.yaml", v.case), format!("{}-out2.yaml", v.case)] {
            for mut d in yaml_docs(&f) {
                let tc = &mut d["typedConfig"];
                if tc.get("grpcService").is_some() {
                    tc["grpcService"]["envoyGrpc"]["clusterName"] = json!(nc);
                    tc["grpcService"]["timeout"] = json!(v.timeout);
                }
                if tc.get("httpService").is_some() {
                    tc["httpService"]["serverUri"]["cluster"] = json!(nc);
                    tc["httpService"]["serverUri"]["timeout"] = json!(v.timeout);
                }
                if tc.get("failureModeAllow").is_some() {
                    tc["failureModeAllow"] = json!(v.fail_open);
                }
                native = native.filter(native_filter(&d));
            }
        }

        // Wasm: the AuthorizationPolicy and the mesh provider of istiod's builder test.
        let idx: Value = cases_index();
        let mut provider = idx["providers"][if v.grpc { "grpc" } else { "http" }].clone();
        let kind = if v.grpc { "envoyExtAuthzGrpc" } else { "envoyExtAuthzHttp" };
        provider[kind]["cluster"] = json!(wc);
        provider[kind]["timeout"] = json!(v.timeout);
        provider[kind]["failOpen"] = json!(v.fail_open);
        let cfg = json!({"policies": yaml_docs("custom-simple-http-in.yaml"), "extensionProviders": [provider]});
        let wasm = Listener::new()
            .name(&format!("wasm_{}", v.name))
            .filter(Filter::wasm("authz", cfg).allow_on_headers_stop_iteration());
        builder = builder.listener(native).listener(wasm);
        sides.push((native_auth, wasm_auth));
    }
    let envoy = builder.start();

    let behaviours = [
        ("normal", Behaviour::Normal),
        ("error", Behaviour::Error),
        ("garbage", Behaviour::Garbage),
        ("down", Behaviour::Down),
        ("slow", Behaviour::Slow(Duration::from_millis(1500))),
    ];
    let mut compared = 0;
    for (i, v) in VARIANTS.iter().enumerate() {
        let (na, wa) = &sides[i];
        for (bname, b) in behaviours {
            // A slow authorizer only matters past a short timeout (10 s is istiod's HTTP one).
            if matches!(b, Behaviour::Slow(_)) && v.timeout != "0.3s" {
                continue;
            }
            na.set_behaviour(b);
            wa.set_behaviour(b);
            for (what, req) in requests() {
                let (nb, wb) = (na.calls(), wa.calls());
                eprintln!("{} / {bname} / {what}", v.name);
                let n = envoy.send_to(2 * i, req.clone());
                let w = envoy.send_to(2 * i + 1, req);
                let (on, ow) = (observed(&n), observed(&w));
                assert!(ow == on, "{} / {bname} / {what}: client view differs:{}", v.name, diff(&ow, &on));
                let (cn, cw) = (na.calls() - nb, wa.calls() - wb);
                if !matches!(b, Behaviour::Down) {
                    assert_eq!(cw, cn, "{} / {bname} / {what}: authorizer calls", v.name);
                }
                if cn > 0 && matches!(b, Behaviour::Normal) {
                    let (sw, sn) = (wa.last_seen(), na.last_seen());
                    assert!(
                        sw == sn,
                        "{} / {what}: the check request differs:{}{}",
                        v.name,
                        diff(&sw, &sn),
                        diff(&sw["headers"], &sn["headers"])
                    );
                }
                compared += 1;
            }
        }
        na.set_behaviour(Behaviour::Normal);
        wa.set_behaviour(Behaviour::Normal);
    }
    assert!(compared >= 250, "compared {compared}");
    // The normal rounds really exercised both decisions through the authorizers.
    let stats = envoy.stats();
    let get = |suffix: &str| stats.iter().filter(|(k, _)| k.ends_with(suffix)).map(|(_, v)| *v).sum::<u64>();
    assert!(get("ext_authz.ok") > 0 && get("ext_authz.denied") > 0, "native ext_authz stats: {stats:?}");
}

/// A client that goes away while its check is in flight leaves nothing behind: the callout is
/// cancelled with the stream, the VM keeps serving, and the authorizer's later answer is
/// dropped without effect.
#[test]
fn a_stream_gone_during_the_check_leaks_nothing() {
    let up = Upstream::start();
    let auth = ExtAuthzGrpc::start(policy());
    let idx: Value = cases_index();
    let mut provider = idx["providers"]["grpc"].clone();
    provider["envoyExtAuthzGrpc"]["cluster"] = json!("authz");
    provider["envoyExtAuthzGrpc"]["timeout"] = json!("5s");
    provider["envoyExtAuthzGrpc"]["failOpen"] = json!(false);
    let cfg = json!({"policies": yaml_docs("custom-simple-http-in.yaml"), "extensionProviders": [provider]});
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .grpc_cluster("authz", auth.addr())
        .listener(Listener::new().filter(Filter::wasm("authz", cfg)))
        .start();
    auth.set_behaviour(Behaviour::Slow(Duration::from_millis(800)));
    let req = Request::get("/httpbin1").header("x-custom-id", "allow");
    for _ in 0..5 {
        let got = meshwasm_tests::client::send_and_disconnect(envoy.listener_addr(), &req, Duration::from_millis(100));
        assert!(got.is_empty(), "no answer before the check completes");
    }
    std::thread::sleep(Duration::from_millis(1200)); // the authorizer's late answers arrive
    auth.set_behaviour(Behaviour::Normal);
    let r = envoy.send(req.clone());
    assert_eq!(r.status, 200, "the VM still serves: {}", r.text());
    assert!(r.from_upstream());
    let r = envoy.send(Request::get("/httpbin1").header("x-custom-id", "no"));
    assert_eq!(r.status, 401);
    assert_eq!(up.requests(), 1, "the abandoned requests never reached the upstream");
    let stats = envoy.stats();
    let active = stats.get("http.listener_0.downstream_rq_active").copied().unwrap_or(0);
    assert_eq!(active, 0, "no stream left active: {stats:?}");
    let log = envoy.log();
    assert!(!log.contains("panicked") && !log.contains("wasm trap"), "{log}");
}
