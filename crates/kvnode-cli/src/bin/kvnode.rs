//! `kvnode`: runs one node. With no flags, a single node on 127.0.0.1:7001 keeping its data in
//! `data/kvnode`; with `--peers`, one member of a cluster; with `--join ADDR`, a new member of
//! the cluster ADDR belongs to (it gets its id and the cluster map from the cluster). SIGTERM
//! or Ctrl-C shut it down cleanly (stop accepting, finish in-flight requests, stop the shards,
//! flush, exit 0).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use kvnode::client::Client;
use kvnode::cluster::join::check_rejoin;
use kvnode::storage::codec::encode_serde;
use kvnode::storage::{Identity, cluster_cache};
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
    /// Default: the id the data directory was created for, else 1.
    #[arg(long)]
    id: Option<u64>,
    /// Join the cluster of the node at ADDR (host:port): with an empty data directory, the
    /// cluster gives this node a fresh id and the cluster map; with one that already belongs
    /// to that cluster, restart as its node (the flag is then ignored). The node registers
    /// the address it listens on (--listen). Not with --id or --peers.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["id", "peers"])]
    join: Option<String>,
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
    let id = args.id.unwrap_or(1);
    let data_dir = args.data_dir.clone().unwrap_or_else(|| {
        if peers.is_empty() {
            PathBuf::from("data/kvnode")
        } else {
            PathBuf::from(format!("data/node-{id}"))
        }
    });
    let (emin, emax) = args.election_timeout_ms.unwrap_or((
        defaults.election_timeout_min_ms,
        defaults.election_timeout_max_ms,
    ));
    Config {
        data_dir,
        node_id: id,
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

/// How long `--join` keeps trying to reach the cluster before it gives up.
const JOIN_DEADLINE: Duration = Duration::from_secs(60);

/// `--join ADDR` (docs/design/membership.md §3.2): returns `config` as the node the cluster
/// knows. An empty data directory joins (a fresh id, or the one `kvctl node add` registered
/// for `me`) and is prepared with the cluster's map and the node's identity; a directory with
/// an identity restarts as that node if it belongs to ADDR's cluster and is not Removed.
async fn join_cluster(mut config: Config, join: &str, me: &str) -> anyhow::Result<Config> {
    let dir = config.data_dir.clone();
    let deadline = Instant::now() + JOIN_DEADLINE;
    let found = kvnode::storage::identity::read(&dir)
        .with_context(|| format!("cannot read the identity of {}", dir.display()))?;
    let client = retry(deadline, join, || Client::connect([join.to_string()])).await?;
    let map = match found {
        Some(identity) => {
            let map = retry(deadline, join, || client.cluster_map()).await?;
            check_rejoin(&identity.cluster_id, identity.uuid, identity.node_id, &map)
                .with_context(|| format!("{} cannot join {join}", dir.display()))?;
            tracing::info!(
                node = identity.node_id,
                cluster = %identity.cluster_id,
                "the data directory already belongs to this cluster: restarting as its node; --join is ignored"
            );
            if cluster_cache::read(&dir).ok().flatten().is_none() {
                cluster_cache::write(&dir, &encode_serde(&map))?;
            }
            config.node_id = identity.node_id;
            config.cluster_id = identity.cluster_id;
            config.shards = identity.shards;
            map
        }
        None => {
            let joined = retry(deadline, join, || client.join(me, &config.cluster_id)).await?;
            let map = joined.map;
            let identity = Identity {
                cluster_id: map.name.clone(),
                node_id: joined.id,
                shards: map.shard_count,
                uuid: Some(map.cluster_uuid),
            };
            kvnode::storage::init_joined(&dir, &identity, &encode_serde(&map))
                .with_context(|| format!("cannot prepare {} for the joined node", dir.display()))?;
            tracing::info!(node = joined.id, cluster = %map.name, epoch = map.epoch, "joined the cluster");
            config.node_id = joined.id;
            config.cluster_id = map.name.clone();
            config.shards = map.shard_count;
            map
        }
    };
    config.replication_factor = usize::from(map.replication_factor);
    Ok(config)
}

/// Calls `attempt` until it succeeds, fails definitely and for good, or `deadline` passes.
async fn retry<T, F, Fut>(deadline: Instant, target: &str, attempt: F) -> anyhow::Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = kvnode::Result<T>>,
{
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tracing::info!(error = %e, "cannot reach the cluster at {target} yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("joining {target}"))),
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut config = config(&args);
    if args.join.is_none()
        && args.id.is_none()
        && let Some(identity) = kvnode::storage::identity::read(&config.data_dir)?
    {
        config.node_id = identity.node_id;
    }
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
    if let Some(join) = &args.join {
        config = join_cluster(config, join, &listen.to_string()).await?;
    }
    let node = Arc::new(Node::open(config).await.context("cannot open the node")?);
    tracing::info!(
        node = node.id(),
        listen = %listen,
        cluster = %node.config().cluster_id,
        peers = ?node.config().peers,
        shards_hosted = node.local_shards().len(),
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

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;

    use super::*;

    #[test]
    fn join_is_refused_with_id_or_peers() {
        let args = Args::try_parse_from(["kvnode", "--join", "127.0.0.1:7001"]).unwrap();
        assert_eq!(args.join.as_deref(), Some("127.0.0.1:7001"));
        assert_eq!(
            config(&args).node_id,
            1,
            "no --id: 1 until the join answers"
        );
        for extra in [["--id", "4"], ["--peers", "1=127.0.0.1:7001"]] {
            let err = Args::try_parse_from(
                ["kvnode", "--join", "127.0.0.1:7001"]
                    .into_iter()
                    .chain(extra),
            )
            .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ArgumentConflict, "{err}");
            let text = err.to_string();
            assert!(text.contains("--join") && text.contains(extra[0]), "{text}");
        }
    }

    #[test]
    fn an_id_is_optional_without_join() {
        let args = Args::try_parse_from(["kvnode", "--id", "3"]).unwrap();
        assert_eq!(config(&args).node_id, 3);
        let args = Args::try_parse_from(["kvnode"]).unwrap();
        assert_eq!((args.id, config(&args).node_id), (None, 1));
    }
}
