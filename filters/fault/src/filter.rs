//! The fault filter's stream and root: reads the request through the sdk-ext `Host`, asks
//! `policy` what to do, applies it (pause for the delay, local reply for the abort), and keeps
//! the stats and the cross-worker active-fault count.

use std::cell::RefCell;
use std::rc::Rc;

use meshwasm_sdk_ext::host::HostRequest;
use meshwasm_sdk_ext::metrics::{rule_metric_name, Metrics};
use meshwasm_sdk_ext::rng::WyRand;
use meshwasm_sdk_ext::route::RouteOverrides;
use meshwasm_sdk_ext::{shared, ConfigError, Flow, Host, HttpFilter, LocalReply, LogLevel, MetricKind, Plugin};

use crate::config::{Abort, AbortStatus, Config};
use crate::policy::{self, ABORT_BODY, ABORT_DETAILS};

pub const NAME: &str = "fault";

/// Stats, as Envoy's fault filter names them, per rule.
pub const DELAYS_INJECTED: &str = "delays_injected";
pub const ABORTS_INJECTED: &str = "aborts_injected";
pub const FAULTS_OVERFLOW: &str = "faults_overflow";
pub const ACTIVE_FAULTS: &str = "active_faults";

// === impl FaultPlugin ===

/// One per plugin configuration per worker: the immutable config and worker-local caches.
pub struct FaultPlugin {
    config: Rc<Config>,
    routes: RouteOverrides<Config>,
    metrics: RefCell<Metrics>,
    /// Shared-data key counting active faults across workers (only with `maxActiveFaults`).
    active_key: String,
}

impl FaultPlugin {
    pub fn new(config: Config, plugin_name: &str) -> Self {
        Self {
            config: Rc::new(config),
            routes: RouteOverrides::new(NAME),
            metrics: RefCell::default(),
            active_key: format!("meshwasm.{NAME}.{plugin_name}.active_faults"),
        }
    }

    fn count(&self, host: &dyn Host, kind: MetricKind, label: &str, stat: &str, delta: i64) {
        self.metrics.borrow_mut().add(host, kind, &rule_metric_name(NAME, label, stat), delta);
    }
}

impl Plugin for FaultPlugin {
    const NAME: &'static str = NAME;
    type Filter = FaultFilter;

    fn configure(bytes: &[u8], host: &dyn Host) -> Result<Self, ConfigError> {
        let config = Config::from_json(bytes)?;
        let name = meshwasm_sdk_ext::host::plugin_name(host);
        let plugin = FaultPlugin::new(config, &name);
        if plugin.config.max_active_faults.is_some() {
            shared::init_u64(host, &plugin.active_key);
        }
        // Define every stat up front so it shows (at 0) before the first fault, as Envoy's do.
        for label in plugin.config.labels() {
            for stat in [DELAYS_INJECTED, ABORTS_INJECTED, FAULTS_OVERFLOW] {
                plugin.count(host, MetricKind::Counter, label, stat, 0);
            }
            plugin.count(host, MetricKind::Gauge, label, ACTIVE_FAULTS, 0);
        }
        Ok(plugin)
    }

    fn new_filter(self: &Rc<Self>, _context_id: u32, seed: u64) -> FaultFilter {
        FaultFilter { plugin: self.clone(), rng: WyRand::new(seed), state: State::Idle, active: None }
    }
}

// === impl FaultFilter ===

#[derive(Debug)]
enum State {
    Idle,
    /// Paused for a delay; the abort (if any) is decided when it ends.
    Delaying {
        label: String,
        abort: Option<Abort>,
    },
    /// Aborted with a local reply: nothing more to do.
    Aborted,
}

pub struct FaultFilter {
    plugin: Rc<FaultPlugin>,
    rng: WyRand,
    state: State,
    /// The label under which this stream holds an active fault (one per stream, as Envoy).
    active: Option<String>,
}

impl FaultFilter {
    /// Envoy's `tryIncActiveFaults`: one active fault per stream; the limit is checked only
    /// when the stream does not hold one yet.
    fn try_activate(&mut self, host: &dyn Host, label: &str) -> bool {
        if self.active.is_some() {
            return true;
        }
        if let Some(max) = self.plugin.config.max_active_faults {
            match shared::try_acquire(host, &self.plugin.active_key, max) {
                Ok(true) => {}
                Ok(false) => {
                    self.plugin.count(host, MetricKind::Counter, label, FAULTS_OVERFLOW, 1);
                    return false;
                }
                Err(e) => {
                    // Cannot prove we are under the limit: do not inject (the safe side).
                    host.log(
                        LogLevel::Warn,
                        &format!("meshwasm.fault: active fault count unavailable ({e}); not injecting"),
                    );
                    self.plugin.count(host, MetricKind::Counter, label, FAULTS_OVERFLOW, 1);
                    return false;
                }
            }
        }
        self.plugin.count(host, MetricKind::Gauge, label, ACTIVE_FAULTS, 1);
        self.active = Some(label.to_string());
        true
    }

    /// Envoy's `maybeDoAbort`.
    fn maybe_abort(&mut self, host: &dyn Host, label: &str, abort: Option<&Abort>) -> bool {
        let Some(status) = policy::decide_abort(abort, &mut self.rng) else { return false };
        if !self.try_activate(host, label) {
            return false;
        }
        self.plugin.count(host, MetricKind::Counter, label, ABORTS_INJECTED, 1);
        let reply = abort_reply(host, status);
        if let Err(e) = host.send_local_reply(&reply) {
            host.log(LogLevel::Debug, &format!("meshwasm.fault: abort reply not sent: {e}"));
        }
        self.state = State::Aborted;
        true
    }
}

/// The local reply for an abort. The Proxy-Wasm ABI carries only the well-known gRPC codes
/// (0..=16); Envoy's fault filter echoes any number from `x-envoy-fault-abort-grpc-request`,
/// so a larger code is sent as the `grpc-status` header of the trailers-only reply, which
/// Envoy keeps when it builds a gRPC local reply.
pub fn abort_reply(host: &dyn Host, status: AbortStatus) -> LocalReply {
    let mut reply = LocalReply {
        status: status.http,
        body: ABORT_BODY.to_string(),
        headers: Vec::new(),
        grpc_status: None,
        details: ABORT_DETAILS.to_string(),
    };
    match status.grpc {
        Some(g) if g <= 16 => reply.grpc_status = u32::try_from(g).ok(),
        Some(g) if is_grpc_request(host) => reply.headers.push(("grpc-status".to_string(), g.to_string())),
        Some(_) | None => {}
    }
    reply
}

/// Envoy's `Grpc::Common::isGrpcRequestHeaders`: `application/grpc` or `application/grpc+…`.
fn is_grpc_request(host: &dyn Host) -> bool {
    let ct = host.header(meshwasm_sdk_ext::HeaderMap::RequestHeaders, "content-type").unwrap_or_default();
    ct == "application/grpc" || ct.strip_prefix("application/grpc").is_some_and(|rest| rest.starts_with('+'))
}

impl HttpFilter for FaultFilter {
    fn on_request_headers(&mut self, host: &dyn Host, _end_of_stream: bool) -> Flow {
        let plugin = self.plugin.clone();
        let mut req = HostRequest::new(host);
        let route = if plugin.config.route_overrides {
            let route = plugin.routes.lookup(host, |_, v| Config::from_route_value(v));
            if let Some(name) = route.route_name {
                req = req.with_route(name);
            }
            route.config
        } else {
            None
        };
        let config = route.as_ref().unwrap_or(&plugin.config);
        let Some(plan) = policy::plan(config, &mut req, &mut self.rng) else { return Flow::Continue };
        if let Some(delay) = plan.delay {
            if self.try_activate(host, plan.label) {
                plugin.count(host, MetricKind::Counter, plan.label, DELAYS_INJECTED, 1);
                self.state = State::Delaying { label: plan.label.to_string(), abort: plan.abort };
                return Flow::Delay(delay);
            }
        }
        if self.maybe_abort(host, plan.label, plan.abort.as_ref()) {
            return Flow::Pause;
        }
        Flow::Continue
    }

    fn on_request_body(&mut self, _host: &dyn Host, _size: usize, _end_of_stream: bool) -> Flow {
        // While delayed, hold the body (Envoy buffers it) so the upstream gets it after the delay.
        match self.state {
            State::Idle => Flow::Continue,
            State::Delaying { .. } | State::Aborted => Flow::Pause,
        }
    }

    fn on_request_trailers(&mut self, _host: &dyn Host) -> Flow {
        match self.state {
            State::Idle => Flow::Continue,
            State::Delaying { .. } | State::Aborted => Flow::Pause,
        }
    }

    fn on_timer(&mut self, host: &dyn Host) -> Flow {
        let State::Delaying { label, abort } = std::mem::replace(&mut self.state, State::Idle) else {
            return Flow::Continue;
        };
        if self.maybe_abort(host, &label, abort.as_ref()) {
            return Flow::Pause;
        }
        Flow::Continue
    }

    fn on_done(&mut self, host: &dyn Host) {
        let Some(label) = self.active.take() else { return };
        self.plugin.count(host, MetricKind::Gauge, &label, ACTIVE_FAULTS, -1);
        if self.plugin.config.max_active_faults.is_some() {
            if let Err(e) = shared::release(host, &self.plugin.active_key) {
                host.log(LogLevel::Warn, &format!("meshwasm.fault: cannot release active fault: {e}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshwasm_sdk_ext::fake::FakeHost;
    use std::time::Duration;

    fn plugin(json: &str, host: &FakeHost) -> Rc<FaultPlugin> {
        Rc::new(FaultPlugin::configure(json.as_bytes(), host).unwrap())
    }

    const ABORT_ALL: &str =
        r#"{"rules":[{"name":"all","fault":{"abort":{"httpStatus":503,"percentage":{"value":100}}}}]}"#;

    #[test]
    fn abort_sends_envoy_reply_and_counts() {
        let host = FakeHost::with_request(&[(":path", "/"), (":method", "GET")]);
        let p = plugin(ABORT_ALL, &host);
        let mut f = p.new_filter(2, 1);
        assert_eq!(f.on_request_headers(&host, true), Flow::Pause);
        let replies = host.replies.borrow();
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].status, 503);
        assert_eq!(replies[0].body, "fault filter abort");
        assert_eq!(replies[0].grpc_status, None);
        assert_eq!(replies[0].details, "fault_filter_abort");
        drop(replies);
        assert_eq!(host.metric_value("meshwasm.fault.rule.all.aborts_injected"), 1);
        assert_eq!(host.metric_value("meshwasm.fault.rule.all.active_faults"), 1);
        f.on_done(&host);
        f.on_done(&host);
        assert_eq!(host.metric_value("meshwasm.fault.rule.all.active_faults"), 0);
    }

    #[test]
    fn delay_then_abort_after_delay_and_body_held() {
        let host = FakeHost::with_request(&[(":path", "/")]);
        let p = plugin(
            r#"{"rules":[{"name":"d","fault":{"delay":{"fixedDelay":"250ms","percentage":{"value":100}},
                "abort":{"grpcStatus":"UNAVAILABLE","percentage":{"value":100}}}}]}"#,
            &host,
        );
        let mut f = p.new_filter(2, 1);
        assert_eq!(f.on_request_headers(&host, false), Flow::Delay(Duration::from_millis(250)));
        assert!(host.replies.borrow().is_empty(), "abort waits for the delay");
        assert_eq!(f.on_request_body(&host, 10, false), Flow::Pause);
        assert_eq!(f.on_request_trailers(&host), Flow::Pause);
        assert_eq!(host.metric_value("meshwasm.fault.rule.d.delays_injected"), 1);
        assert_eq!(f.on_timer(&host), Flow::Pause);
        let r = host.replies.borrow()[0].clone();
        assert_eq!((r.status, r.grpc_status), (200, Some(14)));
        assert_eq!(host.metric_value("meshwasm.fault.rule.d.active_faults"), 1, "one active fault per stream");
        f.on_done(&host);
        assert_eq!(host.metric_value("meshwasm.fault.rule.d.active_faults"), 0);
    }

    #[test]
    fn delay_without_abort_resumes() {
        let host = FakeHost::with_request(&[(":path", "/"), ("x-envoy-fault-delay-request", "40")]);
        let p = plugin(r#"{"headerControl":true}"#, &host);
        let mut f = p.new_filter(2, 1);
        assert_eq!(f.on_request_headers(&host, true), Flow::Delay(Duration::from_millis(40)));
        assert_eq!(f.on_timer(&host), Flow::Continue);
        assert_eq!(f.on_request_body(&host, 1, true), Flow::Continue);
        assert_eq!(host.metric_value("meshwasm.fault.rule.header-control.delays_injected"), 1);
    }

    #[test]
    fn max_active_faults_across_streams_and_overflow() {
        let host = FakeHost::with_request(&[(":path", "/")]);
        let p = plugin(
            r#"{"rules":[{"name":"d","fault":{"delay":{"fixedDelay":"1s","percentage":{"value":100}},
            "abort":{"httpStatus":503,"percentage":{"value":100}}}}],"maxActiveFaults":2}"#,
            &host,
        );
        let mut a = p.new_filter(2, 1);
        let mut b = p.new_filter(3, 2);
        let mut c = p.new_filter(4, 3);
        assert!(matches!(a.on_request_headers(&host, true), Flow::Delay(_)));
        assert!(matches!(b.on_request_headers(&host, true), Flow::Delay(_)));
        // Third: delay overflows, then the abort overflows too (Envoy counts both).
        assert_eq!(c.on_request_headers(&host, true), Flow::Continue);
        assert_eq!(host.metric_value("meshwasm.fault.rule.d.faults_overflow"), 2);
        assert_eq!(host.shared_u64("meshwasm.fault..active_faults"), Some(2));
        a.on_done(&host);
        b.on_done(&host);
        c.on_done(&host);
        assert_eq!(host.shared_u64("meshwasm.fault..active_faults"), Some(0));
        assert_eq!(host.metric_value("meshwasm.fault.rule.d.active_faults"), 0);
    }

    #[test]
    fn gone_stream_is_handled() {
        let host = FakeHost::with_request(&[(":path", "/")]);
        let p = plugin(ABORT_ALL, &host);
        host.stream_gone.set(true);
        let mut f = p.new_filter(2, 1);
        assert_eq!(f.on_request_headers(&host, true), Flow::Pause);
        f.on_done(&host);
        assert_eq!(host.metric_value("meshwasm.fault.rule.all.active_faults"), 0);
    }

    #[test]
    fn route_override_replaces_plugin_config() {
        let host = FakeHost::with_request(&[(":path", "/")]);
        let p = plugin(ABORT_ALL, &host);
        host.set_property(&["xds", "route_name"], b"calm");
        let meta = serde_json::json!({"fault": {"rules": [{"name": "r", "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 100}}}}]}});
        host.set_property(&["xds", "route_metadata"], &meshwasm_sdk_ext::props::encode_metadata("meshwasm", &meta));
        let mut f = p.new_filter(2, 1);
        assert_eq!(f.on_request_headers(&host, true), Flow::Pause);
        assert_eq!(host.replies.borrow()[0].status, 418);
    }
}
