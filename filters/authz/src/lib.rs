//! meshwasm authz: Istio AuthorizationPolicy (ALLOW / DENY / AUDIT / CUSTOM) with istiod's
//! translation and Envoy RBAC's matching, as a Proxy-Wasm filter.
//!
//! `config` (Istio resources as JSON) → `istio` (istiod's translation into RBAC trees) →
//! `rbac` (Envoy's matchers) → `policy` (the filter chain istiod emits, as pure decisions)
//! → `filter` (host effects); `x509` reads the peer certificate's SANs; `authn` (RequestAuthentication,
//! `jwt_authn` as istiod configures it) with `jwt` (token parsing) and `jwks` (keys, signatures).

pub mod authn;
pub mod config;
pub mod extauthz;
pub mod filter;
pub mod istio;
pub mod jwks;
pub mod jwt;
pub mod policy;
pub mod rbac;
pub mod re;
pub mod remote;
pub mod sort;
pub mod x509;

#[cfg(test)]
mod golden;

pub use filter::{AuthzFilter, AuthzPlugin};

// Request phase (the decisions, the callout) and response headers (headers the authorizer
// adds to the response); no response body callback.
#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)] // the ABI exports are #[no_mangle]
mod entry {
    meshwasm_sdk_ext::export_http_filter!(crate::AuthzPlugin, request, response_headers);
}
