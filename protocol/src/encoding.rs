//! CBOR encoding (ciborium) and the serde helpers the wire types share.
//!
//! Payloads are plain structs (no maps keyed by data), so a value always encodes to the
//! same bytes; that is what lets docs/protocol.md give test vectors. Decoding refuses
//! trailing bytes, so one message has one encoding on the wire.

use serde::de::DeserializeOwned;
use serde::{Deserializer, Serialize};

use crate::error::DecodeError;

/// Encodes `value` as CBOR.
pub fn to_cbor<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    // Writing into a Vec cannot fail, and our types contain nothing serde refuses.
    ciborium::into_writer(value, &mut out).unwrap_or_else(|e| unreachable!("CBOR encoding into a Vec failed: {e}"));
    out
}

/// Decodes exactly one CBOR item from `bytes`, refusing trailing bytes.
pub fn from_cbor<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, DecodeError> {
    let mut reader = bytes;
    let value = ciborium::from_reader(&mut reader).map_err(|e| DecodeError::Cbor {
        what,
        reason: match e {
            ciborium::de::Error::Io(_) => "truncated input".to_string(),
            ciborium::de::Error::Syntax(at) => format!("syntax error at byte {at}"),
            ciborium::de::Error::Semantic(at, msg) => match at {
                Some(at) => format!("{msg} (at byte {at})"),
                None => msg,
            },
            ciborium::de::Error::RecursionLimitExceeded => "nested too deeply".to_string(),
        },
    })?;
    if !reader.is_empty() {
        return Err(DecodeError::TrailingBytes { what, extra: reader.len() });
    }
    Ok(value)
}

/// Reads a CBOR byte string (definite or chunked) into a Vec.
pub(crate) fn deserialize_byte_buf<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a byte string")
        }
        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
    }
    d.deserialize_byte_buf(V)
}

/// Serde for `[u8; N]` as a CBOR byte string of exactly N bytes.
pub(crate) mod fixed_bytes {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer, const N: usize>(v: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(d: D) -> Result<[u8; N], D::Error> {
        let v = super::deserialize_byte_buf(d)?;
        let len = v.len();
        v.try_into().map_err(|_| serde::de::Error::custom(format!("expected a {N}-byte string, got {len} bytes")))
    }
}

/// Serde for a list of multiaddrs, each as its binary form in a CBOR byte string. A
/// multiaddr that does not parse makes the whole message malformed (SECURITY.md invariant 12).
pub(crate) mod multiaddrs {
    use multiaddr::Multiaddr;
    use serde::ser::SerializeSeq;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[Multiaddr], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for addr in v {
            seq.serialize_element(&Raw(addr.as_ref()))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Multiaddr>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<Multiaddr>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of binary multiaddrs")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(Owned(bytes)) = seq.next_element::<Owned>()? {
                    if out.len() >= crate::advert::MAX_LISTEN_ADDRS {
                        return Err(serde::de::Error::custom("too many listen addresses"));
                    }
                    let addr = Multiaddr::try_from(bytes)
                        .map_err(|e| serde::de::Error::custom(format!("bad multiaddr: {e}")))?;
                    out.push(addr);
                }
                Ok(out)
            }
        }
        d.deserialize_seq(V)
    }

    struct Raw<'a>(&'a [u8]);
    impl serde::Serialize for Raw<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }

    struct Owned(Vec<u8>);
    impl<'de> serde::Deserialize<'de> for Owned {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            super::deserialize_byte_buf(d).map(Owned)
        }
    }
}

/// Serde for an optional byte string (an embedded signed envelope).
pub(crate) mod opt_bytes {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    struct Raw<'a>(&'a [u8]);
    impl Serialize for Raw<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }

    struct Owned(Vec<u8>);
    impl<'de> Deserialize<'de> for Owned {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            super::deserialize_byte_buf(d).map(Owned)
        }
    }

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        v.as_deref().map(Raw).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Ok(Option::<Owned>::deserialize(d)?.map(|o| o.0))
    }
}
