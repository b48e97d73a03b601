//! The fault test's client workers and final reads (`docs/design/jepsen.md` §3.2–3.3):
//! register workers doing reads at every level, writes and compare-and-sets on rotating keys,
//! and set adds of unique elements, each worker pinned to one node and recording every
//! operation in the history; then, after the heal, the final reads.
//!
//! ## How an outcome is recorded
//!
//! - `ok`: the node replied with success. A CAS whose compare failed is `ok` with
//!   `cas_failed` (it observed the value).
//! - `fail`: the operation certainly did not happen: any failed read, and a write whose error
//!   kvnode marks definite (`x-kvnode-outcome: definite`: not the leader, validation, refused
//!   connection).
//! - `info`: a write whose outcome is unknown (deadline, reset connection, leader change after
//!   the proposal). The worker then continues as a new process (`proc + workers`), as in
//!   Jepsen, since the old one may still have an operation in flight.
//!
//! Requests go straight to the worker's node with no client-side retry or redirect: that
//! node serves or forwards, so minority-side and deposed nodes get traffic too. Values are
//! `"<proc>-<seq>"`, unique per key; versions come from receipts (a write's log index). Every
//! request carries its deadline (`client_timeout`, also sent as `grpc-timeout`), so the node
//! stops working on it when the client stops waiting.
//!
//! ## Before the final reads
//!
//! An `info` write may still take effect after its client gave up, and final reads that
//! compare nodes (convergence) must not race it. [`barrier`] writes one key of every shard
//! through its current leader: once that is acknowledged, every entry any leader proposed
//! before it has either committed (it is in the log before the barrier) or can never commit
//! (a later leader's log is the barrier's up to it). The run calls it after every request's
//! deadline has passed, so no request is proposed after it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tonic::transport::Channel;

use super::history::{F, Level, Op, OpResult, OpType};
use super::probe::kv_client;
use super::recorder::Recorder;
use kvnode::consistency::{ReadOptions, SessionToken};
use kvnode::pb::convert;
use kvnode::pb::kv::kv_client::KvClient;
use kvnode::pb::kv::{CompareAndSetRequest, GetRequest, PutRequest};
use kvnode::pb::status::from_status;
use kvnode::sharding::HashRing;
use kvnode_testkit::Rng;

/// Register keys start with this; set elements' keys with [`SET_PREFIX`].
pub const REGISTER_PREFIX: &str = "reg-";
/// The prefix of the set workload's keys (one key per element).
pub const SET_PREFIX: &str = "set-";
/// Final reads use processes from here on.
pub const FINAL_PROC_BASE: u64 = 1_000_000_000;
/// The prefix of [`barrier`]'s keys (no checker looks at them).
pub const BARRIER_PREFIX: &str = "barrier-";

/// What the workers do.
#[derive(Debug, Clone)]
pub struct WorkloadOptions {
    /// Workers per node (each a logical process with one operation in flight).
    pub workers_per_node: usize,
    /// The read levels register reads pick from, uniformly.
    pub levels: Vec<Level>,
    /// Register keys in use at any time.
    pub live_keys: usize,
    /// Operations on a register key before it is retired for a fresh one.
    pub ops_per_key: u64,
    /// Percent of operations that are set adds (the rest are register operations).
    pub set_percent: u64,
    /// Per-request deadline.
    pub client_timeout: Duration,
    /// A worker waits up to this long (uniformly) between operations.
    pub think: Duration,
    /// The shard count: register keys are chosen so the live ones cover every shard.
    pub shards: u32,
    /// Seeds the workers' choices.
    pub seed: u64,
}

impl Default for WorkloadOptions {
    fn default() -> WorkloadOptions {
        WorkloadOptions {
            workers_per_node: 2,
            levels: vec![
                Level::Lin,
                Level::Lease,
                Level::Session,
                Level::Bst(500),
                Level::Ev,
            ],
            live_keys: 10,
            ops_per_key: 150,
            set_percent: 15,
            client_timeout: Duration::from_millis(1500),
            think: Duration::from_millis(10),
            shards: 8,
            seed: 0,
        }
    }
}

/// What the workers did, by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkloadCounts {
    /// `ok` completions.
    pub ok: u64,
    /// `fail` completions.
    pub fail: u64,
    /// `info` completions.
    pub info: u64,
}

impl WorkloadCounts {
    fn add(&mut self, kind: OpType) {
        match kind {
            OpType::Ok => self.ok += 1,
            OpType::Fail => self.fail += 1,
            OpType::Info => self.info += 1,
            OpType::Invoke => {}
        }
    }

    fn merge(&mut self, other: WorkloadCounts) {
        self.ok += other.ok;
        self.fail += other.fail;
        self.info += other.info;
    }
}

/// The register keys in use: `live_keys` slots, each retired after `ops_per_key` operations.
/// Slot `s` always holds a key of shard `s mod shards`, so the live keys cover every shard.
#[derive(Debug)]
struct KeySpace {
    ring: Option<HashRing>,
    ops_per_key: u64,
    /// Per slot: (generation, operations so far, the key).
    slots: Mutex<Vec<(u64, u64, String)>>,
}

impl KeySpace {
    fn new(live: usize, ops_per_key: u64, shards: u32) -> KeySpace {
        let ring = HashRing::with_shards(shards.max(1)).ok();
        let slots = (0..live.max(1))
            .map(|s| (0, 0, KeySpace::name(ring.as_ref(), s, 0)))
            .collect();
        KeySpace {
            ring,
            ops_per_key: ops_per_key.max(1),
            slots: Mutex::new(slots),
        }
    }

    /// The key of slot `slot`, generation `generation`: the first `reg-<slot>-<gen>-<n>` that
    /// hashes to the slot's shard.
    fn name(ring: Option<&HashRing>, slot: usize, generation: u64) -> String {
        let Some(ring) = ring else {
            return format!("{REGISTER_PREFIX}{slot}-{generation}");
        };
        let want = (slot as u64) % u64::from(ring.shard_count());
        (0..)
            .map(|n| format!("{REGISTER_PREFIX}{slot}-{generation}-{n}"))
            .find(|k| ring.shard_for(k.as_bytes()) == want)
            .expect("some name hashes to every shard")
    }

    fn pick(&self, rng: &mut Rng) -> String {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = rng.range(0, slots.len() as u64 - 1) as usize;
        if slots[slot].1 >= self.ops_per_key {
            let generation = slots[slot].0 + 1;
            slots[slot] = (
                generation,
                0,
                KeySpace::name(self.ring.as_ref(), slot, generation),
            );
        }
        slots[slot].1 += 1;
        slots[slot].2.clone()
    }
}

/// One worker's state.
struct Worker {
    recorder: Arc<Recorder>,
    node: u64,
    client: KvClient<Channel>,
    /// Every request's deadline.
    timeout: Duration,
    proc: u64,
    procs: u64,
    seq: u64,
    rng: Rng,
    session: SessionToken,
    /// The last value this worker saw or wrote per key, for CAS.
    last_seen: BTreeMap<String, Option<String>>,
    counts: WorkloadCounts,
}

/// Runs the workers against `nodes` (id → client address) until `stop` turns true; returns
/// their counts.
pub async fn run_workers(
    recorder: Arc<Recorder>,
    nodes: &BTreeMap<u64, SocketAddr>,
    options: &WorkloadOptions,
    stop: watch::Receiver<bool>,
) -> WorkloadCounts {
    let keys = Arc::new(KeySpace::new(
        options.live_keys,
        options.ops_per_key,
        options.shards,
    ));
    let node_ids: Vec<u64> = nodes.keys().copied().collect();
    let workers = node_ids.len() * options.workers_per_node.max(1);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let node = node_ids[w % node_ids.len()];
        let worker = Worker {
            recorder: recorder.clone(),
            node,
            client: kv_client(nodes[&node], options.client_timeout),
            timeout: options.client_timeout,
            proc: w as u64,
            procs: workers as u64,
            seq: 0,
            rng: Rng::new(options.seed ^ (w as u64).wrapping_mul(0x9e37_79b9)),
            session: SessionToken::new(),
            last_seen: BTreeMap::new(),
            counts: WorkloadCounts::default(),
        };
        tasks.push(tokio::spawn(worker.run(
            keys.clone(),
            options.clone(),
            stop.clone(),
        )));
    }
    let mut total = WorkloadCounts::default();
    for task in tasks {
        if let Ok(counts) = task.await {
            total.merge(counts);
        }
    }
    total
}

impl Worker {
    async fn run(
        mut self,
        keys: Arc<KeySpace>,
        options: WorkloadOptions,
        stop: watch::Receiver<bool>,
    ) -> WorkloadCounts {
        let think_ms = options.think.as_millis() as u64;
        while !*stop.borrow() {
            let roll = self.rng.range(0, 99);
            let kind = if roll < options.set_percent {
                let key = format!("{SET_PREFIX}{}-{}", self.proc, self.seq);
                self.write(key).await
            } else {
                let key = keys.pick(&mut self.rng);
                match self.rng.range(0, 3) {
                    0 | 1 => {
                        let level = options.levels
                            [self.rng.range(0, options.levels.len() as u64 - 1) as usize];
                        self.read(key, level).await
                    }
                    2 => self.write(key).await,
                    _ => self.cas(key).await,
                }
            };
            self.counts.add(kind);
            if kind == OpType::Info {
                // The old process may still have its operation in flight.
                self.proc += self.procs;
            }
            // After a failure, back off a little, as a client reconnecting would: a worker
            // whose node is down would otherwise fill the history with refused connections.
            let pause = match kind {
                OpType::Ok => self.rng.range(0, think_ms),
                _ => think_ms.max(100),
            };
            if pause > 0 {
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
        self.counts
    }

    fn next_value(&mut self) -> String {
        self.seq += 1;
        format!("{}-{}", self.proc, self.seq)
    }

    fn invocation(&self, f: F, key: &str) -> Op {
        let mut op = Op::invoke(0, 0, self.proc, f, key);
        op.node = Some(self.node);
        op
    }

    async fn read(&mut self, key: String, level: Level) -> OpType {
        let mut op = self.invocation(F::Read, &key);
        op.level = Some(level);
        let options = read_options(level, &self.session);
        let invoked = self.recorder.invoke(op);
        let reply = self
            .client
            .get(with_deadline(
                GetRequest {
                    key: key.clone().into_bytes(),
                    options: Some(convert::read_options_to_wire(&options)),
                },
                self.timeout,
            ))
            .await;
        let mut done = invoked.clone();
        match reply {
            Ok(reply) => {
                let reply = reply.into_inner();
                let value = reply.value.map(|v| (text(&v.value), v.version));
                if let Some(receipt) = &reply.receipt {
                    self.session.observe(receipt.shard, receipt.applied_index);
                    done.shard = Some(receipt.shard);
                    done.res.served_by = Some(receipt.node);
                    done.res.read_index = Some(receipt.applied_index);
                }
                done.res.value = value.as_ref().map(|(v, _)| v.clone());
                done.res.version = value.as_ref().map(|(_, ver)| *ver);
                self.last_seen.insert(key, value.map(|(v, _)| v));
                done.kind = OpType::Ok;
            }
            Err(status) => {
                done.kind = OpType::Fail;
                done.err = Some(describe(&status, false));
            }
        }
        self.recorder.complete(&invoked, done).kind
    }

    async fn write(&mut self, key: String) -> OpType {
        let value = self.next_value();
        let mut op = self.invocation(F::Write, &key);
        op.value = Some(value.clone());
        let invoked = self.recorder.invoke(op);
        let reply = self
            .client
            .put(with_deadline(
                PutRequest {
                    key: key.clone().into_bytes(),
                    value: value.clone().into_bytes(),
                },
                self.timeout,
            ))
            .await;
        let mut done = invoked.clone();
        match reply {
            Ok(reply) => {
                done.kind = OpType::Ok;
                if let Some(receipt) = reply.into_inner().receipt {
                    self.session.observe(receipt.shard, receipt.index);
                    done.shard = Some(receipt.shard);
                    done.res.version = Some(receipt.index);
                }
                self.last_seen.insert(key, Some(value));
            }
            Err(status) => {
                done.kind = write_failure(&status);
                done.err = Some(describe(&status, true));
            }
        }
        self.recorder.complete(&invoked, done).kind
    }

    async fn cas(&mut self, key: String) -> OpType {
        let expected = self.last_seen.get(&key).cloned().flatten();
        let new = self.next_value();
        let mut op = self.invocation(F::Cas, &key);
        op.expected.clone_from(&expected);
        op.value = Some(new.clone());
        let invoked = self.recorder.invoke(op);
        let reply = self
            .client
            .compare_and_set(with_deadline(
                CompareAndSetRequest {
                    key: key.clone().into_bytes(),
                    expected: expected.map(String::into_bytes),
                    new_value: Some(new.clone().into_bytes()),
                },
                self.timeout,
            ))
            .await;
        let mut done = invoked.clone();
        match reply {
            Ok(reply) => {
                let reply = reply.into_inner();
                done.kind = OpType::Ok;
                if let Some(receipt) = &reply.receipt {
                    self.session.observe(receipt.shard, receipt.index);
                    done.shard = Some(receipt.shard);
                }
                if reply.applied {
                    done.res.version = reply.receipt.map(|r| r.index);
                    self.last_seen.insert(key, Some(new));
                } else {
                    let current = reply.current.map(|v| (text(&v.value), v.version));
                    done.res = OpResult {
                        cas_failed: true,
                        value: current.as_ref().map(|(v, _)| v.clone()),
                        version: current.as_ref().map(|(_, ver)| *ver),
                        ..OpResult::default()
                    };
                    self.last_seen.insert(key, current.map(|(v, _)| v));
                }
            }
            Err(status) => {
                done.kind = write_failure(&status);
                done.err = Some(describe(&status, true));
            }
        }
        self.recorder.complete(&invoked, done).kind
    }
}

/// `message` as a request whose deadline the server sees (`grpc-timeout`).
fn with_deadline<T>(message: T, deadline: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    request
}

/// The wire read options for a history level.
pub fn read_options(level: Level, session: &SessionToken) -> ReadOptions {
    match level {
        // `fri` is a linearizable read sent to a follower: the level is the same.
        Level::Lin | Level::Fri => ReadOptions::linearizable(),
        Level::Lease => ReadOptions::lease(),
        Level::Bst(ms) => ReadOptions::bounded(Duration::from_millis(ms)),
        Level::Session => ReadOptions::session(session),
        Level::Ev => ReadOptions::eventual(),
    }
}

/// `fail` if kvnode says the write certainly did not happen, `info` otherwise.
fn write_failure(status: &tonic::Status) -> OpType {
    if from_status(status, true).is_definite() {
        OpType::Fail
    } else {
        OpType::Info
    }
}

fn describe(status: &tonic::Status, write: bool) -> String {
    let error = from_status(status, write);
    let message = status.message();
    let mut text = format!("{:?}: {error}", status.code());
    if !message.is_empty() && !text.contains(message) {
        text.push_str(&format!(" ({message})"));
    }
    text
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What the final reads found.
#[derive(Debug, Clone, Default)]
pub struct FinalCounts {
    /// Keys read at `lin`.
    pub keys: usize,
    /// Keys that got an `ok` linearizable read.
    pub keys_read: usize,
    /// Failed final read attempts (each retried).
    pub failed_attempts: u64,
    /// `ev` reads on every node (register keys).
    pub eventual_reads: u64,
    /// `ev` reads that failed.
    pub eventual_failed: u64,
}

/// After the heal: reads every key in `keys` at `lin` (through the nodes in turn, up to
/// `attempts` tries each), then every register key at `ev` on every node, all recorded.
pub async fn final_reads(
    recorder: Arc<Recorder>,
    nodes: &BTreeMap<u64, SocketAddr>,
    keys: &BTreeSet<String>,
    client_timeout: Duration,
    attempts: u32,
) -> FinalCounts {
    let clients: Vec<(u64, KvClient<Channel>)> = nodes
        .iter()
        .map(|(id, addr)| (*id, kv_client(*addr, client_timeout)))
        .collect();
    let keys: Vec<String> = keys.iter().cloned().collect();
    let concurrency = 16usize;
    let mut counts = FinalCounts {
        keys: keys.len(),
        ..FinalCounts::default()
    };
    // Linearizable reads, `concurrency` at a time, each key its own process.
    for (batch_no, batch) in keys.chunks(concurrency).enumerate() {
        let reads = batch.iter().enumerate().map(|(j, key)| {
            let recorder = recorder.clone();
            let clients = clients.clone();
            let proc = FINAL_PROC_BASE + (batch_no * concurrency + j) as u64;
            async move {
                let mut failed = 0;
                for attempt in 0..attempts {
                    let (node, client) =
                        &clients[(proc as usize + attempt as usize) % clients.len()];
                    if final_read(&recorder, *node, client.clone(), proc, key, Level::Lin).await {
                        return (true, failed);
                    }
                    failed += 1;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                (false, failed)
            }
        });
        for (ok, failed) in futures::future::join_all(reads).await {
            counts.keys_read += usize::from(ok);
            counts.failed_attempts += failed;
        }
    }
    // Eventual reads of the register keys on every node, for convergence.
    let registers: Vec<&String> = keys
        .iter()
        .filter(|k| k.starts_with(REGISTER_PREFIX))
        .collect();
    let base = FINAL_PROC_BASE + keys.len() as u64;
    for (n, (node, client)) in clients.iter().enumerate() {
        for (batch_no, batch) in registers.chunks(concurrency).enumerate() {
            let reads = batch.iter().enumerate().map(|(j, key)| {
                let proc =
                    base + (n * registers.len()) as u64 + (batch_no * concurrency + j) as u64;
                final_read(&recorder, *node, client.clone(), proc, key, Level::Ev)
            });
            for ok in futures::future::join_all(reads).await {
                counts.eventual_reads += 1;
                counts.eventual_failed += u64::from(!ok);
            }
        }
    }
    counts
}

async fn final_read(
    recorder: &Recorder,
    node: u64,
    mut client: KvClient<Channel>,
    proc: u64,
    key: &str,
    level: Level,
) -> bool {
    let mut op = Op::invoke(0, 0, proc, F::Read, key);
    op.level = Some(level);
    op.node = Some(node);
    let invoked = recorder.invoke(op);
    let reply = client
        .get(GetRequest {
            key: key.as_bytes().to_vec(),
            options: Some(convert::read_options_to_wire(&read_options(
                level,
                &SessionToken::new(),
            ))),
        })
        .await;
    let mut done = invoked.clone();
    match reply {
        Ok(reply) => {
            let reply = reply.into_inner();
            done.kind = OpType::Ok;
            if let Some(receipt) = &reply.receipt {
                done.shard = Some(receipt.shard);
                done.res.served_by = Some(receipt.node);
                done.res.read_index = Some(receipt.applied_index);
            }
            if let Some(v) = reply.value {
                done.res.value = Some(text(&v.value));
                done.res.version = Some(v.version);
            }
        }
        Err(status) => {
            done.kind = OpType::Fail;
            done.err = Some(describe(&status, false));
        }
    }
    recorder.complete(&invoked, done).kind == OpType::Ok
}

/// Writes one key of every shard (`barrier-<shard>-<n>`), each through the nodes in turn until
/// one write is acknowledged (see the module doc: after it, no entry proposed before can still
/// take effect), each try within `timeout`, tries for at most `budget` (a shard may be
/// electing a leader). Returns each shard's barrier index, or the shards that acknowledged
/// none, with the last error of each.
pub async fn barrier(
    nodes: &BTreeMap<u64, SocketAddr>,
    shards: u32,
    timeout: Duration,
    budget: Duration,
) -> Result<BTreeMap<u64, u64>, BTreeMap<u64, String>> {
    let give_up = tokio::time::Instant::now() + budget;
    let ring =
        HashRing::with_shards(shards.max(1)).map_err(|e| BTreeMap::from([(0, e.to_string())]))?;
    let clients: Vec<KvClient<Channel>> = nodes
        .values()
        .map(|addr| kv_client(*addr, timeout))
        .collect();
    let writes = (0..u64::from(ring.shard_count())).map(|shard| {
        let key = (0..)
            .map(|n| format!("{BARRIER_PREFIX}{shard}-{n}"))
            .find(|k| ring.shard_for(k.as_bytes()) == shard)
            .expect("some name hashes to every shard");
        let clients = clients.clone();
        async move {
            let mut last = String::from("not tried");
            for attempt in 0.. {
                if tokio::time::Instant::now() >= give_up {
                    break;
                }
                let mut client =
                    clients[(shard as usize + attempt as usize) % clients.len()].clone();
                let put = PutRequest {
                    key: key.clone().into_bytes(),
                    value: b"barrier".to_vec(),
                };
                match client.put(with_deadline(put, timeout)).await {
                    Ok(reply) => match reply.into_inner().receipt {
                        Some(receipt) => return Ok((shard, receipt.index)),
                        None => last = "no receipt".into(),
                    },
                    Err(status) => last = describe(&status, true),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err((shard, last))
        }
    });
    let (written, failed): (Vec<_>, Vec<_>) = futures::future::join_all(writes)
        .await
        .into_iter()
        .partition(Result::is_ok);
    if failed.is_empty() {
        Ok(written.into_iter().flatten().collect())
    } else {
        Err(failed.into_iter().filter_map(Result::err).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_register_keys_cover_every_shard_and_rotate() {
        let keys = KeySpace::new(8, 3, 8);
        let ring = HashRing::with_shards(8).expect("ring");
        let live: BTreeSet<u64> = keys
            .slots
            .lock()
            .expect("lock")
            .iter()
            .map(|(_, _, k)| ring.shard_for(k.as_bytes()))
            .collect();
        assert_eq!(live.len(), 8, "one live key per shard");
        let mut rng = Rng::new(1);
        let mut seen = BTreeSet::new();
        for _ in 0..200 {
            seen.insert(keys.pick(&mut rng));
        }
        // 200 picks at 3 ops per key retire keys: far more than 8 distinct names.
        assert!(seen.len() > 40, "{} keys", seen.len());
        assert!(seen.iter().all(|k| k.starts_with(REGISTER_PREFIX)));
    }

    #[test]
    fn definite_write_errors_fail_and_the_rest_are_info() {
        let refused = kvnode::pb::status::to_status(
            &kvnode::Error::NotLeader {
                shard: 1,
                leader_hint: None,
            },
            |_| None,
        );
        assert_eq!(write_failure(&refused), OpType::Fail);
        let deadline = tonic::Status::deadline_exceeded("timeout");
        assert_eq!(write_failure(&deadline), OpType::Info);
        let changed = kvnode::pb::status::to_status(
            &kvnode::Error::LeaderChanged {
                shard: 1,
                leader_hint: None,
            },
            |_| None,
        );
        assert_eq!(write_failure(&changed), OpType::Info);
    }
}
