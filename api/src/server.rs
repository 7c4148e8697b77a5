//! The one hardened HTTP server every listener of both binaries is built with (the sidecar's
//! traffic and admin listeners, the controller's admin port, the injection webhook): the same
//! accept loop, connection cap, header-read timeout, header size limit, HTTP/2 stream caps and
//! rapid-reset defence, and the same graceful drain. Listeners differ only in their [`Limits`]
//! and in what they do with each accepted connection.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::rt::Drain;

/// What one listener allows a client.
#[derive(Clone, Debug)]
pub struct Limits {
    /// A client must send a request's whole header block within this (slowloris).
    pub header_read_timeout: Duration,
    /// Largest request header block; larger gets `431 Request Header Fields Too Large`.
    pub max_header_bytes: usize,
    /// Connections open at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 flow-control windows (per stream, per connection).
    pub h2_stream_window: u32,
    pub h2_connection_window: u32,
    /// Streams a client may reset before the server accepted them, and stream errors the
    /// server may answer with a reset, before the connection is closed with GOAWAY
    /// (`ENHANCE_YOUR_CALM`): the defence against HTTP/2 rapid reset (CVE-2023-44487).
    pub h2_max_pending_resets: usize,
    pub h2_max_error_resets: usize,
}

impl Limits {
    /// A small administrative endpoint (admin ports, webhook).
    pub fn admin() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            max_connections: 256,
            h2_max_concurrent_streams: 16,
            h2_stream_window: 64 * 1024,
            h2_connection_window: 256 * 1024,
            h2_max_pending_resets: 20,
            h2_max_error_resets: 64,
        }
    }

    /// A listener that carries application traffic.
    pub fn traffic() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            max_connections: 16 * 1024,
            h2_max_concurrent_streams: 100,
            h2_stream_window: 1 << 20,
            h2_connection_window: 4 << 20,
            h2_max_pending_resets: 20,
            h2_max_error_resets: 256,
        }
    }
}

/// The HTTP/1.1 + HTTP/2 connection builder for `limits`.
pub fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper's read buffer bounds the header block (at least 8 KiB); past it, 431.
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .initial_stream_window_size(limits.h2_stream_window)
        .initial_connection_window_size(limits.h2_connection_window)
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_pending_accept_reset_streams(limits.h2_max_pending_resets)
        .max_local_error_reset_streams(limits.h2_max_error_resets)
        // Extended CONNECT (RFC 8441): how one sidecar carries a WebSocket to another.
        .enable_connect_protocol()
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    b
}

/// One accepted connection: its slot under the connection cap, and how to serve HTTP on it.
pub struct Conn {
    pub peer: SocketAddr,
    builder: auto::Builder<TokioExecutor>,
    watcher: Watcher,
    _slot: OwnedSemaphorePermit,
}

impl Conn {
    /// Serves HTTP/1.1 or HTTP/2 (with upgrades) on `io` until the client is done or the
    /// drain's grace period ends.
    pub async fn serve_http<I, S, B>(self, io: I, svc: S) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
        S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.watcher.watch(self.builder.serve_connection_with_upgrades(TokioIo::new(io), svc).into_owned()).await
    }
}

/// Accepts connections on `listener` until `drain` fires, handing each (in its own task) to
/// `on_conn`; then gives the HTTP connections still open `grace` to finish. `what` names the
/// listener in logs.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    limits: &Limits,
    drain: Drain,
    grace: Duration,
    what: &'static str,
    on_conn: F,
) where
    F: Fn(TcpStream, Conn) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let builder = builder(limits);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let stop = drain.signaled();
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, listener = what, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, listener = what, max = limits.max_connections, "connection limit reached; closing a new connection");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = Conn { peer, builder: builder.clone(), watcher: graceful.watcher(), _slot: slot };
        tokio::spawn(on_conn(stream, conn));
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(listener = what, ?grace, "grace period over; closing remaining connections");
    }
}

/// Serves small admin requests on `listener` (with the [`Limits::admin`]
/// limits) until `drain` fires, then gives open connections up to `grace` to finish. The
/// handler learns the client's address: endpoints that change anything or reveal
/// configuration answer only loopback clients (see [`crate::rt::loopback_only`]).
pub async fn serve_admin<F, Fut, B>(listener: TcpListener, handler: F, drain: Drain, grace: Duration)
where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limits = Limits::admin();
    serve(listener, &limits, drain, grace, "admin", move |stream, conn| {
        let handler = handler.clone();
        async move {
            let peer = conn.peer;
            let svc = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req, peer).await) }
            });
            if let Err(e) = conn.serve_http(stream, svc).await {
                tracing::debug!(%peer, error = %e, "admin connection ended with an error");
            }
        }
    })
    .await;
}
