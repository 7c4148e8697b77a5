//! The sidecar's channel to the controller, one helper for both of its clients (Discovery and
//! Identity). With trust anchors ([`ControlTls`]) it is TLS 1.3: the controller must present a
//! certificate chaining to those anchors and naming the controller's SPIFFE ID, and, once this
//! sidecar has a workload certificate, the sidecar presents it (Discovery requires it). The
//! anchors come from a file given out of band (mounted, or written by the injector), never from
//! the network. Without anchors the channel is plaintext: a mesh without identities.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::tls::Credentials;

/// Where the trust anchors come from.
#[derive(Clone, Debug)]
pub enum AnchorSource {
    /// A PEM bundle file, read anew at every use (so a rotated bundle applies without restart).
    File(PathBuf),
    /// A PEM bundle given inline (the injector's environment variable).
    Pem(Arc<str>),
}

impl AnchorSource {
    /// Every certificate of the bundle (DER); an error names the source and what is wrong.
    pub fn load(&self) -> Result<Vec<Vec<u8>>, String> {
        use rustls::pki_types::pem::PemObject;
        let (pem, what) = match self {
            AnchorSource::File(path) => (
                std::fs::read_to_string(path).map_err(|e| format!("reading trust anchors {}: {e}", path.display()))?,
                path.display().to_string(),
            ),
            AnchorSource::Pem(pem) => (pem.to_string(), "WEIR_TRUST_ANCHORS_PEM".to_string()),
        };
        let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
            .map(|c| c.map(|c| c.to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("trust anchors {what}: not a PEM certificate bundle: {e}"))?;
        if certs.is_empty() {
            return Err(format!("trust anchors {what}: no certificate"));
        }
        for c in &certs {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(c.as_slice()))
                .map_err(|e| format!("trust anchors {what}: a certificate cannot be a trust anchor: {e}"))?;
        }
        Ok(certs)
    }
}

/// How the control plane is secured.
#[derive(Clone, Debug)]
pub struct ControlTls {
    pub anchors: AnchorSource,
    /// The SPIFFE ID the controller must present.
    pub controller_identity: String,
}

/// The controller's address and, when the mesh has identities, how to verify it.
#[derive(Clone, Debug)]
pub struct ControlEndpoint {
    /// `host:port`.
    pub addr: String,
    pub tls: Option<ControlTls>,
}

/// Why the channel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("bad controller address {addr:?}: {reason}")]
    Address { addr: String, reason: String },
    #[error("{0}")]
    Anchors(String),
    #[error("connecting to the controller at {addr}: {reason}")]
    Connect { addr: String, reason: String },
}

impl ControlEndpoint {
    /// A channel to the controller, presenting `client` when given (TLS only).
    pub async fn channel(
        &self,
        client: Option<Arc<Credentials>>,
        request_timeout: Option<Duration>,
    ) -> Result<Channel, ChannelError> {
        let mut endpoint = Endpoint::from_shared(format!("http://{}", self.addr))
            .map_err(|e| ChannelError::Address { addr: self.addr.clone(), reason: e.to_string() })?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        if let Some(t) = request_timeout {
            endpoint = endpoint.timeout(t);
        }
        let connect_err = |e: tonic::transport::Error| ChannelError::Connect {
            addr: self.addr.clone(),
            reason: crate::errors::chain(&e),
        };
        let Some(tls) = &self.tls else {
            return endpoint.connect().await.map_err(connect_err);
        };
        let config = client_config(tls, client.as_deref())?;
        let connector = TlsConnector { addr: self.addr.clone(), config };
        endpoint.connect_with_connector(connector).await.map_err(connect_err)
    }
}

/// The rustls client configuration for the controller: its SPIFFE ID, chained to the anchors.
fn client_config(tls: &ControlTls, client: Option<&Credentials>) -> Result<Arc<rustls::ClientConfig>, ChannelError> {
    let anchors = tls.anchors.load().map_err(ChannelError::Anchors)?;
    let verifier = crate::tls::SpiffeServerVerifier::new(anchors, tls.controller_identity.clone());
    let builder = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ChannelError::Anchors(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut cfg = match client {
        Some(c) => {
            let (chain, key) = crate::tls::chain_and_key(c);
            builder.with_client_auth_cert(chain, key).map_err(|e| ChannelError::Anchors(e.to_string()))?
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Connects TCP then TLS to the controller (tonic asks for a new connection through this).
#[derive(Clone)]
struct TlsConnector {
    addr: String,
    config: Arc<rustls::ClientConfig>,
}

type Connecting =
    Pin<Box<dyn Future<Output = Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, std::io::Error>> + Send>>;

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let (addr, config) = (self.addr.clone(), self.config.clone());
        Box::pin(async move {
            let tcp = TcpStream::connect(addr.as_str()).await?;
            let _ = tcp.set_nodelay(true);
            // The certificate is checked for the controller's SPIFFE ID, not for a host name;
            // the name only fills SNI.
            let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h).trim_matches(['[', ']']);
            let name = match host.parse::<std::net::IpAddr>() {
                Ok(ip) => ServerName::IpAddress(ip.into()),
                Err(_) => ServerName::try_from(host.to_string())
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
            };
            let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}
