//! meshwasm retry: Istio `HTTPRetry` and `timeout` decided per request and handed to Envoy's
//! router as `x-envoy-*` request headers, with retry budgets shared by all workers, an
//! idempotency guard and deadline propagation.
//!
//! `config` (JSON → validated config) → `policy` (pure decisions) and `budget` (the window
//! in shared data) → `filter` (host effects).

pub mod budget;
pub mod config;
pub mod filter;
pub mod policy;

pub use filter::{RetryFilter, RetryPlugin};

// The request phase only: the router does the retrying, and the log phase (proxy_on_log)
// reads the attempt count.
#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)] // the ABI exports are #[no_mangle]
mod entry {
    meshwasm_sdk_ext::export_http_filter!(crate::RetryPlugin, request);
}
