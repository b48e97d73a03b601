//! A node's channels to the other nodes of its cluster, and the node-level calls over them:
//! pings ([`crate::hibernation`]), leadership confirmations ([`crate::leadership`]), a
//! follower's read-index request to a shard's leader, request forwarding, and the test-only
//! partitions (`cut_off`, `cut_off_outbound`). Each shard's openraft traffic goes over the
//! same channels through [`crate::raft::network::ShardNetwork`].

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::pb::raft::raft_transport_client::RaftTransportClient;
use crate::pb::raft::{
    ConfirmItem, ConfirmRequest, FetchMapRequest, PeerHeader, PingReply, PingRequest, RaftRequest,
};
use crate::storage::codec::decode_serde;

/// How often the same warning (same peer, same reason) may be logged.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Two lazily connected gRPC channels per other node of the cluster, each its own HTTP/2
/// connection: one shared by every shard's Raft traffic and the node-level messages (ping,
/// leadership confirmation, read index), one for client requests this node forwards.
///
/// Forwarded requests get their own connection so that they cannot disturb replication: a
/// client that gives up cancels its forwarded stream (`RST_STREAM`), and when the peer reads a
/// burst of those before accepting the streams (it was paused, or a partition healed), h2
/// closes the whole connection (GOAWAY `ENHANCE_YOUR_CALM`, "remotely-reset pending-accept
/// streams reached limit"), failing every stream on it. That now costs only forwarded
/// requests (whose failure their clients see, with its outcome), never a heartbeat or an
/// append. Both connections use the same settings and source address.
#[derive(Debug)]
pub struct Peers {
    self_id: u64,
    cluster_id: String,
    addrs: BTreeMap<u64, String>,
    channels: BTreeMap<u64, Channel>,
    /// Request forwarding only (`server::kv`): never shares a connection with `channels`.
    forward_channels: BTreeMap<u64, Channel>,
    rpc_timeout: Duration,
    warnings: WarnLimiter,
    /// Fault injection (tests): nodes this node neither sends to nor accepts messages from.
    cut_off: std::sync::RwLock<std::collections::BTreeSet<u64>>,
    /// Fault injection (tests): nodes this node sends nothing to but still accepts messages
    /// from (a one-way cut).
    cut_outbound: std::sync::RwLock<std::collections::BTreeSet<u64>>,
    /// When a message from each peer was last admitted (see [`Peers::admit_from`]).
    heard_from: Mutex<BTreeMap<u64, Instant>>,
    /// The highest cluster-map epoch a ping reply reported, and the peer that reported it
    /// (see [`Peers::reported_map_epochs`]).
    map_epochs: tokio::sync::watch::Sender<(u64, u64)>,
}

impl Peers {
    /// Channels to every peer in `config.peers` except this node. Nothing connects yet.
    pub fn new(config: &Config) -> Result<Arc<Peers>> {
        let mut channels = BTreeMap::new();
        let mut forward_channels = BTreeMap::new();
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
                .keep_alive_while_idle(true)
                // Send from the configured source IP, so per-pair packet filters (the fault
                // harness) can tell this node's traffic from other nodes' on loopback.
                .local_address(config.peer_source_ip);
            // Each `connect_lazy` is a channel with a connection of its own.
            forward_channels.insert(*id, endpoint.connect_lazy());
            channels.insert(*id, endpoint.connect_lazy());
        }
        Ok(Arc::new(Peers {
            self_id: config.node_id,
            cluster_id: config.cluster_id.clone(),
            addrs: config.peers.clone(),
            channels,
            forward_channels,
            rpc_timeout: config.request_timeout(),
            warnings: WarnLimiter::default(),
            cut_off: Default::default(),
            cut_outbound: Default::default(),
            heard_from: Default::default(),
            map_epochs: tokio::sync::watch::Sender::new((0, 0)),
        }))
    }

    /// The Raft channel to `node`, cut off or not: a shard's openraft client outlives
    /// partitions (openraft makes one per replication stream), so it checks the cut on every
    /// call instead.
    pub(crate) fn raft_channel(&self, node: u64) -> Option<Channel> {
        self.channels.get(&node).cloned()
    }

    /// True if a warning about `key` may be logged now (see [`WarnLimiter`]).
    pub(crate) fn warn_allowed(&self, key: &str) -> bool {
        self.warnings.allow(key)
    }

    /// This node's id.
    pub fn self_id(&self) -> u64 {
        self.self_id
    }

    /// The cluster's name (sent in every peer message).
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The channel for client requests forwarded to `node` (its own connection, see
    /// [`Peers`]), if `node` is a peer and not cut off by a test partition.
    pub(crate) fn forward_channel(&self, node: u64) -> Option<Channel> {
        if self.is_cut_off(node) {
            return None;
        }
        self.forward_channels.get(&node).cloned()
    }

    /// The channel to `node`, if it is a peer (and not cut off by a test partition).
    pub fn channel(&self, node: u64) -> Option<Channel> {
        if self.is_cut_off(node) {
            return None;
        }
        self.channels.get(&node).cloned()
    }

    /// Fault injection for tests: from now on this node sends nothing to `nodes` and refuses
    /// everything they send (as a firewall dropping both directions would). Cut both sides of
    /// a link for a symmetric partition.
    #[doc(hidden)]
    pub fn cut_off(&self, nodes: impl IntoIterator<Item = u64>) {
        self.cut_off.write().expect("cut_off lock").extend(nodes);
    }

    /// Fault injection for tests: from now on this node sends nothing to `nodes` (no Raft
    /// message, ping, read-index or leadership request) but still accepts and answers what
    /// they send: a one-way cut, as when only this node's connections to them fail.
    #[doc(hidden)]
    pub fn cut_off_outbound(&self, nodes: impl IntoIterator<Item = u64>) {
        self.cut_outbound
            .write()
            .expect("cut_outbound lock")
            .extend(nodes);
    }

    /// Fault injection for tests: restores every link cut with [`Peers::cut_off`] or
    /// [`Peers::cut_off_outbound`].
    #[doc(hidden)]
    pub fn heal(&self) {
        self.cut_off.write().expect("cut_off lock").clear();
        self.cut_outbound
            .write()
            .expect("cut_outbound lock")
            .clear();
    }

    /// True if a test partition stops this node from sending to `node` (either cut).
    pub fn is_cut_off(&self, node: u64) -> bool {
        self.cut_off.read().expect("cut_off lock").contains(&node)
            || self
                .cut_outbound
                .read()
                .expect("cut_outbound lock")
                .contains(&node)
    }

    /// The transport's server side calls this for every message from member `node`: false
    /// if a test partition refuses `node`'s messages ([`Peers::cut_off`]); otherwise it records
    /// that `node` reached this node now, the inbound half of [`crate::hibernation`]'s
    /// liveness, and returns true.
    pub(crate) fn admit_from(&self, node: u64) -> bool {
        if self.cut_off.read().expect("cut_off lock").contains(&node) {
            return false;
        }
        let mut heard = self
            .heard_from
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        heard.insert(node, Instant::now());
        true
    }

    /// When a message from `node` was last admitted ([`Peers::admit_from`]), if ever.
    pub(crate) fn heard_from(&self, node: u64) -> Option<Instant> {
        self.heard_from
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&node)
            .copied()
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

    /// Asks `leader` for a read index of `shard` (a follower's linearizable read). The reply
    /// is an index every write acknowledged before the request was sent is at or below.
    pub async fn read_index(&self, leader: u64, shard: u64) -> Result<u64> {
        let unavailable = |reason: String| Error::Unavailable { shard, reason };
        if self.is_cut_off(leader) {
            return Err(unavailable(format!("the link to leader {leader} is cut")));
        }
        // On the forwarding connection: a read index is asked for inside a client's request,
        // and a client that gives up resets the stream; resets must not reach the connection
        // that carries replication (h2's reset guard closes it).
        let channel = self
            .forward_channel(leader)
            .ok_or_else(|| unavailable(format!("leader {leader} is not a known peer")))?;
        let mut client = RaftTransportClient::new(channel);
        let mut request = tonic::Request::new(RaftRequest {
            header: Some(PeerHeader {
                from_node: self.self_id,
                cluster_id: self.cluster_id.clone(),
                shard,
            }),
            payload: Vec::new(),
        });
        request.set_timeout(self.rpc_timeout);
        let reply = match tokio::time::timeout(self.rpc_timeout, client.read_index(request)).await {
            Err(_) => {
                return Err(Error::Timeout {
                    shard,
                    operation: "read index from the leader",
                    millis: self.rpc_timeout.as_millis() as u64,
                    write: false,
                });
            }
            Ok(Err(status)) => {
                return Err(unavailable(format!(
                    "read index from leader {leader}: {}",
                    status.message()
                )));
            }
            Ok(Ok(reply)) => reply.into_inner(),
        };
        match decode_serde::<ReadIndexReply>(&reply.payload) {
            Ok(ReadIndexReply::Index(index)) => Ok(index),
            Ok(ReadIndexReply::NotLeader(leader_hint)) => {
                Err(Error::NotLeader { shard, leader_hint })
            }
            Ok(ReadIndexReply::Unavailable(reason)) => Err(unavailable(reason)),
            Err(e) => Err(unavailable(format!(
                "undecodable read-index reply from {leader}: {e}"
            ))),
        }
    }

    /// Pings `node` (node-level liveness, see [`crate::hibernation`]) with this process's
    /// `boot_id`, within `timeout`. `Err` says why no answer came.
    pub async fn ping(
        &self,
        node: u64,
        boot_id: u64,
        timeout: Duration,
    ) -> std::result::Result<PingReply, String> {
        let mut client = self.node_client(node)?;
        let mut request = tonic::Request::new(PingRequest {
            header: Some(self.node_header()),
            boot_id,
        });
        request.set_timeout(timeout);
        let reply = within(timeout, client.ping(request)).await?;
        self.map_epochs.send_if_modified(|seen| {
            let higher = reply.map_epoch > seen.0;
            if higher {
                *seen = (reply.map_epoch, node);
            }
            higher
        });
        Ok(reply)
    }

    /// The highest cluster-map epoch a peer reported in a ping reply, with that peer; changes
    /// only upward. The node fetches the map from the peer when it is newer than its own.
    pub fn reported_map_epochs(&self) -> tokio::sync::watch::Receiver<(u64, u64)> {
        self.map_epochs.subscribe()
    }

    /// The bincode of `node`'s newest cluster map (empty if it knows none), within the RPC
    /// timeout.
    pub async fn fetch_map(&self, node: u64) -> std::result::Result<Vec<u8>, String> {
        let mut client = self.node_client(node)?;
        let mut request = tonic::Request::new(FetchMapRequest {
            header: Some(self.node_header()),
        });
        request.set_timeout(self.rpc_timeout);
        Ok(within(self.rpc_timeout, client.fetch_map(request))
            .await?
            .map)
    }

    /// Asks `node` whether it still holds this node's vote of each item's term for the item's
    /// shard (see [`crate::leadership`]), within `timeout`. `Ok` has one answer per item.
    pub async fn confirm_leadership(
        &self,
        node: u64,
        items: Vec<ConfirmItem>,
        timeout: Duration,
    ) -> std::result::Result<Vec<bool>, String> {
        let mut client = self.node_client(node)?;
        let mut request = tonic::Request::new(ConfirmRequest {
            header: Some(self.node_header()),
            items,
        });
        request.set_timeout(timeout);
        Ok(within(timeout, client.confirm_leadership(request))
            .await?
            .confirmed)
    }

    /// A client on `node`'s channel for a node-level message.
    fn node_client(&self, node: u64) -> std::result::Result<RaftTransportClient<Channel>, String> {
        self.channel(node)
            .map(RaftTransportClient::new)
            .ok_or_else(|| format!("node {node} is not a reachable peer"))
    }

    /// The header of a node-level message (it names no shard).
    fn node_header(&self) -> PeerHeader {
        PeerHeader {
            from_node: self.self_id,
            cluster_id: self.cluster_id.clone(),
            shard: 0,
        }
    }
}

/// A node-level call's reply, or why none came within `timeout`.
async fn within<T>(
    timeout: Duration,
    call: impl Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
) -> std::result::Result<T, String> {
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
        Ok(Err(status)) => Err(status.message().to_string()),
        Ok(Ok(reply)) => Ok(reply.into_inner()),
    }
}

/// A leader's answer to a follower's read-index request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum ReadIndexReply {
    /// The read index.
    Index(u64),
    /// The asked node does not lead the shard; the leader it knows of.
    NotLeader(Option<u64>),
    /// Leadership could not be confirmed (no quorum) or the shard is stopped.
    Unavailable(String),
}

/// Rate-limits a repeated warning: at most one per key per minute. Keys are few (peer × reason),
/// and the map is cleared if it ever grows large (e.g. keys derived from hostile input).
#[derive(Debug, Default)]
pub(crate) struct WarnLimiter {
    last: Mutex<HashMap<String, Instant>>,
}

impl WarnLimiter {
    const MAX_KEYS: usize = 1024;

    /// True if a warning about `key` may be logged now (and remembers that it was).
    pub(crate) fn allow(&self, key: &str) -> bool {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = last.get(key)
            && now.duration_since(*at) < WARN_EVERY
        {
            return false;
        }
        if last.len() >= Self::MAX_KEYS {
            last.clear();
        }
        last.insert(key.to_string(), now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_are_limited_per_key() {
        let limiter = WarnLimiter::default();
        assert!(limiter.allow("2/NotFound"));
        assert!(!limiter.allow("2/NotFound"));
        assert!(limiter.allow("3/NotFound"));
        assert!(limiter.allow("2/PermissionDenied"));
    }
}
