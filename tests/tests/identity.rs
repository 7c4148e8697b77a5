//! The controller's certificate authority over gRPC: tokens prove workloads, CSRs for any
//! other identity are refused, and the trust anchor survives restarts.

use std::time::Duration;

use rcgen::KeyPair;
use weir_tests::*;
use x509_parser::prelude::*;

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

    let issued = certify(&scratch.control(controller.addr("grpc"), "weir.test"), "s3cret", csr(id)).await.unwrap();
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
    let e = certify(&scratch.control(controller.addr("grpc"), "weir.test"), "guess", csr(id)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = certify(
        &scratch.control(controller.addr("grpc"), "weir.test"),
        "s3cret",
        csr("spiffe://weir.test/ns/shop/sa/admin"),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("sa/admin") && e.message().contains("sa/reviews"), "{}", e.message());
    let e = certify(&scratch.control(controller.addr("grpc"), "weir.test"), "s3cret", b"not a csr".to_vec())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let metrics = admin_text(controller.addr("admin"), "/metrics").await;
    for result in ["issued", "unauthenticated", "wrong-identity", "malformed"] {
        assert!(metrics.contains(&format!("weir_controller_certify_total{{result=\"{result}\"}} 1")), "{metrics}");
    }

    // The trust anchor survives a restart.
    controller.stop(std::time::Duration::from_secs(10)).await;
    let controller = scratch.controller_with(None, &flags).await;
    let again = certify(&scratch.control(controller.addr("grpc"), "weir.test"), "s3cret", csr(id)).await.unwrap();
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
    wait_ready(admin).await;
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
    assert!(admin_reply(forged_admin, "/ready").await.body.contains("no workload certificate"));
    // The private key is never logged.
    let log = std::fs::read_to_string(scratch.log("shop-reviews-v1")).unwrap();
    assert!(!log.contains("PRIVATE KEY") && !log.contains("key_pkcs8"), "key material in the log");
}

fn pem(tag: &str, der: &[u8]) -> String {
    ::pem::encode(&::pem::Pem::new(tag, der.to_vec()))
}

/// Runs `openssl s_client` against `addr` with `extra` flags; its stdout and stderr together.
async fn s_client(addr: std::net::SocketAddr, extra: &[String]) -> String {
    let mut cmd = tokio::process::Command::new("openssl");
    cmd.args(["s_client", "-connect", &addr.to_string(), "-showcerts", "-alpn", "weir.h2/1"])
        .args(extra)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("openssl s_client finished")
        .expect("openssl is installed (scripts/test.sh installs it)");
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_sees_the_chain_and_needs_a_mesh_certificate() {
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("shop", "web", &[]));
    let flags = scratch.identity_flags(&[("t-web", "shop/web"), ("t-client", "shop/client")], &[]);
    let controller = scratch.controller_with(None, &flags).await;
    let backend = Backend::start("web").await;
    let server = scratch
        .proxy_with(controller.addr("grpc"), "shop/web", Some(backend.addr), &scratch.token_flags("t-web"))
        .await;
    let admin = server.addr("admin");
    wait_ready(admin).await;
    let root = scratch.dir.path().join("identity/root.crt");

    // A client with a mesh certificate: the handshake completes, the chain verifies against
    // the trust anchor, and the server's leaf names its SPIFFE ID.
    let (key, csr_der) = keyed_csr("spiffe://cluster.local/ns/shop/sa/client");
    let issued =
        certify(&scratch.control(controller.addr("grpc"), "cluster.local"), "t-client", csr_der).await.unwrap();
    let intermediates: String = issued.intermediates_der.iter().map(|d| pem("CERTIFICATE", d)).collect();
    let files = ["client.crt", "chain.crt", "client.key"].map(|f| scratch.dir.path().join(f));
    std::fs::write(&files[0], pem("CERTIFICATE", &issued.leaf_der)).unwrap();
    std::fs::write(&files[1], intermediates).unwrap();
    std::fs::write(&files[2], key.serialize_pem()).unwrap();
    let p = |p: &std::path::Path| p.display().to_string();
    let [cert, chain, key] = files.each_ref().map(|f| p(f));
    let out = s_client(
        server.addr("inbound"),
        &["-CAfile".into(), p(&root), "-cert".into(), cert, "-cert_chain".into(), chain, "-key".into(), key],
    )
    .await;
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(out.contains("s:O = Weir, CN = web.shop") && out.contains("i:CN = Weir issuer"), "{out}");
    assert!(out.contains("ALPN protocol: weir.h2/1"), "{out}");
    let shown: Vec<&str> = out.split("-----BEGIN CERTIFICATE-----").skip(1).collect();
    assert_eq!(shown.len(), 2, "leaf and issuer expected:\n{out}");
    let leaf_b64: String =
        shown[0].split("-----END CERTIFICATE-----").next().unwrap().chars().filter(|c| !c.is_whitespace()).collect();
    let leaf_pem = format!("-----BEGIN CERTIFICATE-----\n{leaf_b64}\n-----END CERTIFICATE-----\n");
    let leaf = ::pem::parse(leaf_pem).unwrap();
    let (_, cert) = X509Certificate::from_der(leaf.contents()).unwrap();
    let sans = cert.subject_alternative_name().unwrap().unwrap();
    assert!(
        sans.value.general_names.iter().any(|n| matches!(n, GeneralName::URI("spiffe://cluster.local/ns/shop/sa/web"))),
        "{:?}",
        sans.value
    );
    let m = admin_text(admin, "/metrics").await;
    assert!(!m.contains("weir_tls_handshake_failures_total{"), "{m}");

    // Without a client certificate the server still shows its chain (TLS 1.3 sends it before
    // asking for the client's), then refuses the handshake.
    let out = s_client(server.addr("inbound"), &["-CAfile".into(), p(&root)]).await;
    assert!(out.contains("BEGIN CERTIFICATE"), "{out}");
    wait_until("the refused handshake counted", Duration::from_secs(10), || async move {
        admin_text(admin, "/metrics")
            .await
            .contains("weir_tls_handshake_failures_total{reason=\"client_certificate_missing\"} 1")
    })
    .await;
    assert_eq!(backend.behaviour.served.load(std::sync::atomic::Ordering::Relaxed), 0);
}

/// What a P-256 private key looks like in every encoding a program might write it in: PEM
/// armour, the key-independent PKCS#8 DER prefix raw, in base64 and as a Debug-printed array.
fn key_marks() -> Vec<(&'static str, Vec<u8>)> {
    let der = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap().serialize_der();
    // 36 bytes of structure before the secret scalar (a multiple of 3: clean base64).
    let prefix = der[..36].to_vec();
    let b64 = ::pem::encode(&::pem::Pem::new("X", prefix.clone()));
    let b64: String = b64.lines().nth(1).unwrap().chars().take(48).collect();
    let debug = format!("{:?}", &prefix[..12]);
    vec![
        ("PEM armour", b"PRIVATE KEY".to_vec()),
        ("PKCS#8 DER", prefix),
        ("PKCS#8 base64", b64.into_bytes()),
        ("PKCS#8 as a byte array", debug.trim_end_matches(']').as_bytes().to_vec()),
    ]
}

fn find_key(bytes: &[u8]) -> Option<&'static str> {
    key_marks().into_iter().find(|(_, m)| bytes.windows(m.len()).any(|w| w == m.as_slice())).map(|(what, _)| what)
}

/// Every file under `dir`; a folder that cannot be read fails the scan (it would hide a key).
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot scan {}: {e}", dir.display())) {
        let path = e.unwrap_or_else(|e| panic!("cannot scan {}: {e}", dir.display())).path();
        if path.is_dir() { out.extend(files_under(&path)) } else { out.push(path) }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_keys_never_reach_disk_or_logs() {
    // The scan finds a key written in any of the forms it looks for.
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    assert_eq!(find_key(key.serialize_pem().as_bytes()), Some("PEM armour"));
    assert_eq!(find_key(&key.serialize_der()), Some("PKCS#8 DER"));
    let b64 = ::pem::encode(&::pem::Pem::new("K", key.serialize_der())).replace("-----BEGIN K-----", "");
    assert_eq!(find_key(b64.as_bytes()), Some("PKCS#8 base64"));
    assert_eq!(find_key(format!("key: {:?}", key.serialize_der()).as_bytes()), Some("PKCS#8 as a byte array"));

    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("shop", "web", &[]));
    let flags =
        scratch.identity_flags(&[("t-web", "shop/web"), ("t-client", "shop/client")], &["--cert-lifetime", "3s"]);
    let controller = scratch.controller_with(None, &flags).await;
    let grpc = controller.addr("grpc");
    let backend = Backend::start("web").await;
    // The server sidecar logs at trace level, with its working directory, HOME and TMPDIR in
    // a directory of its own.
    let home = tempfile::tempdir().unwrap();
    let mut args = loopback_sidecar_args(grpc, "shop/web", Some(backend.addr), "trace");
    args.extend(scratch.token_flags("t-web"));
    let log = scratch.log("traced-web");
    let mut server = ChildProc::spawn_in("web", &bin("weir-proxy"), &args, log.clone(), home.path()).await.unwrap();
    let client = scratch.proxy_with(grpc, "shop/client", None, &scratch.token_flags("t-client")).await;
    let admin = server.addr("admin");
    let endpoint = format!("{{ address: \"{}\", meshed: true, serviceAccount: web }}", server.addr("inbound"));
    scratch.write("services.yaml", &service("shop", "web", &[endpoint]));
    wait_config(client.addr("admin"), "the endpoint", |c| endpoint_count(c, "shop", "web") == 1).await;
    let client_admin = client.addr("admin");
    for a in [client_admin, admin] {
        wait_until("both certificates", Duration::from_secs(20), || async move { renewals(a, "ok").await >= 1 }).await;
    }

    // mTLS traffic across two renewals of the server's certificate.
    let mut open_files = Vec::new();
    while renewals(admin, "ok").await < 3 {
        let r = send(&http1(), client.addr("outbound"), "GET", "web.shop", "/", &[]).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        for fd in std::fs::read_dir(format!("/proc/{}/fd", server.pid())).unwrap().flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && target.is_file()
                && !open_files.contains(&target)
            {
                open_files.push(target);
            }
        }
    }
    let served = admin_text(admin, "/metrics").await;
    assert!(served.contains("client_identity=\"spiffe://cluster.local/ns/shop/sa/client\",tls=\"true\"}"), "{served}");
    assert!(server.stop(Duration::from_secs(10)).await);

    let mut scanned = vec![log.clone()];
    scanned.extend(files_under(home.path()));
    scanned.extend(open_files);
    for path in &scanned {
        // A file that vanished since it was listed holds nothing; any other error fails the scan.
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("cannot scan {}: {e}", path.display()),
        };
        assert_eq!(find_key(&bytes), None, "key material in {}", path.display());
    }
    // The log is real: trace output of the handshakes the sidecar made.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("TRACE") && text.len() > 10_000, "{} bytes of log", text.len());
}
