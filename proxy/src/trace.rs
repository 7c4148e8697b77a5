//! Request correlation: an `x-request-id` on every request (generated at the first sidecar,
//! passed on unchanged after), and W3C trace context (`traceparent`/`tracestate`) with a new
//! span per sidecar hop, so an external tracer can stitch the hops together. Nothing is
//! recorded or exported here: the sidecar only keeps the context moving.

use http::{HeaderMap, HeaderName, HeaderValue};

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The correlation of one request at one hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    pub request_id: String,
    pub trace_id: String,
    /// The span this hop created (the parent of the next).
    pub span_id: String,
}

/// Makes this hop a child span: keeps (or creates) the request id and trace, and sets a new
/// span id as the `traceparent` parent. An invalid `traceparent` starts a new trace (and drops
/// `tracestate`, which belongs to the invalid one), as the W3C spec asks.
pub fn hop(headers: &mut HeaderMap) -> Context {
    let request_id = match headers.get(&REQUEST_ID).and_then(|v| v.to_str().ok()).filter(|v| valid_request_id(v)) {
        Some(id) => id.to_string(),
        None => {
            let id = new_request_id();
            if let Ok(v) = HeaderValue::from_str(&id) {
                headers.insert(REQUEST_ID.clone(), v);
            }
            id
        }
    };
    let span_id = format!("{:016x}", rand::random::<u64>());
    let (trace_id, flags) = match headers.get(&TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(parse) {
        Some((trace, flags)) => (trace.to_string(), flags.to_string()),
        None => {
            headers.remove("tracestate");
            // Not sampled: a tracer upstream decides sampling; we only correlate.
            (format!("{:032x}", rand::random::<u128>()), "00".to_string())
        }
    };
    if let Ok(v) = HeaderValue::from_str(&format!("00-{trace_id}-{span_id}-{flags}")) {
        headers.insert(TRACEPARENT.clone(), v);
    }
    Context { request_id, trace_id, span_id }
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
fn new_request_id() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = format!("{:032x}", u128::from_be_bytes(b));
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
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
        assert_eq!(c.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.request_id, "req-1");
        let tp = h[&TRACEPARENT].to_str().unwrap().to_string();
        assert_eq!(tp, format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", c.span_id));
        assert_ne!(c.span_id, "00f067aa0ba902b7");
        assert_eq!(h["tracestate"], "vendor=x");
        // The next hop makes yet another span in the same trace.
        let c2 = hop(&mut h);
        assert_eq!(c2.trace_id, c.trace_id);
        assert_ne!(c2.span_id, c.span_id);
    }

    #[test]
    fn missing_or_invalid_context_starts_a_new_one() {
        let mut h = HeaderMap::new();
        let c = hop(&mut h);
        assert_eq!(c.request_id.len(), 36);
        assert_eq!(h[&REQUEST_ID].to_str().unwrap(), c.request_id);
        assert_eq!(h[&TRACEPARENT].to_str().unwrap(), format!("00-{}-{}-00", c.trace_id, c.span_id));
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
            assert_ne!(c.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736", "{bad}");
            assert!(h.get("tracestate").is_none(), "{bad}");
        }
    }
}
