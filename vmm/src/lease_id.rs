//! A lease's identifier as vmm knows it: 128 bits, written as 32 lowercase hex digits in
//! every file and name (docs/vmm.md "Public API"). A leaf module: the crate's error
//! type names lease ids, so this module depends on nothing else of the crate.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A lease's 128-bit identifier; shown and stored as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId([u8; 16]);

impl LeaseId {
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        LeaseId(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    pub fn random() -> Self {
        LeaseId(rand::random())
    }

    /// 32 lowercase hex digits.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first `n` hex digits: names with a length limit (interface names, 15 bytes)
    /// carry this prefix. 12 digits (48 bits) make a clash between two live leases of
    /// one host improbable, and a clash is caught when the interface is created.
    pub fn short_hex(&self, n: usize) -> String {
        let mut s = self.hex();
        s.truncate(n.min(32));
        s
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseId({})", self.hex())
    }
}

/// Text that is not a lease id.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("lease id {input:?} is not 32 lowercase hex digits")]
pub struct LeaseIdError {
    pub input: String,
}

impl FromStr for LeaseId {
    type Err = LeaseIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || LeaseIdError { input: s.to_string() };
        // exactly 32 lowercase hex digits: the id is also a file and device name, so one
        // spelling per lease
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        hex::decode_to_slice(s, &mut out).map_err(|_| bad())?;
        Ok(LeaseId(out))
    }
}

impl Serialize for LeaseId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.hex())
    }
}

impl<'de> Deserialize<'de> for LeaseId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_id_round_trips_and_rejects_bad_text() {
        let id = LeaseId::from_bytes([0xab; 16]);
        assert_eq!(id.hex(), "ab".repeat(16));
        assert_eq!(id.hex().parse::<LeaseId>().ok(), Some(id));
        assert_eq!(id.short_hex(12), "abababababab");
        for bad in ["", "AB".repeat(16).as_str(), &"a".repeat(31), &"g".repeat(32), &"a".repeat(33)] {
            assert!(bad.parse::<LeaseId>().is_err(), "{bad:?} accepted");
        }
    }
}
