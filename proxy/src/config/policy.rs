//! Resilience policies as the sidecar applies them (timeouts, retries, budgets, breakers,
//! outlier ejection, bulkheads, rate limits, faults, balancing, health checks), validated from
//! the protocol message: a policy that fails here Nacks the whole snapshot.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use weir_api::proto;

use super::{ServiceKey, StrMatch, str_match};

/// A resilience policy, as the outbound path applies it.
#[derive(Debug, Clone)]
pub struct Policy {
    /// `namespace/name` of the resource (label value and the key of its retry budget).
    pub name: Arc<str>,
    pub rule: Option<String>,
    pub port: Option<u16>,
    pub request_timeout: Option<Duration>,
    pub per_try_timeout: Option<Duration>,
    pub upstream: crate::config::ConnectOpts,
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
    /// The token bucket's capacity; the leaky bucket's queue.
    pub burst: u32,
    pub key: RateKey,
    pub max_keys: u32,
    pub algorithm: RateAlgorithm,
}

/// How a rate limit counts (see `weir_api::resilience::RateLimitAlgorithm`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RateAlgorithm {
    TokenBucket,
    /// At most `per_second` × the window in any window-long span.
    SlidingWindow(Duration),
    LeakyBucket,
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
            upstream: ConnectOpts { connect: ms(p.connect_timeout_ms), idle: ms(p.idle_timeout_ms), limit: None },
            stream_idle_timeout: ms(p.stream_idle_timeout_ms),
            retry,
            breaker,
        })
    }
}

pub(super) fn rate_limit(r: &proto::RateLimit) -> Result<RateLimitPolicy, String> {
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
    let algorithm = match proto::RateLimitAlgorithm::try_from(r.algorithm) {
        Ok(proto::RateLimitAlgorithm::TokenBucket) => RateAlgorithm::TokenBucket,
        Ok(proto::RateLimitAlgorithm::SlidingWindow) => {
            let window = Duration::from_millis(if r.window_ms == 0 { 1000 } else { r.window_ms });
            if f64::from(r.requests_per_second) * window.as_secs_f64() < 1.0 {
                return Err(format!("rate limit window {window:?} allows no request"));
            }
            RateAlgorithm::SlidingWindow(window)
        }
        Ok(proto::RateLimitAlgorithm::LeakyBucket) => RateAlgorithm::LeakyBucket,
        Err(_) => return Err(format!("unknown rate limit algorithm {}", r.algorithm)),
    };
    Ok(RateLimitPolicy {
        per_second: r.requests_per_second,
        burst: r.burst.max(1),
        key,
        max_keys: r.max_keys,
        algorithm,
    })
}

/// A rate limit this sidecar enforces on traffic it receives.
#[derive(Debug, Clone)]
pub struct InboundLimit {
    pub policy: Arc<str>,
    pub service: ServiceKey,
    pub limit: RateLimitPolicy,
}

/// Per-policy overrides of how upstream connections are made and kept.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnectOpts {
    pub connect: Option<Duration>,
    pub idle: Option<Duration>,
    /// At most this many HTTP/1.1 connections, shared by every request with the same key
    /// (policy and backend); a request waits up to the connect timeout for one to free.
    pub limit: Option<(Arc<str>, u32)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Service;

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
