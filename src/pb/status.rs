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
//! | `Config`, `IdentityMismatch`, `WrongCluster` | `FAILED_PRECONDITION` | definite |
//! | `AlreadyExists` | `ALREADY_EXISTS` | definite |
//!
//! Every status carries `x-kvnode-outcome: definite|indeterminate` and `x-kvnode-error` (the
//! variant name), so any gRPC client can tell whether a failed write may still commit.
//!
//! # Statuses that did not come from a kvnode handler
//!
//! A call that failed in the transport (no connection, connection lost, HTTP/2 error, tonic's
//! own deadline) yields a status without that metadata. Two functions classify such a status,
//! and both follow one rule: **definite only when the request provably never left this
//! process**, that is, the TCP connection could not be established (`never_sent`). Once a
//! connection exists the request may have been written, and an HTTP/2 or connection error, a
//! reset after sending, or a deadline says nothing about whether the receiver applied it, so
//! a write is then indeterminate. A read is definite whatever happened: it changes nothing.
//!
//! - [`from_status`]: a client's view of any status (kvnode's own or a transport failure);
//! - `forward_failure`: a node's view of its failed forwarded call, which the node then
//!   answers its client with through [`to_status`], so the client sees the contract's metadata
//!   and never a raw transport status.

use std::error::Error as _;
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::{Code, ConnectError, Status, TimeoutExpired};

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
/// Metadata key: the answering node's cluster, on `WrongCluster`.
pub const CLUSTER: &str = "x-kvnode-cluster";
/// Metadata key: the cluster the request named, on `WrongCluster`.
pub const REQUESTED_CLUSTER: &str = "x-kvnode-requested-cluster";
/// Request metadata set by a node forwarding a client request, so it is not forwarded again.
pub const FORWARDED: &str = "x-kvnode-forwarded";

/// A `grpc-timeout` value, if well-formed: at most 8 digits and a unit (`H`, `M`, `S`, `m`,
/// `u`, `n`), as gRPC over HTTP/2 specifies.
pub(crate) fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if !value.is_ascii() {
        return None;
    }
    // ASCII, so any split is on a char boundary.
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

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
        Error::AlreadyExists(_) => (Code::AlreadyExists, "AlreadyExists"),
        Error::WrongCluster { .. } => (Code::FailedPrecondition, "WrongCluster"),
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
    if let Error::WrongCluster { cluster, requested } = error {
        for (key, value) in [(CLUSTER, cluster), (REQUESTED_CLUSTER, requested)] {
            if let Ok(v) = value.parse() {
                md.insert(key, v);
            }
        }
    }
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
/// (no connection could be made) and `Timeout` (indeterminate for writes)
/// otherwise.
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
        "AlreadyExists" => Error::AlreadyExists(message),
        // The names are in the message; the variant keeps it whole.
        "WrongCluster" => {
            let text = |key| {
                let value = status.metadata().get(key)?.to_str().ok()?;
                Some(value.to_string())
            };
            Error::WrongCluster {
                cluster: text(CLUSTER).unwrap_or_default(),
                requested: text(REQUESTED_CLUSTER).unwrap_or_default(),
            }
        }
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
            Code::Unavailable if !write || never_sent(status) => Error::Unavailable {
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

/// True if `status` says the connection was never made, so the request was never written and
/// cannot have run anywhere.
///
/// tonic wraps every failure of its connector (DNS, TCP connect, connect timeout) in
/// [`ConnectError`] and keeps it as the status's source; the HTTP/2 handshake and everything
/// after it fail with other errors. A status that crossed a process boundary has no source,
/// so its text is checked too: that is how an older node relays its own failed connect.
pub(crate) fn never_sent(status: &Status) -> bool {
    let mut source = status.source();
    while let Some(e) = source {
        if e.is::<ConnectError>() {
            return true;
        }
        source = e.source();
    }
    let text = format!("{status:?}").to_ascii_lowercase();
    status.code() == Code::Unavailable
        && (text.contains("connection refused")
            || text.contains("tcp connect error")
            || text.contains("dns error"))
}

/// True if `status` comes from a kvnode handler (it carries the outcome), as opposed to a
/// failure of the transport or of tonic around the handler.
pub(crate) fn is_kvnode_status(status: &Status) -> bool {
    status.metadata().contains_key(OUTCOME)
}

/// True if `status` is a deadline expiring: the server's `DEADLINE_EXCEEDED`, or tonic's own
/// enforcement of `grpc-timeout` (client or server side), which it reports as `CANCELLED`.
fn timed_out(status: &Status) -> bool {
    if status.code() == Code::DeadlineExceeded {
        return true;
    }
    let mut source = status.source();
    while let Some(e) = source {
        if e.is::<TimeoutExpired>() {
            return true;
        }
        source = e.source();
    }
    status.code() == Code::Cancelled && status.message().contains("Timeout expired")
}

/// What a forwarded request that failed in the transport (`status` carries no outcome, see
/// [`is_kvnode_status`]) means for the client, after `elapsed`:
///
/// - no connection could be made ([`never_sent`]): `Unavailable`, definite (nothing was sent);
/// - the deadline passed: `Timeout`, indeterminate for a write;
/// - anything else (reset, HTTP/2 error, an unknown status) on a write: `Timeout`,
///   indeterminate: the leader may have received it and may still commit it;
/// - anything else on a read: `Unavailable`, definite (a read changes nothing).
pub(crate) fn forward_failure(
    status: &Status,
    shard: u64,
    target: u64,
    write: bool,
    elapsed: Duration,
) -> Error {
    let millis = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
    if never_sent(status) {
        Error::Unavailable {
            shard,
            reason: format!(
                "could not connect to node {target} to forward the request: {}",
                status.message()
            ),
        }
    } else if timed_out(status) {
        Error::Timeout {
            shard,
            operation: "forwarded request",
            millis,
            write,
        }
    } else if write {
        // A status with a source is this node's own (the transport failed); one without
        // crossed the wire, from something other than a kvnode handler.
        let operation = if status.source().is_some() {
            "forwarded write (the connection failed after sending)"
        } else {
            "forwarded write (the answer carried no outcome)"
        };
        Error::Timeout {
            shard,
            operation,
            millis,
            write,
        }
    } else {
        Error::Unavailable {
            shard,
            reason: format!(
                "forwarding the read to node {target} failed: {:?}: {}",
                status.code(),
                status.message()
            ),
        }
    }
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
            Error::AlreadyExists("address a:1 belongs to node 2".into()),
            Error::WrongCluster {
                cluster: "kvnode".into(),
                requested: "other".into(),
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
        let wrong = Error::WrongCluster {
            cluster: "kvnode".into(),
            requested: "other".into(),
        };
        let status = to_status(&wrong, |_| None);
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(from_status(&status, true).to_string(), wrong.to_string());
        let exists = to_status(&Error::AlreadyExists("x".into()), |_| None);
        assert_eq!(exists.code(), Code::AlreadyExists);
    }

    #[test]
    fn a_transport_failure_on_a_write_is_indeterminate() {
        let reset = Status::new(Code::Unavailable, "connection reset");
        assert!(!from_status(&reset, true).is_definite());
        assert!(from_status(&reset, false).is_definite());
        let cancelled = Status::new(Code::Cancelled, "cancelled");
        assert!(!from_status(&cancelled, true).is_definite());
    }

    #[test]
    fn a_forwarded_write_is_definite_only_if_no_connection_was_made() {
        let refused = || {
            Status::from_error(Box::new(ConnectError(Box::new(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            )))))
        };
        let after_sending = [
            Status::unavailable("connection reset"),
            Status::resource_exhausted("h2 protocol error: too_many_resets"),
            Status::unknown("transport error"),
            Status::from_error(Box::new(TimeoutExpired(()))),
            Status::deadline_exceeded("deadline"),
        ];
        let elapsed = Duration::from_millis(3);
        assert!(never_sent(&refused()));
        for write in [false, true] {
            let e = forward_failure(&refused(), 1, 2, write, elapsed);
            assert!(matches!(e, Error::Unavailable { .. }), "{e}");
            let status = to_status(&e, |_| None);
            assert_eq!(status.metadata().get(OUTCOME).unwrap(), "definite");
        }
        for status in &after_sending {
            assert!(!never_sent(status), "{status:?}");
            let write = forward_failure(status, 1, 2, true, elapsed);
            assert!(!write.is_definite(), "{status:?} -> {write}");
            let answer = to_status(&write, |_| None);
            assert_eq!(answer.metadata().get(OUTCOME).unwrap(), "indeterminate");
            let read = forward_failure(status, 1, 2, false, elapsed);
            assert!(read.is_definite(), "{status:?} -> {read}");
        }
        assert!(timed_out(&Status::from_error(Box::new(TimeoutExpired(())))));
        assert!(!is_kvnode_status(&Status::unknown("transport error")));
        assert!(is_kvnode_status(&to_status(&Error::Shutdown, |_| None)));
    }
}
