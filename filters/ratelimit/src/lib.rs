//! meshwasm ratelimit: local token buckets shared across Envoy workers (exact, through
//! shared-data compare-and-swap), quotas, and global limits through Envoy's rate-limit
//! service protocol, with the replies, headers and stats of Envoy's `local_ratelimit`.
//!
//! `config` (JSON → validated config) → `bucket` / `policy` (pure decisions) → `slots`
//! (buckets in shared data) and `filter` (host effects); `rls` is the service protocol.

pub mod bucket;
pub mod config;
pub mod filter;
pub mod policy;
pub mod rls;
pub mod slots;

pub use filter::{RateLimitFilter, RateLimitPlugin};

// Request phase (the decision) and response headers (the rate-limit headers); no response
// body callback, so Envoy does not cross into the VM for body chunks.
#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)] // the ABI exports are #[no_mangle]
mod entry {
    meshwasm_sdk_ext::export_http_filter!(crate::RateLimitPlugin, request, response_headers);
}
