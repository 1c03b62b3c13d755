//! The crate's error types, and the one place where an error becomes an HTTP answer.
//!
//! Library code returns these with `?`; the proxy turns them into responses through
//! [`ProxyError::into_response`], so every failure has exactly one status code and one JSON
//! shape (`{"error": "<code>", "message": "..."}`).

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::ProxyBody;

/// An error and its causes in one line (`what: why: deeper why`), for logs and the stored
/// outcome of a mutation. Errors keep their causes as sources; this is where they are read.
pub fn report(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        // `#[error(transparent)]` and wrappers repeat their source's message: say it once.
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

/// A failure of a storage backend (embedded store or Redis).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The embedded database failed (I/O, corruption, full disk).
    #[error("embedded store: {0}")]
    Embedded(String),
    /// Redis failed or is unreachable.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A record could not be encoded or decoded.
    #[error("codec: {0}")]
    Codec(#[from] postcard::Error),
    /// The store's writer is gone (shutting down).
    #[error("store is shut down")]
    Closed,
    /// A background store task failed (panicked or was cancelled).
    #[error("store task failed: {0}")]
    Task(String),
    /// Redis did not confirm the write on enough replicas in time.
    #[error("only {got} of {wanted} replicas confirmed the write")]
    Replicas {
        /// Replicas that confirmed.
        got: i64,
        /// Replicas required by `store.redis_min_replicas`.
        wanted: i64,
    },
    /// The item is no longer on its partition's queue (an operator dropped it, or it was
    /// finished): the update was refused so as not to bring it back.
    #[error("mutation {key:?} is no longer queued")]
    NotQueued {
        /// The idempotency key of the item.
        key: String,
    },
    /// Stored data was written by a newer outpost than this one.
    #[error(
        "{what} has format version {found}, newer than version {supported} this outpost reads; upgrade outpost"
    )]
    NewerFormat {
        /// What was read.
        what: &'static str,
        /// The version found.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },
    /// The partition's lease was lost (expired and taken by another instance, or released):
    /// the write was refused so as not to overwrite the new holder's work.
    #[error("lease on partition {partition:?} was lost")]
    LeaseLost {
        /// The partition whose lease is no longer held.
        partition: String,
    },
}

impl StoreError {
    /// Whether trying the same operation again later can succeed (a full disk, Redis down or
    /// slow, replicas lagging), as opposed to a verdict that stands (a lost lease, an item no
    /// longer queued, a record that does not decode, a store shut down).
    pub fn retryable(&self) -> bool {
        match self {
            StoreError::Embedded(_) | StoreError::Redis(_) | StoreError::Replicas { .. } => true,
            StoreError::Codec(_)
            | StoreError::Closed
            | StoreError::Task(_)
            | StoreError::LeaseLost { .. }
            | StoreError::NotQueued { .. }
            | StoreError::NewerFormat { .. } => false,
        }
    }
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        StoreError::Embedded(e.to_string())
    }
}

macro_rules! redb_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Embedded(e.to_string()) }
        }
    )*};
}
redb_errors!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// Everything that can go wrong while answering one proxied request.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request body exceeded a configured limit.
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge {
        /// The limit that was exceeded.
        limit: u64,
    },
    /// The request cannot be proxied (foreign host, CONNECT, bad URI).
    #[error("{0}")]
    Forbidden(String),
    /// The client sent something malformed (bad idempotency key, unreadable body).
    #[error("{0}")]
    BadRequest(String),
    /// Same idempotency key with a different method, path or body.
    #[error("idempotency key {0} was already used for a different request")]
    KeyReused(String),
    /// Same idempotency key while the first request is still being stored or forwarded.
    #[error("a request with idempotency key {0} is still being processed")]
    KeyInProgress(String),
    /// The upstream is unreachable and nothing is cached.
    #[error("upstream unreachable and nothing cached")]
    UpstreamUnreachable,
    /// The upstream failed in a way that is not an outage (e.g. invalid response).
    #[error("upstream error: {0}")]
    BadGateway(String),
    /// The upstream did not answer in time and nothing is cached.
    #[error("upstream timed out")]
    GatewayTimeout,
    /// A mutation could not be stored durably; it was not accepted.
    #[error("mutation not stored: {0}")]
    NotStored(#[from] StoreError),
    /// The queue is at `queue.max_depth` or the body would take it over `queue.max_bytes`:
    /// the mutation was not stored.
    #[error(
        "the queue is full ({depth} of at most {max_depth} mutations, {bytes} of at most {max_bytes} bytes; 0 = unlimited): try again later"
    )]
    QueueFull {
        /// Pending mutations counted when it was refused.
        depth: u64,
        /// Their body bytes.
        bytes: u64,
        /// `queue.max_depth`.
        max_depth: u64,
        /// `queue.max_bytes`.
        max_bytes: u64,
    },
    /// No such resource under the reserved prefix.
    #[error("not found")]
    NotFound,
}

/// `Retry-After` of a `503 queue_full`: the queue drains as fast as the upstream takes it, so
/// soon, but not at once.
pub const QUEUE_FULL_RETRY_AFTER_SECS: u32 = 5;
/// `Retry-After` of a `503 not_stored`: the store may be back at once (a reopened database, a
/// Redis failover).
pub const NOT_STORED_RETRY_AFTER_SECS: u32 = 1;

impl ProxyError {
    /// The HTTP status and machine-readable code for this error.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ProxyError::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            ProxyError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ProxyError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ProxyError::KeyReused(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused")
            }
            ProxyError::KeyInProgress(_) => (StatusCode::CONFLICT, "idempotency_key_in_progress"),
            ProxyError::UpstreamUnreachable => {
                (StatusCode::GATEWAY_TIMEOUT, "upstream_unreachable")
            }
            ProxyError::BadGateway(_) => (StatusCode::BAD_GATEWAY, "bad_gateway"),
            ProxyError::GatewayTimeout => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
            ProxyError::NotStored(_) => (StatusCode::SERVICE_UNAVAILABLE, "not_stored"),
            ProxyError::QueueFull { .. } => (StatusCode::SERVICE_UNAVAILABLE, "queue_full"),
            ProxyError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
        }
    }

    /// Render as the JSON error response the app sees.
    pub fn into_response(self) -> Response<ProxyBody> {
        let (status, code) = self.status_and_code();
        let body = match &self {
            ProxyError::UpstreamUnreachable => {
                serde_json::json!({"error": code, "cached": false})
            }
            ProxyError::QueueFull {
                depth,
                bytes,
                max_depth,
                max_bytes,
            } => serde_json::json!({
                "error": code,
                "message": self.to_string(),
                "queue_depth": depth,
                "queue_bytes": bytes,
                "max_depth": max_depth,
                "max_bytes": max_bytes,
            }),
            _ => serde_json::json!({"error": code, "message": self.to_string()}),
        };
        let retry_after = match &self {
            ProxyError::QueueFull { .. } => Some(QUEUE_FULL_RETRY_AFTER_SECS),
            ProxyError::NotStored(_) => Some(NOT_STORED_RETRY_AFTER_SECS),
            _ => None,
        };
        let mut resp = json_response(status, &body);
        if let Some(secs) = retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// A JSON response with `Content-Type: application/json`.
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<ProxyBody> {
    let bytes = Bytes::from(body.to_string());
    let mut resp = Response::new(crate::body::full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
