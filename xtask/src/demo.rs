//! `cargo xtask demo [--serve]`: a stock Envoy with every meshwasm filter (fault, ratelimit,
//! retry, authz, telemetry), each on its own listener in front of a local upstream, a scripted
//! tour of what they do, their metrics, and a report.
//!
//! - Listener `ingress`: the fault filter, configured by `envoy-configs/demo-fault.json`.
//! - Listener `ratelimit`: the rate-limit filter, configured by
//!   `envoy-configs/demo-ratelimit.json`: a local token bucket per API key (exact across
//!   Envoy's two workers), and a global rule counted by the real rate-limit service
//!   (`meshwasm-ratelimit-service`, configured by `envoy-configs/demo-ratelimit-service.json`)
//!   in a `redis-server` the demo starts (read back with `redis-cli`). Without `redis-server` the service counts in its
//!   own memory (`--memory`, like Limitador's default storage): the global rule runs either way.
//!
//! - Listeners `retry`, `authz`, `telemetry`: the other three filters, configured by
//!   `envoy-configs/demo-retry.json` (over the carrier route `envoy-configs/retry-carrier.yaml`),
//!   `demo-authz.json` (AuthorizationPolicy ALLOW/DENY/CUSTOM with `meshwasm-ext-authz` as the
//!   authorizer, RequestAuthentication with an inline key set; tokens in
//!   `demo-authz-tokens.txt`) and `demo-telemetry.json` (Istio's standard metrics as the
//!   server workload of `node.metadata`); their tours are in `demo/filters.rs`.
//!
//! The bootstrap is `envoy-configs/demo.yaml`. Rendered files and logs land in `target/xtask/`.
//! Every child process is killed when the demo ends, whichever way it ends.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod filters;

use crate::build;
use crate::envoy::{self, Envoy, Launch, Proc};
use crate::{bail, cargo, http, json, on_path, rel, root, run_cmd, step, Context, Result};

pub fn run(args: &[String]) -> Result<()> {
    let serve = match args {
        [] => false,
        [a] if a == "--serve" => true,
        _ => bail!("usage: cargo xtask demo [--serve]"),
    };

    build::run()?;
    let envoy_bin = envoy::ensure()?;
    let bins = build_helpers()?;

    step("starting meshwasm-upstream, and meshwasm-ratelimit-service (on Redis when installed) for the global rule");
    let upstream = start_listening("demo-upstream", Command::new(&bins.upstream))?;
    println!("    upstream           http://{}  (pid {})", upstream.1, upstream.0.pid());
    let global = start_global(&bins.ratelimit_service)?;
    match &global.redis {
        Ok(redis) => println!("    redis-server       {}  (pid {})", redis.addr, redis.proc.pid()),
        Err(why) => println!("    note: {why}: the rate-limit service counts in memory (--memory)"),
    }
    println!("    ratelimit-service  h2c://{}  (pid {})", global.rls_addr, global.rls.pid());
    let mut authz_cmd = Command::new(&bins.ext_authz);
    authz_cmd.args(["--http", "127.0.0.1:0"]);
    let ext_authz = start_listening_with("demo-ext-authz", authz_cmd)?;
    println!("    ext-authz          http://{}  (pid {})", ext_authz.1, ext_authz.0.pid());

    step("starting Envoy (--concurrency 2): dist/fault.wasm on listener ingress, dist/ratelimit.wasm on listener ratelimit, dist/retry.wasm on retry, dist/authz.wasm on authz, dist/telemetry.wasm on telemetry");
    let fault_plugin = plugin_config("demo-fault.json")?;
    let ratelimit_file = "demo-ratelimit.json";
    let ratelimit_plugin = plugin_config(ratelimit_file)?;
    let fault_filter = envoy::wasm_filter("fault", &build::module_path("fault"), &fault_plugin)?;
    let ratelimit_filter = envoy::wasm_filter("ratelimit", &build::module_path("ratelimit"), &ratelimit_plugin)?;
    let more_filter = |name: &str| -> Result<String> {
        envoy::wasm_filter(name, &build::module_path(name), &plugin_config(&format!("demo-{name}.json"))?)
    };
    let (retry_filter, authz_filter, telemetry_filter) =
        (more_filter("retry")?, more_filter("authz")?, more_filter("telemetry")?);
    let stats_config = stats_config()?;
    let carrier = envoy::template("retry-carrier.yaml")?;
    let clusters = envoy::render(
        &envoy::template("clusters/ratelimit-service.yaml")?,
        &[("RLS_PORT", &global.rls_addr.port().to_string())],
    )?;
    let config = envoy::render_bootstrap(
        "demo.yaml",
        &[
            ("HTTP_FILTERS", &fault_filter),
            ("RATELIMIT_FILTERS", &ratelimit_filter),
            ("EXTRA_CLUSTERS", &clusters),
            ("UPSTREAM_PORT", &upstream.1.port().to_string()),
            ("RETRY_FILTERS", &retry_filter),
            ("AUTHZ_FILTERS", &authz_filter),
            ("TELEMETRY_FILTERS", &telemetry_filter),
            ("RETRY_CARRIER", &carrier),
            ("STATS_CONFIG", &stats_config),
            ("EXT_AUTHZ_PORT", &ext_authz.1.port().to_string()),
        ],
    )?;
    let envoy = Envoy::start(&envoy_bin, Launch { name: "demo-envoy", config: &config, concurrency: 2, cpus: None })?;
    let addr = envoy.listener("ingress")?;
    let rl_addr = envoy.listener("ratelimit")?;
    println!(
        "    envoy     fault http://{addr}  ratelimit http://{rl_addr}  admin http://{}  (pid {})",
        envoy.admin,
        envoy.proc.pid()
    );
    println!("    fault plugin configuration (envoy-configs/demo-fault.json):\n{}", envoy::indent(fault_plugin.trim()));
    println!(
        "    ratelimit plugin configuration (envoy-configs/{ratelimit_file}):\n{}",
        envoy::indent(ratelimit_plugin.trim())
    );
    let svc = envoy::template("demo-ratelimit-service.json")?;
    println!(
        "    rate-limit service configuration (envoy-configs/demo-ratelimit-service.json):\n{}",
        envoy::indent(svc.trim())
    );

    let retry_addr = envoy.listener("retry")?;
    let authz_addr = envoy.listener("authz")?;
    let telemetry_addr = envoy.listener("telemetry")?;
    println!("    envoy     retry http://{retry_addr}  authz http://{authz_addr}  telemetry http://{telemetry_addr}");

    let mut results = tour(addr)?;
    results.extend(ratelimit_tour(rl_addr, &global)?);

    step("fault filter metrics: admin /stats?filter=meshwasm.fault");
    print!("{}", envoy::indent(envoy.admin_get("/stats?filter=meshwasm.fault")?.trim_end()));
    step("ratelimit filter metrics: admin /stats?filter=meshwasm.ratelimit");
    print!("{}", envoy::indent(envoy.admin_get("/stats?filter=meshwasm.ratelimit")?.trim_end()));
    step("Envoy's gRPC calls to the rate-limit service: admin /stats?filter=cluster.ratelimit_service.upstream_");
    let stats = envoy.admin_get("/stats?filter=cluster.ratelimit_service.upstream_")?;
    let shown = stats.lines().filter(|l| SERVICE_CLUSTER_STATS.iter().any(|s| l.starts_with(&format!("{s}: "))));
    print!("{}", envoy::indent(&shown.collect::<Vec<_>>().join("\n")));
    step("the same in Prometheus format (admin /stats/prometheus, meshwasm lines)");
    let prom = envoy.admin_get("/stats/prometheus")?;
    for line in prom.lines().filter(|l| l.contains("meshwasm") && !l.starts_with("# TYPE")) {
        println!("      {line}");
    }
    results.extend(ratelimit_counters(&envoy)?);
    results.extend(filters::retry_tour(retry_addr, &envoy)?);
    results.extend(filters::authz_tour(authz_addr, &envoy)?);
    results.extend(filters::telemetry_tour(telemetry_addr, &envoy)?);

    step("report");
    println!("    {:<58} {:<14} {:<14} {:>9}  ok", "scenario", "expected", "got", "latency");
    let mut failed = 0;
    for r in &results {
        let latency = r.latency.map(|l| format!("{:.1}ms", l.as_secs_f64() * 1e3)).unwrap_or_default();
        println!("    {:<58} {:<14} {:<14} {latency:>9}  {}", r.name, r.expected, r.got, if r.ok { "✓" } else { "✗" });
        if !r.ok {
            failed += 1;
        }
    }
    if let Err(why) = &global.redis {
        println!("    (global rule counted in the rate-limit service's memory: {why})");
    }
    if failed > 0 {
        bail!("{failed} demo scenario(s) did not behave as expected; Envoy log: {}", rel(&envoy.proc.log));
    }

    if serve {
        serve_forever(addr, rl_addr, [retry_addr, authz_addr, telemetry_addr], &envoy)?;
    }
    Ok(())
}

/// A plugin configuration from `envoy-configs/`, checked to be JSON (the filter itself
/// validates it when Envoy loads it: a rejected configuration fails Envoy's start).
fn plugin_config(name: &str) -> Result<String> {
    let text = envoy::template(name)?;
    json::check(&text).context(format!("envoy-configs/{name}"))?;
    Ok(text)
}

struct Helpers {
    upstream: PathBuf,
    ratelimit_service: PathBuf,
    ext_authz: PathBuf,
}

/// `envoy-configs/telemetry-stats.yaml` (the telemetry filter's Prometheus labels and
/// histogram buckets) with the meshwasm `rule` tag of the other filters added.
fn stats_config() -> Result<String> {
    let text = envoy::template("telemetry-stats.yaml")?;
    let rule = r"  - tag_name: rule
    regex: '^wasmcustom\.meshwasm\.[a-z_]+\.(rule\.([^.]+)\.)'";
    let mut out = String::new();
    let mut added = false;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        out.push_str(line);
        out.push('\n');
        if line == "  stats_tags:" {
            out.push_str(rule);
            out.push('\n');
            added = true;
        }
    }
    if !added {
        bail!("envoy-configs/telemetry-stats.yaml has no `  stats_tags:` line");
    }
    Ok(out)
}

/// `meshwasm-upstream`, `meshwasm-ratelimit-service` and `meshwasm-ext-authz` from the
/// integration-test crate (dev profile: they share the build with `cargo test`, and none needs
/// an optimizer).
fn build_helpers() -> Result<Helpers> {
    step("building meshwasm-upstream, meshwasm-ratelimit-service and meshwasm-ext-authz");
    run_cmd(cargo().args([
        "build",
        "--quiet",
        "-p",
        "meshwasm-tests",
        "--bin",
        "meshwasm-upstream",
        "--bin",
        "meshwasm-ratelimit-service",
        "--bin",
        "meshwasm-ext-authz",
    ]))?;
    let dir = root().join("target").join("debug");
    Ok(Helpers {
        upstream: dir.join("meshwasm-upstream"),
        ratelimit_service: dir.join("meshwasm-ratelimit-service"),
        ext_authz: dir.join("meshwasm-ext-authz"),
    })
}

/// Start a server on a kernel-chosen port (`--listen 127.0.0.1:0` is appended); it prints
/// `listening on <addr>`.
fn start_listening(name: &str, mut cmd: Command) -> Result<(Proc, SocketAddr)> {
    cmd.args(["--listen", "127.0.0.1:0"]);
    start_listening_with(name, cmd)
}

/// Start a server whose command line already says where to listen; it prints
/// `listening on <addr>`.
fn start_listening_with(name: &str, cmd: Command) -> Result<(Proc, SocketAddr)> {
    let mut proc = Proc::spawn(name, cmd)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        proc.check_alive()?;
        let file = std::fs::File::open(&proc.log)?;
        let addr = BufReader::new(file)
            .lines()
            .map_while(std::result::Result::ok)
            .find_map(|l| l.trim().strip_prefix("listening on ").and_then(|a| a.trim().parse().ok()));
        if let Some(addr) = addr {
            return Ok((proc, addr));
        }
        if Instant::now() > deadline {
            bail!("{name} did not print `listening on <addr>` within 20s:\n{}", proc.log_tail(20));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// === the global part: Redis and the rate-limit service ===

/// The rate-limit service and the Redis it counts in, or why there is none (then it counts
/// in its own memory). Killed on drop.
struct Global {
    redis: std::result::Result<RedisProc, String>,
    rls: Proc,
    rls_addr: SocketAddr,
}

/// Redis's own programs: `redis-server` (`$REDIS_SERVER`, else on `PATH`) and `redis-cli`
/// (beside it, else on `PATH`; Debian's `redis-server` depends on `redis-tools`, which has
/// it), or why they are not there.
struct RedisBins {
    server: PathBuf,
    cli: PathBuf,
}

fn redis_bins() -> std::result::Result<RedisBins, String> {
    let server = match std::env::var_os("REDIS_SERVER").filter(|b| !b.is_empty()) {
        Some(bin) if Path::new(&bin).is_file() => PathBuf::from(bin),
        Some(bin) => return Err(format!("REDIS_SERVER={} is not a file", bin.to_string_lossy())),
        None => on_path("redis-server")
            .ok_or("redis-server is not on PATH (apt-get install redis-server, or set REDIS_SERVER)")?,
    };
    let cli = server
        .parent()
        .map(|d| d.join("redis-cli"))
        .filter(|p| p.is_file())
        .or_else(|| on_path("redis-cli"))
        .ok_or("redis-cli is not beside redis-server nor on PATH (apt-get install redis-tools)")?;
    Ok(RedisBins { server, cli })
}

/// A running `redis-server`, and the `redis-cli` that talks to it.
struct RedisProc {
    proc: Proc,
    addr: SocketAddr,
    cli: PathBuf,
}

impl RedisProc {
    /// One command through `redis-cli --raw` (Redis's own client: the demo has no RESP code
    /// of its own); an error reply is an error.
    fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.cli)
            .args(["-h", "127.0.0.1", "-p", &self.addr.port().to_string(), "--raw"])
            .args(args)
            .output()
            .context(format!("running {}", self.cli.display()))?;
        let text = String::from_utf8_lossy(&out.stdout).trim_end().to_string();
        // redis-cli exits 0 on an error reply in --raw mode but prints `ERR …`.
        if !out.status.success() || text.starts_with("ERR") || text.starts_with("WRONGTYPE") {
            bail!(
                "redis-cli -p {} {}: {text}{}",
                self.addr.port(),
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(text)
    }
}

/// Start Redis when installed and the rate-limit service counting in it, else the service
/// alone counting in memory (`--memory`).
fn start_global(rls_bin: &Path) -> Result<Global> {
    let redis = match redis_bins() {
        Ok(bins) => Ok(start_redis(bins)?),
        Err(why) => Err(why),
    };
    let mut cmd = Command::new(rls_bin);
    match &redis {
        Ok(r) => cmd.arg("--redis").arg(r.addr.to_string()),
        Err(_) => cmd.arg("--memory"),
    };
    cmd.arg("--config").arg(root().join("envoy-configs").join("demo-ratelimit-service.json"));
    let (rls, rls_addr) = start_listening("demo-ratelimit-service", cmd)?;
    Ok(Global { redis, rls, rls_addr })
}

/// `redis-server` on a free port, no persistence, answering PING. Redis cannot report a
/// kernel-chosen port, so we pick a free one; if another process takes it first, Redis exits
/// and we try another.
fn start_redis(bins: RedisBins) -> Result<RedisProc> {
    let dir = envoy::scratch_dir()?.join("demo-redis");
    std::fs::create_dir_all(&dir).context(format!("creating {}", dir.display()))?;
    let mut last = String::new();
    for _ in 0..3 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut cmd = Command::new(&bins.server);
        cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"]);
        cmd.arg("--dir").arg(&dir);
        let proc = Proc::spawn("demo-redis", cmd)?;
        let mut redis = RedisProc { proc, addr, cli: bins.cli.clone() };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Err(e) = redis.proc.check_alive() {
                last = e.to_string();
                break;
            }
            if redis.cli(&["PING"]).ok().as_deref() == Some("PONG") {
                return Ok(redis);
            }
            if Instant::now() > deadline {
                bail!("redis-server did not answer PING on {addr} within 10s:\n{}", redis.proc.log_tail(20));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    bail!("redis-server did not start: {last}")
}

// === the tour ===

struct Outcome {
    name: String,
    expected: String,
    got: String,
    /// The slowest response, for traffic scenarios.
    latency: Option<Duration>,
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
    step("traffic: fault filter (listener ingress)");
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
        results.push(Outcome { name: sc.name.to_string(), expected, got, latency: Some(worst), ok });
    }
    Ok(results)
}

/// A burst of identical requests to the ratelimit listener and the statuses that must come
/// back, in order.
struct Burst {
    name: &'static str,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    /// `(n, status)`: `n` responses with `status`, in this order.
    expect: &'static [(usize, u16)],
    /// The limit the `x-ratelimit-*` headers must report (the bucket, or the service's
    /// requests per unit); `None` when no rule applies (no such headers).
    limit: Option<u64>,
}

/// Local rule `per-api-key`: 5 tokens per key, refilled at 5 per hour (so no refill during
/// the demo). Requests are new connections, spread over both workers: the count is exact
/// across them because the buckets live in shared data.
const LOCAL_BURSTS: &[Burst] = &[
    Burst {
        name: "local: x-api-key alice ×8 (bucket of 5 per key)",
        path: "/api/orders",
        headers: &[("x-api-key", "alice")],
        expect: &[(5, 200), (3, 429)],
        limit: Some(5),
    },
    Burst {
        name: "local: x-api-key bob ×3 (his own bucket)",
        path: "/api/orders",
        headers: &[("x-api-key", "bob")],
        expect: &[(3, 200)],
        limit: Some(5),
    },
    Burst {
        name: "local: no x-api-key ×2 (the rule does not apply)",
        path: "/api/orders",
        headers: &[],
        expect: &[(2, 200)],
        limit: None,
    },
];

/// Global rule `search-per-key`: the rate-limit service allows 3 per hour per key, counted
/// in Redis (a fixed window aligned on the hour: a burst straddling hh:00:00 would start a
/// new window; it takes a fraction of a second).
const GLOBAL_BURSTS: &[Burst] = &[
    Burst {
        name: "global: x-api-key carol ×5 on /search (3 per hour)",
        path: "/search?q=envoy",
        headers: &[("x-api-key", "carol")],
        expect: &[(3, 200), (2, 429)],
        limit: Some(3),
    },
    Burst {
        name: "global: x-api-key dave on /search (his own counter)",
        path: "/search?q=envoy",
        headers: &[("x-api-key", "dave")],
        expect: &[(1, 200)],
        limit: Some(3),
    },
];

fn ratelimit_tour(addr: SocketAddr, global: &Global) -> Result<Vec<Outcome>> {
    step("traffic: rate-limit filter (listener ratelimit)");
    let mut results = Vec::new();
    for b in LOCAL_BURSTS.iter().chain(GLOBAL_BURSTS) {
        results.push(burst(addr, b)?);
    }
    if let Ok(redis) = &global.redis {
        // The counter the service keeps for carol: every call counts, allowed or not.
        let keys = redis.cli(&["KEYS", "meshwasm_rl:meshwasm-demo:*:api_key_carol:*"])?;
        let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
        let got = match keys.as_slice() {
            [key] => {
                let value = redis.cli(&["GET", key])?;
                println!("    redis-cli -p {} GET {key}  →  {value}", redis.addr.port());
                value
            }
            other => format!("{} keys", other.len()),
        };
        results.push(Outcome {
            name: "global: carol's counter in Redis".into(),
            expected: "5".into(),
            ok: got == "5",
            got,
            latency: None,
        });
    }
    Ok(results)
}

/// Send one burst; check the statuses, the local reply, and the rate-limit headers.
fn burst(addr: SocketAddr, b: &Burst) -> Result<Outcome> {
    let want: Vec<u16> = b.expect.iter().flat_map(|&(n, s)| std::iter::repeat_n(s, n)).collect();
    let mut statuses = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    let mut worst = Duration::ZERO;
    let mut allowed = 0u64;
    let mut shown = Vec::new();
    for (i, &status) in want.iter().enumerate() {
        let rsp = http::get(addr, b.path, b.headers)?;
        worst = worst.max(rsp.elapsed);
        statuses.push(rsp.status);
        let h = |name: &str| rsp.header(name).map(str::to_string);
        let limit_headers = ["x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"]
            .iter()
            .filter_map(|n| h(n).map(|v| format!("{n}: {v}")))
            .collect::<Vec<_>>();
        let from_upstream = h("x-meshwasm-upstream").as_deref() == Some("1");
        if rsp.status != status {
            problems.push(format!("#{} got {}", i + 1, rsp.status));
        } else if status == 200 {
            allowed += 1;
            if !from_upstream {
                problems.push(format!("#{} 200 not from the upstream", i + 1));
            }
            match b.limit {
                Some(limit) => {
                    let want = (limit.to_string(), limit.saturating_sub(allowed).to_string());
                    let got =
                        (h("x-ratelimit-limit").unwrap_or_default(), h("x-ratelimit-remaining").unwrap_or_default());
                    if got != want {
                        problems.push(format!(
                            "#{} limit/remaining {}/{} (want {}/{})",
                            i + 1,
                            got.0,
                            got.1,
                            want.0,
                            want.1
                        ));
                    }
                }
                None if !limit_headers.is_empty() => problems.push(format!("#{} unexpected {limit_headers:?}", i + 1)),
                None => {}
            }
        } else {
            let retry_after = h("retry-after").and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            if from_upstream || rsp.text() != "local_rate_limited" || retry_after == 0 {
                problems.push(format!(
                    "#{} {} body {:?}, retry-after {:?}, from upstream: {from_upstream}",
                    i + 1,
                    rsp.status,
                    rsp.text(),
                    h("retry-after")
                ));
            }
            if let Some(limit) = b.limit {
                let want = (limit.to_string(), "0".to_string());
                let got = (h("x-ratelimit-limit").unwrap_or_default(), h("x-ratelimit-remaining").unwrap_or_default());
                if got != want {
                    problems.push(format!("#{} limit/remaining {}/{} (want {limit}/0)", i + 1, got.0, got.1));
                }
            }
        }
        // Show the first response and each change of status in full.
        if i == 0 || statuses.get(i - 1) != Some(&rsp.status) {
            let mut extra = limit_headers;
            if let Some(r) = h("retry-after") {
                extra.push(format!("retry-after: {r}"));
            }
            if rsp.status != 200 {
                extra.push(format!("body: {}", rsp.text().trim()));
            }
            if extra.is_empty() {
                extra.push("(no rate-limit headers)".into());
            }
            shown.push(format!("#{} {} {}", i + 1, rsp.status, extra.join(", ")));
        }
    }
    let curl_headers: String = b.headers.iter().map(|(k, v)| format!(" -H '{k}: {v}'")).collect();
    println!(
        "    {}× curl -si{curl_headers} 'http://{addr}{}'  →  {}  ({:.1} ms slowest)",
        want.len(),
        b.path,
        statuses.iter().map(u16::to_string).collect::<Vec<_>>().join(","),
        worst.as_secs_f64() * 1e3
    );
    for s in &shown {
        println!("        {s}");
    }
    for p in &problems {
        println!("        ✗ {p}");
    }
    Ok(Outcome {
        name: b.name.to_string(),
        expected: counts(&want),
        got: counts(&statuses),
        latency: Some(worst),
        ok: problems.is_empty(),
    })
}

/// `[200, 200, 429]` → `2×200 1×429` (runs, in order).
fn counts(statuses: &[u16]) -> String {
    let mut runs: Vec<(usize, u16)> = Vec::new();
    for &s in statuses {
        match runs.last_mut() {
            Some((n, last)) if *last == s => *n += 1,
            _ => runs.push((1, s)),
        }
    }
    runs.iter().map(|(n, s)| format!("{n}×{s}")).collect::<Vec<_>>().join(" ")
}

/// The rate-limit service cluster's stats the demo shows and checks.
const SERVICE_CLUSTER_STATS: [&str; 4] = [
    "cluster.ratelimit_service.upstream_cx_total",
    "cluster.ratelimit_service.upstream_cx_http2_total",
    "cluster.ratelimit_service.upstream_rq_total",
    "cluster.ratelimit_service.upstream_rq_200",
];

/// The filter's counters after the tour: each rule's, the service's, and the service
/// cluster's (one gRPC call per global-rule request, over HTTP/2).
fn ratelimit_counters(envoy: &Envoy) -> Result<Vec<Outcome>> {
    let stats = envoy.admin_get("/stats?filter=meshwasm.ratelimit")?;
    let row = |what: &str, names: &[&str], expected: &str| {
        let full: Vec<String> = names.iter().map(|n| format!("wasmcustom.meshwasm.ratelimit.{n}")).collect();
        filters::counters(&stats, what, &full, expected)
    };
    let r = "rule.per-api-key";
    let mut out = vec![row(
        "stats per-api-key: enabled/ok/rate_limited/enforced",
        &[&format!("{r}.enabled"), &format!("{r}.ok"), &format!("{r}.rate_limited"), &format!("{r}.enforced")],
        "11/8/3/3",
    )];
    let r = "rule.search-per-key";
    out.push(row(
        "stats search-per-key: enabled/ok/rate_limited",
        &[&format!("{r}.enabled"), &format!("{r}.ok"), &format!("{r}.rate_limited")],
        "6/4/2",
    ));
    out.push(row("stats global: ok/over_limit/error", &["global.ok", "global.over_limit", "global.error"], "4/2/0"));
    let cluster = envoy.admin_get("/stats?filter=cluster.ratelimit_service.upstream_")?;
    let stat = |name: &str| -> u64 {
        cluster
            .lines()
            .find_map(|l| l.split_once(": ").filter(|(k, _)| *k == name).and_then(|(_, v)| v.trim().parse().ok()))
            .unwrap_or(0)
    };
    let [cx, h2, rq, rq200] = SERVICE_CLUSTER_STATS.map(stat);
    let protocol = if cx > 0 && h2 == cx { "h2" } else { "not h2" };
    let got = format!("{rq}/{rq200} {protocol}");
    out.push(Outcome {
        name: "service cluster: gRPC calls/200s, protocol".into(),
        expected: "6/6 h2".into(),
        ok: got == "6/6 h2",
        got,
        latency: None,
    });
    Ok(out)
}

/// Keep Envoy, the upstream and the rate-limit service running until Enter (or Ctrl-C, which
/// the terminal delivers to our whole process group, children included). With no terminal
/// on stdin, run until killed.
fn serve_forever(addr: SocketAddr, rl_addr: SocketAddr, more: [SocketAddr; 3], envoy: &Envoy) -> Result<()> {
    let [retry_addr, authz_addr, telemetry_addr] = more;
    step("serving; try:");
    println!("    curl -i http://{addr}/productpage");
    println!("    curl -i -H 'end-user: jason' http://{addr}/ratings/1");
    println!("    curl -s -o /dev/null -w '%{{time_total}}s\\n' http://{addr}/slow");
    println!("    curl -i -H 'x-envoy-fault-abort-request: 418' http://{addr}/");
    println!("    curl -s -o /dev/null -w '%{{time_total}}s\\n' -H 'x-envoy-fault-delay-request: 300' http://{addr}/");
    println!("    for i in $(seq 6); do curl -s -o /dev/null -w '%{{http_code}}\\n' -H 'x-api-key: erin' http://{rl_addr}/api/orders; done");
    println!("    for i in $(seq 4); do curl -s -o /dev/null -w '%{{http_code}}\\n' -H 'x-api-key: erin' http://{rl_addr}/search; done");
    println!("    curl -i -H 'x-flaky-key: k1' -H 'x-flaky-fail: 2' -H 'x-flaky-mode: status=503' http://{retry_addr}/ratings/1");
    println!("    curl -i http://{authz_addr}/admin/users");
    println!("    curl -i -H \"authorization: Bearer $(grep ^alice envoy-configs/demo-authz-tokens.txt | cut -d' ' -f2)\" http://{authz_addr}/private/notes");
    println!("    curl -i -H 'x-ext-authz: deny' http://{authz_addr}/protected/doc");
    println!("    curl -s http://{telemetry_addr}/reviews/1 >/dev/null; curl -s 'http://{}/stats/prometheus?filter=istio_requests_total'", envoy.admin);
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn counts_runs_in_order() {
        assert_eq!(counts(&[200, 200, 200, 429, 429]), "3×200 2×429");
        assert_eq!(counts(&[200, 429, 200]), "1×200 1×429 1×200");
        assert_eq!(counts(&[]), "");
    }
}
