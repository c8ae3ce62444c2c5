//! Any bytes as a rate-limit service reply (a hostile or broken service): decoding must
//! return Ok or an error, never panic; a decoded reply's headers are valid header names.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = meshwasm_ratelimit::rls::decode_response(data) {
        for (k, _) in r.response_headers.iter().chain(&r.request_headers) {
            assert!(!k.is_empty() && k.bytes().all(|b| b > b' ' && b < 0x7f && b != b':'));
        }
    }
});
