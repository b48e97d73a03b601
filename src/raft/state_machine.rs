//! A shard's state machine (openraft's `RaftStateMachine`): deterministic apply into the
//! shard's sled tree, snapshots as checksummed files, and recovery when sled lost more than
//! the WAL still holds.
//!
//! - **Apply**: the entries of an `apply` call (up to [`APPLY_CHUNK`] at a time) are decided
//!   against the tree, their key writes go to sled one by one, then the last applied log id
//!   (with any new membership). Responses are sent after that. A storage failure is returned
//!   as an error (openraft then stops the shard) instead of acknowledging anything.
//! - **Replay after a crash**: sled may have kept key writes of entries past the applied
//!   marker it recovered (the writes are not one batch: see `storage::state_tree` for why).
//!   An entry whose key already holds a write at or past the entry's index (value version or
//!   tombstone) is skipped: its effect, or a later one, is already there, and deciding it
//!   again against that later state could diverge from the other replicas (a compare-and-set
//!   that failed the first time could succeed). Live, a key's last write is always older than
//!   the entry being applied, so the rule only ever fires on replay.
//! - **Snapshots** are built while openraft holds `&mut self` (so no apply runs: sled has no
//!   point-in-time view), written to a temporary file, fsynced and renamed. The WAL is purged
//!   by openraft only up to a snapshot that `build_snapshot` has returned, i.e. a durable one.
//! - **Recovery** ([`StateMachine::open`]): sled's flush is not an fsync, so after a crash the
//!   tree may be older than the WAL's purge point. The tree is then rebuilt from the latest
//!   snapshot, and openraft replays the WAL from there.
//! - **The META group** (shard [`META`]) uses this same state machine: its state is one key,
//!   [`MAP_KEY`], holding the encoded [`ClusterMap`] with the usual per-key log index, so the
//!   replay-skip rule, snapshots and restore above hold unchanged. A `Command::Meta` decodes
//!   the map, runs [`ClusterMap::apply`] and writes the map back only if it was applied (a
//!   refusal is a [`CommandResult::Meta`] value). Once a chunk that changed the map is
//!   visible (and after a snapshot load), the map is offered to the node's [`MapView`]
//!   ([`StateMachine::publish_map_to`]). A map change reaching a data shard, or a key write
//!   reaching META, is answered with [`CommandResult::WrongGroup`] and changes nothing.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};

use crate::cluster::MapView;
use crate::cluster::membership::{ClusterMap, META};
use crate::raft::command::{MAP_KEY, VersionedValue};
use crate::raft::{
    Command, CommandResult, Entry, LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig,
};
use crate::storage::codec::{decode_serde, encode_serde};
use crate::storage::{
    Error, SnapshotDir, SnapshotFile, SnapshotWriter, StateTree, Store, TreeReader, Versioned,
    Write,
};

/// Entries decided per chunk: bounds a chunk's overlay and write list.
pub const APPLY_CHUNK: usize = 1024;

/// One shard's state machine.
pub struct StateMachine {
    shard: u64,
    tree: StateTree,
    snapshots: SnapshotDir,
    /// The current snapshot and its decoded meta.
    current: Option<(SnapshotMeta, SnapshotFile)>,
    /// The applied position, published after each batch or snapshot load is visible in the
    /// tree, so readers need not read and decode the applied marker from sled on every read.
    applied: Arc<Published>,
    /// The META group's state machine only: where the applied map is published.
    map_view: Option<Arc<MapView>>,
    /// Test builds: holds applies at a chosen stage (see [`crate::raft::apply_stall`]).
    #[cfg(feature = "planted-bugs")]
    stall: Arc<crate::raft::apply_stall::ApplyStall>,
}

/// The applied position as readers see it.
#[derive(Debug, Default)]
struct Published {
    /// The last applied log index (0 before anything was applied).
    index: AtomicU64,
    /// The leader `(term, node)` that proposed the entry at `index` or earlier; written after
    /// `index`, so an `index` read after it is at least the index it was published with.
    leader: Mutex<(u64, u64)>,
    /// The last index whose apply has started: raised before the first key write of a chunk
    /// (or a snapshot load), so no key in the tree holds a write past it. At least `index`.
    started: AtomicU64,
}

/// A state machine's applied position: see [`StateReader::applied_position`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppliedPosition {
    /// The term of the leader that proposed an applied entry at or below `index`.
    pub term: u64,
    /// That leader's node id.
    pub leader: u64,
    /// The last applied index (at least the entry's).
    pub index: u64,
}

impl std::fmt::Debug for StateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachine")
            .field("shard", &self.shard)
            .field(
                "snapshot",
                &self.current.as_ref().map(|(m, _)| m.last_log_id),
            )
            .finish()
    }
}

/// Serves reads from a shard's state machine outside openraft's state-machine task. Follows
/// snapshot installs.
#[derive(Debug, Clone)]
pub struct StateReader {
    tree: TreeReader,
    applied: Arc<Published>,
}

impl StateReader {
    /// A key's value and version in local state.
    pub fn get(&self, key: &[u8]) -> io::Result<Option<VersionedValue>> {
        Ok(self.tree.get(key)?.map(|v| VersionedValue {
            version: v.version,
            value: v.value,
        }))
    }

    /// The last applied log index of local state (0 before anything was applied). Read it
    /// before a key: the value read then reflects at least this much of the log.
    ///
    /// A memory read: the state machine publishes the index only once the batch (or
    /// snapshot) that reaches it is visible in the tree, so a key read afterwards reflects at
    /// least that much.
    pub fn applied_index(&self) -> io::Result<u64> {
        Ok(self.applied.index.load(Ordering::Acquire))
    }

    /// The applied index with the leader of an applied entry at or below it: if that leader
    /// is `(T, L)`, an entry `L` proposed in term `T` is applied here (what a leader's
    /// read index needs, see [`crate::leadership`]).
    pub fn applied_position(&self) -> AppliedPosition {
        let (term, leader) = *self.applied.leader.lock().expect("applied lock");
        AppliedPosition {
            term,
            leader,
            index: self.applied.index.load(Ordering::Acquire),
        }
    }

    /// The last index whose apply has started: every key write visible in local state now is
    /// at or below it (it is at least [`StateReader::applied_index`]). Part of a leader's read
    /// index (see [`crate::leadership`]).
    pub fn apply_started(&self) -> u64 {
        self.applied.started.load(Ordering::Acquire)
    }

    /// A key's value and the log index as of which local state served it: the applied index
    /// read first, raised to the key's own last write (value or tombstone). Keys of a chunk
    /// being applied become visible one by one before the chunk's index is published, so a
    /// key can show a write past the applied index; its value is then the key's state as of
    /// that write, and a receipt naming only the applied index would under-report it.
    pub fn get_as_of(&self, key: &[u8]) -> io::Result<(Option<VersionedValue>, u64)> {
        let applied = self.applied.index.load(Ordering::Acquire);
        let stored = self.tree.stored(key)?;
        let as_of = stored.last_write().map_or(applied, |w| w.max(applied));
        let value = stored.value.map(|v| VersionedValue {
            version: v.version,
            value: v.value,
        });
        Ok((value, as_of))
    }
}

/// Hands openraft the snapshot [`StateMachine`] built while applies were paused.
pub struct SnapshotBuilder {
    snapshot: Result<Snapshot, String>,
}

fn invalid(shard: u64, what: &str, e: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("shard {shard}: stored {what} does not decode: {e}"),
    )
}

impl StateMachine {
    /// Opens `shard`'s state machine in `store`. `purged` is the WAL's last purged log id for
    /// the shard: if sled's tree is older than it, the tree is restored from the latest
    /// snapshot (the WAL no longer holds the entries in between).
    pub fn open(store: &Store, shard: u64, purged: Option<&LogId>) -> io::Result<StateMachine> {
        let tree = store.state_tree(shard)?;
        let snapshots = store.snapshot_dir(shard);
        let current = match snapshots.latest()? {
            Some(file) => {
                let meta_bytes = file.verify()?;
                let meta: SnapshotMeta =
                    decode_serde(&meta_bytes).map_err(|e| invalid(shard, "snapshot meta", e))?;
                Some((meta, file))
            }
            None => None,
        };
        let mut sm = StateMachine {
            shard,
            tree,
            snapshots,
            current,
            applied: Arc::default(),
            map_view: None,
            #[cfg(feature = "planted-bugs")]
            stall: Arc::default(),
        };
        let applied = sm.last_applied()?;
        if let Some(purged) = purged
            && applied.as_ref().is_none_or(|a| a.index() < purged.index())
        {
            sm.restore_from_snapshot(applied.as_ref(), purged)?;
        }
        sm.publish_applied(sm.last_applied()?.as_ref());
        Ok(sm)
    }

    fn restore_from_snapshot(&mut self, applied: Option<&LogId>, purged: &LogId) -> io::Result<()> {
        let shard = self.shard;
        let Some((meta, file)) = self.current.clone() else {
            return Err(Error::corruption(
                self.snapshots.path(),
                0,
                format!(
                    "shard {shard}: the log is purged up to {purged} and the state machine is at \
                     {applied:?}, but there is no snapshot to bridge the gap"
                ),
            )
            .into());
        };
        if meta
            .last_log_id
            .as_ref()
            .is_none_or(|s| s.index() < purged.index())
        {
            return Err(Error::corruption(
                file.path(),
                0,
                format!(
                    "shard {shard}: snapshot ends at {:?}, before the log's purge point {purged}",
                    meta.last_log_id
                ),
            )
            .into());
        }
        tracing::warn!(
            shard,
            applied = ?applied,
            snapshot = ?meta.last_log_id,
            "state machine is behind the log's purge point (sled lost its tail); restoring from snapshot"
        );
        self.load(&meta, &file)
    }

    /// Replaces the tree with the contents of a verified snapshot file.
    fn load(&mut self, meta: &SnapshotMeta, file: &SnapshotFile) -> io::Result<()> {
        let (_, pairs) = file.read()?;
        if let Some(last) = &meta.last_log_id {
            self.applied
                .started
                .fetch_max(last.index(), Ordering::AcqRel);
        }
        let applied = meta.last_log_id.as_ref().map(encode_serde);
        let membership = encode_serde(&meta.last_membership);
        self.tree
            .replace(pairs, applied.as_deref(), Some(&membership))?;
        self.publish_applied(meta.last_log_id.as_ref());
        self.publish_map()
    }

    /// The META group: offers the map in the tree to `view` now and after every later apply
    /// or snapshot load that changes it.
    pub fn publish_map_to(&mut self, view: Arc<MapView>) -> io::Result<()> {
        self.map_view = Some(view);
        self.publish_map()
    }

    /// Offers the tree's map (if any) to the map view (if any).
    fn publish_map(&self) -> io::Result<()> {
        let Some(view) = &self.map_view else {
            return Ok(());
        };
        if let Some(stored) = self.tree.get(MAP_KEY)? {
            let map: ClusterMap =
                decode_serde(&stored.value).map_err(|e| invalid(self.shard, "cluster map", e))?;
            view.offer(Arc::new(map));
        }
        Ok(())
    }

    /// Publishes `applied` to readers; call only once the state it names is visible.
    fn publish_applied(&self, applied: Option<&LogId>) {
        let index = applied.map_or(0, |l| l.index());
        self.applied.started.fetch_max(index, Ordering::AcqRel);
        self.applied.index.store(index, Ordering::Release);
        let leader = applied.map_or((0, 0), |l| (l.leader_id.term, l.leader_id.node_id));
        *self.applied.leader.lock().expect("applied lock") = leader;
    }

    /// Test builds: the hook that holds this state machine's applies.
    #[cfg(feature = "planted-bugs")]
    pub fn stall(&self) -> Arc<crate::raft::apply_stall::ApplyStall> {
        Arc::clone(&self.stall)
    }

    /// A read handle on this state machine's data.
    pub fn reader(&self) -> StateReader {
        StateReader {
            tree: self.tree.reader(),
            applied: Arc::clone(&self.applied),
        }
    }

    /// The last applied log id.
    pub fn last_applied(&self) -> io::Result<Option<LogId>> {
        self.tree
            .applied()?
            .map(|b| decode_serde(&b).map_err(|e| invalid(self.shard, "applied log id", e)))
            .transpose()
    }

    /// Reads a key's value and version from local state (no consistency check of its own).
    pub fn get(&self, key: &[u8]) -> io::Result<Option<VersionedValue>> {
        Ok(self.tree.get(key)?.map(|v| VersionedValue {
            version: v.version,
            value: v.value,
        }))
    }

    fn build(&mut self) -> io::Result<Snapshot> {
        let last_log_id = self.last_applied()?;
        let (_, last_membership) = self.membership()?;
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
        };
        let index = meta.last_log_id.as_ref().map_or(0, |l| l.index());
        let name = self.snapshots.next_name(index)?;
        // Tombstones at or before the applied marker are no use to anyone; later ones (only
        // after a crash, until the replay passes them) go into the snapshot.
        let dropped = self.tree.purge_tombstones(index)?;
        let mut writer =
            SnapshotWriter::create(self.snapshots.path(), &name, &encode_serde(&meta))?;
        for pair in self.tree.pairs() {
            let (key, value) = pair?;
            writer.push(&key, &value)?;
        }
        let file = writer.finish()?;
        self.snapshots.remove_all_except(file.path())?;
        tracing::info!(shard = self.shard, last = ?meta.last_log_id, bytes = file.len(), tombstones_dropped = dropped, "built snapshot");
        self.current = Some((meta.clone(), file.clone()));
        Ok(Snapshot {
            meta,
            snapshot: file,
        })
    }

    fn membership(&self) -> io::Result<(Option<LogId>, StoredMembership)> {
        let membership = match self.tree.membership()? {
            Some(b) => decode_serde(&b).map_err(|e| invalid(self.shard, "membership", e))?,
            None => StoredMembership::default(),
        };
        Ok((self.last_applied()?, membership))
    }

    /// Applies one chunk of entries and answers their responders.
    async fn apply_chunk(&mut self, chunk: Vec<EntryResponder<TypeConfig>>) -> io::Result<()> {
        let (entries, responders): (Vec<_>, Vec<_>) = chunk.into_iter().unzip();
        #[cfg(feature = "planted-bugs")]
        self.stall
            .pass(crate::raft::apply_stall::Stage::BeforeWrite)
            .await;
        let (results, written) = self.write_entries(entries, usize::MAX)?;
        #[cfg(feature = "planted-bugs")]
        self.stall
            .pass(crate::raft::apply_stall::Stage::BeforePublish)
            .await;
        if let Some(last) = written {
            self.publish_applied(Some(&last));
        }
        if results
            .iter()
            .any(|r| matches!(r, CommandResult::Meta(Ok(_))))
        {
            self.publish_map()?;
        }
        for (responder, result) in responders.into_iter().zip(results) {
            if let Some(responder) = responder {
                responder.send(result);
            }
        }
        Ok(())
    }

    /// Applies `entries` (consecutive, committed): their key writes, then the last applied
    /// log id and any membership. Returns each entry's result, in order. Later entries see
    /// earlier entries' writes (a CAS after a put in the same chunk).
    pub fn apply_entries(&mut self, entries: Vec<Entry>) -> io::Result<Vec<CommandResult>> {
        self.apply_entries_torn(entries, usize::MAX)
            .map(|(results, _)| results)
    }

    /// [`StateMachine::apply_entries`] stopped after `limit` sled operations, as a crash would
    /// leave it (tests); also says whether it ran to the end. The applied index is published
    /// only if it did.
    fn apply_entries_torn(
        &mut self,
        entries: Vec<Entry>,
        limit: usize,
    ) -> io::Result<(Vec<CommandResult>, bool)> {
        let empty = entries.is_empty();
        let (results, written) = self.write_entries(entries, limit)?;
        let complete = empty || written.is_some();
        if let Some(last) = written {
            self.publish_applied(Some(&last));
            if results
                .iter()
                .any(|r| matches!(r, CommandResult::Meta(Ok(_))))
            {
                self.publish_map()?;
            }
        }
        Ok((results, complete))
    }

    /// Decides `entries` and writes their keys, stopping after `limit` sled operations;
    /// returns each entry's result and, if the writes ran to the end, the last log id (to be
    /// published by the caller). `started` is raised before the first key write.
    fn write_entries(
        &mut self,
        entries: Vec<Entry>,
        limit: usize,
    ) -> io::Result<(Vec<CommandResult>, Option<LogId>)> {
        let Some(last) = entries.last().map(|e| e.log_id) else {
            return Ok((Vec::new(), None));
        };
        let mut overlay: HashMap<Vec<u8>, Option<Versioned>> = HashMap::new();
        let mut writes = Vec::new();
        let mut membership = None;
        let mut results = Vec::with_capacity(entries.len());
        for entry in entries {
            let index = entry.log_id.index();
            results.push(match entry.payload {
                EntryPayload::Blank => CommandResult::NoOp,
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m));
                    CommandResult::NoOp
                }
                EntryPayload::Normal(cmd) => self.execute(cmd, index, &mut overlay, &mut writes)?,
            });
        }
        let membership = membership.as_ref().map(encode_serde);
        self.applied
            .started
            .fetch_max(last.index(), Ordering::AcqRel);
        let complete =
            self.tree
                .apply_prefix(&writes, &encode_serde(&last), membership.as_deref(), limit)?;
        Ok((results, complete.then_some(last)))
    }

    /// Decides one command against the tree plus the chunk's earlier writes (`overlay`).
    fn execute(
        &self,
        cmd: Command,
        index: u64,
        overlay: &mut HashMap<Vec<u8>, Option<Versioned>>,
        writes: &mut Vec<Write>,
    ) -> io::Result<CommandResult> {
        if let Err(reason) = cmd.check_group(self.shard) {
            tracing::warn!(shard = self.shard, index, %reason, "command refused at apply");
            return Ok(CommandResult::WrongGroup { reason });
        }
        let key = cmd.key();
        // The key's state before this entry: the chunk's own earlier write, else the tree.
        let now = match overlay.get(key) {
            Some(v) => v.clone(),
            None => {
                let stored = self.tree.stored(key)?;
                if stored.last_write().is_some_and(|w| w >= index) {
                    tracing::debug!(
                        shard = self.shard,
                        index,
                        last_write = stored.last_write(),
                        "entry already in the tree (written before a crash): skipped on replay"
                    );
                    return Ok(already_applied(&cmd));
                }
                stored.value
            }
        };
        Ok(match cmd {
            Command::Put { key, value } => {
                set(overlay, writes, key, Some(value), index);
                CommandResult::Put
            }
            Command::Delete { key } => {
                let existed = now.is_some();
                set(overlay, writes, key, None, index);
                CommandResult::Delete { existed }
            }
            Command::CompareAndSet { key, expected, new } => {
                if now.as_ref().map(|v| &v.value) == expected.as_ref() {
                    set(overlay, writes, key, new, index);
                    CommandResult::CasApplied
                } else {
                    CommandResult::CasFailed {
                        current: now.map(|v| VersionedValue {
                            version: v.version,
                            value: v.value,
                        }),
                    }
                }
            }
            Command::Meta(change) => {
                debug_assert_eq!(self.shard, META, "checked by check_group");
                let mut map: ClusterMap = match &now {
                    Some(stored) => decode_serde(&stored.value)
                        .map_err(|e| invalid(self.shard, "cluster map", e))?,
                    None => ClusterMap::default(),
                };
                let result = map.apply(change);
                match &result {
                    Ok(applied) => {
                        tracing::info!(epoch = map.epoch, ?applied, "cluster map changed");
                        set(
                            overlay,
                            writes,
                            MAP_KEY.to_vec(),
                            Some(encode_serde(&map)),
                            index,
                        );
                    }
                    Err(refused) => tracing::info!(index, %refused, "cluster map change refused"),
                }
                CommandResult::Meta(result)
            }
        })
    }
}

/// The result of an entry skipped on replay because its key already holds its effect or a
/// later write. Nobody waits for it: a client that proposed it before the crash got its answer
/// then, or an indeterminate error.
fn already_applied(cmd: &Command) -> CommandResult {
    match cmd {
        Command::Put { .. } => CommandResult::Put,
        Command::Delete { .. } => CommandResult::Delete { existed: true },
        Command::CompareAndSet { .. } => CommandResult::CasApplied,
        // Its outcome is not kept; the map already holds its effect or a later one.
        Command::Meta(_) => CommandResult::NoOp,
    }
}

/// Records a write of `key` (`None`: delete) at log `index` in the chunk and the overlay.
fn set(
    overlay: &mut HashMap<Vec<u8>, Option<Versioned>>,
    writes: &mut Vec<Write>,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
    index: u64,
) {
    let versioned = value.map(|value| Versioned {
        version: index,
        value,
    });
    writes.push(match &versioned {
        Some(v) => Write::Put(key.clone(), v.clone()),
        None => Write::Delete(key.clone(), index),
    });
    overlay.insert(key, versioned);
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        self.snapshot.clone().map_err(io::Error::other)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        self.membership()
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut chunk = Vec::new();
        while let Some(item) = entries.next().await {
            chunk.push(item?);
            if chunk.len() == APPLY_CHUNK {
                self.apply_chunk(std::mem::take(&mut chunk)).await?;
            }
        }
        if chunk.is_empty() {
            return Ok(());
        }
        self.apply_chunk(chunk).await
    }

    async fn try_create_snapshot_builder(&mut self, _force: bool) -> Option<Self::SnapshotBuilder> {
        Some(self.get_snapshot_builder().await)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let snapshot = self.build().map_err(|e| {
            tracing::error!(shard = self.shard, error = %e, "building a snapshot failed");
            format!("shard {}: building a snapshot failed: {e}", self.shard)
        });
        SnapshotBuilder { snapshot }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotFile,
    ) -> Result<(), io::Error> {
        let index = meta.last_log_id.as_ref().map_or(0, |l| l.index());
        let name = self.snapshots.next_name(index)?;
        let local = snapshot.copy_to(self.snapshots.path(), &name)?;
        let file_meta: SnapshotMeta =
            decode_serde(&local.verify()?).map_err(|e| invalid(self.shard, "snapshot meta", e))?;
        if &file_meta != meta {
            return Err(Error::corruption(
                local.path(),
                0,
                format!(
                    "snapshot file describes {file_meta:?}, but install was asked for {meta:?}"
                ),
            )
            .into());
        }
        self.load(meta, &local)?;
        self.snapshots.remove_all_except(local.path())?;
        tracing::info!(shard = self.shard, last = ?meta.last_log_id, "installed snapshot");
        self.current = Some((meta.clone(), local));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        Ok(self.current.as_ref().map(|(meta, file)| Snapshot {
            meta: meta.clone(),
            snapshot: file.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{log_id, normal_entry};
    use crate::storage::StoreOptions;

    const SHARD: u64 = 3;

    fn put(key: &str, value: &str) -> Command {
        Command::Put {
            key: key.into(),
            value: value.into(),
        }
    }

    fn del(key: &str) -> Command {
        Command::Delete { key: key.into() }
    }

    fn cas(key: &str, expected: Option<&str>, new: Option<&str>) -> Command {
        Command::CompareAndSet {
            key: key.into(),
            expected: expected.map(Into::into),
            new: new.map(Into::into),
        }
    }

    /// Three chunks of commands. The second is the one torn by a crash; its opening commands
    /// are the histories that a replay deciding entries again against later state gets wrong:
    /// a compare-and-set that failed would succeed, and the conditional write after it fail.
    fn history() -> [Vec<Command>; 3] {
        let scene = vec![put("a", "v"), put("b", "v"), put("c", "v"), put("d", "v")];
        let mut torn = vec![
            cas("a", None, Some("x")),      // fails: a is "v"
            cas("a", Some("v"), None),      // deletes a
            cas("b", Some("r"), Some("q")), // fails: b is "v"
            cas("b", Some("v"), Some("r")), // b = "r"
            del("c"),                       // deletes c
            cas("c", None, Some("y")),      // c = "y"
            cas("c", Some("y"), None),      // deletes c again
        ];
        let mut after = Vec::new();
        // Then a deterministic mix over other keys (a small LCG: no dependency for a test),
        // which leaves the keys above as the torn chunk made them.
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize
        };
        let values = [None, Some("v"), Some("x"), Some("y"), Some("r")];
        for i in 0..60 {
            let key = ["d", "e", "f"][next() % 3];
            let cmd = match next() % 4 {
                0 => put(key, values[1 + next() % 4].unwrap()),
                1 => del(key),
                _ => cas(key, values[next() % 5], values[next() % 5]),
            };
            if i < 30 {
                torn.push(cmd)
            } else {
                after.push(cmd)
            }
        }
        [scene, torn, after]
    }

    fn entries(commands: &[Command], first: u64) -> Vec<Entry> {
        commands
            .iter()
            .enumerate()
            .map(|(i, c)| normal_entry(log_id(1, 1, first + i as u64), c.clone()))
            .collect()
    }

    /// Every live key's stored value (tombstones left out: which of them are still there
    /// depends on when snapshots purged them).
    fn state(sm: &StateMachine) -> Vec<(Vec<u8>, Vec<u8>)> {
        sm.tree
            .pairs()
            .map(Result::unwrap)
            .filter(|(_, v)| Versioned::decode(v).is_some())
            .collect()
    }

    #[test]
    fn a_crash_in_the_middle_of_an_apply_replays_to_the_same_state() {
        let [scene, torn, after] = history();
        let all: Vec<Command> = [&scene[..], &torn[..], &after[..]].concat();
        let first_torn = 1 + scene.len() as u64;

        let reference_dir = tempfile::tempdir().unwrap();
        let store = Store::open(reference_dir.path(), StoreOptions::default()).unwrap();
        let mut reference = StateMachine::open(&store, SHARD, None).unwrap();
        reference.apply_entries(entries(&scene, 1)).unwrap();
        reference.apply_entries(entries(&torn, first_torn)).unwrap();
        reference
            .apply_entries(entries(&after, first_torn + torn.len() as u64))
            .unwrap();
        let expected = state(&reference);
        assert!(!expected.is_empty());

        // Every crash point of the torn chunk: after 0, 1, 2, ... of its sled operations.
        let mut cut = 0;
        loop {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
            let mut sm = StateMachine::open(&store, SHARD, None).unwrap();
            sm.apply_entries(entries(&scene, 1)).unwrap();
            let (_, complete) = sm
                .apply_entries_torn(entries(&torn, first_torn), cut)
                .unwrap();
            drop(sm);
            // Restart: openraft replays every entry after the recovered applied marker.
            let mut sm = StateMachine::open(&store, SHARD, None).unwrap();
            let applied = sm.last_applied().unwrap().map_or(0, |l| l.index());
            // A snapshot built before the replay carries sled's writes past the marker; a
            // replica that installs it replays the same entries from there.
            let snapshot = sm.build().unwrap();
            let other_dir = tempfile::tempdir().unwrap();
            let other_store = Store::open(other_dir.path(), StoreOptions::default()).unwrap();
            let mut other = StateMachine::open(&other_store, SHARD, None).unwrap();
            other.load(&snapshot.meta, &snapshot.snapshot).unwrap();
            for (who, sm) in [
                ("the crashed replica", &mut sm),
                ("a replica installing its snapshot", &mut other),
            ] {
                let replay = entries(&all[applied as usize..], applied + 1);
                if cut % 2 == 0 {
                    sm.apply_entries(replay).unwrap();
                } else {
                    for entry in replay {
                        sm.apply_entries(vec![entry]).unwrap();
                    }
                }
                assert_eq!(
                    state(sm),
                    expected,
                    "crash after {cut} sled operations of the torn chunk: {who}"
                );
                assert_eq!(
                    sm.last_applied().unwrap().map(|l| l.index()),
                    Some(all.len() as u64)
                );
            }
            if complete {
                break;
            }
            cut += 1;
        }
        // The torn chunk's key writes and tombstones, plus its marker: every crash point seen.
        assert!(cut >= 20, "the torn chunk had only {cut} sled operations");
    }

    #[test]
    fn a_snapshot_drops_the_tombstones_no_replay_can_need() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let mut sm = StateMachine::open(&store, SHARD, None).unwrap();
        sm.apply_entries(entries(&[put("a", "1"), del("a"), put("b", "2")], 1))
            .unwrap();
        assert_eq!(sm.tree.stored(b"a").unwrap().deleted_at, Some(2));
        sm.build().unwrap();
        let a = sm.tree.stored(b"a").unwrap();
        assert_eq!(a, crate::storage::Stored::default());
        assert_eq!(sm.tree.stored(b"b").unwrap().last_write(), Some(3));
    }
}
