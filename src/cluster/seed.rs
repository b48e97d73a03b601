//! The first cluster map, derived from a node's flags (docs/design/membership.md §5, §6).
//!
//! Why derived and not configured: a `--peers` cluster (or an embedded directory) that
//! predates the META group already has a membership in every shard group, decided by
//! placement over the node ids. The seed must describe exactly that, or the first map would
//! disagree with the groups it describes; so every node derives **the same** map from the same
//! flags: every node Active with `placement_key` = its id, `next_id` = the largest id + 1,
//! each data shard's voters = today's placement with replica id = node id (design D3), and
//! META's voters = placement over the same ids with [`meta_replication`] voters. Only the
//! `cluster_uuid` differs between nodes' candidates; the META group applies the first `Seed`
//! and refuses every later one, so one uuid wins.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};

use crate::cluster::NodeId;
use crate::cluster::membership::{ClusterMap, META, NodeEntry, NodeState, Replica, ShardEntry};
use crate::cluster::placement::{PlacementError, replicas};
use crate::config::Config;
use crate::sharding::ShardId;
use crate::sharding::ring::DEFAULT_POINTS_PER_SHARD;

/// The address an embedded node (no `--peers`) is recorded with: it has none, and the map
/// requires one. Replaced by the real address when the directory is served by `kvnode`.
pub const EMBEDDED_ADDR: &str = "embedded";

/// How many voters the META group has among `nodes` nodes: 1 below 3 nodes, 3 below 5, else 5
/// (an even size adds no fault tolerance, §1.3).
pub fn meta_replication(nodes: usize) -> usize {
    match nodes {
        0..3 => 1,
        3..5 => 3,
        _ => 5,
    }
}

/// The nodes that host META's replicas, first = the one that initializes the group.
pub fn meta_voters(config: &Config) -> Result<Vec<NodeId>, PlacementError> {
    let nodes = config.node_ids();
    replicas(META, &nodes, meta_replication(nodes.len()))
}

/// The seed map for `config`'s cluster, with `cluster_uuid` (epoch 0, ready for
/// `MetaChange::Seed`).
pub fn seed_map(config: &Config, cluster_uuid: u128) -> Result<ClusterMap, PlacementError> {
    let ids = config.node_ids();
    let nodes = ids
        .iter()
        .map(|&id| {
            let addr = config
                .peers
                .get(&id)
                .cloned()
                .unwrap_or_else(|| EMBEDDED_ADDR.to_string());
            let entry = NodeEntry {
                addr,
                state: NodeState::Active,
                placement_key: id,
                since_epoch: 0,
            };
            (id, entry)
        })
        .collect();
    let mut shards = BTreeMap::new();
    let groups = (0..ShardId::from(config.shards))
        .map(|shard| (shard, config.replication_factor))
        .chain([(META, meta_replication(ids.len()))]);
    for (shard, rf) in groups {
        let mut voters: Vec<Replica> = replicas(shard, &ids, rf)?
            .into_iter()
            .map(|node| Replica { id: node, node })
            .collect();
        voters.sort_unstable();
        let entry = ShardEntry {
            conf_ver: 1,
            version: 1,
            voters,
            pending: None,
            retired: Vec::new(),
        };
        shards.insert(shard, entry);
    }
    Ok(ClusterMap {
        cluster_uuid,
        name: config.cluster_id.clone(),
        epoch: 0,
        next_id: ids.iter().max().map_or(1, |max| max + 1),
        shard_count: config.shards,
        points_per_shard: DEFAULT_POINTS_PER_SHARD,
        replication_factor: u8::try_from(config.replication_factor).unwrap_or(u8::MAX),
        nodes,
        shards,
    })
}

/// A fresh random cluster uuid (std's randomly keyed hasher over the time and process id: no
/// extra dependency, and two seeds never need more than "different with high probability").
pub fn new_cluster_uuid() -> u128 {
    let half = || {
        let mut h = std::hash::RandomState::new().build_hasher();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        h.write_u128(nanos);
        h.write_u32(std::process::id());
        h.finish()
    };
    (u128::from(half()) << 64) | u128::from(half())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::membership::{Applied, MetaChange};

    fn config(peers: &[NodeId]) -> Config {
        Config {
            peers: peers
                .iter()
                .map(|&id| (id, format!("n{id}:7001")))
                .collect(),
            node_id: peers.first().copied().unwrap_or(1),
            shards: 8,
            ..Config::default()
        }
    }

    #[test]
    fn meta_replication_is_odd() {
        let got: Vec<usize> = (1..=7).map(meta_replication).collect();
        assert_eq!(got, [1, 1, 3, 3, 5, 5, 5]);
    }

    #[test]
    fn seed_matches_todays_placement_and_is_accepted() {
        for peers in [&[][..], &[1, 2, 3], &[2, 5, 9, 11, 12]] {
            let config = config(peers);
            let ids = config.node_ids();
            let map = seed_map(&config, 7).unwrap();
            assert_eq!(map.next_id, ids.iter().max().unwrap() + 1);
            for shard in 0..8 {
                let want: std::collections::BTreeSet<NodeId> =
                    replicas(shard, &ids, 3).unwrap().into_iter().collect();
                let voters = &map.shards[&shard].voters;
                assert!(
                    voters.iter().all(|r| r.id == r.node),
                    "replica id = node id"
                );
                let got = voters.iter().map(|r| r.node).collect();
                assert_eq!(want, got, "shard {shard}");
            }
            let meta: Vec<NodeId> = map.shards[&META].voters.iter().map(|r| r.node).collect();
            let mut want = meta_voters(&config).unwrap();
            want.sort_unstable();
            assert_eq!(meta, want);
            // The same flags give the same map, uuid aside.
            assert_eq!(seed_map(&config, 7).unwrap(), map);
            let mut seeded = ClusterMap::default();
            assert_eq!(seeded.apply(MetaChange::Seed(map)), Ok(Applied::Seeded));
            assert_eq!(seeded.epoch, 1);
        }
    }

    #[test]
    fn an_embedded_seed_holds_node_1_alone() {
        let map = seed_map(&config(&[]), 1).unwrap();
        assert_eq!(map.nodes.len(), 1);
        assert_eq!(map.nodes[&1].addr, EMBEDDED_ADDR);
        assert!(
            map.shards
                .values()
                .all(|s| s.voters == [Replica { id: 1, node: 1 }])
        );
    }

    #[test]
    fn uuids_differ() {
        assert_ne!(new_cluster_uuid(), new_cluster_uuid());
    }
}
