//! The accept loop both traffic listeners share: protocol detection (HTTP/1.1 or HTTP/2 prior
//! knowledge), connection metrics, and draining on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use weir_api::rt::Drain;

use crate::body::Body;
use crate::metrics::{Direction, Metrics};
use crate::tls::CredsRx;

/// A byte stream a connection can be served on (plain TCP or TLS).
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Io for T {}

/// Who is on the other end of a connection.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The client's SPIFFE ID when it connected over mesh mTLS.
    pub identity: Option<Arc<str>>,
    /// Where the client meant to connect, when iptables redirected it here (`SO_ORIGINAL_DST`).
    pub original_dst: Option<SocketAddr>,
}

/// The destination a redirected connection was bound for; `None` when it was addressed to the
/// listener itself (or the kernel keeps no NAT record of it).
pub fn original_dst(stream: &TcpStream, listener: SocketAddr) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let orig = if listener.is_ipv4() { sock.original_dst_v4() } else { sock.original_dst_v6() };
    let orig = orig.ok()?.as_socket()?;
    let local = stream.local_addr().ok()?;
    (orig != local && orig != listener).then_some(orig)
}

/// TLS records start with 0x16 (handshake); HTTP never does.
const TLS_HANDSHAKE: u8 = 0x16;

/// How long a redirected connection may stay silent before it is taken for a protocol where
/// the server speaks first (and carried as opaque TCP).
pub const DETECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Redirected connections that are not HTTP (nor, inbound, mesh TLS) are carried as opaque
/// TCP: outbound to where they were bound, inbound to that port on localhost.
#[derive(Clone)]
pub struct Opaque {
    pub connect_timeout: Duration,
    pub tunnels: crate::outbound::tunnel::Tunnels,
}

/// What the first bytes of a connection say.
#[derive(Debug, PartialEq, Eq)]
pub enum Sniffed {
    Http,
    Tls,
    Other,
}

/// HTTP/1 starts with a method token and a space; HTTP/2 with its preface; TLS with 0x16.
pub fn sniff(bytes: &[u8]) -> Sniffed {
    if bytes.first() == Some(&TLS_HANDSHAKE) {
        return Sniffed::Tls;
    }
    if bytes.starts_with(b"PRI * HTTP/2") || b"PRI * HTTP/2".starts_with(bytes) && !bytes.is_empty() {
        return Sniffed::Http;
    }
    let method_len = bytes.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if method_len > 0 && (method_len == bytes.len() || bytes.get(method_len) == Some(&b' ')) && method_len <= 16 {
        return Sniffed::Http;
    }
    Sniffed::Other
}

/// Peeks at a redirected connection's first bytes (until a space shows, 16 bytes, or the
/// detect timeout).
async fn peek_protocol(stream: &TcpStream) -> Sniffed {
    let mut buf = [0u8; 16];
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Err(_) => return Sniffed::Other,
            Ok(Err(_)) | Ok(Ok(0)) => return Sniffed::Other,
            Ok(Ok(n)) => {
                let seen = &buf[..n];
                let verdict = sniff(seen);
                // A method token still arriving: look again once more bytes are in.
                if verdict == Sniffed::Http && n < buf.len() && !seen.contains(&b' ') && !seen.starts_with(b"PRI") {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    if tokio::time::Instant::now() < deadline {
                        continue;
                    }
                }
                return verdict;
            }
        }
    }
}

/// Accepts connections until `drain` fires, then gives open ones `grace` to finish their
/// requests (HTTP/1.1 closes after the current response, HTTP/2 sends GOAWAY). With `tls`,
/// connections whose first byte opens a TLS handshake are served over mesh mTLS; others in
/// plaintext.
#[allow(clippy::too_many_arguments)]
pub async fn serve<F, Fut>(
    listener: TcpListener,
    direction: Direction,
    metrics: Metrics,
    handler: F,
    drain: Drain,
    grace: Duration,
    tls: Option<CredsRx>,
    opaque: Option<Opaque>,
) where
    F: Fn(Request<Incoming>, Peer) -> Fut + Clone + Send + Sync + 'static,
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
    let listening = listener.local_addr().ok();
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
        let redirected = listening.and_then(|l| original_dst(&stream, l));
        total.inc();
        active.inc();
        let (handler, builder, watcher, active, tls) =
            (handler.clone(), builder.clone(), graceful.watcher(), active.clone(), tls.clone());
        let tls_failures = metrics.tls_handshake_failures.clone();
        let (opaque, metrics) = (opaque.clone(), metrics.clone());
        tokio::spawn(async move {
            if let (Some(orig), Some(opaque)) = (redirected, opaque) {
                let protocol = peek_protocol(&stream).await;
                let carried = match direction {
                    Direction::Outbound => protocol != Sniffed::Http,
                    Direction::Inbound => protocol == Sniffed::Other,
                };
                if carried {
                    let target = match direction {
                        Direction::Outbound => orig,
                        Direction::Inbound => SocketAddr::new(
                            if orig.is_ipv4() {
                                std::net::Ipv4Addr::LOCALHOST.into()
                            } else {
                                std::net::Ipv6Addr::LOCALHOST.into()
                            },
                            orig.port(),
                        ),
                    };
                    opaque.tunnels.carry(stream, target, opaque.connect_timeout, &metrics).await;
                    active.dec();
                    return;
                }
            }
            let (io, identity) = match detect(stream, tls.as_ref()).await {
                Ok(x) => x,
                Err(e) => {
                    tls_failures.with_label_values(&[failure_reason(&e)]).inc();
                    tracing::debug!(%peer, error = %e, "connection refused before HTTP");
                    active.dec();
                    return;
                }
            };
            let peer = Peer { addr: peer, identity, original_dst: redirected };
            let svc = hyper::service::service_fn(move |req| {
                // Boxed: the handler's state machine is ~10 KB, and hyper moves the future it
                // is given several times per request (into its stream task, the task cell...).
                let fut = Box::pin(handler(req, peer.clone()));
                async move { Ok::<_, Infallible>(fut.await) }
            });
            let conn = watcher.watch(builder.serve_connection_with_upgrades(TokioIo::new(io), svc).into_owned());
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            active.dec();
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(direction = direction.as_str(), ?grace, "grace period over; closing remaining connections");
    }
}

/// A bounded label for why a connection failed before HTTP: `timeout`, `no_certificate` (this
/// sidecar has none yet), `client_certificate_missing`, `client_certificate_expired`,
/// `client_certificate_untrusted` (another CA), `client_certificate_invalid`, `closed` (the
/// client went away) or `protocol` (not TLS after all, or a TLS error).
pub fn failure_reason(e: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error as TlsError};
    if e.kind() == std::io::ErrorKind::TimedOut {
        return "timeout";
    }
    if let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<TlsError>()) {
        return match tls {
            TlsError::NoCertificatesPresented => "client_certificate_missing",
            TlsError::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
                "client_certificate_expired"
            }
            TlsError::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature) => {
                "client_certificate_untrusted"
            }
            TlsError::InvalidCertificate(_) => "client_certificate_invalid",
            _ => "protocol",
        };
    }
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => {
            "closed"
        }
        std::io::ErrorKind::Other if e.to_string().contains("no certificate yet") => "no_certificate",
        _ => "protocol",
    }
}

/// Peeks at the first byte: a TLS handshake is accepted with the mesh's server configuration
/// (client certificate required) and yields the client's SPIFFE ID; anything else is served
/// as plaintext.
async fn detect(stream: TcpStream, tls: Option<&CredsRx>) -> std::io::Result<(Box<dyn Io>, Option<Arc<str>>)> {
    let Some(creds) = tls else { return Ok((Box::new(stream), None)) };
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(30), stream.peek(&mut first))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no first byte within 30s"))??;
    if n == 0 || first[0] != TLS_HANDSHAKE {
        return Ok((Box::new(stream), None));
    }
    let config = crate::tls::server_config(creds)
        .ok_or_else(|| std::io::Error::other("TLS offered but this sidecar has no certificate yet"))?;
    let tls = tokio::time::timeout(Duration::from_secs(10), tokio_rustls::TlsAcceptor::from(config).accept(stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    let identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| crate::tls::spiffe_ids(c).into_iter().next())
        .map(Arc::from);
    Ok((Box::new(tls), identity))
}

#[cfg(test)]
mod sniff_tests {
    use super::*;

    #[test]
    fn first_bytes_tell_http_tls_and_the_rest() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Sniffed::Http);
        assert_eq!(sniff(b"POST"), Sniffed::Http);
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n"), Sniffed::Http);
        assert_eq!(sniff(&[0x16, 0x03, 0x01]), Sniffed::Tls);
        assert_eq!(sniff(b"hello\n"), Sniffed::Other);
        assert_eq!(sniff(&[0, 0, 0, 8, 4, 210, 22, 47]), Sniffed::Other, "a PostgreSQL startup");
        assert_eq!(sniff(b"SSH-2.0-OpenSSH"), Sniffed::Other);
    }
}
