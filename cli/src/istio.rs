//! `meshwasm from-istio`: Istio resources → each filter's plugin JSON, and route metadata
//! for per-route overrides. Every field is either converted, left to Envoy's routing (named
//! in `notes`), or named in `unsupported`: nothing is dropped silently.
//!
//! [`SOURCES`] is THE table: which Istio resource (and, for a VirtualService, which field
//! of an HTTP route) feeds which filter. A filter that lands later joins with one entry.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::filters;

/// How a source is converted.
#[derive(Clone, Copy)]
pub enum Convert {
    /// VirtualService: the named field of each `spec.http[]` route.
    RouteField(fn(&RouteCtx, &Value, &mut Output)),
    /// A whole resource.
    Resource(fn(&Resource, &mut Output)),
    /// Known, but its filter has not landed: reported, never dropped.
    NotYet(&'static str),
}

/// One row of the table.
pub struct Source {
    pub kind: &'static str,
    /// For `RouteField`: the field of an HTTP route (`fault`, `retries`, …).
    pub field: Option<&'static str>,
    /// The filter it configures.
    pub filter: &'static str,
    pub convert: Convert,
}

pub const SOURCES: &[Source] = &[
    Source { kind: "VirtualService", field: Some("fault"), filter: "fault", convert: Convert::RouteField(vs_fault) },
    Source { kind: "VirtualService", field: Some("retries"), filter: "retry", convert: Convert::RouteField(vs_retry) },
    Source { kind: "VirtualService", field: Some("timeout"), filter: "retry", convert: Convert::RouteField(vs_retry) },
    Source { kind: "AuthorizationPolicy", field: None, filter: "authz", convert: Convert::Resource(authz_policy) },
    Source { kind: "RequestAuthentication", field: None, filter: "authz", convert: Convert::Resource(authz_authn) },
    Source { kind: "Telemetry", field: None, filter: "telemetry", convert: Convert::Resource(telemetry) },
    Source { kind: "WasmPlugin", field: None, filter: "", convert: Convert::Resource(wasmplugin) },
];

/// HTTP route fields that Envoy's own route configuration expresses (a route's `match`
/// becomes Envoy route matches; `route`/`redirect`/… its action): not a filter's job, so
/// they are named in `notes`, not converted.
const ROUTING_FIELDS: &[&str] = &["name", "match", "route"];

/// `HTTPMatchRequest` fields the meshwasm matcher understands.
const MATCH_FIELDS: &[&str] =
    &["uri", "scheme", "method", "authority", "headers", "withoutHeaders", "queryParams", "ignoreUriCase", "port"];

/// A resource as read: where it came from and its identity.
pub struct Resource {
    pub file: String,
    pub value: Value,
}

impl Resource {
    fn kind(&self) -> &str {
        self.value.get("kind").and_then(Value::as_str).unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.value.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("<unnamed>")
    }

    fn namespace(&self) -> &str {
        self.value.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("default")
    }

    /// `Kind namespace/name (file)`, for messages.
    pub fn id(&self) -> String {
        format!("{} {}/{} ({})", self.kind(), self.namespace(), self.name(), self.file)
    }
}

/// One HTTP route of a VirtualService, while converting it.
pub struct RouteCtx<'a> {
    pub resource: &'a Resource,
    pub index: usize,
    pub route: &'a Value,
}

impl RouteCtx<'_> {
    /// The route's name, or `http[i]`.
    fn label(&self) -> String {
        match self.route.get("name").and_then(Value::as_str) {
            Some(n) => n.to_string(),
            None => format!("http[{}]", self.index),
        }
    }

    fn path(&self, field: &str) -> String {
        format!("spec.http[{}].{field}", self.index)
    }

    /// The name of the rule made from this route: `<virtual service>-<route label>`.
    fn rule_name(&self) -> String {
        format!("{}-{}", self.resource.name(), self.label())
    }
}

/// The conversion result.
#[derive(Debug, Default)]
pub struct Output {
    /// filter → plugin configuration.
    pub plugins: BTreeMap<String, Value>,
    /// Per-route overrides: one entry per VirtualService HTTP route that has one.
    pub routes: Vec<Value>,
    /// Fields left to Envoy's route configuration, and what was not checked.
    pub notes: Vec<String>,
    /// Fields meshwasm cannot express (yet): named, with the resource.
    pub unsupported: Vec<String>,
    /// Hard errors (a configuration the filter's parser refuses).
    pub errors: Vec<String>,
    /// Where each plugin configuration came from (to refuse two sources for one filter).
    sources: BTreeMap<String, String>,
}

impl Output {
    fn unsupported(&mut self, r: &Resource, path: &str, why: &str) {
        self.unsupported.push(format!("{}: {path}: {why}", r.id()));
    }

    /// The JSON document `meshwasm from-istio` prints.
    pub fn to_json(&self) -> Value {
        json!({
            "plugins": self.plugins,
            "routes": self.routes,
            "notes": self.notes,
            "unsupported": self.unsupported,
        })
    }
}

/// Converts every resource. Resources of kinds meshwasm does not take are named in
/// `unsupported`.
pub fn convert(resources: &[Resource]) -> Output {
    let mut out = Output::default();
    let mut rules = VsRules::default();
    for r in resources {
        let kind = r.kind();
        let rows: Vec<&Source> = SOURCES.iter().filter(|s| s.kind == kind).collect();
        if rows.is_empty() {
            let known: Vec<&str> = {
                let mut k: Vec<&str> = SOURCES.iter().map(|s| s.kind).collect();
                k.dedup();
                k
            };
            out.unsupported.push(format!(
                "{}: kind {kind:?} is not converted (meshwasm takes {})",
                r.id(),
                known.join(", ")
            ));
            continue;
        }
        if kind == "VirtualService" {
            virtual_service(r, &rows, &mut out, &mut rules);
            continue;
        }
        for row in rows {
            match row.convert {
                Convert::Resource(f) => f(r, &mut out),
                Convert::NotYet(why) => out.unsupported(r, "spec", &format!("not yet supported: {why}")),
                Convert::RouteField(_) => {}
            }
        }
    }
    if !rules.fault.is_empty() {
        set_plugin(&mut out, "fault", json!({ "rules": rules.fault }), "VirtualService faults");
    }
    if !rules.retry.is_empty() {
        set_plugin(&mut out, "retry", json!({ "rules": rules.retry }), "VirtualService retries and timeouts");
        if out.routes.iter().any(|r| r.pointer("/metadata/filter_metadata/meshwasm/retry").is_some()) {
            out.notes.push(
                "retry: the per-route overrides (routes[].metadata …meshwasm.retry) are read only with \"routeOverrides\": true in the retry plugin configuration".into(),
            );
        }
    }
    check_plugins(&mut out);
    out
}

fn set_plugin(out: &mut Output, filter: &str, config: Value, source: &str) {
    if let Some(previous) = out.sources.get(filter) {
        out.errors.push(format!(
            "two sources configure the {filter} filter ({previous} and {source}): convert them separately"
        ));
        return;
    }
    out.sources.insert(filter.to_string(), source.to_string());
    out.plugins.insert(filter.to_string(), config);
}

/// Every plugin configuration through its filter's own parser (when that filter exists).
fn check_plugins(out: &mut Output) {
    for (filter, config) in &out.plugins {
        match filters::find(filter) {
            Ok(spec) => {
                let bytes = config.to_string().into_bytes();
                if let Err(e) = (spec.check)(&bytes) {
                    out.errors.push(format!("the {filter} configuration converted from Istio is refused: {e}"));
                }
            }
            Err(_) => out.notes.push(format!(
                "the {filter} configuration is packaged but not checked: the {filter} filter is not built into this meshwasm"
            )),
        }
    }
}

// === VirtualService ===

/// Plugin-wide rules collected from every VirtualService, in order.
#[derive(Default)]
struct VsRules {
    fault: Vec<Value>,
    retry: Vec<Value>,
}

fn virtual_service(r: &Resource, rows: &[&Source], out: &mut Output, rules: &mut VsRules) {
    let spec = r.value.get("spec").cloned().unwrap_or_default();
    if let Some(spec) = spec.as_object() {
        for (k, _) in spec {
            match k.as_str() {
                "hosts" | "http" => {}
                "gateways" | "exportTo" => out.notes.push(format!(
                    "{}: spec.{k}: where the VirtualService applies; choose the Envoy listeners/WasmPlugin selector accordingly",
                    r.id()
                )),
                "tcp" | "tls" => out.unsupported(r, &format!("spec.{k}"), "meshwasm filters are HTTP filters"),
                other => out.unsupported(r, &format!("spec.{other}"), "not converted"),
            }
        }
    }
    let hosts: Vec<String> = spec
        .get("hosts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(String::from)
        .collect();
    let routes: Vec<&Value> = spec.get("http").and_then(Value::as_array).into_iter().flatten().collect();
    // Retries: Istio gives every HTTP route its default retry policy unless the route sets
    // `retries` (and no timeout unless it sets `timeout`). A retry rule without `retries` is
    // that default, so when any route of this VirtualService sets either, every route becomes
    // a rule, in order: the filter's first matching rule is then Istio's first matching route.
    let any_retry = routes.iter().any(|rt| rt.get("retries").is_some() || rt.get("timeout").is_some());
    // Istio routes a request by the FIRST HTTP route that matches. A plugin-wide rule for a
    // faulted route keeps that meaning only if every earlier route has a rule too (the fault
    // filter also applies its first matching rule); an earlier route without a fault cannot be
    // expressed as a rule, so later faults are then only given as per-route overrides.
    let mut unfaulted_before: Vec<usize> = Vec::new();
    for (index, route) in routes.iter().copied().enumerate() {
        let ctx = RouteCtx { resource: r, index, route };
        let Some(fields) = route.as_object() else { continue };
        // The route's `match`, scoped to the VirtualService's hosts (computed once: its
        // unsupported fields are named once).
        let mut matches: Option<Vec<Value>> = None;
        let mut scoped = |out: &mut Output| matches.get_or_insert_with(|| scoped_matches(&ctx, &hosts, out)).clone();
        if !fields.contains_key("fault") {
            unfaulted_before.push(index);
        }
        let mut retry_done = false;
        for (field, value) in fields {
            if ROUTING_FIELDS.contains(&field.as_str()) {
                continue;
            }
            let Some(row) = rows.iter().find(|s| s.field == Some(field.as_str())) else {
                out.unsupported(r, &ctx.path(field), "not converted (no meshwasm filter implements it)");
                continue;
            };
            match row.convert {
                Convert::RouteField(f) if row.filter == "retry" => {
                    // `retries` and `timeout` make one rule: converted once per route.
                    if !retry_done {
                        retry_done = true;
                        f(&ctx, value, out);
                    }
                }
                Convert::RouteField(f) => {
                    // The per-route override; for faults also a plugin-wide rule.
                    f(&ctx, value, out);
                    if row.filter == "fault" {
                        if unfaulted_before.is_empty() {
                            let m = scoped(out);
                            rules.fault.push(json!({ "name": ctx.rule_name(), "match": m, "fault": value }));
                        } else {
                            let earlier: Vec<String> =
                                unfaulted_before.iter().map(|i| format!("spec.http[{i}]")).collect();
                            out.unsupported(
                                r,
                                &ctx.path("fault"),
                                &format!(
                                    "not a plugin-wide rule: it would also fault requests Istio routes to {} (no fault); \
                                     use its per-route override (routes[])",
                                    earlier.join(", ")
                                ),
                            );
                        }
                    }
                }
                Convert::NotYet(why) => out.unsupported(r, &ctx.path(field), &format!("not yet supported: {why}")),
                Convert::Resource(_) => {}
            }
        }
        if any_retry {
            let mut rule = retry_rule(&ctx, out).unwrap_or_else(|| json!({ "name": ctx.rule_name() }));
            let m = scoped(out);
            if let Some(o) = rule.as_object_mut() {
                o.insert("match".into(), Value::Array(m));
            }
            rules.retry.push(rule);
        }
        let routing: Vec<&str> =
            ROUTING_FIELDS.iter().copied().filter(|f| *f != "name" && fields.contains_key(*f)).collect();
        if !routing.is_empty() {
            out.notes.push(format!(
                "{}: spec.http[{index}]: {} stay Envoy route configuration (the route that carries the override)",
                r.id(),
                routing.join(" and ")
            ));
        }
    }
}

/// Adds `config` as the route's override for `filter` (one `routes[]` entry per
/// VirtualService HTTP route, holding every filter's override).
fn route_override(ctx: &RouteCtx, filter: &str, config: Value, out: &mut Output) {
    let vs = format!("{}/{}", ctx.resource.namespace(), ctx.resource.name());
    let existing = out.routes.iter_mut().find(|e| {
        e.get("virtualService").and_then(Value::as_str) == Some(vs.as_str())
            && e.get("http").and_then(Value::as_u64) == u64::try_from(ctx.index).ok()
    });
    let entry = match existing {
        Some(e) => e,
        None => {
            out.routes.push(json!({
                "virtualService": vs,
                "http": ctx.index,
                "route": ctx.label(),
                "metadata": { "filter_metadata": { "meshwasm": {} } },
            }));
            let Some(e) = out.routes.last_mut() else { return };
            e
        }
    };
    if let Some(m) = entry.pointer_mut("/metadata/filter_metadata/meshwasm").and_then(Value::as_object_mut) {
        m.insert(filter.to_string(), config);
    }
}

/// `HTTPRetry` fields that are route-level in Envoy (the carrier route's `retry_policy`, see
/// docs/retry.md#carrier): the retry filter refuses values it cannot set per request.
const CARRIER_FIELDS: &[&str] = &["backoff", "retryRemoteLocalities", "retryIgnorePreviousHosts"];

/// `spec.http[i].retries` / `timeout` → a retry rule `{name, retries?, timeout?}` checked by
/// the filter's route parser, which is also the route's override. A route-level field the
/// filter cannot take per request ([`CARRIER_FIELDS`]: `retries.backoff`,
/// `retryRemoteLocalities: true`, …) is removed and named in `unsupported` with the filter's
/// reason; any other refusal is an error. `None` when the route sets neither field.
fn retry_rule(ctx: &RouteCtx, out: &mut Output) -> Option<Value> {
    let mut rule = Map::new();
    rule.insert("name".into(), json!(ctx.rule_name()));
    for field in ["retries", "timeout"] {
        if let Some(v) = ctx.route.get(field) {
            rule.insert(field.into(), v.clone());
        }
    }
    if rule.len() == 1 {
        return None;
    }
    let check = filters::find("retry").ok().and_then(|s| s.check_route);
    for _ in 0..8 {
        let Some(check) = check else { break };
        let config = json!({ "rules": [Value::Object(rule.clone())] });
        let Err(e) = check(&config) else { break };
        // `rules[0].retries.backoff` → `retries.backoff`.
        let inner = e.path.strip_prefix("rules[0].").unwrap_or_default().to_string();
        let mut parts = inner.splitn(2, '.');
        let removed = match (parts.next(), parts.next()) {
            (Some("retries"), Some(sub)) if CARRIER_FIELDS.contains(&sub) => {
                rule.get_mut("retries").and_then(Value::as_object_mut).and_then(|o| o.remove(sub)).is_some()
            }
            _ => false,
        };
        if removed {
            out.unsupported(ctx.resource, &ctx.path(&inner), &format!("left out: {}", e.message));
        } else {
            out.errors.push(format!("{}: {}: {}", ctx.resource.id(), ctx.path(&inner), e.message));
            return None;
        }
    }
    Some(Value::Object(rule))
}

/// `spec.http[i].retries`/`timeout` → the route's override `filter_metadata.meshwasm.retry`.
fn vs_retry(ctx: &RouteCtx, _value: &Value, out: &mut Output) {
    if let Some(rule) = retry_rule(ctx, &mut Output::default()) {
        route_override(ctx, "retry", json!({ "rules": [rule] }), out);
    }
}

/// `spec.http[i].fault` → a per-route override `filter_metadata.meshwasm.fault`.
fn vs_fault(ctx: &RouteCtx, fault: &Value, out: &mut Output) {
    let override_config = json!({ "rules": [{ "name": ctx.rule_name(), "fault": fault }] });
    if let Ok(spec) = filters::find("fault") {
        if let Some(check) = spec.check_route {
            if let Err(e) = check(&override_config) {
                out.errors.push(format!("{}: {}: {e}", ctx.resource.id(), ctx.path("fault")));
                return;
            }
        }
    }
    route_override(ctx, "fault", override_config, out);
}

/// The route's `match` as the meshwasm matcher's list, each entry also scoped to the
/// VirtualService's `hosts` by authority.
fn scoped_matches(ctx: &RouteCtx, hosts: &[String], out: &mut Output) -> Vec<Value> {
    let mut matches: Vec<Value> = Vec::new();
    let route_matches: Vec<Value> = match ctx.route.get("match").and_then(Value::as_array) {
        Some(m) if !m.is_empty() => m.clone(),
        _ => vec![json!({})],
    };
    for (mi, m) in route_matches.iter().enumerate() {
        let mut entry = Map::new();
        for (k, v) in m.as_object().into_iter().flatten() {
            if MATCH_FIELDS.contains(&k.as_str()) {
                entry.insert(k.clone(), v.clone());
            } else if k == "name" {
                out.notes.push(format!(
                    "{}: {}: the match name {v} is a label only; not carried over",
                    ctx.resource.id(),
                    ctx.path(&format!("match[{mi}].name"))
                ));
            } else {
                out.unsupported(
                    ctx.resource,
                    &ctx.path(&format!("match[{mi}].{k}")),
                    "the meshwasm matcher has no such field",
                );
            }
        }
        let scoped_hosts: Vec<&String> = hosts.iter().filter(|h| h.as_str() != "*").collect();
        if scoped_hosts.is_empty() || entry.contains_key("authority") {
            matches.push(Value::Object(entry));
        } else {
            for h in scoped_hosts {
                let mut e = entry.clone();
                e.insert("authority".into(), json!({ "regex": host_regex(h, ctx.resource.namespace()) }));
                matches.push(Value::Object(e));
            }
        }
    }
    matches
}

/// The authorities a VirtualService host answers to, as Istio generates them for Envoy
/// virtual host domains: a short name also in its namespace's FQDN forms, each with an
/// optional port; `*.x` any subdomain.
pub fn host_regex(host: &str, namespace: &str) -> String {
    let port = r"(:[0-9]+)?";
    if let Some(suffix) = host.strip_prefix("*.") {
        return format!(r"^[^:]+\.{}{port}$", regex_escape(suffix));
    }
    if host.contains('.') {
        return format!("^{}{port}$", regex_escape(host));
    }
    let ns = regex_escape(namespace);
    format!(r"^{}(\.{ns}(\.svc(\.cluster\.local)?)?)?{port}$", regex_escape(host))
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

// === AuthorizationPolicy / RequestAuthentication ===

/// The resource as `kubectl get -o json` prints it, minus server-side bookkeeping.
fn as_printed(r: &Resource) -> Value {
    let mut v = r.value.clone();
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in ["managedFields", "resourceVersion", "uid", "generation", "creationTimestamp"] {
            meta.remove(k);
        }
    }
    if let Some(m) = v.as_object_mut() {
        m.remove("status");
    }
    v
}

fn push_to(out: &mut Output, key: &str, value: Value) {
    out.sources.entry("authz".into()).or_insert_with(|| "AuthorizationPolicy/RequestAuthentication".into());
    let config = out.plugins.entry("authz".into()).or_insert_with(|| json!({ "policies": [], "authentication": [] }));
    if let Some(list) = config.get_mut(key).and_then(Value::as_array_mut) {
        list.push(value);
    }
}

fn authz_policy(r: &Resource, out: &mut Output) {
    push_to(out, "policies", as_printed(r));
}

fn authz_authn(r: &Resource, out: &mut Output) {
    push_to(out, "authentication", as_printed(r));
    // A remote key set needs the Envoy cluster the filter fetches it through (the filter's
    // top-level `jwks` map), which the resource does not carry. istiod, when Envoy fetches
    // keys itself (`PILOT_JWT_ENABLE_REMOTE_JWKS`), points jwt_authn at the service's outbound
    // cluster, `outbound|<port>||<host>`: use that name and say so.
    let rules = r.value.pointer("/spec/jwtRules").and_then(Value::as_array).cloned().unwrap_or_default();
    for (i, rule) in rules.iter().enumerate() {
        let Some(uri) = rule.get("jwksUri").and_then(Value::as_str) else { continue };
        if rule.get("jwks").is_some() {
            continue;
        }
        let Some(cluster) = outbound_cluster(uri) else {
            // The filter refuses it with the path (reported by check_plugins).
            continue;
        };
        // push_to above created the authz configuration as an object.
        let jwks = out
            .plugins
            .get_mut("authz")
            .and_then(Value::as_object_mut)
            .map(|m| m.entry("jwks").or_insert_with(|| json!({})))
            .and_then(Value::as_object_mut);
        let Some(jwks) = jwks else { continue };
        if jwks.contains_key(uri) {
            continue;
        }
        jwks.insert(uri.to_string(), json!({ "cluster": cluster }));
        out.notes.push(format!(
            "{}: spec.jwtRules[{i}].jwksUri: fetched through the Envoy cluster `{cluster}` (istiod's name for that service): define it in your Envoy configuration (with TLS for https), or rename it in the plugin's \"jwks\" map",
            r.id()
        ));
    }
}

/// `https://host[:port]/path` → `outbound|<port>||<host>` (port 443 for https, 80 for http
/// when the URI names none), as istiod names the outbound cluster of a service.
fn outbound_cluster(uri: &str) -> Option<String> {
    let (scheme, rest) = uri.split_once("://")?;
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "https" => 443,
        "http" => 80,
        _ => return None,
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    // `[v6]:port`, `[v6]`, `host:port`, `host`.
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (h, after) = v6.split_once(']')?;
            match after.strip_prefix(':') {
                Some(p) => (h, p.parse::<u16>().ok()?),
                None if after.is_empty() => (h, default_port),
                None => return None,
            }
        }
        None => match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().ok()?),
            None => (authority, default_port),
        },
    };
    if host.is_empty() {
        return None;
    }
    Some(format!("outbound|{port}||{}", host.to_ascii_lowercase()))
}

// === Telemetry ===

/// A Telemetry resource → the telemetry filter's configuration: the resource as printed
/// (the filter reads `kubectl get -o json` output). Fields the filter refuses at the top of
/// `spec` (e.g. `accessLogging` or `tracing` in a filter version without them) are removed
/// and named in `unsupported` with the filter's own reason; `selector`/`targetRefs` are the
/// WasmPlugin's business (named in `notes`).
fn telemetry(r: &Resource, out: &mut Output) {
    let mut config = as_printed(r);
    for k in ["selector", "targetRef", "targetRefs"] {
        if config.pointer(&format!("/spec/{k}")).is_some() {
            out.notes.push(format!(
                "{}: spec.{k}: which workloads report; in Istio the WasmPlugin's selector/targetRefs, in plain Envoy the listeners that carry the filter",
                r.id()
            ));
        }
    }
    if let Some(spec) = filters::find("telemetry").ok().map(|s| s.check) {
        for _ in 0..8 {
            let Err(e) = spec(config.to_string().as_bytes()) else { break };
            let field = e.path.strip_prefix("spec.").filter(|f| !f.contains(['.', '['])).map(str::to_string);
            let removed = field
                .as_deref()
                .and_then(|f| config.get_mut("spec").and_then(Value::as_object_mut).and_then(|o| o.remove(f)));
            if removed.is_some() {
                out.unsupported(r, &e.path, &format!("left out: {}", e.message));
            } else {
                // Reported by check_plugins with the path.
                break;
            }
        }
    }
    set_plugin(out, "telemetry", config, &format!("Telemetry {}", r.name()));
}

// === WasmPlugin ===

/// `spec.pluginConfig` → the plugin JSON of the filter the WasmPlugin loads (found from its
/// `url` — `…/<filter>:tag`, `…/<filter>.wasm` — or its name `meshwasm-<filter>`).
fn wasmplugin(r: &Resource, out: &mut Output) {
    let url = r.value.pointer("/spec/url").and_then(Value::as_str).unwrap_or_default();
    let Some(filter) = wasmplugin_filter(url, r.name()) else {
        out.unsupported(r, "spec.url", &format!("{url:?} does not name a meshwasm filter module"));
        return;
    };
    let config = r.value.pointer("/spec/pluginConfig").cloned().unwrap_or_else(|| json!({}));
    set_plugin(out, &filter, config, &format!("WasmPlugin {}", r.name()));
    if let Some(spec) = r.value.get("spec").and_then(Value::as_object) {
        for k in spec.keys() {
            if k != "pluginConfig" && k != "url" {
                out.notes.push(format!("{}: spec.{k}: Istio's placement/loading of the plugin; in plain Envoy, the filter's position and vm_config", r.id()));
            }
        }
    }
}

pub fn wasmplugin_filter(url: &str, name: &str) -> Option<String> {
    let known = |s: &str| filters::FILTERS.iter().find(|f| f.name == s).map(|f| f.name.to_string());
    let last = url.rsplit('/').next().unwrap_or_default();
    let base = last.split([':', '@']).next().unwrap_or_default().trim_end_matches(".wasm");
    known(base).or_else(|| name.strip_prefix("meshwasm-").and_then(known))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vs(spec: Value) -> Resource {
        Resource {
            file: "vs.yaml".into(),
            value: json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                          "metadata": {"name": "ratings", "namespace": "bookinfo"}, "spec": spec}),
        }
    }

    #[test]
    fn virtual_service_faults_become_rules_and_route_overrides() {
        let out = convert(&[vs(json!({
            "hosts": ["ratings"],
            "http": [{
                "name": "jason",
                "match": [{"headers": {"end-user": {"exact": "jason"}}, "sourceLabels": {"app": "x"}}],
                "fault": {"abort": {"httpStatus": 500, "percentage": {"value": 100}}},
                "retries": {"attempts": 3},
                "route": [{"destination": {"host": "ratings"}}],
            }]
        }))]);
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        let rule = &out.plugins["fault"]["rules"][0];
        assert_eq!(rule["name"], "ratings-jason");
        assert_eq!(rule["match"][0]["headers"]["end-user"]["exact"], "jason");
        assert!(rule["match"][0]["authority"]["regex"].as_str().unwrap().starts_with("^ratings(\\.bookinfo"));
        assert_eq!(
            out.routes[0]["metadata"]["filter_metadata"]["meshwasm"]["fault"]["rules"][0]["fault"]["abort"]
                ["httpStatus"],
            500
        );
        let unsupported = out.unsupported.join("\n");
        assert!(unsupported.contains("spec.http[0].match[0].sourceLabels"), "{unsupported}");
        assert_eq!(out.unsupported.len(), 1, "named once, though two filters use the match: {unsupported}");
        let retry = &out.plugins["retry"]["rules"][0];
        assert_eq!(retry["name"], "ratings-jason");
        assert_eq!(retry["retries"], json!({"attempts": 3}));
        assert_eq!(retry["match"], rule["match"]);
        assert_eq!(
            out.routes[0]["metadata"]["filter_metadata"]["meshwasm"]["retry"],
            json!({"rules": [{"name": "ratings-jason", "retries": {"attempts": 3}}]})
        );
    }

    #[test]
    fn retries_and_timeouts_make_a_rule_per_route_in_order() {
        let out = convert(&[vs(json!({"hosts": ["*"], "http": [
            {"name": "a", "match": [{"uri": {"prefix": "/a"}}], "route": [{"destination": {"host": "a"}}]},
            {"name": "b", "match": [{"uri": {"prefix": "/b"}}], "timeout": "2s",
             "retries": {"attempts": 4, "perTryTimeout": "500ms", "retryOn": "5xx", "backoff": "100ms"},
             "route": [{"destination": {"host": "b"}}]},
        ]}))]);
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        // Route a keeps Istio's default policy (a rule without retries), first.
        assert_eq!(
            out.plugins["retry"]["rules"],
            json!([
                {"name": "ratings-a", "match": [{"uri": {"prefix": "/a"}}]},
                {"name": "ratings-b", "match": [{"uri": {"prefix": "/b"}}], "timeout": "2s",
                 "retries": {"attempts": 4, "perTryTimeout": "500ms", "retryOn": "5xx"}},
            ])
        );
        // backoff cannot be set per request: left out and named, with the filter's reason.
        assert!(
            out.unsupported
                .iter()
                .any(|u| u.contains("spec.http[1].retries.backoff: left out: cannot be set per request")),
            "{:?}",
            out.unsupported
        );
        assert_eq!(out.routes.len(), 1, "an override only for the route that sets retries/timeout");
        assert!(out.notes.iter().any(|n| n.contains("routeOverrides")));
        // A value the filter refuses outright is an error with its path.
        let out = convert(&[vs(json!({"hosts": ["*"], "http": [{"retries": {"attempts": 2, "retryOn": "bogus"}}]}))]);
        assert!(
            out.errors.iter().any(|e| e.contains("spec.http[0].retries.retryOn: unknown retry condition")),
            "{:?}",
            out.errors
        );
    }

    #[test]
    fn a_fault_after_an_unfaulted_route_is_only_a_route_override() {
        let out = convert(&[vs(json!({"hosts": ["*"], "http": [
            {"match": [{"uri": {"prefix": "/a"}}], "route": [{"destination": {"host": "a"}}]},
            {"fault": {"abort": {"httpStatus": 503, "percentage": {"value": 100}}}, "route": [{"destination": {"host": "b"}}]},
        ]}))]);
        assert!(!out.plugins.contains_key("fault"), "{:?}", out.plugins);
        assert_eq!(out.routes.len(), 1);
        assert!(out
            .unsupported
            .iter()
            .any(|u| u.contains("spec.http[1].fault: not a plugin-wide rule") && u.contains("spec.http[0]")));
    }

    #[test]
    fn a_fault_the_filter_refuses_is_an_error_with_its_path() {
        let out = convert(&[vs(json!({"hosts": ["*"], "http": [{"fault": {"abort": {"httpStatus": 700}}}]}))]);
        assert!(
            out.errors.iter().any(|e| e.contains("spec.http[0].fault") && e.contains("httpStatus")),
            "{:?}",
            out.errors
        );
    }

    #[test]
    fn a_remote_key_set_gets_istiods_outbound_cluster_and_a_note() {
        assert_eq!(
            outbound_cluster("https://auth.example.com/keys").as_deref(),
            Some("outbound|443||auth.example.com")
        );
        assert_eq!(outbound_cluster("http://Keys.Svc:8080/jwks.json").as_deref(), Some("outbound|8080||keys.svc"));
        assert_eq!(outbound_cluster("https://[fd00::1]:8443/k").as_deref(), Some("outbound|8443||fd00::1"));
        assert_eq!(outbound_cluster("ftp://x/y"), None);
        assert_eq!(outbound_cluster("https://:443/"), None);
        let ra = Resource {
            file: "a.yaml".into(),
            value: json!({"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
                          "metadata": {"name": "jwt"},
                          "spec": {"jwtRules": [{"issuer": "https://auth.example.com",
                                                 "jwksUri": "https://auth.example.com/.well-known/jwks.json"}]}}),
        };
        let out = convert(&[ra]);
        assert_eq!(
            out.plugins["authz"]["jwks"],
            json!({"https://auth.example.com/.well-known/jwks.json": {"cluster": "outbound|443||auth.example.com"}})
        );
        assert!(out
            .notes
            .iter()
            .any(|n| n.contains("jwtRules[0].jwksUri") && n.contains("outbound|443||auth.example.com")));
        assert!(out.errors.is_empty(), "{:?}", out.errors);
    }

    #[test]
    fn authz_resources_are_packaged_as_printed() {
        let ap = Resource {
            file: "a.yaml".into(),
            value: json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                          "metadata": {"name": "deny", "uid": "x"},
                          "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]}, "status": {}}),
        };
        let ra = Resource {
            file: "a.yaml".into(),
            value: json!({"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
                          "metadata": {"name": "jwt"}, "spec": {"jwtRules": []}}),
        };
        let out = convert(&[ap, ra]);
        assert_eq!(
            out.plugins["authz"],
            json!({"policies": [{"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                                 "metadata": {"name": "deny"},
                                 "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]}}],
                   "authentication": [{"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
                                       "metadata": {"name": "jwt"}, "spec": {"jwtRules": []}}]})
        );
        assert!(out.errors.is_empty(), "{:?}", out.errors);
    }

    #[test]
    fn telemetry_is_the_resource_and_what_the_filter_refuses_is_named() {
        let tel = |spec: Value| Resource {
            file: "t.yaml".into(),
            value: json!({"apiVersion": "telemetry.istio.io/v1", "kind": "Telemetry",
                          "metadata": {"name": "t", "namespace": "istio-system"}, "spec": spec}),
        };
        let metrics = json!([{"overrides": [{"match": {"metric": "REQUEST_COUNT"},
                                             "tagOverrides": {"request_protocol": {"operation": "REMOVE"}}}]}]);
        let out = convert(&[tel(json!({"selector": {"matchLabels": {"app": "x"}}, "metrics": metrics}))]);
        assert!(out.errors.is_empty() && out.unsupported.is_empty(), "{:?} {:?}", out.errors, out.unsupported);
        assert_eq!(out.plugins["telemetry"]["spec"]["metrics"], metrics);
        assert!(out.notes.iter().any(|n| n.contains("spec.selector")));
        // A field the filter refuses is either named and left out, or an error with its path.
        let out = convert(&[tel(json!({"metrics": [{"overrides": [{"match": {"metric": "NOPE"}}]}]}))]);
        assert!(out.errors.iter().any(|e| e.contains("spec.metrics[0].overrides[0].match.metric")), "{:?}", out.errors);
    }

    #[test]
    fn wasmplugin_config_goes_to_its_filter() {
        let wp = Resource {
            file: "w.yaml".into(),
            value: json!({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
                          "metadata": {"name": "x"}, "spec": {"url": "oci://r.example/meshwasm/fault:0.1.0",
                          "pluginConfig": {"headerControl": true}}}),
        };
        let out = convert(&[wp]);
        assert_eq!(out.plugins["fault"], json!({"headerControl": true}));
        assert!(out.errors.is_empty());
    }

    #[test]
    fn host_regexes() {
        assert_eq!(host_regex("a.example.com", "ns"), r"^a\.example\.com(:[0-9]+)?$");
        assert_eq!(host_regex("*.example.com", "ns"), r"^[^:]+\.example\.com(:[0-9]+)?$");
    }
}
