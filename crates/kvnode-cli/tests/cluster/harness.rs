//! Starts, kills, terminates and restarts real `kvnode` processes on loopback, and talks to
//! them with the generated gRPC client.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kvnode::pb::kv::kv_client::KvClient;
use kvnode::pb::kv::{
    GetRequest, GetResponse, PutRequest, ReadLevel, ReadOptions, StatusRequest, StatusResponse,
    WriteReceipt,
};
use kvnode::sharding::HashRing;
use tonic::transport::Channel;

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

struct Proc {
    child: Option<Child>,
    addr: String,
    data_dir: PathBuf,
    log: PathBuf,
}

pub struct Cluster {
    _dir: tempfile::TempDir,
    peers: String,
    nodes: BTreeMap<u64, Proc>,
    ring: HashRing,
    /// Nodes stopped with SIGSTOP (`pause`) and not yet resumed.
    paused: BTreeSet<u64>,
    /// Extra environment of every node process.
    env: Vec<(String, String)>,
    /// The node binary.
    binary: &'static str,
}

/// The `kvnode` binary.
pub const KVNODE: &str = env!("CARGO_BIN_EXE_kvnode");
/// The test-only binary that arms a planted bug (see `kvnode::planted`).
pub const KVNODE_PLANTED: &str = env!("CARGO_BIN_EXE_kvnode-planted");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
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

    /// [`Cluster::start_with_env`] running `binary` for every node.
    pub async fn start_binary(n: u64, env: &[(&str, &str)], binary: &'static str) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            nodes.insert(
                id,
                Proc {
                    child: None,
                    addr: format!("127.0.0.1:{}", free_port()),
                    data_dir: dir.path().join(format!("node-{id}")),
                    log: dir.path().join(format!("node-{id}.log")),
                },
            );
        }
        let peers = nodes
            .iter()
            .map(|(id, p)| format!("{id}={}", p.addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Cluster {
            _dir: dir,
            peers,
            nodes,
            ring: HashRing::with_shards(SHARDS).expect("ring"),
            paused: BTreeSet::new(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            binary,
        };
        let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
        for id in &ids {
            cluster.spawn(*id);
        }
        for id in ids {
            cluster.wait_answering(id, Duration::from_secs(30)).await;
        }
        cluster
    }

    fn spawn(&mut self, id: u64) {
        let peers = self.peers.clone();
        let p = self.nodes.get_mut(&id).expect("known node");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&p.log)
            .expect("log file");
        let child = Command::new(self.binary)
            .args(["--id", &id.to_string(), "--peers", &peers])
            .arg("--data-dir")
            .arg(&p.data_dir)
            .args(["--shards", &SHARDS.to_string()])
            .args(["--heartbeat-ms", &HEARTBEAT_MS.to_string()])
            .args([
                "--election-timeout-ms",
                &format!("{ELECTION_MIN_MS}..{ELECTION_MAX_MS}"),
            ])
            .args(["--request-timeout-ms", "2000"])
            .env("RUST_LOG", "info,openraft=warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(log.try_clone().expect("log handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn kvnode");
        p.child = Some(child);
    }

    pub fn addr(&self, id: u64) -> String {
        self.nodes[&id].addr.clone()
    }

    /// A new connection to `id`'s client API.
    pub async fn client(&self, id: u64) -> Result<KvClient<Channel>, tonic::Status> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr(id)))
            .expect("endpoint")
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(5));
        endpoint
            .connect()
            .await
            .map(KvClient::new)
            .map_err(|e| tonic::Status::unavailable(e.to_string()))
    }

    pub async fn status(&self, id: u64) -> Option<StatusResponse> {
        let mut c = self.client(id).await.ok()?;
        c.status(StatusRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    async fn wait_answering(&self, id: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.status(id).await.is_none() {
            assert!(
                Instant::now() < deadline,
                "node {id} never answered:\n{}",
                self.log_tail(id)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn alive(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, p)| p.child.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Waits until every shard has a leader that is alive.
    pub async fn wait_all_shards_led(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let mut led = 0;
            for shard in 0..u64::from(SHARDS) {
                if let Some(l) = self.leader_of(shard).await
                    && self.alive().contains(&l)
                {
                    led += 1;
                }
            }
            if led == SHARDS {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not every shard elected a leader:\n{}",
                self.all_logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every replica on every running node reports its group hibernating.
    pub async fn wait_all_hibernating(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let mut awake = Vec::new();
            for id in self.alive() {
                match self.status(id).await {
                    Some(s) => awake.extend(
                        s.shards
                            .iter()
                            .filter(|v| !v.role.is_empty() && !v.hibernating)
                            .map(|v| format!("n{id}/shard {} ({})", v.shard, v.role)),
                    ),
                    None => awake.push(format!("n{id} (no status)")),
                }
            }
            if awake.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replicas still awake after {timeout:?}: {awake:?}\n{}",
                self.all_logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn shard_of(&self, key: &[u8]) -> u64 {
        self.ring.shard_for(key)
    }

    /// The node that reports itself leader of `shard`.
    pub async fn leader_of(&self, shard: u64) -> Option<u64> {
        for id in self.alive() {
            if let Some(s) = self.status(id).await
                && s.shards
                    .iter()
                    .any(|v| v.shard == shard && v.role == "leader")
            {
                return Some(id);
            }
        }
        None
    }

    /// A key's shard, its leader and one follower of it.
    pub async fn leader_and_follower(&self, key: &[u8]) -> (u64, u64, u64) {
        let shard = self.shard_of(key).await;
        let leader = self.leader_of(shard).await.expect("a leader");
        let replicas = self.replicas(shard).await;
        assert_eq!(replicas.len(), 3, "shard {shard} replicas {replicas:?}");
        let follower = replicas
            .into_iter()
            .find(|r| *r != leader)
            .expect("a follower");
        (shard, leader, follower)
    }

    pub async fn replicas(&self, shard: u64) -> Vec<u64> {
        for id in self.alive() {
            if let Some(s) = self.status(id).await {
                return s
                    .shards
                    .into_iter()
                    .find(|v| v.shard == shard)
                    .map(|v| v.replicas)
                    .unwrap_or_default();
            }
        }
        Vec::new()
    }

    pub async fn put(&self, node: u64, key: &[u8], value: &[u8]) -> Result<(), tonic::Status> {
        let mut c = self.client(node).await?;
        c.put(PutRequest {
            key: key.to_vec(),
            value: value.to_vec(),
        })
        .await
        .map(|_| ())
    }

    /// Retries a put through `node` until it succeeds; returns the time from the first try.
    pub async fn put_until_ok(
        &self,
        node: u64,
        key: &[u8],
        value: &[u8],
        timeout: Duration,
    ) -> Result<Duration, String> {
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < timeout {
            match self.put(node, key, value).await {
                Ok(()) => return Ok(started.elapsed()),
                Err(e) => last = format!("{}: {}", e.code(), e.message()),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(format!(
            "no successful put within {timeout:?}; last error {last}\n{}",
            self.all_logs()
        ))
    }

    async fn get(
        &self,
        node: u64,
        key: &[u8],
        level: ReadLevel,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut c = self.client(node).await?;
        let r = c
            .get(GetRequest {
                key: key.to_vec(),
                options: Some(ReadOptions {
                    level: level as i32,
                    ..Default::default()
                }),
            })
            .await?
            .into_inner();
        Ok(r.value.map(|v| v.value))
    }

    pub async fn get_linearizable(
        &self,
        node: u64,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        self.get(node, key, ReadLevel::Linearizable).await
    }

    pub async fn get_eventual(
        &self,
        node: u64,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        self.get(node, key, ReadLevel::Eventual).await
    }

    /// Waits until `node`'s replica of `shard` has applied what the shard's leader committed.
    pub async fn wait_caught_up(&self, node: u64, shard: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let leader = self.leader_of(shard).await;
            let view = |s: Option<StatusResponse>| {
                s.and_then(|s| s.shards.into_iter().find(|v| v.shard == shard))
            };
            if let Some(leader) = leader {
                let target = view(self.status(leader).await).map(|v| v.commit_index);
                let mine = view(self.status(node).await);
                match (target, mine) {
                    (Some(t), Some(m)) if m.role.is_empty() => {
                        let _ = t;
                        return; // no replica of this shard on `node`
                    }
                    (Some(t), Some(m)) if m.applied_index >= t && t > 0 => return,
                    _ => {}
                }
            }
            assert!(
                Instant::now() < deadline,
                "node {node} did not catch up on shard {shard}:\n{}",
                self.all_logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self, id: u64) {
        self.paused.remove(&id);
        if let Some(mut child) = self.nodes.get_mut(&id).and_then(|p| p.child.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit (up to 20 s).
    pub async fn terminate(&mut self, id: u64) -> ExitStatus {
        if self.paused.contains(&id) {
            self.resume(id);
        }
        let mut child = self
            .nodes
            .get_mut(&id)
            .and_then(|p| p.child.take())
            .expect("running node");
        let pid = child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("node {id} ignored SIGTERM for 20 s:\n{}", self.log_tail(id));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts a stopped node again with the same flags and data dir.
    pub async fn restart(&mut self, id: u64) {
        self.spawn(id);
        self.wait_answering(id, Duration::from_secs(30)).await;
    }

    /// The OS process id of a running node.
    pub fn pid(&self, id: u64) -> u32 {
        self.nodes[&id].child.as_ref().expect("running node").id()
    }

    /// SIGSTOP: the process stays alive (its sockets accept connections) but runs nothing
    /// until [`Cluster::resume`]. Do not ask a paused node for its status.
    pub fn pause(&mut self, id: u64) {
        signal("-STOP", self.pid(id));
        self.paused.insert(id);
    }

    /// SIGCONT for a node stopped with [`Cluster::pause`].
    pub fn resume(&mut self, id: u64) {
        signal("-CONT", self.pid(id));
        self.paused.remove(&id);
    }

    /// A put through `node` that returns the write's receipt.
    pub async fn put_with_receipt(
        &self,
        node: u64,
        key: &[u8],
        value: &[u8],
    ) -> Result<WriteReceipt, tonic::Status> {
        let mut c = self.client(node).await?;
        let r = c
            .put(PutRequest {
                key: key.to_vec(),
                value: value.to_vec(),
            })
            .await?
            .into_inner();
        r.receipt
            .ok_or_else(|| tonic::Status::internal("a put reply without a receipt"))
    }

    /// A get through `node` with explicit read options; the whole reply (value and receipt).
    pub async fn get_with(
        &self,
        node: u64,
        key: &[u8],
        options: ReadOptions,
    ) -> Result<GetResponse, tonic::Status> {
        let mut c = self.client(node).await?;
        c.get(GetRequest {
            key: key.to_vec(),
            options: Some(options),
        })
        .await
        .map(|r| r.into_inner())
    }

    pub async fn stop_all(&mut self) {
        for id in self.alive() {
            let status = self.terminate(id).await;
            assert!(
                status.success(),
                "node {id} exited with {status:?}:\n{}",
                self.log_tail(id)
            );
        }
    }

    fn log_tail(&self, id: u64) -> String {
        let text = std::fs::read_to_string(&self.nodes[&id].log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(40);
        format!(
            "--- node {id} log (last {} lines) ---\n{}",
            lines.len() - start,
            lines[start..].join("\n")
        )
    }

    pub fn all_logs(&self) -> String {
        self.nodes
            .keys()
            .map(|id| self.log_tail(*id))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.all_logs());
        }
        for id in std::mem::take(&mut self.paused) {
            if let Some(child) = self.nodes.get(&id).and_then(|p| p.child.as_ref()) {
                let _ = Command::new("kill")
                    .args(["-CONT", &child.id().to_string()])
                    .status();
            }
        }
        for p in self.nodes.values_mut() {
            if let Some(mut child) = p.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Sends `signal` (as `kill` spells it, e.g. `-STOP`) to `pid`.
fn signal(signal: &str, pid: u32) {
    let sent = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(sent.success(), "kill {signal} {pid}: {sent:?}");
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
