//! Kubernetes proves workloads: with no token table, the controller checks each sidecar's
//! projected ServiceAccount token with a TokenReview (audience `weir`) against the API server
//! from its kubeconfig — here a fake API server that knows a few tokens.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use weir_tests::*;

const CONTROLLER_CREDENTIAL: &str = "Bearer controller-sa-token";

/// A fake API server answering TokenReviews. Only the controller's own credential may ask, and
/// only reviews for the `weir` audience succeed.
async fn fake_api(reviews: Arc<AtomicU64>) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    fake_json_server(move |req| {
        let reviews = reviews.clone();
        async move { answer(req, &reviews) }
    })
    .await
}

fn answer(req: FakeRequest, reviews: &AtomicU64) -> (u16, serde_json::Value) {
    if req.path != "/apis/authentication.k8s.io/v1/tokenreviews" || req.method != "POST" {
        return (404, serde_json::json!({"kind": "Status", "status": "Failure", "code": 404, "reason": "NotFound"}));
    }
    if req.headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(CONTROLLER_CREDENTIAL) {
        return (
            401,
            serde_json::json!({"kind": "Status", "status": "Failure", "code": 401, "reason": "Unauthorized"}),
        );
    }
    reviews.fetch_add(1, Ordering::Relaxed);
    let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
    let token = body["spec"]["token"].as_str().unwrap_or_default();
    let audiences = body["spec"]["audiences"].clone();
    let status = if audiences != serde_json::json!(["weir"]) {
        serde_json::json!({"authenticated": false, "error": format!("token audiences {audiences} not accepted")})
    } else {
        match token {
            "reviews-token" => serde_json::json!({
                "authenticated": true, "audiences": ["weir"],
                "user": {"username": "system:serviceaccount:shop:reviews", "groups": ["system:serviceaccounts"]}
            }),
            // An authenticator that ignores audiences echoes none back.
            "implicit-token" => serde_json::json!({
                "authenticated": true, "user": {"username": "system:serviceaccount:shop:reviews"}
            }),
            "alice-token" => {
                serde_json::json!({"authenticated": true, "audiences": ["weir"], "user": {"username": "alice"}})
            }
            "vault-token" => serde_json::json!({
                "authenticated": true, "audiences": ["vault"], "user": {"username": "system:serviceaccount:shop:reviews"}
            }),
            _ => serde_json::json!({"authenticated": false, "error": "invalid bearer token"}),
        }
    };
    let review = serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": body["spec"], "status": status});
    (201, review)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_reviews_prove_service_accounts() {
    let reviews = Arc::new(AtomicU64::new(0));
    let (api, api_task) = fake_api(reviews.clone()).await;
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("shop", "web", &[]));
    let kubeconfig = scratch.dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"http://{api}\"}}}}]\n\
             users: [{{name: weir, user: {{token: controller-sa-token}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: weir}}}}]\ncurrent-context: fake\n"
        ),
    )
    .unwrap();
    let flags = [
        "--identity-dir".to_string(),
        scratch.dir.path().join("identity").display().to_string(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
    ];
    let controller = scratch.controller_with(None, &flags).await;
    let grpc = controller.addr("grpc");
    let reviews_id = "spiffe://cluster.local/ns/shop/sa/reviews";

    // The ServiceAccount's token gets its own identity, and only that.
    let issued = certify(&scratch.control(grpc, "cluster.local"), "reviews-token", csr(reviews_id)).await.unwrap();
    assert_eq!(issued.identity, reviews_id);
    let e = certify(
        &scratch.control(grpc, "cluster.local"),
        "reviews-token",
        csr("spiffe://cluster.local/ns/shop/sa/payments"),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");

    // Tokens the API server does not vouch for, or vouches for as something else.
    for (token, code, reason) in [
        ("forged", tonic::Code::Unauthenticated, "invalid bearer token"),
        ("alice-token", tonic::Code::Unauthenticated, "\"alice\", not a ServiceAccount"),
        ("vault-token", tonic::Code::Unauthenticated, "audiences [\"vault\"], not \"weir\""),
        ("implicit-token", tonic::Code::Unauthenticated, "audiences [], not \"weir\""),
        ("", tonic::Code::Unauthenticated, "empty token"),
    ] {
        let e = certify(&scratch.control(grpc, "cluster.local"), token, csr(reviews_id)).await.unwrap_err();
        assert_eq!(e.code(), code, "{token}: {e:?}");
        assert!(e.message().contains(reason), "{token}: {:?}", e.message());
    }
    // One review per distinct non-empty token: the second call with reviews-token reused the
    // answer of the first (answers are kept 30 s, rejections 10 s).
    assert_eq!(reviews.load(Ordering::Relaxed), 5, "one review per distinct non-empty token");
    let e = certify(&scratch.control(grpc, "cluster.local"), "forged", csr(reviews_id)).await.unwrap_err();
    assert!(e.message().contains("invalid bearer token"), "{:?}", e.message());
    assert_eq!(reviews.load(Ordering::Relaxed), 5, "a repeated bad token costs no review");
    // A malformed CSR costs no review.
    let e = certify(&scratch.control(grpc, "cluster.local"), "reviews-token", b"not a csr".to_vec()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert_eq!(reviews.load(Ordering::Relaxed), 5);

    // A sidecar with the projected token file gets a certificate end to end.
    let sidecar = scratch.proxy_with(grpc, "shop/reviews", None, &scratch.token_flags("reviews-token")).await;
    let admin = sidecar.addr("admin");
    wait_until("a certificate through TokenReview", Duration::from_secs(20), || async move {
        renewals(admin, "ok").await >= 1
    })
    .await;

    // The API server goes away: a token it has not vouched for lately gets Unavailable (the
    // sidecar retries), refused for nothing for good.
    api_task.abort();
    let _ = api_task.await;
    let e = certify(&scratch.control(grpc, "cluster.local"), "new-token", csr(reviews_id)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("TokenReview failed"), "{:?}", e.message());
}
