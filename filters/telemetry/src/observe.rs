//! The parts of access logging and tracing shared by both: MeshConfig `extensionProviders`
//! (by name), and what one stream hands the log phase.

use std::collections::BTreeMap;

use serde_json::Value;

use meshwasm_sdk_ext::config::Path;
use meshwasm_sdk_ext::obj::{self, Obj};
use meshwasm_sdk_ext::ConfigError;

use crate::config::Reporter;

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

/// `match.mode` of an `accessLogging` / `tracing` entry (absent: both).
pub fn modes(o: &Obj<'_>) -> Result<&'static [Reporter], ConfigError> {
    let Some(m) = o.get("match") else { return Ok(&[Reporter::Client, Reporter::Server]) };
    let m = Obj::new(m, &o.path("match"), "struct Selector", &["mode"])?;
    match m.opt_str("mode")? {
        None | Some("CLIENT_AND_SERVER") => Ok(&[Reporter::Client, Reporter::Server]),
        Some("CLIENT") => Ok(&[Reporter::Client]),
        Some("SERVER") => Ok(&[Reporter::Server]),
        Some(other) => Err(m.path("mode").err(format!("must be CLIENT_AND_SERVER, CLIENT or SERVER, got {other:?}"))),
    }
}

/// `providers[].name` of an entry, with each name's path.
pub fn provider_names(o: &Obj<'_>) -> Result<Vec<(Path, String)>, ConfigError> {
    let mut out = Vec::new();
    for (p, v) in o.list("providers")? {
        let r = Obj::new(v, &p, "struct ProviderRef", &["name"])?;
        out.push((p.field("name"), r.str("name")?.to_string()));
    }
    Ok(out)
}

/// A duration field (`"5s"`, `"250ms"`).
pub fn opt_duration(o: &Obj<'_>, k: &str) -> Result<Option<std::time::Duration>, ConfigError> {
    o.get(k)
        .map(|v| {
            let s = obj::string(v, &o.path(k))?;
            meshwasm_sdk_ext::duration::parse_duration(s).map_err(|e| o.path(k).err(e))
        })
        .transpose()
}
