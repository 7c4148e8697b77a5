//! The translator: turns the resources in force into the protocol's view of the mesh.
//! Pure functions of the index (and of the canary reconciler's current weights,
//! [`CanaryRouting`]), so every source (local files, Kubernetes) shares them.

use std::collections::BTreeMap;

use weir_api::authorization::{AuthorizationMode, MeshAuthorizationSpec, WorkloadTarget};
use weir_api::canary::{AbTest, CanarySpec, ForceHeader};
use weir_api::proto;
use weir_api::resilience::{LbAlgorithm, RateLimitAlgorithm, ResiliencePolicySpec, grpc_code};
use weir_api::route::{PathMatchType, RouteSpec, ValueMatchType};

use crate::index::{Index, Kind, Resource};

/// A Canary in force, with the Routes that also steer its Service.
#[derive(Debug, Clone, PartialEq)]
pub struct CanaryDef {
    pub namespace: String,
    pub name: String,
    pub spec: CanarySpec,
    /// `namespace/name` of Routes for the same Service: their rules come after the canary's.
    pub conflicting_routes: Vec<String>,
}

/// Every Canary in the index.
pub fn definitions(index: &Index) -> Vec<CanaryDef> {
    let mut out = Vec::new();
    for (key, entry) in index.entries() {
        let Resource::Canary(spec) = &entry.resource else { continue };
        let conflicting_routes = index
            .entries()
            .iter()
            .filter_map(|(k, e)| match &e.resource {
                Resource::Route(r) if k.namespace == key.namespace && r.service == spec.service => {
                    Some(format!("{}/{}", k.namespace, k.name))
                }
                _ => None,
            })
            .collect();
        out.push(CanaryDef {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            spec: (**spec).clone(),
            conflicting_routes,
        });
    }
    out
}

/// How one canary's Service is routed right now.
#[derive(Debug, Clone, PartialEq)]
pub struct CanaryRouting {
    pub namespace: String,
    pub name: String,
    pub service: String,
    pub stable: String,
    pub canary: String,
    /// Percent of the remaining traffic to the canary.
    pub weight: u32,
    /// Present during the A/B stage: matching requests go to the canary.
    pub ab: Option<AbTest>,
    pub force: Option<ForceHeader>,
}

/// Every Service with its endpoints and merged route rules, sorted by namespace/name.
/// Rules from several Routes for one Service are ordered by Route name; a Canary's rules come
/// before them all.
pub fn services(index: &Index, canaries: &[CanaryRouting]) -> Vec<proto::Service> {
    let mut routes: BTreeMap<(&str, &str), Vec<(&str, &RouteSpec)>> = BTreeMap::new();
    let mut policies: BTreeMap<(&str, &str), Vec<proto::ResiliencePolicy>> = BTreeMap::new();
    for (key, entry) in index.entries() {
        match &entry.resource {
            Resource::Route(spec) => routes
                .entry((key.namespace.as_str(), spec.service.as_str()))
                .or_default()
                .push((key.name.as_str(), spec)),
            Resource::ResiliencePolicy(spec) => policies
                .entry((key.namespace.as_str(), spec.target_ref.service.as_str()))
                .or_default()
                .push(policy(&key.namespace, &key.name, spec)),
            Resource::Service(_) | Resource::MeshAuthorization(_) | Resource::Canary(_) => {}
        }
    }
    let mut out = Vec::new();
    for (key, entry) in index.entries() {
        let Resource::Service(spec) = &entry.resource else {
            continue;
        };
        debug_assert_eq!(key.kind, Kind::Service);
        let mut svc = proto::Service {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            ports: spec.ports.iter().map(|p| u32::from(p.port)).collect(),
            opaque_ports: spec.ports.iter().filter(|p| p.is_opaque()).map(|p| u32::from(p.port)).collect(),
            endpoints: spec
                .endpoints
                .iter()
                .map(|e| proto::Endpoint {
                    address: e.address.clone(),
                    service_port: e.port.map(u32::from).unwrap_or(0),
                    meshed: e.meshed,
                    identity: e.service_account.clone().unwrap_or_default(),
                    labels: e.labels.clone().into_iter().collect(),
                    weight: e.weight,
                    workload: e.workload.clone().unwrap_or_default(),
                })
                .collect(),
            rules: Vec::new(),
            policies: policies.remove(&(key.namespace.as_str(), key.name.as_str())).unwrap_or_default(),
            cluster_ips: spec.cluster_ips.clone(),
        };
        for c in canaries.iter().filter(|c| c.namespace == key.namespace && c.service == key.name) {
            svc.rules.extend(canary_rules(c));
        }
        if let Some(list) = routes.get(&(key.namespace.as_str(), key.name.as_str())) {
            for (route_name, spec) in list {
                svc.rules.extend(rules(&key.namespace, route_name, spec));
            }
        }
        out.push(svc);
    }
    out
}

/// A canary's rules: the A/B stage's matches and the force header send to the canary; then the
/// weighted split between stable and canary.
fn canary_rules(c: &CanaryRouting) -> Vec<proto::RouteRule> {
    let backend = |name: &str, weight: u32| proto::BackendRef {
        namespace: c.namespace.clone(),
        name: name.to_string(),
        port: 0,
        weight,
    };
    let rule = |name: &str, matches: Vec<proto::RouteMatch>, backends: Vec<proto::BackendRef>| proto::RouteRule {
        route: format!("canary/{}/{}", c.namespace, c.name),
        name: name.to_string(),
        matches,
        backends,
        timeout_ms: 0,
    };
    let header = |name: &str, kind: proto::MatchKind, value: &str| proto::RouteMatch {
        headers: vec![proto::NamedMatch {
            name: name.to_string(),
            value: Some(proto::StringMatch { kind: kind as i32, value: value.to_string() }),
        }],
        ..Default::default()
    };
    let mut out = Vec::new();
    if let Some(f) = &c.force {
        out.push(rule("force", vec![header(&f.name, proto::MatchKind::Exact, &f.value)], vec![backend(&c.canary, 1)]));
    }
    if let Some(ab) = &c.ab {
        let mut matches: Vec<proto::RouteMatch> =
            ab.headers.iter().map(|h| proto::RouteMatch { headers: vec![named(h)], ..Default::default() }).collect();
        if let Some(cookie) = &ab.cookie {
            // A cookie header holding `name=value` among others (patterns match whole values;
            // HTTP/2 cookie fields joined by the proxy are separated by ',').
            let pattern = format!("(.*[;,]\\s*)?{}([;,].*)?", regex_escape(cookie));
            matches.push(header("cookie", proto::MatchKind::Regex, &pattern));
        }
        out.push(rule("ab", matches, vec![backend(&c.canary, 1)]));
    }
    out.push(rule(
        "split",
        Vec::new(),
        vec![backend(&c.stable, 100 - c.weight.min(100)), backend(&c.canary, c.weight.min(100))],
    ));
    out
}

fn regex_escape(s: &str) -> String {
    s.chars().fold(String::new(), |mut out, ch| {
        if "\\.+*?()|[]{}^$#&-~".contains(ch) {
            out.push('\\');
        }
        out.push(ch);
        out
    })
}

fn rules(ns: &str, route_name: &str, spec: &RouteSpec) -> Vec<proto::RouteRule> {
    spec.rules
        .iter()
        .enumerate()
        .map(|(i, r)| proto::RouteRule {
            route: format!("{ns}/{route_name}"),
            name: r.name.clone().unwrap_or_else(|| i.to_string()),
            matches: r
                .matches
                .iter()
                .map(|m| proto::RouteMatch {
                    path: m.path.as_ref().map(|p| proto::StringMatch {
                        kind: match p.kind {
                            PathMatchType::Exact => proto::MatchKind::Exact,
                            PathMatchType::PathPrefix => proto::MatchKind::Prefix,
                            PathMatchType::RegularExpression => proto::MatchKind::Regex,
                        } as i32,
                        value: p.value.clone(),
                    }),
                    headers: m.headers.iter().map(named).collect(),
                    query_params: m.query_params.iter().map(named).collect(),
                    method: m.method.clone().unwrap_or_default(),
                })
                .collect(),
            backends: r
                .backend_refs
                .iter()
                .map(|b| proto::BackendRef {
                    namespace: b.namespace.clone().unwrap_or_else(|| ns.to_string()),
                    name: b.name.clone(),
                    port: b.port.unwrap_or(0),
                    weight: b.weight,
                })
                .collect(),
            timeout_ms: r
                .timeouts
                .as_ref()
                .and_then(|t| t.request.as_deref())
                .and_then(|d| weir_api::duration::parse(d).ok())
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        })
        .collect()
}

fn ms(d: &str) -> u64 {
    weir_api::duration::parse(d).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn policy(ns: &str, name: &str, spec: &ResiliencePolicySpec) -> proto::ResiliencePolicy {
    let timeouts = spec.timeouts.clone().unwrap_or_default();
    proto::ResiliencePolicy {
        name: format!("{ns}/{name}"),
        rule: spec.target_ref.rule.clone().unwrap_or_default(),
        port: spec.target_ref.port.unwrap_or(0),
        request_timeout_ms: timeouts.request.as_deref().map(ms).unwrap_or(0),
        per_try_timeout_ms: timeouts.per_try.as_deref().map(ms).unwrap_or(0),
        connect_timeout_ms: timeouts.connect.as_deref().map(ms).unwrap_or(0),
        idle_timeout_ms: timeouts.idle.as_deref().map(ms).unwrap_or(0),
        stream_idle_timeout_ms: timeouts.stream_idle.as_deref().map(ms).unwrap_or(0),
        retry: spec.retries.as_ref().map(|r| proto::RetryPolicy {
            retries: r.attempts,
            retry_on: r.retry_on.clone(),
            retry_non_idempotent: r.retry_non_idempotent,
            backoff_base_ms: ms(&r.backoff.base),
            backoff_max_ms: ms(&r.backoff.max),
            budget_percent: r.budget.percent,
            budget_min_per_second: r.budget.min_retries_per_second,
            budget_window_ms: ms(&r.budget.window),
        }),
        circuit_breaker: spec.circuit_breaker.as_ref().map(|c| proto::CircuitBreaker {
            consecutive_failures: c.consecutive_failures,
            open_ms: ms(&c.open_duration),
            max_open_ms: ms(&c.max_open_duration),
            half_open_requests: c.half_open_requests,
            success_threshold: c.success_threshold,
        }),
        outlier_detection: spec.outlier_detection.as_ref().map(|o| proto::OutlierDetection {
            consecutive_failures: o.consecutive_failures,
            failure_rate_percent: o.failure_rate_percent.unwrap_or(0),
            min_requests: o.min_requests,
            window_ms: ms(&o.window),
            base_ejection_ms: ms(&o.base_ejection_time),
            max_ejection_ms: ms(&o.max_ejection_time),
            max_ejected_percent: o.max_ejected_percent,
        }),
        bulkhead: spec.bulkhead.as_ref().map(|b| proto::Bulkhead {
            max_in_flight: b.max_in_flight,
            max_pending: b.max_pending,
            pending_timeout_ms: ms(&b.pending_timeout),
            max_connections: b.max_connections.unwrap_or(0),
        }),
        rate_limit: spec.rate_limit.as_ref().map(|r| proto::RateLimit {
            requests_per_second: r.requests_per_second,
            burst: r.burst.unwrap_or(r.requests_per_second),
            header: r.key.as_ref().and_then(|k| k.header.clone()).unwrap_or_default(),
            source_ip: r.key.as_ref().and_then(|k| k.source_ip).unwrap_or(false),
            client_identity: r.key.as_ref().and_then(|k| k.client_identity).unwrap_or(false),
            max_keys: r.max_keys,
            inbound: r.direction == weir_api::resilience::Direction::Inbound,
            algorithm: match r.algorithm {
                RateLimitAlgorithm::TokenBucket => proto::RateLimitAlgorithm::TokenBucket,
                RateLimitAlgorithm::SlidingWindow => proto::RateLimitAlgorithm::SlidingWindow,
                RateLimitAlgorithm::LeakyBucket => proto::RateLimitAlgorithm::LeakyBucket,
            } as i32,
            window_ms: r.window.as_deref().map(ms).unwrap_or(0),
        }),
        faults: spec.faults.as_ref().map(|f| proto::Faults {
            delay_ms: f.delay.as_ref().map(|d| ms(&d.fixed)).unwrap_or(0),
            delay_percent: f.delay.as_ref().map(|d| d.percent).unwrap_or(0.0),
            abort_http_status: f.abort.as_ref().and_then(|a| a.http_status).unwrap_or(0),
            abort_grpc_status: f.abort.as_ref().and_then(|a| a.grpc_status.as_deref()).and_then(grpc_code),
            abort_percent: f.abort.as_ref().map(|a| a.percent).unwrap_or(0.0),
            headers: f.headers.iter().map(named).collect(),
        }),
        health_check: spec.health_check.as_ref().map(|h| proto::HealthCheck {
            path: h.path.clone(),
            interval_ms: ms(&h.interval),
            timeout_ms: ms(&h.timeout),
            healthy_threshold: h.healthy_threshold,
            unhealthy_threshold: h.unhealthy_threshold,
        }),
        load_balancer: spec.load_balancer.as_ref().map(|lb| {
            use proto::load_balancer::Algorithm;
            let key = lb.hash_key.clone().unwrap_or(weir_api::resilience::HashKey {
                header: None,
                cookie: None,
                source_ip: None,
            });
            proto::LoadBalancer {
                algorithm: match lb.algorithm {
                    LbAlgorithm::P2CPeakEWMA => Algorithm::P2cPeakEwma,
                    LbAlgorithm::RoundRobin => Algorithm::RoundRobin,
                    LbAlgorithm::LeastRequest => Algorithm::LeastRequest,
                    LbAlgorithm::Random => Algorithm::Random,
                    LbAlgorithm::RingHash => Algorithm::RingHash,
                    LbAlgorithm::Maglev => Algorithm::Maglev,
                } as i32,
                hash_header: key.header.unwrap_or_default(),
                hash_cookie: key.cookie.unwrap_or_default(),
                hash_source_ip: key.source_ip.unwrap_or(false),
            }
        }),
    }
}

fn named(m: &weir_api::route::NamedValueMatch) -> proto::NamedMatch {
    proto::NamedMatch {
        name: m.name.clone(),
        value: Some(proto::StringMatch {
            kind: match m.kind {
                ValueMatchType::Exact => proto::MatchKind::Exact,
                ValueMatchType::RegularExpression => proto::MatchKind::Regex,
            } as i32,
            value: m.value.clone(),
        }),
    }
}

/// A MeshAuthorization in protocol form, with what it selects.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectedAuthorization {
    pub namespace: String,
    pub target: Option<WorkloadTarget>,
    pub policy: proto::Authorization,
}

/// Every MeshAuthorization, translated; matched against each sidecar by [`inbound_for`].
pub fn authorizations(index: &Index) -> Vec<SelectedAuthorization> {
    index
        .entries()
        .iter()
        .filter_map(|(key, entry)| match &entry.resource {
            Resource::MeshAuthorization(spec) => Some(SelectedAuthorization {
                namespace: key.namespace.clone(),
                target: spec.target_ref.clone(),
                policy: authorization(&key.namespace, &key.name, spec),
            }),
            _ => None,
        })
        .collect()
}

fn authorization(ns: &str, name: &str, spec: &MeshAuthorizationSpec) -> proto::Authorization {
    let principal = |namespace: &str, sa: &str| proto::Principal {
        namespace: namespace.to_string(),
        service_account: sa.to_string(),
    };
    proto::Authorization {
        name: format!("{ns}/{name}"),
        port: spec.target_ref.as_ref().and_then(|t| t.port).unwrap_or(0),
        strict: spec.mode == AuthorizationMode::Strict,
        rules: spec
            .allow
            .iter()
            .enumerate()
            .map(|(i, rule)| {
                let mut out = proto::AuthorizationRule {
                    name: rule.name.clone().unwrap_or_else(|| i.to_string()),
                    any_client: rule.from.is_none(),
                    ..Default::default()
                };
                if let Some(from) = &rule.from {
                    out.unauthenticated = from.unauthenticated;
                    for sa in &from.service_accounts {
                        out.principals.push(match sa.split_once('/') {
                            Some((n, sa)) => principal(n, sa),
                            None => principal(ns, sa),
                        });
                    }
                    for n in &from.namespaces {
                        out.principals.push(principal(n, "*"));
                    }
                }
                if let Some(to) = &rule.to {
                    out.path_prefixes = to.paths.clone();
                    out.methods = to.methods.clone();
                }
                out
            })
            .collect(),
    }
}

/// Inbound rate limits by the workload that serves them, `(namespace, workload)` → the
/// limits of the Services whose endpoints it serves, in Service order. Made once per published
/// state rather than once per sidecar.
pub type InboundLimits = std::collections::HashMap<(String, String), Vec<proto::InboundRateLimit>>;

pub fn inbound_limits(services: &[proto::Service]) -> InboundLimits {
    let mut out = InboundLimits::new();
    for svc in services {
        let limits: Vec<_> = svc
            .policies
            .iter()
            .filter_map(|p| {
                p.rate_limit.as_ref().filter(|l| l.inbound).map(|limit| proto::InboundRateLimit {
                    policy: p.name.clone(),
                    service: format!("{}/{}", svc.namespace, svc.name),
                    limit: Some(limit.clone()),
                })
            })
            .collect();
        if limits.is_empty() {
            continue;
        }
        let mut workloads: Vec<&str> =
            svc.endpoints.iter().map(|e| e.workload.as_str()).filter(|w| !w.is_empty()).collect();
        workloads.sort_unstable();
        workloads.dedup();
        for w in workloads {
            out.entry((svc.namespace.clone(), w.to_string())).or_default().extend(limits.iter().cloned());
        }
    }
    out
}

/// The inbound policy of workload `namespace/name` with `labels`: inbound rate limits of the
/// Services whose endpoints it serves (from [`inbound_limits`]), and the MeshAuthorizations
/// that select it.
pub fn inbound_for(
    limits: &InboundLimits,
    authorizations: &[SelectedAuthorization],
    namespace: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
) -> proto::InboundPolicy {
    let mut out = proto::InboundPolicy {
        rate_limits: limits.get(&(namespace.to_string(), name.to_string())).cloned().unwrap_or_default(),
        ..Default::default()
    };
    for a in authorizations.iter().filter(|a| a.namespace == namespace) {
        if a.target.as_ref().is_none_or(|t| t.selects(name, labels)) {
            out.authorizations.push(a.policy.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::local::parse_file;

    #[test]
    fn routes_attach_to_their_service_in_name_order() {
        let yaml = r#"
kind: Service
metadata: { name: web, namespace: shop }
spec:
  ports: [{ port: 80 }]
  endpoints: [{ address: "127.0.0.1:9000", meshed: true, serviceAccount: web }]
---
kind: Service
metadata: { name: web-v2, namespace: shop }
---
apiVersion: weir.io/v1alpha1
kind: Route
metadata: { name: b-split, namespace: shop }
spec:
  service: web
  rules:
  - backendRefs: [{ name: web, weight: 90 }, { name: web-v2, weight: 10 }]
    timeouts: { request: 1s500ms }
---
apiVersion: weir.io/v1alpha1
kind: Route
metadata: { name: a-testers, namespace: shop }
spec:
  service: web
  rules:
  - name: testers
    matches: [{ headers: [{ name: x-tester, value: "1" }], path: { type: Exact, value: /x } }]
    backendRefs: [{ name: web-v2 }]
"#;
        let mut index = Index::default();
        index.replace_all(parse_file("f.yaml", yaml).unwrap(), vec![]);
        assert!(index.rejections().is_empty(), "{:?}", index.rejections());
        let svcs = services(&index, &[]);
        assert_eq!(svcs.len(), 2);
        let web = &svcs[0];
        assert_eq!(web.ports, vec![80]);
        assert!(web.endpoints[0].meshed);
        assert_eq!(web.rules.len(), 2);
        assert_eq!(web.rules[0].route, "shop/a-testers");
        assert_eq!(web.rules[0].name, "testers");
        assert_eq!(web.rules[0].matches[0].path.as_ref().unwrap().kind, proto::MatchKind::Exact as i32);
        assert_eq!(web.rules[1].backends[1].weight, 10);
        assert_eq!(web.rules[1].backends[1].namespace, "shop");
        assert_eq!(web.rules[1].timeout_ms, 1500);
    }
}
