//! Request correlation: an `x-request-id` on every request (generated at the first sidecar,
//! passed on unchanged after), and W3C trace context (`traceparent`/`tracestate`) with a new
//! span per sidecar hop, so an external tracer can stitch the hops together. Nothing is
//! recorded or exported here: the sidecar only keeps the context moving.

use http::{HeaderMap, HeaderName, HeaderValue};

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The correlation of one request at one hop: the headers as this hop sends them on (cheap
/// to keep: a header value shares its bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    request_id: HeaderValue,
    /// A valid version-00 `traceparent`: `00-{trace id}-{span id}-{flags}`.
    traceparent: HeaderValue,
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
}

/// Makes this hop a child span: keeps (or creates) the request id and trace, and sets a new
/// span id as the `traceparent` parent. An invalid `traceparent` starts a new trace (and drops
/// `tracestate`, which belongs to the invalid one), as the W3C spec asks. On every request, so
/// written without formatting machinery: hex digits go straight into stack buffers.
pub fn hop(headers: &mut HeaderMap) -> Context {
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
    match headers.get(&TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(parse) {
        Some((trace, flags)) => {
            tp[3..35].copy_from_slice(trace.as_bytes());
            tp[53..55].copy_from_slice(flags.as_bytes());
        }
        None => {
            headers.remove("tracestate");
            // Not sampled ("00"): a tracer upstream decides sampling; we only correlate.
            hex(&rand::random::<[u8; 16]>(), &mut tp[3..35]);
        }
    }
    hex(&rand::random::<[u8; 8]>(), &mut tp[36..52]);
    let traceparent = HeaderValue::from_bytes(&tp).expect("hex digits and dashes are a valid header value");
    headers.insert(TRACEPARENT.clone(), traceparent.clone());
    Context { request_id, traceparent }
}

/// Lower-case hex of `bytes` into `out` (twice as long).
fn hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (b, o) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        o[0] = DIGITS[usize::from(b >> 4)];
        o[1] = DIGITS[usize::from(b & 0xf)];
    }
}

/// `(trace id, flags)` of a valid version-00 `traceparent`.
fn parse(v: &str) -> Option<(&str, &str)> {
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
    ok.then_some((trace, flags))
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
        let c = hop(&mut h);
        assert_eq!(c.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.request_id(), "req-1");
        let tp = h[&TRACEPARENT].to_str().unwrap().to_string();
        assert_eq!(tp, format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", c.span_id()));
        assert_ne!(c.span_id(), "00f067aa0ba902b7");
        assert_eq!(h["tracestate"], "vendor=x");
        // The next hop makes yet another span in the same trace.
        let c2 = hop(&mut h);
        assert_eq!(c2.trace_id(), c.trace_id());
        assert_ne!(c2.span_id(), c.span_id());
    }

    #[test]
    fn missing_or_invalid_context_starts_a_new_one() {
        let mut h = HeaderMap::new();
        let c = hop(&mut h);
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
            let c = hop(&mut h);
            assert_ne!(c.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736", "{bad}");
            assert!(h.get("tracestate").is_none(), "{bad}");
        }
    }
}
