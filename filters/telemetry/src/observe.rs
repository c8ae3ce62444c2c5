//! The parts of access logging and tracing shared by both: MeshConfig `extensionProviders`
//! (by name), and what one stream hands the log phase.

use std::collections::BTreeMap;

use serde_json::Value;

use meshwasm_sdk_ext::config::Path;
use meshwasm_sdk_ext::ConfigError;

/// `extensionProviders` by name, each with its JSON path (providers are typed where they are
/// used, so an error names the entry).
pub fn providers(v: Option<&Value>, base: &Path) -> Result<BTreeMap<String, (Path, Value)>, ConfigError> {
    let mut out = BTreeMap::new();
    let list = match v {
        None | Some(Value::Null) => return Ok(out),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(base.field("extensionProviders").err("must be a list")),
    };
    for (i, p) in list.iter().enumerate() {
        let path = base.field("extensionProviders").index(i);
        let Some(obj) = p.as_object() else { return Err(path.err("must be an object")) };
        let Some(name) = obj.get("name").and_then(Value::as_str).filter(|n| !n.is_empty()) else {
            return Err(path.field("name").err("required"));
        };
        let kinds: Vec<&String> = obj.keys().filter(|k| *k != "name").collect();
        if kinds.len() != 1 {
            return Err(path.err("needs exactly one provider kind beside `name` (envoyFileAccessLog, envoyOtelAls)"));
        }
        if out.insert(name.to_string(), (path.clone(), p.clone())).is_some() {
            return Err(path.field("name").err(format!("duplicate provider {name:?}")));
        }
    }
    Ok(out)
}
