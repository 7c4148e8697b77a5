//! Every listener is built by one hardened server: a client that never finishes its headers is
//! closed within the header-read timeout while others are served (slowloris), oversized
//! headers get 431 from the first sidecar instead of a 502 from further on, and garbage gets a
//! 400 and a closed connection, not a stuck one.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir_tests::*;

/// Sends `bytes` on a new connection and returns what came back until the server closed it
/// (`None`: still open after `limit`).
async fn exchange(addr: SocketAddr, bytes: &[u8], limit: Duration) -> Option<Vec<u8>> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut got = Vec::new();
    match tokio::time::timeout(limit, s.read_to_end(&mut got)).await {
        Ok(_) => Some(got),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_are_closed_while_others_are_served() {
    let mesh = TwoVersions::start(&split_route(1, 0)).await;
    let admin = mesh.client.addr("admin");
    // 200 clients each send half a request line to the admin port and then nothing.
    let mut slow = Vec::new();
    for _ in 0..200 {
        let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        slow.push(s);
    }
    let started = Instant::now();
    // Meanwhile the port serves everyone else, and traffic flows.
    assert!(admin_text(admin, "/live").await.starts_with("live"), "the admin port stopped answering");
    let r = send(&http1(), mesh.outbound(), "GET", "web.test", "/", &[]).await.unwrap();
    assert_eq!(r.status, 200);
    // Each half-sent request is closed by the admin header-read timeout (10 s), well before
    // the 40 s bound.
    for mut s in slow {
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(40), s.read_to_end(&mut buf)).await;
        assert!(closed.is_ok(), "a half-sent request was still open after {:?}", started.elapsed());
    }
    assert!(started.elapsed() >= Duration::from_secs(5), "closed before the client had any chance to finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431_and_garbage_gets_400() {
    let mesh = TwoVersions::start(&split_route(1, 0)).await;
    // A 200 KB header to the client sidecar: refused there, with 431.
    let big = "x".repeat(200 * 1024);
    let req = format!("GET / HTTP/1.1\r\nHost: web.test\r\nx-big: {big}\r\n\r\n");
    let got = exchange(mesh.outbound(), req.as_bytes(), Duration::from_secs(10)).await.expect("still open");
    assert!(got.starts_with(b"HTTP/1.1 431"), "{}", String::from_utf8_lossy(&got[..got.len().min(200)]));
    // Headers under the limit still pass through both sidecars.
    let fine = "y".repeat(8 * 1024);
    let r = send(&http1(), mesh.outbound(), "GET", "web.test", "/", &[("x-fine", fine.as_str())]).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    // Garbage on every HTTP port: a 400 and a closed connection.
    for addr in [mesh.outbound(), mesh.client.addr("admin"), mesh.controller.addr("admin")] {
        let got = exchange(addr, b"\x01\x02 not http at all\r\n\r\n", Duration::from_secs(10)).await;
        let got = got.unwrap_or_else(|| panic!("{addr}: garbage kept the connection open"));
        assert!(got.is_empty() || got.starts_with(b"HTTP/1.1 400"), "{addr}: {}", String::from_utf8_lossy(&got));
    }
    // And the proxy is still fine.
    let r = send(&http1(), mesh.outbound(), "GET", "web.test", "/", &[]).await.unwrap();
    assert_eq!(r.status, 200);
}
