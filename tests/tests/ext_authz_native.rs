//! The test authorizers behind Envoy's NATIVE `envoy.filters.http.ext_authz`: proof that they
//! speak what a real Envoy speaks (HTTP service and gRPC `envoy.service.auth.v3`), allow and
//! deny, with headers reaching the upstream and the client.

use meshwasm_tests::ext_authz::{CheckRequestExt, DEFAULT_DENY_BODY};
use meshwasm_tests::{Envoy, ExtAuthzGrpc, ExtAuthzHttp, Filter, Listener, Request, Upstream};

const HTTP_FILTER: &str = r#"
name: envoy.filters.http.ext_authz
typed_config:
  "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
  transport_api_version: V3
  allowed_headers:
    patterns: [{ exact: x-ext-authz, ignore_case: true }]
  http_service:
    server_uri: { uri: "http://ext-authz-http", cluster: ext_authz_http, timeout: 5s }
    path_prefix: /check
    authorization_response:
      allowed_upstream_headers:
        patterns: [{ exact: x-ext-authz-check-result, ignore_case: true }]
      allowed_client_headers:
        patterns: [{ exact: x-ext-authz-check-result, ignore_case: true }]
      allowed_client_headers_on_success:
        patterns: [{ exact: x-downstream, ignore_case: true }]
"#;

const GRPC_FILTER: &str = r#"
name: envoy.filters.http.ext_authz
typed_config:
  "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
  transport_api_version: V3
  grpc_service:
    envoy_grpc: { cluster_name: ext_authz_grpc }
    timeout: 5s
"#;

struct Setup {
    upstream: Upstream,
    http: ExtAuthzHttp,
    grpc: ExtAuthzGrpc,
    envoy: Envoy,
}

fn setup() -> Setup {
    let upstream = Upstream::start();
    let policy = meshwasm_tests::ext_authz::Policy::default()
        .append_header("x-appended", "from-authz")
        .remove_header("x-secret")
        .downstream_header("x-downstream", "d1");
    let http = ExtAuthzHttp::start(policy.clone());
    let grpc = ExtAuthzGrpc::start(policy);
    let envoy = Envoy::builder()
        .upstream(upstream.addr())
        .http_cluster("ext_authz_http", http.addr())
        .grpc_cluster("ext_authz_grpc", grpc.addr())
        .listener(Listener::new().name("http_authz").filter(Filter::native(HTTP_FILTER)))
        .listener(Listener::new().name("grpc_authz").filter(Filter::native(GRPC_FILTER)))
        .start();
    Setup { upstream, http, grpc, envoy }
}

#[test]
fn native_ext_authz_with_the_http_and_grpc_servers() {
    let s = setup();

    // --- HTTP service ---
    let rsp = s.envoy.send_to(0, Request::get("/a/b?x=1").header("x-ext-authz", "allow").header("x-not-sent", "1"));
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    assert!(rsp.from_upstream());
    let echo = rsp.json();
    assert_eq!(echo["headers"]["x-ext-authz-check-result"], "allowed", "{echo}");
    assert_eq!(rsp.header("x-downstream"), Some("d1"));
    let seen = s.http.last_request().expect("the HTTP authorizer was called");
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.path, "/check/a/b?x=1");
    assert_eq!(seen.header("x-ext-authz"), Some("allow"));
    assert_eq!(seen.header("x-not-sent"), None, "only allowed_headers are forwarded");

    let rsp = s.envoy.send_to(0, Request::get("/denied"));
    assert_eq!(rsp.status, 403);
    assert_eq!(rsp.text(), DEFAULT_DENY_BODY);
    assert_eq!(rsp.header("x-ext-authz-check-result"), Some("denied"));
    assert!(!rsp.from_upstream());
    assert_eq!(s.http.calls(), 2);

    // --- gRPC service ---
    let rsp = s.envoy.send_to(
        1,
        Request::get("/g/h").header("x-ext-authz", "allow").header("x-secret", "s").header("x-appended", "from-client"),
    );
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    let echo = rsp.json();
    assert_eq!(echo["headers"]["x-ext-authz-check-result"], "allowed", "{echo}");
    assert!(echo["headers"].get("x-secret").is_none(), "headers_to_remove: {echo}");
    assert_eq!(echo["headers"]["x-appended"], "from-client,from-authz", "appended: {echo}");
    assert_eq!(rsp.header("x-downstream"), Some("d1"), "response_headers_to_add");
    let seen = s.grpc.last_request().expect("the gRPC authorizer was called");
    assert_eq!(seen.path(), "/g/h");
    assert_eq!(seen.method(), "GET");
    assert_eq!(seen.header("x-ext-authz").as_deref(), Some("allow"));
    assert_eq!(seen.header(":authority").as_deref(), Some("meshwasm.test"));

    let rsp = s.envoy.send_to(1, Request::get("/denied").header("x-ext-authz", "nope"));
    assert_eq!(rsp.status, 403);
    assert_eq!(rsp.text(), DEFAULT_DENY_BODY);
    assert_eq!(rsp.header("x-ext-authz-check-result"), Some("denied"));
    assert_eq!(s.grpc.calls(), 2);

    assert_eq!(s.upstream.requests(), 2, "only the allowed requests reached the upstream");
}
