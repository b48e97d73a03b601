//! The linearizability checker for the `register` workload: per key, a versioned CAS register,
//! searched with memoized WGL (Wing–Gong–Lowe, as in porcupine's `checkSingle`), as
//! `docs/design/jepsen.md` §4 specifies.
//!
//! This module owns the register model, the search, and the report. [`check`] pairs a
//! [`History`], keeps the operations that belong in a linearizability check, splits them by key
//! (linearizability is compositional, so every key is checked alone) and runs [`check_key`] on
//! each; the [`Report`] names, for a key that is not linearizable, the longest linearizable
//! prefix found and the first operation that could not be linearized.
//!
//! ## Which operations enter
//!
//! - Writes and CAS that completed `ok` (a CAS that did not apply is `ok` with `cas_failed`:
//!   it observed the value it reports);
//! - writes and CAS that ended `info` (or never ended): they may take effect at any time after
//!   their invocation, or never, so their return is at +∞ and their output is not checked;
//! - reads that completed `ok` at a level the [`LevelFilter`] admits (by default the
//!   linearizable ones: `lin`, `lease`, `fri`). Reads at other levels are other checkers' job.
//! - `fail` operations (certainly without effect) and `info` reads (no effect) are left out.
//!
//! ## The model
//!
//! A register per key whose state is absent or a value with a version: the log index of the
//! key's last write. A read must observe the current value and its version; a write or an
//! applied CAS sets the value, and its version must be greater than the current one (versions
//! are log indices, so they grow in log order, which for a correct store is the linearization
//! order); a CAS applies exactly when the key holds `expected`, and a `cas_failed` must observe
//! the value it reports. Two different values written with one version (split brain) can
//! therefore not both be linearized. When a write's version is unknown (an `info` write, or a
//! receipt that was not recorded) the version is a wildcard: it is only known to exceed the
//! previous one, and the first read that observes the value binds it.
//!
//! ## The search
//!
//! The call and return entries of the operations form a doubly linked list sorted by time
//! (calls before returns on ties, so operations that touch are concurrent; `info` returns at
//! +∞). Walking it with a state, a stack and a bitset of linearized operations: at a call whose
//! operation is a legal next step and whose (bitset ∪ op, new state) was never seen, record
//! that pair, push, lift the call and its return out of the list and restart at the head; at a
//! finite return, pop and try the next call. Success when only +∞ returns remain; failure when
//! a return is reached with an empty stack. Three exact reductions keep the state space small:
//! - values that no operation observes (no read or failed CAS returns them, no CAS expects
//!   them) are indistinguishable and share one state;
//! - an `info` write or CAS of such a value is dropped, since a linearization that includes it
//!   stays valid without it;
//! - the `ok` writes and applied CAS with recorded versions can only be linearized in version
//!   order, so only the next one in that order is tried (with versions, a round of fully
//!   concurrent writes costs one configuration per write instead of one per subset).
//!
//! Measured in a debug build on jepsen.md §4's largest case, 10 clients × 50 rounds of fully
//! concurrent writes plus 4 writes that never return, then a stale read: 1.4 ms with versions,
//! 80 ms without; when a failed CAS expects each open write's value (so they cannot be
//! dropped) 18 ms with versions and 7 s (2.5 million configurations) without.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use super::history::{History, HistoryError, Input, Level, LevelKind, Output, PairedOp, Versioned};

/// Which read levels a checker admits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LevelFilter {
    kinds: Vec<LevelKind>,
}

impl LevelFilter {
    /// The linearizable levels: `lin`, `lease` and `fri` (jepsen.md §3.5).
    pub fn linearizable() -> LevelFilter {
        LevelFilter::only([LevelKind::Lin, LevelKind::Lease, LevelKind::Fri])
    }

    /// Exactly these levels.
    pub fn only(kinds: impl IntoIterator<Item = LevelKind>) -> LevelFilter {
        let mut kinds: Vec<LevelKind> = kinds.into_iter().collect();
        kinds.sort();
        kinds.dedup();
        LevelFilter { kinds }
    }

    /// True if reads at `level` are admitted.
    pub fn admits(&self, level: Level) -> bool {
        self.kinds.contains(&level.kind())
    }
}

impl Default for LevelFilter {
    fn default() -> LevelFilter {
        LevelFilter::linearizable()
    }
}

impl fmt::Display for LevelFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self
            .kinds
            .iter()
            .map(|k| match k {
                LevelKind::Lin => "lin",
                LevelKind::Lease => "lease",
                LevelKind::Fri => "fri",
                LevelKind::Bst => "bst",
                LevelKind::Session => "session",
                LevelKind::Ev => "ev",
            })
            .collect();
        f.write_str(&names.join(", "))
    }
}

/// A linearizability checker: which reads enter, and how much search a key may cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checker {
    /// The read levels checked; reads at other levels are left out.
    pub levels: LevelFilter,
    /// The most (linearized set, state) configurations one key may explore before its verdict
    /// is [`Verdict::Inconclusive`]. Each costs about `ops / 8 + 40` bytes.
    pub max_states: usize,
}

impl Default for Checker {
    fn default() -> Checker {
        Checker {
            levels: LevelFilter::linearizable(),
            max_states: 10_000_000,
        }
    }
}

/// Checks `history` with the default [`Checker`] but reads at `levels`.
pub fn check(history: &History, levels: &LevelFilter) -> Result<Report, HistoryError> {
    Checker {
        levels: levels.clone(),
        ..Checker::default()
    }
    .check(history)
}

/// Checks the operations of one key with the default [`Checker`]: see [`Checker::check_key`].
pub fn check_key(ops: &[PairedOp]) -> Verdict {
    Checker::default().check_key(ops)
}

impl Checker {
    /// Pairs `history` and checks every key.
    pub fn check(&self, history: &History) -> Result<Report, HistoryError> {
        Ok(self.check_ops(&history.pair()?))
    }

    /// Checks paired operations, split by key; reads at levels the filter does not admit are
    /// left out.
    pub fn check_ops(&self, ops: &[PairedOp]) -> Report {
        let mut by_key: BTreeMap<&str, Vec<PairedOp>> = BTreeMap::new();
        let mut reads_left_out = 0;
        for op in ops {
            if let Some(level) = op.read_level()
                && !self.levels.admits(level)
            {
                reads_left_out += 1;
                continue;
            }
            by_key.entry(&op.key).or_default().push(op.clone());
        }
        let keys = by_key
            .into_iter()
            .map(|(key, ops)| {
                let verdict = self.check_key(&ops);
                KeyReport {
                    key: key.to_string(),
                    ops,
                    verdict,
                }
            })
            .collect();
        Report {
            levels: self.levels.clone(),
            reads_left_out,
            keys,
        }
    }

    /// Checks `ops` as one register (normally one key's operations; keys are not compared).
    /// Every read given is checked whatever its level: the caller chose which enter. `fail`
    /// operations and `info` reads are left out. Operation indices in the verdict are indices
    /// into `ops`.
    pub fn check_key(&self, ops: &[PairedOp]) -> Verdict {
        match Compiled::new(ops) {
            Ok(compiled) => compiled.search(self.max_states),
            Err(malformed) => malformed,
        }
    }
}

/// The outcome of checking one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Linearizable; `order` is a witness: the operations in a legal linearization order
    /// (`info` operations that need not take effect are absent from it).
    Linearizable {
        /// Indices of the operations, in linearization order.
        order: Vec<usize>,
        /// Configurations explored.
        states: usize,
    },
    /// Not linearizable.
    NotLinearizable(Violation),
    /// The search gave up after `states` configurations ([`Checker::max_states`]).
    Inconclusive {
        /// Configurations explored.
        states: usize,
    },
    /// An operation cannot be checked: its output does not answer its input, or an `ok`
    /// operation has no completion time or completed before it was invoked.
    Malformed {
        /// Index of the operation.
        op: usize,
        /// What is wrong with it.
        reason: String,
    },
}

impl Verdict {
    /// True if linearizable.
    pub fn is_linearizable(&self) -> bool {
        matches!(self, Verdict::Linearizable { .. })
    }

    /// The violation, if not linearizable.
    pub fn violation(&self) -> Option<&Violation> {
        match self {
            Verdict::NotLinearizable(v) => Some(v),
            _ => None,
        }
    }
}

/// Why a key is not linearizable: the deepest partial linearization the search reached, and
/// the operation whose return it could not get past.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The longest linearizable prefix found: indices of operations in linearization order.
    pub prefix: Vec<usize>,
    /// The first operation that could not be linearized after that prefix: it had returned,
    /// and no legal step was left to place it.
    pub op: usize,
    /// Configurations explored.
    pub states: usize,
}

impl Violation {
    /// The length of the longest linearizable prefix.
    pub fn prefix_len(&self) -> usize {
        self.prefix.len()
    }
}

/// The verdict on one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyReport {
    /// The key.
    pub key: String,
    /// The operations given to [`Checker::check_key`] (indices in the verdict refer to these).
    pub ops: Vec<PairedOp>,
    /// The verdict.
    pub verdict: Verdict,
}

impl KeyReport {
    /// The first operation that could not be linearized, if the key is not linearizable.
    pub fn first_bad_op(&self) -> Option<&PairedOp> {
        self.verdict.violation().map(|v| &self.ops[v.op])
    }
}

/// The verdict on every key of a history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The read levels that were checked.
    pub levels: LevelFilter,
    /// Reads left out because of their level.
    pub reads_left_out: usize,
    /// Per key, sorted by key.
    pub keys: Vec<KeyReport>,
}

impl Report {
    /// True if every key is linearizable.
    pub fn is_linearizable(&self) -> bool {
        self.keys.iter().all(|k| k.verdict.is_linearizable())
    }

    /// The keys that are not linearizable.
    pub fn violations(&self) -> impl Iterator<Item = &KeyReport> {
        self.keys.iter().filter(|k| k.verdict.violation().is_some())
    }

    /// The report of `key`.
    pub fn key(&self, key: &str) -> Option<&KeyReport> {
        self.keys.iter().find(|k| k.key == key)
    }
}

/// One summary line, then one paragraph per key that is not linearizable.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ops: usize = self.keys.iter().map(|k| k.ops.len()).sum();
        let count =
            |pred: fn(&Verdict) -> bool| self.keys.iter().filter(|k| pred(&k.verdict)).count();
        writeln!(
            f,
            "linearizability ({}): {} keys, {} ops ({} reads at other levels left out): \
             {} linearizable, {} NOT linearizable, {} inconclusive, {} malformed",
            self.levels,
            self.keys.len(),
            ops,
            self.reads_left_out,
            count(|v| matches!(v, Verdict::Linearizable { .. })),
            count(|v| matches!(v, Verdict::NotLinearizable(_))),
            count(|v| matches!(v, Verdict::Inconclusive { .. })),
            count(|v| matches!(v, Verdict::Malformed { .. })),
        )?;
        for k in &self.keys {
            match &k.verdict {
                Verdict::Linearizable { .. } => {}
                Verdict::NotLinearizable(v) => {
                    writeln!(
                        f,
                        "key {:?}: NOT linearizable ({} states explored); longest linearizable \
                         prefix: {} of {} ops; first op that could not be linearized:\n  {}",
                        k.key,
                        v.states,
                        v.prefix_len(),
                        k.ops.len(),
                        k.ops[v.op]
                    )?;
                    let tail = v.prefix.len().saturating_sub(5);
                    if !v.prefix.is_empty() {
                        writeln!(f, "  end of that prefix:")?;
                    }
                    for &i in &v.prefix[tail..] {
                        writeln!(f, "    {}", k.ops[i])?;
                    }
                }
                Verdict::Inconclusive { states } => {
                    writeln!(f, "key {:?}: inconclusive after {states} states", k.key)?
                }
                Verdict::Malformed { op, reason } => {
                    writeln!(f, "key {:?}: malformed op: {reason}: {}", k.key, k.ops[*op])?
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The model.

/// Value id of "absent".
const ABSENT: u32 = 0;
/// Value id shared by every value that no operation observes.
const UNOBSERVED: u32 = 1;

/// What a read or failed CAS observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Obs {
    Absent,
    Value(u32, Option<u64>),
}

/// One operation in the model's terms (values interned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MOp {
    Read(Obs),
    /// An `ok` write; `ver` is the version it created, if recorded.
    Write {
        val: u32,
        ver: Option<u64>,
    },
    CasApplied {
        exp: u32,
        new: u32,
        ver: Option<u64>,
    },
    CasFailed {
        exp: u32,
        obs: Obs,
    },
    InfoWrite {
        val: u32,
    },
    InfoCas {
        exp: u32,
        new: u32,
    },
}

/// The current version: known, or (after a write whose version is unknown) at least a bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ver {
    Known(u64),
    AtLeast(u64),
}

impl Ver {
    /// The version after a write that created `created` (`None`: unknown), if legal.
    fn advance(self, created: Option<u64>) -> Option<Ver> {
        match (self, created) {
            (Ver::Known(k), Some(w)) | (Ver::AtLeast(k), Some(w)) => {
                (w > k).then_some(Ver::Known(w))
            }
            (Ver::Known(k), None) => Some(Ver::AtLeast(k.saturating_add(1))),
            (Ver::AtLeast(m), None) => Some(Ver::AtLeast(m.saturating_add(1))),
        }
    }

    fn encode(self) -> u64 {
        match self {
            Ver::Known(k) => k << 1,
            Ver::AtLeast(m) => (m << 1) | 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    val: u32,
    ver: Ver,
}

impl State {
    const INITIAL: State = State {
        val: ABSENT,
        ver: Ver::Known(0),
    };

    fn observe(self, obs: Obs) -> Option<State> {
        match obs {
            Obs::Absent => (self.val == ABSENT).then_some(self),
            Obs::Value(v, _) if v != self.val => None,
            Obs::Value(_, None) => Some(self),
            Obs::Value(val, Some(r)) => match self.ver {
                Ver::Known(k) => (k == r).then_some(self),
                Ver::AtLeast(m) => (r >= m).then_some(State {
                    val,
                    ver: Ver::Known(r),
                }),
            },
        }
    }

    fn write(self, val: u32, created: Option<u64>) -> Option<State> {
        Some(State {
            val,
            ver: self.ver.advance(created)?,
        })
    }

    /// The state after `op`, if `op` is a legal next step.
    fn step(self, op: MOp) -> Option<State> {
        match op {
            MOp::Read(obs) => self.observe(obs),
            MOp::Write { val, ver } => self.write(val, ver),
            MOp::CasApplied { exp, new, ver } => {
                if self.val == exp {
                    self.write(new, ver)
                } else {
                    None
                }
            }
            MOp::CasFailed { exp, obs } => {
                if self.val == exp {
                    None
                } else {
                    self.observe(obs)
                }
            }
            MOp::InfoWrite { val } => self.write(val, None),
            MOp::InfoCas { exp, new } => {
                if self.val == exp {
                    self.write(new, None)
                } else {
                    Some(self)
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The search.

const NIL: u32 = u32::MAX;
const HEAD: u32 = 0;

/// One key's operations, compiled for the search.
struct Compiled {
    ops: Vec<MOp>,
    /// Index of each compiled op in the caller's slice.
    orig: Vec<usize>,
    /// (invoke time, return time; `None` = +∞) per compiled op.
    times: Vec<(u64, Option<u64>)>,
    /// Per compiled op: its rank among the `ok` writes and applied CAS with a recorded version,
    /// in version order (ties by position).
    rank: Vec<Option<u32>>,
}

impl Compiled {
    fn new(ops: &[PairedOp]) -> Result<Compiled, Verdict> {
        let malformed = |op: usize, reason: &str| Verdict::Malformed {
            op,
            reason: reason.to_string(),
        };
        // Values some operation observes get their own id; every other value is UNOBSERVED.
        let mut observed: Vec<&str> = Vec::new();
        for op in ops {
            match (&op.input, &op.output) {
                (Input::Read, Output::Read(Some(seen)))
                | (
                    _,
                    Output::CasFailed {
                        current: Some(seen),
                    },
                ) => observed.push(&seen.value),
                _ => {}
            }
            if let Input::Cas {
                expected: Some(e), ..
            } = &op.input
            {
                observed.push(e);
            }
        }
        let mut ids: HashMap<&str, u32> = HashMap::new();
        for v in observed {
            let next = ids.len() as u32 + 2;
            ids.entry(v).or_insert(next);
        }
        let id = |v: Option<&String>| match v {
            None => ABSENT,
            Some(v) => ids.get(v.as_str()).copied().unwrap_or(UNOBSERVED),
        };
        let obs = |seen: &Option<Versioned>| match seen {
            None => Obs::Absent,
            Some(s) => Obs::Value(id(Some(&s.value)), s.version),
        };

        let mut compiled = Compiled {
            ops: Vec::new(),
            orig: Vec::new(),
            times: Vec::new(),
            rank: Vec::new(),
        };
        for (i, op) in ops.iter().enumerate() {
            if !op.output.fits(&op.input) {
                return Err(malformed(i, "the output does not answer the input"));
            }
            let m = match (&op.input, &op.output) {
                (_, Output::Fail) | (Input::Read, Output::Info) => continue,
                (Input::Read, Output::Read(seen)) => MOp::Read(obs(seen)),
                (Input::Write { value }, Output::Written { version }) => MOp::Write {
                    val: id(Some(value)),
                    ver: *version,
                },
                (Input::Write { value }, Output::Info) => match id(Some(value)) {
                    // Nobody observes it: a linearization with it stays one without it.
                    UNOBSERVED => continue,
                    val => MOp::InfoWrite { val },
                },
                (Input::Cas { expected, new }, Output::Written { version }) => MOp::CasApplied {
                    exp: id(expected.as_ref()),
                    new: id(new.as_ref()),
                    ver: *version,
                },
                (Input::Cas { expected, .. }, Output::CasFailed { current }) => MOp::CasFailed {
                    exp: id(expected.as_ref()),
                    obs: obs(current),
                },
                (Input::Cas { expected, new }, Output::Info) => match id(new.as_ref()) {
                    UNOBSERVED => continue,
                    new => MOp::InfoCas {
                        exp: id(expected.as_ref()),
                        new,
                    },
                },
                _ => return Err(malformed(i, "the output does not answer the input")),
            };
            let ret = match (&op.output, op.complete_t) {
                (Output::Info, _) => None,
                (_, None) => return Err(malformed(i, "an ok operation without a completion time")),
                (_, Some(t)) if t < op.invoke_t => {
                    return Err(malformed(i, "completed before it was invoked"));
                }
                (_, Some(t)) => Some(t),
            };
            compiled.ops.push(m);
            compiled.orig.push(i);
            compiled.times.push((op.invoke_t, ret));
        }
        let mut versioned: Vec<(u64, usize)> = (compiled.ops.iter().enumerate())
            .filter_map(|(k, op)| match *op {
                MOp::Write { ver: Some(v), .. } | MOp::CasApplied { ver: Some(v), .. } => {
                    Some((v, k))
                }
                _ => None,
            })
            .collect();
        versioned.sort_unstable();
        compiled.rank = vec![None; compiled.ops.len()];
        for (r, &(_, k)) in versioned.iter().enumerate() {
            compiled.rank[k] = Some(r as u32);
        }
        Ok(compiled)
    }

    fn search(&self, max_states: usize) -> Verdict {
        let n = self.ops.len();
        if n == 0 {
            return Verdict::Linearizable {
                order: Vec::new(),
                states: 0,
            };
        }
        // Entries 1..=2n: call of op k is 2k+1, its return 2k+2. Node 0 is the head.
        let op_of = |e: u32| ((e - 1) / 2) as usize;
        let is_call = |e: u32| e % 2 == 1;
        let mut order: Vec<u32> = (1..=2 * n as u32).collect();
        // Sort by time, calls before returns on ties, +∞ returns last.
        order.sort_by_key(|&e| {
            let (inv, ret) = self.times[op_of(e)];
            if is_call(e) {
                (false, inv, 0u8, e)
            } else {
                match ret {
                    Some(t) => (false, t, 1, e),
                    None => (true, 0, 1, e),
                }
            }
        });
        let size = 2 * n + 1;
        let mut next = vec![NIL; size];
        let mut prev = vec![NIL; size];
        let mut last = HEAD;
        for &e in &order {
            next[last as usize] = e;
            prev[e as usize] = last;
            last = e;
        }
        let infinite = |e: u32| !is_call(e) && self.times[op_of(e)].1.is_none();

        fn unlink(next: &mut [u32], prev: &mut [u32], e: u32) {
            let (p, x) = (prev[e as usize], next[e as usize]);
            next[p as usize] = x;
            if x != NIL {
                prev[x as usize] = p;
            }
        }
        fn relink(next: &mut [u32], prev: &mut [u32], e: u32) {
            let (p, x) = (prev[e as usize], next[e as usize]);
            next[p as usize] = e;
            if x != NIL {
                prev[x as usize] = e;
            }
        }

        // The cache key: the linearized bitset, then the state in two words.
        let words = n.div_ceil(64);
        let mut key = vec![0u64; words + 2];
        let mut cache = Cache::new(words + 2);
        // Zobrist hash of the bitset: the XOR of a random word per linearized op.
        let zobrist: Vec<u64> = (0..n as u64).map(splitmix64).collect();
        let mut bits_hash = 0u64;
        let mut stack: Vec<(u32, State)> = Vec::new();
        // Versions grow along a linearization, so the `ok` writes with recorded versions are
        // linearized in version order: `done` of them are, and only the next one may be.
        let mut done = 0usize;
        let in_turn = |k: usize, done: usize| self.rank[k].is_none_or(|r| r as usize == done);
        let mut state = State::INITIAL;
        let mut best: Option<(Vec<usize>, usize)> = None;
        let mut entry = next[HEAD as usize];

        let to_orig = |stack: &[(u32, State)]| -> Vec<usize> {
            stack.iter().map(|&(e, _)| self.orig[op_of(e)]).collect()
        };

        loop {
            if entry == NIL || infinite(entry) {
                // Every finite return is behind us: everything that must be linearized is.
                return Verdict::Linearizable {
                    order: to_orig(&stack),
                    states: cache.len(),
                };
            }
            let k = op_of(entry);
            if is_call(entry) {
                let step = in_turn(k, done).then(|| state.step(self.ops[k]));
                if let Some(new_state) = step.flatten() {
                    key[k / 64] |= 1 << (k % 64);
                    key[words] = u64::from(new_state.val);
                    key[words + 1] = new_state.ver.encode();
                    let hash = bits_hash
                        ^ zobrist[k]
                        ^ splitmix64(key[words] ^ splitmix64(key[words + 1]));
                    if cache.len() >= max_states {
                        return Verdict::Inconclusive {
                            states: cache.len(),
                        };
                    }
                    if cache.insert(hash, &key) {
                        bits_hash ^= zobrist[k];
                        stack.push((entry, state));
                        state = new_state;
                        done += usize::from(self.rank[k].is_some());
                        unlink(&mut next, &mut prev, entry);
                        unlink(&mut next, &mut prev, entry + 1);
                        entry = next[HEAD as usize];
                        continue;
                    }
                    key[k / 64] &= !(1 << (k % 64));
                }
                entry = next[entry as usize];
            } else {
                // Op k returned and is not linearized: back up.
                if best
                    .as_ref()
                    .is_none_or(|(prefix, _)| stack.len() > prefix.len())
                {
                    best = Some((to_orig(&stack), self.orig[k]));
                }
                let Some((popped, popped_state)) = stack.pop() else {
                    let (prefix, op) = best.unwrap_or((Vec::new(), self.orig[k]));
                    return Verdict::NotLinearizable(Violation {
                        prefix,
                        op,
                        states: cache.len(),
                    });
                };
                state = popped_state;
                let p = op_of(popped);
                done -= usize::from(self.rank[p].is_some());
                key[p / 64] &= !(1 << (p % 64));
                bits_hash ^= zobrist[p];
                relink(&mut next, &mut prev, popped + 1);
                relink(&mut next, &mut prev, popped);
                entry = next[popped as usize];
            }
        }
    }
}

/// The set of explored (linearized bitset, state) configurations: every key stored once, in
/// one flat arena, found by its 64-bit hash and compared in full.
struct Cache {
    /// Words per key.
    width: usize,
    arena: Vec<u64>,
    /// Hash → the newest key with that hash; `chain` links to older ones.
    newest: HashMap<u64, u32, BuildHasherDefault<IdentityHasher>>,
    chain: Vec<u32>,
}

impl Cache {
    fn new(width: usize) -> Cache {
        Cache {
            width,
            arena: Vec::new(),
            newest: HashMap::default(),
            chain: Vec::new(),
        }
    }

    fn len(&self) -> usize {
        self.chain.len()
    }

    /// Adds `key` (whose hash is `hash`); false if it was already there.
    fn insert(&mut self, hash: u64, key: &[u64]) -> bool {
        let id = self.chain.len() as u32;
        let older = match self.newest.entry(hash) {
            Entry::Vacant(slot) => {
                slot.insert(id);
                NIL
            }
            Entry::Occupied(mut slot) => {
                let mut at = *slot.get();
                while at != NIL {
                    let start = at as usize * self.width;
                    if self.arena[start..start + self.width] == *key {
                        return false;
                    }
                    at = self.chain[at as usize];
                }
                slot.insert(id)
            }
        };
        self.chain.push(older);
        self.arena.extend_from_slice(key);
        true
    }
}

/// A hasher for keys that are already uniformly random 64-bit hashes.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) ^ u64::from(b) ^ (self.0 >> 56);
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = word;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// splitmix64's output function: a bijective mix of `x`.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{F, Op, OpResult, OpType};

    /// Builds one key's paired operations; times are in ticks of 1 ms.
    #[derive(Default)]
    struct Ops(Vec<PairedOp>);

    const MS: u64 = 1_000_000;

    fn versioned(v: Option<(&str, u64)>) -> Option<Versioned> {
        v.map(|(value, version)| Versioned {
            value: value.into(),
            version: Some(version),
        })
    }

    impl Ops {
        fn push(
            &mut self,
            proc: u64,
            input: Input,
            output: Output,
            t: (u64, Option<u64>),
        ) -> usize {
            let i = self.0.len() as u64;
            self.0.push(PairedOp {
                proc,
                key: "k".into(),
                input,
                output,
                level: None,
                invoke_t: t.0 * MS,
                complete_t: t.1.map(|c| c * MS),
                invoke_i: 2 * i,
                complete_i: t.1.map(|_| 2 * i + 1),
                node: None,
                err: None,
            });
            self.0.len() - 1
        }

        fn write(&mut self, proc: u64, value: &str, version: u64, t: (u64, u64)) -> usize {
            let input = Input::Write {
                value: value.into(),
            };
            let output = Output::Written {
                version: Some(version),
            };
            self.push(proc, input, output, (t.0, Some(t.1)))
        }

        fn info_write(&mut self, proc: u64, value: &str, t: u64) -> usize {
            let input = Input::Write {
                value: value.into(),
            };
            self.push(proc, input, Output::Info, (t, None))
        }

        fn read(&mut self, proc: u64, seen: Option<(&str, u64)>, t: (u64, u64)) -> usize {
            let output = Output::Read(versioned(seen));
            self.push(proc, Input::Read, output, (t.0, Some(t.1)))
        }

        fn cas(
            &mut self,
            proc: u64,
            expected: Option<&str>,
            new: Option<&str>,
            output: Output,
            t: (u64, u64),
        ) -> usize {
            let input = Input::Cas {
                expected: expected.map(Into::into),
                new: new.map(Into::into),
            };
            self.push(proc, input, output, (t.0, Some(t.1)))
        }

        fn applied(version: u64) -> Output {
            Output::Written {
                version: Some(version),
            }
        }

        fn cas_failed(current: Option<(&str, u64)>) -> Output {
            Output::CasFailed {
                current: versioned(current),
            }
        }

        fn check(&self) -> Verdict {
            check_key(&self.0)
        }

        /// Asserts a violation whose first unlinearizable op is `op` after a prefix of `prefix`.
        fn assert_violation(&self, op: usize, prefix: usize) {
            let verdict = self.check();
            let Verdict::NotLinearizable(v) = &verdict else {
                panic!("expected a violation, got {verdict:?}");
            };
            assert_eq!(
                (v.op, v.prefix_len()),
                (op, prefix),
                "first bad op {} after prefix {:?}",
                self.0[v.op],
                v.prefix
            );
        }

        fn assert_linearizable(&self) -> Vec<usize> {
            match self.check() {
                Verdict::Linearizable { order, .. } => order,
                other => panic!("expected linearizable, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_sequential_history_is_linearizable() {
        let mut h = Ops::default();
        h.read(1, None, (0, 1));
        h.write(1, "a", 3, (2, 3));
        h.read(2, Some(("a", 3)), (4, 5));
        h.write(2, "b", 5, (6, 7));
        h.read(1, Some(("b", 5)), (8, 9));
        assert_eq!(h.assert_linearizable(), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn overlapping_writes_linearize_in_version_order() {
        let mut h = Ops::default();
        h.write(1, "a", 7, (0, 10));
        h.write(2, "b", 6, (1, 11));
        h.read(3, Some(("b", 6)), (2, 12)); // between b and a
        h.read(3, Some(("a", 7)), (13, 14));
        assert_eq!(h.assert_linearizable(), vec![1, 2, 0, 3]);

        // A read after both that sees the lower version is stale.
        let mut h = Ops::default();
        h.write(1, "a", 7, (0, 10));
        h.write(2, "b", 6, (1, 11));
        let stale = h.read(3, Some(("b", 6)), (12, 13));
        h.assert_violation(stale, 2);
    }

    #[test]
    fn cas_success_and_failure() {
        let mut h = Ops::default();
        h.cas(1, None, Some("a"), Ops::applied(2), (0, 1));
        h.cas(2, None, Some("x"), Ops::cas_failed(Some(("a", 2))), (2, 3));
        h.cas(1, Some("a"), Some("b"), Ops::applied(4), (4, 5));
        h.cas(
            2,
            Some("a"),
            Some("y"),
            Ops::cas_failed(Some(("b", 4))),
            (6, 7),
        );
        h.cas(1, Some("b"), None, Ops::applied(5), (8, 9)); // delete
        h.read(2, None, (10, 11));
        h.cas(2, Some("b"), Some("z"), Ops::cas_failed(None), (12, 13));
        h.write(1, "c", 9, (14, 15));
        h.read(2, Some(("c", 9)), (16, 17));
        h.assert_linearizable();
    }

    #[test]
    fn concurrent_cas_only_one_wins() {
        let mut h = Ops::default();
        h.write(1, "a", 1, (0, 1));
        h.cas(2, Some("a"), Some("b"), Ops::applied(2), (2, 10));
        h.cas(
            3,
            Some("a"),
            Some("c"),
            Ops::cas_failed(Some(("b", 2))),
            (3, 11),
        );
        h.read(1, Some(("b", 2)), (12, 13));
        h.assert_linearizable();

        let mut h = Ops::default();
        h.write(1, "a", 1, (0, 1));
        h.cas(2, Some("a"), Some("b"), Ops::applied(2), (2, 10));
        let second = h.cas(3, Some("a"), Some("c"), Ops::applied(3), (3, 11));
        h.assert_violation(second, 2);
    }

    #[test]
    fn an_info_write_may_become_visible_later() {
        let mut h = Ops::default();
        h.write(1, "a", 1, (0, 1));
        h.info_write(2, "b", 2); // timed out: open until the end of time
        h.read(3, Some(("a", 1)), (10, 11));
        h.read(3, Some(("b", 4)), (20, 21)); // it landed later, at log index 4
        h.write(4, "c", 6, (22, 23));
        h.read(3, Some(("c", 6)), (24, 25));
        h.assert_linearizable();
    }

    #[test]
    fn an_info_write_may_never_become_visible() {
        let mut h = Ops::default();
        h.write(1, "a", 1, (0, 1));
        h.info_write(2, "b", 2);
        h.info_write(3, "c", 3);
        h.cas(4, Some("a"), Some("d"), Ops::applied(5), (4, 5));
        h.read(1, Some(("d", 5)), (30, 31));
        h.assert_linearizable();
    }

    #[test]
    fn an_info_cas_may_apply() {
        let mut h = Ops::default();
        h.write(1, "a", 1, (0, 1));
        let input = Input::Cas {
            expected: Some("a".into()),
            new: Some("b".into()),
        };
        h.push(2, input, Output::Info, (2, None));
        h.read(3, Some(("b", 2)), (5, 6));
        h.assert_linearizable();
    }

    #[test]
    fn ops_that_touch_in_time_are_concurrent() {
        let mut h = Ops::default();
        h.write(1, "a", 1, (0, 5));
        h.read(2, None, (5, 6)); // invoked at the instant the write returned
        h.assert_linearizable();
    }

    #[test]
    fn a_stale_read_after_a_completed_write_fails() {
        let mut h = Ops::default();
        h.write(1, "a", 1, (0, 1));
        let stale = h.read(2, None, (2, 3));
        h.assert_violation(stale, 1);
    }

    #[test]
    fn a_read_of_a_value_never_written_fails() {
        let mut h = Ops::default();
        h.write(1, "a", 1, (0, 1));
        h.read(2, Some(("a", 1)), (2, 3));
        let bad = h.read(2, Some(("zzz", 1)), (4, 5));
        h.assert_violation(bad, 2);
    }

    #[test]
    fn a_cas_applied_whose_expected_value_was_not_current_fails() {
        let mut h = Ops::default();
        h.write(1, "a", 1, (0, 1));
        h.write(1, "b", 2, (2, 3));
        let bad = h.cas(2, Some("a"), Some("c"), Ops::applied(3), (4, 5));
        h.assert_violation(bad, 2);
    }

    #[test]
    fn a_cas_failed_that_saw_its_expected_value_fails() {
        let mut h = Ops::default();
        h.write(1, "a", 1, (0, 1));
        let bad = h.cas(
            2,
            Some("a"),
            Some("c"),
            Ops::cas_failed(Some(("b", 1))),
            (2, 3),
        );
        h.assert_violation(bad, 1);
    }

    #[test]
    fn two_values_with_one_version_are_split_brain() {
        let mut h = Ops::default();
        h.write(1, "a", 5, (0, 1));
        let b = h.write(2, "b", 5, (2, 3));
        h.assert_violation(b, 1);

        // Concurrent, each seen by a read: still only one can hold version 5.
        let mut h = Ops::default();
        h.write(1, "a", 5, (0, 10));
        h.write(2, "b", 5, (1, 11));
        h.read(3, Some(("a", 5)), (2, 12));
        h.read(4, Some(("b", 5)), (3, 13));
        assert!(h.check().violation().is_some());

        // The version of an info write is bound by the read that sees it.
        let mut h = Ops::default();
        h.info_write(1, "a", 0);
        h.write(2, "b", 5, (1, 2));
        h.read(3, Some(("a", 5)), (3, 4));
        assert!(h.check().violation().is_some());
    }

    #[test]
    fn one_value_seen_with_two_versions_fails() {
        let mut h = Ops::default();
        h.info_write(1, "a", 0);
        h.read(2, Some(("a", 3)), (1, 2));
        let bad = h.read(2, Some(("a", 4)), (3, 4));
        h.assert_violation(bad, 2);
    }

    #[test]
    fn a_lost_acknowledged_write_fails() {
        let mut h = Ops::default();
        h.write(1, "a", 1, (0, 1));
        h.write(2, "b", 2, (2, 3));
        h.read(3, Some(("b", 2)), (1, 4)); // concurrent with b: fine
        let lost = h.read(3, Some(("a", 1)), (5, 6)); // b was acknowledged before this began
        h.assert_violation(lost, 3);
        let report = Checker::default().check_ops(&h.0).to_string();
        assert!(report.contains("1 NOT linearizable"), "{report}");
        assert!(
            report.contains("longest linearizable prefix: 3 of 4 ops"),
            "{report}"
        );
        assert!(
            report.contains("proc 3 read k → \"a\" (version 1) [lin] at t=0.005000s..0.006000s"),
            "{report}"
        );
    }

    #[test]
    fn an_info_write_seen_and_then_unseen_fails() {
        let mut h = Ops::default();
        h.write(1, "a", 1, (0, 1));
        h.info_write(2, "b", 2);
        h.read(3, Some(("b", 4)), (5, 6));
        let unseen = h.read(3, Some(("a", 1)), (7, 8));
        h.assert_violation(unseen, 3);
    }

    #[test]
    fn fail_ops_and_info_reads_are_left_out() {
        let mut h = Ops::default();
        h.write(1, "a", 1, (0, 1));
        h.push(
            2,
            Input::Write { value: "b".into() },
            Output::Fail,
            (2, Some(3)),
        );
        h.push(3, Input::Read, Output::Info, (4, None));
        h.read(1, Some(("a", 1)), (5, 6));
        assert_eq!(h.assert_linearizable(), vec![0, 3]);

        // A failed write that became visible is a violation: its value was never written.
        let bad = h.read(1, Some(("b", 3)), (7, 8));
        h.assert_violation(bad, 2);
    }

    #[test]
    fn versions_are_wildcards_when_not_recorded() {
        let mut h = Ops::default();
        h.push(
            1,
            Input::Write { value: "a".into() },
            Output::Written { version: None },
            (0, Some(1)),
        );
        h.push(
            2,
            Input::Read,
            Output::Read(Some(Versioned {
                value: "a".into(),
                version: None,
            })),
            (2, Some(3)),
        );
        h.read(2, Some(("a", 17)), (4, 5));
        h.write(1, "b", 18, (6, 7));
        h.assert_linearizable();
    }

    #[test]
    fn malformed_ops_are_reported() {
        let mut h = Ops::default();
        h.push(
            1,
            Input::Read,
            Output::Written { version: Some(1) },
            (0, Some(1)),
        );
        assert!(matches!(h.check(), Verdict::Malformed { op: 0, .. }));
        let mut h = Ops::default();
        h.read(1, None, (5, 4));
        assert!(matches!(h.check(), Verdict::Malformed { op: 0, .. }));
    }

    #[test]
    fn the_level_filter_decides_which_reads_enter() {
        let mut h = Ops::default();
        h.write(1, "a", 1, (0, 1));
        let stale = h.read(2, None, (2, 3));
        h.0[stale].level = Some(Level::Ev);
        let report = Checker::default().check_ops(&h.0);
        assert!(report.is_linearizable(), "{report}");
        assert_eq!(report.reads_left_out, 1);

        let checker = Checker {
            levels: LevelFilter::only([LevelKind::Ev]),
            ..Checker::default()
        };
        let report = checker.check_ops(&h.0);
        assert!(!report.is_linearizable(), "{report}");
        let bad = report.key("k").and_then(KeyReport::first_bad_op);
        assert_eq!(bad, Some(&h.0[stale]));
    }

    #[test]
    fn keys_are_checked_separately_from_a_jsonl_history() {
        // k1 is fine; k2 has a stale read.
        let mut ops = Vec::new();
        let mut i = 0;
        let mut t = 0;
        let mut event = |proc: u64, f: F, key: &str, value: Option<&str>, res: Option<OpResult>| {
            let mut inv = Op::invoke(i, t, proc, f, key);
            inv.value = value.map(Into::into);
            let done = res.map(|res| Op::complete(&inv, i + 1, t + 5, OpType::Ok, res));
            ops.push(inv);
            ops.extend(done);
            i += 2;
            t += 10;
        };
        let version = |v| OpResult {
            version: Some(v),
            ..OpResult::default()
        };
        let seen = |value: &str, v| OpResult {
            value: Some(value.into()),
            version: Some(v),
            ..OpResult::default()
        };
        event(1, F::Write, "k1", Some("1-1"), Some(version(1)));
        event(2, F::Write, "k2", Some("2-1"), Some(version(1)));
        event(1, F::Read, "k1", None, Some(seen("1-1", 1)));
        event(2, F::Write, "k2", Some("2-2"), Some(version(2)));
        event(1, F::Read, "k2", None, Some(seen("2-1", 1)));
        event(3, F::Write, "k1", Some("3-1"), None); // never completes: info
        let report = check(&History::from_ops(ops), &LevelFilter::linearizable()).unwrap();
        assert_eq!(report.keys.len(), 2);
        assert!(report.key("k1").unwrap().verdict.is_linearizable());
        let k2 = report.key("k2").unwrap();
        assert_eq!(k2.first_bad_op().map(|op| op.invoke_i), Some(8));
        assert_eq!(report.violations().count(), 1);
    }

    /// `clients` processes run `rounds` rounds of fully concurrent writes; `infos` writes never
    /// return; then one read sees the first round's value (stale) or the last write's (valid).
    /// With `versions`, writes carry their log index (assigned in reverse client order per
    /// round); without, nothing is recorded and only values constrain the order. With
    /// `observed_infos`, a failed CAS at the end expects each open write's value, so the open
    /// writes are not pruned and the search must place them.
    fn rounds(
        clients: u64,
        rounds: u64,
        infos: u64,
        versions: bool,
        stale: bool,
        observed_infos: bool,
    ) -> Ops {
        let mut h = Ops::default();
        let mut t = 0;
        let version = |v: u64| versions.then_some(v);
        let written = |v: Option<u64>| Output::Written { version: v };
        for p in 0..infos {
            let input = Input::Write {
                value: format!("info-{p}"),
            };
            h.push(100 + p, input, Output::Info, (t, None));
        }
        let mut log = 0;
        let mut last = (String::new(), None);
        let mut first = (String::new(), None);
        for r in 0..rounds {
            let start = t + 1;
            let end = start + clients + 1;
            for c in 0..clients {
                let v = version(log + clients - c);
                let value = format!("{r}-{c}");
                if r == 0 && c == clients - 1 {
                    first = (value.clone(), v);
                }
                if c == 0 {
                    last = (value.clone(), v);
                }
                h.push(
                    c,
                    Input::Write { value },
                    written(v),
                    (start + c, Some(end + c)),
                );
            }
            log += clients;
            t = end + clients;
        }
        let (value, version) = if stale { first } else { last };
        let seen = Some(Versioned { value, version });
        h.push(
            clients,
            Input::Read,
            Output::Read(seen.clone()),
            (t + 1, Some(t + 2)),
        );
        for p in (0..infos).filter(|_| observed_infos) {
            let input = Input::Cas {
                expected: Some(format!("info-{p}")),
                new: Some("never".into()),
            };
            let output = Output::CasFailed {
                current: seen.clone(),
            };
            h.push(clients, input, output, (t + 3 + 2 * p, Some(t + 4 + 2 * p)));
        }
        h
    }

    #[test]
    fn a_violating_history_of_41_concurrent_ops_is_fast() {
        // jepsen.md §4: stateright needed 19 ms for 4×10, 6.9 s with 2 never-returning writes.
        for versions in [true, false] {
            for observed_infos in [false, true] {
                let h = rounds(4, 10, 2, versions, true, observed_infos);
                assert!(h.check().violation().is_some(), "versions: {versions}");
                let h = rounds(4, 10, 2, versions, false, observed_infos);
                h.assert_linearizable();
            }
        }
    }

    /// jepsen.md §4's largest case: 10×50 + 4 never-returning writes (505 ops). Timing belongs
    /// in benchmarks; run with `cargo test --release -- --ignored --nocapture` to see it.
    #[test]
    #[ignore = "performance: run explicitly"]
    fn perf_10_clients_50_rounds_4_open_writes() {
        for (versions, stale, observed_infos) in [
            (true, true, false),
            (true, false, false),
            (false, true, false),
            (false, false, false),
            (true, true, true),
            (false, true, true),
        ] {
            {
                let h = rounds(10, 50, 4, versions, stale, observed_infos);
                let started = std::time::Instant::now();
                let verdict = h.check();
                let states = match &verdict {
                    Verdict::Linearizable { states, .. } => *states,
                    Verdict::NotLinearizable(v) => v.states,
                    other => panic!("{other:?}"),
                };
                println!(
                    "10x50+4 versions={versions} stale={stale} observed_infos={observed_infos}: \
                     {} in {:?}, {states} states",
                    if verdict.is_linearizable() {
                        "linearizable"
                    } else {
                        "violation"
                    },
                    started.elapsed()
                );
                assert_eq!(verdict.is_linearizable(), !stale);
            }
        }
    }
}
