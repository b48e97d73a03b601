//! Everything that speaks openraft: the type configuration, the replicated command, and the
//! storage adapters that put a shard's Raft log in the node's WAL and its state machine in sled.
//!
//! openraft is pinned to `=0.10.0-alpha.37`, whose API changes between alphas; no openraft type
//! appears outside this module except through the aliases below, so an upgrade touches one
//! place.

#[cfg(feature = "planted-bugs")]
pub mod apply_stall;
pub mod command;
pub mod commit_horizon;
pub mod log_store;
pub mod network;
pub mod replica_node;
pub mod state_machine;

pub use command::{Command, CommandResult, VersionedValue};
pub use log_store::LogStore;
pub use state_machine::{SnapshotBuilder, StateMachine, StateReader};

/// A shard's openraft instance.
pub type ShardRaft = openraft::Raft<TypeConfig, StateMachine>;

openraft::declare_raft_types!(
    /// kvnode's openraft type configuration: u64 Raft ids (replica ids, see
    /// [`replica_node`]), [`Command`] as log payload, and `BasicNode` membership entries that
    /// name each replica's node.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = openraft::BasicNode,
);

/// A log entry of a shard's Raft log.
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
/// A log id (leader term + node, index).
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
/// A Raft vote.
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
/// Snapshot metadata (last included log id and membership).
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
/// A membership and the log id that introduced it.
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
/// A snapshot handed to or from openraft.
pub type Snapshot =
    openraft::type_config::alias::SnapshotOf<TypeConfig, crate::storage::SnapshotFile>;

/// Re-exports of openraft items that storage tests and tools need.
pub mod openraft_types {
    pub use openraft::storage::{IOFlushed, LogState, RaftLogStorage, RaftStateMachine};
    pub use openraft::{EntryPayload, Membership, RaftLogReader, RaftSnapshotBuilder};
}

/// Builds a log id from its parts (for tools and tests that write logs without a running Raft).
pub fn log_id(term: u64, node: u64, index: u64) -> LogId {
    openraft::LogId::new(
        <openraft::impls::leader_id_adv::LeaderId<u64, u64> as openraft::vote::RaftLeaderId>::new(
            term, node,
        ),
        index,
    )
}

/// Builds a vote for `node` in `term` (for tools and tests).
pub fn vote(term: u64, node: u64) -> Vote {
    openraft::impls::Vote::new(term, node)
}

/// Builds a log entry holding `command` (for tools and tests).
pub fn normal_entry(log_id: LogId, command: Command) -> Entry {
    openraft::Entry {
        log_id,
        payload: openraft::EntryPayload::Normal(command),
    }
}
