//! kvnode embedded in an application: a single local node in a data directory.
//! `cargo run --example embedded [-- DATA_DIR]` (default `data/embedded`); run it twice to see
//! the writes of the first run come back.

use std::time::Duration;

use anyhow::Result;
use kvnode::{Config, Node, ReadOptions, SessionToken};

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "data/embedded".into());
    let node = Node::open(Config::single_node(&dir)).await?;

    // What an earlier run left behind.
    let runs = node.get(b"runs", &ReadOptions::linearizable()).await?;
    let previous: u64 = runs.value.as_ref().map_or(0, |v| {
        String::from_utf8_lossy(&v.value).parse().unwrap_or(0)
    });
    println!("{dir}: {previous} earlier run(s) recorded");

    // Writes return their log index; a session token makes later reads see them.
    let mut session = SessionToken::new();
    let w = node.put(b"greeting", b"hello".to_vec()).await?;
    session.observe_write(&w);
    println!("put greeting at shard {} index {}", w.shard, w.index);

    // Compare-and-set: absent-as-expected, then a mismatch (a value, not an error).
    let cas = node
        .compare_and_set(
            b"runs",
            runs.value.as_ref().map(|v| v.value.as_slice()),
            Some((previous + 1).to_string().into_bytes()),
        )
        .await?;
    session.observe_write(&cas.receipt);
    println!(
        "runs: {previous} -> {} (applied: {})",
        previous + 1,
        cas.applied
    );
    let stale = node
        .compare_and_set(b"runs", Some(b"not the value"), None)
        .await?;
    println!(
        "cas with a wrong expectation: applied {}, current {:?}",
        stale.applied,
        stale
            .current
            .map(|v| String::from_utf8_lossy(&v.value).into_owned())
    );

    // Every read names its level and says what it served.
    for (name, options) in [
        ("linearizable", ReadOptions::linearizable()),
        ("lease", ReadOptions::lease()),
        ("session", ReadOptions::session(&session)),
        (
            "bounded 500ms",
            ReadOptions::bounded(Duration::from_millis(500)),
        ),
        ("eventual", ReadOptions::eventual()),
    ] {
        let got = node.get(b"greeting", &options).await?;
        let r = &got.receipt;
        println!(
            "get greeting ({name:>13}) = {:?}  receipt: level={} node={} shard={} applied_index={} staleness={:?}",
            got.value
                .map(|v| String::from_utf8_lossy(&v.value).into_owned()),
            r.level,
            r.node,
            r.shard,
            r.applied_index,
            r.staleness
        );
    }

    let d = node.delete(b"greeting").await?;
    println!("delete greeting: existed {}", d.existed);
    node.close().await;
    Ok(())
}
