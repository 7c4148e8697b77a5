//! The sidecar's domain view of a snapshot: validated, with regexes compiled and an index from
//! every name a client may use for a Service. Built from the protocol message with
//! `TryFrom`; a snapshot that fails here is Nacked and the previous one keeps serving.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};
use weir_api::proto;

impl InvalidSnapshot {
    /// The Nack's reason class (a bounded label on the controller's metrics).
    pub fn class(&self) -> &'static str {
        match self {
            InvalidSnapshot::Service { .. } => "service",
            InvalidSnapshot::Duplicate { .. } => "duplicate",
            InvalidSnapshot::Authorization(_) => "authorization",
            InvalidSnapshot::Base { .. } => "base",
        }
    }
}

/// Why a snapshot cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum InvalidSnapshot {
    #[error("service {service}: {message}")]
    Service { service: String, message: String },
    #[error("service {service} is listed twice")]
    Duplicate { service: String },
    #[error("{0}")]
    Authorization(String),
    /// An incremental snapshot that does not apply to what this sidecar runs.
    #[error("incremental snapshot on top of version {base:?}, but this sidecar runs {running:?}")]
    Base { base: String, running: String },
}

/// `namespace/name` of a Service.
pub type ServiceKey = Arc<str>;

#[derive(Debug)]
pub struct Config {
    pub version: String,
    pub services: HashMap<ServiceKey, Arc<Service>>,
    /// Every accepted host name (`svc`, `svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local`).
    by_host: HashMap<String, Arc<Service>>,
    /// Limits on traffic this sidecar's workload receives.
    pub inbound: Vec<InboundLimit>,
    /// MeshAuthorizations that select this sidecar's workload.
    pub authorizations: Vec<crate::inbound::authz::Authorization>,
    /// The protocol message, kept for `/config`.
    pub source: proto::Snapshot,
}

#[derive(Debug)]
pub struct Service {
    pub key: ServiceKey,
    pub ports: Vec<u16>,
    /// Service ports declared opaque TCP: connections skip protocol detection.
    pub opaque_ports: Vec<u16>,
    pub endpoints: Vec<Endpoint>,
    pub rules: Vec<Rule>,
    pub policies: Vec<Arc<Policy>>,
    /// Every endpoint is a meshed sidecar with an identity: calls to it ride mesh mTLS when
    /// this sidecar has a certificate.
    pub mtls: bool,
}

impl Service {
    /// The namespace part of the Service's `namespace/name` key.
    pub fn namespace(&self) -> &str {
        self.key.split_once('/').map_or("", |(ns, _)| ns)
    }

    /// The most specific policy for a request matched by `rule` on `port`: rule and port,
    /// then rule, then port, then the whole Service.
    pub fn policy_for(&self, rule: &str, port: u16) -> Option<&Arc<Policy>> {
        self.policies
            .iter()
            .filter(|p| p.rule.as_deref().is_none_or(|r| r == rule) && p.port.is_none_or(|p| p == port))
            .max_by_key(|p| (p.rule.is_some(), p.port.is_some()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The service port served; `None` serves every port.
    pub service_port: Option<u16>,
    pub meshed: bool,
    pub identity: String,
    /// Relative weight for weighted balancing (at least 1).
    pub weight: u32,
}

#[derive(Debug)]
pub struct Rule {
    /// `namespace/route` (label value for metrics).
    pub route: Arc<str>,
    pub name: Arc<str>,
    /// The metrics `route` label, `namespace/route:rule`, built once per snapshot.
    pub label: Arc<str>,
    pub matches: Vec<Match>,
    pub backends: Vec<Backend>,
    pub timeout: Option<Duration>,
}

#[derive(Debug)]
pub struct Backend {
    pub service: ServiceKey,
    pub port: Option<u16>,
    pub weight: u32,
}

#[derive(Debug, Default)]
pub struct Match {
    pub path: Option<StrMatch>,
    pub headers: Vec<(HeaderName, StrMatch)>,
    pub query: Vec<(String, StrMatch)>,
    pub method: Option<Method>,
}

#[derive(Debug, Clone)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    Regex(regex::Regex),
}

impl StrMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StrMatch::Exact(v) => v == value,
            StrMatch::Prefix(p) => path_prefix_matches(p, value),
            StrMatch::Regex(r) => r.is_match(value),
        }
    }
}

/// Gateway API prefix semantics: `/foo` matches `/foo` and `/foo/bar`, not `/foobar`.
pub(crate) fn path_prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    path.starts_with(prefix) && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/'))
}

/// The whole snapshot an incremental one stands for: the Services of `running` (what this
/// sidecar applied last) with the incremental one's added, changed and removed Services,
/// sorted by namespace and name as the controller sends them. A whole snapshot is returned
/// as it is. When the base is not what runs, or the changes do not fit it, the answer is
/// [`InvalidSnapshot::Base`]: the controller then sends the next snapshot whole.
pub fn resolve(snapshot: proto::Snapshot, running: Option<&Config>) -> Result<proto::Snapshot, InvalidSnapshot> {
    if snapshot.base_version.is_empty() {
        return Ok(snapshot);
    }
    let proto::Snapshot { version, services: changed, inbound, base_version, removed_services } = snapshot;
    let base_error = || InvalidSnapshot::Base {
        base: base_version.clone(),
        running: running.map_or_else(|| "nothing yet".to_string(), |r| r.version.clone()),
    };
    let running = running.filter(|r| r.version == base_version).ok_or_else(base_error)?;
    let mut services: std::collections::BTreeMap<(String, String), proto::Service> =
        running.source.services.iter().map(|s| ((s.namespace.clone(), s.name.clone()), s.clone())).collect();
    for gone in &removed_services {
        let key = gone.split_once('/').map(|(ns, name)| (ns.to_string(), name.to_string()));
        if key.and_then(|k| services.remove(&k)).is_none() {
            // Not a Service of the base: this sidecar's view is not what the controller thinks.
            return Err(base_error());
        }
    }
    let mut seen = std::collections::HashSet::new();
    for s in changed {
        let key = (s.namespace.clone(), s.name.clone());
        if !seen.insert(key.clone()) {
            return Err(InvalidSnapshot::Duplicate { service: format!("{}/{}", key.0, key.1) });
        }
        services.insert(key, s);
    }
    Ok(proto::Snapshot { version, services: services.into_values().collect(), inbound, ..Default::default() })
}

impl Config {
    /// Finds the Service a client means by `host` (without port). Short names resolve in the
    /// sidecar's own namespace.
    pub fn lookup(&self, host: &str) -> Option<&Arc<Service>> {
        let host = host.trim_end_matches('.');
        // Host names are case-insensitive (RFC 9110); the table holds them in lower case.
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            return self.by_host.get(&host.to_ascii_lowercase());
        }
        self.by_host.get(host)
    }

    /// The Service that has `addr` as an endpoint, if any.
    pub fn endpoint_owner(&self, addr: SocketAddr) -> Option<&ServiceKey> {
        self.endpoint_at(addr).map(|(s, _)| &s.key)
    }

    /// Whether a connection to `orig` is opaque TCP by declaration: a Service's virtual address
    /// on a port it declares opaque, or an endpoint serving such a port.
    pub fn opaque_at(&self, orig: SocketAddr) -> bool {
        if let Some(svc) = self.lookup(&ip_host(orig.ip())) {
            return svc.opaque_ports.contains(&orig.port());
        }
        self.endpoint_at(orig).is_some_and(|(s, e)| s.opaque_ports.contains(&e.service_port.unwrap_or(orig.port())))
    }

    /// The endpoint at `addr` and its Service, if any (the first, when several list it).
    pub fn endpoint_at(&self, addr: SocketAddr) -> Option<(&Arc<Service>, &Endpoint)> {
        self.services.values().find_map(|s| Some((s, s.endpoints.iter().find(|e| e.addr == addr)?)))
    }

    /// The meshed endpoint a connection to `addr` reaches, with its Service: the endpoint at
    /// `addr`, or for another port of a pod's address, a meshed endpoint at that address (a
    /// pod has one identity). Never by address alone on loopback, where local mode puts every
    /// workload.
    pub fn meshed_at(&self, addr: SocketAddr) -> Option<(&Arc<Service>, &Endpoint)> {
        if let Some(found) = self.endpoint_at(addr) {
            return found.1.meshed.then_some(found);
        }
        if addr.ip().is_loopback() {
            return None;
        }
        self.services
            .values()
            .find_map(|s| Some((s, s.endpoints.iter().find(|e| e.meshed && e.addr.ip() == addr.ip())?)))
    }

    pub fn service(&self, key: &str) -> Option<&Arc<Service>> {
        self.services.get(key)
    }

    pub fn from_snapshot(
        snapshot: proto::Snapshot,
        own_namespace: &str,
        cluster_domain: &str,
    ) -> Result<Self, InvalidSnapshot> {
        let mut services = HashMap::new();
        let mut by_host = HashMap::new();
        for s in &snapshot.services {
            let svc = Arc::new(Service::try_from(s)?);
            if services.insert(svc.key.clone(), svc.clone()).is_some() {
                return Err(InvalidSnapshot::Duplicate { service: svc.key.to_string() });
            }
            let (ns, name) = (&s.namespace, &s.name);
            for host in
                [format!("{name}.{ns}"), format!("{name}.{ns}.svc"), format!("{name}.{ns}.svc.{cluster_domain}")]
            {
                by_host.insert(host, svc.clone());
            }
            if ns == own_namespace {
                by_host.insert(name.clone(), svc.clone());
            }
            // A ClusterIP in the authority (`10.96.0.10:80`, `[fd00::a]:80`) names the Service too.
            for ip in &s.cluster_ips {
                let ip: std::net::IpAddr = ip.parse().map_err(|_| InvalidSnapshot::Service {
                    service: svc.key.to_string(),
                    message: format!("cluster IP {ip:?} is not an IP address"),
                })?;
                let host = ip_host(ip);
                if by_host.insert(host.clone(), svc.clone()).is_some_and(|other| other.key != svc.key) {
                    return Err(InvalidSnapshot::Service {
                        service: svc.key.to_string(),
                        message: format!("cluster IP {host} is also another service's"),
                    });
                }
            }
        }
        let mut inbound = Vec::new();
        for l in snapshot.inbound.iter().flat_map(|i| &i.rate_limits) {
            let limit = l.limit.as_ref().ok_or_else(|| InvalidSnapshot::Service {
                service: l.service.clone(),
                message: format!("inbound rate limit of {} has no limit", l.policy),
            })?;
            let limit = rate_limit(limit)
                .map_err(|message| InvalidSnapshot::Service { service: l.service.clone(), message })?;
            inbound.push(InboundLimit { policy: l.policy.clone().into(), service: l.service.clone().into(), limit });
        }
        let authorizations = snapshot
            .inbound
            .iter()
            .flat_map(|i| &i.authorizations)
            .map(|a| crate::inbound::authz::Authorization::try_from(a).map_err(InvalidSnapshot::Authorization))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Config { version: snapshot.version.clone(), services, by_host, inbound, authorizations, source: snapshot })
    }
}

/// An address as a host in an authority (`10.96.0.10`, `[fd00::a]`): how ClusterIPs are looked up.
pub fn ip_host(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

impl TryFrom<&proto::Service> for Service {
    type Error = InvalidSnapshot;

    fn try_from(s: &proto::Service) -> Result<Self, InvalidSnapshot> {
        let key: ServiceKey = format!("{}/{}", s.namespace, s.name).into();
        let bad = |message: String| InvalidSnapshot::Service { service: key.to_string(), message };
        if s.namespace.is_empty() || s.name.is_empty() {
            return Err(bad("namespace and name are required".into()));
        }
        let port = |p: u32, what: &str| u16::try_from(p).map_err(|_| bad(format!("{what} {p} is not a port")));
        let ports = s.ports.iter().map(|p| port(*p, "port")).collect::<Result<Vec<_>, _>>()?;
        let mut endpoints = Vec::with_capacity(s.endpoints.len());
        for e in &s.endpoints {
            let addr: SocketAddr =
                e.address.parse().map_err(|_| bad(format!("endpoint address {:?} is not ip:port", e.address)))?;
            let sp = port(e.service_port, "endpoint service port")?;
            endpoints.push(Endpoint {
                addr,
                service_port: (sp != 0).then_some(sp),
                meshed: e.meshed,
                identity: e.identity.clone(),
                weight: e.weight.clamp(1, 1000),
            });
        }
        let mut rules = Vec::with_capacity(s.rules.len());
        for (i, r) in s.rules.iter().enumerate() {
            let at = |m: String| bad(format!("rule {i} ({}): {m}", r.route));
            let mut matches = Vec::new();
            for m in &r.matches {
                let mut out = Match::default();
                if let Some(p) = &m.path {
                    out.path = Some(str_match(p, true).map_err(at)?);
                }
                for h in &m.headers {
                    let name = HeaderName::from_bytes(h.name.as_bytes())
                        .map_err(|_| at(format!("invalid header name {:?}", h.name)))?;
                    let v = h.value.as_ref().ok_or_else(|| at(format!("header {:?} has no value match", h.name)))?;
                    out.headers.push((name, str_match(v, false).map_err(at)?));
                }
                for q in &m.query_params {
                    let v =
                        q.value.as_ref().ok_or_else(|| at(format!("query param {:?} has no value match", q.name)))?;
                    out.query.push((q.name.clone(), str_match(v, false).map_err(at)?));
                }
                if !m.method.is_empty() {
                    out.method = Some(
                        Method::from_bytes(m.method.as_bytes())
                            .map_err(|_| at(format!("invalid method {:?}", m.method)))?,
                    );
                }
                matches.push(out);
            }
            if r.backends.is_empty() {
                return Err(at("no backends".into()));
            }
            let backends = r
                .backends
                .iter()
                .map(|b| {
                    let p = port(b.port, "backend port")?;
                    Ok(Backend {
                        service: format!("{}/{}", b.namespace, b.name).into(),
                        port: (p != 0).then_some(p),
                        weight: b.weight,
                    })
                })
                .collect::<Result<Vec<_>, InvalidSnapshot>>()?;
            rules.push(Rule {
                route: r.route.clone().into(),
                name: r.name.clone().into(),
                label: format!("{}:{}", r.route, r.name).into(),
                matches,
                backends,
                timeout: (r.timeout_ms > 0).then(|| Duration::from_millis(r.timeout_ms)),
            });
        }
        let policies = s
            .policies
            .iter()
            .map(|p| Policy::try_from(p).map(Arc::new).map_err(|m| bad(format!("policy {}: {m}", p.name))))
            .collect::<Result<Vec<_>, _>>()?;
        let mtls = !endpoints.is_empty() && endpoints.iter().all(|e| e.meshed && !e.identity.is_empty());
        let opaque_ports = s.opaque_ports.iter().map(|p| port(*p, "opaque port")).collect::<Result<Vec<_>, _>>()?;
        Ok(Service { key, ports, opaque_ports, endpoints, rules, policies, mtls })
    }
}

/// A resilience policy, as the outbound path applies it.
#[derive(Debug, Clone)]
pub struct Policy {
    /// `namespace/name` of the resource (label value and the key of its retry budget).
    pub name: Arc<str>,
    pub rule: Option<String>,
    pub port: Option<u16>,
    pub request_timeout: Option<Duration>,
    pub per_try_timeout: Option<Duration>,
    pub upstream: crate::client::ConnectOpts,
    pub stream_idle_timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    pub breaker: Option<BreakerPolicy>,
    pub outlier: Option<OutlierPolicy>,
    pub bulkhead: Option<BulkheadPolicy>,
    pub rate_limit: Option<RateLimitPolicy>,
    pub faults: Option<FaultPolicy>,
    pub lb: Option<LbPolicy>,
    pub health: Option<HealthPolicy>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthPolicy {
    pub path: http::uri::PathAndQuery,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LbAlgorithm {
    P2cPeakEwma,
    RoundRobin,
    LeastRequest,
    Random,
    RingHash,
    Maglev,
}

#[derive(Debug, Clone, PartialEq)]
pub enum HashKey {
    Header(HeaderName),
    Cookie(String),
    SourceIp,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LbPolicy {
    pub algorithm: LbAlgorithm,
    /// For ring hash and Maglev.
    pub key: Option<HashKey>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutlierPolicy {
    pub consecutive_failures: u32,
    pub failure_rate_percent: Option<u32>,
    pub min_requests: u32,
    pub window: Duration,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejected_percent: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BulkheadPolicy {
    pub max_connections: Option<u32>,
    pub max_in_flight: u32,
    pub max_pending: u32,
    pub pending_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RateKey {
    Whole,
    Header(HeaderName),
    SourceIp,
    /// The caller's SPIFFE ID (inbound only); plaintext callers share the empty key.
    ClientIdentity,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitPolicy {
    pub per_second: u32,
    pub burst: u32,
    pub key: RateKey,
    pub max_keys: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Abort {
    Http(http::StatusCode),
    Grpc(u32),
}

#[derive(Debug, Clone)]
pub struct FaultPolicy {
    /// Delay and the share (0–1) of requests it applies to.
    pub delay: Option<(Duration, f64)>,
    pub abort: Option<(Abort, f64)>,
    pub headers: Vec<(HeaderName, StrMatch)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub retries: u32,
    pub on: RetryOn,
    pub non_idempotent: bool,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub budget: BudgetPolicy,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetPolicy {
    pub percent: u32,
    pub min_per_second: u32,
    pub window: Duration,
}

/// The conditions a retry is made on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RetryOn {
    pub any_5xx: bool,
    pub gateway_error: bool,
    pub reset: bool,
    pub connect_failure: bool,
    pub refused_stream: bool,
    pub statuses: Vec<u16>,
    /// gRPC status codes (from `grpc-status` in the response headers).
    pub grpc: Vec<u32>,
}

impl RetryOn {
    pub fn parse(conditions: &[String]) -> Result<Self, String> {
        let mut on = RetryOn::default();
        for c in conditions {
            match c.as_str() {
                "5xx" => on.any_5xx = true,
                "gateway-error" => on.gateway_error = true,
                "reset" => on.reset = true,
                "connect-failure" => on.connect_failure = true,
                "refused-stream" => on.refused_stream = true,
                "cancelled" => on.grpc.push(1),
                "deadline-exceeded" => on.grpc.push(4),
                "resource-exhausted" => on.grpc.push(8),
                "internal" => on.grpc.push(13),
                "unavailable" => on.grpc.push(14),
                code => match code.parse::<u16>() {
                    Ok(n) if (100..=599).contains(&n) => on.statuses.push(n),
                    _ => return Err(format!("unknown retry condition {code:?}")),
                },
            }
        }
        Ok(on)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerPolicy {
    pub consecutive_failures: u32,
    pub open: Duration,
    pub max_open: Duration,
    pub half_open_requests: u32,
    pub success_threshold: u32,
}

impl TryFrom<&proto::ResiliencePolicy> for Policy {
    type Error = String;

    fn try_from(p: &proto::ResiliencePolicy) -> Result<Self, String> {
        let ms = |v: u64| (v > 0).then(|| Duration::from_millis(v));
        let port = u16::try_from(p.port).map_err(|_| format!("{} is not a port", p.port))?;
        let retry = match &p.retry {
            None => None,
            Some(r) => {
                if r.budget_percent > 100 {
                    return Err(format!("retry budget {}% is over 100%", r.budget_percent));
                }
                let base = ms(r.backoff_base_ms).ok_or("back-off base must be positive")?;
                let max = ms(r.backoff_max_ms).ok_or("back-off max must be positive")?;
                Some(RetryPolicy {
                    retries: r.retries,
                    on: RetryOn::parse(&r.retry_on)?,
                    non_idempotent: r.retry_non_idempotent,
                    backoff_base: base,
                    backoff_max: max.max(base),
                    budget: BudgetPolicy {
                        percent: r.budget_percent,
                        min_per_second: r.budget_min_per_second,
                        window: ms(r.budget_window_ms).ok_or("retry budget window must be positive")?,
                    },
                })
            }
        };
        let breaker = match &p.circuit_breaker {
            None => None,
            Some(c) => {
                if c.consecutive_failures == 0 || c.half_open_requests == 0 || c.success_threshold == 0 {
                    return Err("circuit breaker thresholds must be at least 1".into());
                }
                let open = ms(c.open_ms).ok_or("circuit breaker open duration must be positive")?;
                Some(BreakerPolicy {
                    consecutive_failures: c.consecutive_failures,
                    open,
                    max_open: ms(c.max_open_ms).unwrap_or(open).max(open),
                    half_open_requests: c.half_open_requests,
                    success_threshold: c.success_threshold,
                })
            }
        };
        let outlier = match &p.outlier_detection {
            None => None,
            Some(o) => {
                if o.consecutive_failures == 0 || o.min_requests == 0 || o.max_ejected_percent > 100 {
                    return Err("outlier detection thresholds out of range".into());
                }
                let base = ms(o.base_ejection_ms).ok_or("base ejection time must be positive")?;
                Some(OutlierPolicy {
                    consecutive_failures: o.consecutive_failures,
                    failure_rate_percent: (o.failure_rate_percent > 0).then_some(o.failure_rate_percent.min(100)),
                    min_requests: o.min_requests,
                    window: ms(o.window_ms).ok_or("outlier window must be positive")?,
                    base_ejection: base,
                    max_ejection: ms(o.max_ejection_ms).unwrap_or(base).max(base),
                    max_ejected_percent: o.max_ejected_percent,
                })
            }
        };
        let bulkhead = match &p.bulkhead {
            None => None,
            Some(b) if b.max_in_flight == 0 => return Err("bulkhead maxInFlight must be at least 1".into()),
            Some(b) => Some(BulkheadPolicy {
                max_connections: (b.max_connections > 0).then_some(b.max_connections),
                max_in_flight: b.max_in_flight,
                max_pending: b.max_pending,
                pending_timeout: Duration::from_millis(b.pending_timeout_ms),
            }),
        };
        // Inbound limits are enforced by the Service's own sidecars (see `Config::inbound`).
        let rate_limit = match &p.rate_limit {
            Some(r) if !r.inbound => Some(rate_limit(r)?),
            _ => None,
        };
        let faults = match &p.faults {
            None => None,
            Some(f) => {
                let share = |pct: f64| {
                    if (0.0..=100.0).contains(&pct) {
                        Ok(pct / 100.0)
                    } else {
                        Err(format!("fault percent {pct} out of range"))
                    }
                };
                let delay = match ms(f.delay_ms) {
                    Some(d) => Some((d, share(f.delay_percent)?)),
                    None => None,
                };
                let abort = match (f.abort_http_status, f.abort_grpc_status) {
                    (0, None) => None,
                    (0, Some(code)) if code <= 16 => Some((Abort::Grpc(code), share(f.abort_percent)?)),
                    (status, None) => {
                        let s = u16::try_from(status)
                            .ok()
                            .and_then(|s| http::StatusCode::from_u16(s).ok())
                            .ok_or_else(|| format!("abort status {status} is not an HTTP status"))?;
                        Some((Abort::Http(s), share(f.abort_percent)?))
                    }
                    _ => return Err("fault abort: set exactly one valid HTTP or gRPC status".into()),
                };
                let mut headers = Vec::new();
                for h in &f.headers {
                    let name = HeaderName::from_bytes(h.name.as_bytes())
                        .map_err(|_| format!("invalid fault header name {:?}", h.name))?;
                    let v = h.value.as_ref().ok_or_else(|| format!("fault header {:?} has no value match", h.name))?;
                    headers.push((name, str_match(v, false)?));
                }
                Some(FaultPolicy { delay, abort, headers })
            }
        };
        let lb = match &p.load_balancer {
            None => None,
            Some(lb) => {
                use proto::load_balancer::Algorithm as A;
                let algorithm = match A::try_from(lb.algorithm) {
                    Ok(A::P2cPeakEwma) => LbAlgorithm::P2cPeakEwma,
                    Ok(A::RoundRobin) => LbAlgorithm::RoundRobin,
                    Ok(A::LeastRequest) => LbAlgorithm::LeastRequest,
                    Ok(A::Random) => LbAlgorithm::Random,
                    Ok(A::RingHash) => LbAlgorithm::RingHash,
                    Ok(A::Maglev) => LbAlgorithm::Maglev,
                    Ok(A::Unspecified) | Err(_) => {
                        return Err(format!("unsupported load-balancing algorithm {}", lb.algorithm));
                    }
                };
                let key = match (lb.hash_header.as_str(), lb.hash_cookie.as_str(), lb.hash_source_ip) {
                    ("", "", false) => None,
                    (h, "", false) => Some(HashKey::Header(
                        HeaderName::from_bytes(h.as_bytes()).map_err(|_| format!("invalid hash header {h:?}"))?,
                    )),
                    ("", c, false) => Some(HashKey::Cookie(c.to_string())),
                    ("", "", true) => Some(HashKey::SourceIp),
                    _ => return Err("hash key: set exactly one of header, cookie and source IP".into()),
                };
                if matches!(algorithm, LbAlgorithm::RingHash | LbAlgorithm::Maglev) != key.is_some() {
                    return Err("a hash key goes with RingHash and Maglev, and only with them".into());
                }
                Some(LbPolicy { algorithm, key })
            }
        };
        let health = match &p.health_check {
            None => None,
            Some(h) => Some(HealthPolicy {
                path: h.path.parse().map_err(|_| format!("invalid health check path {:?}", h.path))?,
                interval: ms(h.interval_ms).ok_or("health check interval must be positive")?,
                timeout: ms(h.timeout_ms).ok_or("health check timeout must be positive")?,
                healthy_threshold: h.healthy_threshold.max(1),
                unhealthy_threshold: h.unhealthy_threshold.max(1),
            }),
        };
        Ok(Policy {
            health,
            lb,
            outlier,
            bulkhead,
            rate_limit,
            faults,
            name: p.name.clone().into(),
            rule: (!p.rule.is_empty()).then(|| p.rule.clone()),
            port: (port != 0).then_some(port),
            request_timeout: ms(p.request_timeout_ms),
            per_try_timeout: ms(p.per_try_timeout_ms),
            upstream: crate::client::ConnectOpts {
                connect: ms(p.connect_timeout_ms),
                idle: ms(p.idle_timeout_ms),
                limit: None,
            },
            stream_idle_timeout: ms(p.stream_idle_timeout_ms),
            retry,
            breaker,
        })
    }
}

fn rate_limit(r: &proto::RateLimit) -> Result<RateLimitPolicy, String> {
    if r.requests_per_second == 0 || r.max_keys == 0 {
        return Err("rate limit rate and maxKeys must be at least 1".into());
    }
    let key = match (r.header.as_str(), r.source_ip, r.client_identity) {
        ("", false, false) => RateKey::Whole,
        ("", true, false) => RateKey::SourceIp,
        ("", false, true) if r.inbound => RateKey::ClientIdentity,
        ("", false, true) => return Err("rate limit key: client identity is for inbound limits only".into()),
        (h, false, false) => RateKey::Header(
            HeaderName::from_bytes(h.as_bytes()).map_err(|_| format!("invalid rate limit header {h:?}"))?,
        ),
        _ => return Err("rate limit key: header, source IP and client identity are exclusive".into()),
    };
    Ok(RateLimitPolicy { per_second: r.requests_per_second, burst: r.burst.max(1), key, max_keys: r.max_keys })
}

/// A rate limit this sidecar enforces on traffic it receives.
#[derive(Debug, Clone)]
pub struct InboundLimit {
    pub policy: Arc<str>,
    pub service: ServiceKey,
    pub limit: RateLimitPolicy,
}

fn str_match(m: &proto::StringMatch, is_path: bool) -> Result<StrMatch, String> {
    match proto::MatchKind::try_from(m.kind) {
        Ok(proto::MatchKind::Exact) => Ok(StrMatch::Exact(m.value.clone())),
        Ok(proto::MatchKind::Prefix) if is_path => Ok(StrMatch::Prefix(m.value.clone())),
        Ok(proto::MatchKind::Regex) => weir_api::route::compile_regex(&m.value)
            .map(StrMatch::Regex)
            .map_err(|e| format!("invalid regex {:?}: {e}", m.value)),
        Ok(proto::MatchKind::Prefix) => Err("prefix matching applies to paths only".into()),
        Ok(proto::MatchKind::Unspecified) | Err(_) => {
            Err(format!("unsupported match kind {} (is the controller newer than this proxy?)", m.kind))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(kind: i32) -> proto::Snapshot {
        proto::Snapshot {
            version: "7".into(),
            services: vec![proto::Service {
                namespace: "shop".into(),
                name: "web".into(),
                ports: vec![80],
                opaque_ports: vec![],
                endpoints: vec![proto::Endpoint { address: "127.0.0.1:1".into(), ..Default::default() }],
                rules: vec![proto::RouteRule {
                    route: "shop/r".into(),
                    name: "0".into(),
                    matches: vec![proto::RouteMatch {
                        path: Some(proto::StringMatch { kind, value: "/api".into() }),
                        ..Default::default()
                    }],
                    backends: vec![proto::BackendRef {
                        namespace: "shop".into(),
                        name: "web".into(),
                        port: 0,
                        weight: 1,
                    }],
                    timeout_ms: 0,
                }],
                policies: vec![],
                cluster_ips: vec![],
            }],
            inbound: None,
            ..Default::default()
        }
    }

    fn service(ns: &str, name: &str, port: u32) -> proto::Service {
        proto::Service { namespace: ns.into(), name: name.into(), ports: vec![port], ..Default::default() }
    }

    /// An incremental snapshot on top of the running one gives exactly the whole snapshot
    /// the controller would have sent; one on another base, or removing what is not there,
    /// asks for a whole one.
    #[test]
    fn incremental_snapshots_resolve_against_the_running_one() {
        let whole = |version: &str, services: Vec<proto::Service>| proto::Snapshot {
            version: version.into(),
            services,
            ..Default::default()
        };
        let v1 = whole("1", vec![service("a", "keep", 80), service("a", "old", 80), service("b", "change", 80)]);
        let running = Config::from_snapshot(v1.clone(), "a", "cluster.local").unwrap();
        assert_eq!(resolve(v1.clone(), Some(&running)).unwrap(), v1, "whole snapshots pass through");

        let delta = proto::Snapshot {
            version: "2".into(),
            services: vec![service("b", "change", 81), service("a", "new", 80)],
            base_version: "1".into(),
            removed_services: vec!["a/old".into()],
            inbound: Some(proto::InboundPolicy::default()),
        };
        let expected = proto::Snapshot {
            version: "2".into(),
            services: vec![service("a", "keep", 80), service("a", "new", 80), service("b", "change", 81)],
            inbound: Some(proto::InboundPolicy::default()),
            ..Default::default()
        };
        assert_eq!(resolve(delta.clone(), Some(&running)).unwrap(), expected);
        let applied = Config::from_snapshot(resolve(delta.clone(), Some(&running)).unwrap(), "a", "cluster.local");
        assert_eq!(applied.unwrap().source, expected, "/config shows the whole snapshot");

        for (base, running) in [("0", Some(&running)), ("1", None)] {
            let err = resolve(proto::Snapshot { base_version: base.into(), ..delta.clone() }, running).unwrap_err();
            assert_eq!(err.class(), "base", "{err}");
        }
        let gone_twice = proto::Snapshot { removed_services: vec!["a/nope".into()], ..delta.clone() };
        assert_eq!(resolve(gone_twice, Some(&running)).unwrap_err().class(), "base");
        let twice = proto::Snapshot { services: vec![service("a", "new", 80), service("a", "new", 81)], ..delta };
        assert_eq!(resolve(twice, Some(&running)).unwrap_err().class(), "duplicate");
    }

    #[test]
    fn resolves_every_name_form() {
        let cfg = Config::from_snapshot(snapshot(proto::MatchKind::Prefix as i32), "shop", "cluster.local").unwrap();
        for host in ["web", "web.shop", "web.shop.svc", "web.shop.svc.cluster.local", "web.shop.svc.cluster.local."] {
            assert!(cfg.lookup(host).is_some(), "{host}");
        }
        let other =
            Config::from_snapshot(snapshot(proto::MatchKind::Prefix as i32), "elsewhere", "cluster.local").unwrap();
        assert!(other.lookup("web").is_none());
        assert!(other.lookup("web.shop").is_some());
    }

    #[test]
    fn opaque_ports_are_known_by_virtual_address_and_by_endpoint() {
        let mut snap = snapshot(proto::MatchKind::Prefix as i32);
        snap.services[0].cluster_ips = vec!["10.96.0.10".into()];
        snap.services[0].ports = vec![80, 5432];
        snap.services[0].opaque_ports = vec![5432];
        snap.services[0].endpoints =
            vec![proto::Endpoint { address: "10.0.0.7:15432".into(), service_port: 5432, ..Default::default() }];
        let cfg = Config::from_snapshot(snap.clone(), "shop", "cluster.local").unwrap();
        assert!(cfg.opaque_at("10.96.0.10:5432".parse().unwrap()));
        assert!(!cfg.opaque_at("10.96.0.10:80".parse().unwrap()));
        assert!(cfg.opaque_at("10.0.0.7:15432".parse().unwrap()), "the endpoint serving the opaque port");
        assert!(!cfg.opaque_at("10.0.0.8:5432".parse().unwrap()), "an address the mesh does not know");
        snap.services[0].opaque_ports = vec![70000];
        let err = Config::from_snapshot(snap, "shop", "cluster.local").unwrap_err();
        assert!(err.to_string().contains("opaque port 70000 is not a port"), "{err}");
    }

    #[test]
    fn resolves_cluster_ips() {
        let mut snap = snapshot(proto::MatchKind::Prefix as i32);
        snap.services[0].cluster_ips = vec!["10.96.0.10".into(), "fd00::a".into()];
        let cfg = Config::from_snapshot(snap.clone(), "elsewhere", "cluster.local").unwrap();
        assert_eq!(&*cfg.lookup("10.96.0.10").unwrap().key, "shop/web");
        assert_eq!(&*cfg.lookup("[fd00::a]").unwrap().key, "shop/web");
        assert_eq!(&*cfg.lookup("[FD00::A]").unwrap().key, "shop/web");
        assert_eq!(&*cfg.lookup("Web.Shop.SVC.cluster.local.").unwrap().key, "shop/web", "host names ignore case");
        assert!(cfg.lookup("10.96.0.11").is_none());
        snap.services[0].cluster_ips = vec!["10.96.0".into()];
        let err = Config::from_snapshot(snap, "shop", "cluster.local").unwrap_err();
        assert!(err.to_string().contains("cluster IP \"10.96.0\" is not an IP address"), "{err}");
    }

    #[test]
    fn unknown_match_kind_is_invalid() {
        let err = Config::from_snapshot(snapshot(42), "shop", "cluster.local").unwrap_err();
        assert!(err.to_string().contains("unsupported match kind 42"), "{err}");
    }

    #[test]
    fn prefix_respects_segments() {
        let p = StrMatch::Prefix("/api".into());
        assert!(p.matches("/api") && p.matches("/api/x") && !p.matches("/apix"));
        assert!(StrMatch::Prefix("/".into()).matches("/anything"));
        assert!(StrMatch::Prefix("/api/".into()).matches("/api/v1"));
    }
}

#[cfg(test)]
mod policy_tests {
    use super::*;

    fn policy(rule: &str, port: u32) -> proto::ResiliencePolicy {
        proto::ResiliencePolicy { name: format!("ns/{rule}-{port}"), rule: rule.into(), port, ..Default::default() }
    }

    #[test]
    fn most_specific_policy_wins() {
        let svc = proto::Service {
            namespace: "ns".into(),
            name: "web".into(),
            policies: vec![policy("", 0), policy("", 80), policy("a", 0), policy("a", 80)],
            ..Default::default()
        };
        let svc = Service::try_from(&svc).unwrap();
        let name = |rule, port| svc.policy_for(rule, port).map(|p| p.name.to_string()).unwrap();
        assert_eq!(name("a", 80), "ns/a-80");
        assert_eq!(name("a", 81), "ns/a-0");
        assert_eq!(name("b", 80), "ns/-80");
        assert_eq!(name("b", 81), "ns/-0");
    }

    #[test]
    fn unknown_retry_condition_is_invalid() {
        let mut p = policy("", 0);
        p.retry = Some(proto::RetryPolicy {
            retries: 1,
            retry_on: vec!["teapot".into()],
            backoff_base_ms: 25,
            backoff_max_ms: 250,
            budget_window_ms: 10_000,
            ..Default::default()
        });
        assert!(Policy::try_from(&p).unwrap_err().contains("teapot"));
        p.retry.as_mut().unwrap().retry_on = vec!["503".into(), "unavailable".into(), "5xx".into()];
        let on = Policy::try_from(&p).unwrap().retry.unwrap().on;
        assert_eq!((on.statuses.as_slice(), on.grpc.as_slice(), on.any_5xx), (&[503][..], &[14][..], true));
    }
}
