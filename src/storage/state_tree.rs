//! One shard's state-machine data in sled: user keys with versioned values, tombstones, the
//! applied marker and membership, all in one tree.
//!
//! Layout (one `sled::Db` per node, shared by every shard):
//! - tree `sm-meta`: shard id (u64 big-endian) → active generation (u64 big-endian);
//! - tree `sm/<shard>/<generation>`: `d` + user key → version (u64 big-endian) + value bytes,
//!   or, for a deleted key, a tombstone: the delete's log index with the top bit set, alone
//!   (log indexes never reach 2^63); and `m/applied`, `m/membership` → opaque markers chosen
//!   by the caller.
//!
//! **Apply writes keys one by one, then the markers; not as one sled batch.** sled's
//! `apply_batch` seals and writes its in-memory log buffer twice per batch (`pin_log`), each
//! write a `pwrite` plus a waited `sync_file_range` in sled's IO pool, and it takes sled's
//! process-wide write lock, which stalls every reader of every shard. With one batch per Raft
//! apply of every shard that was most of a node's disk and thread traffic under writes
//! (issue 7's profile). Plain inserts go into sled's buffer and reach the disk with its
//! periodic flush. The price: after a crash, sled recovers a prefix of its writes, which can
//! hold some key writes of entries after the recovered applied marker. The state machine
//! replays those entries from the WAL, and a key whose stored version or tombstone is at or
//! past an entry's index already holds that entry's effect (or a later one): the state
//! machine skips it ([`Stored::last_write`]) instead of deciding it again against a later
//! state. Tombstones exist for that rule alone (a delete must leave its index behind, in the
//! same single sled write); [`StateTree::purge_tombstones`] drops those no replay can reach.
//! A chunk that changes membership writes its markers as one batch so that membership is
//! never ahead of the applied marker.
//!
//! Installing a snapshot builds the next generation's tree, flushes, then flips the generation
//! in `sm-meta` and drops the old tree. sled recovers a prefix of its log after a crash, so a
//! reader sees either the old tree or the complete new one. sled's flush is not an fsync
//! (ARCHITECTURE.md); losing the tail of sled's log only makes the shard replay more of the
//! WAL on open (and keeping writes past the marker is what the rule above is for).
//!
//! This module knows nothing of Raft: markers are opaque bytes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::storage::error::{Error, Result};

const META_TREE: &str = "sm-meta";
const DATA_PREFIX: u8 = b'd';
/// Set in a stored version: the record is a tombstone, the key is deleted.
const TOMBSTONE: u64 = 1 << 63;
const APPLIED_KEY: &[u8] = b"m/applied";
const MEMBERSHIP_KEY: &[u8] = b"m/membership";
/// Pairs per sled batch while loading a snapshot: keeps sled's global lock hold short.
const LOAD_BATCH: usize = 1024;

/// A value with the log index of the write that produced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// Log index of the key's last write.
    pub version: u64,
    /// The value.
    pub value: Vec<u8>,
}

impl Versioned {
    /// The stored form: version as 8 big-endian bytes, then the value.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.value.len());
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.value);
        out
    }

    /// Parses the stored form of a value; `None` if it is too short to hold a version or is a
    /// tombstone.
    pub fn decode(bytes: &[u8]) -> Option<Versioned> {
        Stored::decode(bytes)?.value
    }
}

/// One change to a key, as applied by [`StateTree::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Set the key.
    Put(Vec<u8>, Versioned),
    /// Remove the key; the delete's log index is kept as its tombstone.
    Delete(Vec<u8>, u64),
}

/// One sled operation of [`StateTree::apply`], in the order it runs.
enum Op<'a> {
    /// A key's value or tombstone.
    Key(Vec<u8>, Vec<u8>),
    /// The applied marker, alone or with membership (then in one batch: membership must
    /// never be recovered ahead of the applied marker).
    Markers(&'a [u8], Option<&'a [u8]>),
}

/// What a tree holds for a key: its value, and its tombstone if it was ever deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    /// The live value, if any.
    pub value: Option<Versioned>,
    /// Log index of the key's last delete, until [`StateTree::purge_tombstones`] drops it.
    pub deleted_at: Option<u64>,
}

impl Stored {
    /// Log index of the last write to the key this tree knows of (put or delete).
    pub fn last_write(&self) -> Option<u64> {
        self.value.as_ref().map(|v| v.version).max(self.deleted_at)
    }

    /// Parses a key's record (a value or a tombstone); `None` if it is malformed.
    fn decode(bytes: &[u8]) -> Option<Stored> {
        let version = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        if version & TOMBSTONE == 0 {
            Some(Stored {
                value: Some(Versioned {
                    version,
                    value: bytes[8..].to_vec(),
                }),
                deleted_at: None,
            })
        } else if bytes.len() == 8 {
            Some(Stored {
                value: None,
                deleted_at: Some(version & !TOMBSTONE),
            })
        } else {
            None
        }
    }
}

/// The record of a key deleted at log `index`.
fn tombstone(index: u64) -> Vec<u8> {
    (index | TOMBSTONE).to_be_bytes().to_vec()
}

/// Whether a stored record is a tombstone (its version's top bit, without decoding).
fn is_tombstone(bytes: &[u8]) -> bool {
    bytes.first().is_some_and(|b| b & 0x80 != 0)
}

/// One shard's state-machine tree (the writer; [`TreeReader`]s share the current tree).
pub struct StateTree {
    db: sled::Db,
    db_path: PathBuf,
    shard: u64,
    generation: u64,
    tree: Arc<RwLock<sled::Tree>>,
    /// Keeps the owning store's count of open trees (see `Store::release`).
    _user: Arc<()>,
}

/// A read-only handle on a shard's current tree, for serving reads outside the state machine's
/// task. It follows snapshot installs (the writer swaps the shared tree).
#[derive(Clone)]
pub struct TreeReader {
    db_path: PathBuf,
    shard: u64,
    tree: Arc<RwLock<sled::Tree>>,
}

impl std::fmt::Debug for TreeReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TreeReader")
            .field("shard", &self.shard)
            .finish()
    }
}

impl TreeReader {
    /// Reads a user key.
    pub fn get(&self, key: &[u8]) -> Result<Option<Versioned>> {
        // Under the read lock rather than on a clone of the tree: no reference-count traffic
        // on the hot path (a snapshot install waits for the read to finish).
        let tree = self.tree.read().expect("tree lock poisoned");
        get_versioned(&tree, key, &self.db_path, self.shard)
    }

    /// Reads a user key's value and tombstone (see [`Stored`]).
    pub fn stored(&self, key: &[u8]) -> Result<Stored> {
        let tree = self.tree.read().expect("tree lock poisoned");
        get_stored(&tree, key, &self.db_path, self.shard)
    }
}

fn get_versioned(
    tree: &sled::Tree,
    key: &[u8],
    db_path: &Path,
    shard: u64,
) -> Result<Option<Versioned>> {
    get_stored(tree, key, db_path, shard).map(|s| s.value)
}

fn get_stored(tree: &sled::Tree, key: &[u8], db_path: &Path, shard: u64) -> Result<Stored> {
    let bytes = with_data_key(key, |k| tree.get(k)).map_err(|source| Error::Sled {
        path: db_path.to_owned(),
        source,
    })?;
    match bytes {
        None => Ok(Stored::default()),
        Some(bytes) => Stored::decode(&bytes).ok_or_else(|| {
            Error::corruption(
                db_path,
                0,
                format!(
                    "shard {shard}: record of {} bytes is neither a versioned value nor a \
                     tombstone",
                    bytes.len()
                ),
            )
        }),
    }
}

impl std::fmt::Debug for StateTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateTree")
            .field("shard", &self.shard)
            .field("generation", &self.generation)
            .finish()
    }
}

fn tree_name(shard: u64, generation: u64) -> String {
    format!("sm/{shard}/{generation}")
}

/// Calls `f` with `key`'s key in the tree (see [`data_key`]), built on the stack when short:
/// every read builds one, and a heap allocation is a good part of a cached read's cost.
fn with_data_key<R>(key: &[u8], f: impl FnOnce(&[u8]) -> R) -> R {
    const INLINE: usize = 128;
    if key.len() < INLINE {
        let mut buf = [0u8; INLINE];
        buf[0] = DATA_PREFIX;
        buf[1..=key.len()].copy_from_slice(key);
        f(&buf[..=key.len()])
    } else {
        f(&data_key(key))
    }
}

fn data_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(DATA_PREFIX);
    k.extend_from_slice(key);
    k
}

/// Drops every tree of `shard` (all generations) and its generation marker from `db`, then
/// flushes: a replica that left this node ([`crate::storage::Store::retire_shard`]). Idempotent:
/// a shard with no tree is left as it is. Trees go before the marker, so a crash in between
/// leaves a marker naming a tree that no longer exists, which the next [`StateTree::open`]
/// creates empty (or the next retire removes).
pub(crate) fn drop_shard(db: &sled::Db, db_path: &Path, shard: u64) -> Result<()> {
    let sled_err = |source| Error::Sled {
        path: db_path.to_owned(),
        source,
    };
    let prefix = format!("sm/{shard}/");
    for name in db.tree_names() {
        if let Ok(name) = std::str::from_utf8(&name)
            && name.starts_with(&prefix)
        {
            db.drop_tree(name).map_err(sled_err)?;
        }
    }
    let meta = db.open_tree(META_TREE).map_err(sled_err)?;
    meta.remove(shard.to_be_bytes()).map_err(sled_err)?;
    db.flush().map_err(sled_err)?;
    Ok(())
}

/// True if `db` holds a tree or a generation marker of `shard`.
#[cfg(test)]
pub(crate) fn has_shard(db: &sled::Db, shard: u64) -> bool {
    let prefix = format!("sm/{shard}/");
    let tree = db
        .tree_names()
        .iter()
        .any(|name| std::str::from_utf8(name).is_ok_and(|name| name.starts_with(&prefix)));
    tree || db
        .open_tree(META_TREE)
        .is_ok_and(|meta| meta.contains_key(shard.to_be_bytes()).unwrap_or(false))
}

/// The shards `db` holds a tree of.
pub(crate) fn shards_in(db: &sled::Db) -> Vec<u64> {
    let mut shards: Vec<u64> = db
        .tree_names()
        .iter()
        .filter_map(|name| {
            let name = std::str::from_utf8(name).ok()?;
            name.strip_prefix("sm/")?.split('/').next()?.parse().ok()
        })
        .collect();
    shards.sort_unstable();
    shards.dedup();
    shards
}

impl StateTree {
    /// Opens `shard`'s active tree in `db` (at `db_path`, used in errors), dropping trees of
    /// other generations left by an interrupted snapshot install.
    pub fn open(db: &sled::Db, db_path: &Path, shard: u64, user: Arc<()>) -> Result<StateTree> {
        let sled_err = |source| Error::Sled {
            path: db_path.to_owned(),
            source,
        };
        let meta = db.open_tree(META_TREE).map_err(sled_err)?;
        let generation = match meta.get(shard.to_be_bytes()).map_err(sled_err)? {
            Some(bytes) => u64::from_be_bytes(bytes.as_ref().try_into().map_err(|_| {
                Error::corruption(
                    db_path,
                    0,
                    format!("shard {shard}: generation marker of {} bytes", bytes.len()),
                )
            })?),
            None => 0,
        };
        let prefix = format!("sm/{shard}/");
        let active = tree_name(shard, generation);
        for name in db.tree_names() {
            if let Ok(name) = std::str::from_utf8(&name)
                && name.starts_with(&prefix)
                && name != active
            {
                tracing::info!(
                    shard,
                    tree = name,
                    "dropping a state-machine tree left by an interrupted snapshot install"
                );
                db.drop_tree(name).map_err(sled_err)?;
            }
        }
        let tree = db.open_tree(&active).map_err(sled_err)?;
        Ok(StateTree {
            db: db.clone(),
            db_path: db_path.to_owned(),
            shard,
            generation,
            tree: Arc::new(RwLock::new(tree)),
            _user: user,
        })
    }

    fn sled_err(&self, source: sled::Error) -> Error {
        Error::Sled {
            path: self.db_path.clone(),
            source,
        }
    }

    fn corrupt(&self, detail: String) -> Error {
        Error::corruption(
            &self.db_path,
            0,
            format!("shard {} tree {}: {detail}", self.shard, self.generation),
        )
    }

    /// The shard this tree belongs to.
    pub fn shard(&self) -> u64 {
        self.shard
    }

    /// A read handle that follows this tree across snapshot installs.
    pub fn reader(&self) -> TreeReader {
        TreeReader {
            db_path: self.db_path.clone(),
            shard: self.shard,
            tree: self.tree.clone(),
        }
    }

    fn current(&self) -> sled::Tree {
        self.tree.read().expect("tree lock poisoned").clone()
    }

    /// Reads a user key.
    pub fn get(&self, key: &[u8]) -> Result<Option<Versioned>> {
        get_versioned(&self.current(), key, &self.db_path, self.shard)
    }

    /// The applied marker written by the last [`StateTree::apply`].
    pub fn applied(&self) -> Result<Option<Vec<u8>>> {
        self.meta_value(APPLIED_KEY)
    }

    /// The membership marker, if one was ever applied.
    pub fn membership(&self) -> Result<Option<Vec<u8>>> {
        self.meta_value(MEMBERSHIP_KEY)
    }

    fn meta_value(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .current()
            .get(key)
            .map_err(|e| self.sled_err(e))?
            .map(|v| v.to_vec()))
    }

    /// A key's value and tombstone (see [`Stored`]).
    pub fn stored(&self, key: &[u8]) -> Result<Stored> {
        let tree = self.tree.read().expect("tree lock poisoned");
        get_stored(&tree, key, &self.db_path, self.shard)
    }

    /// Applies `writes` (each key's value or tombstone), then the new `applied` marker (and
    /// `membership`, in one batch with it, if given). Not atomic as a whole: see the module
    /// doc for why and for what recovery does about it.
    pub fn apply(&self, writes: &[Write], applied: &[u8], membership: Option<&[u8]>) -> Result<()> {
        self.apply_prefix(writes, applied, membership, usize::MAX)
            .map(|_| ())
    }

    /// Runs the first `limit` sled operations of [`StateTree::apply`]: what a crash in the
    /// middle of an apply can leave, since sled recovers a prefix of its writes. Returns
    /// whether the apply ran to the end. Tests use it to tear applies.
    pub(crate) fn apply_prefix(
        &self,
        writes: &[Write],
        applied: &[u8],
        membership: Option<&[u8]>,
        limit: usize,
    ) -> Result<bool> {
        let ops = writes
            .iter()
            .map(|write| match write {
                Write::Put(key, value) => Op::Key(data_key(key), value.encode()),
                Write::Delete(key, index) => Op::Key(data_key(key), tombstone(*index)),
            })
            .chain(std::iter::once(Op::Markers(applied, membership)));
        let tree = self.current();
        for op in ops.take(limit) {
            match op {
                Op::Key(k, v) => tree.insert(k, v).map(drop),
                Op::Markers(applied, None) => tree.insert(APPLIED_KEY, applied).map(drop),
                Op::Markers(applied, Some(membership)) => {
                    let mut batch = sled::Batch::default();
                    batch.insert(APPLIED_KEY, applied);
                    batch.insert(MEMBERSHIP_KEY, membership);
                    tree.apply_batch(batch)
                }
            }
            .map_err(|e| self.sled_err(e))?;
        }
        // One operation per write, then the markers.
        Ok(limit > writes.len())
    }

    /// Drops the tombstones of deletes at or before `applied`, the applied marker already
    /// written: no replay after a crash starts before that marker, so none can need them
    /// (sled recovers a prefix of its writes, and the marker precedes these removals).
    /// Call it while no apply runs. Returns how many were dropped.
    pub fn purge_tombstones(&self, applied: u64) -> Result<usize> {
        let tree = self.current();
        let mut dropped = 0;
        for item in tree.scan_prefix([DATA_PREFIX]) {
            let (key, bytes) = item.map_err(|e| self.sled_err(e))?;
            if !is_tombstone(&bytes) {
                continue;
            }
            let Some(at) = Stored::decode(&bytes).and_then(|s| s.deleted_at) else {
                return Err(self.corrupt(format!("tombstone of {} bytes", bytes.len())));
            };
            if at <= applied {
                tree.remove(key).map_err(|e| self.sled_err(e))?;
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    /// Every user key with its stored record, in key order: encoded [`Versioned`] values and
    /// the tombstones not purged yet. A snapshot carries both: after a crash, sled can hold
    /// writes (tombstones among them) of entries past the applied marker, so a snapshot built
    /// then has them too, and a replica that installs it needs their indexes to replay the
    /// entries after the snapshot correctly. sled iterators see concurrent writes: callers
    /// must pause applies while iterating.
    pub fn pairs(&self) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>)>> + '_ {
        self.current().scan_prefix([DATA_PREFIX]).map(move |item| {
            let (k, v) = item.map_err(|e| self.sled_err(e))?;
            Ok((k[1..].to_vec(), v.to_vec()))
        })
    }

    /// Replaces the whole tree with `pairs` (user key, encoded value) and the given markers:
    /// loads a new generation, flushes it, flips the generation marker, drops the old tree.
    pub fn replace(
        &mut self,
        pairs: impl Iterator<Item = Result<(Vec<u8>, Vec<u8>)>>,
        applied: Option<&[u8]>,
        membership: Option<&[u8]>,
    ) -> Result<()> {
        let next = self.generation + 1;
        let name = tree_name(self.shard, next);
        let sled_err = |source| Error::Sled {
            path: self.db_path.clone(),
            source,
        };
        // A tree of this generation can only be a leftover of an interrupted install.
        self.db.drop_tree(&name).map_err(sled_err)?;
        let tree = self.db.open_tree(&name).map_err(sled_err)?;
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        for pair in pairs {
            let (key, value) = pair?;
            if Stored::decode(&value).is_none() {
                return Err(self.corrupt(format!(
                    "snapshot record of {} bytes is neither a versioned value nor a tombstone",
                    value.len()
                )));
            }
            batch.insert(data_key(&key), value);
            in_batch += 1;
            if in_batch == LOAD_BATCH {
                tree.apply_batch(std::mem::take(&mut batch))
                    .map_err(sled_err)?;
                in_batch = 0;
            }
        }
        if let Some(a) = applied {
            batch.insert(APPLIED_KEY, a);
        }
        if let Some(m) = membership {
            batch.insert(MEMBERSHIP_KEY, m);
        }
        tree.apply_batch(batch).map_err(sled_err)?;
        self.db.flush().map_err(sled_err)?;

        let meta = self.db.open_tree(META_TREE).map_err(sled_err)?;
        meta.insert(self.shard.to_be_bytes(), &next.to_be_bytes())
            .map_err(sled_err)?;
        self.db.flush().map_err(sled_err)?;
        let old = tree_name(self.shard, self.generation);
        *self.tree.write().expect("tree lock poisoned") = tree;
        self.generation = next;
        self.db.drop_tree(old).map_err(sled_err)?;
        Ok(())
    }

    /// Removes every key and marker (used when sled's state is unusable and a snapshot plus the
    /// WAL will rebuild it).
    pub fn clear(&mut self) -> Result<()> {
        self.replace(std::iter::empty(), None, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens sled at `dir`. A reopen retries for a while: the previous instance's background
    /// flusher can hold the directory's lock a moment after the `Db` is dropped.
    fn db(dir: &Path) -> sled::Db {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match sled::Config::new().path(dir).cache_capacity(8 << 20).open() {
                Ok(db) => return db,
                Err(e) if std::time::Instant::now() >= deadline => {
                    panic!("opening sled at {}: {e}", dir.display())
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
    }

    fn v(version: u64, value: &str) -> Versioned {
        Versioned {
            version,
            value: value.as_bytes().to_vec(),
        }
    }

    #[test]
    fn apply_is_visible_with_its_markers_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = db(dir.path());
            let tree = StateTree::open(&db, dir.path(), 7, Arc::new(())).unwrap();
            let writes = [
                Write::Put(b"a".to_vec(), v(1, "x")),
                Write::Put(b"b".to_vec(), v(1, "y")),
                Write::Delete(b"a".to_vec(), 1),
            ];
            tree.apply(&writes, b"applied-1", Some(b"members")).unwrap();
            assert_eq!(tree.get(b"a").unwrap(), None);
            assert_eq!(tree.get(b"b").unwrap(), Some(v(1, "y")));
            db.flush().unwrap();
        }
        let db = db(dir.path());
        let tree = StateTree::open(&db, dir.path(), 7, Arc::new(())).unwrap();
        assert_eq!(tree.applied().unwrap().as_deref(), Some(&b"applied-1"[..]));
        assert_eq!(tree.membership().unwrap().as_deref(), Some(&b"members"[..]));
        let pairs: Vec<_> = tree.pairs().map(Result::unwrap).collect();
        assert_eq!(
            pairs,
            vec![
                (b"a".to_vec(), tombstone(1)),
                (b"b".to_vec(), v(1, "y").encode())
            ]
        );
        assert_eq!(tree.purge_tombstones(1).unwrap(), 1);
        assert_eq!(tree.pairs().count(), 1);
    }

    #[test]
    fn shards_do_not_see_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let db = db(dir.path());
        let a = StateTree::open(&db, dir.path(), 1, Arc::new(())).unwrap();
        let b = StateTree::open(&db, dir.path(), 2, Arc::new(())).unwrap();
        a.apply(&[Write::Put(b"k".to_vec(), v(3, "a"))], b"x", None)
            .unwrap();
        assert_eq!(b.get(b"k").unwrap(), None);
        assert_eq!(b.pairs().count(), 0);
    }

    #[test]
    fn replace_swaps_the_whole_tree_and_drops_the_old_generation() {
        let dir = tempfile::tempdir().unwrap();
        let db = db(dir.path());
        let mut tree = StateTree::open(&db, dir.path(), 4, Arc::new(())).unwrap();
        tree.apply(&[Write::Put(b"old".to_vec(), v(1, "o"))], b"a1", None)
            .unwrap();
        let pairs = (0..3000u64).map(|i| Ok((i.to_be_bytes().to_vec(), v(i, "n").encode())));
        tree.replace(pairs, Some(b"a9"), Some(b"m9")).unwrap();
        assert_eq!(tree.get(b"old").unwrap(), None);
        assert_eq!(tree.pairs().count(), 3000);
        assert_eq!(tree.applied().unwrap().as_deref(), Some(&b"a9"[..]));
        let names: Vec<String> = db
            .tree_names()
            .iter()
            .filter_map(|n| String::from_utf8(n.to_vec()).ok())
            .filter(|n| n.starts_with("sm/4/"))
            .collect();
        assert_eq!(names, vec!["sm/4/1".to_string()]);
        drop(tree);
        let reopened = StateTree::open(&db, dir.path(), 4, Arc::new(())).unwrap();
        assert_eq!(reopened.pairs().count(), 3000);
    }

    #[test]
    fn a_half_built_generation_is_dropped_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let db = db(dir.path());
        let tree = StateTree::open(&db, dir.path(), 9, Arc::new(())).unwrap();
        tree.apply(&[Write::Put(b"k".to_vec(), v(1, "live"))], b"a", None)
            .unwrap();
        // An install that died before flipping the generation marker.
        db.open_tree("sm/9/1")
            .unwrap()
            .insert(b"dpartial", &b"xxxxxxxxjunk"[..])
            .unwrap();
        drop(tree);
        let tree = StateTree::open(&db, dir.path(), 9, Arc::new(())).unwrap();
        assert_eq!(tree.get(b"k").unwrap(), Some(v(1, "live")));
        assert!(!db.tree_names().iter().any(|n| n.as_ref() == b"sm/9/1"));
    }

    #[test]
    fn a_value_without_version_is_corruption_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let db = db(dir.path());
        let tree = StateTree::open(&db, dir.path(), 3, Arc::new(())).unwrap();
        db.open_tree("sm/3/0")
            .unwrap()
            .insert(b"dk", &b"abc"[..])
            .unwrap();
        assert!(matches!(tree.get(b"k"), Err(Error::Corruption { .. })));
    }
}
