//! Decoding Envoy property values: integers are 8 little-endian bytes, strings are raw,
//! protobuf messages (like `xds.route_metadata`) are their binary encoding.

use serde_json::{Map, Number, Value};

use crate::proto::{put_bytes, Reader};

pub fn decode_int(b: &[u8]) -> Option<i64> {
    let arr: [u8; 8] = b.try_into().ok()?;
    Some(i64::from_le_bytes(arr))
}

/// Decode a serialized `envoy.config.core.v3.Metadata` and return
/// `filter_metadata[namespace]` as JSON (a `google.protobuf.Struct`).
pub fn metadata_namespace(bytes: &[u8], namespace: &str) -> Result<Option<Value>, String> {
    // Metadata { map<string, Struct> filter_metadata = 1; ... }
    let mut r = Reader::new(bytes);
    while let Some((field, wire)) = r.key()? {
        if field == 1 && wire == 2 {
            // map entry { string key = 1; Struct value = 2; }
            let mut entry = Reader::new(r.bytes()?);
            let mut key = None;
            let mut value = None;
            while let Some((f, w)) = entry.key()? {
                match (f, w) {
                    (1, 2) => key = Some(entry.bytes()?),
                    (2, 2) => value = Some(entry.bytes()?),
                    _ => entry.skip(w)?,
                }
            }
            if key == Some(namespace.as_bytes()) {
                return decode_struct(value.unwrap_or_default(), 0).map(Some);
            }
        } else {
            r.skip(wire)?;
        }
    }
    Ok(None)
}

/// Nesting bound: route metadata is operator input, but a deep structure must not exhaust the stack.
const MAX_DEPTH: usize = 32;

fn decode_struct(bytes: &[u8], depth: usize) -> Result<Value, String> {
    if depth > MAX_DEPTH {
        return Err(format!("metadata nested deeper than {MAX_DEPTH} levels"));
    }
    // Struct { map<string, Value> fields = 1; }
    let mut r = Reader::new(bytes);
    let mut map = Map::new();
    while let Some((field, wire)) = r.key()? {
        if field == 1 && wire == 2 {
            let mut entry = Reader::new(r.bytes()?);
            let mut key = String::new();
            let mut value = Value::Null;
            while let Some((f, w)) = entry.key()? {
                match (f, w) {
                    (1, 2) => key = String::from_utf8(entry.bytes()?.to_vec()).map_err(|e| e.to_string())?,
                    (2, 2) => value = decode_value(entry.bytes()?, depth + 1)?,
                    _ => entry.skip(w)?,
                }
            }
            map.insert(key, value);
        } else {
            r.skip(wire)?;
        }
    }
    Ok(Value::Object(map))
}

fn decode_value(bytes: &[u8], depth: usize) -> Result<Value, String> {
    // Value { oneof kind { NullValue null_value = 1; double number_value = 2;
    //   string string_value = 3; bool bool_value = 4; Struct struct_value = 5;
    //   ListValue list_value = 6; } }
    let mut r = Reader::new(bytes);
    let mut out = Value::Null;
    while let Some((field, wire)) = r.key()? {
        out = match (field, wire) {
            (1, 0) => {
                r.varint()?;
                Value::Null
            }
            (2, 1) => {
                let f = f64::from_bits(r.fixed64()?);
                // Keep integers integral so `"httpStatus": 503` stays a u32 for serde.
                if f.fract() == 0.0 && f.abs() < 9.0e15 {
                    Value::Number(Number::from(f as i64))
                } else {
                    Number::from_f64(f).map(Value::Number).unwrap_or(Value::Null)
                }
            }
            (3, 2) => Value::String(String::from_utf8(r.bytes()?.to_vec()).map_err(|e| e.to_string())?),
            (4, 0) => Value::Bool(r.varint()? != 0),
            (5, 2) => decode_struct(r.bytes()?, depth + 1)?,
            (6, 2) => {
                let mut list = Reader::new(r.bytes()?);
                let mut items = Vec::new();
                while let Some((f, w)) = list.key()? {
                    if f == 1 && w == 2 {
                        items.push(decode_value(list.bytes()?, depth + 1)?);
                    } else {
                        list.skip(w)?;
                    }
                }
                Value::Array(items)
            }
            (_, w) => {
                r.skip(w)?;
                continue;
            }
        };
    }
    Ok(out)
}

/// Encode `filter_metadata[namespace] = value` as a serialized `Metadata`: the inverse of
/// `metadata_namespace`, for tests (the fake host's `xds.route_metadata`). A non-object
/// `value` encodes as an empty `Struct`.
pub fn encode_metadata(namespace: &str, value: &Value) -> Vec<u8> {
    let mut entry = Vec::new();
    put_bytes(1, namespace.as_bytes(), &mut entry);
    put_bytes(2, &encode_struct(value), &mut entry);
    let mut out = Vec::new();
    put_bytes(1, &entry, &mut out);
    out
}

fn encode_struct(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in v.as_object().into_iter().flatten() {
        let mut e = Vec::new();
        put_bytes(1, k.as_bytes(), &mut e);
        put_bytes(2, &encode_value(v), &mut e);
        put_bytes(1, &e, &mut out);
    }
    out
}

fn encode_value(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    match v {
        Value::Null => out.extend_from_slice(&[1 << 3, 0]),
        Value::Number(n) => {
            out.push(2 << 3 | 1);
            out.extend_from_slice(&n.as_f64().unwrap_or(0.0).to_bits().to_le_bytes());
        }
        Value::String(s) => put_bytes(3, s.as_bytes(), &mut out),
        Value::Bool(b) => out.extend_from_slice(&[4 << 3, u8::from(*b)]),
        Value::Object(_) => put_bytes(5, &encode_struct(v), &mut out),
        Value::Array(items) => {
            let mut list = Vec::new();
            for i in items {
                put_bytes(1, &encode_value(i), &mut list);
            }
            put_bytes(6, &list, &mut out);
        }
    }
    out
}

/// Decode a serialized `google.protobuf.Struct` as a JSON object (peer metadata exchange).
pub fn struct_from_bytes(bytes: &[u8]) -> Result<Value, String> {
    decode_struct(bytes, 0)
}

/// Serialize a JSON object as a `google.protobuf.Struct` (a non-object encodes as an empty
/// `Struct`): the inverse of `struct_from_bytes`.
pub fn struct_to_bytes(value: &Value) -> Vec<u8> {
    encode_struct(value)
}

/// Decode a serialized `envoy.config.core.v3.Metadata` whole, as
/// `{"filter_metadata": {<namespace>: <Struct as JSON>, ...}}` (for expressions over
/// `xds.cluster_metadata`, `xds.route_metadata`, `xds.upstream_host_metadata`).
pub fn metadata_json(bytes: &[u8]) -> Result<Value, String> {
    let mut namespaces = Map::new();
    let mut r = Reader::new(bytes);
    while let Some((field, wire)) = r.key()? {
        if field == 1 && wire == 2 {
            let mut entry = Reader::new(r.bytes()?);
            let mut key = String::new();
            let mut value = Value::Object(Map::new());
            while let Some((f, w)) = entry.key()? {
                match (f, w) {
                    (1, 2) => key = entry.string()?,
                    (2, 2) => value = decode_struct(entry.bytes()?, 0)?,
                    _ => entry.skip(w)?,
                }
            }
            namespaces.insert(key, value);
        } else {
            r.skip(wire)?;
        }
    }
    let mut out = Map::new();
    out.insert("filter_metadata".into(), Value::Object(namespaces));
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn roundtrip_metadata() {
        let v = serde_json::json!({"fault": {"rules": [{"name": "a", "fault": {"abort": {"httpStatus": 503,
            "percentage": {"value": 12.5}}}}], "headerControl": true, "x": null}});
        let mut bytes = encode_metadata("other", &serde_json::json!({"a": 1}));
        bytes.extend(encode_metadata("meshwasm", &v));
        assert_eq!(metadata_namespace(&bytes, "meshwasm").unwrap(), Some(v));
        assert_eq!(metadata_namespace(&bytes, "none").unwrap(), None);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let mut v = serde_json::json!(1);
        for _ in 0..100 {
            v = serde_json::json!({ "a": v });
        }
        let bytes = encode_metadata("meshwasm", &v);
        assert!(metadata_namespace(&bytes, "meshwasm").unwrap_err().contains("nested deeper"));
    }

    #[test]
    fn struct_and_metadata_json_roundtrip() {
        let v = serde_json::json!({"NAME": "a", "LABELS": {"app": "x"}, "n": 2, "l": ["p", true]});
        assert_eq!(struct_from_bytes(&struct_to_bytes(&v)).unwrap(), v);
        let md = encode_metadata("istio", &serde_json::json!({"services": [{"host": "h"}]}));
        assert_eq!(
            metadata_json(&md).unwrap(),
            serde_json::json!({"filter_metadata": {"istio": {"services": [{"host": "h"}]}}})
        );
    }

    proptest! {
        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = metadata_namespace(&b, "meshwasm");
        }
    }
}
