//! The accept loop both traffic listeners share: protocol detection (HTTP/1.1, HTTP/2 prior
//! knowledge, mesh mTLS told from the application's own TLS by its ALPN, anything else as
//! opaque TCP), refusal of connections bound for the
//! sidecar's own ports, connection metrics, and draining on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::net::{TcpListener, TcpStream};
use weir_api::rt::Drain;

use crate::body::Body;
use crate::metrics::{Direction, Metrics};
use crate::tls::{CredsRx, Io};

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

/// A connection that is not HTTP, handed to the listener's [`OpaqueHandler`]: a redirected
/// connection whose first bytes are not HTTP (nor, inbound, TLS), or a mesh mTLS connection
/// that negotiated [`crate::tls::ALPN_TCP`] (then `peer.identity` is the client's).
pub struct OpaqueConn {
    pub io: Box<dyn Io>,
    pub peer: Peer,
}

/// Whether a redirected connection's original destination is declared opaque TCP (a Service
/// port with appProtocol `tcp`, an inbound port in `--opaque-ports`).
pub type DeclaredOpaque = Arc<dyn Fn(SocketAddr) -> bool + Send + Sync>;

/// What a listener does with [`OpaqueConn`]s (the inbound and outbound paths each have theirs).
pub type OpaqueHandler = Arc<dyn Fn(OpaqueConn) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

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

/// One traffic listener: what it serves and how.
pub struct Listener<F> {
    pub direction: Direction,
    pub metrics: Metrics,
    /// Serves each HTTP request.
    pub handler: F,
    pub drain: Drain,
    /// How long open connections get to finish once draining starts.
    pub grace: Duration,
    /// Mesh mTLS: with credentials, a connection opening a TLS handshake is accepted with the
    /// mesh's server configuration (client certificate required).
    pub tls: Option<CredsRx>,
    /// Connections that are not HTTP (see [`OpaqueConn`]); without one they are served as HTTP
    /// and fail there.
    pub opaque: Option<OpaqueHandler>,
    /// Destinations declared opaque: no detection (no wait for a client that lets the server
    /// speak first); inbound, a meshed client's mTLS is still recognised by its first byte.
    pub declared_opaque: Option<DeclaredOpaque>,
    /// The sidecar's own ports: a redirected connection bound for one of them (another pod
    /// calling `podIP:4140`) is refused and counted, never relayed to the sidecar itself.
    pub own_ports: Vec<u16>,
}

/// Accepts connections until `drain` fires, then gives open ones `grace` to finish their
/// requests (HTTP/1.1 closes after the current response, HTTP/2 sends GOAWAY).
pub async fn serve<F, Fut>(listener: TcpListener, cfg: Listener<F>)
where
    F: Fn(Request<Incoming>, Peer) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let Listener { direction, metrics, handler, drain, grace, tls, opaque, declared_opaque, own_ports } = cfg;
    let own_ports: Arc<[u16]> = own_ports.into();
    let active = metrics.active_connections.with_label_values(&[direction.as_str()]);
    let total = metrics.connections.with_label_values(&[direction.as_str()]);
    let listening = listener.local_addr().ok();
    let limits = weir_api::server::Limits::traffic();
    weir_api::server::serve(listener, &limits, drain, grace, direction.as_str(), move |stream, conn| {
        let (handler, tls, opaque, own_ports, metrics) =
            (handler.clone(), tls.clone(), opaque.clone(), own_ports.clone(), metrics.clone());
        let declared_opaque = declared_opaque.clone();
        let (active, total) = (active.clone(), total.clone());
        async move {
            total.inc();
            let redirected = listening.and_then(|l| original_dst(&stream, l));
            let mut peer = Peer { addr: conn.peer, identity: None, original_dst: redirected };
            if let Some(orig) = redirected
                && own_ports.contains(&orig.port())
            {
                metrics.refused.with_label_values(&[direction.as_str(), "sidecar_port"]).inc();
                tracing::debug!(peer = %peer.addr, %orig, "connection bound for a sidecar port refused");
                return;
            }
            active.inc();
            let _active = scopeguard(active);
            if let (Some(orig), Some(opaque)) = (redirected, &opaque) {
                let declared = declared_opaque.as_ref().is_some_and(|d| d(orig));
                let carried = match (direction, declared) {
                    (Direction::Outbound, true) => true,
                    (Direction::Inbound, true) => peek_protocol(&stream).await != Sniffed::Tls,
                    (Direction::Outbound, false) => peek_protocol(&stream).await != Sniffed::Http,
                    (Direction::Inbound, false) => peek_protocol(&stream).await == Sniffed::Other,
                };
                if carried {
                    opaque(OpaqueConn { io: Box::new(stream), peer }).await;
                    return;
                }
            }
            let (io, identity, alpn_tcp) = match detect(stream, tls.as_ref()).await {
                Ok(Detected::Serve(io, identity, alpn_tcp)) => (io, identity, alpn_tcp),
                Ok(Detected::AppTls(stream)) => {
                    metrics.tls_passthrough.inc();
                    match &opaque {
                        Some(opaque) => opaque(OpaqueConn { io: Box::new(stream), peer }).await,
                        None => tracing::debug!(peer = %peer.addr, "application TLS on a listener without TCP"),
                    }
                    return;
                }
                Err(e) => {
                    metrics.tls_handshake_failures.with_label_values(&[failure_reason(&e)]).inc();
                    tracing::debug!(peer = %peer.addr, error = %e, "connection refused before HTTP");
                    return;
                }
            };
            peer.identity = identity;
            if alpn_tcp {
                match &opaque {
                    Some(opaque) => opaque(OpaqueConn { io, peer }).await,
                    None => tracing::debug!(peer = %peer.addr, "mesh TCP connection on a listener without TCP"),
                }
                return;
            }
            let svc = hyper::service::service_fn(move |req| {
                // Boxed: the handler's state machine is ~10 KB, and hyper moves the future it
                // is given several times per request (into its stream task, the task cell...).
                let fut = Box::pin(handler(req, peer.clone()));
                async move { Ok::<_, Infallible>(fut.await) }
            });
            if let Err(e) = conn.serve_http(io, svc).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
    })
    .await;
}

/// Decrements the open-connections gauge when the connection's task ends, however it ends.
fn scopeguard(gauge: prometheus::IntGauge) -> impl Drop {
    struct Dec(prometheus::IntGauge);
    impl Drop for Dec {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    Dec(gauge)
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

/// What the first bytes of a connection made of it.
enum Detected {
    /// Ready to serve: the stream, the client's SPIFFE ID (over mesh mTLS), and whether the
    /// client asked for an opaque TCP hop ([`crate::tls::ALPN_TCP`]).
    Serve(Box<dyn Io>, Option<Arc<str>>, bool),
    /// TLS the application terminates itself: carried to it untouched.
    AppTls(TcpStream),
}

/// Peeks at the first byte: a TLS handshake is looked at ([`peek_hello`]): mesh mTLS is
/// accepted with the mesh's server configuration (client certificate required) and yields the
/// client's SPIFFE ID, any other TLS is the application's; anything else is served as
/// plaintext.
async fn detect(stream: TcpStream, tls: Option<&CredsRx>) -> std::io::Result<Detected> {
    let Some(creds) = tls else { return Ok(Detected::Serve(Box::new(stream), None, false)) };
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(30), stream.peek(&mut first))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no first byte within 30s"))??;
    if n == 0 || first[0] != TLS_HANDSHAKE {
        return Ok(Detected::Serve(Box::new(stream), None, false));
    }
    let (alpn, server_name) = tokio::time::timeout(Duration::from_secs(10), peek_hello(&stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no whole ClientHello within 10s"))??;
    let offered: Vec<&[u8]> = alpn.iter().map(Vec::as_slice).collect();
    if !crate::tls::is_mesh_hello(&offered, server_name.as_deref()) {
        return Ok(Detected::AppTls(stream));
    }
    let config = crate::tls::server_config(creds)
        .ok_or_else(|| std::io::Error::other("TLS offered but this sidecar has no certificate yet"))?;
    let tls = tokio::time::timeout(Duration::from_secs(10), tokio_rustls::TlsAcceptor::from(config).accept(stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    let session = tls.get_ref().1;
    let identity = session
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| weir_api::spiffe::ids_in_cert(c).into_iter().next())
        .map(Arc::from);
    let alpn_tcp = session.alpn_protocol() == Some(crate::tls::ALPN_TCP);
    Ok(Detected::Serve(Box::new(tls), identity, alpn_tcp))
}

/// The largest ClientHello looked at (post-quantum key shares make them ~2 KiB; 16 KiB is a
/// full TLS record).
const MAX_HELLO: usize = 16 * 1024 + 5;

/// The ALPN offer and server name of the ClientHello at the start of `stream`, read without
/// consuming a byte (rustls parses it), so that the connection can still go to the
/// application whole.
async fn peek_hello(stream: &TcpStream) -> std::io::Result<(Vec<Vec<u8>>, Option<String>)> {
    let mut buf = vec![0u8; MAX_HELLO];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before its ClientHello"));
        }
        let mut acceptor = rustls::server::Acceptor::default();
        let mut seen = &buf[..n];
        while !seen.is_empty() {
            if acceptor.read_tls(&mut seen)? == 0 {
                break;
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let hello = accepted.client_hello();
                let alpn = hello.alpn().map(|offer| offer.map(<[u8]>::to_vec).collect()).unwrap_or_default();
                return Ok((alpn, hello.server_name().map(str::to_string)));
            }
            Ok(None) if n < buf.len() => {
                // The hello is still arriving (rare: it nearly always fits one segment).
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok(None) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "ClientHello too large")),
            Err((e, _)) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        }
    }
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
