//! Generated gRPC code (`proto/*.proto`), the conversions between wire and domain types (the
//! only place that knows both), the one mapping between errors and gRPC statuses
//! ([`status`]) and the client API's message limit: everything the server and the client
//! share, so the client builds without the server.

pub mod cluster_map;
pub mod status;

/// Largest client-API gRPC message accepted or sent, by nodes and clients alike (a value up
/// to the configured maximum plus framing).
pub const MAX_MESSAGE_BYTES: usize = 80 * 1024 * 1024;

/// The client API (`proto/kv.proto`).
#[allow(missing_docs, clippy::all)]
pub mod kv {
    tonic::include_proto!("kvnode.v1");
}

/// The admin API (`proto/admin.proto`): the cluster map and membership.
#[allow(missing_docs, clippy::all)]
pub mod admin {
    tonic::include_proto!("kvnode.admin.v1");
}

/// The peer transport (`proto/raft.proto`): between nodes only.
#[allow(missing_docs, clippy::all)]
#[doc(hidden)]
pub mod raft {
    tonic::include_proto!("kvnode.raft.v1");
}

/// Conversions between wire (`kv`) and domain types.
pub mod convert {
    use std::time::Duration;

    use super::kv;
    use crate::consistency::{
        Fallback, ReadLevel, ReadOptions, ReadReceipt, ServedLevel, SessionToken, Staleness,
        WriteReceipt,
    };
    use crate::error::Error;
    use crate::value::VersionedValue;

    /// Decodes a request's read options; an unknown level or a bounded read without a bound
    /// is `InvalidArgument`.
    pub fn read_options(options: Option<&kv::ReadOptions>) -> Result<ReadOptions, Error> {
        let Some(o) = options else {
            return Ok(ReadOptions::default());
        };
        let level = kv::ReadLevel::try_from(o.level)
            .map_err(|_| Error::InvalidArgument(format!("unknown read level {}", o.level)))?;
        let level = match level {
            kv::ReadLevel::Unspecified | kv::ReadLevel::Linearizable => ReadLevel::Linearizable,
            kv::ReadLevel::Lease => ReadLevel::Lease,
            kv::ReadLevel::Session => {
                let mut token = SessionToken::new();
                for seen in o.session.iter().flat_map(|s| &s.seen) {
                    token.observe(seen.shard, seen.index);
                }
                ReadLevel::Session(token)
            }
            kv::ReadLevel::Bounded => {
                if o.max_staleness_ms == 0 {
                    return Err(Error::InvalidArgument(
                        "a bounded read needs max_staleness_ms > 0".into(),
                    ));
                }
                ReadLevel::Bounded {
                    max_staleness: Duration::from_millis(o.max_staleness_ms),
                    fallback: if o.fail_if_stale {
                        Fallback::Fail
                    } else {
                        Fallback::Linearizable
                    },
                }
            }
            kv::ReadLevel::Eventual => ReadLevel::Eventual,
        };
        Ok(ReadOptions { level })
    }

    /// Encodes read options for the wire.
    pub fn read_options_to_wire(options: &ReadOptions) -> kv::ReadOptions {
        let mut o = kv::ReadOptions::default();
        match &options.level {
            ReadLevel::Linearizable => o.level = kv::ReadLevel::Linearizable as i32,
            ReadLevel::Lease => o.level = kv::ReadLevel::Lease as i32,
            ReadLevel::Session(token) => {
                o.level = kv::ReadLevel::Session as i32;
                o.session = Some(kv::SessionToken {
                    seen: token
                        .entries()
                        .map(|(shard, index)| kv::ShardIndex { shard, index })
                        .collect(),
                });
            }
            ReadLevel::Bounded {
                max_staleness,
                fallback,
            } => {
                o.level = kv::ReadLevel::Bounded as i32;
                o.max_staleness_ms = max_staleness.as_millis().max(1) as u64;
                o.fail_if_stale = *fallback == Fallback::Fail;
            }
            ReadLevel::Eventual => o.level = kv::ReadLevel::Eventual as i32,
        }
        o
    }

    fn level_to_wire(level: ServedLevel) -> kv::ReadLevel {
        match level {
            ServedLevel::Linearizable => kv::ReadLevel::Linearizable,
            ServedLevel::Lease => kv::ReadLevel::Lease,
            ServedLevel::Session => kv::ReadLevel::Session,
            ServedLevel::Bounded => kv::ReadLevel::Bounded,
            ServedLevel::Eventual => kv::ReadLevel::Eventual,
        }
    }

    fn level_from_wire(level: i32) -> Result<ServedLevel, Error> {
        Ok(match kv::ReadLevel::try_from(level) {
            Ok(kv::ReadLevel::Linearizable) => ServedLevel::Linearizable,
            Ok(kv::ReadLevel::Lease) => ServedLevel::Lease,
            Ok(kv::ReadLevel::Session) => ServedLevel::Session,
            Ok(kv::ReadLevel::Bounded) => ServedLevel::Bounded,
            Ok(kv::ReadLevel::Eventual) => ServedLevel::Eventual,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "receipt with read level {level}"
                )));
            }
        })
    }

    /// Encodes a read receipt.
    pub fn read_receipt(r: &ReadReceipt) -> kv::ReadReceipt {
        let (known, ms) = match r.staleness {
            Staleness::Zero => (true, 0),
            Staleness::AtMost(d) => (true, d.as_millis() as u64),
            Staleness::Unknown => (false, 0),
        };
        kv::ReadReceipt {
            level: level_to_wire(r.level) as i32,
            node: r.node,
            shard: r.shard,
            applied_index: r.applied_index,
            staleness_known: known,
            staleness_ms: ms,
        }
    }

    /// Decodes a read receipt.
    pub fn read_receipt_from_wire(r: &kv::ReadReceipt) -> Result<ReadReceipt, Error> {
        let level = level_from_wire(r.level)?;
        let staleness = match (r.staleness_known, level) {
            (false, _) => Staleness::Unknown,
            (true, ServedLevel::Linearizable | ServedLevel::Lease) if r.staleness_ms == 0 => {
                Staleness::Zero
            }
            (true, _) => Staleness::AtMost(Duration::from_millis(r.staleness_ms)),
        };
        Ok(ReadReceipt {
            level,
            node: r.node,
            shard: r.shard,
            applied_index: r.applied_index,
            staleness,
        })
    }

    /// Encodes a write receipt (with the node that committed it).
    pub fn write_receipt(r: &WriteReceipt, node: u64) -> kv::WriteReceipt {
        kv::WriteReceipt {
            shard: r.shard,
            index: r.index,
            node,
        }
    }

    /// Decodes a write receipt.
    pub fn write_receipt_from_wire(r: &kv::WriteReceipt) -> WriteReceipt {
        WriteReceipt {
            shard: r.shard,
            index: r.index,
        }
    }

    /// Encodes a versioned value.
    pub fn value(v: &VersionedValue) -> kv::Value {
        kv::Value {
            value: v.value.clone(),
            version: v.version,
        }
    }

    /// Decodes a versioned value.
    pub fn value_from_wire(v: &kv::Value) -> VersionedValue {
        VersionedValue {
            version: v.version,
            value: v.value.clone(),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn read_options_round_trip_and_bad_levels_are_refused() {
            let mut token = SessionToken::new();
            token.observe(3, 9);
            for o in [
                ReadOptions::linearizable(),
                ReadOptions::lease(),
                ReadOptions::session(&token),
                ReadOptions::bounded(Duration::from_millis(250)),
                ReadOptions::eventual(),
            ] {
                assert_eq!(read_options(Some(&read_options_to_wire(&o))).unwrap(), o);
            }
            let unknown = kv::ReadOptions {
                level: 42,
                ..Default::default()
            };
            assert!(matches!(
                read_options(Some(&unknown)),
                Err(Error::InvalidArgument(_))
            ));
            let unbounded = kv::ReadOptions {
                level: kv::ReadLevel::Bounded as i32,
                ..Default::default()
            };
            assert!(matches!(
                read_options(Some(&unbounded)),
                Err(Error::InvalidArgument(_))
            ));
        }
    }
}
