//! The storage layer's error: what went wrong on disk, and where.
//!
//! Every variant names the file (and offset, where there is one) so an operator can find the
//! damage. None of these is retryable by a client: a node whose storage failed stops serving the
//! affected shards until an operator acts.

use std::io;
use std::path::PathBuf;

/// An error from kvnode's on-disk storage (write-ahead log, state-machine trees, snapshots).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O call failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory the call was about.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// Stored bytes fail their checksum or do not decode: the data is damaged.
    #[error("corrupt data in {path} at byte offset {offset}: {detail}")]
    Corruption {
        /// The damaged file.
        path: PathBuf,
        /// Where in the file the damage starts.
        offset: u64,
        /// What is wrong.
        detail: String,
    },

    /// The data directory (or one file in it) was written by a different on-disk format.
    #[error("{path} uses on-disk format {found}; this build reads format {supported}")]
    UnsupportedFormat {
        /// The file carrying the foreign format marker.
        path: PathBuf,
        /// The format found on disk.
        found: u32,
        /// The format this build reads and writes.
        supported: u32,
    },

    /// The directory holds files but is not a kvnode data directory (no `FORMAT` marker).
    #[error(
        "{path} is not empty and not a kvnode data directory (no FORMAT file); refusing to use it"
    )]
    NotADataDir {
        /// The directory.
        path: PathBuf,
    },

    /// The write-ahead log failed earlier (a write or fsync returned an error) and refuses all
    /// further writes: after a failed fsync the kernel may have dropped dirty pages, so retrying
    /// could acknowledge data that is not on disk. Restart the node to recover from the log.
    #[error("write-ahead log is stopped after an earlier failure: {0}")]
    WalFailed(String),

    /// The state-machine engine (sled) reported an error.
    #[error("state-machine store (sled) at {path}: {source}")]
    Sled {
        /// The sled directory.
        path: PathBuf,
        /// sled's error.
        #[source]
        source: sled::Error,
    },

    /// A caller asked for something the log cannot do (a gap, or a range that was purged).
    #[error("invalid log operation on shard {shard}: {detail}")]
    InvalidLogOp {
        /// The shard whose log was addressed.
        shard: u64,
        /// What was wrong with the request.
        detail: String,
    },

    /// The log was shut down.
    #[error("write-ahead log is shut down")]
    Shutdown,
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A corruption report for `path` at `offset`.
    pub fn corruption(path: impl Into<PathBuf>, offset: u64, detail: impl Into<String>) -> Self {
        Error::Corruption {
            path: path.into(),
            offset,
            detail: detail.into(),
        }
    }
}

/// openraft's storage traits speak `io::Error`; this keeps our error as the source so it can be
/// recovered with `downcast` and is shown in full in logs.
impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match &e {
            Error::Io { source, .. } => source.kind(),
            Error::Corruption { .. } | Error::UnsupportedFormat { .. } => {
                io::ErrorKind::InvalidData
            }
            Error::InvalidLogOp { .. } => io::ErrorKind::InvalidInput,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

/// Shorthand for storage results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
