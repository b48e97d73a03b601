//! Replication over real sockets with in-process nodes, one test binary: the peer transport
//! (`transport`), forwarding (`forwarding`), the META group and its map (`membership`), a
//! replica move done by hand (`moves`), and the read levels under partitions and held applies
//! (`consistency`).

mod consistency;
mod forwarding;
mod membership;
mod moves;
mod transport;

use std::future::Future;
use std::time::Duration;

/// Polls `check` every 20 ms until it returns Some, or panics after `secs` seconds.
async fn eventually<T, F, Fut>(secs: u64, what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    kvnode_testkit::eventually(Duration::from_secs(secs), what, check).await
}
