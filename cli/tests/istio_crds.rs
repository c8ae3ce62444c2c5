//! Against Istio's real CRDs (`../shared/istio/crds/crd-all.gen.yaml`, read at run time):
//! every filter's generated WasmPlugin validates, every WasmPlugin in examples/ validates,
//! and deliberately wrong manifests fail with the offending path named.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // a test

use std::path::{Path, PathBuf};

use meshwasm_cli::schema::{yaml_documents, Crds};
use meshwasm_cli::{filters, wasmplugin};
use serde_json::{json, Value};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn crds() -> Crds {
    let path = root().join("../shared/istio/crds/crd-all.gen.yaml");
    Crds::load(&path).unwrap_or_else(|e| panic!("{e} (the Istio CRDs live in ../shared/istio/ beside the checkout)"))
}

fn generated(filter: &str, config: &Value) -> Value {
    let yaml = wasmplugin::render(&wasmplugin::Options {
        filter: filters::find(filter).unwrap(),
        image: "registry.example.com/meshwasm/x:0.1.0",
        sha256: &"0".repeat(64),
        config,
        name: None,
        namespace: Some("default"),
        selector: &[("app".into(), "x".into())],
        generated_by: "test",
    })
    .unwrap();
    serde_yaml_ng::from_str(&yaml).unwrap()
}

#[test]
fn every_filters_generated_wasmplugin_validates() {
    let crds = crds();
    assert!(crds.knows("extensions.istio.io/v1alpha1", "WasmPlugin"));
    for f in filters::FILTERS {
        let manifest = generated(f.name, &json!({}));
        let report = crds.validate(&manifest).expect("a WasmPlugin is an Istio resource");
        assert!(report.errors.is_empty(), "{}: {:?}", f.name, report.errors);
    }
}

#[test]
fn the_wasmplugins_in_examples_validate() {
    let crds = crds();
    let mut n = 0;
    for dir in std::fs::read_dir(root().join("examples")).unwrap() {
        let file = dir.unwrap().path().join("wasmplugin.yaml");
        let Ok(text) = std::fs::read_to_string(&file) else { continue };
        for doc in yaml_documents(&text).unwrap() {
            let report = crds.validate(&doc).unwrap();
            assert!(report.errors.is_empty(), "{}: {:?}", file.display(), report.errors);
            n += 1;
        }
    }
    assert!(n >= 2, "expected the examples' WasmPlugins");
}

#[test]
fn wrong_manifests_fail_with_the_path_named() {
    let crds = crds();
    let mut m = generated("fault", &json!({}));
    m["spec"]["phase"] = json!("SOMEWHERE");
    m["spec"]["pluginConfg"] = json!({});
    m["spec"]["priority"] = json!("high");
    let errors = crds.validate(&m).unwrap().errors;
    assert!(errors.iter().any(|e| e.starts_with("/spec/phase: ")), "{errors:?}");
    assert!(errors.iter().any(|e| e.starts_with("/spec: ") && e.contains("pluginConfg")), "{errors:?}");
    assert!(errors.iter().any(|e| e.starts_with("/spec/priority: ")), "{errors:?}");

    let vs = json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "r"},
                    "spec": {"hosts": ["r"], "http": [{"fault": {"abort": {"httpStatus": "500"}}}]}});
    let errors = crds.validate(&vs).unwrap().errors;
    assert!(errors.iter().any(|e| e.starts_with("/spec/http/0/fault/abort")), "{errors:?}");
}
