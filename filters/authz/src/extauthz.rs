//! CUSTOM authorization: Envoy's ext_authz protocol (HTTP and gRPC
//! `envoy.service.auth.v3.Authorization/Check`), as pure functions: build the check from the
//! request, turn the authorizer's answer into an `Outcome`. `crate::filter` makes the callout
//! and applies the outcome.

use meshwasm_sdk_ext::{GrpcReply, HttpReply};

use crate::config::{HttpProvider, Provider};

/// What the check carries about the request being authorized.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckInput {
    /// Every request header in order, pseudo-headers included (`:method`, `:path`,
    /// `:authority`, `:scheme`); repeated headers appear once per value.
    pub headers: Vec<(String, String)>,
    /// The buffered request body (when the provider asks for it), and whether it was cut at
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
}

/// The authorizer's decision, as Envoy's ext_authz filter applies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Allow {
        /// Set (replace) on the request before it goes upstream.
        upstream_set: Vec<(String, String)>,
        /// Appended to the request.
        upstream_append: Vec<(String, String)>,
        /// Removed from the request.
        upstream_remove: Vec<String>,
        /// Added to the response sent downstream.
        downstream: Vec<(String, String)>,
    },
    /// Reply to the client instead.
    Deny { status: u32, body: String, headers: Vec<(String, String)> },
    /// The authorizer could not decide (timeout, refused, 5xx, garbage, too large): `failOpen`
    /// and `statusOnError` decide. The string says why, for logs.
    Error(String),
}

/// The HTTP check request: headers (pseudo-headers first) and body, sent to the provider's
/// cluster.
pub fn http_check(provider: &Provider, http: &HttpProvider, input: &CheckInput) -> (Vec<(String, String)>, Vec<u8>) {
    let _ = (provider, http, input);
    (Vec::new(), Vec::new())
}

/// The serialized `envoy.service.auth.v3.CheckRequest`.
pub fn grpc_check(provider: &Provider, input: &CheckInput) -> Vec<u8> {
    let _ = (provider, input);
    Vec::new()
}

pub fn http_outcome(provider: &Provider, http: &HttpProvider, reply: &HttpReply) -> Outcome {
    let _ = (provider, http, reply);
    Outcome::Error("HTTP ext_authz is not implemented yet".into())
}

pub fn grpc_outcome(provider: &Provider, reply: &GrpcReply) -> Outcome {
    let _ = (provider, reply);
    Outcome::Error("gRPC ext_authz is not implemented yet".into())
}
