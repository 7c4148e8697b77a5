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
use crate::errors::{ProxyError, chain, is_refused_stream};

type Slot = Arc<tokio::sync::Mutex<Option<http2::SendRequest<Body>>>>;

#[derive(Clone)]
pub struct Clients {
    pub h2: H2Pool,
    h1: legacy::Client<HttpConnector, Body>,
}

impl Clients {
    pub fn new(connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.enforce_http(true);
        let h1 = legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Self { h2: H2Pool::new(connect_timeout), h1 }
    }

    /// Sends an HTTP/1.x request to `addr`, keeping the request's Host header.
    pub async fn send_h1(&self, addr: SocketAddr, mut req: Request<Body>) -> Result<Response<Incoming>, ProxyError> {
        let pq = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
        *req.uri_mut() = format!("http://{addr}{pq}").parse().expect("ip:port and a valid path form a URI");
        self.h1.request(req).await.map_err(|e| {
            let reason = chain(&e);
            if e.is_connect() {
                ProxyError::Connect { addr, reason }
            } else {
                ProxyError::Upstream { addr, reason, refused: is_refused_stream(&e) }
            }
        })
    }
}

#[derive(Clone)]
pub struct H2Pool {
    conns: Arc<Mutex<HashMap<SocketAddr, Slot>>>,
    connect_timeout: Duration,
}

impl H2Pool {
    fn new(connect_timeout: Duration) -> Self {
        Self { conns: Arc::default(), connect_timeout }
    }

    /// Sends `req` over the shared connection to `addr`, connecting (once, however many
    /// requests wait) when there is none. A request the connection never took (it closed
    /// first) is retried once on a new connection.
    pub async fn send(&self, addr: SocketAddr, req: Request<Body>) -> Result<Response<Incoming>, ProxyError> {
        let mut sender = self.sender(addr).await?;
        match sender.try_send_request(req).await {
            Ok(rsp) => Ok(rsp),
            Err(mut e) => match e.take_message() {
                Some(req) if !self.is_usable(&sender) => {
                    let mut sender = self.sender(addr).await?;
                    sender.send_request(req).await.map_err(|e| upstream(addr, &e))
                }
                _ => Err(upstream(addr, e.error())),
            },
        }
    }

    fn is_usable(&self, s: &http2::SendRequest<Body>) -> bool {
        !s.is_closed()
    }

    async fn sender(&self, addr: SocketAddr) -> Result<http2::SendRequest<Body>, ProxyError> {
        let slot = self.conns.lock().unwrap().entry(addr).or_default().clone();
        let mut guard = slot.lock().await;
        if let Some(s) = guard.as_ref()
            && !s.is_closed()
        {
            return Ok(s.clone());
        }
        let s = self.connect(addr).await?;
        *guard = Some(s.clone());
        Ok(s)
    }

    async fn connect(&self, addr: SocketAddr) -> Result<http2::SendRequest<Body>, ProxyError> {
        let connect_err = |reason: String| ProxyError::Connect { addr, reason };
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| connect_err(format!("timed out after {:?}", self.connect_timeout)))?
            .map_err(|e| connect_err(e.to_string()))?;
        let _ = stream.set_nodelay(true);
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
        self.conns.lock().unwrap().retain(|a, _| keep(a));
    }
}

fn upstream(addr: SocketAddr, e: &hyper::Error) -> ProxyError {
    ProxyError::Upstream { addr, reason: chain(e), refused: is_refused_stream(e) }
}
