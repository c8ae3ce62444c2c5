//! The harness itself, through a bare Envoy (no wasm): requests reach the upstream over
//! HTTP/1.1 and HTTP/2, both downstream and upstream; the echo carries bodies and
//! trailers; the upstream's controls work; stats and Prometheus are readable; a bad
//! bootstrap is reported by `expect_failure`.

use std::time::Duration;

use meshwasm_tests::{fire, Envoy, Filter, Listener, Request, Route, Upstream};

#[test]
fn bare_envoy_http1_and_http2_reach_upstream() {
    let up = Upstream::start();
    let envoy = Envoy::builder().upstream(up.addr()).start();

    let rsp = envoy.send(Request::get("/hello?x=1").header("x-test", "a"));
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    assert!(rsp.from_upstream());
    let echo = rsp.json();
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["path"], "/hello?x=1");
    assert_eq!(echo["headers"]["x-test"], "a");
    assert_eq!(up.requests(), 1);

    let rsp = envoy.send(Request::post("/h2", "hello body").h2());
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    let echo = rsp.json();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["body_len"], 10);
    assert_eq!(up.requests(), 2);

    assert_eq!(envoy.stat("cluster.upstream.upstream_rq_completed"), Some(2));
    assert!(
        envoy.stat_or_zero("listener_0.downstream_rq_http2_total") >= 1
            || envoy.stat_or_zero("http.listener_0.downstream_rq_http2_total") >= 1,
        "h2 downstream request not counted"
    );
    assert!(envoy.prometheus().contains("envoy_cluster_upstream_rq_completed"));
}

#[test]
fn upstream_h2_keeps_body_and_trailers() {
    let up = Upstream::start();
    let envoy = Envoy::builder().upstream(up.addr()).upstream_h2().start();
    let body = vec![7u8; 100_000];
    let rsp = envoy.send(Request::post("/t", body.clone()).h2().trailer("x-trailer", "t1"));
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    let echo = rsp.json();
    assert_eq!(echo["protocol"], "HTTP/2.0");
    assert_eq!(echo["body_len"], 100_000);
    assert_eq!(echo["body_fnv1a64"], format!("{:016x}", meshwasm_tests::upstream::fnv1a64(&body)));
    assert_eq!(echo["trailers"]["x-trailer"], "t1");
}

#[test]
fn upstream_controls_and_grpc() {
    let up = Upstream::start();
    let envoy = Envoy::builder().upstream(up.addr()).upstream_h2().start();

    let rsp = envoy.send(Request::get("/").header("x-upstream-status", "418").header("x-upstream-body", "teapot"));
    assert_eq!(rsp.status, 418);
    assert_eq!(rsp.text(), "teapot");

    let rsp = envoy.send(Request::get("/").header("x-upstream-delay-ms", "200"));
    assert_eq!(rsp.status, 200);
    assert!(rsp.elapsed >= Duration::from_millis(200), "{:?}", rsp.elapsed);

    let rsp = envoy.send(Request::grpc("/pkg.Svc/Method", b"hi"));
    assert_eq!(rsp.status, 200);
    assert_eq!(rsp.grpc_status(), Some(0));
    assert_eq!(rsp.header("content-type"), Some("application/grpc"));
    assert_eq!(up.requests(), 3);
}

#[test]
fn native_filter_route_disable_and_concurrency() {
    // A native fault filter aborting everything, disabled on route /open.
    let up = Upstream::start();
    let fault = Filter::native(
        r#"
        name: envoy.filters.http.fault
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
          abort: { http_status: 503, percentage: { numerator: 100 } }
        "#,
    );
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .listener(
            Listener::new()
                .filter(fault)
                .route(Route::new("open", "/open").disable_filter("envoy.filters.http.fault"))
                .route(Route::new("default", "/")),
        )
        .start();
    let rsp = envoy.get("/closed");
    assert_eq!(rsp.status, 503);
    assert_eq!(rsp.text(), "fault filter abort");
    let rsp = envoy.get("/open");
    assert_eq!(rsp.status, 200);

    let results = fire(envoy.listener_addr(), 40, 8, |i| Request::get(if i % 2 == 0 { "/open" } else { "/x" }));
    let ok = results.iter().filter(|r| r.as_ref().map(|r| r.status) == Ok(200)).count();
    let aborted = results.iter().filter(|r| r.as_ref().map(|r| r.status) == Ok(503)).count();
    assert_eq!((ok, aborted), (20, 20));
    assert_eq!(up.requests(), 21);
    assert_eq!(envoy.stat("http.listener_0.fault.aborts_injected"), Some(21));
}

#[test]
fn client_disconnect_helper() {
    let up = Upstream::start();
    let envoy = Envoy::builder().upstream(up.addr()).start();
    let got = meshwasm_tests::client::send_and_disconnect(
        envoy.listener_addr(),
        &Request::get("/").header("x-upstream-delay-ms", "2000"),
        Duration::from_millis(200),
    );
    assert!(got.is_empty(), "no response expected yet");
    meshwasm_tests::eventually("downstream_cx_destroy_remote", Duration::from_secs(5), || {
        (envoy.stat_or_zero("http.listener_0.downstream_cx_destroy_remote_active_rq") >= 1).then_some(())
    });
    assert_eq!(envoy.get("/").status, 200);
}

#[test]
fn bad_bootstrap_is_reported() {
    let failed = Envoy::builder()
        .listener(Listener::new().filter(Filter::native(
            "name: envoy.filters.http.fault\ntyped_config:\n  \"@type\": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault\n  abort: { http_status: 99, percentage: { numerator: 100 } }\n",
        )))
        .expect_failure();
    assert!(!failed.status.success());
    assert!(failed.log.contains("http_status"), "{}", failed.log);
}

#[test]
fn noop_wasm_module_loads_and_passes_traffic() {
    let up = Upstream::start();
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .listener(Listener::new().filter(Filter::wasm("noop", serde_json::json!({}))))
        .start();
    let results =
        fire(
            envoy.listener_addr(),
            20,
            4,
            |i| {
                if i % 2 == 0 {
                    Request::get("/a")
                } else {
                    Request::post("/b", "x").h2()
                }
            },
        );
    for r in &results {
        assert_eq!(r.as_ref().map(|r| r.status), Ok(200), "{r:?}");
    }
    assert_eq!(up.requests(), 20);
    // One VM per worker (plus the main thread's): the module really runs in V8.
    assert!(envoy.stat_or_zero("wasm.envoy.wasm.runtime.v8.active") >= 2, "wasm VMs not created");
}
