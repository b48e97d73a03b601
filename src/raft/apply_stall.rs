//! Test builds only (the `planted-bugs` feature): holds one replica's applies at a chosen
//! stage, so tests can make a replica's apply lag its commit index the way a slow snapshot
//! build or a long apply chunk does, and look at reads in that window.
//!
//! - [`Stage::BeforeWrite`]: no key of the held chunk is visible yet (a leader whose apply is
//!   paused while its followers have applied the entries);
//! - [`Stage::BeforePublish`]: every key write of the chunk is visible, but the applied index
//!   still names the previous chunk (the window in which a receipt could under-report).

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

/// Where in an apply a [`ApplyStall`] holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// After the entries were decided, before any key write.
    BeforeWrite,
    /// After every key write, before the applied index is published.
    BeforePublish,
}

/// See the module doc. One per state machine; shared with its shard.
#[derive(Debug)]
pub struct ApplyStall {
    hold: watch::Sender<Option<Stage>>,
    /// Applies waiting at the held stage right now.
    waiting: AtomicU64,
}

impl Default for ApplyStall {
    fn default() -> Self {
        ApplyStall {
            hold: watch::Sender::new(None),
            waiting: AtomicU64::new(0),
        }
    }
}

impl ApplyStall {
    /// From now on, applies that reach `stage` wait there until [`ApplyStall::release`].
    pub fn hold(&self, stage: Stage) {
        self.hold.send_replace(Some(stage));
    }

    /// Lets every held apply go on; later applies are not held.
    pub fn release(&self) {
        self.hold.send_replace(None);
    }

    /// How many applies are waiting at the held stage right now.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Acquire)
    }

    /// Called by the state machine at `stage`: returns at once unless that stage is held.
    pub(crate) async fn pass(&self, stage: Stage) {
        let mut rx = self.hold.subscribe();
        if *rx.borrow_and_update() != Some(stage) {
            return;
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        tracing::warn!(?stage, "test hook: apply held");
        let _ = rx.wait_for(|held| *held != Some(stage)).await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}
