//! One documented configuration for a node, with every default in one place and `validate()`.
//!
//! The library never reads files or environment variables; a binary builds a [`Config`] and
//! hands it over (`kvnode` builds it from its command-line flags; there is no config file yet).
//! `Config` derives `Serialize`/`Deserialize` so that a file format can be added outside the
//! library. Every field's doc says what it costs.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Configuration of a kvnode node (embedded or in a cluster).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the node keeps its WAL, state machines and snapshots. Default `data/kvnode`.
    pub data_dir: PathBuf,
    /// This node's id: unique in its cluster and never reused for a node that lost its data
    /// (reuse can form two quorums). Default 1.
    pub node_id: u64,
    /// Name of the cluster. Peers refuse messages from another cluster, and a data directory
    /// created for one cluster cannot join another. Default `kvnode`.
    pub cluster_id: String,
    /// Every node of the cluster, this one included: node id → `host:port` of its gRPC
    /// endpoint (client API and peer transport). Empty for an embedded single node.
    pub peers: BTreeMap<u64, String>,
    /// The local IP that connections to peers are sent from; `None` (the default) lets the OS
    /// choose. The fault-test harness sets it to the node's own loopback alias so that
    /// per-pair packet filters can tell nodes apart (otherwise every node sends from
    /// 127.0.0.1). Must be a specific address, not `0.0.0.0` or `::`.
    pub peer_source_ip: Option<IpAddr>,
    /// How many nodes hold a replica of each shard (capped by the node count). 3 survives one
    /// node failure; 5 survives two at the cost of more writes and heartbeats. Default 3.
    pub replication_factor: usize,
    /// Number of shards, fixed when the data directory is created; a reopen with another
    /// count is refused. More shards spread load over more Raft groups (each costs a few tasks
    /// and heartbeats). Default 16.
    pub shards: u32,
    /// Largest key accepted, in bytes. Default 4 KiB.
    pub max_key_bytes: usize,
    /// Largest value accepted, in bytes. Every value is held in memory while it is replicated
    /// and applied. Default 1 MiB.
    pub max_value_bytes: usize,
    /// Interval between a leader's heartbeats to each follower, in milliseconds. Each awake
    /// shard group sends one per follower per interval (256 busy shards × 2 followers at 250 ms
    /// is about 2,000 messages a second; hibernating groups send none), and the node pings each
    /// peer once per interval. openraft also uses it as the deadline of an append, so keep it
    /// well above a follower's fsync latency. Default 250.
    pub heartbeat_interval_ms: u64,
    /// Election timeout range, in milliseconds: a follower that hears nothing from its leader
    /// for a random time in this range starts an election. It bounds failover time from below;
    /// keep the minimum at least 3× the heartbeat interval and 10× the WAL's sync latency.
    /// Default 1000..2000.
    pub election_timeout_min_ms: u64,
    /// Upper end of the election timeout range (see `election_timeout_min_ms`).
    pub election_timeout_max_ms: u64,
    /// How much earlier than openraft a leader gives up its lease (which lasts
    /// `election_timeout_max_ms` after a quorum acknowledgement), for clock-rate drift between
    /// nodes: a margin `m` tolerates followers' clocks running fast by up to
    /// `m / (election_timeout_max_ms − m)` (see `crate::clock`). Unset: an eighth of
    /// `election_timeout_max_ms` (250 ms at the defaults, tolerating 14 %). A lease read
    /// outside the lease takes a quorum round and is served as linearizable.
    pub lease_margin_ms: Option<u64>,
    /// A shard group with no client traffic for this long hibernates: its timers and
    /// heartbeats stop while every node it needs answers the node-level ping (one per peer per
    /// heartbeat interval, whatever the shard count; see [`crate::hibernation`]). Any write or
    /// quorum read wakes it. 0 never hibernates. Default 2000.
    pub hibernate_after_ms: u64,
    /// A shard snapshots its state machine after this many log entries since the last
    /// snapshot; the WAL is then purged behind it. Lower values bound WAL disk use and restart
    /// time, higher ones write fewer snapshot files. Default 5000.
    pub snapshot_every_entries: u64,
    /// How long a request may wait (for a leader, a commit, or a replica to catch up) before
    /// failing with `Timeout`. A write that times out may still commit. Default 5000.
    pub request_timeout_ms: u64,
    /// WAL segment size in bytes: disk is reclaimed a segment at a time after purges.
    /// Default 64 MiB.
    pub wal_segment_bytes: u64,
    /// sled's cache for all state machines of the node together. Resident memory can reach a
    /// few times this. Default 64 MiB.
    pub sled_cache_bytes: u64,
    /// How long a replica that moved away keeps its local state before the node deletes it
    /// (docs/design/membership.md D10), in milliseconds. Default one hour; tests use 0.
    pub retired_gc_after_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("data/kvnode"),
            node_id: 1,
            cluster_id: "kvnode".to_string(),
            peers: BTreeMap::new(),
            peer_source_ip: None,
            replication_factor: 3,
            shards: 16,
            max_key_bytes: 4 * 1024,
            max_value_bytes: 1024 * 1024,
            heartbeat_interval_ms: 250,
            election_timeout_min_ms: 1000,
            election_timeout_max_ms: 2000,
            lease_margin_ms: None,
            hibernate_after_ms: 2000,
            snapshot_every_entries: 5000,
            request_timeout_ms: 5000,
            wal_segment_bytes: 64 * 1024 * 1024,
            sled_cache_bytes: 64 * 1024 * 1024,
            retired_gc_after_ms: 60 * 60 * 1000,
        }
    }
}

/// A configuration field that is out of range, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {field}: {problem}")]
pub struct ConfigError {
    /// The field's name, as in [`Config`] (the `kvnode` flag is the same name with dashes).
    pub field: &'static str,
    /// What is wrong with its value.
    pub problem: String,
}

fn bad(field: &'static str, problem: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError {
        field,
        problem: problem.into(),
    })
}

/// Largest shard count accepted (each shard is a Raft group with its own tasks).
pub const MAX_SHARDS: u32 = 4096;
/// Largest key limit accepted: keys travel in every log entry and index.
pub const MAX_KEY_LIMIT: usize = 64 * 1024;
/// Largest value limit accepted: a value must fit in one WAL record and one gRPC message.
pub const MAX_VALUE_LIMIT: usize = 64 * 1024 * 1024;

impl Config {
    /// A single local node keeping its data in `data_dir`, everything else default.
    pub fn single_node(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            data_dir: data_dir.into(),
            ..Config::default()
        }
    }

    /// Checks every field; the first problem found is returned, naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return bad("data_dir", "must not be empty");
        }
        if self.node_id == 0 {
            return bad("node_id", "must be at least 1 (0 is reserved)");
        }
        if self.cluster_id.is_empty()
            || self.cluster_id.len() > 64
            || !self
                .cluster_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return bad(
                "cluster_id",
                format!(
                    "{:?} must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'",
                    self.cluster_id
                ),
            );
        }
        if !self.peers.is_empty() && !self.peers.contains_key(&self.node_id) {
            return bad(
                "peers",
                format!(
                    "does not list this node (id {}) with its own address",
                    self.node_id
                ),
            );
        }
        for (id, addr) in &self.peers {
            if *id == 0 {
                return bad("peers", "node id 0 is reserved");
            }
            let valid = addr.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !valid {
                return bad("peers", format!("node {id}: {addr:?} is not host:port"));
            }
        }
        if let Some(ip) = self.peer_source_ip
            && ip.is_unspecified()
        {
            return bad(
                "peer_source_ip",
                format!("{ip} is unspecified: give a local address, or leave it unset"),
            );
        }
        if self.replication_factor == 0 || self.replication_factor > 7 {
            return bad(
                "replication_factor",
                format!("{} is not in 1..=7", self.replication_factor),
            );
        }
        if self.shards == 0 || self.shards > MAX_SHARDS {
            return bad(
                "shards",
                format!("{} is not in 1..={MAX_SHARDS}", self.shards),
            );
        }
        if self.max_key_bytes == 0 || self.max_key_bytes > MAX_KEY_LIMIT {
            return bad(
                "max_key_bytes",
                format!("{} is not in 1..={MAX_KEY_LIMIT}", self.max_key_bytes),
            );
        }
        if self.max_value_bytes > MAX_VALUE_LIMIT {
            return bad(
                "max_value_bytes",
                format!("{} exceeds {MAX_VALUE_LIMIT}", self.max_value_bytes),
            );
        }
        if self.heartbeat_interval_ms < 10 {
            return bad("heartbeat_interval_ms", "must be at least 10 ms");
        }
        if self.election_timeout_min_ms < 3 * self.heartbeat_interval_ms {
            return bad(
                "election_timeout_min_ms",
                format!(
                    "{} ms is less than 3 × heartbeat_interval_ms ({} ms): followers would \
                     start elections between heartbeats",
                    self.election_timeout_min_ms, self.heartbeat_interval_ms
                ),
            );
        }
        if self.election_timeout_max_ms <= self.election_timeout_min_ms {
            return bad(
                "election_timeout_max_ms",
                format!(
                    "{} ms must be greater than election_timeout_min_ms ({} ms)",
                    self.election_timeout_max_ms, self.election_timeout_min_ms
                ),
            );
        }
        if let Some(margin) = self.lease_margin_ms
            && margin + self.heartbeat_interval_ms >= self.election_timeout_max_ms
        {
            return bad(
                "lease_margin_ms",
                format!(
                    "{margin} ms leaves no lease: it must be less than election_timeout_max_ms \
                     ({} ms) minus heartbeat_interval_ms ({} ms)",
                    self.election_timeout_max_ms, self.heartbeat_interval_ms
                ),
            );
        }
        if self.hibernate_after_ms != 0 && self.hibernate_after_ms < self.heartbeat_interval_ms {
            return bad(
                "hibernate_after_ms",
                format!(
                    "{} ms is less than heartbeat_interval_ms ({} ms); use 0 to never hibernate",
                    self.hibernate_after_ms, self.heartbeat_interval_ms
                ),
            );
        }
        if self.snapshot_every_entries < 10 {
            return bad("snapshot_every_entries", "must be at least 10");
        }
        if self.request_timeout_ms == 0 {
            return bad("request_timeout_ms", "must be at least 1 ms");
        }
        let needed = self.max_key_bytes as u64 + self.max_value_bytes as u64 + 4096;
        if self.wal_segment_bytes < 64 * 1024 || self.wal_segment_bytes < needed {
            return bad(
                "wal_segment_bytes",
                format!(
                    "{} is too small: at least 64 KiB and one largest entry ({needed} bytes)",
                    self.wal_segment_bytes
                ),
            );
        }
        if self.sled_cache_bytes < 1024 * 1024 {
            return bad("sled_cache_bytes", "must be at least 1 MiB");
        }
        Ok(())
    }

    /// The ids of every node in the cluster (just this node when embedded).
    pub fn node_ids(&self) -> Vec<u64> {
        if self.peers.is_empty() {
            vec![self.node_id]
        } else {
            self.peers.keys().copied().collect()
        }
    }

    /// True when this node has peers to replicate to.
    pub fn is_clustered(&self) -> bool {
        self.peers.keys().any(|id| *id != self.node_id)
    }

    /// The lease margin (see [`Config::lease_margin_ms`]).
    pub fn lease_margin(&self) -> Duration {
        Duration::from_millis(
            self.lease_margin_ms
                .unwrap_or(self.election_timeout_max_ms / 8),
        )
    }

    /// [`Config::retired_gc_after_ms`] as a duration.
    pub fn retired_gc_after(&self) -> Duration {
        Duration::from_millis(self.retired_gc_after_ms)
    }

    /// The request timeout as a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_valid() {
        Config::default().validate().unwrap();
        Config::single_node("/tmp/x").validate().unwrap();
    }

    #[test]
    fn a_specific_peer_source_ip_is_valid_and_survives_serde() {
        let config = Config {
            peer_source_ip: Some(IpAddr::from([127, 0, 0, 12])),
            ..Config::default()
        };
        config.validate().unwrap();
        let json = serde_json::to_string(&config).unwrap();
        assert!(json.contains("\"peer_source_ip\":\"127.0.0.12\""), "{json}");
        let back: Config = serde_json::from_str(&json).unwrap();
        assert_eq!(back, config);
        let unset: Config = serde_json::from_str("{}").unwrap();
        assert_eq!(unset.peer_source_ip, None);
    }

    #[test]
    fn every_bad_field_is_named() {
        type Breakage = Box<dyn Fn(&mut Config)>;
        let cases: Vec<(&str, Breakage)> = vec![
            ("data_dir", Box::new(|c| c.data_dir = PathBuf::new())),
            ("node_id", Box::new(|c| c.node_id = 0)),
            (
                "lease_margin_ms",
                Box::new(|c| c.lease_margin_ms = Some(c.election_timeout_max_ms)),
            ),
            (
                "cluster_id",
                Box::new(|c| c.cluster_id = "no spaces".into()),
            ),
            (
                "peers",
                Box::new(|c| c.peers = [(2, "127.0.0.1:1".into())].into()),
            ),
            (
                "peers",
                Box::new(|c| c.peers = [(1, "localhost".into())].into()),
            ),
            (
                "peer_source_ip",
                Box::new(|c| c.peer_source_ip = Some(IpAddr::from([0, 0, 0, 0]))),
            ),
            (
                "peer_source_ip",
                Box::new(|c| c.peer_source_ip = Some(std::net::Ipv6Addr::UNSPECIFIED.into())),
            ),
            ("replication_factor", Box::new(|c| c.replication_factor = 0)),
            ("shards", Box::new(|c| c.shards = 0)),
            ("shards", Box::new(|c| c.shards = MAX_SHARDS + 1)),
            ("max_key_bytes", Box::new(|c| c.max_key_bytes = 0)),
            (
                "max_key_bytes",
                Box::new(|c| c.max_key_bytes = MAX_KEY_LIMIT + 1),
            ),
            (
                "max_value_bytes",
                Box::new(|c| c.max_value_bytes = MAX_VALUE_LIMIT + 1),
            ),
            (
                "heartbeat_interval_ms",
                Box::new(|c| c.heartbeat_interval_ms = 1),
            ),
            (
                "election_timeout_min_ms",
                Box::new(|c| c.election_timeout_min_ms = 100),
            ),
            (
                "election_timeout_max_ms",
                Box::new(|c| c.election_timeout_max_ms = 1000),
            ),
            ("hibernate_after_ms", Box::new(|c| c.hibernate_after_ms = 1)),
            (
                "snapshot_every_entries",
                Box::new(|c| c.snapshot_every_entries = 1),
            ),
            ("request_timeout_ms", Box::new(|c| c.request_timeout_ms = 0)),
            (
                "wal_segment_bytes",
                Box::new(|c| c.wal_segment_bytes = 1000),
            ),
            ("sled_cache_bytes", Box::new(|c| c.sled_cache_bytes = 10)),
        ];
        for (field, break_it) in cases {
            let mut config = Config::default();
            break_it(&mut config);
            let err = config.validate().expect_err(field);
            assert_eq!(err.field, field, "{err}");
            assert!(err.to_string().contains(field));
        }
    }
}
