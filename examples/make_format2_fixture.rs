//! Writes the committed upgrade fixture `tests/fixtures/format2-embedded/`: a small embedded
//! data directory (format 2, before the META group existed) holding a few keys. Run once, with
//! the format-2 build: `cargo run --example make_format2_fixture -- DIR` (DIR must not exist);
//! `tests/api/upgrade.rs` opens a copy with the current build.

use anyhow::{Result, bail};
use kvnode::{Config, Node};

#[tokio::main]
async fn main() -> Result<()> {
    let Some(dir) = std::env::args().nth(1) else {
        bail!("usage: make_format2_fixture DIR");
    };
    if std::path::Path::new(&dir).exists() {
        bail!("{dir} exists; give a new directory");
    }
    let mut config = Config::single_node(&dir);
    // Small segments and cache: the fixture is committed to git.
    config.wal_segment_bytes = 64 * 1024;
    config.sled_cache_bytes = 1024 * 1024;
    config.max_value_bytes = 1024;
    let node = Node::open(config).await?;
    for i in 0..8u32 {
        node.put(
            format!("key-{i}").as_bytes(),
            format!("value-{i}").into_bytes(),
        )
        .await?;
    }
    node.delete(b"key-7").await?;
    node.close().await;
    println!("wrote {dir}");
    Ok(())
}
