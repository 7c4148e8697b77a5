//! Aggregated traffic reports from the sidecars, per direction/service/route/backend.
//! The canary reconciler reads these; `/stats` on the admin port shows them.

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
        self.requests += other.requests;
        self.failures += other.failures;
        if self.bounds.is_empty() && self.counts.is_empty() {
            self.bounds = other.bounds.clone();
            self.counts = vec![0; other.counts.len()];
        }
        if self.bounds == other.bounds && self.counts.len() == other.counts.len() {
            for (a, b) in self.counts.iter_mut().zip(&other.counts) {
                *a += b;
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

#[derive(Default)]
pub struct Reports {
    series: BTreeMap<SeriesKey, Series>,
}

impl Reports {
    /// Adds one sidecar's report. Returns how many series were dropped because the table is full.
    pub fn record(&mut self, report: &proto::Report) -> u64 {
        let mut dropped = 0;
        for s in &report.stats {
            let key = SeriesKey {
                direction: s.direction.clone(),
                service: s.service.clone(),
                route: s.route.clone(),
                backend: s.backend.clone(),
            };
            if !self.series.contains_key(&key) && self.series.len() >= MAX_SERIES {
                dropped += 1;
                continue;
            }
            let e = self.series.entry(key).or_default();
            e.requests += s.requests;
            e.failures += s.failures;
            e.latency_sum_seconds += s.latency_sum_seconds;
            e.last_report_unix_ms = e.last_report_unix_ms.max(report.window_end_ms);
            let shape_ok = s.latency_counts.len() == report.latency_bounds_seconds.len() + 1;
            if shape_ok {
                if e.latency_bounds_seconds != report.latency_bounds_seconds {
                    // A sidecar with other buckets: restart the histogram in its shape.
                    e.latency_bounds_seconds = report.latency_bounds_seconds.clone();
                    e.latency_counts = vec![0; s.latency_counts.len()];
                }
                for (a, b) in e.latency_counts.iter_mut().zip(&s.latency_counts) {
                    *a += b;
                }
            }
        }
        dropped
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
        };
        let report = proto::Report {
            window_start_ms: 0,
            window_end_ms: 10,
            latency_bounds_seconds: vec![0.01, 0.1],
            stats: vec![stats],
        };
        assert_eq!(r.record(&report), 0);
        assert_eq!(r.record(&report), 0);
        let s = r.series.values().next().unwrap();
        assert_eq!((s.requests, s.failures), (200, 10));
        assert_eq!(s.quantile(0.5), Some(0.01));
        assert_eq!(s.quantile(0.95), Some(0.1));
        assert_eq!(s.quantile(1.0), Some(f64::INFINITY));
    }
}
