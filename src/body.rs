//! The body type every response of the proxy carries, and small constructors for it.
//!
//! Upstream bodies stream through unchanged (`Incoming` boxed); answers outpost makes itself
//! (cache hits, 202s, errors) are `Full` buffers. One boxed type keeps handlers simple.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};

/// Boxed error for body streams.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response outpost sends (and of every request it forwards).
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A body holding `bytes` in one piece.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> ProxyBody {
    Empty::<Bytes>::new()
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// Box any body whose error converts into [`BoxError`].
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A body that streams `inner` through unchanged while keeping a copy of up to `limit` bytes;
/// when the stream ends complete and within the limit, `on_complete` gets the whole body.
/// Dropped early (client gone) or over the limit, `on_complete` is dropped uncalled.
pub fn tee<B>(inner: B, limit: u64, on_complete: impl FnOnce(Bytes) + Send + 'static) -> ProxyBody
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    Tee {
        inner,
        buf: Some(bytes::BytesMut::new()),
        limit,
        on_complete: Some(Box::new(on_complete)),
    }
    .boxed_unsync()
}

type Completion = Box<dyn FnOnce(Bytes) + Send>;

struct Tee<B> {
    inner: B,
    buf: Option<bytes::BytesMut>,
    limit: u64,
    on_complete: Option<Completion>,
}

impl<B> Tee<B> {
    fn complete(&mut self) {
        if let (Some(buf), Some(done)) = (self.buf.take(), self.on_complete.take()) {
            done(buf.freeze());
        }
    }
}

impl<B> http_body::Body for Tee<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(buf)) = (frame.data_ref(), this.buf.as_mut()) {
                    if buf.is_empty() && this.inner.is_end_stream() {
                        // The whole body in one frame (the common small answer): hand it on
                        // without copying it.
                        if data.len() as u64 <= this.limit
                            && let Some(done) = this.on_complete.take()
                        {
                            this.buf = None;
                            done(data.clone());
                        }
                        this.buf = None;
                        this.on_complete = None;
                    } else if (buf.len() + data.len()) as u64 > this.limit {
                        this.buf = None;
                        this.on_complete = None;
                    } else {
                        buf.extend_from_slice(data);
                    }
                }
                // Servers stop polling once the body says it has ended, so complete now.
                if this.inner.is_end_stream() {
                    this.complete();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.buf = None;
                this.on_complete = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.complete();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Read a request body whole, up to `limit` bytes. Over the limit, the bytes read so far come
/// back with the rest of the stream so the caller can still forward it.
pub async fn collect_limited<B>(mut body: B, limit: u64) -> Result<Collected<B>, BoxError>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    // Sized from the declared length (Content-Length), so that a large body is held once, not
    // in a buffer grown by doubling (up to twice its size).
    let declared = body
        .size_hint()
        .exact()
        .unwrap_or(0)
        .min(limit.saturating_add(1));
    let mut buf = bytes::BytesMut::with_capacity(usize::try_from(declared).unwrap_or(0));
    loop {
        match body.frame().await {
            None => return Ok(Collected::Whole(buf.freeze())),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                    if buf.len() as u64 > limit {
                        return Ok(Collected::TooLarge {
                            prefix: buf.freeze(),
                            rest: body,
                        });
                    }
                }
            }
        }
    }
}

/// [`collect_limited`] within `deadline`: an answer whose body stalls (its head came, the rest
/// does not) is an error after `deadline`, like one whose body broke off, instead of holding
/// its reader forever.
pub async fn collect_within<B>(
    body: B,
    limit: u64,
    deadline: std::time::Duration,
) -> Result<Collected<B>, BoxError>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    match tokio::time::timeout(deadline, collect_limited(body, limit)).await {
        Ok(collected) => collected,
        Err(_) => Err(Box::new(BodyStalled(deadline))),
    }
}

/// The error of [`collect_within`] when the body did not complete in time.
#[derive(Debug, thiserror::Error)]
#[error("the body stalled: not complete within {0:?}")]
pub struct BodyStalled(pub std::time::Duration);

/// Result of [`collect_limited`].
pub enum Collected<B> {
    /// The whole body.
    Whole(Bytes),
    /// Over the limit: what was read, and the unread rest.
    TooLarge {
        /// Bytes read so far.
        prefix: Bytes,
        /// The rest of the body.
        rest: B,
    },
}

/// A body of `prefix` followed by the rest of `rest`.
pub fn chain<B>(prefix: Bytes, rest: B) -> ProxyBody
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let first =
        futures_util::stream::once(
            async move { Ok::<_, BoxError>(http_body::Frame::data(prefix)) },
        );
    let rest = http_body_util::BodyStream::new(rest.map_err(Into::<BoxError>::into));
    let stream = futures_util::StreamExt::chain(first, rest);
    http_body_util::StreamBody::new(stream).boxed_unsync()
}
