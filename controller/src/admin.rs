//! The controller's admin endpoints: `/live`, `/ready`, `/metrics`, `/resources`, `/stats`, `/edges`,
//! `/canaries` (and, in local mode, `POST /canaries/NS/NAME/{promote,abort,pause,resume}`).
//!
//! Everything that changes something (canary controls, `POST /log-level`) answers only
//! loopback clients: in local mode the `weir` command runs beside the controller; in
//! Kubernetes, `weir canary promote|abort|pause|resume` goes through the Kubernetes API (an
//! annotation on the Canary, so RBAC decides who may), and the admin port stays read-only.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::sync::watch;
use weir_api::rt::{json, text};

use crate::metrics::Metrics;
use crate::proxies::Proxies;
use crate::reports::Reports;
use crate::state::MeshState;

#[derive(Clone)]
pub struct Admin {
    pub state: watch::Receiver<Arc<MeshState>>,
    pub proxies: Proxies,
    pub metrics: Metrics,
    pub reports: Arc<Mutex<Reports>>,
    pub ready: Arc<AtomicBool>,
    pub canaries: Arc<crate::canary::Canaries>,
    /// Whether this replica drives canaries (always in local mode).
    pub leading: tokio::sync::watch::Receiver<bool>,
    /// Kubernetes mode: canary controls go through the API server (RBAC), never this port.
    pub controls_via_api: bool,
}

impl Admin {
    pub async fn handle(self, req: Request<Incoming>, peer: std::net::SocketAddr) -> Response<Full<Bytes>> {
        if let Some(rsp) = weir_api::rt::log_level_endpoint(&req, peer) {
            return rsp;
        }
        match req.uri().path() {
            "/live" => text(StatusCode::OK, "live\n"),
            "/ready" if self.ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n"),
            "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            "/metrics" => text(StatusCode::OK, self.metrics.render()),
            "/resources" => json(&self.resources()),
            "/stats" => json(&self.reports.lock().unwrap().to_json()),
            "/edges" => json(&self.reports.lock().unwrap().edges_json()),
            "/canaries" => json(&self.canaries()),
            path if path.starts_with("/canaries/") => self.canary_action(&req, peer),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /live /ready /metrics /resources /stats /edges /canaries /log-level\n",
            ),
        }
    }

    /// Every Canary: what it rolls out and where it is.
    fn canaries(&self) -> serde_json::Value {
        let defs = self.state.borrow().canaries.clone();
        let statuses = self.canaries.statuses();
        let list: Vec<_> = defs
            .iter()
            .map(|d| {
                let key = format!("{}/{}", d.namespace, d.name);
                serde_json::json!({
                    "namespace": d.namespace, "name": d.name,
                    "service": d.spec.service, "stable": d.spec.stable, "canary": d.spec.canary,
                    "interval": d.spec.interval, "autoPromote": d.spec.auto_promote,
                    "status": statuses.get(&key),
                })
            })
            .collect();
        serde_json::json!({ "canaries": list })
    }

    /// `POST /canaries/NS/NAME/ACTION`.
    fn canary_action(&self, req: &Request<Incoming>, peer: std::net::SocketAddr) -> Response<Full<Bytes>> {
        let parts: Vec<&str> = req.uri().path().trim_start_matches("/canaries/").split('/').collect();
        let [ns, name, action] = parts.as_slice() else {
            return text(StatusCode::NOT_FOUND, "expected /canaries/NAMESPACE/NAME/{promote,abort,pause,resume}\n");
        };
        if req.method() != http::Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
        }
        if self.controls_via_api {
            return text(
                StatusCode::FORBIDDEN,
                format!(
                    "in Kubernetes mode canary controls go through the API server, so RBAC decides who may: weir canary {action} {ns}/{name} --kube (it sets the Canary's {} annotation)\n",
                    weir_api::canary::REQUEST_ANNOTATION
                ),
            );
        }
        if let Some(refused) = weir_api::rt::loopback_only(peer, "canary controls on the admin port") {
            return refused;
        }
        let action: crate::canary::Action = match action.parse() {
            Ok(a) => a,
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
        };
        if !*self.leading.borrow() {
            return text(
                StatusCode::CONFLICT,
                "this controller replica does not lead: send canary controls to the leader (the holder of the weir-controller Lease)\n",
            );
        }
        let defs = self.state.borrow().canaries.clone();
        match self.canaries.act(&defs, ns, name, action, std::time::Instant::now()) {
            Ok(status) => json(&serde_json::to_value(status).unwrap_or_default()),
            Err(e @ crate::canary::ActError::NotFound(_)) => text(StatusCode::NOT_FOUND, format!("{e}\n")),
            Err(e @ crate::canary::ActError::Refused(_)) => text(StatusCode::CONFLICT, format!("{e}\n")),
        }
    }

    /// Each resource (in force, with the sidecars that acked its version), each rejection, each
    /// warning (as `weir analyze` gives them), and each connected sidecar.
    fn resources(&self) -> serde_json::Value {
        let state = self.state.borrow().clone();
        let proxies = self.proxies.list();
        let resources: Vec<_> = state
            .resources
            .iter()
            .map(|(key, (origin, version))| {
                let (acked, pending): (Vec<_>, Vec<_>) =
                    proxies.iter().partition(|p| p.acked_resources.get(key) == Some(version));
                let rejection = state.rejections.iter().find(|r| r.resource.as_ref() == Some(key));
                serde_json::json!({
                    "kind": key.kind, "namespace": key.namespace, "name": key.name,
                    "origin": origin, "version": version,
                    "accepted": rejection.is_none(),
                    "rejection": rejection.map(|r| r.to_string()),
                    "ackedBy": acked.iter().map(|p| &p.workload).collect::<Vec<_>>(),
                    "pendingOn": pending.iter().map(|p| &p.workload).collect::<Vec<_>>(),
                })
            })
            .collect();
        let rejected: Vec<_> = state
            .rejections
            .iter()
            .map(|r| {
                serde_json::json!({
                    "origin": r.origin, "resource": r.resource.as_ref().map(|k| k.to_string()),
                    "field": r.field, "message": r.message, "error": r.to_string(),
                    "previousVersionInForce": r.resource.as_ref().is_some_and(|k| state.resources.contains_key(k)),
                })
            })
            .collect();
        serde_json::json!({
            "generation": state.generation,
            "resources": resources,
            "rejected": rejected,
            "warnings": state.warnings.iter().map(|w| w.to_string()).collect::<Vec<_>>(),
            "proxies": proxies,
        })
    }
}
