//! Bad input at the wire: every malformed or oversized request gets a clear gRPC status that
//! says the outcome is definite, garbage bytes on the port do not disturb the node, and
//! nothing already stored is lost.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use kvnode::pb::kv::kv_client::KvClient;
use kvnode::pb::kv::{GetRequest, PutRequest, ReadLevel, ReadOptions};
use kvnode::pb::status::OUTCOME;
use kvnode::{Config, Node};
use tonic::Code;

async fn serve_one() -> (
    tempfile::TempDir,
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        shards: 4,
        max_key_bytes: 32,
        max_value_bytes: 1024,
        ..Config::single_node(dir.path().join("data"))
    };
    let node = Arc::new(Node::open(config).await.unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        kvnode::server::serve(node.clone(), listener, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
        if let Ok(node) = Arc::try_unwrap(node) {
            node.close().await;
        }
    });
    (dir, addr, stop, server)
}

fn get(key: &[u8], level: i32, max_staleness_ms: u64) -> GetRequest {
    GetRequest {
        key: key.to_vec(),
        options: Some(ReadOptions {
            level,
            max_staleness_ms,
            ..Default::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_clear_definite_errors_and_lose_nothing() {
    let (_dir, addr, stop, server) = serve_one().await;
    let mut kv = KvClient::connect(format!("http://{addr}")).await.unwrap();
    kv.put(PutRequest {
        key: b"keep".to_vec(),
        value: b"safe".to_vec(),
    })
    .await
    .unwrap();

    let bad: Vec<(&str, Result<(), tonic::Status>)> = vec![
        (
            "empty key",
            kv.put(PutRequest {
                key: vec![],
                value: b"x".to_vec(),
            })
            .await
            .map(drop),
        ),
        (
            "key of 33 bytes",
            kv.put(PutRequest {
                key: vec![b'k'; 33],
                value: b"x".to_vec(),
            })
            .await
            .map(drop),
        ),
        (
            "value of 1025 bytes",
            kv.put(PutRequest {
                key: b"k".to_vec(),
                value: vec![0; 1025],
            })
            .await
            .map(drop),
        ),
        (
            "unknown read level 42",
            kv.get(get(b"k", 42, 0)).await.map(drop),
        ),
        (
            "bounded read needs max_staleness_ms",
            kv.get(get(b"k", ReadLevel::Bounded as i32, 0))
                .await
                .map(drop),
        ),
    ];
    for (what, result) in bad {
        let status = result.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        let outcome = status.metadata().get(OUTCOME).and_then(|v| v.to_str().ok());
        assert_eq!(outcome, Some("definite"), "{what}");
        let words: Vec<&str> = what.split(' ').collect();
        assert!(
            words.iter().all(|w| status.message().contains(w)),
            "{what}: message {:?} should explain it",
            status.message()
        );
    }

    // Garbage on the port: the connection is dropped, the node keeps serving.
    for junk in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0xffu8; 4096][..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00",
    ] {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = s.write_all(junk);
    }
    let got = kv
        .get(get(b"keep", ReadLevel::Linearizable as i32, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value.unwrap().value, b"safe");
    assert_eq!(
        kv.get(get(b"k", ReadLevel::Eventual as i32, 0))
            .await
            .unwrap()
            .into_inner()
            .value,
        None,
        "refused writes stored nothing"
    );
    stop.send(()).unwrap();
    server.await.unwrap();
}
