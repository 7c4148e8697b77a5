//! Aggregated traffic reports from the sidecars, per direction/service/route/backend.
//! The canary reconciler reads these; `/stats` on the admin port shows them. The same reports,
//! kept per calling workload, are the service graph (`/edges`): who calls which Service, as
//! which identity, over mTLS or not.

use std::collections::BTreeMap;

use serde::Serialize;
use weir_api::proto;

/// Most series the table holds; sidecars are untrusted input, so the table is bounded.
pub const MAX_SERIES: usize = 10_000;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct SeriesKey {
    pub direction: String,
    pub service: String,
    pub route: String,
    pub backend: String,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Series {
    pub requests: u64,
    pub failures: u64,
    pub latency_bounds_seconds: Vec<f64>,
    pub latency_counts: Vec<u64>,
    pub latency_sum_seconds: f64,
    pub last_report_unix_ms: u64,
}

impl Series {
    /// Latency at quantile `q` (0..1), as the upper bound of the bucket that holds it.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        quantile(&self.latency_bounds_seconds, &self.latency_counts, q)
    }
}

/// The upper bound of the histogram bucket holding quantile `q` (0..1); `None` when empty.
pub fn quantile(bounds: &[f64], counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return Some(bounds.get(i).copied().unwrap_or(f64::INFINITY));
        }
    }
    None
}

/// Cumulative counts of one backend as called for one service, summed over routes and over
/// every sidecar that reported them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Totals {
    pub requests: u64,
    pub failures: u64,
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
}

impl Totals {
    /// Adds `other`'s counts; a histogram of another shape is left out of the latencies (the
    /// first shape seen wins).
    pub fn add(&mut self, other: &Totals) {
        self.requests = self.requests.saturating_add(other.requests);
        self.failures = self.failures.saturating_add(other.failures);
        if self.bounds.is_empty() && self.counts.is_empty() {
            self.bounds = other.bounds.clone();
            self.counts = vec![0; other.counts.len()];
        }
        if self.bounds == other.bounds && self.counts.len() == other.counts.len() {
            for (a, b) in self.counts.iter_mut().zip(&other.counts) {
                *a = a.saturating_add(*b);
            }
        }
    }

    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Totals) -> Totals {
        let counts = if self.bounds == earlier.bounds && self.counts.len() == earlier.counts.len() {
            self.counts.iter().zip(&earlier.counts).map(|(a, b)| a.saturating_sub(*b)).collect()
        } else {
            self.counts.clone()
        };
        Totals {
            requests: self.requests.saturating_sub(earlier.requests),
            failures: self.failures.saturating_sub(earlier.failures),
            bounds: self.bounds.clone(),
            counts,
        }
    }

    pub fn quantile(&self, q: f64) -> Option<f64> {
        quantile(&self.bounds, &self.counts, q)
    }

    /// The bucket holding quantile `q`: (lower bound, upper bound) in seconds.
    pub fn quantile_bucket(&self, q: f64) -> Option<(f64, f64)> {
        let upper = self.quantile(q)?;
        let lower = self.bounds.iter().copied().filter(|b| *b < upper).fold(0.0, f64::max);
        Some((lower, upper))
    }
}

/// Most edges the graph holds (bounded as the series are: the stalest goes first).
pub const MAX_EDGES: usize = 10_000;

/// One caller's outbound traffic to one Service, route and backend.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct EdgeKey {
    /// `namespace/name` of the calling workload (its sidecar's Hello).
    pub caller: String,
    /// The caller's SPIFFE ID as its certificate proved it; empty on a plaintext control plane.
    pub identity: String,
    pub service: String,
    pub route: String,
    pub backend: String,
}

#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Edge {
    pub requests: u64,
    pub failures: u64,
    /// Of `requests`, those over mesh mTLS.
    pub mtls_requests: u64,
    pub latency_bounds_seconds: Vec<f64>,
    pub latency_counts: Vec<u64>,
    pub last_report_unix_ms: u64,
}

/// Room for `key` in a table bounded at `max`: when it is new and the table is full, the entry
/// reported least recently goes. Returns how many went (0 or 1).
fn make_room<K: Ord + Clone, V>(table: &mut BTreeMap<K, V>, key: &K, max: usize, last: impl Fn(&V) -> u64) -> u64 {
    if table.contains_key(key) || table.len() < max {
        return 0;
    }
    let stalest = table.iter().min_by_key(|(_, v)| last(v)).map(|(k, _)| k.clone());
    stalest.map_or(0, |k| u64::from(table.remove(&k).is_some()))
}

/// Adds one reported series' latency histogram to a cumulative one (a sidecar with other
/// buckets restarts it in its shape; a histogram of the wrong length is left out).
fn add_latencies(bounds: &mut Vec<f64>, counts: &mut Vec<u64>, reported_bounds: &[f64], s: &proto::TrafficStats) {
    if s.latency_counts.len() != reported_bounds.len() + 1 {
        return;
    }
    if bounds.as_slice() != reported_bounds || counts.len() != s.latency_counts.len() {
        *bounds = reported_bounds.to_vec();
        *counts = vec![0; s.latency_counts.len()];
    }
    for (a, b) in counts.iter_mut().zip(&s.latency_counts) {
        *a = a.saturating_add(*b);
    }
}

#[derive(Default)]
pub struct Reports {
    series: BTreeMap<SeriesKey, Series>,
    edges: BTreeMap<EdgeKey, Edge>,
}

impl Reports {
    /// Adds one sidecar's report, keeping only the series `own` says are about the reporter's
    /// own traffic (the rest are dropped). When the table is full, a new series evicts the
    /// one reported least recently. Counts saturate instead of wrapping. Returns how many
    /// series were dropped or evicted.
    pub fn record(&mut self, report: &proto::Report, own: impl Fn(&proto::TrafficStats) -> bool) -> u64 {
        let mut dropped = 0;
        for s in &report.stats {
            if !own(s) {
                dropped += 1;
                continue;
            }
            let key = SeriesKey {
                direction: s.direction.clone(),
                service: s.service.clone(),
                route: s.route.clone(),
                backend: s.backend.clone(),
            };
            dropped += make_room(&mut self.series, &key, MAX_SERIES, |v| v.last_report_unix_ms);
            let e = self.series.entry(key).or_default();
            e.requests = e.requests.saturating_add(s.requests);
            e.failures = e.failures.saturating_add(s.failures.min(s.requests));
            if s.latency_sum_seconds.is_finite() && s.latency_sum_seconds >= 0.0 {
                e.latency_sum_seconds += s.latency_sum_seconds;
            }
            e.last_report_unix_ms = e.last_report_unix_ms.max(report.window_end_ms);
            add_latencies(&mut e.latency_bounds_seconds, &mut e.latency_counts, &report.latency_bounds_seconds, s);
        }
        dropped
    }

    /// Adds one sidecar's outbound traffic to the service graph as calls from `caller` (as
    /// `identity`), keeping only the series `own` admits (as [`Self::record`]). Returns how many
    /// edges were evicted to make room.
    pub fn record_edges(
        &mut self,
        caller: &str,
        identity: &str,
        report: &proto::Report,
        own: impl Fn(&proto::TrafficStats) -> bool,
    ) -> u64 {
        let mut evicted = 0;
        for s in report.stats.iter().filter(|s| s.direction == "outbound" && own(s)) {
            let key = EdgeKey {
                caller: caller.to_string(),
                identity: identity.to_string(),
                service: s.service.clone(),
                route: s.route.clone(),
                backend: s.backend.clone(),
            };
            evicted += make_room(&mut self.edges, &key, MAX_EDGES, |v| v.last_report_unix_ms);
            let e = self.edges.entry(key).or_default();
            e.requests = e.requests.saturating_add(s.requests);
            e.failures = e.failures.saturating_add(s.failures.min(s.requests));
            e.mtls_requests = e.mtls_requests.saturating_add(s.mtls_requests.min(s.requests));
            e.last_report_unix_ms = e.last_report_unix_ms.max(report.window_end_ms);
            add_latencies(&mut e.latency_bounds_seconds, &mut e.latency_counts, &report.latency_bounds_seconds, s);
        }
        evicted
    }

    /// The service graph: every edge with its cumulative counts.
    pub fn edges_json(&self) -> serde_json::Value {
        let rows: Vec<serde_json::Value> = self
            .edges
            .iter()
            .map(|(k, e)| {
                serde_json::json!({
                    "caller": k.caller, "identity": k.identity, "service": k.service, "route": k.route,
                    "backend": k.backend, "requests": e.requests, "failures": e.failures,
                    "mtlsRequests": e.mtls_requests, "latencyBoundsSeconds": e.latency_bounds_seconds,
                    "latencyCounts": e.latency_counts, "lastReportUnixMs": e.last_report_unix_ms,
                })
            })
            .collect();
        serde_json::json!({ "edges": rows })
    }

    /// Every sidecar's outbound requests for `service` that went to `backend` (both
    /// `namespace/name`), summed over routes.
    pub fn outbound_totals(&self, service: &str, backend: &str) -> Totals {
        let mut t = Totals::default();
        for (k, s) in &self.series {
            if k.direction == "outbound" && k.service == service && k.backend == backend {
                t.add(&Totals {
                    requests: s.requests,
                    failures: s.failures,
                    bounds: s.latency_bounds_seconds.clone(),
                    counts: s.latency_counts.clone(),
                });
            }
        }
        t
    }

    pub fn to_json(&self) -> serde_json::Value {
        let rows: Vec<serde_json::Value> = self
            .series
            .iter()
            .map(|(k, s)| {
                serde_json::json!({
                    "direction": k.direction, "service": k.service, "route": k.route, "backend": k.backend,
                    "requests": s.requests, "failures": s.failures,
                    "successRate": if s.requests > 0 { Some(1.0 - s.failures as f64 / s.requests as f64) } else { None },
                    "p50Seconds": s.quantile(0.5), "p95Seconds": s.quantile(0.95), "p99Seconds": s.quantile(0.99),
                    "latencyBoundsSeconds": s.latency_bounds_seconds, "latencyCounts": s.latency_counts,
                    "lastReportUnixMs": s.last_report_unix_ms,
                })
            })
            .collect();
        serde_json::json!({ "series": rows })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregates_and_estimates_quantiles() {
        let mut r = Reports::default();
        let stats = proto::TrafficStats {
            direction: "outbound".into(),
            service: "shop/web".into(),
            route: String::new(),
            backend: "shop/web".into(),
            requests: 100,
            failures: 5,
            latency_counts: vec![90, 9, 1],
            latency_sum_seconds: 1.0,
            mtls_requests: 60,
        };
        let report = proto::Report {
            window_start_ms: 0,
            window_end_ms: 10,
            latency_bounds_seconds: vec![0.01, 0.1],
            stats: vec![stats],
        };
        assert_eq!(r.record(&report, |_| true), 0);
        assert_eq!(r.record(&report, |_| true), 0);
        let s = r.series.values().next().unwrap();
        assert_eq!((s.requests, s.failures), (200, 10));
        assert_eq!(s.quantile(0.5), Some(0.01));
        assert_eq!(s.quantile(0.95), Some(0.1));
        assert_eq!(s.quantile(1.0), Some(f64::INFINITY));
    }

    fn stats(service: &str, requests: u64, failures: u64) -> proto::TrafficStats {
        proto::TrafficStats {
            direction: "outbound".into(),
            service: service.into(),
            backend: service.into(),
            requests,
            failures,
            latency_counts: vec![requests],
            ..Default::default()
        }
    }

    #[test]
    fn foreign_series_are_dropped_counts_saturate_and_a_full_table_evicts_the_stalest() {
        let mut r = Reports::default();
        let report = |end: u64, stats: Vec<proto::TrafficStats>| proto::Report {
            window_end_ms: end,
            stats,
            ..Default::default()
        };
        // Only what the reporter may speak of is kept.
        let dropped = r.record(&report(1, vec![stats("shop/web", 10, 1), stats("shop/ghost", 10, 10)]), |s| {
            s.service == "shop/web"
        });
        assert_eq!(dropped, 1);
        assert_eq!(r.series.len(), 1);
        // Counts saturate; failures never exceed requests.
        r.record(&report(2, vec![stats("shop/web", u64::MAX, u64::MAX)]), |_| true);
        let t = r.outbound_totals("shop/web", "shop/web");
        assert_eq!((t.requests, t.failures), (u64::MAX, u64::MAX));
        assert_eq!(t.counts, vec![u64::MAX]);
        // Full: the series reported least recently goes, the newest stays.
        let mut r = Reports::default();
        for i in 0..MAX_SERIES {
            r.record(&report(i as u64 + 10, vec![stats(&format!("ns/s{i}"), 1, 0)]), |_| true);
        }
        assert_eq!(r.record(&report(1_000_000, vec![stats("ns/new", 1, 0)]), |_| true), 1);
        assert_eq!(r.series.len(), MAX_SERIES);
        assert_eq!(r.outbound_totals("ns/s0", "ns/s0").requests, 0, "the stalest series was kept");
        assert_eq!(r.outbound_totals("ns/new", "ns/new").requests, 1);
        assert_eq!(r.outbound_totals("ns/s1", "ns/s1").requests, 1);
    }

    #[test]
    fn edges_are_per_caller_and_bounded() {
        let mut r = Reports::default();
        let report = |service: &str, requests: u64, mtls: u64| proto::Report {
            window_start_ms: 0,
            window_end_ms: 10,
            latency_bounds_seconds: vec![0.01],
            stats: vec![
                proto::TrafficStats {
                    direction: "outbound".into(),
                    service: service.into(),
                    backend: service.into(),
                    requests,
                    failures: 1,
                    latency_counts: vec![requests, 0],
                    mtls_requests: mtls,
                    ..Default::default()
                },
                // Inbound traffic is not an edge of the caller's.
                proto::TrafficStats {
                    direction: "inbound".into(),
                    service: "shop/a".into(),
                    requests: 9,
                    ..Default::default()
                },
            ],
        };
        r.record_edges("shop/a", "spiffe://td/ns/shop/sa/a", &report("shop/web", 4, 4), |_| true);
        r.record_edges("shop/a", "spiffe://td/ns/shop/sa/a", &report("shop/web", 6, 2), |_| true);
        r.record_edges("shop/b", "", &report("shop/web", 3, 0), |_| true);
        // A sidecar cannot claim more mTLS requests than requests.
        r.record_edges("shop/c", "", &report("shop/web", 1, 5), |_| true);
        let rows = r.edges_json()["edges"].as_array().unwrap().clone();
        let got: Vec<(String, u64, u64, u64)> = rows
            .iter()
            .map(|e| {
                let n = |k: &str| e[k].as_u64().unwrap();
                (e["caller"].as_str().unwrap().to_string(), n("requests"), n("failures"), n("mtlsRequests"))
            })
            .collect();
        assert_eq!(got, vec![("shop/a".into(), 10, 2, 6), ("shop/b".into(), 3, 1, 0), ("shop/c".into(), 1, 1, 1)]);
        // Bounded: a full table evicts the edge reported least recently.
        for i in 0..MAX_EDGES + 5 {
            r.record_edges(&format!("shop/w{i}"), "", &report("shop/web", 1, 0), |_| true);
        }
        assert_eq!(r.edges.len(), MAX_EDGES);
    }
}
