//! SIGTERM drains a sidecar: requests in flight finish, new connections are refused.

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
    for r in in_flight {
        let r = r.await.unwrap().expect("an in-flight request must complete during the drain");
        assert_eq!((r.status, r.backend()), (200, "v1"), "{}", r.body);
    }
    let (exited_cleanly, _mesh) = stopped.await.unwrap();
    assert!(exited_cleanly, "the sidecar should exit on its own once drained");
    assert!(tokio::net::TcpStream::connect(via).await.is_err(), "a drained sidecar must not accept connections");
}
