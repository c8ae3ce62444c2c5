//! The hostcall floor of a filter, for the benchmark: a module that makes exactly the
//! hostcalls its configuration lists, in the phases it lists them, and does nothing else.
//!
//! A filter's per-request cost is its hostcalls (each one that returns data re-enters the VM
//! to allocate, see docs/sdk-ext.md#what-a-hostcall-costs) plus its own work. Configured with
//! the hostcalls a meshwasm filter makes on the benchmark's request, this module measures the
//! first part alone: no filter making those calls can cost less on Envoy's Proxy-Wasm ABI,
//! whatever its code. `cargo xtask bench` shows it beside each filter with a target.
//!
//! ```json
//! {"request": ["headers", "header :authority", "set x-a 1", "add x-b 2", "remove authorization", "counter", "time", "clock"],
//!  "response": ["header :status"],
//!  "log": ["property response.flags", "histogram"]}
//! ```
//! Every phase's callback is exported (request headers, response headers, log), as in the
//! filters measured against it: Envoy crosses into the VM for each of them.

use std::rc::Rc;

use meshwasm_sdk_ext::{ConfigError, Flow, HeaderMap, Host, HttpFilter, LogLevel, MetricKind, Path, Plugin};
use serde::Deserialize;

/// Most segments of a `property` path.
const MAX_SEGMENTS: usize = 8;

/// One hostcall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// The phase's whole header map, read into the header view.
    Headers,
    /// One header of the phase's map.
    Header(String),
    /// Replace (or add) a header of the phase's map.
    Set(String, String),
    /// Add a header to the phase's map.
    Add(String, String),
    /// Remove a header of the phase's map.
    Remove(String),
    /// One property (`a.b.c`).
    Property(Vec<String>),
    /// Increment a counter.
    Counter,
    /// Record a histogram value.
    Histogram,
    /// Read the wall clock.
    Time,
    /// Read the monotonic clock (WASI `clock_time_get`).
    Clock,
}

impl Op {
    fn parse(s: &str, path: &Path) -> Result<Op, ConfigError> {
        let mut words = s.split_whitespace();
        let verb = words.next().unwrap_or_default();
        let mut arg = || words.next().map(str::to_string).ok_or_else(|| path.err(format!("`{verb}` needs a name")));
        Ok(match verb {
            "headers" => Op::Headers,
            "header" => Op::Header(arg()?),
            "set" => {
                let name = arg()?;
                Op::Set(name, arg()?)
            }
            "add" => {
                let name = arg()?;
                Op::Add(name, arg()?)
            }
            "remove" => Op::Remove(arg()?),
            "property" => {
                let segments: Vec<String> = arg()?.split('.').map(str::to_string).collect();
                if segments.len() > MAX_SEGMENTS {
                    return Err(path.err(format!("a property path has at most {MAX_SEGMENTS} segments")));
                }
                Op::Property(segments)
            }
            "counter" => Op::Counter,
            "histogram" => Op::Histogram,
            "time" => Op::Time,
            "clock" => Op::Clock,
            other => return Err(path.err(format!("unknown hostcall `{other}`"))),
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    request: Vec<String>,
    #[serde(default)]
    response: Vec<String>,
    #[serde(default)]
    log: Vec<String>,
}

pub struct Floor {
    request: Vec<Op>,
    response: Vec<Op>,
    log: Vec<Op>,
    counter: u32,
    histogram: u32,
}

impl Floor {
    /// The hostcalls of each phase: request, response, log.
    pub fn phases(&self) -> [&[Op]; 3] {
        [&self.request, &self.response, &self.log]
    }
}

fn ops(list: &[String], path: &Path) -> Result<Vec<Op>, ConfigError> {
    list.iter().enumerate().map(|(i, s)| Op::parse(s, &path.index(i))).collect()
}

impl Plugin for Floor {
    const NAME: &'static str = "floor";
    type Filter = FloorFilter;

    fn configure(config: &[u8], host: &dyn Host) -> Result<Self, ConfigError> {
        let raw: Raw = meshwasm_sdk_ext::config::from_json(config)?;
        let root = Path::root();
        let define = |kind, name| host.define_metric(kind, name).map_err(|e| root.err(format!("metric: {e}")));
        Ok(Floor {
            request: ops(&raw.request, &root.field("request"))?,
            response: ops(&raw.response, &root.field("response"))?,
            log: ops(&raw.log, &root.field("log"))?,
            counter: define(MetricKind::Counter, "meshwasm.floor.counter")?,
            histogram: define(MetricKind::Histogram, "meshwasm.floor.histogram")?,
        })
    }

    fn new_filter(self: &Rc<Self>, _context_id: u32, _seed: u64) -> FloorFilter {
        FloorFilter { plugin: Rc::clone(self) }
    }
}

pub struct FloorFilter {
    plugin: Rc<Floor>,
}

/// Make the hostcalls of one phase. Whatever they return is summed into a length that is
/// logged only in the impossible case it equals `usize::MAX`, so no read is optimised away.
fn run(host: &dyn Host, plugin: &Floor, ops: &[Op], map: HeaderMap) {
    let mut seen = 0usize;
    for op in ops {
        seen = seen.wrapping_add(match op {
            Op::Headers => host.header_block(map).iter().count(),
            Op::Header(name) => host.header(map, name).map_or(0, |v| v.len()),
            Op::Set(name, value) => usize::from(host.set_header(map, name, Some(value)).is_ok()),
            Op::Add(name, value) => usize::from(host.add_header(map, name, value).is_ok()),
            Op::Remove(name) => usize::from(host.set_header(map, name, None).is_ok()),
            Op::Property(path) => {
                // The path's segments as `&str` without allocating: the floor does no work of
                // its own beyond the hostcall (paths longer than `MAX_SEGMENTS` are refused).
                let mut segments = [""; MAX_SEGMENTS];
                for (slot, s) in segments.iter_mut().zip(path) {
                    *slot = s;
                }
                host.property(segments.get(..path.len()).unwrap_or_default()).map_or(0, |v| v.len())
            }
            Op::Counter => usize::from(host.increment_metric(plugin.counter, 1).is_ok()),
            Op::Histogram => usize::from(host.record_metric(plugin.histogram, 1).is_ok()),
            Op::Time => usize::from(host.now() > std::time::UNIX_EPOCH),
            Op::Clock => usize::from(host.monotonic_ns() > 0),
        });
    }
    if seen == usize::MAX {
        host.log(LogLevel::Debug, "meshwasm.floor: improbable length");
    }
}

impl HttpFilter for FloorFilter {
    fn on_request_headers(&mut self, host: &dyn Host, _end_of_stream: bool) -> Flow {
        run(host, &self.plugin, &self.plugin.request, HeaderMap::RequestHeaders);
        Flow::Continue
    }

    fn on_response_headers(&mut self, host: &dyn Host, _end_of_stream: bool) -> Flow {
        run(host, &self.plugin, &self.plugin.response, HeaderMap::ResponseHeaders);
        Flow::Continue
    }

    fn on_log(&mut self, host: &dyn Host) {
        run(host, &self.plugin, &self.plugin.log, HeaderMap::ResponseHeaders);
    }
}

#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)] // the ABI exports are #[no_mangle]
mod entry {
    meshwasm_sdk_ext::export_http_filter!(crate::Floor, request, response_headers);
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshwasm_sdk_ext::fake::FakeHost;

    fn plugin(host: &FakeHost, json: &str) -> Result<Rc<Floor>, ConfigError> {
        Floor::configure(json.as_bytes(), host).map(Rc::new)
    }

    #[test]
    fn makes_the_listed_hostcalls_in_their_phases() {
        let host = FakeHost::new();
        let p = plugin(
            &host,
            r#"{"request":["headers","header :path","set x-a 1","remove authorization","counter","counter","time"],
                "response":["header :status"],"log":["property request.duration","histogram"]}"#,
        )
        .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(p.phases()[0].len(), 7);
        assert_eq!(p.phases()[2][0], Op::Property(vec!["request".into(), "duration".into()]));
        host.request_headers.borrow_mut().push(("authorization".into(), "Bearer x".into()));
        let mut f = p.new_filter(2, 0);
        assert_eq!(f.on_request_headers(&host, true), Flow::Continue);
        assert_eq!(host.header(HeaderMap::RequestHeaders, "x-a").as_deref(), Some("1"));
        assert!(host.header(HeaderMap::RequestHeaders, "authorization").is_none());
        assert_eq!(host.metric_value("meshwasm.floor.counter"), 2);
        f.on_response_headers(&host, true);
        f.on_log(&host);
    }

    #[test]
    fn unknown_or_incomplete_hostcalls_are_rejected_with_their_path() {
        let host = FakeHost::new();
        for (json, path) in [
            (r#"{"request":["counter","frobnicate"]}"#, "request[1]"),
            (r#"{"log":["property"]}"#, "log[0]"),
            (r#"{"response":["set x-a"]}"#, "response[0]"),
            (r#"{"log":["histogram","property a.b.c.d.e.f.g.h.i"]}"#, "log[1]"),
        ] {
            let Err(e) = plugin(&host, json) else { unreachable!("{json} accepted") };
            assert!(e.to_string().contains(path), "{json}: {e}");
        }
        assert!(plugin(&host, r#"{"requests":[]}"#).is_err());
    }
}
