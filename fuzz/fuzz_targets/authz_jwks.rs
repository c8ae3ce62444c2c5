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

use libfuzzer_sys::fuzz_target;
use meshwasm_authz::jwks::Jwks;
use meshwasm_authz::jwt::{b64_encode, b64url_decode, Jwt, Status};
use serde_json::{json, Map, Value};

// Public keys of every family (RSA 2048, P-256, P-384, Ed25519) and an HMAC secret, and a
// token signed by each family's private key (`alg` RS256, PS256, ES256, ES384, EdDSA, HS256).
const JWKS: &str = r#"{"keys":[{"kty":"RSA","kid":"rsa","n":"rORPTPcvixwI3wxFDXj1NNB03Ir3QmQFTeEQH_2M_0AIhZISAGZJH6pb2ielsLlavem07ufLlT6NNFtfQmxvSKNUWxpmBH9VBsNDUR0-njddYfa7P9CL-Vl6T5tR3pd0pVuWyawQZqMC5FZK8g_MRhG-tXA8PTsC9cHXqJE3dwiSNW8375KsYvXjT2_QX7TqzvHnuy8niqtBeWz1ZXw_zMFH2uqiocNxworOMSkrbG_cQXeiKh7_NC6YtF7dwoWN6JEjLuNbblWa3hcs7lXH85ZaNaZTSlC1b5sN8yha5cWRHVIer5xLJMKnEL0EbdVqSZYdmjz-NepKhDCThEinmQ","e":"AQAB"},{"kty":"EC","kid":"ec256","crv":"P-256","x":"eEcUPel7DgfmAQzXyF28mPzVMyvLnr-9Q_ea61luQGI","y":"iGF5qEdNiTbqjJVishtCwM-cXbgrwBcQS_U2stH9S6k"},{"kty":"EC","kid":"ec384","crv":"P-384","x":"Kv9rLeXDKOI5iJuZ41hSLfkCexQ3XJDMzZ6weylLCvH2pVTVrcFOJ9TpaYbfJbIF","y":"zzDajor15XxWxdQLnGbc5FmiWOtWpvrGmAX_mYJ0qHJS193WpltTg173s4T2pGDq"},{"kty":"OKP","kid":"ed","crv":"Ed25519","x":"4ApO2VdXYC8m6DpVjQzVTJq88CRnzbhwDPVk9E1jYsI"},{"kty":"oct","kid":"hs","k":"ZnV6eiB0YXJnZXQgSE1BQyBzZWNyZXQsIDMyIGIuLg"}]}"#;
const TOKENS: [&str; 6] = [
    "eyJhbGciOiJSUzI1NiIsImtpZCI6InJzYSJ9.eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlIiwic3ViIjoiYWxpY2UiLCJhdWQiOiJhcGkuZXhhbXBsZSIsInNjb3BlIjoicmVhZCB3cml0ZSJ9.HuMBuiDYgynYwCAIjOW9rPgTtN-ELQrSTTMI97AFTaHjEE-B-AU5lebMV0dWbEF3P8i5ED7Q5_00EtJXG2eClOCSSf709K-K1nZVtxVdoYPzd6a5PEBWd63IFoOl1XRJn54kdb9gosf4lsUHtR0j70Siah8HSFkmJNGWVfEAdbSc06EPwOfxQvkFaCpzr7g4kXSURWzLSH8CtpSB2qCqZKZ1BwOBUenn0zKdkbvvPK89RZj2Ktj9oAFdhJLx4OVSycMqviTWsGv6UYCV1Qw0NajxlueXgz8rYm4tHfTAtm4oB6nFnNXc_laJL9J-Hb7dcbzlXW113VG3FHXD4cx9MA",
    "eyJhbGciOiJQUzI1NiIsImtpZCI6InJzYSJ9.eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlIiwic3ViIjoiYWxpY2UiLCJhdWQiOiJhcGkuZXhhbXBsZSIsInNjb3BlIjoicmVhZCB3cml0ZSJ9.Bqk9y2m85LNzmDe11JcMUl4mRGsVzIsAIxXbnAuJabGkmJGRR18ttyquLQOxhe5w7v_Ob9rhtcHamHh-K5C1MpM4cuheoIJe1Fc2kF95fNB_6781k6GwZxrrNcBYDBah3JfYGKxJUvdhnfI6F6_K0Os0Spw5mT3_iPNTSWC_pdFKNaiAgkR6Q1HwZnTYrSH7pyCy1xRocj-J92X1WOwn79uz0fDhuql6pH7h4GessYhHAihy7wUIfG833lWOPkQICope0oHaHETM35ybQmEbpsd6DKzs3ohLTKFa7hFjw0THSwMcJY0YajU_QeiSedTFRODgP6hkNhBUqoKfIChSsQ",
    "eyJhbGciOiJFUzI1NiIsImtpZCI6ImVjMjU2In0.eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlIiwic3ViIjoiYWxpY2UiLCJhdWQiOiJhcGkuZXhhbXBsZSIsInNjb3BlIjoicmVhZCB3cml0ZSJ9.AWjc9Ul7WjDQ-iKjeBNimqvFW___-RUOTkRGShXyjyohB8vsaeXLpY1d2G8KqfdT6hV30q85oFeQ46e0CevghA",
    "eyJhbGciOiJFUzM4NCIsImtpZCI6ImVjMzg0In0.eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlIiwic3ViIjoiYWxpY2UiLCJhdWQiOiJhcGkuZXhhbXBsZSIsInNjb3BlIjoicmVhZCB3cml0ZSJ9.HikE4hPnvxOkn2Ih_asX92l4Y-ir0URwybssZtjI9GY4RFQQY7Op8BOoFhVDnYYfUUR13W_zmzU0Ztiysu-_2nO94WcNc5F_AB_Ktossdrk6Ph30e1sJhG6v3hpyO_Q5",
    "eyJhbGciOiJFZERTQSIsImtpZCI6ImVkIn0.eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlIiwic3ViIjoiYWxpY2UiLCJhdWQiOiJhcGkuZXhhbXBsZSIsInNjb3BlIjoicmVhZCB3cml0ZSJ9.VN7F8sx3Kc7QquiAR7z1G7143AnhZptCLO_M4l49hzIZeNao_uz4ZYJ7xxyF8YR_5U9wq5UN6XW1VRy9jpFoDg",
    "eyJhbGciOiJIUzI1NiIsImtpZCI6ImhzIn0.eyJpc3MiOiJodHRwczovL2lzc3Vlci5leGFtcGxlIiwic3ViIjoiYWxpY2UiLCJhdWQiOiJhcGkuZXhhbXBsZSIsInNjb3BlIjoicmVhZCB3cml0ZSJ9.wgJg2hq92Ggjv82LgfDCjxl21yeaPuaiTu-r96_Sg_4",
];

fn b64u(b: &[u8]) -> String {
    b64_encode(b).trim_end_matches('=').replace('+', "-").replace('/', "_")
}

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
