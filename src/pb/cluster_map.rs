//! The cluster map on the wire (`proto/admin.proto`): [`to_wire`] and [`from_wire`] between
//! [`ClusterMap`] and `admin::ClusterMap`, and [`node_summaries`] for `ListNodes`.
//!
//! The wire form is structured (not the map's bincode) so that any gRPC client (`kvctl`, the
//! Python example, an operator's script) can read it. Decoding checks what the wire cannot
//! express (a 16-byte uuid, known enum values, a replication factor that fits a byte) and
//! refuses anything else as `InvalidArgument`, never a panic.

use super::admin;
use crate::cluster::membership::{
    ClusterMap, Move, MoveReason, NodeEntry, NodeState, Replica, ShardEntry,
};
use crate::error::Error;

/// Encodes `map`.
pub fn to_wire(map: &ClusterMap) -> admin::ClusterMap {
    admin::ClusterMap {
        cluster_uuid: map.cluster_uuid.to_be_bytes().to_vec(),
        name: map.name.clone(),
        epoch: map.epoch,
        next_id: map.next_id,
        shard_count: map.shard_count,
        points_per_shard: map.points_per_shard,
        replication_factor: u32::from(map.replication_factor),
        nodes: map
            .nodes
            .iter()
            .map(|(&id, n)| node_to_wire(id, n))
            .collect(),
        shards: map
            .shards
            .iter()
            .map(|(&shard, e)| admin::Shard {
                shard,
                conf_ver: e.conf_ver,
                version: e.version,
                voters: e.voters.iter().map(replica_to_wire).collect(),
                pending: e.pending.as_ref().map(|m| admin::Move {
                    id: m.id,
                    add: m.add.as_ref().map(replica_to_wire),
                    remove: m.remove.as_ref().map(replica_to_wire),
                    reason: reason_to_wire(m.reason) as i32,
                }),
                retired: e.retired.iter().map(replica_to_wire).collect(),
            })
            .collect(),
    }
}

/// Decodes a map a node sent.
///
/// # Errors
///
/// `InvalidArgument` naming the field if the message is not a map this build can represent.
pub fn from_wire(wire: &admin::ClusterMap) -> Result<ClusterMap, Error> {
    let bad = |what: String| Error::InvalidArgument(format!("malformed cluster map: {what}"));
    let uuid: [u8; 16] = wire.cluster_uuid.as_slice().try_into().map_err(|_| {
        bad(format!(
            "cluster_uuid has {} bytes, not 16",
            wire.cluster_uuid.len()
        ))
    })?;
    let replication_factor = u8::try_from(wire.replication_factor).map_err(|_| {
        bad(format!(
            "replication_factor {} does not fit a byte",
            wire.replication_factor
        ))
    })?;
    let mut nodes = std::collections::BTreeMap::new();
    for n in &wire.nodes {
        let entry = NodeEntry {
            addr: n.addr.clone(),
            state: state_from_wire(n.state)
                .ok_or_else(|| bad(format!("node {} has unknown state {}", n.id, n.state)))?,
            placement_key: n.placement_key,
            since_epoch: n.since_epoch,
        };
        if nodes.insert(n.id, entry).is_some() {
            return Err(bad(format!("node {} appears twice", n.id)));
        }
    }
    let mut shards = std::collections::BTreeMap::new();
    for s in &wire.shards {
        let pending = match &s.pending {
            None => None,
            Some(m) => Some(Move {
                id: m.id,
                add: m.add.as_ref().map(replica_from_wire),
                remove: m.remove.as_ref().map(replica_from_wire),
                reason: reason_from_wire(m.reason).ok_or_else(|| {
                    bad(format!(
                        "shard {}'s move has unknown reason {}",
                        s.shard, m.reason
                    ))
                })?,
            }),
        };
        let entry = ShardEntry {
            conf_ver: s.conf_ver,
            version: s.version,
            voters: s.voters.iter().map(replica_from_wire).collect(),
            pending,
            retired: s.retired.iter().map(replica_from_wire).collect(),
        };
        if shards.insert(s.shard, entry).is_some() {
            return Err(bad(format!("shard {} appears twice", s.shard)));
        }
    }
    Ok(ClusterMap {
        cluster_uuid: u128::from_be_bytes(uuid),
        name: wire.name.clone(),
        epoch: wire.epoch,
        next_id: wire.next_id,
        shard_count: wire.shard_count,
        points_per_shard: wire.points_per_shard,
        replication_factor,
        nodes,
        shards,
    })
}

/// One row per node of `map`, in id order: the node, its voter replicas, its incoming ones.
pub fn node_summaries(map: &ClusterMap) -> Vec<admin::NodeSummary> {
    map.nodes
        .iter()
        .map(|(&id, n)| {
            let count = |f: &dyn Fn(&ShardEntry) -> usize| -> u32 {
                map.shards.values().map(f).sum::<usize>() as u32
            };
            admin::NodeSummary {
                node: Some(node_to_wire(id, n)),
                replicas: count(&|e| e.voters.iter().filter(|r| r.node == id).count()),
                incoming: count(&|e| {
                    e.pending
                        .as_ref()
                        .and_then(|m| m.add)
                        .filter(|r| r.node == id)
                        .map_or(0, |_| 1)
                }),
            }
        })
        .collect()
}

fn node_to_wire(id: u64, n: &NodeEntry) -> admin::Node {
    admin::Node {
        id,
        addr: n.addr.clone(),
        state: state_to_wire(n.state) as i32,
        placement_key: n.placement_key,
        since_epoch: n.since_epoch,
    }
}

fn replica_to_wire(r: &Replica) -> admin::Replica {
    admin::Replica {
        id: r.id,
        node: r.node,
    }
}

fn replica_from_wire(r: &admin::Replica) -> Replica {
    Replica {
        id: r.id,
        node: r.node,
    }
}

fn state_to_wire(state: NodeState) -> admin::NodeState {
    match state {
        NodeState::Joining => admin::NodeState::Joining,
        NodeState::Active => admin::NodeState::Active,
        NodeState::Draining { dead: false } => admin::NodeState::Draining,
        NodeState::Draining { dead: true } => admin::NodeState::DrainingDead,
        NodeState::Removed => admin::NodeState::Removed,
    }
}

/// The node state a wire value names (`None`: unknown or unspecified).
pub fn state_from_wire(state: i32) -> Option<NodeState> {
    Some(match admin::NodeState::try_from(state).ok()? {
        admin::NodeState::Unspecified => return None,
        admin::NodeState::Joining => NodeState::Joining,
        admin::NodeState::Active => NodeState::Active,
        admin::NodeState::Draining => NodeState::Draining { dead: false },
        admin::NodeState::DrainingDead => NodeState::Draining { dead: true },
        admin::NodeState::Removed => NodeState::Removed,
    })
}

fn reason_to_wire(reason: MoveReason) -> admin::MoveReason {
    match reason {
        MoveReason::Dead => admin::MoveReason::Dead,
        MoveReason::Drain => admin::MoveReason::Drain,
        MoveReason::Grow => admin::MoveReason::Grow,
        MoveReason::Balance => admin::MoveReason::Balance,
    }
}

fn reason_from_wire(reason: i32) -> Option<MoveReason> {
    Some(match admin::MoveReason::try_from(reason).ok()? {
        admin::MoveReason::Unspecified => return None,
        admin::MoveReason::Dead => MoveReason::Dead,
        admin::MoveReason::Drain => MoveReason::Drain,
        admin::MoveReason::Grow => MoveReason::Grow,
        admin::MoveReason::Balance => MoveReason::Balance,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::membership::{META, MetaChange};

    /// A seeded map with a pending move, a draining node and a retired replica: every field
    /// the wire carries has a non-default value somewhere.
    fn busy_map() -> ClusterMap {
        let node = |id: u64| NodeEntry {
            addr: format!("127.0.0.1:70{id:02}"),
            state: NodeState::Active,
            placement_key: id,
            since_epoch: 0,
        };
        let shard = |voters: Vec<u64>| ShardEntry {
            conf_ver: 1,
            version: 1,
            voters: voters
                .into_iter()
                .map(|n| Replica { id: n, node: n })
                .collect(),
            pending: None,
            retired: Vec::new(),
        };
        let mut seed = ClusterMap {
            cluster_uuid: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
            name: "wire".into(),
            epoch: 0,
            next_id: 5,
            shard_count: 2,
            points_per_shard: 64,
            replication_factor: 3,
            nodes: (1..=4).map(|id| (id, node(id))).collect(),
            shards: Default::default(),
        };
        seed.shards.insert(0, shard(vec![1, 2, 3]));
        seed.shards.insert(1, shard(vec![2, 3, 4]));
        seed.shards.insert(META, shard(vec![1, 2, 3]));
        let mut map = ClusterMap::default();
        map.apply(MetaChange::Seed(seed)).unwrap();
        map.apply(MetaChange::DrainNode { id: 4, dead: true })
            .unwrap();
        map.apply(MetaChange::StartMove {
            shard: 1,
            add: Some(1),
            remove: Some(4),
            reason: MoveReason::Dead,
        })
        .unwrap();
        map
    }

    #[test]
    fn a_map_survives_the_wire_unchanged() {
        let map = busy_map();
        assert!(map.shards[&1].pending.is_some());
        assert_eq!(from_wire(&to_wire(&map)).unwrap(), map);
        assert_eq!(
            from_wire(&to_wire(&ClusterMap::default())).unwrap(),
            ClusterMap::default()
        );
    }

    #[test]
    fn a_malformed_map_is_refused_with_the_field_named() {
        let good = to_wire(&busy_map());
        type Spoil = Box<dyn Fn(&mut admin::ClusterMap)>;
        let cases: Vec<(&str, Spoil)> = vec![
            ("cluster_uuid", Box::new(|m| m.cluster_uuid.truncate(3))),
            (
                "replication_factor",
                Box::new(|m| m.replication_factor = 300),
            ),
            ("unknown state", Box::new(|m| m.nodes[0].state = 99)),
            ("unknown state", Box::new(|m| m.nodes[0].state = 0)),
            (
                "appears twice",
                Box::new(|m| m.nodes.push(m.nodes[0].clone())),
            ),
            (
                "appears twice",
                Box::new(|m| m.shards.push(m.shards[0].clone())),
            ),
            (
                "unknown reason",
                Box::new(|m| {
                    for s in &mut m.shards {
                        if let Some(p) = &mut s.pending {
                            p.reason = 17;
                        }
                    }
                }),
            ),
        ];
        for (field, spoil) in cases {
            let mut wire = good.clone();
            spoil(&mut wire);
            match from_wire(&wire) {
                Err(Error::InvalidArgument(msg)) => {
                    assert!(msg.contains(field), "{field:?} not named in {msg:?}")
                }
                other => panic!("{field}: expected InvalidArgument, got {other:?}"),
            }
        }
    }

    #[test]
    fn node_summaries_count_voters_and_incoming_replicas() {
        let map = busy_map();
        let rows = node_summaries(&map);
        let by_id = |id: u64| {
            rows.iter()
                .find(|r| r.node.as_ref().unwrap().id == id)
                .unwrap()
        };
        // Node 1: shard 0 and META voter, and the incoming replica of shard 1's move.
        assert_eq!((by_id(1).replicas, by_id(1).incoming), (2, 1));
        assert_eq!((by_id(4).replicas, by_id(4).incoming), (1, 0));
        assert_eq!(
            by_id(4).node.as_ref().unwrap().state,
            admin::NodeState::DrainingDead as i32
        );
    }
}
