//! Group commit: one thread turns many shards' pending appends and votes into one `fdatasync`,
//! then fires their acknowledgements in the order they were written.
//!
//! Writers `pwrite` their frame under the log's lock and queue a [`Waiter`]; this thread takes
//! every queued waiter, syncs the active segment once (which covers every byte written before
//! the take), and only then calls the waiters, first-in first-out. A failed sync stops the log
//! for good: every waiter, queued or future, gets [`Error::WalFailed`] (after a failed fsync the
//! kernel may have dropped the dirty pages, so a retry could "succeed" without the data).
//!
//! What a fired waiter proves: every byte written before it was queued is on disk, in whatever
//! segment it went to (a rotation since then synced the sealed segment itself). Segment deletion
//! relies on exactly that: it queues a waiter and unlinks nothing until it fires (`mod.rs`,
//! "Deleting segments").

use std::fs::File;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::storage::error::Error;
use crate::storage::wal::Shared;

/// Makes written bytes durable. The WAL's only way to reach the disk's durability, so tests can
/// count, delay or fail syncs without touching the write path.
pub trait Syncer: Send + Sync + 'static {
    /// Makes every byte written to `file` so far durable.
    fn sync(&self, file: &File) -> io::Result<()>;
}

/// The production [`Syncer`]: `fdatasync(2)` (`File::sync_data`), which also persists the file
/// size so appended bytes can be read back after a power loss.
#[derive(Debug, Default, Clone, Copy)]
pub struct Fdatasync;

impl Syncer for Fdatasync {
    fn sync(&self, file: &File) -> io::Result<()> {
        file.sync_data()
    }
}

/// A callback waiting for its bytes to be durable.
pub type Waiter = Box<dyn FnOnce(Result<(), Error>) + Send>;

/// The group-commit loop; runs on its own thread until the WAL shuts down and nothing is
/// pending.
pub(crate) fn run(shared: Arc<Shared>) {
    loop {
        let (file, segment, target, waiters) = {
            let mut st = shared.lock();
            while st.pending.is_empty() && !st.shutdown {
                st = shared.wake.wait(st).expect("WAL mutex poisoned");
            }
            if st.pending.is_empty() {
                return; // shut down with nothing left to acknowledge
            }
            let waiters = std::mem::take(&mut st.pending);
            if let Some(reason) = st.failed.clone() {
                drop(st);
                fail_all(waiters, &reason);
                continue;
            }
            (st.active.file.clone(), st.active.id, st.active.len, waiters)
        };

        let started = Instant::now();
        let result = shared.syncer.sync(&file);
        let stats = &shared.stats;
        stats.syncs.fetch_add(1, Ordering::Relaxed);
        stats
            .sync_nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);

        match result {
            Ok(()) => {
                {
                    let mut st = shared.lock();
                    if st.synced.0 == segment && st.synced.1 < target {
                        st.synced.1 = target;
                    }
                }
                stats
                    .acknowledged
                    .fetch_add(waiters.len() as u64, Ordering::Relaxed);
                for waiter in waiters {
                    waiter(Ok(()));
                }
            }
            Err(e) => {
                let reason = format!("fdatasync of WAL segment {segment} failed: {e}");
                tracing::error!(%reason, "write-ahead log stopped; restart the node to recover");
                let queued = {
                    let mut st = shared.lock();
                    st.failed = Some(reason.clone());
                    std::mem::take(&mut st.pending)
                };
                fail_all(waiters, &reason);
                fail_all(queued, &reason);
            }
        }
    }
}

fn fail_all(waiters: Vec<Waiter>, reason: &str) {
    for waiter in waiters {
        waiter(Err(Error::WalFailed(reason.to_owned())));
    }
}
