//! The verdict on a fault-test run: runs every checker over the run's history (live at the
//! end of a run, or offline on a saved `history.jsonl`) and states one line per checker,
//! the operation counts, and the first counterexample of each failed check.
//!
//! Which operations each checker sees (`docs/design/jepsen.md` §3.5):
//! - register keys (`reg-…`): linearizability of writes, CAS and `lin`/`fri` reads; the same
//!   for `lease` reads (a separate verdict: lease reads are linearizable only while clocks
//!   drift boundedly); one value per version (split brain); one version per unique value (no
//!   duplicate application); bounded staleness; eventual
//!   validity; session guarantees; convergence of the final `ev` reads on every node;
//! - set keys (`set-…`): lost, unexpected and fail-but-present elements, and one value per
//!   version;
//! - the final phase (from the `final-reads` nemesis line on): every key must get an `ok`
//!   linearizable read (availability after heal).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::history::{F, History, HistoryError, Input, LevelKind, Output, PairedOp};
use super::levels::{
    DEFAULT_EPSILON, check_bounded, check_convergence, check_duplicates, check_eventual,
    check_session, check_versions,
};
use super::linearizability::{Checker, LevelFilter};
use super::set::check_set_history;
use super::workload::{REGISTER_PREFIX, SET_PREFIX};

/// The nemesis line that marks the start of the final phase.
pub const FINAL_PHASE: &str = "final-reads";

/// One checker's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    /// The checker.
    pub name: String,
    /// True if it found nothing wrong.
    pub ok: bool,
    /// One line: what was checked and what was found.
    pub summary: String,
    /// The first counterexample, readable, when the check failed.
    pub counterexample: Option<String>,
}

/// Outcome counts of one operation kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// `ok`.
    pub ok: u64,
    /// `fail`.
    pub fail: u64,
    /// `info` (or never completed).
    pub info: u64,
}

/// Every checker's verdict on one history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunVerdict {
    /// Per operation (`read`, `write`, `cas`) and phase, the outcome counts.
    pub counts: BTreeMap<String, Counts>,
    /// Per checker, in a fixed order.
    pub checks: Vec<CheckResult>,
    /// Nemesis lines (fault starts and stops).
    pub faults: usize,
}

impl RunVerdict {
    /// True if every checker passed.
    pub fn is_ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    /// The checks that failed.
    pub fn failures(&self) -> impl Iterator<Item = &CheckResult> {
        self.checks.iter().filter(|c| !c.ok)
    }
}

/// The verdict table, the counts, then each failed check's counterexample.
impl fmt::Display for RunVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "verdict: {}",
            if self.is_ok() {
                "PASS (no violation found)"
            } else {
                "FAIL"
            }
        )?;
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in &self.checks {
            writeln!(
                f,
                "  {:<4} {:<width$}  {}",
                if c.ok { "ok" } else { "FAIL" },
                c.name,
                c.summary
            )?;
        }
        writeln!(f, "operations ({} nemesis lines):", self.faults)?;
        writeln!(f, "  {:<14} {:>8} {:>8} {:>8}", "", "ok", "fail", "info")?;
        for (what, n) in &self.counts {
            writeln!(f, "  {what:<14} {:>8} {:>8} {:>8}", n.ok, n.fail, n.info)?;
        }
        for c in self.failures() {
            if let Some(example) = &c.counterexample {
                writeln!(
                    f,
                    "\nfirst counterexample of {}:\n{}",
                    c.name,
                    example.trim_end()
                )?;
            }
        }
        Ok(())
    }
}

/// Runs every checker over `history`.
pub fn check_run(history: &History) -> Result<RunVerdict, HistoryError> {
    let ops = history.pair()?;
    let final_from = history.events.iter().find_map(|e| match e {
        super::history::Event::Nemesis(n) if n.f == FINAL_PHASE => Some(n.t_ns),
        _ => None,
    });
    let faults = history
        .events
        .iter()
        .filter(|e| matches!(e, super::history::Event::Nemesis(n) if n.f != FINAL_PHASE))
        .count();
    let registers: Vec<PairedOp> = ops
        .iter()
        .filter(|op| op.key.starts_with(REGISTER_PREFIX))
        .cloned()
        .collect();
    let sets: Vec<PairedOp> = ops
        .iter()
        .filter(|op| op.key.starts_with(SET_PREFIX))
        .cloned()
        .collect();

    let mut checks = Vec::new();
    for (name, kinds) in [
        (
            "linearizable (lin/fri)",
            vec![LevelKind::Lin, LevelKind::Fri],
        ),
        ("lease (linearizable)", vec![LevelKind::Lease]),
    ] {
        let checker = Checker {
            levels: LevelFilter::only(kinds),
            ..Checker::default()
        };
        let report = checker.check_ops(&registers);
        let reads = registers
            .iter()
            .filter(|op| {
                op.read_level().is_some_and(|l| checker.levels.admits(l))
                    && matches!(op.output, Output::Read(_))
            })
            .count();
        let bad: Vec<_> = report.violations().collect();
        let inconclusive = report
            .keys
            .iter()
            .filter(|k| !k.verdict.is_linearizable() && k.verdict.violation().is_none())
            .count();
        checks.push(CheckResult {
            name: name.to_string(),
            ok: bad.is_empty() && inconclusive == 0,
            summary: format!(
                "{} keys, {} ok reads at these levels; {} keys not linearizable, {} inconclusive or malformed",
                report.keys.len(),
                reads,
                bad.len(),
                inconclusive
            ),
            counterexample: (!report.is_linearizable()).then(|| {
                // The report's own text names the first bad op and the prefix before it.
                report
                    .to_string()
                    .lines()
                    .skip(1)
                    .take(12)
                    .collect::<Vec<_>>()
                    .join("\n")
            }),
        });
    }

    let level = |name: &str, report: super::levels::LevelReport| CheckResult {
        name: name.to_string(),
        ok: report.is_ok(),
        summary: format!(
            "{} {} checked, {} violations",
            report.checked,
            report.unit,
            report.violations.len()
        ),
        counterexample: report.violations.first().cloned(),
    };
    let all: Vec<PairedOp> = registers.iter().chain(&sets).cloned().collect();
    checks.push(level("one value per version", check_versions(&all)));
    checks.push(level("no duplicate application", check_duplicates(&all)));
    for report in check_bounded(&registers, DEFAULT_EPSILON) {
        let name = format!(
            "bounded staleness {}",
            report.check.trim_start_matches("bounded")
        );
        checks.push(level(name.trim(), report));
    }
    checks.push(level("eventual validity", check_eventual(&registers)));
    checks.push(level("session", check_session(&registers)));

    match final_from {
        Some(t) => {
            checks.push(level("convergence", check_convergence(&registers, t)));
            let set = check_set_history(&sets, t);
            checks.push(CheckResult {
                name: "set (lost writes)".into(),
                ok: set.is_ok(),
                summary: set.to_string().trim_start_matches("set: ").to_string(),
                counterexample: set
                    .lost
                    .first()
                    .map(|e| format!("acknowledged add of {e} is missing from the final read"))
                    .or_else(|| {
                        set.unexpected
                            .first()
                            .map(|e| format!("{e} was read but never written"))
                    })
                    .or_else(|| {
                        set.failed_but_present
                            .first()
                            .map(|e| format!("{e} is present although its add failed definitely"))
                    }),
            });
            checks.push(availability(&ops, t));
        }
        None => checks.push(CheckResult {
            name: "final phase".into(),
            ok: false,
            summary: format!("no {FINAL_PHASE:?} line: the run ended before its final reads"),
            counterexample: None,
        }),
    }

    let mut counts: BTreeMap<String, Counts> = BTreeMap::new();
    for op in &ops {
        let phase = if final_from.is_some_and(|t| op.invoke_t >= t) {
            "final "
        } else {
            ""
        };
        let slot = counts.entry(format!("{phase}{}", op.f())).or_default();
        match op.output {
            Output::Fail => slot.fail += 1,
            Output::Info => slot.info += 1,
            _ => slot.ok += 1,
        }
    }
    Ok(RunVerdict {
        counts,
        checks,
        faults,
    })
}

/// Every key read in the final phase got an `ok` linearizable read.
fn availability(ops: &[PairedOp], final_from: u64) -> CheckResult {
    let mut keys: BTreeSet<&str> = BTreeSet::new();
    let mut answered: BTreeSet<&str> = BTreeSet::new();
    let mut failed = 0u64;
    let mut first_failure = None;
    for op in ops.iter().filter(|op| op.invoke_t >= final_from) {
        if op.f() != F::Read
            || !matches!(op.input, Input::Read)
            || op.read_level().is_some_and(|l| l.kind() != LevelKind::Lin)
        {
            continue;
        }
        keys.insert(&op.key);
        if matches!(op.output, Output::Read(_)) {
            answered.insert(&op.key);
        } else {
            failed += 1;
            if first_failure.is_none() {
                first_failure = Some(op.to_string());
            }
        }
    }
    let missing: Vec<&&str> = keys.difference(&answered).collect();
    CheckResult {
        name: "availability after heal".into(),
        ok: missing.is_empty() && !keys.is_empty(),
        summary: format!(
            "{} of {} keys read at lin after the heal; {} failed attempts (retried)",
            answered.len(),
            keys.len(),
            failed
        ),
        counterexample: if missing.is_empty() {
            None
        } else {
            Some(format!(
                "no ok read of {:?}; first failure: {}",
                missing[0],
                first_failure.unwrap_or_default()
            ))
        },
    }
}
