//! `meshwasm-ext-authz --http 127.0.0.1:P --grpc 127.0.0.1:Q`: the test authorizers as a
//! standalone server (for the examples and the demo), with the default policy of Istio's
//! sample ext-authz server (`x-ext-authz: allow` allows; see `meshwasm_tests::ext_authz`).
//! Prints one `listening on <addr>` line per server, HTTP first, once each accepts.

use std::io::Write;
use std::net::SocketAddr;

use meshwasm_tests::ext_authz::{ExtAuthzGrpc, ExtAuthzHttp, Policy};

fn main() {
    let mut http: Option<SocketAddr> = None;
    let mut grpc: Option<SocketAddr> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--http" | "--grpc" => {
                let v = args.next().unwrap_or_else(|| usage(&format!("{arg} needs an address")));
                let addr = v.parse().unwrap_or_else(|e| usage(&format!("bad {arg} {v}: {e}")));
                if arg == "--http" {
                    http = Some(addr);
                } else {
                    grpc = Some(addr);
                }
            }
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if http.is_none() && grpc.is_none() {
        usage("give --http and/or --grpc");
    }
    // Each server binds on its own runtime thread before `start_on` returns (it panics
    // naming the address when the bind fails).
    let _http = http.map(|a| {
        let s = ExtAuthzHttp::start_on(a, Policy::default());
        println!("listening on {}", s.addr());
        s
    });
    let _grpc = grpc.map(|a| {
        let s = ExtAuthzGrpc::start_on(a, Policy::default());
        println!("listening on {}", s.addr());
        s
    });
    let _ = std::io::stdout().flush();
    loop {
        std::thread::park();
    }
}

fn usage(err: &str) -> ! {
    if !err.is_empty() {
        eprintln!("meshwasm-ext-authz: {err}");
    }
    eprintln!("usage: meshwasm-ext-authz [--http 127.0.0.1:PORT] [--grpc 127.0.0.1:PORT]");
    std::process::exit(if err.is_empty() { 0 } else { 2 })
}
