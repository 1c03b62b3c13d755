//! The storage interface the rest of outpost sees, and the records it stores.
//!
//! The store plays three roles, one trait each, so that code and tests name the role they use:
//! - [`Queue`]: the durable queue of mutations: enqueue, the replayer's reads and progress
//!   (peek, update, finish), dead letters, the operator's retry, edit and drop, retention.
//! - [`ResponseStore`]: the durable tier of the read cache.
//! - [`Coordination`]: what instances sharing one store agree on: partition leases, and fresh
//!   credentials for mutations waiting after a 401.
//!
//! [`Store`] is the three together. The proxy, cache, replay and admin code hold an
//! `Arc<dyn Store>` and never know which backend they run on. Three backends implement every
//! role: [`embedded::EmbeddedStore`] (one data directory, redb, one process),
//! [`redis::RedisStore`] (shared by several instances) and [`memory::MemoryStore`] (process
//! memory, nothing durable: for tests of the code above the store). All three pass the same
//! conformance suite (`store/conformance.rs`, one module per role; built for tests and with the
//! `conformance` feature only).
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
//!   its replicas as configured; the in-memory store, for tests, has nothing durable to wait
//!   for); an error means nothing was acknowledged.
//! - `enqueue` of an existing key changes nothing and returns the existing record.
//! - Sequence numbers are strictly increasing in acceptance order across the whole store,
//!   except for a coalesced write ([`Queue::enqueue_coalesced`]), which takes the number (the
//!   place) of the pending write it folds.
//! - Only the holder of a partition's [`Lease`] finishes or updates its items.

pub mod codec;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod embedded;
pub mod memory;
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
    /// Global acceptance order; assigned by [`Queue::enqueue`].
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

    /// A copy to finish with: what the store keeps of a finished record ([`Self::forget_request`]
    /// applied to the headers), except the body, which stays (a shared, reference-counted
    /// buffer: no copy) for the stores that count the queued bytes from it. A record going to
    /// the dead letters is copied whole. Cheaper than `clone()` by every header's allocation.
    pub fn finished_copy(&self) -> MutationRecord {
        if self.goes_to_dead_letters() {
            return self.clone();
        }
        MutationRecord {
            key: self.key.clone(),
            fingerprint: self.fingerprint,
            partition: self.partition.clone(),
            seq: self.seq,
            accepted_at_ms: self.accepted_at_ms,
            status: self.status,
            attempts: self.attempts,
            next_attempt_at_ms: self.next_attempt_at_ms,
            principal: self.principal.clone(),
            route: self.route.clone(),
            request: StoredRequest {
                method: self.request.method.clone(),
                path_and_query: self.request.path_and_query.clone(),
                headers: self
                    .request
                    .headers
                    .iter()
                    .filter(|(n, _)| n == EDITED_FROM_HEADER)
                    .cloned()
                    .collect(),
                body: self.request.body.clone(),
            },
            outcome: self.outcome.clone(),
            response: self.response.clone(),
            finished_at_ms: self.finished_at_ms,
            identity: self.identity,
        }
    }

    /// Turn the record into an operator's drop at `now_ms`: finished as `rejected`, kept for
    /// the retention period so that its key still answers.
    pub fn mark_dropped(&mut self, now_ms: u64) {
        self.status = MutationStatus::Rejected;
        self.outcome = Some("dropped by operator".into());
        self.finished_at_ms = Some(now_ms);
        self.forget_request();
    }

    /// Whether finishing the record puts it on the dead-letter list: a rejection or a conflict,
    /// except a conflict the route resolved for the server ([`SERVER_WINS`]), which is only
    /// recorded.
    pub fn goes_to_dead_letters(&self) -> bool {
        self.status.is_dead_letter() && self.outcome.as_deref() != Some(SERVER_WINS)
    }

    /// Turn the pending record into one folded into the newer mutation `into_key` at `now_ms`
    /// (route `coalesce = true`): finished as `coalesced`, kept for the retention period so that
    /// its key still answers, without body or credentials (the newer mutation carries them).
    pub fn mark_coalesced(&mut self, now_ms: u64, into_key: &str) {
        self.status = MutationStatus::Coalesced;
        self.outcome = Some(format!("{COALESCED_PREFIX}{into_key}"));
        self.finished_at_ms = Some(now_ms);
        self.forget_request();
    }

    /// The key a `coalesced` record was folded into.
    pub fn coalesced_into(&self) -> Option<&str> {
        if self.status != MutationStatus::Coalesced {
            return None;
        }
        self.outcome.as_deref()?.strip_prefix(COALESCED_PREFIX)
    }

    /// Like [`Self::mark_dropped`], for a dead letter an operator edited and retried as
    /// `new_key`: the outcome points to it.
    pub fn mark_superseded(&mut self, now_ms: u64, new_key: &str) {
        self.mark_dropped(now_ms);
        self.outcome = Some(format!("{SUPERSEDED_PREFIX}{new_key}"));
    }
}

/// An operator's edit of a dead letter ([`Queue::edit_dead_letter`]).
#[derive(Debug, Clone, PartialEq)]
pub enum DeadLetterEdit {
    /// The body is unchanged: its request headers become these and it goes back to the tail of
    /// its partition under the same key, like [`Queue::retry_dead_letter`].
    Headers(Vec<(String, Bytes)>),
    /// The body was edited, and the edited request was enqueued under this new key: the dead
    /// letter leaves the list and is finished (`rejected`, outcome `edited: retried as <key>`),
    /// keeping neither body nor credentials.
    Superseded(String),
}

/// The request header of a retry an operator edited, naming the key it was edited from (kept
/// when the record is finished).
pub const EDITED_FROM_HEADER: &str = "outpost-edited-from";

/// The outcome of a conflict a `conflict = "server-wins"` route resolved: the server's state
/// stands, the mutation is recorded as `conflict` and not kept as a dead letter.
pub const SERVER_WINS: &str = "conflict: server wins (not applied)";

/// The outcome of a dead letter an operator edited and retried under a new key, before that key.
pub const SUPERSEDED_PREFIX: &str = "edited: retried as ";

/// The outcome of a mutation folded into a newer one of the same URI, before that one's key.
pub const COALESCED_PREFIX: &str = "coalesced into ";

/// What [`Queue::enqueue_coalesced`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Coalesced {
    /// Stored durably in the folded item's place (its sequence number); the folded item is
    /// finished as `coalesced`.
    Folded {
        /// The sequence number the new record took over.
        seq: u64,
    },
    /// The new key already existed; nothing was changed.
    Existing(Box<MutationRecord>),
    /// The folded item is no longer what the caller read, or no longer the partition's
    /// business alone (its record changed, it left the queue, something was queued behind it,
    /// or a replayer holds the partition): nothing was changed; read again or enqueue plainly.
    Stale,
}

/// What [`Queue::enqueue`] did.
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

/// Counters of the durable queue, for status pages and metrics.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct QueueStats {
    /// Pending mutations across all partitions.
    pub queue_depth: u64,
    /// Acceptance time of the oldest pending mutation (Unix ms).
    pub oldest_pending_ms: Option<u64>,
    /// Items on the dead-letter list.
    pub dead_letters: u64,
}

/// What the pending mutations hold across the whole store (every instance sharing it): what
/// `queue.max_depth` and `queue.max_bytes` limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueueTotals {
    /// Pending mutations.
    pub depth: u64,
    /// Bytes of their request bodies.
    pub bytes: u64,
}

/// Counters of the durable cache tier, for status pages and metrics.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CacheStats {
    /// Cache entries in the durable tier.
    pub cache_entries: u64,
    /// Bytes of cache entries in the durable tier.
    pub cache_bytes: u64,
}

/// Counters for status pages and metrics: [`QueueStats`] and [`CacheStats`] together.
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

/// The durable queue of mutations: accepting them, the replayer's reads and progress, and the
/// operator's actions. Every backend implements it with the same invariants (module docs).
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Store a new pending mutation durably, assigning its sequence number; or, if the key
    /// exists, return the existing record and change nothing.
    async fn enqueue(&self, record: MutationRecord) -> Result<Enqueued, StoreError>;

    /// Store `record` durably in place of the pending item `folded` (route `coalesce = true`):
    /// `record` takes `folded`'s sequence number (its place in the partition) and `folded` is
    /// finished as `coalesced` into `record.key` ([`MutationRecord::mark_coalesced`]), in one
    /// atomic, durable write. Applies only while `folded` is stored exactly as the caller read
    /// it, still on its queue with its sequence number, the partition's newest item still has
    /// sequence number `tail_seq`, and no replayer holds the partition's lease (so `folded` is
    /// neither in flight nor in a replayer's batch); otherwise [`Coalesced::Stale`] and nothing
    /// changes. A `record.key` that exists is answered like [`Self::enqueue`] does.
    async fn enqueue_coalesced(
        &self,
        record: MutationRecord,
        folded: &MutationRecord,
        tail_seq: u64,
    ) -> Result<Coalesced, StoreError>;

    /// Up to `limit` newest pending items of `partition`, newest first (what a new mutation
    /// may be coalesced with).
    async fn peek_tail(
        &self,
        partition: &str,
        limit: usize,
    ) -> Result<Vec<MutationRecord>, StoreError>;

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

    /// Up to `limit` oldest pending items of `partition` whose sequence number is above
    /// `after`, in order: a drain reads on past the items it already sent (whose answers may
    /// still be being recorded) instead of reading and decoding them again.
    async fn peek_after(
        &self,
        partition: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<MutationRecord>, StoreError>;

    /// Whether writes can be recorded right now (false while the embedded store reopens after
    /// an I/O error). Replay sends nothing it could not record the answer of.
    fn writable(&self) -> bool;

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

    /// An operator's drop of a pending item or a dead letter: it leaves its partition or the
    /// dead-letter list and is kept as a finished record (`rejected`, outcome "dropped by
    /// operator") for the retention period, so its key still answers. False when the key is
    /// neither pending nor a dead letter.
    async fn drop_mutation(&self, key: &str) -> Result<bool, StoreError>;

    /// An operator's edited retry of a dead letter (see [`DeadLetterEdit`]). False when the key
    /// is not on the dead-letter list.
    async fn edit_dead_letter(&self, key: &str, edit: DeadLetterEdit) -> Result<bool, StoreError>;

    /// Forget finished records finished before `before_ms` (dead letters are kept).
    async fn purge_finished(&self, before_ms: u64) -> Result<u64, StoreError>;

    /// Queue depth, oldest pending item and dead letters.
    async fn queue_stats(&self) -> Result<QueueStats, StoreError>;

    /// Pending items per partition that holds any (partitions without pending items are left
    /// out), for metrics.
    async fn partition_depths(&self) -> Result<Vec<(String, u64)>, StoreError>;

    /// Pending mutations and the bytes of their bodies, across every instance sharing the
    /// store: what the outbox's queue limits are checked against.
    async fn queued_totals(&self) -> Result<QueueTotals, StoreError>;
}

/// The durable tier of the read cache: opaque blobs by opaque key, bounded by a byte budget.
#[async_trait]
pub trait ResponseStore: Send + Sync + 'static {
    /// A cache blob, unless it is missing or expired.
    async fn cache_get(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError>;

    /// Store a cache blob for at most `ttl` (evicting least recently used ones over the size
    /// budget). Not fsynced: a lost cache entry costs a refetch.
    async fn cache_put(&self, key: &[u8], value: Bytes, ttl: Duration) -> Result<(), StoreError>;

    /// Entries and bytes in the durable tier.
    async fn cache_stats(&self) -> Result<CacheStats, StoreError>;
}

/// What instances sharing one store agree on: who replays a partition ([`Lease`]s), and fresh
/// credentials for mutations waiting after a 401. A store that only one process opens still
/// implements it, and says in its docs why its answers are trivially right there.
#[async_trait]
pub trait Coordination: Send + Sync + 'static {
    /// Take the right to replay `partition` (None when another instance holds it). Acquiring a
    /// partition this store already holds succeeds with a lease that supersedes the earlier one.
    async fn acquire(&self, partition: &str) -> Result<Option<Lease>, StoreError>;

    /// Extend a lease; false when it was lost (another instance took over).
    async fn renew(&self, lease: &Lease) -> Result<bool, StoreError>;

    /// Give a lease back.
    async fn release(&self, lease: &Lease) -> Result<(), StoreError>;

    /// Share credentials the app offered for `principal` at `at_ms` with the other instances,
    /// for mutations waiting after a 401 that another instance replays.
    async fn share_credentials(
        &self,
        principal: &str,
        credentials: &[(String, Bytes)],
        at_ms: u64,
    ) -> Result<(), StoreError>;

    /// Credentials another instance shared for `principal` after `since_ms` (`*`: anyone's).
    async fn shared_credentials(
        &self,
        principal: &str,
        since_ms: u64,
    ) -> Result<Option<Vec<(String, Bytes)>>, StoreError>;

    /// Announce for `ttl` that a mutation waits for fresh credentials, so that the other
    /// instances share what the app offers them.
    async fn announce_waiting(&self, ttl: Duration) -> Result<(), StoreError>;

    /// Whether another instance announced a mutation waiting for credentials.
    async fn anyone_waiting(&self) -> Result<bool, StoreError>;

    /// Whether this process is the only one that uses the store (an embedded data directory,
    /// which redb locks): then no other process works on anything in it, and what a process
    /// before this one left in progress ended with that process. False for a store others may
    /// share (Redis; the memory store, which tests hand from one replayer to another).
    fn exclusive(&self) -> bool {
        false
    }

    /// What `/status` shows of the backend's servers (for Redis: the primary in use and the
    /// failovers followed); `None` when there is nothing to say.
    fn servers(&self) -> Option<serde_json::Value> {
        None
    }

    /// Failovers of the backend's servers followed since start (0 when it has none).
    fn failovers(&self) -> u64 {
        0
    }
}

/// Everything outpost stores, in its three roles: what the rest of the code holds as
/// `Arc<dyn Store>`. Implemented for every type that implements the three roles.
#[async_trait]
pub trait Store: Queue + ResponseStore + Coordination {
    /// The counters of both [`Queue::queue_stats`] and [`ResponseStore::cache_stats`].
    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let queue = self.queue_stats().await?;
        let cache = self.cache_stats().await?;
        Ok(StoreStats {
            queue_depth: queue.queue_depth,
            oldest_pending_ms: queue.oldest_pending_ms,
            dead_letters: queue.dead_letters,
            cache_entries: cache.cache_entries,
            cache_bytes: cache.cache_bytes,
        })
    }
}

impl<T: Queue + ResponseStore + Coordination + ?Sized> Store for T {}

/// Milliseconds of `d`, saturating (upstream-controlled delays can be huge).
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds since the Unix epoch, on the runtime's clock: the wall clock read once, then
/// advanced by tokio's monotonic clock. In production that is the wall time (and never goes
/// backwards when the system clock is stepped); under tokio's paused test clock it moves with
/// `tokio::time::advance`, so that backoff and expiry, which compare these stamps, can be
/// tested in virtual time.
pub fn now_ms() -> u64 {
    static BASE: std::sync::OnceLock<(u64, std::time::Instant)> = std::sync::OnceLock::new();
    let (wall, at) = *BASE.get_or_init(|| {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        (wall, std::time::Instant::now())
    });
    let elapsed = tokio::time::Instant::now()
        .into_std()
        .saturating_duration_since(at);
    wall.saturating_add(millis(elapsed))
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
