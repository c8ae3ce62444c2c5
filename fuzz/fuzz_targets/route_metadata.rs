//! Arbitrary bytes as `xds.route_metadata`: decoding returns a value or an error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(v)) = meshwasm_sdk_ext::props::metadata_namespace(data, "meshwasm") {
        let _ = v.get("fault").map(meshwasm_fault::config::Config::from_route_value);
    }
});
