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
