//! The nemesis: a seeded schedule of faults (`docs/design/jepsen.md` §3.4) and its
//! execution against the run's processes and network.
//!
//! Each fault family (`partition`, `kill`, `pause`) has its own timeline: a fault starts, is
//! held for the interval ±50%, is undone, and the family stays quiet for another interval
//! ±50%. Families run independently, so their faults overlap (a partition during a kill, a
//! pause inside a partition). The schedule (times, families, shapes and the random picks
//! that choose targets) is a pure function of the seed; targets that depend on the live
//! cluster (`primaries`: a shard's current leader) are resolved when the fault starts, from
//! the same pick.
//!
//! Every start and stop is recorded in the history as a nemesis line whose `info` names the
//! shape, the nodes hit and, for partitions, the cut links.
//!
//! `apply-lag` is different: the nodes inject it themselves (test builds only, see
//! `kvnode::raft::apply_stall`, switched on by `KVNODE_APPLY_LAG` when the nodes start), in
//! windows fixed on the wall clock; [`record_apply_lag`] writes those windows into the history
//! as they happen, so they show like any other fault.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::watch;

use super::history::OpType;
use super::net::Net;
use super::probe::Probe;
use super::processes::Processes;
use super::recorder::Recorder;
use kvnode_testkit::Rng;

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// Network partitions (per-pair packet drops).
    Partition,
    /// `kill -9` and restart.
    Kill,
    /// SIGSTOP and SIGCONT.
    Pause,
    /// Shard leaders whose applies lag their commits: periodic windows in which every node
    /// holds the applies of the shards it leads (see [`ApplyLag`]; not in [`Family::ALL`]).
    ApplyLag,
}

impl Family {
    /// The families scheduled by [`Schedule::generate`] (the default nemesis).
    pub const ALL: [Family; 3] = [Family::Partition, Family::Kill, Family::Pause];

    /// Every family `--nemesis` accepts.
    pub const KNOWN: [Family; 4] = [
        Family::Partition,
        Family::Kill,
        Family::Pause,
        Family::ApplyLag,
    ];

    /// The family's name as `--nemesis` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Family::Partition => "partition",
            Family::Kill => "kill",
            Family::Pause => "pause",
            Family::ApplyLag => "apply-lag",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown fault family.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown nemesis {0:?}: expected partition, kill, pause or apply-lag")]
pub struct UnknownFamily(pub String);

/// The member of `all` whose `name` is `s` (trimmed).
fn by_name<T: Copy>(all: &[T], name: fn(T) -> &'static str, s: &str) -> Option<T> {
    all.iter().copied().find(|x| name(*x) == s.trim())
}

impl FromStr for Family {
    type Err = UnknownFamily;

    fn from_str(s: &str) -> Result<Family, UnknownFamily> {
        by_name(&Family::KNOWN, Family::name, s).ok_or_else(|| UnknownFamily(s.to_string()))
    }
}

/// The shape of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// One node cut off from all others.
    One,
    /// A minority cut off from a majority.
    Majority,
    /// Every node sees a majority, and no two see the same one.
    MajoritiesRing,
    /// Two halves that only one node (the bridge) connects.
    Bridge,
    /// The leader of one shard cut off from all others.
    Primaries,
    /// One node hears nothing but can still send (or sends nothing but still hears).
    Oneway,
}

impl Shape {
    /// Every shape.
    pub const ALL: [Shape; 6] = [
        Shape::One,
        Shape::Majority,
        Shape::MajoritiesRing,
        Shape::Bridge,
        Shape::Primaries,
        Shape::Oneway,
    ];

    /// The shape's name as `--partitions` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Shape::One => "one",
            Shape::Majority => "majority",
            Shape::MajoritiesRing => "majorities-ring",
            Shape::Bridge => "bridge",
            Shape::Primaries => "primaries",
            Shape::Oneway => "oneway",
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown partition shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown partition {0:?}: expected one, majority, majorities-ring, bridge, primaries or oneway"
)]
pub struct UnknownShape(pub String);

impl FromStr for Shape {
    type Err = UnknownShape;

    fn from_str(s: &str) -> Result<Shape, UnknownShape> {
        by_name(&Shape::ALL, Shape::name, s).ok_or_else(|| UnknownShape(s.to_string()))
    }
}

/// Which nodes a process fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Targets {
    /// One node.
    One,
    /// A minority of the nodes.
    Minority,
    /// A majority of the nodes.
    Majority,
    /// Every node.
    All,
    /// The leader of one shard.
    Primaries,
}

impl Targets {
    fn name(self) -> &'static str {
        match self {
            Targets::One => "one",
            Targets::Minority => "minority",
            Targets::Majority => "majority",
            Targets::All => "all",
            Targets::Primaries => "primaries",
        }
    }
}

/// One fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Cut links.
    Partition(Shape),
    /// Kill processes; restart them when the fault ends.
    Kill(Targets),
    /// Pause processes; resume them when the fault ends.
    Pause(Targets),
}

impl Fault {
    /// The fault's family.
    pub fn family(self) -> Family {
        match self {
            Fault::Partition(_) => Family::Partition,
            Fault::Kill(_) => Family::Kill,
            Fault::Pause(_) => Family::Pause,
        }
    }

    /// The shape or targets, as the history names them.
    pub fn target_name(self) -> &'static str {
        match self {
            Fault::Partition(s) => s.name(),
            Fault::Kill(t) | Fault::Pause(t) => t.name(),
        }
    }
}

/// One scheduled fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// When it starts, from the start of the run.
    pub start: Duration,
    /// How long it is held.
    pub hold: Duration,
    /// What it is.
    pub fault: Fault,
    /// The random number that picks its concrete targets.
    pub pick: u64,
}

/// A run's faults, a pure function of the seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// The seed.
    pub seed: u64,
    /// The faults, by start time.
    pub steps: Vec<Step>,
}

impl Schedule {
    /// The faults of `families` over `duration`, about one every `interval` per family;
    /// partitions take the shapes in `shapes` (all of them if it is empty). `apply-lag` has no
    /// steps here: its windows are periodic (see [`ApplyLag`]).
    pub fn generate(
        seed: u64,
        families: &[Family],
        shapes: &[Shape],
        duration: Duration,
        interval: Duration,
    ) -> Schedule {
        let shapes: &[Shape] = if shapes.is_empty() {
            &Shape::ALL
        } else {
            shapes
        };
        let mut steps = Vec::new();
        let jitter = |rng: &mut Rng| {
            // interval × [0.5, 1.5]
            interval.mul_f64(0.5 + rng.range(0, 1000) as f64 / 1000.0)
        };
        let mut families: Vec<Family> = families.to_vec();
        families.sort();
        families.dedup();
        for family in families {
            let mut rng = Rng::new(seed ^ (family as u64 + 1).wrapping_mul(0x5851_f42d_4c95_7f2d));
            // The first fault comes after a short warm-up, staggered per family.
            let mut t = interval.mul_f64(0.2) + jitter(&mut rng) / 2;
            loop {
                let hold = jitter(&mut rng);
                if t + hold > duration {
                    break;
                }
                let fault = match family {
                    Family::Partition => {
                        Fault::Partition(shapes[rng.range(0, shapes.len() as u64 - 1) as usize])
                    }
                    Family::Kill => {
                        const KILL: [Targets; 5] = [
                            Targets::One,
                            Targets::Minority,
                            Targets::Majority,
                            Targets::All,
                            Targets::Primaries,
                        ];
                        Fault::Kill(KILL[rng.range(0, KILL.len() as u64 - 1) as usize])
                    }
                    Family::Pause => {
                        const PAUSE: [Targets; 3] =
                            [Targets::One, Targets::Minority, Targets::Primaries];
                        Fault::Pause(PAUSE[rng.range(0, PAUSE.len() as u64 - 1) as usize])
                    }
                    // Periodic windows, injected by the nodes themselves.
                    Family::ApplyLag => break,
                };
                steps.push(Step {
                    start: t,
                    hold,
                    fault,
                    pick: rng.next_u64(),
                });
                t += hold + jitter(&mut rng);
            }
        }
        steps.sort_by_key(|s| s.start);
        Schedule { seed, steps }
    }
}

/// `ids` in an order shuffled by `pick`.
fn shuffled(ids: &[u64], pick: u64) -> Vec<u64> {
    let mut rng = Rng::new(pick);
    let mut v = ids.to_vec();
    for i in (1..v.len()).rev() {
        let j = rng.range(0, i as u64) as usize;
        v.swap(i, j);
    }
    v
}

/// The leader `pick` chooses among the known shard leaders, if any is known.
fn primary(leaders: &BTreeMap<u64, u64>, pick: u64) -> Option<(u64, u64)> {
    if leaders.is_empty() {
        return None;
    }
    let (shard, node) = leaders.iter().nth((pick % leaders.len() as u64) as usize)?;
    Some((*shard, *node))
}

/// Both directions between every node of `a` and every node of `b`.
fn cut_between(a: &[u64], b: &[u64]) -> BTreeSet<(u64, u64)> {
    let mut cuts = BTreeSet::new();
    for &x in a {
        for &y in b {
            if x != y {
                cuts.insert((x, y));
                cuts.insert((y, x));
            }
        }
    }
    cuts
}

/// The links a partition of `shape` cuts, as (from, to) pairs, and a description of it.
pub fn grudge(
    shape: Shape,
    ids: &[u64],
    leaders: &BTreeMap<u64, u64>,
    pick: u64,
) -> (BTreeSet<(u64, u64)>, serde_json::Value) {
    let order = shuffled(ids, pick);
    let n = order.len();
    let isolate = |node: u64| {
        let others: Vec<u64> = ids.iter().copied().filter(|&x| x != node).collect();
        cut_between(&[node], &others)
    };
    match shape {
        Shape::One => {
            let node = order[0];
            (isolate(node), json!({"isolated": [node]}))
        }
        Shape::Primaries => match primary(leaders, pick) {
            Some((shard, node)) => (
                isolate(node),
                json!({"isolated": [node], "leader_of_shard": shard}),
            ),
            None => {
                let node = order[0];
                (
                    isolate(node),
                    json!({"isolated": [node], "leader_of_shard": null}),
                )
            }
        },
        Shape::Majority => {
            let (minority, majority) = order.split_at(n / 2);
            (
                cut_between(minority, majority),
                json!({"minority": minority, "majority": majority}),
            )
        }
        Shape::Bridge => {
            let half = n / 2;
            let (a, rest) = order.split_at(half);
            let (bridge, b) = rest.split_at(1.min(rest.len()));
            (
                cut_between(a, b),
                json!({"sides": [a, b], "bridge": bridge}),
            )
        }
        Shape::MajoritiesRing => {
            // Ring order; each node keeps the links to nodes within `reach` places.
            let majority = n / 2 + 1;
            let reach = majority / 2;
            let mut cuts = BTreeSet::new();
            for i in 0..n {
                for j in 0..n {
                    let d = i.abs_diff(j);
                    let ring = d.min(n - d);
                    if i != j && ring > reach {
                        cuts.insert((order[i], order[j]));
                    }
                }
            }
            if cuts.is_empty() && n >= 3 {
                // Three nodes: cutting one link leaves each node a different majority.
                cuts = cut_between(&order[..1], &order[1..2]);
            }
            let sees: BTreeMap<String, Vec<u64>> = ids
                .iter()
                .map(|&x| {
                    let seen = ids
                        .iter()
                        .copied()
                        .filter(|&y| x == y || !cuts.contains(&(y, x)))
                        .collect();
                    (x.to_string(), seen)
                })
                .collect();
            (cuts, json!({"ring": order, "sees": sees}))
        }
        Shape::Oneway => {
            let node = order[0];
            let others: Vec<u64> = ids.iter().copied().filter(|&x| x != node).collect();
            if pick & 1 == 0 {
                let cuts = others.iter().map(|&o| (o, node)).collect();
                (
                    cuts,
                    json!({"deaf": node, "note": "receives nothing, still sends"}),
                )
            } else {
                let cuts = others.iter().map(|&o| (node, o)).collect();
                (
                    cuts,
                    json!({"mute": node, "note": "sends nothing, still receives"}),
                )
            }
        }
    }
}

/// The nodes a process fault with `targets` hits.
pub fn victims(targets: Targets, ids: &[u64], leaders: &BTreeMap<u64, u64>, pick: u64) -> Vec<u64> {
    let order = shuffled(ids, pick);
    let n = order.len();
    let mut hit: Vec<u64> = match targets {
        Targets::One => order[..1].to_vec(),
        Targets::Minority => order[..(n / 2).max(1)].to_vec(),
        Targets::Majority => order[..n / 2 + 1].to_vec(),
        Targets::All => order,
        Targets::Primaries => match primary(leaders, pick) {
            Some((_, node)) => vec![node],
            None => order[..1].to_vec(),
        },
    };
    hit.sort_unstable();
    hit
}

/// What the nemesis acts on.
#[derive(Debug)]
pub struct Context {
    /// The node processes.
    pub processes: Arc<Mutex<Processes>>,
    /// The network.
    pub net: Arc<Net>,
    /// For `primaries`.
    pub probe: Probe,
    /// Where faults are recorded.
    pub recorder: Arc<Recorder>,
    /// The node ids.
    pub ids: Vec<u64>,
}

/// A fault the nemesis could not inject or undo.
#[derive(Debug, thiserror::Error)]
pub enum NemesisError {
    /// Starting, killing or signalling a node failed.
    #[error(transparent)]
    Process(#[from] super::processes::ProcessError),
    /// Cutting or healing links failed.
    #[error(transparent)]
    Net(#[from] super::net::NetError),
}

/// Runs `schedule` from `start` (the run's time zero): each family's faults in turn, the
/// families concurrently, until every fault has been started and undone, or `stop` turns
/// true: then no further fault starts, and the ones in force are held to their end and
/// undone. Returns how many faults were injected.
pub async fn run(
    schedule: &Schedule,
    context: Arc<Context>,
    start: Instant,
    stop: watch::Receiver<bool>,
) -> Result<usize, NemesisError> {
    let mut by_family: BTreeMap<Family, Vec<Step>> = BTreeMap::new();
    for step in &schedule.steps {
        by_family
            .entry(step.fault.family())
            .or_default()
            .push(*step);
    }
    let tasks = by_family.into_values().map(|steps| {
        let context = context.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let mut done = 0;
            for step in &steps {
                tokio::select! {
                    () = tokio::time::sleep_until((start + step.start).into()) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
                if *stop.borrow() {
                    break;
                }
                let undo = inject(&context, step).await?;
                tokio::time::sleep(step.hold).await;
                heal_one(&context, step, undo).await?;
                done += 1;
            }
            Ok::<usize, NemesisError>(done)
        })
    });
    let mut done = 0;
    for result in futures::future::join_all(tasks).await {
        match result {
            Ok(Ok(n)) => done += n,
            Ok(Err(e)) => return Err(e),
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    }
    Ok(done)
}

/// What undoing a fault needs: the nodes it hit.
struct Undo {
    nodes: Vec<u64>,
}

async fn inject(context: &Context, step: &Step) -> Result<Undo, NemesisError> {
    let leaders = match step.fault {
        Fault::Partition(Shape::Primaries)
        | Fault::Kill(Targets::Primaries)
        | Fault::Pause(Targets::Primaries) => Probe::leaders(&context.probe.statuses().await),
        _ => BTreeMap::new(),
    };
    let family = step.fault.family();
    let mut info = json!({"fault": family.name(), "target": step.fault.target_name()});
    let nodes = match step.fault {
        Fault::Partition(shape) => {
            let (cuts, described) = grudge(shape, &context.ids, &leaders, step.pick);
            context.net.cut(&cuts).await?;
            info["partition"] = described;
            info["cuts"] = json!(
                cuts.iter()
                    .map(|(a, b)| format!("{a}->{b}"))
                    .collect::<Vec<_>>()
            );
            Vec::new()
        }
        Fault::Kill(targets) => {
            let hit = victims(targets, &context.ids, &leaders, step.pick);
            let mut processes = context
                .processes
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for &id in &hit {
                processes.kill(id)?;
            }
            hit
        }
        Fault::Pause(targets) => {
            let hit = victims(targets, &context.ids, &leaders, step.pick);
            let mut processes = context
                .processes
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for &id in &hit {
                processes.pause(id)?;
            }
            hit
        }
    };
    if !nodes.is_empty() {
        info["nodes"] = json!(nodes);
    }
    if !leaders.is_empty() {
        info["leaders"] = json!(
            leaders
                .iter()
                .map(|(s, n)| (s.to_string(), *n))
                .collect::<BTreeMap<_, _>>()
        );
    }
    tracing::info!(fault = %family, target = step.fault.target_name(), info = %info, "nemesis start");
    context
        .recorder
        .nemesis(OpType::Info, format!("start-{family}"), info);
    Ok(Undo { nodes })
}

async fn heal_one(context: &Context, step: &Step, undo: Undo) -> Result<(), NemesisError> {
    let family = step.fault.family();
    match step.fault {
        Fault::Partition(_) => context.net.heal().await?,
        Fault::Kill(_) => {
            let mut processes = context
                .processes
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for &id in &undo.nodes {
                processes.restart(id)?;
            }
        }
        Fault::Pause(_) => {
            let mut processes = context
                .processes
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for &id in &undo.nodes {
                processes.resume(id)?;
            }
        }
    }
    let info =
        json!({"fault": family.name(), "target": step.fault.target_name(), "nodes": undo.nodes});
    tracing::info!(fault = %family, "nemesis stop");
    context
        .recorder
        .nemesis(OpType::Info, format!("stop-{family}"), info);
    Ok(())
}

/// The `apply-lag` nemesis: in every window of `hold` starting at a multiple of `every` on the
/// wall clock (time since the UNIX epoch), every node holds the applies of the shards it leads,
/// so each shard leader's apply lags its commit while its followers apply and serve. The nodes
/// do it themselves (test builds only: `KVNODE_APPLY_LAG`, see `kvnode::raft::apply_stall`);
/// the harness only records the windows ([`record_apply_lag`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyLag {
    /// How long each window holds the applies.
    pub hold: Duration,
    /// The period of the windows.
    pub every: Duration,
}

impl Default for ApplyLag {
    /// 800 ms every 3 s: shorter than the nodes' 1 s request timeout, so a write or a read that
    /// waits for a held apply still completes.
    fn default() -> ApplyLag {
        ApplyLag {
            hold: Duration::from_millis(800),
            every: Duration::from_secs(3),
        }
    }
}

impl ApplyLag {
    /// The nodes' `KVNODE_APPLY_LAG` value: `<hold_ms>/<every_ms>`.
    pub fn env_value(&self) -> String {
        format!("{}/{}", self.hold.as_millis(), self.every.as_millis())
    }

    /// The start of the first window at or after `now` (both since the UNIX epoch).
    fn next_start(&self, now: Duration) -> Duration {
        let every = self.every.as_nanos().max(1);
        Duration::from_nanos(
            u64::try_from(now.as_nanos().div_ceil(every) * every).unwrap_or(u64::MAX),
        )
    }
}

/// A malformed `--apply-lag` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("apply lag {0:?}: expected HOLD/EVERY with 0 < HOLD < EVERY, e.g. 800ms/3s")]
pub struct BadApplyLag(pub String);

impl FromStr for ApplyLag {
    type Err = BadApplyLag;

    /// `HOLD/EVERY`, each a duration such as `800ms` or `3s`.
    fn from_str(s: &str) -> Result<ApplyLag, BadApplyLag> {
        let bad = || BadApplyLag(s.to_string());
        let (hold, every) = s.split_once('/').ok_or_else(bad)?;
        let hold = kvnode::consistency::parse_duration(hold.trim()).map_err(|_| bad())?;
        let every = kvnode::consistency::parse_duration(every.trim()).map_err(|_| bad())?;
        if hold.is_zero() || hold >= every {
            return Err(bad());
        }
        Ok(ApplyLag { hold, every })
    }
}

/// Records the `apply-lag` windows the nodes hold (a `start-apply-lag` and a `stop-apply-lag`
/// line each, at the window's start and end on the wall clock) until `stop` turns true; a
/// window under way then is recorded to its end. Returns how many windows it recorded.
pub async fn record_apply_lag(
    recorder: Arc<Recorder>,
    lag: ApplyLag,
    mut stop: watch::Receiver<bool>,
) -> usize {
    let since_epoch = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
    };
    let info = json!({
        "fault": Family::ApplyLag.name(),
        "target": "leaders",
        "hold_ms": lag.hold.as_millis() as u64,
        "note": "every node holds the applies of the shards it leads",
    });
    let mut windows = 0;
    loop {
        let now = since_epoch();
        let start = lag.next_start(now);
        tokio::select! {
            () = tokio::time::sleep(start.saturating_sub(now)) => {}
            _ = stop.wait_for(|s| *s) => return windows,
        }
        let name = Family::ApplyLag.name();
        recorder.nemesis(OpType::Info, format!("start-{name}"), info.clone());
        tokio::time::sleep((start + lag.hold).saturating_sub(since_epoch())).await;
        recorder.nemesis(OpType::Info, format!("stop-{name}"), info.clone());
        windows += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_lag_parses_and_spells_the_node_setting() {
        let lag: ApplyLag = "800ms/3s".parse().expect("parses");
        assert_eq!(lag, ApplyLag::default());
        assert_eq!(lag.env_value(), "800/3000");
        for bad in ["800ms", "3s/3s", "0ms/3s", "4s/3s", "x/3s"] {
            assert!(bad.parse::<ApplyLag>().is_err(), "{bad}");
        }
        let at = |ms: u64| lag.next_start(Duration::from_millis(ms)).as_millis();
        assert_eq!((at(0), at(1), at(3000), at(3001)), (0, 3000, 3000, 6000));
        assert_eq!("apply-lag".parse::<Family>(), Ok(Family::ApplyLag));
        let schedule = Schedule::generate(
            1,
            &[Family::ApplyLag],
            &[],
            Duration::from_secs(60),
            Duration::from_secs(5),
        );
        assert!(schedule.steps.is_empty(), "apply-lag windows are periodic");
    }

    fn connected(cuts: &BTreeSet<(u64, u64)>, a: u64, b: u64) -> bool {
        !cuts.contains(&(a, b)) && !cuts.contains(&(b, a))
    }

    #[test]
    fn the_schedule_is_a_function_of_the_seed() {
        let a = Schedule::generate(
            42,
            &Family::ALL,
            &[],
            Duration::from_secs(120),
            Duration::from_secs(10),
        );
        let b = Schedule::generate(
            42,
            &Family::ALL,
            &[],
            Duration::from_secs(120),
            Duration::from_secs(10),
        );
        let c = Schedule::generate(
            43,
            &Family::ALL,
            &[],
            Duration::from_secs(120),
            Duration::from_secs(10),
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
        for family in Family::ALL {
            let steps: Vec<&Step> = a
                .steps
                .iter()
                .filter(|s| s.fault.family() == family)
                .collect();
            assert!(steps.len() >= 3, "{family}: {} faults", steps.len());
            // A family's faults never overlap, and every fault ends within the run.
            for pair in steps.windows(2) {
                assert!(pair[0].start + pair[0].hold <= pair[1].start);
            }
            assert!(
                steps
                    .iter()
                    .all(|s| s.start + s.hold <= Duration::from_secs(120))
            );
        }
    }

    #[test]
    fn partitions_have_their_shapes() {
        let ids = [1, 2, 3, 4, 5];
        let none = BTreeMap::new();
        for pick in 0..50 {
            let (one, _) = grudge(Shape::One, &ids, &none, pick);
            assert_eq!(one.len(), 8, "one node, both directions to 4 others");

            let (majority, _) = grudge(Shape::Majority, &ids, &none, pick);
            assert_eq!(majority.len(), 2 * 2 * 3);

            let (ring, _) = grudge(Shape::MajoritiesRing, &ids, &none, pick);
            let mut majorities = BTreeSet::new();
            for &x in &ids {
                let sees: Vec<u64> = ids
                    .iter()
                    .copied()
                    .filter(|&y| connected(&ring, x, y))
                    .collect();
                assert_eq!(sees.len(), 3, "node {x} sees a majority exactly");
                majorities.insert(sees);
            }
            assert_eq!(majorities.len(), 5, "every node sees a different majority");

            let (bridge, info) = grudge(Shape::Bridge, &ids, &none, pick);
            let b = info["bridge"][0].as_u64().expect("bridge node");
            assert!(ids.iter().all(|&x| connected(&bridge, b, x)));
            assert_eq!(bridge.len(), 2 * 2 * 2);

            let (oneway, _) = grudge(Shape::Oneway, &ids, &none, pick);
            assert_eq!(oneway.len(), 4);
            assert!(oneway.iter().all(|(a, b)| !oneway.contains(&(*b, *a))));
        }
        let three = [1, 2, 3];
        let (ring, _) = grudge(Shape::MajoritiesRing, &three, &none, 7);
        assert_eq!(ring.len(), 2, "three nodes: one link cut");
    }

    #[test]
    fn primaries_aim_at_a_shard_leader() {
        let leaders: BTreeMap<u64, u64> = [(0, 3), (1, 3), (2, 1)].into();
        for pick in 0..20 {
            let hit = victims(Targets::Primaries, &[1, 2, 3], &leaders, pick);
            assert_eq!(hit.len(), 1);
            assert!(hit[0] == 3 || hit[0] == 1);
            let (cuts, _) = grudge(Shape::Primaries, &[1, 2, 3], &leaders, pick);
            assert!(cuts.iter().all(|(a, b)| *a == hit[0] || *b == hit[0]));
        }
        assert_eq!(
            victims(Targets::Majority, &[1, 2, 3, 4, 5], &BTreeMap::new(), 9).len(),
            3
        );
        assert_eq!(
            victims(Targets::Minority, &[1, 2, 3], &BTreeMap::new(), 9).len(),
            1
        );
    }
}
