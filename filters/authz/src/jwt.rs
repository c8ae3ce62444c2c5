//! JWT parsing and checks exactly as Envoy's `jwt_authn` does them (google/jwt_verify_lib):
//! the status codes and their messages, abseil's lenient base64url decoder, a JSON parser
//! that refuses what protobuf's JSON parser refuses (duplicate keys, deep nesting), the
//! registered claims with jwt_verify_lib's types, and the time window with the clock skew.

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// jwt_verify_lib's `Status`, with the messages Envoy puts in the 401/403 body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Ok,
    JwtMissed,
    JwtNotYetValid,
    JwtExpired,
    JwtBadFormat,
    JwtHeaderParseErrorBadBase64,
    JwtHeaderParseErrorBadJson,
    JwtHeaderBadAlg,
    JwtHeaderNotImplementedAlg,
    JwtHeaderBadKid,
    JwtPayloadParseErrorBadBase64,
    JwtEd25519SignatureWrongLength,
    JwtPayloadParseErrorBadJson,
    JwtPayloadParseErrorIssNotString,
    JwtPayloadParseErrorSubNotString,
    JwtPayloadParseErrorIatNotInteger,
    JwtPayloadParseErrorIatOutOfRange,
    JwtPayloadParseErrorNbfNotInteger,
    JwtPayloadParseErrorNbfOutOfRange,
    JwtPayloadParseErrorExpNotInteger,
    JwtPayloadParseErrorExpOutOfRange,
    JwtPayloadParseErrorJtiNotString,
    JwtPayloadParseErrorAudNotString,
    JwtSignatureParseErrorBadBase64,
    JwtUnknownIssuer,
    JwtAudienceNotAllowed,
    JwtVerificationFail,
    JwksNoValidKeys,
    JwksKidAlgMismatch,
    JwksFetchFail,
}

impl Status {
    pub fn message(self) -> &'static str {
        match self {
            Self::Ok => "OK",
            Self::JwtMissed => "Jwt is missing",
            Self::JwtNotYetValid => "Jwt not yet valid",
            Self::JwtExpired => "Jwt is expired",
            Self::JwtBadFormat => "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
            Self::JwtHeaderParseErrorBadBase64 => "Jwt header is an invalid Base64url encoded",
            Self::JwtHeaderParseErrorBadJson => "Jwt header is an invalid JSON",
            Self::JwtHeaderBadAlg => "Jwt header [alg] field is required and must be a string",
            Self::JwtHeaderNotImplementedAlg => "Jwt header [alg] is not supported",
            Self::JwtHeaderBadKid => "Jwt header [kid] field is not a string",
            Self::JwtPayloadParseErrorBadBase64 => "Jwt payload is an invalid Base64url encoded",
            Self::JwtEd25519SignatureWrongLength => "Jwt ED25519 signature is wrong length",
            Self::JwtPayloadParseErrorBadJson => "Jwt payload is an invalid JSON",
            Self::JwtPayloadParseErrorIssNotString => "Jwt payload [iss] field is not a string",
            Self::JwtPayloadParseErrorSubNotString => "Jwt payload [sub] field is not a string",
            Self::JwtPayloadParseErrorIatNotInteger => "Jwt payload [iat] field is not an integer",
            Self::JwtPayloadParseErrorIatOutOfRange => "Jwt payload [iat] field is not a positive 64 bit integer",
            Self::JwtPayloadParseErrorNbfNotInteger => "Jwt payload [nbf] field is not an integer",
            Self::JwtPayloadParseErrorNbfOutOfRange => "Jwt payload [nbf] field is not a positive 64 bit integer",
            Self::JwtPayloadParseErrorExpNotInteger => "Jwt payload [exp] field is not an integer",
            Self::JwtPayloadParseErrorExpOutOfRange => "Jwt payload [exp] field is not a positive 64 bit integer",
            Self::JwtPayloadParseErrorJtiNotString => "Jwt payload [jti] field is not a string",
            Self::JwtPayloadParseErrorAudNotString => "Jwt payload [aud] field is not a string or string list",
            Self::JwtSignatureParseErrorBadBase64 => "Jwt signature is an invalid Base64url encoded",
            Self::JwtUnknownIssuer => "Jwt issuer is not configured",
            Self::JwtAudienceNotAllowed => "Audiences in Jwt are not allowed",
            Self::JwtVerificationFail => "Jwt verification fails",
            Self::JwksNoValidKeys => "Jwks doesn't have any valid public key",
            Self::JwksKidAlgMismatch => "Jwks doesn't have key to match kid or alg from Jwt",
            Self::JwksFetchFail => "Jwks remote fetch is failed",
        }
    }

    /// A short name for metrics (`denied.<reason>`).
    pub fn reason(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::JwtMissed => "missing",
            Self::JwtNotYetValid => "not_yet_valid",
            Self::JwtExpired => "expired",
            Self::JwtUnknownIssuer => "unknown_issuer",
            Self::JwtAudienceNotAllowed => "audience",
            Self::JwtVerificationFail | Self::JwtEd25519SignatureWrongLength => "signature",
            Self::JwksNoValidKeys | Self::JwksKidAlgMismatch => "no_key",
            Self::JwksFetchFail => "jwks_fetch",
            _ => "malformed",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

// === base64 ===

fn b64_value(c: u8, url: bool) -> Option<u32> {
    Some(u32::from(match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'-' if url => 62,
        b'_' if url => 63,
        b'+' if !url => 62,
        b'/' if !url => 63,
        _ => return None,
    }))
}

/// abseil's `WebSafeBase64Unescape`: whitespace skipped, padding (`=` or `.`) optional but,
/// when present, exactly the right count; non-zero trailing bits accepted.
pub fn b64url_decode(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4 + 3);
    let mut acc: u32 = 0;
    let mut n = 0u32;
    let mut i = 0;
    while let Some(&c) = s.get(i) {
        if let Some(v) = b64_value(c, true) {
            acc = (acc << 6) | v;
            n += 1;
            if n == 4 {
                out.extend_from_slice(&[(acc >> 16) as u8, (acc >> 8) as u8, acc as u8]);
                acc = 0;
                n = 0;
            }
        } else if c.is_ascii_whitespace() {
        } else if c == b'=' || c == b'.' {
            break;
        } else {
            return None;
        }
        i += 1;
    }
    let expected = match n {
        0 => 0,
        1 => return None,
        2 => {
            out.push((acc >> 4) as u8);
            2
        }
        _ => {
            out.extend_from_slice(&[(acc >> 10) as u8, (acc >> 2) as u8]);
            1
        }
    };
    let mut equals = 0;
    for &c in s.get(i..).unwrap_or(&[]) {
        if c == b'=' || c == b'.' {
            equals += 1;
        } else if !c.is_ascii_whitespace() {
            return None;
        }
    }
    (equals == 0 || equals == expected).then_some(out)
}

const STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (Envoy's `Base64::encode`, for list and object claims in
/// headers).
pub fn b64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    let at = |i: u32| char::from(STD.get(i as usize & 63).copied().unwrap_or(b'A'));
    for chunk in data.chunks(3) {
        let b = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let v = (b(0) << 16) | (b(1) << 8) | b(2);
        out.push(at(v >> 18));
        out.push(at(v >> 12));
        out.push(if chunk.len() > 1 { at(v >> 6) } else { '=' });
        out.push(if chunk.len() > 2 { at(v) } else { '=' });
    }
    out
}

// === strict JSON ===

/// Protobuf's JSON parser nests at most this deep (objects and arrays counted alike).
pub const MAX_JSON_DEPTH: usize = 100;

struct Strict {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        if self.depth >= MAX_JSON_DEPTH {
            return Err(de::Error::custom("nested too deeply"));
        }
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Strict { depth: self.depth + 1 })? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        if self.depth >= MAX_JSON_DEPTH {
            return Err(de::Error::custom("nested too deeply"));
        }
        let mut out = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            let v = map.next_value_seed(Strict { depth: self.depth + 1 })?;
            if out.insert(k, v).is_some() {
                return Err(de::Error::custom("duplicate key"));
            }
        }
        Ok(Value::Object(out))
    }
}

/// A JSON object as protobuf's `JsonStringToMessage` into a `Struct` accepts it.
pub fn parse_object(bytes: &[u8]) -> Option<Map<String, Value>> {
    let mut d = serde_json::Deserializer::from_slice(bytes);
    let v = Strict { depth: 0 }.deserialize(&mut d).ok()?;
    d.end().ok()?;
    match v {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

// === claims ===

enum Get<'a> {
    Missing,
    Found(&'a Value),
}

fn get<'a>(m: &'a Map<String, Value>, name: &str) -> Get<'a> {
    m.get(name).map_or(Get::Missing, Get::Found)
}

/// `StructUtils::GetString`: `Ok("")` when missing, `Err` on a non-string.
fn get_string(m: &Map<String, Value>, name: &str) -> Result<String, ()> {
    match get(m, name) {
        Get::Missing => Ok(String::new()),
        Get::Found(Value::String(s)) => Ok(s.clone()),
        Get::Found(_) => Err(()),
    }
}

enum U64Err {
    WrongType,
    OutOfRange,
}

/// `StructUtils::GetUInt64`: a JSON number (protobuf keeps it as a double), truncated.
fn get_u64(m: &Map<String, Value>, name: &str) -> Result<u64, U64Err> {
    match get(m, name) {
        Get::Missing => Ok(0),
        Get::Found(Value::Number(n)) => {
            let d = n.as_f64().unwrap_or(f64::NAN);
            if d.is_nan() || d < 0.0 || d >= u64::MAX as f64 {
                Err(U64Err::OutOfRange)
            } else {
                Ok(d as u64)
            }
        }
        Get::Found(_) => Err(U64Err::WrongType),
    }
}

/// Algorithms jwt_verify_lib implements (`none` is not one of them).
pub const ALGS: [&str; 13] = [
    "ES256", "ES384", "ES512", "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA",
];

/// A parsed (not yet verified) token.
#[derive(Debug, Clone, PartialEq)]
pub struct Jwt {
    pub header_b64: String,
    pub payload_b64: String,
    pub alg: String,
    pub kid: String,
    pub payload: Map<String, Value>,
    pub iss: String,
    pub sub: String,
    pub nbf: u64,
    pub exp: u64,
    pub audiences: Vec<String>,
    pub signature: Vec<u8>,
    /// The payload as the policies see it (normalized for the provider that verified the
    /// token: a cached token belongs to one provider), built once per token, not per request.
    pub normalized: std::cell::OnceCell<std::rc::Rc<Value>>,
}

impl Jwt {
    /// `Jwt::parseFromString`.
    pub fn parse(token: &str) -> Result<Self, Status> {
        let parts: Vec<&str> = token.split('.').filter(|p| !p.is_empty()).collect();
        let [h, p, s] = parts.as_slice() else { return Err(Status::JwtBadFormat) };
        let header = b64url_decode(h.as_bytes()).ok_or(Status::JwtHeaderParseErrorBadBase64)?;
        let header = parse_object(&header).ok_or(Status::JwtHeaderParseErrorBadJson)?;
        let alg = match header.get("alg") {
            Some(Value::String(a)) => a.clone(),
            _ => return Err(Status::JwtHeaderBadAlg),
        };
        if !ALGS.contains(&alg.as_str()) {
            return Err(Status::JwtHeaderNotImplementedAlg);
        }
        let kid = get_string(&header, "kid").map_err(|()| Status::JwtHeaderBadKid)?;
        let payload = b64url_decode(p.as_bytes()).ok_or(Status::JwtPayloadParseErrorBadBase64)?;
        let payload = parse_object(&payload).ok_or(Status::JwtPayloadParseErrorBadJson)?;
        let iss = get_string(&payload, "iss").map_err(|()| Status::JwtPayloadParseErrorIssNotString)?;
        let sub = get_string(&payload, "sub").map_err(|()| Status::JwtPayloadParseErrorSubNotString)?;
        let time = |name, wrong, range| {
            get_u64(&payload, name).map_err(|e| match e {
                U64Err::WrongType => wrong,
                U64Err::OutOfRange => range,
            })
        };
        time("iat", Status::JwtPayloadParseErrorIatNotInteger, Status::JwtPayloadParseErrorIatOutOfRange)?;
        let nbf = time("nbf", Status::JwtPayloadParseErrorNbfNotInteger, Status::JwtPayloadParseErrorNbfOutOfRange)?;
        let exp = time("exp", Status::JwtPayloadParseErrorExpNotInteger, Status::JwtPayloadParseErrorExpOutOfRange)?;
        get_string(&payload, "jti").map_err(|()| Status::JwtPayloadParseErrorJtiNotString)?;
        let audiences = match payload.get("aud") {
            None => Vec::new(),
            Some(Value::String(a)) => vec![a.clone()],
            Some(Value::Array(list)) => {
                let mut out = Vec::new();
                for v in list {
                    match v {
                        Value::String(a) => out.push(a.clone()),
                        _ => return Err(Status::JwtPayloadParseErrorAudNotString),
                    }
                }
                out
            }
            Some(_) => return Err(Status::JwtPayloadParseErrorAudNotString),
        };
        let signature = b64url_decode(s.as_bytes()).ok_or(Status::JwtSignatureParseErrorBadBase64)?;
        Ok(Self {
            header_b64: (*h).to_string(),
            payload_b64: (*p).to_string(),
            alg,
            kid,
            payload,
            iss,
            sub,
            nbf,
            exp,
            audiences,
            signature,
            normalized: std::cell::OnceCell::new(),
        })
    }

    /// `Jwt::verifyTimeConstraint`.
    pub fn check_time(&self, now: u64, skew: u64) -> Status {
        if now.saturating_add(skew) < self.nbf {
            return Status::JwtNotYetValid;
        }
        if self.exp != 0 && now > self.exp.saturating_add(skew) {
            return Status::JwtExpired;
        }
        Status::Ok
    }

    /// The bytes the signature covers.
    pub fn signed_data(&self) -> Vec<u8> {
        let mut d = Vec::with_capacity(self.header_b64.len() + self.payload_b64.len() + 1);
        d.extend_from_slice(self.header_b64.as_bytes());
        d.push(b'.');
        d.extend_from_slice(self.payload_b64.as_bytes());
        d
    }
}

/// jwt_verify_lib's default clock skew.
pub const CLOCK_SKEW_SECONDS: u64 = 60;

/// `sanitizeAudience`: `http://` / `https://` and one trailing `/` do not count.
pub fn sanitize_audience(aud: &str) -> &str {
    if aud.is_empty() {
        return aud;
    }
    let a = aud.strip_prefix("http://").or_else(|| aud.strip_prefix("https://")).unwrap_or(aud);
    a.strip_suffix('/').unwrap_or(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_as_abseil() {
        assert_eq!(b64url_decode(b"YWJj").unwrap(), b"abc");
        assert_eq!(b64url_decode(b"YWI").unwrap(), b"ab");
        assert_eq!(b64url_decode(b"YWI=").unwrap(), b"ab");
        assert_eq!(b64url_decode(b"YQ").unwrap(), b"a");
        assert_eq!(b64url_decode(b"YQ==").unwrap(), b"a");
        assert!(b64url_decode(b"YQ=").is_none());
        assert!(b64url_decode(b"YQ===").is_none());
        assert!(b64url_decode(b"Y").is_none());
        assert!(b64url_decode(b"YW+j").is_none());
        assert_eq!(b64url_decode(b"Y W J j").unwrap(), b"abc");
        assert_eq!(b64url_decode(b"_-8").unwrap(), [0xff, 0xef]);
        assert_eq!(b64_encode(b"ab"), "YWI=");
        assert_eq!(b64_encode(b"abc"), "YWJj");
        assert_eq!(b64_encode(b"a"), "YQ==");
    }

    #[test]
    fn strict_json() {
        assert!(parse_object(br#"{"a":1,"b":[1,{"c":2}]}"#).is_some());
        assert!(parse_object(br#"{"a":1,"a":2}"#).is_none());
        assert!(parse_object(b"[]").is_none());
        assert!(parse_object(br#"{"a":1} x"#).is_none());
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(parse_object(format!("{{\"a\":{}}}", deep(MAX_JSON_DEPTH - 1)).as_bytes()).is_some());
        assert!(parse_object(format!("{{\"a\":{}}}", deep(MAX_JSON_DEPTH)).as_bytes()).is_none());
    }

    fn tok(h: &str, p: &str) -> String {
        let e = |s: &str| b64_encode(s.as_bytes()).trim_end_matches('=').replace('+', "-").replace('/', "_");
        format!("{}.{}.c2ln", e(h), e(p))
    }

    #[test]
    fn parse_statuses() {
        let ok = tok(r#"{"alg":"RS256","kid":"k"}"#, r#"{"iss":"i","sub":"s","exp":10,"aud":["a","b"]}"#);
        let j = Jwt::parse(&ok).unwrap();
        assert_eq!((j.alg.as_str(), j.kid.as_str(), j.iss.as_str(), j.exp), ("RS256", "k", "i", 10));
        assert_eq!(j.audiences, ["a", "b"]);
        let cases = [
            ("a.b", Status::JwtBadFormat),
            (&tok(r#"{"alg":"none"}"#, "{}"), Status::JwtHeaderNotImplementedAlg),
            (&tok(r#"{"alg":1}"#, "{}"), Status::JwtHeaderBadAlg),
            (&tok(r#"{"alg":"RS256","kid":2}"#, "{}"), Status::JwtHeaderBadKid),
            (&tok(r#"{"alg":"RS256"}"#, r#"{"iss":1}"#), Status::JwtPayloadParseErrorIssNotString),
            (&tok(r#"{"alg":"RS256"}"#, r#"{"exp":"1"}"#), Status::JwtPayloadParseErrorExpNotInteger),
            (&tok(r#"{"alg":"RS256"}"#, r#"{"exp":-1}"#), Status::JwtPayloadParseErrorExpOutOfRange),
            (&tok(r#"{"alg":"RS256"}"#, r#"{"aud":[1]}"#), Status::JwtPayloadParseErrorAudNotString),
            (&tok(r#"{"alg":"RS256"}"#, r#"{"a":1,"a":1}"#), Status::JwtPayloadParseErrorBadJson),
            (&tok(r#"{"alg":"RS256"}"#, "[1]"), Status::JwtPayloadParseErrorBadJson),
        ];
        for (t, want) in cases {
            assert_eq!(Jwt::parse(t).err(), Some(want), "{t}");
        }
        // Empty sections are skipped (absl::SkipEmpty): `h..p.s` has three.
        let parts: Vec<&str> = ok.split('.').collect();
        let odd = format!("{}..{}.{}", parts[0], parts[1], parts[2]);
        assert!(Jwt::parse(&odd).is_ok());
    }

    #[test]
    fn time_window_with_skew() {
        let mut j = Jwt::parse(&tok(r#"{"alg":"RS256"}"#, "{}")).unwrap();
        j.exp = 1000;
        assert_eq!(j.check_time(1060, 60), Status::Ok);
        assert_eq!(j.check_time(1061, 60), Status::JwtExpired);
        j.nbf = 2000;
        j.exp = 0;
        assert_eq!(j.check_time(1940, 60), Status::Ok);
        assert_eq!(j.check_time(1939, 60), Status::JwtNotYetValid);
    }

    #[test]
    fn audiences_sanitized() {
        assert_eq!(sanitize_audience("https://a.com/"), "a.com");
        assert_eq!(sanitize_audience("http://a.com"), "a.com");
        assert_eq!(sanitize_audience("a.com/"), "a.com");
        assert_eq!(sanitize_audience("a.com//"), "a.com/");
    }
}
