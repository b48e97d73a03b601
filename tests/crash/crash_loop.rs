//! Crash safety with real processes.
//!
//! `crash_loop_loses_no_acknowledged_entry` starts this test binary again as a child process
//! (running only the ignored `child_writer` test). The child appends to several shards' logs,
//! reports on stdout every batch the WAL acknowledged as durable, applies it to the shard's
//! state machine, now and then snapshots and purges, and saves votes. The parent kills it with
//! SIGKILL at a random moment, reopens the data directory in-process and checks:
//!
//! - every acknowledged entry is present (and a purged one is covered by the state machine);
//! - nothing was invented: the log holds exactly the entries the child wrote, contiguous, and
//!   ends no further than the child announced before appending;
//! - each state machine resumes at or below the log's end (and at or above its purge point),
//!   and catches up to a state equal to a model computed from the log (its puts, deletes and
//!   compare-and-sets decided again by a plain map).
//!
//! Everything random comes from one master seed, printed at the start; replay a failure with
//! `KVNODE_CRASH_SEED=<seed> cargo test --test crash crash_loop:: -- --nocapture`.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use kvnode::raft::openraft_types::{
    IOFlushed, RaftLogReader, RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine,
};
use kvnode::raft::{
    Command, Entry, LogId, LogStore, StateMachine, TypeConfig, log_id, normal_entry, vote,
};
use kvnode::storage::codec::decode_serde;
use kvnode::storage::{Store, StoreOptions};
use kvnode_testkit::Rng;
use kvnode_testkit::crash_loop::{self, ChildReports};
use openraft::type_config::TypeConfigExt as _;

/// Shards the child writes (ids `0..SHARDS`).
const SHARDS: u64 = 4;
/// Kill-and-reopen rounds.
const ROUNDS: u32 = 24;
/// Entry `i` writes key `k{i % KEYS}`.
const KEYS: u64 = 37;
/// The child snapshots a shard once it applied this many entries past its last snapshot.
const SNAPSHOT_EVERY: u64 = 150;
/// The child purges the log up to this many entries below the snapshot's last index.
const PURGE_LAG: u64 = 5;
/// Milliseconds the child runs after its first acknowledgement of a round.
const KILL_AFTER_MS: (u64, u64) = (40, 350);
/// The master seed used when `KVNODE_CRASH_SEED` is not set.
const DEFAULT_SEED: u64 = 0x6b76_6e6f_6465_c4a5;
/// Prefix of the child's report lines (libtest may print its own text on the same line).
const MARK: &str = "CRASHLOOP";

// ---------------------------------------------------------------------------------------------
// Shared by parent and child
// ---------------------------------------------------------------------------------------------

fn key_of(index: u64) -> Vec<u8> {
    format!("k{}", index % KEYS).into_bytes()
}

fn value_of(shard: u64, index: u64) -> Vec<u8> {
    format!("s{shard}-i{index}").into_bytes()
}

/// The only entry the child ever writes at `(shard, index)`: mostly puts, with deletes and
/// compare-and-sets (some conditional deletes) whose outcome depends on the key's history, so
/// that a replay after a crash that decided an entry against a later state would show.
fn expected_entry(shard: u64, index: u64) -> Entry {
    let key = key_of(index);
    let command = if index.is_multiple_of(7) {
        Command::Delete { key }
    } else if index.is_multiple_of(3) {
        // Matches if the key's previous entry (KEYS back) set it.
        Command::CompareAndSet {
            key,
            expected: index.checked_sub(KEYS).map(|i| value_of(shard, i)),
            new: (index % 2 == 1).then(|| value_of(shard, index)),
        }
    } else {
        Command::Put {
            key,
            value: value_of(shard, index),
        }
    };
    normal_entry(log_id(1, 1, index), command)
}

fn index_of(id: Option<&LogId>) -> u64 {
    id.map_or(0, |id| id.index())
}

// ---------------------------------------------------------------------------------------------
// Child
// ---------------------------------------------------------------------------------------------

/// Writes one report line (see `kvnode_testkit::crash_loop::report`).
fn report(line: std::fmt::Arguments<'_>) {
    crash_loop::report(MARK, line);
}

#[test]
#[ignore = "child process of crash_loop_loses_no_acknowledged_entry; started by it"]
fn child_writer() {
    let Some(crash_loop::Child { dir, seed, runtime }) = crash_loop::Child::from_env() else {
        return;
    };
    runtime.block_on(async move {
        let store = Store::open(dir, StoreOptions::default()).expect("child: open store");
        let mut rng = Rng::new(seed);
        let mut writers = tokio::task::JoinSet::new();
        for shard in 0..SHARDS {
            writers.spawn(shard_writer(store.clone(), shard, rng.next_u64()));
        }
        // The writers run until the process is killed: any of them ending is a failure, and
        // must end the process so the parent sees it.
        let ended = writers.join_next().await.expect("child: no writers");
        panic!("child: a shard writer stopped: {ended:?}");
    });
}

/// Appends, acknowledges, applies, snapshots, purges and votes on one shard until killed.
async fn shard_writer(store: Store, shard: u64, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut log = LogStore::new(store.wal().clone(), shard);
    let state = log.get_log_state().await.expect("child: log state");
    let purged = state.last_purged_log_id;
    let mut next = index_of(state.last_log_id.as_ref()) + 1;
    let mut sm =
        StateMachine::open(&store, shard, purged.as_ref()).expect("child: open state machine");

    // Catch the state machine up with the log (the parent normally already did), as openraft
    // would on startup.
    let applied = index_of(sm.last_applied().expect("child: applied").as_ref());
    if applied + 1 < next {
        let entries = log
            .try_get_log_entries(applied + 1..next)
            .await
            .expect("child: read log to catch up");
        assert_eq!(
            entries.len() as u64,
            next - applied - 1,
            "child: catch-up read"
        );
        apply(&mut sm, entries)
            .await
            .expect("child: catch-up apply");
    }
    let applied = index_of(sm.last_applied().expect("child: applied").as_ref());
    let mut snapshot_at = match sm
        .get_current_snapshot()
        .await
        .expect("child: current snapshot")
    {
        Some(snapshot) => index_of(snapshot.meta.last_log_id.as_ref()),
        None => 0,
    };
    let mut term = log
        .read_vote()
        .await
        .expect("child: read vote")
        .map_or(0, |v| v.leader_id().term);
    report(format_args!("START {shard} {next} {applied}"));

    loop {
        let first = next;
        let last = first + rng.range(1, 8) - 1;
        let entries: Vec<Entry> = (first..=last).map(|i| expected_entry(shard, i)).collect();
        report(format_args!("WRITE {shard} {first} {last}"));
        let (tx, rx) = TypeConfig::oneshot();
        log.append(entries.clone(), IOFlushed::signal(tx))
            .await
            .expect("child: append");
        rx.await
            .expect("child: append callback dropped")
            .expect("child: append not durable");
        report(format_args!("ACK {shard} {first} {last}"));
        next = last + 1;

        apply(&mut sm, entries).await.expect("child: apply");
        report(format_args!("APPLIED {shard} {last}"));

        if last >= snapshot_at + SNAPSHOT_EVERY {
            let snapshot = sm
                .try_create_snapshot_builder(true)
                .await
                .expect("child: snapshot builder")
                .build_snapshot()
                .await
                .expect("child: build snapshot");
            let snapshot_last = index_of(snapshot.meta.last_log_id.as_ref());
            assert_eq!(snapshot_last, last, "child: snapshot of shard {shard}");
            let upto = snapshot_last - PURGE_LAG;
            log.purge(log_id(1, 1, upto)).await.expect("child: purge");
            snapshot_at = snapshot_last;
            report(format_args!("SNAPSHOT {shard} {snapshot_last} {upto}"));
        }

        if rng.range(1, 16) == 1 {
            term += 1;
            report(format_args!("VOTING {shard} {term}"));
            log.save_vote(&vote(term, 1))
                .await
                .expect("child: save vote");
            report(format_args!("VOTED {shard} {term}"));
        }
    }
}

async fn apply(sm: &mut StateMachine, entries: Vec<Entry>) -> std::io::Result<()> {
    sm.apply(futures::stream::iter(
        entries.into_iter().map(|e| Ok((e, None))),
    ))
    .await
}

// ---------------------------------------------------------------------------------------------
// Parent: what one child reported
// ---------------------------------------------------------------------------------------------

/// One shard's reports in one round.
#[derive(Debug, Default, Clone)]
struct ShardRound {
    /// `(next index, state machine's applied index)` as the child found them on start.
    start: Option<(u64, u64)>,
    /// Highest index announced before its append.
    written: u64,
    /// Highest acknowledged index.
    acked: u64,
    /// Entries acknowledged.
    acked_entries: u64,
    /// Highest index the child reported applied.
    applied: u64,
    /// Highest vote term announced before saving it.
    voting: u64,
    /// Highest vote term acknowledged.
    voted: u64,
    /// Votes acknowledged.
    votes: u64,
    /// Snapshots built (and the log purged after them).
    snapshots: u64,
}

/// Everything one child reported.
#[derive(Debug, Default)]
struct RoundLog {
    shards: Vec<ShardRound>,
    acked_entries: u64,
    /// Inconsistencies in the reports themselves.
    problems: Vec<String>,
}

impl RoundLog {
    fn new() -> RoundLog {
        RoundLog {
            shards: vec![ShardRound::default(); SHARDS as usize],
            ..RoundLog::default()
        }
    }
}

impl ChildReports for RoundLog {
    fn acknowledged(&self) -> bool {
        self.acked_entries > 0
    }

    fn problems(&self) -> &[String] {
        &self.problems
    }

    fn record(&mut self, line: &str) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let numbers: Option<Vec<u64>> = words.iter().skip(1).map(|w| w.parse().ok()).collect();
        let (Some(kind), Some(numbers)) = (words.first(), numbers) else {
            self.problems
                .push(format!("unparseable report line {line:?}"));
            return;
        };
        let Some(shard) = numbers
            .first()
            .filter(|s| **s < SHARDS)
            .map(|s| *s as usize)
        else {
            self.problems
                .push(format!("report line without a valid shard: {line:?}"));
            return;
        };
        let s = &mut self.shards[shard];
        match (*kind, &numbers[1..]) {
            ("START", &[next, applied]) => s.start = Some((next, applied)),
            ("WRITE", &[first, last]) => {
                let expected = s.written.max(s.start.map_or(0, |(n, _)| n - 1)) + 1;
                if first != expected || last < first {
                    self.problems.push(format!(
                        "shard {shard}: child wrote {first}..={last}, expected to start at {expected}"
                    ));
                }
                s.written = last;
            }
            ("ACK", &[first, last]) => {
                let expected = s.acked.max(s.start.map_or(0, |(n, _)| n - 1)) + 1;
                if first != expected || last > s.written {
                    self.problems.push(format!(
                        "shard {shard}: child acknowledged {first}..={last}, expected to start at \
                         {expected} and end by {}",
                        s.written
                    ));
                }
                s.acked = last;
                s.acked_entries += last + 1 - first;
                self.acked_entries += last + 1 - first;
            }
            ("APPLIED", &[index]) => s.applied = index,
            ("SNAPSHOT", &[_, _]) => s.snapshots += 1,
            ("VOTING", &[term]) => s.voting = term,
            ("VOTED", &[term]) => {
                s.voted = term;
                s.votes += 1;
            }
            _ => self.problems.push(format!("unknown report line {line:?}")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parent: what survived
// ---------------------------------------------------------------------------------------------

/// What all children so far reported for one shard, and what the last check found.
#[derive(Debug, Default, Clone)]
struct ShardModel {
    written: u64,
    acked: u64,
    voting: u64,
    voted: u64,
    /// The log's last index found by the previous check.
    log_end: u64,
}

/// What the check of one shard found.
#[derive(Debug, Default)]
struct ShardFound {
    log_end: u64,
    /// The state machine (after open) was behind the log's end.
    behind: bool,
    /// sled's applied index on reopen, before any recovery.
    sled_applied: u64,
    /// sled was behind the purge point: restored from the snapshot.
    restored: bool,
    /// Entries read and compared.
    entries_checked: u64,
}

/// Every key's (version, value) after entries `1..=end` of `shard`, decided by a plain map.
fn model_state(shard: u64, end: u64) -> HashMap<Vec<u8>, (u64, Vec<u8>)> {
    let mut state: HashMap<Vec<u8>, (u64, Vec<u8>)> = HashMap::new();
    for index in 1..=end {
        let openraft::EntryPayload::Normal(command) = expected_entry(shard, index).payload else {
            unreachable!("the child writes normal entries only")
        };
        match command {
            Command::Put { key, value } => {
                state.insert(key, (index, value));
            }
            Command::Delete { key } => {
                state.remove(&key);
            }
            Command::CompareAndSet { key, expected, new } => {
                if state.get(&key).map(|(_, v)| v) == expected.as_ref() {
                    match new {
                        Some(value) => state.insert(key, (index, value)),
                        None => state.remove(&key),
                    };
                }
            }
            Command::Meta(_) => unreachable!("the child writes data shards only"),
        }
    }
    state
}

/// Reopens the store and checks every shard against the model; returns one result per shard.
async fn check_store(data: &Path, models: &[ShardModel]) -> Result<Vec<ShardFound>, Vec<String>> {
    let store = Store::open(data, StoreOptions::default())
        .map_err(|e| vec![format!("reopening the store failed: {e}")])?;
    let mut found = Vec::new();
    let mut failures = Vec::new();
    for shard in 0..SHARDS {
        match check_shard(&store, shard, &models[shard as usize]).await {
            Ok(f) => found.push(f),
            Err(e) => failures.push(format!("shard {shard}: {e}")),
        }
    }
    drop(store);
    if failures.is_empty() {
        Ok(found)
    } else {
        Err(failures)
    }
}

async fn check_shard(store: &Store, shard: u64, model: &ShardModel) -> Result<ShardFound, String> {
    let mut log = LogStore::new(store.wal().clone(), shard);
    let state = log
        .get_log_state()
        .await
        .map_err(|e| format!("get_log_state: {e}"))?;
    let purged = state.last_purged_log_id;
    let p = index_of(purged.as_ref());
    let l = index_of(state.last_log_id.as_ref());

    // Every acknowledged entry is present.
    if model.acked > l {
        return Err(format!(
            "LOST acknowledged entries: acknowledged up to index {}, but the log ends at {l} \
             (indexes {}..={} missing; purged up to {p})",
            model.acked,
            l + 1,
            model.acked
        ));
    }
    // Nothing was invented.
    if l > model.written {
        return Err(format!(
            "INVENTED entries: the log ends at index {l}, but the child only ever wrote up to {}",
            model.written
        ));
    }
    if let Some(purged) = &purged
        && *purged != log_id(1, 1, p)
    {
        return Err(format!(
            "purge point {purged} is not a log id the child purged to"
        ));
    }
    if p > l {
        return Err(format!("purged up to {p}, past the log's end {l}"));
    }
    let entries = log
        .try_get_log_entries(p + 1..=l)
        .await
        .map_err(|e| format!("reading entries {}..={l}: {e}", p + 1))?;
    for (offset, entry) in entries.iter().enumerate() {
        let index = p + 1 + offset as u64;
        let expected = expected_entry(shard, index);
        if *entry != expected {
            return Err(format!(
                "INVENTED entry at index {index} (log {}..={l}): found {entry:?}, expected \
                 {expected:?}",
                p + 1
            ));
        }
    }
    if entries.len() as u64 != l - p {
        return Err(format!(
            "the log claims entries {}..={l} but reading them returned {} entries (first missing \
             index {})",
            p + 1,
            entries.len(),
            p + 1 + entries.len() as u64
        ));
    }

    // The state machine resumes between the purge point and the log's end, and catches up.
    let raw_applied = store
        .state_tree(shard)
        .and_then(|tree| tree.applied())
        .map_err(|e| format!("reading sled's applied marker: {e}"))?
        .map(|bytes| decode_serde::<LogId>(&bytes))
        .transpose()
        .map_err(|e| format!("sled's applied marker does not decode: {e}"))?;
    let raw_applied = index_of(raw_applied.as_ref());
    let mut sm = StateMachine::open(store, shard, purged.as_ref()).map_err(|e| {
        format!("opening the state machine (sled at {raw_applied}, purged {p}): {e}")
    })?;
    let applied = index_of(
        sm.last_applied()
            .map_err(|e| format!("last_applied: {e}"))?
            .as_ref(),
    );
    if applied > l {
        return Err(format!(
            "the state machine resumes at {applied}, past the log's end {l}"
        ));
    }
    if applied < p {
        return Err(format!(
            "the state machine resumes at {applied}, below the purge point {p}: entries \
             {}..={p} are in neither (sled was at {raw_applied})",
            applied + 1
        ));
    }
    let missing: Vec<Entry> = entries.into_iter().skip((applied - p) as usize).collect();
    apply(&mut sm, missing)
        .await
        .map_err(|e| format!("applying {}..={l}: {e}", applied + 1))?;
    let caught_up = index_of(
        sm.last_applied()
            .map_err(|e| format!("last_applied: {e}"))?
            .as_ref(),
    );
    if caught_up != l {
        return Err(format!(
            "after applying {}..={l} the state machine is at {caught_up}",
            applied + 1
        ));
    }
    let state = model_state(shard, l);
    for key in 0..KEYS {
        let name = format!("k{key}");
        let got = sm
            .get(name.as_bytes())
            .map_err(|e| format!("get {name}: {e}"))?
            .map(|v| (v.version, v.value));
        let want = state.get(name.as_bytes()).cloned();
        if got != want {
            let show = |v: &Option<(u64, Vec<u8>)>| {
                v.as_ref()
                    .map(|(i, value)| format!("version {i} {:?}", String::from_utf8_lossy(value)))
            };
            return Err(format!(
                "state machine disagrees at key {name} after catching up to {l} (resumed at \
                 {applied}, sled at {raw_applied}, purged {p}): got {:?}, expected {:?}",
                show(&got),
                show(&want)
            ));
        }
    }

    // The vote: never older than an acknowledged one, never newer than one announced.
    let term = log
        .read_vote()
        .await
        .map_err(|e| format!("read_vote: {e}"))?
        .map(|v| {
            if v == vote(v.leader_id().term, 1) {
                Ok(v.leader_id().term)
            } else {
                Err(format!("vote {v} is not one the child saved"))
            }
        })
        .transpose()?
        .unwrap_or(0);
    if term < model.voted || term > model.voting {
        return Err(format!(
            "vote term {term}: the child had saved {} (durably) and announced up to {}",
            model.voted, model.voting
        ));
    }

    Ok(ShardFound {
        log_end: l,
        behind: applied < l,
        sled_applied: raw_applied,
        restored: raw_applied < p,
        entries_checked: l - p,
    })
}

// ---------------------------------------------------------------------------------------------
// Parent: the loop
// ---------------------------------------------------------------------------------------------

#[test]
fn crash_loop_loses_no_acknowledged_entry() {
    let started = Instant::now();
    let mut parent = crash_loop::Parent::start("crash loop", DEFAULT_SEED);
    let (seed, data) = (parent.seed, parent.data.clone());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");

    let mut models = vec![ShardModel::default(); SHARDS as usize];
    let mut acked_total = 0;
    let mut checked_total = 0;
    let mut rounds_behind = 0;
    let mut shards_behind = 0;
    let mut lost_applies = 0;
    let mut restores = 0;
    let mut snapshots = 0;
    let mut votes = 0;

    for round in 1..=ROUNDS {
        let fail = |what: String| -> ! {
            panic!(
                "crash loop round {round}/{ROUNDS} (replay with {}={seed}): {what}",
                crash_loop::SEED_ENV
            )
        };
        let round_run = parent.round(
            "crash_loop::child_writer",
            MARK,
            &[],
            RoundLog::new(),
            KILL_AFTER_MS,
        );
        let (reports, kill_after) = (&round_run.reports, round_run.kill_after);
        if let Some(why) = round_run.failure() {
            fail(why);
        }

        for (shard, (model, r)) in models.iter_mut().zip(&reports.shards).enumerate() {
            // Every shard's writer got going, and found the log where the last check left it.
            match r.start {
                None => fail(format!(
                    "shard {shard}: the child's writer never started{}",
                    round_run.output()
                )),
                Some((next, _)) if next != model.log_end + 1 => fail(format!(
                    "shard {shard}: the child resumed appending at {next}, but the log ended at \
                     {} when the parent checked it",
                    model.log_end
                )),
                Some(_) => {}
            }
            model.written = model.written.max(r.written);
            model.acked = model.acked.max(r.acked);
            model.voting = model.voting.max(r.voting);
            model.voted = model.voted.max(r.voted);
            snapshots += r.snapshots;
            votes += r.votes;
        }

        let found = match runtime.block_on(check_store(&data, &models)) {
            Ok(found) => found,
            Err(failures) => fail(format!(
                "after SIGKILL following {} acknowledged entries this round:\n{}",
                reports.acked_entries,
                failures.join("\n")
            )),
        };
        let mut any_behind = false;
        for ((model, f), r) in models.iter_mut().zip(found).zip(&reports.shards) {
            model.log_end = f.log_end;
            any_behind |= f.behind;
            shards_behind += u64::from(f.behind);
            restores += u64::from(f.restored);
            // sled's applied marker came back below what the child had applied (its tail was
            // only in the killed process's memory).
            lost_applies += u64::from(f.sled_applied < r.applied);
            checked_total += f.entries_checked;
        }
        rounds_behind += u32::from(any_behind);
        acked_total += reports.acked_entries;
        println!(
            "round {round:2}: killed after {kill_after:?}; {} entries acknowledged; logs end at {:?}",
            reports.acked_entries,
            models.iter().map(|m| m.log_end).collect::<Vec<_>>()
        );
        assert!(
            reports.acked_entries > 0,
            "round {round} acknowledged nothing"
        );
    }

    drop(runtime);
    let elapsed = started.elapsed();
    // Reaching this line means no round found a lost or invented entry: any would have failed
    // the test with its round, shard and index.
    println!(
        "crash loop: {ROUNDS} rounds, {acked_total} acknowledged entries over {SHARDS} shards, 0 \
         lost, 0 invented, state machines behind the log on reopen in {rounds_behind} rounds \
         ({shards_behind} shard reopens; sled lost applied entries in {lost_applies}, restored from \
         a snapshot in {restores}), {snapshots} snapshots, {votes} votes, {checked_total} log \
         entries compared, seed {seed}, {elapsed:.1?}"
    );
    assert!(acked_total >= u64::from(ROUNDS));
}
