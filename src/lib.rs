//! # kvnode
//!
//! A key-value store that an application embeds as a library and that scales out to a cluster
//! of `kvnode` processes with the same API and the same data format. Keys map to a fixed set of
//! shards by consistent hashing; every shard is one Raft group (openraft); every read names its
//! consistency level and every reply says what was served.
//!
//! This crate doc is the design doc. `docs/design/architecture.md` is the target; where
//! the code differs, this page says so and why.
//!
//! ## The request path
//!
//! ```text
//! client / Node API ─► router (key → shard → replica) ─► shard ─► raft (propose / read-index)
//!                                                              ├► raft::LogStore ─► storage::wal   (fdatasync, group commit)
//!                                                              └► raft::StateMachine ─► storage::state_tree (sled)
//!                                                                                    └► storage::snapshot_file
//! peer traffic ─► server::raft (shard id in every message) ─► that shard's Raft
//! ```
//!
//! **Raft ids are replica ids.** A shard group's Raft ids name replicas, not nodes
//! (`docs/design/membership.md` D3, §2): a Raft id must never be reused by a replica that
//! starts from an empty log, and a shard can return to a node it left. The group's membership
//! names each replica's node ([`raft::replica_node`]; a legacy entry means node = replica
//! id). Everything that reaches a peer goes by node: [`raft::network`] connects to the
//! replica's node and names the replica in the message (the receiver refuses one for a
//! replica it does not host), [`leadership`] asks each voter's node about that voter,
//! [`hibernation`] counts a replica reachable when its node is, and leader hints
//! (`NotLeader`, `x-kvnode-leader`) are nodes. A node's replica of a shard is the map's voter
//! (or pending move's `add`) on that node, and its Raft id is that replica id (equal to the node
//! id for every replica that existed before moves). The data directory records which replica id
//! a shard's local state belongs to (`storage::replica_record`; none = the node id), and a shard
//! opened under another id retires the old incarnation's log, vote, tree and snapshots first
//! (`storage::Store::retire_shard`), so a Raft id never starts from state it did not write.
//!
//! ## Cluster metadata: the META group (issue 17, `docs/design/membership.md`)
//!
//! Which nodes exist and which replicas each shard has is one value, the cluster map
//! (`cluster::membership::ClusterMap`), replicated by a Raft group of its own: the META group,
//! reserved shard id `u64::MAX`, hosted on the nodes placement picks for it (1 voter below 3
//! nodes, 3 below 5, else 5) and reusing the WAL, [`shard::Shard`] and sled like any shard. Its
//! only command is `raft::Command::Meta`; its state machine keeps the map as one key, so
//! replay, snapshots and restore work as for data. It is not in the key router. On first start
//! the first META voter initializes the group and the META leader proposes a `Seed` derived
//! from the flags (today's placement, replica id = node id, so no data group changes); the
//! group applies one seed only. Every node keeps the newest map it knows
//! ([`Node::cluster_map`], `cluster::MapView`), cached in `<data-dir>/CLUSTER` so a restart
//! knows it before META answers; a node that sees a higher `map_epoch` in a peer's ping reply
//! fetches that peer's map (`FetchMap`), which is how nodes that do not host META follow it.
//! Once a node knows a map (from `CLUSTER`, at later starts), the map drives it: its peers are
//! the map's live nodes (updated on every newer map, so an added node is admitted), and
//! `Node::replicas` and its local replicas are the map's voters; a first start derives both
//! from the flags, which the seed reproduces. `kvnode --join ADDR` asks any node for
//! `Admin.Join`, which META's leader decides (idempotent by address: `kvctl node add ADDR`
//! pre-registers); the node writes `CLUSTER` and `IDENTITY` and serves, and the META leader
//! activates it after two answered pings. A joined node holds no replica until a move gives it
//! one; it forwards every request. Replicas come and go at runtime: the router's set changes
//! (`Router::insert/remove`), a node opens the replica a pending move adds on it (empty; it waits
//! for its leader), and closes, then after a grace period deletes, one the map no longer lists
//! on it. A move's steps on the group are [`shard::Shard`]'s `add_learner`, `matched`,
//! `membership`, `replace_voters` and `transfer_leader` (design D6); nothing drives them
//! automatically yet (the rebalancer, milestone M4).
//!
//! Modules import downward only: [`storage`] knows nothing of Raft (it stores opaque bytes);
//! [`raft`] adapts openraft to storage and is the only module that names openraft storage
//! types; [`sharding`] and `cluster` are pure functions; [`shard`] runs one replica;
//! `router` and [`node`] compose them; [`server`] and [`client`] put them on the wire
//! ([`pb`] is the only module that converts between wire and domain types, and
//! [`pb::status`] the only one that maps errors to gRPC statuses; the client imports nothing
//! from the server).
//!
//! **Where the code differs from ARCHITECTURE.md, and why**
//! - openraft's storage types appear in [`shard`] too (error mapping, read policy): the seam
//!   that matters, storage, stays free of them.
//! - Each WAL record carries the writer's durable watermark and each segment starts with a
//!   checkpoint (vote, committed, purge point and log start of every shard): the first tells a
//!   torn tail from damaged synced data, the second makes segment deletion safe and a lost
//!   segment detectable.
//! - Snapshots are built while openraft holds the state machine exclusively (apply paused),
//!   because sled has no point-in-time view; fine for shards of moderate size.
//! - Reads do not go through openraft's state-machine task: a shared read handle
//!   ([`raft::StateReader`]) follows snapshot installs.
//! - A leader's read index does not come from openraft's `ReadIndex` linearizer but from a
//!   node-level leadership check over the stored votes ([`leadership`], below); openraft's
//!   round remains the fallback and what renews a lapsed lease.
//!
//! ## Durability: what "acknowledged" means
//!
//! A Raft log entry or vote is acknowledged to openraft only after an `fdatasync` that covers
//! it has returned ([`storage::wal`]). sled's `flush` is `sync_file_range`, not an fsync, so
//! the Raft log and votes do not live in sled: they live in a node-wide write-ahead log of our
//! own (like TiKV's raft-engine or etcd's WAL):
//!
//! - **One log for every shard.** Appends and votes of all shards are framed (length, CRCs,
//!   format version, bincode payload), written with `pwrite` (readable at once), and made
//!   durable by one group-commit thread: one `fdatasync` covers everything pending, then the
//!   callbacks fire in write order. Votes and entries share the order, so neither can become
//!   durable before an earlier write of the other (openraft's IO-ordering rule).
//! - **Recovery** replays the segments: a torn tail (bytes after the last sync) is cut off, and
//!   the surviving tail is fsynced before anything is reported as stored; damage anywhere else
//!   is [`storage::Error::Corruption`] naming the segment and offset. A record carries the
//!   writer's durable watermark, which is how a bad record in synced data is told from a torn
//!   write. A lost segment shows up as missing entries (every segment starts with a checkpoint
//!   of every shard's markers and log start), never as a silently shorter log.
//! - **Space**: a segment is deleted once every shard has purged past it and the records that
//!   made it so are durable (a purge never outruns its own fdatasync).
//! - **A failed fsync stops the log** ([`storage::Error::WalFailed`]): after a failed fsync the
//!   kernel may have dropped the dirty pages, so retrying could acknowledge lost data.
//!
//! Each shard's state machine lives in sled (one `sled::Db` per node, a tree per shard). An
//! apply writes its keys one by one and then the last applied log id (with any membership),
//! not as one sled batch: sled's `apply_batch` writes and syncs its log buffer twice per call
//! and takes a process-wide lock, which cost more than half the put throughput with 16 shards.
//! Every key's record carries the log index of its last write (a delete leaves a tombstone),
//! so a replay after a crash skips an entry whose key already holds it or a later write, and
//! recovery reaches the same state as the other replicas ([`storage::state_tree`] has the
//! argument, `raft::state_machine` the test that tears an apply at every sled write). sled's
//! own (lazy) durability is enough: after a crash a shard replays the WAL from its last
//! applied index, and if sled lost more than the WAL still holds (it was purged behind a
//! snapshot), the state machine is restored from the snapshot file first. Snapshots are
//! checksummed files, fsynced and renamed into place; the WAL is purged only up to a snapshot
//! that is already durable.
//!
//! ## Guarantees (target; see ARCHITECTURE.md "Consistency contract")
//!
//! - Writes (put, delete, compare-and-set) commit through the shard's Raft log on a majority;
//!   compare-and-set is decided in the state machine at apply time, so every replica reaches the
//!   same outcome ([`raft::StateMachine::apply_entries`]).
//! - Reads name a level: linearizable (default), lease, session, bounded staleness, eventual.
//! - Errors say whether an outcome is definite or indeterminate.
//!
//! ## Idle groups hibernate
//!
//! One node hosts hundreds of Raft groups, and most are idle most of the time. An idle group
//! still costs timer wake-ups on every replica and a heartbeat per follower per interval, so
//! [`hibernation`] turns a group's timers off once it has been idle for `hibernate_after_ms`
//! with its log settled on every replica, and replaces per-group failure detection with one
//! node-level ping per peer per heartbeat interval (TiKV's hibernate regions, CockroachDB's
//! quiescence). A write or quorum read wakes the group; a peer that stops answering, or comes
//! back, wakes the groups that need it; a follower whose leader's node stops answering (or
//! stops listing the shard as led) turns its timers back on and campaigns. Timers never carry
//! safety: a sleeping leader's lease lapses, so lease reads run a quorum round first.
//!
//! ## Linearizable reads: one leadership check per node, not per group
//!
//! A linearizable read needs a read index confirmed by a quorum after the read began.
//! openraft's `ReadIndex` round does that per group, through the group's core task and
//! heartbeats; with 16 groups per node that made a linearizable get cost more server CPU than
//! a put's apply. [`leadership`] does it once per node per round instead. At the read's start
//! the leader, provided it leads right now (openraft's state, a committed vote), an entry it
//! proposed in its current term is applied and its stored vote is still that term's, takes
//! as read index the larger of the last index whose apply started and the highest commit
//! index it has sent a peer ([`raft::commit_horizon`]): every write any replica may have made
//! visible is at or below it, even one a follower applied before the leader did. It then asks
//! each peer in one message, for every group with reads waiting, whether that peer's stored
//! vote is still the leader's. A majority of yes proves no later leader existed when the read
//! began (votes only grow, and the WAL's copy of a vote changes before it is granted); the
//! read is served once the leader has applied its index. The module doc has the argument;
//! the tests that hold a leader's apply or restart a leader (`tests/replication/consistency.rs`), the
//! cluster test `a_deposed_leader_resumed_after_a_pause_does_not_serve_a_stale_linearizable_read`
//! and the planted bugs `confirm-any-vote` and `read-index-applied` show each part matters.
//! It uses no clock.
//!
//! Lease reads do use one: a leader serves them only inside openraft's lease less a margin
//! for clock-rate drift, with any suspend of the machine since the last quorum
//! acknowledgement counted against it (`clock`; `Instant` stops during a suspend).
//!
//! ## Evidence: the fault tests
//!
//! The guarantees above are checked, not assumed: `kvnode-jepsen` (`crates/kvnode-jepsen`,
//! behind `kvctl jepsen`) runs real processes under
//! partitions, kill -9 and SIGSTOP and checks the recorded history per level (linearizability
//! for `lin`, `fri` and `lease`, the Δ bound for bounded reads, validity and convergence for
//! eventual reads, session guarantees, no lost acknowledged writes). Test builds carry planted
//! bugs (`planted`, the `planted-bugs` feature): `crates/kvnode-cli/tests/jepsen_planted.rs` shows the Jepsen
//! checkers catch the first three, and the cluster test above catches `confirm-any-vote`;
//! `.ci/run` runs a smoke campaign on every change.
//!
//! ## Non-goals
//!
//! Multi-key transactions; changing the shard count of an existing cluster (it is fixed at
//! creation, as in Garage); byzantine peers (the peer port is for trusted nodes only).
//!
//! ## Module map
//!
//! | module | owns |
//! |---|---|
//! | [`storage`] | the data directory (format 3): [`storage::cluster_cache`] (the `CLUSTER` file), [`storage::wal`] (segments, group commit, recovery), [`storage::state_tree`] (sled trees per shard), [`storage::snapshot_file`] (snapshot files), [`storage::codec`] (framing) |
//! | [`raft`] | openraft type config, [`raft::Command`], [`raft::LogStore`], [`raft::StateMachine`], the peer network, replica → node ([`raft::replica_node`]) |
//! | [`config`] | [`Config`]: one documented struct, defaults, `validate()` |
//! | [`error`] | the public [`Error`]: definite or indeterminate, retryable or not |
//! | [`sharding`] | key → shard: the consistent-hash ring (pure, property-tested) |
//! | `cluster` | shard → replica set: rendezvous placement (pure, property-tested); the cluster map and its pure state machine (`cluster::membership`), the node's view of the newest map (`cluster::MapView`), the seed map derived from the flags (`cluster::seed`) |
//! | [`consistency`] | read levels, receipts, session tokens |
//! | `clock` | time that counts suspends, and the lease rule |
//! | [`shard`] | one local replica: Raft group, write path, per-level read paths |
//! | `read_index` | coalesced read-index rounds and the freshness proofs bounded reads use |
//! | [`leadership`] | node-level leadership checks: one message per peer per round confirms every group's leader |
//! | [`hibernation`] | idle groups' timers off, node-level pings, the rules that wake them |
//! | `router` | key → shard → local replica |
//! | [`node`] | composition root and the key-value API: [`Node`] |
//! | [`reply`] | what the API returns |
//! | [`peers`] | a node's channels to its peers (Raft and forwarding apart; the node set can change at runtime, `Peers::update`) and the node-level calls: ping, leadership confirmation, read index; test partitions |
//! | [`value`] | [`VersionedValue`]: a value and its version, shared by every layer |
//! | [`pb`] | generated gRPC code, the wire ↔ domain conversions, the error ↔ status mapping ([`pb::status`]), the message limit |
//! | [`server`] | tonic services: client API with forwarding ([`server::kv`]), peer transport ([`server::raft`]) |
//! | [`client`] | the Rust client: shard- and leader-aware, retries only what is safe |
//! | `planted` (hidden; `planted-bugs` feature, test builds only) | the `KVNODE_PLANTED_BUG` switch that makes [`shard`] commit a known consistency bug, so the Jepsen checkers can be shown to catch it |
//!
//! ## The workspace around the library
//!
//! This crate is the library and nothing else; the tools are other members of the workspace
//! (`crates/`), so an application that depends on `kvnode` compiles none of them:
//!
//! | package | owns |
//! |---|---|
//! | `kvnode-cli` | the binaries: `kvnode` (flags → [`Config`] → [`Node`] → serve), `kvctl` (the CLI over [`client::Client`], plus `kvctl jepsen` and `kvctl bench`), the test-only `kvnode-planted`; and the end-to-end tests that run them as processes |
//! | `kvnode-jepsen` | fault testing anyone can run (`kvctl jepsen run`): real `kvnode` processes, partitions (iptables in a private netns, or a TCP proxy), a seeded kill/pause/partition nemesis, workers recording a history at every read level, the checkers (per-key linearizability, per-level checks, lost writes), the report and timeline |
//! | `kvnode-loadgen` | the load generator behind `kvctl bench` and `scripts/bench.sh`: one closed-loop workload against kvnode or etcd (over etcd's own gRPC API, its `proto/etcd.proto`), HDR-histogram latencies, JSON results, the side-by-side report |
//! | `kvnode-testkit` | test support (a dev-dependency): an in-process cluster over real sockets with test partitions, `eventually`, the one seeded `Rng` |

#![deny(missing_docs)]

// The documented API is what an application uses: `Node`, `Config`, the read levels and
// receipts, errors, the Rust `client`, the cluster map it returns and the placement rule
// (`cluster`), the wire types (`pb`) and `server::serve`. Internals that nothing outside the
// crate needs are `pub(crate)` (clock, read_index, router).
// Modules marked `doc(hidden)` are internals that another package of the workspace or the
// crate's own tests and benches reach, so they stay `pub`; they carry no stability promise and
// may name openraft or sled types:
// - `raft`, `storage`: the storage, WAL and crash tests (tests/storage, tests/crash), the
//   replication tests, the hot_paths and wal_group_commit benches;
// - `peers`: kvnode-testkit's in-process cluster (test partitions) and the transport test;
// - `leadership`: the consistency test; `hibernation`, `shard`: kvnode-cli's cluster tests;
// - `planted` (feature `planted-bugs` only): kvnode-cli's `kvnode` / `kvnode-planted` binaries;
// - `cluster::map_view`, `cluster::seed`: the membership tests (`Node::cluster_map`).

pub mod client;
pub(crate) mod clock;
pub mod cluster;
pub mod config;
pub mod consistency;
pub mod error;
#[doc(hidden)]
pub mod hibernation;
#[doc(hidden)]
pub mod leadership;
pub mod node;
pub mod pb;
#[doc(hidden)]
pub mod peers;
#[cfg(feature = "planted-bugs")]
#[doc(hidden)]
pub mod planted;
#[doc(hidden)]
pub mod raft;
pub(crate) mod read_index;
pub mod reply;
pub(crate) mod router;
pub mod server;
#[doc(hidden)]
pub mod shard;
pub mod sharding;
#[doc(hidden)]
pub mod storage;
pub mod value;

pub use config::Config;
pub use consistency::{ReadLevel, ReadOptions, ReadReceipt, SessionToken, WriteReceipt};
pub use error::{Error, Result, StorageError};
pub use node::Node;
pub use reply::{CasReply, DeleteReply, GetReply, VersionedValue};
