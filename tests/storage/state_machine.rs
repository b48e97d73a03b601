//! A shard's state machine on sled with snapshot files: compare-and-set decided at apply time,
//! restore from the snapshot when sled lost more than the WAL still holds, and damaged
//! snapshots refused with a typed error.

use std::fs;
use std::io;

use futures::stream;
use kvnode::raft::openraft_types::{
    IOFlushed, RaftLogReader, RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine,
};
use kvnode::raft::{
    Command, CommandResult, Entry, LogStore, StateMachine, TypeConfig, VersionedValue, log_id,
    normal_entry,
};
use kvnode::storage::{Store, StoreOptions};
use openraft::type_config::TypeConfigExt;

const SHARD: u64 = 1;

fn put(i: u64) -> Command {
    Command::Put {
        key: format!("k{}", i % 10).into_bytes(),
        value: format!("v{i}").into_bytes(),
    }
}

async fn append(log: &mut LogStore, entries: &[Entry]) {
    let (tx, rx) = TypeConfig::oneshot();
    log.append(entries.to_vec(), IOFlushed::signal(tx))
        .await
        .unwrap();
    rx.await.unwrap().unwrap();
}

async fn apply(sm: &mut StateMachine, entries: &[Entry]) -> io::Result<()> {
    sm.apply(stream::iter(entries.iter().cloned().map(|e| Ok((e, None)))))
        .await
}

fn entries(range: std::ops::RangeInclusive<u64>) -> Vec<Entry> {
    range
        .map(|i| normal_entry(log_id(1, 1, i), put(i)))
        .collect()
}

/// The value the model holds for key `k{key}` after entries 1..=upto.
fn model(key: u64, upto: u64) -> Option<VersionedValue> {
    (1..=upto)
        .rev()
        .find(|i| i % 10 == key)
        .map(|i| VersionedValue {
            version: i,
            value: format!("v{i}").into_bytes(),
        })
}

fn open(dir: &std::path::Path) -> (Store, LogStore, io::Result<StateMachine>) {
    let store = Store::open(dir, StoreOptions::default()).unwrap();
    let log = LogStore::new(store.wal().clone(), SHARD);
    let purged = log.last_purged().unwrap();
    let sm = StateMachine::open(&store, SHARD, purged.as_ref());
    (store, log, sm)
}

#[tokio::test]
async fn compare_and_set_is_decided_at_apply_time_within_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, _log, sm) = open(dir.path());
    let mut sm = sm.unwrap();
    let key = b"x".to_vec();
    let cmds = [
        Command::CompareAndSet {
            key: key.clone(),
            expected: None,
            new: Some(b"a".to_vec()),
        }, // absent → set: applied
        Command::CompareAndSet {
            key: key.clone(),
            expected: None,
            new: Some(b"b".to_vec()),
        }, // no longer absent: fails, sees "a" at version 1
        Command::CompareAndSet {
            key: key.clone(),
            expected: Some(b"a".to_vec()),
            new: None,
        }, // matches → delete
        Command::Delete { key: key.clone() }, // already gone
    ];
    let batch: Vec<Entry> = cmds
        .iter()
        .enumerate()
        .map(|(i, c)| normal_entry(log_id(1, 1, i as u64 + 1), c.clone()))
        .collect();
    // All four in one batch: each later command must see the earlier ones' effects.
    let results = sm.apply_entries(batch).unwrap();
    assert_eq!(
        results,
        vec![
            CommandResult::CasApplied,
            CommandResult::CasFailed {
                current: Some(VersionedValue {
                    version: 1,
                    value: b"a".to_vec()
                })
            },
            CommandResult::CasApplied,
            CommandResult::Delete { existed: false },
        ]
    );
    assert_eq!(sm.get(&key).unwrap(), None);
    assert_eq!(sm.last_applied().unwrap(), Some(log_id(1, 1, 4)));
}

#[tokio::test]
async fn a_state_machine_behind_the_purge_point_is_restored_from_its_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_store, mut log, sm) = open(dir.path());
        let mut sm = sm.unwrap();
        append(&mut log, &entries(1..=100)).await;
        apply(&mut sm, &entries(1..=100)).await.unwrap();
        let snapshot = sm
            .try_create_snapshot_builder(true)
            .await
            .unwrap()
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(snapshot.meta.last_log_id, Some(log_id(1, 1, 100)));
        log.purge(log_id(1, 1, 100)).await.unwrap();
        append(&mut log, &entries(101..=120)).await;
        apply(&mut sm, &entries(101..=120)).await.unwrap();
    }
    {
        // sled lost everything it had not fsynced: here, the whole tree.
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        store.state_tree(SHARD).unwrap().clear().unwrap();
    }
    let (_store, mut log, sm) = open(dir.path());
    let mut sm = sm.expect("restored from snapshot");
    assert_eq!(
        sm.last_applied().unwrap(),
        Some(log_id(1, 1, 100)),
        "restored to the snapshot, not to the empty tree"
    );
    for key in 0..10 {
        assert_eq!(
            sm.get(format!("k{key}").as_bytes()).unwrap(),
            model(key, 100)
        );
    }
    // openraft then replays the WAL from there; do what it would.
    let rest = log.try_get_log_entries(101..).await.unwrap();
    assert_eq!(rest.len(), 20);
    apply(&mut sm, &rest).await.unwrap();
    for key in 0..10 {
        assert_eq!(
            sm.get(format!("k{key}").as_bytes()).unwrap(),
            model(key, 120)
        );
    }
}

#[tokio::test]
async fn a_purged_log_without_a_snapshot_is_a_typed_error_not_a_silent_gap() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_store, mut log, sm) = open(dir.path());
        drop(sm.unwrap());
        append(&mut log, &entries(1..=10)).await;
        log.purge(log_id(1, 1, 5)).await.unwrap(); // never done without a snapshot in practice
    }
    let (_store, _log, sm) = open(dir.path());
    let err = sm.expect_err("a gap between state machine and log must be refused");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("no snapshot"), "{err}");
}

#[tokio::test]
async fn a_snapshot_with_a_bad_checksum_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = {
        let (_store, mut log, sm) = open(dir.path());
        let mut sm = sm.unwrap();
        append(&mut log, &entries(1..=30)).await;
        apply(&mut sm, &entries(1..=30)).await.unwrap();
        let mut builder = sm.try_create_snapshot_builder(true).await.unwrap();
        let snapshot = builder.build_snapshot().await.unwrap();
        snapshot.snapshot.path().to_owned()
    };
    let mut bytes = fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    fs::write(&path, &bytes).unwrap();

    let (_store, _log, sm) = open(dir.path());
    let err = sm.expect_err("a damaged snapshot must not load");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(
        err.to_string().contains(&path.display().to_string())
            && err.to_string().contains("checksum"),
        "the error must name the file and the checksum: {err}"
    );
}

#[tokio::test]
async fn installing_a_damaged_snapshot_fails_and_leaves_the_state_machine_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let (_leader_store, mut leader_log, leader_sm) = open(&dir.path().join("leader"));
    let mut leader_sm = leader_sm.unwrap();
    append(&mut leader_log, &entries(1..=50)).await;
    apply(&mut leader_sm, &entries(1..=50)).await.unwrap();
    let snapshot = leader_sm
        .try_create_snapshot_builder(true)
        .await
        .unwrap()
        .build_snapshot()
        .await
        .unwrap();

    let (_store, mut log, sm) = open(&dir.path().join("follower"));
    let mut sm = sm.unwrap();
    append(&mut log, &entries(1..=3)).await;
    apply(&mut sm, &entries(1..=3)).await.unwrap();

    let path = snapshot.snapshot.path().to_owned();
    let mut bytes = fs::read(&path).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 0x40;
    fs::write(&path, &bytes).unwrap();
    let damaged = kvnode::storage::SnapshotFile::open(&path).unwrap();
    let err = sm
        .install_snapshot(&snapshot.meta, damaged)
        .await
        .expect_err("damaged snapshot installed");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    assert_eq!(sm.last_applied().unwrap(), Some(log_id(1, 1, 3)));
    assert_eq!(sm.get(b"k3").unwrap(), model(3, 3));
}

/// The META group's state machine: the map is one key, changed only by applied map changes,
/// published to the map view, skipped on replay, and carried by snapshots; key writes on META
/// and map changes on a data shard are refused as values.
#[tokio::test]
async fn the_meta_state_machine_keeps_the_map_and_refuses_foreign_commands() {
    use kvnode::cluster::MapView;
    use kvnode::cluster::membership::{Applied, META, MetaChange, MetaRejected};
    use kvnode::cluster::seed::seed_map;
    use kvnode::raft::command::MAP_KEY;
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("a"), StoreOptions::default()).unwrap();
    let config = kvnode::Config {
        shards: 4,
        ..kvnode::Config::single_node("unused")
    };
    let seed = seed_map(&config, 42).unwrap();

    // A data shard refuses a map change as a value and stores nothing.
    let mut data = StateMachine::open(&store, SHARD, None).unwrap();
    let results = data
        .apply_entries(vec![normal_entry(
            log_id(1, 1, 1),
            Command::Meta(MetaChange::Seed(seed.clone())),
        )])
        .unwrap();
    assert!(
        matches!(&results[..], [CommandResult::WrongGroup { reason }] if reason.contains("data shard")),
        "{results:?}"
    );
    assert_eq!(data.get(MAP_KEY).unwrap(), None);

    let view = Arc::new(MapView::default());
    let mut meta = StateMachine::open(&store, META, None).unwrap();
    meta.publish_map_to(Arc::clone(&view)).unwrap();
    assert_eq!(view.epoch(), 0);
    let set_addr = MetaChange::SetAddr {
        id: 1,
        addr: "h:1".into(),
    };
    let batch = vec![
        normal_entry(log_id(1, 1, 1), Command::Meta(set_addr.clone())),
        normal_entry(
            log_id(1, 1, 2),
            Command::Meta(MetaChange::Seed(seed.clone())),
        ),
        normal_entry(log_id(1, 1, 3), put(1)),
        normal_entry(
            log_id(1, 1, 4),
            Command::Meta(MetaChange::Seed(seed.clone())),
        ),
        normal_entry(log_id(1, 1, 5), Command::Meta(set_addr)),
    ];
    let results = meta.apply_entries(batch.clone()).unwrap();
    assert_eq!(
        results[0],
        CommandResult::Meta(Err(MetaRejected::NotSeeded { change: "SetAddr" }))
    );
    assert_eq!(results[1], CommandResult::Meta(Ok(Applied::Seeded)));
    assert!(
        matches!(&results[2], CommandResult::WrongGroup { reason } if reason.contains("META")),
        "{:?}",
        results[2]
    );
    assert_eq!(
        results[3],
        CommandResult::Meta(Err(MetaRejected::AlreadySeeded { epoch: 1 }))
    );
    assert_eq!(
        results[4],
        CommandResult::Meta(Ok(Applied::AddrSet { id: 1 }))
    );
    let map = view.current().expect("published");
    assert_eq!((map.epoch, map.cluster_uuid), (2, 42));
    assert_eq!(map.nodes[&1].addr, "h:1");
    assert_eq!(meta.get(MAP_KEY).unwrap().unwrap().version, 5);

    // Replayed after a crash (the map already holds index 5): every entry is skipped.
    let replayed = meta.apply_entries(batch[1..].to_vec()).unwrap();
    assert!(
        replayed
            .iter()
            .all(|r| matches!(r, CommandResult::NoOp | CommandResult::WrongGroup { .. }))
    );
    assert_eq!(view.current().unwrap(), map);

    // A snapshot carries the map to another replica, whose view learns it on install.
    let snapshot = meta
        .try_create_snapshot_builder(true)
        .await
        .unwrap()
        .build_snapshot()
        .await
        .unwrap();
    let other_store = Store::open(dir.path().join("b"), StoreOptions::default()).unwrap();
    let other_view = Arc::new(MapView::default());
    let mut other = StateMachine::open(&other_store, META, None).unwrap();
    other.publish_map_to(Arc::clone(&other_view)).unwrap();
    other
        .install_snapshot(&snapshot.meta, snapshot.snapshot.clone())
        .await
        .unwrap();
    assert_eq!(other_view.current().unwrap(), map);
    // And a reopened state machine publishes the stored map at once.
    drop(other);
    let reopened_view = Arc::new(MapView::default());
    let mut reopened = StateMachine::open(&other_store, META, None).unwrap();
    reopened.publish_map_to(Arc::clone(&reopened_view)).unwrap();
    assert_eq!(reopened_view.current().unwrap(), map);
}
