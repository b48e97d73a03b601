//! One replica move done by hand (issue 17, milestone M4 mechanics, design D6): the steps the
//! rebalancer will drive, on a four-node in-process cluster under a write load. `StartMove`
//! names a new replica on node 4; node 4 opens it empty; the shard's leader adds it as a
//! learner, waits until it matched the commit index observed, replaces the voters (joint, then
//! uniform, guarded by the membership's log id); `FinishMove` records the observed voters; the
//! removed replica's node closes it and retires its state. Every acknowledged write is then
//! readable at `lin` through node 4 and node 1, the removed node holds nothing of the shard, and
//! the map's voters equal the group's membership.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use kvnode::cluster::membership::{
    Applied, ClusterMap, META, MetaChange, MetaRejected, MoveReason, Replica,
};
use kvnode::{Config, Error, ReadOptions};
use kvnode_testkit::LocalCluster;

use crate::eventually;

const SHARDS: u32 = 6;

fn configure(config: &mut Config) {
    config.cluster_id = "move-test".to_string();
    config.shards = SHARDS;
    config.retired_gc_after_ms = 0;
}

/// Proposes `change` through whichever node's META replica leads, until one applies it.
async fn propose(local: &LocalCluster, change: MetaChange) -> Result<Applied, MetaRejected> {
    eventually(20, "META's leader to apply the change", || {
        let change = change.clone();
        async move {
            for node in local.running() {
                if node.local_shard(META).is_none() {
                    continue;
                }
                match node.propose_meta(change.clone()).await {
                    Ok(result) => return Some(result),
                    Err(Error::NotLeader { .. }) => continue,
                    Err(_) => continue,
                }
            }
            None
        }
    })
    .await
}

/// The newest map among the running nodes.
fn newest_map(local: &LocalCluster) -> Arc<ClusterMap> {
    local
        .running()
        .filter_map(|n| n.cluster_map())
        .max_by_key(|m| m.epoch)
        .expect("a map is known")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_by_hand_under_load_keeps_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalCluster::start(dir.path(), 4, configure).await;
    let map = eventually(20, "every node to know the seeded map", || async {
        let maps: Vec<_> = local
            .running()
            .map(|n| n.cluster_map())
            .collect::<Option<_>>()?;
        maps.windows(2)
            .all(|w| w[0] == w[1])
            .then(|| Arc::clone(&maps[0]))
    })
    .await;
    // A shard node 4 does not hold, with a leader; the replica removed is node 3's unless
    // node 3 leads, then another follower's (the leader is not moved: no transfer here).
    let (shard, voters) = map
        .shards
        .iter()
        .find(|(s, e)| **s != META && e.voters.iter().all(|r| r.node != 4))
        .map(|(s, e)| (*s, e.voters.clone()))
        .expect("some shard is not on node 4");
    let holder = voters[0].node;
    let leader = eventually(20, "the shard to have a leader", || async {
        local.node(holder).local_shard(shard)?.leader_node()
    })
    .await;
    let gone = if leader != 3 && voters.iter().any(|r| r.node == 3) {
        3
    } else {
        voters
            .iter()
            .map(|r| r.node)
            .find(|n| *n != leader)
            .unwrap()
    };
    let removed = voters.iter().find(|r| r.node == gone).unwrap().id;
    let writer = *[1, 2, 3]
        .iter()
        .find(|n| **n != gone && voters.iter().any(|r| r.node == **n))
        .unwrap();

    // The load: writes of fresh keys of `shard` through the leader's node until stopped, each
    // acknowledged one kept (a key is written once, so its value is the acknowledged one).
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let load = {
        let nodes: Vec<_> = local.running().cloned().collect();
        let stop = Arc::clone(&stop);
        let count = Arc::clone(&count);
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut target = writer;
            let keys = (0u64..)
                .map(|i| format!("move-{i}").into_bytes())
                .filter(|k| nodes[0].shard_for(k) == shard);
            for key in keys {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let node = &nodes[target as usize - 1];
                match node.put(&key, key.clone()).await {
                    Ok(_) => {
                        acked.push(key);
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(Error::NotLeader { leader_hint, .. }) => {
                        target = leader_hint.filter(|n| *n != gone).unwrap_or(writer);
                    }
                    Err(_) => {}
                }
            }
            acked
        })
    };

    eventually(20, "the load to get going", || async {
        (count.load(Ordering::Relaxed) >= 20).then_some(())
    })
    .await;
    // StartMove: a new replica on node 4, node `gone`'s leaves.
    let started = propose(
        &local,
        MetaChange::StartMove {
            shard,
            add: Some(4),
            remove: Some(removed),
            reason: MoveReason::Balance,
        },
    )
    .await
    .expect("StartMove applies");
    let Applied::MoveStarted {
        move_id,
        add: Some(added),
        ..
    } = started
    else {
        panic!("StartMove answered {started:?}");
    };
    assert_eq!(added.node, 4);
    assert_ne!(added.id, 4, "a fresh replica id, not the node id");
    // Node 4 opens the new replica, empty and uninitialized.
    eventually(20, "node 4 to open the new replica", || async {
        let replica = local.node(4).local_shard(shard)?;
        (replica.replica_id() == added.id).then_some(())
    })
    .await;

    // The leader adds it as a learner and waits until it matched the commit index it observed.
    let lead = local.node(leader).local_shard(shard).unwrap();
    lead.add_learner(added.id, 4).await.unwrap();
    let observed = lead.view().commit_index.unwrap();
    eventually(30, "the learner to catch up", || async {
        (lead.matched(added.id)? >= observed).then_some(())
    })
    .await;
    let before = lead.membership();
    assert!(!before.is_joint());
    assert_eq!(before.learners.get(&added.id), Some(&4));
    let mut next: BTreeSet<u64> = before.voters[0].keys().copied().collect();
    next.remove(&removed);
    next.insert(added.id);
    let after = lead
        .replace_voters(next.clone(), &before.log_id)
        .await
        .unwrap();
    assert!(!after.is_joint(), "joint, then uniform: {after:?}");
    assert_eq!(
        after.voters[0].keys().copied().collect::<BTreeSet<_>>(),
        next
    );
    // The same step again, on the old membership's log id, changes nothing.
    assert!(
        lead.replace_voters(next.clone(), &before.log_id)
            .await
            .is_err()
    );

    let observed_voters: Vec<Replica> = after.voters[0]
        .iter()
        .map(|(id, node)| Replica {
            id: *id,
            node: *node,
        })
        .collect();
    let finished = propose(
        &local,
        MetaChange::FinishMove {
            shard,
            move_id,
            voters: observed_voters,
        },
    )
    .await;
    assert!(
        matches!(finished, Ok(Applied::MoveFinished { .. })),
        "{finished:?}"
    );

    // The removed replica closes and, with no grace period, is retired.
    eventually(
        30,
        "the removed replica to close and be retired",
        || async {
            let node = local.node(gone);
            (node.local_shard(shard).is_none() && !node.store().wal().shards().contains(&shard))
                .then_some(())
        },
    )
    .await;
    let at_finish = count.load(Ordering::Relaxed);
    eventually(20, "writes to be acknowledged after the move", || async {
        (count.load(Ordering::Relaxed) >= at_finish + 20).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let acked = load.await.unwrap();

    for via in [4, 1] {
        for key in &acked {
            let got = eventually(20, "a linearizable read", || async {
                local
                    .node(via)
                    .get(key, &ReadOptions::linearizable())
                    .await
                    .ok()
            })
            .await;
            assert_eq!(
                got.value.map(|v| v.value).as_deref(),
                Some(key.as_slice()),
                "an acknowledged write read through node {via}"
            );
        }
    }
    // Node `gone` hosts no replica of the shard: a request there is not served locally (the
    // server forwards it, `server::kv::forward_target`).
    assert!(matches!(
        local
            .node(gone)
            .get(&acked[0], &ReadOptions::linearizable())
            .await,
        Err(Error::Unavailable { .. })
    ));
    // The map's voters equal the group's membership.
    let map = newest_map(&local);
    let in_map: BTreeSet<u64> = map.shards[&shard].voters.iter().map(|r| r.id).collect();
    let group = local.node(4).local_shard(shard).unwrap().membership();
    assert!(!group.is_joint());
    assert_eq!(in_map, group.voters[0].keys().copied().collect());
    assert!(map.shards[&shard].pending.is_none());
    local.close().await;
}
