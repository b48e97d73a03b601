//! kvnode (design doc written below once the layers settle).

pub mod raft;
pub mod storage;
