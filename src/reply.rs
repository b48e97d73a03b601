//! What the key-value API returns: values with versions, write outcomes, and receipts.

use crate::consistency::{ReadReceipt, WriteReceipt};
pub use crate::value::VersionedValue;

/// The result of a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetReply {
    /// The value and its version (the log index of the key's last write), if the key exists.
    pub value: Option<VersionedValue>,
    /// What was served.
    pub receipt: ReadReceipt,
}

/// The result of a delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeleteReply {
    /// Whether the key had a value.
    pub existed: bool,
    /// Where the delete landed in the shard's log.
    pub receipt: WriteReceipt,
}

/// The result of a compare-and-set. A mismatch is a normal outcome, not an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CasReply {
    /// True if the expected value matched and the new value was applied.
    pub applied: bool,
    /// When not applied: the value (and version) the key held instead.
    pub current: Option<VersionedValue>,
    /// Where the compare-and-set landed in the shard's log (it is ordered even when it fails).
    pub receipt: WriteReceipt,
}
