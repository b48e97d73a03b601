//! Test builds only (the `planted-bugs` feature): holds one replica's applies at a chosen
//! stage, so tests can make a replica's apply lag its commit index the way a slow snapshot
//! build or a long apply chunk does, and look at reads in that window.
//!
//! - [`Stage::BeforeWrite`]: no key of the held chunk is visible yet (a leader whose apply is
//!   paused while its followers have applied the entries);
//! - [`Stage::BeforePublish`]: every key write of the chunk is visible, but the applied index
//!   still names the previous chunk (the window in which a receipt could under-report).
//!
//! ## The apply-lag driver (`KVNODE_APPLY_LAG`)
//!
//! The fault tester's `apply-lag` nemesis (`kvctl jepsen run --nemesis apply-lag`) needs the
//! same window in real `kvnode` processes. With [`ENV_VAR`] set to `<hold_ms>/<every_ms>` (e.g.
//! `800/3000`), each node holds, in every window, the applies of the shards it leads at that
//! moment at [`Stage::BeforeWrite`], and releases them when the window ends: a leader's apply
//! lags its commit while its followers apply and serve. Windows start at every multiple of
//! `every` on the wall clock (time since the UNIX epoch) and last `hold`, so every node on the
//! machine, and the harness that records the windows in its history, agree on them without
//! talking. Each window ends with one log line, `apply-lag window: held N shards, M with an
//! apply waiting`, which the harness counts.
//!
//! Only the applies are held: commits, replication and elections go on, and a held leader's
//! writes are acknowledged when it applies them, after the window. Unset or empty: no driver.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::async_runtime::watch::WatchReceiver;
use tokio::sync::watch;

use crate::raft::TypeConfig;

/// Where in an apply a [`ApplyStall`] holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// After the entries were decided, before any key write.
    BeforeWrite,
    /// After every key write, before the applied index is published.
    BeforePublish,
}

/// See the module doc. One per state machine; shared with its shard.
#[derive(Debug)]
pub struct ApplyStall {
    hold: watch::Sender<Option<Stage>>,
    /// Applies waiting at the held stage right now.
    waiting: AtomicU64,
}

impl Default for ApplyStall {
    fn default() -> Self {
        ApplyStall {
            hold: watch::Sender::new(None),
            waiting: AtomicU64::new(0),
        }
    }
}

impl ApplyStall {
    /// From now on, applies that reach `stage` wait there until [`ApplyStall::release`].
    pub fn hold(&self, stage: Stage) {
        self.hold.send_replace(Some(stage));
    }

    /// Lets every held apply go on; later applies are not held.
    pub fn release(&self) {
        self.hold.send_replace(None);
    }

    /// How many applies are waiting at the held stage right now.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Acquire)
    }

    /// Called by the state machine at `stage`: returns at once unless that stage is held.
    pub(crate) async fn pass(&self, stage: Stage) {
        let mut rx = self.hold.subscribe();
        if *rx.borrow_and_update() != Some(stage) {
            return;
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        tracing::warn!(?stage, "test hook: apply held");
        let _ = rx.wait_for(|held| *held != Some(stage)).await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The environment variable that switches the apply-lag driver on: `<hold_ms>/<every_ms>`.
pub(crate) const ENV_VAR: &str = "KVNODE_APPLY_LAG";

/// How the line begins that a node logs when its apply-lag driver starts.
pub const ACTIVE_BANNER: &str = "APPLY LAG ACTIVE";

/// How each apply-lag window ends in the node log: `apply-lag window: held N shards, M with an
/// apply waiting`.
pub const WINDOW_DONE: &str = "apply-lag window: held";

/// When the driver holds applies: for `hold` from every multiple of `every` since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LagSchedule {
    /// How long each window holds the applies.
    pub(crate) hold: Duration,
    /// The period of the windows (more than `hold`).
    pub(crate) every: Duration,
}

/// A malformed [`ENV_VAR`] value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{ENV_VAR}={value:?}: {problem} (expected <hold_ms>/<every_ms> with 0 < hold < every)")]
pub(crate) struct LagScheduleError {
    /// The value.
    value: String,
    /// What is wrong with it.
    problem: &'static str,
}

impl LagSchedule {
    /// Parses `<hold_ms>/<every_ms>`.
    pub(crate) fn parse(value: &str) -> Result<LagSchedule, LagScheduleError> {
        let bad = |problem| LagScheduleError {
            value: value.to_string(),
            problem,
        };
        let (hold, every) = value.trim().split_once('/').ok_or(bad("no '/'"))?;
        let ms = |s: &str| s.trim().parse::<u64>().map(Duration::from_millis);
        let hold = ms(hold).map_err(|_| bad("the hold is not a number of milliseconds"))?;
        let every = ms(every).map_err(|_| bad("the period is not a number of milliseconds"))?;
        if hold.is_zero() || hold >= every {
            return Err(bad("the hold must be positive and shorter than the period"));
        }
        Ok(LagSchedule { hold, every })
    }

    /// The start of the first window at or after `now` (both since the UNIX epoch).
    pub(crate) fn next_start(&self, now: Duration) -> Duration {
        let every = self.every.as_nanos().max(1);
        let windows = now.as_nanos().div_ceil(every);
        Duration::from_nanos(u64::try_from(windows * every).unwrap_or(u64::MAX))
    }
}

/// One local replica as the driver sees it: its stall, and whether it leads right now.
pub(crate) struct LagTarget {
    /// The shard.
    pub(crate) shard: u64,
    /// Its state machine's stall (the driver stops when every replica's is gone).
    pub(crate) stall: Weak<ApplyStall>,
    /// Its openraft metrics (leading or not).
    pub(crate) metrics: openraft::type_config::alias::WatchReceiverOf<
        TypeConfig,
        openraft::RaftMetrics<TypeConfig>,
    >,
}

impl LagTarget {
    fn leads(&self) -> bool {
        self.metrics.borrow_watched().state == openraft::ServerState::Leader
    }
}

/// Starts the apply-lag driver over `targets` if [`ENV_VAR`] is set and this is the test-only
/// `kvnode-planted` binary ([`crate::planted::is_test_binary`]; anywhere else the variable is
/// ignored with a warning, and the fault tester, which looks for the driver's start line,
/// refuses to run); panics if it is set but malformed (a misspelt switch must not silently
/// test without the fault). The driver runs until every target's state machine is gone.
pub(crate) fn start_from_env(targets: Vec<LagTarget>) {
    let Some(value) = std::env::var(ENV_VAR).ok().filter(|v| !v.trim().is_empty()) else {
        return;
    };
    if !crate::planted::is_test_binary() {
        tracing::warn!(
            "{ENV_VAR} is set but ignored: only the test-only kvnode-planted binary acts on it"
        );
        return;
    }
    let schedule = LagSchedule::parse(&value).unwrap_or_else(|e| panic!("{e}"));
    tracing::warn!(
        hold_ms = schedule.hold.as_millis() as u64,
        every_ms = schedule.every.as_millis() as u64,
        "{ACTIVE_BANNER}: every period this node holds the applies of the shards it leads \
         (test-only fault; set by {ENV_VAR})"
    );
    tokio::spawn(drive(schedule, targets));
}

fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

async fn drive(schedule: LagSchedule, targets: Vec<LagTarget>) {
    loop {
        let now = since_epoch();
        let start = schedule.next_start(now);
        tokio::time::sleep(start.saturating_sub(now)).await;
        if targets.iter().all(|t| t.stall.strong_count() == 0) {
            return;
        }
        let held: Vec<(u64, Arc<ApplyStall>)> = targets
            .iter()
            .filter(|t| t.leads())
            .filter_map(|t| Some((t.shard, t.stall.upgrade()?)))
            .collect();
        for (_, stall) in &held {
            stall.hold(Stage::BeforeWrite);
        }
        tokio::time::sleep((start + schedule.hold).saturating_sub(since_epoch())).await;
        let waited: Vec<u64> = held
            .iter()
            .filter(|(_, stall)| stall.waiting() > 0)
            .map(|(shard, _)| *shard)
            .collect();
        for (_, stall) in &held {
            stall.release();
        }
        let shards: Vec<u64> = held.iter().map(|(shard, _)| *shard).collect();
        tracing::info!(
            ?shards,
            waited = ?waited,
            "{WINDOW_DONE} {} shards, {} with an apply waiting",
            held.len(),
            waited.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hold_and_period() {
        assert_eq!(
            LagSchedule::parse(" 800/3000\n"),
            Ok(LagSchedule {
                hold: Duration::from_millis(800),
                every: Duration::from_secs(3),
            })
        );
        for bad in [
            "",
            "800",
            "0/3000",
            "3000/3000",
            "4000/3000",
            "800ms/3s",
            "a/b",
        ] {
            let err = LagSchedule::parse(bad).unwrap_err();
            assert!(err.to_string().contains(ENV_VAR), "{err}");
        }
    }

    #[test]
    fn windows_start_at_multiples_of_the_period() {
        let s = LagSchedule::parse("800/3000").unwrap();
        let at = |ms: u64| s.next_start(Duration::from_millis(ms)).as_millis();
        assert_eq!(at(0), 0);
        assert_eq!(at(1), 3000);
        assert_eq!(at(3000), 3000);
        assert_eq!(at(1_700_000_000_001), 1_700_000_001_000);
    }
}
