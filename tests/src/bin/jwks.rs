//! `meshwasm-jwks`: keys, a JWKS server and tokens for the JWT example and the benchmarks.
//!
//! ```text
//! meshwasm-jwks init DIR
//!     RSA 2048, P-256 and Ed25519 keys (`openssl genpkey`) and a 32-byte HMAC secret in DIR;
//!     DIR/jwks.json holds the public keys (kid `rsa`, `ec256`, `ed25519`), what a JWKS
//!     server publishes; DIR/jwks-with-hmac.json adds the secret as an `oct` key (kid `hs256`),
//!     for tests and benchmarks only.
//! meshwasm-jwks serve [--listen 127.0.0.1:8081] [--jwks DIR/jwks.json]
//!     Answers every GET with the key set (`application/json`); prints `listening on <addr>`.
//! meshwasm-jwks token DIR [--alg RS256|ES256|EdDSA|HS256] [--kid KID] [--iss ISS] [--sub SUB]
//!                         [--aud AUD] [--exp SECONDS] [--claim NAME=VALUE]... [--count N]
//!     Prints a token signed with DIR's key for the algorithm (defaults: RS256, issuer
//!     https://issuer.example, subject alice, audience api.example, expiring in 3600 s; a
//!     negative --exp gives an expired token; --aud '' leaves `aud` out). VALUE is JSON when it
//!     parses (`groups=["admin"]`), else a string. --count N prints N different tokens (a
//!     `jti` each), one per line.
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use jsonwebtoken::{Algorithm, EncodingKey};
use meshwasm_tests::jwt::{b64u, genpkey, jwk, mint, now, openssl};
use serde_json::{json, Value};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("init") => init(args.get(1).map(PathBuf::from).unwrap_or_else(|| usage("init needs a directory"))),
        Some("serve") => serve(&args[1..]),
        Some("token") => token(&args[1..]),
        Some("-h" | "--help") => usage(""),
        _ => usage("expected init, serve or token"),
    }
}

fn usage(err: &str) -> ! {
    if !err.is_empty() {
        eprintln!("meshwasm-jwks: {err}");
    }
    eprintln!(
        "usage: meshwasm-jwks init DIR\n       meshwasm-jwks serve [--listen 127.0.0.1:8081] [--jwks DIR/jwks.json]\n       \
         meshwasm-jwks token DIR [--alg RS256|ES256|EdDSA|HS256] [--kid KID] [--iss ISS] [--sub SUB] [--aud AUD]\n                               \
         [--exp SECONDS] [--claim NAME=VALUE]... [--count N]"
    );
    std::process::exit(if err.is_empty() { 0 } else { 2 })
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| usage(&format!("{}: {e} (run `meshwasm-jwks init` first)", path.display())))
}

fn init(dir: PathBuf) {
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| usage(&format!("{}: {e}", dir.display())));
    let (_, rsa) = genpkey(&dir, "rsa", &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]);
    let (_, ec) = genpkey(&dir, "ec256", &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]);
    let (ed_path, _) = genpkey(&dir, "ed25519", &["-algorithm", "ED25519"]);
    let secret = openssl(&["rand", "32"]);
    std::fs::write(dir.join("hs256.key"), &secret).expect("write hs256.key");
    let ed_der = openssl(&["pkey", "-in", ed_path.to_str().expect("utf-8 path"), "-pubout", "-outform", "DER"]);
    let ed_x = &ed_der[ed_der.len() - 32..];
    let public = vec![
        jwk(&EncodingKey::from_rsa_pem(&rsa).expect("rsa key"), Algorithm::RS256, "rsa", false),
        jwk(&EncodingKey::from_ec_pem(&ec).expect("ec key"), Algorithm::ES256, "ec256", false),
        json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed25519", "x": b64u(ed_x)}),
    ];
    let mut all = public.clone();
    all.push(json!({"kty": "oct", "kid": "hs256", "k": b64u(&secret)}));
    let write = |name: &str, keys: Vec<Value>| {
        let text = serde_json::to_string_pretty(&json!({ "keys": keys })).expect("json");
        std::fs::write(dir.join(name), text + "\n").expect("write jwks");
    };
    write("jwks.json", public);
    write("jwks-with-hmac.json", all);
    println!("wrote {0}/rsa.pem, ec256.pem, ed25519.pem, hs256.key, jwks.json, jwks-with-hmac.json", dir.display());
}

fn serve(args: &[String]) {
    let mut listen: SocketAddr = "127.0.0.1:8081".parse().expect("default addr");
    let mut jwks = PathBuf::from("jwks.json");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_else(|| usage(&format!("{a} needs a value")));
        match a.as_str() {
            "--listen" => listen = value().parse().unwrap_or_else(|e| usage(&format!("bad --listen: {e}"))),
            "--jwks" => jwks = PathBuf::from(value()),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let text = String::from_utf8(read(&jwks)).unwrap_or_else(|_| usage("the key set is not UTF-8"));
    serde_json::from_str::<Value>(&text).unwrap_or_else(|e| usage(&format!("{}: not JSON: {e}", jwks.display())));
    meshwasm_tests::server::serve_main("meshwasm-jwks", listen, 1, |listener| {
        meshwasm_tests::jwks_server::serve(listener, text)
    });
}

fn token(args: &[String]) {
    let Some(dir) = args.first().filter(|a| !a.starts_with("--")).map(PathBuf::from) else {
        usage("token needs the directory `init` wrote")
    };
    let n = now();
    let mut alg = Algorithm::RS256;
    let mut kid: Option<String> = None;
    let mut claims =
        json!({"iss": "https://issuer.example", "sub": "alice", "aud": "api.example", "iat": n, "exp": n + 3600});
    let mut count: Option<u64> = None;
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_else(|| usage(&format!("{a} needs a value")));
        match a.as_str() {
            "--alg" => {
                alg = match value().as_str() {
                    "RS256" => Algorithm::RS256,
                    "ES256" => Algorithm::ES256,
                    "EdDSA" => Algorithm::EdDSA,
                    "HS256" => Algorithm::HS256,
                    other => usage(&format!("--alg {other}: one of RS256, ES256, EdDSA, HS256")),
                }
            }
            "--kid" => kid = Some(value()),
            "--iss" | "--sub" => claims[&a[2..]] = json!(value()),
            "--aud" => match value() {
                v if v.is_empty() => {
                    claims.as_object_mut().expect("object").remove("aud");
                }
                v => claims["aud"] = json!(v),
            },
            "--exp" => {
                let secs: i64 = value().parse().unwrap_or_else(|e| usage(&format!("bad --exp: {e}")));
                claims["exp"] = json!(n.saturating_add_signed(secs));
            }
            "--claim" => {
                let v = value();
                let (name, raw) = v.split_once('=').unwrap_or_else(|| usage("--claim needs NAME=VALUE"));
                claims[name] = serde_json::from_str(raw).unwrap_or_else(|_| json!(raw));
            }
            "--count" => count = Some(value().parse().unwrap_or_else(|e| usage(&format!("bad --count: {e}")))),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let (key, default_kid) = match alg {
        Algorithm::RS256 => (EncodingKey::from_rsa_pem(&read(&dir.join("rsa.pem"))).expect("rsa key"), "rsa"),
        Algorithm::ES256 => (EncodingKey::from_ec_pem(&read(&dir.join("ec256.pem"))).expect("ec key"), "ec256"),
        Algorithm::EdDSA => (EncodingKey::from_ed_pem(&read(&dir.join("ed25519.pem"))).expect("ed key"), "ed25519"),
        _ => (EncodingKey::from_secret(&read(&dir.join("hs256.key"))), "hs256"),
    };
    let kid = kid.unwrap_or_else(|| default_kid.to_string());
    match count {
        None => println!("{}", mint(&key, alg, Some(&kid), &claims)),
        Some(count) => {
            let mut out = String::new();
            for i in 0..count {
                claims["jti"] = json!(i.to_string());
                out.push_str(&mint(&key, alg, Some(&kid), &claims));
                out.push('\n');
            }
            print!("{out}");
        }
    }
}
