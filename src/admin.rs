//! The admin listener.
//!
//! This milestone serves what operators need to see and act on the outbox:
//! - `GET /status`: online state, queue depth, oldest queued age, dead letters, cache entries
//!   and bytes; `GET /healthz`.
//! - `GET /queue` and `GET /dead-letters` (`?limit=N`, default 100): status documents.
//! - `POST /queue/{key}/retry` (send a waiting item now, e.g. one held after a 401, with the
//!   credentials it carries), `DELETE /queue/{key}` (drop it).
//! - `POST /dead-letters/{key}/retry` (back to the tail of its partition),
//!   `DELETE /dead-letters/{key}` (drop it).
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
//!   The SHA-256 digests of the given and the configured token are compared in constant time
//!   (`subtle`), so neither the token's content nor its length shows in the timing.
//!
//! The listener has its own connection budget (`admin.max_connections`) and the same guard as
//! the proxy (strict framing, header-read timeout), so a flood on the proxy port does not
//! reach it. Events, metrics and the status page come with the operations milestone and
//! subscribe to the same event stream.

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
use crate::events::Events;
use crate::health::Health;
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
    server::accept_loop(
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
    .await
}

async fn handle(state: &AdminState, req: Request<Incoming>) -> Response<ProxyBody> {
    if let Err(refused) = state.access.check(req.method(), req.uri(), req.headers()) {
        return refused.into_response();
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => {
            json_response(StatusCode::OK, &serde_json::json!({"ok": true}))
        }
        (&Method::GET, "/status") => match state.store.stats().await {
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
                    }),
                )
            }
            Err(e) => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &serde_json::json!({"error": "store_unavailable", "message": e.to_string()}),
            ),
        },
        (&Method::POST, "/sync/pause") => {
            state.replayer.pause();
            json_response(StatusCode::OK, &serde_json::json!({"paused": true}))
        }
        (&Method::POST, "/sync/resume") => {
            state.replayer.resume();
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
        (method, path) => act_on_item(state, method, path).await,
    }
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

/// `POST /queue/{key}/retry`, `DELETE /queue/{key}`, and the same under `/dead-letters/`.
async fn act_on_item(state: &AdminState, method: &Method, path: &str) -> Response<ProxyBody> {
    let not_found = || {
        json_response(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "not_found"}),
        )
    };
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
    let key = percent_encoding::percent_decode_str(encoded)
        .decode_utf8_lossy()
        .into_owned();
    let result = match (method, retry, list) {
        (&Method::POST, true, "queue") => state.store.retry_pending(&key).await,
        (&Method::POST, true, _) => state.store.retry_dead_letter(&key).await,
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
            json_response(
                StatusCode::OK,
                &serde_json::json!({"idempotency_key": key, action: true}),
            )
        }
        Ok(false) => not_found(),
        Err(e) => store_unavailable(&e),
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
