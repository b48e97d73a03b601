//! The real `kvnode` processes of a fault-test run: spawning each with fixed arguments, data
//! directory and log file, and the process faults the nemesis injects: `kill -9` and restart
//! with the same arguments and data, SIGSTOP and SIGCONT. Only processes this module spawned
//! are ever signalled.
//!
//! This is the workspace's one process harness: the Jepsen runner (`kvnode-jepsen`) drives it
//! directly, and [`crate::process_cluster`] builds the tests' and benches' clusters on it.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Why a process could not be started or signalled.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// Spawning the binary failed.
    #[error("cannot start {binary} for node {node}: {source}")]
    Spawn {
        /// The node.
        node: u64,
        /// The binary.
        binary: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file or directory of the run could not be made.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Signalling a process failed.
    #[error("cannot send {signal} to node {node} (pid {pid}): {source}")]
    Signal {
        /// The node.
        node: u64,
        /// The process id.
        pid: u32,
        /// The signal's name.
        signal: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// No such node in this run.
    #[error("node {0} is not part of this run")]
    UnknownNode(u64),
}

/// The settings every node of a run shares.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// The `kvnode` binary.
    pub binary: PathBuf,
    /// The cluster's name.
    pub cluster_id: String,
    /// Shards.
    pub shards: u32,
    /// Replicas per shard.
    pub replication_factor: usize,
    /// Leader heartbeat interval.
    pub heartbeat_ms: u64,
    /// Election timeout range.
    pub election_timeout_ms: (u64, u64),
    /// Idle time before a shard group hibernates (0: never).
    pub hibernate_after_ms: u64,
    /// The nodes' request timeout.
    pub request_timeout_ms: u64,
    /// Extra environment for every node (e.g. `KVNODE_PLANTED_BUG`, `RUST_LOG`).
    pub env: Vec<(String, String)>,
}

/// One node's own settings.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// The node id.
    pub id: u64,
    /// Where it listens for clients and peers.
    pub listen: SocketAddr,
    /// Its `--peers` map.
    pub peers: BTreeMap<u64, String>,
    /// The IP its peer connections are sent from, if fixed.
    pub source_ip: Option<IpAddr>,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its log file (appended to across restarts).
    pub log: PathBuf,
}

#[derive(Debug)]
struct NodeProcess {
    spec: NodeSpec,
    child: Option<Child>,
    paused: bool,
    starts: u32,
}

/// The running nodes of a run.
#[derive(Debug)]
pub struct Processes {
    cluster: ClusterSpec,
    nodes: BTreeMap<u64, NodeProcess>,
}

impl Processes {
    /// Starts every node in `nodes`.
    pub fn start(cluster: ClusterSpec, nodes: Vec<NodeSpec>) -> Result<Processes, ProcessError> {
        let mut processes = Processes {
            cluster,
            nodes: nodes
                .into_iter()
                .map(|spec| {
                    (
                        spec.id,
                        NodeProcess {
                            spec,
                            child: None,
                            paused: false,
                            starts: 0,
                        },
                    )
                })
                .collect(),
        };
        let ids: Vec<u64> = processes.nodes.keys().copied().collect();
        for id in ids {
            processes.spawn(id)?;
        }
        Ok(processes)
    }

    /// The node ids.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// A node's settings.
    pub fn spec(&self, id: u64) -> Result<&NodeSpec, ProcessError> {
        Ok(&self.node(id)?.spec)
    }

    /// True if the node's process is alive (it may be paused).
    pub fn is_running(&mut self, id: u64) -> bool {
        let Some(node) = self.nodes.get_mut(&id) else {
            return false;
        };
        match node.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(Ok(Some(status))) => {
                tracing::warn!(node = id, %status, "kvnode exited on its own");
                node.child = None;
                false
            }
            Some(Err(_)) | None => false,
        }
    }

    /// True if the node is stopped with SIGSTOP.
    pub fn is_paused(&self, id: u64) -> bool {
        self.nodes.get(&id).is_some_and(|n| n.paused)
    }

    /// Times each node has been started.
    pub fn starts(&self, id: u64) -> u32 {
        self.nodes.get(&id).map_or(0, |n| n.starts)
    }

    fn node(&self, id: u64) -> Result<&NodeProcess, ProcessError> {
        self.nodes.get(&id).ok_or(ProcessError::UnknownNode(id))
    }

    fn spawn(&mut self, id: u64) -> Result<(), ProcessError> {
        let cluster = self.cluster.clone();
        let node = self
            .nodes
            .get_mut(&id)
            .ok_or(ProcessError::UnknownNode(id))?;
        let spec = &node.spec;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ProcessError::Io { path, source }
        };
        if let Some(parent) = spec.log.parent() {
            fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(&spec.log)
            .map_err(io(&spec.log))?;
        let log_err = log.try_clone().map_err(io(&spec.log))?;
        let peers = spec
            .peers
            .iter()
            .map(|(id, addr)| format!("{id}={addr}"))
            .collect::<Vec<_>>()
            .join(",");
        let (emin, emax) = cluster.election_timeout_ms;
        let mut command = Command::new(&cluster.binary);
        command
            .args(["--id", &id.to_string()])
            .args(["--listen", &spec.listen.to_string()])
            .args(["--peers", &peers])
            .arg("--data-dir")
            .arg(&spec.data_dir)
            .args(["--cluster-id", &cluster.cluster_id])
            .args(["--shards", &cluster.shards.to_string()])
            .args([
                "--replication-factor",
                &cluster.replication_factor.to_string(),
            ])
            .args(["--heartbeat-ms", &cluster.heartbeat_ms.to_string()])
            .args(["--election-timeout-ms", &format!("{emin}..{emax}")])
            .args([
                "--hibernate-after-ms",
                &cluster.hibernate_after_ms.to_string(),
            ])
            .args([
                "--request-timeout-ms",
                &cluster.request_timeout_ms.to_string(),
            ]);
        if let Some(ip) = spec.source_ip {
            command.args(["--peer-source-ip", &ip.to_string()]);
        }
        command
            .envs(cluster.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        let child = command.spawn().map_err(|source| ProcessError::Spawn {
            node: id,
            binary: cluster.binary.clone(),
            source,
        })?;
        tracing::debug!(node = id, pid = child.id(), "kvnode started");
        node.child = Some(child);
        node.paused = false;
        node.starts += 1;
        Ok(())
    }

    /// `kill -9`: the process dies at once, with whatever it had not made durable.
    pub fn kill(&mut self, id: u64) -> Result<(), ProcessError> {
        let node = self
            .nodes
            .get_mut(&id)
            .ok_or(ProcessError::UnknownNode(id))?;
        if let Some(mut child) = node.child.take() {
            // SIGKILL works on a stopped process too.
            let _ = child.kill();
            let _ = child.wait();
        }
        node.paused = false;
        Ok(())
    }

    /// Starts the node again with the same arguments and data directory, if it is not running.
    pub fn restart(&mut self, id: u64) -> Result<(), ProcessError> {
        if self.is_running(id) {
            return Ok(());
        }
        self.spawn(id)
    }

    /// SIGSTOP: the process freezes with its sockets open.
    pub fn pause(&mut self, id: u64) -> Result<(), ProcessError> {
        self.signal(id, libc::SIGSTOP, "SIGSTOP")?;
        if let Some(node) = self.nodes.get_mut(&id) {
            node.paused = true;
        }
        Ok(())
    }

    /// SIGCONT: a paused process goes on where it stopped.
    pub fn resume(&mut self, id: u64) -> Result<(), ProcessError> {
        self.signal(id, libc::SIGCONT, "SIGCONT")?;
        if let Some(node) = self.nodes.get_mut(&id) {
            node.paused = false;
        }
        Ok(())
    }

    fn signal(&mut self, id: u64, signal: i32, name: &'static str) -> Result<(), ProcessError> {
        if !self.is_running(id) {
            return Ok(());
        }
        let node = self.node(id)?;
        let Some(pid) = node.child.as_ref().map(Child::id) else {
            return Ok(());
        };
        let Ok(raw) = i32::try_from(pid) else {
            return Ok(());
        };
        // SAFETY: `kill(2)` takes no pointers; the pid is our own live child (not reaped, as
        // `is_running` just checked), so the signal cannot reach another process.
        let rc = unsafe { libc::kill(raw, signal) };
        if rc != 0 {
            return Err(ProcessError::Signal {
                node: id,
                pid,
                signal: name,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Ends every fault: resumes paused nodes and restarts stopped ones.
    pub fn heal(&mut self) -> Result<(), ProcessError> {
        for id in self.ids() {
            if self.is_paused(id) {
                self.resume(id)?;
            }
            self.restart(id)?;
        }
        Ok(())
    }

    /// Stops every node: SIGCONT, SIGTERM, then SIGKILL after `grace`.
    pub fn stop_all(&mut self, grace: Duration) {
        for id in self.ids() {
            let _ = self.resume(id);
            let _ = self.signal(id, libc::SIGTERM, "SIGTERM");
        }
        let deadline = Instant::now() + grace;
        for id in self.ids() {
            while self.is_running(id) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.kill(id);
        }
    }
}

/// What the test and bench clusters ([`crate::process_cluster`]) need besides the faults.
impl Processes {
    /// True if the node has a process that this harness has not killed or seen exit (it may
    /// have exited since; [`Processes::is_running`] checks).
    pub fn has_process(&self, id: u64) -> bool {
        self.nodes.get(&id).is_some_and(|n| n.child.is_some())
    }

    /// The OS process id of the node's process, if it has one.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.nodes.get(&id)?.child.as_ref().map(Child::id)
    }

    /// SIGTERM (after SIGCONT if the node is paused): a clean shutdown; see
    /// [`Processes::try_exit`].
    pub fn terminate(&mut self, id: u64) -> Result<(), ProcessError> {
        if self.is_paused(id) {
            self.resume(id)?;
        }
        self.signal(id, libc::SIGTERM, "SIGTERM")
    }

    /// The node's exit status once its process has exited (the process is then forgotten, as
    /// after [`Processes::kill`]); `None` while it runs or if it has no process.
    pub fn try_exit(&mut self, id: u64) -> Option<ExitStatus> {
        let node = self.nodes.get_mut(&id)?;
        let status = node.child.as_mut()?.try_wait().ok()??;
        node.child = None;
        node.paused = false;
        Some(status)
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for node in self.nodes.values_mut() {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
