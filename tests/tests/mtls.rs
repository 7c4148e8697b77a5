//! Mutual TLS between sidecars: certificates from the controller, the client identity known
//! to the inbound side, the server identity checked by the client, plaintext still accepted
//! from non-mesh clients (permissive), and garbage on the TLS port costing only its connection.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir_tests::*;

fn svc(identity: &str, inbound: std::net::SocketAddr) -> String {
    service("test", "web", &[format!("{{ address: \"{inbound}\", meshed: true, serviceAccount: {identity} }}")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_talk_mtls_and_know_each_other() {
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("test", "web", &[]));
    let flags = scratch.identity_flags(&[("t-web", "test/web-v1"), ("t-client", "test/client")], &[]);
    let controller = scratch.controller_with(None, &flags).await;
    let backend = Backend::start("v1").await;
    let server = scratch
        .proxy_with(controller.addr("grpc"), "test/web-v1", Some(backend.addr), &scratch.token_flags("t-web"))
        .await;
    let client =
        scratch.proxy_with(controller.addr("grpc"), "test/client", None, &scratch.token_flags("t-client")).await;
    for admin in [server.addr("admin"), client.addr("admin")] {
        wait_ready(admin).await;
    }
    let inbound = server.addr("inbound");
    scratch.write("services.yaml", &svc("web-v1", inbound));
    wait_config(client.addr("admin"), "the endpoint", |c| endpoint_count(c, "test", "web") == 1).await;

    // Through the mesh: mTLS, and the server sees the client's SPIFFE ID.
    for _ in 0..5 {
        let r = send(&http1(), client.addr("outbound"), "GET", "web.test", "/", &[]).await.unwrap();
        assert_eq!((r.status, r.backend()), (200, "v1"), "{}", r.body);
    }
    let metrics = admin_text(server.addr("admin"), "/metrics").await;
    assert!(
        metrics.contains(
            "weir_inbound_requests_by_client_total{client_identity=\"spiffe://cluster.local/ns/test/sa/client\",tls=\"true\"} 5"
        ),
        "{metrics}"
    );

    // Permissive: a plain client is still served, as plaintext.
    let r = send(&http1(), inbound, "GET", "web.test", "/", &[]).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(admin_text(server.addr("admin"), "/metrics").await.contains("client_identity=\"\",tls=\"false\"} 1"));

    // Garbage that looks like TLS costs only its own connection.
    let mut junk = tokio::net::TcpStream::connect(inbound).await.unwrap();
    junk.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3, 4, 5, 6, 7, 8]).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), junk.read_to_end(&mut buf)).await.expect("closed");
    wait_until("the failed handshake counted", Duration::from_secs(5), || async {
        admin_text(server.addr("admin"), "/metrics")
            .await
            .contains("weir_tls_handshake_failures_total{reason=\"protocol\"} 1")
    })
    .await;
    let r = send(&http1(), client.addr("outbound"), "GET", "web.test", "/", &[]).await.unwrap();
    assert_eq!(r.status, 200);

    // The controller says the endpoint is someone else: the client refuses the connection and
    // names both identities.
    scratch.write("services.yaml", &svc("payments", inbound));
    wait_config(client.addr("admin"), "the new identity", |c| c.to_string().contains("\"identity\":\"payments\""))
        .await;
    let r = send(&http1(), client.addr("outbound"), "GET", "web.test", "/", &[]).await.unwrap();
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(
        r.body.contains("spiffe://cluster.local/ns/test/sa/payments") && r.body.contains("sa/web-v1"),
        "{}",
        r.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_and_a_controller_outage_fail_no_request() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("test", "web", &[]));
    let flags =
        scratch.identity_flags(&[("t-web", "test/web-v1"), ("t-client", "test/client")], &["--cert-lifetime", "10s"]);
    let mut controller = scratch.controller_with(None, &flags).await;
    let grpc = controller.addr("grpc");
    let backend = Backend::start("v1").await;
    let server = scratch.proxy_with(grpc, "test/web-v1", Some(backend.addr), &scratch.token_flags("t-web")).await;
    let client = scratch.proxy_with(grpc, "test/client", None, &scratch.token_flags("t-client")).await;
    let (sa, ca) = (server.addr("admin"), client.addr("admin"));
    for admin in [sa, ca] {
        wait_ready(admin).await;
    }
    scratch.write("services.yaml", &svc("web-v1", server.addr("inbound")));
    wait_config(ca, "the endpoint", |c| endpoint_count(c, "test", "web") == 1).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (total, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let via = client.addr("outbound");
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, total, failed) = (stop.clone(), total.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            let http = http1();
            while !stop.load(Ordering::Relaxed) {
                total.fetch_add(1, Ordering::Relaxed);
                if !send(&http, via, "GET", "web.test", "/", &[]).await.is_ok_and(|r| r.status == 200) {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // Steady load across renewals: a 10 s certificate renews every ~7 s, so each sidecar swaps
    // its certificate three times within about 21 s while requests flow.
    let (sa_before, ca_before) = (renewals(sa, "ok").await, renewals(ca, "ok").await);
    for (admin, before) in [(sa, sa_before), (ca, ca_before)] {
        wait_until("three renewals under load", Duration::from_secs(45), || async move {
            renewals(admin, "ok").await >= before + 3
        })
        .await;
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "failed during rotations, of {}", total.load(Ordering::Relaxed));
    // The controller goes away: renewals fail, traffic goes on with the certificates held.
    controller.kill().await;
    wait_until("a failed renewal", Duration::from_secs(30), || async move { renewals(ca, "error").await >= 1 }).await;
    let during = total.load(Ordering::Relaxed);
    wait_until("traffic during the outage", Duration::from_secs(20), || {
        let total = total.clone();
        async move { total.load(Ordering::Relaxed) >= during + 200 }
    })
    .await;
    // It comes back: renewal resumes.
    let before = renewals(ca, "ok").await;
    let _controller = scratch.controller_with(Some(grpc), &flags).await;
    wait_until("renewal to resume", Duration::from_secs(60), || async move { renewals(ca, "ok").await > before }).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "of {} requests", total.load(Ordering::Relaxed));
    assert!(admin_text(sa, "/metrics").await.contains("tls=\"true\""));
}

/// Accepts any server certificate: these tests exercise the server's check of the client.
#[derive(Debug)]
struct AnyServer(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Connects to `addr` presenting `cert` (and `intermediates`), sends a request, and returns
/// the HTTP answer, or why none came: a refusal is a TLS alert from the server, any other error
/// (a timeout, a closed connection) is not one.
async fn tls_request_with(
    addr: std::net::SocketAddr,
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
    intermediates: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<String, String> {
    use std::sync::Arc;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert([vec![cert.der().clone()], intermediates.to_vec()].concat(), key)
        .unwrap();
    // Offering the mesh's ALPN makes this a mesh client (any other TLS is the application's).
    let mut cfg = cfg;
    cfg.alpn_protocols = vec![weir_proxy::tls::ALPN_MESH_H2.to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let mut tls = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .map_err(|_| "handshake timed out".to_string())?
    .map_err(|e| format!("handshake: {e}"))?;
    // TLS 1.3 reports a refused client certificate only on the first read.
    tls.write_all(b"GET / HTTP/1.1\r\nhost: web.test\r\nconnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut buf))
        .await
        .map_err(|_| "read timed out".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    if text.starts_with("HTTP/1.1") { Ok(text) } else { Err(format!("not HTTP: {text:?}")) }
}

/// Asserts that the server refused the client's certificate with a TLS alert (and not for
/// some other reason, such as a timeout or a dead sidecar).
fn assert_refused(outcome: Result<String, String>, what: &str) {
    match outcome {
        Ok(answer) => panic!("{what} must be refused, but was served: {answer}"),
        Err(e) => assert!(e.contains("received fatal alert"), "{what} must be refused by a TLS alert, got: {e}"),
    }
}

fn leaf(uri: &str, expired: bool, issuer: &rcgen::Issuer<'_, rcgen::KeyPair>) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    p.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth, rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    if expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2020, 1, 2);
    }
    (p.signed_by(&key, issuer).unwrap(), key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_and_expired_client_certificates_are_refused() {
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("test", "web", &[]));
    let flags = scratch.identity_flags(&[("t-web", "test/web-v1")], &[]);
    let controller = scratch.controller_with(None, &flags).await;
    let backend = Backend::start("v1").await;
    let server = scratch
        .proxy_with(controller.addr("grpc"), "test/web-v1", Some(backend.addr), &scratch.token_flags("t-web"))
        .await;
    let admin = server.addr("admin");
    wait_ready(admin).await;
    let inbound = server.addr("inbound");
    let id = "spiffe://cluster.local/ns/test/sa/client";

    // The mesh's own issuer (from the identity directory) signs a valid client: served.
    let dir = scratch.dir.path().join("identity");
    let issuer_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.join("issuer.key")).unwrap()).unwrap();
    let issuer_pem = std::fs::read_to_string(dir.join("issuer.crt")).unwrap();
    let mesh_issuer = rcgen::Issuer::from_ca_cert_pem(&issuer_pem, issuer_key).unwrap();
    let chain = {
        use rustls::pki_types::pem::PemObject;
        vec![rustls::pki_types::CertificateDer::from_pem_slice(issuer_pem.as_bytes()).unwrap()]
    };
    let (cert, key) = leaf(id, false, &mesh_issuer);
    let answer = tls_request_with(inbound, cert, key, &chain).await.expect("a valid mesh client must be served");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let served = backend.behaviour.served.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(served, 1);

    // Expired, from the same issuer: refused.
    let (cert, key) = leaf(id, true, &mesh_issuer);
    assert_refused(tls_request_with(inbound, cert, key, &chain).await, "an expired certificate");
    // From another CA: refused.
    let other_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut other = rcgen::CertificateParams::default();
    other.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other = rcgen::Issuer::new(other, other_key);
    let (cert, key) = leaf(id, false, &other);
    assert_refused(tls_request_with(inbound, cert, key, &[]).await, "a certificate from another CA");

    assert_eq!(backend.behaviour.served.load(std::sync::atomic::Ordering::Relaxed), served, "nothing reached the app");
    wait_until("two refused handshakes counted by reason", Duration::from_secs(5), || async move {
        let m = admin_text(admin, "/metrics").await;
        m.contains("weir_tls_handshake_failures_total{reason=\"client_certificate_expired\"} 1")
            && m.contains("weir_tls_handshake_failures_total{reason=\"client_certificate_untrusted\"} 1")
    })
    .await;
}
