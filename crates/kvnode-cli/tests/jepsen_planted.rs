//! Proof that the fault-test suite can fail: `kvctl jepsen run` against real `kvnode`
//! processes with each planted bug switched on (the `planted-bugs` feature, which `cargo
//! test` builds in; release builds never have it) must report the violation the bug causes,
//! and the same campaign with no bug planted must pass. Re-checking each saved run offline
//! (`kvctl jepsen check`) gives the same verdicts.
//!
//! A campaign that proves a checker can fail must not depend on luck, so each planted-bug
//! campaign is built so that the bug's precondition occurs, and runs until it has occurred
//! (`--exercise N`: past its 30 s, up to 90 s, until the nodes' logs show the bug exercised N
//! times, see `kvnode::planted`); the test asserts it was, then that it was caught. A clean
//! campaign asserts its fault actually happened.
//!
//! - The partition campaigns: 3 nodes, 8 shards, 30 s of partitions that cut one node off
//!   (`one`, `primaries`, `majority`: with 3 nodes the minority is one node), a fault held
//!   ~4 s. A worker sends every request to its own node, and on a cut-off node a write waits
//!   out its deadline: the deposed-leader campaign gives each request 500 ms (the default is
//!   1.5 s) and binds six workers to each node, so the workers bound to the cut-off leader
//!   keep reading it through each fault.
//! - Acknowledged-but-uncommitted writes: only set adds (an acknowledged add that is lost is
//!   missing from the final read, a certain catch), 3 shards, and partitions that cut off a
//!   shard leader (`primaries`), which acknowledges the adds it leads and then loses them.
//! - A leader whose apply lags its commit (`--nemesis apply-lag`: every 3 s each node holds
//!   the applies of the shards it leads for 800 ms): 3 shards with one hot key each, six
//!   workers per node reading at `lin`, so a follower's read of a write its leader has not
//!   applied is followed, within the window, by a read of the same key on the leader. The
//!   bug's firings (a read index handed out below the correct one) are not each a stale read
//!   a checker can see: that takes a follower read of the newer value that completes before
//!   the leader's read starts. Healthy runs catch 5 to 25 such reads; a run on a machine
//!   running two whole test suites at once (under 900 reads in 30 s) once caught none, which
//!   is why there are six workers a node, not four.
//!
//! Runs use `--net auto`: iptables in a private network namespace as root, the TCP proxy
//! otherwise. Either way they run in parallel on the default ports: the namespace is the run's
//! own, and the proxy takes its ports from the kernel. Run folders are kept under the test
//! target's tmp dir (printed on failure).
//!
//! Last, the runner's settling step before the final reads, on its own: no write whose client
//! gave up may still take effect once the final phase begins.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use kvnode::consistency::ReadOptions;
use kvnode::pb::convert;
use kvnode::pb::kv::{GetRequest, PutRequest};
use kvnode_jepsen::net::{Net, NetKind};
use kvnode_jepsen::probe::{Probe, kv_client};
use kvnode_jepsen::processes::{ClusterSpec, NodeSpec, Processes};
use kvnode_jepsen::run::settle;

struct Outcome {
    code: Option<i32>,
    report: String,
}

/// The partition campaigns' faults.
const PARTITIONS: [&str; 4] = [
    "--nemesis",
    "partition",
    "--partitions",
    "one,primaries,majority",
];

/// The apply-lag campaign: hot keys on every shard, read at `lin` on every node.
const APPLY_LAG: [&str; 12] = [
    "--nemesis",
    "apply-lag",
    "--levels",
    "lin",
    "--shards",
    "3",
    "--live-keys",
    "3",
    "--workers-per-node",
    "6",
    "--set-percent",
    "0",
];

/// `options` add to the flags every campaign has (30 s, faults held ~4 s): the nemesis and
/// `--levels` at least.
fn campaign(name: &str, bug: Option<&str>, options: &[&str], seed: u64) -> Outcome {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("jepsen-{name}"));
    let mut command = Command::new(env!("CARGO_BIN_EXE_kvctl"));
    command
        .args(["jepsen", "run"])
        .arg("--kvnode")
        // The test-only binary that arms the planted bug (`kvnode` never does).
        .arg(env!("CARGO_BIN_EXE_kvnode-planted"))
        .arg("--out")
        .arg(&out)
        .args(["--time", "30s", "--interval", "4s"])
        .args(options)
        .args(["--seed", &seed.to_string()]);
    if let Some(bug) = bug {
        command.args(["--planted-bug", bug]);
    }
    let output = command.output().expect("run kvctl jepsen");
    let report = format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Outcome {
        code: output.status.code(),
        report,
    }
}

/// The verdict line of `check` in the report, e.g. `FAIL linearizable (lin/fri) ...`.
fn verdict_of<'a>(report: &'a str, check: &str) -> &'a str {
    report
        .lines()
        .find(|l| {
            let l = l.trim_start();
            (l.starts_with("ok ") || l.starts_with("FAIL ")) && l.contains(check)
        })
        .unwrap_or_else(|| panic!("no verdict line for {check:?} in:\n{report}"))
}

fn failed(report: &str, check: &str) -> bool {
    verdict_of(report, check).trim_start().starts_with("FAIL")
}

/// `kvctl jepsen check` on the run folder the report names: its exit code and output.
fn recheck(report: &str) -> Outcome {
    let dir = report
        .lines()
        .find_map(|l| l.strip_prefix("run folder: "))
        .unwrap_or_else(|| panic!("no run folder in:\n{report}"))
        .trim();
    let output = Command::new(env!("CARGO_BIN_EXE_kvctl"))
        .args(["jepsen", "check", dir])
        .output()
        .expect("run kvctl jepsen check");
    Outcome {
        code: output.status.code(),
        report: String::from_utf8_lossy(&output.stdout).into_owned(),
    }
}

/// The verdict lines (`ok …` / `FAIL …`) of a report.
fn verdicts(report: &str) -> Vec<&str> {
    report
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with("ok ") || l.starts_with("FAIL "))
        .collect()
}

/// The number in the report line that starts with `prefix` and reads `… <prefix><number>…`.
fn number_after(report: &str, prefix: &str) -> u64 {
    report
        .lines()
        .find_map(|l| l.split_once(prefix))
        .and_then(|(_, rest)| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or_else(|| panic!("no {prefix:?} in:\n{report}"))
}

/// Asserts a clean campaign passes, and rechecks the same offline.
fn assert_passes(o: &Outcome) {
    assert_eq!(o.code, Some(0), "a clean build must pass:\n{}", o.report);
    assert!(o.report.contains("verdict: PASS"), "{}", o.report);
    let again = recheck(&o.report);
    assert_eq!(again.code, Some(0), "{}", again.report);
    assert_eq!(verdicts(&again.report), verdicts(&o.report));
}

#[test]
fn with_no_bug_planted_the_same_campaign_passes_and_rechecks_the_same_offline() {
    let levels = ["--levels", "lin,lease,session,bst:500,ev"];
    let o = campaign("control", None, &[&PARTITIONS[..], &levels].concat(), 11);
    assert_passes(&o);
}

#[test]
fn with_no_bug_planted_the_apply_lag_campaign_passes() {
    let o = campaign("apply-lag-control", None, &APPLY_LAG, 16);
    let lagged = number_after(&o.report, "leader replicas held, ");
    assert!(
        lagged >= 3,
        "the campaign must make leaders' applies lag (writes committed while held): {lagged}\n{}",
        o.report
    );
    assert_passes(&o);
}

/// Runs `bug`'s campaign until the bug was exercised `exercise` times and asserts it was,
/// that the campaign fails, and that at least one of `checks` fails.
fn assert_caught(
    bug: &str,
    options: &[&str],
    (seed, exercise): (u64, u64),
    checks: &[&str],
    why: &str,
) {
    let exercise_flag = ["--exercise".to_string(), exercise.to_string()];
    let exercise_flag: Vec<&str> = exercise_flag.iter().map(String::as_str).collect();
    let o = campaign(bug, Some(bug), &[options, &exercise_flag].concat(), seed);
    let exercised = number_after(&o.report, &format!("planted bug {bug}: exercised "));
    println!("{bug}: exercised {exercised} times (seed {seed})");
    assert!(
        exercised >= exercise,
        "the campaign must exercise the bug at least {exercise} times:\n{}",
        o.report
    );
    assert_eq!(
        o.code,
        Some(1),
        "the planted bug must be caught:\n{}",
        o.report
    );
    let again = recheck(&o.report);
    assert_eq!(again.code, Some(1), "the saved history fails offline too");
    assert_eq!(verdicts(&again.report), verdicts(&o.report));
    assert!(
        checks.iter().any(|check| failed(&o.report, check)),
        "{why}: expected one of {checks:?} to fail:\n{}",
        o.report
    );
}

#[test]
fn a_follower_serving_linearizable_reads_locally_is_caught() {
    assert_caught(
        "follower-local-read",
        &[&PARTITIONS[..], &["--levels", "lin"]].concat(),
        (12, 10),
        &["linearizable (lin/fri)"],
        "stale follower reads are a linearizability violation",
    );
}

#[test]
fn a_leader_serving_reads_without_confirming_leadership_is_caught() {
    let options = [
        "--levels",
        "lin,lease",
        "--client-timeout",
        "500ms",
        "--workers-per-node",
        "6",
    ];
    assert_caught(
        "leader-no-confirm",
        &[&PARTITIONS[..], &options].concat(),
        (13, 10),
        &["linearizable (lin/fri)", "lease (linearizable)"],
        "a deposed leader's reads are stale",
    );
}

#[test]
fn acknowledging_uncommitted_writes_is_caught() {
    let options = [
        "--nemesis",
        "partition",
        "--partitions",
        "primaries",
        "--levels",
        "lin",
        "--shards",
        "3",
        "--set-percent",
        "100",
        "--client-timeout",
        "500ms",
        "--workers-per-node",
        "4",
    ];
    assert_caught(
        "ack-uncommitted",
        &options,
        (14, 3),
        &["set (lost writes)"],
        "an acknowledged add that never commits is missing from the final read",
    );
}

#[test]
fn a_leader_whose_apply_lags_its_commit_serving_its_applied_index_is_caught() {
    assert_caught(
        "read-index-applied",
        &APPLY_LAG,
        (15, 10),
        &["linearizable (lin/fri)"],
        "a read on the leader after a follower showed a newer value goes back in time",
    );
}

/// Issue 15, the clean control's `convergence` failure: the final linearizable read of a key
/// returned version 140 and an eventual read seconds later version 141, written by a CAS whose
/// client had given up (`info`). The CAS was not a stale read: it was still proposed, not yet
/// committed, in a shard leader's log when the final phase began, and committed after the
/// linearizable read. The runner now settles first ([`settle`]: every request's deadline
/// passed, then a barrier write on every shard, then quiet), which must leave no such write
/// pending. Here a shard leader is cut off while its write is proposed, behind 16 MB of other
/// pending writes; election timeouts outlast the test, so nobody replaces it. After the heal
/// the leader confirms its leadership at once, but commits the pending writes only once it has
/// replicated them again (after its replication backoff) and its followers have made those
/// 16 MB durable. Without the barrier, a read in that window sees the old value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_indeterminate_write_lands_after_the_final_phase_begins() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("jepsen-settle");
    let _ = std::fs::remove_dir_all(&dir);
    let ids = [1, 2, 3];
    let net = Net::new(NetKind::Proxy, &ids, None).await.expect("proxies");
    let cluster = ClusterSpec {
        binary: env!("CARGO_BIN_EXE_kvnode").into(),
        cluster_id: "settle".into(),
        shards: 1,
        replication_factor: 3,
        heartbeat_ms: 10_000,
        election_timeout_ms: (60_000, 90_000),
        hibernate_after_ms: 0,
        request_timeout_ms: 1000,
        env: vec![("RUST_LOG".into(), "info,openraft=warn".into())],
    };
    let specs: Vec<NodeSpec> = ids.iter().map(|&id| net.node_spec(id, &dir)).collect();
    let addrs: BTreeMap<u64, std::net::SocketAddr> =
        specs.iter().map(|s| (s.id, s.listen)).collect();
    let _nodes = Processes::start(cluster, specs).expect("start kvnode");
    let probe = Probe::new(&addrs);
    probe
        .wait_quiet(Duration::from_secs(60))
        .await
        .expect("the cluster is ready");
    let leader = Probe::leaders(&probe.statuses().await)[&0];
    let put = |key: String, value: Vec<u8>, timeout: Duration| {
        let mut client = kv_client(addrs[&leader], timeout);
        let request = PutRequest {
            key: key.into_bytes(),
            value,
        };
        async move { client.put(request).await }
    };
    put("k".into(), b"old".to_vec(), Duration::from_secs(5))
        .await
        .expect("a write before the fault");

    // The leader proposes 16 MB, then "new", but cannot commit them; their clients give up
    // (`info` writes).
    let others: Vec<u64> = ids.into_iter().filter(|n| *n != leader).collect();
    let cuts = others
        .iter()
        .flat_map(|&o| [(o, leader), (leader, o)])
        .collect();
    net.cut(&cuts).await.expect("cut the leader off");
    let padding = (0..16).map(|i| {
        put(
            format!("pad-{i}"),
            vec![b'p'; 1 << 20],
            Duration::from_millis(300),
        )
    });
    let padded = futures::future::join_all(padding).await;
    assert!(
        padded.iter().all(Result::is_err),
        "a cut-off leader cannot commit a write"
    );
    let gave_up = put("k".into(), b"new".to_vec(), Duration::from_millis(300)).await;
    assert!(gave_up.is_err(), "a cut-off leader cannot commit a write");
    // Longer than the leader's replication RPC timeout (1 s): its append is abandoned.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    net.heal().await.expect("heal");

    // The final phase: settle (no request deadline is pending here), then read.
    let settled = settle(Instant::now(), &addrs, 1, &probe).await;
    assert!(settled.barrier.is_ok(), "{settled:?}");
    assert!(settled.quiet.is_ok(), "{settled:?}");
    let read = |node: u64, options: ReadOptions| {
        let mut client = kv_client(addrs[&node], Duration::from_secs(5));
        let request = GetRequest {
            key: b"k".to_vec(),
            options: Some(convert::read_options_to_wire(&options)),
        };
        async move {
            let reply = client.get(request).await.expect("read").into_inner();
            let value = reply.value.expect("k is set");
            (
                String::from_utf8_lossy(&value.value).into_owned(),
                value.version,
            )
        }
    };
    let final_read = read(leader, ReadOptions::linearizable()).await;

    // The write lands (committed, so the final read had to see it): the leader applies it.
    // Only the leader is waited for: the follower that was not part of the majority still has
    // 16 MB to receive through the proxy, which on a busy machine takes longer than any bound
    // worth writing here, and it says nothing about the final read.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = read(leader, ReadOptions::eventual()).await;
        if seen.0 == "new" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the leader (node {leader}) never applied the write"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        final_read.0, "new",
        "the final linearizable read {final_read:?} ran before an indeterminate write landed"
    );
}
