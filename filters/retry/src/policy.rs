//! Pure decisions: which rule applies, which retry conditions the router gets (after the
//! idempotency guard and the budget), and the timeouts (deadline propagation). No host calls.

use meshwasm_sdk_ext::matcher::RequestView;

use crate::config::{Config, RetryHeaders, Rule};

/// Request headers Envoy's router consumes. A client could steer retries and timeouts with
/// them whenever Envoy deems the request internal, so they are removed unless
/// `trustClientHeaders` (the filter then sets its own).
pub const ROUTER_HEADERS: &[&str] = &[
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-max-retries",
    "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names",
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-upstream-rq-timeout-alt-response",
];

pub const H_RETRY_ON: &str = "x-envoy-retry-on";
pub const H_RETRY_GRPC_ON: &str = "x-envoy-retry-grpc-on";
pub const H_MAX_RETRIES: &str = "x-envoy-max-retries";
pub const H_STATUS_CODES: &str = "x-envoy-retriable-status-codes";
pub const H_TIMEOUT: &str = "x-envoy-upstream-rq-timeout-ms";
pub const H_PER_TRY: &str = "x-envoy-upstream-rq-per-try-timeout-ms";
pub const H_EXPECTED: &str = "x-envoy-expected-rq-timeout-ms";
pub const H_HEDGE: &str = "x-envoy-hedge-on-per-try-timeout";
pub const H_GRPC_TIMEOUT: &str = "grpc-timeout";

/// What the filter tells the router for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan<'a> {
    /// Index of the rule in its config, and its label.
    pub rule: usize,
    pub label: &'a str,
    /// The retry conditions; `None` means no retries (`x-envoy-max-retries: 0` is sent only
    /// when the client's own headers were kept).
    pub retry: Option<&'a RetryHeaders>,
    pub max_retries: u32,
    pub per_try_timeout_ms: Option<u64>,
    pub hedge: bool,
    /// `x-envoy-upstream-rq-timeout-ms` (0 disables the route timeout).
    pub timeout_ms: Option<u64>,
    /// The remaining budget for the next hop: `x-envoy-expected-rq-timeout-ms`.
    pub expected_ms: Option<u64>,
    /// For gRPC requests with a deadline: `grpc-timeout` for the next hop.
    pub grpc_timeout: Option<String>,
    /// The idempotency guard removed conditions that could re-execute the request.
    pub idempotency_skipped: bool,
}

/// The request facts policy needs, besides the headers matching reads through the view.
pub struct Facts<'a> {
    pub method: &'a str,
    pub is_grpc: bool,
    /// The client's `grpc-timeout`.
    pub grpc_timeout: Option<&'a str>,
    /// The client's `x-envoy-expected-rq-timeout-ms` (only read when trusted).
    pub expected_ms: Option<&'a str>,
}

/// The first rule whose `match` selects the request.
pub fn select<'c>(config: &'c Config, req: &mut dyn RequestView) -> Option<(usize, &'c Rule)> {
    config.rules.iter().enumerate().find(|(_, r)| r.matches.matches(req))
}

/// Decide for a request that `rule` selected. `idempotency_key` says whether the request
/// carries the rule's key header. The budget is applied afterwards ([`Plan::cap_retries`]).
pub fn plan<'c>(
    config: &'c Config,
    index: usize,
    rule: &'c Rule,
    facts: &Facts<'_>,
    idempotency_key: bool,
) -> Plan<'c> {
    let mut plan = Plan {
        rule: index,
        label: &rule.name,
        retry: None,
        max_retries: 0,
        per_try_timeout_ms: None,
        hedge: false,
        timeout_ms: None,
        expected_ms: None,
        grpc_timeout: None,
        idempotency_skipped: false,
    };
    if let Some(r) = &rule.retries {
        let mut headers = &r.all;
        if let (Some(idem), Some(safe)) = (&rule.idempotency, &r.safe) {
            let idempotent = idempotency_key || idem.methods.iter().any(|m| m.eq_ignore_ascii_case(facts.method));
            if !idempotent {
                headers = safe;
                plan.idempotency_skipped = true;
            }
        }
        if !headers.is_empty() {
            plan.retry = Some(headers);
            plan.max_retries = r.attempts;
            plan.per_try_timeout_ms = r.per_try_timeout.map(|d| d.as_millis() as u64);
            plan.hedge = r.hedge_on_per_try_timeout;
        }
    }

    // Deadline: the smallest of the policy timeout and the client's deadlines (0 = none).
    let policy = rule.timeout.map(|d| d.as_millis() as u64);
    let client_grpc = facts.grpc_timeout.and_then(parse_grpc_timeout_ms);
    let client_expected = if config.trust_client_headers {
        facts.expected_ms.and_then(|v| v.trim().parse::<u64>().ok()).filter(|v| *v > 0)
    } else {
        None
    };
    let deadline = [policy.filter(|v| *v > 0), client_grpc, client_expected].into_iter().flatten().min();
    plan.timeout_ms = match (deadline, policy) {
        (Some(d), _) => Some(d),
        (None, Some(0)) => Some(0),
        (None, _) => None,
    };
    if let Some(global) = deadline {
        // The next hop's budget, as Envoy computes it: the per-try timeout when it is the
        // tighter one, else the whole remaining timeout.
        let per_try = plan.per_try_timeout_ms.filter(|p| *p < global);
        plan.expected_ms = Some(per_try.unwrap_or(global));
        if facts.is_grpc {
            plan.grpc_timeout = Some(format!("{global}m"));
        }
    }
    plan
}

impl Plan<'_> {
    /// Apply the budget's grant: at most `granted` retries.
    pub fn cap_retries(&mut self, granted: u32) {
        self.max_retries = self.max_retries.min(granted);
    }
}

/// gRPC's `grpc-timeout` (`1..=8` digits and a unit `H M S m u n`) in whole milliseconds,
/// rounded up (a sub-millisecond deadline is 1 ms, never 0, which would mean "none").
pub fn parse_grpc_timeout_ms(v: &str) -> Option<u64> {
    let v = v.trim();
    let unit = v.chars().last()?;
    let digits = v.get(..v.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u128 = digits.parse().ok()?;
    let ns_per_unit: u128 = match unit {
        'H' => 3_600_000_000_000,
        'M' => 60_000_000_000,
        'S' => 1_000_000_000,
        'm' => 1_000_000,
        'u' => 1_000,
        'n' => 1,
        _ => return None,
    };
    let ns = n * ns_per_unit;
    if ns == 0 {
        // "0m": already expired; 1 ms is the smallest deadline the router can carry.
        return Some(1);
    }
    u64::try_from(ns.div_ceil(1_000_000)).ok()
}

/// Envoy's `Grpc::Common::isGrpcRequestHeaders`: `application/grpc` or `application/grpc+…`.
pub fn is_grpc(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| {
        ct == "application/grpc" || ct.strip_prefix("application/grpc").is_some_and(|rest| rest.starts_with('+'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshwasm_sdk_ext::matcher::StaticRequest;
    use proptest::prelude::*;

    fn cfg(json: &str) -> Config {
        Config::from_json(json.as_bytes()).unwrap()
    }

    fn facts<'a>(method: &'a str) -> Facts<'a> {
        Facts { method, is_grpc: false, grpc_timeout: None, expected_ms: None }
    }

    fn decide<'c>(c: &'c Config, req: StaticRequest, f: &Facts<'_>, key: bool) -> Option<Plan<'c>> {
        let mut req = req;
        let (i, r) = select(c, &mut req)?;
        Some(plan(c, i, r, f, key))
    }

    #[test]
    fn first_matching_rule_wins() {
        let c = cfg(
            r#"{"rules":[{"name":"api","match":[{"uri":{"prefix":"/api"}}],"retries":{"attempts":5,"retryOn":"5xx"}},{"name":"rest"}]}"#,
        );
        let p = decide(&c, StaticRequest::get("/api/x"), &facts("GET"), false).unwrap();
        assert_eq!((p.label, p.max_retries), ("api", 5));
        assert_eq!(p.retry.unwrap().retry_on, "5xx");
        let p = decide(&c, StaticRequest::get("/other"), &facts("GET"), false).unwrap();
        assert_eq!((p.label, p.max_retries), ("rest", 2));
        let c = cfg(r#"{"rules":[{"match":[{"uri":{"prefix":"/api"}}]}]}"#);
        assert!(decide(&c, StaticRequest::get("/x"), &facts("GET"), false).is_none());
    }

    #[test]
    fn idempotency_guard() {
        let c = cfg(r#"{"rules":[{"retries":{"attempts":3,"retryOn":"5xx,connect-failure"}}]}"#);
        let get = decide(&c, StaticRequest::get("/"), &facts("GET"), false).unwrap();
        assert_eq!(get.retry.unwrap().retry_on, "5xx,connect-failure");
        assert!(!get.idempotency_skipped);
        let post = decide(&c, StaticRequest::get("/"), &facts("POST"), false).unwrap();
        assert_eq!(post.retry.unwrap().retry_on, "connect-failure");
        assert!(post.idempotency_skipped);
        assert_eq!(post.max_retries, 3);
        let keyed = decide(&c, StaticRequest::get("/"), &facts("POST"), true).unwrap();
        assert_eq!(keyed.retry.unwrap().retry_on, "5xx,connect-failure");
        // Only re-executing conditions: a POST gets no retries at all.
        let c = cfg(r#"{"rules":[{"retries":{"attempts":3,"retryOn":"5xx"}}]}"#);
        let post = decide(&c, StaticRequest::get("/"), &facts("PATCH"), false).unwrap();
        assert_eq!((post.retry, post.max_retries, post.idempotency_skipped), (None, 0, true));
        // Turned off, or custom methods.
        let c = cfg(r#"{"rules":[{"retries":{"attempts":3,"retryOn":"5xx"},"idempotentOnly":false}]}"#);
        assert_eq!(decide(&c, StaticRequest::get("/"), &facts("POST"), false).unwrap().max_retries, 3);
        let c = cfg(r#"{"rules":[{"retries":{"attempts":3,"retryOn":"5xx"},"idempotentMethods":["post"]}]}"#);
        assert_eq!(decide(&c, StaticRequest::get("/"), &facts("POST"), false).unwrap().max_retries, 3);
        assert_eq!(decide(&c, StaticRequest::get("/"), &facts("GET"), false).unwrap().max_retries, 0);
    }

    #[test]
    fn deadlines() {
        let c = cfg(r#"{"rules":[{"retries":{"attempts":2,"perTryTimeout":"300ms"},"timeout":"2s"}]}"#);
        let p = decide(&c, StaticRequest::get("/"), &facts("GET"), false).unwrap();
        assert_eq!((p.timeout_ms, p.per_try_timeout_ms, p.expected_ms), (Some(2000), Some(300), Some(300)));
        let f = Facts { method: "POST", is_grpc: true, grpc_timeout: Some("500m"), expected_ms: Some("100") };
        let p = decide(&c, StaticRequest::get("/"), &f, false).unwrap();
        assert_eq!((p.timeout_ms, p.grpc_timeout.as_deref()), (Some(500), Some("500m")), "untrusted expected ignored");
        let ct = cfg(r#"{"rules":[{"timeout":"2s"}],"trustClientHeaders":true}"#);
        let p = decide(&ct, StaticRequest::get("/"), &f, false).unwrap();
        assert_eq!((p.timeout_ms, p.expected_ms, p.grpc_timeout.as_deref()), (Some(100), Some(100), Some("100m")));
        // timeout 0s: disabled unless a client deadline applies; absent: route's own.
        let c0 = cfg(r#"{"rules":[{"timeout":"0s"}]}"#);
        let p = decide(&c0, StaticRequest::get("/"), &facts("GET"), false).unwrap();
        assert_eq!((p.timeout_ms, p.expected_ms), (Some(0), None));
        let f = Facts { grpc_timeout: Some("3S"), ..facts("GET") };
        assert_eq!(decide(&c0, StaticRequest::get("/"), &f, false).unwrap().timeout_ms, Some(3000));
        let none = cfg(r#"{"rules":[{}]}"#);
        assert_eq!(decide(&none, StaticRequest::get("/"), &facts("GET"), false).unwrap().timeout_ms, None);
        // A per-try timeout at or above the deadline is not the next hop's budget.
        let c = cfg(r#"{"rules":[{"retries":{"attempts":2,"perTryTimeout":"5s"},"timeout":"1s"}]}"#);
        assert_eq!(decide(&c, StaticRequest::get("/"), &facts("GET"), false).unwrap().expected_ms, Some(1000));
    }

    #[test]
    fn grpc_timeout_parsing() {
        for (v, want) in [
            ("1S", Some(1000)),
            ("250m", Some(250)),
            ("1500u", Some(2)),
            ("1n", Some(1)),
            ("0m", Some(1)),
            ("2M", Some(120_000)),
            ("1H", Some(3_600_000)),
            ("99999999H", Some(359_999_996_400_000)),
            ("123456789S", None),
            ("S", None),
            ("10", None),
            ("10s", None),
            ("-1S", None),
            ("", None),
        ] {
            assert_eq!(parse_grpc_timeout_ms(v), want, "{v:?}");
        }
        assert!(is_grpc(Some("application/grpc")));
        assert!(is_grpc(Some("application/grpc+proto")));
        assert!(!is_grpc(Some("application/grpc-web")));
        assert!(!is_grpc(None));
    }

    proptest! {
        /// The outgoing timeout is never above any deadline that applies, never 0 when one
        /// applies, and the next hop's budget never exceeds it.
        #[test]
        fn deadline_is_the_minimum(policy in 0u64..10_000, grpc in proptest::option::of(0u64..10_000), trusted in any::<bool>(), expected in proptest::option::of(0u64..10_000), per_try in proptest::option::of(1u64..10_000)) {
            let per = per_try.map_or(String::new(), |p| format!(r#","perTryTimeout":"{p}ms""#));
            let c = cfg(&format!(r#"{{"rules":[{{"retries":{{"attempts":2{per}}},"timeout":"{policy}ms"}}],"trustClientHeaders":{trusted}}}"#));
            let g = grpc.map(|g| format!("{g}m"));
            let e = expected.map(|e| e.to_string());
            let f = Facts { method: "GET", is_grpc: true, grpc_timeout: g.as_deref(), expected_ms: e.as_deref() };
            let p = decide(&c, StaticRequest::get("/"), &f, false).unwrap();
            let t = p.timeout_ms.unwrap();
            let applicable: Vec<u64> = [Some(policy).filter(|v| *v > 0), grpc.map(|g| g.max(1)), expected.filter(|e| trusted && *e > 0)].into_iter().flatten().collect();
            match applicable.iter().min() {
                Some(m) => {
                    prop_assert_eq!(t, *m);
                    prop_assert!(p.expected_ms.unwrap() <= t);
                    prop_assert_eq!(p.grpc_timeout, Some(format!("{t}m")));
                }
                None => { prop_assert_eq!(t, 0); prop_assert_eq!(p.expected_ms, None); }
            }
        }

        /// Non-idempotent requests never get a re-executing condition.
        #[test]
        fn guarded_requests_never_reexecute(method in "(GET|POST|PATCH|PUT|DELETE|CONNECT)", conds in proptest::sample::subsequence(vec!["5xx","gateway-error","reset","connect-failure","refused-stream","retriable-4xx","503","unavailable"], 1..8)) {
            let c = cfg(&format!(r#"{{"rules":[{{"retries":{{"attempts":2,"retryOn":"{}"}}}}]}}"#, conds.join(",")));
            let p = decide(&c, StaticRequest::get("/"), &facts(&method), false).unwrap();
            let idempotent = crate::config::DEFAULT_IDEMPOTENT_METHODS.contains(&method.as_str());
            if !idempotent {
                if let Some(h) = p.retry {
                    for cond in h.retry_on.split(',').filter(|s| !s.is_empty()) {
                        prop_assert!(crate::config::HTTP_CONDITIONS.iter().any(|(n, re)| *n == cond && !re), "{}", cond);
                    }
                    prop_assert!(h.status_codes.is_empty());
                }
            } else {
                prop_assert!(!p.idempotency_skipped);
            }
        }
    }
}
