//! A request body that can be sent again: the first attempt streams it upstream as it arrives
//! (nothing waits for the whole body, so client and bidirectional streams flow), keeping a
//! copy of up to a bound; a later attempt replays the copy, then goes on with whatever has not
//! arrived yet. Once more than the bound has passed, the copy is dropped and the body is no
//! longer replayable. As Linkerd's and Envoy's retry buffers do.
//!
//! Attempts are sequential: a new copy supersedes the previous one, which fails if polled
//! again (its upstream stream is over anyway), so two attempts never race for the source.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as _, Frame, SizeHint};

use crate::body::{Body, BoxError};

/// Request bodies up to this size are kept, so an attempt can be sent again.
pub const MAX_REPLAY_BODY: usize = 64 * 1024;

pub struct ReplayBody {
    /// `None`: an empty body (most requests), which needs no copy, lock or allocation.
    shared: Option<Arc<Mutex<Shared>>>,
    /// Which copy this is; only the newest reads.
    generation: u64,
    /// Chunks of the kept copy this copy has yielded.
    position: usize,
    trailers_sent: bool,
}

struct Shared {
    /// The client's body, read by whichever copy is newest; `None` once it ended.
    source: Option<Body>,
    chunks: Vec<Bytes>,
    kept: usize,
    max: usize,
    trailers: Option<HeaderMap>,
    /// The source ended: the copy is the whole body.
    complete: bool,
    /// More than `max` passed (or the source failed): not replayable.
    overflowed: bool,
    generation: u64,
}

impl ReplayBody {
    /// The first copy of `body`, keeping up to `max` bytes for replay.
    pub fn new(body: Body, max: usize) -> Self {
        let shared = (!body.is_end_stream()).then(|| {
            Arc::new(Mutex::new(Shared {
                source: Some(body),
                chunks: Vec::new(),
                kept: 0,
                max,
                trailers: None,
                complete: false,
                overflowed: false,
                generation: 0,
            }))
        });
        Self { shared, generation: 0, position: 0, trailers_sent: false }
    }

    /// A new copy from the start, for another attempt, when everything read so far was kept;
    /// earlier copies stop.
    pub fn replay(&self) -> Option<ReplayBody> {
        let Some(shared) = &self.shared else {
            return Some(Self { shared: None, generation: 0, position: 0, trailers_sent: false });
        };
        let mut s = shared.lock().unwrap();
        if s.overflowed {
            return None;
        }
        s.generation += 1;
        Some(Self { shared: Some(shared.clone()), generation: s.generation, position: 0, trailers_sent: false })
    }

    /// Whether a replay is still possible.
    pub fn replayable(&self) -> bool {
        self.shared.as_ref().is_none_or(|s| !s.lock().unwrap().overflowed)
    }
}

impl http_body::Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(shared) = &this.shared else { return Poll::Ready(None) };
        let mut s = shared.lock().unwrap();
        if this.generation != s.generation {
            return Poll::Ready(Some(Err("request body superseded by another attempt".into())));
        }
        if let Some(chunk) = s.chunks.get(this.position) {
            this.position += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        if s.complete {
            if !this.trailers_sent
                && let Some(t) = &s.trailers
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t.clone()))));
            }
            return Poll::Ready(None);
        }
        let Some(source) = s.source.as_mut() else { return Poll::Ready(None) };
        let polled = Pin::new(source).poll_frame(cx);
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                s.complete = true;
                s.source = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                s.overflowed = true;
                s.chunks = Vec::new();
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !s.overflowed {
                        if s.kept + data.len() > s.max {
                            s.overflowed = true;
                            s.chunks = Vec::new();
                            this.position = 0;
                        } else {
                            s.kept += data.len();
                            s.chunks.push(data.clone());
                            this.position += 1;
                        }
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    s.trailers = Some(t.clone());
                    s.complete = true;
                    s.source = None;
                    this.trailers_sent = true;
                }
                if s.source.as_ref().is_some_and(|b| b.is_end_stream()) {
                    s.complete = true;
                    s.source = None;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let Some(shared) = &self.shared else { return true };
        let s = shared.lock().unwrap();
        s.complete
            && self.position >= s.chunks.len()
            && (self.trailers_sent || s.trailers.is_none())
            && self.generation == s.generation
    }

    fn size_hint(&self) -> SizeHint {
        let Some(shared) = &self.shared else { return SizeHint::with_exact(0) };
        let s = shared.lock().unwrap();
        let unread: u64 = s.chunks.get(self.position..).unwrap_or_default().iter().map(|c| c.len() as u64).sum();
        match &s.source {
            None => SizeHint::with_exact(unread),
            Some(src) => {
                let h = src.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(h.lower() + unread);
                if let Some(upper) = h.upper() {
                    hint.set_upper(upper + unread);
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn streamed(chunks: &[&'static str], trailers: bool) -> Body {
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> =
            chunks.iter().map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes())))).collect();
        if trailers {
            let mut t = HeaderMap::new();
            t.insert("x-sum", "1".parse().unwrap());
            frames.push(Ok(Frame::trailers(t)));
        }
        crate::body::boxed(http_body_util::StreamBody::new(tokio_stream::iter(frames)))
    }

    #[tokio::test]
    async fn a_replay_yields_the_same_body_and_trailers() {
        let first = ReplayBody::new(streamed(&["ab", "cd"], true), 16);
        let again = first.replay().unwrap();
        let got = again.collect().await.unwrap();
        assert_eq!(got.trailers().unwrap()["x-sum"], "1");
        assert_eq!(got.to_bytes(), "abcd");
        let third = first.replay().unwrap();
        assert_eq!(third.size_hint().exact(), Some(4));
        let got = third.collect().await.unwrap();
        assert_eq!(got.trailers().unwrap()["x-sum"], "1");
        assert_eq!(got.to_bytes(), "abcd");
    }

    #[tokio::test]
    async fn a_replay_after_a_partial_read_continues_from_the_source() {
        let mut first = ReplayBody::new(streamed(&["ab", "cd", "ef"], false), 16);
        let chunk = first.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(chunk, "ab");
        let second = first.replay().unwrap();
        assert!(first.frame().await.unwrap().is_err(), "a superseded copy stops");
        assert_eq!(second.collect().await.unwrap().to_bytes(), "abcdef");
    }

    #[tokio::test]
    async fn past_the_bound_it_streams_on_but_cannot_replay() {
        let first = ReplayBody::new(streamed(&["abcd", "efgh", "ij"], false), 6);
        let got = first.replay().unwrap().collect().await.unwrap().to_bytes();
        assert_eq!(got, "abcdefghij", "the body passes whole");
        assert!(!first.replayable() && first.replay().is_none());
    }

    #[tokio::test]
    async fn an_empty_body_is_replayable_and_ends_at_once() {
        let first = ReplayBody::new(crate::body::empty(), 16);
        let again = first.replay().unwrap();
        assert!(again.is_end_stream());
        assert_eq!(again.collect().await.unwrap().to_bytes(), "");
    }
}
