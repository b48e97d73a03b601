//! The node-wide write-ahead log: every shard's Raft log entries, votes, committed markers and
//! purge points, in one sequence of append-only segment files with group-commit `fdatasync`.
//!
//! Why our own log (ARCHITECTURE.md, "Storage"): sled's `flush` is `sync_file_range`, not an
//! fsync, so it cannot make a vote or an entry durable before it is acknowledged; and the Raft
//! log churns (append, then purge), which sled's never-shrinking files handle badly.
//!
//! # Contract
//!
//! - [`Wal::append`] / [`Wal::save_vote`] write the record (`pwrite`) before returning, so the
//!   entries are readable at once; their `on_durable` callback runs only after an `fdatasync`
//!   that covers them, and callbacks run in write order (`group_commit.rs`).
//! - All writes of all shards go through one file in one order, so a vote is never durable
//!   before an earlier append, nor the reverse (openraft's IO-ordering rule).
//! - [`Wal::retire`] forgets a shard whose replica left the node, durably before it returns;
//!   replay drops everything the shard had before the `Retire` record, and a later record
//!   starts a new log for it.
//! - `truncate_after`, `purge` and `save_committed` need no sync of their own: losing one in a
//!   crash is the same as the crash happening just before it, and any later sync covers it.
//!   The one thing never done on the strength of an unsynced record is deleting a segment
//!   (below): a `purge` that frees segments waits for a group commit before unlinking them.
//! - On open, segments are replayed to rebuild each shard's index (`index.rs`); a torn tail is
//!   cut off and the surviving tail fsynced before anything is reported as stored; damage
//!   anywhere else is [`Error::Corruption`] naming the segment and offset (`segment.rs`).
//! - A segment is deleted once no shard has a live entry in it (every shard purged or truncated
//!   past it) **and the records that made it so are durable**. Each segment starts with a
//!   checkpoint of every shard's vote, committed and purge markers and log start, so nothing but
//!   dead entries goes with it.
//!
//! # Deleting segments
//!
//! The rule: a segment is unlinked only behind a *durable* horizon. `collect_garbage` takes the
//! horizon (the oldest segment holding a live entry of any shard, or the active segment) from
//! the in-memory index, which reflects every record written so far; then, unless everything
//! written is already synced, it queues a waiter on the group commit and waits for it. The
//! waiter fires only after an `fdatasync` covering every byte written before it was queued
//! (`group_commit.rs`; bytes in segments sealed meanwhile were synced by the rotation), so the
//! purge and truncate records the horizon was computed from are on disk before the first
//! unlink. A purge that frees a segment thus waits for one group commit, about once per
//! `segment_bytes` of log written; other purges return at once.
//!
//! Why that is safe: recovery replays some durable prefix of the record sequence, and that
//! prefix contains the records the horizon was computed from. Entries dead at that point stay
//! dead (later records add entries only to the active segment or newer ones, all at or past the
//! horizon, or remove entries), so every entry live in the replayed prefix sits in a surviving
//! segment; and every marker in a deleted segment is restated by the checkpoint of the first
//! surviving one, written after everything older. Replay therefore rebuilds exactly the state
//! the prefix describes, as if nothing had been deleted. Were a segment unlinked before the
//! purge that freed it is durable, a power loss in between would leave the first surviving
//! checkpoint's older log start with its entries gone: the log refuses to open ("entries
//! missing"), or a shard whose entries were all purged comes back empty and unpurged, its log
//! regressed (`tests/storage/wal.rs`, `a_power_loss_after_*`).
//!
//! The directory: recovery refuses a hole in the segment ids, so deletions are serialized
//! (`Shared::gc`) and go oldest first, one unlink then one directory fsync at a time: whatever
//! subset of unlinks a power loss keeps, the segments on disk stay a contiguous run. An unlink
//! that is lost brings back a segment whose garbage status is durable; replaying it changes
//! nothing (the case above, with nothing deleted), and the next collection (at latest on the next
//! open) deletes it again. A segment's file is only removed from the readers' map once its unlink
//! is durable, so a failed deletion is retried first, before any newer segment goes. Creation
//! (`rotate`) syncs the new file and the directory before writing to it and only ever adds the
//! newest id, while deletion never reaches the active segment: the two work at opposite ends of
//! the run, so the order in which they reach the disk cannot make a hole.
//!
//! The log knows nothing of Raft: entries and markers are opaque bytes.

mod group_commit;
mod index;
mod record;
mod segment;

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::ops::RangeBounds;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;

pub use group_commit::{Fdatasync, Syncer, Waiter};
pub use record::ShardMeta;

use crate::storage::codec::{self, Frame};
use crate::storage::durable_file::sync_dir;
use crate::storage::error::{Error, Result};
use index::{Loc, ShardIndex};
use record::{Envelope, Record};
use segment::{Scanned, list_segments, scan, segment_path};

/// A frame's position: `(segment, offset)`.
type FrameKey = (u64, u64);

/// Tunables of the write-ahead log.
#[derive(Clone)]
pub struct WalOptions {
    /// A segment is sealed and a new one started once it would grow past this many bytes.
    /// Smaller segments free disk sooner after purges; larger ones rotate (two extra syncs)
    /// less often. Default 64 MiB.
    pub segment_bytes: u64,
    /// How bytes are made durable. [`Fdatasync`] in production; tests wrap it to count syncs.
    pub syncer: Arc<dyn Syncer>,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_bytes: 64 * 1024 * 1024,
            syncer: Arc::new(Fdatasync),
        }
    }
}

impl std::fmt::Debug for WalOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalOptions")
            .field("segment_bytes", &self.segment_bytes)
            .finish_non_exhaustive()
    }
}

/// Counters since the log was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalStats {
    /// `fdatasync` calls made by the group-commit thread (rotations excluded).
    pub syncs: u64,
    /// Total time spent in those syncs.
    pub sync_nanos: u64,
    /// Records written.
    pub records: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Durability callbacks fired with success.
    pub acknowledged: u64,
    /// Segments created (including by rotation).
    pub segments_created: u64,
    /// Segments deleted after every shard purged past them.
    pub segments_deleted: u64,
}

/// What the log holds for one shard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardState {
    /// First live entry, if any.
    pub first_index: Option<u64>,
    /// Last live entry, if any.
    pub last_index: Option<u64>,
    /// Vote, committed and purge markers.
    pub meta: ShardMeta,
}

/// The node-wide write-ahead log. Cheap to share behind an `Arc`; dropping the last handle
/// acknowledges what is pending, stops the group-commit thread and releases the directory.
pub struct Wal {
    shared: Arc<Shared>,
    sync_thread: Mutex<Option<JoinHandle<()>>>,
}

pub(crate) struct Shared {
    dir: PathBuf,
    segment_bytes: u64,
    syncer: Arc<dyn Syncer>,
    state: Mutex<State>,
    wake: Condvar,
    stats: Counters,
    /// Serializes segment deletion, so that segments are unlinked strictly oldest first (see
    /// the module doc, "Deleting segments"). Never taken while `state` is held.
    gc: Mutex<()>,
    /// Held for the log's lifetime: a second process on the same directory is refused.
    _lock: File,
}

#[derive(Default)]
struct Counters {
    syncs: AtomicU64,
    sync_nanos: AtomicU64,
    records: AtomicU64,
    bytes: AtomicU64,
    acknowledged: AtomicU64,
    segments_created: AtomicU64,
    segments_deleted: AtomicU64,
}

pub(crate) struct State {
    active: Active,
    /// Every live segment, including the active one, for readers.
    segments: BTreeMap<u64, Arc<File>>,
    shards: HashMap<u64, ShardIndex>,
    /// Callbacks waiting for the next sync, in write order.
    pending: Vec<Waiter>,
    /// `(segment, offset)`: bytes of that segment before the offset are known durable.
    synced: (u64, u64),
    /// Set after a failed write or sync; the log then refuses everything.
    failed: Option<String>,
    shutdown: bool,
    /// Reused frame buffer.
    buf: Vec<u8>,
}

struct Active {
    id: u64,
    file: Arc<File>,
    len: u64,
    /// Length once the header and checkpoint were written.
    base_len: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("WAL mutex poisoned")
    }
}

impl Wal {
    /// Opens (or creates) the log in `dir`, replaying every segment.
    pub fn open(dir: impl AsRef<Path>, options: WalOptions) -> Result<Wal> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::io(
                    &lock_path,
                    io::Error::new(
                        io::ErrorKind::WouldBlock,
                        "the WAL directory is in use by another process",
                    ),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&lock_path, e)),
        }

        let stats = Counters::default();
        let state = recover(&dir, &options, &stats)?;
        let shared = Arc::new(Shared {
            dir,
            segment_bytes: options.segment_bytes,
            syncer: options.syncer,
            state: Mutex::new(state),
            wake: Condvar::new(),
            stats,
            gc: Mutex::new(()),
            _lock: lock,
        });
        let thread_shared = shared.clone();
        let sync_thread = std::thread::Builder::new()
            .name("kvnode-wal-sync".into())
            .spawn(move || group_commit::run(thread_shared))
            .map_err(|e| Error::io(&shared.dir, e))?;
        let wal = Wal {
            shared,
            sync_thread: Mutex::new(Some(sync_thread)),
        };
        // Everything replayed is durable now, so this never waits; it deletes segments whose
        // unlink a power loss undid, or that a crash kept the last purge from deleting.
        wal.collect_garbage()?;
        Ok(wal)
    }

    /// The directory holding the segments.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Appends `entries` to `shard`'s log at `first_index..`, replacing any entries at or after
    /// `first_index`. The entries are readable when this returns; `on_durable` runs once they
    /// are on disk (or with the error that stopped the log).
    pub fn append(
        &self,
        shard: u64,
        first_index: u64,
        entries: Vec<Vec<u8>>,
        on_durable: Waiter,
    ) -> Result<()> {
        let record = Record::Append {
            shard,
            first_index,
            entries,
        };
        self.write(&record, Some(on_durable))
    }

    /// Saves `shard`'s vote; `on_durable` runs once it is on disk.
    pub fn save_vote(&self, shard: u64, vote: Vec<u8>, on_durable: Waiter) -> Result<()> {
        self.write(&Record::Vote { shard, vote }, Some(on_durable))
    }

    /// Runs `on_durable` once everything written so far is on disk, without writing anything.
    pub fn after_pending_writes(&self, on_durable: Waiter) -> Result<()> {
        let mut st = self.shared.lock();
        if st.shutdown {
            return Err(Error::Shutdown);
        }
        if let Some(reason) = &st.failed {
            return Err(Error::WalFailed(reason.clone()));
        }
        st.pending.push(on_durable);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Saves `shard`'s committed marker (no sync of its own; see the module doc).
    pub fn save_committed(&self, shard: u64, committed: Option<Vec<u8>>) -> Result<()> {
        self.write(&Record::Committed { shard, committed }, None)
    }

    /// Removes `shard`'s entries after `after` (`None`: all of them).
    pub fn truncate_after(&self, shard: u64, after: Option<u64>) -> Result<()> {
        self.write(&Record::Truncate { shard, after }, None)
    }

    /// Purges `shard`'s entries up to and including `upto`, remembering `marker` as the purge
    /// point; then deletes segments no shard needs any more. If it deletes any, it first waits
    /// for a group commit covering the purge (module doc, "Deleting segments"), so it may block
    /// for an `fdatasync`.
    pub fn purge(&self, shard: u64, upto: u64, marker: Vec<u8>) -> Result<()> {
        self.write(
            &Record::Purge {
                shard,
                upto,
                marker,
            },
            None,
        )?;
        self.collect_garbage()
    }

    /// Forgets `shard`'s log: entries, vote, committed and purge markers (a replica that
    /// left this node, docs/design/membership.md §4.5). Returns once the `Retire` record is
    /// durable, so the caller may then delete the replica's state: after a crash the log never
    /// holds a retired shard's entries without its state, nor the reverse in a way that
    /// matters (a retire lost before it was durable finds the state still there). Then
    /// deletes segments no shard needs any more. Blocks for an `fdatasync`.
    ///
    /// A later append, vote or marker for `shard` starts a new log from nothing.
    pub fn retire(&self, shard: u64) -> Result<()> {
        self.write(&Record::Retire { shard }, None)?;
        self.wait_for_group_commit()?;
        self.collect_garbage()
    }

    /// The live entries of `shard` within `range`, in index order, as `(index, bytes)`.
    pub fn read(&self, shard: u64, range: impl RangeBounds<u64>) -> Result<Vec<(u64, Vec<u8>)>> {
        let (locs, files) = {
            let st = self.shared.lock();
            let Some(log) = st.shards.get(&shard) else {
                return Ok(Vec::new());
            };
            let locs: Vec<(u64, Loc)> = log.entries.range(range).map(|(i, l)| (*i, *l)).collect();
            let mut files: Vec<(u64, Arc<File>)> = Vec::new();
            for (_, loc) in &locs {
                if files.last().is_none_or(|(id, _)| *id != loc.segment) {
                    let file = st.segments.get(&loc.segment).cloned().ok_or_else(|| {
                        Error::corruption(
                            segment_path(&self.shared.dir, loc.segment),
                            loc.offset,
                            "index points into a segment that is gone",
                        )
                    })?;
                    files.push((loc.segment, file));
                }
            }
            (locs, files)
        };

        let mut out = Vec::with_capacity(locs.len());
        // The frame last read, keyed by (segment, offset), with its decoded entries.
        let mut current: Option<(FrameKey, Vec<Vec<u8>>)> = None;
        for (index, loc) in locs {
            let key = (loc.segment, loc.offset);
            if current.as_ref().is_none_or(|(k, _)| *k != key) {
                let file = &files
                    .iter()
                    .find(|(id, _)| *id == loc.segment)
                    .expect("file collected above")
                    .1;
                current = Some((key, self.read_append(file, loc)?));
            }
            let (_, entries) = current.as_mut().expect("set above");
            let entry = entries.get_mut(loc.slot as usize).ok_or_else(|| {
                Error::corruption(
                    segment_path(&self.shared.dir, loc.segment),
                    loc.offset,
                    format!("record has no entry slot {}", loc.slot),
                )
            })?;
            out.push((index, std::mem::take(entry)));
        }
        Ok(out)
    }

    fn read_append(&self, file: &File, loc: Loc) -> Result<Vec<Vec<u8>>> {
        let path = || segment_path(&self.shared.dir, loc.segment);
        let mut buf = vec![0u8; loc.len as usize];
        file.read_exact_at(&mut buf, loc.offset)
            .map_err(|e| Error::io(path(), e))?;
        let Frame::Valid {
            version, payload, ..
        } = codec::decode_frame(&buf)
        else {
            return Err(Error::corruption(
                path(),
                loc.offset,
                "record checksum mismatch on read",
            ));
        };
        if version != record::RECORD_VERSION {
            return Err(Error::corruption(
                path(),
                loc.offset,
                format!("record version {version} on read"),
            ));
        }
        match Envelope::decode(payload) {
            Ok(Envelope {
                record: Record::Append { entries, .. },
                ..
            }) => Ok(entries),
            Ok(other) => Err(Error::corruption(
                path(),
                loc.offset,
                format!("expected entries, found {:?}", other.record),
            )),
            Err(e) => Err(Error::corruption(path(), loc.offset, e)),
        }
    }

    /// What the log holds for `shard` (empty if it never wrote anything).
    pub fn shard_state(&self, shard: u64) -> ShardState {
        let st = self.shared.lock();
        st.shards
            .get(&shard)
            .map(|log| ShardState {
                first_index: log.first_index(),
                last_index: log.last_index(),
                meta: log.meta.clone(),
            })
            .unwrap_or_default()
    }

    /// `shard`'s last saved vote.
    pub fn vote(&self, shard: u64) -> Option<Vec<u8>> {
        let st = self.shared.lock();
        st.shards.get(&shard).and_then(|log| log.meta.vote.clone())
    }

    /// Every shard the log has a record of.
    pub fn shards(&self) -> Vec<u64> {
        let st = self.shared.lock();
        let mut ids: Vec<u64> = st.shards.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Counters since open.
    pub fn stats(&self) -> WalStats {
        let c = &self.shared.stats;
        WalStats {
            syncs: c.syncs.load(Ordering::Relaxed),
            sync_nanos: c.sync_nanos.load(Ordering::Relaxed),
            records: c.records.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            acknowledged: c.acknowledged.load(Ordering::Relaxed),
            segments_created: c.segments_created.load(Ordering::Relaxed),
            segments_deleted: c.segments_deleted.load(Ordering::Relaxed),
        }
    }

    /// Live segment ids, oldest first.
    pub fn segment_ids(&self) -> Vec<u64> {
        self.shared.lock().segments.keys().copied().collect()
    }

    /// Bytes the live segments occupy on disk.
    pub fn disk_usage(&self) -> Result<u64> {
        let mut total = 0;
        for id in self.segment_ids() {
            let path = segment_path(&self.shared.dir, id);
            match fs::metadata(&path) {
                Ok(m) => total += m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {} // deleted meanwhile
                Err(e) => return Err(Error::io(path, e)),
            }
        }
        Ok(total)
    }

    fn write(&self, record: &Record, on_durable: Option<Waiter>) -> Result<()> {
        let encoded = codec::encode(record);
        let shared = &self.shared;
        let mut st = shared.lock();
        if st.shutdown {
            return Err(Error::Shutdown);
        }
        if let Some(reason) = &st.failed {
            return Err(Error::WalFailed(reason.clone()));
        }
        if let Record::Append {
            shard, first_index, ..
        } = record
        {
            let log = st.shards.get(shard);
            if let Err(detail) = log.map_or(Ok(()), |log| log.check_append(*first_index)) {
                return Err(Error::InvalidLogOp {
                    shard: *shard,
                    detail,
                });
            }
        }

        let frame_len = codec::FRAME_HEADER_LEN as u64 + 1 + 8 + encoded.len() as u64;
        // Never rotate a segment holding only its checkpoint: a record larger than a segment
        // gets a segment of its own instead of rotating forever.
        let has_records = st.active.len > st.active.base_len;
        if st.active.len + frame_len > shared.segment_bytes
            && has_records
            && let Err(e) = rotate(shared, &mut st)
        {
            st.failed = Some(e.to_string());
            return Err(e);
        }

        let synced_upto = st.synced_upto();
        let mut buf = std::mem::take(&mut st.buf);
        buf.clear();
        Envelope::frame(synced_upto, &encoded, &mut buf);
        let offset = st.active.len;
        let written = st.active.file.write_all_at(&buf, offset);
        let len = buf.len();
        st.buf = buf;
        if let Err(e) = written {
            let err = Error::io(segment_path(&shared.dir, st.active.id), e);
            tracing::error!(error = %err, "WAL write failed; the log refuses further writes");
            st.failed = Some(err.to_string());
            return Err(err);
        }
        let segment = st.active.id;
        st.active.len += len as u64;
        apply(&mut st.shards, segment, offset, len as u32, record);
        shared.stats.records.fetch_add(1, Ordering::Relaxed);
        shared.stats.bytes.fetch_add(len as u64, Ordering::Relaxed);
        if let Some(waiter) = on_durable {
            st.pending.push(waiter);
            shared.wake.notify_one();
        }
        Ok(())
    }

    /// Deletes the segments no shard has a live entry in, once the records that made them so
    /// are durable, oldest first (module doc, "Deleting segments").
    fn collect_garbage(&self) -> Result<()> {
        let shared = &self.shared;
        if !shared.lock().has_garbage() {
            return Ok(());
        }
        let _gc = shared.gc.lock().expect("WAL GC mutex poisoned");
        let (horizon, all_synced) = {
            let st = shared.lock();
            if !st.has_garbage() {
                return Ok(()); // another purge collected it meanwhile
            }
            (
                st.oldest_needed(),
                st.synced == (st.active.id, st.active.len),
            )
        };
        if !all_synced {
            self.wait_for_group_commit()?;
        }
        // Durable now: every record written before the horizon was taken (see above).
        loop {
            let Some(id) = shared
                .lock()
                .segments
                .keys()
                .next()
                .copied()
                .filter(|id| *id < horizon)
            else {
                return Ok(());
            };
            let path = segment_path(&shared.dir, id);
            match fs::remove_file(&path) {
                Ok(()) => {}
                // Unlinked by an earlier attempt whose directory sync failed.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&path, e)),
            }
            sync_dir(&shared.dir)?;
            shared.lock().segments.remove(&id);
            shared
                .stats
                .segments_deleted
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                segment = id,
                horizon,
                "deleted WAL segment: no shard has a live entry in it, durably"
            );
        }
    }

    /// Blocks until an `fdatasync` has covered every byte written so far.
    fn wait_for_group_commit(&self) -> Result<()> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.after_pending_writes(Box::new(move |result| {
            let _ = tx.send(result);
        }))?;
        rx.recv().unwrap_or_else(|_| {
            Err(Error::WalFailed(
                "the group-commit thread stopped without acknowledging".into(),
            ))
        })
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.wake.notify_all();
        if let Some(handle) = self.sync_thread.lock().expect("poisoned").take() {
            let _ = handle.join();
        }
    }
}

impl State {
    /// The oldest segment still needed: the one holding the oldest live entry of any shard, or
    /// the active segment if that is older.
    fn oldest_needed(&self) -> u64 {
        self.shards
            .values()
            .filter_map(|log| log.entries.values().next().map(|loc| loc.segment))
            .min()
            .map_or(self.active.id, |oldest| oldest.min(self.active.id))
    }

    /// Whether some segment is older than every one still needed.
    fn has_garbage(&self) -> bool {
        self.segments
            .keys()
            .next()
            .is_some_and(|first| *first < self.oldest_needed())
    }

    /// The watermark to stamp on a record written now into the active segment.
    fn synced_upto(&self) -> u64 {
        if self.synced.0 == self.active.id {
            self.synced.1
        } else {
            0
        }
    }
}

/// Applies a record (just written, or replayed) to the in-memory indexes.
fn apply(
    shards: &mut HashMap<u64, ShardIndex>,
    segment: u64,
    offset: u64,
    len: u32,
    record: &Record,
) {
    match record {
        Record::Append {
            shard,
            first_index,
            entries,
        } => {
            let log = shards.entry(*shard).or_default();
            let frame = Loc {
                segment,
                offset,
                len,
                slot: 0,
            };
            log.append(*first_index, entries.len(), frame);
            if let Some(purged) = log.purged_index() {
                log.entries = log.entries.split_off(&(purged + 1));
            }
        }
        Record::Vote { shard, vote } => {
            shards.entry(*shard).or_default().meta.vote = Some(vote.clone());
        }
        Record::Committed { shard, committed } => {
            shards.entry(*shard).or_default().meta.committed = committed.clone();
        }
        Record::Truncate { shard, after } => {
            shards.entry(*shard).or_default().truncate_after(*after);
        }
        Record::Purge {
            shard,
            upto,
            marker,
        } => {
            shards
                .entry(*shard)
                .or_default()
                .purge(*upto, marker.clone());
        }
        Record::Checkpoint { shards: metas } => {
            for (shard, meta, start) in metas {
                shards
                    .entry(*shard)
                    .or_default()
                    .apply_checkpoint(meta.clone(), *start);
            }
        }
        Record::Seal { .. } => {}
        Record::Retire { shard } => {
            shards.remove(shard);
        }
    }
}

/// Seals the active segment and starts the next one (called with the lock held).
fn rotate(shared: &Shared, st: &mut State) -> Result<()> {
    let old = st.active.id;
    let next = old + 1;
    let mut buf = Vec::new();
    Envelope::frame(
        st.synced_upto(),
        &codec::encode(&Record::Seal { next_segment: next }),
        &mut buf,
    );
    let old_path = segment_path(&shared.dir, old);
    st.active
        .file
        .write_all_at(&buf, st.active.len)
        .map_err(|e| Error::io(&old_path, e))?;
    st.active.len += buf.len() as u64;
    shared
        .syncer
        .sync(&st.active.file)
        .map_err(|e| Error::io(&old_path, e))?;

    let (file, len) = create_segment(&shared.dir, next, &st.shards, shared.syncer.as_ref())?;
    let file = Arc::new(file);
    st.segments.insert(next, file.clone());
    st.active = Active {
        id: next,
        file,
        len,
        base_len: len,
    };
    st.synced = (next, len);
    shared
        .stats
        .segments_created
        .fetch_add(1, Ordering::Relaxed);
    tracing::debug!(sealed = old, active = next, "rotated WAL segment");
    Ok(())
}

/// Creates segment `id` holding its header and a checkpoint of `shards`, durably.
fn create_segment(
    dir: &Path,
    id: u64,
    shards: &HashMap<u64, ShardIndex>,
    syncer: &dyn Syncer,
) -> Result<(File, u64)> {
    let path = segment_path(dir, id);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    let mut metas: Vec<(u64, ShardMeta, Option<u64>)> = shards
        .iter()
        .map(|(s, log)| (*s, log.meta.clone(), log.start))
        .collect();
    metas.sort_unstable_by_key(|(s, _, _)| *s);
    let mut buf = segment::encode_header(id).to_vec();
    Envelope::frame(
        0,
        &codec::encode(&Record::Checkpoint { shards: metas }),
        &mut buf,
    );
    file.write_all_at(&buf, 0)
        .map_err(|e| Error::io(&path, e))?;
    syncer.sync(&file).map_err(|e| Error::io(&path, e))?;
    sync_dir(dir)?;
    Ok((file, buf.len() as u64))
}

/// Replays the segments in `dir` and returns the state to continue from.
fn recover(dir: &Path, options: &WalOptions, stats: &Counters) -> Result<State> {
    let run = list_segments(dir)?;
    // Segments are created and deleted in id order, so the ids are contiguous; a hole means a
    // file was lost, and with it entries or markers some shard may still need.
    if let Some(w) = run.windows(2).find(|w| w[0] + 1 != w[1]) {
        return Err(Error::corruption(
            segment_path(dir, w[0] + 1),
            0,
            format!(
                "WAL segment {} is missing (segments {} and {} exist)",
                w[0] + 1,
                w[0],
                w[1]
            ),
        ));
    }

    let mut shards: HashMap<u64, ShardIndex> = HashMap::new();
    let mut segments: BTreeMap<u64, Arc<File>> = BTreeMap::new();
    let mut active: Option<Active> = None;
    let mut next_id = run.last().map_or(1, |id| id + 1);

    for (i, &id) in run.iter().enumerate() {
        let is_last = i + 1 == run.len();
        let path = segment_path(dir, id);
        let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let Scanned {
            records,
            valid_len,
            sealed,
            torn_bytes,
        } = scan(&path, id, &bytes, is_last)?;
        if !is_last && sealed != Some(id + 1) {
            return Err(Error::corruption(
                &path,
                valid_len,
                format!("seal names segment {sealed:?}, expected {}", id + 1),
            ));
        }
        for r in &records {
            apply(&mut shards, id, r.offset, r.len, &r.record);
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        if !is_last {
            segments.insert(id, Arc::new(file));
            continue;
        }
        if torn_bytes > 0 {
            tracing::warn!(
                segment = %path.display(),
                offset = valid_len,
                bytes = torn_bytes,
                "cutting off a torn WAL tail (writes that were never acknowledged)"
            );
            file.set_len(valid_len).map_err(|e| Error::io(&path, e))?;
        }
        if records.is_empty() {
            // Created but never completed: it holds nothing, not even its checkpoint.
            drop(file);
            fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            next_id = id;
            continue;
        }
        // Make the recovered tail durable before anything in it is reported as stored, or
        // segments are deleted on its strength: after a kill -9 it may still be only in the
        // page cache. That holds for a sealed last segment too (the process died between the
        // seal and the rotation's sync); the segments before the last were synced by the
        // rotation that created their successor.
        options
            .syncer
            .sync(&file)
            .map_err(|e| Error::io(&path, e))?;
        if let Some(next) = sealed {
            segments.insert(id, Arc::new(file));
            next_id = next;
        } else {
            let file = Arc::new(file);
            segments.insert(id, file.clone());
            active = Some(Active {
                id,
                file,
                len: valid_len,
                base_len: records[0].offset + u64::from(records[0].len),
            });
        }
    }

    for (shard, log) in &shards {
        log.check_contiguous().map_err(|detail| {
            Error::corruption(
                dir,
                0,
                format!("shard {shard}'s log is not contiguous after replay: {detail}"),
            )
        })?;
    }

    let active = match active {
        Some(active) => active,
        None => {
            let (file, len) = create_segment(dir, next_id, &shards, options.syncer.as_ref())?;
            stats.segments_created.fetch_add(1, Ordering::Relaxed);
            let file = Arc::new(file);
            segments.insert(next_id, file.clone());
            Active {
                id: next_id,
                file,
                len,
                base_len: len,
            }
        }
    };

    let synced = (active.id, active.len);
    Ok(State {
        active,
        segments,
        shards,
        pending: Vec::new(),
        synced,
        failed: None,
        shutdown: false,
        buf: Vec::new(),
    })
}
