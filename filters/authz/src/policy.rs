//! The validated configuration (istiod's filter chain as data) and the pure decisions:
//! which CUSTOM policy sends a request to its authorizer, then AUDIT, DENY and ALLOW with
//! their dry-run (shadow) twins, in the order istiod emits the filters.

use meshwasm_sdk_ext::config::{parse_json, ConfigError, Path};
use meshwasm_sdk_ext::metrics::sanitize_label;

use crate::config::{direct_address, Action, AuthzConfigJson, DirectAddress, PolicySpecJson, Provider, ResourceJson};
use crate::istio::{match_nothing, Context, TrustDomains};
use crate::rbac::{Attributes, Policy};

/// One RBAC policy: a rule of an AuthorizationPolicy, named as istiod names it.
#[derive(Debug, Clone)]
pub struct NamedPolicy {
    /// `ns[<namespace>]-policy[<name>]-rule[<i>]` (CUSTOM: `istio-ext-authz-<provider>-…`):
    /// the name Envoy's RBAC reports in response code details.
    pub id: String,
    /// `<namespace>/<name>`, for logs.
    pub resource: String,
    /// The stats label (`<namespace>.<name>`, sanitized).
    pub label: String,
    pub policy: Policy,
}

#[derive(Debug, Clone, Default)]
pub struct Config {
    /// CUSTOM policies (all of one provider), sorted by id.
    pub custom: Vec<NamedPolicy>,
    pub provider: Option<Provider>,
    pub audit: Vec<NamedPolicy>,
    pub deny: Vec<NamedPolicy>,
    pub shadow_deny: Vec<NamedPolicy>,
    pub allow: Vec<NamedPolicy>,
    pub shadow_allow: Vec<NamedPolicy>,
    /// Some enforced ALLOW policy exists (even one without rules): a request no ALLOW policy
    /// matches is denied.
    pub allow_present: bool,
    pub shadow_allow_present: bool,
    pub direct_address: Option<DirectAddress>,
    /// Some policy matches on peer identities (so the certificate is read).
    pub needs_peer: bool,
    /// Every stats label, once.
    pub labels: Vec<String>,
    /// RequestAuthentication (`jwt_authn` as istiod configures it); empty: the policies read
    /// the metadata of a native `jwt_authn` filter instead, if one runs before this one.
    pub authn: crate::authn::Authn,
}

const API_VERSIONS: [&str; 3] = ["security.istio.io/v1", "security.istio.io/v1beta1", "security.istio.io/v1alpha1"];

fn action(spec: &PolicySpecJson, path: &Path) -> Result<Action, ConfigError> {
    match spec.action.as_deref() {
        None | Some("ALLOW") => Ok(Action::Allow),
        Some("DENY") => Ok(Action::Deny),
        Some("AUDIT") => Ok(Action::Audit),
        Some("CUSTOM") => Ok(Action::Custom),
        Some(o) => Err(path.err(format!("must be ALLOW, DENY, AUDIT or CUSTOM, got {o:?}"))),
    }
}

fn dry_run(r: &ResourceJson<PolicySpecJson>, path: &Path) -> Result<bool, ConfigError> {
    match r.metadata.annotations.get("istio.io/dry-run").map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(o) => Err(path.key("istio.io/dry-run").err(format!("must be \"true\" or \"false\", got {o:?}"))),
    }
}

impl TryFrom<AuthzConfigJson> for Config {
    type Error = ConfigError;

    fn try_from(raw: AuthzConfigJson) -> Result<Self, ConfigError> {
        let root = Path::root();
        let authn = crate::authn::Authn::parse(&raw.authentication, &raw.jwks, &root)?;
        let td = raw.trust_domain.clone().unwrap_or_else(|| "cluster.local".into());
        if td.is_empty() {
            return Err(root.field("trustDomain").err("must not be empty"));
        }
        let mut bundle = vec![td];
        for (i, a) in raw.trust_domain_aliases.iter().enumerate() {
            if a.is_empty() {
                return Err(root.field("trustDomainAliases").index(i).err("must not be empty"));
            }
            if !bundle.contains(a) {
                bundle.push(a.clone());
            }
        }
        let bundle = TrustDomains(bundle);

        let mut providers = Vec::new();
        for (i, p) in raw.extension_providers.iter().enumerate() {
            let path = root.field("extensionProviders").index(i);
            let parsed = Provider::parse(p, &path)?;
            if providers.iter().any(|q: &Provider| q.name == parsed.name) {
                return Err(path.field("name").err(format!("duplicate provider name {:?}", parsed.name)));
            }
            providers.push(parsed);
        }

        let mut cfg = Config { direct_address: None, authn, ..Config::default() };
        // Vectors, not hash sets: configuration-sized, and no hash table code for these types
        // in the module.
        let mut seen_resources: Vec<(String, String)> = Vec::new();
        let mut labels: Vec<String> = Vec::new();
        for (i, r) in raw.policies.iter().enumerate() {
            let path = root.field("policies").index(i);
            if !API_VERSIONS.contains(&r.api_version.as_str()) {
                return Err(path
                    .field("apiVersion")
                    .err(format!("must be security.istio.io/v1 (or v1beta1), got {:?}", r.api_version)));
            }
            if r.kind != "AuthorizationPolicy" {
                return Err(path.field("kind").err(format!("must be AuthorizationPolicy, got {:?}", r.kind)));
            }
            let name = &r.metadata.name;
            if name.is_empty() {
                return Err(path.field("metadata").field("name").err("must not be empty"));
            }
            let ns = r.metadata.namespace.clone().unwrap_or_else(|| "default".into());
            let resource = (ns.clone(), name.clone());
            if seen_resources.contains(&resource) {
                return Err(path.field("metadata").err(format!("duplicate policy {ns}/{name}")));
            }
            seen_resources.push(resource);
            let label = sanitize_label(&format!("{ns}.{name}"));
            if labels.contains(&label) {
                return Err(path
                    .field("metadata")
                    .err(format!("policy {ns}/{name} has the same stats label {label:?} as another policy")));
            }
            labels.push(label.clone());
            let spec_path = path.field("spec");
            let action = action(&r.spec, &spec_path.field("action"))?;
            let dry = dry_run(r, &path.field("metadata").field("annotations"))?;
            let provider = match (&r.spec.provider, action) {
                (Some(p), Action::Custom) => Some(p.name.clone()),
                (None, Action::Custom) => {
                    return Err(spec_path.field("provider").err("is required with action CUSTOM"));
                }
                (Some(_), _) => {
                    return Err(spec_path.field("provider").err("is only allowed with action CUSTOM"));
                }
                (None, _) => None,
            };
            let rules = r.spec.rules.clone().unwrap_or_default();
            if rules.is_empty() && matches!(action, Action::Deny | Action::Custom) {
                return Err(spec_path.field("rules").err(format!(
                    "a {} policy without rules matches nothing (istiod ignores it); add rules or remove the policy",
                    action.as_str()
                )));
            }
            if dry && action == Action::Custom {
                return Err(path
                    .field("metadata")
                    .field("annotations")
                    .key("istio.io/dry-run")
                    .err("dry-run is not supported for CUSTOM policies (as in Istio)"));
            }
            let ctx = Context { namespace: &ns, trust_domains: &bundle, custom: action == Action::Custom };
            let prefix = match &provider {
                Some(p) => format!("istio-ext-authz-{p}-"),
                None => String::new(),
            };
            let mut compiled = Vec::new();
            for (j, rule) in rules.iter().enumerate() {
                let policy = ctx.rule(rule, &spec_path.field("rules").index(j))?;
                compiled.push(NamedPolicy {
                    id: format!("{prefix}ns[{ns}]-policy[{name}]-rule[{j}]"),
                    resource: format!("{ns}/{name}"),
                    label: label.clone(),
                    policy,
                });
            }
            if compiled.is_empty() {
                // istiod's placeholder for a policy without rules: it matches nothing, but an
                // ALLOW one still makes unmatched requests denied.
                compiled.push(NamedPolicy {
                    id: format!("ns[{ns}]-policy[{name}]-rule[0]"),
                    resource: format!("{ns}/{name}"),
                    label: label.clone(),
                    policy: match_nothing(),
                });
            }
            cfg.labels.push(label);
            match (action, dry) {
                (Action::Custom, _) => {
                    let pname = provider.unwrap_or_default();
                    let Some(p) = providers.iter().find(|p| p.name == pname) else {
                        return Err(spec_path
                            .field("provider")
                            .field("name")
                            .err(format!("unknown provider {pname:?}: not in extensionProviders")));
                    };
                    if let Some(existing) = &cfg.provider {
                        if existing.name != p.name {
                            return Err(spec_path.field("provider").field("name").err(format!(
                                "CUSTOM policies use providers {:?} and {:?}: only one provider per workload is supported (as in Istio)",
                                existing.name, p.name
                            )));
                        }
                    }
                    cfg.provider = Some(p.clone());
                    cfg.custom.extend(compiled);
                }
                (Action::Audit, _) => cfg.audit.extend(compiled),
                (Action::Deny, false) => cfg.deny.extend(compiled),
                (Action::Deny, true) => cfg.shadow_deny.extend(compiled),
                (Action::Allow, false) => {
                    cfg.allow_present = true;
                    cfg.allow.extend(compiled);
                }
                (Action::Allow, true) => {
                    cfg.shadow_allow_present = true;
                    cfg.shadow_allow.extend(compiled);
                }
            }
        }
        for list in [
            &mut cfg.custom,
            &mut cfg.audit,
            &mut cfg.deny,
            &mut cfg.shadow_deny,
            &mut cfg.allow,
            &mut cfg.shadow_allow,
        ] {
            // Envoy keeps RBAC policies in a map ordered by name: the first matching name is
            // the one reported.
            crate::sort::sort_by(list, |a, b| a.id.cmp(&b.id));
        }
        let uses_direct = |ps: &[NamedPolicy]| ps.iter().any(|p| p.policy.uses_direct_ip());
        let all = [&cfg.custom, &cfg.audit, &cfg.deny, &cfg.shadow_deny, &cfg.allow, &cfg.shadow_allow];
        if all.iter().any(|l| uses_direct(l)) {
            cfg.direct_address =
                Some(direct_address(raw.direct_remote_address.as_deref(), &root.field("directRemoteAddress"))?);
        } else {
            direct_address(raw.direct_remote_address.as_deref(), &root.field("directRemoteAddress"))?;
        }
        cfg.needs_peer = all.iter().any(|l| l.iter().any(|p| p.policy.needs_peer()));
        Ok(cfg)
    }
}

pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
    Config::try_from(AuthzConfigJson::read(&parse_json(bytes)?, &Path::root())?)
}

/// The first policy (in Envoy's name order) that matches.
fn first<'a>(list: &'a [NamedPolicy], a: &mut dyn Attributes) -> Option<&'a NamedPolicy> {
    list.iter().find(|p| p.policy.matches(a))
}

/// The CUSTOM policy that sends this request to the authorizer, if any.
pub fn custom<'a>(cfg: &'a Config, a: &mut dyn Attributes) -> Option<&'a NamedPolicy> {
    first(&cfg.custom, a)
}

/// A shadow (dry-run) engine's result: would it allow, and which policy decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shadow<'a> {
    pub allowed: bool,
    pub policy: Option<&'a NamedPolicy>,
}

/// The outcome of AUDIT, DENY and ALLOW for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict<'a> {
    pub allowed: bool,
    /// The policy that allowed or denied (`None`: no policy applied, or denied because no
    /// ALLOW policy matched).
    pub policy: Option<&'a NamedPolicy>,
    pub audited: Option<&'a NamedPolicy>,
    pub shadow_deny: Option<Shadow<'a>>,
    pub shadow_allow: Option<Shadow<'a>>,
}

impl PartialEq for NamedPolicy {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}
impl Eq for NamedPolicy {}

/// AUDIT, then the DENY filter (shadow, then enforced), then the ALLOW filter (shadow, then
/// enforced), as istiod orders them; a denial stops the chain, as it does in Envoy.
pub fn decide<'a>(cfg: &'a Config, a: &mut dyn Attributes) -> Verdict<'a> {
    let audited = first(&cfg.audit, a);
    let shadow_deny = (!cfg.shadow_deny.is_empty()).then(|| {
        let p = first(&cfg.shadow_deny, a);
        Shadow { allowed: p.is_none(), policy: p }
    });
    if let Some(p) = first(&cfg.deny, a) {
        return Verdict { allowed: false, policy: Some(p), audited, shadow_deny, shadow_allow: None };
    }
    let shadow_allow = cfg.shadow_allow_present.then(|| {
        let p = first(&cfg.shadow_allow, a);
        Shadow { allowed: p.is_some(), policy: p }
    });
    if !cfg.allow_present {
        return Verdict { allowed: true, policy: None, audited, shadow_deny, shadow_allow };
    }
    let p = first(&cfg.allow, a);
    Verdict { allowed: p.is_some(), policy: p, audited, shadow_deny, shadow_allow }
}
