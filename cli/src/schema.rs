//! Istio resources against their CRDs' OpenAPI v3 schemas (`crd-all.gen.yaml`, read at run
//! time), the way the Kubernetes API server with strict field validation (kubectl's
//! default) would judge them, as far as a JSON-schema validator can:
//!
//! - `apiVersion`, `kind` and `metadata` (with `name`) are implicit in every CRD schema;
//! - an object schema with `properties` accepts no other field, unless it says
//!   `x-kubernetes-preserve-unknown-fields: true` (strict field validation rejects unknown
//!   fields; without it the API server would silently prune them, which is worse);
//! - `x-kubernetes-int-or-string: true` means an integer or a string;
//! - `nullable: true` admits `null`;
//! - `x-kubernetes-validations` (CEL rules) cannot be evaluated here: they are counted and
//!   reported as not checked.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Map, Value};

/// Every served version of every CRD in a file, by (`group/version`, kind).
pub struct Crds {
    schemas: BTreeMap<(String, String), Value>,
    /// CEL rules (x-kubernetes-validations) per (`group/version`, kind), not evaluated.
    cel_rules: BTreeMap<(String, String), usize>,
}

/// The outcome of validating one resource.
#[derive(Debug, Default)]
pub struct Report {
    /// `path: message`, one per violation.
    pub errors: Vec<String>,
    /// CEL rules in the schema that were not evaluated.
    pub cel_rules_unchecked: usize,
}

impl Crds {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut schemas = BTreeMap::new();
        let mut cel_rules = BTreeMap::new();
        for doc in yaml_documents(text)? {
            if doc.get("kind").and_then(Value::as_str) != Some("CustomResourceDefinition") {
                continue;
            }
            let str_at = |p: &str| doc.pointer(p).and_then(Value::as_str);
            let (Some(group), Some(kind)) = (str_at("/spec/group"), str_at("/spec/names/kind")) else {
                continue;
            };
            for version in doc.pointer("/spec/versions").and_then(Value::as_array).into_iter().flatten() {
                let Some(name) = version.get("name").and_then(Value::as_str) else { continue };
                if version.get("served") == Some(&Value::Bool(false)) {
                    continue;
                }
                let Some(schema) = version.get("schema").and_then(|s| s.get("openAPIV3Schema")) else {
                    continue;
                };
                let key = (format!("{group}/{name}"), kind.to_string());
                let mut count = 0;
                let mut schema = kubernetes_to_json_schema(schema, &mut count);
                add_implicit_fields(&mut schema);
                cel_rules.insert(key.clone(), count);
                schemas.insert(key, schema);
            }
        }
        if schemas.is_empty() {
            return Err("no CustomResourceDefinition with an openAPIV3Schema found".into());
        }
        Ok(Self { schemas, cel_rules })
    }

    /// Is there a schema for this apiVersion and kind?
    pub fn knows(&self, api_version: &str, kind: &str) -> bool {
        self.schemas.contains_key(&(api_version.to_string(), kind.to_string()))
    }

    /// Every (apiVersion, kind) known.
    pub fn kinds(&self) -> impl Iterator<Item = (&str, &str)> {
        self.schemas.keys().map(|(a, k)| (a.as_str(), k.as_str()))
    }

    /// Validates one resource. An unknown apiVersion/kind of an `istio.io` group is an
    /// error; other kinds (a Service, a Deployment) are not Istio's and are skipped (`None`).
    pub fn validate(&self, resource: &Value) -> Option<Report> {
        let api_version = resource.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
        let kind = resource.get("kind").and_then(Value::as_str).unwrap_or_default();
        let key = (api_version.to_string(), kind.to_string());
        let Some(schema) = self.schemas.get(&key) else {
            if api_version.split('/').next().is_some_and(|g| g.ends_with("istio.io")) {
                let served: Vec<&str> =
                    self.schemas.keys().filter(|(_, k)| k == kind).map(|(a, _)| a.as_str()).collect();
                return Some(Report {
                    errors: vec![format!(
                        "{api_version} {kind}: no such Istio resource in the CRDs (served versions of {kind}: {})",
                        if served.is_empty() { "none".to_string() } else { served.join(", ") }
                    )],
                    cel_rules_unchecked: 0,
                });
            }
            return None;
        };
        let validator = match jsonschema::options().with_draft(jsonschema::Draft::Draft4).build(schema) {
            Ok(v) => v,
            Err(e) => {
                return Some(Report {
                    errors: vec![format!("the CRD schema of {api_version} {kind} does not compile: {e}")],
                    cel_rules_unchecked: 0,
                })
            }
        };
        let mut errors: Vec<String> = validator
            .iter_errors(resource)
            .map(|e| {
                let path = e.instance_path().to_string();
                let path = if path.is_empty() { "/".to_string() } else { path };
                format!("{path}: {e}")
            })
            .collect();
        errors.sort();
        errors.dedup();
        Some(Report { errors, cel_rules_unchecked: self.cel_rules.get(&key).copied().unwrap_or(0) })
    }
}

/// Every non-empty YAML document of a stream, as JSON values; a `kind: List` (what `kubectl
/// get -o yaml` prints for several objects) is flattened into its items.
pub fn yaml_documents(text: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(doc).map_err(|e| format!("YAML document {}: {e}", i + 1))?;
        match value {
            Value::Null => {}
            Value::Object(ref m) if m.get("kind").and_then(Value::as_str) == Some("List") => {
                out.extend(m.get("items").and_then(Value::as_array).cloned().unwrap_or_default());
            }
            v => out.push(v),
        }
    }
    Ok(out)
}

/// Kubernetes structural-schema extensions → plain JSON schema (see the module docs).
fn kubernetes_to_json_schema(schema: &Value, cel_rules: &mut usize) -> Value {
    match schema {
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                let v = match k.as_str() {
                    // Maps of sub-schemas: convert each schema, not the map itself.
                    "properties" | "patternProperties" | "definitions" => match v {
                        Value::Object(props) => Value::Object(
                            props
                                .iter()
                                .map(|(name, s)| (name.clone(), kubernetes_to_json_schema(s, cel_rules)))
                                .collect(),
                        ),
                        other => other.clone(),
                    },
                    "x-kubernetes-validations" => {
                        *cel_rules += v.as_array().map_or(0, Vec::len);
                        continue;
                    }
                    _ => kubernetes_to_json_schema(v, cel_rules),
                };
                out.insert(k.clone(), v);
            }
            let preserve = map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
            if map.contains_key("properties") && !preserve && !map.contains_key("additionalProperties") {
                out.insert("additionalProperties".into(), Value::Bool(false));
            }
            if map.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) && !map.contains_key("type") {
                out.insert("anyOf".into(), json!([{ "type": "integer" }, { "type": "string" }]));
            }
            if map.get("nullable") == Some(&Value::Bool(true)) {
                if let Some(Value::String(t)) = map.get("type") {
                    out.insert("type".into(), json!([t, "null"]));
                }
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(|s| kubernetes_to_json_schema(s, cel_rules)).collect()),
        other => other.clone(),
    }
}

/// `apiVersion`, `kind`, `metadata` are part of every object, whatever its CRD says.
fn add_implicit_fields(schema: &mut Value) {
    let Some(map) = schema.as_object_mut() else { return };
    let props = map.entry("properties").or_insert_with(|| json!({}));
    if let Some(props) = props.as_object_mut() {
        props.entry("apiVersion").or_insert_with(|| json!({ "type": "string" }));
        props.entry("kind").or_insert_with(|| json!({ "type": "string" }));
        props.entry("metadata").or_insert_with(|| {
            json!({
                "type": "object",
                "required": ["name"],
                "properties": { "name": { "type": "string", "minLength": 1 }, "namespace": { "type": "string" } },
            })
        });
    }
    let required = map.entry("required").or_insert_with(|| json!([]));
    if let Some(r) = required.as_array_mut() {
        for f in ["apiVersion", "kind", "metadata"] {
            if !r.iter().any(|x| x == f) {
                r.push(json!(f));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
spec:
  group: example.istio.io
  names: { kind: Thing }
  versions:
  - name: v1
    served: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            x-kubernetes-validations:
            - rule: "true"
            properties:
              port: { x-kubernetes-int-or-string: true }
              free: { type: object, x-kubernetes-preserve-unknown-fields: true }
              note: { type: string, nullable: true }
"#;

    fn thing(spec: Value) -> Value {
        json!({"apiVersion": "example.istio.io/v1", "kind": "Thing", "metadata": {"name": "t"}, "spec": spec})
    }

    #[test]
    fn kubernetes_extensions_are_honoured() {
        let crds = Crds::parse(CRD).unwrap();
        let ok = crds.validate(&thing(json!({"port": 80, "free": {"any": [1]}, "note": null}))).unwrap();
        assert!(ok.errors.is_empty(), "{:?}", ok.errors);
        assert_eq!(ok.cel_rules_unchecked, 1);
        assert!(crds.validate(&thing(json!({"port": "http"}))).unwrap().errors.is_empty());
        let bad = crds.validate(&thing(json!({"port": 1.5, "typo": 1}))).unwrap();
        assert_eq!(bad.errors.len(), 2, "{:?}", bad.errors);
        assert!(bad.errors.iter().any(|e| e.starts_with("/spec: ") && e.contains("typo")), "{:?}", bad.errors);
        assert!(bad.errors.iter().any(|e| e.starts_with("/spec/port: ")), "{:?}", bad.errors);
        let no_name = json!({"apiVersion": "example.istio.io/v1", "kind": "Thing", "metadata": {}});
        assert!(!crds.validate(&no_name).unwrap().errors.is_empty());
    }

    #[test]
    fn unknown_istio_kinds_fail_and_other_kinds_are_skipped() {
        let crds = Crds::parse(CRD).unwrap();
        let e = crds.validate(&json!({"apiVersion": "example.istio.io/v2", "kind": "Thing"})).unwrap();
        assert!(e.errors[0].contains("served versions of Thing: example.istio.io/v1"), "{:?}", e.errors);
        assert!(crds.validate(&json!({"apiVersion": "v1", "kind": "Service"})).is_none());
    }

    #[test]
    fn lists_are_flattened() {
        let docs = yaml_documents("kind: List\nitems: [{a: 1}, {b: 2}]\n---\n---\nc: 3\n").unwrap();
        assert_eq!(docs, vec![json!({"a": 1}), json!({"b": 2}), json!({"c": 3})]);
    }
}
