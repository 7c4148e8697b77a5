//! Body and header plumbing shared by both directions.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, header};
use http_body_util::{BodyExt, Empty, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the proxy sends: streamed from a peer, or synthetic.
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

pub fn full(data: impl Into<Bytes>) -> Body {
    boxed(Full::new(data.into()))
}

pub fn empty() -> Body {
    boxed(Empty::new())
}

/// Keeps `guard` alive until `body` has been sent to the end (or dropped): how a bulkhead
/// slot covers the whole response, not just its headers.
pub fn with_guard<G: Send + Sync + Unpin + 'static>(body: Body, guard: G) -> Body {
    struct Guarded<G> {
        inner: Body,
        _guard: G,
    }
    impl<G: Send + Sync + Unpin + 'static> http_body::Body for Guarded<G> {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
            std::pin::Pin::new(&mut self.inner).poll_frame(cx)
        }
        fn is_end_stream(&self) -> bool {
            self.inner.is_end_stream()
        }
        fn size_hint(&self) -> http_body::SizeHint {
            self.inner.size_hint()
        }
    }
    Guarded { inner: body, _guard: guard }.boxed()
}

/// Fails `body` with an error when it makes no progress for `idle`: a stalled stream is
/// reset instead of holding its connection and slots forever.
pub fn with_idle_timeout(body: Body, idle: std::time::Duration) -> Body {
    Timed { inner: body, limit: Limit::Idle(idle), timer: Box::pin(tokio::time::sleep(idle)) }.boxed()
}

/// Fails `body` with an error if it has not ended by `deadline`: the request timeout covers
/// the response body too (`after` is the timeout, for the message).
pub fn with_deadline(body: Body, deadline: tokio::time::Instant, after: std::time::Duration) -> Body {
    Timed { inner: body, limit: Limit::Deadline(after), timer: Box::pin(tokio::time::sleep_until(deadline)) }.boxed()
}

enum Limit {
    /// The timer restarts with every frame.
    Idle(std::time::Duration),
    /// The timer is the request's deadline.
    Deadline(std::time::Duration),
}

/// A body that fails when its timer fires first.
struct Timed {
    inner: Body,
    limit: Limit,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl http_body::Body for Timed {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        use std::future::Future;
        use std::task::Poll;
        match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Limit::Idle(idle) = self.limit {
                    let next = tokio::time::Instant::now() + idle;
                    self.timer.as_mut().reset(next);
                }
                Poll::Ready(frame)
            }
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(match self.limit {
                    Limit::Idle(idle) => format!("stream idle for {idle:?}").into(),
                    Limit::Deadline(after) => format!("request timed out after {after:?}").into(),
                }))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// `uri`'s path and query under `http://{authority}` (the absolute form an HTTP/2 request and
/// hyper's HTTP/1.1 pool address by); `None` when they do not make a URI.
pub fn absolute_uri(authority: impl std::fmt::Display, uri: &http::Uri) -> Option<http::Uri> {
    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    format!("http://{authority}{pq}").parse().ok()
}

/// Carries the client's protocol across the sidecar-to-sidecar HTTP/2 hop.
pub static ORIG_PROTO: HeaderName = HeaderName::from_static("weir-orig-proto");
/// Set on every response the proxy made up itself, with a short reason.
pub static WEIR_ERROR: HeaderName = HeaderName::from_static("weir-error");

/// Removes connection-scoped headers (RFC 9110 §7.6.1) before a message crosses a hop.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of these: one pass over the names (no hashing) says so.
    let hop_by_hop = |name: &HeaderName| {
        matches!(
            name.as_str(),
            "connection"
                | "transfer-encoding"
                | "upgrade"
                | "proxy-authenticate"
                | "keep-alive"
                | "proxy-connection"
                | "http2-settings"
                | "te"
        )
    };
    if !headers.keys().any(hop_by_hop) {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        HeaderName::from_static("http2-settings"),
    ] {
        headers.remove(name);
    }
    // `te` may only say `trailers` once a request is HTTP/2 (gRPC needs it).
    if headers.get(header::TE).is_some_and(|v| v != HeaderValue::from_static("trailers")) {
        headers.remove(header::TE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_fails_after_the_idle_timeout() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, BoxError>>(1);
        let body = boxed(http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)));
        let mut body = with_idle_timeout(body, std::time::Duration::from_secs(5));
        tx.send(Ok(http_body::Frame::data(Bytes::from_static(b"a")))).await.unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        let started = tokio::time::Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("idle"), "{err}");
        assert_eq!(started.elapsed(), std::time::Duration::from_secs(5));
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_still_streaming_at_the_deadline_fails() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, BoxError>>(4);
        let body = boxed(http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)));
        let started = tokio::time::Instant::now();
        let second = std::time::Duration::from_secs(1);
        let mut body = with_deadline(body, started + 3 * second, 3 * second);
        // Progress does not move a deadline (it would an idle timeout).
        for _ in 0..2 {
            tokio::time::sleep(second).await;
            tx.send(Ok(http_body::Frame::data(Bytes::from_static(b"a")))).await.unwrap();
            assert!(body.frame().await.unwrap().is_ok());
        }
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("timed out after 3s"), "{err}");
        assert_eq!(started.elapsed(), 3 * second);
        drop(tx);
    }

    #[test]
    fn strips_listed_and_standard_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "close, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("keep-alive", "5".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-private").is_none() && h.get("keep-alive").is_none() && h.get(header::CONNECTION).is_none());
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert!(h.get("x-keep").is_some());

        // Each standard one alone is found by the quick scan too; `te` other than trailers goes.
        for (name, value) in [
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-connection", "x"),
            ("http2-settings", "AAA"),
            ("te", "gzip"),
            ("proxy-authenticate", "Basic"),
        ] {
            let mut h = HeaderMap::new();
            h.insert(HeaderName::from_static(name), value.parse().unwrap());
            h.insert("x-keep", "1".parse().unwrap());
            strip_hop_by_hop(&mut h);
            assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-keep"], "{name}");
        }
    }
}
