//! The mesh's certificate authority: a trust anchor (root) and an issuer (intermediate) kept in
//! a directory, and leaf certificates for SPIFFE IDs issued from CSRs.
//!
//! - [`tokens`]: the local-mode token table proving workload identities.
//! - [`review`]: Kubernetes' proof, a `TokenReview` of a projected ServiceAccount token.
//!
//! The `weir.v1.Identity/Certify` service that hands leaves out is `crate::grpc::certify`.

pub mod review;
pub mod tokens;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Clock skew a new leaf tolerates: it is valid from this long ago.
const BACKDATE: Duration = Duration::from_secs(60);
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const ISSUER_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("certificate error: {0}")]
    Cert(#[from] rcgen::Error),
}

/// Parses a PKCS#10 request (DER), checking its signature.
pub fn parse_csr(csr_der: &[u8]) -> Result<CertificateSigningRequestParams, CsrError> {
    CertificateSigningRequestParams::from_der(&csr_der.to_vec().into()).map_err(|e| CsrError::Malformed(e.to_string()))
}

/// Why a CSR was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("malformed CSR: {0}")]
    Malformed(String),
    #[error("the CSR asks for {asked:?} but the token proves {proven}")]
    WrongIdentity { asked: Vec<String>, proven: String },
}

/// The CA: trust anchor, issuer and the issued leaves' settings.
pub struct Ca {
    pub trust_domain: String,
    pub lifetime: Duration,
    /// The trust-anchor bundle: every root sidecars trust (several during a rotation).
    roots_der: Vec<Vec<u8>>,
    issuer_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
    /// The issuer's expiry: no leaf outlives it.
    issuer_not_after: time::OffsetDateTime,
}

impl Ca {
    /// Expiry (Unix seconds) of the trust anchor that expires first, and of the issuer.
    pub fn expiries(&self) -> (i64, i64) {
        let root = self.roots_der.iter().map(|r| not_after(r)).min().unwrap_or(0);
        (root, not_after(&self.issuer_der))
    }

    /// The trust-anchor bundle (DER), in the order of the file.
    pub fn roots(&self) -> &[Vec<u8>] {
        &self.roots_der
    }

    /// The trust-anchor bundle as PEM (what sidecars are given out of band).
    pub fn roots_pem(&self) -> String {
        self.roots_der.iter().map(|d| cert_pem(d)).collect()
    }
}

/// A certificate issued to a workload.
pub struct Issued {
    pub identity: String,
    pub leaf_der: Vec<u8>,
    pub intermediates_der: Vec<Vec<u8>>,
    pub trust_anchors_der: Vec<Vec<u8>>,
    pub not_after_unix: i64,
}

fn ca_params(cn: &str, lifetime: Duration) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name.push(DnType::OrganizationName, "Weir");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - BACKDATE;
    p.not_after = now + lifetime;
    p
}

fn read(dir: &Path, name: &str) -> Result<Option<String>, CaError> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CaError::File { path, message: e.to_string() }),
    }
}

fn write(dir: &Path, name: &str, contents: &str, secret: bool) -> Result<(), CaError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let err = |e: std::io::Error| CaError::File { path: path.clone(), message: e.to_string() };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&path)
        .map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)
}

/// Every certificate of a PEM bundle (at least one).
pub fn pem_bundle(path: PathBuf, pem_str: &str) -> Result<Vec<Vec<u8>>, CaError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(pem_str.as_bytes())
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::File { path: path.clone(), message: format!("not a PEM certificate bundle: {e}") })?;
    if certs.is_empty() {
        return Err(CaError::File { path, message: "no certificate in the bundle".into() });
    }
    Ok(certs)
}

/// One certificate (DER) as PEM.
pub fn cert_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// A certificate's expiry (Unix seconds; 0 when unreadable).
fn not_after(der: &[u8]) -> i64 {
    x509_parser::parse_x509_certificate(der).map(|(_, c)| c.validity().not_after.timestamp()).unwrap_or(0)
}

/// The issuer's key from PEM: PKCS#8 (`PRIVATE KEY`), or what Helm's `genPrivateKey`,
/// openssl and cert-manager also write: SEC1 (`EC PRIVATE KEY`, P-256 or P-384) and PKCS#1
/// (`RSA PRIVATE KEY`), which are wrapped into PKCS#8 for the signer.
fn issuer_key(pem: &str) -> Result<KeyPair, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    const RSA: &[u64] = &[1, 2, 840, 113549, 1, 1, 1];
    const EC: &[u64] = &[1, 2, 840, 10045, 2, 1];
    const P256: &[u64] = &[1, 2, 840, 10045, 3, 1, 7];
    const P384: &[u64] = &[1, 3, 132, 0, 34];
    let key = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| format!("not a PEM private key: {e}"))?;
    // PrivateKeyInfo (RFC 5208): version 0, the algorithm, the key in the older format.
    let pkcs8 = |alg: &[u64], params: Option<&[u64]>, inner: &[u8]| {
        PrivatePkcs8KeyDer::from(yasna::construct_der(|w| {
            w.write_sequence(|w| {
                w.next().write_u8(0);
                w.next().write_sequence(|w| {
                    w.next().write_oid(&yasna::models::ObjectIdentifier::from_slice(alg));
                    match params {
                        Some(curve) => w.next().write_oid(&yasna::models::ObjectIdentifier::from_slice(curve)),
                        None => w.next().write_null(),
                    }
                });
                w.next().write_bytes(inner);
            })
        }))
    };
    let unsupported = |e: rcgen::Error| format!("unsupported private key: {e}");
    match key {
        PrivateKeyDer::Pkcs8(k) => KeyPair::try_from(&k).map_err(unsupported),
        PrivateKeyDer::Pkcs1(k) => KeyPair::try_from(&pkcs8(RSA, None, k.secret_pkcs1_der())).map_err(unsupported),
        // The curve is whichever one the key is valid on (the signer checks the public key).
        PrivateKeyDer::Sec1(k) => [P256, P384]
            .iter()
            .find_map(|curve| KeyPair::try_from(&pkcs8(EC, Some(curve), k.secret_sec1_der())).ok())
            .ok_or_else(|| "unsupported EC private key: only P-256 and P-384 are".to_string()),
        _ => Err("unsupported private key format".into()),
    }
}

/// Which file set `dir` holds (ours, or a `kubernetes.io/tls` Secret's when ours are all
/// absent and theirs all present) and the contents of its root, issuer and key files.
fn files_in(dir: &Path) -> Result<([&'static str; 3], [Option<String>; 3]), CaError> {
    const OURS: [&str; 3] = ["root.crt", "issuer.crt", "issuer.key"];
    const TLS: [&str; 3] = ["ca.crt", "tls.crt", "tls.key"];
    let read_all = |names: &[&str; 3]| -> Result<[Option<String>; 3], CaError> {
        Ok([read(dir, names[0])?, read(dir, names[1])?, read(dir, names[2])?])
    };
    let ours = read_all(&OURS)?;
    if ours.iter().all(Option::is_none) {
        let as_tls = read_all(&TLS)?;
        if as_tls.iter().all(Option::is_some) {
            return Ok((TLS, as_tls));
        }
    }
    Ok((OURS, ours))
}

/// The current CA; replaced whole when the identity directory changes.
pub type CaRx = tokio::sync::watch::Receiver<Arc<Ca>>;

/// How often the identity directory is checked for a rotated trust bundle or issuer.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// Reloads the CA from `dir` whenever its files change (a Kubernetes Secret mount swaps them
/// atomically; a local directory may be rewritten in place), until `drain` fires. A set that
/// does not load (a partial write, an issuer no anchor signed, a bad key) is logged and counted
/// and the CA in force stays: nothing already working is lost, and the next change is tried.
pub async fn reload(
    dir: PathBuf,
    trust_domain: String,
    lifetime: Duration,
    tx: tokio::sync::watch::Sender<Arc<Ca>>,
    metrics: CaMetrics,
    drain: weir_api::rt::Drain,
) {
    let stop = drain.signaled();
    tokio::pin!(stop);
    let mut seen = files_in(&dir).ok();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RELOAD_EVERY) => {}
            _ = &mut stop => return,
        }
        let (files, present) = match files_in(&dir) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "reading the identity directory");
                continue;
            }
        };
        if seen.as_ref().is_some_and(|(f, p)| *f == files && *p == present) {
            continue;
        }
        seen = Some((files, present.clone()));
        match Ca::from_files(&dir, files, present, &trust_domain, lifetime) {
            Ok(ca) => {
                metrics.record(&ca);
                tracing::info!(dir = %dir.display(), anchors = ca.roots_der.len(), "identity material reloaded");
                tx.send_replace(Arc::new(ca));
                // Counted once in force: a Certify after the count is served by the new CA.
                metrics.reloads.with_label_values(&["ok"]).inc();
            }
            Err(e) => {
                metrics.reloads.with_label_values(&["error"]).inc();
                tracing::error!(error = %e, "the identity directory changed but does not load; the CA in force stays");
            }
        }
    }
}

/// The CA's metrics: expiries and reloads.
#[derive(Clone)]
pub struct CaMetrics {
    pub expiration: prometheus::IntGaugeVec,
    pub reloads: prometheus::IntCounterVec,
}

impl CaMetrics {
    pub fn record(&self, ca: &Ca) {
        let (root, issuer) = ca.expiries();
        self.expiration.with_label_values(&["trust-anchor"]).set(root);
        self.expiration.with_label_values(&["issuer"]).set(issuer);
    }
}

impl Ca {
    /// Loads the trust anchor and issuer from `dir` (`root.crt`, `issuer.crt`, `issuer.key`,
    /// or a `kubernetes.io/tls` Secret's `ca.crt`, `tls.crt`, `tls.key` as cert-manager writes
    /// an issuer); when the directory holds none of them, generates both once and keeps them
    /// there.
    pub fn load_or_create(dir: &Path, trust_domain: &str, lifetime: Duration) -> Result<Self, CaError> {
        std::fs::create_dir_all(dir).map_err(|e| CaError::File { path: dir.into(), message: e.to_string() })?;
        let (_, present) = files_in(dir)?;
        if present.iter().all(Option::is_none) {
            let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let root_params = ca_params("Weir trust anchor", ROOT_LIFETIME);
            let root = root_params.self_signed(&root_key)?;
            let root_issuer = Issuer::new(root_params, root_key);
            let issuer_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let issuer_cert = ca_params("Weir issuer", ISSUER_LIFETIME).signed_by(&issuer_key, &root_issuer)?;
            // The root key is not kept: new issuers come from an offline root in production.
            write(dir, "issuer.key", &issuer_key.serialize_pem(), true)?;
            write(dir, "issuer.crt", &issuer_cert.pem(), false)?;
            write(dir, "root.crt", &root.pem(), false)?;
            tracing::info!(dir = %dir.display(), "generated a new trust anchor and issuer");
        }
        Self::load(dir, trust_domain, lifetime)
    }

    /// Loads the trust anchor and issuer from `dir` (see [`Ca::load_or_create`]); generates
    /// nothing: a missing or partial set is an error naming the file.
    pub fn load(dir: &Path, trust_domain: &str, lifetime: Duration) -> Result<Self, CaError> {
        let (files, present) = files_in(dir)?;
        Self::from_files(dir, files, present, trust_domain, lifetime)
    }

    /// The CA from the contents [`files_in`] read from `dir` (named in errors).
    fn from_files(
        dir: &Path,
        files: [&'static str; 3],
        present: [Option<String>; 3],
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<Self, CaError> {
        if let Some(missing) = files.iter().zip(&present).find(|(_, p)| p.is_none()) {
            return Err(CaError::File {
                path: dir.join(missing.0),
                message: "missing (the directory holds a partial CA)".into(),
            });
        }
        let [root_file, issuer_file, key_file] = files;
        let [root_pem, issuer_pem, key_pem] = present.map(Option::unwrap_or_default);
        let key = issuer_key(&key_pem).map_err(|message| CaError::File { path: dir.join(key_file), message })?;
        let issuer = Issuer::from_ca_cert_pem(&issuer_pem, key)
            .map_err(|e| CaError::File { path: dir.join(issuer_file), message: e.to_string() })?;
        let issuer_der = pem_bundle(dir.join(issuer_file), &issuer_pem)?.swap_remove(0);
        // A certificate and key from different pairs (a rotation caught half-written, a wrong
        // Secret) would sign leaves no one can verify: refuse the set instead.
        let matches = x509_parser::parse_x509_certificate(&issuer_der)
            .is_ok_and(|(_, c)| *c.public_key().subject_public_key.data == *issuer.key().public_key_raw());
        if !matches {
            return Err(CaError::File {
                path: dir.join(key_file),
                message: format!("this key does not belong to the certificate in {issuer_file}"),
            });
        }
        let issuer_not_after = time::OffsetDateTime::from_unix_timestamp(not_after(&issuer_der))
            .map_err(|e| CaError::File { path: dir.join(issuer_file), message: format!("expiry: {e}") })?;
        let roots_der = pem_bundle(dir.join(root_file), &root_pem)?;
        // The issuer must chain to an anchor of the bundle, or every leaf would be refused.
        let chains = roots_der.iter().any(|root| {
            let (Ok((_, r)), Ok((_, i))) =
                (x509_parser::parse_x509_certificate(root), x509_parser::parse_x509_certificate(&issuer_der))
            else {
                return false;
            };
            i.issuer() == r.subject() && i.verify_signature(Some(r.public_key())).is_ok()
        });
        if !chains {
            return Err(CaError::File {
                path: dir.join(issuer_file),
                message: format!("the issuer is not signed by any trust anchor of {root_file}"),
            });
        }
        Ok(Ca { trust_domain: trust_domain.to_string(), lifetime, roots_der, issuer_der, issuer, issuer_not_after })
    }

    /// The SPIFFE ID of a service account.
    pub fn spiffe_id(&self, namespace: &str, service_account: &str) -> String {
        weir_api::spiffe::id(&self.trust_domain, namespace, service_account)
    }

    /// Issues a leaf for `identity` from a CSR (DER) whose only SAN must be that SPIFFE ID.
    pub fn certify(&self, csr_der: &[u8], identity: &str) -> Result<Issued, CsrError> {
        let csr = parse_csr(csr_der)?;
        let asked: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|s| match s {
                SanType::URI(u) => u.as_str().to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        if asked != [identity] {
            return Err(CsrError::WrongIdentity { asked, proven: identity.to_string() });
        }
        let (params, not_after) = self.leaf_params(identity)?;
        let leaf = CertificateSigningRequestParams { params, public_key: csr.public_key }
            .signed_by(&self.issuer)
            .map_err(|e| CsrError::Malformed(e.to_string()))?;
        Ok(self.issued(identity, leaf.der().to_vec(), not_after))
    }

    /// A certificate for `identity` with a key made here: the controller's own, for serving
    /// the control plane over TLS. Returns the issued chain and the PKCS#8 key (DER).
    pub fn issue_own(&self, identity: &str) -> Result<(Issued, Vec<u8>), CsrError> {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| CsrError::Malformed(e.to_string()))?;
        let (params, not_after) = self.leaf_params(identity)?;
        let leaf = params.signed_by(&key, &self.issuer).map_err(|e| CsrError::Malformed(e.to_string()))?;
        Ok((self.issued(identity, leaf.der().to_vec(), not_after), key.serialize_der()))
    }

    /// What a leaf for `identity` says, and when it expires: after `lifetime`, never after
    /// the issuer.
    fn leaf_params(&self, identity: &str) -> Result<(CertificateParams, time::OffsetDateTime), CsrError> {
        let mut params = CertificateParams::default();
        // The SAN is the identity; the subject only says so to humans (`openssl s_client`):
        // CN = <sa>.<ns> when it fits a CN's 64 characters.
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, "Weir");
        if let Some((ns, sa)) = weir_api::spiffe::parse(identity, &self.trust_domain) {
            let cn = format!("{sa}.{ns}");
            if cn.len() <= 64 {
                params.distinguished_name.push(DnType::CommonName, cn);
            }
        }
        params.subject_alt_names = vec![SanType::URI(
            identity.try_into().map_err(|_| CsrError::Malformed(format!("{identity:?} is not a valid URI")))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        let not_after = (now + self.lifetime).min(self.issuer_not_after);
        params.not_before = now - BACKDATE;
        params.not_after = not_after;
        Ok((params, not_after))
    }

    fn issued(&self, identity: &str, leaf_der: Vec<u8>, not_after: time::OffsetDateTime) -> Issued {
        Issued {
            identity: identity.to_string(),
            leaf_der,
            intermediates_der: vec![self.issuer_der.clone()],
            trust_anchors_der: self.roots_der.clone(),
            not_after_unix: not_after.unix_timestamp(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr_for(uri: &str) -> (Vec<u8>, KeyPair) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        (p.serialize_request(&key).unwrap().der().to_vec(), key)
    }

    /// Keys as Helm's `genPrivateKey`, openssl and cert-manager write them sign certificates.
    #[test]
    fn issuer_keys_in_every_common_pem_format() {
        let formats = [
            (include_str!("testdata/sec1-p256.key"), &rcgen::PKCS_ECDSA_P256_SHA256),
            (include_str!("testdata/sec1-p384.key"), &rcgen::PKCS_ECDSA_P384_SHA384),
            (include_str!("testdata/pkcs1-rsa.key"), &rcgen::PKCS_RSA_SHA256),
        ];
        for (pem, alg) in formats {
            let key = issuer_key(pem).unwrap();
            assert!(key.is_compatible(alg), "{pem}");
            ca_params("test", ROOT_LIFETIME).self_signed(&key).unwrap();
        }
        let pkcs8 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        assert_eq!(issuer_key(&pkcs8.serialize_pem()).unwrap().public_key_pem(), pkcs8.public_key_pem());
        let err = issuer_key("-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n").unwrap_err();
        assert!(err.contains("only P-256 and P-384"), "{err}");
        assert!(issuer_key("not a key").unwrap_err().contains("not a PEM private key"));
    }

    #[test]
    fn creates_once_then_reloads_the_same_trust() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), "cluster.local", Duration::from_secs(3600)).unwrap();
        let again = Ca::load_or_create(dir.path(), "cluster.local", Duration::from_secs(3600)).unwrap();
        assert_eq!(ca.roots_der, again.roots_der);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("issuer.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_file(dir.path().join("issuer.crt")).unwrap();
        let err = Ca::load_or_create(dir.path(), "cluster.local", Duration::from_secs(3600)).err().unwrap();
        assert!(err.to_string().contains("issuer.crt"), "{err}");
    }

    /// A `kubernetes.io/tls` Secret as cert-manager writes an issuer certificate.
    #[test]
    fn loads_an_issuer_from_tls_secret_keys() {
        let made = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(made.path(), "cluster.local", Duration::from_secs(3600)).unwrap();
        let mounted = tempfile::tempdir().unwrap();
        for (from, to) in [("root.crt", "ca.crt"), ("issuer.crt", "tls.crt"), ("issuer.key", "tls.key")] {
            std::fs::copy(made.path().join(from), mounted.path().join(to)).unwrap();
        }
        let loaded = Ca::load_or_create(mounted.path(), "cluster.local", Duration::from_secs(3600)).unwrap();
        assert_eq!((&loaded.roots_der, &loaded.issuer_der), (&ca.roots_der, &ca.issuer_der));
        let id = loaded.spiffe_id("shop", "web");
        loaded.certify(&csr_for(&id).0, &id).unwrap();
        // Nothing was generated beside them.
        assert!(!mounted.path().join("root.crt").exists());
    }

    /// What a rotation writes: a bundle of two roots, then an issuer from the new one; a key
    /// from another pair is refused with the file named.
    #[test]
    fn loads_a_bundle_and_refuses_a_key_of_another_certificate() {
        let old = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(old.path(), "cluster.local", Duration::from_secs(3600)).unwrap();
        let new = tempfile::tempdir().unwrap();
        let next = Ca::load_or_create(new.path(), "cluster.local", Duration::from_secs(3600)).unwrap();
        let bundle = format!("{}{}", ca.roots_pem(), next.roots_pem());
        std::fs::write(old.path().join("root.crt"), &bundle).unwrap();
        let both = Ca::load(old.path(), "cluster.local", Duration::from_secs(3600)).unwrap();
        assert_eq!(both.roots().len(), 2);
        // The new issuer's certificate with the old issuer's key: refused.
        std::fs::copy(new.path().join("issuer.crt"), old.path().join("issuer.crt")).unwrap();
        let err = Ca::load(old.path(), "cluster.local", Duration::from_secs(3600)).err().unwrap().to_string();
        assert!(err.contains("issuer.key") && err.contains("does not belong"), "{err}");
        std::fs::copy(new.path().join("issuer.key"), old.path().join("issuer.key")).unwrap();
        let rotated = Ca::load(old.path(), "cluster.local", Duration::from_secs(3600)).unwrap();
        let id = rotated.spiffe_id("shop", "web");
        let issued = rotated.certify(&csr_for(&id).0, &id).unwrap();
        assert_eq!(issued.intermediates_der, std::slice::from_ref(&next.issuer_der));
        // Only the old root left: the new issuer chains to none.
        std::fs::write(old.path().join("root.crt"), ca.roots_pem()).unwrap();
        let err = Ca::load(old.path(), "cluster.local", Duration::from_secs(3600)).err().unwrap().to_string();
        assert!(err.contains("not signed by any trust anchor"), "{err}");
    }

    #[test]
    fn issues_only_the_proven_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), "example.org", Duration::from_secs(3600)).unwrap();
        let id = ca.spiffe_id("shop", "reviews");
        assert_eq!(id, "spiffe://example.org/ns/shop/sa/reviews");
        let (csr, _key) = csr_for(&id);
        let issued = ca.certify(&csr, &id).unwrap();
        assert_eq!(issued.intermediates_der.len(), 1);
        assert!(issued.not_after_unix > weir_api::rt::unix_secs());
        let (other, _) = csr_for("spiffe://example.org/ns/shop/sa/admin");
        assert!(matches!(ca.certify(&other, &id), Err(CsrError::WrongIdentity { .. })));
        assert!(matches!(ca.certify(b"garbage", &id), Err(CsrError::Malformed(_))));
    }
}
