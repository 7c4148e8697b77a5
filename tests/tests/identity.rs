//! The controller's certificate authority over gRPC: tokens prove workloads, CSRs for any
//! other identity are refused, and the trust anchor survives restarts.

use std::time::Duration;

use rcgen::{CertificateParams, KeyPair, SanType};
use weir_api::proto;
use weir_tests::*;
use x509_parser::prelude::*;

fn csr(uri: &str) -> Vec<u8> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    p.serialize_request(&key).unwrap().der().to_vec()
}

async fn certify(
    controller: &ChildProc,
    token: &str,
    csr_der: Vec<u8>,
) -> Result<proto::CertifyResponse, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", controller.addr("grpc")))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = proto::identity_client::IdentityClient::new(channel);
    client.certify(proto::CertifyRequest { token: token.into(), csr_der }).await.map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certify_issues_only_what_the_token_proves() {
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("shop", "web", &[]));
    let tokens = scratch.dir.path().join("tokens");
    std::fs::write(&tokens, "# local-mode token table\ns3cret shop/reviews\n").unwrap();
    let identity_dir = scratch.dir.path().join("identity");
    let flags = vec![
        "--identity-dir".to_string(),
        identity_dir.display().to_string(),
        "--tokens".into(),
        tokens.display().to_string(),
        "--trust-domain".into(),
        "weir.test".into(),
        "--cert-lifetime".into(),
        "1h".into(),
    ];
    let mut controller = scratch.controller_with(None, &flags).await;
    let id = "spiffe://weir.test/ns/shop/sa/reviews";

    let issued = certify(&controller, "s3cret", csr(id)).await.unwrap();
    assert_eq!(issued.identity, id);
    let (_, leaf) = X509Certificate::from_der(&issued.leaf_der).unwrap();
    let (_, issuer) = X509Certificate::from_der(&issued.intermediates_der[0]).unwrap();
    let (_, root) = X509Certificate::from_der(&issued.trust_anchors_der[0]).unwrap();
    let sans: Vec<String> =
        leaf.subject_alternative_name().unwrap().unwrap().value.general_names.iter().map(|n| n.to_string()).collect();
    assert_eq!(sans, [format!("URI({id})")]);
    leaf.verify_signature(Some(issuer.public_key())).expect("leaf signed by the issuer");
    issuer.verify_signature(Some(root.public_key())).expect("issuer signed by the trust anchor");
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert!((3600..=3600 + 120).contains(&lifetime), "lifetime {lifetime}s (1h plus the back-dating)");
    assert!(!leaf.is_ca());

    // A forged token, a CSR for someone else, garbage: refused with a reason.
    let e = certify(&controller, "guess", csr(id)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = certify(&controller, "s3cret", csr("spiffe://weir.test/ns/shop/sa/admin")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("sa/admin") && e.message().contains("sa/reviews"), "{}", e.message());
    let e = certify(&controller, "s3cret", b"not a csr".to_vec()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let metrics = admin_text(controller.addr("admin"), "/metrics").await;
    for result in ["issued", "unauthenticated", "wrong-identity", "malformed"] {
        assert!(metrics.contains(&format!("weir_controller_certify_total{{result=\"{result}\"}} 1")), "{metrics}");
    }

    // The trust anchor survives a restart.
    controller.stop(std::time::Duration::from_secs(10)).await;
    let controller = scratch.controller_with(None, &flags).await;
    let again = certify(&controller, "s3cret", csr(id)).await.unwrap();
    assert_eq!(again.trust_anchors_der, issued.trust_anchors_der);
    let key_file = std::fs::read_to_string(identity_dir.join("issuer.key")).unwrap();
    let log = std::fs::read_to_string(scratch.log("controller")).unwrap();
    let key_body = key_file.lines().nth(1).unwrap();
    assert!(!log.contains(key_body), "the issuer key must not appear in logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_gets_its_certificate_and_renews_it() {
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("shop", "web", &[]));
    let flags = scratch.identity_flags(&[("tok-reviews", "shop/reviews-v1")], &["--cert-lifetime", "3s"]);
    let controller = scratch.controller_with(None, &flags).await;
    let grpc = controller.addr("grpc");
    let sidecar = scratch.proxy_with(grpc, "shop/reviews-v1", None, &scratch.token_flags("tok-reviews")).await;
    let forged = scratch.proxy_with(grpc, "shop/impostor", None, &scratch.token_flags("forged")).await;

    let admin = sidecar.addr("admin");
    wait_until("the sidecar to be ready with a certificate", Duration::from_secs(20), || async move {
        admin_text(admin, "/ready").await.starts_with("ready")
    })
    .await;
    // A 3 s certificate is renewed at 70 %: several renewals within a few seconds.
    wait_until("three renewals", Duration::from_secs(20), || async move { renewals(admin, "ok").await >= 3 }).await;
    let m = admin_text(admin, "/metrics").await;
    assert!(m.contains("weir_identity_cert_expiration_timestamp_seconds"), "{m}");

    // A forged token gets nothing, and the sidecar says why it is not ready.
    let forged_admin = forged.addr("admin");
    wait_until("a refused request", Duration::from_secs(20), || async move {
        admin_text(forged_admin, "/metrics").await.contains("weir_identity_renewals_total{result=\"error\"}")
    })
    .await;
    assert!(admin_text(forged_admin, "/ready").await.contains("no workload certificate"));
    // The private key is never logged.
    let log = std::fs::read_to_string(scratch.log("shop-reviews-v1")).unwrap();
    assert!(!log.contains("PRIVATE KEY") && !log.contains("key_pkcs8"), "key material in the log");
}
