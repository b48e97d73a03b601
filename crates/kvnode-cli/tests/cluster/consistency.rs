//! Read levels against real processes: a follower paused with SIGSTOP and resumed does not
//! serve a bounded-staleness read older than its bound, a restarted replica does not serve a
//! session read older than the session's token, and an eventual read after a pause does not
//! claim to be fresher than it is.

use std::time::{Duration, Instant};

use kvnode::pb::kv::{GetResponse, ReadLevel, ReadOptions, SessionToken, ShardIndex};
use tonic::Code;

use crate::harness::{self, Cluster};

/// The staleness bound of the bounded reads.
const BOUND_MS: u64 = 1000;
/// How long a follower stays stopped: longer than the bound.
const PAUSE: Duration = Duration::from_millis(1500);

/// Puts through `node` until it succeeds; the write's log index.
async fn put_acked(cluster: &Cluster, node: u64, key: &[u8], value: &[u8]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match cluster.put_with_receipt(node, key, value).await {
            Ok(receipt) => return receipt.index,
            Err(e) => assert!(
                Instant::now() < deadline,
                "put {:?} through node {node}: {}: {}",
                String::from_utf8_lossy(value),
                e.code(),
                e.message()
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn bounded(fail_if_stale: bool) -> ReadOptions {
    ReadOptions {
        level: ReadLevel::Bounded as i32,
        max_staleness_ms: BOUND_MS,
        fail_if_stale,
        ..Default::default()
    }
}

fn value_of(r: &GetResponse) -> Option<String> {
    r.value
        .as_ref()
        .map(|v| String::from_utf8_lossy(&v.value).into_owned())
}

/// One read's outcome, for failure messages and the printed summary.
fn describe(r: &Result<GetResponse, tonic::Status>) -> String {
    match r {
        Ok(r) => format!("{:?} {:?}", value_of(r), r.receipt),
        Err(e) => format!("error {}: {}", e.code(), e.message()),
    }
}

/// Gives `follower` a fresh freshness proof for the key's shard (a bounded read with the
/// linearizable fallback runs a read-index round there), then checks that a bounded read is
/// served locally by it with `expected`.
async fn fresh_proof(cluster: &Cluster, follower: u64, key: &[u8], expected: &str) {
    let first = cluster.get_with(follower, key, bounded(false)).await;
    let r = first.as_ref().unwrap_or_else(|e| {
        panic!(
            "bounded read on node {follower}: {}: {}",
            e.code(),
            e.message()
        )
    });
    let receipt = r.receipt.as_ref().expect("a receipt");
    assert_eq!(receipt.node, follower, "{}", describe(&first));
    assert_eq!(
        value_of(r).as_deref(),
        Some(expected),
        "{}",
        describe(&first)
    );

    let local = cluster.get_with(follower, key, bounded(true)).await;
    let r = local.as_ref().unwrap_or_else(|e| {
        panic!(
            "bounded read (fail_if_stale) on node {follower} right after a proof: {}: {}",
            e.code(),
            e.message()
        )
    });
    let receipt = r.receipt.as_ref().expect("a receipt");
    assert_eq!(receipt.node, follower, "{}", describe(&local));
    assert_eq!(receipt.level(), ReadLevel::Bounded, "{}", describe(&local));
    assert!(
        receipt.staleness_known && receipt.staleness_ms <= BOUND_MS,
        "{}",
        describe(&local)
    );
    assert_eq!(
        value_of(r).as_deref(),
        Some(expected),
        "{}",
        describe(&local)
    );
}

/// Pauses `follower`, writes `new` through `leader` while it is stopped, waits longer than the
/// bound, resumes it and reads right away with bounded reads (`fail_if_stale` as given): every
/// successful read must return `new`, every receipt at level BOUNDED must carry a known
/// staleness within the bound, and with `fail_if_stale` every failure must be UNAVAILABLE.
/// Returns how many reads succeeded.
async fn pause_write_resume_and_read(
    cluster: &mut Cluster,
    leader: u64,
    follower: u64,
    key: &[u8],
    new: &str,
    fail_if_stale: bool,
) -> usize {
    cluster.pause(follower);
    let stopped = Instant::now();
    put_acked(cluster, leader, key, new.as_bytes()).await;
    let acked = Instant::now();
    tokio::time::sleep(PAUSE).await;
    cluster.resume(follower);
    let resumed = Instant::now();
    println!(
        "node {follower} stopped for {:?}; {new:?} acked {:?} before the resume",
        resumed - stopped,
        resumed - acked
    );

    let mut outcomes = Vec::new();
    let deadline = resumed + Duration::from_secs(3);
    for _ in 0..20 {
        if Instant::now() > deadline {
            break;
        }
        let sent = Instant::now();
        let read = cluster
            .get_with(follower, key, bounded(fail_if_stale))
            .await;
        let line = format!(
            "sent {:>5} ms after resume ({:>5} ms after the ack), took {:>4} ms: {}",
            (sent - resumed).as_millis(),
            (sent - acked).as_millis(),
            sent.elapsed().as_millis(),
            describe(&read)
        );
        outcomes.push(line.clone());
        match &read {
            Ok(r) => {
                let receipt = r.receipt.as_ref().expect("a receipt");
                assert_eq!(
                    value_of(r).as_deref(),
                    Some(new),
                    "a bounded read (max {BOUND_MS} ms, fail_if_stale {fail_if_stale}) on node \
                     {follower} returned a value superseded {} ms earlier:\n{}",
                    (sent - acked).as_millis(),
                    outcomes.join("\n")
                );
                match receipt.level() {
                    ReadLevel::Bounded => assert!(
                        receipt.staleness_known && receipt.staleness_ms <= BOUND_MS,
                        "a bounded receipt without a staleness within the bound: {line}"
                    ),
                    ReadLevel::Linearizable => assert!(
                        !fail_if_stale,
                        "fell back to a linearizable read despite fail_if_stale: {line}"
                    ),
                    other => panic!("a bounded read served at level {other:?}: {line}"),
                }
            }
            Err(e) if fail_if_stale => assert_eq!(
                e.code(),
                Code::Unavailable,
                "fail_if_stale must fail with UNAVAILABLE: {line}"
            ),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "bounded reads on node {follower} after the resume (fail_if_stale {fail_if_stale}):\n{}",
        outcomes.join("\n")
    );
    outcomes.iter().filter(|l| !l.contains("error")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_follower_does_not_serve_a_bounded_read_older_than_its_bound() {
    let mut cluster = Cluster::start(3).await;
    cluster.wait_all_shards_led(Duration::from_secs(30)).await;
    let key = b"bounded-after-pause";
    let (shard, leader, follower) = cluster.leader_and_follower(key).await;
    println!("shard {shard}: leader {leader}, paused follower {follower}");

    put_acked(&cluster, leader, key, b"v1").await;
    cluster
        .wait_caught_up(follower, shard, Duration::from_secs(10))
        .await;
    fresh_proof(&cluster, follower, key, "v1").await;

    // With fail_if_stale: each read returns v2 or fails with UNAVAILABLE.
    pause_write_resume_and_read(&mut cluster, leader, follower, key, "v2", true).await;

    // With the linearizable fallback: each successful read returns v3, and the fallback does
    // succeed (the leader is up).
    cluster
        .wait_caught_up(follower, shard, Duration::from_secs(10))
        .await;
    fresh_proof(&cluster, follower, key, "v2").await;
    let served =
        pause_write_resume_and_read(&mut cluster, leader, follower, key, "v3", false).await;
    assert!(
        served > 0,
        "no bounded read with the linearizable fallback succeeded after the resume"
    );
    cluster.stop_all().await;
}

/// A session read for `key` on `shard` with a token that has seen `index` there.
fn session(shard: u64, index: u64) -> ReadOptions {
    ReadOptions {
        level: ReadLevel::Session as i32,
        session: Some(SessionToken {
            seen: vec![ShardIndex { shard, index }],
        }),
        ..Default::default()
    }
}

/// Checks one session read on `node` with a token at `index` on `shard`: served only as
/// `expected` from a state that includes the token's index, by `node` at level SESSION;
/// otherwise failed with UNAVAILABLE. Returns whether it was served.
fn check_session_read(
    read: &Result<GetResponse, tonic::Status>,
    node: u64,
    shard: u64,
    index: u64,
    expected: &str,
    line: &str,
) -> bool {
    match read {
        Ok(r) => {
            let receipt = r.receipt.as_ref().expect("a receipt");
            assert!(
                value_of(r).as_deref() == Some(expected)
                    && receipt.applied_index >= index
                    && receipt.node == node
                    && receipt.shard == shard
                    && receipt.level() == ReadLevel::Session,
                "a session read on restarted node {node} with token {{shard {shard}: {index}}} \
                 (expecting {expected:?}) served older state: {line}"
            );
            true
        }
        Err(e) => {
            assert_eq!(
                e.code(),
                Code::Unavailable,
                "a session read that cannot be served must fail with UNAVAILABLE: {line}"
            );
            false
        }
    }
}

/// Kills `follower`, writes 100 intermediate values and then `value` through `leader` (so a
/// restarted replica has a stretch of log to catch up on before it reaches the token, and any
/// intermediate value read back would be stale). Returns the token index (`value`'s).
async fn kill_and_write_past(
    cluster: &mut Cluster,
    leader: u64,
    follower: u64,
    key: &[u8],
    value: &str,
) -> u64 {
    cluster.kill(follower);
    for i in 0..100 {
        put_acked(cluster, leader, key, format!("{value}-mid-{i}").as_bytes()).await;
    }
    put_acked(cluster, leader, key, value.as_bytes()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_does_not_serve_a_session_read_older_than_the_token() {
    let mut cluster = Cluster::start(3).await;
    cluster.wait_all_shards_led(Duration::from_secs(30)).await;
    let key = b"session-after-restart";
    let (shard, leader, follower) = cluster.leader_and_follower(key).await;
    let other = (1..=3).find(|n| *n != leader && *n != follower).unwrap();
    println!("shard {shard}: leader {leader}, restarted follower {follower}");

    put_acked(&cluster, leader, key, b"v1").await;
    cluster
        .wait_caught_up(follower, shard, Duration::from_secs(10))
        .await;

    // 1. kill -9, writes, restart, and session reads as soon as the replica answers Status.
    let index = kill_and_write_past(&mut cluster, leader, follower, key, "v2").await;
    cluster.restart(follower).await;
    let restarted = Instant::now();
    // Four readers, staggered, so the replica's catch-up is sampled while session reads wait.
    let reader = |delay_ms: u64| {
        let cluster = &cluster;
        async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            let deadline = restarted + Duration::from_secs(20);
            let mut outcomes = Vec::new();
            let mut served = 0;
            while served < 3 && Instant::now() < deadline {
                let sent = Instant::now();
                let read = cluster.get_with(follower, key, session(shard, index)).await;
                let line = format!(
                    "sent {:>5} ms after the restart, took {:>4} ms: {}",
                    (sent - restarted).as_millis(),
                    sent.elapsed().as_millis(),
                    describe(&read)
                );
                if check_session_read(&read, follower, shard, index, "v2", &line) {
                    served += 1;
                } else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                outcomes.push(line);
            }
            (served, outcomes)
        }
    };
    let results =
        futures::future::join_all([reader(0), reader(100), reader(200), reader(300)]).await;
    for (i, (served, outcomes)) in results.iter().enumerate() {
        println!(
            "session reader {i} on node {follower} (token index {index}): {served} served\n{}",
            outcomes.join("\n")
        );
    }
    assert!(
        results.iter().all(|(served, _)| *served > 0),
        "node {follower} served no session read within 20 s of its restart"
    );

    // 2. The same, but the replica restarts while both other nodes are stopped, so it cannot
    // catch up: every session read must fail until they resume, then one must succeed.
    let index = kill_and_write_past(&mut cluster, leader, follower, key, "v3").await;
    cluster.pause(leader);
    cluster.pause(other);
    cluster.restart(follower).await;
    let restarted = Instant::now();
    let mut outcomes = Vec::new();
    while restarted.elapsed() < Duration::from_secs(3) {
        let sent = Instant::now();
        let read = cluster.get_with(follower, key, session(shard, index)).await;
        let line = format!(
            "sent {:>5} ms after the restart (nodes {leader} and {other} stopped), took {:>4} ms: {}",
            (sent - restarted).as_millis(),
            sent.elapsed().as_millis(),
            describe(&read)
        );
        let served = check_session_read(&read, follower, shard, index, "v3", &line);
        outcomes.push(line);
        assert!(
            !served,
            "node {follower} served a session read it cannot have caught up for:\n{}",
            outcomes.join("\n")
        );
    }
    cluster.resume(leader);
    cluster.resume(other);
    let resumed = Instant::now();
    let mut served = 0;
    while served < 3 && resumed.elapsed() < Duration::from_secs(20) {
        let sent = Instant::now();
        let read = cluster.get_with(follower, key, session(shard, index)).await;
        let line = format!(
            "sent {:>5} ms after the others resumed, took {:>4} ms: {}",
            (sent - resumed).as_millis(),
            sent.elapsed().as_millis(),
            describe(&read)
        );
        if check_session_read(&read, follower, shard, index, "v3", &line) {
            served += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        outcomes.push(line);
    }
    println!(
        "session reads on node {follower} restarted alone (token index {index}):\n{}",
        outcomes.join("\n")
    );
    assert!(
        served > 0,
        "node {follower} served no session read within 20 s of the others resuming"
    );
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eventual_reads_on_a_paused_and_resumed_follower_say_how_stale_they_may_be() {
    let mut cluster = Cluster::start(3).await;
    cluster.wait_all_shards_led(Duration::from_secs(30)).await;
    let key = b"eventual-after-pause";
    let (shard, leader, follower) = cluster.leader_and_follower(key).await;
    println!("shard {shard}: leader {leader}, paused follower {follower}");

    put_acked(&cluster, leader, key, b"v1").await;
    cluster
        .wait_caught_up(follower, shard, Duration::from_secs(10))
        .await;
    fresh_proof(&cluster, follower, key, "v1").await;

    cluster.pause(follower);
    let stopped = Instant::now();
    put_acked(&cluster, leader, key, b"v2").await;
    let acked = Instant::now();
    tokio::time::sleep(PAUSE).await;
    let pause = stopped.elapsed();
    cluster.resume(follower);
    let resumed = Instant::now();

    let eventual = ReadOptions {
        level: ReadLevel::Eventual as i32,
        ..Default::default()
    };
    let mut outcomes = Vec::new();
    for _ in 0..10 {
        let sent = Instant::now();
        let read = cluster.get_with(follower, key, eventual.clone()).await;
        let line = format!(
            "sent {:>5} ms after the resume (stopped {} ms, v2 acked {} ms before), took {:>4} ms: {}",
            (sent - resumed).as_millis(),
            pause.as_millis(),
            (sent - acked).as_millis(),
            sent.elapsed().as_millis(),
            describe(&read)
        );
        outcomes.push(line.clone());
        let r = read.unwrap_or_else(|_| panic!("an eventual read failed: {line}"));
        let receipt = r.receipt.as_ref().expect("a receipt");
        assert_eq!(receipt.level(), ReadLevel::Eventual, "{line}");
        assert_eq!(receipt.node, follower, "{line}");
        if receipt.staleness_known {
            // The last proof predates the pause, and nothing since refreshed it.
            assert!(
                receipt.staleness_ms >= pause.as_millis() as u64,
                "an eventual read claims to be fresher than the pause allows: {line}"
            );
            if value_of(&r).as_deref() == Some("v1") {
                assert!(
                    receipt.staleness_ms >= (sent - acked).as_millis() as u64,
                    "v1 served with a staleness bound smaller than its age: {line}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "eventual reads on node {follower} after the resume:\n{}",
        outcomes.join("\n")
    );
    cluster.stop_all().await;
}

/// Pauses the leader of `key`'s shard until another node leads it, overwrites the key there,
/// and resumes the old leader with linearizable reads already queued on connections made
/// before the pause. Returns each read's outcome and how many returned the overwritten value.
async fn resume_a_deposed_leader_with_reads_queued(
    cluster: &mut Cluster,
    key: &[u8],
) -> (Vec<String>, usize) {
    let (shard, old, _) = cluster.leader_and_follower(key).await;
    put_acked(cluster, old, key, b"old").await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(cluster.client(old).await.expect("connect to the leader"));
    }
    cluster.pause(old);
    let others: Vec<u64> = (1..=3).filter(|n| *n != old).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let new = loop {
        let mut leader = None;
        for n in &others {
            if let Some(s) = cluster.status(*n).await
                && s.shards
                    .iter()
                    .any(|v| v.shard == shard && v.role == "leader")
            {
                leader = Some(*n);
            }
        }
        if let Some(l) = leader {
            break l;
        }
        assert!(
            Instant::now() < deadline,
            "no new leader of shard {shard} while {old} is paused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    put_acked(cluster, new, key, b"new").await;
    println!("shard {shard}: leader {old} paused, {new} elected and acknowledged \"new\"");

    let reads: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let key = key.to_vec();
            tokio::spawn(async move {
                client
                    .get(kvnode::pb::kv::GetRequest {
                        key,
                        options: Some(ReadOptions {
                            level: ReadLevel::Linearizable as i32,
                            ..Default::default()
                        }),
                    })
                    .await
                    .map(tonic::Response::into_inner)
            })
        })
        .collect();
    // Let the requests reach the stopped process's sockets, then resume it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.resume(old);
    let mut outcomes = Vec::new();
    let mut stale = 0;
    for read in reads {
        let read = read.await.expect("read task");
        if matches!(&read, Ok(r) if value_of(r).as_deref() == Some("old")) {
            stale += 1;
        }
        outcomes.push(describe(&read));
    }
    (outcomes, stale)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_resumed_after_a_pause_does_not_serve_a_stale_linearizable_read() {
    let mut cluster = Cluster::start(3).await;
    cluster.wait_all_shards_led(Duration::from_secs(30)).await;
    for round in 0..3 {
        let key = format!("deposed-{round}");
        let (outcomes, stale) =
            resume_a_deposed_leader_with_reads_queued(&mut cluster, key.as_bytes()).await;
        println!("round {round}:\n{}", outcomes.join("\n"));
        assert_eq!(
            stale,
            0,
            "a deposed leader served the overwritten value to a linearizable read:\n{}",
            outcomes.join("\n")
        );
        cluster.wait_all_shards_led(Duration::from_secs(30)).await;
    }
    cluster.stop_all().await;
}

/// The check above can fail: with replicas that confirm any leadership check (the planted
/// `confirm-any-vote` bug), the resumed leader serves the overwritten value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deposed_leader_check_catches_replicas_that_confirm_any_vote() {
    let mut cluster =
        Cluster::start_with_env(3, &[("KVNODE_PLANTED_BUG", "confirm-any-vote")]).await;
    cluster.wait_all_shards_led(Duration::from_secs(30)).await;
    let mut log = Vec::new();
    let mut caught = false;
    for round in 0..5 {
        let key = format!("planted-deposed-{round}");
        let (outcomes, stale) =
            resume_a_deposed_leader_with_reads_queued(&mut cluster, key.as_bytes()).await;
        log.push(format!("round {round}:\n{}", outcomes.join("\n")));
        if stale > 0 {
            caught = true;
            break;
        }
        cluster.wait_all_shards_led(Duration::from_secs(30)).await;
    }
    println!("{}", log.join("\n"));
    assert!(
        caught,
        "the planted bug served no stale read:\n{}",
        log.join("\n")
    );
    cluster.stop_all().await;
}

/// Review finding 8 (issue 15): test and bench builds compile the planted-bug hooks into the
/// library, so the `kvnode` binary of such a build has them too; it must never arm one, even
/// with `KVNODE_PLANTED_BUG` set. Only the test-only `kvnode-planted` binary does, and it says
/// so in its log and in every `Status` reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_test_only_binary_arms_a_planted_bug_and_it_says_so() {
    const BUG: (&str, &str) = ("KVNODE_PLANTED_BUG", "leader-no-confirm");
    let mut real = Cluster::start_binary(1, &[BUG], harness::KVNODE).await;
    let status = real.status(1).await.expect("status of kvnode");
    assert_eq!(
        status.planted_bug, "",
        "the kvnode binary armed a planted bug"
    );
    assert!(!real.all_logs().contains("PLANTED"), "{}", real.all_logs());
    real.stop_all().await;

    let mut planted = Cluster::start_binary(1, &[BUG], harness::KVNODE_PLANTED).await;
    let status = planted.status(1).await.expect("status of kvnode-planted");
    assert_eq!(status.planted_bug, "leader-no-confirm");
    let logs = planted.all_logs();
    assert!(logs.contains("TEST BUILD WITH PLANTED-BUG HOOKS"), "{logs}");
    assert!(logs.contains("planted bug: leader-no-confirm"), "{logs}");
    planted.stop_all().await;

    let mut clean = Cluster::start_binary(1, &[], harness::KVNODE_PLANTED).await;
    let status = clean.status(1).await.expect("status of kvnode-planted");
    assert_eq!(status.planted_bug, "none");
    clean.stop_all().await;
}
