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
//! With `admin.token` set, every request needs `Authorization: Bearer <token>` (compared in
//! constant time). Events, metrics and the status page come with the operations milestone and
//! subscribe to the same event stream.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::body::ProxyBody;
use crate::cache::Cache;
use crate::error::json_response;
use crate::events::Events;
use crate::health::Health;
use crate::outbox::Outbox;
use crate::replay::Replayer;
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
    /// The outbox (status documents, replay wake-up).
    pub outbox: Arc<Outbox>,
    /// The event stream.
    pub events: Events,
    /// Bearer token, if set.
    pub token: Option<String>,
}

/// Serve the admin API until shutdown.
pub async fn serve(listener: TcpListener, state: AdminState, shutdown: Shutdown) {
    let state = Arc::new(state);
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.wait() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(_) => continue,
            },
        };
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.wait() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

async fn handle(state: &AdminState, req: Request<Incoming>) -> Response<ProxyBody> {
    if let Some(token) = &state.token {
        let expected = format!("Bearer {token}");
        let given = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !constant_time_eq(given, expected.as_bytes()) {
            return json_response(
                StatusCode::UNAUTHORIZED,
                &serde_json::json!({"error": "unauthorized"}),
            );
        }
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => {
            json_response(StatusCode::OK, &serde_json::json!({"ok": true}))
        }
        (&Method::GET, "/status") => match state.store.stats().await {
            Ok(stats) => {
                let (mem_entries, mem_bytes) = state.cache.memory_usage();
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
                    "items": items.iter().map(|r| state.outbox.status_document(r)).collect::<Vec<_>>()
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
            Ok(records) => items.extend(records.iter().map(|r| state.outbox.status_document(r))),
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
                state.outbox.queued.notify_one();
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

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
