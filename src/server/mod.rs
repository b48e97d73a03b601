//! The gRPC server of a node: the client API ([`kv`]), the peer transport ([`raft`]) and the
//! single error mapping ([`status`]). Services are thin: decode, call the node, encode.

pub mod status;
