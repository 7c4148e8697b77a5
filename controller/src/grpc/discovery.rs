//! `weir.v1.Discovery/Stream`: one session per sidecar. The session watches the published
//! [`MeshState`], computes the sidecar's view, and pushes it when it differs from what the
//! sidecar last received; a slow sidecar only ever gets the newest view (the outgoing channel
//! holds one message). A sidecar that says `Hello.incremental` gets the first snapshot whole
//! and then only the Services that changed since the previous one it was sent
//! (`Snapshot.base_version`); after a Nack the next one goes whole.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use weir_api::proto::{self, proxy_message};
use weir_api::rt::{Drain, unix_ms};

use crate::index::ResourceKey;
use crate::metrics::Metrics;
use crate::proxies::{NackInfo, Proxies, ProxyInfo};
use crate::reports::Reports;
use crate::state::MeshState;
use crate::wire::{ControllerWire, Entry};

/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Snapshots sent and not yet answered, across all sidecars. Each holds its encoded bytes
/// until the sidecar has read them, so this bounds the controller's memory when every sidecar
/// needs a full snapshot at once (a connection storm, a change with a thousand sidecars).
pub const MAX_IN_FLIGHT: usize = 64;
/// How long an unanswered snapshot counts against [`MAX_IN_FLIGHT`] (a sidecar that never
/// answers must not hold the others back).
const IN_FLIGHT_HOLD: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct DiscoveryService {
    pub state: watch::Receiver<Arc<MeshState>>,
    pub proxies: Proxies,
    pub metrics: Metrics,
    pub reports: Arc<Mutex<Reports>>,
    pub drain: Drain,
    /// Permits for snapshots in flight ([`MAX_IN_FLIGHT`]).
    pub in_flight: Arc<tokio::sync::Semaphore>,
    /// With identities (the control plane over TLS): the trust domain, and every stream must
    /// come with a workload certificate whose SPIFFE ID is the Hello's namespace and service
    /// account. `None`: a plaintext mesh without identities.
    pub authenticate: Option<Arc<str>>,
}

pub type Outbound = ReceiverStream<Result<ControllerWire, Status>>;

impl DiscoveryService {
    /// `weir.v1.Discovery/Stream` (served by [`super::stream::DiscoveryServer`]).
    pub async fn stream(&self, request: Request<Streaming<proto::ProxyMessage>>) -> Result<Response<Outbound>, Status> {
        let info = request.extensions().get::<super::tls::PeerInfo>().cloned().unwrap_or_default();
        // Every connection comes through `tls::incoming`, which records its address.
        let peer = info.addr;
        if let Some(trust_domain) = &self.authenticate
            && info.identity.is_none()
        {
            self.metrics.control_refused.with_label_values(&["no_certificate"]).inc();
            tracing::warn!(?peer, %trust_domain, "Discovery stream refused: no workload certificate");
            return Err(Status::unauthenticated(
                "Discovery needs mutual TLS with a workload certificate (get one from Identity/Certify first)",
            ));
        }
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10s"))??;
        let hello = match first.and_then(|m| m.msg) {
            Some(proxy_message::Msg::Hello(h)) => h,
            _ => {
                return Err(Status::invalid_argument("the first message on a Discovery stream must be Hello"));
            }
        };
        if hello.namespace.is_empty() || hello.name.is_empty() {
            return Err(Status::invalid_argument("Hello.namespace and Hello.name are required"));
        }
        if let (Some(trust_domain), Some(id)) = (&self.authenticate, &info.identity) {
            let proven = weir_api::spiffe::parse(id, trust_domain);
            if proven != Some((hello.namespace.as_str(), hello.service_account.as_str())) {
                self.metrics.control_refused.with_label_values(&["identity_mismatch"]).inc();
                let claimed = weir_api::spiffe::id(trust_domain, &hello.namespace, &hello.service_account);
                tracing::warn!(?peer, certificate = %id, %claimed, workload = %hello.name, "Discovery stream refused: Hello does not match the certificate");
                return Err(Status::permission_denied(format!(
                    "Hello claims {claimed} (workload {}/{}) but the client certificate is {id}",
                    hello.namespace, hello.name
                )));
            }
        }
        let (tx, rx) = mpsc::channel(1);
        let admin = match (peer, u16::try_from(hello.admin_port)) {
            (Some(peer), Ok(port)) if port != 0 => Some(std::net::SocketAddr::new(peer.ip(), port).to_string()),
            _ => None,
        };
        let identity = info.identity.clone().unwrap_or_else(|| Arc::from(""));
        let session = Session { svc: self.clone(), hello, identity, admin, tx };
        tokio::spawn(session.run(inbound));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct Session {
    svc: DiscoveryService,
    hello: proto::Hello,
    /// The SPIFFE ID the sidecar's certificate proved (empty on a plaintext control plane).
    identity: Arc<str>,
    admin: Option<String>,
    tx: mpsc::Sender<Result<ControllerWire, Status>>,
}

/// A snapshot sent and not yet answered.
struct Pending {
    version: String,
    /// Sent as changes against the previous one.
    incremental: bool,
    changed_at: Instant,
    resources: Arc<BTreeMap<ResourceKey, u64>>,
    /// Its place among the snapshots in flight, given back on the answer or after
    /// [`IN_FLIGHT_HOLD`].
    permit: Option<(tokio::sync::OwnedSemaphorePermit, tokio::time::Instant)>,
}

impl Session {
    async fn run(self, mut inbound: Streaming<proto::ProxyMessage>) {
        let Session { svc, hello, identity, admin, tx } = self;
        let workload = format!("{}/{}", hello.namespace, hello.name);
        let id = svc.proxies.register(ProxyInfo {
            workload: workload.clone(),
            service_account: hello.service_account.clone(),
            labels: hello.labels.clone().into_iter().collect(),
            proxy_version: hello.proxy_version.clone(),
            admin,
            connected_at_unix_ms: unix_ms(),
            sent_version: None,
            acked_version: None,
            nack: None,
            acked_resources: Arc::default(),
        });
        // The label comes from the sidecar: bounded in length.
        let proxy_version: String = hello.proxy_version.chars().take(32).collect();
        svc.metrics.connected_proxies.with_label_values(&[&proxy_version]).inc();
        tracing::info!(%workload, "sidecar connected");

        let mut state_rx = svc.state.clone();
        let drain = svc.drain.clone().signaled();
        tokio::pin!(drain);
        let labels: BTreeMap<String, String> = hello.labels.clone().into_iter().collect();
        let mut last_sent: Option<View> = None;
        // The version and Services of the last snapshot sent: what the sidecar runs once it
        // has applied everything sent (the base of the next incremental snapshot). Ordered
        // stream, so it applies them in turn; after any Nack the next snapshot goes whole.
        let mut sent: Option<(String, Arc<Vec<Entry>>)> = None;
        let mut pending: Option<Pending> = None;
        loop {
            let state = state_rx.borrow_and_update().clone();
            let view = view_for(&hello, &labels, &state);
            // A state keeps the previous one's Services Arc when they are equal, so another
            // Arc means a change (at worst an equal one, sent as an empty increment): no deep
            // comparison of a thousand Services per sidecar.
            let unchanged = last_sent
                .as_ref()
                .is_some_and(|l| Arc::ptr_eq(&l.services, &view.services) && l.inbound == view.inbound);
            if !unchanged {
                // A newer snapshot supersedes the unanswered one: its place goes back first.
                if let Some(p) = pending.as_mut() {
                    p.permit = None;
                }
                let permit = tokio::select! {
                    p = svc.in_flight.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    _ = &mut drain => break,
                };
                // The state may have moved on while waiting: send the newest.
                let state = state_rx.borrow_and_update().clone();
                let view = view_for(&hello, &labels, &state);
                let version = state.generation.to_string();
                // The Services part is encoded once per state and shared by every session;
                // to a sidecar that applies them, only the changes since the last snapshot
                // sent (computed once per base and shared too).
                let encoded = state.services_wire();
                let mut msg = ControllerWire {
                    version: version.clone(),
                    services: encoded.whole.clone(),
                    inbound: view.inbound.clone(),
                    ..Default::default()
                };
                if let Some((base_version, base)) = sent.as_ref().filter(|_| hello.incremental) {
                    let delta = state.delta_from(base);
                    if delta.len() < encoded.whole.len() {
                        msg.services = delta.services.clone();
                        msg.removed = delta.removed.clone();
                        msg.base_version = base_version.clone();
                    }
                }
                let incremental = !msg.base_version.is_empty();
                tokio::select! {
                    sent = tx.send(Ok(msg)) => if sent.is_err() { break },
                    _ = &mut drain => break,
                }
                svc.metrics.snapshots_pushed.inc();
                if incremental {
                    svc.metrics.snapshots_incremental.inc();
                }
                sent = Some((version.clone(), encoded.entries));
                svc.proxies.update(id, |p| p.sent_version = Some(version.clone()));
                let hold_until = tokio::time::Instant::now() + IN_FLIGHT_HOLD;
                pending = Some(Pending {
                    version,
                    incremental,
                    changed_at: state.changed_at,
                    resources: state.resource_versions(),
                    permit: Some((permit, hold_until)),
                });
                last_sent = Some(view);
            } else if pending.is_none() {
                // The view did not change, so the sidecar already runs what this state says.
                let resources = state.resource_versions();
                svc.proxies.update(id, |p| {
                    if p.nack.is_none() {
                        p.acked_resources = resources
                    }
                });
            }

            let held = pending.as_ref().and_then(|p| p.permit.as_ref()).map(|(_, until)| *until);
            tokio::select! {
                changed = state_rx.changed() => if changed.is_err() { break },
                _ = tokio::time::sleep_until(held.unwrap_or_else(tokio::time::Instant::now)), if held.is_some() => {
                    // No answer in time: the place goes back; the snapshot stays pending.
                    if let Some(p) = pending.as_mut() {
                        p.permit = None;
                    }
                    continue;
                }
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => match handle(&svc, id, (&workload, &identity), m, &mut pending) {
                        Answer::Nack { base } => {
                            sent = None;
                            if base {
                                // It runs another version than the base: send it all now.
                                last_sent = None;
                            }
                        }
                        Answer::Other => {}
                    },
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(%workload, %status, "stream ended");
                        break;
                    }
                },
                _ = &mut drain => break,
            }
        }
        svc.proxies.unregister(id);
        svc.metrics.connected_proxies.with_label_values(&[&proxy_version]).dec();
        tracing::info!(%workload, "sidecar disconnected");
    }
}

/// What a sidecar's message means for the next snapshot.
enum Answer {
    /// It refused a snapshot (`base`: an incremental one, for running another version).
    Nack {
        base: bool,
    },
    Other,
}

fn handle(
    svc: &DiscoveryService,
    id: u64,
    (workload, identity): (&str, &str),
    m: proto::ProxyMessage,
    pending: &mut Option<Pending>,
) -> Answer {
    match m.msg {
        Some(proxy_message::Msg::Ack(ack)) => {
            if let Some(p) = pending.take_if(|p| p.version == ack.version) {
                svc.metrics.push_latency.observe(p.changed_at.elapsed().as_secs_f64());
                svc.proxies.update(id, |info| {
                    info.acked_version = Some(ack.version.clone());
                    info.acked_resources = p.resources;
                    info.nack = None;
                });
            }
        }
        Some(proxy_message::Msg::Nack(nack)) => {
            // Only known classes become label values; anything else a sidecar sends is "other".
            let class = match nack.reason_class.as_str() {
                c @ ("service" | "duplicate" | "authorization" | "base") => c,
                _ => "other",
            };
            svc.metrics.nacks.with_label_values(&[class]).inc();
            if class == "base" {
                // Not a problem with the configuration. Only the answer to the newest
                // snapshot, if incremental, calls for a whole one: an older increment's Nack
                // is followed by the newest one's anyway, and acting on it too would send
                // everything twice.
                if pending.take_if(|p| p.version == nack.version && p.incremental).is_none() {
                    return Answer::Other;
                }
                tracing::info!(%workload, version = %nack.version, reason = %nack.reason, "sidecar asked for a whole snapshot");
                return Answer::Nack { base: true };
            }
            pending.take_if(|p| p.version == nack.version);
            tracing::warn!(%workload, version = %nack.version, reason = %nack.reason, "sidecar rejected snapshot");
            svc.proxies.update(id, |info| info.nack = Some(NackInfo { version: nack.version, reason: nack.reason }));
            return Answer::Nack { base: false };
        }
        Some(proxy_message::Msg::Report(report)) => {
            svc.metrics.reports_received.inc();
            // Only the reporter's own traffic: outbound calls to Services that exist, or its
            // own inbound requests. (The stream is authenticated when the mesh has identities.)
            let state = svc.state.borrow().clone();
            // `services` is sorted by namespace/name (the translator's order).
            let known = |name: &str| {
                name.split_once('/').is_some_and(|(ns, n)| {
                    state.services.binary_search_by(|s| (s.namespace.as_str(), s.name.as_str()).cmp(&(ns, n))).is_ok()
                })
            };
            let own = |s: &proto::TrafficStats| match s.direction.as_str() {
                "outbound" => known(&s.service) && known(&s.backend),
                "inbound" => s.service == workload,
                _ => false,
            };
            let mut reports = svc.reports.lock().unwrap();
            let dropped = reports.record(&report, own);
            let evicted = reports.record_edges(workload, identity, &report, own);
            drop(reports);
            svc.metrics.reports_dropped_series.inc_by(dropped + evicted);
        }
        Some(proxy_message::Msg::Hello(_)) | None => {
            tracing::debug!(%workload, "ignoring unexpected message");
        }
    }
    Answer::Other
}

/// What one sidecar receives: every Service it may call (all of them today; per-namespace
/// scoping plugs in here) and only its own workload's inbound policy (rate limits and the
/// MeshAuthorizations that select it).
struct View {
    services: Arc<Vec<proto::Service>>,
    inbound: proto::InboundPolicy,
}

fn view_for(hello: &proto::Hello, labels: &BTreeMap<String, String>, state: &MeshState) -> View {
    View {
        services: state.services.clone(),
        inbound: crate::translator::inbound_for(
            state.inbound_limits(),
            &state.authorizations,
            &hello.namespace,
            &hello.name,
            labels,
        ),
    }
}
