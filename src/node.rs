//! The composition root: a [`Node`] opens its data directory, checks its identity, starts one
//! Raft group per shard, owns the router, serves the key-value API, and shuts down cleanly.
//!
//! Embedded use (a single local node; every shard's only voter is this node):
//!
//! ```no_run
//! # async fn demo() -> kvnode::Result<()> {
//! use kvnode::{Config, Node, ReadOptions};
//! let node = Node::open(Config::single_node("data/app")).await?;
//! let w = node.put(b"greeting", b"hello".to_vec()).await?;
//! let got = node.get(b"greeting", &ReadOptions::linearizable()).await?;
//! assert_eq!(got.value.unwrap().value, b"hello");
//! assert!(got.receipt.applied_index >= w.index);
//! node.close().await;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;

use crate::cluster;
use crate::config::Config;
use crate::consistency::{ReadOptions, WriteReceipt};
use crate::error::{Error, Result};
use crate::hibernation::{Controller, new_boot_id};
use crate::leadership::LeadershipChecks;
use crate::peers::Peers;
use crate::raft::commit_horizon::CommitHorizon;
use crate::raft::network::{NoPeers, ShardNetwork};
use crate::raft::{Command, CommandResult};
use crate::reply::{CasReply, DeleteReply, GetReply};
use crate::router::Router;
use crate::shard::{Shard, ShardView};
use crate::sharding::{HashRing, ShardId};
use crate::storage::wal::Fdatasync;
use crate::storage::{Identity, Store, StoreOptions, WalOptions};

/// A running kvnode node.
#[derive(Debug)]
pub struct Node {
    config: Config,
    store: Store,
    router: Router,
    /// Shard → its replicas' node ids, preferred leader first.
    placement: BTreeMap<ShardId, Vec<u64>>,
    /// Channels to the other nodes (None when embedded).
    peers: Option<Arc<Peers>>,
    /// Random per process start; peers see a restart as a new boot id (see `hibernation`).
    boot_id: u64,
    /// Puts idle shard groups to sleep (None if the config never hibernates); stops on drop.
    hibernation: std::sync::Mutex<Option<Controller>>,
    /// Leadership checks for the linearizable reads of every shard this node leads.
    checks: Arc<LeadershipChecks>,
}

impl Node {
    /// Opens a node from `config` (validated first): creates the data directory and its
    /// shard replicas on first use, or recovers them.
    ///
    /// Embedded (no peers): every shard's only voter is this node; `open` returns once every
    /// shard can serve. Clustered: each shard lives on the `replication_factor` nodes that
    /// placement picks; the first of them initializes the group, exactly once; `open` returns
    /// at once and the shards serve as soon as a majority of each group is up.
    ///
    /// Refuses a data directory created for another cluster, node id or shard count.
    pub async fn open(config: Config) -> Result<Node> {
        config.validate()?;
        let store = Store::open(
            &config.data_dir,
            StoreOptions {
                wal: WalOptions {
                    segment_bytes: config.wal_segment_bytes,
                    syncer: Arc::new(Fdatasync),
                },
                sled_cache_bytes: config.sled_cache_bytes,
            },
        )?;
        check_identity(&store, &config)?;
        let ring = HashRing::with_shards(config.shards)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let nodes = config.node_ids();
        let mut placement = BTreeMap::new();
        for shard in ring.shards() {
            let replicas = cluster::replicas(shard, &nodes, config.replication_factor)
                .map_err(|e| Error::InvalidArgument(format!("placement: {e}")))?;
            placement.insert(shard, replicas);
        }
        let local: Vec<ShardId> = placement
            .iter()
            .filter(|(_, replicas)| replicas.contains(&config.node_id))
            .map(|(shard, _)| *shard)
            .collect();

        let peers = if config.is_clustered() {
            Some(Peers::new(&config)?)
        } else {
            None
        };
        let checks = LeadershipChecks::new(
            peers.clone(),
            Duration::from_millis(config.election_timeout_min_ms).min(config.request_timeout()),
        );
        let opened = join_all(local.iter().map(|&id| {
            let store = &store;
            let config = &config;
            let peers = peers.clone();
            let checks = Arc::clone(&checks);
            async move {
                let horizon = Arc::new(CommitHorizon::default());
                match peers {
                    Some(peers) => {
                        let network = ShardNetwork::new(peers.clone(), id, Arc::clone(&horizon));
                        let network = (network, horizon);
                        Shard::open(store, config, id, network, Some(peers), checks).await
                    }
                    None => {
                        let network = (NoPeers, horizon);
                        Shard::open(store, config, id, network, None, checks).await
                    }
                }
            }
        }))
        .await;
        let shards = opened.into_iter().collect::<Result<Vec<Shard>>>()?;
        // Test builds: the fault tester's apply-lag nemesis, if KVNODE_APPLY_LAG asks for it.
        #[cfg(feature = "planted-bugs")]
        crate::raft::apply_stall::start_from_env(shards.iter().map(Shard::lag_target).collect());

        let started = join_all(shards.iter().map(|shard| {
            let replicas = &placement[&shard.id()];
            let config = &config;
            async move {
                let initializer = replicas.first() == Some(&config.node_id);
                let fresh = initializer && shard.initialize_if_new(replicas).await?;
                if !config.is_clustered() {
                    if !fresh {
                        // Recovered: the only voter need not wait out an election timeout.
                        shard.campaign().await?;
                    }
                    shard.wait_for_leader(config.request_timeout()).await?;
                }
                Ok::<_, Error>(())
            }
        }))
        .await;
        let boot_id = new_boot_id();
        let groups = shards.iter().map(Shard::hibernation_group).collect();
        let hibernation = Controller::start(&config, boot_id, peers.clone(), groups);
        let node = Node {
            router: Router::new(ring, shards),
            config,
            store,
            placement,
            peers,
            boot_id,
            hibernation: std::sync::Mutex::new(hibernation),
            checks,
        };
        if let Some(err) = started.into_iter().find_map(Result::err) {
            node.shutdown_shards().await;
            return Err(err);
        }
        tracing::info!(
            node = node.config.node_id,
            cluster = %node.config.cluster_id,
            shards = node.config.shards,
            local_replicas = node.router.shards().count(),
            data_dir = %node.config.data_dir.display(),
            "node ready"
        );
        Ok(node)
    }

    /// This node's id.
    pub fn id(&self) -> u64 {
        self.config.node_id
    }

    /// The replicas of `shard`, preferred leader first.
    pub fn replicas(&self, shard: ShardId) -> &[u64] {
        self.placement.get(&shard).map_or(&[], Vec::as_slice)
    }

    #[doc(hidden)]
    /// The local replica of `shard`, if this node hosts one.
    pub fn local_shard(&self, shard: ShardId) -> Option<&Shard> {
        self.router.local(shard)
    }

    #[doc(hidden)]
    /// Every local replica.
    pub fn local_shards(&self) -> impl Iterator<Item = &Shard> {
        self.router.shards()
    }

    #[doc(hidden)]
    /// This process's boot id (see [`crate::hibernation`]).
    pub fn boot_id(&self) -> u64 {
        self.boot_id
    }

    #[doc(hidden)]
    /// Channels to the other nodes (None when embedded).
    pub fn peers(&self) -> Option<&Arc<Peers>> {
        self.peers.as_ref()
    }

    #[doc(hidden)]
    /// The node-level leadership checks behind its shards' linearizable reads (see
    /// [`crate::leadership`]).
    pub fn leadership_checks(&self) -> &Arc<LeadershipChecks> {
        &self.checks
    }

    #[doc(hidden)]
    /// Every shard as this node sees it: replicas, and for local replicas openraft's view.
    pub fn status(&self) -> Vec<(ShardId, Vec<u64>, Option<ShardView>)> {
        self.placement
            .iter()
            .map(|(shard, replicas)| {
                (
                    *shard,
                    replicas.clone(),
                    self.local_shard(*shard).map(Shard::view),
                )
            })
            .collect()
    }

    #[doc(hidden)]
    /// The node's storage (snapshot folders for incoming snapshots).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The configuration the node runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The shard `key` belongs to.
    pub fn shard_for(&self, key: &[u8]) -> ShardId {
        self.router.shard_for(key)
    }

    /// Sets `key` to `value`.
    pub async fn put(&self, key: &[u8], value: Vec<u8>) -> Result<WriteReceipt> {
        self.check_key(key)?;
        self.check_value("value", &value)?;
        let shard = self.router.route(key)?;
        let (_, index) = shard
            .write(Command::Put {
                key: key.to_vec(),
                value,
            })
            .await?;
        Ok(WriteReceipt {
            shard: shard.id(),
            index,
        })
    }

    /// Reads `key` at the level `options` names.
    pub async fn get(&self, key: &[u8], options: &ReadOptions) -> Result<GetReply> {
        self.check_key(key)?;
        let shard = self.router.route(key)?;
        let (value, receipt) = shard.read(key, &options.level).await?;
        Ok(GetReply { value, receipt })
    }

    /// Removes `key`.
    pub async fn delete(&self, key: &[u8]) -> Result<DeleteReply> {
        self.check_key(key)?;
        let shard = self.router.route(key)?;
        let (result, index) = shard.write(Command::Delete { key: key.to_vec() }).await?;
        let existed = matches!(result, CommandResult::Delete { existed: true });
        Ok(DeleteReply {
            existed,
            receipt: WriteReceipt {
                shard: shard.id(),
                index,
            },
        })
    }

    /// If `key` holds `expected` (`None`: is absent), sets it to `new` (`None`: deletes it).
    /// Decided when the shard applies the command, so every replica agrees.
    pub async fn compare_and_set(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<Vec<u8>>,
    ) -> Result<CasReply> {
        self.check_key(key)?;
        if let Some(e) = expected {
            self.check_value("expected value", e)?;
        }
        if let Some(n) = &new {
            self.check_value("new value", n)?;
        }
        let shard = self.router.route(key)?;
        let command = Command::CompareAndSet {
            key: key.to_vec(),
            expected: expected.map(<[u8]>::to_vec),
            new,
        };
        let (result, index) = shard.write(command).await?;
        let receipt = WriteReceipt {
            shard: shard.id(),
            index,
        };
        match result {
            CommandResult::CasApplied => Ok(CasReply {
                applied: true,
                current: None,
                receipt,
            }),
            CommandResult::CasFailed { current } => Ok(CasReply {
                applied: false,
                current,
                receipt,
            }),
            other => Err(Error::ShardStopped {
                shard: shard.id(),
                reason: format!("state machine answered {other:?} to a compare-and-set"),
            }),
        }
    }

    /// Stops every shard and releases the data directory (it can be reopened once this
    /// returns).
    pub async fn close(self) {
        self.shutdown_shards().await;
        let Node {
            config,
            store,
            router,
            ..
        } = self;
        drop(router);
        store.release(std::time::Duration::from_secs(10)).await;
        tracing::info!(node = config.node_id, "node closed");
    }

    /// Stops every shard (for a node still shared, e.g. by a server that is winding down);
    /// [`Node::close`] also releases the data directory.
    pub async fn stop(&self) {
        self.shutdown_shards().await;
        if let Err(e) = self.store.flush_state() {
            tracing::warn!(error = %e, "flushing state machines failed");
        }
    }

    async fn shutdown_shards(&self) {
        // First, so no group is switched back on while it shuts down.
        drop(self.hibernation.lock().expect("hibernation lock").take());
        join_all(self.router.shards().map(Shard::shutdown)).await;
    }

    fn check_key(&self, key: &[u8]) -> Result<()> {
        if key.is_empty() {
            return Err(Error::InvalidArgument(
                "empty key: keys must be at least one byte".into(),
            ));
        }
        if key.len() > self.config.max_key_bytes {
            return Err(Error::InvalidArgument(format!(
                "key of {} bytes exceeds max_key_bytes ({})",
                key.len(),
                self.config.max_key_bytes
            )));
        }
        Ok(())
    }

    fn check_value(&self, what: &str, value: &[u8]) -> Result<()> {
        if value.len() > self.config.max_value_bytes {
            return Err(Error::InvalidArgument(format!(
                "{what} of {} bytes exceeds max_value_bytes ({})",
                value.len(),
                self.config.max_value_bytes
            )));
        }
        Ok(())
    }
}

/// Records the directory's identity on first use; refuses a directory made for another node
/// id or shard count.
fn check_identity(store: &Store, config: &Config) -> Result<()> {
    let wanted = Identity {
        cluster_id: config.cluster_id.clone(),
        node_id: config.node_id,
        shards: config.shards,
    };
    match store.identity()? {
        None => Ok(store.set_identity(&wanted)?),
        Some(found) if found == wanted => Ok(()),
        Some(found) => Err(Error::IdentityMismatch {
            path: crate::storage::identity::path(store.dir()),
            on_disk: found.to_string(),
            configured: wanted.to_string(),
        }),
    }
}
