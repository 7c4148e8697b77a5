//! An OTLP `ExportTraceServiceRequest`, encoded straight from [`SpanData`] into protobuf bytes:
//! no intermediate message structs (an attribute key is written from its `&'static str`, not
//! copied into a `String` to be dropped after), lengths computed once. The generated OTLP types
//! (`weir_api::otlp`) decode what this writes in the tests, and receive it in the end-to-end
//! tests (tonic's server for OTLP/gRPC, prost for OTLP/HTTP).
//!
//! Field numbers are those of `opentelemetry/proto/{trace,common,resource}/v1/*.proto` and
//! `collector/trace/v1/trace_service.proto`.

use std::time::SystemTime;

use prost::encoding::{encode_varint, encoded_len_varint};

use super::span::{Kind, SpanData, Value};

const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LEN: u64 = 2;
const FIXED32: u64 = 5;

/// Trace flags: sampled, and whether the parent is known to be remote (OTLP's `SpanFlags`).
pub const SAMPLED: u32 = 0x01;
pub const HAS_IS_REMOTE: u32 = 0x100;
pub const IS_REMOTE: u32 = 0x200;

/// OTLP's `SpanKind` and `StatusCode` values.
fn kind_number(kind: Kind) -> u64 {
    match kind {
        Kind::Internal => 1,
        Kind::Server => 2,
        Kind::Client => 3,
    }
}
const STATUS_ERROR: u64 = 2;

fn key(field: u64, wire: u64, out: &mut Vec<u8>) {
    encode_varint((field << 3) | wire, out);
}

fn key_len(field: u64) -> usize {
    encoded_len_varint(field << 3)
}

/// The bytes of a length-delimited field whose content is `n` bytes long.
fn delimited_len(field: u64, n: usize) -> usize {
    key_len(field) + encoded_len_varint(n as u64) + n
}

fn delimited(field: u64, bytes: &[u8], out: &mut Vec<u8>) {
    key(field, LEN, out);
    encode_varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

fn any_value_len(v: &Value) -> usize {
    match v {
        Value::Str(s) => delimited_len(1, s.len()),
        Value::Bool(_) => key_len(2) + 1,
        Value::Int(i) => key_len(3) + encoded_len_varint(*i as u64),
    }
}

fn key_value_len(k: &str, v: &Value) -> usize {
    delimited_len(1, k.len()) + delimited_len(2, any_value_len(v))
}

/// A `KeyValue` as field `field` of its message.
fn key_value(field: u64, k: &str, v: &Value, out: &mut Vec<u8>) {
    key(field, LEN, out);
    encode_varint(key_value_len(k, v) as u64, out);
    delimited(1, k.as_bytes(), out);
    key(2, LEN, out);
    encode_varint(any_value_len(v) as u64, out);
    match v {
        Value::Str(s) => delimited(1, s.as_bytes(), out),
        Value::Bool(b) => {
            key(2, VARINT, out);
            out.push(u8::from(*b));
        }
        Value::Int(i) => {
            key(3, VARINT, out);
            encode_varint(*i as u64, out);
        }
    }
}

fn status_len(s: &SpanData) -> usize {
    match &s.error {
        Some(m) => (if m.is_empty() { 0 } else { delimited_len(2, m.len()) }) + key_len(3) + 1,
        None => 0,
    }
}

/// A span's parent is remote when it is in another process: the calling sidecar for a server
/// span, the application for an outbound request; an attempt's parent is in this sidecar.
fn flags(s: &SpanData) -> u32 {
    let remote = s.parent.is_some() && s.kind != Kind::Client;
    SAMPLED | HAS_IS_REMOTE | if remote { IS_REMOTE } else { 0 }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn span_len(s: &SpanData) -> usize {
    let mut n = delimited_len(1, 16) + delimited_len(2, 8);
    if s.parent.is_some() {
        n += delimited_len(4, 8);
    }
    n += key_len(16) + 4;
    if !s.name.is_empty() {
        n += delimited_len(5, s.name.len());
    }
    n += key_len(6) + 1 + 2 * (key_len(7) + 8);
    n += s.attributes.iter().map(|(k, v)| delimited_len(9, key_value_len(k, v))).sum::<usize>();
    let status = status_len(s);
    if status > 0 {
        n += delimited_len(15, status);
    }
    n
}

fn span(s: &SpanData, len: usize, out: &mut Vec<u8>) {
    key(2, LEN, out); // ScopeSpans.spans
    encode_varint(len as u64, out);
    delimited(1, &s.trace_id, out);
    delimited(2, &s.span_id, out);
    if let Some(p) = &s.parent {
        delimited(4, p, out);
    }
    if !s.name.is_empty() {
        delimited(5, s.name.as_bytes(), out);
    }
    key(6, VARINT, out);
    encode_varint(kind_number(s.kind), out);
    key(7, FIXED64, out);
    out.extend_from_slice(&unix_nanos(s.start).to_le_bytes());
    key(8, FIXED64, out);
    out.extend_from_slice(&unix_nanos(s.end).to_le_bytes());
    for (k, v) in &s.attributes {
        key_value(9, k, v, out);
    }
    if let Some(m) = &s.error {
        key(15, LEN, out);
        encode_varint(status_len(s) as u64, out);
        if !m.is_empty() {
            delimited(2, m.as_bytes(), out);
        }
        key(3, VARINT, out);
        encode_varint(STATUS_ERROR, out);
    }
    key(16, FIXED32, out);
    out.extend_from_slice(&flags(s).to_le_bytes());
}

/// The `resource` field of a `ResourceSpans` (written once, sent with every batch).
pub fn resource(attributes: &[(String, String)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (k, v) in attributes {
        key_value(1, k, &Value::Str(v.clone()), &mut body);
    }
    let mut out = Vec::with_capacity(body.len() + 4);
    delimited(1, &body, &mut out);
    out
}

/// An `ExportTraceServiceRequest` of `spans`, under `resource` (from [`resource`]) and the
/// instrumentation scope `weir-proxy`.
pub fn export_request(resource: &[u8], spans: &[SpanData]) -> Vec<u8> {
    const SCOPE: &str = "weir-proxy";
    const VERSION: &str = env!("CARGO_PKG_VERSION");
    let lens: Vec<usize> = spans.iter().map(span_len).collect();
    let scope_len = delimited_len(1, SCOPE.len()) + delimited_len(2, VERSION.len());
    let scope_spans_len = delimited_len(1, scope_len) + lens.iter().map(|&n| delimited_len(2, n)).sum::<usize>();
    let resource_spans_len = resource.len() + delimited_len(2, scope_spans_len);
    let mut out = Vec::with_capacity(delimited_len(1, resource_spans_len));
    key(1, LEN, &mut out); // ExportTraceServiceRequest.resource_spans
    encode_varint(resource_spans_len as u64, &mut out);
    out.extend_from_slice(resource);
    key(2, LEN, &mut out); // ResourceSpans.scope_spans
    encode_varint(scope_spans_len as u64, &mut out);
    key(1, LEN, &mut out); // ScopeSpans.scope
    encode_varint(scope_len as u64, &mut out);
    delimited(1, SCOPE.as_bytes(), &mut out);
    delimited(2, VERSION.as_bytes(), &mut out);
    for (s, len) in spans.iter().zip(lens) {
        span(s, len, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use std::time::Duration;
    use weir_api::otlp::collector::trace::v1::ExportTraceServiceRequest;
    use weir_api::otlp::common::v1::any_value::Value as Any;
    use weir_api::otlp::trace::v1::{span::SpanKind, status::StatusCode};

    fn data(
        kind: Kind,
        parent: Option<[u8; 8]>,
        error: Option<&str>,
        attributes: Vec<(&'static str, Value)>,
    ) -> SpanData {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        SpanData {
            trace_id: [7; 16],
            span_id: [8; 8],
            parent,
            name: "GET".into(),
            kind,
            start,
            end: start + Duration::from_micros(1_500),
            attributes,
            error: error.map(str::to_string),
        }
    }

    #[test]
    fn what_is_written_decodes_as_otlp() {
        let long = "x".repeat(300);
        let spans = [
            data(
                Kind::Server,
                Some([9; 8]),
                Some("503"),
                vec![
                    ("http.response.status_code", Value::Int(503)),
                    ("url.path", Value::Str(long.clone())),
                    ("weir.cancelled", Value::Bool(true)),
                    ("negative", Value::Int(-2)),
                    ("empty", Value::Str(String::new())),
                ],
            ),
            data(Kind::Client, Some([1; 8]), None, vec![]),
            data(Kind::Internal, None, Some(""), vec![]),
        ];
        let resource = resource(&[("service.name".into(), "web".into()), ("k8s.namespace.name".into(), "shop".into())]);
        let bytes = export_request(&resource, &spans);
        let req = ExportTraceServiceRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(req.resource_spans.len(), 1);
        let rs = &req.resource_spans[0];
        let attrs = &rs.resource.as_ref().unwrap().attributes;
        assert_eq!((attrs[0].key.as_str(), attrs[1].key.as_str()), ("service.name", "k8s.namespace.name"));
        assert_eq!(attrs[1].value.as_ref().unwrap().value, Some(Any::StringValue("shop".into())));
        let ss = &rs.scope_spans[0];
        assert_eq!(ss.scope.as_ref().unwrap().name, "weir-proxy");
        assert_eq!(ss.spans.len(), 3);
        let s = &ss.spans[0];
        assert_eq!(
            (s.trace_id.as_slice(), s.span_id.as_slice(), s.parent_span_id.as_slice()),
            (&[7; 16][..], &[8; 8][..], &[9; 8][..])
        );
        assert_eq!((s.name.as_str(), s.kind), ("GET", SpanKind::Server as i32));
        assert_eq!(s.start_time_unix_nano, 1_700_000_000_000_000_000);
        assert_eq!(s.end_time_unix_nano - s.start_time_unix_nano, 1_500_000);
        assert_eq!(s.flags, SAMPLED | HAS_IS_REMOTE | IS_REMOTE);
        let values: Vec<_> =
            s.attributes.iter().map(|kv| (kv.key.as_str(), kv.value.clone().unwrap().value.unwrap())).collect();
        assert_eq!(
            values,
            [
                ("http.response.status_code", Any::IntValue(503)),
                ("url.path", Any::StringValue(long)),
                ("weir.cancelled", Any::BoolValue(true)),
                ("negative", Any::IntValue(-2)),
                ("empty", Any::StringValue(String::new())),
            ]
        );
        let status = s.status.as_ref().unwrap();
        assert_eq!((status.code, status.message.as_str()), (StatusCode::Error as i32, "503"));
        // An attempt's parent is local; no error, no status.
        assert_eq!(ss.spans[1].flags, SAMPLED | HAS_IS_REMOTE);
        assert!(ss.spans[1].status.is_none());
        assert_eq!(ss.spans[1].kind, SpanKind::Client as i32);
        // A root: no parent; an error without a message.
        assert!(ss.spans[2].parent_span_id.is_empty());
        assert_eq!(ss.spans[2].flags, SAMPLED | HAS_IS_REMOTE);
        assert_eq!(ss.spans[2].status.as_ref().unwrap().code, StatusCode::Error as i32);
        // Nothing left over: what was measured is what was written.
        assert_eq!(bytes.len(), req.encoded_len());
    }
}
