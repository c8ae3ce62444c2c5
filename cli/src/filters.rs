//! THE table of filters the `meshwasm` command knows: how to check a configuration (the
//! module's own parser, run on the host), and where the filter goes in Istio.
//!
//! A filter that lands later joins with one [`FilterSpec`] entry here (and, when it takes
//! Istio resources, one entry in [`crate::istio::SOURCES`]).

use meshwasm_sdk_ext::config::ConfigError;
use meshwasm_sdk_ext::fake::FakeHost;
use meshwasm_sdk_ext::filter::Plugin;
use serde_json::Value;

/// Where a filter goes in Istio's HTTP filter chain, and what to do when it cannot load.
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    /// WasmPlugin `phase`; `None` is UNSPECIFIED_PHASE (the end of the chain, before the
    /// router).
    pub phase: Option<&'static str>,
    /// WasmPlugin `priority` within the phase (higher runs first); `None` leaves it unset (0).
    pub priority: Option<i64>,
    /// WasmPlugin `failStrategy`: `FAIL_OPEN` or `FAIL_CLOSE`.
    pub fail_strategy: &'static str,
    /// WasmPlugin `match[].mode` when the filter belongs on one side of the proxy.
    pub mode: Option<&'static str>,
    /// Why: written as a comment into every generated manifest, and in docs/distribution.md.
    pub why: &'static str,
}

/// A per-route override checker.
pub type RouteCheck = fn(&Value) -> Result<(), ConfigError>;

/// One filter module.
pub struct FilterSpec {
    /// The module name: `dist/<name>.wasm`, the route-metadata key, `meshwasm.<name>` ids.
    pub name: &'static str,
    /// The plugin configuration through the filter's own `Plugin::configure`.
    pub check: fn(&[u8]) -> Result<(), ConfigError>,
    /// A per-route override (`filter_metadata.meshwasm.<name>`) through the filter's parser.
    pub check_route: Option<RouteCheck>,
    pub placement: Placement,
}

/// Runs `P::configure` against the in-memory host: exactly the code `on_configure` runs in
/// Envoy, so the same configuration is accepted or refused with the same message.
fn configure<P: Plugin>(bytes: &[u8]) -> Result<(), ConfigError> {
    let host = FakeHost::new();
    P::configure(bytes, &host).map(drop)
}

pub const FILTERS: &[FilterSpec] = &[
    FilterSpec {
        name: "fault",
        check: configure::<meshwasm_fault::FaultPlugin>,
        check_route: Some(|v| meshwasm_fault::config::Config::from_route_value(v).map(drop)),
        placement: Placement {
            phase: None,
            priority: None,
            fail_strategy: "FAIL_OPEN",
            mode: Some("CLIENT"),
            why: "No phase (UNSPECIFIED_PHASE): the end of the chain, right before the router, after \
                  Istio's authn, authz and stats filters, where Istio's own fault filter acts: a request \
                  that authorization denies is denied, not delayed, and Istio's request metrics count the \
                  injected aborts and delays. mode CLIENT: Istio applies VirtualService faults in the \
                  calling proxy. FAIL_OPEN: a fault injector is a test tool; if it cannot load, let \
                  traffic through.",
        },
    },
    FilterSpec {
        name: "ratelimit",
        check: configure::<meshwasm_ratelimit::RateLimitPlugin>,
        check_route: Some(|v| meshwasm_ratelimit::config::Config::from_route_value(v).map(drop)),
        placement: Placement {
            phase: None,
            priority: Some(10),
            fail_strategy: "FAIL_OPEN",
            mode: None,
            why: "No phase (UNSPECIFIED_PHASE), after Istio's authn and authz filters: requests that \
                  authorization denies never spend a token (nor make up keys that evict real ones), \
                  and Istio's request metrics count the 429s. priority 10 runs it before meshwasm \
                  fault (priority 0) in the same phase: a request over its limit is refused before a \
                  fault would delay it, and limits count real demand. FAIL_OPEN: like the rate-limit \
                  service's failureMode allow, a limiter that cannot load lets traffic through.",
        },
    },
    FilterSpec {
        name: "retry",
        check: configure::<meshwasm_retry::RetryPlugin>,
        check_route: Some(|v| meshwasm_retry::config::Config::from_route_value(v).map(drop)),
        placement: Placement {
            phase: None,
            priority: Some(-10),
            fail_strategy: "FAIL_OPEN",
            mode: Some("CLIENT"),
            why: "No phase (UNSPECIFIED_PHASE): the end of the chain, right before the router whose \
                  x-envoy-* request headers it sets; priority -10 runs it after meshwasm ratelimit and \
                  fault in that phase, so a request they refuse never reserves retry budget. mode \
                  CLIENT: Istio applies VirtualService retries and timeouts in the calling proxy. \
                  FAIL_OPEN: without the filter the route's own retry policy and timeout apply.",
        },
    },
    FilterSpec {
        name: "authz",
        check: configure::<meshwasm_authz::AuthzPlugin>,
        check_route: None,
        placement: Placement {
            phase: Some("AUTHZ"),
            priority: None,
            fail_strategy: "FAIL_CLOSE",
            mode: None,
            why: "phase AUTHZ: where Istio puts its own RBAC and ext_authz filters, after \
                  authentication and before stats, so denied requests are counted. No mode: select the \
                  workloads (or gateway) the AuthorizationPolicy selects. FAIL_CLOSE: security never \
                  fails open; a policy that cannot load denies (Istio answers 500 until it loads).",
        },
    },
    FilterSpec {
        name: "telemetry",
        check: configure::<meshwasm_telemetry::TelemetryPlugin>,
        check_route: None,
        placement: Placement {
            phase: Some("STATS"),
            priority: None,
            fail_strategy: "FAIL_OPEN",
            mode: None,
            why: "phase STATS: where Istio's own stats filter runs, after authn and authz, so it sees \
                  their denials and the final response. No mode: the reporter follows the traffic \
                  direction (source on outbound, destination on inbound), as Istio's does. FAIL_OPEN: \
                  metrics must never stop traffic.",
        },
    },
];

/// The filter named `name`.
pub fn find(name: &str) -> Result<&'static FilterSpec, String> {
    FILTERS.iter().find(|f| f.name == name).ok_or_else(|| {
        let known: Vec<&str> = FILTERS.iter().map(|f| f.name).collect();
        format!("unknown filter `{name}` (known: {})", known.join(", "))
    })
}

/// Checks a plugin configuration with the filter's own parser.
pub fn check(filter: &str, bytes: &[u8]) -> Result<(), String> {
    let spec = find(filter)?;
    (spec.check)(bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_what_the_module_accepts_and_names_the_path_of_what_it_refuses() {
        assert_eq!(check("fault", br#"{"headerControl": true}"#), Ok(()));
        let e = check("fault", br#"{"rules":[{"fault":{"abort":{"httpStatus":700}}}]}"#).unwrap_err();
        assert!(e.starts_with("rules[0].fault.abort.httpStatus: "), "{e}");
        let e = check("ratelimit", br#"{"rules":[{"tokenBucket":{"maxTokens":0,"fillInterval":"1s"}}]}"#).unwrap_err();
        assert!(e.starts_with("rules[0].tokenBucket.maxTokens"), "{e}");
        assert!(check("fault", b"{").is_err());
        assert_eq!(check("retry", br#"{"rules":[{"retries":{"attempts":2}}]}"#), Ok(()));
        let e = check("retry", br#"{"rules":[{"retries":{"attempts":2,"retryOn":"bogus"}}]}"#).unwrap_err();
        assert!(e.starts_with("rules[0].retries.retryOn: "), "{e}");
        assert_eq!(check("authz", br#"{"policies":[]}"#), Ok(()));
        assert_eq!(check("telemetry", b"{}"), Ok(()));
        let e = check("telemetry", br#"{"maxSeries":0}"#).unwrap_err();
        assert!(e.starts_with("maxSeries: "), "{e}");
        assert!(check("nope", b"{}").unwrap_err().contains("unknown filter `nope`"));
    }

    #[test]
    fn route_overrides_use_the_route_parser() {
        let route = find("fault").unwrap().check_route.unwrap();
        assert!(route(&serde_json::json!({"maxActiveFaults": 3})).unwrap_err().to_string().contains("plugin-wide"));
        assert!(route(&serde_json::json!({})).is_ok());
    }
}
