//! Crash safety through the public API.
//!
//! `api_crash_loop_loses_no_acknowledged_write` starts this test binary again as a child
//! process (running only the ignored `api_child_writer` test). The child opens a [`Node`] with
//! 8 shards and frequent snapshots, and runs 8 concurrent workers; worker `w` owns the keys
//! `w{w}-k{j}` (`j < 6`, spread over every shard) and loops: read a key (linearizable), then
//! `put` a new value, `compare_and_set` it from the value just read, or now and then `delete`
//! it. Every value names its key and a per-key counter that only grows (`w3-k5-c17`). The child
//! reports each operation before sending it (`TRY`, `TRYDEL`) and once it was acknowledged
//! (`ACK`, `ACKDEL`). The parent kills it with SIGKILL at a random moment, reopens the node
//! in-process and reads every key, checking:
//!
//! - **every acknowledged write is readable**: the key holds the result of an operation at
//!   least as new as the newest acknowledged one (and at least as new as what the previous
//!   check read);
//! - **no value that was never written**: every value read names this very key and a counter
//!   the child tried to write;
//! - an eventual read equals the linearizable one (a single node).
//!
//! Everything random comes from one master seed, printed at the start; replay a failure with
//! `KVNODE_CRASH_SEED=<seed> cargo test --test crash crash_loop_api:: -- --nocapture`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvnode::{Config, Node, ReadOptions, VersionedValue};
use kvnode_testkit::Rng;
use kvnode_testkit::crash_loop::{self, ChildReports};

/// Shards of the node.
const SHARDS: u32 = 8;
/// A shard snapshots (and purges its log behind the snapshot) after this many entries.
const SNAPSHOT_EVERY: u64 = 50;
/// Kill-and-reopen rounds.
const ROUNDS: u32 = 30;
/// Concurrent workers in the child.
const WORKERS: u64 = 8;
/// Keys each worker owns.
const KEYS_PER_WORKER: u64 = 6;
/// A worker deletes a key it found present with probability `1 / DELETE_ONE_IN`.
const DELETE_ONE_IN: u64 = 12;
/// Milliseconds the child runs after its first acknowledgement of a round.
const KILL_AFTER_MS: (u64, u64) = (50, 400);
/// How long the parent's reopen (and close) of the node may take before it counts as a hang.
const REOPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// The master seed used when `KVNODE_CRASH_SEED` is not set.
const DEFAULT_SEED: u64 = 0x6b76_6e6f_6465_a91c;
/// Child environment (besides the driver's): the lowest counter it may use (above every
/// counter any earlier child tried, so counters never repeat for a key).
const CHILD_FLOOR_ENV: &str = "KVNODE_API_CRASH_CHILD_FLOOR";
/// Prefix of the child's report lines (libtest may print its own text on the same line).
const MARK: &str = "APICRASH";

// ---------------------------------------------------------------------------------------------
// Shared by parent and child
// ---------------------------------------------------------------------------------------------

/// The node's configuration: small snapshot interval, so snapshots and WAL purges are frequent.
fn config(data: &Path) -> Config {
    Config {
        shards: SHARDS,
        snapshot_every_entries: SNAPSHOT_EVERY,
        ..Config::single_node(data)
    }
}

fn key_name(worker: u64, key: u64) -> String {
    format!("w{worker}-k{key}")
}

/// Every key any worker owns.
fn all_keys() -> Vec<String> {
    (0..WORKERS)
        .flat_map(|w| (0..KEYS_PER_WORKER).map(move |j| key_name(w, j)))
        .collect()
}

/// The only value the child ever writes to `key` with `counter`.
fn value_of(key: &str, counter: u64) -> Vec<u8> {
    format!("{key}-c{counter}").into_bytes()
}

/// The counter of `value` if it is exactly a value the child writes to `key`.
fn counter_of(key: &str, value: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(value).ok()?;
    let counter: u64 = text.strip_prefix(key)?.strip_prefix("-c")?.parse().ok()?;
    (value_of(key, counter) == value).then_some(counter)
}

fn show(value: Option<&[u8]>) -> String {
    match value {
        Some(v) => format!("{:?}", String::from_utf8_lossy(v)),
        None => "absent".to_string(),
    }
}

fn show_versioned(value: Option<&VersionedValue>) -> String {
    match value {
        Some(v) => format!(
            "{:?} (version {})",
            String::from_utf8_lossy(&v.value),
            v.version
        ),
        None => "absent".to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Child
// ---------------------------------------------------------------------------------------------

/// Writes one report line (see `kvnode_testkit::crash_loop::report`).
fn report(line: std::fmt::Arguments<'_>) {
    crash_loop::report(MARK, line);
}

#[test]
#[ignore = "child process of api_crash_loop_loses_no_acknowledged_write; started by it"]
fn api_child_writer() {
    let Some(crash_loop::Child { dir, seed, runtime }) = crash_loop::Child::from_env() else {
        return;
    };
    let floor = crash_loop::child_number(CHILD_FLOOR_ENV);
    runtime.block_on(async move {
        let node = Node::open(config(&dir)).await.expect("child: open node");
        let node = Arc::new(node);
        report(format_args!("OPENED"));
        let mut rng = Rng::new(seed);
        let mut workers = tokio::task::JoinSet::new();
        for w in 0..WORKERS {
            workers.spawn(worker(node.clone(), w, floor, rng.next_u64()));
        }
        // The workers run until the process is killed: any of them ending is a failure, and
        // must end the process so the parent sees it.
        let ended = workers.join_next().await.expect("child: no workers");
        panic!("child: a worker stopped: {ended:?}");
    });
}

/// One key as a worker sees it.
struct OwnedKey {
    name: String,
    /// The counter of the next operation on the key.
    next: u64,
    /// What the key holds, if known: unknown at start and after an operation that failed
    /// (its outcome is indeterminate).
    known: Option<Option<Vec<u8>>>,
}

/// Reads, writes, compares-and-sets and deletes its own keys until killed.
async fn worker(node: Arc<Node>, w: u64, floor: u64, seed: u64) {
    let mut rng = Rng::new(seed);
    let linearizable = ReadOptions::linearizable();
    let mut keys = Vec::new();
    for j in 0..KEYS_PER_WORKER {
        let name = key_name(w, j);
        // Learn where the key's counter stands. A deleted key (or a write lost in the crash,
        // which was never acknowledged) leaves no trace of its counter in the store, so the
        // parent's floor (above every counter ever tried) keeps counters from repeating.
        let mut key = OwnedKey {
            name,
            next: floor,
            known: None,
        };
        match node.get(key.name.as_bytes(), &linearizable).await {
            Ok(reply) => {
                let value = reply.value.map(|v| v.value);
                match &value {
                    Some(v) => match counter_of(&key.name, v) {
                        Some(n) => {
                            report(format_args!("START {} {n}", key.name));
                            key.next = key.next.max(n + 1);
                        }
                        None => report(format_args!(
                            "FAIL {} {} startup read found a value never written: {}",
                            key.name,
                            key.next,
                            show(Some(v))
                        )),
                    },
                    None => report(format_args!("START {} -", key.name)),
                }
                key.known = Some(value);
            }
            Err(e) => report(format_args!(
                "ERR {} {} startup read: {e}",
                key.name, key.next
            )),
        }
        keys.push(key);
    }

    loop {
        let key = &mut keys[rng.range(0, KEYS_PER_WORKER - 1) as usize];
        let name = key.name.as_bytes();
        let current = match node.get(name, &linearizable).await {
            Ok(reply) => reply.value.map(|v| v.value),
            Err(e) => {
                report(format_args!("ERR {} {} read: {e}", key.name, key.next));
                continue;
            }
        };
        if let Some(known) = &key.known
            && *known != current
        {
            report(format_args!(
                "FAIL {} {} read {} but this worker (the key's only writer) last left it at {}",
                key.name,
                key.next,
                show(current.as_deref()),
                show(known.as_deref())
            ));
        }
        let in_doubt = key.known.is_none();
        key.known = Some(current.clone());
        let counter = key.next;
        key.next += 1;
        let new = value_of(&key.name, counter);
        let choice = rng.range(1, 2 * DELETE_ONE_IN);
        if current.is_some() && choice <= 2 {
            report(format_args!("TRYDEL {} {counter}", key.name));
            match node.delete(name).await {
                Ok(reply) => {
                    report(format_args!("ACKDEL {} {counter}", key.name));
                    if !reply.existed {
                        report(format_args!(
                            "FAIL {} {counter} delete found the key absent, but it was just read \
                             as {}",
                            key.name,
                            show(current.as_deref())
                        ));
                    }
                    key.known = Some(None);
                }
                Err(e) => {
                    report(format_args!("ERR {} {counter} delete: {e}", key.name));
                    key.known = None;
                }
            }
        } else if choice.is_multiple_of(2) {
            report(format_args!("TRY {} {counter}", key.name));
            match node.put(name, new.clone()).await {
                Ok(_) => {
                    report(format_args!("ACK {} {counter}", key.name));
                    key.known = Some(Some(new));
                }
                Err(e) => {
                    report(format_args!("ERR {} {counter} put: {e}", key.name));
                    key.known = None;
                }
            }
        } else {
            report(format_args!("TRY {} {counter}", key.name));
            match node
                .compare_and_set(name, current.as_deref(), Some(new.clone()))
                .await
            {
                Ok(reply) if reply.applied => {
                    report(format_args!("ACK {} {counter}", key.name));
                    key.known = Some(Some(new));
                }
                Ok(reply) => {
                    // Nobody else writes the key: the expected value can only have changed if
                    // an earlier operation that failed (indeterminate) took effect after all.
                    let kind = if in_doubt { "ERR" } else { "FAIL" };
                    report(format_args!(
                        "{kind} {} {counter} compare_and_set not applied: expected {}, the key \
                         holds {}",
                        key.name,
                        show(current.as_deref()),
                        show_versioned(reply.current.as_ref())
                    ));
                    key.known = Some(reply.current.map(|v| v.value));
                }
                Err(e) => {
                    report(format_args!(
                        "ERR {} {counter} compare_and_set: {e}",
                        key.name
                    ));
                    key.known = None;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parent: what one child reported
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Write,
    Delete,
}

/// One key's reports in one round.
#[derive(Debug, Default, Clone)]
struct KeyRound {
    /// What the child found on start: `Some(counter)`, or `None` for absent.
    start: Option<Option<u64>>,
    /// Operations announced before they were sent, in order.
    tried: Vec<(u64, Op)>,
    /// Operations acknowledged, in order.
    acked: Vec<(u64, Op)>,
}

/// Everything one child reported.
#[derive(Debug, Default)]
struct RoundLog {
    opened: bool,
    keys: BTreeMap<String, KeyRound>,
    acked_writes: u64,
    acked_deletes: u64,
    tried: u64,
    errors: u64,
    /// The first few error lines, for the summary.
    error_samples: Vec<String>,
    /// Inconsistencies in the reports themselves, or failures the child detected.
    problems: Vec<String>,
}

impl RoundLog {
    fn new() -> RoundLog {
        RoundLog {
            keys: all_keys()
                .into_iter()
                .map(|k| (k, KeyRound::default()))
                .collect(),
            ..RoundLog::default()
        }
    }
}

impl ChildReports for RoundLog {
    fn acknowledged(&self) -> bool {
        self.acked_writes > 0
    }

    fn problems(&self) -> &[String] {
        &self.problems
    }

    fn record(&mut self, line: &str) {
        let report = line;
        if report == "OPENED" {
            self.opened = true;
            return;
        }
        let mut words = report.splitn(4, ' ');
        let (Some(kind), Some(key), Some(counter)) = (words.next(), words.next(), words.next())
        else {
            self.problems
                .push(format!("unparseable report line {line:?}"));
            return;
        };
        let rest = words.next().unwrap_or("");
        let Some(k) = self.keys.get_mut(key) else {
            self.problems
                .push(format!("report line for an unknown key: {line:?}"));
            return;
        };
        if kind == "START" {
            match (counter, counter.parse::<u64>()) {
                ("-", _) => k.start = Some(None),
                (_, Ok(n)) => k.start = Some(Some(n)),
                _ => self
                    .problems
                    .push(format!("unparseable report line {line:?}")),
            }
            return;
        }
        let Ok(counter) = counter.parse::<u64>() else {
            self.problems
                .push(format!("unparseable report line {line:?}"));
            return;
        };
        match kind {
            "TRY" | "TRYDEL" => {
                let op = if kind == "TRY" { Op::Write } else { Op::Delete };
                if let Some(&(last, _)) = k.tried.last()
                    && counter <= last
                {
                    self.problems.push(format!(
                        "key {key}: the child tried counter {counter} after {last}"
                    ));
                }
                k.tried.push((counter, op));
                self.tried += 1;
            }
            "ACK" | "ACKDEL" => {
                let op = if kind == "ACK" { Op::Write } else { Op::Delete };
                if k.tried.last() != Some(&(counter, op)) {
                    self.problems.push(format!(
                        "key {key}: the child acknowledged {kind} {counter}, but its last \
                         announced operation was {:?}",
                        k.tried.last()
                    ));
                }
                k.acked.push((counter, op));
                match op {
                    Op::Write => self.acked_writes += 1,
                    Op::Delete => self.acked_deletes += 1,
                }
            }
            "ERR" => {
                self.errors += 1;
                if self.error_samples.len() < 5 {
                    self.error_samples.push(format!("{key} {counter}: {rest}"));
                }
            }
            "FAIL" => self.problems.push(format!(
                "the child saw key {key} (counter {counter}): {rest}"
            )),
            _ => self.problems.push(format!("unknown report line {line:?}")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parent: what survived
// ---------------------------------------------------------------------------------------------

/// What the last check read for a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Not checked yet: the key was never written before the first child.
    Never,
    /// The value with this counter.
    Value(u64),
    /// Absent; every later child tried only counters from `floor` on.
    Absent { floor: u64 },
}

/// What all children so far reported for one key, and what the last check read.
#[derive(Debug, Clone)]
struct KeyModel {
    /// Every operation ever announced, by counter.
    tried: BTreeMap<u64, Op>,
    /// The newest acknowledged operation.
    acked: Option<(u64, Op)>,
    /// Operations acknowledged (all rounds).
    acked_count: u64,
    seen: Seen,
}

impl KeyModel {
    fn new() -> KeyModel {
        KeyModel {
            tried: BTreeMap::new(),
            acked: None,
            acked_count: 0,
            seen: Seen::Never,
        }
    }

    /// Whether the state the last check read is what the child found on start.
    fn matches_start(&self, start: Option<u64>) -> bool {
        match self.seen {
            Seen::Value(n) => start == Some(n),
            Seen::Never | Seen::Absent { .. } => start.is_none(),
        }
    }

    /// Judges what a reopened node holds for `key`; on success returns what it proves.
    fn judge(&self, key: &str, found: Option<&VersionedValue>, floor: u64) -> Result<Seen, String> {
        let acked = self.acked.map(|(c, _)| c);
        let describe_acked = || match self.acked {
            Some((c, Op::Write)) => format!("the newest acknowledged operation is write {c}"),
            Some((c, Op::Delete)) => format!("the newest acknowledged operation is delete {c}"),
            None => "nothing was acknowledged".to_string(),
        };
        let Some(found) = found else {
            // Absent: the last operation that took effect was a delete, as new as the newest
            // acknowledged operation and as what the last check read; or nothing at all
            // happened since the last check found the key absent (or never written).
            let at_least = match self.seen {
                Seen::Value(n) => Some(acked.map_or(n, |a| a.max(n))),
                Seen::Absent { floor } => acked.filter(|a| *a >= floor),
                Seen::Never => acked,
            };
            let Some(at_least) = at_least else {
                return Ok(Seen::Absent { floor });
            };
            if self
                .tried
                .range(at_least..)
                .any(|(_, op)| *op == Op::Delete)
            {
                return Ok(Seen::Absent { floor });
            }
            return Err(format!(
                "LOST: key {key} is absent, but {}; the last check read {:?}; no delete with \
                 counter >= {at_least} was ever tried",
                describe_acked(),
                self.seen
            ));
        };
        let Some(n) = counter_of(key, &found.value) else {
            return Err(format!(
                "INVENTED: key {key} holds {}, which is not a value the child writes to this key",
                show_versioned(Some(found))
            ));
        };
        if self.tried.get(&n) != Some(&Op::Write) {
            return Err(format!(
                "INVENTED: key {key} holds {}, but the child never tried to write counter {n} \
                 (tried as {:?})",
                show_versioned(Some(found)),
                self.tried.get(&n)
            ));
        }
        if let Some(a) = acked
            && n < a
        {
            return Err(format!(
                "LOST: key {key} holds {} (counter {n}), but {}",
                show_versioned(Some(found)),
                describe_acked()
            ));
        }
        let regressed = match self.seen {
            Seen::Value(m) => n < m,
            Seen::Absent { floor } => n < floor,
            Seen::Never => false,
        };
        if regressed {
            return Err(format!(
                "REGRESSED: key {key} holds {} (counter {n}), older than what the previous check \
                 read: {:?}",
                show_versioned(Some(found)),
                self.seen
            ));
        }
        Ok(Seen::Value(n))
    }
}

/// Totals of one check.
#[derive(Debug, Default)]
struct Checked {
    present: u64,
    absent: u64,
    open_time: Duration,
}

/// Reopens the node, reads every key at both levels and judges it; closes the node again.
/// `floor` is the lowest counter the next child will use.
async fn check_node(
    data: &Path,
    models: &mut BTreeMap<String, KeyModel>,
    shard_of: &mut BTreeMap<String, u64>,
    floor: u64,
) -> Result<Checked, Vec<String>> {
    let opening = Instant::now();
    let node = match tokio::time::timeout(REOPEN_TIMEOUT, Node::open(config(data))).await {
        Err(_) => {
            return Err(vec![format!(
                "HANG: reopening the node did not finish within {REOPEN_TIMEOUT:?}"
            )]);
        }
        Ok(Err(e)) => return Err(vec![format!("reopening the node failed: {e} ({e:?})")]),
        Ok(Ok(node)) => node,
    };
    let mut checked = Checked {
        open_time: opening.elapsed(),
        ..Checked::default()
    };
    let mut failures = Vec::new();
    let mut proven = Vec::new();
    for (key, model) in models.iter() {
        shard_of.insert(key.clone(), node.shard_for(key.as_bytes()));
        let linearizable = match node.get(key.as_bytes(), &ReadOptions::linearizable()).await {
            Ok(reply) => reply.value,
            Err(e) => {
                failures.push(format!("key {key}: linearizable read failed: {e}"));
                continue;
            }
        };
        match node.get(key.as_bytes(), &ReadOptions::eventual()).await {
            Ok(reply) if reply.value == linearizable => {}
            Ok(reply) => failures.push(format!(
                "key {key}: the eventual read returned {}, the linearizable one {}",
                show_versioned(reply.value.as_ref()),
                show_versioned(linearizable.as_ref())
            )),
            Err(e) => failures.push(format!("key {key}: eventual read failed: {e}")),
        }
        match model.judge(key, linearizable.as_ref(), floor) {
            Ok(seen) => {
                match seen {
                    Seen::Value(_) => checked.present += 1,
                    _ => checked.absent += 1,
                }
                proven.push((key.clone(), seen));
            }
            Err(e) => failures.push(e),
        }
    }
    if tokio::time::timeout(REOPEN_TIMEOUT, node.close())
        .await
        .is_err()
    {
        failures.push(format!(
            "HANG: closing the node did not finish within {REOPEN_TIMEOUT:?}"
        ));
    }
    if !failures.is_empty() {
        return Err(failures);
    }
    for (key, seen) in proven {
        models.get_mut(&key).expect("known key").seen = seen;
    }
    Ok(checked)
}

// ---------------------------------------------------------------------------------------------
// Parent: the loop
// ---------------------------------------------------------------------------------------------

/// How many shard directories under `data/snapshots` hold a snapshot file (evidence for the
/// summary that snapshots happened; the layout is not part of the API, so nothing asserts it).
fn snapshot_files(data: &Path) -> usize {
    let Ok(shards) = std::fs::read_dir(data.join("snapshots")) else {
        return 0;
    };
    let has_snapshot = |dir: PathBuf| {
        std::fs::read_dir(dir).is_ok_and(|mut files| {
            files.any(|f| f.is_ok_and(|f| f.path().extension().is_some_and(|e| e == "snap")))
        })
    };
    shards
        .flatten()
        .filter(|shard| has_snapshot(shard.path()))
        .count()
}

/// The lowest counter the next child may use: above every counter any child tried, so no
/// counter is ever used twice for a key.
fn counter_floor(models: &BTreeMap<String, KeyModel>) -> u64 {
    1 + models
        .values()
        .filter_map(|m| m.tried.last_key_value().map(|(c, _)| *c))
        .max()
        .unwrap_or(0)
}

#[test]
fn api_crash_loop_loses_no_acknowledged_write() {
    let started = Instant::now();
    let mut parent = crash_loop::Parent::start("api crash loop", DEFAULT_SEED);
    let (seed, data) = (parent.seed, parent.data.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");

    let mut models: BTreeMap<String, KeyModel> = all_keys()
        .into_iter()
        .map(|k| (k, KeyModel::new()))
        .collect();
    let mut shard_of = BTreeMap::new();
    let mut acked_writes = 0;
    let mut acked_deletes = 0;
    let mut tried = 0;
    let mut errors = 0;
    let mut error_samples = Vec::new();
    let mut open_times = Vec::new();

    for round in 1..=ROUNDS {
        let fail = |what: String| -> ! {
            panic!(
                "api crash loop round {round}/{ROUNDS} (replay with {}={seed}): {what}",
                crash_loop::SEED_ENV
            )
        };
        let floor = counter_floor(&models);

        // The parent's node of the previous round is closed: the child has the directory.
        let round_run = parent.round(
            "crash_loop_api::api_child_writer",
            MARK,
            &[(CHILD_FLOOR_ENV, floor.to_string().into())],
            RoundLog::new(),
            KILL_AFTER_MS,
        );
        let (reports, kill_after) = (&round_run.reports, round_run.kill_after);
        if let Some(why) = round_run.failure() {
            fail(format!(
                "(the child opened its node: {}) {why}",
                reports.opened
            ));
        }

        // What the child found on start is what the previous check read (the parent closed
        // its node cleanly in between).
        for (key, r) in &reports.keys {
            let model = models.get_mut(key).expect("known key");
            if let Some(start) = r.start
                && !model.matches_start(start)
            {
                fail(format!(
                    "key {key}: the child's startup read found {start:?}, but the parent's last \
                     check (before a clean close) read {:?}",
                    model.seen
                ));
            }
            for &(counter, op) in &r.tried {
                if let Some(earlier) = model.tried.insert(counter, op) {
                    fail(format!(
                        "key {key}: the child tried counter {counter} ({op:?}), which an earlier \
                         child already tried ({earlier:?}) although it was told to start at \
                         {floor}"
                    ));
                }
            }
            if let Some(&last) = r.acked.last() {
                model.acked = Some(last);
            }
            model.acked_count += r.acked.len() as u64;
        }
        acked_writes += reports.acked_writes;
        acked_deletes += reports.acked_deletes;
        tried += reports.tried;
        errors += reports.errors;
        error_samples.extend(
            reports
                .error_samples
                .iter()
                .take(5usize.saturating_sub(error_samples.len()))
                .cloned(),
        );

        let next_floor = counter_floor(&models);
        let checked =
            match runtime.block_on(check_node(&data, &mut models, &mut shard_of, next_floor)) {
                Ok(checked) => checked,
                Err(failures) => fail(format!(
                    "after SIGKILL following {} acknowledged writes and {} deletes this round:\n{}",
                    reports.acked_writes,
                    reports.acked_deletes,
                    failures.join("\n")
                )),
            };
        open_times.push(checked.open_time);
        println!(
            "round {round:2}: killed after {kill_after:?}; {} writes and {} deletes acknowledged \
             of {} tried, {} errors; reopened in {:?}: {} keys present, {} absent",
            reports.acked_writes,
            reports.acked_deletes,
            reports.tried,
            reports.errors,
            checked.open_time,
            checked.present,
            checked.absent
        );
    }

    drop(runtime);
    let elapsed = started.elapsed();
    let mut per_shard = vec![0u64; SHARDS as usize];
    for (key, model) in &models {
        per_shard[shard_of[key] as usize] += model.acked_count;
    }
    let shards_used: BTreeSet<u64> = shard_of.values().copied().collect();
    assert_eq!(
        shards_used.len(),
        SHARDS as usize,
        "the keys {:?} do not cover every shard",
        shard_of
    );
    assert!(
        per_shard.iter().all(|n| *n > 0),
        "some shard acknowledged nothing over the whole loop: {per_shard:?}"
    );
    let slowest_open = open_times.iter().max().copied().unwrap_or_default();
    let snapshots = snapshot_files(&data);
    // Reaching this line means no round found a lost or invented value: any would have failed
    // the test with its round and key.
    println!(
        "api crash loop: {ROUNDS} rounds, {acked_writes} acknowledged writes and {acked_deletes} \
         deletes (per shard {per_shard:?}), {tried} attempted, {errors} errors, 0 lost, 0 \
         invented, {snapshots} shards with a snapshot file at the end, slowest reopen \
         {slowest_open:?}, seed {seed}, {elapsed:.1?}"
    );
    if !error_samples.is_empty() {
        println!("api crash loop: first errors: {error_samples:?}");
    }
    assert!(acked_writes >= u64::from(ROUNDS));
}
