//! The rate-limit service protocol (`envoy.service.ratelimit.v3.RateLimitService`), encoded
//! and decoded by hand: the two messages we need, not a protobuf runtime in the module.

use meshwasm_sdk_ext::proto::{put_bytes, put_uint, Reader};

pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
pub const METHOD: &str = "ShouldRateLimit";

/// `RateLimitResponse.Code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Unknown,
    Ok,
    OverLimit,
}

impl Code {
    fn from_wire(v: u64) -> Self {
        match v {
            1 => Code::Ok,
            2 => Code::OverLimit,
            _ => Code::Unknown,
        }
    }
}

/// `RateLimitResponse.DescriptorStatus`, the fields we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescriptorStatus {
    pub code: Code,
    pub requests_per_unit: Option<u32>,
    pub limit_remaining: u32,
    /// `duration_until_reset`, whole seconds rounded up.
    pub reset_secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub overall: Code,
    pub statuses: Vec<DescriptorStatus>,
    pub response_headers: Vec<(String, String)>,
    pub request_headers: Vec<(String, String)>,
}

/// `RateLimitRequest { domain = 1; repeated RateLimitDescriptor descriptors = 2; hits_addend = 3 }`
/// with `RateLimitDescriptor { repeated Entry entries = 1 }`, `Entry { key = 1; value = 2 }`.
pub fn encode_request(domain: &str, descriptors: &[Vec<(String, String)>], hits_addend: u32) -> Vec<u8> {
    let mut out = Vec::new();
    put_bytes(1, domain.as_bytes(), &mut out);
    for d in descriptors {
        let mut desc = Vec::new();
        for (k, v) in d {
            let mut entry = Vec::new();
            put_bytes(1, k.as_bytes(), &mut entry);
            put_bytes(2, v.as_bytes(), &mut entry);
            put_bytes(1, &entry, &mut desc);
        }
        put_bytes(2, &desc, &mut out);
    }
    put_uint(3, u64::from(hits_addend), &mut out);
    out
}

/// Decode a `RateLimitResponse`. Anything malformed is an error (the caller applies the
/// failure mode); unknown fields are skipped.
pub fn decode_response(bytes: &[u8]) -> Result<Response, String> {
    let mut r = Reader::new(bytes);
    let mut resp = Response {
        overall: Code::Unknown,
        statuses: Vec::new(),
        response_headers: Vec::new(),
        request_headers: Vec::new(),
    };
    while let Some((field, wire)) = r.key()? {
        match (field, wire) {
            (1, 0) => resp.overall = Code::from_wire(r.varint()?),
            (2, 2) => resp.statuses.push(decode_status(r.bytes()?)?),
            (3, 2) => resp.response_headers.push(decode_header(r.bytes()?)?),
            (4, 2) => resp.request_headers.push(decode_header(r.bytes()?)?),
            (_, w) => r.skip(w)?,
        }
    }
    Ok(resp)
}

fn decode_status(bytes: &[u8]) -> Result<DescriptorStatus, String> {
    let mut r = Reader::new(bytes);
    let mut s = DescriptorStatus { code: Code::Unknown, requests_per_unit: None, limit_remaining: 0, reset_secs: None };
    while let Some((field, wire)) = r.key()? {
        match (field, wire) {
            (1, 0) => s.code = Code::from_wire(r.varint()?),
            (2, 2) => {
                // RateLimit { requests_per_unit = 1; unit = 2; name = 3 }
                let mut l = Reader::new(r.bytes()?);
                let mut rpu = 0;
                while let Some((f, w)) = l.key()? {
                    match (f, w) {
                        (1, 0) => rpu = u32::try_from(l.varint()?).unwrap_or(u32::MAX),
                        (_, w) => l.skip(w)?,
                    }
                }
                s.requests_per_unit = Some(rpu);
            }
            (3, 0) => s.limit_remaining = u32::try_from(r.varint()?).unwrap_or(u32::MAX),
            (4, 2) => {
                // google.protobuf.Duration { int64 seconds = 1; int32 nanos = 2 }
                let mut d = Reader::new(r.bytes()?);
                let (mut secs, mut nanos) = (0u64, 0u64);
                while let Some((f, w)) = d.key()? {
                    match (f, w) {
                        (1, 0) => secs = d.varint()?,
                        (2, 0) => nanos = d.varint()?,
                        (_, w) => d.skip(w)?,
                    }
                }
                // Negative values (two's complement varints) read as huge: treat them as 0.
                let secs = if secs > i64::MAX as u64 { 0 } else { secs };
                s.reset_secs = Some(secs.saturating_add(u64::from(nanos > 0 && nanos < 1_000_000_000)));
            }
            (_, w) => r.skip(w)?,
        }
    }
    Ok(s)
}

/// `envoy.config.core.v3.HeaderValue { key = 1; value = 2; raw_value = 3 }`.
fn decode_header(bytes: &[u8]) -> Result<(String, String), String> {
    let mut r = Reader::new(bytes);
    let (mut k, mut v) = (String::new(), String::new());
    while let Some((field, wire)) = r.key()? {
        match (field, wire) {
            (1, 2) => k = r.string()?,
            (2, 2) | (3, 2) => v = r.string()?,
            (_, w) => r.skip(w)?,
        }
    }
    if k.is_empty() || !valid_header_name(&k) || v.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f) {
        return Err(format!("invalid header {k:?} in the service's reply"));
    }
    Ok((k.to_ascii_lowercase(), v))
}

fn valid_header_name(k: &str) -> bool {
    k.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_encoding() {
        let b = encode_request("d", &[vec![("k".into(), "v".into())]], 1);
        assert_eq!(b, [0x0a, 1, b'd', 0x12, 8, 0x0a, 6, 0x0a, 1, b'k', 0x12, 1, b'v', 0x18, 1]);
    }

    #[test]
    fn response_decoding() {
        // overall OVER_LIMIT; one status {code OVER_LIMIT, limit {rpu 5}, remaining 0, reset 1.5s};
        // a response header x-a: 1.
        let mut status = vec![0x08, 2, 0x12, 2, 0x08, 5, 0x18, 0, 0x22, 5, 0x08, 1, 0x10, 0x80, 0x01];
        status.truncate(status.len());
        let mut msg = vec![0x08, 2];
        msg.extend([0x12, status.len() as u8]);
        msg.extend(&status);
        msg.extend([0x1a, 7, 0x0a, 3, b'x', b'-', b'a', 0x12, 0]);
        let r = decode_response(&msg).unwrap();
        assert_eq!(r.overall, Code::OverLimit);
        assert_eq!(
            r.statuses,
            [DescriptorStatus {
                code: Code::OverLimit,
                requests_per_unit: Some(5),
                limit_remaining: 0,
                reset_secs: Some(2)
            }]
        );
        assert_eq!(r.response_headers, [("x-a".to_string(), String::new())]);
        assert!(decode_response(&[0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(decode_response(&[0x1a, 4, 0x0a, 2, b'a', b'\n']).is_err(), "bad header name");
    }

    proptest! {
        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = decode_response(&b);
        }
    }
}
