//! The one place where the layers around the proxy handler are ordered.
//!
//! Outermost first:
//! 1. [`BodyLimitLayer`]: a declared body over `proxy.max_body_bytes` is a 413 before any work;
//!    an undeclared (chunked) one is cut off at the limit while it streams.
//! 2. The handler, [`Proxy::handle`] (routing, cache, outbox).
//!
//! Header limits (431) and the header read timeout are enforced by hyper in `server.rs`;
//! upstream timeouts by `proxy/forward.rs`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tower::{Layer, Service, ServiceBuilder};

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::proxy::Proxy;
use crate::proxy::forward::ClientInfo;

/// The service for one connection: the layers above, around the proxy.
pub fn proxy_service(
    proxy: Arc<Proxy>,
    client: ClientInfo,
    max_body_bytes: u64,
) -> impl Service<
    Request<Incoming>,
    Response = Response<ProxyBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<ProxyBody>, Infallible>> + Send,
> + Clone
+ Send {
    ServiceBuilder::new()
        .layer(BodyLimitLayer {
            max: max_body_bytes,
        })
        .service_fn(move |req: Request<ProxyBody>| {
            let proxy = proxy.clone();
            let client = client.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req, client).await) }
        })
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
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

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
            return Box::pin(async move { Ok(resp) });
        }
        let max = usize::try_from(self.max).unwrap_or(usize::MAX);
        let req = req.map(|b| Limited::new(b, max).boxed_unsync());
        Box::pin(self.inner.call(req))
    }
}
