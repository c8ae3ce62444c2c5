//! Any bytes as an ext_authz authorizer's answer (a hostile or broken service), over gRPC
//! (`CheckResponse`) and HTTP (status line, headers and body cut from the same bytes):
//! the outcome is Allow, Deny or Error, never a panic, and every header it would put on the
//! request or the response has a valid name and value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshwasm_authz::config::{Provider, ProviderJson, ProviderKind};
use meshwasm_authz::extauthz::{grpc_outcome, http_outcome, Outcome};
use meshwasm_sdk_ext::config::Path;
use meshwasm_sdk_ext::{GrpcReply, HttpReply, HttpResponse};

fn provider() -> Provider {
    let j: ProviderJson = serde_json::from_str(
        r#"{"name": "p", "envoyExtAuthzHttp": {"service": "a.svc", "port": 80, "cluster": "c",
            "headersToUpstreamOnAllow": ["x-*"], "headersToDownstreamOnAllow": ["*"],
            "headersToDownstreamOnDeny": []}}"#,
    )
    .unwrap();
    Provider::parse(&j, &Path::root()).unwrap()
}

fn valid(k: &str, v: &str) -> bool {
    !k.is_empty()
        && k.bytes().all(|b| b > b' ' && b < 0x7f && b != b':' && !b.is_ascii_uppercase())
        && !v.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
}

fn check(o: &Outcome) {
    match o {
        Outcome::Allow { upstream_set, upstream_append, downstream, downstream_set, .. } => {
            for (k, v) in upstream_set.iter().chain(upstream_append).chain(downstream).chain(downstream_set) {
                assert!(valid(k, v), "{k:?}: {v:?}");
            }
        }
        Outcome::Deny { status, headers, .. } => {
            assert!((200..=599).contains(status));
            for (k, v) in headers {
                assert!(valid(k, v), "{k:?}: {v:?}");
            }
        }
        Outcome::Error(e) => assert!(!e.is_empty()),
    }
}

fuzz_target!(|data: &[u8]| {
    let p = provider();
    check(&grpc_outcome(&p, &GrpcReply::Message(data.to_vec())));
    let ProviderKind::Http(http) = &p.kind else { return };
    // "status\nname:value\n...\n\nbody"
    let text = String::from_utf8_lossy(data);
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let mut headers = vec![(":status".to_string(), lines.next().unwrap_or("").to_string())];
    for l in lines {
        let (k, v) = l.split_once(':').unwrap_or((l, ""));
        headers.push((k.to_string(), v.to_string()));
    }
    let reply = HttpReply::Response(HttpResponse {
        headers,
        body: body.as_bytes().to_vec(),
        body_size: body.len(),
        trailers: vec![],
    });
    check(&http_outcome(&p, http, &reply));
});
