//! Durable storage of one node, behind narrow seams: the Raft write-ahead log ([`wal`]), the
//! shards' state-machine trees in sled ([`state_tree`]) and snapshot files ([`snapshot_file`]).
//!
//! This module knows nothing of Raft; the `raft` module encodes its types into the opaque bytes
//! stored here. A data directory looks like:
//!
//! ```text
//! <data-dir>/FORMAT            "kvnode data directory" + format version; checked on open
//! <data-dir>/IDENTITY          node id and shard count, fixed at creation; the cluster uuid
//!                              once the cluster map is known (format 3)
//! <data-dir>/CLUSTER           the newest cluster map this node has seen (a cache, format 3)
//! <data-dir>/wal/              segments of the node-wide write-ahead log (+ LOCK)
//! <data-dir>/sm/               the sled database holding every shard's state-machine tree
//! <data-dir>/snapshots/<shard> snapshot files of each shard (META's: shard u64::MAX)
//! <data-dir>/replicas/<shard>  the replica id the shard's local state belongs to
//!                              ([`replica_record`]; none = the node id)
//! ```
//!
//! A shard's local state is its WAL log, its sled tree and its snapshot folder, plus its
//! replica record. [`Store::retire_shard`] deletes all of it in that order, each step durable
//! before the next and each idempotent, so calling it again after a crash finishes the job.

pub mod cluster_cache;
pub mod codec;
pub mod durable_file;
pub mod error;
pub mod identity;
pub mod replica_record;
pub mod snapshot_file;
pub mod state_tree;
pub mod wal;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use error::{Error, Result};
pub use identity::Identity;
pub use snapshot_file::{SnapshotDir, SnapshotFile, SnapshotWriter};
pub use state_tree::{StateTree, Stored, TreeReader, Versioned, Write};
pub use wal::{Wal, WalOptions};

/// On-disk format of a data directory written by this build. Bump it (and refuse old
/// directories, or migrate them) whenever any file's format changes incompatibly.
///
/// - 1: the first format.
/// - 2: state-machine trees hold tombstones (`storage::state_tree`), which a format-1 build
///   would read as values. A format-1 directory holds none, so this build opens it and marks
///   it format 2 first; from then on a format-1 build refuses it by name.
/// - 3: the META group (docs/design/membership.md §5): WAL records and a sled tree for shard
///   `u64::MAX`, the `CLUSTER` cache and the `uuid` line of `IDENTITY`. A format-2 build would
///   ignore all of them and run without the cluster map, so this build marks a format-2
///   directory format 3 on open, before it writes anything of the new kinds; from then on a
///   format-2 build refuses it by name.
pub const DATA_DIR_FORMAT: u32 = 3;
/// The oldest data-directory format this build opens (and upgrades on open).
const OLDEST_DATA_DIR_FORMAT: u32 = 1;

const FORMAT_FILE: &str = "FORMAT";
const FORMAT_HEADER: &str = "kvnode data directory";

/// Tunables of a node's storage.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Write-ahead log options.
    pub wal: WalOptions,
    /// sled's page cache for every shard's state machine together. sled's resident memory can
    /// reach several times this (see openraft-sled.md, sled facts); default 64 MiB.
    pub sled_cache_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            wal: WalOptions::default(),
            sled_cache_bytes: 64 * 1024 * 1024,
        }
    }
}

/// A node's open data directory: the WAL, the sled database and the snapshot folders.
#[derive(Clone)]
pub struct Store {
    dir: PathBuf,
    wal: Arc<Wal>,
    db: sled::Db,
    /// One clone per open state tree: lets [`Store::release`] wait for every user to let go.
    trees: Arc<()>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dir", &self.dir).finish()
    }
}

impl Store {
    /// Opens the data directory `dir`, creating it if it does not exist or is empty.
    ///
    /// Refuses a directory of another format ([`Error::UnsupportedFormat`]) or one with
    /// foreign files and no format marker ([`Error::NotADataDir`]).
    pub fn open(dir: impl AsRef<Path>, options: StoreOptions) -> Result<Store> {
        let dir = dir.as_ref().to_path_buf();
        check_or_create_format(&dir)?;
        let wal = Arc::new(Wal::open(dir.join("wal"), options.wal)?);
        let sm_path = dir.join("sm");
        let db = open_sled(&sm_path, options.sled_cache_bytes)?;
        if db.was_recovered() {
            tracing::debug!(path = %sm_path.display(), "opened existing state-machine store");
        }
        Ok(Store {
            dir,
            wal,
            db,
            trees: Arc::new(()),
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The node-wide write-ahead log.
    pub fn wal(&self) -> &Arc<Wal> {
        &self.wal
    }

    /// Opens `shard`'s state-machine tree.
    pub fn state_tree(&self, shard: u64) -> Result<StateTree> {
        StateTree::open(&self.db, &self.dir.join("sm"), shard, self.trees.clone())
    }

    /// Flushes, then waits (up to `timeout`) until no log store or state tree uses this
    /// store any more, and drops it: the WAL's group-commit thread stops and the directory's
    /// locks are released, so it can be reopened. Components that own log stores or state
    /// machines (openraft's tasks) may let go of them a little after they were told to stop.
    /// Returns false if something still held on when the timeout expired.
    pub async fn release(self, timeout: std::time::Duration) -> bool {
        if let Err(e) = self.flush_state() {
            tracing::warn!(error = %e, "flushing state machines failed");
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let idle = Arc::strong_count(&self.wal) == 1 && Arc::strong_count(&self.trees) == 1;
            if idle {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(dir = %self.dir.display(), "storage still in use after close");
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    /// `shard`'s snapshot folder.
    pub fn snapshot_dir(&self, shard: u64) -> SnapshotDir {
        SnapshotDir::new(self.dir.join("snapshots").join(shard.to_string()))
    }

    /// The replica id `shard`'s local state belongs to: its record ([`replica_record`]), or
    /// `legacy` (the node id) when none was written.
    pub fn shard_replica(&self, shard: u64, legacy: u64) -> Result<u64> {
        Ok(replica_record::read(&self.dir, shard)?.unwrap_or(legacy))
    }

    /// Records that `shard`'s local state belongs to `replica` (durable when it returns).
    pub fn record_shard_replica(&self, shard: u64, replica: u64) -> Result<()> {
        if replica_record::read(&self.dir, shard)? == Some(replica) {
            return Ok(());
        }
        replica_record::write(&self.dir, shard, replica)
    }

    /// Deletes `shard`'s local state: its WAL log ([`Wal::retire`], durable), then its sled
    /// trees, then its snapshot folder, then its replica record. Each step is idempotent and
    /// durable before the next starts, so after a crash anywhere in between, calling it again
    /// finishes the job (the node does so at open). Nothing of the shard may be open (no log
    /// store or state machine of it in use).
    pub fn retire_shard(&self, shard: u64) -> Result<()> {
        if self.wal.shards().contains(&shard) {
            self.wal.retire(shard)?;
        }
        state_tree::drop_shard(&self.db, &self.dir.join("sm"), shard)?;
        let snapshots = self.snapshot_dir(shard);
        let path = snapshots.path();
        match fs::remove_dir_all(path) {
            Ok(()) => durable_file::sync_dir(path.parent().unwrap_or(&self.dir))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(path, e)),
        }
        replica_record::remove(&self.dir, shard)?;
        tracing::info!(shard, "retired the shard's local state");
        Ok(())
    }

    /// Every shard this directory holds any local state of (log, tree, snapshots or record).
    pub fn shards_on_disk(&self) -> Result<std::collections::BTreeSet<u64>> {
        let mut shards: std::collections::BTreeSet<u64> = self.wal.shards().into_iter().collect();
        shards.extend(state_tree::shards_in(&self.db));
        shards.extend(replica_record::shards(&self.dir)?);
        let snapshots = self.dir.join("snapshots");
        if let Ok(entries) = fs::read_dir(&snapshots) {
            for entry in entries.flatten() {
                if let Some(shard) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
                    shards.insert(shard);
                }
            }
        }
        Ok(shards)
    }

    /// The identity the directory was created with, if it was ever set.
    pub fn identity(&self) -> Result<Option<Identity>> {
        identity::read(&self.dir)
    }

    /// Records the directory's identity (once, at creation).
    pub fn set_identity(&self, identity: &Identity) -> Result<()> {
        identity::write(&self.dir, identity)
    }

    /// Flushes sled's buffers to the OS (not an fsync: see the module doc of [`state_tree`]).
    pub fn flush_state(&self) -> Result<()> {
        self.db.flush().map(|_| ()).map_err(|source| Error::Sled {
            path: self.dir.join("sm"),
            source,
        })
    }
}

/// Checks `dir`'s FORMAT marker, or writes one if the directory is new.
fn check_or_create_format(dir: &Path) -> Result<()> {
    let path = dir.join(FORMAT_FILE);
    let marker = || format!("{FORMAT_HEADER}\nformat {DATA_DIR_FORMAT}\n");
    match fs::read_to_string(&path) {
        Ok(text) => {
            let found = parse_format(&path, &text)?;
            if found != DATA_DIR_FORMAT {
                tracing::info!(
                    dir = %dir.display(),
                    from = found,
                    to = DATA_DIR_FORMAT,
                    "upgrading the data directory's format marker"
                );
                durable_file::write_atomically(dir, FORMAT_FILE, marker().as_bytes())?;
            }
            return Ok(());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(&path, e)),
    }
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let foreign = fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .next()
        .is_some();
    if foreign {
        return Err(Error::NotADataDir {
            path: dir.to_owned(),
        });
    }
    durable_file::write_atomically(dir, FORMAT_FILE, marker().as_bytes())
}

/// Prepares the data directory of a node that joined a cluster (docs/design/membership.md §3.2
/// step 3): the format marker (the directory must be empty or hold only what an interrupted
/// earlier call left), then `CLUSTER` = `map` (the serde bytes of the map the join answered),
/// then `IDENTITY`, each durable before the next. `IDENTITY` comes last because it is what
/// makes a later start a restart: a directory without it joins again, and a join is
/// idempotent by address, so it gets the same id.
///
/// # Errors
///
/// [`Error::NotADataDir`] if `dir` holds foreign files; I/O errors.
pub fn init_joined(dir: &Path, identity: &Identity, map: &[u8]) -> Result<()> {
    check_or_create_format(dir)?;
    cluster_cache::write(dir, map)?;
    identity::write(dir, identity)
}

/// The format version a FORMAT marker names, if this build opens it.
fn parse_format(path: &Path, text: &str) -> Result<u32> {
    let mut lines = text.lines();
    let version = match (lines.next(), lines.next()) {
        (Some(FORMAT_HEADER), Some(line)) => line
            .strip_prefix("format ")
            .and_then(|v| v.trim().parse::<u32>().ok()),
        _ => None,
    };
    match version {
        Some(found) if (OLDEST_DATA_DIR_FORMAT..=DATA_DIR_FORMAT).contains(&found) => Ok(found),
        Some(found) => Err(Error::UnsupportedFormat {
            path: path.to_owned(),
            found,
            supported: DATA_DIR_FORMAT,
        }),
        None => Err(Error::corruption(path, 0, "unreadable FORMAT marker")),
    }
}

/// How long [`Store::open`] waits for sled's directory lock when it is held (see [`open_sled`]).
const SLED_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens the sled database at `path`. sled 0.34 releases its directory lock from its background
/// flusher thread, a moment *after* the last handle of an instance was dropped (the thread
/// reports itself finished, then drops its own handle). A store reopened in the same process
/// right after it was closed (an embedded application restarting its node, the tests) can
/// find the lock still held, so a held lock is retried for up to [`SLED_LOCK_WAIT`]; after that
/// the error stands (another process has the directory) and says so.
fn open_sled(path: &Path, cache_bytes: u64) -> Result<sled::Db> {
    let deadline = std::time::Instant::now() + SLED_LOCK_WAIT;
    loop {
        match sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .open()
        {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(source) => {
                return Err(Error::Sled {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_directory_gets_a_format_marker_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        drop(Store::open(&data, StoreOptions::default()).unwrap());
        let text = fs::read_to_string(data.join("FORMAT")).unwrap();
        assert_eq!(
            text,
            format!("kvnode data directory\nformat {DATA_DIR_FORMAT}\n")
        );
        drop(Store::open(&data, StoreOptions::default()).unwrap());
    }

    #[test]
    fn another_format_version_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("FORMAT"),
            "kvnode data directory\nformat 99\n",
        )
        .unwrap();
        match Store::open(dir.path(), StoreOptions::default()) {
            Err(Error::UnsupportedFormat {
                path,
                found: 99,
                supported: DATA_DIR_FORMAT,
            }) => assert!(path.ends_with("FORMAT")),
            other => panic!("expected UnsupportedFormat, got {other:?}"),
        }
    }

    #[test]
    fn older_directories_open_and_are_marked_format_3() {
        for old in [1, 2] {
            let dir = tempfile::tempdir().unwrap();
            let data = dir.path().join("data");
            drop(Store::open(&data, StoreOptions::default()).unwrap());
            fs::write(
                data.join("FORMAT"),
                format!("kvnode data directory\nformat {old}\n"),
            )
            .unwrap();
            drop(Store::open(&data, StoreOptions::default()).unwrap());
            let text = fs::read_to_string(data.join("FORMAT")).unwrap();
            assert_eq!(text, "kvnode data directory\nformat 3\n", "from {old}");
        }
    }

    /// A directory of the next format (written by a newer build) is refused, naming both.
    #[test]
    fn a_format_4_directory_is_refused_naming_both_formats() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("FORMAT"),
            "kvnode data directory\nformat 4\n",
        )
        .unwrap();
        let err = Store::open(dir.path(), StoreOptions::default()).unwrap_err();
        assert!(
            matches!(
                err,
                Error::UnsupportedFormat {
                    found: 4,
                    supported: 3,
                    ..
                }
            ),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("on-disk format 4") && text.contains("reads format 3"),
            "{text}"
        );
        let marker = fs::read_to_string(dir.path().join("FORMAT")).unwrap();
        assert_eq!(
            marker, "kvnode data directory\nformat 4\n",
            "left as it was"
        );
    }

    /// sled lets go of its lock a moment after a store is dropped (see `open_sled`): reopening
    /// at once must still work, every time.
    #[test]
    fn a_store_reopened_right_after_it_was_dropped_opens() {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..20 {
            drop(Store::open(dir.path(), StoreOptions::default()).unwrap());
        }
    }

    /// Writes some local state of `shard`: a log entry and a vote, a tree key, a snapshot
    /// file and a replica record.
    fn fill_shard(store: &Store, shard: u64) {
        let (tx, rx) = std::sync::mpsc::channel();
        let done = move |r: Result<()>| tx.send(r.is_ok()).unwrap();
        store
            .wal()
            .append(shard, 1, vec![b"entry".to_vec()], Box::new(done))
            .unwrap();
        assert!(rx.recv().unwrap());
        let tree = store.state_tree(shard).unwrap();
        let put = Write::Put(
            b"k".to_vec(),
            Versioned {
                version: 1,
                value: b"v".to_vec(),
            },
        );
        tree.apply(&[put], b"applied", None).unwrap();
        drop(tree);
        let snapshots = store.snapshot_dir(shard);
        fs::create_dir_all(snapshots.path()).unwrap();
        fs::write(snapshots.path().join("snap-1"), b"x").unwrap();
        store.record_shard_replica(shard, 12).unwrap();
    }

    /// True if nothing of `shard` is left, and shard 2 (not retired) is intact.
    fn only_shard_2_left(store: &Store, shard: u64) {
        assert!(!store.shards_on_disk().unwrap().contains(&shard));
        assert!(store.wal().read(shard, ..).unwrap().is_empty());
        assert!(!state_tree::has_shard(&store.db, shard));
        assert!(!store.snapshot_dir(shard).path().exists());
        assert_eq!(store.shard_replica(shard, 3).unwrap(), 3, "legacy again");
        assert_eq!(store.wal().read(2, ..).unwrap().len(), 1);
        let tree = store.state_tree(2).unwrap();
        assert!(tree.get(b"k").unwrap().is_some());
        assert_eq!(store.shard_replica(2, 3).unwrap(), 12);
    }

    #[test]
    fn retire_shard_deletes_the_log_tree_snapshots_and_record_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        fill_shard(&store, 1);
        fill_shard(&store, 2);
        assert_eq!(store.shard_replica(1, 3).unwrap(), 12);
        assert!(store.shards_on_disk().unwrap().is_superset(&[1, 2].into()));
        store.retire_shard(1).unwrap();
        only_shard_2_left(&store, 1);
        store.retire_shard(1).unwrap();
        only_shard_2_left(&store, 1);
        drop(store);
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        only_shard_2_left(&store, 1);
    }

    /// A crash after each step of `retire_shard` (the steps it runs, done by hand, then the
    /// store dropped without the rest): the reopened directory still lists the shard, and
    /// calling `retire_shard` again finishes the job.
    #[test]
    fn a_retire_interrupted_after_any_step_is_finished_by_retiring_again() {
        for steps in 1..=3 {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
            fill_shard(&store, 1);
            fill_shard(&store, 2);
            store.wal().retire(1).unwrap();
            if steps >= 2 {
                state_tree::drop_shard(&store.db, &dir.path().join("sm"), 1).unwrap();
            }
            if steps >= 3 {
                fs::remove_dir_all(store.snapshot_dir(1).path()).unwrap();
            }
            drop(store);
            let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
            assert!(
                store.shards_on_disk().unwrap().contains(&1),
                "after {steps} steps the record (at least) is left"
            );
            assert!(
                store.wal().read(1, ..).unwrap().is_empty(),
                "the log went first"
            );
            store.retire_shard(1).unwrap();
            only_shard_2_left(&store, 1);
        }
    }

    #[test]
    fn a_foreign_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("notes.txt"), "mine").unwrap();
        assert!(matches!(
            Store::open(dir.path(), StoreOptions::default()),
            Err(Error::NotADataDir { .. })
        ));
    }
}
