//! The inbound path: requests from peer sidecars (HTTP/2 carrying the client's original
//! protocol in `weir-orig-proto`) and from plain clients, forwarded to the application in
//! the protocol the client spoke; and opaque TCP connections (over mesh mTLS or plaintext),
//! authorized by client identity and port before a byte reaches the application.
//!
//! A connection iptables redirected here goes to the address it was bound for, the pod's own
//! address, never to loopback: a port the application binds only on `127.0.0.1` stays
//! private to the pod, as it would be without the mesh. Until the first configuration
//! arrives, nothing is forwarded (the policy in force is not known yet).

pub mod authz;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Request, Response, Version, header};
use hyper::body::Incoming;

use crate::body::{Body, ORIG_PROTO, boxed, strip_hop_by_hop};
use tokio::sync::watch;

use crate::client::Clients;
use crate::config::ConnectOpts;
use crate::config::{Config, InboundLimit};
use crate::errors::ProxyError;
use crate::metrics::{Direction, Labels, Metrics};
use crate::outbound::request_authority;
use crate::outbound::resilience::Resilience;
use crate::replay::{MAX_REPLAY_BODY, ReplayBody};
use crate::tunnel::TcpFlow;

/// What the inbound path shares with the rest of the sidecar.
pub struct Shared {
    pub clients: Clients,
    pub metrics: Metrics,
    pub resilience: Resilience,
    /// This listener's own tunnel slots.
    pub tunnels: crate::tunnel::Tunnels,
}

#[derive(Clone)]
pub struct Inbound {
    pub app: Option<SocketAddr>,
    pub clients: Clients,
    pub metrics: Metrics,
    pub labels: Labels,
    pub config: watch::Receiver<Option<Arc<Config>>>,
    pub resilience: Resilience,
    /// Client identities outside this trust domain match no authorization rule.
    pub trust_domain: Arc<str>,
    /// The `server` label of authorization metrics: the application's port.
    server: Arc<str>,
    /// Snapshot version last warned about unmatched authorization ports.
    warned_version: Arc<std::sync::Mutex<Option<String>>>,
    /// Log a line per request (target `weir::access`).
    pub access_log: bool,
    /// Opaque TCP to the application (this listener's own slots).
    pub tunnels: crate::tunnel::Tunnels,
    /// The kubelet's probes of the application, admitted whatever the policy says.
    pub probe_paths: Arc<[weir_api::service::ProbePath]>,
    /// Open `weir tap`s (shared with the outbound side and the admin port).
    pub taps: crate::tap::Taps,
    /// Records this side's spans (one `SERVER` span per sampled request).
    pub tracer: crate::trace::Tracer,
}

impl Inbound {
    pub fn new(
        app: Option<SocketAddr>,
        workload: &str,
        config: watch::Receiver<Option<Arc<Config>>>,
        trust_domain: Arc<str>,
        shared: Shared,
    ) -> Self {
        let Shared { clients, metrics, resilience, tunnels } = shared;
        let me: Arc<str> = workload.into();
        let labels =
            Labels { direction: Direction::Inbound, service: me.clone(), route: "".into(), backend: me, tls: false };
        let server = app.map(|a| a.port()).unwrap_or(0).to_string().into();
        Self {
            app,
            clients,
            metrics,
            labels,
            config,
            resilience,
            trust_domain,
            server,
            warned_version: Arc::default(),
            access_log: false,
            tunnels,
            probe_paths: Arc::new([]),
            taps: crate::tap::Taps::default(),
            tracer: crate::trace::Tracer::default(),
        }
    }

    /// Where a connection goes in the application: the address it was bound for when iptables
    /// redirected it (the pod's own address), otherwise `--app-addr`.
    fn app_for(&self, peer: &crate::server::Peer) -> Option<SocketAddr> {
        peer.original_dst.or(self.app)
    }

    /// An opaque TCP connection: authorized by client identity and port (see
    /// [`authz::decide_tcp`]), then carried to the application untouched.
    pub async fn carry_tcp(self: Arc<Self>, conn: crate::server::OpaqueConn) {
        let crate::server::OpaqueConn { io, peer } = conn;
        let refuse = |reason: &str| self.metrics.refused.with_label_values(&["inbound", reason]).inc();
        let Some(target) = self.app_for(&peer) else {
            refuse("no_app");
            return;
        };
        let Some(config) = self.config.borrow().clone() else {
            refuse("not_ready");
            tracing::debug!(client = %peer.addr, "TCP connection refused: no configuration yet");
            return;
        };
        let who = peer.identity.as_deref().unwrap_or("");
        let client = authz::Client::from_spiffe(peer.identity.as_deref(), &self.trust_domain);
        let server = target.port().to_string();
        match authz::decide_tcp(&config.authorizations, target.port(), client) {
            authz::Decision::Default => {}
            authz::Decision::Allow { policy, rule } => {
                self.metrics.authorization.with_label_values(&[&server, &*policy, &*rule, who, "allow"]).inc();
            }
            authz::Decision::Deny { policy, reason } => {
                self.metrics.authorization.with_label_values(&[&server, &*policy, "", who, "deny"]).inc();
                refuse("unauthorized");
                tracing::debug!(client = %peer.addr, identity = who, %reason, "TCP connection denied");
                return;
            }
        }
        let Some(slot) = self.tunnels.slot(&self.metrics, &target) else { return };
        match crate::client::connect_tcp(target, self.clients.connect_timeout()).await {
            Ok(upstream) => {
                let flow =
                    TcpFlow { direction: "inbound", service: "", tls: peer.identity.is_some(), peer_identity: who };
                self.tunnels.carry(slot, io, upstream, &target, &self.metrics, Some(flow)).await;
            }
            Err(e) => self.tunnels.failed(&self.metrics, &target, &e),
        }
    }

    pub async fn handle(self: Arc<Self>, mut req: Request<Incoming>, peer: crate::server::Peer) -> Response<Body> {
        let started = Instant::now();
        let ctx = crate::trace::hop(req.headers_mut(), &self.tracer);
        let span = ctx.open(&self.tracer, crate::trace::Kind::Server, req.method().as_str()).map(|mut span| {
            span.request(&req);
            span.attr("client.address", peer.addr.ip().to_string());
            if let Some(id) = &peer.identity {
                span.attr("weir.client.identity", &**id);
            }
            span
        });
        let tapped = self.taps.active();
        let seen = (self.access_log || tapped).then(|| {
            let authority = req
                .uri()
                .authority()
                .map(|a| a.to_string())
                .or_else(|| req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string))
                .unwrap_or_default();
            (req.method().clone(), req.uri().path().to_string(), authority)
        });
        let who = peer.identity.clone();
        let mut rsp = self.serve(req, peer, started).await;
        if let Some(span) = span {
            rsp = span.end_with(rsp);
        }
        if let Some((method, path, authority)) = seen {
            let latency = started.elapsed();
            if self.access_log {
                tracing::info!(
                    target: "weir::access",
                    direction = "inbound",
                    %method,
                    %path,
                    status = rsp.status().as_u16(),
                    duration_ms = latency.as_secs_f64() * 1000.0,
                    client_identity = who.as_deref().unwrap_or(""),
                    request_id = %ctx.request_id(),
                    trace_id = %ctx.trace_id(),
                    span_id = %ctx.span_id(),
                );
            }
            if tapped {
                let request_id = ctx.request_id().to_string();
                self.taps.publish(&crate::tap::Event {
                    direction: "inbound",
                    method: method.as_str(),
                    authority: &authority,
                    path: &path,
                    status: rsp.status().as_u16(),
                    latency,
                    service: &self.labels.service,
                    route: "",
                    backend: "",
                    client_identity: who.as_deref().unwrap_or(""),
                    request_id: &request_id,
                });
            }
        }
        rsp
    }

    async fn serve(&self, req: Request<Incoming>, peer: crate::server::Peer, started: Instant) -> Response<Body> {
        let client = peer.addr;
        // A protocol switch is judged as the GET the client sent (see [`crate::upgrade`]).
        let (mut parts, body) = req.into_parts();
        let upgrade = crate::upgrade::take(&mut parts);
        let mut req = Request::from_parts(parts, body);
        let labels = Labels { tls: peer.identity.is_some(), ..self.labels.clone() };
        self.metrics.request_started(&labels);
        let (who, tls) = match &peer.identity {
            Some(id) => (&**id, "true"),
            None => ("", "false"),
        };
        self.metrics.inbound_by_identity.with_label_values(&[who, tls]).inc();
        let app = self.app_for(&peer);
        let config = self.config.borrow().clone();
        let admitted = match config.as_deref() {
            Some(config) => match self.authorize(config, &mut req, peer.identity.as_deref(), app) {
                Some(refused) => Err(refused),
                None => self.rate_limited(config, &req, client, peer.identity.as_deref()),
            },
            None => Err(ProxyError::NotReady),
        };
        let grpc = crate::grpc::is_grpc(req.headers());
        match admitted {
            Err(e) => return self.metrics.response(labels, e.into_response_for(grpc), started.elapsed()),
            // A leaky bucket's queue: this request's turn comes after the wait.
            Ok(wait) if !wait.is_zero() => tokio::time::sleep(wait).await,
            Ok(_) => {}
        }
        let result = self.forward(req, app, upgrade.as_ref().map(|u| &u.token)).await;
        let rsp = match result {
            Ok(rsp) => rsp,
            Err(e) => {
                tracing::debug!(error = %e, "inbound request failed");
                e.into_response_for(grpc)
            }
        };
        let rsp = self.metrics.response(labels, rsp, started.elapsed());
        match upgrade {
            Some(client) if crate::upgrade::accepted(&rsp) => {
                let what = format!("{} upgrade to the application", client.token.to_str().unwrap_or("?"));
                crate::upgrade::switch(client, rsp, &self.tunnels, &self.metrics, what)
            }
            _ => rsp,
        }
    }

    /// Applies the MeshAuthorizations that select this workload. An allowed request with a
    /// path that normalises differently goes on with the normalised path, the one judged.
    fn authorize(
        &self,
        config: &Config,
        req: &mut Request<Incoming>,
        identity: Option<&str>,
        app: Option<SocketAddr>,
    ) -> Option<ProxyError> {
        if config.authorizations.is_empty() {
            return None;
        }
        let port = app.map(|a| a.port()).unwrap_or(0);
        if !authz::applies(&config.authorizations, port) {
            self.warn_unmatched(config, port);
            return None;
        }
        let who = identity.unwrap_or("");
        if self.is_probe(req, port) {
            self.metrics.authorization.with_label_values(&[&self.server, "", "kubelet-probe", who, "allow"]).inc();
            return None;
        }
        let client = authz::Client::from_spiffe(identity, &self.trust_domain);
        let path = req.uri().path();
        let decision = match authz::normalise(path) {
            Some(normal) => {
                let decision = authz::decide(&config.authorizations, port, client, req.method(), Some(&normal));
                if let (authz::Decision::Allow { .. }, std::borrow::Cow::Owned(normal)) = (&decision, normal) {
                    let pq = match req.uri().query() {
                        Some(q) => format!("{normal}?{q}"),
                        None => normal,
                    };
                    let mut parts = req.uri().clone().into_parts();
                    parts.path_and_query = pq.parse().ok();
                    if let Ok(uri) = http::Uri::from_parts(parts) {
                        *req.uri_mut() = uri;
                    }
                }
                decision
            }
            // Forwarded unchanged if a rule that ignores paths allows it.
            None => authz::decide(&config.authorizations, port, client, req.method(), None),
        };
        match decision {
            authz::Decision::Default => None,
            authz::Decision::Allow { policy, rule } => {
                self.metrics.authorization.with_label_values(&[&self.server, &policy, &rule, who, "allow"]).inc();
                None
            }
            authz::Decision::Deny { policy, reason } => {
                self.metrics.authorization.with_label_values(&[&self.server, &policy, "", who, "deny"]).inc();
                tracing::debug!(client = who, %reason, "inbound request denied");
                Some(ProxyError::Forbidden { reason })
            }
        }
    }

    /// A kubelet probe of the application: a GET (or HEAD) of exactly one of the probes' port
    /// and path (query aside), as Linkerd's default policy admits them.
    fn is_probe(&self, req: &Request<Incoming>, port: u16) -> bool {
        matches!(*req.method(), http::Method::GET | http::Method::HEAD)
            && self.probe_paths.iter().any(|p| p.port == port && p.path == req.uri().path())
    }

    /// Policies select this workload but none names its port: they protect nothing here, which
    /// is worth a warning (once per snapshot).
    fn warn_unmatched(&self, config: &Config, port: u16) {
        if config.authorizations.is_empty() {
            return;
        }
        let mut warned = self.warned_version.lock().unwrap();
        if warned.as_deref() != Some(config.version.as_str()) {
            let names: Vec<&str> = config.authorizations.iter().map(|a| &*a.name).collect();
            tracing::warn!(
                policies = %names.join(", "),
                port,
                "MeshAuthorizations select this workload but none applies to its port: every client is allowed"
            );
            *warned = Some(config.version.clone());
        }
    }

    /// The inbound rate limits of the Service the request is for (all of this workload's, when
    /// the authority names none of them): `Ok(wait)` before the request goes on (a leaky
    /// bucket's queue; zero otherwise), or the refusal.
    fn rate_limited(
        &self,
        config: &Config,
        req: &Request<Incoming>,
        client: SocketAddr,
        identity: Option<&str>,
    ) -> Result<std::time::Duration, ProxyError> {
        let mut wait = std::time::Duration::ZERO;
        if config.inbound.is_empty() {
            return Ok(wait);
        }
        let host = req.uri().host().map(str::to_string).or_else(|| {
            let h = req.headers().get(header::HOST)?.to_str().ok()?;
            h.parse::<http::uri::Authority>().ok().map(|a| a.host().to_string())
        });
        let target = host.as_deref().and_then(|h| config.lookup(h)).map(|s| s.key.clone());
        // The limits of the Service the request names, or all of them when it names none.
        let target = target.filter(|t| config.inbound.iter().any(|l| &l.service == t));
        let applies = |l: &&InboundLimit| target.as_ref().is_none_or(|t| &l.service == t);
        for l in config.inbound.iter().filter(applies) {
            let key = crate::outbound::resilience::rate_key(&l.limit.key, req.headers(), client, identity);
            match self.resilience.limiter(&l.policy, &l.limit).check(&key) {
                Ok(w) => wait = wait.max(w),
                Err(retry_after) => {
                    self.resilience.metrics.rate_limited.with_label_values(&[&*l.service, "inbound"]).inc();
                    return Err(ProxyError::RateLimited { retry_after });
                }
            }
        }
        Ok(wait)
    }

    /// Sends the request to the application in the protocol the client spoke (an upgrade, as
    /// the HTTP/1.1 upgrade to `upgrade`).
    async fn forward(
        &self,
        req: Request<Incoming>,
        app: Option<SocketAddr>,
        upgrade: Option<&HeaderValue>,
    ) -> Result<Response<Body>, ProxyError> {
        let client_version = req.version();
        let (mut parts, body) = req.into_parts();
        let version = match parts.headers.remove(&ORIG_PROTO) {
            _ if upgrade.is_some() => Version::HTTP_11,
            Some(v) if v == "HTTP/1.1" => Version::HTTP_11,
            Some(v) if v == "HTTP/1.0" => Version::HTTP_10,
            Some(v) if v == "HTTP/2" => Version::HTTP_2,
            _ => parts.version,
        };
        let app = app.ok_or(ProxyError::NoApp)?;
        strip_hop_by_hop(&mut parts.headers);
        if let Some(token) = upgrade {
            crate::upgrade::as_http1(&mut parts, token);
        }
        let authority = request_authority(&parts).map(|a| a.to_string()).unwrap_or_else(|| app.to_string());
        if version == Version::HTTP_2 {
            parts.uri = crate::body::absolute_uri(&authority, &parts.uri).ok_or(ProxyError::NoAuthority)?;
        } else if parts.headers.get(header::HOST).is_none()
            && let Ok(v) = HeaderValue::from_str(&authority)
        {
            parts.headers.insert(header::HOST, v);
        }
        parts.version = version;
        let rsp = if version == Version::HTTP_2 {
            // An application that turns its HTTP/2 connections over (GOAWAY after N requests)
            // never fails a request it did not process: that one goes again on a new
            // connection. (HTTP/1.1's pool does the same for a request a closing connection
            // never took.)
            let body = ReplayBody::new(boxed(body), MAX_REPLAY_BODY);
            crate::client::replaying(&body, (&self.metrics.replays, "inbound"), |body| {
                let req = Request::from_parts(crate::outbound::rebuild(&parts), body);
                self.clients.h2.send(app, req, ConnectOpts::default())
            })
            .await?
        } else {
            self.clients.send_h1(app, Request::from_parts(parts, boxed(body)), ConnectOpts::default()).await?
        };
        let (mut rparts, rbody) = rsp.into_parts();
        strip_hop_by_hop(&mut rparts.headers);
        rparts.version = client_version;
        Ok(Response::from_parts(rparts, boxed(rbody)))
    }
}
