//! TLS the application originates itself passes through the sidecar untouched: `CONNECT
//! host:port` on the outbound listener (what `HTTPS_PROXY` makes clients send) opens an opaque
//! tunnel, and the client completes its own TLS handshake with the external server — verified
//! against that server's own certificate — even on a sidecar that holds a mesh identity.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use weir_tests::*;

/// An "external" TLS server for `localhost` with its own self-signed certificate, echoing one
/// line back in upper case.
async fn external_tls_server() -> (std::net::SocketAddr, CertificateDer<'static>, tokio::task::JoinHandle<()>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().self_signed(&key).unwrap();
    let der = cert.der().clone();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            conns.spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let mut tls = BufReader::new(tls);
                let mut line = String::new();
                if tls.read_line(&mut line).await.is_ok() {
                    let _ = tls.get_mut().write_all(line.to_uppercase().as_bytes()).await;
                    let _ = tls.get_mut().shutdown().await;
                }
            });
        }
    });
    (addr, der, task)
}

/// Sends `CONNECT target` to the sidecar; the status line and the headers it answered with.
async fn connect(via: std::net::SocketAddr, target: &str) -> (TcpStream, String) {
    let mut tcp = TcpStream::connect(via).await.unwrap();
    tcp.write_all(format!("CONNECT {target} HTTP/1.1\r\nhost: {target}\r\n\r\n").as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut byte)).await.unwrap().unwrap();
        assert!(n > 0, "the sidecar closed mid-answer: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    (tcp, String::from_utf8_lossy(&head).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_originated_tls_passes_through_untouched() {
    let scratch = Scratch::new();
    // web's one endpoint is 127.0.0.1:1: a mesh address that must not be tunnelled to.
    scratch.write("services.yaml", &service("test", "web", &["{ address: \"127.0.0.1:1\" }".to_string()]));
    let flags = scratch.identity_flags(&[("t-client", "test/client")], &[]);
    let controller = scratch.controller_with(None, &flags).await;
    let client =
        scratch.proxy_with(controller.addr("grpc"), "test/client", None, &scratch.token_flags("t-client")).await;
    let admin = client.addr("admin");
    wait_until("a mesh certificate", Duration::from_secs(20), || async move { renewals(admin, "ok").await >= 1 }).await;
    wait_config(admin, "the mesh's services", |c| endpoint_count(c, "test", "web") == 1).await;
    let (external, cert, _server) = external_tls_server().await;

    // Through the tunnel, the client's own TLS handshake succeeds against the external
    // server's own certificate: the sidecar neither terminates nor re-signs anything.
    let (tcp, head) = connect(client.addr("outbound"), &external.to_string()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let mut tls = tokio::time::timeout(
        Duration::from_secs(10),
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .unwrap()
    .expect("TLS through the tunnel verifies against the external server's certificate");
    tls.write_all(b"hello through the mesh\n").await.unwrap();
    let mut echoed = String::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_string(&mut echoed)).await.unwrap().unwrap();
    assert_eq!(echoed, "HELLO THROUGH THE MESH\n");
    drop(tls);
    wait_until("the tunnel counted and closed", Duration::from_secs(10), || async move {
        let m = admin_text(admin, "/metrics").await;
        m.contains("weir_tunnels_total{result=\"ok\"} 1")
            && m.contains("weir_tunnel_bytes_total{direction=\"received\"}")
            && !m.contains("weir_tunnel_bytes_total{direction=\"received\"} 0")
            && m.contains("weir_tunnels_active 0")
    })
    .await;

    // Mesh services are not tunnelled; unreachable destinations are a 502 with the reason.
    for mesh in ["web.test:80", "WEB.Test:80", "127.0.0.1:1"] {
        let (_, head) = connect(client.addr("outbound"), mesh).await;
        assert!(head.starts_with("HTTP/1.1 400") && head.contains("send plain HTTP"), "{mesh}: {head}");
    }
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (_, head) = connect(client.addr("outbound"), &closed.to_string()).await;
    assert!(head.starts_with("HTTP/1.1 502") && head.contains(&format!("connecting to {closed} failed")), "{head}");
    // The sidecar goes on serving.
    let (_, head) = connect(client.addr("outbound"), &external.to_string()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}
