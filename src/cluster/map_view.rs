//! The newest cluster map a node knows (docs/design/membership.md §1.4): one [`MapView`] per
//! node, fed by the META group's state machine (on the nodes that host META), by the
//! `CLUSTER` cache at open, and by maps fetched from peers. Read by the node's API and watched
//! by the task that rewrites the cache.
//!
//! Why a watch and not a lock: readers want the current map without blocking the apply path,
//! and the cache writer wants to be woken on change. Why "offer" rather than "set": maps come
//! from several sources that race (a stale cache, a replica replaying its log from an old
//! snapshot, a fetch), and every valid map of one cluster is a point of one history whose
//! epoch only grows, so the view keeps the highest epoch and ignores the rest.

use std::sync::Arc;

use tokio::sync::watch;

use crate::cluster::membership::ClusterMap;

/// The newest cluster map this node knows; `None` before the first one.
#[derive(Debug)]
pub struct MapView {
    tx: watch::Sender<Option<Arc<ClusterMap>>>,
}

impl Default for MapView {
    fn default() -> Self {
        MapView {
            tx: watch::Sender::new(None),
        }
    }
}

impl MapView {
    /// Installs `map` if it is seeded and newer than the current one (a higher epoch); returns
    /// whether it did. An unseeded map (epoch 0) is never installed, nor is a map of another
    /// cluster (another `cluster_uuid` than the current map's): epochs of two histories say
    /// nothing about each other, and a peer of another cluster that happens to share the name
    /// must not replace this node's map.
    pub fn offer(&self, map: Arc<ClusterMap>) -> bool {
        self.tx.send_if_modified(|current| {
            if let Some(c) = current.as_ref()
                && c.cluster_uuid != map.cluster_uuid
            {
                tracing::debug!(
                    ours = format_args!("{:032x}", c.cluster_uuid),
                    offered = format_args!("{:032x}", map.cluster_uuid),
                    epoch = map.epoch,
                    "ignoring a cluster map of another cluster"
                );
                return false;
            }
            let newer = map.epoch > current.as_ref().map_or(0, |c| c.epoch);
            if newer {
                *current = Some(Arc::clone(&map));
            }
            newer
        })
    }

    /// The current map, if any.
    pub fn current(&self) -> Option<Arc<ClusterMap>> {
        self.tx.borrow().clone()
    }

    /// The current map's epoch; 0 = no map known.
    pub fn epoch(&self) -> u64 {
        self.tx.borrow().as_ref().map_or(0, |m| m.epoch)
    }

    /// A receiver woken whenever a newer map is installed.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<ClusterMap>>> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(epoch: u64, name: &str) -> Arc<ClusterMap> {
        Arc::new(ClusterMap {
            epoch,
            name: name.into(),
            ..ClusterMap::default()
        })
    }

    #[test]
    fn keeps_the_highest_epoch_only() {
        let view = MapView::default();
        assert_eq!((view.current(), view.epoch()), (None, 0));
        assert!(!view.offer(map(0, "unseeded")));
        assert_eq!(view.current(), None);
        let mut rx = view.subscribe();
        assert!(view.offer(map(3, "three")));
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        assert!(!view.offer(map(2, "older")));
        assert!(!view.offer(map(3, "same epoch")));
        assert!(!rx.has_changed().unwrap());
        assert_eq!(view.current().unwrap().name, "three");
        assert!(view.offer(map(4, "four")));
        assert_eq!(view.epoch(), 4);
    }

    #[test]
    fn never_installs_a_map_of_another_cluster() {
        let view = MapView::default();
        assert!(view.offer(map(3, "ours")));
        let foreign = Arc::new(ClusterMap {
            cluster_uuid: 0xf0,
            ..(*map(9, "theirs")).clone()
        });
        assert!(!view.offer(foreign));
        assert_eq!(view.current().unwrap().name, "ours");
        assert!(view.offer(map(4, "ours, later")));
    }
}
