//! The demo's tours of the retry, authz and telemetry filters (listeners `retry`, `authz`,
//! `telemetry` of `envoy-configs/demo.yaml`): requests, what must come back, and the counters
//! each filter keeps, checked into the demo's report.

use std::net::SocketAddr;

use super::Outcome;
use crate::envoy::Envoy;
use crate::{bail, http, root, step, Context, Result};

/// One request and what must come back.
struct Probe {
    name: String,
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, String)>,
    status: u16,
    /// The body must contain this.
    body: Option<&'static str>,
    /// This response header must have this value.
    header: Option<(&'static str, &'static str)>,
    /// Shown instead of the bearer token in the printed curl line.
    shown: Option<String>,
}

impl Probe {
    fn get(name: impl Into<String>, path: &'static str, status: u16) -> Probe {
        Probe {
            name: name.into(),
            method: "GET",
            path,
            headers: Vec::new(),
            status,
            body: None,
            header: None,
            shown: None,
        }
    }

    fn with(mut self, name: &'static str, value: impl Into<String>) -> Probe {
        self.headers.push((name, value.into()));
        self
    }

    fn method(mut self, m: &'static str) -> Probe {
        self.method = m;
        self
    }

    fn body(mut self, b: &'static str) -> Probe {
        self.body = Some(b);
        self
    }

    fn header(mut self, name: &'static str, value: &'static str) -> Probe {
        self.header = Some((name, value));
        self
    }

    /// `authorization: Bearer <the demo token called name>`, printed as `Bearer $NAME`.
    fn bearer(mut self, tokens: &Tokens, name: &str) -> Result<Probe> {
        self.headers.push(("authorization", format!("Bearer {}", tokens.get(name)?)));
        self.shown = Some(format!("Bearer ${}", name.to_ascii_uppercase()));
        Ok(self)
    }

    /// Send it, print it as a curl line with the answer, and judge it.
    fn run(&self, addr: SocketAddr, show_headers: &[&str]) -> Result<Outcome> {
        let headers: Vec<(&str, &str)> = self.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let rsp = http::request(addr, self.method, self.path, &headers)?;
        let body = rsp.text();
        let mut problems = Vec::new();
        if rsp.status != self.status {
            problems.push(format!("status {}", rsp.status));
        }
        if let Some(want) = self.body {
            if !body.contains(want) {
                problems.push(format!("body {:?}", body.trim()));
            }
        }
        if let Some((h, v)) = self.header {
            if rsp.header(h) != Some(v) {
                problems.push(format!("{h}: {:?}", rsp.header(h)));
            }
        }
        let curl_headers: String = self
            .headers
            .iter()
            .map(|(k, v)| match &self.shown {
                Some(s) if *k == "authorization" => format!(" -H '{k}: {s}'"),
                _ => format!(" -H '{k}: {v}'"),
            })
            .collect();
        let method = if self.method == "GET" { String::new() } else { format!(" -X {}", self.method) };
        let mut seen: Vec<String> = show_headers
            .iter()
            .chain(self.header.iter().map(|(h, _)| h))
            .filter_map(|h| rsp.header(h).map(|v| format!("{h}: {v}")))
            .collect();
        seen.dedup();
        if rsp.status != 200 || self.body.is_some() {
            let b = body.trim();
            if !b.is_empty() && !b.starts_with('{') {
                seen.push(format!("body: {b}"));
            }
        }
        println!(
            "    curl -si{method}{curl_headers} 'http://{addr}{}'  →  {}{}",
            self.path,
            rsp.status,
            if seen.is_empty() { String::new() } else { format!("  ({})", seen.join(", ")) }
        );
        for p in &problems {
            println!("        ✗ {p}");
        }
        let mut expected = self.status.to_string();
        if let Some(b) = self.body {
            expected.push_str(&format!(" {b:?}"));
        }
        Ok(Outcome {
            name: self.name.clone(),
            expected,
            got: if problems.is_empty() {
                let mut g = rsp.status.to_string();
                if let Some(b) = self.body {
                    g.push_str(&format!(" {b:?}"));
                }
                g
            } else {
                problems.join("; ")
            },
            latency: Some(rsp.elapsed),
            ok: problems.is_empty(),
        })
    }
}

/// The filter's own counters (`wasmcustom.*`) that are not zero.
fn show_counters(stats: &str) {
    for l in stats.lines().filter(|l| l.starts_with("wasmcustom.") && !l.ends_with(": 0")) {
        println!("      {l}");
    }
}

/// A counter row of the report: `names` read from admin `/stats` (missing = `-`), joined
/// with `/`, must read `expected`.
pub(super) fn counters(stats: &str, what: &str, names: &[String], expected: &str) -> Outcome {
    let value = |full: &str| -> String {
        stats
            .lines()
            .find_map(|l| l.split_once(": ").filter(|(k, _)| *k == full).map(|(_, v)| v.trim().to_string()))
            .unwrap_or_else(|| "-".into())
    };
    let got = names.iter().map(|n| value(n)).collect::<Vec<_>>().join("/");
    Outcome { name: what.to_string(), expected: expected.to_string(), ok: got == expected, got, latency: None }
}

// === retry ===

pub fn retry_tour(addr: SocketAddr, envoy: &Envoy) -> Result<Vec<Outcome>> {
    step("traffic: retry filter (listener retry; rules of envoy-configs/demo-retry.json)");
    let flaky = |key: &str, fail: &str, mode: &str| {
        vec![("x-flaky-key", key.to_string()), ("x-flaky-fail", fail.to_string()), ("x-flaky-mode", mode.to_string())]
    };
    let mut probes = vec![
        Probe::get("retry: two 503s, then success (3 attempts)", "/ratings/1", 200).header("x-flaky-attempt", "3"),
        Probe::get("retry: five 502s exhaust 3 retries", "/ratings/2", 502).header("x-flaky-attempt", "4"),
        Probe::get("retry: POST is not retried on 503", "/ratings/3", 503)
            .method("POST")
            .header("x-flaky-attempt", "1"),
        Probe::get("retry: rule timeout 300ms on /slow (upstream 1s)", "/slow", 504)
            .with("x-upstream-delay-ms", "1000")
            .body("upstream request timeout"),
    ];
    // Unique keys per run: the upstream remembers attempts per key for its lifetime.
    let run = std::process::id();
    let modes = [("2", "status=503"), ("5", "status=502"), ("1", "status=503")];
    for (i, (p, (fail, mode))) in probes.iter_mut().zip(modes).enumerate() {
        p.headers.extend(flaky(&format!("demo-{run}-{i}"), fail, mode));
    }
    let mut out = Vec::new();
    for p in &probes {
        out.push(p.run(addr, &["x-flaky-attempt"])?);
    }
    step("retry filter metrics: admin /stats?filter=meshwasm.retry (counters above zero)");
    let stats =
        settled(|| envoy.admin_get("/stats?filter=meshwasm.retry"), |s: &String| s.contains("rule.slow.timeouts: 1"))?;
    show_counters(&stats);
    let r = |rule: &str, s: &str| format!("wasmcustom.meshwasm.retry.rule.{rule}.{s}");
    out.push(counters(
        &stats,
        "stats ratings: requests/retries_requested/retries_observed/exhausted/idempotency_skipped",
        &[
            r("ratings", "requests"),
            r("ratings", "retries_requested"),
            r("ratings", "retries_observed"),
            r("ratings", "retries_exhausted"),
            r("ratings", "idempotency_skipped"),
        ],
        // The POST's retries are requested too, on the conditions that cannot re-execute it
        // (connect-failure, refused-stream): 503 and gateway-error are skipped for it.
        "3/3/5/1/1",
    ));
    out.push(counters(&stats, "stats slow: requests/timeouts", &[r("slow", "requests"), r("slow", "timeouts")], "1/1"));
    Ok(out)
}

/// `fetch()` once `ready` holds of it (log-phase counters and metrics land just after the
/// response), or after 5 s as it is.
fn settled<T>(mut fetch: impl FnMut() -> Result<T>, ready: impl Fn(&T) -> bool) -> Result<T> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let value = fetch()?;
        if ready(&value) || std::time::Instant::now() > deadline {
            return Ok(value);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

// === authz ===

/// `envoy-configs/demo-authz-tokens.txt` (`name token` lines), read once.
struct Tokens(Vec<(String, String)>);

impl Tokens {
    fn load() -> Result<Tokens> {
        let path = root().join("envoy-configs").join("demo-authz-tokens.txt");
        let text = std::fs::read_to_string(&path).context(format!("reading {}", path.display()))?;
        let pairs = text.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split_once(' '));
        Ok(Tokens(pairs.map(|(k, t)| (k.to_string(), t.trim().to_string())).collect()))
    }

    fn get(&self, name: &str) -> Result<&str> {
        match self.0.iter().find(|(k, _)| k == name) {
            Some((_, t)) => Ok(t),
            None => bail!("no token {name} in envoy-configs/demo-authz-tokens.txt"),
        }
    }
}

pub fn authz_tour(addr: SocketAddr, envoy: &Envoy) -> Result<Vec<Outcome>> {
    step("traffic: authz filter (listener authz; Istio resources of envoy-configs/demo-authz.json)");
    let tokens = Tokens::load()?;
    let probes = vec![
        Probe::get("authz: ALLOW api-readers (GET /api/*)", "/api/orders", 200),
        Probe::get("authz: no ALLOW policy matches (POST /api/*)", "/api/orders", 403)
            .method("POST")
            .body("RBAC: access denied"),
        Probe::get("authz: DENY deny-admin wins", "/admin/users", 403).body("RBAC: access denied"),
        Probe::get("authz: /private/* without a token", "/private/notes", 403).body("RBAC: access denied"),
        Probe::get("authz: /private/* with alice's token (requestPrincipals)", "/private/notes", 200)
            .bearer(&tokens, "alice")?,
        Probe::get("authz: /private/* with bob's token", "/private/notes", 403)
            .bearer(&tokens, "bob")?
            .body("RBAC: access denied"),
        Probe::get("authz: /reports/* claim groups=admins (alice)", "/reports/q4", 200).bearer(&tokens, "alice")?,
        Probe::get("authz: expired token", "/api/orders", 401).bearer(&tokens, "expired")?.body("Jwt is expired"),
        Probe::get("authz: wrong audience", "/api/orders", 403)
            .bearer(&tokens, "wrong_aud")?
            .body("Audiences in Jwt are not allowed"),
        Probe::get("authz: CUSTOM ext_authz allows (x-ext-authz: allow)", "/protected/doc", 200)
            .with("x-ext-authz", "allow"),
        Probe::get("authz: CUSTOM ext_authz denies", "/protected/doc", 403)
            .with("x-ext-authz", "deny")
            .body("denied by ext_authz"),
    ];
    println!("    (ALICE, BOB, EXPIRED, WRONG_AUD: RS256 tokens from envoy-configs/demo-authz-tokens.txt)");
    let mut out = Vec::new();
    for p in &probes {
        out.push(p.run(addr, &["www-authenticate", "x-ext-authz-check-result"])?);
    }
    step("authz filter metrics: admin /stats?filter=meshwasm.authz (counters above zero)");
    let stats = envoy.admin_get("/stats?filter=meshwasm.authz")?;
    show_counters(&stats);
    let s = |n: &str| format!("wasmcustom.meshwasm.authz.{n}");
    // Every request is decided once: 4 allowed; 7 denied (4 by RBAC, 1 by the authorizer,
    // 2 tokens rejected).
    out.push(counters(&stats, "stats authz: allowed/denied", &[s("allowed"), s("denied")], "4/7"));
    // The JWT step runs after CUSTOM (istiod's order): 10 requests reach it, 2 are rejected;
    // requests without a token pass it with no identity.
    out.push(counters(&stats, "stats jwt: allowed/denied", &[s("jwt.allowed"), s("jwt.denied")], "8/2"));
    out.push(counters(
        &stats,
        "stats provider demo-ext-authz: ok/denied",
        &[s("provider.demo-ext-authz.ok"), s("provider.demo-ext-authz.denied")],
        "1/1",
    ));
    Ok(out)
}

// === telemetry ===

pub fn telemetry_tour(addr: SocketAddr, envoy: &Envoy) -> Result<Vec<Outcome>> {
    step("traffic: telemetry filter (listener telemetry; reporter SERVER as workload reviews-v2 of node.metadata)");
    let mut out = Vec::new();
    for i in 0..3 {
        let p = Probe::get(format!("telemetry: GET /reviews/1 #{}", i + 1), "/reviews/1", 200);
        let o = p.run(addr, &[])?;
        if !o.ok {
            out.push(o);
        }
    }
    let o = Probe::get("telemetry: upstream answers 503", "/reviews/1", 503)
        .with("x-upstream-status", "503")
        .run(addr, &[])?;
    out.push(o);
    step("Istio's standard metrics in Prometheus format (admin /stats/prometheus, istio_requests_total)");
    let series = settled(
        || {
            let prom = envoy.admin_get("/stats/prometheus?filter=istio_requests_total")?;
            Ok(prom.lines().filter(|l| l.starts_with("istio_requests_total{")).map(str::to_string).collect())
        },
        |series: &Vec<String>| {
            series.iter().filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum::<f64>() >= 4.0
        },
    )?;
    for l in &series {
        println!("      {l}");
    }
    let count = |code: &str| -> String {
        series
            .iter()
            .filter(|l| {
                l.contains(&format!("response_code=\"{code}\""))
                    && l.contains("reporter=\"destination\"")
                    && l.contains("destination_workload=\"reviews-v2\"")
                    && l.contains("destination_canonical_service=\"reviews\"")
            })
            .filter_map(|l| l.rsplit(' ').next())
            .collect::<Vec<_>>()
            .join("+")
    };
    let got = format!("{}/{}", count("200"), count("503"));
    out.push(Outcome {
        name: "istio_requests_total{reporter=destination,…} 200/503".into(),
        expected: "3/1".into(),
        ok: got == "3/1",
        got,
        latency: None,
    });
    Ok(out)
}
