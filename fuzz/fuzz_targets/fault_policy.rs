//! A fixed, rich configuration against arbitrary request headers, through the filter and
//! the fake host: every callback path must complete without panicking.
#![no_main]
use std::rc::Rc;

use libfuzzer_sys::fuzz_target;
use meshwasm_fault::FaultPlugin;
use meshwasm_sdk_ext::fake::FakeHost;
use meshwasm_sdk_ext::{HttpFilter, Plugin};

const CONFIG: &str = r#"{"rules":[
  {"name":"r","match":[{"uri":{"regex":"/a/[0-9]+"},"queryParams":{"q":{"prefix":"x"}},"headers":{"h":{}}}],
   "fault":{"delay":{"fixedDelay":"10ms","percentage":{"value":50}},"abort":{"grpcStatus":"UNAVAILABLE","percentage":{"value":50}}}}],
  "headerControl":{"abort":{"percentage":{"value":75}}},"maxActiveFaults":3}"#;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut headers: Vec<(String, String)> = vec![(":path".into(), "/".into())];
    for line in text.lines() {
        let (k, v) = line.split_once(':').unwrap_or((line, ""));
        let k = match k {
            "p" => ":path".to_string(),
            "a" => "x-envoy-fault-abort-request".to_string(),
            "g" => "x-envoy-fault-abort-grpc-request".to_string(),
            "ap" => "x-envoy-fault-abort-request-percentage".to_string(),
            "d" => "x-envoy-fault-delay-request".to_string(),
            "dp" => "x-envoy-fault-delay-request-percentage".to_string(),
            other => other.to_ascii_lowercase(),
        };
        headers.push((k, v.to_string()));
    }
    let host = FakeHost::new();
    *host.request_headers.borrow_mut() = headers;
    let Ok(plugin) = FaultPlugin::configure(CONFIG.as_bytes(), &host) else { return };
    let plugin = Rc::new(plugin);
    let seed = data.iter().fold(0u64, |a, b| a.wrapping_mul(31).wrapping_add(u64::from(*b)));
    let mut f = plugin.new_filter(2, seed);
    f.on_request_headers(&host, false);
    f.on_request_body(&host, 10, false);
    f.on_request_trailers(&host);
    f.on_timer(&host);
    f.on_done(&host);
    assert_eq!(host.shared_u64("meshwasm.fault..active_faults"), Some(0));
});
