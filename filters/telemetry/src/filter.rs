//! The telemetry stream and root: peer metadata exchange on the headers, the standard
//! labels and the tag overrides at the end of the stream, and the stats.
//!
//! Cost model (docs/sdk-ext.md#what-a-hostcall-costs: a call returning data ≈ 1.1–1.3 µs,
//! one without ≈ 0.2–0.35 µs): node metadata is read once per VM at configure time; a peer's
//! exchange header is decoded once and cached by its value; an upstream cluster's metadata is
//! decoded once per cluster name; the four HTTP metric ids are looked up once per label set
//! (a short key), their stat names built only the first time. Per request: a few header reads
//! and writes, and the final attributes (flags, duration, sizes, route, cluster, TLS) at the end.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::rc::Rc;
use std::time::Duration;

use serde_json::Value;

use meshwasm_sdk_ext::props::{decode_int, metadata_json};
use meshwasm_sdk_ext::{ConfigError, Flow, HeaderMap, Host, HttpFilter, LogLevel, MetricKind, Plugin};

use crate::config::{Config, Metric, Plan, Reporter, Source};
use crate::expr::{walk, Attributes, Seg, Val};
use crate::labels::{self, escape, Inputs};
use crate::peer::{self, Workload};

pub const NAME: &str = "telemetry";

/// The counter of records folded into an overflow series (`maxSeries`):
/// Prometheus `meshwasm_telemetry_series_overflow`.
pub const OVERFLOW_STAT: &str = "meshwasm.telemetry.series_overflow";
/// The value every label but `reporter` takes in the overflow series.
pub const OVERFLOW_VALUE: &str = "overflow";

/// Decoded peers kept per VM; past this the cache starts over (peers are few in practice,
/// and a client sending random metadata must not grow memory without bound).
const PEER_CACHE_MAX: usize = 1024;
const CLUSTER_CACHE_MAX: usize = 1024;
/// Label sets whose HTTP metric ids are remembered per VM; past this the cache starts over
/// (a flood of distinct label values then takes the slow path, which `maxSeries` bounds).
const LABEL_SET_CACHE_MAX: usize = 4096;

/// The HTTP metrics this filter records, with their stat kind.
const HTTP_METRICS: [(Metric, MetricKind); 4] = [
    (Metric::RequestCount, MetricKind::Counter),
    (Metric::RequestDuration, MetricKind::Histogram),
    (Metric::RequestSize, MetricKind::Histogram),
    (Metric::ResponseSize, MetricKind::Histogram),
];

// === impl TelemetryPlugin ===

/// Metric ids of the series this VM has seen, and how many per metric (for `maxSeries`).
#[derive(Default)]
struct Series {
    ids: HashMap<String, u32>,
    counts: [usize; 10],
    overflow_id: Option<u32>,
}

/// The four HTTP metrics' ids for one label set (`HTTP_METRICS` order), and how many of
/// them were folded into an overflow series (counted again on every request that uses them).
#[derive(Clone, Copy)]
struct HttpIds {
    ids: [Option<u32>; 4],
    folded: u8,
}

/// What a finished HTTP stream's labels derive from, as `gather` read it.
struct Gathered {
    cluster: String,
    route: String,
    cluster_md: Option<Rc<Value>>,
    peer_san: String,
    local_san: String,
    /// The tag override expressions' values (`Config::exprs` order).
    values: Vec<String>,
}

/// A finished HTTP stream's standard labels and metric ids (`TelemetryPlugin::http_labels`).
pub(crate) struct Derived {
    pub(crate) standard: Vec<String>,
    ids: HttpIds,
    /// Keeps the peer alive while its address is part of a cache key.
    _peer: Option<Rc<Workload>>,
}

pub struct TelemetryPlugin {
    config: Config,
    /// `{"id": …, "metadata": {…}}` of this proxy's node (for `xds.node.*` expressions).
    node: Value,
    local: Workload,
    node_id: String,
    /// The `x-envoy-peer-metadata` value this proxy sends.
    exchange: String,
    /// The TCP exchange frame this proxy sends (with `tcpMetadataExchange`).
    pub(crate) tcp_frame: Vec<u8>,
    reporter: Cell<Option<Reporter>>,
    peers: RefCell<HashMap<String, Rc<Workload>>>,
    clusters: RefCell<HashMap<String, Rc<Value>>>,
    series: RefCell<Series>,
    /// Finished HTTP streams' labels and metric ids by what they derive from (`input_key`):
    /// one short lookup per request instead of deriving 25 labels and building four ~1 KiB
    /// stat names.
    derived: RefCell<HashMap<String, Rc<Derived>>>,
    /// Access-log (and span) exporters of this worker (`export.rs`).
    pub(crate) export: crate::export::Exporters,
}

impl TelemetryPlugin {
    pub fn new(mut config: Config, node_id: String, node_metadata: Value) -> Self {
        let local = Workload::from_metadata(&node_metadata);
        let export = crate::export::Exporters::new(
            std::mem::take(&mut config.exporters),
            crate::export::resource_attributes(&local, &node_id),
        );
        let exchange = peer::encode_exchange(&node_metadata);
        let tcp_frame = if config.tcp_metadata_exchange { peer::encode_tcp_frame(&node_metadata) } else { Vec::new() };
        let node = serde_json::json!({"id": node_id, "metadata": node_metadata});
        Self {
            reporter: Cell::new(config.reporter),
            config,
            node,
            local,
            node_id,
            exchange,
            tcp_frame,
            peers: RefCell::default(),
            clusters: RefCell::default(),
            series: RefCell::default(),
            derived: RefCell::default(),
            export,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The reporter: configured, or from the listener's direction (read once per VM).
    pub(crate) fn reporter(&self, host: &dyn Host) -> Reporter {
        if let Some(r) = self.reporter.get() {
            return r;
        }
        // envoy.config.core.v3.TrafficDirection: 1 INBOUND, 2 OUTBOUND.
        let dir = host
            .property(&["xds", "listener_direction"])
            .or_else(|| host.property(&["listener_direction"]))
            .and_then(|b| decode_int(&b));
        let r = if dir == Some(1) { Reporter::Server } else { Reporter::Client };
        self.reporter.set(Some(r));
        r
    }

    fn peer(&self, host: &dyn Host, header: &str) -> Option<Rc<Workload>> {
        if let Some(w) = self.peers.borrow().get(header) {
            return Some(w.clone());
        }
        match peer::decode_exchange(header) {
            Ok(w) => {
                let w = Rc::new(w);
                let mut peers = self.peers.borrow_mut();
                if peers.len() >= PEER_CACHE_MAX {
                    peers.clear();
                }
                peers.insert(header.to_string(), w.clone());
                Some(w)
            }
            Err(e) => {
                host.log(LogLevel::Debug, &format!("meshwasm.telemetry: ignoring undecodable {}: {e}", peer::HEADER));
                None
            }
        }
    }

    /// `xds.cluster_metadata` as JSON, decoded once per cluster name.
    fn cluster_metadata(&self, host: &dyn Host, cluster: &str) -> Rc<Value> {
        if let Some(v) = self.clusters.borrow().get(cluster) {
            return v.clone();
        }
        let v = host.property(&["xds", "cluster_metadata"]).and_then(|b| metadata_json(&b).ok()).unwrap_or(Value::Null);
        let v = Rc::new(v);
        let mut clusters = self.clusters.borrow_mut();
        if clusters.len() >= CLUSTER_CACHE_MAX {
            clusters.clear();
        }
        clusters.insert(cluster.to_string(), v.clone());
        v
    }

    /// What the labels of one stream or connection derive from, read from the host: the
    /// client's endpoint-metadata fallback for `peer`, the cluster (or the route without
    /// one), the certificates' SANs, the tag override expressions' values.
    fn gather(&self, host: &dyn Host, reporter: Reporter, peer: &mut Option<Rc<Workload>>) -> Gathered {
        let config = &self.config;

        // Client side without exchange: the endpoint's `istio.workload` metadata.
        if peer.is_none() && reporter == Reporter::Client {
            *peer = host
                .property(&["xds", "upstream_host_metadata"])
                .and_then(|b| meshwasm_sdk_ext::props::metadata_namespace(&b, "istio").ok().flatten())
                .and_then(|v| v.get("workload").and_then(Value::as_str).map(str::to_string))
                .and_then(|w| self.endpoint_peer(&w));
        }

        // A property read is the dearest hostcall (docs/sdk-ext.md#what-a-hostcall-costs). The
        // route name only decides Istio's `block_all` (a direct response: no upstream cluster)
        // and `allow_any` (routed to PassthroughCluster, which names the service the same way
        // through the cluster): it is read only when there is no cluster.
        let cluster = prop_string(host, &["xds", "cluster_name"]);
        let route = if cluster.is_empty() { prop_string(host, &["xds", "route_name"]) } else { String::new() };
        let cluster_md = if cluster.is_empty() { None } else { Some(self.cluster_metadata(host, &cluster)) };
        // Certificates exist only on a TLS connection: one read decides whether to look.
        let side = match reporter {
            Reporter::Server => "connection",
            Reporter::Client => "upstream",
        };
        let (peer_san, local_san) = if host.property(&[side, "tls_version"]).is_some_and(|v| !v.is_empty()) {
            (
                prop_string(host, &[side, "uri_san_peer_certificate"]),
                prop_string(host, &[side, "uri_san_local_certificate"]),
            )
        } else {
            (String::new(), String::new())
        };
        // Tag override expressions: each evaluated once per derivation.
        let values: Vec<String> = if config.has_exprs() {
            let mut view = View { host, plugin: self, peer: peer.as_deref(), reporter, cluster_md: cluster_md.clone() };
            config
                .exprs
                .iter()
                .map(|e| e.eval(&mut view).map_or_else(|| labels::UNKNOWN.to_string(), |v| v.render()))
                .collect()
        } else {
            Vec::new()
        };
        Gathered { cluster, route, cluster_md, peer_san, local_san, values }
    }

    /// The endpoint-metadata peer `workload` (`name;namespace;…`), one `Workload` per value
    /// (the derivation cache tells peers apart by their `Rc`).
    fn endpoint_peer(&self, workload: &str) -> Option<Rc<Workload>> {
        let key = format!("endpoint:{workload}");
        if let Some(w) = self.peers.borrow().get(&key) {
            return Some(w.clone());
        }
        let w = Rc::new(Workload::from_endpoint(workload)?);
        let mut peers = self.peers.borrow_mut();
        if peers.len() >= PEER_CACHE_MAX {
            peers.clear();
        }
        peers.insert(key, w.clone());
        Some(w)
    }

    /// The standard label values (index-aligned with `STANDARD_TAGS`) from what `gather` read.
    fn standard(
        &self,
        g: &Gathered,
        reporter: Reporter,
        peer: Option<&Workload>,
        authority: Option<&str>,
        grpc: bool,
        response: Option<(u64, Option<u64>, u64)>,
    ) -> Vec<String> {
        let istio_md = g.cluster_md.as_deref().and_then(|m| m.get("filter_metadata")).and_then(|m| m.get("istio"));
        let (service_host, service_name) = labels::destination_service(
            authority,
            self.config.disable_host_header_fallback,
            &g.route,
            &g.cluster,
            istio_md,
        );
        let (response_code, grpc_status, flags) = response.unwrap_or((0, None, 0));
        labels::standard(&Inputs {
            reporter,
            local: &self.local,
            peer,
            service_host: &service_host,
            service_name: &service_name,
            peer_san: &g.peer_san,
            local_san: &g.local_san,
            grpc,
            response_code,
            grpc_status,
            response_flags: flags,
        })
    }

    /// The labels of one stream or connection as Istio derives them: the standard values
    /// (index-aligned with `STANDARD_TAGS`) and the tag override expressions' values.
    /// `response`: `(code, grpc status, flags)` once final; `None` before (periodic gRPC
    /// reports: the metrics reported then do not carry those labels). `peer` gets the
    /// client's endpoint-metadata fallback.
    pub(crate) fn labels(
        &self,
        host: &dyn Host,
        reporter: Reporter,
        peer: &mut Option<Rc<Workload>>,
        authority: Option<&str>,
        grpc: bool,
        response: Option<(u64, Option<u64>, u64)>,
    ) -> (Vec<String>, Vec<String>) {
        let mut g = self.gather(host, reporter, peer);
        let standard = self.standard(&g, reporter, peer.as_deref(), authority, grpc, response);
        (standard, std::mem::take(&mut g.values))
    }

    /// A finished HTTP stream's labels and metric ids: remembered by what they derive from
    /// (`gather`'s reads, the peer, the authority, the response), so a repeated combination
    /// costs its reads and one short lookup instead of deriving 25 labels and naming four
    /// series again.
    fn http_labels(
        &self,
        host: &dyn Host,
        reporter: Reporter,
        peer: &mut Option<Rc<Workload>>,
        authority: Option<&str>,
        grpc: bool,
        response: (u64, Option<u64>, u64),
    ) -> Rc<Derived> {
        let g = self.gather(host, reporter, peer);
        let key = input_key(reporter, peer.as_ref(), authority, &g, grpc, response);
        if let Some(hit) = self.derived.borrow().get(&key) {
            if hit.ids.folded > 0 {
                if let Some(oid) = self.series.borrow().overflow_id {
                    let _ = host.increment_metric(oid, i64::from(hit.ids.folded));
                }
            }
            return hit.clone();
        }
        let standard = self.standard(&g, reporter, peer.as_deref(), authority, grpc, Some(response));
        let mut ids = HttpIds { ids: [None; 4], folded: 0 };
        for ((metric, kind), slot) in HTTP_METRICS.iter().zip(ids.ids.iter_mut()) {
            let Some(plan) = self.config.plan(reporter, *metric).filter(|p| p.enabled) else { continue };
            let (id, folded) = self.series_folded(host, *metric, *kind, plan, &standard, &g.values);
            *slot = id;
            ids.folded += u8::from(folded);
        }
        let d = Rc::new(Derived { standard, ids, _peer: peer.clone() });
        let mut derived = self.derived.borrow_mut();
        if derived.len() >= LABEL_SET_CACHE_MAX {
            derived.clear();
        }
        derived.insert(key, d.clone());
        d
    }

    /// The metric id of `metric`'s series for these label values (standard values
    /// index-aligned with `STANDARD_TAGS`, expression values with `Config::exprs`), or of
    /// its overflow series past `maxSeries`.
    pub(crate) fn series(
        &self,
        host: &dyn Host,
        metric: Metric,
        kind: MetricKind,
        plan: &Plan,
        standard: &[String],
        values: &[String],
    ) -> Option<u32> {
        self.series_folded(host, metric, kind, plan, standard, values).0
    }

    /// `series`, and whether the label set was folded into the overflow series.
    fn series_folded(
        &self,
        host: &dyn Host,
        metric: Metric,
        kind: MetricKind,
        plan: &Plan,
        standard: &[String],
        values: &[String],
    ) -> (Option<u32>, bool) {
        let mut name = String::with_capacity(1024);
        name.push_str(metric.prom_name());
        for (tag, src) in &plan.tags {
            let v = match src {
                Source::Standard(i) => standard.get(*i).map(String::as_str),
                Source::Expr(i) => values.get(*i).map(String::as_str),
            };
            push_tag(&mut name, tag, v.unwrap_or(labels::UNKNOWN));
        }
        let overflow = || {
            let mut o = String::from(metric.prom_name());
            for (tag, src) in &plan.tags {
                let v = if *src == Source::Standard(0) {
                    standard.first().map_or("", String::as_str)
                } else {
                    OVERFLOW_VALUE
                };
                push_tag(&mut o, tag, v);
            }
            o
        };
        self.series_id(host, metric, kind, &name, overflow)
    }

    /// The metric id for series `name` of `metric`, or the overflow series' past `maxSeries`.
    fn series_id(
        &self,
        host: &dyn Host,
        metric: Metric,
        kind: MetricKind,
        name: &str,
        overflow_name: impl FnOnce() -> String,
    ) -> (Option<u32>, bool) {
        let mut s = self.series.borrow_mut();
        if let Some(id) = s.ids.get(name) {
            return (Some(*id), false);
        }
        let count = s.counts.get(metric.index()).copied().unwrap_or(0);
        if self.config.max_series.is_some_and(|max| count >= max) {
            let overflow = overflow_name();
            let id = match s.ids.get(&overflow) {
                Some(id) => Some(*id),
                None => {
                    let id = meshwasm_sdk_ext::metrics::define(host, kind, &overflow);
                    if let Some(id) = id {
                        s.ids.insert(overflow, id);
                    }
                    id
                }
            };
            if s.overflow_id.is_none() {
                s.overflow_id = meshwasm_sdk_ext::metrics::define(host, MetricKind::Counter, OVERFLOW_STAT);
            }
            if let Some(oid) = s.overflow_id {
                let _ = host.increment_metric(oid, 1);
            }
            return (id, true);
        }
        let Some(id) = meshwasm_sdk_ext::metrics::define(host, kind, name) else { return (None, false) };
        s.ids.insert(name.to_string(), id);
        if let Some(c) = s.counts.get_mut(metric.index()) {
            *c += 1;
        }
        (Some(id), false)
    }
}

impl Plugin for TelemetryPlugin {
    const NAME: &'static str = NAME;
    type Filter = TelemetryFilter;

    fn configure(bytes: &[u8], host: &dyn Host) -> Result<Self, ConfigError> {
        let config = Config::from_json(bytes)?;
        let node = host.property(&["xds", "node"]).or_else(|| host.property(&["node"]));
        let (id, md) = match node.map(|b| peer::decode_node(&b)) {
            Some(Ok(n)) => n,
            Some(Err(e)) => {
                host.log(
                    LogLevel::Warn,
                    &format!("meshwasm.telemetry: node metadata unreadable ({e}); labels will be empty"),
                );
                (String::new(), Value::Object(Default::default()))
            }
            None => (String::new(), Value::Object(Default::default())),
        };
        let plugin = TelemetryPlugin::new(config, id, md);
        for e in &plugin.export.list {
            e.define_stats(host);
        }
        if plugin.config.max_series.is_some() {
            // Show the overflow counter at 0 from the start.
            let id = meshwasm_sdk_ext::metrics::define(host, MetricKind::Counter, OVERFLOW_STAT);
            plugin.series.borrow_mut().overflow_id = id;
        }
        Ok(plugin)
    }

    /// Root work: flush the exporters' batches.
    fn tick(&self, host: &dyn Host) -> Option<std::time::Duration> {
        self.export.tick(host)
    }

    fn on_http_reply(
        &self,
        host: &dyn Host,
        token: u32,
        reply: meshwasm_sdk_ext::HttpReply,
    ) -> Option<std::time::Duration> {
        self.export.on_reply(host, token, &reply)
    }

    fn new_filter(self: &Rc<Self>, _context_id: u32, _seed: u64) -> TelemetryFilter {
        TelemetryFilter {
            plugin: self.clone(),
            reporter: None,
            host: None,
            grpc: false,
            peer: None,
            peer_asked: false,
            reported: false,
            status: None,
            trace: None,
            rng: meshwasm_sdk_ext::rng::WyRand::new(_seed),
            peer_read: false,
            message_ids: None,
            messages_reported: [0; 2],
            messages_done: false,
        }
    }
}

// === impl TelemetryFilter ===

pub struct TelemetryFilter {
    plugin: Rc<TelemetryPlugin>,
    reporter: Option<Reporter>,
    host: Option<String>,
    grpc: bool,
    peer: Option<Rc<Workload>>,
    /// Server side: the request carried peer metadata, so the response answers with ours.
    peer_asked: bool,
    reported: bool,
    /// `:status` of the response headers this filter saw.
    status: Option<u64>,
    /// This request's span (`trace.rs`), when tracing is configured for the reporter.
    trace: Option<crate::trace::Active>,
    rng: meshwasm_sdk_ext::rng::WyRand,
    /// The exchange had its chance (server: request headers; client: response headers):
    /// periodic gRPC reports may start.
    peer_read: bool,
    /// The gRPC message counters' series, once derived.
    message_ids: Option<[Option<u32>; 2]>,
    /// Request and response messages reported so far.
    messages_reported: [u64; 2],
    messages_done: bool,
}

fn prop_string(host: &dyn Host, path: &[&str]) -> String {
    host.property(path).and_then(|b| String::from_utf8(b).ok()).unwrap_or_default()
}

pub(crate) fn prop_int(host: &dyn Host, path: &[&str]) -> Option<u64> {
    host.property(path).and_then(|b| decode_int(&b)).and_then(|v| u64::try_from(v).ok())
}

/// Attributes whose property value is an integer (8 bytes little-endian).
const INT_ATTRIBUTES: &[&str] = &[
    "request.size",
    "request.total_size",
    "request.duration",
    "response.code",
    "response.size",
    "response.total_size",
    "response.flags",
    "response.grpc_status",
    "source.port",
    "destination.port",
    "upstream.port",
    "connection.id",
];
const PROPERTY_ROOTS: &[&str] = &[
    "request",
    "response",
    "connection",
    "upstream",
    "source",
    "destination",
    "xds",
    "plugin_name",
    "plugin_root_id",
    "plugin_vm_id",
    "node",
    "cluster_name",
    "route_name",
    "listener_direction",
];

/// The attribute view tag override expressions evaluate against.
struct View<'a> {
    host: &'a dyn Host,
    plugin: &'a TelemetryPlugin,
    peer: Option<&'a Workload>,
    reporter: Reporter,
    cluster_md: Option<Rc<Value>>,
}

impl Attributes for View<'_> {
    fn lookup(&mut self, root: &str, path: &[Seg]) -> Option<Val> {
        let first = path.first().map(Seg::as_key);
        match (root, first.as_deref()) {
            ("xds", Some("node")) => walk(&self.plugin.node, path.get(1..)?),
            ("node", _) => walk(&self.plugin.node, path),
            ("xds", Some("cluster_metadata")) => {
                let md = match &self.cluster_md {
                    Some(m) => m.clone(),
                    None => {
                        let name = prop_string(self.host, &["xds", "cluster_name"]);
                        let m = self.plugin.cluster_metadata(self.host, &name);
                        self.cluster_md = Some(m.clone());
                        m
                    }
                };
                walk(&md, path.get(1..)?)
            }
            ("xds", Some(which @ ("route_metadata" | "upstream_host_metadata" | "listener_metadata"))) => {
                let md = metadata_json(&self.host.property(&["xds", which])?).ok()?;
                walk(&md, path.get(1..)?)
            }
            ("filter_state", Some(which @ ("upstream_peer" | "downstream_peer"))) => {
                let mine = match self.reporter {
                    Reporter::Client => "upstream_peer",
                    Reporter::Server => "downstream_peer",
                };
                if which != mine {
                    return None;
                }
                walk(&self.peer?.json, path.get(1..)?)
            }
            ("filter_state", Some(key)) => {
                let b = self.host.property(&["filter_state", key])?;
                String::from_utf8(b).ok().map(Val::Str)
            }
            ("request" | "response", Some("headers")) => {
                let map = if root == "request" { HeaderMap::RequestHeaders } else { HeaderMap::ResponseHeaders };
                let name = path.get(1)?.as_key();
                if path.len() > 2 {
                    return None;
                }
                self.host.header(map, &name).map(Val::Str)
            }
            _ if PROPERTY_ROOTS.contains(&root) => {
                let keys: Vec<String> = path.iter().map(Seg::as_key).collect();
                let mut full: Vec<&str> = vec![root];
                full.extend(keys.iter().map(String::as_str));
                let bytes = self.host.property(&full)?;
                let dotted = full.join(".");
                if INT_ATTRIBUTES.contains(&dotted.as_str()) {
                    decode_int(&bytes).map(Val::Int)
                } else if dotted == "connection.mtls" {
                    Some(Val::Bool(bytes.first().is_some_and(|b| *b != 0)))
                } else {
                    String::from_utf8(bytes).ok().map(Val::Str)
                }
            }
            _ => None,
        }
    }
}

impl TelemetryFilter {
    fn reporter(&mut self, host: &dyn Host) -> Reporter {
        match self.reporter {
            Some(r) => r,
            None => {
                let r = self.plugin.reporter(host);
                self.reporter = Some(r);
                r
            }
        }
    }

    /// Read (and strip) the peer's exchange headers from `map`.
    fn take_peer(&mut self, host: &dyn Host, map: HeaderMap) -> bool {
        let Some(value) = host.header(map, peer::HEADER) else {
            if host.header(map, peer::HEADER_ID).is_some() {
                let _ = host.set_header(map, peer::HEADER_ID, None);
            }
            return false;
        };
        let _ = host.set_header(map, peer::HEADER, None);
        let _ = host.set_header(map, peer::HEADER_ID, None);
        self.peer = self.plugin.peer(host, &value);
        true
    }

    fn send_exchange(&self, host: &dyn Host, map: HeaderMap) {
        let _ = host.set_header(map, peer::HEADER_ID, Some(&self.plugin.node_id));
        let _ = host.set_header(map, peer::HEADER, Some(&self.plugin.exchange));
    }

    /// The labels of this stream as Istio derives them: the standard values (index-aligned
    /// with `STANDARD_TAGS`) and the tag override expressions' values. `at_end`: the
    /// response's code, flags and gRPC status are final (the log phase); before it (periodic
    /// gRPC reports) they are not read, and the metrics reported then do not carry them.
    fn derive(&mut self, host: &dyn Host, reporter: Reporter, at_end: bool) -> (Vec<String>, Vec<String>) {
        let response = at_end.then(|| self.response(host));
        let plugin = self.plugin.clone();
        plugin.labels(host, reporter, &mut self.peer, self.host.as_deref(), self.grpc, response)
    }

    /// The final `(code, grpc status, flags)` of the response.
    fn response(&self, host: &dyn Host) -> (u64, Option<u64>, u64) {
        let code = match self.status {
            Some(code) => code,
            None => prop_int(host, &["response", "code"]).unwrap_or(0),
        };
        let grpc_status = if self.grpc { prop_int(host, &["response", "grpc_status"]) } else { None };
        (code, grpc_status, prop_int(host, &["response", "flags"]).unwrap_or(0))
    }

    /// The end of the stream: derive the labels and record the four HTTP metrics. Returns
    /// the standard label values (for the access log and the span), `None` if already
    /// reported.
    fn report(&mut self, host: &dyn Host) -> Option<Rc<Derived>> {
        if self.reported {
            return None;
        }
        self.reported = true;
        let reporter = self.reporter(host);
        let plugin = self.plugin.clone();
        let response = self.response(host);
        let derived = plugin.http_labels(host, reporter, &mut self.peer, self.host.as_deref(), self.grpc, response);
        let mut measured: [Option<u64>; 3] = [None; 3];
        for ((metric, kind), id) in HTTP_METRICS.iter().zip(derived.ids.ids) {
            let Some(id) = id else { continue };
            let value = match metric {
                Metric::RequestCount => 1,
                Metric::RequestDuration => *measured[0]
                    .get_or_insert_with(|| prop_int(host, &["request", "duration"]).map_or(0, |ns| ns / 1_000_000)),
                Metric::RequestSize => {
                    *measured[1].get_or_insert_with(|| prop_int(host, &["request", "total_size"]).unwrap_or(0))
                }
                _ => *measured[2].get_or_insert_with(|| prop_int(host, &["response", "total_size"]).unwrap_or(0)),
            };
            let r = match kind {
                MetricKind::Counter => host.increment_metric(id, 1),
                _ => host.record_metric(id, value),
            };
            if let Err(e) = r {
                host.log(LogLevel::Debug, &format!("meshwasm.telemetry: cannot record {}: {e}", metric.prom_name()));
            }
        }
        Some(derived)
    }

    /// gRPC message counters, as istio/proxy reports them: the counts Envoy's
    /// `envoy.filters.http.grpc_stats` filter keeps in filter state (`emit_filter_state:
    /// true`), as deltas since the last report — every `tcpReportingInterval` once the peer is
    /// known, and at the end of the stream. The labels are derived once, at the first report.
    fn report_messages(&mut self, host: &dyn Host, at_end: bool) {
        if !self.grpc || self.messages_done {
            return;
        }
        if !(self.peer_read || at_end) {
            return;
        }
        self.messages_done = at_end;
        let Some(counts) = host.property(&["filter_state", GRPC_STATS_STATE]).and_then(|b| parse_message_counts(&b))
        else {
            return;
        };
        let reporter = self.reporter(host);
        let plugin = self.plugin.clone();
        let ids = match self.message_ids {
            Some(ids) => ids,
            None => {
                let (standard, values) = self.derive(host, reporter, false);
                let id = |metric: Metric| {
                    let plan = plugin.config.plan(reporter, metric).filter(|p| p.enabled)?;
                    plugin.series(host, metric, MetricKind::Counter, plan, &standard, &values)
                };
                let ids = [id(Metric::GrpcRequestMessages), id(Metric::GrpcResponseMessages)];
                self.message_ids = Some(ids);
                ids
            }
        };
        for ((id, count), reported) in ids.iter().zip(counts).zip(self.messages_reported.iter_mut()) {
            let delta = count.saturating_sub(*reported);
            *reported = count;
            if let Some(id) = id {
                let _ = host.increment_metric(*id, i64::try_from(delta).unwrap_or(i64::MAX));
            }
        }
    }
}

/// The filter state key of Envoy's `envoy.filters.http.grpc_stats` filter.
pub const GRPC_STATS_STATE: &str = "envoy.filters.http.grpc_stats";

/// The grpc_stats filter state object as Envoy prints it: `<request count>,<response count>`.
fn parse_message_counts(b: &[u8]) -> Option<[u64; 2]> {
    let s = std::str::from_utf8(b).ok()?;
    let (req, rsp) = s.trim().split_once(',')?;
    Some([req.trim().parse().ok()?, rsp.trim().parse().ok()?])
}

/// A label set as one short map key: the reporter, then every standard and expression value,
/// each length-prefixed (so no two label sets share a key).
fn input_key(
    reporter: Reporter,
    peer: Option<&Rc<Workload>>,
    authority: Option<&str>,
    g: &Gathered,
    grpc: bool,
    (code, grpc_status, flags): (u64, Option<u64>, u64),
) -> String {
    let mut key = String::with_capacity(256);
    // Written in place: no allocation per field on the hot path. Strings are length-prefixed
    // (no two field lists share a key); the peer is its `Rc`'s address, kept alive by the
    // entry (so no other peer can take it while the entry exists).
    let _ = write!(
        key,
        "{}{}:{}:{code}:{}:{flags}:{}:",
        match reporter {
            Reporter::Server => 's',
            Reporter::Client => 'c',
        },
        peer.map_or(0, |p| Rc::as_ptr(p) as usize),
        u8::from(grpc),
        grpc_status.map_or(-1, i128::from),
        u8::from(authority.is_some()),
    );
    let strings = [authority.unwrap_or(""), &g.cluster, &g.route, &g.peer_san, &g.local_san];
    for v in strings.into_iter().chain(g.values.iter().map(String::as_str)) {
        let _ = write!(key, "{}:", v.len());
        key.push_str(v);
    }
    key
}

/// `<tag>=.=<value>;.;`: the segment the bootstrap `stats_tags` turn into a label.
fn push_tag(name: &mut String, tag: &str, value: &str) {
    name.push_str(tag);
    name.push_str("=.=");
    name.push_str(&escape(value));
    name.push_str(";.;");
}

impl HttpFilter for TelemetryFilter {
    fn on_request_headers(&mut self, host: &dyn Host, _end_of_stream: bool) -> Flow {
        let reporter = self.reporter(host);
        self.host = host.header(HeaderMap::RequestHeaders, ":authority");
        self.grpc =
            host.header(HeaderMap::RequestHeaders, "content-type").is_some_and(|c| c.starts_with("application/grpc"));
        match reporter {
            Reporter::Server => {
                self.peer_asked = self.take_peer(host, HeaderMap::RequestHeaders);
                self.peer_read = true;
            }
            Reporter::Client => self.send_exchange(host, HeaderMap::RequestHeaders),
        }
        if let Some(plan) = self.plugin.config.tracing.plans.get(reporter.index()).and_then(Option::as_ref) {
            self.trace = crate::trace::start(plan, host, &mut self.rng);
        }
        Flow::Continue
    }

    fn on_response_headers(&mut self, host: &dyn Host, _end_of_stream: bool) -> Flow {
        // `response.code` as a header read (cheaper than the property at the log phase).
        self.status = host.header(HeaderMap::ResponseHeaders, ":status").and_then(|s| s.parse().ok());
        match self.reporter(host) {
            Reporter::Client => {
                self.take_peer(host, HeaderMap::ResponseHeaders);
                self.peer_read = true;
            }
            Reporter::Server if self.peer_asked => self.send_exchange(host, HeaderMap::ResponseHeaders),
            Reporter::Server => {}
        }
        Flow::Continue
    }

    /// gRPC streams report their message counts every `tcpReportingInterval` (istio/proxy's
    /// `tcp_reporting_duration`, which it uses for both).
    fn periodic(&self) -> Option<Duration> {
        self.grpc.then_some(self.plugin.config.tcp_reporting_interval)
    }

    fn on_periodic(&mut self, host: &dyn Host) -> Option<Duration> {
        self.report_messages(host, false);
        (!self.messages_done).then_some(self.plugin.config.tcp_reporting_interval)
    }

    /// Envoy's access-log phase: the final attributes are readable (Istio records here too).
    fn on_log(&mut self, host: &dyn Host) {
        self.report_messages(host, true);
        let Some(derived) = self.report(host) else { return };
        let standard = &derived.standard;
        let plugin = self.plugin.clone();
        if !plugin.config.access_log.is_empty() {
            let reporter = self.reporter(host);
            let peer = self.peer.as_deref();
            let ctx = crate::accesslog::LogCtx { reporter, standard, local: &plugin.local, peer };
            let mut view = View { host, plugin: &plugin, peer, reporter, cluster_md: None };
            let trace = self.trace.as_ref();
            crate::accesslog::emit(host, &plugin.config.access_log, &plugin.export, &ctx, &mut view, trace);
        }
        if let Some(active) = self.trace.take() {
            let reporter = self.reporter(host);
            if let Some(plan) = plugin.config.tracing.plans.get(reporter.index()).and_then(Option::as_ref) {
                let f = crate::trace::finished(host, reporter, standard, &plugin.local, plan);
                crate::trace::finish(plan, &active, host, f, &plugin.export);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshwasm_sdk_ext::fake::FakeHost;
    use meshwasm_sdk_ext::props::encode_metadata;
    use serde_json::json;

    fn node_md(workload: &str, app: &str, cluster: &str) -> Value {
        json!({"NAME": format!("{workload}-pod"), "NAMESPACE": "default", "WORKLOAD_NAME": workload, "CLUSTER_ID": cluster,
               "LABELS": {"app": app, "version": "v1", "service.istio.io/canonical-name": app,
                          "service.istio.io/canonical-revision": "version-1"}})
    }

    fn plugin(config: Value, reporter: &str, md: Value) -> Rc<TelemetryPlugin> {
        let mut c = config;
        c["reporter"] = json!(reporter);
        Rc::new(TelemetryPlugin::new(Config::from_value(&c).unwrap(), format!("sidecar~{reporter}"), md))
    }

    fn end(host: &FakeHost, code: i64) {
        host.set_property(&["response", "code"], &code.to_le_bytes());
        host.set_property(&["response", "flags"], &0i64.to_le_bytes());
        host.set_property(&["request", "duration"], &7_500_000i64.to_le_bytes());
        host.set_property(&["request", "total_size"], &100i64.to_le_bytes());
        host.set_property(&["response", "total_size"], &200i64.to_le_bytes());
        host.set_property(&["xds", "cluster_name"], b"outbound");
        host.set_property(&["xds", "route_name"], b"r");
    }

    fn series(host: &FakeHost, prefix: &str) -> Vec<(String, i64)> {
        host.metrics
            .borrow()
            .iter()
            .filter(|(_, n, _)| n.starts_with(prefix))
            .map(|(_, n, v)| (n.clone(), *v))
            .collect()
    }

    #[test]
    fn exchange_between_client_and_server_and_labels() {
        let client = plugin(json!({}), "CLIENT", node_md("productpage-v1", "productpage", "c1"));
        let server = plugin(json!({}), "SERVER", node_md("ratings-v1", "ratings", "c2"));

        // Client request: the exchange headers go out.
        let ch = FakeHost::with_request(&[(":authority", "ratings:9080"), ("x-envoy-peer-metadata", "spoofed")]);
        let mut cf = client.new_filter(2, 0);
        cf.on_request_headers(&ch, true);
        let sent = ch.header(HeaderMap::RequestHeaders, peer::HEADER).unwrap();
        assert_eq!(sent, client.exchange, "the client replaces what the app sent");
        assert_eq!(ch.header(HeaderMap::RequestHeaders, peer::HEADER_ID).unwrap(), "sidecar~CLIENT");

        // Server: reads and strips, answers.
        let sh = FakeHost::with_request(&[
            (":authority", "ratings:9080"),
            (peer::HEADER, &sent),
            (peer::HEADER_ID, "sidecar~CLIENT"),
        ]);
        let mut sf = server.new_filter(2, 0);
        sf.on_request_headers(&sh, true);
        assert!(sh.header(HeaderMap::RequestHeaders, peer::HEADER).is_none(), "stripped before the app");
        assert!(sh.header(HeaderMap::RequestHeaders, peer::HEADER_ID).is_none());
        sf.on_response_headers(&sh, false);
        let answer = sh.header(HeaderMap::ResponseHeaders, peer::HEADER).unwrap();
        end(&sh, 200);
        sf.on_log(&sh);
        sf.on_log(&sh);
        let s = series(&sh, "istio_requests_total");
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!(s[0].1, 1, "reported once");
        assert!(
            s[0].0.starts_with("istio_requests_total")
                && s[0].0.contains("reporter=.=destination;.;source_workload=.=productpage-v1;.;"),
            "{}",
            s[0].0
        );
        assert!(s[0].0.contains("destination_service=.=ratings:9080;.;"));
        assert!(s[0].0.contains("connection_security_policy=.=none;.;"));
        assert!(s[0].0.ends_with("response_code=.=200;.;grpc_response_status=.=;.;"));
        let d = series(&sh, "istio_request_duration_milliseconds");
        assert_eq!(d[0].1, 7, "ns → ms");
        assert_eq!(series(&sh, "istio_request_bytes")[0].1, 100);
        assert_eq!(series(&sh, "istio_response_bytes")[0].1, 200);

        // Client: reads and strips the answer.
        *ch.response_headers.borrow_mut() =
            vec![(peer::HEADER.into(), answer.clone()), (peer::HEADER_ID.into(), "x".into())];
        cf.on_response_headers(&ch, false);
        assert!(ch.response_headers.borrow().is_empty(), "stripped before the app");
        end(&ch, 503);
        cf.on_log(&ch);
        let c = series(&ch, "istio_requests_total");
        assert!(c[0].0.contains("reporter=.=source;.;source_workload=.=productpage-v1;.;"), "{}", c[0].0);
        assert!(c[0].0.contains("destination_workload=.=ratings-v1;.;"));
        assert!(c[0].0.contains("destination_cluster=.=c2;.;"));
        assert!(c[0].0.contains("response_code=.=503;.;"));
        assert!(c[0].0.contains("connection_security_policy=.=unknown;.;"));
        assert_eq!(client.peers.borrow().len(), 1, "decoded peer cached");
        // A second request with the same peer reuses the cached decode.
        let ch2 = FakeHost::new();
        let mut cf2 = client.new_filter(3, 0);
        cf2.on_request_headers(&ch2, true);
        *ch2.response_headers.borrow_mut() = vec![(peer::HEADER.into(), answer)];
        cf2.on_response_headers(&ch2, false);
        assert!(Rc::ptr_eq(cf2.peer.as_ref().unwrap(), cf.peer.as_ref().unwrap()));
    }

    #[test]
    fn server_does_not_answer_without_peer_metadata_and_garbage_is_ignored() {
        let server = plugin(json!({}), "SERVER", node_md("ratings-v1", "ratings", "c2"));
        let h = FakeHost::with_request(&[(peer::HEADER, "%%%not base64")]);
        let mut f = server.new_filter(2, 0);
        f.on_request_headers(&h, true);
        assert!(f.peer.is_none());
        assert!(h.header(HeaderMap::RequestHeaders, peer::HEADER).is_none(), "still stripped");
        let h2 = FakeHost::new();
        let mut f2 = server.new_filter(3, 0);
        f2.on_request_headers(&h2, true);
        f2.on_response_headers(&h2, false);
        assert!(h2.header(HeaderMap::ResponseHeaders, peer::HEADER).is_none());
        end(&h2, 200);
        f2.on_log(&h2);
        let s = series(&h2, "istio_requests_total");
        assert!(s[0].0.contains("source_workload=.=unknown;.;source_canonical_service=.=unknown;.;source_canonical_revision=.=latest;.;"), "{}", s[0].0);
    }

    #[test]
    fn tls_principals_and_status_header() {
        let server = plugin(json!({}), "SERVER", node_md("ratings-v1", "ratings", "c2"));
        let h = FakeHost::new();
        end(&h, 500);
        h.set_property(&["connection", "tls_version"], b"TLSv1.3");
        h.set_property(&["connection", "uri_san_peer_certificate"], b"spiffe://cluster.local/ns/foo/sa/client");
        h.set_property(&["connection", "uri_san_local_certificate"], b"spiffe://cluster.local/ns/default/sa/ratings");
        *h.response_headers.borrow_mut() = vec![(":status".into(), "201".into())];
        let mut f = server.new_filter(2, 0);
        f.on_request_headers(&h, true);
        f.on_response_headers(&h, false);
        f.on_log(&h);
        let s = &series(&h, "istio_requests_total")[0].0;
        for want in [
            "source_workload_namespace=.=foo;",
            "source_principal=.=spiffe://cluster.local/ns/foo/sa/client;",
            "destination_principal=.=spiffe://cluster.local/ns/default/sa/ratings;",
            "connection_security_policy=.=mutual_tls;",
            "response_code=.=201;",
        ] {
            assert!(s.contains(want), "{want} in {s}");
        }
        // Without TLS the SANs are not read (and not used).
        let h = FakeHost::new();
        end(&h, 200);
        h.set_property(&["connection", "uri_san_peer_certificate"], b"spiffe://x/ns/foo/sa/y");
        let mut f = server.new_filter(3, 0);
        f.on_request_headers(&h, true);
        f.on_log(&h);
        assert!(series(&h, "istio_requests_total")[0].0.contains("source_principal=.=unknown;"));
    }

    #[test]
    fn endpoint_metadata_and_cluster_metadata_on_the_client() {
        let client = plugin(json!({}), "CLIENT", node_md("productpage-v1", "productpage", "c1"));
        let h = FakeHost::with_request(&[(":authority", "127.0.0.1:1")]);
        h.set_property(
            &["xds", "upstream_host_metadata"],
            &encode_metadata("istio", &json!({"workload": "ratings-v1;default;ratings;version-1;server-cluster"})),
        );
        h.set_property(&["xds", "cluster_metadata"], &encode_metadata("istio", &json!({"services": [{"host": "server.default.svc.cluster.local", "name": "server", "namespace": "default"}]})));
        let mut f = client.new_filter(2, 0);
        f.on_request_headers(&h, true);
        end(&h, 200);
        f.on_log(&h);
        let s = &series(&h, "istio_requests_total")[0].0;
        for want in [
            "destination_workload=.=ratings-v1;",
            "destination_app=.=unknown;",
            "destination_canonical_service=.=ratings;",
            "destination_service=.=server.default.svc.cluster.local;",
            "destination_service_name=.=server;",
            "destination_cluster=.=server-cluster;",
        ] {
            assert!(s.contains(want), "{want} in {s}");
        }
    }

    #[test]
    fn grpc_message_counters_report_deltas_once_the_peer_is_known_and_at_the_end() {
        let cfg = json!({"tcpReportingInterval": "1s", "metrics": [{"overrides": [
            {"tagOverrides": {"configurable_metric_a": {"value": "xds.node.metadata.LABELS.version"},
                              "response_code": {"value": "'x'"}}}]}]});
        let client = plugin(cfg, "CLIENT", node_md("productpage-v1", "productpage", "c1"));
        let h = FakeHost::with_request(&[(":authority", "server:80"), ("content-type", "application/grpc")]);
        let mut f = client.new_filter(2, 0);
        f.on_request_headers(&h, false);
        assert_eq!(f.periodic(), Some(Duration::from_secs(1)));
        // Before the response headers the peer is not known: nothing yet.
        h.set_property(&["filter_state", GRPC_STATS_STATE], b"1,0");
        assert_eq!(f.on_periodic(&h), Some(Duration::from_secs(1)));
        assert!(series(&h, "istio_request_messages_total").is_empty());
        *h.response_headers.borrow_mut() = vec![(":status".into(), "200".into())];
        f.on_response_headers(&h, false);
        h.set_property(&["filter_state", GRPC_STATS_STATE], b"3,13");
        f.on_periodic(&h);
        let req = series(&h, "istio_request_messages_total");
        assert_eq!(req.len(), 1);
        assert_eq!(req[0].1, 3);
        assert!(req[0].0.ends_with("destination_cluster=.=unknown;.;configurable_metric_a=.=v1;.;"), "{}", req[0].0);
        assert!(!req[0].0.contains("response_code"), "not a label of the message counters");
        assert_eq!(series(&h, "istio_response_messages_total")[0].1, 13);
        // Unchanged counts add nothing; the end adds the rest, once.
        f.on_periodic(&h);
        h.set_property(&["filter_state", GRPC_STATS_STATE], b"8,27");
        end(&h, 200);
        f.on_log(&h);
        f.on_log(&h);
        assert_eq!(series(&h, "istio_request_messages_total")[0].1, 8);
        assert_eq!(series(&h, "istio_response_messages_total")[0].1, 27);
        assert_eq!(f.on_periodic(&h), None, "no reports after the end");
        let total = &series(&h, "istio_requests_total")[0].0;
        assert!(total.contains("request_protocol=.=grpc;") && total.contains("response_code=.=x;"), "{total}");

        // Plain HTTP has no periodic work; undecodable counts are ignored.
        let h = FakeHost::with_request(&[(":authority", "server:80")]);
        let mut f = client.new_filter(3, 0);
        f.on_request_headers(&h, true);
        assert_eq!(f.periodic(), None);
        assert_eq!(parse_message_counts(b"7"), None);
        assert_eq!(parse_message_counts(b"x,1"), None);
        assert_eq!(parse_message_counts(b"2,5"), Some([2, 5]));
    }

    #[test]
    fn block_all_is_named_by_the_route_only_without_a_cluster() {
        let client = plugin(json!({}), "CLIENT", node_md("productpage-v1", "productpage", "c1"));
        let run = |cluster: Option<&[u8]>| {
            let h = FakeHost::with_request(&[(":authority", "ratings:9080")]);
            end(&h, 502);
            h.set_property(&["xds", "route_name"], b"block_all");
            match cluster {
                Some(c) => h.set_property(&["xds", "cluster_name"], c),
                None => {
                    h.properties.borrow_mut().remove("xds.cluster_name");
                }
            }
            let mut f = client.new_filter(2, 0);
            f.on_request_headers(&h, true);
            f.on_log(&h);
            series(&h, "istio_requests_total").remove(0).0
        };
        assert!(run(None).contains("destination_service_name=.=BlackHoleCluster;"), "{}", run(None));
        assert!(run(Some(b"PassthroughCluster")).contains("destination_service_name=.=PassthroughCluster;"));
        // A route of that name with a real cluster: the cluster decides (host fallback here).
        assert!(run(Some(b"outbound|9080||ratings")).contains("destination_service_name=.=ratings:9080;"));
    }

    #[test]
    fn labels_are_remembered_by_every_input_they_derive_from() {
        let client = plugin(json!({}), "CLIENT", node_md("productpage-v1", "productpage", "c1"));
        let h = FakeHost::new();
        let run = |authority: &str, code: i64, tls: bool| {
            end(&h, code);
            *h.request_headers.borrow_mut() = vec![(":authority".into(), authority.into())];
            if tls {
                h.set_property(&["upstream", "tls_version"], b"TLSv1.3");
                h.set_property(&["upstream", "uri_san_peer_certificate"], b"spiffe://cluster.local/ns/x/sa/y");
            } else {
                h.properties.borrow_mut().remove("upstream.tls_version");
            }
            let mut f = client.new_filter(2, 0);
            f.on_request_headers(&h, true);
            f.on_log(&h);
        };
        for (authority, code, tls) in [("a", 200, false), ("a", 200, false), ("a", 503, false), ("b", 200, false)] {
            run(authority, code, tls);
        }
        run("a", 200, true);
        run("a", 200, false);
        assert_eq!(client.derived.borrow().len(), 4, "a/200, a/503, b/200, a/200 over mTLS");
        let names = series(&h, "istio_requests_total");
        let count = |needles: &[&str]| -> i64 {
            names.iter().filter(|(n, _)| needles.iter().all(|x| n.contains(x))).map(|(_, v)| *v).sum()
        };
        assert_eq!(count(&["destination_service=.=a;", "response_code=.=200;", "destination_principal=.=unknown;"]), 3);
        assert_eq!(count(&["destination_service=.=a;", "response_code=.=503;"]), 1);
        assert_eq!(count(&["destination_service=.=b;", "response_code=.=200;"]), 1);
        assert_eq!(
            count(&["destination_service=.=a;", "destination_principal=.=spiffe://cluster.local/ns/x/sa/y;"]),
            1
        );
        assert_eq!(names.len(), 4, "{names:?}");
    }

    #[test]
    fn overrides_and_max_series() {
        let cfg = json!({"maxSeries": 2, "metrics": [{"overrides": [
            {"match": {"metric": "REQUEST_COUNT"}, "tagOverrides": {
                "request_protocol": {"value": "request.protocol"},
                "source_app": {"value": "'_' + xds.node.metadata['LABELS'].app"},
                "route_name": {"value": "xds.route_name + ',' + xds.cluster_name + ',' + xds.cluster_metadata.filter_metadata.istio.services[0].name"},
                "destination_workload": {"value": "cannot_evaluate"},
                "grpc_response_status": {"operation": "REMOVE"}}},
            {"match": {"metric": "REQUEST_DURATION"}, "disabled": true}]}]});
        let client = plugin(cfg, "CLIENT", node_md("productpage-v1", "productpage", "c1"));
        let h = FakeHost::new();
        h.set_property(&["request", "protocol"], b"HTTP/1.1");
        h.set_property(
            &["xds", "cluster_metadata"],
            &encode_metadata("istio", &json!({"services": [{"name": "server"}]})),
        );
        end(&h, 200);
        let run = |authority: &str| {
            *h.request_headers.borrow_mut() = vec![(":authority".into(), authority.into())];
            let mut f = client.new_filter(2, 0);
            f.on_request_headers(&h, true);
            f.on_log(&h);
        };
        run("a");
        let s = &series(&h, "istio_requests_total")[0].0;
        assert!(s.contains("request_protocol=.=HTTP/1.1;"));
        assert!(s.contains("source_app=.=_productpage;"));
        assert!(s.contains("destination_workload=.=unknown;"));
        assert!(s.ends_with("route_name=.=r,outbound,server;.;"), "{s}");
        assert!(!s.contains("grpc_response_status"));
        assert!(series(&h, "istio_request_duration_milliseconds").is_empty(), "disabled");
        assert!(!series(&h, "istio_request_bytes").is_empty());
        // Host fallback makes each authority a new series: 2 fit, the rest overflow.
        // The second "d" takes the label-set cache: it must still fold and be counted.
        for a in ["b", "c", "d", "b", "d"] {
            run(a);
        }
        let names = series(&h, "istio_requests_total");
        assert_eq!(names.len(), 3, "{names:?}");
        assert_eq!(names[1].1, 2, "b counted twice");
        assert!(names[2].0.contains("destination_service=.=overflow;"), "{names:?}");
        assert!(names[2].0.contains("reporter=.=source;"));
        assert_eq!(names[2].1, 3, "c and d (twice) folded");
        assert_eq!(h.metric_value(OVERFLOW_STAT), 9, "3 records of each of 3 metrics folded");
        assert!(client.series.borrow().counts.iter().all(|c| *c <= 2));
    }
}
