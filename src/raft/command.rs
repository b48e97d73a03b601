//! The replicated command (put, delete, compare-and-set) and its result.
//!
//! Commands are decided in the state machine at apply time, so every replica reaches the same
//! outcome. Expected outcomes (a CAS that does not match, a delete of a missing key) are
//! values of [`CommandResult`], never errors.

use std::fmt;

use serde::{Deserialize, Serialize};

pub use crate::value::VersionedValue;

/// A write to one key, replicated through the shard's Raft log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Set `key` to `value`.
    Put {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The new value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Remove `key`.
    Delete {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// If `key`'s value equals `expected` (`None`: the key is absent), replace it with `new`
    /// (`None`: delete it).
    CompareAndSet {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The value the key must hold now; `None` requires it to be absent.
        #[serde(with = "serde_bytes")]
        expected: Option<Vec<u8>>,
        /// The value to set; `None` deletes the key.
        #[serde(with = "serde_bytes")]
        new: Option<Vec<u8>>,
    },
}

impl Command {
    /// The key this command writes.
    pub fn key(&self) -> &[u8] {
        match self {
            Command::Put { key, .. }
            | Command::Delete { key }
            | Command::CompareAndSet { key, .. } => key,
        }
    }
}

/// Short form for logs: the key (escaped, cut at 32 bytes) and value sizes, never whole values.
impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = self.key();
        let shown = String::from_utf8_lossy(&key[..key.len().min(32)]);
        let more = if key.len() > 32 { "…" } else { "" };
        match self {
            Command::Put { value, .. } => write!(f, "put({shown:?}{more}, {} bytes)", value.len()),
            Command::Delete { .. } => write!(f, "delete({shown:?}{more})"),
            Command::CompareAndSet { expected, new, .. } => write!(
                f,
                "cas({shown:?}{more}, expected {}, new {})",
                expected
                    .as_ref()
                    .map_or("absent".to_string(), |v| format!("{} bytes", v.len())),
                new.as_ref()
                    .map_or("delete".to_string(), |v| format!("{} bytes", v.len())),
            ),
        }
    }
}

/// What applying a log entry did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// The entry carried no command (a leader's blank entry or a membership change).
    NoOp,
    /// The put was applied.
    Put,
    /// The delete was applied; `existed` says whether the key had a value.
    Delete {
        /// Whether the key had a value before.
        existed: bool,
    },
    /// The compare-and-set matched and its new value was applied.
    CasApplied,
    /// The compare-and-set did not match; nothing changed. `current` is the key's value and
    /// version (log index of its last write) at that point of the log.
    CasFailed {
        /// The value the key held instead, with its version.
        current: Option<VersionedValue>,
    },
}
