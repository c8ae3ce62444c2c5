//! RequestAuthentication: the `jwt_authn` configuration istiod generates from the resources
//! (`origins-<i>` providers sorted by issuer, `requires_any` of each provider or missing,
//! `bypass_cors_preflight`, payload in metadata `payload` with space-delimited claims), and
//! Envoy's `jwt_authn` run on it as a pure function: token extraction, the verifier tree
//! with its status aggregation, the header effects (output headers sanitized then added,
//! the token removed) in Envoy's order, the payload the policies see, and the local reply.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use meshwasm_sdk_ext::config::{ConfigError, Path};
use meshwasm_sdk_ext::duration::parse_duration;
use meshwasm_sdk_ext::Headers;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::ResourceJson;
use crate::jwks::Jwks;
use crate::jwt::{sanitize_audience, Jwt, Status, CLOCK_SKEW_SECONDS};

// === JSON ===

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestAuthSpecJson {
    /// Accepted and ignored: this plugin's placement is the selection.
    #[allow(dead_code)]
    pub selector: Option<Value>,
    #[allow(dead_code)]
    pub target_ref: Option<Value>,
    #[allow(dead_code)]
    pub target_refs: Option<Value>,
    #[serde(default)]
    pub jwt_rules: Vec<JwtRuleJson>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwtRuleJson {
    #[serde(default)]
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    pub jwks_uri: Option<String>,
    pub jwks: Option<String>,
    #[serde(default)]
    pub from_headers: Vec<JwtHeaderJson>,
    #[serde(default)]
    pub from_params: Vec<String>,
    #[serde(default)]
    pub from_cookies: Vec<String>,
    pub output_payload_to_header: Option<String>,
    #[serde(default)]
    pub output_claim_to_headers: Vec<ClaimToHeaderJson>,
    #[serde(default)]
    pub forward_original_token: bool,
    pub timeout: Option<String>,
    pub space_delimited_claims: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtHeaderJson {
    pub name: String,
    #[serde(default)]
    pub prefix: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimToHeaderJson {
    pub header: String,
    pub claim: String,
}

/// Where a `jwksUri` is fetched through (meshwasm addition: istiod derives the cluster).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JwksSourceJson {
    pub cluster: Option<String>,
    pub cache_duration: Option<String>,
}

// === reading (the module's path) ===
//
// As for the policies (`crate::config`): read field by field through
// `meshwasm_sdk_ext::obj` instead of serde's derived visitors, which cost 34.3 KiB of
// module size (631,840 → 596,716 bytes: the module no longer links serde's derived
// visitors at all); `golden::hand_reader_matches_serde` proves both readers agree, errors
// included.

use meshwasm_sdk_ext::obj::{invalid_type, string, Obj};

/// A `#[serde(default)] String` field: absent is empty, `null` is an error.
fn default_string(o: &Obj<'_>, k: &str) -> Result<String, ConfigError> {
    o.raw(k).map_or(Ok(String::new()), |v| string(v, &o.path(k)).map(str::to_string))
}

impl crate::config::ReadSpec for RequestAuthSpecJson {
    fn read(v: &Value, path: &Path) -> Result<Self, ConfigError> {
        let o = Obj::new(v, path, "struct RequestAuthSpecJson", &["selector", "targetRef", "targetRefs", "jwtRules"])?;
        Ok(Self {
            selector: o.get("selector").cloned(),
            target_ref: o.get("targetRef").cloned(),
            target_refs: o.get("targetRefs").cloned(),
            jwt_rules: o
                .list("jwtRules")?
                .into_iter()
                .map(|(p, v)| JwtRuleJson::read(v, &p))
                .collect::<Result<_, _>>()?,
        })
    }
}

impl JwtRuleJson {
    pub fn read(v: &Value, path: &Path) -> Result<Self, ConfigError> {
        let o = Obj::new(
            v,
            path,
            "struct JwtRuleJson",
            &[
                "issuer",
                "audiences",
                "jwksUri",
                "jwks",
                "fromHeaders",
                "fromParams",
                "fromCookies",
                "outputPayloadToHeader",
                "outputClaimToHeaders",
                "forwardOriginalToken",
                "timeout",
                "spaceDelimitedClaims",
            ],
        )?;
        Ok(Self {
            issuer: default_string(&o, "issuer")?,
            audiences: o.strings("audiences")?,
            jwks_uri: o.opt_string("jwksUri")?,
            jwks: o.opt_string("jwks")?,
            from_headers: o
                .list("fromHeaders")?
                .into_iter()
                .map(|(p, v)| {
                    let o = Obj::new(v, &p, "struct JwtHeaderJson", &["name", "prefix"])?;
                    Ok(JwtHeaderJson { name: o.str("name")?.to_string(), prefix: default_string(&o, "prefix")? })
                })
                .collect::<Result<_, ConfigError>>()?,
            from_params: o.strings("fromParams")?,
            from_cookies: o.strings("fromCookies")?,
            output_payload_to_header: o.opt_string("outputPayloadToHeader")?,
            output_claim_to_headers: o
                .list("outputClaimToHeaders")?
                .into_iter()
                .map(|(p, v)| {
                    let o = Obj::new(v, &p, "struct ClaimToHeaderJson", &["header", "claim"])?;
                    Ok(ClaimToHeaderJson { header: o.str("header")?.to_string(), claim: o.str("claim")?.to_string() })
                })
                .collect::<Result<_, ConfigError>>()?,
            forward_original_token: match o.raw("forwardOriginalToken") {
                None => false,
                Some(v) => v.as_bool().ok_or_else(|| invalid_type(v, "a boolean", &o.path("forwardOriginalToken")))?,
            },
            timeout: o.opt_string("timeout")?,
            space_delimited_claims: match o.get("spaceDelimitedClaims") {
                None => None,
                Some(_) => Some(o.strings("spaceDelimitedClaims")?),
            },
        })
    }
}

impl JwksSourceJson {
    pub fn read(v: &Value, path: &Path) -> Result<Self, ConfigError> {
        let o = Obj::new(v, path, "struct JwksSourceJson", &["cluster", "cacheDuration"])?;
        Ok(Self { cluster: o.opt_string("cluster")?, cache_duration: o.opt_string("cacheDuration")? })
    }
}

// === validated ===

/// Where a provider's keys come from.
#[derive(Debug, Clone)]
pub enum Keys {
    Inline(Rc<Jwks>),
    /// Fetched from `Authn::remotes[i]`.
    Remote(usize),
}

/// A remote key set (`jwksUri`), fetched once per process from the root context and shared
/// by every provider naming the same URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    pub uri: String,
    pub cluster: String,
    /// `:scheme`, `:authority` and `:path` of the fetch.
    pub scheme: String,
    pub authority: String,
    pub path: String,
    pub cache_duration: Duration,
    /// The fetch's timeout: the longest `timeout` of the rules using this URI (jwt_authn uses
    /// the rule's `timeout` as the `http_uri` timeout).
    pub timeout: Duration,
}

/// One `jwt_authn` provider (`origins-<i>`): a jwtRule.
#[derive(Debug, Clone)]
pub struct Provider {
    pub name: String,
    pub issuer: String,
    /// Sanitized (`sanitizeAudience`).
    pub audiences: Vec<String>,
    pub keys: Keys,
    /// `(lower-cased name, prefix)`, in the order Envoy's extractor visits them (its map
    /// keyed by name + prefix); sorted once here rather than per request.
    pub headers: Vec<(String, String)>,
    /// Sorted and deduplicated, as the extractor visits them.
    pub params: Vec<String>,
    /// Sorted and deduplicated, as the extractor visits them.
    pub cookies: Vec<String>,
    pub payload_header: Option<String>,
    /// `(lower-cased header, claim path)`.
    pub claim_headers: Vec<(String, String)>,
    pub forward: bool,
    pub space_delimited: Vec<String>,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct Authn {
    /// Sorted by issuer (stable), as istiod sorts the rules.
    pub providers: Vec<Provider>,
    /// The remote key sets, in the order of the top-level `jwks` map (sorted by URI).
    pub remotes: Vec<Remote>,
}

/// istiod's default `timeout` of a rule.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// istiod's `cache_duration` of a remote JWKS.
pub const DEFAULT_CACHE_DURATION: Duration = Duration::from_secs(300);

const API_VERSIONS: [&str; 3] = ["security.istio.io/v1", "security.istio.io/v1beta1", "security.istio.io/v1alpha1"];

fn header_name(name: &str, path: &Path) -> Result<String, ConfigError> {
    if name.is_empty() {
        return Err(path.err("must not be empty"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)) {
        return Err(path.err(format!("{name:?} is not a valid HTTP header name")));
    }
    Ok(name.to_ascii_lowercase())
}

/// `scheme://authority/path` → (scheme, authority, path).
fn split_uri(uri: &str, path: &Path) -> Result<(String, String, String), ConfigError> {
    let (scheme, rest) = match (uri.strip_prefix("https://"), uri.strip_prefix("http://")) {
        (Some(rest), _) => ("https", rest),
        (None, Some(rest)) => ("http", rest),
        (None, None) => return Err(path.err(format!("must be an http:// or https:// URI, got {uri:?}"))),
    };
    let (authority, p) = match rest.find('/') {
        Some(i) => (rest.get(..i).unwrap_or(""), rest.get(i..).unwrap_or("/")),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(path.err(format!("has no host: {uri:?}")));
    }
    // Envoy sends the path without the fragment.
    let p = p.split('#').next().unwrap_or(p);
    Ok((scheme.to_string(), authority.to_string(), p.to_string()))
}

impl Authn {
    pub fn parse(
        resources: &[ResourceJson<RequestAuthSpecJson>],
        sources: &BTreeMap<String, JwksSourceJson>,
        root: &Path,
    ) -> Result<Self, ConfigError> {
        let mut rules = Vec::new();
        for (i, r) in resources.iter().enumerate() {
            let path = root.field("authentication").index(i);
            if !API_VERSIONS.contains(&r.api_version.as_str()) {
                return Err(path
                    .field("apiVersion")
                    .err(format!("must be security.istio.io/v1 (or v1beta1), got {:?}", r.api_version)));
            }
            if r.kind != "RequestAuthentication" {
                return Err(path.field("kind").err(format!("must be RequestAuthentication, got {:?}", r.kind)));
            }
            for (j, rule) in r.spec.jwt_rules.iter().enumerate() {
                rules.push((rule, path.field("spec").field("jwtRules").index(j)));
            }
        }
        // istiod sorts the rules by issuer (a stable sort) and names them origins-<index>.
        crate::sort::sort_by(&mut rules, |a, b| a.0.issuer.cmp(&b.0.issuer));
        let mut remotes: Vec<Remote> = Vec::new();
        let mut providers = Vec::new();
        for (i, (rule, path)) in rules.iter().enumerate() {
            let p = Self::rule(rule, path, sources, &mut remotes)?;
            providers.push(Provider { name: format!("origins-{i}"), ..p });
        }
        for uri in sources.keys() {
            if !remotes.iter().any(|r| r.uri == *uri) {
                return Err(root.field("jwks").key(uri).err("no jwtRule has this jwksUri"));
            }
        }
        Ok(Self { providers, remotes })
    }

    fn rule(
        rule: &JwtRuleJson,
        path: &Path,
        sources: &BTreeMap<String, JwksSourceJson>,
        remotes: &mut Vec<Remote>,
    ) -> Result<Provider, ConfigError> {
        if rule.issuer.is_empty() {
            return Err(path.field("issuer").err("is required"));
        }
        for (k, a) in rule.audiences.iter().enumerate() {
            if a.is_empty() {
                return Err(path.field("audiences").index(k).err("must not be empty"));
            }
        }
        let timeout = match &rule.timeout {
            None => DEFAULT_TIMEOUT,
            Some(t) => {
                let d = parse_duration(t).map_err(|e| path.field("timeout").err(e))?;
                if d.is_zero() {
                    return Err(path.field("timeout").err("must be greater than 0"));
                }
                d
            }
        };
        let keys = match (&rule.jwks, &rule.jwks_uri) {
            (Some(_), Some(_)) => return Err(path.field("jwks").err("set either jwks or jwksUri, not both")),
            (None, None) => return Err(path.err("needs jwks (inline keys) or jwksUri")),
            (Some(inline), None) => {
                let (jwks, _skipped) = Jwks::parse(inline.as_bytes()).map_err(|e| path.field("jwks").err(e.0))?;
                Keys::Inline(Rc::new(jwks))
            }
            (None, Some(uri)) => {
                let upath = path.field("jwksUri");
                let (scheme, authority, p) = split_uri(uri, &upath)?;
                let src = sources.get(uri).ok_or_else(|| {
                    upath.err(format!(
                        "needs an entry in the top-level \"jwks\" map naming the Envoy cluster to fetch it through: \"jwks\": {{{uri:?}: {{\"cluster\": \"...\"}}}}"
                    ))
                })?;
                let spath = Path::root().field("jwks").key(uri);
                let cluster = src
                    .cluster
                    .clone()
                    .filter(|c| !c.is_empty())
                    .ok_or_else(|| spath.field("cluster").err("is required"))?;
                let cache_duration = match &src.cache_duration {
                    None => DEFAULT_CACHE_DURATION,
                    Some(d) => {
                        let d = parse_duration(d).map_err(|e| spath.field("cacheDuration").err(e))?;
                        if d < Duration::from_secs(1) {
                            return Err(spath.field("cacheDuration").err("must be at least 1s"));
                        }
                        d
                    }
                };
                match remotes.iter().position(|r| r.uri == *uri) {
                    Some(i) => {
                        if let Some(r) = remotes.get_mut(i) {
                            r.timeout = r.timeout.max(timeout);
                        }
                        Keys::Remote(i)
                    }
                    None => {
                        remotes.push(Remote {
                            uri: uri.clone(),
                            cluster,
                            scheme,
                            authority,
                            path: p,
                            cache_duration,
                            timeout,
                        });
                        Keys::Remote(remotes.len() - 1)
                    }
                }
            }
        };
        let mut headers = Vec::new();
        for (k, h) in rule.from_headers.iter().enumerate() {
            let name = header_name(&h.name, &path.field("fromHeaders").index(k).field("name"))?;
            if !headers.contains(&(name.clone(), h.prefix.clone())) {
                headers.push((name, h.prefix.clone()));
            }
        }
        for (k, p) in rule.from_params.iter().enumerate() {
            if p.is_empty() {
                return Err(path.field("fromParams").index(k).err("must not be empty"));
            }
        }
        for (k, c) in rule.from_cookies.iter().enumerate() {
            if c.is_empty() {
                return Err(path.field("fromCookies").index(k).err("must not be empty"));
            }
        }
        let mut params = rule.from_params.clone();
        if headers.is_empty() && params.is_empty() && rule.from_cookies.is_empty() {
            headers.push(("authorization".into(), "Bearer ".into()));
            params.push("access_token".into());
        }
        let payload_header = match &rule.output_payload_to_header {
            None => None,
            Some(h) if h.is_empty() => None,
            Some(h) => Some(header_name(h, &path.field("outputPayloadToHeader"))?),
        };
        let mut claim_headers = Vec::new();
        for (k, c) in rule.output_claim_to_headers.iter().enumerate() {
            let cp = path.field("outputClaimToHeaders").index(k);
            let h = header_name(&c.header, &cp.field("header"))?;
            if c.claim.is_empty() {
                return Err(cp.field("claim").err("must not be empty"));
            }
            claim_headers.push((h, c.claim.clone()));
        }
        // istiod: the user's claims plus `permission` and `scope`, deduplicated and sorted.
        let mut space_delimited: Vec<String> = rule.space_delimited_claims.clone().unwrap_or_default();
        space_delimited.extend(["permission".to_string(), "scope".to_string()]);
        crate::sort::sort(&mut space_delimited);
        space_delimited.dedup();
        // The extractor's visiting orders (see `extract`).
        crate::sort::sort_by(&mut headers, |a, b| format!("{}{}", a.0, a.1).cmp(&format!("{}{}", b.0, b.1)));
        crate::sort::sort(&mut params);
        params.dedup();
        let mut cookies = rule.from_cookies.clone();
        crate::sort::sort(&mut cookies);
        cookies.dedup();
        Ok(Provider {
            name: String::new(),
            issuer: rule.issuer.clone(),
            audiences: rule.audiences.iter().map(|a| sanitize_audience(a).to_string()).collect(),
            keys,
            headers,
            params,
            cookies,
            payload_header,
            claim_headers,
            forward: rule.forward_original_token,
            space_delimited,
            timeout,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.providers.is_empty()
    }

    /// Every header name some provider writes (removed from client requests first).
    pub fn output_headers(&self) -> impl Iterator<Item = &str> {
        self.providers.iter().flat_map(|p| {
            p.payload_header.iter().map(String::as_str).chain(p.claim_headers.iter().map(|(h, _)| h.as_str()))
        })
    }

    /// The longest `timeout` of the remote providers (how long a request may wait for keys).
    pub fn max_timeout(&self) -> Duration {
        self.providers
            .iter()
            .filter(|p| matches!(p.keys, Keys::Remote(_)))
            .map(|p| p.timeout)
            .max()
            .unwrap_or(Duration::ZERO)
    }
}

// === the request model ===

/// A header effect, applied to the real request in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Remove(String),
    Add(String, String),
    SetPath(String),
}

/// Header edits over a map as read: names removed (ASCII case-insensitive, as removal is),
/// headers added after them in order (a later removal of their name drops them), and every
/// `:path` value replaced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Edits {
    removed: Vec<String>,
    added: Vec<(String, String)>,
    path: Option<String>,
}

impl Edits {
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty() && self.added.is_empty() && self.path.is_none()
    }

    /// `base`'s pairs as edited, in order: the map's, then the added ones.
    pub fn iter<'a>(&'a self, base: &'a Headers) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        let kept = base.iter().filter(|(k, _)| !self.removed.iter().any(|r| k.eq_ignore_ascii_case(r)));
        kept.chain(self.added.iter().map(|(k, v)| (k.as_str(), v.as_str()))).map(|(k, v)| match &self.path {
            Some(p) if k == ":path" => (k, p.as_str()),
            _ => (k, v),
        })
    }

    /// `base` as edited.
    pub fn apply(&self, base: &Headers) -> Headers {
        self.iter(base).collect()
    }
}

/// The request headers as `jwt_authn` sees and changes them: a view over the header map as
/// read (no copy of it: the cached-token path's allocations were mostly that copy) and the
/// edits so far, applied on reading.
#[derive(Debug, Clone)]
pub struct Request<'h> {
    base: &'h Headers,
    edits: Edits,
    pub ops: Vec<Op>,
}

impl<'h> Request<'h> {
    pub fn new(base: &'h Headers) -> Self {
        Self { base, edits: Edits::default(), ops: Vec::new() }
    }

    /// Every (name, value) as edited, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.edits.iter(self.base)
    }

    /// The edits made (`Edits::apply` them to the map as read for the request as edited).
    pub fn into_edits(self) -> Edits {
        self.edits
    }

    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.iter().filter(move |(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v)
    }

    fn first(&self, name: &str) -> Option<&str> {
        self.iter().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    fn remove(&mut self, name: &str) {
        let e = &mut self.edits;
        if !e.removed.iter().any(|r| r.eq_ignore_ascii_case(name)) {
            e.removed.push(name.to_string());
        }
        e.added.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        self.ops.push(Op::Remove(name.to_string()));
    }

    fn add(&mut self, name: &str, value: String) {
        self.edits.added.push((name.to_string(), value.clone()));
        self.ops.push(Op::Add(name.to_string(), value));
    }

    fn set_path(&mut self, path: String) {
        self.edits.path = Some(path.clone());
        self.ops.push(Op::SetPath(path));
    }

    /// Envoy's `isCorsPreflightRequest`.
    pub fn is_cors_preflight(&self) -> bool {
        self.first(":method") == Some("OPTIONS")
            && self.first("origin").is_some_and(|v| !v.is_empty())
            && self.first("access-control-request-method").is_some_and(|v| !v.is_empty())
    }

    /// `Http::Utility::buildOriginalUri(headers, 256)`: for the `realm` of `www-authenticate`.
    pub fn original_uri(&self) -> String {
        let Some(path) = self.first("x-envoy-original-path").or_else(|| self.first(":path")) else {
            return String::new();
        };
        let mut end = path.len().min(256);
        while !path.is_char_boundary(end) {
            end -= 1;
        }
        format!(
            "{}://{}{}",
            self.first("x-forwarded-proto").unwrap_or(""),
            self.first(":authority").unwrap_or(""),
            path.get(..end).unwrap_or("")
        )
    }
}

// === extraction ===

#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    Header(String),
    Param(String),
    Cookie,
}

#[derive(Debug, Clone)]
struct Token {
    token: String,
    location: Location,
}

const B64URL_DOT: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.";

/// `ExtractorImpl::extractJWT`: from the first base64url-or-dot character at or after
/// `after` to the end; the whole value when there is none.
fn extract_jwt(value: &str, after: usize) -> &str {
    let start = value.as_bytes().iter().enumerate().skip(after).find(|(_, b)| B64URL_DOT.contains(b)).map(|(i, _)| i);
    match start {
        Some(i) => value.get(i..).unwrap_or(value),
        None => value,
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Envoy's `PercentEncoding::decode`: valid `%XX` decoded, everything else kept.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            if let (Some(h), Some(l)) = (b.get(i + 1).and_then(|x| hex(*x)), b.get(i + 2).and_then(|x| hex(*x))) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `QueryParamsMulti::parseAndDecodeQueryString`: sorted by key, values in order.
fn query_params(path: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let Some((_, q)) = path.split_once('?') else { return out };
    for p in q.split('&') {
        if p.is_empty() {
            continue;
        }
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        out.entry(percent_decode(k)).or_default().push(percent_decode(v));
    }
    out
}

/// `Http::Utility::parseCookies`: the first occurrence of each name, quotes stripped.
fn cookie(req: &Request<'_>, name: &str) -> Option<String> {
    for v in req.values("cookie") {
        for part in v.split(';') {
            let part = part.trim_start();
            let Some((k, val)) = part.split_once('=') else { continue };
            if k != name {
                continue;
            }
            let val = if val.len() >= 2 && val.starts_with('"') && val.ends_with('"') {
                val.get(1..val.len() - 1).unwrap_or(val)
            } else {
                val
            };
            return Some(val.to_string());
        }
    }
    None
}

fn extract(p: &Provider, req: &Request<'_>) -> Vec<Token> {
    let mut tokens = Vec::new();
    // Each location kind in the extractor's order (`Provider`'s lists are kept in it).
    for (name, prefix) in &p.headers {
        for value in req.values(name) {
            let token = if prefix.is_empty() {
                value
            } else {
                let Some(pos) = value.find(prefix.as_str()) else { continue };
                extract_jwt(value, pos + prefix.len())
            };
            tokens.push(Token { token: token.to_string(), location: Location::Header(name.clone()) });
        }
    }
    if !p.params.is_empty() {
        // Only a query can carry a parameter: the common request has none to parse.
        if let Some(path) = req.first(":path").filter(|path| path.contains('?')) {
            let params = query_params(path);
            for name in &p.params {
                if let Some(v) = params.get(name).and_then(|v| v.first()) {
                    tokens.push(Token { token: v.clone(), location: Location::Param(name.clone()) });
                }
            }
        }
    }
    for name in &p.cookies {
        if let Some(v) = cookie(req, name) {
            tokens.push(Token { token: v, location: Location::Cookie });
        }
    }
    tokens
}

/// `JwtParamLocation::removeJwt`: the parameter dropped, the rest re-emitted sorted by key.
fn remove_param(req: &mut Request<'_>, name: &str) {
    let Some(path) = req.first(":path").map(str::to_string) else { return };
    let mut params = query_params(&path);
    params.remove(name);
    let base = path.split_once('?').map_or(path.as_str(), |(b, _)| b).to_string();
    let mut out = base;
    let mut delim = '?';
    for (k, vs) in &params {
        for v in vs {
            out.push(delim);
            out.push_str(k);
            out.push('=');
            out.push_str(v);
            delim = '&';
        }
    }
    req.set_path(out);
}

// === verification ===

/// A provider's keys right now.
pub enum KeyState {
    /// The keys and their generation (0 inline, the fetch's version for a remote set).
    Ready(Rc<Jwks>, u64),
    /// Not fetched yet: the request waits.
    Pending,
    /// Cannot be had: `Jwks remote fetch is failed`.
    Failed,
}

/// What verification needs from its environment: keys, the clock, the token cache.
pub trait Env {
    fn keys(&self, provider: usize) -> KeyState;
    fn now(&self) -> u64;
    /// A token this provider verified before, under keys of `generation`.
    fn cached(&mut self, provider: usize, token: &str, generation: u64) -> Option<Rc<Jwt>>;
    fn remember(&mut self, provider: usize, token: &str, generation: u64, jwt: Rc<Jwt>);
}

/// Verification stopped to wait for a JWKS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending;

/// The result of `jwt_authn` on one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub status: Status,
    /// The payload of the last verified token, normalized (the `payload` metadata).
    pub payload: Option<Rc<Value>>,
    /// Header effects in order.
    pub ops: Vec<Op>,
    /// `ops` as edits of the map as read: what the policies see next is `edits.apply(map)`.
    pub edits: Edits,
    /// Signature verifications performed (0 when every token came from the cache).
    pub verified: u32,
    pub cache_hits: u32,
}

struct Run<'a, 'h, E: Env> {
    authn: &'a Authn,
    env: &'a mut E,
    req: Request<'h>,
    payload: Option<Rc<Value>>,
    verified: u32,
    cache_hits: u32,
}

/// `convertClaimDoubleToString`.
fn number_string(d: f64) -> String {
    if d < 0.0 || d >= u64::MAX as f64 || d.fract() != 0.0 {
        fixed6(d)
    } else {
        (d as u64).to_string()
    }
}

/// `format!("{d:.6}")` (the exact value rounded half to even at 6 decimals), written out so
/// that core's float formatting (Grisu and Dragon4: 18.5 KiB of module size) is not
/// linked. `tests::fixed6_is_std_formatting` proves it equal to std on random bit patterns.
pub fn fixed6(d: f64) -> String {
    if d.is_nan() {
        return "NaN".into();
    }
    let sign = if d.is_sign_negative() { "-" } else { "" };
    if d.is_infinite() {
        return format!("{sign}inf");
    }
    let bits = d.to_bits();
    let biased = ((bits >> 52) & 0x7ff) as i32;
    let fraction = bits & ((1 << 52) - 1);
    // d = ±m · 2^e exactly.
    let (m, e) = if biased == 0 { (fraction, -1074) } else { (fraction | 1 << 52, biased - 1075) };
    if e >= 0 {
        // An integer: its decimal digits (base-10^9 limbs, least significant first), then
        // six zeros.
        let mut limbs: Vec<u64> =
            vec![m % 1_000_000_000, m / 1_000_000_000 % 1_000_000_000, m / 1_000_000_000_000_000_000];
        let mut left = e;
        while left > 0 {
            let k = left.min(32);
            left -= k;
            let mut carry = 0u64;
            for l in limbs.iter_mut() {
                let v = (*l << k) + carry;
                *l = v % 1_000_000_000;
                carry = v / 1_000_000_000;
            }
            while carry > 0 {
                limbs.push(carry % 1_000_000_000);
                carry /= 1_000_000_000;
            }
        }
        while limbs.len() > 1 && limbs.last() == Some(&0) {
            limbs.pop();
        }
        let mut out = String::from(sign);
        for (i, l) in limbs.iter().rev().enumerate() {
            if i == 0 {
                out.push_str(&l.to_string());
            } else {
                out.push_str(&format!("{l:09}"));
            }
        }
        out.push_str(".000000");
        return out;
    }
    // A fraction: m · 10^6 / 2^-e, rounded half to even (< 2^73 before the shift).
    let scaled = u128::from(m) * 1_000_000;
    let k = e.unsigned_abs();
    let q = if k >= 128 {
        0
    } else {
        let q = scaled >> k;
        let r = scaled & ((1u128 << k) - 1);
        let half = 1u128 << (k - 1);
        if r > half || (r == half && q & 1 == 1) {
            q + 1
        } else {
            q
        }
    };
    format!("{sign}{}.{:06}", q / 1_000_000, q % 1_000_000)
}

/// `StructUtils::GetValue` with a dotted path.
fn claim<'a>(payload: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut cur = payload;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, k) in parts.iter().enumerate() {
        let v = cur.get(*k)?;
        if i + 1 == parts.len() {
            return Some(v);
        }
        cur = v.as_object()?;
    }
    None
}

fn claim_header_value(v: &Value) -> Option<String> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => number_string(n.as_f64().unwrap_or(0.0)),
        Value::Bool(b) => b.to_string(),
        Value::Array(_) | Value::Object(_) => crate::jwt::b64_encode(serde_json::to_string(v).ok()?.as_bytes()),
        Value::Null => return None,
    };
    (!s.is_empty()).then_some(s)
}

/// `setPayloadMetadata`: space-delimited string claims become lists.
pub fn normalize(payload: &Map<String, Value>, claims: &[String]) -> Map<String, Value> {
    let mut out = payload.clone();
    for c in claims {
        if let Some(Value::String(s)) = payload.get(c) {
            let list: Vec<Value> = s.split(' ').filter(|x| !x.is_empty()).map(|x| Value::String(x.into())).collect();
            if !list.is_empty() {
                out.insert(c.clone(), Value::Array(list));
            }
        }
    }
    out
}

impl<E: Env> Run<'_, '_, E> {
    /// `ProviderVerifierImpl::verify` with `AuthenticatorImpl` (no allow-failed, no
    /// allow-missing): every token of the provider must verify.
    fn provider(&mut self, i: usize) -> Result<Status, Pending> {
        let authn = self.authn;
        let Some(p) = authn.providers.get(i) else { return Ok(Status::JwtMissed) };
        if let Some(h) = &p.payload_header {
            self.req.remove(h);
        }
        for (h, _) in &p.claim_headers {
            self.req.remove(h);
        }
        let mut tokens = extract(p, &self.req);
        if tokens.is_empty() {
            return Ok(Status::JwtMissed);
        }
        while let Some(t) = tokens.pop() {
            let status = self.token(i, p, &t)?;
            if status != Status::Ok || tokens.is_empty() {
                return Ok(status);
            }
        }
        Ok(Status::JwtMissed)
    }

    fn token(&mut self, i: usize, p: &Provider, t: &Token) -> Result<Status, Pending> {
        let generation = match self.env.keys(i) {
            KeyState::Ready(_, g) => Some(g),
            _ => None,
        };
        let cached = generation.and_then(|g| self.env.cached(i, &t.token, g));
        let hit = cached.is_some();
        let jwt = match cached {
            Some(j) => j,
            None => match Jwt::parse(&t.token) {
                Ok(j) => Rc::new(j),
                Err(s) => return Ok(s),
            },
        };
        if jwt.iss != p.issuer {
            return Ok(Status::JwtUnknownIssuer);
        }
        let time = jwt.check_time(self.env.now(), CLOCK_SKEW_SECONDS);
        if time != Status::Ok {
            return Ok(time);
        }
        if !p.audiences.is_empty()
            && !jwt.audiences.iter().any(|a| p.audiences.iter().any(|c| c == sanitize_audience(a)))
        {
            return Ok(Status::JwtAudienceNotAllowed);
        }
        if hit {
            self.cache_hits += 1;
        } else {
            match self.env.keys(i) {
                KeyState::Pending => return Err(Pending),
                KeyState::Failed => return Ok(Status::JwksFetchFail),
                KeyState::Ready(jwks, g) => {
                    self.verified += 1;
                    let s = jwks.verify(&jwt);
                    if s != Status::Ok {
                        return Ok(s);
                    }
                    self.env.remember(i, &t.token, g, Rc::clone(&jwt));
                }
            }
        }
        // handleGoodJwt
        if let Some(h) = &p.payload_header {
            self.req.add(h, jwt.payload_b64.clone());
        }
        for (h, c) in &p.claim_headers {
            if let Some(v) = claim(&jwt.payload, c).and_then(claim_header_value) {
                self.req.add(h, v);
            }
        }
        if !p.forward {
            match &t.location {
                Location::Header(h) => self.req.remove(h),
                Location::Param(name) => remove_param(&mut self.req, name),
                Location::Cookie => {}
            }
        }
        let normalized =
            jwt.normalized.get_or_init(|| Rc::new(Value::Object(normalize(&jwt.payload, &p.space_delimited))));
        self.payload = Some(Rc::clone(normalized));
        Ok(Status::Ok)
    }

    /// `AnyVerifierImpl`: the first OK wins; otherwise the children's statuses aggregated
    /// (a real error over `issuer not configured` over `missing`), `missing` → OK when
    /// missing is allowed.
    fn any(&mut self, children: &[usize], all: bool, allow_missing: bool) -> Result<Status, Pending> {
        let mut statuses = Vec::new();
        for &c in children {
            let s = self.provider(c)?;
            if s == Status::Ok {
                return Ok(Status::Ok);
            }
            statuses.push(s);
        }
        if all {
            let s = self.all()?;
            if s == Status::Ok {
                return Ok(Status::Ok);
            }
            statuses.push(s);
        }
        let mut fin = Status::JwtMissed;
        for s in statuses {
            if (s != Status::JwtMissed && s != Status::JwtUnknownIssuer) || fin == Status::JwtMissed {
                fin = s;
            }
        }
        if allow_missing && fin == Status::JwtMissed {
            fin = Status::Ok;
        }
        Ok(fin)
    }

    /// `AllVerifierImpl` over `requires_any {provider, allow_missing}` of every provider.
    fn all(&mut self) -> Result<Status, Pending> {
        for i in 0..self.authn.providers.len() {
            let s = self.any(&[i], false, true)?;
            if s != Status::Ok {
                return Ok(s);
            }
        }
        Ok(Status::Ok)
    }
}

/// Run `jwt_authn` as istiod configures it on `headers`.
pub fn authenticate<E: Env>(authn: &Authn, headers: &Headers, env: &mut E) -> Result<Outcome, Pending> {
    let req = Request::new(headers);
    if authn.providers.is_empty() || req.is_cors_preflight() {
        return Ok(Outcome {
            status: Status::Ok,
            payload: None,
            ops: Vec::new(),
            edits: Edits::default(),
            verified: 0,
            cache_hits: 0,
        });
    }
    let mut run = Run { authn, env, req, payload: None, verified: 0, cache_hits: 0 };
    let n = authn.providers.len();
    let status = if n == 1 {
        run.any(&[0], false, true)?
    } else {
        let all: Vec<usize> = (0..n).collect();
        run.any(&all, true, false)?
    };
    Ok(Outcome {
        status,
        payload: run.payload,
        ops: std::mem::take(&mut run.req.ops),
        edits: run.req.into_edits(),
        verified: run.verified,
        cache_hits: run.cache_hits,
    })
}

/// The local reply of a rejection: status, body, `www-authenticate`, response code details.
pub fn rejection(status: Status, original_uri: &str) -> (u32, String, String, String) {
    let code = if status == Status::JwtAudienceNotAllowed { 403 } else { 401 };
    let mut www = format!("Bearer realm=\"{original_uri}\"");
    if status != Status::JwtMissed {
        www.push_str(", error=\"invalid_token\"");
    }
    let details: String = status.message().chars().map(|c| if c.is_ascii_whitespace() { '_' } else { c }).collect();
    (code, status.message().to_string(), www, format!("jwt_authn_access_denied{{{details}}}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::b64_encode;
    use hmac::{KeyInit, Mac};
    use serde_json::json;
    use std::rc::Rc;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_700_000_000;

    fn b64u(b: &[u8]) -> String {
        b64_encode(b).trim_end_matches('=').replace('+', "-").replace('/', "_")
    }

    fn hs256(header: Value, payload: Value) -> String {
        let data = format!("{}.{}", b64u(header.to_string().as_bytes()), b64u(payload.to_string().as_bytes()));
        let mut m = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(SECRET).unwrap();
        m.update(data.as_bytes());
        format!("{data}.{}", b64u(&m.finalize().into_bytes()))
    }

    fn token(payload: Value) -> String {
        hs256(json!({"alg": "HS256", "kid": "k1"}), payload)
    }

    fn jwks() -> String {
        json!({"keys": [{"kty": "oct", "kid": "k1", "k": b64u(SECRET)}]}).to_string()
    }

    fn authn(rules: Value) -> Authn {
        let res: Vec<ResourceJson<RequestAuthSpecJson>> = serde_json::from_value(json!([{
            "apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
            "metadata": {"name": "ra", "namespace": "foo"}, "spec": {"jwtRules": rules}}]))
        .unwrap();
        Authn::parse(&res, &BTreeMap::new(), &Path::root()).unwrap()
    }

    #[test]
    fn request_edits_apply_in_order_over_the_map_as_read() {
        let base = Headers::from_pairs(&[
            (":path".into(), "/a?access_token=t&b=1".into()),
            ("Authorization".into(), "Bearer x".into()),
            ("x-jwt".into(), "spoofed".into()),
            ("authorization".into(), "Bearer y".into()),
        ]);
        let mut r = Request::new(&base);
        assert_eq!(r.values("authorization").collect::<Vec<_>>(), ["Bearer x", "Bearer y"]);
        assert!(r.edits.is_empty(), "no edits: the map as read");
        r.remove("x-jwt");
        r.add("x-jwt", "p1".into());
        r.add("x-claim", "c".into());
        r.remove("AUTHORIZATION");
        r.add("x-jwt", "p2".into());
        remove_param(&mut r, "access_token");
        let pairs = |h: &Headers| h.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>();
        let edited = r.edits.apply(&base);
        assert_eq!(pairs(&edited), [":path=/a?b=1", "x-jwt=p1", "x-claim=c", "x-jwt=p2"]);
        assert_eq!(r.first(":path"), Some("/a?b=1"));
        r.remove("x-jwt");
        assert_eq!(pairs(&r.edits.apply(&base)), [":path=/a?b=1", "x-claim=c"]);
        assert_eq!(pairs(&base).len(), 4, "the map as read is untouched");
        assert_eq!(r.ops.len(), 7);
    }

    struct TestEnv<'a>(&'a Authn, HashMap<(usize, String), Rc<Jwt>>);
    use std::collections::HashMap;

    impl Env for TestEnv<'_> {
        fn keys(&self, p: usize) -> KeyState {
            match &self.0.providers[p].keys {
                Keys::Inline(j) => KeyState::Ready(Rc::clone(j), 0),
                Keys::Remote(_) => KeyState::Pending,
            }
        }
        fn now(&self) -> u64 {
            NOW
        }
        fn cached(&mut self, p: usize, t: &str, _g: u64) -> Option<Rc<Jwt>> {
            self.1.get(&(p, t.to_string())).cloned()
        }
        fn remember(&mut self, p: usize, t: &str, _g: u64, jwt: Rc<Jwt>) {
            self.1.insert((p, t.to_string()), jwt);
        }
    }

    fn run(a: &Authn, headers: &[(&str, &str)]) -> Outcome {
        let mut h: Vec<(String, String)> =
            vec![(":method".into(), "GET".into()), (":path".into(), "/x".into()), (":authority".into(), "h".into())];
        for (k, v) in headers {
            if *k == ":path" {
                h[1].1 = v.to_string();
            } else {
                h.push((k.to_string(), v.to_string()));
            }
        }
        authenticate(a, &Headers::from_pairs(&h), &mut TestEnv(a, HashMap::new())).unwrap()
    }

    fn one() -> Authn {
        authn(
            json!([{"issuer": "iss1", "jwks": jwks(), "audiences": ["https://api/"], "outputClaimToHeaders": [{"header": "x-sub", "claim": "sub"}, {"header": "x-nested", "claim": "a.b"}], "outputPayloadToHeader": "x-payload"}]),
        )
    }

    fn good() -> Value {
        json!({"iss": "iss1", "sub": "alice", "aud": ["other", "api"], "exp": NOW + 100, "scope": "read write", "a": {"b": 2}})
    }

    #[test]
    fn missing_token_continues_without_identity() {
        let o = run(&one(), &[]);
        assert_eq!(o.status, Status::Ok);
        assert!(o.payload.is_none());
        // Output headers a client sent are removed even without a token.
        let o = run(&one(), &[("x-sub", "mallory")]);
        assert_eq!(
            o.ops,
            vec![Op::Remove("x-payload".into()), Op::Remove("x-sub".into()), Op::Remove("x-nested".into())]
        );
    }

    #[test]
    fn valid_token_outputs_and_removal() {
        let t = token(good());
        let o = run(&one(), &[("authorization", &format!("Bearer {t}"))]);
        assert_eq!(o.status, Status::Ok);
        let p = o.payload.unwrap();
        assert_eq!(p["scope"], json!(["read", "write"]));
        assert!(o.ops.contains(&Op::Add("x-sub".into(), "alice".into())));
        assert!(o.ops.contains(&Op::Add("x-nested".into(), "2".into())));
        assert!(o.ops.contains(&Op::Remove("authorization".into())));
        assert!(o.ops.iter().any(|op| matches!(op, Op::Add(h, _) if h == "x-payload")));
    }

    #[test]
    fn rejections() {
        let a = one();
        let bearer = |p: Value| format!("Bearer {}", token(p));
        let mut expired = good();
        expired["exp"] = json!(NOW - 61);
        let mut skew_ok = good();
        skew_ok["exp"] = json!(NOW - 59);
        let mut nbf = good();
        nbf["nbf"] = json!(NOW + 61);
        let mut aud = good();
        aud["aud"] = json!("nope");
        let mut iss = good();
        iss["iss"] = json!("other");
        let cases = [
            (bearer(expired), Status::JwtExpired),
            (bearer(skew_ok), Status::Ok),
            (bearer(nbf), Status::JwtNotYetValid),
            (bearer(aud), Status::JwtAudienceNotAllowed),
            (bearer(iss), Status::JwtUnknownIssuer),
            (format!("Bearer {}", hs256(json!({"alg": "none"}), good())), Status::JwtHeaderNotImplementedAlg),
            (format!("Bearer {}", hs256(json!({"alg": "HS256", "kid": "k2"}), good())), Status::JwksKidAlgMismatch),
            ("Bearer a.b".into(), Status::JwtBadFormat),
        ];
        for (h, want) in cases {
            assert_eq!(run(&a, &[("authorization", &h)]).status, want, "{h}");
        }
        // Lowercase `bearer` is not the prefix: no token.
        assert_eq!(run(&a, &[("authorization", &format!("bearer {}", token(good())))]).status, Status::Ok);
        assert!(run(&a, &[("authorization", &format!("bearer {}", token(good())))]).payload.is_none());
        // A tampered signature.
        let t = token(good());
        let bad = format!("{}x", &t[..t.len() - 1]);
        assert_eq!(run(&a, &[("authorization", &format!("Bearer {bad}"))]).status, Status::JwtVerificationFail);
    }

    #[test]
    fn every_token_must_verify() {
        let a = one();
        let t = token(good());
        let o = run(&a, &[("authorization", &format!("Bearer {t}")), (":path", "/x?access_token=garbage")]);
        assert_eq!(o.status, Status::JwtBadFormat);
        let o = run(&a, &[("authorization", &format!("Bearer {t}")), ("authorization", "Bearer x.y.z")]);
        assert_ne!(o.status, Status::Ok);
    }

    #[test]
    fn query_token_removed_and_rest_sorted() {
        let a = one();
        let t = token(good());
        let o = run(&a, &[(":path", &format!("/x?z=1&access_token={t}&b=%41"))]);
        assert_eq!(o.status, Status::Ok);
        assert!(o.ops.contains(&Op::SetPath("/x?b=A&z=1".into())), "{:?}", o.ops);
    }

    #[test]
    fn two_providers_share_the_default_location() {
        let a = authn(json!([
            {"issuer": "iss2", "jwks": jwks()},
            {"issuer": "iss1", "jwks": jwks()},
        ]));
        assert_eq!(a.providers[0].issuer, "iss1");
        assert_eq!(a.providers[0].name, "origins-0");
        let mut p2 = good();
        p2["iss"] = json!("iss2");
        p2.as_object_mut().unwrap().remove("aud");
        assert_eq!(run(&a, &[("authorization", &format!("Bearer {}", token(p2)))]).status, Status::Ok);
        let mut p3 = good();
        p3["iss"] = json!("iss3");
        assert_eq!(run(&a, &[("authorization", &format!("Bearer {}", token(p3)))]).status, Status::JwtUnknownIssuer);
        assert_eq!(run(&a, &[]).status, Status::Ok);
    }

    #[test]
    fn cors_preflight_bypassed() {
        let a = one();
        let o = run(
            &a,
            &[
                (":method", "OPTIONS"),
                ("origin", "o"),
                ("access-control-request-method", "GET"),
                ("authorization", "Bearer x"),
            ],
        );
        // `:method` is pushed after the GET default; the model reads the first one.
        let _ = o;
        let mut h = vec![(":method".to_string(), "OPTIONS".to_string()), (":path".into(), "/".into())];
        h.push(("origin".into(), "o".into()));
        h.push(("access-control-request-method".into(), "GET".into()));
        h.push(("authorization".into(), "Bearer x".into()));
        let o = authenticate(&a, &Headers::from_pairs(&h), &mut TestEnv(&a, HashMap::new())).unwrap();
        assert_eq!(o.status, Status::Ok);
        assert!(o.ops.is_empty());
    }

    #[test]
    fn cache_skips_verification_but_not_time_checks() {
        let a = one();
        let t = token(good());
        let h = vec![(":path".to_string(), "/".to_string()), ("authorization".into(), format!("Bearer {t}"))];
        let mut env = TestEnv(&a, HashMap::new());
        let o = authenticate(&a, &Headers::from_pairs(&h), &mut env).unwrap();
        assert_eq!((o.status, o.verified, o.cache_hits), (Status::Ok, 1, 0));
        let o = authenticate(&a, &Headers::from_pairs(&h), &mut env).unwrap();
        assert_eq!((o.status, o.verified, o.cache_hits), (Status::Ok, 0, 1));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 20000, ..Default::default() })]
        #[test]
        fn fixed6_is_std_formatting(bits in proptest::prelude::any::<u64>(), small in -1.0e7f64..1.0e7, k in 0u32..80, n in 0u64..1_000_000) {
            let d = f64::from_bits(bits);
            proptest::prop_assert_eq!(fixed6(d), format!("{d:.6}"));
            proptest::prop_assert_eq!(fixed6(small), format!("{small:.6}"));
            // Dyadic values, whose 7th decimal can be an exact tie.
            let dy = n as f64 / (1u64 << k.min(63)) as f64;
            proptest::prop_assert_eq!(fixed6(dy), format!("{dy:.6}"));
            proptest::prop_assert_eq!(fixed6(-dy), format!("{:.6}", -dy));
        }
    }

    #[test]
    fn fixed6_examples() {
        for d in [
            0.0,
            -0.0,
            0.5,
            2.5e-7,
            1.5e-6,
            0.0078125,
            -1e-9,
            1e300,
            -1.8446744073709552e19,
            f64::MAX,
            f64::MIN_POSITIVE,
            5e-324,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            assert_eq!(fixed6(d), format!("{d:.6}"), "{d:e}");
        }
    }

    #[test]
    fn replies() {
        let (code, body, www, details) = rejection(Status::JwtExpired, "http://h/x");
        assert_eq!((code, body.as_str()), (401, "Jwt is expired"));
        assert_eq!(www, "Bearer realm=\"http://h/x\", error=\"invalid_token\"");
        assert_eq!(details, "jwt_authn_access_denied{Jwt_is_expired}");
        assert_eq!(rejection(Status::JwtAudienceNotAllowed, "").0, 403);
    }

    #[test]
    fn config_errors_name_the_path() {
        let res: Vec<ResourceJson<RequestAuthSpecJson>> = serde_json::from_value(json!([{
            "apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
            "metadata": {"name": "ra"}, "spec": {"jwtRules": [{"issuer": "i", "jwksUri": "https://keys/jwks.json"}]}}]))
        .unwrap();
        let e = Authn::parse(&res, &BTreeMap::new(), &Path::root()).unwrap_err().to_string();
        assert!(e.contains("authentication[0].spec.jwtRules[0].jwksUri"), "{e}");
        let sources: BTreeMap<String, JwksSourceJson> =
            serde_json::from_value(json!({"https://keys/jwks.json": {"cluster": "keys"}})).unwrap();
        let a = Authn::parse(&res, &sources, &Path::root()).unwrap();
        assert!(matches!(a.providers[0].keys, Keys::Remote(0)));
        assert_eq!(
            a.remotes,
            vec![Remote {
                uri: "https://keys/jwks.json".into(),
                cluster: "keys".into(),
                scheme: "https".into(),
                authority: "keys".into(),
                path: "/jwks.json".into(),
                cache_duration: DEFAULT_CACHE_DURATION,
                timeout: DEFAULT_TIMEOUT,
            }]
        );
        // A map entry no rule uses, a missing cluster, a bad cache duration.
        let extra: BTreeMap<String, JwksSourceJson> = serde_json::from_value(
            json!({"https://keys/jwks.json": {"cluster": "keys"}, "http://other/k": {"cluster": "c"}}),
        )
        .unwrap();
        let e = Authn::parse(&res, &extra, &Path::root()).unwrap_err().to_string();
        assert!(e.contains("jwks[\"http://other/k\"]") || e.contains("http://other/k"), "{e}");
        let nocluster: BTreeMap<String, JwksSourceJson> =
            serde_json::from_value(json!({"https://keys/jwks.json": {"cacheDuration": "1m"}})).unwrap();
        let e = Authn::parse(&res, &nocluster, &Path::root()).unwrap_err().to_string();
        assert!(e.contains("cluster: is required"), "{e}");
        let short: BTreeMap<String, JwksSourceJson> =
            serde_json::from_value(json!({"https://keys/jwks.json": {"cluster": "k", "cacheDuration": "10ms"}}))
                .unwrap();
        let e = Authn::parse(&res, &short, &Path::root()).unwrap_err().to_string();
        assert!(e.contains("cacheDuration: must be at least 1s"), "{e}");
        let res2: Vec<ResourceJson<RequestAuthSpecJson>> = serde_json::from_value(json!([{
            "apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
            "metadata": {"name": "ra"}, "spec": {"jwtRules": [{"issuer": "i", "jwks": "{\"keys\":[]}"}]}}]))
        .unwrap();
        let e = Authn::parse(&res2, &BTreeMap::new(), &Path::root()).unwrap_err().to_string();
        assert!(e.contains("jwtRules[0].jwks"), "{e}");
    }
}
