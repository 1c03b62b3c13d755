//! The per-request context: what the proxy decided about one request, in one place.
//!
//! Built once when a request arrives (route, identity, client), filled in as the request
//! travels (idempotency key, source of the answer) and read once at the end for the access log.

use std::sync::Arc;
use std::time::Instant;

use http::{HeaderMap, Method};
use sha2::{Digest, Sha256};

use crate::proxy::forward::ClientInfo;
use crate::route::Route;

/// Where the answer to a request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Forwarded to the upstream.
    Upstream,
    /// Served from the cache, fresh.
    Cache,
    /// Served from the cache because the upstream is unreachable.
    Stale,
    /// A mutation stored in the outbox (202).
    Queued,
    /// The stored answer of an earlier mutation with the same idempotency key.
    IdempotentReplay,
    /// Answered by outpost itself (reserved prefix, errors).
    Outpost,
}

impl Source {
    /// Name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Upstream => "upstream",
            Source::Cache => "cache",
            Source::Stale => "stale",
            Source::Queued => "queued",
            Source::IdempotentReplay => "idempotent_replay",
            Source::Outpost => "outpost",
        }
    }
}

/// Who is asking: a hash of `Authorization` and `Cookie`, so cached data never crosses callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identity(pub [u8; 32]);

impl Identity {
    /// The identity of a request (anonymous callers share one identity).
    pub fn of(headers: &HeaderMap) -> Self {
        let mut h = Sha256::new();
        h.update(b"identity\0");
        for name in [http::header::AUTHORIZATION, http::header::COOKIE] {
            for v in headers.get_all(&name) {
                h.update(name.as_str().as_bytes());
                h.update(b"\0");
                h.update(v.as_bytes());
                h.update(b"\0");
            }
        }
        Identity(h.finalize().into())
    }

    /// The identity used for public routes: the same for everyone.
    pub fn public() -> Self {
        Identity([0; 32])
    }
}

/// Everything the proxy knows and decided about one request.
#[derive(Debug)]
pub struct RequestContext {
    /// The matched route.
    pub route: Arc<Route>,
    /// Request method.
    pub method: Method,
    /// Path and query as the app sent them.
    pub path_and_query: String,
    /// The caller's identity (or the public one on public routes).
    pub identity: Identity,
    /// The app's connection.
    pub client: ClientInfo,
    /// The mutation's idempotency key, once known.
    pub idempotency_key: Option<String>,
    /// Where the answer came from.
    pub source: Source,
    /// When the request arrived.
    pub started: Instant,
}
