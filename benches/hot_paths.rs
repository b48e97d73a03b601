//! Criterion benches of kvnode's hot paths, each next to a ceiling measured in the same run, so
//! that kvnode's overhead reads as a ratio (the machine may be busy: absolute numbers are noisy,
//! ratios of neighbours much less so).
//!
//! Run all of it (a few minutes), one group, or criterion's quick smoke test:
//!
//! ```text
//! cargo bench --bench hot_paths
//! cargo bench --bench hot_paths -- wal_append
//! cargo bench --bench hot_paths -- --test
//! ```
//!
//! | group | kvnode | ceiling |
//! |---|---|---|
//! | `ring` | `HashRing::shard_for` over 4096 pre-generated keys, 16 and 256 shards | `key_hash` alone (XXH3 of the key) |
//! | `codec` | one WAL record holding one Raft normal entry (a put with a 256-byte value): encode = `encode_serde(entry)` + record + frame, decode = frame check + record + entry | one copy + one CRC-32 of the same number of bytes |
//! | `codec/wal_api` | the same through the pub `Wal` API (no fsync: a no-op `Syncer`): `append` (lock, `pwrite`, index) and `read` of one entry (`pread`) | (compared with `encode`/`decode` above) |
//! | `wal_append` | `Wal::append` with group commit, 1 and 16 shards appending concurrently, one append in flight per shard | a bare `pwrite` + `fdatasync` loop writing, per sync, the entries and bytes kvnode achieved per sync |
//! | `apply` | `StateMachine::apply_entries` of 1 and 64 puts (256-byte values, 1000 keys) | raw sled `insert`s of the same keys and 256-byte values, one per entry, as kvnode's apply writes them (every write changes the value, as kvnode's versions do: sled skips a set to an equal value) |
//! | `embedded` | `Node::get` eventual and linearizable (16 shards, 1000 keys, 256-byte values); `Node::put` with 64 in flight | raw sled `get` of the same keys; the bare append+`fdatasync` loop with kvnode's batching |
//!
//! Every "kvnode" bench is followed by its ceiling in the same group, and the run ends with a
//! table of ratios (kvnode's time per operation over the ceiling's), read back from criterion's
//! estimates in `target/criterion/<group>/<bench>/new/estimates.json` (written again to
//! `target/criterion/hot_paths-ratios.txt`). In `--test` mode nothing is estimated and the table
//! says so.
//!
//! Details worth knowing when reading the numbers:
//!
//! - The record format (`Record`, `Envelope`) is crate-private. The `codec` group therefore
//!   builds the record from the pub pieces exactly as the WAL does (`codec::encode` of a
//!   bench-local copy of `Record::Append`, framed with `codec::encode_frame_with` and the
//!   durability watermark), after checking on real WAL bytes that the copy encodes and decodes
//!   byte for byte like the original; `codec/wal_api` goes through the pub `Wal` API instead.
//! - `wal_append` and the durable put count one iteration as one acknowledged append (resp. 64
//!   puts: 64 tasks on a tokio runtime, each doing `iters` puts one after another, so 64 are
//!   always in flight; criterion's time is per 64 puts and its throughput line is puts/s).
//! - The fsync ceilings (`bare_same_batching`) are paired: every sample first runs a kvnode
//!   slice of the same size (untimed by criterion there), then the bare loop with the entries
//!   and bytes per `fdatasync` of that very slice. The bare loop is single-threaded, with no
//!   lock, no index, no callbacks. Besides criterion's ratio of the two benches, the summary
//!   gives the median of the per-sample ratios, which a disk shared with other work (its
//!   fsync latency drifts) disturbs much less.
//! - A watchdog ends the run (exit code 3, after printing what was measured) if a write path
//!   stops making progress for 60 s (`KVNODE_BENCH_STALL_SECS`): sled 0.34.7 can deadlock under
//!   sustained overwrites (see [`start_watchdog`]); this happened in this bench, in kvnode's
//!   state machine and in raw sled alike.
//! - Files live on the filesystem of `target/` (in `target/hot_paths-scratch`, or
//!   `$KVNODE_BENCH_DIR`), never on a tmpfs.

use std::fs::File;
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant, SystemTime};

use criterion::{BatchSize, BenchmarkId, Criterion, SamplingMode, Throughput};
use kvnode::raft::{Command, Entry, StateMachine, log_id, normal_entry};
use kvnode::sharding::{HashRing, key_hash};
use kvnode::storage::codec::{self, Frame};
use kvnode::storage::wal::{Syncer, WalStats};
use kvnode::storage::{Store, StoreOptions, Wal, WalOptions};
use kvnode::{Config, Node, ReadOptions};
use tempfile::TempDir;

#[allow(dead_code)]
mod common;

/// Value size of every put, stored value and WAL entry payload.
const VALUE_BYTES: usize = 256;
/// Key set of `apply` and `embedded`.
const KEYS: usize = 1000;
/// Durable puts in flight in `embedded`.
const IN_FLIGHT: usize = 64;
/// Shards of the embedded node (the default, as in `embedded_throughput`).
const EMBEDDED_SHARDS: u32 = 16;
/// A shard's WAL is purged up to `last - PURGE_EVERY` every `PURGE_EVERY` appends.
const PURGE_EVERY: u64 = 1000;
/// The bare loop starts its file over at this size, like a WAL segment (64 MiB).
const BARE_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// Version byte of WAL record frames (`storage::wal::record::RECORD_VERSION`, crate-private).
const RECORD_VERSION: u8 = 1;

fn main() {
    STARTED.get_or_init(SystemTime::now);
    start_watchdog();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    ring(&mut c);
    codec_group(&mut c);
    wal_append(&mut c);
    apply(&mut c);
    embedded(&mut c);
    c.final_summary();
    summary();
}

/// When this run started: estimates older than this are not this run's.
static STARTED: OnceLock<SystemTime> = OnceLock::new();

// ---------------------------------------------------------------------------------------------
// Shared helpers

fn keys(n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| format!("key-{i}").into_bytes()).collect()
}

fn value() -> Vec<u8> {
    vec![0x5A; VALUE_BYTES]
}

/// `<target>`: `$CARGO_TARGET_DIR`, else three levels above this binary
/// (`<target>/<profile>/deps/hot_paths-<hash>`).
fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return dir.into();
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("target"))
}

/// Where criterion writes its estimates (its own rule, minus the `cargo metadata` call).
fn criterion_dir() -> PathBuf {
    match std::env::var_os("CRITERION_HOME") {
        Some(dir) => dir.into(),
        None => target_dir().join("criterion"),
    }
}

/// The directory temporary WALs, sled databases and nodes go in: on the filesystem of
/// `target/` (`$KVNODE_BENCH_DIR` overrides), never tmpfs.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::var_os("KVNODE_BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| target_dir().join("hot_paths-scratch"));
        std::fs::create_dir_all(&dir).expect("create the scratch directory");
        let fs = common::fs_type(&dir).unwrap_or_else(|| "unknown filesystem".into());
        note(format!("scratch files in {} ({fs})", dir.display()));
        if fs.starts_with("tmpfs") {
            eprintln!(
                "warning: {} is on tmpfs: fdatasync is free there",
                dir.display()
            );
        }
        dir
    })
}

fn temp_dir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(scratch())
        .expect("temp dir")
}

/// Lines printed with the ratio table (batching achieved, where files were, ...).
static NOTES: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn note(line: String) {
    NOTES.lock().expect("notes").push(line);
}

/// One paired sample: `(iterations, kvnode time / ceiling time)`.
type Pair = (u64, f64);

/// Paired samples of the I/O benches, per bench.
static PAIRED: Mutex<Vec<(String, Vec<Pair>)>> = Mutex::new(Vec::new());

fn paired(bench: &str, iters: u64, ratio: f64) {
    let mut all = PAIRED.lock().expect("paired");
    match all.iter_mut().find(|(b, _)| b == bench) {
        Some((_, v)) => v.push((iters, ratio)),
        None => all.push((bench.to_owned(), vec![(iters, ratio)])),
    }
}

/// Write-path progress (appends, applied batches, puts, bare syncs) and the bench being
/// watched: the write paths go through sled, which can deadlock (see [`start_watchdog`]).
static PROGRESS: AtomicU64 = AtomicU64::new(0);
static WATCHED: Mutex<Option<String>> = Mutex::new(None);

fn tick() {
    PROGRESS.fetch_add(1, Ordering::Relaxed);
}

/// Arms the watchdog for `bench` until dropped.
struct Watch;

fn watch(bench: &str) -> Watch {
    *WATCHED.lock().expect("watched") = Some(bench.to_owned());
    Watch
}

impl Drop for Watch {
    fn drop(&mut self) {
        *WATCHED.lock().expect("watched") = None;
    }
}

/// Ends the run (exit code 3) if a watched write path makes no progress for
/// `$KVNODE_BENCH_STALL_SECS` (default 60; 0 = never, e.g. to attach gdb). sled 0.34.7 can
/// deadlock under sustained overwrites: a writer holding the segment accountant's mutex waits
/// in `bump_tip` for a file truncation queued on sled's IO pool, whose threads all wait for
/// that mutex (seen here in `StateTree::apply`, both from the embedded node and directly).
fn start_watchdog() {
    let limit = std::env::var("KVNODE_BENCH_STALL_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(60);
    if limit == 0 {
        return;
    }
    std::thread::spawn(move || {
        let (mut last, mut since) = (PROGRESS.load(Ordering::Relaxed), Instant::now());
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let now = PROGRESS.load(Ordering::Relaxed);
            let watched = WATCHED.lock().expect("watched").clone();
            if now != last || watched.is_none() {
                (last, since) = (now, Instant::now());
                continue;
            }
            if since.elapsed() >= Duration::from_secs(limit) {
                eprintln!(
                    "\nhot_paths: no progress in {} for {limit} s: the write path is stuck. \
                     Seen before: sled 0.34.7 deadlock (a writer waits in \
                     SegmentAccountant::bump_tip for a truncation queued behind sled IO threads \
                     that wait for the mutex it holds). Rerun with KVNODE_BENCH_STALL_SECS=0 \
                     and `gdb -p {} -batch -ex 'thread apply all bt'` to see the threads.",
                    watched.unwrap_or_default(),
                    std::process::id()
                );
                summary(); // what was measured before the stall
                std::process::exit(3);
            }
        }
    });
}

/// A [`Syncer`] that syncs nothing: the WAL's CPU path without the disk.
struct NoSync;

impl Syncer for NoSync {
    fn sync(&self, _file: &File) -> std::io::Result<()> {
        Ok(())
    }
}

/// A Raft normal entry putting a 256-byte value, as the log store writes it into the WAL.
fn put_entry(index: u64, key: &[u8], value: &[u8]) -> Entry {
    normal_entry(
        log_id(3, 1, index),
        Command::Put {
            key: key.to_vec(),
            value: value.to_vec(),
        },
    )
}

// ---------------------------------------------------------------------------------------------
// ring

fn ring(c: &mut Criterion) {
    let keys = keys(4096);
    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(1));
    let mut i = 0;
    g.bench_function("key_hash", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            key_hash(black_box(&keys[i]))
        })
    });
    for shards in [16, 256] {
        let ring = HashRing::with_shards(shards).expect("ring");
        g.bench_function(BenchmarkId::new("shard_for", shards), |b| {
            b.iter(|| {
                i = (i + 1) % keys.len();
                ring.shard_for(black_box(&keys[i]))
            })
        });
    }
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// codec

/// Bench-local copy of `storage::wal::record::Record::Append` (variant 0 of a crate-private
/// enum): same bincode encoding, checked against real WAL bytes by [`check_record_copy`].
#[derive(Debug, PartialEq, Eq, bincode::Encode, bincode::Decode)]
enum Record {
    Append {
        shard: u64,
        first_index: u64,
        entries: Vec<Vec<u8>>,
    },
}

/// What the WAL does per append (`LogStore::append` + `Wal::write`): encode the entry, the
/// record, then the frame with the durability watermark. Appends to `out`.
fn encode_record(entry: &Entry, synced_upto: u64, out: &mut Vec<u8>) {
    let record = Record::Append {
        shard: 7,
        first_index: entry.log_id.index(),
        entries: vec![codec::encode_serde(entry)],
    };
    let encoded = codec::encode(&record);
    codec::encode_frame_with(RECORD_VERSION, out, |out| {
        out.extend_from_slice(&synced_upto.to_le_bytes());
        out.extend_from_slice(&encoded);
    });
}

/// What recovery and `Wal::read` + `LogStore` do per frame: check it, decode the envelope and
/// record, decode the entry.
fn decode_record(frame: &[u8]) -> Entry {
    let Frame::Valid {
        version, payload, ..
    } = codec::decode_frame(frame)
    else {
        panic!("bad frame")
    };
    assert_eq!(version, RECORD_VERSION);
    let _synced_upto = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
    let Record::Append { mut entries, .. } =
        codec::decode::<Record>(&payload[8..]).expect("record");
    codec::decode_serde(&entries.pop().expect("one entry")).expect("entry")
}

/// Writes an entry through the real WAL and checks that [`Record`] reads and re-encodes its
/// frame byte for byte: the `codec` group would measure something else if the format moved.
fn check_record_copy(entry_bytes: &[u8]) {
    let dir = temp_dir("codec-check-");
    let options = WalOptions {
        syncer: Arc::new(NoSync),
        ..WalOptions::default()
    };
    let wal = Wal::open(dir.path(), options).expect("open WAL");
    wal.append(9, 1, vec![entry_bytes.to_vec()], Box::new(|_| {}))
        .expect("append");
    drop(wal);
    let mut found = false;
    for file in std::fs::read_dir(dir.path()).expect("read WAL dir") {
        let path = file.expect("dir entry").path();
        if path.extension().is_none_or(|e| e != "wal") {
            continue;
        }
        let bytes = std::fs::read(&path).expect("read segment");
        // Frames start after the segment header (whose length is crate-private): at the first
        // offset that holds a valid, checksummed frame.
        let Some(mut at) = (0..bytes.len())
            .find(|&o| matches!(codec::decode_frame(&bytes[o..]), Frame::Valid { .. }))
        else {
            continue;
        };
        while let Frame::Valid {
            version,
            payload,
            len,
        } = codec::decode_frame(&bytes[at..])
        {
            if let Ok(record) = codec::decode::<Record>(&payload[8..]) {
                let expected = Record::Append {
                    shard: 9,
                    first_index: 1,
                    entries: vec![entry_bytes.to_vec()],
                };
                assert_eq!(record, expected, "the WAL's Append record changed");
                assert_eq!(version, RECORD_VERSION, "the WAL's record version changed");
                assert_eq!(codec::encode(&record), &payload[8..], "re-encoding differs");
                found = true;
            }
            at += len;
        }
    }
    assert!(
        found,
        "no Append record found in the WAL: update the bench's Record copy"
    );
}

fn codec_group(c: &mut Criterion) {
    let entry = put_entry(123_456, b"key-42", &value());
    let entry_bytes = codec::encode_serde(&entry);
    let mut frame = Vec::new();
    encode_record(&entry, 1 << 30, &mut frame);
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Bytes(frame.len() as u64));

    let mut checked = false;
    let mut out = Vec::with_capacity(4096);
    g.bench_function(BenchmarkId::new("encode", "kvnode"), |b| {
        if !std::mem::replace(&mut checked, true) {
            check_record_copy(&entry_bytes);
        }
        b.iter(|| {
            out.clear();
            encode_record(black_box(&entry), 1 << 30, &mut out);
            out.len()
        })
    });
    // The least a checksummed frame of this size costs: one copy in, one CRC over it.
    g.bench_function(BenchmarkId::new("encode", "copy_crc32"), |b| {
        b.iter(|| {
            out.clear();
            out.extend_from_slice(black_box(&frame));
            crc32fast::hash(&out[codec::FRAME_HEADER_LEN..])
        })
    });
    g.bench_function(BenchmarkId::new("decode", "kvnode"), |b| {
        b.iter(|| decode_record(black_box(&frame)))
    });
    // The least decoding costs: one CRC over the body, one copy out.
    g.bench_function(BenchmarkId::new("decode", "crc32_copy"), |b| {
        b.iter(|| {
            let body = &black_box(&frame)[codec::FRAME_HEADER_LEN..];
            (crc32fast::hash(body), body.to_vec())
        })
    });

    // The pub storage API: append (encode + lock + pwrite + index + callback, no fsync) and read
    // of one entry (index lookup + pread + frame check + decode), with the entry's own encoding.
    let mut wal: Option<(TempDir, Wal, u64)> = None;
    let mut open = || {
        let dir = temp_dir("codec-wal-");
        let options = WalOptions {
            syncer: Arc::new(NoSync),
            ..WalOptions::default()
        };
        let wal = Wal::open(dir.path(), options).expect("open WAL");
        (dir, wal, 1)
    };
    g.bench_function(BenchmarkId::new("wal_api", "append_no_sync"), |b| {
        let (_, wal, next) = wal.get_or_insert_with(&mut open);
        b.iter(|| {
            let bytes = codec::encode_serde(black_box(&entry));
            wal.append(7, *next, vec![bytes], Box::new(|_| {}))
                .expect("append");
            if next.is_multiple_of(PURGE_EVERY) && *next > PURGE_EVERY {
                let upto = *next - PURGE_EVERY;
                wal.purge(7, upto, upto.to_le_bytes().to_vec())
                    .expect("purge");
            }
            *next += 1;
        })
    });
    g.bench_function(BenchmarkId::new("wal_api", "read_one"), |b| {
        let (_, wal, next) = wal.get_or_insert_with(&mut open);
        if *next == 1 {
            wal.append(7, 1, vec![entry_bytes.clone()], Box::new(|_| {}))
                .expect("append");
            *next = 2;
        }
        let last = *next - 1;
        b.iter(|| {
            let (_, bytes) = wal
                .read(7, black_box(last)..=last)
                .expect("read")
                .pop()
                .expect("entry");
            codec::decode_serde::<Entry>(&bytes).expect("entry")
        })
    });
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// wal_append

/// WAL counters summed over every timed run of one kvnode bench.
#[derive(Debug, Clone, Copy, Default)]
struct Batching {
    /// Entries acknowledged (appends, or puts).
    entries: u64,
    syncs: u64,
    bytes: u64,
    sync_nanos: u64,
    wall: Duration,
}

impl Batching {
    fn add(&mut self, before: WalStats, after: WalStats, entries: u64, wall: Duration) {
        self.entries += entries;
        self.syncs += after.syncs - before.syncs;
        self.bytes += after.bytes - before.bytes;
        self.sync_nanos += after.sync_nanos - before.sync_nanos;
        self.wall += wall;
    }

    fn merge(&mut self, other: &Batching) {
        self.entries += other.entries;
        self.syncs += other.syncs;
        self.bytes += other.bytes;
        self.sync_nanos += other.sync_nanos;
        self.wall += other.wall;
    }

    fn entries_per_sync(&self) -> f64 {
        self.entries as f64 / self.syncs.max(1) as f64
    }

    fn bytes_per_sync(&self) -> f64 {
        self.bytes as f64 / self.syncs.max(1) as f64
    }

    fn describe(&self, what: &str) -> String {
        format!(
            "{:.2} {what} and {:.0} bytes per fdatasync; mean fdatasync {:.3} ms, fdatasync busy {:.0}% of the wall time",
            self.entries_per_sync(),
            self.bytes_per_sync(),
            self.sync_nanos as f64 / self.syncs.max(1) as f64 / 1e6,
            100.0 * self.sync_nanos as f64 / self.wall.as_nanos().max(1) as f64,
        )
    }
}

/// The ceiling: one thread, `pwrite` of a batch's bytes then `fdatasync`, on a plain file that
/// starts over at 64 MiB (like a WAL segment).
struct Bare {
    _dir: TempDir,
    file: File,
    offset: u64,
    buf: Vec<u8>,
    syncs: u64,
    sync_nanos: u64,
}

impl Bare {
    fn new() -> Bare {
        let dir = temp_dir("bare-");
        let file = File::create(dir.path().join("bare.log")).expect("create bare file");
        Bare {
            _dir: dir,
            file,
            offset: 0,
            buf: Vec::new(),
            syncs: 0,
            sync_nanos: 0,
        }
    }

    /// Time for `entries` entries written with `batching`'s entries and bytes per sync.
    fn run(&mut self, entries: u64, batching: &Batching) -> Duration {
        let exact_syncs = entries as f64 / batching.entries_per_sync();
        let syncs = (exact_syncs.round() as u64).max(1);
        let mut carry = 0.0;
        let start = Instant::now();
        for _ in 0..syncs {
            carry += batching.bytes_per_sync();
            let n = carry as usize;
            carry -= n as f64;
            if self.buf.len() < n {
                self.buf.resize(n, 0xA5);
            }
            if self.offset + n as u64 > BARE_FILE_BYTES {
                self.file.set_len(0).expect("truncate");
                self.offset = 0;
            }
            self.file
                .write_all_at(&self.buf[..n], self.offset)
                .expect("write");
            self.offset += n as u64;
            let t = Instant::now();
            self.file.sync_data().expect("fdatasync");
            self.sync_nanos += t.elapsed().as_nanos() as u64;
            tick();
        }
        self.syncs += syncs;
        // Scale the rounded number of syncs back to the exact share of `entries`.
        start.elapsed().mul_f64(exact_syncs / syncs as f64)
    }

    fn describe(&self) -> String {
        format!(
            "mean fdatasync {:.3} ms",
            self.sync_nanos as f64 / self.syncs.max(1) as f64 / 1e6
        )
    }
}

/// An open WAL and each shard's next index.
struct WalRig {
    _dir: TempDir,
    wal: Wal,
    next: Vec<AtomicU64>,
}

impl WalRig {
    fn new(shards: usize) -> WalRig {
        let dir = temp_dir("wal-append-");
        let wal = Wal::open(dir.path(), WalOptions::default()).expect("open WAL");
        WalRig {
            _dir: dir,
            wal,
            next: (0..shards).map(|_| AtomicU64::new(1)).collect(),
        }
    }

    /// `appends` acknowledged appends by one closed-loop writer per shard (each takes the next
    /// append from a shared budget, so all stay busy to the end). Returns the wall time.
    fn run(&self, appends: u64, entry: &[u8], batching: &mut Batching) -> Duration {
        let budget = AtomicU64::new(appends);
        let before = self.wal.stats();
        let start = Instant::now();
        std::thread::scope(|s| {
            for (shard, next) in self.next.iter().enumerate() {
                let budget = &budget;
                s.spawn(move || self.writer(shard as u64, next, budget, entry));
            }
        });
        let wall = start.elapsed();
        batching.add(before, self.wal.stats(), appends, wall);
        wall
    }

    fn writer(&self, shard: u64, next: &AtomicU64, budget: &AtomicU64, entry: &[u8]) {
        let (tx, rx) = mpsc::channel();
        let mut index = next.load(Ordering::Relaxed);
        while budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
            .is_ok()
        {
            let tx = tx.clone();
            self.wal
                .append(
                    shard,
                    index,
                    vec![entry.to_vec()],
                    Box::new(move |r| drop(tx.send(r.map_err(|e| e.to_string())))),
                )
                .expect("append");
            rx.recv().expect("callback dropped").expect("append failed");
            tick();
            if index.is_multiple_of(PURGE_EVERY) && index > PURGE_EVERY {
                let upto = index - PURGE_EVERY;
                self.wal
                    .purge(shard, upto, upto.to_le_bytes().to_vec())
                    .expect("purge");
            }
            index += 1;
        }
        next.store(index, Ordering::Relaxed);
    }
}

fn wal_append(c: &mut Criterion) {
    let entry = codec::encode_serde(&put_entry(1, b"key-42", &value()));
    let mut g = c.benchmark_group("wal_append");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements(1));
    for shards in [1usize, 16] {
        let mut rig: Option<WalRig> = None;
        let mut batching = Batching::default();
        let name = format!("wal_append/kvnode/{shards}");
        g.bench_function(BenchmarkId::new("kvnode", shards), |b| {
            let _armed = watch(&name);
            let rig = rig.get_or_insert_with(|| WalRig::new(shards));
            b.iter_custom(|iters| rig.run(iters, &entry, &mut batching));
        });
        // Each sample: a kvnode slice of the same size first (not what criterion times here),
        // then the bare loop with the batching of that very slice; the pair's ratio is kept.
        let name = format!("wal_append/bare_same_batching/{shards}");
        let mut slices = Batching::default();
        let mut bare: Option<Bare> = None;
        g.bench_function(BenchmarkId::new("bare_same_batching", shards), |b| {
            let _armed = watch(&name);
            let rig = rig.get_or_insert_with(|| WalRig::new(shards));
            let bare = bare.get_or_insert_with(Bare::new);
            b.iter_custom(|iters| {
                let mut slice = Batching::default();
                let kvnode = rig.run(iters, &entry, &mut slice);
                let ceiling = bare.run(iters, &slice);
                slices.merge(&slice);
                paired(&name, iters, kvnode.as_secs_f64() / ceiling.as_secs_f64());
                ceiling
            });
        });
        note(format!(
            "wal_append/{shards}: kvnode {}; in the paired slices {}; bare loop {}",
            batching.describe("appends"),
            slices.describe("appends"),
            bare.as_ref().map_or("not run".into(), Bare::describe),
        ));
    }
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// apply

struct ApplyRig {
    _dir: TempDir,
    store: Store,
    sm: StateMachine,
    next: u64,
    raw_db: sled::Db,
    raw: sled::Tree,
    raw_writes: u64,
    /// The bench that ran last: both databases are flushed when it changes, so that neither
    /// bench pays for the other's dirty data (sled writes it back on its own threads).
    last_bench: String,
}

impl ApplyRig {
    fn new() -> ApplyRig {
        let dir = temp_dir("apply-");
        let store = Store::open(dir.path().join("kv"), StoreOptions::default()).expect("store");
        let sm = StateMachine::open(&store, 0, None).expect("state machine");
        // Same cache size as the store's sled.
        let raw_db = sled::Config::new()
            .path(dir.path().join("raw"))
            .cache_capacity(StoreOptions::default().sled_cache_bytes)
            .open()
            .expect("raw sled");
        let raw = raw_db.open_tree("raw").expect("raw tree");
        ApplyRig {
            _dir: dir,
            store,
            sm,
            next: 1,
            raw_db,
            raw,
            raw_writes: 0,
            last_bench: String::new(),
        }
    }

    /// Flushes both databases if `bench` is not the bench that ran last.
    fn enter(&mut self, bench: &str) {
        if self.last_bench != bench {
            self.store.flush_state().expect("flush the store's sled");
            self.raw_db.flush().expect("flush raw sled");
            self.last_bench = bench.to_owned();
        }
    }
}

fn apply(c: &mut Criterion) {
    let keys = keys(KEYS);
    let value = value();
    let mut rig: Option<ApplyRig> = None;
    let mut g = c.benchmark_group("apply");
    g.sample_size(50);
    for batch in [1usize, 64] {
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(BenchmarkId::new("state_machine", batch), |b| {
            let name = format!("apply/state_machine/{batch}");
            let _armed = watch(&name);
            let rig = rig.get_or_insert_with(ApplyRig::new);
            rig.enter(&name);
            b.iter_batched(
                || {
                    let first = rig.next;
                    rig.next += batch as u64;
                    (first..rig.next)
                        .map(|i| put_entry(i, &keys[i as usize % KEYS], &value))
                        .collect::<Vec<_>>()
                },
                |entries| {
                    let results = rig.sm.apply_entries(entries).expect("apply");
                    tick();
                    results
                },
                BatchSize::SmallInput,
            )
        });
        // Every write changes the value (its first 8 bytes count writes), as kvnode's versions
        // do: sled skips a set that leaves the value unchanged, which would make this no ceiling.
        g.bench_function(BenchmarkId::new("sled_inserts", batch), |b| {
            let name = format!("apply/sled_inserts/{batch}");
            let _armed = watch(&name);
            let rig = rig.get_or_insert_with(ApplyRig::new);
            rig.enter(&name);
            b.iter(|| {
                for _ in 0..batch {
                    rig.raw_writes += 1;
                    let mut v = value.clone();
                    v[..8].copy_from_slice(&rig.raw_writes.to_le_bytes());
                    let key = &keys[rig.raw_writes as usize % KEYS];
                    rig.raw.insert(key.as_slice(), v).expect("insert");
                }
                tick();
            })
        });
    }
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// embedded

struct EmbeddedRig {
    _dir: TempDir,
    rt: tokio::runtime::Runtime,
    node: Option<Arc<Node>>,
    keys: Arc<Vec<Vec<u8>>>,
    _raw_db: sled::Db,
    raw: sled::Tree,
}

impl EmbeddedRig {
    fn new() -> EmbeddedRig {
        let dir = temp_dir("embedded-");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let config = Config {
            shards: EMBEDDED_SHARDS,
            ..Config::single_node(dir.path().join("node"))
        };
        let node = Arc::new(rt.block_on(Node::open(config)).expect("open node"));
        let keys = Arc::new(keys(KEYS));
        // Load every key (64 in flight) so gets find values.
        rt.block_on(put_all(
            node.clone(),
            keys.clone(),
            KEYS.div_ceil(IN_FLIGHT) as u64,
        ));
        let raw_db = sled::Config::new()
            .path(dir.path().join("raw"))
            .cache_capacity(StoreOptions::default().sled_cache_bytes)
            .open()
            .expect("raw sled");
        let raw = raw_db.open_tree("raw").expect("raw tree");
        for key in keys.iter() {
            raw.insert(key.as_slice(), value()).expect("raw insert");
        }
        raw_db.flush().expect("raw flush");
        EmbeddedRig {
            _dir: dir,
            rt,
            node: Some(node),
            keys,
            _raw_db: raw_db,
            raw,
        }
    }

    fn node(&self) -> &Arc<Node> {
        self.node.as_ref().expect("node open")
    }
}

impl Drop for EmbeddedRig {
    fn drop(&mut self) {
        if let Some(node) = self.node.take().and_then(|n| Arc::try_unwrap(n).ok()) {
            self.rt.block_on(node.close());
        }
    }
}

/// `IN_FLIGHT` tasks, each doing `rounds` durable puts one after another: `IN_FLIGHT * rounds`
/// puts, 64 always in flight until the last round. Task `w` writes keys `w + 64 j`.
async fn put_all(node: Arc<Node>, keys: Arc<Vec<Vec<u8>>>, rounds: u64) {
    let tasks: Vec<_> = (0..IN_FLIGHT)
        .map(|w| {
            let (node, keys) = (node.clone(), keys.clone());
            tokio::spawn(async move {
                let value = value();
                for j in 0..rounds as usize {
                    let key = &keys[(w + IN_FLIGHT * j) % keys.len()];
                    node.put(key, value.clone()).await.expect("put");
                    tick();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("put task");
    }
}

/// Runs [`put_all`] and adds the node's WAL counters to `batching`; returns the wall time.
fn measure_puts(rig: &EmbeddedRig, rounds: u64, batching: &mut Batching) -> Duration {
    let wal = rig.node().store().wal();
    let before = wal.stats();
    let start = Instant::now();
    rig.rt
        .block_on(put_all(rig.node().clone(), rig.keys.clone(), rounds));
    let wall = start.elapsed();
    batching.add(before, wal.stats(), rounds * IN_FLIGHT as u64, wall);
    wall
}

fn embedded(c: &mut Criterion) {
    let mut rig: Option<EmbeddedRig> = None;
    let mut g = c.benchmark_group("embedded");
    g.throughput(Throughput::Elements(1));
    for (name, options) in [
        ("get_eventual", ReadOptions::eventual()),
        ("get_linearizable", ReadOptions::linearizable()),
    ] {
        g.bench_function(BenchmarkId::new(name, "kvnode"), |b| {
            let rig = rig.get_or_insert_with(EmbeddedRig::new);
            let (node, keys) = (rig.node(), &rig.keys);
            b.iter_custom(|iters| {
                rig.rt.block_on(async {
                    let start = Instant::now();
                    for i in 0..iters as usize {
                        let reply = node.get(&keys[i % KEYS], &options).await.expect("get");
                        black_box(reply);
                    }
                    start.elapsed()
                })
            })
        });
    }
    g.bench_function(BenchmarkId::new("get", "sled"), |b| {
        let rig = rig.get_or_insert_with(EmbeddedRig::new);
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % KEYS;
            rig.raw.get(&rig.keys[i]).expect("raw get")
        })
    });

    // Durable puts, 64 in flight: one iteration = 64 puts.
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements(IN_FLIGHT as u64));
    let mut batching = Batching::default();
    g.bench_function(BenchmarkId::new("put_durable_64", "kvnode"), |b| {
        let _armed = watch("embedded/put_durable_64/kvnode");
        let rig = rig.get_or_insert_with(EmbeddedRig::new);
        b.iter_custom(|iters| measure_puts(rig, iters, &mut batching));
    });
    // Paired like `wal_append`: each sample runs a kvnode slice of the same size first, then
    // the bare loop with that slice's puts and bytes per fdatasync.
    let name = "embedded/put_durable_64/bare_same_batching";
    let mut slices = Batching::default();
    let mut bare: Option<Bare> = None;
    g.bench_function(
        BenchmarkId::new("put_durable_64", "bare_same_batching"),
        |b| {
            let _armed = watch(name);
            let rig = rig.get_or_insert_with(EmbeddedRig::new);
            let bare = bare.get_or_insert_with(Bare::new);
            b.iter_custom(|iters| {
                let mut slice = Batching::default();
                let kvnode = measure_puts(rig, iters, &mut slice);
                let ceiling = bare.run(iters * IN_FLIGHT as u64, &slice);
                slices.merge(&slice);
                paired(name, iters, kvnode.as_secs_f64() / ceiling.as_secs_f64());
                ceiling
            });
        },
    );
    note(format!(
        "embedded/put_durable_64: kvnode {}; in the paired slices {} (WAL bytes include votes, \
         committed and purge markers); bare loop {}",
        batching.describe("puts"),
        slices.describe("puts"),
        bare.as_ref().map_or("not run".into(), Bare::describe),
    ));
    g.finish();
    drop(rig);
}

// ---------------------------------------------------------------------------------------------
// summary

/// `(kvnode bench, its ceiling, operations per criterion iteration)`.
const PAIRS: [(&str, &str, u64); 13] = [
    ("ring/shard_for/16", "ring/key_hash", 1),
    ("ring/shard_for/256", "ring/key_hash", 1),
    ("codec/encode/kvnode", "codec/encode/copy_crc32", 1),
    ("codec/decode/kvnode", "codec/decode/crc32_copy", 1),
    ("codec/wal_api/append_no_sync", "codec/encode/kvnode", 1),
    ("codec/wal_api/read_one", "codec/decode/kvnode", 1),
    ("wal_append/kvnode/1", "wal_append/bare_same_batching/1", 1),
    (
        "wal_append/kvnode/16",
        "wal_append/bare_same_batching/16",
        1,
    ),
    ("apply/state_machine/1", "apply/sled_inserts/1", 1),
    ("apply/state_machine/64", "apply/sled_inserts/64", 64),
    ("embedded/get_eventual/kvnode", "embedded/get/sled", 1),
    ("embedded/get_linearizable/kvnode", "embedded/get/sled", 1),
    (
        "embedded/put_durable_64/kvnode",
        "embedded/put_durable_64/bare_same_batching",
        64,
    ),
];

/// Criterion's estimate of the time per iteration (ns) of `id`, if this run wrote one: the
/// slope of the linear fit where there is one, else the mean (flat sampling).
fn estimate(id: &str, since: SystemTime) -> Option<f64> {
    let path = criterion_dir().join(id).join("new").join("estimates.json");
    let modified = std::fs::metadata(&path).ok()?.modified().ok()?;
    if modified < since {
        return None; // left by an earlier run (filtered out or --test this time)
    }
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
    ["slope", "mean"]
        .iter()
        .find_map(|k| json.get(k)?.get("point_estimate")?.as_f64())
}

fn time(ns: f64) -> String {
    match ns {
        ns if ns >= 1e6 => format!("{:.3} ms", ns / 1e6),
        ns if ns >= 1e3 => format!("{:.3} µs", ns / 1e3),
        ns => format!("{ns:.1} ns"),
    }
}

fn summary() {
    let since = *STARTED.get_or_init(SystemTime::now) - Duration::from_secs(1);
    let mut out = vec![
        "kvnode vs ceiling, same run (time per operation; ratio = kvnode / ceiling, 1.00 = at the ceiling)".to_string(),
        format!(
            "{:<34} {:>12}   {:<44} {:>12} {:>7}",
            "kvnode", "per op", "ceiling", "per op", "ratio"
        ),
    ];
    let mut any = false;
    for (subject, ceiling, ops) in PAIRS {
        let (Some(s), Some(c)) = (estimate(subject, since), estimate(ceiling, since)) else {
            continue;
        };
        any = true;
        let (s, c) = (s / ops as f64, c / ops as f64);
        out.push(format!(
            "{subject:<34} {:>12}   {ceiling:<44} {:>12} {:>7.2}",
            time(s),
            time(c),
            s / c
        ));
    }
    if !any {
        out.push("(no fresh estimates: criterion --test/--list mode, or filtered out)".into());
    }
    for (bench, samples) in PAIRED.lock().expect("paired").iter() {
        // Keep the measurement samples: flat sampling gives them all the same iteration count,
        // the most frequent one (warm-up calls vary).
        let mut counts = std::collections::BTreeMap::new();
        for (iters, _) in samples {
            *counts.entry(*iters).or_insert(0) += 1;
        }
        let Some((&iters, _)) = counts.iter().max_by_key(|(i, n)| (**n, **i)) else {
            continue;
        };
        let mut r: Vec<f64> = samples
            .iter()
            .filter(|(i, _)| *i == iters)
            .map(|(_, r)| *r)
            .collect();
        r.sort_by(f64::total_cmp);
        let q = |p: f64| r[((r.len() - 1) as f64 * p).round() as usize];
        out.push(format!(
            "{bench}: paired kvnode/ceiling ratio median {:.2} (quartiles {:.2}–{:.2}, {} samples of {iters} iterations)",
            q(0.5),
            q(0.25),
            q(0.75),
            r.len()
        ));
    }
    out.extend(NOTES.lock().expect("notes").iter().cloned());
    let text = out.join("\n");
    println!("\n{text}");
    let dir = criterion_dir();
    if any && std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join("hot_paths-ratios.txt"), text + "\n");
    }
}
