//! Snapshots on the wire without a copy per sidecar: the Services part of a snapshot is the
//! same for every sidecar, so it is encoded once per published state ([`encode_services`]) and
//! each session sends a [`ControllerWire`] that writes its own version and inbound policy around
//! those shared bytes. Protobuf allows it: a message is the concatenation of its fields, and a
//! repeated field is one entry per element, so the bytes are exactly what encoding a
//! `proto::ControllerMessage` with those Services would give (a test checks it).
//!
//! The generated server's stream must yield `proto::ControllerMessage`s, so the Discovery
//! service is served by [`DiscoveryServer`] here: the generated server's routing, with a codec
//! that encodes [`ControllerWire`] and decodes `proto::ProxyMessage`.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType};
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
    fn snapshot_len(&self) -> usize {
        encoding::string::encoded_len(1, &self.version)
            + self.services.len()
            + encoding::message::encoded_len(3, &self.inbound)
    }
}

impl prost::Message for ControllerWire {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        // ControllerMessage.snapshot (field 1), then the Snapshot's own fields in order.
        encoding::encode_key(1, WireType::LengthDelimited, buf);
        encoding::encode_varint(self.snapshot_len() as u64, buf);
        encoding::string::encode(1, &self.version, buf);
        buf.put_slice(&self.services);
        encoding::message::encode(3, &self.inbound, buf);
    }

    /// Encode-only: the controller never decodes its own messages; fields are skipped.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl bytes::Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        let inner = self.snapshot_len();
        encoding::key_len(1) + encoding::encoded_len_varint(inner as u64) + inner
    }

    fn clear(&mut self) {
        *self = Self::default();
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

struct StreamSvc(Arc<super::discovery::DiscoveryService>);

impl tonic::server::StreamingService<proto::ProxyMessage> for StreamSvc {
    type Response = ControllerWire;
    type ResponseStream = super::discovery::Outbound;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<proto::ProxyMessage>>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.stream(request).await })
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
                let codec = tonic_prost::ProstCodec::<ControllerWire, proto::ProxyMessage>::default();
                Ok(tonic::server::Grpc::new(codec).streaming(StreamSvc(inner), req).await)
            }),
            _ => Box::pin(async move { Ok(tonic::Status::unimplemented("").into_http()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

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
        assert_eq!(wire.encoded_len(), whole.encoded_len());
        assert_eq!(wire.encode_to_vec(), whole.encode_to_vec());
        assert_eq!(proto::ControllerMessage::decode(&wire.encode_to_vec()[..]).unwrap(), whole);
        // No services, empty inbound policy: still the same bytes.
        let empty = ControllerWire { version: "1".into(), services: encode_services(&[]), ..Default::default() };
        let whole = proto::ControllerMessage {
            msg: Some(proto::controller_message::Msg::Snapshot(proto::Snapshot {
                version: "1".into(),
                services: Vec::new(),
                inbound: Some(proto::InboundPolicy::default()),
            })),
        };
        assert_eq!(empty.encode_to_vec(), whole.encode_to_vec());
    }
}
