//! The records the write-ahead log stores, and their wire form inside a frame.
//!
//! The log knows nothing of Raft: entries, votes, committed markers and purge markers are opaque
//! byte strings chosen by the caller (the Raft log store encodes openraft's types into them).
//! Only indexes are interpreted, to keep each shard's log contiguous.

use bincode::{Decode, Encode};

use crate::storage::codec;

/// Version byte of WAL record frames written by this build.
pub const RECORD_VERSION: u8 = 1;

/// Everything a shard's log holds besides its entries; copied into the checkpoint at the start
/// of every segment so that older segments can be deleted without losing it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode)]
pub struct ShardMeta {
    /// The last saved vote.
    pub vote: Option<Vec<u8>>,
    /// The last saved committed marker.
    pub committed: Option<Vec<u8>>,
    /// The last purged index and its caller-supplied marker (the purged log id).
    pub purged: Option<(u64, Vec<u8>)>,
}

/// One logical change to the log.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Record {
    /// `entries[i]` is the entry at index `first_index + i`. Replaces any entries at or after
    /// `first_index`.
    Append {
        /// The shard whose log this extends.
        shard: u64,
        /// Index of the first entry.
        first_index: u64,
        /// The entries, opaque.
        entries: Vec<Vec<u8>>,
    },
    /// A vote was saved.
    Vote {
        /// The shard.
        shard: u64,
        /// The vote, opaque.
        vote: Vec<u8>,
    },
    /// A committed marker was saved.
    Committed {
        /// The shard.
        shard: u64,
        /// The committed marker, opaque (`None` clears it).
        committed: Option<Vec<u8>>,
    },
    /// Entries after `after` were removed (`None`: all of them).
    Truncate {
        /// The shard.
        shard: u64,
        /// The last index kept.
        after: Option<u64>,
    },
    /// Entries up to and including `upto` were purged.
    Purge {
        /// The shard.
        shard: u64,
        /// The last purged index.
        upto: u64,
        /// Caller's marker for the purge point (the purged log id).
        marker: Vec<u8>,
    },
    /// First record of every segment: the metadata of every shard at the time the segment was
    /// opened.
    Checkpoint {
        /// `(shard, meta, start)`: the shard's markers and the index its live log starts at.
        shards: Vec<(u64, ShardMeta, Option<u64>)>,
    },
    /// Last record of a segment that was closed in an orderly way; the next segment follows.
    Seal {
        /// Id of the segment that continues the log.
        next_segment: u64,
    },
    /// The shard's replica left this node: its entries, vote and markers are gone, and later
    /// checkpoints do not list it. A later record for the same shard starts a new, empty log
    /// (the next incarnation of the shard here, with a new replica id). Appended last, so
    /// records written by older builds decode unchanged.
    Retire {
        /// The shard.
        shard: u64,
    },
}

/// The payload of a WAL frame: the writer's durability watermark, then the record.
///
/// Wire form: `synced_upto` as 8 little-endian bytes, then the bincode encoding of the record.
/// The record can thus be encoded outside the log's lock and only the watermark added inside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// When this record was written, every byte of its segment before this offset was known to
    /// be on disk (fdatasync returned). Recovery uses it to tell a torn tail (damage after the
    /// last sync: the writes were never acknowledged) from corruption of synced data.
    pub synced_upto: u64,
    /// The record.
    pub record: Record,
}

impl Envelope {
    /// Appends one frame to `out` holding `synced_upto` and an already-encoded record.
    pub fn frame(synced_upto: u64, encoded_record: &[u8], out: &mut Vec<u8>) {
        codec::encode_frame_with(RECORD_VERSION, out, |out| {
            out.extend_from_slice(&synced_upto.to_le_bytes());
            out.extend_from_slice(encoded_record);
        });
    }

    /// Decodes a frame payload.
    pub fn decode(payload: &[u8]) -> Result<Envelope, String> {
        if payload.len() < 8 {
            return Err(format!(
                "record payload of {} bytes is too short",
                payload.len()
            ));
        }
        let synced_upto = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
        let record = codec::decode::<Record>(&payload[8..])?;
        Ok(Envelope {
            synced_upto,
            record,
        })
    }
}
