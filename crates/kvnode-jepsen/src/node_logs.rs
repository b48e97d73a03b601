//! What the nodes' own logs (`<run>/logs/node-N.log`, every life of a node appended) say about
//! the faults the harness cannot see from outside, in test builds (the `planted-bugs`
//! feature):
//!
//! - whether a switch took: `PLANTED BUG ACTIVE` (`KVNODE_PLANTED_BUG`, see `kvnode::planted`)
//!   and `APPLY LAG ACTIVE` (`KVNODE_APPLY_LAG`, see `kvnode::raft::apply_stall`). A build
//!   without the feature ignores both, and a campaign that relies on them must not pass for
//!   that reason;
//! - how often a planted bug was exercised: one `planted bug fired: <name>: …` line per time it
//!   served or acknowledged something in the situation it is about;
//! - the apply-lag windows: one `apply-lag window: held N shards, M with an apply waiting` line
//!   per node and window.
//!
//! These strings are the nodes' log messages; `kvnode`'s unit tests check they match.

use std::path::Path;

/// The line a node logs once when a planted bug is switched on.
pub const PLANTED_ACTIVE: &str = "PLANTED BUG ACTIVE";
/// The line a node logs once when the apply-lag driver is switched on.
pub const APPLY_LAG_ACTIVE: &str = "APPLY LAG ACTIVE";
/// How a line reporting an exercised planted bug begins.
pub const FIRED: &str = "planted bug fired";
/// How a node's line at the end of an apply-lag window begins.
pub const LAG_WINDOW: &str = "apply-lag window: held";

/// The apply-lag windows the nodes logged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LagWindows {
    /// Windows, summed over the nodes.
    pub windows: u64,
    /// Shard replicas held (each a leader at the window's start), summed over windows.
    pub held: u64,
    /// Of those, the ones with an apply waiting when the window ended: a write had committed
    /// while its leader's apply was held.
    pub lagged: u64,
}

/// Every line of every node log in `logs` (unreadable files count as empty).
fn lines(logs: &Path) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(logs) else {
        return Vec::new();
    };
    let mut files: Vec<_> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    files.sort();
    files
        .iter()
        .filter_map(|f| std::fs::read(f).ok())
        .flat_map(|bytes| {
            String::from_utf8_lossy(&bytes)
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// How many node-log lines in `logs` contain `needle`.
pub fn count(logs: &Path, needle: &str) -> u64 {
    lines(logs).iter().filter(|l| l.contains(needle)).count() as u64
}

/// How many times the planted bug `bug` was exercised, from the node logs in `logs`.
pub fn fired(logs: &Path, bug: &str) -> u64 {
    count(logs, &format!("{FIRED}: {bug}:"))
}

/// The apply-lag windows the nodes logged in `logs`.
pub fn lag_windows(logs: &Path) -> LagWindows {
    let mut total = LagWindows::default();
    for line in lines(logs) {
        let Some((_, rest)) = line.split_once(LAG_WINDOW) else {
            continue;
        };
        // " N shards, M with an apply waiting"
        let numbers: Vec<u64> = rest
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|w| w.parse().ok())
            .take(2)
            .collect();
        if let [held, lagged] = numbers[..] {
            total.windows += 1;
            total.held += held;
            total.lagged += lagged;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_firings_and_windows_across_node_logs() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("node-1.log"),
            "\u{1b}[33m WARN\u{1b}[0m kvnode::planted: planted bug fired: ack-uncommitted: shard 2 …\n\
             INFO kvnode::raft::apply_stall: apply-lag window: held 2 shards, 1 with an apply waiting shards=[0, 3]\n\
             WARN planted bug fired: ack-uncommitted-not: x\n",
        )
        .expect("write");
        std::fs::write(
            dir.path().join("node-2.log"),
            "planted bug fired: ack-uncommitted: shard 5 …\n\
             apply-lag window: held 0 shards, 0 with an apply waiting\n\
             PLANTED BUG ACTIVE: ack-uncommitted\n",
        )
        .expect("write");
        std::fs::write(
            dir.path().join("notes.txt"),
            "planted bug fired: ack-uncommitted: no",
        )
        .expect("write");
        assert_eq!(fired(dir.path(), "ack-uncommitted"), 2);
        assert_eq!(fired(dir.path(), "read-index-applied"), 0);
        assert_eq!(count(dir.path(), PLANTED_ACTIVE), 1);
        assert_eq!(
            lag_windows(dir.path()),
            LagWindows {
                windows: 2,
                held: 2,
                lagged: 1
            }
        );
        assert_eq!(fired(&dir.path().join("missing"), "ack-uncommitted"), 0);
    }

    /// The strings are the nodes' own (this crate's tests see the library's test-only hooks).
    #[test]
    fn the_markers_are_the_nodes_log_messages() {
        assert_eq!(FIRED, kvnode::planted::FIRED);
        assert_eq!(PLANTED_ACTIVE, kvnode::planted::ACTIVE_BANNER);
        assert_eq!(APPLY_LAG_ACTIVE, kvnode::raft::apply_stall::ACTIVE_BANNER);
        assert_eq!(LAG_WINDOW, kvnode::raft::apply_stall::WINDOW_DONE);
    }
}
