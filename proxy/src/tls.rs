//! Mutual TLS between sidecars with SPIFFE identities. The client checks that the peer's
//! certificate chains to the mesh's trust anchors and names exactly the SPIFFE ID the
//! controller gave for that endpoint; the server requires a client certificate from the same
//! anchors and hands the client's SPIFFE ID to the inbound stack. Configurations are built from
//! the current credentials for every new connection, so renewals apply without dropping any.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::sync::watch;

/// A certificate chain and the key it certifies.
pub struct Credentials {
    /// The SPIFFE ID.
    pub identity: String,
    /// Leaf first, then intermediates (DER).
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 private key (DER), in memory only.
    pub key_pkcs8: Vec<u8>,
    /// Trust anchors peers are verified against (DER).
    pub roots: Vec<Vec<u8>>,
    pub not_after_unix: i64,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Credentials")
            .field("identity", &self.identity)
            .field("not_after_unix", &self.not_after_unix)
            .finish()
    }
}

/// A byte stream a connection is carried on (plain TCP or TLS), served or dialled.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Io for T {}

pub type CredsRx = watch::Receiver<Option<Arc<Credentials>>>;

/// ALPN of the mesh hop that carries HTTP (multiplexed HTTP/2). What marks a ClientHello as
/// the mesh's, so that TLS an application terminates itself passes through (see
/// [`is_mesh_hello`]).
pub const ALPN_MESH_H2: &[u8] = b"weir.h2/1";
/// Offered after [`ALPN_MESH_H2`] so that a peer sidecar older than it still agrees on h2.
pub const ALPN_LEGACY_H2: &[u8] = b"h2";
/// ALPN of the mesh hop that carries one opaque TCP connection: after the handshake, the bytes
/// are the application's, for the port the client was bound for.
pub const ALPN_TCP: &[u8] = b"weir.tcp/1";

/// What a sidecar offers for the HTTP hop.
pub const OFFER_H2: &[&[u8]] = &[ALPN_MESH_H2, ALPN_LEGACY_H2];
/// What a sidecar offers for an opaque TCP hop.
pub const OFFER_TCP: &[&[u8]] = &[ALPN_TCP];

/// Whether a ClientHello (its ALPN offer and SNI) opens mesh mTLS rather than TLS for the
/// application: it offers a `weir.` protocol, or it is a sidecar older than those (exactly
/// `h2`, no server name: peers are addressed by IP). Anything else (a browser, curl, a gRPC
/// client naming its server) is the application's.
pub fn is_mesh_hello(alpn: &[&[u8]], server_name: Option<&str>) -> bool {
    alpn.iter().any(|p| p.starts_with(b"weir.")) || (alpn == [ALPN_LEGACY_H2] && server_name.is_none())
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn chain_and_key(c: &Credentials) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain = c.chain.iter().map(|d| CertificateDer::from(d.clone())).collect();
    (chain, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key_pkcs8.clone())))
}

/// Verifies a server chain against the mesh anchors and its SPIFFE ID against `expected`
/// (peer sidecars, and the controller).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    anchors: Vec<CertificateDer<'static>>,
    expected: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl SpiffeServerVerifier {
    pub fn new(anchors: Vec<Vec<u8>>, expected: String) -> Self {
        Self { anchors: anchors.into_iter().map(CertificateDer::from).collect(), expected, provider: provider() }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let anchors: Vec<_> = self
            .anchors
            .iter()
            .filter_map(|a| webpki::anchor_from_trusted_cert(a).ok().map(|t| t.to_owned()))
            .collect();
        let ee = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("bad peer certificate: {e}")))?;
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| rustls::Error::General(format!("peer certificate not trusted: {e}")))?;
        let ids = weir_api::spiffe::ids_in_cert(end_entity);
        if ids != [self.expected.as_str()] {
            return Err(rustls::Error::General(format!(
                "peer identity mismatch: expected {}, the peer presented {ids:?}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A client configuration presenting our certificate and expecting `expected` from the peer,
/// offering `alpn` ([`OFFER_H2`] or [`OFFER_TCP`]); `None` while this sidecar has no certificate.
pub fn client_config(creds: &CredsRx, expected: &str, alpn: &[&[u8]]) -> Option<Arc<rustls::ClientConfig>> {
    let c = creds.borrow().clone()?;
    let provider = provider();
    let verifier = SpiffeServerVerifier::new(c.roots.clone(), expected.to_string());
    let (chain, key) = chain_and_key(&c);
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .ok()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)
        .ok()?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Some(Arc::new(cfg))
}

/// A server configuration requiring a client certificate from the mesh's anchors; `None`
/// while this sidecar has no certificate.
pub fn server_config(creds: &CredsRx) -> Option<Arc<rustls::ServerConfig>> {
    let c = creds.borrow().clone()?;
    let provider = provider();
    let mut roots = RootCertStore::empty();
    for r in &c.roots {
        roots.add(CertificateDer::from(r.clone())).ok()?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build().ok()?;
    let (chain, key) = chain_and_key(&c);
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .ok()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .ok()?;
    cfg.alpn_protocols = vec![ALPN_MESH_H2.to_vec(), ALPN_TCP.to_vec(), ALPN_LEGACY_H2.to_vec()];
    Some(Arc::new(cfg))
}

#[cfg(test)]
mod hello_tests {
    use super::*;

    #[test]
    fn mesh_hellos_are_told_from_the_applications() {
        assert!(is_mesh_hello(OFFER_H2, None));
        assert!(is_mesh_hello(OFFER_TCP, None));
        assert!(is_mesh_hello(&[ALPN_LEGACY_H2], None), "a sidecar from before weir.h2/1");
        assert!(!is_mesh_hello(&[b"h2", b"http/1.1"], Some("shop.example")), "curl");
        assert!(!is_mesh_hello(&[b"h2"], Some("orders.shop.svc")), "a gRPC client naming its server");
        assert!(!is_mesh_hello(&[], None), "no ALPN at all");
        assert!(!is_mesh_hello(&[b"http/1.1"], None));
    }
}
