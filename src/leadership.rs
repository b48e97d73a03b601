//! Node-level leadership checks: one peer message per round confirms every group this node leads.
//!
//! A linearizable read needs a **read index**: an index at or above every write acknowledged,
//! or visible on any replica, before the read began. openraft's `ReadIndex` linearizer gets one per group by sending that
//! group's heartbeats through its core task and replication tasks. With many groups per node
//! that is a round of task handoffs and peer messages per group, which is what made
//! linearizable gets cost more than etcd's. kvnode obtains the same proof once per node per
//! round instead (TiKV batches its read-index messages per peer in the same spirit):
//!
//! 1. **At the read's start**, on the leader `L` (see `Shard::confirmed_read_index`): `L`
//!    must lead right now (openraft's state is leader, with a vote `(T, L)` a quorum granted),
//!    an entry `L` proposed in term `T` must be applied here, and `L`'s stored vote must still
//!    be `(T, L)`. The read index `i` is then captured as the larger of
//!    - the last index whose apply has started on `L`: every write `L` acknowledged, and every
//!      key its state shows (keys of an apply become visible one by one), is at or below it;
//!    - the highest commit index `L` has sent to any peer ([`crate::raft::commit_horizon`]): a
//!      follower applies only entries it knows are committed, and learns that only from `L`'s
//!      `AppendEntries` (or a snapshot `L` built from applied state), so every entry a
//!      follower may have applied, and shown to a client, is at or below it.
//!
//!    Entries committed by earlier leaders precede `L`'s first entry of term `T`, which is
//!    applied. So `i` is at or above every write that any replica may have made visible before
//!    the read began, acknowledged or not, and the read is served once `L` has applied `i`.
//!    `L`'s applied index alone is not enough: with `L`'s apply paused (a snapshot build, a
//!    long chunk), a follower may already have applied and served a committed entry `L` has
//!    not, and a read on `L` after it would go back in time. Nor is a stored vote alone: after
//!    a restart openraft starts `L` as a follower with its vote unchanged, its peers hold that
//!    vote until the next election, and its applied state may be behind writes it acknowledged
//!    before a power loss; it serves a read index again only after winning an election, with
//!    an entry of the new term applied. (Planted bug `read-index-applied` keeps the applied
//!    index alone, for the fault tester; `tests/consistency.rs` holds a leader's apply and
//!    shows the window deterministically.)
//! 2. **A round that starts after the read's start** asks every other voter of the group
//!    whether its stored vote is still `(T, L)`. Votes only grow, and a voter's stored vote
//!    changes before it grants a vote to anyone else (the WAL's in-memory copy is updated when
//!    the vote record is written, before the fsync and before the reply). So if a majority
//!    (counting `L`) answer yes, no leader of a later term had been elected when the read
//!    began, and no later leader can have acknowledged a write `L` does not have at `i`.
//!
//! A round asks each peer at most once per wave, about every group with reads waiting, so
//! one message serves all of them; reads that arrive while a round runs wait for the next one,
//! which starts after they arrived. A group first asks only as many peers as it needs yes
//! answers from (one of two in a 3-replica group), preferring peers with no message in flight
//! and rotating among equals; it asks more at once when an answer is no or missing, and asks
//! every remaining voter if the round is still open after [`HEDGE`] (a paused or partitioned
//! peer costs one hedge, then has a message in flight and is asked last). A group is settled
//! as soon as a majority answered yes, or as soon as too many answered no or failed to reach
//! one; the round ends when every group is settled, without waiting for a slow peer (its
//! reply, if it comes, is dropped). At most [`MAX_OUTSTANDING`] messages to one peer are in
//! flight at a time.
//!
//! Nothing here depends on clocks: a timeout only turns a round into a failure, and a leader
//! whose round fails falls back to openraft's own `ReadIndex` round, which reports the leader
//! it learns of.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::pb::raft::ConfirmItem;
use crate::raft::network::Peers;

/// Messages to one peer that may be in flight at once; a peer with more counts as not answering.
pub const MAX_OUTSTANDING: usize = 2;

/// How long a round waits for the peers it asked first before asking every other voter too.
pub const HEDGE: Duration = Duration::from_millis(10);

/// How a leadership check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A majority of the voters, this node included, still hold the leader's vote.
    Confirmed,
    /// Some voter holds another vote (a later term, or another candidate): leadership moved or
    /// is moving.
    Refused,
    /// Not enough voters answered.
    NoQuorum,
}

/// One peer's answers: for each item sent, whether it holds the asked vote.
pub type Answers = Result<Vec<bool>, String>;

/// Sends one round's items to one peer.
pub type Transport = Arc<
    dyn Fn(u64, Vec<ConfirmItem>) -> Pin<Box<dyn Future<Output = Answers> + Send>> + Send + Sync,
>;

/// The groups with reads waiting for the next round.
#[derive(Default)]
struct Pending {
    /// Keyed by (shard, term): the voters to ask, the yes answers needed, and the waiters.
    groups: BTreeMap<(u64, u64), Group>,
    running: bool,
    rounds: u64,
}

struct Group {
    others: Vec<u64>,
    need: usize,
    waiters: Vec<oneshot::Sender<Outcome>>,
}

/// A node's leadership checks (see the module doc). One per node, shared by its shards.
pub struct LeadershipChecks {
    transport: Option<Transport>,
    pending: Mutex<Pending>,
    /// Per peer, a permit per message that may be in flight ([`MAX_OUTSTANDING`]).
    slots: Mutex<HashMap<u64, Arc<Semaphore>>>,
}

impl std::fmt::Debug for LeadershipChecks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeadershipChecks")
            .field("rounds", &self.rounds())
            .finish()
    }
}

impl LeadershipChecks {
    /// Checks over the peer transport, each message bounded by `timeout`; `None` (an embedded
    /// node) confirms only groups whose single voter is this node.
    pub fn new(peers: Option<Arc<Peers>>, timeout: Duration) -> Arc<LeadershipChecks> {
        let transport = peers.map(|peers| -> Transport {
            Arc::new(move |node, items| {
                let peers = Arc::clone(&peers);
                Box::pin(async move { peers.confirm_leadership(node, items, timeout).await })
            })
        });
        Self::with_transport(transport)
    }

    /// Checks over `transport` (tests use a scripted one).
    pub fn with_transport(transport: Option<Transport>) -> Arc<LeadershipChecks> {
        Arc::new(LeadershipChecks {
            transport,
            pending: Mutex::new(Pending::default()),
            slots: Mutex::default(),
        })
    }

    /// Rounds started so far (one per batch of waiting groups, not per read).
    pub fn rounds(&self) -> u64 {
        self.pending.lock().expect("leadership lock").rounds
    }

    /// Confirms, in a round that starts after this call, that at least `need` of `others` (the
    /// group's voters besides this node) still hold this node's vote of `term` for `shard`.
    pub async fn confirm(
        self: &Arc<Self>,
        shard: u64,
        term: u64,
        others: Vec<u64>,
        need: usize,
    ) -> Outcome {
        if need == 0 {
            return Outcome::Confirmed;
        }
        if self.transport.is_none() || others.len() < need {
            return Outcome::NoQuorum;
        }
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut pending = self.pending.lock().expect("leadership lock");
            pending
                .groups
                .entry((shard, term))
                .or_insert_with(|| Group {
                    others,
                    need,
                    waiters: Vec::new(),
                })
                .waiters
                .push(tx);
            !std::mem::replace(&mut pending.running, true)
        };
        if start {
            let this = Arc::clone(self);
            tokio::spawn(async move { this.drive().await });
        }
        rx.await.unwrap_or(Outcome::NoQuorum)
    }

    /// Runs rounds while groups wait.
    async fn drive(self: Arc<Self>) {
        loop {
            let (batch, round) = {
                let mut pending = self.pending.lock().expect("leadership lock");
                if pending.groups.is_empty() {
                    pending.running = false;
                    return;
                }
                pending.rounds += 1;
                (std::mem::take(&mut pending.groups), pending.rounds)
            };
            self.round(batch, round).await;
        }
    }

    /// One round. Each group first asks only as many peers as it needs yes answers from,
    /// preferring peers with no message in flight (and rotating among equals); it asks more
    /// at once when an answer is no or missing, and all the rest if the round is still open
    /// after [`HEDGE`]. Peers get one message per wave, for every group that asks them.
    async fn round(&self, batch: BTreeMap<(u64, u64), Group>, round: u64) {
        let Some(transport) = &self.transport else {
            return;
        };
        let keys: Vec<(u64, u64)> = batch.keys().copied().collect();
        let order = self.preference(&batch, round);
        let mut tallies: Vec<Tally> = batch
            .into_values()
            .map(|group| Tally::new(group, &order))
            .collect();
        let (tx, mut rx) = mpsc::unbounded_channel::<Reply>();
        let mut wave = Wave::default();
        for (i, tally) in tallies.iter_mut().enumerate() {
            wave.add(i, tally.ask_more());
        }
        self.send(transport, &keys, wave, &tx);
        let hedge = tokio::time::sleep(HEDGE);
        tokio::pin!(hedge);
        let mut hedged = false;
        let mut open = tallies.len();
        while open > 0 {
            tokio::select! {
                reply = rx.recv() => {
                    let Some(Reply { peer, items, answers }) = reply else {
                        break;
                    };
                    let answers = checked(peer, items.len(), answers);
                    let mut wave = Wave::default();
                    for (n, &i) in items.iter().enumerate() {
                        let tally = &mut tallies[i];
                        if tally.record(answers.as_ref().map(|a| a[n])) {
                            open -= 1;
                        } else if !tally.settled {
                            wave.add(i, tally.ask_more());
                        }
                    }
                    self.send(transport, &keys, wave, &tx);
                }
                _ = &mut hedge, if !hedged => {
                    hedged = true;
                    let mut wave = Wave::default();
                    for (i, tally) in tallies.iter_mut().enumerate() {
                        if !tally.settled {
                            wave.add(i, tally.ask_rest());
                        }
                    }
                    self.send(transport, &keys, wave, &tx);
                }
            }
        }
        for tally in &mut tallies {
            tally.settle(Outcome::NoQuorum);
        }
    }

    /// The round's peers, most preferred first: fewest messages in flight, then a rotation
    /// by round number so that equals share the load.
    fn preference(&self, batch: &BTreeMap<(u64, u64), Group>, round: u64) -> Vec<u64> {
        let mut peers: Vec<u64> = batch
            .values()
            .flat_map(|g| g.others.iter().copied())
            .collect();
        peers.sort_unstable();
        peers.dedup();
        if peers.is_empty() {
            return peers;
        }
        let shift = (round % peers.len() as u64) as usize;
        peers.rotate_left(shift);
        let slots = self.slots.lock().expect("leadership lock");
        peers.sort_by_key(|p| {
            slots
                .get(p)
                .map_or(0, |s| MAX_OUTSTANDING - s.available_permits())
        });
        peers
    }

    /// Sends each peer of `wave` one message with its items; a peer with no free slot
    /// answers at once with an error.
    fn send(
        &self,
        transport: &Transport,
        keys: &[(u64, u64)],
        wave: Wave,
        tx: &mpsc::UnboundedSender<Reply>,
    ) {
        for (peer, items) in wave.0 {
            let Some(slot) = self.reserve(peer) else {
                let _ = tx.send(Reply {
                    peer,
                    items,
                    answers: Err("too many checks in flight".into()),
                });
                continue;
            };
            let send = transport(
                peer,
                items
                    .iter()
                    .map(|&i| ConfirmItem {
                        shard: keys[i].0,
                        term: keys[i].1,
                    })
                    .collect(),
            );
            let tx = tx.clone();
            tokio::spawn(async move {
                let answers = send.await;
                drop(slot);
                let _ = tx.send(Reply {
                    peer,
                    items,
                    answers,
                });
            });
        }
    }

    /// Takes one of `peer`'s in-flight slots, if it has one free; dropping it frees the slot.
    fn reserve(&self, peer: u64) -> Option<OwnedSemaphorePermit> {
        let mut slots = self.slots.lock().expect("leadership lock");
        let slot = slots
            .entry(peer)
            .or_insert_with(|| Arc::new(Semaphore::new(MAX_OUTSTANDING)));
        Arc::clone(slot).try_acquire_owned().ok()
    }
}

/// A peer's answers to one message: `items` are indexes into the round's groups.
struct Reply {
    peer: u64,
    items: Vec<usize>,
    answers: Answers,
}

/// The messages of one wave: per peer, the groups (indexes) it is asked about.
#[derive(Default)]
struct Wave(BTreeMap<u64, Vec<usize>>);

impl Wave {
    fn add(&mut self, group: usize, peers: Vec<u64>) {
        for peer in peers {
            self.0.entry(peer).or_default().push(group);
        }
    }
}

/// `answers` if it has one answer per item asked; a peer that says something else is logged
/// and counted as silent.
fn checked(peer: u64, asked: usize, answers: Answers) -> Option<Vec<bool>> {
    match answers {
        Ok(a) if a.len() == asked => Some(a),
        Ok(a) => {
            tracing::warn!(
                peer,
                asked,
                answered = a.len(),
                "a peer answered a leadership check with the wrong number of answers"
            );
            None
        }
        Err(e) => {
            tracing::debug!(peer, error = %e, "leadership check failed");
            None
        }
    }
}

/// One group's answers in a round.
struct Tally {
    group: Group,
    /// Voters not asked yet, most preferred first.
    unasked: Vec<u64>,
    /// Asked and not answered yet.
    waiting: usize,
    yes: usize,
    no: usize,
    settled: bool,
}

impl Tally {
    fn new(group: Group, order: &[u64]) -> Tally {
        let unasked = order
            .iter()
            .copied()
            .filter(|p| group.others.contains(p))
            .collect();
        Tally {
            group,
            unasked,
            waiting: 0,
            yes: 0,
            no: 0,
            settled: false,
        }
    }

    /// The peers to ask now so that enough are asked to settle the group if all say yes.
    fn ask_more(&mut self) -> Vec<u64> {
        let short = self.group.need.saturating_sub(self.yes + self.waiting);
        let n = short.min(self.unasked.len());
        self.waiting += n;
        self.unasked.drain(..n).collect()
    }

    /// Every peer not asked yet.
    fn ask_rest(&mut self) -> Vec<u64> {
        self.waiting += self.unasked.len();
        std::mem::take(&mut self.unasked)
    }

    /// Counts one asked peer's answer (`None`: no usable answer); true if this settled the
    /// group.
    fn record(&mut self, answer: Option<bool>) -> bool {
        if self.settled {
            return false;
        }
        self.waiting = self.waiting.saturating_sub(1);
        match answer {
            Some(true) => self.yes += 1,
            Some(false) => self.no += 1,
            None => {}
        }
        if self.yes >= self.group.need {
            self.settle(Outcome::Confirmed);
        } else if self.yes + self.waiting + self.unasked.len() < self.group.need {
            self.settle(if self.no > 0 {
                Outcome::Refused
            } else {
                Outcome::NoQuorum
            });
        }
        self.settled
    }

    /// Answers every waiter with `outcome` (once).
    fn settle(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        for waiter in self.group.waiters.drain(..) {
            let _ = waiter.send(outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::Semaphore;

    /// Every message a scripted transport was asked to send: (peer, items).
    type Sent = Arc<Mutex<Vec<(u64, Vec<ConfirmItem>)>>>;

    /// A scripted transport: `answer(peer, call number, items)` decides each message's answers;
    /// every message first waits for a permit of `gate`.
    fn scripted(
        gate: Arc<Semaphore>,
        sent: Sent,
        answer: impl Fn(u64, usize, &[ConfirmItem]) -> Option<Answers> + Send + Sync + 'static,
    ) -> Transport {
        let calls = Arc::new(AtomicUsize::new(0));
        let answer = Arc::new(answer);
        Arc::new(move |peer, items: Vec<ConfirmItem>| {
            let call = calls.fetch_add(1, Ordering::SeqCst);
            sent.lock().unwrap().push((peer, items.clone()));
            let gate = Arc::clone(&gate);
            let answer = Arc::clone(&answer);
            Box::pin(async move {
                gate.acquire().await.unwrap().forget();
                match answer(peer, call, &items) {
                    Some(a) => a,
                    // A peer that never answers.
                    None => std::future::pending().await,
                }
            })
        })
    }

    fn open_gate() -> Arc<Semaphore> {
        Arc::new(Semaphore::new(Semaphore::MAX_PERMITS))
    }

    #[tokio::test]
    async fn a_majority_confirms_without_waiting_for_silent_peers() {
        let sent = Arc::default();
        let checks = LeadershipChecks::with_transport(Some(scripted(
            open_gate(),
            sent,
            |peer, _, items| (peer <= 3).then(|| Ok(vec![true; items.len()])),
        )));
        // Five voters: this node and peers 2..=5; two of the others make a majority.
        let outcome = checks.confirm(7, 4, vec![2, 3, 4, 5], 2).await;
        assert_eq!(outcome, Outcome::Confirmed);
    }

    #[tokio::test]
    async fn a_voter_holding_another_vote_refuses_and_silence_is_no_quorum() {
        let sent = Arc::default();
        let checks = LeadershipChecks::with_transport(Some(scripted(
            open_gate(),
            sent,
            |peer, _, items| match peer {
                2 => Some(Ok(vec![false; items.len()])),
                _ => Some(Err("unreachable".into())),
            },
        )));
        assert_eq!(checks.confirm(1, 9, vec![2, 3], 1).await, Outcome::Refused);
        assert_eq!(checks.confirm(1, 9, vec![3, 4], 1).await, Outcome::NoQuorum);
        // A yes from one peer is not a majority of five.
        let sent = Arc::default();
        let checks = LeadershipChecks::with_transport(Some(scripted(
            open_gate(),
            sent,
            |peer, _, items| {
                Some(if peer == 2 {
                    Ok(vec![true; items.len()])
                } else {
                    Err("down".into())
                })
            },
        )));
        assert_eq!(
            checks.confirm(1, 9, vec![2, 3, 4, 5], 2).await,
            Outcome::NoQuorum
        );
    }

    #[tokio::test]
    async fn a_peer_answering_the_wrong_number_of_items_counts_as_silent() {
        let sent = Arc::default();
        let checks =
            LeadershipChecks::with_transport(Some(scripted(open_gate(), sent, |_, _, items| {
                Some(Ok(vec![true; items.len() + 1]))
            })));
        assert_eq!(checks.confirm(1, 3, vec![2, 3], 1).await, Outcome::NoQuorum);
    }

    #[tokio::test]
    async fn a_check_that_arrives_during_a_round_is_decided_by_the_next_round() {
        let gate = Arc::new(Semaphore::new(0));
        let sent: Sent = Arc::default();
        // The first round's message says yes, every later one says no: a check's outcome
        // shows which round decided it.
        let checks = LeadershipChecks::with_transport(Some(scripted(
            Arc::clone(&gate),
            Arc::clone(&sent),
            |_, call, items| Some(Ok(vec![call == 0; items.len()])),
        )));
        let first = tokio::spawn({
            let checks = Arc::clone(&checks);
            async move { checks.confirm(1, 5, vec![2], 1).await }
        });
        while sent.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        // The first round is in flight; these join the same shard and nine others.
        let later: Vec<_> = (1..=10)
            .map(|shard| {
                let checks = Arc::clone(&checks);
                tokio::spawn(async move { checks.confirm(shard, 5, vec![2], 1).await })
            })
            .collect();
        tokio::task::yield_now().await;
        gate.add_permits(2);
        assert_eq!(first.await.unwrap(), Outcome::Confirmed);
        for check in later {
            assert_eq!(check.await.unwrap(), Outcome::Refused);
        }
        assert_eq!(checks.rounds(), 2);
        // The second round asked the peer once, for all ten groups.
        let sent = sent.lock().unwrap();
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[1].1.len(), 10);
    }

    #[tokio::test]
    async fn a_peer_that_never_answers_gets_at_most_the_outstanding_cap() {
        let sent: Sent = Arc::default();
        let checks = LeadershipChecks::with_transport(Some(scripted(
            open_gate(),
            Arc::clone(&sent),
            |peer, _, items| (peer == 2).then(|| Ok(vec![true; items.len()])),
        )));
        for _ in 0..5 {
            assert_eq!(
                checks.confirm(1, 5, vec![2, 3], 1).await,
                Outcome::Confirmed
            );
        }
        let to_silent = sent.lock().unwrap().iter().filter(|(p, _)| *p == 3).count();
        assert!(
            to_silent <= MAX_OUTSTANDING,
            "{to_silent} messages to the silent peer"
        );
    }

    #[tokio::test]
    async fn a_round_asks_only_as_many_peers_as_it_needs_and_hedges_a_silent_one() {
        let sent: Sent = Arc::default();
        let checks = LeadershipChecks::with_transport(Some(scripted(
            open_gate(),
            Arc::clone(&sent),
            |_, _, items| Some(Ok(vec![true; items.len()])),
        )));
        // A 3-replica group needs one yes besides this node: one message per round.
        for _ in 0..4 {
            assert_eq!(
                checks.confirm(1, 2, vec![2, 3], 1).await,
                Outcome::Confirmed
            );
        }
        {
            let sent = sent.lock().unwrap();
            assert_eq!(sent.len(), 4);
            // Rotated between the two peers.
            assert!(sent.iter().any(|(p, _)| *p == 2) && sent.iter().any(|(p, _)| *p == 3));
        }

        // Peer 2 never answers: whichever peer a round asks first, peer 3 confirms it.
        let sent: Sent = Arc::default();
        let checks = LeadershipChecks::with_transport(Some(scripted(
            open_gate(),
            Arc::clone(&sent),
            |peer, _, items| (peer == 3).then(|| Ok(vec![true; items.len()])),
        )));
        for _ in 0..4 {
            assert_eq!(
                checks.confirm(1, 2, vec![2, 3], 1).await,
                Outcome::Confirmed
            );
        }
        // After its first message hangs, peer 2 is asked only by a hedge.
        let to_silent = sent.lock().unwrap().iter().filter(|(p, _)| *p == 2).count();
        assert!(
            to_silent <= MAX_OUTSTANDING,
            "{to_silent} messages to the silent peer"
        );
    }

    #[tokio::test]
    async fn an_embedded_node_confirms_only_groups_it_alone_votes_in() {
        let checks = LeadershipChecks::with_transport(None);
        assert_eq!(checks.confirm(1, 1, vec![], 0).await, Outcome::Confirmed);
        assert_eq!(checks.confirm(1, 1, vec![2], 1).await, Outcome::NoQuorum);
    }
}
