//! `weir demo-backend`: a small HTTP/1.1 + h2c server standing in for an application, which
//! can be told to fail a share of requests (gRPC calls with `UNAVAILABLE`, others with an HTTP
//! status) or add latency — at start or at run time via
//! `/_control?fail=0.2&status=503&latency=50ms`.
//!
//! Paths: `/` answers with the backend's name (also in the `x-weir-backend` header);
//! `/headers` answers with the request's method, version, authority and headers as JSON;
//! `/bytes?n=N` streams N bytes; `/sse?n=N&every=1s` sends N server-sent events, one per interval; `/upload` reads the whole body and answers with its length;
//! a gRPC call (`content-type: application/grpc...`, any path) is echoed: its messages come back
//! as they were sent, then the trailers `grpc-status: 0`;
//! `/_control` changes or shows the behaviour.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// What the backend does; shared so tests and `/_control` can change it while it runs.
#[derive(Debug)]
pub struct Behaviour {
    pub name: String,
    /// Share of requests answered with 500, in millionths.
    fail_ppm: AtomicU64,
    latency_us: AtomicU64,
    fail_status: std::sync::atomic::AtomicU16,
    pub served: AtomicU64,
}

impl Behaviour {
    pub fn new(name: &str, fail_rate: f64, latency: Duration) -> Arc<Self> {
        let b = Arc::new(Self {
            name: name.into(),
            fail_ppm: AtomicU64::new(0),
            latency_us: AtomicU64::new(0),
            fail_status: std::sync::atomic::AtomicU16::new(500),
            served: AtomicU64::new(0),
        });
        b.set_fail_rate(fail_rate);
        b.set_latency(latency);
        b
    }

    pub fn set_fail_rate(&self, rate: f64) {
        self.fail_ppm.store((rate.clamp(0.0, 1.0) * 1e6) as u64, Ordering::Relaxed);
    }

    /// The status failed requests get (default 500).
    pub fn set_fail_status(&self, status: u16) {
        if StatusCode::from_u16(status).is_ok() {
            self.fail_status.store(status, Ordering::Relaxed);
        }
    }

    pub fn set_latency(&self, d: Duration) {
        self.latency_us.store(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn status(&self) -> String {
        format!(
            "name={} fail={} latency={}us served={}\n",
            self.name,
            self.fail_ppm.load(Ordering::Relaxed) as f64 / 1e6,
            self.latency_us.load(Ordering::Relaxed),
            self.served.load(Ordering::Relaxed)
        )
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// Serves until `stop` completes.
pub async fn serve(listener: TcpListener, behaviour: Arc<Behaviour>, stop: impl std::future::Future<Output = ()>) {
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            _ = &mut stop => return,
            a = listener.accept() => match a { Ok((s, _)) => s, Err(_) => continue },
        };
        let _ = stream.set_nodelay(true);
        let b = behaviour.clone();
        let svc = hyper::service::service_fn(move |req| handle(b.clone(), req));
        let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

fn query<'a>(req: &'a Request<Incoming>, key: &str) -> Option<&'a str> {
    req.uri().query()?.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == key).map(|(_, v)| v)
}

async fn handle(b: Arc<Behaviour>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    if path == "/_control" {
        if let Some(f) = query(&req, "fail").and_then(|v| v.parse::<f64>().ok()) {
            b.set_fail_rate(f);
        }
        if let Some(s) = query(&req, "status").and_then(|v| v.parse().ok()) {
            b.set_fail_status(s);
        }
        if let Some(l) = query(&req, "latency").and_then(|v| weir_api::duration::parse(v).ok()) {
            b.set_latency(l);
        }
        return Ok(Response::new(full(b.status())));
    }
    b.served.fetch_add(1, Ordering::Relaxed);
    let latency = b.latency_us.load(Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_micros(latency)).await;
    }
    let fail = b.fail_ppm.load(Ordering::Relaxed);
    let failing = fail > 0 && rand::random_range(0..1_000_000) < fail;
    let mut rsp = if failing && is_grpc(&req) {
        // As a gRPC server fails a call: HTTP 200, trailers-only, `UNAVAILABLE`.
        let mut r = Response::new(full(Bytes::new()));
        r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
        r.headers_mut().insert("grpc-status", http::HeaderValue::from_static("14"));
        r.headers_mut().insert("grpc-message", http::HeaderValue::from_static("failed on purpose"));
        r
    } else if failing {
        let mut r = Response::new(full(format!("{} failed on purpose\n", b.name)));
        *r.status_mut() =
            StatusCode::from_u16(b.fail_status.load(Ordering::Relaxed)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        r
    } else if is_grpc(&req) {
        grpc_echo(req).await
    } else {
        match path.as_str() {
            "/headers" => {
                let headers: serde_json::Map<String, serde_json::Value> =
                    req.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").into())).collect();
                let authority =
                    req.uri().authority().map(|a| a.to_string()).or_else(|| {
                        req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()).map(String::from)
                    });
                let v = serde_json::json!({
                    "backend": b.name, "method": req.method().as_str(), "version": format!("{:?}", req.version()),
                    "authority": authority, "path": req.uri().path_and_query().map(|p| p.as_str()), "headers": headers,
                });
                Response::new(full(v.to_string()))
            }
            "/bytes" => {
                let n: u64 = query(&req, "n").and_then(|v| v.parse().ok()).unwrap_or(0);
                Response::new(stream_bytes(n))
            }
            "/sse" => {
                let n: u64 = query(&req, "n").and_then(|v| v.parse().ok()).unwrap_or(3);
                let every = query(&req, "every")
                    .and_then(|v| weir_api::duration::parse(v).ok())
                    .unwrap_or(Duration::from_secs(1));
                let mut r = Response::new(server_sent_events(n, every));
                r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/event-stream"));
                r
            }
            "/upload" => {
                let mut body = req.into_body();
                let mut total: u64 = 0;
                while let Some(frame) = body.frame().await {
                    match frame {
                        Ok(f) => total += f.data_ref().map(|d| d.len() as u64).unwrap_or(0),
                        Err(e) => {
                            let mut r = Response::new(full(format!("upload failed: {e}\n")));
                            *r.status_mut() = StatusCode::BAD_REQUEST;
                            return Ok(r);
                        }
                    }
                }
                Response::new(full(format!("{total}\n")))
            }
            _ => Response::new(full(format!("{}\n", b.name))),
        }
    };
    rsp.headers_mut()
        .insert("x-weir-backend", http::HeaderValue::from_str(&b.name).unwrap_or(http::HeaderValue::from_static("?")));
    Ok(rsp)
}

fn is_grpc(req: &Request<Incoming>) -> bool {
    weir_api::grpc::is_grpc(req.headers())
}

/// The largest gRPC request echoed (gRPC's own default message limit).
const GRPC_MAX_REQUEST: usize = 4 * 1024 * 1024;

/// Echoes a gRPC call: the request's frames (already length-prefixed) come back as the response
/// body, followed by `grpc-status: 0`; a request over [`GRPC_MAX_REQUEST`] or a broken body ends
/// with a gRPC error status instead.
async fn grpc_echo(req: Request<Incoming>) -> Response<Body> {
    let grpc_error = |code: &'static str, message: &str| {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static(code));
        if let Ok(m) = http::HeaderValue::from_str(message)
            && !message.is_empty()
        {
            trailers.insert("grpc-message", m);
        }
        trailers
    };
    let body = http_body_util::Limited::new(req.into_body(), GRPC_MAX_REQUEST);
    let (data, trailers) = match body.collect().await {
        Ok(c) => (c.to_bytes(), grpc_error("0", "")),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            (Bytes::new(), grpc_error("8", "request larger than 4 MiB"))
        }
        Err(e) => (Bytes::new(), grpc_error("13", &format!("reading the request: {e}"))),
    };
    let frames = [Ok(Frame::data(data)), Ok(Frame::trailers(trailers))];
    let mut rsp = Response::new(StreamBody::new(tokio_stream::iter(frames)).boxed());
    rsp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    rsp
}

/// `n` server-sent events, the first at once and then one every `every`.
fn server_sent_events(n: u64, every: Duration) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
    tokio::spawn(async move {
        for i in 0..n {
            if i > 0 {
                tokio::time::sleep(every).await;
            }
            if tx.send(Ok(Frame::data(Bytes::from(format!("data: event {i}\n\n"))))).await.is_err() {
                return;
            }
        }
    });
    StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed()
}

/// Streams `n` bytes in 64 KiB chunks, produced as the client reads them.
fn stream_bytes(n: u64) -> Body {
    const CHUNK: u64 = 64 * 1024;
    let chunk = Bytes::from(vec![b'w'; CHUNK as usize]);
    let frames = (0..n)
        .step_by(CHUNK as usize)
        .map(move |offset| Ok(Frame::data(chunk.slice(..(n - offset).min(CHUNK) as usize))));
    StreamBody::new(tokio_stream::iter(frames)).boxed()
}
