//! The one place where the layers around the proxy handler are ordered.
//!
//! Outermost first:
//! 1. [`HeadLimitLayer`]: a request head (request line and headers) over
//!    `proxy.max_header_bytes` is a 431 before any work.
//! 2. [`BodyLimitLayer`]: a declared body over `proxy.max_body_bytes` is a 413 before any work;
//!    an undeclared (chunked) one is cut off at the limit while it streams.
//! 3. The handler, [`Proxy::handle`] (routing, cache, outbox).
//!
//! Below the layers, per connection and not per request, `server.rs` bounds what hyper buffers
//! of a head (its HTTP/1 floor is 8 KiB, so smaller limits are only exact here), and its guard
//! (`server/guard.rs`) refuses ambiguous HTTP/1 framing and times request heads; upstream
//! timeouts are `proxy/forward.rs`'s.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tower::{Layer, Service, ServiceBuilder};

use crate::body::ProxyBody;
use crate::cache::status;
use crate::cache::with_cache_status;
use crate::context::ClientInfo;
use crate::error::{ProxyError, json_response};
use crate::proxy::Proxy;

/// The service for one connection: the layers above, around the proxy.
pub fn proxy_service(
    proxy: Arc<Proxy>,
    client: ClientInfo,
    max_header_bytes: usize,
    max_body_bytes: u64,
) -> impl Service<
    Request<Incoming>,
    Response = Response<ProxyBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<ProxyBody>, Infallible>> + Send,
> + Clone
+ Send {
    ServiceBuilder::new()
        .layer(HeadLimitLayer {
            max: max_header_bytes,
        })
        .layer(BodyLimitLayer {
            max: max_body_bytes,
        })
        .service_fn(move |req: Request<ProxyBody>| {
            let proxy = proxy.clone();
            let client = client.clone();
            // Boxed once, here: the handler's future is large (every path of the proxy is in
            // it), and each layer above and hyper's dispatcher would otherwise copy it whole.
            let answer: Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send>> =
                Box::pin(proxy.handle(req, client));
            async move { Ok::<_, Infallible>(answer.await) }
        })
}

/// Refuse request heads over `max` bytes (431).
#[derive(Debug, Clone, Copy)]
pub struct HeadLimitLayer {
    /// The limit in bytes, counted as on the wire in HTTP/1.1.
    pub max: usize,
}

impl<S> Layer<S> for HeadLimitLayer {
    type Service = HeadLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HeadLimit {
            inner,
            max: self.max,
        }
    }
}

/// The service made by [`HeadLimitLayer`].
#[derive(Debug, Clone)]
pub struct HeadLimit<S> {
    inner: S,
    max: usize,
}

impl<S, B> Service<Request<B>> for HeadLimit<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>, Error = Infallible>,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    // The handler's future is boxed where it is made (see `proxy_service`): no box here.
    type Future = Either<Ready<Result<Response<ProxyBody>, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let size = head_size(&req);
        if size > self.max {
            let resp = json_response(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                &serde_json::json!({
                    "error": "headers_too_large",
                    "message": format!("request head larger than {} bytes", self.max),
                }),
            );
            let resp = with_cache_status(resp, status::BYPASS);
            return Either::Left(ready(Ok(resp)));
        }
        Either::Right(self.inner.call(req))
    }
}

/// Size of a request head as HTTP/1.1 would carry it: `METHOD URI HTTP/1.1\r\n` and
/// `name: value\r\n` per header.
fn head_size<B>(req: &Request<B>) -> usize {
    let line = req.method().as_str().len() + uri_len(req.uri()) + 11;
    req.headers().iter().fold(line, |n, (name, value)| {
        n + name.as_str().len() + value.len() + 4
    })
}

/// The length of `uri` as written out, counted without building the string.
fn uri_len(uri: &http::Uri) -> usize {
    // Origin form (`/path?query`), what nearly every request carries: its text is at hand.
    if uri.scheme().is_none()
        && uri.authority().is_none()
        && let Some(pq) = uri.path_and_query()
    {
        return pq.as_str().len();
    }
    struct Count(usize);
    impl std::fmt::Write for Count {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0 += s.len();
            Ok(())
        }
    }
    let mut count = Count(0);
    let _ = std::fmt::Write::write_fmt(&mut count, format_args!("{uri}"));
    count.0
}

/// Refuse bodies over `max` bytes (413), and cap streaming ones.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimitLayer {
    /// The limit in bytes.
    pub max: u64,
}

impl<S> Layer<S> for BodyLimitLayer {
    type Service = BodyLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BodyLimit {
            inner,
            max: self.max,
        }
    }
}

/// The service made by [`BodyLimitLayer`].
#[derive(Debug, Clone)]
pub struct BodyLimit<S> {
    inner: S,
    max: u64,
}

impl<S> Service<Request<Incoming>> for BodyLimit<S>
where
    S: Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = Infallible>,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    // The handler's future is boxed where it is made (see `proxy_service`): no box here.
    type Future = Either<Ready<Result<Response<ProxyBody>, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max) {
            let resp = ProxyError::BodyTooLarge { limit: self.max }.into_response();
            let resp = with_cache_status(resp, status::BYPASS);
            return Either::Left(ready(Ok(resp)));
        }
        let max = usize::try_from(self.max).unwrap_or(usize::MAX);
        let req = req.map(|b| Limited::new(b, max).boxed_unsync());
        Either::Right(self.inner.call(req))
    }
}
