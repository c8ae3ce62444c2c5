//! A minimal protobuf wire-format writer and reader: enough for the few messages meshwasm
//! exchanges with Envoy and side services (route metadata, the rate-limit service protocol,
//! `GrpcService`), without a code generator or a protobuf runtime in the module.
//!
//! The reader never panics: truncated or malformed input is an `Err`.

/// Append a varint.
pub fn put_varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// Append a length-delimited field (string, bytes, embedded message).
pub fn put_bytes(field: u64, data: &[u8], out: &mut Vec<u8>) {
    put_varint(field << 3 | 2, out);
    put_varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// Append a varint field (uint32/uint64/enum/bool). Zero is the proto3 default and is
/// omitted, as a protobuf encoder does.
pub fn put_uint(field: u64, v: u64, out: &mut Vec<u8>) {
    if v != 0 {
        put_varint(field << 3, out);
        put_varint(v, out);
    }
}

/// Reads fields one by one: `while let Some((field, wire)) = r.key()? { … }`.
pub struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self(bytes)
    }
    pub fn varint(&mut self) -> Result<u64, String> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let (&b, rest) = self.0.split_first().ok_or("truncated varint")?;
            self.0 = rest;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }
    /// The next field's number and wire type; `None` at the end.
    pub fn key(&mut self) -> Result<Option<(u64, u8)>, String> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let k = self.varint()?;
        Ok(Some((k >> 3, (k & 7) as u8)))
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.0.len() {
            return Err("truncated field".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    pub fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = usize::try_from(self.varint()?).map_err(|_| "length overflow")?;
        self.take(n)
    }
    pub fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| "invalid UTF-8 in a string field".to_string())
    }
    pub fn fixed64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let arr: [u8; 8] = b.try_into().map_err(|_| "truncated fixed64")?;
        Ok(u64::from_le_bytes(arr))
    }
    pub fn skip(&mut self, wire: u8) -> Result<(), String> {
        match wire {
            0 => self.varint().map(drop),
            1 => self.take(8).map(drop),
            2 => self.bytes().map(drop),
            5 => self.take(4).map(drop),
            w => Err(format!("unsupported wire type {w}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let mut out = Vec::new();
        put_bytes(1, b"abc", &mut out);
        put_uint(3, 300, &mut out);
        put_uint(4, 0, &mut out);
        let mut r = Reader::new(&out);
        assert_eq!(r.key().unwrap(), Some((1, 2)));
        assert_eq!(r.string().unwrap(), "abc");
        assert_eq!(r.key().unwrap(), Some((3, 0)));
        assert_eq!(r.varint().unwrap(), 300);
        assert_eq!(r.key().unwrap(), None);
    }

    #[test]
    fn truncation_is_an_error() {
        let mut r = Reader::new(&[0x0a, 0x05, b'a']);
        assert_eq!(r.key().unwrap(), Some((1, 2)));
        assert!(r.bytes().is_err());
        assert!(Reader::new(&[0xff; 11]).varint().is_err());
    }
}
