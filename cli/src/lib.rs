//! The `meshwasm` command's library: what the binary does, callable from tests and tools.
//!
//! - [`filters`]: the filter table (check a configuration with the module's own parser;
//!   where each filter goes in Istio)
//! - [`oci`]: Wasm OCI images (compat and artifact variants), reproducible; push
//! - [`wasmplugin`]: Istio `WasmPlugin` manifests
//! - [`istio`]: Istio resources → plugin JSON and route metadata (`from-istio`)
//! - [`schema`]: Istio resources against their CRDs' OpenAPI v3 schemas (`validate`)

pub mod filters;
pub mod istio;
pub mod oci;
pub mod schema;
pub mod wasmplugin;
