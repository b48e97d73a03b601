//! The real-process cluster of these tests: `kvnode_testkit::process_cluster` (the workspace's
//! one process harness) with this package's binaries and the tests' timings; and `InProcess`,
//! for the tests that need the peer transport's fault hooks.

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use kvnode_testkit::process_cluster::{ClusterOptions, ProcessCluster};

pub const SHARDS: u32 = 4;
pub const HEARTBEAT_MS: u64 = 100;
pub const ELECTION_MIN_MS: u64 = 500;
pub const ELECTION_MAX_MS: u64 = 1000;

/// How long writes to a shard may stay unavailable after its leader is killed: an election
/// takes at most `ELECTION_MAX_MS` after the last heartbeat (or ping), plus a vote round;
/// 3× that for a loaded 2-core CI machine.
pub fn failover_bound() -> std::time::Duration {
    std::time::Duration::from_millis(3 * (ELECTION_MAX_MS + 2 * HEARTBEAT_MS))
}

/// The `kvnode` binary.
pub const KVNODE: &str = env!("CARGO_BIN_EXE_kvnode");
/// The test-only binary that arms a planted bug (see `kvnode::planted`).
pub const KVNODE_PLANTED: &str = env!("CARGO_BIN_EXE_kvnode-planted");

/// Runs `kvctl --endpoints ENDPOINT ARGS...` (with `KVNODE_ENDPOINTS` unset) and returns its
/// exit code, stdout and stderr.
pub async fn kvctl(endpoint: impl std::fmt::Display, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kvctl"))
        .arg("--endpoints")
        .arg(endpoint.to_string())
        .args(args)
        .env_remove("KVNODE_ENDPOINTS")
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// A [`ProcessCluster`] of this package's `kvnode` (its methods through `Deref`).
pub struct Cluster(ProcessCluster);

impl Deref for Cluster {
    type Target = ProcessCluster;

    fn deref(&self) -> &ProcessCluster {
        &self.0
    }
}

impl DerefMut for Cluster {
    fn deref_mut(&mut self) -> &mut ProcessCluster {
        &mut self.0
    }
}

impl Cluster {
    /// Starts `n` nodes and waits until each answers `Status`.
    pub async fn start(n: u64) -> Cluster {
        Self::start_with_env(n, &[]).await
    }

    /// [`Cluster::start`] with extra environment variables for every node (e.g. a planted bug).
    /// With `KVNODE_PLANTED_BUG` among them, the nodes run the test-only binary that arms it.
    pub async fn start_with_env(n: u64, env: &[(&str, &str)]) -> Cluster {
        let planted = env.iter().any(|(k, _)| *k == "KVNODE_PLANTED_BUG");
        Self::start_binary(n, env, if planted { KVNODE_PLANTED } else { KVNODE }).await
    }

    /// [`Cluster::start_with_env`] running `binary` for every node: `SHARDS` shards, 100 ms
    /// heartbeats, 500–1000 ms elections, 2 s request timeout, `RUST_LOG=info,openraft=warn`.
    pub async fn start_binary(n: u64, env: &[(&str, &str)], binary: &'static str) -> Cluster {
        let mut options = ClusterOptions::new(binary, n);
        options.shards = SHARDS;
        options.heartbeat_ms = HEARTBEAT_MS;
        options.election_timeout_ms = (ELECTION_MIN_MS, ELECTION_MAX_MS);
        options.request_timeout_ms = 2000;
        options.env = std::iter::once(("RUST_LOG", "info,openraft=warn"))
            .chain(env.iter().copied())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Cluster(ProcessCluster::start(options).await)
    }
}

/// Three nodes in this process over real loopback sockets (`kvnode_testkit::LocalCluster`),
/// one shard replicated on all of them: for tests that need the peer transport's fault hooks
/// (`Peers::cut_off`, `Peers::cut_off_outbound`), which a separate process cannot reach.
pub struct InProcess {
    _dir: tempfile::TempDir,
    pub local: kvnode_testkit::LocalCluster,
}

impl InProcess {
    /// The only shard: every key lives in it.
    pub const SHARD: u64 = 0;

    /// Starts nodes 1..=3 (100 ms heartbeats, 400–800 ms elections) with `configure` applied
    /// last.
    pub async fn start(configure: impl Fn(&mut kvnode::Config)) -> InProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let local = kvnode_testkit::LocalCluster::start(dir.path(), 3, |config| {
            config.shards = 1;
            configure(config);
        })
        .await;
        InProcess { _dir: dir, local }
    }

    /// Node `id`'s view of the shard.
    pub fn view(&self, id: u64) -> kvnode::shard::ShardView {
        self.local
            .node(id)
            .local_shard(Self::SHARD)
            .expect("every node hosts the shard")
            .view()
    }

    /// True while node `id`'s replica of the shard has its timers off.
    pub fn hibernating(&self, id: u64) -> bool {
        self.view(id).hibernating
    }

    /// Waits until the replicas on `ids` all hibernate at once.
    pub async fn wait_hibernating(&self, ids: &[u64], timeout: Duration) {
        let what = format!("nodes {ids:?} hibernating");
        kvnode_testkit::eventually(timeout, &what, || async {
            ids.iter().all(|id| self.hibernating(*id)).then_some(())
        })
        .await
    }

    /// Waits until one of `among` leads the shard and the others of `among` know it.
    pub async fn leader_among(&self, among: &[u64], timeout: Duration) -> u64 {
        let what = format!("a leader among nodes {among:?}");
        kvnode_testkit::eventually(timeout, &what, || async {
            let leader = *among.iter().find(|id| self.view(**id).role == "leader")?;
            among
                .iter()
                .all(|id| self.view(*id).leader == Some(leader))
                .then_some(leader)
        })
        .await
    }

    /// Retries a put through each of `among` in turn until one succeeds.
    pub async fn put_through(&self, among: &[u64], key: &[u8], value: &[u8], timeout: Duration) {
        let what = format!("a put through one of nodes {among:?}");
        kvnode_testkit::eventually(timeout, &what, || async {
            for id in among {
                if self.local.node(*id).put(key, value.to_vec()).await.is_ok() {
                    return Some(());
                }
            }
            None
        })
        .await
    }

    /// Stops every node.
    pub async fn close(self) {
        self.local.close().await
    }
}
