//! Rotating the mesh's trust under load, as `docs/security.md` tells an operator to: add the
//! new root beside the old one, rotate the issuer to one signed by the new root, wait for every
//! workload certificate to come from the new issuer, remove the old root. The controller
//! reloads its identity directory and the sidecars their anchor file without a restart, and no
//! request fails on the way; at the end the old root is trusted by no one.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use weir_tests::*;

/// A new root and an issuer it signed (PEM): what an operator makes offline.
fn new_root_and_issuer() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let params = |cn: &str| {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        p
    };
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let root = params("Rotated trust anchor").self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(params("Rotated trust anchor"), root_key);
    let issuer_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let issuer = params("Rotated issuer").signed_by(&issuer_key, &root_issuer).unwrap();
    (root.pem(), issuer.pem(), issuer_key.serialize_pem())
}

fn write(path: &Path, contents: &str) {
    write_atomic(path, contents).unwrap();
}

async fn metric(admin: std::net::SocketAddr, name: &str) -> Option<f64> {
    let text = admin_text(admin, "/metrics").await;
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_anchor_and_issuer_rotate_under_load_with_no_failed_request() {
    const LIFETIME: u64 = 8;
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("test", "web", &[]));
    let flags = scratch.identity_flags(
        &[("t-web", "test/web-v1"), ("t-client", "test/client")],
        &["--cert-lifetime", &format!("{LIFETIME}s")],
    );
    let controller = scratch.controller_with(None, &flags).await;
    let grpc = controller.addr("grpc");
    let cadmin = controller.addr("admin");
    let identity = scratch.dir.path().join("identity");
    let old_root = std::fs::read_to_string(identity.join("root.crt")).unwrap();
    // The sidecars' bundle is their own file (in a cluster, a mounted ConfigMap), kept in step
    // with the controller's by the operator.
    let anchors = scratch.dir.path().join("anchors.pem");
    write(&anchors, &old_root);
    let sidecar_flags = |token: &str| {
        let mut f = scratch.token_flags(token);
        let at = f.iter().position(|a| a == "--trust-anchors").unwrap();
        f[at + 1] = anchors.display().to_string();
        f
    };
    let backend = Backend::start("v1").await;
    let server = scratch.proxy_with(grpc, "test/web-v1", Some(backend.addr), &sidecar_flags("t-web")).await;
    let client = scratch.proxy_with(grpc, "test/client", None, &sidecar_flags("t-client")).await;
    let (sa, ca) = (server.addr("admin"), client.addr("admin"));
    for admin in [sa, ca] {
        wait_ready(admin).await;
    }
    scratch.write(
        "services.yaml",
        &service(
            "test",
            "web",
            &[format!("{{ address: \"{}\", meshed: true, serviceAccount: web-v1 }}", server.addr("inbound"))],
        ),
    );
    wait_config(ca, "the endpoint", |c| endpoint_count(c, "test", "web") == 1).await;

    // Steady load through the pair for the whole rotation; fresh connections too, so new
    // handshakes are judged by each bundle in turn.
    let stop = Arc::new(AtomicBool::new(false));
    let (total, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let via = client.addr("outbound");
    let mut workers = Vec::new();
    for fresh in [false, false, true] {
        let (stop, total, failed) = (stop.clone(), total.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            let mut http = http1();
            while !stop.load(Ordering::Relaxed) {
                if fresh {
                    http = http1();
                }
                total.fetch_add(1, Ordering::Relaxed);
                match send(&http, via, "GET", "web.test", "/", &[]).await {
                    Ok(r) if r.status == 200 => {}
                    other => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("failed: {:?}", other.map(|r| (r.status, r.body)));
                    }
                }
            }
        }));
    }
    let reloads = || async { metric(cadmin, "weir_controller_ca_reloads_total{result=\"ok\"}").await.unwrap_or(0.0) };
    let anchors_in = |admin| async move { metric(admin, "weir_identity_trust_anchors").await.unwrap_or(0.0) };

    // 1. The new root joins the bundle, on the controller and on the sidecars.
    let (new_root, new_issuer, new_key) = new_root_and_issuer();
    let bundle = format!("{old_root}{new_root}");
    write(&identity.join("root.crt"), &bundle);
    write(&anchors, &bundle);
    wait_until("the controller to load the bundle", Duration::from_secs(20), || async { reloads().await >= 1.0 }).await;
    for admin in [sa, ca] {
        wait_until("a sidecar to trust both roots", Duration::from_secs(20), || async move {
            anchors_in(admin).await == 2.0
        })
        .await;
    }

    // 2. The issuer is rotated to one the new root signed (key first: a key that does not
    // match its certificate is refused, and the controller keeps the issuer in force).
    write(&identity.join("issuer.key"), &new_key);
    write(&identity.join("issuer.crt"), &new_issuer);
    wait_until("the controller to load the new issuer", Duration::from_secs(20), || async { reloads().await >= 2.0 })
        .await;
    // Certificates issued from now on expire at least LIFETIME seconds after this second.
    let rotated_at = unix_now() + 1;
    for admin in [sa, ca] {
        wait_until("every workload certificate to come from the new issuer", Duration::from_secs(30), || async move {
            let expiry = metric(admin, "weir_identity_cert_expiration_timestamp_seconds").await.unwrap_or(0.0);
            expiry as u64 >= rotated_at + LIFETIME
        })
        .await;
    }

    // 3. The old root leaves the bundle.
    write(&identity.join("root.crt"), &new_root);
    write(&anchors, &new_root);
    wait_until("the controller to drop the old root", Duration::from_secs(20), || async { reloads().await >= 3.0 })
        .await;
    for admin in [sa, ca] {
        wait_until("a sidecar to trust the new root only", Duration::from_secs(20), || async move {
            anchors_in(admin).await == 1.0
        })
        .await;
    }
    // Traffic flows on the new root alone, on new connections as well.
    let after = total.load(Ordering::Relaxed);
    wait_until("traffic after the rotation", Duration::from_secs(20), || {
        let total = total.clone();
        async move { total.load(Ordering::Relaxed) >= after + 200 }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let (total, failed) = (total.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "requests failed during the rotation, of {total}");
    assert!(admin_text(sa, "/metrics").await.contains("tls=\"true\""));

    // The old root is trusted by no one: a sidecar holding only it cannot reach the controller.
    let stale = weir_proxy::channel::ControlEndpoint {
        addr: grpc.to_string(),
        tls: Some(weir_proxy::channel::ControlTls {
            anchors: weir_proxy::channel::AnchorSource::Pem(old_root.into()),
            controller_identity: weir_api::spiffe::id("cluster.local", "weir-system", "weir-controller"),
        }),
    };
    let Err(refused) = stale.channel(None, Some(Duration::from_secs(5))).await else {
        panic!("the old root is still trusted")
    };
    assert!(refused.to_string().contains("connecting to the controller"), "{refused}");
    // A broken change (a key without its certificate) is refused; the CA in force stays. (Step
    // 2 may have been caught between its two writes: count from here.)
    let errors = || async { metric(cadmin, "weir_controller_ca_reloads_total{result=\"error\"}").await.unwrap_or(0.0) };
    let errors_before = errors().await;
    write(&identity.join("issuer.key"), &rcgen::KeyPair::generate().unwrap().serialize_pem());
    wait_until("the bad change refused", Duration::from_secs(20), || async { errors().await > errors_before }).await;
    let (_key, csr_der) = keyed_csr("spiffe://cluster.local/ns/test/sa/client");
    let mut control = scratch.control(grpc, "cluster.local");
    control.tls.as_mut().unwrap().anchors = weir_proxy::channel::AnchorSource::File(anchors.clone());
    let issued = certify(&control, "t-client", csr_der).await.expect("still issuing from the issuer in force");
    assert_eq!(issued.trust_anchors_der.len(), 1);
}
