//! The sidecar's admin endpoints: `/live`, `/ready`, `/metrics`, `/config`, `/log-level`.
//!
//! The admin port is reachable from outside the pod (the kubelet probes `/live` and `/ready`,
//! Prometheus scrapes `/metrics`), so what reveals configuration (`/config`: the whole mesh
//! snapshot) or changes anything (`POST /log-level`) answers only loopback clients.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
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
}

impl Admin {
    pub async fn handle(self, req: Request<Incoming>, peer: std::net::SocketAddr) -> Response<Full<Bytes>> {
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
            _ => text(StatusCode::NOT_FOUND, "not found: try /live /ready /metrics /config /log-level\n"),
        }
    }
}
