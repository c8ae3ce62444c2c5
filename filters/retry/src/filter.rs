//! The retry filter's stream and root. On request headers it reads the header map once,
//! removes the router headers a client sent (unless trusted), asks `policy` for the plan,
//! reserves retries from the rule's budget, and sets the router's `x-envoy-*` headers. In the
//! log phase (only for rules that observe) it reads the attempt count and response flags,
//! counts them, and refunds the unused reserved retries.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use meshwasm_sdk_ext::matcher::RequestView;
use meshwasm_sdk_ext::metrics::{define, rule_metric_name};
use meshwasm_sdk_ext::route::RouteOverrides;
use meshwasm_sdk_ext::{ConfigError, Flow, HeaderMap, Host, HttpFilter, LogLevel, MetricKind, Plugin};

use crate::budget::{self, Reservation};
use crate::config::{Config, Rule};
use crate::policy::{self, Facts, Plan};

pub const NAME: &str = "retry";

/// The per-rule stats, in [`Stat`] order.
pub const STATS: [&str; 8] = [
    "requests",
    "retries_requested",
    "retries_observed",
    "budget_exhausted",
    "idempotency_skipped",
    "timeouts",
    "retries_exhausted",
    "overflowed",
];

#[derive(Debug, Clone, Copy)]
pub enum Stat {
    /// Requests the rule selected.
    Requests = 0,
    /// Requests sent to the router with retries allowed.
    RetriesRequested,
    /// Retries the router made (attempt count − 1, log phase).
    RetriesObserved,
    /// Requests whose retries the budget cut (to fewer than the policy allows).
    BudgetExhausted,
    /// Requests whose re-executing retry conditions the idempotency guard removed.
    IdempotencySkipped,
    /// Responses with Envoy's UT flag (upstream request timeout).
    Timeouts,
    /// Responses with URX (retry limit exceeded).
    RetriesExhausted,
    /// Responses with UO (overflow: e.g. the cluster's max_retries circuit breaker).
    Overflowed,
}

/// Envoy's response flag bits (`response.flags`, `StreamInfo::CoreResponseFlag` order).
pub mod flags {
    pub const UPSTREAM_REQUEST_TIMEOUT: u64 = 1 << 2; // UT
    pub const UPSTREAM_CONNECTION_FAILURE: u64 = 1 << 5; // UF
    pub const UPSTREAM_OVERFLOW: u64 = 1 << 7; // UO
    pub const UPSTREAM_RETRY_LIMIT_EXCEEDED: u64 = 1 << 15; // URX
}

type StatIds = [Option<u32>; STATS.len()];

// === impl RetryPlugin ===

pub struct RetryPlugin {
    config: Rc<Config>,
    routes: RouteOverrides<Config>,
    /// Metric ids of the plugin configuration's rules, by rule index.
    stats: Vec<StatIds>,
    /// Metric ids of rules that come from route overrides, by label.
    override_stats: RefCell<HashMap<String, StatIds>>,
    /// Budget keys by rule index.
    budget_keys: Vec<Option<String>>,
}

fn define_stats(host: &dyn Host, label: &str) -> StatIds {
    let mut ids = [None; STATS.len()];
    for (id, stat) in ids.iter_mut().zip(STATS) {
        *id = define(host, MetricKind::Counter, &rule_metric_name(NAME, label, stat));
    }
    ids
}

impl RetryPlugin {
    pub fn new(config: Config, plugin_name: &str, host: &dyn Host) -> Self {
        let stats = config.rules.iter().map(|r| define_stats(host, &r.name)).collect();
        let budget_keys = config
            .rules
            .iter()
            .map(|r| {
                r.budget.as_ref().map(|b| {
                    let key = budget::key(plugin_name, &r.name, b);
                    budget::init(host, &key);
                    key
                })
            })
            .collect();
        Self {
            config: Rc::new(config),
            routes: RouteOverrides::new(NAME),
            stats,
            override_stats: RefCell::default(),
            budget_keys,
        }
    }

    fn count(&self, host: &dyn Host, source: &Source, stat: Stat, delta: u64) {
        if delta == 0 {
            return;
        }
        let id = match source {
            Source::Plugin(i) => self.stats.get(*i).and_then(|ids| ids.get(stat as usize).copied().flatten()),
            Source::Route(config, i) => {
                let Some(label) = config.rules.get(*i).map(|r| r.name.as_str()) else { return };
                let mut m = self.override_stats.borrow_mut();
                let ids = m.entry(label.to_string()).or_insert_with(|| define_stats(host, label));
                ids.get(stat as usize).copied().flatten()
            }
        };
        if let Some(id) = id {
            if let Err(e) = host.increment_metric(id, i64::try_from(delta).unwrap_or(i64::MAX)) {
                host.log(LogLevel::Debug, &format!("meshwasm.retry: cannot increment {stat:?}: {e}"));
            }
        }
    }
}

impl Plugin for RetryPlugin {
    const NAME: &'static str = NAME;
    type Filter = RetryFilter;

    fn configure(bytes: &[u8], host: &dyn Host) -> Result<Self, ConfigError> {
        let config = Config::from_json(bytes)?;
        let name = meshwasm_sdk_ext::host::plugin_name(host);
        Ok(RetryPlugin::new(config, &name, host))
    }

    fn new_filter(self: &Rc<Self>, _context_id: u32, _seed: u64) -> RetryFilter {
        RetryFilter { plugin: self.clone(), observing: None }
    }
}

// === impl RetryFilter ===

/// Where the applied rule came from.
#[derive(Clone)]
enum Source {
    Plugin(usize),
    Route(Rc<Config>, usize),
}

/// What the log phase needs to know about a request it observes.
struct Observing {
    source: Source,
    /// Retries reserved from the budget (to refund what the router did not use).
    reservation: Option<Reservation>,
}

pub struct RetryFilter {
    plugin: Rc<RetryPlugin>,
    observing: Option<Observing>,
}

/// The request as one header-map read (matching, idempotency key, deadlines, stripping),
/// with the port and route name read only if a rule asks.
struct PairsView<'h> {
    host: &'h dyn Host,
    pairs: &'h [(String, String)],
    route: Option<Option<String>>,
}

impl PairsView<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

impl RequestView for PairsView<'_> {
    fn header(&mut self, name: &str) -> Option<String> {
        // Repeated headers are joined with "," as Envoy's matchers see them.
        let mut it = self.pairs.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str());
        let first = it.next()?;
        let mut out = first.to_string();
        for v in it {
            out.push(',');
            out.push_str(v);
        }
        Some(out)
    }
    fn port(&mut self) -> Option<u32> {
        let raw = self.host.property(&["destination", "port"]);
        raw.and_then(|b| meshwasm_sdk_ext::props::decode_int(&b)).and_then(|v| u32::try_from(v).ok())
    }
    fn route_name(&mut self) -> Option<String> {
        if self.route.is_none() {
            let raw = self.host.property(&["xds", "route_name"]);
            self.route = Some(raw.and_then(|b| String::from_utf8(b).ok()));
        }
        self.route.clone().flatten()
    }
    fn remote_address(&mut self) -> Option<String> {
        self.host.property(&["source", "address"]).and_then(|b| String::from_utf8(b).ok())
    }
}

fn set(host: &dyn Host, name: &str, value: &str) {
    if let Err(e) = host.set_header(HeaderMap::RequestHeaders, name, Some(value)) {
        host.log(LogLevel::Debug, &format!("meshwasm.retry: cannot set {name}: {e}"));
    }
}

/// Remove the router headers the client sent (each name once; removal drops every value).
fn strip_router_headers(host: &dyn Host, pairs: &[(String, String)]) {
    let mut removed: u32 = 0;
    for (k, _) in pairs {
        if !k.starts_with("x-envoy-") {
            continue;
        }
        if let Some(i) = policy::ROUTER_HEADERS.iter().position(|h| h == k) {
            if removed & (1 << i) == 0 {
                removed |= 1 << i;
                if let Err(e) = host.set_header(HeaderMap::RequestHeaders, k, None) {
                    host.log(LogLevel::Debug, &format!("meshwasm.retry: cannot remove {k}: {e}"));
                }
            }
        }
    }
}

/// Set the router headers for `plan`.
fn apply(host: &dyn Host, plan: &Plan<'_>) {
    match plan.retry {
        Some(h) if plan.max_retries > 0 => {
            if !h.retry_on.is_empty() {
                set(host, policy::H_RETRY_ON, &h.retry_on);
            }
            if !h.grpc_on.is_empty() {
                set(host, policy::H_RETRY_GRPC_ON, &h.grpc_on);
            }
            if !h.status_codes.is_empty() {
                set(host, policy::H_STATUS_CODES, &h.status_codes);
            }
            set(host, policy::H_MAX_RETRIES, &plan.max_retries.to_string());
            if let Some(p) = plan.per_try_timeout_ms {
                set(host, policy::H_PER_TRY, &p.to_string());
            }
            if plan.hedge {
                set(host, policy::H_HEDGE, "true");
            }
        }
        // No retries for this request: say so, so that neither a route retry_policy nor
        // (trusted) client headers add any.
        _ => set(host, policy::H_MAX_RETRIES, "0"),
    }
    if let Some(t) = plan.timeout_ms {
        set(host, policy::H_TIMEOUT, &t.to_string());
    }
    if let Some(g) = &plan.grpc_timeout {
        set(host, policy::H_GRPC_TIMEOUT, g);
    }
}

impl RetryFilter {
    fn decide(&mut self, host: &dyn Host) {
        let plugin = self.plugin.clone();
        let pairs = host.headers(HeaderMap::RequestHeaders);
        let mut view = PairsView { host, pairs: &pairs, route: None };
        let route = if plugin.config.route_overrides {
            // Plugin-wide fields come from the plugin configuration.
            let info = plugin.routes.lookup(host, |_, v| {
                Config::from_route_value(v).map(|mut c| {
                    c.trust_client_headers = plugin.config.trust_client_headers;
                    c.observe_attempts = plugin.config.observe_attempts;
                    c.route_overrides = true;
                    c
                })
            });
            view.route = Some(info.route_name);
            info.config
        } else {
            None
        };
        let config: &Config = route.as_deref().unwrap_or(&plugin.config);
        if !config.trust_client_headers {
            strip_router_headers(host, &pairs);
        }
        let Some((index, rule)) = policy::select(config, &mut view) else { return };
        let source = match &route {
            Some(c) => Source::Route(c.clone(), index),
            None => Source::Plugin(index),
        };
        let facts = Facts {
            method: view.get(":method").unwrap_or("GET"),
            is_grpc: policy::is_grpc(view.get("content-type")),
            grpc_timeout: view.get(policy::H_GRPC_TIMEOUT),
            expected_ms: view.get(policy::H_EXPECTED),
        };
        let has_key = rule.idempotency.as_ref().is_some_and(|i| view.get(&i.key_header).is_some());
        let mut plan = policy::plan(config, index, rule, &facts, has_key);
        plugin.count(host, &source, Stat::Requests, 1);
        if plan.idempotency_skipped {
            plugin.count(host, &source, Stat::IdempotencySkipped, 1);
        }
        let reservation = self.reserve(host, &source, rule, &mut plan);
        if plan.retry.is_some() && plan.max_retries > 0 {
            plugin.count(host, &source, Stat::RetriesRequested, 1);
        }
        apply(host, &plan);
        if config.observes(rule) {
            self.observing = Some(Observing { source, reservation });
        }
    }

    /// Reserve the plan's retries from the rule's budget (plugin rules only: overrides
    /// cannot carry budgets).
    fn reserve(&self, host: &dyn Host, source: &Source, rule: &Rule, plan: &mut Plan<'_>) -> Option<Reservation> {
        let (Source::Plugin(i), Some(b)) = (source, &rule.budget) else { return None };
        if plan.retry.is_none() || plan.max_retries == 0 {
            return None;
        }
        let key = self.plugin.budget_keys.get(*i)?.as_deref()?;
        let r = budget::reserve(host, key, b, plan.max_retries);
        if r.retries < plan.max_retries {
            self.plugin.count(host, source, Stat::BudgetExhausted, 1);
        }
        plan.cap_retries(r.retries);
        Some(r)
    }

    /// The log phase: the stream's final attributes are readable.
    pub fn log_phase(&mut self, host: &dyn Host) {
        let Some(obs) = self.observing.take() else { return };
        let plugin = self.plugin.clone();
        let int = |path: &[&str]| host.property(path).and_then(|b| meshwasm_sdk_ext::props::decode_int(&b));
        let attempts = int(&["upstream", "request_attempt_count"]).and_then(|v| u64::try_from(v).ok());
        let retries = attempts.map_or(0, |a| a.saturating_sub(1));
        plugin.count(host, &obs.source, Stat::RetriesObserved, retries);
        let f = int(&["response", "flags"]).and_then(|v| u64::try_from(v).ok()).unwrap_or(0);
        for (bit, stat) in [
            (flags::UPSTREAM_REQUEST_TIMEOUT, Stat::Timeouts),
            (flags::UPSTREAM_RETRY_LIMIT_EXCEEDED, Stat::RetriesExhausted),
            (flags::UPSTREAM_OVERFLOW, Stat::Overflowed),
        ] {
            if f & bit != 0 {
                plugin.count(host, &obs.source, stat, 1);
            }
        }
        if let (Some(r), Source::Plugin(i)) = (obs.reservation, &obs.source) {
            let key = plugin.budget_keys.get(*i).and_then(|k| k.as_deref());
            if let Some(key) = key {
                // Without an attempt count (no upstream request was made) nothing was used.
                let used = u32::try_from(retries).unwrap_or(u32::MAX);
                budget::refund(host, key, r, r.retries.saturating_sub(used));
            }
        }
    }
}

impl HttpFilter for RetryFilter {
    fn on_request_headers(&mut self, host: &dyn Host, _end_of_stream: bool) -> Flow {
        self.decide(host);
        Flow::Continue
    }

    fn on_log(&mut self, host: &dyn Host) {
        self.log_phase(host);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshwasm_sdk_ext::fake::FakeHost;

    fn plugin(json: &str, host: &FakeHost) -> Rc<RetryPlugin> {
        Rc::new(RetryPlugin::configure(json.as_bytes(), host).unwrap())
    }

    fn req(host: &FakeHost, headers: &[(&str, &str)]) {
        let mut h: Vec<(String, String)> =
            vec![(":method".into(), "GET".into()), (":path".into(), "/".into()), (":authority".into(), "x".into())];
        for (k, v) in headers {
            if let Some(e) = h.iter_mut().find(|(hk, _)| hk == k) {
                e.1 = v.to_string();
            } else {
                h.push((k.to_string(), v.to_string()));
            }
        }
        *host.request_headers.borrow_mut() = h;
    }

    fn header(host: &FakeHost, name: &str) -> Option<String> {
        host.header(HeaderMap::RequestHeaders, name)
    }

    fn stat(host: &FakeHost, rule: &str, s: &str) -> i64 {
        host.metric_value(&rule_metric_name(NAME, rule, s))
    }

    #[test]
    fn sets_router_headers_and_strips_client_ones() {
        let host = FakeHost::new();
        let p = plugin(
            r#"{"rules":[{"name":"r","retries":{"attempts":3,"perTryTimeout":"250ms","retryOn":"5xx,unavailable,409"},"timeout":"2s"}]}"#,
            &host,
        );
        req(
            &host,
            &[
                ("x-envoy-retry-on", "reset"),
                ("x-envoy-retriable-header-names", "x-a"),
                ("x-envoy-hedge-on-per-try-timeout", "true"),
                ("x-envoy-upstream-rq-timeout-alt-response", "204"),
                ("x-envoy-expected-rq-timeout-ms", "10"),
                ("x-envoy-original-path", "/kept"),
            ],
        );
        let mut f = p.new_filter(1, 0);
        assert_eq!(f.on_request_headers(&host, true), Flow::Continue);
        assert_eq!(header(&host, "x-envoy-retry-on").as_deref(), Some("5xx,retriable-status-codes"));
        assert_eq!(header(&host, "x-envoy-retry-grpc-on").as_deref(), Some("unavailable"));
        assert_eq!(header(&host, "x-envoy-retriable-status-codes").as_deref(), Some("409"));
        assert_eq!(header(&host, "x-envoy-max-retries").as_deref(), Some("3"));
        assert_eq!(header(&host, "x-envoy-upstream-rq-per-try-timeout-ms").as_deref(), Some("250"));
        assert_eq!(header(&host, "x-envoy-upstream-rq-timeout-ms").as_deref(), Some("2000"));
        for gone in [
            "x-envoy-retriable-header-names",
            "x-envoy-hedge-on-per-try-timeout",
            "x-envoy-upstream-rq-timeout-alt-response",
            "x-envoy-expected-rq-timeout-ms",
        ] {
            assert_eq!(header(&host, gone), None, "{gone}");
        }
        assert_eq!(header(&host, "x-envoy-original-path").as_deref(), Some("/kept"), "not a router header");
        assert_eq!(stat(&host, "r", "requests"), 1);
        assert_eq!(stat(&host, "r", "retries_requested"), 1);
        // Not observing: the log phase reads nothing.
        f.on_log(&host);
        assert_eq!(stat(&host, "r", "retries_observed"), 0);
    }

    #[test]
    fn trusted_client_headers_are_kept() {
        let host = FakeHost::new();
        let p = plugin(r#"{"rules":[{"match":[{"uri":{"prefix":"/never"}}]}],"trustClientHeaders":true}"#, &host);
        req(&host, &[("x-envoy-retry-on", "reset"), ("x-envoy-max-retries", "4")]);
        p.new_filter(1, 0).on_request_headers(&host, true);
        assert_eq!(header(&host, "x-envoy-retry-on").as_deref(), Some("reset"));
        assert_eq!(header(&host, "x-envoy-max-retries").as_deref(), Some("4"));
        // Untrusted and unmatched: still stripped.
        let host = FakeHost::new();
        let p = plugin(r#"{"rules":[{"match":[{"uri":{"prefix":"/never"}}]}]}"#, &host);
        req(&host, &[("x-envoy-retry-on", "reset"), ("x-envoy-max-retries", "4")]);
        p.new_filter(1, 0).on_request_headers(&host, true);
        assert_eq!(header(&host, "x-envoy-retry-on"), None);
        assert_eq!(header(&host, "x-envoy-max-retries"), None);
    }

    #[test]
    fn post_is_guarded_and_no_retries_says_zero() {
        let host = FakeHost::new();
        let p = plugin(r#"{"rules":[{"name":"r","retries":{"attempts":2,"retryOn":"5xx"}}]}"#, &host);
        req(&host, &[(":method", "POST")]);
        p.new_filter(1, 0).on_request_headers(&host, false);
        assert_eq!(header(&host, "x-envoy-retry-on"), None);
        assert_eq!(header(&host, "x-envoy-max-retries").as_deref(), Some("0"));
        assert_eq!(stat(&host, "r", "idempotency_skipped"), 1);
        assert_eq!(stat(&host, "r", "retries_requested"), 0);
        req(&host, &[(":method", "POST"), ("idempotency-key", "k1")]);
        p.new_filter(2, 0).on_request_headers(&host, false);
        assert_eq!(header(&host, "x-envoy-retry-on").as_deref(), Some("5xx"));
        assert_eq!(header(&host, "x-envoy-max-retries").as_deref(), Some("2"));
    }

    #[test]
    fn grpc_deadline_propagates() {
        let host = FakeHost::new();
        let p = plugin(r#"{"rules":[{"timeout":"5s"}]}"#, &host);
        req(&host, &[(":method", "POST"), ("content-type", "application/grpc"), ("grpc-timeout", "700m")]);
        p.new_filter(1, 0).on_request_headers(&host, false);
        assert_eq!(header(&host, "x-envoy-upstream-rq-timeout-ms").as_deref(), Some("700"));
        assert_eq!(header(&host, "grpc-timeout").as_deref(), Some("700m"));
    }

    #[test]
    fn budget_reserves_and_log_phase_refunds() {
        let host = FakeHost::new();
        // Only the reserve: 1 retry/s × 2 s = 2 retries per window; ratio 0.
        let p = plugin(
            r#"{"rules":[{"name":"b","retries":{"attempts":2,"retryOn":"5xx"},"budget":{"retryRatio":0,"minRetriesPerSecond":1,"ttl":"2s"}}]}"#,
            &host,
        );
        req(&host, &[]);
        let mut f1 = p.new_filter(1, 0);
        f1.on_request_headers(&host, true);
        assert_eq!(header(&host, "x-envoy-max-retries").as_deref(), Some("2"));
        let mut f2 = p.new_filter(2, 0);
        f2.on_request_headers(&host, true);
        assert_eq!(header(&host, "x-envoy-max-retries").as_deref(), Some("0"), "budget exhausted");
        assert_eq!(header(&host, "x-envoy-retry-on"), None);
        assert_eq!(stat(&host, "b", "budget_exhausted"), 1);
        // f1 used one retry (2 attempts), with URX; f2 made one attempt.
        host.set_property(&["upstream", "request_attempt_count"], &2i64.to_le_bytes());
        host.set_property(&["response", "flags"], &(flags::UPSTREAM_RETRY_LIMIT_EXCEEDED as i64).to_le_bytes());
        f1.on_log(&host);
        host.set_property(&["upstream", "request_attempt_count"], &1i64.to_le_bytes());
        host.set_property(&["response", "flags"], &0i64.to_le_bytes());
        f2.on_log(&host);
        assert_eq!(stat(&host, "b", "retries_observed"), 1);
        assert_eq!(stat(&host, "b", "retries_exhausted"), 1);
        // One retry was refunded.
        let mut f3 = p.new_filter(3, 0);
        f3.on_request_headers(&host, true);
        assert_eq!(header(&host, "x-envoy-max-retries").as_deref(), Some("1"));
    }

    #[test]
    fn route_override_applies() {
        let host = FakeHost::new();
        let p = plugin(r#"{"rules":[{"name":"plugin"}],"routeOverrides":true}"#, &host);
        host.set_property(&["xds", "route_name"], b"r1");
        host.set_property(
            &["xds", "route_metadata"],
            &meshwasm_sdk_ext::props::encode_metadata(
                "meshwasm",
                &serde_json::json!({"retry": {"rules": [{"name": "route", "retries": {"attempts": 7, "retryOn": "reset"}}]}}),
            ),
        );
        req(&host, &[]);
        p.new_filter(1, 0).on_request_headers(&host, true);
        assert_eq!(header(&host, "x-envoy-max-retries").as_deref(), Some("7"));
        assert_eq!(stat(&host, "route", "requests"), 1);
        assert_eq!(stat(&host, "plugin", "requests"), 0);
        // Plugin-wide settings still apply on an overridden route.
        let p = plugin(r#"{"rules":[],"routeOverrides":true,"trustClientHeaders":true}"#, &host);
        req(&host, &[("x-envoy-retriable-header-names", "x-a")]);
        p.new_filter(2, 0).on_request_headers(&host, true);
        assert_eq!(header(&host, "x-envoy-retriable-header-names").as_deref(), Some("x-a"));
    }
}
