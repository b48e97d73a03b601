//! openraft's storage conformance suite (`openraft::testing::log::Suite`) against kvnode's
//! WAL-backed log store and sled state machine, each built on a fresh data directory.

use kvnode::raft::{LogStore, StateMachine, TypeConfig};
use kvnode::storage::{Store, StoreOptions};
use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};

struct Builder;

/// Keeps the temporary directory (and the store's handles) alive for one suite case.
struct Guard {
    _store: Store,
    _dir: tempfile::TempDir,
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, Guard> for Builder {
    async fn build(&self) -> Result<(Guard, LogStore, StateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            Store::open(dir.path().join("data"), StoreOptions::default()).expect("open store");
        let shard = 3;
        let log = LogStore::new(store.wal().clone(), shard);
        let purged = log.last_purged().expect("log state");
        let sm = StateMachine::open(&store, shard, purged.as_ref()).expect("open state machine");
        Ok((
            Guard {
                _store: store,
                _dir: dir,
            },
            log,
            sm,
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_passes() {
    Suite::test_all(Builder)
        .await
        .expect("openraft storage conformance suite");
}
