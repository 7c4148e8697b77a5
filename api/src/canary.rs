//! The `Canary` resource: a progressive rollout from a stable Service to a canary Service,
//! analysed every interval from the sidecars' own traffic reports.
//!
//! ```yaml
//! apiVersion: weir.io/v1alpha1
//! kind: Canary
//! metadata: { name: reviews, namespace: shop }
//! spec:
//!   service: reviews          # what clients call
//!   stable: reviews-v1        # Service of the version in production
//!   canary: reviews-v2        # Service of the new version
//!   steps: [10, 25, 50]       # canary weights in turn (or stepWeight: 10, maxWeight: 50)
//!   interval: 30s
//!   analysis:
//!     minSuccessRate: 99      # percent, of the canary's requests in the interval
//!     maxP99: 500ms           # the canary's p99 latency in the interval
//!     minRequests: 20         # fewer canary requests than this: inconclusive, hold
//!     failureLimit: 2         # failed intervals before rolling back
//!   abTest:                   # optional first stage: only matching requests go to the canary
//!     headers: [{ name: x-beta, value: "1" }]
//!     intervals: 2
//!   forceHeader: { name: x-canary, value: always }   # testers reach the canary at any weight
//!   autoPromote: true         # false: hold at the last step until `weir canary promote`
//! ```

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::route::{NamedValueMatch, ValueMatchType};
use crate::validate::{FieldError, dns_label};

/// A progressive rollout of `canary` next to `stable` for the clients of `service`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "weir.io",
    version = "v1alpha1",
    kind = "Canary",
    namespaced,
    status = "CanaryStatus",
    shortname = "wcan",
    category = "weir",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Weight","type":"integer","jsonPath":".status.weight"}"#,
    printcolumn = r#"{"name":"Success","type":"string","jsonPath":".status.lastAnalysis.canary.successRate"}"#,
    printcolumn = r#"{"name":"P99","type":"string","jsonPath":".status.lastAnalysis.canary.p99"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct CanarySpec {
    /// The Service (in the Canary's namespace) whose clients the rollout concerns.
    #[schemars(length(min = 1, max = 63))]
    pub service: String,
    /// The Service serving the version in production.
    #[schemars(length(min = 1, max = 63))]
    pub stable: String,
    /// The Service serving the new version.
    #[schemars(length(min = 1, max = 63))]
    pub canary: String,
    /// Canary weights in percent, increasing; the last one is held before promotion.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub steps: Vec<u32>,
    /// Instead of `steps`: `stepWeight`, 2×, 3×… up to `maxWeight` (default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub step_weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub max_weight: Option<u32>,
    /// Time between analyses (and steps). Default 1m.
    #[serde(default = "default_interval")]
    pub interval: String,
    #[serde(default)]
    pub analysis: Analysis,
    /// An optional first stage in which only matching requests reach the canary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ab_test: Option<AbTest>,
    /// Requests with this header go to the canary at any weight (for testers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_header: Option<ForceHeader>,
    /// Advance every interval without judging the metrics.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip_analysis: bool,
    /// Promote after the last step passes (default); false holds there until promoted by hand.
    #[serde(default = "yes")]
    pub auto_promote: bool,
    /// Holds the rollout where it is (weights included) until set back to false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Analysis {
    /// Lowest acceptable success rate (percent, non-5xx) of the canary's requests in an interval.
    #[serde(default = "default_success_rate")]
    pub min_success_rate: f64,
    /// Highest acceptable p99 latency of the canary's requests in an interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99: Option<String>,
    /// Fewer canary requests than this in an interval is inconclusive: hold, neither pass nor fail.
    #[serde(default = "default_min_requests")]
    #[schemars(range(min = 1))]
    pub min_requests: u64,
    /// Failed intervals before the canary is rolled back.
    #[serde(default = "default_failure_limit")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_limit: u32,
}

impl Default for Analysis {
    fn default() -> Self {
        Self {
            min_success_rate: default_success_rate(),
            max_p99: None,
            min_requests: default_min_requests(),
            failure_limit: default_failure_limit(),
        }
    }
}

/// The A/B stage: requests matching any header (or the cookie) go to the canary, others to
/// stable, for `intervals` analysis intervals before the weighted steps begin.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AbTest {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<NamedValueMatch>,
    /// A cookie `name=value` the request must carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1000))]
    pub intervals: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ForceHeader {
    pub name: String,
    pub value: String,
}

/// Where a canary is; written by the controller (Kubernetes status, local-mode state file).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanaryStatus {
    #[serde(default)]
    pub phase: Phase,
    /// Percent of traffic the canary receives now.
    #[serde(default)]
    pub weight: u32,
    /// Index of the current step in the expanded steps (0-based).
    #[serde(default)]
    pub step: u32,
    /// The expanded steps.
    #[serde(default)]
    pub steps: Vec<u32>,
    /// A/B intervals passed (when the spec has an A/B stage).
    #[serde(default)]
    pub ab_intervals: u32,
    /// Failed intervals so far.
    #[serde(default)]
    pub failed_intervals: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_analysis: Option<AnalysisResult>,
    /// The most recent transitions, oldest first (at most 32).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Transition>,
    /// Fingerprint of what this rollout rolls out (service, stable, canary): a change starts a
    /// new rollout; other edits apply in place.
    #[serde(default)]
    pub spec_hash: String,
    /// The phase a paused rollout returns to, and whether `spec.paused` (rather than a manual
    /// pause) holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_from: Option<Phase>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused_by_spec: bool,
    /// The last manual control handled (Kubernetes mode: the value of the Canary's
    /// `weir.io/request` annotation, `ACTION:ID`), and what became of it (`applied`, or
    /// `refused: why`). A request is handled once, by the leading replica.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub handled_request: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request_result: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The annotation through which `weir canary promote|abort|pause|resume` asks the leading
/// controller for a manual control in Kubernetes mode: `ACTION:ID` (a new ID per request), so
/// who may ask is whoever Kubernetes RBAC lets patch the Canary.
pub const REQUEST_ANNOTATION: &str = "weir.io/request";

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    #[default]
    Initializing,
    Progressing,
    /// Too little canary traffic to judge: holding at the current step.
    Inconclusive,
    /// The last step passed; waiting for a manual promote.
    Holding,
    Paused,
    Promoting,
    Succeeded,
    Failed,
}

impl Phase {
    pub const ALL: [Phase; 8] = [
        Phase::Initializing,
        Phase::Progressing,
        Phase::Inconclusive,
        Phase::Holding,
        Phase::Paused,
        Phase::Promoting,
        Phase::Succeeded,
        Phase::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Initializing => "Initializing",
            Phase::Progressing => "Progressing",
            Phase::Inconclusive => "Inconclusive",
            Phase::Holding => "Holding",
            Phase::Paused => "Paused",
            Phase::Promoting => "Promoting",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
}

/// One interval's measurements.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisResult {
    pub at_unix_ms: u64,
    pub canary: BackendMetrics,
    pub stable: BackendMetrics,
    /// `pass`, `fail` or `inconclusive`.
    pub verdict: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendMetrics {
    pub requests: u64,
    /// Percent of non-5xx responses; absent without requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<f64>,
    /// p99 latency in milliseconds (upper bound of its histogram bucket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Transition {
    pub at_unix_ms: u64,
    pub phase: Phase,
    pub weight: u32,
    pub reason: String,
}

fn default_interval() -> String {
    "1m".into()
}
fn default_success_rate() -> f64 {
    99.0
}
fn default_min_requests() -> u64 {
    10
}
fn default_failure_limit() -> u32 {
    2
}
fn yes() -> bool {
    true
}
fn one() -> u32 {
    1
}

impl CanarySpec {
    /// The canary weights in turn: `steps`, or `stepWeight` multiples up to `maxWeight`.
    pub fn expanded_steps(&self) -> Vec<u32> {
        if !self.steps.is_empty() {
            return self.steps.clone();
        }
        let max = self.max_weight.unwrap_or(50).clamp(1, 100);
        let step = self.step_weight.unwrap_or(10).clamp(1, max);
        (1..).map(|i| i * step).take_while(|w| *w <= max).collect()
    }

    pub fn interval(&self) -> std::time::Duration {
        crate::duration::parse(&self.interval).unwrap_or(std::time::Duration::from_secs(60))
    }

    pub fn max_p99(&self) -> Option<std::time::Duration> {
        self.analysis.max_p99.as_deref().and_then(|d| crate::duration::parse(d).ok())
    }

    /// Checks what the schema cannot: names, steps, durations, percentages, header matches.
    pub fn validate(&self) -> Result<(), FieldError> {
        dns_label("spec.service", &self.service)?;
        dns_label("spec.stable", &self.stable)?;
        dns_label("spec.canary", &self.canary)?;
        if self.stable == self.canary {
            return Err(FieldError::new("spec.canary", "must differ from spec.stable"));
        }
        // The stable version may be the Service's own endpoints; the canary may not.
        if self.canary == self.service {
            return Err(FieldError::new("spec.canary", "must differ from spec.service"));
        }
        if !self.steps.is_empty() && (self.step_weight.is_some() || self.max_weight.is_some()) {
            return Err(FieldError::new("spec.steps", "give either steps or stepWeight/maxWeight, not both"));
        }
        for (i, w) in self.steps.iter().enumerate() {
            if !(1..=100).contains(w) {
                return Err(FieldError::new(format!("spec.steps[{i}]"), "must be between 1 and 100"));
            }
            if i > 0 && *w <= self.steps[i - 1] {
                return Err(FieldError::new(format!("spec.steps[{i}]"), "steps must increase"));
            }
        }
        for (field, v) in [("spec.stepWeight", self.step_weight), ("spec.maxWeight", self.max_weight)] {
            if let Some(v) = v
                && !(1..=100).contains(&v)
            {
                return Err(FieldError::new(field, "must be between 1 and 100"));
            }
        }
        if let (Some(s), Some(m)) = (self.step_weight, self.max_weight)
            && m < s
        {
            return Err(FieldError::new("spec.maxWeight", "must be at least stepWeight"));
        }
        let interval = crate::resilience::positive_duration("spec.interval", &self.interval)?;
        // Sidecars report every few seconds by default (500ms in tests): an interval shorter
        // than a second would mostly see no data.
        if interval < std::time::Duration::from_secs(1) {
            return Err(FieldError::new("spec.interval", "must be at least 1s (and a few sidecar report intervals)"));
        }
        crate::resilience::percent("spec.analysis.minSuccessRate", self.analysis.min_success_rate)?;
        if let Some(p) = &self.analysis.max_p99 {
            crate::resilience::positive_duration("spec.analysis.maxP99", p)?;
        }
        if self.analysis.min_requests == 0 {
            return Err(FieldError::new("spec.analysis.minRequests", "must be at least 1"));
        }
        if self.analysis.failure_limit == 0 {
            return Err(FieldError::new("spec.analysis.failureLimit", "must be at least 1"));
        }
        if let Some(ab) = &self.ab_test {
            if ab.headers.is_empty() && ab.cookie.is_none() {
                return Err(FieldError::new("spec.abTest", "give headers or a cookie to match"));
            }
            for (i, h) in ab.headers.iter().enumerate() {
                crate::resilience::http_header_name(&format!("spec.abTest.headers[{i}].name"), &h.name)?;
                if h.kind == ValueMatchType::RegularExpression {
                    crate::route::check_regex(&format!("spec.abTest.headers[{i}].value"), &h.value)?;
                }
            }
            if let Some(c) = &ab.cookie
                && c.split_once('=').is_none_or(|(n, _)| n.is_empty() || n.contains([';', ' ']))
            {
                return Err(FieldError::new("spec.abTest.cookie", format!("{c:?} is not name=value")));
            }
            if ab.intervals == 0 {
                return Err(FieldError::new("spec.abTest.intervals", "must be at least 1"));
            }
        }
        if let Some(f) = &self.force_header {
            crate::resilience::http_header_name("spec.forceHeader.name", &f.name)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> Result<CanarySpec, FieldError> {
        let v: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
        let s: CanarySpec = crate::validate::from_yaml(v, "spec")?;
        s.validate()?;
        Ok(s)
    }

    const BASE: &str = "service: web\nstable: web-v1\ncanary: web-v2\n";

    #[test]
    fn steps_expand_and_defaults_hold() {
        let s = spec(BASE).unwrap();
        assert_eq!(s.expanded_steps(), vec![10, 20, 30, 40, 50]);
        assert!(s.auto_promote);
        assert_eq!(s.analysis.failure_limit, 2);
        assert_eq!(s.interval(), std::time::Duration::from_secs(60));
        let s = spec(&format!("{BASE}stepWeight: 30\nmaxWeight: 100\n")).unwrap();
        assert_eq!(s.expanded_steps(), vec![30, 60, 90]);
        let s = spec(&format!("{BASE}maxWeight: 5\n")).unwrap();
        assert_eq!(s.expanded_steps(), vec![5]);
        let s = spec(&format!("{BASE}steps: [5, 50]\n")).unwrap();
        assert_eq!(s.expanded_steps(), vec![5, 50]);
    }

    #[test]
    fn bad_values_name_their_field() {
        for (extra, field) in [
            ("steps: [50, 10]\n", "spec.steps[1]"),
            ("steps: [0]\n", "spec.steps[0]"),
            ("steps: [10]\nstepWeight: 10\n", "spec.steps"),
            ("interval: 500ms\n", "spec.interval"),
            ("interval: soon\n", "spec.interval"),
            ("analysis: { minSuccessRate: 120 }\n", "spec.analysis.minSuccessRate"),
            ("analysis: { failureLimit: 0 }\n", "spec.analysis.failureLimit"),
            ("analysis: { maxP99: fast }\n", "spec.analysis.maxP99"),
            ("abTest: { intervals: 1 }\n", "spec.abTest"),
            ("abTest: { cookie: novalue }\n", "spec.abTest.cookie"),
            ("stepWeight: 40\nmaxWeight: 20\n", "spec.maxWeight"),
        ] {
            let e = spec(&format!("{BASE}{extra}")).unwrap_err();
            assert_eq!(e.field, field, "{extra}: {e}");
        }
        let e = spec("service: web\nstable: a\ncanary: a\n").unwrap_err();
        assert_eq!(e.field, "spec.canary");
    }
}
