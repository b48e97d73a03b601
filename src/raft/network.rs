//! Raft peer networks: [`ShardNetwork`] is one shard's openraft network over the node's
//! channels to its peers ([`crate::peers::Peers`], shared by every shard) (the shard id goes in
//! every message). [`NoPeers`] is the network of an embedded single-node store: every shard's
//! only voter is this node, so no message ever needs to leave the process, and any attempt
//! answers `Unreachable` (which makes openraft back off instead of retrying hot).
//!
//! # Wire contract (`proto/raft.proto`, served by `server::raft`)
//!
//! Every request carries a `PeerHeader` (sender, cluster id, shard, target replica, and the
//! sender's cluster-map epoch, always 0 until milestone M2) and a payload: the bincode
//! ([`encode_serde`]) of the openraft request. Every reply payload is the bincode of
//! `Result<Response, RaftError>` exactly as the receiving `Raft` returned it. A snapshot travels
//! as a client stream of slices of its file (at most [`SNAPSHOT_CHUNK_BYTES`] each), the first
//! chunk also carrying `(vote, meta)`.
//!
//! # Failures as openraft sees them
//!
//! - deadline passed → `Timeout` (openraft retries soon);
//! - peer down, connection refused or reset → `Unreachable` (openraft backs off);
//! - the peer refuses us (other cluster, unknown sender, shard or replica not hosted there,
//!   undecodable message) or its replica of the shard has stopped → `Unreachable` too, since
//!   retrying at once cannot help; these are configuration problems, logged at warn at most
//!   once a minute per peer and reason;
//! - anything else → `Network` (retried a few times, then backed off).
//!
//! A client never opens a connection: it clones the node-wide channel of its target's node.
//!
//! # Replicas and nodes
//!
//! openraft addresses a *replica* (the group's Raft id, `target`); the membership entry it
//! passes along says which node hosts it ([`crate::raft::replica_node`]). A [`PeerClient`]
//! keeps both: messages go over the channel to the node and name the replica in
//! `PeerHeader.replica`, so a node that does not host that replica refuses them (`NOT_FOUND`)
//! instead of handing them to another incarnation of the shard; partitions and the peer list
//! are about nodes. A membership entry that names no node gives a client whose every call is
//! `Unreachable` (a configuration problem, logged like the others).

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::SinkExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::Channel;
use tonic::{Code, Status};

use openraft::error::{
    NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftNetworkV2, StorageError};

use crate::error::Result;
use crate::pb::raft::raft_transport_client::RaftTransportClient;
use crate::pb::raft::{PeerHeader, RaftRequest, SnapshotChunk};
use crate::peers::Peers;
use crate::raft::commit_horizon::CommitHorizon;
use crate::raft::replica_node::{MalformedReplicaNode, node_of};
use crate::raft::{Snapshot, TypeConfig, Vote};
use crate::storage::SnapshotFile;
use crate::storage::codec::{decode_serde, encode_serde};

/// Largest gRPC message a peer client or the peer service sends or accepts (tonic's default
/// is 4 MiB; an AppendEntries batch of large values can exceed that).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// Largest slice of a snapshot file sent in one `SnapshotChunk`.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;

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

/// One shard's openraft network over the shared [`Peers`] channels.
#[derive(Debug, Clone)]
pub struct ShardNetwork {
    peers: Arc<Peers>,
    shard: u64,
    /// Every commit index sent to a peer, recorded before it leaves (see [`CommitHorizon`]).
    horizon: Arc<CommitHorizon>,
}

impl ShardNetwork {
    /// The network of `shard`; it records in `horizon` every commit index it sends.
    pub fn new(peers: Arc<Peers>, shard: u64, horizon: Arc<CommitHorizon>) -> ShardNetwork {
        ShardNetwork {
            peers,
            shard,
            horizon,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for ShardNetwork {
    type Network = PeerClient;

    /// Cheap: no connection is made here. Replica `target` is reached on the node its
    /// membership entry `node` names.
    async fn new_client(&mut self, target: u64, node: &openraft::BasicNode) -> PeerClient {
        PeerClient {
            peers: Arc::clone(&self.peers),
            shard: self.shard,
            target,
            node: node_of(target, node),
            horizon: Arc::clone(&self.horizon),
        }
    }
}

/// One shard's client of one peer replica: every call goes over the node-wide channel to the
/// node hosting it, looked up per call (a client outlives partitions and changes of the node
/// set: openraft keeps one per replication stream). A node missing from the current peer set,
/// or a membership entry naming no node, gives `Unreachable` on every call.
#[derive(Debug, Clone)]
pub struct PeerClient {
    peers: Arc<Peers>,
    shard: u64,
    /// The replica openraft addresses (its Raft id in the group).
    target: u64,
    /// The node hosting `target`: where messages go, and what partitions cut.
    node: std::result::Result<u64, MalformedReplicaNode>,
    horizon: Arc<CommitHorizon>,
}

/// The RPCs of the peer transport (for errors and logs).
#[derive(Debug, Clone, Copy)]
enum Rpc {
    AppendEntries,
    Vote,
    PreVote,
    InstallSnapshot,
}

impl Rpc {
    fn name(self) -> &'static str {
        match self {
            Rpc::AppendEntries => "append-entries",
            Rpc::Vote => "vote",
            Rpc::PreVote => "pre-vote",
            Rpc::InstallSnapshot => "install-snapshot",
        }
    }

    fn rpc_type(self) -> RPCTypes {
        match self {
            Rpc::AppendEntries => RPCTypes::AppendEntries,
            Rpc::Vote | Rpc::PreVote => RPCTypes::Vote,
            Rpc::InstallSnapshot => RPCTypes::InstallSnapshot,
        }
    }
}

/// Why a peer call failed, as carried inside openraft's network errors.
#[derive(Debug, thiserror::Error)]
#[error("shard {shard}: {rpc} to replica {target} on {node}: {detail}")]
struct PeerCallError {
    shard: u64,
    target: u64,
    node: NodeName,
    rpc: &'static str,
    detail: String,
}

/// The node of a [`PeerCallError`], if its membership entry named one.
#[derive(Debug)]
struct NodeName(Option<u64>);

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(node) => write!(f, "node {node}"),
            None => f.write_str("an unknown node"),
        }
    }
}

impl PeerClient {
    fn error(&self, rpc: Rpc, detail: impl fmt::Display) -> PeerCallError {
        PeerCallError {
            shard: self.shard,
            target: self.target,
            node: NodeName(self.node.as_ref().ok().copied()),
            rpc: rpc.name(),
            detail: detail.to_string(),
        }
    }

    /// Logs `error` at warn unless the same (target, reason) was logged within the last minute.
    fn warn_limited(&self, reason: &str, error: &PeerCallError) {
        let key = format!("{}/{reason}", self.target);
        if self.peers.warn_allowed(&key) {
            tracing::warn!(
                node = self.peers.self_id(),
                target = self.target,
                target_node = ?self.node.as_ref().ok(),
                shard = self.shard,
                reason,
                error = %error,
                "peer refused or failed a Raft message (repeats are logged at most once a minute)"
            );
        }
    }

    fn header(&self) -> PeerHeader {
        PeerHeader {
            from_node: self.peers.self_id(),
            cluster_id: self.peers.cluster_id().to_string(),
            shard: self.shard,
            // No cluster map yet (milestone M2).
            map_epoch: 0,
            replica: self.target,
        }
    }

    /// A tonic client on the channel to the target's node, or why there is none (every case
    /// is `Unreachable` for openraft).
    fn client(&self, rpc: Rpc) -> Result<RaftTransportClient<Channel>, PeerCallError> {
        let node = match &self.node {
            Ok(node) => *node,
            Err(malformed) => {
                let e = self.error(rpc, malformed);
                self.warn_limited("unknown node", &e);
                return Err(e);
            }
        };
        if self.peers.is_cut_off(node) {
            return Err(self.error(rpc, "link cut by a test partition"));
        }
        // The channel itself, not `Peers::channel`: the cut was just checked.
        let channel = self.peers.raft_channel(node).ok_or_else(|| {
            let e = self.error(rpc, "not in this node's peer list");
            self.warn_limited("unknown target", &e);
            e
        })?;
        Ok(RaftTransportClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    fn timeout(&self, rpc: Rpc, after: Duration) -> Timeout<TypeConfig> {
        Timeout {
            action: rpc.rpc_type(),
            id: self.peers.self_id(),
            target: self.target,
            timeout: after,
        }
    }

    /// Maps a failed call to what openraft should do about it (see the module doc).
    fn status_error(&self, rpc: Rpc, status: &Status, ttl: Duration) -> RPCError<TypeConfig> {
        let code = status.code();
        // tonic reports its own grpc-timeout enforcement (client or server side) as CANCELLED
        // "Timeout expired".
        let timed_out = code == Code::DeadlineExceeded
            || (code == Code::Cancelled && status.message().contains("Timeout expired"));
        if timed_out {
            return RPCError::Timeout(self.timeout(rpc, ttl));
        }
        let e = self.error(rpc, format_args!("{code:?}: {}", status.message()));
        match code {
            Code::Unavailable | Code::Cancelled => {
                tracing::debug!(error = %e, "peer unreachable");
                RPCError::Unreachable(Unreachable::new(&e))
            }
            Code::NotFound
            | Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::InvalidArgument
            | Code::Unimplemented => {
                self.warn_limited(&format!("{code:?}"), &e);
                RPCError::Unreachable(Unreachable::new(&e))
            }
            _ => {
                self.warn_limited(&format!("{code:?}"), &e);
                RPCError::Network(NetworkError::new(&e))
            }
        }
    }

    /// Decodes a reply payload: the peer's `Result<Resp, RaftError>`. A `RaftError` without an
    /// API error is fatal (the peer's replica of the shard stopped), and `RPCError<TypeConfig>`
    /// cannot carry it as a remote error (its error type is `Infallible`): it is `Unreachable`.
    fn decode_reply<Resp: DeserializeOwned>(
        &self,
        rpc: Rpc,
        payload: &[u8],
    ) -> Result<Resp, RPCError<TypeConfig>> {
        match decode_serde::<Result<Resp, RaftError<TypeConfig>>>(payload) {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(remote)) => {
                let e = self.error(rpc, format_args!("the peer's replica failed: {remote}"));
                self.warn_limited("remote replica stopped", &e);
                Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Err(decode) => {
                let e = self.error(rpc, format_args!("undecodable reply: {decode}"));
                self.warn_limited("undecodable reply", &e);
                Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
        }
    }

    /// One unary call: encode `message`, send it with the soft deadline, decode the reply.
    async fn unary<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        rpc: Rpc,
        message: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let mut client = self
            .client(rpc)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let ttl = option.soft_ttl();
        let mut request = tonic::Request::new(RaftRequest {
            header: Some(self.header()),
            payload: encode_serde(message),
        });
        request.set_timeout(ttl);
        let call = async {
            match rpc {
                Rpc::AppendEntries => client.append_entries(request).await,
                Rpc::Vote => client.vote(request).await,
                Rpc::PreVote => client.pre_vote(request).await,
                Rpc::InstallSnapshot => Err(Status::internal("install-snapshot is a stream")),
            }
        };
        match tokio::time::timeout(ttl, call).await {
            Err(_) => Err(RPCError::Timeout(self.timeout(rpc, ttl))),
            Ok(Err(status)) => Err(self.status_error(rpc, &status, ttl)),
            Ok(Ok(reply)) => self.decode_reply(rpc, &reply.into_inner().payload),
        }
    }

    /// Streams `file` to the peer: the first chunk carries the header and `(vote, meta)`; the
    /// peer answers once it has verified and installed the snapshot. Reading the local file
    /// runs on the blocking pool; the channel of one chunk applies the peer's backpressure.
    async fn stream_snapshot(
        &self,
        vote: &Vote,
        snapshot: &Snapshot,
        deadline: Duration,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let rpc = Rpc::InstallSnapshot;
        let mut client = self
            .client(rpc)
            .map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))?;
        let (mut tx, rx) = futures::channel::mpsc::channel::<SnapshotChunk>(1);
        let mut request = tonic::Request::new(rx);
        request.set_timeout(deadline);

        let file = snapshot.snapshot.clone();
        let signature = snapshot.meta.signature();
        let mut first = Some((self.header(), encode_serde(&(vote, &snapshot.meta))));
        let send = async move {
            let mut offset = 0u64;
            while offset < file.len() || first.is_some() {
                let reading = file.clone();
                let data = tokio::task::spawn_blocking(move || {
                    reading.read_chunk(offset, SNAPSHOT_CHUNK_BYTES)
                })
                .await
                .map_err(|e| StreamingError::Closed(ReplicationClosed::new(e)))?
                .map_err(|e| read_error(&signature, e.into()))?;
                if data.is_empty() && offset < file.len() {
                    let e = std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("{} shrank while being sent", file.path().display()),
                    );
                    return Err(read_error(&signature, e));
                }
                offset += data.len() as u64;
                let (header, snapshot_header) = first.take().unzip();
                let chunk = SnapshotChunk {
                    header,
                    snapshot_header: snapshot_header.unwrap_or_default(),
                    data,
                };
                if tx.send(chunk).await.is_err() {
                    // The call ended early (the peer answered or the stream broke); its
                    // result says why.
                    return Ok(false);
                }
            }
            Ok(true)
        };
        let call = client.install_snapshot(request);
        tokio::pin!(send, call);
        let reply = tokio::select! {
            reply = &mut call => reply,
            sent = &mut send => {
                sent?;
                call.await
            }
        };
        match reply {
            Ok(reply) => self
                .decode_reply(rpc, &reply.into_inner().payload)
                .map_err(StreamingError::from),
            Err(status) => Err(self.status_error(rpc, &status, deadline).into()),
        }
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        // Before the message can reach the peer: the read path relies on no peer knowing of a
        // commit index above the horizon (see `raft::commit_horizon`).
        if let Some(committed) = &rpc.leader_commit {
            self.horizon.record(committed.index());
        }
        self.unary(Rpc::AppendEntries, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(Rpc::Vote, &rpc, &option).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(Rpc::PreVote, &rpc, &option).await
    }

    /// Sends the whole snapshot. The deadline grows with its size: `soft_ttl` per chunk (openraft's
    /// `install_snapshot_timeout` is a per-segment budget), plus, for verifying and installing
    /// it at the peer, the larger of `soft_ttl` and the node's request timeout. `cancel` stops
    /// the transfer at once (`Closed`).
    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let ttl = option.soft_ttl();
        let chunks = snapshot
            .snapshot
            .len()
            .div_ceil(SNAPSHOT_CHUNK_BYTES as u64);
        let per_chunk = ttl.saturating_mul(u32::try_from(chunks).unwrap_or(u32::MAX));
        let deadline = per_chunk.saturating_add(ttl.max(self.peers.rpc_timeout()));
        let send = tokio::time::timeout(deadline, self.stream_snapshot(&vote, &snapshot, deadline));
        tokio::pin!(cancel);
        tokio::select! {
            closed = &mut cancel => Err(StreamingError::Closed(closed)),
            sent = send => match sent {
                Ok(result) => result,
                Err(_) => Err(StreamingError::Timeout(self.timeout(Rpc::InstallSnapshot, deadline))),
            },
        }
    }
}

/// A failure to read the local snapshot file being sent (a storage error, as for any other
/// local read).
fn read_error(
    signature: &openraft::type_config::alias::SnapshotSignatureOf<TypeConfig>,
    e: std::io::Error,
) -> StreamingError<TypeConfig> {
    let subject = ErrorSubject::Snapshot(Some(signature.clone()));
    StreamingError::StorageError(StorageError::from_io_error(subject, ErrorVerb::Read, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    use openraft::error::Fatal;

    #[test]
    fn replies_round_trip_including_a_remote_fatal_error() {
        let ok: Result<VoteResponse<TypeConfig>, RaftError<TypeConfig>> = Ok(VoteResponse::new(
            crate::raft::vote(3, 2),
            Some(crate::raft::log_id(2, 1, 7)),
            true,
        ));
        let back: Result<VoteResponse<TypeConfig>, RaftError<TypeConfig>> =
            decode_serde(&encode_serde(&ok)).unwrap();
        assert_eq!(back, ok);
        let err: Result<VoteResponse<TypeConfig>, RaftError<TypeConfig>> =
            Err(RaftError::Fatal(Fatal::Stopped));
        let back: Result<VoteResponse<TypeConfig>, RaftError<TypeConfig>> =
            decode_serde(&encode_serde(&err)).unwrap();
        assert_eq!(back, err);
    }
}
