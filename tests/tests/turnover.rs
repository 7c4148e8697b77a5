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

/// A connection that, once its server is done with it, lingers for a second reading (and
/// discarding) what the client still sends before it closes, as nginx's `lingering_close` and
/// Go's HTTP/2 server do: without it the kernel answers those bytes with RST, which can
/// destroy the GOAWAY before the client reads it.
struct Lingering(Option<tokio::net::TcpStream>);

impl Drop for Lingering {
    fn drop(&mut self) {
        if let Some(mut tcp) = self.0.take() {
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut sink = [0u8; 4096];
                let until = tokio::time::Instant::now() + Duration::from_secs(1);
                while let Ok(Ok(n)) = tokio::time::timeout_at(until, tcp.read(&mut sink)).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    }
}

impl tokio::io::AsyncRead for Lingering {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(self.0.as_mut().expect("open until dropped")).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Lingering {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(self.0.as_mut().expect("open until dropped")).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(self.0.as_mut().expect("open until dropped")).poll_flush(cx)
    }
    /// Only the sending side closes; reading goes on while lingering.
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(self.0.as_mut().expect("open until dropped")).poll_shutdown(cx)
    }
}

/// An h2c server (the `h2` crate, as servers built on it behave) that answers each request
/// with the length of its body, and after `max` requests on a connection sends GOAWAY
/// (graceful: in-flight streams finish, later ones are refused) and closes, lingering as
/// nginx does.
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
                let Ok(mut conn) = h2::server::handshake(Lingering(Some(tcp))).await else { return };
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
    let pair = SidecarPair::start(&scratch, "app", app).await;
    let (server, client) = (&pair.server, &pair.client);

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
                    let outcome = match sender.send_request(req).await {
                        Ok(rsp) => {
                            let (status, error) = (rsp.status(), rsp.headers().get("weir-error").cloned());
                            match rsp.into_body().collect().await.map(|b| b.to_bytes()) {
                                Ok(b) if status == 200 && b == want.as_bytes() => Ok(()),
                                Ok(b) => Err(format!("{status} {error:?} {b:?}")),
                                Err(e) => Err(format!("{status}, then the body failed: {e}")),
                            }
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    if let Err(why) = &outcome
                        && failures.fetch_add(1, Ordering::Relaxed) < 5
                    {
                        eprintln!("request {n} failed: {why}");
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
