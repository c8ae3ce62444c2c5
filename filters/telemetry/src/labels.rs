//! The 25 standard label values, derived as Istio's stats filter derives them (pure: the
//! filter gathers the inputs from the proxy).

use serde_json::Value;

use crate::config::{Reporter, STANDARD_TAGS};
use crate::peer::{principal_namespace, Workload};

pub const UNKNOWN: &str = "unknown";
const LATEST: &str = "latest";

/// Envoy's response flags, in bit order, with the short codes of `%RESPONSE_FLAGS%`.
const RESPONSE_FLAGS: [&str; 30] = [
    "LH", "UH", "UT", "LR", "UR", "UF", "UC", "UO", "NR", "DI", "FI", "RL", "UAEX", "RLSE", "DC", "URX", "SI", "IH",
    "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE", "NC", "OM", "DF", "DO", "DR", "UDO",
];

/// `response.flags` (a bitmask) as Envoy prints it: short codes joined by `,`, `-` for none.
pub fn response_flags(bits: u64) -> String {
    let codes: Vec<&str> =
        RESPONSE_FLAGS.iter().enumerate().filter(|(i, _)| bits & (1u64 << i) != 0).map(|(_, c)| *c).collect();
    if codes.is_empty() {
        "-".into()
    } else {
        codes.join(",")
    }
}

/// `(destination_service, destination_service_name)` before the reporter's fallbacks: the
/// Host header (unless disabled), overridden by the upstream cluster's
/// `filter_metadata.istio.services[0]`, or by the pass-through cluster names.
pub fn destination_service(
    host_header: Option<&str>,
    disable_host_header_fallback: bool,
    route_name: &str,
    cluster_name: &str,
    cluster_istio_metadata: Option<&Value>,
) -> (String, String) {
    let mut host = String::new();
    let mut name = String::new();
    if !disable_host_header_fallback {
        if let Some(h) = host_header {
            host = h.to_string();
            name = h.to_string();
        }
    }
    match route_name {
        "block_all" => name = "BlackHoleCluster".into(),
        "allow_any" => name = "PassthroughCluster".into(),
        _ => match cluster_name {
            "BlackHoleCluster"
            | "PassthroughCluster"
            | "InboundPassthroughCluster"
            | "InboundPassthroughClusterIpv4"
            | "InboundPassthroughClusterIpv6" => name = cluster_name.into(),
            _ => {
                let service = cluster_istio_metadata
                    .and_then(|m| m.get("services"))
                    .and_then(|s| s.get(0))
                    .and_then(Value::as_object);
                if let Some(s) = service {
                    if let Some(h) = s.get("host").and_then(Value::as_str) {
                        host = h.to_string();
                    }
                    name = match s.get("name").and_then(Value::as_str) {
                        Some(n) => n.to_string(),
                        None => host.split('.').next().unwrap_or_default().to_string(),
                    };
                }
            }
        },
    }
    (host, name)
}

/// Everything the standard labels depend on, for one request.
pub struct Inputs<'a> {
    pub reporter: Reporter,
    pub local: &'a Workload,
    pub peer: Option<&'a Workload>,
    pub service_host: &'a str,
    pub service_name: &'a str,
    /// The peer's and this proxy's URI SANs (empty without TLS).
    pub peer_san: &'a str,
    pub local_san: &'a str,
    pub grpc: bool,
    pub response_code: u64,
    pub grpc_status: Option<u64>,
    pub response_flags: u64,
}

fn or<'a>(v: &'a str, fallback: &'a str) -> &'a str {
    if v.is_empty() {
        fallback
    } else {
        v
    }
}

/// The standard values, index-aligned with `STANDARD_TAGS`.
pub fn standard(i: &Inputs<'_>) -> Vec<String> {
    let peer = i.peer;
    let p = |f: fn(&Workload) -> &str, fallback: &'static str| -> String {
        peer.map(f).filter(|v| !v.is_empty()).unwrap_or(fallback).to_string()
    };
    let peer_namespace = principal_namespace(i.peer_san)
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .or_else(|| peer.map(|w| w.namespace.clone()).filter(|n| !n.is_empty()))
        .unwrap_or_else(|| UNKNOWN.into());
    let l = i.local;
    let mut v: Vec<String> = Vec::with_capacity(STANDARD_TAGS.len());
    match i.reporter {
        Reporter::Server => {
            v.push("destination".into());
            v.push(p(|w| &w.workload, UNKNOWN));
            v.push(p(|w| &w.canonical_service, UNKNOWN));
            v.push(p(|w| &w.canonical_revision, LATEST));
            v.push(peer_namespace);
            v.push(or(i.peer_san, UNKNOWN).into());
            v.push(p(|w| &w.app, UNKNOWN));
            v.push(p(|w| &w.version, UNKNOWN));
            v.push(p(|w| &w.cluster, UNKNOWN));
            v.push(l.workload.clone());
            v.push(l.namespace.clone());
            v.push(or(i.local_san, UNKNOWN).into());
            v.push(l.app.clone());
            v.push(l.version.clone());
            v.push(or(i.service_host, &l.canonical_service).into());
            v.push(l.canonical_service.clone());
            v.push(l.canonical_revision.clone());
            v.push(or(i.service_name, &l.canonical_service).into());
            v.push(l.namespace.clone());
            v.push(l.cluster.clone());
        }
        Reporter::Client => {
            v.push("source".into());
            v.push(l.workload.clone());
            v.push(l.canonical_service.clone());
            v.push(l.canonical_revision.clone());
            v.push(l.namespace.clone());
            v.push(or(i.local_san, UNKNOWN).into());
            v.push(l.app.clone());
            v.push(l.version.clone());
            v.push(l.cluster.clone());
            v.push(p(|w| &w.workload, UNKNOWN));
            v.push(peer_namespace.clone());
            v.push(or(i.peer_san, UNKNOWN).into());
            v.push(p(|w| &w.app, UNKNOWN));
            v.push(p(|w| &w.version, UNKNOWN));
            v.push(or(i.service_host, UNKNOWN).into());
            v.push(p(|w| &w.canonical_service, UNKNOWN));
            v.push(p(|w| &w.canonical_revision, LATEST));
            v.push(or(i.service_name, UNKNOWN).into());
            v.push(peer_namespace);
            v.push(p(|w| &w.cluster, UNKNOWN));
        }
    }
    v.push(if i.grpc { "grpc" } else { "http" }.into());
    v.push(response_flags(i.response_flags));
    v.push(
        match i.reporter {
            // The client side cannot know the server's policy.
            Reporter::Client => UNKNOWN,
            Reporter::Server if !i.peer_san.is_empty() && !i.local_san.is_empty() => "mutual_tls",
            Reporter::Server => "none",
        }
        .into(),
    );
    v.push(i.response_code.to_string());
    v.push(match (i.grpc, i.grpc_status) {
        (true, Some(s)) => s.to_string(),
        _ => String::new(),
    });
    v
}

/// A label value as it goes into the stat name: the separators Envoy's tag extraction looks
/// for (`=.=` and `;.;`) are broken up so a value cannot forge another label.
pub fn escape(v: &str) -> std::borrow::Cow<'_, str> {
    if v.contains(";.;") || v.contains("=.=") {
        std::borrow::Cow::Owned(v.replace(";.;", ";_;").replace("=.=", "=_="))
    } else {
        std::borrow::Cow::Borrowed(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flags_print_like_envoy() {
        assert_eq!(response_flags(0), "-");
        assert_eq!(response_flags(0x100), "NR");
        assert_eq!(response_flags(0x2 | 0x20), "UH,UF");
        assert_eq!(response_flags(0x8000), "URX");
    }

    #[test]
    fn destination_service_precedence() {
        let md = json!({"services": [{"host": "server.default.svc.cluster.local", "name": "server", "namespace": "default"}]});
        assert_eq!(
            destination_service(Some("127.0.0.1:80"), false, "r", "c", Some(&md)),
            ("server.default.svc.cluster.local".into(), "server".into())
        );
        assert_eq!(destination_service(Some("h:1"), false, "r", "c", None), ("h:1".into(), "h:1".into()));
        assert_eq!(destination_service(Some("h:1"), true, "r", "c", None), (String::new(), String::new()));
        assert_eq!(destination_service(Some("h"), false, "r", "PassthroughCluster", None).1, "PassthroughCluster");
        let no_name = json!({"services": [{"host": "a.b.svc"}]});
        assert_eq!(destination_service(None, false, "r", "c", Some(&no_name)).1, "a");
    }

    #[test]
    fn escaping_breaks_separators() {
        assert_eq!(escape("a;.;b=.=c"), "a;_;b=_=c");
        assert_eq!(escape("plain"), "plain");
    }
}
