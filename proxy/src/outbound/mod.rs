//! The outbound path: the application's calls. In order, a request meets:
//! authority → Service lookup → [`route::select`] (rule, then backend by weight) →
//! policy: rate limit → faults → request timeout → bulkhead → per attempt: circuit breaker → [`balance::Balancer`] (P2C, peak EWMA;
//! another endpoint on a retry) → per-try timeout → upstream; then retry (budget, back-off) → the peer sidecar over one multiplexed HTTP/2 connection (the
//! client's protocol rides in `weir-orig-proto`), or the endpoint itself when unmeshed.

pub mod balance;
pub mod health;
pub mod resilience;
pub mod route;

use resilience::BreakerPass;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, Version, header};
use hyper::body::Incoming;
use tokio::sync::watch;

use tokio::sync::OwnedSemaphorePermit;

use crate::body::{
    Body, ORIG_PROTO, absolute_uri, boxed, strip_hop_by_hop, with_deadline, with_guard, with_idle_timeout,
};
use crate::client::{Clients, TlsTarget};
use crate::config::{Abort, Config, Endpoint, HashKey, Policy, RetryOn};
use crate::errors::{ProxyError, grpc_error};
use crate::grpc::is_grpc;
use crate::metrics::{Direction, Labels, Metrics};
use crate::replay::{MAX_REPLAY_BODY, ReplayBody};
use crate::trace::Kind;
use crate::tunnel::TcpFlow;

#[derive(Clone)]
pub struct Outbound {
    pub config: watch::Receiver<Option<Arc<Config>>>,
    pub clients: Clients,
    pub balancer: balance::Balancer,
    pub resilience: resilience::Resilience,
    pub health: health::Health,
    pub metrics: Metrics,
    /// This sidecar's credentials (when it has a workload identity) and the trust domain.
    pub credentials: Option<crate::tls::CredsRx>,
    pub trust_domain: Arc<str>,
    /// CONNECT tunnels to destinations outside the mesh, and redirected opaque TCP.
    pub tunnels: crate::tunnel::Tunnels,
    /// Log a line per request (target `weir::access`).
    pub access_log: bool,
    /// Open `weir tap`s (shared with the inbound side and the admin port).
    pub taps: crate::tap::Taps,
    /// Records this side's spans (per sampled request, one `INTERNAL` span and a `CLIENT`
    /// span per attempt).
    pub tracer: crate::trace::Tracer,
}

/// What one request needs on its way upstream, decided before the first attempt.
struct Call<'a> {
    config: &'a Config,
    target: &'a route::Target,
    labels: &'a Labels,
    policy: Option<Arc<Policy>>,
    backend_port: u16,
    version: Version,
    authority: String,
    client: SocketAddr,
    /// The protocol the client switches to (see [`crate::upgrade`]).
    upgrade: Option<HeaderValue>,
    /// The request's trace context, when its spans are recorded (each attempt gets a span).
    trace: Option<&'a crate::trace::Context>,
}

/// The Service, route and backend that served (or failed) a request, for the access log and
/// taps.
#[derive(Clone)]
struct Upstream {
    service: Arc<str>,
    route: Arc<str>,
    backend: Arc<str>,
}

impl Outbound {
    pub async fn handle(self: Arc<Self>, mut req: Request<Incoming>, peer: crate::server::Peer) -> Response<Body> {
        if req.method() == http::Method::CONNECT && req.extensions().get::<hyper::ext::Protocol>().is_none() {
            let config = self.config.borrow().clone();
            return self.tunnels.connect(req, config.as_deref(), self.clients.connect_timeout(), &self.metrics).await;
        }
        let ctx = crate::trace::hop(req.headers_mut(), &self.tracer);
        let span = ctx.open(&self.tracer, Kind::Internal, req.method().as_str()).map(|mut span| {
            span.request(&req);
            span
        });
        let tapped = self.taps.active();
        if !self.access_log && !tapped && span.is_none() {
            return self.proxy_request(req, peer, None).await;
        }
        let started = Instant::now();
        let (method, uri) = (req.method().clone(), req.uri().clone());
        let authority = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string))
            .unwrap_or_default();
        let mut rsp = self.proxy_request(req, peer, span.is_some().then_some(&ctx)).await;
        let upstream = rsp.extensions().get::<Upstream>().cloned();
        let (service, route, backend) = match &upstream {
            Some(u) => (&*u.service, &*u.route, &*u.backend),
            None => ("", "", ""),
        };
        let latency = started.elapsed();
        let attempts = rsp.headers().get(&ATTEMPTS).and_then(|v| v.to_str().ok()).unwrap_or("1");
        if self.access_log {
            tracing::info!(
                target: "weir::access",
                direction = "outbound",
                %method,
                %authority,
                path = uri.path(),
                status = rsp.status().as_u16(),
                duration_ms = latency.as_secs_f64() * 1000.0,
                upstream = %backend,
                %attempts,
                request_id = %ctx.request_id(),
                trace_id = %ctx.trace_id(),
                span_id = %ctx.span_id(),
            );
        }
        if tapped {
            let request_id = ctx.request_id().to_string();
            self.taps.publish(&crate::tap::Event {
                direction: "outbound",
                method: method.as_str(),
                authority: &authority,
                path: uri.path(),
                status: rsp.status().as_u16(),
                latency,
                service,
                route,
                backend,
                client_identity: "",
                request_id: &request_id,
            });
        }
        if let Some(mut span) = span {
            if !service.is_empty() {
                span.attr("peer.service", service);
                span.attr("weir.route", route);
                span.attr("weir.backend", backend);
            }
            span.attr("weir.attempts", attempts.parse::<i64>().unwrap_or(1));
            rsp = span.end_with(rsp);
        }
        rsp
    }

    fn tls_target(&self, ns: &str, endpoint: &Endpoint) -> Option<TlsTarget> {
        TlsTarget::for_endpoint(self.credentials.as_ref(), &self.trust_domain, ns, endpoint)
    }

    /// A redirected connection that is not HTTP: to a Service's virtual address, through one
    /// of its endpoints; to a meshed pod, over mesh mTLS with its identity (the peer sidecar
    /// authorizes it by identity and port); anywhere else, to where the application sent it.
    pub async fn carry_tcp(self: Arc<Self>, conn: crate::server::OpaqueConn) {
        let crate::server::OpaqueConn { io, peer } = conn;
        let Some(orig) = peer.original_dst else { return };
        let config = self.config.borrow().clone();
        let (target, tls, service) = match config.as_deref() {
            Some(config) => self.tcp_destination(config, orig),
            None => (orig, None, None),
        };
        let Some(slot) = self.tunnels.slot(&self.metrics, &target) else { return };
        let timeout = self.clients.connect_timeout();
        let service = service.as_deref().unwrap_or("");
        let expected = tls.as_ref().map(|t| t.expected.to_string()).unwrap_or_default();
        let flow = TcpFlow { direction: "outbound", service, tls: tls.is_some(), peer_identity: &expected };
        let upstream: Result<Box<dyn crate::tls::Io>, String> = match &tls {
            Some(tls) => crate::client::connect_mesh(target, timeout, tls, crate::tls::OFFER_TCP)
                .await
                .map(|s| Box::new(s) as Box<dyn crate::tls::Io>),
            None => crate::client::connect_tcp(target, timeout).await.map(|s| Box::new(s) as Box<dyn crate::tls::Io>),
        };
        match upstream {
            Ok(upstream) => self.tunnels.carry(slot, io, upstream, &target, &self.metrics, Some(flow)).await,
            Err(e) => self.tunnels.failed(&self.metrics, &target, &e),
        }
    }

    /// Where an opaque connection bound for `orig` goes, whether over mesh mTLS, and the Service
    /// it calls (when `orig` is one's address or one's endpoint).
    fn tcp_destination(
        &self,
        config: &Config,
        orig: SocketAddr,
    ) -> (SocketAddr, Option<TlsTarget>, Option<crate::config::ServiceKey>) {
        if let Some(svc) = config.lookup(&crate::config::ip_host(orig.ip())) {
            let serving: Vec<&Endpoint> =
                svc.endpoints.iter().filter(|e| e.service_port.is_none_or(|p| p == orig.port())).collect();
            if !serving.is_empty() {
                let e = serving[rand::random_range(0..serving.len())];
                return (e.addr, self.tls_target(svc.namespace(), e), Some(svc.key.clone()));
            }
        }
        match config.meshed_at(orig) {
            // A pod's own address: the call is a Service's only when the pod serves it at this
            // very port (a pod may serve several Services, or none, at others).
            Some((svc, e)) => (orig, self.tls_target(svc.namespace(), e), (e.addr == orig).then(|| svc.key.clone())),
            None => (orig, None, None),
        }
    }

    /// A redirected request that names no Service: to a meshed pod's address, straight to that
    /// endpoint over the mesh hop (mTLS with its identity); anywhere else, forwarded to where
    /// the application sent it, as it was.
    async fn passthrough(
        &self,
        config: &Config,
        mut parts: http::request::Parts,
        body: Incoming,
        orig: SocketAddr,
        authority: &http::uri::Authority,
    ) -> Response<Body> {
        strip_hop_by_hop(&mut parts.headers);
        let meshed = config.meshed_at(orig);
        let result = if let Some((svc, endpoint)) = meshed {
            parts.headers.insert(ORIG_PROTO.clone(), HeaderValue::from_static(proto_name(parts.version)));
            parts.headers.remove(header::HOST);
            match absolute_uri(authority, &parts.uri) {
                Some(uri) => parts.uri = uri,
                None => return ProxyError::NoAuthority.into_response(),
            }
            parts.version = Version::HTTP_2;
            let tls = self.tls_target(svc.namespace(), endpoint);
            self.clients
                .h2
                .send_tls(orig, Request::from_parts(parts, boxed(body)), Default::default(), tls.as_ref())
                .await
        } else if parts.version == Version::HTTP_2 {
            match absolute_uri(authority, &parts.uri) {
                Some(uri) => parts.uri = uri,
                None => return ProxyError::NoAuthority.into_response(),
            }
            self.clients.h2.send(orig, Request::from_parts(parts, boxed(body)), Default::default()).await
        } else {
            self.clients.send_h1(orig, Request::from_parts(parts, boxed(body)), Default::default()).await
        };
        match result {
            Ok(rsp) => {
                let (mut rparts, rbody) = rsp.into_parts();
                strip_hop_by_hop(&mut rparts.headers);
                Response::from_parts(rparts, boxed(rbody))
            }
            Err(e) => {
                tracing::debug!(%orig, error = %e, "pass-through request failed");
                e.into_response()
            }
        }
    }

    /// One HTTP request to a mesh destination, start to end: resolve the Service and route
    /// rule, apply the policy's early answers (faults, rate limits), send within the bulkhead
    /// with retries ([`Self::within_bulkhead`], [`Self::attempts`]), record metrics and the
    /// access log.
    async fn proxy_request(
        &self,
        req: Request<Incoming>,
        peer: crate::server::Peer,
        trace: Option<&crate::trace::Context>,
    ) -> Response<Body> {
        let client = peer.addr;
        let started = Instant::now();
        let version = req.version();
        // In-flight requests finish on the config they started with.
        let config = self.config.borrow().clone();
        let Some(config) = config else {
            return ProxyError::NotReady.into_response();
        };
        let (mut parts, body) = req.into_parts();
        let upgrade = crate::upgrade::take(&mut parts);
        let authority = match request_authority(&parts) {
            Some(a) => a,
            None => return ProxyError::NoAuthority.into_response(),
        };
        // An absolute-form target with userinfo goes on in origin form (the Host header names
        // the authority), so the credentials stop here.
        if parts.uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            match pq.parse() {
                Ok(uri) => parts.uri = uri,
                Err(_) => return ProxyError::NoAuthority.into_response(),
            }
            if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                parts.headers.insert(header::HOST, host);
            }
        }
        let redirected = peer.original_dst;
        let port = authority.port_u16().or(redirected.map(|o| o.port())).unwrap_or(80);
        // By name (or ClusterIP) in the authority; for a connection iptables redirected here,
        // also by the address it was bound for. Redirected traffic to anything else leaves
        // the mesh untouched.
        let svc = config.lookup(authority.host()).or_else(|| config.lookup(&crate::config::ip_host(redirected?.ip())));
        let Some(svc) = svc else {
            if let Some(orig) = redirected {
                return self.passthrough(&config, parts, body, orig, &authority).await;
            }
            return ProxyError::UnknownService { authority: authority.to_string() }.into_response();
        };
        if !svc.ports.is_empty() && !svc.ports.contains(&port) {
            return ProxyError::NoSuchPort { service: svc.key.to_string(), port }.into_response();
        }
        let Some(target) = route::select(svc, &parts, |n| rand::random_range(0..n)) else {
            return ProxyError::NoWeightedBackend { service: svc.key.to_string() }.into_response();
        };
        let labels = Labels {
            direction: Direction::Outbound,
            service: svc.key.clone(),
            route: target.label.clone(),
            backend: target.backend.clone(),
            tls: self.credentials.is_some() && config.service(&target.backend).is_some_and(|b| b.mtls),
        };
        self.metrics.request_started(&labels);

        strip_hop_by_hop(&mut parts.headers);
        let grpc = is_grpc(&parts.headers);
        let policy = svc.policy_for(&target.rule, port).cloned();
        if let Some(p) = &policy
            && let Some(early) = self.before_upstream(p, &labels, &parts, client).await
        {
            let rsp = match early {
                Early::Fail(e) => e.into_response_for(grpc),
                Early::Grpc(code) => grpc_error(code, "fault injected"),
            };
            return self.metrics.response(labels, rsp, started.elapsed());
        }
        // The tighter of the route's and the policy's request timeouts bounds every attempt.
        let deadline = [target.timeout, policy.as_ref().and_then(|p| p.request_timeout)].into_iter().flatten().min();
        let call = Call {
            config: &config,
            target: &target,
            labels: &labels,
            policy,
            backend_port: target.backend_port.unwrap_or(port),
            version,
            // The client's authority travels unchanged, whichever backend serves the request.
            authority: authority.to_string(),
            client,
            upgrade: upgrade.as_ref().map(|u| u.token.clone()),
            trace,
        };
        let call_idle = call.policy.as_ref().and_then(|p| p.stream_idle_timeout);
        let deadline_at = deadline.map(|after| (tokio::time::Instant::now() + after, after));
        let sent = self.within_bulkhead(&call, parts, body);
        let result = match deadline {
            Some(after) => tokio::time::timeout(after, sent).await.unwrap_or(Err((ProxyError::Timeout { after }, 0))),
            None => sent.await,
        };
        let (rsp, attempts) = match result {
            Ok((rsp, attempts, _)) if upgrade.is_some() && crate::upgrade::accepted(&rsp) => {
                let client_side = upgrade.expect("checked above");
                let what = format!("{} upgrade to {}", client_side.token.to_str().unwrap_or("?"), labels.backend);
                (crate::upgrade::switch(client_side, rsp, &self.tunnels, &self.metrics, what), attempts)
            }
            Ok((rsp, attempts, slot)) => {
                let (mut rparts, mut body) = rsp.into_parts();
                strip_hop_by_hop(&mut rparts.headers);
                rparts.headers.remove(&ORIG_PROTO);
                rparts.version = version;
                if let Some(idle) = call_idle {
                    body = with_idle_timeout(body, idle);
                }
                // The request timeout covers the body too (a stream that must outlive it is
                // given no request timeout, and `streamIdle` instead).
                if let Some((at, after)) = deadline_at {
                    body = with_deadline(body, at, after);
                }
                if let Some(slot) = slot {
                    body = with_guard(body, slot);
                }
                (Response::from_parts(rparts, body), attempts)
            }
            Err((e, attempts)) => {
                tracing::debug!(service = %labels.service, backend = %labels.backend, error = %e, "outbound request failed");
                (e.into_response_for(grpc), attempts)
            }
        };
        let upstream =
            Upstream { service: labels.service.clone(), route: labels.route.clone(), backend: labels.backend.clone() };
        let mut rsp = self.metrics.response(labels, rsp, started.elapsed());
        if attempts > 1 {
            rsp.headers_mut().insert(ATTEMPTS.clone(), HeaderValue::from(attempts));
        }
        rsp.extensions_mut().insert(upstream);
        rsp
    }

    /// What a policy does before anything goes upstream, in order: the local rate limit, then
    /// fault injection (delay, then abort). `Some` ends the request here.
    async fn before_upstream(
        &self,
        policy: &Policy,
        labels: &Labels,
        parts: &http::request::Parts,
        client: SocketAddr,
    ) -> Option<Early> {
        let rm = &self.resilience.metrics;
        let service = &*labels.service;
        if let Some(rl) = &policy.rate_limit {
            let key = resilience::rate_key(&rl.key, &parts.headers, client, None);
            match self.resilience.limiter(&policy.name, rl).check(&key) {
                Err(retry_after) => {
                    rm.rate_limited.with_label_values(&[service, "outbound"]).inc();
                    return Some(Early::Fail(ProxyError::RateLimited { retry_after }));
                }
                // A leaky bucket's queue: this request's turn comes after the wait.
                Ok(wait) if !wait.is_zero() => tokio::time::sleep(wait).await,
                Ok(_) => {}
            }
        }
        let faults = policy.faults.as_ref()?;
        let selected = faults.headers.iter().all(|(name, want)| {
            let values: Vec<&str> = parts.headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
            !values.is_empty() && want.matches(&values.join(","))
        });
        if !selected {
            return None;
        }
        if let Some((delay, share)) = faults.delay
            && rand::random::<f64>() < share
        {
            rm.faults_injected.with_label_values(&[service, "delay"]).inc();
            tokio::time::sleep(delay).await;
        }
        if let Some((abort, share)) = faults.abort
            && rand::random::<f64>() < share
        {
            rm.faults_injected.with_label_values(&[service, "abort"]).inc();
            return Some(match abort {
                Abort::Http(status) => Early::Fail(ProxyError::FaultAbort { status }),
                Abort::Grpc(code) => Early::Grpc(code),
            });
        }
        None
    }

    /// The bulkhead around all attempts: a slot is held until the response body ends.
    async fn within_bulkhead(
        &self,
        call: &Call<'_>,
        parts: http::request::Parts,
        body: Incoming,
    ) -> Result<(Response<Body>, u32, Option<OwnedSemaphorePermit>), (ProxyError, u32)> {
        let policy = call.policy.as_ref();
        let slot = match policy.and_then(|p| p.bulkhead.map(|b| (p, b))) {
            None => None,
            Some((p, b)) => match self.resilience.bulkhead(&p.name, &call.target.backend, b).acquire().await {
                Ok(slot) => Some(slot),
                Err(()) => {
                    let backend = call.target.backend.to_string();
                    self.resilience
                        .metrics
                        .bulkhead_rejected
                        .with_label_values(&[&*call.labels.service, backend.as_str()])
                        .inc();
                    return Err((ProxyError::BulkheadFull { backend }, 0));
                }
            },
        };
        let (rsp, attempts) = self.attempts(call, parts, body).await?;
        Ok((rsp, attempts, slot))
    }

    /// Sends the request, retrying as the policy allows. Returns the final answer and how many
    /// attempts were made. The order of what each attempt meets is written here:
    /// circuit breaker → balancer (another endpoint on a retry) → per-try timeout → upstream
    /// (sent again at once if the upstream never processed it); then retry classification →
    /// retry budget → back-off.
    async fn attempts(
        &self,
        call: &Call<'_>,
        parts: http::request::Parts,
        body: Incoming,
    ) -> Result<(Response<Body>, u32), (ProxyError, u32)> {
        let service = &*call.labels.service;
        let backend = call.target.backend.to_string();
        let endpoints: Vec<_> = call
            .config
            .service(&call.target.backend)
            .map(|b| b.endpoints.iter().filter(|e| e.service_port.is_none_or(|p| p == call.backend_port)).collect())
            .unwrap_or_default();
        if endpoints.is_empty() {
            return Err((ProxyError::NoEndpoints { backend }, 0));
        }
        let rm = &self.resilience.metrics;
        let policy = call.policy.as_ref();
        let mut retry = policy.and_then(|p| p.retry.clone()).filter(|r| r.retries > 0);
        // gRPC calls are POSTs: a policy that lists gRPC codes retries them on those codes (and
        // on failures the application never saw), as gRPC's own retry policy does.
        let grpc = is_grpc(&parts.headers);
        let mut safe_only = false;
        if let Some(r) = &retry
            && !r.non_idempotent
            && !is_idempotent(&parts.method)
        {
            if grpc && !r.on.grpc.is_empty() {
                safe_only = true;
            } else {
                rm.retries_skipped.with_label_values(&[service, "method"]).inc();
                retry = None;
            }
        }
        let body = ReplayBody::new(boxed(body), MAX_REPLAY_BODY);
        let budget = retry.as_ref().zip(policy).map(|(r, p)| self.resilience.budget(&p.name, r.budget));
        if let Some(b) = &budget {
            b.deposit();
        }
        let breaker =
            policy.and_then(|p| p.breaker.map(|b| self.resilience.breaker(&p.name, service, &call.target.backend, b)));
        let per_try = policy.and_then(|p| p.per_try_timeout);
        let outliers =
            policy.and_then(|p| p.outlier.map(|o| self.resilience.outliers(&p.name, service, &call.target.backend, o)));

        let hash = policy
            .and_then(|p| p.lb.as_ref())
            .and_then(|lb| lb.key.as_ref())
            .and_then(|k| hash_key(k, &parts, call.client));
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut attempt: u32 = 0;
        // The previous attempt's answer, kept through the back-off: if the breaker then refuses
        // the retry, the client gets that real answer, not a made-up 503.
        let mut previous: Option<Result<Response<Body>, ProxyError>> = None;
        loop {
            attempt += 1;
            let permit = match &breaker {
                Some(b) => match b.acquire() {
                    Ok(p) => Some(p),
                    Err(()) => {
                        rm.circuit_rejected.with_label_values(&[service, &backend]).inc();
                        return match previous {
                            Some(outcome) => outcome.map(|rsp| (rsp, attempt - 1)).map_err(|e| (e, attempt - 1)),
                            None => Err((ProxyError::CircuitOpen { backend }, attempt - 1)),
                        };
                    }
                },
                None => None,
            };
            drop(previous.take());
            let pass = breaker.clone().zip(permit).map(|(b, p)| BreakerPass::new(b, p));
            // Ejected endpoints are skipped; a retry goes to an endpoint not tried yet, where
            // there is one.
            let mut healthy_now = match &outliers {
                Some(o) => o.available(&endpoints),
                None => endpoints.clone(),
            };
            if let Some(p) = policy.filter(|p| p.health.is_some()) {
                let panic;
                (healthy_now, panic) = self.health.filter(&p.name, &healthy_now);
                if panic {
                    rm.healthy_panic.with_label_values(&[service, &backend]).inc();
                }
            }
            let fresh: Vec<_> = healthy_now.iter().copied().filter(|e| !tried.contains(&e.addr)).collect();
            let candidates = if fresh.is_empty() { &healthy_now } else { &fresh };
            let (endpoint, in_flight) = match policy.and_then(|p| p.lb.as_ref().map(|lb| (p, lb))) {
                // A retry with a hash key moves along the ring (or table) to another slot.
                Some((p, lb)) => self.balancer.pick_with(
                    lb.algorithm,
                    &(p.name.clone(), call.target.backend.clone()),
                    hash.map(|h| h.wrapping_add(u64::from(attempt - 1).wrapping_mul(0x9e37_79b9_7f4a_7c15))),
                    if hash.is_some() { &healthy_now } else { candidates },
                ),
                None => self.balancer.pick(candidates),
            }
            .expect("endpoints is not empty");
            tried.push(endpoint.addr);
            let verdict =
                Verdict { pass, outlier: outliers.clone().map(|o| (o, endpoint.addr, endpoints.len())), in_flight };

            let idle = policy.and_then(|p| p.stream_idle_timeout);
            let (span, traceparent) = match self.attempt_span(call, &parts, endpoint, attempt) {
                Some((span, header)) => (Some(span), Some(header)),
                None => (None, None),
            };
            let send = crate::client::replaying(&body, (&self.metrics.replays, "outbound"), |mut copy| {
                if let Some(idle) = idle {
                    copy = with_idle_timeout(copy, idle);
                }
                let mut head = rebuild(&parts);
                if let Some(tp) = &traceparent {
                    head.headers.insert(crate::trace::TRACEPARENT.clone(), tp.clone());
                }
                self.send(call, endpoint, head, copy)
            });
            let outcome = match per_try {
                Some(after) => tokio::time::timeout(after, send).await.unwrap_or(Err(ProxyError::Timeout { after })),
                None => send.await,
            };
            let outcome = match outcome {
                Ok(rsp) => Ok(verdict.judge(rsp.map(boxed))),
                Err(e) => {
                    verdict.failed();
                    Err(e)
                }
            };
            let again =
                match retry.as_ref().filter(|r| attempt <= r.retries && should_retry(&r.on, &outcome, safe_only)) {
                    None => None,
                    Some(_) if !body.replayable() => {
                        rm.retries_skipped.with_label_values(&[service, "body"]).inc();
                        None
                    }
                    Some(_) if !budget.as_ref().is_some_and(|b| b.withdraw()) => {
                        rm.budget_exhausted.with_label_values(&[service]).inc();
                        None
                    }
                    Some(r) => Some(r),
                };
            let Some(r) = again else {
                return end_attempt(span, outcome, true).map(|rsp| (rsp, attempt)).map_err(|e| (e, attempt));
            };
            rm.retries.with_label_values(&[service]).inc();
            previous = Some(end_attempt(span, outcome, false));
            tokio::time::sleep(weir_api::rt::backoff(attempt - 1, r.backoff_base, r.backoff_max, Duration::ZERO)).await;
        }
    }

    /// The span of one attempt (when the request's spans are recorded) and the `traceparent`
    /// that makes it the parent of the endpoint's own span.
    fn attempt_span(
        &self,
        call: &Call<'_>,
        parts: &http::request::Parts,
        endpoint: &Endpoint,
        attempt: u32,
    ) -> Option<(crate::trace::Open, HeaderValue)> {
        let (mut span, header) = call.trace?.child(&self.tracer, Kind::Client, parts.method.as_str())?;
        span.attr("http.request.method", parts.method.as_str());
        span.attr("url.path", parts.uri.path());
        span.attr("peer.service", &*call.target.backend);
        span.attr("server.address", endpoint.addr.ip().to_string());
        span.attr("server.port", i64::from(endpoint.addr.port()));
        if attempt > 1 {
            span.attr("http.request.resend_count", i64::from(attempt - 1));
        }
        let ns = call.target.backend.split('/').next().unwrap_or_default();
        if let Some(tls) = self.tls_target(ns, endpoint) {
            span.attr("weir.server.identity", &*tls.expected);
        }
        Some((span, header))
    }

    /// One attempt: to the peer sidecar over the shared HTTP/2 connection (the client's
    /// protocol in `weir-orig-proto`), or to an unmeshed endpoint in the client's protocol.
    async fn send(
        &self,
        call: &Call<'_>,
        endpoint: &Endpoint,
        mut parts: http::request::Parts,
        body: Body,
    ) -> Result<Response<Incoming>, ProxyError> {
        let version = call.version;
        let mut opts = call.policy.as_ref().map(|p| p.upstream.clone()).unwrap_or_default();
        // Connection limits apply to HTTP/1.1 pools; towards a peer sidecar (or over h2c)
        // there is one multiplexed connection per endpoint anyway.
        if !endpoint.meshed
            && version != Version::HTTP_2
            && let Some(p) = &call.policy
            && let Some(max) = p.bulkhead.and_then(|b| b.max_connections)
        {
            opts.limit = Some((format!("{}|{}", p.name, call.target.backend).into(), max));
        }
        if parts.headers.get(header::HOST).is_none()
            && version != Version::HTTP_2
            && let Ok(v) = HeaderValue::from_str(&call.authority)
        {
            parts.headers.insert(header::HOST, v);
        }
        if let Some(token) = &call.upgrade {
            if endpoint.meshed {
                crate::upgrade::as_extended_connect(&mut parts, token);
            } else {
                crate::upgrade::as_http1(&mut parts, token);
            }
        }
        // An upgrade reaches an unmeshed endpoint as HTTP/1.1, whatever the client spoke.
        if endpoint.meshed || (version == Version::HTTP_2 && call.upgrade.is_none()) {
            if endpoint.meshed {
                parts.headers.insert(ORIG_PROTO.clone(), HeaderValue::from_static(proto_name(version)));
                parts.headers.remove(header::HOST);
            }
            parts.uri = absolute_uri(&call.authority, &parts.uri).ok_or(ProxyError::NoAuthority)?;
            parts.version = Version::HTTP_2;
            let ns = call.target.backend.split('/').next().unwrap_or_default();
            let tls = self.tls_target(ns, endpoint);
            self.clients.h2.send_tls(endpoint.addr, Request::from_parts(parts, body), opts, tls.as_ref()).await
        } else {
            self.clients.send_h1(endpoint.addr, Request::from_parts(parts, body), opts).await
        }
    }
}

/// Who learns how an attempt on an endpoint went: its breaker, its outlier detector and the
/// balancer. For a gRPC response with a body, only its trailers tell, so the verdict travels
/// with the body (see [`crate::grpc::on_trailers`]); the balancer takes the latency at the headers.
struct Verdict {
    pass: Option<BreakerPass>,
    outlier: Option<(Arc<resilience::Outliers>, SocketAddr, usize)>,
    in_flight: balance::InFlight,
}

/// A [`Verdict`] whose latency is taken, waiting for the outcome.
struct Judged {
    pass: Option<BreakerPass>,
    outlier: Option<(Arc<resilience::Outliers>, SocketAddr, usize)>,
    late: balance::Late,
}

impl Verdict {
    fn answered(self) -> Judged {
        Judged { pass: self.pass, outlier: self.outlier, late: self.in_flight.answered() }
    }

    /// Judges `rsp` now, or when its gRPC status passes.
    fn judge(self, rsp: Response<Body>) -> Response<Body> {
        let judged = self.answered();
        match crate::grpc::outcome_at_head(&rsp) {
            Some(outcome) => {
                judged.record(outcome.endpoint_failed());
                rsp
            }
            None => crate::grpc::on_trailers(rsp, Box::new(move |outcome| judged.record(outcome.endpoint_failed()))),
        }
    }

    /// No answer at all (connect failure, reset, timeout).
    fn failed(self) {
        self.answered().record(Some(true));
    }
}

impl Judged {
    /// `None`: no verdict (the client cancelled); a half-open probe gives its slot back.
    fn record(self, failed: Option<bool>) {
        let Some(failed) = failed else { return };
        if let Some(pass) = self.pass {
            pass.record(!failed);
        }
        if let Some((o, addr, total)) = &self.outlier {
            o.record(*addr, !failed, *total);
        }
        if failed {
            self.late.failed();
        }
    }
}

/// Ends an attempt's span: when its response's body ends if the response goes to the client
/// (`answered`), at the response's head if the attempt is retried, now if it failed.
fn end_attempt(
    span: Option<crate::trace::Open>,
    outcome: Result<Response<Body>, ProxyError>,
    answered: bool,
) -> Result<Response<Body>, ProxyError> {
    let Some(mut span) = span else { return outcome };
    match outcome {
        Ok(rsp) if answered => Ok(span.end_with(rsp)),
        Ok(rsp) => {
            span.end_at_head(&rsp);
            Ok(rsp)
        }
        Err(e) => {
            span.fail(e.kind(), e.to_string());
            span.end();
            Err(e)
        }
    }
}

/// How a request ended before going upstream.
enum Early {
    Fail(ProxyError),
    /// An injected gRPC abort with this code.
    Grpc(u32),
}

/// The consistent-hashing key of a request, hashed; `None` when the request lacks it.
fn hash_key(key: &HashKey, parts: &http::request::Parts, client: SocketAddr) -> Option<u64> {
    match key {
        HashKey::Header(h) => parts.headers.get(h).map(|v| balance::key_hash(v.as_bytes())),
        HashKey::Cookie(name) => parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| balance::key_hash(v.as_bytes())),
        HashKey::SourceIp => Some(balance::key_hash(client.ip().to_string().as_bytes())),
    }
}

/// Set on responses when more than one attempt was made.
pub static ATTEMPTS: http::HeaderName = http::HeaderName::from_static("weir-attempts");

fn is_idempotent(m: &http::Method) -> bool {
    use http::Method;
    [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE, Method::PUT, Method::DELETE].contains(m)
}

/// A copy of the request head for another attempt.
pub fn rebuild(parts: &http::request::Parts) -> http::request::Parts {
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req.into_parts().0
}

/// Whether an attempt's outcome is one the policy retries. A gRPC status is retried when the
/// response is trailers-only (the call is committed once a response message starts, as in
/// gRPC's own retry design and Envoy's). `safe_only` (a non-idempotent gRPC call): only its
/// gRPC codes, and failures the application never saw.
fn should_retry(on: &RetryOn, outcome: &Result<Response<Body>, ProxyError>, safe_only: bool) -> bool {
    match outcome {
        Ok(rsp) => {
            let s = rsp.status().as_u16();
            let grpc = crate::grpc::status_in(rsp.headers());
            if grpc.is_some_and(|c| on.grpc.contains(&c)) {
                return true;
            }
            !safe_only
                && ((on.any_5xx && s >= 500)
                    || (on.gateway_error && matches!(s, 502..=504))
                    || on.statuses.contains(&s))
        }
        Err(ProxyError::Connect { .. }) => on.connect_failure || on.any_5xx || on.gateway_error,
        Err(ProxyError::Upstream { refused: true, .. }) if on.refused_stream => true,
        Err(_) if safe_only => false,
        Err(ProxyError::Upstream { .. }) => on.reset || on.any_5xx,
        Err(ProxyError::Timeout { .. }) => on.any_5xx || on.gateway_error || on.reset,
        Err(_) => false,
    }
}

/// The request's authority (absolute-form target, else Host), without userinfo: credentials
/// in a URL (`http://user:pass@web/`) are never forwarded nor matched on.
pub fn request_authority(parts: &http::request::Parts) -> Option<http::uri::Authority> {
    let a: http::uri::Authority = match parts.uri.authority() {
        Some(a) => a.clone(),
        None => parts.headers.get(header::HOST)?.to_str().ok()?.parse().ok()?,
    };
    match a.as_str().rsplit_once('@') {
        Some((_, host)) => host.parse().ok(),
        None => Some(a),
    }
}

pub fn proto_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        _ => "HTTP/1.1",
    }
}

#[cfg(test)]
mod authority_tests {
    use super::*;

    fn parts(uri: &str, host: Option<&str>) -> http::request::Parts {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header(header::HOST, h);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn userinfo_is_never_part_of_the_authority() {
        let a = |uri: &str, host: Option<&str>| request_authority(&parts(uri, host)).map(|a| a.to_string());
        assert_eq!(a("http://user:secret@web.shop:8080/x", None).as_deref(), Some("web.shop:8080"));
        assert_eq!(a("/x", Some("user@web.shop")).as_deref(), Some("web.shop"));
        assert_eq!(a("/x", Some("web.shop")).as_deref(), Some("web.shop"));
        assert_eq!(a("/x", None), None);
    }
}
