//! The `ResiliencePolicy` resource: how callers of a Service time out, retry, and fail fast.
//! Enforced by the calling sidecars (outbound). See `examples/resilience/policy.yaml` for
//! every field with its default.
//!
//! ```yaml
//! apiVersion: weir.io/v1alpha1
//! kind: ResiliencePolicy
//! metadata: { name: reviews, namespace: shop }
//! spec:
//!   targetRef: { service: reviews }
//!   timeouts: { request: 2s, perTry: 500ms }
//!   retries:
//!     attempts: 2
//!     retryOn: [gateway-error, connect-failure, reset]
//!     budget: { percent: 20, minRetriesPerSecond: 10 }
//! ```

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod validate;

pub use validate::*;

use crate::duration;
use crate::validate::{FieldError, dns_label};

/// Timeouts, retries and circuit breaking for the callers of one Service (optionally only one
/// route rule or port of it). The most specific policy wins: rule and port, then rule, then
/// port, then the whole Service.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "weir.io",
    version = "v1alpha1",
    kind = "ResiliencePolicy",
    namespaced,
    status = "ResiliencePolicyStatus",
    shortname = "wrp",
    category = "weir",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.targetRef.service"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ResiliencePolicySpec {
    pub target_ref: TargetRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bulkhead: Option<Bulkhead>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faults: Option<Faults>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
}

/// Active health checks: every calling sidecar probes the endpoints of the target Service (and
/// of the backends its routes name); an endpoint that fails `unhealthyThreshold` probes in a
/// row takes no traffic until it passes `healthyThreshold` in a row. Endpoints start healthy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    /// Path of the probe (`GET`); a 2xx answer passes.
    #[schemars(length(min = 1, max = 1024))]
    pub path: String,
    /// Default 5s.
    #[serde(default = "default_hc_interval")]
    #[schemars(regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub interval: String,
    /// Default 1s.
    #[serde(default = "default_hc_timeout")]
    #[schemars(regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub timeout: String,
    /// Default 2.
    #[serde(default = "default_two")]
    #[schemars(range(min = 1, max = 100))]
    pub healthy_threshold: u32,
    /// Default 3.
    #[serde(default = "default_three")]
    #[schemars(range(min = 1, max = 100))]
    pub unhealthy_threshold: u32,
}

fn default_hc_interval() -> String {
    "5s".into()
}
fn default_hc_timeout() -> String {
    "1s".into()
}
fn default_two() -> u32 {
    2
}
fn default_three() -> u32 {
    3
}

/// How a backend's endpoints share requests.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancer {
    /// Default `P2CPeakEWMA`.
    #[serde(default)]
    pub algorithm: LbAlgorithm,
    /// The key for `RingHash` and `Maglev` (required for them, not allowed otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_key: Option<HashKey>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum LbAlgorithm {
    /// Power of two choices on peak-EWMA latency × in-flight requests.
    #[default]
    P2CPeakEWMA,
    /// Smooth weighted round robin (endpoint `weight`s).
    RoundRobin,
    /// Power of two choices on in-flight requests.
    LeastRequest,
    /// Weighted random.
    Random,
    /// Consistent hashing on a ring (weights set each endpoint's share of the ring).
    RingHash,
    /// Google's Maglev consistent hashing (a 65537-entry table).
    Maglev,
}

/// Exactly one of the fields.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HashKey {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<bool>,
}

/// Per-endpoint circuit breaking: an endpoint that fails is taken out of the balancer for
/// `baseEjectionTime × (times ejected)`, up to `maxEjectionTime`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// 5xx responses or failed attempts in a row that eject an endpoint. Default 5.
    #[serde(default = "default_consecutive")]
    #[schemars(range(min = 1, max = 100000))]
    pub consecutive_failures: u32,
    /// Eject when at least this share (%) of an endpoint's requests in `window` failed.
    /// Default none (only consecutive failures eject).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_rate_percent: Option<u32>,
    /// Requests an endpoint must have served in `window` before its failure rate counts. Default 20.
    #[serde(default = "default_min_requests")]
    #[schemars(range(min = 1, max = 1000000))]
    pub min_requests: u32,
    /// Default 10s.
    #[serde(default = "default_budget_window")]
    #[schemars(regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub window: String,
    /// Default 30s.
    #[serde(default = "default_ejection")]
    #[schemars(regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub base_ejection_time: String,
    /// Default 5m.
    #[serde(default = "default_max_open")]
    #[schemars(regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub max_ejection_time: String,
    /// Most endpoints of a backend ejected at once (%). One may always be ejected while
    /// another remains. Default 50.
    #[serde(default = "default_max_ejected")]
    #[schemars(range(min = 0, max = 100))]
    pub max_ejected_percent: u32,
}

fn default_min_requests() -> u32 {
    20
}
fn default_ejection() -> String {
    "30s".into()
}
fn default_max_ejected() -> u32 {
    50
}

/// Concurrency limits per backend: overflow fails fast with 503, never an unbounded queue.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Bulkhead {
    /// HTTP/1.1 connections to the backend's unmeshed endpoints at once; a request waits up to
    /// the connect timeout for one to free. Default: no limit. (Towards meshed endpoints there
    /// is one multiplexed HTTP/2 connection per endpoint anyway.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_connections: Option<u32>,
    /// Requests in flight to the backend at once. Default 1024.
    #[serde(default = "default_max_in_flight")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_in_flight: u32,
    /// Requests that may wait for a slot. Default 0 (fail at once).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000000))]
    pub max_pending: u32,
    /// How long a request may wait for a slot. Default 1s.
    #[serde(default = "default_pending_timeout")]
    #[schemars(regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub pending_timeout: String,
}

fn default_max_in_flight() -> u32 {
    1024
}
fn default_pending_timeout() -> String {
    "1s".into()
}

/// A local rate limit, one counter per key, enforced by the callers (outbound) or by the
/// Service's own sidecars (inbound). Counted as `algorithm` says: a token bucket
/// (`requestsPerSecond` refill, `burst` capacity: bursts allowed, the default), a sliding
/// window (at most `requestsPerSecond` × `window` requests in any span of `window`, no burst
/// at a window's edge), or a leaky bucket (requests leave at `requestsPerSecond`, evenly
/// spaced; up to `burst` wait their turn). Exceeded: 429 with `retry-after`; gRPC callers get
/// `RESOURCE_EXHAUSTED`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    #[schemars(range(min = 1, max = 10000000))]
    pub requests_per_second: u32,
    /// Default: requestsPerSecond.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000000))]
    pub burst: Option<u32>,
    /// What a bucket is per. Default: one bucket for the whole workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<RateLimitKey>,
    /// Most keys tracked; the least recently used is forgotten beyond. Default 10000.
    #[serde(default = "default_max_keys")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_keys: u32,
    /// `Outbound` (default): each calling sidecar limits its own calls ("protect them").
    /// `Inbound`: the sidecars of the Service's endpoints limit all calls they receive, from
    /// any caller ("protect me").
    #[serde(default)]
    pub direction: Direction,
    /// How requests are counted. Default `TokenBucket`.
    #[serde(default)]
    pub algorithm: RateLimitAlgorithm,
    /// `SlidingWindow` only: the window. Default 1s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub window: Option<String>,
}

/// How a rate limit counts (see [`RateLimit`]).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RateLimitAlgorithm {
    /// Tokens refill at `requestsPerSecond` up to `burst`; a request takes one. Allows bursts.
    #[default]
    TokenBucket,
    /// A sliding-window counter: the current window's count plus the previous window's,
    /// weighted by how much of it still overlaps, stays within `requestsPerSecond` × `window`.
    SlidingWindow,
    /// Queue-and-drain: requests go on one every 1/`requestsPerSecond`; up to `burst` wait
    /// their turn (delayed, not refused), beyond that they are refused.
    LeakyBucket,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Direction {
    #[default]
    Outbound,
    Inbound,
}

fn default_max_keys() -> u32 {
    10_000
}

/// Exactly one of the fields.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitKey {
    /// A bucket per value of this request header (requests without it share one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// A bucket per client IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<bool>,
    /// A bucket per calling workload's mesh identity (inbound limits only; plaintext callers
    /// share one bucket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_identity: Option<bool>,
}

/// Fault injection for chaos tests: delays and aborts for a share of requests, optionally only
/// those carrying a header.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Faults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
    /// Only requests with every one of these headers (exact values) get faults.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<crate::route::NamedValueMatch>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    #[schemars(regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub fixed: String,
    /// Share of requests delayed (0–100, fractions allowed).
    pub percent: f64,
}

/// Exactly one of `httpStatus` and `grpcStatus`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 200, max = 599))]
    pub http_status: Option<u32>,
    /// A gRPC code by name (`unavailable`) or number (`14`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<String>,
    /// Share of requests aborted (0–100, fractions allowed).
    pub percent: f64,
}

/// gRPC status codes by their lower-case, dash-separated names.
pub const GRPC_CODES: &[&str] = &[
    "ok",
    "cancelled",
    "unknown",
    "invalid-argument",
    "deadline-exceeded",
    "not-found",
    "already-exists",
    "permission-denied",
    "resource-exhausted",
    "failed-precondition",
    "aborted",
    "out-of-range",
    "unimplemented",
    "internal",
    "unavailable",
    "data-loss",
    "unauthenticated",
];

/// A gRPC code from its name or number.
pub fn grpc_code(s: &str) -> Option<u32> {
    GRPC_CODES.iter().position(|c| *c == s).map(|i| i as u32).or_else(|| s.parse().ok().filter(|n| *n <= 16))
}

/// What the policy applies to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// A Service in the policy's namespace.
    #[schemars(length(min = 1, max = 63))]
    pub service: String,
    /// Only requests matched by this rule (a Route rule's `name`) of the Service's routes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Only requests to this service port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.request) || !has(self.perTry) || duration(self.perTry) <= duration(self.request)",
    "message": "perTry must not exceed request"
}]))]
pub struct Timeouts {
    /// The whole call, retries and back-off included, until the end of the response body
    /// (504 before the headers; a reset stream after). Default: none. Streams meant to outlive
    /// it (server-sent events, gRPC streaming, downloads) belong on a rule or port without one,
    /// bounded by `streamIdle` instead; a WebSocket is bounded by it only until it switches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub request: Option<String>,
    /// Each attempt, until response headers. Default: none (only `request` applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub per_try: Option<String>,
    /// Establishing a new upstream connection. Default: the sidecar's `--connect-timeout` (1s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub connect: Option<String>,
    /// How long an unused HTTP/1.1 upstream connection is kept. Default 90s. (The multiplexed
    /// connection between sidecars stays open, kept alive by HTTP/2 pings.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub idle: Option<String>,
    /// Longest pause in a request or response body; a stream that stalls longer is reset.
    /// Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub stream_idle: Option<String>,
}

/// Conditions a retry can be made on.
pub const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "refused-stream",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    /// Retries after the first attempt (as Istio's `attempts`). Default 2.
    #[serde(default = "default_attempts")]
    #[schemars(range(min = 0, max = 10))]
    pub attempts: u32,
    /// When to retry: `5xx`, `gateway-error` (502/503/504), `reset`, `connect-failure`,
    /// `refused-stream`, a status code such as `"429"`, or a gRPC code (`unavailable`,
    /// `resource-exhausted`, `internal`, `cancelled`, `deadline-exceeded`). Per-try timeouts
    /// count as `5xx`, `gateway-error` and `reset`. Default `[gateway-error, connect-failure, reset]`.
    #[serde(default = "default_retry_on")]
    pub retry_on: Vec<String>,
    /// Retry methods that are not idempotent (POST, PATCH, CONNECT) too. Default false. A gRPC
    /// call (a POST) is retried on the gRPC codes listed in `retryOn` (and on failures the
    /// application never saw) whatever this says, as gRPC's own retry policy does.
    #[serde(default)]
    pub retry_non_idempotent: bool,
    /// Exponential back-off with full jitter between attempts.
    #[serde(default)]
    pub backoff: Backoff,
    /// How much extra load retries may add.
    #[serde(default)]
    pub budget: RetryBudget,
}

fn default_attempts() -> u32 {
    2
}

fn default_retry_on() -> Vec<String> {
    ["gateway-error", "connect-failure", "reset"].map(String::from).to_vec()
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Backoff {
    /// First back-off ceiling. Default 25ms.
    #[serde(default = "default_backoff_base")]
    #[schemars(regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub base: String,
    /// Largest back-off. Default 250ms.
    #[serde(default = "default_backoff_max")]
    #[schemars(regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub max: String,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { base: default_backoff_base(), max: default_backoff_max() }
    }
}

fn default_backoff_base() -> String {
    "25ms".into()
}

fn default_backoff_max() -> String {
    "250ms".into()
}

/// Retries may add at most `percent` % of the requests of the last `window`, plus
/// `minRetriesPerSecond` so that low-traffic services can still retry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    /// Default 20.
    #[serde(default = "default_budget_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub percent: u32,
    /// Default 10.
    #[serde(default = "default_min_retries")]
    #[schemars(range(min = 0, max = 100000))]
    pub min_retries_per_second: u32,
    /// Default 10s.
    #[serde(default = "default_budget_window")]
    #[schemars(regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub window: String,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            percent: default_budget_percent(),
            min_retries_per_second: default_min_retries(),
            window: default_budget_window(),
        }
    }
}

fn default_budget_percent() -> u32 {
    20
}

fn default_min_retries() -> u32 {
    10
}

fn default_budget_window() -> String {
    "10s".into()
}

/// A per-backend breaker: closed → open after `consecutiveFailures`; open fails fast with 503
/// for `openDuration` (doubling with each re-open, up to `maxOpenDuration`); then half-open lets
/// `halfOpenRequests` probes through and closes after `successThreshold` successes in a row.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreaker {
    /// Default 5.
    #[serde(default = "default_consecutive")]
    #[schemars(range(min = 1, max = 100000))]
    pub consecutive_failures: u32,
    /// Default 10s.
    #[serde(default = "default_open")]
    #[schemars(regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub open_duration: String,
    /// Default 5m.
    #[serde(default = "default_max_open")]
    #[schemars(regex(pattern = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"))]
    pub max_open_duration: String,
    /// Probes allowed at once while half-open. Default 1.
    #[serde(default = "default_probes")]
    #[schemars(range(min = 1, max = 1000))]
    pub half_open_requests: u32,
    /// Successful probes in a row that close the breaker. Default 3.
    #[serde(default = "default_success")]
    #[schemars(range(min = 1, max = 1000))]
    pub success_threshold: u32,
}

fn default_consecutive() -> u32 {
    5
}
fn default_open() -> String {
    "10s".into()
}
fn default_max_open() -> String {
    "5m".into()
}
fn default_probes() -> u32 {
    1
}
fn default_success() -> u32 {
    3
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResiliencePolicyStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

pub(crate) fn positive_duration(field: &str, value: &str) -> Result<std::time::Duration, FieldError> {
    let d = duration::parse(value).map_err(|e| FieldError::new(field, e.to_string()))?;
    if d.is_zero() {
        return Err(FieldError::new(field, "must be greater than 0"));
    }
    Ok(d)
}

pub(crate) fn percent(field: &str, p: f64) -> Result<(), FieldError> {
    if (0.0..=100.0).contains(&p) { Ok(()) } else { Err(FieldError::new(field, "must be between 0 and 100")) }
}

pub(crate) fn http_header_name(field: &str, name: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if ok { Ok(()) } else { Err(FieldError::new(field, format!("{name:?} is not a valid header name"))) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> ResiliencePolicySpec {
        crate::validate::from_yaml(serde_yaml::from_str(yaml).unwrap(), "spec").unwrap()
    }

    #[test]
    fn defaults_are_documented_values() {
        let s = spec("targetRef: {service: web}\nretries: {}\ncircuitBreaker: {}\n");
        s.validate().unwrap();
        let r = s.retries.unwrap();
        assert_eq!(r.attempts, 2);
        assert_eq!(r.retry_on, ["gateway-error", "connect-failure", "reset"]);
        assert_eq!((r.backoff.base.as_str(), r.backoff.max.as_str()), ("25ms", "250ms"));
        assert_eq!((r.budget.percent, r.budget.min_retries_per_second), (20, 10));
        let cb = s.circuit_breaker.unwrap();
        assert_eq!((cb.consecutive_failures, cb.half_open_requests, cb.success_threshold), (5, 1, 3));
    }

    #[test]
    fn rate_limit_algorithms_parse() {
        let s = spec(
            "targetRef: {service: web}\nrateLimit: {requestsPerSecond: 5, algorithm: SlidingWindow, window: 10s}\n",
        );
        s.validate().unwrap();
        let r = s.rate_limit.unwrap();
        assert_eq!((r.algorithm, r.window.as_deref()), (RateLimitAlgorithm::SlidingWindow, Some("10s")));
        let s =
            spec("targetRef: {service: web}\nrateLimit: {requestsPerSecond: 5, algorithm: LeakyBucket, burst: 20}\n");
        s.validate().unwrap();
        assert_eq!(s.rate_limit.unwrap().algorithm, RateLimitAlgorithm::LeakyBucket);
        assert_eq!(
            spec("targetRef: {service: web}\nrateLimit: {requestsPerSecond: 5}\n").rate_limit.unwrap().algorithm,
            RateLimitAlgorithm::TokenBucket
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            ("targetRef: {service: web}\ntimeouts: {request: 1s, perTry: 2s}\n", "spec.timeouts.perTry"),
            ("targetRef: {service: web}\ntimeouts: {request: 0s}\n", "spec.timeouts.request"),
            ("targetRef: {service: web}\nretries: {retryOn: [5xx, teapot]}\n", "spec.retries.retryOn[1]"),
            ("targetRef: {service: web}\nretries: {retryOn: ['999']}\n", "spec.retries.retryOn[0]"),
            ("targetRef: {service: web}\nretries: {budget: {percent: 150}}\n", "spec.retries.budget.percent"),
            ("targetRef: {service: web}\nretries: {backoff: {base: 1s, max: 10ms}}\n", "spec.retries.backoff.max"),
            (
                "targetRef: {service: web}\ncircuitBreaker: {consecutiveFailures: 0}\n",
                "spec.circuitBreaker.consecutiveFailures",
            ),
            ("targetRef: {service: web, port: 70000}\n", "spec.targetRef.port"),
            (
                "targetRef: {service: web}\nfaults: {abort: {httpStatus: 503, percent: 120}}\n",
                "spec.faults.abort.percent",
            ),
            (
                "targetRef: {service: web}\nfaults: {abort: {grpcStatus: nope, percent: 1}}\n",
                "spec.faults.abort.grpcStatus",
            ),
            ("targetRef: {service: web}\nfaults: {abort: {percent: 1}}\n", "spec.faults.abort"),
            ("targetRef: {service: web}\nrateLimit: {requestsPerSecond: 0}\n", "spec.rateLimit.requestsPerSecond"),
            ("targetRef: {service: web}\nrateLimit: {requestsPerSecond: 5, key: {}}\n", "spec.rateLimit.key"),
            (
                "targetRef: {service: web}\nrateLimit: {requestsPerSecond: 5, key: {clientIdentity: true}}\n",
                "spec.rateLimit.key.clientIdentity",
            ),
            (
                "targetRef: {service: web}\nrateLimit: {requestsPerSecond: 5, direction: Inbound, key: {clientIdentity: true, sourceIp: true}}\n",
                "spec.rateLimit.key",
            ),
            ("targetRef: {service: web}\nrateLimit: {requestsPerSecond: 5, window: 2s}\n", "spec.rateLimit.window"),
            (
                "targetRef: {service: web}\nrateLimit: {requestsPerSecond: 5, algorithm: SlidingWindow, window: 100ms}\n",
                "spec.rateLimit.window",
            ),
            (
                "targetRef: {service: web}\nrateLimit: {requestsPerSecond: 5, algorithm: SlidingWindow, window: 2h}\n",
                "spec.rateLimit.window",
            ),
            ("targetRef: {service: web}\nbulkhead: {maxInFlight: 0}\n", "spec.bulkhead.maxInFlight"),
            ("targetRef: {service: web}\nloadBalancer: {algorithm: RingHash}\n", "spec.loadBalancer.hashKey"),
            ("targetRef: {service: web}\nhealthCheck: {path: healthz}\n", "spec.healthCheck.path"),
            (
                "targetRef: {service: web}\nloadBalancer: {algorithm: Random, hashKey: {header: x}}\n",
                "spec.loadBalancer.hashKey",
            ),
            (
                "targetRef: {service: web}\noutlierDetection: {maxEjectedPercent: 101}\n",
                "spec.outlierDetection.maxEjectedPercent",
            ),
        ];
        for (yaml, field) in cases {
            assert_eq!(spec(yaml).validate().unwrap_err().field, field, "{yaml}");
        }
        let err = crate::validate::from_yaml::<ResiliencePolicySpec>(
            serde_yaml::from_str("targetRef: {service: web}\nretries: {attempts: -1}\n").unwrap(),
            "spec",
        )
        .unwrap_err();
        assert_eq!(err.field, "spec.retries.attempts");
    }
}
