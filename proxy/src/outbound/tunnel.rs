//! `CONNECT host:port` on the outbound listener: an opaque TCP tunnel to a destination outside
//! the mesh, so TLS that the application originates itself (HTTPS to an external site through
//! `HTTPS_PROXY`) passes through untouched — the sidecar never sees inside it.
//!
//! Mesh Services are not tunnelled: their traffic must go through routing, policies and mesh
//! mTLS, so a CONNECT to one is refused with a hint to send plain HTTP.

use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::{Body, WEIR_ERROR, full};
use crate::config::Config;
use crate::metrics::Metrics;

/// Answers a CONNECT: 200 once the destination accepted the connection, then bytes flow both
/// ways until either side closes.
pub async fn connect(
    mut req: Request<Incoming>,
    config: Option<&Config>,
    connect_timeout: Duration,
    metrics: &Metrics,
) -> Response<Body> {
    let Some(authority) = req.uri().authority().cloned() else {
        return refuse(StatusCode::BAD_REQUEST, "CONNECT needs host:port".into());
    };
    let Some(port) = authority.port_u16() else {
        return refuse(StatusCode::BAD_REQUEST, format!("CONNECT {authority}: no port"));
    };
    if let Some(svc) = config.and_then(|c| c.lookup(authority.host())) {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("CONNECT to mesh service {}: send plain HTTP, the mesh adds mTLS", svc.key),
        );
    }
    let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
    let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect((host.as_str(), port))).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return tunnel_failed(metrics, &authority, e.to_string()),
        Err(_) => return tunnel_failed(metrics, &authority, format!("timed out after {connect_timeout:?}")),
    };
    let _ = stream.set_nodelay(true);
    let upgrade = hyper::upgrade::on(&mut req);
    metrics.tunnels.with_label_values(&["ok"]).inc();
    let bytes = metrics.tunnel_bytes.clone();
    tokio::spawn(async move {
        let mut stream = stream;
        match upgrade.await {
            Ok(upgraded) => {
                let mut client = TokioIo::new(upgraded);
                match tokio::io::copy_bidirectional(&mut client, &mut stream).await {
                    Ok((sent, received)) => {
                        bytes.with_label_values(&["sent"]).inc_by(sent);
                        bytes.with_label_values(&["received"]).inc_by(received);
                    }
                    Err(e) => tracing::debug!(%authority, error = %e, "tunnel ended with an error"),
                }
            }
            Err(e) => tracing::debug!(%authority, error = %e, "CONNECT upgrade failed"),
        }
    });
    Response::new(crate::body::empty())
}

fn tunnel_failed(metrics: &Metrics, authority: &http::uri::Authority, reason: String) -> Response<Body> {
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
