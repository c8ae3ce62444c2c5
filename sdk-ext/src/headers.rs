//! A header map as one buffer: `Host::header_block` returns the pairs as views into a single
//! string instead of two owned `String`s per header. Reading a map this way costs one
//! allocation for the text and one for the spans, where the owned pairs cost two per header;
//! in the VM the parse into owned pairs cost as much as the hostcall itself
//! (docs/sdk-ext.md#what-a-hostcall-costs).

use std::borrow::Cow;

/// The pairs of a header map in Envoy's order, as `&str` views. Bytes that are not UTF-8
/// are replaced (U+FFFD) as `Host::headers` does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    text: String,
    /// (key start, key end, value end) into `text`; the value starts where the key ends.
    spans: Vec<(u32, u32, u32)>,
}

impl Headers {
    /// From owned pairs (what a fake host or a filter's own edits hold).
    pub fn from_pairs(pairs: &[(String, String)]) -> Self {
        let mut h = Headers::with_capacity(pairs.iter().map(|(k, v)| k.len() + v.len()).sum(), pairs.len());
        for (k, v) in pairs {
            h.push(k, v);
        }
        h
    }

    /// From Proxy-Wasm's serialized pairs (`proxy_get_header_map_pairs`): a u32 count, then
    /// (key length, value length) u32 pairs, then each key and value NUL-terminated. A
    /// truncated buffer yields the pairs before the damage.
    pub fn from_serialized(b: &[u8]) -> Self {
        let read_u32 = |at: usize| -> Option<usize> {
            let s = b.get(at..at.checked_add(4)?)?;
            Some(u32::from_le_bytes(s.try_into().ok()?) as usize)
        };
        let Some(n) = read_u32(0) else { return Headers::default() };
        let mut h = Headers::with_capacity(b.len(), n.min(b.len() / 8));
        let mut sizes = 4usize;
        let mut data = n.saturating_mul(8).saturating_add(4);
        for _ in 0..n {
            let (Some(ks), Some(vs)) = (read_u32(sizes), read_u32(sizes + 4)) else { break };
            sizes += 8;
            let k = data.checked_add(ks).and_then(|end| b.get(data..end));
            data = data.saturating_add(ks).saturating_add(1);
            let v = data.checked_add(vs).and_then(|end| b.get(data..end));
            data = data.saturating_add(vs).saturating_add(1);
            let (Some(k), Some(v)) = (k, v) else { break };
            h.push(&String::from_utf8_lossy(k), &String::from_utf8_lossy(v));
        }
        h
    }

    fn with_capacity(text: usize, pairs: usize) -> Self {
        Headers { text: String::with_capacity(text), spans: Vec::with_capacity(pairs) }
    }

    fn push(&mut self, k: &str, v: &str) {
        let at = |s: &String| u32::try_from(s.len()).unwrap_or(u32::MAX);
        let start = at(&self.text);
        self.text.push_str(k);
        let key_end = at(&self.text);
        self.text.push_str(v);
        self.spans.push((start, key_end, at(&self.text)));
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Every (name, value), in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.spans.iter().map(|&(s, k, e)| {
            (self.text.get(s as usize..k as usize).unwrap_or(""), self.text.get(k as usize..e as usize).unwrap_or(""))
        })
    }

    /// The first value of `name` (exact, as Envoy's names are lower case).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    /// `name`'s values (ASCII case-insensitive), a repeated header's joined with `,` as
    /// Envoy's matchers read it (`getAllOfHeaderAsString`); borrowed unless it repeats.
    pub fn joined(&self, name: &str) -> Option<Cow<'_, str>> {
        let mut values = self.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v);
        let first = values.next()?;
        let Some(second) = values.next() else { return Some(Cow::Borrowed(first)) };
        let mut joined = format!("{first},{second}");
        for v in values {
            joined.push(',');
            joined.push_str(v);
        }
        Some(Cow::Owned(joined))
    }

    /// Owned pairs (for code that edits them).
    pub fn to_vec(&self) -> Vec<(String, String)> {
        self.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }
}

/// From (name, value) views (a filter's edited copy of a map).
impl<'a> FromIterator<(&'a str, &'a str)> for Headers {
    fn from_iter<I: IntoIterator<Item = (&'a str, &'a str)>>(pairs: I) -> Self {
        let mut h = Headers::default();
        for (k, v) in pairs {
            h.push(k, v);
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn serialize(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        let mut b = (pairs.len() as u32).to_le_bytes().to_vec();
        for (k, v) in pairs {
            b.extend((k.len() as u32).to_le_bytes());
            b.extend((v.len() as u32).to_le_bytes());
        }
        for (k, v) in pairs {
            b.extend(k);
            b.push(0);
            b.extend(v);
            b.push(0);
        }
        b
    }

    #[test]
    fn views_joined_values_and_lossy_bytes() {
        let h = Headers::from_serialized(&serialize(&[
            (b":path".to_vec(), b"/x".to_vec()),
            (b"x-a".to_vec(), b"1".to_vec()),
            (b"X-A".to_vec(), b"".to_vec()),
            (b"x-a".to_vec(), b"3".to_vec()),
            (b"x-bin".to_vec(), vec![0xff, b'z']),
        ]));
        assert_eq!(h.len(), 5);
        assert_eq!(h.get(":path"), Some("/x"));
        assert_eq!(h.joined("x-a").as_deref(), Some("1,,3"));
        assert!(matches!(h.joined(":path"), Some(Cow::Borrowed("/x"))));
        assert_eq!(h.joined("absent"), None);
        assert_eq!(h.get("x-bin"), Some("\u{fffd}z"));
        assert_eq!(Headers::from_pairs(&h.to_vec()), h);
    }

    #[test]
    fn truncated_or_hostile_buffers_give_the_pairs_before_the_damage() {
        let full = serialize(&[(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"2".to_vec())]);
        for cut in 0..full.len() {
            let h = Headers::from_serialized(full.get(..cut).unwrap_or_default());
            assert!(h.len() <= 2);
        }
        let mut huge = u32::MAX.to_le_bytes().to_vec();
        huge.extend(u32::MAX.to_le_bytes());
        huge.extend(u32::MAX.to_le_bytes());
        assert!(Headers::from_serialized(&huge).is_empty());
    }

    proptest! {
        /// Equal to the owned parse (`wasm::deserialize_pairs`'s rules) on any pairs.
        #[test]
        fn same_pairs_as_the_owned_parse(pairs in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..8), proptest::collection::vec(any::<u8>(), 0..8)), 0..6)) {
            let h = Headers::from_serialized(&serialize(&pairs));
            let owned: Vec<(String, String)> = pairs.iter().map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), String::from_utf8_lossy(v).into_owned())).collect();
            prop_assert_eq!(h.to_vec(), owned);
        }
    }
}
