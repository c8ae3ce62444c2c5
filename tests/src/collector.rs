//! A telemetry collector for the access-log and trace tests: HTTP/1.1 on hyper, recording
//! every `POST` (path, headers, body), answering 200 (or the status a test sets, or not at
//! all while [`Collector::set_status`] is given 0: the connection is then closed unanswered).
//!
//! Received bodies are parsed by the maintained models, strictly: [`Collector::otlp_logs`]
//! parses each `/v1/logs` body as an OTLP `ExportLogsServiceRequest` with
//! `opentelemetry-proto`'s serde (the OTLP/JSON mapping), and [`strict`] also refuses a body
//! whose fields the model does not know (serde would skip them silently): everything sent must
//! survive a parse and re-serialisation, except fields at their default value (which the
//! model omits). [`Collector::otlp_spans`] parses `/v1/traces` as `ExportTraceServiceRequest`
//! the same way, and [`Collector::zipkin_spans`] parses `/api/v2/spans` as a list of Zipkin v2
//! spans with `zipkin-types`' serde model.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;

pub use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
pub use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
pub use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
pub use opentelemetry_proto::tonic::logs::v1::LogRecord;
pub use opentelemetry_proto::tonic::trace::v1::Span as OtlpSpan;
pub use zipkin_types::Span as ZipkinSpan;

use crate::server::{accept_loop, ServerThread};

/// One request the collector received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Shared {
    received: Mutex<Vec<Received>>,
    status: AtomicU16,
}

pub struct Collector {
    shared: Arc<Shared>,
    server: ServerThread,
}

impl Collector {
    /// Listens on `127.0.0.1:<free port>`, answering 200.
    pub fn start() -> Self {
        let shared = Arc::new(Shared { received: Mutex::default(), status: AtomicU16::new(200) });
        let s = shared.clone();
        let server = ServerThread::spawn(
            "meshwasm-collector",
            "127.0.0.1:0".parse().expect("addr"),
            move |listener| async move {
                accept_loop(listener, move |stream| {
                    let shared = s.clone();
                    async move {
                        let svc = hyper::service::service_fn(move |req| handle(req, shared.clone()));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    }
                })
                .await;
            },
        );
        Self { shared, server }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Answer with this status from now on.
    pub fn set_status(&self, status: u16) {
        self.shared.status.store(status, Ordering::SeqCst);
    }

    /// Everything received on `path` so far.
    pub fn received(&self, path: &str) -> Vec<Received> {
        self.shared.received.lock().expect("collector").iter().filter(|r| r.path == path).cloned().collect()
    }

    /// Every `/v1/logs` export, parsed strictly.
    pub fn otlp_logs(&self) -> Vec<ExportLogsServiceRequest> {
        self.received("/v1/logs").iter().map(|r| strict::<ExportLogsServiceRequest>(&r.body)).collect()
    }

    /// Every span of every `/v1/traces` export (OTLP), parsed strictly.
    pub fn otlp_spans(&self) -> Vec<OtlpSpan> {
        self.received("/v1/traces")
            .iter()
            .map(|r| strict::<ExportTraceServiceRequest>(&r.body))
            .flat_map(|r| r.resource_spans)
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans)
            .collect()
    }

    /// Every span of every `/api/v2/spans` export (Zipkin v2 JSON), parsed strictly.
    pub fn zipkin_spans(&self) -> Vec<ZipkinSpan> {
        self.received("/api/v2/spans").iter().flat_map(|r| strict::<Vec<ZipkinSpan>>(&r.body)).collect()
    }

    /// Every log record of every `/v1/logs` export.
    pub fn log_records(&self) -> Vec<LogRecord> {
        self.otlp_logs()
            .into_iter()
            .flat_map(|r| r.resource_logs)
            .flat_map(|r| r.scope_logs)
            .flat_map(|s| s.log_records)
            .collect()
    }
}

async fn handle(
    req: hyper::Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let body = req.into_body().collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
    shared.received.lock().expect("collector").push(Received { path, headers, body });
    let status = shared.status.load(Ordering::SeqCst);
    let mut r = hyper::Response::new(Full::new(Bytes::from_static(b"{}")));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    Ok(r)
}

/// Parse `body` as `T` with the model's serde, and refuse fields the model does not know.
pub fn strict<T: serde::de::DeserializeOwned + serde::Serialize>(body: &[u8]) -> T {
    let text = String::from_utf8_lossy(body);
    let raw: Value = serde_json::from_slice(body).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    let parsed: T =
        serde_json::from_value(raw.clone()).unwrap_or_else(|e| panic!("does not parse as the model ({e}): {text}"));
    let back = serde_json::to_value(&parsed).expect("re-serialise");
    if let Err(at) = covered(&raw, &back, "$") {
        panic!("field unknown to the model or changed by it at {at}: {text}");
    }
    parsed
}

fn is_default(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty() || s == "0",
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// Every field of `sent` is in `model` with the same value (numbers and their string forms
/// are the same value, as the OTLP/JSON mapping allows), or has its default value.
fn covered(sent: &Value, model: &Value, at: &str) -> Result<(), String> {
    match (sent, model) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => covered(v, w, &format!("{at}.{k}"))?,
                    None if is_default(v) => {}
                    None => return Err(format!("{at}.{k}")),
                }
            }
            Ok(())
        }
        (Value::Object(a), _) if a.is_empty() => Ok(()),
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            a.iter().zip(b).enumerate().try_for_each(|(i, (x, y))| covered(x, y, &format!("{at}[{i}]")))
        }
        (Value::Number(a), Value::String(b)) | (Value::String(b), Value::Number(a)) if a.to_string() == *b => Ok(()),
        (a, b) if a == b => Ok(()),
        _ => Err(at.to_string()),
    }
}

/// A log record's attribute, as a string (`intValue`s printed).
pub fn attribute(attrs: &[KeyValue], key: &str) -> Option<String> {
    let v = attrs.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()?;
    Some(match v {
        any_value::Value::StringValue(s) => s.clone(),
        any_value::Value::IntValue(i) => i.to_string(),
        any_value::Value::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    })
}

/// Lowercase hex of OTLP id bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A log record's body, if it is a string.
pub fn body_string(r: &LogRecord) -> Option<&str> {
    match r.body.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strict_refuses_unknown_fields_and_accepts_the_mapping() {
        let ok = json!({"resourceLogs": [{"resource": {"attributes": []}, "scopeLogs": [{"scope": {"name": "n"},
            "logRecords": [{"timeUnixNano": "5", "severityNumber": 9, "body": {"stringValue": "x"},
                "attributes": [{"key": "a", "value": {"intValue": "3"}}]}]}]}]});
        let r: ExportLogsServiceRequest = strict(ok.to_string().as_bytes());
        let rec = &r.resource_logs[0].scope_logs[0].log_records[0];
        assert_eq!(rec.time_unix_nano, 5);
        assert_eq!(attribute(&rec.attributes, "a").as_deref(), Some("3"));
        let bad = json!({"resourceLogs": [{"scopeLogs": [{"logRecords": [{"timeUnixNanos": "5"}]}]}]});
        let caught = std::panic::catch_unwind(|| strict::<ExportLogsServiceRequest>(bad.to_string().as_bytes()));
        assert!(caught.is_err(), "a misspelled field is refused");
    }
}
