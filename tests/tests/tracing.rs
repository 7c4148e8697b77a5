//! Spans exported over OTLP, received by a collector written with tonic (OTLP/gRPC) and hyper
//! (OTLP/HTTP) inside the test: a call through two sidecars with one retry gives five linked
//! spans with their attributes; a collector that never answers costs no request; a ratio
//! samples new traces within statistical bounds, and a caller's sampled flag is always obeyed.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use prost::Message;
use tokio::sync::Notify;
use weir_api::otlp::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use weir_api::otlp::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use weir_api::otlp::common::v1::any_value::Value;
use weir_api::otlp::trace::v1::{Span, span::SpanKind, status::StatusCode};
use weir_tests::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// A span as the collector got it, with its resource's attributes.
#[derive(Clone, Debug)]
struct Got {
    resource: HashMap<String, String>,
    span: Span,
    /// Which receiver took it: "grpc" or "http".
    via: &'static str,
}

impl Got {
    fn attr(&self, key: &str) -> Option<Value> {
        self.span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.clone()?.value)
    }

    fn str(&self, key: &str) -> String {
        match self.attr(key) {
            Some(Value::StringValue(s)) => s,
            other => panic!("{key} is not a string attribute of {}: {other:?}", self.describe()),
        }
    }

    fn int(&self, key: &str) -> i64 {
        match self.attr(key) {
            Some(Value::IntValue(i)) => i,
            other => panic!("{key} is not an integer attribute of {}: {other:?}", self.describe()),
        }
    }

    fn kind(&self) -> SpanKind {
        SpanKind::try_from(self.span.kind).unwrap()
    }

    fn failed(&self) -> bool {
        self.span.status.as_ref().is_some_and(|s| s.code == StatusCode::Error as i32)
    }

    fn describe(&self) -> String {
        format!("{:?} span {} of {}", self.kind(), hex(&self.span.span_id), self.resource["service.name"])
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Clone, Default)]
struct Store {
    spans: Arc<Mutex<Vec<Got>>>,
    arrived: Arc<Notify>,
}

impl Store {
    fn take(&self, req: ExportTraceServiceRequest, via: &'static str) {
        let mut spans = self.spans.lock().unwrap();
        for rs in req.resource_spans {
            let resource: HashMap<String, String> = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .filter_map(|kv| match kv.value.clone()?.value? {
                    Value::StringValue(s) => Some((kv.key.clone(), s)),
                    _ => None,
                })
                .collect();
            for ss in rs.scope_spans {
                assert_eq!(ss.scope.as_ref().map(|s| s.name.as_str()), Some("weir-proxy"));
                spans.extend(ss.spans.into_iter().map(|span| Got { resource: resource.clone(), span, via }));
            }
        }
        self.arrived.notify_waiters();
    }

    fn of_trace(&self, trace: &str) -> Vec<Got> {
        self.spans.lock().unwrap().iter().filter(|g| hex(&g.span.trace_id) == trace).cloned().collect()
    }

    fn all(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits (bounded) until `ok` holds of the spans received.
    async fn until(&self, what: &str, ok: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let notified = self.arrived.notified();
            let spans = self.all();
            if ok(&spans) {
                return spans;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("timed out waiting for {what}; spans received: {:#?}", self.all());
            }
        }
    }
}

#[tonic::async_trait]
impl TraceService for Store {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.take(request.into_inner(), "grpc");
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP collector: gRPC (tonic's generated server for the OTLP trace service) and HTTP
/// (`POST /v1/traces`, protobuf), both into one store.
struct Collector {
    store: Store,
    grpc: SocketAddr,
    http: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Collector {
    async fn start() -> Self {
        let store = Store::default();
        let grpc_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc = grpc_l.local_addr().unwrap();
        let svc = TraceServiceServer::new(store.clone());
        let grpc_task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc_l))
                .await
                .unwrap();
        });
        let http_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = http_l.local_addr().unwrap();
        let s = store.clone();
        let http_task = tokio::spawn(async move {
            loop {
                let Ok((io, _)) = http_l.accept().await else { continue };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let s = s.clone();
                        async move {
                            let ok = req.method() == http::Method::POST
                                && req.uri().path() == "/v1/traces"
                                && req.headers()[http::header::CONTENT_TYPE] == "application/x-protobuf";
                            let body = req.into_body().collect().await?.to_bytes();
                            let status = match ExportTraceServiceRequest::decode(body) {
                                Ok(r) if ok => {
                                    s.take(r, "http");
                                    200
                                }
                                _ => 400,
                            };
                            let answer = ExportTraceServiceResponse::default().encode_to_vec();
                            Ok::<_, hyper::Error>(
                                http::Response::builder()
                                    .status(status)
                                    .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                                    .body(Full::new(Bytes::from(answer)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
                        .await;
                });
            }
        });
        Self { store, grpc, http, tasks: vec![grpc_task, http_task] }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// An application that records the `traceparent` of every request, and answers 503 to the
/// first request carrying a given `x-fail-once` value (200 otherwise).
struct App {
    addr: SocketAddr,
    traceparents: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let traceparents = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Mutex::new(HashSet::new()));
        let tps = traceparents.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((io, _)) = listener.accept().await else { continue };
                let (tps, failed) = (tps.clone(), failed.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let tp = req.headers().get("traceparent").and_then(|v| v.to_str().ok()).unwrap_or("");
                        tps.lock().unwrap().push(tp.to_string());
                        let fail_once = req.headers().get("x-fail-once").and_then(|v| v.to_str().ok());
                        let status = match fail_once {
                            Some(key) if failed.lock().unwrap().insert(key.to_string()) => 503,
                            _ => 200,
                        };
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder().status(status).body(Full::new(Bytes::from("ok"))).unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
                        .await;
                });
            }
        });
        Self { addr, traceparents, task }
    }

    fn seen(&self) -> Vec<String> {
        self.traceparents.lock().unwrap().clone()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn trace_flags(collector: &str, protocol: &str, sampling: &str) -> Vec<String> {
    ["--trace-collector", collector, "--trace-protocol", protocol, "--trace-sampling", sampling]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

const RETRY_POLICY: &str = "apiVersion: weir.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: { name: web, namespace: test }\nspec:\n  targetRef: { service: web }\n  retries:\n    attempts: 1\n    retryOn: [5xx]\n    backoff: { base: 1ms, max: 1ms }\n    budget: { percent: 100, minRetriesPerSecond: 100 }\n";

/// The value of `metric` (with its labels, as the exposition writes them) on a sidecar.
async fn metric(admin: SocketAddr, series: &str) -> u64 {
    let text = admin_text(admin, "/metrics").await;
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse::<f64>().ok())).map_or(0, |v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_call_through_two_sidecars_is_five_linked_spans() {
    let collector = Collector::start().await;
    let app = App::start().await;
    let scratch = Scratch::new();
    // The server's sidecar exports over OTLP/HTTP, the client's over OTLP/gRPC.
    let server_flags = trace_flags(&format!("http://{}", collector.http), "http", "0");
    let mut client_flags = trace_flags(&format!("http://{}", collector.grpc), "grpc", "0");
    client_flags.extend(["--trace-attribute".into(), "deployment.environment=test".into()]);
    let mesh = IdentityMesh::start_with(&scratch, "web", app.addr, &["client"], &server_flags, &client_flags).await;
    let client = &mesh.clients[0];
    scratch.write("policy.yaml", RETRY_POLICY);
    wait_config(client.addr("admin"), "the retry policy", |c| c.to_string().contains("\"policies\":[{")).await;

    // Sampled by the caller (flag 01), though both sidecars' own ratio is 0.
    let caller = format!("00-{TRACE}-{CALLER_SPAN}-01");
    let r = send(
        &http1(),
        client.addr("outbound"),
        "GET",
        "web.test",
        "/orders/7?debug=1",
        &[("traceparent", &caller), ("x-fail-once", "a")],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "the retry succeeded: {}", r.body);
    assert_eq!(r.headers["weir-attempts"], "2");

    let spans = collector.store.until("five spans of the trace", |_| collector.store.of_trace(TRACE).len() >= 5).await;
    let spans: Vec<Got> = spans.into_iter().filter(|g| hex(&g.span.trace_id) == TRACE).collect();
    assert_eq!(spans.len(), 5, "{spans:#?}");
    let of = |k: SpanKind| spans.iter().filter(|g| g.kind() == k).cloned().collect::<Vec<_>>();
    let (request, attempts, servers) = (of(SpanKind::Internal), of(SpanKind::Client), of(SpanKind::Server));
    assert_eq!((request.len(), attempts.len(), servers.len()), (1, 2, 2), "{spans:#?}");

    // The client sidecar's request span: under the caller's span, the whole call.
    let request = &request[0];
    assert_eq!(hex(&request.span.parent_span_id), CALLER_SPAN);
    assert_eq!(request.via, "grpc");
    assert_eq!(request.resource["service.name"], "client");
    assert_eq!(request.resource["k8s.namespace.name"], "test");
    assert_eq!(request.resource["deployment.environment"], "test");
    assert_eq!(request.str("http.request.method"), "GET");
    assert_eq!(request.str("url.path"), "/orders/7", "the query is never recorded");
    assert_eq!(request.str("server.address"), "web.test");
    assert_eq!(request.str("peer.service"), "test/web");
    assert_eq!(request.str("weir.backend"), "test/web");
    assert_eq!(request.int("http.response.status_code"), 200);
    assert_eq!(request.int("weir.attempts"), 2);
    assert!(!request.failed());

    // Two attempts, siblings under the request span; the first failed, the second is a resend.
    let mut attempts = attempts;
    attempts.sort_by_key(|a| a.span.start_time_unix_nano);
    for a in &attempts {
        assert_eq!(a.span.parent_span_id, request.span.span_id, "{}", a.describe());
        assert_eq!(a.str("peer.service"), "test/web");
        assert_eq!(a.str("server.address"), "127.0.0.1");
        assert_eq!(a.str("weir.server.identity"), "spiffe://cluster.local/ns/test/sa/web");
        assert!(a.span.start_time_unix_nano >= request.span.start_time_unix_nano);
        assert!(a.span.end_time_unix_nano <= request.span.end_time_unix_nano);
    }
    assert_eq!(attempts[0].int("http.response.status_code"), 503);
    assert!(attempts[0].failed());
    assert!(attempts[0].attr("http.request.resend_count").is_none());
    assert_eq!(attempts[1].int("http.response.status_code"), 200);
    assert_eq!(attempts[1].int("http.request.resend_count"), 1);
    assert!(!attempts[1].failed());
    assert!(attempts[0].span.end_time_unix_nano <= attempts[1].span.start_time_unix_nano);

    // Each attempt is the parent of one server span at the server's sidecar, which saw the
    // client's identity; each server span is the parent the application saw.
    let seen = app.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for (attempt, status) in attempts.iter().zip([503, 200]) {
        let server = servers
            .iter()
            .find(|s| s.span.parent_span_id == attempt.span.span_id)
            .unwrap_or_else(|| panic!("no server span under {}: {servers:#?}", attempt.describe()));
        assert_eq!(server.via, "http");
        assert_eq!(server.resource["service.name"], "web");
        assert_eq!(server.str("weir.client.identity"), "spiffe://cluster.local/ns/test/sa/client");
        assert_eq!(server.str("url.path"), "/orders/7");
        assert_eq!(server.int("http.response.status_code"), status);
        assert_eq!(server.str("network.protocol.version"), "1.1", "the client's protocol, not the mesh hop's");
        assert!(server.failed() == (status == 503));
        let app_parent = format!("00-{TRACE}-{}-01", hex(&server.span.span_id));
        assert!(seen.contains(&app_parent), "the app saw {seen:?}, not {app_parent}");
    }
    let ids: HashSet<Vec<u8>> = spans.iter().map(|g| g.span.span_id.clone()).collect();
    assert_eq!(ids.len(), 5, "every span has its own id");
    // Counted once the collector's answer is in (which may follow its receipt).
    for sidecar in [client, &mesh.server] {
        let admin = sidecar.addr("admin");
        wait_until("the exports counted", Duration::from_secs(10), || async move {
            metric(admin, "weir_trace_spans_total{result=\"exported\"}").await >= 2
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_costs_no_request() {
    // Accepts connections and never answers: every export waits out its timeout.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_addr = hole.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = hole.accept().await {
            conns.push(c);
        }
    });
    let app = App::start().await;
    let scratch = Scratch::new();
    let flags = trace_flags(&format!("http://{hole_addr}"), "grpc", "1");
    let mesh = IdentityMesh::start_with(&scratch, "web", app.addr, &["client"], &flags, &flags).await;
    let client = &mesh.clients[0];
    let http = http1();
    for i in 0..300 {
        let r = send(&http, client.addr("outbound"), "GET", "web.test", "/", &[]).await.unwrap();
        assert_eq!(r.status, 200, "request {i}: {}", r.body);
    }
    // The spans were recorded (sampling 1) and their export failed: counted, nothing else.
    for sidecar in [client, &mesh.server] {
        let admin = sidecar.addr("admin");
        wait_until("a failed export", Duration::from_secs(20), || async move {
            metric(admin, "weir_trace_exports_total{result=\"failed\"}").await >= 1
        })
        .await;
        assert_eq!(metric(admin, "weir_trace_exports_total{result=\"ok\"}").await, 0);
    }
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_traces_are_sampled_at_the_ratio_and_callers_flags_are_obeyed() {
    let collector = Collector::start().await;
    let app = App::start().await;
    let scratch = Scratch::new();
    let flags = trace_flags(&format!("http://{}", collector.grpc), "grpc", "0.25");
    let mesh = IdentityMesh::start_with(&scratch, "web", app.addr, &["client"], &flags, &flags).await;
    let client = &mesh.clients[0];
    let http = http1();
    const N: usize = 400;
    for _ in 0..N {
        let r = send(&http, client.addr("outbound"), "GET", "web.test", "/new", &[]).await.unwrap();
        assert_eq!(r.status, 200);
    }
    // The application sees the decision in the flags; every sampled trace is recorded by both
    // sidecars (the server's follows the flag), and no other.
    let seen = app.seen();
    assert_eq!(seen.len(), N);
    let sampled: HashSet<String> =
        seen.iter().filter(|tp| tp.ends_with("-01")).map(|tp| tp[3..35].to_string()).collect();
    // Binomial(400, 0.25): mean 100, sd 8.7; [50, 150] is beyond 5.7 sd either way.
    assert!((50..=150).contains(&sampled.len()), "{} of {N} sampled at 0.25", sampled.len());
    let want = sampled.len() * 2;
    let spans = collector
        .store
        .until("the sampled traces' server and request spans", |spans| {
            spans.iter().filter(|g| matches!(g.kind(), SpanKind::Server | SpanKind::Internal)).count() >= want
        })
        .await;
    let traces = |k: SpanKind| -> HashSet<String> {
        spans.iter().filter(|g| g.kind() == k).map(|g| hex(&g.span.trace_id)).collect()
    };
    assert_eq!(traces(SpanKind::Internal), sampled, "the client sidecar recorded exactly the sampled traces");
    assert_eq!(traces(SpanKind::Server), sampled, "the server sidecar followed the flag");

    // A caller's decision wins over the ratio, both ways.
    let before = collector.store.all().len();
    for i in 0..20u32 {
        let not = format!("00-{:032x}-{CALLER_SPAN}-00", 0xa000 + i);
        let yes = format!("00-{:032x}-{CALLER_SPAN}-01", 0xb000 + i);
        for tp in [not, yes] {
            let r = send(&http, client.addr("outbound"), "GET", "web.test", "/caller", &[("traceparent", &tp)])
                .await
                .unwrap();
            assert_eq!(r.status, 200);
        }
    }
    let spans = collector
        .store
        .until("the callers' sampled traces", |spans| {
            let callers = spans[before..].iter().filter(|g| !sampled.contains(&hex(&g.span.trace_id)));
            callers.filter(|g| g.kind() == SpanKind::Server).count() >= 20
        })
        .await;
    // (Spans of the first load's traces may still be arriving: they are not the callers'.)
    let callers: HashSet<String> =
        spans[before..].iter().map(|g| hex(&g.span.trace_id)).filter(|t| !sampled.contains(t)).collect();
    let want: HashSet<String> = (0..20u32).map(|i| format!("{:032x}", 0xb000 + i)).collect();
    assert_eq!(callers, want, "all 20 sampled by the caller, none of the 20 it did not sample");
}
