//! Opaque byte streams the sidecar carries without reading them, in both directions: `CONNECT
//! host:port` on the outbound listener (a tunnel to a destination outside the mesh, so TLS the
//! application originates passes through untouched), and redirected connections that are not
//! HTTP (outbound to where they were bound, over mesh mTLS when that is a meshed pod; inbound
//! to the application, once authorization admitted them).
//!
//! Mesh destinations are not CONNECT-tunnelled: their traffic must go through routing,
//! policies and mesh mTLS, so a CONNECT to a Service name or to an endpoint address is refused
//! with a hint to send plain HTTP. Each listener has its own [`Tunnels`] (so one direction
//! cannot take the other's slots); tunnels are bounded in number, close after an idle period
//! or when a write makes no progress for [`WRITE_TIMEOUT`] (a peer that stopped reading), and
//! on shutdown get the drain grace period to finish.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use weir_api::rt::Drain;

use crate::body::{Body, WEIR_ERROR, full};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::tls::Io;

/// What an opaque TCP connection is counted as (`weir_tcp_*`): CONNECT tunnels and protocol
/// switches carry `None` and count as tunnels.
pub struct TcpFlow<'a> {
    /// `inbound` or `outbound`.
    pub direction: &'a str,
    /// `namespace/name` of the Service called (outbound), or empty.
    pub service: &'a str,
    /// Whether the mesh hop is mTLS.
    pub tls: bool,
    /// Inbound: the client's SPIFFE ID; outbound: the server's; empty when none.
    pub peer_identity: &'a str,
}

/// Most tunnels open at once.
pub const MAX_TUNNELS: usize = 4096;
/// A tunnel with no bytes either way for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// A tunnel whose write has made no progress for this long (the receiver stopped reading) is
/// closed, so it cannot hold its slot forever.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// What tunnels share: the slots, the drain signal and how long draining may take.
#[derive(Clone)]
pub struct Tunnels {
    slots: Arc<Semaphore>,
    drain: Drain,
    grace: Duration,
    idle: Duration,
    write: Duration,
}

impl Tunnels {
    pub fn new(drain: Drain, grace: Duration) -> Self {
        Self { slots: Arc::new(Semaphore::new(MAX_TUNNELS)), drain, grace, idle: IDLE_TIMEOUT, write: WRITE_TIMEOUT }
    }

    /// Answers a CONNECT: 200 once the destination accepted the connection, then bytes flow
    /// both ways until either side closes, the tunnel idles out, or draining ends it.
    pub async fn connect(
        &self,
        mut req: Request<Incoming>,
        config: Option<&Config>,
        connect_timeout: Duration,
        metrics: &Metrics,
    ) -> Response<Body> {
        let Some(config) = config else {
            return refuse(StatusCode::SERVICE_UNAVAILABLE, "no configuration from the controller yet".into());
        };
        let Some(authority) = req.uri().authority().cloned() else {
            return refuse(StatusCode::BAD_REQUEST, "CONNECT needs host:port".into());
        };
        let Some(port) = authority.port_u16() else {
            return refuse(StatusCode::BAD_REQUEST, format!("CONNECT {authority}: no port"));
        };
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        if let Some(svc) = config.lookup(&host) {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("CONNECT to mesh service {}: send plain HTTP, the mesh adds mTLS", svc.key),
            );
        }
        if let Ok(ip) = host.parse::<std::net::IpAddr>()
            && let Some(svc) = config.endpoint_owner(SocketAddr::new(ip, port))
        {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("CONNECT to {authority}, an endpoint of mesh service {svc}: send plain HTTP to the service"),
            );
        }
        let Some(slot) = self.slot(metrics, &authority) else {
            return refuse(StatusCode::SERVICE_UNAVAILABLE, format!("too many tunnels open (at most {MAX_TUNNELS})"));
        };
        let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect((host.as_str(), port))).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return failed(metrics, &authority, e.to_string()),
            Err(_) => return failed(metrics, &authority, format!("timed out after {connect_timeout:?}")),
        };
        let _ = stream.set_nodelay(true);
        let upgrade = hyper::upgrade::on(&mut req);
        let (metrics, tunnels) = (metrics.clone(), self.clone());
        tokio::spawn(async move {
            match upgrade.await {
                Ok(upgraded) => tunnels.carry(slot, TokioIo::new(upgraded), stream, &authority, &metrics, None).await,
                Err(e) => {
                    metrics.tunnels.with_label_values(&["error"]).inc();
                    tracing::debug!(%authority, error = %e, "CONNECT upgrade failed");
                }
            }
        });
        Response::new(crate::body::empty())
    }
}

impl Tunnels {
    /// A slot for one more tunnel; `None` (counted, logged) when all are taken.
    pub fn slot(&self, metrics: &Metrics, what: &(dyn std::fmt::Display + Sync)) -> Option<OwnedSemaphorePermit> {
        let slot = self.slots.clone().try_acquire_owned().ok();
        if slot.is_none() {
            metrics.tunnels.with_label_values(&["error"]).inc();
            tracing::warn!(%what, "too many opaque connections (at most {MAX_TUNNELS}); refusing one");
        }
        slot
    }

    /// Carries bytes between `client` and `upstream` (counted as a tunnel) until either side
    /// closes, it idles out, a write stalls, or draining ends it. `slot` is held throughout.
    pub async fn carry<C: Io, U: Io>(
        &self,
        slot: OwnedSemaphorePermit,
        client: C,
        upstream: U,
        what: &(dyn std::fmt::Display + Sync),
        metrics: &Metrics,
        tcp: Option<TcpFlow<'_>>,
    ) {
        let _slot = slot;
        metrics.tunnels.with_label_values(&["ok"]).inc();
        metrics.tunnels_active.inc();
        let started = tokio::time::Instant::now();
        let bytes = match &tcp {
            Some(t) => {
                let tls = if t.tls { "true" } else { "false" };
                // The inbound side names its client; the outbound side names no one here.
                let client = if t.direction == "inbound" { t.peer_identity } else { "" };
                metrics.tcp_connections.with_label_values(&[t.direction, tls, client]).inc();
                let flow =
                    |f: &str| metrics.tcp_bytes.with_label_values(&[t.direction, t.service, tls, t.peer_identity, f]);
                (flow("sent"), flow("received"))
            }
            None => (
                metrics.tunnel_bytes.with_label_values(&["sent"]),
                metrics.tunnel_bytes.with_label_values(&["received"]),
            ),
        };
        let (drain, grace) = (self.drain.clone(), self.grace);
        let drained = async move {
            drain.signaled().await;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            r = pump(client, upstream, self.idle, self.write, bytes) => {
                if let Err(e) = r {
                    tracing::debug!(%what, error = %e, "opaque connection ended with an error");
                }
            }
            _ = drained => tracing::debug!(%what, "opaque connection closed at the end of the drain grace period"),
        }
        if let Some(t) = &tcp {
            let tls = if t.tls { "true" } else { "false" };
            metrics
                .tcp_duration
                .with_label_values(&[t.direction, t.service, tls])
                .observe(started.elapsed().as_secs_f64());
        }
        metrics.tunnels_active.dec();
    }

    /// Counts an opaque connection that could not reach its destination.
    pub fn failed(&self, metrics: &Metrics, what: &(dyn std::fmt::Display + Sync), reason: &str) {
        metrics.tunnels.with_label_values(&["error"]).inc();
        tracing::debug!(%what, %reason, "opaque connection failed upstream");
    }
}

/// Writes all of `buf`, failing when no progress is made for `limit`.
async fn write_within<W: AsyncWrite + Unpin>(w: &mut W, buf: &[u8], limit: Duration) -> std::io::Result<()> {
    tokio::time::timeout(limit, w.write_all(buf)).await.map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::TimedOut, format!("the receiver took no bytes for {limit:?}"))
    })?
}

/// Copies bytes both ways, counting them as they go, until both sides have closed; an error
/// after `idle` without a byte either way, or when a write stalls for `write`.
async fn pump<C, U>(
    client: C,
    upstream: U,
    idle: Duration,
    write: Duration,
    (sent, received): (prometheus::IntCounter, prometheus::IntCounter),
) -> std::io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let mut cbuf = vec![0u8; 16 * 1024];
    let mut ubuf = vec![0u8; 16 * 1024];
    let (mut client_open, mut upstream_open) = (true, true);
    while client_open || upstream_open {
        tokio::select! {
            n = cr.read(&mut cbuf), if client_open => {
                let n = n?;
                if n == 0 {
                    client_open = false;
                    uw.shutdown().await?;
                } else {
                    write_within(&mut uw, &cbuf[..n], write).await?;
                    sent.inc_by(n as u64);
                }
            }
            n = ur.read(&mut ubuf), if upstream_open => {
                let n = n?;
                if n == 0 {
                    upstream_open = false;
                    cw.shutdown().await?;
                } else {
                    write_within(&mut cw, &ubuf[..n], write).await?;
                    received.inc_by(n as u64);
                }
            }
            _ = tokio::time::sleep(idle) => {
                return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("idle for {idle:?}")));
            }
        }
    }
    Ok(())
}

fn failed(metrics: &Metrics, authority: &http::uri::Authority, reason: String) -> Response<Body> {
    metrics.tunnels.with_label_values(&["error"]).inc();
    tracing::debug!(%authority, %reason, "CONNECT failed");
    refuse(StatusCode::BAD_GATEWAY, format!("connecting to {authority} failed: {reason}"))
}

fn refuse(status: StatusCode, message: String) -> Response<Body> {
    let mut rsp = Response::new(full(format!("{message}\n")));
    *rsp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(&message) {
        rsp.headers_mut().insert(WEIR_ERROR.clone(), v);
    }
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pump_carries_both_ways_and_idles_out() {
        let metrics = Metrics::new();
        let (mut app, client_side) = tokio::io::duplex(64);
        let (upstream_side, mut server) = tokio::io::duplex(64);
        let task = tokio::spawn({
            let metrics = metrics.clone();
            let bytes = (
                metrics.tunnel_bytes.with_label_values(&["sent"]),
                metrics.tunnel_bytes.with_label_values(&["received"]),
            );
            async move { pump(client_side, upstream_side, Duration::from_secs(5), Duration::from_secs(5), bytes).await }
        });
        app.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        server.write_all(b"pong!").await.unwrap();
        let mut buf = [0u8; 5];
        app.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong!");
        drop(app);
        drop(server);
        task.await.unwrap().unwrap();
        assert_eq!(metrics.tunnel_bytes.with_label_values(&["sent"]).get(), 4);
        assert_eq!(metrics.tunnel_bytes.with_label_values(&["received"]).get(), 5);

        let (_app, client_side) = tokio::io::duplex(64);
        let (upstream_side, _server) = tokio::io::duplex(64);
        let bytes =
            (metrics.tunnel_bytes.with_label_values(&["sent"]), metrics.tunnel_bytes.with_label_values(&["received"]));
        let e = pump(client_side, upstream_side, Duration::from_millis(20), Duration::from_secs(5), bytes)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn a_receiver_that_stops_reading_ends_the_tunnel() {
        let metrics = Metrics::new();
        let (mut app, client_side) = tokio::io::duplex(1 << 20);
        // The upstream's buffer holds 64 bytes and nobody reads them.
        let (upstream_side, _server) = tokio::io::duplex(64);
        let task = tokio::spawn({
            let metrics = metrics.clone();
            let bytes = (
                metrics.tunnel_bytes.with_label_values(&["sent"]),
                metrics.tunnel_bytes.with_label_values(&["received"]),
            );
            async move { pump(client_side, upstream_side, Duration::from_secs(3600), Duration::from_secs(60), bytes).await }
        });
        app.write_all(&[7u8; 4096]).await.unwrap();
        let e = task.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("took no bytes"), "{e}");
        // Paused clock: the write timed out at 60 s, long before the idle hour.
        assert_eq!(metrics.tunnel_bytes.with_label_values(&["sent"]).get(), 0);
    }
}
