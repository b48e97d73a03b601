//! Runs kvnode's durable core on a local data directory: appends puts to a shard's Raft log
//! (acknowledged after fdatasync), applies them to the sled state machine, and on the next run
//! shows what was recovered. `cargo run --example embedded [-- DATA_DIR]` (default
//! `./data/embedded`). The embedded `Db` API replaces this walk-through in part 2.

use anyhow::{Context, Result};
use futures::stream;
use kvnode::raft::openraft_types::{IOFlushed, RaftLogStorage, RaftStateMachine};
use kvnode::raft::{Command, LogStore, StateMachine, TypeConfig, log_id, normal_entry};
use kvnode::storage::{Store, StoreOptions};
use openraft::type_config::TypeConfigExt;

const SHARD: u64 = 0;

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "data/embedded".into());
    let store = Store::open(&dir, StoreOptions::default())
        .with_context(|| format!("opening data directory {dir}"))?;
    let mut log = LogStore::new(store.wal().clone(), SHARD);
    let purged = log.last_purged()?;
    let mut sm = StateMachine::open(&store, SHARD, purged.as_ref())?;

    let state = log.get_log_state().await?;
    let next = state.last_log_id.map_or(1, |l| l.index() + 1);
    let applied = sm.last_applied()?;
    println!(
        "opened {dir}: log ends at {:?}, state machine applied up to {:?}",
        state.last_log_id.map(|l| l.index()),
        applied.map(|l| l.index())
    );
    if let Some(v) = sm.get(b"greeting")? {
        println!(
            "recovered greeting = {:?} (written at log index {})",
            String::from_utf8_lossy(&v.value),
            v.version
        );
    }

    let entries: Vec<_> = (next..next + 3)
        .map(|i| {
            let cmd = Command::Put {
                key: b"greeting".to_vec(),
                value: format!("hello #{i}").into_bytes(),
            };
            normal_entry(log_id(1, 1, i), cmd)
        })
        .collect();
    let (tx, rx) = TypeConfig::oneshot();
    log.append(entries.clone(), IOFlushed::signal(tx)).await?;
    rx.await.context("log closed")??;
    println!("appended entries {next}..={} (fdatasync'd)", next + 2);
    sm.apply(stream::iter(entries.into_iter().map(|e| Ok((e, None)))))
        .await?;
    let v = sm
        .get(b"greeting")?
        .context("greeting missing after apply")?;
    println!(
        "greeting = {:?} at version {}; run again to see it recovered",
        String::from_utf8_lossy(&v.value),
        v.version
    );
    let stats = store.wal().stats();
    println!(
        "WAL: {} records, {} fdatasyncs, {} bytes",
        stats.records, stats.syncs, stats.bytes
    );
    Ok(())
}
