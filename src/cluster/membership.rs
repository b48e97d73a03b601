//! The cluster map: which nodes exist, and which replicas of which shards they hold. This file
//! owns [`ClusterMap`], the [`MetaChange`]s that change it and [`ClusterMap::apply`], the only
//! code that changes it (docs/design/membership.md §1.1).
//!
//! **What the map is.** One value per cluster: its identity (`cluster_uuid`, `name`), the
//! fixed sharding parameters, every node that ever joined with its address, state and
//! placement key, and for every shard (the META group's own entry included) its voters as last
//! confirmed, at most one pending [`Move`] and the replicas that moved away. `epoch` counts the
//! applied changes; `next_id` is the one counter node, replica and move ids come from.
//!
//! **Why a Raft group of its own.** The map is replicated by the META group (shard id
//! [`META`], milestone M2), not by any data shard and not by gossip: every node must agree on
//! one history of memberships, a move's intent must be durable before any shard group is
//! touched, and a META leader change mid-move must find that intent. Keeping it apart from the
//! data shards means a membership change never waits behind (or stalls) data traffic, and data
//! traffic continues on cached maps while META is unavailable. This file is pure: no I/O, no
//! Raft, no clock, so `apply` is deterministic and every replica of META reaches the same map.
//!
//! **Invariants** (checked by [`ClusterMap::check_invariants`] and the model proptest below):
//! - `apply` either applies the whole change and bumps `epoch` by exactly 1, or refuses it with
//!   a [`MetaRejected`] and leaves the map untouched (byte for byte). It never panics.
//! - Every node, replica and move id comes from `next_id`, which only grows, so no id is ever
//!   reused. (The one exception is made at seeding: a replica that predates the map keeps
//!   replica id = node id, design D3; within one shard, replica ids are still distinct.)
//! - A shard has at most one pending move (`ShardEntry::pending` is an `Option`, and
//!   `StartMove` is refused while one is pending).
//! - `placement_key` and `addr` are unique among nodes that are not `Removed`.
//! - A node becomes `Removed` only when it holds no voter (META included) and is not the `add`
//!   of a pending move; a voter or pending add never lives on a `Removed` node.
//! - After seeding, at least one node is `Active`.
//!
//! **Splits later** (§1.5). A split is one more change kind, `SplitShard { shard, new_shard,
//! points }`: it adds a child [`ShardEntry`] that starts with the parent's voters and bumps the
//! parent's `version`. Nothing else here changes; its place in [`MetaChange`] and in
//! [`ClusterMap::apply`] is marked.
//!
//! Where the design leaves a choice open, the doc comment of the change kind says what was
//! chosen and why (mostly: what etcd's membership API or TiKV's PD would do).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

pub use super::NodeId;
use crate::sharding::ShardId;

/// One incarnation of one shard on one node: the shard group's Raft id (design D3).
pub type ReplicaId = u64;

/// The META group's reserved shard id (design D1).
pub const META: ShardId = ShardId::MAX;

/// The cluster's metadata: nodes, shards and their replicas. Changed only by
/// [`ClusterMap::apply`]. [`ClusterMap::default`] is the unseeded map (epoch 0), which accepts
/// only [`MetaChange::Seed`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    /// Made at seeding; tells two clusters of the same name apart.
    pub cluster_uuid: u128,
    /// The cluster's name (today's `cluster_id`).
    pub name: String,
    /// The number of applied changes: +1 on every one, the seed included (so a seeded map's
    /// epoch is at least 1 and 0 means "no map").
    pub epoch: u64,
    /// The next node, replica or move id; only ever grows.
    pub next_id: u64,
    /// The number of data shards (fixed at creation).
    pub shard_count: u32,
    /// Virtual points per shard on the hash ring.
    pub points_per_shard: u32,
    /// The number of voters a data shard should have.
    pub replication_factor: u8,
    /// Every node that ever joined, `Removed` ones included (their ids are never reused).
    pub nodes: BTreeMap<NodeId, NodeEntry>,
    /// Every shard, META's own entry ([`META`]) included.
    pub shards: BTreeMap<ShardId, ShardEntry>,
}

/// One node (a `kvnode` process).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    /// Its peer address (`host:port`).
    pub addr: String,
    /// Where it is in its life cycle.
    pub state: NodeState,
    /// What placement ranks it by: its own id, or the key of the node it replaced (D4).
    pub placement_key: u64,
    /// The epoch at which it entered `state`.
    pub since_epoch: u64,
}

/// A node's life cycle: `Joining → Active → Draining → Removed`. A node that holds nothing
/// may be removed from any state (an orphan Joining node, say), except the last Active one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Registered (`AddNode`), not yet a placement target.
    Joining,
    /// A placement target.
    Active,
    /// Leaving: out of the placement set, its replicas move away. `dead` moves them first.
    Draining {
        /// The node is presumed dead (replaced, or declared so by the operator).
        dead: bool,
    },
    /// Gone for good; its id is never reused.
    Removed,
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeState::Joining => f.write_str("Joining"),
            NodeState::Active => f.write_str("Active"),
            NodeState::Draining { dead: false } => f.write_str("Draining"),
            NodeState::Draining { dead: true } => f.write_str("Draining (dead)"),
            NodeState::Removed => f.write_str("Removed"),
        }
    }
}

/// One replica of a shard: its Raft id and the node that hosts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Replica {
    /// The shard group's Raft id for this replica.
    pub id: ReplicaId,
    /// The node that hosts it.
    pub node: NodeId,
}

/// One shard's replicas.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// +1 whenever `voters` changes.
    pub conf_ver: u64,
    /// +1 whenever the shard's key range changes (always 1 until splits exist).
    pub version: u64,
    /// The group's uniform membership as last confirmed, sorted by replica id.
    pub voters: Vec<Replica>,
    /// The one move in progress, if any.
    pub pending: Option<Move>,
    /// Replicas that moved away (or an aborted move's learner); their nodes delete them after a
    /// grace period, then `ForgetRetired` drops them here.
    pub retired: Vec<Replica>,
}

/// A replica move: add one replica, remove one voter, or both (design D6).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    /// From `next_id`; names the move in `FinishMove` / `AbortMove`.
    pub id: u64,
    /// The new replica (a fresh replica id on an Active node).
    pub add: Option<Replica>,
    /// The voter that leaves.
    pub remove: Option<Replica>,
    /// Why the rebalancer started it.
    pub reason: MoveReason,
}

/// Why a move was started, in the rebalancer's priority order (§3.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MoveReason {
    /// The removed replica's node is dead (replace, or a dead drain): under-replicated.
    Dead,
    /// The removed replica's node is draining.
    Drain,
    /// The shard grows toward its replication factor.
    Grow,
    /// Balance: placement over the Active nodes puts the replica elsewhere.
    Balance,
}

/// A change to the map: the META group's command (M2 puts it in `raft::Command::Meta`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaChange {
    /// The first entry only: install `map` (its `epoch` must be 0; it becomes 1, and so does
    /// every node's `since_epoch`; voters are sorted by replica id). Its shards must be
    /// `0..shard_count` and [`META`], every node Active, every shard's `conf_ver` and `version`
    /// 1 with no pending move and no retired replica, and [`ClusterMap::check_invariants`]
    /// must hold. A second `Seed` (two initializers racing) is refused, so the first one wins.
    Seed(ClusterMap),
    /// Registers a node at `addr`: id = `next_id`, `Joining`, `placement_key` = its id. An
    /// `addr` already used by a node that is not Removed is refused, as etcd refuses a
    /// duplicate peer URL and PD a duplicate store address.
    AddNode {
        /// The new node's peer address.
        addr: String,
    },
    /// `Joining → Active` (once it answers pings).
    ActivateNode {
        /// The node.
        id: NodeId,
    },
    /// `Active → Draining { dead }`, or flips the `dead` flag of a Draining node (a draining
    /// node that died, or a "dead" one that came back). Draining the last Active node is
    /// refused. A Joining node holds nothing: remove it instead.
    DrainNode {
        /// The node.
        id: NodeId,
        /// Whether it is presumed dead.
        dead: bool,
    },
    /// `replace DEAD NEW` (§3.4): NEW (still Joining, not already a replacement) takes DEAD's
    /// `placement_key`, and DEAD (Active or Draining) becomes `Draining { dead: true }`. The
    /// two keys are **swapped**, so keys stay unique among live nodes without allocating one:
    /// DEAD is out of the placement set, so its key no longer matters. If NEW is removed
    /// before it is activated (a failed replace), `RemoveNode` swaps the keys back, so a
    /// second replace of DEAD still inherits DEAD's original replicas.
    ReplaceNode {
        /// The node being replaced.
        dead: NodeId,
        /// Its replacement.
        new: NodeId,
    },
    /// `→ Removed`, only when the node holds nothing: no voter of any shard (META included)
    /// and no pending add. Allowed from any other state (an orphan Joining node, an Active node
    /// that never received a replica, a drained node), except for the last Active node.
    RemoveNode {
        /// The node.
        id: NodeId,
    },
    /// Changes a live node's address (never through Raft's `SetNodes`, §2). Setting the same
    /// address is refused, so every epoch is a real change.
    SetAddr {
        /// The node.
        id: NodeId,
        /// Its new address.
        addr: String,
    },
    /// Starts a move on `shard` (none may be pending): `add` (an Active node that holds no
    /// voter of the shard) gets a fresh replica id, `remove` names a voter. At least one of the
    /// two; a remove-only move may not remove the last voter. The move id and then the replica
    /// id are taken from `next_id`.
    StartMove {
        /// The shard.
        shard: ShardId,
        /// The node that receives a new replica.
        add: Option<NodeId>,
        /// The voter that leaves.
        remove: Option<ReplicaId>,
        /// Why.
        reason: MoveReason,
    },
    /// The group reached its new uniform membership: `voters` (as observed, any order) must be
    /// exactly the old voters minus `remove` plus `add`, or the change is refused (the map and
    /// the group would disagree). `conf_ver += 1`; `remove` goes to `retired`.
    FinishMove {
        /// The shard.
        shard: ShardId,
        /// The pending move's id.
        move_id: u64,
        /// The observed uniform membership.
        voters: Vec<Replica>,
    },
    /// Drops the pending move; voters and `conf_ver` are unchanged. Its `add` replica (an empty
    /// learner at most, §3.5) goes to `retired` so its node deletes it; its id stays burnt.
    AbortMove {
        /// The shard.
        shard: ShardId,
        /// The pending move's id.
        move_id: u64,
        /// For the log (not stored in the map).
        why: String,
    },
    /// A node deleted a retired replica's data: drop it from `retired`.
    ForgetRetired {
        /// The shard.
        shard: ShardId,
        /// The retired replica.
        replica: ReplicaId,
    },
    // Later (§1.5): SplitShard { shard, new_shard, points } adds a child entry with the
    // parent's voters and bumps the parent's `version`; it goes here and in `apply`.
}

impl MetaChange {
    /// The change kind's name, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            MetaChange::Seed(_) => "Seed",
            MetaChange::AddNode { .. } => "AddNode",
            MetaChange::ActivateNode { .. } => "ActivateNode",
            MetaChange::DrainNode { .. } => "DrainNode",
            MetaChange::ReplaceNode { .. } => "ReplaceNode",
            MetaChange::RemoveNode { .. } => "RemoveNode",
            MetaChange::SetAddr { .. } => "SetAddr",
            MetaChange::StartMove { .. } => "StartMove",
            MetaChange::FinishMove { .. } => "FinishMove",
            MetaChange::AbortMove { .. } => "AbortMove",
            MetaChange::ForgetRetired { .. } => "ForgetRetired",
        }
    }
}

/// What an applied change did (the map's new `epoch` is on the map).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// The map was seeded.
    Seeded,
    /// A node was registered with this id.
    NodeAdded {
        /// Its id.
        id: NodeId,
    },
    /// The node is Active.
    NodeActivated {
        /// The node.
        id: NodeId,
    },
    /// The node is Draining.
    NodeDraining {
        /// The node.
        id: NodeId,
        /// Whether it is presumed dead.
        dead: bool,
    },
    /// NEW holds DEAD's former placement key; DEAD is Draining (dead).
    NodeReplaced {
        /// The replaced node.
        dead: NodeId,
        /// The replacement.
        new: NodeId,
        /// The key NEW inherited.
        placement_key: u64,
    },
    /// The node is Removed.
    NodeRemoved {
        /// The node.
        id: NodeId,
    },
    /// The node's address changed.
    AddrSet {
        /// The node.
        id: NodeId,
    },
    /// A move is pending.
    MoveStarted {
        /// The shard.
        shard: ShardId,
        /// The move's id.
        move_id: u64,
        /// The new replica, if the move adds one.
        add: Option<Replica>,
    },
    /// The move finished.
    MoveFinished {
        /// The shard.
        shard: ShardId,
        /// The shard's new `conf_ver`.
        conf_ver: u64,
    },
    /// The move was dropped.
    MoveAborted {
        /// The shard.
        shard: ShardId,
        /// The move's id.
        move_id: u64,
    },
    /// The retired replica was dropped.
    RetiredForgotten {
        /// The shard.
        shard: ShardId,
        /// The replica.
        replica: ReplicaId,
    },
}

/// Why [`ClusterMap::apply`] refused a change. The map is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MetaRejected {
    /// Only `Seed` can be applied to an unseeded map.
    #[error("{change} refused: the cluster map is not seeded yet (its first change must be Seed)")]
    NotSeeded {
        /// The refused change kind.
        change: &'static str,
    },
    /// The map was seeded already.
    #[error("Seed refused: the cluster map is already seeded (epoch {epoch})")]
    AlreadySeeded {
        /// The map's epoch.
        epoch: u64,
    },
    /// The seed map is not a valid first map.
    #[error("Seed refused: the seed map is invalid: {0}")]
    InvalidSeed(String),
    /// The change names a node the map does not know.
    #[error("{change} refused: node {id} is not in the cluster map")]
    UnknownNode {
        /// The refused change kind.
        change: &'static str,
        /// The node.
        id: NodeId,
    },
    /// The node is in a state the change does not apply to.
    #[error("{change} refused: node {id} is {state}, and {change} needs it {wanted}")]
    WrongNodeState {
        /// The refused change kind.
        change: &'static str,
        /// The node.
        id: NodeId,
        /// Its state.
        state: NodeState,
        /// What the change needs.
        wanted: &'static str,
    },
    /// An address was empty.
    #[error("{change} refused: the address is empty")]
    EmptyAddr {
        /// The refused change kind.
        change: &'static str,
    },
    /// Another live node has this address.
    #[error(
        "{change} refused: address {addr:?} already belongs to node {holder}, which is not Removed"
    )]
    AddrInUse {
        /// The refused change kind.
        change: &'static str,
        /// The address.
        addr: String,
        /// The node that has it.
        holder: NodeId,
    },
    /// `SetAddr` would not change anything.
    #[error("SetAddr refused: node {id}'s address is already {addr:?}")]
    SameAddr {
        /// The node.
        id: NodeId,
        /// Its address.
        addr: String,
    },
    /// The change would leave no Active node.
    #[error("{change} refused: node {id} is the last Active node, and a cluster needs one")]
    LastActiveNode {
        /// The refused change kind.
        change: &'static str,
        /// The node.
        id: NodeId,
    },
    /// `ReplaceNode` with DEAD = NEW.
    #[error("ReplaceNode refused: node {id} cannot replace itself")]
    ReplaceSelf {
        /// The node.
        id: NodeId,
    },
    /// NEW already inherited another node's placement key.
    #[error(
        "ReplaceNode refused: node {new} already replaces another node (it holds placement key {placement_key}, not its own id)"
    )]
    AlreadyReplacing {
        /// The replacement.
        new: NodeId,
        /// The key it holds.
        placement_key: u64,
    },
    /// DEAD is already being replaced by a node that is still Joining.
    #[error(
        "ReplaceNode refused: node {dead} is already being replaced by node {by}, which is still Joining"
    )]
    AlreadyReplaced {
        /// The replaced node.
        dead: NodeId,
        /// Its Joining replacement.
        by: NodeId,
    },
    /// `RemoveNode` of a node that still holds a voter or a pending add.
    #[error("RemoveNode refused: node {id} still holds {what} {replica} of shard {shard}")]
    NodeNotEmpty {
        /// The node.
        id: NodeId,
        /// The shard.
        shard: ShardId,
        /// The replica it holds.
        replica: ReplicaId,
        /// "voter replica" or "pending add replica".
        what: &'static str,
    },
    /// The change names a shard the map does not know.
    #[error("{change} refused: shard {shard} is not in the cluster map")]
    UnknownShard {
        /// The refused change kind.
        change: &'static str,
        /// The shard.
        shard: ShardId,
    },
    /// `StartMove` while a move is pending.
    #[error(
        "StartMove refused: shard {shard} already has move {pending} pending (at most one per shard)"
    )]
    MoveInProgress {
        /// The shard.
        shard: ShardId,
        /// The pending move's id.
        pending: u64,
    },
    /// `StartMove` with neither `add` nor `remove`.
    #[error("StartMove refused: a move on shard {shard} must add or remove a replica")]
    EmptyMove {
        /// The shard.
        shard: ShardId,
    },
    /// `StartMove`'s `add` node already holds a voter of the shard.
    #[error(
        "StartMove refused: node {node} already holds voter replica {replica} of shard {shard}"
    )]
    AlreadyAVoter {
        /// The shard.
        shard: ShardId,
        /// The node.
        node: NodeId,
        /// Its voter replica.
        replica: ReplicaId,
    },
    /// `StartMove`'s `remove` is not a voter of the shard.
    #[error("StartMove refused: replica {replica} is not a voter of shard {shard}")]
    NotAVoter {
        /// The shard.
        shard: ShardId,
        /// The replica.
        replica: ReplicaId,
    },
    /// A remove-only move of the shard's only voter.
    #[error(
        "StartMove refused: replica {replica} is the only voter of shard {shard}; add one first"
    )]
    LastVoter {
        /// The shard.
        shard: ShardId,
        /// The replica.
        replica: ReplicaId,
    },
    /// `FinishMove` / `AbortMove` of a move that is not the pending one.
    #[error(
        "{change} refused: move {move_id} is not pending on shard {shard} (pending: {pending:?})"
    )]
    NoSuchMove {
        /// The refused change kind.
        change: &'static str,
        /// The shard.
        shard: ShardId,
        /// The named move.
        move_id: u64,
        /// The pending move's id, if any.
        pending: Option<u64>,
    },
    /// `FinishMove`'s observed voters are not what the move leads to.
    #[error(
        "FinishMove refused: move {move_id} on shard {shard} leads to voters {expected:?}, but the observed voters are {observed:?}"
    )]
    VotersMismatch {
        /// The shard.
        shard: ShardId,
        /// The move.
        move_id: u64,
        /// The voters the move leads to.
        expected: Vec<Replica>,
        /// The voters the change carried.
        observed: Vec<Replica>,
    },
    /// `ForgetRetired` of a replica that is not retired.
    #[error("ForgetRetired refused: replica {replica} is not retired on shard {shard}")]
    NotRetired {
        /// The shard.
        shard: ShardId,
        /// The replica.
        replica: ReplicaId,
    },
    /// A counter would overflow (never in practice; refused rather than wrapped).
    #[error("{change} refused: the {counter} counter is exhausted")]
    Exhausted {
        /// The refused change kind.
        change: &'static str,
        /// "epoch", "id" or "conf_ver".
        counter: &'static str,
    },
}

impl ClusterMap {
    /// Applies `change`: all of it, with `epoch + 1`, or none of it. Deterministic; never
    /// panics. Validation is done on `self` before anything is written, and the change is then
    /// applied to a copy that replaces `self`, so a refusal cannot leave half a change behind.
    ///
    /// # Errors
    ///
    /// [`MetaRejected`] says which rule the change broke; the map is unchanged.
    pub fn apply(&mut self, change: MetaChange) -> Result<Applied, MetaRejected> {
        let kind = change.kind();
        if let MetaChange::Seed(seed) = change {
            return self.seed(seed);
        }
        if self.epoch == 0 {
            return Err(MetaRejected::NotSeeded { change: kind });
        }
        let epoch = self.epoch.checked_add(1).ok_or(MetaRejected::Exhausted {
            change: kind,
            counter: "epoch",
        })?;
        // Every branch validates against `self` and writes only to `next`.
        let mut next = self.clone();
        next.epoch = epoch;
        let applied = match change {
            MetaChange::Seed(_) => unreachable!("handled above"),
            MetaChange::AddNode { addr } => {
                self.check_addr(kind, &addr, None)?;
                let id = next.take_id(kind)?;
                next.nodes.insert(
                    id,
                    NodeEntry {
                        addr,
                        state: NodeState::Joining,
                        placement_key: id,
                        since_epoch: epoch,
                    },
                );
                Applied::NodeAdded { id }
            }
            MetaChange::ActivateNode { id } => {
                let node = self.node(kind, id)?;
                if node.state != NodeState::Joining {
                    return Err(wrong_state(kind, id, node.state, "Joining"));
                }
                next.set_state(id, NodeState::Active);
                Applied::NodeActivated { id }
            }
            MetaChange::DrainNode { id, dead } => {
                let node = self.node(kind, id)?;
                match node.state {
                    NodeState::Active => self.check_not_last_active(kind, id)?,
                    NodeState::Draining { dead: was } if was != dead => {}
                    state => {
                        let wanted = if dead {
                            "Active or Draining (not dead)"
                        } else {
                            "Active or Draining (dead)"
                        };
                        return Err(wrong_state(kind, id, state, wanted));
                    }
                }
                next.set_state(id, NodeState::Draining { dead });
                Applied::NodeDraining { id, dead }
            }
            MetaChange::ReplaceNode { dead, new } => {
                if dead == new {
                    return Err(MetaRejected::ReplaceSelf { id: dead });
                }
                let dead_node = self.node(kind, dead)?;
                let new_node = self.node(kind, new)?;
                match dead_node.state {
                    NodeState::Active => self.check_not_last_active(kind, dead)?,
                    NodeState::Draining { .. } => {}
                    state => return Err(wrong_state(kind, dead, state, "Active or Draining")),
                }
                if new_node.state != NodeState::Joining {
                    return Err(wrong_state(kind, new, new_node.state, "Joining"));
                }
                // DEAD's key is a Joining node's id: that node is replacing DEAD already.
                let key = dead_node.placement_key;
                if key != dead
                    && self
                        .nodes
                        .get(&key)
                        .is_some_and(|n| n.state == NodeState::Joining)
                {
                    return Err(MetaRejected::AlreadyReplaced { dead, by: key });
                }
                if new_node.placement_key != new {
                    return Err(MetaRejected::AlreadyReplacing {
                        new,
                        placement_key: new_node.placement_key,
                    });
                }
                let (dead_key, new_key) = (dead_node.placement_key, new_node.placement_key);
                next.set_state(dead, NodeState::Draining { dead: true });
                next.nodes.get_mut(&dead).expect("checked").placement_key = new_key;
                next.nodes.get_mut(&new).expect("checked").placement_key = dead_key;
                Applied::NodeReplaced {
                    dead,
                    new,
                    placement_key: dead_key,
                }
            }
            MetaChange::RemoveNode { id } => {
                let node = self.node(kind, id)?;
                match node.state {
                    NodeState::Removed => {
                        return Err(wrong_state(kind, id, node.state, "not Removed"));
                    }
                    NodeState::Active => self.check_not_last_active(kind, id)?,
                    NodeState::Joining | NodeState::Draining { .. } => {}
                }
                if let Some((shard, replica, what)) = self.held_by(id) {
                    return Err(MetaRejected::NodeNotEmpty {
                        id,
                        shard,
                        replica,
                        what,
                    });
                }
                // A failed replace (NEW removed before activation): give DEAD its key back.
                if node.state == NodeState::Joining && node.placement_key != id {
                    let partner = self
                        .nodes
                        .iter()
                        .find(|(_, n)| n.state != NodeState::Removed && n.placement_key == id)
                        .map(|(&partner, _)| partner);
                    if let Some(partner) = partner {
                        next.nodes.get_mut(&partner).expect("found").placement_key =
                            node.placement_key;
                    }
                }
                next.set_state(id, NodeState::Removed);
                Applied::NodeRemoved { id }
            }
            MetaChange::SetAddr { id, addr } => {
                let node = self.node(kind, id)?;
                if node.state == NodeState::Removed {
                    return Err(wrong_state(kind, id, node.state, "not Removed"));
                }
                if node.addr == addr {
                    return Err(MetaRejected::SameAddr { id, addr });
                }
                self.check_addr(kind, &addr, Some(id))?;
                next.nodes.get_mut(&id).expect("checked").addr = addr;
                Applied::AddrSet { id }
            }
            MetaChange::StartMove {
                shard,
                add,
                remove,
                reason,
            } => {
                let entry = self.shard(kind, shard)?;
                if let Some(pending) = &entry.pending {
                    return Err(MetaRejected::MoveInProgress {
                        shard,
                        pending: pending.id,
                    });
                }
                if add.is_none() && remove.is_none() {
                    return Err(MetaRejected::EmptyMove { shard });
                }
                if let Some(node) = add {
                    let state = self.node(kind, node)?.state;
                    if state != NodeState::Active {
                        return Err(wrong_state(kind, node, state, "Active"));
                    }
                    if let Some(voter) = entry.voters.iter().find(|r| r.node == node) {
                        return Err(MetaRejected::AlreadyAVoter {
                            shard,
                            node,
                            replica: voter.id,
                        });
                    }
                }
                let remove = match remove {
                    None => None,
                    Some(replica) => {
                        let Some(voter) = entry.voters.iter().find(|r| r.id == replica) else {
                            return Err(MetaRejected::NotAVoter { shard, replica });
                        };
                        if add.is_none() && entry.voters.len() == 1 {
                            return Err(MetaRejected::LastVoter { shard, replica });
                        }
                        Some(*voter)
                    }
                };
                let move_id = next.take_id(kind)?;
                let add = match add {
                    None => None,
                    Some(node) => Some(Replica {
                        id: next.take_id(kind)?,
                        node,
                    }),
                };
                next.shards.get_mut(&shard).expect("checked").pending = Some(Move {
                    id: move_id,
                    add,
                    remove,
                    reason,
                });
                Applied::MoveStarted {
                    shard,
                    move_id,
                    add,
                }
            }
            MetaChange::FinishMove {
                shard,
                move_id,
                voters,
            } => {
                let entry = self.shard(kind, shard)?;
                let pending = pending_move(kind, shard, entry, move_id)?;
                let mut expected: Vec<Replica> = entry
                    .voters
                    .iter()
                    .copied()
                    .filter(|r| Some(*r) != pending.remove)
                    .chain(pending.add)
                    .collect();
                expected.sort_unstable();
                let mut observed = voters;
                observed.sort_unstable();
                if observed != expected {
                    return Err(MetaRejected::VotersMismatch {
                        shard,
                        move_id,
                        expected,
                        observed,
                    });
                }
                let conf_ver = entry
                    .conf_ver
                    .checked_add(1)
                    .ok_or(MetaRejected::Exhausted {
                        change: kind,
                        counter: "conf_ver",
                    })?;
                let target = next.shards.get_mut(&shard).expect("checked");
                target.voters = expected;
                target.conf_ver = conf_ver;
                target.retired.extend(pending.remove);
                target.pending = None;
                Applied::MoveFinished { shard, conf_ver }
            }
            MetaChange::AbortMove { shard, move_id, .. } => {
                let entry = self.shard(kind, shard)?;
                let pending = pending_move(kind, shard, entry, move_id)?;
                let target = next.shards.get_mut(&shard).expect("checked");
                target.retired.extend(pending.add);
                target.pending = None;
                Applied::MoveAborted { shard, move_id }
            }
            MetaChange::ForgetRetired { shard, replica } => {
                let entry = self.shard(kind, shard)?;
                if !entry.retired.iter().any(|r| r.id == replica) {
                    return Err(MetaRejected::NotRetired { shard, replica });
                }
                let target = next.shards.get_mut(&shard).expect("checked");
                target.retired.retain(|r| r.id != replica);
                Applied::RetiredForgotten { shard, replica }
            }
        };
        *self = next;
        Ok(applied)
    }

    /// Checks the invariants every seeded map keeps (see the module doc), plus the shape of
    /// every entry: voters non-empty with distinct replica ids and nodes, every id below
    /// `next_id`, every replica on a known node. `Err` names the first broken rule.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut keys = BTreeMap::new();
        let mut addrs = BTreeMap::new();
        let mut active = 0;
        for (&id, node) in &self.nodes {
            if id >= self.next_id {
                return Err(format!("node {id} is not below next_id {}", self.next_id));
            }
            if node.state == NodeState::Removed {
                continue;
            }
            if node.state == NodeState::Active {
                active += 1;
            }
            if node.addr.is_empty() {
                return Err(format!("node {id} has an empty address"));
            }
            if let Some(other) = keys.insert(node.placement_key, id) {
                return Err(format!(
                    "nodes {other} and {id} share placement key {}",
                    node.placement_key
                ));
            }
            if let Some(other) = addrs.insert(node.addr.as_str(), id) {
                return Err(format!(
                    "nodes {other} and {id} share address {:?}",
                    node.addr
                ));
            }
        }
        if active == 0 {
            return Err("no node is Active".into());
        }
        for (&shard, entry) in &self.shards {
            if entry.voters.is_empty() {
                return Err(format!("shard {shard} has no voter"));
            }
            if entry.voters.windows(2).any(|w| w[0].id >= w[1].id) {
                return Err(format!("shard {shard}: voters not sorted by replica id"));
            }
            let mut ids = BTreeSet::new();
            let mut voter_nodes = BTreeSet::new();
            let all = entry
                .voters
                .iter()
                .chain(entry.retired.iter())
                .chain(entry.pending.iter().flat_map(|m| m.add.iter()));
            for replica in all {
                if replica.id >= self.next_id {
                    return Err(format!(
                        "shard {shard}: replica {} is not below next_id {}",
                        replica.id, self.next_id
                    ));
                }
                if !ids.insert(replica.id) {
                    return Err(format!("shard {shard}: replica id {} twice", replica.id));
                }
                if !self.nodes.contains_key(&replica.node) {
                    return Err(format!(
                        "shard {shard}: replica {} is on unknown node {}",
                        replica.id, replica.node
                    ));
                }
            }
            for voter in &entry.voters {
                if !voter_nodes.insert(voter.node) {
                    return Err(format!("shard {shard}: two voters on node {}", voter.node));
                }
                if self.nodes[&voter.node].state == NodeState::Removed {
                    return Err(format!(
                        "shard {shard}: voter {} is on Removed node {}",
                        voter.id, voter.node
                    ));
                }
            }
            if let Some(pending) = &entry.pending {
                if pending.id >= self.next_id {
                    return Err(format!("shard {shard}: move id {} too high", pending.id));
                }
                if pending.add.is_none() && pending.remove.is_none() {
                    return Err(format!("shard {shard}: move {} is empty", pending.id));
                }
                if let Some(add) = pending.add {
                    if voter_nodes.contains(&add.node) {
                        return Err(format!(
                            "shard {shard}: move {} adds to voter node {}",
                            pending.id, add.node
                        ));
                    }
                    if self.nodes[&add.node].state == NodeState::Removed {
                        return Err(format!(
                            "shard {shard}: move {} adds to Removed node {}",
                            pending.id, add.node
                        ));
                    }
                }
                if let Some(remove) = pending.remove
                    && !entry.voters.contains(&remove)
                {
                    return Err(format!(
                        "shard {shard}: move {} removes non-voter {}",
                        pending.id, remove.id
                    ));
                }
            }
        }
        Ok(())
    }

    /// The first voter or pending add that node `id` holds, if any.
    pub fn held_by(&self, id: NodeId) -> Option<(ShardId, ReplicaId, &'static str)> {
        self.shards.iter().find_map(|(&shard, entry)| {
            if let Some(voter) = entry.voters.iter().find(|r| r.node == id) {
                return Some((shard, voter.id, "voter replica"));
            }
            let add = entry.pending.as_ref().and_then(|m| m.add);
            add.filter(|r| r.node == id)
                .map(|r| (shard, r.id, "pending add replica"))
        })
    }

    fn seed(&mut self, seed: ClusterMap) -> Result<Applied, MetaRejected> {
        if self.epoch != 0 {
            return Err(MetaRejected::AlreadySeeded { epoch: self.epoch });
        }
        let invalid = |why: String| Err(MetaRejected::InvalidSeed(why));
        if seed.epoch != 0 {
            return invalid(format!("its epoch is {}, not 0", seed.epoch));
        }
        if seed.shard_count == 0 || seed.points_per_shard == 0 || seed.replication_factor == 0 {
            return invalid(
                "shard_count, points_per_shard and replication_factor must be at least 1".into(),
            );
        }
        let want: BTreeSet<ShardId> = (0..ShardId::from(seed.shard_count)).chain([META]).collect();
        if seed.shards.keys().copied().collect::<BTreeSet<_>>() != want {
            return invalid(format!(
                "its shards must be 0..{} and META ({META})",
                seed.shard_count
            ));
        }
        if let Some((id, node)) = seed
            .nodes
            .iter()
            .find(|(_, n)| n.state != NodeState::Active)
        {
            return invalid(format!("node {id} is {}, not Active", node.state));
        }
        if let Some((shard, _)) = seed.shards.iter().find(|(_, s)| {
            s.conf_ver != 1 || s.version != 1 || s.pending.is_some() || !s.retired.is_empty()
        }) {
            return invalid(format!(
                "shard {shard} must have conf_ver 1, version 1, no pending move and no retired replica"
            ));
        }
        let mut next = seed;
        for entry in next.shards.values_mut() {
            entry.voters.sort_unstable();
        }
        next.check_invariants().map_err(MetaRejected::InvalidSeed)?;
        next.epoch = 1;
        for node in next.nodes.values_mut() {
            node.since_epoch = 1;
        }
        *self = next;
        Ok(Applied::Seeded)
    }

    fn node(&self, change: &'static str, id: NodeId) -> Result<&NodeEntry, MetaRejected> {
        self.nodes
            .get(&id)
            .ok_or(MetaRejected::UnknownNode { change, id })
    }

    fn shard(&self, change: &'static str, shard: ShardId) -> Result<&ShardEntry, MetaRejected> {
        self.shards
            .get(&shard)
            .ok_or(MetaRejected::UnknownShard { change, shard })
    }

    /// `addr` is non-empty and no live node other than `except` has it.
    fn check_addr(
        &self,
        change: &'static str,
        addr: &str,
        except: Option<NodeId>,
    ) -> Result<(), MetaRejected> {
        if addr.is_empty() {
            return Err(MetaRejected::EmptyAddr { change });
        }
        let holder = self.nodes.iter().find(|(id, n)| {
            Some(**id) != except && n.state != NodeState::Removed && n.addr == addr
        });
        match holder {
            Some((&holder, _)) => Err(MetaRejected::AddrInUse {
                change,
                addr: addr.to_string(),
                holder,
            }),
            None => Ok(()),
        }
    }

    fn check_not_last_active(&self, change: &'static str, id: NodeId) -> Result<(), MetaRejected> {
        let others = self
            .nodes
            .iter()
            .any(|(&other, n)| other != id && n.state == NodeState::Active);
        if others {
            Ok(())
        } else {
            Err(MetaRejected::LastActiveNode { change, id })
        }
    }

    /// Takes the next id (only on the copy being built).
    fn take_id(&mut self, change: &'static str) -> Result<u64, MetaRejected> {
        let id = self.next_id;
        self.next_id = id.checked_add(1).ok_or(MetaRejected::Exhausted {
            change,
            counter: "id",
        })?;
        Ok(id)
    }

    /// Sets a known node's state and stamps `since_epoch` (only on the copy being built).
    fn set_state(&mut self, id: NodeId, state: NodeState) {
        let epoch = self.epoch;
        let node = self.nodes.get_mut(&id).expect("validated node");
        node.state = state;
        node.since_epoch = epoch;
    }
}

fn wrong_state(
    change: &'static str,
    id: NodeId,
    state: NodeState,
    wanted: &'static str,
) -> MetaRejected {
    MetaRejected::WrongNodeState {
        change,
        id,
        state,
        wanted,
    }
}

fn pending_move<'a>(
    change: &'static str,
    shard: ShardId,
    entry: &'a ShardEntry,
    move_id: u64,
) -> Result<&'a Move, MetaRejected> {
    match &entry.pending {
        Some(pending) if pending.id == move_id => Ok(pending),
        other => Err(MetaRejected::NoSuchMove {
            change,
            shard,
            move_id,
            pending: other.as_ref().map(|m| m.id),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::placement;
    use crate::storage::codec::{decode_serde, encode_serde};
    use proptest::prelude::*;

    const SHARDS: u32 = 4;

    fn addr(id: NodeId) -> String {
        format!("n{id}:7001")
    }

    /// A seed as M2 will derive it from `--peers 1..=n`: every node Active with key = id,
    /// replica id = node id, voters by today's placement.
    fn seed_map(n: u64) -> ClusterMap {
        let ids: Vec<NodeId> = (1..=n).collect();
        let nodes = ids
            .iter()
            .map(|&id| {
                let entry = NodeEntry {
                    addr: addr(id),
                    state: NodeState::Active,
                    placement_key: id,
                    since_epoch: 0,
                };
                (id, entry)
            })
            .collect();
        let meta_rf = if n < 3 { 1 } else { 3 };
        let shards = (0..ShardId::from(SHARDS))
            .map(|s| (s, 3))
            .chain([(META, meta_rf)])
            .map(|(shard, rf)| {
                let voters = placement::replicas(shard, &ids, rf)
                    .expect("valid placement")
                    .into_iter()
                    .map(|node| Replica { id: node, node })
                    .collect();
                let entry = ShardEntry {
                    conf_ver: 1,
                    version: 1,
                    voters,
                    pending: None,
                    retired: Vec::new(),
                };
                (shard, entry)
            })
            .collect();
        ClusterMap {
            cluster_uuid: 0x0123_4567_89ab_cdef_0123_4567_89ab_cdef,
            name: "test".into(),
            epoch: 0,
            next_id: n + 1,
            shard_count: SHARDS,
            points_per_shard: 64,
            replication_factor: 3,
            nodes,
            shards,
        }
    }

    fn seeded(n: u64) -> ClusterMap {
        let mut map = ClusterMap::default();
        assert_eq!(
            map.apply(MetaChange::Seed(seed_map(n))),
            Ok(Applied::Seeded)
        );
        map
    }

    /// Applies `change`, which must be refused, and checks the map did not change.
    fn refuse(map: &mut ClusterMap, change: MetaChange) -> MetaRejected {
        let before = map.clone();
        let err = map.apply(change).expect_err("the change must be refused");
        assert_eq!(*map, before);
        err
    }

    fn ok(map: &mut ClusterMap, change: MetaChange) -> Applied {
        let epoch = map.epoch;
        let applied = map.apply(change).expect("the change must be applied");
        assert_eq!(map.epoch, epoch + 1);
        map.check_invariants().expect("invariants hold");
        applied
    }

    fn add_node(map: &mut ClusterMap, addr: &str) -> NodeId {
        let change = MetaChange::AddNode { addr: addr.into() };
        match ok(map, change) {
            Applied::NodeAdded { id } => id,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Moves every replica off `from` onto `to` (Active), one move per shard.
    fn move_all(map: &mut ClusterMap, from: NodeId, to: NodeId) {
        let shards: Vec<(ShardId, Replica)> = map
            .shards
            .iter()
            .filter_map(|(&s, e)| e.voters.iter().find(|r| r.node == from).map(|r| (s, *r)))
            .collect();
        for (shard, old) in shards {
            let start = MetaChange::StartMove {
                shard,
                add: Some(to),
                remove: Some(old.id),
                reason: MoveReason::Drain,
            };
            let Applied::MoveStarted {
                move_id,
                add: Some(new),
                ..
            } = ok(map, start)
            else {
                panic!("no add replica")
            };
            let mut voters = map.shards[&shard].voters.clone();
            voters.retain(|r| r.id != old.id);
            voters.push(new);
            ok(
                map,
                MetaChange::FinishMove {
                    shard,
                    move_id,
                    voters,
                },
            );
        }
    }

    #[test]
    fn seed_is_the_first_change_only() {
        let mut map = ClusterMap::default();
        let err = refuse(&mut map, MetaChange::AddNode { addr: "a".into() });
        assert_eq!(err, MetaRejected::NotSeeded { change: "AddNode" });
        assert!(err.to_string().contains("not seeded"), "{err}");
        let mut map = seeded(3);
        assert_eq!(map.epoch, 1);
        assert_eq!(map.next_id, 4);
        assert!(map.nodes.values().all(|n| n.since_epoch == 1));
        map.check_invariants().expect("invariants hold");
        let err = refuse(&mut map, MetaChange::Seed(seed_map(3)));
        assert_eq!(err, MetaRejected::AlreadySeeded { epoch: 1 });
    }

    #[test]
    fn invalid_seeds_are_refused() {
        type Spoil = fn(&mut ClusterMap);
        let bad: [(&str, Spoil); 7] = [
            ("epoch", |m| m.epoch = 3),
            ("META", |m| {
                m.shards.remove(&META);
            }),
            ("not Active", |m| {
                m.nodes.get_mut(&2).expect("node 2").state = NodeState::Joining
            }),
            ("placement key", |m| {
                m.nodes.get_mut(&2).expect("node 2").placement_key = 1
            }),
            ("next_id", |m| m.next_id = 2),
            ("no voter", |m| {
                m.shards.get_mut(&0).expect("shard 0").voters.clear()
            }),
            ("at least 1", |m| m.replication_factor = 0),
        ];
        for (why, spoil) in bad {
            let mut seed = seed_map(3);
            spoil(&mut seed);
            let mut map = ClusterMap::default();
            let err = refuse(&mut map, MetaChange::Seed(seed));
            assert!(
                matches!(err, MetaRejected::InvalidSeed(_)),
                "{why}: {err:?}"
            );
            assert!(err.to_string().contains(why), "{why}: {err}");
        }
    }

    #[test]
    fn add_node_takes_a_fresh_id_and_a_unique_addr() {
        let mut map = seeded(3);
        let id = add_node(&mut map, "n4:7001");
        assert_eq!(id, 4);
        assert_eq!(map.next_id, 5);
        let node = &map.nodes[&id];
        assert_eq!(
            (node.state, node.placement_key, node.since_epoch),
            (NodeState::Joining, 4, 2)
        );
        let err = refuse(&mut map, MetaChange::AddNode { addr: addr(2) });
        assert_eq!(
            err,
            MetaRejected::AddrInUse {
                change: "AddNode",
                addr: addr(2),
                holder: 2
            }
        );
        assert!(err.to_string().contains("belongs to node 2"), "{err}");
        let err = refuse(&mut map, MetaChange::AddNode { addr: "".into() });
        assert_eq!(err, MetaRejected::EmptyAddr { change: "AddNode" });
        // A Removed node's address is free again; its id is not.
        ok(&mut map, MetaChange::RemoveNode { id });
        assert_eq!(add_node(&mut map, "n4:7001"), 5);
    }

    #[test]
    fn activate_only_a_joining_node() {
        let mut map = seeded(3);
        let id = add_node(&mut map, "n4:7001");
        assert_eq!(
            ok(&mut map, MetaChange::ActivateNode { id }),
            Applied::NodeActivated { id }
        );
        assert_eq!(map.nodes[&id].state, NodeState::Active);
        assert_eq!(map.nodes[&id].since_epoch, map.epoch);
        let err = refuse(&mut map, MetaChange::ActivateNode { id });
        assert!(
            matches!(
                err,
                MetaRejected::WrongNodeState {
                    state: NodeState::Active,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("needs it Joining"), "{err}");
        let err = refuse(&mut map, MetaChange::ActivateNode { id: 99 });
        assert_eq!(
            err,
            MetaRejected::UnknownNode {
                change: "ActivateNode",
                id: 99
            }
        );
    }

    #[test]
    fn drain_an_active_node_or_flip_dead() {
        let mut map = seeded(2);
        ok(&mut map, MetaChange::DrainNode { id: 1, dead: false });
        assert_eq!(map.nodes[&1].state, NodeState::Draining { dead: false });
        refuse(&mut map, MetaChange::DrainNode { id: 1, dead: false });
        ok(&mut map, MetaChange::DrainNode { id: 1, dead: true });
        assert_eq!(map.nodes[&1].state, NodeState::Draining { dead: true });
        // Node 2 is the last Active node.
        let err = refuse(&mut map, MetaChange::DrainNode { id: 2, dead: true });
        assert_eq!(
            err,
            MetaRejected::LastActiveNode {
                change: "DrainNode",
                id: 2
            }
        );
        let joining = add_node(&mut map, "n3:7001");
        let err = refuse(
            &mut map,
            MetaChange::DrainNode {
                id: joining,
                dead: false,
            },
        );
        assert!(
            matches!(err, MetaRejected::WrongNodeState { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn replace_swaps_placement_keys_and_moves_exactly_deads_replicas() {
        let mut map = seeded(3);
        let new = add_node(&mut map, "n4:7001");
        let applied = ok(&mut map, MetaChange::ReplaceNode { dead: 3, new });
        assert_eq!(
            applied,
            Applied::NodeReplaced {
                dead: 3,
                new,
                placement_key: 3
            }
        );
        assert_eq!(map.nodes[&new].placement_key, 3);
        assert_eq!(map.nodes[&new].state, NodeState::Joining);
        assert_eq!(map.nodes[&3].placement_key, new);
        assert_eq!(map.nodes[&3].state, NodeState::Draining { dead: true });
        // Node 3 holds voters: it cannot be removed until they moved.
        let err = refuse(&mut map, MetaChange::RemoveNode { id: 3 });
        assert!(
            matches!(err, MetaRejected::NodeNotEmpty { id: 3, .. }),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("still holds voter replica"),
            "{err}"
        );
        ok(&mut map, MetaChange::ActivateNode { id: new });
        move_all(&mut map, 3, new);
        assert_eq!(map.held_by(3), None);
        ok(&mut map, MetaChange::RemoveNode { id: 3 });
        // NEW keeps DEAD's key after DEAD is gone.
        assert_eq!(map.nodes[&new].placement_key, 3);
        assert_eq!(map.nodes[&3].state, NodeState::Removed);
    }

    #[test]
    fn replace_refusals() {
        let mut map = seeded(3);
        let new = add_node(&mut map, "n4:7001");
        let other = add_node(&mut map, "n5:7001");
        let err = refuse(&mut map, MetaChange::ReplaceNode { dead: 3, new: 3 });
        assert_eq!(err, MetaRejected::ReplaceSelf { id: 3 });
        // DEAD must be Active or Draining.
        let err = refuse(&mut map, MetaChange::ReplaceNode { dead: other, new });
        assert!(
            matches!(err, MetaRejected::WrongNodeState { .. }),
            "{err:?}"
        );
        // NEW must be Joining.
        let err = refuse(&mut map, MetaChange::ReplaceNode { dead: 3, new: 2 });
        assert!(
            matches!(err, MetaRejected::WrongNodeState { id: 2, .. }),
            "{err:?}"
        );
        ok(&mut map, MetaChange::ReplaceNode { dead: 3, new });
        // NEW cannot replace a second node, and DEAD cannot be replaced twice at once.
        let err = refuse(&mut map, MetaChange::ReplaceNode { dead: 2, new });
        assert_eq!(
            err,
            MetaRejected::AlreadyReplacing {
                new,
                placement_key: 3
            }
        );
        let err = refuse(
            &mut map,
            MetaChange::ReplaceNode {
                dead: 3,
                new: other,
            },
        );
        assert_eq!(err, MetaRejected::AlreadyReplaced { dead: 3, by: new });
        // The last Active node cannot be replaced.
        let mut map = seeded(1);
        let new = add_node(&mut map, "n2:7001");
        let err = refuse(&mut map, MetaChange::ReplaceNode { dead: 1, new });
        assert!(
            matches!(err, MetaRejected::LastActiveNode { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn a_failed_replace_gives_dead_its_key_back() {
        let mut map = seeded(3);
        let first = add_node(&mut map, "n4:7001");
        ok(
            &mut map,
            MetaChange::ReplaceNode {
                dead: 3,
                new: first,
            },
        );
        ok(&mut map, MetaChange::RemoveNode { id: first });
        assert_eq!(map.nodes[&3].placement_key, 3);
        let second = add_node(&mut map, "n5:7001");
        ok(
            &mut map,
            MetaChange::ReplaceNode {
                dead: 3,
                new: second,
            },
        );
        assert_eq!(map.nodes[&second].placement_key, 3);
        assert_eq!(map.nodes[&3].placement_key, second);
    }

    #[test]
    fn remove_only_a_node_that_holds_nothing() {
        let mut map = seeded(3);
        // An orphan Joining node holds nothing.
        let orphan = add_node(&mut map, "n4:7001");
        ok(&mut map, MetaChange::RemoveNode { id: orphan });
        let err = refuse(&mut map, MetaChange::RemoveNode { id: orphan });
        assert!(
            matches!(err, MetaRejected::WrongNodeState { .. }),
            "{err:?}"
        );
        let err = refuse(
            &mut map,
            MetaChange::SetAddr {
                id: orphan,
                addr: "x:1".into(),
            },
        );
        assert!(
            matches!(err, MetaRejected::WrongNodeState { .. }),
            "{err:?}"
        );
        // A pending add holds the target node.
        let target = add_node(&mut map, "n5:7001");
        ok(&mut map, MetaChange::ActivateNode { id: target });
        let start = MetaChange::StartMove {
            shard: 0,
            add: Some(target),
            remove: None,
            reason: MoveReason::Grow,
        };
        let Applied::MoveStarted { move_id, add, .. } = ok(&mut map, start) else {
            panic!("not started")
        };
        let err = refuse(&mut map, MetaChange::RemoveNode { id: target });
        assert!(err.to_string().contains("pending add replica"), "{err}");
        let abort = MetaChange::AbortMove {
            shard: 0,
            move_id,
            why: "timeout".into(),
        };
        ok(&mut map, abort);
        assert_eq!(map.shards[&0].retired, vec![add.expect("add")]);
        ok(&mut map, MetaChange::RemoveNode { id: target });
        // A META voter holds its node: with 3 nodes META has 3 voters.
        let meta_voter = map.shards[&META].voters[0].node;
        ok(
            &mut map,
            MetaChange::DrainNode {
                id: meta_voter,
                dead: false,
            },
        );
        let err = refuse(&mut map, MetaChange::RemoveNode { id: meta_voter });
        assert!(matches!(err, MetaRejected::NodeNotEmpty { .. }), "{err:?}");
        // The last Active node cannot be removed even when empty.
        let mut map = seeded(1);
        for shard in map.shards.values_mut() {
            shard.voters.clear();
        }
        map.shards.clear();
        let err = refuse(&mut map, MetaChange::RemoveNode { id: 1 });
        assert!(
            matches!(err, MetaRejected::LastActiveNode { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn set_addr_changes_a_live_nodes_address() {
        let mut map = seeded(3);
        let change = MetaChange::SetAddr {
            id: 1,
            addr: "h1:9".into(),
        };
        assert_eq!(ok(&mut map, change), Applied::AddrSet { id: 1 });
        assert_eq!(map.nodes[&1].addr, "h1:9");
        let same = MetaChange::SetAddr {
            id: 1,
            addr: "h1:9".into(),
        };
        assert!(matches!(
            refuse(&mut map, same),
            MetaRejected::SameAddr { .. }
        ));
        let taken = MetaChange::SetAddr {
            id: 1,
            addr: addr(2),
        };
        assert!(matches!(
            refuse(&mut map, taken),
            MetaRejected::AddrInUse { holder: 2, .. }
        ));
        let empty = MetaChange::SetAddr {
            id: 1,
            addr: String::new(),
        };
        assert!(matches!(
            refuse(&mut map, empty),
            MetaRejected::EmptyAddr { .. }
        ));
        let unknown = MetaChange::SetAddr {
            id: 42,
            addr: "z:1".into(),
        };
        assert!(matches!(
            refuse(&mut map, unknown),
            MetaRejected::UnknownNode { id: 42, .. }
        ));
    }

    #[test]
    fn start_move_allocates_ids_and_allows_one_per_shard() {
        let mut map = seeded(3);
        let four = add_node(&mut map, "n4:7001");
        ok(&mut map, MetaChange::ActivateNode { id: four });
        let remove = map.shards[&1].voters[0];
        let start = MetaChange::StartMove {
            shard: 1,
            add: Some(four),
            remove: Some(remove.id),
            reason: MoveReason::Balance,
        };
        let next_id = map.next_id;
        let applied = ok(&mut map, start.clone());
        let add = Replica {
            id: next_id + 1,
            node: four,
        };
        assert_eq!(
            applied,
            Applied::MoveStarted {
                shard: 1,
                move_id: next_id,
                add: Some(add)
            }
        );
        assert_eq!(map.next_id, next_id + 2);
        let pending = map.shards[&1].pending.clone().expect("pending");
        assert_eq!(pending.remove, Some(remove));
        let err = refuse(&mut map, start);
        assert_eq!(
            err,
            MetaRejected::MoveInProgress {
                shard: 1,
                pending: next_id
            }
        );
        assert!(err.to_string().contains("at most one per shard"), "{err}");
    }

    #[test]
    fn start_move_refusals() {
        let mut map = seeded(3);
        let joining = add_node(&mut map, "n4:7001");
        let voters = map.shards[&0].voters.clone();
        let start = |add, remove| MetaChange::StartMove {
            shard: 0,
            add,
            remove,
            reason: MoveReason::Balance,
        };
        assert!(matches!(
            refuse(&mut map, start(None, None)),
            MetaRejected::EmptyMove { shard: 0 }
        ));
        assert!(matches!(
            refuse(&mut map, start(Some(joining), None)),
            MetaRejected::WrongNodeState { .. }
        ));
        assert!(matches!(
            refuse(&mut map, start(Some(voters[0].node), None)),
            MetaRejected::AlreadyAVoter { shard: 0, .. }
        ));
        assert!(matches!(
            refuse(&mut map, start(None, Some(77))),
            MetaRejected::NotAVoter { replica: 77, .. }
        ));
        assert!(matches!(
            refuse(&mut map, start(Some(123), None)),
            MetaRejected::UnknownNode { id: 123, .. }
        ));
        let unknown_shard = MetaChange::StartMove {
            shard: 99,
            add: None,
            remove: Some(1),
            reason: MoveReason::Drain,
        };
        assert!(matches!(
            refuse(&mut map, unknown_shard),
            MetaRejected::UnknownShard { shard: 99, .. }
        ));
        // A one-voter group cannot lose its voter without gaining one.
        let mut map = seeded(1);
        let err = refuse(&mut map, start(None, Some(1)));
        assert_eq!(
            err,
            MetaRejected::LastVoter {
                shard: 0,
                replica: 1
            }
        );
    }

    #[test]
    fn finish_move_checks_the_observed_voters() {
        let mut map = seeded(3);
        let four = add_node(&mut map, "n4:7001");
        ok(&mut map, MetaChange::ActivateNode { id: four });
        let old = map.shards[&2].voters.clone();
        let start = MetaChange::StartMove {
            shard: 2,
            add: Some(four),
            remove: Some(old[1].id),
            reason: MoveReason::Balance,
        };
        let Applied::MoveStarted {
            move_id,
            add: Some(add),
            ..
        } = ok(&mut map, start)
        else {
            panic!("not started")
        };
        let finish = |move_id, voters| MetaChange::FinishMove {
            shard: 2,
            move_id,
            voters,
        };
        // The old voters, or the new ones without the add, are not what the move leads to.
        let err = refuse(&mut map, finish(move_id, old.clone()));
        assert!(
            matches!(err, MetaRejected::VotersMismatch { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("observed voters"), "{err}");
        let mut want = vec![add, old[2], old[0]];
        let err = refuse(&mut map, finish(move_id + 100, want.clone()));
        assert_eq!(
            err,
            MetaRejected::NoSuchMove {
                change: "FinishMove",
                shard: 2,
                move_id: move_id + 100,
                pending: Some(move_id)
            }
        );
        assert_eq!(
            ok(&mut map, finish(move_id, want.clone())),
            Applied::MoveFinished {
                shard: 2,
                conf_ver: 2
            }
        );
        want.sort_unstable();
        let entry = &map.shards[&2];
        assert_eq!(entry.voters, want);
        assert_eq!(entry.retired, vec![old[1]]);
        assert_eq!(entry.pending, None);
        // Finishing again: nothing pending.
        let err = refuse(&mut map, finish(move_id, want));
        assert!(
            matches!(err, MetaRejected::NoSuchMove { pending: None, .. }),
            "{err:?}"
        );
        // The retired replica is forgotten once, then refused.
        let forget = MetaChange::ForgetRetired {
            shard: 2,
            replica: old[1].id,
        };
        ok(&mut map, forget.clone());
        assert!(map.shards[&2].retired.is_empty());
        assert!(matches!(
            refuse(&mut map, forget),
            MetaRejected::NotRetired { .. }
        ));
    }

    #[test]
    fn abort_move_keeps_voters_and_burns_the_id() {
        let mut map = seeded(3);
        let remove = map.shards[&3].voters[0];
        let start = MetaChange::StartMove {
            shard: 3,
            add: None,
            remove: Some(remove.id),
            reason: MoveReason::Drain,
        };
        let Applied::MoveStarted { move_id, add, .. } = ok(&mut map, start.clone()) else {
            panic!("not started")
        };
        assert_eq!(add, None);
        let before = map.shards[&3].clone();
        let abort = MetaChange::AbortMove {
            shard: 3,
            move_id,
            why: "operator".into(),
        };
        ok(&mut map, abort.clone());
        assert_eq!(map.shards[&3].voters, before.voters);
        assert_eq!(map.shards[&3].conf_ver, before.conf_ver);
        assert!(map.shards[&3].retired.is_empty());
        assert!(matches!(
            refuse(&mut map, abort),
            MetaRejected::NoSuchMove { .. }
        ));
        // The next move gets a new id.
        let Applied::MoveStarted { move_id: again, .. } = ok(&mut map, start) else {
            panic!("not started")
        };
        assert!(again > move_id);
    }

    #[test]
    fn map_and_changes_round_trip_through_bincode() {
        let mut map = seeded(5);
        let id = add_node(&mut map, "n6:7001");
        ok(&mut map, MetaChange::ActivateNode { id });
        ok(
            &mut map,
            MetaChange::StartMove {
                shard: 0,
                add: Some(id),
                remove: None,
                reason: MoveReason::Grow,
            },
        );
        ok(&mut map, MetaChange::DrainNode { id: 2, dead: true });
        let bytes = encode_serde(&map);
        assert_eq!(decode_serde::<ClusterMap>(&bytes), Ok(map.clone()));
        let changes = [
            MetaChange::Seed(seed_map(3)),
            MetaChange::FinishMove {
                shard: META,
                move_id: 9,
                voters: vec![Replica { id: 1, node: 1 }],
            },
            MetaChange::AbortMove {
                shard: 1,
                move_id: 2,
                why: "x".into(),
            },
        ];
        for change in changes {
            let bytes = encode_serde(&change);
            assert_eq!(decode_serde::<MetaChange>(&bytes), Ok(change));
        }
    }

    // ---- The model proptest ----

    /// One random step; turned into a change against the current map, so most steps name
    /// existing nodes, shards, replicas and moves (and some name bogus ones).
    #[derive(Clone, Debug)]
    struct Step {
        kind: u8,
        a: u8,
        b: u8,
        c: u8,
        flag: bool,
    }

    fn step() -> impl Strategy<Value = Step> {
        (
            0u8..12,
            any::<u8>(),
            any::<u8>(),
            any::<u8>(),
            any::<bool>(),
        )
            .prop_map(|(kind, a, b, c, flag)| Step {
                kind,
                a,
                b,
                c,
                flag,
            })
    }

    fn pick<T: Copy>(items: &[T], i: u8) -> T {
        items[usize::from(i) % items.len()]
    }

    fn to_change(map: &ClusterMap, s: &Step) -> MetaChange {
        let mut nodes: Vec<NodeId> = map.nodes.keys().copied().collect();
        nodes.push(map.next_id + 7); // unknown
        let mut shards: Vec<ShardId> = map.shards.keys().copied().collect();
        shards.push(999); // unknown
        let node = |i| pick(&nodes, i);
        let joining: Vec<NodeId> = map
            .nodes
            .iter()
            .filter(|(_, n)| n.state == NodeState::Joining)
            .map(|(&id, _)| id)
            .collect();
        // Mostly a Joining node where one is wanted (ActivateNode, ReplaceNode's NEW).
        let joining_node = |i: u8| {
            if joining.is_empty() || i.is_multiple_of(4) {
                node(i)
            } else {
                pick(&joining, i)
            }
        };
        // Mostly a shard with a pending move (FinishMove, AbortMove) or a retired replica
        // (ForgetRetired) where one exists, so those changes are often accepted.
        let with = |has: fn(&ShardEntry) -> bool| -> Vec<ShardId> {
            map.shards
                .iter()
                .filter(|(_, e)| has(e))
                .map(|(&s, _)| s)
                .collect()
        };
        let busy = match s.kind {
            9 | 11 => with(|e| e.pending.is_some()),
            10 if s.flag => with(|e| !e.retired.is_empty()),
            10 => with(|e| e.pending.is_some()),
            _ => Vec::new(),
        };
        let shard = if busy.is_empty() || s.c.is_multiple_of(4) {
            pick(&shards, s.a)
        } else {
            pick(&busy, s.a)
        };
        let some_addr = |i: u8| match i % 10 {
            9 => String::new(),
            k => format!("h{k}:7001"),
        };
        let entry = map.shards.get(&shard);
        let pending = entry.and_then(|e| e.pending.clone());
        let move_id = match (&pending, s.b % 6) {
            (Some(m), 1..) => m.id,
            _ => u64::from(s.b),
        };
        match s.kind {
            0 => MetaChange::AddNode {
                addr: some_addr(s.b),
            },
            1 => MetaChange::ActivateNode {
                id: joining_node(s.a),
            },
            2 => MetaChange::DrainNode {
                id: node(s.a),
                dead: s.flag,
            },
            3 => MetaChange::ReplaceNode {
                dead: node(s.a),
                new: joining_node(s.b),
            },
            4 | 5 => MetaChange::RemoveNode { id: node(s.b) },
            6 => MetaChange::SetAddr {
                id: node(s.a),
                addr: some_addr(s.b),
            },
            7 | 8 => {
                let voters: Vec<ReplicaId> = entry
                    .map(|e| e.voters.iter().map(|r| r.id).collect())
                    .unwrap_or_default();
                let remove = match s.c % 5 {
                    0 => None,
                    1 => Some(u64::from(s.c) + 1000),
                    _ if voters.is_empty() => None,
                    _ => Some(pick(&voters, s.c / 5)),
                };
                let add = (s.flag || remove.is_none()).then(|| node(s.b));
                MetaChange::StartMove {
                    shard,
                    add,
                    remove,
                    reason: MoveReason::Balance,
                }
            }
            11 if s.c.is_multiple_of(8) => MetaChange::Seed(seed_map(1 + u64::from(s.a % 4))),
            9 | 11 => {
                let mut voters = entry.map(|e| e.voters.clone()).unwrap_or_default();
                if let Some(m) = &pending {
                    voters.retain(|r| Some(*r) != m.remove);
                    voters.extend(m.add);
                }
                if s.c.is_multiple_of(7) {
                    voters.pop();
                }
                voters.reverse();
                MetaChange::FinishMove {
                    shard,
                    move_id,
                    voters,
                }
            }
            10 => {
                if s.flag {
                    let retired: Vec<ReplicaId> = entry
                        .map(|e| e.retired.iter().map(|r| r.id).collect())
                        .unwrap_or_default();
                    let replica = if retired.is_empty() {
                        u64::from(s.c)
                    } else {
                        pick(&retired, s.c)
                    };
                    MetaChange::ForgetRetired { shard, replica }
                } else {
                    MetaChange::AbortMove {
                        shard,
                        move_id,
                        why: "test".into(),
                    }
                }
            }
            _ => unreachable!("kind is below 12"),
        }
    }

    /// What node `id` holds, found by a plain scan (independent of `held_by`).
    fn holds_something(map: &ClusterMap, id: NodeId) -> bool {
        map.shards.values().any(|e| {
            e.voters.iter().any(|r| r.node == id)
                || e.pending
                    .as_ref()
                    .is_some_and(|m| m.add.is_some_and(|r| r.node == id))
        })
    }

    /// Runs `steps` from a seed of `nodes` nodes and checks every step against the model.
    fn run_model(nodes: u64, steps: &[Step]) -> Result<(), TestCaseError> {
        let mut map = ClusterMap::default();
        prop_assert_eq!(
            map.apply(MetaChange::Seed(seed_map(nodes))),
            Ok(Applied::Seeded)
        );
        // The model: every id ever handed out, and each shard's pending move.
        let mut ids: BTreeSet<u64> = (1..=nodes).collect();
        let mut pending: BTreeMap<ShardId, u64> = BTreeMap::new();
        for s in steps {
            let change = to_change(&map, s);
            let before = map.clone();
            let before_bytes = encode_serde(&map);
            let applied = match map.apply(change.clone()) {
                Ok(applied) => applied,
                Err(err) => {
                    // Refused: byte-identical, epoch unchanged.
                    prop_assert_eq!(&map, &before);
                    prop_assert_eq!(encode_serde(&map), before_bytes);
                    if let MetaChange::RemoveNode { id } = change
                        && let Some(node) = before.nodes.get(&id)
                        && node.state != NodeState::Removed
                        && !holds_something(&before, id)
                    {
                        // An empty live node is refused only as the last Active one.
                        let others = before
                            .nodes
                            .iter()
                            .any(|(&o, n)| o != id && n.state == NodeState::Active);
                        prop_assert!(node.state == NodeState::Active && !others, "{}", err);
                    }
                    continue;
                }
            };
            prop_assert_eq!(map.epoch, before.epoch + 1, "{:?}", change);
            prop_assert!(map.next_id >= before.next_id);
            if let Err(why) = map.check_invariants() {
                prop_assert!(false, "{:?} broke an invariant: {}", change, why);
            }
            // Nodes are never deleted, so their ids stay taken.
            prop_assert!(before.nodes.keys().all(|id| map.nodes.contains_key(id)));
            let mut fresh = |id: u64| -> Result<(), TestCaseError> {
                prop_assert!(id >= before.next_id && id < map.next_id, "id {}", id);
                prop_assert!(ids.insert(id), "id {} handed out twice", id);
                Ok(())
            };
            match (&change, &applied) {
                (MetaChange::AddNode { .. }, Applied::NodeAdded { id }) => fresh(*id)?,
                (
                    MetaChange::StartMove { shard, .. },
                    Applied::MoveStarted { move_id, add, .. },
                ) => {
                    prop_assert!(!pending.contains_key(shard), "second move on {}", shard);
                    fresh(*move_id)?;
                    if let Some(add) = add {
                        fresh(add.id)?;
                    }
                    pending.insert(*shard, *move_id);
                }
                (
                    MetaChange::FinishMove { shard, move_id, .. },
                    Applied::MoveFinished { conf_ver, .. },
                ) => {
                    prop_assert_eq!(pending.remove(shard), Some(*move_id));
                    prop_assert_eq!(*conf_ver, before.shards[shard].conf_ver + 1);
                }
                (MetaChange::AbortMove { shard, move_id, .. }, Applied::MoveAborted { .. }) => {
                    prop_assert_eq!(pending.remove(shard), Some(*move_id));
                }
                (MetaChange::RemoveNode { id }, Applied::NodeRemoved { .. }) => {
                    prop_assert!(
                        !holds_something(&before, *id),
                        "removed node {} held replicas",
                        id
                    );
                    prop_assert_eq!(map.nodes[id].state, NodeState::Removed);
                }
                (MetaChange::Seed(_), _) => prop_assert!(false, "a second Seed was applied"),
                _ => prop_assert_eq!(map.next_id, before.next_id),
            }
            // The model's pending moves are the map's.
            let in_map: BTreeMap<ShardId, u64> = map
                .shards
                .iter()
                .filter_map(|(&s, e)| e.pending.as_ref().map(|m| (s, m.id)))
                .collect();
            prop_assert_eq!(&in_map, &pending);
            // Placement keys are unique among live nodes.
            let live: Vec<u64> = map
                .nodes
                .values()
                .filter(|n| n.state != NodeState::Removed)
                .map(|n| n.placement_key)
                .collect();
            prop_assert_eq!(live.iter().collect::<BTreeSet<_>>().len(), live.len());
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn apply_keeps_the_invariants(
            nodes in 1u64..6,
            steps in prop::collection::vec(step(), 1..40),
        ) {
            run_model(nodes, &steps)?;
        }
    }
}
