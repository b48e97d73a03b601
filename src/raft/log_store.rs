//! A shard's Raft log storage (openraft's `RaftLogStorage`) on the node-wide WAL.
//!
//! Entries, the vote, the committed log id and the purge point are bincode-encoded openraft
//! values stored as the WAL's opaque bytes. Durability comes from the WAL: `append`'s callback
//! and `save_vote`'s return wait for the group-commit `fdatasync` that covers them.

use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::sync::Arc;

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};

use crate::raft::{Entry, LogId, TypeConfig, Vote};
use crate::storage::codec::{decode_serde, encode_serde};
use crate::storage::wal::Wal;

/// One shard's view of the node's write-ahead log. Cheap to clone (it is also the log reader).
#[derive(Clone)]
pub struct LogStore {
    wal: Arc<Wal>,
    shard: u64,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("shard", &self.shard)
            .finish()
    }
}

impl LogStore {
    /// The log of `shard` in `wal`.
    pub fn new(wal: Arc<Wal>, shard: u64) -> LogStore {
        LogStore { wal, shard }
    }

    /// The shard this log belongs to.
    pub fn shard(&self) -> u64 {
        self.shard
    }

    /// The last purged log id, if any.
    pub fn last_purged(&self) -> io::Result<Option<LogId>> {
        let state = self.wal.shard_state(self.shard);
        state
            .meta
            .purged
            .map(|(_, marker)| self.decode::<LogId>(&marker, "purged log id"))
            .transpose()
    }

    /// The vote as last written: the WAL's copy changes when the vote record is written, before
    /// its fsync and so before openraft acts on the vote (what [`crate::leadership`] relies on).
    pub fn vote(&self) -> io::Result<Option<Vote>> {
        self.wal
            .vote(self.shard)
            .map(|bytes| self.decode::<Vote>(&bytes, "vote"))
            .transpose()
    }

    /// True if the stored vote names `leader` as the leader of `term` (committed or not).
    pub fn holds_vote_for(&self, term: u64, leader: u64) -> bool {
        matches!(self.vote(), Ok(Some(v)) if v.leader_id.term == term && v.leader_id.node_id == leader)
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, bytes: &[u8], what: &str) -> io::Result<T> {
        decode_serde(bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("shard {}: stored {what} does not decode: {e}", self.shard),
            )
        })
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        self.wal
            .read(self.shard, range)?
            .into_iter()
            .map(|(_, bytes)| self.decode::<Entry>(&bytes, "log entry"))
            .collect()
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.vote()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id = self.last_purged()?;
        let last_index = self.wal.shard_state(self.shard).last_index;
        let last_log_id = match last_index {
            Some(index) => {
                let entry = self.try_get_log_entries(index..=index).await?;
                let entry = entry.into_iter().next().ok_or_else(|| {
                    io::Error::other(format!("shard {}: last entry {index} vanished", self.shard))
                })?;
                Some(entry.log_id)
            }
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.wal.save_vote(
            self.shard,
            encode_serde(vote),
            Box::new(move |result| {
                let _ = tx.send(result);
            }),
        )?;
        match rx.await {
            Ok(result) => result.map_err(io::Error::from),
            Err(_) => Err(io::Error::other(
                "write-ahead log closed before the vote was synced",
            )),
        }
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        let bytes = committed.as_ref().map(encode_serde);
        Ok(self.wal.save_committed(self.shard, bytes)?)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        let state = self.wal.shard_state(self.shard);
        state
            .meta
            .committed
            .map(|bytes| self.decode::<LogId>(&bytes, "committed log id"))
            .transpose()
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut first_index = None;
        let encoded: Vec<Vec<u8>> = entries
            .into_iter()
            .map(|entry| {
                first_index.get_or_insert(entry.log_id.index());
                encode_serde(&entry)
            })
            .collect();
        let on_durable = Box::new(move |result: crate::storage::Result<()>| {
            callback.io_completed(result.map_err(io::Error::from));
        });
        match first_index {
            Some(first) => self.wal.append(self.shard, first, encoded, on_durable)?,
            // Nothing to write, but the callback must still wait for earlier writes' sync.
            None => self.wal.after_pending_writes(on_durable)?,
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        Ok(self
            .wal
            .truncate_after(self.shard, last_log_id.map(|id| id.index()))?)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        Ok(self
            .wal
            .purge(self.shard, log_id.index(), encode_serde(&log_id))?)
    }
}
