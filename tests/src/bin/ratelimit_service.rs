//! `meshwasm-ratelimit-service --listen 127.0.0.1:PORT [--redis 127.0.0.1:6379 | --memory] --config FILE.json`:
//! the test rate-limit service as a standalone server (for the demo and by hand). Speaks
//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` over h2c and counts in
//! the given Redis, or in its own memory without `--redis` (or with `--memory`). Prints
//! `listening on <addr>` once it accepts.
//!
//! The config file holds one domain's configuration or an array of them, e.g.
//! `{"domain": "meshwasm", "limits": [{"entries": [{"key": "client"}], "requestsPerUnit": 3,
//! "unit": "minute"}], "rateLimitHeaders": true}`. See `meshwasm_tests::ratelimit_service`
//! for the semantics.

use std::net::SocketAddr;

use meshwasm_tests::ServiceConfig;

fn main() {
    let mut listen: SocketAddr = "127.0.0.1:8081".parse().expect("default addr");
    let mut redis: Option<SocketAddr> = None;
    let mut memory = false;
    let mut config: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                let v = args.next().unwrap_or_else(|| usage("--listen needs an address"));
                listen = v.parse().unwrap_or_else(|e| usage(&format!("bad --listen {v}: {e}")));
            }
            "--redis" => {
                let v = args.next().unwrap_or_else(|| usage("--redis needs an address"));
                redis = Some(v.parse().unwrap_or_else(|e| usage(&format!("bad --redis {v}: {e}"))));
            }
            "--memory" => memory = true,
            "--config" => config = Some(args.next().unwrap_or_else(|| usage("--config needs a file"))),
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if memory && redis.is_some() {
        usage("--memory and --redis exclude each other");
    }
    let path = config.unwrap_or_else(|| usage("--config is required"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| fail(&format!("read {path}: {e}")));
    let configs = ServiceConfig::from_json(&text).unwrap_or_else(|e| fail(&format!("{path}: {e}")));

    meshwasm_tests::server::serve_main("meshwasm-ratelimit-service", listen, 1, |listener| {
        meshwasm_tests::ratelimit_service::serve(listener, redis, configs)
    });
}

fn fail(err: &str) -> ! {
    eprintln!("meshwasm-ratelimit-service: {err}");
    std::process::exit(1)
}

fn usage(err: &str) -> ! {
    if !err.is_empty() {
        eprintln!("meshwasm-ratelimit-service: {err}");
    }
    eprintln!("usage: meshwasm-ratelimit-service --listen 127.0.0.1:PORT [--redis 127.0.0.1:6379 | --memory] --config FILE.json");
    std::process::exit(if err.is_empty() { 0 } else { 2 })
}
