//! Connection turnover is invisible to clients: an h2c application that ends every connection
//! with GOAWAY after 1,000 requests (nginx's default `http2_max_requests`) serves 10,000
//! multiplexed requests through two sidecars with zero failures. Requests above the GOAWAY's
//! last stream were never processed: the sidecar sends them again on a new connection, with
//! no retry policy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use weir_tests::*;

/// An h2c server (the `h2` crate, as servers built on it behave) that answers each request
/// with the length of its body, and after `max` requests on a connection sends GOAWAY
/// (graceful: in-flight streams finish, later ones are refused) and closes.
async fn turnover_app(max: u64) -> (SocketAddr, Arc<AtomicU64>, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (served, connections) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (s, c) = (served.clone(), connections.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let served = s.clone();
            c.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else { return };
                let mut on_this = 0u64;
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    on_this += 1;
                    served.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        let mut len = 0;
                        while let Some(Ok(chunk)) = body.data().await {
                            len += chunk.len();
                            let _ = body.flow_control().release_capacity(chunk.len());
                        }
                        let rsp = http::Response::builder().status(200).body(()).unwrap();
                        if let Ok(mut stream) = respond.send_response(rsp, false) {
                            let _ = stream.send_data(Bytes::from(len.to_string()), true);
                        }
                    });
                    if on_this == max {
                        conn.graceful_shutdown();
                    }
                }
            });
        }
    });
    (addr, served, connections, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_turning_connections_over_fails_no_request() {
    let (app, served, connections, task) = turnover_app(1_000).await;
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("test", "app", &[]));
    let controller = scratch.controller(None).await;
    let grpc = controller.addr("grpc");
    let server = scratch.proxy(grpc, "test/app", Some(app)).await;
    let client = scratch.proxy(grpc, "test/client", None).await;
    scratch.write("services.yaml", &service("test", "app", &[meshed(server.addr("inbound"))]));
    wait_config(client.addr("admin"), "app endpoint", |c| endpoint_count(c, "test", "app") == 1).await;

    // 4 client connections × 16 concurrent streams, 10,000 requests: GETs, and POSTs with a
    // body whose length the app echoes (a replayed request carries its whole body).
    const REQUESTS: u64 = 10_000;
    let next = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let tcp = tokio::net::TcpStream::connect(client.addr("outbound")).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
        tokio::spawn(conn);
        for _ in 0..16 {
            let (mut sender, next, failures) = (sender.clone(), next.clone(), failures.clone());
            workers.push(tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= REQUESTS {
                        return;
                    }
                    let (method, body) =
                        if n % 2 == 0 { ("GET", Bytes::new()) } else { ("POST", Bytes::from(vec![b'x'; 1000])) };
                    let want = body.len().to_string();
                    let req =
                        http::Request::builder().method(method).uri("http://app.test/x").body(Full::new(body)).unwrap();
                    let ok = match sender.send_request(req).await {
                        Ok(rsp) if rsp.status() == 200 => {
                            rsp.into_body().collect().await.map(|b| b.to_bytes() == want.as_bytes()).unwrap_or(false)
                        }
                        _ => false,
                    };
                    if !ok && failures.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("request {n} failed");
                    }
                }
            }));
        }
    }
    for w in workers {
        tokio::time::timeout(Duration::from_secs(120), w).await.expect("requests finish").unwrap();
    }
    let conns = connections.load(Ordering::Relaxed);
    assert!(conns >= 10, "the app turned its connections over: {conns} connections");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "of {REQUESTS} requests ({} reached the app)",
        served.load(Ordering::Relaxed)
    );
    let m = admin_text(server.addr("admin"), "/metrics").await;
    eprintln!(
        "{} requests over {conns} app connections; replayed: {}",
        REQUESTS,
        m.lines().filter(|l| l.starts_with("weir_upstream_replays_total")).collect::<Vec<_>>().join(", ")
    );
    task.abort();
}
