//! istiod's authorization builder corpus (`../shared/istio/authz-golden/`, read at run time),
//! for the differential tests that drive native RBAC / ext_authz and `authz.wasm` with it.

use std::path::PathBuf;

use serde_json::Value;

/// The corpus directory.
pub fn golden_dir() -> PathBuf {
    crate::workspace_root().join("../shared/istio/authz-golden")
}

/// The non-empty YAML documents of corpus file `name`, as JSON.
pub fn yaml_docs(name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(golden_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    serde_yaml_ng::Deserializer::from_str(&text)
        .filter_map(|d| {
            let v: serde_yaml_ng::Value = serde::Deserialize::deserialize(d).unwrap();
            (!v.is_null()).then(|| serde_json::to_value(v).unwrap())
        })
        .collect()
}

/// `cases.json`: the cases with their inputs, providers and trust domains.
pub fn cases_index() -> Value {
    let path = golden_dir().join("cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
