//! A span while it is recorded ([`Open`]) and as it is handed to the exporter ([`SpanData`]).
//! Attributes follow OpenTelemetry's semantic conventions for HTTP and gRPC (stable names:
//! `http.request.method`, `http.response.status_code`, `url.path`, `server.address`,
//! `rpc.grpc.status_code`, `error.type`, …); what the conventions have no name for is under
//! `weir.` (`weir.route`, `weir.backend`, `weir.client.identity`, `weir.server.identity`).
//!
//! A span whose response has a body ends when the body does ([`Open::end_with`]): a stream's
//! span covers the stream, and a gRPC call's status is taken from its trailers.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use std::sync::Arc;

use bytes::Bytes;
use http::Response;
use prometheus::IntCounter;
use tokio::sync::mpsc;

use crate::body::{Body, BoxError};
use crate::grpc::Outcome;

/// The span kinds Weir records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An inbound request, as the sidecar serves it to the application.
    Server,
    /// One outbound attempt, to one endpoint.
    Client,
    /// An outbound request as the application made it (its attempts are its children).
    Internal,
}

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Str(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}

/// A finished span, as the exporter takes it.
#[derive(Clone, Debug)]
pub struct SpanData {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    pub name: String,
    pub kind: Kind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Value)>,
    /// `Some(message)`: the span's status is ERROR.
    pub error: Option<String>,
}

/// Records spans: the handle every request uses. The default records nothing (no collector);
/// [`super::export::start`] makes one that feeds the exporter.
#[derive(Clone, Default)]
pub struct Tracer(Option<Arc<Inner>>);

struct Inner {
    queue: mpsc::Sender<SpanData>,
    sampling: f64,
    /// Spans dropped because the queue was full.
    queue_full: IntCounter,
}

impl Tracer {
    /// A tracer that puts finished spans in `queue` and samples new traces at `sampling`.
    pub(super) fn new(queue: mpsc::Sender<SpanData>, sampling: f64, queue_full: IntCounter) -> Self {
        Tracer(Some(Arc::new(Inner { queue, sampling, queue_full })))
    }

    /// Whether spans are exported at all.
    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Whether a new trace (one no caller started) is sampled.
    pub fn sample_new(&self) -> bool {
        match &self.0 {
            Some(i) if i.sampling >= 1.0 => true,
            Some(i) if i.sampling > 0.0 => rand::random::<f64>() < i.sampling,
            _ => false,
        }
    }

    pub(super) fn open(
        &self,
        trace_id: [u8; 16],
        span_id: [u8; 8],
        parent: Option<[u8; 8]>,
        kind: Kind,
        name: String,
    ) -> Option<Open> {
        self.0.as_ref()?;
        Some(Open::new(self.clone(), trace_id, span_id, parent, kind, name))
    }

    /// Queues a finished span, never waiting.
    fn record(&self, span: SpanData) {
        if let Some(i) = &self.0
            && i.queue.try_send(span).is_err()
        {
            i.queue_full.inc();
        }
    }
}

/// A span being recorded; [`Open::end`] (or dropping the response body it was given to)
/// hands it to the exporter.
pub struct Open {
    tracer: Tracer,
    data: SpanData,
    started: Instant,
}

impl Open {
    fn new(
        tracer: Tracer,
        trace_id: [u8; 16],
        span_id: [u8; 8],
        parent: Option<[u8; 8]>,
        kind: Kind,
        name: String,
    ) -> Self {
        let start = SystemTime::now();
        Open {
            tracer,
            data: SpanData {
                trace_id,
                span_id,
                parent,
                name,
                kind,
                start,
                end: start,
                attributes: Vec::with_capacity(12),
                error: None,
            },
            started: Instant::now(),
        }
    }

    pub fn span_id(&self) -> [u8; 8] {
        self.data.span_id
    }

    pub fn attr(&mut self, key: &'static str, value: impl Into<Value>) {
        self.data.attributes.push((key, value.into()));
    }

    /// The request's attributes: method, path, the authority called, the client's protocol.
    pub fn request<B>(&mut self, req: &http::Request<B>) {
        self.attr("http.request.method", req.method().as_str());
        self.attr("url.path", req.uri().path());
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()));
        if let Some(a) = authority {
            // `host[:port]`, the host of an IPv6 address in brackets.
            let (host, port) = match a.rsplit_once(':') {
                Some((h, p)) if !a.ends_with(']') => (h, p.parse::<u16>().ok()),
                _ => (a, None),
            };
            self.attr("server.address", host.trim_start_matches('[').trim_end_matches(']'));
            if let Some(port) = port {
                self.attr("server.port", i64::from(port));
            }
        }
        // Between sidecars the client's own protocol rides in a header.
        let version = match req.headers().get(&crate::body::ORIG_PROTO).map(|v| v.as_bytes()) {
            Some(b"HTTP/1.0") => "1.0",
            Some(b"HTTP/1.1") => "1.1",
            Some(b"HTTP/2") => "2",
            _ => match req.version() {
                http::Version::HTTP_10 => "1.0",
                http::Version::HTTP_2 => "2",
                _ => "1.1",
            },
        };
        self.attr("network.protocol.version", version);
    }

    /// Sets (or replaces) an attribute.
    fn set(&mut self, key: &'static str, value: Value) {
        match self.data.attributes.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.data.attributes.push((key, value)),
        }
    }

    /// Marks the span failed (`error.type` and an ERROR status).
    pub fn fail(&mut self, error_type: &str, message: impl Into<String>) {
        self.set("error.type", Value::Str(error_type.to_string()));
        self.data.error = Some(message.into());
    }

    /// Records a response's head: its status, and its gRPC status when the head carries it.
    fn head<B>(&mut self, rsp: &Response<B>) {
        let status = rsp.status().as_u16();
        self.set("http.response.status_code", Value::Int(i64::from(status)));
        if crate::grpc::is_grpc(rsp.headers()) {
            self.set("rpc.system", Value::Str("grpc".into()));
        }
        if let Some(outcome) = crate::grpc::outcome_at_head(rsp) {
            self.outcome(outcome);
        }
    }

    /// Judges how the call ended, as the semantic conventions do: a server span fails on a
    /// 5xx or a gRPC status that means the server could not serve; a client (or internal)
    /// span on any 4xx or 5xx, or any gRPC status but OK.
    fn outcome(&mut self, outcome: Outcome) {
        let failed = match (outcome, self.data.kind) {
            (Outcome::Http(s), Kind::Server) => s >= 500,
            (Outcome::Http(s), _) => s >= 400,
            (o, Kind::Server) => o.endpoint_failed().unwrap_or(false),
            (o, _) => o.failed(),
        };
        match outcome {
            Outcome::Grpc(code) => self.set("rpc.grpc.status_code", Value::Int(i64::from(code))),
            Outcome::GrpcNoStatus => self.set("rpc.grpc.status_code", Value::Int(2)),
            Outcome::Cancelled | Outcome::Http(_) => {}
        }
        if failed {
            let what = match outcome {
                Outcome::Http(s) => s.to_string(),
                Outcome::Grpc(code) => format!("grpc-status {code}"),
                Outcome::GrpcNoStatus => "the call ended without a grpc-status".to_string(),
                Outcome::Cancelled => "cancelled".to_string(),
            };
            let error_type = match outcome {
                Outcome::Http(s) => s.to_string(),
                Outcome::Grpc(code) => code.to_string(),
                _ => "incomplete".to_string(),
            };
            self.set("error.type", Value::Str(error_type));
            self.data.error = Some(what);
        }
    }

    /// Ends the span now, on the response head only (an attempt that is retried: its body is
    /// never read).
    pub fn end_at_head<B>(mut self, rsp: &Response<B>) {
        self.head(rsp);
        self.end();
    }

    /// Ends the span now.
    pub fn end(mut self) {
        self.data.end = self.data.start + self.started.elapsed();
        let Open { tracer, data, .. } = self;
        tracer.record(data);
    }

    /// Records `rsp`'s head and ends the span when its body ends (its trailers give a gRPC
    /// status), fails, or is dropped unfinished.
    pub fn end_with(mut self, rsp: Response<Body>) -> Response<Body> {
        self.head(&rsp);
        let grpc_pending = crate::grpc::is_grpc(rsp.headers()) && crate::grpc::status_in(rsp.headers()).is_none();
        rsp.map(|inner| http_body_util::BodyExt::boxed(Ending { inner, span: Some(self), grpc_pending }))
    }
}

/// A response body whose end ends a span.
struct Ending {
    inner: Body,
    span: Option<Open>,
    /// A gRPC call whose status is still to come (in the trailers).
    grpc_pending: bool,
}

impl Ending {
    fn finish(&mut self, outcome: Option<Outcome>) {
        if let Some(mut span) = self.span.take() {
            if let Some(o) = outcome {
                span.outcome(o);
            }
            span.end();
        }
    }
}

impl http_body::Body for Ending {
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
                    let outcome = self
                        .grpc_pending
                        .then(|| crate::grpc::status_in(trailers).map(Outcome::Grpc).unwrap_or(Outcome::GrpcNoStatus));
                    self.finish(outcome);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(span) = self.span.as_mut() {
                    span.fail("body", format!("the response body failed: {e}"));
                }
                self.finish(None);
            }
            Poll::Ready(None) => {
                let outcome = self.grpc_pending.then_some(Outcome::GrpcNoStatus);
                self.finish(outcome);
            }
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

impl Drop for Ending {
    fn drop(&mut self) {
        // Dropped before its end: the client went away (or the body was never read, which
        // for an empty body is its end).
        let inner = std::mem::replace(&mut self.inner, crate::body::empty());
        let cut_short = !http_body::Body::is_end_stream(&inner) && self.span.is_some();
        // What the body holds ends first (an attempt's span inside a request's ends before it).
        drop(inner);
        if cut_short && let Some(span) = self.span.as_mut() {
            span.attr("weir.cancelled", Value::Bool(true));
        }
        self.finish(None);
    }
}
