//! The test ext_authz servers themselves (no Envoy): decisions, header mutations, recording,
//! and every switchable behaviour, through a tonic client (gRPC) and the harness's HTTP client.

use std::time::Duration;

use envoy_types::ext_authz::v3::pb::{CheckRequest, HttpResponse};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request as AttrRequest};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use meshwasm_tests::client::try_send;
use meshwasm_tests::ext_authz::{Behaviour, CheckRequestExt, ExtAuthzGrpc, ExtAuthzHttp, Policy, DEFAULT_DENY_BODY};
use meshwasm_tests::Request;

fn check_request(path: &str, headers: &[(&str, &str)]) -> CheckRequest {
    let http = HttpRequest {
        method: "GET".into(),
        path: path.into(),
        headers: headers.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect(),
        ..Default::default()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest { http: Some(http), ..Default::default() }),
            ..Default::default()
        }),
    }
}

fn header_pairs(opts: &[envoy_types::ext_authz::v3::pb::HeaderValueOption]) -> Vec<(String, String, i32)> {
    opts.iter().filter_map(|o| o.header.as_ref().map(|h| (h.key.clone(), h.value.clone(), o.append_action))).collect()
}

#[test]
fn grpc_allows_with_header_mutations_and_denies_with_permission_denied() {
    let policy = Policy::default()
        .append_header("x-appended", "a1")
        .remove_header("x-secret")
        .downstream_header("x-downstream", "d1");
    let authz = ExtAuthzGrpc::start(policy);

    let rsp = authz.call(check_request("/ok", &[("x-ext-authz", "allow")])).expect("check");
    assert_eq!(rsp.status.as_ref().map(|s| s.code), Some(0));
    let Some(HttpResponse::OkResponse(ok)) = rsp.http_response else { panic!("not an ok_response: {rsp:?}") };
    // OVERWRITE_IF_EXISTS_OR_ADD = 2, APPEND_IF_EXISTS_OR_ADD = 0.
    assert_eq!(
        header_pairs(&ok.headers),
        vec![("x-ext-authz-check-result".into(), "allowed".into(), 2), ("x-appended".into(), "a1".into(), 0)]
    );
    assert_eq!(ok.headers_to_remove, vec!["x-secret".to_string()]);
    assert_eq!(header_pairs(&ok.response_headers_to_add), vec![("x-downstream".into(), "d1".into(), 2)]);

    let rsp = authz.call(check_request("/no", &[("x-ext-authz", "deny")])).expect("check");
    assert_eq!(rsp.status.as_ref().map(|s| s.code), Some(tonic::Code::PermissionDenied as i32));
    let Some(HttpResponse::DeniedResponse(denied)) = rsp.http_response else { panic!("not denied: {rsp:?}") };
    assert_eq!(denied.status.map(|s| s.code), Some(403));
    assert_eq!(denied.body, DEFAULT_DENY_BODY);
    assert_eq!(header_pairs(&denied.headers), vec![("x-ext-authz-check-result".into(), "denied".into(), 2)]);

    assert_eq!(authz.calls(), 2);
    let seen = authz.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].path(), "/ok");
    assert_eq!(seen[1].header("x-ext-authz").as_deref(), Some("deny"));
}

#[test]
fn grpc_behaviours() {
    let authz = ExtAuthzGrpc::start(Policy::default().deny(401, "no"));
    let allow = || check_request("/", &[("x-ext-authz", "allow")]);

    authz.set_behaviour(Behaviour::Error);
    assert_eq!(authz.call(allow()).unwrap_err().code(), tonic::Code::Unavailable);
    authz.set_behaviour(Behaviour::GrpcError(tonic::Code::Internal));
    assert_eq!(authz.call(allow()).unwrap_err().code(), tonic::Code::Internal);

    authz.set_behaviour(Behaviour::Garbage);
    let err = authz.call(allow()).unwrap_err();
    assert_eq!(err.code(), tonic::Code::Internal, "a message that does not decode: {err:?}");

    authz.set_behaviour(Behaviour::HugeBody(100_000));
    let rsp = authz.call(check_request("/", &[])).expect("check");
    let Some(HttpResponse::DeniedResponse(denied)) = rsp.http_response else { panic!("not denied") };
    assert_eq!(denied.body.len(), 100_000);
    assert_eq!(denied.status.map(|s| s.code), Some(401));

    authz.set_behaviour(Behaviour::Slow(Duration::from_millis(200)));
    let start = std::time::Instant::now();
    authz.call(allow()).expect("slow check");
    assert!(start.elapsed() >= Duration::from_millis(195), "answered after {:?}", start.elapsed());

    let port = authz.port();
    authz.set_behaviour(Behaviour::Down);
    assert!(std::net::TcpStream::connect(authz.addr()).is_err(), "port {port} still accepts while Down");
    authz.set_behaviour(Behaviour::Normal);
    assert_eq!(authz.port(), port);
    authz.call(allow()).expect("serving again on the same port");

    // Every call was counted, the garbage one included.
    assert_eq!(authz.calls(), 6);
    assert_eq!(authz.requests().len(), 6);
}

#[test]
fn http_allows_with_headers_and_records_the_check_request() {
    let policy = Policy::default().append_header("x-appended", "a1").downstream_header("x-downstream", "d1");
    let authz = ExtAuthzHttp::start(policy);
    let rsp = try_send(
        authz.addr(),
        &Request::post("/check/ok?q=1", "hello")
            .header("x-ext-authz", "allow")
            .header("x-dup", "1")
            .header("x-other", "o")
            .header("x-dup", "2"),
    )
    .expect("check");
    assert_eq!(rsp.status, 200);
    assert_eq!(rsp.header("x-ext-authz-check-result"), Some("allowed"));
    assert_eq!(rsp.header("x-appended"), Some("a1"));
    assert_eq!(rsp.header("x-downstream"), Some("d1"));
    assert!(rsp.body.is_empty());

    let seen = authz.last_request().expect("recorded");
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path, "/check/ok?q=1");
    assert_eq!(seen.body.as_ref(), b"hello");
    assert_eq!(seen.header_values("x-dup"), vec!["1", "2"]);
    assert_eq!(seen.header("X-Other"), Some("o"));

    let rsp = try_send(authz.addr(), &Request::get("/check/no")).expect("check");
    assert_eq!(rsp.status, 403);
    assert_eq!(rsp.text(), DEFAULT_DENY_BODY);
    assert_eq!(rsp.header("x-ext-authz-check-result"), Some("denied"));
    assert_eq!(authz.calls(), 2);

    authz.set_policy(Policy::default().allow_when("authorization", "Bearer ok").deny(418, "teapot"));
    let rsp = try_send(authz.addr(), &Request::get("/").header("authorization", "Bearer ok")).expect("check");
    assert_eq!(rsp.status, 200);
    let rsp = try_send(authz.addr(), &Request::get("/").header("x-ext-authz", "allow")).expect("check");
    assert_eq!((rsp.status, rsp.text().as_str()), (418, "teapot"));
}

#[test]
fn http_behaviours() {
    let authz = ExtAuthzHttp::start(Policy::default());
    let allow = || Request::get("/").header("x-ext-authz", "allow");

    authz.set_behaviour(Behaviour::Error);
    assert_eq!(try_send(authz.addr(), &allow()).expect("answer").status, 500);

    authz.set_behaviour(Behaviour::Garbage);
    let err = try_send(authz.addr(), &allow().header("x-seen", "yes")).unwrap_err();
    assert!(err.contains("h1 request"), "{err}");
    assert_eq!(authz.last_request().and_then(|r| r.header("x-seen").map(str::to_string)).as_deref(), Some("yes"));

    authz.set_behaviour(Behaviour::HugeBody(300_000));
    let rsp = try_send(authz.addr(), &allow()).expect("answer");
    assert_eq!((rsp.status, rsp.body.len()), (200, 300_000));
    let rsp = try_send(authz.addr(), &Request::get("/")).expect("answer");
    assert_eq!((rsp.status, rsp.body.len()), (403, 300_000));

    authz.set_behaviour(Behaviour::Slow(Duration::from_millis(200)));
    let rsp = try_send(authz.addr(), &allow()).expect("answer");
    assert_eq!(rsp.status, 200);
    assert!(rsp.elapsed >= Duration::from_millis(195), "answered after {:?}", rsp.elapsed);

    authz.set_behaviour(Behaviour::Down);
    assert!(try_send(authz.addr(), &allow()).is_err());
    authz.set_behaviour(Behaviour::Normal);
    assert_eq!(try_send(authz.addr(), &allow()).expect("answer").status, 200);
    assert_eq!(authz.calls(), 6);
}
