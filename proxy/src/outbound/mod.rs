//! The outbound path: the application's calls. In order, a request meets:
//! authority → Service lookup → [`route::select`] (rule, then backend by weight) →
//! endpoints of the backend for the port → [`balance::Balancer`] (P2C, peak EWMA) →
//! timeout → upstream: the peer sidecar over one multiplexed HTTP/2 connection (the
//! client's protocol rides in `weir-orig-proto`), or the endpoint itself when unmeshed.

pub mod balance;
pub mod route;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Request, Response, Version, header};
use hyper::body::Incoming;
use tokio::sync::watch;

use crate::body::{Body, ORIG_PROTO, boxed, strip_hop_by_hop};
use crate::client::Clients;
use crate::config::Config;
use crate::errors::ProxyError;
use crate::metrics::{Direction, Labels, Metrics};

#[derive(Clone)]
pub struct Outbound {
    pub config: watch::Receiver<Option<Arc<Config>>>,
    pub clients: Clients,
    pub balancer: balance::Balancer,
    pub metrics: Metrics,
}

impl Outbound {
    pub async fn handle(self, req: Request<Incoming>, _client: SocketAddr) -> Response<Body> {
        let started = Instant::now();
        let version = req.version();
        // In-flight requests finish on the config they started with.
        let Some(config) = self.config.borrow().clone() else {
            return ProxyError::NotReady.into_response();
        };
        let (mut parts, body) = req.into_parts();
        let authority = match request_authority(&parts) {
            Some(a) => a,
            None => return ProxyError::NoAuthority.into_response(),
        };
        let port = authority.port_u16().unwrap_or(80);
        let Some(svc) = config.lookup(authority.host()) else {
            return ProxyError::UnknownService { authority: authority.to_string() }.into_response();
        };
        if !svc.ports.is_empty() && !svc.ports.contains(&port) {
            return ProxyError::NoSuchPort { service: svc.key.to_string(), port }.into_response();
        }
        let Some(target) = route::select(svc, &parts, |n| rand::random_range(0..n)) else {
            return ProxyError::NoWeightedBackend { service: svc.key.to_string() }.into_response();
        };
        let route_label: Arc<str> = if target.route.is_empty() {
            target.route.clone()
        } else {
            format!("{}:{}", target.route, target.rule).into()
        };
        let labels = Labels {
            direction: Direction::Outbound,
            service: svc.key.clone(),
            route: route_label,
            backend: target.backend.clone(),
        };
        self.metrics.request_started(&labels);

        let backend_port = target.backend_port.unwrap_or(port);
        let endpoints: Vec<_> = config
            .service(&target.backend)
            .map(|b| b.endpoints.iter().filter(|e| e.service_port.is_none_or(|p| p == backend_port)).collect())
            .unwrap_or_default();
        let Some((endpoint, in_flight)) = self.balancer.pick(&endpoints) else {
            return self.fail(&labels, started, ProxyError::NoEndpoints { backend: target.backend.to_string() });
        };

        strip_hop_by_hop(&mut parts.headers);
        let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
        // The client's authority travels unchanged, whichever backend serves the request.
        let upstream_authority = authority.to_string();
        if parts.headers.get(header::HOST).is_none()
            && version != Version::HTTP_2
            && let Ok(v) = HeaderValue::from_str(&upstream_authority)
        {
            parts.headers.insert(header::HOST, v);
        }
        let addr = endpoint.addr;
        let send = async {
            if endpoint.meshed || version == Version::HTTP_2 {
                if endpoint.meshed {
                    parts.headers.insert(ORIG_PROTO.clone(), HeaderValue::from_static(proto_name(version)));
                    parts.headers.remove(header::HOST);
                }
                parts.uri = format!("http://{upstream_authority}{pq}").parse().map_err(|_| ProxyError::NoAuthority)?;
                parts.version = Version::HTTP_2;
                self.clients.h2.send(addr, Request::from_parts(parts, boxed(body))).await
            } else {
                self.clients.send_h1(addr, Request::from_parts(parts, boxed(body))).await
            }
        };
        let result = match target.timeout {
            Some(after) => tokio::time::timeout(after, send).await.unwrap_or(Err(ProxyError::Timeout { after })),
            None => send.await,
        };
        match result {
            Ok(rsp) => {
                in_flight.done();
                let (mut rparts, rbody) = rsp.into_parts();
                strip_hop_by_hop(&mut rparts.headers);
                rparts.headers.remove(&ORIG_PROTO);
                rparts.version = version;
                self.metrics.request_finished(&labels, rparts.status.as_u16(), started.elapsed());
                Response::from_parts(rparts, boxed(rbody))
            }
            Err(e) => self.fail(&labels, started, e),
        }
    }

    fn fail(&self, labels: &Labels, started: Instant, e: ProxyError) -> Response<Body> {
        tracing::debug!(service = %labels.service, backend = %labels.backend, error = %e, "outbound request failed");
        self.metrics.request_finished(labels, e.status().as_u16(), started.elapsed());
        e.into_response()
    }
}

/// The authority a request is for: absolute-form URI or `:authority`, else the Host header.
pub fn request_authority(parts: &http::request::Parts) -> Option<http::uri::Authority> {
    if let Some(a) = parts.uri.authority() {
        return Some(a.clone());
    }
    parts.headers.get(header::HOST)?.to_str().ok()?.parse().ok()
}

pub fn proto_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        _ => "HTTP/1.1",
    }
}
