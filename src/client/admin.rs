//! The client's admin calls (`proto/admin.proto`): the cluster map, the node list, and
//! registering a node (`add_node`, and `join` for `kvnode --join`).
//!
//! A map is only as new as the node that answered. [`Client::cluster_map`] asks every node the
//! client knows at once and keeps the highest epoch, so an operator never sees an older map
//! than a reachable node has; [`Client::cluster_map_at`] asks one node (to see what *it*
//! routes by).

use std::time::Duration;

use futures::future::join_all;
use tonic::Request;
use tonic::transport::Channel;

use super::{Client, dedup, millis};
use crate::cluster::membership::{ClusterMap, NodeId, NodeState};
use crate::error::{Error, Result};
use crate::pb::admin::admin_client::AdminClient;
use crate::pb::admin::{self, AddNodeRequest, GetClusterMapRequest, JoinRequest, ListNodesRequest};
use crate::pb::cluster_map::{from_wire, state_from_wire};
use crate::pb::status::from_status;

/// One node of the cluster map, with what it holds: a row of `kvctl node list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSummary {
    /// The node id (never reused).
    pub id: NodeId,
    /// Its client and peer address.
    pub addr: String,
    /// Where it is in its life cycle.
    pub state: NodeState,
    /// What placement ranks it by (its own id, or the id of the node it replaced).
    pub placement_key: u64,
    /// The map epoch at which it entered `state`.
    pub since_epoch: u64,
    /// Voter replicas it holds, the metadata group's included.
    pub replicas: u32,
    /// Replicas a move in progress is adding on it.
    pub incoming: u32,
}

/// What a join answered: the node's id and the map that lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// The joining node's id.
    pub id: NodeId,
    /// A map in which it is registered (its cluster name and uuid are the cluster's).
    pub map: ClusterMap,
}

/// The node list of one map: the reply to `ListNodes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeList {
    /// The node that answered.
    pub answered_by: NodeId,
    /// The epoch of its map.
    pub epoch: u64,
    /// The cluster's name.
    pub cluster_name: String,
    /// Every node ever registered, `Removed` ones included, in id order.
    pub nodes: Vec<NodeSummary>,
}

impl Client {
    /// The newest cluster map any known node has: every node the client knows (and the seeds)
    /// is asked at once, and the highest epoch wins.
    ///
    /// # Errors
    ///
    /// If no node answers, the error of the last one asked (`Unavailable` when none could be
    /// reached, or none knows a map yet).
    pub async fn cluster_map(&self) -> Result<ClusterMap> {
        let timeout = self.inner.options.request_timeout;
        let answers = join_all(
            self.candidates()
                .into_iter()
                .map(|addr| async move { self.map_from(&addr, timeout).await }),
        )
        .await;
        let mut best: Option<ClusterMap> = None;
        let mut last = None;
        for answer in answers {
            match answer {
                Ok((_, map)) if best.as_ref().is_none_or(|b| map.epoch > b.epoch) => {
                    best = Some(map)
                }
                Ok(_) => {}
                Err(e) => last = Some(e),
            }
        }
        best.ok_or_else(|| last.unwrap_or_else(no_node))
    }

    /// The cluster map node `node` routes by (it may be older than another node's).
    ///
    /// # Errors
    ///
    /// `InvalidArgument` if the client knows no such node; otherwise the node's error.
    pub async fn cluster_map_at(&self, node: NodeId) -> Result<ClusterMap> {
        let addr = self.addr_of(node)?;
        let (_, map) = self
            .map_from(&addr, self.inner.options.request_timeout)
            .await?;
        Ok(map)
    }

    /// The node list of the first node that answers (known nodes first, then the seeds).
    ///
    /// # Errors
    ///
    /// As [`Client::cluster_map`].
    pub async fn list_nodes(&self) -> Result<NodeList> {
        let timeout = self.inner.options.request_timeout;
        let mut last = None;
        for addr in self.candidates() {
            let mut request = Request::new(ListNodesRequest {});
            request.set_timeout(timeout);
            let answer = self
                .admin_call(
                    &addr,
                    timeout,
                    "list nodes",
                    request,
                    |mut c, r| async move { c.list_nodes(r).await },
                )
                .await
                .and_then(node_list);
            match answer {
                Ok(list) => return Ok(list),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(no_node))
    }

    /// Registers a node at `addr` ahead of its start (`kvctl node add ADDR`); the node later
    /// started with `kvnode --join` at `addr` gets this id. Idempotent: an address a Joining
    /// node has answers that node's id.
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyExists`] if a node past Joining has `addr` and
    /// [`Error::InvalidArgument`] if it is not `host:port` (both definite); otherwise the last
    /// node's error (`Unavailable` when no node could register it).
    pub async fn add_node(&self, addr: &str) -> Result<NodeId> {
        let reply = self
            .each_candidate("add node", |mut c, timeout| {
                let mut request = Request::new(AddNodeRequest {
                    addr: addr.to_string(),
                });
                request.set_timeout(timeout);
                async move { c.add_node(request).await }
            })
            .await?;
        Ok(reply.node_id)
    }

    /// Joins the node at `addr` to the cluster named `cluster_name` (empty: whichever cluster
    /// the client reaches): what `kvnode --join` calls. Idempotent like [`Client::add_node`].
    ///
    /// # Errors
    ///
    /// As [`Client::add_node`], and [`Error::WrongCluster`] if the cluster has another name.
    pub async fn join(&self, addr: &str, cluster_name: &str) -> Result<Joined> {
        let reply = self
            .each_candidate("join", |mut c, timeout| {
                let mut request = Request::new(JoinRequest {
                    addr: addr.to_string(),
                    cluster_name: cluster_name.to_string(),
                });
                request.set_timeout(timeout);
                async move { c.join(request).await }
            })
            .await?;
        let map = reply.map.as_ref().ok_or_else(|| {
            Error::InvalidArgument("the Join reply carries no cluster map".into())
        })?;
        Ok(Joined {
            id: reply.node_id,
            map: from_wire(map)?,
        })
    }

    /// Calls `rpc` on each candidate in turn until one answers or refuses definitely.
    async fn each_candidate<Resp, F, Fut>(&self, operation: &'static str, rpc: F) -> Result<Resp>
    where
        F: Fn(AdminClient<Channel>, Duration) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let timeout = self.inner.options.request_timeout;
        let mut last = None;
        for addr in self.candidates() {
            let answer = self
                .admin_call(&addr, timeout, operation, (), |c, ()| rpc(c, timeout))
                .await;
            match answer {
                Ok(reply) => return Ok(reply),
                Err(
                    e @ (Error::AlreadyExists(_)
                    | Error::WrongCluster { .. }
                    | Error::InvalidArgument(_)),
                ) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(no_node))
    }

    /// Known nodes' addresses, then the seeds, without repeats.
    pub(super) fn candidates(&self) -> Vec<String> {
        let mut candidates: Vec<String> = self.inner.read_map().nodes.values().cloned().collect();
        candidates.extend(self.inner.seeds.iter().cloned());
        dedup(candidates)
    }

    pub(super) fn addr_of(&self, node: NodeId) -> Result<String> {
        self.inner
            .read_map()
            .nodes
            .get(&node)
            .cloned()
            .ok_or_else(|| Error::InvalidArgument(format!("unknown node {node}")))
    }

    async fn map_from(&self, addr: &str, timeout: Duration) -> Result<(NodeId, ClusterMap)> {
        let mut request = Request::new(GetClusterMapRequest {});
        request.set_timeout(timeout);
        let reply = self
            .admin_call(
                addr,
                timeout,
                "get cluster map",
                request,
                |mut c, r| async move { c.get_cluster_map(r).await },
            )
            .await?;
        let map = reply.map.as_ref().ok_or_else(|| {
            Error::InvalidArgument(format!("{addr} answered GetClusterMap without a map"))
        })?;
        Ok((reply.node, from_wire(map)?))
    }

    /// One admin call to `addr`, bounded by `timeout`; a transport failure names `addr`.
    async fn admin_call<Req, Resp, F, Fut>(
        &self,
        addr: &str,
        timeout: Duration,
        operation: &'static str,
        request: Req,
        rpc: F,
    ) -> Result<Resp>
    where
        F: FnOnce(AdminClient<Channel>, Req) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let client = AdminClient::new(self.inner.channels.get(addr)?);
        match tokio::time::timeout(timeout, rpc(client, request)).await {
            Ok(Ok(reply)) => Ok(reply.into_inner()),
            Ok(Err(status)) => Err(match from_status(&status, false) {
                Error::Unavailable { shard, reason } => Error::Unavailable {
                    shard,
                    reason: format!("{addr}: {reason}"),
                },
                other => other,
            }),
            Err(_) => Err(Error::Timeout {
                shard: 0,
                operation,
                millis: millis(timeout),
                write: false,
            }),
        }
    }
}

fn node_list(reply: admin::ListNodesReply) -> Result<NodeList> {
    let nodes = reply
        .nodes
        .iter()
        .map(|row| {
            let n = row.node.as_ref().ok_or_else(|| {
                Error::InvalidArgument("ListNodes answered a row without a node".into())
            })?;
            Ok(NodeSummary {
                id: n.id,
                addr: n.addr.clone(),
                state: state_from_wire(n.state).ok_or_else(|| {
                    Error::InvalidArgument(format!("node {} has unknown state {}", n.id, n.state))
                })?,
                placement_key: n.placement_key,
                since_epoch: n.since_epoch,
                replicas: row.replicas,
                incoming: row.incoming,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(NodeList {
        answered_by: reply.node,
        epoch: reply.epoch,
        cluster_name: reply.cluster_name,
        nodes,
    })
}

/// The error when the client has no node to ask.
pub(super) fn no_node() -> Error {
    Error::Unavailable {
        shard: 0,
        reason: "no node known".into(),
    }
}
