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

/// The node metadata restricted to the exchanged keys, as a serialized Struct.
fn exchange_struct(node_metadata: &Value) -> Vec<u8> {
    let mut m = Map::new();
    for k in EXCHANGED_KEYS {
        if let Some(v) = node_metadata.get(*k) {
            m.insert((*k).to_string(), v.clone());
        }
    }
    meshwasm_sdk_ext::props::struct_to_bytes(&Value::Object(m))
}

/// The `x-envoy-peer-metadata` value a proxy sends: its node metadata, restricted to the
/// exchanged keys, as a base64 serialized Struct.
pub fn encode_exchange(node_metadata: &Value) -> String {
    base64::encode(&exchange_struct(node_metadata))
}

// === TCP metadata exchange (istio/proxy's in-band frame) ===

/// The frame's magic number (istio/proxy's `MetadataExchangeInitialHeader`).
pub const TCP_MAGIC: u32 = 0x3D23_0467;
/// Magic and length, both big-endian `u32`.
pub const TCP_HEADER: usize = 8;
/// The largest frame body accepted (a peer claiming more is not a peer).
pub const TCP_MAX_BODY: usize = 64 * 1024;
const STRUCT_TYPE_URL: &str = "type.googleapis.com/google.protobuf.Struct";

/// The frame a proxy sends at the start of a TCP connection: the header, then a
/// `google.protobuf.Any` holding the exchanged node metadata `Struct`.
pub fn encode_tcp_frame(node_metadata: &Value) -> Vec<u8> {
    let mut any = Vec::new();
    meshwasm_sdk_ext::proto::put_bytes(1, STRUCT_TYPE_URL.as_bytes(), &mut any);
    meshwasm_sdk_ext::proto::put_bytes(2, &exchange_struct(node_metadata), &mut any);
    let mut out = Vec::with_capacity(TCP_HEADER + any.len());
    out.extend_from_slice(&TCP_MAGIC.to_be_bytes());
    out.extend_from_slice(&u32::try_from(any.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&any);
    out
}

/// What the first bytes of a connection hold.
#[derive(Debug, PartialEq)]
pub enum TcpFrame {
    /// Not a frame: the bytes are the application's.
    None,
    /// The start of a frame: wait for more bytes.
    Partial,
    /// A whole frame of this many bytes, and the peer it carries (an undecodable body is
    /// still a frame: it is stripped, the peer stays unknown).
    Whole(usize, Option<Box<Workload>>),
}

pub fn decode_tcp_frame(data: &[u8]) -> TcpFrame {
    let magic = TCP_MAGIC.to_be_bytes();
    let n = data.len().min(4);
    if data.get(..n) != magic.get(..n) {
        return TcpFrame::None;
    }
    let Some(len) = data.get(4..TCP_HEADER).and_then(|b| <[u8; 4]>::try_from(b).ok()) else {
        return TcpFrame::Partial;
    };
    let len = u32::from_be_bytes(len) as usize;
    if len > TCP_MAX_BODY {
        return TcpFrame::None;
    }
    let Some(body) = data.get(TCP_HEADER..TCP_HEADER + len) else { return TcpFrame::Partial };
    TcpFrame::Whole(TCP_HEADER + len, decode_any_struct(body).ok().map(|md| Box::new(Workload::from_metadata(&md))))
}

fn decode_any_struct(any: &[u8]) -> Result<Value, String> {
    let mut r = meshwasm_sdk_ext::proto::Reader::new(any);
    let mut value = None;
    while let Some((field, wire)) = r.key()? {
        match (field, wire) {
            (1, 2) => {
                if r.string()? != STRUCT_TYPE_URL {
                    return Err("not a Struct".into());
                }
            }
            (2, 2) => value = Some(r.bytes()?),
            (_, w) => r.skip(w)?,
        }
    }
    meshwasm_sdk_ext::props::struct_from_bytes(value.ok_or("no value")?)
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
    fn tcp_frame_roundtrip_partial_and_foreign_bytes() {
        let frame = encode_tcp_frame(&client_md());
        let mut data = frame.clone();
        data.extend_from_slice(b"world\n");
        match decode_tcp_frame(&data) {
            TcpFrame::Whole(n, Some(w)) => {
                assert_eq!(n, frame.len());
                assert_eq!(*w, Workload::from_metadata(&client_md()));
            }
            other => panic!("{other:?}"),
        }
        for cut in [1, 3, 4, 7, 8, frame.len() - 1] {
            assert_eq!(decode_tcp_frame(&frame[..cut]), TcpFrame::Partial, "{cut} bytes");
        }
        assert_eq!(decode_tcp_frame(b"GET / HTTP/1.1"), TcpFrame::None);
        assert_eq!(decode_tcp_frame(b""), TcpFrame::Partial);
        let mut huge = TCP_MAGIC.to_be_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode_tcp_frame(&huge), TcpFrame::None);
        let mut junk = TCP_MAGIC.to_be_bytes().to_vec();
        junk.extend_from_slice(&3u32.to_be_bytes());
        junk.extend_from_slice(&[0xff, 0xff, 0xff]);
        assert_eq!(decode_tcp_frame(&junk), TcpFrame::Whole(11, None));
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
