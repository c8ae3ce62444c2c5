//! Istio `HTTPMatchRequest`, shared by every filter, plus `routes` (Envoy route names).
//!
//! Semantics follow Istio's translation to Envoy route matching: `uri` is matched against
//! the path with the query string removed; regexes are RE2-style full matches; a rule's
//! `match` list is OR, the fields inside one entry are AND; an absent list matches all.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::config::{ConfigError, Path};

// === raw (JSON) ===

/// Istio `StringMatch`: exactly one of `exact`, `prefix`, `regex`. An empty object `{}`
/// means "present" when used for a header.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StringMatchJson {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

/// Istio `HTTPMatchRequest` plus `routes`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MatchJson {
    /// Informational, as in Istio.
    pub name: Option<String>,
    pub uri: Option<StringMatchJson>,
    pub scheme: Option<StringMatchJson>,
    pub method: Option<StringMatchJson>,
    pub authority: Option<StringMatchJson>,
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatchJson>,
    #[serde(default)]
    pub without_headers: BTreeMap<String, StringMatchJson>,
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatchJson>,
    #[serde(default)]
    pub ignore_uri_case: bool,
    pub port: Option<u32>,
    #[serde(default)]
    pub routes: Vec<String>,
}

// === compiled ===

#[derive(Debug, Clone)]
pub enum StringMatch {
    /// `{}`: the value must be present (any value).
    Present,
    Exact(String),
    Prefix(String),
    Regex(regex_lite::Regex),
}

impl StringMatch {
    pub fn compile(raw: &StringMatchJson, ignore_case: bool, path: &Path) -> Result<Self, ConfigError> {
        let set = [raw.exact.is_some(), raw.prefix.is_some(), raw.regex.is_some()];
        if set.iter().filter(|b| **b).count() > 1 {
            return Err(path.err("exactly one of exact, prefix, regex may be set"));
        }
        let lower = |s: &String| if ignore_case { s.to_ascii_lowercase() } else { s.clone() };
        Ok(if let Some(e) = &raw.exact {
            StringMatch::Exact(lower(e))
        } else if let Some(p) = &raw.prefix {
            StringMatch::Prefix(lower(p))
        } else if let Some(r) = &raw.regex {
            let anchored = if ignore_case { format!("(?i)^(?:{r})$") } else { format!("^(?:{r})$") };
            let re = regex_lite::Regex::new(&anchored)
                .map_err(|e| path.field("regex").err(format!("invalid regex: {e}")))?;
            StringMatch::Regex(re)
        } else {
            StringMatch::Present
        })
    }

    /// Does `value` match? `value` must already be lower-cased if this matcher was compiled
    /// with `ignore_case` (regexes handle case themselves).
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Present => true,
            StringMatch::Exact(e) => value == e,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Regex(r) => r.is_match(value),
        }
    }
}

/// A compiled `HTTPMatchRequest`.
#[derive(Debug, Clone, Default)]
pub struct RequestMatch {
    uri: Option<StringMatch>,
    ignore_uri_case: bool,
    scheme: Option<StringMatch>,
    method: Option<StringMatch>,
    authority: Option<StringMatch>,
    headers: Vec<(String, StringMatch)>,
    without_headers: Vec<(String, StringMatch)>,
    query_params: Vec<(String, StringMatch)>,
    port: Option<u32>,
    routes: Vec<String>,
}

impl RequestMatch {
    pub fn compile(raw: &MatchJson, path: &Path) -> Result<Self, ConfigError> {
        let opt = |m: &Option<StringMatchJson>, field: &str, ic: bool| {
            m.as_ref().map(|m| StringMatch::compile(m, ic, &path.field(field))).transpose()
        };
        let map = |m: &BTreeMap<String, StringMatchJson>, field: &str, lower_keys: bool| {
            m.iter()
                .map(|(k, v)| {
                    let p = path.field(field).key(k);
                    if k.is_empty() {
                        return Err(p.err("name must not be empty"));
                    }
                    let k = if lower_keys { k.to_ascii_lowercase() } else { k.clone() };
                    Ok((k, StringMatch::compile(v, false, &p)?))
                })
                .collect::<Result<Vec<_>, ConfigError>>()
        };
        if let Some(port) = raw.port {
            if port == 0 || port > 65535 {
                return Err(path.field("port").err(format!("must be in 1..=65535, got {port}")));
            }
        }
        Ok(Self {
            uri: opt(&raw.uri, "uri", raw.ignore_uri_case)?,
            ignore_uri_case: raw.ignore_uri_case,
            scheme: opt(&raw.scheme, "scheme", false)?,
            method: opt(&raw.method, "method", false)?,
            authority: opt(&raw.authority, "authority", false)?,
            headers: map(&raw.headers, "headers", true)?,
            without_headers: map(&raw.without_headers, "withoutHeaders", true)?,
            query_params: map(&raw.query_params, "queryParams", false)?,
            port: raw.port,
            routes: raw.routes.clone(),
        })
    }

    /// Whether any entry needs the route name (so callers can skip the property read).
    pub fn needs_route(&self) -> bool {
        !self.routes.is_empty()
    }

    /// Fields are ANDed; they are checked cheapest-to-fail first. Every value read from the
    /// proxy costs a hostcall plus, when the value exists, a call back into the VM to allocate
    /// it, so named headers (usually absent on requests a rule does not target) go before the
    /// pseudo-headers every request has.
    pub fn matches(&self, req: &mut dyn RequestView) -> bool {
        for (name, m) in &self.headers {
            match req.header(name) {
                Some(v) if m.matches(&v) => {}
                _ => return false,
            }
        }
        for (name, m) in &self.without_headers {
            if let Some(v) = req.header(name) {
                if m.matches(&v) {
                    return false;
                }
            }
        }
        if !self.routes.is_empty() {
            let route = req.route_name().unwrap_or_default();
            if !self.routes.contains(&route) {
                return false;
            }
        }
        if let Some(m) = &self.uri {
            let Some(path) = req.header(":path") else { return false };
            let path = path.split(['?', '#']).next().unwrap_or_default();
            let ok = if self.ignore_uri_case { m.matches(&path.to_ascii_lowercase()) } else { m.matches(path) };
            if !ok {
                return false;
            }
        }
        for (name, m) in [(":scheme", &self.scheme), (":method", &self.method), (":authority", &self.authority)] {
            if let Some(m) = m {
                match req.header(name) {
                    Some(v) if m.matches(&v) => {}
                    _ => return false,
                }
            }
        }
        if !self.query_params.is_empty() {
            let Some(path) = req.header(":path") else { return false };
            let query = path.split_once('?').map(|(_, q)| q).unwrap_or("");
            let query = query.split('#').next().unwrap_or("");
            for (name, m) in &self.query_params {
                let found = query.split('&').filter_map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k == name).then_some(v)
                });
                if !found.into_iter().any(|v| m.matches(v)) {
                    return false;
                }
            }
        }
        if let Some(port) = self.port {
            if req.port() != Some(port) {
                return false;
            }
        }
        true
    }
}

/// A rule's `match`: OR over entries; empty matches all.
#[derive(Debug, Clone, Default)]
pub struct MatchList(Vec<RequestMatch>);

impl MatchList {
    pub fn compile(raw: Option<&[MatchJson]>, path: &Path) -> Result<Self, ConfigError> {
        let raw = raw.unwrap_or_default();
        raw.iter()
            .enumerate()
            .map(|(i, m)| RequestMatch::compile(m, &path.index(i)))
            .collect::<Result<Vec<_>, _>>()
            .map(MatchList)
    }

    pub fn matches(&self, req: &mut dyn RequestView) -> bool {
        self.0.is_empty() || self.0.iter().any(|m| m.matches(req))
    }
}

/// What matching reads from a request. Implementations cache host reads.
pub trait RequestView {
    /// A request header (lower-case name; pseudo-headers like `:path` included).
    fn header(&mut self, name: &str) -> Option<String>;
    /// The listener (destination) port.
    fn port(&mut self) -> Option<u32>;
    /// The Envoy route name (`xds.route_name`).
    fn route_name(&mut self) -> Option<String>;
    /// The downstream peer's address (`source.address`, `ip:port`).
    fn remote_address(&mut self) -> Option<String> {
        None
    }
}

/// A request held in memory: for tests and for callers that already have the headers.
#[derive(Debug, Clone, Default)]
pub struct StaticRequest {
    pub headers: Vec<(String, String)>,
    pub port: Option<u32>,
    pub route: Option<String>,
    pub remote: Option<String>,
}

impl StaticRequest {
    pub fn get(path: &str) -> Self {
        Self {
            headers: vec![
                (":method".into(), "GET".into()),
                (":path".into(), path.into()),
                (":scheme".into(), "http".into()),
                (":authority".into(), "example.com".into()),
            ],
            ..Self::default()
        }
    }
    #[must_use]
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.to_ascii_lowercase(), v.into()));
        self
    }
}

impl RequestView for StaticRequest {
    fn header(&mut self, name: &str) -> Option<String> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }
    fn port(&mut self) -> Option<u32> {
        self.port
    }
    fn route_name(&mut self) -> Option<String> {
        self.route.clone()
    }
    fn remote_address(&mut self) -> Option<String> {
        self.remote.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::from_json;

    fn list(json: &str) -> MatchList {
        let raw: Vec<MatchJson> = from_json(json.as_bytes()).unwrap();
        MatchList::compile(Some(&raw), &Path::root().field("match")).unwrap()
    }

    #[test]
    fn table() {
        let cases: &[(&str, StaticRequest, bool)] = &[
            (r#"[]"#, StaticRequest::get("/"), true),
            (r#"[{"uri":{"prefix":"/ratings"}}]"#, StaticRequest::get("/ratings/1"), true),
            (r#"[{"uri":{"prefix":"/ratings"}}]"#, StaticRequest::get("/reviews"), false),
            (r#"[{"uri":{"exact":"/a"}}]"#, StaticRequest::get("/a?x=1"), true),
            (r#"[{"uri":{"exact":"/a"}}]"#, StaticRequest::get("/a/b"), false),
            (r#"[{"uri":{"regex":"/a/[0-9]+"}}]"#, StaticRequest::get("/a/12"), true),
            (r#"[{"uri":{"regex":"/a/[0-9]+"}}]"#, StaticRequest::get("/a/12x"), false),
            (r#"[{"uri":{"exact":"/A"},"ignoreUriCase":true}]"#, StaticRequest::get("/a"), true),
            (r#"[{"uri":{"regex":"/ab"},"ignoreUriCase":true}]"#, StaticRequest::get("/AB"), true),
            (r#"[{"uri":{"exact":"/A"}}]"#, StaticRequest::get("/a"), false),
            (r#"[{"method":{"exact":"POST"}}]"#, StaticRequest::get("/"), false),
            (r#"[{"method":{"exact":"GET"}}]"#, StaticRequest::get("/"), true),
            (r#"[{"authority":{"prefix":"example"}}]"#, StaticRequest::get("/"), true),
            (r#"[{"scheme":{"exact":"https"}}]"#, StaticRequest::get("/"), false),
            (
                r#"[{"headers":{"End-User":{"exact":"jason"}}}]"#,
                StaticRequest::get("/").header("end-user", "jason"),
                true,
            ),
            (r#"[{"headers":{"end-user":{"exact":"jason"}}}]"#, StaticRequest::get("/"), false),
            (r#"[{"headers":{"x":{}}}]"#, StaticRequest::get("/").header("x", ""), true),
            (r#"[{"withoutHeaders":{"x":{}}}]"#, StaticRequest::get("/").header("x", "1"), false),
            (r#"[{"withoutHeaders":{"x":{"exact":"1"}}}]"#, StaticRequest::get("/").header("x", "2"), true),
            (r#"[{"withoutHeaders":{"x":{}}}]"#, StaticRequest::get("/"), true),
            (r#"[{"queryParams":{"v":{"exact":"2"}}}]"#, StaticRequest::get("/p?a=1&v=2"), true),
            (r#"[{"queryParams":{"v":{"exact":"2"}}}]"#, StaticRequest::get("/p?v=3"), false),
            (r#"[{"queryParams":{"v":{"regex":"[0-9]"}}}]"#, StaticRequest::get("/p?v=7"), true),
            (r#"[{"queryParams":{"v":{}}}]"#, StaticRequest::get("/p?v"), true),
            (r#"[{"uri":{"prefix":"/x"}},{"method":{"exact":"GET"}}]"#, StaticRequest::get("/y"), true),
            (r#"[{"uri":{"prefix":"/x"},"method":{"exact":"GET"}}]"#, StaticRequest::get("/y"), false),
        ];
        for (i, (json, req, want)) in cases.iter().enumerate() {
            let mut req = req.clone();
            assert_eq!(list(json).matches(&mut req), *want, "case {i}: {json}");
        }
    }

    #[test]
    fn port_and_routes() {
        let mut req = StaticRequest { port: Some(8080), route: Some("r1".into()), ..StaticRequest::get("/") };
        assert!(list(r#"[{"port":8080,"routes":["r0","r1"]}]"#).matches(&mut req));
        assert!(!list(r#"[{"port":8081}]"#).matches(&mut req));
        assert!(!list(r#"[{"routes":["r2"]}]"#).matches(&mut req));
    }

    #[test]
    fn errors_name_paths() {
        let raw: Vec<MatchJson> = from_json(br#"[{"headers":{"x":{"regex":"("}}}]"#).unwrap();
        let e = MatchList::compile(Some(&raw), &Path::root().field("rules").index(0).field("match")).unwrap_err();
        assert_eq!(e.path, "rules[0].match[0].headers.x.regex");
        let raw: Vec<MatchJson> = from_json(br#"[{"uri":{"exact":"a","prefix":"b"}}]"#).unwrap();
        let e = MatchList::compile(Some(&raw), &Path::root().field("match")).unwrap_err();
        assert_eq!(e.to_string(), "match[0].uri: exactly one of exact, prefix, regex may be set");
        let e = from_json::<Vec<MatchJson>>(br#"[{"url":{}}]"#).unwrap_err();
        assert_eq!(e.path, "[0].url");
    }
}
