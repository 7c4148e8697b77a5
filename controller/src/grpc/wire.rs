//! Snapshots on the wire without a copy per sidecar: the Services part of a snapshot is the
//! same for every sidecar, so it is encoded once per published state ([`encode_services`]) and
//! each session sends a [`ControllerWire`] that writes its own version and inbound policy around
//! those shared bytes. Protobuf allows it: a message is the concatenation of its fields, and a
//! repeated field is one entry per element, so the bytes are exactly what encoding a
//! `proto::ControllerMessage` with those Services would give (a test checks it).
//!
//! The generated server's stream must yield `proto::ControllerMessage`s, so the Discovery
//! service is served by [`DiscoveryServer`] here: requests are decoded by tonic, and responses
//! are written as gRPC frames by [`FrameBody`], the shared bytes handed to HTTP/2 as they are
//! (tonic's encoder would copy every message into a per-stream buffer that then keeps the size
//! of the largest snapshot for the stream's life: ~0.7 MiB per sidecar with 10,000 endpoints).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{self, WireType};
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use weir_api::proto;

/// The Services of a snapshot as `Snapshot.services` (field 2) entries.
pub fn encode_services(services: &[proto::Service]) -> Bytes {
    let len: usize = services.iter().map(|s| encoding::message::encoded_len(2, s)).sum();
    let mut buf = Vec::with_capacity(len);
    for s in services {
        encoding::message::encode(2, s, &mut buf);
    }
    Bytes::from(buf)
}

/// A `ControllerMessage { snapshot: Snapshot { version, services, inbound } }` whose services
/// are already encoded.
#[derive(Debug, Clone, Default)]
pub struct ControllerWire {
    pub version: String,
    /// From [`encode_services`].
    pub services: Bytes,
    pub inbound: proto::InboundPolicy,
}

impl ControllerWire {
    /// The message as one gRPC frame in three chunks: the frame header and the fields before
    /// the Services, the shared Services bytes (not copied), the inbound policy.
    pub fn frame_chunks(&self) -> [Bytes; 3] {
        let snapshot = self.snapshot_len();
        let mut head = BytesMut::with_capacity(32 + self.version.len());
        head.put_u8(0); // not compressed
        head.put_u32(self.message_len() as u32);
        encoding::encode_key(1, WireType::LengthDelimited, &mut head);
        encoding::encode_varint(snapshot as u64, &mut head);
        encoding::string::encode(1, &self.version, &mut head);
        let mut tail = BytesMut::with_capacity(encoding::message::encoded_len(3, &self.inbound));
        encoding::message::encode(3, &self.inbound, &mut tail);
        [head.freeze(), self.services.clone(), tail.freeze()]
    }

    /// Length of the `ControllerMessage` (the frame's payload).
    fn message_len(&self) -> usize {
        let inner = self.snapshot_len();
        encoding::key_len(1) + encoding::encoded_len_varint(inner as u64) + inner
    }

    fn snapshot_len(&self) -> usize {
        encoding::string::encoded_len(1, &self.version)
            + self.services.len()
            + encoding::message::encoded_len(3, &self.inbound)
    }
}

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

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// The frame's payload: what follows the 5-byte gRPC prefix.
    fn payload(wire: &ControllerWire) -> Vec<u8> {
        wire.frame_chunks().concat()[5..].to_vec()
    }

    /// The shared bytes plus the session's parts are exactly the message encoded whole.
    #[test]
    fn encodes_as_the_whole_message_would() {
        let services = vec![
            proto::Service {
                namespace: "shop".into(),
                name: "web".into(),
                ports: vec![80],
                endpoints: vec![proto::Endpoint { address: "10.0.0.1:8080".into(), ..Default::default() }],
                ..Default::default()
            },
            proto::Service { namespace: "shop".into(), name: "db".into(), ..Default::default() },
        ];
        let inbound = proto::InboundPolicy {
            authorizations: vec![proto::Authorization { name: "a".into(), strict: true, ..Default::default() }],
            ..Default::default()
        };
        let whole = proto::ControllerMessage {
            msg: Some(proto::controller_message::Msg::Snapshot(proto::Snapshot {
                version: "42".into(),
                services: services.clone(),
                inbound: Some(inbound.clone()),
            })),
        };
        let wire = ControllerWire { version: "42".into(), services: encode_services(&services), inbound };
        assert_eq!(wire.message_len(), whole.encoded_len());
        assert_eq!(payload(&wire), whole.encode_to_vec());
        assert_eq!(proto::ControllerMessage::decode(&payload(&wire)[..]).unwrap(), whole);
        // No services, empty inbound policy: still the same bytes.
        let empty = ControllerWire { version: "1".into(), services: encode_services(&[]), ..Default::default() };
        let whole = proto::ControllerMessage {
            msg: Some(proto::controller_message::Msg::Snapshot(proto::Snapshot {
                version: "1".into(),
                services: Vec::new(),
                inbound: Some(proto::InboundPolicy::default()),
            })),
        };
        assert_eq!(payload(&empty), whole.encode_to_vec());

        // The 5-byte prefix: not compressed, then the payload's length.
        let framed: Vec<u8> = wire.frame_chunks().concat();
        assert_eq!(framed[0], 0);
        assert_eq!(u32::from_be_bytes(framed[1..5].try_into().unwrap()) as usize, framed.len() - 5);
    }
}
