//! The replicated command (put, delete, compare-and-set on a data shard; a cluster-map change
//! on the META group) and its result.
//!
//! Commands are decided in the state machine at apply time, so every replica reaches the same
//! outcome. Expected outcomes (a CAS that does not match, a delete of a missing key, a refused
//! map change, a command sent to the wrong kind of group) are values of [`CommandResult`],
//! never errors.
//!
//! Log entries are bincode, which encodes an enum variant by its index: new variants are only
//! ever appended, so every entry already in a WAL or snapshot still decodes.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::cluster::membership::{Applied, META, MetaChange, MetaRejected};
pub use crate::value::VersionedValue;

/// The one key of the META group's state machine: the encoded cluster map. Stored with the
/// usual per-key log index, so replay-skip, snapshots and restore treat it like any key.
pub const MAP_KEY: &[u8] = b"map";

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
    /// A change to the cluster map: the META group's only command (appended last: see the
    /// module doc). Data shards refuse it.
    Meta(MetaChange),
}

impl Command {
    /// The key this command writes ([`MAP_KEY`] for a map change).
    pub fn key(&self) -> &[u8] {
        match self {
            Command::Put { key, .. }
            | Command::Delete { key }
            | Command::CompareAndSet { key, .. } => key,
            Command::Meta(_) => MAP_KEY,
        }
    }

    /// Whether group `shard` accepts this command: map changes go to the META group only, and
    /// key writes to data shards only. `Err` says why not, naming both.
    pub fn check_group(&self, shard: u64) -> Result<(), String> {
        match (self, shard == META) {
            (Command::Meta(change), false) => Err(format!(
                "shard {shard} is a data shard: the cluster-map change {} belongs to the META group",
                change.kind()
            )),
            (Command::Meta(_), true) | (_, false) => Ok(()),
            (_, true) => Err(format!(
                "the META group (shard {META}) holds only the cluster map: it refuses {self}"
            )),
        }
    }
}

/// Short form for logs: the key (escaped, cut at 32 bytes) and value sizes, never whole values.
impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Command::Meta(change) = self {
            return write!(f, "meta({})", change.kind());
        }
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
            Command::Meta(_) => unreachable!("returned above"),
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
    /// A map change on the META group: applied (the new map's epoch is on the map), or refused
    /// with the map unchanged. A refusal is a value, like a failed compare-and-set.
    Meta(#[serde(with = "local_meta_result")] Result<Applied, MetaRejected>),
    /// The group does not take this kind of command (a map change sent to a data shard, or a
    /// key write sent to the META group): nothing changed. Proposals are checked first
    /// ([`Command::check_group`]), so this is only reached by an entry that bypassed the check.
    WrongGroup {
        /// Why, naming the group and the command.
        reason: String,
    },
}

/// Serde for [`CommandResult::Meta`]. openraft requires its response type to be serde, but a
/// result never leaves the node that applied the entry (the peer transport carries entries,
/// votes and snapshots, never results). [`MetaRejected`] names its change kinds with
/// `&'static str`, which cannot be deserialized; so a refusal is written as its message, and
/// reading one back is an error that says so.
mod local_meta_result {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::cluster::membership::{Applied, MetaRejected};

    pub fn serialize<S: Serializer>(
        result: &Result<Applied, MetaRejected>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let shown: Result<&Applied, String> = result.as_ref().map_err(ToString::to_string);
        shown.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Result<Applied, MetaRejected>, D::Error> {
        match Result::<Applied, String>::deserialize(d)? {
            Ok(applied) => Ok(Ok(applied)),
            Err(refusal) => Err(serde::de::Error::custom(format!(
                "a refused map change ({refusal}) is not decodable: map-change results stay on \
                 the node that applied them"
            ))),
        }
    }
}
