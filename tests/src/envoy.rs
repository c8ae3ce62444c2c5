//! A real Envoy for one test: builder → bootstrap YAML in a temp dir → child process on
//! free ports → wait for admin `/ready` → killed on drop (log printed if the test failed).
//!
//! ```no_run
//! # use meshwasm_tests::*;
//! let up = Upstream::start();
//! let envoy = Envoy::builder()
//!     .upstream(up.addr())
//!     .listener(
//!         Listener::new()
//!             .filter(Filter::wasm("fault", serde_json::json!({"headerControl": true})))
//!             .route(Route::new("ratings", "/ratings"))
//!             .route(Route::new("default", "/")),
//!     )
//!     .start();
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::client::{self, Request, Response, TlsClient};

/// How long Envoy may take to become ready (V8 compiles each module once per worker).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The stats tag that turns `wasmcustom.meshwasm.<filter>.rule.<rule>.<stat>` into
/// `wasmcustom.meshwasm.<filter>.<stat>` with tag `rule=<rule>`.
pub const RULE_TAG_REGEX: &str = r"^wasmcustom\.meshwasm\.[a-z_]+\.(rule\.([^.]+)\.)";

/// Protocol Envoy uses towards the upstream cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProto {
    Http1,
    /// `explicit_http_config: {http2_protocol_options: {}}` (h2c to the upstream).
    Http2,
}

/// One HTTP filter of a listener's chain, as YAML (a mapping with `name` and `typed_config`).
#[derive(Debug, Clone)]
pub struct Filter {
    name: String,
    yaml: String,
}

/// A route of a listener's single virtual host (`domains: ["*"]`).
#[derive(Debug, Clone)]
pub struct Route {
    name: String,
    prefix: String,
    metadata_yaml: Option<String>,
    disabled_filters: Vec<String>,
    action_yaml: Option<String>,
}

/// A listener on 127.0.0.1 with an HTTP connection manager (codec AUTO: HTTP/1.1 and h2c,
/// or HTTP/1.1 and h2 by ALPN with [`Listener::tls`]).
#[derive(Debug, Clone)]
pub struct Listener {
    name: Option<String>,
    port: Option<u16>,
    filters: Vec<Filter>,
    routes: Vec<Route>,
    tls: Option<DownstreamTls>,
    /// Extra HttpConnectionManager fields (key, YAML value), rendered after `codec_type`.
    hcm: Vec<(String, String)>,
    hcm_yaml: Option<String>,
}

/// Whether a TLS listener asks the client for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCertMode {
    /// No client certificate is requested.
    None,
    /// Requested and, when presented, validated against the CA; a client without one is
    /// served (plaintext identity: none).
    Request,
    /// `require_client_certificate: true`: a client without a valid certificate is refused.
    Require,
}

/// A listener's downstream TLS (`envoy.transport_sockets.tls` with a `DownstreamTlsContext`,
/// ALPN `h2,http/1.1`).
#[derive(Debug, Clone)]
pub struct DownstreamTls {
    cert: PathBuf,
    key: PathBuf,
    ca: Option<PathBuf>,
    mode: ClientCertMode,
}

impl DownstreamTls {
    /// Serves this certificate chain and key (PEM files); no client certificate asked.
    pub fn new(cert: &Path, key: &Path) -> Self {
        Self { cert: cert.to_path_buf(), key: key.to_path_buf(), ca: None, mode: ClientCertMode::None }
    }

    /// The test server certificate of `certs` (`localhost`, 127.0.0.1), no client certificate asked.
    pub fn server(certs: &crate::certs::TestCerts) -> Self {
        Self::new(&certs.server().cert, &certs.server().key)
    }

    /// Requires a client certificate issued by `ca` (`require_client_certificate: true`).
    #[must_use]
    pub fn require_client_cert(mut self, ca: &Path) -> Self {
        self.ca = Some(ca.to_path_buf());
        self.mode = ClientCertMode::Require;
        self
    }

    /// Requests a client certificate, validated against `ca` when presented, not required.
    #[must_use]
    pub fn request_client_cert(mut self, ca: &Path) -> Self {
        self.ca = Some(ca.to_path_buf());
        self.mode = ClientCertMode::Request;
        self
    }

    pub fn mode(&self) -> ClientCertMode {
        self.mode
    }

    /// The `transport_socket:` mapping of a filter chain, at `indent`.
    fn render(&self, out: &mut String, indent: usize) {
        let pad = " ".repeat(indent);
        let _ = writeln!(out, "{pad}transport_socket:");
        let _ = writeln!(out, "{pad}  name: envoy.transport_sockets.tls");
        let _ = writeln!(out, "{pad}  typed_config:");
        let _ = writeln!(
            out,
            "{pad}    \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
        );
        if self.mode == ClientCertMode::Require {
            let _ = writeln!(out, "{pad}    require_client_certificate: true");
        }
        let _ = writeln!(out, "{pad}    common_tls_context:");
        let _ = writeln!(out, "{pad}      alpn_protocols: [h2, http/1.1]");
        let _ = writeln!(out, "{pad}      tls_certificates:");
        let _ = writeln!(out, "{pad}      - certificate_chain: {{ filename: \"{}\" }}", self.cert.display());
        let _ = writeln!(out, "{pad}        private_key: {{ filename: \"{}\" }}", self.key.display());
        if let (Some(ca), true) = (&self.ca, self.mode != ClientCertMode::None) {
            let _ = writeln!(out, "{pad}      validation_context:");
            let _ = writeln!(out, "{pad}        trusted_ca: {{ filename: \"{}\" }}", ca.display());
        }
    }
}

/// Builds and starts an [`Envoy`].
#[derive(Debug, Clone)]
pub struct EnvoyBuilder {
    upstream: Option<SocketAddr>,
    upstream_proto: UpstreamProto,
    listeners: Vec<Listener>,
    concurrency: u32,
    stats_tags: Vec<(String, String)>,
    clusters_yaml: Vec<String>,
    log_level: String,
    component_log_level: Option<String>,
    /// Listeners from this file (LDS over the filesystem, watched) instead of static ones.
    lds_file: Option<PathBuf>,
}

/// A running Envoy. Killed on drop; if the thread is panicking, its log is printed.
pub struct Envoy {
    child: Option<Child>,
    dir: PathBuf,
    admin: SocketAddr,
    listeners: Vec<SocketAddr>,
    log_path: PathBuf,
    config: String,
}

/// The outcome of an Envoy that was expected to refuse its configuration.
#[derive(Debug)]
pub struct FailedEnvoy {
    pub status: ExitStatus,
    pub log: String,
    pub config: String,
}

// === impl Filter ===

impl Filter {
    /// The meshwasm wasm filter running `dist/<module>.wasm` with `config` as its plugin
    /// configuration (root_id and vm_id `meshwasm.<module>`).
    pub fn wasm(module: &str, config: serde_json::Value) -> Self {
        Self::wasm_raw(module, &config.to_string())
    }

    /// Like [`Filter::wasm`], with the plugin configuration given verbatim (for
    /// malformed JSON).
    pub fn wasm_raw(module: &str, config_json: &str) -> Self {
        let path = crate::wasm_module(module);
        let id = format!("meshwasm.{module}");
        let value = config_json.replace('\n', " ").replace('\'', "''");
        let yaml = format!(
            r#"name: envoy.filters.http.wasm
typed_config:
  "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
  config:
    name: {id}
    root_id: {id}
    configuration:
      "@type": type.googleapis.com/google.protobuf.StringValue
      value: '{value}'
    vm_config:
      vm_id: {id}
      runtime: envoy.wasm.runtime.v8
      code: {{ local: {{ filename: {path} }} }}
"#,
            path = path.display()
        );
        Self { name: "envoy.filters.http.wasm".into(), yaml }
    }

    /// A filter given as raw YAML: a mapping with `name:` and `typed_config:`.
    pub fn native(yaml: &str) -> Self {
        let yaml = unindent(yaml);
        let name = yaml
            .lines()
            .find_map(|l| l.strip_prefix("name:"))
            .map(|n| n.trim().trim_matches('"').to_string())
            .unwrap_or_else(|| panic!("filter YAML has no top-level `name:`:\n{yaml}"));
        Self { name, yaml }
    }

    /// Sets the wasm plugin's `allow_on_headers_stop_iteration` (Envoy ≥ 1.35): a filter that
    /// pauses in its request-headers callback still gets the body callbacks (without it Envoy
    /// turns the pause into StopAllIteration and buffers the body out of the filter's sight).
    #[must_use]
    pub fn allow_on_headers_stop_iteration(mut self) -> Self {
        self.yaml = self.yaml.replacen("    root_id:", "    allow_on_headers_stop_iteration: true\n    root_id:", 1);
        self
    }

    /// Sets the wasm plugin's `config.name` (default `meshwasm.<module>`): filters keep state
    /// shared across workers (rate-limit buckets) under it, so two listeners with distinct
    /// plugin names have distinct state.
    #[must_use]
    pub fn plugin_name(mut self, name: &str) -> Self {
        if let Some(start) = self.yaml.find("\n    name: ") {
            let line_end = self.yaml[start + 1..].find('\n').map_or(self.yaml.len(), |e| start + 1 + e);
            self.yaml.replace_range(start + 1..line_end, &format!("    name: {name}"));
        }
        self
    }

    /// Renames the filter (its `name:` in the chain, used by `typed_per_filter_config`);
    /// needed when a chain holds two wasm filters.
    #[must_use]
    pub fn named(mut self, name: &str) -> Self {
        let old = format!("name: {}", self.name);
        self.yaml = self.yaml.replacen(&old, &format!("name: {name}"), 1);
        self.name = name.to_string();
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn yaml(&self) -> &str {
        &self.yaml
    }
}

// === impl Route ===

impl Route {
    /// A route named `name` matching path prefix `prefix`, to the `upstream` cluster.
    pub fn new(name: &str, prefix: &str) -> Self {
        Self {
            name: name.into(),
            prefix: prefix.into(),
            metadata_yaml: None,
            disabled_filters: Vec::new(),
            action_yaml: None,
        }
    }

    /// The route action as YAML (the mapping under `route:`), replacing the default
    /// `{cluster: upstream, timeout: 60s}`: e.g. a `retry_policy`, another cluster.
    #[must_use]
    pub fn action_yaml(mut self, yaml: &str) -> Self {
        self.action_yaml = Some(unindent(yaml));
        self
    }

    /// Route `metadata` as YAML (the mapping under `metadata:`, e.g. `filter_metadata: …`).
    #[must_use]
    pub fn metadata_yaml(mut self, yaml: &str) -> Self {
        self.metadata_yaml = Some(unindent(yaml));
        self
    }

    /// The meshwasm per-route override: `filter_metadata: {meshwasm: {<filter>: <config>}}`.
    #[must_use]
    pub fn meshwasm_override(self, filter: &str, config: serde_json::Value) -> Self {
        let yaml = format!("filter_metadata:\n  meshwasm:\n    {filter}: {config}\n");
        self.metadata_yaml(&yaml)
    }

    /// Disables the HTTP filter named `filter` on this route
    /// (`typed_per_filter_config` with `envoy.config.route.v3.FilterConfig{disabled: true}`).
    #[must_use]
    pub fn disable_filter(mut self, filter: &str) -> Self {
        self.disabled_filters.push(filter.into());
        self
    }

    fn render(&self, out: &mut String, indent: usize) {
        let pad = " ".repeat(indent);
        if self.name.is_empty() {
            // An unnamed route (`xds.route_name` is empty).
            let _ = writeln!(out, "{pad}- match: {{ prefix: \"{}\" }}", self.prefix);
        } else {
            let _ = writeln!(out, "{pad}- name: {}", self.name);
            let _ = writeln!(out, "{pad}  match: {{ prefix: \"{}\" }}", self.prefix);
        }
        match &self.action_yaml {
            None => {
                let _ = writeln!(out, "{pad}  route: {{ cluster: upstream, timeout: 60s }}");
            }
            Some(action) => {
                let _ = writeln!(out, "{pad}  route:");
                out.push_str(&indent_block(action, indent + 4));
            }
        }
        if let Some(md) = &self.metadata_yaml {
            let _ = writeln!(out, "{pad}  metadata:");
            out.push_str(&indent_block(md, indent + 4));
        }
        if !self.disabled_filters.is_empty() {
            let _ = writeln!(out, "{pad}  typed_per_filter_config:");
            for f in &self.disabled_filters {
                let _ = writeln!(out, "{pad}    {f}:");
                let _ = writeln!(out, "{pad}      \"@type\": type.googleapis.com/envoy.config.route.v3.FilterConfig");
                let _ = writeln!(out, "{pad}      disabled: true");
            }
        }
    }
}

// === impl Listener ===

impl Default for Listener {
    fn default() -> Self {
        Self::new()
    }
}

impl Listener {
    /// Renders the listener as an item of `static_resources.listeners` (indent 2).
    fn render(&self, y: &mut String, name: &str, port: u16) {
        let l = self;
        let hcm: String = l.hcm.iter().map(|(k, v)| format!("          {k}: {v}\n")).collect();
        let _ = write!(
            y,
            r#"  - name: {name}
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {port} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          codec_type: AUTO
{hcm}          route_config:
            name: {name}_routes
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
"#
        );
        let default_route = [Route::new("default", "/")];
        let routes: &[Route] = if l.routes.is_empty() { &default_route } else { &l.routes };
        for r in routes {
            r.render(y, 14);
        }
        if let Some(hcm) = &l.hcm_yaml {
            y.push_str(&indent_block(hcm, 10));
        }
        y.push_str("          http_filters:\n");
        for f in &l.filters {
            y.push_str(&list_item(&f.yaml, 10));
        }
        y.push_str(
            "          - name: envoy.filters.http.router\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\n",
        );
        if let Some(tls) = &l.tls {
            tls.render(y, 6);
        }
    }

    /// The listener as an LDS file (a DiscoveryResponse with one resource) on `port`, named
    /// like the builder names it (`listener_0` unless named), for
    /// [`EnvoyBuilder::lds_file`]: write it beside the watched file and rename it over.
    pub fn lds_yaml(&self, port: u16) -> String {
        let mut rendered = String::new();
        let name = self.name.clone().unwrap_or_else(|| "listener_0".to_string());
        self.render(&mut rendered, &name, port);
        lds_document(&rendered)
    }

    /// A listener on a free port; with no routes it gets one route `default` for `/`.
    pub fn new() -> Self {
        Self {
            name: None,
            port: None,
            filters: Vec::new(),
            routes: Vec::new(),
            tls: None,
            hcm: Vec::new(),
            hcm_yaml: None,
        }
    }

    /// Serves downstream TLS on this listener (plaintext when not set).
    #[must_use]
    pub fn tls(mut self, tls: DownstreamTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sets an HttpConnectionManager field to a YAML value (flow style), e.g.
    /// `hcm_option("server_name", "meshwasm")`. The named helpers below use it; a field set
    /// twice keeps the last value. Nothing set = the default bootstrap exactly.
    #[must_use]
    pub fn hcm_option(mut self, key: &str, yaml_value: &str) -> Self {
        self.hcm.retain(|(k, _)| k != key);
        self.hcm.push((key.into(), yaml_value.into()));
        self
    }

    /// `use_remote_address` (Envoy's default: false).
    #[must_use]
    pub fn use_remote_address(self, on: bool) -> Self {
        self.hcm_option("use_remote_address", &on.to_string())
    }

    /// `xff_num_trusted_hops` (Envoy's default: 0).
    #[must_use]
    pub fn xff_num_trusted_hops(self, n: u32) -> Self {
        self.hcm_option("xff_num_trusted_hops", &n.to_string())
    }

    /// `normalize_path` (RFC 3986 normalisation: `/./`, `/../`, percent-decoding of unreserved).
    #[must_use]
    pub fn normalize_path(self, on: bool) -> Self {
        self.hcm_option("normalize_path", &on.to_string())
    }

    /// `merge_slashes` (`//a///b` → `/a/b`).
    #[must_use]
    pub fn merge_slashes(self, on: bool) -> Self {
        self.hcm_option("merge_slashes", &on.to_string())
    }

    /// `path_with_escaped_slashes_action`: `KEEP_UNCHANGED`, `REJECT_REQUEST`,
    /// `UNESCAPE_AND_REDIRECT` or `UNESCAPE_AND_FORWARD`.
    #[must_use]
    pub fn path_with_escaped_slashes_action(self, action: &str) -> Self {
        self.hcm_option("path_with_escaped_slashes_action", action)
    }

    /// `forward_client_cert_details`: `SANITIZE` (Envoy's default), `FORWARD_ONLY`,
    /// `APPEND_FORWARD`, `SANITIZE_SET`, `ALWAYS_FORWARD_ONLY`.
    #[must_use]
    pub fn forward_client_cert_details(self, mode: &str) -> Self {
        self.hcm_option("forward_client_cert_details", mode)
    }

    /// `set_current_client_cert_details: {uri: true}` (the client's URI SANs in
    /// `x-forwarded-client-cert` with `SANITIZE_SET` / `APPEND_FORWARD`).
    #[must_use]
    pub fn set_current_client_cert_details_uri(self) -> Self {
        self.hcm_option("set_current_client_cert_details", "{ uri: true }")
    }

    /// Names the listener (also its HCM `stat_prefix`); default `listener_<index>`.
    #[must_use]
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.into());
        self
    }

    /// A fixed port (see [`free_port`]); default: a free port picked at start.
    #[must_use]
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Appends an HTTP filter (the router is always last).
    #[must_use]
    pub fn filter(mut self, f: Filter) -> Self {
        self.filters.push(f);
        self
    }

    #[must_use]
    pub fn route(mut self, r: Route) -> Self {
        self.routes.push(r);
        self
    }

    /// Extra HttpConnectionManager fields as YAML (a mapping), e.g. `internal_address_config`.
    #[must_use]
    pub fn hcm_yaml(mut self, yaml: &str) -> Self {
        self.hcm_yaml = Some(unindent(yaml));
        self
    }
}

// === impl EnvoyBuilder ===

impl Default for EnvoyBuilder {
    fn default() -> Self {
        Self {
            upstream: None,
            upstream_proto: UpstreamProto::Http1,
            listeners: Vec::new(),
            concurrency: 2,
            stats_tags: vec![("rule".into(), RULE_TAG_REGEX.into())],
            clusters_yaml: Vec::new(),
            log_level: "info".into(),
            component_log_level: None,
            lds_file: None,
        }
    }
}

impl EnvoyBuilder {
    /// The address of cluster `upstream` (default 127.0.0.1:9, where nothing listens).
    #[must_use]
    pub fn upstream(mut self, addr: SocketAddr) -> Self {
        self.upstream = Some(addr);
        self
    }

    /// Speak HTTP/2 (h2c) to the upstream instead of HTTP/1.1.
    #[must_use]
    pub fn upstream_proto(mut self, proto: UpstreamProto) -> Self {
        self.upstream_proto = proto;
        self
    }

    #[must_use]
    pub fn upstream_h2(self) -> Self {
        self.upstream_proto(UpstreamProto::Http2)
    }

    #[must_use]
    pub fn listener(mut self, l: Listener) -> Self {
        self.listeners.push(l);
        self
    }

    /// `--concurrency` (worker threads), default 2.
    #[must_use]
    pub fn concurrency(mut self, n: u32) -> Self {
        self.concurrency = n;
        self
    }

    /// Adds a `stats_config.stats_tags` entry (the meshwasm `rule` tag is always there).
    #[must_use]
    pub fn stats_tag(mut self, tag_name: &str, regex: &str) -> Self {
        self.stats_tags.push((tag_name.into(), regex.into()));
        self
    }

    /// Removes every `stats_tags` entry, including the default `rule` tag.
    #[must_use]
    pub fn no_stats_tags(mut self) -> Self {
        self.stats_tags.clear();
        self
    }

    /// Serve the listeners over LDS from `path` (a filesystem `path_config_source` whose
    /// directory Envoy watches) instead of `static_resources`; the file is written at start.
    /// Update it with [`Listener::lds_yaml`] written beside it and renamed over it.
    #[must_use]
    pub fn lds_file(mut self, path: PathBuf) -> Self {
        self.lds_file = Some(path);
        self
    }

    /// Adds a raw cluster (YAML mapping) next to `upstream` (for side services).
    #[must_use]
    pub fn cluster_yaml(mut self, yaml: &str) -> Self {
        self.clusters_yaml.push(unindent(yaml));
        self
    }

    /// A STATIC HTTP/1.1 cluster `name` with one endpoint (e.g. an HTTP ext_authz service).
    #[must_use]
    pub fn http_cluster(self, name: &str, addr: SocketAddr) -> Self {
        let yaml = static_cluster(name, addr, false);
        self.cluster_yaml(&yaml)
    }

    /// A STATIC h2c cluster `name` with one endpoint (`http2_protocol_options`), as Envoy's
    /// gRPC clients (ext_authz, rate limit) need for a Envoy-gRPC `cluster_name`.
    #[must_use]
    pub fn grpc_cluster(self, name: &str, addr: SocketAddr) -> Self {
        let yaml = static_cluster(name, addr, true);
        self.cluster_yaml(&yaml)
    }

    /// `-l` (default `info`).
    #[must_use]
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.into();
        self
    }

    /// `--component-log-level`, e.g. `wasm:debug`.
    #[must_use]
    pub fn component_log_level(mut self, spec: &str) -> Self {
        self.component_log_level = Some(spec.into());
        self
    }

    /// Renders the bootstrap YAML for the given ports.
    pub fn bootstrap(&self, admin_port: u16, listener_ports: &[u16]) -> String {
        let mut y = String::new();
        let _ =
            writeln!(y, "admin:\n  address:\n    socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }}");
        if !self.stats_tags.is_empty() {
            y.push_str("stats_config:\n  stats_tags:\n");
            for (name, regex) in &self.stats_tags {
                let _ = writeln!(y, "  - tag_name: {name}\n    regex: '{}'", regex.replace('\'', "''"));
            }
        }
        y.push_str("static_resources:\n  listeners:\n");
        let default_listener = [Listener::new()];
        let listeners: &[Listener] = if self.listeners.is_empty() { &default_listener } else { &self.listeners };
        let mut rendered = String::new();
        for (i, l) in listeners.iter().enumerate() {
            let name = l.name.clone().unwrap_or_else(|| format!("listener_{i}"));
            l.render(&mut rendered, &name, listener_ports[i]);
        }
        match &self.lds_file {
            None => y.push_str(&rendered),
            Some(path) => {
                // The listeners go to the LDS file; Envoy watches its directory (replace the
                // file by a rename to update them: see `Listener::lds_yaml`).
                std::fs::write(path, lds_document(&rendered)).expect("write the LDS file");
                y.insert_str(
                    0,
                    &format!(
                        "node: {{ id: meshwasm-test, cluster: meshwasm-test }}\ndynamic_resources:\n  lds_config:\n    resource_api_version: V3\n    path_config_source:\n      path: {}\n      watched_directory: {{ path: {} }}\n",
                        path.display(),
                        path.parent().expect("LDS file in a directory").display()
                    ),
                );
                y.push_str("    []\n");
            }
        }
        let up = self.upstream.unwrap_or_else(|| "127.0.0.1:9".parse().expect("addr"));
        let _ = write!(
            y,
            r#"  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: {}, port_value: {} }}
"#,
            up.ip(),
            up.port()
        );
        if self.upstream_proto == UpstreamProto::Http2 {
            y.push_str(
                r#"    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {}
"#,
            );
        }
        for c in &self.clusters_yaml {
            y.push_str(&list_item(c, 2));
        }
        y
    }

    fn prepare(&self) -> (PathBuf, u16, Vec<u16>, String, PathBuf, Command) {
        let dir = temp_dir();
        let admin_port = free_port();
        let n = self.listeners.len().max(1);
        let ports: Vec<u16> =
            (0..n).map(|i| self.listeners.get(i).and_then(|l| l.port).unwrap_or_else(free_port)).collect();
        let config = self.bootstrap(admin_port, &ports);
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, &config).expect("write bootstrap");
        let log_path = dir.join("envoy.log");
        let log = std::fs::File::create(&log_path).expect("create log");
        let mut cmd = Command::new(crate::envoy_bin());
        cmd.arg("-c")
            .arg(&config_path)
            .arg("--concurrency")
            .arg(self.concurrency.to_string())
            .arg("--disable-hot-restart")
            .arg("--base-id")
            .arg(unique_base_id().to_string())
            .arg("-l")
            .arg(&self.log_level);
        if let Some(c) = &self.component_log_level {
            cmd.arg("--component-log-level").arg(c);
        }
        cmd.stdin(Stdio::null()).stdout(log.try_clone().expect("dup log")).stderr(log);
        (dir, admin_port, ports, config, log_path, cmd)
    }

    /// Starts Envoy and waits until admin `/ready` answers 200; panics with Envoy's log
    /// if it exits or is not ready in time.
    pub fn start(self) -> Envoy {
        let (dir, admin_port, ports, config, log_path, mut cmd) = self.prepare();
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
        let mut envoy = Envoy {
            child: Some(child),
            dir,
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            listeners: ports.iter().map(|p| SocketAddr::from(([127, 0, 0, 1], *p))).collect(),
            log_path,
            config,
        };
        envoy.wait_ready();
        envoy
    }

    /// Starts Envoy expecting it to refuse the configuration and exit; returns its exit
    /// status and log. Panics if it becomes ready instead, or does not exit in time.
    pub fn expect_failure(self) -> FailedEnvoy {
        let (dir, admin_port, _ports, config, log_path, mut cmd) = self.prepare();
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
        let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("wait envoy") {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let _ = std::fs::remove_dir_all(&dir);
                return FailedEnvoy { status, log, config };
            }
            if ready(admin) {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                panic!("Envoy accepted a configuration it should have refused.\n--- config ---\n{config}\n--- log ---\n{log}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                panic!("Envoy neither exited nor became ready in {READY_TIMEOUT:?}.\n--- log ---\n{log}");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

// === impl Envoy ===

impl Envoy {
    pub fn builder() -> EnvoyBuilder {
        EnvoyBuilder::default()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "Envoy exited with {status} before it was ready.\n--- config ---\n{}\n--- log ---\n{}",
                    self.config,
                    self.log()
                );
            }
            if ready(self.admin) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Envoy was not ready after {READY_TIMEOUT:?} (GET {}/ready)",
                self.admin_url()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `http://127.0.0.1:<port>` of the first listener.
    pub fn listener_url(&self) -> String {
        format!("http://{}", self.listener_addr())
    }

    pub fn listener_addr(&self) -> SocketAddr {
        self.listeners[0]
    }

    /// The address of listener `i` (in the order they were added).
    pub fn listener_addr_of(&self, i: usize) -> SocketAddr {
        self.listeners[i]
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// The bootstrap YAML this Envoy runs.
    pub fn config(&self) -> &str {
        &self.config
    }

    /// Sends `req` to the first listener (panics on a transport error).
    pub fn send(&self, req: Request) -> Response {
        client::send(self.listener_addr(), &req)
    }

    /// Sends `req` to listener `i`.
    pub fn send_to(&self, i: usize, req: Request) -> Response {
        client::send(self.listener_addr_of(i), &req)
    }

    /// Sends `req` over TLS to listener `i` (a [`Listener::tls`] one); panics on a transport
    /// or TLS error.
    pub fn send_tls(&self, i: usize, req: Request, tls: &TlsClient) -> Response {
        client::send_tls(self.listener_addr_of(i), &req, tls)
    }

    /// Like [`Envoy::send_tls`], returning transport and TLS errors (a refused handshake).
    pub fn try_send_tls(&self, i: usize, req: Request, tls: &TlsClient) -> Result<Response, String> {
        client::try_send_tls(self.listener_addr_of(i), &req, tls)
    }

    pub fn get(&self, path: &str) -> Response {
        self.send(Request::get(path))
    }

    /// `GET <admin><path>`; panics unless it answers.
    pub fn admin_get(&self, path: &str) -> Response {
        client::send(self.admin, &Request::get(path))
    }

    /// `POST <admin><path>` (e.g. `/reset_counters`).
    pub fn admin_post(&self, path: &str) -> Response {
        client::send(self.admin, &Request::new("POST", path))
    }

    /// Every counter and gauge from admin `/stats` (histograms are skipped).
    pub fn stats(&self) -> HashMap<String, u64> {
        let rsp = self.admin_get("/stats");
        assert_eq!(rsp.status, 200, "admin /stats: {}", rsp.text());
        parse_stats(&rsp.text())
    }

    /// One counter or gauge, `None` if Envoy does not have it (yet).
    pub fn stat(&self, name: &str) -> Option<u64> {
        self.stats().get(name).copied()
    }

    /// One counter or gauge, 0 when absent.
    pub fn stat_or_zero(&self, name: &str) -> u64 {
        self.stat(name).unwrap_or(0)
    }

    /// Admin `/stats/prometheus`.
    pub fn prometheus(&self) -> String {
        let rsp = self.admin_get("/stats/prometheus");
        assert_eq!(rsp.status, 200, "admin /stats/prometheus: {}", rsp.text());
        rsp.text()
    }

    /// Envoy's log so far (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until admin `/ready` is 200 again and the process is alive (for "still
    /// healthy" checks).
    pub fn assert_healthy(&mut self) {
        self.wait_ready();
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() || std::env::var_os("MESHWASM_TEST_LOG").is_some() {
            eprintln!(
                "===== Envoy log ({}) =====\n{}\n===== end of Envoy log; bootstrap: {} =====",
                self.log_path.display(),
                self.log(),
                self.dir.join("envoy.yaml").display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn ready(admin: SocketAddr) -> bool {
    let req = Request::get("/ready").timeout(Duration::from_secs(2));
    matches!(client::try_send(admin, &req), Ok(r) if r.status == 200)
}

fn static_cluster(name: &str, addr: SocketAddr, h2: bool) -> String {
    let mut y = format!(
        "name: {name}\ntype: STATIC\nconnect_timeout: 2s\nload_assignment:\n  cluster_name: {name}\n  endpoints:\n  - lb_endpoints:\n    - endpoint:\n        address:\n          socket_address: {{ address: {}, port_value: {} }}\n",
        addr.ip(),
        addr.port()
    );
    if h2 {
        y.push_str("typed_extension_protocol_options:\n  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n    \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n    explicit_http_config:\n      http2_protocol_options: {}\n");
    }
    y
}

/// Parses admin `/stats` text (`name: value` lines); skips histograms.
pub fn parse_stats(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(": ")?;
            Some((k.trim().to_string(), v.trim().parse::<u64>().ok()?))
        })
        .collect()
}

/// A free TCP port on 127.0.0.1 (bound to port 0, then released), never one this process
/// handed out before: the kernel may give a just-released port again, and a test that asks for
/// several ports before starting Envoy would then configure two listeners on one address.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local addr").port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

fn unique_base_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    (std::process::id() % 100_000) * 100 + NEXT.fetch_add(1, Ordering::Relaxed) % 100
}

fn temp_dir() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "meshwasm-envoy-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// Removes the common leading indentation and leading/trailing blank lines.
fn unindent(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let start = lines.iter().position(|l| !l.trim().is_empty()).unwrap_or(lines.len());
    let end = lines.iter().rposition(|l| !l.trim().is_empty()).map_or(start, |e| e + 1);
    let body = &lines[start..end];
    let common =
        body.iter().filter(|l| !l.trim().is_empty()).map(|l| l.len() - l.trim_start().len()).min().unwrap_or(0);
    let mut out = String::new();
    for l in body {
        out.push_str(l.get(common..).unwrap_or(""));
        out.push('\n');
    }
    out
}

/// `yaml` (a mapping) indented by `indent` spaces.
fn indent_block(yaml: &str, indent: usize) -> String {
    let pad = " ".repeat(indent);
    unindent(yaml).lines().map(|l| if l.is_empty() { "\n".to_string() } else { format!("{pad}{l}\n") }).collect()
}

/// `yaml` (a mapping) as a YAML list item at `indent`.
/// Static listener items (indent 2) → an LDS DiscoveryResponse document.
fn lds_document(static_items: &str) -> String {
    let mut out = String::from("resources:\n");
    for line in static_items.lines() {
        let line = line.strip_prefix("  ").unwrap_or(line);
        match line.strip_prefix("- ") {
            Some(rest) => {
                out.push_str("- \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n  ");
                out.push_str(rest);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

fn list_item(yaml: &str, indent: usize) -> String {
    let pad = " ".repeat(indent);
    let mut out = String::new();
    for (i, l) in unindent(yaml).lines().enumerate() {
        if i == 0 {
            let _ = writeln!(out, "{pad}- {l}");
        } else if l.is_empty() {
            out.push('\n');
        } else {
            let _ = writeln!(out, "{pad}  {l}");
        }
    }
    out
}

// === impl Envoy: a caller-rendered bootstrap ===

impl Envoy {
    /// Starts Envoy with a bootstrap the caller renders (YAML or JSON) for an admin port and
    /// one free port per entry of `listener_ips` (listeners that bind another loopback
    /// address, node metadata, cluster metadata: what the builder does not model). Waits
    /// for admin `/ready` like [`EnvoyBuilder::start`].
    pub fn start_bootstrap(
        listener_ips: &[std::net::IpAddr],
        concurrency: u32,
        render: impl FnOnce(u16, &[u16]) -> String,
    ) -> Envoy {
        let dir = temp_dir();
        let admin_port = free_port();
        let ports: Vec<u16> = listener_ips.iter().map(|_| free_port()).collect();
        let config = render(admin_port, &ports);
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, &config).expect("write bootstrap");
        let log_path = dir.join("envoy.log");
        let log = std::fs::File::create(&log_path).expect("create log");
        let mut cmd = Command::new(crate::envoy_bin());
        cmd.arg("-c")
            .arg(&config_path)
            .arg("--concurrency")
            .arg(concurrency.to_string())
            .arg("--disable-hot-restart")
            .arg("--base-id")
            .arg(unique_base_id().to_string())
            .arg("-l")
            .arg("info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
        let mut envoy = Envoy {
            child: Some(child),
            dir,
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            listeners: listener_ips.iter().zip(&ports).map(|(ip, p)| SocketAddr::new(*ip, *p)).collect(),
            log_path,
            config,
        };
        envoy.wait_ready();
        envoy
    }

    /// The process id (for memory measurements).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}
