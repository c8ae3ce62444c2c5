//! Any bytes as the retry plugin configuration, and as a client's `grpc-timeout`: parsing
//! must return Ok or a path-naming error, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = meshwasm_retry::config::Config::from_json(data) {
        assert!(!e.message.is_empty());
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Some(ms) = meshwasm_retry::policy::parse_grpc_timeout_ms(s) {
            assert!(ms > 0);
        }
    }
});
