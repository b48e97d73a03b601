//! Checks for the read levels that are not linearizable, as `docs/design/jepsen.md` §3.5
//! specifies: fast version checks over paired operations, each O(n log n).
//!
//! - [`check_versions`] (every level): one value per (key, version), else split brain.
//! - [`check_bounded`] (`bst:Δ`): the fast form of Δ-atomicity. A bounded read of version
//!   `ver` invoked at `t_inv` fails if a write of a higher version was acknowledged before
//!   `t_inv − Δ − ε`.
//! - [`check_eventual`] (`ev`) validity: the value read is the initial one (absent) or written
//!   by a write or CAS (`ok` or `info`) invoked before the read returned, with a matching
//!   version when both are known, and never the value of a `fail` write.
//! - [`check_convergence`] (`ev`): in the final phase, every node's last eventual read of a
//!   key equals the key's last linearizable read.
//! - [`check_session`] (`session`): a session read returns a version at least the highest one
//!   its process wrote (`ok`) or read before on that key (read-your-writes and monotonic
//!   reads).
//!
//! Every check returns a [`LevelReport`]: how many operations it checked and one readable line
//! per violation, naming the operations involved.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use super::history::{Input, Level, LevelKind, Output, PairedOp, Versioned};

/// The default clock allowance ε of the bounded-staleness check (jepsen.md §3.5: 50 ms).
pub const DEFAULT_EPSILON: Duration = Duration::from_millis(50);

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LevelReport {
    /// The check, e.g. `versions`, `bounded(500ms)`, `eventual`, `convergence`, `session`.
    pub check: String,
    /// What was counted in `checked` (`reads`, `ops`).
    pub unit: &'static str,
    /// How many operations were checked.
    pub checked: usize,
    /// One readable line per violation, naming the operations involved.
    pub violations: Vec<String>,
}

impl LevelReport {
    fn new(check: impl Into<String>, unit: &'static str) -> LevelReport {
        LevelReport {
            check: check.into(),
            unit,
            checked: 0,
            violations: Vec::new(),
        }
    }

    /// True if there is no violation.
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }
}

/// One verdict line, e.g. `bounded(500ms): 812 reads checked, 0 violations`, with the first
/// violation appended when there is one.
impl fmt::Display for LevelReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.violations.len();
        write!(
            f,
            "{}: {} {} checked, {} violation{}",
            self.check,
            self.checked,
            self.unit,
            n,
            if n == 1 { "" } else { "s" }
        )?;
        if let Some(first) = self.violations.first() {
            write!(f, "; first: {first}")?;
        }
        Ok(())
    }
}

/// The value a write or CAS puts (`None` for a CAS that deletes); `None` for reads.
fn written_value(op: &PairedOp) -> Option<Option<&str>> {
    match &op.input {
        Input::Read => None,
        Input::Write { value } => Some(Some(value.as_str())),
        Input::Cas { new, .. } => Some(new.as_deref()),
    }
}

/// The version each (key, value) was written with, where an `ok` write recorded it.
fn write_versions(ops: &[PairedOp]) -> HashMap<(&str, &str), u64> {
    let mut versions = HashMap::new();
    for op in ops {
        if let (Some(Some(value)), Output::Written { version: Some(v) }) =
            (written_value(op), &op.output)
        {
            versions.insert((op.key.as_str(), value), *v);
        }
    }
    versions
}

/// The version an observation stands for: 0 for absent, the recorded version, or else the
/// version the value was written with; `None` if unknown.
fn observed_version(
    key: &str,
    seen: &Option<Versioned>,
    versions: &HashMap<(&str, &str), u64>,
) -> Option<u64> {
    match seen {
        None => Some(0),
        Some(Versioned {
            version: Some(v), ..
        }) => Some(*v),
        Some(Versioned {
            value,
            version: None,
        }) => versions.get(&(key, value.as_str())).copied(),
    }
}

/// The observation of an `ok` read at a level of `kind`.
fn read_at(op: &PairedOp, kind: LevelKind) -> Option<&Option<Versioned>> {
    match &op.output {
        Output::Read(seen) if op.read_level().map(Level::kind) == Some(kind) => Some(seen),
        _ => None,
    }
}

/// The value (`None`: absent or deleted) and version an operation shows, if it carries a
/// version: an `ok` read, a `cas_failed`, or an acknowledged write or CAS.
fn shown(op: &PairedOp) -> Option<(Option<&str>, u64)> {
    match &op.output {
        Output::Read(Some(Versioned {
            value,
            version: Some(v),
        }))
        | Output::CasFailed {
            current:
                Some(Versioned {
                    value,
                    version: Some(v),
                }),
        } => Some((Some(value.as_str()), *v)),
        Output::Written { version: Some(v) } => written_value(op).map(|value| (value, *v)),
        _ => None,
    }
}

/// Version uniqueness, at every level: every `ok` read, `cas_failed` and acknowledged write
/// that carries a version must agree on the value at that (key, version); a second value is
/// split brain.
pub fn check_versions(ops: &[PairedOp]) -> LevelReport {
    let mut report = LevelReport::new("versions", "ops");
    // (key, version) → (value, the first op that showed it).
    let mut seen: HashMap<(&str, u64), (Option<&str>, usize)> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        let Some((value, version)) = shown(op) else {
            continue;
        };
        report.checked += 1;
        match seen.get(&(op.key.as_str(), version)) {
            None => {
                seen.insert((op.key.as_str(), version), (value, i));
            }
            Some((first_value, _)) if *first_value == value => {}
            Some((first_value, first)) => report.violations.push(format!(
                "split brain on key {:?} at version {version}: {} vs {}: [{}] and [{}]",
                op.key,
                show(*first_value),
                show(value),
                ops[*first],
                op
            )),
        }
    }
    report
}

/// No duplicate application, at every level: a unique value (per key) is written once, so
/// every `ok` read, `cas_failed` and acknowledged write that shows it with a version must show
/// the same version. One value at two versions means the write was applied twice (a retried
/// proposal, a replayed log entry).
pub fn check_duplicates(ops: &[PairedOp]) -> LevelReport {
    let mut report = LevelReport::new("duplicates", "ops");
    // (key, value) → (version, the first op that showed it).
    let mut seen: HashMap<(&str, &str), (u64, usize)> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        let Some((Some(value), version)) = shown(op) else {
            continue;
        };
        report.checked += 1;
        match seen.get(&(op.key.as_str(), value)) {
            None => {
                seen.insert((op.key.as_str(), value), (version, i));
            }
            Some((first_version, _)) if *first_version == version => {}
            Some((first_version, first)) => report.violations.push(format!(
                "value {value:?} of key {:?} applied twice: at version {first_version} and at \
                 version {version}: [{}] and [{}]",
                op.key, ops[*first], op
            )),
        }
    }
    report
}

fn show(value: Option<&str>) -> String {
    match value {
        Some(v) => format!("{v:?}"),
        None => "(absent)".into(),
    }
}

/// Bounded staleness, fast form: one report per bound Δ that occurs among the `ok` reads at
/// `bst:Δ`, sorted by Δ. A read of key k that observed version `ver` (absent: 0) and was
/// invoked at `t_inv` fails if a write or CAS to k that created a version above `ver` was
/// acknowledged before `t_inv − Δ − epsilon`. Reads whose version is unknown are skipped.
pub fn check_bounded(ops: &[PairedOp], epsilon: Duration) -> Vec<LevelReport> {
    let versions = write_versions(ops);
    // Per key, the acknowledged writes as (ack time, version, op), sorted by ack time, and the
    // index of the highest version in each prefix.
    let mut acks: HashMap<&str, Vec<(u64, u64, usize)>> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        if let (Output::Written { version: Some(v) }, Some(t)) = (&op.output, op.complete_t) {
            acks.entry(op.key.as_str()).or_default().push((t, *v, i));
        }
    }
    let prefix_max: HashMap<&str, (Vec<u64>, Vec<usize>)> = acks
        .into_iter()
        .map(|(key, mut writes)| {
            writes.sort_unstable();
            let mut best = 0;
            let mut max_at = Vec::with_capacity(writes.len());
            for (j, w) in writes.iter().enumerate() {
                if w.1 > writes[best].1 {
                    best = j;
                }
                max_at.push(writes[best].2);
            }
            (key, (writes.iter().map(|w| w.0).collect(), max_at))
        })
        .collect();
    let eps = u64::try_from(epsilon.as_nanos()).unwrap_or(u64::MAX);
    let mut reports: BTreeMap<u64, LevelReport> = BTreeMap::new();
    for op in ops {
        let (Some(Level::Bst(ms)), Output::Read(seen)) = (op.read_level(), &op.output) else {
            continue;
        };
        let report = reports
            .entry(ms)
            .or_insert_with(|| LevelReport::new(format!("bounded({ms}ms)"), "reads"));
        let Some(ver) = observed_version(&op.key, seen, &versions) else {
            continue;
        };
        report.checked += 1;
        let bound = ms.saturating_mul(1_000_000).saturating_add(eps);
        let Some(deadline) = op.invoke_t.checked_sub(bound) else {
            continue;
        };
        let Some((times, max_at)) = prefix_max.get(op.key.as_str()) else {
            continue;
        };
        let n = times.partition_point(|&t| t < deadline);
        if n == 0 {
            continue;
        }
        let newest = &ops[max_at[n - 1]];
        let Output::Written {
            version: Some(newer),
        } = newest.output
        else {
            continue;
        };
        if newer > ver {
            report.violations.push(format!(
                "stale read beyond {ms}ms + ε: [{op}] saw version {ver}, but version {newer} \
                 was acknowledged {}ms before its invocation: [{newest}]",
                (op.invoke_t - newest.complete_t.unwrap_or(0)) / 1_000_000
            ));
        }
    }
    reports.into_values().collect()
}

/// Eventual validity: every `ok` read at `ev` observed the initial value (absent) or a value
/// written by a write or CAS (`ok` or `info`) on the same key invoked before the read
/// returned, with a matching version when both are known; never the value of a `fail` write
/// (or of a CAS that did not apply).
pub fn check_eventual(ops: &[PairedOp]) -> LevelReport {
    let mut report = LevelReport::new("eventual", "reads");
    let mut writers: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        if let Some(Some(value)) = written_value(op) {
            writers.entry((op.key.as_str(), value)).or_default().push(i);
        }
    }
    for op in ops {
        let Some(seen) = read_at(op, LevelKind::Ev) else {
            continue;
        };
        report.checked += 1;
        let Some(Versioned { value, version }) = seen else {
            continue;
        };
        let returned = op.complete_t.unwrap_or(u64::MAX);
        let candidates = writers
            .get(&(op.key.as_str(), value.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut reason = format!("the value {value:?} was never written");
        let mut valid = false;
        for &w in candidates {
            let write = &ops[w];
            let problem = match (&write.output, version) {
                (Output::Fail, _) => Some("the value of a fail write"),
                (Output::CasFailed { .. }, _) => Some("the value of a CAS that did not apply"),
                _ if write.invoke_t > returned => Some("written only after the read returned"),
                (Output::Written { version: Some(wv) }, Some(rv)) if wv != rv => {
                    Some("written with another version")
                }
                _ => None,
            };
            match problem {
                None => {
                    valid = true;
                    break;
                }
                Some(p) => reason = format!("{p}: [{write}]"),
            }
        }
        if !valid {
            report
                .violations
                .push(format!("invalid read [{op}]: {reason}"));
        }
    }
    report
}

/// Convergence: among the `ok` reads invoked at or after `final_from_t` (the final phase),
/// every node's last read of a key at `ev` must observe the same value (and version, when both
/// are known) as the key's last linearizable (`lin`, `lease`, `fri`) read.
pub fn check_convergence(ops: &[PairedOp], final_from_t: u64) -> LevelReport {
    let mut report = LevelReport::new("convergence", "reads");
    let last = |kinds: &[LevelKind]| {
        let mut last: BTreeMap<(&str, Option<u64>), &PairedOp> = BTreeMap::new();
        for op in ops.iter().filter(|op| op.invoke_t >= final_from_t) {
            let Some(level) = op.read_level() else {
                continue;
            };
            if !kinds.contains(&level.kind()) || !matches!(op.output, Output::Read(_)) {
                continue;
            }
            let node = if kinds == [LevelKind::Ev] {
                op.node
            } else {
                None
            };
            let slot = last.entry((op.key.as_str(), node)).or_insert(op);
            if op.complete_t > slot.complete_t {
                *slot = op;
            }
        }
        last
    };
    let lin = last(&[LevelKind::Lin, LevelKind::Lease, LevelKind::Fri]);
    let ev = last(&[LevelKind::Ev]);
    for ((key, _), read) in ev {
        report.checked += 1;
        let Output::Read(seen) = &read.output else {
            continue;
        };
        let Some(reference) = lin.get(&(key, None)) else {
            report.violations.push(format!(
                "no final linearizable read of key {key:?} to compare [{read}] with"
            ));
            continue;
        };
        let Output::Read(expected) = &reference.output else {
            continue;
        };
        let same = match (seen, expected) {
            (None, None) => true,
            (Some(a), Some(b)) => {
                a.value == b.value
                    && (a.version.is_none() || b.version.is_none() || a.version == b.version)
            }
            _ => false,
        };
        if !same {
            report.violations.push(format!(
                "not converged on key {key:?}: final eventual read [{read}] differs from the \
                 final linearizable read [{reference}]"
            ));
        }
    }
    report
}

/// Session guarantees: per process and key, in invocation order, every `ok` read at
/// `session` observes a version (absent: 0) at least the highest version that process wrote
/// (`ok`) or observed (any `ok` read or `cas_failed`) before on that key. Reads whose version
/// is unknown are skipped.
pub fn check_session(ops: &[PairedOp]) -> LevelReport {
    let mut report = LevelReport::new("session", "reads");
    let versions = write_versions(ops);
    let mut order: Vec<usize> = (0..ops.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&ops[a], &ops[b]);
        (a.proc, &a.key, a.invoke_t).cmp(&(b.proc, &b.key, b.invoke_t))
    });
    // The highest version so far, and the op that set it, for the current (proc, key).
    let mut current: Option<(u64, &str)> = None;
    let mut high: Option<(u64, usize)> = None;
    for i in order {
        let op = &ops[i];
        if current != Some((op.proc, op.key.as_str())) {
            current = Some((op.proc, op.key.as_str()));
            high = None;
        }
        let version = match &op.output {
            Output::Written { version } => *version,
            Output::Read(seen) | Output::CasFailed { current: seen } => {
                observed_version(&op.key, seen, &versions)
            }
            Output::Fail | Output::Info => None,
        };
        let Some(version) = version else {
            continue;
        };
        if read_at(op, LevelKind::Session).is_some() {
            report.checked += 1;
            if let Some((h, by)) = high
                && version < h
            {
                let what = match ops[by].output {
                    Output::Written { .. } => "read-your-writes",
                    _ => "monotonic reads",
                };
                report.violations.push(format!(
                    "{what} violated for proc {} on key {:?}: [{op}] saw version {version} \
                     after the proc had seen version {h}: [{}]",
                    op.proc, op.key, ops[by]
                ));
            }
        }
        if high.is_none_or(|(h, _)| version > h) {
            high = Some((version, i));
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// Builds paired operations; times are in ms.
    #[derive(Default)]
    struct Ops(Vec<PairedOp>);

    impl Ops {
        #[allow(clippy::too_many_arguments)]
        fn push(
            &mut self,
            proc: u64,
            key: &str,
            input: Input,
            output: Output,
            level: Option<Level>,
            node: Option<u64>,
            t: (u64, Option<u64>),
        ) -> &mut Ops {
            let i = self.0.len() as u64;
            self.0.push(PairedOp {
                proc,
                key: key.into(),
                input,
                output,
                level,
                invoke_t: t.0 * MS,
                complete_t: t.1.map(|c| c * MS),
                invoke_i: 2 * i,
                complete_i: t.1.map(|_| 2 * i + 1),
                node,
                err: None,
            });
            self
        }

        fn write(
            &mut self,
            proc: u64,
            key: &str,
            value: &str,
            ver: u64,
            t: (u64, u64),
        ) -> &mut Ops {
            let input = Input::Write {
                value: value.into(),
            };
            let output = Output::Written { version: Some(ver) };
            self.push(proc, key, input, output, None, None, (t.0, Some(t.1)))
        }

        fn ended_write(&mut self, key: &str, value: &str, output: Output, t: u64) -> &mut Ops {
            let input = Input::Write {
                value: value.into(),
            };
            let done = match output {
                Output::Info => None,
                _ => Some(t + 1),
            };
            self.push(99, key, input, output, None, None, (t, done))
        }

        fn read(
            &mut self,
            proc: u64,
            key: &str,
            level: Level,
            node: Option<u64>,
            seen: Option<(&str, u64)>,
            t: (u64, u64),
        ) -> &mut Ops {
            let seen = seen.map(|(value, version)| Versioned {
                value: value.into(),
                version: Some(version),
            });
            let output = Output::Read(seen);
            self.push(
                proc,
                key,
                Input::Read,
                output,
                Some(level),
                node,
                (t.0, Some(t.1)),
            )
        }
    }

    fn assert_violations(report: &LevelReport, n: usize, contains: &str) {
        assert_eq!(report.violations.len(), n, "{report}");
        if n > 0 {
            assert!(report.violations[0].contains(contains), "{report}");
        }
    }

    #[test]
    fn one_value_per_version_holds() {
        let mut ops = Ops::default();
        ops.write(1, "k", "a", 5, (0, 1))
            .read(2, "k", Level::Ev, None, Some(("a", 5)), (2, 3))
            .write(1, "k", "b", 7, (4, 5))
            .write(1, "j", "c", 5, (4, 5));
        let report = check_versions(&ops.0);
        assert_eq!(report.checked, 4);
        assert_violations(&report, 0, "");
        assert_eq!(report.to_string(), "versions: 4 ops checked, 0 violations");
    }

    #[test]
    fn split_brain_is_detected() {
        let mut ops = Ops::default();
        ops.write(1, "k", "a", 5, (0, 1))
            .write(2, "k", "b", 5, (0, 2))
            .read(3, "k", Level::Lin, None, Some(("b", 5)), (3, 4));
        let report = check_versions(&ops.0);
        assert_violations(&report, 2, "split brain on key \"k\" at version 5");
        assert!(report.violations[0].contains("\"a\" vs \"b\""), "{report}");
        assert!(report.violations[0].contains("proc 1 write"), "{report}");
        assert!(report.violations[0].contains("proc 2 write"), "{report}");
    }

    #[test]
    fn a_value_at_one_version_is_no_duplicate() {
        let mut ops = Ops::default();
        ops.write(1, "k", "a", 5, (0, 1))
            .read(2, "k", Level::Ev, None, Some(("a", 5)), (2, 3))
            .write(1, "j", "a", 6, (4, 5));
        let report = check_duplicates(&ops.0);
        assert_eq!(report.checked, 3);
        assert_violations(&report, 0, "");
    }

    #[test]
    fn a_value_applied_twice_is_detected() {
        let mut ops = Ops::default();
        ops.write(1, "k", "a", 5, (0, 1))
            .write(2, "k", "b", 6, (2, 3))
            .read(3, "k", Level::Lin, None, Some(("a", 7)), (4, 5));
        let report = check_duplicates(&ops.0);
        assert_violations(&report, 1, "value \"a\" of key \"k\" applied twice");
        assert!(
            report.violations[0].contains("version 5 and at version 7"),
            "{report}"
        );
    }

    #[test]
    fn a_bounded_read_within_delta_passes() {
        let mut ops = Ops::default();
        // Version 2 acked at 1000 ms; a bst:500 read at 1200 ms may still see version 1.
        ops.write(1, "k", "a", 1, (0, 10))
            .write(1, "k", "b", 2, (990, 1000))
            .read(2, "k", Level::Bst(500), None, Some(("a", 1)), (1200, 1201))
            // Just within Δ + ε = 550 ms.
            .read(2, "k", Level::Bst(500), None, Some(("a", 1)), (1549, 1550))
            .read(3, "k", Level::Bst(500), None, Some(("b", 2)), (5000, 5001));
        let reports = check_bounded(&ops.0, DEFAULT_EPSILON);
        assert_eq!(reports.len(), 1);
        assert_eq!(
            reports[0].to_string(),
            "bounded(500ms): 3 reads checked, 0 violations"
        );
    }

    #[test]
    fn a_bounded_read_that_missed_a_write_acked_two_delta_earlier_fails() {
        let mut ops = Ops::default();
        ops.write(1, "k", "a", 1, (0, 10))
            .write(1, "k", "b", 2, (990, 1000))
            .read(2, "k", Level::Bst(500), None, Some(("a", 1)), (2000, 2001))
            // An absent read counts as version 0.
            .read(3, "k", Level::Bst(500), None, None, (2000, 2001))
            // Other bounds get their own report.
            .read(4, "k", Level::Bst(2000), None, Some(("a", 1)), (2000, 2001));
        let reports = check_bounded(&ops.0, DEFAULT_EPSILON);
        assert_eq!(reports.len(), 2);
        assert_violations(&reports[0], 2, "stale read beyond 500ms");
        assert!(
            reports[0].violations[0].contains("version 2"),
            "{}",
            reports[0]
        );
        assert!(
            reports[0].violations[0].contains("1000ms before"),
            "{}",
            reports[0]
        );
        assert_eq!(reports[1].check, "bounded(2000ms)");
        assert_violations(&reports[1], 0, "");
    }

    #[test]
    fn eventual_reads_of_valid_values_pass() {
        let mut ops = Ops::default();
        ops.read(1, "k", Level::Ev, Some(1), None, (0, 1))
            .write(2, "k", "a", 3, (2, 3))
            .ended_write("k", "b", Output::Info, 4)
            .read(1, "k", Level::Ev, Some(1), Some(("a", 3)), (5, 6))
            // The info write's value, at a version nobody recorded for it.
            .read(1, "k", Level::Ev, Some(2), Some(("b", 9)), (7, 8));
        let report = check_eventual(&ops.0);
        assert_eq!(
            report.to_string(),
            "eventual: 3 reads checked, 0 violations"
        );
    }

    #[test]
    fn eventual_read_of_a_never_written_value_fails() {
        let mut ops = Ops::default();
        ops.write(2, "k", "a", 3, (2, 3))
            .read(1, "k", Level::Ev, Some(1), Some(("zzz", 3)), (5, 6))
            // A value written to another key does not count.
            .read(1, "j", Level::Ev, Some(1), Some(("a", 3)), (5, 6));
        let report = check_eventual(&ops.0);
        assert_violations(&report, 2, "the value \"zzz\" was never written");
    }

    #[test]
    fn eventual_read_of_a_fail_writes_value_fails() {
        let mut ops = Ops::default();
        ops.ended_write("k", "a", Output::Fail, 0).read(
            1,
            "k",
            Level::Ev,
            Some(1),
            Some(("a", 3)),
            (5, 6),
        );
        let report = check_eventual(&ops.0);
        assert_violations(&report, 1, "the value of a fail write");
    }

    #[test]
    fn eventual_read_from_the_future_or_of_another_version_fails() {
        let mut ops = Ops::default();
        ops.read(1, "k", Level::Ev, Some(1), Some(("a", 3)), (0, 1))
            .write(2, "k", "a", 3, (2, 3))
            .read(1, "k", Level::Ev, Some(1), Some(("a", 4)), (5, 6));
        let report = check_eventual(&ops.0);
        assert_violations(&report, 2, "written only after the read returned");
        assert!(report.violations[1].contains("written with another version"));
    }

    #[test]
    fn converged_final_reads_pass() {
        let mut ops = Ops::default();
        ops.write(1, "k", "a", 3, (0, 1))
            // Before the final phase: lagging reads do not matter.
            .read(2, "k", Level::Ev, Some(2), None, (2, 3))
            .read(3, "k", Level::Lin, None, Some(("a", 3)), (100, 101))
            .read(3, "k", Level::Ev, Some(1), Some(("a", 3)), (102, 103))
            .read(3, "k", Level::Ev, Some(2), Some(("a", 3)), (104, 105))
            .read(3, "j", Level::Lin, None, None, (100, 101))
            .read(3, "j", Level::Ev, Some(1), None, (102, 103));
        let report = check_convergence(&ops.0, 100 * MS);
        assert_eq!(
            report.to_string(),
            "convergence: 3 reads checked, 0 violations"
        );
    }

    #[test]
    fn non_converged_final_reads_fail() {
        let mut ops = Ops::default();
        ops.write(1, "k", "a", 3, (0, 1))
            .write(1, "k", "b", 4, (2, 3))
            .read(3, "k", Level::Lin, None, Some(("b", 4)), (100, 101))
            .read(3, "k", Level::Ev, Some(1), Some(("b", 4)), (102, 103))
            .read(3, "k", Level::Ev, Some(2), Some(("a", 3)), (104, 105))
            .read(3, "j", Level::Ev, Some(2), None, (104, 105));
        let report = check_convergence(&ops.0, 100 * MS);
        assert_eq!(report.checked, 3);
        assert_eq!(report.violations.len(), 2, "{report}");
        assert!(
            report
                .violations
                .iter()
                .any(|v| v.contains("no final linearizable read of key \"j\""))
        );
        assert!(
            report
                .violations
                .iter()
                .any(|v| v.contains("not converged on key \"k\"") && v.contains("on node 2"))
        );
    }

    #[test]
    fn session_read_your_writes_and_monotonic_reads_hold() {
        let mut ops = Ops::default();
        ops.read(1, "k", Level::Session, Some(1), None, (0, 1))
            .write(1, "k", "a", 3, (2, 3))
            .read(1, "k", Level::Session, Some(2), Some(("a", 3)), (4, 5))
            .write(2, "k", "b", 5, (6, 7))
            .read(1, "k", Level::Session, Some(1), Some(("b", 5)), (8, 9))
            .read(1, "k", Level::Session, Some(2), Some(("b", 5)), (10, 11))
            // Another proc may lag behind what proc 1 saw.
            .read(3, "k", Level::Session, Some(2), Some(("a", 3)), (12, 13));
        let report = check_session(&ops.0);
        assert_eq!(report.to_string(), "session: 5 reads checked, 0 violations");
    }

    #[test]
    fn a_session_read_going_backwards_fails() {
        let mut ops = Ops::default();
        ops.write(2, "k", "a", 3, (0, 1))
            .write(2, "k", "b", 5, (2, 3))
            .read(1, "k", Level::Session, Some(1), Some(("b", 5)), (4, 5))
            .read(1, "k", Level::Session, Some(2), Some(("a", 3)), (6, 7));
        let report = check_session(&ops.0);
        assert_violations(
            &report,
            1,
            "monotonic reads violated for proc 1 on key \"k\"",
        );
    }

    #[test]
    fn a_session_read_missing_its_own_write_fails() {
        let mut ops = Ops::default();
        ops.write(1, "k", "a", 3, (0, 1))
            .read(1, "k", Level::Session, Some(2), None, (2, 3));
        let report = check_session(&ops.0);
        assert_violations(&report, 1, "read-your-writes violated for proc 1");
        assert!(
            report.violations[0].contains("proc 1 write k \"a\""),
            "{report}"
        );
    }
}
