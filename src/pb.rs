//! Generated gRPC code (`proto/*.proto`) and the conversions between wire and domain types:
//! the only place that knows both.

/// The client API (`proto/kv.proto`).
#[allow(missing_docs, clippy::all)]
pub mod kv {
    tonic::include_proto!("kvnode.v1");
}

/// The peer transport (`proto/raft.proto`).
#[allow(missing_docs, clippy::all)]
pub mod raft {
    tonic::include_proto!("kvnode.raft.v1");
}
