//! The META group on a three-node `--peers` cluster (issue 17, milestone M2): every node
//! learns the same seeded map, whose shard voters are today's placement with replica id = node
//! id, while no data group's membership changes; and a restarted node knows the map at once
//! from its `CLUSTER` cache, with META out of quorum.

use std::collections::BTreeSet;
use std::sync::Arc;

use openraft::async_runtime::watch::WatchReceiver;

use kvnode::Config;
use kvnode::cluster::membership::{ClusterMap, META, NodeState};
use kvnode_testkit::LocalCluster;

use crate::eventually;

const SHARDS: u32 = 6;

fn configure(config: &mut Config) {
    config.cluster_id = "meta-test".to_string();
    config.shards = SHARDS;
}

/// Waits until every running node of `local` knows a map, and returns it (the same on all).
async fn agreed_map(local: &LocalCluster) -> Arc<ClusterMap> {
    eventually(20, "every node to know the same cluster map", || async {
        let maps: Vec<Arc<ClusterMap>> = local
            .running()
            .map(|node| node.cluster_map())
            .collect::<Option<_>>()?;
        maps.windows(2)
            .all(|w| w[0] == w[1])
            .then(|| Arc::clone(&maps[0]))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_learns_the_seeded_map_of_todays_placement() {
    let dir = tempfile::tempdir().unwrap();
    let mut local = LocalCluster::start(dir.path(), 3, configure).await;
    let map = agreed_map(&local).await;
    assert_eq!(map.epoch, 1, "seeded exactly once");
    assert_eq!(map.name, "meta-test");
    assert_eq!(map.next_id, 4);
    map.check_invariants().unwrap();
    for id in 1..=3 {
        let entry = &map.nodes[&id];
        assert_eq!((entry.state, entry.placement_key), (NodeState::Active, id));
        assert_eq!(entry.addr, local.config(id).peers[&id]);
    }
    let node = local.node(1);
    for shard in 0..u64::from(SHARDS) {
        let voters = &map.shards[&shard].voters;
        assert!(voters.iter().all(|r| r.id == r.node), "shard {shard}");
        let in_map: BTreeSet<u64> = voters.iter().map(|r| r.node).collect();
        let placed: BTreeSet<u64> = node.replicas(shard).iter().copied().collect();
        assert_eq!(in_map, placed, "shard {shard}");
        // The group itself still has the membership it was initialized with.
        for holder in &placed {
            let replica = local.node(*holder).local_shard(shard).unwrap();
            let metrics = replica.raft().metrics().borrow_watched().clone();
            let members: BTreeSet<u64> = metrics.membership_config.voter_ids().collect();
            assert_eq!(members, placed, "shard {shard} on node {holder}");
        }
    }
    // META: three voters (meta_rf = 3 for three nodes), on every node, out of the key router.
    let meta: BTreeSet<u64> = map.shards[&META].voters.iter().map(|r| r.node).collect();
    assert_eq!(meta, BTreeSet::from([1, 2, 3]));
    for id in 1..=3 {
        assert!(local.node(id).local_shard(META).is_some());
        assert!(
            local
                .node(id)
                .status()
                .iter()
                .all(|(shard, ..)| *shard != META)
        );
    }

    // A restart knows the map at once, from its cache, even with META out of quorum.
    for id in 1..=3 {
        let path = dir.path().join(format!("node{id}"));
        eventually(10, "the CLUSTER cache", || async {
            let bytes = kvnode::storage::cluster_cache::read(&path).ok()??;
            let cached: ClusterMap = kvnode::storage::codec::decode_serde(&bytes).ok()?;
            (cached == *map).then_some(())
        })
        .await;
    }
    local.stop(1).await;
    local.stop(2).await;
    local.stop(3).await;
    local.restart(3).await;
    assert_eq!(local.node(3).cluster_map().as_deref(), Some(&*map));
    local.restart(1).await;
    local.restart(2).await;
    let again = agreed_map(&local).await;
    assert_eq!(again, map, "no second seed after a full restart");
    local.close().await;
}

/// Two nodes: META has one voter (meta_rf = 1), so one node does not host it and learns the
/// map only from its peer: a ping reply shows a higher epoch, and it fetches the map. A change
/// committed on META later reaches it the same way, and lands in its `CLUSTER` cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_change_reaches_a_node_that_does_not_host_meta() {
    use kvnode::cluster::membership::{Applied, MetaChange};

    let dir = tempfile::tempdir().unwrap();
    let local = LocalCluster::start(dir.path(), 2, configure).await;
    let (host, other) = if local.node(1).local_shard(META).is_some() {
        (1, 2)
    } else {
        (2, 1)
    };
    assert!(local.node(other).local_shard(META).is_none());
    let seeded = agreed_map(&local).await;
    assert_eq!(seeded.epoch, 1);
    let meta: Vec<u64> = seeded.shards[&META].voters.iter().map(|r| r.node).collect();
    assert_eq!(meta, [host]);

    let applied = eventually(10, "META to accept a change", || async {
        local
            .node(host)
            .propose_meta(MetaChange::AddNode {
                addr: "spare:7001".into(),
            })
            .await
            .ok()
    })
    .await;
    assert_eq!(applied, Ok(Applied::NodeAdded { id: 3 }));
    let changed = agreed_map(&local).await;
    assert_eq!(changed.epoch, 2);
    assert_eq!(changed.nodes[&3].state, NodeState::Joining);
    assert_eq!(local.node(other).map_epoch(), 2);
    let path = dir.path().join(format!("node{other}"));
    eventually(10, "the other node's CLUSTER cache at epoch 2", || async {
        let bytes = kvnode::storage::cluster_cache::read(&path).ok()??;
        let cached: ClusterMap = kvnode::storage::codec::decode_serde(&bytes).ok()?;
        (cached.epoch == 2).then_some(())
    })
    .await;
    local.close().await;
}
