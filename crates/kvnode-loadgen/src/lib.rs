//! The load generator: one closed-loop workload, driven identically against kvnode
//! ([`kvnode::KvnodeTarget`]), etcd ([`etcd::EtcdTarget`]) or a node embedded in this process
//! ([`embedded::EmbeddedTarget`], the `embedded_throughput` bench), measured into an HDR histogram
//! and summarized as a [`RunResult`] (`kvctl bench`, `scripts/bench.sh`; [`report`] puts the
//! results side by side).
//!
//! ## The workload
//!
//! A [`Workload`] fixes everything both systems see:
//!
//! - **Load phase.** Before anything is measured, every one of the `keys` keys
//!   (`bench-000000`, `bench-000001`, …, see [`key`]) is written once, `concurrency` writes in
//!   flight, each retried for up to [`PRELOAD_RETRY_FOR`] (a cluster that has just started may
//!   still be electing leaders). A key that cannot be written fails the run.
//! - **Closed loop.** `concurrency` tasks each keep exactly one request in flight: pick a key
//!   uniformly at random, read it with probability `read_percent`/100, else write a fresh
//!   `value_bytes`-long random value to it, wait for the reply, repeat. The offered load is
//!   therefore whatever the system can take at that concurrency (no coordinated-omission
//!   correction is needed: nothing is scheduled at a fixed rate).
//! - **Warmup, then measurement.** The loop runs for `warmup + duration`. An operation counts
//!   if it *completes* inside the measurement window (the last `duration`): its latency goes
//!   into the histogram and it adds to `ops`; a failed one adds to `errors` instead and never
//!   to the latencies. `ops_per_sec` is `ops / duration`. Operations still in flight when the
//!   window closes are not counted.
//! - A read of a key that is not there is an error ([`OpError::NotFound`]): every key was
//!   written in the load phase, so it means a target lost or misrouted data.
//! - After a failed operation the task sleeps 1 ms before its next one, so a node that refuses
//!   connections does not turn the loop into a busy spin.
//!
//! ## Measurement
//!
//! Each task records microseconds into its own [`Histogram`] (1 µs to 60 s, 3 significant
//! digits; slower operations are clamped to 60 s); the histograms are merged when the tasks
//! end. Nothing keeps individual samples. [`Latency`] reads p50, p99, p99.9 and the maximum
//! from the merged histogram.
//!
//! While a run is going, [`Progress::Bar`] shows an `indicatif` progress bar on stderr; when
//! stderr is not a terminal (CI logs, `scripts/bench.sh | tee`), the bar hides itself and one
//! plain progress line per second goes to stderr instead.
//!
//! A tool, not part of the `kvnode` library: an application that embeds `kvnode` never
//! compiles it (nor etcd's proto).

#![deny(missing_docs)]

pub mod embedded;
pub mod etcd;

/// etcd's v3 KV service, client side only: the `Range` and `Put` calls [`etcd`] makes, with
/// etcd's own package, names and field numbers (`proto/etcd.proto`, compiled by `build.rs`).
#[allow(missing_docs, clippy::all)]
pub(crate) mod etcd_pb {
    tonic::include_proto!("etcdserverpb");
}
pub mod kvnode;
pub mod report;

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ::kvnode::consistency::{ParseReadLevelError, ReadLevel};
use futures::StreamExt;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use kvnode_testkit::Rng;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// How long the load phase keeps retrying the write of one key before the run fails.
pub const PRELOAD_RETRY_FOR: Duration = Duration::from_secs(30);

/// The slowest latency the histogram tells apart (slower operations are recorded as this).
const HIST_MAX_US: u64 = 60_000_000;

/// What every task does, for how long, on which keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Tasks, each with one request in flight (default 64).
    pub concurrency: usize,
    /// Distinct keys, chosen uniformly (default 1000).
    pub keys: u64,
    /// Bytes per written value (default 256).
    pub value_bytes: usize,
    /// Share of operations that are reads, 0..=100; the rest are writes (default 0).
    pub read_percent: u8,
    /// The measurement window (default 10 s).
    pub duration: Duration,
    /// How long the loop runs before the measurement window opens (default 1 s).
    pub warmup: Duration,
}

impl Default for Workload {
    fn default() -> Workload {
        Workload {
            concurrency: 64,
            keys: 1000,
            value_bytes: 256,
            read_percent: 0,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
        }
    }
}

impl Workload {
    /// Refuses a workload that cannot run: no tasks, no keys, a read share over 100, an empty
    /// measurement window.
    pub fn validate(&self) -> Result<(), LoadError> {
        let bad = |what: &str| Err(LoadError::Workload(what.to_string()));
        if self.concurrency == 0 {
            return bad("concurrency must be at least 1");
        }
        if self.keys == 0 {
            return bad("keys must be at least 1");
        }
        if self.read_percent > 100 {
            return bad("read percent must be within 0..=100");
        }
        if self.duration.is_zero() {
            return bad("the duration must be positive");
        }
        Ok(())
    }
}

/// The `i`-th key of the key space: `bench-000042`, the same bytes for every system.
pub fn key(i: u64) -> Vec<u8> {
    format!("bench-{i:06}").into_bytes()
}

/// The system a target talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    /// A kvnode cluster.
    Kvnode,
    /// An etcd v3 cluster.
    Etcd,
}

impl System {
    /// The read levels this system offers, as accepted by [`Level`]'s parser.
    pub fn levels(self) -> &'static str {
        match self {
            System::Kvnode => "linearizable, lease, session, bounded:DURATION, eventual",
            System::Etcd => "linearizable, serializable",
        }
    }
}

impl fmt::Display for System {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            System::Kvnode => "kvnode",
            System::Etcd => "etcd",
        })
    }
}

impl FromStr for System {
    type Err = LevelError;

    fn from_str(s: &str) -> Result<System, LevelError> {
        match s {
            "kvnode" => Ok(System::Kvnode),
            "etcd" => Ok(System::Etcd),
            _ => Err(LevelError::UnknownSystem(s.to_string())),
        }
    }
}

/// The consistency level of the reads of a run. kvnode offers every level but
/// `serializable`; etcd offers `linearizable` and `serializable` (a member-local read, etcd's
/// counterpart of kvnode's `eventual`). [`Level::check_for`] says whether a system offers one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Both systems: sees every write acknowledged before the read began.
    Linearizable,
    /// kvnode: the leader within its lease.
    Lease,
    /// kvnode: read-your-writes and monotonic reads for the load generator as one session.
    Session,
    /// kvnode: at most this stale.
    Bounded(Duration),
    /// kvnode: any replica's local state.
    Eventual,
    /// etcd: the member's local state (`serializable: true`).
    Serializable,
}

impl Level {
    /// `Ok` if `system` offers this level, else [`LevelError::NotOffered`].
    pub fn check_for(self, system: System) -> Result<Level, LevelError> {
        let offered = match system {
            System::Kvnode => !matches!(self, Level::Serializable),
            System::Etcd => matches!(self, Level::Linearizable | Level::Serializable),
        };
        if offered {
            Ok(self)
        } else {
            Err(LevelError::NotOffered {
                level: self.to_string(),
                system,
            })
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Level::Linearizable => f.write_str("linearizable"),
            Level::Lease => f.write_str("lease"),
            Level::Session => f.write_str("session"),
            Level::Bounded(d) => write!(f, "bounded:{}ms", d.as_millis()),
            Level::Eventual => f.write_str("eventual"),
            Level::Serializable => f.write_str("serializable"),
        }
    }
}

impl FromStr for Level {
    type Err = LevelError;

    /// `serializable` (etcd), or a kvnode read level as [`ReadLevel`]'s `FromStr` spells it:
    /// `linearizable`, `lease`, `session`, `bounded:DURATION` (e.g. `bounded:500ms`; a bare
    /// number is milliseconds), `eventual`.
    fn from_str(s: &str) -> Result<Level, LevelError> {
        if s.trim() == "serializable" {
            return Ok(Level::Serializable);
        }
        match s.parse::<ReadLevel>() {
            Ok(ReadLevel::Linearizable) => Ok(Level::Linearizable),
            Ok(ReadLevel::Lease) => Ok(Level::Lease),
            Ok(ReadLevel::Session(_)) => Ok(Level::Session),
            Ok(ReadLevel::Bounded { max_staleness, .. }) => Ok(Level::Bounded(max_staleness)),
            Ok(ReadLevel::Eventual) => Ok(Level::Eventual),
            Err(ParseReadLevelError::Unknown(_)) => Err(LevelError::Unknown(s.to_string())),
            Err(ParseReadLevelError::BadBound { level, problem }) => {
                Err(LevelError::BadBound { level, problem })
            }
        }
    }
}

/// Parses `500ms`, `2s`, `1m` (a bare number is milliseconds): the library's parser, which
/// read levels use too.
pub use ::kvnode::consistency::parse_duration;

/// A read level or system name that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LevelError {
    /// Not a level name.
    #[error(
        "unknown read level {0:?}: use linearizable, lease, session, bounded:DURATION \
         (e.g. bounded:500ms), eventual (kvnode) or serializable (etcd)"
    )]
    Unknown(String),
    /// `bounded:` with a bound that is not a positive duration.
    #[error("bad read level {level:?}: {problem}")]
    BadBound {
        /// The level as given.
        level: String,
        /// What is wrong with the bound.
        problem: String,
    },
    /// A level the chosen system does not have.
    #[error("{system} has no {level} reads (it offers: {})", system.levels())]
    NotOffered {
        /// The level.
        level: String,
        /// The system.
        system: System,
    },
    /// Not a system name.
    #[error("unknown system {0:?}: use kvnode or etcd")]
    UnknownSystem(String),
}

/// Why one operation failed. Failed operations are counted in [`RunResult::errors`], never in
/// the latencies.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// kvnode refused or could not serve the request.
    #[error(transparent)]
    Kvnode(#[from] ::kvnode::Error),
    /// A gRPC call failed (etcd, or a transport error).
    #[error("gRPC {}: {}", .0.code(), .0.message())]
    Grpc(Box<tonic::Status>),
    /// A read found no value under a key the load phase wrote.
    #[error("key {0} not found (every key was written in the load phase)")]
    NotFound(String),
}

impl From<tonic::Status> for OpError {
    fn from(status: tonic::Status) -> OpError {
        OpError::Grpc(Box::new(status))
    }
}

/// Why a run could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The workload is unusable.
    #[error("invalid workload: {0}")]
    Workload(String),
    /// The read level is unusable for the target.
    #[error(transparent)]
    Level(#[from] LevelError),
    /// The target could not be reached.
    #[error("cannot connect to {system} at {endpoints}: {reason}")]
    Connect {
        /// The system.
        system: System,
        /// The endpoints tried, comma-separated.
        endpoints: String,
        /// Why.
        reason: String,
    },
    /// The load phase could not write a key within [`PRELOAD_RETRY_FOR`].
    #[error("load phase: writing {key} failed: {source}")]
    Preload {
        /// The key.
        key: String,
        /// The last error.
        #[source]
        source: OpError,
    },
    /// A worker task panicked.
    #[error("a load task failed: {0}")]
    Task(String),
}

/// The load generator's one session, for `session` reads against kvnode (a cluster or an
/// embedded node): every acknowledged write is observed into one shared token, and every read
/// carries it.
#[derive(Debug, Default)]
pub(crate) struct Session(std::sync::Mutex<::kvnode::SessionToken>);

impl Session {
    /// A session if `level` is `session`.
    pub(crate) fn for_level(level: Level) -> Option<Session> {
        (level == Level::Session).then(Session::default)
    }

    /// Records an acknowledged write.
    pub(crate) fn observe(&self, receipt: &::kvnode::WriteReceipt) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .observe_write(receipt);
    }

    /// Options for a read in this session.
    pub(crate) fn read_options(&self) -> ::kvnode::ReadOptions {
        ::kvnode::ReadOptions::session(
            &self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// A system under load: one write and one read, at the read level the target was made with.
/// The driver calls both from many tasks at once.
pub trait Target: Send + Sync + 'static {
    /// The system this target talks to.
    fn system(&self) -> System;

    /// The level its reads are made at.
    fn read_level(&self) -> Level;

    /// Writes `value` under `key`; `Ok` once the system acknowledged the write.
    fn put(&self, key: &[u8], value: Vec<u8>) -> impl Future<Output = Result<(), OpError>> + Send;

    /// Reads `key`; a missing key is [`OpError::NotFound`].
    fn get(&self, key: &[u8]) -> impl Future<Output = Result<(), OpError>> + Send;
}

/// What a run is called in its result and in the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The workload's name: the report pairs the kvnode and etcd results of the same name
    /// (`put`, `get`, `get-local`, `mix`, ...).
    pub workload: String,
    /// A human description of the run (free text).
    pub label: String,
}

/// Whether the driver shows its progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// A progress bar on stderr, or one plain line per second when stderr is not a terminal.
    Bar,
    /// Nothing (tests, embedding).
    Off,
}

/// Latency percentiles of the successful operations, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Slowest.
    pub max: f64,
}

impl Latency {
    /// Reads the percentiles from a histogram of microseconds (all zero when it is empty),
    /// rounded to the microsecond.
    pub fn from_histogram(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| round(us as f64 / 1000.0, 3);
        Latency {
            p50: ms(h.value_at_quantile(0.5)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// The outcome of one run; its JSON form (`--json`) is what [`report`] reads:
///
/// ```json
/// {"system":"kvnode","workload":"put","label":"...","concurrency":64,"keys":1000,
///  "value_bytes":256,"read_percent":0,"read_level":"linearizable","seconds":10.0,"ops":123,
///  "ops_per_sec":12.3,"errors":0,"latency_ms":{"p50":1.0,"p99":2.0,"p999":3.0,"max":4.0}}
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// `kvnode` or `etcd`.
    pub system: System,
    /// The workload's name ([`Names::workload`]).
    pub workload: String,
    /// The run's description ([`Names::label`]).
    pub label: String,
    /// Tasks in flight.
    pub concurrency: usize,
    /// Distinct keys.
    pub keys: u64,
    /// Bytes per written value.
    pub value_bytes: usize,
    /// Share of reads, 0..=100.
    pub read_percent: u8,
    /// The level of the reads ([`Level`]'s text form).
    pub read_level: String,
    /// Length of the measurement window.
    pub seconds: f64,
    /// Successful operations completed in the window.
    pub ops: u64,
    /// `ops / seconds`, to 0.1.
    pub ops_per_sec: f64,
    /// Failed operations completed in the window.
    pub errors: u64,
    /// Latencies of the successful operations.
    pub latency_ms: Latency,
    /// The first error seen in the window (not part of the JSON).
    #[serde(skip)]
    pub first_error: Option<String>,
}

impl RunResult {
    /// Summarizes a run: `hist` holds the microsecond latencies of the `ops` successful
    /// operations completed in a window of `seconds`.
    #[allow(clippy::too_many_arguments)]
    pub fn summarize(
        system: System,
        level: Level,
        names: &Names,
        workload: &Workload,
        seconds: f64,
        hist: &Histogram<u64>,
        ops: u64,
        errors: u64,
    ) -> RunResult {
        RunResult {
            system,
            workload: names.workload.clone(),
            label: names.label.clone(),
            concurrency: workload.concurrency,
            keys: workload.keys,
            value_bytes: workload.value_bytes,
            read_percent: workload.read_percent,
            read_level: level.to_string(),
            seconds: round(seconds, 3),
            ops,
            ops_per_sec: if seconds > 0.0 {
                round(ops as f64 / seconds, 1)
            } else {
                0.0
            },
            errors,
            latency_ms: Latency::from_histogram(hist),
            first_error: None,
        }
    }

    /// One line: system, workload and level, ops/s, p50/p99/p99.9/max, errors.
    pub fn summary_line(&self) -> String {
        let mix = match self.read_percent {
            0 => "100% writes".to_string(),
            p => format!("{p}% reads, {}", self.read_level),
        };
        format!(
            "{} {} ({mix}): {} ops/s ({} ops in {:.1} s, {} in flight), \
             p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms, errors {}",
            self.system,
            self.workload,
            thousands(self.ops_per_sec.round() as u64),
            self.ops,
            self.seconds,
            self.concurrency,
            self.latency_ms.p50,
            self.latency_ms.p99,
            self.latency_ms.p999,
            self.latency_ms.max,
            self.errors,
        )
    }
}

/// `e` and its sources, `: `-separated (tonic's transport errors say little on their own).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// `x` rounded to `digits` decimals.
fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds")
}

/// Counters the progress display reads while tasks run (every phase).
#[derive(Debug, Default)]
struct Live {
    ok: AtomicU64,
    errors: AtomicU64,
}

/// What one task measured in the window.
struct Tally {
    hist: Histogram<u64>,
    ops: u64,
    errors: u64,
    first_error: Option<String>,
}

/// Runs `workload` against `target`: the load phase, the warmup, the measurement window.
/// Returns the summary; fails only if the workload is invalid, the load phase cannot write a
/// key, or a task panics (failed operations are counted, not fatal).
pub async fn run<T: Target>(
    target: Arc<T>,
    workload: &Workload,
    names: &Names,
    progress: Progress,
) -> Result<RunResult, LoadError> {
    workload.validate()?;
    let what = format!("{} {}", target.system(), names.workload);
    let display = Display::new(&what, workload, progress);
    display.phase(&format!("loading {} keys", workload.keys));
    preload(&target, workload).await?;

    let keys: Arc<Vec<Vec<u8>>> = Arc::new((0..workload.keys).map(key).collect());
    let live = Arc::new(Live::default());
    let start = Instant::now();
    let window_start = start + workload.warmup;
    let window_end = window_start + workload.duration;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(7, |d| d.as_nanos() as u64);
    let tasks: Vec<_> = (0..workload.concurrency as u64)
        .map(|i| {
            let target = Arc::clone(&target);
            let keys = Arc::clone(&keys);
            let live = Arc::clone(&live);
            let read_percent = u64::from(workload.read_percent);
            let value_bytes = workload.value_bytes;
            let mut rng = Rng::new(seed ^ i.wrapping_mul(0x9e37_79b9));
            tokio::spawn(async move {
                let mut tally = Tally {
                    hist: new_histogram(),
                    ops: 0,
                    errors: 0,
                    first_error: None,
                };
                loop {
                    let t0 = Instant::now();
                    if t0 >= window_end {
                        break;
                    }
                    let key = &keys[rng.below(keys.len() as u64) as usize];
                    let outcome = if rng.below(100) < read_percent {
                        target.get(key).await
                    } else {
                        target.put(key, rng.bytes(value_bytes)).await
                    };
                    let t1 = Instant::now();
                    let counted = t1 >= window_start && t1 <= window_end;
                    match outcome {
                        Ok(()) => {
                            live.ok.fetch_add(1, Ordering::Relaxed);
                            if counted {
                                let us = (t1 - t0).as_micros().min(u128::from(HIST_MAX_US));
                                tally.hist.saturating_record(us as u64);
                                tally.ops += 1;
                            }
                        }
                        Err(e) => {
                            live.errors.fetch_add(1, Ordering::Relaxed);
                            if counted {
                                tally.errors += 1;
                                tally.first_error.get_or_insert_with(|| e.to_string());
                            }
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
                tally
            })
        })
        .collect();

    let ticker = tokio::spawn(display.follow(Arc::clone(&live), start, window_start, window_end));
    let mut hist = new_histogram();
    let mut ops = 0;
    let mut errors = 0;
    let mut first_error = None;
    let mut failure = None;
    for task in tasks {
        match task.await {
            Ok(t) => {
                hist.add(&t.hist).expect("histograms of equal bounds merge");
                ops += t.ops;
                errors += t.errors;
                if first_error.is_none() {
                    first_error = t.first_error;
                }
            }
            Err(e) => failure = Some(e.to_string()),
        }
    }
    ticker.abort();
    let _ = ticker.await;
    if let Some(e) = failure {
        return Err(LoadError::Task(e));
    }
    let mut result = RunResult::summarize(
        target.system(),
        target.read_level(),
        names,
        workload,
        workload.duration.as_secs_f64(),
        &hist,
        ops,
        errors,
    );
    result.first_error = first_error;
    Ok(result)
}

/// The load phase: writes every key once, `concurrency` at a time, each retried for up to
/// [`PRELOAD_RETRY_FOR`].
async fn preload<T: Target>(target: &Arc<T>, workload: &Workload) -> Result<(), LoadError> {
    let value_bytes = workload.value_bytes;
    let mut writes = futures::stream::iter(0..workload.keys)
        .map(|i| async move {
            let k = key(i);
            let mut rng = Rng::new(i);
            let deadline = Instant::now() + PRELOAD_RETRY_FOR;
            loop {
                match target.put(&k, rng.bytes(value_bytes)).await {
                    Ok(()) => return Ok(()),
                    Err(e) if Instant::now() >= deadline => {
                        return Err(LoadError::Preload {
                            key: String::from_utf8_lossy(&k).into_owned(),
                            source: e,
                        });
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        })
        .buffer_unordered(workload.concurrency);
    while let Some(written) = writes.next().await {
        written?;
    }
    Ok(())
}

/// The progress display: an indicatif bar, plain lines when the bar is hidden, or nothing.
struct Display {
    what: String,
    bar: Option<ProgressBar>,
    lines: bool,
}

impl Display {
    fn new(what: &str, workload: &Workload, progress: Progress) -> Display {
        if progress == Progress::Off {
            return Display {
                what: what.to_string(),
                bar: None,
                lines: false,
            };
        }
        let total_ms = (workload.warmup + workload.duration).as_millis() as u64;
        let bar = ProgressBar::new(total_ms.max(1));
        if bar.is_hidden() {
            return Display {
                what: what.to_string(),
                bar: None,
                lines: true,
            };
        }
        let style = ProgressStyle::with_template("{prefix} [{bar:30}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(what.to_string());
        Display {
            what: what.to_string(),
            bar: Some(bar),
            lines: false,
        }
    }

    fn phase(&self, message: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(message.to_string());
        } else if self.lines {
            eprintln!("{}: {message}", self.what);
        }
    }

    /// Updates the display until aborted: 10 times a second for the bar, once a second for
    /// plain lines.
    async fn follow(self, live: Arc<Live>, start: Instant, window_start: Instant, end: Instant) {
        if self.bar.is_none() && !self.lines {
            return;
        }
        let every = if self.bar.is_some() {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(1)
        };
        let mut ticks = tokio::time::interval_at(start + every, every);
        // The rate shown is over the last second, whatever the tick.
        let mut history = std::collections::VecDeque::from([(start, 0u64)]);
        loop {
            let now = ticks.tick().await;
            let ok = live.ok.load(Ordering::Relaxed);
            let errors = live.errors.load(Ordering::Relaxed);
            history.push_back((now, ok));
            while history.len() > 2 && now - history[1].0 >= Duration::from_secs(1) {
                history.pop_front();
            }
            let (t_then, ok_then) = history[0];
            let dt = (now - t_then).as_secs_f64();
            let rate = if dt > 0.0 {
                (ok - ok_then) as f64 / dt
            } else {
                0.0
            };
            let phase = if now < window_start {
                "warmup".to_string()
            } else {
                let total = (end - window_start).as_secs_f64();
                let done = (now.min(end) - window_start).as_secs_f64();
                format!("measuring {done:.0}/{total:.0} s")
            };
            let message = format!("{phase}, {} ops/s, {errors} errors", thousands(rate as u64));
            match &self.bar {
                Some(bar) => {
                    bar.set_position((now.min(end) - start).as_millis() as u64);
                    bar.set_message(message);
                }
                None => eprintln!("{}: {message}", self.what),
            }
            if now >= end {
                break;
            }
        }
    }
}

impl Drop for Display {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Names {
        Names {
            workload: "put".to_string(),
            label: "100% writes".to_string(),
        }
    }

    #[test]
    fn latency_percentiles_come_from_the_histogram() {
        let mut h = new_histogram();
        // 1..=1000 ms, once each.
        for ms in 1..=1000u64 {
            h.record(ms * 1000).unwrap();
        }
        let l = Latency::from_histogram(&h);
        let near = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.001;
        assert!(near(l.p50, 500.0), "{l:?}");
        assert!(near(l.p99, 990.0), "{l:?}");
        assert!(near(l.p999, 999.0), "{l:?}");
        assert!(near(l.max, 1000.0), "{l:?}");
        assert_eq!(
            Latency::from_histogram(&new_histogram()),
            Latency::default()
        );
    }

    #[test]
    fn slow_operations_are_clamped_not_lost() {
        let mut h = new_histogram();
        h.saturating_record(HIST_MAX_US * 10);
        h.record(0).unwrap();
        assert_eq!(h.len(), 2);
        assert!(Latency::from_histogram(&h).max >= 59_000.0);
    }

    #[test]
    fn the_summary_computes_the_rate_and_rounds() {
        let mut h = new_histogram();
        for us in [1_000u64, 2_000, 3_000] {
            h.record(us).unwrap();
        }
        let w = Workload::default();
        let r = RunResult::summarize(
            System::Kvnode,
            Level::Linearizable,
            &names(),
            &w,
            3.0,
            &h,
            1000,
            2,
        );
        assert_eq!(r.ops_per_sec, 333.3);
        assert_eq!(r.seconds, 3.0);
        assert_eq!(r.errors, 2);
        assert_eq!(r.latency_ms.p50, 2.0);
        // The histogram's bucket of 3 ms at 3 significant digits is 2 µs wide.
        assert!(
            (r.latency_ms.max - 3.0).abs() <= 0.002,
            "{:?}",
            r.latency_ms
        );
        let line = r.summary_line();
        assert!(
            line.starts_with("kvnode put (100% writes): 333 ops/s"),
            "{line}"
        );
        assert!(line.ends_with("errors 2"), "{line}");
    }

    #[test]
    fn the_json_has_exactly_the_documented_shape() {
        let mut h = new_histogram();
        h.record(1_000).unwrap();
        let mut r = RunResult::summarize(
            System::Etcd,
            Level::Serializable,
            &names(),
            &Workload {
                read_percent: 100,
                ..Workload::default()
            },
            10.0,
            &h,
            123,
            0,
        );
        r.first_error = Some("not in the JSON".into());
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            json,
            "{\"system\":\"etcd\",\"workload\":\"put\",\"label\":\"100% writes\",\
             \"concurrency\":64,\"keys\":1000,\"value_bytes\":256,\"read_percent\":100,\
             \"read_level\":\"serializable\",\"seconds\":10.0,\"ops\":123,\"ops_per_sec\":12.3,\
             \"errors\":0,\"latency_ms\":{\"p50\":1.0,\"p99\":1.0,\"p999\":1.0,\"max\":1.0}}"
        );
        let back: RunResult = serde_json::from_str(&json).unwrap();
        assert_eq!(back.first_error, None);
        assert_eq!(back.ops, 123);
        assert_eq!(back.system, System::Etcd);
    }

    #[test]
    fn levels_parse_print_and_belong_to_their_systems() {
        for (text, level) in [
            ("linearizable", Level::Linearizable),
            ("lease", Level::Lease),
            ("session", Level::Session),
            ("bounded:500ms", Level::Bounded(Duration::from_millis(500))),
            ("eventual", Level::Eventual),
            ("serializable", Level::Serializable),
        ] {
            assert_eq!(text.parse::<Level>().unwrap(), level);
            assert_eq!(level.to_string(), text);
        }
        assert_eq!(
            "bounded:2s".parse::<Level>().unwrap(),
            Level::Bounded(Duration::from_secs(2))
        );
        assert_eq!(
            "bounded:250".parse::<Level>().unwrap().to_string(),
            "bounded:250ms"
        );
        assert!(matches!(
            "bounded:0ms".parse::<Level>(),
            Err(LevelError::BadBound { .. })
        ));
        assert!(matches!(
            "bounded:soon".parse::<Level>(),
            Err(LevelError::BadBound { .. })
        ));
        assert!(matches!(
            "strong".parse::<Level>(),
            Err(LevelError::Unknown(_))
        ));
        assert!(matches!(
            "bounded".parse::<Level>(),
            Err(LevelError::Unknown(_))
        ));

        assert!(Level::Eventual.check_for(System::Kvnode).is_ok());
        assert!(Level::Lease.check_for(System::Kvnode).is_ok());
        assert!(Level::Linearizable.check_for(System::Etcd).is_ok());
        assert!(Level::Serializable.check_for(System::Etcd).is_ok());
        let e = Level::Serializable.check_for(System::Kvnode).unwrap_err();
        assert_eq!(
            e.to_string(),
            "kvnode has no serializable reads (it offers: linearizable, lease, session, \
             bounded:DURATION, eventual)"
        );
        let e = Level::Eventual.check_for(System::Etcd).unwrap_err();
        assert_eq!(
            e.to_string(),
            "etcd has no eventual reads (it offers: linearizable, serializable)"
        );
        assert_eq!("etcd".parse::<System>().unwrap(), System::Etcd);
        assert!("redis".parse::<System>().is_err());
    }

    #[test]
    fn workloads_are_validated() {
        assert!(Workload::default().validate().is_ok());
        for bad in [
            Workload {
                concurrency: 0,
                ..Workload::default()
            },
            Workload {
                keys: 0,
                ..Workload::default()
            },
            Workload {
                read_percent: 101,
                ..Workload::default()
            },
            Workload {
                duration: Duration::ZERO,
                ..Workload::default()
            },
        ] {
            assert!(matches!(bad.validate(), Err(LoadError::Workload(_))));
        }
    }

    #[test]
    fn keys_and_random_choices_are_well_formed() {
        assert_eq!(key(42), b"bench-000042");
        let mut rng = Rng::new(1);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            seen[rng.below(10) as usize] += 1;
        }
        assert!(seen.iter().all(|n| (800..1200).contains(n)), "{seen:?}");
        assert_eq!(rng.bytes(256).len(), 256);
        assert_eq!(rng.bytes(3).len(), 3);
        assert_ne!(rng.bytes(16), rng.bytes(16));
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
    }
}
