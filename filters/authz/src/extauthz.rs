//! CUSTOM authorization: Envoy's ext_authz protocol (HTTP and gRPC
//! `envoy.service.auth.v3.Authorization/Check`), as pure functions: build the check from the
//! request, turn the authorizer's answer into an `Outcome`. `crate::filter` makes the callout
//! and applies the outcome.
//!
//! Behaviour follows Envoy 1.40's `envoy.filters.http.ext_authz` as istiod configures it
//! (checked against the real binary, see tests/tests/authz_custom.rs):
//!
//! - HTTP check: `:method` and `:path` (`pathPrefix` + the original `:path`, query kept) of the
//!   request, `:authority` = the request's own `:authority` (Envoy forwards it; the provider's
//!   service name only picks the cluster), `content-length` = the length of the body sent,
//!   `authorization`, the headers matching `includeRequestHeadersInCheck` (repeated headers
//!   joined with `,`), `x-envoy-auth-partial-body` when a body was buffered, then
//!   `includeAdditionalHeadersInCheck` (overriding same-named headers).
//! - HTTP reply: 200 allows; a 5xx or no reply is an error (`failOpen` / `statusOnError`
//!   decide); any other status denies with that status, the body, and the headers allowed by
//!   `headersToDownstreamOnDeny` plus Envoy's defaults (`www-authenticate`, `location`), or every
//!   header when that list is empty.
//! - gRPC: `CheckRequest` as Envoy fills it for an HTTP request; `CheckResponse` with status
//!   OK (or no status) allows with `ok_response`'s mutations; any other status denies with
//!   `denied_response` (403 by default); a failed call or an undecodable reply is an error.

use meshwasm_sdk_ext::proto::{put_bytes, put_uint, Reader};
use meshwasm_sdk_ext::{GrpcReply, HttpReply};

use crate::config::{HeaderPattern, HttpProvider, Provider};

/// The gRPC service and method of the check.
pub const GRPC_SERVICE: &str = "envoy.service.auth.v3.Authorization";
pub const GRPC_METHOD: &str = "Check";

/// The header Envoy adds to the check when a body was buffered: `true` when it was cut at
/// `maxRequestBytes`.
pub const PARTIAL_BODY_HEADER: &str = "x-envoy-auth-partial-body";
/// The HTTP authorizer's way to remove request headers on allow (comma-separated names).
pub const HEADERS_TO_REMOVE_HEADER: &str = "x-envoy-auth-headers-to-remove";

/// What the check carries about the request being authorized.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckInput {
    /// Every request header in order, pseudo-headers included (`:method`, `:path`,
    /// `:authority`, `:scheme`); repeated headers appear once per value.
    pub headers: Vec<(String, String)>,
    /// The buffered request body (when the provider asks for it and the request has one:
    /// `None` for a request that ended with its headers), and whether it was cut at
    /// `maxRequestBytes`.
    pub body: Option<Vec<u8>>,
    pub body_truncated: bool,
    /// `ip:port` strings as Envoy prints them.
    pub source_address: Option<String>,
    pub destination_address: Option<String>,
    /// The peer certificate's first URI SAN (ext_authz's `source.principal`).
    pub source_principal: Option<String>,
    /// The local certificate's first URI SAN (ext_authz's `destination.principal`).
    pub destination_principal: Option<String>,
    /// `connection.requested_server_name`.
    pub sni: Option<String>,
    /// `request.protocol` (`HTTP/1.1`, `HTTP/2`, `HTTP/3`): the check's
    /// `attributes.request.http.protocol`.
    pub protocol: Option<String>,
    /// `attributes.request.http.id` (Envoy puts its internal stream id there, which Wasm
    /// cannot read; the filter may pass `x-request-id` or nothing).
    pub request_id: Option<String>,
    /// `request.time` as nanoseconds since the Unix epoch: `attributes.request.time`.
    pub time_unix_nanos: Option<u64>,
}

/// The authorizer's decision, as Envoy's ext_authz filter applies it. On allow Envoy applies
/// the request mutations in this order: set, append, remove; then the query mutations; the
/// response ones when the response headers pass: add, set, add-if-absent, overwrite-if-exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Allow {
        /// Set (replace every value) on the request before it goes upstream.
        upstream_set: Vec<(String, String)>,
        /// Appended to the request header's existing value as `old,new`; ignored when the
        /// request has no such header (Envoy's gRPC `append: true`).
        upstream_append: Vec<(String, String)>,
        /// Removed from the request (never pseudo-headers or `host`).
        upstream_remove: Vec<String>,
        /// Added (one more value) to the response sent downstream.
        downstream: Vec<(String, String)>,
        /// Set (replace) on the response (gRPC `OVERWRITE_IF_EXISTS_OR_ADD` / `append: false`).
        downstream_set: Vec<(String, String)>,
        /// Added to the response only when it has no such header (gRPC `ADD_IF_ABSENT`).
        downstream_add_if_absent: Vec<(String, String)>,
        /// Replaced on the response only when it has such a header (gRPC `OVERWRITE_IF_EXISTS`).
        downstream_overwrite_if_exists: Vec<(String, String)>,
        /// Query parameters set / removed on the upstream `:path` (gRPC `ok_response`).
        query_set: Vec<(String, String)>,
        query_remove: Vec<String>,
    },
    /// Reply to the client instead: `headers` are all added to the local reply (a repeated
    /// `set-cookie` stays repeated), replacing the local reply's own same-named headers.
    Deny { status: u32, body: String, headers: Vec<(String, String)> },
    /// The authorizer could not decide (timeout, refused, 5xx, garbage, too large): `failOpen`
    /// and `statusOnError` decide (Envoy's local reply then has an empty body). The string
    /// says why, for logs.
    Error(String),
}

/// `Outcome::Allow`'s fields, gathered while decoding.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Allow {
    upstream_set: Vec<(String, String)>,
    upstream_append: Vec<(String, String)>,
    upstream_remove: Vec<String>,
    downstream: Vec<(String, String)>,
    downstream_set: Vec<(String, String)>,
    downstream_add_if_absent: Vec<(String, String)>,
    downstream_overwrite_if_exists: Vec<(String, String)>,
    query_set: Vec<(String, String)>,
    query_remove: Vec<String>,
}

impl From<Allow> for Outcome {
    fn from(a: Allow) -> Self {
        Outcome::Allow {
            upstream_set: a.upstream_set,
            upstream_append: a.upstream_append,
            upstream_remove: a.upstream_remove,
            downstream: a.downstream,
            downstream_set: a.downstream_set,
            downstream_add_if_absent: a.downstream_add_if_absent,
            downstream_overwrite_if_exists: a.downstream_overwrite_if_exists,
            query_set: a.query_set,
            query_remove: a.query_remove,
        }
    }
}

// === shared helpers ===

fn valid_name(k: &str) -> bool {
    !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn valid_value(v: &str) -> bool {
    !v.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
}

fn matches_any(patterns: &[HeaderPattern], name: &str) -> bool {
    patterns.iter().any(|p| p.matches(name))
}

/// Headers in first-appearance order, names lower-cased, repeated values joined with `,`
/// (how Envoy fills the check's header map).
fn merged(headers: &[(String, String)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (k, v) in headers {
        let k = k.to_ascii_lowercase();
        match out.iter_mut().find(|(n, _)| *n == k) {
            Some((_, old)) => {
                old.push(',');
                old.push_str(v);
            }
            None => out.push((k, v.clone())),
        }
    }
    out
}

fn partial_body(input: &CheckInput) -> Option<(&'static str, &'static str)> {
    input.body.as_ref().map(|_| (PARTIAL_BODY_HEADER, if input.body_truncated { "true" } else { "false" }))
}

fn upsert(out: &mut Vec<(String, String)>, k: &str, v: &str) {
    out.retain(|(n, _)| n != k);
    out.push((k.to_string(), v.to_string()));
}

// === HTTP ===

/// The HTTP check request: headers (pseudo-headers first) and body, sent to the provider's
/// cluster.
pub fn http_check(provider: &Provider, http: &HttpProvider, input: &CheckInput) -> (Vec<(String, String)>, Vec<u8>) {
    let map = merged(&input.headers);
    let get = |n: &str| map.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
    let body = input.body.clone().unwrap_or_default();
    let mut out: Vec<(String, String)> = Vec::with_capacity(map.len() + 6);
    out.push((":method".into(), get(":method").unwrap_or("GET").to_string()));
    out.push((":path".into(), format!("{}{}", http.path_prefix, get(":path").unwrap_or("/"))));
    // Envoy forwards the request's own authority; without one (HTTP/1.0), the async client
    // still needs one: the provider's.
    out.push((":authority".into(), get(":authority").unwrap_or(&provider.authority).to_string()));
    out.push(("content-length".into(), body.len().to_string()));
    for (k, v) in &map {
        if k.starts_with(':') || k == "content-length" {
            continue;
        }
        if k == "authorization" || matches_any(&http.include_request_headers, k) {
            out.push((k.clone(), v.clone()));
        }
    }
    if let Some((k, v)) = partial_body(input) {
        upsert(&mut out, k, v);
    }
    for (k, v) in &http.additional_headers {
        if !k.starts_with(':') {
            upsert(&mut out, k, v);
        }
    }
    (out, body)
}

/// Envoy's response headers that always reach the client on a denial when
/// `headersToDownstreamOnDeny` is set.
const DENY_DEFAULTS: [&str; 2] = ["www-authenticate", "location"];

pub fn http_outcome(provider: &Provider, http: &HttpProvider, reply: &HttpReply) -> Outcome {
    let r = match reply {
        HttpReply::Failed => return Outcome::Error("the authorizer did not answer (timeout, refused or reset)".into()),
        HttpReply::Response(r) => r,
    };
    if r.body_size > provider.max_response_bytes || r.body.len() > provider.max_response_bytes {
        return Outcome::Error(format!(
            "the authorizer's response body ({} bytes) is larger than maxResponseBytes ({})",
            r.body_size.max(r.body.len()),
            provider.max_response_bytes
        ));
    }
    let status = r.headers.iter().find(|(k, _)| k == ":status").and_then(|(_, v)| v.trim().parse::<u32>().ok());
    let Some(status) = status.filter(|s| (200..=599).contains(s)) else {
        return Outcome::Error("the authorizer's response has no valid :status".into());
    };
    if (500..=599).contains(&status) {
        return Outcome::Error(format!("the authorizer answered {status}"));
    }
    let headers: Vec<(String, String)> = r
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .filter(|(k, v)| valid_name(k) && valid_value(v))
        .collect();
    if status == 200 {
        let mut allow = Allow::default();
        for (k, v) in &headers {
            if k == HEADERS_TO_REMOVE_HEADER {
                for n in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    let n = n.to_ascii_lowercase();
                    if valid_name(&n) && n != "host" {
                        allow.upstream_remove.push(n);
                    }
                }
                continue;
            }
            if matches_any(&http.headers_to_upstream_on_allow, k) {
                allow.upstream_set.push((k.clone(), v.clone()));
            }
            if matches_any(&http.headers_to_downstream_on_allow, k) {
                allow.downstream.push((k.clone(), v.clone()));
            }
        }
        return allow.into();
    }
    let list = &http.headers_to_downstream_on_deny;
    let headers =
        headers
            .into_iter()
            .filter(|(k, _)| k != HEADERS_TO_REMOVE_HEADER && !is_framing(k))
            .filter(|(k, _)| {
                if list.is_empty() {
                    k != "host"
                } else {
                    matches_any(list, k) || DENY_DEFAULTS.contains(&k.as_str())
                }
            })
            .collect();
    Outcome::Deny { status, body: String::from_utf8_lossy(&r.body).into_owned(), headers }
}

/// Headers the local reply computes itself (its body is the authorizer's, re-framed).
fn is_framing(k: &str) -> bool {
    matches!(k, "content-length" | "transfer-encoding" | "connection" | "keep-alive")
}

// === gRPC ===
//
// Hand-written protobuf (sdk-ext's proto.rs) instead of prost: the measurement in
// shared/notes/dependencies.md puts this encoder + decoder at +6.5 KiB of authz.wasm against
// +32 KiB for prost 0.14 with the same messages.

/// `envoy.config.core.v3.Address { socket_address: SocketAddress { address = 2, port_value = 3 } }`
fn put_address(field: u64, addr: &str, out: &mut Vec<u8>) {
    let (host, port) = match addr.rsplit_once(':') {
        Some((h, p)) if p.parse::<u32>().is_ok() => (h, p.parse::<u32>().unwrap_or(0)),
        _ => (addr, 0),
    };
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let mut sock = Vec::new();
    put_bytes(2, host.as_bytes(), &mut sock);
    put_uint(3, u64::from(port), &mut sock);
    let mut a = Vec::new();
    put_bytes(1, &sock, &mut a);
    put_bytes(field, &a, out);
}

/// `AttributeContext.Peer { address = 1, principal = 4 }`
fn put_peer(field: u64, addr: Option<&str>, principal: Option<&str>, out: &mut Vec<u8>) {
    let mut p = Vec::new();
    if let Some(a) = addr {
        put_address(1, a, &mut p);
    }
    if let Some(pr) = principal.filter(|s| !s.is_empty()) {
        put_bytes(4, pr.as_bytes(), &mut p);
    }
    put_bytes(field, &p, out);
}

fn put_str(field: u64, s: &str, out: &mut Vec<u8>) {
    if !s.is_empty() {
        put_bytes(field, s.as_bytes(), out);
    }
}

/// The serialized `envoy.service.auth.v3.CheckRequest`.
pub fn grpc_check(provider: &Provider, input: &CheckInput) -> Vec<u8> {
    let _ = provider;
    let mut map = merged(&input.headers);
    if let Some((k, v)) = partial_body(input) {
        upsert(&mut map, k, v);
    }
    let get = |n: &str| map.iter().find(|(k, _)| k == n).map_or("", |(_, v)| v.as_str());

    // AttributeContext.HttpRequest
    let mut http = Vec::new();
    put_str(1, input.request_id.as_deref().unwrap_or(""), &mut http);
    put_str(2, get(":method"), &mut http);
    for (k, v) in &map {
        let mut e = Vec::new();
        put_bytes(1, k.as_bytes(), &mut e);
        put_bytes(2, v.as_bytes(), &mut e);
        put_bytes(3, &e, &mut http);
    }
    // `path` is the whole request target; Envoy leaves `query` and `fragment` empty.
    put_str(4, get(":path"), &mut http);
    put_str(5, get(":authority"), &mut http);
    put_str(6, get(":scheme"), &mut http);
    if let Some(b) = &input.body {
        // Envoy reports the whole body's size (its content-length) even when the check
        // carries only the first `maxRequestBytes` of it.
        let size = get("content-length").trim().parse::<u64>().unwrap_or(b.len() as u64);
        put_uint(9, size, &mut http);
    }
    put_str(10, input.protocol.as_deref().unwrap_or(""), &mut http);
    if let Some(b) = input.body.as_ref().filter(|b| !b.is_empty()) {
        let raw = provider.body.is_some_and(|l| l.pack_as_bytes);
        put_bytes(if raw { 12 } else { 11 }, b, &mut http);
    }

    // AttributeContext.Request { time = 1, http = 2 }
    let mut req = Vec::new();
    if let Some(ns) = input.time_unix_nanos {
        let mut ts = Vec::new();
        put_uint(1, ns / 1_000_000_000, &mut ts);
        put_uint(2, ns % 1_000_000_000, &mut ts);
        put_bytes(1, &ts, &mut req);
    }
    put_bytes(2, &http, &mut req);

    // AttributeContext { source = 1, destination = 2, request = 4, metadata_context = 11,
    // tls_session = 12 }
    let mut attrs = Vec::new();
    put_peer(1, input.source_address.as_deref(), input.source_principal.as_deref(), &mut attrs);
    put_peer(2, input.destination_address.as_deref(), input.destination_principal.as_deref(), &mut attrs);
    put_bytes(4, &req, &mut attrs);
    put_bytes(11, &[], &mut attrs);

    let mut out = Vec::with_capacity(attrs.len() + 4);
    put_bytes(1, &attrs, &mut out);
    out
}

/// `HeaderValueOption` decoded: key, value, `append` (if set), `append_action`.
struct HeaderOption {
    key: String,
    value: String,
    append: Option<bool>,
    action: u64,
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn decode_header_value(b: &[u8]) -> Result<(String, String), String> {
    let mut r = Reader::new(b);
    let (mut k, mut v, mut raw) = (String::new(), String::new(), None);
    while let Some((f, w)) = r.key()? {
        match (f, w) {
            (1, 2) => k = lossy(r.bytes()?),
            (2, 2) => v = lossy(r.bytes()?),
            (3, 2) => raw = Some(lossy(r.bytes()?)),
            _ => r.skip(w)?,
        }
    }
    if v.is_empty() {
        if let Some(raw) = raw {
            v = raw;
        }
    }
    Ok((k, v))
}

fn decode_bool_value(b: &[u8]) -> Result<bool, String> {
    let mut r = Reader::new(b);
    let mut v = false;
    while let Some((f, w)) = r.key()? {
        match (f, w) {
            (1, 0) => v = r.varint()? != 0,
            _ => r.skip(w)?,
        }
    }
    Ok(v)
}

fn decode_header_option(b: &[u8]) -> Result<HeaderOption, String> {
    let mut r = Reader::new(b);
    let mut h = HeaderOption { key: String::new(), value: String::new(), append: None, action: 0 };
    while let Some((f, w)) = r.key()? {
        match (f, w) {
            (1, 2) => (h.key, h.value) = decode_header_value(r.bytes()?)?,
            (2, 2) => h.append = Some(decode_bool_value(r.bytes()?)?),
            (3, 0) => h.action = r.varint()?,
            _ => r.skip(w)?,
        }
    }
    h.key = h.key.to_ascii_lowercase();
    Ok(h)
}

fn decode_string_list_item(r: &mut Reader<'_>) -> Result<String, String> {
    Ok(lossy(r.bytes()?).to_ascii_lowercase())
}

/// `QueryParameter { key = 1, value = 2 }`
fn decode_query(b: &[u8]) -> Result<(String, String), String> {
    let mut r = Reader::new(b);
    let (mut k, mut v) = (String::new(), String::new());
    while let Some((f, w)) = r.key()? {
        match (f, w) {
            (1, 2) => k = lossy(r.bytes()?),
            (2, 2) => v = lossy(r.bytes()?),
            _ => r.skip(w)?,
        }
    }
    Ok((k, v))
}

fn usable(h: &HeaderOption) -> bool {
    valid_name(&h.key) && valid_value(&h.value)
}

fn decode_ok(b: &[u8]) -> Result<Allow, String> {
    let mut r = Reader::new(b);
    let mut a = Allow::default();
    while let Some((f, w)) = r.key()? {
        match (f, w) {
            (2, 2) => {
                let h = decode_header_option(r.bytes()?)?;
                if usable(&h) {
                    if h.append == Some(true) {
                        a.upstream_append.push((h.key, h.value));
                    } else {
                        a.upstream_set.push((h.key, h.value));
                    }
                }
            }
            (5, 2) => {
                let n = decode_string_list_item(&mut r)?;
                if valid_name(&n) && n != "host" {
                    a.upstream_remove.push(n);
                }
            }
            (6, 2) => {
                let h = decode_header_option(r.bytes()?)?;
                if usable(&h) {
                    let pair = (h.key, h.value);
                    match (h.append, h.action) {
                        (Some(true), _) | (None, 0) => a.downstream.push(pair),
                        (Some(false), _) | (None, 2) => a.downstream_set.push(pair),
                        (None, 1) => a.downstream_add_if_absent.push(pair),
                        (None, 3) => a.downstream_overwrite_if_exists.push(pair),
                        (None, n) => return Err(format!("unknown append_action {n}")),
                    }
                }
            }
            (7, 2) => {
                let q = decode_query(r.bytes()?)?;
                if !q.0.is_empty() {
                    a.query_set.push(q);
                }
            }
            (8, 2) => a.query_remove.push(lossy(r.bytes()?)),
            _ => r.skip(w)?,
        }
    }
    Ok(a)
}

/// `DeniedHttpResponse { status = 1 (HttpStatus { code = 1 }), headers = 2, body = 3 }`
fn decode_denied(b: &[u8]) -> Result<Outcome, String> {
    let mut r = Reader::new(b);
    let (mut status, mut body, mut headers) = (0u64, String::new(), Vec::new());
    while let Some((f, w)) = r.key()? {
        match (f, w) {
            (1, 2) => {
                let mut s = Reader::new(r.bytes()?);
                while let Some((f, w)) = s.key()? {
                    match (f, w) {
                        (1, 0) => status = s.varint()?,
                        _ => s.skip(w)?,
                    }
                }
            }
            (2, 2) => {
                let h = decode_header_option(r.bytes()?)?;
                if usable(&h) && !is_framing(&h.key) {
                    headers.push((h.key, h.value));
                }
            }
            (3, 2) => body = lossy(r.bytes()?),
            _ => r.skip(w)?,
        }
    }
    // 0 (unset) means Envoy's default; a code outside HTTP's range cannot be sent.
    let status = u32::try_from(status).ok().filter(|s| (200..=599).contains(s)).unwrap_or(403);
    Ok(Outcome::Deny { status, body, headers })
}

/// The decoded `CheckResponse` (`status = 1`, `denied_response = 2`, `ok_response = 3`).
fn decode_check_response(b: &[u8]) -> Result<Outcome, String> {
    let mut r = Reader::new(b);
    let mut code: u64 = 0;
    let (mut ok, mut denied) = (None, None);
    while let Some((f, w)) = r.key()? {
        match (f, w) {
            (1, 2) => {
                let mut s = Reader::new(r.bytes()?);
                while let Some((f, w)) = s.key()? {
                    match (f, w) {
                        (1, 0) => code = s.varint()?,
                        _ => s.skip(w)?,
                    }
                }
            }
            // A oneof: the last one on the wire wins.
            (2, 2) => {
                denied = Some(r.bytes()?);
                ok = None;
            }
            (3, 2) => {
                ok = Some(r.bytes()?);
                denied = None;
            }
            (_, 3 | 4) => return Err("groups are not supported".into()),
            _ => r.skip(w)?,
        }
    }
    // google.rpc.Status.code is an int32: only the low 32 bits count.
    if code as u32 == 0 {
        return Ok(match ok {
            Some(b) => decode_ok(b)?,
            None => Allow::default(),
        }
        .into());
    }
    match denied {
        Some(b) => decode_denied(b),
        None => Ok(Outcome::Deny { status: 403, body: String::new(), headers: Vec::new() }),
    }
}

pub fn grpc_outcome(provider: &Provider, reply: &GrpcReply) -> Outcome {
    match reply {
        GrpcReply::Failed(code) => Outcome::Error(format!("the gRPC check failed with status {code}")),
        GrpcReply::Message(m) if m.len() > provider.max_response_bytes => Outcome::Error(format!(
            "the authorizer's CheckResponse ({} bytes) is larger than maxResponseBytes ({})",
            m.len(),
            provider.max_response_bytes
        )),
        GrpcReply::Message(m) => {
            decode_check_response(m).unwrap_or_else(|e| Outcome::Error(format!("undecodable CheckResponse: {e}")))
        }
    }
}

/// Encoders the tests use to build authorizer answers.
#[cfg(test)]
mod encode {
    use super::*;
    use meshwasm_sdk_ext::proto::put_varint;

    pub fn header_option(k: &str, v: &str, append: Option<bool>, action: u64) -> Vec<u8> {
        let mut hv = Vec::new();
        put_bytes(1, k.as_bytes(), &mut hv);
        put_bytes(2, v.as_bytes(), &mut hv);
        let mut o = Vec::new();
        put_bytes(1, &hv, &mut o);
        if let Some(a) = append {
            let mut b = Vec::new();
            put_uint(1, u64::from(a), &mut b);
            put_bytes(2, &b, &mut o);
        }
        put_uint(3, action, &mut o);
        o
    }

    pub fn status(code: u64) -> Vec<u8> {
        let mut s = Vec::new();
        if code != 0 {
            put_varint(1 << 3, &mut s);
            put_varint(code, &mut s);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::encode::*;
    use super::*;
    use crate::config::{BodyLimit, ProviderKind};
    use meshwasm_sdk_ext::fake::http_reply as reply;
    use meshwasm_sdk_ext::HttpResponse;
    use proptest::prelude::*;
    use std::time::Duration;

    fn http_provider() -> (Provider, HttpProvider) {
        let pats = |l: &[&str]| l.iter().map(|p| HeaderPattern::parse(p)).collect::<Vec<_>>();
        let http = HttpProvider {
            path_prefix: "/check".into(),
            include_request_headers: pats(&["x-custom-id", "x-prefix-*", "*-suffix"]),
            additional_headers: vec![("x-header-1".into(), "value-1".into())],
            headers_to_upstream_on_allow: pats(&["Authorization", "x-prefix-*"]),
            headers_to_downstream_on_allow: pats(&["Set-cookie"]),
            headers_to_downstream_on_deny: pats(&["Set-cookie", "x-prefix-*"]),
        };
        let p = Provider {
            name: "default".into(),
            cluster: "authz".into(),
            authority: "authz.foo.svc:9000".into(),
            timeout: Duration::from_secs(2),
            fail_open: false,
            status_on_error: 403,
            body: Some(BodyLimit { max_request_bytes: 10, allow_partial_message: true, pack_as_bytes: true }),
            max_response_bytes: 1024,
            kind: ProviderKind::Http(http.clone()),
        };
        (p, http)
    }

    fn h(l: &[(&str, &str)]) -> Vec<(String, String)> {
        l.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn sorted(mut v: Vec<(String, String)>) -> Vec<(String, String)> {
        v.sort();
        v
    }

    /// The request and check request seen through Envoy 1.40 (first experiment recorded in
    /// the module docs): merged repeats, defaults, partial-body flag, additional headers.
    #[test]
    fn http_check_as_envoy_sends_it() {
        let (p, http) = http_provider();
        let input = CheckInput {
            headers: h(&[
                (":authority", "127.0.0.1:19000"),
                (":path", "/a/b?q=1&r=2"),
                (":method", "POST"),
                (":scheme", "http"),
                ("user-agent", "curl"),
                ("x-custom-id", "1"),
                ("x-prefix-z", "a"),
                ("x-prefix-z", "b"),
                ("authorization", "Basic x"),
                ("x-no", "1"),
                ("x-foo-suffix", "s"),
                ("content-length", "22"),
                ("x-header-1", "from-client"),
            ]),
            body: Some(b"hello worl".to_vec()),
            body_truncated: true,
            ..Default::default()
        };
        let (hs, body) = http_check(&p, &http, &input);
        assert_eq!(body, b"hello worl");
        assert_eq!(
            &hs[..3],
            &h(&[(":method", "POST"), (":path", "/check/a/b?q=1&r=2"), (":authority", "127.0.0.1:19000")])[..]
        );
        assert_eq!(
            sorted(hs),
            sorted(h(&[
                (":method", "POST"),
                (":path", "/check/a/b?q=1&r=2"),
                (":authority", "127.0.0.1:19000"),
                ("content-length", "10"),
                ("x-custom-id", "1"),
                ("x-prefix-z", "a,b"),
                ("authorization", "Basic x"),
                ("x-foo-suffix", "s"),
                ("x-envoy-auth-partial-body", "true"),
                ("x-header-1", "value-1"),
            ]))
        );
        // No body buffered: no flag, length 0.
        let input = CheckInput {
            headers: h(&[(":path", "/x"), (":method", "GET"), (":authority", "a")]),
            ..Default::default()
        };
        let (hs, body) = http_check(&p, &http, &input);
        assert!(body.is_empty());
        assert!(hs.contains(&("content-length".into(), "0".into())));
        assert!(!hs.iter().any(|(k, _)| k == PARTIAL_BODY_HEADER));
    }

    #[test]
    fn http_allow_deny_error() {
        let (p, http) = http_provider();
        let ok = reply(
            "200",
            &[
                ("x-prefix-up", "u1"),
                ("authorization", "Bearer new"),
                ("set-cookie", "s=1"),
                ("set-cookie", "s=2"),
                ("x-other", "o"),
                ("x-envoy-auth-headers-to-remove", "x-rm, x-rm2,,host"),
            ],
            "ignored",
        );
        let want = Allow {
            upstream_set: h(&[("x-prefix-up", "u1"), ("authorization", "Bearer new")]),
            downstream: h(&[("set-cookie", "s=1"), ("set-cookie", "s=2")]),
            upstream_remove: vec!["x-rm".to_string(), "x-rm2".to_string()],
            ..Default::default()
        };
        assert_eq!(http_outcome(&p, &http, &ok), want.into());

        let deny = reply(
            "401",
            &[
                ("x-prefix-a", "1"),
                ("set-cookie", "c=1"),
                ("set-cookie", "c=2"),
                ("www-authenticate", "Basic"),
                ("x-other", "o"),
                ("content-length", "4"),
            ],
            "nope",
        );
        assert_eq!(
            http_outcome(&p, &http, &deny),
            Outcome::Deny {
                status: 401,
                body: "nope".into(),
                headers: h(&[
                    ("x-prefix-a", "1"),
                    ("set-cookie", "c=1"),
                    ("set-cookie", "c=2"),
                    ("www-authenticate", "Basic")
                ])
            }
        );
        // Without headersToDownstreamOnDeny every header goes.
        let open = HttpProvider { headers_to_downstream_on_deny: vec![], ..http.clone() };
        let Outcome::Deny { headers, .. } = http_outcome(&p, &open, &deny) else { panic!() };
        assert_eq!(headers.len(), 5);

        assert!(matches!(http_outcome(&p, &http, &reply("503", &[], "boom")), Outcome::Error(_)));
        assert!(matches!(http_outcome(&p, &http, &reply("500", &[], "")), Outcome::Error(_)));
        assert!(matches!(http_outcome(&p, &http, &HttpReply::Failed), Outcome::Error(_)));
        assert!(matches!(http_outcome(&p, &http, &reply("x", &[], "")), Outcome::Error(_)));
        let big = "x".repeat(1025);
        assert!(matches!(http_outcome(&p, &http, &reply("403", &[], &big)), Outcome::Error(_)));
        let no_status = HttpReply::Response(HttpResponse::default());
        assert!(matches!(http_outcome(&p, &http, &no_status), Outcome::Error(_)));
        assert!(matches!(
            http_outcome(&p, &http, &reply("302", &[("location", "/l")], "")),
            Outcome::Deny { status: 302, .. }
        ));
    }

    fn field(r: &mut Reader<'_>, want: u64) -> Vec<u8> {
        while let Some((f, w)) = r.key().unwrap() {
            if f == want && w == 2 {
                return r.bytes().unwrap().to_vec();
            }
            r.skip(w).unwrap();
        }
        panic!("field {want} missing")
    }

    #[test]
    fn grpc_check_fields() {
        let (mut p, _) = http_provider();
        p.kind = ProviderKind::Grpc;
        let input = CheckInput {
            headers: h(&[
                (":authority", "h"),
                (":path", "/p?q"),
                (":method", "PUT"),
                (":scheme", "https"),
                ("a", "1"),
                ("A", "2"),
            ]),
            body: Some(b"body".to_vec()),
            body_truncated: false,
            source_address: Some("[::1]:5000".into()),
            destination_address: Some("127.0.0.1:80".into()),
            source_principal: Some("spiffe://cluster.local/ns/foo/sa/bar".into()),
            protocol: Some("HTTP/2".into()),
            time_unix_nanos: Some(1_500_000_000),
            ..Default::default()
        };
        let b = grpc_check(&p, &input);
        let attrs = field(&mut Reader::new(&b), 1);
        let src = field(&mut Reader::new(&attrs), 1);
        let addr = field(&mut Reader::new(&field(&mut Reader::new(&src), 1)), 1);
        assert_eq!(field(&mut Reader::new(&addr), 2), b"::1");
        assert_eq!(field(&mut Reader::new(&src), 4), b"spiffe://cluster.local/ns/foo/sa/bar");
        let req = field(&mut Reader::new(&attrs), 4);
        let http = field(&mut Reader::new(&req), 2);
        assert_eq!(field(&mut Reader::new(&http), 2), b"PUT");
        assert_eq!(field(&mut Reader::new(&http), 4), b"/p?q");
        assert_eq!(field(&mut Reader::new(&http), 5), b"h");
        assert_eq!(field(&mut Reader::new(&http), 10), b"HTTP/2");
        assert_eq!(field(&mut Reader::new(&http), 12), b"body");
        let mut r = Reader::new(&http);
        let mut headers = Vec::new();
        while let Some((f, w)) = r.key().unwrap() {
            if f == 3 {
                let e = r.bytes().unwrap();
                headers.push((lossy(&field(&mut Reader::new(e), 1)), lossy(&field(&mut Reader::new(e), 2))));
            } else {
                r.skip(w).unwrap();
            }
        }
        assert!(headers.contains(&("a".into(), "1,2".into())));
        assert!(headers.contains(&(PARTIAL_BODY_HEADER.into(), "false".into())));
        assert!(headers.contains(&(":path".into(), "/p?q".into())));
    }

    fn response(code: u64, which: u64, inner: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        put_bytes(1, &status(code), &mut out);
        if which != 0 {
            put_bytes(which, inner, &mut out);
        }
        out
    }

    #[test]
    fn grpc_allow_mutations() {
        let (p, _) = http_provider();
        let mut ok = Vec::new();
        put_bytes(2, &header_option("X-Set", "1", None, 0), &mut ok);
        put_bytes(2, &header_option("x-app", "2", Some(true), 0), &mut ok);
        put_bytes(2, &header_option("x-set2", "3", Some(false), 0), &mut ok);
        put_bytes(2, &header_option("bad name", "3", None, 0), &mut ok);
        put_bytes(5, b"x-rm", &mut ok);
        put_bytes(5, b"host", &mut ok);
        put_bytes(6, &header_option("r-add", "a", None, 0), &mut ok);
        put_bytes(6, &header_option("r-absent", "b", None, 1), &mut ok);
        put_bytes(6, &header_option("r-set", "c", None, 2), &mut ok);
        put_bytes(6, &header_option("r-over", "d", None, 3), &mut ok);
        put_bytes(6, &header_option("r-set2", "e", Some(false), 1), &mut ok);
        let got = grpc_outcome(&p, &GrpcReply::Message(response(0, 3, &ok)));
        let want = Allow {
            upstream_set: h(&[("x-set", "1"), ("x-set2", "3")]),
            upstream_append: h(&[("x-app", "2")]),
            upstream_remove: vec!["x-rm".into()],
            downstream: h(&[("r-add", "a")]),
            downstream_set: h(&[("r-set", "c"), ("r-set2", "e")]),
            downstream_add_if_absent: h(&[("r-absent", "b")]),
            downstream_overwrite_if_exists: h(&[("r-over", "d")]),
            ..Default::default()
        };
        assert_eq!(got, want.into());
        // An empty message is status OK without mutations.
        assert_eq!(grpc_outcome(&p, &GrpcReply::Message(vec![])), Allow::default().into());
    }

    #[test]
    fn grpc_deny_and_errors() {
        let (p, _) = http_provider();
        let mut d = Vec::new();
        put_bytes(1, &status(401), &mut d);
        put_bytes(2, &header_option("set-cookie", "a", None, 0), &mut d);
        put_bytes(2, &header_option("set-cookie", "b", None, 0), &mut d);
        put_bytes(3, b"denied!", &mut d);
        assert_eq!(
            grpc_outcome(&p, &GrpcReply::Message(response(7, 2, &d))),
            Outcome::Deny {
                status: 401,
                body: "denied!".into(),
                headers: h(&[("set-cookie", "a"), ("set-cookie", "b")])
            }
        );
        // PERMISSION_DENIED without a denied_response: 403, empty.
        assert_eq!(
            grpc_outcome(&p, &GrpcReply::Message(response(7, 0, &[]))),
            Outcome::Deny { status: 403, body: String::new(), headers: vec![] }
        );
        assert!(matches!(grpc_outcome(&p, &GrpcReply::Failed(14)), Outcome::Error(_)));
        assert!(matches!(grpc_outcome(&p, &GrpcReply::Failed(4)), Outcome::Error(_)));
        assert!(matches!(grpc_outcome(&p, &GrpcReply::Message(b"garbage!".to_vec())), Outcome::Error(_)));
        assert!(matches!(grpc_outcome(&p, &GrpcReply::Message(vec![0x0a, 0x05, 1])), Outcome::Error(_)));
        let mut big = response(0, 0, &[]);
        put_bytes(15, &[0; 1100], &mut big);
        assert!(matches!(grpc_outcome(&p, &GrpcReply::Message(big)), Outcome::Error(_)));
    }

    fn any_input() -> impl Strategy<Value = CheckInput> {
        (
            proptest::collection::vec(("[:a-zA-Z-]{0,8}", "\\PC{0,12}"), 0..12),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
            any::<bool>(),
            proptest::option::of("\\PC{0,24}"),
        )
            .prop_map(|(headers, body, body_truncated, addr)| CheckInput {
                headers,
                body,
                body_truncated,
                source_address: addr.clone(),
                destination_address: addr,
                ..Default::default()
            })
    }

    proptest! {
        #[test]
        fn encoders_never_panic_and_grpc_check_decodes(input in any_input()) {
            let (p, http) = http_provider();
            let (hs, body) = http_check(&p, &http, &input);
            prop_assert_eq!(hs.iter().filter(|(k, _)| k == ":path").count(), 1);
            let cl = body.len().to_string();
            prop_assert!(hs.contains(&("content-length".to_string(), cl)));
            // The gRPC check is well-formed protobuf all the way down to the header map.
            let b = grpc_check(&p, &input);
            let attrs = field(&mut Reader::new(&b), 1);
            let req = field(&mut Reader::new(&attrs), 4);
            let http = field(&mut Reader::new(&req), 2);
            let mut r = Reader::new(&http);
            while let Some((_, w)) = r.key().unwrap() { r.skip(w).unwrap(); }
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256),
                                status in "[0-9x]{0,4}",
                                headers in proptest::collection::vec(("\\PC{0,8}", "\\PC{0,8}"), 0..6)) {
            let (p, http) = http_provider();
            let _ = grpc_outcome(&p, &GrpcReply::Message(bytes.clone()));
            let mut hs = vec![(":status".to_string(), status)];
            hs.extend(headers);
            let r = HttpReply::Response(HttpResponse { headers: hs, body: bytes.clone(), body_size: bytes.len(), trailers: vec![] });
            match http_outcome(&p, &http, &r) {
                Outcome::Allow { upstream_set, downstream, .. } => {
                    for (k, _) in upstream_set.iter().chain(&downstream) {
                        prop_assert!(valid_name(k));
                    }
                }
                Outcome::Deny { status, headers, .. } => {
                    prop_assert!((201..=499).contains(&status));
                    for (k, v) in &headers {
                        prop_assert!(valid_name(k) && valid_value(v));
                    }
                }
                Outcome::Error(_) => {}
            }
        }
    }
}
