//! Jepsen-style fault testing of a `kvnode` cluster (`docs/design/jepsen.md`), runnable by
//! anyone against their own build with `kvctl jepsen run` (or `scripts/jepsen.sh`).
//!
//! A run ([`run`]) starts real `kvnode` processes ([`processes`]) on their own addresses, with
//! links that can be cut ([`net`]: per-pair `iptables` drops in a private network namespace,
//! or a fault-injecting TCP proxy where that is not allowed). Client workers ([`workload`])
//! record every operation in a history ([`recorder`], format in [`history`]) while the
//! nemesis ([`nemesis`]) runs a seeded schedule of partitions, kills and pauses (and, in test
//! builds, has shard leaders' applies lag their commits), asking the nodes ([`probe`]) which
//! one leads what; their logs ([`node_logs`]) say how often a planted bug was exercised. After
//! a heal, a settling wait and the final reads, every checker
//! runs over the history ([`verdict`]): per-key linearizability ([`linearizability`],
//! memoized WGL), the per-level checks ([`levels`]: split brain, bounded staleness, eventual
//! validity and convergence, session) and lost writes ([`set`]); the report comes with a
//! timeline picture ([`timeline`]). A saved run can be re-checked offline.
//!
//! A tool, not part of the `kvnode` library: an application that embeds `kvnode` never
//! compiles it.

#![deny(missing_docs)]

pub mod history;
pub mod levels;
pub mod linearizability;
pub mod nemesis;
pub mod net;
pub mod node_logs;
pub mod probe;
/// The real `kvnode` processes of a run: the workspace's one process harness, in
/// `kvnode-testkit`.
pub use kvnode_testkit::processes;
pub mod recorder;
pub mod run;
pub mod set;
pub mod timeline;
pub mod verdict;
pub mod workload;

pub use history::{
    Event, F, History, HistoryError, Input, Level, LevelKind, NemesisEvent, Op, OpResult, OpType,
    Output, PairedOp, Versioned,
};
pub use levels::{
    DEFAULT_EPSILON, LevelReport, check_bounded, check_convergence, check_duplicates,
    check_eventual, check_session, check_versions,
};
pub use linearizability::{
    Checker, KeyReport, LevelFilter, Report, Verdict, Violation, check, check_key,
};
pub use set::{Element, SetReport, check_set, check_set_history};
