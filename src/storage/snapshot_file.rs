//! Snapshot files of one shard's state machine: a stream of (key, value) pairs plus an opaque
//! meta blob, written atomically and checksummed as a whole.
//!
//! # Format
//!
//! ```text
//! header:  magic b"KVNSNAP\0" (8) | format u32 | meta_len u32 | meta (meta_len bytes)
//! records: key_len u32 | value_len u32 | key | value          (repeated, key_len < u32::MAX)
//! end:     u32::MAX (terminator) | pair count u64 | CRC-32 u32 of every byte before the CRC
//! ```
//!
//! All integers are little-endian. A file is written as `<name>.tmp`, fsynced, renamed to
//! `<name>` and its directory fsynced, so a complete name always holds a complete file. Readers
//! check magic, then format version (before the CRC, so a foreign format is reported as such),
//! then structure and CRC over the whole file before handing out any pair: a damaged snapshot
//! is never half-loaded. No length is trusted beyond the bytes left in the file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::storage::durable_file::sync_dir;
use crate::storage::error::{Error, Result};

/// The snapshot file format this build writes. 2: a record's value may be a state-machine
/// tombstone (`storage::state_tree`), which a format-1 reader would take for a value, so such
/// a reader refuses the file by name instead.
pub const SNAPSHOT_FORMAT: u32 = 2;
/// The oldest snapshot format this build reads (format 1 files hold values only).
const OLDEST_SNAPSHOT_FORMAT: u32 = 1;

const MAGIC: &[u8; 8] = b"KVNSNAP\0";
const TERMINATOR: u32 = u32::MAX;
const BUF_SIZE: usize = 64 * 1024;

/// Writes one snapshot file: [`create`](Self::create) → [`push`](Self::push) pairs →
/// [`finish`](Self::finish). Dropping an unfinished writer removes its temporary file.
pub struct SnapshotWriter {
    tmp: PathBuf,
    path: PathBuf,
    dir: PathBuf,
    out: BufWriter<File>,
    hasher: crc32fast::Hasher,
    count: u64,
    finished: bool,
}

impl SnapshotWriter {
    /// Starts `dir/<name>` (written as `dir/<name>.tmp` until finish). Creates `dir` if missing.
    pub fn create(dir: &Path, name: &str, meta: &[u8]) -> Result<SnapshotWriter> {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tmp = dir.join(format!("{name}.tmp"));
        let mut open = OpenOptions::new();
        open.read(true).write(true).create(true).truncate(true);
        let file = open.open(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let meta_len = len32(&tmp, meta.len(), u32::MAX, "meta")?;
        let mut w = SnapshotWriter {
            path: dir.join(name),
            dir: dir.to_path_buf(),
            out: BufWriter::with_capacity(BUF_SIZE, file),
            hasher: crc32fast::Hasher::new(),
            count: 0,
            finished: false,
            tmp,
        };
        w.write(MAGIC)?;
        w.write(&SNAPSHOT_FORMAT.to_le_bytes())?;
        w.write(&meta_len.to_le_bytes())?;
        w.write(meta)?;
        Ok(w)
    }

    /// Appends one pair. A key must be shorter than `u32::MAX` bytes, a value at most that long.
    pub fn push(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        let key_len = len32(&self.tmp, key.len(), TERMINATOR - 1, "key")?;
        let value_len = len32(&self.tmp, value.len(), u32::MAX, "value")?;
        self.write(&key_len.to_le_bytes())?;
        self.write(&value_len.to_le_bytes())?;
        self.write(key)?;
        self.write(value)?;
        self.count += 1;
        Ok(())
    }

    /// Writes the trailer, fsyncs the file, renames it into place, fsyncs the directory.
    pub fn finish(mut self) -> Result<SnapshotFile> {
        self.write(&TERMINATOR.to_le_bytes())?;
        self.write(&self.count.to_le_bytes())?;
        let crc = self.hasher.clone().finalize().to_le_bytes();
        let out = &mut self.out;
        let file = (out.write_all(&crc).and_then(|()| out.flush()))
            .and_then(|()| out.get_ref().sync_all())
            .and_then(|()| out.get_ref().try_clone())
            .map_err(|e| Error::io(&self.tmp, e))?;
        fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        self.finished = true;
        sync_dir(&self.dir)?;
        let len = file.metadata().map_err(|e| Error::io(&self.path, e))?.len();
        let path = self.path.clone();
        Ok(SnapshotFile {
            path,
            file: Arc::new(file),
            len,
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.hasher.update(bytes);
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(&self.tmp, e))
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Checks that a `len`-byte field fits the format's u32 length (at most `max`).
fn len32(path: &Path, len: usize, max: u32, what: &str) -> Result<u32> {
    let msg = || format!("snapshot {what} of {len} bytes is too long (limit {max})");
    let err = || Error::io(path, io::Error::new(io::ErrorKind::InvalidInput, msg()));
    u32::try_from(len)
        .ok()
        .filter(|&n| n <= max)
        .ok_or_else(err)
}

/// A complete snapshot file on disk. Holds an open handle (`Arc<File>`), so it stays readable
/// even if the path is deleted or replaced while someone (e.g. a network sender) still reads it.
#[derive(Debug, Clone)]
pub struct SnapshotFile {
    path: PathBuf,
    file: Arc<File>,
    len: u64,
}

impl SnapshotFile {
    /// Opens an existing file (no verification yet).
    pub fn open(path: &Path) -> Result<SnapshotFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        Ok(SnapshotFile {
            path: path.to_path_buf(),
            file: Arc::new(file),
            len,
        })
    }

    /// The path the file was opened or written at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file has no bytes at all (never true of a valid snapshot).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads the whole file once, checking magic, version, structure and CRC; returns the meta.
    pub fn verify(&self) -> Result<Vec<u8>> {
        self.scan().map(|(meta, _)| meta)
    }

    /// Verifies, then returns the meta and an iterator over the pairs. Reads are positional on
    /// the shared handle, so clones may be read concurrently.
    pub fn read(&self) -> Result<(Vec<u8>, SnapshotPairs)> {
        let (meta, records_at) = self.scan()?;
        let pairs = SnapshotPairs {
            scan: Scan::new(self, records_at),
            done: false,
        };
        Ok((meta, pairs))
    }

    /// Copies this snapshot into `dir/<name>` through a [`SnapshotWriter`] (re-verifying on the
    /// way) and returns the new file.
    pub fn copy_to(&self, dir: &Path, name: &str) -> Result<SnapshotFile> {
        let (meta, pairs) = self.read()?;
        let mut writer = SnapshotWriter::create(dir, name, &meta)?;
        for pair in pairs {
            let (key, value) = pair?;
            writer.push(&key, &value)?;
        }
        writer.finish()
    }

    /// Reads up to `max` raw bytes at `offset` (for streaming the file to a peer in chunks).
    /// Returns fewer bytes at the end of the file, none past it.
    pub fn read_chunk(&self, offset: u64, max: usize) -> Result<Vec<u8>> {
        let left = self.len.saturating_sub(offset);
        let want = usize::try_from(left).map_or(max, |left| left.min(max));
        let mut buf = vec![0; want];
        let mut got = 0;
        while got < want {
            match self.file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(&self.path, e)),
            }
        }
        buf.truncate(got);
        Ok(buf)
    }

    /// One full pass: returns the meta and the offset of the first record.
    fn scan(&self) -> Result<(Vec<u8>, u64)> {
        let mut s = Scan::new(self, 0);
        if &s.array::<8>("magic")? != MAGIC {
            let detail = "not a kvnode snapshot (bad magic)";
            return Err(Error::corruption(&self.path, 0, detail));
        }
        let found = s.u32("format version")?;
        if !(OLDEST_SNAPSHOT_FORMAT..=SNAPSHOT_FORMAT).contains(&found) {
            let (path, supported) = (self.path.clone(), SNAPSHOT_FORMAT);
            return Err(Error::UnsupportedFormat {
                path,
                found,
                supported,
            });
        }
        let meta_len = s.u32("meta length")?;
        let meta = s.bytes(meta_len, 12, "meta")?;
        let records_at = s.pos;
        let mut count: u64 = 0;
        while s.record()?.is_some() {
            count += 1;
        }
        let count_at = s.pos;
        let stored = u64::from_le_bytes(s.array("pair count")?);
        if stored != count {
            let detail = format!("trailer says {stored} pairs, file holds {count}");
            return Err(Error::corruption(&self.path, count_at, detail));
        }
        let (crc_at, expected) = (s.pos, s.hasher.clone().finalize());
        let crc = s.u32("checksum")?;
        if s.pos != self.len {
            let detail = "trailing bytes after the checksum";
            return Err(Error::corruption(&self.path, s.pos, detail));
        }
        if crc != expected {
            let detail =
                format!("snapshot checksum mismatch: stored {crc:#x}, computed {expected:#x}");
            return Err(Error::corruption(&self.path, crc_at, detail));
        }
        Ok((meta, records_at))
    }
}

/// Iterator over (key, value) pairs of a verified snapshot. After an error it yields nothing.
pub struct SnapshotPairs {
    scan: Scan,
    done: bool,
}

impl Iterator for SnapshotPairs {
    type Item = Result<(Vec<u8>, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let next = self.scan.record().transpose();
        self.done = !matches!(next, Some(Ok(_)));
        next
    }
}

/// `Read` over a shared handle with its own position (`pread`), so clones never race on a seek.
struct At {
    file: Arc<File>,
    pos: u64,
}

impl Read for At {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// A bounds-checked, checksumming cursor over a snapshot file.
struct Scan {
    path: PathBuf,
    input: BufReader<At>,
    pos: u64,
    len: u64,
    hasher: crc32fast::Hasher,
}

impl Scan {
    fn new(file: &SnapshotFile, pos: u64) -> Scan {
        let at = At {
            file: Arc::clone(&file.file),
            pos,
        };
        Scan {
            path: file.path.clone(),
            input: BufReader::with_capacity(BUF_SIZE, at),
            pos,
            len: file.len,
            hasher: crc32fast::Hasher::new(),
        }
    }

    fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        let n = buf.len() as u64;
        if n > self.len.saturating_sub(self.pos) {
            let detail = format!(
                "truncated: file ends inside the {what} starting at {}",
                self.pos
            );
            return Err(Error::corruption(&self.path, self.len, detail));
        }
        let input = &mut self.input;
        input
            .read_exact(buf)
            .map_err(|e| Error::io(&self.path, e))?;
        self.hasher.update(buf);
        self.pos += n;
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut b = [0; N];
        self.fill(&mut b, what).map(|()| b)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    /// Reads a `len`-byte field whose length was announced at offset `at`, refusing a length
    /// that runs past the end of the file (so nothing is allocated beyond the file's size); that
    /// is reported at the offset where the file ends, like any other truncation.
    fn bytes(&mut self, len: u32, at: u64, what: &str) -> Result<Vec<u8>> {
        let fits = u64::from(len) <= self.len.saturating_sub(self.pos);
        let Some(n) = usize::try_from(len).ok().filter(|_| fits) else {
            let detail = format!("{what} of {len} bytes (length at {at}) runs past the end");
            return Err(Error::corruption(&self.path, self.len, detail));
        };
        let mut v = vec![0; n];
        self.fill(&mut v, what).map(|()| v)
    }

    /// The next record, or None at the terminator.
    fn record(&mut self) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        let at = self.pos;
        let key_len = self.u32("key length")?;
        if key_len == TERMINATOR {
            return Ok(None);
        }
        let value_len = self.u32("value length")?;
        let key = self.bytes(key_len, at, "key")?;
        Ok(Some((key, self.bytes(value_len, at + 4, "value")?)))
    }
}

/// The snapshots of one shard: a directory holding at most one current snapshot plus leftovers.
pub struct SnapshotDir {
    dir: PathBuf,
}

impl SnapshotDir {
    /// A handle on `dir`; does not touch the disk (a missing directory means "no snapshots").
    pub fn new(dir: PathBuf) -> SnapshotDir {
        SnapshotDir { dir }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// A fresh file name for a snapshot ending at `last_index`:
    /// `snap-{last_index:020}-{unique:020}.snap`, where `unique` is larger than that of any
    /// snapshot (complete or `.tmp`) in the directory and than any earlier name this process gave.
    pub fn next_name(&self, last_index: u64) -> Result<String> {
        static LAST: AtomicU64 = AtomicU64::new(0);
        let floor = self
            .names()?
            .iter()
            .filter_map(|n| parse_name(n.strip_suffix(".tmp").unwrap_or(n)))
            .map(|(_, unique)| unique)
            .max()
            .unwrap_or(0);
        let mut unique = 0;
        LAST.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
            unique = last.max(floor).checked_add(1)?;
            Some(unique)
        })
        .map_err(|_| Error::corruption(&self.dir, 0, "snapshot sequence numbers exhausted"))?;
        Ok(format!("snap-{last_index:020}-{unique:020}.snap"))
    }

    /// The newest complete snapshot file (highest `unique`, i.e. the last one created), or None.
    /// Ignores and deletes `*.tmp` leftovers, so call it only while no writer is active here
    /// (at startup).
    pub fn latest(&self) -> Result<Option<SnapshotFile>> {
        let mut best: Option<((u64, u64), String)> = None;
        let mut removed = false;
        for name in self.names()? {
            if name.ends_with(".tmp") {
                remove(&self.dir.join(&name))?;
                removed = true;
            } else if let Some((index, unique)) = parse_name(&name)
                && best.as_ref().is_none_or(|(k, _)| (unique, index) > *k)
            {
                best = Some(((unique, index), name));
            }
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        best.map(|(_, name)| SnapshotFile::open(&self.dir.join(name)))
            .transpose()
    }

    /// Deletes every complete snapshot file except `keep` (compared by file name), then fsyncs
    /// the directory. `.tmp` files (possibly a writer in progress) are left alone.
    pub fn remove_all_except(&self, keep: &Path) -> Result<()> {
        let names = self.names()?;
        for name in &names {
            if parse_name(name).is_some() && keep.file_name() != Some(name.as_ref()) {
                remove(&self.dir.join(name))?;
            }
        }
        if names.is_empty() {
            Ok(())
        } else {
            sync_dir(&self.dir)
        }
    }

    /// File names in the directory (empty if it does not exist); non-UTF-8 names are skipped.
    fn names(&self) -> Result<Vec<String>> {
        let entries = match fs::read_dir(&self.dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            entries => entries.map_err(|e| Error::io(&self.dir, e))?,
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&self.dir, e))?;
            names.extend(entry.file_name().into_string().ok());
        }
        Ok(names)
    }
}

/// Parses `snap-{index:020}-{unique:020}.snap` into `(index, unique)`.
fn parse_name(name: &str) -> Option<(u64, u64)> {
    let body = name.strip_prefix("snap-")?.strip_suffix(".snap")?;
    let (index, unique) = body.split_once('-')?;
    let num = |s: &str| {
        (s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    Some((num(index)?, num(unique)?))
}

fn remove(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::io(path, e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

    fn write(dir: &Path, name: &str, meta: &[u8], pairs: &Pairs) -> SnapshotFile {
        let mut w = SnapshotWriter::create(dir, name, meta).unwrap();
        pairs.iter().for_each(|(k, v)| w.push(k, v).unwrap());
        w.finish().unwrap()
    }

    /// `n` pairs, starting with an empty key and value and an empty value.
    fn pairs(n: usize) -> Pairs {
        let mut out = vec![(vec![], vec![]), (b"k".to_vec(), vec![])];
        out.extend((2..n).map(|i| (format!("key{i}").into_bytes(), vec![i as u8; i % 50])));
        out
    }

    fn read_all(file: &SnapshotFile) -> (Vec<u8>, Pairs) {
        let (meta, it) = file.read().unwrap();
        (meta, it.collect::<Result<Pairs>>().unwrap())
    }

    fn verify_bytes(path: &Path, bytes: &[u8]) -> Result<Vec<u8>> {
        fs::write(path, bytes).unwrap();
        SnapshotFile::open(path).unwrap().verify()
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let data = pairs(1000);
        let file = write(dir.path(), "a.snap", b"meta!", &data);
        assert_eq!(file.verify().unwrap(), b"meta!");
        let (meta, got) = read_all(&SnapshotFile::open(file.path()).unwrap());
        assert_eq!((meta.as_slice(), got.len()), (&b"meta!"[..], 1000));
        assert_eq!(got, data);
        assert!(!dir.path().join("a.snap.tmp").exists());
    }

    #[test]
    fn latest_picks_newest_and_cleans_up() {
        let root = tempfile::tempdir().unwrap();
        let snaps = SnapshotDir::new(root.path().join("shard"));
        assert!(snaps.latest().unwrap().is_none());
        let mut names = Vec::new();
        for i in [5, 9, 7] {
            names.push(snaps.next_name(i).unwrap());
            write(snaps.path(), &names[names.len() - 1], &[i as u8], &pairs(3));
        }
        let leftover = snaps.path().join(snaps.next_name(99).unwrap() + ".tmp");
        fs::write(&leftover, b"half").unwrap();
        let latest = snaps.latest().unwrap().unwrap();
        assert_eq!(latest.path(), snaps.path().join(&names[2]));
        assert_eq!(latest.verify().unwrap(), [7]);
        assert!(!leftover.exists());
        let unique = |n: &str| parse_name(n).unwrap().1;
        assert!(unique(&snaps.next_name(1).unwrap()) > unique(&names[2]) + 1);
        snaps.remove_all_except(latest.path()).unwrap();
        assert_eq!(fs::read_dir(snaps.path()).unwrap().count(), 1);
        assert_eq!(read_all(&latest).1, pairs(3));
    }

    #[test]
    fn every_flip_and_truncation_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "s", b"meta", &pairs(4));
        let bytes = fs::read(file.path()).unwrap();
        let path = dir.path().join("damaged");
        for (i, mask) in (0..bytes.len()).flat_map(|i| [(i, 0x01), (i, 0x80), (i, 0xff)]) {
            let mut damaged = bytes.clone();
            damaged[i] ^= mask;
            let got = verify_bytes(&path, &damaged);
            let caught = matches!(
                got,
                Err(Error::Corruption { .. } | Error::UnsupportedFormat { .. })
            );
            assert!(caught, "flip {mask:#x} at byte {i}: {got:?}");
        }
        for cut in 0..bytes.len() {
            let got = verify_bytes(&path, &bytes[..cut]);
            assert!(
                matches!(got, Err(Error::Corruption { .. })),
                "cut at {cut}: {got:?}"
            );
        }
    }

    #[test]
    fn foreign_version_is_reported_before_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "s", b"m", &pairs(2));
        let mut bytes = fs::read(file.path()).unwrap();
        bytes[8..12].copy_from_slice(&3u32.to_le_bytes());
        let got = verify_bytes(file.path(), &bytes);
        let want = matches!(
            got,
            Err(Error::UnsupportedFormat {
                found: 3,
                supported: 2,
                ..
            })
        );
        assert!(want, "{got:?}");
    }

    #[test]
    fn a_format_1_file_is_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let data = pairs(10);
        let file = write(dir.path(), "s", b"m", &data);
        let mut bytes = fs::read(file.path()).unwrap();
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        let end = bytes.len() - 4;
        let crc = crc32fast::hash(&bytes[..end]);
        bytes[end..].copy_from_slice(&crc.to_le_bytes());
        fs::write(file.path(), &bytes).unwrap();
        let (meta, it) = file.read().unwrap();
        assert_eq!(meta, b"m");
        assert_eq!(it.map(Result::unwrap).collect::<Vec<_>>(), data);
    }

    #[test]
    fn copy_to_and_read_after_delete() {
        let root = tempfile::tempdir().unwrap();
        let data = pairs(100);
        let original = write(&root.path().join("a"), "x.snap", b"meta", &data);
        let copy = original.copy_to(&root.path().join("b"), "y.snap").unwrap();
        assert_eq!(copy.path(), root.path().join("b/y.snap"));
        assert_eq!(read_all(&copy), (b"meta".to_vec(), data.clone()));
        fs::remove_file(original.path()).unwrap();
        assert_eq!(read_all(&original.clone()), (b"meta".to_vec(), data));
        let mut streamed = Vec::new();
        while (streamed.len() as u64) < original.len() {
            streamed.extend(original.read_chunk(streamed.len() as u64, 7).unwrap());
        }
        assert_eq!(streamed, fs::read(copy.path()).unwrap());
        assert_eq!(original.read_chunk(original.len() + 5, 10).unwrap(), b"");
    }
}
