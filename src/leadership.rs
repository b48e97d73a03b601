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
//!    index alone, for the fault tester; `tests/replication/consistency.rs` holds a leader's apply and
//!    shows the window deterministically.)
//! 2. **A round that starts after the read's start** asks every other voter of the group
//!    whether its stored vote is still `(T, L)`. Votes only grow, and a voter's stored vote
//!    changes before it grants a vote to anyone else (the WAL's in-memory copy is updated when
//!    the vote record is written, before the fsync and before the reply). So if a majority
//!    (counting `L`) answer yes, no leader of a later term had been elected when the read
//!    began, and no later leader can have acknowledged a write `L` does not have at `i`.
//!
//! **Groups.** The majority of step 2 is one of the voters the caller read from the group's
//! membership, so checks wait for a round grouped by shard, term, *voters* and yes answers
//! needed, not by shard and term alone. Two callers of one term that read different
//! memberships (a membership change commits within a term) are tallied separately, each
//! against its own voters: a voter the change removed never counts towards a caller that no
//! longer lists it, and a voter it added is asked by every caller that lists it. A peer is
//! asked about a (shard, term, replica) once per message, however many groups ask it.
//!
//! **Replicas and nodes.** A group's voters are Raft replica ids, which need not be node ids
//! (`crate::raft::replica_node`): each [`Voter`] names its replica and the node hosting it
//! (from the group's membership). Messages go per node, one item per (shard, term, replica)
//! carrying `ConfirmItem.replica`, and an answer counts for the replica its item named only:
//! a node asked about a replica it does not host answers no (`server::raft`), and a yes to
//! one replica never counts for another replica on the same node (a shard that left a node
//! and came back has a new replica id there).
//!
//! **Rounds.** A round takes every group waiting when it starts and decides each from the
//! replies to its own messages only (each round has its own reply channel), so every check
//! is decided by a round that started after the check was registered; checks that arrive
//! while a round runs wait for a later one. A round asks each peer at most once per wave,
//! about every group of the round that asks it, so one message serves all of them. A group
//! first asks only as many peers as it needs yes answers from (one of two in a 3-replica
//! group), preferring peers with no message in flight and rotating among equals; it asks
//! more at once when an answer is no or missing, and asks every remaining voter if it is
//! still open after [`HEDGE`] (a paused or partitioned peer costs one hedge, then has a
//! message in flight and is asked last). A group is settled as soon as a majority answered
//! yes, or as soon as too many answered no or failed to reach one; its waiters are answered
//! then, without waiting for the round's other groups or for a slow peer (a reply for a
//! settled group is dropped).
//!
//! Groups settle independently: the next round starts as soon as the current one has asked
//! every voter of each of its open groups (at the latest after [`HEDGE`]), and the groups
//! still open keep waiting for their replies in the background, so a group waiting for a
//! paused peer (until the transport's timeout, when it is `NoQuorum`) does not delay the
//! checks of other groups. Rounds overlap only once the earlier ones have nothing left to
//! send, so each still sends one message per peer per wave, and at most [`MAX_OUTSTANDING`]
//! messages to one peer are in flight at a time across all rounds (a peer with no free slot
//! counts as not answering). A round still waiting has a message in flight, so at most
//! `MAX_OUTSTANDING` rounds per peer wait at once.
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
use crate::peers::Peers;

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

/// Sends one round's items to one peer node.
pub type Transport = Arc<
    dyn Fn(u64, Vec<ConfirmItem>) -> Pin<Box<dyn Future<Output = Answers> + Send>> + Send + Sync,
>;

/// A voter of a group: its replica id (the group's Raft id for it, which its stored vote is
/// about) and the node that hosts it (where the question goes). See
/// [`crate::raft::replica_node`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Voter {
    /// The voter's replica id.
    pub replica: u64,
    /// The node hosting it.
    pub node: u64,
}

/// What a check confirms: that at least `need` of `others` (sorted, distinct) still hold this
/// node's vote of `term` for `shard`. Checks with equal keys share one tally.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct GroupKey {
    shard: u64,
    term: u64,
    others: Vec<Voter>,
    need: usize,
}

/// The groups with reads waiting for the next round.
#[derive(Default)]
struct Pending {
    /// The checks waiting for the next round, by what they confirm.
    groups: BTreeMap<GroupKey, Vec<oneshot::Sender<Outcome>>>,
    /// A task is starting rounds (it stops when no group waits).
    running: bool,
    rounds: u64,
}

/// A node's leadership checks (see the module doc). One per node, shared by its shards.
pub struct LeadershipChecks {
    transport: Option<Transport>,
    pending: Mutex<Pending>,
    /// Per peer, a permit per message that may be in flight ([`MAX_OUTSTANDING`]).
    slots: Mutex<HashMap<u64, Arc<Semaphore>>>,
    /// Checks that asked peers and did not confirm (refused, or no quorum in time).
    unconfirmed: std::sync::atomic::AtomicU64,
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
            unconfirmed: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Rounds started so far (one per batch of waiting groups, not per read).
    pub fn rounds(&self) -> u64 {
        self.pending.lock().expect("leadership lock").rounds
    }

    /// Checks so far that went to a round and did not confirm (a peer refused, or too few
    /// answered in time): each sends its read to openraft's fallback round.
    pub fn unconfirmed(&self) -> u64 {
        self.unconfirmed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Confirms, in a round that starts after this call, that at least `need` of `others` (the
    /// group's voters besides this replica) still hold this replica's vote of `term` for
    /// `shard`. Only `others` count: callers of the same shard and term that name other voters
    /// are checked against their own. Each voter is asked on its node about its replica id,
    /// and only that replica's answer counts for it.
    pub async fn confirm(
        self: &Arc<Self>,
        shard: u64,
        term: u64,
        mut others: Vec<Voter>,
        need: usize,
    ) -> Outcome {
        if need == 0 {
            return Outcome::Confirmed;
        }
        others.sort_unstable();
        others.dedup();
        if self.transport.is_none() || others.len() < need {
            return Outcome::NoQuorum;
        }
        let key = GroupKey {
            shard,
            term,
            others,
            need,
        };
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut pending = self.pending.lock().expect("leadership lock");
            pending.groups.entry(key).or_default().push(tx);
            !std::mem::replace(&mut pending.running, true)
        };
        if start {
            let this = Arc::clone(self);
            tokio::spawn(async move { this.drive().await });
        }
        let outcome = rx.await.unwrap_or(Outcome::NoQuorum);
        if outcome != Outcome::Confirmed {
            self.unconfirmed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        outcome
    }

    /// Starts rounds while groups wait: each takes the groups waiting when it starts, and the
    /// next one starts once this one has asked every voter of its open groups.
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
            let (asked_all, all_asked) = oneshot::channel();
            let this = Arc::clone(&self);
            tokio::spawn(async move { this.round(batch, round, asked_all).await });
            // Also when the round ends early (it drops the sender).
            let _ = all_asked.await;
        }
    }

    /// One round. Each group first asks only as many peers as it needs yes answers from,
    /// preferring peers with no message in flight (and rotating among equals); it asks more
    /// at once when an answer is no or missing, and all the rest if it is still open after
    /// [`HEDGE`]. Peers get one message per wave, for every group that asks them. Once every
    /// open group has asked all its voters, `asked_all` lets the next round start while this
    /// one waits for the replies still due.
    async fn round(
        &self,
        batch: BTreeMap<GroupKey, Vec<oneshot::Sender<Outcome>>>,
        round: u64,
        asked_all: oneshot::Sender<()>,
    ) {
        let Some(transport) = &self.transport else {
            return;
        };
        let order = self.preference(batch.keys(), round);
        let (keys, mut tallies): (Vec<GroupKey>, Vec<Tally>) = batch
            .into_iter()
            .map(|(key, waiters)| {
                let tally = Tally::new(&key, waiters, &order);
                (key, tally)
            })
            .unzip();
        let (tx, mut rx) = mpsc::unbounded_channel::<Reply>();
        let mut wave = Wave::default();
        for (i, tally) in tallies.iter_mut().enumerate() {
            wave.add(i, tally.ask_more());
        }
        self.send(transport, &keys, wave, &tx);
        // Held while the round may still send: dropping it lets the next round start, after
        // which only the messages in flight hold a sender, and the round ends once they have
        // all replied (a settled round ends at once).
        let mut asking = Some((tx, asked_all));
        let hedge = tokio::time::sleep(HEDGE);
        tokio::pin!(hedge);
        let mut open = tallies.len();
        loop {
            if asking.is_some() && tallies.iter().all(|t| t.settled || t.unasked.is_empty()) {
                asking = None;
                if open > 0 {
                    tracing::trace!(
                        round,
                        open,
                        "leadership round asked everyone; next round may start"
                    );
                }
            }
            if open == 0 {
                break;
            }
            tokio::select! {
                reply = rx.recv() => {
                    let Some(Reply { peer, groups, asked, answers }) = reply else {
                        break;
                    };
                    let answers = checked(peer, asked, answers);
                    let mut wave = Wave::default();
                    for (i, at) in groups {
                        let tally = &mut tallies[i];
                        if tally.record(answers.as_ref().map(|a| a[at])) {
                            open -= 1;
                        } else if !tally.settled {
                            wave.add(i, tally.ask_more());
                        }
                    }
                    if let Some((tx, _)) = &asking {
                        self.send(transport, &keys, wave, tx);
                    }
                }
                () = &mut hedge, if asking.is_some() => {
                    let mut wave = Wave::default();
                    for (i, tally) in tallies.iter_mut().enumerate() {
                        if !tally.settled {
                            wave.add(i, tally.ask_rest());
                        }
                    }
                    if let Some((tx, _)) = &asking {
                        self.send(transport, &keys, wave, tx);
                    }
                }
            }
        }
        for tally in &mut tallies {
            tally.settle(Outcome::NoQuorum);
        }
    }

    /// The round's peer nodes, most preferred first: fewest messages in flight, then a
    /// rotation by round number so that equals share the load.
    fn preference<'a>(&self, groups: impl Iterator<Item = &'a GroupKey>, round: u64) -> Vec<u64> {
        let mut peers: Vec<u64> = groups
            .flat_map(|g| g.others.iter().map(|v| v.node))
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

    /// Sends each peer node of `wave` one message, with one item per (shard, term, replica)
    /// its groups ask about; a peer with no free slot answers at once with an error.
    fn send(
        &self,
        transport: &Transport,
        keys: &[GroupKey],
        wave: Wave,
        tx: &mpsc::UnboundedSender<Reply>,
    ) {
        for (peer, asking) in wave.0 {
            let mut items: Vec<ConfirmItem> = Vec::new();
            let mut at: BTreeMap<(u64, u64, u64), usize> = BTreeMap::new();
            let groups: Vec<(usize, usize)> = asking
                .into_iter()
                .map(|(i, replica)| {
                    let GroupKey { shard, term, .. } = keys[i];
                    let n = *at.entry((shard, term, replica)).or_insert_with(|| {
                        items.push(ConfirmItem {
                            shard,
                            term,
                            replica,
                        });
                        items.len() - 1
                    });
                    (i, n)
                })
                .collect();
            let asked = items.len();
            let Some(slot) = self.reserve(peer) else {
                let _ = tx.send(Reply {
                    peer,
                    groups,
                    asked,
                    answers: Err("too many checks in flight".into()),
                });
                continue;
            };
            let send = transport(peer, items);
            let tx = tx.clone();
            tokio::spawn(async move {
                let answers = send.await;
                drop(slot);
                let _ = tx.send(Reply {
                    peer,
                    groups,
                    asked,
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

/// A peer's answers to one message of a round.
struct Reply {
    peer: u64,
    /// (the round's group, its item's place in the message) for each group asked.
    groups: Vec<(usize, usize)>,
    /// Items in the message.
    asked: usize,
    answers: Answers,
}

/// The messages of one wave: per peer node, the groups (indexes) it is asked about, each
/// with the replica id that group asks it about.
#[derive(Default)]
struct Wave(BTreeMap<u64, Vec<(usize, u64)>>);

impl Wave {
    fn add(&mut self, group: usize, voters: Vec<Voter>) {
        for voter in voters {
            self.0
                .entry(voter.node)
                .or_default()
                .push((group, voter.replica));
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
    need: usize,
    waiters: Vec<oneshot::Sender<Outcome>>,
    /// Voters not asked yet, most preferred first.
    unasked: Vec<Voter>,
    /// Asked and not answered yet.
    waiting: usize,
    yes: usize,
    no: usize,
    settled: bool,
}

impl Tally {
    fn new(key: &GroupKey, waiters: Vec<oneshot::Sender<Outcome>>, order: &[u64]) -> Tally {
        let unasked = order
            .iter()
            .flat_map(|node| key.others.iter().filter(move |v| v.node == *node))
            .copied()
            .collect();
        Tally {
            need: key.need,
            waiters,
            unasked,
            waiting: 0,
            yes: 0,
            no: 0,
            settled: false,
        }
    }

    /// The peers to ask now so that enough are asked to settle the group if all say yes.
    fn ask_more(&mut self) -> Vec<Voter> {
        let short = self.need.saturating_sub(self.yes + self.waiting);
        let n = short.min(self.unasked.len());
        self.waiting += n;
        self.unasked.drain(..n).collect()
    }

    /// Every peer not asked yet.
    fn ask_rest(&mut self) -> Vec<Voter> {
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
        if self.yes >= self.need {
            self.settle(Outcome::Confirmed);
        } else if self.yes + self.waiting + self.unasked.len() < self.need {
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
        for waiter in self.waiters.drain(..) {
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

    /// Voters whose replica ids are their node ids (every replica until replicas move).
    fn own(nodes: &[u64]) -> Vec<Voter> {
        nodes
            .iter()
            .map(|&node| Voter {
                replica: node,
                node,
            })
            .collect()
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
        let outcome = checks.confirm(7, 4, own(&[2, 3, 4, 5]), 2).await;
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
        assert_eq!(
            checks.confirm(1, 9, own(&[2, 3]), 1).await,
            Outcome::Refused
        );
        assert_eq!(
            checks.confirm(1, 9, own(&[3, 4]), 1).await,
            Outcome::NoQuorum
        );
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
            checks.confirm(1, 9, own(&[2, 3, 4, 5]), 2).await,
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
        assert_eq!(
            checks.confirm(1, 3, own(&[2, 3]), 1).await,
            Outcome::NoQuorum
        );
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
            async move { checks.confirm(1, 5, own(&[2]), 1).await }
        });
        while sent.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        // The first round is in flight; these join the same shard and nine others.
        let later: Vec<_> = (1..=10)
            .map(|shard| {
                let checks = Arc::clone(&checks);
                tokio::spawn(async move { checks.confirm(shard, 5, own(&[2]), 1).await })
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
                checks.confirm(1, 5, own(&[2, 3]), 1).await,
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
                checks.confirm(1, 2, own(&[2, 3]), 1).await,
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
                checks.confirm(1, 2, own(&[2, 3]), 1).await,
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
    async fn checks_of_one_term_with_other_voters_are_answered_by_their_own_voters() {
        // A same-term membership change replaced voter 2 by voter 4. The removed voter still
        // holds the leader's vote; the new voters 3 and 4 hold another.
        let sent: Sent = Arc::default();
        let checks = LeadershipChecks::with_transport(Some(scripted(
            open_gate(),
            Arc::clone(&sent),
            |peer, _, items| Some(Ok(vec![peer == 2; items.len()])),
        )));
        // Both register before a round starts, so one round decides both.
        let (before, after) = tokio::join!(
            checks.confirm(1, 5, own(&[2, 3]), 1),
            checks.confirm(1, 5, own(&[4, 3]), 1),
        );
        assert_eq!(before, Outcome::Confirmed);
        assert_eq!(
            after,
            Outcome::Refused,
            "a check against voters 3 and 4 was answered by the removed voter 2"
        );
        assert_eq!(checks.rounds(), 1);
        // Peer 3 was asked about (shard 1, term 5) once per message, whichever groups asked it.
        for (peer, items) in sent.lock().unwrap().iter() {
            assert_eq!(items.len(), 1, "peer {peer} got {items:?}");
        }
    }

    #[tokio::test]
    async fn a_yes_counts_only_for_the_replica_it_was_asked_about() {
        // Shard 1's replicas have ids apart from their nodes' ids: node 2 hosts replica 12 and
        // node 3 replica 13. Replica 22 is an older incarnation of the shard on node 2 (the
        // shard left node 2 and came back): node 2 no longer hosts it. Each node answers as
        // `server::raft` does: yes only about the replica it hosts (all hold the vote).
        let hosts = |node: u64| match node {
            2 => Some(12),
            3 => Some(13),
            _ => None,
        };
        let sent: Sent = Arc::default();
        let checks = LeadershipChecks::with_transport(Some(scripted(
            open_gate(),
            Arc::clone(&sent),
            move |peer, _, items| {
                Some(Ok(items
                    .iter()
                    .map(|item| hosts(peer) == Some(item.replica))
                    .collect()))
            },
        )));
        let voter = |replica, node| Voter { replica, node };
        // Both register before a round starts: one round, one message to node 2 about both
        // replicas, and node 2's yes for replica 12 does not count for replica 22.
        let (current, retired) = tokio::join!(
            checks.confirm(1, 5, vec![voter(12, 2)], 1),
            checks.confirm(1, 5, vec![voter(22, 2)], 1),
        );
        assert_eq!(current, Outcome::Confirmed);
        assert_eq!(
            retired,
            Outcome::Refused,
            "node 2's yes about replica 12 counted for replica 22"
        );
        assert_eq!(checks.rounds(), 1);
        {
            let sent = sent.lock().unwrap();
            assert_eq!(sent.len(), 1, "{sent:?}");
            let (peer, items) = &sent[0];
            assert_eq!(*peer, 2);
            let asked: Vec<(u64, u64, u64)> =
                items.iter().map(|i| (i.shard, i.term, i.replica)).collect();
            assert_eq!(asked, vec![(1, 5, 12), (1, 5, 22)]);
        }
        sent.lock().unwrap().clear();
        // A group is asked on the nodes hosting its voters, never at its replica ids.
        assert_eq!(
            checks
                .confirm(1, 6, vec![voter(12, 2), voter(13, 3)], 2)
                .await,
            Outcome::Confirmed
        );
        for (peer, items) in sent.lock().unwrap().iter() {
            assert!([2, 3].contains(peer), "a message went to {peer}");
            for item in items {
                assert_eq!(hosts(*peer), Some(item.replica), "{peer}: {item:?}");
            }
        }
    }

    /// A transport whose peers in `silent` answer yes only once `release` has a permit for
    /// them, or fail after [`STUCK`] (as the real transport's timeout would); the other peers
    /// answer at once, yes to the messages sent before `no_from` messages were sent and no to
    /// the later ones. `asked` gets each message's peer as it is sent.
    fn with_silent_peers(
        silent: &'static [u64],
        release: Arc<Semaphore>,
        no_from: usize,
        asked: mpsc::UnboundedSender<u64>,
    ) -> Transport {
        let calls = Arc::new(AtomicUsize::new(0));
        Arc::new(move |peer, items: Vec<ConfirmItem>| {
            let yes = calls.fetch_add(1, Ordering::SeqCst) < no_from;
            let _ = asked.send(peer);
            let release = Arc::clone(&release);
            Box::pin(async move {
                if silent.contains(&peer) {
                    tokio::select! {
                        permit = release.acquire() => permit.unwrap().forget(),
                        () = tokio::time::sleep(STUCK) => return Err("timed out".into()),
                    }
                }
                Ok(vec![yes; items.len()])
            })
        })
    }

    /// How long a silent peer of [`with_silent_peers`] takes to fail: only a check that waits
    /// for it completes after that.
    const STUCK: Duration = Duration::from_secs(10);

    /// Waits until the messages sent so far went to `peers`, each at least once.
    async fn until_asked(asked: &mut mpsc::UnboundedReceiver<u64>, peers: &[u64]) {
        let mut seen = std::collections::BTreeSet::new();
        while !peers.iter().all(|p| seen.contains(p)) {
            seen.insert(asked.recv().await.expect("the transport is alive"));
        }
    }

    #[tokio::test]
    async fn a_group_waiting_for_a_silent_peer_does_not_hold_up_other_groups() {
        use futures::FutureExt;
        let release = Arc::new(Semaphore::new(0));
        let (asked_tx, mut asked) = mpsc::unbounded_channel();
        let checks = LeadershipChecks::with_transport(Some(with_silent_peers(
            &[4, 5],
            Arc::clone(&release),
            usize::MAX,
            asked_tx,
        )));
        // Group A (shard 1): its voters besides this node, 4 and 5, do not answer.
        let mut a = Box::pin(checks.confirm(1, 3, own(&[4, 5]), 1));
        assert_eq!((&mut a).now_or_never(), None);
        // A's round asks one of them, then (after the hedge) the other: it has nobody left to
        // ask and waits.
        until_asked(&mut asked, &[4, 5]).await;
        // Group B (shard 2): its voters answer at once.
        let b = checks.confirm(2, 3, own(&[2, 3]), 1).await;
        assert_eq!(b, Outcome::Confirmed);
        let a_then = (&mut a).now_or_never();
        assert_eq!(
            a_then, None,
            "A was decided ({a_then:?}) before B: B's check waited for A's round to give up"
        );
        assert_eq!(checks.rounds(), 2);
        // A's replies still count once they come.
        release.add_permits(2);
        assert_eq!(a.await, Outcome::Confirmed);
    }

    #[tokio::test]
    async fn a_check_registered_while_an_earlier_round_waits_ignores_that_rounds_replies() {
        let release = Arc::new(Semaphore::new(0));
        let (asked_tx, mut asked) = mpsc::unbounded_channel();
        // Voters 4 and 5 answer only when released: yes to the first two messages (the
        // first round's), no to every later one.
        let checks = LeadershipChecks::with_transport(Some(with_silent_peers(
            &[4, 5],
            Arc::clone(&release),
            2,
            asked_tx,
        )));
        let first = tokio::spawn({
            let checks = Arc::clone(&checks);
            async move { checks.confirm(1, 3, own(&[4, 5]), 1).await }
        });
        until_asked(&mut asked, &[4, 5]).await;
        // The first round has asked both and waits; the same group's next check starts a
        // round of its own, which sends its own message.
        let second = tokio::spawn({
            let checks = Arc::clone(&checks);
            async move { checks.confirm(1, 3, own(&[4, 5]), 1).await }
        });
        asked.recv().await.expect("the transport is alive");
        release.add_permits(Semaphore::MAX_PERMITS / 2);
        assert_eq!(first.await.unwrap(), Outcome::Confirmed);
        assert_eq!(second.await.unwrap(), Outcome::Refused);
        assert_eq!(checks.rounds(), 2);
    }

    #[tokio::test]
    async fn an_embedded_node_confirms_only_groups_it_alone_votes_in() {
        let checks = LeadershipChecks::with_transport(None);
        assert_eq!(checks.confirm(1, 1, own(&[]), 0).await, Outcome::Confirmed);
        assert_eq!(checks.confirm(1, 1, own(&[2]), 1).await, Outcome::NoQuorum);
    }
}
