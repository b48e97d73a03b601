//! A real cluster: three `kvnode` processes on loopback, driven through the gRPC API.
//! Bootstrap, writes through one node and reads through another, kill -9 of a shard leader and
//! the time until writes to that shard succeed again, restart and catch-up, SIGTERM shutdown
//! (exit 0) and rejoin, and a Python gRPC client talking to a follower; one node on port 0
//! reporting its address. `client`: the Rust client and `kvctl` against an in-process node.
//! `membership`: the cluster map every node learns, and `kvctl node list`.

mod client;
mod consistency;
mod harness;
mod hibernation;
mod membership;
mod python;

use std::time::{Duration, Instant};

use harness::{Cluster, ELECTION_MAX_MS, HEARTBEAT_MS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_replicate_fail_over_and_rejoin() {
    let mut cluster = Cluster::start(3).await;
    cluster.wait_all_shards_led(Duration::from_secs(30)).await;

    // Write through node 1, read through node 2 (forwarded to the leader when needed).
    cluster
        .put(1, b"alpha", b"one")
        .await
        .expect("put through node 1");
    assert_eq!(
        cluster
            .get_linearizable(2, b"alpha")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"one"[..])
    );
    assert_eq!(
        cluster
            .get_linearizable(3, b"alpha")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"one"[..])
    );

    // kill -9 the leader of alpha's shard; writes to the shard must succeed again within a
    // bound derived from the election timeout.
    let shard = cluster.shard_of(b"alpha").await;
    let leader = cluster.leader_of(shard).await.expect("leader");
    cluster.kill(leader);
    let survivor = (1..=3).find(|n| *n != leader).unwrap();
    let started = Instant::now();
    let took = cluster
        .put_until_ok(survivor, b"alpha", b"two", Duration::from_secs(30))
        .await
        .expect("writes resume after the leader is killed");
    let bound = harness::failover_bound();
    println!("failover: leader {leader} of shard {shard} killed; next write ok after {took:?}");
    assert!(took <= bound, "failover took {took:?}, bound {bound:?}");
    assert!(started.elapsed() >= took);

    // Restart the killed node from its data dir: it catches up.
    cluster.restart(leader).await;
    cluster
        .wait_caught_up(leader, shard, Duration::from_secs(30))
        .await;
    assert_eq!(
        cluster
            .get_eventual(leader, b"alpha")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"two"[..])
    );

    // SIGTERM: a clean exit (status 0), then it rejoins.
    let victim = survivor;
    let status = cluster.terminate(victim).await;
    assert!(status.success(), "SIGTERM exit status {status:?}");
    cluster
        .put_until_ok(leader, b"beta", b"after-term", Duration::from_secs(30))
        .await
        .unwrap();
    cluster.restart(victim).await;
    let beta_shard = cluster.shard_of(b"beta").await;
    cluster
        .wait_caught_up(victim, beta_shard, Duration::from_secs(30))
        .await;
    if cluster.replicas(beta_shard).await.contains(&victim) {
        assert_eq!(
            cluster
                .get_eventual(victim, b"beta")
                .await
                .unwrap()
                .as_deref(),
            Some(&b"after-term"[..])
        );
    }
    assert_eq!(
        cluster
            .get_linearizable(victim, b"beta")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"after-term"[..])
    );
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_grpc_client_puts_and_gets_through_a_follower() {
    let Some(python) = python::environment() else {
        if !python::package_index_reachable() {
            eprintln!(
                "SKIPPED a_python_grpc_client_puts_and_gets_through_a_follower: the Python \
                 package index (PyPI, or PIP_INDEX_URL) cannot be reached, so grpcio cannot be \
                 installed"
            );
            return;
        }
        panic!("python3 with grpcio could not be set up (see the output above)");
    };
    let mut cluster = Cluster::start(3).await;
    cluster.wait_all_shards_led(Duration::from_secs(30)).await;
    let (_, leader, follower) = cluster.leader_and_follower(b"py-key").await;
    let out = python::run_client(&python, &cluster.addr(follower), "py-key", "from-python");
    assert!(
        out.contains("put ok") && out.contains("get from-python"),
        "{out}"
    );
    assert_eq!(
        cluster
            .get_linearizable(leader, b"py-key")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"from-python"[..])
    );
    cluster.stop_all().await;
}

/// `cargo test --release --test cluster -- --ignored --nocapture failover_time`: kill -9 the
/// leader of a shard ten times and report the time until the next successful write. Odd trials
/// first wait until every group hibernates (see `kvnode::hibernation`), so the followers learn
/// of the failure through node-level pings instead of missed heartbeats; both are reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement (run by scripts/failover.sh)"]
async fn failover_time_over_ten_trials() {
    let trials: usize = std::env::var("KVNODE_FAILOVER_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let mut cluster = Cluster::start(3).await;
    cluster.wait_all_shards_led(Duration::from_secs(30)).await;
    let mut awake = Vec::new();
    let mut asleep = Vec::new();
    for trial in 0..trials {
        let key = format!("failover-{trial}");
        cluster
            .put_until_ok(1, key.as_bytes(), b"before", Duration::from_secs(30))
            .await
            .unwrap();
        let hibernating = trial % 2 == 1;
        if hibernating {
            cluster.wait_all_hibernating(Duration::from_secs(30)).await;
        }
        let shard = cluster.shard_of(key.as_bytes()).await;
        let leader = cluster.leader_of(shard).await.unwrap();
        let other = (1..=3).find(|n| *n != leader).unwrap();
        cluster.kill(leader);
        let took = cluster
            .put_until_ok(other, key.as_bytes(), b"after", Duration::from_secs(60))
            .await
            .unwrap();
        let group = if hibernating { "hibernating" } else { "awake" };
        println!(
            "trial {trial}: killed node {leader} (leader of shard {shard}, group {group}); write ok after {} ms",
            took.as_millis()
        );
        if hibernating {
            asleep.push(took);
        } else {
            awake.push(took);
        }
        cluster.restart(leader).await;
        cluster.wait_all_shards_led(Duration::from_secs(30)).await;
        cluster
            .wait_caught_up(leader, shard, Duration::from_secs(30))
            .await;
    }
    for (group, times) in [("awake", &mut awake), ("hibernating", &mut asleep)] {
        if times.is_empty() {
            continue;
        }
        times.sort();
        println!(
            "failover of {group} groups over {} trials (election timeout {}..{} ms, heartbeat {} ms): median {} ms, worst {} ms",
            times.len(),
            harness::ELECTION_MIN_MS,
            ELECTION_MAX_MS,
            HEARTBEAT_MS,
            times[times.len() / 2].as_millis(),
            times.last().unwrap().as_millis()
        );
    }
    cluster.stop_all().await;
}

/// `kvnode --listen 127.0.0.1:0`: the OS picks the port, and the "kvnode serving" log line
/// reports the address actually bound (what a script or test starting one node reads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_told_to_listen_on_port_0_logs_the_port_it_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("node.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = std::process::Command::new(harness::KVNODE)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("log handle"))
        .stderr(log)
        .spawn()
        .expect("spawn kvnode");
    let addr = kvnode_testkit::eventually(Duration::from_secs(30), "the serving line", || {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        async move { serving_address(&text) }
    })
    .await;
    assert_ne!(addr.port(), 0, "{addr}");
    let mut kv = kvnode::pb::kv::kv_client::KvClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to the reported address");
    let status = kv
        .status(kvnode::pb::kv::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.node, 1);
    let _ = child.kill();
    let _ = child.wait();
}

/// The `listen=` address of a log's "kvnode serving" line (ANSI colours removed).
fn serving_address(log: &str) -> Option<std::net::SocketAddr> {
    let line = log.lines().find(|l| l.contains("kvnode serving"))?;
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Skip `ESC [ ... letter`.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let at = plain.find("listen=")?;
    plain[at + "listen=".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
