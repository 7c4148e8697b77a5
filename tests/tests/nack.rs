//! The Nack path, from both ends: a sidecar that cannot apply a snapshot says why and keeps
//! the previous one; a controller that receives a Nack reports it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use weir_api::proto::{self, controller_message, proxy_message};
use weir_tests::*;

/// A scripted controller: sends the snapshots it is given and reports what the sidecar says.
#[derive(Clone)]
struct ScriptedController {
    snapshots: Arc<Mutex<Option<mpsc::Receiver<proto::Snapshot>>>>,
    replies: mpsc::Sender<proxy_message::Msg>,
}

#[tonic::async_trait]
impl proto::discovery_server::Discovery for ScriptedController {
    type StreamStream = ReceiverStream<Result<proto::ControllerMessage, Status>>;

    async fn stream(
        &self,
        req: Request<Streaming<proto::ProxyMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let mut inbound = req.into_inner();
        let mut snapshots =
            self.snapshots.lock().unwrap().take().ok_or_else(|| Status::unavailable("one stream only"))?;
        let (tx, rx) = mpsc::channel(1);
        let replies = self.replies.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    s = snapshots.recv() => match s {
                        Some(s) => {
                            let msg = proto::ControllerMessage { msg: Some(controller_message::Msg::Snapshot(s)) };
                            if tx.send(Ok(msg)).await.is_err() { return }
                        }
                        None => return,
                    },
                    m = inbound.message() => match m {
                        Ok(Some(proto::ProxyMessage { msg: Some(m) })) => { let _ = replies.send(m).await; }
                        Ok(Some(_)) => {}
                        _ => return,
                    },
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn snapshot(version: &str, backend: std::net::SocketAddr, match_kind: i32) -> proto::Snapshot {
    proto::Snapshot {
        version: version.into(),
        services: vec![proto::Service {
            namespace: "test".into(),
            name: "web".into(),
            ports: vec![],
            endpoints: vec![proto::Endpoint { address: backend.to_string(), ..Default::default() }],
            rules: vec![proto::RouteRule {
                route: "test/web".into(),
                name: "0".into(),
                matches: vec![proto::RouteMatch {
                    path: Some(proto::StringMatch { kind: match_kind, value: "/".into() }),
                    ..Default::default()
                }],
                backends: vec![proto::BackendRef { namespace: "test".into(), name: "web".into(), port: 0, weight: 1 }],
                timeout_ms: 0,
            }],
            policies: vec![],
            cluster_ips: vec![],
        }],
        inbound: None,
    }
}

/// Waits for the next Ack/Nack (skipping Hello and Reports).
async fn next_verdict(replies: &mut mpsc::Receiver<proxy_message::Msg>) -> proxy_message::Msg {
    loop {
        let m =
            tokio::time::timeout(Duration::from_secs(20), replies.recv()).await.expect("a reply").expect("stream open");
        if matches!(m, proxy_message::Msg::Ack(_) | proxy_message::Msg::Nack(_)) {
            return m;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_nacks_what_it_cannot_apply_and_keeps_the_previous_snapshot() {
    let backend = Backend::start("v1").await;
    let (snap_tx, snap_rx) = mpsc::channel(4);
    let (reply_tx, mut replies) = mpsc::channel(16);
    let fake = ScriptedController { snapshots: Arc::new(Mutex::new(Some(snap_rx))), replies: reply_tx };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(proto::discovery_server::DiscoveryServer::new(fake))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let scratch = Scratch::new();
    let proxy = scratch.proxy(addr, "test/client", None).await;

    snap_tx.send(snapshot("1", backend.addr, proto::MatchKind::Prefix as i32)).await.unwrap();
    assert!(matches!(next_verdict(&mut replies).await, proxy_message::Msg::Ack(a) if a.version == "1"));
    // A match kind this sidecar does not know (as from a newer controller): Nack with a reason.
    snap_tx.send(snapshot("2", backend.addr, 42)).await.unwrap();
    match next_verdict(&mut replies).await {
        proxy_message::Msg::Nack(n) => {
            assert_eq!(n.version, "2");
            assert!(n.reason.contains("unsupported match kind 42"), "{}", n.reason);
        }
        other => panic!("expected a Nack, got {other:?}"),
    }
    let config = admin_json(proxy.addr("admin"), "/config").await;
    assert_eq!(config["version"], "1", "the previous snapshot must stay in force");
    let r = send(&http1(), proxy.addr("outbound"), "GET", "web.test", "/", &[]).await.unwrap();
    assert_eq!((r.status, r.backend()), (200, "v1"));
    assert!(admin_text(proxy.addr("admin"), "/metrics").await.contains("weir_snapshots_rejected_total 1"));
    // And a good snapshot after a bad one is applied.
    snap_tx.send(snapshot("3", backend.addr, proto::MatchKind::Exact as i32)).await.unwrap();
    assert!(matches!(next_verdict(&mut replies).await, proxy_message::Msg::Ack(a) if a.version == "3"));
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_reports_nacks_and_acks() {
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("test", "web", &[]));
    let controller = scratch.controller(None).await;
    let mut client = discovery_client(controller.addr("grpc")).await;
    let (tx, rx) = mpsc::channel(4);
    let hello = proto::Hello {
        namespace: "test".into(),
        name: "fake".into(),
        service_account: "fake".into(),
        ..Default::default()
    };
    tx.send(proto::ProxyMessage { msg: Some(proxy_message::Msg::Hello(hello)) }).await.unwrap();
    let mut inbound = client.stream(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let first = match inbound.message().await.unwrap().unwrap().msg {
        Some(controller_message::Msg::Snapshot(s)) => s,
        None => panic!("no snapshot"),
    };
    assert_eq!(first.services.len(), 1);
    // A reason class outside the known set is counted as "other" (labels stay bounded).
    let nack = proto::Nack {
        version: first.version.clone(),
        reason: "cannot apply: test says no".into(),
        reason_class: "made-up-by-a-sidecar".into(),
    };
    tx.send(proto::ProxyMessage { msg: Some(proxy_message::Msg::Nack(nack)) }).await.unwrap();
    let admin = controller.addr("admin");
    wait_until("the nack to show in /resources", Duration::from_secs(10), || async move {
        let v = admin_json(admin, "/resources").await;
        v["proxies"][0]["nack"]["reason"] == "cannot apply: test says no"
    })
    .await;
    let metrics = admin_text(admin, "/metrics").await;
    assert!(metrics.contains("weir_controller_nacks_total{reason=\"other\"} 1"), "{metrics}");
    assert!(!metrics.contains("made-up"), "{metrics}");

    // A malformed first message is refused with a clear status.
    let mut client = discovery_client(controller.addr("grpc")).await;
    let (tx2, rx2) = mpsc::channel(1);
    tx2.send(proto::ProxyMessage { msg: Some(proxy_message::Msg::Ack(proto::Ack { version: "1".into() })) })
        .await
        .unwrap();
    let err = client.stream(ReceiverStream::new(rx2)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("Hello"), "{}", err.message());

    // The next change is pushed; acking it shows the sidecar in sync for the resource.
    scratch.write("services.yaml", &service("test", "web", &[meshed("127.0.0.1:9".parse().unwrap())]));
    let second =
        match tokio::time::timeout(Duration::from_secs(5), inbound.message()).await.unwrap().unwrap().unwrap().msg {
            Some(controller_message::Msg::Snapshot(s)) => s,
            None => panic!("no snapshot"),
        };
    assert_ne!(second.version, first.version);
    tx.send(proto::ProxyMessage { msg: Some(proxy_message::Msg::Ack(proto::Ack { version: second.version.clone() })) })
        .await
        .unwrap();
    wait_until("the ack to show in /resources", Duration::from_secs(10), || async move {
        let v = admin_json(admin, "/resources").await;
        v["resources"][0]["ackedBy"][0] == "test/fake" && v["proxies"][0]["nack"].is_null()
    })
    .await;
    assert!(admin_text(admin, "/metrics").await.contains("weir_controller_push_latency_seconds_count 1"));
}

async fn discovery_client(
    addr: std::net::SocketAddr,
) -> proto::discovery_client::DiscoveryClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    proto::discovery_client::DiscoveryClient::new(channel)
}
