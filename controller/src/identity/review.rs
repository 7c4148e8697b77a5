//! Kubernetes' proof of a workload: a `TokenReview` of the pod's projected ServiceAccount token,
//! which must be valid for Weir's audience and belong to a ServiceAccount.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

use super::tokens::Proven;

/// Longest a review may take (a sidecar's Certify call gives up after 10 s).
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a token was not accepted.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
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

/// How long a review's answer is reused: the API server's own webhook token authenticator
/// caches for 2 minutes; a shorter reuse keeps a revoked token (a deleted pod) from minting for
/// long, while a burst of renewals (a rollout restarting many pods with one ServiceAccount
/// token each) costs the API server one review per token.
const ACCEPTED_TTL: Duration = Duration::from_secs(30);
/// Rejections are reused briefly: a client repeating a bad token costs no review each time.
const REJECTED_TTL: Duration = Duration::from_secs(10);
/// Answers kept at most; the oldest go first.
const CACHE_ENTRIES: usize = 4096;

/// Recent answers, keyed by the token's SHA-256 (the token itself is not kept).
#[derive(Default)]
struct Answers {
    map: HashMap<[u8; 32], (Result<Proven, ReviewError>, Instant)>,
}

impl Answers {
    fn get(&mut self, key: &[u8; 32], now: Instant) -> Option<Result<Proven, ReviewError>> {
        match self.map.get(key) {
            Some((answer, until)) if *until > now => Some(answer.clone()),
            Some(_) => {
                self.map.remove(key);
                None
            }
            None => None,
        }
    }

    fn put(&mut self, key: [u8; 32], answer: Result<Proven, ReviewError>, now: Instant) {
        let ttl = match &answer {
            Ok(_) => ACCEPTED_TTL,
            // A failed review says nothing about the token: not kept.
            Err(ReviewError::Api(_)) => return,
            Err(_) => REJECTED_TTL,
        };
        if self.map.len() >= CACHE_ENTRIES && !self.map.contains_key(&key) {
            self.map.retain(|_, (_, until)| *until > now);
            if self.map.len() >= CACHE_ENTRIES
                && let Some(oldest) = self.map.iter().min_by_key(|(_, (_, until))| *until).map(|(k, _)| *k)
            {
                self.map.remove(&oldest);
            }
        }
        self.map.insert(key, (answer, now + ttl));
    }
}

fn token_key(token: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// Reviews tokens against the Kubernetes API, reusing recent answers.
#[derive(Clone)]
pub struct TokenReviewer {
    client: kube::Client,
    audience: String,
    answers: Arc<Mutex<Answers>>,
}

impl TokenReviewer {
    /// A reviewer using `kubeconfig`, or else the usual inference (in-cluster ServiceAccount,
    /// then `KUBECONFIG` / `~/.kube/config`).
    pub async fn connect(kubeconfig: Option<&Path>, audience: &str) -> anyhow::Result<Self> {
        let client = crate::source::kubernetes::client(kubeconfig).await?;
        Ok(Self { client, audience: audience.to_string(), answers: Arc::default() })
    }

    /// Who `token` proves, per the API server (or its answer of the last few seconds).
    pub async fn review(&self, token: &str) -> Result<Proven, ReviewError> {
        if token.is_empty() {
            return Err(ReviewError::Rejected("empty token".into()));
        }
        let key = token_key(token);
        if let Some(answer) = self.answers.lock().unwrap().get(&key, Instant::now()) {
            return answer;
        }
        let answer = self.ask(token).await;
        self.answers.lock().unwrap().put(key, answer.clone(), Instant::now());
        answer
    }

    async fn ask(&self, token: &str) -> Result<Proven, ReviewError> {
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
    fn answers_are_reused_until_they_expire_and_the_table_is_bounded() {
        let mut a = Answers::default();
        let t0 = Instant::now();
        let proven = Proven { namespace: "shop".into(), service_account: "web".into() };
        a.put(token_key("good"), Ok(proven.clone()), t0);
        a.put(token_key("bad"), Err(ReviewError::Rejected("expired".into())), t0);
        a.put(token_key("unsure"), Err(ReviewError::Api("timeout".into())), t0);
        assert_eq!(a.get(&token_key("good"), t0 + Duration::from_secs(29)), Some(Ok(proven)));
        assert!(a.get(&token_key("good"), t0 + ACCEPTED_TTL).is_none(), "expired");
        assert!(a.get(&token_key("bad"), t0 + Duration::from_secs(9)).is_some_and(|r| r.is_err()));
        assert!(a.get(&token_key("bad"), t0 + REJECTED_TTL).is_none());
        assert!(a.get(&token_key("unsure"), t0).is_none(), "a failed review is not an answer");
        // Full: the entry expiring first goes.
        let mut a = Answers::default();
        for i in 0..CACHE_ENTRIES {
            a.put(
                token_key(&i.to_string()),
                Err(ReviewError::Rejected("x".into())),
                t0 + Duration::from_millis(i as u64),
            );
        }
        a.put(token_key("new"), Err(ReviewError::Rejected("x".into())), t0 + Duration::from_secs(1));
        assert_eq!(a.map.len(), CACHE_ENTRIES);
        assert!(a.get(&token_key("0"), t0).is_none() && a.get(&token_key("1"), t0).is_some());
        assert_ne!(token_key("a"), token_key("b"));
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
