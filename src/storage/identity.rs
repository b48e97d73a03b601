//! The data directory's identity: which node it belongs to and how many shards its keys are
//! split into. Written when the directory is created (fsynced, atomically renamed); a reopen
//! compares it with the configuration. Since format 3 it also records the cluster's uuid,
//! once the node first knows the cluster map (a `uuid <hex>` line; files written before have
//! none and still read), so that a directory can later be told apart from another cluster's
//! of the same name (docs/design/membership.md §3.2).

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use crate::storage::durable_file;
use crate::storage::error::{Error, Result};

const FILE: &str = "IDENTITY";

/// What a data directory was created for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The cluster's name.
    pub cluster_id: String,
    /// The node id.
    pub node_id: u64,
    /// The number of shards.
    pub shards: u32,
    /// The cluster's uuid (`ClusterMap::cluster_uuid`), once known.
    pub uuid: Option<u128>,
}

impl Identity {
    /// Whether `other` names the same node of the same cluster with the same shards (the uuid
    /// aside: a configuration does not carry it).
    pub fn same_node(&self, other: &Identity) -> bool {
        (&self.cluster_id, self.node_id, self.shards)
            == (&other.cluster_id, other.node_id, other.shards)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "node {} of cluster {:?} with {} shards",
            self.node_id, self.cluster_id, self.shards
        )
    }
}

/// Path of the identity file in `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// Reads the identity of `dir`, if it has one.
pub fn read(dir: &Path) -> Result<Option<Identity>> {
    let path = path(dir);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let mut cluster_id = None;
    let mut node_id = None;
    let mut shards = None;
    let mut uuid = None;
    for line in text.lines() {
        match line.split_once(' ') {
            Some(("uuid", v)) => match u128::from_str_radix(v.trim(), 16) {
                Ok(u) => uuid = Some(u),
                Err(e) => {
                    let detail = format!("identity file has an invalid `uuid` line: {e}");
                    return Err(Error::corruption(&path, 0, detail));
                }
            },
            Some(("cluster", v)) => cluster_id = Some(v.trim().to_string()),
            Some(("node", v)) => node_id = v.trim().parse::<u64>().ok(),
            Some(("shards", v)) => shards = v.trim().parse::<u32>().ok(),
            _ => {}
        }
    }
    match (cluster_id, node_id, shards) {
        (Some(cluster_id), Some(node_id), Some(shards)) => Ok(Some(Identity {
            cluster_id,
            node_id,
            shards,
            uuid,
        })),
        _ => Err(Error::corruption(
            &path,
            0,
            "identity file lacks a valid `cluster`, `node` or `shards` line",
        )),
    }
}

/// Writes `identity` into `dir` durably.
pub fn write(dir: &Path, identity: &Identity) -> Result<()> {
    let mut text = format!(
        "cluster {}\nnode {}\nshards {}\n",
        identity.cluster_id, identity.node_id, identity.shards
    );
    if let Some(uuid) = identity.uuid {
        text.push_str(&format!("uuid {uuid:032x}\n"));
    }
    durable_file::write_atomically(dir, FILE, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_reports_damage() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let id = Identity {
            cluster_id: "c1".into(),
            node_id: 3,
            shards: 64,
            uuid: None,
        };
        write(dir.path(), &id).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(id.clone()));
        let text = fs::read_to_string(path(dir.path())).unwrap();
        assert_eq!(text, "cluster c1\nnode 3\nshards 64\n", "a format-2 file");
        let with_uuid = Identity {
            uuid: Some(0xab << 100 | 7),
            ..id.clone()
        };
        write(dir.path(), &with_uuid).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(with_uuid.clone()));
        assert!(with_uuid.same_node(&id));
        fs::write(path(dir.path()), format!("{text}uuid xyz\n")).unwrap();
        assert!(matches!(read(dir.path()), Err(Error::Corruption { .. })));
        fs::write(path(dir.path()), "node x\n").unwrap();
        assert!(matches!(read(dir.path()), Err(Error::Corruption { .. })));
    }
}
