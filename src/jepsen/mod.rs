//! Jepsen-style fault testing of a `kvnode` cluster (`../shared/design/jepsen.md`): this module
//! owns the history format that clients and the nemesis write ([`history`]) and the checkers
//! that judge a history: [`linearizability`] (memoized WGL, per key) for the linearizable read
//! levels, [`levels`] for split brain, bounded staleness, eventual validity and convergence,
//! and session guarantees, and [`set`] for lost or unexpected writes. The process manager, the
//! workloads and the nemesis build on these.

pub mod history;
pub mod levels;
pub mod linearizability;
pub mod set;

pub use history::{
    Event, F, History, HistoryError, Input, Level, LevelKind, NemesisEvent, Op, OpResult, OpType,
    Output, PairedOp, Versioned,
};
pub use levels::{
    DEFAULT_EPSILON, LevelReport, check_bounded, check_convergence, check_eventual, check_session,
    check_versions,
};
pub use linearizability::{
    Checker, KeyReport, LevelFilter, Report, Verdict, Violation, check, check_key,
};
pub use set::{Element, SetReport, check_set, check_set_history};
