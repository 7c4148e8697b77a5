//! The Discovery service's stream, written as gRPC frames by hand. The generated server's
//! stream must yield `proto::ControllerMessage`s, so `weir.v1.Discovery/Stream` is served by
//! [`DiscoveryServer`] here: requests are decoded by tonic, and responses are written as gRPC
//! frames by [`FrameBody`], the shared bytes of a [`ControllerWire`] handed to HTTP/2 as they
//! are (tonic's encoder would copy every message into a per-stream buffer that then keeps the
//! size of the largest snapshot for the stream's life: ~0.7 MiB per sidecar with 10,000
//! endpoints).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use weir_api::proto;

/// Serves `weir.v1.Discovery/Stream` with [`ControllerWire`] responses.
pub struct DiscoveryServer {
    inner: Arc<super::discovery::DiscoveryService>,
}

impl DiscoveryServer {
    pub fn new(inner: super::discovery::DiscoveryService) -> Self {
        Self { inner: Arc::new(inner) }
    }
}

impl Clone for DiscoveryServer {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

impl tonic::server::NamedService for DiscoveryServer {
    const NAME: &'static str = proto::discovery_server::SERVICE_NAME;
}

/// The response body of one Discovery stream: each message from the session as gRPC frame
/// chunks, then the trailers (`grpc-status`) when the session ends.
pub struct FrameBody {
    messages: super::discovery::Outbound,
    chunks: VecDeque<Bytes>,
    done: bool,
}

impl FrameBody {
    pub fn new(messages: super::discovery::Outbound) -> Self {
        Self { messages, chunks: VecDeque::new(), done: false }
    }
}

impl http_body::Body for FrameBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        use tokio_stream::Stream;
        if let Some(chunk) = self.chunks.pop_front() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(chunk))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        let status = match Pin::new(&mut self.messages).poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Ok(m))) => {
                let [first, services, inbound] = m.frame_chunks();
                self.chunks.extend([services, inbound].into_iter().filter(|c| !c.is_empty()));
                return Poll::Ready(Some(Ok(http_body::Frame::data(first))));
            }
            Poll::Ready(Some(Err(status))) => status,
            Poll::Ready(None) => tonic::Status::ok(""),
        };
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        if status.add_header(&mut trailers).is_err() {
            trailers.insert(tonic::Status::GRPC_STATUS, (tonic::Code::Internal as i32).into());
        }
        Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.chunks.is_empty()
    }
}

impl<B> Service<http::Request<B>> for DiscoveryServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        match req.uri().path() {
            "/weir.v1.Discovery/Stream" => Box::pin(async move {
                let (parts, body) = req.into_parts();
                let decoder = tonic_prost::ProstDecoder::<proto::ProxyMessage>::default();
                let mut request = tonic::Request::new(tonic::Streaming::new_request(decoder, body, None, None));
                *request.metadata_mut() = tonic::metadata::MetadataMap::from_headers(parts.headers);
                *request.extensions_mut() = parts.extensions;
                Ok(match inner.stream(request).await {
                    Ok(rsp) => {
                        let mut http = http::Response::new(tonic::body::Body::new(FrameBody::new(rsp.into_inner())));
                        http.headers_mut().insert(http::header::CONTENT_TYPE, tonic::metadata::GRPC_CONTENT_TYPE);
                        http
                    }
                    Err(status) => status.into_http(),
                })
            }),
            _ => Box::pin(async move { Ok(tonic::Status::unimplemented("").into_http()) }),
        }
    }
}
