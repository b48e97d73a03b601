//! Read throughput and latency of each read level on a local 3-node cluster of real `kvnode`
//! processes: C concurrent callers (closed loop) per row, each level read twice, once through
//! the Rust client (which sends every read to the key's leader) and once through the generated
//! gRPC client sent to a follower of the key's shard (the Rust client cannot pick a replica).
//!
//! Needs the release binary: `cargo build --release --bin kvnode` first (or
//! `scripts/read-levels.sh`, which does both). Run with
//! `cargo bench --bench read_levels -- [--seconds 5] [--concurrency 64] [--shards 16]
//! [--keys 1000] [--value-bytes 256] [--json PATH] [--kvnode PATH] [--dir PATH]`.
//!
//! Columns: `fallback` is the share of replies whose receipt names a level other than the one
//! asked (a bounded read that could not prove its bound and went linearizable); `other node`
//! is the share served by a node other than the one the request was sent to (a lease read sent
//! to a follower is forwarded to the leader); `errors` counts failed reads (not in the
//! latency columns).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use kvnode::client::Client;
use kvnode::consistency::{ReadOptions, ServedLevel, SessionToken};
use kvnode::pb::convert;
use kvnode::pb::kv::GetRequest;
use kvnode::pb::kv::kv_client::KvClient;
use kvnode_testkit::process_cluster::{ClusterOptions, ProcessCluster as Cluster};
use tonic::transport::{Channel, Endpoint};

const NODES: u64 = 3;
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[allow(dead_code)]
mod common;

/// Read throughput and latency of each read level on a local 3-node cluster.
#[derive(clap::Parser)]
struct Args {
    /// Seconds per row.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    #[command(flatten)]
    load: common::LoadFlags,
    /// Also write the rows as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The kvnode binary (default: the release build in the target directory).
    #[arg(long)]
    kvnode: Option<PathBuf>,
}

fn args() -> Args {
    let a = <Args as clap::Parser>::parse();
    assert!(a.load.concurrency > 0, "--concurrency must be positive");
    assert!(a.load.keys > 0, "--keys must be positive");
    a
}

/// The release `kvnode` binary: `--kvnode`, else `$CARGO_TARGET_DIR/release/kvnode`, else
/// `target/release/kvnode` in this crate.
fn kvnode_binary(a: &Args) -> PathBuf {
    if let Some(p) = &a.kvnode {
        return p.clone();
    }
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| manifest.join(d))
        .unwrap_or_else(|| manifest.join("target"));
    target.join("release").join("kvnode")
}

/// The three `kvnode` processes (the workspace's one process harness, in kvnode-testkit).
fn start_cluster(bin: &PathBuf, shards: u32, parent: Option<&PathBuf>) -> anyhow::Result<Cluster> {
    anyhow::ensure!(
        bin.is_file(),
        "{} not found: build it first with `cargo build --release --bin kvnode` \
         (scripts/read-levels.sh does), or pass --kvnode PATH",
        bin.display()
    );
    let mut options = ClusterOptions::new(bin, NODES);
    options.shards = shards;
    options.parent_dir = parent.cloned();
    Ok(Cluster::spawn(options)?)
}

/// Per shard: the node reporting itself leader, and the other replicas.
#[derive(Clone, Debug, Default)]
struct Placement {
    leader: BTreeMap<u64, u64>,
    followers: BTreeMap<u64, Vec<u64>>,
}

/// The placement, once every shard has a leader that every node knows of; `None` before.
async fn placement(client: &Client, shards: u32) -> Option<Placement> {
    let mut views = Vec::new();
    for id in 1..=NODES {
        views.push(client.node_status(id).await.ok()?);
    }
    let mut p = Placement::default();
    for shard in 0..u64::from(shards) {
        let leader = views.iter().find_map(|v| {
            v.shards
                .iter()
                .find(|s| s.shard == shard && s.role == "leader")
                .map(|_| v.node)
        })?;
        let agreed = views.iter().all(|v| {
            v.shards
                .iter()
                .any(|s| s.shard == shard && s.leader == Some(leader))
        });
        if !agreed {
            return None;
        }
        let replicas = views[0]
            .shards
            .iter()
            .find(|s| s.shard == shard)?
            .replicas
            .clone();
        let followers: Vec<u64> = replicas.into_iter().filter(|r| *r != leader).collect();
        if followers.is_empty() {
            return None;
        }
        p.leader.insert(shard, leader);
        p.followers.insert(shard, followers);
    }
    Some(p)
}

/// True once every node's replica of every shard has applied what its leader has committed.
async fn caught_up(client: &Client, p: &Placement) -> bool {
    let mut views = BTreeMap::new();
    for id in 1..=NODES {
        match client.node_status(id).await {
            Ok(v) => views.insert(id, v),
            Err(_) => return false,
        };
    }
    p.leader.iter().all(|(shard, leader)| {
        let of = |node: u64| views[&node].shards.iter().find(|s| s.shard == *shard);
        let Some(target) = of(*leader).map(|s| s.commit_index) else {
            return false;
        };
        (1..=NODES).all(|n| of(n).is_some_and(|s| s.applied_index >= target))
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    /// The Rust client: the key's leader.
    Leader,
    /// The generated gRPC client, sent to a follower of the key's shard.
    Follower,
}

struct Plan {
    keys: Vec<(Vec<u8>, u64)>,
    placement: Placement,
    options: ReadOptions,
    asked: ServedLevel,
    via: Via,
    client: Client,
    grpc: BTreeMap<u64, KvClient<Channel>>,
    deadline: Instant,
}

#[derive(Default)]
struct Tally {
    ok: u64,
    fallbacks: u64,
    other_node: u64,
    errors: u64,
    first_error: Option<String>,
}

struct Row {
    level: &'static str,
    via: Via,
    rate: f64,
    hist: Histogram<u64>,
    tally: Tally,
}

impl Row {
    fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }

    fn share(&self, n: u64) -> f64 {
        if self.tally.ok == 0 {
            0.0
        } else {
            100.0 * n as f64 / self.tally.ok as f64
        }
    }

    fn served_by(&self) -> &'static str {
        match self.via {
            Via::Leader => "leader",
            Via::Follower => "follower",
        }
    }

    fn transport(&self) -> &'static str {
        match self.via {
            Via::Leader => "Rust client",
            Via::Follower => "gRPC to a follower",
        }
    }
}

/// One caller: reads random keys until the deadline.
async fn caller(plan: Arc<Plan>, w: u64) -> (Histogram<u64>, Tally) {
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    let mut tally = Tally::default();
    let wire = convert::read_options_to_wire(&plan.options);
    let mut n = w.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while Instant::now() < plan.deadline {
        n = n
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let (key, shard) = &plan.keys[((n >> 33) % plan.keys.len() as u64) as usize];
        let t = Instant::now();
        let (target, served) = match plan.via {
            Via::Leader => {
                let target = plan.client.leader_of(*shard);
                let got = plan
                    .client
                    .get(key, &plan.options)
                    .await
                    .map(|r| (r.receipt.level, r.receipt.node))
                    .map_err(|e| e.to_string());
                (target, got)
            }
            Via::Follower => {
                let followers = &plan.placement.followers[shard];
                let target = followers[(n >> 20) as usize % followers.len()];
                let mut c = plan.grpc[&target].clone();
                let mut request = tonic::Request::new(GetRequest {
                    key: key.clone(),
                    options: Some(wire.clone()),
                });
                request.set_timeout(Duration::from_secs(5));
                let got = match c.get(request).await {
                    Ok(reply) => reply
                        .into_inner()
                        .receipt
                        .ok_or_else(|| "reply without a receipt".to_string())
                        .and_then(|r| {
                            convert::read_receipt_from_wire(&r).map_err(|e| e.to_string())
                        })
                        .map(|r| (r.level, r.node)),
                    Err(status) => Err(format!("{}: {}", status.code(), status.message())),
                };
                (Some(target), got)
            }
        };
        match served {
            Ok((level, node)) => {
                hist.record(t.elapsed().as_micros() as u64).expect("record");
                tally.ok += 1;
                tally.fallbacks += u64::from(level != plan.asked);
                tally.other_node += u64::from(target != Some(node));
            }
            Err(e) => {
                tally.errors += 1;
                tally.first_error.get_or_insert(e);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    (hist, tally)
}

async fn run(plan: Plan, level: &'static str, concurrency: usize) -> Row {
    let via = plan.via;
    let plan = Arc::new(plan);
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency as u64)
        .map(|w| tokio::spawn(caller(plan.clone(), w)))
        .collect();
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    let mut tally = Tally::default();
    for t in tasks {
        let (h, t) = t.await.expect("caller task");
        hist.add(h).expect("merge");
        tally.ok += t.ok;
        tally.fallbacks += t.fallbacks;
        tally.other_node += t.other_node;
        tally.errors += t.errors;
        if tally.first_error.is_none() {
            tally.first_error = t.first_error;
        }
    }
    Row {
        level,
        via,
        rate: tally.ok as f64 / started.elapsed().as_secs_f64(),
        hist,
        tally,
    }
}

async fn wait_until<F, Fut, T>(what: &str, cluster: &mut Cluster, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        cluster.check_running().map_err(anyhow::Error::msg)?;
        if let Some(v) = probe().await {
            return Ok(v);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out waiting until {what}:\n{}",
            cluster.all_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn preload(client: &Client, a: &Args) -> anyhow::Result<SessionToken> {
    let value = vec![b'v'; a.load.value_bytes];
    let receipts: Vec<_> = futures::stream::iter(0..a.load.keys)
        .map(|i| {
            let value = value.clone();
            async move {
                let key = format!("key-{i}").into_bytes();
                let mut last = None;
                for _ in 0..20 {
                    match client.put(&key, value.clone()).await {
                        Ok(r) => return Ok(r),
                        Err(e) => last = Some(e),
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(anyhow::anyhow!("preload put of key-{i}: {:?}", last))
            }
        })
        .buffer_unordered(a.load.concurrency)
        .collect()
        .await;
    let mut token = SessionToken::new();
    for r in receipts {
        token.observe_write(&r?);
    }
    Ok(token)
}

fn json(a: &Args, rows: &[Row]) -> String {
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"level\":{:?},\"served_by\":{:?},\"transport\":{:?},\"ops_per_sec\":{:.1},\
                 \"p50_ms\":{:.3},\"p99_ms\":{:.3},\"p999_ms\":{:.3},\"reads\":{},\
                 \"fallback_share\":{:.4},\"other_node_share\":{:.4},\"errors\":{}}}",
                r.level,
                r.served_by(),
                r.transport(),
                r.rate,
                r.ms(0.5),
                r.ms(0.99),
                r.ms(0.999),
                r.tally.ok,
                r.share(r.tally.fallbacks) / 100.0,
                r.share(r.tally.other_node) / 100.0,
                r.tally.errors,
            )
        })
        .collect();
    format!(
        "{{\"nodes\":{NODES},\"shards\":{},\"concurrency\":{},\"keys\":{},\"value_bytes\":{},\
         \"seconds\":{},\"cpus\":{},\"rows\":[\n  {}\n]}}\n",
        a.load.shards,
        a.load.concurrency,
        a.load.keys,
        a.load.value_bytes,
        a.seconds,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        items.join(",\n  ")
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args();
    let bin = kvnode_binary(&a);
    let mut cluster = start_cluster(&bin, a.load.shards, a.load.dir.as_ref())?;
    let seeds = cluster.seeds();
    let client = wait_until("a node answers", &mut cluster, || async {
        Client::connect(seeds.clone()).await.ok()
    })
    .await?;
    let client = &client;
    wait_until("every shard has a leader", &mut cluster, || async {
        placement(client, a.load.shards).await
    })
    .await?;
    let token = preload(client, &a).await?;
    let mut placement_now = wait_until("followers caught up", &mut cluster, || async {
        let p = placement(client, a.load.shards).await?;
        caught_up(client, &p).await.then_some(p)
    })
    .await?;

    let mut grpc = BTreeMap::new();
    for (id, addr) in client.nodes() {
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await?;
        grpc.insert(id, KvClient::new(channel));
    }
    let keys: Vec<(Vec<u8>, u64)> = (0..a.load.keys)
        .map(|i| {
            let key = format!("key-{i}").into_bytes();
            let shard = client.shard_for(&key);
            (key, shard)
        })
        .collect();
    let mut led = BTreeMap::<u64, usize>::new();
    for l in placement_now.leader.values() {
        *led.entry(*l).or_default() += 1;
    }
    println!(
        "3-node local cluster (binary {}), {} shards (leaders per node: {}), {} in flight, \
         {} keys, {}-byte values, {} s per row, {} CPUs for the nodes and the load generator",
        bin.display(),
        a.load.shards,
        led.iter()
            .map(|(n, c)| format!("n{n}={c}"))
            .collect::<Vec<_>>()
            .join(" "),
        a.load.concurrency,
        a.load.keys,
        a.load.value_bytes,
        a.seconds,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    println!(
        "{:<13} {:<9} {:>9} {:>8} {:>8} {:>9} {:>9} {:>10} {:>7}",
        "level",
        "served-by",
        "ops/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "fallback",
        "other node",
        "errors"
    );
    let levels: [(&str, ReadOptions, ServedLevel); 5] = [
        (
            "linearizable",
            ReadOptions::linearizable(),
            ServedLevel::Linearizable,
        ),
        ("lease", ReadOptions::lease(), ServedLevel::Lease),
        (
            "session",
            ReadOptions::session(&token),
            ServedLevel::Session,
        ),
        (
            "bounded:500ms",
            ReadOptions::bounded(Duration::from_millis(500)),
            ServedLevel::Bounded,
        ),
        ("eventual", ReadOptions::eventual(), ServedLevel::Eventual),
    ];
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for (level, options, asked) in levels {
        for via in [Via::Leader, Via::Follower] {
            // Leadership may have moved since the last row: route by the current placement.
            if let Some(p) = placement(client, a.load.shards).await {
                placement_now = p;
            }
            let plan = Plan {
                keys: keys.clone(),
                placement: placement_now.clone(),
                options: options.clone(),
                asked,
                via,
                client: client.clone(),
                grpc: grpc.clone(),
                deadline: Instant::now() + Duration::from_secs_f64(a.seconds),
            };
            let row = run(plan, level, a.load.concurrency).await;
            println!(
                "{:<13} {:<9} {:>9.0} {:>8.2} {:>8.2} {:>9.2} {:>8.1}% {:>9.1}% {:>7}",
                row.level,
                row.served_by(),
                row.rate,
                row.ms(0.5),
                row.ms(0.99),
                row.ms(0.999),
                row.share(row.tally.fallbacks),
                row.share(row.tally.other_node),
                row.tally.errors
            );
            if let Some(e) = &row.tally.first_error {
                errors.push(format!("{level} via {}: {e}", row.transport()));
            }
            rows.push(row);
        }
    }
    println!(
        "(leader rows: the Rust client, which sends every read to the key's leader; follower \
         rows: the generated gRPC client sent to a follower of the key's shard, spread over both \
         followers. fallback = receipts naming another level than the one asked; other node = \
         replies served by a node other than the one the request was sent to, i.e. forwarded)"
    );
    for e in &errors {
        println!("first error, {e}");
    }
    if let Some(path) = &a.json {
        std::fs::write(path, json(&a, &rows))?;
        println!("JSON written to {}", path.display());
    }
    drop(grpc);
    for (id, status) in cluster.stop().await {
        match status {
            Some(s) if s.success() => {}
            Some(s) => eprintln!("node {id} exited with {s} after SIGTERM"),
            None => eprintln!("node {id} ignored SIGTERM for 20 s and was killed"),
        }
    }
    Ok(())
}
