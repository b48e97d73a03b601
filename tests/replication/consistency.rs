//! The consistency levels under a network partition, on three in-process nodes over real
//! sockets whose peer links a test can cut ([`Peers::cut_off`]) and restore ([`Peers::heal`]).
//!
//! - A follower cut off from its group (the minority side) still answers eventual reads with a
//!   staleness bound, and bounded-staleness reads while its last freshness proof is within the
//!   bound; linearizable reads, session reads beyond what it applied, writes, and bounded
//!   reads past the bound fail fast. After the partition heals it serves the latest write.
//! - A deposed leader cut off from the majority never serves a linearizable read, and stops
//!   serving lease reads once its lease lapsed, while the majority elects a new leader and
//!   acknowledges writes.
//! - Linearizable reads on followers see every write acknowledged before they began, under
//!   concurrent writes, and are served locally with a zero-staleness receipt.
//! - Concurrent linearizable reads share node-level leadership checks, with no openraft round.
//!
//! Run with `RUST_LOG=kvnode=info,openraft=warn` to see elections.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::time::sleep;

use kvnode::consistency::{Fallback, ServedLevel, Staleness};
use kvnode::raft::apply_stall::Stage;
use kvnode::{Config, Error, GetReply, Node, ReadLevel, ReadOptions, SessionToken, WriteReceipt};
use kvnode_testkit::LocalCluster;

use crate::eventually;

const CLUSTER: &str = "consistency-test";
/// One shard: every key lives in shard 0, replicated on all three nodes.
const SHARD: u64 = 0;
const KEY: &[u8] = b"k";
const HEARTBEAT_MS: u64 = 100;
const ELECTION_MIN_MS: u64 = 400;
const ELECTION_MAX_MS: u64 = 800;
const REQUEST_TIMEOUT: Duration = Duration::from_millis(1500);

/// Three nodes, ids 1..=3, each on its own 127.0.0.1 port (the shared in-process harness).
struct Cluster {
    _dir: tempfile::TempDir,
    local: LocalCluster,
}

fn configure(config: &mut Config) {
    config.cluster_id = CLUSTER.to_string();
    config.shards = 1;
    config.heartbeat_interval_ms = HEARTBEAT_MS;
    config.election_timeout_min_ms = ELECTION_MIN_MS;
    config.election_timeout_max_ms = ELECTION_MAX_MS;
    config.request_timeout_ms = REQUEST_TIMEOUT.as_millis() as u64;
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

    fn role(&self, id: u64, shard: u64) -> &'static str {
        self.node(id).local_shard(shard).unwrap().view().role
    }

    /// Waits until one of `among` leads `shard` and the others of `among` know it; returns it.
    async fn leader_among(&self, shard: u64, among: &[u64]) -> u64 {
        let what = format!("a leader of shard {shard} among nodes {among:?}");
        eventually(20, &what, || async {
            let leader = *among.iter().find(|id| self.role(**id, shard) == "leader")?;
            among
                .iter()
                .all(|id| self.node(*id).local_shard(shard).unwrap().view().leader == Some(leader))
                .then_some(leader)
        })
        .await
    }

    /// Waits until shard `shard` has a leader that all three nodes know.
    async fn leader_of(&self, shard: u64) -> u64 {
        self.leader_among(shard, &[1, 2, 3]).await
    }

    /// Symmetric partition: `isolated` on one side, the two others on the other.
    fn partition(&self, isolated: u64) {
        self.local.partition(isolated);
    }

    fn heal(&self) {
        self.local.heal();
    }

    /// Writes `value` to `key` through one of `among` (whichever leads, retrying across leader
    /// changes; rewriting the same value is harmless).
    async fn put(&self, among: &[u64], key: &[u8], value: &[u8]) -> WriteReceipt {
        let what = format!("a write of {:?}", String::from_utf8_lossy(value));
        eventually(20, &what, || async {
            for id in among {
                if let Ok(w) = self.node(*id).put(key, value.to_vec()).await {
                    return Some(w);
                }
            }
            None
        })
        .await
    }

    /// Stops every server and closes every node (tasks holding a node must be done).
    async fn close(self) {
        self.local.close().await
    }
}

fn value(reply: &GetReply) -> Option<&[u8]> {
    reply.value.as_ref().map(|v| v.value.as_slice())
}

/// After healing: polls linearizable reads on node `id` until one succeeds; every success must
/// return `expected` (the latest write acknowledged before healing). Panics with the last error
/// and every node's view if none succeeds within `secs` seconds.
async fn linearizable_after_heal(c: &Cluster, id: u64, expected: &[u8], secs: u64) -> GetReply {
    let healed = Instant::now();
    let deadline = healed + Duration::from_secs(secs);
    loop {
        match c.node(id).get(KEY, &ReadOptions::linearizable()).await {
            Ok(r) => {
                assert_eq!(
                    value(&r),
                    Some(expected),
                    "node {id}'s first linearizable read after healing ({:?})",
                    r.receipt
                );
                println!(
                    "healed: node {id} served the latest write after {:?}",
                    healed.elapsed()
                );
                return r;
            }
            Err(e) if Instant::now() >= deadline => {
                let views: Vec<_> = (1..=3)
                    .map(|n| (n, c.node(n).local_shard(SHARD).unwrap().view()))
                    .collect();
                panic!(
                    "node {id} served no linearizable read within {secs} s of healing; \
                     last error: {e}; views: {views:#?}"
                );
            }
            Err(_) => sleep(Duration::from_millis(50)).await,
        }
    }
}

fn bounded(max_staleness: Duration, fallback: Fallback) -> ReadOptions {
    ReadOptions {
        level: ReadLevel::Bounded {
            max_staleness,
            fallback,
        },
    }
}

/// Reads with `options` on `node`, and how long it took.
async fn timed_get(node: &Node, options: &ReadOptions) -> (kvnode::Result<GetReply>, Duration) {
    let started = Instant::now();
    let got = node.get(KEY, options).await;
    (got, started.elapsed())
}

fn is_unavailable(r: &kvnode::Result<GetReply>) -> bool {
    matches!(r, Err(Error::Unavailable { .. }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn minority_side_behaviour() {
    const BOUND: Duration = Duration::from_secs(2);
    let c = Cluster::start().await;
    let leader = c.leader_of(SHARD).await;
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let (f, other) = (followers[0], followers[1]);
    let majority = [leader, other];
    let node_f = Arc::clone(c.node(f));

    let w1 = c.put(&[leader], KEY, b"w1").await;
    // A linearizable read on F: served there, and it leaves F a freshness proof.
    let r = node_f.get(KEY, &ReadOptions::linearizable()).await.unwrap();
    assert_eq!(value(&r), Some(&b"w1"[..]));
    assert_eq!(r.receipt.node, f);
    assert_eq!(r.receipt.level, ServedLevel::Linearizable);
    assert!(r.receipt.applied_index >= w1.index);

    c.partition(f);

    // Eventual: answers, with W's value and a small staleness bound.
    let (ev, _) = timed_get(&node_f, &ReadOptions::eventual()).await;
    let ev = ev.expect("eventual reads are always served");
    assert_eq!(value(&ev), Some(&b"w1"[..]));
    assert_eq!(ev.receipt.level, ServedLevel::Eventual);
    assert_eq!(ev.receipt.node, f);
    match ev.receipt.staleness {
        Staleness::AtMost(d) => assert!(d < Duration::from_secs(1), "staleness {d:?}"),
        other => panic!("eventual receipt after a read-index round: {other:?}"),
    }

    // Bounded: served locally while the last proof is within the bound.
    let (b, _) = timed_get(&node_f, &ReadOptions::bounded(BOUND)).await;
    let b = b.expect("a bounded read within the bound is served");
    assert_eq!(value(&b), Some(&b"w1"[..]));
    assert_eq!(b.receipt.level, ServedLevel::Bounded);
    assert_eq!(b.receipt.node, f);
    match b.receipt.staleness {
        Staleness::AtMost(d) => assert!(d <= BOUND, "staleness {d:?} beyond the bound"),
        other => panic!("bounded receipt: {other:?}"),
    }

    // Linearizable: fails fast with Unavailable (the leader cannot be asked).
    let (lin, took) = timed_get(&node_f, &ReadOptions::linearizable()).await;
    assert!(
        is_unavailable(&lin),
        "linearizable on the minority: {lin:?}"
    );
    assert!(took < REQUEST_TIMEOUT, "took {took:?}");
    println!("minority follower: linearizable read failed after {took:?}: {lin:?}");

    // Writes through F fail; a timeout would be indeterminate.
    let started = Instant::now();
    let put = node_f.put(KEY, b"minority".to_vec()).await;
    println!(
        "minority follower: write failed after {:?}: {put:?}",
        started.elapsed()
    );
    match &put {
        Ok(w) => panic!("a write through the minority side was acknowledged: {w:?}"),
        Err(e @ Error::Timeout { .. }) => assert!(!e.is_definite(), "{e:?}"),
        Err(e) => assert!(
            matches!(e, Error::NotLeader { .. } | Error::Unavailable { .. }),
            "{e:?}"
        ),
    }

    // The majority keeps writing; a session that saw that write is beyond F.
    let w2 = c.put(&majority, KEY, b"w2").await;
    let f_applied = node_f
        .local_shard(SHARD)
        .unwrap()
        .view()
        .applied_index
        .unwrap_or(0);
    assert!(f_applied < w2.index, "F applied {f_applied} ≥ {}", w2.index);
    let mut token = SessionToken::new();
    token.observe_write(&w2);
    let (session, took) = timed_get(&node_f, &ReadOptions::session(&token)).await;
    assert!(is_unavailable(&session), "session beyond F: {session:?}");
    assert!(took < REQUEST_TIMEOUT, "took {took:?}");
    println!("minority follower: session read failed after {took:?}: {session:?}");
    // A session F has caught up with is served.
    let mut old = SessionToken::new();
    old.observe_write(&w1);
    let s = node_f
        .get(KEY, &ReadOptions::session(&old))
        .await
        .expect("a session F has caught up with");
    assert_eq!(value(&s), Some(&b"w1"[..]));
    assert_eq!(s.receipt.level, ServedLevel::Session);

    // The majority side serves linearizable reads of the new write, on both of its nodes.
    for id in majority {
        let r = c
            .node(id)
            .get(KEY, &ReadOptions::linearizable())
            .await
            .unwrap_or_else(|e| panic!("majority node {id}: {e}"));
        assert_eq!(value(&r), Some(&b"w2"[..]), "majority node {id}");
        assert_eq!(r.receipt.node, id);
    }

    // Past the bound: the eventual receipt says so, and bounded reads fail.
    let age = eventually(10, "F's proof to age past the bound", || async {
        let r = node_f.get(KEY, &ReadOptions::eventual()).await.ok()?;
        assert_eq!(value(&r), Some(&b"w1"[..]));
        match r.receipt.staleness {
            Staleness::AtMost(d) if d > BOUND => Some(d),
            Staleness::AtMost(_) => None,
            other => panic!("eventual receipt: {other:?}"),
        }
    })
    .await;
    let (failed, took) = timed_get(&node_f, &bounded(BOUND, Fallback::Fail)).await;
    assert!(
        is_unavailable(&failed),
        "bounded (fail) with a {age:?}-old proof: {failed:?}"
    );
    assert!(took < REQUEST_TIMEOUT, "took {took:?}");
    let (fell_back, took) = timed_get(&node_f, &ReadOptions::bounded(BOUND)).await;
    assert!(
        is_unavailable(&fell_back),
        "bounded (linearizable fallback) with a {age:?}-old proof: {fell_back:?}"
    );
    assert!(took < REQUEST_TIMEOUT, "took {took:?}");
    println!("minority follower past the bound ({age:?}): {failed:?} / {fell_back:?}");

    // And the majority still writes; after healing, F serves the latest write.
    let w3 = c.put(&majority, KEY, b"w3").await;
    c.heal();
    let r = linearizable_after_heal(&c, f, b"w3", 20).await;
    assert!(r.receipt.applied_index >= w3.index);
    assert_eq!(r.receipt.node, f);
    drop(node_f);
    c.close().await;
}

/// One read attempted on the isolated leader.
#[derive(Debug)]
struct Attempt {
    level: &'static str,
    /// Since the partition.
    started: Duration,
    finished: Duration,
    outcome: Result<Option<Vec<u8>>, Error>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn isolated_leader_never_serves_a_linearizable_read() {
    let c = Cluster::start().await;
    let l = c.leader_of(SHARD).await;
    let others: Vec<u64> = (1..=3).filter(|id| *id != l).collect();
    c.put(&[l], KEY, b"w1").await;
    let node_l = Arc::clone(c.node(l));
    let r = node_l.get(KEY, &ReadOptions::linearizable()).await.unwrap();
    assert_eq!(value(&r), Some(&b"w1"[..]));

    c.partition(l);
    let cut = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));

    // Probe L every 50 ms at three levels; every probe runs on its own, so a slow failure does
    // not thin out the probing.
    let prober = tokio::spawn({
        let (node, stop) = (Arc::clone(&node_l), Arc::clone(&stop));
        async move {
            let mut probes = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                for (level, options) in [
                    ("linearizable", ReadOptions::linearizable()),
                    ("lease", ReadOptions::lease()),
                    ("eventual", ReadOptions::eventual()),
                ] {
                    let node = Arc::clone(&node);
                    probes.push(tokio::spawn(async move {
                        let started = cut.elapsed();
                        let outcome = node
                            .get(KEY, &options)
                            .await
                            .map(|r| r.value.map(|v| v.value));
                        Attempt {
                            level,
                            started,
                            finished: cut.elapsed(),
                            outcome,
                        }
                    }));
                }
                sleep(Duration::from_millis(50)).await;
            }
            let mut attempts = Vec::new();
            for p in probes {
                attempts.push(p.await.unwrap());
            }
            attempts
        }
    });
    // A write on the minority side: never acknowledged.
    let minority_write = tokio::spawn({
        let node = Arc::clone(&node_l);
        async move {
            let started = Instant::now();
            let put = node.put(KEY, b"minority".to_vec()).await;
            (put, started.elapsed())
        }
    });

    // The majority elects a new leader and acknowledges W2.
    let new_leader = c.leader_among(SHARD, &others).await;
    let elected = cut.elapsed();
    assert_ne!(new_leader, l);
    c.put(&others, KEY, b"w2").await;
    let w2_acked = cut.elapsed();
    for id in &others {
        let r = c
            .node(*id)
            .get(KEY, &ReadOptions::linearizable())
            .await
            .unwrap_or_else(|e| panic!("majority node {id}: {e}"));
        assert_eq!(value(&r), Some(&b"w2"[..]), "majority node {id}");
    }
    // Keep probing for 3 s in all, and for at least 1 s after W2 was acknowledged.
    let until = (w2_acked + Duration::from_secs(1)).max(Duration::from_secs(3));
    sleep(until.saturating_sub(cut.elapsed())).await;
    stop.store(true, Ordering::SeqCst);
    let attempts = prober.await.unwrap();
    let (put, put_took) = minority_write.await.unwrap();

    println!(
        "isolated leader {l}: node {new_leader} elected after {elected:?}, W2 acked after {w2_acked:?}"
    );
    println!("minority write on the old leader: {put:?} after {put_took:?}");
    match &put {
        Ok(w) => panic!("the isolated leader acknowledged a write: {w:?}"),
        Err(e @ Error::Timeout { .. }) | Err(e @ Error::LeaderChanged { .. }) => {
            assert!(!e.is_definite(), "{e:?}")
        }
        Err(_) => {}
    }

    let of =
        |level: &str| -> Vec<&Attempt> { attempts.iter().filter(|a| a.level == level).collect() };
    let lin = of("linearizable");
    let lease = of("lease");
    let eventual = of("eventual");
    let max_lin = lin.iter().map(|a| a.finished - a.started).max().unwrap();
    let max_lease = lease.iter().map(|a| a.finished - a.started).max().unwrap();
    let last_lease_ok = lease
        .iter()
        .filter(|a| a.outcome.is_ok())
        .map(|a| a.finished)
        .max();
    println!(
        "probes: {} linearizable (all failed, slowest {max_lin:?}), {} lease (last success ended at {last_lease_ok:?}, slowest {max_lease:?}), {} eventual",
        lin.len(),
        lease.len(),
        eventual.len()
    );

    println!(
        "first linearizable / lease failures: {:?} / {:?}",
        lin.iter().find_map(|a| a.outcome.as_ref().err()),
        lease.iter().find_map(|a| a.outcome.as_ref().err())
    );

    // No linearizable read on the isolated leader ever succeeds.
    let served: Vec<_> = lin.iter().filter(|a| a.outcome.is_ok()).collect();
    assert!(
        served.is_empty(),
        "the isolated leader served linearizable reads (W2 acked at {w2_acked:?}): {served:#?}"
    );
    // They fail with Unavailable, without waiting out more than the read-index round in flight
    // when they arrived plus their own (each ends when openraft gives up on a quorum, about
    // election_timeout_max, or at the request timeout).
    let round = REQUEST_TIMEOUT.min(Duration::from_millis(ELECTION_MAX_MS));
    let slow_or_wrong: Vec<_> = lin
        .iter()
        .filter(|a| {
            !matches!(a.outcome, Err(Error::Unavailable { .. }))
                || a.finished - a.started > 2 * round + Duration::from_millis(500)
        })
        .collect();
    assert!(
        slow_or_wrong.is_empty(),
        "linearizable reads on the isolated leader that did not fail with Unavailable within \
         two read-index rounds ({round:?} each): {slow_or_wrong:#?}"
    );
    // Nothing started after W2 was acknowledged may return anything but W2: L never has it.
    let stale: Vec<_> = attempts
        .iter()
        .filter(|a| a.level != "eventual" && a.started > w2_acked && a.outcome.is_ok())
        .collect();
    assert!(
        stale.is_empty(),
        "stale reads on the isolated leader after W2 was acked at {w2_acked:?}: {stale:#?}"
    );
    // The lease lapses (openraft's lease is election_timeout_max): after that, lease reads fail.
    let lapsed = Duration::from_millis(ELECTION_MAX_MS + 2 * HEARTBEAT_MS + 200);
    let late_leases: Vec<_> = lease
        .iter()
        .filter(|a| a.started > lapsed && a.outcome.is_ok())
        .collect();
    assert!(
        late_leases.is_empty(),
        "lease reads served after the lease must have lapsed ({lapsed:?}): {late_leases:#?}"
    );
    assert!(lease.iter().any(|a| a.outcome.is_err()));
    // Eventual reads keep answering, and never with uncommitted data.
    for a in &eventual {
        match &a.outcome {
            Ok(v) => assert_eq!(v.as_deref(), Some(&b"w1"[..]), "{a:?}"),
            Err(e) => panic!("an eventual read failed on the isolated leader: {e} ({a:?})"),
        }
    }

    // After healing, the old leader follows and serves W2.
    c.heal();
    let r = linearizable_after_heal(&c, l, b"w2", 20).await;
    assert_eq!(r.receipt.node, l);
    assert_ne!(c.role(l, SHARD), "leader");
    drop(node_l);
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follower_linearizable_reads_see_the_latest_acknowledged_write_under_concurrent_writes() {
    const RUN: Duration = Duration::from_secs(3);
    let c = Cluster::start().await;
    let leader = c.leader_of(SHARD).await;
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    c.put(&[leader], KEY, b"0").await;
    let acked = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));

    let writer = tokio::spawn({
        let (node, acked, done) = (
            Arc::clone(c.node(leader)),
            Arc::clone(&acked),
            Arc::clone(&done),
        );
        async move {
            let started = Instant::now();
            let (mut n, mut errors) = (0u64, Vec::new());
            while started.elapsed() < RUN {
                n += 1;
                match node.put(KEY, n.to_string().into_bytes()).await {
                    Ok(_) => acked.store(n, Ordering::SeqCst),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            done.store(true, Ordering::SeqCst);
            (n, errors)
        }
    });
    let readers: Vec<_> = followers
        .iter()
        .map(|&id| {
            let (node, acked, done) = (
                Arc::clone(c.node(id)),
                Arc::clone(&acked),
                Arc::clone(&done),
            );
            tokio::spawn(async move {
                let (mut reads, mut errors, mut violations) = (0u64, Vec::new(), Vec::new());
                let mut max_ahead = 0u64;
                while !done.load(Ordering::SeqCst) {
                    let acked_before = acked.load(Ordering::SeqCst);
                    match node.get(KEY, &ReadOptions::linearizable()).await {
                        Ok(r) => {
                            reads += 1;
                            let read: u64 = std::str::from_utf8(value(&r).unwrap_or(b"?"))
                                .ok()
                                .and_then(|s| s.parse().ok())
                                .unwrap_or_else(|| panic!("undecodable value {r:?}"));
                            max_ahead = max_ahead.max(read.saturating_sub(acked_before));
                            let receipt_ok = r.receipt.level == ServedLevel::Linearizable
                                && r.receipt.node == id
                                && r.receipt.staleness == Staleness::Zero;
                            if read < acked_before || !receipt_ok {
                                violations.push(format!(
                                    "node {id} read {read} after {acked_before} was acked: {:?}",
                                    r.receipt
                                ));
                            }
                        }
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                (id, reads, errors, violations, max_ahead)
            })
        })
        .collect();

    let (written, write_errors) = writer.await.unwrap();
    println!(
        "writer on leader {leader}: {written} writes, last acked {}, {} errors {:?}",
        acked.load(Ordering::SeqCst),
        write_errors.len(),
        write_errors.first()
    );
    let mut all_violations = Vec::new();
    for reader in readers {
        let (id, reads, errors, violations, max_ahead) = reader.await.unwrap();
        println!(
            "reader on follower {id}: {reads} linearizable reads, {} errors {:?}, {} violations, \
             read at most {max_ahead} ahead of the acked counter",
            errors.len(),
            errors.first(),
            violations.len()
        );
        assert!(reads >= 20, "node {id}: only {reads} reads ({errors:?})");
        all_violations.extend(violations);
    }
    assert!(
        all_violations.is_empty(),
        "stale or mislabelled follower reads: {all_violations:#?}"
    );
    println!(
        "leader read-index rounds: {}",
        c.node(leader)
            .local_shard(SHARD)
            .unwrap()
            .read_index_rounds()
    );
    c.close().await;
}

/// Concurrent linearizable reads share node-level leadership checks (see `kvnode::leadership`):
/// 200 reads on the leader or a follower cost at most 20 check rounds on the leader's node,
/// and an openraft read-index round only as the fallback when a check could not confirm (on a
/// quiet machine none; on a heavily loaded one a round can outlast the transport's timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coalesced_leadership_checks() {
    const READS: usize = 200;
    let c = Cluster::start().await;
    let leader = c.leader_of(SHARD).await;
    let w = c.put(&[leader], KEY, b"v").await;
    let shard = c.node(leader).local_shard(SHARD).unwrap();
    let checks = c.node(leader).leadership_checks();

    for reader in [leader, (1..=3).find(|id| *id != leader).unwrap()] {
        let node = c.node(reader);
        let options = ReadOptions::linearizable();
        let (rounds_before, raft_before, unconfirmed_before) = (
            checks.rounds(),
            shard.read_index_rounds(),
            checks.unconfirmed(),
        );
        let started = Instant::now();
        let replies = futures::future::join_all((0..READS).map(|_| node.get(KEY, &options))).await;
        let took = started.elapsed();
        let rounds = checks.rounds() - rounds_before;
        let raft_rounds = shard.read_index_rounds() - raft_before;
        let unconfirmed = checks.unconfirmed() - unconfirmed_before;
        for r in &replies {
            let r = r.as_ref().unwrap_or_else(|e| panic!("node {reader}: {e}"));
            assert_eq!(value(r), Some(&b"v"[..]));
            assert_eq!(r.receipt.level, ServedLevel::Linearizable);
            assert_eq!(r.receipt.node, reader);
            assert!(r.receipt.applied_index >= w.index);
        }
        let role = if reader == leader {
            "leader"
        } else {
            "follower"
        };
        println!(
            "{READS} concurrent linearizable reads on the {role} (node {reader}) in {took:?}: \
             {rounds} leadership-check rounds ({unconfirmed} checks unconfirmed) and \
             {raft_rounds} openraft rounds on the leader"
        );
        assert!(rounds >= 1);
        assert!(
            rounds <= 20,
            "{rounds} rounds for {READS} reads on the {role}"
        );
        assert!(
            raft_rounds == 0 || unconfirmed > 0,
            "{raft_rounds} reads fell back to openraft's round though every check confirmed"
        );
    }
    c.close().await;
}

/// Review finding 1 (issue 15): a leader's read index must cover what its followers already
/// applied, not just its own applied index. The leader's apply is held (as a snapshot build
/// holds it) while a write commits and a follower applies it; a linearizable read on that
/// follower sees the new value, so a linearizable read on the leader that starts afterwards
/// must never return the older one: it waits for the leader's apply (and fails while it is
/// held), then serves the new value.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_whose_apply_lags_its_commit_never_serves_an_older_value_than_a_follower_did() {
    let c = Cluster::start().await;
    let leader = c.leader_of(SHARD).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    c.put(&[leader], KEY, b"old").await;
    let stall = c.node(leader).local_shard(SHARD).unwrap().apply_stall();
    stall.hold(Stage::BeforeWrite);

    // Commits on a majority, but the leader cannot apply it, so it is not acknowledged yet.
    let writer = {
        let node = Arc::clone(c.node(leader));
        tokio::spawn(async move { node.put(KEY, b"new".to_vec()).await })
    };
    eventually(20, "the follower to apply the new value", || async {
        let r = c
            .node(follower)
            .get(KEY, &ReadOptions::eventual())
            .await
            .ok()?;
        (value(&r) == Some(&b"new"[..])).then_some(())
    })
    .await;
    assert!(
        stall.waiting() > 0,
        "the leader's apply should be held while the follower applied the write"
    );

    // Client A, on the follower.
    let a = c
        .node(follower)
        .get(KEY, &ReadOptions::linearizable())
        .await
        .expect("a linearizable read on the follower");
    assert_eq!(value(&a), Some(&b"new"[..]));

    // Client B, on the leader, after A's read returned.
    match c.node(leader).get(KEY, &ReadOptions::linearizable()).await {
        Ok(b) => assert_eq!(
            value(&b),
            Some(&b"new"[..]),
            "a linearizable read on the leader went back in time after a follower's ({:?} then {:?})",
            a.receipt,
            b.receipt
        ),
        Err(e) => assert!(
            matches!(e, Error::Timeout { .. } | Error::Unavailable { .. }),
            "unexpected error while the leader's apply is held: {e}"
        ),
    }

    stall.release();
    // The write may have timed out on its client meanwhile (indeterminate); it committed.
    let written = writer.await.unwrap();
    let b = c
        .node(leader)
        .get(KEY, &ReadOptions::linearizable())
        .await
        .expect("a linearizable read on the leader once its apply went on");
    assert_eq!(value(&b), Some(&b"new"[..]));
    if let Ok(written) = written {
        assert!(b.receipt.applied_index >= written.index);
    }
    c.close().await;
}

/// Review finding 2 (issue 15): a replica that led before a restart comes back as a follower
/// with its old vote, which its peers still hold until the next election. It must not hand
/// out a read index then (its applied state may be behind acknowledged writes): neither to a
/// read on itself nor to a follower that still names it leader. Election timeouts are set
/// far beyond the test's length, so the old vote is still held everywhere when it asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_leader_gives_no_read_index_before_it_is_elected_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut local = LocalCluster::start(dir.path(), 3, |config| {
        configure(config);
        config.election_timeout_min_ms = 60_000;
        config.election_timeout_max_ms = 90_000;
    })
    .await;
    // The group's initializer campaigns at once; nobody else will within the test.
    let leader = eventually(20, "a leader that every node knows", || async {
        let views: Vec<_> = (1..=3)
            .map(|id| local.node(id).local_shard(SHARD).unwrap().view())
            .collect();
        let leader = views[0].leader?;
        views
            .iter()
            .all(|v| v.leader == Some(leader))
            .then_some(leader)
    })
    .await;
    let written = local.node(leader).put(KEY, b"v".to_vec()).await.unwrap();
    let term = local.node(leader).local_shard(SHARD).unwrap().view().term;

    local.stop(leader).await;
    local.restart(leader).await;
    let restarted = local.node(leader).local_shard(SHARD).unwrap();
    assert_ne!(restarted.view().role, "leader");

    let own = restarted.leader_read_index().await;
    assert!(
        own.is_err(),
        "a restarted, not re-elected leader handed out read index {own:?}"
    );
    let follower = local.node(if leader == 1 { 2 } else { 1 });
    let read = follower.get(KEY, &ReadOptions::linearizable()).await;
    // The follower may serve only with a read index from a leader of the current term.
    if let Ok(r) = &read {
        panic!(
            "a follower served a linearizable read ({:?}) with no leader elected since the restart",
            r.receipt
        );
    }
    // Still the same term everywhere: nobody was elected meanwhile, so the checks above
    // met exactly the situation they are about.
    for id in 1..=3 {
        assert_eq!(local.node(id).local_shard(SHARD).unwrap().view().term, term);
    }
    assert!(written.index > 0);
    local.close().await;
}
