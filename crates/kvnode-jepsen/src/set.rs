//! The `set` workload's checker (`docs/design/jepsen.md` §3.3): one key per unique
//! element, added by a write of a unique value, then a final read of every key.
//!
//! An element is a (key, value) pair. Against the final reads:
//! - **lost**: an acknowledged (`ok`) add whose element is absent from a final read of its key;
//! - **unexpected**: an element present in a final read that was never attempted;
//! - **failed but present**: an element present whose only attempts ended `fail` (a wrong
//!   error mapping: a `fail` write must never become visible);
//! - **recovered**: an `info` add whose element is present (fine).
//!
//! Adds of keys that no final read covered are counted as `unread`: nothing can be said of them.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use super::history::{Input, Output, PairedOp};

/// One element of the set: a key and the unique value written to it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Element {
    /// The key.
    pub key: String,
    /// The value.
    pub value: String,
}

impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={:?}", self.key, self.value)
    }
}

/// The result of the set check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetReport {
    /// Elements whose add was attempted (any outcome).
    pub attempted: usize,
    /// Elements whose add was acknowledged (`ok`).
    pub acknowledged: usize,
    /// Acknowledged elements absent from a final read of their key.
    pub lost: Vec<Element>,
    /// Elements present in a final read that were never attempted.
    pub unexpected: Vec<Element>,
    /// Elements present in a final read whose adds all ended `fail`.
    pub failed_but_present: Vec<Element>,
    /// `info` adds whose element is present (fine).
    pub recovered: usize,
    /// Attempted elements whose key no `ok` final read covered.
    pub unread: usize,
}

impl SetReport {
    /// True if nothing was lost, nothing unexpected appeared and no `fail` add is visible.
    pub fn is_ok(&self) -> bool {
        self.lost.is_empty() && self.unexpected.is_empty() && self.failed_but_present.is_empty()
    }
}

/// One line, e.g. `set: 100 attempted, 90 acknowledged, 0 lost, 0 unexpected, 0 fail-but-present,
/// 4 recovered, 0 unread`, with the first anomaly appended when there is one.
impl fmt::Display for SetReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "set: {} attempted, {} acknowledged, {} lost, {} unexpected, {} fail-but-present, \
             {} recovered, {} unread",
            self.attempted,
            self.acknowledged,
            self.lost.len(),
            self.unexpected.len(),
            self.failed_but_present.len(),
            self.recovered,
            self.unread
        )?;
        if let Some(e) = self.lost.first() {
            write!(f, "; first lost: {e}")?;
        } else if let Some(e) = self.unexpected.first() {
            write!(f, "; first unexpected: {e}")?;
        } else if let Some(e) = self.failed_but_present.first() {
            write!(f, "; first fail-but-present: {e}")?;
        }
        Ok(())
    }
}

/// How an add ended, best outcome first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Ok,
    Info,
    Fail,
}

/// Checks `adds` (writes, or CAS whose new value is the element; any outcome) against
/// `final_reads` (reads; only `ok` ones count). An element counts as present if any final read
/// of its key observed its value, and as lost (when acknowledged) if any final read of its key
/// did not; divergence between final reads is the convergence check's business.
pub fn check_set(adds: &[PairedOp], final_reads: &[PairedOp]) -> SetReport {
    // Element → its best outcome.
    let mut attempts: BTreeMap<Element, Outcome> = BTreeMap::new();
    for op in adds {
        let value = match &op.input {
            Input::Write { value } => value,
            Input::Cas {
                new: Some(value), ..
            } => value,
            _ => continue,
        };
        let outcome = match op.output {
            Output::Written { .. } => Outcome::Ok,
            Output::Info => Outcome::Info,
            _ => Outcome::Fail,
        };
        let element = Element {
            key: op.key.clone(),
            value: value.clone(),
        };
        let best = attempts.entry(element).or_insert(outcome);
        *best = (*best).min(outcome);
    }
    // Per key, the values its final reads observed and whether some read saw another value.
    let mut reads: HashMap<&str, Vec<Option<&str>>> = HashMap::new();
    for op in final_reads {
        if let (Input::Read, Output::Read(seen)) = (&op.input, &op.output) {
            let seen = seen.as_ref().map(|v| v.value.as_str());
            reads.entry(op.key.as_str()).or_default().push(seen);
        }
    }
    let mut report = SetReport::default();
    for (element, outcome) in &attempts {
        report.attempted += 1;
        if *outcome == Outcome::Ok {
            report.acknowledged += 1;
        }
        let Some(seen) = reads.get(element.key.as_str()) else {
            report.unread += 1;
            continue;
        };
        let present = seen.contains(&Some(element.value.as_str()));
        let missing = seen.iter().any(|v| *v != Some(element.value.as_str()));
        match outcome {
            Outcome::Ok if missing => report.lost.push(element.clone()),
            Outcome::Info if present => report.recovered += 1,
            Outcome::Fail if present => report.failed_but_present.push(element.clone()),
            _ => {}
        }
    }
    let mut unexpected: Vec<Element> = reads
        .iter()
        .flat_map(|(key, seen)| {
            seen.iter().flatten().map(|value| Element {
                key: key.to_string(),
                value: value.to_string(),
            })
        })
        .filter(|e| !attempts.contains_key(e))
        .collect();
    unexpected.sort();
    unexpected.dedup();
    report.unexpected = unexpected;
    report
}

/// [`check_set`] over one history's paired operations: the adds are the writes and CAS
/// invoked before `final_from_t`, the final reads are the reads invoked at or after it.
pub fn check_set_history(ops: &[PairedOp], final_from_t: u64) -> SetReport {
    let (finals, adds): (Vec<PairedOp>, Vec<PairedOp>) = ops
        .iter()
        .filter(|op| (op.invoke_t >= final_from_t) == matches!(op.input, Input::Read))
        .cloned()
        .partition(|op| op.invoke_t >= final_from_t);
    check_set(&adds, &finals)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Level, Versioned};

    const MS: u64 = 1_000_000;

    fn op(key: &str, input: Input, output: Output, t: u64) -> PairedOp {
        let done = !matches!(output, Output::Info);
        PairedOp {
            proc: 1,
            key: key.into(),
            input,
            output,
            level: Some(Level::Lin),
            invoke_t: t * MS,
            complete_t: done.then_some((t + 1) * MS),
            invoke_i: 2 * t,
            complete_i: done.then_some(2 * t + 1),
            node: None,
            err: None,
        }
    }

    fn add(key: &str, value: &str, output: Output, t: u64) -> PairedOp {
        let input = Input::Write {
            value: value.into(),
        };
        op(key, input, output, t)
    }

    fn ok(version: u64) -> Output {
        Output::Written {
            version: Some(version),
        }
    }

    fn read(key: &str, value: Option<&str>, t: u64) -> PairedOp {
        let seen = value.map(|v| Versioned {
            value: v.into(),
            version: None,
        });
        op(key, Input::Read, Output::Read(seen), t)
    }

    fn element(key: &str, value: &str) -> Element {
        Element {
            key: key.into(),
            value: value.into(),
        }
    }

    #[test]
    fn every_acknowledged_add_present_is_ok() {
        let adds = [
            add("e1", "1-1", ok(3), 0),
            add("e2", "1-2", Output::Info, 2),
            add("e3", "1-3", Output::Fail, 4),
            add("e4", "1-4", Output::Info, 6),
        ];
        let finals = [
            read("e1", Some("1-1"), 100),
            read("e2", Some("1-2"), 100),
            read("e3", None, 100),
            read("e4", None, 100),
        ];
        let report = check_set(&adds, &finals);
        assert!(report.is_ok(), "{report}");
        assert_eq!(
            report.to_string(),
            "set: 4 attempted, 1 acknowledged, 0 lost, 0 unexpected, 0 fail-but-present, \
             1 recovered, 0 unread"
        );
    }

    #[test]
    fn a_lost_acknowledged_add_is_reported() {
        let adds = [add("e1", "1-1", ok(3), 0), add("e2", "1-2", ok(4), 2)];
        // e2: the lin read sees it, an ev read does not.
        let finals = [
            read("e1", None, 100),
            read("e2", Some("1-2"), 100),
            read("e2", None, 102),
        ];
        let report = check_set(&adds, &finals);
        assert!(!report.is_ok());
        assert_eq!(report.lost, [element("e1", "1-1"), element("e2", "1-2")]);
        assert!(
            report.to_string().ends_with("first lost: e1=\"1-1\""),
            "{report}"
        );
    }

    #[test]
    fn an_unexpected_element_is_reported() {
        let adds = [add("e1", "1-1", ok(3), 0)];
        let finals = [
            read("e1", Some("1-1"), 100),
            read("e9", Some("7-7"), 100),
            read("e9", Some("7-7"), 101),
        ];
        let report = check_set(&adds, &finals);
        assert_eq!(report.unexpected, [element("e9", "7-7")]);
        assert!(report.lost.is_empty() && report.failed_but_present.is_empty());
        assert!(!report.is_ok());
    }

    #[test]
    fn a_failed_add_that_is_present_is_reported_separately() {
        let adds = [add("e1", "1-1", Output::Fail, 0)];
        let finals = [read("e1", Some("1-1"), 100)];
        let report = check_set(&adds, &finals);
        assert_eq!(report.failed_but_present, [element("e1", "1-1")]);
        assert!(report.unexpected.is_empty());
        assert!(!report.is_ok());
        assert!(
            report.to_string().contains("first fail-but-present"),
            "{report}"
        );
    }

    #[test]
    fn a_recovered_info_add_is_fine_and_unread_keys_are_counted() {
        let ops = [
            add("e1", "1-1", Output::Info, 0),
            add("e2", "1-2", ok(5), 2),
            // A read before the final phase is not a final read.
            read("e3", Some("x"), 3),
            read("e1", Some("1-1"), 100),
        ];
        let report = check_set_history(&ops, 100 * MS);
        assert!(report.is_ok(), "{report}");
        assert_eq!((report.attempted, report.acknowledged), (2, 1));
        assert_eq!((report.recovered, report.unread), (1, 1));
    }
}
