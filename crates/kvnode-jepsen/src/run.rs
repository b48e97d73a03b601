//! One fault-test run from start to verdict: start the nodes, record the workers' history
//! while the nemesis runs its seeded schedule, heal, settle, wait for quiet, do the final
//! reads, stop the nodes, check the history, and leave everything in the run folder:
//!
//! ```text
//! <out>/<run>/run.json        options, seed, network backend, the fault schedule
//!            history.jsonl   every operation and fault (re-check it offline: `kvctl jepsen check <run>`)
//!            nemesis.log     the faults, one readable line each
//!            report.txt      the verdict per checker, counts, first counterexamples
//!            timeline.html   latency of every operation over time, fault windows shaded
//!            timeline.svg    the same picture alone
//!            logs/node-N.log each node's log (all its lives)
//!            data/node-N/    each node's data directory
//! ```
//!
//! **Settling before the final reads.** The final reads compare nodes (convergence) and must
//! not race a write whose client gave up (`info`) but which can still take effect. Every
//! request carries its deadline (the client timeout, sent as `grpc-timeout`); a node works on
//! a request at most that long after it arrives (a forward carries what is left of it, and
//! the node's own request timeout bounds every request too), and a request held
//! in a cut link arrives at the latest when the link heals, the last time being the heal. So
//! the final phase waits until max over requests of (max(invocation, heal) + deadline), plus
//! [`SETTLE_MARGIN`], and then writes a barrier on every shard ([`workload::barrier`]), which
//! commits or rules out every entry proposed before it. The report says when the final phase
//! began.
//!
//! **Exercising a planted bug.** A campaign that proves a checker can fail must not pass by
//! luck. With `exercise` set, the workload and the faults go on past `duration` (up to
//! [`EXERCISE_LIMIT`] times it) until the nodes' logs show the planted bug exercised that many
//! times ([`node_logs`]); the report says how often it was.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokio::sync::watch;

use super::history::{Event, History, HistoryError, OpType};
use super::nemesis::{self, ApplyLag, Context, Family, Schedule, Shape};
use super::net::{Net, NetError, NetKind};
use super::node_logs;
use super::probe::Probe;
use super::processes::{ClusterSpec, NodeSpec, ProcessError, Processes};
use super::recorder::Recorder;
use super::timeline::{TimelineOptions, write_timeline};
use super::verdict::{FINAL_PHASE, RunVerdict, check_run};
use super::workload::{self, REGISTER_PREFIX, SET_PREFIX, WorkloadOptions};

/// Everything a run is made of.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Nodes (3 or 5).
    pub nodes: u64,
    /// Shards.
    pub shards: u32,
    /// Replicas per shard.
    pub replication_factor: usize,
    /// How long the workload and the nemesis run (the heal and final reads come after).
    pub duration: Duration,
    /// Mean time a fault is held, and mean quiet time between faults of one family.
    pub interval: Duration,
    /// The fault families.
    pub families: Vec<Family>,
    /// The partition shapes to pick from (empty: all).
    pub shapes: Vec<Shape>,
    /// Seeds the schedule and the workers' choices.
    pub seed: u64,
    /// The workers.
    pub workload: WorkloadOptions,
    /// How links are cut.
    pub net: NetKind,
    /// The `kvnode` binary to test.
    pub kvnode: PathBuf,
    /// The folder runs are created in.
    pub out: PathBuf,
    /// Netns mode: the port every node listens on, each on its own loopback alias in the
    /// run's private namespace (`None`:
    /// [`NETNS_DEFAULT_PORT`](super::net::NETNS_DEFAULT_PORT)). Proxy mode needs `None`: it
    /// shares the host's loopback, so the kernel picks every port (see [`super::net`]).
    pub base_port: Option<u16>,
    /// The nodes' heartbeat interval.
    pub heartbeat_ms: u64,
    /// The nodes' election timeout range.
    pub election_timeout_ms: (u64, u64),
    /// The nodes' idle time before a shard group hibernates (0: never). Short by default so
    /// that groups fall asleep and wake up all through a run, faults included.
    pub hibernate_after_ms: u64,
    /// A planted bug to switch on in the nodes (`KVNODE_PLANTED_BUG`; only builds with the
    /// `planted-bugs` feature have them).
    pub planted_bug: Option<String>,
    /// With `planted_bug`: keep the workload and the faults going past `duration` (up to
    /// [`EXERCISE_LIMIT`] × `duration`) until the nodes' logs show the bug exercised this
    /// many times. 0: stop after `duration`.
    pub exercise: u64,
    /// The windows of the `apply-lag` nemesis, when `families` has it (`KVNODE_APPLY_LAG`;
    /// only builds with the `planted-bugs` feature act on it).
    pub apply_lag: ApplyLag,
}

/// A run that exercises a planted bug stops at the latest after this many times `duration`.
pub const EXERCISE_LIMIT: u32 = 3;

/// Added to the last request deadline before the final phase (see the module doc).
pub const SETTLE_MARGIN: Duration = Duration::from_millis(500);

/// The nodes' request timeout (`--request-timeout-ms`), which also bounds a forwarded request.
const NODE_REQUEST_TIMEOUT: Duration = Duration::from_millis(1000);

impl Default for RunOptions {
    fn default() -> RunOptions {
        RunOptions {
            nodes: 3,
            shards: 8,
            replication_factor: 3,
            duration: Duration::from_secs(90),
            interval: Duration::from_secs(8),
            families: Family::ALL.to_vec(),
            shapes: Vec::new(),
            seed: 0,
            workload: WorkloadOptions::default(),
            net: NetKind::Proxy,
            kvnode: PathBuf::from("kvnode"),
            out: PathBuf::from("target/jepsen"),
            base_port: None,
            heartbeat_ms: 100,
            election_timeout_ms: (500, 1000),
            hibernate_after_ms: 300,
            planted_bug: None,
            exercise: 0,
            apply_lag: ApplyLag::default(),
        }
    }
}

/// A run that could not be carried out (as opposed to one that found a violation).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A node could not be started or signalled.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// The network could not be set up or changed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The history could not be written or read.
    #[error(transparent)]
    History(#[from] HistoryError),
    /// A file of the run could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The cluster never became ready.
    #[error("the cluster did not become ready: {0}")]
    NotReady(String),
    /// The nemesis failed.
    #[error(transparent)]
    Nemesis(#[from] nemesis::NemesisError),
    /// The nodes did not act on a test-only switch the run relies on.
    #[error(
        "no node logged {logged:?}: the nodes ignored {switch} (only the test-only \
         kvnode-planted binary acts on it: pass it as --kvnode; `cargo test` builds it)"
    )]
    SwitchIgnored {
        /// The environment variable.
        switch: &'static str,
        /// The line a node logs when it acts on it.
        logged: &'static str,
    },
}

/// What a run produced.
#[derive(Debug)]
pub struct RunSummary {
    /// The run folder.
    pub dir: PathBuf,
    /// The verdicts.
    pub verdict: RunVerdict,
    /// The report text (also in `report.txt`).
    pub report: String,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write(path: &Path, contents: impl AsRef<[u8]>) -> Result<(), RunError> {
    std::fs::write(path, contents).map_err(io(path))
}

/// Runs one campaign; the verdict says whether a violation was found.
pub async fn run(options: RunOptions) -> Result<RunSummary, RunError> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let dir = options
        .out
        .join(format!("run-{stamp}-seed-{}", options.seed));
    std::fs::create_dir_all(dir.join("logs")).map_err(io(&dir))?;
    let ids: Vec<u64> = (1..=options.nodes).collect();
    let exercise = match &options.planted_bug {
        Some(bug) if options.exercise > 0 => Some((bug.clone(), options.exercise)),
        _ => None,
    };
    let lagging = options.families.contains(&Family::ApplyLag);
    let limit = if exercise.is_some() {
        options.duration * EXERCISE_LIMIT
    } else {
        options.duration
    };
    // Scheduled up to the limit; a run that stops earlier starts no later fault.
    let schedule = Schedule::generate(
        options.seed,
        &options.families,
        &options.shapes,
        limit,
        options.interval,
    );
    eprintln!(
        "jepsen: {} · {} faults scheduled · run folder {}",
        summary_line(&options),
        schedule.steps.len(),
        dir.display()
    );

    let net = Arc::new(Net::new(options.net, &ids, options.base_port).await?);
    eprintln!("jepsen: network: {}", net.describe());
    let mut env = vec![(
        "RUST_LOG".to_string(),
        "info,openraft=warn,openraft::core::heartbeat=error".to_string(),
    )];
    if let Some(bug) = &options.planted_bug {
        env.push(("KVNODE_PLANTED_BUG".into(), bug.clone()));
    }
    if lagging {
        env.push(("KVNODE_APPLY_LAG".into(), options.apply_lag.env_value()));
    }
    let cluster = ClusterSpec {
        binary: options.kvnode.clone(),
        cluster_id: format!("jepsen-{}", options.seed),
        shards: options.shards,
        replication_factor: options.replication_factor,
        heartbeat_ms: options.heartbeat_ms,
        election_timeout_ms: options.election_timeout_ms,
        hibernate_after_ms: options.hibernate_after_ms,
        request_timeout_ms: NODE_REQUEST_TIMEOUT.as_millis() as u64,
        env,
    };
    let specs: Vec<NodeSpec> = ids.iter().map(|&id| net.node_spec(id, &dir)).collect();
    let addrs: BTreeMap<u64, SocketAddr> = specs.iter().map(|s| (s.id, s.listen)).collect();
    write_run_json(&dir, &options, &net, &schedule)?;

    let processes = Arc::new(Mutex::new(Processes::start(cluster, specs)?));
    let probe = Probe::new(&addrs);
    let ready = probe
        .wait_quiet(Duration::from_secs(60))
        .await
        .map_err(RunError::NotReady)?;
    eprintln!("jepsen: cluster ready after {:.1} s", ready.as_secs_f64());
    let logs = dir.join("logs");
    if options.planted_bug.is_some() && node_logs::count(&logs, node_logs::PLANTED_ACTIVE) == 0 {
        return Err(RunError::SwitchIgnored {
            switch: "KVNODE_PLANTED_BUG",
            logged: node_logs::PLANTED_ACTIVE,
        });
    }
    if lagging && node_logs::count(&logs, node_logs::APPLY_LAG_ACTIVE) < options.nodes {
        return Err(RunError::SwitchIgnored {
            switch: "KVNODE_APPLY_LAG",
            logged: node_logs::APPLY_LAG_ACTIVE,
        });
    }

    let recorder = Arc::new(Recorder::create(dir.join("history.jsonl"))?);
    let start = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut workload_options = options.workload.clone();
    workload_options.shards = options.shards;
    workload_options.seed = options.seed;
    let workers = {
        let recorder = recorder.clone();
        let addrs = addrs.clone();
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            workload::run_workers(recorder, &addrs, &workload_options, stop).await
        })
    };
    let context = Arc::new(Context {
        processes: processes.clone(),
        net: net.clone(),
        probe: probe.clone(),
        recorder: recorder.clone(),
        ids: ids.clone(),
    });
    let nemesis_task = {
        let schedule = schedule.clone();
        let stop = stop_rx.clone();
        tokio::spawn(async move { nemesis::run(&schedule, context, start, stop).await })
    };
    let lag_task = lagging.then(|| {
        tokio::spawn(nemesis::record_apply_lag(
            recorder.clone(),
            options.apply_lag,
            stop_rx.clone(),
        ))
    });
    let progress = tokio::spawn(progress(
        recorder.clone(),
        probe.clone(),
        options.duration,
        options.planted_bug.clone().map(|bug| (logs.clone(), bug)),
    ));

    tokio::time::sleep(options.duration).await;
    let mut extended = false;
    if let Some((bug, wanted)) = &exercise {
        while node_logs::fired(&logs, bug) < *wanted && start.elapsed() < limit {
            extended = true;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let _ = stop_tx.send(true);
    let counts = workers.await.unwrap_or_default();
    let nemesis_result = nemesis_task.await;
    let lag_windows = match lag_task {
        Some(task) => task.await.ok(),
        None => None,
    };
    progress.abort();
    let ran_for = start.elapsed();
    eprintln!(
        "jepsen: workload done after {:.1} s: {} ok, {} fail, {} info",
        ran_for.as_secs_f64(),
        counts.ok,
        counts.fail,
        counts.info
    );

    // Heal everything, wait for quiet, then the final reads.
    net.heal().await?;
    processes
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .heal()?;
    recorder.nemesis(
        OpType::Info,
        "heal",
        json!({"note": "all links healed, all nodes resumed and running"}),
    );
    let healed = Instant::now();

    // Settle: no request of the workload can take effect from here on (see the module doc).
    let deadline = options.workload.client_timeout.max(NODE_REQUEST_TIMEOUT);
    let settled = settled_at(&recorder.history(), deadline, SETTLE_MARGIN);
    let Settled { barrier, quiet } = settle(
        start + Duration::from_nanos(settled),
        &addrs,
        options.shards,
        &probe,
    )
    .await;
    if let Err(failed) = &barrier {
        eprintln!("jepsen: no barrier write acknowledged on shards {failed:?}");
    }
    match &quiet {
        Ok(_) => eprintln!(
            "jepsen: settled and quiet {:.1} s after the heal",
            healed.elapsed().as_secs_f64()
        ),
        Err(reason) => eprintln!("jepsen: not quiet 30 s after the settling: {reason}"),
    }
    let began = healed.elapsed();
    let mut info = json!({
        "after_heal_ms": began.as_millis() as u64,
        "deadline_ms": deadline.as_millis() as u64,
        "margin_ms": SETTLE_MARGIN.as_millis() as u64,
    });
    match &barrier {
        Ok(indices) => {
            info["barrier"] = json!(
                indices
                    .iter()
                    .map(|(s, i)| (s.to_string(), *i))
                    .collect::<BTreeMap<_, _>>()
            );
        }
        Err(failed) => {
            info["barrier_failed"] = json!(
                failed
                    .iter()
                    .map(|(s, e)| (s.to_string(), e.clone()))
                    .collect::<BTreeMap<_, _>>()
            );
        }
    }
    match &quiet {
        Ok(after) => info["quiet_after_ms"] = json!(after.as_millis() as u64),
        Err(reason) => info["not_quiet"] = json!(reason),
    }
    recorder.nemesis(OpType::Info, FINAL_PHASE, info);
    let settle_note = format!(
        "final phase: began {:.1} s after the heal, once every request's deadline ({} ms) had \
         passed since its invocation or the heal, plus {} ms, and {}",
        began.as_secs_f64(),
        deadline.as_millis(),
        SETTLE_MARGIN.as_millis(),
        match &barrier {
            Ok(_) => "a barrier write committed on every shard".to_string(),
            Err(failed) => format!(
                "NO barrier write committed on shards {:?}",
                failed.keys().collect::<Vec<_>>()
            ),
        }
    );
    let keys: BTreeSet<String> = recorder
        .history()
        .ops()
        .filter(|op| op.key.starts_with(REGISTER_PREFIX) || op.key.starts_with(SET_PREFIX))
        .map(|op| op.key.clone())
        .collect();
    let finals =
        workload::final_reads(recorder.clone(), &addrs, &keys, Duration::from_secs(2), 5).await;
    eprintln!(
        "jepsen: final reads: {} of {} keys at lin, {} ev reads ({} failed)",
        finals.keys_read, finals.keys, finals.eventual_reads, finals.eventual_failed
    );
    recorder.finish()?;
    {
        let processes = processes.clone();
        tokio::task::spawn_blocking(move || {
            processes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .stop_all(Duration::from_secs(5));
        })
        .await
        .ok();
    }
    drop(net);
    let mut nemesis_note = match nemesis_result {
        Ok(Ok(n)) => format!("{n} faults injected and undone"),
        Ok(Err(e)) => format!("nemesis failed: {e}"),
        Err(e) => format!("nemesis task failed: {e}"),
    };
    if let Some(windows) = lag_windows {
        nemesis_note.push_str(&format!(", {windows} apply-lag windows recorded"));
    }
    let mut notes = vec![format!(
        "workload: {:.1} s{}",
        ran_for.as_secs_f64(),
        if extended {
            " (extended to exercise the planted bug)"
        } else {
            ""
        }
    )];
    if lagging {
        let lag = node_logs::lag_windows(&logs);
        notes.push(format!(
            "apply-lag: the nodes held {} windows ({} ms every {} ms): {} leader replicas held, \
             {} with an apply waiting (a write committed while its leader's apply was held)",
            lag.windows,
            options.apply_lag.hold.as_millis(),
            options.apply_lag.every.as_millis(),
            lag.held,
            lag.lagged
        ));
    }
    if let Some(bug) = &options.planted_bug {
        let fired = node_logs::fired(&logs, bug);
        let wanted = match exercise {
            Some((_, wanted)) if fired < wanted => {
                format!(
                    " (NOT the {wanted} asked for, within {} s)",
                    limit.as_secs()
                )
            }
            Some((_, wanted)) => format!(" (at least {wanted} asked for)"),
            None => String::new(),
        };
        notes.push(format!(
            "planted bug {bug}: exercised {fired} times{wanted} (node logs: \"{}\")",
            node_logs::FIRED
        ));
    }
    notes.push(settle_note);
    add_notes_to_run_json(&dir, &notes)?;

    let history = recorder.history();
    let (verdict, report) = report(
        &dir,
        &history,
        &header(&options, &net_line(&dir), &nemesis_note, &notes),
    )?;
    Ok(RunSummary {
        dir,
        verdict,
        report,
    })
}

fn net_line(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("run.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v["network"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// One line naming the run: planted bug (if any), seed, cluster, duration, fault families.
fn summary_line(options: &RunOptions) -> String {
    let bug = match &options.planted_bug {
        Some(bug) => format!("PLANTED BUG {bug} · "),
        None => String::new(),
    };
    let families: Vec<&str> = options.families.iter().map(|f| f.name()).collect();
    format!(
        "{bug}seed {} · {} nodes × {} shards (rf {}) · {} s · nemesis {}",
        options.seed,
        options.nodes,
        options.shards,
        options.replication_factor,
        options.duration.as_secs(),
        families.join(","),
    )
}

fn header(options: &RunOptions, net: &str, nemesis_note: &str, notes: &[String]) -> String {
    let mut text = format!(
        "kvnode fault test · {}\nnetwork: {net}\nnemesis: {nemesis_note}\n",
        summary_line(options)
    );
    for note in notes {
        let _ = writeln!(text, "{note}");
    }
    text
}

/// What settling the cluster for the final reads found ([`settle`]).
#[derive(Debug)]
pub struct Settled {
    /// Each shard's barrier index, or the shards where no barrier write was acknowledged (with
    /// the last error).
    pub barrier: Result<BTreeMap<u64, u64>, BTreeMap<u64, String>>,
    /// How long the cluster took to be quiet after the barrier, or why it was not.
    pub quiet: Result<Duration, String>,
}

/// Settles the cluster at `addrs` for the final reads (see the module doc): waits until
/// `until`, when no request of the workload can take effect any more ([`settled_at`]), then
/// writes a barrier on every one of the `shards` ([`workload::barrier`]), then waits until
/// every replica has applied its leader's commit index ([`Probe::wait_quiet`]). Once it
/// returns with a barrier on every shard, no earlier write can still take effect anywhere.
pub async fn settle(
    until: Instant,
    addrs: &BTreeMap<u64, SocketAddr>,
    shards: u32,
    probe: &Probe,
) -> Settled {
    tokio::time::sleep_until(until.into()).await;
    let barrier = workload::barrier(
        addrs,
        shards,
        Duration::from_secs(2),
        Duration::from_secs(20),
    )
    .await;
    let quiet = probe.wait_quiet(Duration::from_secs(30)).await;
    Settled { barrier, quiet }
}

/// When the final phase may start, in nanoseconds on the history's clock (see the module
/// doc): once no request can still take effect on a node, i.e. the latest of the last
/// invocation and the last nemesis line (the heal), plus `deadline` and `margin`.
fn settled_at(history: &History, deadline: Duration, margin: Duration) -> u64 {
    let last = history
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Op(op) if op.kind == OpType::Invoke => Some(op.t_ns),
            Event::Nemesis(n) => Some(n.t_ns),
            Event::Op(_) => None,
        })
        .max()
        .unwrap_or(0);
    let wait = u64::try_from((deadline + margin).as_nanos()).unwrap_or(u64::MAX);
    last.saturating_add(wait)
}

fn write_run_json(
    dir: &Path,
    options: &RunOptions,
    net: &Net,
    schedule: &Schedule,
) -> Result<(), RunError> {
    let steps: Vec<serde_json::Value> = schedule
        .steps
        .iter()
        .map(|s| {
            json!({
                "start_ms": s.start.as_millis() as u64,
                "hold_ms": s.hold.as_millis() as u64,
                "fault": s.fault.family().name(),
                "target": s.fault.target_name(),
            })
        })
        .collect();
    let run = json!({
        "seed": options.seed,
        "nodes": options.nodes,
        "shards": options.shards,
        "replication_factor": options.replication_factor,
        "duration_s": options.duration.as_secs(),
        "interval_ms": options.interval.as_millis() as u64,
        "nemesis": options.families.iter().map(|f| f.name()).collect::<Vec<_>>(),
        "partitions": options.shapes.iter().map(|s| s.name()).collect::<Vec<_>>(),
        "levels": options.workload.levels.iter().map(|l| l.to_string()).collect::<Vec<_>>(),
        "workers_per_node": options.workload.workers_per_node,
        "network": net.describe(),
        "kvnode": options.kvnode.display().to_string(),
        "planted_bug": options.planted_bug,
        "exercise": options.exercise,
        "apply_lag": options.families.contains(&Family::ApplyLag).then(|| json!({
            "hold_ms": options.apply_lag.hold.as_millis() as u64,
            "every_ms": options.apply_lag.every.as_millis() as u64,
        })),
        "client_timeout_ms": options.workload.client_timeout.as_millis() as u64,
        "live_keys": options.workload.live_keys,
        "set_percent": options.workload.set_percent,
        "heartbeat_ms": options.heartbeat_ms,
        "election_timeout_ms": [options.election_timeout_ms.0, options.election_timeout_ms.1],
        "hibernate_after_ms": options.hibernate_after_ms,
        "schedule": steps,
        "replay": format!("kvctl jepsen run --seed {} (same options)", options.seed),
    });
    write(
        &dir.join("run.json"),
        serde_json::to_string_pretty(&run).unwrap_or_default(),
    )
}

/// Adds the run's notes (what the report says beyond the verdicts: how long the workload ran,
/// how often the planted bug was exercised, when the final phase began) to `run.json`, so an
/// offline re-check reports them too.
fn add_notes_to_run_json(dir: &Path, notes: &[String]) -> Result<(), RunError> {
    let path = dir.join("run.json");
    let mut run: serde_json::Value = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_else(|| json!({}));
    run["notes"] = json!(notes);
    write(
        &path,
        serde_json::to_string_pretty(&run).unwrap_or_default(),
    )
}

/// Progress: a line every 10 s with the counts so far, how many replicas of the nodes that
/// answer are hibernating at that moment (so a run shows groups sleeping and waking through
/// the faults), and how often the planted bug (logs folder, name) fired so far.
async fn progress(
    recorder: Arc<Recorder>,
    probe: Probe,
    duration: Duration,
    planted: Option<(PathBuf, String)>,
) {
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let t = recorder.tally();
        let statuses = probe.statuses().await;
        let hosted: usize = statuses
            .values()
            .map(|s| s.shards.iter().filter(|v| !v.role.is_empty()).count())
            .sum();
        let asleep: usize = statuses
            .values()
            .map(|s| s.shards.iter().filter(|v| v.hibernating).count())
            .sum();
        let fired = match &planted {
            Some((logs, bug)) => format!(" · {bug} fired {}", node_logs::fired(logs, bug)),
            None => String::new(),
        };
        eprintln!(
            "jepsen: {:>4.0}/{} s · {} ok, {} fail, {} info · {} faults so far · {asleep}/{hosted} replicas hibernating{fired}",
            started.elapsed().as_secs_f64(),
            duration.as_secs(),
            t.ok,
            t.fail,
            t.info,
            t.faults
        );
    }
}

/// Checks `history`, writes `report.txt`, `nemesis.log` and the timeline into `dir`, and
/// returns the verdict and the report text.
pub fn report(
    dir: &Path,
    history: &History,
    header: &str,
) -> Result<(RunVerdict, String), RunError> {
    let verdict = check_run(history)?;
    let mut text = String::new();
    text.push_str(header);
    let _ = writeln!(text);
    let _ = write!(text, "{verdict}");
    write(&dir.join("report.txt"), &text)?;
    let mut log = String::new();
    for event in &history.events {
        if let Event::Nemesis(n) = event {
            let _ = writeln!(
                log,
                "{:>9.3} s  {:<16} {}",
                n.t_ns as f64 / 1e9,
                n.f,
                n.info
            );
        }
    }
    write(&dir.join("nemesis.log"), log)?;
    // A short title (the legend shares its line): the planted bug, if any, and the seed.
    let first = header.lines().next().unwrap_or_default();
    let mut title = String::from("kvnode fault test");
    for part in first
        .split(" · ")
        .filter(|p| p.starts_with("seed") || p.starts_with("PLANTED"))
    {
        title.push_str(" · ");
        title.push_str(part);
    }
    write_timeline(
        history,
        &TimelineOptions {
            title,
            ..TimelineOptions::default()
        },
        &text,
        dir,
    )
    .map_err(io(dir))?;
    Ok((verdict, text))
}

/// Re-checks a saved run: reads `<dir>/history.jsonl`, runs every checker again, rewrites the
/// report and the timeline, and returns the verdict and the report text.
pub fn recheck(dir: &Path) -> Result<(RunVerdict, String), RunError> {
    let history = History::read_jsonl(dir.join("history.jsonl"))?;
    let mut header = String::new();
    if let Ok(run) = std::fs::read_to_string(dir.join("run.json"))
        && let Ok(run) = serde_json::from_str::<serde_json::Value>(&run)
    {
        let list = |v: &serde_json::Value| {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default()
        };
        let bug = match run["planted_bug"].as_str() {
            Some(bug) => format!("PLANTED BUG {bug} · "),
            None => String::new(),
        };
        let _ = writeln!(
            header,
            "kvnode fault test (re-checked offline) · {bug}seed {} · {} nodes × {} shards · {} s · nemesis {}",
            run["seed"],
            run["nodes"],
            run["shards"],
            run["duration_s"],
            list(&run["nemesis"]),
        );
        let _ = writeln!(
            header,
            "network: {}",
            run["network"].as_str().unwrap_or("?")
        );
        for note in run["notes"].as_array().into_iter().flatten() {
            if let Some(note) = note.as_str() {
                let _ = writeln!(header, "{note}");
            }
        }
    } else {
        let _ = writeln!(
            header,
            "kvnode fault test (re-checked offline, no run.json)"
        );
    }
    report(dir, &history, &header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{F, NemesisEvent, NemesisProc, Op};

    const S: u64 = 1_000_000_000;

    fn nemesis(i: u64, t_ns: u64, f: &str) -> Event {
        Event::Nemesis(NemesisEvent {
            i,
            t_ns,
            proc: NemesisProc,
            kind: OpType::Info,
            f: f.into(),
            info: json!({}),
        })
    }

    #[test]
    fn the_final_phase_waits_out_every_deadline_from_its_invocation_or_the_heal() {
        let deadline = Duration::from_millis(1500);
        let margin = Duration::from_millis(500);
        let mut done = Op::invoke(1, 2 * S, 0, F::Write, "reg-0");
        done.kind = OpType::Info;
        let mut history = History {
            events: vec![
                Event::Op(Op::invoke(0, S, 0, F::Write, "reg-0")),
                // The client gave up: its completion does not end the server's work.
                Event::Op(done),
                Event::Op(Op::invoke(2, 2 * S + S / 2, 1, F::Read, "reg-0")),
            ],
        };
        assert_eq!(settled_at(&history, deadline, margin), 4 * S + S / 2);
        // A request held in a cut link reaches its node when the link heals.
        history.events.push(nemesis(3, 3 * S, "stop-partition"));
        history.events.push(nemesis(4, 3 * S + S / 10, "heal"));
        assert_eq!(settled_at(&history, deadline, margin), 5 * S + S / 10);
    }
}
