//! A JSON object read field by field, for configuration types whose serde-derived visitors
//! cost too much module size. `authz` reads its Istio resources this way: the derived
//! `Deserialize` of its 15 structs was about 80 KiB of the 374 KiB module after wasm-opt;
//! this reader is one non-generic copy. Errors use serde's wording and the paths of
//! [`crate::config::from_value`], so both kinds of configuration read alike:
//! `policies[0].spec.rules[0].to[0].operation.pathz: unknown field `pathz`, expected one of …`.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::config::{ConfigError, Path};

/// How serde names a JSON value it did not expect (floats without their digits).
fn unexpected(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean `{b}`"),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => format!("integer `{u}`"),
            (None, Some(i)) => format!("integer `{i}`"),
            _ => "floating point number".into(),
        },
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "sequence".into(),
        Value::Object(_) => "map".into(),
    }
}

/// `invalid type: <what v is>, expected <expected>` at `path`.
pub fn invalid_type(v: &Value, expected: &str, path: &Path) -> ConfigError {
    path.err(format!("invalid type: {}, expected {expected}", unexpected(v)))
}

/// The elements of a JSON array.
pub fn array<'a>(v: &'a Value, path: &Path) -> Result<&'a [Value], ConfigError> {
    match v {
        Value::Array(a) => Ok(a),
        other => Err(invalid_type(other, "a sequence", path)),
    }
}

/// A JSON string.
pub fn string<'a>(v: &'a Value, path: &Path) -> Result<&'a str, ConfigError> {
    v.as_str().ok_or_else(|| invalid_type(v, "a string", path))
}

/// A JSON object and the path it sits at.
pub struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: Path,
}

impl<'a> Obj<'a> {
    /// `v` must be an object (`what` names it in errors, as serde's `struct X`) whose keys are
    /// all in `fields`.
    pub fn new(v: &'a Value, path: &Path, what: &str, fields: &[&str]) -> Result<Self, ConfigError> {
        let o = Self::open(v, path, what)?;
        if let Some(k) = o.map.keys().find(|k| !fields.contains(&k.as_str())) {
            let expected = match fields {
                [] => "there are no fields".to_string(),
                [one] => format!("expected `{one}`"),
                [a, b] => format!("expected `{a}` or `{b}`"),
                _ => format!(
                    "expected one of {}",
                    fields.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", ")
                ),
            };
            return Err(o.path(k).err(format!("unknown field `{k}`, {expected}")));
        }
        Ok(o)
    }

    /// An object whose unknown keys are ignored (Kubernetes `metadata`).
    pub fn open(v: &'a Value, path: &Path, what: &str) -> Result<Self, ConfigError> {
        match v {
            Value::Object(map) => Ok(Self { map, path: path.clone() }),
            other => Err(invalid_type(other, what, path)),
        }
    }

    /// The path of field `k`.
    pub fn path(&self, k: &str) -> Path {
        self.path.field(k)
    }

    /// Field `k`, `None` when absent or `null` (serde's `Option`).
    pub fn get(&self, k: &str) -> Option<&'a Value> {
        self.map.get(k).filter(|v| !v.is_null())
    }

    /// Field `k` as written (`null` included), for fields read another way.
    pub fn raw(&self, k: &str) -> Option<&'a Value> {
        self.map.get(k)
    }

    /// Field `k`, which must be present and not `null`.
    pub fn required(&self, k: &str) -> Result<&'a Value, ConfigError> {
        match self.map.get(k) {
            None => Err(self.path.err(format!("missing field `{k}`"))),
            Some(v) => Ok(v),
        }
    }

    pub fn str(&self, k: &str) -> Result<&'a str, ConfigError> {
        string(self.required(k)?, &self.path(k))
    }

    pub fn opt_str(&self, k: &str) -> Result<Option<&'a str>, ConfigError> {
        self.get(k).map(|v| string(v, &self.path(k))).transpose()
    }

    pub fn opt_string(&self, k: &str) -> Result<Option<String>, ConfigError> {
        Ok(self.opt_str(k)?.map(str::to_string))
    }

    pub fn opt_bool(&self, k: &str) -> Result<Option<bool>, ConfigError> {
        self.get(k).map(|v| v.as_bool().ok_or_else(|| invalid_type(v, "a boolean", &self.path(k)))).transpose()
    }

    pub fn opt_u64(&self, k: &str) -> Result<Option<u64>, ConfigError> {
        self.get(k).map(|v| integer(v, "u64", Value::as_u64, &self.path(k))).transpose()
    }

    pub fn opt_i64(&self, k: &str) -> Result<Option<i64>, ConfigError> {
        self.get(k).map(|v| integer(v, "i64", Value::as_i64, &self.path(k))).transpose()
    }

    /// The elements of array field `k` with their paths; absent is empty (serde's
    /// `#[serde(default)] Vec`, so `null` is an error).
    pub fn list(&self, k: &str) -> Result<Vec<(Path, &'a Value)>, ConfigError> {
        let Some(v) = self.map.get(k) else { return Ok(Vec::new()) };
        let p = self.path(k);
        Ok(array(v, &p)?.iter().enumerate().map(|(i, e)| (p.index(i), e)).collect())
    }

    /// Array of strings `k`; absent is empty.
    pub fn strings(&self, k: &str) -> Result<Vec<String>, ConfigError> {
        self.list(k)?.into_iter().map(|(p, v)| string(v, &p).map(str::to_string)).collect()
    }

    /// Object of strings `k`; absent is empty.
    pub fn string_map(&self, k: &str) -> Result<BTreeMap<String, String>, ConfigError> {
        let Some(v) = self.map.get(k) else { return Ok(BTreeMap::new()) };
        let p = self.path(k);
        let Value::Object(m) = v else { return Err(invalid_type(v, "a map", &p)) };
        // A loop, not `collect`: `BTreeMap::from_iter` sorts with std's stable sort, one more
        // instantiation of it in the module (the keys of a JSON object are unique and ordered).
        let mut out = BTreeMap::new();
        for (key, v) in m {
            out.insert(key.clone(), string(v, &p.field(key))?.to_string());
        }
        Ok(out)
    }
}

/// serde's integer errors: an out-of-range integer is an invalid value, anything else a type.
fn integer<T>(v: &Value, what: &str, get: fn(&Value) -> Option<T>, path: &Path) -> Result<T, ConfigError> {
    if let Some(n) = get(v) {
        return Ok(n);
    }
    if v.is_i64() || v.is_u64() {
        return Err(path.err(format!("invalid value: {}, expected {what}", unexpected(v))));
    }
    Err(invalid_type(v, what, path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    /// The same shape, read by serde and by `Obj`.
    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct S {
        name: String,
        port: Option<i64>,
        max: Option<u64>,
        on: Option<bool>,
        #[serde(default)]
        tags: Vec<String>,
        #[serde(default)]
        extra: BTreeMap<String, String>,
    }

    fn read(v: &Value) -> Result<S, ConfigError> {
        let o = Obj::new(v, &Path::root(), "struct S", &["name", "port", "max", "on", "tags", "extra"])?;
        Ok(S {
            name: o.str("name")?.to_string(),
            port: o.opt_i64("port")?,
            max: o.opt_u64("max")?,
            on: o.opt_bool("on")?,
            tags: o.strings("tags")?,
            extra: o.string_map("extra")?,
        })
    }

    #[test]
    fn reads_and_fails_like_serde() {
        let cases = [
            json!({"name": "a", "port": -3, "max": 7, "on": true, "tags": ["x"], "extra": {"k": "v"}}),
            json!({"name": "a", "port": null, "max": null, "on": null}),
            json!({"name": "a", "nam": 1}),
            json!({"port": 1}),
            json!({"name": 1}),
            json!({"name": null}),
            json!({"name": "a", "port": "1"}),
            json!({"name": "a", "max": -1}),
            json!({"name": "a", "port": 18446744073709551615u64}),
            json!({"name": "a", "on": "yes"}),
            json!({"name": "a", "tags": "x"}),
            json!({"name": "a", "tags": [1]}),
            json!({"name": "a", "tags": null}),
            json!({"name": "a", "extra": {"k": 1}}),
            json!({"name": "a", "extra": []}),
            json!("s"),
        ];
        for v in cases {
            let theirs = crate::config::from_value::<S>(&v);
            assert_eq!(read(&v), theirs, "{v}");
        }
        // serde would fill a struct from an array by position; a configuration never means that.
        let e = read(&json!(["a"])).unwrap_err();
        assert_eq!(e.to_string(), "invalid type: sequence, expected struct S");
        let e = read(&json!({"name": "a", "max": 1.5})).unwrap_err();
        assert_eq!(e.to_string(), "max: invalid type: floating point number, expected u64");
    }
}
