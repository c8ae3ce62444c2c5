//! Config loading: JSON → typed serde structs → validated, immutable config.
//!
//! Every error names the JSON path and the rule, e.g.
//! `rules[0].fault.abort.httpStatus: must be in 200..=599, got 700`.

use std::fmt;

use serde::de::DeserializeOwned;
use serde_json::Value;

/// A configuration error: where (JSON path) and what rule was broken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { path: path.into(), message: message.into() }
    }

    /// Prefix the path with a parent segment (`parent.child` or `parent[0]`).
    #[must_use]
    pub fn within(mut self, parent: &str) -> Self {
        self.path = join(parent, &self.path);
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Join two JSON path fragments: `join("rules[0]", "fault")` is `rules[0].fault`,
/// `join("rules", "[0]")` is `rules[0]`.
pub fn join(parent: &str, child: &str) -> String {
    match (parent.is_empty(), child.is_empty()) {
        (true, _) => child.to_string(),
        (_, true) => parent.to_string(),
        _ if child.starts_with('[') => format!("{parent}{child}"),
        _ => format!("{parent}.{child}"),
    }
}

/// A path builder used while validating: `Path::root().field("rules").index(0)`.
#[derive(Debug, Clone, Default)]
pub struct Path(String);

impl Path {
    pub fn root() -> Self {
        Self(String::new())
    }
    #[must_use]
    pub fn field(&self, name: &str) -> Self {
        Self(join(&self.0, name))
    }
    #[must_use]
    pub fn index(&self, i: usize) -> Self {
        Self(format!("{}[{i}]", self.0))
    }
    #[must_use]
    pub fn key(&self, k: &str) -> Self {
        // Map keys are written as fields; keys with dots or brackets are quoted.
        if k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            self.field(k)
        } else {
            Self(format!("{}[{k:?}]", self.0))
        }
    }
    pub fn err(&self, message: impl Into<String>) -> ConfigError {
        ConfigError::new(self.0.clone(), message)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Deserialize `bytes` as JSON into `T`, reporting the JSON path of any error.
/// An empty configuration is read as `{}`.
///
/// The bytes are parsed into a `serde_json::Value` first and typed from there, the same way
/// route-metadata overrides are: one instantiation of the typed deserializers instead of two
/// keeps the module smaller (configuration is parsed once, so the extra tree costs nothing).
pub fn from_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ConfigError> {
    from_value(&parse_json(bytes)?)
}

/// Parse `bytes` as JSON (empty or blank is `{}`), for configurations read with
/// [`crate::obj::Obj`].
pub fn parse_json(bytes: &[u8]) -> Result<Value, ConfigError> {
    let bytes = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}".as_slice() } else { bytes };
    serde_json::from_slice(bytes)
        .map_err(|e| ConfigError::new("", format!("invalid JSON: {}", strip_position(&e.to_string()))))
}

/// Deserialize a `serde_json::Value` (e.g. from route metadata) into `T`.
pub fn from_value<T: DeserializeOwned>(value: &serde_json::Value) -> Result<T, ConfigError> {
    crate::value_de::from_value(value).map_err(|e| ConfigError::new(e.path(), e.message()))
}

/// Parse and validate: JSON → `Raw` → `TryFrom` → `Config`.
pub fn load<Raw, Config>(bytes: &[u8]) -> Result<Config, ConfigError>
where
    Raw: DeserializeOwned,
    Config: TryFrom<Raw, Error = ConfigError>,
{
    Config::try_from(from_json::<Raw>(bytes)?)
}

/// gRPC status codes by name, as Istio writes them.
pub const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A gRPC status from config: a code name (`"UNAVAILABLE"`, any case) or a number 0..=16.
pub fn grpc_code(v: &Value, path: &Path) -> Result<u32, ConfigError> {
    let bad = || path.err(format!("must be a gRPC code name like \"UNAVAILABLE\" or a number 0..=16, got {v}"));
    match v {
        Value::String(s) => {
            if let Ok(n) = s.parse::<u32>() {
                return if n <= 16 { Ok(n) } else { Err(bad()) };
            }
            let upper = s.to_ascii_uppercase();
            GRPC_CODES.iter().position(|c| *c == upper).map(|i| i as u32).ok_or_else(bad)
        }
        Value::Number(n) => n.as_u64().filter(|n| *n <= 16).map(|n| n as u32).ok_or_else(bad),
        _ => Err(bad()),
    }
}

/// A rule's label for stats, logs and state keys: its `name` (non-empty), or `rule-<index>`.
pub fn rule_name(name: Option<&str>, index: usize, path: &Path) -> Result<String, ConfigError> {
    match name {
        Some("") => Err(path.field("name").err("must not be empty")),
        Some(n) => Ok(n.to_string()),
        None => Ok(format!("rule-{index}")),
    }
}

/// Rule names label stats, so they must stay distinct once sanitized for stat names, and
/// must not take a label the filter reserves for itself.
pub struct RuleLabels {
    seen: std::collections::HashSet<String>,
    reserved: &'static [&'static str],
}

impl RuleLabels {
    pub fn new(reserved: &'static [&'static str]) -> Self {
        Self { seen: std::collections::HashSet::new(), reserved }
    }

    /// Claim the label of rule `name` (at `path`, the rule's path).
    pub fn claim(&mut self, name: &str, path: &Path) -> Result<(), ConfigError> {
        let label = crate::metrics::sanitize_label(name);
        if self.reserved.contains(&label.as_str()) || !self.seen.insert(label.clone()) {
            let what = if self.reserved.is_empty() { "duplicate" } else { "duplicate or reserved" };
            return Err(path.field("name").err(format!("{what} rule name {name:?} (stats label {label:?})")));
        }
        Ok(())
    }
}

fn strip_position(msg: &str) -> String {
    // serde_json appends " at line L column C"; keep it, it helps humans with big files,
    // but drop it for the common one-line config case where it adds nothing.
    match msg.rfind(" at line 1 column ") {
        Some(i) => msg.get(..i).unwrap_or(msg).to_string(),
        None => msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct Inner {
        #[allow(dead_code)]
        http_status: u32,
    }
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        #[allow(dead_code)]
        rules: Vec<Inner>,
    }

    #[test]
    fn unknown_field_names_path() {
        let e = from_json::<Outer>(br#"{"rules":[{"httpStatus":1},{"httpStatuss":2}]}"#).unwrap_err();
        assert_eq!(e.path, "rules[1].httpStatuss");
        assert!(e.message.contains("unknown field `httpStatuss`"), "{e}");
    }

    #[test]
    fn wrong_type_names_path() {
        let e = from_json::<Outer>(br#"{"rules":[{"httpStatus":"x"}]}"#).unwrap_err();
        assert_eq!(e.path, "rules[0].httpStatus");
    }

    #[test]
    fn empty_is_empty_object() {
        let e = from_json::<Outer>(b"  ").unwrap_err();
        assert!(e.message.contains("missing field `rules`"), "{e}");
    }

    #[test]
    fn trailing_garbage_rejected() {
        assert!(from_json::<Outer>(br#"{"rules":[]} x"#).is_err());
    }

    #[test]
    fn syntax_errors_say_invalid_json() {
        let e = from_json::<Outer>(br#"{"rules":[{"httpStatus":1}"#).unwrap_err();
        assert!(e.to_string().starts_with("invalid JSON: EOF while parsing"), "{e}");
    }

    #[test]
    fn path_builder() {
        let p = Path::root().field("rules").index(3).field("match").index(0).key("x.y");
        assert_eq!(p.as_str(), r#"rules[3].match[0]["x.y"]"#);
        assert_eq!(p.err("bad").to_string(), r#"rules[3].match[0]["x.y"]: bad"#);
    }
}
