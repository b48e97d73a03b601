//! The public error: what went wrong, and whether the caller can know the outcome.
//!
//! Every error answers two questions ([`Error::is_definite`], [`Error::is_retryable`]):
//! - **definite**: the operation certainly did not take effect (safe to retry, or to report as
//!   failed); **indeterminate**: a write may still commit (a put or compare-and-set must not be
//!   retried blindly);
//! - **retryable**: trying again (perhaps elsewhere, perhaps later) can succeed.

use std::path::PathBuf;

use crate::config::ConfigError;

/// An error from kvnode's public API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is unacceptable (empty or oversized key, oversized value).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// The data directory was created with another shard count (or node id); the shard map of
    /// an existing directory cannot change.
    #[error(
        "{path} was created for {on_disk}, but the configuration asks for {configured}; \
         the shard count and node id of a data directory are fixed"
    )]
    IdentityMismatch {
        /// The identity file.
        path: PathBuf,
        /// What the directory was created with.
        on_disk: String,
        /// What the configuration asked for.
        configured: String,
    },

    /// This replica is not the shard's leader; `leader_hint` is the leader it knows of.
    #[error("shard {shard}: not the leader (leader hint: {leader_hint:?})")]
    NotLeader {
        /// The shard.
        shard: u64,
        /// The node believed to lead the shard, if known.
        leader_hint: Option<u64>,
    },

    /// No quorum of the shard is reachable, or the replica cannot prove what the read level
    /// requires; nothing was done.
    #[error("shard {shard} unavailable: {reason}")]
    Unavailable {
        /// The shard.
        shard: u64,
        /// Why.
        reason: String,
    },

    /// The request did not finish in time. For a write this is **indeterminate**: the write
    /// may still commit.
    #[error("shard {shard}: {operation} timed out after {millis} ms (outcome unknown for writes)")]
    Timeout {
        /// The shard.
        shard: u64,
        /// What timed out.
        operation: &'static str,
        /// The deadline.
        millis: u64,
        /// Whether the operation was a write (whose outcome is then unknown).
        write: bool,
    },

    /// A write's log entry was replaced during a leader change; it may or may not have
    /// committed elsewhere (indeterminate).
    #[error(
        "shard {shard}: leadership changed while the write was in flight; it may or may not have committed"
    )]
    LeaderChanged {
        /// The shard.
        shard: u64,
        /// The new leader, if known.
        leader_hint: Option<u64>,
    },

    /// On-disk state is damaged or unreadable, or the disk failed.
    #[error(transparent)]
    Storage(#[from] StorageError),

    /// A shard's Raft group stopped after a fatal error (for example a storage failure).
    #[error("shard {shard} stopped: {reason}")]
    ShardStopped {
        /// The shard.
        shard: u64,
        /// The fatal error.
        reason: String,
    },

    /// A membership change names something that exists already: an address held by a node
    /// that is past `Joining`. Nothing was changed (definite).
    #[error("already exists: {0}")]
    AlreadyExists(String),

    /// A request meant for cluster `requested` reached a node of cluster `cluster` (a join
    /// with another `--cluster-id`). Nothing was changed (definite).
    #[error(
        "cluster mismatch: this node belongs to cluster {cluster:?}, the request is for cluster {requested:?}"
    )]
    WrongCluster {
        /// The answering node's cluster.
        cluster: String,
        /// The cluster the request named.
        requested: String,
    },

    /// The node is shutting down or closed.
    #[error("node is shut down")]
    Shutdown,
}

impl Error {
    /// True if the operation certainly did not take effect.
    pub fn is_definite(&self) -> bool {
        match self {
            Error::Timeout { write, .. } => !write,
            Error::LeaderChanged { .. } => false,
            // A fatal stop or a storage error during a write may hit after the entry was
            // proposed; reads and validation failures never change anything.
            Error::ShardStopped { .. } | Error::Storage(_) => false,
            _ => true,
        }
    }

    /// True if the same request may succeed later or at another replica.
    pub fn is_retryable(&self) -> bool {
        // `Shutdown`: this node is going away; another replica can serve.
        matches!(
            self,
            Error::NotLeader { .. }
                | Error::Unavailable { .. }
                | Error::Timeout { .. }
                | Error::LeaderChanged { .. }
                | Error::Shutdown
        )
    }
}

/// A failure of the node's storage: which file or directory, and what went wrong. Opaque:
/// the storage engines' own error types stay inside kvnode.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct StorageError(Box<crate::storage::Error>);

impl StorageError {
    /// True if data on disk is damaged (a checksum failed, a record does not decode, a log is
    /// not contiguous), as opposed to an I/O failure or an unsupported format.
    pub fn is_corruption(&self) -> bool {
        matches!(*self.0, crate::storage::Error::Corruption { .. })
    }

    /// The storage-layer error (for kvnode's own tests and tools).
    #[doc(hidden)]
    pub fn inner(&self) -> &crate::storage::Error {
        &self.0
    }
}

impl From<crate::storage::Error> for StorageError {
    fn from(e: crate::storage::Error) -> Self {
        StorageError(Box::new(e))
    }
}

impl From<crate::storage::Error> for Error {
    fn from(e: crate::storage::Error) -> Self {
        Error::Storage(e.into())
    }
}

/// Shorthand for kvnode results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
