//! The control plane is TLS and authenticated: a sidecar verifies the controller against the
//! trust anchors it was given out of band (a wrong anchor, or a controller without TLS, gets
//! neither its token nor a stream), and Discovery requires a workload certificate whose
//! SPIFFE ID is the one the `Hello` claims.

use std::sync::Arc;
use std::time::Duration;

use tokio_stream::wrappers::ReceiverStream;
use weir_api::proto;
use weir_proxy::channel::{AnchorSource, ControlEndpoint, ControlTls};
use weir_tests::*;

/// The sum of a metric's series whose line starts with `series` (a name, or a name with
/// labels) on an admin port; 0 when there is none. Panics when the port does not answer.
async fn metric(admin: std::net::SocketAddr, series: &str) -> f64 {
    let text = admin_text(admin, "/metrics").await;
    assert!(text.contains("# TYPE"), "no metrics from {admin}");
    text.lines()
        .filter(|l| {
            l.strip_prefix(series)
                .is_some_and(|rest| rest.starts_with(' ') || (!series.contains('{') && rest.starts_with('{')))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Workload credentials for `service_account` in `test`, certified by the controller.
async fn credentials(
    control: &ControlEndpoint,
    token: &str,
    service_account: &str,
) -> Arc<weir_proxy::tls::Credentials> {
    let id = weir_api::spiffe::id("cluster.local", "test", service_account);
    let (key, csr) = keyed_csr(&id);
    let issued = certify(control, token, csr).await.unwrap();
    let mut chain = vec![issued.leaf_der];
    chain.extend(issued.intermediates_der);
    Arc::new(weir_proxy::tls::Credentials {
        identity: id,
        chain,
        key_pkcs8: key.serialize_der(),
        roots: issued.trust_anchors_der,
        not_after_unix: issued.not_after_unix,
    })
}

/// Opens a Discovery stream saying Hello as `test/<name>` with service account `sa`: the first
/// message back, or the status that refused the stream.
async fn hello(
    control: &ControlEndpoint,
    creds: Option<Arc<weir_proxy::tls::Credentials>>,
    name: &str,
    sa: &str,
) -> Result<proto::ControllerMessage, tonic::Status> {
    let channel = control.channel(creds, None).await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = proto::discovery_client::DiscoveryClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let hello = proto::Hello {
        namespace: "test".into(),
        name: name.into(),
        service_account: sa.into(),
        proxy_version: "test".into(),
        ..Default::default()
    };
    tx.send(proto::ProxyMessage { msg: Some(proto::proxy_message::Msg::Hello(hello)) }).await.unwrap();
    let mut stream = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("no answer in 10s")?;
    drop(tx);
    first.ok_or_else(|| tonic::Status::unknown("stream ended without a message"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_needs_a_certificate_matching_the_hello() {
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("test", "web", &[]));
    let flags = scratch.identity_flags(&[("t-a", "test/a"), ("t-b", "test/b")], &[]);
    let controller = scratch.controller_with(None, &flags).await;
    let (grpc, admin) = (controller.addr("grpc"), controller.addr("admin"));
    let control = scratch.control(grpc, "cluster.local");
    let a = credentials(&control, "t-a", "a").await;

    // A's certificate, A's Hello: a snapshot.
    let first = hello(&control, Some(a.clone()), "a-pod", "a").await.expect("A's own stream");
    assert!(matches!(first.msg, Some(proto::controller_message::Msg::Snapshot(_))), "{first:?}");
    // A's certificate, a Hello claiming B: refused, saying why.
    let e = hello(&control, Some(a), "b-pod", "b").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("/sa/b") && e.message().contains("/sa/a"), "{}", e.message());
    // No client certificate at all: nothing (Certify is the only call open to it).
    let e = hello(&control, None, "b-pod", "b").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert_eq!(metric(admin, "weir_controller_refused_total{reason=\"identity_mismatch\"}").await, 1.0);
    assert_eq!(metric(admin, "weir_controller_refused_total{reason=\"no_certificate\"}").await, 1.0);
    // Certify is limited per caller (each call may cost a TokenReview): a burst of guesses
    // runs into the limit, and says so.
    let mut limited = 0;
    for _ in 0..40 {
        let e = certify(&control, "guess", csr("spiffe://cluster.local/ns/test/sa/a")).await.unwrap_err();
        match e.code() {
            tonic::Code::ResourceExhausted => limited += 1,
            tonic::Code::Unauthenticated => {}
            other => panic!("unexpected {other:?}: {}", e.message()),
        }
    }
    assert!(limited >= 10, "only {limited} of 40 rapid Certify calls were limited");
    assert_eq!(metric(admin, "weir_controller_certify_total{result=\"rate-limited\"}").await, limited as f64);
    // Plaintext gRPC: the port speaks only TLS.
    let plain = ControlEndpoint { addr: grpc.to_string(), tls: None };
    assert!(hello(&plain, None, "b-pod", "b").await.is_err(), "a plaintext client got an answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_trusts_only_its_own_anchors() {
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("test", "web", &[]));
    let flags = scratch.identity_flags(&[("t-web", "test/web")], &[]);
    let controller = scratch.controller_with(None, &flags).await;
    let (grpc, admin) = (controller.addr("grpc"), controller.addr("admin"));

    // Another CA's root as the anchor (what a rogue controller on the path would hold).
    let rogue = {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.self_signed(&key).unwrap().pem()
    };
    let rogue_file = scratch.dir.path().join("rogue.crt");
    std::fs::write(&rogue_file, rogue).unwrap();
    let mut args = scratch.token_flags("t-web");
    args[3] = rogue_file.display().to_string();
    let sidecar = scratch.proxy_with(grpc, "test/web", None, &args).await;
    let sidecar_admin = sidecar.addr("admin");
    wait_until("a refused handshake", Duration::from_secs(20), || async move {
        renewals(sidecar_admin, "error").await >= 1
    })
    .await;
    // The token never reached the controller, the sidecar has no certificate, no stream.
    assert_eq!(metric(admin, "weir_controller_certify_total{result=\"issued\"}").await, 0.0);
    assert_eq!(renewals(sidecar_admin, "ok").await, 0);
    assert!(admin_reply(sidecar_admin, "/ready").await.body.starts_with("not ready"));
    assert!(metric(admin, "weir_controller_refused_total{reason=\"handshake\"}").await >= 1.0);
    // The same check by hand: the controller's certificate does not verify against the rogue root.
    let wrong = ControlEndpoint {
        addr: grpc.to_string(),
        tls: Some(ControlTls {
            anchors: AnchorSource::File(rogue_file.clone()),
            controller_identity: weir_api::spiffe::id("cluster.local", "weir-system", "weir-controller"),
        }),
    };
    assert!(wrong.channel(None, None).await.is_err(), "a rogue anchor verified the controller");
    // The right anchors but another controller identity: refused too.
    let impostor = ControlEndpoint {
        addr: grpc.to_string(),
        tls: Some(ControlTls {
            anchors: AnchorSource::File(scratch.anchors()),
            controller_identity: weir_api::spiffe::id("cluster.local", "weir-system", "someone-else"),
        }),
    };
    assert!(impostor.channel(None, None).await.is_err(), "the controller passed for another identity");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_with_anchors_refuses_a_plaintext_controller() {
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("test", "web", &[]));
    // A controller with identities, only to have a CA to give the sidecar as its anchors...
    let with_ca = scratch.controller_with(None, &scratch.identity_flags(&[("t-web", "test/web")], &[])).await;
    drop(with_ca);
    // ...and the one it meets serves plaintext (on the path, or misconfigured).
    let plain = scratch.controller(None).await;
    let (grpc, admin) = (plain.addr("grpc"), plain.addr("admin"));
    let sidecar = scratch.proxy_with(grpc, "test/web", None, &scratch.token_flags("t-web")).await;
    let sidecar_admin = sidecar.addr("admin");
    wait_until("a failed certificate request", Duration::from_secs(20), || async move {
        renewals(sidecar_admin, "error").await >= 1
    })
    .await;
    assert!(admin_reply(sidecar_admin, "/ready").await.body.starts_with("not ready"));
    assert_eq!(metric(admin, "weir_controller_connected_proxies").await, 0.0, "a stream over plaintext");
    // What the sidecar puts on the wire to a listener that never answers: a TLS ClientHello,
    // never an HTTP/2 preface nor the token.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let _listening =
        scratch.proxy_with(silent.local_addr().unwrap(), "test/web", None, &scratch.token_flags("t-web")).await;
    let (mut conn, _) = tokio::time::timeout(Duration::from_secs(20), silent.accept()).await.unwrap().unwrap();
    let mut sent = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), tokio::io::AsyncReadExt::read(&mut conn, &mut sent))
        .await
        .unwrap()
        .unwrap();
    let sent = &sent[..n];
    assert_eq!(sent.first(), Some(&0x16), "not a TLS handshake: {:?}", String::from_utf8_lossy(sent));
    assert!(!sent.windows(5).any(|w| w == b"t-web") && !sent.starts_with(b"PRI"), "{sent:?}");
    // And without anchors a token is never sent at all: the sidecar refuses to start.
    let token = scratch.token_flags("t-web");
    let args: Vec<String> = [
        "--controller",
        &grpc.to_string(),
        "--workload",
        "test/web",
        &token[0],
        &token[1],
        "--outbound-addr",
        "127.0.0.1:0",
        "--inbound-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--print-listen-addrs",
    ]
    .map(String::from)
    .to_vec();
    let e = ChildProc::spawn("no-anchors", &bin("weir-proxy"), &args, scratch.log("no-anchors"))
        .await
        .err()
        .expect("a sidecar with a token and no anchors started");
    assert!(e.to_string().contains("--token-file needs --trust-anchors"), "{e}");
}
