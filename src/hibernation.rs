//! Hibernation of idle shard groups: node-level liveness (one ping per peer per heartbeat
//! interval) and the rules that switch a group's Raft timers off while nothing can need them.
//!
//! # Why
//!
//! An idle Raft group is not free. openraft wakes every replica's core at every tick (about
//! `heartbeat_interval × 13/64`, so ~20 times a second at 250 ms), and a leader sends each
//! follower a heartbeat every interval. With 256 shards on three nodes (every node hosts a
//! replica of each) that is about 5,000 timer wake-ups and 1,400 heartbeat RPCs sent or
//! received a second per node with no client at all: over a fifth of a core, measured
//! (`scripts/idle-cpu.sh`). TiKV hibernates idle regions and CockroachDB quiesces idle ranges
//! for the same reason; kvnode does what they do.
//!
//! # The rules
//!
//! One task per node evaluates them every heartbeat interval.
//!
//! - **Liveness, both ways.** The task pings every peer (`Ping` on the peer transport, over
//!   the same channel as Raft traffic, so a partition cuts both alike). A reply carries the
//!   peer's boot id and the shards whose group it leads at that moment; an answered ping shows
//!   that this node reaches the peer (*outbound* evidence). Each node's channel to a peer is
//!   its own connection, though, and can fail alone: the peer's pings to this node, and any
//!   other peer message admitted here (`Peers::admit_from`), show that the peer reaches this
//!   node (*inbound* evidence). Every node pings every peer each interval, so both kinds
//!   arrive every interval while the link works. A peer is **reachable both ways** within a
//!   window if it answered a ping and a message from it arrived, both within the window.
//! - **A leader hibernates** its group (openraft's tick off: no heartbeats, no timers) when
//!   there was no write and no quorum read for `hibernate_after_ms`, the log is committed and
//!   applied and every other replica has acknowledged all of it, and every other replica's node
//!   was reachable both ways within the last two heartbeat intervals. It wakes on the next
//!   write or quorum read ([`Activity::wake`]), when a replica's node stops being reachable
//!   either way (its answers or its messages stop for two intervals), and when one comes back
//!   (answers again, or answers with a new boot id): then it also sends a heartbeat at once
//!   and stays awake for `hibernate_after_ms`, so a restarted follower hears from its leader
//!   before its own election timer fires.
//! - **A follower hibernates** while the leader it knows was reachable both ways within the
//!   election timeout (the minimum plus a fixed per-shard, per-node jitter inside the election
//!   timeout range, which plays the part of Raft's randomized timeout) and its last answer
//!   listed the shard among those it leads. Otherwise its timers run; having heard no
//!   heartbeat for long, it campaigns at its next tick, with pre-vote, so a leader that a
//!   quorum still follows is not disrupted.
//! - Every other replica (a candidate, one that knows no leader) keeps its timers on.
//!
//! # Why this is safe
//!
//! Raft's safety never depends on timers; they only decide when elections and heartbeats
//! happen. The read levels that use time are unaffected. A leader's lease is renewed only by
//! quorum acknowledgements, which stop with the heartbeats, so a hibernated leader's lease
//! lapses: a lease read then runs a quorum round and is served as linearizable, and since
//! openraft refuses writes on a leader whose lease lapsed, a write renews the lease with a
//! quorum round before it is proposed (one round trip on the first request after an idle
//! spell; `Shard::write`). A follower's bounded-staleness proofs come from read-index rounds
//! (`crate::read_index`), not from heartbeats. What hibernation changes is failure detection: from per-group
//! heartbeats to per-node pings, with the same timeouts.
//!
//! That detection must see what a heartbeat would, in the direction a heartbeat travels. An
//! awake follower campaigns when its leader's messages stop arriving, whatever it can itself
//! send; its own answered pings prove only that it reaches the leader's node. Were they
//! enough, a leader whose node could no longer send to its followers' nodes (a one-way
//! failure: its connections to them fail, theirs to it work) would keep them asleep for ever:
//! its heartbeats and quorum rounds fail, its lease lapses, reads and writes fail, and nobody
//! campaigns. Hence the inbound half: a follower stays asleep only while messages from its
//! leader's node keep arriving within its election timeout, so a leader that cannot reach it
//! is noticed when, and as, an awake follower would notice it (the leader's messages stop
//! arriving). Its timers then run; with no heartbeat for long it campaigns with pre-vote, and
//! if that leader reaches no majority, a majority of followers in the same position (their
//! leases lapsed with the leader's heartbeats) elects a new leader. The outbound half stays
//! too: a message from the leader's node says nothing of which groups it leads, and the ping
//! reply that lists them is fresh only in the outbound direction, so neither direction is
//! taken as proof of the other. Requiring more evidence to sleep only wakes a follower
//! sooner, and an awake follower is exactly an unhibernated one; as before, the evidence is
//! per node, not per group.
//!
//! The leader side mirrors it. A leader that cannot reach a replica's node sees its pings go
//! unanswered and stays awake (its heartbeats are then what they always were: attempts). A
//! leader that a replica's node cannot reach sees that node's messages stop and stays awake
//! too: the replica, unable to reach it, wakes and would campaign, and the leader's
//! heartbeats, which still arrive, are what stop it (they reset its election timer, and a
//! quorum that keeps acknowledging them makes the leader and that quorum refuse its votes),
//! as in an unhibernated group. So a link that works one way only keeps awake both the
//! follower and the leader at its ends, and nobody sleeps on evidence the failure falsified.
//! The budget is unchanged: one ping per peer per interval; the inbound evidence is the
//! peers' own pings (or Raft traffic), counted where they arrive.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::future::join_all;
use openraft::async_runtime::watch::WatchReceiver;

use crate::config::Config;
use crate::pb::raft::PingReply;
use crate::peers::Peers;
use crate::raft::ShardRaft;

/// When a group last saw client traffic, and whether the controller put it to sleep.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    /// Milliseconds after `epoch` of the last write or quorum read.
    last_ms: AtomicU64,
    hibernating: AtomicBool,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            hibernating: AtomicBool::new(false),
        }
    }
}

impl Activity {
    /// Records client traffic now.
    pub fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Marks the group awake. Returns true if it was hibernating: the caller must turn its
    /// timers back on. Only a leader's group is woken this way; a follower's timers are the
    /// controller's alone (woken early, a follower that has heard no heartbeat for long would
    /// campaign against a healthy leader).
    pub fn wake(&self) -> bool {
        self.hibernating.load(Ordering::Relaxed) && self.hibernating.swap(false, Ordering::AcqRel)
    }

    /// How long ago the last traffic was (counting from creation if there was none).
    pub fn idle_for(&self, now: Instant) -> Duration {
        let last = self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        now.saturating_duration_since(last)
    }

    /// True while the controller keeps this replica's timers off.
    pub fn is_hibernating(&self) -> bool {
        self.hibernating.load(Ordering::Relaxed)
    }

    fn set_hibernating(&self, sleeping: bool) {
        self.hibernating.store(sleeping, Ordering::Release);
    }
}

/// A random id for this process start, so peers can tell a restart from a slow reply.
pub fn new_boot_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    mix(nanos ^ (u64::from(std::process::id()) << 32))
}

/// splitmix64's finalizer: spreads the bits of `x`.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The timeouts the rules use, derived from the node's [`Config`].
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// How often the controller runs and pings (the heartbeat interval).
    pub interval: Duration,
    /// Idle time before a leader hibernates its group.
    pub hibernate_after: Duration,
    /// A replica's node unreachable either way for this long (no answer, or no message from
    /// it) keeps its leader's groups awake (two intervals).
    pub suspect_after: Duration,
    /// A leader's node unreachable either way for this long (plus jitter) wakes its
    /// followers' timers.
    pub leader_silent_after: Duration,
    /// The width of the election timeout range, for the per-shard jitter.
    pub jitter: Duration,
}

impl Timeouts {
    /// The timeouts of `config`, or `None` if it never hibernates.
    pub fn of(config: &Config) -> Option<Timeouts> {
        if config.hibernate_after_ms == 0 {
            return None;
        }
        let interval = Duration::from_millis(config.heartbeat_interval_ms);
        Some(Timeouts {
            interval,
            hibernate_after: Duration::from_millis(config.hibernate_after_ms),
            suspect_after: 2 * interval,
            leader_silent_after: Duration::from_millis(config.election_timeout_min_ms),
            jitter: Duration::from_millis(
                config.election_timeout_max_ms - config.election_timeout_min_ms,
            ),
        })
    }

    /// The follower's patience with a silent leader for `shard` on node `me`: the election
    /// timeout minimum plus a jitter fixed per (node, shard), so the followers of a group that
    /// lost its leader do not all campaign at the same instant.
    fn leader_patience(&self, me: u64, shard: u64) -> Duration {
        let range = self.jitter.as_millis() as u64 + 1;
        self.leader_silent_after + Duration::from_millis(mix(me.rotate_left(32) ^ shard) % range)
    }
}

/// What the controller knows of one peer node.
#[derive(Debug, Default, Clone)]
pub struct PeerLiveness {
    /// When it last answered a ping (it was reachable from this node).
    pub last_answer: Option<Instant>,
    /// When a message from it last arrived here (this node was reachable from it).
    pub last_heard: Option<Instant>,
    /// Its boot id in that answer.
    pub boot_id: Option<u64>,
    /// The shards it led at that answer.
    pub leading: BTreeSet<u64>,
}

/// Every peer's liveness, as the controller's pings found it.
#[derive(Debug, Default, Clone)]
pub struct Liveness {
    peers: BTreeMap<u64, PeerLiveness>,
}

impl Liveness {
    /// Records a ping's outcome at `now`. Returns true if the peer came back: it answered
    /// after being silent for `suspect_after` (or never having answered), or with a new boot id.
    pub fn record(
        &mut self,
        node: u64,
        now: Instant,
        answer: Option<PingReply>,
        suspect_after: Duration,
    ) -> bool {
        let peer = self.peers.entry(node).or_default();
        let Some(reply) = answer else {
            return false;
        };
        let was_silent = peer
            .last_answer
            .is_none_or(|t| now.saturating_duration_since(t) > suspect_after);
        let restarted = peer.boot_id.is_some_and(|b| b != reply.boot_id);
        peer.last_answer = Some(now);
        peer.boot_id = Some(reply.boot_id);
        peer.leading = reply.leading.into_iter().collect();
        was_silent || restarted
    }

    /// Records that a message from `node` arrived here at `at` (the latest arrival the
    /// transport saw; `None` if nothing ever arrived). Never moves the record back in time.
    pub fn heard(&mut self, node: u64, at: Option<Instant>) {
        let peer = self.peers.entry(node).or_default();
        peer.last_heard = peer.last_heard.max(at);
    }

    /// True if `node` answered within `within` of `now`.
    pub fn answered_within(&self, node: u64, now: Instant, within: Duration) -> bool {
        self.peers
            .get(&node)
            .and_then(|p| p.last_answer)
            .is_some_and(|t| now.saturating_duration_since(t) <= within)
    }

    /// True if a message from `node` arrived within `within` of `now`.
    pub fn heard_within(&self, node: u64, now: Instant, within: Duration) -> bool {
        self.peers
            .get(&node)
            .and_then(|p| p.last_heard)
            .is_some_and(|t| now.saturating_duration_since(t) <= within)
    }

    /// True if `node` was reachable both ways within `within` of `now`: it answered one of
    /// this node's pings, and a message from it arrived here (see the module doc).
    pub fn reachable_both_ways(&self, node: u64, now: Instant, within: Duration) -> bool {
        self.answered_within(node, now, within) && self.heard_within(node, now, within)
    }

    /// True if `node`'s last answer listed `shard` among the shards it leads.
    pub fn leads(&self, node: u64, shard: u64) -> bool {
        self.peers
            .get(&node)
            .is_some_and(|p| p.leading.contains(&shard))
    }
}

/// A replica's role and progress, as the rules need them. Liveness is per node, so the other
/// replicas are named by their nodes (a group's Raft ids are replica ids, see
/// [`crate::raft::replica_node`]: a replica is reachable when its node is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupState {
    /// This replica leads.
    Leader {
        /// The nodes of the other replicas.
        others: Vec<u64>,
        /// The log is committed and applied here, and every other replica acknowledged all
        /// of it.
        settled: bool,
    },
    /// This replica follows.
    Follower {
        /// The node of the leader it knows of, if any.
        leader: Option<u64>,
    },
    /// Campaigning, shutting down, a replica whose node the membership does not name, or
    /// anything else: timers stay on.
    Other,
}

/// What the controller does to a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Timers off.
    Sleep,
    /// Timers on.
    Wake,
    /// Timers on, a heartbeat now, and count as active (a replica's node came back).
    WakeAndHeartbeat,
}

/// One evaluation of the rules: what node `me` knows at `now`.
#[derive(Debug, Clone, Copy)]
pub struct Round<'a> {
    /// This node.
    pub me: u64,
    /// When the pings of this round were answered.
    pub now: Instant,
    /// Every peer's liveness.
    pub liveness: &'a Liveness,
    /// The peers that came back in this round.
    pub returned: &'a BTreeSet<u64>,
    /// The timeouts.
    pub timeouts: &'a Timeouts,
}

impl Round<'_> {
    /// The rules of the module doc for this node's replica of `shard`.
    pub fn decide(&self, shard: u64, state: &GroupState, idle_for: Duration) -> Decision {
        let (live, now, t) = (self.liveness, self.now, self.timeouts);
        match state {
            GroupState::Leader { others, settled } => {
                if others.iter().any(|o| self.returned.contains(o)) {
                    return Decision::WakeAndHeartbeat;
                }
                let everyone_reachable = others
                    .iter()
                    .all(|o| live.reachable_both_ways(*o, now, t.suspect_after));
                if *settled && everyone_reachable && idle_for >= t.hibernate_after {
                    Decision::Sleep
                } else {
                    Decision::Wake
                }
            }
            GroupState::Follower {
                leader: Some(leader),
            } if *leader != self.me => {
                let patience = t.leader_patience(self.me, shard);
                if live.reachable_both_ways(*leader, now, patience) && live.leads(*leader, shard) {
                    Decision::Sleep
                } else {
                    Decision::Wake
                }
            }
            _ => Decision::Wake,
        }
    }
}

/// The controller's handle on one local replica.
#[derive(Clone)]
pub struct Group {
    /// The shard id.
    pub shard: u64,
    /// Its Raft group.
    pub raft: ShardRaft,
    /// Its client-traffic record.
    pub activity: Arc<Activity>,
}

impl Group {
    /// The replica's state as the rules need it, from openraft's metrics.
    fn state(&self) -> GroupState {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        state_of(&m)
    }

    async fn apply(&self, decision: Decision) {
        let sleeping = decision == Decision::Sleep;
        if decision == Decision::WakeAndHeartbeat {
            self.activity.touch();
        }
        // Flag first, then timers: a request racing with us turns the leader's timers back on
        // (see `Activity::wake`); at worst a busy group sleeps until the next evaluation, which
        // costs nothing but a lease renewal (requests never wait for timers).
        self.activity.set_hibernating(sleeping);
        self.raft.runtime_config().tick(!sleeping);
        if decision == Decision::WakeAndHeartbeat {
            // Best effort: a group that stopped has nothing to send.
            let _ = self.raft.trigger().heartbeat().await;
        }
    }
}

/// A replica's state as the rules need it, from its openraft metrics: replica ids (openraft's
/// `replication` targets, the current leader) mapped to their nodes through the membership.
fn state_of(m: &openraft::RaftMetrics<crate::raft::TypeConfig>) -> GroupState {
    let node = |replica: u64| {
        let entry = m.membership_config.membership().get_node(&replica)?;
        crate::raft::replica_node::node_of(replica, entry).ok()
    };
    match m.state {
        openraft::ServerState::Leader => {
            let last = m.last_log_index;
            let index = |l: &Option<crate::raft::LogId>| l.as_ref().map(|l| l.index());
            let mut settled = index(&m.local_committed) == last && index(&m.last_applied) == last;
            let mut others = Vec::new();
            if let Some(replication) = &m.replication {
                for (replica, matched) in replication {
                    if *replica != m.id {
                        // A replica whose node is unknown cannot be shown reachable.
                        let Some(node) = node(*replica) else {
                            return GroupState::Other;
                        };
                        others.push(node);
                        settled &= index(matched) == last;
                    }
                }
            }
            GroupState::Leader { others, settled }
        }
        openraft::ServerState::Follower | openraft::ServerState::Learner => {
            match m.current_leader {
                None => GroupState::Follower { leader: None },
                Some(leader) => match node(leader) {
                    Some(node) => GroupState::Follower { leader: Some(node) },
                    None => GroupState::Other,
                },
            }
        }
        _ => GroupState::Other,
    }
}

/// The groups the controller watches. The node inserts a replica it opens at runtime and
/// removes one it closes (a replica that moved away must not be woken or put to sleep again,
/// and its Raft handle must not be kept alive here).
#[derive(Default)]
pub struct Groups(std::sync::Mutex<BTreeMap<u64, Group>>);

impl std::fmt::Debug for Groups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.lock().keys()).finish()
    }
}

impl Groups {
    /// The set of `groups`, by shard.
    pub fn new(groups: Vec<Group>) -> Arc<Groups> {
        Arc::new(Groups(std::sync::Mutex::new(
            groups.into_iter().map(|g| (g.shard, g)).collect(),
        )))
    }

    /// Watches `group` (replacing the group of the same shard, if any).
    pub fn insert(&self, group: Group) {
        self.lock().insert(group.shard, group);
    }

    /// Stops watching `shard`'s group.
    pub fn remove(&self, shard: u64) {
        self.lock().remove(&shard);
    }

    /// The groups watched now.
    fn snapshot(&self) -> Vec<Group> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Group>> {
        self.0.lock().expect("hibernation groups lock")
    }
}

/// The node's hibernation controller; stops when dropped.
#[derive(Debug)]
pub struct Controller {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Controller {
    /// Starts the controller of node `me` over `groups` (as they are at each round), or
    /// returns `None` if `config` never hibernates. `peers` is `None` for an embedded node (its
    /// groups have no other replica).
    pub fn start(
        config: &Config,
        boot_id: u64,
        peers: Option<Arc<Peers>>,
        watched: Arc<Groups>,
    ) -> Option<Controller> {
        let timeouts = Timeouts::of(config)?;
        let me = config.node_id;
        let task = tokio::spawn(async move {
            let mut liveness = Liveness::default();
            let mut ticker = tokio::time::interval(timeouts.interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut asleep = 0usize;
            loop {
                ticker.tick().await;
                // The lease rule needs the clocks' offset sampled regularly (`crate::clock`).
                crate::clock::sample();
                let returned = match &peers {
                    Some(peers) => ping_all(peers, me, boot_id, &mut liveness, &timeouts).await,
                    None => BTreeSet::new(),
                };
                let round = Round {
                    me,
                    now: Instant::now(),
                    liveness: &liveness,
                    returned: &returned,
                    timeouts: &timeouts,
                };
                let mut sleeping = 0usize;
                let groups = watched.snapshot();
                for group in &groups {
                    let state = group.state();
                    let idle_for = group.activity.idle_for(round.now);
                    let decision = round.decide(group.shard, &state, idle_for);
                    sleeping += usize::from(decision == Decision::Sleep);
                    group.apply(decision).await;
                }
                if sleeping != asleep {
                    tracing::debug!(
                        node = me,
                        hibernating = sleeping,
                        of = groups.len(),
                        "hibernation"
                    );
                    asleep = sleeping;
                }
            }
        });
        Some(Controller { task })
    }
}

/// Pings every peer at once; records the answers and the latest message from each peer
/// that arrived here, and returns the peers that came back.
async fn ping_all(
    peers: &Peers,
    me: u64,
    boot_id: u64,
    liveness: &mut Liveness,
    timeouts: &Timeouts,
) -> BTreeSet<u64> {
    let targets: Vec<u64> = peers.node_ids().into_iter().filter(|n| *n != me).collect();
    let answers = join_all(
        targets
            .iter()
            .map(|node| peers.ping(*node, boot_id, timeouts.interval)),
    )
    .await;
    let now = Instant::now();
    let mut returned = BTreeSet::new();
    for (node, answer) in targets.into_iter().zip(answers) {
        if let Err(reason) = &answer {
            tracing::trace!(node = me, peer = node, %reason, "ping unanswered");
        }
        if liveness.record(node, now, answer.ok(), timeouts.suspect_after) {
            tracing::debug!(
                node = me,
                peer = node,
                "peer answers again: waking its groups"
            );
            returned.insert(node);
        }
        liveness.heard(node, peers.heard_from(node));
    }
    returned
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeouts() -> Timeouts {
        Timeouts::of(&Config::default()).expect("hibernates by default")
    }

    fn answer(boot_id: u64, leading: &[u64]) -> Option<PingReply> {
        Some(PingReply {
            boot_id,
            leading: leading.to_vec(),
            map_epoch: 0,
        })
    }

    fn leader(others: &[u64], settled: bool) -> GroupState {
        GroupState::Leader {
            others: others.to_vec(),
            settled,
        }
    }

    #[test]
    fn a_settled_idle_leader_whose_replicas_answer_sleeps_and_wakes_for_any_reason_to() {
        let t = timeouts();
        let now = Instant::now();
        let mut live = Liveness::default();
        live.record(2, now, answer(7, &[]), t.suspect_after);
        live.record(3, now, answer(8, &[]), t.suspect_after);
        live.heard(2, Some(now));
        live.heard(3, Some(now));
        let none = BTreeSet::new();
        let idle = t.hibernate_after;
        let d = |state: &GroupState, idle, live: &Liveness, returned: &BTreeSet<u64>, now| {
            let round = Round {
                me: 1,
                now,
                liveness: live,
                returned,
                timeouts: &t,
            };
            round.decide(5, state, idle)
        };
        assert_eq!(
            d(&leader(&[2, 3], true), idle, &live, &none, now),
            Decision::Sleep
        );
        // Recent traffic, an unsettled log, or a silent replica keep it awake.
        assert_eq!(
            d(&leader(&[2, 3], true), idle / 2, &live, &none, now),
            Decision::Wake
        );
        assert_eq!(
            d(&leader(&[2, 3], false), idle, &live, &none, now),
            Decision::Wake
        );
        let later = now + t.suspect_after + Duration::from_millis(1);
        assert_eq!(
            d(&leader(&[2, 3], true), idle, &live, &none, later),
            Decision::Wake
        );
        // A replica that comes back gets a heartbeat at once.
        let back = BTreeSet::from([3]);
        assert_eq!(
            d(&leader(&[2, 3], true), idle, &live, &back, now),
            Decision::WakeAndHeartbeat
        );
        // A leader with no other replica (embedded) sleeps once idle and settled.
        assert_eq!(
            d(&leader(&[], true), idle, &live, &none, now),
            Decision::Sleep
        );
    }

    #[test]
    fn a_follower_sleeps_only_while_its_leader_answers_and_says_it_leads() {
        let t = timeouts();
        let now = Instant::now();
        let mut live = Liveness::default();
        live.record(2, now, answer(7, &[5]), t.suspect_after);
        live.heard(2, Some(now));
        let follow = |leader| GroupState::Follower { leader };
        let none = BTreeSet::new();
        let d = |state: &GroupState, shard, now| {
            let round = Round {
                me: 1,
                now,
                liveness: &live,
                returned: &none,
                timeouts: &t,
            };
            round.decide(shard, state, Duration::ZERO)
        };
        assert_eq!(d(&follow(Some(2)), 5, now), Decision::Sleep);
        // The leader does not list shard 6: it lost or never had that group's leadership.
        assert_eq!(d(&follow(Some(2)), 6, now), Decision::Wake);
        // No leader known, or a leader that never answered.
        assert_eq!(d(&follow(None), 5, now), Decision::Wake);
        assert_eq!(d(&follow(Some(3)), 5, now), Decision::Wake);
        // Silent past the whole election range: awake whatever the jitter.
        let late = now + t.leader_silent_after + t.jitter + Duration::from_millis(1);
        assert_eq!(d(&follow(Some(2)), 5, late), Decision::Wake);
        // Within the election timeout minimum it is still trusted.
        let soon = now + t.leader_silent_after - Duration::from_millis(1);
        assert_eq!(d(&follow(Some(2)), 5, soon), Decision::Sleep);
        assert_eq!(d(&GroupState::Other, 5, now), Decision::Wake);
    }

    #[test]
    fn a_follower_whose_leader_answers_but_cannot_reach_it_stays_awake() {
        let t = timeouts();
        let now = Instant::now();
        let mut live = Liveness::default();
        let follower = GroupState::Follower { leader: Some(2) };
        let none = BTreeSet::new();
        let d = |live: &Liveness, now| {
            let round = Round {
                me: 1,
                now,
                liveness: live,
                returned: &none,
                timeouts: &t,
            };
            round.decide(5, &follower, Duration::ZERO)
        };
        // The leader answers this node's pings and lists the shard, but nothing from it ever
        // arrived here: its pings and heartbeats do not get through.
        live.record(2, now, answer(7, &[5]), t.suspect_after);
        assert_eq!(d(&live, now), Decision::Wake);
        // Its messages arrive: reachable both ways, the follower sleeps.
        live.heard(2, Some(now));
        assert_eq!(d(&live, now), Decision::Sleep);
        // It still answers every ping, but its own messages stopped arriving a whole election
        // range ago: the follower wakes (as an awake one would, its heartbeats missing).
        let late = now + t.leader_silent_after + t.jitter + Duration::from_millis(1);
        let mut at = now;
        while at < late {
            at += t.interval;
            live.record(2, at, answer(7, &[5]), t.suspect_after);
        }
        assert!(live.answered_within(2, at, t.interval));
        assert_eq!(d(&live, at), Decision::Wake);
        // An old arrival reported late never moves the record back.
        live.heard(2, None);
        live.heard(2, Some(now - t.interval));
        assert!(live.heard_within(2, now, Duration::ZERO));
    }

    #[test]
    fn a_leader_that_a_replica_cannot_reach_stays_awake() {
        let t = timeouts();
        let now = Instant::now();
        let mut live = Liveness::default();
        let none = BTreeSet::new();
        let idle = t.hibernate_after;
        let d = |live: &Liveness, now| {
            let round = Round {
                me: 1,
                now,
                liveness: live,
                returned: &none,
                timeouts: &t,
            };
            round.decide(5, &leader(&[2, 3], true), idle)
        };
        // Both replicas answer its pings; only node 3's messages arrive here.
        live.record(2, now, answer(7, &[]), t.suspect_after);
        live.record(3, now, answer(8, &[]), t.suspect_after);
        live.heard(3, Some(now));
        assert_eq!(d(&live, now), Decision::Wake);
        live.heard(2, Some(now));
        assert_eq!(d(&live, now), Decision::Sleep);
        // Node 2 keeps answering, but its messages stop for two intervals.
        let later = now + t.suspect_after + Duration::from_millis(1);
        live.record(2, later, answer(7, &[]), t.suspect_after);
        live.record(3, later, answer(8, &[]), t.suspect_after);
        live.heard(3, Some(later));
        assert_eq!(d(&live, later), Decision::Wake);
        live.heard(2, Some(later));
        assert_eq!(d(&live, later), Decision::Sleep);
    }

    #[test]
    fn replicas_are_reachable_when_their_nodes_are() {
        use crate::raft::replica_node::replica_node;
        use openraft::{BasicNode, Membership, RaftMetrics, ServerState, StoredMembership};

        // Shard 5's replicas 11, 12 and 13 live on nodes 1, 2 and 3 (replica ids apart from
        // node ids); replica 11 is this node's and leads, with everything settled.
        let membership = Membership::new(
            vec![[11, 12, 13].into()],
            [
                (11, replica_node(1)),
                (12, replica_node(2)),
                (13, replica_node(3)),
            ]
            .into_iter()
            .collect::<BTreeMap<u64, BasicNode>>(),
        )
        .expect("a valid membership");
        let at = Some(crate::raft::log_id(4, 11, 9));
        let mut m = RaftMetrics::<crate::raft::TypeConfig>::new_initial(11);
        m.membership_config = Arc::new(StoredMembership::new(None, membership));
        m.state = ServerState::Leader;
        m.last_log_index = Some(9);
        m.local_committed = at;
        m.last_applied = at;
        m.replication = Some([(11, at), (12, at), (13, at)].into_iter().collect());
        let state = state_of(&m);
        assert_eq!(state, leader(&[2, 3], true), "the other replicas as nodes");

        // The rules then go by the nodes' liveness: nodes 2 and 3 reachable both ways, the
        // leader sleeps; node 3's messages stop (nothing from "13" could ever arrive), it wakes.
        let t = timeouts();
        let now = Instant::now();
        let mut live = Liveness::default();
        for node in [2, 3] {
            live.record(node, now, answer(7, &[]), t.suspect_after);
            live.heard(node, Some(now));
        }
        let none = BTreeSet::new();
        let decide = |live: &Liveness, now| {
            let round = Round {
                me: 1,
                now,
                liveness: live,
                returned: &none,
                timeouts: &t,
            };
            round.decide(5, &state, t.hibernate_after)
        };
        assert_eq!(decide(&live, now), Decision::Sleep);
        let later = now + t.suspect_after + Duration::from_millis(1);
        live.record(2, later, answer(7, &[]), t.suspect_after);
        live.record(3, later, answer(8, &[]), t.suspect_after);
        live.heard(2, Some(later));
        assert_eq!(decide(&live, later), Decision::Wake);

        // Replica 12, on node 2, follows leader replica 11: its leader is node 1.
        let mut f = m.clone();
        f.id = 12;
        f.state = ServerState::Follower;
        f.replication = None;
        f.current_leader = Some(11);
        assert_eq!(state_of(&f), GroupState::Follower { leader: Some(1) });
        // A legacy membership entry (written before replica ids) names its replica id's node.
        let legacy = Membership::new_with_defaults(vec![[11, 12].into()], [11, 12]);
        f.membership_config = Arc::new(StoredMembership::new(None, legacy));
        assert_eq!(state_of(&f), GroupState::Follower { leader: Some(11) });
        // An entry naming no node keeps the timers on.
        let broken = Membership::new(
            vec![[11, 12].into()],
            [(11, BasicNode::new("10.0.0.1:7000")), (12, replica_node(2))]
                .into_iter()
                .collect::<BTreeMap<u64, BasicNode>>(),
        )
        .expect("a valid membership");
        f.membership_config = Arc::new(StoredMembership::new(None, broken));
        assert_eq!(state_of(&f), GroupState::Other);
    }

    #[test]
    fn the_jitter_spreads_followers_over_the_election_range() {
        let t = timeouts();
        let patience: BTreeSet<Duration> =
            (0..64).map(|shard| t.leader_patience(1, shard)).collect();
        assert!(patience.len() > 32, "{patience:?}");
        for p in &patience {
            assert!(*p >= t.leader_silent_after && *p <= t.leader_silent_after + t.jitter);
        }
        assert_ne!(t.leader_patience(1, 9), t.leader_patience(2, 9));
    }

    #[test]
    fn a_peer_comes_back_when_it_answers_after_silence_or_with_a_new_boot_id() {
        let t = timeouts();
        let now = Instant::now();
        let mut live = Liveness::default();
        assert!(
            live.record(2, now, answer(7, &[]), t.suspect_after),
            "first answer"
        );
        assert!(!live.record(2, now + t.interval, answer(7, &[]), t.suspect_after));
        assert!(!live.record(2, now + 2 * t.interval, None, t.suspect_after));
        let after_silence = now + t.interval + t.suspect_after + Duration::from_millis(1);
        assert!(live.record(2, after_silence, answer(7, &[]), t.suspect_after));
        assert!(
            live.record(2, after_silence, answer(9, &[]), t.suspect_after),
            "restarted"
        );
    }

    #[test]
    fn wake_reports_a_hibernating_group_once_and_touch_resets_the_idle_time() {
        let a = Activity::default();
        assert!(!a.wake());
        a.set_hibernating(true);
        assert!(a.is_hibernating());
        assert!(a.wake());
        assert!(!a.wake());
        assert!(!a.is_hibernating());
        let later = Instant::now() + Duration::from_secs(5);
        assert!(a.idle_for(later) >= Duration::from_secs(5));
        a.touch();
        assert!(a.idle_for(Instant::now()) < Duration::from_secs(1));
    }
}
