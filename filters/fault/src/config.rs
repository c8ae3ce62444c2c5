//! Fault configuration: Istio `HTTPFaultInjection` inside match rules, plus Envoy's
//! header-controlled faults. JSON → `FaultConfigJson` (serde, unknown fields rejected) →
//! `Config` (validated, immutable, shared by every stream).

use std::time::Duration;

use meshwasm_sdk_ext::config::{rule_name, ConfigError, Path, RuleLabels};
use meshwasm_sdk_ext::duration::parse_duration;
use meshwasm_sdk_ext::matcher::{MatchJson, MatchList};
use meshwasm_sdk_ext::percent::{Fraction, Percentage};
use serde::Deserialize;
use serde_json::Value;

// === JSON ===

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultConfigJson {
    #[serde(default)]
    pub rules: Vec<RuleJson>,
    /// `true`, `false`, or `{"abort": {"percentage": …}, "delay": {"percentage": …}}`.
    pub header_control: Option<Value>,
    pub max_active_faults: Option<u64>,
    /// Look up per-route overrides in route metadata (default true). Turning it off saves
    /// one property read per request for deployments that do not use overrides.
    pub route_overrides: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleJson {
    pub name: Option<String>,
    #[serde(rename = "match")]
    pub matches: Option<Vec<MatchJson>>,
    pub fault: FaultJson,
}

/// Istio `HTTPFaultInjection`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultJson {
    pub delay: Option<DelayJson>,
    pub abort: Option<AbortJson>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DelayJson {
    pub fixed_delay: Option<String>,
    pub exponential_delay: Option<String>,
    pub percentage: Option<Percentage>,
    /// Deprecated in Istio, still accepted: a whole percent.
    pub percent: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AbortJson {
    pub http_status: Option<i64>,
    pub grpc_status: Option<Value>,
    pub http2_error: Option<String>,
    pub percentage: Option<Percentage>,
    pub percent: Option<u32>,
}

// === validated ===

/// How a request is aborted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbortStatus {
    /// The HTTP status of the local reply (200 for a gRPC abort, as Envoy does).
    pub http: u32,
    /// The gRPC status for gRPC requests; `None` means Envoy maps it from `http`. Header
    /// control passes any unsigned integer through, as Envoy does.
    pub grpc: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Delay {
    pub fixed: Duration,
    pub percentage: Fraction,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Abort {
    pub status: AbortStatus,
    pub percentage: Fraction,
}

#[derive(Debug, Clone)]
pub struct Rule {
    /// Label for metrics and logs: the rule's name, or `rule-<index>`.
    pub name: String,
    pub matches: MatchList,
    pub delay: Option<Delay>,
    pub abort: Option<Abort>,
}

/// Header control: the `x-envoy-fault-*` request headers, with percentage caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderControl {
    pub abort_cap: Fraction,
    pub delay_cap: Fraction,
}

/// Metrics label of header-controlled faults.
pub const HEADER_CONTROL_RULE: &str = "header-control";

#[derive(Debug, Clone)]
pub struct Config {
    pub rules: Vec<Rule>,
    pub header_control: Option<HeaderControl>,
    pub max_active_faults: Option<u64>,
    pub route_overrides: bool,
}

impl Config {
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        meshwasm_sdk_ext::config::load::<FaultConfigJson, Config>(bytes)
    }

    /// A per-route override from route metadata: same shape, but `maxActiveFaults` is
    /// plugin-wide and may only be set in the plugin configuration.
    pub fn from_route_value(v: &Value) -> Result<Self, ConfigError> {
        let raw: FaultConfigJson = meshwasm_sdk_ext::config::from_value(v)?;
        if raw.max_active_faults.is_some() {
            return Err(ConfigError::new(
                "maxActiveFaults",
                "is plugin-wide: set it in the plugin configuration, not in route metadata",
            ));
        }
        if raw.route_overrides.is_some() {
            return Err(ConfigError::new(
                "routeOverrides",
                "is plugin-wide: set it in the plugin configuration, not in route metadata",
            ));
        }
        Config::try_from(raw)
    }

    /// Every metric label this config can produce (to define the stats up front).
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.name.as_str()).chain(self.header_control.map(|_| HEADER_CONTROL_RULE))
    }
}

impl TryFrom<FaultConfigJson> for Config {
    type Error = ConfigError;

    fn try_from(raw: FaultConfigJson) -> Result<Self, ConfigError> {
        let root = Path::root();
        let mut labels = RuleLabels::new(&[HEADER_CONTROL_RULE]);
        let mut rules = Vec::with_capacity(raw.rules.len());
        for (i, r) in raw.rules.iter().enumerate() {
            let path = root.field("rules").index(i);
            let rule = Rule::compile(r, i, &path)?;
            labels.claim(&rule.name, &path)?;
            rules.push(rule);
        }
        let header_control = header_control(raw.header_control.as_ref(), &root.field("headerControl"))?;
        // `maxActiveFaults: 0` is accepted, as Envoy does: every fault then overflows.
        Ok(Config {
            rules,
            header_control,
            max_active_faults: raw.max_active_faults,
            route_overrides: raw.route_overrides.unwrap_or(true),
        })
    }
}

impl Rule {
    fn compile(raw: &RuleJson, index: usize, path: &Path) -> Result<Self, ConfigError> {
        let name = rule_name(raw.name.as_deref(), index, path)?;
        let matches = MatchList::compile(raw.matches.as_deref(), &path.field("match"))?;
        let fpath = path.field("fault");
        let delay = raw.fault.delay.as_ref().map(|d| Delay::compile(d, &fpath.field("delay"))).transpose()?;
        let abort = raw.fault.abort.as_ref().map(|a| Abort::compile(a, &fpath.field("abort"))).transpose()?;
        if delay.is_none() && abort.is_none() {
            return Err(fpath.err("must set delay or abort"));
        }
        Ok(Rule { name, matches, delay, abort })
    }
}

fn percentage(p: Option<Percentage>, percent: Option<u32>, path: &Path) -> Result<Fraction, ConfigError> {
    match (p, percent) {
        (Some(_), Some(_)) => Err(path.field("percent").err("set percentage or the deprecated percent, not both")),
        (Some(p), None) => Fraction::from_percentage(p, &path.field("percentage")),
        (None, Some(n)) if n > 100 => Err(path.field("percent").err(format!("must be in 0..=100, got {n}"))),
        (None, Some(n)) => Ok(Fraction::from_percent(u64::from(n))),
        // Istio: "If left unspecified, no request will be delayed/aborted."
        (None, None) => Ok(Fraction::NEVER),
    }
}

impl Delay {
    fn compile(raw: &DelayJson, path: &Path) -> Result<Self, ConfigError> {
        if raw.exponential_delay.is_some() {
            return Err(path
                .field("exponentialDelay")
                .err("is not supported (Istio does not implement it either); use fixedDelay"));
        }
        let Some(fixed) = &raw.fixed_delay else {
            return Err(path.field("fixedDelay").err("is required"));
        };
        let fixed = parse_duration(fixed).map_err(|e| path.field("fixedDelay").err(e))?;
        if fixed < Duration::from_millis(1) {
            return Err(path.field("fixedDelay").err(format!("must be at least 1ms, got {fixed:?}")));
        }
        Ok(Delay { fixed, percentage: percentage(raw.percentage, raw.percent, path)? })
    }
}

impl Abort {
    fn compile(raw: &AbortJson, path: &Path) -> Result<Self, ConfigError> {
        if raw.http2_error.is_some() {
            return Err(path.field("http2Error").err("is not supported by Envoy; use httpStatus or grpcStatus"));
        }
        let status = match (raw.http_status, &raw.grpc_status) {
            (Some(_), Some(_)) => return Err(path.err("set one of httpStatus or grpcStatus, not both")),
            (None, None) => return Err(path.err("one of httpStatus or grpcStatus is required")),
            (Some(s), None) => {
                if !(200..=599).contains(&s) {
                    return Err(path.field("httpStatus").err(format!("must be in 200..=599, got {s}")));
                }
                AbortStatus { http: s as u32, grpc: None }
            }
            (None, Some(g)) => {
                AbortStatus { http: 200, grpc: Some(u64::from(grpc_code(g, &path.field("grpcStatus"))?)) }
            }
        };
        Ok(Abort { status, percentage: percentage(raw.percentage, raw.percent, path)? })
    }
}

pub use meshwasm_sdk_ext::config::{grpc_code, GRPC_CODES};

fn header_control(v: Option<&Value>, path: &Path) -> Result<Option<HeaderControl>, ConfigError> {
    let cap = |v: Option<&Value>, p: &Path| -> Result<Fraction, ConfigError> {
        let Some(v) = v else { return Ok(Fraction::ALWAYS) };
        let Value::Object(m) = v else { return Err(p.err("must be an object like {\"percentage\": {\"value\": 50}}")) };
        if let Some(k) = m.keys().find(|k| *k != "percentage") {
            return Err(p.field(k).err("unknown field, expected `percentage`"));
        }
        match m.get("percentage") {
            None => Ok(Fraction::ALWAYS),
            Some(pv) => {
                let pct: Percentage =
                    meshwasm_sdk_ext::config::from_value(pv).map_err(|e| e.within(p.field("percentage").as_str()))?;
                Fraction::from_percentage(pct, &p.field("percentage"))
            }
        }
    };
    match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(None),
        Some(Value::Bool(true)) => Ok(Some(HeaderControl { abort_cap: Fraction::ALWAYS, delay_cap: Fraction::ALWAYS })),
        Some(Value::Object(m)) => {
            if let Some(k) = m.keys().find(|k| *k != "abort" && *k != "delay") {
                return Err(path.field(k).err("unknown field, expected `abort` or `delay`"));
            }
            Ok(Some(HeaderControl {
                abort_cap: cap(m.get("abort"), &path.field("abort"))?,
                delay_cap: cap(m.get("delay"), &path.field("delay"))?,
            }))
        }
        Some(other) => Err(path.err(format!("must be true, false or an object with abort/delay caps, got {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        Config::from_json(json.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn issue_example_parses() {
        let c = Config::from_json(
            br#"{"rules":[{"name":"ratings-jason","match":[{"uri":{"prefix":"/ratings"},"headers":{"end-user":{"exact":"jason"}}}],
            "fault":{"delay":{"fixedDelay":"5s","percentage":{"value":0.1}},"abort":{"httpStatus":500,"percentage":{"value":50.0}}}}],
            "headerControl":true,"maxActiveFaults":100}"#,
        )
        .unwrap();
        let r = &c.rules[0];
        assert_eq!(r.name, "ratings-jason");
        assert_eq!(
            r.delay,
            Some(Delay {
                fixed: Duration::from_secs(5),
                percentage: Fraction { numerator: 1000, denominator: 1_000_000 }
            })
        );
        assert_eq!(r.abort.as_ref().unwrap().status, AbortStatus { http: 500, grpc: None });
        assert_eq!(c.header_control, Some(HeaderControl { abort_cap: Fraction::ALWAYS, delay_cap: Fraction::ALWAYS }));
        assert_eq!(c.max_active_faults, Some(100));
    }

    #[test]
    fn variants() {
        let c = Config::from_json(
            br#"{"rules":[{"fault":{"abort":{"grpcStatus":"unavailable","percent":30}}},
            {"fault":{"abort":{"grpcStatus":4}, "delay":{"fixedDelay":"0.250s"}}}],
            "headerControl":{"abort":{"percentage":{"value":20}}}}"#,
        )
        .unwrap();
        assert_eq!(c.rules[0].name, "rule-0");
        assert_eq!(c.rules[0].abort.as_ref().unwrap().status, AbortStatus { http: 200, grpc: Some(14) });
        assert_eq!(c.rules[0].abort.as_ref().unwrap().percentage, Fraction::from_percent(30));
        assert_eq!(c.rules[1].abort.as_ref().unwrap().percentage, Fraction::NEVER, "missing percentage means no fault");
        assert_eq!(c.rules[1].delay.as_ref().unwrap().fixed, Duration::from_millis(250));
        let hc = c.header_control.unwrap();
        assert_eq!(hc.abort_cap, Fraction { numerator: 200_000, denominator: 1_000_000 });
        assert_eq!(hc.delay_cap, Fraction::ALWAYS);
        assert!(Config::from_json(b"").unwrap().rules.is_empty());
    }

    #[test]
    fn errors_name_path_and_rule() {
        let cases = [
            (r#"{"rules":[{"fault":{"abort":{"httpStatus":700,"percentage":{"value":1}}}}]}"#,
             "rules[0].fault.abort.httpStatus: must be in 200..=599, got 700"),
            (r#"{"rules":[{"fault":{"delay":{"fixedDelay":"5x"}}}]}"#, "rules[0].fault.delay.fixedDelay: invalid duration \"5x\": unknown unit \"x\""),
            (r#"{"rules":[{"fault":{"delay":{"fixedDelay":"0s"}}}]}"#, "rules[0].fault.delay.fixedDelay: must be at least 1ms, got 0ns"),
            (r#"{"rules":[{"fault":{"delay":{"percentage":{"value":1}}}}]}"#, "rules[0].fault.delay.fixedDelay: is required"),
            (r#"{"rules":[{"fault":{"abort":{"httpStatus":503,"percentage":{"value":101}}}}]}"#,
             "rules[0].fault.abort.percentage.value: must be in 0..=100, got 101"),
            (r#"{"rules":[{"fault":{"abort":{"httpStatus":503,"percent":10,"percentage":{"value":1}}}}]}"#,
             "rules[0].fault.abort.percent: set percentage or the deprecated percent, not both"),
            (r#"{"rules":[{"fault":{"abort":{"grpcStatus":"NOPE"}}}]}"#,
             "rules[0].fault.abort.grpcStatus: must be a gRPC code name like \"UNAVAILABLE\" or a number 0..=16, got \"NOPE\""),
            (r#"{"rules":[{"fault":{"abort":{"httpStatus":503,"grpcStatus":"OK"}}}]}"#, "rules[0].fault.abort: set one of httpStatus or grpcStatus, not both"),
            (r#"{"rules":[{"fault":{}}]}"#, "rules[0].fault: must set delay or abort"),
            (r#"{"rules":[{"name":"a","fault":{"abort":{"httpStatus":503}}},{"name":"a","fault":{"abort":{"httpStatus":503}}}]}"#,
             "rules[1].name: duplicate or reserved rule name \"a\""),
            (r#"{"rules":[{"name":"a.b","fault":{"abort":{"httpStatus":503}}},{"name":"a_b","fault":{"abort":{"httpStatus":503}}}]}"#,
             "rules[1].name: duplicate or reserved rule name \"a_b\" (stats label \"a_b\")"),
            (r#"{"rules":[{"match":[{"uri":{"regex":"("}}],"fault":{"abort":{"httpStatus":503}}}]}"#, "rules[0].match[0].uri.regex: invalid regex"),
            (r#"{"headerControl":"yes"}"#, "headerControl: must be true, false or an object"),
            (r#"{"headerControl":{"abort":{"percentage":{"value":-1}}}}"#, "headerControl.abort.percentage.value: must be in 0..=100, got -1"),
            (r#"{"headerControl":{"abrt":{}}}"#, "headerControl.abrt: unknown field"),
            (r#"{"rules":[],"maxActiveFault":1}"#, "maxActiveFault: unknown field `maxActiveFault`"),
            (r#"{"rules":[{"fault":{"abort":{"httpStatus":"503"}}}]}"#, "rules[0].fault.abort.httpStatus: invalid type"),
            (r#"{"rules":[{"fault":{"delay":{"fixedDelay":"1s","exponentialDelay":"1s"}}}]}"#, "rules[0].fault.delay.exponentialDelay: is not supported"),
        ];
        for (json, want) in cases {
            let got = err(json);
            assert!(got.starts_with(want), "{json}\n got: {got}\nwant: {want}");
        }
    }

    #[test]
    fn route_override_cannot_set_plugin_wide_limit() {
        let e = Config::from_route_value(&serde_json::json!({"maxActiveFaults": 3})).unwrap_err();
        assert_eq!(e.path, "maxActiveFaults");
        assert!(Config::from_route_value(&serde_json::json!({"headerControl": true})).is_ok());
    }
}
