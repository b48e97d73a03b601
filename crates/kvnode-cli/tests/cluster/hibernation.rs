//! Hibernation (`kvnode::hibernation`) with real processes: idle groups stop their timers on
//! every replica; a hibernating group serves a linearizable read through a follower, a lease
//! read and a write once the leader's lease lapsed (the read served as linearizable, the
//! write after a quorum round renews the lease), without any election; when the leader of a
//! hibernating group is killed, a follower notices through the node-level pings and a new
//! leader takes writes; the killed node rejoins and every group goes back to sleep.
//!
//! One-way reachability, in process ([`InProcess`], whose peer links a test can cut in one
//! direction with `Peers::cut_off_outbound`): a follower whose pings to its hibernating
//! leader still succeed, but which the leader's node can no longer send to, wakes; when the
//! leader's node can send to neither follower, they elect a new leader, which takes writes.

use std::time::Duration;

use kvnode::pb::kv::{ReadLevel, ReadOptions, StatusResponse};

use super::harness::{Cluster, ELECTION_MAX_MS, InProcess, failover_bound};

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
    // served a linearizable read. On a loaded machine something can wake the group during the
    // wait (a heartbeat acknowledged renews the lease, and then `lease` is the right answer),
    // so the wait is tried again, a few times: a leader that kept serving lease reads on a
    // lapsed lease would answer `lease` every time.
    let mut receipts = Vec::new();
    for _ in 0..5 {
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
        cluster.wait_all_hibernating(Duration::from_secs(30)).await;
        if receipt.level() == ReadLevel::Linearizable {
            receipts.clear();
            break;
        }
        receipts.push(receipt);
    }
    assert!(
        receipts.is_empty(),
        "a hibernating leader whose lease lapsed served lease reads 5 times: {receipts:?}"
    );

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

/// A one-shard, three-node in-process cluster whose group has hibernated on every replica;
/// returns it, the leader, and the two followers.
async fn hibernated_in_process() -> (InProcess, u64, [u64; 2]) {
    let c = InProcess::start(|config| {
        config.hibernate_after_ms = 300;
        config.request_timeout_ms = 1500;
    })
    .await;
    let leader = c.leader_among(&[1, 2, 3], Duration::from_secs(20)).await;
    c.put_through(&[leader], b"k", b"v", Duration::from_secs(20))
        .await;
    c.wait_hibernating(&[1, 2, 3], Duration::from_secs(20))
        .await;
    let mut followers = (1..=3).filter(|id| *id != leader);
    let followers = [
        followers.next().expect("two followers"),
        followers.next().expect("two followers"),
    ];
    (c, leader, followers)
}

/// Asserts that `follower`'s ping to `leader` is answered, listing the shard as led: the
/// evidence that kept a follower asleep before it also needed to hear from its leader.
async fn assert_ping_answered(c: &InProcess, follower: u64, leader: u64) {
    let reply = c
        .local
        .peers(follower)
        .ping(leader, 0, Duration::from_secs(1))
        .await
        .expect("the follower's ping to the leader is answered");
    assert!(reply.leading.contains(&InProcess::SHARD), "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hibernating_follower_its_leader_cannot_send_to_wakes_though_its_pings_succeed() {
    let (c, leader, [cut, other]) = hibernated_in_process().await;

    // From now on the leader's node sends nothing to `cut`'s node (no heartbeat, no ping),
    // while `cut`'s pings to it are still answered. Nothing else changes until `cut` wakes
    // (every other replica sleeps or leads), so it wakes on the missing inbound half alone;
    // and it stays awake while the cut lasts, whoever leads, so polling cannot miss it.
    c.local.peers(leader).cut_off_outbound([cut]);
    assert_ping_answered(&c, cut, leader).await;
    kvnode_testkit::eventually(
        Duration::from_secs(10),
        "the follower the leader cannot send to to wake (timers on)",
        || async { (!c.hibernating(cut)).then_some(()) },
    )
    .await;
    // The group still takes writes (the leader and `other` are a majority both ways).
    c.put_through(&[leader, other, cut], b"k", b"w", Duration::from_secs(20))
        .await;

    c.local.heal();
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hibernating_leader_that_cannot_send_to_a_majority_is_replaced() {
    let (c, leader, followers) = hibernated_in_process().await;

    // The leader's node can send to neither follower; both still reach it.
    c.local.peers(leader).cut_off_outbound(followers);
    for f in followers {
        assert_ping_answered(&c, f, leader).await;
    }
    // From the first wake on, some follower stays awake: the one that woke, until it follows
    // a new leader, which is awake itself (the old leader cannot reach it). The other one may
    // sleep through the election: it need not wake to vote.
    kvnode_testkit::eventually(
        Duration::from_secs(10),
        "a follower to wake (timers on)",
        || async { followers.iter().any(|f| !c.hibernating(*f)).then_some(()) },
    )
    .await;
    let new_leader = c.leader_among(&followers, Duration::from_secs(20)).await;
    assert_ne!(new_leader, leader);
    // Its old leader cannot reach it: its timers stay on.
    assert!(!c.hibernating(new_leader));
    c.put_through(&followers, b"k", b"after", Duration::from_secs(20))
        .await;

    c.local.heal();
    c.close().await;
}
