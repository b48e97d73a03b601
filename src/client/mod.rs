//! The Rust client of a kvnode cluster: the same key-value API as the embedded [`Node`]
//! (`put`, `get`, `delete`, `compare_and_set`, same arguments, same replies), over gRPC.
//!
//! The client is shard- and leader-aware. [`Client::connect`] asks the first seed that answers
//! for its `Status` and learns the cluster from it: the shard count (from which it builds the
//! same [`HashRing`] as the servers, so it computes every key's shard exactly as they do), the
//! nodes' addresses, and per shard the replicas and the leader. A request then goes straight
//! to the leader of the key's shard, over one HTTP/2 channel per node that every request
//! shares (channels connect lazily, on first use, and reconnect by themselves).
//!
//! When a request fails, [`retry`] decides whether to try again and where: a redirect goes
//! to the hinted leader, an unreachable node to another replica, an unknown leader to a fresh
//! shard map. **A put, delete or compare-and-set whose outcome is indeterminate is never
//! retried**: its error is returned with [`Error::is_definite`] false, because the write may
//! have committed. Every call has one deadline ([`ClientOptions::request_timeout`]) that
//! covers all of its attempts.
//!
//! Reads at every level go to the leader for now (a node forwards what it cannot serve, so
//! any replica would do, but the leader answers every level without a hop).
//!
//! ```no_run
//! # async fn demo() -> kvnode::Result<()> {
//! use kvnode::ReadOptions;
//! use kvnode::client::Client;
//! let client = Client::connect(["127.0.0.1:7001", "127.0.0.1:7002"]).await?;
//! let w = client.put(b"greeting", b"hello".to_vec()).await?;
//! let got = client.get(b"greeting", &ReadOptions::linearizable()).await?;
//! assert_eq!(got.value.unwrap().value, b"hello");
//! assert!(got.receipt.applied_index >= w.index);
//! # Ok(()) }
//! ```
//!
//! [`Node`]: crate::Node

mod admin;
pub mod retry;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::consistency::{ReadOptions, ServedLevel, WriteReceipt};
use crate::error::{Error, Result};
use crate::pb::MAX_MESSAGE_BYTES;
use crate::pb::status::{self as wire_status, from_status};
use crate::pb::{convert, kv};
use crate::reply::{CasReply, DeleteReply, GetReply};
use crate::sharding::{HashRing, ShardId};

pub use admin::{Joined, NodeList, NodeSummary};
pub use retry::{Decision, Next, Operation, RetryPolicy};

/// How a [`Client`] talks to the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientOptions {
    /// The deadline of one call, all its attempts and backoff included; sent to the server as
    /// the gRPC timeout too. A write that runs out of time fails as `Timeout` with an
    /// indeterminate outcome. Default 5 s.
    pub request_timeout: Duration,
    /// How long opening a connection to one node may take. Default 1 s.
    pub connect_timeout: Duration,
    /// When to retry a failed attempt (see [`retry`]).
    pub retry: RetryPolicy,
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            retry: RetryPolicy::default(),
        }
    }
}

/// The cluster as one node sees it: the reply to `Status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    /// The node that answered.
    pub node: u64,
    /// The cluster's name.
    pub cluster_id: String,
    /// The fixed number of shards.
    pub shard_count: u32,
    /// Replicas per shard.
    pub replication_factor: u32,
    /// Every node of the cluster: id → client address (`host:port`).
    pub nodes: BTreeMap<u64, String>,
    /// Every shard, in shard order.
    pub shards: Vec<ShardStatus>,
    /// `Some` only from the test-only `kvnode-planted` binary: the planted bug it runs with
    /// (`"none"` if none). A real node never sets it.
    pub planted_bug: Option<String>,
}

/// One shard as the answering node sees it. `term`, `commit_index`, `applied_index` and
/// `role` describe the answering node's own replica; they are zero (and `role` empty) when it
/// hosts none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardStatus {
    /// The shard.
    pub shard: u64,
    /// The nodes holding a replica, preferred leader first.
    pub replicas: Vec<u64>,
    /// The leader the answering node knows of.
    pub leader: Option<u64>,
    /// The answering replica's current term.
    pub term: u64,
    /// The highest log index the answering replica knows to be committed.
    pub commit_index: u64,
    /// The highest log index the answering replica has applied.
    pub applied_index: u64,
    /// The answering node's role for the shard: `leader`, `follower`, `candidate`, `learner`,
    /// or empty if it hosts no replica.
    pub role: String,
    /// The group's timers are off on the answering replica: it is idle (see
    /// [`crate::hibernation`]).
    pub hibernating: bool,
}

/// A connection to a kvnode cluster. Cheap to clone: clones share the channels and the shard
/// map.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    options: ClientOptions,
    /// The addresses given to `connect`, tried when no known node answers.
    seeds: Vec<String>,
    map: RwLock<ShardMap>,
    channels: Channels,
}

/// What the client knows of the cluster.
#[derive(Debug)]
struct ShardMap {
    cluster_id: String,
    ring: HashRing,
    /// Node id → address.
    nodes: BTreeMap<u64, String>,
    routes: BTreeMap<ShardId, Route>,
}

/// Where one shard lives.
#[derive(Debug, Clone, Default)]
struct Route {
    /// Preferred leader first.
    replicas: Vec<u64>,
    leader: Option<u64>,
    /// The term `leader` was learned in (0 when learned from a reply).
    term: u64,
}

/// A node to send an attempt to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    /// The node's id, when known (unknown for a bare seed).
    node: Option<u64>,
    addr: String,
}

/// A failed attempt: the error and, on a redirect, the leader address the server sent.
#[derive(Debug)]
struct Failure {
    error: Error,
    leader_addr: Option<String>,
}

impl Client {
    /// Connects to the cluster that `seeds` (`host:port` addresses of any of its nodes)
    /// belong to, with [`ClientOptions::default`].
    pub async fn connect(seeds: impl IntoIterator<Item = impl Into<String>>) -> Result<Client> {
        Client::connect_with(seeds, ClientOptions::default()).await
    }

    /// Connects with `options`: asks the seeds for `Status`, in order, and learns the cluster
    /// from the first that answers.
    ///
    /// # Errors
    ///
    /// `InvalidArgument` if there are no seeds or one is not an address; the last seed's error
    /// (typically `Unavailable`) if none answers.
    pub async fn connect_with(
        seeds: impl IntoIterator<Item = impl Into<String>>,
        options: ClientOptions,
    ) -> Result<Client> {
        let seeds: Vec<String> = seeds
            .into_iter()
            .map(Into::into)
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if seeds.is_empty() {
            return Err(Error::InvalidArgument(
                "no seed address to connect to".into(),
            ));
        }
        let channels = Channels::new(options);
        let mut last = None;
        for seed in &seeds {
            match channels.status(seed, options.request_timeout).await {
                Ok(status) => {
                    let map = ShardMap::from_status(&status, seed)?;
                    return Ok(Client {
                        inner: Arc::new(Inner {
                            options,
                            seeds,
                            map: RwLock::new(map),
                            channels,
                        }),
                    });
                }
                Err(e) => {
                    tracing::debug!(seed = %seed, error = %e, "seed did not answer");
                    last = Some(e);
                }
            }
        }
        Err(match last {
            Some(Error::Unavailable { reason, .. }) => Error::Unavailable {
                shard: 0,
                reason: format!("no seed answered; last: {reason}"),
            },
            Some(e) => e,
            None => unreachable!("seeds is not empty"),
        })
    }

    /// The options this client uses.
    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    /// The shard `key` belongs to (computed like the servers do).
    pub fn shard_for(&self, key: &[u8]) -> ShardId {
        self.inner.read_map().ring.shard_for(key)
    }

    /// The nodes the client knows: id → address.
    pub fn nodes(&self) -> BTreeMap<u64, String> {
        self.inner.read_map().nodes.clone()
    }

    /// The leader of `shard` the client currently believes in, if any.
    pub fn leader_of(&self, shard: ShardId) -> Option<u64> {
        self.inner.read_map().routes.get(&shard)?.leader
    }

    /// Sets `key` to `value`.
    ///
    /// # Errors
    ///
    /// As [`Node::put`](crate::Node::put); an error whose [`Error::is_definite`] is false
    /// means the put may have committed.
    pub async fn put(&self, key: &[u8], value: Vec<u8>) -> Result<WriteReceipt> {
        let shard = self.shard_for(key);
        let request = kv::PutRequest {
            key: key.to_vec(),
            value,
        };
        let reply = self
            .call(
                shard,
                Operation::Write,
                "put",
                request,
                |mut c, r| async move { c.put(r).await },
            )
            .await?;
        let receipt = reply
            .receipt
            .ok_or_else(|| malformed(shard, Operation::Write, "put reply without a receipt"))?;
        self.inner.learn_leader(shard, receipt.node);
        Ok(convert::write_receipt_from_wire(&receipt))
    }

    /// Reads `key` at the level `options` names.
    pub async fn get(&self, key: &[u8], options: &ReadOptions) -> Result<GetReply> {
        let shard = self.shard_for(key);
        let request = kv::GetRequest {
            key: key.to_vec(),
            options: Some(convert::read_options_to_wire(options)),
        };
        let reply = self
            .call(
                shard,
                Operation::Read,
                "get",
                request,
                |mut c, r| async move { c.get(r).await },
            )
            .await?;
        let receipt = reply
            .receipt
            .as_ref()
            .ok_or_else(|| malformed(shard, Operation::Read, "get reply without a receipt"))?;
        let receipt = convert::read_receipt_from_wire(receipt)
            .map_err(|e| malformed(shard, Operation::Read, &e.to_string()))?;
        if matches!(
            receipt.level,
            ServedLevel::Linearizable | ServedLevel::Lease
        ) {
            // Only the leader serves these.
            self.inner.learn_leader(shard, receipt.node);
        }
        Ok(GetReply {
            value: reply.value.as_ref().map(convert::value_from_wire),
            receipt,
        })
    }

    /// Removes `key`. Not retried after an indeterminate failure: a second attempt would
    /// report `existed: false` for a key the first one removed.
    pub async fn delete(&self, key: &[u8]) -> Result<DeleteReply> {
        let shard = self.shard_for(key);
        let request = kv::DeleteRequest { key: key.to_vec() };
        let reply = self
            .call(
                shard,
                Operation::Write,
                "delete",
                request,
                |mut c, r| async move { c.delete(r).await },
            )
            .await?;
        let receipt = reply
            .receipt
            .ok_or_else(|| malformed(shard, Operation::Write, "delete reply without a receipt"))?;
        self.inner.learn_leader(shard, receipt.node);
        Ok(DeleteReply {
            existed: reply.existed,
            receipt: convert::write_receipt_from_wire(&receipt),
        })
    }

    /// If `key` holds `expected` (`None`: is absent), sets it to `new` (`None`: deletes it).
    /// A mismatch is a normal reply (`applied: false`, with the current value).
    pub async fn compare_and_set(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<Vec<u8>>,
    ) -> Result<CasReply> {
        let shard = self.shard_for(key);
        let request = kv::CompareAndSetRequest {
            key: key.to_vec(),
            expected: expected.map(<[u8]>::to_vec),
            new_value: new,
        };
        let reply = self
            .call(
                shard,
                Operation::Write,
                "compare-and-set",
                request,
                |mut c, r| async move { c.compare_and_set(r).await },
            )
            .await?;
        let receipt = reply.receipt.ok_or_else(|| {
            malformed(
                shard,
                Operation::Write,
                "compare-and-set reply without a receipt",
            )
        })?;
        self.inner.learn_leader(shard, receipt.node);
        Ok(CasReply {
            applied: reply.applied,
            current: reply.current.as_ref().map(convert::value_from_wire),
            receipt: convert::write_receipt_from_wire(&receipt),
        })
    }

    /// The cluster as the first node that answers sees it (known nodes first, then the
    /// seeds). Also refreshes the client's shard map.
    pub async fn status(&self) -> Result<ClusterStatus> {
        let mut last = None;
        for addr in self.candidates() {
            match self.status_at(&addr).await {
                Ok(status) => return Ok(status),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(admin::no_node))
    }

    /// The cluster as `node` sees it (its own replicas' terms and indexes).
    ///
    /// # Errors
    ///
    /// `InvalidArgument` if the client knows no such node; otherwise the node's error
    /// (`Unavailable` if it cannot be reached).
    pub async fn node_status(&self, node: u64) -> Result<ClusterStatus> {
        let addr = self.addr_of(node)?;
        self.status_at(&addr).await
    }

    async fn status_at(&self, addr: &str) -> Result<ClusterStatus> {
        let status = self
            .inner
            .channels
            .status(addr, self.inner.options.request_timeout)
            .await?;
        self.inner.merge(&status, addr);
        Ok(cluster_status(status, addr))
    }

    /// Sends `request` for `shard` until it succeeds, the retry policy gives up, or the
    /// deadline passes.
    async fn call<Req, Resp, F, Fut>(
        &self,
        shard: ShardId,
        operation: Operation,
        what: &'static str,
        request: Req,
        rpc: F,
    ) -> Result<Resp>
    where
        Req: Clone,
        F: Fn(kv::kv_client::KvClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let inner = &self.inner;
        let deadline = Instant::now() + inner.options.request_timeout;
        // Addresses that failed to answer during this call: tried last.
        let mut failed: Vec<String> = Vec::new();
        let mut target = inner.route(shard, &failed);
        let mut attempt = 1;
        loop {
            let failure = match inner
                .attempt(
                    &target,
                    shard,
                    operation,
                    what,
                    deadline,
                    request.clone(),
                    &rpc,
                )
                .await
            {
                Ok(reply) => return Ok(reply),
                Err(f) => f,
            };
            let Failure { error, leader_addr } = failure;
            let decision = inner.options.retry.decide(operation, &error, attempt);
            tracing::debug!(
                shard, attempt, addr = %target.addr, error = %error, ?decision,
                "{what} failed"
            );
            let Decision::Retry { next, after } = decision else {
                return Err(error);
            };
            if Instant::now() + after >= deadline {
                return Err(error);
            }
            if matches!(error, Error::Unavailable { .. } | Error::Timeout { .. }) {
                failed.push(target.addr.clone());
                if let Some(node) = target.node {
                    inner.forget_leader(shard, node);
                }
            }
            tokio::time::sleep(after).await;
            target = match next {
                Next::Leader(leader) => {
                    inner.learn_leader(shard, leader);
                    match (inner.addr_of(leader), leader_addr) {
                        (Some(addr), _) | (None, Some(addr)) => Target {
                            node: Some(leader),
                            addr,
                        },
                        (None, None) => {
                            inner.refresh(shard).await;
                            inner.route(shard, &failed)
                        }
                    }
                }
                Next::RefreshMap => {
                    inner.refresh(shard).await;
                    inner.route(shard, &failed)
                }
                Next::OtherReplica => inner.route(shard, &failed),
            };
            attempt += 1;
        }
    }
}

impl Inner {
    fn read_map(&self) -> std::sync::RwLockReadGuard<'_, ShardMap> {
        self.map.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_map(&self) -> std::sync::RwLockWriteGuard<'_, ShardMap> {
        self.map.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn addr_of(&self, node: u64) -> Option<String> {
        self.read_map().nodes.get(&node).cloned()
    }

    /// Where the next request for `shard` goes: the known leader, else the replicas in
    /// preference order, else any node, else the seeds; addresses in `failed` come last.
    ///
    /// On every request: walks the candidates under the map's read lock and copies out only
    /// the one chosen (the first attempt of a request has no failures, so that is the leader).
    fn route(&self, shard: ShardId, failed: &[String]) -> Target {
        let map = self.read_map();
        let route = map.routes.get(&shard);
        let leader = route.and_then(|r| r.leader);
        let replicas = route.map_or(&[][..], |r| &r.replicas[..]);
        let known = |node: u64| map.nodes.get(&node).map(|addr| (Some(node), addr.as_str()));
        let seeds = self.seeds.iter().map(|addr| {
            let node = map
                .nodes
                .iter()
                .find(|(_, a)| *a == addr)
                .map(|(id, _)| *id);
            (node, addr.as_str())
        });
        let candidates = || {
            leader
                .into_iter()
                .chain(replicas.iter().copied())
                .filter_map(known)
                .chain(map.nodes.keys().copied().filter_map(known))
                .chain(seeds.clone())
        };
        let chosen = candidates()
            .find(|(_, addr)| !failed.iter().any(|f| f == addr))
            .or_else(|| {
                // Everything failed once: start over, least recently failed first.
                failed
                    .first()
                    .and_then(|first| candidates().find(|(_, addr)| *addr == first))
            })
            .or_else(|| candidates().next());
        match chosen {
            Some((node, addr)) => Target {
                node,
                addr: addr.to_owned(),
            },
            None => Target {
                node: None,
                addr: self.seeds[0].clone(),
            },
        }
    }

    /// One attempt at `target`, bounded by `deadline`.
    #[allow(clippy::too_many_arguments)]
    async fn attempt<Req, Resp, F, Fut>(
        &self,
        target: &Target,
        shard: ShardId,
        operation: Operation,
        what: &'static str,
        deadline: Instant,
        request: Req,
        rpc: &F,
    ) -> Result<Resp, Failure>
    where
        F: Fn(kv::kv_client::KvClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let write = operation == Operation::Write;
        let timed_out = || Failure {
            error: Error::Timeout {
                shard,
                operation: what,
                millis: millis(self.options.request_timeout),
                write,
            },
            leader_addr: None,
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(timed_out());
        }
        let channel = self.channels.get(&target.addr).map_err(|error| Failure {
            error,
            leader_addr: None,
        })?;
        let mut request = Request::new(request);
        request.set_timeout(remaining);
        match tokio::time::timeout(remaining, rpc(kv_client(channel), request)).await {
            Ok(Ok(reply)) => Ok(reply.into_inner()),
            Ok(Err(status)) => {
                let from_kvnode = status.metadata().contains_key(wire_status::ERROR_KIND);
                if !from_kvnode
                    && matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded)
                    && Instant::now() >= deadline
                {
                    return Err(timed_out());
                }
                let mut error = from_status(&status, write);
                if !from_kvnode {
                    set_shard(&mut error, shard);
                }
                Err(Failure {
                    error,
                    leader_addr: wire_status::leader_addr(&status),
                })
            }
            Err(_) => Err(timed_out()),
        }
    }

    /// Records that `node` led `shard` (from a redirect or a reply).
    fn learn_leader(&self, shard: ShardId, node: u64) {
        if node == 0 {
            return;
        }
        let mut map = self.write_map();
        if let Some(route) = map.routes.get_mut(&shard) {
            route.leader = Some(node);
        }
    }

    /// Forgets `node` as the leader of `shard` (it did not answer).
    fn forget_leader(&self, shard: ShardId, node: u64) {
        let mut map = self.write_map();
        if let Some(route) = map.routes.get_mut(&shard)
            && route.leader == Some(node)
        {
            route.leader = None;
        }
    }

    /// Asks for `Status` (the shard's replicas first: they know its leader) and merges the
    /// first answer into the map. Failures are ignored: the caller retries anyway.
    async fn refresh(&self, shard: ShardId) {
        let candidates: Vec<String> = {
            let map = self.read_map();
            let replicas = map
                .routes
                .get(&shard)
                .map(|r| r.replicas.clone())
                .unwrap_or_default();
            replicas
                .iter()
                .filter_map(|n| map.nodes.get(n).cloned())
                .chain(map.nodes.values().cloned())
                .chain(self.seeds.iter().cloned())
                .collect()
        };
        let timeout = self.options.request_timeout.min(Duration::from_secs(1));
        for addr in dedup(candidates) {
            if let Ok(status) = self.channels.status(&addr, timeout).await {
                self.merge(&status, &addr);
                return;
            }
        }
    }

    fn merge(&self, status: &kv::StatusResponse, via: &str) {
        let mut map = self.write_map();
        if let Err(e) = map.merge(status, via) {
            tracing::warn!(via, error = %e, "ignoring a node's status");
        }
    }
}

impl ShardMap {
    /// The map `status` describes; `via` is the address that answered.
    fn from_status(status: &kv::StatusResponse, via: &str) -> Result<ShardMap> {
        let ring = HashRing::with_shards(status.shard_count)
            .map_err(|e| Error::InvalidArgument(format!("node {} at {via}: {e}", status.node)))?;
        let mut map = ShardMap {
            cluster_id: status.cluster_id.clone(),
            ring,
            nodes: BTreeMap::new(),
            routes: BTreeMap::new(),
        };
        map.merge(status, via)?;
        Ok(map)
    }

    /// Merges what `status` says: node addresses, replicas, and a shard's leader when the
    /// status names one in a term at least as recent as the one known.
    fn merge(&mut self, status: &kv::StatusResponse, via: &str) -> Result<()> {
        if status.cluster_id != self.cluster_id {
            return Err(Error::InvalidArgument(format!(
                "node {} at {via} belongs to cluster {:?}, not {:?}",
                status.node, status.cluster_id, self.cluster_id
            )));
        }
        if status.shard_count != self.ring.shard_count() {
            return Err(Error::InvalidArgument(format!(
                "node {} at {via} reports {} shards, not {}",
                status.node,
                status.shard_count,
                self.ring.shard_count()
            )));
        }
        for (id, addr) in node_addrs(status, via) {
            self.nodes.insert(id, addr);
        }
        for s in &status.shards {
            let route = self.routes.entry(s.shard).or_default();
            if !s.replicas.is_empty() {
                route.replicas.clone_from(&s.replicas);
            }
            if s.term > 0 && s.term >= route.term {
                // A replica in a newer term that knows no leader: an election is on.
                route.leader = (s.leader != 0).then_some(s.leader);
                route.term = s.term;
            }
        }
        Ok(())
    }
}

/// The node addresses in `status`; the answering node may not know its own client address
/// (an embedded node reports none), so it gets `via`.
fn node_addrs(status: &kv::StatusResponse, via: &str) -> BTreeMap<u64, String> {
    let mut nodes: BTreeMap<u64, String> = status
        .nodes
        .iter()
        .filter(|n| !n.addr.is_empty())
        .map(|n| (n.id, n.addr.clone()))
        .collect();
    nodes.entry(status.node).or_insert_with(|| via.to_string());
    nodes
}

fn cluster_status(status: kv::StatusResponse, via: &str) -> ClusterStatus {
    let nodes = node_addrs(&status, via);
    let mut shards: Vec<ShardStatus> = status
        .shards
        .into_iter()
        .map(|s| ShardStatus {
            shard: s.shard,
            replicas: s.replicas,
            leader: (s.leader != 0).then_some(s.leader),
            term: s.term,
            commit_index: s.commit_index,
            applied_index: s.applied_index,
            role: s.role,
            hibernating: s.hibernating,
        })
        .collect();
    shards.sort_by_key(|s| s.shard);
    ClusterStatus {
        node: status.node,
        cluster_id: status.cluster_id,
        shard_count: status.shard_count,
        replication_factor: status.replication_factor,
        nodes,
        shards,
        planted_bug: (!status.planted_bug.is_empty()).then_some(status.planted_bug),
    }
}

/// One lazily connected channel per address, shared by every request to it.
#[derive(Debug)]
struct Channels {
    options: ClientOptions,
    by_addr: Mutex<HashMap<String, Channel>>,
}

impl Channels {
    fn new(options: ClientOptions) -> Channels {
        Channels {
            options,
            by_addr: Mutex::new(HashMap::new()),
        }
    }

    /// The channel to `addr` (`host:port`, or a URL), created on first use.
    fn get(&self, addr: &str) -> Result<Channel> {
        let mut channels = self.by_addr.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let channel = Endpoint::from_shared(uri)
            .map_err(|e| Error::InvalidArgument(format!("bad node address {addr:?}: {e}")))?
            .connect_timeout(self.options.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// Asks the node at `addr` for its status, within `timeout`.
    async fn status(&self, addr: &str, timeout: Duration) -> Result<kv::StatusResponse> {
        let mut client = kv_client(self.get(addr)?);
        let mut request = Request::new(kv::StatusRequest {});
        request.set_timeout(timeout);
        let timed_out = || Error::Timeout {
            shard: 0,
            operation: "status",
            millis: millis(timeout),
            write: false,
        };
        match tokio::time::timeout(timeout, client.status(request)).await {
            Ok(Ok(reply)) => Ok(reply.into_inner()),
            Ok(Err(status)) => Err(match from_status(&status, false) {
                Error::Unavailable { reason, .. } => Error::Unavailable {
                    shard: 0,
                    reason: format!("{addr}: {reason}"),
                },
                other => other,
            }),
            Err(_) => Err(timed_out()),
        }
    }
}

fn kv_client(channel: Channel) -> kv::kv_client::KvClient<Channel> {
    kv::kv_client::KvClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// A transport failure carries no shard: name the one the request was for.
fn set_shard(error: &mut Error, shard: ShardId) {
    if let Error::Unavailable { shard: s, .. } | Error::Timeout { shard: s, .. } = error {
        *s = shard;
    }
}

/// A reply the client cannot understand (a server bug or a version mismatch). For a write the
/// server said it succeeded, but the client cannot prove it, so the outcome is indeterminate.
fn malformed(shard: ShardId, operation: Operation, what: &str) -> Error {
    match operation {
        Operation::Read => Error::InvalidArgument(format!("malformed reply: {what}")),
        Operation::Write => Error::ShardStopped {
            shard,
            reason: format!("malformed reply (the write may have committed): {what}"),
        },
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `addrs` without repeats, first occurrence kept.
fn dedup(addrs: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    addrs
        .into_iter()
        .filter(|a| seen.insert(a.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(node: u64, leader: u64, term: u64) -> kv::StatusResponse {
        kv::StatusResponse {
            node,
            cluster_id: "c".into(),
            shard_count: 2,
            replication_factor: 3,
            nodes: (1..=3)
                .map(|id| kv::NodeInfo {
                    id,
                    addr: format!("10.0.0.{id}:7000"),
                })
                .collect(),
            shards: vec![
                kv::ShardStatus {
                    shard: 0,
                    replicas: vec![2, 3, 1],
                    leader,
                    term,
                    ..Default::default()
                },
                kv::ShardStatus {
                    shard: 1,
                    replicas: vec![3, 1, 2],
                    ..Default::default()
                },
            ],
            planted_bug: String::new(),
        }
    }

    fn inner(map: ShardMap) -> Inner {
        Inner {
            options: ClientOptions::default(),
            seeds: vec!["seed:1".into()],
            map: RwLock::new(map),
            channels: Channels::new(ClientOptions::default()),
        }
    }

    #[test]
    fn routes_to_the_leader_then_the_replicas_in_order() {
        let i = inner(ShardMap::from_status(&status(1, 3, 5), "10.0.0.1:7000").unwrap());
        assert_eq!(i.route(0, &[]).node, Some(3));
        // The leader failed: the preferred replica next, then the others.
        assert_eq!(i.route(0, &["10.0.0.3:7000".into()]).node, Some(2));
        // No leader known: preferred replica first.
        assert_eq!(i.route(1, &[]).node, Some(3));
        // Everything failed: start over with the first failure.
        let all: Vec<String> = ["10.0.0.2:7000", "10.0.0.3:7000", "10.0.0.1:7000", "seed:1"]
            .map(String::from)
            .to_vec();
        assert_eq!(i.route(0, &all).addr, "10.0.0.2:7000");
    }

    #[test]
    fn a_leader_is_replaced_only_by_a_view_at_least_as_recent() {
        let mut map = ShardMap::from_status(&status(1, 3, 5), "x").unwrap();
        map.merge(&status(2, 2, 4), "x").unwrap();
        assert_eq!(map.routes[&0].leader, Some(3), "older term ignored");
        map.merge(&status(2, 0, 6), "x").unwrap();
        assert_eq!(map.routes[&0].leader, None, "newer term without a leader");
        map.merge(&status(2, 2, 6), "x").unwrap();
        assert_eq!(map.routes[&0].leader, Some(2));
        let mut other = status(2, 2, 7);
        other.cluster_id = "other".into();
        assert!(map.merge(&other, "x").is_err());
        assert_eq!(map.routes[&0].leader, Some(2));
    }

    #[test]
    fn an_embedded_node_without_an_address_is_reached_where_it_answered() {
        let mut s = status(1, 1, 1);
        s.nodes = vec![kv::NodeInfo {
            id: 1,
            addr: String::new(),
        }];
        let c = cluster_status(s, "127.0.0.1:9");
        assert_eq!(c.nodes[&1], "127.0.0.1:9");
    }
}
