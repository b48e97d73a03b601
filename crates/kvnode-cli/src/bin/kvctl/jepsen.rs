//! `kvctl jepsen`: runs a Jepsen-style fault test against real `kvnode` processes (`run`), or
//! re-checks a saved run offline (`check`). Exit codes: 0 no violation, 1 violations found,
//! 2 the run itself could not be carried out.
//!
//! Partitions use `iptables` in a private network namespace when this process may make one
//! (root, with `unshare` and `iptables` installed): `run` then re-executes itself under
//! `unshare -n`, so the rules never touch the host's network. Otherwise the nodes talk
//! through a fault-injecting TCP proxy. The report says which was used.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use kvnode_jepsen::Level;
use kvnode_jepsen::nemesis::{ApplyLag, Family, Shape};
use kvnode_jepsen::net::{NETNS_ENV, NetKind, in_private_netns, netns_available};
use kvnode_jepsen::run::{RunOptions, recheck, run};
use kvnode_jepsen::workload::WorkloadOptions;

use super::parse_duration;

/// Fault testing.
#[derive(Debug, Subcommand)]
pub enum JepsenCommand {
    /// Start a cluster, run workers under a seeded nemesis, heal, check, and report.
    Run(Box<RunArgs>),
    /// Re-check a saved run folder offline (rewrites its report and timeline).
    Check {
        /// The run folder (holding history.jsonl).
        dir: PathBuf,
    },
}

/// How links are cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NetChoice {
    /// netns+iptables when allowed, else the TCP proxy.
    Auto,
    /// Per-pair iptables DROP rules in a private network namespace (needs root).
    Netns,
    /// A fault-injecting TCP proxy per directed link (no privileges needed).
    Proxy,
}

/// Options of `kvctl jepsen run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Nodes (3 or 5; ring and bridge partitions are more interesting with 5).
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Shards.
    #[arg(long, default_value_t = 8)]
    shards: u32,
    /// How long the workload and the faults run (the heal and final reads come after).
    #[arg(long, default_value = "90s", value_parser = parse_duration)]
    time: Duration,
    /// Fault families, comma-separated: partition, kill, pause, and apply-lag (shard leaders'
    /// applies lag their commits, see --apply-lag; test builds of kvnode only).
    #[arg(long, value_delimiter = ',', default_value = "partition,kill,pause")]
    nemesis: Vec<Family>,
    /// With --nemesis apply-lag: HOLD/EVERY, each node holds the applies of the shards it
    /// leads for HOLD in windows starting every EVERY on the wall clock.
    #[arg(long, default_value = "800ms/3s")]
    apply_lag: ApplyLag,
    /// Partition shapes to pick from, comma-separated (default: all): one, majority,
    /// majorities-ring, bridge, primaries, oneway.
    #[arg(long, value_delimiter = ',')]
    partitions: Vec<Shape>,
    /// The nodes' idle time in milliseconds before a shard group hibernates (0: never); short
    /// by default so groups sleep and wake all through the run.
    #[arg(long, default_value_t = RunOptions::default().hibernate_after_ms)]
    hibernate_after_ms: u64,
    /// Mean time a fault is held, and between faults of one family (each ±50%).
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    interval: Duration,
    /// Seed of the schedule and the workers' choices (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Read levels of register reads, comma-separated: lin, lease, fri, session, bst:MS, ev.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "lin,lease,session,bst:500,ev"
    )]
    levels: Vec<Level>,
    /// Client workers per node.
    #[arg(long, default_value_t = 2)]
    workers_per_node: usize,
    /// Each worker request's deadline (a write past it is `info`).
    #[arg(long, default_value = "1500ms", value_parser = parse_duration)]
    client_timeout: Duration,
    /// Register keys in use at any time (few make keys hot: more operations per key meet).
    #[arg(long, default_value_t = WorkloadOptions::default().live_keys)]
    live_keys: usize,
    /// Percent of operations that are set adds (the rest are register operations).
    #[arg(long, default_value_t = WorkloadOptions::default().set_percent,
          value_parser = clap::value_parser!(u64).range(0..=100))]
    set_percent: u64,
    /// How links are cut.
    #[arg(long, value_enum, default_value_t = NetChoice::Auto)]
    net: NetChoice,
    /// The kvnode binary (default: the one next to this kvctl).
    #[arg(long)]
    kvnode: Option<PathBuf>,
    /// Folder the run folder is created in.
    #[arg(long, default_value = "target/jepsen")]
    out: PathBuf,
    /// Netns mode only: the port every node listens on, each on its own loopback alias inside
    /// the run's private namespace (default 17400). The TCP proxy shares the host's loopback,
    /// so it takes every port, its own and the nodes', from the kernel: with --net proxy this
    /// option is an error, and --net auto ignores it when it falls back to the proxy.
    #[arg(long)]
    base_port: Option<u16>,
    /// Switch on a planted bug in the nodes (only builds with the `planted-bugs` feature
    /// have them): follower-local-read, leader-no-confirm, ack-uncommitted,
    /// read-index-applied.
    #[arg(long)]
    planted_bug: Option<String>,
    /// With --planted-bug: run past --time (up to three times it) until the nodes' logs show
    /// the bug exercised N times (0: stop after --time).
    #[arg(long, default_value_t = 0)]
    exercise: u64,
}

/// Runs a `kvctl jepsen` command.
pub fn main(command: JepsenCommand) -> ExitCode {
    match command {
        JepsenCommand::Check { dir } => match recheck(&dir) {
            Ok((verdict, report)) => {
                print!("{report}");
                println!("report: {}", dir.join("report.txt").display());
                println!("timeline: {}", dir.join("timeline.html").display());
                if verdict.is_ok() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        JepsenCommand::Run(args) => run_command(*args),
    }
}

fn run_command(args: RunArgs) -> ExitCode {
    let net = match (args.net, in_private_netns()) {
        (NetChoice::Proxy, _) => NetKind::Proxy,
        (_, true) => NetKind::Netns,
        (_, false) if netns_available() => return reexec_in_netns(),
        (NetChoice::Netns, false) => {
            eprintln!(
                "error: --net netns needs root and the unshare and iptables commands; \
                 use --net proxy (or auto)"
            );
            return ExitCode::from(2);
        }
        (NetChoice::Auto, false) => {
            eprintln!(
                "jepsen: no private network namespace available (needs root, unshare, iptables): \
                 using the TCP proxy"
            );
            NetKind::Proxy
        }
    };
    // The proxy takes its ports from the kernel: a fixed port only means something in netns
    // mode.
    let base_port = match (net, args.net, args.base_port) {
        (NetKind::Proxy, NetChoice::Proxy, Some(_)) => {
            eprintln!(
                "error: --base-port is for netns mode only: the TCP proxy takes its ports from \
                 the kernel"
            );
            return ExitCode::from(2);
        }
        (NetKind::Proxy, _, Some(port)) => {
            eprintln!(
                "jepsen: ignoring --base-port {port}: the TCP proxy takes its ports from the kernel"
            );
            None
        }
        (_, _, port) => port,
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 ^ u64::from(std::process::id()))
    });
    let kvnode = args.kvnode.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .map(|exe| exe.with_file_name("kvnode"))
            .unwrap_or_else(|_| PathBuf::from("kvnode"))
    });
    if args.nodes < 3 {
        eprintln!("error: --nodes must be at least 3");
        return ExitCode::from(2);
    }
    let options = RunOptions {
        nodes: args.nodes,
        shards: args.shards,
        replication_factor: 3,
        duration: args.time,
        interval: args.interval,
        families: args.nemesis.clone(),
        shapes: args.partitions.clone(),
        seed,
        workload: WorkloadOptions {
            workers_per_node: args.workers_per_node,
            levels: args.levels.clone(),
            client_timeout: args.client_timeout,
            live_keys: args.live_keys,
            set_percent: args.set_percent,
            ..WorkloadOptions::default()
        },
        net,
        kvnode,
        out: args.out.clone(),
        base_port,
        planted_bug: args.planted_bug.clone(),
        exercise: args.exercise,
        apply_lag: args.apply_lag,
        hibernate_after_ms: args.hibernate_after_ms,
        ..RunOptions::default()
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(options)) {
        Ok(summary) => {
            print!("{}", summary.report);
            println!("run folder: {}", summary.dir.display());
            println!(
                "timeline:   {}",
                summary.dir.join("timeline.html").display()
            );
            println!("seed:       {seed} (replay: --seed {seed} with the same options)");
            if summary.verdict.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("error: the run could not be carried out: {e}");
            eprintln!("seed: {seed}");
            ExitCode::from(2)
        }
    }
}

/// Runs this same command again inside a private network namespace (`unshare -n`), where
/// iptables rules on loopback addresses cut links without touching the host.
fn reexec_in_netns() -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("error: cannot find this program to re-run it in a network namespace: {e}");
            return ExitCode::from(2);
        }
    };
    let status = std::process::Command::new("unshare")
        .arg("-n")
        .arg("--")
        .arg(&exe)
        .args(std::env::args_os().skip(1))
        .env(NETNS_ENV, "1")
        .status();
    match status {
        Ok(status) => match status.code() {
            Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(2)),
            None => ExitCode::from(2),
        },
        Err(e) => {
            eprintln!("error: cannot run unshare: {e}");
            ExitCode::from(2)
        }
    }
}
