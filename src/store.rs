//! The storage interface the rest of outpost sees, and the records it stores.
//!
//! Two backends implement [`Store`]: [`embedded::EmbeddedStore`] (one data directory, redb) and
//! [`redis::RedisStore`] (shared by several instances). Both pass the same conformance suite
//! (`store/conformance.rs`). The proxy, cache and replay code hold an `Arc<dyn Store>` and never
//! know which one they run on.
//!
//! What is stored:
//! - **Mutation records**, by idempotency key: the request (method, URI, headers, body), its
//!   partition, a global acceptance sequence number, its status and, once answered, the
//!   upstream's answer. A record is *pending* (queued, auth_required) until replay finishes it;
//!   finished records are kept for `queue.idempotency_retention` (without the request body
//!   and credentials, except dead letters, which keep them for a retry).
//! - **Per-partition FIFO**: pending keys ordered by sequence number.
//! - **Cache blobs**: the durable tier of the read cache (opaque bytes by opaque key).
//!
//! Invariants every backend keeps:
//! - `enqueue` returns only after the record is durable (fsync, or acknowledged by Redis and
//!   its replicas as configured); an error means nothing was acknowledged.
//! - `enqueue` of an existing key changes nothing and returns the existing record.
//! - Sequence numbers are strictly increasing in acceptance order across the whole store.
//! - Only the holder of a partition's [`Lease`] finishes or updates its items.

pub mod codec;
pub mod conformance;
pub mod embedded;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use crate::error::StoreError;

/// Where a mutation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MutationStatus {
    /// Waiting in its partition's FIFO.
    Queued,
    /// Being sent upstream now (reported from the replayer's memory, stored as `Queued`).
    InFlight,
    /// The upstream answered 401; waiting for fresh credentials of its principal.
    AuthRequired,
    /// Applied (2xx/3xx).
    Succeeded,
    /// Applied with errors (207, or `errors` beside `data`).
    Partial,
    /// Validation error; dead-lettered.
    Rejected,
    /// Conflict (409, 412); dead-lettered.
    Conflict,
    /// Folded into a later mutation of the same resource.
    Coalesced,
    /// Older than `queue.max_age`; no longer retried.
    Expired,
}

impl MutationStatus {
    /// Whether the item still waits in its partition.
    pub fn is_pending(self) -> bool {
        matches!(
            self,
            MutationStatus::Queued | MutationStatus::InFlight | MutationStatus::AuthRequired
        )
    }

    /// Whether the item is on the dead-letter list.
    pub fn is_dead_letter(self) -> bool {
        matches!(self, MutationStatus::Rejected | MutationStatus::Conflict)
    }

    /// The contract's name for this status.
    pub fn as_str(self) -> &'static str {
        match self {
            MutationStatus::Queued => "queued",
            MutationStatus::InFlight => "in_flight",
            MutationStatus::AuthRequired => "auth_required",
            MutationStatus::Succeeded => "succeeded",
            MutationStatus::Partial => "partial",
            MutationStatus::Rejected => "rejected",
            MutationStatus::Conflict => "conflict",
            MutationStatus::Coalesced => "coalesced",
            MutationStatus::Expired => "expired",
        }
    }
}

/// A request as stored for replay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRequest {
    /// HTTP method.
    pub method: String,
    /// Path and query as the app sent them.
    pub path_and_query: String,
    /// End-to-end headers (hop-by-hop ones already removed), in order.
    pub headers: Vec<(String, Bytes)>,
    /// The whole body.
    pub body: Bytes,
}

/// An upstream answer as stored for idempotent replies and dead letters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredResponse {
    /// HTTP status.
    pub status: u16,
    /// End-to-end headers.
    pub headers: Vec<(String, Bytes)>,
    /// The whole body (bounded by `queue.max_body_bytes`).
    pub body: Bytes,
}

/// One mutation, by idempotency key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MutationRecord {
    /// The idempotency key (the app's, or a generated UUIDv7).
    pub key: String,
    /// SHA-256 of method, path and body: a reused key with another request is a 422.
    pub fingerprint: [u8; 32],
    /// Ordering partition.
    pub partition: String,
    /// Global acceptance order; assigned by [`Store::enqueue`].
    pub seq: u64,
    /// When outpost accepted it (Unix ms).
    pub accepted_at_ms: u64,
    /// Where it is in its life.
    pub status: MutationStatus,
    /// Replay attempts so far.
    pub attempts: u32,
    /// Earliest next replay attempt (Unix ms).
    pub next_attempt_at_ms: u64,
    /// Whose credentials it carries (for waiting after a 401).
    pub principal: Option<String>,
    /// Name of the route it matched (its classification rules are looked up again at replay).
    pub route: String,
    /// The request to replay (body and headers emptied once finished, unless dead-lettered).
    pub request: StoredRequest,
    /// Classification of the last answer (`success`, `retryable: 503`, ...).
    pub outcome: Option<String>,
    /// The upstream's last answer.
    pub response: Option<StoredResponse>,
    /// When it was finished (Unix ms).
    pub finished_at_ms: Option<u64>,
    /// The caller the key belongs to (hash of its identity headers): only that caller gets its
    /// 202, its stored answer or its status document. `None` for records of format 0.
    pub identity: Option<[u8; 32]>,
}

impl MutationRecord {
    /// Forget what a finished mutation no longer needs: its body and its credentials (no
    /// tokens at rest). Dead letters keep both, for a retry.
    pub fn forget_request(&mut self) {
        self.request.body = Bytes::new();
        // The operator's edit marker is no secret, and the status document shows it.
        self.request
            .headers
            .retain(|(n, _)| n == EDITED_FROM_HEADER);
    }

    /// Turn the record into an operator's drop at `now_ms`: finished as `rejected`, kept for
    /// the retention period so that its key still answers.
    pub fn mark_dropped(&mut self, now_ms: u64) {
        self.status = MutationStatus::Rejected;
        self.outcome = Some("dropped by operator".into());
        self.finished_at_ms = Some(now_ms);
        self.forget_request();
    }

    /// Like [`Self::mark_dropped`], for a dead letter an operator edited and retried as
    /// `new_key`: the outcome points to it.
    pub fn mark_superseded(&mut self, now_ms: u64, new_key: &str) {
        self.mark_dropped(now_ms);
        self.outcome = Some(format!("{SUPERSEDED_PREFIX}{new_key}"));
    }
}

/// An operator's edit of a dead letter ([`Store::edit_dead_letter`]).
#[derive(Debug, Clone, PartialEq)]
pub enum DeadLetterEdit {
    /// The body is unchanged: its request headers become these and it goes back to the tail of
    /// its partition under the same key, like [`Store::retry_dead_letter`].
    Headers(Vec<(String, Bytes)>),
    /// The body was edited, and the edited request was enqueued under this new key: the dead
    /// letter leaves the list and is finished (`rejected`, outcome `edited: retried as <key>`),
    /// keeping neither body nor credentials.
    Superseded(String),
}

/// The request header of a retry an operator edited, naming the key it was edited from (kept
/// when the record is finished).
pub const EDITED_FROM_HEADER: &str = "outpost-edited-from";

/// The outcome of a dead letter an operator edited and retried under a new key, before that key.
pub const SUPERSEDED_PREFIX: &str = "edited: retried as ";

/// What [`Store::enqueue`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Enqueued {
    /// Stored durably with this sequence number.
    Accepted {
        /// The assigned sequence number.
        seq: u64,
    },
    /// The key already existed; nothing was changed.
    Existing(Box<MutationRecord>),
}

/// The right to replay one partition, held by one instance at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The partition.
    pub partition: String,
    /// Fencing token: updates with a stale token are refused.
    pub token: u64,
}

/// Counters for status pages and metrics.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StoreStats {
    /// Pending mutations across all partitions.
    pub queue_depth: u64,
    /// Acceptance time of the oldest pending mutation (Unix ms).
    pub oldest_pending_ms: Option<u64>,
    /// Items on the dead-letter list.
    pub dead_letters: u64,
    /// Cache entries in the durable tier.
    pub cache_entries: u64,
    /// Bytes of cache entries in the durable tier.
    pub cache_bytes: u64,
}

/// The storage interface both backends implement.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Store a new pending mutation durably, assigning its sequence number; or, if the key
    /// exists, return the existing record and change nothing.
    async fn enqueue(&self, record: MutationRecord) -> Result<Enqueued, StoreError>;

    /// Store the answered record of a mutation that was forwarded directly (not queued), for
    /// idempotent replies. Does nothing when the key exists. Need not be fsynced: the upstream
    /// already holds the key.
    async fn record_forwarded(&self, record: MutationRecord) -> Result<(), StoreError>;

    /// The record of `key`, pending or finished.
    async fn mutation(&self, key: &str) -> Result<Option<MutationRecord>, StoreError>;

    /// Partitions that hold pending items.
    async fn pending_partitions(&self) -> Result<Vec<String>, StoreError>;

    /// Whether `partition` holds pending items (a new mutation must then queue behind them).
    async fn partition_has_pending(&self, partition: &str) -> Result<bool, StoreError>;

    /// Up to `limit` oldest pending items of `partition`, in order.
    async fn peek(&self, partition: &str, limit: usize) -> Result<Vec<MutationRecord>, StoreError>;

    /// Take the right to replay `partition` (None when another instance holds it).
    async fn acquire(&self, partition: &str) -> Result<Option<Lease>, StoreError>;

    /// Extend a lease; false when it was lost (another instance took over).
    async fn renew(&self, lease: &Lease) -> Result<bool, StoreError>;

    /// Give a lease back.
    async fn release(&self, lease: &Lease) -> Result<(), StoreError>;

    /// Whether writes can be recorded right now (false while the embedded store reopens after
    /// an I/O error). Replay sends nothing it could not record the answer of.
    fn writable(&self) -> bool {
        true
    }

    /// Save a pending item's new state (attempts, next attempt, status, headers).
    /// [`StoreError::NotQueued`] when the item is no longer on its queue with that sequence
    /// number (dropped by an operator, or finished): nothing is written.
    async fn update(&self, lease: &Lease, record: &MutationRecord) -> Result<(), StoreError>;

    /// Take a finished item out of its partition and keep its record (on the dead-letter list
    /// when its status is a dead-letter status). Finishing an item that is no longer queued
    /// changes nothing and succeeds, so that an answer can be recorded again after an error.
    async fn finish(&self, lease: &Lease, record: &MutationRecord) -> Result<(), StoreError>;

    /// Dead letters, oldest first (at most `limit`).
    async fn dead_letters(&self, limit: usize) -> Result<Vec<MutationRecord>, StoreError>;

    /// Put a dead letter back at the tail of its partition (a new sequence number).
    async fn retry_dead_letter(&self, key: &str) -> Result<bool, StoreError>;

    /// An operator's "try it now" for a pending item (queued or waiting for credentials): it
    /// becomes `queued` with no backoff, keeping its place, and is sent with the credentials
    /// it carries. False when the key is not pending.
    async fn retry_pending(&self, key: &str) -> Result<bool, StoreError>;

    /// An operator's edited retry of a dead letter (see [`DeadLetterEdit`]). False when the key
    /// is not a dead letter.
    async fn edit_dead_letter(&self, key: &str, edit: DeadLetterEdit) -> Result<bool, StoreError>;

    /// An operator's drop of a pending item or a dead letter: it leaves its partition or the
    /// dead-letter list and is kept as a finished record (`rejected`, outcome "dropped by
    /// operator") for the retention period, so its key still answers. False when the key is
    /// neither pending nor a dead letter.
    async fn drop_mutation(&self, key: &str) -> Result<bool, StoreError>;

    /// Forget finished records finished before `before_ms` (dead letters are kept).
    async fn purge_finished(&self, before_ms: u64) -> Result<u64, StoreError>;

    /// Share credentials the app offered for `principal` at `at_ms` with the other instances,
    /// for mutations waiting after a 401 that another instance replays. A store that is not
    /// shared keeps nothing: the offering instance's own memory is enough.
    async fn share_credentials(
        &self,
        _principal: &str,
        _credentials: &[(String, Bytes)],
        _at_ms: u64,
    ) -> Result<(), StoreError> {
        Ok(())
    }

    /// Credentials another instance shared for `principal` after `since_ms` (`*`: anyone's).
    async fn shared_credentials(
        &self,
        _principal: &str,
        _since_ms: u64,
    ) -> Result<Option<Vec<(String, Bytes)>>, StoreError> {
        Ok(None)
    }

    /// Announce for `ttl` that a mutation waits for fresh credentials, so that the other
    /// instances share what the app offers them.
    async fn announce_waiting(&self, _ttl: Duration) -> Result<(), StoreError> {
        Ok(())
    }

    /// Whether another instance announced a mutation waiting for credentials.
    async fn anyone_waiting(&self) -> Result<bool, StoreError> {
        Ok(false)
    }

    /// A cache blob.
    async fn cache_get(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError>;

    /// Store a cache blob for at most `ttl` (evicting least recently used ones over the size
    /// budget). Not fsynced: a lost cache entry costs a refetch.
    async fn cache_put(&self, key: &[u8], value: Bytes, ttl: Duration) -> Result<(), StoreError>;

    /// Counters.
    async fn stats(&self) -> Result<StoreStats, StoreError>;

    /// Pending items per partition that holds any, for metrics. The default reads every
    /// pending record; backends that count cheaply override it.
    async fn partition_depths(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut depths = Vec::new();
        for partition in self.pending_partitions().await? {
            let n = self.peek(&partition, usize::MAX).await?.len() as u64;
            depths.push((partition, n));
        }
        Ok(depths)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339_ms(ms: u64) -> String {
    // Saturate: a far-future time (an upstream's huge Retry-After) must not overflow.
    let ms = i64::try_from(ms).unwrap_or(i64::MAX);
    let t = time::OffsetDateTime::UNIX_EPOCH
        .checked_add(time::Duration::milliseconds(ms))
        .filter(|t| t.year() <= 9999)
        .unwrap_or(time::macros::datetime!(9999-12-31 23:59:59.999 UTC));
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&fmt).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_with_millis() {
        assert_eq!(rfc3339_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339_ms(u64::MAX), "9999-12-31T23:59:59.999Z");
    }
}
