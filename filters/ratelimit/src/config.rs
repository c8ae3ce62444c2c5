//! Rate-limit configuration. JSON → `RateLimitConfigJson` (serde, unknown fields rejected) →
//! `Config` (validated, immutable, shared by every stream).
//!
//! ```json
//! {
//!   "rules": [
//!     {"name": "per-key", "match": [{"uri": {"prefix": "/api"}}],
//!      "descriptors": [{"requestHeader": {"name": "x-api-key"}}],
//!      "tokenBucket": {"maxTokens": 100, "tokensPerFill": 100, "fillInterval": "1h"}},
//!     {"name": "fleet", "descriptors": [{"genericKey": {"value": "api"}}], "global": true}
//!   ],
//!   "rateLimitService": {"cluster": "ratelimit", "domain": "edge", "timeout": "50ms"},
//!   "rateLimitHeaders": true
//! }
//! ```

use std::time::Duration;

use meshwasm_sdk_ext::config::{grpc_code, rule_name, ConfigError, Path, RuleLabels};
use meshwasm_sdk_ext::duration::parse_duration;
use meshwasm_sdk_ext::matcher::{MatchJson, MatchList};
use serde::Deserialize;
use serde_json::Value;

use crate::bucket::BucketSpec;

// === JSON ===

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimitConfigJson {
    #[serde(default)]
    pub rules: Vec<RuleJson>,
    /// `"enforce"` (default) or `"dryRun"`.
    pub mode: Option<String>,
    /// HTTP status of a rejection (default 429).
    pub status_code: Option<i64>,
    /// gRPC status of a rejection for gRPC requests: a code name or number. Unset, Envoy maps
    /// the HTTP status (429 → UNAVAILABLE), as the native filter does.
    pub grpc_status: Option<Value>,
    /// `x-ratelimit-limit` / `-remaining` / `-reset` on responses (default false, as native).
    pub rate_limit_headers: Option<bool>,
    /// Bound on distinct keys per keyed rule (default 10000).
    pub max_keys: Option<u64>,
    pub route_overrides: Option<bool>,
    pub rate_limit_service: Option<ServiceJson>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleJson {
    pub name: Option<String>,
    #[serde(rename = "match")]
    pub matches: Option<Vec<MatchJson>>,
    #[serde(default)]
    pub descriptors: Vec<DescriptorJson>,
    pub token_bucket: Option<TokenBucketJson>,
    pub global: Option<bool>,
    pub max_keys: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TokenBucketJson {
    pub max_tokens: Option<u64>,
    pub tokens_per_fill: Option<u64>,
    pub fill_interval: Option<String>,
}

/// One descriptor entry, named after Envoy's rate-limit actions.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DescriptorJson {
    RequestHeader(RequestHeaderJson),
    RemoteAddress(RemoteAddressJson),
    Path(KeyJson),
    Method(KeyJson),
    RouteName(KeyJson),
    GenericKey(GenericKeyJson),
    HeaderValueMatch(Box<HeaderValueMatchJson>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestHeaderJson {
    pub name: String,
    pub key: Option<String>,
    pub skip_if_absent: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RemoteAddressJson {
    pub key: Option<String>,
    pub xff_num_trusted_hops: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KeyJson {
    pub key: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GenericKeyJson {
    pub key: Option<String>,
    pub value: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderValueMatchJson {
    pub key: Option<String>,
    pub value: String,
    pub expect_match: Option<bool>,
    #[serde(rename = "match")]
    pub matches: MatchJson,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceJson {
    pub cluster: Option<String>,
    pub domain: Option<String>,
    pub timeout: Option<String>,
    /// `"allow"` (default, as Envoy's `failure_mode_deny: false`) or `"deny"`.
    pub failure_mode: Option<String>,
    /// Status of the reply when the service fails and `failureMode` is `deny` (default 500).
    pub status_on_error: Option<i64>,
    /// `hits_addend` sent with each request (default 1).
    pub hits_addend: Option<u32>,
}

// === validated ===

#[derive(Debug, Clone)]
pub enum Descriptor {
    RequestHeader { key: String, name: String, skip_if_absent: bool },
    RemoteAddress { key: String, trusted_hops: u32 },
    Path { key: String },
    Method { key: String },
    RouteName { key: String },
    Generic { key: String, value: String },
    HeaderValueMatch { key: String, value: String, expect_match: bool, matches: MatchList },
}

impl Descriptor {
    /// A value that changes per request (a rule with one is keyed: one bucket per key).
    pub fn varies(&self) -> bool {
        !matches!(self, Descriptor::Generic { .. } | Descriptor::HeaderValueMatch { .. })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Local(BucketSpec),
    Global,
}

#[derive(Debug, Clone)]
pub struct Rule {
    /// Label for metrics, logs and bucket keys: the rule's name, or `rule-<index>`.
    pub name: String,
    pub matches: MatchList,
    pub descriptors: Vec<Descriptor>,
    pub limit: Limit,
    /// Number of key slots: 1 for an unkeyed rule.
    pub max_keys: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub cluster: String,
    pub domain: String,
    pub timeout: Duration,
    pub failure_mode: FailureMode,
    pub status_on_error: u32,
    pub hits_addend: u32,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub rules: Vec<Rule>,
    pub enforce: bool,
    pub status: u32,
    pub grpc_status: Option<u32>,
    pub headers: bool,
    pub route_overrides: bool,
    pub service: Option<Service>,
}

pub const DEFAULT_MAX_KEYS: u64 = 10_000;
/// Every key slot is created in shared data up front (so the first write to it is a CAS);
/// this bounds the memory and the configuration time.
pub const MAX_MAX_KEYS: u64 = 1_000_000;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(20);

impl Config {
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        meshwasm_sdk_ext::config::load::<RateLimitConfigJson, Config>(bytes)
    }

    /// A per-route override from route metadata: the same shape, minus the plugin-wide
    /// `routeOverrides`.
    pub fn from_route_value(v: &Value) -> Result<Self, ConfigError> {
        let raw: RateLimitConfigJson = meshwasm_sdk_ext::config::from_value(v)?;
        if raw.route_overrides.is_some() {
            return Err(ConfigError::new(
                "routeOverrides",
                "is plugin-wide: set it in the plugin configuration, not in route metadata",
            ));
        }
        Config::try_from(raw)
    }

    pub fn has_global(&self) -> bool {
        self.rules.iter().any(|r| r.limit == Limit::Global)
    }
}

impl TryFrom<RateLimitConfigJson> for Config {
    type Error = ConfigError;

    fn try_from(raw: RateLimitConfigJson) -> Result<Self, ConfigError> {
        let root = Path::root();
        let enforce = match raw.mode.as_deref() {
            None | Some("enforce") => true,
            Some("dryRun") => false,
            Some(m) => return Err(root.field("mode").err(format!("must be \"enforce\" or \"dryRun\", got {m:?}"))),
        };
        let status = http_status(raw.status_code, 429, 400, &root.field("statusCode"))?;
        let grpc_status = raw.grpc_status.as_ref().map(|g| grpc_code(g, &root.field("grpcStatus"))).transpose()?;
        if grpc_status == Some(0) {
            return Err(root.field("grpcStatus").err("must not be OK (0): a rejection is an error"));
        }
        let max_keys = max_keys(raw.max_keys, DEFAULT_MAX_KEYS, &root.field("maxKeys"))?;
        let service = raw.rate_limit_service.as_ref().map(|s| Service::compile(s, &root.field("rateLimitService")));
        let service = service.transpose()?;

        let mut labels = RuleLabels::new(&[]);
        let mut rules = Vec::with_capacity(raw.rules.len());
        for (i, r) in raw.rules.iter().enumerate() {
            let path = root.field("rules").index(i);
            let rule = Rule::compile(r, i, max_keys, &path)?;
            if rule.limit == Limit::Global && service.is_none() {
                return Err(path.field("global").err("needs rateLimitService (cluster and domain) to be configured"));
            }
            labels.claim(&rule.name, &path)?;
            rules.push(rule);
        }
        // Local rules first: a local rejection then costs no callout.
        rules.sort_by_key(|r| r.limit == Limit::Global);
        Ok(Config {
            rules,
            enforce,
            status,
            grpc_status,
            headers: raw.rate_limit_headers.unwrap_or(false),
            route_overrides: raw.route_overrides.unwrap_or(true),
            service,
        })
    }
}

fn http_status(v: Option<i64>, default: u32, min: i64, path: &Path) -> Result<u32, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) if (min..=599).contains(&s) => Ok(s as u32),
        Some(s) => Err(path.err(format!("must be in {min}..=599, got {s}"))),
    }
}

fn max_keys(v: Option<u64>, default: u64, path: &Path) -> Result<u32, ConfigError> {
    let n = v.unwrap_or(default);
    if n == 0 || n > MAX_MAX_KEYS {
        return Err(path.err(format!("must be in 1..={MAX_MAX_KEYS}, got {n}")));
    }
    Ok(n as u32)
}

fn key_or(key: &Option<String>, default: &str, path: &Path) -> Result<String, ConfigError> {
    match key {
        Some(k) if k.is_empty() => Err(path.field("key").err("must not be empty")),
        Some(k) => Ok(k.clone()),
        None => Ok(default.to_string()),
    }
}

impl Rule {
    fn compile(raw: &RuleJson, index: usize, plugin_max_keys: u32, path: &Path) -> Result<Self, ConfigError> {
        let name = rule_name(raw.name.as_deref(), index, path)?;
        let matches = MatchList::compile(raw.matches.as_deref(), &path.field("match"))?;
        let mut descriptors = Vec::with_capacity(raw.descriptors.len());
        for (i, d) in raw.descriptors.iter().enumerate() {
            descriptors.push(Descriptor::compile(d, &path.field("descriptors").index(i))?);
        }
        let limit = match (&raw.token_bucket, raw.global) {
            (Some(_), Some(true)) => return Err(path.err("set tokenBucket (a local limit) or global: true, not both")),
            (Some(b), _) => Limit::Local(bucket(b, &path.field("tokenBucket"))?),
            (None, Some(true)) => {
                if descriptors.is_empty() {
                    return Err(path.field("descriptors").err("a global rule needs at least one descriptor entry"));
                }
                Limit::Global
            }
            (None, _) => return Err(path.err("needs tokenBucket (a local limit) or global: true")),
        };
        let keyed = descriptors.iter().any(Descriptor::varies);
        if raw.max_keys.is_some() && limit == Limit::Global {
            return Err(path.field("maxKeys").err("only applies to local rules (the service keeps global counts)"));
        }
        let max_keys = match raw.max_keys {
            Some(_) if !keyed => return Err(path.field("maxKeys").err("only applies to a rule with per-request keys")),
            Some(n) => max_keys(Some(n), 0, &path.field("maxKeys"))?,
            None if keyed => plugin_max_keys,
            None => 1,
        };
        Ok(Rule { name, matches, descriptors, limit, max_keys })
    }
}

fn bucket(raw: &TokenBucketJson, path: &Path) -> Result<BucketSpec, ConfigError> {
    let Some(max_tokens) = raw.max_tokens else { return Err(path.field("maxTokens").err("is required")) };
    if max_tokens == 0 || max_tokens > u64::from(u32::MAX) {
        return Err(path.field("maxTokens").err(format!("must be in 1..={}, got {max_tokens}", u32::MAX)));
    }
    // Envoy's default: one token per fill.
    let tokens_per_fill = raw.tokens_per_fill.unwrap_or(1);
    if tokens_per_fill == 0 || tokens_per_fill > max_tokens {
        return Err(path
            .field("tokensPerFill")
            .err(format!("must be in 1..=maxTokens ({max_tokens}), got {tokens_per_fill}")));
    }
    let Some(fill) = &raw.fill_interval else { return Err(path.field("fillInterval").err("is required")) };
    let fill = parse_duration(fill).map_err(|e| path.field("fillInterval").err(e))?;
    if fill < Duration::from_millis(1) {
        return Err(path.field("fillInterval").err(format!("must be at least 1ms, got {fill:?}")));
    }
    // 10 years: any quota window; keeps the bucket arithmetic far from overflow.
    if fill > Duration::from_secs(10 * 366 * 86_400) {
        return Err(path.field("fillInterval").err(format!("must be at most 10 years, got {fill:?}")));
    }
    Ok(BucketSpec { max_tokens, tokens_per_fill, fill_interval_ns: fill.as_nanos() as u64 })
}

impl Descriptor {
    fn compile(raw: &DescriptorJson, path: &Path) -> Result<Self, ConfigError> {
        Ok(match raw {
            DescriptorJson::RequestHeader(h) => {
                let p = path.field("requestHeader");
                if h.name.is_empty() {
                    return Err(p.field("name").err("must not be empty"));
                }
                let name = h.name.to_ascii_lowercase();
                Descriptor::RequestHeader {
                    key: key_or(&h.key, &name, &p)?,
                    name,
                    skip_if_absent: h.skip_if_absent.unwrap_or(false),
                }
            }
            DescriptorJson::RemoteAddress(r) => Descriptor::RemoteAddress {
                key: key_or(&r.key, "remote_address", &path.field("remoteAddress"))?,
                trusted_hops: r.xff_num_trusted_hops.unwrap_or(0),
            },
            DescriptorJson::Path(k) => Descriptor::Path { key: key_or(&k.key, "path", &path.field("path"))? },
            DescriptorJson::Method(k) => Descriptor::Method { key: key_or(&k.key, "method", &path.field("method"))? },
            DescriptorJson::RouteName(k) => {
                Descriptor::RouteName { key: key_or(&k.key, "route_name", &path.field("routeName"))? }
            }
            DescriptorJson::GenericKey(g) => Descriptor::Generic {
                key: key_or(&g.key, "generic_key", &path.field("genericKey"))?,
                value: g.value.clone(),
            },
            DescriptorJson::HeaderValueMatch(h) => {
                let p = path.field("headerValueMatch");
                Descriptor::HeaderValueMatch {
                    key: key_or(&h.key, "header_match", &p)?,
                    value: h.value.clone(),
                    expect_match: h.expect_match.unwrap_or(true),
                    matches: MatchList::compile(Some(std::slice::from_ref(&h.matches)), &p.field("match"))?,
                }
            }
        })
    }
}

impl Service {
    fn compile(raw: &ServiceJson, path: &Path) -> Result<Self, ConfigError> {
        let cluster = match &raw.cluster {
            Some(c) if !c.is_empty() => c.clone(),
            _ => return Err(path.field("cluster").err("is required: the Envoy cluster of the rate-limit service")),
        };
        let domain = match &raw.domain {
            Some(d) if !d.is_empty() => d.clone(),
            _ => return Err(path.field("domain").err("is required: the rate-limit service's domain")),
        };
        let timeout = match &raw.timeout {
            None => DEFAULT_TIMEOUT,
            Some(t) => parse_duration(t).map_err(|e| path.field("timeout").err(e))?,
        };
        if timeout < Duration::from_millis(1) || timeout > Duration::from_secs(60) {
            return Err(path.field("timeout").err(format!("must be in 1ms..=60s, got {timeout:?}")));
        }
        let failure_mode = match raw.failure_mode.as_deref() {
            None | Some("allow") => FailureMode::Allow,
            Some("deny") => FailureMode::Deny,
            Some(m) => {
                return Err(path.field("failureMode").err(format!("must be \"allow\" or \"deny\", got {m:?}")));
            }
        };
        let status_on_error = http_status(raw.status_on_error, 500, 400, &path.field("statusOnError"))?;
        let hits_addend = raw.hits_addend.unwrap_or(1);
        if hits_addend == 0 {
            return Err(path.field("hitsAddend").err("must be at least 1"));
        }
        Ok(Service { cluster, domain, timeout, failure_mode, status_on_error, hits_addend })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        Config::from_json(json.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn full_config() {
        let c = Config::from_json(
            br#"{"mode": "dryRun", "rateLimitHeaders": true, "grpcStatus": "RESOURCE_EXHAUSTED", "maxKeys": 50,
            "rateLimitService": {"cluster": "rls", "domain": "d", "timeout": "50ms", "failureMode": "deny"},
            "rules": [
              {"name": "g", "descriptors": [{"genericKey": {"value": "x"}}], "global": true},
              {"name": "k", "descriptors": [{"requestHeader": {"name": "X-Key"}}, {"remoteAddress": {"xffNumTrustedHops": 1}},
                 {"path": {}}, {"method": {"key": "m"}}, {"routeName": {}},
                 {"headerValueMatch": {"value": "post", "match": {"method": {"exact": "POST"}}}}],
               "tokenBucket": {"maxTokens": 10, "tokensPerFill": 5, "fillInterval": "1s"}},
              {"tokenBucket": {"maxTokens": 3, "fillInterval": "1h"}}
            ]}"#,
        )
        .unwrap();
        assert!(!c.enforce);
        assert_eq!(c.grpc_status, Some(8));
        assert_eq!(c.rules.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["k", "rule-2", "g"], "local first");
        assert_eq!(c.rules[0].max_keys, 50);
        assert_eq!(c.rules[1].max_keys, 1);
        assert!(matches!(&c.rules[0].descriptors[0],
            Descriptor::RequestHeader { key, name, skip_if_absent: false } if key == "x-key" && name == "x-key"));
        assert_eq!(
            c.rules[1].limit,
            Limit::Local(BucketSpec { max_tokens: 3, tokens_per_fill: 1, fill_interval_ns: 3_600_000_000_000 })
        );
        let s = c.service.unwrap();
        assert_eq!((s.failure_mode, s.timeout, s.status_on_error), (FailureMode::Deny, Duration::from_millis(50), 500));
    }

    #[test]
    fn bad_configs_name_the_path() {
        let tb = |b: &str| format!(r#"{{"rules": [{{"tokenBucket": {b}}}]}}"#);
        assert_eq!(
            err(&tb(r#"{"maxTokens": 1, "fillInterval": "0s"}"#)),
            "rules[0].tokenBucket.fillInterval: must be at least 1ms, got 0ns"
        );
        assert_eq!(
            err(&tb(r#"{"maxTokens": 2, "tokensPerFill": 3, "fillInterval": "1s"}"#)),
            "rules[0].tokenBucket.tokensPerFill: must be in 1..=maxTokens (2), got 3"
        );
        assert!(err(&tb(r#"{"fillInterval": "1s"}"#)).starts_with("rules[0].tokenBucket.maxTokens: is required"));
        let e = err(
            r#"{"rules": [{"descriptors": [{"cookie": {}}], "tokenBucket": {"maxTokens": 1, "fillInterval": "1s"}}]}"#,
        );
        assert!(e.starts_with("rules[0].descriptors[0]: unknown variant `cookie`"), "{e}");
        let e = err(r#"{"rateLimitService": {"domain": "d"}}"#);
        assert!(e.starts_with("rateLimitService.cluster: is required"), "{e}");
        let e = err(r#"{"rules": [{"descriptors": [{"genericKey": {"value": "v"}}], "global": true}]}"#);
        assert!(e.starts_with("rules[0].global: needs rateLimitService"), "{e}");
        assert!(err(r#"{"rules": [{}]}"#).starts_with("rules[0]: needs tokenBucket"));
        assert!(err(r#"{"mode": "shadow"}"#).starts_with("mode: must be"));
        assert!(err(r#"{"statusCode": 200}"#).starts_with("statusCode: must be in 400..=599"));
        assert!(err(r#"{"grpcStatus": "OK"}"#).starts_with("grpcStatus: must not be OK"));
        assert!(err(r#"{"maxKeys": 0}"#).starts_with("maxKeys: must be in 1..="));
        let e = err(r#"{"rules": [{"name": "a", "tokenBucket": {"maxTokens": 1, "fillInterval": "1s"}},
            {"name": "a", "tokenBucket": {"maxTokens": 1, "fillInterval": "1s"}}]}"#);
        assert!(e.starts_with("rules[1].name: duplicate"), "{e}");
        let e = err(r#"{"rules": [{"maxKeys": 5, "tokenBucket": {"maxTokens": 1, "fillInterval": "1s"}}]}"#);
        assert!(e.starts_with("rules[0].maxKeys: only applies"), "{e}");
    }

    #[test]
    fn route_override_rejects_plugin_wide_fields() {
        let e = Config::from_route_value(&serde_json::json!({"routeOverrides": false})).unwrap_err();
        assert_eq!(e.path, "routeOverrides");
    }
}
