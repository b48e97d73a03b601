//! The admin API service (`proto/admin.proto`): the cluster map as this node knows it, and the
//! calls that change membership. Thin, like [`super::kv`]: read the node's map view, or ask
//! the node to register a node on META, and encode (`pb::cluster_map`).
//!
//! The two reads answer from the node's own view rather than a linearizable read of the META
//! group: the view is what this node routes by, which is what an operator debugging a node
//! needs to see, and it stays readable while META has no quorum (design §9 R2). A caller that
//! wants the newest map compares `epoch` across nodes; the client does.
//!
//! `Join` and `AddNode` are decided on META's leader only (its applied map is the one the
//! idempotence-by-address rule must see), so any other node forwards them: to the leader its
//! META replica knows, else to each of META's voters in the map, at most `MAX_HOPS` hops
//! (counted in `HOPS`), each bounded by the node's request timeout and all of them by the
//! client's deadline (`grpc-timeout`). A refusal is passed back unchanged; a transport
//! failure tries the next voter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};

use crate::cluster::membership::{ClusterMap, META};
use crate::error::Error;
use crate::node::Node;
use crate::pb::admin::admin_client::AdminClient;
use crate::pb::admin::admin_server::{Admin, AdminServer};
use crate::pb::admin::{
    AddNodeRequest, ClusterMapReply, GetClusterMapRequest, JoinReply, JoinRequest, ListNodesReply,
    ListNodesRequest, NodeReply,
};
use crate::pb::cluster_map::{node_summaries, to_wire};
use crate::pb::status::{ERROR_KIND, parse_grpc_timeout, to_status};

/// Request metadata: how many nodes have forwarded this `Join` already.
pub(crate) const HOPS: &str = "x-kvnode-join-hops";
/// A `Join` forwarded this many times is refused `Unavailable` (META's leader keeps moving,
/// or the nodes disagree about it).
pub(crate) const MAX_HOPS: u32 = 3;

/// The admin API of a node.
#[derive(Debug, Clone)]
pub struct AdminService {
    node: Arc<Node>,
}

/// The tonic service for `node`.
pub fn admin_service(node: Arc<Node>) -> AdminServer<AdminService> {
    AdminServer::new(AdminService { node })
}

fn status(error: &Error) -> Status {
    to_status(error, |_| None)
}

impl AdminService {
    /// The node's map, or `Unavailable` (definite: nothing was changed) if it knows none yet.
    fn map(&self) -> Result<Arc<ClusterMap>, Status> {
        self.node.cluster_map().ok_or_else(|| {
            status(&Error::Unavailable {
                shard: META,
                reason: "this node does not know the cluster map yet (the metadata group \
                         has not answered since it started)"
                    .into(),
            })
        })
    }

    /// Registers `request.addr` on META's leader, here or through forwarding.
    async fn join_here_or_forward(
        &self,
        request: JoinRequest,
        hops: u32,
        client_timeout: Option<Duration>,
    ) -> Result<JoinReply, Status> {
        let started = Instant::now();
        let map = self.map()?;
        if !request.cluster_name.is_empty() && request.cluster_name != map.name {
            return Err(status(&Error::WrongCluster {
                cluster: map.name.clone(),
                requested: request.cluster_name,
            }));
        }
        let me = self.node.id();
        if self.node.meta_leader() == Some(me) {
            match self.node.register_node(&request.addr).await {
                Ok((id, map)) => {
                    return Ok(JoinReply {
                        node_id: id,
                        cluster_uuid: map.cluster_uuid.to_be_bytes().to_vec(),
                        map: Some(to_wire(&map)),
                    });
                }
                // Lost the leadership meanwhile: forward like any other node.
                Err(Error::NotLeader { .. }) => {}
                Err(e) => return Err(status(&e)),
            }
        }
        if hops >= MAX_HOPS {
            return Err(status(&Error::Unavailable {
                shard: META,
                reason: format!("no leader of the metadata group found within {MAX_HOPS} hops"),
            }));
        }
        let mut targets: Vec<u64> = self.node.meta_leader().into_iter().collect();
        if let Some(voters) = map.shards.get(&META) {
            targets.extend(voters.voters.iter().map(|r| r.node));
        }
        let mut seen = std::collections::BTreeSet::from([me]);
        targets.retain(|t| seen.insert(*t));
        let peers = self.node.peers();
        let node_timeout = self.node.config().request_timeout();
        let mut last = None;
        for target in targets {
            // Each hop gets the node's request timeout, capped by what is left of the client's.
            let timeout = match client_timeout {
                Some(t) => node_timeout.min(t.saturating_sub(started.elapsed())),
                None => node_timeout,
            };
            if timeout.is_zero() {
                break;
            }
            let Some(channel) = peers.and_then(|p| p.forward_channel(target)) else {
                continue;
            };
            let mut forwarded = Request::new(request.clone());
            forwarded.set_timeout(timeout);
            forwarded
                .metadata_mut()
                .insert(HOPS, tonic::metadata::MetadataValue::from(hops + 1));
            let mut client = AdminClient::new(channel);
            let call = client.join(forwarded);
            match tokio::time::timeout(timeout, call).await {
                Ok(Ok(reply)) => return Ok(reply.into_inner()),
                // A kvnode handler's refusal (already exists, wrong cluster, invalid): final.
                Ok(Err(s)) if is_refusal(&s) => return Err(s),
                Ok(Err(s)) => last = Some(format!("node {target}: {}", s.message())),
                Err(_) => last = Some(format!("node {target}: no answer in {timeout:?}")),
            }
        }
        Err(status(&Error::Unavailable {
            shard: META,
            reason: format!(
                "no leader of the metadata group could register the node (last: {})",
                last.unwrap_or_else(|| "no META voter is reachable".into())
            ),
        }))
    }
}

/// True if `s` is a definite refusal another META voter would repeat.
fn is_refusal(s: &Status) -> bool {
    let kind = s.metadata().get(ERROR_KIND).and_then(|v| v.to_str().ok());
    matches!(
        kind,
        Some("AlreadyExists" | "WrongCluster" | "InvalidArgument")
    )
}

fn hops_of<T>(request: &Request<T>) -> u32 {
    request
        .metadata()
        .get(HOPS)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0)
}

/// The client's deadline (`grpc-timeout`), if it sent one.
fn timeout_of<T>(request: &Request<T>) -> Option<Duration> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    parse_grpc_timeout(value)
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_cluster_map(
        &self,
        _request: Request<GetClusterMapRequest>,
    ) -> Result<Response<ClusterMapReply>, Status> {
        let map = self.map()?;
        Ok(Response::new(ClusterMapReply {
            node: self.node.id(),
            map: Some(to_wire(&map)),
        }))
    }

    async fn list_nodes(
        &self,
        _request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesReply>, Status> {
        let map = self.map()?;
        Ok(Response::new(ListNodesReply {
            node: self.node.id(),
            epoch: map.epoch,
            cluster_name: map.name.clone(),
            nodes: node_summaries(&map),
        }))
    }

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        let (hops, timeout) = (hops_of(&request), timeout_of(&request));
        let reply = self
            .join_here_or_forward(request.into_inner(), hops, timeout)
            .await?;
        Ok(Response::new(reply))
    }

    async fn add_node(
        &self,
        request: Request<AddNodeRequest>,
    ) -> Result<Response<NodeReply>, Status> {
        let (hops, timeout) = (hops_of(&request), timeout_of(&request));
        let join = JoinRequest {
            addr: request.into_inner().addr,
            cluster_name: String::new(),
        };
        let reply = self.join_here_or_forward(join, hops, timeout).await?;
        Ok(Response::new(NodeReply {
            node_id: reply.node_id,
            epoch: reply.map.map_or(0, |m| m.epoch),
        }))
    }
}
