//! HTTP Upgrade through the sidecar pair: WebSocket, and any other protocol an HTTP/1.1 client
//! switches to (except `h2c`, which is declined: the request is answered in HTTP/1.1, as the
//! RFC allows and Envoy does by default).
//!
//! `Upgrade` is hop-by-hop only where the next hop cannot carry it. Between sidecars the
//! request rides the multiplexed HTTP/2 connection as an extended CONNECT (RFC 8441:
//! `:protocol` names the token), which the receiving sidecar turns back into the client's
//! HTTP/1.1 upgrade for the application. To an unmeshed endpoint and to the application it
//! stays HTTP/1.1 with `Connection: upgrade`. The request is routed, authorized, counted and
//! logged like any other (authorization judges the client's method and path, not the
//! CONNECT); once the application answers 101, bytes flow both ways as an opaque tunnel
//! (bounded, idle-timed, drained like the others, see [`crate::tunnel`]).

use http::{HeaderValue, Method, Response, StatusCode, Version, header, request};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::body::{Body, strip_hop_by_hop};
use crate::metrics::Metrics;
use crate::tunnel::Tunnels;

/// A switch the client asked for: the protocol token, and how its request came.
pub struct Requested {
    pub token: HeaderValue,
    /// Extended CONNECT (a peer sidecar, or an HTTP/2 client): accepted with 200, not 101.
    pub connect: bool,
    pub on_upgrade: OnUpgrade,
}

/// The switch `parts` asks for, taking its upgrade handle: an HTTP/1.1 `Connection: upgrade`
/// with an `Upgrade` token (not `h2c`), or an HTTP/2 extended CONNECT. An extended CONNECT
/// becomes the GET it stands for (RFC 8441 §5), so that everything after judges the client's
/// request.
pub fn take(parts: &mut request::Parts) -> Option<Requested> {
    let (token, connect) = if parts.method == Method::CONNECT {
        let protocol = parts.extensions.get::<hyper::ext::Protocol>()?;
        (HeaderValue::from_str(protocol.as_str()).ok()?, true)
    } else {
        if parts.version != Version::HTTP_11 || !connection_has(&parts.headers, "upgrade") {
            return None;
        }
        let token = parts.headers.get(header::UPGRADE)?.clone();
        if token.as_bytes().eq_ignore_ascii_case(b"h2c") {
            return None;
        }
        (token, false)
    };
    let on_upgrade = parts.extensions.remove::<OnUpgrade>()?;
    if connect {
        parts.method = Method::GET;
        parts.extensions.remove::<hyper::ext::Protocol>();
    }
    Some(Requested { token, connect, on_upgrade })
}

fn connection_has(headers: &http::HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Puts the HTTP/1.1 upgrade headers (back) on a request for the next hop.
pub fn as_http1(parts: &mut request::Parts, token: &HeaderValue) {
    parts.version = Version::HTTP_11;
    parts.method = Method::GET;
    parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    parts.headers.insert(header::UPGRADE, token.clone());
}

/// Makes `parts` the extended CONNECT that carries the upgrade to a peer sidecar.
pub fn as_extended_connect(parts: &mut request::Parts, token: &HeaderValue) {
    parts.method = Method::CONNECT;
    parts.version = Version::HTTP_2;
    parts.headers.remove(header::CONTENT_LENGTH);
    if let Ok(t) = token.to_str() {
        parts.extensions.insert(hyper::ext::Protocol::from(t));
    }
}

/// Whether the upstream accepted the switch: 101 from HTTP/1.1, 2xx to an extended CONNECT.
pub fn accepted(rsp: &Response<Body>) -> bool {
    rsp.status() == StatusCode::SWITCHING_PROTOCOLS || (rsp.status().is_success() && rsp.version() == Version::HTTP_2)
}

/// The upstream accepted `client`'s switch with `upstream`: answers the client (101, or 200 to
/// an extended CONNECT) with the upstream's headers, and carries bytes between the two
/// connections once both have switched. No tunnel slot: 503.
pub fn switch(
    client: Requested,
    mut upstream: Response<Body>,
    tunnels: &Tunnels,
    metrics: &Metrics,
    what: String,
) -> Response<Body> {
    let Some(slot) = tunnels.slot(metrics, &what) else {
        let mut rsp = Response::new(crate::body::full("too many tunnels open\n"));
        *rsp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return rsp;
    };
    let upstream_io = hyper::upgrade::on(&mut upstream);
    let (mut parts, _) = upstream.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(&crate::body::ORIG_PROTO);
    parts.headers.remove(header::CONTENT_LENGTH);
    if client.connect {
        parts.status = StatusCode::OK;
        parts.version = Version::HTTP_2;
    } else {
        parts.status = StatusCode::SWITCHING_PROTOCOLS;
        parts.version = Version::HTTP_11;
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, client.token.clone());
    }
    let (tunnels, metrics) = (tunnels.clone(), metrics.clone());
    tokio::spawn(async move {
        match tokio::try_join!(client.on_upgrade, upstream_io) {
            Ok((c, u)) => tunnels.carry(slot, TokioIo::new(c), TokioIo::new(u), &what, &metrics, None).await,
            Err(e) => {
                metrics.tunnels.with_label_values(&["error"]).inc();
                tracing::debug!(%what, error = %e, "protocol switch failed");
            }
        }
    });
    Response::from_parts(parts, crate::body::empty())
}
