//! Authorization configuration: Istio resources as `kubectl get -o json` prints them, plus
//! the MeshConfig parts istiod would add (extension providers, trust domain and aliases).
//!
//! ```json
//! {
//!   "policies": [{"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
//!                 "metadata": {"name": "httpbin", "namespace": "foo"},
//!                 "spec": {"action": "ALLOW", "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}}],
//!   "extensionProviders": [{"name": "opa", "envoyExtAuthzHttp": {"service": "opa.foo.svc", "port": 8181,
//!                           "cluster": "opa", "pathPrefix": "/check"}}],
//!   "trustDomain": "cluster.local"
//! }
//! ```
//!
//! JSON → these serde structs (unknown fields rejected, except in `metadata`) → `crate::istio`
//! (istiod's translation into RBAC trees) → `Config`. Where istiod would silently drop a rule
//! or a value, this configuration is rejected with a path-naming error instead.

use std::collections::BTreeMap;
use std::time::Duration;

use meshwasm_sdk_ext::config::{ConfigError, Path};
use meshwasm_sdk_ext::duration::parse_duration;
use serde::Deserialize;
use serde_json::Value;

// === JSON ===

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzConfigJson {
    #[serde(default)]
    pub policies: Vec<ResourceJson<PolicySpecJson>>,
    #[serde(default)]
    pub extension_providers: Vec<ProviderJson>,
    pub trust_domain: Option<String>,
    #[serde(default)]
    pub trust_domain_aliases: Vec<String>,
    /// Where `ipBlocks` / `source.ip` (Envoy's `direct_remote_ip`) read the directly connected
    /// peer: `"filterState"` (default: the `meshwasm.direct_remote_address` filter state a
    /// native `set_filter_state` filter writes before this one) or `"sourceAddress"` (Envoy's
    /// `source.address`, equal to the peer only when the connection manager does not derive
    /// the client address from `x-forwarded-for`).
    pub direct_remote_address: Option<String>,
    /// RequestAuthentication resources (JWT), as kubectl prints them.
    #[serde(default)]
    pub authentication: Vec<ResourceJson<crate::authn::RequestAuthSpecJson>>,
    /// Where each remote `jwksUri` is fetched through: `{"<jwksUri>": {"cluster": "...",
    /// "cacheDuration": "5m"}}` (meshwasm addition; istiod derives the cluster).
    #[serde(default)]
    pub jwks: BTreeMap<String, crate::authn::JwksSourceJson>,
}

/// A Kubernetes resource as kubectl prints it. `status` and metadata fields other than
/// name, namespace and annotations are ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ResourceJson<S> {
    pub api_version: String,
    pub kind: String,
    pub metadata: MetadataJson,
    pub spec: S,
    #[allow(dead_code)]
    pub status: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MetadataJson {
    pub name: String,
    pub namespace: Option<String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicySpecJson {
    /// Accepted and ignored: this plugin's placement is the selection.
    #[allow(dead_code)]
    pub selector: Option<Value>,
    #[allow(dead_code)]
    pub target_ref: Option<Value>,
    #[allow(dead_code)]
    pub target_refs: Option<Value>,
    pub action: Option<String>,
    pub provider: Option<ProviderRefJson>,
    pub rules: Option<Vec<RuleJson>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderRefJson {
    pub name: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleJson {
    #[serde(default)]
    pub from: Vec<FromJson>,
    #[serde(default)]
    pub to: Vec<ToJson>,
    #[serde(default)]
    pub when: Vec<ConditionJson>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FromJson {
    pub source: Option<SourceJson>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToJson {
    pub operation: Option<OperationJson>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SourceJson {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    #[serde(default)]
    pub trust_domains: Vec<String>,
    #[serde(default)]
    pub not_trust_domains: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OperationJson {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConditionJson {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// An Istio MeshConfig `extensionProviders` entry, plus `cluster`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProviderJson {
    pub name: String,
    pub envoy_ext_authz_http: Option<HttpProviderJson>,
    pub envoy_ext_authz_grpc: Option<GrpcProviderJson>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpProviderJson {
    pub service: String,
    pub port: Option<i64>,
    /// The Envoy cluster the check goes through (meshwasm addition; istiod derives it).
    pub cluster: Option<String>,
    pub timeout: Option<String>,
    pub path_prefix: Option<String>,
    pub fail_open: Option<bool>,
    pub status_on_error: Option<String>,
    #[serde(default)]
    pub include_request_headers_in_check: Vec<String>,
    /// Deprecated Istio name of `includeRequestHeadersInCheck`.
    #[serde(default)]
    pub include_headers_in_check: Vec<String>,
    #[serde(default)]
    pub include_additional_headers_in_check: BTreeMap<String, String>,
    pub include_request_body_in_check: Option<BodyJson>,
    #[serde(default)]
    pub headers_to_upstream_on_allow: Vec<String>,
    #[serde(default)]
    pub headers_to_downstream_on_allow: Vec<String>,
    #[serde(default)]
    pub headers_to_downstream_on_deny: Vec<String>,
    /// Largest authorizer response body accepted (meshwasm addition; default 64 KiB).
    pub max_response_bytes: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcProviderJson {
    pub service: String,
    pub port: Option<i64>,
    pub cluster: Option<String>,
    pub timeout: Option<String>,
    pub fail_open: Option<bool>,
    pub status_on_error: Option<String>,
    pub include_request_body_in_check: Option<BodyJson>,
    /// Largest authorizer response accepted (meshwasm addition; default 64 KiB).
    pub max_response_bytes: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BodyJson {
    pub max_request_bytes: Option<u64>,
    pub allow_partial_message: Option<bool>,
    pub pack_as_bytes: Option<bool>,
}

// === validated ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Audit,
    Custom,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "ALLOW",
            Self::Deny => "DENY",
            Self::Audit => "AUDIT",
            Self::Custom => "CUSTOM",
        }
    }
}

/// How the authorizer is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderKind {
    Http(HttpProvider),
    Grpc,
}

/// A CUSTOM provider, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    pub name: String,
    pub cluster: String,
    /// `service` (without a `namespace/` prefix) and `:port`, for the check's `:authority`.
    pub authority: String,
    pub timeout: Duration,
    pub fail_open: bool,
    /// Status of the local reply when the check fails and `fail_open` is false (default 403).
    pub status_on_error: u32,
    pub body: Option<BodyLimit>,
    pub max_response_bytes: usize,
    pub kind: ProviderKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimit {
    pub max_request_bytes: u32,
    pub allow_partial_message: bool,
    pub pack_as_bytes: bool,
}

/// Header name patterns as Istio writes them (`x-id`, `x-prefix-*`, `*-suffix`), matched
/// case-insensitively as the ext_authz filter does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderPattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Any,
}

impl HeaderPattern {
    pub fn parse(p: &str) -> Self {
        let l = p.to_ascii_lowercase();
        if l == "*" {
            Self::Any
        } else if let Some(s) = l.strip_prefix('*') {
            Self::Suffix(s.to_string())
        } else if let Some(s) = l.strip_suffix('*') {
            Self::Prefix(s.to_string())
        } else {
            Self::Exact(l)
        }
    }

    /// `name` must be lower case.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Exact(s) => name == s,
            Self::Prefix(s) => name.starts_with(s.as_str()),
            Self::Suffix(s) => name.ends_with(s.as_str()),
            Self::Any => true,
        }
    }
}

pub fn patterns(list: &[String]) -> Vec<HeaderPattern> {
    list.iter().map(|p| HeaderPattern::parse(p)).collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpProvider {
    pub path_prefix: String,
    pub include_request_headers: Vec<HeaderPattern>,
    /// Lower-cased names with values, in configuration order.
    pub additional_headers: Vec<(String, String)>,
    pub headers_to_upstream_on_allow: Vec<HeaderPattern>,
    pub headers_to_downstream_on_allow: Vec<HeaderPattern>,
    pub headers_to_downstream_on_deny: Vec<HeaderPattern>,
}

/// Istio's default provider timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
const DEFAULT_MAX_RESPONSE: u64 = 64 * 1024;

fn status_on_error(v: Option<&str>, path: &Path) -> Result<u32, ConfigError> {
    match v {
        None => Ok(403),
        Some(s) => match s.parse::<u32>() {
            Ok(n) if (200..=599).contains(&n) => Ok(n),
            _ => Err(path.err(format!("must be an HTTP status in 200..=599, got {s:?}"))),
        },
    }
}

fn timeout(v: Option<&str>, path: &Path) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(DEFAULT_TIMEOUT),
        Some(s) => {
            let d = parse_duration(s).map_err(|e| path.err(e))?;
            if d.is_zero() {
                return Err(path.err("must be greater than 0"));
            }
            Ok(d)
        }
    }
}

fn body(b: Option<&BodyJson>, path: &Path) -> Result<Option<BodyLimit>, ConfigError> {
    let Some(b) = b else { return Ok(None) };
    let max = b.max_request_bytes.unwrap_or(0);
    let max = u32::try_from(max).map_err(|_| path.field("maxRequestBytes").err("must fit in 32 bits"))?;
    if max == 0 {
        return Err(path.field("maxRequestBytes").err("must be greater than 0"));
    }
    Ok(Some(BodyLimit {
        max_request_bytes: max,
        allow_partial_message: b.allow_partial_message.unwrap_or(false),
        pack_as_bytes: b.pack_as_bytes.unwrap_or(false),
    }))
}

fn authority(service: &str, port: Option<i64>, path: &Path) -> Result<String, ConfigError> {
    if service.is_empty() {
        return Err(path.field("service").err("must not be empty"));
    }
    // Istio allows `namespace/host`; the host is what the check is addressed to.
    let host = service.rsplit_once('/').map_or(service, |(_, h)| h);
    let port = port.ok_or_else(|| path.field("port").err("is required"))?;
    if !(1..=65535).contains(&port) {
        return Err(path.field("port").err(format!("must be in 1..=65535, got {port}")));
    }
    Ok(format!("{host}:{port}"))
}

fn max_response(v: Option<u64>, path: &Path) -> Result<usize, ConfigError> {
    let v = v.unwrap_or(DEFAULT_MAX_RESPONSE);
    if v == 0 || v > meshwasm_sdk_ext::filter::MAX_CALLOUT_BODY as u64 {
        return Err(path.err(format!("must be in 1..={}", meshwasm_sdk_ext::filter::MAX_CALLOUT_BODY)));
    }
    Ok(v as usize)
}

impl Provider {
    pub fn parse(p: &ProviderJson, path: &Path) -> Result<Self, ConfigError> {
        if p.name.is_empty() {
            return Err(path.field("name").err("must not be empty"));
        }
        match (&p.envoy_ext_authz_http, &p.envoy_ext_authz_grpc) {
            (Some(h), None) => {
                let path = path.field("envoyExtAuthzHttp");
                let cluster = h.cluster.clone().ok_or_else(|| {
                    path.field("cluster").err("is required: the Envoy cluster the check request goes through")
                })?;
                let prefix = h.path_prefix.clone().unwrap_or_default();
                if !prefix.is_empty() && !prefix.starts_with('/') {
                    return Err(path.field("pathPrefix").err(format!("must start with '/', got {prefix:?}")));
                }
                let mut include = h.include_request_headers_in_check.clone();
                include.extend(h.include_headers_in_check.iter().cloned());
                Ok(Self {
                    name: p.name.clone(),
                    cluster,
                    authority: authority(&h.service, h.port, &path)?,
                    timeout: timeout(h.timeout.as_deref(), &path.field("timeout"))?,
                    fail_open: h.fail_open.unwrap_or(false),
                    status_on_error: status_on_error(h.status_on_error.as_deref(), &path.field("statusOnError"))?,
                    body: body(h.include_request_body_in_check.as_ref(), &path.field("includeRequestBodyInCheck"))?,
                    max_response_bytes: max_response(h.max_response_bytes, &path.field("maxResponseBytes"))?,
                    kind: ProviderKind::Http(HttpProvider {
                        path_prefix: prefix,
                        include_request_headers: patterns(&include),
                        additional_headers: h
                            .include_additional_headers_in_check
                            .iter()
                            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                            .collect(),
                        headers_to_upstream_on_allow: patterns(&h.headers_to_upstream_on_allow),
                        headers_to_downstream_on_allow: patterns(&h.headers_to_downstream_on_allow),
                        headers_to_downstream_on_deny: patterns(&h.headers_to_downstream_on_deny),
                    }),
                })
            }
            (None, Some(g)) => {
                let path = path.field("envoyExtAuthzGrpc");
                let cluster = g.cluster.clone().ok_or_else(|| {
                    path.field("cluster").err("is required: the Envoy cluster (HTTP/2) of the gRPC service")
                })?;
                Ok(Self {
                    name: p.name.clone(),
                    cluster,
                    authority: authority(&g.service, g.port, &path)?,
                    timeout: timeout(g.timeout.as_deref(), &path.field("timeout"))?,
                    fail_open: g.fail_open.unwrap_or(false),
                    status_on_error: status_on_error(g.status_on_error.as_deref(), &path.field("statusOnError"))?,
                    body: body(g.include_request_body_in_check.as_ref(), &path.field("includeRequestBodyInCheck"))?,
                    max_response_bytes: max_response(g.max_response_bytes, &path.field("maxResponseBytes"))?,
                    kind: ProviderKind::Grpc,
                })
            }
            (None, None) => Err(path.err(
                "needs envoyExtAuthzHttp or envoyExtAuthzGrpc (other provider kinds are not authorization providers)",
            )),
            (Some(_), Some(_)) => Err(path.err("has both envoyExtAuthzHttp and envoyExtAuthzGrpc; choose one")),
        }
    }
}

/// Where the directly connected peer's address comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectAddress {
    FilterState,
    SourceAddress,
}

/// The filter state key the native `set_filter_state` filter writes the peer address to.
pub const DIRECT_ADDRESS_FILTER_STATE: &str = "meshwasm.direct_remote_address";

pub fn direct_address(v: Option<&str>, path: &Path) -> Result<DirectAddress, ConfigError> {
    match v {
        None | Some("filterState") => Ok(DirectAddress::FilterState),
        Some("sourceAddress") => Ok(DirectAddress::SourceAddress),
        Some(o) => Err(path.err(format!("must be \"filterState\" or \"sourceAddress\", got {o:?}"))),
    }
}

// === reading (the module's path) ===
//
// The structs above derive `Deserialize` for host-side users (tests, fuzz targets, tools);
// the module reads them with these functions instead, through `meshwasm_sdk_ext::obj`: the
// derived visitors cost about 80 KiB of module size (see `obj`), these one non-generic copy.
// `tests::read_matches_serde` proves both readers agree, errors included.

use meshwasm_sdk_ext::obj::Obj;

use crate::authn::JwksSourceJson;

fn list<T>(o: &Obj<'_>, k: &str, read: fn(&Value, &Path) -> Result<T, ConfigError>) -> Result<Vec<T>, ConfigError> {
    o.list(k)?.into_iter().map(|(p, v)| read(v, &p)).collect()
}

fn opt<T>(o: &Obj<'_>, k: &str, read: fn(&Value, &Path) -> Result<T, ConfigError>) -> Result<Option<T>, ConfigError> {
    o.get(k).map(|v| read(v, &o.path(k))).transpose()
}

impl AuthzConfigJson {
    pub fn read(v: &Value, path: &Path) -> Result<Self, ConfigError> {
        let o = Obj::new(
            v,
            path,
            "struct AuthzConfigJson",
            &[
                "policies",
                "extensionProviders",
                "trustDomain",
                "trustDomainAliases",
                "directRemoteAddress",
                "authentication",
                "jwks",
            ],
        )?;
        Ok(Self {
            policies: list(&o, "policies", ResourceJson::read)?,
            extension_providers: list(&o, "extensionProviders", ProviderJson::read)?,
            trust_domain: o.opt_string("trustDomain")?,
            trust_domain_aliases: o.strings("trustDomainAliases")?,
            direct_remote_address: o.opt_string("directRemoteAddress")?,
            authentication: list(&o, "authentication", ResourceJson::read)?,
            jwks: {
                let p = o.path("jwks");
                match o.raw("jwks") {
                    None => BTreeMap::new(),
                    // Paths as serde's: `jwks.<uri>.<field>`, whatever the URI holds.
                    Some(Value::Object(m)) => {
                        let mut out = BTreeMap::new();
                        for (k, v) in m {
                            let read = JwksSourceJson::read(v, &Path::root()).map_err(|mut e| {
                                e.path = if e.path.is_empty() {
                                    format!("jwks.{k}")
                                } else {
                                    format!("jwks.{k}.{}", e.path)
                                };
                                e
                            })?;
                            out.insert(k.clone(), read);
                        }
                        out
                    }
                    Some(v) => return Err(meshwasm_sdk_ext::obj::invalid_type(v, "a map", &p)),
                }
            },
        })
    }
}

/// A spec type the module reads by hand.
pub trait ReadSpec: Sized {
    fn read(v: &Value, path: &Path) -> Result<Self, ConfigError>;
}

impl ReadSpec for PolicySpecJson {
    fn read(v: &Value, path: &Path) -> Result<Self, ConfigError> {
        PolicySpecJson::read(v, path)
    }
}

impl<S: ReadSpec> ResourceJson<S> {
    pub fn read(v: &Value, path: &Path) -> Result<Self, ConfigError> {
        let o = Obj::new(v, path, "struct ResourceJson", &["apiVersion", "kind", "metadata", "spec", "status"])?;
        Ok(Self {
            api_version: o.str("apiVersion")?.to_string(),
            kind: o.str("kind")?.to_string(),
            metadata: MetadataJson::read(o.required("metadata")?, &o.path("metadata"))?,
            spec: S::read(o.required("spec")?, &o.path("spec"))?,
            status: o.get("status").cloned(),
        })
    }
}

impl MetadataJson {
    pub fn read(v: &Value, path: &Path) -> Result<Self, ConfigError> {
        let o = Obj::open(v, path, "struct MetadataJson")?;
        Ok(Self {
            name: o.str("name")?.to_string(),
            namespace: o.opt_string("namespace")?,
            annotations: o.string_map("annotations")?,
        })
    }
}

impl PolicySpecJson {
    pub fn read(v: &Value, path: &Path) -> Result<Self, ConfigError> {
        let o = Obj::new(
            v,
            path,
            "struct PolicySpecJson",
            &["selector", "targetRef", "targetRefs", "action", "provider", "rules"],
        )?;
        let rules = match o.get("rules") {
            None => None,
            Some(_) => Some(list(&o, "rules", RuleJson::read)?),
        };
        Ok(Self {
            selector: o.get("selector").cloned(),
            target_ref: o.get("targetRef").cloned(),
            target_refs: o.get("targetRefs").cloned(),
            action: o.opt_string("action")?,
            provider: opt(&o, "provider", |v, p| {
                let o = Obj::new(v, p, "struct ProviderRefJson", &["name"])?;
                Ok(ProviderRefJson { name: o.str("name")?.to_string() })
            })?,
            rules,
        })
    }
}

impl RuleJson {
    pub fn read(v: &Value, path: &Path) -> Result<Self, ConfigError> {
        let o = Obj::new(v, path, "struct RuleJson", &["from", "to", "when"])?;
        Ok(Self {
            from: list(&o, "from", |v, p| {
                let o = Obj::new(v, p, "struct FromJson", &["source"])?;
                Ok(FromJson { source: opt(&o, "source", SourceJson::read)? })
            })?,
            to: list(&o, "to", |v, p| {
                let o = Obj::new(v, p, "struct ToJson", &["operation"])?;
                Ok(ToJson { operation: opt(&o, "operation", OperationJson::read)? })
            })?,
            when: list(&o, "when", |v, p| {
                let o = Obj::new(v, p, "struct ConditionJson", &["key", "values", "notValues"])?;
                Ok(ConditionJson {
                    key: o.str("key")?.to_string(),
                    values: o.strings("values")?,
                    not_values: o.strings("notValues")?,
                })
            })?,
        })
    }
}

impl SourceJson {
    pub fn read(v: &Value, path: &Path) -> Result<Self, ConfigError> {
        const FIELDS: [&str; 14] = [
            "principals",
            "notPrincipals",
            "requestPrincipals",
            "notRequestPrincipals",
            "namespaces",
            "notNamespaces",
            "serviceAccounts",
            "notServiceAccounts",
            "trustDomains",
            "notTrustDomains",
            "ipBlocks",
            "notIpBlocks",
            "remoteIpBlocks",
            "notRemoteIpBlocks",
        ];
        let o = Obj::new(v, path, "struct SourceJson", &FIELDS)?;
        let [a, b, c, d, e, f, g, h, i, j, k, l, m, n] = FIELDS.map(|name| o.strings(name));
        Ok(Self {
            principals: a?,
            not_principals: b?,
            request_principals: c?,
            not_request_principals: d?,
            namespaces: e?,
            not_namespaces: f?,
            service_accounts: g?,
            not_service_accounts: h?,
            trust_domains: i?,
            not_trust_domains: j?,
            ip_blocks: k?,
            not_ip_blocks: l?,
            remote_ip_blocks: m?,
            not_remote_ip_blocks: n?,
        })
    }
}

impl OperationJson {
    pub fn read(v: &Value, path: &Path) -> Result<Self, ConfigError> {
        const FIELDS: [&str; 8] =
            ["hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths"];
        let o = Obj::new(v, path, "struct OperationJson", &FIELDS)?;
        let [a, b, c, d, e, f, g, h] = FIELDS.map(|name| o.strings(name));
        Ok(Self {
            hosts: a?,
            not_hosts: b?,
            ports: c?,
            not_ports: d?,
            methods: e?,
            not_methods: f?,
            paths: g?,
            not_paths: h?,
        })
    }
}

impl ProviderJson {
    pub fn read(v: &Value, path: &Path) -> Result<Self, ConfigError> {
        let o = Obj::new(v, path, "struct ProviderJson", &["name", "envoyExtAuthzHttp", "envoyExtAuthzGrpc"])?;
        Ok(Self {
            name: o.str("name")?.to_string(),
            envoy_ext_authz_http: opt(&o, "envoyExtAuthzHttp", HttpProviderJson::read)?,
            envoy_ext_authz_grpc: opt(&o, "envoyExtAuthzGrpc", GrpcProviderJson::read)?,
        })
    }
}

impl HttpProviderJson {
    pub fn read(v: &Value, path: &Path) -> Result<Self, ConfigError> {
        let o = Obj::new(
            v,
            path,
            "struct HttpProviderJson",
            &[
                "service",
                "port",
                "cluster",
                "timeout",
                "pathPrefix",
                "failOpen",
                "statusOnError",
                "includeRequestHeadersInCheck",
                "includeHeadersInCheck",
                "includeAdditionalHeadersInCheck",
                "includeRequestBodyInCheck",
                "headersToUpstreamOnAllow",
                "headersToDownstreamOnAllow",
                "headersToDownstreamOnDeny",
                "maxResponseBytes",
            ],
        )?;
        Ok(Self {
            service: o.str("service")?.to_string(),
            port: o.opt_i64("port")?,
            cluster: o.opt_string("cluster")?,
            timeout: o.opt_string("timeout")?,
            path_prefix: o.opt_string("pathPrefix")?,
            fail_open: o.opt_bool("failOpen")?,
            status_on_error: o.opt_string("statusOnError")?,
            include_request_headers_in_check: o.strings("includeRequestHeadersInCheck")?,
            include_headers_in_check: o.strings("includeHeadersInCheck")?,
            include_additional_headers_in_check: o.string_map("includeAdditionalHeadersInCheck")?,
            include_request_body_in_check: opt(&o, "includeRequestBodyInCheck", BodyJson::read)?,
            headers_to_upstream_on_allow: o.strings("headersToUpstreamOnAllow")?,
            headers_to_downstream_on_allow: o.strings("headersToDownstreamOnAllow")?,
            headers_to_downstream_on_deny: o.strings("headersToDownstreamOnDeny")?,
            max_response_bytes: o.opt_u64("maxResponseBytes")?,
        })
    }
}

impl GrpcProviderJson {
    pub fn read(v: &Value, path: &Path) -> Result<Self, ConfigError> {
        let o = Obj::new(
            v,
            path,
            "struct GrpcProviderJson",
            &[
                "service",
                "port",
                "cluster",
                "timeout",
                "failOpen",
                "statusOnError",
                "includeRequestBodyInCheck",
                "maxResponseBytes",
            ],
        )?;
        Ok(Self {
            service: o.str("service")?.to_string(),
            port: o.opt_i64("port")?,
            cluster: o.opt_string("cluster")?,
            timeout: o.opt_string("timeout")?,
            fail_open: o.opt_bool("failOpen")?,
            status_on_error: o.opt_string("statusOnError")?,
            include_request_body_in_check: opt(&o, "includeRequestBodyInCheck", BodyJson::read)?,
            max_response_bytes: o.opt_u64("maxResponseBytes")?,
        })
    }
}

impl BodyJson {
    pub fn read(v: &Value, path: &Path) -> Result<Self, ConfigError> {
        let o = Obj::new(v, path, "struct BodyJson", &["maxRequestBytes", "allowPartialMessage", "packAsBytes"])?;
        Ok(Self {
            max_request_bytes: o.opt_u64("maxRequestBytes")?,
            allow_partial_message: o.opt_bool("allowPartialMessage")?,
            pack_as_bytes: o.opt_bool("packAsBytes")?,
        })
    }
}
