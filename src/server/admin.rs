//! The admin API service (`proto/admin.proto`): the cluster map as this node knows it. Thin,
//! like [`super::kv`]: read the node's map view, encode (`pb::cluster_map`).
//!
//! Both calls answer from the node's own view rather than a linearizable read of the META
//! group: the view is what this node routes by, which is what an operator debugging a node
//! needs to see, and it stays readable while META has no quorum (design §9 R2). A caller that
//! wants the newest map compares `epoch` across nodes; the client does.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::cluster::membership::{ClusterMap, META};
use crate::error::Error;
use crate::node::Node;
use crate::pb::admin::admin_server::{Admin, AdminServer};
use crate::pb::admin::{ClusterMapReply, GetClusterMapRequest, ListNodesReply, ListNodesRequest};
use crate::pb::cluster_map::{node_summaries, to_wire};
use crate::pb::status::to_status;

/// The admin API of a node.
#[derive(Debug, Clone)]
pub struct AdminService {
    node: Arc<Node>,
}

/// The tonic service for `node`.
pub fn admin_service(node: Arc<Node>) -> AdminServer<AdminService> {
    AdminServer::new(AdminService { node })
}

impl AdminService {
    /// The node's map, or `Unavailable` (definite: nothing was changed) if it knows none yet.
    fn map(&self) -> Result<Arc<ClusterMap>, Status> {
        self.node.cluster_map().ok_or_else(|| {
            to_status(
                &Error::Unavailable {
                    shard: META,
                    reason: "this node does not know the cluster map yet (the metadata group \
                             has not answered since it started)"
                        .into(),
                },
                |_| None,
            )
        })
    }
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
}
