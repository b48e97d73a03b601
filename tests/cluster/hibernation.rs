//! Hibernation (`kvnode::hibernation`) with real processes: idle groups stop their timers on
//! every replica; a hibernating group serves a linearizable read through a follower, a lease
//! read and a write once the leader's lease lapsed (the read served as linearizable, the
//! write after a quorum round renews the lease), without any election; when the leader of a
//! hibernating group is killed, a follower notices through the node-level pings and a new
//! leader takes writes; the killed node rejoins and every group goes back to sleep.

use std::time::Duration;

use kvnode::pb::kv::{ReadLevel, ReadOptions, StatusResponse};

use super::harness::{Cluster, ELECTION_MAX_MS, failover_bound};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_groups_hibernate_serve_requests_and_fail_over() {
    let mut cluster = Cluster::start(3).await;
    cluster.wait_all_shards_led(Duration::from_secs(30)).await;
    cluster
        .put_until_ok(1, b"sleepy", b"one", Duration::from_secs(30))
        .await
        .expect("first put");
    cluster.wait_all_hibernating(Duration::from_secs(30)).await;

    // A follower's linearizable read needs a read index from the hibernating leader: the
    // leader runs a quorum round although its heartbeats are off.
    let (shard, leader, follower) = cluster.leader_and_follower(b"sleepy").await;
    assert_eq!(
        cluster
            .get_linearizable(follower, b"sleepy")
            .await
            .expect("linearizable read on a hibernating group")
            .as_deref(),
        Some(&b"one"[..])
    );
    cluster.wait_all_hibernating(Duration::from_secs(30)).await;

    // A lease read on a hibernating leader once its lease (the election timeout maximum from
    // the last heartbeat acknowledged) has lapsed: it runs a quorum round instead and says it
    // served a linearizable read.
    tokio::time::sleep(Duration::from_millis(ELECTION_MAX_MS + 500)).await;
    let lease = cluster
        .get_with(
            leader,
            b"sleepy",
            ReadOptions {
                level: ReadLevel::Lease as i32,
                ..Default::default()
            },
        )
        .await
        .expect("lease read on a hibernating leader");
    assert_eq!(lease.value.map(|v| v.value).as_deref(), Some(&b"one"[..]));
    let receipt = lease.receipt.expect("receipt");
    assert_eq!(receipt.level(), ReadLevel::Linearizable, "{receipt:?}");
    cluster.wait_all_hibernating(Duration::from_secs(30)).await;

    // A write through a follower once the sleeping leader's lease has lapsed: openraft refuses
    // writes on such a leader, so it renews the lease with a quorum round first and the write
    // succeeds; only the leader wakes, so nobody campaigns (same leader, same term).
    tokio::time::sleep(Duration::from_millis(ELECTION_MAX_MS + 500)).await;
    let term = |status: Option<StatusResponse>| {
        status
            .and_then(|s| s.shards.into_iter().find(|v| v.shard == shard))
            .map(|v| v.term)
    };
    let term_before = term(cluster.status(leader).await);
    if let Err(e) = cluster.put(follower, b"sleepy", b"one").await {
        panic!(
            "put through a follower of a hibernating group: {e:?}\n{}",
            cluster.all_logs()
        );
    }
    tokio::time::sleep(Duration::from_millis(ELECTION_MAX_MS)).await;
    assert_eq!(cluster.leader_of(shard).await, Some(leader));
    assert_eq!(term(cluster.status(leader).await), term_before);
    cluster.wait_all_hibernating(Duration::from_secs(30)).await;

    // kill -9 the leader while its group sleeps: no heartbeat will ever be missed, so the
    // followers must notice through the pings; the same bound as an awake group's failover.
    cluster.kill(leader);
    let took = cluster
        .put_until_ok(follower, b"sleepy", b"two", Duration::from_secs(30))
        .await
        .expect("writes resume after the hibernating leader is killed");
    let bound = failover_bound();
    println!("hibernating group: leader {leader} of shard {shard} killed; write ok after {took:?}");
    assert!(took <= bound, "failover took {took:?}, bound {bound:?}");

    // The killed node rejoins, catches up, and the whole cluster falls asleep again.
    cluster.restart(leader).await;
    cluster
        .wait_caught_up(leader, shard, Duration::from_secs(30))
        .await;
    cluster.wait_all_hibernating(Duration::from_secs(30)).await;
    assert_eq!(
        cluster
            .get_eventual(leader, b"sleepy")
            .await
            .expect("eventual read on the rejoined node")
            .as_deref(),
        Some(&b"two"[..])
    );
    cluster.stop_all().await;
}
