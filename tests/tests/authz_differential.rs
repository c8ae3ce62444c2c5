//! Differential test against istiod + Envoy: for every case of istiod's own authorization
//! corpus (`../shared/istio/authz-golden/`), native `envoy.filters.http.rbac` configured with
//! the exact filters istiod generates (the `-out` files) on one listener, and `authz.wasm`
//! configured with the AuthorizationPolicy itself (the `-in` file) on a twin listener. The
//! same hostile request corpus goes to both; every request must get the same decision.
//!
//! Requests are written byte by byte on a raw HTTP/1.1 connection, so paths (`//admin`,
//! `/./x`, `%2F`, `;params`, `#frag`), duplicate headers, non-UTF-8 values and a missing
//! `Host` reach Envoy exactly as written.

use std::net::SocketAddr;

use meshwasm_tests::authz_golden::{cases_index, golden_dir, yaml_docs};
use meshwasm_tests::raw_http::exchange;
use meshwasm_tests::{Envoy, Filter, Listener, Upstream};
use serde_json::{json, Value};

/// One raw HTTP/1.1 exchange: the status, and whether the body is RBAC's denial.
fn raw(addr: SocketAddr, request: &[u8]) -> (u16, bool) {
    let r = exchange(addr, request);
    (r.status, r.body.contains("RBAC: access denied"))
}

/// A request: request line target, extra header lines, and whether a Host is sent.
struct Req {
    method: String,
    target: Vec<u8>,
    host: Option<String>,
    headers: Vec<Vec<u8>>,
}

impl Req {
    fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(self.method.as_bytes());
        b.push(b' ');
        b.extend_from_slice(&self.target);
        b.extend_from_slice(b" HTTP/1.1\r\n");
        if let Some(h) = &self.host {
            b.extend_from_slice(format!("host: {h}\r\n").as_bytes());
        }
        for h in &self.headers {
            b.extend_from_slice(h);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"connection: close\r\n\r\n");
        b
    }
    fn describe(&self) -> String {
        format!(
            "{} {} host={:?} headers={:?}",
            self.method,
            String::from_utf8_lossy(&self.target),
            self.host,
            self.headers.iter().map(|h| String::from_utf8_lossy(h).into_owned()).collect::<Vec<_>>()
        )
    }
}

/// Every string value of the policy (paths, methods, hosts, header values), with wildcards
/// filled in, so requests hit and miss each matcher.
fn strings_of(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| strings_of(x, out)),
        Value::Object(o) => o.values().for_each(|x| strings_of(x, out)),
        _ => {}
    }
}

fn corpus(policies: &[Value]) -> Vec<Req> {
    let mut vals = Vec::new();
    for p in policies {
        strings_of(&p["spec"]["rules"], &mut vals);
    }
    let fill = |s: &str| s.replace("{**}", "a/b").replace("{*}", "seg").replace('*', "zz");
    let mut paths: Vec<String> =
        vals.iter().filter(|v| v.starts_with('/') || v.starts_with("*/")).map(|v| fill(v)).collect();
    paths.extend(
        [
            "/",
            "//admin",
            "/admin",
            "/./admin",
            "/x/../admin",
            "/admin/",
            "/ADMIN",
            "/admin%2Fx",
            "/admin%5Cx",
            "/admin;jsessionid=1",
            "/admin?x=1",
            "/admin#frag",
            "/public/../admin",
            "/prefix/x",
            "/x/suffix",
            "/path/template/seg",
            "/a/b/path/template",
            "/path/template/a/b",
            "/httpbin1",
            "/httpbin2",
        ]
        .map(String::from),
    );
    let methods: Vec<String> = vals
        .iter()
        .filter(|v| {
            v.chars().all(|c| c.is_ascii_alphanumeric() || "-_*[]".contains(c)) && v.contains("method") || *v == "GET"
        })
        .map(|v| fill(v))
        .chain(["GET", "POST", "get"].map(String::from))
        .collect();
    let hosts: Vec<String> = vals
        .iter()
        .filter(|v| v.contains('.') && !v.starts_with('/') && !v.contains('/'))
        .map(|v| fill(v))
        .chain(["example.com", "EXACT.COM", "exact.com:80", "exact.com.", "a.suffix.com", "prefix.x"].map(String::from))
        .collect();
    let header_vals: Vec<String> = vals.iter().filter(|v| v.contains("header")).map(|v| fill(v)).collect();

    let mut reqs = Vec::new();
    let base = |method: &str, path: &str| Req {
        method: method.into(),
        target: path.as_bytes().to_vec(),
        host: Some("example.com".into()),
        headers: Vec::new(),
    };
    let mut seen = std::collections::HashSet::new();
    for p in &paths {
        for m in methods.iter().take(6) {
            if seen.insert((m.clone(), p.clone())) {
                reqs.push(base(m, p));
            }
        }
    }
    for h in &hosts {
        let mut r = base("GET", "/");
        r.host = Some(h.clone());
        reqs.push(r);
    }
    for v in &header_vals {
        let mut r = base("GET", "/");
        r.headers.push(format!("x-header: {v}").into_bytes());
        reqs.push(r);
    }
    // Duplicate and comma-joined headers, empty and non-UTF-8 values, no Host, spoofed XFF.
    for extra in [
        vec![b"x-header: header".to_vec(), b"x-header: other".to_vec()],
        vec![b"x-header: header,other".to_vec()],
        vec![b"x-header: ".to_vec()],
        vec![b"x-header: \xff\xfeheader".to_vec()],
        vec![b"x-forwarded-for: 10.0.0.1".to_vec()],
        vec![b"x-forwarded-for: 172.16.10.10, 10.99.10.8".to_vec()],
    ] {
        let mut r = base("GET", "/");
        r.headers = extra;
        reqs.push(r);
    }
    let mut nohost = base("GET", "/");
    nohost.host = None;
    reqs.push(nohost);
    reqs
}

fn native_filter(doc: &Value) -> Filter {
    Filter::native(&format!("name: {}\ntyped_config: {}\n", doc["name"].as_str().unwrap(), doc["typedConfig"]))
}

#[test]
fn every_istiod_golden_case_decides_like_native_rbac() {
    let idx: Value = cases_index();
    let up = Upstream::start();
    // One Envoy for every case (a native and a wasm listener per case): one start-up.
    let mut builder = Envoy::builder().upstream(up.addr());
    let mut cases = Vec::new();
    // Distinct ports for the many listeners (free ports can repeat between calls).
    let mut ports = std::collections::HashSet::new();
    let mut port = || loop {
        let p = meshwasm_tests::envoy::free_port();
        if ports.insert(p) {
            return p;
        }
    };
    for case in idx["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        if case.get("provider").is_some() {
            continue; // CUSTOM: tests/tests/authz_custom.rs
        }
        let policies = yaml_docs(case["input"].as_str().unwrap());
        let mut native = Listener::new().name(&format!("native_{}", cases.len())).port(port());
        for f in case["want"].as_array().unwrap() {
            let f = f.as_str().unwrap();
            let file = if golden_dir().join(format!("extended-{f}")).exists() {
                format!("extended-{f}")
            } else {
                f.to_string()
            };
            for d in yaml_docs(&file) {
                native = native.filter(native_filter(&d));
            }
        }
        let mut cfg = json!({"policies": policies, "directRemoteAddress": "sourceAddress"});
        for k in ["trustDomain", "trustDomainAliases"] {
            if let Some(v) = case.get(k) {
                cfg[k] = v.clone();
            }
        }
        builder = builder.listener(native).listener(
            Listener::new().name(&format!("wasm_{}", cases.len())).port(port()).filter(Filter::wasm("authz", cfg)),
        );
        cases.push((name.to_string(), policies));
    }
    let envoy = builder.start();
    let mut compared = 0;
    for (i, (name, policies)) in cases.iter().enumerate() {
        let reqs = corpus(policies);
        let mut denied = 0;
        for r in &reqs {
            let b = r.bytes();
            let n = raw(envoy.listener_addr_of(2 * i), &b);
            let w = raw(envoy.listener_addr_of(2 * i + 1), &b);
            assert_eq!(w, n, "{name}: {} — wasm {w:?} vs native {n:?}", r.describe());
            denied += usize::from(n.1);
            compared += 1;
        }
        println!("{name}: {} requests, {denied} denied by both", reqs.len());
    }
    assert!(cases.len() >= 17, "ran {} cases", cases.len());
    assert!(compared > 1000, "compared {compared} requests");
}
