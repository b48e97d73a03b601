//! The `kvnode` server and the `kvctl` command-line tool are this package's binaries
//! (`src/bin/`); its tests (`tests/`) run them as real processes.
//!
//! The library target is empty on purpose: it exists so that the package can depend on itself
//! with the `planted-bugs` feature for tests only (see `Cargo.toml`), which is how `cargo test`
//! builds the `kvnode-planted` binary while `cargo build` never does.

#![deny(missing_docs)]
