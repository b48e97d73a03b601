//! The gRPC server of a node: the client API ([`kv`]), the admin API ([`admin`]) and the peer
//! transport (`raft`), with errors mapped by [`crate::pb::status`]. Services are thin: decode,
//! call the node, encode.

pub mod admin;
pub mod kv;
mod outcome;
#[doc(hidden)]
pub mod raft;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::node::Node;

/// Serves `node`'s client API and peer transport on `listener` until `shutdown` resolves;
/// then stops accepting, lets in-flight requests finish, and returns.
pub async fn serve(
    node: Arc<Node>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    Server::builder()
        .layer(outcome::OutcomeLayer)
        .add_service(kv::kv_service(node.clone()))
        .add_service(admin::admin_service(node.clone()))
        .add_service(raft::raft_service(node.clone()))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
