//! The peer certificate's subject alternative names, from the URL-encoded PEM Envoy exposes
//! as `connection.peer_certificate`. Envoy's `authenticated` matcher tries every URI SAN,
//! then every DNS SAN, then the subject; the single-value attributes
//! (`connection.uri_san_peer_certificate`) hold only the first of each, so the filter reads
//! the certificate itself. Envoy has already verified the certificate; this is a bounded
//! DER walk that returns `None` on anything it does not understand (no panics).

/// URI and DNS SANs of a PEM certificate (URL-encoded or plain).
pub fn sans(pem: &[u8]) -> Option<(Vec<String>, Vec<String>)> {
    let decoded = url_decode(pem);
    let text = std::str::from_utf8(&decoded).ok()?;
    let start = text.find("-----BEGIN CERTIFICATE-----")? + "-----BEGIN CERTIFICATE-----".len();
    let end = text.get(start..)?.find("-----END CERTIFICATE-----")? + start;
    let der = base64(text.get(start..end)?)?;
    sans_der(&der)
}

fn url_decode(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b.get(i).copied().unwrap_or(0);
        if c == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(v) = hex {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    out
}

/// Standard base64 (with padding, whitespace ignored).
fn base64(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b'\r' | b'\n' | b' ' | b'\t' => continue,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// One DER TLV: (tag, contents, rest).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)?;
    let (len, hdr) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | usize::from(*b.get(2 + i)?);
        }
        (len, 2 + n)
    };
    let body = b.get(hdr..hdr.checked_add(len)?)?;
    Some((tag, body, b.get(hdr + len..)?))
}

const SAN_OID: &[u8] = &[0x55, 0x1d, 0x11]; // 2.5.29.17

fn sans_der(der: &[u8]) -> Option<(Vec<String>, Vec<String>)> {
    let (_, cert, _) = tlv(der)?; // Certificate
    let (_, tbs, _) = tlv(cert)?; // TBSCertificate
    let mut rest = tbs;
    // Walk TBSCertificate's fields to the [3] extensions.
    while !rest.is_empty() {
        let (tag, body, next) = tlv(rest)?;
        rest = next;
        if tag != 0xa3 {
            continue;
        }
        let (_, mut exts, _) = tlv(body)?; // SEQUENCE OF Extension
        while !exts.is_empty() {
            let (_, ext, next) = tlv(exts)?;
            exts = next;
            let (_, oid, mut fields) = tlv(ext)?;
            if oid != SAN_OID {
                continue;
            }
            // Optional BOOLEAN critical, then OCTET STRING extnValue.
            let (mut tag, mut value, more) = tlv(fields)?;
            if tag == 0x01 {
                fields = more;
                (tag, value, _) = tlv(fields)?;
            }
            if tag != 0x04 {
                return None;
            }
            let (_, mut names, _) = tlv(value)?; // GeneralNames
            let (mut uris, mut dns) = (Vec::new(), Vec::new());
            while !names.is_empty() {
                let (t, v, next) = tlv(names)?;
                names = next;
                let s = String::from_utf8_lossy(v).into_owned();
                match t {
                    0x86 => uris.push(s),
                    0x82 => dns.push(s),
                    _ => {}
                }
            }
            return Some((uris, dns));
        }
        return Some((Vec::new(), Vec::new()));
    }
    Some((Vec::new(), Vec::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_never_panics() {
        for input in [&b""[..], b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----", b"%zz%4", b"\xff\xfe"] {
            let _ = sans(input);
        }
        assert_eq!(base64("QUJD"), Some(b"ABC".to_vec()));
        assert_eq!(url_decode(b"a%2Fb%"), b"a/b%".to_vec());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_der_is_safe(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = sans_der(&b);
        }
    }
}
