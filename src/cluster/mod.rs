//! Shard → node mapping. This module owns the rule that decides which nodes hold the replicas
//! of each shard and which of them is the preferred leader ([`placement`]); it is a pure
//! function of the shard id and the node list. Cluster membership (how the node list is agreed
//! on and changed) lives here too: [`membership`] is the cluster map and the pure state machine
//! that changes it (docs/design/membership.md §1.1).

pub mod membership;
pub mod placement;

pub use placement::replicas;

/// Identifies a node (one `kvnode` process) in the cluster.
pub type NodeId = u64;
