//! The client API service: decode, ask the node, encode. Any node accepts any request: when
//! the key's shard has no replica here, or the request needs the leader and this replica is
//! not it, the request is forwarded to the node that can serve it, at most [`MAX_HOPS`] times.
//!
//! # Forwarding keeps the wire contract
//!
//! Every error a client gets from a node carries `x-kvnode-outcome` (`proto/kv.proto`), the
//! answer to a forwarded request included (and the statuses tonic makes around the handlers:
//! decode errors, unknown methods, the client's deadline; see `server::outcome`):
//!
//! - the target's own answer (a status with the outcome) is relayed unchanged, except that a
//!   `NotLeader` is followed to the leader it names;
//! - a forwarded call that failed in the transport is classified by
//!   `status::forward_failure` and answered through [`to_status`]. It is *definite*
//!   only if no connection could be made (the request never left this node); once connected,
//!   the request may have reached the leader, so a write that fails (reset, HTTP/2 error,
//!   deadline, a status without outcome) is *indeterminate*: it may still commit, and a client
//!   must not retry it blindly. A read is definite either way.
//!
//! Relaying cannot turn an indeterminate outcome into a definite one: an indeterminate answer
//! ends forwarding at once, and only a definite `NotLeader` (the target did nothing) moves on
//! to the next hop.
//!
//! A forwarded request carries the client's remaining deadline (`grpc-timeout`, capped by the
//! node's request timeout), so the target drops its work when the client gives up, not later;
//! with no time left, nothing is forwarded. Forwarded requests travel on their own connection
//! to each peer (`Peers::forward_channel` in `raft::network`), never on the one carrying Raft
//! traffic: cancelled client requests reset streams, and a burst of those (h2 answers too many
//! resets with GOAWAY `ENHANCE_YOUR_CALM`) would otherwise close the connection replication
//! runs on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::node::Node;
use crate::pb::MAX_MESSAGE_BYTES;
use crate::pb::convert;
use crate::pb::kv::kv_client::KvClient;
use crate::pb::kv::kv_server::{Kv, KvServer};
use crate::pb::kv::{
    CompareAndSetRequest, CompareAndSetResponse, DeleteRequest, DeleteResponse, GetRequest,
    GetResponse, NodeInfo, PutRequest, PutResponse, ShardStatus, StatusRequest, StatusResponse,
};
use crate::pb::status::{
    FORWARDED, forward_failure, from_status, is_kvnode_status, parse_grpc_timeout, to_status,
};

/// How many times one node forwards one request before giving up with the last error.
pub const MAX_HOPS: usize = 2;

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
        to_status(e, move |id| peers.as_ref().and_then(|p| p.addr(id)))
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
        let channel = self.node.peers()?.forward_channel(node)?;
        Some(
            KvClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }

    /// How long a request forwarded now may take: the node's request timeout, capped by what
    /// is left of the client's `deadline`.
    fn forward_budget(&self, deadline: Option<Instant>) -> Duration {
        let budget = self.node.config().request_timeout();
        deadline.map_or(budget, |d| {
            budget.min(d.saturating_duration_since(Instant::now()))
        })
    }

    /// Serves `request` locally with `local`; on an error another node can resolve, forwards
    /// it there with `remote` (unless it already was forwarded). See the module doc for what
    /// a failed forward answers.
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
        let deadline =
            client_timeout(request.metadata()).and_then(|t| Instant::now().checked_add(t));
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
            let budget = self.forward_budget(deadline);
            if budget.is_zero() {
                // Nothing was sent: the error so far (definite) stands.
                tracing::debug!(target, "the client's deadline passed before forwarding");
                break;
            }
            let mut req = Request::new(body.clone());
            req.metadata_mut()
                .insert(FORWARDED, MetadataValue::from(self.node.id()));
            req.set_timeout(budget);
            let sent = Instant::now();
            match remote(client, req).await {
                Ok(resp) => return Ok(resp),
                Err(answer) if is_kvnode_status(&answer) => {
                    // The target's own answer: relayed with its outcome, unless it names
                    // the leader to try next.
                    let remote_error = from_status(&answer, write);
                    if !matches!(remote_error, Error::NotLeader { .. }) {
                        return Err(answer);
                    }
                    error = remote_error;
                }
                Err(failure) => {
                    let shard = self.node.shard_for(&key);
                    let e = forward_failure(&failure, shard, target, write, sent.elapsed());
                    tracing::debug!(
                        target,
                        shard,
                        write,
                        definite = e.is_definite(),
                        failure = ?failure,
                        "forwarding a client request failed in the transport"
                    );
                    return Err(self.status(&e));
                }
            }
        }
        Err(self.status(&error))
    }
}

/// The client's deadline for this request (its `grpc-timeout`), if it gave a well-formed one
/// (see [`parse_grpc_timeout`]).
fn client_timeout(metadata: &MetadataMap) -> Option<Duration> {
    parse_grpc_timeout(metadata.get("grpc-timeout")?.to_str().ok()?)
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
                .into_iter()
                .map(|id| NodeInfo {
                    id,
                    addr: peers.addr(id).unwrap_or_default(),
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
        return crate::planted::active()
            .map_or("none", |b| b.name())
            .to_string();
    }
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout_of(value: &'static str) -> Option<Duration> {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", MetadataValue::from_static(value));
        client_timeout(&metadata)
    }

    #[test]
    fn the_client_deadline_is_read_from_grpc_timeout() {
        assert_eq!(timeout_of("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(timeout_of("3M"), Some(Duration::from_secs(180)));
        assert_eq!(timeout_of("4S"), Some(Duration::from_secs(4)));
        assert_eq!(timeout_of("250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            timeout_of("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(timeout_of("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "m", "123456789m", "12x", "-1m", "1.5S", "12"] {
            assert_eq!(timeout_of(bad), None, "{bad:?}");
        }
        assert_eq!(client_timeout(&MetadataMap::new()), None);
        // What tonic itself writes.
        let mut request = Request::new(());
        request.set_timeout(Duration::from_millis(1500));
        assert_eq!(
            client_timeout(request.metadata()),
            Some(Duration::from_millis(1500))
        );
    }
}
