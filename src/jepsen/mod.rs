//! Jepsen-style fault testing of a `kvnode` cluster (`../shared/design/jepsen.md`): this module
//! owns the history format that clients and the nemesis write ([`history`]) and the checkers
//! that judge a history ([`linearizability`] for the `register` workload at the linearizable
//! read levels). The process manager, the workloads and the nemesis build on these.

pub mod history;
pub mod linearizability;

pub use history::{
    Event, F, History, HistoryError, Input, Level, LevelKind, NemesisEvent, Op, OpResult, OpType,
    Output, PairedOp, Versioned,
};
pub use linearizability::{
    Checker, KeyReport, LevelFilter, Report, Verdict, Violation, check, check_key,
};
