//! Retry configuration: Istio `HTTPRetry` and `timeout` inside match rules, plus what Istio
//! does not expose (retry budgets, idempotency guards, hedging). JSON → `RetryConfigJson`
//! (serde, unknown fields rejected) → `Config` (validated, immutable, shared by every stream).
//!
//! `retryOn` is split as istiod splits it (`pilot/pkg/networking/core/route/retry`): integers
//! are retriable status codes (and add `retriable-status-codes`), the rest are conditions. We
//! further split the conditions into HTTP ones (`x-envoy-retry-on`) and gRPC ones
//! (`x-envoy-retry-grpc-on`), because the router ignores gRPC names in `x-envoy-retry-on`.

use std::time::Duration;

use meshwasm_sdk_ext::config::{rule_name, ConfigError, Path, RuleLabels};
use meshwasm_sdk_ext::duration::parse_duration;
use meshwasm_sdk_ext::matcher::{MatchJson, MatchList};
use serde::Deserialize;
use serde_json::Value;

// === JSON ===

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryConfigJson {
    #[serde(default)]
    pub rules: Vec<RuleJson>,
    /// Keep the router headers a client sent (`x-envoy-retry-on`, `x-envoy-max-retries`, the
    /// timeout headers, …) and honour the client's `x-envoy-expected-rq-timeout-ms` as a
    /// deadline. Default false: they are removed before the filter sets its own.
    pub trust_client_headers: Option<bool>,
    /// Look up per-route overrides in route metadata (default false: it costs one property
    /// read per request).
    pub route_overrides: Option<bool>,
    /// Read the attempt count and response flags in the log phase for every matched request
    /// (the `retries_observed`, `retries_exhausted`, `overflowed`, `timeouts` stats). Rules
    /// with a `budget` always do (the budget is charged from it). Default false: two property
    /// reads per request.
    pub observe_attempts: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleJson {
    pub name: Option<String>,
    #[serde(rename = "match")]
    pub matches: Option<Vec<MatchJson>>,
    /// Istio `HTTPRetry`; absent means Istio's default policy.
    pub retries: Option<HttpRetryJson>,
    /// Istio `timeout`; `"0s"` disables the route timeout. Absent leaves the route's timeout.
    pub timeout: Option<String>,
    pub budget: Option<BudgetJson>,
    pub idempotent_only: Option<bool>,
    pub idempotent_methods: Option<Vec<String>>,
    pub idempotency_key_header: Option<String>,
    /// Envoy's `hedge_on_per_try_timeout`: on a per-try timeout, send another attempt and keep
    /// the first one running. Needs `retries.perTryTimeout`.
    pub hedge_on_per_try_timeout: Option<bool>,
}

/// Istio `HTTPRetry`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRetryJson {
    pub attempts: Option<i64>,
    pub per_try_timeout: Option<String>,
    pub retry_on: Option<String>,
    pub retry_remote_localities: Option<bool>,
    pub retry_ignore_previous_hosts: Option<bool>,
    pub backoff: Option<String>,
}

/// A retry budget (Linkerd's `retryBudget`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BudgetJson {
    pub retry_ratio: Option<f64>,
    pub min_retries_per_second: Option<u64>,
    pub ttl: Option<String>,
}

// === validated ===

/// Istio's default `retryOn` (`retry.DefaultPolicy`), with status code 503.
pub const ISTIO_DEFAULT_RETRY_ON: &str = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";
pub const ISTIO_DEFAULT_STATUS_CODES: &[u16] = &[503];
pub const ISTIO_DEFAULT_ATTEMPTS: u32 = 2;

/// HTTP retry conditions the router accepts in `x-envoy-retry-on`, and whether a retry on
/// them can re-execute a request the upstream already processed.
pub const HTTP_CONDITIONS: &[(&str, bool)] = &[
    ("5xx", true),
    ("gateway-error", true),
    ("reset", true),
    ("reset-before-request", false),
    ("connect-failure", false),
    ("envoy-ratelimited", false),
    ("retriable-4xx", true),
    ("refused-stream", false),
    ("retriable-status-codes", true),
    ("retriable-headers", true),
    ("http3-post-connect-failure", false),
];

/// gRPC retry conditions (`x-envoy-retry-grpc-on`).
pub const GRPC_CONDITIONS: &[&str] =
    &["cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"];

/// Methods RFC 9110 defines as idempotent.
pub const DEFAULT_IDEMPOTENT_METHODS: &[&str] = &["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"];
pub const DEFAULT_IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// The retry headers for the router, rendered at configure time.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RetryHeaders {
    /// `x-envoy-retry-on` (HTTP conditions), empty when none.
    pub retry_on: String,
    /// `x-envoy-retry-grpc-on`, empty when none.
    pub grpc_on: String,
    /// `x-envoy-retriable-status-codes`, empty when none.
    pub status_codes: String,
}

impl RetryHeaders {
    pub fn is_empty(&self) -> bool {
        self.retry_on.is_empty() && self.grpc_on.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Retries {
    /// Retries after the first attempt (Istio `attempts`, Envoy `num_retries`).
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub hedge_on_per_try_timeout: bool,
    /// Every condition.
    pub all: RetryHeaders,
    /// The conditions that cannot re-execute a request (for non-idempotent requests when
    /// `idempotentOnly`); `None` when that is every condition.
    pub safe: Option<RetryHeaders>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Retries allowed per request, in millionths.
    pub ratio_ppm: u64,
    pub min_retries_per_second: u64,
    pub ttl: Duration,
}

impl Budget {
    /// The retries always allowed within one ttl window.
    pub fn reserve(&self) -> u64 {
        let secs = self.ttl.as_millis().div_ceil(1000);
        self.min_retries_per_second.saturating_mul(u64::try_from(secs).unwrap_or(u64::MAX))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    /// Upper-case method names.
    pub methods: Vec<String>,
    /// Lower-case header name.
    pub key_header: String,
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub matches: MatchList,
    /// `None`: retries disabled (`attempts: 0`), the router gets `x-envoy-max-retries: 0`
    /// only if the client asked for retries.
    pub retries: Option<Retries>,
    pub timeout: Option<Duration>,
    pub budget: Option<Budget>,
    /// `None` when `idempotentOnly` is false.
    pub idempotency: Option<Idempotency>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub rules: Vec<Rule>,
    pub trust_client_headers: bool,
    pub route_overrides: bool,
    pub observe_attempts: bool,
}

impl Config {
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        meshwasm_sdk_ext::config::load::<RetryConfigJson, Config>(bytes)
    }

    /// A per-route override from route metadata: same shape without the plugin-wide fields.
    pub fn from_route_value(v: &Value) -> Result<Self, ConfigError> {
        let raw: RetryConfigJson = meshwasm_sdk_ext::config::from_value(v)?;
        for (set, field) in [
            (raw.trust_client_headers.is_some(), "trustClientHeaders"),
            (raw.route_overrides.is_some(), "routeOverrides"),
            (raw.observe_attempts.is_some(), "observeAttempts"),
        ] {
            if set {
                return Err(ConfigError::new(
                    field,
                    "is plugin-wide: set it in the plugin configuration, not in route metadata",
                ));
            }
        }
        let config = Config::try_from(raw)?;
        if let Some((i, _)) = config.rules.iter().enumerate().find(|(_, r)| r.budget.is_some()) {
            return Err(ConfigError::new(
                format!("rules[{i}].budget"),
                "budgets live in shared data created at configure time: set them in the plugin configuration",
            ));
        }
        Ok(config)
    }

    /// Whether the log phase must read the attempt count for `rule`.
    pub fn observes(&self, rule: &Rule) -> bool {
        self.observe_attempts || rule.budget.is_some()
    }
}

impl TryFrom<RetryConfigJson> for Config {
    type Error = ConfigError;

    fn try_from(raw: RetryConfigJson) -> Result<Self, ConfigError> {
        let root = Path::root();
        let mut labels = RuleLabels::new(&[]);
        let mut rules = Vec::with_capacity(raw.rules.len());
        for (i, r) in raw.rules.iter().enumerate() {
            let path = root.field("rules").index(i);
            let rule = Rule::compile(r, i, &path)?;
            labels.claim(&rule.name, &path)?;
            rules.push(rule);
        }
        Ok(Config {
            rules,
            trust_client_headers: raw.trust_client_headers.unwrap_or(false),
            route_overrides: raw.route_overrides.unwrap_or(false),
            observe_attempts: raw.observe_attempts.unwrap_or(false),
        })
    }
}

fn duration(s: &str, path: &Path) -> Result<Duration, ConfigError> {
    parse_duration(s).map_err(|e| path.err(e))
}

/// Envoy's headers carry whole milliseconds: a duration must be a whole number of them.
fn millis(s: &str, path: &Path, min: Duration) -> Result<Duration, ConfigError> {
    let d = duration(s, path)?;
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err(path.err(format!("must be a whole number of milliseconds, got {d:?}")));
    }
    if d < min {
        return Err(path.err(format!("must be at least {min:?}, got {d:?}")));
    }
    Ok(d)
}

impl Rule {
    fn compile(raw: &RuleJson, index: usize, path: &Path) -> Result<Self, ConfigError> {
        let name = rule_name(raw.name.as_deref(), index, path)?;
        let matches = MatchList::compile(raw.matches.as_deref(), &path.field("match"))?;
        let idempotent_only = raw.idempotent_only.unwrap_or(true);
        let idempotency = if idempotent_only {
            Some(Idempotency::compile(raw, path)?)
        } else {
            for (set, field) in [
                (raw.idempotent_methods.is_some(), "idempotentMethods"),
                (raw.idempotency_key_header.is_some(), "idempotencyKeyHeader"),
            ] {
                if set {
                    return Err(path.field(field).err("has no effect with idempotentOnly: false"));
                }
            }
            None
        };
        let default_retries = HttpRetryJson::default();
        let retries_raw = raw.retries.as_ref();
        let retries = Retries::compile(
            retries_raw.unwrap_or(&default_retries),
            retries_raw.is_none(),
            raw.hedge_on_per_try_timeout.unwrap_or(false),
            &path.field("retries"),
            path,
        )?;
        let timeout = raw.timeout.as_deref().map(|t| millis(t, &path.field("timeout"), Duration::ZERO)).transpose()?;
        let budget = raw.budget.as_ref().map(|b| Budget::compile(b, &path.field("budget"))).transpose()?;
        if budget.is_some() && retries.is_none() {
            return Err(path.field("budget").err("has no effect when retries are disabled (retries.attempts: 0)"));
        }
        Ok(Rule { name, matches, retries, timeout, budget, idempotency })
    }
}

impl Idempotency {
    fn compile(raw: &RuleJson, path: &Path) -> Result<Self, ConfigError> {
        let methods = match &raw.idempotent_methods {
            None => DEFAULT_IDEMPOTENT_METHODS.iter().map(|m| (*m).to_string()).collect(),
            Some(ms) => {
                let mut out = Vec::with_capacity(ms.len());
                for (i, m) in ms.iter().enumerate() {
                    if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-' || b == b'_') {
                        return Err(path
                            .field("idempotentMethods")
                            .index(i)
                            .err(format!("must be an HTTP method name, got {m:?}")));
                    }
                    out.push(m.to_ascii_uppercase());
                }
                out
            }
        };
        let key_header = raw.idempotency_key_header.as_deref().unwrap_or(DEFAULT_IDEMPOTENCY_KEY_HEADER);
        if key_header.is_empty()
            || key_header.starts_with(':')
            || !key_header.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.!#$%&'*+^`|~".contains(&b))
        {
            return Err(path.field("idempotencyKeyHeader").err(format!("must be a header name, got {key_header:?}")));
        }
        Ok(Idempotency { methods, key_header: key_header.to_ascii_lowercase() })
    }
}

/// HTTP conditions, gRPC conditions, status codes.
pub type RetryOnParts = (Vec<&'static str>, Vec<&'static str>, Vec<u16>);

/// istiod's `parseRetryOn`, then split by kind.
pub fn parse_retry_on(s: &str, path: &Path) -> Result<RetryOnParts, ConfigError> {
    let (mut http, mut grpc, mut codes) = (Vec::new(), Vec::new(), Vec::new());
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Ok(code) = part.parse::<u16>() {
            // istiod keeps integers that are HTTP status codes Go knows; Envoy accepts
            // 100..=599 in retriable_status_codes.
            if !(100..=599).contains(&code) {
                return Err(path.err(format!("status code {code} must be in 100..=599")));
            }
            if !codes.contains(&code) {
                codes.push(code);
            }
        } else if let Some((name, _)) = HTTP_CONDITIONS.iter().find(|(n, _)| *n == part) {
            if !http.contains(name) {
                http.push(*name);
            }
        } else if let Some(name) = GRPC_CONDITIONS.iter().find(|n| **n == part) {
            if !grpc.contains(name) {
                grpc.push(*name);
            }
        } else {
            let known: Vec<&str> =
                HTTP_CONDITIONS.iter().map(|(n, _)| *n).chain(GRPC_CONDITIONS.iter().copied()).collect();
            return Err(path.err(format!(
                "unknown retry condition {part:?}: expected an HTTP status code or one of {}",
                known.join(", ")
            )));
        }
    }
    if !codes.is_empty() && !http.contains(&"retriable-status-codes") {
        http.push("retriable-status-codes");
    }
    Ok((http, grpc, codes))
}

fn render(http: &[&str], grpc: &[&str], codes: &[u16]) -> RetryHeaders {
    let codes = if http.contains(&"retriable-status-codes") { codes } else { &[] };
    RetryHeaders {
        retry_on: http.join(","),
        grpc_on: grpc.join(","),
        status_codes: codes.iter().map(u16::to_string).collect::<Vec<_>>().join(","),
    }
}

fn is_reexecuting(cond: &str) -> bool {
    HTTP_CONDITIONS.iter().any(|(n, re)| *n == cond && *re)
}

impl Retries {
    fn compile(
        raw: &HttpRetryJson,
        istio_default: bool,
        hedge: bool,
        path: &Path,
        rule_path: &Path,
    ) -> Result<Option<Self>, ConfigError> {
        // Route-level settings a header cannot carry: they come from the carrier route's
        // retry_policy (envoy-configs/retry-carrier.yaml). Values equal to the carrier's are
        // accepted; others are refused rather than silently ignored.
        if let Some(b) = &raw.backoff {
            duration(b, &path.field("backoff"))?;
            return Err(path.field("backoff").err(
                "cannot be set per request: set retry_back_off.base_interval in the route's carrier retry_policy (see docs/retry.md#carrier)",
            ));
        }
        if raw.retry_remote_localities == Some(true) {
            return Err(path.field("retryRemoteLocalities").err(
                "cannot be set per request: add the previous_priorities retry_priority to the route's carrier retry_policy (see docs/retry.md#carrier)",
            ));
        }
        if raw.retry_ignore_previous_hosts == Some(false) {
            return Err(path.field("retryIgnorePreviousHosts").err(
                "cannot be set per request: remove the previous_hosts predicate from the route's carrier retry_policy (see docs/retry.md#carrier)",
            ));
        }
        let attempts = if istio_default {
            ISTIO_DEFAULT_ATTEMPTS
        } else {
            match raw.attempts {
                // Istio: "attempts: 0" (or unset inside `retries`) disables retries.
                None | Some(0) => {
                    if raw.per_try_timeout.is_some() || raw.retry_on.is_some() || hedge {
                        return Err(path.field("attempts").err(
                            "is 0 (or unset), which disables retries: set attempts, or remove perTryTimeout/retryOn",
                        ));
                    }
                    return Ok(None);
                }
                Some(n) if !(1..=1000).contains(&n) => {
                    return Err(path.field("attempts").err(format!("must be in 0..=1000, got {n}")));
                }
                Some(n) => u32::try_from(n).unwrap_or(0),
            }
        };
        let per_try_timeout = raw
            .per_try_timeout
            .as_deref()
            .map(|t| millis(t, &path.field("perTryTimeout"), Duration::from_millis(1)))
            .transpose()?;
        if hedge && per_try_timeout.is_none() {
            return Err(rule_path.field("hedgeOnPerTryTimeout").err("needs retries.perTryTimeout"));
        }
        let (http, grpc, codes) = match raw.retry_on.as_deref().filter(|s| !s.trim().is_empty()) {
            Some(s) => parse_retry_on(s, &path.field("retryOn"))?,
            None => {
                let (http, grpc, _) = parse_retry_on(ISTIO_DEFAULT_RETRY_ON, &path.field("retryOn"))?;
                (http, grpc, ISTIO_DEFAULT_STATUS_CODES.to_vec())
            }
        };
        let all = render(&http, &grpc, &codes);
        let safe_http: Vec<&str> = http.iter().copied().filter(|c| !is_reexecuting(c)).collect();
        let safe = (safe_http.len() != http.len()).then(|| render(&safe_http, &grpc, &[]));
        Ok(Some(Retries { attempts, per_try_timeout, hedge_on_per_try_timeout: hedge, all, safe }))
    }
}

impl Budget {
    fn compile(raw: &BudgetJson, path: &Path) -> Result<Self, ConfigError> {
        let ratio = raw.retry_ratio.unwrap_or(0.2);
        if !(0.0..=1000.0).contains(&ratio) {
            return Err(path.field("retryRatio").err(format!("must be in 0..=1000, got {ratio}")));
        }
        let min = raw.min_retries_per_second.unwrap_or(10);
        if min > 1_000_000 {
            return Err(path.field("minRetriesPerSecond").err(format!("must be at most 1000000, got {min}")));
        }
        let ttl = match &raw.ttl {
            Some(t) => duration(t, &path.field("ttl"))?,
            None => Duration::from_secs(10),
        };
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&ttl) {
            return Err(path.field("ttl").err(format!("must be in 1s..=60s, got {ttl:?}")));
        }
        // Rounded to the nearest millionth.
        let ratio_ppm = (ratio * 1_000_000.0 + 0.5) as u64;
        Ok(Budget { ratio_ppm, min_retries_per_second: min, ttl })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        Config::from_json(json.as_bytes()).unwrap_err().to_string()
    }

    fn one(json: &str) -> Rule {
        Config::from_json(json.as_bytes()).unwrap().rules.remove(0)
    }

    #[test]
    fn istio_default_policy() {
        let r = one(r#"{"rules":[{}]}"#);
        assert_eq!(r.name, "rule-0");
        let re = r.retries.unwrap();
        assert_eq!(re.attempts, 2);
        assert_eq!(re.per_try_timeout, None);
        assert_eq!(
            re.all,
            RetryHeaders {
                retry_on: "connect-failure,refused-stream,retriable-status-codes".into(),
                grpc_on: "unavailable,cancelled".into(),
                status_codes: "503".into(),
            }
        );
        assert_eq!(
            re.safe,
            Some(RetryHeaders {
                retry_on: "connect-failure,refused-stream".into(),
                grpc_on: "unavailable,cancelled".into(),
                status_codes: String::new(),
            })
        );
        assert_eq!(r.timeout, None);
        assert!(r.idempotency.is_some());
    }

    #[test]
    fn istio_retry_on_split() {
        let r = one(
            r#"{"rules":[{"retries":{"attempts":3,"perTryTimeout":"2s","retryOn":"gateway-error, 409,deadline-exceeded,409,503"},"timeout":"10s"}]}"#,
        );
        let re = r.retries.unwrap();
        assert_eq!(re.attempts, 3);
        assert_eq!(re.per_try_timeout, Some(Duration::from_secs(2)));
        assert_eq!(re.all.retry_on, "gateway-error,retriable-status-codes");
        assert_eq!(re.all.grpc_on, "deadline-exceeded");
        assert_eq!(re.all.status_codes, "409,503");
        assert_eq!(re.safe.unwrap(), RetryHeaders { grpc_on: "deadline-exceeded".into(), ..Default::default() });
        assert_eq!(r.timeout, Some(Duration::from_secs(10)));
        // Only safe conditions: nothing to guard.
        let r = one(r#"{"rules":[{"retries":{"attempts":1,"retryOn":"connect-failure,reset-before-request"}}]}"#);
        assert_eq!(r.retries.unwrap().safe, None);
    }

    #[test]
    fn attempts_zero_disables() {
        assert!(one(r#"{"rules":[{"retries":{"attempts":0}}]}"#).retries.is_none());
        assert!(one(r#"{"rules":[{"retries":{}}],"trustClientHeaders":true}"#).retries.is_none());
    }

    #[test]
    fn budget_defaults_are_linkerds() {
        let r = one(r#"{"rules":[{"budget":{}}]}"#);
        let b = r.budget.unwrap();
        assert_eq!(b, Budget { ratio_ppm: 200_000, min_retries_per_second: 10, ttl: Duration::from_secs(10) });
        assert_eq!(b.reserve(), 100);
    }

    #[test]
    fn errors_name_path_and_rule() {
        let cases = [
            (
                r#"{"rules":[{"retries":{"attempts":2,"retryOn":"5xx,bogus"}}]}"#,
                "rules[0].retries.retryOn: unknown retry condition \"bogus\"",
            ),
            (
                r#"{"rules":[{"retries":{"attempts":2,"retryOn":"700"}}]}"#,
                "rules[0].retries.retryOn: status code 700 must be in 100..=599",
            ),
            (r#"{"rules":[{"retries":{"attempts":-1}}]}"#, "rules[0].retries.attempts: must be in 0..=1000, got -1"),
            (r#"{"rules":[{"retries":{"perTryTimeout":"1s"}}]}"#, "rules[0].retries.attempts: is 0 (or unset)"),
            (
                r#"{"rules":[{"retries":{"attempts":2,"perTryTimeout":"1.5ms"}}]}"#,
                "rules[0].retries.perTryTimeout: must be a whole number of milliseconds",
            ),
            (
                r#"{"rules":[{"retries":{"attempts":2,"perTryTimeout":"0s"}}]}"#,
                "rules[0].retries.perTryTimeout: must be at least 1ms",
            ),
            (r#"{"rules":[{"timeout":"soon"}]}"#, "rules[0].timeout: invalid duration"),
            (
                r#"{"rules":[{"retries":{"attempts":2,"backoff":"25ms"}}]}"#,
                "rules[0].retries.backoff: cannot be set per request",
            ),
            (
                r#"{"rules":[{"retries":{"attempts":2,"retryRemoteLocalities":true}}]}"#,
                "rules[0].retries.retryRemoteLocalities: cannot be set per request",
            ),
            (
                r#"{"rules":[{"retries":{"attempts":2,"retryIgnorePreviousHosts":false}}]}"#,
                "rules[0].retries.retryIgnorePreviousHosts: cannot be set per request",
            ),
            (
                r#"{"rules":[{"hedgeOnPerTryTimeout":true}]}"#,
                "rules[0].hedgeOnPerTryTimeout: needs retries.perTryTimeout",
            ),
            (r#"{"rules":[{"budget":{"retryRatio":-1}}]}"#, "rules[0].budget.retryRatio: must be in 0..=1000, got -1"),
            (r#"{"rules":[{"budget":{"ttl":"100ms"}}]}"#, "rules[0].budget.ttl: must be in 1s..=60s"),
            (
                r#"{"rules":[{"retries":{"attempts":0},"budget":{}}]}"#,
                "rules[0].budget: has no effect when retries are disabled",
            ),
            (
                r#"{"rules":[{"idempotentOnly":false,"idempotentMethods":["GET"]}]}"#,
                "rules[0].idempotentMethods: has no effect with idempotentOnly: false",
            ),
            (
                r#"{"rules":[{"idempotentMethods":["G E T"]}]}"#,
                "rules[0].idempotentMethods[0]: must be an HTTP method name",
            ),
            (r#"{"rules":[{"idempotencyKeyHeader":":path"}]}"#, "rules[0].idempotencyKeyHeader: must be a header name"),
            (r#"{"rules":[{"name":"a"},{"name":"a"}]}"#, "rules[1].name: duplicate rule name \"a\""),
            (r#"{"rules":[{"retries":{"attempts":2,"retryOnn":"5xx"}}]}"#, "rules[0].retries.retryOnn: unknown field"),
            (r#"{"rules":[{"match":[{"uri":{"regex":"("}}]}]}"#, "rules[0].match[0].uri.regex: invalid regex"),
        ];
        for (json, want) in cases {
            let got = err(json);
            assert!(got.starts_with(want), "{json}\n  got:  {got}\n  want: {want}…");
        }
    }

    #[test]
    fn carrier_defaults_accepted() {
        let r = one(
            r#"{"rules":[{"retries":{"attempts":2,"retryRemoteLocalities":false,"retryIgnorePreviousHosts":true}}]}"#,
        );
        assert_eq!(r.retries.unwrap().attempts, 2);
    }

    #[test]
    fn route_overrides_refuse_plugin_wide_fields() {
        let v: Value = serde_json::from_str(r#"{"trustClientHeaders":true}"#).unwrap();
        assert!(Config::from_route_value(&v)
            .unwrap_err()
            .to_string()
            .starts_with("trustClientHeaders: is plugin-wide"));
        let v: Value = serde_json::from_str(r#"{"rules":[{"budget":{}}]}"#).unwrap();
        assert!(Config::from_route_value(&v).unwrap_err().to_string().starts_with("rules[0].budget: budgets live"));
        let v: Value = serde_json::from_str(r#"{"rules":[{"retries":{"attempts":5}}]}"#).unwrap();
        assert_eq!(Config::from_route_value(&v).unwrap().rules[0].retries.as_ref().unwrap().attempts, 5);
    }
}
