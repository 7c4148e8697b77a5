//! gRPC as the sidecar understands it. A call's HTTP status is nearly always 200; its outcome
//! is the `grpc-status` it ends with: in the trailers, or in the headers of a trailers-only
//! response. [`watch`] finds it as the response passes and reports it once, when it is known.
//!
//! Two verdicts come from one outcome (see [`Outcome`]): whether the *call* failed (metrics,
//! `weir stat`, the traffic reports that canary analysis reads: any status but `OK`, as
//! Linkerd counts), and whether the *endpoint* failed (breakers, outlier ejection, the
//! balancer's cost: only the statuses Envoy maps to a 5xx, so a `NOT_FOUND` answer never
//! ejects a healthy server).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;

use crate::body::{Body, BoxError};

pub use weir_api::grpc::{is_grpc, status_in};

/// How a response ended, as the mesh judges it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not gRPC: judged by the HTTP status.
    Http(u16),
    /// A gRPC call that ended with this `grpc-status`.
    Grpc(u32),
    /// A gRPC call that ended without a status: reset, or cut short by the server.
    GrpcNoStatus,
    /// The client went away before the call ended: no verdict on the server.
    Cancelled,
}

/// `grpc-status` label values, so that recording one allocates nothing.
const CODES: [&str; 17] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16"];

impl Outcome {
    /// The call failed, for metrics and reports: a 5xx, any gRPC status but `OK` (0), or a
    /// gRPC call with no status at all.
    pub fn failed(self) -> bool {
        match self {
            Outcome::Http(s) => s >= 500,
            Outcome::Grpc(code) => code != 0,
            Outcome::GrpcNoStatus => true,
            Outcome::Cancelled => false,
        }
    }

    /// The endpoint failed, for breakers, outlier ejection and the balancer: a 5xx, or a gRPC
    /// status that means the server could not serve (`UNKNOWN`, `DEADLINE_EXCEEDED`,
    /// `UNIMPLEMENTED`, `INTERNAL`, `UNAVAILABLE`, `DATA_LOSS`: the ones Envoy maps to 5xx),
    /// or no status. `None`: no verdict (the client cancelled).
    pub fn endpoint_failed(self) -> Option<bool> {
        match self {
            Outcome::Http(s) => Some(s >= 500),
            Outcome::Grpc(code) => Some(matches!(code, 2 | 4 | 12 | 13 | 14 | 15)),
            Outcome::GrpcNoStatus => Some(true),
            Outcome::Cancelled => None,
        }
    }

    /// The `grpc_status` label: empty for HTTP, the code (bounded: "other" past 16), "none"
    /// when a call ended without one, "cancelled" when the client went away.
    pub fn grpc_label(self) -> &'static str {
        match self {
            Outcome::Http(_) => "",
            Outcome::Grpc(code) => CODES.get(code as usize).copied().unwrap_or("other"),
            Outcome::GrpcNoStatus => "none",
            Outcome::Cancelled => "cancelled",
        }
    }

    /// The `classification` label.
    pub fn class_label(self) -> &'static str {
        match self {
            Outcome::Cancelled => "cancelled",
            o if o.failed() => "failure",
            _ => "success",
        }
    }
}

/// What to do once a call's outcome is known.
pub type OnEnd = Box<dyn FnOnce(Outcome) + Send + Sync>;

/// The outcome of a response whose head is all there is to judge: HTTP, or trailers-only
/// gRPC. `None` when it waits for the trailers (then see [`on_trailers`]).
pub fn outcome_at_head<B>(rsp: &Response<B>) -> Option<Outcome> {
    if !is_grpc(rsp.headers()) {
        return Some(Outcome::Http(rsp.status().as_u16()));
    }
    status_in(rsp.headers()).map(Outcome::Grpc)
}

/// Calls `on_end` with the outcome of a gRPC response whose status is still to come: when its
/// trailers pass (or the body fails, ends without them, or is dropped unfinished).
pub fn on_trailers(rsp: Response<Body>, on_end: OnEnd) -> Response<Body> {
    rsp.map(|inner| http_body_util::BodyExt::boxed(Watched { inner, on_end: Some(on_end) }))
}

struct Watched {
    inner: Body,
    on_end: Option<OnEnd>,
}

impl Watched {
    fn end(&mut self, outcome: Outcome) {
        if let Some(f) = self.on_end.take() {
            f(outcome);
        }
    }
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let outcome = status_in(trailers).map(Outcome::Grpc).unwrap_or(Outcome::GrpcNoStatus);
                    self.end(outcome);
                }
            }
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => self.end(Outcome::GrpcNoStatus),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.end(Outcome::Cancelled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, header};
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};

    fn grpc_response(frames: Vec<http_body::Frame<Bytes>>) -> Response<Body> {
        let stream = tokio_stream::iter(frames.into_iter().map(Ok::<_, BoxError>));
        let mut rsp = Response::new(crate::body::boxed(http_body_util::StreamBody::new(stream)));
        rsp.headers_mut().insert(header::CONTENT_TYPE, "application/grpc".parse().unwrap());
        rsp
    }

    /// What the metrics and the verdicts do: judge at the head when it tells, else at the trailers.
    fn watch(rsp: Response<Body>, on_end: OnEnd) -> Response<Body> {
        match outcome_at_head(&rsp) {
            Some(outcome) => {
                on_end(outcome);
                rsp
            }
            None => on_trailers(rsp, on_end),
        }
    }

    fn recorder() -> (Arc<Mutex<Vec<Outcome>>>, OnEnd) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        (seen, Box::new(move |o| s.lock().unwrap().push(o)))
    }

    #[tokio::test]
    async fn the_status_comes_from_the_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "14".parse().unwrap());
        let rsp = grpc_response(vec![
            http_body::Frame::data(Bytes::from_static(b"msg")),
            http_body::Frame::trailers(trailers),
        ]);
        let (seen, on_end) = recorder();
        let body = watch(rsp, on_end).into_body();
        assert!(seen.lock().unwrap().is_empty(), "not known before the trailers");
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers().and_then(status_in), Some(14), "trailers pass unchanged");
        assert_eq!(*seen.lock().unwrap(), [Outcome::Grpc(14)]);
        assert!(Outcome::Grpc(14).failed() && Outcome::Grpc(14).endpoint_failed() == Some(true));
        assert!(Outcome::Grpc(5).failed() && Outcome::Grpc(5).endpoint_failed() == Some(false));
    }

    #[tokio::test]
    async fn trailers_only_http_missing_and_cancelled() {
        let mut rsp = grpc_response(vec![]);
        rsp.headers_mut().insert("grpc-status", "0".parse().unwrap());
        let (seen, on_end) = recorder();
        drop(watch(rsp, on_end));
        assert_eq!(*seen.lock().unwrap(), [Outcome::Grpc(0)]);

        let (seen, on_end) = recorder();
        let rsp = Response::builder().status(503).body(crate::body::empty()).unwrap();
        drop(watch(rsp, on_end));
        assert_eq!(*seen.lock().unwrap(), [Outcome::Http(503)]);

        let (seen, on_end) = recorder();
        let body = watch(grpc_response(vec![http_body::Frame::data(Bytes::from_static(b"m"))]), on_end).into_body();
        body.collect().await.unwrap();
        assert_eq!(*seen.lock().unwrap(), [Outcome::GrpcNoStatus], "ended without a status");

        let (seen, on_end) = recorder();
        let mut body = watch(grpc_response(vec![http_body::Frame::data(Bytes::from_static(b"m"))]), on_end).into_body();
        body.frame().await.unwrap().unwrap();
        drop(body);
        assert_eq!(*seen.lock().unwrap(), [Outcome::Cancelled]);
        assert!(!Outcome::Cancelled.failed() && Outcome::Cancelled.endpoint_failed().is_none());
        assert_eq!(Outcome::Grpc(99).grpc_label(), "other");
    }
}
