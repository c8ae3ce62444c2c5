//! Per-route configuration. Envoy's wasm filter has no per-route config, so a route carries
//! its override in route metadata:
//!
//! ```yaml
//! metadata:
//!   filter_metadata:
//!     meshwasm:
//!       fault: { ...the filter's own JSON shape... }
//! ```
//!
//! The override is decoded once per route, keyed by `xds.route_name`, and cached for the life
//! of the plugin configuration. Overrides need a named route (Istio names every route it
//! generates): a request on an unnamed route reads one property and nothing else, so the
//! common path never pays for serializing route metadata. (Probing
//! `xds.route_metadata.filter_metadata.meshwasm.<filter>` instead measured the same: the cost
//! of a property read is Envoy's attribute evaluation, not the copy of the value.)

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use serde_json::Value;

use crate::config::ConfigError;
use crate::host::{Host, LogLevel};

/// Cache size bound; a new entry beyond it clears the cache (routes are few in practice).
const MAX_ROUTES: usize = 4096;

pub struct RouteOverrides<C> {
    filter: &'static str,
    by_name: RefCell<HashMap<String, Option<Rc<C>>>>,
}

/// What a lookup found: the route name (for matching) and the override, if any.
pub struct RouteInfo<C> {
    pub route_name: Option<String>,
    pub config: Option<Rc<C>>,
}

impl<C> RouteOverrides<C> {
    pub fn new(filter: &'static str) -> Self {
        Self { filter, by_name: RefCell::default() }
    }

    /// The override for the current request's route, decoding it on the route's first request
    /// (`decode` gets the route name and the filter's value from the route metadata).
    pub fn lookup(&self, host: &dyn Host, decode: impl Fn(&str, &Value) -> Result<C, ConfigError>) -> RouteInfo<C> {
        let route_name =
            host.property(&["xds", "route_name"]).and_then(|b| String::from_utf8(b).ok()).filter(|n| !n.is_empty());
        let Some(name) = route_name else { return RouteInfo { route_name: None, config: None } };
        if let Some(hit) = self.by_name.borrow().get(&name) {
            return RouteInfo { config: hit.clone(), route_name: Some(name) };
        }
        let metadata = host.property(&["xds", "route_metadata"]).unwrap_or_default();
        let config = self.decode(host, &name, &metadata, decode);
        insert_bounded(&self.by_name, name.clone(), config.clone());
        RouteInfo { route_name: Some(name), config }
    }

    fn decode(
        &self,
        host: &dyn Host,
        route: &str,
        metadata: &[u8],
        decode: impl Fn(&str, &Value) -> Result<C, ConfigError>,
    ) -> Option<Rc<C>> {
        let ns = match crate::props::metadata_namespace(metadata, "meshwasm") {
            Ok(ns) => ns?,
            Err(e) => {
                host.log(
                    LogLevel::Error,
                    &format!("meshwasm.{}: route {route}: cannot decode route metadata: {e}", self.filter),
                );
                return None;
            }
        };
        let value = ns.get(self.filter)?;
        match decode(route, value) {
            Ok(c) => {
                host.log(
                    LogLevel::Info,
                    &format!("meshwasm.{}: route {route}: using per-route configuration", self.filter),
                );
                Some(Rc::new(c))
            }
            Err(e) => {
                host.log(
                    LogLevel::Error,
                    &format!(
                        "meshwasm.{f}: route {route}: invalid per-route configuration, using the plugin's: \
                         filter_metadata.meshwasm.{f}.{e}",
                        f = self.filter
                    ),
                );
                None
            }
        }
    }
}

fn insert_bounded<K: std::hash::Hash + Eq, V>(map: &RefCell<HashMap<K, V>>, k: K, v: V) {
    let mut m = map.borrow_mut();
    if m.len() >= MAX_ROUTES {
        m.clear();
    }
    m.insert(k, v);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::from_value;
    use crate::fake::FakeHost;
    use crate::props::encode_metadata;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct C {
        n: u32,
    }

    #[test]
    fn decodes_once_per_route_and_falls_back_on_errors() {
        let host = FakeHost::new();
        let cache = RouteOverrides::<C>::new("fault");
        let decode_calls = std::cell::Cell::new(0);
        let decode = |_: &str, v: &Value| {
            decode_calls.set(decode_calls.get() + 1);
            from_value::<C>(v)
        };
        // No metadata: no override.
        host.set_property(&["xds", "route_name"], b"r1");
        assert!(cache.lookup(&host, decode).config.is_none());
        // Route r2 with an override.
        host.set_property(&["xds", "route_name"], b"r2");
        host.set_property(
            &["xds", "route_metadata"],
            &encode_metadata("meshwasm", &serde_json::json!({"fault": {"n": 3}})),
        );
        let info = cache.lookup(&host, decode);
        assert_eq!(info.config.as_deref(), Some(&C { n: 3 }));
        assert_eq!(info.route_name.as_deref(), Some("r2"));
        let calls = decode_calls.get();
        cache.lookup(&host, decode);
        assert_eq!(decode_calls.get(), calls, "cached");
        // Unnamed routes have no override (and no metadata read).
        host.set_property(&["xds", "route_name"], b"");
        assert!(cache.lookup(&host, decode).config.is_none());
        // Bad override: logged with the path, ignored.
        host.set_property(&["xds", "route_name"], b"r3");
        host.set_property(
            &["xds", "route_metadata"],
            &encode_metadata("meshwasm", &serde_json::json!({"fault": {"m": 3}})),
        );
        assert!(cache.lookup(&host, decode).config.is_none());
        assert!(
            host.logs
                .borrow()
                .iter()
                .any(|(_, l)| l.contains("filter_metadata.meshwasm.fault.") && l.contains("unknown field `m`")),
            "{:?}",
            host.logs.borrow()
        );
    }
}
