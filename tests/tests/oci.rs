//! Distribution end to end: every module (dist/*.wasm) built in both image variants by the
//! `meshwasm` command's library, pushed to a REAL registry (Debian's `docker-registry`),
//! read back with `skopeo`, and checked with the rules Istio's image fetcher applies — the
//! rules are written out here, independently of the code that builds the images. Then a
//! stock Envoy loads a module from the registry's blob URL with its sha256 pinned, serves
//! traffic through it, and refuses it when the sha256 is wrong.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use meshwasm_cli::oci::{self, PushOptions, Variant};
use meshwasm_tests::{block_on, Envoy, Filter, Listener, Registry, Request, Upstream};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

fn hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// Every module in dist/, by name.
fn modules() -> Vec<(String, PathBuf)> {
    let dist = meshwasm_tests::dist_dir();
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(&dist)
        .unwrap_or_else(|e| panic!("{}: {e} (run `cargo xtask build`)", dist.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
        .map(|p| (p.file_stem().unwrap().to_string_lossy().into_owned(), p))
        .collect();
    out.sort();
    assert!(out.len() >= 2, "expected the modules in {}", dist.display());
    out
}

fn push(image: &oci::Image, reference: &str) -> oci::Pushed {
    block_on(oci::push(image, reference, &PushOptions { plain_http: true }))
        .unwrap_or_else(|e| panic!("push {reference}: {e}"))
}

fn skopeo(args: &[&str]) -> Vec<u8> {
    let out = Command::new("skopeo")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("skopeo: {e}: install the Debian package `skopeo` (apt-get install skopeo)"));
    assert!(out.status.success(), "skopeo {args:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// The image as skopeo reads it back: the raw manifest, and the blobs copied into a `dir:`.
struct Pulled {
    manifest_raw: Vec<u8>,
    manifest: Value,
    dir: PathBuf,
}

impl Pulled {
    fn read(reference: &str, scratch: &Path) -> Self {
        let manifest_raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &format!("docker://{reference}")]);
        let manifest: Value = serde_json::from_slice(&manifest_raw).expect("manifest is JSON");
        let dir = scratch.join(reference.replace(['/', ':'], "_"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(scratch).expect("create the scratch dir");
        skopeo(&[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{reference}"),
            &format!("dir:{}", dir.display()),
        ]);
        Self { manifest_raw, manifest, dir }
    }

    fn blob(&self, descriptor: &Value) -> Vec<u8> {
        let digest = descriptor["digest"].as_str().expect("descriptor digest");
        let hex_digest = digest.strip_prefix("sha256:").expect("sha256 digest");
        let data = std::fs::read(self.dir.join(hex_digest)).expect("blob copied by skopeo");
        assert_eq!(hex(&data), hex_digest, "blob content matches its digest");
        assert_eq!(data.len() as u64, descriptor["size"].as_u64().unwrap(), "blob size matches its descriptor");
        data
    }
}

/// Istio's rules for the compat variant with the OCI layer media type: the manifest is an
/// image manifest (not an index); the LAST layer is `tar+gzip`; gunzip; walk the tar; the
/// first entry whose base name is `plugin.wasm` is the module, which starts with `\0asm`.
fn istio_compat_module(p: &Pulled) -> Vec<u8> {
    let layers = p.manifest["layers"].as_array().expect("layers");
    let last = layers.last().expect("at least one layer");
    assert_eq!(last["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip");
    let gz = p.blob(last);
    assert_eq!(&gz[..2], &[0x1f, 0x8b], "the layer is gzip");
    let mut tar_bytes = Vec::new();
    flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut tar_bytes).expect("gunzip the layer");
    let mut archive = tar::Archive::new(&tar_bytes[..]);
    let mut module = None;
    for entry in archive.entries().expect("tar") {
        let mut entry = entry.expect("tar entry");
        let path = entry.path().expect("entry path").into_owned();
        if path.file_name().is_some_and(|n| n == "plugin.wasm") {
            let mut data = Vec::new();
            entry.read_to_end(&mut data).expect("read plugin.wasm");
            module = Some(data);
            break;
        }
    }
    let module = module.expect("plugin.wasm in the layer");
    // A valid OCI image config whose diff id is the uncompressed layer.
    assert_eq!(p.manifest["config"]["mediaType"], "application/vnd.oci.image.config.v1+json");
    let config: Value = serde_json::from_slice(&p.blob(&p.manifest["config"])).expect("config is JSON");
    assert!(config["architecture"].is_string() && config["os"].is_string(), "{config}");
    assert_eq!(config["rootfs"]["type"], "layers");
    assert_eq!(config["rootfs"]["diff_ids"], json!([format!("sha256:{}", hex(&tar_bytes))]));
    assert_eq!(p.manifest["annotations"]["module.wasm.image/variant"], "compat");
    module
}

/// Istio's rules for the OCI artifact variant: exactly two layers, one of type
/// `application/vnd.module.wasm.content.layer.v1+wasm` whose blob is the raw module; the
/// config (`application/vnd.module.wasm.config.v1+json`) has `type`, `abiVersions` and
/// `config.rootIds`, as wasme writes them.
fn istio_artifact_module(p: &Pulled, name: &str) -> Vec<u8> {
    assert_eq!(p.manifest["config"]["mediaType"], "application/vnd.module.wasm.config.v1+json");
    let config: Value = serde_json::from_slice(&p.blob(&p.manifest["config"])).expect("config is JSON");
    assert_eq!(config["type"], "envoy_proxy");
    let abis = config["abiVersions"].as_array().expect("abiVersions");
    assert!(!abis.is_empty() && abis.iter().all(|a| a.as_str().is_some_and(|a| a.starts_with("proxy_abi_version_"))));
    assert_eq!(config["config"]["rootIds"], json!([format!("meshwasm.{name}")]));
    let layers = p.manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 2, "Istio wants exactly two layers in the artifact variant");
    let wasm: Vec<&Value> =
        layers.iter().filter(|l| l["mediaType"] == "application/vnd.module.wasm.content.layer.v1+wasm").collect();
    assert_eq!(wasm.len(), 1);
    p.blob(wasm[0])
}

#[test]
fn every_module_in_both_variants_is_pushed_read_back_with_skopeo_and_accepted_by_istios_rules() {
    let registry = Registry::start();
    let scratch = std::env::temp_dir().join(format!("meshwasm-oci-test-{}", std::process::id()));
    for (name, path) in modules() {
        let module = std::fs::read(&path).unwrap();
        for variant in [Variant::Compat, Variant::Artifact] {
            let image = oci::build(&module, variant, &format!("meshwasm.{name}")).unwrap();
            let again = oci::build(&module, variant, &format!("meshwasm.{name}")).unwrap();
            assert_eq!(image.manifest_digest, again.manifest_digest, "{name} {variant:?}: building twice");

            let reference = registry.reference(&format!("meshwasm/{name}:{}", variant.name()));
            let pushed = push(&image, &reference);
            assert_eq!(pushed.manifest_digest, image.manifest_digest);
            assert_eq!(pushed.module_sha256, hex(&module));

            let pulled = Pulled::read(&reference, &scratch);
            assert_eq!(
                format!("sha256:{}", hex(&pulled.manifest_raw)),
                pushed.manifest_digest,
                "{reference}: the digest printed is the digest of the manifest the registry serves"
            );
            assert_eq!(pulled.manifest["mediaType"], "application/vnd.oci.image.manifest.v1+json", "never an index");
            assert_eq!(pulled.manifest["schemaVersion"], 2);
            let got = match variant {
                Variant::Compat => istio_compat_module(&pulled),
                Variant::Artifact => istio_artifact_module(&pulled, &name),
            };
            assert!(got.starts_with(b"\0asm"), "{reference}: the module starts with the Wasm magic");
            assert_eq!(got, module, "{reference}: the module comes back byte for byte");
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

/// The wasm filter with its code fetched from `url` through cluster `registry`.
fn remote_fault_filter(url: &str, sha256: &str, config: &Value) -> Filter {
    let value = config.to_string().replace('\'', "''");
    Filter::native(&format!(
        r#"
name: envoy.filters.http.wasm
typed_config:
  "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
  config:
    name: meshwasm.fault
    root_id: meshwasm.fault
    configuration:
      "@type": type.googleapis.com/google.protobuf.StringValue
      value: '{value}'
    vm_config:
      vm_id: meshwasm.fault
      runtime: envoy.wasm.runtime.v8
      code:
        remote:
          http_uri: {{ uri: "{url}", cluster: registry, timeout: 5s }}
          sha256: {sha256}
          retry_policy: {{ num_retries: 1 }}
"#
    ))
}

fn registry_cluster(registry: &Registry) -> String {
    format!(
        "name: registry\ntype: STATIC\nconnect_timeout: 2s\nload_assignment:\n  cluster_name: registry\n  endpoints:\n  - lb_endpoints:\n    - endpoint:\n        address:\n          socket_address: {{ address: {}, port_value: {} }}\n",
        registry.addr().ip(),
        registry.addr().port()
    )
}

fn teapot_config() -> Value {
    json!({"rules": [{"name": "teapot", "match": [{"uri": {"prefix": "/teapot"}}],
                      "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 100}}}}]})
}

#[test]
fn envoy_loads_a_module_from_the_registry_blob_url_with_its_sha256_pinned() {
    let registry = Registry::start();
    let module = std::fs::read(meshwasm_tests::wasm_module("fault")).unwrap();
    let image = oci::build(&module, Variant::Artifact, "meshwasm.fault").unwrap();
    let pushed = push(&image, &registry.reference("meshwasm/fault:0.1.0"));
    let url = pushed.module_blob_url.clone().expect("artifact images have a module blob URL");

    let up = Upstream::start();
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .cluster_yaml(&registry_cluster(&registry))
        .listener(Listener::new().filter(remote_fault_filter(&url, &pushed.module_sha256, &teapot_config())))
        .start();
    let rsp = envoy.send(Request::get("/teapot"));
    assert_eq!(rsp.status, 418, "the module fetched from the registry injects the abort: {}", rsp.text());
    assert_eq!(rsp.text(), "fault filter abort");
    let rsp = envoy.send(Request::get("/other"));
    assert_eq!(rsp.status, 200);
    assert!(rsp.from_upstream());
    assert_eq!(up.requests(), 1);
    assert_eq!(envoy.stat_or_zero("wasm.remote_load_fetch_successes"), 1);
}

#[test]
fn envoy_refuses_a_module_whose_sha256_does_not_match() {
    let registry = Registry::start();
    let module = std::fs::read(meshwasm_tests::wasm_module("fault")).unwrap();
    let image = oci::build(&module, Variant::Artifact, "meshwasm.fault").unwrap();
    let pushed = push(&image, &registry.reference("meshwasm/fault:0.1.0"));
    let url = pushed.module_blob_url.clone().unwrap();
    let wrong = hex(b"not the module");
    assert_ne!(wrong, pushed.module_sha256);

    let up = Upstream::start();
    let envoy = Envoy::builder()
        .upstream(up.addr())
        .cluster_yaml(&registry_cluster(&registry))
        .listener(Listener::new().filter(remote_fault_filter(&url, &wrong, &teapot_config())))
        .start();
    // Envoy fetches the code during init (and retries); a body whose sha256 differs is
    // discarded, the plugin fails to load, and a fail-closed plugin answers 503.
    assert_eq!(envoy.stat_or_zero("wasm.remote_load_fetch_successes"), 0);
    assert!(envoy.stat_or_zero("wasm.remote_load_fetch_failures") >= 1);
    let rsp = envoy.send(Request::get("/other"));
    assert_eq!(rsp.status, 503, "a module that failed to load fails closed: {}", rsp.text());
    assert_eq!(up.requests(), 0, "nothing reaches the upstream through a refused module");
    assert!(envoy.log().contains("Plugin meshwasm.fault failed to load"), "{}", envoy.log());
}
