//! `kvctl bench`: runs one load-generator workload ([`kvnode_loadgen`]) against a kvnode or
//! an etcd cluster and prints a one-line summary (optionally the JSON result too);
//! `kvctl bench report DIR` puts a folder of such results side by side (table with
//! kvnode/etcd ratios, `bench.md`, `bench.svg`). `scripts/bench.sh` drives both.
//!
//! Exit codes: 0 done, 1 the run or report failed (or no operation succeeded), 2 usage error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use kvnode_loadgen::etcd::EtcdTarget;
use kvnode_loadgen::kvnode::KvnodeTarget;
use kvnode_loadgen::report::Report;
use kvnode_loadgen::{LoadError, Names, Progress, RunResult, System, Target, Workload, run};

use super::{parse_duration, usage_error};

/// `kvctl bench [OPTIONS]` runs a workload; `kvctl bench report DIR` reports.
#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Endpoints: the global -e/--endpoints; without it kvnode uses $KVNODE_ENDPOINTS \
                  or 127.0.0.1:7001, etcd $ETCD_ENDPOINTS or 127.0.0.1:2379. --timeout is each \
                  request's deadline. Prints one summary line; --json writes the result file \
                  that `kvctl bench report DIR` reads. scripts/bench.sh runs kvnode and etcd \
                  side by side."
)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: Option<BenchCommand>,
    #[command(flatten)]
    run: RunArgs,
}

/// `kvctl bench` subcommands.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Print the side-by-side table of a folder of `--json` results (kvnode/etcd ratios) and
    /// write bench.md and bench.svg into it.
    Report {
        /// The folder holding the result files (*.json) and optionally machine.txt.
        dir: PathBuf,
    },
}

/// Options of one run. The endpoints are the global `-e/--endpoints` (default: kvnode
/// $KVNODE_ENDPOINTS or 127.0.0.1:7001; etcd $ETCD_ENDPOINTS or 127.0.0.1:2379); the global
/// `--timeout` is each request's deadline.
#[derive(Debug, Args)]
struct RunArgs {
    /// The system under load: kvnode or etcd.
    #[arg(long, default_value = "kvnode", value_parser = parse_system)]
    system: System,
    /// The workload's name; results of the same name are paired in the report (put, get,
    /// get-local, mix, ...).
    #[arg(long, default_value = "put")]
    workload: String,
    /// A description of the run for the report (default: the read/write mix and level).
    #[arg(long)]
    label: Option<String>,
    /// Tasks, each with one request in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Distinct keys (all written once before measuring).
    #[arg(long, default_value_t = 1000)]
    keys: u64,
    /// Bytes per written value.
    #[arg(long, default_value_t = 256)]
    value_bytes: usize,
    /// Share of reads, 0-100 (default: 0 for a workload named put, 100 for get*, 90 for
    /// mix*; other names must give it).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
    read_percent: Option<u8>,
    /// Read level: linearizable, lease, session, bounded:DURATION (e.g. bounded:500ms) or
    /// eventual for kvnode; linearizable or serializable for etcd.
    #[arg(long, default_value = "linearizable")]
    level: String,
    /// Length of the measurement window.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// How long the workload runs before measuring starts.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// Also write the result as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No progress display.
    #[arg(long)]
    quiet: bool,
}

fn parse_system(s: &str) -> Result<System, String> {
    s.parse()
        .map_err(|e: kvnode_loadgen::LevelError| e.to_string())
}

/// Runs a `kvctl bench` command; `endpoints` and `timeout` are the global flags.
pub fn main(args: BenchArgs, endpoints: Vec<String>, timeout: Duration) -> ExitCode {
    if let Some(BenchCommand::Report { dir }) = args.command {
        return report(&dir);
    }
    let a = args.run;
    let level = match a.level.parse::<kvnode_loadgen::Level>() {
        Ok(level) => level,
        Err(e) => usage_error(&format!("--level: {e}")),
    };
    if let Err(e) = level.check_for(a.system) {
        usage_error(&format!("--level: {e}"));
    }
    let read_percent = match a.read_percent {
        Some(p) => p,
        None if a.workload == "put" => 0,
        None if a.workload.starts_with("get") => 100,
        None if a.workload.starts_with("mix") => 90,
        None => usage_error(&format!(
            "give --read-percent for workload {:?} (it is implied only for put, get* and mix*)",
            a.workload
        )),
    };
    let workload = Workload {
        concurrency: a.concurrency,
        keys: a.keys,
        value_bytes: a.value_bytes,
        read_percent,
        duration: a.duration,
        warmup: a.warmup,
    };
    if let Err(e) = workload.validate() {
        usage_error(&e.to_string());
    }
    let names = Names {
        workload: a.workload.clone(),
        label: a.label.clone().unwrap_or_else(|| match read_percent {
            0 => "100% writes".to_string(),
            100 => format!("100% reads, {level}"),
            p => format!("{p}% reads ({level}), {}% writes", 100 - p),
        }),
    };
    let endpoints = resolve_endpoints(a.system, endpoints);
    let progress = if a.quiet {
        Progress::Off
    } else {
        Progress::Bar
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match a.system {
            System::Kvnode => {
                let target = KvnodeTarget::connect(&endpoints, level, timeout).await?;
                run_on(target, &workload, &names, progress).await
            }
            System::Etcd => {
                let target = EtcdTarget::connect(&endpoints, level, timeout).await?;
                run_on(target, &workload, &names, progress).await
            }
        }
    });
    let result = match outcome {
        Ok(result) => result,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", result.summary_line());
    if let Some(e) = &result.first_error {
        eprintln!("first error: {e}");
    }
    if let Some(path) = &a.json {
        let json = serde_json::to_string(&result).expect("a result serializes");
        if let Err(e) = std::fs::write(path, json + "\n") {
            eprintln!("error: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if result.ops == 0 {
        eprintln!("error: no operation succeeded in the measurement window");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

async fn run_on<T: Target>(
    target: T,
    workload: &Workload,
    names: &Names,
    progress: Progress,
) -> Result<RunResult, LoadError> {
    run(Arc::new(target), workload, names, progress).await
}

/// The endpoints given, else the system's environment variable, else its local default.
fn resolve_endpoints(system: System, given: Vec<String>) -> Vec<String> {
    let given: Vec<String> = given
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if !given.is_empty() {
        return given;
    }
    let (var, default) = match system {
        System::Kvnode => ("KVNODE_ENDPOINTS", "127.0.0.1:7001"),
        System::Etcd => ("ETCD_ENDPOINTS", "127.0.0.1:2379"),
    };
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => v.split(',').map(|s| s.trim().to_string()).collect(),
        _ => vec![default.to_string()],
    }
}

fn report(dir: &std::path::Path) -> ExitCode {
    let report = match Report::load(dir) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(m) = &report.machine {
        println!("machine: {m}");
    }
    let settings = report.settings();
    if !settings.is_empty() {
        println!("closed loop: {settings}");
    }
    print!("{}", report.table());
    if let Err(e) = report.write(dir) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    println!(
        "(kvnode/etcd = kvnode ops/s ÷ etcd ops/s; latencies of successful operations)\n\
         wrote {} and {}",
        dir.join("bench.md").display(),
        dir.join("bench.svg").display()
    );
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cli;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        let mut argv = vec!["kvctl", "bench"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)?.command {
            crate::Command::Bench(b) => Ok(b),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn bench_flags_and_the_report_subcommand_parse() {
        let b = parse(&[
            "--system",
            "etcd",
            "--workload",
            "get-local",
            "--level",
            "serializable",
            "--duration",
            "3s",
            "--read-percent",
            "100",
        ])
        .unwrap();
        assert!(b.command.is_none());
        assert_eq!(b.run.system, System::Etcd);
        assert_eq!(b.run.duration, Duration::from_secs(3));
        assert_eq!(b.run.warmup, Duration::from_secs(1));
        assert_eq!(b.run.concurrency, 64);
        assert_eq!(b.run.read_percent, Some(100));
        let r = parse(&["report", "target/bench/x"]).unwrap();
        assert!(matches!(r.command, Some(BenchCommand::Report { .. })));
        assert!(parse(&["--system", "redis"]).is_err());
        assert!(parse(&["--read-percent", "101"]).is_err());
    }

    #[test]
    fn endpoints_default_per_system() {
        assert_eq!(
            resolve_endpoints(System::Etcd, vec!["a:1".into(), " ".into()]),
            ["a:1"]
        );
    }
}
