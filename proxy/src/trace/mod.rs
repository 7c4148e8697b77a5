//! Request correlation and tracing: an `x-request-id` on every request (generated at the first
//! sidecar, passed on unchanged after), W3C trace context (`traceparent`/`tracestate`) with a
//! new span per sidecar hop, and, when a collector is configured, the spans themselves,
//! exported over OTLP ([`export`]).
//!
//! Sampling is decided once per trace, by whoever starts it: a `traceparent` that arrives is
//! followed (its sampled flag is honoured, never overridden); a request without one starts a
//! trace sampled at the configured ratio, and the flag it is sent on with tells every later hop.
//! The spans a sidecar records ([`span`]):
//! - inbound, one `SERVER` span per request, the parent of the application's own spans;
//! - outbound, one `INTERNAL` span for the request as the application made it (route, backend,
//!   total latency with retries and back-off), and under it one `CLIENT` span per attempt
//!   (retries are siblings), each the parent of the peer sidecar's `SERVER` span.

pub mod export;
pub mod span;
mod wire;

use http::{HeaderMap, HeaderName, HeaderValue};

pub use export::TraceMetrics;
pub use span::{Kind, Open, Tracer};

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The correlation of one request at one hop: the headers as this hop sends them on (cheap
/// to keep: a header value shares its bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    request_id: HeaderValue,
    /// A valid version-00 `traceparent`: `00-{trace id}-{span id}-{flags}`.
    traceparent: HeaderValue,
    /// The caller's span, when the request came with trace context.
    parent: Option<[u8; 8]>,
    /// This hop records its spans: the trace is sampled and a collector is configured.
    recorded: bool,
}

impl Context {
    pub fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or_default()
    }

    pub fn trace_id(&self) -> &str {
        self.traceparent.to_str().map(|t| &t[3..35]).unwrap_or_default()
    }

    /// The span this hop created (the parent of the next).
    pub fn span_id(&self) -> &str {
        self.traceparent.to_str().map(|t| &t[36..52]).unwrap_or_default()
    }

    /// Whether this hop's spans are recorded and exported.
    pub fn recorded(&self) -> bool {
        self.recorded
    }

    /// This hop's span, to be recorded (`None` when the trace is not).
    pub fn open(&self, tracer: &Tracer, kind: Kind, name: &str) -> Option<Open> {
        if !self.recorded {
            return None;
        }
        let tp = self.traceparent.as_bytes();
        tracer.open(unhex::<16>(&tp[3..35]), unhex::<8>(&tp[36..52]), self.parent, kind, name.to_owned())
    }

    /// A span under this hop's (an outbound attempt), to be recorded, with the `traceparent`
    /// that makes it the parent of the next hop. `None` when the trace is not recorded.
    pub fn child(&self, tracer: &Tracer, kind: Kind, name: &str) -> Option<(Open, HeaderValue)> {
        if !self.recorded {
            return None;
        }
        let mut tp: [u8; 55] = self.traceparent.as_bytes().try_into().ok()?;
        let parent = unhex::<8>(&tp[36..52]);
        let id: [u8; 8] = rand::random();
        hex(&id, &mut tp[36..52]);
        let header = HeaderValue::from_bytes(&tp).ok()?;
        let open = tracer.open(unhex::<16>(&tp[3..35]), id, Some(parent), kind, name.to_owned())?;
        Some((open, header))
    }
}

/// Makes this hop a child span: keeps (or creates) the request id and trace, and sets a new
/// span id as the `traceparent` parent. An invalid `traceparent` starts a new trace (and drops
/// `tracestate`, which belongs to the invalid one), as the W3C spec asks; a new trace is
/// sampled as `tracer` decides (never, without a collector). On every request, so written
/// without formatting machinery: hex digits go straight into stack buffers.
pub fn hop(headers: &mut HeaderMap, tracer: &Tracer) -> Context {
    let request_id = match headers.get(&REQUEST_ID).filter(|v| v.to_str().is_ok_and(valid_request_id)) {
        Some(id) => id.clone(),
        None => {
            let id = new_request_id();
            headers.insert(REQUEST_ID.clone(), id.clone());
            id
        }
    };
    // "00-" trace "-" span "-" flags
    let mut tp = *b"00-00000000000000000000000000000000-0000000000000000-00";
    let (parent, sampled) = match headers.get(&TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(parse) {
        Some((trace, parent, flags)) => {
            tp[3..35].copy_from_slice(trace.as_bytes());
            tp[53..55].copy_from_slice(flags.as_bytes());
            // The sampled flag is the low bit of the flags byte.
            (Some(unhex::<8>(parent.as_bytes())), unhex::<1>(flags.as_bytes())[0] & 1 == 1)
        }
        None => {
            headers.remove("tracestate");
            hex(&rand::random::<[u8; 16]>(), &mut tp[3..35]);
            let sampled = tracer.sample_new();
            if sampled {
                tp[54] = b'1';
            }
            (None, sampled)
        }
    };
    hex(&rand::random::<[u8; 8]>(), &mut tp[36..52]);
    let traceparent = HeaderValue::from_bytes(&tp).expect("hex digits and dashes are a valid header value");
    headers.insert(TRACEPARENT.clone(), traceparent.clone());
    Context { request_id, traceparent, parent, recorded: sampled && tracer.enabled() }
}

/// The bytes of lower-case hex digits (checked valid by [`parse`], or written by [`hex`]).
fn unhex<const N: usize>(digits: &[u8]) -> [u8; N] {
    let nibble = |d: u8| if d.is_ascii_digit() { d - b'0' } else { d.wrapping_sub(b'a') + 10 } & 0xf;
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *o = (nibble(pair[0]) << 4) | nibble(pair[1]);
    }
    out
}

/// Lower-case hex of `bytes` into `out` (twice as long).
fn hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (b, o) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        o[0] = DIGITS[usize::from(b >> 4)];
        o[1] = DIGITS[usize::from(b & 0xf)];
    }
}

/// `(trace id, parent span id, flags)` of a valid version-00 `traceparent`.
fn parse(v: &str) -> Option<(&str, &str, &str)> {
    let mut parts = v.trim().split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    // Version 00 has exactly four fields; later versions may add more, which we ignore.
    if version == "ff" || version.len() != 2 || !is_hex(version) || (version == "00" && parts.next().is_some()) {
        return None;
    }
    let ok = trace.len() == 32
        && parent.len() == 16
        && flags.len() == 2
        && [trace, parent, flags].iter().all(|s| is_hex(s))
        && trace.bytes().any(|b| b != b'0')
        && parent.bytes().any(|b| b != b'0');
    ok.then_some((trace, parent, flags))
}

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn valid_request_id(v: &str) -> bool {
    !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic())
}

/// A random UUID (version 4) in its usual text form.
fn new_request_id() -> HeaderValue {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut text = *b"00000000-0000-0000-0000-000000000000";
    for (range, out) in [(0..4, 0..8), (4..6, 9..13), (6..8, 14..18), (8..10, 19..23), (10..16, 24..36)] {
        hex(&b[range], &mut text[out]);
    }
    HeaderValue::from_bytes(&text).expect("hex digits and dashes are a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hop_keeps_the_trace_and_makes_a_new_span() {
        let mut h = HeaderMap::new();
        h.insert(&TRACEPARENT, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
        h.insert("tracestate", "vendor=x".parse().unwrap());
        h.insert(&REQUEST_ID, "req-1".parse().unwrap());
        let c = hop(&mut h, &Tracer::default());
        assert_eq!(c.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.request_id(), "req-1");
        let tp = h[&TRACEPARENT].to_str().unwrap().to_string();
        assert_eq!(tp, format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", c.span_id()));
        assert_ne!(c.span_id(), "00f067aa0ba902b7");
        assert_eq!(h["tracestate"], "vendor=x");
        // The next hop makes yet another span in the same trace.
        let c2 = hop(&mut h, &Tracer::default());
        assert_eq!(c2.trace_id(), c.trace_id());
        assert_ne!(c2.span_id(), c.span_id());
    }

    #[test]
    fn the_callers_sampled_flag_is_honoured_and_new_traces_follow_the_ratio() {
        let (all, _rx) = export::collecting(1.0);
        let (none, _rx2) = export::collecting(0.0);
        let with = |tp: &str, tracer: &Tracer| {
            let mut h = HeaderMap::new();
            h.insert(&TRACEPARENT, tp.parse().unwrap());
            let c = hop(&mut h, tracer);
            (c.recorded(), h[&TRACEPARENT].to_str().unwrap().to_string())
        };
        // Not sampled by the caller: never recorded, whatever the ratio; the flag stays.
        let (rec, tp) = with("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", &all);
        assert!(!rec && tp.ends_with("-00"));
        // Sampled by the caller: recorded even at ratio 0.
        let (rec, tp) = with("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", &none);
        assert!(rec && tp.ends_with("-01"));
        // A new trace says what was decided, so the next hops follow.
        let mut h = HeaderMap::new();
        assert!(hop(&mut h, &all).recorded());
        assert!(h[&TRACEPARENT].to_str().unwrap().ends_with("-01"));
        let mut h = HeaderMap::new();
        assert!(!hop(&mut h, &none).recorded());
        assert!(h[&TRACEPARENT].to_str().unwrap().ends_with("-00"));
        // Without a collector a sampled trace is passed on but nothing is recorded.
        let (rec, _) = with("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", &Tracer::default());
        assert!(!rec);
    }

    #[tokio::test]
    async fn spans_link_caller_request_and_attempts() {
        let (tracer, mut rx) = export::collecting(1.0);
        let mut h = HeaderMap::new();
        h.insert(&TRACEPARENT, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
        let c = hop(&mut h, &tracer);
        let request = c.open(&tracer, Kind::Internal, "GET").unwrap();
        let (attempt, header) = c.child(&tracer, Kind::Client, "GET").unwrap();
        let tp = header.to_str().unwrap();
        assert_eq!(&tp[3..35], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(tp.ends_with("-01"));
        assert_eq!(unhex::<8>(&tp.as_bytes()[36..52]), attempt.span_id());
        let rsp = http::Response::builder().status(503).body(crate::body::empty()).unwrap();
        attempt.end_at_head(&rsp);
        drop(request.end_with(http::Response::new(crate::body::empty())));
        let (a, r) = (rx.recv().await.unwrap(), rx.recv().await.unwrap());
        assert_eq!(r.parent, Some(unhex::<8>(b"00f067aa0ba902b7")), "the request span's parent is the caller's");
        assert_eq!(a.parent, Some(r.span_id), "an attempt's parent is the request span");
        assert_eq!(a.trace_id, r.trace_id);
        assert_eq!(r.span_id, unhex::<8>(c.span_id().as_bytes()));
        assert!(a.error.is_some() && r.error.is_none());
        assert!(a.attributes.contains(&("http.response.status_code", span::Value::Int(503))));
    }

    #[tokio::test]
    async fn a_grpc_span_ends_with_its_trailers() {
        use http_body_util::BodyExt;
        let (tracer, mut rx) = export::collecting(1.0);
        let mut h = HeaderMap::new();
        h.insert(&TRACEPARENT, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
        for (kind, code, failed) in [(Kind::Server, "5", false), (Kind::Server, "14", true), (Kind::Client, "5", true)]
        {
            let c = hop(&mut h.clone(), &tracer);
            let span = c.open(&tracer, kind, "POST").unwrap();
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", code.parse().unwrap());
            let frames = vec![
                Ok::<_, crate::body::BoxError>(http_body::Frame::data(bytes::Bytes::from_static(b"m"))),
                Ok(http_body::Frame::trailers(trailers)),
            ];
            let body = crate::body::boxed(http_body_util::StreamBody::new(tokio_stream::iter(frames)));
            let mut rsp = http::Response::new(body);
            rsp.headers_mut().insert(http::header::CONTENT_TYPE, "application/grpc".parse().unwrap());
            let rsp = span.end_with(rsp);
            assert!(rx.try_recv().is_err(), "not ended before the trailers");
            rsp.into_body().collect().await.unwrap();
            let s = rx.recv().await.unwrap();
            let want = span::Value::Int(code.parse().unwrap());
            assert!(s.attributes.contains(&("rpc.grpc.status_code", want)), "{:?}", s.attributes);
            assert_eq!(s.error.is_some(), failed, "{kind:?} {code}");
        }
    }

    #[test]
    fn missing_or_invalid_context_starts_a_new_one() {
        let mut h = HeaderMap::new();
        let c = hop(&mut h, &Tracer::default());
        assert_eq!(c.request_id().len(), 36);
        let id = c.request_id().as_bytes();
        assert!([8, 13, 18, 23].iter().all(|&i| id[i] == b'-'), "{}", c.request_id());
        assert_eq!(id[14], b'4', "version 4: {}", c.request_id());
        assert!(b"89ab".contains(&id[19]), "RFC 4122 variant: {}", c.request_id());
        assert!(c.trace_id().bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(h[&REQUEST_ID].to_str().unwrap(), c.request_id());
        assert_eq!(h[&TRACEPARENT].to_str().unwrap(), format!("00-{}-{}-00", c.trace_id(), c.span_id()));
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            let mut h = HeaderMap::new();
            h.insert(&TRACEPARENT, bad.parse().unwrap());
            h.insert("tracestate", "vendor=x".parse().unwrap());
            let c = hop(&mut h, &Tracer::default());
            assert_ne!(c.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736", "{bad}");
            assert!(h.get("tracestate").is_none(), "{bad}");
        }
    }
}
