//! Runtime helpers both binaries share: logging, the shutdown signal, time, back-off, and the
//! small responses admin endpoints answer (the admin server itself is [`crate::server::serve_admin`]).

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use std::net::SocketAddr;
use tokio::sync::watch;

/// Initialises `tracing`: human-readable by default, JSON when `json`; `level` is an
/// `EnvFilter` directive (`info`, `weir_proxy=debug`), overridden by `RUST_LOG`.
pub fn init_logging(level: &str, json: bool) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        let b = builder.json().with_filter_reloading();
        remember(b.reload_handle(), level);
        let _ = b.try_init();
    } else {
        let b = builder.with_filter_reloading();
        remember(b.reload_handle(), level);
        let _ = b.try_init();
    }
}

fn remember<S: 'static>(handle: tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, S>, level: &str) {
    let current = Arc::new(std::sync::Mutex::new(level.to_string()));
    let _ = LOG_LEVEL.set(LogLevel {
        current: current.clone(),
        set: Box::new(move |directives: &str| {
            let filter = tracing_subscriber::EnvFilter::try_new(directives)
                .map_err(|e| format!("invalid log level {directives:?}: {e}"))?;
            handle.reload(filter).map_err(|e| e.to_string())?;
            *current.lock().unwrap() = directives.to_string();
            Ok(())
        }),
    });
}

/// The log filter in force, changeable at run time (the admin ports' `/log-level`).
pub struct LogLevel {
    current: Arc<std::sync::Mutex<String>>,
    set: SetLevel,
}

type SetLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

static LOG_LEVEL: std::sync::OnceLock<LogLevel> = std::sync::OnceLock::new();

/// `GET /log-level` shows the filter; `POST /log-level?level=DIRECTIVES` replaces it (e.g.
/// `debug` or `info,weir_proxy=trace`). `None` for other paths.
/// Writes answer only loopback clients (`peer`).
pub fn log_level_endpoint<B>(req: &http::Request<B>, peer: SocketAddr) -> Option<Response<Full<Bytes>>> {
    if req.uri().path() != "/log-level" {
        return None;
    }
    if req.method() != http::Method::GET
        && let Some(refused) = loopback_only(peer, "changing the log level")
    {
        return Some(refused);
    }
    let Some(log) = LOG_LEVEL.get() else {
        return Some(text(http::StatusCode::SERVICE_UNAVAILABLE, "logging is not initialised\n"));
    };
    if req.method() == http::Method::GET {
        return Some(text(http::StatusCode::OK, format!("{}\n", log.current.lock().unwrap())));
    }
    if req.method() != http::Method::POST && req.method() != http::Method::PUT {
        return Some(text(http::StatusCode::METHOD_NOT_ALLOWED, "GET, or POST ?level=DIRECTIVES\n"));
    }
    let level = req.uri().query().and_then(|q| {
        q.split('&').find_map(|kv| kv.strip_prefix("level=")).map(|v| v.replace("%2C", ",").replace("%3D", "="))
    });
    Some(match level {
        None => text(http::StatusCode::BAD_REQUEST, "POST /log-level?level=DIRECTIVES (e.g. debug)\n"),
        Some(l) => match (log.set)(&l) {
            Ok(()) => text(http::StatusCode::OK, format!("{l}\n")),
            Err(e) => text(http::StatusCode::BAD_REQUEST, format!("{e}\n")),
        },
    })
}

/// A drain signal: `true` once shutdown has begun.
#[derive(Clone)]
pub struct Drain(watch::Receiver<bool>);

/// The sending half of [`Drain`].
pub struct DrainTrigger(watch::Sender<bool>);

/// Creates a drain signal pair.
pub fn drain() -> (DrainTrigger, Drain) {
    let (tx, rx) = watch::channel(false);
    (DrainTrigger(tx), Drain(rx))
}

impl DrainTrigger {
    /// Starts draining everything holding a [`Drain`].
    pub fn trigger(&self) {
        let _ = self.0.send(true);
    }
}

impl Drain {
    /// Completes once draining has started (or the trigger is gone).
    pub async fn signaled(mut self) {
        let _ = self.0.wait_for(|d| *d).await;
    }

    pub fn is_draining(&self) -> bool {
        *self.0.borrow()
    }
}

/// Completes on SIGTERM or SIGINT. The handlers are installed when this is called, not when
/// the future is first polled: call it before announcing readiness, so a signal that follows
/// the announcement at once is never the default (fatal) one.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, draining"),
            _ = int.recv() => tracing::info!("SIGINT received, draining"),
        }
    }
}

/// A plain response with a body.
pub fn text(status: http::StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(body.into()));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    rsp
}

/// A JSON response.
pub fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    rsp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    rsp
}

/// `403` unless `peer` is on loopback: what an admin endpoint that changes anything or reveals
/// configuration answers to another host or pod. Local tools reach it on `127.0.0.1`; in
/// Kubernetes, through `kubectl port-forward` (which connects from inside the pod).
pub fn loopback_only(peer: SocketAddr, what: &str) -> Option<Response<Full<Bytes>>> {
    let loopback = match peer.ip() {
        std::net::IpAddr::V4(ip) => ip.is_loopback(),
        std::net::IpAddr::V6(ip) => ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    };
    (!loopback).then(|| {
        text(
            http::StatusCode::FORBIDDEN,
            format!(
                "{what} answers only loopback clients (use kubectl port-forward, or call it from inside the pod)\n"
            ),
        )
    })
}

/// Renders a Prometheus registry in the text exposition format.
pub fn render_metrics(registry: &prometheus::Registry) -> String {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    let _ = prometheus::TextEncoder::new().encode(&registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

/// Time since the Unix epoch (zero for a clock set before it).
pub fn since_epoch() -> std::time::Duration {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default()
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    since_epoch().as_millis() as u64
}

/// Seconds since the Unix epoch (certificate times are in these).
pub fn unix_secs() -> i64 {
    since_epoch().as_secs() as i64
}

/// The wait before retry `step` (0 for the first): exponential back-off with full jitter
/// (a uniformly random wait up to `base`·2^`step`, capped at `max`), at least `floor`. Full
/// jitter spreads out the retries of many clients that failed together (AWS's analysis).
pub fn backoff(
    step: u32,
    base: std::time::Duration,
    max: std::time::Duration,
    floor: std::time::Duration,
) -> std::time::Duration {
    backoff_at(step, base, max, floor, rand::random::<f64>())
}

/// [`backoff`] with the random draw given: `unit` in [0, 1) picks where in the window it lands.
fn backoff_at(
    step: u32,
    base: std::time::Duration,
    max: std::time::Duration,
    floor: std::time::Duration,
    unit: f64,
) -> std::time::Duration {
    let cap = base.saturating_mul(1u32 << step.min(16)).min(max);
    cap.mul_f64(unit.clamp(0.0, 1.0)).max(floor)
}

#[cfg(test)]
mod backoff_tests {
    use super::*;
    use std::time::Duration;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_window_doubles_up_to_the_cap() {
        let (base, max) = (100 * MS, 5_000 * MS);
        let top = |step| backoff_at(step, base, max, Duration::ZERO, 1.0);
        assert_eq!([top(0), top(1), top(2), top(5), top(6)], [100 * MS, 200 * MS, 400 * MS, 3_200 * MS, 5_000 * MS]);
        assert_eq!(top(u32::MAX), max, "no overflow however many failures");
        assert_eq!(backoff_at(3, base, max, Duration::ZERO, 0.5), 400 * MS, "the draw picks a point in the window");
        assert_eq!(backoff_at(3, base, max, 5 * MS, 0.0), 5 * MS, "never under the floor");
    }

    #[test]
    fn waits_are_spread_over_the_whole_window() {
        let (base, max) = (100 * MS, 800 * MS);
        let waits: Vec<Duration> = (0..2_000).map(|_| backoff(3, base, max, Duration::ZERO)).collect();
        assert!(waits.iter().all(|w| *w <= 800 * MS));
        // Uniform over [0, 800 ms]: the mean is 400 ms (σ of the mean ≈ 5 ms), and draws land
        // in both the lowest and the highest tenth.
        let mean = waits.iter().sum::<Duration>() / waits.len() as u32;
        assert!((350 * MS..450 * MS).contains(&mean), "{mean:?}");
        assert!(waits.iter().any(|w| *w < 80 * MS) && waits.iter().any(|w| *w > 720 * MS));
    }
}
