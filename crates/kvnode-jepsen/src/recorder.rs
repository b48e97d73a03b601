//! The live history of a fault-test run: numbers and timestamps every event from one
//! monotonic clock, appends it to the run's `history.jsonl` as it happens (so a crashed
//! harness still leaves its history behind), and keeps it in memory for the checkers.
//!
//! An event's `i` and `t_ns` are assigned under one lock, so line order is time order. A
//! worker calls [`Recorder::invoke`] just before sending a request and [`Recorder::complete`]
//! just after its reply: the recorded interval contains the real one.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use super::history::{Event, History, HistoryError, NemesisEvent, NemesisProc, Op, OpType};

/// Records a run's history; shared by every worker and the nemesis.
#[derive(Debug)]
pub struct Recorder {
    start: Instant,
    path: PathBuf,
    inner: Mutex<Inner>,
}

/// Running totals of a history, for progress lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// `ok` completions.
    pub ok: u64,
    /// `fail` completions.
    pub fail: u64,
    /// `info` completions.
    pub info: u64,
    /// Faults started (`start-…` nemesis lines).
    pub faults: u64,
}

impl Tally {
    fn count(&mut self, event: &Event) {
        match event {
            Event::Op(op) => match op.kind {
                OpType::Ok => self.ok += 1,
                OpType::Fail => self.fail += 1,
                OpType::Info => self.info += 1,
                OpType::Invoke => {}
            },
            Event::Nemesis(n) if n.f.starts_with("start-") => self.faults += 1,
            Event::Nemesis(_) => {}
        }
    }
}

#[derive(Debug)]
struct Inner {
    next_i: u64,
    tally: Tally,
    out: BufWriter<File>,
    events: Vec<Event>,
    /// The first write error, reported by [`Recorder::finish`].
    failed: Option<std::io::Error>,
}

impl Recorder {
    /// Starts a history at `path` (created or truncated); time 0 is now.
    pub fn create(path: impl AsRef<Path>) -> Result<Recorder, HistoryError> {
        let path = path.as_ref().to_path_buf();
        let file = File::create(&path).map_err(|source| HistoryError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Recorder {
            start: Instant::now(),
            path,
            inner: Mutex::new(Inner {
                next_i: 0,
                tally: Tally::default(),
                out: BufWriter::new(file),
                events: Vec::new(),
                failed: None,
            }),
        })
    }

    /// Nanoseconds since the run started, on the recorder's clock.
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Records `op` as an invocation (its `i`, `t_ns` and `kind` are set here) and returns it
    /// as recorded, to be passed to [`Recorder::complete`].
    pub fn invoke(&self, mut op: Op) -> Op {
        op.kind = OpType::Invoke;
        self.push(|i, t_ns| {
            op.i = i;
            op.t_ns = t_ns;
            Event::Op(op.clone())
        });
        op
    }

    /// Records the completion of `invocation` as `completion` (its `i`, `t_ns`, `proc`, `f`
    /// and `key` are taken from the invocation and the clock) and returns it.
    pub fn complete(&self, invocation: &Op, mut completion: Op) -> Op {
        completion.proc = invocation.proc;
        completion.f = invocation.f;
        completion.key.clone_from(&invocation.key);
        self.push(|i, t_ns| {
            completion.i = i;
            completion.t_ns = t_ns;
            Event::Op(completion.clone())
        });
        completion
    }

    /// Records a nemesis line: `f` such as `start-partition`, with free-form `info`.
    pub fn nemesis(&self, kind: OpType, f: impl Into<String>, info: serde_json::Value) {
        let f = f.into();
        self.push(|i, t_ns| {
            Event::Nemesis(NemesisEvent {
                i,
                t_ns,
                proc: NemesisProc,
                kind,
                f,
                info,
            })
        });
    }

    fn push(&self, make: impl FnOnce(u64, u64) -> Event) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let i = inner.next_i;
        inner.next_i += 1;
        let event = make(i, self.now_ns());
        match serde_json::to_string(&event) {
            Ok(line) => {
                if let Err(e) = writeln!(inner.out, "{line}")
                    && inner.failed.is_none()
                {
                    inner.failed = Some(e);
                }
            }
            Err(e) => {
                if inner.failed.is_none() {
                    inner.failed = Some(std::io::Error::other(e));
                }
            }
        }
        inner.tally.count(&event);
        inner.events.push(event);
    }

    /// The totals so far, without copying the history.
    pub fn tally(&self) -> Tally {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .tally
    }

    /// The history so far.
    pub fn history(&self) -> History {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        History {
            events: inner.events.clone(),
        }
    }

    /// Flushes the file and reports the first write error, if any.
    pub fn finish(&self) -> Result<(), HistoryError> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let flushed = inner.out.flush();
        match inner.failed.take().map_or(flushed, Err) {
            Ok(()) => Ok(()),
            Err(source) => Err(HistoryError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{F, OpResult};

    #[test]
    fn numbers_events_in_time_order_and_writes_what_it_keeps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("history.jsonl");
        let recorder = Recorder::create(&path).expect("create");
        let mut op = Op::invoke(0, 0, 7, F::Write, "k");
        op.value = Some("7-1".into());
        let invoked = recorder.invoke(op);
        recorder.nemesis(
            OpType::Info,
            "start-kill",
            serde_json::json!({"targets": [1]}),
        );
        let mut done = invoked.clone();
        done.kind = OpType::Ok;
        done.res = OpResult {
            version: Some(3),
            ..OpResult::default()
        };
        let completed = recorder.complete(&invoked, done);
        assert_eq!((invoked.i, completed.i), (0, 2));
        assert_eq!(
            recorder.tally(),
            Tally {
                ok: 1,
                faults: 1,
                ..Tally::default()
            }
        );
        assert!(completed.t_ns >= invoked.t_ns);
        recorder.finish().expect("flush");

        let kept = recorder.history();
        let read = History::read_jsonl(&path).expect("read back");
        assert_eq!(read, kept);
        let paired = read.pair().expect("pairs");
        assert_eq!(paired.len(), 1);
        assert_eq!(paired[0].proc, 7);
    }
}
