//! The accept loop both traffic listeners share: protocol detection (HTTP/1.1 or HTTP/2 prior
//! knowledge), connection metrics, and draining on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use weir_api::rt::Drain;

use crate::body::Body;
use crate::metrics::{Direction, Metrics};

/// Accepts connections until `drain` fires, then gives open ones `grace` to finish their
/// requests (HTTP/1.1 closes after the current response, HTTP/2 sends GOAWAY).
pub async fn serve<F, Fut>(
    listener: TcpListener,
    direction: Direction,
    metrics: Metrics,
    handler: F,
    drain: Drain,
    grace: Duration,
) where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(30)).keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .max_concurrent_streams(2048)
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    let active = metrics.active_connections.with_label_values(&[direction.as_str()]);
    let total = metrics.connections.with_label_values(&[direction.as_str()]);
    let stop = drain.signaled();
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, direction = direction.as_str(), "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        total.inc();
        active.inc();
        let handler = handler.clone();
        let svc = hyper::service::service_fn(move |req| {
            let fut = handler(req, peer);
            async move { Ok::<_, Infallible>(fut.await) }
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc).into_owned());
        let active = active.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            active.dec();
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(direction = direction.as_str(), ?grace, "grace period over; closing remaining connections");
    }
}
