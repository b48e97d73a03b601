//! The embedded API of a single local node: put / get / delete / compare-and-set, receipts at
//! every read level, reopen, bad input, identity checks, and a model test against a BTreeMap
//! across close and reopen.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use kvnode::consistency::{ServedLevel, Staleness};
use kvnode::{Config, Error, Node, ReadOptions, SessionToken};
use kvnode_testkit::Rng;

fn config(dir: &Path) -> Config {
    Config {
        shards: 8,
        ..Config::single_node(dir)
    }
}

async fn value(node: &Node, key: &[u8]) -> Option<Vec<u8>> {
    node.get(key, &ReadOptions::linearizable())
        .await
        .unwrap()
        .value
        .map(|v| v.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_delete_and_compare_and_set_behave_like_a_map_with_versions() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(config(dir.path())).await.unwrap();

    let w1 = node.put(b"a", b"1".to_vec()).await.unwrap();
    assert_eq!(w1.shard, node.shard_for(b"a"));
    let got = node.get(b"a", &ReadOptions::linearizable()).await.unwrap();
    let v = got.value.unwrap();
    assert_eq!((v.value.as_slice(), v.version), (&b"1"[..], w1.index));

    // CAS: absent-as-expected on a new key, delete-as-new, and a mismatch that is a value.
    let c = node
        .compare_and_set(b"b", None, Some(b"x".to_vec()))
        .await
        .unwrap();
    assert!(c.applied);
    let c = node
        .compare_and_set(b"b", None, Some(b"y".to_vec()))
        .await
        .unwrap();
    assert!(!c.applied);
    assert_eq!(c.current.as_ref().unwrap().value, b"x");
    let c = node.compare_and_set(b"b", Some(b"x"), None).await.unwrap();
    assert!(c.applied);
    assert_eq!(value(&node, b"b").await, None);

    let w2 = node.put(b"a", b"2".to_vec()).await.unwrap();
    assert!(w2.index > w1.index || w2.shard != w1.shard);
    let d = node.delete(b"a").await.unwrap();
    assert!(d.existed);
    assert!(!node.delete(b"a").await.unwrap().existed);
    assert_eq!(value(&node, b"a").await, None);
    node.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_level_is_served_with_a_receipt_saying_what_was_served() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(config(dir.path())).await.unwrap();
    let w = node.put(b"k", b"v".to_vec()).await.unwrap();
    let mut session = SessionToken::new();
    session.observe_write(&w);

    // No read-index round yet: an eventual read cannot bound its staleness.
    let first = node.get(b"k", &ReadOptions::eventual()).await.unwrap();
    assert_eq!(first.receipt.staleness, Staleness::Unknown);

    let cases = [
        (ReadOptions::linearizable(), ServedLevel::Linearizable),
        (ReadOptions::lease(), ServedLevel::Lease),
        (ReadOptions::session(&session), ServedLevel::Session),
        (
            ReadOptions::bounded(Duration::from_millis(500)),
            ServedLevel::Bounded,
        ),
        (ReadOptions::eventual(), ServedLevel::Eventual),
    ];
    for (options, level) in cases {
        let got = node.get(b"k", &options).await.unwrap();
        assert_eq!(got.value.unwrap().value, b"v", "{level}");
        let r = got.receipt;
        assert_eq!((r.level, r.node, r.shard), (level, 1, w.shard));
        assert!(
            r.applied_index >= w.index,
            "{level}: served state must include the write"
        );
        match (level, r.staleness) {
            (ServedLevel::Linearizable | ServedLevel::Lease, Staleness::Zero) => {}
            // After the linearizable read above, the replica can prove how fresh it is.
            (_, Staleness::AtMost(d)) => assert!(d <= Duration::from_millis(500), "{level}: {d:?}"),
            (level, other) => panic!("{level}: unexpected staleness {other:?}"),
        }
    }
    node.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopening_brings_back_every_acknowledged_write_across_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    // Small snapshot interval: shards snapshot and purge their logs many times.
    let cfg = Config {
        snapshot_every_entries: 20,
        ..config(dir.path())
    };
    let mut expected = BTreeMap::new();
    {
        let node = Node::open(cfg.clone()).await.unwrap();
        for i in 0..400u32 {
            let key = format!("key-{}", i % 97).into_bytes();
            let val = format!("value-{i}").into_bytes();
            node.put(&key, val.clone()).await.unwrap();
            expected.insert(key, val);
        }
        node.close().await;
    }
    let node = Node::open(cfg).await.unwrap();
    for (key, val) in &expected {
        let got = node.get(key, &ReadOptions::eventual()).await.unwrap();
        assert_eq!(got.value.map(|v| v.value).as_ref(), Some(val));
    }
    let snapshots = std::fs::read_dir(dir.path().join("snapshots"))
        .unwrap()
        .count();
    assert!(snapshots > 0, "the test wants snapshots to have happened");
    node.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        max_key_bytes: 16,
        max_value_bytes: 64,
        ..config(dir.path())
    };
    let node = Node::open(cfg).await.unwrap();
    node.put(b"keep", b"me".to_vec()).await.unwrap();

    let too_long_key = vec![b'k'; 17];
    let too_big_value = vec![b'v'; 65];
    let results = [
        ("empty key", node.put(b"", b"x".to_vec()).await.err()),
        (
            "key of 17 bytes",
            node.put(&too_long_key, b"x".to_vec()).await.err(),
        ),
        (
            "value of 65 bytes",
            node.put(b"k", too_big_value.clone()).await.err(),
        ),
        (
            "expected value of 65 bytes",
            node.compare_and_set(b"k", Some(&too_big_value), None)
                .await
                .err(),
        ),
        (
            "new value of 65 bytes",
            node.compare_and_set(b"k", None, Some(too_big_value))
                .await
                .err(),
        ),
        (
            "key of 17 bytes",
            node.get(&too_long_key, &ReadOptions::eventual())
                .await
                .err(),
        ),
        ("empty key", node.delete(b"").await.err()),
    ];
    for (what, err) in results {
        let err = err.unwrap_or_else(|| panic!("{what} was accepted"));
        assert!(matches!(err, Error::InvalidArgument(_)), "{what}: {err}");
        assert!(err.is_definite() && !err.is_retryable(), "{what}: {err}");
        assert!(
            err.to_string().contains(what),
            "'{err}' should mention {what}"
        );
    }
    assert_eq!(value(&node, b"keep").await.as_deref(), Some(&b"me"[..]));
    assert_eq!(
        value(&node, b"k").await,
        None,
        "nothing was written by refused requests"
    );
    node.put(b"after", b"ok".to_vec()).await.unwrap();
    node.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_config_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config {
        shards: 0,
        ..config(dir.path())
    };
    match Node::open(cfg).await {
        Err(Error::Config(e)) => assert_eq!(e.field, "shards"),
        other => panic!("expected a config error, got {other:?}"),
    }
    assert!(
        !dir.path().join("FORMAT").exists(),
        "nothing is created for an invalid config"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_made_with_another_shard_count_or_node_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(config(dir.path())).await.unwrap();
    node.put(b"x", b"1".to_vec()).await.unwrap();
    node.close().await;

    for cfg in [
        Config {
            shards: 16,
            ..config(dir.path())
        },
        Config {
            node_id: 2,
            ..config(dir.path())
        },
    ] {
        let err = Node::open(cfg)
            .await
            .expect_err("identity mismatch accepted");
        assert!(matches!(err, Error::IdentityMismatch { .. }), "{err}");
        assert!(err.to_string().contains("8 shards"), "{err}");
    }
    // The original configuration still opens, with its data.
    let node = Node::open(config(dir.path())).await.unwrap();
    assert_eq!(value(&node, b"x").await.as_deref(), Some(&b"1"[..]));
    node.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_operations_agree_with_a_btreemap_model_across_reopens() {
    for seed in [1u64, 2, 3] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config {
            snapshot_every_entries: 50,
            ..config(dir.path())
        };
        let mut rng = Rng::new(seed);
        // key → (value, version)
        let mut model: BTreeMap<Vec<u8>, (Vec<u8>, u64)> = BTreeMap::new();
        let mut node = Node::open(cfg.clone()).await.unwrap();
        for step in 0..500u64 {
            let key = format!("k{}", rng.below(25)).into_bytes();
            let ctx = format!(
                "seed {seed} step {step} key {}",
                String::from_utf8_lossy(&key)
            );
            match rng.below(10) {
                0..=2 => {
                    let v = format!("v{step}").into_bytes();
                    let w = node.put(&key, v.clone()).await.unwrap();
                    model.insert(key, (v, w.index));
                }
                3 => {
                    let d = node.delete(&key).await.unwrap();
                    assert_eq!(d.existed, model.remove(&key).is_some(), "{ctx}");
                }
                4..=5 => {
                    // Expect the right value half the time, a wrong one otherwise.
                    let current = model.get(&key).map(|(v, _)| v.clone());
                    let expected = if rng.below(2) == 0 {
                        current.clone()
                    } else {
                        Some(b"wrong".to_vec())
                    };
                    let new = if rng.below(4) == 0 {
                        None
                    } else {
                        Some(format!("c{step}").into_bytes())
                    };
                    let c = node
                        .compare_and_set(&key, expected.as_deref(), new.clone())
                        .await
                        .unwrap();
                    assert_eq!(c.applied, expected == current, "{ctx}");
                    if c.applied {
                        match new {
                            Some(n) => model.insert(key, (n, c.receipt.index)),
                            None => model.remove(&key),
                        };
                    } else {
                        let seen = c.current.map(|v| (v.value, v.version));
                        assert_eq!(
                            seen.as_ref(),
                            model.get(&key),
                            "{ctx}: CAS failure reports the current value"
                        );
                    }
                }
                6..=8 => {
                    let options = if rng.below(2) == 0 {
                        ReadOptions::linearizable()
                    } else {
                        ReadOptions::eventual()
                    };
                    let got = node.get(&key, &options).await.unwrap();
                    let got = got.value.map(|v| (v.value, v.version));
                    assert_eq!(got.as_ref(), model.get(&key), "{ctx}");
                }
                _ => {
                    if rng.below(8) == 0 {
                        node.close().await;
                        node = Node::open(cfg.clone()).await.unwrap();
                    }
                }
            }
        }
        // Everything, after a final reopen.
        node.close().await;
        let node = Node::open(cfg).await.unwrap();
        for k in 0..25 {
            let key = format!("k{k}").into_bytes();
            let got = node.get(&key, &ReadOptions::linearizable()).await.unwrap();
            let got = got.value.map(|v| (v.value, v.version));
            assert_eq!(got.as_ref(), model.get(&key), "seed {seed} final key k{k}");
        }
        node.close().await;
    }
}

/// Review finding 3 (issue 15): the keys of an apply become visible one by one before the
/// applied index is published, so a read in that window can serve a key's newer write; its
/// receipt (and a session token built from it) must cover that write, for a value and for a
/// delete's tombstone alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_covers_the_served_keys_own_write_during_an_apply() {
    use kvnode::raft::apply_stall::Stage;

    let dir = tempfile::tempdir().unwrap();
    let node = std::sync::Arc::new(Node::open(config(dir.path())).await.unwrap());
    let shard = node.shard_for(b"k");
    node.put(b"k", b"1".to_vec()).await.unwrap();
    let stall = node.local_shard(shard).unwrap().apply_stall();

    for (what, write) in [("a put", Some(b"2".to_vec())), ("a delete", None)] {
        stall.hold(Stage::BeforePublish);
        let writer = {
            let node = std::sync::Arc::clone(&node);
            tokio::spawn(async move {
                match write {
                    Some(v) => node.put(b"k", v).await.map(|w| w.index),
                    None => node.delete(b"k").await.map(|d| d.receipt.index),
                }
            })
        };
        // The write's key is in the tree, its index not published yet.
        tokio::time::timeout(Duration::from_secs(20), async {
            while stall.waiting() == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the write's apply to reach the held stage");
        // (A linearizable read would wait for the apply: its read index covers every apply
        // already started.)
        let mut receipts = Vec::new();
        for options in [ReadOptions::eventual(), ReadOptions::eventual()] {
            let got = node.get(b"k", &options).await.unwrap();
            if let Some(v) = &got.value {
                assert!(
                    got.receipt.applied_index >= v.version,
                    "{what}: served version {} under a receipt at {}",
                    v.version,
                    got.receipt.applied_index
                );
            }
            receipts.push(got);
        }
        stall.release();
        let index = writer.await.unwrap().unwrap();
        for got in receipts {
            // Served the write in flight (the key's newest state) ...
            assert_eq!(
                got.value.as_ref().map(|v| v.version),
                (what == "a put").then_some(index),
                "{what}"
            );
            // ... so a session that saw it must never read anything older.
            assert!(
                got.receipt.applied_index >= index,
                "{what} at {index} served under a receipt at {}",
                got.receipt.applied_index
            );
        }
    }
    std::sync::Arc::try_unwrap(node).unwrap().close().await;
}
