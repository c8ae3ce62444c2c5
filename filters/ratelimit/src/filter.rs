//! The rate-limit filter's stream and root: local buckets first (shared data, exact across
//! workers), then one callout to the rate-limit service for the global rules, then the
//! reply or the rate-limit headers on the response.

use std::rc::Rc;

use meshwasm_sdk_ext::host::HostRequest;
use meshwasm_sdk_ext::metrics::{define, rule_metric_name, sanitize_label};
use meshwasm_sdk_ext::route::RouteOverrides;
use meshwasm_sdk_ext::{
    ConfigError, Flow, GrpcCall, GrpcReply, HeaderMap, Host, HttpFilter, LocalReply, LogLevel, MetricKind, Plugin,
};

use crate::config::{Config, FailureMode, Limit};
use crate::policy::{self, Entries, Tightest, ERROR_BODY, GLOBAL_REJECT_DETAILS, REJECT_BODY, REJECT_DETAILS};
use crate::rls;
use crate::slots::SlotTable;

pub const NAME: &str = "ratelimit";

/// Per-rule stats, as Envoy's local rate limit filter names them.
pub const ENABLED: &str = "enabled";
pub const OK: &str = "ok";
pub const RATE_LIMITED: &str = "rate_limited";
pub const ENFORCED: &str = "enforced";
pub const KEYS_EVICTED: &str = "keys_evicted";
/// Rate-limit service stats, as Envoy's rate limit filter names them:
/// `meshwasm.ratelimit.global.<stat>`.
pub const GLOBAL_STATS: [&str; 4] = ["ok", "over_limit", "error", "failure_mode_allowed"];

// === impl Limiter ===

/// Per-rule stats, in the order of [`RULE_STATS`].
#[derive(Debug, Clone, Copy)]
pub enum Stat {
    Enabled,
    Ok,
    RateLimited,
    Enforced,
    KeysEvicted,
}
pub const RULE_STATS: [&str; 5] = [ENABLED, OK, RATE_LIMITED, ENFORCED, KEYS_EVICTED];

/// A validated config bound to its buckets in shared data and its stats.
pub struct Limiter {
    pub config: Config,
    /// One per rule; `None` for global rules.
    tables: Vec<Option<SlotTable>>,
    /// Metric ids, defined once: per rule in [`RULE_STATS`] order, and [`GLOBAL_STATS`].
    rule_stats: Vec<[Option<u32>; 5]>,
    global_stats: [Option<u32>; 4],
}

impl Limiter {
    /// Bind `config` to the shared-data keys under `prefix` (creating the bucket slots) and
    /// define its stats, so they show (at 0) before the first request, as Envoy's do.
    pub fn new(config: Config, prefix: &str, host: &dyn Host) -> Self {
        let tables = config
            .rules
            .iter()
            .map(|r| match r.limit {
                Limit::Local(_) => {
                    let t = SlotTable::new(format!("{prefix}.rule.{}", sanitize_label(&r.name)), r.max_keys);
                    t.init(host);
                    Some(t)
                }
                Limit::Global => None,
            })
            .collect();
        let rule_stats = config
            .rules
            .iter()
            .map(|r| RULE_STATS.map(|stat| define(host, MetricKind::Counter, &rule_metric_name(NAME, &r.name, stat))))
            .collect();
        let global_stats = if config.has_global() {
            GLOBAL_STATS.map(|stat| define(host, MetricKind::Counter, &format!("meshwasm.{NAME}.global.{stat}")))
        } else {
            [None; 4]
        };
        Self { config, tables, rule_stats, global_stats }
    }

    fn count(&self, host: &dyn Host, rule: usize, stat: Stat) {
        if let Some(id) = self.rule_stats.get(rule).and_then(|s| s.get(stat as usize).copied().flatten()) {
            let _ = host.increment_metric(id, 1);
        }
    }

    /// `stat` indexes [`GLOBAL_STATS`].
    fn count_global(&self, host: &dyn Host, stat: usize) {
        if let Some(Some(id)) = self.global_stats.get(stat) {
            let _ = host.increment_metric(*id, 1);
        }
    }
}

const G_OK: usize = 0;
const G_OVER_LIMIT: usize = 1;
const G_ERROR: usize = 2;
const G_FAILURE_MODE_ALLOWED: usize = 3;

// === impl RateLimitPlugin ===

pub struct RateLimitPlugin {
    limiter: Rc<Limiter>,
    routes: RouteOverrides<Limiter>,
    prefix: String,
}

impl Plugin for RateLimitPlugin {
    const NAME: &'static str = NAME;
    type Filter = RateLimitFilter;

    fn configure(bytes: &[u8], host: &dyn Host) -> Result<Self, ConfigError> {
        let config = Config::from_json(bytes)?;
        let name = meshwasm_sdk_ext::host::plugin_name(host);
        let prefix = format!("meshwasm.{NAME}.{name}");
        Ok(RateLimitPlugin {
            limiter: Rc::new(Limiter::new(config, &prefix, host)),
            routes: RouteOverrides::new(NAME),
            prefix,
        })
    }

    fn new_filter(self: &Rc<Self>, _context_id: u32, _seed: u64) -> RateLimitFilter {
        RateLimitFilter { plugin: self.clone(), state: State::Idle, response_headers: Vec::new() }
    }
}

// === impl RateLimitFilter ===

enum State {
    Idle,
    /// Waiting for the rate-limit service: the call's token and the global rules it covers.
    Calling {
        token: u32,
        limiter: Rc<Limiter>,
        rules: Vec<usize>,
    },
    Done,
}

pub struct RateLimitFilter {
    plugin: Rc<RateLimitPlugin>,
    state: State,
    /// Headers to set on the response (rate-limit headers, the service's headers).
    response_headers: Vec<(String, String)>,
}

/// Local headers overridden by the service's headers of the same name.
fn merge(mut local: Vec<(String, String)>, service: Vec<(String, String)>) -> Vec<(String, String)> {
    local.retain(|(k, _)| !service.iter().any(|(sk, _)| sk == k));
    local.extend(service);
    local
}

fn reject(config: &Config, mut headers: Vec<(String, String)>, retry_after: Option<u64>) -> LocalReply {
    if let Some(s) = retry_after.filter(|s| *s > 0) {
        headers.push(("retry-after".into(), s.to_string()));
    }
    LocalReply {
        status: config.status,
        body: REJECT_BODY.into(),
        headers,
        grpc_status: config.grpc_status,
        details: REJECT_DETAILS.into(),
    }
}

impl RateLimitFilter {
    fn send(&mut self, host: &dyn Host, reply: &LocalReply) -> Flow {
        self.response_headers.clear();
        self.state = State::Done;
        if let Err(e) = host.send_local_reply(reply) {
            host.log(LogLevel::Debug, &format!("meshwasm.ratelimit: reply not sent: {e}"));
        }
        Flow::Pause
    }

    /// Local rules, in order. Returns the reply flow when a rule rejects (enforced).
    fn local(
        &mut self,
        host: &dyn Host,
        limiter: &Limiter,
        req: &mut HostRequest<'_>,
    ) -> Result<Vec<(usize, Entries)>, Flow> {
        let config = &limiter.config;
        let mut global = Vec::new();
        let mut taken: Vec<(usize, Vec<u8>)> = Vec::new();
        let mut tightest = None;
        let mut now = None;
        for (i, rule) in config.rules.iter().enumerate() {
            if !rule.matches.matches(req) {
                continue;
            }
            let Some(entries) = policy::entries(rule, req) else { continue };
            let (Limit::Local(spec), Some(Some(table))) = (rule.limit, limiter.tables.get(i)) else {
                global.push((i, entries));
                continue;
            };
            limiter.count(host, i, Stat::Enabled);
            let key = policy::bucket_key(&entries);
            let now = *now.get_or_insert_with(|| host.monotonic_ns());
            let taken_now = match table.take(host, &key, &spec, now) {
                Ok(t) => t,
                Err(e) => {
                    // Shared data failed: we cannot prove the limit is reached; let it through.
                    host.log(
                        LogLevel::Warn,
                        &format!("meshwasm.ratelimit: rule {}: bucket unavailable ({e}); allowing", rule.name),
                    );
                    continue;
                }
            };
            if taken_now.evicted {
                limiter.count(host, i, Stat::KeysEvicted);
            }
            tightest = Tightest::update(tightest, spec.max_tokens, &taken_now.take);
            if taken_now.take.admitted {
                limiter.count(host, i, Stat::Ok);
                taken.push((i, key));
                continue;
            }
            limiter.count(host, i, Stat::RateLimited);
            if !config.enforce {
                host.log(
                    LogLevel::Info,
                    &format!(
                        "meshwasm.ratelimit: dry run: rule {} would rate limit {}",
                        rule.name,
                        String::from_utf8_lossy(&key)
                    ),
                );
                continue;
            }
            limiter.count(host, i, Stat::Enforced);
            // The request is rejected: give back what earlier rules took for it.
            for (j, k) in &taken {
                if let (Some(Limit::Local(s)), Some(Some(t))) =
                    (config.rules.get(*j).map(|r| r.limit), limiter.tables.get(*j))
                {
                    if let Err(e) = t.refund(host, k, &s, now) {
                        host.log(LogLevel::Debug, &format!("meshwasm.ratelimit: refund failed: {e}"));
                    }
                }
            }
            let headers = if config.headers { tightest.map(|t| t.headers()).unwrap_or_default() } else { Vec::new() };
            return Err(self.send(host, &reject(config, headers, Some(taken_now.take.reset_secs))));
        }
        if config.headers {
            if let Some(t) = tightest {
                self.response_headers.extend(t.headers());
            }
        }
        Ok(global)
    }

    fn call_service(&mut self, host: &dyn Host, limiter: Rc<Limiter>, global: Vec<(usize, Entries)>) -> Flow {
        let Some(service) = limiter.config.service.as_ref() else { return Flow::Continue };
        let descriptors: Vec<Entries> = global.iter().map(|(_, e)| e.clone()).collect();
        let message = rls::encode_request(&service.domain, &descriptors, service.hits_addend);
        let call = GrpcCall {
            cluster: &service.cluster,
            service: rls::SERVICE,
            method: rls::METHOD,
            initial_metadata: &[],
            message: &message,
            timeout: service.timeout,
        };
        for (i, _) in &global {
            limiter.count(host, *i, Stat::Enabled);
        }
        match host.grpc_call(&call) {
            Ok(token) => {
                self.state = State::Calling { token, rules: global.into_iter().map(|(i, _)| i).collect(), limiter };
                Flow::Pause
            }
            Err(e) => self.service_failed(host, &limiter, &format!("cannot call cluster {:?}: {e}", service.cluster)),
        }
    }

    /// The service failed, timed out or answered garbage: apply the failure mode.
    fn service_failed(&mut self, host: &dyn Host, limiter: &Limiter, why: &str) -> Flow {
        limiter.count_global(host, G_ERROR);
        let Some(service) = limiter.config.service.as_ref() else { return Flow::Continue };
        let deny = service.failure_mode == FailureMode::Deny;
        if deny && !limiter.config.enforce {
            host.log(LogLevel::Info, &format!("meshwasm.ratelimit: dry run: rate-limit service: {why}; would deny"));
            self.state = State::Done;
            return Flow::Continue;
        }
        match service.failure_mode {
            FailureMode::Allow => {
                host.log(
                    LogLevel::Warn,
                    &format!("meshwasm.ratelimit: rate-limit service: {why}; allowing (failureMode allow)"),
                );
                limiter.count_global(host, G_FAILURE_MODE_ALLOWED);
                self.state = State::Done;
                Flow::Continue
            }
            FailureMode::Deny => {
                host.log(
                    LogLevel::Warn,
                    &format!("meshwasm.ratelimit: rate-limit service: {why}; denying (failureMode deny)"),
                );
                let reply = LocalReply {
                    status: service.status_on_error,
                    body: ERROR_BODY.into(),
                    headers: Vec::new(),
                    grpc_status: None,
                    details: ERROR_BODY.into(),
                };
                self.send(host, &reply)
            }
        }
    }

    fn on_service_reply(&mut self, host: &dyn Host, limiter: &Limiter, rules: &[usize], resp: rls::Response) -> Flow {
        let config = &limiter.config;
        match resp.overall {
            rls::Code::Unknown => self.service_failed(host, limiter, "overall_code UNKNOWN"),
            rls::Code::Ok => {
                limiter.count_global(host, G_OK);
                for i in rules {
                    limiter.count(host, *i, Stat::Ok);
                }
                for (k, v) in &resp.request_headers {
                    if let Err(e) = host.set_header(HeaderMap::RequestHeaders, k, Some(v)) {
                        host.log(LogLevel::Debug, &format!("meshwasm.ratelimit: cannot set request header {k}: {e}"));
                    }
                }
                self.response_headers = merge(std::mem::take(&mut self.response_headers), resp.response_headers);
                self.state = State::Done;
                Flow::Continue
            }
            rls::Code::OverLimit => {
                limiter.count_global(host, G_OVER_LIMIT);
                let mut retry_after: Option<u64> = None;
                for (n, &i) in rules.iter().enumerate() {
                    // Statuses come in descriptor order; without them, every rule is over.
                    let status = resp.statuses.get(n);
                    if status.is_some_and(|s| s.code != rls::Code::OverLimit) {
                        limiter.count(host, i, Stat::Ok);
                        continue;
                    }
                    if let Some(s) = status.and_then(|s| s.reset_secs) {
                        retry_after = Some(retry_after.map_or(s, |r| r.min(s)));
                    }
                    limiter.count(host, i, Stat::RateLimited);
                    if config.enforce {
                        limiter.count(host, i, Stat::Enforced);
                    }
                }
                if !config.enforce {
                    host.log(LogLevel::Info, "meshwasm.ratelimit: dry run: the rate-limit service answered OVER_LIMIT");
                    self.response_headers = merge(std::mem::take(&mut self.response_headers), resp.response_headers);
                    self.state = State::Done;
                    return Flow::Continue;
                }
                let mut headers = merge(std::mem::take(&mut self.response_headers), resp.response_headers);
                // As Envoy's rate limit filter marks a rejection by the service.
                headers.push(("x-envoy-ratelimited".into(), "true".into()));
                let mut reply = reject(config, headers, retry_after);
                reply.details = GLOBAL_REJECT_DETAILS.into();
                self.send(host, &reply)
            }
        }
    }
}

impl HttpFilter for RateLimitFilter {
    fn on_request_headers(&mut self, host: &dyn Host, _end_of_stream: bool) -> Flow {
        let plugin = self.plugin.clone();
        let mut req = HostRequest::new(host);
        let limiter = if plugin.limiter.config.route_overrides {
            let route = plugin.routes.lookup(host, |route, v| {
                let config = Config::from_route_value(v)?;
                Ok(Limiter::new(config, &format!("{}.route.{}", plugin.prefix, sanitize_label(route)), host))
            });
            if let Some(name) = route.route_name {
                req = req.with_route(name);
            }
            route.config.unwrap_or_else(|| plugin.limiter.clone())
        } else {
            plugin.limiter.clone()
        };
        let global = match self.local(host, &limiter, &mut req) {
            Ok(g) => g,
            Err(flow) => return flow,
        };
        if global.is_empty() {
            self.state = State::Done;
            return Flow::Continue;
        }
        self.call_service(host, limiter, global)
    }

    fn on_grpc_reply(&mut self, host: &dyn Host, token: u32, reply: GrpcReply) -> Flow {
        let State::Calling { token: want, limiter, rules } = std::mem::replace(&mut self.state, State::Done) else {
            return Flow::Continue;
        };
        if want != token {
            host.log(LogLevel::Debug, &format!("meshwasm.ratelimit: unexpected gRPC reply {token}"));
            self.state = State::Calling { token: want, limiter, rules };
            return Flow::Pause;
        }
        match reply {
            GrpcReply::Message(bytes) => match rls::decode_response(&bytes) {
                Ok(resp) => self.on_service_reply(host, &limiter, &rules, resp),
                Err(e) => self.service_failed(host, &limiter, &format!("malformed reply: {e}")),
            },
            GrpcReply::Failed(status) => self.service_failed(host, &limiter, &format!("gRPC status {status}")),
        }
    }

    fn on_response_headers(&mut self, host: &dyn Host, _end_of_stream: bool) -> Flow {
        for (k, v) in self.response_headers.drain(..) {
            if let Err(e) = host.set_header(HeaderMap::ResponseHeaders, &k, Some(&v)) {
                host.log(LogLevel::Debug, &format!("meshwasm.ratelimit: cannot set response header {k}: {e}"));
            }
        }
        Flow::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshwasm_sdk_ext::fake::FakeHost;

    fn plugin(host: &FakeHost, json: &str) -> Rc<RateLimitPlugin> {
        Rc::new(RateLimitPlugin::configure(json.as_bytes(), host).unwrap())
    }

    const GLOBAL: &str = r#"{"rateLimitService": {"cluster": "rls", "domain": "d", "timeout": "50ms"},
        "rules": [{"name": "g", "descriptors": [{"genericKey": {"value": "v"}}], "global": true}]}"#;

    #[test]
    fn local_rejection_reply() {
        let host = FakeHost::with_request(&[(":path", "/")]);
        let p = plugin(
            &host,
            r#"{"rateLimitHeaders": true, "rules": [{"tokenBucket": {"maxTokens": 1, "fillInterval": "30s"}}]}"#,
        );
        let mut f = p.new_filter(1, 0);
        assert_eq!(f.on_request_headers(&host, true), Flow::Continue);
        assert_eq!(f.on_response_headers(&host, false), Flow::Continue);
        assert_eq!(host.header(HeaderMap::ResponseHeaders, "x-ratelimit-reset").as_deref(), Some("30"));
        let mut f = p.new_filter(2, 0);
        assert_eq!(f.on_request_headers(&host, true), Flow::Pause);
        let reply = host.replies.borrow()[0].clone();
        assert_eq!((reply.status, reply.body.as_str(), reply.grpc_status), (429, "local_rate_limited", None));
        assert!(reply.headers.contains(&("retry-after".to_string(), "30".to_string())));
        assert!(reply.headers.contains(&("x-ratelimit-remaining".to_string(), "0".to_string())));
        assert_eq!(host.metric_value("meshwasm.ratelimit.rule.rule-0.enforced"), 1);
    }

    #[test]
    fn global_call_and_replies() {
        let host = FakeHost::with_request(&[(":path", "/")]);
        let p = plugin(&host, GLOBAL);
        // OVER_LIMIT with a service header: the rejection carries it.
        let mut f = p.new_filter(1, 0);
        assert_eq!(f.on_request_headers(&host, true), Flow::Pause);
        let call = host.grpc_calls.borrow()[0].clone();
        assert_eq!((call.cluster.as_str(), call.method.as_str()), ("rls", "ShouldRateLimit"));
        assert_eq!(call.message, rls::encode_request("d", &[vec![("generic_key".into(), "v".into())]], 1));
        assert_eq!(
            f.on_grpc_reply(&host, call.token + 7, GrpcReply::Failed(4)),
            Flow::Pause,
            "unknown token: still waiting"
        );
        let over = [0x08, 2, 0x1a, 7, 0x0a, 3, b'x', b'-', b'q', 0x12, 0];
        assert_eq!(f.on_grpc_reply(&host, call.token, GrpcReply::Message(over.to_vec())), Flow::Pause);
        let reply = host.replies.borrow()[0].clone();
        assert_eq!((reply.status, reply.details.as_str()), (429, "request_rate_limited"));
        assert!(reply.headers.contains(&("x-q".to_string(), String::new())));
        // A timeout: failure mode allow.
        let mut f = p.new_filter(2, 0);
        assert_eq!(f.on_request_headers(&host, true), Flow::Pause);
        assert_eq!(f.on_grpc_reply(&host, 2, GrpcReply::Failed(4)), Flow::Continue);
        assert_eq!(host.metric_value("meshwasm.ratelimit.global.failure_mode_allowed"), 1);
        // Garbage: the same.
        let mut f = p.new_filter(3, 0);
        assert_eq!(f.on_request_headers(&host, true), Flow::Pause);
        assert_eq!(f.on_grpc_reply(&host, 3, GrpcReply::Message(vec![0xff; 4])), Flow::Continue);
        assert_eq!(host.metric_value("meshwasm.ratelimit.global.error"), 2);
        // The call cannot even start (unknown cluster): failure mode applies at once.
        host.grpc_call_error.set(Some(meshwasm_sdk_ext::HostError::BadArgument));
        let mut f = p.new_filter(4, 0);
        assert_eq!(f.on_request_headers(&host, true), Flow::Continue);
    }

    #[test]
    fn failure_mode_deny_replies_with_status_on_error() {
        let host = FakeHost::with_request(&[(":path", "/")]);
        let p =
            plugin(&host, &GLOBAL.replace(r#""timeout": "50ms""#, r#""failureMode": "deny", "statusOnError": 503"#));
        let mut f = p.new_filter(1, 0);
        assert_eq!(f.on_request_headers(&host, true), Flow::Pause);
        assert_eq!(f.on_grpc_reply(&host, 1, GrpcReply::Failed(14)), Flow::Pause);
        let reply = host.replies.borrow()[0].clone();
        assert_eq!((reply.status, reply.body.as_str()), (503, "rate_limit_service_error"));
    }

    #[test]
    fn shared_data_failure_lets_the_request_through() {
        let host = FakeHost::with_request(&[(":path", "/")]);
        let p = plugin(&host, r#"{"rules": [{"tokenBucket": {"maxTokens": 1, "fillInterval": "1h"}}]}"#);
        host.cas_conflicts.set(u32::MAX);
        let mut f = p.new_filter(1, 0);
        assert_eq!(f.on_request_headers(&host, true), Flow::Continue);
        assert!(host.logs.borrow().iter().any(|(_, l)| l.contains("bucket unavailable")));
    }
}
