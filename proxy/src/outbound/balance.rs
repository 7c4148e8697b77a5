//! Endpoint selection: power of two choices over peak-EWMA latency (Linkerd's and Finagle's
//! default). Each endpoint's cost is its peak-sensitive moving average of response time,
//! multiplied by the requests it has in flight plus one; of two endpoints picked at random
//! the cheaper wins. A failure counts as a slow answer, so an endpoint failing fast is not the
//! cheapest. Statistics live across snapshot swaps, keyed by address.
//!
//! A policy may choose another algorithm ([`LbAlgorithm`]): smooth weighted round robin,
//! least-request (P2C on in-flight requests), weighted random, or consistent hashing on a
//! key — a ring (`RingHash`) or Google's Maglev table. Rings and tables are built once per
//! endpoint set and cached per policy and backend.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::hash::{Hash, Hasher};

use crate::config::{Endpoint, LbAlgorithm};

/// Decay time of the moving average.
const DECAY: Duration = Duration::from_secs(10);
/// Assumed latency of an endpoint with no history, so new endpoints get tried.
const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// The latency a failure (a 5xx, a reset, a timeout) counts as: an endpoint that fails fast
/// must not look cheapest. Peak-sensitive, it applies at once; as the average decays the
/// endpoint is tried again (within about a minute when idle, sooner under load), and a
/// success brings its cost back down.
const FAILURE_RTT: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct EndpointStats {
    in_flight: AtomicU32,
    weight: AtomicU32,
    ewma: Mutex<(f64, Instant)>,
}

impl EndpointStats {
    fn new() -> Self {
        Self {
            in_flight: AtomicU32::new(0),
            weight: AtomicU32::new(1),
            ewma: Mutex::new((DEFAULT_RTT.as_secs_f64(), Instant::now())),
        }
    }

    fn cost(&self, now: Instant) -> f64 {
        let (ewma, at) = *self.ewma.lock().unwrap();
        let decayed = ewma * (-(now.saturating_duration_since(at).as_secs_f64()) / DECAY.as_secs_f64()).exp();
        decayed.max(1e-6) * f64::from(self.in_flight.load(Ordering::Relaxed) + 1)
    }

    fn observe(&self, rtt: Duration) {
        let now = Instant::now();
        let rtt = rtt.as_secs_f64();
        let mut g = self.ewma.lock().unwrap();
        let (ewma, at) = *g;
        *g = if rtt > ewma {
            (rtt, now) // peak-sensitive: jump up at once
        } else {
            let w = (-(now.saturating_duration_since(at).as_secs_f64()) / DECAY.as_secs_f64()).exp();
            (ewma * w + rtt * (1.0 - w), now)
        };
    }
}

/// Which balancer state a choice uses: (policy, backend).
pub type StateKey = (Arc<str>, Arc<str>);

/// Hashing tables by backend state and algorithm, with the fingerprint of their endpoint set.
type TableCache = HashMap<(StateKey, LbAlgorithm), (u64, Arc<Table>)>;

/// Statistics for every endpoint the sidecar has used, and per-backend algorithm state.
#[derive(Default, Clone)]
pub struct Balancer {
    stats: Arc<Mutex<HashMap<SocketAddr, Arc<EndpointStats>>>>,
    round_robin: Arc<Mutex<HashMap<StateKey, HashMap<SocketAddr, i64>>>>,
    tables: Arc<Mutex<TableCache>>,
}

/// A consistent-hashing lookup structure for one endpoint set.
pub enum Table {
    /// Sorted (point, endpoint index).
    Ring(Vec<(u64, usize)>),
    /// Slot → endpoint index.
    Maglev(Vec<u32>),
}

/// Virtual nodes per unit of weight on a hash ring.
const RING_POINTS: u64 = 160;
/// Maglev table size (a prime, as the paper requires).
const MAGLEV_SIZE: usize = 65_537;

fn hash_of(v: impl Hash) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// Hashes a request key (header value, cookie, address) for consistent hashing.
pub fn key_hash(key: &[u8]) -> u64 {
    hash_of(key)
}

impl Table {
    pub fn ring(endpoints: &[&Endpoint]) -> Self {
        let mut points = Vec::new();
        for (i, e) in endpoints.iter().enumerate() {
            for v in 0..RING_POINTS * u64::from(e.weight) {
                points.push((hash_of((e.addr, v)), i));
            }
        }
        points.sort_unstable();
        Table::Ring(points)
    }

    pub fn maglev(endpoints: &[&Endpoint]) -> Self {
        let m = MAGLEV_SIZE as u64;
        let prefs: Vec<(u64, u64)> = endpoints
            .iter()
            .map(|e| (hash_of((e.addr, "offset")) % m, hash_of((e.addr, "skip")) % (m - 1) + 1))
            .collect();
        let mut next = vec![0u64; endpoints.len()];
        let mut table = vec![u32::MAX; MAGLEV_SIZE];
        let mut filled = 0;
        'fill: loop {
            for (i, e) in endpoints.iter().enumerate() {
                // Each round an endpoint claims as many slots as its weight.
                for _ in 0..e.weight {
                    let (offset, skip) = prefs[i];
                    let mut slot = ((offset + next[i] * skip) % m) as usize;
                    while table[slot] != u32::MAX {
                        next[i] += 1;
                        slot = ((offset + next[i] * skip) % m) as usize;
                    }
                    table[slot] = i as u32;
                    next[i] += 1;
                    filled += 1;
                    if filled == MAGLEV_SIZE {
                        break 'fill;
                    }
                }
            }
        }
        Table::Maglev(table)
    }

    /// The index of the endpoint for `hash`.
    pub fn lookup(&self, hash: u64) -> usize {
        match self {
            Table::Ring(points) => {
                let i = points.partition_point(|(p, _)| *p < hash);
                points[i % points.len()].1
            }
            Table::Maglev(table) => table[(hash % table.len() as u64) as usize] as usize,
        }
    }
}

/// Marks a request in flight on an endpoint; records its latency on [`InFlight::answered`]
/// and releases the slot then (or when dropped unanswered).
pub struct InFlight {
    stats: Arc<EndpointStats>,
    started: Instant,
}

impl InFlight {
    /// The endpoint answered (its response headers came, or the attempt failed): the latency
    /// feeds its average. The returned [`Late`] marks the request failed once that is known.
    pub fn answered(self) -> Late {
        self.stats.observe(self.started.elapsed());
        Late(self.stats.clone())
    }
}

/// An answered request whose outcome may still come (a gRPC status in the trailers).
pub struct Late(Arc<EndpointStats>);

impl Late {
    /// The request failed: the endpoint's cost rises as if it had taken [`FAILURE_RTT`].
    pub fn failed(self) {
        self.0.observe(FAILURE_RTT);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    fn stats(&self, addr: SocketAddr) -> Arc<EndpointStats> {
        self.stats.lock().unwrap().entry(addr).or_insert_with(|| Arc::new(EndpointStats::new())).clone()
    }

    /// Picks one of `endpoints`: two random candidates, the cheaper wins. When their weights
    /// differ, each endpoint is chosen in proportion to its weight divided by its cost instead
    /// (as Envoy's least-request balancer does with unequal weights): equal latencies give the
    /// weights' shares, and a slow or failing endpoint still loses its traffic.
    pub fn pick<'a>(&self, endpoints: &[&'a Endpoint]) -> Option<(&'a Endpoint, InFlight)> {
        let first = endpoints.first()?;
        let chosen = if endpoints.iter().all(|e| e.weight == first.weight) {
            self.p2c(endpoints, |s, now| s.cost(now))?
        } else {
            let now = Instant::now();
            let shares: Vec<f64> =
                endpoints.iter().map(|e| f64::from(e.weight) / self.stats(e.addr).cost(now)).collect();
            let total: f64 = shares.iter().sum();
            let mut x = rand::random::<f64>() * total;
            let mut chosen = endpoints[endpoints.len() - 1];
            for (e, share) in endpoints.iter().zip(&shares) {
                if x < *share {
                    chosen = e;
                    break;
                }
                x -= share;
            }
            chosen
        };
        Some(self.start(chosen))
    }

    /// Picks one of `endpoints` with `algorithm`; `hash` is the request's key for consistent
    /// hashing (without one, a hashing algorithm picks at random).
    pub fn pick_with<'a>(
        &self,
        algorithm: LbAlgorithm,
        state: &StateKey,
        hash: Option<u64>,
        endpoints: &[&'a Endpoint],
    ) -> Option<(&'a Endpoint, InFlight)> {
        if endpoints.is_empty() {
            return None;
        }
        let chosen = match (algorithm, hash) {
            (LbAlgorithm::P2cPeakEwma, _) => return self.pick(endpoints),
            (LbAlgorithm::LeastRequest, _) => self.p2c(endpoints, |s, _| {
                f64::from(s.in_flight.load(Ordering::Relaxed) + 1) / f64::from(s.weight.load(Ordering::Relaxed).max(1))
            })?,
            (LbAlgorithm::RoundRobin, _) => self.round_robin(state, endpoints),
            (LbAlgorithm::RingHash | LbAlgorithm::Maglev, Some(h)) => {
                endpoints[self.table(state, algorithm, endpoints).lookup(h)]
            }
            (LbAlgorithm::Random | LbAlgorithm::RingHash | LbAlgorithm::Maglev, _) => weighted_random(endpoints),
        };
        Some(self.start(chosen))
    }

    fn start<'a>(&self, chosen: &'a Endpoint) -> (&'a Endpoint, InFlight) {
        let stats = self.stats(chosen.addr);
        stats.weight.store(chosen.weight, Ordering::Relaxed);
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        (chosen, InFlight { stats, started: Instant::now() })
    }

    /// Two random candidates; the one with the lower cost wins.
    fn p2c<'a>(
        &self,
        endpoints: &[&'a Endpoint],
        cost: impl Fn(&EndpointStats, Instant) -> f64,
    ) -> Option<&'a Endpoint> {
        match endpoints.len() {
            0 => None,
            1 => Some(endpoints[0]),
            n => {
                let a = rand::random_range(0..n);
                let mut b = rand::random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let now = Instant::now();
                let (ea, eb) = (endpoints[a], endpoints[b]);
                Some(if cost(&self.stats(ea.addr), now) <= cost(&self.stats(eb.addr), now) { ea } else { eb })
            }
        }
    }

    /// Smooth weighted round robin (nginx): every endpoint gains its weight, the richest is
    /// chosen and pays the total.
    fn round_robin<'a>(&self, state: &StateKey, endpoints: &[&'a Endpoint]) -> &'a Endpoint {
        let mut g = self.round_robin.lock().unwrap();
        let current = g.entry(state.clone()).or_default();
        current.retain(|a, _| endpoints.iter().any(|e| e.addr == *a));
        let total: i64 = endpoints.iter().map(|e| i64::from(e.weight)).sum();
        let mut best = 0;
        let mut best_value = i64::MIN;
        for (i, e) in endpoints.iter().enumerate() {
            let c = current.entry(e.addr).or_insert(0);
            *c += i64::from(e.weight);
            if *c > best_value {
                best_value = *c;
                best = i;
            }
        }
        *current.get_mut(&endpoints[best].addr).expect("inserted above") -= total;
        endpoints[best]
    }

    fn table(&self, state: &StateKey, algorithm: LbAlgorithm, endpoints: &[&Endpoint]) -> Arc<Table> {
        let fingerprint = hash_of(endpoints.iter().map(|e| (e.addr, e.weight)).collect::<Vec<_>>());
        let key = (state.clone(), algorithm);
        if let Some((f, t)) = self.tables.lock().unwrap().get(&key)
            && *f == fingerprint
        {
            return t.clone();
        }
        let table =
            Arc::new(if algorithm == LbAlgorithm::Maglev { Table::maglev(endpoints) } else { Table::ring(endpoints) });
        self.tables.lock().unwrap().insert(key, (fingerprint, table.clone()));
        table
    }

    /// Forgets endpoints no longer in the configuration.
    pub fn retain(&self, keep: impl Fn(&SocketAddr) -> bool) {
        self.stats.lock().unwrap().retain(|a, _| keep(a));
    }

    /// Forgets algorithm state of policies no longer configured.
    pub fn retain_policies(&self, live: &std::collections::HashSet<Arc<str>>) {
        self.round_robin.lock().unwrap().retain(|(p, _), _| live.contains(p));
        self.tables.lock().unwrap().retain(|((p, _), _), _| live.contains(p));
    }
}

fn weighted_random<'a>(endpoints: &[&'a Endpoint]) -> &'a Endpoint {
    let total: u64 = endpoints.iter().map(|e| u64::from(e.weight)).sum();
    let mut n = rand::random_range(0..total.max(1));
    for e in endpoints {
        if n < u64::from(e.weight) {
            return e;
        }
        n -= u64::from(e.weight);
    }
    endpoints[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u16) -> Endpoint {
        Endpoint {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            service_port: None,
            meshed: false,
            identity: String::new(),
            weight: 1,
        }
    }

    #[test]
    fn prefers_the_faster_endpoint() {
        let b = Balancer::default();
        let (fast, slow) = (ep(1), ep(2));
        b.stats(slow.addr).observe(Duration::from_millis(200));
        b.stats(fast.addr).observe(Duration::from_micros(100));
        let list = [&fast, &slow];
        for _ in 0..50 {
            let (chosen, _guard) = b.pick(&list).unwrap();
            assert_eq!(chosen.addr, fast.addr);
        }
    }

    #[test]
    fn a_fast_failure_costs_like_a_slow_answer() {
        let b = Balancer::default();
        let (good, bad) = (ep(1), ep(2));
        b.stats(good.addr).observe(Duration::from_millis(20));
        let list = [&good, &bad];
        // The failing endpoint answers in microseconds, but each answer is a failure.
        let (_, guard) = b.start(&bad);
        guard.answered().failed();
        for _ in 0..50 {
            let (chosen, guard) = b.pick(&list).unwrap();
            assert_eq!(chosen.addr, good.addr);
            guard.answered();
        }
        // A success later brings it back into play.
        b.stats(bad.addr).observe(Duration::from_micros(1));
        assert!(b.stats(bad.addr).cost(Instant::now()) < 1.0);
    }

    #[test]
    fn in_flight_requests_add_cost() {
        let b = Balancer::default();
        let (x, y) = (ep(1), ep(2));
        let list = [&x, &y];
        let (first, g1) = b.pick(&list).unwrap();
        let first = first.addr;
        // With equal latency, the busy endpoint costs twice as much.
        let (second, _g2) = b.pick(&list).unwrap();
        assert_ne!(first, second.addr);
        drop(g1);
        assert_eq!(b.stats(first).in_flight.load(Ordering::Relaxed), 0);
    }
}

#[cfg(test)]
mod algorithm_tests {
    use super::*;

    fn eps(n: u16, weight: impl Fn(u16) -> u32) -> Vec<Endpoint> {
        (1..=n)
            .map(|p| Endpoint {
                addr: SocketAddr::from(([10, 0, 0, 1], p)),
                service_port: None,
                meshed: false,
                identity: String::new(),
                weight: weight(p),
            })
            .collect()
    }

    fn state() -> StateKey {
        ("ns/p".into(), "ns/b".into())
    }

    /// Adding one endpoint to N moves about 1/(N+1) of keys, and only onto the new one.
    fn movement(algorithm: LbAlgorithm) -> f64 {
        let (ten, eleven) = (eps(10, |_| 1), eps(11, |_| 1));
        let (a, b): (Vec<_>, Vec<_>) = (ten.iter().collect(), eleven.iter().collect());
        let (ta, tb) = match algorithm {
            LbAlgorithm::Maglev => (Table::maglev(&a), Table::maglev(&b)),
            _ => (Table::ring(&a), Table::ring(&b)),
        };
        let keys = 20_000;
        let mut moved = 0;
        for k in 0..keys {
            let h = key_hash(format!("user-{k}").as_bytes());
            let (x, y) = (a[ta.lookup(h)].addr, b[tb.lookup(h)].addr);
            if x != y {
                moved += 1;
                // Ring hashing moves keys only to the newcomer; Maglev nearly so.
                if algorithm == LbAlgorithm::RingHash {
                    assert_eq!(y, eleven[10].addr);
                }
            }
        }
        moved as f64 / keys as f64
    }

    #[test]
    fn consistent_hashing_moves_about_one_in_n_plus_one() {
        for algorithm in [LbAlgorithm::RingHash, LbAlgorithm::Maglev] {
            let m = movement(algorithm);
            // Ideal 1/11 = 9.1 %; bounds far outside the variation of the hashes.
            assert!((0.05..0.15).contains(&m), "{algorithm:?} moved {:.1} % of keys", m * 100.0);
        }
    }

    #[test]
    fn hashing_is_sticky_and_spreads_keys() {
        let b = Balancer::default();
        let list = eps(4, |_| 1);
        let refs: Vec<_> = list.iter().collect();
        for algorithm in [LbAlgorithm::RingHash, LbAlgorithm::Maglev] {
            let mut used = std::collections::HashSet::new();
            for k in 0..200 {
                let h = key_hash(format!("k{k}").as_bytes());
                let first = b.pick_with(algorithm, &state(), Some(h), &refs).unwrap().0.addr;
                for _ in 0..3 {
                    assert_eq!(b.pick_with(algorithm, &state(), Some(h), &refs).unwrap().0.addr, first);
                }
                used.insert(first);
            }
            assert_eq!(used.len(), 4, "{algorithm:?} should spread 200 keys over 4 endpoints");
        }
    }

    #[test]
    fn weighted_round_robin_is_exact_and_smooth() {
        let b = Balancer::default();
        let list = eps(2, |p| if p == 1 { 3 } else { 1 });
        let refs: Vec<_> = list.iter().collect();
        let picks: Vec<u16> = (0..8)
            .map(|_| b.pick_with(LbAlgorithm::RoundRobin, &state(), None, &refs).unwrap().0.addr.port())
            .collect();
        assert_eq!(picks, [1, 1, 2, 1, 1, 1, 2, 1]);
    }

    #[test]
    fn least_request_avoids_busy_endpoints() {
        let b = Balancer::default();
        let list = eps(2, |_| 1);
        let refs: Vec<_> = list.iter().collect();
        let (busy, _g) = b.pick_with(LbAlgorithm::LeastRequest, &state(), None, &refs).unwrap();
        let busy = busy.addr;
        let _more: Vec<_> = (0..3).map(|_| b.start(refs.iter().find(|e| e.addr == busy).unwrap())).collect();
        for _ in 0..20 {
            assert_ne!(b.pick_with(LbAlgorithm::LeastRequest, &state(), None, &refs).unwrap().0.addr, busy);
        }
    }

    #[test]
    fn the_default_balancer_honours_weights_and_still_shuns_failures() {
        let b = Balancer::default();
        let list = eps(2, |p| if p == 1 { 3 } else { 1 });
        let refs: Vec<_> = list.iter().collect();
        for e in &list {
            b.stats(e.addr).observe(Duration::from_millis(2));
        }
        let heavy = (0..8_000).filter(|_| b.pick(&refs).unwrap().0.addr.port() == 1).count();
        // 75 % of 8 000, σ ≈ 39: ±300 is over 7 σ.
        assert!((5_700..=6_300).contains(&heavy), "{heavy}");
        // The heavier endpoint failing: its share collapses although its weight is 3.
        b.stats(list[0].addr).observe(FAILURE_RTT);
        let heavy = (0..1_000).filter(|_| b.pick(&refs).unwrap().0.addr.port() == 1).count();
        assert!(heavy < 50, "{heavy}");
    }

    #[test]
    fn weighted_random_follows_weights() {
        let list = eps(2, |p| if p == 1 { 9 } else { 1 });
        let refs: Vec<_> = list.iter().collect();
        let heavy = (0..10_000).filter(|_| weighted_random(&refs).addr.port() == 1).count();
        // 90 % of 10 000, σ = 30.
        assert!((8_700..=9_300).contains(&heavy), "{heavy}");
    }
}
