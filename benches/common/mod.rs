//! What several benches share (a module of each bench, not a bench itself).

use std::path::{Path, PathBuf};

/// The load flags of the closed-loop benches (`embedded_throughput`, `read_levels`).
#[derive(clap::Args, Debug)]
pub struct LoadFlags {
    /// Calls in flight (closed loop).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Shards.
    #[arg(long, default_value_t = 16)]
    pub shards: u32,
    /// Distinct keys.
    #[arg(long, default_value_t = 1000)]
    pub keys: u64,
    /// Bytes per value.
    #[arg(long, default_value_t = 256)]
    pub value_bytes: usize,
    /// Where the temporary data directory is made (default: the system's temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    pub bench: bool,
}

/// Filesystem type of `dir` per `df -T`, if that works here.
pub fn fs_type(dir: &Path) -> Option<String> {
    let out = std::process::Command::new("df")
        .arg("-T")
        .arg(dir)
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let mut fields = text.lines().nth(1)?.split_whitespace();
    let (device, fs) = (fields.next()?, fields.next()?);
    Some(format!("{fs} on {device}"))
}
