//! Which replica id a shard's local state belongs to: `<data-dir>/replicas/<shard>`, one line
//! `replica <id>`, written atomically and durably.
//!
//! Why: a shard can leave this node and come back under a new replica id
//! (docs/design/membership.md §2, D3). The old incarnation's log, vote and tree must never be
//! read as the new one's: a Raft id starting from another id's vote and log could vote twice in
//! a term or count an entry it never received. So a shard's state is opened only under the
//! replica id recorded here; on a mismatch the old incarnation is retired first
//! ([`crate::storage::Store::retire_shard`]), and the record is written only after that, so a
//! crash in between retires again. A shard with no record (every directory written before this
//! file existed) belongs to the replica id equal to the node id.

use std::fs;
use std::path::{Path, PathBuf};

use crate::storage::durable_file;
use crate::storage::error::{Error, Result};

const DIR: &str = "replicas";

fn folder(data_dir: &Path) -> PathBuf {
    data_dir.join(DIR)
}

/// The replica id recorded for `shard`, if any.
///
/// # Errors
///
/// An unreadable or malformed record (corruption, naming the file).
pub fn read(data_dir: &Path, shard: u64) -> Result<Option<u64>> {
    let path = folder(data_dir).join(shard.to_string());
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    };
    text.strip_prefix("replica ")
        .and_then(|id| id.trim().parse().ok())
        .map(Some)
        .ok_or_else(|| Error::corruption(&path, 0, format!("malformed replica record {text:?}")))
}

/// Records that `shard`'s local state belongs to `replica` (durable when it returns).
pub fn write(data_dir: &Path, shard: u64, replica: u64) -> Result<()> {
    let dir = folder(data_dir);
    let created = !dir.exists();
    fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    if created {
        durable_file::sync_dir(data_dir)?;
    }
    durable_file::write_atomically(
        &dir,
        &shard.to_string(),
        format!("replica {replica}\n").as_bytes(),
    )
}

/// Deletes `shard`'s record (durable when it returns); no record is not an error.
pub fn remove(data_dir: &Path, shard: u64) -> Result<()> {
    let dir = folder(data_dir);
    let path = dir.join(shard.to_string());
    match fs::remove_file(&path) {
        Ok(()) => durable_file::sync_dir(&dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(&path, e)),
    }
}

/// The shards that have a record.
pub fn shards(data_dir: &Path) -> Result<Vec<u64>> {
    let dir = folder(data_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&dir, e)),
    };
    let mut shards = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(&dir, e))?;
        if let Some(shard) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
            shards.push(shard);
        }
    }
    shards.sort_unstable();
    Ok(shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path(), 7).unwrap(), None);
        write(dir.path(), 7, 12).unwrap();
        write(dir.path(), u64::MAX, 3).unwrap();
        assert_eq!(read(dir.path(), 7).unwrap(), Some(12));
        assert_eq!(shards(dir.path()).unwrap(), vec![7, u64::MAX]);
        remove(dir.path(), 7).unwrap();
        remove(dir.path(), 7).unwrap();
        assert_eq!(read(dir.path(), 7).unwrap(), None);
    }

    #[test]
    fn a_malformed_record_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 1, 1).unwrap();
        fs::write(folder(dir.path()).join("1"), "replica x\n").unwrap();
        assert!(read(dir.path(), 1).is_err());
    }
}
