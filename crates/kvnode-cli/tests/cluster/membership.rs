//! The cluster map of a real cluster (issue 17): every node of a `--peers` cluster learns the
//! same seeded map, its shard voters are the groups' actual replicas, and `kvctl node list`
//! shows its nodes.

use std::collections::BTreeSet;
use std::time::Duration;

use kvnode::client::Client;
use kvnode::cluster::membership::{ClusterMap, META, NodeState};

use crate::harness::{Cluster, SHARDS};

async fn kvctl(endpoint: &str, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kvctl"))
        .arg("--endpoints")
        .arg(endpoint)
        .args(args)
        .env_remove("KVNODE_ENDPOINTS")
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_knows_the_same_seeded_map_and_kvctl_lists_its_nodes() {
    let mut cluster = Cluster::start(3).await;
    cluster.wait_all_shards_led(Duration::from_secs(30)).await;
    let client = Client::connect(cluster.seeds()).await.unwrap();

    // Each node learns the map (from its own META replica or a peer) on its own schedule.
    let mut maps: Vec<ClusterMap> = Vec::new();
    for id in cluster.ids() {
        let what = format!("node {id} knowing the cluster map");
        let map = kvnode_testkit::eventually(Duration::from_secs(30), &what, || async {
            client.cluster_map_at(id).await.ok()
        })
        .await;
        maps.push(map);
    }
    let first = &maps[0];
    assert!(first.epoch >= 1, "a seeded map has epoch >= 1");
    for map in &maps[1..] {
        assert_eq!(
            map.cluster_uuid, first.cluster_uuid,
            "one seed wins everywhere"
        );
    }
    let newest = client.cluster_map().await.unwrap();
    assert!(maps.iter().all(|m| m.epoch <= newest.epoch));

    // The map describes the groups as they are: every data shard's voters are the replicas
    // the nodes report, with replica id = node id (a `--peers` cluster's seed).
    assert_eq!(newest.nodes.len(), 3);
    assert!(newest.nodes.values().all(|n| n.state == NodeState::Active));
    for shard in 0..u64::from(SHARDS) {
        let voters = &newest.shards[&shard].voters;
        assert!(
            voters.iter().all(|r| r.id == r.node),
            "shard {shard}: {voters:?}"
        );
        let in_map: BTreeSet<u64> = voters.iter().map(|r| r.node).collect();
        let reported: BTreeSet<u64> = cluster.replicas(shard).await.into_iter().collect();
        assert_eq!(in_map, reported, "shard {shard}");
    }
    assert_eq!(
        newest.shards[&META].voters.len(),
        3,
        "3 nodes: META on 3 voters"
    );

    // `kvctl node list`: a header, then one row per node with the replicas it holds.
    let (code, out, err) = kvctl(&cluster.addr(1), &["node", "list"]).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with(&format!("cluster {:?}, map epoch ", newest.name)),
        "{out}"
    );
    assert!(lines[1].starts_with("ID"), "{out}");
    assert_eq!(lines.len(), 2 + 3, "{out}");
    for (row, id) in lines[2..].iter().zip(1u64..) {
        let cells: Vec<&str> = row.split_whitespace().collect();
        let held = newest
            .shards
            .values()
            .filter(|s| s.voters.iter().any(|r| r.node == id))
            .count();
        assert_eq!(cells[0], id.to_string(), "{out}");
        assert_eq!(cells[1], cluster.addr(id), "{out}");
        assert_eq!(cells[2], "Active", "{out}");
        assert_eq!(cells[4], held.to_string(), "{out}");
    }
    cluster.stop_all().await;
}
