//! Routes a key to its shard (consistent hashing, [`crate::sharding`]) and to the replica of
//! that shard hosted on this node. Forwarding to other nodes joins in part 3.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::shard::Shard;
use crate::sharding::{HashRing, ShardId};

/// Key → shard → local replica.
#[derive(Debug)]
pub struct Router {
    ring: HashRing,
    local: BTreeMap<ShardId, Shard>,
}

impl Router {
    /// A router over `ring` with the replicas hosted here.
    pub fn new(ring: HashRing, local: impl IntoIterator<Item = Shard>) -> Router {
        Router {
            ring,
            local: local.into_iter().map(|s| (s.id(), s)).collect(),
        }
    }

    /// The shard `key` belongs to.
    pub fn shard_for(&self, key: &[u8]) -> ShardId {
        self.ring.shard_for(key)
    }

    /// The local replica serving `key`.
    pub fn route(&self, key: &[u8]) -> Result<&Shard> {
        let shard = self.shard_for(key);
        self.local.get(&shard).ok_or_else(|| Error::Unavailable {
            shard,
            reason: "no replica of this shard on this node".into(),
        })
    }

    /// The local replica of `shard`, if any.
    pub fn local(&self, shard: ShardId) -> Option<&Shard> {
        self.local.get(&shard)
    }

    /// Every local replica.
    pub fn shards(&self) -> impl Iterator<Item = &Shard> {
        self.local.values()
    }
}
