//! Downstream TLS and mTLS through a real Envoy with the generated test certificates:
//! the client's SPIFFE URI SANs reach the upstream in `x-forwarded-client-cert`
//! (`SANITIZE_SET`, `set_current_client_cert_details: {uri: true}`), a plaintext client
//! has none, a listener requiring a certificate refuses clients without one (or with one
//! from another CA), and a listener that only requests one serves both.

use meshwasm_tests::certs::{
    DNS_CLIENT, OTHER_CA_CLIENT, SPIFFE_BAZ, SPIFFE_CLIENT, SPIFFE_FOO_BAR, SPIFFE_FOO_OTHER, SPIFFE_SINGLE_CLIENT,
};
use meshwasm_tests::{DownstreamTls, Envoy, Listener, Request, TestCerts, TlsClient, Upstream};

const PLAIN: usize = 0;
const REQUIRE: usize = 1;
const REQUEST: usize = 2;

fn xfcc(rsp: &meshwasm_tests::Response) -> Option<String> {
    rsp.json()["headers"].get("x-forwarded-client-cert").and_then(|v| v.as_str()).map(str::to_string)
}

#[test]
fn mtls_identities_reach_the_upstream() {
    let certs = TestCerts::generate();
    let upstream = Upstream::start();
    let listener = |name: &str| {
        Listener::new().name(name).forward_client_cert_details("SANITIZE_SET").set_current_client_cert_details_uri()
    };
    let envoy = Envoy::builder()
        .upstream(upstream.addr())
        .listener(listener("plain"))
        .listener(listener("mtls").tls(DownstreamTls::server(&certs).require_client_cert(certs.ca())))
        .listener(listener("tls_optional").tls(DownstreamTls::server(&certs).request_client_cert(certs.ca())))
        .start();
    let trust = TlsClient::new(certs.ca());

    // Plaintext: no identity, and a spoofed XFCC is sanitized away.
    let rsp = envoy.send_to(PLAIN, Request::get("/").header("x-forwarded-client-cert", "URI=spiffe://evil/ns/x/sa/y"));
    assert_eq!(rsp.status, 200);
    assert_eq!(xfcc(&rsp), None, "plaintext request: {}", rsp.text());

    // mTLS with two URI SANs, over HTTP/1.1 and HTTP/2 (ALPN; the client speaks h2 frames
    // from the first byte, so the h2 request only succeeds when ALPN negotiated h2).
    for req in [Request::get("/"), Request::get("/").h2()] {
        let rsp = envoy.send_tls(
            REQUIRE,
            req.header("x-forwarded-client-cert", "URI=spiffe://evil/ns/x/sa/y"),
            &trust.clone().client_cert(certs.client(SPIFFE_CLIENT)),
        );
        assert_eq!(rsp.status, 200);
        assert_eq!(rsp.json()["headers"]["x-forwarded-proto"], "https");
        let x = xfcc(&rsp).expect("XFCC set on an mTLS request");
        assert!(x.contains(&format!("URI={SPIFFE_FOO_BAR}")), "{x}");
        assert!(x.contains(&format!("URI={SPIFFE_FOO_OTHER}")), "both URI SANs: {x}");
        assert!(!x.contains("evil"), "client XFCC sanitized: {x}");
        assert!(x.contains("Hash="), "{x}");
    }
    let rsp =
        envoy.send_tls(REQUIRE, Request::get("/"), &trust.clone().client_cert(certs.client(SPIFFE_SINGLE_CLIENT)));
    let x = xfcc(&rsp).expect("XFCC");
    assert!(x.contains(&format!("URI={SPIFFE_BAZ}")) && !x.contains(SPIFFE_FOO_BAR), "{x}");

    // A DNS-only client certificate: accepted; Envoy 1.40 writes an empty `URI=`.
    let rsp = envoy.send_tls(REQUIRE, Request::get("/"), &trust.clone().client_cert(certs.client(DNS_CLIENT)));
    let x = xfcc(&rsp).expect("XFCC");
    assert!(x.starts_with("Hash=") && x.ends_with(";URI="), "{x}");

    // Refused: no client certificate, or one from another CA.
    let err = envoy.try_send_tls(REQUIRE, Request::get("/"), &trust).expect_err("no client cert must be refused");
    assert!(err.contains("TLS") || err.contains("h1"), "{err}");
    envoy
        .try_send_tls(REQUIRE, Request::get("/"), &trust.clone().client_cert(certs.client(OTHER_CA_CLIENT)))
        .expect_err("a certificate from another CA must be refused");
    // The client refuses a server it does not trust.
    envoy
        .try_send_tls(
            REQUIRE,
            Request::get("/"),
            &TlsClient::new(certs.other_ca()).client_cert(certs.client(SPIFFE_CLIENT)),
        )
        .expect_err("untrusted server");

    // Requested but not required: served without a certificate (no XFCC), identity with one.
    let rsp = envoy.send_tls(REQUEST, Request::get("/"), &trust);
    assert_eq!((rsp.status, xfcc(&rsp)), (200, None));
    let rsp = envoy.send_tls(REQUEST, Request::get("/").h2(), &trust.clone().client_cert(certs.client(SPIFFE_CLIENT)));
    assert!(xfcc(&rsp).expect("XFCC").contains(SPIFFE_FOO_BAR));

    assert_eq!(upstream.requests(), 7);
}

#[test]
fn connection_manager_options_render_and_default_to_the_plain_bootstrap() {
    let plain = Envoy::builder().listener(Listener::new()).bootstrap(1, &[2]);
    let l = Listener::new()
        .use_remote_address(true)
        .xff_num_trusted_hops(1)
        .normalize_path(true)
        .merge_slashes(true)
        .path_with_escaped_slashes_action("UNESCAPE_AND_FORWARD");
    let with = Envoy::builder().listener(l.clone()).bootstrap(1, &[2]);
    for line in [
        "use_remote_address: true",
        "xff_num_trusted_hops: 1",
        "normalize_path: true",
        "merge_slashes: true",
        "path_with_escaped_slashes_action: UNESCAPE_AND_FORWARD",
    ] {
        assert!(with.contains(&format!("          {line}\n")), "{line} missing:\n{with}");
        assert!(!plain.contains(line));
    }
    // Envoy accepts it, and the normalisation is in effect.
    let up = Upstream::start();
    let envoy = Envoy::builder().upstream(up.addr()).listener(l).start();
    let echo = envoy.get("//a/./b/../c%2Fd").json();
    assert_eq!(echo["path"], "/a/c/d", "{echo}");
}
