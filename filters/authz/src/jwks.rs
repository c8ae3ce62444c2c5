//! JSON Web Key Sets and signature verification as jwt_verify_lib does them: a key that
//! does not parse is skipped, a set without a valid key is `JwksNoValidKeys`; keys are tried
//! in order, skipping a key whose `kid` differs from the token's (both set) or whose `alg`
//! differs from the token's; the key type decides the algorithm family (an RSA key never
//! verifies HS*, an `oct` key only verifies HMAC).
//!
//! Crypto: RustCrypto (`rsa` PKCS#1 v1.5 and PSS, `p256`/`p384` ECDSA, `ed25519-dalek`,
//! `hmac` + `sha2`), public-key operations only.

use ed25519_dalek::Verifier as _;
use hmac::{KeyInit, Mac};
use rsa::signature::hazmat::PrehashVerifier;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256, Sha384, Sha512};

use crate::jwt::{b64url_decode, parse_object, Jwt, Status};

#[derive(Clone)]
pub enum Material {
    Rsa(rsa::PublicKey),
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
    /// P-521 keys parse in Envoy; this module has no P-521 arithmetic and never verifies
    /// with them (fails closed).
    P521,
    Oct(Vec<u8>),
    /// The raw 32 bytes; `None` when they are not a valid point (no signature verifies).
    Ed25519(Option<ed25519_dalek::VerifyingKey>),
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Rsa(_) => "RSA",
            Self::P256(_) => "P-256",
            Self::P384(_) => "P-384",
            Self::P521 => "P-521",
            Self::Oct(_) => "oct",
            Self::Ed25519(_) => "Ed25519",
        })
    }
}

#[derive(Debug, Clone)]
pub struct Jwk {
    pub kid: String,
    pub alg: String,
    pub material: Material,
}

#[derive(Debug, Clone, Default)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

/// Why a JWKS was refused (for configuration errors and logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksError(pub String);

fn string_field(m: &Map<String, Value>, name: &str) -> Result<Option<String>, String> {
    match m.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("[{name}] is not a string")),
    }
}

fn required(m: &Map<String, Value>, name: &str, kty: &str) -> Result<String, String> {
    string_field(m, name)?.ok_or_else(|| format!("[{name}] field is missing for a {kty} key"))
}

/// `BN_bin2bn` into a fixed-width big-endian field element.
fn field(bytes: &[u8], width: usize) -> Option<Vec<u8>> {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    let v = bytes.get(start..)?;
    if v.len() > width {
        return None;
    }
    let mut out = vec![0u8; width - v.len()];
    out.extend_from_slice(v);
    Some(out)
}

fn decode(s: &str) -> Result<Vec<u8>, String> {
    b64url_decode(s.as_bytes()).ok_or_else(|| "invalid base64url".to_string())
}

fn ec_point(x: &[u8], y: &[u8], width: usize) -> Option<Vec<u8>> {
    let mut p = vec![4u8];
    p.extend(field(x, width)?);
    p.extend(field(y, width)?);
    Some(p)
}

fn parse_key(m: &Map<String, Value>) -> Result<Jwk, String> {
    let kty = string_field(m, "kty")?.ok_or("[kty] is missing in [keys]")?;
    // jwt_verify_lib reads kid and alg only when they are strings.
    let kid = match m.get("kid") {
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    };
    let alg = match m.get("alg") {
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    };
    let material = match kty.as_str() {
        "RSA" => {
            if !(alg.is_empty() || alg.starts_with("RS") || alg.starts_with("PS")) {
                return Err("[alg] is not started with [RS] or [PS] for an RSA key".into());
            }
            let n = decode(&required(m, "n", "RSA")?)?;
            let e = decode(&required(m, "e", "RSA")?)?;
            let e_trim: Vec<u8> = e.iter().copied().skip_while(|b| *b == 0).collect();
            if e_trim != [3] && e_trim != [1, 0, 1] {
                return Err("RSA [e] must be 3 or 65537".into());
            }
            let n = rsa::BoxedUint::from_be_slice_vartime(&n);
            let e = rsa::BoxedUint::from_be_slice_vartime(&e);
            Material::Rsa(rsa::PublicKey::new_with_size_limits(n, e, 512..=16384).map_err(|e| format!("RSA key: {e}"))?)
        }
        "EC" => {
            if !alg.is_empty() && !alg.starts_with("ES") {
                return Err("[alg] is not started with [ES] for an EC key".into());
            }
            let mut crv =
                string_field(m, "crv").map_err(|_| "[crv] field is not string for an EC key")?.unwrap_or_default();
            if !alg.is_empty() && !crv.is_empty() {
                let ok = matches!(
                    (alg.as_str(), crv.as_str()),
                    ("ES256", "P-256") | ("ES384", "P-384") | ("ES512", "P-521")
                );
                if !ok {
                    return Err("[crv] field specified is not compatible with [alg] for an EC key".into());
                }
            }
            if alg.is_empty() && crv.is_empty() {
                crv = "P-256".into();
            }
            let curve = if alg == "ES256" || crv == "P-256" {
                256
            } else if alg == "ES384" || crv == "P-384" {
                384
            } else if alg == "ES512" || crv == "P-521" {
                521
            } else {
                return Err("[crv] or [alg] field is not supported for an EC key".into());
            };
            let x = decode(&required(m, "x", "EC")?)?;
            let y = decode(&required(m, "y", "EC")?)?;
            match curve {
                256 => {
                    let p = ec_point(&x, &y, 32).ok_or("EC [x] and [y] fields have a parse error")?;
                    Material::P256(
                        p256::ecdsa::VerifyingKey::from_sec1_bytes(&p)
                            .map_err(|_| "EC [x] and [y] fields have a parse error")?,
                    )
                }
                384 => {
                    let p = ec_point(&x, &y, 48).ok_or("EC [x] and [y] fields have a parse error")?;
                    Material::P384(
                        p384::ecdsa::VerifyingKey::from_sec1_bytes(&p)
                            .map_err(|_| "EC [x] and [y] fields have a parse error")?,
                    )
                }
                _ => Material::P521,
            }
        }
        "oct" => {
            if !alg.is_empty() && !matches!(alg.as_str(), "HS256" | "HS384" | "HS512") {
                return Err("[alg] does not start with [HS] for an HMAC key".into());
            }
            let k = decode(&required(m, "k", "HMAC")?)?;
            if k.is_empty() {
                return Err("Oct key is empty".into());
            }
            Material::Oct(k)
        }
        "OKP" => {
            if !alg.is_empty() && alg != "EdDSA" {
                return Err("[alg] is not [EdDSA] for an OKP key".into());
            }
            let crv = required(m, "crv", "OKP")?;
            if crv != "Ed25519" {
                return Err("[crv] field is not supported for an OKP key".into());
            }
            let x = decode(&required(m, "x", "OKP")?)?;
            let raw: [u8; 32] = x.as_slice().try_into().map_err(|_| "OKP [x] field is wrong length")?;
            Material::Ed25519(ed25519_dalek::VerifyingKey::from_bytes(&raw).ok())
        }
        _ => return Err("[kty] is not supported in [keys]".into()),
    };
    Ok(Jwk { kid, alg, material })
}

impl Jwks {
    /// `Jwks::createFrom(JWKS)`. Errors say why no key could be had; a set with some valid
    /// keys keeps those and reports the others in `skipped`.
    pub fn parse(bytes: &[u8]) -> Result<(Self, Vec<String>), JwksError> {
        let m = parse_object(bytes).ok_or_else(|| JwksError("Jwks is an invalid JSON".into()))?;
        let keys = match m.get("keys") {
            None => return Err(JwksError("Jwks does not have [keys] field".into())),
            Some(Value::Array(k)) => k,
            Some(_) => return Err(JwksError("[keys] in Jwks is not an array".into())),
        };
        let mut out = Vec::new();
        let mut skipped = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let Value::Object(k) = k else { continue };
            match parse_key(k) {
                Ok(jwk) => out.push(jwk),
                Err(e) => skipped.push(format!("keys[{i}]: {e}")),
            }
        }
        if out.is_empty() {
            let why = skipped.first().cloned().unwrap_or_default();
            return Err(JwksError(format!("Jwks doesn't have any valid public key ({why})")));
        }
        Ok((Self { keys: out }, skipped))
    }

    /// `verifyJwtWithoutTimeChecking`.
    pub fn verify(&self, jwt: &Jwt) -> Status {
        let data = jwt.signed_data();
        let mut matched = false;
        for k in &self.keys {
            if !jwt.kid.is_empty() && !k.kid.is_empty() && k.kid != jwt.kid {
                continue;
            }
            if !k.alg.is_empty() && k.alg != jwt.alg {
                continue;
            }
            matched = true;
            match &k.material {
                Material::Rsa(key) => {
                    if rsa_verify(key, &jwt.alg, &data, &jwt.signature) {
                        return Status::Ok;
                    }
                }
                Material::P256(key) => {
                    let sig = ec_rs(&jwt.signature, 32).and_then(|rs| p256::ecdsa::Signature::from_slice(&rs).ok());
                    if let Some(sig) = sig {
                        if key.verify_prehash(&ec_digest(&jwt.alg, &data), &sig).is_ok() {
                            return Status::Ok;
                        }
                    }
                }
                Material::P384(key) => {
                    let sig = ec_rs(&jwt.signature, 48).and_then(|rs| p384::ecdsa::Signature::from_slice(&rs).ok());
                    if let Some(sig) = sig {
                        if key.verify_prehash(&ec_digest(&jwt.alg, &data), &sig).is_ok() {
                            return Status::Ok;
                        }
                    }
                }
                Material::P521 => {}
                Material::Oct(secret) => {
                    if hmac_verify(secret, &jwt.alg, &data, &jwt.signature) {
                        return Status::Ok;
                    }
                }
                Material::Ed25519(key) => {
                    let Ok(sig) = <[u8; 64]>::try_from(jwt.signature.as_slice()) else {
                        return Status::JwtEd25519SignatureWrongLength;
                    };
                    let sig = ed25519_dalek::Signature::from_bytes(&sig);
                    if key.as_ref().is_some_and(|k| k.verify(&data, &sig).is_ok()) {
                        return Status::Ok;
                    }
                }
            }
        }
        if matched {
            Status::JwtVerificationFail
        } else {
            Status::JwksKidAlgMismatch
        }
    }
}

/// jwt_verify_lib picks the digest from the token's `alg` (SHA-256 unless it names 384/512).
fn ec_digest(alg: &str, data: &[u8]) -> Vec<u8> {
    match alg {
        "ES384" => Sha384::digest(data).to_vec(),
        "ES512" => Sha512::digest(data).to_vec(),
        _ => Sha256::digest(data).to_vec(),
    }
}

/// `r || s` at the curve's width, each half of the signature (`BN_bin2bn` of `len / 2` bytes
/// each, so leading zeros and an odd trailing byte are tolerated as BoringSSL does).
fn ec_rs(sig: &[u8], width: usize) -> Option<Vec<u8>> {
    let half = sig.len() / 2;
    let mut rs = field(sig.get(..half)?, width)?;
    rs.extend(field(sig.get(half..2 * half)?, width)?);
    Some(rs)
}

fn rsa_verify(key: &rsa::PublicKey, alg: &str, data: &[u8], sig: &[u8]) -> bool {
    use rsa::{pkcs1v15, pss};
    let bits = match alg {
        "RS384" | "PS384" => 384,
        "RS512" | "PS512" => 512,
        _ => 256,
    };
    if alg.starts_with("RS") {
        let Ok(sig) = pkcs1v15::Signature::try_from(sig) else { return false };
        match bits {
            384 => pkcs1v15::VerifyingKey::<Sha384>::new(key.clone()).verify(data, &sig).is_ok(),
            512 => pkcs1v15::VerifyingKey::<Sha512>::new(key.clone()).verify(data, &sig).is_ok(),
            _ => pkcs1v15::VerifyingKey::<Sha256>::new(key.clone()).verify(data, &sig).is_ok(),
        }
    } else if alg.starts_with("PS") {
        let Ok(sig) = pss::Signature::try_from(sig) else { return false };
        match bits {
            384 => pss::VerifyingKey::<Sha384>::new_with_auto_salt_len(key.clone()).verify(data, &sig).is_ok(),
            512 => pss::VerifyingKey::<Sha512>::new_with_auto_salt_len(key.clone()).verify(data, &sig).is_ok(),
            _ => pss::VerifyingKey::<Sha256>::new_with_auto_salt_len(key.clone()).verify(data, &sig).is_ok(),
        }
    } else {
        false
    }
}

fn hmac_verify(secret: &[u8], alg: &str, data: &[u8], sig: &[u8]) -> bool {
    fn run<M: Mac + KeyInit>(secret: &[u8], data: &[u8], sig: &[u8]) -> bool {
        let Ok(mut m) = <M as KeyInit>::new_from_slice(secret) else { return false };
        m.update(data);
        m.verify_slice(sig).is_ok()
    }
    match alg {
        "HS384" => run::<hmac::Hmac<Sha384>>(secret, data, sig),
        "HS512" => run::<hmac::Hmac<Sha512>>(secret, data, sig),
        _ => run::<hmac::Hmac<Sha256>>(secret, data, sig),
    }
}
