//! Embedded single-node throughput: C concurrent callers (closed loop) doing durable puts, then
//! gets at each read level, against one `Node` in a temporary data directory. The loop is the
//! load generator's (`kvnode_loadgen::run` with its embedded target), the one `kvctl bench`
//! runs against a cluster: every key is written once first, then each row runs for `--seconds`
//! with no warmup.
//! `cargo bench --bench embedded_throughput -- [--seconds 3] [--concurrency 64] [--shards 16]
//! [--keys 1000] [--value-bytes 256] [--dir PATH]`.

use std::sync::Arc;
use std::time::Duration;

use kvnode::{Config, Node};
use kvnode_loadgen::embedded::EmbeddedTarget;
use kvnode_loadgen::{Level, Names, Progress, Workload, run};

#[allow(dead_code)]
mod common;

/// Embedded single-node throughput and latency per operation.
#[derive(clap::Parser)]
struct Args {
    /// Seconds per row.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    #[command(flatten)]
    load: common::LoadFlags,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args { seconds, load: a } = <Args as clap::Parser>::parse();
    let tmp = tempfile::tempdir_in(a.dir.clone().unwrap_or_else(std::env::temp_dir))?;
    let node = Arc::new(
        Node::open(Config {
            shards: a.shards,
            ..Config::single_node(tmp.path())
        })
        .await?,
    );
    println!(
        "embedded single node: {} shards, {} in flight, {} keys, {}-byte values, {} s per row, dir {}",
        a.shards,
        a.concurrency,
        a.keys,
        a.value_bytes,
        seconds,
        tmp.path().display()
    );
    println!(
        "{:<22} {:>10} {:>9} {:>9} {:>9}",
        "operation", "ops/s", "p50 ms", "p99 ms", "p99.9 ms"
    );
    let rows: [(&str, Level, u8); 5] = [
        ("put (durable)", Level::Linearizable, 0),
        ("get linearizable", Level::Linearizable, 100),
        ("get lease", Level::Lease, 100),
        (
            "get bounded",
            Level::Bounded(Duration::from_millis(500)),
            100,
        ),
        ("get eventual", Level::Eventual, 100),
    ];
    for (name, level, read_percent) in rows {
        let workload = Workload {
            concurrency: a.concurrency,
            keys: a.keys,
            value_bytes: a.value_bytes,
            read_percent,
            duration: Duration::from_secs_f64(seconds),
            warmup: Duration::ZERO,
        };
        let names = Names {
            workload: name.to_string(),
            label: "embedded".to_string(),
        };
        let target = Arc::new(EmbeddedTarget::new(node.clone(), level)?);
        let r = run(target, &workload, &names, Progress::Off).await?;
        anyhow::ensure!(
            r.errors == 0,
            "{name}: {} operations failed, the first: {}",
            r.errors,
            r.first_error.unwrap_or_default()
        );
        println!(
            "{name:<22} {:>10.0} {:>9.2} {:>9.2} {:>9.2}",
            r.ops_per_sec, r.latency_ms.p50, r.latency_ms.p99, r.latency_ms.p999
        );
    }
    let node = Arc::try_unwrap(node).map_err(|_| anyhow::anyhow!("node still shared"))?;
    node.close().await;
    Ok(())
}
