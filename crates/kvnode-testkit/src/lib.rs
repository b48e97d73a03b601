//! Test support for kvnode's tests, benches and tools:
//!
//! - [`LocalCluster`]: an in-process cluster of N nodes, each serving the client API and the
//!   peer transport on its own 127.0.0.1 port, with stop/restart on the same port and test
//!   partitions;
//! - [`processes`] and [`process_cluster`]: the one harness for real `kvnode` processes (the
//!   Jepsen runner, the end-to-end tests of `kvnode-cli` and the `read_levels` bench all use
//!   it): spawn, SIGKILL, SIGTERM, SIGSTOP/SIGCONT, restart on the same address and data, log
//!   tails, and the gRPC calls the tests make;
//! - [`crash_loop`]: the driver of the crash-loop tests (the test binary run again as a child,
//!   killed at a random moment, its reports read from its stdout);
//! - [`eventually`], the polling helper every cluster test needs;
//! - [`Rng`], the workspace's one seeded generator: randomized tests print their seed and
//!   replay from it, and the load generator draws its keys and values from it.
//!
//! These helpers panic on failure, as test code does (but [`processes`], which returns
//! errors). The library never depends on this crate; its tests do, as a dev-dependency, and
//! so do the tools `kvnode-jepsen` and `kvnode-loadgen`.

#![deny(missing_docs)]

pub mod crash_loop;
pub mod ports;
pub mod process_cluster;
pub mod processes;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};

use kvnode::config::Config;
use kvnode::node::Node;
use kvnode::peers::Peers;

/// Polls `check` every 20 ms until it returns `Some`; panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(20)).await;
    }
}

/// A node serving the client API and the peer transport.
struct Running {
    node: Arc<Node>,
    stop: oneshot::Sender<()>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

/// Nodes `1..=n` in this process over real loopback sockets. A stopped node keeps its data
/// directory and port and can be restarted.
pub struct LocalCluster {
    configs: Vec<Config>,
    nodes: Vec<Option<Running>>,
    /// Every node's port, held while the cluster lives, so that a restart finds it free.
    _ports: Vec<ports::PortReservation>,
}

impl LocalCluster {
    /// Starts `n` nodes with data under `base`. Every node gets a test-friendly configuration
    /// (cluster `local-test`, replication factor 3, 100 ms heartbeats, 400–800 ms elections,
    /// small WAL segments and caches) that `configure` may then adjust.
    pub async fn start(base: &Path, n: u64, configure: impl Fn(&mut Config)) -> LocalCluster {
        // Quiet unless RUST_LOG asks, e.g. RUST_LOG=kvnode=info,openraft=warn.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let mut listeners = Vec::new();
        let mut peers = BTreeMap::new();
        let mut reserved = Vec::new();
        for id in 1..=n {
            let port = ports::PortReservation::new().expect("reserve a local port");
            let listener = TcpListener::bind(port.addr())
                .await
                .expect("bind the reserved port");
            peers.insert(id, port.addr().to_string());
            listeners.push(listener);
            reserved.push(port);
        }
        let configs: Vec<Config> = (1..=n)
            .map(|id| {
                let mut config = Config {
                    data_dir: base.join(format!("node{id}")),
                    node_id: id,
                    cluster_id: "local-test".to_string(),
                    peers: peers.clone(),
                    replication_factor: 3,
                    heartbeat_interval_ms: 100,
                    election_timeout_min_ms: 400,
                    election_timeout_max_ms: 800,
                    wal_segment_bytes: 4 * 1024 * 1024,
                    sled_cache_bytes: 4 * 1024 * 1024,
                    ..Config::default()
                };
                configure(&mut config);
                config
            })
            .collect();
        let mut nodes = Vec::new();
        for (config, listener) in configs.iter().zip(listeners) {
            nodes.push(Some(serve(config, listener).await));
        }
        LocalCluster {
            configs,
            nodes,
            _ports: reserved,
        }
    }

    /// Node `id` (panics if it is stopped).
    pub fn node(&self, id: u64) -> &Arc<Node> {
        &self.nodes[id as usize - 1]
            .as_ref()
            .unwrap_or_else(|| panic!("node {id} is stopped"))
            .node
    }

    /// The running nodes.
    pub fn running(&self) -> impl Iterator<Item = &Arc<Node>> {
        self.nodes.iter().flatten().map(|r| &r.node)
    }

    /// Node `id`'s configuration.
    pub fn config(&self, id: u64) -> &Config {
        &self.configs[id as usize - 1]
    }

    /// Node `id`'s address.
    pub fn addr(&self, id: u64) -> SocketAddr {
        self.configs[0].peers[&id]
            .parse()
            .expect("a socket address")
    }

    /// Node `id`'s peer channels (for test partitions).
    pub fn peers(&self, id: u64) -> &Arc<Peers> {
        self.node(id).peers().expect("clustered nodes have peers")
    }

    /// Symmetric partition: `isolated` on one side, every other node on the other.
    pub fn partition(&self, isolated: u64) {
        let others: Vec<u64> = self
            .running()
            .map(|n| n.id())
            .filter(|id| *id != isolated)
            .collect();
        self.peers(isolated).cut_off(others.iter().copied());
        for id in others {
            self.peers(id).cut_off([isolated]);
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        for node in self.running() {
            if let Some(peers) = node.peers() {
                peers.heal();
            }
        }
    }

    /// Shuts node `id`'s server down and closes the node (its data stays). Tasks holding the
    /// node must be done.
    pub async fn stop(&mut self, id: u64) {
        let running = self.nodes[id as usize - 1]
            .take()
            .unwrap_or_else(|| panic!("node {id} is already stopped"));
        let _ = running.stop.send(());
        let mut server = running.server;
        if tokio::time::timeout(Duration::from_secs(5), &mut server)
            .await
            .is_err()
        {
            server.abort();
            let _ = server.await;
        }
        let mut node = running.node;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match Arc::try_unwrap(node) {
                Ok(node) => return node.close().await,
                Err(shared) => node = shared,
            }
            assert!(Instant::now() < deadline, "node {id} is still shared");
            sleep(Duration::from_millis(10)).await;
        }
    }

    /// Reopens node `id` from its data directory, serving on its old port.
    pub async fn restart(&mut self, id: u64) {
        let addr = self.addr(id);
        let listener = eventually(
            Duration::from_secs(10),
            "the node's port to be free again",
            || async move { TcpListener::bind(addr).await.ok() },
        )
        .await;
        let config = self.configs[id as usize - 1].clone();
        self.nodes[id as usize - 1] = Some(serve(&config, listener).await);
    }

    /// Stops every running node.
    pub async fn close(mut self) {
        for id in 1..=self.nodes.len() as u64 {
            if self.nodes[id as usize - 1].is_some() {
                self.stop(id).await;
            }
        }
    }
}

async fn serve(config: &Config, listener: TcpListener) -> Running {
    let node = Arc::new(Node::open(config.clone()).await.expect("open node"));
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(kvnode::server::serve(Arc::clone(&node), listener, async {
        let _ = stopped.await;
    }));
    Running { node, stop, server }
}

/// A small seeded generator (xorshift64, seeded through splitmix64, never zero): randomized
/// tests print their seed and replay from it.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Rng(z.max(1))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `lo..=hi` (modulo bias is irrelevant for tests).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2^-32 for the `n` tests
    /// and tools use).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// One of `items`, uniformly (panics if empty).
    pub fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize].clone()
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}
