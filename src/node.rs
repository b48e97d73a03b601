//! The composition root: a [`Node`] opens its data directory, checks its identity, starts one
//! Raft group per shard, owns the router, serves the key-value API, and shuts down cleanly.
//!
//! It also hosts the META group (docs/design/membership.md §1) on the nodes placement picks
//! for it ([`seed::meta_voters`]), seeds it on first start ([`seed::seed_map`]), and keeps the
//! node's view of the cluster map ([`MapView`]): loaded from the `CLUSTER` cache at open so it
//! is known before META answers, fed by META's state machine, and written back to the cache
//! (and the cluster uuid to `IDENTITY`) whenever it moves to a newer epoch, and fed by peers:
//! a ping reply with a higher `map_epoch` makes the node fetch that peer's map (`follow_map`).
//! A known map drives the node: its live nodes are the peers (`admit_map_nodes`, on every
//! newer map) and, when known at open, its voters are the placement. On META's leader it also
//! activates Joining nodes (`activate_joining`) and decides joins ([`Node::register_node`]).
//! A clustered node's replicas follow the map at runtime (`ReplicaFollower`): a pending move's
//! `add` on this node is opened empty, a replica the map no longer lists here is closed and,
//! after `Config::retired_gc_after_ms`, retired on disk. At open, the replica ids come from the
//! map and the state of replicas the map retired here is deleted (`retire_leftovers`).
//! META is not in the key router: no key routes to it; peers reach it through
//! [`Node::local_shard`].
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
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use openraft::async_runtime::watch::WatchReceiver;
use tokio::task::JoinHandle;

use crate::cluster::activation::Activation;
use crate::cluster::membership::{Applied, ClusterMap, META, MetaChange, MetaRejected, NodeState};
use crate::cluster::{self, MapView, join, seed};
use crate::config::Config;
use crate::consistency::{ReadOptions, WriteReceipt};
use crate::error::{Error, Result};
use crate::hibernation::{Controller, Groups, new_boot_id};
use crate::leadership::LeadershipChecks;
use crate::peers::Peers;
use crate::raft::commit_horizon::CommitHorizon;
use crate::raft::network::{NoPeers, ShardNetwork};
use crate::raft::{Command, CommandResult, ShardRaft};
use crate::reply::{CasReply, DeleteReply, GetReply};
use crate::router::Router;
use crate::shard::{Shard, ShardView};
use crate::sharding::{HashRing, ShardId};
use crate::storage::codec::{decode_serde, encode_serde};
use crate::storage::wal::Fdatasync;
use crate::storage::{Identity, Store, StoreOptions, WalOptions, cluster_cache};

/// A running kvnode node.
#[derive(Debug)]
pub struct Node {
    config: Config,
    store: Store,
    router: Arc<Router>,
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
    /// This node's replica of the META group, if placement puts one here (not in `router`).
    meta: Option<Arc<Shard>>,
    /// The groups hibernation watches (every local replica, META's included).
    groups: Arc<Groups>,
    /// Opens, closes and retires replicas as the map changes (clustered nodes only).
    replicas: Option<Arc<ReplicaFollower>>,
    /// The newest cluster map this node knows.
    map_view: Arc<MapView>,
    /// The seeding task (clustered META voters, until the map is seeded) and the task that
    /// writes `CLUSTER` and the uuid on every newer map; aborted at shutdown.
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
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
    /// A cluster map cached in the directory (`CLUSTER`) overrides the flags: the peers are its
    /// live nodes (a `--peers` that differs is logged and ignored) and each shard's replicas
    /// its voters, so a node that joined (no `--peers`) is clustered, and one the map gives no
    /// replica hosts none and forwards every request.
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
        let identity = check_identity(&store, &config)?;
        let map_view = Arc::new(MapView::default());
        let cached = load_cached_map(store.dir(), identity.uuid, &map_view);
        // A known map is the source of the node set and of placement (§1.4, §5); a first
        // start (no map yet) derives both from the flags, which the seed reproduces exactly.
        let known = map_view
            .current()
            .filter(|map| clustered_map(map, config.node_id));
        let config = match &known {
            Some(map) => adopt_map_peers(config, map),
            None => config,
        };
        let ring = HashRing::with_shards(config.shards)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let nodes = config.node_ids();
        let mut placement = BTreeMap::new();
        for shard in ring.shards() {
            let replicas = match &known {
                Some(map) => map_replicas(map, shard),
                None => cluster::replicas(shard, &nodes, config.replication_factor)
                    .map_err(|e| Error::InvalidArgument(format!("placement: {e}")))?,
            };
            placement.insert(shard, replicas);
        }
        // This node's replica of each shard: the map's voter or pending add on this node (its
        // replica id), or, before any map, the flags' placement with replica id = node id.
        let me = config.node_id;
        let local: Vec<(ShardId, u64)> = placement
            .iter()
            .filter_map(|(shard, replicas)| match &known {
                Some(map) => local_replica(map, *shard, me).map(|r| (*shard, r)),
                None => replicas.contains(&me).then_some((*shard, me)),
            })
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
        let meta_voters = match &known {
            Some(map) => map_replicas(map, META),
            None => seed::meta_voters(&config)
                .map_err(|e| Error::InvalidArgument(format!("placement of META: {e}")))?,
        };
        let meta_replica = match &known {
            Some(map) => local_replica(map, META, me),
            None => meta_voters.contains(&me).then_some(me),
        };
        if let Some(map) = &known {
            retire_leftovers(&store, map, me)?;
        }
        let opened = join_all(local.iter().map(|&(id, replica)| {
            open_shard(
                &store,
                &config,
                (id, replica),
                peers.clone(),
                Arc::clone(&checks),
                None,
            )
        }))
        .await;
        let shards = opened
            .into_iter()
            .map(|s| s.map(Arc::new))
            .collect::<Result<Vec<Arc<Shard>>>>()?;
        let meta = if let Some(replica) = meta_replica {
            let view = Some(Arc::clone(&map_view));
            Some(
                open_shard(
                    &store,
                    &config,
                    (META, replica),
                    peers.clone(),
                    Arc::clone(&checks),
                    view,
                )
                .await
                .map(Arc::new)?,
            )
        } else {
            None
        };
        // Test builds: the fault tester's apply-lag nemesis, if KVNODE_APPLY_LAG asks for it.
        #[cfg(feature = "planted-bugs")]
        crate::raft::apply_stall::start_from_env(shards.iter().map(|s| s.lag_target()).collect());

        let groups: Vec<(&Shard, &[u64])> = shards
            .iter()
            .map(|shard| (shard.as_ref(), placement[&shard.id()].as_slice()))
            .chain(meta.iter().map(|m| (m.as_ref(), meta_voters.as_slice())))
            .collect();
        let started = join_all(groups.into_iter().map(|(shard, replicas)| {
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
        let groups = Groups::new(
            shards
                .iter()
                .chain(meta.iter())
                .map(|s| s.hibernation_group())
                .collect(),
        );
        let hibernation = Controller::start(&config, boot_id, peers.clone(), Arc::clone(&groups));
        let router = Arc::new(Router::new(ring, shards));
        let mut replicas = None;
        let mut tasks = vec![tokio::spawn(keep_cache(
            store.dir().to_path_buf(),
            identity,
            cached,
            map_view.subscribe(),
        ))];
        if let Some(peers) = &peers {
            let retry = Duration::from_millis(config.heartbeat_interval_ms);
            let follower = follow_map(Arc::clone(peers), Arc::clone(&map_view), retry);
            tasks.push(tokio::spawn(follower));
            tasks.push(tokio::spawn(admit_map_nodes(
                Arc::clone(peers),
                map_view.subscribe(),
            )));
            let follower = Arc::new(ReplicaFollower {
                store: store.clone(),
                config: config.clone(),
                peers: Arc::clone(peers),
                checks: Arc::clone(&checks),
                router: Arc::clone(&router),
                groups: Arc::clone(&groups),
                meta: meta.clone(),
                disk: tokio::sync::Mutex::new(()),
                retirements: std::sync::Mutex::new(Vec::new()),
            });
            tasks.push(tokio::spawn(follow_replicas(
                Arc::clone(&follower),
                map_view.subscribe(),
            )));
            replicas = Some(follower);
            if let Some(meta) = &meta {
                tasks.push(tokio::spawn(activate_joining(
                    meta.raft().clone(),
                    Arc::clone(peers),
                    Arc::clone(&map_view),
                    boot_id,
                    retry,
                )));
            }
        }
        let node = Node {
            router,
            groups,
            replicas,
            config,
            store,
            placement,
            peers,
            boot_id,
            hibernation: std::sync::Mutex::new(hibernation),
            checks,
            meta,
            map_view,
            tasks: std::sync::Mutex::new(tasks),
        };
        if let Some(err) = started.into_iter().find_map(Result::err) {
            node.shutdown_shards().await;
            return Err(err);
        }
        if let Err(err) = node.seed_meta().await {
            node.shutdown_shards().await;
            return Err(err);
        }
        tracing::info!(
            node = node.config.node_id,
            cluster = %node.config.cluster_id,
            shards = node.config.shards,
            local_replicas = node.router.shards().len(),
            hosts_meta = node.meta.is_some(),
            map_epoch = node.map_epoch(),
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
    /// The local replica of `shard` (the META group's for [`META`]), if this node hosts one.
    pub fn local_shard(&self, shard: ShardId) -> Option<Arc<Shard>> {
        if shard == META {
            self.meta.clone()
        } else {
            self.router.local(shard)
        }
    }

    #[doc(hidden)]
    /// Every local replica, the META group's last if this node hosts one.
    pub fn local_shards(&self) -> Vec<Arc<Shard>> {
        let mut shards = self.router.shards();
        shards.extend(self.meta.iter().cloned());
        shards
    }

    #[doc(hidden)]
    /// The newest cluster map this node knows (`None` before the first one is known).
    pub fn cluster_map(&self) -> Option<Arc<ClusterMap>> {
        self.map_view.current()
    }

    #[doc(hidden)]
    /// The epoch of [`Node::cluster_map`]; 0 = no map known yet.
    pub fn map_epoch(&self) -> u64 {
        self.map_view.epoch()
    }

    #[doc(hidden)]
    /// Proposes `change` to the META group through this node's META replica, and waits until
    /// it is applied. A refusal is the `Err` of the inner result, with the map unchanged.
    ///
    /// # Errors
    ///
    /// [`Error::Unavailable`] if this node hosts no META replica; the write errors of
    /// [`Shard::write`] (e.g. [`Error::NotLeader`] on a follower).
    pub async fn propose_meta(
        &self,
        change: MetaChange,
    ) -> Result<std::result::Result<Applied, MetaRejected>> {
        let Some(meta) = &self.meta else {
            return Err(Error::Unavailable {
                shard: META,
                reason: format!("node {} hosts no replica of the META group", self.id()),
            });
        };
        match meta.write(Command::Meta(change)).await? {
            (CommandResult::Meta(result), _) => Ok(result),
            (other, _) => Err(Error::ShardStopped {
                shard: META,
                reason: format!("the META state machine answered {other:?} to a map change"),
            }),
        }
    }

    #[doc(hidden)]
    /// The node that leads META as this node's META replica knows it (`None` if this node
    /// hosts no META replica or knows no leader).
    pub fn meta_leader(&self) -> Option<u64> {
        self.meta.as_ref().and_then(|m| m.view().leader)
    }

    #[doc(hidden)]
    /// Registers the node at `addr` (§3.2 step 2), on the node that leads META: idempotent by
    /// address ([`join::decide`]): a Joining node's address answers that node; a free one
    /// commits `AddNode`. Returns the id and a map that lists it.
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyExists`] if a node past Joining has `addr`, [`Error::InvalidArgument`]
    /// if it is not `host:port` (both definite); [`Error::NotLeader`] on a node whose META
    /// replica does not lead; the errors of [`Node::propose_meta`].
    pub async fn register_node(&self, addr: &str) -> Result<(u64, Arc<ClusterMap>)> {
        let valid = addr.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !valid {
            return Err(Error::InvalidArgument(format!(
                "the node address {addr:?} is not host:port"
            )));
        }
        let unknown = || Error::Unavailable {
            shard: META,
            reason: "this node does not know the cluster map yet".into(),
        };
        // A concurrent registration of the same address makes `AddNode` refuse it: decide
        // again on the map that includes it (it is applied by the time the refusal is).
        for _ in 0..3 {
            let map = self.cluster_map().ok_or_else(unknown)?;
            match join::decide(&map, addr) {
                join::Decision::Existing(id) => return Ok((id, map)),
                join::Decision::Taken { id, state } => {
                    return Err(Error::AlreadyExists(format!(
                        "address {addr:?} belongs to node {id}, which is {state}"
                    )));
                }
                join::Decision::Add => {}
            }
            let change = MetaChange::AddNode {
                addr: addr.to_string(),
            };
            match self.propose_meta(change).await? {
                Ok(Applied::NodeAdded { id }) => {
                    let map = self.map_listing(id).await.ok_or_else(unknown)?;
                    tracing::info!(node = id, addr, epoch = map.epoch, "registered a node");
                    return Ok((id, map));
                }
                Ok(other) => {
                    return Err(Error::ShardStopped {
                        shard: META,
                        reason: format!("the META state machine answered {other:?} to AddNode"),
                    });
                }
                Err(MetaRejected::AddrInUse { .. }) => continue,
                Err(MetaRejected::NotSeeded { .. }) => return Err(unknown()),
                Err(e) => return Err(Error::InvalidArgument(e.to_string())),
            }
        }
        Err(Error::Unavailable {
            shard: META,
            reason: format!("registering {addr:?} raced with other changes three times"),
        })
    }

    /// The map once it lists node `id` (META's state machine offers it when it applies the
    /// change, so at once on this node; bounded by the request timeout).
    async fn map_listing(&self, id: u64) -> Option<Arc<ClusterMap>> {
        let mut maps = self.map_view.subscribe();
        let wait = async {
            loop {
                if let Some(map) = maps.borrow_and_update().clone()
                    && map.nodes.contains_key(&id)
                {
                    return map;
                }
                if maps.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(self.config.request_timeout(), wait)
            .await
            .ok()
    }

    /// Seeds the META group (§5): embedded, at once (so `open` returns with the map known);
    /// clustered, from a background task on every META voter, which proposes the seed while it
    /// leads META and the map is unseeded. Every node derives the same seed (uuid aside) and
    /// the group applies only the first `Seed`, so a restart or a second proposer is harmless:
    /// a `Seed` committed before is found applied, and a later one is refused.
    async fn seed_meta(&self) -> Result<()> {
        let Some(meta) = &self.meta else {
            return Ok(());
        };
        let seed = seed::seed_map(&self.config, seed::new_cluster_uuid())
            .map_err(|e| Error::InvalidArgument(format!("seed map: {e}")))?;
        if !self.config.is_clustered() {
            if self.map_epoch() == 0 {
                log_seed(self.propose_meta(MetaChange::Seed(seed)).await?);
            }
            return Ok(());
        }
        let raft = meta.raft().clone();
        let view = Arc::clone(&self.map_view);
        let retry = Duration::from_millis(self.config.heartbeat_interval_ms);
        let timeout = self.config.request_timeout();
        let task = tokio::spawn(async move {
            let mut maps = view.subscribe();
            let mut metrics = raft.metrics();
            while view.epoch() == 0 {
                let leads = metrics.borrow_watched().state == openraft::ServerState::Leader;
                if leads {
                    let proposed = raft.client_write(Command::Meta(MetaChange::Seed(seed.clone())));
                    match tokio::time::timeout(timeout, proposed).await {
                        Ok(Ok(reply)) => match reply.data {
                            CommandResult::Meta(result) => log_seed(result),
                            other => tracing::warn!(?other, "unexpected answer to the seed"),
                        },
                        Ok(Err(e)) => tracing::info!(error = %e, "seeding META failed; will retry"),
                        Err(_) => tracing::info!("seeding META timed out; will retry"),
                    }
                    if view.epoch() > 0 {
                        break;
                    }
                }
                // Until the map is known, a leadership change, or a retry interval.
                tokio::select! {
                    _ = maps.changed() => {}
                    _ = metrics.changed() => {}
                    _ = tokio::time::sleep(retry) => {}
                }
            }
        });
        self.tasks.lock().expect("tasks lock").push(task);
        Ok(())
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
                    self.local_shard(*shard).map(|s| s.view()),
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
            meta,
            groups,
            replicas,
            ..
        } = self;
        drop(replicas);
        drop(groups);
        drop(router);
        drop(meta);
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
        for task in self.tasks.lock().expect("tasks lock").drain(..) {
            task.abort();
        }
        if let Some(replicas) = &self.replicas {
            replicas.stop();
        }
        join_all(self.local_shards().iter().map(|s| s.shutdown())).await;
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

/// True if `map` describes a cluster this node is part of with at least one other live node
/// (an embedded node's own map, with only itself, leaves the flags in charge).
fn clustered_map(map: &ClusterMap, me: u64) -> bool {
    let live = |n: &cluster::membership::NodeEntry| n.state != NodeState::Removed;
    map.nodes.get(&me).is_some_and(live) && map.nodes.iter().any(|(id, n)| *id != me && live(n))
}

/// The map's live nodes (every node not `Removed`): the node set the peers follow.
pub(crate) fn live_nodes(map: &ClusterMap) -> BTreeMap<u64, String> {
    map.nodes
        .iter()
        .filter(|(_, n)| n.state != NodeState::Removed)
        .map(|(id, n)| (*id, n.addr.clone()))
        .collect()
}

/// `config` with the map's live nodes as its peers. Design §5 refuses a `--peers` that differs
/// from the map at a later start; this slice warns and uses the map instead, since the restart
/// tests of a grown cluster restart its first nodes with their original `--peers`.
fn adopt_map_peers(mut config: Config, map: &ClusterMap) -> Config {
    let live = live_nodes(map);
    if !config.peers.is_empty() && config.peers != live {
        tracing::warn!(
            flags = ?config.peers,
            map = ?live,
            epoch = map.epoch,
            "--peers differs from the cluster map's live nodes; using the map"
        );
    }
    config.peers = live;
    config
}

/// The nodes of `shard`'s voters in `map`, preferred leader first (placement's rendezvous
/// order over exactly those nodes, which keeps today's order for a seeded map); empty if the
/// map does not list the shard.
fn map_replicas(map: &ClusterMap, shard: ShardId) -> Vec<u64> {
    let Some(entry) = map.shards.get(&shard) else {
        return Vec::new();
    };
    let nodes: Vec<u64> = entry.voters.iter().map(|r| r.node).collect();
    cluster::replicas(shard, &nodes, nodes.len()).unwrap_or(nodes)
}

/// This node's replica of `shard` in `map`: the voter on node `me`, else the pending move's
/// `add` on `me` (a new replica, opened empty), else none.
pub(crate) fn local_replica(map: &ClusterMap, shard: ShardId, me: u64) -> Option<u64> {
    let entry = map.shards.get(&shard)?;
    entry
        .voters
        .iter()
        .chain(entry.pending.iter().flat_map(|m| m.add.iter()))
        .find(|r| r.node == me)
        .map(|r| r.id)
}

/// Finishes or starts the deletion of local state the map says this node no longer holds: a
/// shard whose recorded replica (`storage::replica_record`, legacy = `me`) the map lists as
/// retired on this node. Conservative on purpose: a replica the map merely does not list is
/// kept (the cached map may predate the move that added it), so only the map's own `retired`
/// list, which names a replica only once its group no longer counts it, deletes data here. A
/// replica hosted under another id is retired when it opens (`Shard::open`).
fn retire_leftovers(store: &Store, map: &ClusterMap, me: u64) -> Result<()> {
    for shard in store.shards_on_disk()? {
        let Some(entry) = map.shards.get(&shard) else {
            continue;
        };
        if local_replica(map, shard, me).is_some() {
            continue;
        }
        let recorded = store.shard_replica(shard, me)?;
        if entry
            .retired
            .iter()
            .any(|r| r.id == recorded && r.node == me)
        {
            tracing::info!(
                shard,
                replica = recorded,
                "retiring a replica the map retired"
            );
            store.retire_shard(shard)?;
        }
    }
    Ok(())
}

/// Opens, closes and retires this node's replicas as the cluster map changes
/// (docs/design/membership.md §1.4, §4.5, D8, D10), on a clustered node.
///
/// - A replica the map newly assigns to this node (a pending move's `add`) is opened empty and
///   uninitialized: it joins its group only when the leader adds it as a learner and sends it
///   appends or a snapshot; it never initializes a group itself.
/// - A replica the map no longer lists on this node (after `FinishMove` it is in `retired`, no
///   longer a voter) is taken out of routing and hibernation and shut down; after
///   `retired_gc_after` its local state is retired (`Store::retire_shard`) and the node proposes
///   `ForgetRetired` through its META replica, best effort.
///
/// Safety: the map lists a replica on this node from `StartMove` until `FinishMove`, which is
/// committed only after the group's membership no longer holds it (D6), so a replica is never
/// closed while its group may still count it. Its replica id is never reused (D3), so deleting
/// its state cannot make a later replica here start from a log it did not write. Opening and
/// retiring are serialized (`disk`), and a retire is skipped if a new incarnation opened
/// meanwhile (whose open retired the old state already).
pub(crate) struct ReplicaFollower {
    store: Store,
    config: Config,
    peers: Arc<Peers>,
    checks: Arc<LeadershipChecks>,
    router: Arc<Router>,
    groups: Arc<Groups>,
    meta: Option<Arc<Shard>>,
    /// Held while a replica's local state is opened or retired.
    disk: tokio::sync::Mutex<()>,
    /// Pending retirements (aborted when the node stops).
    retirements: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for ReplicaFollower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaFollower").finish_non_exhaustive()
    }
}

impl ReplicaFollower {
    /// Makes the local replicas of data shards what `map` lists on this node.
    async fn follow(self: &Arc<Self>, map: &ClusterMap) {
        let me = self.config.node_id;
        for (&shard, entry) in &map.shards {
            if shard == META {
                continue;
            }
            let want = local_replica(map, shard, me);
            let have = self.router.local(shard).map(|s| s.replica_id());
            if want == have {
                continue;
            }
            if let Some(old) = have {
                // A replica listed elsewhere, or under another id here, closes; its state is
                // retired later (moved away) or by the new incarnation's open (new id).
                let moved_away =
                    want.is_none() && entry.retired.iter().any(|r| r.id == old && r.node == me);
                self.close(shard, old, map.epoch, want.is_none()).await;
                if want.is_none() && !moved_away {
                    tracing::info!(
                        shard,
                        replica = old,
                        "the map no longer lists this node's replica"
                    );
                }
            }
            if let Some(replica) = want {
                self.open(shard, replica, map.epoch).await;
            }
        }
    }

    async fn open(self: &Arc<Self>, shard: ShardId, replica: u64, epoch: u64) {
        let _disk = self.disk.lock().await;
        let opened = open_shard(
            &self.store,
            &self.config,
            (shard, replica),
            Some(Arc::clone(&self.peers)),
            Arc::clone(&self.checks),
            None,
        )
        .await;
        match opened {
            Ok(opened) => {
                let opened = Arc::new(opened);
                self.groups.insert(opened.hibernation_group());
                if let Some(old) = self.router.insert(opened) {
                    old.shutdown().await;
                }
                tracing::info!(
                    shard,
                    replica,
                    epoch,
                    "opened a replica the map assigns here"
                );
            }
            Err(e) => {
                tracing::warn!(shard, replica, epoch, error = %e, "opening a replica the map assigns here failed; the next map retries");
            }
        }
    }

    async fn close(self: &Arc<Self>, shard: ShardId, replica: u64, epoch: u64, retire: bool) {
        let Some(old) = self.router.remove(shard) else {
            return;
        };
        self.groups.remove(shard);
        old.shutdown().await;
        drop(old);
        tracing::info!(
            shard,
            replica,
            epoch,
            "closed a replica the map no longer lists here"
        );
        if retire {
            let this = Arc::clone(self);
            let task = tokio::spawn(async move { this.retire_later(shard, replica).await });
            self.retirements
                .lock()
                .expect("retirements lock")
                .push(task);
        }
    }

    /// After the grace period: retires `replica`'s local state of `shard` unless a replica of
    /// the shard is open here again, then proposes `ForgetRetired` (best effort).
    async fn retire_later(self: Arc<Self>, shard: ShardId, replica: u64) {
        tokio::time::sleep(self.config.retired_gc_after()).await;
        {
            let _disk = self.disk.lock().await;
            if self.router.local(shard).is_some() {
                return;
            }
            let recorded = self.store.shard_replica(shard, self.config.node_id);
            if !matches!(recorded, Ok(r) if r == replica) {
                return;
            }
            let store = self.store.clone();
            let retired = tokio::task::spawn_blocking(move || store.retire_shard(shard)).await;
            match retired {
                Ok(Ok(())) => tracing::info!(shard, replica, "retired a replica that moved away"),
                Ok(Err(e)) => {
                    tracing::warn!(shard, replica, error = %e, "retiring a replica failed; the next start retries");
                    return;
                }
                Err(e) => {
                    tracing::warn!(shard, replica, error = %e, "retiring a replica stopped");
                    return;
                }
            }
        }
        let Some(meta) = &self.meta else {
            return;
        };
        let forget = MetaChange::ForgetRetired { shard, replica };
        match meta.write(Command::Meta(forget)).await {
            Ok(_) => tracing::info!(shard, replica, "proposed ForgetRetired"),
            Err(e) => {
                tracing::debug!(shard, replica, error = %e, "ForgetRetired not proposed (best effort)")
            }
        }
    }

    /// Aborts pending retirements (the node is stopping).
    fn stop(&self) {
        for task in self.retirements.lock().expect("retirements lock").drain(..) {
            task.abort();
        }
    }
}

/// Runs [`ReplicaFollower::follow`] on every newer map that lists this node. Runs until aborted.
async fn follow_replicas(
    follower: Arc<ReplicaFollower>,
    mut maps: tokio::sync::watch::Receiver<Option<Arc<ClusterMap>>>,
) {
    maps.mark_changed();
    while maps.changed().await.is_ok() {
        let Some(map) = maps.borrow_and_update().clone() else {
            continue;
        };
        if !map.nodes.contains_key(&follower.config.node_id) {
            continue;
        }
        follower.follow(&map).await;
    }
}

/// Keeps the peer set equal to every newer map's live nodes, so that a node added to the map
/// is admitted and reachable (and a Removed one is neither). Runs until aborted.
async fn admit_map_nodes(
    peers: Arc<Peers>,
    mut maps: tokio::sync::watch::Receiver<Option<Arc<ClusterMap>>>,
) {
    maps.mark_changed();
    while maps.changed().await.is_ok() {
        let Some(map) = maps.borrow_and_update().clone() else {
            continue;
        };
        if !map.nodes.contains_key(&peers.self_id()) {
            continue;
        }
        let nodes: Vec<(u64, String)> = live_nodes(&map).into_iter().collect();
        if peers.node_ids() == nodes.iter().map(|(id, _)| *id).collect::<Vec<_>>()
            && nodes
                .iter()
                .all(|(id, a)| peers.addr(*id).as_deref() == Some(a))
        {
            continue;
        }
        match peers.update(&nodes) {
            Ok(()) => {
                tracing::info!(epoch = map.epoch, nodes = ?nodes, "peers follow the cluster map")
            }
            Err(e) => {
                tracing::warn!(epoch = map.epoch, error = %e, "the cluster map's nodes were not admitted")
            }
        }
    }
}

/// Joining → Active (§3.2 step 4, [`Activation`]): while this node leads META, pings every
/// Joining node of the map once per `interval` and proposes `ActivateNode` for each that
/// answered [`crate::cluster::activation::PINGS_TO_ACTIVATE`] pings in a row. A refused proposal (the node was
/// activated or removed meanwhile) is only logged; the next map decides again. Runs until
/// aborted.
async fn activate_joining(
    raft: ShardRaft,
    peers: Arc<Peers>,
    view: Arc<MapView>,
    boot_id: u64,
    interval: Duration,
) {
    let mut tracker = Activation::default();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let leads = raft.metrics().borrow_watched().state == openraft::ServerState::Leader;
        let Some(map) = view.current().filter(|_| leads) else {
            continue;
        };
        for id in tracker.joining(&map) {
            let answered = peers.ping(id, boot_id, interval).await.is_ok();
            if !tracker.record(id, answered) {
                continue;
            }
            let proposed = raft.client_write(Command::Meta(MetaChange::ActivateNode { id }));
            match tokio::time::timeout(peers.rpc_timeout(), proposed).await {
                Ok(Ok(reply)) => match reply.data {
                    CommandResult::Meta(Ok(_)) => tracing::info!(node = id, "node is Active"),
                    CommandResult::Meta(Err(e)) => {
                        tracing::info!(node = id, error = %e, "activation refused")
                    }
                    other => tracing::warn!(?other, "unexpected answer to ActivateNode"),
                },
                Ok(Err(e)) => {
                    tracing::info!(node = id, error = %e, "activation failed; will retry")
                }
                Err(_) => tracing::info!(node = id, "activation timed out; will retry"),
            }
        }
    }
}

/// Records the directory's identity on first use; refuses a directory made for another node
/// id or shard count. Returns the identity on disk.
fn check_identity(store: &Store, config: &Config) -> Result<Identity> {
    let wanted = Identity {
        cluster_id: config.cluster_id.clone(),
        node_id: config.node_id,
        shards: config.shards,
        uuid: None,
    };
    match store.identity()? {
        None => {
            store.set_identity(&wanted)?;
            Ok(wanted)
        }
        Some(found) if found.same_node(&wanted) => Ok(found),
        Some(found) => Err(Error::IdentityMismatch {
            path: crate::storage::identity::path(store.dir()),
            on_disk: found.to_string(),
            configured: wanted.to_string(),
        }),
    }
}

/// Opens `replica` of shard `id` on this node with the transport the configuration calls for.
async fn open_shard(
    store: &Store,
    config: &Config,
    (id, replica): (ShardId, u64),
    peers: Option<Arc<Peers>>,
    checks: Arc<LeadershipChecks>,
    map_view: Option<Arc<MapView>>,
) -> Result<Shard> {
    let horizon = Arc::new(CommitHorizon::default());
    match peers {
        Some(peers) => {
            let network = ShardNetwork::new(peers.clone(), id, Arc::clone(&horizon));
            let network = (network, horizon);
            Shard::open(
                store,
                config,
                id,
                replica,
                network,
                Some(peers),
                checks,
                map_view,
            )
            .await
        }
        None => {
            let network = (NoPeers, horizon);
            Shard::open(store, config, id, replica, network, None, checks, map_view).await
        }
    }
}

/// Logs the outcome of a `Seed` proposal: applied, or refused because another seed won.
fn log_seed(result: std::result::Result<Applied, MetaRejected>) {
    match result {
        Ok(_) => tracing::info!("seeded the cluster map"),
        Err(MetaRejected::AlreadySeeded { epoch }) => {
            tracing::info!(epoch, "the cluster map was seeded already")
        }
        Err(e) => tracing::error!(error = %e, "the seed map was refused"),
    }
}

/// Follows the cluster map through the peers (docs/design/membership.md §1.4): when a ping
/// reply reports a higher epoch than `view` has, fetches that peer's map and offers it (the
/// view keeps it if it is still newer; the cache writer then writes `CLUSTER`). A failed or
/// stale fetch is retried every `retry` while the reported epoch is ahead. Runs until aborted.
async fn follow_map(peers: Arc<Peers>, view: Arc<MapView>, retry: Duration) {
    let mut reported = peers.reported_map_epochs();
    loop {
        let (epoch, from) = *reported.borrow_and_update();
        if epoch > view.epoch() {
            let fetched = peers.fetch_map(from).await.and_then(|bytes| {
                decode_serde::<ClusterMap>(&bytes).map_err(|e| format!("undecodable map: {e}"))
            });
            match fetched {
                Ok(map) if map.epoch >= epoch => {
                    tracing::debug!(epoch = map.epoch, from, "fetched a newer cluster map");
                    view.offer(Arc::new(map));
                    continue;
                }
                Ok(map) => {
                    tracing::debug!(got = map.epoch, want = epoch, from, "fetched map is older");
                }
                Err(e) => tracing::debug!(from, error = %e, "fetching the cluster map failed"),
            }
            tokio::select! {
                _ = reported.changed() => {}
                _ = tokio::time::sleep(retry) => {}
            }
            continue;
        }
        if reported.changed().await.is_err() {
            return;
        }
    }
}

/// Offers the map in `<dir>/CLUSTER` to `view`; returns its epoch (0: none). The file is only a
/// cache: a damaged one is logged and ignored, and META's map replaces it; so is one of another
/// cluster than the directory's `IDENTITY` names (`uuid`), which would otherwise keep this
/// node's own META map out of the view (`MapView::offer` refuses a foreign uuid).
fn load_cached_map(dir: &std::path::Path, uuid: Option<u128>, view: &MapView) -> u64 {
    let path = cluster_cache::path(dir);
    let bytes = match cluster_cache::read(dir) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return 0,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring the cluster-map cache");
            return 0;
        }
    };
    match decode_serde::<ClusterMap>(&bytes) {
        Ok(map) if uuid.is_some_and(|u| u != map.cluster_uuid) => {
            tracing::warn!(
                path = %path.display(),
                identity = format_args!("{:032x}", uuid.unwrap_or_default()),
                cache = format_args!("{:032x}", map.cluster_uuid),
                "ignoring the cluster-map cache: it belongs to another cluster than IDENTITY"
            );
            0
        }
        Ok(map) => {
            let epoch = map.epoch;
            view.offer(Arc::new(map));
            tracing::debug!(epoch, "loaded the cluster map from the cache");
            epoch
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring the cluster-map cache: it does not decode");
            0
        }
    }
}

/// Writes every newer map `maps` sees to `<dir>/CLUSTER`, and the cluster's uuid to `IDENTITY`
/// once it is known. `written` is the epoch the cache already holds. Runs until aborted.
async fn keep_cache(
    dir: PathBuf,
    mut identity: Identity,
    mut written: u64,
    mut maps: tokio::sync::watch::Receiver<Option<Arc<ClusterMap>>>,
) {
    maps.mark_changed();
    while maps.changed().await.is_ok() {
        let Some(map) = maps.borrow_and_update().clone() else {
            continue;
        };
        let needs_uuid = identity.uuid.is_none();
        if map.epoch <= written && !needs_uuid {
            continue;
        }
        let (dir2, identity2) = (dir.clone(), identity.clone());
        let epoch = map.epoch;
        let wrote = tokio::task::spawn_blocking(move || {
            cluster_cache::write(&dir2, &encode_serde(&*map))?;
            if needs_uuid {
                let with_uuid = Identity {
                    uuid: Some(map.cluster_uuid),
                    ..identity2
                };
                crate::storage::identity::write(&dir2, &with_uuid)?;
                return Ok(Some(with_uuid));
            }
            Ok::<_, crate::storage::Error>(None)
        })
        .await;
        match wrote {
            Ok(Ok(new_identity)) => {
                written = epoch;
                if let Some(new_identity) = new_identity {
                    identity = new_identity;
                }
                tracing::debug!(epoch, "wrote the cluster-map cache");
            }
            Ok(Err(e)) => tracing::warn!(epoch, error = %e, "writing the cluster-map cache failed"),
            Err(e) => tracing::warn!(epoch, error = %e, "the cluster-map cache writer failed"),
        }
    }
}
