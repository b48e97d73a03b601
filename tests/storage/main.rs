//! Storage, one test binary: the node-wide WAL (`wal`), openraft's storage conformance suite
//! on kvnode's log store and state machine (`storage_suite`), and a shard's state machine with
//! its snapshot files (`state_machine`).

mod state_machine;
mod storage_suite;
mod wal;
