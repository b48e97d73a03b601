//! Read-index rounds and the freshness they prove.
//!
//! A **read index** is a log index such that any write acknowledged before the round started is
//! at or below it: a replica that has applied up to it can serve a linearizable read. The
//! leader obtains one by confirming its leadership with a quorum: a node-level check
//! ([`crate::leadership`]) or, when that cannot confirm, openraft's `ReadIndex` linearizer; a
//! follower asks the leader for one over the peer transport.
//!
//! [`Rounds`] coalesces the leader's openraft rounds: at most one is in flight per shard; reads that
//! arrive while it runs wait for the next one, which starts after they arrived. So every read
//! is served by a round that began after the read did, and a burst of N reads costs two quorum
//! rounds, not N.
//!
//! [`Freshness`] remembers the last successful round this replica took part in: when it
//! started (on [`BootInstant`], which keeps counting through a suspend) and its index. A replica that has applied that
//! index knows its state was current at that instant, which is what bounded-staleness reads
//! prove their bound with. That clock keeps running through a pause (SIGSTOP) and, unlike
//! `Instant`, through a suspend of the machine, so a resumed replica sees its proof as old as
//! it really is.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::clock::BootInstant;
use crate::error::{Error, Result};

/// The outcome of one round, shared by every read it serves.
type RoundResult = Result<u64, RoundError>;

/// A round's error in a form every waiter can get a copy of.
#[derive(Debug, Clone)]
pub enum RoundError {
    /// Not the leader (with the leader it knows of).
    NotLeader(Option<u64>),
    /// No quorum confirmed leadership in time, or the shard stopped.
    Unavailable(String),
}

impl RoundError {
    /// As the public error, for `shard`.
    pub fn into_error(self, shard: u64) -> Error {
        match self {
            RoundError::NotLeader(leader_hint) => Error::NotLeader { shard, leader_hint },
            RoundError::Unavailable(reason) => Error::Unavailable { shard, reason },
        }
    }
}

#[derive(Default)]
struct RoundState {
    running: bool,
    waiting: Vec<oneshot::Sender<RoundResult>>,
    rounds: u64,
}

/// Coalesces a shard leader's read-index rounds (see the module doc).
#[derive(Clone, Default)]
pub struct Rounds {
    state: Arc<Mutex<RoundState>>,
}

impl std::fmt::Debug for Rounds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rounds")
            .field("started", &self.started())
            .finish()
    }
}

impl Rounds {
    /// Rounds started so far.
    pub fn started(&self) -> u64 {
        self.state.lock().expect("rounds lock").rounds
    }

    /// Joins the next round; `run` performs one round (a quorum confirmation) and is called
    /// by whichever caller starts it.
    pub async fn read_index<F, Fut>(&self, run: F) -> std::result::Result<u64, RoundError>
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = RoundResult> + Send,
    {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut st = self.state.lock().expect("rounds lock");
            st.waiting.push(tx);
            !std::mem::replace(&mut st.running, true)
        };
        if start {
            let state = self.state.clone();
            tokio::spawn(async move {
                loop {
                    let batch = {
                        let mut st = state.lock().expect("rounds lock");
                        if st.waiting.is_empty() {
                            st.running = false;
                            break;
                        }
                        st.rounds += 1;
                        std::mem::take(&mut st.waiting)
                    };
                    let result = run().await;
                    for waiter in batch {
                        let _ = waiter.send(result.clone());
                    }
                }
            });
        }
        rx.await
            .unwrap_or_else(|_| Err(RoundError::Unavailable("read-index round abandoned".into())))
    }
}

/// The last read-index round this replica completed: when it started and its index.
#[derive(Debug, Clone, Default)]
pub struct Freshness {
    last: Arc<Mutex<Option<(BootInstant, u64)>>>,
}

impl Freshness {
    /// Records a round that started at `started` and returned `index`; keeps the newest.
    pub fn record(&self, started: BootInstant, index: u64) {
        let mut last = self.last.lock().expect("freshness lock");
        if last.is_none_or(|(t, _)| t < started) {
            *last = Some((started, index));
        }
    }

    /// How old the state is at most, given that `applied` has been applied: the age of the
    /// last round whose index is applied. `None` if no such round is known.
    pub fn staleness(&self, applied: u64) -> Option<Duration> {
        let last = *self.last.lock().expect("freshness lock");
        last.filter(|(_, index)| applied >= *index)
            .map(|(started, _)| started.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reads_share_rounds_that_started_after_they_arrived() {
        let rounds = Rounds::default();
        let counter = Arc::new(AtomicU64::new(0));
        let (release_tx, release_rx) = tokio::sync::watch::channel(0u64);
        let run = {
            let counter = counter.clone();
            move || {
                let counter = counter.clone();
                let mut release = release_rx.clone();
                async move {
                    let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                    // Each round waits until the test releases it.
                    while *release.borrow_and_update() < n {
                        release.changed().await.expect("sender alive");
                    }
                    Ok(n * 100)
                }
            }
        };
        // The first read starts round 1.
        let first = tokio::spawn({
            let (r, run) = (rounds.clone(), run.clone());
            async move { r.read_index(run).await }
        });
        while counter.load(Ordering::SeqCst) < 1 {
            tokio::task::yield_now().await;
        }
        // 50 reads arrive while round 1 runs: they must not be served by it.
        let late: Vec<_> = (0..50)
            .map(|_| {
                let (r, run) = (rounds.clone(), run.clone());
                tokio::spawn(async move { r.read_index(run).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        release_tx.send(1).unwrap();
        assert_eq!(first.await.unwrap().unwrap(), 100);
        release_tx.send(2).unwrap();
        for read in late {
            assert_eq!(
                read.await.unwrap().unwrap(),
                200,
                "served by the round after arrival"
            );
        }
        assert_eq!(rounds.started(), 2, "51 reads, 2 quorum rounds");
    }

    #[test]
    fn freshness_needs_the_round_index_applied() {
        let f = Freshness::default();
        assert_eq!(f.staleness(10), None);
        f.record(BootInstant::now(), 7);
        assert!(f.staleness(6).is_none(), "not applied yet: nothing proven");
        assert!(f.staleness(7).unwrap() < Duration::from_secs(1));
    }
}
