//! Differential test of the linearizability checker (`kvnode_jepsen::linearizability`)
//! against stateright 0.31's `LinearizabilityTester`, an independent, unmemoized search, on
//! random small histories of one versioned CAS register (jepsen.md §5).
//!
//! Histories come from a simulated register: up to 3 processes run up to 12 reads, writes and
//! CAS with random overlap; each operation takes effect at a random point between its
//! invocation and completion, some end `fail` (no effect) and some `info` (the process moves on
//! as a fresh one, and the operation takes effect later or never). Those histories are valid;
//! about half are then mutated (a read's or failed CAS's observation, a version, a CAS outcome)
//! and are usually invalid. Every history goes through JSONL, `History::pair` and both checkers,
//! which must agree; a linearizable verdict's witness order is replayed and checked too.
//!
//! `JEPSEN_CHECKER_SEED=<n>` reruns with another seed; `JEPSEN_CHECKER_HISTORIES=<n>` changes
//! the count.

use std::collections::BTreeMap;
use std::path::Path;

use kvnode_jepsen::history::{
    F, History, Input, Op, OpResult, OpType, Output, PairedOp, Versioned,
};
use kvnode_jepsen::linearizability::{LevelFilter, Verdict, check};
use kvnode_testkit::Rng;
use stateright::semantics::{ConsistencyTester, LinearizabilityTester, SequentialSpec};

// ---------------------------------------------------------------------------------------------
// The reference: a versioned CAS register as a stateright `SequentialSpec`, written directly
// from the model's definition (strings, no interning, no pruning).

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RefVersion {
    Known(u64),
    /// Written by an operation whose version is unknown: at least this.
    AtLeast(u64),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct CasRegister {
    value: Option<String>,
    version: RefVersion,
}

impl Default for CasRegister {
    fn default() -> CasRegister {
        CasRegister {
            value: None,
            version: RefVersion::Known(0),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum RegOp {
    Read,
    Write(String),
    Cas(Option<String>, Option<String>),
}

/// What an operation returned; `Unknown` for operations still in flight (`info`).
#[derive(Clone, Debug, PartialEq, Eq)]
enum RegRet {
    Read(Option<(String, Option<u64>)>),
    Written(Option<u64>),
    CasFailed(Option<(String, Option<u64>)>),
    Unknown,
}

impl CasRegister {
    /// Sets the value with a new version: `created` if known (it must exceed the current one).
    fn set(&mut self, value: Option<String>, created: Option<u64>) -> bool {
        let floor = match self.version {
            RefVersion::Known(v) | RefVersion::AtLeast(v) => v,
        };
        self.version = match created {
            Some(w) if w > floor => RefVersion::Known(w),
            Some(_) => return false,
            None => RefVersion::AtLeast(floor + 1),
        };
        self.value = value;
        true
    }

    fn sees(&mut self, observed: &Option<(String, Option<u64>)>) -> bool {
        match observed {
            None => self.value.is_none(),
            Some((value, version)) => {
                if self.value.as_ref() != Some(value) {
                    return false;
                }
                match (self.version, version) {
                    (_, None) => true,
                    (RefVersion::Known(v), Some(r)) => v == *r,
                    (RefVersion::AtLeast(m), Some(r)) => {
                        self.version = RefVersion::Known(*r);
                        *r >= m
                    }
                }
            }
        }
    }
}

impl SequentialSpec for CasRegister {
    type Op = RegOp;
    type Ret = RegRet;

    /// Only called for operations that never returned: apply the effect, version unknown.
    fn invoke(&mut self, op: &RegOp) -> RegRet {
        match op {
            RegOp::Read => {}
            RegOp::Write(v) => {
                self.set(Some(v.clone()), None);
            }
            RegOp::Cas(expected, new) => {
                if self.value == *expected {
                    self.set(new.clone(), None);
                }
            }
        }
        RegRet::Unknown
    }

    fn is_valid_step(&mut self, op: &RegOp, ret: &RegRet) -> bool {
        match (op, ret) {
            (_, RegRet::Unknown) => {
                self.invoke(op);
                true
            }
            (RegOp::Read, RegRet::Read(observed)) => self.sees(observed),
            (RegOp::Write(v), RegRet::Written(version)) => self.set(Some(v.clone()), *version),
            (RegOp::Cas(expected, new), RegRet::Written(version)) => {
                self.value == *expected && self.set(new.clone(), *version)
            }
            (RegOp::Cas(expected, _), RegRet::CasFailed(current)) => {
                self.value != *expected && self.sees(current)
            }
            _ => false,
        }
    }
}

fn reg_op(op: &PairedOp) -> RegOp {
    match &op.input {
        Input::Read => RegOp::Read,
        Input::Write { value } => RegOp::Write(value.clone()),
        Input::Cas { expected, new } => RegOp::Cas(expected.clone(), new.clone()),
    }
}

fn pair(v: &Option<Versioned>) -> Option<(String, Option<u64>)> {
    v.as_ref().map(|v| (v.value.clone(), v.version))
}

fn reg_ret(op: &PairedOp) -> Option<RegRet> {
    Some(match &op.output {
        Output::Read(seen) => RegRet::Read(pair(seen)),
        Output::Written { version } => RegRet::Written(*version),
        Output::CasFailed { current } => RegRet::CasFailed(pair(current)),
        Output::Info => RegRet::Unknown,
        Output::Fail => return None,
    })
}

/// The ops stateright sees: `fail` ops and `info` reads are left out, as in our checker.
fn enters(op: &PairedOp) -> bool {
    match op.output {
        Output::Fail => false,
        Output::Info => op.input != Input::Read,
        _ => true,
    }
}

/// stateright's verdict. Every process is a thread; after an `info` the generator already moved
/// the worker to a fresh process, so no thread invokes twice while one op is in flight.
fn stateright_verdict(ops: &[PairedOp]) -> bool {
    let mut events: Vec<(u64, bool, usize)> = Vec::new();
    for (k, op) in ops.iter().enumerate().filter(|(_, op)| enters(op)) {
        events.push((op.invoke_t, false, k));
        if let Some(t) = op.complete_t {
            events.push((t, true, k));
        }
    }
    // Calls before returns on ties, as our checker orders them.
    events.sort();
    let mut tester = LinearizabilityTester::<u64, CasRegister>::new(CasRegister::default());
    for (_, is_return, k) in events {
        let op = &ops[k];
        let recorded = if is_return {
            let ret = reg_ret(op).expect("fail ops were left out");
            tester.on_return(op.proc, ret).map(|_| ())
        } else {
            tester.on_invoke(op.proc, reg_op(op)).map(|_| ())
        };
        if let Err(e) = recorded {
            panic!("stateright rejected the history as malformed: {e}");
        }
    }
    tester.is_consistent()
}

/// Replays our witness: a legal sequence of steps, in an order real time allows, with every
/// completed op in it.
fn check_witness(ops: &[PairedOp], order: &[usize]) -> Result<(), String> {
    let mut register = CasRegister::default();
    for (pos, &k) in order.iter().enumerate() {
        let op = &ops[k];
        let ret = reg_ret(op).ok_or(format!("fail op {k} in the witness"))?;
        if !register.is_valid_step(&reg_op(op), &ret) {
            return Err(format!(
                "op {k} ({op}) is not a legal step at position {pos}"
            ));
        }
        for &later in &order[pos + 1..] {
            if ops[later].complete_t.is_some_and(|t| t < op.invoke_t) {
                return Err(format!("op {later} returned before op {k} began"));
            }
        }
    }
    for (k, op) in ops.iter().enumerate() {
        if enters(op) && op.complete_t.is_some() && !order.contains(&k) {
            return Err(format!("completed op {k} ({op}) missing from the witness"));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The simulated register.

struct Pending {
    /// Index of the invocation event.
    event: usize,
    proc: u64,
    f: F,
    value: Option<String>,
    expected: Option<String>,
    fate: OpType,
    /// Set when it took effect (or, for fail ops, when it was decided not to).
    result: Option<OpResult>,
    /// An `info` op whose process moved on: it may still take effect, or never.
    abandoned: bool,
}

/// A valid history of one key, as JSONL events (times in whole milliseconds).
fn simulate(rng: &mut Rng, versions: bool) -> Vec<Op> {
    let procs = 1 + rng.below(3);
    let budget = 4 + rng.below(9);
    // Idle processes, with the time their last op completed: a process invokes strictly later
    // (at one instant, calls sort before returns, which would overlap its own ops).
    let mut idle: Vec<(u64, u64)> = (0..procs).map(|p| (p, 0)).collect();
    let mut next_proc = procs;
    let mut last_seen: BTreeMap<u64, Option<String>> = BTreeMap::new();
    let mut events: Vec<Op> = Vec::new();
    let mut pending: Vec<Pending> = Vec::new();
    let mut started = 0;
    let mut written: Vec<String> = Vec::new();
    let (mut value, mut version): (Option<String>, u64) = (None, 0);
    let mut log = 0;
    let mut t = 0u64;
    loop {
        let in_flight = pending.iter().filter(|p| !p.abandoned).count();
        if started == budget && in_flight == 0 {
            break;
        }
        // Ties happen: a call and a return at one instant are concurrent (calls first).
        t += rng.below(3) * 1_000_000;
        let i = events.len() as u64;
        let action = rng.below(3);
        let ready: Vec<usize> = (0..idle.len()).filter(|&k| idle[k].1 < t).collect();
        if action == 0 && started < budget && !ready.is_empty() {
            // Invoke.
            let (proc, _) = idle.swap_remove(rng.pick(&ready));
            let f = rng.pick(&[F::Read, F::Read, F::Write, F::Cas, F::Cas]);
            let mut op = Op::invoke(i, t, proc, f, "k");
            let fresh = format!("{proc}-{i}");
            match f {
                F::Read => {}
                F::Write => op.value = Some(fresh),
                F::Cas => {
                    op.expected = match rng.below(10) {
                        0..6 => last_seen.get(&proc).cloned().flatten(),
                        6..8 if !written.is_empty() => Some(rng.pick(&written)),
                        _ => None,
                    };
                    op.value = (!rng.chance(10)).then_some(fresh);
                }
            }
            if let Some(v) = &op.value {
                written.push(v.clone());
            }
            let fate = match rng.below(100) {
                0..75 => OpType::Ok,
                75..87 => OpType::Info,
                _ => OpType::Fail,
            };
            pending.push(Pending {
                event: events.len(),
                proc,
                f,
                value: op.value.clone(),
                expected: op.expected.clone(),
                fate,
                result: None,
                abandoned: false,
            });
            events.push(op);
            started += 1;
        } else if action == 1 && !pending.is_empty() {
            // Take effect (or, for fail ops and some info ops, decide never to).
            let k = rng.below(pending.len() as u64) as usize;
            let p = &mut pending[k];
            if p.result.is_some() {
                continue;
            }
            let never = p.fate == OpType::Fail || (p.fate == OpType::Info && rng.chance(40));
            let mut res = OpResult::default();
            if !never {
                let applies = match p.f {
                    F::Read => false,
                    F::Write => true,
                    F::Cas => value == p.expected,
                };
                if applies {
                    log += 1 + rng.below(3); // other keys' writes share the shard's log
                    value = p.value.clone();
                    version = log;
                    res.version = Some(log);
                } else {
                    res.cas_failed = p.f == F::Cas;
                    res.value = value.clone();
                    res.version = value.as_ref().map(|_| version);
                }
                if !versions {
                    res.version = None;
                }
            }
            p.result = Some(res);
            if p.abandoned {
                pending.swap_remove(k);
            }
        } else if action == 2 {
            // Complete an op in flight.
            let ready: Vec<usize> = (0..pending.len())
                .filter(|&k| {
                    let p = &pending[k];
                    !p.abandoned && (p.result.is_some() || p.fate != OpType::Ok)
                })
                .collect();
            if ready.is_empty() {
                continue;
            }
            let k = rng.pick(&ready);
            let p = &mut pending[k];
            let invocation = events[p.event].clone();
            match p.fate {
                OpType::Info => {
                    // The worker gives up and goes on as a fresh process; the op may still land.
                    if rng.chance(50) {
                        let done =
                            Op::complete(&invocation, i, t, OpType::Info, OpResult::default());
                        events.push(done);
                    }
                    idle.push((next_proc, t));
                    let seen = last_seen.get(&p.proc).cloned().flatten();
                    last_seen.insert(next_proc, seen);
                    next_proc += 1;
                    p.abandoned = true;
                    if p.result.is_some() {
                        pending.swap_remove(k);
                    }
                }
                fate => {
                    let res = if fate == OpType::Ok {
                        p.result.clone().unwrap_or_default()
                    } else {
                        OpResult::default()
                    };
                    if fate == OpType::Ok && (p.f == F::Read || res.cas_failed) {
                        last_seen.insert(p.proc, res.value.clone());
                    }
                    let done = Op::complete(&invocation, i, t, fate, res);
                    events.push(done);
                    idle.push((p.proc, t));
                    pending.swap_remove(k);
                }
            }
        }
    }
    events
}

/// Mutates one completion so the history is (usually) no longer linearizable; returns what
/// it did, or `None` if there was nothing to mutate.
fn mutate(rng: &mut Rng, events: &mut [Op]) -> Option<&'static str> {
    let observers: Vec<usize> = (0..events.len())
        .filter(|&k| {
            events[k].kind == OpType::Ok && (events[k].f == F::Read || events[k].res.cas_failed)
        })
        .collect();
    let writes: Vec<usize> = (0..events.len())
        .filter(|&k| {
            events[k].kind == OpType::Ok && events[k].f != F::Read && !events[k].res.cas_failed
        })
        .collect();
    let values: Vec<String> = events.iter().filter_map(|e| e.value.clone()).collect();
    let versions: Vec<u64> = events.iter().filter_map(|e| e.res.version).collect();
    match rng.below(10) {
        0..7 if !observers.is_empty() => {
            let res = &mut events[rng.pick(&observers)].res;
            match rng.below(5) {
                0 => {
                    res.value = None;
                    res.version = None;
                    Some("observation → absent")
                }
                1 => {
                    res.value = Some("bogus".into());
                    Some("observation → a value never written")
                }
                2 if res.version.is_some() => {
                    res.version = res.version.map(|v| {
                        if rng.chance(50) {
                            v + 1
                        } else {
                            v.saturating_sub(1)
                        }
                    });
                    Some("observation → another version")
                }
                _ if !values.is_empty() => {
                    res.value = Some(rng.pick(&values));
                    if !versions.is_empty() && res.version.is_some() {
                        res.version = Some(rng.pick(&versions));
                    }
                    Some("observation → another written value")
                }
                _ => None,
            }
        }
        7 | 8 if !writes.is_empty() && !versions.is_empty() => {
            let res = &mut events[rng.pick(&writes)].res;
            res.version.as_ref()?;
            res.version = Some(rng.pick(&versions));
            Some("write version → another op's version")
        }
        _ => {
            let cas: Vec<usize> = (0..events.len())
                .filter(|&k| events[k].kind == OpType::Ok && events[k].f == F::Cas)
                .collect();
            if cas.is_empty() {
                return None;
            }
            let res = &mut events[rng.pick(&cas)].res;
            res.cas_failed = !res.cas_failed;
            Some("CAS outcome flipped")
        }
    }
}

#[test]
fn the_checker_agrees_with_stateright_on_random_small_histories() {
    let seed: u64 = std::env::var("JEPSEN_CHECKER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6b76_6e6f_6465);
    let count: usize = std::env::var("JEPSEN_CHECKER_HISTORIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    println!("seed {seed} (rerun with JEPSEN_CHECKER_SEED={seed}), {count} histories");
    let mut rng = Rng::new(seed);
    let (mut valid, mut invalid, mut mutated_still_valid, mut with_info) = (0, 0, 0, 0);
    let started = std::time::Instant::now();
    for n in 0..count {
        let versions = rng.chance(80);
        let mut events = simulate(&mut rng, versions);
        let mutation = if rng.chance(50) {
            mutate(&mut rng, &mut events)
        } else {
            None
        };

        // Through JSONL and back, then paired.
        let mut jsonl = Vec::new();
        History::from_ops(events.clone())
            .write_to(&mut jsonl, Path::new("generated"))
            .unwrap();
        let history = History::read_from(&jsonl[..], Path::new("generated")).unwrap();
        let ops = history.pair().unwrap();
        if ops.iter().any(|op| op.output == Output::Info) {
            with_info += 1;
        }

        let report = check(&history, &LevelFilter::linearizable()).unwrap();
        let ours = match report.keys.first().map(|k| &k.verdict) {
            None => true,
            Some(Verdict::Linearizable { order, .. }) => {
                let key_ops = &report.keys[0].ops;
                if let Err(e) = check_witness(key_ops, order) {
                    panic!(
                        "history {n}: bad witness: {e}\n{}",
                        String::from_utf8_lossy(&jsonl)
                    );
                }
                true
            }
            Some(Verdict::NotLinearizable(_)) => false,
            Some(other) => panic!("history {n}: {other:?}"),
        };
        let theirs = stateright_verdict(&ops);
        assert_eq!(
            ours,
            theirs,
            "history {n} (seed {seed}, mutation {mutation:?}): ours says linearizable={ours}, \
             stateright says {theirs}\n{report}\n{}",
            String::from_utf8_lossy(&jsonl)
        );
        if mutation.is_none() {
            assert!(
                ours,
                "history {n}: an unmutated history must be linearizable\n{report}"
            );
        }
        if ours {
            valid += 1;
            if mutation.is_some() {
                mutated_still_valid += 1;
            }
        } else {
            invalid += 1;
        }
    }
    println!(
        "{count} histories in {:?}: both checkers agree on all; {valid} linearizable \
         ({mutated_still_valid} of them mutated), {invalid} not linearizable; {with_info} with info ops",
        started.elapsed()
    );
    assert!(invalid >= count / 5, "too few invalid histories: {invalid}");
    assert!(
        with_info >= count / 5,
        "too few histories with info ops: {with_info}"
    );
}
