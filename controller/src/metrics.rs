//! Controller metrics (Prometheus text format on the admin port).

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Sidecars with an open Discovery stream, by the version they reported.
    pub connected_proxies: prometheus::IntGaugeVec,
    pub snapshots_pushed: IntCounter,
    /// Of those, the ones sent as changes against the previous one.
    pub snapshots_incremental: IntCounter,
    pub push_latency: Histogram,
    /// Snapshots sidecars refused, by reason class (`service`, `duplicate`, `authorization`,
    /// `other`).
    pub nacks: prometheus::IntCounterVec,
    pub rejected_resources: IntGauge,
    pub config_reloads: IntCounter,
    pub reports_received: IntCounter,
    pub reports_dropped_series: IntCounter,
    pub certify_results: prometheus::IntCounterVec,
    /// Control-plane connections refused before gRPC (`handshake`, `timeout`), and Discovery
    /// streams refused for their identity (`no_certificate`, `identity_mismatch`).
    pub control_refused: prometheus::IntCounterVec,
    /// Expiry of the trust anchor and the issuer (`cert` = `trust-anchor` | `issuer`), Unix seconds.
    pub ca: crate::identity::CaMetrics,
    /// Canary weight (percent) by canary.
    pub canary_weight: prometheus::IntGaugeVec,
    /// 1 for each canary's current phase.
    pub canary_phase: prometheus::IntGaugeVec,
    /// Analyses by canary and verdict (pass, fail, inconclusive).
    pub canary_analyses: prometheus::IntCounterVec,
    /// Kubernetes watch failures (each followed by a retry with back-off), by kind.
    pub watch_restarts: prometheus::IntCounterVec,
    /// 1 while this replica holds the leader lease (always 1 in local mode).
    pub leader: IntGauge,
    /// Status writes to Kubernetes by result (`ok`, `error`).
    pub status_writes: prometheus::IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let connected_proxies = prometheus::IntGaugeVec::new(
            prometheus::Opts::new("weir_controller_connected_proxies", "Sidecars with an open Discovery stream"),
            &["proxy_version"],
        )
        .unwrap();
        let snapshots_pushed =
            IntCounter::new("weir_controller_snapshots_pushed_total", "Snapshots sent to sidecars").unwrap();
        let snapshots_incremental = IntCounter::new(
            "weir_controller_snapshots_incremental_total",
            "Snapshots sent as the changes since the previous one (also in snapshots_pushed_total)",
        )
        .unwrap();
        let push_latency = Histogram::with_opts(
            HistogramOpts::new(
                "weir_controller_push_latency_seconds",
                "Time from a configuration change being observed to a sidecar acking the resulting snapshot",
            )
            .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )
        .unwrap();
        let nacks = prometheus::IntCounterVec::new(
            prometheus::Opts::new("weir_controller_nacks_total", "Snapshots sidecars could not apply, by reason class"),
            &["reason"],
        )
        .unwrap();
        let rejected_resources =
            IntGauge::new("weir_controller_rejected_resources", "Resource definitions currently rejected").unwrap();
        let config_reloads =
            IntCounter::new("weir_controller_config_reloads_total", "Full re-reads of the config directory").unwrap();
        let reports_received =
            IntCounter::new("weir_controller_reports_received_total", "Traffic reports received from sidecars")
                .unwrap();
        let reports_dropped_series = IntCounter::new(
            "weir_controller_report_series_dropped_total",
            "Report series dropped: not the reporting sidecar's own traffic (an unknown Service, another workload's inbound), or evicted from a full table",
        )
        .unwrap();
        registry.register(Box::new(nacks.clone())).unwrap();
        for c in
            [&snapshots_pushed, &snapshots_incremental, &config_reloads, &reports_received, &reports_dropped_series]
        {
            registry.register(Box::new(c.clone())).unwrap();
        }
        registry.register(Box::new(connected_proxies.clone())).unwrap();
        registry.register(Box::new(rejected_resources.clone())).unwrap();
        registry.register(Box::new(push_latency.clone())).unwrap();
        let certify_results = prometheus::IntCounterVec::new(
            prometheus::Opts::new("weir_controller_certify_total", "Certify requests by result"),
            &["result"],
        )
        .unwrap();
        registry.register(Box::new(certify_results.clone())).unwrap();
        let control_refused = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "weir_controller_refused_total",
                "Control-plane connections and streams refused (TLS handshake failed or timed out, no client certificate, Hello not matching the certificate)",
            ),
            &["reason"],
        )
        .unwrap();
        registry.register(Box::new(control_refused.clone())).unwrap();
        let ca_expiration = prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "weir_controller_ca_expiration_timestamp_seconds",
                "When the mesh's trust anchor and issuer certificates expire",
            ),
            &["cert"],
        )
        .unwrap();
        registry.register(Box::new(ca_expiration.clone())).unwrap();
        let ca_reloads = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "weir_controller_ca_reloads_total",
                "Changes of the identity directory by result (error: the CA in force stayed)",
            ),
            &["result"],
        )
        .unwrap();
        registry.register(Box::new(ca_reloads.clone())).unwrap();
        let canary_weight = prometheus::IntGaugeVec::new(
            prometheus::Opts::new("weir_canary_weight", "Percent of traffic the canary receives"),
            &["canary"],
        )
        .unwrap();
        let canary_phase = prometheus::IntGaugeVec::new(
            prometheus::Opts::new("weir_canary_phase", "1 for the canary's current phase"),
            &["canary", "phase"],
        )
        .unwrap();
        let canary_analyses = prometheus::IntCounterVec::new(
            prometheus::Opts::new("weir_canary_analyses_total", "Canary analyses by verdict"),
            &["canary", "verdict"],
        )
        .unwrap();
        registry.register(Box::new(canary_weight.clone())).unwrap();
        registry.register(Box::new(canary_phase.clone())).unwrap();
        registry.register(Box::new(canary_analyses.clone())).unwrap();
        let watch_restarts = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "weir_controller_watch_restarts_total",
                "Kubernetes watches that failed and were retried, by kind",
            ),
            &["kind"],
        )
        .unwrap();
        let leader = IntGauge::new("weir_controller_leader", "1 while this replica holds the leader lease").unwrap();
        let status_writes = prometheus::IntCounterVec::new(
            prometheus::Opts::new("weir_controller_status_writes_total", "Status writes to Kubernetes by result"),
            &["result"],
        )
        .unwrap();
        registry.register(Box::new(watch_restarts.clone())).unwrap();
        registry.register(Box::new(leader.clone())).unwrap();
        registry.register(Box::new(status_writes.clone())).unwrap();
        Self {
            registry,
            connected_proxies,
            snapshots_pushed,
            snapshots_incremental,
            push_latency,
            nacks,
            rejected_resources,
            config_reloads,
            reports_received,
            reports_dropped_series,
            certify_results,
            control_refused,
            ca: crate::identity::CaMetrics { expiration: ca_expiration, reloads: ca_reloads },
            canary_weight,
            canary_phase,
            canary_analyses,
            watch_restarts,
            leader,
            status_writes,
        }
    }

    pub fn render(&self) -> String {
        weir_api::rt::render_metrics(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
