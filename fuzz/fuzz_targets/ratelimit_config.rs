//! Any bytes as the rate limiter's plugin configuration: parse must return Ok or a
//! path-naming error, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = meshwasm_ratelimit::config::Config::from_json(data) {
        assert!(!e.message.is_empty());
    }
});
