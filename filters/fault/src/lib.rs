//! meshwasm fault: Istio `HTTPFaultInjection` (delay, abort, by percentage and match) and
//! Envoy's header-controlled faults, with the semantics of `envoy.filters.http.fault`.
//!
//! `config` (JSON → validated config) → `policy` (pure decisions) → `filter` (host effects).

pub mod config;
pub mod filter;
pub mod policy;

pub use filter::{FaultFilter, FaultPlugin};

#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)] // `proxy_wasm::main!` exports `_initialize` with #[no_mangle].
mod entry {
    proxy_wasm::main! {{
        meshwasm_sdk_ext::wasm::start::<crate::FaultPlugin>();
    }}
}
