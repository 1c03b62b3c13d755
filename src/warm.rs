//! Warm caches: `[[warm]]` entries are fetched through the proxy's own read path at start and
//! again every `interval` while the upstream is online, so that they are served offline
//! without the app ever having asked (issue #19 point 4).
//!
//! A warm fetch is an ordinary GET through [`Proxy::handle`]: the route's read strategy, the
//! cache rules and the identity of the entry's `headers` apply, and the answer is stored
//! under the same key an app's request with those headers gets. Its `Host` is the proxy's
//! listen address unless the entry's headers name one (the host is part of the cache key).

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use http::{Method, Request};
use http_body_util::BodyExt as _;

use crate::body;
use crate::config::WarmConfig;
use crate::context::ClientInfo;
use crate::health::Health;
use crate::proxy::Proxy;
use crate::shutdown::Shutdown;

/// Keep one `[[warm]]` entry fresh until shutdown.
pub async fn run(
    entry: WarmConfig,
    proxy: Arc<Proxy>,
    health: Arc<Health>,
    listen: SocketAddr,
    shutdown: Shutdown,
) {
    let mut first = true;
    loop {
        if first || health.is_online() {
            fetch(&entry, &proxy, listen).await;
        }
        first = false;
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tokio::time::sleep(entry.interval) => {}
        }
    }
}

/// One warm fetch; the answer's body is read to its end, which stores it.
async fn fetch(entry: &WarmConfig, proxy: &Arc<Proxy>, listen: SocketAddr) {
    let mut req = Request::new(body::empty());
    *req.method_mut() = Method::GET;
    match entry.path.parse() {
        Ok(uri) => *req.uri_mut() = uri,
        Err(e) => {
            tracing::warn!(path = %entry.path, "warm path is not a URI path: {e}");
            return;
        }
    }
    let headers = req.headers_mut();
    if let Ok(host) = HeaderValue::from_str(&listen.to_string()) {
        headers.insert(http::header::HOST, host);
    }
    for (name, value) in &entry.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(n, v);
        }
    }
    let client = ClientInfo::new(listen.ip(), "http");
    let resp = proxy.clone().handle(req, client).await;
    let status = resp.status();
    match resp.into_body().collect().await {
        Ok(_) => tracing::debug!(path = %entry.path, status = status.as_u16(), "warmed"),
        Err(e) => tracing::debug!(path = %entry.path, "warm fetch failed: {e}"),
    }
}
