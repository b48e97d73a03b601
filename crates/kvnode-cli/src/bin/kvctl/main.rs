//! `kvctl`: a command-line client for a kvnode cluster, over [`kvnode::client::Client`].
//!
//! Prints values and receipts on stdout; on failure prints the error and whether its outcome
//! is definite (nothing happened) or indeterminate (a write may have committed) on stderr and
//! exits with 1. Usage errors exit with 2. `kvctl jepsen` (in `jepsen.rs`) runs fault tests;
//! `kvctl bench` (in `bench.rs`) runs the load generator against kvnode or etcd; `kvctl node`
//! (in `node.rs`) lists the cluster's nodes.

mod bench;
mod jepsen;
mod node;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, CommandFactory, Parser, Subcommand};
use futures::future::join_all;
use kvnode::client::{Client, ClientOptions, ClusterStatus};
use kvnode::consistency::{
    Fallback, ParseReadLevelError, ReadLevel, ReadOptions, Staleness, parse_duration,
};
use kvnode::{ReadReceipt, VersionedValue, WriteReceipt};

/// Command-line client for a kvnode cluster.
///
/// Keys and values are taken as given (UTF-8); values that are not valid UTF-8 are printed
/// escaped.
#[derive(Debug, Parser)]
#[command(name = "kvctl", version)]
struct Cli {
    /// Comma-separated `host:port` client addresses of cluster nodes; the first that answers
    /// is asked for the cluster layout. Falls back to $KVNODE_ENDPOINTS, then 127.0.0.1:7001.
    #[arg(long, short = 'e', value_delimiter = ',', global = true)]
    endpoints: Vec<String>,

    /// Deadline of each request, retries included (e.g. 500ms, 5s).
    #[arg(long, default_value = "5s", value_parser = parse_duration, global = true)]
    timeout: Duration,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Read a key; prints the value (or `(not found)`) and a line saying what was served.
    Get {
        /// The key.
        key: String,
        /// Consistency level: linearizable (default), lease, session, bounded:DURATION
        /// (e.g. bounded:500ms), eventual.
        #[arg(long, short = 'l', default_value = "linearizable", value_parser = parse_level)]
        level: ReadLevel,
        /// With a bounded level: fail instead of falling back to a linearizable read when the
        /// bound cannot be proven.
        #[arg(long)]
        fail_if_stale: bool,
        /// With the session level: what the session has seen, as SHARD:INDEX pairs
        /// (comma-separated), e.g. from earlier `put` output.
        #[arg(long, value_delimiter = ',', value_parser = parse_seen)]
        seen: Vec<(u64, u64)>,
    },
    /// Set a key; prints `OK shard=… index=…`.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Delete a key; prints `deleted` or `not found`, then the write receipt.
    #[command(visible_alias = "delete")]
    Del {
        /// The key.
        key: String,
    },
    /// Compare-and-set: if KEY holds the expected value (or is absent), set it to the new value
    /// (or delete it). Prints `applied` or `mismatch: current=…`, then the write receipt.
    Cas(CasArgs),
    /// Show the cluster: one row per shard with its replicas, leader, term and every node's
    /// commit/applied index. Nodes that do not answer show as `down`.
    Status,
    /// The cluster's nodes: `kvctl node list`.
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// Jepsen-style fault testing: run a campaign against real kvnode processes, or re-check
    /// a saved run.
    #[command(subcommand)]
    Jepsen(jepsen::JepsenCommand),
    /// Load generator: run one closed-loop workload against kvnode or etcd (`bench
    /// --system ...`), or put a folder of results side by side (`bench report DIR`).
    Bench(bench::BenchArgs),
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("expected").required(true))]
#[command(group = clap::ArgGroup::new("replacement").required(true))]
struct CasArgs {
    /// The key.
    key: String,
    /// The value the key must hold.
    #[arg(long, group = "expected")]
    expect: Option<String>,
    /// Require the key to be absent.
    #[arg(long, group = "expected")]
    expect_absent: bool,
    /// The value to set.
    #[arg(long, group = "replacement")]
    new: Option<String>,
    /// Delete the key instead of setting it.
    #[arg(long, group = "replacement")]
    delete: bool,
}

/// `--level`: the library's one read-level parser ([`ReadLevel`]'s `FromStr`).
fn parse_level(s: &str) -> Result<ReadLevel, String> {
    s.parse().map_err(|e: ParseReadLevelError| e.to_string())
}

fn parse_seen(s: &str) -> Result<(u64, u64), String> {
    let (shard, index) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not SHARD:INDEX"))?;
    let n = |v: &str| {
        v.parse::<u64>()
            .map_err(|_| format!("{s:?} is not SHARD:INDEX"))
    };
    Ok((n(shard)?, n(index)?))
}

/// Exits with a usage error (code 2) in clap's format.
fn usage_error(message: &str) -> ! {
    Cli::command()
        .error(clap::error::ErrorKind::ArgumentConflict, message)
        .exit()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Jepsen(command) = cli.command {
        return jepsen::main(command);
    }
    if let Command::Bench(args) = cli.command {
        return bench::main(args, cli.endpoints, cli.timeout);
    }
    let read_options = match &cli.command {
        Command::Get {
            level,
            fail_if_stale,
            seen,
            ..
        } => Some(read_options(level.clone(), *fail_if_stale, seen)),
        _ => None,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, read_options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(kv) = e.downcast_ref::<kvnode::Error>() {
                if kv.is_definite() {
                    eprintln!("outcome: definite (the operation did not take effect)");
                } else {
                    eprintln!(
                        "outcome: indeterminate (the write may or may not have committed; \
                         read the key to find out)"
                    );
                }
            }
            ExitCode::FAILURE
        }
    }
}

fn read_options(level: ReadLevel, fail_if_stale: bool, seen: &[(u64, u64)]) -> ReadOptions {
    let level = match level {
        ReadLevel::Bounded { max_staleness, .. } => ReadLevel::Bounded {
            max_staleness,
            fallback: if fail_if_stale {
                Fallback::Fail
            } else {
                Fallback::Linearizable
            },
        },
        _ if fail_if_stale => usage_error("--fail-if-stale applies only to --level bounded:…"),
        ReadLevel::Session(mut token) => {
            for (shard, index) in seen {
                token.observe(*shard, *index);
            }
            ReadLevel::Session(token)
        }
        _ if !seen.is_empty() => usage_error("--seen applies only to --level session"),
        other => other,
    };
    ReadOptions { level }
}

fn endpoints(cli: &Cli) -> Vec<String> {
    if !cli.endpoints.is_empty() {
        return cli.endpoints.clone();
    }
    match std::env::var("KVNODE_ENDPOINTS") {
        Ok(v) if !v.trim().is_empty() => v.split(',').map(|s| s.trim().to_string()).collect(),
        _ => vec!["127.0.0.1:7001".to_string()],
    }
}

async fn run(cli: Cli, read_options: Option<ReadOptions>) -> anyhow::Result<()> {
    let options = ClientOptions {
        request_timeout: cli.timeout,
        ..ClientOptions::default()
    };
    let endpoints = endpoints(&cli);
    let client = Client::connect_with(endpoints.clone(), options)
        .await
        .with_context(|| format!("connecting to {}", endpoints.join(",")))?;
    match cli.command {
        Command::Get { key, .. } => {
            let options = read_options.unwrap_or_default();
            let reply = client.get(key.as_bytes(), &options).await?;
            match &reply.value {
                Some(v) => println!("{}", show(&v.value)),
                None => println!("(not found)"),
            }
            println!("{}", read_receipt(&reply.receipt, reply.value.as_ref()));
        }
        Command::Put { key, value } => {
            let w = client.put(key.as_bytes(), value.into_bytes()).await?;
            println!("OK {}", write_receipt(&w));
        }
        Command::Del { key } => {
            let d = client.delete(key.as_bytes()).await?;
            println!("{}", if d.existed { "deleted" } else { "not found" });
            println!("{}", write_receipt(&d.receipt));
        }
        Command::Cas(args) => {
            let expected = match (args.expect, args.expect_absent) {
                (Some(v), false) => Some(v.into_bytes()),
                (None, true) => None,
                _ => bail!("give exactly one of --expect and --expect-absent"),
            };
            let new = match (args.new, args.delete) {
                (Some(v), false) => Some(v.into_bytes()),
                (None, true) => None,
                _ => bail!("give exactly one of --new and --delete"),
            };
            let c = client
                .compare_and_set(args.key.as_bytes(), expected.as_deref(), new)
                .await?;
            if c.applied {
                println!("applied");
            } else {
                match &c.current {
                    Some(v) => {
                        println!("mismatch: current={} version={}", show(&v.value), v.version)
                    }
                    None => println!("mismatch: current=(absent)"),
                }
            }
            println!("{}", write_receipt(&c.receipt));
        }
        Command::Status => status(&client).await?,
        Command::Node(command) => node::run(&client, command).await?,
        Command::Jepsen(_) | Command::Bench(_) => unreachable!("handled in main"),
    }
    Ok(())
}

/// `bytes` as text: UTF-8 as is, anything else escaped.
fn show(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => bytes.escape_ascii().to_string(),
    }
}

fn read_receipt(r: &ReadReceipt, value: Option<&VersionedValue>) -> String {
    let staleness = match r.staleness {
        Staleness::Zero => "0".to_string(),
        Staleness::AtMost(d) => format!("<={}ms", d.as_millis()),
        Staleness::Unknown => "unknown".to_string(),
    };
    let mut line = format!(
        "level={} node={} shard={} applied_index={} staleness={staleness}",
        r.level, r.node, r.shard, r.applied_index
    );
    if let Some(v) = value {
        line.push_str(&format!(" version={}", v.version));
    }
    line
}

fn write_receipt(w: &WriteReceipt) -> String {
    format!("shard={} index={}", w.shard, w.index)
}

/// Asks every node for its view and prints one row per shard.
async fn status(client: &Client) -> anyhow::Result<()> {
    let first = client.status().await?;
    let ids: Vec<u64> = first.nodes.keys().copied().collect();
    let first = &first;
    let views: BTreeMap<u64, Option<ClusterStatus>> = join_all(ids.iter().map(|id| async move {
        let view = if *id == first.node {
            Some(first.clone())
        } else {
            client.node_status(*id).await.ok()
        };
        (*id, view)
    }))
    .await
    .into_iter()
    .collect();
    print!("{}", status_table(first, &views));
    Ok(())
}

/// The status table: a header line, the nodes, then one row per shard.
fn status_table(first: &ClusterStatus, views: &BTreeMap<u64, Option<ClusterStatus>>) -> String {
    let up = views.values().filter(|v| v.is_some()).count();
    let mut out = format!(
        "cluster={} nodes={} (up {up}) shards={} rf={}\n",
        if first.cluster_id.is_empty() {
            "(unnamed)"
        } else {
            &first.cluster_id
        },
        first.nodes.len(),
        first.shard_count,
        first.replication_factor,
    );
    for (id, addr) in &first.nodes {
        let state = match views.get(id) {
            Some(Some(view)) => {
                let hosted = view.shards.iter().filter(|s| !s.role.is_empty()).count();
                let asleep = view.shards.iter().filter(|s| s.hibernating).count();
                let planted = match &view.planted_bug {
                    Some(bug) => format!(
                        ", TEST BUILD kvnode-planted (planted bug: {bug}): never for real data"
                    ),
                    None => String::new(),
                };
                format!("up, {asleep} of {hosted} replicas hibernating{planted}")
            }
            _ => "down".to_string(),
        };
        out.push_str(&format!("  n{id} {addr} {state}\n"));
    }
    let mut header = vec![
        "shard".to_string(),
        "replicas".into(),
        "leader".into(),
        "term".into(),
    ];
    header.extend(views.keys().map(|id| format!("n{id} commit/applied")));
    let mut rows = vec![header];
    for shard in &first.shards {
        // Each node's own view of this shard.
        let per_node: Vec<(u64, Option<&kvnode::client::ShardStatus>)> = views
            .iter()
            .map(|(id, v)| {
                let s = v
                    .as_ref()
                    .and_then(|v| v.shards.iter().find(|s| s.shard == shard.shard));
                (*id, s)
            })
            .collect();
        // The most recent term wins; at equal terms, the leader's own word.
        let freshest = per_node
            .iter()
            .filter_map(|(id, s)| s.map(|s| (*id, s)))
            .filter(|(_, s)| !s.role.is_empty())
            .max_by_key(|(_, s)| (s.term, s.role == "leader"));
        let (leader, term) = match freshest {
            Some((_, s)) => (
                s.leader.map_or("none".to_string(), |l| format!("n{l}")),
                s.term.to_string(),
            ),
            None => ("?".to_string(), "?".to_string()),
        };
        let replicas = shard
            .replicas
            .iter()
            .map(|r| format!("n{r}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut row = vec![shard.shard.to_string(), replicas, leader, term];
        for (id, view) in &per_node {
            let up = views.get(id).is_some_and(Option::is_some);
            row.push(match view {
                _ if !up => "down".to_string(),
                Some(s) if !s.role.is_empty() => {
                    let mark = if s.role == "leader" { "*" } else { "" };
                    format!("{}/{}{mark}", s.commit_index, s.applied_index)
                }
                _ => "-".to_string(),
            });
        }
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out.push_str("(* = that node leads the shard; - = no replica there)\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvnode::client::ShardStatus;

    #[test]
    fn levels_and_durations_parse() {
        assert_eq!(parse_level("lease").unwrap(), ReadLevel::Lease);
        assert_eq!(
            parse_level("bounded:500ms").unwrap(),
            ReadLevel::Bounded {
                max_staleness: Duration::from_millis(500),
                fallback: Fallback::Linearizable
            }
        );
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("250").unwrap(), Duration::from_millis(250));
        assert!(parse_level("bounded").is_err());
        assert!(parse_level("bounded:0ms").is_err());
        assert!(parse_level("strong").is_err());
        assert_eq!(parse_seen("3:42").unwrap(), (3, 42));
        assert!(parse_seen("3").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_status_table_shows_each_nodes_view_and_down_nodes() {
        let shard = |role: &str, leader, term, commit| ShardStatus {
            shard: 0,
            replicas: vec![1, 2, 3],
            leader,
            term,
            commit_index: commit,
            applied_index: commit,
            role: role.into(),
            hibernating: role == "follower",
        };
        let view = |node, s: ShardStatus| ClusterStatus {
            node,
            cluster_id: "demo".into(),
            shard_count: 1,
            replication_factor: 3,
            nodes: (1..=3).map(|i| (i, format!("127.0.0.1:700{i}"))).collect(),
            shards: vec![s],
            planted_bug: None,
        };
        let n1 = view(1, shard("leader", Some(1), 4, 10));
        let n2 = view(2, shard("follower", Some(1), 4, 9));
        let views = BTreeMap::from([(1, Some(n1.clone())), (2, Some(n2)), (3, None)]);
        let table = status_table(&n1, &views);
        assert!(
            table.starts_with("cluster=demo nodes=3 (up 2) shards=1 rf=3\n"),
            "{table}"
        );
        assert!(table.contains("n3 127.0.0.1:7003 down"), "{table}");
        assert!(
            table.contains("n2 127.0.0.1:7002 up, 1 of 1 replicas hibernating"),
            "{table}"
        );
        let row = table.lines().find(|l| l.starts_with("0 ")).unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells, ["0", "n1,n2,n3", "n1", "4", "10/10*", "9/9", "down"]);
    }
}
