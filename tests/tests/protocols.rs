//! Protocols through two sidecars: HTTP/1.1 and h2c clients keep their protocol end to end,
//! gRPC unary and server-streaming calls work, and large bodies stream without buffering.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio_stream::StreamExt;
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use weir_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_h2c_clients_keep_their_protocol() {
    let mesh = TwoVersions::start(&split_route(1, 0)).await;
    let h1 = send(&http1(), mesh.outbound(), "GET", "web.test", "/headers?x=1", &[("x-custom", "kept")]).await.unwrap();
    let h2 = send_h2(mesh.outbound(), "web.test", "/headers?x=1").await.unwrap();
    for (r, want) in [(h1, "HTTP/1.1"), (h2, "HTTP/2.0")] {
        assert_eq!(r.status, 200, "{}", r.body);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["version"], want, "{v}");
        assert_eq!(v["authority"], "web.test", "{v}");
        assert_eq!(v["path"], "/headers?x=1");
        if want == "HTTP/1.1" {
            assert_eq!(v["headers"]["x-custom"], "kept");
        }
        assert!(v["headers"].get("weir-orig-proto").is_none(), "internal header leaked: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_requests_and_one_connection_per_peer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mesh = TwoVersions::start(&split_route(1, 0)).await;
    // What `curl -x http://outbound http://web.test/` sends.
    let mut tcp = tokio::net::TcpStream::connect(mesh.outbound()).await.unwrap();
    tcp.write_all(b"GET http://web.test/headers HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.contains("\"authority\":\"web.test\""), "{raw}");

    // 64 concurrent HTTP/1.1 requests on separate client connections ride one HTTP/2
    // connection between the sidecars.
    let via = mesh.outbound();
    let calls: Vec<_> =
        (0..64).map(|_| tokio::spawn(async move { send(&http1(), via, "GET", "web.test", "/", &[]).await })).collect();
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap().status, 200);
    }
    let metrics = admin_text(mesh.sidecars[0].addr("admin"), "/metrics").await;
    assert!(metrics.contains("weir_connections_total{direction=\"inbound\"} 1\n"), "{metrics}");

    // A plain (non-mesh) client may call the inbound listener directly.
    let r = send(&http1(), mesh.sidecars[0].addr("inbound"), "GET", "web-v1.test", "/headers", &[]).await.unwrap();
    assert_eq!((r.status, r.backend()), (200, "v1"), "{}", r.body);
    assert!(r.body.contains("\"authority\":\"web-v1.test\""), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_server_streaming_through_two_sidecars() {
    let scratch = Scratch::new();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_service_status("orders", ServingStatus::Serving).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let pair = SidecarPair::start(&scratch, "orders", grpc_addr).await;
    let client_sidecar = &pair.client;

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", client_sidecar.addr("outbound")))
        .unwrap()
        .origin("http://orders.test:50051".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let status = client.check(HealthCheckRequest { service: "orders".into() }).await.unwrap().into_inner().status;
    assert_eq!(status, ServingStatus::Serving as i32);
    let err = client.check(HealthCheckRequest { service: "nope".into() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "gRPC status must survive the trip: {err:?}");

    let mut stream = client.watch(HealthCheckRequest { service: "orders".into() }).await.unwrap().into_inner();
    assert_eq!(next(&mut stream).await, ServingStatus::Serving as i32);
    reporter.set_service_status("orders", ServingStatus::NotServing).await;
    assert_eq!(next(&mut stream).await, ServingStatus::NotServing as i32);
    reporter.set_service_status("orders", ServingStatus::Serving).await;
    assert_eq!(next(&mut stream).await, ServingStatus::Serving as i32);
    drop(stream);
    server.abort();
}

/// The demo backend answers any gRPC call by echoing its message (what `bench/vs_envoy.py`
/// scenario 3 sends), through both sidecars; a message over gRPC's 4 MiB default is refused with
/// RESOURCE_EXHAUSTED rather than buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_backend_echoes_grpc_calls_through_two_sidecars() {
    use tonic::codegen::http::uri::PathAndQuery;
    let mesh = TwoVersions::start(&split_route(1, 0)).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", mesh.outbound()))
        .unwrap()
        .origin("http://web.test".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    let codec = || tonic_prost::ProstCodec::<HealthCheckRequest, HealthCheckRequest>::default();
    let path = PathAndQuery::from_static("/bench.Echo/Call");
    grpc.ready().await.unwrap();
    let sent = HealthCheckRequest { service: "hello through the mesh".into() };
    let got = grpc.unary(tonic::Request::new(sent.clone()), path.clone(), codec()).await.unwrap().into_inner();
    assert_eq!(got, sent);
    assert_eq!(mesh.v1.behaviour.served.load(std::sync::atomic::Ordering::Relaxed), 1);

    grpc.ready().await.unwrap();
    let big = HealthCheckRequest { service: "x".repeat(5 * 1024 * 1024) };
    let err = grpc.unary(tonic::Request::new(big), path, codec()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
}

async fn next(s: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>) -> i32 {
    tokio::time::timeout(Duration::from_secs(10), s.message()).await.unwrap().unwrap().unwrap().status
}

const BIG: u64 = 50 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_megabytes_stream_through_without_buffering() {
    let mesh = TwoVersions::start(&split_route(1, 0)).await;
    let client = http1();
    // Warm up connections and pools, then take the sidecars' peak RSS as the baseline.
    for _ in 0..20 {
        send(&client, mesh.outbound(), "GET", "web.test", "/bytes?n=1048576", &[]).await.unwrap();
    }
    let pids = [mesh.client.pid(), mesh.sidecars[0].pid()];
    let before: Vec<u64> = pids.iter().map(|p| memory_kib(*p).unwrap().0).collect();

    // Upload: 50 MB produced lazily in 64 KiB chunks.
    let chunk = Bytes::from(vec![7u8; 64 * 1024]);
    let frames =
        tokio_stream::iter((0..BIG / (64 * 1024)).map(move |_| Ok::<_, hyper::Error>(Frame::data(chunk.clone()))));
    let req = http::Request::post(format!("http://{}/upload", mesh.outbound()))
        .header("host", "web.test")
        .body(StreamBody::new(frames).boxed())
        .unwrap();
    let rsp = tokio::time::timeout(Duration::from_secs(120), client.request(req)).await.unwrap().unwrap();
    assert_eq!(rsp.status(), 200);
    let body = rsp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&body).trim(), BIG.to_string());

    // Download: 50 MB read chunk by chunk.
    let req = http::Request::get(format!("http://{}/bytes?n={BIG}", mesh.outbound()))
        .header("host", "web.test")
        .body(empty())
        .unwrap();
    let rsp = tokio::time::timeout(Duration::from_secs(120), client.request(req)).await.unwrap().unwrap();
    let mut body = rsp.into_body().into_data_stream();
    let mut got = 0u64;
    while let Some(chunk) = body.next().await {
        got += chunk.unwrap().len() as u64;
    }
    assert_eq!(got, BIG);

    for (pid, before) in pids.iter().zip(before) {
        let after = memory_kib(*pid).unwrap().0;
        let growth_mib = after.saturating_sub(before) as f64 / 1024.0;
        println!("sidecar {pid}: peak RSS {before} KiB -> {after} KiB (+{growth_mib:.1} MiB) for 2 x 50 MiB");
        assert!(growth_mib < 8.0, "sidecar {pid} peak RSS grew by {growth_mib:.1} MiB while streaming 50 MiB");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_are_not_buffered() {
    let mesh = TwoVersions::start(&split_route(1, 0)).await;
    // The second event comes a minute after the first: if any hop buffered the body, the first
    // would not arrive within the 20 s allowed here.
    let req = http::Request::get(format!("http://{}/sse?n=2&every=60s", mesh.outbound()))
        .header("host", "web.test")
        .body(empty())
        .unwrap();
    let rsp = tokio::time::timeout(Duration::from_secs(20), http1().request(req)).await.unwrap().unwrap();
    assert_eq!(rsp.headers()["content-type"], "text/event-stream");
    let mut body = rsp.into_body().into_data_stream();
    let first = tokio::time::timeout(Duration::from_secs(20), body.next()).await.expect("first event in time");
    assert_eq!(&first.unwrap().unwrap()[..], b"data: event 0\n\n");
}

/// Reads from `tcp` until `until` has been seen (or 10 s pass): everything read; `None` if the
/// other side closed first.
async fn read_until(tcp: &mut tokio::net::TcpStream, until: &[u8]) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(until.len()).any(|w| w == until) {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await.unwrap_or_else(|_| {
            panic!("no {:?} within 10 s; got {:?}", String::from_utf8_lossy(until), String::from_utf8_lossy(&got))
        });
        match n {
            Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return None,
        }
    }
    Some(got)
}

/// `Expect: 100-continue` is honoured: the client hears `100 Continue` before it sends the
/// body (nothing on the way waits for a body that waits for it), then gets the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_uploads_through_two_sidecars() {
    use tokio::io::AsyncWriteExt;
    let mesh = TwoVersions::start(&split_route(1, 0)).await;
    let mut tcp = tokio::net::TcpStream::connect(mesh.outbound()).await.unwrap();
    tcp.write_all(b"POST /upload HTTP/1.1\r\nhost: web.test\r\ncontent-length: 11\r\nexpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let interim = read_until(&mut tcp, b"\r\n\r\n").await.expect("an interim response");
    assert!(interim.starts_with(b"HTTP/1.1 100 Continue\r\n"), "{}", String::from_utf8_lossy(&interim));
    tcp.write_all(b"hello world").await.unwrap();
    let rsp = read_until(&mut tcp, b"\r\n11\n").await.expect("the answer");
    assert!(rsp.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&rsp));
}

/// An application that sends `103 Early Hints` before its answer: the answer arrives whole
/// through both sidecars. The interim response itself is dropped on the way (RFC 8297 lets
/// an intermediary do so): hyper, which Weir's sidecars are built on, cannot send interim
/// responses yet (hyperium/hyper#4114).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_after_early_hints_arrives_whole() {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                while read_until(&mut tcp, b"\r\n\r\n").await.is_some() {
                    let rsp = b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n\
                                HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-weir-backend: hinted\r\n\r\nfinal";
                    if tcp.write_all(rsp).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let scratch = Scratch::new();
    let pair = SidecarPair::start(&scratch, "hints", app).await;
    let client_sidecar = &pair.client;
    for _ in 0..3 {
        let r = send(&http1(), client_sidecar.addr("outbound"), "GET", "hints.test", "/", &[]).await.unwrap();
        assert_eq!((r.status, r.backend(), r.body.as_str()), (200, "hinted", "final"));
    }
    server.abort();
}

/// An `Upgrade: h2c` offer (curl `--http2` on http://) is declined: the request is answered in
/// HTTP/1.1 and the application sees neither the offer nor its settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_offer_is_answered_in_http1() {
    let mesh = TwoVersions::start(&split_route(1, 0)).await;
    let url = format!("http://{}/headers", mesh.outbound());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-s", "-m", "10", "--http2", "-H", "host: web.test", "-w", "\n%{http_version} %{http_code}", &url])
            .output()
            .expect("curl is installed (scripts/test.sh installs it)")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, last) = text.rsplit_once('\n').unwrap_or_else(|| panic!("{text}"));
    assert_eq!(last, "1.1 200", "{text}");
    let seen: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(seen["version"], "HTTP/1.1", "{seen}");
    let headers = seen["headers"].as_object().unwrap();
    assert!(!headers.contains_key("upgrade") && !headers.contains_key("http2-settings"), "{seen}");
}
