//! Snapshots on the wire without a copy per sidecar: the Services part of a snapshot is the
//! same for every sidecar, so it is encoded once per published state ([`encode_entries`]) and
//! each session sends a [`ControllerWire`] that writes its own version and inbound policy around
//! those shared bytes. Protobuf allows it: a message is the concatenation of its fields, and a
//! repeated field is one entry per element, so the bytes are exactly what encoding a
//! `proto::ControllerMessage` with those Services would give (a test checks it).
//!
//! This is a leaf: it knows the protocol's messages and nothing of the controller. The state
//! keeps its Services' encoding ([`crate::state::MeshState::services_wire`]) and the gRPC
//! server writes it ([`crate::grpc::stream`]).

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{self, WireType};
use weir_api::proto;

/// One Service's `Snapshot.services` entry, as a slice of the state's shared encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub namespace: String,
    pub name: String,
    pub bytes: Bytes,
}

/// The Services of a snapshot as `Snapshot.services` (field 2) entries, and each Service's
/// entry within them (slices of the same bytes).
pub fn encode_entries(services: &[proto::Service]) -> (Bytes, Vec<Entry>) {
    let len: usize = services.iter().map(|s| encoding::message::encoded_len(2, s)).sum();
    let mut buf = Vec::with_capacity(len);
    let mut spans = Vec::with_capacity(services.len());
    for s in services {
        let start = buf.len();
        encoding::message::encode(2, s, &mut buf);
        spans.push(start..buf.len());
    }
    let all = Bytes::from(buf);
    let entries = services
        .iter()
        .zip(spans)
        .map(|(s, span)| Entry { namespace: s.namespace.clone(), name: s.name.clone(), bytes: all.slice(span) })
        .collect();
    (all, entries)
}

/// What changed from one snapshot's Services to the next: the entries added or changed (in
/// order, ready to send as `Snapshot.services`) and the Services gone (`namespace/name`).
#[derive(Debug, Default, PartialEq)]
pub struct Delta {
    pub services: Bytes,
    pub removed: Vec<String>,
}

impl Delta {
    /// Both lists sorted by (namespace, name), as the translator makes them.
    pub fn between(base: &[Entry], new: &[Entry]) -> Self {
        use std::cmp::Ordering;
        fn key(e: &Entry) -> (&str, &str) {
            (&e.namespace, &e.name)
        }
        let (mut changed, mut removed) = (Vec::new(), Vec::new());
        let (mut b, mut n) = (base.iter().peekable(), new.iter().peekable());
        loop {
            let order = match (b.peek(), n.peek()) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(x), Some(y)) => key(x).cmp(&key(y)),
            };
            match order {
                Ordering::Less => {
                    let gone = b.next().expect("peeked");
                    removed.push(format!("{}/{}", gone.namespace, gone.name));
                }
                Ordering::Greater => changed.push(n.next().expect("peeked")),
                Ordering::Equal => {
                    let (old, now) = (b.next().expect("peeked"), n.next().expect("peeked"));
                    if old.bytes != now.bytes {
                        changed.push(now);
                    }
                }
            }
        }
        let services = match changed.as_slice() {
            [] => Bytes::new(),
            [one] => one.bytes.clone(),
            many => Bytes::from(many.iter().flat_map(|e| e.bytes.iter().copied()).collect::<Vec<u8>>()),
        };
        Delta { services, removed }
    }

    /// Roughly what it costs on the wire.
    pub fn len(&self) -> usize {
        self.services.len() + self.removed.iter().map(|r| r.len() + 2).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.removed.is_empty()
    }
}

/// A `ControllerMessage { snapshot: Snapshot { version, services, inbound, base_version,
/// removed_services } }` whose services are already encoded.
#[derive(Debug, Clone, Default)]
pub struct ControllerWire {
    pub version: String,
    /// From [`encode_entries`] (whole), or [`Delta::services`] (incremental).
    pub services: Bytes,
    pub inbound: proto::InboundPolicy,
    /// Set when incremental: the version the services apply on top of.
    pub base_version: String,
    /// Incremental: Services gone since `base_version`.
    pub removed: Vec<String>,
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
        let mut tail = BytesMut::with_capacity(self.tail_len());
        encoding::message::encode(3, &self.inbound, &mut tail);
        if !self.base_version.is_empty() {
            encoding::string::encode(4, &self.base_version, &mut tail);
        }
        encoding::string::encode_repeated(5, &self.removed, &mut tail);
        [head.freeze(), self.services.clone(), tail.freeze()]
    }

    /// Length of the fields after the Services.
    fn tail_len(&self) -> usize {
        encoding::message::encoded_len(3, &self.inbound)
            + if self.base_version.is_empty() { 0 } else { encoding::string::encoded_len(4, &self.base_version) }
            + encoding::string::encoded_len_repeated(5, &self.removed)
    }

    /// Length of the `ControllerMessage` (the frame's payload).
    fn message_len(&self) -> usize {
        let inner = self.snapshot_len();
        encoding::key_len(1) + encoding::encoded_len_varint(inner as u64) + inner
    }

    fn snapshot_len(&self) -> usize {
        encoding::string::encoded_len(1, &self.version) + self.services.len() + self.tail_len()
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn encode_services(services: &[proto::Service]) -> Bytes {
        encode_entries(services).0
    }

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
                ..Default::default()
            })),
        };
        let wire = ControllerWire {
            version: "42".into(),
            services: encode_services(&services),
            inbound: inbound.clone(),
            ..Default::default()
        };
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
                ..Default::default()
            })),
        };
        assert_eq!(payload(&empty), whole.encode_to_vec());

        // Incremental: the changed Services, the base and the removed ones.
        let (_, entries) = encode_entries(&services);
        let delta = ControllerWire {
            version: "43".into(),
            services: entries[1].bytes.clone(),
            inbound: inbound.clone(),
            base_version: "42".into(),
            removed: vec!["shop/gone".into(), "other/old".into()],
        };
        let whole = proto::ControllerMessage {
            msg: Some(proto::controller_message::Msg::Snapshot(proto::Snapshot {
                version: "43".into(),
                services: vec![services[1].clone()],
                inbound: Some(inbound),
                base_version: "42".into(),
                removed_services: vec!["shop/gone".into(), "other/old".into()],
            })),
        };
        assert_eq!(delta.message_len(), whole.encoded_len());
        assert_eq!(payload(&delta), whole.encode_to_vec());

        // The entries are slices of the whole encoding, one per Service, in order.
        let (all, entries) = encode_entries(&services);
        assert_eq!(entries.iter().flat_map(|e| e.bytes.to_vec()).collect::<Vec<u8>>(), all.to_vec());
        assert_eq!((entries[1].namespace.as_str(), entries[1].name.as_str()), ("shop", "db"));

        // The 5-byte prefix: not compressed, then the payload's length.
        let framed: Vec<u8> = wire.frame_chunks().concat();
        assert_eq!(framed[0], 0);
        assert_eq!(u32::from_be_bytes(framed[1..5].try_into().unwrap()) as usize, framed.len() - 5);
    }

    fn svc(ns: &str, name: &str, port: u32) -> proto::Service {
        proto::Service { namespace: ns.into(), name: name.into(), ports: vec![port], ..Default::default() }
    }

    /// Added, changed and removed Services make the delta; unchanged ones are left out.
    #[test]
    fn delta_between_two_states() {
        let base = [svc("a", "keep", 80), svc("a", "change", 80), svc("b", "gone", 80), svc("c", "last", 80)];
        let new = [svc("a", "add", 80), svc("a", "change", 81), svc("a", "keep", 80), svc("c", "last", 80)];
        let mut sorted_base = base.to_vec();
        sorted_base.sort_by(|x, y| (&x.namespace, &x.name).cmp(&(&y.namespace, &y.name)));
        let mut sorted_new = new.to_vec();
        sorted_new.sort_by(|x, y| (&x.namespace, &x.name).cmp(&(&y.namespace, &y.name)));
        let d = Delta::between(&encode_entries(&sorted_base).1, &encode_entries(&sorted_new).1);
        assert_eq!(d.removed, ["b/gone"]);
        assert_eq!(d.services, encode_services(&[svc("a", "add", 80), svc("a", "change", 81)]));
        assert!(!d.is_empty() && d.len() < encode_services(&sorted_new).len());

        let same = Delta::between(&encode_entries(&sorted_new).1, &encode_entries(&sorted_new).1);
        assert!(same.is_empty(), "{same:?}");
        let all_gone = Delta::between(&encode_entries(&sorted_base).1, &[]);
        assert_eq!(all_gone.removed, ["a/change", "a/keep", "b/gone", "c/last"]);
        let from_nothing = Delta::between(&[], &encode_entries(&sorted_new).1);
        assert_eq!(from_nothing.services, encode_services(&sorted_new));
    }

    /// Equal Services encode to equal bytes whatever order their label maps were built in
    /// (map fields are BTreeMaps): otherwise every rebuild would look like a change to every
    /// Service and incremental snapshots would carry them all.
    #[test]
    fn equal_services_encode_alike() {
        let endpoint = |keys: &[&str]| proto::Endpoint {
            address: "10.0.0.1:80".into(),
            labels: keys.iter().map(|k| (k.to_string(), format!("value-{k}"))).collect(),
            ..Default::default()
        };
        let keys: Vec<String> = (0..32).map(|i| format!("label-{i}")).collect();
        let forward: Vec<&str> = keys.iter().map(String::as_str).collect();
        let backward: Vec<&str> = forward.iter().rev().copied().collect();
        let with =
            |k: &[&str]| proto::Service { name: "web".into(), endpoints: vec![endpoint(k)], ..svc("a", "web", 80) };
        assert_eq!(encode_services(&[with(&forward)]), encode_services(&[with(&backward)]));
    }
}
