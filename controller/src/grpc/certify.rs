//! `weir.v1.Identity/Certify`: token → workload, CSR → leaf for that workload's SPIFFE ID.

use std::path::PathBuf;
use std::sync::Arc;

use crate::identity::review::{ReviewError, TokenReviewer};
use crate::identity::tokens::Proven;

use prometheus::IntCounterVec;
use tonic::{Request, Response, Status};
use weir_api::proto;

use crate::identity::tokens::{self, TokenError};
use crate::identity::{CaRx, CsrError};

/// What proves a workload's identity.
#[derive(Clone)]
pub enum Authenticator {
    /// Local mode's token table.
    Tokens(PathBuf),
    /// Kubernetes: a TokenReview of the projected ServiceAccount token.
    Kubernetes(TokenReviewer),
}

impl Authenticator {
    async fn verify(&self, token: &str) -> Result<Proven, Status> {
        match self {
            Authenticator::Tokens(path) => tokens::verify(path, token).map_err(|e| match e {
                TokenError::Unknown => Status::unauthenticated("the token does not prove any workload"),
                TokenError::Table { .. } => Status::unavailable(e.to_string()),
            }),
            Authenticator::Kubernetes(reviewer) => reviewer.review(token).await.map_err(|e| match e {
                ReviewError::Api(_) => Status::unavailable(e.to_string()),
                _ => Status::unauthenticated(e.to_string()),
            }),
        }
    }
}

#[derive(Clone)]
pub struct IdentityService {
    /// The CA in force (replaced when the identity directory changes).
    pub ca: CaRx,
    pub authenticator: Authenticator,
    /// Results by outcome (`issued`, `unauthenticated`, `wrong-identity`, `malformed`,
    /// `rate-limited`, `error`).
    pub results: IntCounterVec,
    /// Certify calls per client address: each can cost a TokenReview.
    pub limiter: Arc<CallerLimiter>,
}

/// A token bucket per client IP address (burst [`CallerLimiter::BURST`], refilled at
/// [`CallerLimiter::PER_SECOND`]); at most [`CallerLimiter::MAX_CALLERS`] addresses are
/// tracked, the one seen least recently forgotten first. A sidecar certifies once at start and
/// then at 70 % of its lifetime, so only a misbehaving or hostile client meets the limit.
#[derive(Default)]
pub struct CallerLimiter {
    buckets: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, (f64, std::time::Instant)>>,
}

impl CallerLimiter {
    pub const BURST: f64 = 20.0;
    pub const PER_SECOND: f64 = 2.0;
    pub const MAX_CALLERS: usize = 10_000;

    /// Takes a token for `ip` at `now`; `false` when its bucket is empty.
    pub fn allow(&self, ip: std::net::IpAddr, now: std::time::Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap();
        if !buckets.contains_key(&ip) && buckets.len() >= Self::MAX_CALLERS {
            let stalest = buckets.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| *k);
            if let Some(k) = stalest {
                buckets.remove(&k);
            }
        }
        let (tokens, at) = buckets.entry(ip).or_insert((Self::BURST, now));
        let refilled = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * Self::PER_SECOND).min(Self::BURST);
        *at = now;
        if refilled >= 1.0 {
            *tokens = refilled - 1.0;
            true
        } else {
            *tokens = refilled;
            false
        }
    }
}

#[tonic::async_trait]
impl proto::identity_server::Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<proto::CertifyRequest>,
    ) -> Result<Response<proto::CertifyResponse>, Status> {
        let caller = request.extensions().get::<crate::grpc::tls::PeerInfo>().and_then(|p| p.addr);
        let req = request.into_inner();
        let outcome = match caller {
            Some(addr) if !self.limiter.allow(addr.ip(), std::time::Instant::now()) => {
                Err(Status::resource_exhausted(format!(
                    "too many certificate requests from {} (at most {} at once, then {} a second)",
                    addr.ip(),
                    CallerLimiter::BURST,
                    CallerLimiter::PER_SECOND
                )))
            }
            _ => self.issue(&req).await,
        };
        let label = match &outcome {
            Ok(_) => "issued",
            Err(s) if s.code() == tonic::Code::Unauthenticated => "unauthenticated",
            Err(s) if s.code() == tonic::Code::PermissionDenied => "wrong-identity",
            Err(s) if s.code() == tonic::Code::InvalidArgument => "malformed",
            Err(s) if s.code() == tonic::Code::ResourceExhausted => "rate-limited",
            Err(_) => "error",
        };
        self.results.with_label_values(&[label]).inc();
        match &outcome {
            Ok(r) => tracing::info!(identity = %r.identity, not_after = r.not_after_unix, "certificate issued"),
            Err(s) => tracing::warn!(code = ?s.code(), reason = s.message(), "certificate refused"),
        }
        outcome.map(Response::new)
    }
}

impl IdentityService {
    async fn issue(&self, req: &proto::CertifyRequest) -> Result<proto::CertifyResponse, Status> {
        // A request that cannot succeed costs no token review.
        crate::identity::parse_csr(&req.csr_der).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let proven = self.authenticator.verify(&req.token).await?;
        let ca = self.ca.borrow().clone();
        let identity = ca.spiffe_id(&proven.namespace, &proven.service_account);
        let issued = ca.certify(&req.csr_der, &identity).map_err(|e| match e {
            CsrError::WrongIdentity { .. } => Status::permission_denied(e.to_string()),
            CsrError::Malformed(_) => Status::invalid_argument(e.to_string()),
        })?;
        Ok(proto::CertifyResponse {
            identity: issued.identity,
            leaf_der: issued.leaf_der,
            intermediates_der: issued.intermediates_der,
            trust_anchors_der: issued.trust_anchors_der,
            not_after_unix: issued.not_after_unix,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn each_caller_gets_a_burst_then_the_refill_rate() {
        let l = CallerLimiter::default();
        let (a, b) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        let burst = CallerLimiter::BURST as usize;
        assert_eq!((0..burst + 5).filter(|_| l.allow(a, t0)).count(), burst);
        // Another caller is not held back by the first.
        assert!(l.allow(b, t0));
        // Half a second refills one token at 2 a second.
        assert!(l.allow(a, t0 + Duration::from_millis(500)));
        assert!(!l.allow(a, t0 + Duration::from_millis(500)));
    }
}
