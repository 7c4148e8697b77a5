//! State that resilience policies keep between requests and across snapshot swaps: retry
//! budgets (per policy) and circuit breakers (per policy and backend).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use prometheus::IntCounterVec;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{
    BreakerPolicy, BudgetPolicy, BulkheadPolicy, Endpoint, OutlierPolicy, RateAlgorithm, RateLimitPolicy,
};
use crate::metrics::ResilienceMetrics;

/// Most budgets and breakers kept; keys come from configuration, this is a backstop.
const MAX_ENTRIES: usize = 10_000;

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

/// One request let through a breaker. Its result must be recorded; dropped unrecorded (a
/// request cancelled by the request timeout or the client), a half-open probe gives its slot
/// back so the breaker never waits on a lost probe.
pub struct BreakerPass {
    breaker: Arc<Breaker>,
    permit: Permit,
    recorded: bool,
}

impl BreakerPass {
    pub fn new(breaker: Arc<Breaker>, permit: Permit) -> Self {
        Self { breaker, permit, recorded: false }
    }

    /// Records how the request ended (see [`Breaker::record`]).
    pub fn record(mut self, success: bool) {
        self.recorded = true;
        self.breaker.record(self.permit, success);
    }
}

impl Drop for BreakerPass {
    fn drop(&mut self) {
        if !self.recorded && self.permit == Permit::Probe {
            self.breaker.release_probe();
        }
    }
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

    /// Gives back a half-open probe slot whose request ended without a verdict (cancelled by
    /// the request timeout or the client), so the breaker never waits on a lost probe.
    fn release_probe(&self) {
        let mut g = self.state.lock().unwrap();
        if let State::HalfOpen { probes, successes } = g.0 {
            g.0 = State::HalfOpen { probes: probes.saturating_sub(1), successes };
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

/// A per-backend concurrency limit: `max_in_flight` slots, up to `max_pending` requests
/// waiting at most `pending_timeout` for one.
pub struct Bulkhead {
    policy: BulkheadPolicy,
    slots: Arc<Semaphore>,
    pending: AtomicU32,
}

impl Bulkhead {
    fn new(policy: BulkheadPolicy) -> Self {
        Self { policy, slots: Arc::new(Semaphore::new(policy.max_in_flight as usize)), pending: AtomicU32::new(0) }
    }

    /// A slot, held until the response has been fully sent; `Err` when full.
    #[allow(clippy::result_unit_err)]
    pub async fn acquire(&self) -> Result<OwnedSemaphorePermit, ()> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Ok(p);
        }
        // Counted out again when this scope ends, also if the waiting request is cancelled.
        struct Waiting<'a>(&'a AtomicU32);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let waiting = Waiting(&self.pending);
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.policy.max_pending {
            return Err(());
        }
        let waited = tokio::time::timeout(self.policy.pending_timeout, self.slots.clone().acquire_owned()).await;
        drop(waiting);
        match waited {
            Ok(Ok(p)) => Ok(p),
            _ => Err(()),
        }
    }
}

/// The bucket key of a request under `key`.
pub fn rate_key(
    key: &crate::config::RateKey,
    headers: &http::HeaderMap,
    client: SocketAddr,
    identity: Option<&str>,
) -> String {
    match key {
        crate::config::RateKey::Whole => String::new(),
        crate::config::RateKey::Header(h) => headers.get(h).and_then(|v| v.to_str().ok()).unwrap_or("").to_string(),
        crate::config::RateKey::SourceIp => client.ip().to_string(),
        crate::config::RateKey::ClientIdentity => identity.unwrap_or("").to_string(),
    }
}

/// Rate limits, one counter per key, in a table of bounded size; counted as the policy's
/// [`RateAlgorithm`] says.
pub struct RateLimiter {
    policy: RateLimitPolicy,
    keys: Mutex<HashMap<String, Counter>>,
}

/// One key's counter, and when it was last used (the least recently used key is forgotten
/// when the table is full).
struct Counter {
    used: Instant,
    state: Count,
}

enum Count {
    /// Tokens left as of `used`.
    Bucket(f64),
    /// The current window's start and count, and the previous window's count.
    Window { length: Duration, start: Instant, current: u32, previous: u32 },
    /// When the next request may leave.
    Leaky { next: Instant },
}

impl RateLimiter {
    fn new(policy: RateLimitPolicy) -> Self {
        Self { policy, keys: Mutex::new(HashMap::new()) }
    }

    /// Counts a request for `key`: `Ok(wait)` admits it, to go on after `wait` (zero but
    /// behind a leaky bucket's queue); `Err(retry_after)` refuses it.
    pub fn check(&self, key: &str) -> Result<Duration, Duration> {
        self.check_at(key, Instant::now())
    }

    fn check_at(&self, key: &str, now: Instant) -> Result<Duration, Duration> {
        let p = &self.policy;
        let rate = f64::from(p.per_second);
        let mut g = self.keys.lock().unwrap();
        if !g.contains_key(key) && g.len() >= p.max_keys as usize {
            // Forget the key used least recently.
            if let Some(oldest) = g.iter().min_by_key(|(_, c)| c.used).map(|(k, _)| k.clone()) {
                g.remove(&oldest);
            }
        }
        let c = g.entry(key.to_string()).or_insert_with(|| Counter {
            used: now,
            state: match p.algorithm {
                RateAlgorithm::TokenBucket => Count::Bucket(f64::from(p.burst)),
                RateAlgorithm::SlidingWindow(length) => Count::Window { length, start: now, current: 0, previous: 0 },
                RateAlgorithm::LeakyBucket => Count::Leaky { next: now },
            },
        });
        let since = now.saturating_duration_since(c.used);
        c.used = now;
        match &mut c.state {
            Count::Bucket(tokens) => {
                *tokens = (*tokens + since.as_secs_f64() * rate).min(f64::from(p.burst));
                if *tokens >= 1.0 {
                    *tokens -= 1.0;
                    Ok(Duration::ZERO)
                } else {
                    Err(Duration::from_secs_f64((1.0 - *tokens) / rate))
                }
            }
            Count::Window { length, start, current, previous } => {
                let w = length.as_nanos();
                let windows = now.saturating_duration_since(*start).as_nanos() / w;
                if windows >= 1 {
                    *previous = if windows == 1 { *current } else { 0 };
                    *current = 0;
                    let into = now.saturating_duration_since(*start).as_nanos() % w;
                    *start = now - Duration::from_nanos(u64::try_from(into).unwrap_or(0));
                }
                let length_s = length.as_secs_f64();
                let into = now.saturating_duration_since(*start).as_secs_f64() / length_s;
                let limit = rate * length_s;
                // The previous window counts for the share of it the sliding window still covers.
                let estimate = f64::from(*previous) * (1.0 - into) + f64::from(*current);
                if estimate + 1.0 <= limit {
                    *current += 1;
                    return Ok(Duration::ZERO);
                }
                // Until enough of the previous window has slid out, or at the latest until this
                // window ends (then the count is this window's, weighted down as it slides).
                let rest = (1.0 - into) * length_s;
                let wait = if *previous > 0 {
                    ((estimate + 1.0 - limit) / f64::from(*previous) * length_s).min(rest)
                } else {
                    rest
                };
                Err(Duration::from_secs_f64(wait.max(0.001)))
            }
            Count::Leaky { next } => {
                let interval = Duration::from_secs_f64(1.0 / rate);
                let leaves = (*next).max(now);
                let wait = leaves - now;
                // Requests queued ahead of this one (each leaves one interval after the last).
                let ahead = wait.as_nanos().div_ceil(interval.as_nanos().max(1));
                if ahead > u128::from(p.burst) {
                    return Err(wait.saturating_sub(interval * p.burst).max(interval));
                }
                *next = leaves + interval;
                Ok(wait)
            }
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Health {
    consecutive: u32,
    window_start: Option<Instant>,
    requests: u32,
    failures: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
}

/// Per-endpoint circuit breaking (outlier ejection) for one backend.
pub struct Outliers {
    policy: OutlierPolicy,
    endpoints: Mutex<HashMap<SocketAddr, Health>>,
    ejections: prometheus::IntCounter,
}

impl Outliers {
    /// The endpoints not ejected now (all of them, should every one be ejected).
    pub fn available<'a>(&self, endpoints: &[&'a Endpoint]) -> Vec<&'a Endpoint> {
        let now = Instant::now();
        let g = self.endpoints.lock().unwrap();
        let ok: Vec<_> = endpoints
            .iter()
            .copied()
            .filter(|e| g.get(&e.addr).and_then(|h| h.ejected_until).is_none_or(|until| now >= until))
            .collect();
        if ok.is_empty() { endpoints.to_vec() } else { ok }
    }

    /// Records an attempt's result on `addr`, ejecting it when it crosses a threshold and the
    /// cap on ejected endpoints (`total` endpoints in the backend) allows.
    pub fn record(&self, addr: SocketAddr, success: bool, total: usize) {
        let now = Instant::now();
        let p = self.policy;
        let mut g = self.endpoints.lock().unwrap();
        let ejected_now = g.values().filter(|h| h.ejected_until.is_some_and(|u| now < u)).count();
        let h = g.entry(addr).or_default();
        if h.window_start.is_none_or(|s| now.saturating_duration_since(s) >= p.window) {
            *h = Health { window_start: Some(now), ..*h };
            h.requests = 0;
            h.failures = 0;
        }
        h.requests += 1;
        if success {
            h.consecutive = 0;
            return;
        }
        h.failures += 1;
        h.consecutive += 1;
        let by_rate = p.failure_rate_percent.is_some_and(|pct| {
            h.requests >= p.min_requests && u64::from(h.failures) * 100 >= u64::from(pct) * u64::from(h.requests)
        });
        let already = h.ejected_until.is_some_and(|u| now < u);
        if already || !(h.consecutive >= p.consecutive_failures || by_rate) {
            return;
        }
        // Never empty a backend: at most max_ejected_percent, at least one, never the last.
        let cap = (total * p.max_ejected_percent as usize / 100).max(1).min(total.saturating_sub(1));
        if ejected_now >= cap {
            return;
        }
        let time = p.base_ejection.saturating_mul(h.ejections + 1).min(p.max_ejection);
        h.ejections += 1;
        h.ejected_until = Some(now + time);
        h.consecutive = 0;
        h.requests = 0;
        h.failures = 0;
        self.ejections.inc();
    }
}

/// Per-backend state, by (policy, backend).
type PerBackend<T> = HashMap<(Arc<str>, Arc<str>), Arc<T>>;

/// Budgets and breakers, shared by every request and kept across snapshots.
#[derive(Clone)]
pub struct Resilience {
    pub metrics: ResilienceMetrics,
    budgets: Arc<Mutex<HashMap<Arc<str>, Arc<RetryBudget>>>>,
    breakers: Arc<Mutex<PerBackend<Breaker>>>,
    bulkheads: Arc<Mutex<PerBackend<Bulkhead>>>,
    limiters: Arc<Mutex<HashMap<Arc<str>, Arc<RateLimiter>>>>,
    outliers: Arc<Mutex<PerBackend<Outliers>>>,
}

/// Gets the entry for `key` from a table, replacing it when its policy changed.
fn get_or_make<K: std::hash::Hash + Eq + Clone, V, P: PartialEq>(
    table: &Mutex<HashMap<K, Arc<V>>>,
    key: K,
    policy: &P,
    policy_of: impl Fn(&V) -> &P,
    make: impl FnOnce() -> V,
) -> Arc<V> {
    let mut g = table.lock().unwrap();
    if let Some(v) = g.get(&key)
        && policy_of(v) == policy
    {
        return v.clone();
    }
    if g.len() >= MAX_ENTRIES {
        g.clear();
    }
    let v = Arc::new(make());
    g.insert(key, v.clone());
    v
}

impl Resilience {
    pub fn new(metrics: ResilienceMetrics) -> Self {
        Self {
            metrics,
            budgets: Arc::default(),
            breakers: Arc::default(),
            bulkheads: Arc::default(),
            limiters: Arc::default(),
            outliers: Arc::default(),
        }
    }

    pub fn bulkhead(&self, name: &Arc<str>, backend: &Arc<str>, policy: BulkheadPolicy) -> Arc<Bulkhead> {
        get_or_make(&self.bulkheads, (name.clone(), backend.clone()), &policy, |b| &b.policy, || Bulkhead::new(policy))
    }

    pub fn limiter(&self, name: &Arc<str>, policy: &RateLimitPolicy) -> Arc<RateLimiter> {
        get_or_make(&self.limiters, name.clone(), policy, |l| &l.policy, || RateLimiter::new(policy.clone()))
    }

    pub fn outliers(&self, name: &Arc<str>, service: &str, backend: &Arc<str>, policy: OutlierPolicy) -> Arc<Outliers> {
        let ejections = self.metrics.ejections.with_label_values(&[service, backend]);
        get_or_make(
            &self.outliers,
            (name.clone(), backend.clone()),
            &policy,
            |o| &o.policy,
            || Outliers { policy, endpoints: Mutex::new(HashMap::new()), ejections },
        )
    }

    /// The budget of policy `name`; a changed budget policy starts a fresh budget.
    pub fn budget(&self, name: &Arc<str>, policy: BudgetPolicy) -> Arc<RetryBudget> {
        get_or_make(&self.budgets, name.clone(), &policy, |b| &b.policy, || RetryBudget::new(policy))
    }

    /// The breaker of `backend` under policy `name`; a changed breaker policy starts closed.
    pub fn breaker(&self, name: &Arc<str>, service: &str, backend: &Arc<str>, policy: BreakerPolicy) -> Arc<Breaker> {
        get_or_make(
            &self.breakers,
            (name.clone(), backend.clone()),
            &policy,
            |b| &b.policy,
            || {
                let gauge = self.metrics.circuit_state.with_label_values(&[service, backend]);
                gauge.set(0);
                Breaker {
                    policy,
                    state: Mutex::new((State::Closed { failures: 0 }, 0)),
                    gauge,
                    transitions: self.metrics.circuit_transitions.clone(),
                    labels: [service.to_string(), backend.to_string()],
                }
            },
        )
    }

    /// Forgets budgets and breakers of policies no longer configured.
    pub fn retain(&self, live: &std::collections::HashSet<Arc<str>>) {
        self.budgets.lock().unwrap().retain(|k, _| live.contains(k));
        self.breakers.lock().unwrap().retain(|(k, _), _| live.contains(k));
        self.bulkheads.lock().unwrap().retain(|(k, _), _| live.contains(k));
        self.limiters.lock().unwrap().retain(|k, _| live.contains(k));
        self.outliers.lock().unwrap().retain(|(k, _), _| live.contains(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resilience() -> Resilience {
        Resilience::new(ResilienceMetrics::register(&prometheus::Registry::new()))
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

    // The breaker tests run on tokio's paused clock: time moves only by `advance`, so an open
    // period ends exactly when it should and never because the machine was slow.
    #[tokio::test(start_paused = true)]
    async fn breaker_opens_fails_fast_probes_and_closes() {
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
        tokio::time::advance(Duration::from_millis(19)).await;
        assert!(b.acquire().is_err(), "still open 1 ms before the open period ends");
        tokio::time::advance(Duration::from_millis(1)).await;
        let probe = b.acquire().unwrap();
        assert_eq!(probe, Permit::Probe);
        assert!(b.acquire().is_err(), "one probe at a time");
        b.record(probe, true);
        let probe = b.acquire().unwrap();
        b.record(probe, true);
        assert_eq!(b.acquire().unwrap(), Permit::Normal, "closed after 2 successes");
        assert_eq!(r.metrics.circuit_state.with_label_values(&["ns/web", "ns/web"]).get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_probe_gives_its_slot_back() {
        let r = resilience();
        let policy = BreakerPolicy {
            consecutive_failures: 1,
            open: Duration::from_millis(5),
            max_open: Duration::from_secs(1),
            half_open_requests: 1,
            success_threshold: 1,
        };
        let b = r.breaker(&"ns/p".into(), "s", &"b".into(), policy);
        b.record(b.acquire().unwrap(), false);
        tokio::time::advance(Duration::from_millis(5)).await;
        let probe = b.acquire().unwrap();
        drop(BreakerPass::new(b.clone(), probe));
        let again = b.acquire().expect("the lost probe's slot is free again");
        BreakerPass::new(b.clone(), again).record(true);
        assert_eq!(b.acquire().unwrap(), Permit::Normal);
    }

    #[tokio::test(start_paused = true)]
    async fn reopening_doubles_the_open_time() {
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
        tokio::time::advance(Duration::from_millis(10)).await;
        let probe = b.acquire().unwrap();
        b.record(probe, false); // re-open for 20 ms
        tokio::time::advance(Duration::from_millis(19)).await;
        assert!(b.acquire().is_err(), "the second opening lasts twice as long");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(b.acquire().unwrap(), Permit::Probe, "and no longer");
    }

    fn limit(per_second: u32, burst: u32, algorithm: RateAlgorithm) -> RateLimiter {
        RateLimiter::new(RateLimitPolicy {
            per_second,
            burst,
            key: crate::config::RateKey::Whole,
            max_keys: 2,
            algorithm,
        })
    }

    #[test]
    fn token_bucket_refills_at_the_rate() {
        let r = resilience();
        let policy = RateLimitPolicy {
            per_second: 10,
            burst: 5,
            key: crate::config::RateKey::Whole,
            max_keys: 2,
            algorithm: RateAlgorithm::TokenBucket,
        };
        let l = r.limiter(&"ns/p".into(), &policy);
        assert_eq!((0..10).filter(|_| l.check("a").is_ok()).count(), 5, "burst");
        let wait = l.check("a").unwrap_err();
        assert!(wait <= Duration::from_millis(100));
        assert!(l.check("b").is_ok(), "separate bucket per key");
        assert!(l.check("c").is_ok(), "a third key evicts the least recently used");
        assert_eq!(l.keys.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_sliding_window_admits_no_second_burst_at_the_edge() {
        // 10 per second. A fixed window would admit 10 at 0.95 s and 10 more at 1.05 s.
        let l = limit(10, 10, RateAlgorithm::SlidingWindow(Duration::from_secs(1)));
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert!(l.check_at("k", at(0)).is_ok(), "the window starts with the first request");
        let burst = |ms| (0..20).filter(|_| l.check_at("k", at(ms)).is_ok()).count();
        assert_eq!(burst(950), 9, "the first window's limit");
        // 50 ms into the next window, 95 % of the previous one still counts: 9.5 of 10.
        assert_eq!(burst(1050), 0, "no second burst across the edge");
        let retry = l.check_at("k", at(1050)).unwrap_err();
        assert!(retry > Duration::ZERO && retry <= Duration::from_millis(950), "{retry:?}");
        // As the window slides, room comes back in proportion: at 1.5 s, half of the 10.
        assert_eq!(burst(1500), 5);
        // Any 1 s span from 0.5 s on holds at most the limit.
        // At 2 s the previous window's 5 still count in full: 5 more fit.
        assert_eq!(burst(2000), 5);
        // Idle for more than a window: a fresh start.
        assert_eq!(burst(5000), 10);
    }

    #[test]
    fn a_leaky_bucket_spaces_requests_and_bounds_its_queue() {
        // 10 per second: one every 100 ms; 3 may wait.
        let l = limit(10, 3, RateAlgorithm::LeakyBucket);
        let t0 = Instant::now();
        let waits: Vec<Result<Duration, Duration>> = (0..6).map(|_| l.check_at("k", t0)).collect();
        let ms = Duration::from_millis;
        assert_eq!(waits[..4], [Ok(ms(0)), Ok(ms(100)), Ok(ms(200)), Ok(ms(300))], "evenly spaced");
        assert!(waits[4].is_err() && waits[5].is_err(), "beyond the queue: refused");
        assert_eq!(waits[4], Err(ms(100)), "room again when the first waiting one leaves");
        // 250 ms on, two have left; the queue has room for two more.
        let later = t0 + ms(250);
        assert_eq!(l.check_at("k", later), Ok(ms(150)));
        assert_eq!(l.check_at("k", later), Ok(ms(250)));
        assert!(l.check_at("k", later).is_err());
        // Idle: no wait.
        assert_eq!(l.check_at("k", t0 + ms(5000)), Ok(ms(0)));
    }

    #[test]
    fn outlier_ejection_respects_the_cap() {
        let r = resilience();
        let policy = OutlierPolicy {
            consecutive_failures: 2,
            failure_rate_percent: None,
            min_requests: 1,
            window: Duration::from_secs(10),
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(60),
            max_ejected_percent: 34,
        };
        let o = r.outliers(&"ns/p".into(), "s", &"b".into(), policy);
        let eps: Vec<Endpoint> = (1..=3)
            .map(|p| Endpoint {
                addr: SocketAddr::from(([127, 0, 0, 1], p)),
                service_port: None,
                meshed: false,
                identity: String::new(),
                weight: 1,
            })
            .collect();
        let all: Vec<&Endpoint> = eps.iter().collect();
        for _ in 0..2 {
            o.record(eps[0].addr, false, 3);
            o.record(eps[1].addr, false, 3);
        }
        let left = o.available(&all);
        assert_eq!(left.len(), 2, "only one of three may be ejected at 34 %");
        assert!(!left.iter().any(|e| e.addr == eps[0].addr));
    }
}
