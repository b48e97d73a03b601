//! Routes a key to its shard (consistent hashing, [`crate::sharding`]) and to the replica of
//! that shard hosted on this node.
//!
//! The set of local replicas changes at runtime (docs/design/membership.md §1.4, §4.5): a
//! replica the cluster map newly assigns to this node is inserted, one that moved away is
//! removed. Readers get an `Arc<Shard>` and never hold the router's lock across an await: a
//! request that already holds a replica finishes on it (it closes under the request, which then
//! fails with a definite or indefinite error as any shutdown does), and the next request sees
//! the change.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::error::{Error, Result};
use crate::shard::Shard;
use crate::sharding::{HashRing, ShardId};

/// Key → shard → local replica.
#[derive(Debug)]
pub struct Router {
    ring: HashRing,
    local: RwLock<BTreeMap<ShardId, Arc<Shard>>>,
}

impl Router {
    /// A router over `ring` with the replicas hosted here.
    pub fn new(ring: HashRing, local: impl IntoIterator<Item = Arc<Shard>>) -> Router {
        Router {
            ring,
            local: RwLock::new(local.into_iter().map(|s| (s.id(), s)).collect()),
        }
    }

    /// The shard `key` belongs to.
    pub fn shard_for(&self, key: &[u8]) -> ShardId {
        self.ring.shard_for(key)
    }

    /// The local replica serving `key`.
    pub fn route(&self, key: &[u8]) -> Result<Arc<Shard>> {
        let shard = self.shard_for(key);
        self.local(shard).ok_or_else(|| Error::Unavailable {
            shard,
            reason: "no replica of this shard on this node".into(),
        })
    }

    /// The local replica of `shard`, if any.
    pub fn local(&self, shard: ShardId) -> Option<Arc<Shard>> {
        self.read().get(&shard).cloned()
    }

    /// Every local replica, in shard order (a snapshot of the set).
    pub fn shards(&self) -> Vec<Arc<Shard>> {
        self.read().values().cloned().collect()
    }

    /// Adds `shard` as the local replica of its shard. Returns the replica it replaced, if any
    /// (the caller shuts it down).
    pub fn insert(&self, shard: Arc<Shard>) -> Option<Arc<Shard>> {
        let mut local = self.local.write().expect("router lock");
        local.insert(shard.id(), shard)
    }

    /// Takes the local replica of `shard` out of routing; the caller shuts it down.
    pub fn remove(&self, shard: ShardId) -> Option<Arc<Shard>> {
        self.local.write().expect("router lock").remove(&shard)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<ShardId, Arc<Shard>>> {
        self.local.read().expect("router lock")
    }
}
