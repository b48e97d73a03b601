//! Read levels, what each promises, and the receipts that say what was served.
//!
//! Every read names a [`ReadLevel`]; every reply carries a [`ReadReceipt`]; every write reply
//! carries a [`WriteReceipt`] whose log index advances the caller's [`SessionToken`].
//!
//! | level | served by | promise |
//! |---|---|---|
//! | `Linearizable` (default) | the leader after a read-index round | the value of the latest write acknowledged before the read began, or later |
//! | `Lease` | the leader within its lease, no round trip | linearizable if clock drift is bounded |
//! | `Session` | any replica that applied the token's index | read-your-writes and monotonic reads |
//! | `Bounded` | any replica that can prove its state is at most `max_staleness` old | the value was current within the bound |
//! | `Eventual` | any replica, local state | a value that was committed at some point; never uncommitted data |

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// How fresh a read must be. The CAP trade-off of one request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ReadLevel {
    /// Linearizable via a read-index round (the default).
    #[default]
    Linearizable,
    /// Linearizable if clocks drift boundedly: the leader serves within its lease.
    Lease,
    /// Read-your-writes and monotonic reads: served once the replica has applied what the
    /// token says this session wrote or saw on the key's shard.
    Session(SessionToken),
    /// Served locally if the replica can prove its state is at most `max_staleness` old;
    /// otherwise falls back to a linearizable read or fails, as `fallback` says.
    Bounded {
        /// How old the served state may be.
        max_staleness: Duration,
        /// What to do when the bound cannot be proven locally.
        fallback: Fallback,
    },
    /// Any replica's local state; always available.
    Eventual,
}

/// A read level that does not parse (see [`ReadLevel`]'s [`FromStr`](std::str::FromStr)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseReadLevelError {
    /// Not a level name.
    #[error(
        "unknown read level {0:?}: use linearizable, lease, session, bounded:DURATION \
         (e.g. bounded:500ms) or eventual"
    )]
    Unknown(String),
    /// `bounded:` with a bound that is not a positive duration.
    #[error("bad read level {level:?}: {problem}")]
    BadBound {
        /// The level as given.
        level: String,
        /// What is wrong with the bound.
        problem: String,
    },
}

/// The one parser of read-level names, for every tool that takes a level on its command line
/// (`kvctl get --level`, `kvctl bench --level`): `linearizable`, `lease`, `session` (a new,
/// empty token), `bounded:DURATION` (e.g. `bounded:500ms`, see [`parse_duration`]; the bound
/// must be positive; the fallback is linearizable) or `eventual`. Surrounding white space is
/// ignored.
impl std::str::FromStr for ReadLevel {
    type Err = ParseReadLevelError;

    fn from_str(s: &str) -> Result<ReadLevel, ParseReadLevelError> {
        match s.trim() {
            "linearizable" => Ok(ReadLevel::Linearizable),
            "lease" => Ok(ReadLevel::Lease),
            "session" => Ok(ReadLevel::Session(SessionToken::new())),
            "eventual" => Ok(ReadLevel::Eventual),
            other => match other.strip_prefix("bounded:") {
                Some(bound) => {
                    let bad = |problem: String| ParseReadLevelError::BadBound {
                        level: s.to_string(),
                        problem,
                    };
                    let max_staleness = parse_duration(bound).map_err(bad)?;
                    if max_staleness.is_zero() {
                        return Err(bad("the bound must be positive".to_string()));
                    }
                    Ok(ReadLevel::Bounded {
                        max_staleness,
                        fallback: Fallback::Linearizable,
                    })
                }
                None => Err(ParseReadLevelError::Unknown(s.to_string())),
            },
        }
    }
}

/// Parses a duration as the tools spell it: `500ms`, `2s`, `1m` (a bare number is
/// milliseconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "ms"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 2s, 1m)"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("unknown unit {unit:?} in {s:?} (use ms, s or m)")),
    }
}

/// What a bounded-staleness read does when the replica cannot prove the bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fallback {
    /// Fall back to a linearizable read (the receipt then says `Linearizable`).
    #[default]
    Linearizable,
    /// Fail with `Unavailable`.
    Fail,
}

/// The level a read was actually served at (after any fallback).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServedLevel {
    /// Linearizable (read index).
    Linearizable,
    /// Leader lease.
    Lease,
    /// Session.
    Session,
    /// Bounded staleness.
    Bounded,
    /// Eventual.
    Eventual,
}

impl fmt::Display for ServedLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServedLevel::Linearizable => "linearizable",
            ServedLevel::Lease => "lease",
            ServedLevel::Session => "session",
            ServedLevel::Bounded => "bounded",
            ServedLevel::Eventual => "eventual",
        })
    }
}

/// An upper bound on how stale a served value may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staleness {
    /// The read was linearizable: nothing newer was acknowledged before it began.
    Zero,
    /// The state served was current at most this long before the read.
    AtMost(Duration),
    /// No bound is known (eventual reads).
    Unknown,
}

/// What a read served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadReceipt {
    /// The level actually served (after any fallback).
    pub level: ServedLevel,
    /// The node that served it.
    pub node: u64,
    /// The key's shard.
    pub shard: u64,
    /// The served value reflects the shard's log up to at least this index: the replica's
    /// applied index, or the key's own last write if an apply in progress made it visible
    /// first. A session token advanced to it never lets a later read go back in time.
    pub applied_index: u64,
    /// How stale the served state may be.
    pub staleness: Staleness,
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteReceipt {
    /// The key's shard.
    pub shard: u64,
    /// The write's index in the shard's log (the key's new version).
    pub index: u64,
}

/// Per shard, the highest log index a session has written or seen: a session read waits until
/// the serving replica has applied at least that far on the key's shard.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionToken {
    seen: BTreeMap<u64, u64>,
}

impl SessionToken {
    /// An empty token (no constraint).
    pub fn new() -> SessionToken {
        SessionToken::default()
    }

    /// Records that the session wrote or read `shard` at `index`.
    pub fn observe(&mut self, shard: u64, index: u64) {
        let seen = self.seen.entry(shard).or_insert(0);
        *seen = (*seen).max(index);
    }

    /// Records a write.
    pub fn observe_write(&mut self, receipt: &WriteReceipt) {
        self.observe(receipt.shard, receipt.index);
    }

    /// Records a read.
    pub fn observe_read(&mut self, receipt: &ReadReceipt) {
        self.observe(receipt.shard, receipt.applied_index);
    }

    /// The index a replica must have applied on `shard` before serving this session.
    pub fn required(&self, shard: u64) -> u64 {
        self.seen.get(&shard).copied().unwrap_or(0)
    }

    /// `(shard, index)` pairs, for the wire.
    pub fn entries(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.seen.iter().map(|(s, i)| (*s, *i))
    }
}

/// Options of one read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// The consistency level.
    pub level: ReadLevel,
}

impl ReadOptions {
    /// Linearizable (the default).
    pub fn linearizable() -> ReadOptions {
        ReadOptions::default()
    }

    /// Eventual: any local state.
    pub fn eventual() -> ReadOptions {
        ReadOptions {
            level: ReadLevel::Eventual,
        }
    }

    /// Leader lease.
    pub fn lease() -> ReadOptions {
        ReadOptions {
            level: ReadLevel::Lease,
        }
    }

    /// Session reads against `token`.
    pub fn session(token: &SessionToken) -> ReadOptions {
        ReadOptions {
            level: ReadLevel::Session(token.clone()),
        }
    }

    /// Bounded staleness with a linearizable fallback.
    pub fn bounded(max_staleness: Duration) -> ReadOptions {
        ReadOptions {
            level: ReadLevel::Bounded {
                max_staleness,
                fallback: Fallback::Linearizable,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_token_keeps_the_highest_index_per_shard() {
        let mut t = SessionToken::new();
        t.observe(3, 10);
        t.observe(3, 7);
        t.observe_write(&WriteReceipt { shard: 1, index: 4 });
        assert_eq!(t.required(3), 10);
        assert_eq!(t.required(1), 4);
        assert_eq!(t.required(2), 0);
        assert_eq!(t.entries().collect::<Vec<_>>(), vec![(1, 4), (3, 10)]);
    }

    #[test]
    fn read_levels_parse() {
        assert_eq!("lease".parse::<ReadLevel>(), Ok(ReadLevel::Lease));
        assert_eq!(" eventual ".parse::<ReadLevel>(), Ok(ReadLevel::Eventual));
        assert_eq!(
            "bounded:2s".parse::<ReadLevel>(),
            Ok(ReadLevel::Bounded {
                max_staleness: Duration::from_secs(2),
                fallback: Fallback::Linearizable
            })
        );
        assert!(matches!(
            "bounded:0ms".parse::<ReadLevel>(),
            Err(ParseReadLevelError::BadBound { .. })
        ));
        assert!(matches!(
            "bounded".parse::<ReadLevel>(),
            Err(ParseReadLevelError::Unknown(_))
        ));
        assert_eq!(parse_duration("250"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("1h").is_err());
    }
}
