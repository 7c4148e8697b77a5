//! WebSockets through two sidecars over mesh mTLS, with real tokio-tungstenite client and
//! server: 1,000 text messages, a 10 MiB binary message each way, ping/pong and a clean close;
//! the upgrade request is authorized like any request (by identity, method and path) and
//! counted.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{Message, protocol::CloseFrame};
use weir_tests::*;

const FRONTEND: &str = "spiffe://cluster.local/ns/test/sa/frontend";

/// A WebSocket echo server: every data message comes back as it was sent.
async fn echo_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else { return };
                // tungstenite answers pings and close frames itself.
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

async fn connect(
    via: SocketAddr,
    path: &str,
) -> Result<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, tokio_tungstenite::tungstenite::Error> {
    let tcp = tokio::net::TcpStream::connect(via).await.unwrap();
    tokio_tungstenite::client_async(format!("ws://chat.test{path}"), tcp).await.map(|(ws, _)| ws)
}

async fn next(ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) -> Message {
    tokio::time::timeout(Duration::from_secs(30), ws.next()).await.expect("a message in time").unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_work_through_two_sidecars_and_are_authorized() {
    let scratch = Scratch::new();
    scratch.write("services.yaml", &service("test", "chat", &[]));
    let chats = "  - name: frontend-chats\n    from: { serviceAccounts: [frontend] }\n    to: { paths: [/chat], methods: [GET] }\n";
    scratch.write("authz.yaml", &mesh_authorization("chat", "strict", chats));
    let (app, app_task) = echo_server().await;
    let mesh = IdentityMesh::start(&scratch, "chat", app, &["frontend", "intruder"], &[]).await;
    let (server, frontend, intruder) = (&mesh.server, &mesh.clients[0], &mesh.clients[1]);
    wait_config(server.addr("admin"), "the authorization", |c| {
        c["snapshot"]["inbound"]["authorizations"].as_array().is_some_and(|a| a.len() == 1)
    })
    .await;

    let mut ws = connect(frontend.addr("outbound"), "/chat").await.expect("the handshake passes both sidecars");
    // 1,000 text messages, each echoed before the next goes.
    for i in 0..1_000 {
        let text = format!("message {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(next(&mut ws).await, Message::text(text));
    }
    // A 10 MiB binary message each way.
    let big: Vec<u8> = (0..10 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    match next(&mut ws).await {
        Message::Binary(b) => assert!(b[..] == big[..], "the 10 MiB message came back changed"),
        other => panic!("expected the binary echo, got {other:?}"),
    }
    // Ping, pong.
    ws.send(Message::Ping(b"are you there".to_vec().into())).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::Pong(b"are you there".to_vec().into()));
    // A clean close: the server's close frame comes back, then the stream ends.
    ws.send(Message::Close(Some(CloseFrame { code: 1000.into(), reason: "bye".into() }))).await.unwrap();
    match next(&mut ws).await {
        Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 1000),
        other => panic!("expected the close frame, got {other:?}"),
    }
    assert!(tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().is_none());

    // The upgrade request is authorized as the GET it is: another path, another identity, 403.
    for (via, path) in [(frontend.addr("outbound"), "/admin"), (intruder.addr("outbound"), "/chat")] {
        match connect(via, path).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(rsp)) => assert_eq!(rsp.status(), 403, "{path}"),
            other => panic!("{path}: expected 403, got {:?}", other.map(|_| "a WebSocket")),
        }
    }

    // Counted as requests answered 101, and as authorization decisions by identity.
    let m = admin_text(server.addr("admin"), "/metrics").await;
    assert!(m.contains("status_code=\"101\""), "{m}");
    let allowed =
        format!("client_identity=\"{FRONTEND}\",decision=\"allow\",policy=\"test/chat\",rule=\"frontend-chats\"");
    assert!(m.lines().any(|l| l.contains(&allowed) && l.ends_with(" 1")), "{m}");
    let m = admin_text(frontend.addr("admin"), "/metrics").await;
    assert!(
        m.lines().any(|l| l.starts_with("weir_responses_total{")
            && l.contains("status_code=\"101\"")
            && l.contains("tls=\"true\"")),
        "{m}"
    );
    app_task.abort();
}
