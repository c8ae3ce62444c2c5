//! The telemetry filter as a network filter (`envoy.filters.network.wasm`, before
//! `tcp_proxy`): Istio's TCP metrics `istio_tcp_connections_opened_total`,
//! `istio_tcp_connections_closed_total`, `istio_tcp_sent_bytes_total` and
//! `istio_tcp_received_bytes_total` with Istio's 23 labels (`request_protocol="tcp"`),
//! reported as istio/proxy reports them: once the peer is known, every
//! `tcpReportingInterval` (byte deltas), and at the close.
//!
//! Bytes are the application's: what the downstream sent (`received`) and what was sent to
//! it (`sent`), without the exchange frames.
//!
//! Peer metadata: with `tcpMetadataExchange` the client prepends its frame (istio/proxy's
//! in-band format, `peer::encode_tcp_frame`) to the first bytes it forwards, the server
//! strips it and answers with its own frame before the first bytes of the reply, which the
//! client strips. Without it, the client falls back to the upstream endpoint's
//! `istio.workload` metadata, and the server knows only the peer's certificate.

use std::rc::Rc;
use std::time::Duration;

use meshwasm_sdk_ext::{Flow, Host, LogLevel, MetricKind, NetworkFilter, NetworkPlugin};

use crate::config::{Metric, Reporter};
use crate::filter::{prop_int, TelemetryPlugin};
use crate::peer::{self, TcpFrame, Workload};

const TCP_METRICS: [Metric; 4] = [Metric::TcpOpened, Metric::TcpClosed, Metric::TcpSent, Metric::TcpReceived];
/// Index of `request_protocol` in `STANDARD_TAGS`.
const PROTOCOL: usize = 20;

impl NetworkPlugin for TelemetryPlugin {
    fn new_connection(self: &Rc<Self>, _context_id: u32) -> Box<dyn NetworkFilter> {
        Box::new(TelemetryConnection::new(self.clone()))
    }
}

pub struct TelemetryConnection {
    plugin: Rc<TelemetryPlugin>,
    reporter: Option<Reporter>,
    peer: Option<Rc<Workload>>,
    /// The exchange is over (or there is none): reports may start.
    peer_read: bool,
    downstream_started: bool,
    upstream_started: bool,
    /// Server: the client sent its frame, so ours goes back before the reply.
    answer: bool,
    /// Application bytes sent to and received from the downstream.
    sent: u64,
    received: u64,
    /// `[sent, received]` already reported.
    reported: [u64; 2],
    /// The four metrics' series, once derived (`TCP_METRICS` order).
    ids: Option<[Option<u32>; 4]>,
    closed: bool,
}

impl TelemetryConnection {
    pub fn new(plugin: Rc<TelemetryPlugin>) -> Self {
        Self {
            plugin,
            reporter: None,
            peer: None,
            peer_read: false,
            downstream_started: false,
            upstream_started: false,
            answer: false,
            sent: 0,
            received: 0,
            reported: [0; 2],
            ids: None,
            closed: false,
        }
    }

    fn reporter(&mut self, host: &dyn Host) -> Reporter {
        *self.reporter.get_or_insert_with(|| self.plugin.reporter(host))
    }

    fn exchange(&self) -> bool {
        self.plugin.config().tcp_metadata_exchange
    }

    /// Look for the peer's frame at the start of `upstream` (or downstream) data and strip
    /// it. `Some(Flow::Pause)`: a frame has begun, wait for the rest. Otherwise `None`, and
    /// the number of bytes stripped.
    fn take_frame(&mut self, host: &dyn Host, upstream: bool, size: usize, end: bool) -> Result<usize, Flow> {
        let data = host.network_data(upstream, size);
        match peer::decode_tcp_frame(&data) {
            TcpFrame::Partial if !end => Err(Flow::Pause),
            TcpFrame::Whole(n, workload) => {
                let rest = data.get(n..).unwrap_or_default();
                if let Err(e) = host.set_network_data(upstream, false, rest) {
                    host.log(LogLevel::Warn, &format!("meshwasm.telemetry: cannot strip the peer's frame: {e}"));
                }
                self.peer = workload.map(|w| Rc::new(*w));
                Ok(n)
            }
            _ => Ok(0),
        }
    }

    /// istio/proxy's report: the connection opens (in the metrics) once the peer is known
    /// or at the close; bytes go out as deltas; the close is counted once.
    fn report(&mut self, host: &dyn Host, end: bool) {
        if self.closed {
            return;
        }
        let reporter = self.reporter(host);
        let plugin = self.plugin.clone();
        if self.ids.is_none() && (self.peer_read || end) {
            let flags = prop_int(host, &["response", "flags"]).unwrap_or(0);
            let (mut standard, values) =
                plugin.labels(host, reporter, &mut self.peer, None, false, Some((0, None, flags)));
            if let Some(p) = standard.get_mut(PROTOCOL) {
                *p = "tcp".into();
            }
            let ids = TCP_METRICS.map(|metric| {
                let plan = plugin.config().plan(reporter, metric).filter(|p| p.enabled)?;
                plugin.series(host, metric, MetricKind::Counter, plan, &standard, &values)
            });
            if let Some(id) = ids[0] {
                let _ = host.increment_metric(id, 1);
            }
            self.ids = Some(ids);
        }
        let Some(ids) = self.ids else { return };
        for ((id, now), reported) in
            [ids[2], ids[3]].iter().zip([self.sent, self.received]).zip(self.reported.iter_mut())
        {
            let delta = now.saturating_sub(*reported);
            *reported = now;
            if let Some(id) = id {
                let _ = host.increment_metric(*id, i64::try_from(delta).unwrap_or(i64::MAX));
            }
        }
        if end {
            self.closed = true;
            if let Some(id) = ids[1] {
                let _ = host.increment_metric(id, 1);
            }
        }
    }
}

impl NetworkFilter for TelemetryConnection {
    fn on_downstream_data(&mut self, host: &dyn Host, size: usize, end_of_stream: bool) -> Flow {
        let mut payload = size;
        if !self.downstream_started {
            match self.reporter(host) {
                Reporter::Client => {
                    if self.exchange() && !self.plugin.tcp_frame.is_empty() {
                        if let Err(e) = host.set_network_data(false, true, &self.plugin.tcp_frame) {
                            host.log(LogLevel::Warn, &format!("meshwasm.telemetry: cannot send the peer frame: {e}"));
                        }
                    } else {
                        // Nothing to wait for: the endpoint's metadata is all there is.
                        self.peer_read = true;
                    }
                }
                Reporter::Server => {
                    if self.exchange() {
                        match self.take_frame(host, false, size, end_of_stream) {
                            Err(flow) => return flow,
                            Ok(n) => {
                                self.answer = n > 0;
                                payload = size.saturating_sub(n);
                            }
                        }
                    }
                    self.peer_read = true;
                }
            }
            self.downstream_started = true;
        }
        self.received += payload as u64;
        Flow::Continue
    }

    fn on_upstream_data(&mut self, host: &dyn Host, size: usize, end_of_stream: bool) -> Flow {
        let mut payload = size;
        if !self.upstream_started {
            match self.reporter(host) {
                Reporter::Client if self.exchange() => match self.take_frame(host, true, size, end_of_stream) {
                    Err(flow) => return flow,
                    Ok(n) => payload = size.saturating_sub(n),
                },
                Reporter::Server if self.answer => {
                    if let Err(e) = host.set_network_data(true, true, &self.plugin.tcp_frame) {
                        host.log(LogLevel::Warn, &format!("meshwasm.telemetry: cannot answer the peer frame: {e}"));
                    }
                }
                _ => {}
            }
            self.upstream_started = true;
            self.peer_read = true;
        }
        self.sent += payload as u64;
        Flow::Continue
    }

    fn on_close(&mut self, host: &dyn Host) {
        self.report(host, true);
    }

    fn periodic(&self) -> Option<Duration> {
        Some(self.plugin.config().tcp_reporting_interval)
    }

    fn on_periodic(&mut self, host: &dyn Host) -> Option<Duration> {
        self.report(host, false);
        (!self.closed).then_some(self.plugin.config().tcp_reporting_interval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use meshwasm_sdk_ext::fake::FakeHost;
    use serde_json::json;

    fn plugin(reporter: &str, workload: &str) -> Rc<TelemetryPlugin> {
        let config = Config::from_value(&json!({"reporter": reporter, "tcpMetadataExchange": true})).unwrap();
        let md = json!({"WORKLOAD_NAME": workload, "NAMESPACE": "default", "LABELS": {"app": workload}});
        Rc::new(TelemetryPlugin::new(config, format!("{workload}~"), md))
    }

    fn total(h: &FakeHost, metric: &str) -> i64 {
        h.metrics.borrow().iter().filter(|(_, n, _)| n.starts_with(metric)).map(|(_, _, v)| *v).sum()
    }

    fn counts(h: &FakeHost) -> [i64; 4] {
        TCP_METRICS.map(|m| total(h, m.prom_name()))
    }

    #[test]
    fn frames_go_in_band_and_only_the_applications_bytes_count() {
        let (ch, sh) = (FakeHost::new(), FakeHost::new());
        let mut c = TelemetryConnection::new(plugin("CLIENT", "productpage"));
        let mut s = TelemetryConnection::new(plugin("SERVER", "ratings"));
        // The client's first bytes carry its frame.
        *ch.downstream_data.borrow_mut() = b"world\n".to_vec();
        assert_eq!(c.on_downstream_data(&ch, 6, false), Flow::Continue);
        let wire = ch.downstream_data.borrow().clone();
        assert!(wire.len() > 6 && wire.ends_with(b"world\n"));
        // The server waits for the whole frame, strips it, and knows its peer.
        *sh.downstream_data.borrow_mut() = wire[..5].to_vec();
        assert_eq!(s.on_downstream_data(&sh, 5, false), Flow::Pause);
        *sh.downstream_data.borrow_mut() = wire.clone();
        assert_eq!(s.on_downstream_data(&sh, wire.len(), false), Flow::Continue);
        assert_eq!(&*sh.downstream_data.borrow(), b"world\n");
        assert_eq!(s.peer.as_ref().unwrap().workload, "productpage");
        // It answers with its own frame before the reply, which the client strips.
        *sh.upstream_data.borrow_mut() = b"hello world\n".to_vec();
        s.on_upstream_data(&sh, 12, false);
        let back = sh.upstream_data.borrow().clone();
        assert!(back.len() > 12);
        *ch.upstream_data.borrow_mut() = back.clone();
        c.on_upstream_data(&ch, back.len(), false);
        assert_eq!(&*ch.upstream_data.borrow(), b"hello world\n");
        assert_eq!(c.peer.as_ref().unwrap().workload, "ratings");
        // Periodic: open and the bytes so far; the close once.
        assert_eq!(c.on_periodic(&ch), Some(Duration::from_secs(5)));
        assert_eq!(counts(&ch), [1, 0, 12, 6]);
        *ch.downstream_data.borrow_mut() = b"more\n".to_vec();
        c.on_downstream_data(&ch, 5, false);
        c.on_close(&ch);
        c.on_close(&ch);
        assert_eq!(counts(&ch), [1, 1, 12, 11]);
        assert_eq!(c.on_periodic(&ch), None);
        s.on_close(&sh);
        assert_eq!(counts(&sh), [1, 1, 12, 6]);
        let name = ch.metrics.borrow().iter().find(|(_, n, _)| n.starts_with("istio_tcp_sent")).unwrap().1.clone();
        assert!(name.contains("destination_workload=.=ratings;") && name.contains("request_protocol=.=tcp;"), "{name}");
        assert!(!name.contains("response_code"), "23 labels: {name}");
    }

    #[test]
    fn past_max_series_a_connection_folds_once_per_metric() {
        let config = Config::from_value(&json!({"reporter": "CLIENT", "maxSeries": 1})).unwrap();
        let p = Rc::new(TelemetryPlugin::new(config, "c~".into(), json!({"WORKLOAD_NAME": "c"})));
        let h = FakeHost::new();
        for cluster in ["a", "b", "c"] {
            // A new destination per connection: a new label set.
            h.set_property(&["xds", "cluster_name"], cluster.as_bytes());
            h.set_property(
                &["xds", "cluster_metadata"],
                &meshwasm_sdk_ext::props::encode_metadata("istio", &json!({"services": [{"host": cluster}]})),
            );
            let mut c = TelemetryConnection::new(p.clone());
            *h.downstream_data.borrow_mut() = b"x".to_vec();
            c.on_downstream_data(&h, 1, false);
            c.on_periodic(&h);
            c.on_periodic(&h);
            c.on_close(&h);
        }
        let opened: Vec<(String, i64)> = h
            .metrics
            .borrow()
            .iter()
            .filter(|(_, n, _)| n.starts_with("istio_tcp_connections_opened_total"))
            .map(|(_, n, v)| (n.clone(), *v))
            .collect();
        assert_eq!(opened.len(), 2, "the cap and the overflow series: {opened:?}");
        assert!(opened[1].0.contains("destination_service=.=overflow;") && opened[1].1 == 2, "{opened:?}");
        assert_eq!(h.metric_value(crate::filter::OVERFLOW_STAT), 8, "2 connections × 4 metrics, not per report");
    }

    #[test]
    fn foreign_first_bytes_pass_through_untouched() {
        let h = FakeHost::new();
        let mut s = TelemetryConnection::new(plugin("SERVER", "ratings"));
        *h.downstream_data.borrow_mut() = b"GET / HTTP/1.1\r\n".to_vec();
        assert_eq!(s.on_downstream_data(&h, 16, false), Flow::Continue);
        assert_eq!(&*h.downstream_data.borrow(), b"GET / HTTP/1.1\r\n");
        *h.upstream_data.borrow_mut() = b"HTTP/1.1 200".to_vec();
        s.on_upstream_data(&h, 12, false);
        assert_eq!(&*h.upstream_data.borrow(), b"HTTP/1.1 200", "no answer to a client that sent no frame");
        assert!(s.peer.is_none());
    }
}
