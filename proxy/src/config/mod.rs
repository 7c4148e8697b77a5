//! The sidecar's domain view of a snapshot: validated, with regexes compiled and an index from
//! every name a client may use for a Service. Built from the protocol message with
//! `TryFrom`; a snapshot that fails here is Nacked and the previous one keeps serving.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};
use weir_api::proto;

mod authz;
mod policy;

pub use authz::{Authorization, AuthzRule};
pub use policy::*;

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
    pub authorizations: Vec<Authorization>,
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
            StrMatch::Prefix(p) => weir_api::route::path_prefix_matches(p, value),
            StrMatch::Regex(r) => r.is_match(value),
        }
    }
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
            .map(|a| Authorization::try_from(a).map_err(InvalidSnapshot::Authorization))
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
