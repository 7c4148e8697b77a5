//! Every failure the proxy answers for itself, and the one place they become HTTP responses
//! (status plus a `weir-error` header with a short reason).

use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode};

use crate::body::{Body, WEIR_ERROR, full};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("request has no authority (Host header or absolute URI)")]
    NoAuthority,
    #[error("unknown service {authority:?}")]
    UnknownService { authority: String },
    #[error("service {service} has no port {port}")]
    NoSuchPort { service: String, port: u16 },
    #[error("no backend of service {service} has a non-zero weight")]
    NoWeightedBackend { service: String },
    #[error("backend {backend} has no endpoints")]
    NoEndpoints { backend: String },
    #[error("connecting to {addr} failed: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("upstream {addr} failed: {reason}")]
    Upstream { addr: SocketAddr, reason: String, refused: bool },
    #[error("circuit open for backend {backend}")]
    CircuitOpen { backend: String },
    #[error("bulkhead full for backend {backend}")]
    BulkheadFull { backend: String },
    #[error("bulkhead full: max connections to {addr} reached")]
    MaxConnections { addr: SocketAddr },
    #[error("rate limited")]
    RateLimited { retry_after: Duration },
    #[error("fault injected")]
    FaultAbort { status: StatusCode },
    #[error("reading the request body failed: {reason}")]
    ClientBody { reason: String },
    #[error("request timed out after {after:?}")]
    Timeout { after: Duration },
    #[error("forbidden: {reason}")]
    Forbidden { reason: String },
    #[error("no application address is configured for inbound traffic")]
    NoApp,
    #[error("the proxy is not ready: no configuration received from the controller yet")]
    NotReady,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoAuthority | ProxyError::ClientBody { .. } => StatusCode::BAD_REQUEST,
            ProxyError::CircuitOpen { .. } | ProxyError::BulkheadFull { .. } | ProxyError::MaxConnections { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ProxyError::FaultAbort { status } => *status,
            ProxyError::UnknownService { .. } | ProxyError::NoSuchPort { .. } => StatusCode::NOT_FOUND,
            ProxyError::NoWeightedBackend { .. } | ProxyError::NoEndpoints { .. } | ProxyError::NotReady => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } | ProxyError::NoApp => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// A short name of what went wrong (a span's `error.type`).
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::NoAuthority => "no_authority",
            ProxyError::UnknownService { .. } => "unknown_service",
            ProxyError::NoSuchPort { .. } => "no_such_port",
            ProxyError::NoWeightedBackend { .. } => "no_weighted_backend",
            ProxyError::NoEndpoints { .. } => "no_endpoints",
            ProxyError::Connect { .. } => "connect",
            ProxyError::Upstream { .. } => "upstream",
            ProxyError::CircuitOpen { .. } => "circuit_open",
            ProxyError::BulkheadFull { .. } | ProxyError::MaxConnections { .. } => "bulkhead_full",
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::FaultAbort { .. } => "fault",
            ProxyError::ClientBody { .. } => "client_body",
            ProxyError::Timeout { .. } => "timeout",
            ProxyError::Forbidden { .. } => "forbidden",
            ProxyError::NoApp => "no_app",
            ProxyError::NotReady => "not_ready",
        }
    }

    /// The upstream never processed the request (see [`is_refused_stream`]).
    pub fn unprocessed(&self) -> bool {
        matches!(self, ProxyError::Upstream { refused: true, .. })
    }

    /// The gRPC status a gRPC caller gets instead of the HTTP status.
    pub fn grpc_status(&self) -> u32 {
        match self {
            ProxyError::NoAuthority | ProxyError::ClientBody { .. } => 13,
            ProxyError::UnknownService { .. } | ProxyError::NoSuchPort { .. } => 12,
            ProxyError::RateLimited { .. } => 8,
            ProxyError::Forbidden { .. } => 7,
            ProxyError::Timeout { .. } => 4,
            ProxyError::FaultAbort { status } => match status.as_u16() {
                400 => 13,
                401 => 16,
                403 => 7,
                404 => 12,
                _ => 14,
            },
            _ => 14,
        }
    }

    /// The response for this error: HTTP, or a trailers-only gRPC response for gRPC callers.
    pub fn into_response_for(self, grpc: bool) -> Response<Body> {
        if !grpc {
            return self.into_response();
        }
        grpc_error(self.grpc_status(), &self.to_string())
    }

    pub fn into_response(self) -> Response<Body> {
        let message = self.to_string();
        let mut rsp = Response::new(full(format!("{message}\n")));
        *rsp.status_mut() = self.status();
        let reason = HeaderValue::from_str(&message).unwrap_or_else(|_| HeaderValue::from_static("proxy error"));
        rsp.headers_mut().insert(WEIR_ERROR.clone(), reason);
        rsp.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        if let ProxyError::RateLimited { retry_after } = self {
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            rsp.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        rsp
    }
}

/// A trailers-only gRPC response carrying `code` and `message`.
pub fn grpc_error(code: u32, message: &str) -> Response<Body> {
    let mut rsp = Response::new(crate::body::empty());
    let h = rsp.headers_mut();
    h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(&message.replace(|c: char| !c.is_ascii() || c.is_ascii_control(), " ")) {
        h.insert("grpc-message", v.clone());
        h.insert(WEIR_ERROR.clone(), v);
    }
    rsp
}

/// Whether an error (or one of its causes) says the HTTP/2 peer did not process the request,
/// so it is always safe to send again: REFUSED_STREAM, or the peer's GOAWAY naming a last
/// stream below this one (RFC 9113 §6.8).
pub fn is_refused_stream(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(h2) = c.downcast_ref::<h2::Error>()
            && (h2.reason() == Some(h2::Reason::REFUSED_STREAM) || (h2.is_go_away() && h2.is_remote()))
        {
            return true;
        }
        cur = c.source();
    }
    false
}

/// Flattens an error chain into one line.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = c.source();
    }
    s
}
