//! `meshwasm-upstream --listen 127.0.0.1:PORT`: the test upstream as a standalone server
//! (for the demo and the benchmarks). Prints `listening on <addr>` once it accepts.
//! See `meshwasm_tests::upstream` for its behaviour.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

fn main() {
    let mut listen: SocketAddr = "127.0.0.1:8080".parse().expect("default addr");
    let mut threads: usize = 1;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                let v = args.next().unwrap_or_else(|| usage("--listen needs an address"));
                listen = v.parse().unwrap_or_else(|e| usage(&format!("bad --listen {v}: {e}")));
            }
            "--threads" => {
                let v = args.next().unwrap_or_else(|| usage("--threads needs a number"));
                threads = v.parse().unwrap_or_else(|e| usage(&format!("bad --threads {v}: {e}")));
            }
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    meshwasm_tests::server::serve_main("meshwasm-upstream", listen, threads, |listener| {
        meshwasm_tests::upstream::serve(listener, Arc::new(AtomicU64::new(0)))
    });
}

fn usage(err: &str) -> ! {
    if !err.is_empty() {
        eprintln!("meshwasm-upstream: {err}");
    }
    eprintln!("usage: meshwasm-upstream --listen 127.0.0.1:PORT [--threads N]");
    std::process::exit(if err.is_empty() { 0 } else { 2 })
}
