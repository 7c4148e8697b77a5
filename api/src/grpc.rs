//! What the sidecar and the demo backend both need to know of gRPC on the wire.

use http::{HeaderMap, header};

/// Whether a message is gRPC (`application/grpc`, `application/grpc+proto`, …). gRPC-Web
/// carries its status in the body, so it is not.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.starts_with(b"application/grpc") && matches!(v.get(16), None | Some(b'+') | Some(b';'))
    })
}

/// The `grpc-status` in `headers` (trailers, or a trailers-only response's headers).
pub fn status_in(headers: &HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types_and_statuses() {
        let h = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
            is_grpc(&h)
        };
        assert!(h("application/grpc") && h("application/grpc+proto") && h("application/grpc;charset=utf-8"));
        assert!(!h("application/grpc-web") && !h("application/grpc-web+proto") && !h("application/json"));
        let mut t = HeaderMap::new();
        assert_eq!(status_in(&t), None);
        t.insert("grpc-status", "14".parse().unwrap());
        assert_eq!(status_in(&t), Some(14));
    }
}
