//! The sidecar's domain view of a snapshot: validated, with regexes compiled and an index from
//! every name a client may use for a Service. Built from the protocol message with
//! `TryFrom`; a snapshot that fails here is Nacked and the previous one keeps serving.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};
use weir_api::proto;

/// Why a snapshot cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum InvalidSnapshot {
    #[error("service {service}: {message}")]
    Service { service: String, message: String },
    #[error("service {service} is listed twice")]
    Duplicate { service: String },
}

/// `namespace/name` of a Service.
pub type ServiceKey = Arc<str>;

#[derive(Debug)]
pub struct Config {
    pub version: String,
    pub services: HashMap<ServiceKey, Arc<Service>>,
    /// Every accepted host name (`svc`, `svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local`).
    by_host: HashMap<String, Arc<Service>>,
    /// The protocol message, kept for `/config`.
    pub source: proto::Snapshot,
}

#[derive(Debug)]
pub struct Service {
    pub key: ServiceKey,
    pub ports: Vec<u16>,
    pub endpoints: Vec<Endpoint>,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The service port served; `None` serves every port.
    pub service_port: Option<u16>,
    pub meshed: bool,
    pub identity: String,
}

#[derive(Debug)]
pub struct Rule {
    /// `namespace/route` (label value for metrics).
    pub route: Arc<str>,
    pub name: Arc<str>,
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

#[derive(Debug)]
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
fn path_prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    path.starts_with(prefix) && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/'))
}

impl Config {
    /// Finds the Service a client means by `host` (without port). Short names resolve in the
    /// sidecar's own namespace.
    pub fn lookup(&self, host: &str) -> Option<&Arc<Service>> {
        self.by_host.get(host.trim_end_matches('.'))
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
        }
        Ok(Config { version: snapshot.version.clone(), services, by_host, source: snapshot })
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
                matches,
                backends,
                timeout: (r.timeout_ms > 0).then(|| Duration::from_millis(r.timeout_ms)),
            });
        }
        Ok(Service { key, ports, endpoints, rules })
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
            }],
        }
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
