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
        wait_until("a certificate", Duration::from_secs(20), || async move {
            !admin_text(admin, "/ready").await.contains("no workload certificate")
        })
        .await;
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
        admin_text(server.addr("admin"), "/metrics").await.contains("weir_tls_handshake_failures_total 1")
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

/// `weir_identity_renewals_total{result}` from a sidecar's metrics.
async fn renewals(admin: std::net::SocketAddr, result: &str) -> u64 {
    let m = admin_text(admin, "/metrics").await;
    let prefix = format!("weir_identity_renewals_total{{result=\"{result}\"}} ");
    m.lines().find_map(|l| l.strip_prefix(&prefix)?.parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_and_a_controller_outage_fail_no_request() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("test", "web", &[]));
    let flags =
        scratch.identity_flags(&[("t-web", "test/web-v1"), ("t-client", "test/client")], &["--cert-lifetime", "4s"]);
    let mut controller = scratch.controller_with(None, &flags).await;
    let grpc = controller.addr("grpc");
    let backend = Backend::start("v1").await;
    let server = scratch.proxy_with(grpc, "test/web-v1", Some(backend.addr), &scratch.token_flags("t-web")).await;
    let client = scratch.proxy_with(grpc, "test/client", None, &scratch.token_flags("t-client")).await;
    let (sa, ca) = (server.addr("admin"), client.addr("admin"));
    for admin in [sa, ca] {
        wait_until("a certificate", Duration::from_secs(20), || async move { renewals(admin, "ok").await >= 1 }).await;
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
    // Rotations under load: a 4 s certificate renews every ~2.8 s.
    for admin in [sa, ca] {
        wait_until("two more renewals", Duration::from_secs(30), || async move { renewals(admin, "ok").await >= 3 })
            .await;
    }
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
