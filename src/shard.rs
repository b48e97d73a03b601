//! One local replica of a shard: its openraft group, a read handle on its state machine, and
//! the write path and per-level read paths (see [`crate::consistency`] for what each level
//! promises).
//!
//! Writes go through `client_write`: the entry is durable on a majority and applied before the
//! reply, and compare-and-set is decided at apply time. Reads:
//!
//! - **linearizable**: a read index from the leader (a node-level leadership check, see
//!   [`crate::leadership`], or openraft's coalesced quorum round when that cannot confirm, when
//!   this replica leads; the `ReadIndex` peer RPC when it follows), then local state once
//!   applied that far;
//! - **lease**: the same without the round trip while the leader's lease holds (a leader whose
//!   lease lapsed, e.g. after hibernating, runs the round and serves a linearizable read);
//! - **session**: wait (at most one election timeout) until this replica has applied the
//!   session token's index for the shard, then local state; else `Unavailable`;
//! - **bounded staleness**: served locally when this replica's last read-index round (see
//!   `crate::read_index`) is younger than the bound and applied, or when it leads within its
//!   lease; otherwise the request's fallback applies: a linearizable read, or (fail-if-stale)
//!   one proof round that must complete within the bound;
//! - **eventual**: local state, no checks; the receipt bounds the staleness when a proof exists.
//!
//! Test builds only (the `planted-bugs` feature): `planted_read` and `planted_write`, fenced at
//! the bottom of this file, break these paths on purpose when `crate::planted` names a bug.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;

use openraft::error::{ClientWriteError, ForwardToLeader, LinearizableReadError, RaftError};
use openraft::metrics::WaitError;
use openraft::network::{NetSnapshot, RaftNetworkFactory};
use openraft::{BasicNode, ReadPolicy, SnapshotPolicy};

use crate::clock::BootInstant;
use crate::cluster::MapView;
use crate::config::Config;
use crate::consistency::{Fallback, ReadLevel, ReadReceipt, ServedLevel, Staleness};
use crate::error::{Error, Result};
use crate::hibernation::{Activity, Group};
use crate::leadership::{LeadershipChecks, Outcome, Voter};
use crate::peers::Peers;
use crate::raft::commit_horizon::CommitHorizon;
use crate::raft::replica_node::{node_of, replica_node};
use crate::raft::{
    Command, CommandResult, LogStore, ShardRaft, StateMachine, StateReader, TypeConfig,
    VersionedValue,
};
use crate::read_index::{Freshness, RoundError, Rounds};
use crate::storage::{SnapshotFile, Store};

/// A replica's view of its shard, from openraft's metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardView {
    /// The node of the leader this replica knows of (a node id, not the leader's replica id).
    pub leader: Option<u64>,
    /// The current term.
    pub term: u64,
    /// The highest log index known committed.
    pub commit_index: Option<u64>,
    /// The highest log index applied to the state machine.
    pub applied_index: Option<u64>,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub role: &'static str,
    /// The group's timers are off on this replica (see [`crate::hibernation`]).
    pub hibernating: bool,
}

/// A group's membership as this replica knows it (the last one in its log, which openraft
/// makes effective as soon as it is appended): voters and learners as replica → node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMembership {
    /// The voter sets: one (uniform) or two (joint, old then new).
    pub voters: Vec<BTreeMap<u64, u64>>,
    /// Learners: replicas that receive the log but do not vote.
    pub learners: BTreeMap<u64, u64>,
    /// The log position of this membership, for [`Shard::replace_voters`]' precondition.
    pub log_id: MembershipLogId,
}

impl GroupMembership {
    /// True while the group is in a joint configuration.
    pub fn is_joint(&self) -> bool {
        self.voters.len() > 1
    }
}

/// The log position of a group membership (opaque: compare it, hand it back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipLogId(Option<crate::raft::LogId>);

impl MembershipLogId {
    /// The log index of the membership entry (`None` for the initial empty membership).
    pub fn index(&self) -> Option<u64> {
        self.0.as_ref().map(|l| l.index())
    }
}

/// One local replica of a shard.
pub struct Shard {
    id: u64,
    node_id: u64,
    /// This replica's Raft id in its group (see [`crate::raft::replica_node`]): the map's
    /// replica on this node (the node id for every replica that existed before moves).
    replica: u64,
    raft: ShardRaft,
    reader: StateReader,
    timeout: Duration,
    /// How long a session read waits for this replica to catch up before failing.
    session_wait: Duration,
    /// Channels to the other nodes (follower read-index requests); None when embedded.
    peers: Option<Arc<Peers>>,
    /// This replica's Raft log (for its stored vote).
    log: LogStore,
    /// The node's leadership checks: a leader's read index without a round of its own.
    checks: Arc<LeadershipChecks>,
    /// Coalesces this replica's openraft read-index rounds while it leads (the fallback when a
    /// leadership check fails, and lease renewal).
    rounds: Rounds,
    /// The last read-index round this replica completed (bounded-staleness proofs).
    freshness: Freshness,
    /// Client traffic, for hibernation (see [`crate::hibernation`]).
    activity: Arc<Activity>,
    /// A leader's lease (openraft's: the election timeout maximum after a quorum
    /// acknowledgement), less one heartbeat interval of margin: past it, a write renews the
    /// lease first (see [`Shard::renew_lapsed_lease`]).
    lease_renew_after: Duration,
    /// openraft's lease (the election timeout maximum) and the margin kvnode keeps inside it
    /// for clock drift (see [`crate::clock`]).
    lease: (Duration, Duration),
    /// The highest commit index this replica has sent a peer (part of a leader's read index).
    horizon: Arc<CommitHorizon>,
    /// Test builds: holds this replica's applies (see [`crate::raft::apply_stall`]).
    #[cfg(feature = "planted-bugs")]
    stall: Arc<crate::raft::apply_stall::ApplyStall>,
    /// Logs every leadership change of the group (kept alive with the shard).
    _leader_log: openraft::WatchChangeHandle<TypeConfig>,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("id", &self.id)
            .field("node", &self.node_id)
            .field("replica", &self.replica)
            .finish()
    }
}

/// openraft's configuration for one shard, derived from the node's [`Config`].
pub fn raft_config(config: &Config, shard: u64) -> Result<openraft::Config> {
    let raft = openraft::Config {
        cluster_name: format!("kvnode-shard-{shard}"),
        heartbeat_interval: config.heartbeat_interval_ms,
        election_timeout_min: config.election_timeout_min_ms,
        election_timeout_max: config.election_timeout_max_ms,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every_entries),
        // Keep some log behind a snapshot so a briefly lagging follower catches up from the
        // log rather than by a full snapshot transfer.
        max_in_snapshot_log_to_keep: (config.snapshot_every_entries / 5).max(1),
        // A restarted leader must win an election again: its committed marker is not
        // fsynced on its own, so it cannot prove its state machine is current.
        enable_leader_restore: Some(false),
        // A node cut off from its group must not disrupt it with higher terms on return.
        enable_pre_vote: Some(true),
        // The per-chunk budget when a snapshot streams to a follower.
        install_snapshot_timeout: config.request_timeout_ms,
        // Replicate an entry as soon as it is written to the WAL, in parallel with the
        // leader's own fdatasync (Raft §10.2.1): otherwise every write waits for two fsyncs
        // in a row, the leader's and then the followers'. Safe: the leader counts itself
        // toward the quorum only once its own flush is done.
        broadcast_submitted_on_append: Some(true),
        ..Default::default()
    };
    raft.validate()
        .map_err(|e| Error::InvalidArgument(format!("raft configuration: {e}")))
}

impl Shard {
    /// Opens replica `replica` of shard `id` on this node: its log in the WAL, its state
    /// machine (restored from a snapshot if sled fell behind the log's purge point), and its
    /// Raft group, whose Raft id is `replica`. `network` must record every commit index it
    /// sends in `horizon`. `map_view` is given for the META group only: its state machine
    /// publishes the applied cluster map there.
    ///
    /// The shard's local state is opened only under the replica id it belongs to
    /// ([`crate::storage::replica_record`]; none recorded = the node id). If that is another
    /// replica id, the state is an earlier incarnation's and is retired first
    /// ([`Store::retire_shard`]): the new replica starts empty and uninitialized, and waits for
    /// its leader's appends or snapshot. Safety: a Raft id never sees a vote or log it did not
    /// write itself, and the record names the new id only once the old state is gone, so a
    /// crash in between retires again.
    #[allow(clippy::too_many_arguments)]
    pub async fn open<N>(
        store: &Store,
        config: &Config,
        id: u64,
        replica: u64,
        (network, horizon): (N, Arc<CommitHorizon>),
        peers: Option<Arc<Peers>>,
        checks: Arc<LeadershipChecks>,
        map_view: Option<Arc<MapView>>,
    ) -> Result<Shard>
    where
        N: RaftNetworkFactory<TypeConfig>,
        N::Network: NetSnapshot<TypeConfig, SnapshotData = SnapshotFile>,
    {
        let recorded = store.shard_replica(id, config.node_id)?;
        if recorded != replica {
            tracing::info!(
                shard = id,
                old = recorded,
                new = replica,
                "the shard's local state belongs to an earlier replica; retiring it"
            );
            store.retire_shard(id)?;
        }
        store.record_shard_replica(id, replica)?;
        let log = LogStore::new(store.wal().clone(), id);
        let purged = log.last_purged().map_err(|e| io_to_error(id, e))?;
        let mut sm =
            StateMachine::open(store, id, purged.as_ref()).map_err(|e| io_to_error(id, e))?;
        if let Some(view) = map_view {
            sm.publish_map_to(view).map_err(|e| io_to_error(id, e))?;
        }
        let reader = sm.reader();
        #[cfg(feature = "planted-bugs")]
        let stall = sm.stall();
        let raft_config = Arc::new(raft_config(config, id)?);
        let raft = ShardRaft::new(replica, raft_config, network, log.clone(), sm)
            .await
            .map_err(|e| Error::ShardStopped {
                shard: id,
                reason: e.to_string(),
            })?;
        let node_id = config.node_id;
        let leader_log = raft.on_cluster_leader_change(move |_old, (leader, committed)| {
            if committed {
                tracing::info!(shard = id, leader = %leader, me = node_id, "shard leader changed");
            }
            async {}
        });
        Ok(Shard {
            id,
            node_id,
            replica,
            raft,
            reader,
            timeout: config.request_timeout(),
            session_wait: Duration::from_millis(config.election_timeout_max_ms)
                .min(config.request_timeout()),
            peers,
            log,
            checks,
            rounds: Rounds::default(),
            freshness: Freshness::default(),
            activity: Arc::new(Activity::default()),
            lease_renew_after: Duration::from_millis(
                config
                    .election_timeout_max_ms
                    .saturating_sub(config.heartbeat_interval_ms),
            ),
            horizon,
            #[cfg(feature = "planted-bugs")]
            stall,
            lease: (
                Duration::from_millis(config.election_timeout_max_ms),
                config.lease_margin(),
            ),
            _leader_log: leader_log,
        })
    }

    /// The shard id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The shard's openraft handle (for membership and peer traffic).
    pub fn raft(&self) -> &ShardRaft {
        &self.raft
    }

    /// This replica's Raft id in its group, the id a peer message for it names
    /// (`PeerHeader.replica`, `ConfirmItem.replica`): the id the cluster map gives this
    /// node's replica of the shard (the node id for replicas that existed before moves).
    pub fn replica_id(&self) -> u64 {
        self.replica
    }

    /// The node of the group's leader as this replica knows it: openraft's leader replica id
    /// mapped through the membership (leader hints, `x-kvnode-leader` and `NotLeader`, are
    /// node ids). `None` if no leader is known or its membership entry names no node.
    pub fn leader_node(&self) -> Option<u64> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        node_in(self.id, &m, m.current_leader?)
    }

    /// The replica of this group that the membership places on `node`, or 0 (a legacy
    /// request: the receiver's node id) if it places none there.
    fn replica_on(&self, node: u64) -> u64 {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        m.membership_config
            .membership()
            .nodes()
            .find(|(replica, entry)| node_of(**replica, entry) == Ok(node))
            .map_or(0, |(replica, _)| *replica)
    }

    /// The node of the leader a refused request was sent on to (openraft's `ForwardToLeader`
    /// names a replica id, and usually its membership entry).
    fn forward_hint(&self, f: &ForwardToLeader<TypeConfig>) -> Option<u64> {
        leader_hint(self.id, &self.raft, f)
    }

    /// This replica's view of the shard (never blocks).
    pub fn view(&self) -> ShardView {
        let m = self.raft.metrics().borrow_watched().clone();
        ShardView {
            leader: m.current_leader.and_then(|l| node_in(self.id, &m, l)),
            term: m.current_term,
            commit_index: m.cluster_committed.or(m.local_committed).map(|l| l.index()),
            applied_index: m.last_applied.map(|l| l.index()),
            role: match m.state {
                openraft::ServerState::Leader => "leader",
                openraft::ServerState::Follower => "follower",
                openraft::ServerState::Candidate => "candidate",
                openraft::ServerState::Learner => "learner",
                openraft::ServerState::Shutdown => "shutdown",
            },
            hibernating: self.activity.is_hibernating(),
        }
    }

    /// The group's membership as this replica knows it (see [`GroupMembership`]). A replica
    /// whose membership entry names no node is reported on the node equal to its id (legacy).
    pub fn membership(&self) -> GroupMembership {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        let stored = &m.membership_config;
        group_membership(self.id, stored.membership(), *stored.log_id())
    }

    /// Adds `replica`, hosted on `node`, to the group as a learner (design D6, first step).
    /// Leader only. Does not wait for it to catch up (openraft's non-blocking mode): the caller
    /// decides when it has, with [`Shard::matched`]. Idempotent: a replica already a learner or
    /// voter is left as it is and the call succeeds.
    ///
    /// # Errors
    ///
    /// [`Error::NotLeader`] (definite, nothing proposed) on a replica that does not lead; the
    /// write errors of [`Shard::write`] otherwise.
    pub async fn add_learner(&self, replica: u64, node: u64) -> Result<()> {
        if self
            .membership()
            .voters
            .iter()
            .any(|v| v.contains_key(&replica))
            || self.membership().learners.contains_key(&replica)
        {
            return Ok(());
        }
        self.raft
            .add_learner(replica, replica_node(node), false)
            .await
            .map(|_| ())
            .map_err(|e| self.write_error(e))
    }

    /// The highest log index the leader knows `replica` holds (openraft's replication
    /// progress); `None` if this replica does not lead or has not heard from it yet.
    pub fn matched(&self, replica: u64) -> Option<u64> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        if replica == self.replica && m.state == openraft::ServerState::Leader {
            return m.last_log_index;
        }
        m.replication
            .as_ref()?
            .get(&replica)?
            .as_ref()
            .map(|l| l.index())
    }

    /// Replaces the group's voters with `voters` (design D6, the membership step): openraft's
    /// `change_membership_if(ReplaceAllVoters, retain = false)` guarded by
    /// `LastMembershipLogId = expected`, so a second driver that observed an older membership
    /// changes nothing. Commits the joint configuration, then the uniform one; returns the new
    /// membership. Replicas left out stop receiving the log (`retain = false`). Every new voter
    /// must be a learner or voter already (its node is taken from the membership).
    ///
    /// # Errors
    ///
    /// [`Error::NotLeader`] on a replica that does not lead; a refusal (the precondition
    /// failed, another change in progress) as [`Error::Unavailable`] naming openraft's reason.
    /// A refusal of the first step writes nothing; one of the flattening step (or a lost
    /// leadership) can leave the group joint, so after any error the caller observes
    /// [`Shard::membership`] again instead of assuming either.
    pub async fn replace_voters(
        &self,
        voters: std::collections::BTreeSet<u64>,
        expected: &MembershipLogId,
    ) -> Result<GroupMembership> {
        let precondition = openraft::Precondition::LastMembershipLogId {
            last_membership_log_id: expected.0,
        };
        let written = self
            .raft
            .change_membership_if(
                openraft::ChangeMembers::ReplaceAllVoters(voters),
                false,
                [precondition],
            )
            .await
            .map_err(|e| self.write_error(e))?;
        Ok(match &written.membership {
            Some(m) => group_membership(self.id, m, Some(written.log_id)),
            None => self.membership(),
        })
    }

    /// Asks the group to transfer leadership to `replica` (openraft's trigger): the leader
    /// stops serving lease reads at once. It does not wait, and the transfer may not happen
    /// (a lagging target, or no transport of the transfer message yet): callers observe the
    /// group afterwards instead of assuming it.
    ///
    /// # Errors
    ///
    /// [`Error::ShardStopped`] if the group has stopped.
    pub async fn transfer_leader(&self, replica: u64) -> Result<()> {
        self.raft
            .trigger()
            .transfer_leader(replica)
            .await
            .map_err(|e| Error::ShardStopped {
                shard: self.id,
                reason: e.to_string(),
            })
    }

    /// True if this replica leads its group right now.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow_watched().state == openraft::ServerState::Leader
    }

    /// The hibernation controller's handle on this replica.
    pub fn hibernation_group(&self) -> Group {
        Group {
            shard: self.id,
            raft: self.raft.clone(),
            activity: Arc::clone(&self.activity),
        }
    }

    /// Records client traffic that needs the leader's timers (a write or a quorum read), and
    /// wakes the group if it was hibernating and this replica leads it. A follower stays as the
    /// hibernation controller set it: its timers would only start an election (the request
    /// itself is forwarded to the leader, which wakes there).
    fn note_activity(&self) {
        self.activity.touch();
        if self.activity.is_hibernating() && self.is_leader() && self.activity.wake() {
            self.raft.runtime_config().tick(true);
        }
    }

    /// Initializes the group with `voters` (node ids, each hosting the replica of the same id)
    /// if it never was (exactly once per group, on one node). Returns whether this call
    /// initialized it. The membership names each replica's node in the encoding of
    /// [`crate::raft::replica_node`].
    pub async fn initialize_if_new(&self, voters: &[u64]) -> Result<bool> {
        let stopped = |e: &dyn std::fmt::Display| Error::ShardStopped {
            shard: self.id,
            reason: e.to_string(),
        };
        if self.raft.is_initialized().await.map_err(|e| stopped(&e))? {
            return Ok(false);
        }
        let members: BTreeMap<u64, BasicNode> =
            voters.iter().map(|v| (*v, replica_node(*v))).collect();
        self.raft
            .initialize(members)
            .await
            .map_err(|e| stopped(&e))?;
        Ok(true)
    }

    /// Waits until this replica knows a leader of the group (itself or another node); returns
    /// the leader's node (its replica id if its membership entry names no node).
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<u64> {
        let metrics = self
            .raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a leader is known")
            .await
            .map_err(|e| self.wait_error(e, "waiting for a leader", false))?;
        let leader = metrics.current_leader.unwrap_or(self.replica);
        Ok(node_in(self.id, &metrics, leader).unwrap_or(leader))
    }

    /// Asks this replica to campaign now instead of after an election timeout (used when it is
    /// the only voter, e.g. an embedded node reopening).
    pub async fn campaign(&self) -> Result<()> {
        self.raft
            .trigger()
            .elect(false)
            .await
            .map_err(|e| Error::ShardStopped {
                shard: self.id,
                reason: e.to_string(),
            })
    }

    /// Proposes `command` and waits until it is committed and applied. Returns its result and
    /// log index.
    pub async fn write(&self, command: Command) -> Result<(CommandResult, u64)> {
        // Refused before anything is proposed: a map change on a data shard, or a key write on
        // the META group (the state machine would refuse it too, as a value).
        command
            .check_group(self.id)
            .map_err(Error::InvalidArgument)?;
        #[cfg(feature = "planted-bugs")]
        if let Some(planted) = self.planted_write(&command).await {
            return planted;
        }
        self.note_activity();
        self.renew_lapsed_lease().await?;
        let written = tokio::time::timeout(self.timeout, self.raft.client_write(command)).await;
        match written {
            Err(_) => Err(self.timeout_error("write", true)),
            Ok(Ok(reply)) => Ok((reply.data, reply.log_id.index())),
            Ok(Err(e)) => Err(self.write_error(e)),
        }
    }

    /// openraft refuses writes on a leader whose lease has lapsed (`ForwardReason::LeaseExpired`),
    /// as it has after hibernating: no heartbeats, so no quorum acknowledgements. Renews it
    /// first with a quorum round, shared with concurrent reads and writes. Nothing is proposed
    /// before, so a failure here is definite.
    async fn renew_lapsed_lease(&self) -> Result<()> {
        let lapsed = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow_watched();
            m.state == openraft::ServerState::Leader
                && m.membership_config.voter_ids().nth(1).is_some()
                && m.last_quorum_acked.as_ref().is_none_or(|acked| {
                    openraft::Instant::elapsed(&**acked) >= self.lease_renew_after
                })
        };
        if lapsed {
            // openraft's own round: only its quorum acknowledgements renew its lease.
            self.raft_read_index().await?;
        }
        Ok(())
    }

    /// Maps a failed `client_write` to the public error.
    fn write_error(&self, e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> Error {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Error::NotLeader {
                shard: self.id,
                leader_hint: self.forward_hint(&f),
            },
            RaftError::APIError(ClientWriteError::LogEntryDiscarded(f)) => Error::LeaderChanged {
                shard: self.id,
                leader_hint: self.forward_hint(&f),
            },
            RaftError::APIError(other) => Error::Unavailable {
                shard: self.id,
                reason: other.to_string(),
            },
            RaftError::Fatal(f) => Error::ShardStopped {
                shard: self.id,
                reason: f.to_string(),
            },
        }
    }

    /// Reads `key` at `level` and says what was served.
    pub async fn read(
        &self,
        key: &[u8],
        level: &ReadLevel,
    ) -> Result<(Option<VersionedValue>, ReadReceipt)> {
        #[cfg(feature = "planted-bugs")]
        if let Some(planted) = self.planted_read(key, level) {
            return planted;
        }
        match level {
            ReadLevel::Linearizable => self.linearizable(key).await,
            ReadLevel::Lease => match self.confirm_lease().await {
                Ok(()) => self.local(key, ServedLevel::Lease, Staleness::Zero),
                // This leader's lease has lapsed (it was hibernating, or was just elected):
                // confirm leadership with a quorum round instead, which serves a
                // linearizable read (and the receipt says so).
                Err(Error::Unavailable { .. }) => self.linearizable(key).await,
                Err(e) => Err(e),
            },
            ReadLevel::Session(token) => {
                let required = token.required(self.id);
                if required > 0 {
                    let caught_up = self
                        .applied_at_least(required, self.session_wait, "session read")
                        .await;
                    match caught_up {
                        Ok(_) => {}
                        Err(WaitError::ShuttingDown) => return Err(Error::Shutdown),
                        Err(WaitError::Timeout(..)) => {
                            let applied = self.applied_index()?;
                            return Err(Error::Unavailable {
                                shard: self.id,
                                reason: format!(
                                    "this replica has applied up to {applied}, the session needs {required}"
                                ),
                            });
                        }
                    }
                }
                let staleness = self.proven_staleness()?;
                self.local(key, ServedLevel::Session, staleness)
            }
            ReadLevel::Bounded {
                max_staleness,
                fallback,
            } => {
                let applied = self.applied_index()?;
                if let Some(age) = self.freshness.staleness(applied)
                    && age <= *max_staleness
                {
                    return self.local(key, ServedLevel::Bounded, Staleness::AtMost(age));
                }
                if self.confirm_lease().await.is_ok() {
                    return self.local(
                        key,
                        ServedLevel::Bounded,
                        Staleness::AtMost(Duration::ZERO),
                    );
                }
                match fallback {
                    Fallback::Linearizable => self.linearizable(key).await,
                    // Try to prove the bound within the bound itself; never serve beyond it.
                    Fallback::Fail => match self.prove_fresh(*max_staleness).await {
                        // The age as of now (the proof keeps ageing while we read).
                        Some(_) => {
                            let staleness = self.proven_staleness()?;
                            self.local(key, ServedLevel::Bounded, staleness)
                        }
                        None => Err(Error::Unavailable {
                            shard: self.id,
                            reason: match self.freshness.staleness(applied) {
                                Some(age) => format!(
                                    "cannot prove staleness within {max_staleness:?}: last proof is {age:?} old"
                                ),
                                None => format!(
                                    "cannot prove staleness within {max_staleness:?}: no recent contact with a leader"
                                ),
                            },
                        }),
                    },
                }
            }
            ReadLevel::Eventual => {
                let staleness = self.proven_staleness()?;
                self.local(key, ServedLevel::Eventual, staleness)
            }
        }
    }

    /// A linearizable read served here: a read index from the leader (this replica, or the
    /// leader over the peer transport), then local state once it is applied that far.
    async fn linearizable(&self, key: &[u8]) -> Result<(Option<VersionedValue>, ReadReceipt)> {
        // The whole read, rounds and apply wait included, is bounded by the request timeout.
        let proven = tokio::time::timeout(self.timeout, async {
            let index = self.read_index().await?;
            self.applied_at_least(index, self.timeout, "linearizable read")
                .await
                .map_err(|e| self.wait_error(e, "waiting to apply the read index", false))
        })
        .await;
        match proven {
            Err(_) => Err(Error::Unavailable {
                shard: self.id,
                reason: format!(
                    "no read index confirmed by a quorum within {} ms",
                    self.timeout.as_millis()
                ),
            }),
            Ok(Err(e)) => Err(e),
            Ok(Ok(_)) => self.local(key, ServedLevel::Linearizable, Staleness::Zero),
        }
    }

    /// Runs one read-index round and waits to apply it, all within `budget`; returns the age of
    /// the proof obtained (at most `budget`), or `None` if it could not be had in time.
    async fn prove_fresh(&self, budget: Duration) -> Option<Duration> {
        let started = BootInstant::now();
        let proven = tokio::time::timeout(budget, async {
            let index = self.read_index().await.ok()?;
            self.applied_at_least(index, budget, "bounded read proof")
                .await
                .ok()
        })
        .await;
        match proven {
            Ok(Some(_)) if started.elapsed() <= budget => Some(started.elapsed()),
            _ => None,
        }
    }

    /// A read index for this shard from wherever the leader is; records the freshness it proves.
    /// The leader is addressed by node (a `NotLeader` hint from the asked node is a node id
    /// too), and the request names the replica this replica's membership places there.
    pub async fn read_index(&self) -> Result<u64> {
        let started = BootInstant::now();
        let mut leader = self.leader_node();
        for _ in 0..2 {
            let result = match leader {
                Some(l) if l == self.node_id => self.leader_read_index().await,
                Some(l) => match &self.peers {
                    Some(peers) => peers.read_index(l, self.replica_on(l), self.id).await,
                    None => Err(Error::Unavailable {
                        shard: self.id,
                        reason: "no peer transport".into(),
                    }),
                },
                None => Err(Error::Unavailable {
                    shard: self.id,
                    reason: "no leader known".into(),
                }),
            };
            match result {
                Ok(index) => {
                    self.freshness.record(started, index);
                    return Ok(index);
                }
                // The leader moved: ask the one it names, once.
                Err(Error::NotLeader {
                    leader_hint: Some(next),
                    ..
                }) if Some(next) != leader => leader = Some(next),
                Err(e) => return Err(e),
            }
        }
        Err(Error::Unavailable {
            shard: self.id,
            reason: "the leader kept moving".into(),
        })
    }

    /// A read index obtained as the leader: a node-level leadership check (see
    /// [`crate::leadership`]), or openraft's quorum round if that cannot confirm.
    pub async fn leader_read_index(&self) -> Result<u64> {
        let started = BootInstant::now();
        self.note_activity();
        let index = match self.confirmed_read_index().await {
            Some(index) => index,
            None => self.raft_read_index().await?,
        };
        self.freshness.record(started, index);
        Ok(index)
    }

    /// A read index without a round through openraft's core (see [`crate::leadership`] §1):
    /// captured now, at the read's start, as the larger of the last index whose apply started
    /// here and the highest commit index sent to a peer, and returned if a node-level
    /// leadership check confirms (in a round that starts after this call) that this replica
    /// still leads the term of an applied entry it proposed. `None` sends the caller to
    /// openraft's round: not leading right now (e.g. restarted with its old vote, which peers
    /// still hold), just elected (nothing of this term applied yet), a joint membership, or no
    /// majority confirmed.
    async fn confirmed_read_index(&self) -> Option<u64> {
        // The term of an applied entry this replica proposed.
        let position = self.reader.applied_position();
        if position.leader != self.replica {
            return None;
        }
        // The voters, each with the node hosting it (a voter whose node is unknown sends the
        // read to openraft's round).
        let voters: Vec<Voter> = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow_watched();
            // Leading right now, in that term, with a vote a quorum granted: a replica
            // restarted with its old vote starts as a follower and stays one until it wins a
            // new election, even while its peers still hold the old vote.
            if m.state != openraft::ServerState::Leader
                || !m.vote.committed
                || m.vote.leader_id.node_id != self.replica
                || m.vote.leader_id.term != position.term
            {
                return None;
            }
            match m
                .membership_config
                .membership()
                .get_joint_config()
                .as_slice()
            {
                [voters] => voters
                    .iter()
                    .map(|&replica| {
                        let node = node_in(self.id, &m, replica)?;
                        Some(Voter { replica, node })
                    })
                    .collect::<Option<_>>()?,
                _ => return None,
            }
        };
        // And the stored vote (the one peers are asked about) still ours of that term.
        if !voters.iter().any(|v| v.replica == self.replica)
            || !self.log.holds_vote_for(position.term, self.replica)
        {
            return None;
        }
        let index = self.captured_read_index(position.index);
        let need = voters.len() / 2; // a majority, less this replica's own vote
        let others = voters
            .into_iter()
            .filter(|v| v.replica != self.replica)
            .collect();
        match self
            .checks
            .confirm(self.id, position.term, others, need)
            .await
        {
            Outcome::Confirmed => Some(index),
            Outcome::Refused | Outcome::NoQuorum => None,
        }
    }

    /// The read index captured at a leader's read start: at or above every write that any
    /// replica may have made visible, so far (see [`crate::leadership`] §1). `applied` is the
    /// applied index the caller checked the term of.
    fn captured_read_index(&self, applied: u64) -> u64 {
        let index = applied
            .max(self.reader.apply_started())
            .max(self.horizon.get());
        #[cfg(feature = "planted-bugs")]
        if let Some(planted) = self.planted_read_index(applied, index) {
            return planted;
        }
        index
    }

    /// Test builds: the hook that holds this replica's applies (see
    /// [`crate::raft::apply_stall`]).
    #[cfg(feature = "planted-bugs")]
    #[doc(hidden)]
    pub fn apply_stall(&self) -> Arc<crate::raft::apply_stall::ApplyStall> {
        Arc::clone(&self.stall)
    }

    /// True if this replica's stored vote is for a leader of `term` hosted on node `leader`
    /// (a peer's leadership check, see [`crate::leadership`]: the sender is known by its
    /// node). The vote names a replica id; the group's membership maps it to its node.
    pub fn holds_vote_for(&self, term: u64, leader: u64) -> bool {
        #[cfg(feature = "planted-bugs")]
        if let Some(planted) = self.planted_holds_vote_for(term, leader) {
            return planted;
        }
        let Ok(Some(vote)) = self.log.vote() else {
            return false;
        };
        if vote.leader_id.term != term {
            return false;
        }
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        node_in(self.id, &m, vote.leader_id.node_id) == Some(leader)
    }

    /// A read index from openraft's `ReadIndex` linearizer: a quorum round through the group's
    /// core, coalesced with concurrent callers.
    async fn raft_read_index(&self) -> Result<u64> {
        let raft = self.raft.clone();
        let timeout = self.timeout;
        let shard = self.id;
        self.rounds
            .read_index(move || {
                let raft = raft.clone();
                async move {
                    match tokio::time::timeout(
                        timeout,
                        raft.get_read_linearizer(ReadPolicy::ReadIndex),
                    )
                    .await
                    {
                        Err(_) => Err(RoundError::Unavailable("read-index round timed out".into())),
                        Ok(Ok(linearizer)) => Ok(linearizer.read_log_id().index()),
                        Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f)))) => {
                            Err(RoundError::NotLeader(leader_hint(shard, &raft, &f)))
                        }
                        Ok(Err(e)) => Err(RoundError::Unavailable(e.to_string())),
                    }
                }
            })
            .await
            .map_err(|e| e.into_error(self.id))
    }

    /// Read-index rounds this replica has run as leader (coalescing makes this smaller than
    /// the number of linearizable reads).
    pub fn read_index_rounds(&self) -> u64 {
        self.rounds.started()
    }

    fn applied_index(&self) -> Result<u64> {
        self.reader
            .applied_index()
            .map_err(|e| io_to_error(self.id, e))
    }

    /// The staleness bound this replica can prove for its current state, if any.
    fn proven_staleness(&self) -> Result<Staleness> {
        let applied = self.applied_index()?;
        Ok(self
            .freshness
            .staleness(applied)
            .map_or(Staleness::Unknown, Staleness::AtMost))
    }

    /// Reads local state. The receipt's index is the one the served value is current as of:
    /// the applied index, or the key's own last write if that is later (an apply in
    /// progress), so a session token built from it never lets a later read go back in time.
    fn local(
        &self,
        key: &[u8],
        level: ServedLevel,
        staleness: Staleness,
    ) -> Result<(Option<VersionedValue>, ReadReceipt)> {
        let (value, applied_index) = self
            .reader
            .get_as_of(key)
            .map_err(|e| io_to_error(self.id, e))?;
        Ok((
            value,
            ReadReceipt {
                level,
                node: self.node_id,
                shard: self.id,
                applied_index,
                staleness,
            },
        ))
    }

    /// Confirms this replica leads the shard within its lease, as openraft reckons it and,
    /// stricter, with kvnode's margin for clock drift and any suspend of the machine counted
    /// (see [`crate::clock`]); `Unavailable` when the lease does not hold (the caller then
    /// runs a quorum round instead).
    async fn confirm_lease(&self) -> Result<()> {
        self.confirm_leadership(ReadPolicy::LeaseRead).await?;
        let acked = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow_watched();
            if m.membership_config.voter_ids().nth(1).is_none() {
                // The only voter: no other node can elect a leader, whatever the clocks do.
                return Ok(());
            }
            // openraft's instant as a std one, rounded 1 ms earlier (older is conservative).
            m.last_quorum_acked.as_ref().and_then(|acked| {
                let age = openraft::Instant::elapsed(&**acked) + Duration::from_millis(1);
                std::time::Instant::now().checked_sub(age)
            })
        };
        let (lease, margin) = self.lease;
        match acked {
            Some(acked) if crate::clock::lease_holds(acked, lease, margin) => Ok(()),
            _ => Err(Error::Unavailable {
                shard: self.id,
                reason: "the lease does not hold with the clock-drift margin".into(),
            }),
        }
    }

    /// Confirms this replica leads the shard (read index or lease) and has applied up to the
    /// read point.
    async fn confirm_leadership(&self, policy: ReadPolicy) -> Result<()> {
        self.note_activity();
        let confirmed =
            tokio::time::timeout(self.timeout, self.raft.ensure_linearizable(policy)).await;
        match confirmed {
            Err(_) => Err(self.timeout_error("linearizable read", false)),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f)))) => {
                Err(Error::NotLeader {
                    shard: self.id,
                    leader_hint: self.forward_hint(&f),
                })
            }
            Ok(Err(RaftError::APIError(LinearizableReadError::QuorumNotEnough(q)))) => {
                Err(Error::Unavailable {
                    shard: self.id,
                    reason: q.to_string(),
                })
            }
            Ok(Err(RaftError::Fatal(f))) => Err(Error::ShardStopped {
                shard: self.id,
                reason: f.to_string(),
            }),
        }
    }

    fn timeout_error(&self, operation: &'static str, write: bool) -> Error {
        Error::Timeout {
            shard: self.id,
            operation,
            millis: self.timeout.as_millis() as u64,
            write,
        }
    }

    /// Waits until local state has applied `index`, at most `timeout`. Checks the state
    /// machine's own published index first (openraft's metrics, which the wait watches, are
    /// updated after it), so a read whose index is already applied does not wait at all.
    async fn applied_at_least(
        &self,
        index: u64,
        timeout: Duration,
        what: &'static str,
    ) -> std::result::Result<(), WaitError> {
        if self
            .reader
            .applied_index()
            .is_ok_and(|applied| applied >= index)
        {
            return Ok(());
        }
        self.raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), what)
            .await
            .map(|_| ())
    }

    fn wait_error(&self, e: WaitError, operation: &'static str, write: bool) -> Error {
        match e {
            WaitError::Timeout(..) => self.timeout_error(operation, write),
            WaitError::ShuttingDown => Error::Shutdown,
        }
    }

    /// Stops the shard's Raft group.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(shard = self.id, error = %e, "shard did not shut down cleanly");
        }
    }
}

// ---- Planted bugs (test builds only: the `planted-bugs` feature) --------------------------
// Each hook returns None unless `crate::planted::active()` names its bug and its condition
// holds; then the normal path above is skipped. Without the feature none of this is compiled.
#[cfg(feature = "planted-bugs")]
impl Shard {
    /// How long the `ack-uncommitted` bug lets a write try to commit before acknowledging it.
    const PLANTED_ACK_AFTER: Duration = Duration::from_millis(50);

    /// Whether this replica believes it leads the shard (openraft's metrics, no round trip).
    fn planted_believes_leader(&self) -> bool {
        self.raft.metrics().borrow_watched().current_leader == Some(self.replica)
    }

    /// `follower-local-read`: a linearizable read on a non-leader serves local state at once.
    /// `leader-no-confirm`: a linearizable or lease read on a replica that believes it leads
    /// serves local state with no quorum round and no lease check.
    ///
    /// Either reports itself exercised when it serves out of touch for longer than the lease
    /// (`lease_renew_after`): a follower that heard nothing from its leader's node (it may be
    /// cut off, and behind), an awake leader with no quorum acknowledgement (a newer leader
    /// may have been elected). A hibernating leader's lease lapses by design, so it does not
    /// count.
    fn planted_read(
        &self,
        key: &[u8],
        level: &ReadLevel,
    ) -> Option<Result<(Option<VersionedValue>, ReadReceipt)>> {
        use crate::planted::Bug;
        let bug = crate::planted::active()?;
        let served = match (bug, level) {
            (Bug::FollowerLocalRead, ReadLevel::Linearizable)
                if !self.planted_believes_leader() =>
            {
                ServedLevel::Linearizable
            }
            (Bug::LeaderNoConfirm, ReadLevel::Linearizable) if self.planted_believes_leader() => {
                ServedLevel::Linearizable
            }
            (Bug::LeaderNoConfirm, ReadLevel::Lease) if self.planted_believes_leader() => {
                ServedLevel::Lease
            }
            _ => return None,
        };
        let out_of_touch = if bug == Bug::FollowerLocalRead {
            let leader = self.leader_node();
            let heard = leader.and_then(|l| self.peers.as_ref()?.heard_from(l));
            heard.is_none_or(|t| t.elapsed() > self.lease_renew_after)
        } else {
            let acked = self.raft.metrics().borrow_watched().last_quorum_acked;
            !self.activity.is_hibernating()
                && acked.is_none_or(|t| openraft::Instant::elapsed(&*t) > self.lease_renew_after)
        };
        let read = self.local(key, served, Staleness::Zero);
        if out_of_touch && let Ok((_, receipt)) = &read {
            crate::planted::fired(
                bug,
                format_args!(
                    "shard {} served a {level:?} read at applied index {} out of touch for over {} ms",
                    self.id,
                    receipt.applied_index,
                    self.lease_renew_after.as_millis()
                ),
            );
        }
        Some(read)
    }

    /// `read-index-applied`: a leader's node-level read index is its applied index alone.
    /// Exercised when that is below `correct`, the index the correct code captures (a
    /// follower may already show entries this read will not).
    fn planted_read_index(&self, applied: u64, correct: u64) -> Option<u64> {
        if crate::planted::active()? != crate::planted::Bug::ReadIndexApplied {
            return None;
        }
        if applied < correct {
            crate::planted::fired(
                crate::planted::Bug::ReadIndexApplied,
                format_args!(
                    "shard {} read index {applied} instead of {correct}",
                    self.id
                ),
            );
        }
        Some(applied)
    }

    /// `confirm-any-vote`: every leadership check is answered yes. Exercised when the stored
    /// vote says no.
    fn planted_holds_vote_for(&self, term: u64, leader: u64) -> Option<bool> {
        if crate::planted::active()? != crate::planted::Bug::ConfirmAnyVote {
            return None;
        }
        if !self.log.holds_vote_for(term, leader) {
            crate::planted::fired(
                crate::planted::Bug::ConfirmAnyVote,
                format_args!(
                    "shard {} confirmed leader {leader} of term {term} against its stored vote",
                    self.id
                ),
            );
        }
        Some(true)
    }

    /// The apply-lag driver's handle on this replica (see [`crate::raft::apply_stall`]).
    pub(crate) fn lag_target(&self) -> crate::raft::apply_stall::LagTarget {
        crate::raft::apply_stall::LagTarget {
            shard: self.id,
            stall: Arc::downgrade(&self.stall),
            metrics: self.raft.metrics(),
        }
    }

    /// `ack-uncommitted`: on a replica that believes it leads, proposes `command` in the
    /// background and, if it has not committed within [`Self::PLANTED_ACK_AFTER`], acknowledges
    /// it anyway with the result it would have had (a CAS pretends it applied) and a guessed
    /// index. A write that finishes in time returns its real outcome; a non-leader takes the
    /// normal path (and answers `NotLeader`, so forwarding still works). An early
    /// acknowledgement is watched to its end: if this leader then fails to commit it (it was
    /// deposed, the entry discarded) the bug reports itself exercised.
    async fn planted_write(&self, command: &Command) -> Option<Result<(CommandResult, u64)>> {
        if crate::planted::active()? != crate::planted::Bug::AckUncommitted
            || !self.planted_believes_leader()
        {
            return None;
        }
        let last_log_index = self.raft.metrics().borrow_watched().last_log_index;
        let raft = self.raft.clone();
        let proposed = command.clone();
        // No deadline: the outcome must be known for the report (openraft answers every
        // proposal once it is applied or its leader steps down).
        let mut write = tokio::spawn(async move { raft.client_write(proposed).await });
        Some(
            match tokio::time::timeout(Self::PLANTED_ACK_AFTER, &mut write).await {
                Ok(Ok(Ok(reply))) => Ok((reply.data, reply.log_id.index())),
                Ok(Ok(Err(e))) => Err(self.write_error(e)),
                Ok(Err(join)) => Err(Error::ShardStopped {
                    shard: self.id,
                    reason: format!("planted write task failed: {join}"),
                }),
                // Not committed yet: acknowledge it anyway (the task keeps proposing).
                Err(_) => {
                    let result = match command {
                        Command::Put { .. } => CommandResult::Put,
                        Command::Delete { key } => CommandResult::Delete {
                            existed: matches!(self.reader.get(key), Ok(Some(_))),
                        },
                        Command::CompareAndSet { .. } => CommandResult::CasApplied,
                        Command::Meta(_) => CommandResult::NoOp,
                    };
                    let index = last_log_index.map_or(1, |i| i + 1);
                    tracing::debug!(shard = self.id, %command, index, "planted: acked uncommitted");
                    let shard = self.id;
                    tokio::spawn(async move {
                        if let Ok(Err(e)) = write.await {
                            crate::planted::fired(
                                crate::planted::Bug::AckUncommitted,
                                format_args!(
                                    "shard {shard} acknowledged a write as index {index}, then \
                                     did not commit it: {e}"
                                ),
                            );
                        }
                    });
                    Ok((result, index))
                }
            },
        )
    }
}

/// `membership` (at `log_id`) as kvnode's [`GroupMembership`]: replica → node through each
/// replica's entry (a replica whose entry names no node is reported on the node of its id).
fn group_membership(
    shard: u64,
    membership: &openraft::Membership<u64, BasicNode>,
    log_id: Option<crate::raft::LogId>,
) -> GroupMembership {
    let node = |replica: u64| {
        membership
            .get_node(&replica)
            .and_then(|entry| entry_node(shard, replica, entry))
            .unwrap_or(replica)
    };
    GroupMembership {
        voters: membership
            .get_joint_config()
            .iter()
            .map(|set| set.iter().map(|r| (*r, node(*r))).collect())
            .collect(),
        learners: membership.learner_ids().map(|r| (r, node(r))).collect(),
        log_id: MembershipLogId(log_id),
    }
}

/// The node hosting `replica` of `shard`'s group, through the membership in `m`. `None` if the
/// membership does not list it, or its entry names no node (logged: a membership written by
/// a newer build, or damaged).
fn node_in(shard: u64, m: &openraft::RaftMetrics<TypeConfig>, replica: u64) -> Option<u64> {
    let entry = m.membership_config.membership().get_node(&replica)?;
    entry_node(shard, replica, entry)
}

/// The node a membership entry names, or `None` (logged) if it names none.
fn entry_node(shard: u64, replica: u64, entry: &BasicNode) -> Option<u64> {
    node_of(replica, entry)
        .inspect_err(|e| tracing::warn!(shard, error = %e, "a replica's node is unknown"))
        .ok()
}

/// The node of the leader named by `f`: from its membership entry if openraft sent it, else
/// through the group's current membership.
fn leader_hint(shard: u64, raft: &ShardRaft, f: &ForwardToLeader<TypeConfig>) -> Option<u64> {
    let leader = f.leader_id?;
    match &f.leader_node {
        Some(entry) => entry_node(shard, leader, entry),
        None => node_in(shard, &raft.metrics().borrow_watched(), leader),
    }
}

/// Maps a storage-layer `io::Error` (which carries our storage error as its source) back to
/// the public error.
fn io_to_error(shard: u64, e: std::io::Error) -> Error {
    match e.downcast::<crate::storage::Error>() {
        Ok(storage) => Error::Storage(storage.into()),
        Err(other) => Error::ShardStopped {
            shard,
            reason: other.to_string(),
        },
    }
}
