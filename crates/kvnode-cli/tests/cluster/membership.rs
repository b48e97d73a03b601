//! The cluster map of a real cluster (issue 17): every node of a `--peers` cluster learns the
//! same seeded map, its shard voters are the groups' actual replicas, and `kvctl node list`
//! shows its nodes; a node started with `kvnode --join` gets the next id (or the one
//! `kvctl node add` registered), becomes Active, serves by forwarding and keeps its id across
//! restarts; a directory of another cluster is refused.

use std::collections::BTreeSet;
use std::time::Duration;

use kvnode::client::Client;
use kvnode::cluster::membership::{ClusterMap, META, NodeState};
use kvnode::pb::admin::GetClusterMapRequest;
use kvnode::pb::admin::admin_client::AdminClient;
use kvnode::pb::kv::kv_client::KvClient;
use kvnode::pb::kv::{PutRequest, StatusRequest};
use kvnode_testkit::eventually;
use kvnode_testkit::process_cluster::ExtraNode;

use crate::harness::{Cluster, SHARDS, kvctl};

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

/// The map epoch the node at `addr` knows, and its id (asked of that node alone).
async fn epoch_at(addr: &str) -> Option<(u64, u64)> {
    let mut admin = AdminClient::connect(format!("http://{addr}")).await.ok()?;
    let reply = admin
        .get_cluster_map(GetClusterMapRequest {})
        .await
        .ok()?
        .into_inner();
    Some((reply.node, reply.map?.epoch))
}

/// The node id the process at `addr` reports in `Status`.
async fn id_at(addr: &str) -> Option<u64> {
    let mut kv = KvClient::connect(format!("http://{addr}")).await.ok()?;
    Some(kv.status(StatusRequest {}).await.ok()?.into_inner().node)
}

/// Waits until the process of `node` answers `Status`, and returns the id it reports.
async fn wait_serving(node: &ExtraNode) -> u64 {
    let addr = node.addr();
    let what = format!("the node at {addr} serving");
    eventually(Duration::from_secs(30), &what, || id_at(&addr)).await
}

/// Waits until node 1's map lists a node at `addr` as Active; returns its id and that map.
async fn wait_active(client: &Client, addr: &str) -> (u64, ClusterMap) {
    let what = format!("the node at {addr} Active in node 1's map");
    eventually(Duration::from_secs(30), &what, || async {
        let map = client.cluster_map_at(1).await.ok()?;
        let (id, _) = map
            .nodes
            .iter()
            .find(|(_, n)| n.addr == addr && n.state == NodeState::Active)?;
        Some((*id, map))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_node_gets_the_next_id_becomes_active_serves_and_keeps_its_id() {
    let mut cluster = Cluster::start(3).await;
    cluster.wait_all_shards_led(Duration::from_secs(30)).await;
    let client = Client::connect(cluster.seeds()).await.unwrap();
    let seeded = eventually(Duration::from_secs(30), "a seeded map", || async {
        client.cluster_map_at(1).await.ok()
    })
    .await;
    assert_eq!(seeded.next_id, 4);

    let mut n4 = cluster.extra_node("node-4");
    n4.start(&["--join", &cluster.addr(1)]);
    assert_eq!(wait_serving(&n4).await, 4, "{}", n4.log_text());
    let (id, map) = wait_active(&client, &n4.addr()).await;
    assert_eq!(id, 4, "the id is the map's next_id");
    assert_eq!(map.next_id, 5);
    assert_eq!(
        map.held_by(4),
        None,
        "no rebalancing yet: node 4 holds nothing"
    );
    let epoch = map.epoch;

    // `kvctl node list` shows it.
    let (code, out, err) = kvctl(&cluster.addr(2), &["node", "list"]).await;
    assert_eq!(code, 0, "{err}");
    let row = out
        .lines()
        .find(|l| l.starts_with("4 "))
        .unwrap_or_else(|| panic!("no row for node 4:\n{out}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        (cells[1], cells[2]),
        (n4.addr().as_str(), "Active"),
        "{out}"
    );

    // Every node's map agrees (node 4 follows it through its pings).
    let mut addrs = cluster.seeds();
    addrs.push(n4.addr());
    for addr in &addrs {
        let what = format!("{addr} at map epoch {epoch}");
        eventually(Duration::from_secs(30), &what, || async {
            let (_, e) = epoch_at(addr).await?;
            (e == epoch).then_some(())
        })
        .await;
    }

    // Node 4 holds no shard: it forwards, and what it acknowledged is readable at `lin`.
    let mut kv = KvClient::connect(format!("http://{}", n4.addr()))
        .await
        .unwrap();
    for i in 0..20u32 {
        let key = format!("joined-{i}").into_bytes();
        kv.put(PutRequest {
            key: key.clone(),
            value: key.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("put {i} through node 4: {e}\n{}", n4.log_text()));
        let got = cluster.get_linearizable(1, &key).await.unwrap();
        assert_eq!(got.as_deref(), Some(key.as_slice()));
    }

    // Restarts keep id 4 and commit no second AddNode: with --join (ignored) ...
    n4.terminate().await;
    n4.start(&["--join", &cluster.addr(1)]);
    assert_eq!(wait_serving(&n4).await, 4);
    assert!(
        n4.log_text().contains("--join is ignored"),
        "{}",
        n4.log_text()
    );
    // ... and without it (the id comes from the data directory).
    n4.terminate().await;
    n4.start(&["--shards", &SHARDS.to_string()]);
    assert_eq!(wait_serving(&n4).await, 4, "{}", n4.log_text());
    let after = client.cluster_map_at(1).await.unwrap();
    assert_eq!(after.epoch, epoch, "no map change from the restarts");
    assert_eq!(after.next_id, 5);
    kv = KvClient::connect(format!("http://{}", n4.addr()))
        .await
        .unwrap();
    kv.put(PutRequest {
        key: b"after-restart".to_vec(),
        value: b"v".to_vec(),
    })
    .await
    .unwrap();

    n4.terminate().await;
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvctl_node_add_pre_registers_the_id_and_another_clusters_name_or_dir_is_refused() {
    let mut cluster = Cluster::start(3).await;
    cluster.wait_all_shards_led(Duration::from_secs(30)).await;
    let client = Client::connect(cluster.seeds()).await.unwrap();
    eventually(Duration::from_secs(30), "a seeded map", || async {
        client.cluster_map_at(1).await.ok()
    })
    .await;

    // `kvctl node add ADDR` registers the id; adds of the same address through every node
    // answer it again (idempotent while Joining; at least two of them forward to META's
    // leader).
    let mut joiner = cluster.extra_node("joiner");
    let (code, out, err) = kvctl(&cluster.addr(2), &["node", "add", &joiner.addr()]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "4");
    for via in [1, 2, 3] {
        let (code, again, err) = kvctl(&cluster.addr(via), &["node", "add", &joiner.addr()]).await;
        assert_eq!((code, again.trim()), (0, "4"), "through node {via}: {err}");
    }
    let registered = client.cluster_map_at(1).await.unwrap();
    assert_eq!(registered.nodes[&4].state, NodeState::Joining);

    // The node started with --join at that address gets that id, through node 3.
    joiner.start(&["--join", &cluster.addr(3)]);
    assert_eq!(wait_serving(&joiner).await, 4, "{}", joiner.log_text());
    let (id, map) = wait_active(&client, &joiner.addr()).await;
    assert_eq!((id, map.next_id), (4, 5));
    // An Active node's address is refused, definitely.
    let (code, _, err) = kvctl(&cluster.addr(1), &["node", "add", &joiner.addr()]).await;
    assert_ne!(code, 0);
    assert!(
        err.contains("already exists") && err.contains("node 4"),
        "{err}"
    );

    // A join that names another cluster is refused, naming both, and registers nothing.
    let mut renamed = cluster.extra_node("renamed");
    renamed.start(&["--join", &cluster.addr(2), "--cluster-id", "other"]);
    assert!(!renamed.wait_exit(Duration::from_secs(30)).await.success());
    let log = renamed.log_text();
    assert!(
        log.contains("cluster mismatch") && log.contains("\"other\"") && log.contains("\"kvnode\""),
        "{log}"
    );
    let map = client.cluster_map_at(1).await.unwrap();
    assert!(map.nodes.values().all(|n| n.addr != renamed.addr()));
    assert_eq!(map.next_id, 5);

    // A directory of another cluster is refused, naming both clusters.
    let mut stranger = cluster.extra_node("stranger");
    let node = kvnode::Node::open(kvnode::Config {
        cluster_id: "other".into(),
        ..kvnode::Config::single_node(&stranger.data_dir)
    })
    .await
    .unwrap();
    node.close().await;
    stranger.start(&["--join", &cluster.addr(1)]);
    let status = stranger.wait_exit(Duration::from_secs(30)).await;
    assert!(!status.success());
    let log = stranger.log_text();
    assert!(
        log.contains("\"other\"") && log.contains("\"kvnode\"") && log.contains("cannot join"),
        "{log}"
    );

    joiner.terminate().await;
    cluster.stop_all().await;
}
