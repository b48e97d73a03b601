//! The cluster map of an embedded node (issue 17, milestone M2): the META group seeded on first
//! open, kept across reopen, the format-2 → 3 upgrade of a committed fixture, the `CLUSTER`
//! cache (a damaged one is ignored with a warning), and commands refused by the wrong group.

use std::io::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};

use kvnode::cluster::membership::{Applied, META, MetaChange, MetaRejected, NodeState, Replica};
use kvnode::raft::Command;
use kvnode::{Config, Error, Node, ReadOptions};

fn config(dir: &Path) -> Config {
    Config {
        shards: 8,
        ..Config::single_node(dir)
    }
}

/// The `CLUSTER` file is written by a background task: wait for it to hold `epoch`.
async fn cached_epoch(dir: &Path, epoch: u64) {
    kvnode_testkit::eventually(
        std::time::Duration::from_secs(10),
        "the CLUSTER cache to be written",
        || async move {
            let bytes = kvnode::storage::cluster_cache::read(dir).ok()??;
            let map: kvnode::cluster::membership::ClusterMap =
                kvnode::storage::codec::decode_serde(&bytes).ok()?;
            (map.epoch == epoch).then_some(())
        },
    )
    .await;
}

/// Node 1 alone: Active, every shard (META included) held by replica 1 on node 1.
fn assert_single_node_map(node: &Node, shards: u32) {
    let map = node
        .cluster_map()
        .expect("the map is known once open returns");
    assert!(map.epoch >= 1, "epoch {}", map.epoch);
    assert_eq!(node.map_epoch(), map.epoch);
    assert_eq!(map.nodes.len(), 1);
    assert_eq!(map.nodes[&1].state, NodeState::Active);
    assert_eq!(map.nodes[&1].placement_key, 1);
    assert_eq!(map.next_id, 2);
    assert_eq!(map.shard_count, shards);
    let ids: Vec<u64> = map.shards.keys().copied().collect();
    let want: Vec<u64> = (0..u64::from(shards)).chain([META]).collect();
    assert_eq!(ids, want);
    for (shard, entry) in &map.shards {
        assert_eq!(entry.voters, [Replica { id: 1, node: 1 }], "shard {shard}");
    }
    map.check_invariants().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_node_seeds_its_map_once_and_keeps_it_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(config(dir.path())).await.unwrap();
    assert_single_node_map(&node, 8);
    let first = node.cluster_map().unwrap();
    assert_eq!(first.name, "kvnode");
    assert!(node.local_shard(META).is_some(), "node 1 hosts META");
    // A second seed, as a restarted initializer might propose, is refused and changes nothing.
    let again = node
        .propose_meta(MetaChange::Seed(Default::default()))
        .await
        .unwrap();
    assert_eq!(
        again,
        Err(MetaRejected::AlreadySeeded { epoch: first.epoch })
    );
    assert_eq!(node.cluster_map().unwrap(), first);
    cached_epoch(dir.path(), first.epoch).await;
    node.close().await;

    let identity = std::fs::read_to_string(dir.path().join("IDENTITY")).unwrap();
    assert!(
        identity.contains(&format!("uuid {:032x}\n", first.cluster_uuid)),
        "{identity}"
    );
    for _ in 0..2 {
        let node = Node::open(config(dir.path())).await.unwrap();
        assert_single_node_map(&node, 8);
        assert_eq!(node.cluster_map().unwrap(), first, "no second Seed");
        // And META's own state agrees (not only the cache): an applied change moves it on.
        let applied = node
            .propose_meta(MetaChange::SetAddr {
                id: 1,
                addr: "embedded".into(),
            })
            .await
            .unwrap();
        assert!(
            matches!(applied, Err(MetaRejected::SameAddr { id: 1, .. })),
            "{applied:?}"
        );
        node.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_change_moves_the_view_and_the_cache_to_the_new_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(config(dir.path())).await.unwrap();
    let epoch = node.map_epoch();
    let applied = node
        .propose_meta(MetaChange::SetAddr {
            id: 1,
            addr: "127.0.0.1:7001".into(),
        })
        .await
        .unwrap();
    assert_eq!(applied, Ok(Applied::AddrSet { id: 1 }));
    assert_eq!(node.map_epoch(), epoch + 1);
    assert_eq!(node.cluster_map().unwrap().nodes[&1].addr, "127.0.0.1:7001");
    cached_epoch(dir.path(), epoch + 1).await;
    node.close().await;
    let node = Node::open(config(dir.path())).await.unwrap();
    assert_eq!(node.map_epoch(), epoch + 1);
    node.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrong_group_refuses_a_command_before_proposing_it() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(config(dir.path())).await.unwrap();
    let epoch = node.map_epoch();
    let data = node.local_shard(0).unwrap();
    let err = data
        .write(Command::Meta(MetaChange::SetAddr {
            id: 1,
            addr: "x:1".into(),
        }))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("data shard") && m.contains("SetAddr")),
        "{err}"
    );
    let meta = node.local_shard(META).unwrap();
    let err = meta
        .write(Command::Put {
            key: b"map".to_vec(),
            value: b"garbage".to_vec(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("META group")),
        "{err}"
    );
    assert_eq!(node.map_epoch(), epoch);
    assert_eq!(node.cluster_map().unwrap().nodes[&1].addr, "embedded");
    // No key routes to META.
    assert!((0..200).all(|i| node.shard_for(format!("k{i}").as_bytes()) < 8));
    node.close().await;
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The committed format-2 fixture (see its README) opens with this build: its keys are
/// readable at `lin`, FORMAT says 3, and the map is seeded with node 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_2_embedded_directory_is_upgraded_and_seeded() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format2-embedded");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    copy_dir(&fixture, &data);
    assert_eq!(
        std::fs::read_to_string(data.join("FORMAT")).unwrap(),
        "kvnode data directory\nformat 2\n"
    );
    assert!(!data.join("CLUSTER").exists());
    // The fixture was made with 16 shards (the default) and 1 KiB values.
    let node = Node::open(Config::single_node(&data)).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(data.join("FORMAT")).unwrap(),
        "kvnode data directory\nformat 3\n"
    );
    for i in 0..7 {
        let got = node
            .get(format!("key-{i}").as_bytes(), &ReadOptions::linearizable())
            .await
            .unwrap();
        assert_eq!(
            got.value.map(|v| v.value),
            Some(format!("value-{i}").into_bytes()),
            "key-{i}"
        );
    }
    let gone = node
        .get(b"key-7", &ReadOptions::linearizable())
        .await
        .unwrap();
    assert_eq!(gone.value, None);
    assert_single_node_map(&node, 16);
    let epoch = node.map_epoch();
    cached_epoch(&data, epoch).await;
    node.close().await;
    let identity = std::fs::read_to_string(data.join("IDENTITY")).unwrap();
    assert!(
        identity.starts_with("cluster kvnode\nnode 1\nshards 16\nuuid "),
        "{identity}"
    );
}

/// A `tracing` writer that keeps what it is given.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A damaged `CLUSTER` file, or one of another cluster, is only a lost cache: the node opens,
/// warns, and META's map replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_cluster_cache_is_ignored_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(config(dir.path())).await.unwrap();
    let map = node.cluster_map().unwrap();
    cached_epoch(dir.path(), map.epoch).await;
    node.close().await;

    let path = dir.path().join("CLUSTER");
    for damage in ["truncated", "flipped", "another cluster's"] {
        if damage == "another cluster's" {
            // Intact, newer, but of another cluster: it must not hide this node's own map.
            let foreign = kvnode::cluster::membership::ClusterMap {
                cluster_uuid: map.cluster_uuid ^ 1,
                epoch: map.epoch + 10,
                ..(*map).clone()
            };
            let bytes = kvnode::storage::codec::encode_serde(&foreign);
            kvnode::storage::cluster_cache::write(dir.path(), &bytes).unwrap();
        } else {
            let mut bytes = std::fs::read(&path).unwrap();
            if damage == "truncated" {
                bytes.truncate(bytes.len() / 2);
            } else {
                let last = bytes.len() - 1;
                bytes[last] ^= 0x40;
            }
            std::fs::File::create(&path)
                .unwrap()
                .write_all(&bytes)
                .unwrap();
        }
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::WARN)
            .finish();
        // The test's body (and so `open` up to its first spawn, where the cache is read) is
        // polled on this thread, so it runs under this subscriber.
        let guard = tracing::subscriber::set_default(subscriber);
        let node = Node::open(config(dir.path())).await.unwrap();
        drop(guard);
        let logged = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(
            logged.contains("WARN") && logged.contains("ignoring the cluster-map cache"),
            "{damage}: {logged}"
        );
        assert_eq!(node.cluster_map().unwrap(), map, "{damage}: META's map");
        cached_epoch(dir.path(), map.epoch).await;
        node.close().await;
    }
}

/// A shard's local state belongs to the replica id recorded for it (`replicas/<shard>`; none
/// recorded = the node id, every directory written before the record existed). Opened under
/// another replica id, the old incarnation's log, vote and tree are retired first, never reused:
/// here shard 0's record is made to name replica 99, and the reopened node (replica 1, from the
/// map) starts that shard from nothing while every other shard keeps its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_opened_under_another_replica_id_never_reuses_the_old_state() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(config(dir.path())).await.unwrap();
    let mut keys = std::collections::BTreeMap::new();
    for i in 0..64u32 {
        let key = format!("key-{i}").into_bytes();
        node.put(&key, b"v".to_vec()).await.unwrap();
        keys.insert(key.clone(), node.shard_for(&key));
    }
    assert!(keys.values().any(|s| *s == 0), "some key lives on shard 0");
    let epoch = node.map_epoch();
    cached_epoch(dir.path(), epoch).await;
    node.close().await;
    for shard in 0..8 {
        let recorded = kvnode::storage::replica_record::read(dir.path(), shard).unwrap();
        assert_eq!(recorded, Some(1), "shard {shard} is recorded as replica 1");
    }
    kvnode::storage::replica_record::write(dir.path(), 0, 99).unwrap();

    let node = Node::open(config(dir.path())).await.unwrap();
    assert_eq!(node.local_shard(0).unwrap().replica_id(), 1);
    for (key, shard) in &keys {
        let got = node.get(key, &ReadOptions::linearizable()).await.unwrap();
        assert_eq!(
            got.value.is_some(),
            *shard != 0,
            "key {:?} of shard {shard}",
            String::from_utf8_lossy(key)
        );
    }
    assert_eq!(
        kvnode::storage::replica_record::read(dir.path(), 0).unwrap(),
        Some(1),
        "the record names the new incarnation"
    );
    node.close().await;
}
