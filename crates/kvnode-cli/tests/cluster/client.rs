//! The Rust client and `kvctl` against an in-process single node served over gRPC on port 0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kvnode::client::{Client, ClientOptions, RetryPolicy};
use kvnode::consistency::{ServedLevel, Staleness};
use kvnode::{Config, Error, Node, ReadOptions, SessionToken};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::harness::kvctl;

/// A node serving on 127.0.0.1:0 until dropped via [`Served::stop`].
struct Served {
    addr: SocketAddr,
    node: Arc<Node>,
    stop: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Served {
    async fn start() -> Served {
        let dir = tempfile::tempdir().unwrap();
        let node = Arc::new(Node::open(Config::single_node(dir.path())).await.unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(kvnode::server::serve(node.clone(), listener, async {
            let _ = stopped.await;
        }));
        let server = tokio::spawn(async move { server.await.unwrap().unwrap() });
        Served {
            addr,
            node,
            stop,
            server,
            _dir: dir,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.server.await.unwrap();
        match Arc::try_unwrap(self.node) {
            Ok(node) => node.close().await,
            Err(node) => node.stop().await,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_speaks_the_embedded_api_over_grpc() {
    let served = Served::start().await;
    let client = Client::connect([served.addr.to_string()]).await.unwrap();

    // put / get, with receipts that agree.
    let w = client.put(b"greeting", b"hello".to_vec()).await.unwrap();
    assert_eq!(w.shard, client.shard_for(b"greeting"));
    assert_eq!(w.shard, served.node.shard_for(b"greeting"), "same ring");
    let got = client
        .get(b"greeting", &ReadOptions::linearizable())
        .await
        .unwrap();
    let value = got.value.unwrap();
    assert_eq!(value.value, b"hello");
    assert_eq!(value.version, w.index);
    assert_eq!(got.receipt.level, ServedLevel::Linearizable);
    assert_eq!(got.receipt.staleness, Staleness::Zero);
    assert_eq!(got.receipt.shard, w.shard);
    assert_eq!(got.receipt.node, served.node.id());
    assert!(got.receipt.applied_index >= w.index);

    // Every level is accepted; session reads see the session's writes.
    let mut token = SessionToken::new();
    token.observe_write(&w);
    for options in [
        ReadOptions::lease(),
        ReadOptions::session(&token),
        ReadOptions::bounded(Duration::from_millis(500)),
        ReadOptions::eventual(),
    ] {
        let got = client.get(b"greeting", &options).await.unwrap();
        assert_eq!(got.value.unwrap().value, b"hello", "{options:?}");
    }
    let absent = client
        .get(b"nobody", &ReadOptions::default())
        .await
        .unwrap();
    assert_eq!(absent.value, None);

    // compare-and-set: a mismatch reports the current value; a match applies.
    let miss = client
        .compare_and_set(b"greeting", Some(b"bye"), Some(b"x".to_vec()))
        .await
        .unwrap();
    assert!(!miss.applied);
    assert_eq!(miss.current.unwrap().value, b"hello");
    let hit = client
        .compare_and_set(b"greeting", Some(b"hello"), Some(b"hi".to_vec()))
        .await
        .unwrap();
    assert!(hit.applied);
    assert!(hit.receipt.index > miss.receipt.index);
    let created = client
        .compare_and_set(b"fresh", None, Some(b"1".to_vec()))
        .await
        .unwrap();
    assert!(created.applied);

    // delete says whether the key existed.
    assert!(client.delete(b"greeting").await.unwrap().existed);
    assert!(!client.delete(b"greeting").await.unwrap().existed);
    let gone = client
        .get(b"greeting", &ReadOptions::default())
        .await
        .unwrap();
    assert_eq!(gone.value, None);

    // Invalid requests come back as definite, non-retryable errors.
    let empty = client.put(b"", b"v".to_vec()).await.unwrap_err();
    assert!(matches!(empty, Error::InvalidArgument(_)), "{empty}");
    assert!(empty.is_definite() && !empty.is_retryable());

    // status mirrors the node.
    let status = client.status().await.unwrap();
    assert_eq!(status.node, served.node.id());
    assert_eq!(status.shard_count, served.node.config().shards);
    assert_eq!(status.shards.len(), status.shard_count as usize);
    assert_eq!(status.nodes[&served.node.id()], served.addr.to_string());
    for s in &status.shards {
        assert_eq!(s.replicas, vec![served.node.id()]);
        assert_eq!(s.leader, Some(served.node.id()));
        assert_eq!(s.role, "leader");
        assert!(s.applied_index <= s.commit_index);
    }
    let node_view = client.node_status(served.node.id()).await.unwrap();
    assert_eq!(node_view.cluster_id, status.cluster_id);

    served.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_cluster_is_a_definite_failure() {
    // A port nothing listens on (held for nobody while the test runs).
    let free = kvnode_testkit::ports::PortReservation::new().unwrap();
    let addr = free.addr();
    let e = Client::connect([addr.to_string()]).await.unwrap_err();
    assert!(matches!(e, Error::Unavailable { .. }), "{e}");
    assert!(e.is_definite());

    // A node that goes away: a write to it was refused at connect time, so nothing happened.
    let served = Served::start().await;
    let options = ClientOptions {
        request_timeout: Duration::from_secs(2),
        retry: RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        },
        ..ClientOptions::default()
    };
    let client = Client::connect_with([served.addr.to_string()], options)
        .await
        .unwrap();
    client.put(b"k", b"v".to_vec()).await.unwrap();
    served.stop().await;
    let e = client.put(b"k", b"w".to_vec()).await.unwrap_err();
    assert!(
        e.is_definite(),
        "{e}: a refused connection cannot have run the put"
    );
    assert!(matches!(e, Error::Unavailable { .. }), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn kvctl_puts_gets_deletes_and_shows_status() {
    let served = Served::start().await;
    let addr = served.addr;

    let (code, out, err) = kvctl(addr, &["put", "city", "Lisbon"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("OK shard="), "{out}");
    assert!(out.contains(" index="), "{out}");

    let (code, out, err) = kvctl(addr, &["get", "city"]).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "Lisbon", "{out}");
    let receipt = lines[1];
    for field in [
        "level=linearizable",
        "node=1",
        "shard=",
        "applied_index=",
        "staleness=0",
    ] {
        assert!(receipt.contains(field), "{field} missing in {receipt:?}");
    }

    let (code, out, _) = kvctl(addr, &["get", "city", "--level", "bounded:500ms"]).await;
    assert_eq!(code, 0);
    assert!(out.starts_with("Lisbon\n"), "{out}");
    let (_, out, _) = kvctl(addr, &["get", "city", "--level", "eventual"]).await;
    // The linearizable read above proved how fresh this replica is, so even an eventual read
    // can bound its staleness.
    assert!(
        out.contains("level=eventual") && out.contains("staleness=<="),
        "{out}"
    );

    let (code, out, _) = kvctl(addr, &["cas", "city", "--expect", "Porto", "--new", "Faro"]).await;
    assert_eq!(code, 0);
    assert!(out.starts_with("mismatch: current=Lisbon"), "{out}");
    let (_, out, _) = kvctl(
        addr,
        &["cas", "city", "--expect", "Lisbon", "--new", "Faro"],
    )
    .await;
    assert!(out.starts_with("applied\nshard="), "{out}");

    let (_, out, _) = kvctl(addr, &["del", "city"]).await;
    assert!(out.starts_with("deleted\nshard="), "{out}");
    let (_, out, _) = kvctl(addr, &["del", "city"]).await;
    assert!(out.starts_with("not found\n"), "{out}");
    let (_, out, _) = kvctl(addr, &["get", "city"]).await;
    assert!(out.starts_with("(not found)\nlevel="), "{out}");

    let (code, out, err) = kvctl(addr, &["status"]).await;
    assert_eq!(code, 0, "{err}");
    // The status reports the effective replication factor: capped by the node count (1).
    let (shards, rf) = (served.node.config().shards, 1);
    assert!(
        out.starts_with("cluster=") && out.contains(&format!("shards={shards} rf={rf}")),
        "{out}"
    );
    assert!(out.contains("n1 commit/applied"), "{out}");
    let rows = out
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("n1"))
        .count();
    assert_eq!(rows, shards as usize, "{out}");

    // Usage errors exit with 2, failures with 1 and say whether anything happened.
    let (code, _, _) = kvctl(addr, &["get", "city", "--level", "strong"]).await;
    assert_eq!(code, 2);
    let (code, _, _) = kvctl(addr, &["get", "city", "--fail-if-stale"]).await;
    assert_eq!(code, 2);
    let (code, _, err) = kvctl(addr, &["put", "", "v"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("invalid argument") && err.contains("outcome: definite"),
        "{err}"
    );

    served.stop().await;
    let (code, _, err) = kvctl(addr, &["get", "city"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("outcome: definite"), "{err}");
}
