//! SIGTERM drains a sidecar: new connections are refused at once, requests in flight finish.

use std::time::Duration;

use weir_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish() {
    let mut mesh = TwoVersions::start(&split_route(1, 0)).await;
    mesh.v1.behaviour.set_latency(Duration::from_millis(800));
    let via = mesh.outbound();
    let in_flight: Vec<_> =
        (0..4).map(|_| tokio::spawn(async move { send(&http1(), via, "GET", "web.test", "/", &[]).await })).collect();
    // Wait until all four requests have reached the backend, so they are truly in flight.
    let served = &mesh.v1.behaviour.served;
    wait_until("requests in flight", Duration::from_secs(10), || async move {
        served.load(std::sync::atomic::Ordering::Relaxed) >= 4
    })
    .await;
    let stopped = tokio::spawn(async move {
        let exited_cleanly = mesh.client.stop(Duration::from_secs(15)).await;
        (exited_cleanly, mesh)
    });
    // New connections are refused as soon as the drain starts, while the four requests are
    // still being served (the backend holds each for 800 ms).
    wait_until("new connections to be refused", Duration::from_secs(10), || async move {
        tokio::net::TcpStream::connect(via).await.is_err()
    })
    .await;
    let unfinished = in_flight.iter().filter(|r| !r.is_finished()).count();
    assert!(unfinished > 0, "the listener closed only after every request had finished");
    assert!(!stopped.is_finished(), "the sidecar exited before its requests were answered");
    for r in in_flight {
        let r = r.await.unwrap().expect("an in-flight request must complete during the drain");
        assert_eq!((r.status, r.backend()), (200, "v1"), "{}", r.body);
    }
    let (exited_cleanly, _mesh) = stopped.await.unwrap();
    assert!(exited_cleanly, "the sidecar should exit on its own once drained");
    assert!(tokio::net::TcpStream::connect(via).await.is_err(), "a drained sidecar must not accept connections");
}

/// `--shutdown-delay`: on SIGTERM the controller says it is not ready but keeps serving (a
/// sidecar still gets its snapshot) for the delay, then exits on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_serves_not_ready_through_its_shutdown_delay() {
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("test", "web", &[]));
    let mut controller = scratch.controller_with(None, &["--shutdown-delay".into(), "5s".into()]).await;
    let (admin, grpc) = (controller.addr("admin"), controller.addr("grpc"));
    let ready = || async move {
        let rsp = http1().get(format!("http://{admin}/ready").parse().unwrap()).await.unwrap();
        rsp.status().as_u16()
    };
    assert_eq!(ready().await, 200);
    let stopped = tokio::spawn(async move { controller.stop(Duration::from_secs(20)).await });
    wait_until("not ready", Duration::from_secs(10), || async move { ready().await == 503 }).await;
    // Still serving: a sidecar connecting now gets its configuration.
    let late = scratch.proxy(grpc, "test/late", None).await;
    wait_config(late.addr("admin"), "a snapshot from the stopping controller", |c| !c["version"].is_null()).await;
    assert!(!stopped.is_finished(), "the delay is not over yet");
    assert!(stopped.await.unwrap(), "the controller exits on its own after the delay");
}
