//! The one mapping between [`Error`] and gRPC [`Status`], used by the server (to answer) and by
//! the client (to understand the answer).
//!
//! | error | gRPC code | outcome |
//! |---|---|---|
//! | `InvalidArgument` | `INVALID_ARGUMENT` | definite |
//! | `NotLeader` | `FAILED_PRECONDITION` + `x-kvnode-leader`, `x-kvnode-leader-addr` | definite |
//! | `Unavailable`, `Shutdown` | `UNAVAILABLE` | definite |
//! | `Timeout` | `DEADLINE_EXCEEDED` | indeterminate for writes |
//! | `LeaderChanged` | `ABORTED` | indeterminate |
//! | `Storage`, `ShardStopped` | `INTERNAL` | indeterminate |
//! | `Config`, `IdentityMismatch` | `FAILED_PRECONDITION` | definite |
//!
//! Every status carries `x-kvnode-outcome: definite|indeterminate` and `x-kvnode-error` (the
//! variant name), so any gRPC client can tell whether a failed write may still commit.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::error::Error;

/// Metadata key: `definite` or `indeterminate`.
pub const OUTCOME: &str = "x-kvnode-outcome";
/// Metadata key: the error variant.
pub const ERROR_KIND: &str = "x-kvnode-error";
/// Metadata key: the leader's node id, on `NotLeader`.
pub const LEADER: &str = "x-kvnode-leader";
/// Metadata key: the leader's address, on `NotLeader` (when known).
pub const LEADER_ADDR: &str = "x-kvnode-leader-addr";
/// Metadata key: the shard concerned, when there is one.
pub const SHARD: &str = "x-kvnode-shard";
/// Request metadata set by a node forwarding a client request, so it is not forwarded again.
pub const FORWARDED: &str = "x-kvnode-forwarded";

/// Turns `error` into a status. `leader_addr` resolves a leader id to its address.
pub fn to_status(error: &Error, leader_addr: impl Fn(u64) -> Option<String>) -> Status {
    let (code, kind) = match error {
        Error::InvalidArgument(_) => (Code::InvalidArgument, "InvalidArgument"),
        Error::Config(_) => (Code::FailedPrecondition, "Config"),
        Error::IdentityMismatch { .. } => (Code::FailedPrecondition, "IdentityMismatch"),
        Error::NotLeader { .. } => (Code::FailedPrecondition, "NotLeader"),
        Error::Unavailable { .. } => (Code::Unavailable, "Unavailable"),
        Error::Timeout { .. } => (Code::DeadlineExceeded, "Timeout"),
        Error::LeaderChanged { .. } => (Code::Aborted, "LeaderChanged"),
        Error::Storage(_) => (Code::Internal, "Storage"),
        Error::ShardStopped { .. } => (Code::Internal, "ShardStopped"),
        Error::Shutdown => (Code::Unavailable, "Shutdown"),
    };
    let mut status = Status::new(code, error.to_string());
    let md = status.metadata_mut();
    let outcome = if error.is_definite() {
        "definite"
    } else {
        "indeterminate"
    };
    md.insert(OUTCOME, MetadataValue::from_static(outcome));
    md.insert(ERROR_KIND, MetadataValue::from_static(kind));
    if let Some(shard) = shard_of(error) {
        md.insert(SHARD, MetadataValue::from(shard));
    }
    if let Error::NotLeader {
        leader_hint: Some(leader),
        ..
    }
    | Error::LeaderChanged {
        leader_hint: Some(leader),
        ..
    } = error
    {
        md.insert(LEADER, MetadataValue::from(*leader));
        if let Some(addr) = leader_addr(*leader)
            && let Ok(v) = addr.parse()
        {
            md.insert(LEADER_ADDR, v);
        }
    }
    status
}

fn shard_of(error: &Error) -> Option<u64> {
    match error {
        Error::NotLeader { shard, .. }
        | Error::Unavailable { shard, .. }
        | Error::Timeout { shard, .. }
        | Error::LeaderChanged { shard, .. }
        | Error::ShardStopped { shard, .. } => Some(*shard),
        _ => None,
    }
}

fn metadata_u64(status: &Status, key: &str) -> Option<u64> {
    status.metadata().get(key)?.to_str().ok()?.parse().ok()
}

/// Turns a status from a kvnode server back into an [`Error`]. Statuses that did not come from
/// kvnode (transport failures) become `Unavailable` when nothing can have happened
/// (connection refused) and `Timeout` (indeterminate for writes) otherwise.
pub fn from_status(status: &Status, write: bool) -> Error {
    let shard = metadata_u64(status, SHARD).unwrap_or(0);
    let message = status.message().to_string();
    let kind = status
        .metadata()
        .get(ERROR_KIND)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match kind {
        "InvalidArgument" => Error::InvalidArgument(message),
        "NotLeader" => Error::NotLeader {
            shard,
            leader_hint: metadata_u64(status, LEADER),
        },
        "Unavailable" => Error::Unavailable {
            shard,
            reason: message,
        },
        "Shutdown" => Error::Shutdown,
        "Timeout" => Error::Timeout {
            shard,
            operation: "request",
            millis: 0,
            write,
        },
        "LeaderChanged" => Error::LeaderChanged {
            shard,
            leader_hint: metadata_u64(status, LEADER),
        },
        "ShardStopped" | "Storage" | "Config" | "IdentityMismatch" => Error::ShardStopped {
            shard,
            reason: message,
        },
        _ => match status.code() {
            Code::InvalidArgument => Error::InvalidArgument(message),
            // The request never reached a kvnode handler: nothing happened.
            Code::Unavailable if !write || is_connect_failure(status) => Error::Unavailable {
                shard,
                reason: message,
            },
            _ => Error::Timeout {
                shard,
                operation: "request (transport)",
                millis: 0,
                write,
            },
        },
    }
}

/// True if the status says the connection was never made (so a request cannot have run).
fn is_connect_failure(status: &Status) -> bool {
    let text = format!("{status:?}").to_ascii_lowercase();
    text.contains("connection refused")
        || text.contains("tcp connect error")
        || text.contains("dns error")
}

/// The leader address a `NotLeader` status carries, if any.
pub fn leader_addr(status: &Status) -> Option<String> {
    status
        .metadata()
        .get(LEADER_ADDR)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_survive_the_round_trip_with_their_outcome() {
        let cases = [
            Error::InvalidArgument("key too long".into()),
            Error::NotLeader {
                shard: 3,
                leader_hint: Some(2),
            },
            Error::Unavailable {
                shard: 4,
                reason: "no quorum".into(),
            },
            Error::Timeout {
                shard: 5,
                operation: "write",
                millis: 10,
                write: true,
            },
            Error::LeaderChanged {
                shard: 6,
                leader_hint: None,
            },
        ];
        for e in cases {
            let status = to_status(&e, |id| Some(format!("10.0.0.{id}:7000")));
            let outcome = status.metadata().get(OUTCOME).unwrap().to_str().unwrap();
            assert_eq!(outcome == "definite", e.is_definite(), "{e}");
            let back = from_status(&status, true);
            assert_eq!(back.is_definite(), e.is_definite(), "{e} -> {back}");
            assert_eq!(
                std::mem::discriminant(&back),
                std::mem::discriminant(&e),
                "{e} -> {back}"
            );
        }
        let nl = to_status(
            &Error::NotLeader {
                shard: 1,
                leader_hint: Some(2),
            },
            |_| Some("127.0.0.1:7002".into()),
        );
        assert_eq!(leader_addr(&nl).as_deref(), Some("127.0.0.1:7002"));
    }

    #[test]
    fn a_transport_failure_on_a_write_is_indeterminate() {
        let reset = Status::new(Code::Unavailable, "connection reset");
        assert!(!from_status(&reset, true).is_definite());
        assert!(from_status(&reset, false).is_definite());
        let cancelled = Status::new(Code::Cancelled, "cancelled");
        assert!(!from_status(&cancelled, true).is_definite());
    }
}
