//! `cargo xtask bench`: what do the meshwasm fault and ratelimit filters cost, next to the
//! floor any wasm filter pays (a no-op module) and next to Envoy's native filters for the same
//! jobs (`fault`, `local_ratelimit`)?
//!
//! Method (the machine is shared and noisy, so everything is relative and side by side):
//! - One Envoy per configuration, all running at once, each `--concurrency 1` and pinned to
//!   core 0 (`taskset -c 0`). wrk (`-t1`) and the upstream (a second Envoy answering with
//!   `direct_response`, `--concurrency 1`) are pinned to core 1, so the proxy under test owns
//!   core 0 and its throughput is its per-request CPU cost: 1/rps.
//! - Each configuration is first probed (a request it must pass, one it must fault) so a
//!   mis-configured filter cannot produce a flattering number. A rate limiter that must never
//!   reject is proven present by its counters instead: the probe must count as admitted, the
//!   admitted count must cover every measured request, and the rejected count must stay 0.
//! - Every wrk run, warm-ups included, must see only 2xx responses: a 429 (or any error) fails
//!   the run.
//! - Rounds interleave the configurations (rotating the order each round); each measurement is
//!   preceded by a warm-up. Medians over rounds are reported.
//! - Per request we report: req/s, p50/p99 latency (wrk --latency), and Envoy CPU µs/request
//!   measured from /proc/<pid>/stat over the measured window.
//! - Headline: overhead(cfg) = cpu_cfg − cpu_bare (Envoy CPU µs/request, best of rounds); ratio =
//!   overhead(filter) / overhead(noop), target ≤ 1.3 for fault and for ratelimit ("limiter
//!   overhead over bare Envoy within 1.3× the no-op module's"). The same ratio by 1/rps and
//!   by p50 is reported beside it: 1/rps equals CPU/request only when the proxy saturates a
//!   core nobody else uses, which a shared machine does not guarantee (each sample records how
//!   busy the proxy's core was, and how much of it other processes took).

use std::cell::Cell;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::build::{self, Module};
use crate::envoy::{self, Envoy, Launch};
use crate::{bail, http, json, on_path, output, root, step, Context, Result};

#[cfg(test)]
mod floor_check;
mod jwt;

/// The performance target: a meshwasm filter's per-request overhead (fault; ratelimit: "limiter
/// overhead over bare Envoy within 1.3× the no-op module's") at most 1.3× the no-op module's.
const TARGET_RATIO: f64 = 1.3;
/// The telemetry filter's target (issue 9): overhead within 2× the no-op module's.
const TELEMETRY_TARGET_RATIO: f64 = 2.0;
/// RequestAuthentication's target (issue 8): with a cached token, within 1.5× the no-op's.
const JWT_TARGET_RATIO: f64 = 1.5;

/// The target ratio of one configuration (a floor row: its filter's).
fn target_ratio(key: &str) -> f64 {
    let key = key.strip_prefix("floor_").unwrap_or(key);
    if key.starts_with("telemetry") {
        TELEMETRY_TARGET_RATIO
    } else if key == "authz_jwt" || key == "jwt" {
        JWT_TARGET_RATIO
    } else {
        TARGET_RATIO
    }
}

/// The configurations compared with the no-op module, in the headline's order.
const HEADLINE: &[&str] = &[
    "fault_rules",
    "fault_rules_tuned",
    "fault_headers",
    "ratelimit",
    "ratelimit_tuned",
    "retry",
    "retry_budget",
    "telemetry",
    "floor_telemetry",
    "authz",
    "floor_authz",
    "authz_jwt",
    "floor_jwt",
    "authz_jwt_fresh",
    "authz_jwt_fresh_es256",
    "authz_jwt_fresh_eddsa",
    "authz_jwt_fresh_hs256",
    "noop_sdk",
    "native_fault",
    "native_local_ratelimit",
    "native_rbac",
    "native_jwt",
];

/// Rows shown for comparison only: no target applies to them (the uncached JWT rows measure
/// the signature's cost per algorithm; a floor row is the least its filter can cost).
fn is_reference(key: &str) -> bool {
    key == "noop_sdk" || key.starts_with("native_") || key.starts_with("authz_jwt_fresh") || is_floor(key)
}

/// The hostcall floor rows (`filters/floor`): the module makes exactly the hostcalls its
/// filter makes on the same request and nothing else, so no filter making those calls can
/// cost less. A floor above its filter's target says the target is out of reach on Envoy's
/// Proxy-Wasm ABI, whatever the filter's code.
fn is_floor(key: &str) -> bool {
    key.starts_with("floor_")
}

/// The hostcalls `authz.wasm` makes on the benchmark's allowed request: the request's header
/// map (one read serves every attribute of the policy), the `allowed` counter and the
/// policy's; Envoy also crosses into it for the response headers (it exports them for
/// ext_authz's `headersToDownstreamOnAllow`).
const FLOOR_AUTHZ: &str = r#"{"request":["headers","counter","counter"]}"#;
/// The hostcalls `telemetry.wasm` makes on the benchmark's request (client side, no peer
/// answer from the upstream): the authority and content type, the two exchange headers sent,
/// the status and the (absent) exchange headers of the response, the seven properties of the
/// log phase (flags, duration, both sizes, cluster, upstream TLS, the endpoint's metadata as
/// the peer fallback), the request counter and three histograms.
const FLOOR_TELEMETRY: &str = r#"{"request":["header :authority","header content-type","set x-envoy-peer-metadata-id -","set x-envoy-peer-metadata -"],"response":["header :status","header x-envoy-peer-metadata","header x-envoy-peer-metadata-id"],"log":["property response.flags","property request.duration","property request.total_size","property response.total_size","property xds.cluster_name","property upstream.tls_version","property xds.upstream_host_metadata","counter","histogram","histogram","histogram"]}"#;

/// Rules that never match the benchmark's traffic: the common path of a production config.
const FAULT_NO_MATCH: &str = r#"{"rules":[{"name":"never","match":[{"uri":{"prefix":"/never"},"headers":{"x-chaos":{"exact":"yes"}}}],"fault":{"abort":{"httpStatus":503,"percentage":{"value":100}}}}]}"#;
const FAULT_HEADERS: &str = r#"{"headerControl":true}"#;
/// The same non-matching rule with per-route override lookup turned off (one property read
/// fewer per request): what a deployment that does not use route metadata overrides pays.
const FAULT_NO_MATCH_NO_OVERRIDES: &str = r#"{"rules":[{"name":"never","match":[{"uri":{"prefix":"/never"},"headers":{"x-chaos":{"exact":"yes"}}}],"fault":{"abort":{"httpStatus":503,"percentage":{"value":100}}}}],"routeOverrides":false}"#;
/// One local rule (no match, no descriptors: every request takes a token from one bucket) with
/// a bucket so large that nothing is ever limited: the cost of an allowed request.
const RATELIMIT_ALLOW: &str = r#"{"rules":[{"name":"bench","tokenBucket":{"maxTokens":1000000000,"tokensPerFill":1000000000,"fillInterval":"1s"}}]}"#;
/// The same with per-route override lookup turned off.
const RATELIMIT_ALLOW_NO_OVERRIDES: &str = r#"{"rules":[{"name":"bench","tokenBucket":{"maxTokens":1000000000,"tokensPerFill":1000000000,"fillInterval":"1s"}}],"routeOverrides":false}"#;
/// One retry rule (Istio-shaped: 2 attempts on 5xx and connect-failure, a 5 s timeout) and a
/// request that succeeds: the filter sets the router's headers and the router never retries.
const RETRY_RULE: &str =
    r#"{"rules":[{"name":"bench","retries":{"attempts":2,"retryOn":"5xx,connect-failure"},"timeout":"5s"}]}"#;
/// The same rule with a retry budget (shared data read and CAS-written per request, and the
/// log phase reading the attempt count to refund).
const RETRY_BUDGET: &str = r#"{"rules":[{"name":"bench","retries":{"attempts":2,"retryOn":"5xx,connect-failure"},"timeout":"5s","budget":{"retryRatio":0.2}}]}"#;
/// The retry rule's counters: every request counted, none skipped by the idempotency guard.
const RETRY_COUNTERS: Counters = Counters {
    admitted: "wasmcustom.meshwasm.retry.rule.bench.requests",
    rejected: "wasmcustom.meshwasm.retry.rule.bench.idempotency_skipped",
};
/// The telemetry filter as an outbound sidecar: the exchange headers out and in, the 25
/// standard labels, the four HTTP metrics per request.
const TELEMETRY_CLIENT: &str = r#"{"reporter":"CLIENT"}"#;
/// A header every benchmark request carries (wrk and the probes), so a policy can match one.
const BENCH_HEADER: (&str, &str) = ("x-bench-client", "wrk");
/// A typical ALLOW policy (issue 7): methods, paths (one exact, one prefix) and a header
/// condition, all matching the benchmark's `GET /` with `BENCH_HEADER`.
/// `envoy-configs/filters/native-rbac.yaml` is istiod's translation of it.
const AUTHZ_POLICY: &str = r#"{"policies":[{"apiVersion":"security.istio.io/v1","kind":"AuthorizationPolicy","metadata":{"name":"bench","namespace":"default"},"spec":{"action":"ALLOW","rules":[{"to":[{"operation":{"methods":["GET","HEAD"],"paths":["/","/api/*"]}}],"when":[{"key":"request.headers[x-bench-client]","values":["wrk"]}]}]}}]}"#;
/// The authz filter's counters: every measured request allowed, none denied after the probes.
const AUTHZ_COUNTERS: Counters =
    Counters { admitted: "wasmcustom.meshwasm.authz.allowed", rejected: "wasmcustom.meshwasm.authz.denied" };
/// Envoy's RBAC counters (stat_prefix `ingress` in bench.yaml).
const NATIVE_RBAC_COUNTERS: Counters =
    Counters { admitted: "http.ingress.rbac.allowed", rejected: "http.ingress.rbac.denied" };
/// The counters of `RATELIMIT_ALLOW`'s rule (as Envoy stores the module's metrics).
const RATELIMIT_COUNTERS: Counters = Counters {
    admitted: "wasmcustom.meshwasm.ratelimit.rule.bench.ok",
    rejected: "wasmcustom.meshwasm.ratelimit.rule.bench.rate_limited",
};
/// Envoy's local_ratelimit counters (stat_prefix in filters/native-local-ratelimit.yaml).
const NATIVE_LOCAL_RATELIMIT_COUNTERS: Counters = Counters {
    admitted: "http_local_rate_limiter.http_local_rate_limit.ok",
    rejected: "http_local_rate_limiter.http_local_rate_limit.rate_limited",
};

pub struct Options {
    pub duration: u64,
    pub warmup: u64,
    pub rounds: u32,
    pub connections: u32,
    /// Run only these configurations (bare and noop are always kept: ratios need them).
    pub only: Option<Vec<String>>,
    /// Each configuration's filters K times in a row (an amplifier for comparing small
    /// per-request costs; results are then per K filters, and are not written to bench/).
    pub chain: u32,
    /// Load every configuration at the same time in each round (each proxy still pinned to
    /// the proxy core, each with its own wrk on the load core), so that all of them see the
    /// same machine: robust to a machine whose speed drifts, at the price of cache sharing.
    pub concurrent: bool,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o =
            Options { duration: 10, warmup: 2, rounds: 3, connections: 16, only: None, chain: 1, concurrent: false };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            if flag == "--concurrent" {
                o.concurrent = true;
                continue;
            }
            if flag == "--only" {
                let v = it.next().ok_or_else(|| crate::Error::msg("--only needs a value"))?;
                o.only = Some(v.split(',').map(|k| k.trim().to_string()).collect());
                continue;
            }
            let mut value = || -> Result<u64> {
                let v = it.next().ok_or_else(|| crate::Error::msg(format!("{flag} needs a value")))?;
                v.trim_end_matches('s').parse().context(format!("{flag} {v}"))
            };
            match flag.as_str() {
                "--duration" => o.duration = value()?.max(1),
                "--warmup" => o.warmup = value()?,
                "--rounds" => o.rounds = u32::try_from(value()?.max(1)).unwrap_or(1),
                "--connections" => o.connections = u32::try_from(value()?.max(1)).unwrap_or(16),
                "--chain" => o.chain = u32::try_from(value()?.clamp(1, 50)).unwrap_or(1),
                other => bail!("unknown bench option `{other}` (see `cargo xtask help`)"),
            }
        }
        Ok(o)
    }
}

/// A request (path, headers) and the status a fault must produce for it.
type FaultProbe = (&'static str, &'static [(&'static str, &'static str)], u16);

/// Counters of a filter that must admit every benchmark request: `admitted` proves the filter
/// is in the path (the probe must add to it, and it must cover every measured request);
/// `rejected` must stay 0 for the whole run.
#[derive(Clone, Copy)]
struct Counters {
    admitted: &'static str,
    rejected: &'static str,
}

/// One configuration under test.
struct Setup {
    key: &'static str,
    label: &'static str,
    /// The http_filters spliced before the router.
    filters: String,
    /// A request this configuration must fault (proves the filter is really there), if any.
    must_fault: Option<FaultProbe>,
    /// The counters of a filter that must admit everything, if any.
    counters: Option<Counters>,
}

fn setups() -> Result<Vec<Setup>> {
    let noop = build::module_path("noop");
    let noop_sdk = build::module_path("noop-sdk");
    let fault = build::module_path("fault");
    let ratelimit = build::module_path("ratelimit");
    let retry = build::module_path("retry");
    let telemetry = build::module_path("telemetry");
    let authz = build::module_path("authz");
    let floor = build::module_path("floor");
    Ok(vec![
        Setup {
            key: "bare",
            label: "bare Envoy (router only)",
            filters: String::new(),
            must_fault: None,
            counters: None,
        },
        Setup {
            key: "noop",
            label: "no-op wasm module (floor)",
            filters: envoy::wasm_filter("noop", &noop, "{}")?,
            must_fault: None,
            counters: None,
        },
        Setup {
            key: "noop_sdk",
            label: "no-op wasm module, proxy-wasm SDK",
            filters: envoy::wasm_filter("noop", &noop_sdk, "{}")?,
            must_fault: None,
            counters: None,
        },
        Setup {
            key: "fault_rules",
            label: "meshwasm fault, rules not matching",
            filters: envoy::wasm_filter("fault", &fault, FAULT_NO_MATCH)?,
            must_fault: Some(("/never", &[("x-chaos", "yes")], 503)),
            counters: None,
        },
        Setup {
            key: "fault_rules_tuned",
            label: "meshwasm fault, rules not matching, routeOverrides off",
            filters: envoy::wasm_filter("fault", &fault, FAULT_NO_MATCH_NO_OVERRIDES)?,
            must_fault: Some(("/never", &[("x-chaos", "yes")], 503)),
            counters: None,
        },
        Setup {
            key: "fault_headers",
            label: "meshwasm fault, headerControl",
            filters: envoy::wasm_filter("fault", &fault, FAULT_HEADERS)?,
            must_fault: Some(("/", &[("x-envoy-fault-abort-request", "503")], 503)),
            counters: None,
        },
        Setup {
            key: "native_fault",
            label: "Envoy native fault (header_abort/delay)",
            filters: envoy::template("filters/native-fault.yaml")?,
            must_fault: Some(("/", &[("x-envoy-fault-abort-request", "503")], 503)),
            counters: None,
        },
        Setup {
            key: "ratelimit",
            label: "meshwasm ratelimit, one local rule, allowed",
            filters: envoy::wasm_filter("ratelimit", &ratelimit, RATELIMIT_ALLOW)?,
            must_fault: None,
            counters: Some(RATELIMIT_COUNTERS),
        },
        Setup {
            key: "ratelimit_tuned",
            label: "meshwasm ratelimit, one local rule, routeOverrides off",
            filters: envoy::wasm_filter("ratelimit", &ratelimit, RATELIMIT_ALLOW_NO_OVERRIDES)?,
            must_fault: None,
            counters: Some(RATELIMIT_COUNTERS),
        },
        Setup {
            key: "retry",
            label: "meshwasm retry, one rule, successful request",
            filters: envoy::wasm_filter("retry", &retry, RETRY_RULE)?,
            must_fault: None,
            counters: Some(RETRY_COUNTERS),
        },
        Setup {
            key: "retry_budget",
            label: "meshwasm retry, one rule with a budget, successful request",
            filters: envoy::wasm_filter("retry", &retry, RETRY_BUDGET)?,
            must_fault: None,
            counters: Some(RETRY_COUNTERS),
        },
        Setup {
            key: "telemetry",
            label: "meshwasm telemetry, client side: 25 labels, 4 metrics, peer exchange",
            filters: envoy::wasm_filter("telemetry", &telemetry, TELEMETRY_CLIENT)?,
            must_fault: None,
            counters: None,
        },
        Setup {
            key: "floor_telemetry",
            label: "hostcall floor of meshwasm telemetry: its hostcalls on that request, no work",
            filters: envoy::wasm_filter("floor", &floor, FLOOR_TELEMETRY)?,
            must_fault: None,
            counters: None,
        },
        Setup {
            key: "floor_authz",
            label: "hostcall floor of meshwasm authz: its hostcalls on that request, no work",
            filters: envoy::wasm_filter("floor", &floor, FLOOR_AUTHZ)?,
            must_fault: None,
            counters: None,
        },
        Setup {
            key: "authz",
            label: "meshwasm authz, ALLOW policy (methods, paths, a header), allowed",
            filters: envoy::wasm_filter("authz", &authz, AUTHZ_POLICY)?,
            // Without the header the policy does not match: the default deny proves it enforces.
            must_fault: Some(("/", &[], 403)),
            counters: Some(AUTHZ_COUNTERS),
        },
        Setup {
            key: "native_rbac",
            label: "Envoy native RBAC, istiod's translation of the same policy",
            filters: envoy::template("filters/native-rbac.yaml")?,
            must_fault: Some(("/", &[], 403)),
            counters: Some(NATIVE_RBAC_COUNTERS),
        },
        Setup {
            key: "native_local_ratelimit",
            label: "Envoy native local_ratelimit, allowed",
            filters: envoy::template("filters/native-local-ratelimit.yaml")?,
            must_fault: None,
            counters: Some(NATIVE_LOCAL_RATELIMIT_COUNTERS),
        },
    ])
}

/// What a configuration's requests carry beyond `BENCH_HEADER`, and what proves they were
/// exercised as intended (the JWT rows; empty for the others).
#[derive(Default)]
struct Load {
    /// Headers of the probe's `GET /` and of every wrk request.
    headers: Vec<(String, String)>,
    /// A wrk Lua script, and the files handed to it after `--`, one per wrk run in turn.
    script: Option<(PathBuf, Vec<PathBuf>)>,
    /// More probes: `GET /` with these headers must get this status.
    probes: Vec<(Vec<(String, String)>, u16)>,
    /// Counters that must cover every measured request.
    covers: Vec<&'static str>,
    /// Counters that must not move after the probes.
    still: Vec<&'static str>,
    /// wrk runs so far (picks the script's file).
    runs: Cell<usize>,
}

/// One wrk measurement.
#[derive(Clone, Copy, Default)]
struct Sample {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_req: f64,
    /// Share of its core the proxy used during the measurement (1.0 = saturated).
    proxy_util: f64,
    /// The upstream's CPU per request (it shares the load generator's core).
    upstream_cpu_us_per_req: f64,
    /// Share of the proxy's core used by other processes (the shared machine's noise).
    foreign: f64,
    requests: u64,
    bad: u64,
}

struct Running {
    setup: Setup,
    load: Load,
    /// `load.still`'s counters after the probes.
    still_before: Vec<u64>,
    envoy: Envoy,
    addr: SocketAddr,
    samples: Vec<Sample>,
    /// The rejected counter after the probes.
    rejected_before: u64,
}

pub fn run(opts: Options) -> Result<()> {
    let wrk = on_path("wrk").ok_or_else(|| crate::Error::msg("wrk is not on PATH (apt-get install wrk)"))?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let pinned = cores >= 2 && on_path("taskset").is_some();
    let (proxy_cpu, load_cpu) = if pinned { (Some("0"), Some("1")) } else { (None, None) };
    if !pinned {
        println!(
            "    warning: no pinning ({cores} core(s), taskset {}); numbers are noisier",
            if on_path("taskset").is_some() { "present" } else { "missing" }
        );
    }

    let modules = build::run()?;
    let mut all = setups()?;
    if let Some(only) = &opts.only {
        let keys: Vec<&str> = all.iter().map(|s| s.key).chain(jwt::KEYS).collect();
        if let Some(unknown) = only.iter().find(|k| !keys.contains(&k.as_str())) {
            bail!("--only: unknown configuration `{unknown}`; keys: {}", keys.join(" "));
        }
    }
    // The uncached JWT rows alternate two sets of more tokens than the cache holds, one set
    // per wrk run; that keeps every token out of the cache only at a sequential run's request
    // rate, not at the far lower rate each configuration gets in a concurrent one.
    let fresh = |key: &str| key.starts_with("authz_jwt_fresh");
    if opts.concurrent {
        println!("    note: --concurrent leaves out the uncached JWT rows (authz_jwt_fresh*): run them sequentially");
    }
    let keep = |key: &str| {
        !(opts.concurrent && fresh(key))
            && match &opts.only {
                Some(only) => {
                    matches!(key, "bare" | "noop" | "bare_token" | "noop_token") || only.iter().any(|k| k == key)
                }
                None => true,
            }
    };
    let (jwt_setups, mut loads) = jwt::setups(&keep)?;
    all.extend(jwt_setups);
    let envoy_bin = envoy::ensure()?;
    let envoy_version = output(Command::new(&envoy_bin).arg("--version"))?.trim().to_string();

    step("starting the upstream and one Envoy per configuration");
    let upstream = Envoy::start(
        &envoy_bin,
        Launch {
            name: "bench-upstream",
            config: &envoy::template("bench-upstream.yaml")?,
            concurrency: 1,
            cpus: load_cpu,
        },
    )?;
    let upstream_port = upstream.listener("upstream")?.port().to_string();
    println!("    upstream (direct_response Envoy) on 127.0.0.1:{upstream_port}, pid {}", upstream.proc.pid());

    let mut runs = Vec::new();
    for setup in all.into_iter().filter(|s| keep(s.key)) {
        let config = envoy::render_bootstrap(
            "bench.yaml",
            &[("HTTP_FILTERS", &setup.filters.repeat(opts.chain as usize)), ("UPSTREAM_PORT", &upstream_port)],
        )?;
        let name = format!("bench-{}", setup.key);
        let envoy = Envoy::start(&envoy_bin, Launch { name: &name, config: &config, concurrency: 1, cpus: proxy_cpu })?;
        let addr = envoy.listener("ingress")?;
        let load = loads.remove(setup.key).unwrap_or_default();
        probe(&setup, &load, &envoy, addr, opts.chain)?;
        // The probes may have been rejected on purpose: only later rejections invalidate.
        let rejected_before = match setup.counters {
            Some(c) => counter(&envoy, c.rejected)?.unwrap_or(0),
            None => 0,
        };
        let mut still_before = Vec::new();
        for c in &load.still {
            still_before.push(counter(&envoy, c)?.unwrap_or(0));
        }
        println!("    {:<22} {addr}  pid {}  ({})", setup.key, envoy.proc.pid(), setup.label);
        runs.push(Running { setup, load, still_before, envoy, addr, samples: Vec::new(), rejected_before });
    }

    let per_round = opts.warmup + opts.duration;
    step(format!(
        "measuring: {} rounds × {} configs × ({}s warm-up + {}s) ≈ {}s; wrk -t1 -c{} --latency",
        opts.rounds,
        runs.len(),
        opts.warmup,
        opts.duration,
        u64::from(opts.rounds) * runs.len() as u64 * per_round,
        opts.connections
    ));
    let tick = clock_ticks_per_sec();
    for round in 0..opts.rounds {
        if opts.concurrent {
            concurrent_round(&wrk, &mut runs, &upstream, &opts, round, (proxy_cpu, load_cpu), tick)?;
            continue;
        }
        let n = runs.len();
        for i in 0..n {
            // Rotate the order each round so no configuration always runs first or last.
            let idx = (i + round as usize) % n;
            let Some(r) = runs.get_mut(idx) else { continue };
            r.envoy.proc.check_alive()?;
            if opts.warmup > 0 {
                let w = wrk_run(&wrk, r.addr, opts.warmup, opts.connections, load_cpu, &r.load)?;
                if w.bad > 0 {
                    bail!(
                        "{}: {} requests failed or were not 2xx during the warm-up: the benchmark is invalid",
                        r.setup.key,
                        w.bad
                    );
                }
            }
            let (cpu0, up0, core0) =
                (cpu_ticks(r.envoy.proc.pid())?, cpu_ticks(upstream.proc.pid())?, core_ticks(proxy_cpu));
            let mut s = wrk_run(&wrk, r.addr, opts.duration, opts.connections, load_cpu, &r.load)?;
            let (cpu1, up1, core1) =
                (cpu_ticks(r.envoy.proc.pid())?, cpu_ticks(upstream.proc.pid())?, core_ticks(proxy_cpu));
            if let (Some((b0, t0)), Some((b1, t1))) = (core0, core1) {
                let busy = b1.saturating_sub(b0).saturating_sub(cpu1.saturating_sub(cpu0));
                s.foreign = busy as f64 / (t1.saturating_sub(t0)).max(1) as f64;
            }
            if s.requests > 0 {
                let secs = |ticks: u64| ticks as f64 / tick;
                s.cpu_us_per_req = secs(cpu1.saturating_sub(cpu0)) * 1e6 / s.requests as f64;
                s.upstream_cpu_us_per_req = secs(up1.saturating_sub(up0)) * 1e6 / s.requests as f64;
                s.proxy_util = secs(cpu1.saturating_sub(cpu0)) / opts.duration as f64;
            }
            let bad = if s.bad > 0 { format!("  ({} errors/non-2xx!)", s.bad) } else { String::new() };
            print_round(
                round,
                opts.rounds,
                r.setup.key,
                &s,
                &format!("upstream {:>4.1} µs/req{bad}", s.upstream_cpu_us_per_req),
            );
            if s.bad > 0 {
                bail!("{}: {} requests failed or were not 2xx: the benchmark is invalid", r.setup.key, s.bad);
            }
            r.samples.push(s);
        }
    }

    step("checking the rate limiters admitted every request");
    for r in &runs {
        check_counters(r)?;
    }

    let report = Report::new(&runs, &modules, &opts, &envoy_version, pinned);
    step("results");
    let md = report.markdown();
    println!("{md}");
    // Only a full, unamplified run replaces the published results.
    let dir =
        if opts.only.is_none() && opts.chain == 1 { root().join("bench") } else { envoy::scratch_dir()?.join("bench") };
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("results.md"), &md)?;
    std::fs::write(dir.join("results.json"), report.json())?;
    std::fs::write(dir.join("chart.svg"), report.svg())?;
    println!("wrote {}/results.md, results.json, chart.svg", dir.display());
    Ok(())
}

/// A normal request must pass (200); where the configuration injects faults, the triggering
/// request must be faulted; where it rate limits, the normal request must be counted as
/// admitted by the limiter. Otherwise we would benchmark the wrong thing.
fn probe(setup: &Setup, load: &Load, envoy: &Envoy, addr: SocketAddr, chain: u32) -> Result<()> {
    let before = match setup.counters {
        Some(c) => counter(envoy, c.admitted)?.unwrap_or(0),
        None => 0,
    };
    let headers = |extra: &[(String, String)]| -> Vec<(String, String)> {
        let mut h = vec![(BENCH_HEADER.0.to_string(), BENCH_HEADER.1.to_string())];
        h.extend(extra.iter().cloned());
        h
    };
    let normal = headers(&load.headers);
    let normal: Vec<(&str, &str)> = normal.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let rsp = http::get(addr, "/", &normal)?;
    if rsp.status != 200 {
        bail!("{}: GET / returned {} (expected 200): {}", setup.key, rsp.status, rsp.text());
    }
    if let Some(c) = setup.counters {
        let after = counter(envoy, c.admitted)?.unwrap_or(0);
        if after != before + u64::from(chain) {
            bail!(
                "{}: GET / moved {} from {before} to {after} (expected +{chain}): the filter is not in the path",
                setup.key,
                c.admitted
            );
        }
    }
    if let Some((path, headers, status)) = setup.must_fault {
        let rsp = http::get(addr, path, headers)?;
        if rsp.status != status {
            bail!(
                "{}: GET {path} {headers:?} returned {} (expected the fault {status}): the filter is not active",
                setup.key,
                rsp.status
            );
        }
    }
    for (extra, status) in &load.probes {
        let h = headers(extra);
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let rsp = http::get(addr, "/", &h)?;
        if rsp.status != *status {
            bail!(
                "{}: GET / {h:?} returned {} {} (expected {status}): the filter does not check what it should",
                setup.key,
                rsp.status,
                rsp.text()
            );
        }
    }
    Ok(())
}

/// After the run: a limiter that must admit everything rejected nothing, and counted at least
/// every request wrk measured (so every measured request really went through it).
fn check_counters(r: &Running) -> Result<()> {
    let Some(c) = r.setup.counters else { return Ok(()) };
    let rejected = counter(&r.envoy, c.rejected)?.unwrap_or(0).saturating_sub(r.rejected_before);
    let admitted = counter(&r.envoy, c.admitted)?.unwrap_or(0);
    let measured: u64 = r.samples.iter().map(|s| s.requests).sum();
    println!("    {:<22} {} = {admitted}, {} = {rejected}", r.setup.key, c.admitted, c.rejected);
    if rejected > 0 {
        bail!("{}: {} = {rejected}: the limiter rejected requests, the benchmark is invalid", r.setup.key, c.rejected);
    }
    if admitted < measured {
        bail!(
            "{}: {} = {admitted} but wrk measured {measured} requests: not every request went through the limiter",
            r.setup.key,
            c.admitted
        );
    }
    for name in &r.load.covers {
        let n = counter(&r.envoy, name)?.unwrap_or(0);
        println!("    {:<22} {name} = {n} (measured {measured})", r.setup.key);
        if n < measured {
            bail!("{}: {name} = {n} but wrk measured {measured} requests: the benchmark is invalid", r.setup.key);
        }
    }
    for (name, before) in r.load.still.iter().zip(&r.still_before) {
        let moved = counter(&r.envoy, name)?.unwrap_or(0).saturating_sub(*before);
        println!("    {:<22} {name} +{moved} after the probes", r.setup.key);
        if moved > 0 {
            bail!("{}: {name} moved by {moved} after the probes: the benchmark is invalid", r.setup.key);
        }
    }
    Ok(())
}

/// The value of counter `name` in admin `/stats` (`None` if Envoy has no such stat yet).
fn counter(envoy: &Envoy, name: &str) -> Result<Option<u64>> {
    // The filter is a regex: an unescaped `.` also matches itself, and the line must equal the name.
    let stats = envoy.admin_get(&format!("/stats?filter={name}"))?;
    for line in stats.lines() {
        if let Some((k, v)) = line.split_once(": ") {
            if k == name {
                return v.trim().parse().map(Some).context(format!("stat {name} = `{v}`"));
            }
        }
    }
    Ok(None)
}

// === wrk ===

fn wrk_run(
    wrk: &Path,
    addr: SocketAddr,
    secs: u64,
    connections: u32,
    cpus: Option<&str>,
    load: &Load,
) -> Result<Sample> {
    let out = output(&mut wrk_command(wrk, addr, secs, connections, cpus, load))?;
    parse_wrk(&out).context(format!("parsing wrk output:\n{out}"))
}

/// One measurement's progress line.
fn print_round(round: u32, rounds: u32, key: &str, s: &Sample, tail: &str) {
    println!(
        "    round {}/{rounds}  {key:<22} {:>7.0} req/s  p50 {:>6.3} ms  p99 {:>6.3} ms  proxy cpu {:>5.1} µs/req ({:>3.0}% of core; others {:>2.0}%)  {tail}",
        round + 1,
        s.rps,
        s.p50_ms,
        s.p99_ms,
        s.cpu_us_per_req,
        s.proxy_util * 100.0,
        s.foreign * 100.0,
    );
}

/// One configuration's measurement of a concurrent round: every wrk at once.
fn concurrent_round(
    wrk: &Path,
    runs: &mut [Running],
    upstream: &Envoy,
    opts: &Options,
    round: u32,
    (proxy_cpu, load_cpu): (Option<&str>, Option<&str>),
    tick: f64,
) -> Result<()> {
    for r in runs.iter_mut() {
        r.envoy.proc.check_alive()?;
    }
    let all_at_once = |runs: &[Running], secs: u64| -> Result<Vec<Sample>> {
        let mut children = Vec::new();
        for r in runs {
            let mut cmd = wrk_command(wrk, r.addr, secs, opts.connections, load_cpu, &r.load);
            cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
            children.push(cmd.spawn().context("starting wrk")?);
        }
        let mut samples = Vec::new();
        for (child, r) in children.into_iter().zip(runs) {
            let out = child.wait_with_output().context("waiting for wrk")?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let s = parse_wrk(&text).context(format!("{}: parsing wrk output:\n{text}", r.setup.key))?;
            if s.bad > 0 {
                bail!("{}: {} requests failed or were not 2xx: the benchmark is invalid", r.setup.key, s.bad);
            }
            samples.push(s);
        }
        Ok(samples)
    };
    if opts.warmup > 0 {
        all_at_once(runs, opts.warmup)?;
    }
    let before: Vec<u64> = runs.iter().map(|r| cpu_ticks(r.envoy.proc.pid())).collect::<Result<_>>()?;
    let (up0, core0) = (cpu_ticks(upstream.proc.pid())?, core_ticks(proxy_cpu));
    let samples = all_at_once(runs, opts.duration)?;
    let after: Vec<u64> = runs.iter().map(|r| cpu_ticks(r.envoy.proc.pid())).collect::<Result<_>>()?;
    let (up1, core1) = (cpu_ticks(upstream.proc.pid())?, core_ticks(proxy_cpu));
    let proxies: u64 = before.iter().zip(&after).map(|(a, b)| b.saturating_sub(*a)).sum();
    let foreign = match (core0, core1) {
        (Some((b0, t0)), Some((b1, t1))) => {
            b1.saturating_sub(b0).saturating_sub(proxies) as f64 / t1.saturating_sub(t0).max(1) as f64
        }
        _ => 0.0,
    };
    let total_requests: u64 = samples.iter().map(|s| s.requests).sum();
    for ((r, mut s), (c0, c1)) in runs.iter_mut().zip(samples).zip(before.into_iter().zip(after)) {
        let secs = |ticks: u64| ticks as f64 / tick;
        if s.requests > 0 {
            s.cpu_us_per_req = secs(c1.saturating_sub(c0)) * 1e6 / s.requests as f64;
            // The upstream served every configuration: its CPU is shared by all requests.
            s.upstream_cpu_us_per_req = secs(up1.saturating_sub(up0)) * 1e6 / total_requests.max(1) as f64;
            s.proxy_util = secs(c1.saturating_sub(c0)) / opts.duration as f64;
        }
        s.foreign = foreign;
        print_round(round, opts.rounds, r.setup.key, &s, "(concurrent)");
        r.samples.push(s);
    }
    Ok(())
}

fn wrk_command(wrk: &Path, addr: SocketAddr, secs: u64, connections: u32, cpus: Option<&str>, load: &Load) -> Command {
    let mut cmd = match (cpus, on_path("taskset")) {
        (Some(c), Some(taskset)) => {
            let mut cmd = Command::new(taskset);
            cmd.args(["-c", c]).arg(wrk);
            cmd
        }
        _ => Command::new(wrk),
    };
    cmd.args(["-t1", &format!("-c{connections}"), &format!("-d{secs}s"), "--latency"])
        .arg("-H")
        .arg(format!("{}: {}", BENCH_HEADER.0, BENCH_HEADER.1));
    for (k, v) in &load.headers {
        if load.script.is_none() {
            cmd.arg("-H").arg(format!("{k}: {v}"));
        }
    }
    if let Some((script, _)) = &load.script {
        cmd.arg("-s").arg(script);
    }
    cmd.arg(format!("http://{addr}/"));
    if let Some((_, files)) = &load.script {
        let n = load.runs.get();
        load.runs.set(n + 1);
        if let Some(f) = files.get(n % files.len().max(1)) {
            cmd.arg("--").arg(f);
        }
    }
    cmd
}

fn parse_wrk(out: &str) -> Result<Sample> {
    let mut s = Sample::default();
    let (mut p50, mut p99) = (None, None);
    for line in out.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => s.rps = v.parse().context("Requests/sec")?,
            ["50%", v] => p50 = Some(parse_latency_ms(v)?),
            ["99%", v] => p99 = Some(parse_latency_ms(v)?),
            [n, "requests", "in", ..] => s.requests = n.parse().context("requests")?,
            ["Non-2xx", "or", "3xx", "responses:", n] => s.bad += n.parse::<u64>().context("non-2xx")?,
            ["Socket", "errors:", rest @ ..] => {
                s.bad += rest.iter().filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok()).sum::<u64>();
            }
            _ => {}
        }
    }
    match (p50, p99) {
        (Some(p50), Some(p99)) if s.rps > 0.0 => {
            s.p50_ms = p50;
            s.p99_ms = p99;
            Ok(s)
        }
        _ => bail!("no Requests/sec or latency distribution"),
    }
}

fn parse_latency_ms(v: &str) -> Result<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e3)
    } else {
        bail!("latency `{v}` has no unit")
    };
    Ok(num.parse::<f64>().context(format!("latency `{v}`"))? * scale)
}

// === CPU accounting ===

/// utime + stime of `pid` (all threads), in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).context("reading /proc/<pid>/stat")?;
    // Fields after the parenthesised command name: state is #3, utime #14, stime #15.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
    let fields: Vec<u64> = after.split_whitespace().skip(1).map(|f| f.parse().unwrap_or(0)).collect();
    match (fields.get(10), fields.get(11)) {
        (Some(u), Some(s)) => Ok(u + s),
        _ => bail!("unexpected /proc/{pid}/stat format"),
    }
}

/// (busy, total) jiffies of one core from /proc/stat, if pinned to a single core.
fn core_ticks(cpu: Option<&str>) -> Option<(u64, u64)> {
    let label = format!("cpu{}", cpu?);
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.split_whitespace().next() == Some(label.as_str()))?;
    let f: Vec<u64> = line.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0)).collect();
    let get = |i: usize| f.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    Some((busy, busy + get(3) + get(4)))
}

fn clock_ticks_per_sec() -> f64 {
    output(Command::new("getconf").arg("CLK_TCK")).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(100.0)
}

// === Report ===

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v.get(n / 2).copied().unwrap_or(f64::NAN),
        n => (v.get(n / 2 - 1).copied().unwrap_or(f64::NAN) + v.get(n / 2).copied().unwrap_or(f64::NAN)) / 2.0,
    }
}

struct Row {
    key: &'static str,
    label: &'static str,
    med: Sample,
    /// The least-disturbed measurement: the lowest CPU µs/request over the rounds.
    /// Interference (other processes, cache pollution, less batching) only ever adds CPU
    /// time per request, so the minimum is the best estimate of intrinsic cost.
    best_cpu: f64,
    samples: Vec<Sample>,
}

struct Report {
    rows: Vec<Row>,
    modules: Vec<(&'static str, u64)>,
    header: Vec<(&'static str, String)>,
    /// `--concurrent`: the verdict is the median of the per-round ratios.
    concurrent: bool,
}

/// Overhead ratios of one configuration against the no-op module (both relative to bare).
struct Ratios {
    /// By best-of-rounds CPU µs/request: the verdict.
    best_cpu: f64,
    rps: f64,
    p50: f64,
    cpu: f64,
}

impl Report {
    fn new(runs: &[Running], modules: &[Module], opts: &Options, envoy_version: &str, pinned: bool) -> Report {
        let rows = runs
            .iter()
            .map(|r| {
                let m = |f: fn(&Sample) -> f64| median(r.samples.iter().map(f).collect());
                Row {
                    key: r.setup.key,
                    label: r.setup.label,
                    med: Sample {
                        rps: m(|s| s.rps),
                        p50_ms: m(|s| s.p50_ms),
                        p99_ms: m(|s| s.p99_ms),
                        cpu_us_per_req: m(|s| s.cpu_us_per_req),
                        proxy_util: m(|s| s.proxy_util),
                        upstream_cpu_us_per_req: m(|s| s.upstream_cpu_us_per_req),
                        foreign: m(|s| s.foreign),
                        requests: r.samples.iter().map(|s| s.requests).sum(),
                        bad: 0,
                    },
                    best_cpu: r.samples.iter().map(|s| s.cpu_us_per_req).fold(f64::INFINITY, f64::min),
                    samples: r.samples.clone(),
                }
            })
            .collect();
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let git = output(Command::new("git").current_dir(root()).args(["rev-parse", "--short", "HEAD"]))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let date = output(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let header = vec![
            ("date", date),
            ("git", git),
            ("envoy", envoy_version.to_string()),
            (
                "cpu",
                format!("{cpu_model} ({} cores)", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
            ),
            (
                "pinning",
                if pinned {
                    "proxy under test: taskset -c 0, --concurrency 1; wrk -t1 and upstream Envoy (direct_response): taskset -c 1".into()
                } else {
                    "none (fewer than 2 cores or no taskset)".into()
                },
            ),
            (
                "load",
                if opts.concurrent {
                    format!(
                        "wrk -t1 -c{} --latency, GET /, one per config, all configs at once (--concurrent); {} rounds of {}s warm-up + {}s measured; medians",
                        opts.connections, opts.rounds, opts.warmup, opts.duration
                    )
                } else {
                    format!(
                        "wrk -t1 -c{} --latency, GET /; {} rounds (order rotated) of {}s warm-up + {}s measured per config; medians",
                        opts.connections, opts.rounds, opts.warmup, opts.duration
                    )
                },
            ),
        ];
        Report {
            rows,
            modules: modules.iter().map(|m| (m.name, m.size)).collect(),
            header,
            concurrent: opts.concurrent,
        }
    }

    fn row(&self, key: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.key == key)
    }

    /// (cfg − bare) / (noop − bare) for 1/rps, p50 and CPU/request.
    /// The reference rows of `key`: bare and no-op under the same requests (the JWT rows'
    /// carry a token, and so do `bare_token` and `noop_token`).
    fn refs(&self, key: &str) -> (&'static str, &'static str) {
        let jwt = key.starts_with("authz_jwt") || key == "native_jwt" || key == "floor_jwt";
        if jwt && self.row("bare_token").is_some() && self.row("noop_token").is_some() {
            ("bare_token", "noop_token")
        } else {
            ("bare", "noop")
        }
    }

    fn ratios(&self, key: &str) -> Option<Ratios> {
        let (b, n) = self.refs(key);
        let (bare, noop, cfg) = (self.row(b)?, self.row(n)?, self.row(key)?);
        let r = |f: fn(&Sample) -> f64| (f(&cfg.med) - f(&bare.med)) / (f(&noop.med) - f(&bare.med));
        Some(Ratios {
            best_cpu: (cfg.best_cpu - bare.best_cpu) / (noop.best_cpu - bare.best_cpu),
            rps: r(|s| 1.0 / s.rps),
            p50: r(|s| s.p50_ms),
            cpu: r(|s| s.cpu_us_per_req),
        })
    }

    /// The CPU-per-request ratio computed within each round (the three configurations ran
    /// a minute apart at most, so slow drifts in machine load partly cancel).
    fn round_ratios(&self, key: &str) -> Vec<f64> {
        let (b, n) = self.refs(key);
        let (Some(bare), Some(noop), Some(cfg)) = (self.row(b), self.row(n), self.row(key)) else {
            return Vec::new();
        };
        bare.samples
            .iter()
            .zip(&noop.samples)
            .zip(&cfg.samples)
            .map(|((b, n), c)| (c.cpu_us_per_req - b.cpu_us_per_req) / (n.cpu_us_per_req - b.cpu_us_per_req))
            .collect()
    }

    fn overhead_us(&self, key: &str) -> f64 {
        match (self.row(self.refs(key).0), self.row(key)) {
            (Some(b), Some(c)) => (1.0 / c.med.rps - 1.0 / b.med.rps) * 1e6,
            _ => f64::NAN,
        }
    }

    fn markdown(&self) -> String {
        let mut md = String::from("# meshwasm benchmark: fault and ratelimit filters vs no-op wasm vs native\n\n");
        md.push_str("Generated by `cargo xtask bench`. Overhead = per-request cost above bare Envoy; ");
        md.push_str(&format!(
            "**ratio = overhead(filter) / overhead(no-op wasm)**, target ≤ {TARGET_RATIO} for the fault filter and \
             for the rate limiter (limiter overhead over bare Envoy within {TARGET_RATIO}× the no-op module's; \
             measured on an allowed request through one local rule).\n\n"
        ));
        md.push_str(
            "The primary measure is the proxy's own CPU time per request, best of rounds (utime+stime of the pinned \
             Envoy over the measured window, from /proc, divided by wrk's request count). 1/rps \
             estimates the same thing only while the proxy saturates its core and nothing else \
             runs there; on a shared machine neither holds (see the `core busy` and `other \
             processes` columns), so the 1/rps and p50 ratios are shown but not used for the \
             verdict. Best of rounds, because interference only ever adds CPU time per request: \
             the least-disturbed round is the closest to the intrinsic cost (medians and \
             per-round ratios are shown beside it).\n\n",
        );
        if self.concurrent {
            md.push_str(
                "**This run is `--concurrent`:** in each round every configuration is loaded at the same \
                 time (every proxy pinned to the proxy core, one wrk each on the load core), so all of them \
                 see the same machine at the same moment. The verdict is then the **median of the \
                 per-round ratios** (first column): each round's ratio compares measurements taken \
                 together, which cancels a machine whose speed drifts; absolute CPU per request is higher \
                 than in a sequential run (the proxies share caches and the core).\n\n",
            );
        }
        let primary_name = if self.concurrent { "median of per-round ratios" } else { "best of rounds" };
        md.push_str("## Headline\n\n");
        let _ = write!(md, "| configuration | **ratio: CPU µs/req, {primary_name}** |");
        md.push_str(" ratio: CPU µs/req, medians | per-round ratios (CPU) | ratio: 1/rps, medians | ratio: p50, medians | target | verdict |\n|---|---:|---:|---|---:|---:|---:|---|\n");
        for &key in HEADLINE {
            if let (Some(row), Some(r)) = (self.row(key), self.ratios(key)) {
                let per_round = self.round_ratios(key);
                let primary = if self.concurrent { median(per_round.clone()) } else { r.best_cpu };
                let verdict = if is_floor(key) {
                    if primary > target_ratio(key) {
                        format!("floor above the {}× target: out of reach", target_ratio(key))
                    } else {
                        "floor within target".to_string()
                    }
                } else if is_reference(key) {
                    "(reference)".to_string()
                } else if primary <= target_ratio(key) {
                    "meets target".to_string()
                } else {
                    "ABOVE target".to_string()
                };
                let rounds: Vec<String> = per_round.iter().map(|x| format!("{x:.2}")).collect();
                let _ = writeln!(
                    md,
                    "| {} | **{:.2}** | {:.2} | {} | {:.2} | {:.2} | {} | {verdict} |",
                    row.label,
                    primary,
                    r.cpu,
                    rounds.join(", "),
                    r.rps,
                    r.p50,
                    target_ratio(key)
                );
            }
        }
        md.push_str("\n## Per configuration (medians)\n\n| configuration | req/s | vs bare | overhead µs/req (1/rps) | p50 ms | p99 ms | Envoy CPU µs/req | CPU µs/req, best round | Envoy core busy | other processes on that core |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        let bare_rps = self.row("bare").map(|r| r.med.rps).unwrap_or(f64::NAN);
        for r in &self.rows {
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.3} | {:.2} | {:.3} | {:.3} | {:.1} | {:.1} | {:.0}% | {:.0}% |",
                r.label,
                r.med.rps,
                r.med.rps / bare_rps,
                self.overhead_us(r.key),
                r.med.p50_ms,
                r.med.p99_ms,
                r.med.cpu_us_per_req,
                r.best_cpu,
                r.med.proxy_util * 100.0,
                r.med.foreign * 100.0
            );
        }
        if let Some(cached) = self.row("authz_jwt") {
            let fresh: Vec<&Row> = self.rows.iter().filter(|r| r.key.starts_with("authz_jwt_fresh")).collect();
            if !fresh.is_empty() {
                md.push_str("\n## JWT: signature verification per request (uncached − cached, Envoy CPU µs/req, best of rounds)\n\n| configuration | CPU µs/req | − cached token |\n|---|---:|---:|\n");
                for r in fresh {
                    let _ = writeln!(md, "| {} | {:.1} | {:.1} |", r.label, r.best_cpu, r.best_cpu - cached.best_cpu);
                }
            }
        }
        md.push_str("\n## Rounds (req/s)\n\n| configuration |");
        let rounds = self.rows.first().map(|r| r.samples.len()).unwrap_or(0);
        for i in 1..=rounds {
            let _ = write!(md, " round {i} |");
        }
        md.push_str("\n|---|");
        md.push_str(&"---:|".repeat(rounds));
        md.push('\n');
        for r in &self.rows {
            let _ = write!(md, "| {} |", r.key);
            for s in &r.samples {
                let _ = write!(md, " {:.0} |", s.rps);
            }
            md.push('\n');
        }
        md.push_str("\n## Modules\n\n| module | bytes | KiB |\n|---|---:|---:|\n");
        for (name, size) in &self.modules {
            let _ = writeln!(md, "| dist/{name}.wasm | {size} | {:.1} |", *size as f64 / 1024.0);
        }
        md.push_str("\n## Setup\n\n");
        for (k, v) in &self.header {
            let _ = writeln!(md, "- {k}: {v}");
        }
        md.push_str("- fault_rules plugin config: `");
        md.push_str(FAULT_NO_MATCH);
        md.push_str("`\n- fault_rules_tuned plugin config: `");
        md.push_str(FAULT_NO_MATCH_NO_OVERRIDES);
        md.push_str("`\n- fault_headers plugin config: `");
        md.push_str(FAULT_HEADERS);
        md.push_str("`\n- native fault: envoy-configs/filters/native-fault.yaml (header_abort + header_delay, 100%)\n");
        md.push_str("- ratelimit plugin config: `");
        md.push_str(RATELIMIT_ALLOW);
        md.push_str("`\n- ratelimit_tuned plugin config: `");
        md.push_str(RATELIMIT_ALLOW_NO_OVERRIDES);
        md.push_str("`\n- retry plugin config: `");
        md.push_str(RETRY_RULE);
        md.push_str("`\n- retry_budget plugin config: `");
        md.push_str(RETRY_BUDGET);
        md.push_str("`\n- native local_ratelimit: envoy-configs/filters/native-local-ratelimit.yaml (the same bucket, filter_enabled and filter_enforced 100%)\n");
        md.push_str("- telemetry plugin config: `");
        md.push_str(TELEMETRY_CLIENT);
        md.push_str("` (target ratio 2×)\n");
        md.push_str("- floor_telemetry (filters/floor) config: `");
        md.push_str(FLOOR_TELEMETRY);
        md.push_str("`\n- floor_authz (filters/floor) config: `");
        md.push_str(FLOOR_AUTHZ);
        md.push_str("`\n");
        md.push_str("- authz plugin config: `");
        md.push_str(AUTHZ_POLICY);
        md.push_str("`; every request carries `x-bench-client: wrk`\n");
        md.push_str(
            "- native RBAC: envoy-configs/filters/native-rbac.yaml (istiod's translation of the same policy)\n",
        );
        if self.rows.iter().any(|r| jwt::KEYS.contains(&r.key)) {
            md.push_str(&jwt::describe());
        }
        md.push_str("- every configuration was probed before measuring: GET / → 200, and the faulting request → 503 where a fault filter is configured (authz and RBAC: GET / without the header → 403); where a limiter or authorizer is configured, GET / must add one to its `ok`/`allowed` counter\n");
        md.push_str("- every wrk run (warm-ups included) saw only 2xx responses, and each limiter's `rate_limited` (authorizer's `denied`) counter did not move after the probes, with its `ok` (`allowed`) counter covering every measured request\n");
        md.push_str("\nA ratio's denominator (no-op overhead) is small, so ratios are noisy: read them with the rounds table.\n");
        md.push_str("\n![chart](chart.svg)\n");
        md
    }

    fn json(&self) -> String {
        let mut j = String::from("{\n");
        for (k, v) in &self.header {
            let _ = writeln!(j, "  {}: {},", json::string(k), json::string(v));
        }
        let _ = writeln!(j, "  \"target_ratio\": {},", json::number(TARGET_RATIO));
        j.push_str("  \"modules\": {");
        let mods: Vec<String> =
            self.modules.iter().map(|(n, s)| format!("{}: {s}", json::string(&format!("{n}.wasm")))).collect();
        j.push_str(&mods.join(", "));
        j.push_str("},\n  \"headline\": {\n");
        let heads: Vec<String> = HEADLINE
            .iter()
            .filter_map(|k| {
                self.ratios(k).map(|r| {
                    format!(
                        "    {}: {{\"ratio_cpu_best\": {}, \"ratio_rps\": {}, \"ratio_p50\": {}, \"ratio_cpu\": {}, \"ratio_cpu_per_round\": [{}], \"meets_target\": {}, \"reference\": {}}}",
                        json::string(k),
                        json::number(r.best_cpu),
                        json::number(r.rps),
                        json::number(r.p50),
                        json::number(r.cpu),
                        self.round_ratios(k).iter().map(|x| json::number(*x)).collect::<Vec<_>>().join(", "),
                        r.best_cpu <= target_ratio(k),
                        is_reference(k)
                    )
                })
            })
            .collect();
        j.push_str(&heads.join(",\n"));
        j.push_str("\n  },\n  \"configs\": [\n");
        let bare_rps = self.row("bare").map(|r| r.med.rps).unwrap_or(f64::NAN);
        let rows: Vec<String> = self
            .rows
            .iter()
            .map(|r| {
                let samples: Vec<String> = r
                    .samples
                    .iter()
                    .map(|s| {
                        format!(
                            "{{\"rps\": {}, \"p50_ms\": {}, \"p99_ms\": {}, \"cpu_us_per_req\": {}, \"proxy_core_busy\": {}, \"foreign_core_busy\": {}, \"upstream_cpu_us_per_req\": {}, \"requests\": {}}}",
                            json::number(s.rps),
                            json::number(s.p50_ms),
                            json::number(s.p99_ms),
                            json::number(s.cpu_us_per_req),
                            json::number(s.proxy_util),
                            json::number(s.foreign),
                            json::number(s.upstream_cpu_us_per_req),
                            s.requests
                        )
                    })
                    .collect();
                format!(
                    "    {{\"key\": {}, \"label\": {}, \"rps\": {}, \"rps_vs_bare\": {}, \"overhead_us_per_req\": {}, \"p50_ms\": {}, \"p99_ms\": {}, \"cpu_us_per_req\": {}, \"cpu_us_per_req_best\": {},\n     \"rounds\": [{}]}}",
                    json::string(r.key),
                    json::string(r.label),
                    json::number(r.med.rps),
                    json::number(r.med.rps / bare_rps),
                    json::number(self.overhead_us(r.key)),
                    json::number(r.med.p50_ms),
                    json::number(r.med.p99_ms),
                    json::number(r.med.cpu_us_per_req),
                    json::number(r.best_cpu),
                    samples.join(", ")
                )
            })
            .collect();
        j.push_str(&rows.join(",\n"));
        j.push_str("\n  ]\n}\n");
        j
    }

    /// Three horizontal bar panels: req/s, per-request overhead above bare, latency p50/p99.
    fn svg(&self) -> String {
        const W: f64 = 980.0;
        const LABEL_W: f64 = 300.0;
        const BAR_H: f64 = 22.0;
        const GAP: f64 = 8.0;
        let color = |key: &str| match key {
            "bare" => "#9e9e9e",
            "noop" => "#64b5f6",
            "fault_rules" => "#1e88e5",
            "fault_rules_tuned" => "#42a5f5",
            "fault_headers" => "#0d47a1",
            "noop_sdk" => "#90caf9",
            "ratelimit" => "#2e7d32",
            "ratelimit_tuned" => "#66bb6a",
            "telemetry" => "#6a1b9a",
            "authz" => "#00897b",
            "native_rbac" => "#d84315",
            "native_local_ratelimit" => "#bf360c",
            "retry" => "#8e24aa",
            "retry_budget" => "#ba68c8",
            _ => "#ef6c00",
        };
        let n = self.rows.len() as f64;
        let panel_h = 40.0 + n * (BAR_H + GAP) + 10.0;
        let latency_h = 40.0 + n * (2.0 * BAR_H / 1.5 + GAP) + 10.0;
        let h = 60.0 + 2.0 * panel_h + latency_h + 30.0;
        let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="Helvetica, Arial, sans-serif" font-size="13">"#
        );
        let _ = writeln!(s, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
        let parts: Vec<String> = [("fault", "fault_rules"), ("ratelimit", "ratelimit")]
            .iter()
            .filter_map(|(name, key)| self.ratios(key).map(|r| format!("{name} {:.2}×", r.best_cpu)))
            .collect();
        let title = if parts.is_empty() {
            "meshwasm benchmark".to_string()
        } else {
            format!("meshwasm CPU overhead vs the no-op module's: {} (target ≤ {TARGET_RATIO}×)", parts.join(", "))
        };
        let _ = writeln!(s, r#"<text x="20" y="30" font-size="18" font-weight="bold">{}</text>"#, esc(&title));
        let sub = self.header.iter().find(|(k, _)| *k == "load").map(|(_, v)| v.clone()).unwrap_or_default();
        let _ = writeln!(s, r##"<text x="20" y="48" font-size="11" fill="#555">{}</text>"##, esc(&sub));

        let mut y = 60.0;
        let bar_max = W - LABEL_W - 190.0;
        // Panel 1: the proxy's CPU per request: the headline measure.
        let max_cpu = self.rows.iter().map(|r| r.best_cpu).fold(0.0, f64::max);
        let bare_cpu = self.row("bare").map(|r| r.best_cpu).unwrap_or(f64::NAN);
        let _ = writeln!(
            s,
            r#"<text x="20" y="{}" font-weight="bold">Envoy CPU per request, µs, best of rounds (lower is better; ratio = overhead above bare ÷ no-op's)</text>"#,
            y + 24.0
        );
        y += 36.0;
        for r in &self.rows {
            let w = if max_cpu > 0.0 { r.best_cpu / max_cpu * bar_max } else { 0.0 };
            let color = color(r.key);
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                LABEL_W - 10.0,
                y + 16.0,
                esc(r.label)
            );
            let _ = writeln!(s, r#"<rect x="{LABEL_W}" y="{y}" width="{w:.1}" height="{BAR_H}" fill="{color}"/>"#);
            let extra = match (r.key, self.ratios(r.key)) {
                ("bare", _) | (_, None) => String::new(),
                ("noop", _) => format!("  +{:.1}", r.best_cpu - bare_cpu),
                (_, Some(q)) => format!("  +{:.1}  ({:.2}× no-op)", r.best_cpu - bare_cpu, q.best_cpu),
            };
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}">{:.1}{}</text>"#,
                LABEL_W + w + 6.0,
                y + 16.0,
                r.best_cpu,
                esc(&extra)
            );
            y += BAR_H + GAP;
        }
        // Panel 2: throughput.
        y += 10.0;
        let max_rps = self.rows.iter().map(|r| r.med.rps).fold(0.0, f64::max);
        let bare_rps = self.row("bare").map(|r| r.med.rps).unwrap_or(f64::NAN);
        let _ = writeln!(
            s,
            r#"<text x="20" y="{}" font-weight="bold">Throughput, req/s (higher is better; one pinned core, shared machine)</text>"#,
            y + 24.0
        );
        y += 36.0;
        for r in &self.rows {
            let w = if max_rps > 0.0 { r.med.rps / max_rps * bar_max } else { 0.0 };
            let color = color(r.key);
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                LABEL_W - 10.0,
                y + 16.0,
                esc(r.label)
            );
            let _ = writeln!(s, r#"<rect x="{LABEL_W}" y="{y}" width="{w:.1}" height="{BAR_H}" fill="{color}"/>"#);
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}">{:.0} ({:.1}%)</text>"#,
                LABEL_W + w + 6.0,
                y + 16.0,
                r.med.rps,
                r.med.rps / bare_rps * 100.0
            );
            y += BAR_H + GAP;
        }
        // Panel 3: latency.
        y += 10.0;
        let max_l = self.rows.iter().map(|r| r.med.p99_ms).fold(0.0, f64::max);
        let _ = writeln!(
            s,
            r#"<text x="20" y="{}" font-weight="bold">Latency at saturation, ms (p50 solid, p99 light; lower is better)</text>"#,
            y + 24.0
        );
        y += 36.0;
        let half = BAR_H / 1.5;
        for r in &self.rows {
            let color = color(r.key);
            let w50 = if max_l > 0.0 { r.med.p50_ms / max_l * bar_max } else { 0.0 };
            let w99 = if max_l > 0.0 { r.med.p99_ms / max_l * bar_max } else { 0.0 };
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                LABEL_W - 10.0,
                y + half + 4.0,
                esc(r.label)
            );
            let _ = writeln!(s, r#"<rect x="{LABEL_W}" y="{y}" width="{w50:.1}" height="{half:.1}" fill="{color}"/>"#);
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" font-size="11">p50 {:.3}</text>"#,
                LABEL_W + w50 + 6.0,
                y + half - 3.0,
                r.med.p50_ms
            );
            let _ = writeln!(
                s,
                r#"<rect x="{LABEL_W}" y="{:.1}" width="{w99:.1}" height="{half:.1}" fill="{color}" fill-opacity="0.45"/>"#,
                y + half
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" font-size="11">p99 {:.3}</text>"#,
                LABEL_W + w99 + 6.0,
                y + 2.0 * half - 3.0,
                r.med.p99_ms
            );
            y += 2.0 * half + GAP;
        }
        let mods: Vec<String> =
            self.modules.iter().map(|(n, b)| format!("{n}.wasm {:.1} KiB", *b as f64 / 1024.0)).collect();
        let _ = writeln!(
            s,
            r##"<text x="20" y="{:.1}" font-size="11" fill="#555">{}</text>"##,
            y + 20.0,
            esc(&format!("modules: {}", mods.join(", ")))
        );
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const WRK: &str = "Running 10s test @ http://127.0.0.1:40000/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   508.67us  123.45us   5.00ms   90.00%
    Req/Sec    31.50k     1.23k   33.00k    80.00%
  Latency Distribution
     50%  489.00us
     75%  540.00us
     90%  600.00us
     99%    1.20ms
  315000 requests in 10.00s, 40.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:  31500.00
Transfer/sec:      4.00MB
";

    #[test]
    fn parses_wrk_output() {
        let s = parse_wrk(WRK).unwrap();
        assert_eq!(s.rps, 31500.0);
        assert!((s.p50_ms - 0.489).abs() < 1e-9);
        assert!((s.p99_ms - 1.2).abs() < 1e-9);
        assert_eq!(s.requests, 315000);
        assert_eq!(s.bad, 8);
        assert!(parse_wrk("nothing").is_err());
        assert_eq!(parse_latency_ms("2.5s").unwrap(), 2500.0);
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }
}
