//! Wasm modules as OCI images in the formats Istio's image fetcher accepts, built
//! reproducibly, and pushed to any OCI distribution registry with `oci-client`.
//!
//! Two variants (the Wasm image specification's names):
//!
//! - **compat** (default): an OCI image manifest, a valid OCI image config (`os: wasip1`,
//!   `architecture: wasm`, the layer's diff id), and ONE `tar+gzip` layer whose only entry is
//!   `plugin.wasm`. Istio takes the last layer, requires gzip, takes the first entry named
//!   `plugin.wasm`. Any registry and any image tool (docker, skopeo, crane) handle it.
//! - **artifact** (what WebAssembly Hub's `wasme` pushes): config media type
//!   `application/vnd.module.wasm.config.v1+json` (`type`, `abiVersions`, `config.rootIds`),
//!   two layers: that runtime config, and the raw module as
//!   `application/vnd.module.wasm.content.layer.v1+wasm`. The module blob is the `.wasm`
//!   itself, so a stock Envoy can fetch it straight from the registry's blob URL.
//!
//! Reproducible: the tar entry has mtime 0, uid/gid 0, mode 0644, no user names; the gzip
//! header has mtime 0, no file name, OS 255 (unknown), a fixed level; JSON documents are
//! written with a fixed key order. The same module gives the same manifest digest.
//!
//! One manifest per image, never an index: an index has a digest of its own, which breaks
//! pinning `sha256` in a WasmPlugin.

use std::io::Write as _;
use std::path::Path;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use serde_json::json;
use sha2::{Digest as _, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const WASM_CONFIG: &str = "application/vnd.module.wasm.config.v1+json";
pub const WASM_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
/// The compat variant's manifest annotation (Wasm image specification, compat variant).
pub const VARIANT_ANNOTATION: &str = "module.wasm.image/variant";
/// The file name Istio looks for in a compat layer.
pub const PLUGIN_FILE: &str = "plugin.wasm";

/// Which image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Compat,
    Artifact,
}

impl Variant {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "compat" => Ok(Variant::Compat),
            "artifact" | "oci" => Ok(Variant::Artifact),
            other => Err(format!("unknown image variant `{other}` (compat or artifact)")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Variant::Compat => "compat",
            Variant::Artifact => "artifact",
        }
    }
}

/// A content-addressed blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub media_type: &'static str,
    pub data: Vec<u8>,
    /// `sha256:<hex>`
    pub digest: String,
}

impl Blob {
    fn new(media_type: &'static str, data: Vec<u8>) -> Self {
        let digest = format!("sha256:{}", sha256_hex(&data));
        Self { media_type, data, digest }
    }

    fn descriptor(&self, title: Option<&str>) -> serde_json::Value {
        let mut d = json!({ "mediaType": self.media_type, "digest": self.digest, "size": self.data.len() });
        if let (Some(title), Some(map)) = (title, d.as_object_mut()) {
            map.insert("annotations".into(), json!({ "org.opencontainers.image.title": title }));
        }
        d
    }
}

/// A built image: its manifest and every blob the manifest references.
#[derive(Debug, Clone)]
pub struct Image {
    pub variant: Variant,
    /// The manifest exactly as pushed (its sha256 is the manifest digest).
    pub manifest: Vec<u8>,
    /// `sha256:<hex>` of [`Image::manifest`]: WasmPlugin `sha256` (without `sha256:`) for
    /// `oci://` URLs.
    pub manifest_digest: String,
    pub config: Blob,
    pub layers: Vec<Blob>,
    /// hex sha256 of the module itself: WasmPlugin `sha256` for `http(s)://` URLs and Envoy
    /// `vm_config.code.remote.sha256`.
    pub module_sha256: String,
}

impl Image {
    /// Every distinct blob, config first.
    pub fn blobs(&self) -> Vec<&Blob> {
        let mut out: Vec<&Blob> = vec![&self.config];
        for l in &self.layers {
            if !out.iter().any(|b| b.digest == l.digest) {
                out.push(l);
            }
        }
        out
    }

    /// The manifest digest without the `sha256:` prefix, as WasmPlugin `sha256` wants it.
    pub fn manifest_hex(&self) -> &str {
        self.manifest_digest.trim_start_matches("sha256:")
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    let mut s = String::with_capacity(64);
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The `proxy_abi_version_*` functions a module exports (its Proxy-Wasm ABI versions).
pub fn abi_versions(module: &[u8]) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(module) {
        let payload = payload.map_err(|e| format!("not a valid Wasm module: {e}"))?;
        if let wasmparser::Payload::ExportSection(reader) = payload {
            for export in reader {
                let export = export.map_err(|e| format!("not a valid Wasm module: {e}"))?;
                if export.name.starts_with("proxy_abi_version_") {
                    out.push(export.name.to_string());
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Builds the image of `module` in `variant`. `root_id` is the module's root context id
/// (`meshwasm.<filter>`), recorded in the artifact variant's config.
pub fn build(module: &[u8], variant: Variant, root_id: &str) -> Result<Image, String> {
    if !module.starts_with(b"\0asm") {
        return Err("not a Wasm module: it does not start with the magic bytes \\0asm".into());
    }
    let abis = abi_versions(module)?;
    if abis.is_empty() {
        return Err("not a Proxy-Wasm module: it exports no proxy_abi_version_* function".into());
    }
    let module_sha256 = sha256_hex(module);
    let (config, layers, annotations) = match variant {
        Variant::Compat => {
            let tar = plugin_tar(module)?;
            let diff_id = format!("sha256:{}", sha256_hex(&tar));
            let layer = Blob::new(OCI_LAYER_TAR_GZIP, gzip(&tar)?);
            let config = json!({
                "architecture": "wasm",
                "os": "wasip1",
                "config": {},
                "rootfs": { "type": "layers", "diff_ids": [diff_id] },
            });
            let config = Blob::new(OCI_CONFIG, to_vec(&config)?);
            (config, vec![layer], json!({ VARIANT_ANNOTATION: "compat" }))
        }
        Variant::Artifact => {
            let runtime = json!({
                "type": "envoy_proxy",
                "abiVersions": abis,
                "config": { "rootIds": [root_id] },
            });
            let config = Blob::new(WASM_CONFIG, to_vec(&runtime)?);
            let wasm = Blob::new(WASM_LAYER, module.to_vec());
            (config.clone(), vec![config, wasm], json!({}))
        }
    };
    let layer_descriptors: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| match (variant, l.media_type) {
            (Variant::Artifact, WASM_CONFIG) => l.descriptor(Some("runtime-config.json")),
            (Variant::Artifact, _) => l.descriptor(Some(PLUGIN_FILE)),
            (Variant::Compat, _) => l.descriptor(None),
        })
        .collect();
    let mut manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(None),
        "layers": layer_descriptors,
    });
    if let (Some(map), Some(a)) = (manifest.as_object_mut(), annotations.as_object()) {
        if !a.is_empty() {
            map.insert("annotations".into(), annotations.clone());
        }
    }
    let manifest = to_vec(&manifest)?;
    let manifest_digest = format!("sha256:{}", sha256_hex(&manifest));
    Ok(Image { variant, manifest, manifest_digest, config, layers, module_sha256 })
}

fn to_vec(v: &serde_json::Value) -> Result<Vec<u8>, String> {
    serde_json::to_vec(v).map_err(|e| format!("serializing JSON: {e}"))
}

/// A tar archive with one entry, `plugin.wasm`, with fixed metadata.
fn plugin_tar(module: &[u8]) -> Result<Vec<u8>, String> {
    let mut header = tar::Header::new_ustar();
    header.set_path(PLUGIN_FILE).map_err(|e| format!("tar: {e}"))?;
    header.set_size(module.len() as u64);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let mut builder = tar::Builder::new(Vec::new());
    builder.append(&header, module).map_err(|e| format!("tar: {e}"))?;
    builder.into_inner().map_err(|e| format!("tar: {e}"))
}

/// gzip with a fixed header (mtime 0, no name, OS unknown) and level.
fn gzip(data: &[u8]) -> Result<Vec<u8>, String> {
    let mut enc =
        flate2::GzBuilder::new().mtime(0).operating_system(255).write(Vec::new(), flate2::Compression::best());
    enc.write_all(data).map_err(|e| format!("gzip: {e}"))?;
    enc.finish().map_err(|e| format!("gzip: {e}"))
}

/// Writes the image as an OCI image layout in `dir` (`oci-layout`, `index.json`,
/// `blobs/sha256/…`), for `skopeo copy oci:<dir> …` and friends. The layout's `index.json`
/// is the layout's table of contents; it is not pushed.
pub fn write_layout(image: &Image, dir: &Path, tag: &str) -> Result<(), String> {
    let blobs = dir.join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs).map_err(|e| format!("creating {}: {e}", blobs.display()))?;
    let write = |name: &Path, data: &[u8]| std::fs::write(name, data).map_err(|e| format!("{}: {e}", name.display()));
    for b in image.blobs() {
        write(&blobs.join(b.digest.trim_start_matches("sha256:")), &b.data)?;
    }
    write(&blobs.join(image.manifest_hex()), &image.manifest)?;
    write(&dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "digest": image.manifest_digest,
            "size": image.manifest.len(),
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }],
    });
    write(&dir.join("index.json"), &to_vec(&index)?)
}

// === push ===

/// How to reach the registry.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// Talk plain HTTP (a local registry); HTTPS otherwise.
    pub plain_http: bool,
}

/// Where an image went.
#[derive(Debug, Clone)]
pub struct Pushed {
    pub reference: String,
    /// The digest the registry reports for the manifest (checked equal to the built one).
    pub manifest_digest: String,
    pub module_sha256: String,
    /// `http(s)://<registry>/v2/<repository>/blobs/sha256:<module>`: the raw module, for
    /// Envoy `vm_config.code.remote` (artifact variant only; a compat layer is a tar.gz).
    pub module_blob_url: Option<String>,
}

/// Credentials for `registry`: `MESHWASM_REGISTRY_USERNAME`/`MESHWASM_REGISTRY_PASSWORD`
/// when set, else the docker config (`$DOCKER_CONFIG/config.json`, `~/.docker/config.json`,
/// credential helpers included), else anonymous.
pub fn credentials(registry: &str) -> Result<RegistryAuth, String> {
    if let (Ok(user), Ok(password)) =
        (std::env::var("MESHWASM_REGISTRY_USERNAME"), std::env::var("MESHWASM_REGISTRY_PASSWORD"))
    {
        return Ok(RegistryAuth::Basic(user, password));
    }
    use docker_credential::{CredentialRetrievalError as E, DockerCredential};
    let config_dir = std::env::var_os("DOCKER_CONFIG")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".docker")));
    if !config_dir.is_some_and(|d| d.join("config.json").is_file()) {
        return Ok(RegistryAuth::Anonymous);
    }
    match docker_credential::get_credential(registry) {
        Ok(DockerCredential::UsernamePassword(user, password)) => Ok(RegistryAuth::Basic(user, password)),
        Ok(DockerCredential::IdentityToken(_)) => Err(format!(
            "the docker config has an identity token for {registry}; oci-client needs a user name and \
             password: set MESHWASM_REGISTRY_USERNAME and MESHWASM_REGISTRY_PASSWORD"
        )),
        Err(E::ConfigNotFound | E::NoCredentialConfigured) => Ok(RegistryAuth::Anonymous),
        Err(e) => Err(format!("reading docker credentials for {registry}: {e}")),
    }
}

/// Installs ring as rustls' process-wide crypto provider (reqwest is built without one, to
/// avoid compiling aws-lc). Idempotent.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Pushes `image` to `reference` (`registry/repository:tag`).
pub async fn push(image: &Image, reference: &str, opts: &PushOptions) -> Result<Pushed, String> {
    install_crypto_provider();
    let reference: Reference = reference.parse().map_err(|e| format!("image reference `{reference}`: {e}"))?;
    let registry = reference.resolve_registry().to_string();
    let auth = credentials(&registry)?;
    let protocol = if opts.plain_http { ClientProtocol::Http } else { ClientProtocol::Https };
    let client = Client::new(ClientConfig { protocol, ..Default::default() });
    let ctx = |what: &str| {
        let reference = reference.whole();
        let what = what.to_string();
        move |e: oci_client::errors::OciDistributionError| format!("{what} ({reference}): {e}")
    };
    client.auth(&reference, &auth, RegistryOperation::Push).await.map_err(ctx("authenticating"))?;
    for blob in image.blobs() {
        if client.blob_exists(&reference, &blob.digest).await.unwrap_or(false) {
            continue;
        }
        client
            .push_blob(&reference, blob.data.clone(), &blob.digest)
            .await
            .map_err(ctx(&format!("pushing blob {}", blob.digest)))?;
    }
    let content_type = http::HeaderValue::from_static(OCI_MANIFEST);
    client
        .push_manifest_raw(&reference, image.manifest.clone(), content_type)
        .await
        .map_err(ctx("pushing the manifest"))?;
    let digest = client.fetch_manifest_digest(&reference, &auth).await.map_err(ctx("reading the manifest back"))?;
    if digest != image.manifest_digest {
        return Err(format!(
            "the registry reports manifest digest {digest} for {}, but the pushed manifest is {}",
            reference.whole(),
            image.manifest_digest
        ));
    }
    let scheme = if opts.plain_http { "http" } else { "https" };
    let module_blob_url = (image.variant == Variant::Artifact)
        .then(|| format!("{scheme}://{registry}/v2/{}/blobs/sha256:{}", reference.repository(), image.module_sha256));
    Ok(Pushed {
        reference: reference.whole(),
        manifest_digest: digest,
        module_sha256: image.module_sha256.clone(),
        module_blob_url,
    })
}

/// The labelled lines `meshwasm oci push` prints.
pub fn describe(image: &Image, reference: Option<&str>, blob_url: Option<&str>) -> String {
    let mut s = String::new();
    let hex = image.manifest_hex();
    s.push_str(&format!("variant          {}\n", image.variant.name()));
    s.push_str(&format!("manifest digest  {}\n", image.manifest_digest));
    match reference {
        Some(r) => s.push_str(&format!("  → WasmPlugin   url: oci://{r}  sha256: {hex}\n")),
        None => s.push_str(&format!("  → WasmPlugin   sha256: {hex} (with url: oci://…)\n")),
    }
    s.push_str(&format!("module sha256    {}\n", image.module_sha256));
    s.push_str("  → WasmPlugin   sha256 with an http(s):// url to the .wasm itself\n");
    s.push_str("  → Envoy        vm_config.code.remote.sha256\n");
    if let Some(url) = blob_url {
        s.push_str(&format!("module blob URL  {url}\n"));
        s.push_str("  → Envoy        vm_config.code.remote.http_uri.uri (a cluster must reach the registry)\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    /// The smallest Proxy-Wasm-looking module: a type, a function, exported as
    /// `proxy_abi_version_0_2_1`.
    fn module() -> Vec<u8> {
        let mut m = b"\0asm\x01\0\0\0".to_vec();
        m.extend_from_slice(&[0x01, 0x04, 0x01, 0x60, 0x00, 0x00]); // type () -> ()
        m.extend_from_slice(&[0x03, 0x02, 0x01, 0x00]); // one function of type 0
        let name = b"proxy_abi_version_0_2_1";
        let mut exp = vec![0x01, name.len() as u8];
        exp.extend_from_slice(name);
        exp.extend_from_slice(&[0x00, 0x00]);
        m.push(0x07);
        m.push(exp.len() as u8);
        m.extend_from_slice(&exp);
        m.extend_from_slice(&[0x0a, 0x04, 0x01, 0x02, 0x00, 0x0b]); // body: end
        m
    }

    #[test]
    fn building_twice_gives_the_same_manifest_digest() {
        for variant in [Variant::Compat, Variant::Artifact] {
            let a = build(&module(), variant, "meshwasm.x").unwrap();
            let b = build(&module(), variant, "meshwasm.x").unwrap();
            assert_eq!(a.manifest, b.manifest);
            assert_eq!(a.manifest_digest, b.manifest_digest);
            assert_eq!(a.blobs(), b.blobs());
        }
        let mut other = module();
        other.extend_from_slice(&[0x00, 0x02, 0x01, b'x']); // a custom section: a different module
        assert_ne!(
            build(&module(), Variant::Compat, "x").unwrap().manifest_digest,
            build(&other, Variant::Compat, "x").unwrap().manifest_digest
        );
    }

    #[test]
    fn compat_layer_is_gzip_with_plugin_wasm_first() {
        let image = build(&module(), Variant::Compat, "meshwasm.x").unwrap();
        assert_eq!(image.layers.len(), 1);
        let layer = &image.layers[0];
        assert_eq!(layer.media_type, OCI_LAYER_TAR_GZIP);
        assert_eq!(&layer.data[..2], &[0x1f, 0x8b]);
        assert_eq!(&layer.data[4..8], &[0, 0, 0, 0], "gzip mtime must be 0");
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(&layer.data[..]));
        let mut entries = tar.entries().unwrap();
        let mut first = entries.next().unwrap().unwrap();
        assert_eq!(first.path().unwrap().to_str(), Some("plugin.wasm"));
        assert_eq!(first.header().mtime().unwrap(), 0);
        let mut data = Vec::new();
        first.read_to_end(&mut data).unwrap();
        assert_eq!(data, module());
        let manifest: serde_json::Value = serde_json::from_slice(&image.manifest).unwrap();
        assert_eq!(manifest["annotations"][VARIANT_ANNOTATION], "compat");
        let config: serde_json::Value = serde_json::from_slice(&image.config.data).unwrap();
        assert_eq!(config["os"], "wasip1");
        assert_eq!(config["rootfs"]["type"], "layers");
    }

    #[test]
    fn artifact_records_abi_versions_and_root_ids() {
        let image = build(&module(), Variant::Artifact, "meshwasm.x").unwrap();
        let config: serde_json::Value = serde_json::from_slice(&image.config.data).unwrap();
        assert_eq!(
            config,
            json!({"type": "envoy_proxy", "abiVersions": ["proxy_abi_version_0_2_1"], "config": {"rootIds": ["meshwasm.x"]}})
        );
        assert_eq!(image.layers.len(), 2);
        assert_eq!(image.layers[1].data, module());
        assert_eq!(image.layers[1].digest, format!("sha256:{}", image.module_sha256));
        assert_eq!(image.blobs().len(), 2, "the runtime config is one blob, referenced twice");
    }

    #[test]
    fn refuses_what_is_not_a_proxy_wasm_module() {
        assert!(build(b"hello", Variant::Compat, "x").unwrap_err().contains("\\0asm"));
        assert!(build(b"\0asm\x01\0\0\0", Variant::Compat, "x").unwrap_err().contains("proxy_abi_version"));
    }
}
