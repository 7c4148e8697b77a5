//! gRPC understood, not just carried: a tonic application and client through two sidecars.
//! All four kinds of call; a call's outcome comes from its `grpc-status` (trailers or
//! trailers-only), so failures answered with HTTP 200 are counted as failures in the metrics,
//! in `weir stat` and in canary analysis, and are retried on the policy's gRPC codes.

use std::time::Duration;

use weir_tests::grpc_app::{self, CHAT, FANOUT, GrpcApp, Msg, SUM, codec, path};
use weir_tests::*;

/// A controller, the tonic application behind its sidecar as Service `orders`, and a client
/// sidecar routing to it.
struct GrpcMesh {
    scratch: Scratch,
    controller: ChildProc,
    app: GrpcApp,
    server: ChildProc,
    client: ChildProc,
}

impl GrpcMesh {
    async fn start() -> Self {
        let scratch = Scratch::new();
        let app = GrpcApp::start().await;
        let SidecarPair { controller, server, client } = SidecarPair::start(&scratch, "orders", app.addr).await;
        Self { scratch, controller, app, server, client }
    }

    async fn channel(&self) -> tonic::client::Grpc<tonic::transport::Channel> {
        grpc_app::channel(self.client.addr("outbound"), "orders.test:50051").await
    }
}

/// The sum of the samples of `name` whose labels include every `label="value"` in `labels`.
fn count(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn metrics_of(sidecar: &ChildProc) -> String {
    let m = admin_text(sidecar.addr("admin"), "/metrics").await;
    assert!(m.contains("weir_requests_total"), "the sidecar's metrics must be readable: {m}");
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_four_kinds_of_call_through_two_sidecars() {
    let mesh = GrpcMesh::start().await;
    let mut client = mesh.channel().await;

    // Unary.
    let got = grpc_app::unary(&mut client, 7).await.unwrap();
    assert_eq!(got, Msg { seq: 7, payload: b"ping".to_vec() });

    // Server streaming: 1,000 messages.
    client.ready().await.unwrap();
    let req = tonic::Request::new(Msg { seq: 1_000, payload: vec![] });
    let mut stream = client.server_streaming(req, path(FANOUT), codec()).await.unwrap().into_inner();
    let mut seen = 0;
    while let Some(m) = stream.message().await.unwrap() {
        assert_eq!(m.seq, seen);
        seen += 1;
    }
    assert_eq!(seen, 1_000);

    // Client streaming: 1,000 messages.
    client.ready().await.unwrap();
    let outgoing = futures_util::stream::iter((0..1_000).map(|seq| Msg { seq, payload: vec![b'y'; 100] }));
    let got = client.client_streaming(tonic::Request::new(outgoing), path(SUM), codec()).await.unwrap().into_inner();
    assert_eq!((got.seq, got.payload), (1_000, b"100000".to_vec()));

    // Bidirectional: 1,000 round trips, each message sent only after the previous echo came
    // back, so nothing on the way may wait for more (or for the end of the stream).
    client.ready().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Msg>(1);
    tx.send(Msg { seq: 0, payload: b"hello".to_vec() }).await.unwrap();
    let outgoing = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut echoes = client.streaming(tonic::Request::new(outgoing), path(CHAT), codec()).await.unwrap().into_inner();
    for seq in 0..1_000u64 {
        let m = tokio::time::timeout(Duration::from_secs(10), echoes.message()).await.unwrap().unwrap().unwrap();
        assert_eq!(m.seq, seq);
        if seq + 1 < 1_000 {
            tx.send(Msg { seq: seq + 1, payload: b"hello".to_vec() }).await.unwrap();
        }
    }
    drop(tx);
    assert!(echoes.message().await.unwrap().is_none(), "the stream ends cleanly");

    // A stream that fails after its messages: the status is only in the trailers.
    client.ready().await.unwrap();
    let req = tonic::Request::new(Msg { seq: 10, payload: b"fail".to_vec() });
    let mut stream = client.server_streaming(req, path(FANOUT), codec()).await.unwrap().into_inner();
    let mut got = 0;
    let err = loop {
        match stream.message().await {
            Ok(Some(_)) => got += 1,
            Ok(None) => panic!("the stream must end with UNAVAILABLE"),
            Err(e) => break e,
        }
    };
    assert_eq!((got, err.code()), (10, tonic::Code::Unavailable));
    drop(stream);

    // Both sidecars counted four calls OK and the failed stream as a failure, by its status.
    for (sidecar, direction) in [(&mesh.client, "outbound"), (&mesh.server, "inbound")] {
        let dir = format!("direction=\"{direction}\"");
        let admin = sidecar.addr("admin");
        wait_until("the failed stream's trailers counted", Duration::from_secs(10), || async move {
            let m = admin_text(admin, "/metrics").await;
            count(&m, "weir_responses_total", &["grpc_status=\"14\""]) >= 1.0
        })
        .await;
        let m = metrics_of(sidecar).await;
        let ok = count(&m, "weir_responses_total", &[&dir, "grpc_status=\"0\"", "classification=\"success\""]);
        let failed = count(&m, "weir_responses_total", &[&dir, "grpc_status=\"14\"", "classification=\"failure\""]);
        assert_eq!((ok, failed), (4.0, 1.0), "{direction}:\n{m}");
        assert_eq!(
            count(&m, "weir_responses_total", &[&dir, "status_code=\"200\""]),
            5.0,
            "every call was HTTP 200: {m}"
        );
    }
}

fn retry_policy() -> String {
    "apiVersion: weir.io/v1alpha1\nkind: ResiliencePolicy\nmetadata: { name: orders, namespace: test }\nspec:\n  \
     targetRef: { service: orders }\n  retries:\n    attempts: 2\n    retryOn: [unavailable]\n    \
     backoff: { base: 1ms, max: 5ms }\n    budget: { percent: 50, minRetriesPerSecond: 100 }\n"
        .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_failures_are_counted_in_metrics_and_stat_and_retried_by_policy() {
    let mesh = GrpcMesh::start().await;
    // 30 % of calls (numbers ≡ 0, 3, 6 mod 10) fail with UNAVAILABLE, never two in a row.
    mesh.app.fail_residues(&[0, 3, 6]);
    let mut client = mesh.channel().await;
    let mut failed = 0;
    for seq in 0..300 {
        match grpc_app::unary(&mut client, seq).await {
            Ok(_) => {}
            Err(e) if e.code() == tonic::Code::Unavailable => failed += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(failed, 90, "the application fails exactly 30 %");
    let m = metrics_of(&mesh.client).await;
    let out = "direction=\"outbound\"";
    assert_eq!(count(&m, "weir_responses_total", &[out, "classification=\"failure\""]), 90.0, "{m}");
    assert_eq!(count(&m, "weir_responses_total", &[out, "grpc_status=\"14\""]), 90.0, "{m}");
    assert_eq!(count(&m, "weir_responses_total", &[out, "classification=\"success\""]), 210.0, "{m}");

    // The controller hears it from the reports: `weir stat` shows 70 % success.
    let row = stat_row(mesh.controller.addr("admin"), "orders", "test", "test/orders", 300).await;
    assert_eq!((row["requests"].as_u64(), row["failures"].as_u64()), (Some(300), Some(90)), "{row}");
    assert_eq!(row["successRate"].as_f64(), Some(70.0), "{row}");

    // With a retry policy on `unavailable`, the client sees no failure at all (each failing
    // call is followed by a succeeding one), though every call is a POST without a length.
    mesh.scratch.write("policy.yaml", &retry_policy());
    wait_config(mesh.client.addr("admin"), "the retry policy", |c| c.to_string().contains("\"policies\":[{")).await;
    let calls_before = mesh.app.calls();
    let mut failed = 0;
    for seq in 0..300 {
        if grpc_app::unary(&mut client, seq).await.is_err() {
            failed += 1;
        }
    }
    assert!(failed < 3, "{failed} of 300 calls failed with retries on (< 1 % required)");
    // 30 % of the application's calls fail, retries included: r = 0.3 × (300 + r), r ≈ 129.
    let retried = mesh.app.calls() - calls_before - 300;
    assert!((120..=135).contains(&retried), "the failing 30 % were retried: {retried}");
    let m = metrics_of(&mesh.client).await;
    assert_eq!(count(&m, "weir_retries_total", &["service=\"test/orders\""]), retried as f64, "{m}");
}

/// A streaming call's request body goes upstream as it arrives even with a retry policy (the
/// copy kept for a replay never holds it back), and a stream larger than the replay buffer
/// still passes whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_flow_under_a_retry_policy() {
    let mesh = GrpcMesh::start().await;
    mesh.scratch.write("policy.yaml", &retry_policy());
    wait_config(mesh.client.addr("admin"), "the retry policy", |c| c.to_string().contains("\"policies\":[{")).await;
    let mut client = mesh.channel().await;
    client.ready().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Msg>(1);
    tx.send(Msg { seq: 0, payload: vec![b'z'; 1024] }).await.unwrap();
    let mut echoes = client
        .streaming(tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)), path(CHAT), codec())
        .await
        .unwrap()
        .into_inner();
    // 200 round trips of 1 KiB: 200 KiB each way, past the 64 KiB kept for replay.
    for seq in 0..200u64 {
        let m = tokio::time::timeout(Duration::from_secs(10), echoes.message()).await.unwrap().unwrap().unwrap();
        assert_eq!((m.seq, m.payload.len()), (seq, 1024));
        if seq + 1 < 200 {
            tx.send(Msg { seq: seq + 1, payload: vec![b'z'; 1024] }).await.unwrap();
        }
    }
    drop(tx);
    assert!(echoes.message().await.unwrap().is_none());
}

/// Canary analysis sees gRPC failures: a canary failing 20 % of its calls with UNAVAILABLE
/// (HTTP 200) is rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_canary_failing_a_fifth_of_its_calls_is_rolled_back() {
    let mesh = TwoVersions::start("").await;
    mesh.v2.behaviour.set_fail_rate(0.2);
    mesh.scratch.write(
        "canary.yaml",
        "apiVersion: weir.io/v1alpha1\nkind: Canary\nmetadata: { name: web, namespace: test }\nspec:\n  service: web\n  \
         stable: web-v1\n  canary: web-v2\n  interval: 1s\n  steps: [20, 50]\n  \
         analysis: { minRequests: 20, minSuccessRate: 95, failureLimit: 2 }\n",
    );
    wait_config(mesh.client.addr("admin"), "the canary's split", |c| weights(c, "test", "web").len() == 2).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let via = mesh.outbound();
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            use tonic::codegen::http::uri::PathAndQuery;
            let mut client = grpc_app::channel(via, "web.test").await;
            let echo = tonic_prost::ProstCodec::<Msg, Msg>::default;
            let (mut calls, mut failed) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                client.ready().await.unwrap();
                let req = tonic::Request::new(Msg { seq: calls, payload: b"canary".to_vec() });
                calls += 1;
                if client.unary(req, PathAndQuery::from_static("/bench.Echo/Call"), echo()).await.is_err() {
                    failed += 1;
                }
            }
            (calls, failed)
        })
    };
    let admin = mesh.controller.addr("admin");
    wait_until("the canary rolled back", Duration::from_secs(30), || async move {
        admin_json(admin, "/canaries").await["canaries"][0]["status"]["phase"] == "Failed"
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (calls, failed) = load.await.unwrap();
    let status = admin_json(admin, "/canaries").await["canaries"][0]["status"].clone();
    let msg = status["message"].as_str().unwrap_or_default();
    assert!(msg.contains("success rate") && msg.contains("below minSuccessRate 95%"), "{status:#}");
    assert_eq!(status["weight"], 0, "{status:#}");
    assert!(failed > 0, "the client saw the canary's gRPC failures ({failed} of {calls})");
}
