//! The last guard of the wire contract: every error a client gets from the `Kv` service carries
//! `x-kvnode-outcome` (`proto/kv.proto`), also the ones kvnode's own code never sees.
//!
//! kvnode's handlers answer every error through [`crate::pb::status::to_status`], which says
//! whether the outcome is definite. Some statuses are made by tonic around the handlers,
//! though, and [`OutcomeLayer`] (between tonic's server and the routes) makes sure they say it
//! too:
//!
//! - **The client's deadline.** tonic's server enforces `grpc-timeout` by dropping the handler
//!   and answering `CANCELLED` with no metadata, from a layer outside any layer of ours. So
//!   this layer enforces the same deadline itself, a moment sooner: it starts its timer before
//!   tonic starts its own (tonic calls the inner service first and then arms its sleep) and
//!   tonic polls the inner service before its sleep, so whenever tonic's timer has fired ours
//!   has too, and ours answers. The handler is dropped, so no work outlives the deadline, and
//!   the answer is `DEADLINE_EXCEEDED` with `x-kvnode-error: Timeout` and an outcome: a write
//!   (`Put`, `Delete`, `CompareAndSet`) is `indeterminate` (it may have been proposed, and may
//!   still commit), a read `definite`.
//! - **Statuses made before a handler ran**: a request tonic cannot decode (malformed
//!   protobuf, a message over [`crate::pb::MAX_MESSAGE_BYTES`], an unsupported compression) or
//!   a method that does not exist. They are tagged on the way out: `definite`, nothing was
//!   done; a write that ended `CANCELLED`, `DEADLINE_EXCEEDED`, `UNKNOWN`, `UNAVAILABLE` or
//!   `ABORTED` without kvnode's metadata would be `indeterminate`.
//!
//! An answer that already says its outcome passes unchanged, and so does every answer of the
//! peer service. Only trailers-only answers (the status in the response headers, as tonic sends
//! every unary error) can be tagged; an error tonic raises after the response headers went out
//! (encoding a reply) is not one kvnode's unary API can produce below the message limit.

use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http::HeaderValue;
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::pb::status::{ERROR_KIND, OUTCOME, parse_grpc_timeout};

/// The `Kv` service's path prefix (`package kvnode.v1; service Kv`).
const KV_PREFIX: &str = "/kvnode.v1.Kv/";

/// The `Kv` methods that change state.
const WRITES: [&str; 3] = ["Put", "Delete", "CompareAndSet"];

/// Adds `x-kvnode-outcome` to the `Kv` service's errors that lack it (see the module doc).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct OutcomeLayer;

impl<S> tower_layer::Layer<S> for OutcomeLayer {
    type Service = Outcome<S>;

    fn layer(&self, inner: S) -> Outcome<S> {
        Outcome { inner }
    }
}

/// The service [`OutcomeLayer`] wraps around the server's routes.
#[derive(Debug, Clone)]
pub(crate) struct Outcome<S> {
    inner: S,
}

/// What kind of request an answer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Not the `Kv` service: left alone.
    Other,
    /// A `Kv` read (or `Status`): an error is definite.
    Read,
    /// A `Kv` write: an error that may have come after a proposal is indeterminate.
    Write,
}

fn kind(path: &str) -> Kind {
    match path.strip_prefix(KV_PREFIX) {
        None => Kind::Other,
        Some(method) if WRITES.contains(&method) => Kind::Write,
        Some(_) => Kind::Read,
    }
}

/// The outcome a `kind` answer with `code` and no outcome of its own has, if it needs one.
fn outcome_for(kind: Kind, code: Code) -> Option<&'static str> {
    match (kind, code) {
        (Kind::Other, _) | (_, Code::Ok) => None,
        (
            Kind::Write,
            Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Unavailable
            | Code::Aborted,
        ) => Some("indeterminate"),
        _ => Some("definite"),
    }
}

/// Tags `response` as [`outcome_for`] says, if it is a trailers-only error without an outcome.
fn tag<B>(kind: Kind, mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    if headers.contains_key(OUTCOME) {
        return response;
    }
    let Some(code) = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return response;
    };
    if let Some(outcome) = outcome_for(kind, Code::from_i32(code)) {
        headers.insert(OUTCOME, HeaderValue::from_static(outcome));
        headers.insert(ERROR_KIND, HeaderValue::from_static("Transport"));
    }
    response
}

/// The answer to a `kind` request whose client's deadline passed.
fn expired(kind: Kind) -> http::Response<tonic::body::Body> {
    let mut status = Status::deadline_exceeded(
        "the client's deadline (grpc-timeout) passed before the request was served",
    );
    let outcome = match kind {
        Kind::Write => "indeterminate",
        Kind::Read | Kind::Other => "definite",
    };
    let md = status.metadata_mut();
    md.insert(OUTCOME, MetadataValue::from_static(outcome));
    md.insert(ERROR_KIND, MetadataValue::from_static("Timeout"));
    status.into_http()
}

impl<S, ReqBody> tower_service::Service<http::Request<ReqBody>> for Outcome<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let kind = kind(request.uri().path());
        // Taken before tonic arms its own timer (see the module doc).
        let deadline = match kind {
            Kind::Other => None,
            Kind::Read | Kind::Write => request
                .headers()
                .get("grpc-timeout")
                .and_then(|v| v.to_str().ok())
                .and_then(parse_grpc_timeout)
                .and_then(|t| tokio::time::Instant::now().checked_add(t)),
        };
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = match deadline {
                None => answer.await?,
                Some(at) => match tokio::time::timeout_at(at, answer).await {
                    Ok(response) => response?,
                    Err(_) => return Ok(expired(kind)),
                },
            };
            Ok(tag(kind, response))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(code: Code) -> http::Response<()> {
        let mut response = http::Response::new(());
        response
            .headers_mut()
            .insert("grpc-status", HeaderValue::from(code as i32));
        response
    }

    fn outcome(response: &http::Response<()>) -> Option<&str> {
        response
            .headers()
            .get(OUTCOME)
            .and_then(|v| v.to_str().ok())
    }

    #[test]
    fn methods_are_told_apart_by_path() {
        assert_eq!(kind("/kvnode.v1.Kv/Put"), Kind::Write);
        assert_eq!(kind("/kvnode.v1.Kv/Delete"), Kind::Write);
        assert_eq!(kind("/kvnode.v1.Kv/CompareAndSet"), Kind::Write);
        assert_eq!(kind("/kvnode.v1.Kv/Get"), Kind::Read);
        assert_eq!(kind("/kvnode.v1.Kv/Status"), Kind::Read);
        assert_eq!(kind("/kvnode.v1.Kv/Nonsense"), Kind::Read);
        assert_eq!(kind("/kvnode.v1.Raft/AppendEntries"), Kind::Other);
    }

    #[test]
    fn a_write_cut_short_is_indeterminate_and_everything_else_definite() {
        assert_eq!(
            outcome(&tag(Kind::Write, error(Code::Cancelled))),
            Some("indeterminate")
        );
        assert_eq!(
            outcome(&tag(Kind::Write, error(Code::DeadlineExceeded))),
            Some("indeterminate")
        );
        assert_eq!(
            outcome(&tag(Kind::Write, error(Code::Internal))),
            Some("definite"),
            "a decode error: the handler never ran"
        );
        assert_eq!(
            outcome(&tag(Kind::Read, error(Code::Cancelled))),
            Some("definite")
        );
        assert_eq!(outcome(&tag(Kind::Other, error(Code::Cancelled))), None);
        assert_eq!(outcome(&tag(Kind::Write, error(Code::Ok))), None);
        assert_eq!(outcome(&tag(Kind::Write, http::Response::new(()))), None);
    }

    #[test]
    fn an_expired_write_is_indeterminate_and_an_expired_read_definite() {
        let said = |kind| {
            let response = expired(kind);
            let header = |k| {
                response
                    .headers()
                    .get(k)
                    .map(|v| v.to_str().unwrap().to_string())
            };
            (header("grpc-status"), header(OUTCOME), header(ERROR_KIND))
        };
        let code = Some((Code::DeadlineExceeded as i32).to_string());
        let timeout = Some("Timeout".to_string());
        assert_eq!(
            said(Kind::Write),
            (code.clone(), Some("indeterminate".into()), timeout.clone())
        );
        assert_eq!(said(Kind::Read), (code, Some("definite".into()), timeout));
    }

    #[test]
    fn an_answer_that_says_its_outcome_is_left_alone() {
        let mut answered = error(Code::DeadlineExceeded);
        answered
            .headers_mut()
            .insert(OUTCOME, HeaderValue::from_static("definite"));
        assert_eq!(outcome(&tag(Kind::Write, answered)), Some("definite"));
    }
}
