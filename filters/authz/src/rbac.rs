//! Envoy's RBAC matchers (`envoy.config.rbac.v3`), as istiod emits them, evaluated with the
//! semantics of Envoy 1.40's `envoy.filters.http.rbac`. `crate::istio` translates
//! AuthorizationPolicy rules into these trees; this module only evaluates them.
//!
//! The tree mirrors the proto one-to-one (`andRules`, `orIds`, `notRule`, `header`, …), so the
//! conformance test can compare our translation with istiod's golden output field by field
//! (`to_json`, test builds only).

use std::net::IpAddr;

use crate::re::Regex;

/// `envoy.type.matcher.v3.StringMatcher` (the forms istiod emits).
#[derive(Debug, Clone)]
pub enum StringMatch {
    Exact(String, bool),
    Prefix(String, bool),
    Suffix(String, bool),
    /// RE2 `safe_regex`, full match. The source is kept for comparisons and messages.
    Regex(Regex, String),
}

impl PartialEq for StringMatch {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Exact(a, x), Self::Exact(b, y))
            | (Self::Prefix(a, x), Self::Prefix(b, y))
            | (Self::Suffix(a, x), Self::Suffix(b, y)) => a == b && x == y,
            (Self::Regex(_, a), Self::Regex(_, b)) => a == b,
            _ => false,
        }
    }
}

impl StringMatch {
    /// A full-match regex; `None` if it does not compile (istiod's output always does).
    pub fn regex(src: &str) -> Option<Self> {
        Regex::new(src).map(|r| Self::Regex(r, src.to_string()))
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            Self::Exact(s, false) => v == s,
            Self::Exact(s, true) => v.eq_ignore_ascii_case(s),
            Self::Prefix(s, false) => v.starts_with(s.as_str()),
            Self::Prefix(s, true) => v.len() >= s.len() && v.get(..s.len()).is_some_and(|p| p.eq_ignore_ascii_case(s)),
            Self::Suffix(s, false) => v.ends_with(s.as_str()),
            Self::Suffix(s, true) => {
                v.len() >= s.len() && v.get(v.len() - s.len()..).is_some_and(|p| p.eq_ignore_ascii_case(s))
            }
            Self::Regex(r, _) => r.is_match(v),
        }
    }
}

/// `envoy.config.route.v3.HeaderMatcher` with `string_match` or `present_match`.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderMatch {
    /// Lower-cased (Envoy header names are case-insensitive).
    pub name: String,
    /// As written (for the golden comparison).
    pub written: String,
    /// `None`: `present_match: true`.
    pub string: Option<StringMatch>,
}

/// `envoy.config.core.v3.CidrRange`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let len = u32::from(self.len.min(32));
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let len = u32::from(self.len.min(128));
                let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

/// A JWT payload value matcher (`envoy.type.matcher.v3.ValueMatcher`, the forms istiod emits
/// for `request.auth.*` on `jwt_authn` metadata).
#[derive(Debug, Clone, PartialEq)]
pub enum ValueMatch {
    String(StringMatch),
    Or(Vec<ValueMatch>),
    /// `list_match.one_of`: some element of a list value matches.
    ListOneOf(Box<ValueMatch>),
}

impl ValueMatch {
    fn matches(&self, v: &serde_json::Value) -> bool {
        match self {
            Self::String(s) => v.as_str().is_some_and(|x| s.matches(x)),
            Self::Or(all) => all.iter().any(|m| m.matches(v)),
            Self::ListOneOf(m) => v.as_array().is_some_and(|a| a.iter().any(|e| m.matches(e))),
        }
    }
}

/// `envoy.type.matcher.v3.MetadataMatcher` on dynamic metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct MetadataMatch {
    pub filter: String,
    pub path: Vec<String>,
    pub value: ValueMatch,
}

/// An Envoy path template (`envoy.extensions.path.match.uri_template.v3`), compiled to a
/// regex with the segment classes of Envoy's matcher.
#[derive(Debug, Clone)]
pub struct UriTemplate {
    pub template: String,
    regex: Option<Regex>,
}

impl PartialEq for UriTemplate {
    fn eq(&self, other: &Self) -> bool {
        self.template == other.template
    }
}

/// Characters a `*` segment may hold (RFC 3986 pchar without `/`), as Envoy's template matcher.
const SEGMENT: &str = r"[a-zA-Z0-9\-._~%!$&'()+,;:@=]";

impl UriTemplate {
    /// The full-match regex of a template: `*` one segment, `**` any number of them.
    pub fn regex_source(template: &str) -> String {
        let mut re = String::new();
        for (i, seg) in template.split('/').enumerate() {
            if i > 0 {
                re.push('/');
            }
            match seg {
                "*" => {
                    re.push_str(SEGMENT);
                    re.push('+');
                }
                "**" => {
                    re.push_str("(?:");
                    re.push_str(SEGMENT);
                    re.push_str("|/)*");
                }
                lit => re.push_str(&crate::re::escape(lit)),
            }
        }
        re
    }

    pub fn new(template: &str) -> Self {
        Self { template: template.to_string(), regex: Regex::new(&Self::regex_source(template)) }
    }

    fn matches(&self, path: &str) -> bool {
        self.regex.as_ref().is_some_and(|r| r.is_match(path))
    }
}

/// `envoy.config.rbac.v3.Permission`.
#[derive(Debug, Clone, PartialEq)]
pub enum Permission {
    And(Vec<Permission>),
    Or(Vec<Permission>),
    Not(Box<Permission>),
    Any,
    Header(HeaderMatch),
    UrlPath(StringMatch),
    UriTemplate(UriTemplate),
    DestinationIp(Cidr),
    DestinationPort(u32),
    RequestedServerName(StringMatch),
    Metadata(MetadataMatch),
}

/// `envoy.config.rbac.v3.Principal`.
#[derive(Debug, Clone, PartialEq)]
pub enum Principal {
    And(Vec<Principal>),
    Or(Vec<Principal>),
    Not(Box<Principal>),
    Any,
    /// `authenticated.principal_name`.
    Authenticated(StringMatch),
    DirectRemoteIp(Cidr),
    RemoteIp(Cidr),
    Header(HeaderMatch),
    Metadata(MetadataMatch),
}

/// `envoy.config.rbac.v3.Policy`: some permission and some principal.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub permissions: Vec<Permission>,
    pub principals: Vec<Principal>,
}

/// The peer's identity as Envoy's `authenticated` matcher sees it: the certificate's URI SANs
/// if it has any, else its DNS SANs, else its subject. `None` on a connection without a
/// verified peer certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    pub uri_sans: Vec<String>,
    pub dns_sans: Vec<String>,
    pub subject: String,
}

/// What matching reads about a request. Implementations read lazily and cache.
pub trait Attributes {
    /// Request header `name` (lower case) as Envoy's matchers read it
    /// (`getAllOfHeaderAsString`): a repeated header's values joined with `,`; `None` when
    /// absent. Borrowed unless the header repeats.
    fn header(&mut self, name: &str) -> Option<std::borrow::Cow<'_, str>>;
    /// `:path` as Envoy has it after normalisation (with query and fragment).
    fn path(&mut self) -> Option<&str>;
    fn destination_ip(&mut self) -> Option<IpAddr>;
    fn destination_port(&mut self) -> Option<u32>;
    /// The downstream remote address Envoy derived (x-forwarded-for when trusted).
    fn remote_ip(&mut self) -> Option<IpAddr>;
    /// The directly connected peer.
    fn direct_remote_ip(&mut self) -> Option<IpAddr>;
    fn requested_server_name(&mut self) -> String;
    fn peer(&mut self) -> Option<PeerIdentity>;
    /// Dynamic metadata value at `filter` / `path` (the JWT payload for `jwt_authn`).
    fn metadata(&mut self, filter: &str, path: &[String]) -> Option<serde_json::Value>;
}

/// Envoy's header matcher: absent headers never match; a repeated header's values are
/// joined with `,` and matched as one string (`getAllOfHeaderAsString`).
fn header_matches(h: &HeaderMatch, a: &mut dyn Attributes) -> bool {
    let Some(value) = a.header(&h.name) else { return false };
    match &h.string {
        None => true,
        Some(s) => s.matches(&value),
    }
}

fn strip_query(path: &str) -> &str {
    let end = path.find(['?', '#']).unwrap_or(path.len());
    path.get(..end).unwrap_or(path)
}

impl Permission {
    pub fn matches(&self, a: &mut dyn Attributes) -> bool {
        match self {
            Self::And(all) => all.iter().all(|p| p.matches(a)),
            Self::Or(any) => any.iter().any(|p| p.matches(a)),
            Self::Not(p) => !p.matches(a),
            Self::Any => true,
            Self::Header(h) => header_matches(h, a),
            Self::UrlPath(s) => a.path().is_some_and(|p| s.matches(strip_query(p))),
            Self::UriTemplate(t) => a.path().is_some_and(|p| t.matches(strip_query(p))),
            Self::DestinationIp(c) => a.destination_ip().is_some_and(|ip| c.contains(ip)),
            Self::DestinationPort(port) => a.destination_port() == Some(*port),
            Self::RequestedServerName(s) => s.matches(&a.requested_server_name()),
            Self::Metadata(m) => a.metadata(&m.filter, &m.path).is_some_and(|v| m.value.matches(&v)),
        }
    }
}

impl Principal {
    pub fn matches(&self, a: &mut dyn Attributes) -> bool {
        match self {
            Self::And(all) => all.iter().all(|p| p.matches(a)),
            Self::Or(any) => any.iter().any(|p| p.matches(a)),
            Self::Not(p) => !p.matches(a),
            Self::Any => true,
            Self::Authenticated(s) => match a.peer() {
                None => false,
                Some(peer) => {
                    peer.uri_sans.iter().any(|u| s.matches(u))
                        || peer.dns_sans.iter().any(|d| s.matches(d))
                        || s.matches(&peer.subject)
                }
            },
            Self::DirectRemoteIp(c) => a.direct_remote_ip().is_some_and(|ip| c.contains(ip)),
            Self::RemoteIp(c) => a.remote_ip().is_some_and(|ip| c.contains(ip)),
            Self::Header(h) => header_matches(h, a),
            Self::Metadata(m) => a.metadata(&m.filter, &m.path).is_some_and(|v| m.value.matches(&v)),
        }
    }
}

impl Policy {
    pub fn matches(&self, a: &mut dyn Attributes) -> bool {
        self.permissions.iter().any(|p| p.matches(a)) && self.principals.iter().any(|p| p.matches(a))
    }

    /// Whether evaluating this policy may need the peer certificate (so the filter reads it
    /// only for configurations that use identities).
    pub fn needs_peer(&self) -> bool {
        fn p(x: &Principal) -> bool {
            match x {
                Principal::And(v) | Principal::Or(v) => v.iter().any(p),
                Principal::Not(b) => p(b),
                Principal::Authenticated(_) => true,
                _ => false,
            }
        }
        self.principals.iter().any(p)
    }

    /// Whether this policy reads the directly connected peer (`ipBlocks`, `source.ip`).
    pub fn uses_direct_ip(&self) -> bool {
        fn p(x: &Principal) -> bool {
            match x {
                Principal::And(v) | Principal::Or(v) => v.iter().any(p),
                Principal::Not(b) => p(b),
                Principal::DirectRemoteIp(_) => true,
                _ => false,
            }
        }
        self.principals.iter().any(p)
    }
}

// === JSON form, for the conformance test against istiod's output ===

#[cfg(test)]
pub mod json {
    use super::*;
    use serde_json::{json, Value};

    pub fn string(s: &StringMatch) -> Value {
        let (k, v, ic) = match s {
            StringMatch::Exact(v, ic) => ("exact", json!(v), *ic),
            StringMatch::Prefix(v, ic) => ("prefix", json!(v), *ic),
            StringMatch::Suffix(v, ic) => ("suffix", json!(v), *ic),
            StringMatch::Regex(_, src) => ("safeRegex", json!({ "regex": src }), false),
        };
        let mut m = serde_json::Map::new();
        m.insert(k.into(), v);
        if ic {
            m.insert("ignoreCase".into(), json!(true));
        }
        Value::Object(m)
    }

    fn header(h: &HeaderMatch) -> Value {
        match &h.string {
            None => json!({"name": h.written, "presentMatch": true}),
            Some(s) => json!({"name": h.written, "stringMatch": string(s)}),
        }
    }

    fn cidr(c: &Cidr) -> Value {
        json!({"addressPrefix": c.addr.to_string(), "prefixLen": c.len})
    }

    fn value(v: &ValueMatch) -> Value {
        match v {
            ValueMatch::String(s) => json!({"stringMatch": string(s)}),
            ValueMatch::Or(all) => json!({"orMatch": {"valueMatchers": all.iter().map(value).collect::<Vec<_>>()}}),
            ValueMatch::ListOneOf(m) => json!({"listMatch": {"oneOf": value(m)}}),
        }
    }

    fn metadata(m: &MetadataMatch) -> Value {
        json!({"filter": m.filter, "path": m.path.iter().map(|k| json!({"key": k})).collect::<Vec<_>>(), "value": value(&m.value)})
    }

    pub fn permission(p: &Permission) -> Value {
        match p {
            Permission::And(v) => json!({"andRules": {"rules": v.iter().map(permission).collect::<Vec<_>>()}}),
            Permission::Or(v) => json!({"orRules": {"rules": v.iter().map(permission).collect::<Vec<_>>()}}),
            Permission::Not(b) => json!({"notRule": permission(b)}),
            Permission::Any => json!({"any": true}),
            Permission::Header(h) => json!({"header": header(h)}),
            Permission::UrlPath(s) => json!({"urlPath": {"path": string(s)}}),
            Permission::UriTemplate(t) => json!({"uriTemplate": {"name": "uri-template", "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig",
                "pathTemplate": t.template}}}),
            Permission::DestinationIp(c) => json!({"destinationIp": cidr(c)}),
            Permission::DestinationPort(n) => json!({"destinationPort": n}),
            Permission::RequestedServerName(s) => json!({"requestedServerName": string(s)}),
            Permission::Metadata(m) => json!({"metadata": metadata(m)}),
        }
    }

    pub fn principal(p: &Principal) -> Value {
        match p {
            Principal::And(v) => json!({"andIds": {"ids": v.iter().map(principal).collect::<Vec<_>>()}}),
            Principal::Or(v) => json!({"orIds": {"ids": v.iter().map(principal).collect::<Vec<_>>()}}),
            Principal::Not(b) => json!({"notId": principal(b)}),
            Principal::Any => json!({"any": true}),
            Principal::Authenticated(s) => json!({"authenticated": {"principalName": string(s)}}),
            Principal::DirectRemoteIp(c) => json!({"directRemoteIp": cidr(c)}),
            Principal::RemoteIp(c) => json!({"remoteIp": cidr(c)}),
            Principal::Header(h) => json!({"header": header(h)}),
            Principal::Metadata(m) => json!({"metadata": metadata(m)}),
        }
    }

    pub fn policy(p: &Policy) -> Value {
        json!({"permissions": p.permissions.iter().map(permission).collect::<Vec<_>>(),
               "principals": p.principals.iter().map(principal).collect::<Vec<_>>()})
    }
}
