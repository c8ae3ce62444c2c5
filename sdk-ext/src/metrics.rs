//! Metrics with labels Envoy's stats tag extraction can turn into Prometheus labels.
//!
//! Names are `meshwasm.<filter>.rule.<rule>.<stat>`; Envoy stores them as
//! `wasmcustom.meshwasm.<filter>.rule.<rule>.<stat>`. With the bootstrap stats tag
//!
//! ```yaml
//! stats_config:
//!   stats_tags:
//!   - tag_name: rule
//!     regex: '^wasmcustom\.meshwasm\.[a-z_]+\.(rule\.([^.]+)\.)'
//! ```
//!
//! `/stats/prometheus` shows `meshwasm_<filter>_<stat>{rule="<rule>"}`. Metric ids are
//! defined once and cached.

use std::collections::HashMap;

use crate::host::{Host, LogLevel, MetricKind};

/// The regex for the `rule` tag, for bootstrap `stats_config.stats_tags`.
pub const RULE_TAG_REGEX: &str = r"^wasmcustom\.meshwasm\.[a-z_]+\.(rule\.([^.]+)\.)";

/// Label values may not contain the separator: anything outside `[A-Za-z0-9_-]` becomes `_`.
pub fn sanitize_label(v: &str) -> String {
    let s: String =
        v.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect();
    if s.is_empty() {
        "_".into()
    } else {
        s
    }
}

pub fn rule_metric_name(filter: &str, rule: &str, stat: &str) -> String {
    format!("meshwasm.{filter}.rule.{}.{stat}", sanitize_label(rule))
}

/// Define a metric and return its id; a failure is logged and gives `None` (never fatal).
pub fn define(host: &dyn Host, kind: MetricKind, name: &str) -> Option<u32> {
    match host.define_metric(kind, name) {
        Ok(id) => Some(id),
        Err(e) => {
            host.log(LogLevel::Warn, &format!("cannot define metric {name}: {e}"));
            None
        }
    }
}

/// Cached metric ids, keyed by kind and full name.
#[derive(Default)]
pub struct Metrics {
    ids: HashMap<(MetricKind, String), u32>,
}

impl Metrics {
    pub fn id(&mut self, host: &dyn Host, kind: MetricKind, name: &str) -> Option<u32> {
        if let Some(id) = self.ids.get(&(kind, name.to_string())) {
            return Some(*id);
        }
        let id = define(host, kind, name)?;
        self.ids.insert((kind, name.to_string()), id);
        Some(id)
    }

    /// Add `delta` to a counter or gauge; failures are logged, never fatal.
    pub fn add(&mut self, host: &dyn Host, kind: MetricKind, name: &str, delta: i64) {
        if let Some(id) = self.id(host, kind, name) {
            if let Err(e) = host.increment_metric(id, delta) {
                host.log(LogLevel::Debug, &format!("cannot increment metric {name}: {e}"));
            }
        }
    }

    pub fn record(&mut self, host: &dyn Host, name: &str, value: u64) {
        if let Some(id) = self.id(host, MetricKind::Histogram, name) {
            if let Err(e) = host.record_metric(id, value) {
                host.log(LogLevel::Debug, &format!("cannot record metric {name}: {e}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeHost;

    #[test]
    fn names_and_caching() {
        assert_eq!(
            rule_metric_name("fault", "ratings.jason v2", "aborts_injected"),
            "meshwasm.fault.rule.ratings_jason_v2.aborts_injected"
        );
        let host = FakeHost::new();
        let mut m = Metrics::default();
        m.add(&host, MetricKind::Counter, "a", 1);
        m.add(&host, MetricKind::Counter, "a", 2);
        m.add(&host, MetricKind::Gauge, "g", 1);
        m.add(&host, MetricKind::Gauge, "g", -1);
        assert_eq!(host.metric_value("a"), 3);
        assert_eq!(host.metric_value("g"), 0);
        assert_eq!(host.metrics.borrow().len(), 2, "ids are cached: one definition per metric");
        m.record(&host, "h", 42);
        m.record(&host, "h", 7);
        assert_eq!(host.metric_value("h"), 7, "histogram records the latest sample in the fake");
        assert!(host.metrics.borrow().iter().any(|(k, n, _)| *k == MetricKind::Histogram && n == "h"));
        let re = regex_lite::Regex::new(RULE_TAG_REGEX).unwrap();
        let caps = re.captures("wasmcustom.meshwasm.fault.rule.ratings-jason.delays_injected").unwrap();
        assert_eq!(&caps[2], "ratings-jason");
    }
}
