//! Kubernetes' proof of a workload: a `TokenReview` of the pod's projected ServiceAccount token,
//! which must be valid for Weir's audience and belong to a ServiceAccount.

use std::path::Path;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

use super::tokens::Proven;

/// Longest a review may take (a sidecar's Certify call gives up after 10 s).
const REVIEW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why a token was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReviewError {
    /// The API server says the token is not valid (expired, forged, wrong audience, pod gone).
    #[error("the Kubernetes API rejected the token: {0}")]
    Rejected(String),
    #[error("the token is valid for audiences {got:?}, not {want:?}")]
    Audience { got: Vec<String>, want: String },
    #[error("the token belongs to {0:?}, not a ServiceAccount")]
    NotServiceAccount(String),
    /// The review itself failed: the caller may try again.
    #[error("TokenReview failed: {0}")]
    Api(String),
}

/// Reviews tokens against the Kubernetes API.
#[derive(Clone)]
pub struct TokenReviewer {
    client: kube::Client,
    audience: String,
}

impl TokenReviewer {
    /// A reviewer using `kubeconfig`, or else the usual inference (in-cluster ServiceAccount,
    /// then `KUBECONFIG` / `~/.kube/config`).
    pub async fn connect(kubeconfig: Option<&Path>, audience: &str) -> anyhow::Result<Self> {
        let client = crate::source::kubernetes::client(kubeconfig).await?;
        Ok(Self { client, audience: audience.to_string() })
    }

    /// Who `token` proves, per the API server.
    pub async fn review(&self, token: &str) -> Result<Proven, ReviewError> {
        if token.is_empty() {
            return Err(ReviewError::Rejected("empty token".into()));
        }
        let review = TokenReview {
            spec: TokenReviewSpec { token: token.to_string(), audiences: Some(vec![self.audience.clone()]) },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let done = match tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), &review)).await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                // The detail (addresses, API errors) goes to the log, not to the caller.
                tracing::warn!(error = %e, "TokenReview failed");
                return Err(ReviewError::Api("the Kubernetes API did not answer the review".into()));
            }
            Err(_) => return Err(ReviewError::Api(format!("no answer within {REVIEW_TIMEOUT:?}"))),
        };
        judge(done.status.unwrap_or_default(), &self.audience)
    }
}

/// Reads a TokenReview's status: authenticated, for our audience, as a ServiceAccount.
fn judge(
    status: k8s_openapi::api::authentication::v1::TokenReviewStatus,
    audience: &str,
) -> Result<Proven, ReviewError> {
    if status.authenticated != Some(true) {
        let why = status.error.filter(|e| !e.is_empty()).unwrap_or_else(|| "not authenticated".into());
        return Err(ReviewError::Rejected(why));
    }
    // The API server echoes the audiences it validated the token for; none (an authenticator
    // that ignores audiences, or implicit API-server audiences) is not ours.
    let got = status.audiences.unwrap_or_default();
    if !got.iter().any(|a| a == audience) {
        return Err(ReviewError::Audience { got, want: audience.to_string() });
    }
    let username = status.user.and_then(|u| u.username).unwrap_or_default();
    let mut parts = username.strip_prefix("system:serviceaccount:").map(|rest| rest.split(':'));
    match parts.as_mut().map(|p| (p.next(), p.next(), p.next())) {
        Some((Some(ns), Some(sa), None)) if !ns.is_empty() && !sa.is_empty() => {
            Ok(Proven { namespace: ns.to_string(), service_account: sa.to_string() })
        }
        _ => Err(ReviewError::NotServiceAccount(username)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};

    fn status(authenticated: bool, user: &str, audiences: Option<&[&str]>) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            user: Some(UserInfo { username: Some(user.into()), ..Default::default() }),
            audiences: audiences.map(|a| a.iter().map(|s| s.to_string()).collect()),
            error: (!authenticated).then(|| "token expired".into()),
        }
    }

    #[test]
    fn only_service_accounts_for_our_audience_pass() {
        let ok = judge(status(true, "system:serviceaccount:shop:reviews", Some(&["weir"])), "weir").unwrap();
        assert_eq!(ok, Proven { namespace: "shop".into(), service_account: "reviews".into() });
        assert!(matches!(
            judge(status(true, "system:serviceaccount:shop:reviews", None), "weir"),
            Err(ReviewError::Audience { .. })
        ));
        assert_eq!(judge(status(false, "", None), "weir"), Err(ReviewError::Rejected("token expired".into())));
        assert!(matches!(
            judge(status(true, "system:serviceaccount:shop:reviews", Some(&["api"])), "weir"),
            Err(ReviewError::Audience { .. })
        ));
        for user in
            ["alice", "system:serviceaccount:shop", "system:serviceaccount:shop:a:b", "system:serviceaccount::x"]
        {
            assert!(
                matches!(judge(status(true, user, Some(&["weir"])), "weir"), Err(ReviewError::NotServiceAccount(_))),
                "{user}"
            );
        }
    }
}
