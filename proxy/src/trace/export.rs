//! Span export over OTLP (gRPC, or HTTP with protobuf bodies), batched and bounded so that it
//! never slows or fails a request: a finished span goes into a bounded queue without waiting
//! (a full queue drops it and counts it); one task sends batches, each bounded in time; a
//! collector that is down or slow costs the spans of that batch, counted, and one log line
//! per outage. Nothing is retried: a trace is worth less than the traffic it describes.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use prost::Message;
use tokio::sync::mpsc;
use weir_api::otlp::collector::trace::v1::ExportTraceServiceResponse;
use weir_api::rt::Drain;

use super::span::{SpanData, Tracer};
use super::wire;

pub use weir_api::telemetry::Protocol;

/// Where and how spans are exported.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// The collector: `http://host:port` (for HTTP, a path other than `/` is used as given,
    /// else `/v1/traces`).
    pub collector: http::Uri,
    pub protocol: Protocol,
    /// The share of new traces sampled, in [0, 1] (a caller's sampled flag always wins).
    pub sampling: f64,
    /// Resource attributes (`service.name`, `k8s.pod.name`, …).
    pub resource: Vec<(String, String)>,
    /// Spans waiting for export at most; past it new spans are dropped.
    pub queue: usize,
    /// Spans per export at most.
    pub batch: usize,
    /// How long a span waits for its batch to fill at most.
    pub interval: Duration,
    /// How long one export may take.
    pub timeout: Duration,
}

impl ExportConfig {
    pub fn new(collector: http::Uri, protocol: Protocol, sampling: f64, resource: Vec<(String, String)>) -> Self {
        Self {
            collector,
            protocol,
            sampling,
            resource,
            queue: 4096,
            batch: 512,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
        }
    }
}

/// What export counts (`weir_trace_spans_total{result}`, `weir_trace_exports_total{result}`).
#[derive(Clone)]
pub struct TraceMetrics {
    exported: IntCounter,
    queue_full: IntCounter,
    export_failed: IntCounter,
    rejected: IntCounter,
    exports_ok: IntCounter,
    exports_failed: IntCounter,
}

impl TraceMetrics {
    pub fn register(registry: &Registry) -> Self {
        let spans = IntCounterVec::new(
            Opts::new(
                "weir_trace_spans_total",
                "Spans recorded, by what became of them: exported (the collector took them), queue_full (dropped: export could not keep up), export_failed (their batch failed: collector down, slow or refusing), rejected (the collector said so in a partial success)",
            ),
            &["result"],
        )
        .unwrap();
        let exports = IntCounterVec::new(
            Opts::new("weir_trace_exports_total", "Batches of spans sent to the collector, by result (ok, failed)"),
            &["result"],
        )
        .unwrap();
        registry.register(Box::new(spans.clone())).unwrap();
        registry.register(Box::new(exports.clone())).unwrap();
        Self {
            exported: spans.with_label_values(&["exported"]),
            queue_full: spans.with_label_values(&["queue_full"]),
            export_failed: spans.with_label_values(&["export_failed"]),
            rejected: spans.with_label_values(&["rejected"]),
            exports_ok: exports.with_label_values(&["ok"]),
            exports_failed: exports.with_label_values(&["failed"]),
        }
    }
}

/// A tracer whose spans land in the returned queue (for tests of what is recorded).
#[cfg(test)]
pub(crate) fn collecting(sampling: f64) -> (Tracer, mpsc::Receiver<SpanData>) {
    let (tx, rx) = mpsc::channel(64);
    let metrics = TraceMetrics::register(&Registry::new());
    (Tracer::new(tx, sampling, metrics.queue_full), rx)
}

/// Starts the exporter: the [`Tracer`] that feeds it and the task that sends. The task ends
/// once `drain` is signalled, after one last export of what is queued (bounded by the export
/// timeout).
pub fn start(cfg: ExportConfig, metrics: TraceMetrics, drain: Drain) -> (Tracer, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(cfg.queue.max(1));
    let tracer = Tracer::new(tx, cfg.sampling, metrics.queue_full.clone());
    let task = tokio::spawn(run(cfg, rx, metrics, drain));
    (tracer, task)
}

async fn run(cfg: ExportConfig, mut rx: mpsc::Receiver<SpanData>, metrics: TraceMetrics, drain: Drain) {
    let mut sink = Sink::new(&cfg);
    let resource = wire::resource(&cfg.resource);
    let mut batch: Vec<SpanData> = Vec::with_capacity(cfg.batch);
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut down = false;
    let stop = drain.signaled();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            span = rx.recv() => match span {
                Some(span) => {
                    batch.push(span);
                    if batch.len() >= cfg.batch {
                        sink.export(&cfg, &resource, &mut batch, &metrics, &mut down).await;
                    }
                }
                None => break,
            },
            _ = tick.tick() => {
                if !batch.is_empty() {
                    sink.export(&cfg, &resource, &mut batch, &metrics, &mut down).await;
                }
            }
        }
    }
    // What is queued goes out once more, in batches, before the sidecar exits.
    while let Ok(span) = rx.try_recv() {
        batch.push(span);
        if batch.len() >= cfg.batch {
            sink.export(&cfg, &resource, &mut batch, &metrics, &mut down).await;
        }
    }
    if !batch.is_empty() {
        sink.export(&cfg, &resource, &mut batch, &metrics, &mut down).await;
    }
}

/// The collector's end of the wire.
enum Sink {
    Grpc(tonic::client::Grpc<tonic::transport::Channel>),
    Http(Box<HttpSink>),
}

struct HttpSink {
    client: hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    uri: http::Uri,
}

impl Sink {
    fn new(cfg: &ExportConfig) -> Sink {
        match cfg.protocol {
            Protocol::Grpc => {
                // Connects on first use and again after a failure; never at start-up, so a
                // collector that is not up yet delays nothing.
                let channel = tonic::transport::Endpoint::from(cfg.collector.clone())
                    .connect_timeout(Duration::from_secs(2))
                    .tcp_nodelay(true)
                    .connect_lazy();
                Sink::Grpc(tonic::client::Grpc::new(channel))
            }
            Protocol::Http => {
                let mut parts = cfg.collector.clone().into_parts();
                if parts.path_and_query.as_ref().is_none_or(|p| p.path() == "/") {
                    parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/v1/traces"));
                }
                let uri = http::Uri::from_parts(parts).unwrap_or_else(|_| cfg.collector.clone());
                let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
                connector.set_connect_timeout(Some(Duration::from_secs(2)));
                connector.set_nodelay(true);
                let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(30))
                    .build(connector);
                Sink::Http(Box::new(HttpSink { client, uri }))
            }
        }
    }

    /// Sends `batch` (emptying it) and counts how it went.
    async fn export(
        &mut self,
        cfg: &ExportConfig,
        resource: &[u8],
        batch: &mut Vec<SpanData>,
        metrics: &TraceMetrics,
        down: &mut bool,
    ) {
        let count = batch.len() as u64;
        let request = Bytes::from(wire::export_request(resource, batch));
        batch.clear();
        let result = match tokio::time::timeout(cfg.timeout, self.send(request)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {:?}", cfg.timeout)),
        };
        match result {
            Ok(rejected) => {
                metrics.exports_ok.inc();
                metrics.exported.inc_by(count.saturating_sub(rejected));
                metrics.rejected.inc_by(rejected.min(count));
                if std::mem::take(down) {
                    tracing::info!(collector = %cfg.collector, "span export resumed");
                }
            }
            Err(error) => {
                metrics.exports_failed.inc();
                metrics.export_failed.inc_by(count);
                if !std::mem::replace(down, true) {
                    tracing::warn!(collector = %cfg.collector, %error, "span export failed; spans are dropped (counted in weir_trace_spans_total{{result=\"export_failed\"}}) until the collector answers");
                }
            }
        }
    }

    /// One export of an encoded `ExportTraceServiceRequest`; `Ok(spans the collector
    /// rejected)`.
    async fn send(&mut self, request: Bytes) -> Result<u64, String> {
        match self {
            Sink::Grpc(grpc) => {
                grpc.ready().await.map_err(|e| crate::errors::chain(&e))?;
                let path = http::uri::PathAndQuery::from_static(EXPORT_PATH);
                let rsp = grpc
                    .unary(tonic::Request::new(request), path, Encoded)
                    .await
                    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
                Ok(rejected(&rsp.into_inner()))
            }
            Sink::Http(http) => {
                let HttpSink { client, uri } = &**http;
                let req = http::Request::post(uri.clone())
                    .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(Full::new(request))
                    .map_err(|e| e.to_string())?;
                let rsp = client.request(req).await.map_err(|e| crate::errors::chain(&e))?;
                let status = rsp.status();
                // The answer is small (a partial success at most); a larger one is not read.
                let body = Limited::new(rsp.into_body(), 64 * 1024).collect().await.map(|b| b.to_bytes());
                if !status.is_success() {
                    return Err(format!("the collector answered {status}"));
                }
                Ok(body.ok().and_then(|b| ExportTraceServiceResponse::decode(b).ok()).map_or(0, |r| rejected(&r)))
            }
        }
    }
}

/// The OTLP trace service's one method.
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// A gRPC codec that sends a message already encoded ([`wire::export_request`]) and decodes
/// the collector's answer.
#[derive(Clone, Copy, Default)]
struct Encoded;

impl tonic::codec::Codec for Encoded {
    type Encode = Bytes;
    type Decode = ExportTraceServiceResponse;
    type Encoder = Encoded;
    type Decoder = Encoded;

    fn encoder(&mut self) -> Encoded {
        Encoded
    }

    fn decoder(&mut self) -> Encoded {
        Encoded
    }
}

impl tonic::codec::Encoder for Encoded {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put(dst, item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Encoded {
    type Item = ExportTraceServiceResponse;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<ExportTraceServiceResponse>, tonic::Status> {
        ExportTraceServiceResponse::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("the collector's answer: {e}")))
    }
}

fn rejected(rsp: &ExportTraceServiceResponse) -> u64 {
    rsp.partial_success.as_ref().map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::Kind;

    #[test]
    fn a_disabled_tracer_samples_nothing_and_records_nothing() {
        let t = Tracer::default();
        assert!(!t.enabled() && !t.sample_new());
        assert!(t.open([1; 16], [2; 8], None, Kind::Server, "GET".into()).is_none());
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        let registry = Registry::new();
        let metrics = TraceMetrics::register(&registry);
        let (tx, _rx) = mpsc::channel(2);
        let t = Tracer::new(tx, 1.0, metrics.queue_full.clone());
        for _ in 0..5 {
            t.open([1; 16], [2; 8], None, Kind::Server, "GET".into()).unwrap().end();
        }
        assert_eq!(metrics.queue_full.get(), 3);
    }
}
