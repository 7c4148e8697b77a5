//! Upstream connections.
//!
//! - [`H2Pool`]: one multiplexed HTTP/2 connection per address. Used for the
//!   sidecar-to-sidecar hop (every request, whatever the client spoke) and for HTTP/2
//!   (h2c, gRPC) to unmeshed endpoints and the local application. The request URI keeps the
//!   client's authority; the address is chosen here, not from the URI.
//! - HTTP/1.1: hyper-util's pooled client, addressed by `http://ip:port` with the client's
//!   `Host` header kept.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::Request;
use hyper::Response;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::client::legacy::{self, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::body::Body;
use crate::config::ConnectOpts;
use crate::errors::{ProxyError, chain, is_refused_stream};
use crate::replay::ReplayBody;

type Slot = Arc<tokio::sync::Mutex<SlotState>>;
/// A pooled connection: (address, the peer identity it was verified for when over TLS).
type PoolAddr = (SocketAddr, Option<Arc<str>>);

/// Default time an unused HTTP/1.1 upstream connection is kept.
const DEFAULT_IDLE: Duration = Duration::from_secs(90);

type H1 = legacy::Client<LimitedConnector, Body>;
type PoolKey = (Duration, Duration, Option<(Arc<str>, u32)>);

#[derive(Clone)]
pub struct Clients {
    pub h2: H2Pool,
    connect_timeout: Duration,
    /// One HTTP/1.1 pool per distinct (connect, idle, limit) setting.
    h1: Arc<Mutex<HashMap<PoolKey, H1>>>,
}

/// Makes TCP connections, at most `slots` open at once when set; each connection holds its
/// slot until it closes.
#[derive(Clone)]
pub struct LimitedConnector {
    inner: HttpConnector,
    slots: Option<Arc<tokio::sync::Semaphore>>,
    wait: Duration,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<http::Uri> for LimitedConnector {
    type Response = LimitedConn;
    type Error = BoxError;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<LimitedConn, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let mut inner = self.inner.clone();
        let (slots, wait) = (self.slots.clone(), self.wait);
        Box::pin(async move {
            let permit = match slots {
                Some(s) => Some(
                    tokio::time::timeout(wait, s.acquire_owned())
                        .await
                        .map_err(|_| MaxConnections)?
                        .map_err(|_| "connection limit closed")?,
                ),
                None => None,
            };
            let io = inner.call(uri).await?;
            Ok(LimitedConn { io, _permit: permit })
        })
    }
}

/// Every connection slot stayed taken for the whole connect timeout.
#[derive(Debug, thiserror::Error)]
#[error("max connections reached")]
pub struct MaxConnections;

/// A connection and the slot it holds.
pub struct LimitedConn {
    io: TokioIo<TcpStream>,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl hyper::rt::Read for LimitedConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for LimitedConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

impl hyper_util::client::legacy::connect::Connection for LimitedConn {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.io.connected()
    }
}

/// Most distinct HTTP/1.1 pools; settings come from configuration, this is a backstop.
const MAX_H1_POOLS: usize = 64;

impl Clients {
    pub fn new(connect_timeout: Duration) -> Self {
        Self { h2: H2Pool::new(connect_timeout), connect_timeout, h1: Arc::default() }
    }

    /// The default time a TCP connect may take.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    fn h1_pool(&self, opts: &ConnectOpts) -> H1 {
        let key = (opts.connect.unwrap_or(self.connect_timeout), opts.idle.unwrap_or(DEFAULT_IDLE), opts.limit.clone());
        let mut g = self.h1.lock().unwrap();
        if let Some(c) = g.get(&key) {
            return c.clone();
        }
        if g.len() >= MAX_H1_POOLS {
            g.clear();
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(key.0));
        connector.enforce_http(true);
        let slots = key.2.as_ref().map(|(_, max)| Arc::new(tokio::sync::Semaphore::new(*max as usize)));
        let connector = LimitedConnector { inner: connector, slots, wait: key.0 };
        let client = legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(key.1)
            .pool_max_idle_per_host(256)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        g.insert(key, client.clone());
        client
    }

    /// Sends an HTTP/1.x request to `addr`, keeping the request's Host header.
    pub async fn send_h1(
        &self,
        addr: SocketAddr,
        mut req: Request<Body>,
        opts: ConnectOpts,
    ) -> Result<Response<Incoming>, ProxyError> {
        *req.uri_mut() = crate::body::absolute_uri(addr, req.uri()).expect("ip:port and a valid path form a URI");
        self.h1_pool(&opts).request(req).await.map_err(|e| {
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(c) = cause {
                if c.is::<MaxConnections>() {
                    return ProxyError::MaxConnections { addr };
                }
                cause = c.source();
            }
            let mut reason = chain(&e);
            if e.is_connect() && reason.contains("deadline has elapsed") {
                reason = format!("timed out after {:?}", opts.connect.unwrap_or(self.connect_timeout));
            }
            if e.is_connect() {
                ProxyError::Connect { addr, reason }
            } else {
                ProxyError::Upstream { addr, reason, refused: is_refused_stream(&e) }
            }
        })
    }
}

/// Where mesh mTLS goes: this sidecar's credentials and the SPIFFE ID the peer must present.
pub struct TlsTarget {
    pub creds: crate::tls::CredsRx,
    pub expected: Arc<str>,
}

impl TlsTarget {
    /// Mesh mTLS to a peer sidecar whose identity the controller gave (in namespace `ns`),
    /// when this sidecar has an identity (`creds`). Never plaintext to a peer with an
    /// identity: without a certificate yet, the connect fails ("no workload certificate").
    pub fn for_endpoint(
        creds: Option<&crate::tls::CredsRx>,
        trust_domain: &str,
        ns: &str,
        endpoint: &crate::config::Endpoint,
    ) -> Option<Self> {
        match creds {
            Some(creds) if endpoint.meshed && !endpoint.identity.is_empty() => {
                let expected = weir_api::spiffe::id(trust_domain, ns, &endpoint.identity);
                Some(TlsTarget { creds: creds.clone(), expected: expected.into() })
            }
            _ => None,
        }
    }
}

/// A TCP connection to `addr` within `timeout` (no Nagle delay); the error says why not.
pub async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, String> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("timed out after {timeout:?}"))?
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Mesh mTLS to the peer sidecar at `addr` (its certificate must name `target.expected`),
/// offering `alpn`; connect and handshake each within `timeout`.
pub async fn connect_mesh(
    addr: SocketAddr,
    timeout: Duration,
    target: &TlsTarget,
    alpn: &[&[u8]],
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let tcp = connect_tcp(addr, timeout).await?;
    let cfg = crate::tls::client_config(&target.creds, &target.expected, alpn)
        .ok_or_else(|| "this sidecar has no workload certificate".to_string())?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let handshake = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp);
    tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| format!("TLS handshake timed out after {timeout:?}"))?
        .map_err(|e| format!("TLS handshake failed: {e}"))
}

#[derive(Clone)]
pub struct H2Pool {
    conns: Arc<Mutex<HashMap<PoolAddr, Slot>>>,
    connect_timeout: Duration,
}

/// The connection to one address, and what became of the last attempt to make one.
#[derive(Default)]
struct SlotState {
    sender: Option<http2::SendRequest<Body>>,
    /// Counts connections made, so that a request can retire the one it used, not a newer one.
    generation: u64,
    /// The last connect failed at this instant, for this reason: requests that were already
    /// waiting share the failure rather than each trying (and timing out) in turn.
    failed: Option<(tokio::time::Instant, String)>,
}

impl H2Pool {
    fn new(connect_timeout: Duration) -> Self {
        Self { conns: Arc::default(), connect_timeout }
    }

    /// Sends `req` over the shared connection to `addr`, connecting (once, however many
    /// requests wait) when there is none. A request the connection never took (it closed
    /// first) is retried once on a new connection.
    pub async fn send(
        &self,
        addr: SocketAddr,
        req: Request<Body>,
        opts: ConnectOpts,
    ) -> Result<Response<Incoming>, ProxyError> {
        self.send_tls(addr, req, opts, None).await
    }

    /// Like [`send`](Self::send), over mutual TLS when `tls` is given (the connection is
    /// then separate from any plaintext one to the same address, and from one verified for
    /// another identity). The TLS configuration is only built when a connection is made.
    ///
    /// When the peer says it never processed the request (REFUSED_STREAM, or a GOAWAY below
    /// the request's stream), the connection is retired: the next request (or the caller's
    /// replay, see [`replaying`]) opens a new one.
    pub async fn send_tls(
        &self,
        addr: SocketAddr,
        req: Request<Body>,
        opts: ConnectOpts,
        tls: Option<&TlsTarget>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let connect = opts.connect.unwrap_or(self.connect_timeout);
        let (mut sender, generation) = self.sender(addr, connect, tls).await?;
        let result = match sender.try_send_request(req).await {
            Ok(rsp) => return Ok(rsp),
            Err(mut e) => match e.take_message() {
                Some(req) => {
                    self.retire(addr, tls, generation);
                    let (mut sender, generation) = self.sender(addr, connect, tls).await?;
                    let result = sender.send_request(req).await;
                    result.map_err(|e| (upstream(addr, &e), generation))
                }
                None => Err((upstream(addr, e.error()), generation)),
            },
        };
        result.map_err(|(e, generation)| {
            if e.unprocessed() {
                self.retire(addr, tls, generation);
            }
            e
        })
    }

    /// Forgets the connection of `generation` to `addr`, if it is still the pooled one.
    fn retire(&self, addr: SocketAddr, tls: Option<&TlsTarget>, generation: u64) {
        let key = (addr, tls.map(|t| t.expected.clone()));
        let Some(slot) = self.conns.lock().unwrap().get(&key).cloned() else { return };
        // A request holding the lock is connecting anew: nothing to retire then.
        if let Ok(mut g) = slot.try_lock()
            && g.generation == generation
        {
            g.sender = None;
        }
    }

    async fn sender(
        &self,
        addr: SocketAddr,
        connect: Duration,
        tls: Option<&TlsTarget>,
    ) -> Result<(http2::SendRequest<Body>, u64), ProxyError> {
        let key = (addr, tls.map(|t| t.expected.clone()));
        let slot = self.conns.lock().unwrap().entry(key).or_default().clone();
        let waited_from = tokio::time::Instant::now();
        let mut guard = slot.lock().await;
        if let Some(s) = guard.sender.as_ref()
            && !s.is_closed()
        {
            return Ok((s.clone(), guard.generation));
        }
        if let Some((at, reason)) = &guard.failed
            && *at >= waited_from
        {
            return Err(ProxyError::Connect { addr, reason: reason.clone() });
        }
        // Boxed: connecting (TCP, TLS and HTTP/2 handshakes) is rare, and its state would
        // otherwise make every request's future larger.
        match Box::pin(self.connect(addr, connect, tls)).await {
            Ok(s) => {
                guard.generation += 1;
                guard.sender = Some(s.clone());
                guard.failed = None;
                Ok((s, guard.generation))
            }
            Err(e) => {
                if let ProxyError::Connect { reason, .. } = &e {
                    guard.failed = Some((tokio::time::Instant::now(), reason.clone()));
                }
                Err(e)
            }
        }
    }

    async fn connect(
        &self,
        addr: SocketAddr,
        timeout: Duration,
        tls: Option<&TlsTarget>,
    ) -> Result<http2::SendRequest<Body>, ProxyError> {
        let connect_err = |reason: String| ProxyError::Connect { addr, reason };
        let stream: Box<dyn crate::tls::Io> = match tls {
            None => Box::new(connect_tcp(addr, timeout).await.map_err(connect_err)?),
            Some(target) => {
                Box::new(connect_mesh(addr, timeout, target, crate::tls::OFFER_H2).await.map_err(connect_err)?)
            }
        };
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| connect_err(chain(&e)))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %chain(&e), "HTTP/2 connection ended");
            }
        });
        Ok(sender)
    }

    /// Drops connections to addresses no longer in the configuration.
    pub fn retain(&self, keep: impl Fn(&SocketAddr) -> bool) {
        self.conns.lock().unwrap().retain(|(a, _), _| keep(a));
    }
}

fn upstream(addr: SocketAddr, e: &hyper::Error) -> ProxyError {
    ProxyError::Upstream { addr, reason: chain(e), refused: is_refused_stream(e) }
}

/// Most times one attempt is sent again because the upstream never processed it.
const MAX_UNPROCESSED_REPLAYS: u32 = 3;

/// Sends a copy of `body` with `send`; while the upstream answers that it never processed
/// the request (a refused stream, a GOAWAY below it, a connection that closed before taking
/// it), sends it again on a new connection, as Envoy and Linkerd do: no retry policy, budget
/// or back-off is involved, since the application never saw the request. Counted in
/// `replays` under `direction`. Stops when the body has grown past what [`ReplayBody`] keeps.
pub async fn replaying<F, Fut>(
    body: &ReplayBody,
    (replays, direction): (&prometheus::IntCounterVec, &str),
    mut send: F,
) -> Result<Response<Incoming>, ProxyError>
where
    F: FnMut(Body) -> Fut,
    Fut: std::future::Future<Output = Result<Response<Incoming>, ProxyError>>,
{
    let mut replayed = 0;
    loop {
        let copy = body.replay().ok_or(ProxyError::ClientBody { reason: "request body not replayable".into() })?;
        match send(crate::body::boxed(copy)).await {
            Err(e) if e.unprocessed() && replayed < MAX_UNPROCESSED_REPLAYS && body.replayable() => {
                tracing::debug!(error = %e, "upstream did not process the request: sending it again");
                replays.with_label_values(&[direction]).inc();
                replayed += 1;
            }
            result => return result,
        }
    }
}
