//! One fault-test run from start to verdict: start the nodes, record the workers' history
//! while the nemesis runs its seeded schedule, heal, wait for quiet, do the final reads, stop
//! the nodes, check the history, and leave everything in the run folder:
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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokio::sync::watch;

use super::history::{Event, History, HistoryError, OpType};
use super::nemesis::{self, Context, Family, Schedule, Shape};
use super::net::{Net, NetError, NetKind};
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
    /// First port the nodes and proxies use.
    pub base_port: u16,
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
}

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
            base_port: 17400,
            heartbeat_ms: 100,
            election_timeout_ms: (500, 1000),
            hibernate_after_ms: 300,
            planted_bug: None,
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
    let schedule = Schedule::generate(
        options.seed,
        &options.families,
        &options.shapes,
        options.duration,
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
    let cluster = ClusterSpec {
        binary: options.kvnode.clone(),
        cluster_id: format!("jepsen-{}", options.seed),
        shards: options.shards,
        replication_factor: options.replication_factor,
        heartbeat_ms: options.heartbeat_ms,
        election_timeout_ms: options.election_timeout_ms,
        hibernate_after_ms: options.hibernate_after_ms,
        request_timeout_ms: 1000,
        env,
    };
    let specs: Vec<NodeSpec> = ids
        .iter()
        .map(|&id| NodeSpec {
            id,
            listen: net.listen_addr(id),
            peers: net.peers_for(id),
            source_ip: net.source_ip(id),
            data_dir: dir.join("data").join(format!("node-{id}")),
            log: dir.join("logs").join(format!("node-{id}.log")),
        })
        .collect();
    let addrs: BTreeMap<u64, SocketAddr> = specs.iter().map(|s| (s.id, s.listen)).collect();
    write_run_json(&dir, &options, &net, &schedule)?;

    let processes = Arc::new(Mutex::new(Processes::start(cluster, specs)?));
    let probe = Probe::new(&addrs);
    let ready = probe
        .wait_quiet(Duration::from_secs(60))
        .await
        .map_err(RunError::NotReady)?;
    eprintln!("jepsen: cluster ready after {:.1} s", ready.as_secs_f64());

    let recorder = Arc::new(Recorder::create(dir.join("history.jsonl"))?);
    let start = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut workload_options = options.workload.clone();
    workload_options.shards = options.shards;
    workload_options.seed = options.seed;
    let workers = {
        let recorder = recorder.clone();
        let addrs = addrs.clone();
        tokio::spawn(async move {
            workload::run_workers(recorder, &addrs, &workload_options, stop_rx).await
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
        tokio::spawn(async move { nemesis::run(&schedule, context, start).await })
    };
    let progress = tokio::spawn(progress(recorder.clone(), probe.clone(), options.duration));

    tokio::time::sleep(options.duration).await;
    let _ = stop_tx.send(true);
    let counts = workers.await.unwrap_or_default();
    let nemesis_result = nemesis_task.await;
    progress.abort();
    eprintln!(
        "jepsen: workload done: {} ok, {} fail, {} info",
        counts.ok, counts.fail, counts.info
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
    let quiet = probe.wait_quiet(Duration::from_secs(30)).await;
    match &quiet {
        Ok(after) => eprintln!("jepsen: quiet {:.1} s after the heal", after.as_secs_f64()),
        Err(reason) => eprintln!("jepsen: not quiet 30 s after the heal: {reason}"),
    }
    recorder.nemesis(
        OpType::Info,
        FINAL_PHASE,
        match &quiet {
            Ok(after) => json!({"quiet_after_ms": after.as_millis() as u64}),
            Err(reason) => json!({"not_quiet": reason}),
        },
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
    let nemesis_note = match nemesis_result {
        Ok(Ok(n)) => format!("{n} faults injected and undone"),
        Ok(Err(e)) => format!("nemesis failed: {e}"),
        Err(e) => format!("nemesis task failed: {e}"),
    };

    let history = recorder.history();
    let (verdict, report) = report(
        &dir,
        &history,
        &header(&options, &net_line(&dir), &nemesis_note),
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

fn header(options: &RunOptions, net: &str, nemesis_note: &str) -> String {
    format!(
        "kvnode fault test · {}\nnetwork: {net}\nnemesis: {nemesis_note}\n",
        summary_line(options)
    )
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

/// Progress: a line every 10 s with the counts so far, and how many replicas of the nodes
/// that answer are hibernating at that moment (so a run shows groups sleeping and waking
/// through the faults).
async fn progress(recorder: Arc<Recorder>, probe: Probe, duration: Duration) {
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
        eprintln!(
            "jepsen: {:>4.0}/{} s · {} ok, {} fail, {} info · {} faults so far · {asleep}/{hosted} replicas hibernating",
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
    } else {
        let _ = writeln!(
            header,
            "kvnode fault test (re-checked offline, no run.json)"
        );
    }
    report(dir, &history, &header)
}
