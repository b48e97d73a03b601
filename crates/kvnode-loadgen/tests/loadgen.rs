//! The load generator end to end against an in-process 3-node kvnode cluster served over
//! gRPC: a short linearizable read/write mix through the leader-aware client, and eventual
//! reads spread over every node; every run completes operations without errors and its JSON
//! has the documented fields. (etcd is exercised by `scripts/bench.sh`, not here.)

use std::sync::Arc;
use std::time::Duration;

use kvnode_loadgen::kvnode::KvnodeTarget;
use kvnode_loadgen::{Level, Names, Progress, RunResult, System, Workload, run};
use kvnode_testkit::LocalCluster;

fn workload(read_percent: u8, duration_ms: u64) -> Workload {
    Workload {
        concurrency: 4,
        keys: 50,
        value_bytes: 64,
        read_percent,
        duration: Duration::from_millis(duration_ms),
        warmup: Duration::from_millis(200),
    }
}

async fn run_level(seeds: &[String], level: Level, w: &Workload, name: &str) -> RunResult {
    let target = KvnodeTarget::connect(seeds, level, Duration::from_secs(5))
        .await
        .expect("connect to the cluster");
    let names = Names {
        workload: name.to_string(),
        label: format!("test {name}"),
    };
    run(Arc::new(target), w, &names, Progress::Off)
        .await
        .expect("the run completes")
}

fn check(r: &RunResult, level: &str, read_percent: u8) {
    assert!(r.ops > 0, "{r:?}");
    assert_eq!(r.errors, 0, "first error: {:?}", r.first_error);
    assert!(r.ops_per_sec > 0.0, "{r:?}");
    assert!(
        r.latency_ms.p50 > 0.0 && r.latency_ms.p50 <= r.latency_ms.p99,
        "{r:?}"
    );
    assert!(r.latency_ms.p99 <= r.latency_ms.p999 && r.latency_ms.p999 <= r.latency_ms.max);

    let json: serde_json::Value = serde_json::to_value(r).unwrap();
    let fields: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut want = vec![
        "system",
        "workload",
        "label",
        "concurrency",
        "keys",
        "value_bytes",
        "read_percent",
        "read_level",
        "seconds",
        "ops",
        "ops_per_sec",
        "errors",
        "latency_ms",
    ];
    want.sort_unstable();
    let mut got = fields.clone();
    got.sort_unstable();
    assert_eq!(got, want);
    assert_eq!(json["system"], "kvnode");
    assert_eq!(json["read_level"], level);
    assert_eq!(json["read_percent"], read_percent);
    assert_eq!(json["concurrency"], 4);
    assert_eq!(json["ops"], r.ops);
    let latency: Vec<&str> = json["latency_ms"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(latency.len(), 4);
    for k in ["p50", "p99", "p999", "max"] {
        assert!(json["latency_ms"][k].is_f64(), "{k} in {json}");
    }
    let back: RunResult = serde_json::from_value(json).unwrap();
    assert_eq!(back.system, System::Kvnode);
    assert_eq!(back.ops, r.ops);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_load_generator_drives_a_kvnode_cluster_without_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(dir.path(), 3, |c| c.shards = 4).await;
    let seeds: Vec<String> = (1..=3).map(|id| cluster.addr(id).to_string()).collect();

    // Writes and linearizable reads through the leader-aware client.
    let w = workload(50, 1000);
    let mix = run_level(&seeds, Level::Linearizable, &w, "mix").await;
    check(&mix, "linearizable", 50);
    assert_eq!(mix.seconds, 1.0);
    assert_eq!(mix.workload, "mix");
    assert_eq!(mix.label, "test mix");

    // Eventual reads spread round-robin over all three nodes with the raw gRPC client.
    let w = workload(100, 500);
    let eventual = run_level(&seeds, Level::Eventual, &w, "get-local").await;
    check(&eventual, "eventual", 100);

    // Serializable is etcd's level: refused before anything is sent.
    let refused = KvnodeTarget::connect(&seeds, Level::Serializable, Duration::from_secs(1)).await;
    assert!(
        matches!(refused, Err(kvnode_loadgen::LoadError::Level(_))),
        "{refused:?}"
    );

    cluster.close().await;
}
