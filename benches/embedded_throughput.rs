//! Embedded single-node throughput: C concurrent callers (closed loop) doing durable puts, then
//! gets at each read level, against one `Node` in a temporary data directory.
//! `cargo bench --bench embedded_throughput -- [--seconds 3] [--concurrency 64] [--shards 16]
//! [--keys 1000] [--value-bytes 256] [--dir PATH]`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use kvnode::{Config, Node, ReadOptions};

struct Args {
    seconds: f64,
    concurrency: usize,
    shards: u32,
    keys: u64,
    value_bytes: usize,
    dir: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        seconds: 3.0,
        concurrency: 64,
        shards: 16,
        keys: 1000,
        value_bytes: 256,
        dir: None,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let (flag, inline) = match argv[i].split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (argv[i].clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| {
                    i += 1;
                    argv.get(i).cloned()
                })
                .unwrap_or_default()
        };
        match flag.as_str() {
            "--seconds" => a.seconds = value().parse().expect("--seconds"),
            "--concurrency" => a.concurrency = value().parse().expect("--concurrency"),
            "--shards" => a.shards = value().parse().expect("--shards"),
            "--keys" => a.keys = value().parse().expect("--keys"),
            "--value-bytes" => a.value_bytes = value().parse().expect("--value-bytes"),
            "--dir" => a.dir = Some(value()),
            _ => {} // cargo's own flags (--bench)
        }
        i += 1;
    }
    a
}

#[derive(Clone, Copy)]
enum Op {
    Put,
    Get(fn() -> ReadOptions),
}

async fn run(node: Arc<Node>, op: Op, a: &Args) -> (f64, Histogram<u64>) {
    let deadline = Instant::now() + Duration::from_secs_f64(a.seconds);
    let mut tasks = Vec::new();
    for w in 0..a.concurrency {
        let node = node.clone();
        let keys = a.keys;
        let value = vec![b'v'; a.value_bytes];
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("histogram");
            let mut n = w as u64;
            while Instant::now() < deadline {
                let key = format!("key-{}", n % keys).into_bytes();
                n = n
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let t = Instant::now();
                match op {
                    Op::Put => drop(node.put(&key, value.clone()).await.expect("put")),
                    Op::Get(opts) => drop(node.get(&key, &opts()).await.expect("get")),
                }
                hist.record(t.elapsed().as_micros() as u64).expect("record");
            }
            hist
        }));
    }
    let started = Instant::now();
    let mut total = Histogram::<u64>::new(3).expect("histogram");
    for t in tasks {
        total.add(t.await.expect("task")).expect("merge");
    }
    (total.len() as f64 / started.elapsed().as_secs_f64(), total)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args();
    let tmp = tempfile::tempdir_in(
        a.dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().display().to_string()),
    )?;
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
        a.seconds,
        tmp.path().display()
    );
    println!(
        "{:<22} {:>10} {:>9} {:>9} {:>9}",
        "operation", "ops/s", "p50 ms", "p99 ms", "p99.9 ms"
    );
    let rows: [(&str, Op); 5] = [
        ("put (durable)", Op::Put),
        ("get linearizable", Op::Get(ReadOptions::linearizable)),
        ("get lease", Op::Get(ReadOptions::lease)),
        (
            "get bounded",
            Op::Get(|| ReadOptions::bounded(Duration::from_millis(500))),
        ),
        ("get eventual", Op::Get(ReadOptions::eventual)),
    ];
    for (name, op) in rows {
        let (rate, h) = run(node.clone(), op, &a).await;
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "{name:<22} {rate:>10.0} {:>9.2} {:>9.2} {:>9.2}",
            ms(0.5),
            ms(0.99),
            ms(0.999)
        );
    }
    let node = Arc::try_unwrap(node).map_err(|_| anyhow::anyhow!("node still shared"))?;
    node.close().await;
    Ok(())
}
