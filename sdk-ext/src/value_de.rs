//! A path-tracking `serde` deserializer over a borrowed `serde_json::Value`.
//!
//! It replaces `serde_json::from_value` wrapped in `serde_path_to_error`: the wrapper doubles
//! every visitor of every configuration type (its `Wrap<X>` layer around serde_json's own
//! `&Value` deserializer), which cost 78 KiB of the 399 KiB `authz.wasm` after wasm-opt.
//! Here the path travels in the error instead: each sequence element, map entry and enum
//! variant adds its segment to an error passing out of it, so the code is instantiated once per
//! visitor. Behaviour matches the pair it replaces: the same paths (`rules[1].httpStatuss` for
//! an unknown field, the enclosing object for a missing one) and serde_json's messages, except
//! that a float in the wrong place is reported as `floating point number` without its value
//! (keeps float formatting out of the module).

use std::fmt;

use serde::de::{self, DeserializeSeed, Expected, IntoDeserializer, Unexpected, Visitor};
use serde::forward_to_deserialize_any;
use serde_json::{Number, Value};

/// One step of the path to the value an error is about.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// A deserialization error with the path (outermost first once finished) where it arose.
#[derive(Debug)]
pub struct Error {
    message: String,
    /// Innermost first while the error travels outwards.
    segments: Vec<Segment>,
}

impl Error {
    fn at(mut self, segment: Segment) -> Self {
        self.segments.push(segment);
        self
    }

    /// The message without the path.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The path as `serde_path_to_error` prints it: `a.b[2].c`; empty at the root.
    pub fn path(&self) -> String {
        let mut out = String::new();
        for s in self.segments.iter().rev() {
            match s {
                Segment::Key(k) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(k);
                }
                Segment::Index(i) => {
                    out.push('[');
                    out.push_str(&i.to_string());
                    out.push(']');
                }
            }
        }
        out
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// serde_json's wording for an unexpected value: `null` for unit, and floats without their
/// digits (see the module comment).
struct JsonUnexpected<'a>(Unexpected<'a>);

impl fmt::Display for JsonUnexpected<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // serde's own wording, spelled out here so that its `Float` arm (float formatting,
        // 14 KiB in the module) is not linked.
        match self.0 {
            Unexpected::Bool(b) => write!(f, "boolean `{b}`"),
            Unexpected::Unsigned(i) => write!(f, "integer `{i}`"),
            Unexpected::Signed(i) => write!(f, "integer `{i}`"),
            Unexpected::Float(_) => f.write_str("floating point number"),
            Unexpected::Char(c) => write!(f, "character `{c}`"),
            Unexpected::Str(s) => write!(f, "string {s:?}"),
            Unexpected::Bytes(_) => f.write_str("byte array"),
            Unexpected::Unit => f.write_str("null"),
            Unexpected::Option => f.write_str("Option value"),
            Unexpected::NewtypeStruct => f.write_str("newtype struct"),
            Unexpected::Seq => f.write_str("sequence"),
            Unexpected::Map => f.write_str("map"),
            Unexpected::Enum => f.write_str("enum"),
            Unexpected::UnitVariant => f.write_str("unit variant"),
            Unexpected::NewtypeVariant => f.write_str("newtype variant"),
            Unexpected::TupleVariant => f.write_str("tuple variant"),
            Unexpected::StructVariant => f.write_str("struct variant"),
            Unexpected::Other(other) => f.write_str(other),
        }
    }
}

impl de::Error for Error {
    #[cold]
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error { message: msg.to_string(), segments: Vec::new() }
    }

    #[cold]
    fn invalid_type(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        Self::custom(format_args!("invalid type: {}, expected {}", JsonUnexpected(unexp), exp))
    }

    #[cold]
    fn invalid_value(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        Self::custom(format_args!("invalid value: {}, expected {}", JsonUnexpected(unexp), exp))
    }
}

/// Deserialize `T` from `value`, the error naming the path.
pub fn from_value<'de, T: de::Deserialize<'de>>(value: &'de Value) -> Result<T, Error> {
    T::deserialize(ValueDe(value))
}

#[derive(Clone, Copy)]
struct ValueDe<'de>(&'de Value);

fn visit_number<'de, V: Visitor<'de>>(n: &Number, visitor: V) -> Result<V::Value, Error> {
    if let Some(u) = n.as_u64() {
        visitor.visit_u64(u)
    } else if let Some(i) = n.as_i64() {
        visitor.visit_i64(i)
    } else {
        visitor.visit_f64(n.as_f64().unwrap_or(f64::NAN))
    }
}

fn unexpected(v: &Value) -> Unexpected<'_> {
    match v {
        Value::Null => Unexpected::Unit,
        Value::Bool(b) => Unexpected::Bool(*b),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => Unexpected::Unsigned(u),
            (None, Some(i)) => Unexpected::Signed(i),
            _ => Unexpected::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Unexpected::Str(s),
        Value::Array(_) => Unexpected::Seq,
        Value::Object(_) => Unexpected::Map,
    }
}

impl<'de> de::Deserializer<'de> for ValueDe<'de> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => visit_number(n, visitor),
            Value::String(s) => visitor.visit_borrowed_str(s),
            Value::Array(a) => {
                let mut seq = SeqDe { iter: a.iter(), index: 0 };
                let out = visitor.visit_seq(&mut seq)?;
                if seq.iter.len() == 0 {
                    Ok(out)
                } else {
                    Err(de::Error::invalid_length(a.len(), &"fewer elements in array"))
                }
            }
            Value::Object(m) => {
                let mut map = MapDe { iter: m.iter(), value: None };
                let out = visitor.visit_map(&mut map)?;
                if map.iter.len() == 0 {
                    Ok(out)
                } else {
                    Err(de::Error::invalid_length(m.len(), &"fewer elements in map"))
                }
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            other => Err(de::Error::invalid_type(unexpected(other), &visitor)),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.0 {
            Value::String(s) => visitor.visit_enum(s.as_str().into_deserializer()),
            Value::Object(m) => match (m.len(), m.iter().next()) {
                (1, Some((k, v))) => visitor.visit_enum(EnumDe { variant: k, value: v }),
                _ => Err(de::Error::invalid_value(Unexpected::Map, &"map with a single key")),
            },
            other => Err(de::Error::invalid_type(unexpected(other), &"string or map")),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit_struct seq tuple tuple_struct map struct identifier
    }
}

struct SeqDe<'de> {
    iter: std::slice::Iter<'de, Value>,
    index: usize,
}

impl<'de> de::SeqAccess<'de> for SeqDe<'de> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Error> {
        let Some(v) = self.iter.next() else { return Ok(None) };
        let i = self.index;
        self.index += 1;
        seed.deserialize(ValueDe(v)).map(Some).map_err(|e| e.at(Segment::Index(i)))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

struct MapDe<'de> {
    iter: serde_json::map::Iter<'de>,
    value: Option<(&'de String, &'de Value)>,
}

impl<'de> de::MapAccess<'de> for MapDe<'de> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
        let Some((k, v)) = self.iter.next() else { return Ok(None) };
        self.value = Some((k, v));
        // An unknown field is an error about the key: its path names it.
        seed.deserialize(KeyDe(k)).map(Some).map_err(|e| e.at(Segment::Key(k.clone())))
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, Error> {
        match self.value.take() {
            Some((k, v)) => seed.deserialize(ValueDe(v)).map_err(|e| e.at(Segment::Key(k.clone()))),
            None => Err(de::Error::custom("value is missing")),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

/// A map key: a borrowed string (configuration maps are keyed by strings).
struct KeyDe<'de>(&'de str);

impl<'de> de::Deserializer<'de> for KeyDe<'de> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_borrowed_str(self.0)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

struct EnumDe<'de> {
    variant: &'de str,
    value: &'de Value,
}

impl<'de> de::EnumAccess<'de> for EnumDe<'de> {
    type Error = Error;
    type Variant = VariantDe<'de>;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, VariantDe<'de>), Error> {
        // An unknown variant is reported at the enum's path, the variant's content below it.
        let v = seed.deserialize(KeyDe(self.variant))?;
        Ok((v, VariantDe(self.variant, self.value)))
    }
}

struct VariantDe<'de>(&'de str, &'de Value);

impl VariantDe<'_> {
    fn within(&self, e: Error) -> Error {
        e.at(Segment::Key(self.0.to_string()))
    }
}

impl<'de> de::VariantAccess<'de> for VariantDe<'de> {
    type Error = Error;

    fn unit_variant(self) -> Result<(), Error> {
        de::Deserialize::deserialize(ValueDe(self.1)).map_err(|e| self.within(e))
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Error> {
        seed.deserialize(ValueDe(self.1)).map_err(|e| self.within(e))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_any(ValueDe(self.1), visitor).map_err(|e| self.within(e))
    }

    fn struct_variant<V: Visitor<'de>>(self, _fields: &'static [&'static str], visitor: V) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_any(ValueDe(self.1), visitor).map_err(|e| self.within(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;
    use std::collections::BTreeMap;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct Inner {
        http_status: u32,
        #[serde(default)]
        tags: BTreeMap<String, String>,
        kind: Option<Kind>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "camelCase")]
    enum Kind {
        Plain,
        Weighted(u32),
        Named { name: String },
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        rules: Vec<Inner>,
        ratio: Option<f64>,
    }

    fn err(v: Value) -> (String, String) {
        let e = from_value::<Outer>(&v).unwrap_err();
        (e.path(), e.message().to_string())
    }

    #[test]
    fn reads_what_serde_json_reads() {
        let v = json!({"rules": [
            {"httpStatus": 503, "tags": {"a": "b"}, "kind": "plain"},
            {"httpStatus": 1, "kind": {"weighted": 7}},
            {"httpStatus": 2, "kind": {"named": {"name": "x"}}, "tags": {}}
        ], "ratio": 1});
        let ours: Outer = from_value(&v).unwrap();
        let theirs: Outer = serde_json::from_value(v).unwrap();
        assert_eq!(ours, theirs);
        assert_eq!(ours.ratio, Some(1.0));
    }

    #[test]
    fn paths_and_messages_match_serde_path_to_error() {
        let cases = [
            json!({"rules": [{"httpStatus": 1}, {"httpStatuss": 2}]}),
            json!({"rules": [{"httpStatus": "x"}]}),
            json!({"rules": [{"httpStatus": 70000000000u64}]}),
            json!({"rules": [{"httpStatus": -1}]}),
            json!({"rules": [{"httpStatus": null}]}),
            json!({"rules": [{}]}),
            json!({"rules": {}}),
            json!({"rules": [{"httpStatus": 1, "tags": {"a": 1}}]}),
            json!({"rules": [{"httpStatus": 1, "kind": "other"}]}),
            json!({"rules": [{"httpStatus": 1, "kind": {"other": 1}}]}),
            json!({"rules": [{"httpStatus": 1, "kind": {"plain": 1}}]}),
            json!({"rules": [{"httpStatus": 1, "kind": 3}]}),
            json!({"rules": [{"httpStatus": 1, "kind": {"weighted": "x"}}]}),
            json!({"rules": [{"httpStatus": 1, "kind": {"named": {"nam": "x"}}}]}),
            json!({"rules": [{"httpStatus": 1, "kind": {"plain": null, "weighted": 1}}]}),
            json!({"rules": [], "ratio": "x"}),
            json!({"rules": [], "extra": true}),
            json!([1]),
            json!(null),
        ];
        for v in cases {
            let (path, message) = err(v.clone());
            let theirs = serde_path_to_error::deserialize::<_, Outer>(&v).unwrap_err();
            let their_path = theirs.path().to_string();
            let their_path = if their_path == "." { String::new() } else { their_path };
            assert_eq!(path, their_path, "{v}");
            assert_eq!(message, theirs.inner().to_string(), "{v}");
        }
    }

    #[test]
    fn float_where_integer_expected() {
        let (path, message) = err(json!({"rules": [{"httpStatus": 1.5}]}));
        assert_eq!(path, "rules[0].httpStatus");
        assert_eq!(message, "invalid type: floating point number, expected u32");
    }
}
