//! The benchmark floor: an HTTP filter that does nothing, exported for the request phase
//! only (the fewest VM crossings a filter that looks at requests can have). Any meshwasm
//! filter's overhead is measured against this.

use std::rc::Rc;

use meshwasm_sdk_ext::{ConfigError, Host, HttpFilter, Plugin};

pub struct Noop;

impl Plugin for Noop {
    const NAME: &'static str = "noop";
    type Filter = NoopFilter;

    fn configure(_config: &[u8], _host: &dyn Host) -> Result<Self, ConfigError> {
        Ok(Noop)
    }

    fn new_filter(self: &Rc<Self>, _context_id: u32, _seed: u64) -> NoopFilter {
        NoopFilter
    }
}

pub struct NoopFilter;

impl HttpFilter for NoopFilter {}

#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)] // the ABI exports are #[no_mangle]
mod entry {
    meshwasm_sdk_ext::export_http_filter!(crate::Noop, request);
}
