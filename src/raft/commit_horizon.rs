//! The highest commit index a replica has told any peer: the half of a leader's read index
//! that its own state machine cannot see.
//!
//! A leader's read index must be at or above every entry that some replica may already have
//! applied, and so shown to a client, when the read starts (see [`crate::leadership`] §1).
//! The leader's own applies are visible to it, but a follower applies an entry as soon as it
//! learns that the entry is committed, which may be before the leader applies it (its apply
//! paused by a snapshot build, or in the middle of a long chunk). openraft's committed index
//! is inside its core task, and its metrics are published after the replication tasks were
//! told, so neither can be read at the read's start without a round through the core.
//!
//! A follower learns a commit index only from the leader's `AppendEntries` (entries and
//! heartbeats alike: openraft's default `stream_append` sends each request through
//! `append_entries`), or as the last log id of a snapshot, which the leader built from
//! entries it had applied. So the network adapter records every `leader_commit` it sends in a
//! [`CommitHorizon`] *before* the message leaves: at any instant, no peer can have learned of a
//! commit index above the horizon. The horizon never decreases; after a restart it starts at
//! zero, which is safe because a restarted replica must win an election and apply an entry of
//! its new term before it serves a read index, and every entry committed before that is at or
//! below that entry.

use std::sync::atomic::{AtomicU64, Ordering};

/// See the module doc. One per local replica, shared by its network clients and its read path.
#[derive(Debug, Default)]
pub struct CommitHorizon(AtomicU64);

impl CommitHorizon {
    /// Records that a message telling a peer `committed` is about to be sent.
    pub fn record(&self, committed: u64) {
        self.0.fetch_max(committed, Ordering::AcqRel);
    }

    /// The highest commit index recorded so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_horizon_only_grows() {
        let horizon = CommitHorizon::default();
        assert_eq!(horizon.get(), 0);
        horizon.record(7);
        horizon.record(3);
        assert_eq!(horizon.get(), 7);
        horizon.record(9);
        assert_eq!(horizon.get(), 9);
    }
}
