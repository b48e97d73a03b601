//! When a `Joining` node becomes `Active` (docs/design/membership.md §3.2 step 4): the META
//! leader pings every Joining node, and once one has answered two consecutive pings it proposes
//! `ActivateNode`. Two, not one: a single answer proves the node was up once; two in a row at
//! the ping interval show it stays up and reachable, the same both-way evidence the hibernation
//! rule asks of a peer before it trusts it. Pure bookkeeping here; the task that pings and
//! proposes lives in `node`, next to the META group it proposes to.

use std::collections::BTreeMap;

use crate::cluster::NodeId;
use crate::cluster::membership::{ClusterMap, NodeState};

/// Consecutive answered pings in a row before a Joining node is activated.
pub const PINGS_TO_ACTIVATE: u32 = 2;

/// Consecutive answered pings per Joining node.
#[derive(Debug, Default)]
pub struct Activation {
    streaks: BTreeMap<NodeId, u32>,
}

impl Activation {
    /// The Joining nodes of `map`, with their addresses; forgets the streaks of every other
    /// node (activated, removed, or never seen).
    pub fn joining(&mut self, map: &ClusterMap) -> Vec<NodeId> {
        let joining: Vec<NodeId> = map
            .nodes
            .iter()
            .filter(|(_, n)| n.state == NodeState::Joining)
            .map(|(id, _)| *id)
            .collect();
        self.streaks.retain(|id, _| joining.contains(id));
        joining
    }

    /// Records one ping of `id`; true once it has answered [`PINGS_TO_ACTIVATE`] in a row (a
    /// missed ping starts the count again).
    pub fn record(&mut self, id: NodeId, answered: bool) -> bool {
        let streak = self.streaks.entry(id).or_default();
        *streak = if answered { *streak + 1 } else { 0 };
        *streak >= PINGS_TO_ACTIVATE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::membership::NodeEntry;

    fn map(states: &[(NodeId, NodeState)]) -> ClusterMap {
        ClusterMap {
            epoch: 3,
            nodes: states
                .iter()
                .map(|(id, state)| {
                    let entry = NodeEntry {
                        addr: format!("n{id}:1"),
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
    fn two_answers_in_a_row_activate_and_a_miss_restarts_the_count() {
        let mut a = Activation::default();
        let m = map(&[(1, NodeState::Active), (4, NodeState::Joining)]);
        assert_eq!(a.joining(&m), [4]);
        assert!(!a.record(4, true));
        assert!(!a.record(4, false));
        assert!(!a.record(4, true));
        assert!(a.record(4, true));
    }

    #[test]
    fn streaks_of_nodes_no_longer_joining_are_forgotten() {
        let mut a = Activation::default();
        assert!(!a.record(4, true));
        let m = map(&[(1, NodeState::Active), (4, NodeState::Active)]);
        assert!(a.joining(&m).is_empty());
        // Joining again (it cannot, ids are never reused, but the count must not survive).
        let m = map(&[(4, NodeState::Joining)]);
        assert_eq!(a.joining(&m), [4]);
        assert!(!a.record(4, true), "the old answer was forgotten");
    }
}
