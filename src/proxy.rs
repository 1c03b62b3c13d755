//! The data path: request → route → read path or write path.
//!
//! [`Proxy::handle`] is the one entry point the server calls. It refuses what must not be
//! proxied (CONNECT, absolute-form requests for other hosts), removes dot-segments from the
//! path (refusing paths that climb above the root, see [`path`]) before anything looks at it,
//! answers the reserved prefix itself, builds the [`RequestContext`], and then:
//! - GET/HEAD → `Proxy::read`: per the route's [`ReadStrategy`], from the cache or upstream,
//!   storing what may be stored, and falling back to the cache when the upstream is unreachable;
//! - reads with a body → `Proxy::read` too, keyed by their body ([`crate::graphql`]): `QUERY`
//!   everywhere, and on `graphql = true` routes a POST whose GraphQL operation is a `query`
//!   (a `mutation`, or a body that is no GraphQL request, is a write; a `subscription`
//!   passes through);
//! - POST/PUT/PATCH/DELETE → [`crate::outbox::Outbox::write`];
//! - anything else (OPTIONS, upgrades) → forwarded as is.
//!
//! Every response leaves with a `Cache-Status` header.

pub mod path;

use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;

use crate::admin::stream;
use crate::body::{self, Collected, ProxyBody};
use crate::cache::{self, CACHE_STATUS, Cache, PrimaryKey, status, with_cache_status};
use crate::config::{Config, ReadStrategy};
use crate::context::ClientInfo;
use crate::context::{Identity, ReadBody, RequestContext, Source};
use crate::error::{ProxyError, json_response, report};
use crate::events::Events;
use crate::graphql::{self, OperationKind, QUERY_METHOD};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::mutations::MutationDocs;
use crate::outbox::Outbox;
use crate::overlay::{OUTPOST_PENDING, Overlaid, PendingWrite, PendingWrites, Target};
use crate::parts::Parts;
use crate::replay::classify;
use crate::route::RouteTable;
use crate::shutdown::Shutdown;
use crate::store::now_ms;
use crate::upstream::{self, ForwardError, Upstream, UpstreamBody};

/// The proxy: everything a request needs, shared by all connections.
pub struct Proxy {
    config: Arc<Config>,
    routes: Arc<RouteTable>,
    upstream: Upstream,
    health: Arc<Health>,
    cache: Arc<Cache>,
    outbox: Arc<Outbox>,
    docs: Arc<MutationDocs>,
    pending: PendingWrites,
    events: Events,
    shutdown: Shutdown,
    metrics: Arc<Metrics>,
    recorder: Option<Arc<crate::record::Recorder>>,
}

impl Proxy {
    /// The outbox this proxy writes through (shared by every proxy thread).
    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// A proxy over `parts` with its own `upstream` client (one connection pool per proxy
    /// thread), the shared `cache` and `outbox`.
    pub fn new(parts: &Parts, upstream: Upstream, cache: Arc<Cache>, outbox: Arc<Outbox>) -> Self {
        Self {
            config: parts.config.clone(),
            routes: parts.routes.clone(),
            upstream,
            health: parts.health.clone(),
            cache,
            outbox,
            docs: parts.docs.clone(),
            pending: PendingWrites::new(parts.store.clone(), parts.activity.clone()),
            events: parts.events.clone(),
            shutdown: Shutdown::new(),
            metrics: parts.metrics.clone(),
            recorder: parts.recorder.clone(),
        }
    }

    /// End the app-facing event streams when `shutdown` triggers (without it they end only
    /// when their client goes away).
    pub fn with_shutdown(mut self, shutdown: Shutdown) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// Answer one request from the app (recorded as a HAR entry when recording is on).
    pub async fn handle(
        self: Arc<Self>,
        req: Request<ProxyBody>,
        client: ClientInfo,
    ) -> Response<ProxyBody> {
        match self.recorder.clone() {
            None => self.answer(req, client).await.0,
            Some(recorder) => {
                let (req, pending) = recorder.begin(req);
                let (resp, source) = self.answer(req, client).await;
                recorder.finish(pending, resp, source)
            }
        }
    }

    /// Answer one request, and say where the answer came from.
    async fn answer(
        self: Arc<Self>,
        req: Request<ProxyBody>,
        client: ClientInfo,
    ) -> (Response<ProxyBody>, Source) {
        let started = Instant::now();
        if let Err(e) = self.check_target(&req) {
            return (
                with_cache_status(e.into_response(), status::BYPASS),
                Source::Outpost,
            );
        }
        let mut req = req;
        if let Err(e) = normalize_uri(req.uri_mut()) {
            return (
                with_cache_status(e.into_response(), status::BYPASS),
                Source::Outpost,
            );
        }
        let path_and_query = req
            .uri()
            .path_and_query()
            .map(|pq| pq.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        if req
            .uri()
            .path()
            .starts_with(&self.config.proxy.reserved_prefix)
        {
            if req.uri().path()[self.config.proxy.reserved_prefix.len()..] == *"events"
                && req.method() == Method::GET
            {
                return (self.app_events(&req), Source::Outpost);
            }
            let resp = self
                .docs
                .answer(req.method(), req.uri().path(), req.headers())
                .await;
            return (with_cache_status(resp, status::BYPASS), Source::Outpost);
        }
        let route = self.routes.resolve(req.method(), req.uri().path());
        let identity = if route.public {
            Identity::public()
        } else {
            Identity::from_headers(req.headers(), &route.identity_headers)
        };
        let host = requested_host(&req);
        self.outbox.offer_credentials(req.headers());
        let mut ctx = RequestContext {
            route,
            method: req.method().clone(),
            host,
            path_and_query,
            identity,
            client,
            idempotency_key: None,
            source: Source::Upstream,
            started,
            read_body: None,
        };
        let resp = match *req.method() {
            // A WebSocket handshake is a GET, but neither a read to cache nor one to answer
            // from the cache: it only works end to end.
            _ if upstream::is_upgrade(req.headers()) => {
                self.pass_through(&mut ctx, req, status::BYPASS).await
            }
            Method::GET | Method::HEAD => self.read(&mut ctx, req).await,
            // The other paths' futures are boxed: inline, the largest of them would set the
            // size of every request's future (and what each request copies and touches).
            Method::POST if ctx.route.graphql => Box::pin(self.graphql(&mut ctx, req)).await,
            Method::POST | Method::PUT | Method::PATCH | Method::DELETE => {
                Box::pin(self.outbox.write(&mut ctx, req)).await
            }
            _ if req.method().as_str() == QUERY_METHOD => {
                Box::pin(self.query_method(&mut ctx, req)).await
            }
            _ => self.pass_through(&mut ctx, req, status::BYPASS).await,
        };
        let resp = with_cache_status(resp, status::BYPASS);
        let elapsed = ctx.started.elapsed();
        let cacheable_read = (matches!(ctx.method, Method::GET | Method::HEAD)
            || ctx.read_body.is_some())
            && ctx.route.read != ReadStrategy::NetworkOnly;
        self.metrics.observe_request(
            &ctx.route.name,
            ctx.source,
            resp.status().as_u16(),
            elapsed,
            cacheable_read,
        );
        tracing::debug!(
            method = %ctx.method,
            path = %ctx.path_and_query,
            route = %ctx.route.name,
            status = resp.status().as_u16(),
            source = ctx.source.as_str(),
            key = ctx.idempotency_key.as_deref().unwrap_or(""),
            micros = elapsed.as_micros() as u64,
            "request"
        );
        (resp, ctx.source)
    }

    /// `GET /_outpost/events`: server-sent events of online/offline and of the caller's own
    /// mutations (queued, replay attempts, classified, dead-lettered, …); `Last-Event-ID`
    /// resumes as on the admin API.
    fn app_events(&self, req: &Request<ProxyBody>) -> Response<ProxyBody> {
        let after = stream::start_after(req.headers(), req.uri().query(), &self.events);
        let filter = self.docs.event_filter(req.headers());
        let resp = stream::filtered(
            self.events.clone(),
            after,
            self.config.admin.events_heartbeat,
            self.shutdown.clone(),
            Some(filter),
        );
        with_cache_status(resp, status::BYPASS)
    }

    /// Refuse CONNECT and absolute-form requests for hosts other than the upstream.
    fn check_target(&self, req: &Request<ProxyBody>) -> Result<(), ProxyError> {
        if req.method() == Method::CONNECT {
            return Err(ProxyError::Forbidden(
                "CONNECT is refused: outpost is not an open proxy".into(),
            ));
        }
        // In HTTP/2 the URI always carries :authority; only HTTP/1 absolute-form is a proxy
        // request.
        if req.version() < Version::HTTP_2
            && let Some(authority) = req.uri().authority()
            && authority != self.upstream.authority()
        {
            return Err(ProxyError::Forbidden(format!(
                "requests for {authority} are refused: outpost only proxies to its upstream"
            )));
        }
        Ok(())
    }

    /// A POST on a `graphql = true` route: its body decides. A GraphQL `query` is a read keyed
    /// by its normalised body; a `mutation`, or a body that is not a GraphQL request (or is too
    /// large to buffer, over `queue.max_body_bytes`), is a write; a `subscription` passes through.
    async fn graphql(
        &self,
        ctx: &mut RequestContext,
        req: Request<ProxyBody>,
    ) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        let bytes = match self.buffer_body(body).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(whole)) => {
                return self
                    .outbox
                    .write(ctx, Request::from_parts(parts, whole))
                    .await;
            }
            Err(e) => {
                ctx.source = Source::Outpost;
                return with_cache_status(e.into_response(), status::METHOD);
            }
        };
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let request = graphql::classify(content_type, &bytes);
        let req = Request::from_parts(parts, body::full(bytes.clone()));
        match request {
            Some(gq) if gq.kind == OperationKind::Query => {
                ctx.read_body = Some(ReadBody {
                    bytes,
                    digest: gq.digest(),
                });
                self.read(ctx, req).await
            }
            Some(gq) if gq.kind == OperationKind::Subscription => {
                self.pass_through(ctx, req, status::BYPASS).await
            }
            _ => self.outbox.write(ctx, req).await,
        }
    }

    /// A `QUERY` request: a read keyed by its body (never queued). A body too large to buffer
    /// (over `queue.max_body_bytes`) is forwarded uncached.
    async fn query_method(
        &self,
        ctx: &mut RequestContext,
        req: Request<ProxyBody>,
    ) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        let bytes = match self.buffer_body(body).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(whole)) => {
                let req = Request::from_parts(parts, whole);
                return self.pass_through(ctx, req, status::BYPASS).await;
            }
            Err(e) => {
                ctx.source = Source::Outpost;
                return with_cache_status(e.into_response(), status::BYPASS);
            }
        };
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        ctx.read_body = Some(ReadBody {
            digest: graphql::query_method_digest(content_type, &bytes),
            bytes: bytes.clone(),
        });
        self.read(ctx, Request::from_parts(parts, body::full(bytes)))
            .await
    }

    /// Buffer a request body up to `queue.max_body_bytes` (what outpost keeps of a request):
    /// the bytes, or over that limit the whole body again (read part and unread rest), or
    /// the body's own failure (over `proxy.max_body_bytes`: 413).
    async fn buffer_body(
        &self,
        body: ProxyBody,
    ) -> Result<Result<bytes::Bytes, ProxyBody>, ProxyError> {
        match body::collect_limited(body, self.config.queue.max_body_bytes).await {
            Ok(body::Collected::Whole(bytes)) => Ok(Ok(bytes)),
            Ok(body::Collected::TooLarge { prefix, rest }) => Ok(Err(body::chain(prefix, rest))),
            Err(e) => Err(crate::outbox::body_error(
                e,
                self.config.proxy.max_body_bytes,
            )),
        }
    }

    /// The read path (GET, HEAD, reads with a body), with the caller's pending writes applied
    /// on `overlay` routes. A HEAD with pending writes is answered as the GET would be (the
    /// overlaid status and headers, `Content-Length` of the overlaid body), without the body.
    async fn read(
        &self,
        ctx: &mut RequestContext,
        mut req: Request<ProxyBody>,
    ) -> Response<ProxyBody> {
        let pending = if ctx.read_body.is_none() {
            self.pending_for_read(ctx, req.headers()).await
        } else {
            None
        };
        let Some((target, writes)) = pending.filter(|(_, writes)| !writes.is_empty()) else {
            return self.read_through(ctx, req).await;
        };
        let head = ctx.method == Method::HEAD;
        if head {
            *req.method_mut() = Method::GET;
            ctx.method = Method::GET;
        }
        let resp = self.read_through(ctx, req).await;
        let resp = self.overlay(ctx, resp, &target, &writes).await;
        if !head {
            return resp;
        }
        ctx.method = Method::HEAD;
        let (mut parts, body) = resp.into_parts();
        if let Some(len) = body.size_hint().exact() {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        Response::from_parts(parts, body::empty())
    }

    /// The caller's pending writes this read should reflect (`overlay` routes only).
    async fn pending_for_read(
        &self,
        ctx: &RequestContext,
        headers: &HeaderMap,
    ) -> Option<(Target, Vec<PendingWrite>)> {
        let shape = ctx.route.overlay.as_ref()?;
        let target = shape.target(&ctx.path_and_query)?;
        let collection = shape.collection_path(&ctx.path_and_query, &target);
        // Mutations belong to the identity of `cache.identity_headers` (see `outbox`); only the
        // caller's own are overlaid, on public routes too (the resource is shared, a caller's
        // unsent writes are not: the upstream may still refuse them).
        let owner = self.docs.owner(headers);
        match self
            .pending
            .for_read(shape, &collection, Some(&owner))
            .await
        {
            Ok(writes) => {
                let writes = writes
                    .into_iter()
                    .filter(|w| shape.concerns(&target, w))
                    .collect();
                Some((target, writes))
            }
            Err(e) => {
                tracing::warn!(path = %ctx.path_and_query, "pending writes unavailable: {e}");
                None
            }
        }
    }

    /// Apply pending `writes` to a read's answer (JSON only; anything else passes unchanged,
    /// with `Outpost-Pending`).
    async fn overlay(
        &self,
        ctx: &mut RequestContext,
        resp: Response<ProxyBody>,
        target: &Target,
        writes: &[PendingWrite],
    ) -> Response<ProxyBody> {
        let Some(shape) = ctx.route.overlay.as_ref() else {
            return resp;
        };
        let pending = HeaderValue::from(writes.len());
        let (mut parts, body) = resp.into_parts();
        parts.headers.insert(OUTPOST_PENDING.clone(), pending);
        let is_json = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.to_ascii_lowercase().contains("json"));
        let encoded = parts.headers.contains_key(header::CONTENT_ENCODING);
        let absent = matches!(
            parts.status,
            StatusCode::NOT_FOUND | StatusCode::GATEWAY_TIMEOUT
        );
        let usable = parts.status.is_success() && is_json && !encoded;
        if !usable && !absent {
            return Response::from_parts(parts, body);
        }
        let bytes = match body::collect_limited(body, self.cache.max_entry_bytes()).await {
            Ok(body::Collected::Whole(bytes)) => bytes,
            Ok(body::Collected::TooLarge { prefix, rest }) => {
                return Response::from_parts(parts, body::chain(prefix, rest));
            }
            Err(e) => {
                tracing::debug!(path = %ctx.path_and_query, "answer failed under overlay: {e}");
                return Response::from_parts(parts, body::empty());
            }
        };
        let base = if usable {
            match serde_json::from_slice::<serde_json::Value>(&bytes) {
                Ok(v) => Some(v),
                Err(_) => return Response::from_parts(parts, body::full(bytes)),
            }
        } else {
            None
        };
        let offline = ctx.source == Source::Stale;
        let cache_status = if offline {
            status::HIT_OFFLINE
        } else if ctx.source == Source::Cache {
            status::HIT_OVERLAY
        } else {
            status::FWD_OVERLAY
        };
        let changed = match shape.apply(target, base, writes) {
            Overlaid::Unchanged => return Response::from_parts(parts, body::full(bytes)),
            Overlaid::Deleted => {
                let mut resp = json_response(
                    StatusCode::NOT_FOUND,
                    &serde_json::json!({"error": "not_found", "pending": "deleted"}),
                );
                resp.headers_mut()
                    .insert(OUTPOST_PENDING.clone(), HeaderValue::from(writes.len()));
                resp.headers_mut()
                    .insert(CACHE_STATUS.clone(), HeaderValue::from_static(cache_status));
                return resp;
            }
            Overlaid::Changed(v) => v,
        };
        if !usable {
            // Built from pending writes alone (say a PUT of an item never fetched).
            parts.status = StatusCode::OK;
            parts.headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        for stale in [header::CONTENT_LENGTH, header::ETAG, header::LAST_MODIFIED] {
            parts.headers.remove(stale);
        }
        parts
            .headers
            .insert(CACHE_STATUS.clone(), HeaderValue::from_static(cache_status));
        Response::from_parts(parts, body::full(bytes::Bytes::from(changed.to_string())))
    }

    /// The read path proper: cache and upstream per the route's read strategy.
    async fn read_through(
        &self,
        ctx: &mut RequestContext,
        req: Request<ProxyBody>,
    ) -> Response<ProxyBody> {
        let cacheable = self.cache.enabled()
            && ctx.route.read != ReadStrategy::NetworkOnly
            && !req.headers().contains_key(header::RANGE);
        if !cacheable {
            return self.pass_through(ctx, req, status::BYPASS).await;
        }
        let head_only = ctx.method == Method::HEAD;
        let mut primary =
            PrimaryKey::new(&ctx.method, &ctx.host, &ctx.path_and_query, &ctx.identity);
        if let Some(read_body) = &ctx.read_body {
            primary = primary.with_body(&read_body.digest);
        }
        let now = now_ms();
        match ctx.route.read {
            ReadStrategy::CacheFirst => {
                if let Some(hit) = self.cache.get(&primary, req.headers()).await
                    && hit.is_fresh(now)
                {
                    ctx.source = Source::Cache;
                    return hit.to_response(head_only, status::HIT);
                }
            }
            ReadStrategy::StaleWhileRevalidate => {
                if let Some(hit) = self.cache.get(&primary, req.headers()).await {
                    ctx.source = Source::Cache;
                    if hit.is_fresh(now) {
                        return hit.to_response(head_only, status::HIT);
                    }
                    if self.health.is_online() {
                        self.revalidate_in_background(ctx, primary, req.headers().clone());
                        return hit.to_response(head_only, status::HIT_STALE);
                    }
                    ctx.source = Source::Stale;
                    return hit.to_response(head_only, status::HIT_OFFLINE);
                }
            }
            ReadStrategy::NetworkFirst | ReadStrategy::NetworkOnly => {}
        }
        if !self.health.is_online() {
            return self.serve_offline(ctx, &primary, req.headers()).await;
        }
        if let Some(limit) = ctx.route.network_timeout
            && ctx.route.read == ReadStrategy::NetworkFirst
            && !head_only
            && let Some(hit) = self.cache.get(&primary, req.headers()).await
        {
            let request_headers = req.headers().clone();
            let answer = self.fetch_detached(ctx, primary, req);
            return match tokio::time::timeout(limit, answer).await {
                Ok(Ok(Ok(resp))) => {
                    ctx.source = Source::Upstream;
                    resp
                }
                Ok(Ok(Err(e))) if e.request_body_failed() => {
                    ctx.source = Source::Outpost;
                    self.request_body_error(&e).into_response()
                }
                Ok(_) => self.serve_offline(ctx, &primary, &request_headers).await,
                Err(_) => {
                    // The upstream is slow, not gone: the copy now, the answer for next time.
                    ctx.source = Source::Cache;
                    hit.to_response(false, status::HIT_NETWORK_TIMEOUT)
                }
            };
        }
        let request_headers = req.headers().clone();
        let copy = self
            .cache
            .find(&primary, &request_headers)
            .await
            .filter(|found| within_max_stale(&found.entry, ctx));
        match self.fetch(ctx, req, &request_headers).await {
            Ok(resp) => match copy {
                Some(copy) => {
                    self.answer_or_copy(ctx, primary, request_headers, resp, copy)
                        .await
                }
                None => self.store_while_streaming(ctx, primary, request_headers, resp),
            },
            Err(e) if e.request_body_failed() => {
                ctx.source = Source::Outpost;
                self.request_body_error(&e).into_response()
            }
            Err(e) => {
                tracing::debug!(path = %ctx.path_and_query, "upstream failed: {}", report(&e));
                self.serve_offline(ctx, &primary, &request_headers).await
            }
        }
    }

    /// The upstream's answer to a read that has a cached copy to fall back on. An answer that
    /// would be retryable for a write (5xx, 429, 408, 425 by the route's rules), or whose body
    /// breaks off or stalls, serves the copy instead (`detail=offline`): a read that is cached
    /// does not fail because the upstream does. So that a broken body can still fall back, the
    /// answer is taken whole (up to `cache.max_entry_bytes`, within `upstream.request_timeout`)
    /// before the app sees its head; a larger one streams as usual.
    async fn answer_or_copy(
        &self,
        ctx: &mut RequestContext,
        primary: PrimaryKey,
        request_headers: HeaderMap,
        resp: Response<UpstreamBody>,
        copy: cache::Found,
    ) -> Response<ProxyBody> {
        let head_only = ctx.method == Method::HEAD;
        let outcome =
            classify::classify(&ctx.route.classify, resp.status(), &HeaderMap::new(), b"");
        if matches!(outcome, classify::Outcome::Retryable { .. }) {
            tracing::debug!(path = %ctx.path_and_query, status = resp.status().as_u16(), "upstream answered a read with a retryable status; serving the cached copy");
            ctx.source = Source::Stale;
            return copy.entry.to_response(head_only, status::HIT_OFFLINE);
        }
        let (parts, incoming) = resp.into_parts();
        let (limit, deadline) = (
            self.cache.max_entry_bytes(),
            self.config.upstream.request_timeout,
        );
        let body = match body::collect_within(incoming, limit, deadline).await {
            Ok(Collected::Whole(bytes)) => {
                return self.store_whole(ctx, primary, &request_headers, parts, bytes, &copy);
            }
            Ok(Collected::TooLarge { prefix, rest }) => body::chain(prefix, rest),
            Err(e) => {
                tracing::debug!(path = %ctx.path_and_query, "a read's body broke off ({e}); serving the cached copy");
                self.health.report_body_failure(&e, None);
                ctx.source = Source::Stale;
                return copy.entry.to_response(head_only, status::HIT_OFFLINE);
            }
        };
        self.store_while_streaming(
            ctx,
            primary,
            request_headers,
            Response::from_parts(parts, body),
        )
    }

    /// Upstream unreachable: the cached copy if there is one (within max_stale), else 504.
    async fn serve_offline(
        &self,
        ctx: &mut RequestContext,
        primary: &PrimaryKey,
        request: &HeaderMap,
    ) -> Response<ProxyBody> {
        let head_only = ctx.method == Method::HEAD;
        if let Some(hit) = self.cache.get(primary, request).await
            && within_max_stale(&hit, ctx)
        {
            ctx.source = Source::Stale;
            return hit.to_response(head_only, status::HIT_OFFLINE);
        }
        ctx.source = Source::Outpost;
        with_cache_status(
            ProxyError::UpstreamUnreachable.into_response(),
            status::OFFLINE_MISS,
        )
    }

    /// Forward a read upstream, reporting health either way. A read is safe to repeat: after a
    /// reset (say, a keep-alive connection the upstream closed under it) one without a body,
    /// or with a buffered one, gets one more try on another connection before anything is
    /// concluded. `request_headers` are the app's (a copy the caller keeps anyway): the second
    /// try is built from them only when it is needed.
    async fn fetch(
        &self,
        ctx: &RequestContext,
        req: Request<ProxyBody>,
        request_headers: &HeaderMap,
    ) -> Result<Response<UpstreamBody>, ForwardError> {
        let (mut parts, body) = req.into_parts();
        let buffered = ctx.read_body.as_ref().map(|b| b.bytes.clone());
        let repeatable = buffered.is_some() || body.is_end_stream();
        self.upstream.prepare(&mut parts, &ctx.client, false);
        let mut result = self.upstream.send(Request::from_parts(parts, body)).await;
        if let Err(e @ ForwardError::Transport(_)) = &result
            && repeatable
            && !e.request_body_failed()
        {
            tracing::debug!(path = %ctx.path_and_query, "read reset ({}); trying once more", report(e));
            let mut again = Request::new(buffered.map_or_else(body::empty, body::full));
            *again.method_mut() = ctx.method.clone();
            *again.uri_mut() = self.upstream.uri_for(&ctx.path_and_query);
            *again.headers_mut() = request_headers.clone();
            let (mut parts, body) = again.into_parts();
            self.upstream.prepare(&mut parts, &ctx.client, false);
            result = self.upstream.send(Request::from_parts(parts, body)).await;
        }
        self.health.observe(&result);
        result
    }

    /// The app's own request body failed on the way upstream: its fault, not an outage.
    fn request_body_error(&self, e: &ForwardError) -> ProxyError {
        if e.request_body_too_large() {
            ProxyError::BodyTooLarge {
                limit: self.config.proxy.max_body_bytes,
            }
        } else {
            ProxyError::BadRequest(format!("the request body failed: {}", report(e)))
        }
    }

    /// Stream an upstream answer to the app, keeping a copy for the cache when it may be stored.
    fn store_while_streaming<B>(
        &self,
        ctx: &mut RequestContext,
        primary: PrimaryKey,
        request_headers: HeaderMap,
        resp: Response<B>,
    ) -> Response<ProxyBody>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
        B::Error: Into<body::BoxError>,
    {
        ctx.source = Source::Upstream;
        let (mut parts, incoming) = resp.into_parts();
        upstream::strip_hop_by_hop(&mut parts.headers);
        let size = incoming.size_hint().exact();
        let Some(terms) = self.storage_terms(ctx, &request_headers, &parts, size) else {
            parts
                .headers
                .insert(CACHE_STATUS.clone(), HeaderValue::from_static(status::MISS));
            return Response::from_parts(parts, body::boxed(incoming));
        };
        let cache = self.cache.clone();
        let status = parts.status.as_u16();
        let headers = parts.headers.clone();
        let max_stale = ctx.route.max_stale;
        let body = body::tee(incoming, self.cache.max_entry_bytes(), move |bytes| {
            cache.put(
                primary,
                &request_headers,
                status,
                &headers,
                bytes,
                terms,
                max_stale,
                None,
            );
        });
        parts.headers.insert(
            CACHE_STATUS.clone(),
            HeaderValue::from_static(status::STORED),
        );
        Response::from_parts(parts, body)
    }

    /// Whether an upstream answer to a read may be stored, and its terms: not for HEAD, not
    /// over the cache's entry limit (`size`, when known), else by the caching rules.
    fn storage_terms(
        &self,
        ctx: &RequestContext,
        request_headers: &HeaderMap,
        parts: &http::response::Parts,
        size: Option<u64>,
    ) -> Option<cache::Storable> {
        if ctx.method == Method::HEAD || size.is_some_and(|n| n > self.cache.max_entry_bytes()) {
            return None;
        }
        cache::storable(
            request_headers,
            parts.status,
            &parts.headers,
            cache::Audience::of(ctx.route.public, &ctx.identity),
            ctx.route.cache_ttl,
        )
    }

    /// [`Self::store_while_streaming`] for an answer already taken whole: stored at once,
    /// without a copy of its headers or a body wrapper.
    fn store_whole(
        &self,
        ctx: &mut RequestContext,
        primary: PrimaryKey,
        request_headers: &HeaderMap,
        mut parts: http::response::Parts,
        bytes: bytes::Bytes,
        found: &cache::Found,
    ) -> Response<ProxyBody> {
        ctx.source = Source::Upstream;
        upstream::strip_hop_by_hop(&mut parts.headers);
        let terms = self.storage_terms(ctx, request_headers, &parts, Some(bytes.len() as u64));
        let cache_status = match terms {
            Some(terms) => {
                self.cache.put(
                    primary,
                    request_headers,
                    parts.status.as_u16(),
                    &parts.headers,
                    bytes.clone(),
                    terms,
                    ctx.route.max_stale,
                    Some(found),
                );
                status::STORED
            }
            None => status::MISS,
        };
        parts
            .headers
            .insert(CACHE_STATUS.clone(), HeaderValue::from_static(cache_status));
        Response::from_parts(parts, body::full(bytes))
    }

    /// Fetch a read in a task of its own that stores the answer when it may be stored, whether
    /// or not anyone still waits for it (`network_timeout`: the late answer refreshes the
    /// cache). The answer comes whole (up to the cache's entry limit) through the channel.
    fn fetch_detached(
        &self,
        ctx: &RequestContext,
        primary: PrimaryKey,
        req: Request<ProxyBody>,
    ) -> tokio::sync::oneshot::Receiver<Result<Response<ProxyBody>, ForwardError>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let request_headers = req.headers().clone();
        let (mut parts, b) = req.into_parts();
        self.upstream.prepare(&mut parts, &ctx.client, false);
        let req = Request::from_parts(parts, b);
        let upstream = self.upstream.clone();
        let health = self.health.clone();
        let cache = self.cache.clone();
        let audience = cache::Audience::of(ctx.route.public, &ctx.identity);
        let ttl = ctx.route.cache_ttl;
        let max_stale = ctx.route.max_stale;
        tokio::spawn(async move {
            let result = upstream.send(req).await;
            health.observe(&result);
            let resp = match result {
                Ok(resp) => resp,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let (mut parts, incoming) = resp.into_parts();
            upstream::strip_hop_by_hop(&mut parts.headers);
            let terms = cache::storable(
                &request_headers,
                parts.status,
                &parts.headers,
                audience,
                ttl,
            );
            let (body, cache_status) =
                match body::collect_limited(incoming, cache.max_entry_bytes()).await {
                    Ok(body::Collected::Whole(bytes)) => match terms {
                        Some(terms) => {
                            cache.put(
                                primary,
                                &request_headers,
                                parts.status.as_u16(),
                                &parts.headers,
                                bytes.clone(),
                                terms,
                                max_stale,
                                None,
                            );
                            (body::full(bytes), status::STORED)
                        }
                        None => (body::full(bytes), status::MISS),
                    },
                    Ok(body::Collected::TooLarge { prefix, rest }) => {
                        (body::chain(prefix, rest), status::MISS)
                    }
                    // The answer broke: whoever waits serves the cached copy.
                    Err(_) => return,
                };
            parts
                .headers
                .insert(CACHE_STATUS.clone(), HeaderValue::from_static(cache_status));
            let _ = tx.send(Ok(Response::from_parts(parts, body)));
        });
        rx
    }

    /// Stale-while-revalidate: refresh the entry without making the app wait.
    fn revalidate_in_background(
        &self,
        ctx: &RequestContext,
        primary: PrimaryKey,
        headers: HeaderMap,
    ) {
        let mut req = Request::new(
            ctx.read_body
                .as_ref()
                .map_or_else(body::empty, |b| body::full(b.bytes.clone())),
        );
        *req.method_mut() = ctx.method.clone();
        *req.uri_mut() = self.upstream.uri_for(&ctx.path_and_query);
        *req.headers_mut() = headers;
        // Nobody waits for the answer: the detached fetch stores it when it may be stored.
        drop(self.fetch_detached(ctx, primary, req));
    }

    /// Forward without caching or queueing (OPTIONS, network-only, Range, upgrades).
    async fn pass_through(
        &self,
        ctx: &mut RequestContext,
        mut req: Request<ProxyBody>,
        cache_status: &'static str,
    ) -> Response<ProxyBody> {
        let upgrade = upstream::is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        self.upstream.prepare(&mut parts, &ctx.client, upgrade);
        let result = self.upstream.send(Request::from_parts(parts, body)).await;
        self.health.observe(&result);
        let resp = match result {
            Ok(resp) => resp,
            Err(e) if e.request_body_failed() => {
                ctx.source = Source::Outpost;
                return self.request_body_error(&e).into_response();
            }
            Err(e) => {
                ctx.source = Source::Outpost;
                let err = match e {
                    ForwardError::Timeout(_) => ProxyError::GatewayTimeout,
                    _ => ProxyError::UpstreamUnreachable,
                };
                return with_cache_status(err.into_response(), status::OFFLINE_MISS);
            }
        };
        ctx.source = Source::Upstream;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            return splice_upgrade(resp, client_upgrade);
        }
        let (mut parts, incoming) = resp.into_parts();
        upstream::strip_hop_by_hop(&mut parts.headers);
        parts
            .headers
            .insert(CACHE_STATUS.clone(), HeaderValue::from_static(cache_status));
        Response::from_parts(parts, body::boxed(incoming))
    }
}

/// Whether a cached copy may still be served when the upstream fails: at most the route's
/// `max_stale` past its freshness.
fn within_max_stale(hit: &cache::CachedResponse, ctx: &RequestContext) -> bool {
    now_ms().saturating_sub(hit.fresh_until()) <= ctx.route.max_stale.as_millis() as u64
}

/// Remove dot-segments from the request's path in place (the query is kept as it is).
fn normalize_uri(uri: &mut http::Uri) -> Result<(), ProxyError> {
    let refused = |e: path::PathError| ProxyError::BadRequest(e.to_string());
    let normalized = match path::normalize(uri.path()).map_err(refused)? {
        std::borrow::Cow::Borrowed(_) => return Ok(()),
        std::borrow::Cow::Owned(p) => p,
    };
    let pq = match uri.query() {
        Some(q) => format!("{normalized}?{q}"),
        None => normalized,
    };
    // A normalised path is made of the request's own (valid) bytes, so this does not fail;
    // if it ever did, the request is refused rather than forwarded un-normalised.
    let unusable = |e: &dyn std::fmt::Display| ProxyError::BadRequest(format!("bad path: {e}"));
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(http::uri::PathAndQuery::try_from(pq).map_err(|e| unusable(&e))?);
    *uri = http::Uri::from_parts(parts).map_err(|e| unusable(&e))?;
    Ok(())
}

/// The host the app asked for: `Host`, else the URI's authority (HTTP/2), lower-case.
fn requested_host<B>(req: &Request<B>) -> String {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("");
    host.to_ascii_lowercase()
}

/// Answer 101 to the app and join the two upgraded connections.
fn splice_upgrade(
    mut upstream_resp: Response<UpstreamBody>,
    client_upgrade: hyper::upgrade::OnUpgrade,
) -> Response<ProxyBody> {
    let upstream_upgrade = hyper::upgrade::on(&mut upstream_resp);
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!("upgrade failed: {e}");
                return;
            }
        };
        let mut client = hyper_util::rt::TokioIo::new(client);
        let mut upstream = hyper_util::rt::TokioIo::new(upstream);
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            tracing::debug!("upgraded connection ended: {e}");
        }
    });
    let (parts, _) = upstream_resp.into_parts();
    let mut resp = Response::from_parts(parts, body::empty());
    resp.headers_mut().insert(
        CACHE_STATUS.clone(),
        HeaderValue::from_static(status::BYPASS),
    );
    resp
}
