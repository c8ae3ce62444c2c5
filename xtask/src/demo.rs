//! `cargo xtask demo [--serve]`: a stock Envoy with the meshwasm fault filter in front of a
//! local upstream, a scripted tour of what the filter does, its metrics, and a report.
//!
//! The plugin configuration is `envoy-configs/demo-fault.json`; the bootstrap is
//! `envoy-configs/demo.yaml`. Rendered files and logs land in `target/xtask/`.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::build;
use crate::envoy::{self, Envoy, Launch, Proc};
use crate::{bail, cargo, http, json, rel, root, run_cmd, step, Context, Result};

pub fn run(args: &[String]) -> Result<()> {
    let serve = match args {
        [] => false,
        [a] if a == "--serve" => true,
        _ => bail!("usage: cargo xtask demo [--serve]"),
    };

    build::run()?;
    let envoy_bin = envoy::ensure()?;
    let upstream_bin = build_upstream()?;

    step("starting meshwasm-upstream and Envoy (--concurrency 2) with dist/fault.wasm");
    let upstream = start_upstream(&upstream_bin)?;
    let plugin = envoy::template("demo-fault.json")?;
    json::check(&plugin).context("envoy-configs/demo-fault.json")?;
    let filter = envoy::wasm_filter("fault", &build::module_path("fault"), &plugin)?;
    let config = envoy::render_bootstrap(
        "demo.yaml",
        &[("HTTP_FILTERS", &filter), ("UPSTREAM_PORT", &upstream.1.port().to_string())],
    )?;
    let envoy = Envoy::start(&envoy_bin, Launch { name: "demo-envoy", config: &config, concurrency: 2, cpus: None })?;
    let addr = envoy.listener("ingress")?;
    println!("    upstream  http://{}  (pid {})", upstream.1, upstream.0.pid());
    println!("    envoy     http://{addr}  admin http://{}  (pid {})", envoy.admin, envoy.proc.pid());
    println!("    plugin configuration (envoy-configs/demo-fault.json):\n{}", envoy::indent(plugin.trim()));

    let results = tour(addr)?;

    step("filter metrics: admin /stats?filter=meshwasm");
    print!("{}", envoy::indent(envoy.admin_get("/stats?filter=meshwasm")?.trim_end()));
    step("the same in Prometheus format (admin /stats/prometheus, meshwasm lines)");
    let prom = envoy.admin_get("/stats/prometheus")?;
    for line in prom.lines().filter(|l| l.contains("meshwasm") && !l.starts_with("# TYPE")) {
        println!("      {line}");
    }

    step("report");
    println!("    {:<50} {:<11} {:<10} {:>9}  ok", "scenario", "expected", "got", "latency");
    let mut failed = 0;
    for r in &results {
        println!(
            "    {:<50} {:<11} {:<10} {:>7.1}ms  {}",
            r.name,
            r.expected,
            r.got,
            r.latency.as_secs_f64() * 1e3,
            if r.ok { "✓" } else { "✗" }
        );
        if !r.ok {
            failed += 1;
        }
    }
    if failed > 0 {
        bail!("{failed} demo scenario(s) did not behave as expected; Envoy log: {}", rel(&envoy.proc.log));
    }

    if serve {
        serve_forever(addr, &envoy, upstream.0)?;
    }
    Ok(())
}

/// `meshwasm-upstream` from the integration-test crate (dev profile: it shares the build with
/// `cargo test`, and an echo server needs no optimizer).
fn build_upstream() -> Result<PathBuf> {
    step("building meshwasm-upstream");
    run_cmd(cargo().args(["build", "--quiet", "-p", "meshwasm-tests", "--bin", "meshwasm-upstream"]))?;
    Ok(root().join("target").join("debug").join("meshwasm-upstream"))
}

/// Start the upstream on a kernel-chosen port; it prints `listening on <addr>`.
fn start_upstream(bin: &PathBuf) -> Result<(Proc, SocketAddr)> {
    let mut cmd = Command::new(bin);
    cmd.args(["--listen", "127.0.0.1:0"]);
    let mut proc = Proc::spawn("demo-upstream", cmd)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        proc.check_alive()?;
        let file = std::fs::File::open(&proc.log)?;
        let addr = std::io::BufReader::new(file)
            .lines()
            .map_while(std::result::Result::ok)
            .find_map(|l| l.trim().strip_prefix("listening on ").and_then(|a| a.trim().parse().ok()));
        if let Some(addr) = addr {
            return Ok((proc, addr));
        }
        if Instant::now() > deadline {
            bail!("meshwasm-upstream did not print `listening on <addr>` within 20s:\n{}", proc.log_tail(20));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Outcome {
    name: String,
    expected: String,
    got: String,
    latency: Duration,
    ok: bool,
}

/// Each scenario: what we send, what must come back, and a minimum latency for delays.
struct Scenario {
    name: &'static str,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    status: u16,
    /// Some(header, value): the response must carry it (gRPC status).
    header: Option<(&'static str, &'static str)>,
    min_delay: Duration,
    repeat: usize,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "normal request",
        path: "/productpage",
        headers: &[],
        status: 200,
        header: None,
        min_delay: Duration::ZERO,
        repeat: 5,
    },
    Scenario {
        name: "rule abort (end-user: jason → 503, 100%)",
        path: "/ratings/1",
        headers: &[("end-user", "jason")],
        status: 503,
        header: None,
        min_delay: Duration::ZERO,
        repeat: 3,
    },
    Scenario {
        name: "same path, other user (no fault)",
        path: "/ratings/1",
        headers: &[("end-user", "alice")],
        status: 200,
        header: None,
        min_delay: Duration::ZERO,
        repeat: 1,
    },
    Scenario {
        name: "rule delay (/slow → +500ms, 100%)",
        path: "/slow",
        headers: &[],
        status: 200,
        header: None,
        min_delay: Duration::from_millis(500),
        repeat: 2,
    },
    Scenario {
        name: "header abort (x-envoy-fault-abort-request: 418)",
        path: "/",
        headers: &[("x-envoy-fault-abort-request", "418")],
        status: 418,
        header: None,
        min_delay: Duration::ZERO,
        repeat: 1,
    },
    Scenario {
        name: "header delay (x-envoy-fault-delay-request: 200)",
        path: "/",
        headers: &[("x-envoy-fault-delay-request", "200")],
        status: 200,
        header: None,
        min_delay: Duration::from_millis(200),
        repeat: 1,
    },
    Scenario {
        name: "gRPC abort (rule → grpc-status 14)",
        path: "/demo.Greeter/SayHello",
        headers: &[("content-type", "application/grpc")],
        status: 200,
        header: Some(("grpc-status", "14")),
        min_delay: Duration::ZERO,
        repeat: 1,
    },
];

fn tour(addr: SocketAddr) -> Result<Vec<Outcome>> {
    step("traffic");
    let mut results = Vec::new();
    for sc in SCENARIOS {
        let mut statuses = Vec::new();
        let mut worst = Duration::ZERO;
        let mut ok = true;
        let mut grpc = None;
        for _ in 0..sc.repeat {
            let rsp = http::get(addr, sc.path, sc.headers)?;
            worst = worst.max(rsp.elapsed);
            ok &= rsp.status == sc.status && rsp.elapsed >= sc.min_delay;
            if let Some((h, v)) = sc.header {
                let got = rsp.header(h).map(str::to_string);
                ok &= got.as_deref() == Some(v);
                grpc = Some(format!("{h}: {}", got.unwrap_or_else(|| "(none)".into())));
            }
            statuses.push(rsp.status);
        }
        let curl_headers: String = sc.headers.iter().map(|(k, v)| format!(" -H '{k}: {v}'")).collect();
        println!(
            "    curl -s{curl_headers} http://{addr}{}  →  {}{}  ({:.1} ms{})",
            sc.path,
            statuses.iter().map(u16::to_string).collect::<Vec<_>>().join(","),
            grpc.as_ref().map(|g| format!(", {g}")).unwrap_or_default(),
            worst.as_secs_f64() * 1e3,
            if sc.repeat > 1 { " slowest" } else { "" }
        );
        let mut expected = sc.status.to_string();
        let mut got = statuses.first().map(u16::to_string).unwrap_or_default();
        if let Some((_, v)) = sc.header {
            expected = format!("grpc {v}");
            got = grpc.clone().unwrap_or_default().replace("grpc-status: ", "grpc ");
        }
        if !sc.min_delay.is_zero() {
            expected.push_str(&format!(" ≥{}ms", sc.min_delay.as_millis()));
        }
        results.push(Outcome { name: sc.name.to_string(), expected, got, latency: worst, ok });
    }
    Ok(results)
}

/// Keep Envoy and the upstream running until Enter (or Ctrl-C, which the terminal delivers to
/// our whole process group, Envoy included). With no terminal on stdin, run until killed.
fn serve_forever(addr: SocketAddr, envoy: &Envoy, _upstream: Proc) -> Result<()> {
    step("serving; try:");
    println!("    curl -i http://{addr}/productpage");
    println!("    curl -i -H 'end-user: jason' http://{addr}/ratings/1");
    println!("    curl -s -o /dev/null -w '%{{time_total}}s\\n' http://{addr}/slow");
    println!("    curl -i -H 'x-envoy-fault-abort-request: 418' http://{addr}/");
    println!("    curl -s -o /dev/null -w '%{{time_total}}s\\n' -H 'x-envoy-fault-delay-request: 300' http://{addr}/");
    println!("    curl -s 'http://{}/stats?filter=meshwasm'", envoy.admin);
    println!("    access log + Envoy log: {}", rel(&envoy.proc.log));
    println!("\npress Enter (or Ctrl-C) to stop");
    let mut line = String::new();
    let n = std::io::stdin().read_line(&mut line).unwrap_or(0);
    if n == 0 {
        // stdin is not a terminal / closed: keep serving until we are killed.
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    println!("stopping");
    Ok(())
}
