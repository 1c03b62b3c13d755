//! Talking to the upstream: the pooled client, TLS, and turning an app's request into an
//! upstream request (and the upstream's answer back into a response for the app).
//!
//! Only the configured upstream is ever contacted: the request URI is rebuilt from the
//! upstream base URL and the request's path, whatever the app put in its request line.
//! Hop-by-hop headers (RFC 9110 §7.6.1, and any named in `Connection`) are removed both ways;
//! `X-Forwarded-For`, `-Proto` and `-Host` are added; `Host` becomes the upstream's.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

use crate::body::ProxyBody;

mod h1;
use crate::config::UpstreamConfig;
use crate::context::ClientInfo;
pub use h1::UpstreamBody;

/// `Idempotency-Key`.
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// `Idempotent-Replayed`.
pub static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Header pairs for storage.
pub fn header_pairs(headers: &HeaderMap) -> Vec<(String, Bytes)> {
    headers
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), Bytes::copy_from_slice(v.as_bytes())))
        .collect()
}

/// The upstream as replay and the probe see it: a request in, an answer head (body streaming)
/// or a [`ForwardError`] out.
pub type UpstreamService =
    BoxCloneSyncService<Request<ProxyBody>, Response<ProxyBody>, ForwardError>;

/// One call of an [`UpstreamService`], as a future that borrows nothing (a future borrowing
/// the service trips rustc's `Send` inference in spawned tasks).
pub fn call(
    service: &UpstreamService,
    req: Request<ProxyBody>,
) -> impl std::future::Future<Output = Result<Response<ProxyBody>, ForwardError>> + Send + 'static {
    service.clone().oneshot(req)
}

/// Why a request did not get an upstream answer. Each kind says whether the upstream may have
/// received the request ([`Self::may_have_been_sent`]): what decides between sending a
/// mutation again at once and treating it as ambiguous. The client's error is kept as the
/// source; log it with [`crate::error::report`] to see the whole chain.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No connection could be made: the request was certainly not sent.
    #[error("could not connect to the upstream")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// No answer within `upstream.request_timeout`: the request may have been applied.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection failed after the request was (maybe) sent.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

impl ForwardError {
    /// Whether the upstream may have received (and applied) the request.
    pub fn may_have_been_sent(&self) -> bool {
        !matches!(self, ForwardError::Connect(_))
    }

    /// Whether the app's own request body failed while it was being sent (cut off at
    /// `proxy.max_body_bytes`, or the app went away): no sign of an upstream outage.
    pub fn request_body_failed(&self) -> bool {
        matches!(self, ForwardError::Transport(t) if t.request_body.is_some())
    }

    /// Whether the app's request body was cut off at `proxy.max_body_bytes` (a 413).
    pub fn request_body_too_large(&self) -> bool {
        matches!(
            self,
            ForwardError::Transport(TransportError {
                request_body: Some(RequestBodyFault::TooLarge),
                ..
            })
        )
    }
}

/// A failure on an established upstream connection, and whether the app's body caused it.
#[derive(Debug, thiserror::Error)]
#[error("the upstream exchange broke")]
pub struct TransportError {
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
    request_body: Option<RequestBodyFault>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestBodyFault {
    TooLarge,
    Failed,
}

impl TransportError {
    fn of(e: Box<dyn std::error::Error + Send + Sync>) -> Self {
        let mut request_body = None;
        // The error itself (hyper's, from the lean client) and everything under it.
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e.as_ref());
        while let Some(inner) = source {
            if inner.is::<http_body_util::LengthLimitError>() {
                request_body = Some(RequestBodyFault::TooLarge);
                break;
            }
            // hyper's "user" errors are the request side's (its body stream), not the peer's.
            if let Some(h) = inner.downcast_ref::<hyper::Error>()
                && h.is_user()
            {
                request_body = Some(RequestBodyFault::Failed);
            }
            source = inner.source();
        }
        Self {
            source: e,
            request_body,
        }
    }
}

/// Why a stored mutation cannot be sent: it would not be the request the app made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnsendableRequest {
    /// The stored method is not an HTTP method (sending it as another would change it).
    #[error("the stored method {0:?} is not an HTTP method")]
    Method(String),
    /// The stored path is not a valid request target.
    #[error("the stored path {0:?} is not a valid request target")]
    Path(String),
    /// A stored header's name or value is not valid HTTP.
    #[error("the stored header {0:?} is not valid HTTP")]
    Header(String),
}

/// A failure to set up the upstream client (exit 2 or 1 at start).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `upstream.url` does not parse.
    #[error("upstream.url is not a URL")]
    BadUrl(#[source] http::uri::InvalidUri),
    /// `upstream.url` names no host.
    #[error("upstream.url has no host")]
    NoHost,
    /// The host is not a valid `Host` header value.
    #[error("upstream.url has a host that is not a valid Host header")]
    BadHost(#[source] http::header::InvalidHeaderValue),
    /// `upstream.ca_file` could not be read.
    #[error("upstream.ca_file {path}: cannot read")]
    CaFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `upstream.ca_file` holds a certificate that cannot be used.
    #[error("upstream.ca_file {path}: bad certificate")]
    CaCertificate {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// `upstream.ca_file` holds no PEM certificate.
    #[error("upstream.ca_file {0}: no PEM certificates found")]
    NoCertificates(std::path::PathBuf),
    /// rustls refused the TLS configuration.
    #[error("TLS configuration")]
    Tls(#[source] rustls::Error),
}

/// The upstream: base URL, pooled keep-alive client, timeouts.
///
/// Plain `http://` upstreams are spoken to with the lean HTTP/1.1 client of [`h1`] (hyper's
/// connection-level client and a pool of its own); `https://` ones (TLS, HTTP/2 by ALPN) with
/// hyper-util's pooled client.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, ProxyBody>,
    /// The lean HTTP/1.1 pool, for `http://` upstreams.
    h1: Option<Arc<h1::Pool>>,
    /// The connector (TLS config loaded once), for more pools of the same upstream.
    connector: HttpsConnector<HttpConnector>,
    pool_idle_timeout: Duration,
    pool_max_idle: usize,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    base_path: String,
    host: HeaderValue,
    request_timeout: Duration,
    connect_timeout: Duration,
}

impl Upstream {
    /// Build the client for `config` (TLS roots: webpki, the system's, and `ca_file`).
    pub fn new(config: &UpstreamConfig) -> Result<Self, SetupError> {
        let uri: Uri = config.url.parse().map_err(SetupError::BadUrl)?;
        let scheme = uri.scheme().cloned().unwrap_or(http::uri::Scheme::HTTP);
        let authority = uri.authority().cloned().ok_or(SetupError::NoHost)?;
        let base_path = uri.path().trim_end_matches('/').to_string();
        let host = HeaderValue::from_str(authority.as_str()).map_err(SetupError::BadHost)?;

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let tls = tls_config(config.ca_file.as_deref())?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let client = pool(&https, config.pool_idle_timeout, config.pool_max_idle);
        let mut upstream = Self {
            client,
            h1: None,
            connector: https,
            pool_idle_timeout: config.pool_idle_timeout,
            pool_max_idle: config.pool_max_idle,
            scheme,
            authority,
            base_path,
            host,
            request_timeout: config.request_timeout,
            connect_timeout: config.connect_timeout,
        };
        upstream.h1 = upstream.lean_pool();
        Ok(upstream)
    }

    /// The same upstream with a connection pool of its own (one per proxy thread), sharing
    /// the TLS configuration instead of loading the roots again.
    pub fn with_own_pool(&self) -> Self {
        Self {
            client: pool(&self.connector, self.pool_idle_timeout, self.pool_max_idle),
            h1: self.lean_pool(),
            ..self.clone()
        }
    }

    /// A new lean HTTP/1.1 pool when the upstream is plain `http://`.
    fn lean_pool(&self) -> Option<Arc<h1::Pool>> {
        (self.scheme == http::uri::Scheme::HTTP).then(|| {
            Arc::new(h1::Pool::new(
                self.authority.host(),
                self.port(),
                self.connect_timeout,
                self.request_timeout,
                self.pool_idle_timeout,
                self.pool_max_idle,
            ))
        })
    }

    /// The upstream's `host:port`, for TCP probes.
    pub fn authority(&self) -> &http::uri::Authority {
        &self.authority
    }

    /// Port of the upstream (explicit or the scheme's default).
    pub fn port(&self) -> u16 {
        self.authority
            .port_u16()
            .unwrap_or(if self.scheme == http::uri::Scheme::HTTPS {
                443
            } else {
                80
            })
    }

    /// The connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The upstream URI for an app's `path_and_query`.
    pub fn uri_for(&self, path_and_query: &str) -> Uri {
        let pq = if path_and_query.starts_with('/') {
            path_and_query
        } else {
            "/"
        };
        self.try_uri_for(pq)
            .unwrap_or_else(|_| Uri::from_static("/"))
    }

    /// The upstream URI for `path_and_query`, or why there is none.
    fn try_uri_for(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(format!("{}{}", self.base_path, path_and_query))
            .build()
    }

    /// Rebuild a stored mutation as an upstream request (headers as stored, `Host` set),
    /// with `extra` headers replacing stored ones of the same name. A record that cannot be
    /// rebuilt exactly (a method, path or header that is not valid HTTP: a damaged or
    /// hand-edited store) is an error, never a different request.
    pub fn request_from_stored(
        &self,
        stored: &crate::store::StoredRequest,
        extra: &[(HeaderName, HeaderValue)],
    ) -> Result<Request<ProxyBody>, UnsendableRequest> {
        let method = http::Method::from_bytes(stored.method.as_bytes())
            .map_err(|_| UnsendableRequest::Method(stored.method.clone()))?;
        let pq = &stored.path_and_query;
        let uri = pq
            .starts_with('/')
            .then(|| self.try_uri_for(pq).ok())
            .flatten()
            .ok_or_else(|| UnsendableRequest::Path(pq.clone()))?;
        let mut req = Request::new(crate::body::full(stored.body.clone()));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        let headers = req.headers_mut();
        for (name, value) in &stored.headers {
            let n = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| UnsendableRequest::Header(name.clone()))?;
            let v = HeaderValue::from_bytes(value)
                .map_err(|_| UnsendableRequest::Header(name.clone()))?;
            headers.append(n, v);
        }
        for (name, value) in extra {
            headers.insert(name.clone(), value.clone());
        }
        headers.remove(header::CONTENT_LENGTH);
        headers.insert(header::HOST, self.host.clone());
        Ok(req)
    }

    /// This upstream as a tower [`Service`](tower::Service) that sends prepared requests
    /// (see [`Self::send`]) and boxes the answer's body: what replay and the health probe use,
    /// so that their unit tests can stand a `tower::service_fn` in for the network.
    pub fn service(&self) -> UpstreamService {
        let upstream = self.clone();
        BoxCloneSyncService::new(tower::service_fn(move |req: Request<ProxyBody>| {
            let upstream = upstream.clone();
            async move {
                let resp = upstream.send(req).await?;
                Ok(resp.map(crate::body::boxed))
            }
        }))
    }

    /// Send a prepared request; the response head must arrive within the request timeout,
    /// counted once a connection is ready (a connect that stalls is a connect failure: the
    /// request certainly never left, and is not taken for one that may have been applied).
    /// hyper-util's client (TLS, HTTP/2) connects inside its request, so there the bound is
    /// the connect timeout and the request timeout together.
    ///
    /// The answer's version is the app connection's business, not the upstream's: it comes
    /// back as HTTP/1.1, so that an HTTP/1.0 upstream does not make hyper answer the app in
    /// HTTP/1.0 and close its keep-alive connection (an HTTP/1.0 app still gets HTTP/1.0).
    pub async fn send(
        &self,
        req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, ForwardError> {
        let answer = match &self.h1 {
            Some(pool) => pool.send(self.origin_form(req)).await,
            None => {
                let bound = self.connect_timeout.saturating_add(self.request_timeout);
                tokio::time::timeout(bound, self.send_legacy(req))
                    .await
                    .unwrap_or(Err(ForwardError::Timeout(self.request_timeout)))
            }
        };
        answer.map(|mut resp| {
            *resp.version_mut() = Version::HTTP_11;
            resp
        })
    }

    /// Send with hyper-util's pooled client (TLS, HTTP/2).
    async fn send_legacy(
        &self,
        req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, ForwardError> {
        match self.client.request(req).await {
            Ok(resp) => Ok(resp.map(UpstreamBody::unpooled)),
            Err(e) if e.is_connect() => Err(ForwardError::Connect(Box::new(e))),
            Err(e) => Err(ForwardError::Transport(TransportError::of(Box::new(e)))),
        }
    }

    /// The request as the lean client writes it: origin-form target, `Host` set (what
    /// hyper-util's client does by itself).
    fn origin_form(&self, mut req: Request<ProxyBody>) -> Request<ProxyBody> {
        if req.uri().scheme().is_some() || req.uri().authority().is_some() {
            let mut parts = http::uri::Parts::default();
            parts.path_and_query = Some(
                req.uri()
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
            );
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
        if !req.headers().contains_key(header::HOST) {
            req.headers_mut().insert(header::HOST, self.host.clone());
        }
        req
    }

    /// Turn the app's request head into the upstream's: URI, `Host`, hop-by-hop headers out,
    /// `X-Forwarded-*` in. `keep_upgrade` keeps `Upgrade`/`Connection: upgrade` (WebSocket).
    pub fn prepare(
        &self,
        parts: &mut http::request::Parts,
        client: &ClientInfo,
        keep_upgrade: bool,
    ) {
        // h2 requests have no `Host`: what the app asked for is the URI's `:authority`.
        let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
            let authority = parts.uri.authority()?;
            HeaderValue::from_str(authority.as_str()).ok()
        });
        parts.uri = match parts.uri.path_and_query() {
            // The common case reuses the request's path bytes instead of re-parsing them.
            Some(pq) if self.base_path.is_empty() => {
                let mut uri = http::uri::Parts::default();
                uri.scheme = Some(self.scheme.clone());
                uri.authority = Some(self.authority.clone());
                uri.path_and_query = Some(pq.clone());
                Uri::from_parts(uri).unwrap_or_else(|_| self.uri_for(pq.as_str()))
            }
            Some(pq) => self.uri_for(pq.as_str()),
            None => self.uri_for("/"),
        };
        // hyper picks HTTP/1.1 or h2 per connection (ALPN); an h2c request must not force h2.
        parts.version = Version::HTTP_11;
        let upgrade = keep_upgrade
            .then(|| parts.headers.get(header::UPGRADE).cloned())
            .flatten();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(upgrade) = upgrade {
            parts.headers.insert(header::UPGRADE, upgrade);
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        parts.headers.insert(header::HOST, self.host.clone());
        add_forwarded(&mut parts.headers, client, original_host);
    }
}

/// A keep-alive connection pool over `connector`.
fn pool(
    connector: &HttpsConnector<HttpConnector>,
    idle_timeout: Duration,
    max_idle: usize,
) -> Client<HttpsConnector<HttpConnector>, ProxyBody> {
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(idle_timeout)
        .pool_max_idle_per_host(max_idle)
        .build(connector.clone())
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

fn add_forwarded(headers: &mut HeaderMap, client: &ClientInfo, host: Option<HeaderValue>) {
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) => HeaderValue::from_str(&format!("{prev}, {}", client.ip)).ok(),
        None => Some(client.ip_header.clone()),
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(client.proto),
    );
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST.clone(), host);
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1, and the de-facto `Keep-Alive` and
/// `Proxy-Connection`), as names made once: removing by a `&str` would parse it every time.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Where `name` is in [`HOP_BY_HOP`]: a match on the name's text (a length switch, then one
/// comparison), where comparing it with each of the nine names cost ~100 instructions a name.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-authenticate" => 2,
        "proxy-authorization" => 3,
        "proxy-connection" => 4,
        "te" => 5,
        "trailer" => 6,
        "transfer-encoding" => 7,
        "upgrade" => 8,
        _ => return None,
    })
}

/// Whether a `Connection` token names a field that is not hop-by-hop anyway.
fn names_other_field(token: &str) -> bool {
    !HOP_BY_HOP
        .iter()
        .any(|h| token.eq_ignore_ascii_case(h.as_str()))
}

/// Remove hop-by-hop headers, including those named in `Connection`, and `Upgrade`.
///
/// Every request and answer passes here, so it looks first: one pass over the message's few
/// names marks the hop-by-hop ones present, and only those are removed (a removal is a hash
/// lookup; most messages carry none but `Connection`, whose usual `keep-alive` names no
/// other field).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        // Fields the `Connection` header names (RFC 9110 §7.6.1); the hop-by-hop names
        // among them (`keep-alive` mostly) are removed below anyway.
        let connection = headers.get_all(header::CONNECTION);
        let tokens = || {
            connection
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
        };
        if tokens().any(names_other_field) {
            let named: Vec<HeaderName> = tokens()
                .filter(|t| names_other_field(t))
                // Checked before a name is made: a name not in `http`'s table is an allocation.
                .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
                .collect();
            for name in named {
                headers.remove(name);
            }
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Whether the request asks for a protocol upgrade (e.g. WebSocket).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// The rustls client configuration outpost uses for `https://`: webpki and system roots, plus
/// the PEM certificates of `ca_file` when given.
pub(crate) fn tls_config(
    ca_file: Option<&std::path::Path>,
) -> Result<rustls::ClientConfig, SetupError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|source| SetupError::CaFile {
            path: path.to_owned(),
            source,
        })?;
        let bad = |source: Box<dyn std::error::Error + Send + Sync>| SetupError::CaCertificate {
            path: path.to_owned(),
            source,
        };
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| bad(Box::new(e)))?;
            roots.add(cert).map_err(|e| bad(Box::new(e)))?;
            added += 1;
        }
        if added == 0 {
            return Err(SetupError::NoCertificates(path.to_owned()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(SetupError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoredRequest;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed_and_nothing_else() {
        let mut h = HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("close, X-Conn-Opt"),
        );
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive,te"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("x-conn-opt", HeaderValue::from_static("1"));
        h.insert(
            "close",
            HeaderValue::from_static("a field named by a connection option"),
        );
        h.insert("x-end-to-end", HeaderValue::from_static("2"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "x-end-to-end"]);

        // The usual answer's `Connection: Keep-Alive` (any case) names no other field.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        assert_eq!(left, ["content-type"]);

        // The match finds every listed name at its place in the list, and nothing else.
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(i), "{name}");
        }
        assert_eq!(hop_by_hop_index(&header::CONTENT_TYPE), None);

        // Nothing hop-by-hop: untouched.
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=1"));
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }

    fn stored(method: &str, path: &str, headers: Vec<(String, bytes::Bytes)>) -> StoredRequest {
        StoredRequest {
            method: method.into(),
            path_and_query: path.into(),
            headers,
            body: bytes::Bytes::from_static(b"{}"),
        }
    }

    /// The request timeout starts once the connection is ready: a connect that stalls past it
    /// (SYNs dropped: the listener's accept queue is full) is a connect failure after the
    /// connect timeout, never a request that may have been applied.
    #[tokio::test]
    async fn a_stalled_connect_is_a_connect_error_not_a_request_timeout() {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .expect("socket");
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("addr");
        socket.bind(&any.into()).expect("bind");
        socket.listen(0).expect("listen");
        let listener: std::net::TcpListener = socket.into();
        let port = listener.local_addr().expect("addr").port();
        // Fill the accept queue (nothing accepts): later SYNs are dropped.
        let fillers: Vec<_> = (0..4)
            .map(|_| {
                tokio::spawn(tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio::net::TcpStream::connect(("127.0.0.1", port)),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let upstream = Upstream::new(&UpstreamConfig {
            url: format!("http://127.0.0.1:{port}"),
            connect_timeout: Duration::from_millis(600),
            request_timeout: Duration::from_millis(100),
            ..UpstreamConfig::default()
        })
        .expect("upstream");
        let req = upstream
            .request_from_stored(&stored("POST", "/orders", vec![]), &[])
            .expect("request");
        let started = std::time::Instant::now();
        let err = upstream.send(req).await.expect_err("never connected");
        assert!(
            matches!(err, ForwardError::Connect(_)),
            "a stalled connect is a connect failure: {err:?}"
        );
        assert!(!err.may_have_been_sent());
        assert!(
            started.elapsed() >= Duration::from_millis(500),
            "it waited for the connect timeout: {:?}",
            started.elapsed()
        );
        drop(listener);
        fillers.iter().for_each(|f| f.abort());
    }

    #[test]
    fn a_stored_request_is_rebuilt_exactly_or_not_at_all() {
        let upstream = Upstream::new(&UpstreamConfig::default()).expect("upstream");
        let ok = upstream
            .request_from_stored(
                &stored("PATCH", "/a?b=1", vec![("x-y".into(), "z".into())]),
                &[],
            )
            .expect("a valid record");
        assert_eq!(ok.method(), http::Method::PATCH);
        assert_eq!(ok.uri().to_string(), "http://127.0.0.1:3000/a?b=1");
        assert_eq!(ok.headers()["x-y"], "z");

        let bad_method = upstream.request_from_stored(&stored("PO ST", "/a", vec![]), &[]);
        assert_eq!(
            bad_method.err(),
            Some(UnsendableRequest::Method("PO ST".into())),
            "never sent as a POST"
        );
        let bad_path = upstream.request_from_stored(&stored("PUT", "a b", vec![]), &[]);
        assert_eq!(bad_path.err(), Some(UnsendableRequest::Path("a b".into())));
        let bad_header = upstream
            .request_from_stored(&stored("PUT", "/a", vec![("x".into(), "\n".into())]), &[]);
        assert_eq!(
            bad_header.err(),
            Some(UnsendableRequest::Header("x".into()))
        );
    }
}
