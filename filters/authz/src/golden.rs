//! Conformance: istiod's own authorization builder corpus (`../shared/istio/authz-golden/`,
//! read at run time). For every case, our translation of the input policies must produce the
//! RBAC filters istiod generates, policy by policy and matcher by matcher.

use std::path::PathBuf;

use serde_json::{json, Map, Value};

use crate::policy::{parse, Config, NamedPolicy};
use crate::rbac::json;

pub fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/istio/authz-golden")
}

fn yaml_docs(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .filter_map(|d| {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(d).unwrap();
            (!v.is_null()).then(|| serde_json::to_value(v).unwrap())
        })
        .collect()
}

fn policies(list: &[NamedPolicy]) -> Value {
    let mut m = Map::new();
    for p in list {
        m.insert(p.id.clone(), json::policy(&p.policy));
    }
    Value::Object(m)
}

/// The RBAC filters istiod would emit for `cfg`, in order, as their `typedConfig` `rules` /
/// `shadowRules` parts.
fn rbac_filters(cfg: &Config) -> Vec<Value> {
    let mut out = Vec::new();
    if !cfg.custom.is_empty() {
        out.push(json!({"shadowRules": {"action": "DENY", "policies": policies(&cfg.custom)}}));
    }
    if !cfg.audit.is_empty() {
        out.push(json!({"rules": {"action": "LOG", "policies": policies(&cfg.audit)}}));
    }
    if !cfg.deny.is_empty() || !cfg.shadow_deny.is_empty() {
        let mut f = Map::new();
        if !cfg.deny.is_empty() {
            f.insert("rules".into(), json!({"action": "DENY", "policies": policies(&cfg.deny)}));
        }
        if !cfg.shadow_deny.is_empty() {
            f.insert("shadowRules".into(), json!({"action": "DENY", "policies": policies(&cfg.shadow_deny)}));
        }
        out.push(Value::Object(f));
    }
    if cfg.allow_present || cfg.shadow_allow_present {
        let mut f = Map::new();
        if cfg.allow_present {
            f.insert("rules".into(), json!({"policies": policies(&cfg.allow)}));
        }
        if cfg.shadow_allow_present {
            f.insert("shadowRules".into(), json!({"policies": policies(&cfg.shadow_allow)}));
        }
        out.push(Value::Object(f));
    }
    out
}

/// The `rules` / `shadowRules` of each RBAC filter in an out file (ext_authz filters are
/// compared by the ext_authz tests).
fn expected_filters(doc: &Value) -> Option<Value> {
    if doc["name"] != "envoy.filters.http.rbac" {
        return None;
    }
    let tc = &doc["typedConfig"];
    let mut f = Map::new();
    for k in ["rules", "shadowRules"] {
        if let Some(r) = tc.get(k) {
            let mut r = r.clone();
            if r.get("action").and_then(Value::as_str) == Some("ALLOW") {
                r.as_object_mut().map(|o| o.remove("action"));
            }
            f.insert(k.into(), r);
        }
    }
    Some(Value::Object(f))
}

/// The plugin configuration for a case: its policies, trust domains and provider.
pub fn case_config(case: &Value, providers: &Value) -> Value {
    let dir = golden_dir();
    let docs = yaml_docs(&dir.join(case["input"].as_str().unwrap()));
    let mut cfg = json!({"policies": docs});
    if let Some(td) = case.get("trustDomain") {
        cfg["trustDomain"] = td.clone();
    }
    if let Some(a) = case.get("trustDomainAliases") {
        cfg["trustDomainAliases"] = a.clone();
    }
    if let Some(p) = case.get("provider").and_then(Value::as_str) {
        let key = p.split_whitespace().next().unwrap();
        let mut prov = providers[key].clone();
        for kind in ["envoyExtAuthzHttp", "envoyExtAuthzGrpc"] {
            if let Some(k) = prov.get_mut(kind) {
                k["cluster"] = json!("ext-authz");
                if p.contains("without the 'foo/' namespace") {
                    let s = k["service"].as_str().unwrap().trim_start_matches("foo/").to_string();
                    k["service"] = json!(s);
                }
            }
        }
        cfg["extensionProviders"] = json!([prov]);
    }
    cfg
}

pub fn cases() -> (Vec<Value>, Value) {
    let idx: Value = serde_json::from_str(&std::fs::read_to_string(golden_dir().join("cases.json")).unwrap()).unwrap();
    (idx["cases"].as_array().unwrap().clone(), idx["providers"].clone())
}

#[test]
fn translation_matches_istiod_golden_output() {
    let (cases, providers) = cases();
    assert!(cases.len() >= 20, "the corpus has {} cases", cases.len());
    let dir = golden_dir();
    let mut compared = 0;
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let cfg = case_config(case, &providers);
        let parsed = parse(cfg.to_string().as_bytes());
        if name.starts_with("custom-bad") {
            // istiod turns these into deny-everything rules; we refuse the configuration.
            assert!(parsed.is_err(), "{name}: a bad CUSTOM configuration must be rejected");
            continue;
        }
        let parsed = parsed.unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut want = Vec::new();
        for f in case["want"].as_array().unwrap() {
            let f = f.as_str().unwrap();
            let ext = dir.join(format!("extended-{f}"));
            let file = if ext.exists() { ext } else { dir.join(f) };
            for d in yaml_docs(&file) {
                want.extend(expected_filters(&d));
            }
        }
        let got = rbac_filters(&parsed);
        assert_eq!(got.len(), want.len(), "{name}: filter count\n got: {got:?}\nwant: {want:?}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            if g != w {
                panic!(
                    "{name}: filter {i} differs\n got: {}\nwant: {}",
                    serde_json::to_string_pretty(g).unwrap(),
                    serde_json::to_string_pretty(w).unwrap()
                );
            }
        }
        compared += 1;
    }
    assert!(compared >= 17, "compared {compared} cases");
    eprintln!("compared {compared} golden cases");
}

/// The module reads its configuration with `AuthzConfigJson::read`; the host-side types keep
/// serde's derived reader. Both must agree on every golden case and on broken variants of
/// them (each field replaced by a value of the wrong type, an unknown field added, a
/// required one removed): the same value or the same error, path and message.
#[test]
fn hand_reader_matches_serde() {
    use crate::config::AuthzConfigJson;
    use meshwasm_sdk_ext::config::{from_value, Path};

    fn variants(v: &Value, out: &mut Vec<Value>, root: &Value, at: &mut Vec<Value>) {
        // Every container below `root` gets mutated once per child.
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    for bad in [json!(7), json!("s"), json!(null), json!([1]), json!({"x": 1}), json!(-1), json!(true)]
                    {
                        out.push(replace(root, at, |p| {
                            p[k] = bad.clone();
                        }));
                    }
                    out.push(replace(root, at, |p| {
                        p.as_object_mut().map(|o| o.remove(k));
                    }));
                    at.push(json!(k));
                    variants(child, out, root, at);
                    at.pop();
                }
                out.push(replace(root, at, |p| {
                    p["unexpectedField"] = json!(1);
                }));
            }
            Value::Array(a) => {
                for (i, child) in a.iter().enumerate() {
                    out.push(replace(root, at, |p| {
                        p[i] = json!(3);
                    }));
                    at.push(json!(i));
                    variants(child, out, root, at);
                    at.pop();
                }
            }
            _ => {}
        }
    }
    fn replace(root: &Value, at: &[Value], f: impl FnOnce(&mut Value)) -> Value {
        let mut r = root.clone();
        let mut p = &mut r;
        for s in at {
            p = match s {
                Value::String(k) => &mut p[k.as_str()],
                Value::Number(i) => &mut p[i.as_u64().unwrap() as usize],
                _ => unreachable!(),
            };
        }
        f(p);
        r
    }

    let (cases, providers) = cases();
    let mut compared = 0;
    let mut errors = 0;
    // The golden cases, and RequestAuthentication configurations with every field.
    let mut configs: Vec<Value> = cases.iter().map(|case| case_config(case, &providers)).collect();
    configs.push(json!({
        "authentication": [{"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
            "metadata": {"name": "jwt", "namespace": "foo"},
            "spec": {"selector": {"matchLabels": {"app": "a"}}, "jwtRules": [
                {"issuer": "https://issuer.example", "audiences": ["api", "web"], "jwks": "{\"keys\": []}",
                 "fromHeaders": [{"name": "x-jwt", "prefix": "Bearer "}, {"name": "x-raw"}],
                 "fromParams": ["token"], "fromCookies": ["session"], "outputPayloadToHeader": "x-payload",
                 "outputClaimToHeaders": [{"header": "x-sub", "claim": "sub"}], "forwardOriginalToken": true,
                 "timeout": "2s", "spaceDelimitedClaims": ["roles"]},
                {"issuer": "i2", "jwksUri": "https://keys.example/jwks.json"}]}}],
        "jwks": {"https://keys.example/jwks.json": {"cluster": "keys", "cacheDuration": "5m"},
                 "[odd].key": {"cluster": "c"}}
    }));
    configs.push(json!({"authentication": [{"apiVersion": "security.istio.io/v1beta1", "kind": "RequestAuthentication",
        "metadata": {"name": "j"}, "spec": {"jwtRules": [{}], "targetRef": {"kind": "Gateway"}, "targetRefs": []}, "status": {}}],
        "jwks": {}}));
    for cfg in &configs {
        let cfg = cfg.clone();
        let mut all = vec![cfg.clone()];
        variants(&cfg, &mut all, &cfg, &mut Vec::new());
        for v in &all {
            let ours = AuthzConfigJson::read(v, &Path::root()).map(|c| format!("{c:?}"));
            let theirs = from_value::<AuthzConfigJson>(v).map(|c| format!("{c:?}"));
            match &ours {
                // serde fills a struct from an array by position; the reader refuses arrays
                // (no configuration means that). Both must still reject the value.
                Err(e) if e.message.starts_with("invalid type: sequence, expected struct") => {
                    assert!(theirs.is_err(), "{v}: serde accepted {theirs:?}");
                }
                _ => assert_eq!(ours, theirs, "{v}"),
            }
            compared += 1;
            errors += usize::from(ours.is_err());
        }
    }
    assert!(compared > 1000 && errors > compared / 2, "{compared} configurations, {errors} errors");
    eprintln!("{compared} configurations read alike ({errors} errors)");
}
