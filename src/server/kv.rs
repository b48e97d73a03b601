//! The client API service: decode, ask the node, encode. Any node accepts any request: when
//! the key's shard has no replica here, or the request needs the leader and this replica is
//! not it, the request is forwarded (over the shared peer channel) to the node that can serve
//! it, at most [`MAX_HOPS`] times, and the answer relayed unchanged.

use std::sync::Arc;

use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::node::Node;
use crate::pb::convert;
use crate::pb::kv::kv_client::KvClient;
use crate::pb::kv::kv_server::{Kv, KvServer};
use crate::pb::kv::{
    CompareAndSetRequest, CompareAndSetResponse, DeleteRequest, DeleteResponse, GetRequest,
    GetResponse, NodeInfo, PutRequest, PutResponse, ShardStatus, StatusRequest, StatusResponse,
};
use crate::server::status::{FORWARDED, to_status};

/// How many times one node forwards one request before giving up with the last error.
pub const MAX_HOPS: usize = 2;

/// Largest gRPC message accepted or sent (a value up to the configured maximum plus framing).
pub const MAX_MESSAGE_BYTES: usize = 80 * 1024 * 1024;

/// The client API of a node.
#[derive(Debug, Clone)]
pub struct KvService {
    node: Arc<Node>,
}

/// The tonic service for `node`.
pub fn kv_service(node: Arc<Node>) -> KvServer<KvService> {
    KvServer::new(KvService { node })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

impl KvService {
    fn status(&self, e: &Error) -> Status {
        let peers = self.node.peers().cloned();
        to_status(e, move |id| {
            peers.as_ref().and_then(|p| p.addr(id)).map(str::to_string)
        })
    }

    /// Where to send a request for `key` that this node cannot serve after `error`, if
    /// anywhere: the leader it names, or (no local replica) the shard's preferred replica.
    fn forward_target(&self, key: &[u8], error: &Error) -> Option<u64> {
        let me = self.node.id();
        let target = match error {
            Error::NotLeader {
                leader_hint: Some(leader),
                ..
            } => Some(*leader),
            Error::Unavailable { shard, .. } if self.node.local_shard(*shard).is_none() => self
                .node
                .replicas(self.node.shard_for(key))
                .iter()
                .copied()
                .find(|r| *r != me),
            _ => None,
        };
        target.filter(|t| *t != me)
    }

    fn client(&self, node: u64) -> Option<KvClient<tonic::transport::Channel>> {
        let channel = self.node.peers()?.channel(node)?;
        Some(
            KvClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }

    /// Serves `request` locally with `local`; on an error another node can resolve, forwards
    /// it there with `remote` (unless it already was forwarded).
    async fn serve<Req, Resp, L, LF, R, RF>(
        &self,
        request: Request<Req>,
        key: impl Fn(&Req) -> Vec<u8>,
        write: bool,
        local: L,
        remote: R,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Clone,
        L: Fn(Req) -> LF,
        LF: Future<Output = Result<Resp, Error>>,
        R: Fn(KvClient<tonic::transport::Channel>, Request<Req>) -> RF,
        RF: Future<Output = Result<Response<Resp>, Status>>,
    {
        let forwarded = request.metadata().contains_key(FORWARDED);
        let body = request.into_inner();
        let key = key(&body);
        let mut error = match local(body.clone()).await {
            Ok(resp) => return Ok(Response::new(resp)),
            Err(e) => e,
        };
        if let Error::InvalidArgument(reason) = &error {
            tracing::warn!(%reason, "rejected a malformed client request");
            return Err(self.status(&error));
        }
        if forwarded {
            return Err(self.status(&error));
        }
        for _ in 0..MAX_HOPS {
            let Some(target) = self.forward_target(&key, &error) else {
                break;
            };
            let Some(client) = self.client(target) else {
                break;
            };
            let mut req = Request::new(body.clone());
            req.metadata_mut()
                .insert(FORWARDED, MetadataValue::from(self.node.id()));
            req.set_timeout(self.node.config().request_timeout());
            match remote(client, req).await {
                Ok(resp) => return Ok(resp),
                Err(status) => {
                    let remote_error = crate::server::status::from_status(&status, write);
                    // A kvnode answer is relayed as is; a transport failure keeps its outcome.
                    if !matches!(remote_error, Error::NotLeader { .. }) {
                        return Err(status);
                    }
                    error = remote_error;
                }
            }
        }
        Err(self.status(&error))
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let node = &self.node;
        self.serve(
            request,
            |r| r.key.clone(),
            false,
            |r: GetRequest| async move {
                let options = convert::read_options(r.options.as_ref())?;
                let got = node.get(&r.key, &options).await?;
                Ok(GetResponse {
                    value: got.value.as_ref().map(convert::value),
                    receipt: Some(convert::read_receipt(&got.receipt)),
                })
            },
            |mut c, req| async move { c.get(req).await },
        )
        .await
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let node = &self.node;
        self.serve(
            request,
            |r| r.key.clone(),
            true,
            |r: PutRequest| async move {
                let w = node.put(&r.key, r.value).await?;
                Ok(PutResponse {
                    receipt: Some(convert::write_receipt(&w, node.id())),
                })
            },
            |mut c, req| async move { c.put(req).await },
        )
        .await
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let node = &self.node;
        self.serve(
            request,
            |r| r.key.clone(),
            true,
            |r: DeleteRequest| async move {
                let d = node.delete(&r.key).await?;
                Ok(DeleteResponse {
                    existed: d.existed,
                    receipt: Some(convert::write_receipt(&d.receipt, node.id())),
                })
            },
            |mut c, req| async move { c.delete(req).await },
        )
        .await
    }

    async fn compare_and_set(
        &self,
        request: Request<CompareAndSetRequest>,
    ) -> Result<Response<CompareAndSetResponse>, Status> {
        let node = &self.node;
        self.serve(
            request,
            |r| r.key.clone(),
            true,
            |r: CompareAndSetRequest| async move {
                let c = node
                    .compare_and_set(&r.key, r.expected.as_deref(), r.new_value)
                    .await?;
                Ok(CompareAndSetResponse {
                    applied: c.applied,
                    current: c.current.as_ref().map(convert::value),
                    receipt: Some(convert::write_receipt(&c.receipt, node.id())),
                })
            },
            |mut c, req| async move { c.compare_and_set(req).await },
        )
        .await
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let node = &self.node;
        let config = node.config();
        let nodes = match node.peers() {
            Some(peers) => peers
                .node_ids()
                .map(|id| NodeInfo {
                    id,
                    addr: peers.addr(id).unwrap_or_default().to_string(),
                })
                .collect(),
            None => vec![NodeInfo {
                id: node.id(),
                addr: String::new(),
            }],
        };
        let shards = node
            .status()
            .into_iter()
            .map(|(shard, replicas, view)| {
                let view = view.as_ref();
                ShardStatus {
                    shard,
                    replicas,
                    leader: view.and_then(|v| v.leader).unwrap_or(0),
                    term: view.map_or(0, |v| v.term),
                    commit_index: view.and_then(|v| v.commit_index).unwrap_or(0),
                    applied_index: view.and_then(|v| v.applied_index).unwrap_or(0),
                    role: view.map_or("", |v| v.role).to_string(),
                    hibernating: view.is_some_and(|v| v.hibernating),
                }
            })
            .collect();
        Ok(Response::new(StatusResponse {
            node: node.id(),
            cluster_id: config.cluster_id.clone(),
            shard_count: config.shards,
            // Effective: capped by the number of nodes.
            replication_factor: config.replication_factor.min(config.node_ids().len()) as u32,
            nodes,
            shards,
            planted_bug: planted_bug(),
        }))
    }
}

/// What a `Status` reply says of planted bugs: empty unless this is the test-only
/// `kvnode-planted` binary (see `crate::planted`).
fn planted_bug() -> String {
    #[cfg(feature = "planted-bugs")]
    if crate::planted::is_test_binary() {
        return crate::planted::active().map_or("none", |b| b.name()).to_string();
    }
    String::new()
}
