//! Any bytes as a JSON Web Key Set (an inline `jwks`, or the body of a `jwksUri` fetch) and
//! as key material and signatures: jwt_verify_lib's JWKS rules (`jwks::Jwks::parse`) and
//! signature verification (`Jwks::verify`) never panic. The first byte picks the shape:
//!
//! - 0: the rest is the key set's JSON; a set that parses has a key, and verifying tokens of
//!   every algorithm against it returns a status;
//! - 1: the rest is cut into key fields (`kty`, `alg`, `crv` chosen by its first bytes; `n`,
//!   `e`, `x`, `y`, `k` from the bytes, base64url-encoded), so RSA moduli and exponents, EC
//!   points and Ed25519 keys that are not valid reach the crypto crates;
//! - 2: the rest is the signature of a genuine token under the genuine keys, for each
//!   algorithm: it never verifies unless it is the genuine signature — the same number for
//!   RSA, the same bytes for HMAC and Ed25519, the same `r` for ECDSA (BoringSSL reads each
//!   half of `r || s` as a big-endian number, and `(r, n - s)` verifies as `(r, s)` does:
//!   neither is a forgery).
#![no_main]

#[path = "common/jwt_fixtures.rs"]
mod jwt_fixtures;

use jwt_fixtures::{b64u, JWKS, TOKENS};
use libfuzzer_sys::fuzz_target;
use meshwasm_authz::jwks::Jwks;
use meshwasm_authz::jwt::{b64url_decode, Jwt, Status};
use serde_json::{json, Map, Value};

thread_local! {
    static GENUINE: (Jwks, Vec<Jwt>) = {
        let (jwks, skipped) = Jwks::parse(JWKS.as_bytes()).unwrap();
        assert!(skipped.is_empty() && jwks.keys.len() == 5);
        let tokens: Vec<Jwt> = TOKENS.iter().map(|t| Jwt::parse(t).unwrap()).collect();
        for t in &tokens {
            assert_eq!(jwks.verify(t), Status::Ok, "{}", t.alg);
        }
        (jwks, tokens)
    };
}

/// Every algorithm jwt_verify_lib implements, each on a token of the right shape.
fn every_alg(tokens: &[Jwt]) -> Vec<Jwt> {
    let mut out = tokens.to_vec();
    for alg in ["RS384", "RS512", "PS384", "PS512", "ES512", "HS384", "HS512"] {
        let mut t = tokens[0].clone();
        t.alg = alg.to_string();
        out.push(t);
    }
    out
}

fn check_set(bytes: &[u8], tokens: &[Jwt]) {
    let Ok((jwks, _skipped)) = Jwks::parse(bytes) else { return };
    assert!(!jwks.keys.is_empty());
    for t in every_alg(tokens) {
        let _ = jwks.verify(&t);
        let mut kidless = t.clone();
        kidless.kid.clear();
        let _ = jwks.verify(&kidless);
    }
}

/// Key fields cut from the bytes: `[kty, alg, crv, len_1, field_1, len_2, field_2, ...]`.
fn key_from(b: &[u8]) -> Value {
    const KTY: [&str; 5] = ["RSA", "EC", "OKP", "oct", "x"];
    const ALG: [&str; 8] = ["", "RS256", "PS512", "ES256", "ES384", "ES512", "EdDSA", "HS256"];
    const CRV: [&str; 5] = ["", "P-256", "P-384", "P-521", "Ed25519"];
    let pick = |i: usize, n: usize| b.get(i).map_or(0, |v| usize::from(*v) % n);
    let mut k = Map::new();
    k.insert("kty".into(), json!(KTY[pick(0, KTY.len())]));
    k.insert("kid".into(), json!("k"));
    let alg = ALG[pick(1, ALG.len())];
    if !alg.is_empty() {
        k.insert("alg".into(), json!(alg));
    }
    let crv = CRV[pick(2, CRV.len())];
    if !crv.is_empty() {
        k.insert("crv".into(), json!(crv));
    }
    let mut rest = b.get(3..).unwrap_or_default();
    for name in ["n", "e", "x", "y", "k"] {
        let Some((&len, tail)) = rest.split_first() else { break };
        let (field, tail) = tail.split_at(tail.len().min(usize::from(len)));
        k.insert(name.into(), json!(b64u(field)));
        rest = tail;
    }
    json!({"keys": [Value::Object(k)]})
}

fn strip(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|x| *x != 0).unwrap_or(b.len());
    b.get(start..).unwrap_or_default()
}

/// Whether an accepted `sig` could only come from whoever made `genuine` (see above).
fn same_signer(alg: &str, sig: &[u8], genuine: &[u8]) -> bool {
    if alg.starts_with("ES") {
        let (r, _) = sig.split_at(sig.len() / 2);
        let (gr, _) = genuine.split_at(genuine.len() / 2);
        strip(r) == strip(gr)
    } else {
        strip(sig) == strip(genuine)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    GENUINE.with(|(jwks, tokens)| match mode % 3 {
        0 => check_set(rest, tokens),
        1 => check_set(key_from(rest).to_string().as_bytes(), tokens),
        _ => {
            for t in tokens {
                let mut forged = t.clone();
                forged.signature = rest.to_vec();
                let ok = jwks.verify(&forged) == Status::Ok;
                assert!(!ok || same_signer(&t.alg, rest, &t.signature), "{} accepted a forged signature", t.alg);
                // The same bytes as the base64url text of a signature.
                if let Some(sig) = b64url_decode(rest) {
                    forged.signature = sig;
                    let ok = jwks.verify(&forged) == Status::Ok;
                    let why = format!("{} accepted a forged signature", t.alg);
                    assert!(!ok || same_signer(&t.alg, &forged.signature, &t.signature), "{why}");
                }
            }
        }
    });
});
