//! Endpoint selection: power of two choices over peak-EWMA latency (Linkerd's and Finagle's
//! default). Each endpoint's cost is its peak-sensitive moving average of response time,
//! multiplied by the requests it has in flight plus one; of two endpoints picked at random
//! the cheaper wins. Statistics live across snapshot swaps, keyed by address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::Endpoint;

/// Decay time of the moving average.
const DECAY: Duration = Duration::from_secs(10);
/// Assumed latency of an endpoint with no history, so new endpoints get tried.
const DEFAULT_RTT: Duration = Duration::from_millis(1);

#[derive(Debug)]
pub struct EndpointStats {
    in_flight: AtomicU32,
    ewma: Mutex<(f64, Instant)>,
}

impl EndpointStats {
    fn new() -> Self {
        Self { in_flight: AtomicU32::new(0), ewma: Mutex::new((DEFAULT_RTT.as_secs_f64(), Instant::now())) }
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

/// Statistics for every endpoint the sidecar has used.
#[derive(Default, Clone)]
pub struct Balancer {
    stats: Arc<Mutex<HashMap<SocketAddr, Arc<EndpointStats>>>>,
}

/// Marks a request in flight on an endpoint; records its latency on [`InFlight::done`] and
/// releases the slot when dropped.
pub struct InFlight {
    stats: Arc<EndpointStats>,
    started: Instant,
}

impl InFlight {
    pub fn done(self) {
        self.stats.observe(self.started.elapsed());
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

    /// Picks one of `endpoints` (two random candidates, the cheaper wins).
    pub fn pick<'a>(&self, endpoints: &[&'a Endpoint]) -> Option<(&'a Endpoint, InFlight)> {
        let chosen = match endpoints.len() {
            0 => return None,
            1 => endpoints[0],
            n => {
                let a = rand::random_range(0..n);
                let mut b = rand::random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let now = Instant::now();
                let (ea, eb) = (endpoints[a], endpoints[b]);
                if self.stats(ea.addr).cost(now) <= self.stats(eb.addr).cost(now) { ea } else { eb }
            }
        };
        let stats = self.stats(chosen.addr);
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        Some((chosen, InFlight { stats, started: Instant::now() }))
    }

    /// Forgets endpoints no longer in the configuration.
    pub fn retain(&self, keep: impl Fn(&SocketAddr) -> bool) {
        self.stats.lock().unwrap().retain(|a, _| keep(a));
    }
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
