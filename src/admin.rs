//! The admin listener: what operators and orchestrators need to see and act on.
//!
//! - `GET /status`: online state, queue depth, oldest queued age, dead letters, cache entries
//!   and bytes, connection counters.
//! - `GET /healthz` (alive: answers while the process serves) and `GET /readyz` (listeners
//!   serving and the store taking writes; an upstream outage is not "unready"): no token
//!   needed.
//! - `GET /events`: the event stream as server-sent events with ids, `Last-Event-ID` resumes
//!   ([`stream`]). `GET /metrics`: Prometheus text ([`crate::metrics`]).
//! - `GET /`: the status page ([`page`]).
//! - `GET /queue` and `GET /dead-letters` (`?limit=N`, default 100): status documents;
//!   `GET /mutations/{key}`: the status document of any key.
//! - `POST /queue/{key}/retry` (send a waiting item now, e.g. one held after a 401, with the
//!   credentials it carries), `DELETE /queue/{key}` (drop it).
//! - `POST /dead-letters/{key}/retry` (back to the tail of its partition; with a JSON body
//!   `{"body": …, "headers": {…}}`, edited first: [`edit`]), `DELETE /dead-letters/{key}`.
//! - `POST /sync/pause`, `POST /sync/resume`.
//!
//! **Access** ([`Access`]), checked before anything else, in this order:
//! - `Host` must name this listener: its IP address (any IP when bound to `0.0.0.0`/`::`, any
//!   loopback IP when bound to loopback), `localhost` (when bound to loopback or to all
//!   addresses), or a name in `admin.allowed_hosts`; the port is not compared (port forwarding
//!   changes it). A page whose DNS name was rebound to this address sends its own name: 403.
//! - A state-changing request (anything but GET, HEAD and OPTIONS) with an `Origin` that does
//!   not name this listener by the same rule (or `Origin: null`) is refused: 403. Browsers
//!   send `Origin` with every cross-origin POST, including "simple" `text/plain` ones that
//!   need no preflight; tools (curl, the `outpost queue` CLI) send none.
//! - With `admin.token` set, every request needs `Authorization: Bearer <token>`: 401 otherwise.
//!   Except `GET /healthz`, `GET /readyz` and the status page's own files (no data in them; the
//!   page then asks for the token). A token is never taken from a URL.
//!   The SHA-256 digests of the given and the configured token are compared in constant time
//!   (`subtle`), so neither the token's content nor its length shows in the timing.
//!
//! The listener has its own connection budget (`admin.max_connections`) and the same guard as
//! the proxy (strict framing, header-read timeout), so a flood on the proxy port does not
//! reach it. An event stream holds its connection (and a slot of that budget) until the client
//! leaves or outpost shuts down, when every stream ends.

pub mod client;
pub mod edit;
pub mod page;
pub mod stream;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

use crate::activity::Activity;
use crate::body::ProxyBody;
use crate::cache::Cache;
use crate::error::json_response;
use crate::events::{Event, Events};
use crate::health::Health;
use crate::metrics::{Metrics, Snapshot};
use crate::mutations::MutationDocs;
use crate::replay::Replayer;
use crate::server::{self, ConnectionOptions, Connections};
use crate::shutdown::Shutdown;
use crate::store::{Store, now_ms};

/// What the admin API reads.
#[derive(Clone)]
pub struct AdminState {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Upstream health.
    pub health: Arc<Health>,
    /// The read cache.
    pub cache: Arc<Cache>,
    /// The replay engine.
    pub replayer: Arc<Replayer>,
    /// Mutation status documents.
    pub docs: Arc<MutationDocs>,
    /// Replay wake-ups.
    pub activity: Arc<Activity>,
    /// The event stream.
    pub events: Events,
    /// Who may use the admin API.
    pub access: Access,
    /// The proxy listener's connection budget (for `/status`).
    pub proxy_connections: Arc<Connections>,
    /// The admin listener's own connection budget.
    pub admin_connections: Arc<Connections>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// The HAR recorder, if recording (for `/status` `record_dropped`).
    pub recorder: Option<Arc<crate::record::Recorder>>,
    /// How often `/events` sends a keep-alive comment (`admin.events_heartbeat`).
    pub events_heartbeat: Duration,
    /// Largest edit accepted with a dead letter's retry (`queue.max_body_bytes` plus room for
    /// headers and JSON escaping).
    pub max_body_bytes: u64,
    /// Ends the event streams, and makes `/readyz` answer 503.
    pub shutdown: Shutdown,
}

/// Who may use the admin API (see the module docs).
#[derive(Debug, Clone)]
pub struct Access {
    listen: SocketAddr,
    allowed_hosts: Vec<String>,
    token_digest: Option<[u8; 32]>,
}

/// Why a request was refused by [`Access::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// `Host` does not name this listener (DNS rebinding).
    #[error("the Host header does not name this admin listener")]
    ForeignHost,
    /// A state-changing request from a page of another origin.
    #[error("state-changing requests from another origin are refused")]
    ForeignOrigin,
    /// Missing or wrong bearer token.
    #[error("a valid bearer token is required")]
    Unauthorized,
}

impl Refused {
    fn into_response(self) -> Response<ProxyBody> {
        let (status, code) = match self {
            Refused::ForeignHost => (StatusCode::FORBIDDEN, "forbidden_host"),
            Refused::ForeignOrigin => (StatusCode::FORBIDDEN, "forbidden_origin"),
            Refused::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
        };
        json_response(
            status,
            &serde_json::json!({"error": code, "message": self.to_string()}),
        )
    }
}

impl Access {
    /// The rules for a listener bound to `listen` (its real address: port 0 resolved), with
    /// extra `allowed_hosts` names and an optional bearer `token`.
    pub fn new(listen: SocketAddr, allowed_hosts: &[String], token: Option<&str>) -> Self {
        Self {
            listen,
            allowed_hosts: allowed_hosts
                .iter()
                .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
            token_digest: token.map(|t| Sha256::digest(t.as_bytes()).into()),
        }
    }

    /// Check a request's `Host`, `Origin` and token.
    pub fn check(
        &self,
        method: &Method,
        uri: &http::Uri,
        headers: &HeaderMap,
    ) -> Result<(), Refused> {
        self.check_without_token(method, uri, headers)?;
        self.check_token(headers)
    }

    /// Check a request's `Host` and `Origin` only: for what needs no token (the status page's
    /// files, `/healthz`, `/readyz`).
    pub fn check_without_token(
        &self,
        method: &Method,
        uri: &http::Uri,
        headers: &HeaderMap,
    ) -> Result<(), Refused> {
        let host = headers
            .get(header::HOST)
            .map(|v| v.to_str().unwrap_or("\0"))
            .or_else(|| uri.authority().map(|a| a.as_str()));
        if let Some(host) = host
            && !self.names_me(host)
        {
            return Err(Refused::ForeignHost);
        }
        let safe = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
        if !safe && let Some(origin) = headers.get(header::ORIGIN) {
            let authority = origin.to_str().ok().and_then(|o| {
                o.strip_prefix("http://")
                    .or_else(|| o.strip_prefix("https://"))
            });
            if !authority.is_some_and(|a| !a.contains('/') && self.names_me(a)) {
                return Err(Refused::ForeignOrigin);
            }
        }
        Ok(())
    }

    /// Check the bearer token, when one is configured.
    pub fn check_token(&self, headers: &HeaderMap) -> Result<(), Refused> {
        if let Some(expected) = &self.token_digest {
            let given = headers
                .get(header::AUTHORIZATION)
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            let token = match given.get(..7) {
                Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => &given[7..],
                _ => given,
            };
            let digest: [u8; 32] = Sha256::digest(token).into();
            let matches: bool = digest.ct_eq(expected).into();
            let bearer = given.len() >= 7 && given[..7].eq_ignore_ascii_case(b"bearer ");
            if !(matches && bearer) {
                return Err(Refused::Unauthorized);
            }
        }
        Ok(())
    }

    /// Whether `authority` (`host[:port]`) names this listener.
    fn names_me(&self, authority: &str) -> bool {
        let host = match authority.strip_prefix('[') {
            Some(rest) => match rest.split_once(']') {
                Some((ip, _)) => ip,
                None => return false,
            },
            None => match authority.rsplit_once(':') {
                Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
                _ => authority,
            },
        };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let bound = self.listen.ip();
        if let Ok(ip) = host.parse::<IpAddr>() {
            return ip == bound
                || bound.is_unspecified()
                || (bound.is_loopback() && ip.is_loopback());
        }
        if host == "localhost" {
            return bound.is_loopback() || bound.is_unspecified();
        }
        self.allowed_hosts.contains(&host)
    }
}

/// Serve the admin API until shutdown, within `state.admin_connections`.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    header_read_timeout: Duration,
    shutdown: Shutdown,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout + Duration::from_secs(1));
    let options = ConnectionOptions {
        guard: server::guard::GuardOptions {
            header_read_timeout,
            head_limit: 16 * 1024,
        },
        shutdown_grace: Duration::from_secs(1),
    };
    let connections = state.admin_connections.clone();
    let state = Arc::new(state);
    let _grace_end = server::accept_loop(
        listener,
        None,
        Arc::new(builder),
        connections,
        options,
        shutdown,
        move |_peer| {
            let state = state.clone();
            hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            })
        },
    )
    .await;
}

async fn handle(state: &AdminState, req: Request<Incoming>) -> Response<ProxyBody> {
    let path = req.uri().path();
    // Probes and the status page's own files need no token (the page asks for it).
    let open = *req.method() == Method::GET
        && (matches!(path, "/healthz" | "/readyz") || page::asset(path).is_some());
    let checked = if open {
        state
            .access
            .check_without_token(req.method(), req.uri(), req.headers())
    } else {
        state.access.check(req.method(), req.uri(), req.headers())
    };
    if let Err(refused) = checked {
        return refused.into_response();
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => {
            json_response(StatusCode::OK, &serde_json::json!({"ok": true}))
        }
        (&Method::GET, "/readyz") => readiness(state).await,
        (&Method::GET, "/events") => {
            let after = stream::start_after(req.headers(), req.uri().query(), &state.events);
            stream::response(
                state.events.clone(),
                after,
                state.events_heartbeat,
                state.shutdown.clone(),
            )
        }
        (&Method::GET, "/metrics") => metrics(state).await,
        (&Method::GET, "/status") => status(state).await,
        (&Method::POST, "/sync/pause") => {
            if !state.replayer.is_paused() {
                state.replayer.pause();
                state.events.emit(Event::Paused);
            }
            json_response(StatusCode::OK, &serde_json::json!({"paused": true}))
        }
        (&Method::POST, "/sync/resume") => {
            if state.replayer.is_paused() {
                state.replayer.resume();
                state.events.emit(Event::Resumed);
            }
            json_response(StatusCode::OK, &serde_json::json!({"paused": false}))
        }
        (&Method::GET, "/queue") => list_queue(state, limit(req.uri())).await,
        (&Method::GET, "/dead-letters") => match state.store.dead_letters(limit(req.uri())).await {
            Ok(items) => json_response(
                StatusCode::OK,
                &serde_json::json!({
                    "items": items.iter().map(|r| state.docs.document(r)).collect::<Vec<_>>()
                }),
            ),
            Err(e) => store_unavailable(&e),
        },
        (&Method::GET, path) if path.starts_with("/mutations/") => {
            let key = decode_key(&path["/mutations/".len()..]);
            match state.store.mutation(&key).await {
                Ok(Some(record)) => json_response(StatusCode::OK, &state.docs.document(&record)),
                Ok(None) => not_found(),
                Err(e) => store_unavailable(&e),
            }
        }
        (&Method::GET, path) => match page::asset(path) {
            Some(resp) => resp,
            None => not_found(),
        },
        _ => act_on_item(state, req).await,
    }
}

/// `GET /status`.
async fn status(state: &AdminState) -> Response<ProxyBody> {
    match state.store.stats().await {
        Ok(stats) => {
            let (mem_entries, mem_bytes) = state.cache.memory_usage();
            let proxy = state.proxy_connections.stats();
            let admin = state.admin_connections.stats();
            json_response(
                StatusCode::OK,
                &serde_json::json!({
                    "online": state.health.is_online(),
                    "paused": state.replayer.is_paused(),
                    "queue_depth": stats.queue_depth,
                    "oldest_queued_age_ms": stats.oldest_pending_ms.map(|t| now_ms().saturating_sub(t)),
                    "dead_letters": stats.dead_letters,
                    "cache_entries": stats.cache_entries,
                    "cache_bytes": stats.cache_bytes,
                    "cache_memory_entries": mem_entries,
                    "cache_memory_bytes": mem_bytes,
                    "connections_open": proxy.open,
                    "connections_limit": proxy.limit,
                    "connections_refused": proxy.refused,
                    "connections_evicted": proxy.evicted,
                    "header_timeouts": proxy.header_timeouts,
                    "framing_refusals": proxy.framing_refusals,
                    "admin_connections": admin,
                    "last_event_id": state.events.newest_id(),
                    "store_servers": state.store.servers(),
                    "record_dropped": state.recorder.as_ref().map_or(0, |r| r.dropped()),
                }),
            )
        }
        Err(e) => store_unavailable(&e),
    }
}

/// `GET /readyz`: ready while the listeners serve (not shutting down) and the store takes
/// writes; an unreachable upstream is not a reason (that is what outpost is for).
async fn readiness(state: &AdminState) -> Response<ProxyBody> {
    let listening = !state.shutdown.is_triggered();
    let writable = state.store.writable();
    // One cheap read (a counter lookup, or one Redis round trip) shows the store answers.
    let reachable = matches!(
        tokio::time::timeout(
            Duration::from_secs(2),
            state.store.partition_has_pending("")
        )
        .await,
        Ok(Ok(_))
    );
    let ready = listening && writable && reachable;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(
        status,
        &serde_json::json!({
            "ready": ready,
            "listening": listening,
            "store_writable": writable,
            "store_reachable": reachable,
            "upstream_online": state.health.is_online(),
            "store_servers": state.store.servers(),
        }),
    )
}

/// `GET /metrics`: the gauges are read now, then everything is rendered.
async fn metrics(state: &AdminState) -> Response<ProxyBody> {
    let store = state.store.stats().await.ok();
    let mut depths = state.store.partition_depths().await.unwrap_or_default();
    depths.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut partitions = Vec::with_capacity(depths.len());
    for (i, (partition, depth)) in depths.into_iter().enumerate() {
        // The head's age only for the partitions that get a label of their own.
        let oldest = if i < crate::metrics::PARTITION_LABELS {
            match state.store.peek(&partition, 1).await {
                Ok(head) => head.first().map(|r| r.accepted_at_ms),
                Err(_) => None,
            }
        } else {
            None
        };
        partitions.push((partition, depth, oldest));
    }
    let snapshot = Snapshot {
        online: state.health.is_online(),
        paused: state.replayer.is_paused(),
        store,
        partitions,
        cache_memory: state.cache.memory_usage(),
        connections: vec![
            ("proxy", state.proxy_connections.stats()),
            ("admin", state.admin_connections.stats()),
        ],
        store_writable: state.store.writable(),
        store_failovers: state.store.failovers(),
    };
    let text = state.metrics.render(&snapshot);
    let mut resp = Response::new(crate::body::full(text));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

fn not_found() -> Response<ProxyBody> {
    json_response(
        StatusCode::NOT_FOUND,
        &serde_json::json!({"error": "not_found"}),
    )
}

fn decode_key(encoded: &str) -> String {
    percent_encoding::percent_decode_str(encoded)
        .decode_utf8_lossy()
        .into_owned()
}

fn limit(uri: &http::Uri) -> usize {
    uri.query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("limit=")?.parse().ok())
        .unwrap_or(100)
}

fn store_unavailable(e: &crate::error::StoreError) -> Response<ProxyBody> {
    json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        &serde_json::json!({"error": "store_unavailable", "message": e.to_string()}),
    )
}

/// Pending items of every partition, oldest first per partition.
async fn list_queue(state: &AdminState, limit: usize) -> Response<ProxyBody> {
    let partitions = match state.store.pending_partitions().await {
        Ok(p) => p,
        Err(e) => return store_unavailable(&e),
    };
    let mut items = Vec::new();
    for p in partitions {
        if items.len() >= limit {
            break;
        }
        match state.store.peek(&p, limit - items.len()).await {
            Ok(records) => items.extend(records.iter().map(|r| state.docs.document(r))),
            Err(e) => return store_unavailable(&e),
        }
    }
    json_response(StatusCode::OK, &serde_json::json!({ "items": items }))
}

/// `POST /queue/{key}/retry`, `DELETE /queue/{key}`, and the same under `/dead-letters/`
/// (whose retry may carry an edit).
async fn act_on_item(state: &AdminState, req: Request<Incoming>) -> Response<ProxyBody> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let (list, rest) = if let Some(rest) = path.strip_prefix("/queue/") {
        ("queue", rest)
    } else if let Some(rest) = path.strip_prefix("/dead-letters/") {
        ("dead-letters", rest)
    } else {
        return not_found();
    };
    let (encoded, retry) = match rest.strip_suffix("/retry") {
        Some(key) => (key, true),
        None => (rest, false),
    };
    let key = decode_key(encoded);
    let result = match (&parts.method, retry, list) {
        (&Method::POST, true, "queue") => state.store.retry_pending(&key).await,
        (&Method::POST, true, _) => {
            let edit = match read_edit(body, state.max_body_bytes).await {
                Ok(edit) => edit,
                Err(resp) => return resp,
            };
            match edit {
                Some(edit) => return edit::retry_edited(state, &key, edit).await,
                None => state.store.retry_dead_letter(&key).await,
            }
        }
        (&Method::DELETE, false, _) => state.store.drop_mutation(&key).await,
        _ => {
            return json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &serde_json::json!({"error": "method_not_allowed"}),
            );
        }
    };
    match result {
        Ok(true) => {
            if retry {
                state.activity.wake();
            }
            let action = if retry { "retried" } else { "dropped" };
            state.events.emit(Event::Operator {
                key: key.clone(),
                action: action.into(),
                new_key: None,
            });
            json_response(
                StatusCode::OK,
                &serde_json::json!({"idempotency_key": key, action: true}),
            )
        }
        Ok(false) => not_found(),
        Err(e) => store_unavailable(&e),
    }
}

/// The optional edit sent with a dead letter's retry (`None` for an empty body).
async fn read_edit(body: Incoming, limit: u64) -> Result<Option<edit::Edit>, Response<ProxyBody>> {
    let bad = |message: String| {
        json_response(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"error": "bad_edit", "message": message}),
        )
    };
    let bytes = match crate::body::collect_limited(body, limit).await {
        Ok(crate::body::Collected::Whole(b)) => b,
        Ok(crate::body::Collected::TooLarge { .. }) => {
            return Err(json_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                &serde_json::json!({"error": "payload_too_large"}),
            ));
        }
        Err(e) => return Err(bad(format!("cannot read the request body: {e}"))),
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    match serde_json::from_slice::<edit::Edit>(&bytes) {
        Ok(edit) if edit.is_empty() => Ok(None),
        Ok(edit) => Ok(Some(edit)),
        Err(e) => Err(bad(format!(
            "expected {{\"body\": …, \"headers\": {{…}}}}: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn check(access: &Access, method: Method, headers: &[(&str, &str)]) -> Result<(), Refused> {
        let mut map = HeaderMap::new();
        for (n, v) in headers {
            map.append(
                http::HeaderName::from_bytes(n.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        access.check(&method, &http::Uri::from_static("/status"), &map)
    }

    fn loopback() -> Access {
        Access::new(
            "127.0.0.1:9901".parse().expect("addr"),
            &["Outpost.LAN".into()],
            None,
        )
    }

    #[test]
    fn host_must_name_the_listener() {
        let a = loopback();
        for host in [
            "127.0.0.1:9901",
            "127.0.0.2",
            "localhost:9901",
            "LOCALHOST.",
            "[::1]:9901",
            "outpost.lan:80",
        ] {
            assert_eq!(check(&a, Method::GET, &[("host", host)]), Ok(()), "{host}");
        }
        for host in [
            "evil.example:9901",
            "10.0.0.1:9901",
            "localhost.evil.example",
            "[::1",
            "outpost.lan.evil",
        ] {
            assert_eq!(
                check(&a, Method::GET, &[("host", host)]),
                Err(Refused::ForeignHost),
                "{host}"
            );
        }
        assert_eq!(
            check(&a, Method::GET, &[]),
            Ok(()),
            "no Host: not a browser"
        );
        let any = Access::new("0.0.0.0:9901".parse().expect("addr"), &[], Some("t"));
        assert_eq!(
            check(
                &any,
                Method::GET,
                &[("host", "192.168.1.5:9901"), ("authorization", "Bearer t")]
            ),
            Ok(())
        );
        assert_eq!(
            check(&any, Method::GET, &[("host", "box.evil")]),
            Err(Refused::ForeignHost)
        );
        let one = Access::new("192.168.1.5:9901".parse().expect("addr"), &[], Some("t"));
        assert_eq!(
            check(&one, Method::GET, &[("host", "localhost")]),
            Err(Refused::ForeignHost)
        );
    }

    #[test]
    fn state_changing_requests_from_another_origin_are_refused() {
        let a = loopback();
        let host = ("host", "127.0.0.1:9901");
        for origin in [
            "https://evil.example",
            "null",
            "http://127.0.0.1.evil.example:9901",
            "file://",
        ] {
            assert_eq!(
                check(&a, Method::POST, &[host, ("origin", origin)]),
                Err(Refused::ForeignOrigin),
                "{origin}"
            );
            assert_eq!(
                check(&a, Method::GET, &[host, ("origin", origin)]),
                Ok(()),
                "GET {origin}"
            );
        }
        for origin in [
            "http://127.0.0.1:9901",
            "http://localhost:9901",
            "https://outpost.lan",
        ] {
            assert_eq!(
                check(&a, Method::POST, &[host, ("origin", origin)]),
                Ok(()),
                "{origin}"
            );
        }
        assert_eq!(
            check(&a, Method::DELETE, &[host]),
            Ok(()),
            "no Origin: not a browser"
        );
    }

    #[test]
    fn the_token_is_required_and_compared_whole() {
        let a = Access::new("127.0.0.1:9901".parse().expect("addr"), &[], Some("s3cret"));
        assert_eq!(
            check(&a, Method::GET, &[("authorization", "Bearer s3cret")]),
            Ok(())
        );
        assert_eq!(
            check(&a, Method::GET, &[("authorization", "bearer s3cret")]),
            Ok(())
        );
        for given in [
            "Bearer s3cre",
            "Bearer s3cret2",
            "s3cret",
            "Basic s3cret",
            "",
        ] {
            assert_eq!(
                check(&a, Method::GET, &[("authorization", given)]),
                Err(Refused::Unauthorized),
                "{given:?}"
            );
        }
        assert_eq!(check(&a, Method::GET, &[]), Err(Refused::Unauthorized));
    }
}
