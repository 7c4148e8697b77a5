//! `weir.v1.Identity/Certify`: token → workload, CSR → leaf for that workload's SPIFFE ID.

use std::path::PathBuf;
use std::sync::Arc;

use super::review::{ReviewError, TokenReviewer};
use super::tokens::Proven;

use prometheus::IntCounterVec;
use tonic::{Request, Response, Status};
use weir_api::proto;

use super::tokens::{self, TokenError};
use super::{Ca, CsrError};

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
    pub ca: Arc<Ca>,
    pub authenticator: Authenticator,
    /// Results by outcome (`issued`, `unauthenticated`, `wrong-identity`, `malformed`, `error`).
    pub results: IntCounterVec,
}

#[tonic::async_trait]
impl proto::identity_server::Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<proto::CertifyRequest>,
    ) -> Result<Response<proto::CertifyResponse>, Status> {
        let req = request.into_inner();
        let outcome = self.issue(&req).await;
        let label = match &outcome {
            Ok(_) => "issued",
            Err(s) if s.code() == tonic::Code::Unauthenticated => "unauthenticated",
            Err(s) if s.code() == tonic::Code::PermissionDenied => "wrong-identity",
            Err(s) if s.code() == tonic::Code::InvalidArgument => "malformed",
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
        super::parse_csr(&req.csr_der).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let proven = self.authenticator.verify(&req.token).await?;
        let identity = self.ca.spiffe_id(&proven.namespace, &proven.service_account);
        let issued = self.ca.certify(&req.csr_der, &identity).map_err(|e| match e {
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
