//! istiod's translation of AuthorizationPolicy rules into Envoy RBAC trees, field by field,
//! so a policy means here exactly what it means under istiod (the conformance test compares
//! this output with istiod's own golden files). Where istiod would drop a value or a rule
//! (a bad IP or port, an unknown `when` key), translation fails with a path-naming error.

use std::net::IpAddr;

use meshwasm_sdk_ext::config::{ConfigError, Path};

use crate::config::{ConditionJson, OperationJson, RuleJson, SourceJson};
use crate::rbac::{
    Cidr, HeaderMatch, MetadataMatch, Permission, Policy, Principal, StringMatch, UriTemplate, ValueMatch,
};

pub const JWT_FILTER: &str = "envoy.filters.http.jwt_authn";
const SPIFFE: &str = "spiffe://";

/// The trust domain and its aliases (istiod's trust-domain bundle), trust domain first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustDomains(pub Vec<String>);

/// Go's `regexp.QuoteMeta`, so regexes are byte-identical to istiod's.
pub fn quote_meta(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn regex(src: String, path: &Path) -> Result<StringMatch, ConfigError> {
    StringMatch::regex(&src).ok_or_else(|| path.err(format!("does not compile to a valid regex: {src:?}")))
}

fn any_regex() -> StringMatch {
    // ".+" always compiles.
    StringMatch::regex(".+").unwrap_or(StringMatch::Prefix(String::new(), false))
}

/// istio `matcher.StringMatcher`: `*` any non-empty, `*x` suffix, `x*` prefix, else exact.
pub fn string_matcher(v: &str) -> StringMatch {
    if v == "*" {
        any_regex()
    } else if let Some(s) = v.strip_prefix('*') {
        StringMatch::Suffix(s.to_string(), false)
    } else if let Some(s) = v.strip_suffix('*') {
        StringMatch::Prefix(s.to_string(), false)
    } else {
        StringMatch::Exact(v.to_string(), false)
    }
}

/// istio `matcher.StringMatcherWithPrefix(v, "spiffe://")` for principals.
fn principal_matcher(v: &str, path: &Path) -> Result<StringMatch, ConfigError> {
    Ok(if v == "*" {
        any_regex()
    } else if let Some(s) = v.strip_prefix('*') {
        regex(format!("{SPIFFE}.*{}", quote_meta(s)), path)?
    } else if let Some(s) = v.strip_suffix('*') {
        StringMatch::Prefix(format!("{SPIFFE}{s}"), false)
    } else {
        StringMatch::Exact(format!("{SPIFFE}{v}"), false)
    })
}

fn header_matcher(name: &str, v: &str, ignore_case: bool) -> HeaderMatch {
    let string = if v == "*" {
        None
    } else if let Some(s) = v.strip_prefix('*') {
        Some(StringMatch::Suffix(s.to_string(), ignore_case))
    } else if let Some(s) = v.strip_suffix('*') {
        Some(StringMatch::Prefix(s.to_string(), ignore_case))
    } else {
        Some(StringMatch::Exact(v.to_string(), ignore_case))
    };
    HeaderMatch { name: name.to_ascii_lowercase(), written: name.to_string(), string }
}

fn cidr(v: &str, path: &Path) -> Result<Cidr, ConfigError> {
    let bad = || path.err(format!("invalid IP address or CIDR range {v:?}"));
    let (addr, len) = match v.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (v, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(bad)?,
    };
    Ok(Cidr { addr, len })
}

fn port(v: &str, path: &Path) -> Result<u32, ConfigError> {
    v.parse::<u32>()
        .ok()
        .filter(|p| *p <= 65535)
        .ok_or_else(|| path.err(format!("invalid port {v:?}: must be a number in 0..=65535")))
}

/// Does a trust-domain pattern (`*` at either end) match trust domain `td`?
fn td_matches(pattern: &str, td: &str) -> bool {
    if pattern == "*" {
        true
    } else if let Some(s) = pattern.strip_prefix('*') {
        td.ends_with(s)
    } else if let Some(s) = pattern.strip_suffix('*') {
        td.starts_with(s)
    } else {
        pattern == td
    }
}

impl TrustDomains {
    /// istiod's trust-domain migration of source principals: a principal whose trust domain
    /// is one of the bundle's is widened to every member of the bundle.
    pub fn expand(&self, principals: &[String]) -> Vec<String> {
        if self.0.len() <= 1 {
            return principals.to_vec();
        }
        let mut out: Vec<String> = Vec::new();
        for p in principals {
            let Some((td, rest)) = p.split_once("/ns/") else {
                out.push(p.clone());
                continue;
            };
            if p == "*" || !self.0.iter().any(|d| td_matches(td, d)) {
                out.push(p.clone());
                continue;
            }
            let mut mine = Vec::new();
            for d in &self.0 {
                let v = if td_matches(td, d) { p.clone() } else { format!("{d}/ns/{rest}") };
                if !mine.contains(&v) {
                    mine.push(v);
                }
            }
            for v in mine {
                if !out.contains(&v) {
                    out.push(v);
                }
            }
        }
        out
    }
}

/// `[a][b]` → `["a", "b"]`.
fn bracketed(s: &str, path: &Path) -> Result<Vec<String>, ConfigError> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let inner = rest
            .strip_prefix('[')
            .and_then(|r| r.split_once(']'))
            .filter(|(name, _)| !name.is_empty() && !name.contains('['))
            .ok_or_else(|| path.err(format!("expected [name] segments, got {s:?}")))?;
        out.push(inner.0.to_string());
        rest = inner.1;
    }
    if out.is_empty() {
        return Err(path.err("needs a name in brackets"));
    }
    Ok(out)
}

fn jwt_claim(claim: &[String], value: ValueMatch) -> MetadataMatch {
    let mut p = vec!["payload".to_string()];
    p.extend(claim.iter().cloned());
    MetadataMatch { filter: JWT_FILTER.into(), path: p, value }
}

/// istio `MetadataListValueMatcherForJWTClaims`: a claim that is a string or a list
/// containing a matching string.
fn jwt_list_claim(claim: &[String], values: &[String]) -> Principal {
    let or = ValueMatch::Or(values.iter().map(|v| ValueMatch::String(string_matcher(v))).collect());
    Principal::Metadata(jwt_claim(claim, ValueMatch::Or(vec![ValueMatch::ListOneOf(Box::new(or.clone())), or])))
}

fn request_principal(values: &[String]) -> Principal {
    let mut or = Vec::new();
    for v in values {
        let (iss, sub, found) = match v.rfind('/') {
            Some(i) => (v.get(..i).unwrap_or(""), v.get(i + 1..).unwrap_or(""), true),
            None => (v.as_str(), "", false),
        };
        let (mi, ms) = if v == "*" {
            (any_regex(), any_regex())
        } else if let Some(stripped) = v.strip_prefix('*') {
            if found {
                let mi = if iss == "*" {
                    any_regex()
                } else {
                    StringMatch::Suffix(iss.trim_start_matches('*').to_string(), false)
                };
                let _ = stripped;
                (mi, StringMatch::Exact(sub.to_string(), false))
            } else {
                (any_regex(), StringMatch::Suffix(stripped.to_string(), false))
            }
        } else if let Some(stripped) = v.strip_suffix('*') {
            if found {
                let ms = if sub == "*" {
                    any_regex()
                } else {
                    StringMatch::Prefix(sub.trim_end_matches('*').to_string(), false)
                };
                (StringMatch::Exact(iss.to_string(), false), ms)
            } else {
                (StringMatch::Prefix(stripped.to_string(), false), any_regex())
            }
        } else {
            (StringMatch::Exact(iss.to_string(), false), StringMatch::Exact(sub.to_string(), false))
        };
        or.push(Principal::And(vec![
            Principal::Metadata(jwt_claim(&["iss".into()], ValueMatch::String(mi))),
            Principal::Metadata(jwt_claim(&["sub".into()], ValueMatch::String(ms))),
        ]));
    }
    if or.len() == 1 {
        or.pop().unwrap_or(Principal::Any)
    } else {
        Principal::Or(or)
    }
}

/// One field or condition of a rule, before generation: istiod's `rule` (key, values,
/// notValues, generator).
enum Field {
    Permission(Vec<Permission>, Vec<Permission>),
    Principal(Vec<Principal>, Vec<Principal>),
    /// istiod's "extended" generators: one matcher for all values (not an OR of one each).
    ExtendedPrincipal(Option<Principal>, Option<Principal>),
    ExtendedPermission(Option<Permission>, Option<Permission>),
}

fn values_of<T>(
    values: &[String],
    path: &Path,
    mut f: impl FnMut(&str, &Path) -> Result<T, ConfigError>,
) -> Result<Vec<T>, ConfigError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let p = path.index(i);
            if v.is_empty() {
                return Err(p.err("must not be empty"));
            }
            f(v, &p)
        })
        .collect()
}

/// What a translation needs besides the rule: the policy's namespace (service accounts
/// default to it) and the trust-domain bundle.
pub struct Context<'a> {
    pub namespace: &'a str,
    pub trust_domains: &'a TrustDomains,
    /// CUSTOM rules run before JWT validation: request-auth attributes are refused there.
    pub custom: bool,
}

impl Context<'_> {
    fn src_principals(&self, values: &[String], path: &Path) -> Result<Vec<Principal>, ConfigError> {
        let expanded = self.trust_domains.expand(values);
        // Check the written values (so errors name them), generate from the expansion.
        values_of(values, path, |_, _| Ok(()))?;
        expanded.iter().map(|v| principal_matcher(v, path).map(Principal::Authenticated)).collect()
    }

    fn condition(&self, c: &ConditionJson, path: &Path) -> Result<Field, ConfigError> {
        if c.values.is_empty() && c.not_values.is_empty() {
            return Err(path.err("needs values or notValues"));
        }
        let k = c.key.as_str();
        let vp = path.field("values");
        let np = path.field("notValues");
        let auth_refused = |what: &str| {
            path.field("key")
                .err(format!("{what} cannot be used in a CUSTOM policy: CUSTOM runs before JWT validation"))
        };
        let perm = |f: &dyn Fn(&str, &Path) -> Result<Permission, ConfigError>| -> Result<Field, ConfigError> {
            Ok(Field::Permission(values_of(&c.values, &vp, f)?, values_of(&c.not_values, &np, f)?))
        };
        let princ = |f: &dyn Fn(&str, &Path) -> Result<Principal, ConfigError>| -> Result<Field, ConfigError> {
            Ok(Field::Principal(values_of(&c.values, &vp, f)?, values_of(&c.not_values, &np, f)?))
        };
        match k {
            "destination.ip" => perm(&|v, p| cidr(v, p).map(Permission::DestinationIp)),
            "destination.port" => perm(&|v, p| port(v, p).map(Permission::DestinationPort)),
            "connection.sni" => perm(&|v, _| Ok(Permission::RequestedServerName(string_matcher(v)))),
            "source.ip" => princ(&|v, p| cidr(v, p).map(Principal::DirectRemoteIp)),
            "remote.ip" => princ(&|v, p| cidr(v, p).map(Principal::RemoteIp)),
            "source.namespace" => princ(&|v, p| namespace(v, p)),
            "source.serviceAccount" => princ(&|v, p| self.service_account(v, p)),
            "source.principal" => {
                Ok(Field::Principal(self.src_principals(&c.values, &vp)?, self.src_principals(&c.not_values, &np)?))
            }
            "request.auth.principal" | "request.auth.audiences" | "request.auth.presenter" if self.custom => {
                Err(auth_refused(k))
            }
            "request.auth.principal" => {
                values_of(&c.values, &vp, |_, _| Ok(()))?;
                values_of(&c.not_values, &np, |_, _| Ok(()))?;
                Ok(extended(&c.values, &c.not_values, request_principal))
            }
            "request.auth.audiences" | "request.auth.presenter" => {
                values_of(&c.values, &vp, |_, _| Ok(()))?;
                values_of(&c.not_values, &np, |_, _| Ok(()))?;
                let claim = if k == "request.auth.audiences" { "aud" } else { "azp" };
                Ok(extended(&c.values, &c.not_values, |vs| jwt_list_claim(&[claim.to_string()], vs)))
            }
            _ if k.starts_with("request.auth.claims") => {
                if self.custom {
                    return Err(auth_refused("request.auth.claims"));
                }
                let claims = bracketed(k.trim_start_matches("request.auth.claims"), &path.field("key"))?;
                values_of(&c.values, &vp, |_, _| Ok(()))?;
                values_of(&c.not_values, &np, |_, _| Ok(()))?;
                Ok(extended(&c.values, &c.not_values, |vs| jwt_list_claim(&claims, vs)))
            }
            _ if k.starts_with("request.headers") => {
                let names = bracketed(k.trim_start_matches("request.headers"), &path.field("key"))?;
                let [name] = names.as_slice() else {
                    return Err(path.field("key").err(format!("expected request.headers[<name>], got {k:?}")));
                };
                princ(&|v, _| Ok(Principal::Header(header_matcher(name, v, false))))
            }
            _ if k.starts_with("experimental.envoy.filters.") => {
                // `experimental.envoy.filters.a.b[c]`: dynamic metadata of filter `a.b`, key `c`.
                let rest = k.trim_start_matches("experimental.").trim_end_matches(']');
                let Some((filter, key)) = rest.split_once('[').filter(|(f, k)| !f.is_empty() && !k.is_empty()) else {
                    return Err(path
                        .field("key")
                        .err(format!("expected experimental.envoy.filters.<filter>[<key>], got {k:?}")));
                };
                values_of(&c.values, &vp, |_, _| Ok(()))?;
                values_of(&c.not_values, &np, |_, _| Ok(()))?;
                let m = |vs: &[String]| {
                    let or = vs
                        .iter()
                        .map(|v| match v.strip_prefix('[').and_then(|x| x.strip_suffix(']')) {
                            Some(inner) => ValueMatch::ListOneOf(Box::new(ValueMatch::String(string_matcher(inner)))),
                            None => ValueMatch::String(string_matcher(v)),
                        })
                        .collect();
                    Permission::Metadata(MetadataMatch {
                        filter: filter.to_string(),
                        path: vec![key.to_string()],
                        value: ValueMatch::Or(or),
                    })
                };
                Ok(Field::ExtendedPermission(
                    (!c.values.is_empty()).then(|| m(&c.values)),
                    (!c.not_values.is_empty()).then(|| m(&c.not_values)),
                ))
            }
            _ => Err(path.field("key").err(format!("unknown attribute {k:?} (istiod would drop this rule)"))),
        }
    }

    fn service_account(&self, v: &str, path: &Path) -> Result<Principal, ConfigError> {
        let (ns, sa) = v.split_once('/').unwrap_or((self.namespace, v));
        if ns.is_empty() || sa.is_empty() || sa.contains('/') {
            return Err(path.err(format!("must be <name> or <namespace>/<name>, got {v:?}")));
        }
        let src = format!("{SPIFFE}.+/ns/{}/(.+/|)sa/{}(/.+)?", quote_meta(ns), quote_meta(sa));
        regex(src, path).map(Principal::Authenticated)
    }

    fn source(&self, s: &SourceJson, base: &[Field], path: &Path) -> Result<Principal, ConfigError> {
        let mut fields: Vec<Field> = Vec::new();
        let pf = |name: &str| path.field(name);
        let both = |vals: &[String],
                    nots: &[String],
                    a: &str,
                    b: &str,
                    f: &dyn Fn(&str, &Path) -> Result<Principal, ConfigError>|
         -> Result<Option<Field>, ConfigError> {
            if vals.is_empty() && nots.is_empty() {
                return Ok(None);
            }
            Ok(Some(Field::Principal(values_of(vals, &pf(a), f)?, values_of(nots, &pf(b), f)?)))
        };
        if !s.principals.is_empty() || !s.not_principals.is_empty() {
            fields.push(Field::Principal(
                self.src_principals(&s.principals, &pf("principals"))?,
                self.src_principals(&s.not_principals, &pf("notPrincipals"))?,
            ));
        }
        if !s.request_principals.is_empty() || !s.not_request_principals.is_empty() {
            if self.custom {
                return Err(
                    pf("requestPrincipals").err("cannot be used in a CUSTOM policy: CUSTOM runs before JWT validation")
                );
            }
            values_of(&s.request_principals, &pf("requestPrincipals"), |_, _| Ok(()))?;
            values_of(&s.not_request_principals, &pf("notRequestPrincipals"), |_, _| Ok(()))?;
            fields.push(extended(&s.request_principals, &s.not_request_principals, request_principal));
        }
        fields.extend(both(
            &s.service_accounts,
            &s.not_service_accounts,
            "serviceAccounts",
            "notServiceAccounts",
            &|v, p| self.service_account(v, p),
        )?);
        fields.extend(both(&s.trust_domains, &s.not_trust_domains, "trustDomains", "notTrustDomains", &|v, p| {
            trust_domain(v, p)
        })?);
        fields.extend(both(&s.namespaces, &s.not_namespaces, "namespaces", "notNamespaces", &namespace)?);
        fields.extend(both(
            &s.remote_ip_blocks,
            &s.not_remote_ip_blocks,
            "remoteIpBlocks",
            "notRemoteIpBlocks",
            &|v, p| cidr(v, p).map(Principal::RemoteIp),
        )?);
        fields.extend(both(&s.ip_blocks, &s.not_ip_blocks, "ipBlocks", "notIpBlocks", &|v, p| {
            cidr(v, p).map(Principal::DirectRemoteIp)
        })?);
        Ok(principal_of(fields.iter().chain(base.iter())))
    }

    fn operation(&self, o: &OperationJson, base: &[Field], path: &Path) -> Result<Permission, ConfigError> {
        let mut fields = Vec::new();
        let mut add = |vals: &[String],
                       nots: &[String],
                       a: &str,
                       b: &str,
                       f: &dyn Fn(&str, &Path) -> Result<Permission, ConfigError>|
         -> Result<(), ConfigError> {
            if vals.is_empty() && nots.is_empty() {
                return Ok(());
            }
            fields.push(Field::Permission(values_of(vals, &path.field(a), f)?, values_of(nots, &path.field(b), f)?));
            Ok(())
        };
        add(&o.hosts, &o.not_hosts, "hosts", "notHosts", &|v, _| {
            Ok(Permission::Header(header_matcher(":authority", v, true)))
        })?;
        add(&o.methods, &o.not_methods, "methods", "notMethods", &|v, _| {
            Ok(Permission::Header(header_matcher(":method", v, false)))
        })?;
        add(&o.paths, &o.not_paths, "paths", "notPaths", &path_permission)?;
        add(&o.ports, &o.not_ports, "ports", "notPorts", &|v, p| port(v, p).map(Permission::DestinationPort))?;
        Ok(permission_of(fields.iter().chain(base.iter())))
    }

    /// One AuthorizationPolicy rule → one RBAC policy (istiod's `Model.Generate`).
    pub fn rule(&self, r: &RuleJson, path: &Path) -> Result<Policy, ConfigError> {
        let mut base_perm = Vec::new();
        let mut base_princ = Vec::new();
        for (i, c) in r.when.iter().enumerate() {
            match self.condition(c, &path.field("when").index(i))? {
                f @ (Field::Permission(..) | Field::ExtendedPermission(..)) => base_perm.push(f),
                f => base_princ.push(f),
            }
        }
        let mut principals = Vec::new();
        for (i, f) in r.from.iter().enumerate() {
            let p = path.field("from").index(i).field("source");
            principals.push(match &f.source {
                Some(s) => self.source(s, &base_princ, &p)?,
                None => principal_of(base_princ.iter()),
            });
        }
        if r.from.is_empty() {
            principals.push(principal_of(base_princ.iter()));
        }
        let mut permissions = Vec::new();
        for (i, t) in r.to.iter().enumerate() {
            let p = path.field("to").index(i).field("operation");
            permissions.push(match &t.operation {
                Some(o) => self.operation(o, &base_perm, &p)?,
                None => permission_of(base_perm.iter()),
            });
        }
        if r.to.is_empty() {
            permissions.push(permission_of(base_perm.iter()));
        }
        Ok(Policy { permissions, principals })
    }
}

fn extended(values: &[String], nots: &[String], f: impl Fn(&[String]) -> Principal) -> Field {
    Field::ExtendedPrincipal((!values.is_empty()).then(|| f(values)), (!nots.is_empty()).then(|| f(nots)))
}

fn namespace(v: &str, path: &Path) -> Result<Principal, ConfigError> {
    let src = format!(".*/ns/{}/.*", quote_meta(v).replace("\\*", ".*"));
    regex(src, path).map(Principal::Authenticated)
}

fn trust_domain(v: &str, path: &Path) -> Result<Principal, ConfigError> {
    if v.contains('*') {
        let src = format!("{SPIFFE}{}/.*", quote_meta(v).replace("\\*", "[^/]*"));
        regex(src, path).map(Principal::Authenticated)
    } else {
        Ok(Principal::Authenticated(StringMatch::Prefix(format!("{SPIFFE}{v}/"), false)))
    }
}

fn path_permission(v: &str, path: &Path) -> Result<Permission, ConfigError> {
    if v.contains('{') || v.contains('}') {
        let mut segs = Vec::new();
        let n = v.split('/').count();
        for (i, seg) in v.split('/').enumerate() {
            segs.push(match seg {
                "{*}" => "*",
                "{**}" => "**",
                s if s.contains('{') || s.contains('}') || s.contains('*') => {
                    return Err(
                        path.err(format!("invalid path template {v:?}: `{{*}}` and `{{**}}` must be whole segments"))
                    )
                }
                s => s,
            });
            let _ = (i, n);
        }
        if !v.starts_with('/') {
            return Err(path.err(format!("invalid path template {v:?}: must start with '/'")));
        }
        return Ok(Permission::UriTemplate(UriTemplate::new(&segs.join("/"))));
    }
    Ok(Permission::UrlPath(string_matcher(v)))
}

fn permission_of<'a>(fields: impl Iterator<Item = &'a Field>) -> Permission {
    let mut and = Vec::new();
    for f in fields {
        match f {
            Field::Permission(vals, nots) => {
                if !vals.is_empty() {
                    and.push(Permission::Or(vals.clone()));
                }
                if !nots.is_empty() {
                    and.push(Permission::Not(Box::new(Permission::Or(nots.clone()))));
                }
            }
            Field::ExtendedPermission(vals, nots) => {
                if let Some(v) = vals {
                    and.push(v.clone());
                }
                if let Some(n) = nots {
                    and.push(Permission::Not(Box::new(n.clone())));
                }
            }
            _ => {}
        }
    }
    if and.is_empty() {
        and.push(Permission::Any);
    }
    Permission::And(and)
}

fn principal_of<'a>(fields: impl Iterator<Item = &'a Field>) -> Principal {
    let mut and = Vec::new();
    for f in fields {
        match f {
            Field::Principal(vals, nots) => {
                if !vals.is_empty() {
                    and.push(Principal::Or(vals.clone()));
                }
                if !nots.is_empty() {
                    and.push(Principal::Not(Box::new(Principal::Or(nots.clone()))));
                }
            }
            Field::ExtendedPrincipal(vals, nots) => {
                if let Some(v) = vals {
                    and.push(v.clone());
                }
                if let Some(n) = nots {
                    and.push(Principal::Not(Box::new(n.clone())));
                }
            }
            Field::Permission(..) | Field::ExtendedPermission(..) => {}
        }
    }
    if and.is_empty() {
        and.push(Principal::Any);
    }
    Principal::And(and)
}

/// The placeholder istiod emits for a policy without rules: matches nothing.
pub fn match_nothing() -> Policy {
    Policy {
        permissions: vec![Permission::Not(Box::new(Permission::Any))],
        principals: vec![Principal::Not(Box::new(Principal::Any))],
    }
}
