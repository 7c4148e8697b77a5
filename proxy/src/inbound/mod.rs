//! The inbound path: requests from peer sidecars (HTTP/2 carrying the client's original
//! protocol in `weir-orig-proto`) and from plain clients, forwarded to the application in
//! the protocol the client spoke.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Request, Response, Version, header};
use hyper::body::Incoming;

use crate::body::{Body, ORIG_PROTO, boxed, strip_hop_by_hop};
use crate::client::{Clients, ConnectOpts};
use crate::errors::ProxyError;
use crate::metrics::{Direction, Labels, Metrics};
use crate::outbound::request_authority;

#[derive(Clone)]
pub struct Inbound {
    pub app: Option<SocketAddr>,
    pub clients: Clients,
    pub metrics: Metrics,
    pub labels: Labels,
}

impl Inbound {
    pub fn new(app: Option<SocketAddr>, clients: Clients, metrics: Metrics, workload: &str) -> Self {
        let me: Arc<str> = workload.into();
        let labels = Labels { direction: Direction::Inbound, service: me.clone(), route: "".into(), backend: me };
        Self { app, clients, metrics, labels }
    }

    pub async fn handle(self, req: Request<Incoming>, _client: SocketAddr) -> Response<Body> {
        let started = Instant::now();
        self.metrics.request_started(&self.labels);
        let result = self.forward(req).await;
        let rsp = match result {
            Ok(rsp) => rsp,
            Err(e) => {
                tracing::debug!(error = %e, "inbound request failed");
                e.into_response()
            }
        };
        self.metrics.request_finished(&self.labels, rsp.status().as_u16(), started.elapsed());
        rsp
    }

    async fn forward(&self, req: Request<Incoming>) -> Result<Response<Body>, ProxyError> {
        let client_version = req.version();
        let (mut parts, body) = req.into_parts();
        let version = match parts.headers.remove(&ORIG_PROTO) {
            Some(v) if v == "HTTP/1.1" => Version::HTTP_11,
            Some(v) if v == "HTTP/1.0" => Version::HTTP_10,
            Some(v) if v == "HTTP/2" => Version::HTTP_2,
            _ => parts.version,
        };
        let app = self.app.ok_or(ProxyError::NoApp)?;
        strip_hop_by_hop(&mut parts.headers);
        let authority = request_authority(&parts).map(|a| a.to_string()).unwrap_or_else(|| app.to_string());
        let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
        let rsp = if version == Version::HTTP_2 {
            parts.uri = format!("http://{authority}{pq}").parse().map_err(|_| ProxyError::NoAuthority)?;
            parts.version = Version::HTTP_2;
            self.clients.h2.send(app, Request::from_parts(parts, boxed(body)), ConnectOpts::default()).await?
        } else {
            if parts.headers.get(header::HOST).is_none()
                && let Ok(v) = HeaderValue::from_str(&authority)
            {
                parts.headers.insert(header::HOST, v);
            }
            parts.version = version;
            self.clients.send_h1(app, Request::from_parts(parts, boxed(body)), ConnectOpts::default()).await?
        };
        let (mut rparts, rbody) = rsp.into_parts();
        strip_hop_by_hop(&mut rparts.headers);
        rparts.version = client_version;
        Ok(Response::from_parts(rparts, boxed(rbody)))
    }
}
