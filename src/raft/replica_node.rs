//! Which node hosts a Raft replica: the encoding of a node id in openraft's `BasicNode`.
//!
//! A shard group's Raft id is a *replica id*, not a node id (`docs/design/membership.md` D3
//! and §2): a Raft id must never be given again to a replica that starts from an empty log,
//! and placement is deterministic, so a shard does come back to a node it left. The group's
//! membership therefore says, for each replica, which node hosts it. `TypeConfig` keeps
//! `Node = BasicNode` (no WAL or snapshot format change) and its `addr` carries `n<node id>`.
//! Addresses stay out of Raft: a node's network address lives in the node-level peer list
//! ([`crate::peers::Peers`]), so an address change never needs a membership change.
//!
//! Every membership written before this encoding holds `BasicNode::default()`, whose `addr` is
//! `"localhost"` in openraft `0.10.0-alpha.37` (not `""`, as the design doc first assumed).
//! Such a replica is *legacy* ([`LEGACY_ADDRS`]) and its node is its replica id (replica ids
//! were node ids then), so existing logs and snapshots are read as they are, with no
//! migration.
//!
//! Until replicas move (milestone M3) every replica id still equals its node id; new
//! memberships are nevertheless written in the new encoding ([`replica_node`]).

use openraft::BasicNode;

/// A node id (as in `Config::peers`).
pub type NodeId = u64;

/// The `addr`s of a legacy membership entry, whose node is its replica id: `""` (the design's
/// legacy value) and `"localhost"`, `BasicNode::default()`'s, which every membership written
/// before replica ids holds.
pub const LEGACY_ADDRS: [&str; 2] = ["", "localhost"];

/// A membership entry's `BasicNode` that names no node this build can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "replica {replica}: its membership entry names no node (addr {addr:?}, expected \"n<node id>\" or a legacy \"\" / \"localhost\")"
)]
pub struct MalformedReplicaNode {
    /// The replica whose entry is malformed.
    pub replica: u64,
    /// The `BasicNode.addr` found.
    pub addr: String,
}

/// The membership entry of a replica hosted by `node`.
pub fn replica_node(node: NodeId) -> BasicNode {
    BasicNode {
        addr: format!("n{node}"),
    }
}

/// The node that hosts `replica`, from its membership entry `node`: the node `n<id>` names,
/// or `replica` itself for a legacy entry ([`LEGACY_ADDRS`]).
pub fn node_of(replica: u64, node: &BasicNode) -> Result<NodeId, MalformedReplicaNode> {
    if LEGACY_ADDRS.contains(&node.addr.as_str()) {
        return Ok(replica);
    }
    node.addr
        .strip_prefix('n')
        // `u64::from_str` accepts a leading '+'; an id is digits only.
        .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|digits| digits.parse().ok())
        .ok_or_else(|| MalformedReplicaNode {
            replica,
            addr: node.addr.clone(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_round_trips_through_its_entry() {
        for node in [0, 1, 7, 4096, u64::MAX] {
            let entry = replica_node(node);
            assert_eq!(node_of(99, &entry), Ok(node), "{entry:?}");
        }
        assert_eq!(replica_node(12).addr, "n12");
    }

    #[test]
    fn a_legacy_entry_names_the_replica_id_as_its_node() {
        // Every membership written before replica ids existed: `BasicNode::default()`
        // ("localhost" in this openraft), and the design's legacy "".
        assert_eq!(BasicNode::default().addr, "localhost");
        assert_eq!(node_of(3, &BasicNode::default()), Ok(3));
        assert_eq!(
            node_of(
                17,
                &BasicNode {
                    addr: String::new()
                }
            ),
            Ok(17)
        );
        // As a stored membership decodes it (the bincode of today's WAL entries).
        let stored = crate::storage::codec::encode_serde(&BasicNode::default());
        let decoded: BasicNode = crate::storage::codec::decode_serde(&stored).unwrap();
        assert_eq!(node_of(2, &decoded), Ok(2));
    }

    #[test]
    fn a_malformed_entry_is_an_error_not_a_panic() {
        for addr in [
            "n",
            "12",
            "x12",
            "n-1",
            "n+1",
            "n 1",
            "n1 ",
            "n18446744073709551616",
            "10.0.0.1:7000",
        ] {
            let entry = BasicNode {
                addr: addr.to_string(),
            };
            assert_eq!(
                node_of(5, &entry),
                Err(MalformedReplicaNode {
                    replica: 5,
                    addr: addr.to_string()
                }),
                "{addr:?}"
            );
        }
        let e = node_of(5, &BasicNode { addr: "x".into() }).unwrap_err();
        assert!(e.to_string().contains("replica 5"), "{e}");
    }
}
