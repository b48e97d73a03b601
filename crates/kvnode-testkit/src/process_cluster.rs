//! A cluster of real `kvnode` processes on loopback for tests and benches, built on
//! [`Processes`] (the harness the Jepsen runner uses too): start, SIGKILL, SIGTERM, SIGSTOP /
//! SIGCONT and restart on the same address and data, the nodes' log tails, and the gRPC calls
//! the end-to-end tests make (status, put, get at a level, waiting for leaders, catch-up and
//! hibernation).
//!
//! Every node's port is picked by the kernel (a bind of port 0) and held by a
//! [`PortReservation`] while the cluster lives: no fixed port ranges, and no other process can
//! take a node's port between its start and a restart.
//!
//! The binary is a parameter: the tests of `kvnode-cli` pass `CARGO_BIN_EXE_kvnode` (or
//! `kvnode-planted`), the benches the release binary.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use kvnode::pb::kv::kv_client::KvClient;
use kvnode::pb::kv::{
    GetRequest, GetResponse, PutRequest, ReadLevel, ReadOptions, StatusRequest, StatusResponse,
    WriteReceipt,
};
use kvnode::sharding::HashRing;
use tonic::transport::Channel;

use crate::ports::PortReservation;
use crate::processes::{ClusterSpec, NodeSpec, ProcessError, Processes};

/// How to start a [`ProcessCluster`]: the binary, the node count, and the flags every node
/// gets. [`ClusterOptions::new`] gives kvnode's own defaults.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The `kvnode` binary (or a test build of it).
    pub binary: PathBuf,
    /// Nodes `1..=nodes`.
    pub nodes: u64,
    /// `--shards`.
    pub shards: u32,
    /// `--heartbeat-ms`.
    pub heartbeat_ms: u64,
    /// `--election-timeout-ms MIN..MAX`.
    pub election_timeout_ms: (u64, u64),
    /// `--request-timeout-ms`.
    pub request_timeout_ms: u64,
    /// Extra environment of every node process (e.g. `RUST_LOG`, `KVNODE_PLANTED_BUG`).
    pub env: Vec<(String, String)>,
    /// Where the run's temporary directory (data and logs) is made; `None`: the system's.
    pub parent_dir: Option<PathBuf>,
}

impl ClusterOptions {
    /// `nodes` nodes of `binary` with kvnode's default flags.
    pub fn new(binary: impl Into<PathBuf>, nodes: u64) -> ClusterOptions {
        let defaults = kvnode::Config::default();
        ClusterOptions {
            binary: binary.into(),
            nodes,
            shards: defaults.shards,
            heartbeat_ms: defaults.heartbeat_interval_ms,
            election_timeout_ms: (
                defaults.election_timeout_min_ms,
                defaults.election_timeout_max_ms,
            ),
            request_timeout_ms: defaults.request_timeout_ms,
            env: Vec::new(),
            parent_dir: None,
        }
    }
}

/// Real `kvnode` processes, nodes `1..=n`, each with its data directory and log file in a
/// temporary directory. Dropping it kills whatever still runs (after printing every node's
/// log tail if the thread is panicking).
pub struct ProcessCluster {
    // Dropped first: the processes die before their directory goes.
    processes: Processes,
    ring: HashRing,
    shards: u32,
    /// Every node's port, held while the cluster lives (restarts bind it again).
    _ports: Vec<PortReservation>,
    /// The settings every node shares (for a node started later with `--join`).
    spec: ClusterSpec,
    dir: tempfile::TempDir,
}

impl ProcessCluster {
    /// Spawns the nodes and returns at once (see [`ProcessCluster::start`] to wait for them).
    pub fn spawn(options: ClusterOptions) -> Result<ProcessCluster, ProcessError> {
        let io = |path: PathBuf| move |source| ProcessError::Io { path, source };
        let dir = match &options.parent_dir {
            Some(parent) => tempfile::tempdir_in(parent).map_err(io(parent.clone()))?,
            None => tempfile::tempdir().map_err(io(std::env::temp_dir()))?,
        };
        let ports = (1..=options.nodes)
            .map(|_| PortReservation::new().map_err(io(dir.path().to_path_buf())))
            .collect::<Result<Vec<_>, _>>()?;
        let addrs: BTreeMap<u64, SocketAddr> = (1..=options.nodes)
            .zip(&ports)
            .map(|(id, p)| (id, p.addr()))
            .collect();
        let peers: BTreeMap<u64, String> =
            addrs.iter().map(|(id, a)| (*id, a.to_string())).collect();
        let nodes = addrs
            .iter()
            .map(|(id, listen)| NodeSpec {
                id: *id,
                listen: *listen,
                peers: peers.clone(),
                source_ip: None,
                data_dir: dir.path().join(format!("node-{id}")),
                log: dir.path().join(format!("node-{id}.log")),
            })
            .collect();
        let defaults = kvnode::Config::default();
        let spec = ClusterSpec {
            binary: options.binary,
            cluster_id: defaults.cluster_id,
            shards: options.shards,
            replication_factor: defaults.replication_factor,
            heartbeat_ms: options.heartbeat_ms,
            election_timeout_ms: options.election_timeout_ms,
            hibernate_after_ms: defaults.hibernate_after_ms,
            request_timeout_ms: options.request_timeout_ms,
            env: options.env,
        };
        let ring = HashRing::with_shards(options.shards).map_err(|e| ProcessError::Io {
            path: dir.path().to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(ProcessCluster {
            processes: Processes::start(spec.clone(), nodes)?,
            spec,
            ring,
            shards: options.shards,
            _ports: ports,
            dir,
        })
    }

    /// Spawns the nodes and waits until each answers `Status` (panics after 30 s).
    pub async fn start(options: ClusterOptions) -> ProcessCluster {
        let cluster = ProcessCluster::spawn(options).expect("start the kvnode processes");
        for id in cluster.ids() {
            cluster.wait_answering(id, Duration::from_secs(30)).await;
        }
        cluster
    }

    /// The node ids.
    pub fn ids(&self) -> Vec<u64> {
        self.processes.ids()
    }

    /// The run's directory (data directories and logs).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Node `id`'s client (and peer) address.
    pub fn addr(&self, id: u64) -> String {
        self.processes
            .spec(id)
            .expect("known node")
            .listen
            .to_string()
    }

    /// Every node's address, for a client's seed list.
    pub fn seeds(&self) -> Vec<String> {
        self.ids().into_iter().map(|id| self.addr(id)).collect()
    }

    /// Fails if a node's process has exited on its own (a bad flag, a port taken).
    pub fn check_running(&mut self) -> Result<(), String> {
        for id in self.ids() {
            if let Some(status) = self.processes.try_exit(id) {
                return Err(format!("node {id} exited early ({status})"));
            }
        }
        Ok(())
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

    /// Node `id`'s `Status`, or `None` if it does not answer.
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
        self.ids()
            .into_iter()
            .filter(|id| self.processes.has_process(*id))
            .collect()
    }

    /// Waits until every shard has a leader that is alive.
    pub async fn wait_all_shards_led(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let mut led = 0;
            for shard in 0..u64::from(self.shards) {
                if let Some(l) = self.leader_of(shard).await
                    && self.alive().contains(&l)
                {
                    led += 1;
                }
            }
            if led == self.shards {
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

    /// The key's shard.
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

    /// The replicas of `shard`, as the first node that answers reports them.
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

    /// A put through `node`.
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

    /// A linearizable get through `node`.
    pub async fn get_linearizable(
        &self,
        node: u64,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        self.get(node, key, ReadLevel::Linearizable).await
    }

    /// An eventual get through `node`.
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
                    (Some(_), Some(m)) if m.role.is_empty() => {
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
        self.processes.kill(id).expect("kill -9");
    }

    /// SIGTERM, then waits for the exit (up to 20 s; then SIGKILL and a panic).
    pub async fn terminate(&mut self, id: u64) -> ExitStatus {
        assert!(self.processes.has_process(id), "node {id} is not running");
        self.processes.terminate(id).expect("kill -TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.processes.try_exit(id) {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.processes.kill(id);
                panic!("node {id} ignored SIGTERM for 20 s:\n{}", self.log_tail(id));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts a stopped node again with the same flags and data dir.
    pub async fn restart(&mut self, id: u64) {
        self.processes.restart(id).expect("restart kvnode");
        self.wait_answering(id, Duration::from_secs(30)).await;
    }

    /// The OS process id of a running node.
    pub fn pid(&self, id: u64) -> u32 {
        self.processes.pid(id).expect("running node")
    }

    /// SIGSTOP: the process stays alive (its sockets accept connections) but runs nothing
    /// until [`ProcessCluster::resume`]. Do not ask a paused node for its status.
    pub fn pause(&mut self, id: u64) {
        assert!(self.processes.has_process(id), "node {id} is not running");
        self.processes.pause(id).expect("kill -STOP");
    }

    /// SIGCONT for a node stopped with [`ProcessCluster::pause`].
    pub fn resume(&mut self, id: u64) {
        assert!(self.processes.has_process(id), "node {id} is not running");
        self.processes.resume(id).expect("kill -CONT");
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

    /// SIGTERM to every running node; panics unless each exits 0 within 20 s.
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

    /// SIGTERM to every running node at once, then waits for each (SIGKILL after 20 s): each
    /// node's exit status, `None` for one that had to be killed.
    pub async fn stop(&mut self) -> Vec<(u64, Option<ExitStatus>)> {
        let running = self.alive();
        for id in &running {
            let _ = self.processes.terminate(*id);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut exits = Vec::new();
        for id in running {
            let status = loop {
                if let Some(status) = self.processes.try_exit(id) {
                    break Some(status);
                }
                if Instant::now() > deadline {
                    let _ = self.processes.kill(id);
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            exits.push((id, status));
        }
        exits
    }

    /// The last `lines` lines of node `id`'s log, under a header.
    pub fn log_tail_lines(&self, id: u64, lines: usize) -> String {
        let path = self
            .processes
            .spec(id)
            .map(|s| s.log.clone())
            .unwrap_or_default();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let start = all.len().saturating_sub(lines);
        format!(
            "--- node {id} log ({}, last {} lines) ---\n{}",
            path.display(),
            all.len() - start,
            all[start..].join("\n")
        )
    }

    fn log_tail(&self, id: u64) -> String {
        self.log_tail_lines(id, 40)
    }

    /// The last 40 lines of every node's log.
    pub fn all_logs(&self) -> String {
        self.ids()
            .into_iter()
            .map(|id| self.log_tail(id))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl ProcessCluster {
    /// A node that is not (yet) part of the cluster, named `name`, with its own port, data
    /// directory and log in the run's directory, and the cluster's shared flags. Nothing
    /// runs until [`ExtraNode::start`].
    pub fn extra_node(&self, name: &str) -> ExtraNode {
        let port = PortReservation::new().expect("reserve a port");
        ExtraNode {
            spec: self.spec.clone(),
            listen: port.addr(),
            _port: port,
            data_dir: self.dir().join(name),
            log: self.dir().join(format!("{name}.log")),
            child: None,
        }
    }
}

/// A `kvnode` process started beside a [`ProcessCluster`] with flags of the test's choosing
/// (e.g. `--join`): its port is held while it lives, its output goes to its log file
/// (appended across starts), and dropping it kills the process.
pub struct ExtraNode {
    spec: ClusterSpec,
    listen: SocketAddr,
    _port: PortReservation,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    child: Option<tokio::process::Child>,
}

impl ExtraNode {
    /// Its client and peer address.
    pub fn addr(&self) -> String {
        self.listen.to_string()
    }

    /// Starts `kvnode --listen ADDR --data-dir DIR` with the cluster's timing flags and
    /// `extra` (e.g. `["--join", addr]`).
    pub fn start(&mut self, extra: &[&str]) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the log");
        let log_err = log.try_clone().expect("clone the log");
        let (emin, emax) = self.spec.election_timeout_ms;
        let child = tokio::process::Command::new(&self.spec.binary)
            .args(["--listen", &self.addr()])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--heartbeat-ms", &self.spec.heartbeat_ms.to_string()])
            .args(["--election-timeout-ms", &format!("{emin}..{emax}")])
            .args([
                "--hibernate-after-ms",
                &self.spec.hibernate_after_ms.to_string(),
            ])
            .args([
                "--request-timeout-ms",
                &self.spec.request_timeout_ms.to_string(),
            ])
            .args(extra)
            .envs(self.spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn kvnode");
        self.child = Some(child);
    }

    /// Waits until the process exits on its own (within `timeout`) and returns its status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let status = tokio::time::timeout(timeout, child.wait())
            .await
            .unwrap_or_else(|_| panic!("kvnode still runs after {timeout:?}:\n{}", self.log_text()))
            .expect("wait for kvnode");
        self.child = None;
        status
    }

    /// SIGKILL, and waits for the process to be gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// SIGTERM, and waits (20 s, then SIGKILL) for the process to exit.
    pub async fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Some(raw) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
            // SAFETY: `kill(2)` takes no pointers; the pid is our own child, not yet reaped
            // (`wait` has not returned), so the signal cannot reach another process.
            unsafe {
                libc::kill(raw, libc::SIGTERM);
            }
        }
        match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                let _ = child.kill().await;
                None
            }
        }
    }

    /// Everything the process logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.all_logs());
        }
        // `Processes` kills every process it still has (SIGKILL works on stopped ones too).
    }
}
