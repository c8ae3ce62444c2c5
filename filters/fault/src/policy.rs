//! Pure fault decisions, with the semantics of Envoy's `envoy.filters.http.fault`:
//!
//! - the first matching rule applies; with header control, an implicit last rule applies to
//!   requests no rule matched;
//! - the delay is decided when the request headers arrive; the abort is decided when the
//!   delay has elapsed (or at once without a delay);
//! - header values are parsed as Envoy does (`absl::SimpleAtoi`: surrounding whitespace and
//!   a leading `+` allowed), invalid values mean "no fault" for the fault headers and "the
//!   configured cap" for the percentage headers.

use std::time::Duration;

use meshwasm_sdk_ext::matcher::RequestView;
use meshwasm_sdk_ext::percent::Fraction;
use meshwasm_sdk_ext::rng::Rng;

use crate::config::{Abort, AbortStatus, Config, HeaderControl, Rule, HEADER_CONTROL_RULE};

pub const ABORT_REQUEST: &str = "x-envoy-fault-abort-request";
pub const ABORT_GRPC_REQUEST: &str = "x-envoy-fault-abort-grpc-request";
pub const ABORT_REQUEST_PERCENTAGE: &str = "x-envoy-fault-abort-request-percentage";
pub const DELAY_REQUEST: &str = "x-envoy-fault-delay-request";
pub const DELAY_REQUEST_PERCENTAGE: &str = "x-envoy-fault-delay-request-percentage";

/// The body of an abort reply, as Envoy's fault filter sends it.
pub const ABORT_BODY: &str = "fault filter abort";
/// Envoy's response code details for a fault abort.
pub const ABORT_DETAILS: &str = "fault_filter_abort";

/// The faults that may apply to one request, from the rule (or header control) it matched.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan<'c> {
    /// Metrics label: the rule name or `header-control`.
    pub label: &'c str,
    /// Delay duration if the delay fires (percentage already sampled).
    pub delay: Option<Duration>,
    /// The abort to evaluate after the delay.
    pub abort: Option<Abort>,
}

/// Which rule applies to the request, and what it could do. Draws randomness for the delay.
pub fn plan<'c>(config: &'c Config, req: &mut dyn RequestView, rng: &mut impl Rng) -> Option<Plan<'c>> {
    if let Some(rule) = config.rules.iter().find(|r| r.matches.matches(req)) {
        return Some(rule_plan(rule, rng));
    }
    let hc = config.header_control?;
    Some(header_plan(&hc, req, rng))
}

fn rule_plan<'c>(rule: &'c Rule, rng: &mut impl Rng) -> Plan<'c> {
    let delay = rule.delay.as_ref().filter(|d| d.percentage.sample(rng)).map(|d| d.fixed);
    Plan { label: &rule.name, delay, abort: rule.abort.clone() }
}

fn header_plan<'c>(hc: &HeaderControl, req: &mut dyn RequestView, rng: &mut impl Rng) -> Plan<'c> {
    // Headers are read lazily (a request without fault headers costs three lookups): the
    // percentage header only matters once its fault header is valid, and sampling after the
    // parse draws from the same distribution as Envoy's percentage-first order.
    // Delay: a duration in ms; 0 or invalid means no delay.
    let delay = req
        .header(DELAY_REQUEST)
        .as_deref()
        .and_then(simple_atoi_u64)
        .filter(|ms| *ms > 0)
        .filter(|_| header_percentage(req.header(DELAY_REQUEST_PERCENTAGE).as_deref(), hc.delay_cap).sample(rng))
        .map(Duration::from_millis);
    // Abort: an HTTP status in 200..=599 wins; else a gRPC status (sent with HTTP 200).
    let http = req.header(ABORT_REQUEST).as_deref().and_then(simple_atoi_u64).filter(|c| (200..600).contains(c));
    let status = match http {
        Some(code) => Some(AbortStatus { http: code as u32, grpc: None }),
        None => req
            .header(ABORT_GRPC_REQUEST)
            .as_deref()
            .and_then(simple_atoi_u64)
            .map(|g| AbortStatus { http: 200, grpc: Some(g) }),
    };
    let abort = status.map(|status| Abort {
        status,
        percentage: header_percentage(req.header(ABORT_REQUEST_PERCENTAGE).as_deref(), hc.abort_cap),
    });
    Plan { label: HEADER_CONTROL_RULE, delay, abort }
}

/// The percentage header: a whole percent, clamped to the cap; absent or invalid → the cap.
pub fn header_percentage(value: Option<&str>, cap: Fraction) -> Fraction {
    match value.and_then(simple_atoi_u32) {
        Some(n) => Fraction::from_percent(u64::from(n)).min(cap),
        None => cap,
    }
}

/// Decide the abort (after any delay): `Some(status)` if it fires.
pub fn decide_abort(abort: Option<&Abort>, rng: &mut impl Rng) -> Option<AbortStatus> {
    let a = abort?;
    a.percentage.sample(rng).then_some(a.status)
}

/// `absl::SimpleAtoi` for unsigned integers: ASCII whitespace around, optional `+`, digits,
/// no overflow.
pub fn simple_atoi_u64(s: &str) -> Option<u64> {
    let t = s.trim_matches(|c: char| c.is_ascii_whitespace() || c == '\x0b');
    let t = t.strip_prefix('+').unwrap_or(t);
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse().ok()
}

fn simple_atoi_u32(s: &str) -> Option<u32> {
    simple_atoi_u64(s).and_then(|v| u32::try_from(v).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshwasm_sdk_ext::matcher::StaticRequest;
    use meshwasm_sdk_ext::rng::{Sequence, WyRand};
    use proptest::prelude::*;

    fn cfg(json: &str) -> Config {
        Config::from_json(json.as_bytes()).unwrap()
    }

    #[test]
    fn first_matching_rule_wins_then_header_control() {
        let c = cfg(r#"{"rules":[
            {"name":"a","match":[{"uri":{"prefix":"/a"}}],"fault":{"abort":{"httpStatus":503,"percentage":{"value":100}}}},
            {"name":"b","match":[{"uri":{"prefix":"/a"}}],"fault":{"abort":{"httpStatus":500,"percentage":{"value":100}}}}],
            "headerControl":true}"#);
        let mut rng = WyRand::new(1);
        let p = plan(&c, &mut StaticRequest::get("/a/1"), &mut rng).unwrap();
        assert_eq!(p.label, "a");
        assert_eq!(decide_abort(p.abort.as_ref(), &mut rng), Some(AbortStatus { http: 503, grpc: None }));
        let p = plan(&c, &mut StaticRequest::get("/b"), &mut rng).unwrap();
        assert_eq!(p.label, "header-control");
        assert_eq!(p.abort, None);
        assert_eq!(p.delay, None);
        assert!(plan(&cfg(r#"{"rules":[]}"#), &mut StaticRequest::get("/"), &mut rng).is_none());
    }

    #[test]
    fn header_values_like_envoy() {
        let c = cfg(r#"{"headerControl":true}"#);
        let mut rng = WyRand::new(2);
        let abort = |h: &[(&str, &str)], rng: &mut WyRand| {
            let mut req = StaticRequest::get("/");
            for (k, v) in h {
                req = req.header(k, v);
            }
            let p = plan(&c, &mut req, rng).unwrap();
            (decide_abort(p.abort.as_ref(), rng), p.delay)
        };
        let http = |c| Some(AbortStatus { http: c, grpc: None });
        let grpc = |g| Some(AbortStatus { http: 200, grpc: Some(g) });
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<AbortStatus>, Option<Duration>);
        let table: &[Case] = &[
            (&[(ABORT_REQUEST, "503")], http(503), None),
            (&[(ABORT_REQUEST, " +429 ")], http(429), None),
            (&[(ABORT_REQUEST, "200")], http(200), None),
            (&[(ABORT_REQUEST, "599")], http(599), None),
            (&[(ABORT_REQUEST, "199")], None, None),
            (&[(ABORT_REQUEST, "600")], None, None),
            (&[(ABORT_REQUEST, "abc")], None, None),
            (&[(ABORT_REQUEST, "-503")], None, None),
            (&[(ABORT_REQUEST, "")], None, None),
            (&[(ABORT_GRPC_REQUEST, "14")], grpc(14), None),
            (&[(ABORT_REQUEST, "700"), (ABORT_GRPC_REQUEST, "4")], grpc(4), None),
            (&[(ABORT_REQUEST, "503"), (ABORT_GRPC_REQUEST, "4")], http(503), None),
            (&[(ABORT_GRPC_REQUEST, "x")], None, None),
            (&[(ABORT_REQUEST, "503"), (ABORT_REQUEST_PERCENTAGE, "0")], None, None),
            (&[(ABORT_REQUEST, "503"), (ABORT_REQUEST_PERCENTAGE, "x")], http(503), None),
            (&[(ABORT_REQUEST, "503"), (ABORT_REQUEST_PERCENTAGE, "100")], http(503), None),
            (&[(ABORT_REQUEST, "503"), (ABORT_REQUEST_PERCENTAGE, "5000")], http(503), None),
            (&[(DELAY_REQUEST, "200")], None, Some(Duration::from_millis(200))),
            (&[(DELAY_REQUEST, "0")], None, None),
            (&[(DELAY_REQUEST, "-5")], None, None),
            (&[(DELAY_REQUEST, "1.5")], None, None),
            (&[(DELAY_REQUEST, "200"), (DELAY_REQUEST_PERCENTAGE, "0")], None, None),
        ];
        for (headers, want_abort, want_delay) in table {
            assert_eq!(abort(headers, &mut rng), (*want_abort, *want_delay), "{headers:?}");
        }
    }

    #[test]
    fn header_percentage_is_capped() {
        let cap = Fraction { numerator: 200_000, denominator: 1_000_000 };
        assert_eq!(header_percentage(Some("50"), cap), cap);
        assert_eq!(header_percentage(Some("10"), cap), Fraction::from_percent(10));
        assert_eq!(header_percentage(None, cap), cap);
        assert_eq!(header_percentage(Some("4294967296"), cap), cap, "u32 overflow is invalid");
    }

    #[test]
    fn percentages_sample_with_envoy_arithmetic() {
        // random % 1_000_000 < numerator
        let c = cfg(r#"{"rules":[{"fault":{"delay":{"fixedDelay":"1s","percentage":{"value":0.1}}}}]}"#);
        let mut seq = Sequence::new(vec![999, 1000, 1_000_999]);
        let d: Vec<_> = (0..3).map(|_| plan(&c, &mut StaticRequest::get("/"), &mut seq).unwrap().delay).collect();
        assert_eq!(d, vec![Some(Duration::from_secs(1)), None, Some(Duration::from_secs(1))]);
    }

    proptest! {
        #[test]
        fn atoi_never_panics_and_roundtrips(s in ".{0,30}", n in any::<u64>()) {
            let _ = simple_atoi_u64(&s);
            prop_assert_eq!(simple_atoi_u64(&n.to_string()), Some(n));
        }

        #[test]
        fn abort_rate_is_binomial(pct in 0u32..=100) {
            let c = cfg(&format!(r#"{{"rules":[{{"fault":{{"abort":{{"httpStatus":503,"percentage":{{"value":{pct}}}}}}}}}]}}"#));
            let mut rng = WyRand::new(u64::from(pct));
            let n = 2000.0;
            let hits = (0..2000).filter(|_| {
                let p = plan(&c, &mut StaticRequest::get("/"), &mut rng).unwrap();
                decide_abort(p.abort.as_ref(), &mut rng).is_some()
            }).count() as f64;
            let p = f64::from(pct) / 100.0;
            let bound = 5.0 * (n * p * (1.0 - p)).sqrt() + 1.0;
            prop_assert!((hits - n * p).abs() <= bound, "pct {} hits {}", pct, hits);
        }
    }
}
