//! Forwarding over real sockets. Node 1 is a real kvnode node; "node 2", the only replica of
//! some shards and so the node it forwards their requests to, is whatever each test puts at
//! node 2's address: nothing, a listener that resets the connection once a request arrived, or
//! a stand-in leader served by tonic with the same (default) HTTP/2 settings as
//! `kvnode::server::serve`, whose answers the test scripts.
//!
//! - Every error a client gets carries `x-kvnode-outcome`: definite when the forward could not
//!   even connect, indeterminate for a write whose request may have reached the leader; a read
//!   is always definite.
//! - A forwarded request carries the client's remaining deadline.
//! - Cancelled forwarded requests cannot close the connection Raft traffic runs on.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use kvnode::pb::kv::kv_client::KvClient;
use kvnode::pb::kv::kv_server::{Kv, KvServer};
use kvnode::pb::kv::{
    CompareAndSetRequest, CompareAndSetResponse, DeleteRequest, DeleteResponse, GetRequest,
    GetResponse, PutRequest, PutResponse, StatusRequest, StatusResponse,
};
use kvnode::pb::raft::raft_transport_server::{RaftTransport, RaftTransportServer};
use kvnode::pb::raft::{
    ConfirmReply, ConfirmRequest, FetchMapReply, FetchMapRequest, PingReply, PingRequest,
    RaftReply, RaftRequest, SnapshotChunk,
};
use kvnode::pb::status::OUTCOME;
use kvnode::{Config, Node};
use kvnode_testkit::eventually;
use kvnode_testkit::ports::PortReservation;

/// Generous bound for waiting on a condition (never a pass/fail timing).
const PATIENCE: Duration = Duration::from_secs(20);

/// HTTP/2 frame types counted by [`FrameCounter`].
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;

/// Node 1, serving the client API, with node 2 at `peer`.
struct Forwarder {
    _dir: tempfile::TempDir,
    node: Arc<Node>,
    url: String,
    stop: oneshot::Sender<()>,
    server: JoinHandle<()>,
}

impl Forwarder {
    async fn start(peer: &str, heartbeat_interval_ms: u64) -> Forwarder {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let config = Config {
            data_dir: dir.path().join("node1"),
            node_id: 1,
            cluster_id: "forwarding-test".to_string(),
            peers: BTreeMap::from([(1, addr.clone()), (2, peer.to_string())]),
            // One replica per shard: about half the shards live only on node 2.
            replication_factor: 1,
            shards: 8,
            heartbeat_interval_ms,
            election_timeout_min_ms: 4 * heartbeat_interval_ms,
            election_timeout_max_ms: 8 * heartbeat_interval_ms,
            // Far longer than any client deadline below.
            request_timeout_ms: 60_000,
            wal_segment_bytes: 4 * 1024 * 1024,
            sled_cache_bytes: 4 * 1024 * 1024,
            ..Config::default()
        };
        let node = Arc::new(Node::open(config).await.unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = Arc::clone(&node);
        let server = tokio::spawn(async move {
            kvnode::server::serve(serving, listener, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Forwarder {
            _dir: dir,
            node,
            url: format!("http://{addr}"),
            stop,
            server,
        }
    }

    /// A key (`prefix` and a number) of a shard that only node 2 holds.
    fn key_on_node2(&self, prefix: &str) -> Vec<u8> {
        (0..10_000)
            .map(|i| format!("{prefix}{i}").into_bytes())
            .find(|k| self.node.replicas(self.node.shard_for(k)) == [2])
            .expect("some shard lives only on node 2")
    }

    async fn client(&self) -> KvClient<tonic::transport::Channel> {
        KvClient::connect(self.url.clone()).await.unwrap()
    }

    async fn close(self) {
        let _ = self.stop.send(());
        let _ = self.server.await;
        if let Ok(node) = Arc::try_unwrap(self.node) {
            node.close().await;
        }
    }
}

fn get(key: &[u8]) -> GetRequest {
    GetRequest {
        key: key.to_vec(),
        options: None,
    }
}

fn put(key: &[u8]) -> PutRequest {
    PutRequest {
        key: key.to_vec(),
        value: b"v".to_vec(),
    }
}

/// The `x-kvnode-outcome` of a failed call (panics if it succeeded).
fn outcome<T: std::fmt::Debug>(what: &str, result: Result<T, Status>) -> Option<String> {
    let status = result.expect_err(what);
    eprintln!("{what}: {status:?}");
    status
        .metadata()
        .get(OUTCOME)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Counts the HTTP/2 frames of one direction of a connection by type (after the client
/// preface), however the bytes are split across reads.
struct FrameCounter {
    preface_left: usize,
    buf: Vec<u8>,
}

impl FrameCounter {
    fn new() -> FrameCounter {
        FrameCounter {
            preface_left: 24,
            buf: Vec::new(),
        }
    }

    fn feed(&mut self, mut data: &[u8], mut count: impl FnMut(u8)) {
        let skip = self.preface_left.min(data.len());
        self.preface_left -= skip;
        data = &data[skip..];
        self.buf.extend_from_slice(data);
        while self.buf.len() >= 9 {
            let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
            if self.buf.len() < 9 + len {
                break;
            }
            count(self.buf[3]);
            self.buf.drain(..9 + len);
        }
    }
}

/// A listener that accepts, waits until a request (a HEADERS frame) has arrived, then resets
/// the connection: the request reached the peer, and no answer comes.
async fn resetting_listener() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut counter = FrameCounter::new();
                let mut requests = 0;
                let mut buf = [0u8; 16 * 1024];
                while requests == 0 {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => counter.feed(&buf[..n], |ty| {
                            if ty == HEADERS {
                                requests += 1;
                            }
                        }),
                    }
                }
                conn.set_zero_linger().unwrap();
                drop(conn);
            });
        }
    });
    addr
}

/// The stand-in for node 2. Client API: keys starting with `warm` are answered at once, keys
/// starting with `unknown` get `UNKNOWN` without any kvnode metadata (as a proxy or a broken
/// peer might answer), every other request never gets an answer. The `grpc-timeout` of every
/// request is recorded. Peer transport: `Ping` answers; nothing else is served.
#[derive(Clone, Default)]
struct StandIn {
    timeouts: Arc<Mutex<Vec<Option<String>>>>,
}

impl StandIn {
    async fn start() -> (StandIn, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stand_in = StandIn::default();
        let serving = stand_in.clone();
        tokio::spawn(async move {
            Server::builder()
                .add_service(KvServer::new(serving.clone()))
                .add_service(RaftTransportServer::new(serving))
                .serve_with_incoming(TcpIncoming::from(listener))
                .await
                .unwrap();
        });
        (stand_in, addr)
    }

    fn recorded_timeouts(&self) -> Vec<Option<String>> {
        self.timeouts.lock().unwrap().clone()
    }

    async fn answer<Req, Resp: Default>(
        &self,
        request: &Request<Req>,
        key: &[u8],
    ) -> Result<Response<Resp>, Status> {
        let timeout = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        self.timeouts.lock().unwrap().push(timeout);
        if key.starts_with(b"warm") {
            Ok(Response::new(Resp::default()))
        } else if key.starts_with(b"unknown") {
            Err(Status::unknown("transport error"))
        } else {
            std::future::pending().await
        }
    }
}

#[tonic::async_trait]
impl Kv for StandIn {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let key = request.get_ref().key.clone();
        self.answer(&request, &key).await
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let key = request.get_ref().key.clone();
        self.answer(&request, &key).await
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let key = request.get_ref().key.clone();
        self.answer(&request, &key).await
    }

    async fn compare_and_set(
        &self,
        request: Request<CompareAndSetRequest>,
    ) -> Result<Response<CompareAndSetResponse>, Status> {
        let key = request.get_ref().key.clone();
        self.answer(&request, &key).await
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
}

#[tonic::async_trait]
impl RaftTransport for StandIn {
    async fn append_entries(&self, _: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        Err(Status::unimplemented("stand-in"))
    }

    async fn vote(&self, _: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        Err(Status::unimplemented("stand-in"))
    }

    async fn pre_vote(&self, _: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        Err(Status::unimplemented("stand-in"))
    }

    async fn read_index(&self, _: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        Err(Status::unimplemented("stand-in"))
    }

    async fn install_snapshot(
        &self,
        _: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftReply>, Status> {
        Err(Status::unimplemented("stand-in"))
    }

    async fn ping(&self, _: Request<PingRequest>) -> Result<Response<PingReply>, Status> {
        Ok(Response::new(PingReply {
            boot_id: 2,
            leading: Vec::new(),
            map_epoch: 0,
        }))
    }

    async fn confirm_leadership(
        &self,
        _: Request<ConfirmRequest>,
    ) -> Result<Response<ConfirmReply>, Status> {
        Err(Status::unimplemented("stand-in"))
    }

    async fn fetch_map(
        &self,
        _: Request<FetchMapRequest>,
    ) -> Result<Response<FetchMapReply>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
}

/// A TCP proxy in front of node 2 that can hold everything node 1 sends on every connection
/// (as a paused peer or a partition would) and then deliver it at once (the peer resumes, the
/// partition heals). It counts the HTTP/2 frames node 1 sent, by type.
struct Proxy {
    addr: String,
    hold: watch::Sender<bool>,
    resets: Arc<AtomicUsize>,
}

impl Proxy {
    async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (hold, held) = watch::channel(false);
        let resets = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&resets);
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let outbound = TcpStream::connect(&target).await.unwrap();
                inbound.set_nodelay(true).unwrap();
                outbound.set_nodelay(true).unwrap();
                let (from_node1, mut to_node1) = inbound.into_split();
                let (mut from_node2, to_node2) = outbound.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_node2, &mut to_node1).await;
                });
                tokio::spawn(upstream(
                    from_node1,
                    to_node2,
                    held.clone(),
                    Arc::clone(&counted),
                ));
            }
        });
        Proxy { addr, hold, resets }
    }

    fn resets(&self) -> usize {
        self.resets.load(Ordering::SeqCst)
    }
}

/// Node 1 → node 2: counts `RST_STREAM` frames; while held, buffers instead of forwarding, and
/// on release delivers the whole buffer in one write.
async fn upstream(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut held: watch::Receiver<bool>,
    resets: Arc<AtomicUsize>,
) {
    let mut counter = FrameCounter::new();
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    counter.feed(&buf[..n], |ty| {
                        if ty == RST_STREAM {
                            resets.fetch_add(1, Ordering::SeqCst);
                        }
                    });
                    pending.extend_from_slice(&buf[..n]);
                }
            },
            changed = held.changed() => if changed.is_err() {
                return;
            },
        }
        if !*held.borrow() && !pending.is_empty() {
            if to.write_all(&pending).await.is_err() {
                return;
            }
            pending.clear();
        }
    }
}

/// Runs `n` copies of `call` at once and waits for all of them.
async fn all<T, F: Future<Output = T>>(n: usize, call: impl Fn() -> F) -> Vec<T> {
    futures::future::join_all((0..n).map(|_| call())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_that_could_not_connect_is_definite_and_a_sent_write_is_indeterminate() {
    // Nothing listens at node 2's address (a port held for nobody): the connection is
    // refused, nothing was sent.
    let free = PortReservation::new().unwrap();
    let nobody = free.addr().to_string();
    let node1 = Forwarder::start(&nobody, 100).await;
    let key = node1.key_on_node2("k");
    let mut kv = node1.client().await;
    assert_eq!(
        outcome("read, connection refused", kv.get(get(&key)).await).as_deref(),
        Some("definite")
    );
    assert_eq!(
        outcome("write, connection refused", kv.put(put(&key)).await).as_deref(),
        Some("definite")
    );
    node1.close().await;

    // Node 2 accepts, receives the request, and resets the connection: a write may have
    // reached the leader.
    let resetting = resetting_listener().await;
    let node1 = Forwarder::start(&resetting, 100).await;
    let key = node1.key_on_node2("k");
    let mut kv = node1.client().await;
    assert_eq!(
        outcome("read, reset after sending", kv.get(get(&key)).await).as_deref(),
        Some("definite")
    );
    assert_eq!(
        outcome("write, reset after sending", kv.put(put(&key)).await).as_deref(),
        Some("indeterminate")
    );
    node1.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_answer_without_outcome_gets_one_and_the_client_deadline_is_forwarded() {
    let (stand_in, addr) = StandIn::start().await;
    let node1 = Forwarder::start(&addr, 100).await;
    let mut kv = node1.client().await;

    // Node 2 answers UNKNOWN without kvnode metadata.
    let key = node1.key_on_node2("unknown");
    assert_eq!(
        outcome("read, status without outcome", kv.get(get(&key)).await).as_deref(),
        Some("definite")
    );
    assert_eq!(
        outcome("write, status without outcome", kv.put(put(&key)).await).as_deref(),
        Some("indeterminate")
    );

    // The client gives 500 ms (the node's own request timeout is 60 s): node 2 is told to
    // give up within what is left of those 500 ms.
    let key = node1.key_on_node2("slow");
    let before = stand_in.recorded_timeouts().len();
    let mut request = Request::new(put(&key));
    request.set_timeout(Duration::from_millis(500));
    kv.put(request).await.expect_err("node 2 never answers");
    let forwarded = eventually(PATIENCE, "node 2 to receive the forwarded put", || {
        let seen = stand_in.recorded_timeouts();
        async move { seen.get(before).cloned() }
    })
    .await;
    let forwarded = forwarded.expect("a forwarded request carries grpc-timeout");
    let deadline = parse_grpc_timeout(&forwarded);
    assert!(
        !deadline.is_zero() && deadline <= Duration::from_millis(500),
        "forwarded grpc-timeout {forwarded:?} ({deadline:?}) exceeds the client's 500 ms"
    );
    node1.close().await;
}

/// A `grpc-timeout` value as tonic writes it.
fn parse_grpc_timeout(value: &str) -> Duration {
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().unwrap();
    match unit {
        "n" => Duration::from_nanos(n),
        "u" => Duration::from_micros(n),
        "m" => Duration::from_millis(n),
        "S" => Duration::from_secs(n),
        "M" => Duration::from_secs(n * 60),
        "H" => Duration::from_secs(n * 3600),
        _ => panic!("bad grpc-timeout {value:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_forwarded_requests_cannot_close_the_raft_connection() {
    // Well over h2's limit of remotely reset streams waiting to be accepted (20).
    const CANCELLED: usize = 60;
    let (_stand_in, addr) = StandIn::start().await;
    let proxy = Proxy::start(addr).await;
    // Heartbeats (and so hibernation pings) of 1 s: none of them times out, and so none is
    // reset, while the proxy holds node 1's traffic below.
    let node1 = Forwarder::start(&proxy.addr, 1000).await;
    let peers = Arc::clone(node1.node.peers().expect("a clustered node"));
    let mut kv = node1.client().await;

    // Both kinds of traffic to node 2 are flowing.
    peers
        .ping(2, 1, PATIENCE)
        .await
        .expect("a ping before the fault");
    kv.get(get(&node1.key_on_node2("warm")))
        .await
        .expect("a forwarded read before the fault");

    // Node 2 stops reading (the proxy holds what node 1 sends). A ping is in flight on the
    // Raft connection while clients give up on many forwarded requests, each of which node 1
    // then cancels.
    proxy.hold.send_replace(true);
    let pinging = Arc::clone(&peers);
    let ping = tokio::spawn(async move { pinging.ping(2, 1, PATIENCE).await });
    let resets_before = proxy.resets();
    let slow = node1.key_on_node2("slow");
    let results = all(CANCELLED, || {
        let mut kv = kv.clone();
        let slow = slow.clone();
        async move {
            let mut request = Request::new(get(&slow));
            request.set_timeout(Duration::from_millis(300));
            kv.get(request).await
        }
    })
    .await;
    assert!(results.iter().all(Result::is_err), "node 2 answers nothing");
    eventually(
        PATIENCE,
        "node 1 to reset every forwarded stream its clients gave up on",
        || {
            let sent = proxy.resets() - resets_before;
            async move { (sent >= CANCELLED).then_some(()) }
        },
    )
    .await;

    // Node 2 reads everything at once: the requests and their resets, before it could
    // accept any of them.
    proxy.hold.send_replace(false);
    let ping = ping.await.unwrap();
    assert!(
        ping.is_ok(),
        "the ping on the Raft connection failed when node 2 read the cancelled forwards: {ping:?}"
    );
    // And the Raft connection keeps working.
    peers
        .ping(2, 1, PATIENCE)
        .await
        .expect("a ping after the fault");
    node1.close().await;
}
