//! Retry budgets through a real Envoy at `--concurrency 2`: at a sustained 50 % failure rate,
//! the retries the upstream sees stay within retryRatio × requests + minRetriesPerSecond × ttl
//! across both workers (the budget lives in shared data), and the budget recovers when
//! failures stop.

use std::time::Duration;

use meshwasm_tests::{eventually, fire, Envoy, Filter, Listener, Request, Route, Upstream};
use serde_json::json;

fn carrier() -> String {
    let path = meshwasm_tests::workspace_root().join("envoy-configs/retry-carrier.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn stat(envoy: &Envoy, s: &str) -> u64 {
    envoy.stat_or_zero(&format!("wasmcustom.meshwasm.retry.rule.budgeted.{s}"))
}

#[test]
fn budget_bounds_retries_across_workers_and_recovers() {
    let up = Upstream::start();
    // 20 % of requests plus 1/s × 10 s = 10 always; 3 retries per request on 5xx.
    let config = json!({"rules": [{"name": "budgeted", "retries": {"attempts": 3, "retryOn": "5xx"},
        "budget": {"retryRatio": 0.2, "minRetriesPerSecond": 1, "ttl": "10s"}}]});
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .upstream_h2()
        .listener(
            Listener::new()
                .filter(Filter::wasm("retry", config))
                .route(Route::new("default", "/").action_yaml(&carrier())),
        )
        .start();

    // Every other request always fails: unbudgeted, they would make 3 retries each (600).
    const N: usize = 400;
    // Three clients: the cluster's default max_retries circuit breaker allows 3 concurrent
    // retries, so more would overflow (UO) instead of drawing on the budget.
    let results = fire(envoy.listener_addr(), N, 3, |i| {
        Request::get("/")
            .header("x-flaky-key", &format!("load-{i}"))
            .header("x-flaky-fail", if i % 2 == 0 { "1000" } else { "0" })
    });
    let failed = results.iter().filter(|r| r.as_ref().map_or(true, |r| r.status != 200)).count();
    assert_eq!(failed, N / 2, "exactly the always-failing half fails");
    let retries = up.requests() - N as u64;
    let bound = N as u64 / 5 + 10;
    eprintln!("observed retries {retries} (bound {bound}, unbudgeted {})", 3 * N / 2);
    assert!(retries <= bound, "{retries} retries > ratio × requests + minimum = {bound}");
    // The budget was used, not just refused: at least half of it.
    assert!(retries >= bound / 2, "only {retries} retries of {bound} allowed");
    // Both workers served the load (so the bound held across them).
    let stats = envoy.stats();
    let per_worker: Vec<u64> = (0..2)
        .map(|w| {
            stats
                .iter()
                .filter(|(k, _)| {
                    k.starts_with("listener.127.0.0.1_") && k.ends_with(&format!(".worker_{w}.downstream_rq_completed"))
                        || k.starts_with("listener.127.0.0.1_")
                            && k.ends_with(&format!(".worker_{w}.downstream_cx_total"))
                })
                .map(|(_, v)| *v)
                .sum()
        })
        .collect();
    assert!(per_worker.iter().all(|n| *n > 0), "both workers take connections: {per_worker:?}");
    // Log-phase accounting agrees with what the upstream saw.
    eventually("retries_observed", Duration::from_secs(5), || {
        (stat(&envoy, "retries_observed") == retries).then_some(())
    });
    assert!(stat(&envoy, "budget_exhausted") > 0);
    assert_eq!(stat(&envoy, "requests"), N as u64);

    // Failures stop: successful requests deposit budget, and a failing request is retried
    // again (3 retries need 15 successes at 20 %).
    let ok = fire(envoy.listener_addr(), 40, 4, |i| Request::get("/").header("x-flaky-key", &format!("ok-{i}")));
    assert!(ok.iter().all(|r| r.as_ref().is_ok_and(|r| r.status == 200)));
    let rsp = envoy.send(Request::get("/").header("x-flaky-key", "recovered").header("x-flaky-fail", "3"));
    assert_eq!(rsp.status, 200, "the recovered budget allows 3 retries");
    assert_eq!(up.attempts("recovered").len(), 4);
}
