//! Every listener is built by one hardened server: a client that never finishes its headers is
//! closed within the header-read timeout while others are served (slowloris), oversized
//! headers get 431 from the first sidecar instead of a 502 from further on, garbage gets a
//! 400 and a closed connection, not a stuck one, and an HTTP/2 rapid-reset flood is cut off
//! with GOAWAY before it costs CPU or reaches the app.

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
    // Host names ignore case (RFC 9110): a mixed-case Host reaches the same Service.
    let r = send(&http1(), mesh.outbound(), "GET", "Web.TEST", "/", &[]).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    // An absolute-form target with credentials is routed by its host; they go no further.
    let req = b"GET http://user:secret@web.test/ HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n";
    let got = exchange(mesh.outbound(), req, Duration::from_secs(10)).await.expect("answered and closed");
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got[..got.len().min(200)]));
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

/// What a rapid-reset flood got from the server.
#[derive(Debug)]
struct Flood {
    /// Streams opened and reset before the connection was closed.
    sent: u32,
    /// The error code of the GOAWAY the server sent, if any.
    goaway: Option<u32>,
}

/// HTTP/2 rapid reset (CVE-2023-44487) with prior knowledge: opens streams (HEADERS for
/// `GET /` at `authority`) and resets each at once (RST_STREAM CANCEL), `batch` pairs per write,
/// up to `max` streams, until the server closes the connection.
async fn rapid_reset(addr: SocketAddr, authority: &str, max: u32, batch: u32) -> Flood {
    fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
    }
    // HPACK: :method GET, :scheme http, :path / (static table), :authority as a literal
    // without indexing (name index 1).
    let mut headers = vec![0x82, 0x86, 0x84, 0x01, authority.len() as u8];
    headers.extend_from_slice(authority.as_bytes());
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    // Read the server's frames, looking for GOAWAY, until it closes.
    let reader = tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut goaway = None;
        loop {
            match tokio::time::timeout(Duration::from_secs(30), rd.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return goaway,
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            }
            while buf.len() >= 9 {
                let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                if buf.len() < 9 + len {
                    break;
                }
                if buf[3] == 7 && len >= 8 {
                    goaway = Some(u32::from_be_bytes([buf[13], buf[14], buf[15], buf[16]]));
                }
                buf.drain(..9 + len);
            }
        }
    });
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 4, 0, 0, &[]);
    wr.write_all(&out).await.unwrap();
    let mut sent = 0;
    let mut stream = 1u32;
    'flood: while sent < max {
        let mut out = Vec::new();
        for _ in 0..batch {
            frame(&mut out, 1, 0x4, stream, &headers); // HEADERS, END_HEADERS
            frame(&mut out, 3, 0, stream, &8u32.to_be_bytes()); // RST_STREAM, CANCEL
            stream += 2;
        }
        if wr.write_all(&out).await.is_err() {
            break 'flood;
        }
        sent += batch;
        if reader.is_finished() {
            break;
        }
    }
    let _ = wr.shutdown().await;
    Flood { sent, goaway: reader.await.unwrap() }
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses): utime is the 14th, stime the 15th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // /proc counts in USER_HZ, which the kernel fixes at 100 for userspace.
    ticks / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_flood_is_cut_off_and_costs_little() {
    let mesh = TwoVersions::start(&split_route(1, 0)).await;
    let (client_pid, server_pid) = (mesh.client.pid(), mesh.sidecars[0].pid());
    let cpu_before = cpu_seconds(client_pid) + cpu_seconds(server_pid);
    // On the app's side (outbound: every stream would become a request upstream), on the
    // mesh side (inbound, plaintext h2c) and on the admin port.
    let targets = [
        ("outbound", mesh.outbound(), "web.test"),
        ("inbound", mesh.sidecars[0].addr("inbound"), "web-v1.test"),
        ("admin", mesh.client.addr("admin"), "admin"),
    ];
    for (what, addr, authority) in targets {
        let flood = rapid_reset(addr, authority, 200_000, 50).await;
        // Cut off with GOAWAY ENHANCE_YOUR_CALM (0xb), the connection closed long before the
        // 200,000 streams (measured: 4,000-12,000 written before the close was seen).
        assert_eq!(flood.goaway, Some(0xb), "{what}: {flood:?}");
        assert!(flood.sent < 100_000, "{what}: {flood:?}");
    }
    // Few of the reset streams became requests to the app.
    let served = mesh.v1.behaviour.served.load(std::sync::atomic::Ordering::Relaxed);
    assert!(served < 2_000, "{served} reset streams reached the app");
    // The sidecars spent little CPU on it (a generous bound: the flood itself is ~100k frames).
    let cpu = cpu_seconds(client_pid) + cpu_seconds(server_pid) - cpu_before;
    assert!(cpu < 5.0, "the floods cost {cpu:.2} CPU seconds");
    // And they still serve.
    let r = send(&http1(), mesh.outbound(), "GET", "web.test", "/", &[]).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(admin_text(mesh.client.addr("admin"), "/live").await.starts_with("live"));
}
