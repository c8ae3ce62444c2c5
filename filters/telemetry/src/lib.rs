//! meshwasm telemetry: Istio's standard metrics (`istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes`, `istio_response_bytes`, the
//! gRPC message counters, and as a network filter the four TCP metrics) with
//! every label Istio derives, peer metadata exchange over Istio's headers, and the Telemetry
//! API's metric overrides.
//!
//! `config` (Telemetry spec → validated config) → `expr` (tag override expressions) →
//! `peer` (node metadata, workload identity, the exchange headers) → `labels` (the 25 labels,
//! as Istio derives them) → `filter` (host effects: headers, properties, stats).
//! Access logs (`accesslog`) and tracing (`trace`) hang off the filter's request and log
//! phases; `export` batches their records and spans to collectors from the root context;
//! `observe` holds what both share (`extensionProviders`, modes).

pub mod accesslog;
pub mod base64;
pub mod config;
pub mod export;
pub mod expr;
pub mod filter;
pub mod labels;
pub mod observe;
pub mod peer;
pub mod tcp;
pub mod trace;

pub use filter::{TelemetryFilter, TelemetryPlugin};

// Request headers (peer metadata in, Host, content type), response headers (peer metadata
// out/in) and the end of the stream (the final attributes).
#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)] // the ABI exports are #[no_mangle]
mod entry {
    meshwasm_sdk_ext::export_http_filter!(crate::TelemetryPlugin, request, response_headers);
    // Also a network filter (TCP metrics, `tcp::TelemetryConnection`).
    meshwasm_sdk_ext::export_network_filter!(crate::TelemetryPlugin);
}
