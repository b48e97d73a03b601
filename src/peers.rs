//! A node's channels to the other nodes of its cluster, and the node-level calls over them:
//! pings ([`crate::hibernation`]), leadership confirmations ([`crate::leadership`]), a
//! follower's read-index request to a shard's leader, request forwarding, and the test-only
//! partitions (`cut_off`, `cut_off_outbound`). Each shard's openraft traffic goes over the
//! same channels through [`crate::raft::network::ShardNetwork`].
//!
//! The node set can change while the node runs ([`Peers::update`]; the cluster map's META
//! group will call it from milestone M2 on, `docs/design/membership.md` §1.4): the set and its
//! channels are one immutable value behind a lock, replaced whole, and every call clones the
//! current `Arc` (a read lock held for a map lookup, never across an await). A call already
//! made to a node that is then dropped keeps its channel and finishes; a new call to it fails
//! as unreachable.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
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
    /// The current node set and its channels, replaced whole by [`Peers::update`].
    links: RwLock<Arc<Links>>,
    /// How a channel to a new or moved node is set up.
    settings: LinkSettings,
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

/// The node set at one time: every node's address (this node's included) and a [`Link`] to
/// each other node.
#[derive(Debug, Default)]
struct Links {
    addrs: BTreeMap<u64, String>,
    links: BTreeMap<u64, Arc<Link>>,
}

/// The two channels to one other node (see [`Peers`]), for the address they connect to.
#[derive(Debug)]
struct Link {
    addr: String,
    /// Raft traffic and node-level messages.
    raft: Channel,
    /// Request forwarding only (`server::kv`): never shares a connection with `raft`.
    forward: Channel,
}

/// The settings of every peer channel, from the node's [`Config`].
#[derive(Debug, Clone, Copy)]
struct LinkSettings {
    connect_timeout: Duration,
    source_ip: Option<IpAddr>,
}

impl LinkSettings {
    /// Two lazily connected channels to `node` at `addr`: nothing connects yet.
    fn link(&self, node: u64, addr: &str) -> Result<Link> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Error::InvalidArgument(format!("peer {node} address {addr:?}: {e}")))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            // Send from the configured source IP, so per-pair packet filters (the fault
            // harness) can tell this node's traffic from other nodes' on loopback.
            .local_address(self.source_ip);
        // Each `connect_lazy` is a channel with a connection of its own.
        Ok(Link {
            addr: addr.to_string(),
            raft: endpoint.connect_lazy(),
            forward: endpoint.connect_lazy(),
        })
    }
}

impl Peers {
    /// Channels to every peer in `config.peers` except this node. Nothing connects yet.
    pub fn new(config: &Config) -> Result<Arc<Peers>> {
        let settings = LinkSettings {
            connect_timeout: Duration::from_millis(config.heartbeat_interval_ms.max(500)),
            source_ip: config.peer_source_ip,
        };
        let nodes: Vec<(u64, String)> = config
            .peers
            .iter()
            .map(|(id, addr)| (*id, addr.clone()))
            .collect();
        let links = Self::links(config.node_id, settings, &Links::default(), &nodes)?;
        Ok(Arc::new(Peers {
            self_id: config.node_id,
            cluster_id: config.cluster_id.clone(),
            links: RwLock::new(Arc::new(links)),
            settings,
            rpc_timeout: config.request_timeout(),
            warnings: WarnLimiter::default(),
            cut_off: Default::default(),
            cut_outbound: Default::default(),
            heard_from: Default::default(),
            map_epochs: tokio::sync::watch::Sender::new((0, 0)),
        }))
    }

    /// The node set `nodes` (this node may be among them), reusing `old`'s link to every node
    /// whose address is unchanged. Fails, building nothing, on an address that is not one.
    fn links(
        self_id: u64,
        settings: LinkSettings,
        old: &Links,
        nodes: &[(u64, String)],
    ) -> Result<Links> {
        let mut links = Links::default();
        for (node, addr) in nodes {
            links.addrs.insert(*node, addr.clone());
            if *node == self_id {
                continue;
            }
            let link = match old.links.get(node) {
                Some(link) if link.addr == *addr => Arc::clone(link),
                _ => Arc::new(settings.link(*node, addr)?),
            };
            links.links.insert(*node, link);
        }
        Ok(links)
    }

    /// Makes `nodes` (id, address) the node set: channels for new nodes, new channels for a
    /// node whose address changed, none any more for a node left out. A call in flight keeps
    /// the channel it has and finishes; later calls to a dropped node fail as unreachable, and
    /// its messages are no longer admitted ([`Peers::admit_from`]). An invalid address fails
    /// the whole update and changes nothing.
    pub fn update(&self, nodes: &[(u64, String)]) -> Result<()> {
        let mut current = self.links.write().unwrap_or_else(|p| p.into_inner());
        let links = Self::links(self.self_id, self.settings, &current, nodes)?;
        let links = Arc::new(links);
        *current = Arc::clone(&links);
        drop(current);
        // A dropped node that returns starts with no arrival on record.
        self.heard_from
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|node, _| links.addrs.contains_key(node));
        Ok(())
    }

    /// The current node set (a cheap clone of an `Arc`).
    fn current(&self) -> Arc<Links> {
        Arc::clone(&self.links.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The Raft channel to `node`, cut off or not: a shard's openraft client outlives
    /// partitions (openraft makes one per replication stream), so it checks the cut on every
    /// call instead. `None` if `node` is not in the current node set.
    pub(crate) fn raft_channel(&self, node: u64) -> Option<Channel> {
        self.current().links.get(&node).map(|l| l.raft.clone())
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
        self.current().links.get(&node).map(|l| l.forward.clone())
    }

    /// The channel to `node`, if it is a peer (and not cut off by a test partition).
    pub fn channel(&self, node: u64) -> Option<Channel> {
        if self.is_cut_off(node) {
            return None;
        }
        self.raft_channel(node)
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
    /// if `node` is not another node of the current set, or a test partition refuses its
    /// messages ([`Peers::cut_off`]); otherwise it records that `node` reached this node now,
    /// the inbound half of [`crate::hibernation`]'s liveness, and returns true.
    pub(crate) fn admit_from(&self, node: u64) -> bool {
        if !self.current().links.contains_key(&node)
            || self.cut_off.read().expect("cut_off lock").contains(&node)
        {
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

    /// True if `node` is another node of the current set.
    pub fn is_peer(&self, node: u64) -> bool {
        self.current().links.contains_key(&node)
    }

    /// `node`'s address in the current set.
    pub fn addr(&self, node: u64) -> Option<String> {
        self.current().addrs.get(&node).cloned()
    }

    /// Every node id of the current set, this one included (if it is in the set).
    pub fn node_ids(&self) -> Vec<u64> {
        self.current().addrs.keys().copied().collect()
    }

    /// Deadline for one request to a peer.
    pub fn rpc_timeout(&self) -> Duration {
        self.rpc_timeout
    }

    /// Asks node `leader` for a read index of `shard` from its replica `replica` (0: legacy,
    /// the replica whose id is its node id), for a follower's linearizable read. The reply is
    /// an index every write acknowledged before the request was sent is at or below.
    pub async fn read_index(&self, leader: u64, replica: u64, shard: u64) -> Result<u64> {
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
                map_epoch: 0,
                replica,
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
            // No cluster map yet (milestone M2).
            map_epoch: 0,
            replica: 0,
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

    use crate::pb::raft::raft_transport_server::{RaftTransport, RaftTransportServer};
    use crate::pb::raft::{ConfirmReply, FetchMapReply, FetchMapRequest, RaftReply, SnapshotChunk};
    use tokio::sync::Semaphore;
    use tonic::{Request, Response, Status, Streaming};

    /// A peer whose `Ping` answers (boot id 7) once `release` has a permit; `arrived` gets a
    /// permit per ping received. Nothing else is served.
    struct HeldPing {
        arrived: Arc<Semaphore>,
        release: Arc<Semaphore>,
    }

    #[tonic::async_trait]
    impl RaftTransport for HeldPing {
        async fn append_entries(
            &self,
            _: Request<RaftRequest>,
        ) -> Result<Response<RaftReply>, Status> {
            Err(Status::unimplemented("test peer"))
        }
        async fn vote(&self, _: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
            Err(Status::unimplemented("test peer"))
        }
        async fn pre_vote(&self, _: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
            Err(Status::unimplemented("test peer"))
        }
        async fn read_index(&self, _: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
            Err(Status::unimplemented("test peer"))
        }
        async fn install_snapshot(
            &self,
            _: Request<Streaming<SnapshotChunk>>,
        ) -> Result<Response<RaftReply>, Status> {
            Err(Status::unimplemented("test peer"))
        }
        async fn ping(&self, _: Request<PingRequest>) -> Result<Response<PingReply>, Status> {
            self.arrived.add_permits(1);
            self.release.acquire().await.expect("open").forget();
            Ok(Response::new(PingReply {
                boot_id: 7,
                leading: Vec::new(),
                map_epoch: 0,
            }))
        }
        async fn fetch_map(
            &self,
            _: Request<FetchMapRequest>,
        ) -> Result<Response<FetchMapReply>, Status> {
            Err(Status::unimplemented("test peer"))
        }
        async fn confirm_leadership(
            &self,
            _: Request<ConfirmRequest>,
        ) -> Result<Response<ConfirmReply>, Status> {
            Err(Status::unimplemented("test peer"))
        }
    }

    fn config(peers: &[(u64, &str)]) -> Config {
        Config {
            node_id: 1,
            peers: peers.iter().map(|(id, a)| (*id, a.to_string())).collect(),
            ..Config::default()
        }
    }

    /// The link `peers` holds to `node` now.
    fn link(peers: &Peers, node: u64) -> Option<Arc<Link>> {
        peers.current().links.get(&node).cloned()
    }

    #[tokio::test]
    async fn update_adds_replaces_and_drops_nodes() {
        let peers = Peers::new(&config(&[
            (1, "127.0.0.1:7001"),
            (2, "127.0.0.1:7002"),
            (3, "127.0.0.1:7003"),
        ]))
        .unwrap();
        assert_eq!(peers.node_ids(), vec![1, 2, 3]);
        assert!(peers.channel(3).is_some() && peers.channel(4).is_none());
        assert!(peers.channel(1).is_none(), "no channel to this node itself");
        assert!(peers.admit_from(3) && !peers.admit_from(4) && !peers.admit_from(1));
        let two = link(&peers, 2).unwrap();

        // Node 3 leaves, node 4 joins, node 2 stays where it was.
        let nodes = |list: &[(u64, &str)]| -> Vec<(u64, String)> {
            list.iter().map(|(id, a)| (*id, a.to_string())).collect()
        };
        peers
            .update(&nodes(&[
                (1, "127.0.0.1:7001"),
                (2, "127.0.0.1:7002"),
                (4, "127.0.0.1:7004"),
            ]))
            .unwrap();
        assert_eq!(peers.node_ids(), vec![1, 2, 4]);
        assert!(peers.channel(3).is_none() && peers.raft_channel(3).is_none());
        assert!(peers.forward_channel(3).is_none());
        assert!(!peers.is_peer(3) && !peers.admit_from(3));
        assert_eq!(
            peers.heard_from(3),
            None,
            "a dropped node's arrivals are forgotten"
        );
        assert!(peers.channel(4).is_some() && peers.forward_channel(4).is_some());
        assert!(peers.admit_from(4));
        assert_eq!(peers.addr(4).as_deref(), Some("127.0.0.1:7004"));
        assert!(
            Arc::ptr_eq(&two, &link(&peers, 2).unwrap()),
            "an unchanged node keeps its channels (and their connections)"
        );

        // Node 2 moves: new channels to its new address.
        peers
            .update(&nodes(&[
                (1, "127.0.0.1:7001"),
                (2, "127.0.0.1:7012"),
                (4, "127.0.0.1:7004"),
            ]))
            .unwrap();
        let moved = link(&peers, 2).unwrap();
        assert!(!Arc::ptr_eq(&two, &moved));
        assert_eq!(moved.addr, "127.0.0.1:7012");
        assert_eq!(peers.addr(2).as_deref(), Some("127.0.0.1:7012"));

        // An invalid address changes nothing.
        let refused = peers.update(&nodes(&[(1, "127.0.0.1:7001"), (5, "not an address\n")]));
        assert!(
            matches!(refused, Err(Error::InvalidArgument(_))),
            "{refused:?}"
        );
        assert_eq!(peers.node_ids(), vec![1, 2, 4]);
        assert!(Arc::ptr_eq(&moved, &link(&peers, 2).unwrap()));
    }

    #[tokio::test]
    async fn a_call_in_flight_to_a_dropped_node_finishes_and_new_calls_fail() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let arrived = Arc::new(Semaphore::new(0));
        let release = Arc::new(Semaphore::new(0));
        let service = RaftTransportServer::new(HeldPing {
            arrived: Arc::clone(&arrived),
            release: Arc::clone(&release),
        });
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let peers = Peers::new(&config(&[(1, "127.0.0.1:7001"), (2, &addr)])).unwrap();
        let timeout = Duration::from_secs(30);
        let in_flight = tokio::spawn({
            let peers = Arc::clone(&peers);
            async move { peers.ping(2, 1, timeout).await }
        });
        // The ping reached node 2, which holds its answer.
        arrived.acquire().await.unwrap().forget();
        peers.update(&[(1, "127.0.0.1:7001".to_string())]).unwrap();
        let refused = peers.ping(2, 1, timeout).await;
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.contains("not a reachable peer")),
            "{refused:?}"
        );
        release.add_permits(1);
        let answer = in_flight.await.unwrap();
        assert_eq!(answer.map(|a| a.boot_id), Ok(7));
        server.abort();
    }

    #[test]
    fn warnings_are_limited_per_key() {
        let limiter = WarnLimiter::default();
        assert!(limiter.allow("2/NotFound"));
        assert!(!limiter.allow("2/NotFound"));
        assert!(limiter.allow("3/NotFound"));
        assert!(limiter.allow("2/PermissionDenied"));
    }
}
