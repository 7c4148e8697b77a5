//! Live tap: the requests this sidecar handles, as they finish, for `weir tap`. A tap is a
//! subscription with a filter (direction, Service or authority, path prefix, method, status
//! class) and a rate: each matching request becomes one JSON line (method, authority, path
//! without its query, status, latency to the response head, identities, route and backend),
//! never a header value or a byte of a body.
//!
//! Taps cannot hurt traffic: the request path pays one atomic load when none is open; with one
//! open it builds an event for matching requests only and hands it over without waiting (a full
//! queue drops it, and so does the tap's token bucket past its rate); at most [`MAX_TAPS`] are
//! open at once. `/tap` on the admin port answers only loopback clients (in Kubernetes,
//! `kubectl port-forward`, which RBAC governs).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Taps open at once on one sidecar.
pub const MAX_TAPS: usize = 8;
/// Events a tap may have queued for its client before new ones are dropped.
const QUEUE: usize = 256;
/// The most events per second a tap may ask for.
pub const MAX_RATE: f64 = 1000.0;

/// Which requests a tap shows; every field set must match.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Filter {
    /// `inbound` or `outbound`.
    pub direction: Option<String>,
    /// The Service called (`namespace/name`, outbound) or the authority asked for.
    pub service: Option<String>,
    pub path_prefix: Option<String>,
    pub method: Option<String>,
    /// 2, 3, 4 or 5: the status class.
    pub status_class: Option<u16>,
}

impl Filter {
    /// From `/tap`'s query (`direction`, `service`, `path`, `method`, `status`) and the rate
    /// (`rate`, events per second, default 100): an error names the parameter.
    pub fn from_query(query: &str) -> Result<(Self, f64), String> {
        let mut f = Filter::default();
        let mut rate = 100.0;
        for (k, v) in url_pairs(query) {
            match k.as_str() {
                "direction" if v == "inbound" || v == "outbound" => f.direction = Some(v),
                "direction" => return Err(format!("direction {v:?}: inbound or outbound")),
                "service" => f.service = Some(v),
                "path" if v.starts_with('/') => f.path_prefix = Some(v),
                "path" => return Err(format!("path {v:?} does not start with '/'")),
                "method" => f.method = Some(v.to_ascii_uppercase()),
                "status" => match v.trim_end_matches("xx").parse::<u16>() {
                    Ok(c) if (1..=5).contains(&c) => f.status_class = Some(c),
                    _ => return Err(format!("status {v:?}: a class, 2xx to 5xx")),
                },
                "rate" => match v.parse::<f64>() {
                    Ok(r) if r > 0.0 && r <= MAX_RATE => rate = r,
                    _ => return Err(format!("rate {v:?}: events per second, above 0 and at most {MAX_RATE}")),
                },
                other => {
                    return Err(format!(
                        "unknown parameter {other:?} (direction, service, path, method, status, rate)"
                    ));
                }
            }
        }
        Ok((f, rate))
    }

    fn matches(&self, e: &Event<'_>) -> bool {
        self.direction.as_deref().is_none_or(|d| d == e.direction)
            && self.service.as_deref().is_none_or(|s| s == e.service || s == e.authority)
            && self.path_prefix.as_deref().is_none_or(|p| weir_api::route::path_prefix_matches(p, e.path))
            && self.method.as_deref().is_none_or(|m| m == e.method)
            && self.status_class.is_none_or(|c| e.status / 100 == c)
    }
}

/// `a=1&b=x%2Fy` as decoded pairs.
fn url_pairs(query: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let bytes = s.replace('+', " ").into_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
                (b'%', Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                }
                (b, _, _) => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// One finished request, as a tap shows it.
pub struct Event<'a> {
    pub direction: &'a str,
    pub method: &'a str,
    pub authority: &'a str,
    /// Without the query (which may carry secrets).
    pub path: &'a str,
    pub status: u16,
    pub latency: Duration,
    /// The Service called (outbound), or empty.
    pub service: &'a str,
    pub route: &'a str,
    pub backend: &'a str,
    /// Inbound: the client's SPIFFE ID, or empty for a plaintext client.
    pub client_identity: &'a str,
    pub request_id: &'a str,
}

struct Subscriber {
    id: u64,
    filter: Filter,
    tx: mpsc::Sender<Bytes>,
    rate: f64,
    tokens: f64,
    last: Instant,
}

/// The taps open on this sidecar (cheap to clone).
#[derive(Clone, Default)]
pub struct Taps {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    open: AtomicUsize,
    subscribers: Mutex<Vec<Subscriber>>,
    next_id: std::sync::atomic::AtomicU64,
    /// `weir_taps_open` and `weir_tap_events_total{result}`, when registered.
    gauge: Option<prometheus::IntGauge>,
    events: Option<prometheus::IntCounterVec>,
}

/// An open tap: its events, and its place among the open taps until dropped.
pub struct Subscription {
    pub events: mpsc::Receiver<Bytes>,
    _open: Open,
}

struct Open {
    taps: Taps,
    id: u64,
}

impl Drop for Open {
    fn drop(&mut self) {
        let mut subs = self.taps.inner.subscribers.lock().unwrap();
        subs.retain(|s| s.id != self.id);
        self.taps.set_open(subs.len());
    }
}

impl Taps {
    /// Taps counted in metrics: how many are open (`open`), and what became of each event a
    /// tap's filter matched (`events`, by result: shown, rate_limited, queue_full).
    pub fn counted(open: prometheus::IntGauge, events: prometheus::IntCounterVec) -> Self {
        Taps { inner: Arc::new(Inner { gauge: Some(open), events: Some(events), ..Default::default() }) }
    }

    fn count(&self, result: &str) {
        if let Some(c) = &self.inner.events {
            c.with_label_values(&[result]).inc();
        }
    }

    fn set_open(&self, n: usize) {
        self.inner.open.store(n, Ordering::Release);
        if let Some(g) = &self.inner.gauge {
            g.set(n as i64);
        }
    }

    /// Whether any tap is open: what the request path checks before building an event.
    pub fn active(&self) -> bool {
        self.inner.open.load(Ordering::Acquire) > 0
    }

    /// Opens a tap; `None` when [`MAX_TAPS`] are open already.
    pub fn subscribe(&self, filter: Filter, rate: f64) -> Option<Subscription> {
        let mut subs = self.inner.subscribers.lock().unwrap();
        if subs.len() >= MAX_TAPS {
            return None;
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, events) = mpsc::channel(QUEUE);
        // A burst of one second's worth, at most.
        subs.push(Subscriber { id, filter, tx, rate, tokens: rate.max(1.0), last: Instant::now() });
        self.set_open(subs.len());
        Some(Subscription { events, _open: Open { taps: self.clone(), id } })
    }

    /// Hands `event` to every tap whose filter it matches and whose rate allows it, without
    /// waiting.
    pub fn publish(&self, event: &Event<'_>) {
        let mut subs = self.inner.subscribers.lock().unwrap();
        let mut line: Option<Bytes> = None;
        let now = Instant::now();
        for s in subs.iter_mut().filter(|s| s.filter.matches(event)) {
            s.tokens = (s.tokens + now.duration_since(s.last).as_secs_f64() * s.rate).min(s.rate.max(1.0));
            s.last = now;
            if s.tokens < 1.0 {
                self.count("rate_limited");
                continue;
            }
            s.tokens -= 1.0;
            let line = line.get_or_insert_with(|| render(event)).clone();
            self.count(if s.tx.try_send(line).is_ok() { "shown" } else { "queue_full" });
        }
    }
}

fn render(e: &Event<'_>) -> Bytes {
    let mut line = serde_json::to_vec(&serde_json::json!({
        "direction": e.direction,
        "method": e.method,
        "authority": e.authority,
        "path": e.path,
        "status": e.status,
        "latencyMs": e.latency.as_secs_f64() * 1000.0,
        "service": e.service,
        "route": e.route,
        "backend": e.backend,
        "clientIdentity": e.client_identity,
        "requestId": e.request_id,
    }))
    .expect("an event serialises");
    line.push(b'\n');
    Bytes::from(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event<'a>(path: &'a str, status: u16) -> Event<'a> {
        Event {
            direction: "outbound",
            method: "GET",
            authority: "web.shop",
            path,
            status,
            latency: Duration::from_millis(3),
            service: "shop/web",
            route: "",
            backend: "shop/web",
            client_identity: "",
            request_id: "r",
        }
    }

    #[tokio::test(start_paused = true)]
    async fn taps_see_what_matches_at_their_rate_and_close_when_dropped() {
        let taps = Taps::default();
        assert!(!taps.active());
        let (filter, rate) = Filter::from_query("path=%2Fapi&status=5xx&rate=2").unwrap();
        let mut tap = taps.subscribe(filter, rate).unwrap();
        assert!(taps.active());
        taps.publish(&event("/api/x", 500));
        taps.publish(&event("/apix", 500)); // another path
        taps.publish(&event("/api/y", 200)); // another class
        taps.publish(&event("/api/z", 503));
        taps.publish(&event("/api/w", 502)); // past the burst of 2
        let got: Vec<String> = std::iter::from_fn(|| tap.events.try_recv().ok())
            .map(|b| serde_json::from_slice::<serde_json::Value>(&b).unwrap()["path"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(got, ["/api/x", "/api/z"]);
        // Half a second later, one more token.
        tokio::time::advance(Duration::from_millis(500)).await;
        taps.publish(&event("/api/v", 500));
        taps.publish(&event("/api/u", 500));
        assert_eq!(std::iter::from_fn(|| tap.events.try_recv().ok()).count(), 1);
        drop(tap);
        assert!(!taps.active());
    }

    #[test]
    fn filters_are_checked_and_taps_are_bounded() {
        assert!(Filter::from_query("rate=0").unwrap_err().contains("rate"));
        assert!(Filter::from_query("rate=5000").unwrap_err().contains("rate"));
        assert!(Filter::from_query("path=api").unwrap_err().contains("path"));
        assert!(Filter::from_query("status=7xx").unwrap_err().contains("status"));
        assert!(Filter::from_query("colour=red").unwrap_err().contains("unknown parameter"));
        let (f, rate) = Filter::from_query("direction=inbound&method=post&service=shop%2Fweb").unwrap();
        assert_eq!(
            (f.direction.as_deref(), f.method.as_deref(), f.service.as_deref(), rate),
            (Some("inbound"), Some("POST"), Some("shop/web"), 100.0)
        );
        let taps = Taps::default();
        let open: Vec<_> = (0..MAX_TAPS).map(|_| taps.subscribe(Filter::default(), 1.0).unwrap()).collect();
        assert!(taps.subscribe(Filter::default(), 1.0).is_none(), "at most {MAX_TAPS} taps");
        drop(open);
        assert!(taps.subscribe(Filter::default(), 1.0).is_some());
    }
}
