//! Workload identity: from Envoy's node metadata (the local proxy), from the peer metadata
//! exchange headers (the other proxy), or from an endpoint's `istio.workload` metadata (the
//! client's fallback when the server did not answer).
//!
//! The exchange carries Istio's headers: `x-envoy-peer-metadata-id` (the node id) and
//! `x-envoy-peer-metadata` (base64 of a serialized `google.protobuf.Struct` with the node
//! metadata keys below).

use serde_json::{Map, Value};

use crate::base64;

pub const HEADER: &str = "x-envoy-peer-metadata";
pub const HEADER_ID: &str = "x-envoy-peer-metadata-id";

/// The node metadata keys a proxy sends to its peer (Istio's exchanged set).
pub const EXCHANGED_KEYS: &[&str] = &[
    "APP_CONTAINERS",
    "CLUSTER_ID",
    "INSTANCE_IPS",
    "ISTIO_VERSION",
    "LABELS",
    "MESH_ID",
    "NAME",
    "NAMESPACE",
    "OWNER",
    "PLATFORM_METADATA",
    "SERVICE_ACCOUNT",
    "WORKLOAD_NAME",
];

const CANONICAL_NAME: &str = "service.istio.io/canonical-name";
const CANONICAL_REVISION: &str = "service.istio.io/canonical-revision";

/// What the labels need to know about one workload. Empty strings mean "not known"; the
/// label derivation decides the fallback (`unknown`, `latest`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub workload: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub app: String,
    pub version: String,
    pub cluster: String,
    /// The peer as expressions see it (`filter_state.upstream_peer.service`, `.labels['x']`).
    pub json: Value,
}

fn text(v: &Value, key: &str) -> String {
    v.get(key).and_then(Value::as_str).unwrap_or_default().to_string()
}

impl Workload {
    /// From node metadata (a JSON object: `NAME`, `NAMESPACE`, `WORKLOAD_NAME`, `LABELS`, …).
    pub fn from_metadata(md: &Value) -> Workload {
        let labels = md.get("LABELS").cloned().unwrap_or(Value::Object(Map::new()));
        let label = |k: &str| text(&labels, k);
        let first = |keys: &[&str]| keys.iter().map(|k| label(k)).find(|v| !v.is_empty()).unwrap_or_default();
        let mut w = Workload {
            name: text(md, "NAME"),
            namespace: text(md, "NAMESPACE"),
            workload: text(md, "WORKLOAD_NAME"),
            canonical_service: label(CANONICAL_NAME),
            canonical_revision: label(CANONICAL_REVISION),
            app: first(&["app", "app.kubernetes.io/name"]),
            version: first(&["version", "app.kubernetes.io/version"]),
            cluster: text(md, "CLUSTER_ID"),
            json: Value::Null,
        };
        w.json = w.to_json(labels);
        w
    }

    /// From an endpoint's `filter_metadata.istio.workload`:
    /// `<workload>;<namespace>;<canonical service>;<canonical revision>;<cluster>`.
    pub fn from_endpoint(s: &str) -> Option<Workload> {
        let parts: Vec<&str> = s.split(';').collect();
        let [workload, namespace, service, revision, cluster] = parts.as_slice() else { return None };
        let mut w = Workload {
            workload: (*workload).to_string(),
            namespace: (*namespace).to_string(),
            canonical_service: (*service).to_string(),
            canonical_revision: (*revision).to_string(),
            cluster: (*cluster).to_string(),
            ..Workload::default()
        };
        w.json = w.to_json(Value::Object(Map::new()));
        Some(w)
    }

    fn to_json(&self, labels: Value) -> Value {
        serde_json::json!({
            "name": self.name, "namespace": self.namespace, "workload": self.workload,
            "service": self.canonical_service, "revision": self.canonical_revision,
            "app": self.app, "version": self.version, "cluster": self.cluster, "labels": labels,
        })
    }
}

/// The `x-envoy-peer-metadata` value a proxy sends: its node metadata, restricted to the
/// exchanged keys, as a base64 serialized Struct.
pub fn encode_exchange(node_metadata: &Value) -> String {
    let mut m = Map::new();
    for k in EXCHANGED_KEYS {
        if let Some(v) = node_metadata.get(*k) {
            m.insert((*k).to_string(), v.clone());
        }
    }
    base64::encode(&meshwasm_sdk_ext::props::struct_to_bytes(&Value::Object(m)))
}

/// Decode a peer's `x-envoy-peer-metadata` value.
pub fn decode_exchange(header: &str) -> Result<Workload, String> {
    let bytes = base64::decode(header.trim())?;
    let md = meshwasm_sdk_ext::props::struct_from_bytes(&bytes)?;
    Ok(Workload::from_metadata(&md))
}

/// Decode a serialized `envoy.config.core.v3.Node`: `(id, metadata as JSON)`.
pub fn decode_node(bytes: &[u8]) -> Result<(String, Value), String> {
    // Node { string id = 1; string cluster = 2; Struct metadata = 3; ... }
    let mut r = meshwasm_sdk_ext::proto::Reader::new(bytes);
    let mut id = String::new();
    let mut md = Value::Object(Map::new());
    while let Some((field, wire)) = r.key()? {
        match (field, wire) {
            (1, 2) => id = r.string()?,
            (3, 2) => md = meshwasm_sdk_ext::props::struct_from_bytes(r.bytes()?)?,
            (_, w) => r.skip(w)?,
        }
    }
    Ok((id, md))
}

/// The namespace in a SPIFFE principal `spiffe://<domain>/ns/<namespace>/sa/<account>`.
pub fn principal_namespace(principal: &str) -> Option<&str> {
    let (_, rest) = principal.split_once("/ns/")?;
    Some(rest.split('/').next().unwrap_or(rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn client_md() -> Value {
        json!({"NAME": "productpage-v1-84975bc778-pxz2w", "NAMESPACE": "default", "WORKLOAD_NAME": "productpage-v1",
               "CLUSTER_ID": "client-cluster", "STS_PORT": "1",
               "LABELS": {"app": "productpage", "version": "v1", "service.istio.io/canonical-name": "productpage-v1",
                          "service.istio.io/canonical-revision": "version-1", "role": "client"}})
    }

    #[test]
    fn exchange_roundtrip_keeps_the_identity() {
        let header = encode_exchange(&client_md());
        let w = decode_exchange(&header).unwrap();
        assert_eq!(w, Workload::from_metadata(&client_md()));
        assert_eq!(w.canonical_service, "productpage-v1");
        assert_eq!(w.canonical_revision, "version-1");
        assert_eq!(w.app, "productpage");
        assert_eq!(w.json["labels"]["role"], "client");
        let raw = meshwasm_sdk_ext::props::struct_from_bytes(&base64::decode(&header).unwrap()).unwrap();
        assert!(raw.get("STS_PORT").is_none(), "only the exchanged keys travel");
        assert!(decode_exchange("!!!").is_err());
        assert!(decode_exchange("AAAA").is_err() || decode_exchange("AAAA").is_ok(), "never panics");
    }

    #[test]
    fn endpoint_and_principal() {
        let w = Workload::from_endpoint("ratings-v1;default;ratings;version-1;server-cluster").unwrap();
        assert_eq!(
            (w.workload.as_str(), w.canonical_service.as_str(), w.cluster.as_str()),
            ("ratings-v1", "ratings", "server-cluster")
        );
        assert!(w.app.is_empty());
        assert!(Workload::from_endpoint("a;b").is_none());
        assert_eq!(principal_namespace("spiffe://cluster.local/ns/foo/sa/bar"), Some("foo"));
        assert_eq!(principal_namespace("spiffe://cluster.local/ns/foo"), Some("foo"));
        assert_eq!(principal_namespace("x"), None);
    }
}
