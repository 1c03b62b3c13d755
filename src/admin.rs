//! The admin listener. This milestone serves `GET /status` (online state, queue depth,
//! oldest queued age, dead letters, cache entries and bytes) and `GET /healthz`; the rest of
//! the contract's admin API (queue, dead letters, pause/resume, events, metrics, status page)
//! builds on the same state and the event stream.

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
        _ => json_response(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "not_found"}),
        ),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
