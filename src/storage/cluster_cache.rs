//! `<data-dir>/CLUSTER`: the newest cluster map this node has seen, as opaque bytes in one
//! checksummed frame (see [`crate::storage::codec`]), replaced atomically
//! ([`durable_file::write_atomically`]).
//!
//! Why a cache: a restarting node must route and admit peers before it reaches the META group
//! (which may be down, or on other nodes). Why it may be lost: it is only a cache; the META
//! group is the source of truth, and any newer map replaces it. So a damaged file is reported
//! as [`Error::Corruption`] for the caller to log and ignore, never trusted and never a panic.
//! This module knows no cluster map: the node encodes and decodes it (storage knows no Raft
//! and no membership).

use std::fs;
use std::path::{Path, PathBuf};

use crate::storage::codec::{Frame, decode_frame, encode_frame};
use crate::storage::durable_file;
use crate::storage::error::{Error, Result};

const FILE: &str = "CLUSTER";
/// The frame's version byte: the payload is the map in the project's serde codec.
const VERSION: u8 = 1;

/// Path of the cache file in `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// The cached map's bytes, `None` if there is no cache yet.
///
/// # Errors
///
/// [`Error::Corruption`] if the file is truncated, fails its checksum, has another version
/// byte or trailing bytes; [`Error::Io`] if it cannot be read.
pub fn read(dir: &Path) -> Result<Option<Vec<u8>>> {
    let path = path(dir);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let damaged = |detail: String| Err(Error::corruption(&path, 0, detail));
    match decode_frame(&bytes) {
        Frame::Valid {
            version: VERSION,
            payload,
            len,
        } if len == bytes.len() => Ok(Some(payload.to_vec())),
        Frame::Valid { version, len, .. } if version == VERSION => {
            damaged(format!("{} bytes after the cluster map", bytes.len() - len))
        }
        Frame::Valid { version, .. } => damaged(format!("unknown version {version}")),
        Frame::Incomplete => damaged(format!("truncated ({} bytes)", bytes.len())),
        Frame::BadHeader | Frame::BadBody => damaged("checksum mismatch".into()),
    }
}

/// Replaces the cache with `map` (durable once this returns).
pub fn write(dir: &Path, map: &[u8]) -> Result<()> {
    let mut framed = Vec::with_capacity(map.len() + 16);
    encode_frame(VERSION, map, &mut framed);
    durable_file::write_atomically(dir, FILE, &framed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_reports_damage() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        write(dir.path(), b"a map").unwrap();
        assert_eq!(read(dir.path()).unwrap().as_deref(), Some(&b"a map"[..]));
        let good = fs::read(path(dir.path())).unwrap();
        let damaged: Vec<Vec<u8>> = vec![
            good[..good.len() - 1].to_vec(),
            good[..5].to_vec(),
            Vec::new(),
            [&good[..], b"x"].concat(),
            {
                let mut flipped = good.clone();
                *flipped.last_mut().unwrap() ^= 1;
                flipped
            },
        ];
        for bytes in damaged {
            fs::write(path(dir.path()), &bytes).unwrap();
            assert!(
                matches!(read(dir.path()), Err(Error::Corruption { .. })),
                "{bytes:?}"
            );
        }
    }
}
