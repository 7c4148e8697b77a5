//! Active health checks. For every policy with a `healthCheck`, one task per endpoint of the
//! target Service (and of the backends its rules name) probes `GET path` every interval; an
//! endpoint that fails `unhealthy_threshold` probes in a row takes no traffic until it passes
//! `healthy_threshold` in a row. Tasks follow the configuration: they start, stop and change
//! with it. A meshed endpoint is probed through its sidecar over mesh mTLS with this sidecar's
//! identity, as requests are, so authorization judges probes as it judges the caller.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::{HeaderValue, Request, Version};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use weir_api::rt::Drain;

use crate::body::{ORIG_PROTO, empty};
use crate::client::{Clients, TlsTarget};
use crate::config::ConnectOpts;
use crate::config::{Config, Endpoint, HealthPolicy};
use crate::metrics::ResilienceMetrics;
use crate::tls::CredsRx;

/// An endpoint under one policy.
type PolicyEndpoint = (Arc<str>, SocketAddr);

/// Endpoints marked unhealthy, by (policy, address).
#[derive(Clone, Default)]
pub struct Health {
    unhealthy: Arc<Mutex<HashSet<PolicyEndpoint>>>,
    /// When each policy last logged that all its endpoints were unhealthy.
    panic_logged: Arc<Mutex<HashMap<Arc<str>, std::time::Instant>>>,
}

/// At most one log line per policy this often while every endpoint is unhealthy.
const PANIC_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

impl Health {
    /// The endpoints healthy under `policy`, and whether none was: then all of them (better to
    /// try than to fail every request; Envoy's "healthy panic"), which the caller counts; it
    /// is logged here, at most every 30 s per policy.
    pub fn filter<'a>(&self, policy: &Arc<str>, endpoints: &[&'a Endpoint]) -> (Vec<&'a Endpoint>, bool) {
        let g = self.unhealthy.lock().unwrap();
        if g.is_empty() {
            return (endpoints.to_vec(), false);
        }
        let ok: Vec<_> = endpoints.iter().copied().filter(|e| !g.contains(&(policy.clone(), e.addr))).collect();
        drop(g);
        if !ok.is_empty() || endpoints.is_empty() {
            return (ok, false);
        }
        let now = std::time::Instant::now();
        let mut logged = self.panic_logged.lock().unwrap();
        if logged.get(policy).is_none_or(|at| now.duration_since(*at) >= PANIC_LOG_EVERY) {
            logged.insert(policy.clone(), now);
            tracing::warn!(
                policy = %policy,
                endpoints = endpoints.len(),
                "every endpoint fails its health check: sending to all of them (weir_lb_healthy_panic_total)"
            );
        }
        (endpoints.to_vec(), true)
    }

    fn set(&self, policy: &Arc<str>, addr: SocketAddr, healthy: bool) {
        let mut g = self.unhealthy.lock().unwrap();
        if healthy {
            g.remove(&(policy.clone(), addr));
        } else {
            g.insert((policy.clone(), addr));
        }
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Probe {
    policy: Arc<str>,
    service: Arc<str>,
    authority: String,
    /// The endpoint's namespace and the endpoint (its address, and identity when meshed).
    namespace: Arc<str>,
    endpoint: Endpoint,
    check: HealthPolicy,
}

/// This sidecar's identity, for mTLS to meshed endpoints (`None`: it has none).
#[derive(Clone)]
pub struct Mesh {
    pub credentials: Option<CredsRx>,
    pub trust_domain: Arc<str>,
}

/// Keeps one probe task per (policy, endpoint) running until `drain` fires.
pub async fn run(
    mut config: watch::Receiver<Option<Arc<Config>>>,
    clients: Clients,
    mesh: Mesh,
    health: Health,
    metrics: ResilienceMetrics,
    drain: Drain,
) {
    let mut running: HashMap<Probe, JoinHandle<()>> = HashMap::new();
    let stop = drain.signaled();
    tokio::pin!(stop);
    loop {
        let wanted = config.borrow_and_update().as_deref().map(probes).unwrap_or_default();
        running.retain(|p, task| {
            let keep = wanted.contains(p);
            if !keep {
                task.abort();
                health.set(&p.policy, p.endpoint.addr, true);
            }
            keep
        });
        for p in wanted {
            if let std::collections::hash_map::Entry::Vacant(slot) = running.entry(p) {
                let p = slot.key().clone();
                let task = probe_loop(p, clients.clone(), mesh.clone(), health.clone(), metrics.clone());
                slot.insert(tokio::spawn(task));
            }
        }
        tokio::select! {
            changed = config.changed() => if changed.is_err() { break },
            _ = &mut stop => break,
        }
    }
    for (_, task) in running {
        task.abort();
    }
}

fn probes(config: &Config) -> HashSet<Probe> {
    let mut out = HashSet::new();
    for svc in config.services.values() {
        for policy in &svc.policies {
            let Some(check) = &policy.health else { continue };
            let mut backends: Vec<&str> = vec![&svc.key];
            backends.extend(svc.rules.iter().flat_map(|r| r.backends.iter().map(|b| &*b.service)));
            for key in backends {
                let Some(backend) = config.service(key) else { continue };
                let (ns, name) = key.split_once('/').unwrap_or(("", key));
                for e in &backend.endpoints {
                    out.insert(Probe {
                        policy: policy.name.clone(),
                        service: svc.key.clone(),
                        authority: format!("{name}.{ns}"),
                        namespace: ns.into(),
                        endpoint: e.clone(),
                        check: check.clone(),
                    });
                }
            }
        }
    }
    out
}

async fn probe_loop(p: Probe, clients: Clients, mesh: Mesh, health: Health, metrics: ResilienceMetrics) {
    let mut ticks = tokio::time::interval(p.check.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut passes, mut failures, mut healthy) = (0u32, 0u32, true);
    loop {
        ticks.tick().await;
        let ok = matches!(tokio::time::timeout(p.check.timeout, probe_once(&p, &clients, &mesh)).await, Ok(true));
        metrics.health_checks.with_label_values(&[&*p.service, if ok { "pass" } else { "fail" }]).inc();
        if ok {
            passes += 1;
            failures = 0;
        } else {
            failures += 1;
            passes = 0;
        }
        let flip = if healthy { failures >= p.check.unhealthy_threshold } else { passes >= p.check.healthy_threshold };
        if flip {
            healthy = !healthy;
            health.set(&p.policy, p.endpoint.addr, healthy);
            let state = if healthy { "healthy" } else { "unhealthy" };
            metrics.health_transitions.with_label_values(&[&*p.service, state]).inc();
            tracing::info!(endpoint = %p.endpoint.addr, service = %p.service, state, "active health check");
        }
    }
}

async fn probe_once(p: &Probe, clients: &Clients, mesh: &Mesh) -> bool {
    let uri = format!("http://{}{}", p.authority, p.check.path);
    let Ok(mut req) = Request::get(uri).body(empty()) else { return false };
    let addr = p.endpoint.addr;
    let rsp = if p.endpoint.meshed {
        *req.version_mut() = Version::HTTP_2;
        req.headers_mut().insert(ORIG_PROTO.clone(), HeaderValue::from_static("HTTP/1.1"));
        let tls = TlsTarget::for_endpoint(mesh.credentials.as_ref(), &mesh.trust_domain, &p.namespace, &p.endpoint);
        clients.h2.send_tls(addr, req, ConnectOpts::default(), tls.as_ref()).await
    } else {
        if let Ok(host) = HeaderValue::from_str(&p.authority) {
            req.headers_mut().insert(http::header::HOST, host);
        }
        clients.send_h1(addr, req, ConnectOpts::default()).await
    };
    rsp.is_ok_and(|r| r.status().is_success())
}
