//! Raft peer networks: [`Peers`] holds one gRPC channel per other node, shared by every shard;
//! [`ShardNetwork`] is one shard's openraft network over those channels (the shard id goes in
//! every message). [`NoPeers`] is the network of an embedded single-node store: every shard's
//! only voter is this node, so no message ever needs to leave the process, and any attempt
//! answers `Unreachable` (which makes openraft back off instead of retrying hot).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, RaftNetworkV2};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::raft::{Snapshot, TypeConfig, Vote};
use crate::storage::SnapshotFile;

/// The network of a node with no peers.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoPeers;

/// Why [`NoPeers`] refuses to send.
#[derive(Debug, thiserror::Error)]
#[error("node {target} is not reachable: this node runs without a peer transport")]
pub struct NoTransport {
    target: u64,
}

/// A client of [`NoPeers`] for one target.
#[derive(Debug, Clone, Copy)]
pub struct NoPeerClient {
    target: u64,
}

impl NoPeerClient {
    fn unreachable(&self) -> Unreachable<TypeConfig> {
        Unreachable::new(&NoTransport {
            target: self.target,
        })
    }
}

impl RaftNetworkFactory<TypeConfig> for NoPeers {
    type Network = NoPeerClient;

    async fn new_client(&mut self, target: u64, _node: &openraft::BasicNode) -> NoPeerClient {
        NoPeerClient { target }
    }
}

impl RaftNetworkV2<TypeConfig> for NoPeerClient {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        Err(self.unreachable().into())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        Err(self.unreachable().into())
    }

    async fn full_snapshot(
        &mut self,
        _vote: Vote,
        _snapshot: Snapshot,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        Err(self.unreachable().into())
    }
}

/// One lazily connected gRPC channel per other node of the cluster, shared by every shard's
/// Raft traffic and by request forwarding. HTTP/2 multiplexes all of it over one connection.
#[derive(Debug)]
pub struct Peers {
    self_id: u64,
    cluster_id: String,
    addrs: BTreeMap<u64, String>,
    channels: BTreeMap<u64, Channel>,
    rpc_timeout: Duration,
}

impl Peers {
    /// Channels to every peer in `config.peers` except this node. Nothing connects yet.
    pub fn new(config: &Config) -> Result<Arc<Peers>> {
        let mut channels = BTreeMap::new();
        for (id, addr) in &config.peers {
            if *id == config.node_id {
                continue;
            }
            let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| Error::InvalidArgument(format!("peer {id} address {addr:?}: {e}")))?
                .connect_timeout(Duration::from_millis(config.heartbeat_interval_ms.max(500)))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true);
            channels.insert(*id, endpoint.connect_lazy());
        }
        Ok(Arc::new(Peers {
            self_id: config.node_id,
            cluster_id: config.cluster_id.clone(),
            addrs: config.peers.clone(),
            channels,
            rpc_timeout: config.request_timeout(),
        }))
    }

    /// This node's id.
    pub fn self_id(&self) -> u64 {
        self.self_id
    }

    /// The cluster's name (sent in every peer message).
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The channel to `node`, if it is a peer.
    pub fn channel(&self, node: u64) -> Option<Channel> {
        self.channels.get(&node).cloned()
    }

    /// `node`'s address as configured.
    pub fn addr(&self, node: u64) -> Option<&str> {
        self.addrs.get(&node).map(String::as_str)
    }

    /// Every node id of the cluster, this one included.
    pub fn node_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.addrs.keys().copied()
    }

    /// Deadline for one request to a peer.
    pub fn rpc_timeout(&self) -> Duration {
        self.rpc_timeout
    }
}

/// One shard's openraft network over the shared [`Peers`] channels.
#[derive(Debug, Clone)]
pub struct ShardNetwork {
    peers: Arc<Peers>,
    shard: u64,
}

impl ShardNetwork {
    /// The network of `shard`.
    pub fn new(peers: Arc<Peers>, shard: u64) -> ShardNetwork {
        ShardNetwork { peers, shard }
    }
}

impl RaftNetworkFactory<TypeConfig> for ShardNetwork {
    type Network = NoPeerClient;

    async fn new_client(&mut self, target: u64, _node: &openraft::BasicNode) -> NoPeerClient {
        let _ = (&self.peers, self.shard);
        NoPeerClient { target }
    }
}
