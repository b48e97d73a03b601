//! The kvnode target of the load generator: writes through the leader-aware
//! [`Client`], reads at a chosen [`Level`] either through the client or spread over all nodes.
//!
//! ## Where requests go, and why
//!
//! - **Writes** go through [`Client::put`]: straight to the key's shard leader, over one
//!   channel per node, following redirects (what any kvnode application does).
//! - **`linearizable` and `lease` reads** go through [`Client::get`] too, to the key's leader:
//!   the leader answers both without a hop (a follower would have to ask the leader for a read
//!   index, or forward a lease read to it).
//! - **`session`, `bounded:D` and `eventual` reads** are spread round-robin over **all** nodes
//!   with the generated gRPC client ([`KvClient`], one channel per node, shared by every task):
//!   these are the levels a follower can serve from its own state, which is their point, and
//!   the Rust client always picks the leader. A node that hosts no replica of the key's shard,
//!   or cannot prove the level, forwards the read; the cost of that shows in the latencies.
//! - `session` reads use one session for the whole load generator: every acknowledged write
//!   (the load phase's included) is observed into one shared token, and every read carries it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tonic::Request;
use tonic::transport::{Channel, Endpoint};

use super::{Level, LoadError, OpError, Session, System, Target, error_chain};
use ::kvnode::client::{Client, ClientOptions};
use ::kvnode::consistency::ReadOptions;
use ::kvnode::pb::MAX_MESSAGE_BYTES;
use ::kvnode::pb::convert;
use ::kvnode::pb::kv::GetRequest;
use ::kvnode::pb::kv::kv_client::KvClient;
use ::kvnode::pb::status::from_status;

/// A kvnode cluster under load.
#[derive(Debug)]
pub struct KvnodeTarget {
    level: Level,
    client: Client,
    reads: Reads,
    /// The load generator's session (session reads only).
    session: Option<Session>,
    timeout: Duration,
}

#[derive(Debug)]
enum Reads {
    /// Through the client, to the key's leader.
    Leader(ReadOptions),
    /// Round-robin over every node.
    Spread {
        nodes: Vec<KvClient<Channel>>,
        next: AtomicUsize,
        /// The wire options (session reads build theirs per read).
        options: ::kvnode::pb::kv::ReadOptions,
    },
}

impl KvnodeTarget {
    /// Connects to the cluster `endpoints` (`host:port` of any of its nodes) belongs to, for
    /// reads at `level`; every request gets `timeout` (retries included for client calls).
    ///
    /// # Errors
    ///
    /// [`LoadError::Level`] for `serializable` (etcd's level); [`LoadError::Connect`] if no
    /// endpoint answers, or (for spread reads) a node cannot be reached.
    pub async fn connect(
        endpoints: &[String],
        level: Level,
        timeout: Duration,
    ) -> Result<KvnodeTarget, LoadError> {
        level.check_for(System::Kvnode)?;
        let connect_error = |reason: String| LoadError::Connect {
            system: System::Kvnode,
            endpoints: endpoints.join(","),
            reason,
        };
        let options = ClientOptions {
            request_timeout: timeout,
            ..ClientOptions::default()
        };
        let client = Client::connect_with(endpoints.iter().cloned(), options)
            .await
            .map_err(|e| connect_error(e.to_string()))?;
        let reads = match level {
            Level::Linearizable => Reads::Leader(ReadOptions::linearizable()),
            Level::Lease => Reads::Leader(ReadOptions::lease()),
            Level::Session | Level::Bounded(_) | Level::Eventual => {
                let mut nodes = Vec::new();
                for (id, addr) in client.nodes() {
                    let channel = Endpoint::from_shared(format!("http://{addr}"))
                        .map_err(|e| {
                            connect_error(format!("node {id} at {addr}: {}", error_chain(&e)))
                        })?
                        .connect_timeout(Duration::from_secs(2))
                        .tcp_nodelay(true)
                        .connect()
                        .await
                        .map_err(|e| {
                            connect_error(format!("node {id} at {addr}: {}", error_chain(&e)))
                        })?;
                    nodes.push(
                        KvClient::new(channel)
                            .max_decoding_message_size(MAX_MESSAGE_BYTES)
                            .max_encoding_message_size(MAX_MESSAGE_BYTES),
                    );
                }
                let options = match level {
                    Level::Bounded(d) => ReadOptions::bounded(d),
                    _ => ReadOptions::eventual(),
                };
                Reads::Spread {
                    nodes,
                    next: AtomicUsize::new(0),
                    options: convert::read_options_to_wire(&options),
                }
            }
            Level::Serializable => unreachable!("refused by check_for"),
        };
        Ok(KvnodeTarget {
            level,
            client,
            reads,
            session: Session::for_level(level),
            timeout,
        })
    }

    fn wire_options(&self, fixed: &::kvnode::pb::kv::ReadOptions) -> ::kvnode::pb::kv::ReadOptions {
        match &self.session {
            Some(session) => convert::read_options_to_wire(&session.read_options()),
            None => fixed.clone(),
        }
    }
}

impl Target for KvnodeTarget {
    fn system(&self) -> System {
        System::Kvnode
    }

    fn read_level(&self) -> Level {
        self.level
    }

    async fn put(&self, key: &[u8], value: Vec<u8>) -> Result<(), OpError> {
        let receipt = self.client.put(key, value).await?;
        if let Some(session) = &self.session {
            session.observe(&receipt);
        }
        Ok(())
    }

    async fn get(&self, key: &[u8]) -> Result<(), OpError> {
        let found = match &self.reads {
            Reads::Leader(options) => self.client.get(key, options).await?.value.is_some(),
            Reads::Spread {
                nodes,
                next,
                options,
            } => {
                let node = next.fetch_add(1, Ordering::Relaxed) % nodes.len();
                let mut request = Request::new(GetRequest {
                    key: key.to_vec(),
                    options: Some(self.wire_options(options)),
                });
                request.set_timeout(self.timeout);
                match nodes[node].clone().get(request).await {
                    Ok(reply) => reply.into_inner().value.is_some(),
                    Err(status) => return Err(OpError::Kvnode(from_status(&status, false))),
                }
            }
        };
        if found {
            Ok(())
        } else {
            Err(OpError::NotFound(String::from_utf8_lossy(key).into_owned()))
        }
    }
}
