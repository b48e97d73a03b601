//! The fault-test history: one JSON object per line (JSONL), as `docs/design/jepsen.md`
//! §3.2 specifies, and its pairing into completed operations.
//!
//! This module owns the record types ([`Op`] for client operations, [`NemesisEvent`] for fault
//! injections, [`Event`] for either), reading and writing [`History`] files, and
//! [`History::pair`], which matches every `invoke` with its completion by process and turns the
//! pair into a [`PairedOp`]: what was asked ([`Input`]) and what came back ([`Output`]).
//!
//! ## The line format
//!
//! ```text
//! {"i":0,"t_ns":1000,"proc":3,"type":"invoke","f":"write","key":"k7","value":"3-12"}
//! {"i":1,"t_ns":2500,"proc":3,"type":"ok","f":"write","key":"k7","node":2,"shard":5,"res":{"version":40}}
//! {"i":2,"t_ns":2600,"proc":4,"type":"invoke","f":"read","key":"k7","level":"lin"}
//! {"i":3,"t_ns":2900,"proc":4,"type":"ok","f":"read","key":"k7","res":{"value":"3-12","version":40,"served_by":2,"read_index":41}}
//! {"i":4,"t_ns":3000,"proc":5,"type":"invoke","f":"cas","key":"k7","expected":"3-12","value":"5-1"}
//! {"i":5,"t_ns":3900,"proc":5,"type":"ok","f":"cas","key":"k7","res":{"cas_failed":true,"value":"4-2","version":44}}
//! {"i":6,"t_ns":4000,"proc":"nemesis","type":"info","f":"start-partition","info":{"grudge":{"1":[2,3]}}}
//! ```
//!
//! - `type`: `invoke` (sent), then one of `ok` (it happened), `fail` (it certainly did not
//!   happen) or `info` (unknown: it may take effect at any later time, and the worker goes on
//!   as a new `proc`). A process has at most one operation in flight; an `invoke` that has no
//!   completion when the history ends counts as `info`.
//! - `f`: `read`, `write` (put `value`) or `cas` (if the key holds `expected`, set it to
//!   `value`). On a CAS an absent `expected` means "the key is absent" and an absent `value`
//!   deletes the key.
//! - `level` (reads): `lin`, `lease`, `fri` (follower read-index), `bst:<ms>` (bounded
//!   staleness), `session` or `ev`; an absent level is the default, `lin`.
//! - `res` (completions): `version` is the key's version, the log index of its last write. An
//!   `ok` write or applied CAS carries the version it created (from the write receipt); an `ok`
//!   read, and a CAS with `cas_failed: true`, carry what they observed in `value`/`version`, an
//!   absent `value` meaning the key was absent. `served_by` and `read_index` say who served a
//!   read and at which index.
//! - Values are unique per key (the harness writes `"<proc>-<seq>"`), so a value names its
//!   write.
//! - Timestamps come from one monotonic clock in the harness: invoke before sending,
//!   completion after the reply.
//! - Nemesis lines have `"proc":"nemesis"`, a free-form `f` (`start-partition`, `stop-kill`, …)
//!   and a free-form JSON `info` (the grudge, the targets, the shard leaders).

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where an operation is in its life: sent, or how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpType {
    /// The operation was sent.
    Invoke,
    /// It completed and took effect.
    Ok,
    /// It certainly did not take effect.
    Fail,
    /// Its outcome is unknown: it may take effect at any time after its invocation.
    Info,
}

impl fmt::Display for OpType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OpType::Invoke => "invoke",
            OpType::Ok => "ok",
            OpType::Fail => "fail",
            OpType::Info => "info",
        })
    }
}

/// What a client operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum F {
    /// Read the key.
    Read,
    /// Put `value`.
    Write,
    /// Compare-and-set: if the key holds `expected`, set it to `value`.
    Cas,
}

impl fmt::Display for F {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            F::Read => "read",
            F::Write => "write",
            F::Cas => "cas",
        })
    }
}

/// The read level a read asked for, as the history spells it (`lin`, `lease`, `fri`,
/// `bst:<ms>`, `session`, `ev`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Level {
    /// Linearizable: leader read-index (`lin`).
    Lin,
    /// Linearizable if clocks drift boundedly: leader lease (`lease`).
    Lease,
    /// Linearizable: follower read-index (`fri`).
    Fri,
    /// Bounded staleness, the bound in milliseconds (`bst:<ms>`).
    Bst(u64),
    /// Session: read-your-writes and monotonic reads (`session`).
    Session,
    /// Eventual: any replica's local state (`ev`).
    Ev,
}

impl Level {
    /// The level without its parameter.
    pub fn kind(self) -> LevelKind {
        match self {
            Level::Lin => LevelKind::Lin,
            Level::Lease => LevelKind::Lease,
            Level::Fri => LevelKind::Fri,
            Level::Bst(_) => LevelKind::Bst,
            Level::Session => LevelKind::Session,
            Level::Ev => LevelKind::Ev,
        }
    }
}

/// A [`Level`] without its parameter, for filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LevelKind {
    /// `lin`.
    Lin,
    /// `lease`.
    Lease,
    /// `fri`.
    Fri,
    /// `bst:<ms>`, any bound.
    Bst,
    /// `session`.
    Session,
    /// `ev`.
    Ev,
}

/// A read level string that is not one of `lin`, `lease`, `fri`, `bst:<ms>`, `session`, `ev`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown read level {0:?} (expected lin, lease, fri, bst:<ms>, session or ev)")]
pub struct ParseLevelError(pub String);

impl FromStr for Level {
    type Err = ParseLevelError;

    fn from_str(s: &str) -> Result<Level, ParseLevelError> {
        Ok(match s {
            "lin" => Level::Lin,
            "lease" => Level::Lease,
            "fri" => Level::Fri,
            "session" => Level::Session,
            "ev" => Level::Ev,
            _ => match s.strip_prefix("bst:").map(str::parse::<u64>) {
                Some(Ok(ms)) => Level::Bst(ms),
                _ => return Err(ParseLevelError(s.to_string())),
            },
        })
    }
}

impl TryFrom<String> for Level {
    type Error = ParseLevelError;

    fn try_from(s: String) -> Result<Level, ParseLevelError> {
        s.parse()
    }
}

impl From<Level> for String {
    fn from(level: Level) -> String {
        level.to_string()
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Level::Lin => f.write_str("lin"),
            Level::Lease => f.write_str("lease"),
            Level::Fri => f.write_str("fri"),
            Level::Bst(ms) => write!(f, "bst:{ms}"),
            Level::Session => f.write_str("session"),
            Level::Ev => f.write_str("ev"),
        }
    }
}

/// What a completion returned (`res`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpResult {
    /// The value observed (`ok` read, `cas_failed` CAS); absent: the key was absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The observed version (reads, failed CAS), or the version a write or applied CAS created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// True if a CAS completed `ok` but did not apply: the key did not hold `expected`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub cas_failed: bool,
    /// The node that served a read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_by: Option<u64>,
    /// The read index a read was served at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_index: Option<u64>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl OpResult {
    /// True if nothing was recorded.
    pub fn is_empty(&self) -> bool {
        *self == OpResult::default()
    }
}

/// One client operation event: an invocation or a completion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// Position in the history (the harness numbers lines from 0).
    pub i: u64,
    /// Harness monotonic time, nanoseconds since the run started.
    pub t_ns: u64,
    /// The logical process (≤1 operation in flight).
    pub proc: u64,
    /// Invocation or completion kind.
    #[serde(rename = "type")]
    pub kind: OpType,
    /// What the operation does.
    pub f: F,
    /// The key.
    pub key: String,
    /// The value written (`write`), or the new value (`cas`; absent deletes the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The value a CAS expects; absent: it expects the key to be absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    /// The read level (reads); absent: `lin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<Level>,
    /// The node the request was sent to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
    /// The key's shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<u64>,
    /// What a completion returned.
    #[serde(default, skip_serializing_if = "OpResult::is_empty")]
    pub res: OpResult,
    /// The error of a `fail` or `info` completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub err: Option<String>,
}

impl Op {
    /// An invocation with every optional field empty.
    pub fn invoke(i: u64, t_ns: u64, proc: u64, f: F, key: impl Into<String>) -> Op {
        Op {
            i,
            t_ns,
            proc,
            kind: OpType::Invoke,
            f,
            key: key.into(),
            value: None,
            expected: None,
            level: None,
            node: None,
            shard: None,
            res: OpResult::default(),
            err: None,
        }
    }

    /// The completion of `invocation` with `kind`, at `t_ns`, numbered `i`.
    pub fn complete(invocation: &Op, i: u64, t_ns: u64, kind: OpType, res: OpResult) -> Op {
        Op {
            i,
            t_ns,
            kind,
            res,
            ..invocation.clone()
        }
    }
}

/// The `proc` of a nemesis line: always the string `"nemesis"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NemesisProc;

impl Serialize for NemesisProc {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("nemesis")
    }
}

impl<'de> Deserialize<'de> for NemesisProc {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<NemesisProc, D::Error> {
        let s = String::deserialize(d)?;
        if s == "nemesis" {
            Ok(NemesisProc)
        } else {
            Err(serde::de::Error::custom(format!(
                "proc must be a number or \"nemesis\", not {s:?}"
            )))
        }
    }
}

/// A fault injection (start or stop of a fault), as the nemesis logged it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NemesisEvent {
    /// Position in the history.
    pub i: u64,
    /// Harness monotonic time, nanoseconds since the run started.
    pub t_ns: u64,
    /// Always `"nemesis"`.
    pub proc: NemesisProc,
    /// Usually `info`; `invoke` then `info` when a fault takes time to apply.
    #[serde(rename = "type")]
    pub kind: OpType,
    /// What the nemesis did: `start-partition`, `stop-kill`, ….
    pub f: String,
    /// Free-form detail: the grudge, the targets, the shard leaders.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub info: serde_json::Value,
}

/// One line of a history.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Event {
    /// A client operation's invocation or completion.
    Op(Op),
    /// A fault injection.
    Nemesis(NemesisEvent),
}

impl Event {
    /// Parses one JSONL line: a nemesis event if `proc` is `"nemesis"`, else a client op.
    pub fn from_json(line: &str) -> Result<Event, serde_json::Error> {
        let value: serde_json::Value = serde_json::from_str(line)?;
        if value.get("proc").and_then(serde_json::Value::as_str) == Some("nemesis") {
            serde_json::from_value(value).map(Event::Nemesis)
        } else {
            serde_json::from_value(value).map(Event::Op)
        }
    }

    /// The event's `i`.
    pub fn i(&self) -> u64 {
        match self {
            Event::Op(op) => op.i,
            Event::Nemesis(n) => n.i,
        }
    }
}

impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Event, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        let nemesis = value.get("proc").and_then(serde_json::Value::as_str) == Some("nemesis");
        let event = if nemesis {
            serde_json::from_value(value).map(Event::Nemesis)
        } else {
            serde_json::from_value(value).map(Event::Op)
        };
        event.map_err(serde::de::Error::custom)
    }
}

/// A malformed history file or history.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// Reading or writing the file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line is not a valid event.
    #[error("line {line}: {source}")]
    Parse {
        /// 1-based line number in the file.
        line: usize,
        /// Why it does not parse.
        source: serde_json::Error,
    },
    /// An event could not be serialized.
    #[error("event i={i}: {source}")]
    Serialize {
        /// The event's `i`.
        i: u64,
        /// Why.
        source: serde_json::Error,
    },
    /// A completion arrived for a process with nothing in flight.
    #[error("event #{pos} (i={i}): proc {proc} completes a {f} on {key:?} with nothing in flight")]
    CompletionWithoutInvoke {
        /// Position of the event in the history (0-based).
        pos: usize,
        /// The event's `i`.
        i: u64,
        /// The process.
        proc: u64,
        /// What the completion says it completed.
        f: F,
        /// Its key.
        key: String,
    },
    /// A process invoked while it still had an operation in flight.
    #[error(
        "event #{pos} (i={i}): proc {proc} invokes while its invocation i={in_flight_i} is still in flight"
    )]
    DoubleInvoke {
        /// Position of the second invocation in the history (0-based).
        pos: usize,
        /// The second invocation's `i`.
        i: u64,
        /// The process.
        proc: u64,
        /// The `i` of the invocation in flight.
        in_flight_i: u64,
    },
    /// A completion does not match its invocation (another `f` or key, or an earlier time).
    #[error(
        "event #{pos} (i={i}): proc {proc}'s completion does not match invocation i={invoke_i}: {what}"
    )]
    Mismatch {
        /// Position of the completion in the history (0-based).
        pos: usize,
        /// The completion's `i`.
        i: u64,
        /// The process.
        proc: u64,
        /// The invocation's `i`.
        invoke_i: u64,
        /// What differs.
        what: String,
    },
    /// A write was invoked without a value.
    #[error("event #{pos} (i={i}): a write without a value")]
    MissingValue {
        /// Position of the invocation in the history (0-based).
        pos: usize,
        /// Its `i`.
        i: u64,
    },
}

/// A whole history: every event in the order the harness logged them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    /// The events, in log order.
    pub events: Vec<Event>,
}

impl History {
    /// An empty history.
    pub fn new() -> History {
        History::default()
    }

    /// A history of client operations only.
    pub fn from_ops(ops: impl IntoIterator<Item = Op>) -> History {
        History {
            events: ops.into_iter().map(Event::Op).collect(),
        }
    }

    /// Reads a JSONL history file; blank lines are skipped.
    pub fn read_jsonl(path: impl AsRef<Path>) -> Result<History, HistoryError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| HistoryError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        History::read_from(BufReader::new(file), path)
    }

    /// Reads JSONL from `reader`; `path` only names the source in errors.
    pub fn read_from(reader: impl BufRead, path: &Path) -> Result<History, HistoryError> {
        let mut events = Vec::new();
        for (n, line) in reader.lines().enumerate() {
            let line = line.map_err(|source| HistoryError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let event = Event::from_json(&line).map_err(|source| HistoryError::Parse {
                line: n + 1,
                source,
            })?;
            events.push(event);
        }
        Ok(History { events })
    }

    /// Writes the history as JSONL, one event per line.
    pub fn write_jsonl(&self, path: impl AsRef<Path>) -> Result<(), HistoryError> {
        let path = path.as_ref();
        let io_error = |source| HistoryError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::create(path).map_err(io_error)?;
        let mut writer = BufWriter::new(file);
        self.write_to(&mut writer, path)?;
        writer.flush().map_err(io_error)?;
        writer
            .into_inner()
            .map_err(|e| io_error(e.into_error()))?
            .sync_all()
            .map_err(io_error)
    }

    /// Writes the history as JSONL to `writer`; `path` only names the target in errors.
    pub fn write_to(&self, mut writer: impl Write, path: &Path) -> Result<(), HistoryError> {
        for event in &self.events {
            let line = serde_json::to_string(event).map_err(|source| HistoryError::Serialize {
                i: event.i(),
                source,
            })?;
            writeln!(writer, "{line}").map_err(|source| HistoryError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Ok(())
    }

    /// The client operations, in log order.
    pub fn ops(&self) -> impl Iterator<Item = &Op> {
        self.events.iter().filter_map(|e| match e {
            Event::Op(op) => Some(op),
            Event::Nemesis(_) => None,
        })
    }

    /// Pairs every invocation with its completion by process, in invocation order. An
    /// invocation with no completion when the history ends counts as `info`.
    pub fn pair(&self) -> Result<Vec<PairedOp>, HistoryError> {
        let mut in_flight: BTreeMap<u64, (usize, &Op)> = BTreeMap::new();
        // (position of the invocation, the paired op), sorted by position at the end.
        let mut paired: Vec<(usize, PairedOp)> = Vec::new();
        for (pos, event) in self.events.iter().enumerate() {
            let Event::Op(op) = event else { continue };
            if op.kind == OpType::Invoke {
                if let Some((_, first)) = in_flight.get(&op.proc) {
                    return Err(HistoryError::DoubleInvoke {
                        pos,
                        i: op.i,
                        proc: op.proc,
                        in_flight_i: first.i,
                    });
                }
                if op.f == F::Write && op.value.is_none() {
                    return Err(HistoryError::MissingValue { pos, i: op.i });
                }
                in_flight.insert(op.proc, (pos, op));
                continue;
            }
            let Some((invoke_pos, invocation)) = in_flight.remove(&op.proc) else {
                return Err(HistoryError::CompletionWithoutInvoke {
                    pos,
                    i: op.i,
                    proc: op.proc,
                    f: op.f,
                    key: op.key.clone(),
                });
            };
            let mismatch = |what: String| HistoryError::Mismatch {
                pos,
                i: op.i,
                proc: op.proc,
                invoke_i: invocation.i,
                what,
            };
            if op.f != invocation.f {
                return Err(mismatch(format!("f {} vs {}", op.f, invocation.f)));
            }
            if op.key != invocation.key {
                return Err(mismatch(format!(
                    "key {:?} vs {:?}",
                    op.key, invocation.key
                )));
            }
            if op.t_ns < invocation.t_ns {
                return Err(mismatch(format!(
                    "completed at t_ns={} before its invocation at t_ns={}",
                    op.t_ns, invocation.t_ns
                )));
            }
            paired.push((invoke_pos, PairedOp::from_events(invocation, Some(op))));
        }
        for (invoke_pos, invocation) in in_flight.into_values() {
            paired.push((invoke_pos, PairedOp::from_events(invocation, None)));
        }
        paired.sort_by_key(|(pos, _)| *pos);
        Ok(paired.into_iter().map(|(_, op)| op).collect())
    }
}

/// A value with the version it was observed at; `None` if the version was not recorded.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Versioned {
    /// The value.
    pub value: String,
    /// Its version (the log index of the write that created it), if recorded.
    pub version: Option<u64>,
}

/// What an operation asked for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Input {
    /// Read the key.
    Read,
    /// Put `value`.
    Write {
        /// The value.
        value: String,
    },
    /// If the key holds `expected` (`None`: absent), set it to `new` (`None`: delete).
    Cas {
        /// The expected current value.
        expected: Option<String>,
        /// The new value.
        new: Option<String>,
    },
}

impl Input {
    /// The operation's `f`.
    pub fn f(&self) -> F {
        match self {
            Input::Read => F::Read,
            Input::Write { .. } => F::Write,
            Input::Cas { .. } => F::Cas,
        }
    }
}

/// How an operation ended, and what it returned.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Output {
    /// An `ok` read: what it observed (`None`: the key was absent).
    Read(Option<Versioned>),
    /// An `ok` write or an applied CAS, with the version it created if recorded.
    Written {
        /// The key's new version.
        version: Option<u64>,
    },
    /// An `ok` CAS that did not apply: the key held `current` instead (`None`: absent).
    CasFailed {
        /// What the key held.
        current: Option<Versioned>,
    },
    /// `fail`: it certainly did not take effect.
    Fail,
    /// `info` (or no completion): it may have taken effect, at any time after its invocation.
    Info,
}

impl Output {
    /// True if this output can answer `input` (a read's output for a read, and so on).
    pub fn fits(&self, input: &Input) -> bool {
        match self {
            Output::Read(_) => matches!(input, Input::Read),
            Output::Written { .. } => !matches!(input, Input::Read),
            Output::CasFailed { .. } => matches!(input, Input::Cas { .. }),
            Output::Fail | Output::Info => true,
        }
    }
}

/// An invocation paired with its completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairedOp {
    /// The process.
    pub proc: u64,
    /// The key.
    pub key: String,
    /// What was asked.
    pub input: Input,
    /// What came back.
    pub output: Output,
    /// The read level (reads only; `None`: the default, `lin`).
    pub level: Option<Level>,
    /// When it was invoked (ns).
    pub invoke_t: u64,
    /// When it completed (ns); `None` for `info`, which may take effect until the end of time.
    pub complete_t: Option<u64>,
    /// The invocation's `i`.
    pub invoke_i: u64,
    /// The completion's `i`, if there was one.
    pub complete_i: Option<u64>,
    /// The node the request went to, or that served it.
    pub node: Option<u64>,
    /// The error of a `fail` or `info` completion.
    pub err: Option<String>,
}

impl PairedOp {
    fn from_events(invocation: &Op, completion: Option<&Op>) -> PairedOp {
        let input = match invocation.f {
            F::Read => Input::Read,
            F::Write => Input::Write {
                value: invocation.value.clone().unwrap_or_default(),
            },
            F::Cas => Input::Cas {
                expected: invocation.expected.clone(),
                new: invocation.value.clone(),
            },
        };
        let output = match completion {
            None => Output::Info,
            Some(c) => match c.kind {
                OpType::Info | OpType::Invoke => Output::Info,
                OpType::Fail => Output::Fail,
                OpType::Ok => {
                    let observed = c.res.value.clone().map(|value| Versioned {
                        value,
                        version: c.res.version,
                    });
                    match invocation.f {
                        F::Read => Output::Read(observed),
                        F::Cas if c.res.cas_failed => Output::CasFailed { current: observed },
                        F::Write | F::Cas => Output::Written {
                            version: c.res.version,
                        },
                    }
                }
            },
        };
        let complete_t = match output {
            Output::Info => None,
            _ => completion.map(|c| c.t_ns),
        };
        PairedOp {
            proc: invocation.proc,
            key: invocation.key.clone(),
            input,
            output,
            level: invocation.level.or(completion.and_then(|c| c.level)),
            invoke_t: invocation.t_ns,
            complete_t,
            invoke_i: invocation.i,
            complete_i: completion.map(|c| c.i),
            node: completion
                .and_then(|c| c.res.served_by.or(c.node))
                .or(invocation.node),
            err: completion.and_then(|c| c.err.clone()),
        }
    }

    /// The operation's `f`.
    pub fn f(&self) -> F {
        self.input.f()
    }

    /// The read level, with the default (`lin`) filled in; `None` for writes and CAS.
    pub fn read_level(&self) -> Option<Level> {
        match self.input {
            Input::Read => Some(self.level.unwrap_or(Level::Lin)),
            _ => None,
        }
    }
}

struct Quoted<'a>(Option<&'a str>);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => write!(f, "{v:?}"),
            None => f.write_str("(absent)"),
        }
    }
}

fn observed(f: &mut fmt::Formatter<'_>, v: &Option<Versioned>) -> fmt::Result {
    match v {
        None => f.write_str("(absent)"),
        Some(Versioned {
            value,
            version: Some(version),
        }) => write!(f, "{value:?} (version {version})"),
        Some(Versioned {
            value,
            version: None,
        }) => write!(f, "{value:?} (version unknown)"),
    }
}

fn seconds(ns: u64) -> String {
    format!(
        "{}.{:06}s",
        ns / 1_000_000_000,
        (ns % 1_000_000_000) / 1_000
    )
}

/// Readable form, e.g. `proc 3 read k7 → "v12" (version 40) [lin] at t=1.000000s..1.002000s (i=4..7)`.
impl fmt::Display for PairedOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "proc {} {} {}", self.proc, self.f(), self.key)?;
        match &self.input {
            Input::Read => {}
            Input::Write { value } => write!(f, " {value:?}")?,
            Input::Cas { expected, new } => write!(
                f,
                " {} → {}",
                Quoted(expected.as_deref()),
                Quoted(new.as_deref())
            )?,
        }
        f.write_str(" → ")?;
        match &self.output {
            Output::Read(v) => observed(f, v)?,
            Output::Written { version: Some(v) } => write!(f, "ok (version {v})")?,
            Output::Written { version: None } => f.write_str("ok (version unknown)")?,
            Output::CasFailed { current } => {
                f.write_str("cas_failed, current ")?;
                observed(f, current)?;
            }
            Output::Fail => f.write_str("fail")?,
            Output::Info => f.write_str("info (outcome unknown)")?,
        }
        if let Some(level) = self.read_level() {
            write!(f, " [{level}]")?;
        }
        if let Some(node) = self.node {
            write!(f, " on node {node}")?;
        }
        write!(f, " at t={}", seconds(self.invoke_t))?;
        match self.complete_t {
            Some(t) => write!(f, "..{}", seconds(t))?,
            None => f.write_str("..∞")?,
        }
        write!(f, " (i={}", self.invoke_i)?;
        if let Some(c) = self.complete_i {
            write!(f, "..{c}")?;
        }
        f.write_str(")")?;
        if let Some(err) = &self.err {
            write!(f, ", error: {err}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_ok(i: u64, t: u64, proc: u64, key: &str, value: &str, version: u64) -> [Op; 2] {
        let mut inv = Op::invoke(i, t, proc, F::Write, key);
        inv.value = Some(value.to_string());
        let res = OpResult {
            version: Some(version),
            ..OpResult::default()
        };
        let done = Op::complete(&inv, i + 1, t + 10, OpType::Ok, res);
        [inv, done]
    }

    #[test]
    fn jsonl_round_trips_ops_and_nemesis_lines() {
        let [a, b] = write_ok(0, 100, 3, "k7", "3-1", 40);
        let mut read = Op::invoke(2, 200, 4, F::Read, "k7");
        read.level = Some(Level::Bst(250));
        let read_done = Op::complete(
            &read,
            3,
            300,
            OpType::Ok,
            OpResult {
                value: Some("3-1".into()),
                version: Some(40),
                served_by: Some(2),
                read_index: Some(41),
                ..OpResult::default()
            },
        );
        let nemesis = NemesisEvent {
            i: 4,
            t_ns: 400,
            proc: NemesisProc,
            kind: OpType::Info,
            f: "start-partition".into(),
            info: serde_json::json!({"grudge": {"1": [2, 3]}}),
        };
        let history = History {
            events: vec![
                Event::Op(a),
                Event::Op(b),
                Event::Op(read),
                Event::Op(read_done),
                Event::Nemesis(nemesis),
            ],
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        history.write_jsonl(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(r#""proc":"nemesis""#), "{text}");
        assert!(text.contains(r#""level":"bst:250""#), "{text}");
        assert!(text.contains(r#""type":"invoke""#), "{text}");
        assert!(!text.contains("null"), "{text}");
        assert_eq!(History::read_jsonl(&path).unwrap(), history);
    }

    #[test]
    fn the_documented_example_lines_parse() {
        let text = r#"{"i":0,"t_ns":1000,"proc":3,"type":"invoke","f":"write","key":"k7","value":"3-12"}
{"i":1,"t_ns":2500,"proc":3,"type":"ok","f":"write","key":"k7","node":2,"shard":5,"res":{"version":40}}

{"i":2,"t_ns":2600,"proc":4,"type":"invoke","f":"read","key":"k7","level":"lin"}
{"i":3,"t_ns":2900,"proc":4,"type":"ok","f":"read","key":"k7","res":{"value":"3-12","version":40,"served_by":2,"read_index":41}}
{"i":4,"t_ns":3000,"proc":5,"type":"invoke","f":"cas","key":"k7","expected":"3-12","value":"5-1"}
{"i":5,"t_ns":3900,"proc":5,"type":"ok","f":"cas","key":"k7","res":{"cas_failed":true,"value":"4-2","version":44}}
{"i":6,"t_ns":4000,"proc":"nemesis","type":"info","f":"start-partition","info":{"grudge":{"1":[2,3]}}}
{"i":7,"t_ns":4100,"proc":6,"type":"invoke","f":"cas","key":"k7","value":"6-1"}
"#;
        let h = History::read_from(text.as_bytes(), Path::new("example")).unwrap();
        assert_eq!(h.events.len(), 8);
        let ops = h.pair().unwrap();
        assert_eq!(ops.len(), 4);
        assert_eq!(ops[0].output, Output::Written { version: Some(40) });
        assert_eq!(ops[0].node, Some(2));
        assert_eq!(
            ops[1].output,
            Output::Read(Some(Versioned {
                value: "3-12".into(),
                version: Some(40)
            }))
        );
        assert_eq!(ops[1].read_level(), Some(Level::Lin));
        assert_eq!(
            ops[2].output,
            Output::CasFailed {
                current: Some(Versioned {
                    value: "4-2".into(),
                    version: Some(44)
                })
            }
        );
        // Never completed: info, open until the end of time; expects the key to be absent.
        assert_eq!(ops[3].output, Output::Info);
        assert_eq!(ops[3].complete_t, None);
        assert_eq!(
            ops[3].input,
            Input::Cas {
                expected: None,
                new: Some("6-1".into())
            }
        );
        let text = ops[1].to_string();
        assert!(
            text.starts_with("proc 4 read k7 → \"3-12\" (version 40) [lin]"),
            "{text}"
        );
    }

    #[test]
    fn parse_errors_name_the_line() {
        let text = "{\"i\":0,\"t_ns\":1,\"proc\":1,\"type\":\"invoke\",\"f\":\"read\",\"key\":\"k\"}\n\
                    {\"i\":1,\"t_ns\":2,\"proc\":1,\"type\":\"okay\",\"f\":\"read\",\"key\":\"k\"}\n";
        let err = History::read_from(text.as_bytes(), Path::new("h")).unwrap_err();
        assert!(matches!(err, HistoryError::Parse { line: 2, .. }), "{err}");
        let bad_level = "{\"i\":0,\"t_ns\":1,\"proc\":1,\"type\":\"invoke\",\"f\":\"read\",\"key\":\"k\",\"level\":\"strong\"}";
        let err = History::read_from(bad_level.as_bytes(), Path::new("h")).unwrap_err();
        assert!(err.to_string().contains("unknown read level"), "{err}");
    }

    #[test]
    fn pairing_rejects_a_completion_with_nothing_in_flight() {
        let [a, b] = write_ok(0, 100, 3, "k", "3-1", 1);
        let history = History::from_ops([a, b.clone(), b]);
        let err = history.pair().unwrap_err();
        assert!(
            matches!(
                err,
                HistoryError::CompletionWithoutInvoke {
                    pos: 2,
                    i: 1,
                    proc: 3,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn pairing_rejects_two_invocations_in_flight_on_one_proc() {
        let [a, _] = write_ok(0, 100, 3, "k", "3-1", 1);
        let [mut c, _] = write_ok(5, 200, 3, "k", "3-2", 2);
        c.i = 5;
        let err = History::from_ops([a, c]).pair().unwrap_err();
        assert!(
            matches!(
                err,
                HistoryError::DoubleInvoke {
                    pos: 1,
                    i: 5,
                    proc: 3,
                    in_flight_i: 0
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("event #1 (i=5)"), "{err}");
    }

    #[test]
    fn pairing_rejects_mismatched_completions() {
        let [a, mut b] = write_ok(0, 100, 3, "k", "3-1", 1);
        b.key = "other".into();
        let err = History::from_ops([a, b]).pair().unwrap_err();
        assert!(matches!(err, HistoryError::Mismatch { .. }), "{err}");
    }

    #[test]
    fn pairing_maps_fail_and_info_and_keeps_invocation_order() {
        let [a, _] = write_ok(0, 100, 1, "k", "1-1", 1);
        let [b, _] = write_ok(1, 110, 2, "k", "2-1", 1);
        let b_info = Op::complete(&b, 2, 150, OpType::Info, OpResult::default());
        let a_fail = Op::complete(&a, 3, 160, OpType::Fail, OpResult::default());
        let ops = History::from_ops([a, b, b_info, a_fail]).pair().unwrap();
        assert_eq!(ops[0].proc, 1);
        assert_eq!(ops[0].output, Output::Fail);
        assert_eq!(ops[0].complete_t, Some(160));
        assert_eq!(ops[1].output, Output::Info);
        assert_eq!(ops[1].complete_t, None);
        assert_eq!(ops[1].complete_i, Some(2));
    }
}
