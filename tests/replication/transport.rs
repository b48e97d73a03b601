//! The Raft peer transport over real sockets: three in-process nodes, each serving the peer
//! service on its own 127.0.0.1 port. Covers elections and replication across nodes, a stopped
//! node catching up by snapshot after the others purged their logs, and refusal of messages
//! from another cluster, an unknown sender, a wrong shard, garbage, and damaged snapshots, and
//! of per-shard messages and leadership checks for a replica the receiver does not host.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::watch::WatchReceiver;
use openraft::error::RPCError;
use openraft::metrics::RaftMetrics;
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::VoteRequest;
use openraft::{RaftNetworkV2, ServerState};
use tonic::Code;

use kvnode::pb::raft::raft_transport_client::RaftTransportClient;
use kvnode::pb::raft::{ConfirmItem, ConfirmRequest, PeerHeader, RaftRequest, SnapshotChunk};
use kvnode::peers::Peers;
use kvnode::raft::network::ShardNetwork;
use kvnode::raft::{SnapshotMeta, TypeConfig, Vote};
use kvnode::storage::SnapshotWriter;
use kvnode::storage::codec::encode_serde;
use kvnode::{Config, Error, Node, ReadOptions};
use kvnode_testkit::LocalCluster;

use crate::eventually;

const SHARDS: u64 = 4;
const CLUSTER: &str = "transport-test";

/// Three nodes (ids 1..=3) on fixed local ports, from the shared in-process harness.
struct Cluster {
    _dir: tempfile::TempDir,
    local: LocalCluster,
}

fn configure(config: &mut Config) {
    config.cluster_id = CLUSTER.to_string();
    config.shards = SHARDS as u32;
    config.snapshot_every_entries = 20;
    config.request_timeout_ms = 3000;
}

impl Cluster {
    async fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let local = LocalCluster::start(dir.path(), 3, configure).await;
        Cluster { _dir: dir, local }
    }

    fn node(&self, id: u64) -> &Arc<Node> {
        self.local.node(id)
    }

    fn running(&self) -> impl Iterator<Item = &Arc<Node>> {
        self.local.running()
    }

    fn addr(&self, id: u64) -> SocketAddr {
        self.local.addr(id)
    }

    async fn stop(&mut self, id: u64) {
        self.local.stop(id).await
    }

    async fn restart(&mut self, id: u64) {
        self.local.restart(id).await
    }

    async fn close(self) {
        self.local.close().await
    }

    /// Waits until every shard has a leader that every running replica acknowledges; returns
    /// shard → leader.
    async fn leaders(&self) -> BTreeMap<u64, u64> {
        eventually(20, "a leader in every shard", || async {
            let mut leaders = BTreeMap::new();
            for shard in 0..SHARDS {
                let views: Vec<_> = self.running().map(|n| metrics(n, shard)).collect();
                let leader = views[0].current_leader?;
                let agreed = views.iter().all(|m| m.current_leader == Some(leader));
                let leads = self
                    .running()
                    .find(|n| n.id() == leader)
                    .is_some_and(|n| metrics(n, shard).state == ServerState::Leader);
                if !(agreed && leads) {
                    return None;
                }
                leaders.insert(shard, leader);
            }
            Some(leaders)
        })
        .await
    }

    /// Writes through whichever running node leads the key's shard (retrying across leader
    /// changes); returns the leader that took the write.
    async fn put(&self, key: &[u8], value: &[u8]) -> u64 {
        eventually(20, "a write to be accepted", || async {
            for node in self.running() {
                match node.put(key, value.to_vec()).await {
                    Ok(_) => return Some(node.id()),
                    Err(e @ Error::InvalidArgument(_)) => panic!("put {key:?}: {e}"),
                    // Not the leader, no quorum yet, or a leader change mid-write: writing the
                    // same value again is harmless.
                    Err(_) => {}
                }
            }
            None
        })
        .await
    }

    /// Waits until node `id` serves `value` for `key` at eventual consistency.
    async fn readable(&self, id: u64, key: &[u8], value: &[u8]) {
        let node = self.node(id);
        let what = format!("node {id} to read {:?}", String::from_utf8_lossy(key));
        eventually(20, &what, || async {
            let got = node.get(key, &ReadOptions::eventual()).await.ok()?;
            (got.value.map(|v| v.value).as_deref() == Some(value)).then_some(())
        })
        .await
    }
}

/// A copy of `node`'s openraft metrics for `shard` (the watch borrow ends here).
fn metrics(node: &Node, shard: u64) -> RaftMetrics<TypeConfig> {
    let shard = node
        .local_shard(shard)
        .expect("every node hosts every shard");
    shard.raft().metrics().borrow_watched().clone()
}

fn index(log_id: Option<&kvnode::raft::LogId>) -> u64 {
    log_id.map_or(0, |l| l.index())
}

/// `per_shard` distinct keys for every shard.
fn keys_per_shard(node: &Node, per_shard: usize) -> BTreeMap<u64, Vec<Vec<u8>>> {
    let mut keys: BTreeMap<u64, Vec<Vec<u8>>> = (0..SHARDS).map(|s| (s, Vec::new())).collect();
    let mut i = 0;
    while keys.values().any(|k| k.len() < per_shard) {
        let key = format!("key-{i:05}").into_bytes();
        let bucket = keys.get_mut(&node.shard_for(&key)).unwrap();
        if bucket.len() < per_shard {
            bucket.push(key);
        }
        i += 1;
    }
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_shard_elects_a_leader_and_replicates_to_its_followers() {
    let cluster = Cluster::start().await;
    let leaders = cluster.leaders().await;
    assert_eq!(leaders.len(), SHARDS as usize);

    for shard_keys in keys_per_shard(cluster.node(1), 2).values() {
        let key = &shard_keys[0];
        let shard = cluster.node(1).shard_for(key);
        // Followers refuse the write and name the leader.
        for node in cluster.running() {
            if metrics(node, shard).state != ServerState::Leader {
                let refused = node.put(key, b"nope".to_vec()).await;
                assert!(
                    matches!(refused, Err(Error::NotLeader { .. })),
                    "{refused:?}"
                );
            }
        }
        let leader = cluster.put(key, b"hello").await;
        for id in (1..=3).filter(|id| *id != leader) {
            cluster.readable(id, key, b"hello").await;
        }
    }
    cluster.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_node_catches_up_by_snapshot_after_the_others_purged_their_logs() {
    let mut cluster = Cluster::start().await;
    cluster.leaders().await;
    cluster.put(b"before", b"stop").await;
    for id in 1..=3 {
        cluster.readable(id, b"before", b"stop").await;
    }

    const VICTIM: u64 = 3;
    let last_seen: BTreeMap<u64, u64> = (0..SHARDS)
        .map(|s| {
            (
                s,
                metrics(cluster.node(VICTIM), s).last_log_index.unwrap_or(0),
            )
        })
        .collect();
    cluster.stop(VICTIM).await;

    // Enough writes per shard for several snapshots (every 20 entries) and purges.
    let keys = keys_per_shard(cluster.node(1), 110);
    let cluster_ref = &cluster;
    futures::future::join_all(keys.values().map(|shard_keys| async move {
        for (i, key) in shard_keys.iter().enumerate() {
            cluster_ref.put(key, format!("value-{i}").as_bytes()).await;
        }
    }))
    .await;

    // The log the victim would need is gone on every shard's leader: only a snapshot helps.
    let leaders = cluster.leaders().await;
    for (shard, leader) in &leaders {
        let node = cluster.node(*leader);
        eventually(20, "the leader to purge its log", || async {
            let m = metrics(node, *shard);
            (index(m.purged.as_ref()) > last_seen[shard]).then_some(())
        })
        .await;
    }

    cluster.restart(VICTIM).await;
    let victim = Arc::clone(cluster.node(VICTIM));
    for (shard, leader) in &leaders {
        let target = index(metrics(cluster.node(*leader), *shard).last_applied.as_ref());
        let what = format!("shard {shard} on node {VICTIM} to catch up to {target}");
        eventually(20, &what, || async {
            let m = metrics(&victim, *shard);
            (index(m.last_applied.as_ref()) >= target).then_some(())
        })
        .await;
        let m = metrics(&victim, *shard);
        assert!(
            index(m.snapshot.as_ref()) > last_seen[shard],
            "shard {shard}: the victim holds no snapshot past its old log ({:?})",
            m.snapshot
        );
    }
    for shard_keys in keys.values() {
        let (i, key) = (shard_keys.len() - 1, shard_keys.last().unwrap());
        cluster
            .readable(VICTIM, key, format!("value-{i}").as_bytes())
            .await;
        cluster
            .readable(VICTIM, &shard_keys[0], b"value-0".as_slice())
            .await;
    }
    cluster.readable(VICTIM, b"before", b"stop").await;
    drop(victim);
    cluster.close().await;
}

/// A raw client of node `id`'s peer service, for crafting messages.
async fn raw_client(cluster: &Cluster, id: u64) -> RaftTransportClient<tonic::transport::Channel> {
    RaftTransportClient::connect(format!("http://{}", cluster.addr(id)))
        .await
        .unwrap()
}

fn header(from_node: u64, cluster_id: &str, shard: u64) -> Option<PeerHeader> {
    Some(PeerHeader {
        from_node,
        cluster_id: cluster_id.to_string(),
        shard,
        // A legacy sender: no map epoch, the replica is the receiver's node id.
        ..PeerHeader::default()
    })
}

/// `header` addressed to replica `replica` of the shard.
fn to_replica(header: Option<PeerHeader>, replica: u64) -> Option<PeerHeader> {
    header.map(|h| PeerHeader { replica, ..h })
}

/// A vote request for term 1000: granting it would change the receiver's term.
fn high_vote(candidate: u64) -> VoteRequest<TypeConfig> {
    VoteRequest::new(kvnode::raft::vote(1000, candidate), None)
}

async fn vote_status(
    client: &mut RaftTransportClient<tonic::transport::Channel>,
    header: Option<PeerHeader>,
    payload: Vec<u8>,
) -> tonic::Status {
    client
        .vote(RaftRequest { header, payload })
        .await
        .expect_err("the message must be refused")
}

/// Sends one snapshot stream (header chunk with `data` split in two chunks).
async fn send_snapshot(
    client: &mut RaftTransportClient<tonic::transport::Channel>,
    shard: u64,
    snapshot_header: Vec<u8>,
    data: Vec<u8>,
) -> Result<tonic::Response<kvnode::pb::raft::RaftReply>, tonic::Status> {
    let half = data.len() / 2;
    let chunks = vec![
        SnapshotChunk {
            header: header(1, CLUSTER, shard),
            snapshot_header,
            data: data[..half].to_vec(),
        },
        SnapshotChunk {
            header: None,
            snapshot_header: Vec::new(),
            data: data[half..].to_vec(),
        },
    ];
    client.install_snapshot(futures::stream::iter(chunks)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_from_strangers_garbage_and_damaged_snapshots_are_refused() {
    let cluster = Cluster::start().await;
    let leaders = cluster.leaders().await;
    const TARGET: u64 = 2;
    const SHARD: u64 = 0;
    let before = metrics(cluster.node(TARGET), SHARD);
    let mut client = raw_client(&cluster, TARGET).await;
    let vote = encode_serde(&high_vote(1));

    // Another cluster: refused before anything is decoded, and the status names both clusters.
    let status = vote_status(&mut client, header(1, "other-cluster", SHARD), vote.clone()).await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("other-cluster") && status.message().contains(CLUSTER),
        "{status:?}"
    );
    // A node of another cluster going through kvnode's own client: openraft sees Unreachable
    // (it backs off), and the receiver's term is unchanged.
    let mut intruder = cluster.local.config(1).clone();
    intruder.cluster_id = "intruders".to_string();
    let mut network = ShardNetwork::new(
        Peers::new(&intruder).unwrap(),
        SHARD,
        std::sync::Arc::default(),
    );
    let mut peer = network
        .new_client(TARGET, &openraft::BasicNode::default())
        .await;
    let option = RPCOption::new(Duration::from_secs(2));
    let sent = peer.vote(high_vote(1), option.clone()).await;
    assert!(matches!(sent, Err(RPCError::Unreachable(_))), "{sent:?}");
    // A target that is not in the peer list: Unreachable without any traffic.
    let mut nobody = network
        .new_client(42, &openraft::BasicNode::default())
        .await;
    let sent = nobody.vote(high_vote(1), option.clone()).await;
    assert!(matches!(sent, Err(RPCError::Unreachable(_))), "{sent:?}");

    // Senders that are not other members of this cluster.
    let status = vote_status(&mut client, header(99, CLUSTER, SHARD), vote.clone()).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("node 99 is not a member"),
        "{status:?}"
    );
    let status = vote_status(&mut client, header(TARGET, CLUSTER, SHARD), vote.clone()).await;
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // No header, garbage payload, a shard that does not exist.
    let status = vote_status(&mut client, None, vote.clone()).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = vote_status(&mut client, header(1, CLUSTER, SHARD), b"garbage".to_vec()).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("undecodable"), "{status:?}");
    let status = vote_status(&mut client, header(1, CLUSTER, 77), vote.clone()).await;
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let refused = client
        .append_entries(RaftRequest {
            header: header(1, "other-cluster", SHARD),
            payload: b"garbage".to_vec(),
        })
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    // Snapshots: garbage header, a damaged file, a file whose meta differs from the header.
    // The target's current vote lets a transfer through to verification; none may install.
    let current: Vote = before.vote;
    let target_node = Arc::clone(cluster.node(TARGET));
    let meta = SnapshotMeta {
        last_log_id: Some(kvnode::raft::log_id(before.current_term, 1, 10_000)),
        last_membership: before.membership_config.as_ref().clone(),
    };
    let staging = tempfile::tempdir().unwrap();
    let mut writer = SnapshotWriter::create(staging.path(), "s", &encode_serde(&meta)).unwrap();
    for i in 0..200u32 {
        writer
            .push(format!("k{i}").as_bytes(), &[7u8; 100])
            .unwrap();
    }
    let good = std::fs::read(writer.finish().unwrap().path()).unwrap();
    let mut damaged = good.clone();
    damaged[good.len() / 2] ^= 0x40;

    let refused = send_snapshot(&mut client, SHARD, b"garbage".to_vec(), good.clone())
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    let refused = send_snapshot(
        &mut client,
        SHARD,
        encode_serde(&(&current, &meta)),
        damaged,
    )
    .await
    .expect_err("refused");
    assert_eq!(refused.code(), Code::DataLoss, "{refused:?}");
    let mut other_meta = meta.clone();
    other_meta.last_log_id = Some(kvnode::raft::log_id(before.current_term, 1, 20_000));
    let refused = send_snapshot(
        &mut client,
        SHARD,
        encode_serde(&(&current, &other_meta)),
        good,
    )
    .await
    .expect_err("refused");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    let refused = send_snapshot(&mut client, 77, Vec::new(), Vec::new())
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), Code::NotFound, "{refused:?}");
    let dir = target_node.store().snapshot_dir(SHARD);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        leftovers
            .iter()
            .all(|n| !n.to_string_lossy().contains(".recv")),
        "{leftovers:?}"
    );

    // Nothing reached the shard's Raft: no higher term, no installed snapshot, still running.
    let after = metrics(&target_node, SHARD);
    assert!(
        after.current_term < 1000,
        "term moved to {}",
        after.current_term
    );
    assert!(
        index(after.snapshot.as_ref()) < 10_000,
        "{:?}",
        after.snapshot
    );
    assert!(after.running_state.is_ok(), "{:?}", after.running_state);
    if leaders[&SHARD] != TARGET {
        assert_eq!(after.current_leader, before.current_leader);
    }

    // And the cluster keeps working.
    let key = keys_per_shard(cluster.node(1), 1)[&SHARD][0].clone();
    cluster.put(&key, b"still-serving").await;
    for id in 1..=3 {
        cluster.readable(id, &key, b"still-serving").await;
    }
    drop(target_node);
    cluster.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_and_leadership_checks_for_a_replica_not_hosted_are_refused() {
    let cluster = Cluster::start().await;
    const SHARD: u64 = 1;
    let leader = cluster.leaders().await[&SHARD];
    let target = (1..=3).find(|id| *id != leader).unwrap();
    let mut client = raw_client(&cluster, target).await;
    let vote = encode_serde(&high_vote(leader));
    let before = metrics(cluster.node(target), SHARD);

    // Replica 42 of the shard is not the one hosted on `target` (whose replica id is its node
    // id): NOT_FOUND, and the message never reaches the replica that is hosted.
    let status = vote_status(
        &mut client,
        to_replica(header(leader, CLUSTER, SHARD), 42),
        vote.clone(),
    )
    .await;
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(
        status
            .message()
            .contains(&format!("replica 42 is not hosted on node {target}")),
        "{status:?}"
    );
    // The hosted replica, named explicitly, gets through the check (to the payload's).
    let status = vote_status(
        &mut client,
        to_replica(header(leader, CLUSTER, SHARD), target),
        b"garbage".to_vec(),
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let after = metrics(cluster.node(target), SHARD);
    assert_eq!(
        after.current_term, before.current_term,
        "the vote reached Raft"
    );

    // A leadership check about another replica of the shard is a no; about the hosted one
    // (named, or legacy 0) it is the stored vote's answer: yes, while the leader leads.
    let target_node = Arc::clone(cluster.node(target));
    let answers = eventually(20, "the leader's vote confirmed", || {
        let mut client = client.clone();
        let target_node = Arc::clone(&target_node);
        async move {
            let term = metrics(&target_node, SHARD).vote.leader_id.term;
            let item = |replica| ConfirmItem {
                shard: SHARD,
                term,
                replica,
            };
            let request = ConfirmRequest {
                header: header(leader, CLUSTER, 0),
                items: vec![item(target), item(0), item(42)],
            };
            let answers = client.confirm_leadership(request).await.ok()?.into_inner();
            answers.confirmed[0].then_some(answers.confirmed)
        }
    })
    .await;
    assert_eq!(answers, vec![true, true, false]);
    drop(target_node);
    cluster.close().await;
}
