//! Key → shard mapping. This module owns the hash of a key ([`key_hash`]) and the
//! consistent-hash ring ([`HashRing`]) that assigns every key hash to one of a fixed set of
//! shards. Which nodes hold a shard is a separate question, answered by
//! `crate::cluster::placement`.

pub mod ring;

pub use ring::{DEFAULT_POINTS_PER_SHARD, HashRing, RingError};

/// Identifies a shard: one Raft group holding a slice of the key space.
pub type ShardId = u64;

/// The 64-bit hash of a key that the [`HashRing`] places on the ring: XXH3-64 with the
/// default seed (0), over the key bytes exactly as given.
///
/// **This function, together with the ring's point derivation (see [`HashRing::new`]), is part
/// of the on-disk and wire format: changing either one remaps every key to a different shard,
/// so neither may ever change for an existing cluster.** The golden test in `ring.rs` pins both.
pub fn key_hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}
