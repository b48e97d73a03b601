//! `kvnode`: runs one node. With no flags, a single node on 127.0.0.1:7001 keeping its data in
//! `data/kvnode`; with `--peers`, one member of a cluster. SIGTERM or Ctrl-C shut it down
//! cleanly (stop accepting, finish in-flight requests, stop the shards, flush, exit 0).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use kvnode::{Config, Node};

/// mimalloc instead of glibc's malloc: a put crosses several threads and allocates on each,
/// and glibc's arenas cost about a tenth of a node's CPU under writes (issue 7's profile). The
/// library leaves the choice to the application that embeds it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Run a kvnode node.
#[derive(Parser, Debug)]
// `about` spelled out: it was the `kvnode` package's description while the binary lived in the
// library's package, and `kvnode --help` says the same since the binary moved to kvnode-cli.
#[command(
    version,
    about = "A sharded, Raft-replicated key-value store: embed it as a library, or run a cluster of kvnode processes.",
    long_about = None
)]
struct Args {
    /// This node's id (unique in the cluster; never reuse the id of a node that lost its data).
    #[arg(long, default_value_t = 1)]
    id: u64,
    /// Address to listen on for clients and peers. Default: this node's entry in --peers, or
    /// 127.0.0.1:7001. Port 0: the OS picks a free port, which the "kvnode serving" log line
    /// reports (`listen=`).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory. Default: data/kvnode (single node) or data/node-<id> (cluster).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Every node of the cluster, this one included: `1=host:port,2=host:port,...`.
    #[arg(long, value_parser = parse_peers)]
    peers: Option<BTreeMap<u64, String>>,
    /// Cluster name; nodes of different clusters refuse each other.
    #[arg(long, default_value = "kvnode")]
    cluster_id: String,
    /// Number of shards (fixed when the data directory is created).
    #[arg(long, default_value_t = Config::default().shards)]
    shards: u32,
    /// Replicas per shard (capped by the node count).
    #[arg(long, default_value_t = Config::default().replication_factor)]
    replication_factor: usize,
    /// Leader heartbeat interval in milliseconds.
    #[arg(long, default_value_t = Config::default().heartbeat_interval_ms)]
    heartbeat_ms: u64,
    /// Election timeout range in milliseconds, `MIN..MAX`.
    #[arg(long, value_parser = parse_range)]
    election_timeout_ms: Option<(u64, u64)>,
    /// Hibernate a shard group after this many milliseconds without client traffic (its
    /// timers and heartbeats stop until a request or a peer failure wakes it); 0 never does.
    #[arg(long, default_value_t = Config::default().hibernate_after_ms)]
    hibernate_after_ms: u64,
    /// Entries between snapshots of a shard.
    #[arg(long, default_value_t = Config::default().snapshot_every_entries)]
    snapshot_every: u64,
    /// Request timeout in milliseconds.
    #[arg(long, default_value_t = Config::default().request_timeout_ms)]
    request_timeout_ms: u64,
    /// Local IP to send peer connections from (default: the OS chooses). The fault-test
    /// harness sets it to this node's loopback alias so per-pair packet filters can tell
    /// nodes apart.
    #[arg(long, value_name = "IP")]
    peer_source_ip: Option<std::net::IpAddr>,
}

fn parse_peers(s: &str) -> Result<BTreeMap<u64, String>, String> {
    let mut peers = BTreeMap::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not ID=HOST:PORT"))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| format!("{id:?} in {part:?} is not a node id"))?;
        if peers.insert(id, addr.trim().to_string()).is_some() {
            return Err(format!("node {id} is listed twice"));
        }
    }
    if peers.is_empty() {
        return Err("no peers given".into());
    }
    Ok(peers)
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?} is not MIN..MAX"))?;
    let a = a
        .trim()
        .parse()
        .map_err(|_| format!("{a:?} is not a number"))?;
    let b = b
        .trim()
        .parse()
        .map_err(|_| format!("{b:?} is not a number"))?;
    Ok((a, b))
}

fn config(args: &Args) -> Config {
    let defaults = Config::default();
    let peers = args.peers.clone().unwrap_or_default();
    let data_dir = args.data_dir.clone().unwrap_or_else(|| {
        if peers.is_empty() {
            PathBuf::from("data/kvnode")
        } else {
            PathBuf::from(format!("data/node-{}", args.id))
        }
    });
    let (emin, emax) = args.election_timeout_ms.unwrap_or((
        defaults.election_timeout_min_ms,
        defaults.election_timeout_max_ms,
    ));
    Config {
        data_dir,
        node_id: args.id,
        cluster_id: args.cluster_id.clone(),
        peers,
        peer_source_ip: args.peer_source_ip,
        replication_factor: args.replication_factor,
        shards: args.shards,
        heartbeat_interval_ms: args.heartbeat_ms,
        election_timeout_min_ms: emin,
        election_timeout_max_ms: emax,
        hibernate_after_ms: args.hibernate_after_ms,
        snapshot_every_entries: args.snapshot_every,
        request_timeout_ms: args.request_timeout_ms,
        ..defaults
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config = config(&args);
    config.validate()?;
    let listen: SocketAddr = match args.listen {
        Some(addr) => addr,
        None => match config.peers.get(&config.node_id) {
            Some(addr) => addr
                .parse()
                .with_context(|| format!("--peers gives this node the address {addr:?}, which is not IP:PORT; pass --listen"))?,
            None => "127.0.0.1:7001".parse().expect("literal address"),
        },
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    // The address actually bound: with `--listen 127.0.0.1:0` the OS picks the port, and this
    // log line is where a caller (a script, a test) reads it.
    let listen = listener.local_addr().unwrap_or(listen);
    let node = Arc::new(Node::open(config).await.context("cannot open the node")?);
    tracing::info!(
        node = node.id(),
        listen = %listen,
        cluster = %node.config().cluster_id,
        peers = ?node.config().peers,
        shards_hosted = node.local_shards().count(),
        "kvnode serving"
    );
    kvnode::server::serve(node.clone(), listener, shutdown_signal())
        .await
        .context("gRPC server failed")?;
    match Arc::try_unwrap(node) {
        Ok(node) => node.close().await,
        Err(node) => node.stop().await,
    }
    tracing::info!("kvnode stopped");
    Ok(())
}

pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(
                    "info,openraft=warn,openraft::core::heartbeat=error",
                )
            }),
        )
        .init();
    // Only the test-only `kvnode-planted` binary (which shares this `main`) arms the hooks.
    #[cfg(feature = "planted-bugs")]
    if kvnode::planted::is_test_binary() {
        tracing::warn!(
            bug = kvnode::planted::active().map_or("none", |b| b.name()),
            "TEST BUILD WITH PLANTED-BUG HOOKS (kvnode-planted): never use it for real data"
        );
        if let Some(bug) = kvnode::planted::active() {
            tracing::warn!("{}: {}", kvnode::planted::ACTIVE_BANNER, bug.name());
        }
    }
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kvnode: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvnode: {e:#}");
            ExitCode::FAILURE
        }
    }
}
