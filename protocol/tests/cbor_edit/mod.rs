//! Editing a payload as a CBOR value, to build hostile or non-canonical variants of
//! real messages: shared by `receiver_strictness.rs` and the conformance vector
//! generator (`examples/write_conformance_vectors.rs`).

use ciborium::Value;

/// The value's bytes, as ciborium writes them.
pub fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).expect("CBOR into a Vec");
    out
}

/// The entries of a map value.
pub fn entries(v: &mut Value) -> &mut Vec<(Value, Value)> {
    match v {
        Value::Map(m) => m,
        other => panic!("not a map: {other:?}"),
    }
}

/// The value of `key` in a map value; the key must be there.
pub fn field<'a>(v: &'a mut Value, key: &str) -> &'a mut Value {
    entries(v).iter_mut().find(|(k, _)| k.as_text() == Some(key)).map(|(_, v)| v).expect("key present")
}
