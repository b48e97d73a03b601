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
    Arc<Node>,
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
    let served = node.clone();
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
    (dir, addr, stop, server, served)
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
    let (_dir, addr, stop, server, _) = serve_one().await;
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

/// A message whose field 1 is a number where `PutRequest` has bytes: not a valid `PutRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct NotAPut {
    #[prost(uint64, tag = "1")]
    key: u64,
}

fn outcome_of(status: &tonic::Status) -> Option<&str> {
    status.metadata().get(OUTCOME).and_then(|v| v.to_str().ok())
}

/// Statuses tonic makes around kvnode's handlers (a request it cannot decode, an unknown
/// method, an oversized message, the client's deadline) carry the outcome too: definite where
/// nothing was done, indeterminate for a write cut off by its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_made_by_the_grpc_layer_say_their_outcome_too() {
    let (_dir, addr, stop, server, node) = serve_one().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    let mut call = async |path: &'static str| {
        grpc.ready().await.unwrap();
        let codec = tonic_prost::ProstCodec::<NotAPut, kvnode::pb::kv::PutResponse>::default();
        grpc.unary(
            tonic::Request::new(NotAPut { key: 7 }),
            http::uri::PathAndQuery::from_static(path),
            codec,
        )
        .await
        .expect_err(path)
    };
    let malformed = call("/kvnode.v1.Kv/Put").await;
    assert_eq!(malformed.code(), Code::Internal, "{malformed:?}");
    assert_eq!(outcome_of(&malformed), Some("definite"), "{malformed:?}");
    let unknown = call("/kvnode.v1.Kv/Nonsense").await;
    assert_eq!(unknown.code(), Code::Unimplemented, "{unknown:?}");
    assert_eq!(outcome_of(&unknown), Some("definite"), "{unknown:?}");

    let mut kv = KvClient::new(channel).max_encoding_message_size(usize::MAX);
    let oversized = kv
        .put(PutRequest {
            key: b"big".to_vec(),
            value: vec![0; kvnode::pb::MAX_MESSAGE_BYTES + 1],
        })
        .await
        .expect_err("a message over the limit");
    assert_eq!(outcome_of(&oversized), Some("definite"), "{oversized:?}");

    // A write whose deadline passes while it waits for its apply (held by the test hook): the
    // node answers it, not tonic's bare CANCELLED, and says it may still take effect.
    let stall = node
        .local_shard(node.shard_for(b"late"))
        .expect("a single node holds every shard")
        .apply_stall();
    stall.hold(kvnode::raft::apply_stall::Stage::BeforeWrite);
    let (status, outcome) = put_with_server_deadline(&addr, b"late", "300m").await;
    stall.release();
    assert_eq!(
        status,
        Some(Code::DeadlineExceeded as i32),
        "the write was held"
    );
    assert_eq!(outcome.as_deref(), Some("indeterminate"));
    let (status, outcome) = put_with_server_deadline(&addr, b"timely", "10S").await;
    assert_eq!(
        (status, outcome),
        (Some(0), None),
        "a write within its deadline"
    );
    // Indeterminate it was: the held write committed, and applies once released.
    let late = kv
        .get(get(b"late", ReadLevel::Linearizable as i32, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(late.value.map(|v| v.value), Some(b"x".to_vec()));
    drop(node);

    // Nothing was lost, and the node still serves.
    let got = kv
        .get(get(b"big", ReadLevel::Linearizable as i32, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value, None, "the oversized write stored nothing");
    stop.send(()).unwrap();
    server.await.unwrap();
}

/// Sends `Put(key, "x")` with `grpc-timeout: timeout` over a bare HTTP/2 connection, so that
/// only the server enforces the deadline (tonic's client would give up itself first), and
/// returns the answer's `grpc-status` and `x-kvnode-outcome` (from the headers of a
/// trailers-only answer, else from the trailers).
async fn put_with_server_deadline(
    addr: &str,
    key: &[u8],
    timeout: &str,
) -> (Option<i32>, Option<String>) {
    use prost::Message as _;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = http::Request::post(format!("http://{addr}/kvnode.v1.Kv/Put"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .body(())
        .unwrap();
    let (response, mut body) = client.send_request(request, false).unwrap();
    let message = PutRequest {
        key: key.to_vec(),
        value: b"x".to_vec(),
    }
    .encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&message);
    body.send_data(bytes::Bytes::from(frame), true).unwrap();
    let response = response.await.unwrap();
    let header = |map: &http::HeaderMap, name: &str| {
        map.get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut status = header(response.headers(), "grpc-status");
    let mut outcome = header(response.headers(), OUTCOME);
    if status.is_none() {
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let trailers = body.trailers().await.unwrap().unwrap_or_default();
        status = header(&trailers, "grpc-status");
        outcome = header(&trailers, OUTCOME);
    }
    (status.and_then(|s| s.parse().ok()), outcome)
}
