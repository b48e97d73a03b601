//! WAL group-commit throughput: N closed-loop shard writers (one append in flight each) against
//! a bare `write_all` + `fdatasync` loop on the same disk. Run with
//! `cargo bench --bench wal_group_commit -- [--seconds 3] [--shards 1,16,256] [--entry-bytes 256]
//! [--entries 1] [--dir PATH] [--json PATH]`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier, mpsc};
use std::time::{Duration, Instant};

use kvnode::storage::wal::Waiter;
use kvnode::storage::{Wal, WalOptions};

#[allow(dead_code)]
mod common;

/// Purge a shard's log up to `last - PURGE_EVERY` every `PURGE_EVERY` appends.
const PURGE_EVERY: u64 = 1000;

/// WAL group-commit throughput against a bare append + fdatasync loop.
#[derive(clap::Parser)]
struct Args {
    /// Seconds per row.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Shard writer counts, one row each (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 16, 256])]
    shards: Vec<usize>,
    /// Bytes per entry.
    #[arg(long, default_value_t = 256)]
    entry_bytes: usize,
    /// Entries per append.
    #[arg(long, default_value_t = 1)]
    entries: usize,
    /// Where the WAL directory is made.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
    /// Also write the rows as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn parse_args() -> Args {
    <Args as clap::Parser>::parse()
}

/// One measured configuration; `shards == 0` is the bare append+fdatasync loop.
struct Row {
    shards: usize,
    secs: f64,
    syncs: u64,
    sync_nanos: u64,
    /// Append-to-ack latency of every acknowledged append, sorted.
    lat: Vec<u64>,
}

const HEADER: &str =
    "shards    appends/s    syncs/s  appends/sync  mean sync ms    p50 ms    p99 ms  x bare";
const WIDTHS: [usize; 7] = [11, 9, 12, 12, 8, 8, 6];
const DECIMALS: [usize; 7] = [0, 0, 2, 3, 3, 3, 2];
#[rustfmt::skip]
const JSON_KEYS: [&str; 7] = [
    "appends_per_s", "syncs_per_s", "appends_per_sync", "mean_sync_ms", "p50_ms", "p99_ms",
    "ratio_to_bare",
];

impl Row {
    fn label(&self) -> String {
        match self.shards {
            0 => "bare".into(),
            n => n.to_string(),
        }
    }

    /// The numeric columns after `shards`, in [`HEADER`] order.
    fn cells(&self, bare_syncs_per_s: f64) -> [f64; 7] {
        let appends_per_s = self.lat.len() as f64 / self.secs;
        let n = self.lat.len().saturating_sub(1) as f64;
        let pct = |p: f64| {
            self.lat
                .get((n * p).round() as usize)
                .map_or(f64::NAN, |&ns| ns as f64 / 1e6)
        };
        [
            appends_per_s,
            self.syncs as f64 / self.secs,
            self.lat.len() as f64 / self.syncs as f64,
            self.sync_nanos as f64 / self.syncs as f64 / 1e6,
            pct(0.50),
            pct(0.99),
            appends_per_s / bare_syncs_per_s,
        ]
    }
}

/// Single-threaded `write_all` of one record + `sync_data` on a plain file: the disk's ceiling.
fn bare(dir: &Path, record_bytes: usize, run: Duration) -> Row {
    let mut file = tempfile::NamedTempFile::new_in(dir).expect("create bare file");
    let record = vec![0xA5u8; record_bytes];
    let mut lat = Vec::new();
    let start = Instant::now();
    while start.elapsed() < run {
        let t = Instant::now();
        file.write_all(&record).expect("write");
        file.as_file().sync_data().expect("fdatasync");
        lat.push(t.elapsed().as_nanos() as u64);
    }
    let secs = start.elapsed().as_secs_f64();
    let (syncs, sync_nanos) = (lat.len() as u64, lat.iter().sum());
    lat.sort_unstable();
    Row {
        shards: 0,
        secs,
        syncs,
        sync_nanos,
        lat,
    }
}

/// One shard's closed loop: append, wait for the ack, repeat. Returns each append's latency.
fn writer(wal: &Wal, shard: u64, entries: &[Vec<u8>], run: Duration) -> Vec<u64> {
    let (tx, rx) = mpsc::channel();
    let mut lat = Vec::new();
    let mut next = 1u64;
    let start = Instant::now();
    while start.elapsed() < run {
        let tx = tx.clone();
        let ack: Waiter = Box::new(move |r| drop(tx.send(r.map_err(|e| e.to_string()))));
        let t = Instant::now();
        wal.append(shard, next, entries.to_vec(), ack)
            .expect("append");
        rx.recv().expect("callback dropped").expect("append failed");
        lat.push(t.elapsed().as_nanos() as u64);
        next += entries.len() as u64;
        if (lat.len() as u64).is_multiple_of(PURGE_EVERY) {
            let upto = next - 1 - PURGE_EVERY;
            wal.purge(shard, upto, upto.to_le_bytes().to_vec())
                .expect("purge");
        }
    }
    lat
}

/// `shards` closed-loop writers, each appending one record and waiting for its ack.
fn group_commit(dir: &Path, shards: usize, args: &Args, run: Duration) -> Row {
    let wal_dir = tempfile::Builder::new()
        .prefix("wal-bench-")
        .tempdir_in(dir)
        .expect("temp dir");
    let wal = Arc::new(Wal::open(wal_dir.path(), WalOptions::default()).expect("open WAL"));
    let barrier = Arc::new(Barrier::new(shards + 1));
    let handles: Vec<_> = (0..shards as u64)
        .map(|shard| {
            let (wal, barrier) = (wal.clone(), barrier.clone());
            let entries = vec![vec![0x5Au8; args.entry_bytes]; args.entries];
            std::thread::spawn(move || {
                barrier.wait();
                writer(&wal, shard, &entries, run)
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut lat: Vec<u64> = Vec::new();
    for h in handles {
        lat.extend(h.join().expect("writer panicked"));
    }
    let secs = start.elapsed().as_secs_f64();
    let stats = wal.stats();
    assert_eq!(stats.acknowledged, lat.len() as u64, "acks vs. stats");
    drop(wal);
    lat.sort_unstable();
    Row {
        shards,
        secs,
        syncs: stats.syncs,
        sync_nanos: stats.sync_nanos,
        lat,
    }
}

fn main() {
    let args = parse_args();
    let run = Duration::from_secs_f64(args.seconds);
    let fs = common::fs_type(&args.dir).unwrap_or_else(|| "unknown".into());
    println!(
        "WAL group commit: {} entr{} x {} B per append, one append in flight per shard, {} s per run, dir {} ({fs})",
        args.entries,
        if args.entries == 1 { "y" } else { "ies" },
        args.entry_bytes,
        args.seconds,
        args.dir.display(),
    );
    let mut rows = vec![bare(&args.dir, args.entry_bytes * args.entries, run)];
    rows.extend(
        args.shards
            .iter()
            .map(|&n| group_commit(&args.dir, n, &args, run)),
    );

    let base = rows[0].syncs as f64 / rows[0].secs;
    println!("{HEADER}");
    for r in &rows {
        let mut line = format!("{:>6}", r.label());
        for ((v, w), d) in r.cells(base).iter().zip(WIDTHS).zip(DECIMALS) {
            line += &format!("  {v:>w$.d$}");
        }
        println!("{line}");
    }
    println!("(bare = single-threaded write_all + fdatasync of one record on a plain file)");

    if let Some(path) = &args.json {
        let items: Vec<String> = rows
            .iter()
            .map(|r| {
                let label = match r.shards {
                    0 => "\"bare\"".into(),
                    n => n.to_string(),
                };
                let fields: Vec<String> = JSON_KEYS
                    .iter()
                    .zip(r.cells(base))
                    .map(|(k, v)| format!("\"{k}\":{v:.4}"))
                    .collect();
                format!("{{\"shards\":{label},{}}}", fields.join(","))
            })
            .collect();
        let doc = format!(
            "{{\"entry_bytes\":{},\"entries_per_append\":{},\"seconds\":{},\"dir\":{:?},\"fs\":{:?},\"rows\":[\n  {}\n]}}\n",
            args.entry_bytes,
            args.entries,
            args.seconds,
            args.dir.display().to_string(), // `{:?}` quoting is JSON's for ordinary paths
            fs,
            items.join(",\n  "),
        );
        std::fs::write(path, doc).expect("write JSON");
    }
}
