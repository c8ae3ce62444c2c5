//! meshwasm authz: Istio AuthorizationPolicy (ALLOW / DENY / AUDIT / CUSTOM) with istiod's
//! translation and Envoy RBAC's matching, as a Proxy-Wasm filter.
//!
//! `config` (Istio resources as JSON) → `istio` (istiod's translation into RBAC trees) →
//! `rbac` (Envoy's matchers) → `policy` (the filter chain istiod emits, as pure decisions)
//! → `filter` (host effects); `x509` reads the peer certificate's SANs.

pub mod config;
pub mod extauthz;
pub mod istio;
pub mod policy;
pub mod rbac;

#[cfg(test)]
mod golden;
