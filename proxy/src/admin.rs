//! The sidecar's admin endpoints: `/live`, `/ready`, `/metrics`, `/config`, `/tap`, `/log-level`.
//!
//! The admin port is reachable from outside the pod (the kubelet probes `/live` and `/ready`,
//! Prometheus scrapes `/metrics`), so what reveals configuration (`/config`: the whole mesh
//! snapshot), traffic (`/tap`: the requests as they pass) or changes anything
//! (`POST /log-level`) answers only loopback clients.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::sync::watch;
use weir_api::rt::{json, text};

use crate::config::Config;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct Admin {
    pub config: watch::Receiver<Option<Arc<Config>>>,
    /// Present when the sidecar has a workload identity: not ready until it has a certificate.
    pub credentials: Option<watch::Receiver<Option<Arc<crate::tls::Credentials>>>>,
    pub metrics: Metrics,
    pub draining: Arc<AtomicBool>,
    pub taps: crate::tap::Taps,
}

/// What the admin port answers with: a small body, or a tap's stream of events.
pub type AdminBody = BoxBody<Bytes, Infallible>;

/// A tap's events as a response body (NDJSON); the tap closes when the client goes away.
struct TapBody(crate::tap::Subscription);

impl http_body::Body for TapBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0.events.poll_recv(cx).map(|e| e.map(|line| Ok(http_body::Frame::data(line))))
    }
}

impl Admin {
    pub async fn handle(self, req: Request<Incoming>, peer: std::net::SocketAddr) -> Response<AdminBody> {
        if req.uri().path() == "/tap" {
            return self.tap(&req, peer);
        }
        self.answer(req, peer).await.map(BodyExt::boxed)
    }

    /// `GET /tap?direction=&service=&path=&method=&status=&rate=`: the matching requests as
    /// they finish, one JSON line each, until the client disconnects (see [`crate::tap`]).
    fn tap(&self, req: &Request<Incoming>, peer: std::net::SocketAddr) -> Response<AdminBody> {
        if let Some(refused) = weir_api::rt::loopback_only(peer, "/tap") {
            return refused.map(BodyExt::boxed);
        }
        let (filter, rate) = match crate::tap::Filter::from_query(req.uri().query().unwrap_or("")) {
            Ok(f) => f,
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")).map(BodyExt::boxed),
        };
        let Some(subscription) = self.taps.subscribe(filter, rate) else {
            let busy = format!("{} taps are open on this sidecar already: try again later\n", crate::tap::MAX_TAPS);
            return text(StatusCode::TOO_MANY_REQUESTS, busy).map(BodyExt::boxed);
        };
        let mut rsp = Response::new(BodyExt::boxed(TapBody(subscription)));
        rsp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/x-ndjson"));
        rsp
    }

    async fn answer(self, req: Request<Incoming>, peer: std::net::SocketAddr) -> Response<Full<Bytes>> {
        if let Some(rsp) = weir_api::rt::log_level_endpoint(&req, peer) {
            return rsp;
        }
        if req.uri().path() == "/config"
            && let Some(refused) = weir_api::rt::loopback_only(peer, "/config")
        {
            return refused;
        }
        let config = self.config.borrow().clone();
        match req.uri().path() {
            "/live" => text(StatusCode::OK, "live\n"),
            "/ready" if self.credentials.as_ref().is_some_and(|c| c.borrow().is_none()) => {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: no workload certificate yet\n")
            }
            "/ready" => match (&config, self.draining.load(Ordering::Acquire)) {
                (_, true) => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
                (Some(c), false) => text(StatusCode::OK, format!("ready (config version {})\n", c.version)),
                (None, false) => {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready: no configuration from the controller yet\n")
                }
            },
            "/metrics" => text(StatusCode::OK, self.metrics.render()),
            "/config" => {
                // The workload identity in use (never the key).
                let identity = self.credentials.as_ref().map(|c| match c.borrow().as_ref() {
                    Some(c) => serde_json::json!({
                        "spiffeId": c.identity, "notAfterUnix": c.not_after_unix, "chainLength": c.chain.len(),
                    }),
                    None => serde_json::json!({ "spiffeId": null, "message": "no certificate yet" }),
                });
                match config {
                    Some(c) => {
                        json(&serde_json::json!({ "version": c.version, "snapshot": c.source, "identity": identity }))
                    }
                    None => json(&serde_json::json!({ "version": null, "identity": identity })),
                }
            }
            _ => text(StatusCode::NOT_FOUND, "not found: try /live /ready /metrics /config /tap /log-level\n"),
        }
    }
}
