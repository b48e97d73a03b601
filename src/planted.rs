//! Planted consistency bugs, for proving the Jepsen checkers catch them: a test-only switch
//! (the `planted-bugs` feature, on in `cargo test` builds only) read once from the
//! `KVNODE_PLANTED_BUG` environment variable.
//!
//! The bugs themselves are fenced hooks in [`crate::shard`] (`planted_read`, `planted_write`,
//! and `holds_vote_for` for `confirm-any-vote`);
//! this module only says which one, if any, is active. Unset or empty: none, and the store
//! behaves exactly as without the feature.

use std::sync::OnceLock;

/// The environment variable that names the active bug.
pub const ENV_VAR: &str = "KVNODE_PLANTED_BUG";

/// A known consistency bug the shard can be told to commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    /// `follower-local-read`: a linearizable read on a follower serves local state at once,
    /// with no read index (stale reads).
    FollowerLocalRead,
    /// `leader-no-confirm`: a linearizable or lease read on a replica that believes it leads
    /// serves local state with no quorum round or lease check (stale reads from a deposed
    /// leader).
    LeaderNoConfirm,
    /// `ack-uncommitted`: the leader acknowledges a write that has not committed within 50 ms
    /// (lost acknowledged writes when it is then deposed).
    AckUncommitted,
    /// `confirm-any-vote`: a replica answers every node-level leadership check yes, whatever
    /// vote it holds (stale linearizable reads from a deposed leader that can still reach the
    /// group, e.g. one resumed after a pause).
    ConfirmAnyVote,
    /// `read-index-applied`: a leader's node-level read index is its applied index alone, not
    /// raised to the last apply started and the highest commit index sent to a peer (stale
    /// linearizable reads while the leader's apply lags its commit: a follower shows an entry
    /// the leader has not applied yet).
    ReadIndexApplied,
}

impl Bug {
    /// Every bug, in the order they are documented.
    pub const ALL: [Bug; 5] = [
        Bug::FollowerLocalRead,
        Bug::LeaderNoConfirm,
        Bug::AckUncommitted,
        Bug::ConfirmAnyVote,
        Bug::ReadIndexApplied,
    ];

    /// The bug's name in [`ENV_VAR`].
    pub fn name(self) -> &'static str {
        match self {
            Bug::FollowerLocalRead => "follower-local-read",
            Bug::LeaderNoConfirm => "leader-no-confirm",
            Bug::AckUncommitted => "ack-uncommitted",
            Bug::ConfirmAnyVote => "confirm-any-vote",
            Bug::ReadIndexApplied => "read-index-applied",
        }
    }
}

/// Parses a bug's name as spelled in [`ENV_VAR`].
pub fn parse(name: &str) -> Result<Bug, String> {
    let name = name.trim();
    Bug::ALL
        .into_iter()
        .find(|b| b.name() == name)
        .ok_or_else(|| {
            let known: Vec<&str> = Bug::ALL.iter().map(|b| b.name()).collect();
            format!(
                "{ENV_VAR}={name:?} names no planted bug; known: {}",
                known.join(", ")
            )
        })
}

/// The active bug, if any: [`ENV_VAR`] read on first call. Panics if it names no bug (a
/// misspelt switch must not silently test the correct code); logs the active bug once.
pub fn active() -> Option<Bug> {
    static ACTIVE: OnceLock<Option<Bug>> = OnceLock::new();
    *ACTIVE.get_or_init(|| {
        let value = std::env::var(ENV_VAR)
            .ok()
            .filter(|v| !v.trim().is_empty())?;
        let bug = parse(&value).unwrap_or_else(|e| panic!("{e}"));
        tracing::warn!(
            bug = bug.name(),
            "PLANTED BUG ACTIVE: {} (test-only consistency fault; set by {ENV_VAR})",
            bug.name()
        );
        Some(bug)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_name() {
        assert_eq!(parse("follower-local-read"), Ok(Bug::FollowerLocalRead));
        assert_eq!(parse("leader-no-confirm"), Ok(Bug::LeaderNoConfirm));
        assert_eq!(parse("ack-uncommitted"), Ok(Bug::AckUncommitted));
        assert_eq!(parse(" ack-uncommitted\n"), Ok(Bug::AckUncommitted));
        assert_eq!(parse("confirm-any-vote"), Ok(Bug::ConfirmAnyVote));
        for bug in Bug::ALL {
            assert_eq!(parse(bug.name()), Ok(bug));
        }
    }

    #[test]
    fn rejects_unknown_names() {
        for bad in [
            "",
            "follower_local_read",
            "FollowerLocalRead",
            "ack",
            "none",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains(ENV_VAR), "{err}");
            assert!(err.contains("follower-local-read"), "{err}");
        }
    }
}
