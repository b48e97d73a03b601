//! Small files written atomically and durably (temporary name, fsync, rename, fsync of the
//! directory), and directory fsyncs: the two moves every on-disk marker relies on.

use std::fs;
use std::io::Write as _;
use std::path::Path;

use crate::storage::error::{Error, Result};

/// Replaces `dir/name` with `contents`: a reader sees the old file or the whole new one, and
/// after a crash the new one survives once this returns.
pub fn write_atomically(dir: &Path, name: &str, contents: &[u8]) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(contents)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    sync_dir(dir)
}

/// Makes the creations, renames and deletions of entries in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}
