//! State that resilience policies keep between requests and across snapshot swaps: retry
//! budgets (per policy) and circuit breakers (per policy and backend).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::config::{BreakerPolicy, BudgetPolicy};

/// Most budgets and breakers kept; keys come from configuration, this is a backstop.
const MAX_ENTRIES: usize = 10_000;

#[derive(Clone)]
pub struct ResilienceMetrics {
    pub retries: IntCounterVec,
    pub budget_exhausted: IntCounterVec,
    pub retries_skipped: IntCounterVec,
    pub circuit_state: IntGaugeVec,
    pub circuit_transitions: IntCounterVec,
    pub circuit_rejected: IntCounterVec,
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
        }
    }
}

/// Retries may add `percent` % of the requests seen in the last `window`, plus
/// `min_per_second` × window, so an outage is never multiplied by retries.
pub struct RetryBudget {
    policy: BudgetPolicy,
    /// Buckets of (start, requests, retries), one per tenth of the window.
    buckets: Mutex<VecDeque<(Instant, u64, u64)>>,
}

impl RetryBudget {
    fn new(policy: BudgetPolicy) -> Self {
        Self { policy, buckets: Mutex::new(VecDeque::new()) }
    }

    fn current<'a>(&self, b: &'a mut VecDeque<(Instant, u64, u64)>, now: Instant) -> &'a mut (Instant, u64, u64) {
        let slot = self.policy.window / 10;
        while b.front().is_some_and(|(start, _, _)| now.saturating_duration_since(*start) >= self.policy.window) {
            b.pop_front();
        }
        if b.back().is_none_or(|(start, _, _)| now.saturating_duration_since(*start) >= slot) {
            b.push_back((now, 0, 0));
        }
        b.back_mut().expect("just pushed")
    }

    /// Counts an original request.
    pub fn deposit(&self) {
        let mut b = self.buckets.lock().unwrap();
        self.current(&mut b, Instant::now()).1 += 1;
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw(&self) -> bool {
        let mut b = self.buckets.lock().unwrap();
        self.current(&mut b, Instant::now());
        let (requests, retries) = b.iter().fold((0, 0), |(q, r), (_, bq, br)| (q + bq, r + br));
        let floor = f64::from(self.policy.min_per_second) * self.policy.window.as_secs_f64();
        let allowed = floor + requests as f64 * f64::from(self.policy.percent) / 100.0;
        if (retries as f64) < allowed.floor() {
            b.back_mut().expect("current bucket").2 += 1;
            true
        } else {
            false
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probes: u32, successes: u32 },
}

/// A per-backend circuit breaker.
pub struct Breaker {
    policy: BreakerPolicy,
    state: Mutex<(State, u32)>,
    gauge: prometheus::IntGauge,
    transitions: IntCounterVec,
    labels: [String; 2],
}

/// Permission to send one request through a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    Normal,
    Probe,
}

impl Breaker {
    /// `Err(())` while the circuit is open (or half-open with every probe slot taken).
    #[allow(clippy::result_unit_err)]
    pub fn acquire(&self) -> Result<Permit, ()> {
        let mut g = self.state.lock().unwrap();
        let now = Instant::now();
        if let State::Open { until } = g.0
            && now >= until
        {
            self.enter(&mut g, State::HalfOpen { probes: 0, successes: 0 });
        }
        match &mut g.0 {
            State::Closed { .. } => Ok(Permit::Normal),
            State::Open { .. } => Err(()),
            State::HalfOpen { probes, .. } if *probes < self.policy.half_open_requests => {
                *probes += 1;
                Ok(Permit::Probe)
            }
            State::HalfOpen { .. } => Err(()),
        }
    }

    /// Records how a request let through by `permit` ended.
    pub fn record(&self, permit: Permit, success: bool) {
        let mut g = self.state.lock().unwrap();
        match (g.0, permit) {
            (State::Closed { .. }, _) if success => g.0 = State::Closed { failures: 0 },
            (State::Closed { failures }, _) => {
                if failures + 1 >= self.policy.consecutive_failures {
                    self.open(&mut g);
                } else {
                    g.0 = State::Closed { failures: failures + 1 };
                }
            }
            (State::HalfOpen { probes, successes }, Permit::Probe) => {
                let probes = probes.saturating_sub(1);
                if !success {
                    self.open(&mut g);
                } else if successes + 1 >= self.policy.success_threshold {
                    g.1 = 0;
                    self.enter(&mut g, State::Closed { failures: 0 });
                } else {
                    g.0 = State::HalfOpen { probes, successes: successes + 1 };
                }
            }
            // Requests that started before the circuit opened say nothing about now.
            _ => {}
        }
    }

    /// Opens for `open × 2^(times opened in a row)`, capped at `max_open`.
    fn open(&self, g: &mut (State, u32)) {
        let factor = 1u32 << g.1.min(16);
        let d = self.policy.open.saturating_mul(factor).min(self.policy.max_open);
        g.1 = g.1.saturating_add(1);
        self.enter(g, State::Open { until: Instant::now() + d });
    }

    fn enter(&self, g: &mut (State, u32), s: State) {
        g.0 = s;
        let (value, name) = match s {
            State::Closed { .. } => (0, "closed"),
            State::Open { .. } => (1, "open"),
            State::HalfOpen { .. } => (2, "half-open"),
        };
        self.gauge.set(value);
        self.transitions.with_label_values(&[&self.labels[0], &self.labels[1], name]).inc();
    }
}

/// Breakers by (policy, backend).
type BreakerMap = HashMap<(Arc<str>, Arc<str>), Arc<Breaker>>;

/// Budgets and breakers, shared by every request and kept across snapshots.
#[derive(Clone)]
pub struct Resilience {
    pub metrics: ResilienceMetrics,
    budgets: Arc<Mutex<HashMap<Arc<str>, Arc<RetryBudget>>>>,
    breakers: Arc<Mutex<BreakerMap>>,
}

impl Resilience {
    pub fn new(metrics: ResilienceMetrics) -> Self {
        Self { metrics, budgets: Arc::default(), breakers: Arc::default() }
    }

    /// The budget of policy `name`; a changed budget policy starts a fresh budget.
    pub fn budget(&self, name: &Arc<str>, policy: BudgetPolicy) -> Arc<RetryBudget> {
        let mut g = self.budgets.lock().unwrap();
        if let Some(b) = g.get(name)
            && b.policy == policy
        {
            return b.clone();
        }
        if g.len() >= MAX_ENTRIES {
            g.clear();
        }
        let b = Arc::new(RetryBudget::new(policy));
        g.insert(name.clone(), b.clone());
        b
    }

    /// The breaker of `backend` under policy `name`; a changed breaker policy starts closed.
    pub fn breaker(&self, name: &Arc<str>, service: &str, backend: &Arc<str>, policy: BreakerPolicy) -> Arc<Breaker> {
        let mut g = self.breakers.lock().unwrap();
        let key = (name.clone(), backend.clone());
        if let Some(b) = g.get(&key)
            && b.policy == policy
        {
            return b.clone();
        }
        if g.len() >= MAX_ENTRIES {
            g.clear();
        }
        let gauge = self.metrics.circuit_state.with_label_values(&[service, backend]);
        gauge.set(0);
        let b = Arc::new(Breaker {
            policy,
            state: Mutex::new((State::Closed { failures: 0 }, 0)),
            gauge,
            transitions: self.metrics.circuit_transitions.clone(),
            labels: [service.to_string(), backend.to_string()],
        });
        g.insert(key, b.clone());
        b
    }

    /// Forgets budgets and breakers of policies no longer configured.
    pub fn retain(&self, live: &std::collections::HashSet<Arc<str>>) {
        self.budgets.lock().unwrap().retain(|k, _| live.contains(k));
        self.breakers.lock().unwrap().retain(|(k, _), _| live.contains(k));
    }
}

/// Full-jitter exponential back-off before retry number `n` (1-based).
pub fn backoff(n: u32, base: Duration, max: Duration) -> Duration {
    let cap = base.saturating_mul(1u32 << n.saturating_sub(1).min(16)).min(max);
    cap.mul_f64(rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resilience() -> Resilience {
        Resilience::new(ResilienceMetrics::register(&Registry::new()))
    }

    #[test]
    fn budget_allows_percent_of_requests_plus_floor() {
        let r = resilience();
        let b =
            r.budget(&"ns/p".into(), BudgetPolicy { percent: 20, min_per_second: 0, window: Duration::from_secs(10) });
        for _ in 0..100 {
            b.deposit();
        }
        let granted = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 20);
        let floor =
            r.budget(&"ns/q".into(), BudgetPolicy { percent: 0, min_per_second: 2, window: Duration::from_secs(5) });
        assert_eq!((0..100).filter(|_| floor.withdraw()).count(), 10);
    }

    #[test]
    fn breaker_opens_fails_fast_probes_and_closes() {
        let r = resilience();
        let policy = BreakerPolicy {
            consecutive_failures: 3,
            open: Duration::from_millis(20),
            max_open: Duration::from_secs(1),
            half_open_requests: 1,
            success_threshold: 2,
        };
        let b = r.breaker(&"ns/p".into(), "ns/web", &"ns/web".into(), policy);
        for _ in 0..3 {
            let p = b.acquire().unwrap();
            b.record(p, false);
        }
        assert!(b.acquire().is_err(), "open after 3 failures");
        std::thread::sleep(Duration::from_millis(25));
        let probe = b.acquire().unwrap();
        assert_eq!(probe, Permit::Probe);
        assert!(b.acquire().is_err(), "one probe at a time");
        b.record(probe, true);
        let probe = b.acquire().unwrap();
        b.record(probe, true);
        assert_eq!(b.acquire().unwrap(), Permit::Normal, "closed after 2 successes");
        assert_eq!(r.metrics.circuit_state.with_label_values(&["ns/web", "ns/web"]).get(), 0);
    }

    #[test]
    fn reopening_doubles_the_open_time() {
        let r = resilience();
        let policy = BreakerPolicy {
            consecutive_failures: 1,
            open: Duration::from_millis(10),
            max_open: Duration::from_secs(5),
            half_open_requests: 1,
            success_threshold: 1,
        };
        let b = r.breaker(&"ns/p".into(), "s", &"b".into(), policy);
        b.record(b.acquire().unwrap(), false);
        std::thread::sleep(Duration::from_millis(12));
        let probe = b.acquire().unwrap();
        b.record(probe, false); // re-open for 20 ms
        std::thread::sleep(Duration::from_millis(12));
        assert!(b.acquire().is_err(), "second opening lasts longer");
    }

    #[test]
    fn backoff_is_bounded() {
        for n in 1..20 {
            assert!(backoff(n, Duration::from_millis(25), Duration::from_millis(250)) <= Duration::from_millis(250));
        }
    }
}
