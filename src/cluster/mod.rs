//! Shard → node mapping. This module owns the rule that decides which nodes hold the replicas
//! of each shard and which of them is the preferred leader ([`placement`]); it is a pure
//! function of the shard id and the node list. Cluster membership (how the node list is agreed
//! on and changed) lives here too: [`membership`] is the cluster map and the pure state machine
//! that changes it (docs/design/membership.md §1.1), [`map_view`] is the newest map a node
//! knows, [`seed`] derives the first map from a node's flags (§5), [`join`] decides what a join
//! gets (§3.2), `activation` when a joined node becomes Active, and `rebalance` what the
//! rebalancer does next (§3.5).

// `map_view`, `seed` and `join` are public for `kvnode-cli` and the tests, but hidden from the docs:
// they change with every membership milestone of issue 17. `membership` is documented: its map
// is what `Client::cluster_map` returns.
pub(crate) mod activation;
#[doc(hidden)]
pub mod join;
#[doc(hidden)]
pub mod map_view;
pub mod membership;
pub mod placement;
// The rebalancer's planner (M4); its driver lands next, until then only the tests call it.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) mod rebalance;
#[doc(hidden)]
pub mod seed;

pub use map_view::MapView;
pub use placement::replicas;

/// Identifies a node (one `kvnode` process) in the cluster.
pub type NodeId = u64;
