//! `meshwasm from-istio` output in a real Envoy: a VirtualService's faults, converted to the
//! fault filter's plugin JSON (rules scoped to the VirtualService's hosts) and to per-route
//! overrides, behave as Istio would apply them.

use meshwasm_cli::istio::{convert, Resource};
use meshwasm_tests::{Envoy, Filter, Listener, Request, Route, Upstream};
use serde_json::{json, Value};

fn virtual_service() -> Resource {
    Resource {
        file: "test".into(),
        value: json!({
            "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "ratings", "namespace": "bookinfo"},
            "spec": {"hosts": ["ratings"], "http": [
                {"name": "jason", "match": [{"headers": {"end-user": {"exact": "jason"}}}],
                 "fault": {"abort": {"httpStatus": 500, "percentage": {"value": 100}}},
                 "route": [{"destination": {"host": "ratings"}}]},
                {"name": "everyone", "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 100}}},
                 "route": [{"destination": {"host": "ratings"}}]},
            ]}
        }),
    }
}

fn get(envoy: &Envoy, path: &str, authority: &str, user: Option<&str>) -> u16 {
    let mut req = Request::get(path).authority(authority);
    if let Some(u) = user {
        req = req.header("end-user", u);
    }
    envoy.send(req).status
}

#[test]
fn converted_plugin_rules_fault_what_istio_would_and_only_for_the_virtual_services_hosts() {
    let out = convert(&[virtual_service()]);
    assert!(out.errors.is_empty() && out.unsupported.is_empty(), "{:?} {:?}", out.errors, out.unsupported);
    let up = Upstream::start();
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .listener(Listener::new().filter(Filter::wasm("fault", out.plugins["fault"].clone())))
        .start();
    assert_eq!(get(&envoy, "/ratings/1", "ratings:9080", Some("jason")), 500, "route 0 (first match)");
    assert_eq!(get(&envoy, "/ratings/1", "ratings.bookinfo.svc.cluster.local", None), 418, "route 1");
    assert_eq!(get(&envoy, "/ratings/1", "reviews:9080", Some("jason")), 200, "another host is not faulted");
    assert_eq!(up.requests(), 1);
}

#[test]
fn converted_route_overrides_fault_their_routes() {
    let out = convert(&[virtual_service()]);
    let meta = |i: usize| -> Value { out.routes[i]["metadata"]["filter_metadata"]["meshwasm"]["fault"].clone() };
    let up = Upstream::start();
    // Envoy routes as the VirtualService does: jason's requests on one route, the rest on another.
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .listener(
            Listener::new()
                .filter(Filter::wasm("fault", json!({})))
                .route(Route::new("jason", "/jason").meshwasm_override("fault", meta(0)))
                .route(Route::new("everyone", "/").meshwasm_override("fault", meta(1))),
        )
        .start();
    assert_eq!(get(&envoy, "/jason", "ratings", None), 500);
    assert_eq!(get(&envoy, "/other", "ratings", None), 418);
    assert_eq!(up.requests(), 0);
}
