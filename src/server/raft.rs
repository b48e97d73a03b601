//! The peer transport's server side: one service per node carries every shard's Raft traffic
//! and dispatches on the shard id in each message's header to that shard's `Raft`.
//!
//! **Trusted peers only.** The service checks that a message comes from this cluster and from a
//! node in the peer list, but it does not authenticate anyone: do not expose the port to clients
//! you do not trust.
//!
//! Every request is checked in this order (the status a refused message gets):
//!
//! | check | status |
//! |---|---|
//! | the header is present | `INVALID_ARGUMENT` |
//! | `cluster_id` is ours | `FAILED_PRECONDITION` (names both clusters) |
//! | `from_node` is another member of our peer list | `PERMISSION_DENIED` |
//! | the shard has a replica here, and it is the header's `replica` | `NOT_FOUND` |
//! | the payload decodes | `INVALID_ARGUMENT` |
//!
//! A shard group's Raft ids are replica ids, apart from node ids (`crate::raft::replica_node`):
//! a message names the replica it is for, and one for a replica this node does not host (an
//! older incarnation of the shard here, or a sender with an outdated membership) must not
//! reach the replica it does host. A `replica` of 0 comes from a sender that predates replica
//! ids and means this node's id. The replica hosted here is [`Shard::replica_id`].
//!
//! `Ping` (node-level liveness for hibernating idle groups; its reply also carries the epoch of
//! the newest cluster map this node knows), `ConfirmLeadership` (node-level leadership checks
//! for linearizable reads, see `crate::leadership`) and `FetchMap` (that map, for a peer that
//! saw a higher epoch) get the first three checks only: they name no shard in the header and
//! have no payload. A confirmation item naming a shard not hosted here, or a replica of it
//! other than the one hosted here, is answered no.
//!
//! A refused peer is logged at warn at most once a minute per peer and reason. Payloads and
//! replies are the bincode of openraft's messages; a reply is the `Result` the shard's `Raft`
//! returned, so the sender sees a remote failure as such (see `raft::network`).
//!
//! A snapshot arrives as a stream of chunks written to a temporary file in the shard's snapshot
//! folder, fsynced, and verified (format, structure, checksum, and that its meta matches the
//! header) before it is handed to openraft; a damaged or mismatched transfer is refused
//! (`DATA_LOSS` / `INVALID_ARGUMENT`) and never installed. The temporary file is removed in
//! every case (the state machine installs a copy of it).
//!
//! Handlers run concurrently (tonic spawns one task per request); nothing here serializes shards.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

use openraft::error::RaftError;
use openraft::raft::{AppendEntriesRequest, VoteRequest};

use crate::node::Node;
use crate::pb::raft::raft_transport_server::{RaftTransport, RaftTransportServer};
use crate::pb::raft::{
    ConfirmReply, ConfirmRequest, FetchMapReply, FetchMapRequest, PeerHeader, PingReply,
    PingRequest, RaftReply, RaftRequest, SnapshotChunk,
};
use crate::peers::ReadIndexReply;
use crate::peers::WarnLimiter;
use crate::raft::network::MAX_MESSAGE_BYTES;
use crate::raft::{Snapshot, SnapshotMeta, TypeConfig, Vote};
use crate::shard::Shard;
use crate::storage::SnapshotFile;
use crate::storage::codec::{decode_serde, encode_serde};

/// The peer transport service of one node.
#[derive(Debug)]
pub struct RaftService {
    node: Arc<Node>,
    warnings: WarnLimiter,
}

/// The peer transport service for `node`, with message limits large enough for big
/// AppendEntries batches.
pub fn raft_service(node: Arc<Node>) -> RaftTransportServer<RaftService> {
    RaftTransportServer::new(RaftService::new(node))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

impl RaftService {
    /// A service dispatching to `node`'s shards.
    pub fn new(node: Arc<Node>) -> RaftService {
        RaftService {
            node,
            warnings: WarnLimiter::default(),
        }
    }

    /// Checks `header` (see the module doc) and returns the local replica it addresses.
    fn admit(&self, header: Option<&PeerHeader>, rpc: &str) -> Result<Arc<Shard>, Status> {
        let header = self.admit_peer(header, rpc)?;
        let node = self.node.config().node_id;
        let Some(shard) = self.node.local_shard(header.shard) else {
            let status = Status::not_found(format!(
                "shard {} has no replica on node {node}",
                header.shard
            ));
            return Err(self.refuse(header, "shard not hosted", status));
        };
        let wanted = addressed_replica(header.replica, node);
        if wanted != shard.replica_id() {
            let status = Status::not_found(format!(
                "{rpc}: shard {}: replica {wanted} is not hosted on node {node} (its replica \
                 here is {})",
                header.shard,
                shard.replica_id()
            ));
            return Err(self.refuse(header, "replica not hosted", status));
        }
        Ok(shard)
    }

    /// The checks of [`Self::admit`] that concern the sender, not the shard.
    fn admit_peer<'h>(
        &self,
        header: Option<&'h PeerHeader>,
        rpc: &str,
    ) -> Result<&'h PeerHeader, Status> {
        let Some(header) = header else {
            return Err(Status::invalid_argument(format!(
                "{rpc}: peer message without a header"
            )));
        };
        let config = self.node.config();
        let from = header.from_node;
        if header.cluster_id != config.cluster_id {
            let status = Status::failed_precondition(format!(
                "node {from} belongs to cluster {:?}, but node {} belongs to cluster {:?}",
                header.cluster_id, config.node_id, config.cluster_id
            ));
            return Err(self.refuse(header, "other cluster", status));
        }
        // The current node set where there is one (it can change at runtime), else the
        // configured peer list.
        let member = match self.node.peers() {
            Some(peers) => peers.is_peer(from),
            None => config.peers.contains_key(&from),
        };
        if from == config.node_id || !member {
            let status = Status::permission_denied(format!(
                "node {from} is not a member of cluster {:?}",
                config.cluster_id
            ));
            return Err(self.refuse(header, "not a member", status));
        }
        // Also records the arrival, the inbound evidence hibernation needs (`Peers::admit_from`).
        if self.node.peers().is_some_and(|p| !p.admit_from(from)) {
            // A test partition: behave like a dropped packet would, as far as the sender sees.
            return Err(Status::unavailable(format!("link from node {from} is cut")));
        }
        Ok(header)
    }

    /// Logs a refused message (at most once a minute per sender and reason) and returns `status`.
    fn refuse(&self, header: &PeerHeader, reason: &str, status: Status) -> Status {
        let key = format!("{}/{:?}/{reason}", header.from_node, header.cluster_id);
        if self.warnings.allow(&key) {
            tracing::warn!(
                node = self.node.id(),
                from = header.from_node,
                cluster = %header.cluster_id,
                shard = header.shard,
                reason,
                detail = status.message(),
                "refused a peer message (repeats are logged at most once a minute)"
            );
        }
        status
    }

    /// Admits `request` and decodes its payload.
    fn open<T: DeserializeOwned>(
        &self,
        request: &RaftRequest,
        rpc: &str,
    ) -> Result<(Arc<Shard>, T), Status> {
        let shard = self.admit(request.header.as_ref(), rpc)?;
        let message = decode(&request.payload, rpc)?;
        Ok((shard, message))
    }

    /// Receives a snapshot stream into a temporary file, verifies it, and installs it.
    async fn receive_snapshot(
        &self,
        mut stream: Streaming<SnapshotChunk>,
    ) -> Result<Response<RaftReply>, Status> {
        const RPC: &str = "install-snapshot";
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument(format!("{RPC}: empty snapshot stream")))?;
        let shard = self.admit(first.header.as_ref(), RPC)?;
        // Admitted, so present.
        let header = first.header.clone().unwrap_or_default();
        let from = header.from_node;
        let (vote, meta): (Vote, SnapshotMeta) = decode(&first.snapshot_header, RPC)?;

        let snapshots = self.node.store().snapshot_dir(shard.id());
        let index = meta.last_log_id.as_ref().map_or(0, |l| l.index());
        let name = snapshots.next_name(index).map_err(internal)?;
        // `.tmp`: a leftover from a crash mid-transfer is removed when the shard next opens.
        let temp = TempFile(snapshots.path().join(format!("{name}.recv.tmp")));
        let mut bytes = 0u64;
        {
            tokio::fs::create_dir_all(snapshots.path())
                .await
                .map_err(|e| io_status(snapshots.path(), e))?;
            let mut file = tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(temp.path())
                .await
                .map_err(|e| io_status(temp.path(), e))?;
            let mut chunk = Some(first);
            while let Some(c) = chunk {
                if c.header.as_ref().is_some_and(|h| h.shard != shard.id()) {
                    return Err(Status::invalid_argument(format!(
                        "{RPC}: a chunk addressed another shard than the first one ({})",
                        shard.id()
                    )));
                }
                file.write_all(&c.data)
                    .await
                    .map_err(|e| io_status(temp.path(), e))?;
                bytes += c.data.len() as u64;
                chunk = stream.message().await?;
            }
            file.flush().await.map_err(|e| io_status(temp.path(), e))?;
            file.sync_all()
                .await
                .map_err(|e| io_status(temp.path(), e))?;
        }

        let path = temp.path().to_path_buf();
        let (file, file_meta) = tokio::task::spawn_blocking(move || {
            let file = SnapshotFile::open(&path)?;
            let meta = file.verify()?;
            Ok::<_, crate::storage::Error>((file, meta))
        })
        .await
        .map_err(|e| Status::internal(format!("{RPC}: verifying the snapshot: {e}")))?
        .map_err(|e| {
            let damaged = !matches!(e, crate::storage::Error::Io { .. });
            let detail = format!(
                "{RPC}: snapshot from node {from} for shard {} ({bytes} bytes) is damaged: {e}",
                shard.id()
            );
            if !damaged {
                return Status::internal(detail);
            }
            self.refuse(&header, "damaged snapshot", Status::data_loss(detail))
        })?;
        let file_meta: SnapshotMeta = decode_serde(&file_meta).map_err(|e| {
            Status::data_loss(format!(
                "{RPC}: the snapshot file's meta does not decode: {e}"
            ))
        })?;
        if file_meta != meta {
            return Err(Status::invalid_argument(format!(
                "{RPC}: the snapshot file describes {file_meta:?}, but its header says {meta:?}"
            )));
        }
        tracing::info!(
            node = self.node.id(),
            from,
            shard = shard.id(),
            bytes,
            last = ?meta.last_log_id,
            "received a snapshot"
        );
        let snapshot = Snapshot {
            meta,
            snapshot: file,
        };
        let result = shard
            .raft()
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(RaftError::<TypeConfig>::Fatal);
        Ok(reply(&result))
    }
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn append_entries(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let (shard, rpc): (_, AppendEntriesRequest<TypeConfig>) =
            self.open(request.get_ref(), "append-entries")?;
        Ok(reply(&shard.raft().append_entries(rpc).await))
    }

    async fn vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let (shard, rpc): (_, VoteRequest<TypeConfig>) = self.open(request.get_ref(), "vote")?;
        Ok(reply(&shard.raft().vote(rpc).await))
    }

    async fn pre_vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let (shard, rpc): (_, VoteRequest<TypeConfig>) =
            self.open(request.get_ref(), "pre-vote")?;
        Ok(reply(&shard.raft().pre_vote(rpc).await))
    }

    async fn read_index(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let shard = self.admit(request.get_ref().header.as_ref(), "read-index")?;
        let answer = match shard.leader_read_index().await {
            Ok(index) => ReadIndexReply::Index(index),
            Err(crate::error::Error::NotLeader { leader_hint, .. }) => {
                ReadIndexReply::NotLeader(leader_hint)
            }
            Err(e) => ReadIndexReply::Unavailable(e.to_string()),
        };
        Ok(reply(&answer))
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftReply>, Status> {
        self.receive_snapshot(request.into_inner()).await
    }

    async fn ping(&self, request: Request<PingRequest>) -> Result<Response<PingReply>, Status> {
        self.admit_peer(request.get_ref().header.as_ref(), "ping")?;
        Ok(Response::new(PingReply {
            boot_id: self.node.boot_id(),
            leading: self
                .node
                .local_shards()
                .iter()
                .filter(|shard| shard.is_leader())
                .map(|shard| shard.id())
                .collect(),
            map_epoch: self.node.map_epoch(),
        }))
    }

    async fn fetch_map(
        &self,
        request: Request<FetchMapRequest>,
    ) -> Result<Response<FetchMapReply>, Status> {
        self.admit_peer(request.get_ref().header.as_ref(), "fetch-map")?;
        let map = self
            .node
            .cluster_map()
            .map_or_else(Vec::new, |map| encode_serde(&*map));
        Ok(Response::new(FetchMapReply { map }))
    }

    async fn confirm_leadership(
        &self,
        request: Request<ConfirmRequest>,
    ) -> Result<Response<ConfirmReply>, Status> {
        let request = request.get_ref();
        let leader = self
            .admit_peer(request.header.as_ref(), "confirm-leadership")?
            .from_node;
        // A shard this node does not host, another replica of it than the one hosted here, or
        // one whose stored vote is another, is a no. The vote names the leader's replica id;
        // `holds_vote_for` maps it through the group's membership to its node, which must be
        // the sender.
        let node = self.node.config().node_id;
        let confirmed = request
            .items
            .iter()
            .map(|item| {
                self.node.local_shard(item.shard).is_some_and(|shard| {
                    addressed_replica(item.replica, node) == shard.replica_id()
                        && shard.holds_vote_for(item.term, leader)
                })
            })
            .collect();
        Ok(Response::new(ConfirmReply { confirmed }))
    }
}

/// The replica a message for node `node` addresses: `replica`, or for a legacy sender (0) the
/// replica whose id is the node's.
fn addressed_replica(replica: u64, node: u64) -> u64 {
    if replica == 0 { node } else { replica }
}

/// Decodes a payload; garbage is the sender's fault.
fn decode<T: DeserializeOwned>(payload: &[u8], rpc: &str) -> Result<T, Status> {
    decode_serde(payload)
        .map_err(|e| Status::invalid_argument(format!("{rpc}: undecodable payload: {e}")))
}

/// The reply carrying `result` as the `Raft` returned it.
fn reply<T: Serialize>(result: &T) -> Response<RaftReply> {
    Response::new(RaftReply {
        payload: encode_serde(result),
    })
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

fn io_status(path: &Path, e: io::Error) -> Status {
    Status::internal(format!("{}: {e}", path.display()))
}

/// A file removed when dropped: on success, on a refused transfer, and when the handler is
/// cancelled (the sender gave up or its deadline passed).
struct TempFile(PathBuf);

impl TempFile {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.0.display(), error = %e, "could not remove a received snapshot");
        }
    }
}
