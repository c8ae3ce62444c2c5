//! meshwasm fault: Istio `HTTPFaultInjection` (delay, abort, by percentage and match) and
//! Envoy's header-controlled faults, with the semantics of `envoy.filters.http.fault`.
//!
//! `config` (JSON → validated config) → `policy` (pure decisions) → `filter` (host effects).

pub mod config;
pub mod filter;
pub mod policy;

pub use filter::{FaultFilter, FaultPlugin};

// The fault filter acts on the request only: no response callbacks are exported, so Envoy
// does not cross into the VM for response headers, bodies or trailers.
#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)] // the ABI exports are #[no_mangle]
mod entry {
    meshwasm_sdk_ext::export_http_filter!(crate::FaultPlugin, request);
}
