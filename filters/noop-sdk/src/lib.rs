//! A Proxy-Wasm HTTP filter that does nothing, built with the `proxy-wasm` SDK. The SDK
//! exports every callback, so Envoy crosses into the VM for each phase of each request: this
//! is what a typical Rust SDK filter pays before doing any work (benchmark reference).
#![cfg_attr(target_arch = "wasm32", allow(unsafe_code))]

#[cfg(target_arch = "wasm32")]
mod wasm {
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType};

    struct Root;
    impl Context for Root {}
    impl RootContext for Root {
        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
        fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Stream))
        }
    }

    struct Stream;
    impl Context for Stream {}
    impl HttpContext for Stream {
        fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
            Action::Continue
        }
    }

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
    }}
}
