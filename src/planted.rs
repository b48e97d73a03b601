//! Planted consistency bugs, for proving the Jepsen checkers catch them: a test-only switch
//! (the `planted-bugs` feature, on in `cargo test` builds only) that only the test-only
//! `kvnode-planted` binary arms, from the `KVNODE_PLANTED_BUG` environment variable. That
//! binary says so at start and in its `Status` reply; the `kvnode` binary never arms it,
//! even when a test or bench build compiled the hooks in.
//!
//! The bugs themselves are fenced hooks in [`crate::shard`] (`planted_read`, `planted_write`,
//! `planted_read_index`, and `holds_vote_for` for `confirm-any-vote`);
//! this module only says which one, if any, is active. Unset or empty: none, and the store
//! behaves exactly as without the feature.
//!
//! Each hook reports, through [`fired`], every time the bug was *exercised*: when it served or
//! acknowledged something in the situation the bug is about (see each [`Bug`] variant), not
//! every time it merely took the request. That is one log line starting with [`FIRED`], which
//! the fault tester counts in the node logs (`kvctl jepsen run --exercise N` runs until the bug
//! has fired N times), so a campaign shows how often it gave its checkers something to catch.

use std::sync::OnceLock;

/// The environment variable that names the active bug.
pub const ENV_VAR: &str = "KVNODE_PLANTED_BUG";

/// How the line begins that a process with an armed bug logs at start: `PLANTED BUG ACTIVE:
/// <name>` (the fault tester looks for it before it trusts a planted-bug campaign).
pub const ACTIVE_BANNER: &str = "PLANTED BUG ACTIVE";

/// How every line that reports an exercised bug begins: `planted bug fired: <name>: <what>`.
pub const FIRED: &str = "planted bug fired";

/// A known consistency bug the shard can be told to commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    /// `follower-local-read`: a linearizable read on a follower serves local state at once,
    /// with no read index (stale reads). Exercised: served while no message from the leader's
    /// node arrived for longer than the lease (the follower may be cut off and behind).
    FollowerLocalRead,
    /// `leader-no-confirm`: a linearizable or lease read on a replica that believes it leads
    /// serves local state with no quorum round or lease check (stale reads from a deposed
    /// leader). Exercised: served by an awake leader with no quorum acknowledgement for longer
    /// than the lease (another leader may have been elected).
    LeaderNoConfirm,
    /// `ack-uncommitted`: the leader acknowledges a write that has not committed within 50 ms
    /// (lost acknowledged writes when it is then deposed). Exercised: a write it acknowledged
    /// early then failed to commit under this leader (lost, unless a later leader had it).
    AckUncommitted,
    /// `confirm-any-vote`: a replica answers every node-level leadership check yes, whatever
    /// vote it holds (stale linearizable reads from a deposed leader that can still reach the
    /// group, e.g. one resumed after a pause).
    ConfirmAnyVote,
    /// `read-index-applied`: a leader's node-level read index is its applied index alone, not
    /// raised to the last apply started and the highest commit index sent to a peer (stale
    /// linearizable reads while the leader's apply lags its commit: a follower shows an entry
    /// the leader has not applied yet). Exercised: a read index handed out below the one the
    /// correct code captures.
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

/// Logs that `bug` was exercised (see the module doc): one line, `planted bug fired: <name>:
/// <what>`.
pub(crate) fn fired(bug: Bug, what: std::fmt::Arguments<'_>) {
    tracing::warn!("{FIRED}: {}: {what}", bug.name());
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

/// The armed bug: set once, by [`arm_from_env`], and only ever by the test-only
/// `kvnode-planted` binary. A library or `kvnode` binary that happens to be compiled with the
/// feature (any `cargo test` or `cargo bench` build) never arms it, so nothing, not even
/// [`ENV_VAR`], can switch a bug on there.
static ARMED: OnceLock<Option<Bug>> = OnceLock::new();

/// Arms the bug [`ENV_VAR`] names (none if it is unset or empty) for the rest of the process.
/// An unknown name is an error (a misspelt switch must not silently test the correct code).
/// Returns what was armed; a second call returns the first call's result.
pub fn arm_from_env() -> Result<Option<Bug>, String> {
    let wanted = match std::env::var(ENV_VAR) {
        Ok(v) if !v.trim().is_empty() => Some(parse(&v)?),
        _ => None,
    };
    Ok(*ARMED.get_or_init(|| wanted))
}

/// The active bug, if any: only what [`arm_from_env`] armed.
pub fn active() -> Option<Bug> {
    ARMED.get().copied().flatten()
}

/// True in a process where [`arm_from_env`] ran (the test-only `kvnode-planted` binary),
/// whether or not it armed a bug: test hooks driven from outside (such as an apply-lag
/// driver) may run only there.
pub fn is_test_binary() -> bool {
    ARMED.get().is_some()
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
