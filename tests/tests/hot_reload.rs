//! Hot reload: Envoy takes its listener from a watched LDS file (filesystem
//! `path_config_source` with `watched_directory`), a load generator runs, and the fault
//! filter's plugin configuration is swapped valid → invalid → valid. Pinned:
//!
//! - zero failed requests across every swap (the load path has no fault rule);
//! - each valid configuration is in effect within a second of the file's rename (a probe
//!   path's abort status switches);
//! - the invalid one is refused by Envoy (`listener_manager.lds.update_rejected` goes up)
//!   and the previous configuration keeps serving.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshwasm_tests::envoy::free_port;
use meshwasm_tests::{client, eventually, Envoy, Filter, Listener, Request, Upstream};
use serde_json::{json, Value};

/// `/probe` aborted with `status`, or (None) no rule at all for it.
fn config(status: Option<i64>) -> Value {
    match status {
        Some(s) => json!({"rules": [{"name": "probe", "match": [{"uri": {"prefix": "/probe"}}],
                                     "fault": {"abort": {"httpStatus": s, "percentage": {"value": 100}}}}]}),
        None => json!({"rules": []}),
    }
}

fn listener(port: u16, config: &Value) -> Listener {
    Listener::new().port(port).filter(Filter::wasm("fault", config.clone()))
}

/// Replaces the LDS file atomically (write beside it, rename over it), as Envoy's
/// `watched_directory` expects.
fn swap(lds: &std::path::Path, yaml: &str) -> Instant {
    let tmp = lds.with_extension("tmp");
    std::fs::write(&tmp, yaml).unwrap();
    std::fs::rename(&tmp, lds).unwrap();
    Instant::now()
}

#[test]
fn plugin_config_swaps_over_lds_without_a_failed_request() {
    let up = Upstream::start();
    let dir = std::env::temp_dir().join(format!("meshwasm-lds-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let lds = dir.join("lds.yaml");
    let port = free_port();
    let envoy =
        Envoy::builder().upstream(up.addr()).lds_file(lds.clone()).listener(listener(port, &config(Some(418)))).start();
    let addr = envoy.listener_addr();
    let probe = || client::try_send(addr, &Request::get("/probe")).map(|r| r.status).unwrap_or(0);
    assert_eq!(probe(), 418, "the first configuration serves");

    // The load generator: two client loops on /load, which no configuration faults.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, ok, failed, failures) = (stop.clone(), ok.clone(), failed.clone(), failures.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match client::try_send(addr, &Request::get("/load")) {
                        Ok(r) if r.status == 200 && r.from_upstream() => ok.fetch_add(1, Ordering::Relaxed),
                        Ok(r) => {
                            failures.lock().unwrap().push(format!("status {} {:?}", r.status, r.text()));
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(e) => {
                            failures.lock().unwrap().push(e);
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    eventually("load flowing", Duration::from_secs(5), || (ok.load(Ordering::Relaxed) >= 20).then_some(()));

    let success = |e: &Envoy| e.stat_or_zero("listener_manager.lds.update_success");
    let rejected = |e: &Envoy| e.stat_or_zero("listener_manager.lds.update_rejected");
    let mut took = Vec::new();
    let steps: [(Option<i64>, u16); 3] = [(Some(451), 451), (None, 200), (Some(503), 503)];
    for (i, (status, expect)) in steps.iter().enumerate() {
        // A valid configuration: in effect within a second.
        let at = swap(&lds, &listener(port, &config(*status)).lds_yaml(port));
        eventually(&format!("step {i}: /probe answering {expect}"), Duration::from_secs(1), || {
            (probe() == *expect).then_some(())
        });
        took.push(at.elapsed());

        // An invalid one (httpStatus 700): refused, the previous one keeps serving.
        let (before_rejected, before_success) = (rejected(&envoy), success(&envoy));
        swap(&lds, &listener(port, &json!({"rules": [{"fault": {"abort": {"httpStatus": 700}}}]})).lds_yaml(port));
        eventually(&format!("step {i}: the invalid configuration rejected"), Duration::from_secs(5), || {
            (rejected(&envoy) > before_rejected).then_some(())
        });
        assert_eq!(success(&envoy), before_success, "the invalid configuration was not applied");
        for _ in 0..5 {
            assert_eq!(probe(), *expect, "step {i}: the previous configuration still serves");
        }
    }

    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("hot reload: {ok} requests served, {failed} failed; valid configs in effect after {took:?}");
    assert_eq!(failed, 0, "failed requests during the swaps: {:?}", failures.lock().unwrap());
    assert!(ok >= 100, "the load generator ran ({ok} requests)");
    assert!(envoy.log().contains("rules[0].fault.abort.httpStatus"), "Envoy logged why it refused the update");
    let _ = std::fs::remove_dir_all(&dir);
}
