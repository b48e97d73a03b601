//! The etcd target of the load generator: etcd v3's `KV.Range` and `KV.Put` over gRPC
//! ([`crate::etcd_pb`], generated from `proto/etcd.proto`), no etcd client library.
//!
//! Requests go round-robin over the given endpoints, one channel per endpoint shared by every
//! task, as etcd's own Go client balances them: a member that is not the leader forwards a
//! put to the leader through Raft, and for a linearizable read asks the leader for a read
//! index first. Reads are `linearizable` (`serializable: false`, etcd's default) or
//! `serializable` (`serializable: true`: the member's local state, no consensus round).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tonic::Request;
use tonic::transport::{Channel, Endpoint};

use super::{Level, LoadError, OpError, System, Target, error_chain};
use crate::etcd_pb::kv_client::KvClient;
use crate::etcd_pb::{PutRequest, RangeRequest};

/// An etcd cluster under load.
#[derive(Debug)]
pub struct EtcdTarget {
    level: Level,
    members: Vec<KvClient<Channel>>,
    next: AtomicUsize,
    timeout: Duration,
}

impl EtcdTarget {
    /// Connects to every endpoint (`host:port` or `http://host:port`), for reads at `level`
    /// (`linearizable` or `serializable`); every request gets `timeout`.
    ///
    /// # Errors
    ///
    /// [`LoadError::Level`] for a level etcd does not have; [`LoadError::Connect`] if there
    /// is no endpoint or one cannot be reached.
    pub async fn connect(
        endpoints: &[String],
        level: Level,
        timeout: Duration,
    ) -> Result<EtcdTarget, LoadError> {
        level.check_for(System::Etcd)?;
        let connect_error = |reason: String| LoadError::Connect {
            system: System::Etcd,
            endpoints: endpoints.join(","),
            reason,
        };
        if endpoints.is_empty() {
            return Err(connect_error("no endpoint given".to_string()));
        }
        let mut members = Vec::new();
        for addr in endpoints {
            let uri = if addr.contains("://") {
                addr.clone()
            } else {
                format!("http://{addr}")
            };
            let channel = Endpoint::from_shared(uri)
                .map_err(|e| connect_error(format!("{addr}: {}", error_chain(&e))))?
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .connect()
                .await
                .map_err(|e| connect_error(format!("{addr}: {}", error_chain(&e))))?;
            members.push(KvClient::new(channel));
        }
        Ok(EtcdTarget {
            level,
            members,
            next: AtomicUsize::new(0),
            timeout,
        })
    }

    /// The next member, round-robin.
    fn member(&self) -> KvClient<Channel> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.members.len();
        self.members[i].clone()
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(self.timeout);
        request
    }
}

impl Target for EtcdTarget {
    fn system(&self) -> System {
        System::Etcd
    }

    fn read_level(&self) -> Level {
        self.level
    }

    async fn put(&self, key: &[u8], value: Vec<u8>) -> Result<(), OpError> {
        let request = self.request(PutRequest {
            key: key.to_vec(),
            value,
            ..PutRequest::default()
        });
        self.member().put(request).await?;
        Ok(())
    }

    async fn get(&self, key: &[u8]) -> Result<(), OpError> {
        let request = self.request(RangeRequest {
            key: key.to_vec(),
            serializable: self.level == Level::Serializable,
            ..RangeRequest::default()
        });
        let reply = self.member().range(request).await?.into_inner();
        if reply.kvs.is_empty() {
            Err(OpError::NotFound(String::from_utf8_lossy(key).into_owned()))
        } else {
            Ok(())
        }
    }
}
