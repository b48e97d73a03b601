//! Raft peer networks. [`NoPeers`] is the network of an embedded single-node store: every
//! shard's only voter is this node, so no message ever needs to leave the process, and any
//! attempt answers `Unreachable` (which makes openraft back off instead of retrying hot).
//! The gRPC peer transport (part 3) implements the same factory trait.

use std::future::Future;

use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, RaftNetworkV2};

use crate::raft::{Snapshot, TypeConfig, Vote};
use crate::storage::SnapshotFile;

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
