//! The sidecar's workload identity. At start it generates a key pair in memory (never written
//! anywhere), asks the controller's `Identity/Certify` (over TLS, the controller verified
//! against the trust anchors) for a certificate with the token from `--token-file`, and renews
//! at 70 % of the certificate's lifetime, retrying failures with jittered back-off. Peers are
//! verified against the anchors given out of band, never against what Certify returns; a
//! changed anchor file re-certifies at once, so a rotated bundle applies without restart. Credentials are published through a `watch` so TLS can hot-swap them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use rcgen::{CertificateParams, KeyPair, SanType};
use tokio::sync::watch;
use weir_api::proto;
use weir_api::rt::Drain;

use crate::tls::Credentials;

#[derive(Clone, Debug)]
pub struct IdentityConfig {
    /// The controller, over server-authenticated TLS (the token never travels in the clear).
    pub endpoint: crate::channel::ControlEndpoint,
    pub token_file: PathBuf,
    /// spiffe://<trust-domain>/ns/<ns>/sa/<sa>
    pub identity: String,
}

#[derive(Clone)]
pub struct IdentityMetrics {
    pub expiration: IntGauge,
    pub renewals: IntCounterVec,
    /// Roots in the bundle peers are verified against (two during a rotation).
    pub anchors: IntGauge,
}

impl IdentityMetrics {
    pub fn register(registry: &Registry) -> Self {
        let expiration = IntGauge::new(
            "weir_identity_cert_expiration_timestamp_seconds",
            "Expiry of the workload certificate (Unix seconds)",
        )
        .unwrap();
        let renewals = IntCounterVec::new(
            Opts::new("weir_identity_renewals_total", "Certificate requests by result"),
            &["result"],
        )
        .unwrap();
        let anchors = IntGauge::new(
            "weir_identity_trust_anchors",
            "Roots in the trust-anchor bundle in force (peers and the controller are verified against them)",
        )
        .unwrap();
        registry.register(Box::new(expiration.clone())).unwrap();
        registry.register(Box::new(renewals.clone())).unwrap();
        registry.register(Box::new(anchors.clone())).unwrap();
        Self { expiration, renewals, anchors }
    }
}

/// Runs until `drain` fires.
pub async fn run(
    cfg: IdentityConfig,
    tx: watch::Sender<Option<Arc<Credentials>>>,
    metrics: IdentityMetrics,
    drain: Drain,
) {
    let key = match KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256) {
        Ok(k) => k,
        Err(e) => {
            tracing::error!(error = %e, "cannot generate a key pair; no workload identity");
            return;
        }
    };
    let stop = drain.signaled();
    tokio::pin!(stop);
    let mut failures: u32 = 0;
    // The anchors the current certificate was checked against: a changed bundle (a rotation
    // adding or removing a root) re-certifies at once, so peers are judged by the new bundle
    // and this sidecar's own leaf comes from the issuer in force.
    let mut anchors_in_force: Option<Vec<Vec<u8>>> = None;
    loop {
        let wait = match certify(&cfg, &key).await {
            Ok(creds) => {
                anchors_in_force = Some(creds.roots.clone());
                failures = 0;
                metrics.renewals.with_label_values(&["ok"]).inc();
                metrics.expiration.set(creds.not_after_unix);
                metrics.anchors.set(creds.roots.len() as i64);
                let now = weir_api::rt::unix_secs();
                let lifetime = (creds.not_after_unix - now).max(1) as f64;
                tracing::info!(identity = %creds.identity, expires_in_s = lifetime, "workload certificate issued");
                tx.send_replace(Some(Arc::new(creds)));
                // Renew at 70 % of the remaining lifetime.
                Duration::from_secs_f64(lifetime * 0.7)
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                metrics.renewals.with_label_values(&["error"]).inc();
                let wait = weir_api::rt::backoff(failures, RETRY_BASE, RETRY_MAX, RETRY_BASE / 2);
                tracing::warn!(error = %e, retry_in = ?wait, "certificate request failed");
                wait
            }
        };
        let due = tokio::time::Instant::now() + wait;
        loop {
            let check = (tokio::time::Instant::now() + ANCHOR_CHECK).min(due);
            tokio::select! {
                _ = tokio::time::sleep_until(check) => {}
                _ = &mut stop => return,
            }
            if check >= due || anchors_changed(&cfg, anchors_in_force.as_deref()) {
                break;
            }
        }
    }
}

/// How often a trust-anchor file is compared with the bundle in force.
const ANCHOR_CHECK: Duration = Duration::from_secs(2);

/// Whether the out-of-band anchors now differ from `in_force` (an unreadable or malformed file
/// is not a change: the bundle in force stays until a good one replaces it).
fn anchors_changed(cfg: &IdentityConfig, in_force: Option<&[Vec<u8>]>) -> bool {
    let (Some(tls), Some(in_force)) = (&cfg.endpoint.tls, in_force) else { return false };
    match &tls.anchors {
        crate::channel::AnchorSource::Pem(_) => false,
        source => match source.load() {
            Ok(now) if now != in_force => {
                tracing::info!(anchors = now.len(), "the trust-anchor bundle changed; re-certifying");
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(error = %e, "the trust-anchor bundle does not load; the one in force stays");
                false
            }
        },
    }
}

async fn certify(cfg: &IdentityConfig, key: &KeyPair) -> anyhow::Result<Credentials> {
    let token = std::fs::read_to_string(&cfg.token_file)
        .map_err(|e| anyhow::anyhow!("reading token file {}: {e}", cfg.token_file.display()))?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(cfg.identity.as_str().try_into()?)];
    let csr = params.serialize_request(key)?;
    // The peers' trust anchors are the ones given out of band, never what the network says.
    let tls = cfg.endpoint.tls.as_ref().ok_or_else(|| {
        anyhow::anyhow!("a workload identity needs trust anchors (--trust-anchors): tokens never go in plaintext")
    })?;
    let roots = tls.anchors.load().map_err(anyhow::Error::msg)?;
    let channel = cfg.endpoint.channel(None, Some(Duration::from_secs(10))).await?;
    let rsp = proto::identity_client::IdentityClient::new(channel)
        .certify(proto::CertifyRequest { token: token.trim().to_string(), csr_der: csr.der().to_vec() })
        .await
        .map_err(|s| anyhow::anyhow!("controller refused: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    if rsp.identity != cfg.identity {
        anyhow::bail!("certified {:?} but this sidecar is {:?}", rsp.identity, cfg.identity);
    }
    let mut chain = vec![rsp.leaf_der];
    chain.extend(rsp.intermediates_der);
    Ok(Credentials {
        identity: rsp.identity,
        chain,
        key_pkcs8: key.serialize_der(),
        roots,
        not_after_unix: rsp.not_after_unix,
    })
}

/// Certificate requests that fail are retried after a back-off from this…
const RETRY_BASE: Duration = Duration::from_millis(200);
/// …up to this.
const RETRY_MAX: Duration = Duration::from_secs(30);
