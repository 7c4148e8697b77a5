//! A gRPC application written with tonic, as a user's would be (hand-written where generated
//! code would stand, so no protoc is needed): one message type and the four kinds of call.
//!
//! - `Unary`: echoes the message.
//! - `Fanout` (server streaming): sends `seq` messages; a request whose payload is `fail`
//!   then ends the stream with `UNAVAILABLE` in the trailers.
//! - `Sum` (client streaming): answers with the number of messages and bytes received.
//! - `Chat` (bidirectional): echoes each message as it comes.
//!
//! Calls can be told to fail with `UNAVAILABLE` (trailers-only, as tonic answers an error
//! returned before any message) by their number: [`GrpcApp::fail_residues`].

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use futures_util::{Stream, StreamExt};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::{Request, Response, Status, Streaming};

#[derive(Clone, PartialEq, prost::Message)]
pub struct Msg {
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    #[prost(bytes = "vec", tag = "2")]
    pub payload: Vec<u8>,
}

pub const UNARY: &str = "/weir.test.Echo/Unary";
pub const FANOUT: &str = "/weir.test.Echo/Fanout";
pub const SUM: &str = "/weir.test.Echo/Sum";
pub const CHAT: &str = "/weir.test.Echo/Chat";

pub fn codec() -> tonic_prost::ProstCodec<Msg, Msg> {
    tonic_prost::ProstCodec::default()
}

pub fn path(p: &'static str) -> PathAndQuery {
    PathAndQuery::from_static(p)
}

type MsgStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;
type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = Result<Response<T>, Status>> + Send>>;

struct State {
    calls: AtomicU64,
    /// Bit `r` set: calls whose number ≡ r (mod 10) fail with UNAVAILABLE.
    fail_mask: AtomicU32,
}

impl State {
    /// Counts the call; `Err` when it is one told to fail.
    fn admit(&self) -> Result<(), Status> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        if self.fail_mask.load(Ordering::Relaxed) & (1 << (n % 10)) != 0 {
            return Err(Status::unavailable(format!("call {n} failed on purpose")));
        }
        Ok(())
    }
}

pub struct GrpcApp {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl GrpcApp {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State { calls: AtomicU64::new(0), fail_mask: AtomicU32::new(0) });
        let s = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let s = s.clone();
                let svc = hyper::service::service_fn(move |req| dispatch(s.clone(), req));
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { addr, state, task }
    }

    /// Calls numbered n with n mod 10 in `residues` fail with UNAVAILABLE (`[0, 3, 6]`: 30 %,
    /// never two in a row).
    pub fn fail_residues(&self, residues: &[u32]) {
        self.state.fail_mask.store(residues.iter().fold(0, |m, r| m | (1 << r)), Ordering::Relaxed);
    }

    /// Calls the application received.
    pub fn calls(&self) -> u64 {
        self.state.calls.load(Ordering::Relaxed)
    }
}

impl Drop for GrpcApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn dispatch(
    state: Arc<State>,
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<tonic::body::Body>, std::convert::Infallible> {
    let mut grpc = tonic::server::Grpc::new(codec()).max_decoding_message_size(64 << 20);
    let s = state.clone();
    Ok(match req.uri().path() {
        UNARY => {
            let svc = tower::service_fn(move |r: Request<Msg>| {
                let s = s.clone();
                async move {
                    s.admit()?;
                    Ok::<_, Status>(Response::new(r.into_inner()))
                }
            });
            grpc.unary(svc, req).await
        }
        FANOUT => {
            let svc = tower::service_fn(move |r: Request<Msg>| {
                let s = s.clone();
                let fut: BoxFuture<MsgStream> = Box::pin(async move {
                    s.admit()?;
                    let m = r.into_inner();
                    let fail = m.payload == b"fail";
                    let items = (0..m.seq).map(|seq| Ok(Msg { seq, payload: vec![b'x'; 16] }));
                    let end = fail.then(|| Err(Status::unavailable("stream failed on purpose")));
                    let stream: MsgStream = Box::pin(futures_util::stream::iter(items.chain(end)));
                    Ok(Response::new(stream))
                });
                fut
            });
            grpc.server_streaming(svc, req).await
        }
        SUM => {
            let svc = tower::service_fn(move |r: Request<Streaming<Msg>>| {
                let s = s.clone();
                let fut: BoxFuture<Msg> = Box::pin(async move {
                    s.admit()?;
                    let mut stream = r.into_inner();
                    let (mut count, mut bytes) = (0u64, 0usize);
                    while let Some(m) = stream.message().await? {
                        count += 1;
                        bytes += m.payload.len();
                    }
                    Ok(Response::new(Msg { seq: count, payload: bytes.to_string().into_bytes() }))
                });
                fut
            });
            grpc.client_streaming(svc, req).await
        }
        CHAT => {
            let svc = tower::service_fn(move |r: Request<Streaming<Msg>>| {
                let s = s.clone();
                let fut: BoxFuture<MsgStream> = Box::pin(async move {
                    s.admit()?;
                    let stream: MsgStream =
                        Box::pin(r.into_inner().map(|m| m.map_err(|e| Status::internal(e.to_string()))));
                    Ok(Response::new(stream))
                });
                fut
            });
            grpc.streaming(svc, req).await
        }
        _ => Status::unimplemented("no such method").into_http(),
    })
}

/// A tonic channel to `via` (a client sidecar's outbound port) for `authority`.
pub async fn channel(via: SocketAddr, authority: &str) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{via}"))
        .unwrap()
        .origin(format!("http://{authority}").parse().unwrap())
        .connect()
        .await
        .unwrap();
    tonic::client::Grpc::new(channel).max_decoding_message_size(64 << 20)
}

/// One unary call.
pub async fn unary(client: &mut tonic::client::Grpc<tonic::transport::Channel>, seq: u64) -> Result<Msg, Status> {
    client.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    client
        .unary(Request::new(Msg { seq, payload: b"ping".to_vec() }), path(UNARY), codec())
        .await
        .map(Response::into_inner)
}
