//! What the harness asks the running nodes, over the client API's `Status` RPC: which node
//! leads each shard (to aim `primaries` faults) and whether every replica has caught up (to
//! wait for quiet before the final reads). Also makes the gRPC channels the harness uses.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};

use kvnode::pb::MAX_MESSAGE_BYTES;
use kvnode::pb::kv::kv_client::KvClient;
use kvnode::pb::kv::{StatusRequest, StatusResponse};

/// A client of one node with `timeout` on every request (the gRPC deadline too) and a short
/// connect timeout. The channel connects lazily and reconnects by itself.
pub fn kv_client(addr: SocketAddr, timeout: Duration) -> KvClient<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .expect("a socket address is a valid URI")
        .connect_timeout(Duration::from_millis(500).min(timeout))
        .timeout(timeout)
        .tcp_nodelay(true);
    KvClient::new(endpoint.connect_lazy())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// The nodes' own view of the cluster.
#[derive(Debug, Clone)]
pub struct Probe {
    clients: BTreeMap<u64, KvClient<Channel>>,
}

/// Every node's answer to `Status` (nodes that did not answer are missing).
pub type Statuses = BTreeMap<u64, StatusResponse>;

impl Probe {
    /// A probe of the nodes at `addrs` (node id → client address).
    pub fn new(addrs: &BTreeMap<u64, SocketAddr>) -> Probe {
        Probe {
            clients: addrs
                .iter()
                .map(|(id, addr)| (*id, kv_client(*addr, Duration::from_millis(500))))
                .collect(),
        }
    }

    /// Asks every node for its status, concurrently.
    pub async fn statuses(&self) -> Statuses {
        let asks = self.clients.iter().map(|(id, client)| {
            let mut client = client.clone();
            async move {
                let reply = client.status(StatusRequest {}).await.ok()?;
                Some((*id, reply.into_inner()))
            }
        });
        futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Shard → the node that says it leads it (in the highest term, if several do).
    pub fn leaders(statuses: &Statuses) -> BTreeMap<u64, u64> {
        let mut best: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        for (node, status) in statuses {
            for shard in &status.shards {
                if shard.role == "leader" {
                    let slot = best.entry(shard.shard).or_insert((shard.term, *node));
                    if shard.term > slot.0 {
                        *slot = (shard.term, *node);
                    }
                }
            }
        }
        best.into_iter().map(|(s, (_, n))| (s, n)).collect()
    }

    /// What keeps the cluster from being quiet, or `None` if it is: every shard has one
    /// leader, every node answered, and every replica has applied the leader's commit index.
    pub fn unsettled(statuses: &Statuses, nodes: usize) -> Option<String> {
        if statuses.len() < nodes {
            return Some(format!("{} of {nodes} nodes answered", statuses.len()));
        }
        let leaders = Probe::leaders(statuses);
        let shard_count = statuses
            .values()
            .next()
            .map_or(0, |s| u64::from(s.shard_count));
        for shard in 0..shard_count {
            let Some(leader) = leaders.get(&shard) else {
                return Some(format!("shard {shard} has no leader"));
            };
            let Some(commit) = statuses[leader]
                .shards
                .iter()
                .find(|s| s.shard == shard)
                .map(|s| s.commit_index)
            else {
                return Some(format!("shard {shard}: leader {leader} did not report it"));
            };
            for (node, status) in statuses {
                if let Some(s) = status
                    .shards
                    .iter()
                    .find(|s| s.shard == shard && !s.role.is_empty())
                    && s.applied_index < commit
                {
                    return Some(format!(
                        "shard {shard}: node {node} applied {} of leader {leader}'s commit {commit}",
                        s.applied_index
                    ));
                }
            }
        }
        None
    }

    /// Waits until the cluster is quiet ([`Probe::unsettled`] is `None`) or `timeout` passes;
    /// returns how long it took, or the last reason it was not quiet.
    pub async fn wait_quiet(&self, timeout: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        loop {
            let statuses = self.statuses().await;
            let reason = match Probe::unsettled(&statuses, self.clients.len()) {
                None => return Ok(started.elapsed()),
                Some(reason) => reason,
            };
            if started.elapsed() >= timeout {
                return Err(reason);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
