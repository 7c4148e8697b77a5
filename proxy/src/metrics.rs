//! The sidecar's metrics: Prometheus series on the admin port and the compact traffic
//! [`Report`](weir_api::proto::Report)s sent to the controller (deltas since the last one).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use weir_api::rt::unix_ms;

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use weir_api::proto;

use http::Response;

use crate::body::Body;

use crate::grpc::Outcome;

/// Latency bucket upper bounds (seconds): sub-millisecond to tens of seconds.
pub const LATENCY_BOUNDS: [f64; 18] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0];

/// Most series a report holds; keys come from configuration, this is a backstop.
const MAX_REPORT_SERIES: usize = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Label values of one request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Labels {
    pub direction: Direction,
    pub service: Arc<str>,
    pub route: Arc<str>,
    pub backend: Arc<str>,
    /// Whether the hop this sidecar judges is mesh mTLS: inbound, the client's connection;
    /// outbound, the connection to the backend's endpoints.
    pub tls: bool,
}

impl Labels {
    fn tls_str(&self) -> &'static str {
        if self.tls { "true" } else { "false" }
    }
}

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    /// What a finished request updates; shared with responses whose outcome comes later.
    finished: Arc<Finished>,
    pub active_connections: IntGaugeVec,
    pub connections: IntCounterVec,
    pub snapshots_applied: IntCounter,
    pub snapshots_rejected: IntCounter,
    pub control_connected: IntGauge,
    /// Inbound connections refused before HTTP, by reason (see `server::failure_reason`).
    pub tls_handshake_failures: IntCounterVec,
    /// Connections refused before reaching an application, by direction and reason.
    pub refused: IntCounterVec,
    /// Opaque TCP connections carried, by direction, mesh mTLS and client identity.
    pub tcp_connections: IntCounterVec,
    /// Bytes opaque TCP connections carried, by direction, Service, mTLS, peer identity and flow.
    pub tcp_bytes: IntCounterVec,
    /// How long opaque TCP connections stayed open, by direction, Service and mTLS.
    pub tcp_duration: HistogramVec,
    pub inbound_by_identity: IntCounterVec,
    /// Inbound authorization decisions by server port, policy, rule and client identity.
    pub authorization: IntCounterVec,
    /// CONNECT tunnels by result, and the bytes they carried each way.
    pub tunnels: IntCounterVec,
    pub tunnels_active: IntGauge,
    pub tunnel_bytes: IntCounterVec,
    /// Requests sent again because the upstream never processed them, by direction.
    pub replays: IntCounterVec,
    /// Inbound TLS connections that were not mesh mTLS, carried untouched to the application.
    pub tls_passthrough: IntCounter,
    /// `weir tap`s open on this sidecar, and what became of the events they matched.
    pub taps_open: IntGauge,
    pub tap_events: IntCounterVec,
    pub trace: crate::trace::TraceMetrics,
    pub resilience: ResilienceMetrics,
    pub identity: crate::identity::IdentityMetrics,
}

struct Finished {
    responses: IntCounterVec,
    duration: HistogramVec,
    report: Mutex<ReportAcc>,
}

#[derive(Default)]
struct ReportAcc {
    since_ms: u64,
    series: HashMap<Labels, Stats>,
}

#[derive(Default, Clone)]
struct Stats {
    requests: u64,
    failures: u64,
    /// Of `requests`, those over mesh mTLS.
    mtls: u64,
    counts: Vec<u64>,
    sum: f64,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let req_labels = ["direction", "service", "route", "backend", "tls"];
        let requests =
            IntCounterVec::new(Opts::new("weir_requests_total", "HTTP requests the proxy handled"), &req_labels)
                .unwrap();
        let responses = IntCounterVec::new(
            Opts::new(
                "weir_responses_total",
                "Responses by HTTP status code and class, gRPC status (empty when not gRPC) and classification (success, failure, cancelled: the verdict reports and canary analysis use)",
            ),
            &["direction", "service", "route", "backend", "tls", "status_code", "status_class", "grpc_status", "classification"],
        )
        .unwrap();
        let duration = HistogramVec::new(
            HistogramOpts::new("weir_request_duration_seconds", "Time from request to response headers")
                .buckets(LATENCY_BOUNDS.to_vec()),
            &["direction", "service", "route", "backend", "tls", "status_class"],
        )
        .unwrap();
        let active_connections =
            IntGaugeVec::new(Opts::new("weir_active_connections", "Open client connections"), &["direction"]).unwrap();
        let connections =
            IntCounterVec::new(Opts::new("weir_connections_total", "Accepted client connections"), &["direction"])
                .unwrap();
        let snapshots_applied = IntCounter::new("weir_snapshots_applied_total", "Snapshots applied").unwrap();
        let snapshots_rejected =
            IntCounter::new("weir_snapshots_rejected_total", "Snapshots rejected (Nacked)").unwrap();
        let control_connected =
            IntGauge::new("weir_control_plane_connected", "1 while the Discovery stream is up").unwrap();
        registry.register(Box::new(requests.clone())).unwrap();
        registry.register(Box::new(responses.clone())).unwrap();
        registry.register(Box::new(duration.clone())).unwrap();
        registry.register(Box::new(active_connections.clone())).unwrap();
        registry.register(Box::new(connections.clone())).unwrap();
        registry.register(Box::new(snapshots_applied.clone())).unwrap();
        registry.register(Box::new(snapshots_rejected.clone())).unwrap();
        registry.register(Box::new(control_connected.clone())).unwrap();
        let resilience = ResilienceMetrics::register(&registry);
        let tls_handshake_failures = IntCounterVec::new(
            Opts::new(
                "weir_tls_handshake_failures_total",
                "Inbound connections that failed before HTTP (TLS handshake refused or timed out), by reason",
            ),
            &["reason"],
        )
        .unwrap();
        registry.register(Box::new(tls_handshake_failures.clone())).unwrap();
        let inbound_by_identity = IntCounterVec::new(
            Opts::new("weir_inbound_requests_by_client_total", "Inbound requests by client identity and transport"),
            &["client_identity", "tls"],
        )
        .unwrap();
        registry.register(Box::new(inbound_by_identity.clone())).unwrap();
        let authorization = IntCounterVec::new(
            Opts::new(
                "weir_inbound_authorization_total",
                "Inbound authorization decisions (allow/deny) by server port, MeshAuthorization, rule and client identity",
            ),
            &["server", "policy", "rule", "client_identity", "decision"],
        )
        .unwrap();
        registry.register(Box::new(authorization.clone())).unwrap();
        let refused = IntCounterVec::new(
            Opts::new(
                "weir_refused_connections_total",
                "Connections closed before any byte reached an application, by listener and reason (sidecar_port: bound for the sidecar's own port; unauthorized: TCP that authorization refused)",
            ),
            &["direction", "reason"],
        )
        .unwrap();
        registry.register(Box::new(refused.clone())).unwrap();
        let tcp_connections = IntCounterVec::new(
            Opts::new(
                "weir_tcp_connections_total",
                "Opaque TCP connections carried, by direction, whether the mesh hop was mTLS, and (inbound) the client identity",
            ),
            &["direction", "tls", "client_identity"],
        )
        .unwrap();
        registry.register(Box::new(tcp_connections.clone())).unwrap();
        let tcp_bytes = IntCounterVec::new(
            Opts::new(
                "weir_tcp_bytes_total",
                "Bytes carried by opaque TCP connections, by direction, Service called (outbound), whether the mesh hop was mTLS, the peer's identity (inbound: the client; outbound: the server) and flow (sent: from the connection's client)",
            ),
            &["direction", "service", "tls", "peer_identity", "flow"],
        )
        .unwrap();
        registry.register(Box::new(tcp_bytes.clone())).unwrap();
        let tcp_duration = HistogramVec::new(
            HistogramOpts::new(
                "weir_tcp_connection_duration_seconds",
                "How long opaque TCP connections stayed open, by direction, Service called (outbound) and mTLS",
            )
            .buckets(vec![0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0]),
            &["direction", "service", "tls"],
        )
        .unwrap();
        registry.register(Box::new(tcp_duration.clone())).unwrap();
        let tunnels = IntCounterVec::new(
            Opts::new(
                "weir_tunnels_total",
                "Opaque tunnels (CONNECT, and redirected connections that are not HTTP), by result",
            ),
            &["result"],
        )
        .unwrap();
        registry.register(Box::new(tunnels.clone())).unwrap();
        let tunnels_active = IntGauge::new("weir_tunnels_active", "Open CONNECT tunnels").unwrap();
        registry.register(Box::new(tunnels_active.clone())).unwrap();
        let tunnel_bytes = IntCounterVec::new(
            Opts::new(
                "weir_tunnel_bytes_total",
                "Bytes carried by CONNECT tunnels and protocol switches such as WebSocket (sent: from the client); opaque TCP is weir_tcp_bytes_total",
            ),
            &["direction"],
        )
        .unwrap();
        registry.register(Box::new(tunnel_bytes.clone())).unwrap();
        let replays = IntCounterVec::new(
            Opts::new(
                "weir_upstream_replays_total",
                "Requests sent again on a new connection because the upstream never processed them (REFUSED_STREAM, above a GOAWAY's last stream, connection closed first)",
            ),
            &["direction"],
        )
        .unwrap();
        registry.register(Box::new(replays.clone())).unwrap();
        let tls_passthrough = IntCounter::new(
            "weir_inbound_tls_passthrough_total",
            "Inbound TLS connections that were not mesh mTLS (no weir ALPN): the application's own TLS, carried to it untouched",
        )
        .unwrap();
        registry.register(Box::new(tls_passthrough.clone())).unwrap();
        let taps_open = IntGauge::new("weir_taps_open", "weir tap streams open on this sidecar").unwrap();
        registry.register(Box::new(taps_open.clone())).unwrap();
        let tap_events = IntCounterVec::new(
            Opts::new(
                "weir_tap_events_total",
                "Requests a weir tap's filter matched, by what became of them: shown, rate_limited (past the tap's rate), queue_full (its client read too slowly)",
            ),
            &["result"],
        )
        .unwrap();
        registry.register(Box::new(tap_events.clone())).unwrap();
        let identity = crate::identity::IdentityMetrics::register(&registry);
        let trace = crate::trace::TraceMetrics::register(&registry);
        Self {
            replays,
            tls_passthrough,
            taps_open,
            tap_events,
            trace,
            refused,
            tcp_connections,
            tcp_bytes,
            tcp_duration,
            tls_handshake_failures,
            inbound_by_identity,
            authorization,
            tunnels,
            tunnels_active,
            tunnel_bytes,
            identity,
            resilience,
            registry,
            requests,
            finished: Arc::new(Finished {
                responses,
                duration,
                report: Mutex::new(ReportAcc { since_ms: unix_ms(), series: HashMap::new() }),
            }),
            active_connections,
            connections,
            snapshots_applied,
            snapshots_rejected,
            control_connected,
        }
    }

    pub fn request_started(&self, l: &Labels) {
        self.requests.with_label_values(&[l.direction.as_str(), &l.service, &l.route, &l.backend, l.tls_str()]).inc();
    }

    /// Records a finished request: the HTTP `status` it answered with, its [`Outcome`] (for
    /// gRPC, known only once the trailers pass), and `elapsed` to the response headers.
    pub fn request_finished(&self, l: &Labels, status: u16, outcome: Outcome, elapsed: Duration) {
        self.finished.record(l, status, outcome, elapsed);
    }

    /// Records `rsp` as the answer to a request with `labels`, `elapsed` after it started: now,
    /// or for a gRPC response with a body, once its trailers say how the call ended.
    pub fn response(&self, labels: Labels, rsp: Response<Body>, elapsed: Duration) -> Response<Body> {
        let status = rsp.status().as_u16();
        if let Some(outcome) = crate::grpc::outcome_at_head(&rsp) {
            self.finished.record(&labels, status, outcome, elapsed);
            return rsp;
        }
        let finished = self.finished.clone();
        crate::grpc::on_trailers(rsp, Box::new(move |outcome| finished.record(&labels, status, outcome, elapsed)))
    }

    /// Takes everything recorded since the last report.
    pub fn take_report(&self) -> proto::Report {
        self.finished.take_report()
    }

    /// Puts an unsent report back so its counts go out with the next one.
    pub fn restore_report(&self, report: proto::Report) {
        self.finished.restore_report(report)
    }

    pub fn render(&self) -> String {
        weir_api::rt::render_metrics(&self.registry)
    }
}

impl Finished {
    fn record(&self, l: &Labels, status: u16, outcome: Outcome, elapsed: Duration) {
        let class = status_class(status);
        let code = status.to_string();
        let d = l.direction.as_str();
        let tls = l.tls_str();
        self.responses
            .with_label_values(&[
                d,
                &l.service,
                &l.route,
                &l.backend,
                tls,
                &code,
                class,
                outcome.grpc_label(),
                outcome.class_label(),
            ])
            .inc();
        self.duration
            .with_label_values(&[d, &l.service, &l.route, &l.backend, tls, class])
            .observe(elapsed.as_secs_f64());
        // Both transports add up in one series, which counts the mTLS share.
        let key = if l.tls { Cow::Owned(Labels { tls: false, ..l.clone() }) } else { Cow::Borrowed(l) };
        let mut acc = self.report.lock().unwrap();
        if !acc.series.contains_key(&*key) && acc.series.len() >= MAX_REPORT_SERIES {
            return;
        }
        let s = acc
            .series
            .entry(key.into_owned())
            .or_insert_with(|| Stats { counts: vec![0; LATENCY_BOUNDS.len() + 1], ..Default::default() });
        s.requests += 1;
        s.mtls += u64::from(l.tls);
        if outcome.failed() {
            s.failures += 1;
        }
        let secs = elapsed.as_secs_f64();
        let bucket = LATENCY_BOUNDS.iter().position(|b| secs <= *b).unwrap_or(LATENCY_BOUNDS.len());
        s.counts[bucket] += 1;
        s.sum += secs;
    }

    fn take_report(&self) -> proto::Report {
        let mut acc = self.report.lock().unwrap();
        let now = unix_ms();
        let series = std::mem::take(&mut acc.series);
        let start = std::mem::replace(&mut acc.since_ms, now);
        proto::Report {
            window_start_ms: start,
            window_end_ms: now,
            latency_bounds_seconds: LATENCY_BOUNDS.to_vec(),
            stats: series
                .into_iter()
                .map(|(l, s)| proto::TrafficStats {
                    direction: l.direction.as_str().into(),
                    service: l.service.to_string(),
                    route: l.route.to_string(),
                    backend: l.backend.to_string(),
                    requests: s.requests,
                    failures: s.failures,
                    latency_counts: s.counts,
                    latency_sum_seconds: s.sum,
                    mtls_requests: s.mtls,
                })
                .collect(),
        }
    }

    fn restore_report(&self, report: proto::Report) {
        let mut acc = self.report.lock().unwrap();
        acc.since_ms = acc.since_ms.min(report.window_start_ms);
        for t in report.stats {
            let direction = if t.direction == "inbound" { Direction::Inbound } else { Direction::Outbound };
            let l = Labels {
                direction,
                service: t.service.into(),
                route: t.route.into(),
                backend: t.backend.into(),
                tls: false,
            };
            let s = acc
                .series
                .entry(l)
                .or_insert_with(|| Stats { counts: vec![0; LATENCY_BOUNDS.len() + 1], ..Default::default() });
            s.requests += t.requests;
            s.failures += t.failures;
            s.mtls += t.mtls_requests;
            s.sum += t.latency_sum_seconds;
            for (a, b) in s.counts.iter_mut().zip(&t.latency_counts) {
                *a += b;
            }
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[derive(Clone)]
pub struct ResilienceMetrics {
    pub retries: IntCounterVec,
    pub budget_exhausted: IntCounterVec,
    pub retries_skipped: IntCounterVec,
    pub circuit_state: IntGaugeVec,
    pub circuit_transitions: IntCounterVec,
    pub circuit_rejected: IntCounterVec,
    pub bulkhead_rejected: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub faults_injected: IntCounterVec,
    pub ejections: IntCounterVec,
    pub health_checks: IntCounterVec,
    pub health_transitions: IntCounterVec,
    pub healthy_panic: IntCounterVec,
}

impl ResilienceMetrics {
    pub fn register(registry: &Registry) -> Self {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).unwrap();
            registry.register(Box::new(c.clone())).unwrap();
            c
        };
        let circuit_state = IntGaugeVec::new(
            Opts::new("weir_circuit_state", "Per-backend circuit breaker: 0 closed, 1 open, 2 half-open"),
            &["service", "backend"],
        )
        .unwrap();
        registry.register(Box::new(circuit_state.clone())).unwrap();
        Self {
            retries: counter("weir_retries_total", "Retries made (attempts after the first)", &["service"]),
            budget_exhausted: counter(
                "weir_retry_budget_exhausted_total",
                "Retries not made because the retry budget was spent",
                &["service"],
            ),
            retries_skipped: counter(
                "weir_retries_skipped_total",
                "Requests that could not be retried, by reason",
                &["service", "reason"],
            ),
            circuit_state,
            circuit_transitions: counter(
                "weir_circuit_transitions_total",
                "Circuit breaker state changes, by the state entered",
                &["service", "backend", "state"],
            ),
            circuit_rejected: counter(
                "weir_circuit_rejected_total",
                "Requests failed fast because the circuit was open",
                &["service", "backend"],
            ),
            bulkhead_rejected: counter(
                "weir_bulkhead_rejected_total",
                "Requests failed fast because the backend's concurrency limit was reached",
                &["service", "backend"],
            ),
            rate_limited: counter(
                "weir_rate_limited_total",
                "Requests refused by a local rate limit",
                &["service", "direction"],
            ),
            faults_injected: counter("weir_faults_injected_total", "Faults injected, by kind", &["service", "kind"]),
            health_checks: counter(
                "weir_health_checks_total",
                "Active health probes, by result",
                &["service", "result"],
            ),
            health_transitions: counter(
                "weir_health_transitions_total",
                "Endpoints marked healthy or unhealthy by active checks",
                &["service", "state"],
            ),
            healthy_panic: counter(
                "weir_lb_healthy_panic_total",
                "Requests sent to any endpoint because every one failed its health check",
                &["service", "backend"],
            ),
            ejections: counter(
                "weir_endpoint_ejections_total",
                "Endpoints ejected by outlier detection",
                &["service", "backend"],
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_deltas_and_survive_a_failed_send() {
        let m = Metrics::new();
        let l = Labels {
            direction: Direction::Outbound,
            service: "ns/a".into(),
            route: "".into(),
            backend: "ns/a".into(),
            tls: false,
        };
        m.request_finished(&l, 200, Outcome::Http(200), Duration::from_micros(300));
        m.request_finished(&l, 503, Outcome::Http(503), Duration::from_millis(3));
        let r = m.take_report();
        assert_eq!(r.stats.len(), 1);
        assert_eq!((r.stats[0].requests, r.stats[0].failures), (2, 1));
        assert_eq!(r.stats[0].latency_counts[0], 1);
        assert_eq!(r.stats[0].latency_counts[3], 1);
        assert!(m.take_report().stats.is_empty());
        m.restore_report(r);
        m.request_finished(&l, 200, Outcome::Http(200), Duration::from_micros(300));
        assert_eq!(m.take_report().stats[0].requests, 3);
        // A gRPC call answered 200 that failed counts as a failure; a cancelled one does not.
        m.request_finished(&l, 200, Outcome::Grpc(14), Duration::from_micros(300));
        m.request_finished(&l, 200, Outcome::Cancelled, Duration::from_micros(300));
        m.request_finished(&l, 200, Outcome::Grpc(0), Duration::from_micros(300));
        let r = m.take_report();
        assert_eq!((r.stats[0].requests, r.stats[0].failures), (3, 1));
        assert!(m.render().contains("grpc_status=\"14\""), "{}", m.render());
        assert!(m.render().contains("weir_responses_total{backend=\"ns/a\""));
    }
}
