//! The decisions of a join (docs/design/membership.md §3.2), pure so they can be tested alone:
//! what META answers a `Join` or `AddNode` for an address ([`decide`]), and whether a data
//! directory that already has an identity may restart as that node of the cluster at the
//! address it was told to join ([`check_rejoin`]).
//!
//! Why idempotent by address: `kvctl node add ADDR` registers a node before its process
//! exists, and a joiner that crashed after META committed its `AddNode` but before it wrote
//! its identity retries; both must get the id already allocated, not a second one (ids are
//! never reused, so a second one would leave an orphan). An address held by a node that is
//! already Active (or Draining) is a different, running node: refused.

use crate::cluster::NodeId;
use crate::cluster::membership::{ClusterMap, NodeState};

/// What META does with a join (or pre-registration) of an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No live node has the address: commit `AddNode` and answer the new id.
    Add,
    /// A Joining node has it: answer that node's id, commit nothing.
    Existing(NodeId),
    /// A node that is past Joining has it: refuse (definite: nothing is committed).
    Taken {
        /// The node holding the address.
        id: NodeId,
        /// Its state.
        state: NodeState,
    },
}

/// The decision for `addr` against `map`.
pub fn decide(map: &ClusterMap, addr: &str) -> Decision {
    let holder = map
        .nodes
        .iter()
        .find(|(_, n)| n.state != NodeState::Removed && n.addr == addr);
    match holder {
        None => Decision::Add,
        Some((id, n)) if n.state == NodeState::Joining => Decision::Existing(*id),
        Some((id, n)) => Decision::Taken {
            id: *id,
            state: n.state,
        },
    }
}

/// Why a data directory with an identity may not restart into the cluster it was told to
/// join.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejoinRefused {
    /// The directory belongs to another cluster (by name or by uuid).
    #[error(
        "the data directory belongs to cluster {dir_cluster:?}{}, but the node to join is in \
         cluster {cluster:?} (uuid {cluster_uuid:032x}); use an empty data directory to join it",
        dir_uuid.map(|u| format!(" (uuid {u:032x})")).unwrap_or_default()
    )]
    OtherCluster {
        /// The directory's cluster name.
        dir_cluster: String,
        /// The directory's cluster uuid, if it knows one.
        dir_uuid: Option<u128>,
        /// The joined cluster's name.
        cluster: String,
        /// The joined cluster's uuid.
        cluster_uuid: u128,
    },
    /// The map shows the directory's node removed: its id is gone for good.
    #[error(
        "node {id} of this data directory was removed from cluster {cluster:?}; its id is never \
         reused: start with an empty data directory to join as a new node"
    )]
    Removed {
        /// The node id.
        id: NodeId,
        /// The cluster's name.
        cluster: String,
    },
}

/// Whether the node `id` of the cluster `dir_cluster` (uuid `dir_uuid`, if known) may restart
/// in the cluster whose map is `map`.
pub fn check_rejoin(
    dir_cluster: &str,
    dir_uuid: Option<u128>,
    id: NodeId,
    map: &ClusterMap,
) -> Result<(), RejoinRefused> {
    if dir_cluster != map.name || dir_uuid.is_some_and(|u| u != map.cluster_uuid) {
        return Err(RejoinRefused::OtherCluster {
            dir_cluster: dir_cluster.to_string(),
            dir_uuid,
            cluster: map.name.clone(),
            cluster_uuid: map.cluster_uuid,
        });
    }
    if map
        .nodes
        .get(&id)
        .is_some_and(|n| n.state == NodeState::Removed)
    {
        return Err(RejoinRefused::Removed {
            id,
            cluster: map.name.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::membership::NodeEntry;

    fn map(nodes: &[(NodeId, &str, NodeState)]) -> ClusterMap {
        ClusterMap {
            cluster_uuid: 7,
            name: "kvnode".into(),
            epoch: 5,
            nodes: nodes
                .iter()
                .map(|(id, addr, state)| {
                    let entry = NodeEntry {
                        addr: (*addr).into(),
                        state: *state,
                        placement_key: *id,
                        since_epoch: 1,
                    };
                    (*id, entry)
                })
                .collect(),
            ..ClusterMap::default()
        }
    }

    #[test]
    fn a_join_is_idempotent_by_address() {
        let m = map(&[
            (1, "a:1", NodeState::Active),
            (2, "b:1", NodeState::Draining { dead: false }),
            (3, "c:1", NodeState::Removed),
            (4, "d:1", NodeState::Joining),
        ]);
        assert_eq!(decide(&m, "new:1"), Decision::Add);
        assert_eq!(decide(&m, "d:1"), Decision::Existing(4));
        assert_eq!(
            decide(&m, "a:1"),
            Decision::Taken {
                id: 1,
                state: NodeState::Active
            }
        );
        assert!(matches!(decide(&m, "b:1"), Decision::Taken { id: 2, .. }));
        // A Removed node's address is free again (with a new id).
        assert_eq!(decide(&m, "c:1"), Decision::Add);
    }

    #[test]
    fn a_restart_into_another_cluster_or_as_a_removed_node_is_refused() {
        let m = map(&[
            (1, "a:1", NodeState::Active),
            (3, "c:1", NodeState::Removed),
        ]);
        assert_eq!(check_rejoin("kvnode", Some(7), 1, &m), Ok(()));
        assert_eq!(check_rejoin("kvnode", None, 1, &m), Ok(()));
        let err = check_rejoin("other", None, 1, &m).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("\"other\"") && text.contains("\"kvnode\""),
            "{text}"
        );
        let err = check_rejoin("kvnode", Some(8), 1, &m).unwrap_err();
        assert!(matches!(err, RejoinRefused::OtherCluster { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains(&format!("{:032x}", 8)) && text.contains(&format!("{:032x}", 7)));
        assert_eq!(
            check_rejoin("kvnode", Some(7), 3, &m),
            Err(RejoinRefused::Removed {
                id: 3,
                cluster: "kvnode".into()
            })
        );
    }
}
