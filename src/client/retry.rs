//! When the client tries a failed request again, where it sends it, and how long it waits
//! first. This file owns [`RetryPolicy`] and its decision ([`RetryPolicy::decide`]); it does
//! no I/O, so the rules are tested as a table.
//!
//! **The rule: a request is retried only if repeating it cannot do harm and may succeed.**
//!
//! - The error must be retryable ([`Error::is_retryable`]): `NotLeader`, `Unavailable`,
//!   `Timeout`, `LeaderChanged`. Everything else (`InvalidArgument`, `ShardStopped`, storage
//!   errors, `Shutdown`, ...) is returned at once.
//! - A **write** (put, delete, compare-and-set) is retried only if its failure is
//!   **definite** ([`Error::is_definite`]): the write certainly did not take effect. A write
//!   whose outcome is indeterminate (a timeout, a leader change, a connection lost mid-request)
//!   is returned to the caller, because it may have committed: retrying a put could overwrite
//!   a later write, retrying a compare-and-set could report a mismatch against its own first
//!   attempt. A delete counts as a write: a repeated delete would report `existed: false`
//!   for a key the first attempt removed.
//! - A **read** changes nothing, so any retryable failure of a read is retried.
//!
//! Where the retry goes ([`Next`]):
//!
//! | failure | next attempt goes to | waits |
//! |---|---|---|
//! | `NotLeader` with a leader hint | the hinted leader | nothing the first time, the backoff after |
//! | `NotLeader` without a hint | the leader named by a fresh shard map (`Status`) | the backoff |
//! | `Unavailable` (connection refused, no quorum, bound not provable) | another replica of the shard | the backoff |
//! | `Timeout` of a read | another replica of the shard | the backoff |
//! | `LeaderChanged` (a read never gets one; writes are indeterminate) | the hinted leader, or a fresh map | the backoff |
//!
//! The backoff doubles from [`RetryPolicy::initial_backoff`] up to
//! [`RetryPolicy::max_backoff`]; at most [`RetryPolicy::max_attempts`] attempts are made, and
//! never past the request's deadline (the client checks that: a retry whose wait would end
//! after the deadline is not made, and the last error is returned).

use std::time::Duration;

use crate::error::Error;

/// Whether a request may be repeated after an indeterminate failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// A read: repeating it changes nothing.
    Read,
    /// A put, delete or compare-and-set: repeating it after an indeterminate failure could
    /// apply it twice or misreport its result.
    Write,
}

/// Where the next attempt goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The node the refusing replica named as the shard's leader. If the client does not know
    /// that node's address, it uses the address the error carried, or refreshes its shard map.
    Leader(u64),
    /// Refresh the shard map from a node's `Status`, then go to the leader it names (or the
    /// shard's preferred replica if none is known).
    RefreshMap,
    /// Another replica of the shard than the one that just failed.
    OtherReplica,
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Try again at `next` after waiting `after`.
    Retry {
        /// Where.
        next: Next,
        /// How long to wait first.
        after: Duration,
    },
    /// Return the error to the caller.
    GiveUp,
}

/// Bounded exponential backoff, applied only to failures that are safe to retry (see the
/// module documentation for the rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The wait before the first retry that waits at all; doubled for every further attempt.
    pub initial_backoff: Duration,
    /// The longest wait between two attempts.
    pub max_backoff: Duration,
    /// The most attempts one request makes, the first included (1 disables retries).
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    /// 20 ms doubling up to 1 s, at most 8 attempts (about 2.3 s of waiting in all).
    fn default() -> RetryPolicy {
        RetryPolicy {
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(1),
            max_attempts: 8,
        }
    }
}

impl RetryPolicy {
    /// Never retries.
    pub fn never() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// Decides what to do after attempt number `attempt` (1 for the first) of an `operation`
    /// failed with `error`.
    pub fn decide(&self, operation: Operation, error: &Error, attempt: u32) -> Decision {
        if attempt >= self.max_attempts || !error.is_retryable() {
            return Decision::GiveUp;
        }
        if operation == Operation::Write && !error.is_definite() {
            // It may have committed: the caller must find out (read it back), not us.
            return Decision::GiveUp;
        }
        let backoff = self.backoff(attempt);
        let (next, after) = match error {
            Error::NotLeader {
                leader_hint: Some(leader),
                ..
            } => {
                // Follow a fresh redirect at once; a repeated one (an election in progress,
                // hints bouncing between nodes) waits like any other retry.
                let after = if attempt == 1 {
                    Duration::ZERO
                } else {
                    backoff
                };
                (Next::Leader(*leader), after)
            }
            Error::NotLeader {
                leader_hint: None, ..
            } => (Next::RefreshMap, backoff),
            Error::LeaderChanged {
                leader_hint: Some(leader),
                ..
            } => (Next::Leader(*leader), backoff),
            Error::LeaderChanged {
                leader_hint: None, ..
            } => (Next::RefreshMap, backoff),
            // Unavailable, a read's Timeout: another replica may do better.
            _ => (Next::OtherReplica, backoff),
        };
        Decision::Retry { next, after }
    }

    /// The wait before retry number `attempt` (1 for the first retry):
    /// `initial_backoff * 2^(attempt - 1)`, at most `max_backoff`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.initial_backoff
            .saturating_mul(1 << doublings)
            .min(self.max_backoff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn not_leader(hint: Option<u64>) -> Error {
        Error::NotLeader {
            shard: 1,
            leader_hint: hint,
        }
    }

    fn unavailable() -> Error {
        Error::Unavailable {
            shard: 1,
            reason: "connection refused".into(),
        }
    }

    fn timeout(write: bool) -> Error {
        Error::Timeout {
            shard: 1,
            operation: "request",
            millis: 5000,
            write,
        }
    }

    fn leader_changed() -> Error {
        Error::LeaderChanged {
            shard: 1,
            leader_hint: Some(2),
        }
    }

    fn retry(next: Next, after_ms: u64) -> Decision {
        Decision::Retry {
            next,
            after: Duration::from_millis(after_ms),
        }
    }

    #[test]
    fn the_decision_table() {
        use Operation::{Read, Write};
        let p = RetryPolicy::default();
        let cases: Vec<(Operation, Error, u32, Decision)> = vec![
            // Redirects: definite for every operation; the first one is immediate.
            (Write, not_leader(Some(3)), 1, retry(Next::Leader(3), 0)),
            (Read, not_leader(Some(3)), 1, retry(Next::Leader(3), 0)),
            (Write, not_leader(Some(3)), 2, retry(Next::Leader(3), 40)),
            (Write, not_leader(None), 1, retry(Next::RefreshMap, 20)),
            (Read, not_leader(None), 3, retry(Next::RefreshMap, 80)),
            // Nothing happened: another replica, after the backoff.
            (Write, unavailable(), 1, retry(Next::OtherReplica, 20)),
            (Read, unavailable(), 2, retry(Next::OtherReplica, 40)),
            // A read timing out is harmless to repeat; a write timing out may have committed.
            (Read, timeout(false), 1, retry(Next::OtherReplica, 20)),
            (Write, timeout(true), 1, Decision::GiveUp),
            // A write lost in a leader change may have committed.
            (Write, leader_changed(), 1, Decision::GiveUp),
            // Not retryable at all.
            (
                Read,
                Error::InvalidArgument("empty key".into()),
                1,
                Decision::GiveUp,
            ),
            (
                Write,
                Error::ShardStopped {
                    shard: 1,
                    reason: "wal failed".into(),
                },
                1,
                Decision::GiveUp,
            ),
            // A node shutting down did nothing: another replica can serve.
            (Read, Error::Shutdown, 1, retry(Next::OtherReplica, 20)),
            (Write, Error::Shutdown, 1, retry(Next::OtherReplica, 20)),
            // Out of attempts.
            (Read, unavailable(), 8, Decision::GiveUp),
            (Write, not_leader(Some(3)), 8, Decision::GiveUp),
        ];
        for (op, error, attempt, expected) in cases {
            assert_eq!(
                p.decide(op, &error, attempt),
                expected,
                "{op:?} {error} attempt {attempt}"
            );
        }
    }

    #[test]
    fn a_read_after_a_leader_change_follows_the_hint() {
        // Reads never see LeaderChanged from a kvnode server, but if they did, repeating
        // them would be harmless.
        let p = RetryPolicy::default();
        assert_eq!(
            p.decide(Operation::Read, &leader_changed(), 1),
            retry(Next::Leader(2), 20)
        );
    }

    #[test]
    fn indeterminate_writes_are_never_retried_whatever_the_policy() {
        let generous = RetryPolicy {
            max_attempts: u32::MAX,
            ..RetryPolicy::default()
        };
        for e in [timeout(true), leader_changed()] {
            assert!(!e.is_definite());
            for attempt in 1..20 {
                assert_eq!(
                    generous.decide(Operation::Write, &e, attempt),
                    Decision::GiveUp
                );
            }
        }
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let p = RetryPolicy::default();
        let waits: Vec<u64> = (1..=8).map(|a| p.backoff(a).as_millis() as u64).collect();
        assert_eq!(waits, [20, 40, 80, 160, 320, 640, 1000, 1000]);
        assert_eq!(p.backoff(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn never_gives_up_at_once() {
        assert_eq!(
            RetryPolicy::never().decide(Operation::Read, &unavailable(), 1),
            Decision::GiveUp
        );
    }
}
