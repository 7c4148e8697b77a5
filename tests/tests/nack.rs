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
            opaque_ports: vec![],
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
        ..Default::default()
    }
}

/// Where to send snapshots, the sidecar's replies, the address, and the server task.
type Served = (
    mpsc::Sender<proto::Snapshot>,
    mpsc::Receiver<proxy_message::Msg>,
    std::net::SocketAddr,
    tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
);

impl ScriptedController {
    /// Serves one on loopback.
    async fn serve() -> Served {
        Self::serve_on("127.0.0.1:0".parse().unwrap()).await
    }

    async fn serve_on(addr: std::net::SocketAddr) -> Served {
        let (snap_tx, snap_rx) = mpsc::channel(4);
        let (reply_tx, replies) = mpsc::channel(16);
        let fake = ScriptedController { snapshots: Arc::new(Mutex::new(Some(snap_rx))), replies: reply_tx };
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(proto::discovery_server::DiscoveryServer::new(fake))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        (snap_tx, replies, addr, server)
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
    let (snap_tx, mut replies, addr, server) = ScriptedController::serve().await;
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

/// A real sidecar applies incremental snapshots on top of the one it runs, and asks for a
/// whole one (Nack, class "base") when one names another base, keeping what it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_applies_incremental_snapshots_on_their_base_only() {
    let (v1, v2) = (Backend::start("v1").await, Backend::start("v2").await);
    let (snap_tx, mut replies, addr, server) = ScriptedController::serve().await;
    let scratch = Scratch::new();
    let proxy = scratch.proxy(addr, "test/client", None).await;
    let plain = |name: &str, backend: std::net::SocketAddr| proto::Service {
        namespace: "test".into(),
        name: name.into(),
        endpoints: vec![proto::Endpoint { address: backend.to_string(), ..Default::default() }],
        ..Default::default()
    };

    let whole = proto::Snapshot { version: "1".into(), services: vec![plain("web", v1.addr)], ..Default::default() };
    snap_tx.send(whole).await.unwrap();
    assert!(matches!(next_verdict(&mut replies).await, proxy_message::Msg::Ack(a) if a.version == "1"));
    // Adds api, moves web to v2.
    let delta = proto::Snapshot {
        version: "2".into(),
        services: vec![plain("api", v1.addr), plain("web", v2.addr)],
        base_version: "1".into(),
        ..Default::default()
    };
    snap_tx.send(delta).await.unwrap();
    assert!(matches!(next_verdict(&mut replies).await, proxy_message::Msg::Ack(a) if a.version == "2"));
    let via = proxy.addr("outbound");
    let r = send(&http1(), via, "GET", "web.test", "/", &[]).await.unwrap();
    assert_eq!((r.status, r.backend()), (200, "v2"));
    assert_eq!(send(&http1(), via, "GET", "api.test", "/", &[]).await.unwrap().backend(), "v1");
    let config = admin_json(proxy.addr("admin"), "/config").await;
    let names: Vec<_> = config["snapshot"]["services"].as_array().unwrap().iter().map(|s| s["name"].clone()).collect();
    assert_eq!(names, ["api", "web"], "/config shows the whole snapshot: {config}");

    // Removes api.
    let delta = proto::Snapshot {
        version: "3".into(),
        base_version: "2".into(),
        removed_services: vec!["test/api".into()],
        ..Default::default()
    };
    snap_tx.send(delta).await.unwrap();
    assert!(matches!(next_verdict(&mut replies).await, proxy_message::Msg::Ack(a) if a.version == "3"));
    assert_eq!(send(&http1(), via, "GET", "api.test", "/", &[]).await.unwrap().status, 404);

    // On another base: refused for that reason, and version 3 stays.
    let wrong = proto::Snapshot {
        version: "5".into(),
        services: vec![plain("web", v1.addr)],
        base_version: "4".into(),
        ..Default::default()
    };
    snap_tx.send(wrong).await.unwrap();
    match next_verdict(&mut replies).await {
        proxy_message::Msg::Nack(n) => {
            assert_eq!((n.version.as_str(), n.reason_class.as_str()), ("5", "base"), "{}", n.reason);
        }
        other => panic!("expected a Nack, got {other:?}"),
    }
    assert_eq!(admin_json(proxy.addr("admin"), "/config").await["version"], "3");
    assert_eq!(send(&http1(), via, "GET", "web.test", "/", &[]).await.unwrap().backend(), "v2");

    // Another controller (or this one restarted) on the same address: its versions are its own
    // counter, so even a base equal to the running version ("3") is not trusted until a
    // snapshot has been applied on the new stream.
    // Closing the snapshots ends the stream (the sidecar reconnects); the listener goes too.
    drop(snap_tx);
    server.abort();
    let _ = server.await;
    let (snap_tx, mut replies, _, server) = ScriptedController::serve_on(addr).await;
    let delta = proto::Snapshot {
        version: "4".into(),
        base_version: "3".into(),
        removed_services: vec!["test/web".into()],
        ..Default::default()
    };
    snap_tx.send(delta).await.unwrap();
    match next_verdict(&mut replies).await {
        proxy_message::Msg::Nack(n) => assert_eq!((n.version.as_str(), n.reason_class.as_str()), ("4", "base")),
        other => panic!("expected a Nack, got {other:?}"),
    }
    let whole = proto::Snapshot { version: "4".into(), services: vec![plain("web", v1.addr)], ..Default::default() };
    snap_tx.send(whole).await.unwrap();
    assert!(matches!(next_verdict(&mut replies).await, proxy_message::Msg::Ack(a) if a.version == "4"));
    assert_eq!(send(&http1(), via, "GET", "web.test", "/", &[]).await.unwrap().backend(), "v1");
    server.abort();
}

/// The controller sends a sidecar that says it can apply them only the Services that changed
/// since the previous snapshot, and everything again after a Nack of class "base".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_sends_incremental_snapshots_to_sidecars_that_apply_them() {
    let scratch = Scratch::new();
    let both = |web_eps: &[String]| format!("{}{}", service("test", "web", web_eps), service("test", "db", &[]));
    let ep = || meshed("127.0.0.1:9".parse().unwrap());
    scratch.write("services.yaml", &both(&[]));
    let controller = scratch.controller(None).await;
    let mut client = discovery_client(controller.addr("grpc")).await;
    let (tx, rx) = mpsc::channel(4);
    let hello = proto::Hello {
        namespace: "test".into(),
        name: "fake".into(),
        service_account: "fake".into(),
        incremental: true,
        ..Default::default()
    };
    tx.send(proto::ProxyMessage { msg: Some(proxy_message::Msg::Hello(hello)) }).await.unwrap();
    let mut inbound = client.stream(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let mut next = async || match tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .expect("a snapshot within 10 s")
        .unwrap()
        .unwrap()
        .msg
    {
        Some(controller_message::Msg::Snapshot(s)) => s,
        None => panic!("no snapshot"),
    };
    let ack = |version: &str| proto::ProxyMessage {
        msg: Some(proxy_message::Msg::Ack(proto::Ack { version: version.into() })),
    };
    let names = |s: &proto::Snapshot| s.services.iter().map(|s| s.name.clone()).collect::<Vec<_>>();

    let first = next().await;
    assert_eq!((first.base_version.as_str(), names(&first)), ("", vec!["db".to_string(), "web".to_string()]));
    tx.send(ack(&first.version)).await.unwrap();

    // One Service changes: only it is sent, on top of the first snapshot.
    scratch.write("services.yaml", &both(&[ep()]));
    let second = next().await;
    assert_eq!(second.base_version, first.version);
    assert_eq!(names(&second), ["web"]);
    assert_eq!(second.services[0].endpoints.len(), 1);
    assert!(second.removed_services.is_empty());
    tx.send(ack(&second.version)).await.unwrap();

    // One goes away.
    scratch.write("services.yaml", &service("test", "web", &[ep()]));
    let third = next().await;
    assert_eq!(
        (third.base_version.as_str(), third.removed_services.as_slice()),
        (second.version.as_str(), &["test/db".to_string()][..])
    );
    assert!(third.services.is_empty());

    // The sidecar runs something else: the controller sends it all again, at once.
    let nack = proto::Nack {
        version: third.version.clone(),
        reason: "incremental snapshot on top of another version".into(),
        reason_class: "base".into(),
    };
    tx.send(proto::ProxyMessage { msg: Some(proxy_message::Msg::Nack(nack)) }).await.unwrap();
    let again = next().await;
    assert_eq!((again.base_version.as_str(), names(&again)), ("", vec!["web".to_string()]));
    tx.send(ack(&again.version)).await.unwrap();
    // A late base Nack of an older increment (not the newest snapshot) sends nothing again.
    let stale = proto::Nack { version: second.version.clone(), reason: "late".into(), reason_class: "base".into() };
    tx.send(proto::ProxyMessage { msg: Some(proxy_message::Msg::Nack(stale)) }).await.unwrap();
    let admin = controller.addr("admin");
    wait_until("the late Nack to be counted", Duration::from_secs(10), || async move {
        admin_text(admin, "/metrics").await.contains("weir_controller_nacks_total{reason=\"base\"} 2")
    })
    .await;
    // The next change comes as an increment on the whole one: nothing was resent in between.
    scratch.write("services.yaml", &both(&[ep()]));
    let after = next().await;
    assert_eq!((after.base_version.as_str(), names(&after)), (again.version.as_str(), vec!["db".to_string()]));
    let metrics = admin_text(admin, "/metrics").await;
    assert!(metrics.contains("weir_controller_snapshots_incremental_total 3\n"), "{metrics}");
    assert!(metrics.contains("weir_controller_snapshots_pushed_total 5\n"), "{metrics}");
    // A base Nack is not a problem with the configuration: nothing shows as rejected.
    let v = admin_json(admin, "/resources").await;
    let proxy = &v["proxies"][0];
    assert!(proxy.is_object(), "no proxy listed: {v}");
    assert!(proxy.get("nack").is_none_or(|n| n.is_null()), "{v}");
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
