//! A key's value as every layer sees it: the bytes and the log index of the write that
//! produced them (its version). Below the Raft layer and the wire conversions, so both use it
//! without depending on each other.

use serde::{Deserialize, Serialize};

/// A value with the log index of the write that produced it (its version).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionedValue {
    /// Log index of the key's last write.
    pub version: u64,
    /// The value.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}
