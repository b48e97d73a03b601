//! Segment files: naming, the file header, and the recovery scan that tells a torn tail from
//! corruption.
//!
//! A segment is `<20-digit id>.wal`: a 24-byte header (magic, format, id, CRC) followed by
//! frames ([`crate::storage::codec`]). The first frame is always a `Checkpoint`; a segment that
//! was closed in an orderly way ends with a `Seal` naming the next one.
//!
//! Recovery rules:
//! - a sealed (non-last) segment must scan cleanly to its `Seal`, which must be the last bytes:
//!   any bad frame, a missing seal or a short file is [`Error::Corruption`];
//! - in the last segment, the first bad frame at offset `o` is a **torn tail** (a write that was
//!   never acknowledged, cut off on open) unless some later valid frame records that the segment
//!   had been synced past `o`, in which case acknowledged data was damaged: corruption.

use std::fs;
use std::path::{Path, PathBuf};

use crate::storage::codec::{self, FRAME_HEADER_LEN, Frame};
use crate::storage::error::{Error, Result};
use crate::storage::wal::record::{Envelope, RECORD_VERSION, Record};

/// First bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"KVNWAL\0\0";
/// On-disk format of segment files written by this build.
pub const SEGMENT_FORMAT: u32 = 1;
/// Size of the segment header.
pub const SEGMENT_HEADER_LEN: u64 = 24;

/// Path of segment `id` in `dir`.
pub fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.wal"))
}

/// Segment ids present in `dir`, ascending. Other files are ignored.
pub fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(stem) = name.strip_suffix(".wal")
            && stem.len() == 20
            && let Ok(id) = stem.parse::<u64>()
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// The header of segment `id`.
pub fn encode_header(id: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&SEGMENT_FORMAT.to_le_bytes());
    h[12..20].copy_from_slice(&id.to_le_bytes());
    let crc = crc32fast::hash(&h[0..20]);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks the header at the start of `bytes` belongs to segment `id` of our format.
fn check_header(path: &Path, id: u64, bytes: &[u8]) -> Result<()> {
    let h = &bytes[..SEGMENT_HEADER_LEN as usize];
    if h[0..8] != SEGMENT_MAGIC {
        return Err(Error::corruption(
            path,
            0,
            "not a kvnode WAL segment (bad magic)",
        ));
    }
    let crc = u32::from_le_bytes(h[20..24].try_into().expect("4 bytes"));
    if crc32fast::hash(&h[0..20]) != crc {
        return Err(Error::corruption(
            path,
            0,
            "segment header checksum mismatch",
        ));
    }
    let format = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if format != SEGMENT_FORMAT {
        return Err(Error::UnsupportedFormat {
            path: path.to_owned(),
            found: format,
            supported: SEGMENT_FORMAT,
        });
    }
    let found_id = u64::from_le_bytes(h[12..20].try_into().expect("8 bytes"));
    if found_id != id {
        return Err(Error::corruption(
            path,
            12,
            format!("header names segment {found_id}, file name says {id}"),
        ));
    }
    Ok(())
}

/// One valid record found by [`scan`], with where its frame sits.
#[derive(Debug)]
pub struct ScannedRecord {
    /// Byte offset of the frame in the segment.
    pub offset: u64,
    /// Total frame length.
    pub len: u32,
    /// The record.
    pub record: Record,
}

/// What [`scan`] found in one segment.
#[derive(Debug)]
pub struct Scanned {
    /// The valid records, in order.
    pub records: Vec<ScannedRecord>,
    /// Length of the valid prefix (header + valid frames).
    pub valid_len: u64,
    /// `Some(next)` if the segment ends with a seal.
    pub sealed: Option<u64>,
    /// Bytes after `valid_len` that were judged a torn tail (last segment only).
    pub torn_bytes: u64,
}

/// Scans segment `id` (its whole contents in `bytes`). `is_last` selects the tail rule.
pub fn scan(path: &Path, id: u64, bytes: &[u8], is_last: bool) -> Result<Scanned> {
    let file_len = bytes.len() as u64;
    if file_len < SEGMENT_HEADER_LEN {
        if is_last {
            // The segment was being created when the process died; nothing in it was synced.
            return Ok(Scanned {
                records: Vec::new(),
                valid_len: 0,
                sealed: None,
                torn_bytes: file_len,
            });
        }
        return Err(Error::corruption(
            path,
            0,
            format!("segment is {file_len} bytes, shorter than its header"),
        ));
    }
    check_header(path, id, bytes)?;

    let mut records = Vec::new();
    let mut off = SEGMENT_HEADER_LEN;
    let mut sealed = None;
    while off < file_len {
        let rest = &bytes[off as usize..];
        match codec::decode_frame(rest) {
            Frame::Valid {
                version,
                payload,
                len,
            } => {
                let envelope = decode_envelope(path, off, version, payload)?;
                if records.is_empty() && !matches!(envelope.record, Record::Checkpoint { .. }) {
                    return Err(Error::corruption(
                        path,
                        off,
                        "first record of the segment is not a checkpoint",
                    ));
                }
                if let Record::Seal { next_segment } = envelope.record {
                    if off + len as u64 != file_len {
                        return Err(Error::corruption(
                            path,
                            off + len as u64,
                            "bytes follow the segment's seal",
                        ));
                    }
                    sealed = Some(next_segment);
                }
                records.push(ScannedRecord {
                    offset: off,
                    len: len as u32,
                    record: envelope.record,
                });
                off += len as u64;
            }
            bad => {
                let what = describe(&bad);
                if !is_last {
                    return Err(Error::corruption(
                        path,
                        off,
                        format!("{what} in a sealed segment"),
                    ));
                }
                if let Some((at, synced)) = synced_evidence_after(bytes, off) {
                    return Err(Error::corruption(
                        path,
                        off,
                        format!(
                            "{what}, but the record at offset {at} says the segment was synced \
                             up to offset {synced}: acknowledged data is damaged"
                        ),
                    ));
                }
                return Ok(Scanned {
                    records,
                    valid_len: off,
                    sealed: None,
                    torn_bytes: file_len - off,
                });
            }
        }
    }
    if !is_last && sealed.is_none() {
        return Err(Error::corruption(
            path,
            file_len,
            "segment ends without a seal but a newer segment exists (truncated file?)",
        ));
    }
    Ok(Scanned {
        records,
        valid_len: file_len,
        sealed,
        torn_bytes: 0,
    })
}

fn decode_envelope(path: &Path, off: u64, version: u8, payload: &[u8]) -> Result<Envelope> {
    if version != RECORD_VERSION {
        return Err(Error::UnsupportedFormat {
            path: path.to_owned(),
            found: u32::from(version),
            supported: u32::from(RECORD_VERSION),
        });
    }
    Envelope::decode(payload)
        .map_err(|e| Error::corruption(path, off, format!("record does not decode: {e}")))
}

fn describe(frame: &Frame<'_>) -> &'static str {
    match frame {
        Frame::Incomplete => "incomplete record",
        Frame::BadHeader => "record header checksum mismatch",
        Frame::BadBody => "record checksum mismatch",
        Frame::Valid { .. } => "valid record",
    }
}

/// Looks for a valid frame after a bad one at `bad_at` whose writer knew the segment was synced
/// beyond `bad_at`. Returns `(offset, synced_upto)` of the first such frame.
fn synced_evidence_after(bytes: &[u8], bad_at: u64) -> Option<(u64, u64)> {
    let mut p = bad_at as usize + 1;
    while p + FRAME_HEADER_LEN <= bytes.len() {
        if let Frame::Valid { payload, len, .. } = codec::decode_frame(&bytes[p..])
            && let Ok(envelope) = Envelope::decode(payload)
        {
            if envelope.synced_upto > bad_at {
                return Some((p as u64, envelope.synced_upto));
            }
            p += len;
            continue;
        }
        p += 1;
    }
    None
}
