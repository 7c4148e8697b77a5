//! The control plane over TLS. When the controller serves identities, its gRPC port speaks only
//! TLS 1.3 with a certificate from the mesh CA for the controller's own SPIFFE ID (renewed at
//! half its lifetime), which sidecars verify against the trust anchors they were given out of
//! band. A client certificate is optional at the handshake, since `Identity/Certify` is how a
//! sidecar gets its first one; `Discovery` then requires one (see [`PeerInfo`]).
//!
//! Handshakes run in their own tasks (bounded, each within a timeout), so a slow or silent
//! client never holds up the accept loop.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use weir_api::rt::Drain;

use crate::identity::{Ca, CaRx};

/// Handshakes in progress at once; more wait in the kernel's accept queue.
const MAX_HANDSHAKES: usize = 256;
/// A client must finish the TLS handshake within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is on the other end of a control-plane connection: a request extension of every call.
#[derive(Clone, Debug, Default)]
pub struct PeerInfo {
    pub addr: Option<SocketAddr>,
    /// The SPIFFE ID of a verified client certificate (mesh mTLS); `None` without one, and
    /// always `None` when the control plane is plaintext.
    pub identity: Option<Arc<str>>,
}

/// One accepted connection, TLS or (without identities) plain TCP.
pub struct ControlConn {
    io: Io,
    info: PeerInfo,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl tonic::transport::server::Connected for ControlConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for ControlConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ControlConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// The controller's serving credentials, renewed in place: at half their lifetime, and at
/// once when the CA changes (a new issuer or trust bundle).
pub struct ServerTls {
    ca: CaRx,
    identity: String,
    config: RwLock<Arc<rustls::ServerConfig>>,
}

impl ServerTls {
    /// Issues the controller's certificate for `identity` (a SPIFFE ID) from `ca`.
    pub fn new(ca: CaRx, identity: String) -> anyhow::Result<Arc<Self>> {
        let config = server_config(&ca.borrow(), &identity)?;
        Ok(Arc::new(Self { ca, identity, config: RwLock::new(config) }))
    }

    /// The SPIFFE ID the controller serves as.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn current(&self) -> Arc<rustls::ServerConfig> {
        self.config.read().unwrap().clone()
    }

    /// Re-issues the serving certificate at half its lifetime, or when the CA changes, until
    /// `drain` fires.
    pub async fn renew(self: Arc<Self>, drain: Drain) {
        let stop = drain.signaled();
        tokio::pin!(stop);
        let mut ca = self.ca.clone();
        ca.mark_unchanged();
        loop {
            let every = (ca.borrow().lifetime / 2).max(Duration::from_secs(1));
            let why = tokio::select! {
                _ = tokio::time::sleep(every) => "renewed",
                changed = ca.changed() => match changed {
                    Ok(()) => "re-issued by the new CA",
                    Err(_) => return,
                },
                _ = &mut stop => return,
            };
            let issued = server_config(&ca.borrow_and_update(), &self.identity);
            match issued {
                Ok(c) => {
                    *self.config.write().unwrap() = c;
                    tracing::info!(identity = %self.identity, "control-plane certificate {why}");
                }
                Err(e) => tracing::error!(error = %e, "renewing the control-plane certificate failed"),
            }
        }
    }
}

fn server_config(ca: &Ca, identity: &str) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let (issued, key) = ca.issue_own(identity)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for r in ca.roots() {
        roots.add(CertificateDer::from(r.clone()))?;
    }
    // A client certificate is verified when presented, and optional: Certify is how a sidecar
    // gets its first one. Discovery refuses streams without one (PeerInfo::identity).
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let mut chain = vec![CertificateDer::from(issued.leaf_der)];
    chain.extend(issued.intermediates_der.into_iter().map(CertificateDer::from));
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// The connections tonic serves: accepted on `listener`, TLS-terminated with `tls` when given
/// (a client that fails the handshake never reaches gRPC), until `drain` fires.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    failures: prometheus::IntCounterVec,
    drain: Drain,
) -> ReceiverStream<Result<ControlConn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let stop = drain.signaled();
        tokio::pin!(stop);
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let (stream, addr) = tokio::select! {
                _ = &mut stop => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "control-plane accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // No Nagle: a small (incremental) snapshot must not wait for the ack of the
            // previous segment (delayed ACKs held every one ~40 ms).
            let _ = stream.set_nodelay(true);
            let (tx, tls, failures) = (tx.clone(), tls.clone(), failures.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let conn = match tls {
                    None => ControlConn { io: Io::Plain(stream), info: PeerInfo { addr: Some(addr), identity: None } },
                    Some(tls) => {
                        let accept = tokio_rustls::TlsAcceptor::from(tls.current()).accept(stream);
                        let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                failures.with_label_values(&["handshake"]).inc();
                                tracing::debug!(%addr, error = %e, "control-plane TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                failures.with_label_values(&["timeout"]).inc();
                                tracing::debug!(%addr, "control-plane TLS handshake timed out");
                                return;
                            }
                        };
                        let identity = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| weir_api::spiffe::ids_in_cert(c).into_iter().next())
                            .map(Arc::from);
                        ControlConn { io: Io::Tls(Box::new(stream)), info: PeerInfo { addr: Some(addr), identity } }
                    }
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}
