//! The test rate-limit service itself, against a real Redis: gRPC framing and errors,
//! fixed-window counting (OK → OVER_LIMIT, window reset, hits_addend), limit matching,
//! headers, shared counts between two instances, stop/restart, the switchable
//! behaviours, Redis failures, concurrency, and the standalone binary.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meshwasm_tests::ratelimit_service::proto::{
    Code, DurationExt as _, RateLimitDescriptor, RateLimitDescriptorExt as _, RateLimitRequest,
    RateLimitRequestExt as _, RateLimitResponse, RateLimitResponseExt as _,
};
use meshwasm_tests::ratelimit_service::{call, grpc_code, SHOULD_RATE_LIMIT_PATH};
use meshwasm_tests::{client, Behaviour, Limit, RateLimitService, Redis, Request, ServiceConfig, Unit};
use prost::Message as _;

const DOMAIN: &str = "meshwasm";

fn service(redis: &Redis, limits: Vec<Limit>) -> RateLimitService {
    RateLimitService::builder().redis(redis.addr()).config(ServiceConfig::new(DOMAIN, limits)).start()
}

fn req(entries: &[(&str, &str)]) -> RateLimitRequest {
    RateLimitRequest::new(DOMAIN, vec![RateLimitDescriptor::new(entries)])
}

fn codes(rsp: &RateLimitResponse) -> Vec<Code> {
    rsp.statuses.iter().map(|s| s.code()).collect()
}

/// If the current window of `unit` ends within `margin`, sleeps into the next one, so a
/// short test does not straddle a window boundary.
fn avoid_window_end(unit: Unit, margin: Duration) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let unit = Duration::from_secs(unit.seconds());
    let into = Duration::from_nanos((now.as_nanos() % unit.as_nanos()) as u64);
    if unit - into < margin {
        std::thread::sleep(unit - into + Duration::from_millis(20));
    }
}

#[test]
fn counts_per_value_up_to_the_limit_then_over_limit() {
    let redis = Redis::start();
    let svc = service(&redis, vec![Limit::new(&[("client", None)], 3, Unit::Hour).named("per-client")]);
    avoid_window_end(Unit::Hour, Duration::from_secs(5));

    let mut seen = Vec::new();
    for _ in 0..5 {
        let rsp = svc.call(&req(&[("client", "a")])).unwrap();
        let s = &rsp.statuses[0];
        let limit = s.current_limit.as_ref().unwrap();
        assert_eq!(
            (limit.requests_per_unit, limit.unit(), limit.name.as_str()),
            (3, Unit::Hour.to_proto(), "per-client")
        );
        let reset = s.duration_until_reset.unwrap().to_std();
        assert!(reset > Duration::ZERO && reset <= Duration::from_secs(3600), "{reset:?}");
        seen.push((rsp.overall_code(), s.limit_remaining));
    }
    assert_eq!(seen, vec![(Code::Ok, 2), (Code::Ok, 1), (Code::Ok, 0), (Code::OverLimit, 0), (Code::OverLimit, 0)]);
    // Another value of the wildcard key has its own counter.
    assert_eq!(svc.call(&req(&[("client", "b")])).unwrap().overall_code(), Code::Ok);

    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let window = now - now % 3600;
    let key_a = format!("meshwasm_rl:{DOMAIN}:client_a:{window}");
    assert_eq!(redis.keys("meshwasm_rl:*"), vec![key_a.clone(), format!("meshwasm_rl:{DOMAIN}:client_b:{window}")]);
    assert_eq!(redis.get(&key_a).as_deref(), Some("5"));
    let ttl: i64 = redis.command(&["TTL", &key_a]).parse().unwrap();
    assert!((3590..=3600).contains(&ttl), "TTL {ttl}");

    assert_eq!(svc.calls(), 6);
    let last = svc.last_request().unwrap();
    assert_eq!(last.domain, DOMAIN);
    assert_eq!(last.descriptors[0].pairs(), vec![("client".to_string(), "b".to_string())]);
    assert_eq!(svc.requests().len(), 6);

    // FLUSHALL resets every counter.
    redis.flushall();
    let rsp = svc.call(&req(&[("client", "a")])).unwrap();
    assert_eq!((rsp.overall_code(), rsp.statuses[0].limit_remaining), (Code::Ok, 2));
}

#[test]
fn window_resets_at_the_unit_boundary() {
    let redis = Redis::start();
    let svc = service(&redis, vec![Limit::new(&[("k", None)], 1, Unit::Second)]);
    avoid_window_end(Unit::Second, Duration::from_millis(500));
    let first = svc.call(&req(&[("k", "v")])).unwrap();
    assert_eq!(first.overall_code(), Code::Ok);
    let reset = first.statuses[0].duration_until_reset.unwrap().to_std();
    assert!(reset <= Duration::from_secs(1), "{reset:?}");
    assert_eq!(svc.call(&req(&[("k", "v")])).unwrap().overall_code(), Code::OverLimit);
    std::thread::sleep(reset + Duration::from_millis(20));
    assert_eq!(svc.call(&req(&[("k", "v")])).unwrap().overall_code(), Code::Ok);
}

#[test]
fn matching_precedence_unmatched_descriptors_and_unknown_domains() {
    let redis = Redis::start();
    let svc = service(
        &redis,
        vec![
            Limit::new(&[("client", None)], 100, Unit::Hour).named("any"),
            Limit::new(&[("client", Some("vip"))], 1, Unit::Hour).named("vip"),
            Limit::new(&[("client", None), ("path", Some("/p"))], 1, Unit::Hour).named("path"),
        ],
    );
    avoid_window_end(Unit::Hour, Duration::from_secs(5));
    let name = |r: &RateLimitResponse, i: usize| r.statuses[i].current_limit.as_ref().map(|l| l.name.clone());

    // The exact value beats the wildcard.
    let rsp = svc.call(&req(&[("client", "vip")])).unwrap();
    assert_eq!((rsp.overall_code(), name(&rsp, 0)), (Code::Ok, Some("vip".into())));
    assert_eq!(svc.call(&req(&[("client", "vip")])).unwrap().overall_code(), Code::OverLimit);

    // Several descriptors: OVER_LIMIT overall when any is; unmatched ones are OK and
    // have no current_limit; keys must match in order.
    let multi = RateLimitRequest::new(
        DOMAIN,
        vec![
            RateLimitDescriptor::new(&[("client", "c")]),
            RateLimitDescriptor::new(&[("client", "vip")]),
            RateLimitDescriptor::new(&[("path", "/p"), ("client", "c")]),
            RateLimitDescriptor::new(&[("client", "c"), ("path", "/other")]),
        ],
    );
    let rsp = svc.call(&multi).unwrap();
    assert_eq!(rsp.overall_code(), Code::OverLimit);
    assert_eq!(codes(&rsp), vec![Code::Ok, Code::OverLimit, Code::Ok, Code::Ok]);
    assert_eq!(name(&rsp, 0), Some("any".into()));
    assert_eq!((name(&rsp, 2), name(&rsp, 3)), (None, None));
    assert_eq!(rsp.statuses[2].duration_until_reset, None);

    // An unknown domain is not limited and counts nothing.
    let before = redis.keys("*");
    let other = RateLimitRequest::new("other", vec![RateLimitDescriptor::new(&[("client", "vip")])]);
    let rsp = svc.call(&other).unwrap();
    assert_eq!((rsp.overall_code(), codes(&rsp)), (Code::Ok, vec![Code::Ok]));
    assert_eq!(redis.keys("*"), before);
}

#[test]
fn hits_addend_of_the_request_and_of_descriptors() {
    let redis = Redis::start();
    let svc = service(&redis, vec![Limit::new(&[("k", None)], 5, Unit::Hour)]);
    avoid_window_end(Unit::Hour, Duration::from_secs(5));
    let remaining = |r: &RateLimitResponse| (r.overall_code(), r.statuses[0].limit_remaining);

    // Request-level addend.
    assert_eq!(remaining(&svc.call(&req(&[("k", "a")]).with_hits_addend(3)).unwrap()), (Code::Ok, 2));
    assert_eq!(remaining(&svc.call(&req(&[("k", "a")]).with_hits_addend(3)).unwrap()), (Code::OverLimit, 0));
    assert_eq!(svc.last_request().unwrap().hits_addend, 3);

    // The descriptor's addend overrides the request's; 0 only checks.
    let with = |hits: u64| {
        RateLimitRequest::new(DOMAIN, vec![RateLimitDescriptor::new(&[("k", "b")]).with_hits_addend(hits)])
            .with_hits_addend(4)
    };
    assert_eq!(remaining(&svc.call(&with(5)).unwrap()), (Code::Ok, 0));
    assert_eq!(remaining(&svc.call(&with(0)).unwrap()), (Code::Ok, 0));
    assert_eq!(remaining(&svc.call(&with(1)).unwrap()), (Code::OverLimit, 0));
    assert_eq!(svc.last_request().unwrap().descriptors[0].hits_addend.map(|h| h.value), Some(1));
    let keys = redis.keys("meshwasm_rl:*:k_b:*");
    assert_eq!(redis.get(&keys[0]).as_deref(), Some("6"));
}

#[test]
fn rate_limit_headers_and_fixed_headers() {
    let redis = Redis::start();
    let config = ServiceConfig::new(
        DOMAIN,
        vec![Limit::new(&[("a", None)], 10, Unit::Hour), Limit::new(&[("b", None)], 2, Unit::Minute)],
    )
    .rate_limit_headers(true)
    .response_header("x-rl-service", "meshwasm")
    .request_header("x-rl-checked", "yes");
    let svc = RateLimitService::builder().redis(redis.addr()).config(config).start();
    avoid_window_end(Unit::Minute, Duration::from_secs(3));

    let both = RateLimitRequest::new(
        DOMAIN,
        vec![RateLimitDescriptor::new(&[("a", "1")]), RateLimitDescriptor::new(&[("b", "1")])],
    );
    let rsp = svc.call(&both).unwrap();
    let headers = rsp.response_headers();
    let get = |k: &str| headers.iter().find(|(hk, _)| hk == k).map(|(_, v)| v.clone());
    // The most restrictive descriptor is b (1 remaining of 2 per minute).
    assert_eq!(get("x-ratelimit-limit").as_deref(), Some("2"));
    assert_eq!(get("x-ratelimit-remaining").as_deref(), Some("1"));
    let reset: u64 = get("x-ratelimit-reset").unwrap().parse().unwrap();
    assert!((1..=60).contains(&reset), "reset {reset}");
    assert_eq!(headers.last().unwrap(), &("x-rl-service".to_string(), "meshwasm".to_string()));
    assert_eq!(rsp.request_headers(), vec![("x-rl-checked".to_string(), "yes".to_string())]);

    // Over the limit the headers are there too.
    svc.call(&both).unwrap();
    let rsp = svc.call(&both).unwrap();
    assert_eq!(rsp.overall_code(), Code::OverLimit);
    assert_eq!(rsp.response_headers().len(), 4);

    // Without a matching limit: only the fixed headers.
    let rsp = svc.call(&req(&[("c", "1")])).unwrap();
    assert_eq!(rsp.response_headers(), vec![("x-rl-service".to_string(), "meshwasm".to_string())]);
}

#[test]
fn two_instances_share_counts_and_a_stopped_one_restarts_on_its_port() {
    let redis = Redis::start();
    let limits = vec![Limit::new(&[("k", None)], 4, Unit::Hour)];
    let mut one = service(&redis, limits.clone());
    let two = service(&redis, limits.clone());
    avoid_window_end(Unit::Hour, Duration::from_secs(5));

    let mut got = Vec::new();
    for i in 0..6 {
        let svc = if i % 2 == 0 { &one } else { &two };
        got.push(svc.call(&req(&[("k", "v")])).unwrap().overall_code());
    }
    assert_eq!(got, [vec![Code::Ok; 4], vec![Code::OverLimit; 2]].concat());
    assert_eq!((one.calls(), two.calls()), (3, 3));

    let addr = one.addr();
    one.stop();
    one.stop(); // idempotent
    let err = call(addr, &req(&[("k", "v")])).unwrap_err();
    assert_eq!(err.grpc_status, None, "{err}");
    assert!(std::net::TcpStream::connect(addr).is_err(), "port {addr} still accepts after stop");
    assert_eq!(one.calls(), 3);

    let again = RateLimitService::builder()
        .redis(redis.addr())
        .config(ServiceConfig::new(DOMAIN, limits))
        .port(addr.port())
        .start();
    assert_eq!(again.addr(), addr);
    assert_eq!(again.call(&req(&[("k", "v")])).unwrap().overall_code(), Code::OverLimit);
}

#[test]
fn behaviours_switch_at_run_time() {
    let redis = Redis::start();
    let svc = service(&redis, vec![Limit::new(&[("k", None)], 100, Unit::Hour)]);
    let r = req(&[("k", "v")]);

    svc.set_behaviour(Behaviour::Slow(Duration::from_millis(300)));
    let start = Instant::now();
    assert_eq!(svc.call(&r).unwrap().overall_code(), Code::Ok);
    assert!(start.elapsed() >= Duration::from_millis(300), "{:?}", start.elapsed());

    svc.set_behaviour(Behaviour::Garbage);
    let raw = client::send(svc.addr(), &Request::grpc(SHOULD_RATE_LIMIT_PATH, &r.encode_to_vec()));
    assert_eq!((raw.status, raw.grpc_status()), (200, Some(0)));
    assert_eq!(&raw.body[..], &[0, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]);
    let err = svc.call(&r).unwrap_err();
    assert_eq!(err.grpc_status, Some(0), "{err}");

    svc.set_behaviour(Behaviour::GrpcError(grpc_code::RESOURCE_EXHAUSTED));
    let err = svc.call(&r).unwrap_err();
    assert_eq!(err.grpc_status, Some(grpc_code::RESOURCE_EXHAUSTED), "{err}");

    svc.set_behaviour(Behaviour::Unknown);
    let rsp = svc.call(&r).unwrap();
    assert_eq!((rsp.overall_code(), rsp.statuses.len()), (Code::Unknown, 0));

    svc.set_behaviour(Behaviour::Normal);
    let rsp = svc.call(&r).unwrap();
    // Only the Slow and Normal calls were counted.
    assert_eq!((rsp.overall_code(), rsp.statuses[0].limit_remaining), (Code::Ok, 98));
    assert_eq!(svc.calls(), 6);
    assert_eq!(svc.requests().len(), 6);
}

#[test]
fn protocol_errors() {
    let redis = Redis::start();
    let svc = service(&redis, vec![]);
    let grpc_status = |r: Request| client::send(svc.addr(), &r).grpc_status();

    let unknown = Request::grpc("/envoy.service.ratelimit.v3.RateLimitService/Other", &[]);
    assert_eq!(grpc_status(unknown), Some(grpc_code::UNIMPLEMENTED as i32));
    assert_eq!(svc.calls(), 0);

    let not_protobuf = Request::grpc(SHOULD_RATE_LIMIT_PATH, &[0xff, 0xff]);
    assert_eq!(grpc_status(not_protobuf), Some(grpc_code::INVALID_ARGUMENT as i32));
    let bad_frame = Request::grpc(SHOULD_RATE_LIMIT_PATH, &[]).body(vec![0u8, 0, 0, 0, 9, 1]);
    assert_eq!(grpc_status(bad_frame), Some(grpc_code::INVALID_ARGUMENT as i32));
    let empty_domain = RateLimitRequest::new("", vec![RateLimitDescriptor::new(&[("k", "v")])]);
    assert_eq!(svc.call(&empty_domain).unwrap_err().grpc_status, Some(grpc_code::INVALID_ARGUMENT));
    let no_descriptors = RateLimitRequest::new(DOMAIN, vec![]);
    assert_eq!(svc.call(&no_descriptors).unwrap_err().grpc_status, Some(grpc_code::INVALID_ARGUMENT));
    assert_eq!(svc.calls(), 4);
    assert!(svc.last_request().unwrap().descriptors.is_empty());
}

#[test]
fn redis_restart_and_redis_down() {
    let mut redis = Redis::start();
    let svc = service(&redis, vec![Limit::new(&[("k", None)], 10, Unit::Hour)]);
    avoid_window_end(Unit::Hour, Duration::from_secs(5));
    let r = req(&[("k", "v")]);
    assert_eq!(svc.call(&r).unwrap().statuses[0].limit_remaining, 9);
    assert_eq!(svc.call(&r).unwrap().statuses[0].limit_remaining, 8);

    // A new (empty) Redis on the same port: the pooled connections to the old one are
    // replaced, not failed on; the counts start over.
    let port = redis.addr().port();
    redis.stop();
    let mut redis = Redis::start_on(port);
    let rsp = svc.call(&r).unwrap();
    assert_eq!((rsp.overall_code(), rsp.statuses[0].limit_remaining), (Code::Ok, 9));

    // Redis down: UNAVAILABLE; descriptors without a limit need no Redis.
    redis.stop();
    let err = svc.call(&r).unwrap_err();
    assert_eq!(err.grpc_status, Some(grpc_code::UNAVAILABLE), "{err}");
    assert_eq!(svc.call(&req(&[("other", "v")])).unwrap().overall_code(), Code::Ok);

    // Nothing listening at the configured address at all.
    let nowhere = RateLimitService::builder()
        .redis(std::net::SocketAddr::from(([127, 0, 0, 1], meshwasm_tests::envoy::free_port())))
        .config(ServiceConfig::new(DOMAIN, vec![Limit::new(&[("k", None)], 10, Unit::Hour)]))
        .start();
    assert_eq!(nowhere.call(&r).unwrap_err().grpc_status, Some(grpc_code::UNAVAILABLE));
}

#[test]
fn an_error_reply_from_redis_is_internal() {
    let redis = Redis::start();
    let svc = service(&redis, vec![Limit::new(&[("k", None)], 10, Unit::Hour)]);
    avoid_window_end(Unit::Hour, Duration::from_secs(5));
    let r = req(&[("k", "v")]);
    assert_eq!(svc.call(&r).unwrap().statuses[0].limit_remaining, 9);
    // The counter is no longer an integer: INCRBY fails inside MULTI … EXEC.
    let key = redis.keys("meshwasm_rl:*").pop().unwrap();
    assert_eq!(redis.command(&["SET", &key, "not a number"]), "OK");
    let err = svc.call(&r).unwrap_err();
    assert_eq!(err.grpc_status, Some(grpc_code::INTERNAL), "{err}");
    assert!(err.message.contains("not an integer"), "{err}");
    // The connection stays usable: a fresh counter counts.
    redis.flushall();
    assert_eq!(svc.call(&r).unwrap().statuses[0].limit_remaining, 9);
}

#[test]
fn concurrent_calls_are_counted_exactly() {
    let redis = Redis::start();
    let svc = service(&redis, vec![Limit::new(&[("k", None)], 20, Unit::Hour)]);
    avoid_window_end(Unit::Hour, Duration::from_secs(10));
    let body = req(&[("k", "v")]).encode_to_vec();
    let results = client::fire(svc.addr(), 60, 12, move |_| Request::grpc(SHOULD_RATE_LIMIT_PATH, &body));
    let mut ok = 0;
    for r in results {
        let r = r.unwrap();
        assert_eq!(r.grpc_status(), Some(0));
        let rsp = RateLimitResponse::decode(&r.body[5..]).unwrap();
        if rsp.overall_code() == Code::Ok {
            ok += 1;
        }
    }
    assert_eq!(ok, 20);
    assert_eq!(svc.calls(), 60);
    assert_eq!(redis.get(&redis.keys("meshwasm_rl:*")[0]).as_deref(), Some("60"));
}

#[test]
fn standalone_binary_serves_a_config_file() {
    let redis = Redis::start();
    let dir = std::env::temp_dir().join(format!("meshwasm-rl-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("ratelimit.json");
    std::fs::write(
        &config,
        r#"{"domain": "meshwasm", "limits": [{"entries": [{"key": "k"}], "requestsPerUnit": 1, "unit": "hour"}]}"#,
    )
    .unwrap();
    avoid_window_end(Unit::Hour, Duration::from_secs(5));
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshwasm-ratelimit-service"))
        .args(["--listen", "127.0.0.1:0", "--redis", &redis.addr().to_string(), "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr: std::net::SocketAddr = line.trim().strip_prefix("listening on ").unwrap().parse().unwrap();
    let codes: Vec<Code> = (0..2).map(|_| call(addr, &req(&[("k", "v")])).unwrap().overall_code()).collect();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(codes, vec![Code::Ok, Code::OverLimit]);
}

#[test]
fn memory_backend_counts_without_redis() {
    let limits = vec![Limit::new(&[("k", None)], 2, Unit::Hour)];
    let svc = RateLimitService::builder().config(ServiceConfig::new(DOMAIN, limits.clone())).start();
    let other = RateLimitService::builder().config(ServiceConfig::new(DOMAIN, limits)).start();
    avoid_window_end(Unit::Hour, Duration::from_secs(5));
    let remaining = |s: &RateLimitService, v: &str| {
        let rsp = s.call(&req(&[("k", v)])).unwrap();
        (rsp.overall_code(), rsp.statuses[0].limit_remaining)
    };
    assert_eq!(remaining(&svc, "a"), (Code::Ok, 1));
    assert_eq!(remaining(&svc, "a"), (Code::Ok, 0));
    assert_eq!(remaining(&svc, "a"), (Code::OverLimit, 0));
    assert_eq!(remaining(&svc, "b"), (Code::Ok, 1), "each value has its own counter");
    assert_eq!(remaining(&other, "a"), (Code::Ok, 1), "instances do not share memory");
    // hits_addend applies as with Redis; 0 checks without counting.
    let check = RateLimitRequest::new(DOMAIN, vec![RateLimitDescriptor::new(&[("k", "b")]).with_hits_addend(0)]);
    assert_eq!(svc.call(&check).unwrap().statuses[0].limit_remaining, 1);
    let two = RateLimitRequest::new(DOMAIN, vec![RateLimitDescriptor::new(&[("k", "c")])]).with_hits_addend(3);
    assert_eq!(svc.call(&two).unwrap().overall_code(), Code::OverLimit);
    assert_eq!(svc.calls(), 6);
}

#[test]
fn memory_backend_window_resets() {
    let svc = RateLimitService::builder()
        .config(ServiceConfig::new(DOMAIN, vec![Limit::new(&[("k", None)], 1, Unit::Second)]))
        .start();
    avoid_window_end(Unit::Second, Duration::from_millis(300));
    assert_eq!(svc.call(&req(&[("k", "v")])).unwrap().overall_code(), Code::Ok);
    assert_eq!(svc.call(&req(&[("k", "v")])).unwrap().overall_code(), Code::OverLimit);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    std::thread::sleep(
        Duration::from_secs(1) - Duration::from_nanos(u64::from(now.subsec_nanos())) + Duration::from_millis(20),
    );
    assert_eq!(svc.call(&req(&[("k", "v")])).unwrap().overall_code(), Code::Ok, "a new window");
}

#[test]
fn standalone_binary_counts_in_memory() {
    let dir = std::env::temp_dir().join(format!("meshwasm-rl-mem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("ratelimit.json");
    std::fs::write(
        &config,
        r#"{"domain": "meshwasm", "limits": [{"entries": [{"key": "k"}], "requestsPerUnit": 1, "unit": "hour"}]}"#,
    )
    .unwrap();
    avoid_window_end(Unit::Hour, Duration::from_secs(5));
    for memory_flag in [true, false] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshwasm-ratelimit-service"));
        cmd.args(["--listen", "127.0.0.1:0", "--config"]).arg(&config);
        if memory_flag {
            cmd.arg("--memory");
        }
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr: std::net::SocketAddr = line.trim().strip_prefix("listening on ").unwrap().parse().unwrap();
        let codes: Vec<Code> = (0..2).map(|_| call(addr, &req(&[("k", "v")])).unwrap().overall_code()).collect();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(codes, vec![Code::Ok, Code::OverLimit], "--memory given: {memory_flag}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
