//! Accepting a mutation: idempotency, durability, the 202.
//!
//! Guarantees:
//! - Every mutation forwarded upstream carries an `Idempotency-Key`: the app's (1–255 visible
//!   ASCII characters, else 400) or a generated UUIDv7.
//! - A 202 is sent only after [`Queue::enqueue`](crate::store::Queue::enqueue) returned, i.e. after the commit that holds the
//!   mutation was fsynced (embedded) or acknowledged by Redis. A failure to store is a 503.
//! - While a partition holds queued items, new mutations to it are queued behind them, so a
//!   mutation never overtakes an earlier one of its partition.
//! - A forwarded mutation whose answer was lost (timeout, connection dropped) is queued: its
//!   key makes the later replay safe.
//! - The same key again: the same 202 while pending; the stored upstream answer once finished
//!   (kept `queue.idempotency_retention`); 422 with another method, path or body; 409 while
//!   the first request with that key is still being stored or forwarded. A forwarded
//!   mutation's transient answer (retryable, or 401) is passed on but not kept, so the app's
//!   retry with the same key goes upstream again.
//!
//! - A mutation that would be queued beyond `queue.max_depth` or `queue.max_bytes` is refused
//!   with `503 queue_full` and `Retry-After` before anything is stored ([`crate::admission`]).
//! - A key belongs to the caller that sent it: another caller gets 422, never its answer.
//! - Once a buffered mutation has started towards the upstream, its forward finishes in a task
//!   of its own even if the app goes away: the answer is kept under its key, or the mutation is
//!   queued under it when no answer came (with a backoff when the upstream may have applied it).
//!
//! Status documents are [`crate::mutations`]'; fresh credentials after a 401 go to
//! [`crate::credentials`]; queued wake-ups to [`crate::activity`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::activity::Activity;
use crate::admission::QueueLimits;
use crate::body::{self, Collected, ProxyBody};
use crate::cache::{CACHE_STATUS, status as cache};
use crate::cache::{Cache, PrimaryKey, with_cache_status};
use crate::coalesce;
use crate::config::{Config, PartitionBy, WriteMode};
use crate::context::{Identity, RequestContext, Source};
use crate::credentials::Credentials;
use crate::error::{ProxyError, json_response, report};
use crate::events::{Event, Events};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::mutations::MutationDocs;
use crate::parts::Parts;
use crate::replay::classify;
use crate::route::Route;
use crate::store::{
    Coalesced, Enqueued, MutationRecord, MutationStatus, Store, StoreError, StoredRequest,
    StoredResponse, millis, now_ms,
};
use crate::upstream::{
    ForwardError, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, Upstream, UpstreamBody, header_pairs,
};

/// The outbox.
pub struct Outbox {
    store: Arc<dyn Store>,
    upstream: Upstream,
    health: Arc<Health>,
    events: Events,
    config: Arc<Config>,
    credentials: Arc<Credentials>,
    activity: Arc<Activity>,
    docs: Arc<MutationDocs>,
    metrics: Arc<Metrics>,
    /// The read cache: where `capture_version` finds the version of the copy served.
    cache: Arc<Cache>,
    limits: Arc<QueueLimits>,
    in_progress: Arc<Mutex<InProgressKeys>>,
    /// `queue.max_buffered_bytes`, in KiB: what the mutation bodies held at once may take.
    buffered: Arc<Semaphore>,
    /// Forwards running in tasks of their own (they go on when the app hangs up or holds a
    /// `write_timeout` 202): a graceful shutdown lets them settle (see [`Self::settle`]).
    forwards: tokio_util::task::TaskTracker,
}

impl Outbox {
    /// The outbox of `parts`, finding served versions in `cache`.
    pub fn new(parts: &Parts, cache: Arc<Cache>) -> Self {
        Self {
            store: parts.store.clone(),
            upstream: parts.upstream.clone(),
            health: parts.health.clone(),
            events: parts.events.clone(),
            config: parts.config.clone(),
            credentials: parts.credentials.clone(),
            activity: parts.activity.clone(),
            docs: parts.docs.clone(),
            metrics: parts.metrics.clone(),
            cache,
            limits: Arc::new(QueueLimits::new(parts.store.clone(), &parts.config.queue)),
            in_progress: Arc::default(),
            buffered: Arc::new(Semaphore::new(
                kib(parts.config.queue.max_buffered_bytes) as usize
            )),
            forwards: tokio_util::task::TaskTracker::new(),
        }
    }

    /// On shutdown, once the app connections are done: wait until `deadline` at most for the
    /// forwards still running to settle (their answers recorded under their keys). A forward
    /// cut short by the process ending would be sent again on the next start (its queued
    /// copy) or on the app's retry: a second delivery a graceful stop need not cause.
    pub async fn settle(&self, deadline: tokio::time::Instant) {
        // Every proxy thread comes here; the first one says so.
        let first = self.forwards.close();
        if self.forwards.is_empty() {
            return;
        }
        if first {
            tracing::info!(
                forwards = self.forwards.len(),
                "waiting for forwards under way to settle"
            );
        }
        if tokio::time::timeout_at(deadline, self.forwards.wait())
            .await
            .is_err()
            && first
        {
            tracing::warn!(
                forwards = self.forwards.len(),
                "shutdown grace elapsed with forwards still under way"
            );
        }
    }

    /// Let the credentials vault see a request (cheap unless mutations wait for credentials).
    pub fn offer_credentials(&self, headers: &HeaderMap) {
        if let Some((principal, creds, at)) = self.credentials.offer(headers) {
            // Another instance may be the one replaying the waiting mutation.
            let store = self.store.clone();
            tokio::spawn(async move {
                if let Err(e) = store.share_credentials(&principal, &creds, at).await {
                    tracing::warn!("could not share fresh credentials: {e}");
                }
            });
        }
    }

    /// Reserve room for a mutation body of the request's `Content-Length` (`limit` when it is
    /// unknown or larger) in `queue.max_buffered_bytes`, waiting while other bodies fill it.
    async fn reserve_body(
        &self,
        headers: &HeaderMap,
        limit: u64,
    ) -> Result<OwnedSemaphorePermit, ProxyError> {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let want = declared.map_or(limit, |n| n.min(limit));
        let permits = u32::try_from(kib(want)).unwrap_or(u32::MAX);
        self.buffered
            .clone()
            .acquire_many_owned(permits)
            .await
            .map_err(|_| ProxyError::NotStored(StoreError::Closed))
    }

    /// The write path (POST, PUT, PATCH, DELETE).
    pub async fn write(
        self: &Arc<Self>,
        ctx: &mut RequestContext,
        req: Request<ProxyBody>,
    ) -> Response<ProxyBody> {
        match self.try_write(ctx, req).await {
            Ok(resp) => resp,
            Err(e) => {
                ctx.source = Source::Outpost;
                with_cache_status(e.into_response(), cache::METHOD)
            }
        }
    }

    async fn try_write(
        self: &Arc<Self>,
        ctx: &mut RequestContext,
        req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (mut parts, incoming) = req.into_parts();
        // A key generated here (UUIDv7) is new by construction: no store lookup for it.
        let (key, generated) = match parts.headers.get(&IDEMPOTENCY_KEY) {
            Some(v) => (valid_key(v)?, false),
            None => (generated_key(), true),
        };
        ctx.idempotency_key = Some(key.clone());
        // The key belongs to this caller (whatever the route's caching says): nobody else gets
        // its 202, its stored answer or its status document.
        let identity = self.docs.owner(&parts.headers);
        let mode = ctx.route.write;
        let partition = partition_of(ctx.route.partition, &ctx.path_and_query);
        self.upstream.prepare(&mut parts, &ctx.client, false);
        parts.headers.insert(
            IDEMPOTENCY_KEY.clone(),
            HeaderValue::from_str(&key).map_err(|e| ProxyError::BadRequest(e.to_string()))?,
        );

        let limit = self.config.queue.max_body_bytes;
        // Held until this write is answered: bounds the bodies in memory at once.
        let _budget = self.reserve_body(&parts.headers, limit).await?;
        let body_bytes = match body::collect_limited(incoming, limit).await {
            Ok(Collected::Whole(b)) => b,
            Ok(Collected::TooLarge { prefix, rest }) => {
                // Too large to queue: it can only be forwarded, and only while nothing queues.
                let can_forward = match mode {
                    WriteMode::PassThrough => true,
                    WriteMode::WriteBehind => false,
                    WriteMode::QueueWhenOffline => {
                        self.health.is_online()
                            && !self.store.partition_has_pending(&partition).await?
                    }
                };
                if !can_forward {
                    return Err(ProxyError::BodyTooLarge { limit });
                }
                let req = Request::from_parts(parts, body::chain(prefix, rest));
                return match self.forward_unrecorded(ctx, req, &key).await {
                    Ok(resp) => Ok(resp),
                    // Not sent, the upstream is unreachable: it would have to be queued.
                    Err(ForwardError::Connect(_)) if mode == WriteMode::QueueWhenOffline => {
                        Err(ProxyError::BodyTooLarge { limit })
                    }
                    Err(ForwardError::Connect(_)) => Err(ProxyError::UpstreamUnreachable),
                    Err(ForwardError::Timeout(_)) => Err(ProxyError::GatewayTimeout),
                    // The app's own body broke off (over proxy.max_body_bytes, or cut).
                    Err(e) if e.request_body_too_large() => Err(ProxyError::BodyTooLarge {
                        limit: self.config.proxy.max_body_bytes,
                    }),
                    Err(e) if e.request_body_failed() => Err(ProxyError::BadRequest(format!(
                        "could not read the request body: {}",
                        report(&e)
                    ))),
                    Err(e @ ForwardError::Transport(_)) => Err(ProxyError::BadGateway(report(&e))),
                };
            }
            Err(e) => return Err(body_error(e, self.config.proxy.max_body_bytes)),
        };
        let fingerprint = fingerprint(&parts.method, &ctx.path_and_query, &body_bytes);

        let guard = match InProgress::take(&self.in_progress, &key, (identity.0, fingerprint)) {
            Ok(guard) => guard,
            // A duplicate of the same caller's request: 409 until the first is stored.
            Err(holder) if holder == (identity.0, fingerprint) => {
                return Err(ProxyError::KeyInProgress(key));
            }
            // Another caller's key, or another request: the same 422 as once it is stored,
            // revealing nothing of the first.
            Err(_) => return Err(ProxyError::KeyReused(key)),
        };
        // (The enqueue itself still refuses to store a key twice.)
        if !generated && let Some(existing) = self.store.mutation(&key).await? {
            return self.answer_existing(&mut ctx.source, &existing, &fingerprint, &identity);
        }
        let must_queue = match mode {
            WriteMode::WriteBehind => true,
            WriteMode::PassThrough => false,
            WriteMode::QueueWhenOffline => {
                !self.health.is_online() || self.store.partition_has_pending(&partition).await?
            }
        };
        parts.headers.remove(header::HOST);
        let record = MutationRecord {
            key: key.clone(),
            fingerprint,
            partition,
            seq: 0,
            accepted_at_ms: now_ms(),
            status: MutationStatus::Queued,
            attempts: 0,
            next_attempt_at_ms: 0,
            principal: self.credentials.principal_of(&parts.headers),
            route: ctx.route.name.clone(),
            request: StoredRequest {
                method: parts.method.to_string(),
                path_and_query: ctx.path_and_query.clone(),
                headers: parts
                    .headers
                    .iter()
                    .map(|(n, v)| (n.as_str().to_string(), Bytes::copy_from_slice(v.as_bytes())))
                    .collect(),
                body: body_bytes.clone(),
            },
            outcome: None,
            response: None,
            finished_at_ms: None,
            identity: Some(identity.0),
        };
        if must_queue {
            let mut record = record;
            if ctx.route.capture_version {
                self.capture_version(ctx, &mut record).await;
            }
            return self
                .enqueue_record(record, &fingerprint, &mut ctx.source, ctx.route.coalesce)
                .await;
        }
        // From here on the mutation is on its way upstream: finish it (answer recorded under
        // its key, or queued when the answer is lost) even if the app goes away meanwhile, so
        // that its retry with the same key gets the answer instead of a second send.
        // Should it be queued after all (the upstream refused the connection), it is a queued
        // write like any other: its version captured and coalesced as the route says.
        let queued_headers = if ctx.route.capture_version {
            let mut captured = record.clone();
            self.capture_version(ctx, &mut captured).await;
            Some(captured.request.headers)
        } else {
            None
        };
        let this = self.clone();
        let route = ctx.route.clone();
        let detachable = ctx.route.write_timeout.is_some() && mode != WriteMode::PassThrough;
        let (guard, copy) = if detachable {
            self.activity.forwarding(&record);
            (
                guard.settles(self.activity.clone()),
                Some(self.awaiting_copy(&record)),
            )
        } else {
            (guard, None)
        };
        let mut forward = self.forwards.spawn(async move {
            this.forward_and_record(record, queued_headers, fingerprint, mode, route, guard)
                .await
        });
        if let Some(limit) = ctx.route.write_timeout
            && mode != WriteMode::PassThrough
        {
            match tokio::time::timeout(limit, &mut forward).await {
                Ok(joined) => {
                    let (result, source) = joined
                        .map_err(|e| ProxyError::BadGateway(format!("forward task failed: {e}")))?;
                    ctx.source = source;
                    return result;
                }
                Err(_) => {
                    // The 202 is a promise: a copy of the mutation is stored durably first
                    // (replay sends it only if the forward's answer never gets recorded).
                    let stored = match copy {
                        Some(copy) => self.store_awaiting_copy(copy).await,
                        None => false,
                    };
                    if stored && self.activity.acknowledge(&key) {
                        // The forward goes on in its task and settles under the key (its
                        // answer kept, or replayed when none or a transient one comes): the
                        // app's retry with the key finds it, and until then it is pending.
                        tracing::info!(key = %key, "forward slower than write_timeout; answered 202");
                        ctx.source = Source::Queued;
                        return Ok(self.accepted_response(&key));
                    }
                    // The answer came just now (the app gets it, not a 202), or no copy could
                    // be stored (the app waits for the forward's own outcome).
                    let (result, source) = forward
                        .await
                        .map_err(|e| ProxyError::BadGateway(format!("forward task failed: {e}")))?;
                    // A transient answer is not the end of it when the copy is queued: it is
                    // replayed, so the app hears that it was accepted.
                    if stored
                        && let Ok(resp) = &result
                        && classify::is_transient(&ctx.route.classify, resp.status())
                    {
                        ctx.source = Source::Queued;
                        return Ok(self.accepted_response(&key));
                    }
                    ctx.source = source;
                    return result;
                }
            }
        }
        let (result, source) = forward
            .await
            .map_err(|e| ProxyError::BadGateway(format!("forward task failed: {e}")))?;
        ctx.source = source;
        result
    }

    /// Forward a buffered mutation and settle it: keep the upstream's final answer for
    /// idempotent replies, pass a transient one on, or queue the mutation when no answer came
    /// (with `queued_headers`, its headers with a captured version, when it was never sent).
    async fn forward_and_record(
        self: Arc<Self>,
        record: MutationRecord,
        queued_headers: Option<Vec<(String, Bytes)>>,
        fingerprint: [u8; 32],
        mode: WriteMode,
        route: Arc<Route>,
        guard: InProgress,
    ) -> (Result<Response<ProxyBody>, ProxyError>, Source) {
        let rules = route.classify.clone();
        // Built from the app's own request a moment ago, so it cannot fail; if it ever did,
        // the app hears so instead of another request going upstream.
        let req = match self.upstream.request_from_stored(&record.request, &[]) {
            Ok(req) => req,
            Err(e) => return (Err(ProxyError::BadRequest(e.to_string())), Source::Outpost),
        };
        let result = self.upstream.send(req).await;
        self.health.observe_for(&result, Some(&record.key));
        // Whether the app already holds a 202 (`write_timeout`): nobody waits for this answer.
        let detached = self.activity.claim(&record.key);
        let e = match result {
            Ok(resp) if detached && classify::is_transient(&rules, resp.status()) => {
                // Passing it on would lose the write: its queued copy is replayed after a
                // backoff.
                let delay = crate::replay::backoff::delay(&self.config.replay, 1, None);
                let outcome = format!(
                    "retryable: answered {} after its 202",
                    resp.status().as_u16()
                );
                tracing::info!(key = %record.key, status = resp.status().as_u16(), "a settling forward got a transient answer; its queued copy will be sent");
                self.settle_unsent(&record, outcome, delay).await;
                drop(guard);
                return (Ok(self.accepted_response(&record.key)), Source::Queued);
            }
            Ok(resp) => {
                return (
                    Ok(self
                        .answer_forwarded(record, resp, rules, guard, detached)
                        .await),
                    Source::Upstream,
                );
            }
            Err(e) => e,
        };
        if mode == WriteMode::PassThrough {
            let err = match e {
                ForwardError::Timeout(_) => ProxyError::GatewayTimeout,
                _ => ProxyError::UpstreamUnreachable,
            };
            return (Err(err), Source::Outpost);
        }
        if detached {
            if matches!(e, ForwardError::Connect(_)) {
                // Never sent: its queued copy goes as soon as the upstream is seen online.
                tracing::info!(key = %record.key, "a settling forward was not sent ({}); its queued copy will be", report(&e));
                let outcome = format!("retryable: not sent: {}", report(&e));
                self.settle_unsent(&record, outcome, Duration::ZERO).await;
            } else {
                self.settle_ambiguous(record, &e).await;
            }
            drop(guard);
            return (Err(ProxyError::GatewayTimeout), Source::Queued);
        }
        let mut record = record;
        match &e {
            // Not sent: it goes as soon as the upstream is seen online.
            ForwardError::Connect(_) => {
                record.outcome = Some(format!("retryable: not sent: {}", report(&e)));
                if let Some(headers) = queued_headers {
                    record.request.headers = headers;
                }
            }
            // Maybe applied: never sent again at once (an upstream that ignores the key would
            // apply it twice); the replay tries again after a backoff.
            ForwardError::Timeout(_) | ForwardError::Transport(_) => {
                let delay = crate::replay::backoff::delay(&self.config.replay, 1, None);
                record.attempts = 1;
                record.next_attempt_at_ms = now_ms().saturating_add(millis(delay));
                record.outcome = Some(format!("retryable: maybe applied: {}", report(&e)));
            }
        }
        tracing::info!(key = %record.key, "forward failed ({}); queued", report(&e));
        let mut ctx_source = Source::Queued;
        // Only a write that certainly never left may fold into another; on a `write_timeout`
        // route its own copy may already be queued.
        let coalesce = route.coalesce
            && route.write_timeout.is_none()
            && matches!(e, ForwardError::Connect(_));
        let result = self
            .enqueue_record(record, &fingerprint, &mut ctx_source, coalesce)
            .await;
        drop(guard);
        (result, ctx_source)
    }

    /// The upstream answered a forwarded mutation. A final answer is collected (up to
    /// `queue.max_body_bytes`), kept under the key and passed on; a transient one (retryable,
    /// or credentials refused) is passed on and not kept, so that the app's retry with the same
    /// key reaches the upstream again.
    async fn answer_forwarded(
        &self,
        mut record: MutationRecord,
        resp: Response<UpstreamBody>,
        rules: crate::config::ClassifyConfig,
        guard: InProgress,
        detached: bool,
    ) -> Response<ProxyBody> {
        let (mut parts, incoming) = resp.into_parts();
        crate::upstream::strip_hop_by_hop(&mut parts.headers);
        let stored_headers = header_pairs(&parts.headers);
        if let Ok(v) = HeaderValue::from_str(&record.key) {
            parts.headers.insert(IDEMPOTENCY_KEY.clone(), v);
        }
        parts.headers.insert(
            CACHE_STATUS.clone(),
            HeaderValue::from_static(cache::METHOD),
        );
        if classify::is_transient(&rules, parts.status) {
            drop(guard);
            return Response::from_parts(parts, body::boxed(incoming));
        }
        let (limit, deadline) = (
            self.config.queue.max_body_bytes,
            self.config.upstream.request_timeout,
        );
        let (kept, body) = match body::collect_within(incoming, limit, deadline).await {
            Ok(Collected::Whole(b)) => (b.clone(), body::full(b)),
            Ok(Collected::TooLarge { prefix, rest }) => (prefix.clone(), body::chain(prefix, rest)),
            // The upstream handled it (its head came) but the body broke or stalled: keep the
            // status.
            Err(e) => {
                tracing::warn!(key = %record.key, "the answer's body broke off: {e}");
                self.health.report_body_failure(&e, Some(&record.key));
                (Bytes::new(), body::empty())
            }
        };
        // The app gets the answer; what is kept is its classification, for the status document
        // and idempotent replies (not a dead letter: nothing to retry).
        let outcome = classify::classify(&rules, parts.status, &parts.headers, &kept);
        record.status = outcome.final_status().unwrap_or(MutationStatus::Succeeded);
        record.forget_request();
        record.outcome = Some(if detached {
            format!("{FORWARDED_AFTER_202}: {}", outcome.class())
        } else {
            format!("forwarded: {}", outcome.class())
        });
        record.attempts = 1;
        record.finished_at_ms = Some(now_ms());
        record.response = Some(StoredResponse {
            status: parts.status.as_u16(),
            headers: stored_headers,
            body: kept,
        });
        // On a `write_timeout` route a copy may be queued (stored before a 202): the answer is
        // also kept where replay looks before sending that copy, so it is never sent again.
        let answer_for_copy = guard.settling.is_some().then(|| MutationRecord {
            key: answer_key(&record.key),
            ..record.clone()
        });
        // Kept (durably) before the app hears the answer: an app that retries with the key
        // after a crash, or through another instance sharing the store, finds the answer
        // instead of sending the write again. This runs in the forward's own task, which goes
        // on when the app hangs up. Until it is kept the key is in progress (a retry meanwhile
        // gets 409).
        if let Some(answer) = answer_for_copy {
            if let Err(e) = self.store.record_forwarded(answer).await {
                tracing::warn!("could not keep the answer for the queued copy: {e}");
            }
            self.activity.wake();
        }
        if let Err(e) = self.store.record_forwarded(record).await {
            tracing::warn!("could not keep the answer for idempotent replies: {e}");
        }
        drop(guard);
        parts.headers.remove(header::CONTENT_LENGTH);
        Response::from_parts(parts, body)
    }

    /// A forward the app holds a `202` for (`write_timeout`) ended without effect: it was
    /// never sent, or the upstream answered transiently (`outcome`). Replay finds this under
    /// [`answer_key`], still pending, and sends the queued copy `after` from now, like any
    /// queued write; without it, a copy whose forward left nothing is taken to have been cut
    /// by a stop of outpost after it may have been applied, and is dead-lettered.
    async fn settle_unsent(&self, record: &MutationRecord, outcome: String, after: Duration) {
        let mut unsent = MutationRecord {
            key: answer_key(&record.key),
            status: MutationStatus::Queued,
            outcome: Some(outcome),
            attempts: 1,
            next_attempt_at_ms: now_ms().saturating_add(millis(after)),
            // The retention sweep goes by this time: the marker is kept as long as its copy may
            // wait to be sent (`queue.max_age`, after which the copy expires), not just
            // `queue.idempotency_retention`, or a long outage would leave the copy looking
            // like a forward cut by a stop.
            finished_at_ms: Some(now_ms().saturating_add(millis(self.config.queue.max_age))),
            response: None,
            ..record.clone()
        };
        unsent.forget_request();
        if let Err(e) = self.store.record_forwarded(unsent).await {
            tracing::error!(
                key = %record.key,
                "could not record that a forward after its 202 was not applied ({e}); its \
                 queued copy will be dead-lettered as maybe applied"
            );
        }
        self.activity.wake();
    }

    /// A forward the app holds a `202` for (`write_timeout`) failed after it may have been
    /// applied (no answer within `upstream.request_timeout`, or the connection broke after the
    /// request was sent). Its queued copy is not sent: an upstream that ignores
    /// `Idempotency-Key` would apply it twice, and a `write_timeout` write is never sent twice.
    /// The copy goes to the dead letters instead, saying why, for an operator (or the app) to
    /// retry once it is known that the upstream did not apply it, or to drop. What replay finds
    /// under [`answer_key`] settles the copy, on every instance sharing the store.
    async fn settle_ambiguous(&self, mut record: MutationRecord, e: &ForwardError) {
        mark_maybe_applied(
            &mut record,
            &format!("its forward after the 202 got no answer ({})", report(e)),
            now_ms(),
        );
        tracing::warn!(
            key = %record.key,
            "{}",
            record.outcome.as_deref().unwrap_or_default()
        );
        record.key = answer_key(&record.key);
        record.attempts = 1;
        record.forget_request();
        if let Err(e) = self.store.record_forwarded(record).await {
            tracing::error!(
                "could not record that a forward after its 202 may have been applied ({e}); \
                 its queued copy will be dead-lettered as maybe applied once the forward is \
                 surely over"
            );
        }
        self.activity.wake();
    }

    /// Store a mutation durably and answer 202 (or answer the key that already exists); with
    /// `coalesce`, fold it into the pending write of its URI when it may be.
    async fn enqueue_record(
        &self,
        record: MutationRecord,
        fingerprint: &[u8; 32],
        source: &mut Source,
        coalesce: bool,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let key = record.key.clone();
        let partition = record.partition.clone();
        let identity = Identity(record.identity.unwrap_or_default());
        // Within `queue.max_depth` and `queue.max_bytes`, or 503 queue_full: nothing stored.
        let admitted = self.limits.admit(record.request.body.len() as u64).await?;
        let started = std::time::Instant::now();
        if coalesce {
            let folded = self.coalesce(&record).await;
            match folded? {
                Some(Coalesced::Folded { .. }) => {
                    self.metrics
                        .store_commit()
                        .record(started.elapsed().as_secs_f64());
                    *source = Source::Queued;
                    self.events.emit(Event::Queued {
                        key: key.clone(),
                        partition,
                    });
                    self.wake_replay();
                    return Ok(self.accepted_response(&key));
                }
                Some(Coalesced::Existing(existing)) => {
                    return self.answer_existing(source, &existing, fingerprint, &identity);
                }
                Some(Coalesced::Stale) | None => {}
            }
        }
        let enqueued = self.store.enqueue(record).await;
        self.metrics
            .store_commit()
            .record(started.elapsed().as_secs_f64());
        match enqueued? {
            Enqueued::Accepted { .. } => {
                admitted.stored();
                *source = Source::Queued;
                self.events.emit(Event::Queued {
                    key: key.clone(),
                    partition,
                });
                self.wake_replay();
                Ok(self.accepted_response(&key))
            }
            // Another instance stored the same key first.
            Enqueued::Existing(existing) => {
                Ok(self.answer_existing(source, &existing, fingerprint, &identity)?)
            }
        }
    }

    /// Fold `record` into the pending write of its URI (route `coalesce`; the rules are
    /// [`crate::coalesce`]'s). `None` when there is nothing it may fold into, or the queue kept
    /// changing under it: it is then enqueued at the tail as usual.
    async fn coalesce(&self, record: &MutationRecord) -> Result<Option<Coalesced>, ProxyError> {
        if !matches!(record.request.method.as_str(), "PUT" | "PATCH" | "DELETE") {
            return Ok(None);
        }
        for _ in 0..COALESCE_ATTEMPTS {
            // The write to fold into is usually among the last few: look further only if not.
            let mut tail = self
                .store
                .peek_tail(&record.partition, coalesce::FIRST_LOOK)
                .await?;
            if tail.len() == coalesce::FIRST_LOOK && coalesce::target(&tail, record).is_none() {
                tail = self
                    .store
                    .peek_tail(&record.partition, coalesce::WINDOW)
                    .await?;
            }
            let Some(tail_seq) = tail.first().map(|r| r.seq) else {
                return Ok(None);
            };
            let Some(older) = coalesce::target(&tail, record) else {
                return Ok(None);
            };
            let max = self.config.queue.max_body_bytes;
            let Some(request) = coalesce::fold(&older.request, &record.request, max) else {
                return Ok(None);
            };
            let mut merged = record.clone();
            merged.request = request;
            match self
                .store
                .enqueue_coalesced(merged, older, tail_seq)
                .await?
            {
                Coalesced::Folded { seq } => {
                    tracing::debug!(key = %record.key, folded = %older.key, seq, "coalesced");
                    self.events.emit(Event::Coalesced {
                        key: older.key.clone(),
                        into: record.key.clone(),
                    });
                    return Ok(Some(Coalesced::Folded { seq }));
                }
                Coalesced::Stale => continue,
                existing @ Coalesced::Existing(_) => return Ok(Some(existing)),
            }
        }
        Ok(None)
    }

    /// `capture_version`: a write that carries no precondition gets the version of the copy
    /// outpost served the caller for its URI (`If-Match` with its `ETag`, else
    /// `If-Unmodified-Since` with its `Last-Modified`), marked as captured for the replay.
    async fn capture_version(&self, ctx: &RequestContext, record: &mut MutationRecord) {
        let request = &mut record.request;
        if !matches!(request.method.as_str(), "PUT" | "PATCH" | "DELETE")
            || request
                .headers
                .iter()
                .any(|(n, _)| coalesce::is_precondition(n))
        {
            return;
        }
        let headers: HeaderMap = request
            .headers
            .iter()
            .filter_map(|(n, v)| {
                Some((
                    HeaderName::from_bytes(n.as_bytes()).ok()?,
                    HeaderValue::from_bytes(v).ok()?,
                ))
            })
            .collect();
        let primary = PrimaryKey::new(
            &Method::GET,
            &ctx.host,
            &request.path_and_query,
            &ctx.identity,
        );
        let Some(copy) = self.cache.get(&primary, &headers).await else {
            return;
        };
        let header = |name: &str| {
            copy.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let precondition = match (header("etag"), header("last-modified")) {
            // A weak ETag never matches `If-Match` (RFC 9110 13.1.1): only a strong one is used.
            (Some(etag), _) if !etag.starts_with(b"W/") => ("if-match", etag),
            (_, Some(date)) => ("if-unmodified-since", date),
            _ => return,
        };
        tracing::debug!(key = %record.key, precondition = precondition.0, "version captured");
        request
            .headers
            .push((CAPTURED_VERSION.to_string(), Bytes::from_static(b"1")));
        request
            .headers
            .push((precondition.0.to_string(), precondition.1));
    }

    /// The answer to a key that is already known.
    fn answer_existing(
        &self,
        source: &mut Source,
        existing: &MutationRecord,
        fingerprint: &[u8; 32],
        caller: &Identity,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        // Another caller's key (or one whose owner is unknown) is not this caller's to reuse:
        // the same 422 as a reuse with another request, revealing nothing of the first.
        if existing.identity != Some(caller.0) || existing.fingerprint != *fingerprint {
            return Err(ProxyError::KeyReused(existing.key.clone()));
        }
        if existing.status.is_pending() {
            *source = Source::Queued;
            return Ok(self.accepted_response(&existing.key));
        }
        if let Some(into) = existing.coalesced_into() {
            // Still accepted: its change travels under the newer key.
            *source = Source::Queued;
            let mut resp = self.accepted_response(&existing.key);
            *resp.body_mut() = body::full(Bytes::from(
                serde_json::json!({
                    "status": "coalesced",
                    "idempotency_key": existing.key,
                    "location": self.docs.location(&existing.key),
                    "coalesced_into": into,
                })
                .to_string(),
            ));
            return Ok(resp);
        }
        *source = Source::IdempotentReplay;
        let mut resp = match &existing.response {
            Some(stored) => stored_response(stored),
            // Finished without an answer of the upstream's to give (dead-lettered as maybe
            // applied or after its attempts, dropped, expired): its status document, under a
            // status that is no success, so that an app retrying until it gets a 2xx stops
            // there. 409: the key's state is final; an operator's retry can change it.
            None => json_response(StatusCode::CONFLICT, &self.docs.document(existing)),
        };
        let headers = resp.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&existing.key) {
            headers.insert(IDEMPOTENCY_KEY.clone(), v);
        }
        headers.insert(
            IDEMPOTENT_REPLAYED.clone(),
            HeaderValue::from_static("true"),
        );
        headers.insert(
            CACHE_STATUS.clone(),
            HeaderValue::from_static(cache::IDEMPOTENT),
        );
        Ok(resp)
    }

    /// The copy of a forward on a `write_timeout` route that is queued before the app gets its
    /// `202`: marked as awaiting the forward's answer, and not due before the forward has
    /// surely ended (`upstream.request_timeout` after it started, and a second more).
    fn awaiting_copy(&self, record: &MutationRecord) -> MutationRecord {
        let mut copy = record.clone();
        copy.attempts = 1;
        copy.outcome = Some(AWAITING_FORWARD.to_owned());
        copy.request
            .headers
            .push((FORWARDED_BEFORE_202.to_owned(), Bytes::from_static(b"1")));
        copy.next_attempt_at_ms = now_ms()
            .saturating_add(millis(self.config.upstream.request_timeout))
            .saturating_add(1000);
        copy
    }

    /// Store the awaiting copy durably; whether it is queued now (false: the app must wait for
    /// the forward's own outcome instead of a `202`).
    async fn store_awaiting_copy(&self, copy: MutationRecord) -> bool {
        let key = copy.key.clone();
        let partition = copy.partition.clone();
        match self.store.enqueue(copy).await {
            Ok(Enqueued::Accepted { .. }) => {
                self.events.emit(Event::Queued { key, partition });
                true
            }
            Ok(Enqueued::Existing(_)) => false,
            Err(e) => {
                tracing::warn!(key = %key, "could not queue a slow forward for its 202 ({e}); waiting for its answer");
                false
            }
        }
    }

    /// A mutation was queued: wake the replayer, unless the upstream is offline. Replay cannot
    /// start then, and the replayer looks for pending partitions itself when the upstream comes
    /// back (after this write's commit, so it finds it); waking it for every write queued
    /// during an outage cost a thread wake-up per acknowledged write.
    fn wake_replay(&self) {
        if self.health.is_online() {
            self.activity.wake();
        }
    }

    /// `202 Accepted` for a queued mutation.
    fn accepted_response(&self, key: &str) -> Response<ProxyBody> {
        /// The body, serialized straight from borrowed fields (a `json!` value built a map per
        /// acknowledged write); fields in the order a `json!` object prints them.
        #[derive(serde::Serialize)]
        struct Accepted<'a> {
            idempotency_key: &'a str,
            location: &'a str,
            status: &'static str,
        }
        let location = self.docs.location(key);
        let body = serde_json::to_vec(&Accepted {
            idempotency_key: key,
            location: &location,
            status: "queued",
        })
        .unwrap_or_default();
        let mut resp = Response::new(crate::body::full(Bytes::from(body)));
        *resp.status_mut() = StatusCode::ACCEPTED;
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Ok(v) = HeaderValue::from_str(key) {
            headers.insert(IDEMPOTENCY_KEY.clone(), v);
        }
        if let Ok(v) = HeaderValue::from_str(&location) {
            headers.insert(header::LOCATION, v);
        }
        headers.insert(
            CACHE_STATUS.clone(),
            HeaderValue::from_static(cache::QUEUED),
        );
        resp
    }

    /// Forward a body too large to queue or record (streamed through).
    async fn forward_unrecorded(
        &self,
        ctx: &mut RequestContext,
        mut req: Request<ProxyBody>,
        key: &str,
    ) -> Result<Response<ProxyBody>, ForwardError> {
        *req.uri_mut() = self.upstream.uri_for(&ctx.path_and_query);
        let result = self.upstream.send(req).await;
        self.health.observe(&result);
        let (mut parts, incoming) = result?.into_parts();
        ctx.source = Source::Upstream;
        crate::upstream::strip_hop_by_hop(&mut parts.headers);
        if let Ok(v) = HeaderValue::from_str(key) {
            parts.headers.insert(IDEMPOTENCY_KEY.clone(), v);
        }
        Ok(Response::from_parts(parts, body::boxed(incoming)))
    }
}

/// The outcome of a copy queued before a `write_timeout` 202 while its forward goes on: replay
/// finishes it with the forward's answer (kept under [`answer_key`]) instead of sending it, and
/// sends it only when the forward recorded there that it had no effect (never sent, or a
/// transient answer). A forward that recorded nothing was cut by a stop of outpost: its copy
/// is dead-lettered as `maybe applied`, not sent.
pub const AWAITING_FORWARD: &str = "in flight: forwarded before its 202 (write_timeout)";

/// The request header that marks a copy queued before a `write_timeout` 202 (replay drops it
/// before sending). Such a write is never sent twice: outpost sends it again only when it
/// surely was not applied (a transient answer such as `503`, a refused connection); when a
/// send may have been applied without an answer (no answer in time, a broken connection, or a
/// stop of outpost while the forward was under way), it is dead-lettered
/// ([`mark_maybe_applied`]) instead of being tried again.
pub const FORWARDED_BEFORE_202: &str = "outpost-forwarded-before-202";

/// Finish a `write_timeout` write as a dead letter at `now` (ms) because a send of it may have
/// been applied without an answer (`what` happened): it is not sent again unless an operator
/// retries it.
pub fn mark_maybe_applied(record: &mut MutationRecord, what: &str, now: u64) {
    record.status = MutationStatus::Rejected;
    record.outcome = Some(format!(
        "maybe applied: {what}; not sent again (write_timeout: never sent twice): retry it if \
         the upstream did not apply it"
    ));
    record.response = None;
    record.finished_at_ms = Some(now);
}

/// The outcome prefix of a forward's answer that came after the app's `202`.
pub const FORWARDED_AFTER_202: &str = "forwarded after its 202";

/// A new key: a UUIDv7 of the time in ms and 74 random bits from the thread's generator
/// (`Uuid::now_v7` asked the kernel for its random bits, a `getrandom` call per write).
fn generated_key() -> String {
    use rand::RngCore as _;
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, millis);
    let mut random = [0u8; 10];
    rand::rng().fill_bytes(&mut random);
    let key = uuid::Builder::from_unix_timestamp_millis(ms, &random).into_uuid();
    let mut buf = uuid::Uuid::encode_buffer();
    key.hyphenated().encode_lower(&mut buf).to_owned()
}

/// `record` as the app should see it: a copy queued before a `write_timeout` 202 whose
/// forward has settled, but which replay has not finished yet (replay may wait for the
/// upstream to be seen online), is shown with its forward's outcome (the answer, or a dead
/// letter as `maybe applied`), which replay will finish it with, rather than as a queued
/// write (status document, pending lists, overlays).
pub async fn as_settled(
    store: &dyn Store,
    activity: &Activity,
    mut record: MutationRecord,
) -> MutationRecord {
    if record.outcome.as_deref() != Some(AWAITING_FORWARD) || activity.is_in_flight(&record.key) {
        return record;
    }
    if let Ok(Some(answer)) = store.mutation(&answer_key(&record.key)).await {
        record.status = answer.status;
        record.outcome = answer.outcome;
        record.response = answer.response;
        record.finished_at_ms = answer.finished_at_ms;
    }
    record
}

/// Where the answer of a forward whose copy may be queued is kept: a key no app can send
/// (`Idempotency-Key` values are visible ASCII).
pub fn answer_key(key: &str) -> String {
    format!("{key}\u{0}forward-answer")
}

/// How often a fold is tried again when the queue changed between reading and writing.
const COALESCE_ATTEMPTS: usize = 3;

/// The request header that marks a precondition outpost added (`capture_version`): replay
/// drops it before sending, and drops the captured precondition too once an earlier write of
/// the same URI and caller succeeded (the version then moved by outpost's own write).
pub const CAPTURED_VERSION: &str = "outpost-captured-version";

/// Keys being stored or forwarded now, each with its caller's identity and its request's
/// fingerprint.
type InProgressKeys = HashMap<String, ([u8; 32], [u8; 32])>;

/// A key reserved while its first request is being stored or forwarded (409 for the same
/// caller's duplicates, 422 for anyone else).
pub struct InProgress {
    set: Arc<Mutex<InProgressKeys>>,
    key: String,
    /// A forward that may outlive `write_timeout`: it has settled when the guard goes.
    settling: Option<Arc<Activity>>,
}

impl InProgress {
    /// The key for this caller and request, or who holds it now (identity, fingerprint).
    fn take(
        set: &Arc<Mutex<InProgressKeys>>,
        key: &str,
        owner: ([u8; 32], [u8; 32]),
    ) -> Result<Self, ([u8; 32], [u8; 32])> {
        let mut keys = set.lock().unwrap_or_else(|e| e.into_inner());
        match keys.entry(key.to_string()) {
            std::collections::hash_map::Entry::Occupied(held) => Err(*held.get()),
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(owner);
                Ok(InProgress {
                    set: set.clone(),
                    key: key.to_string(),
                    settling: None,
                })
            }
        }
    }

    /// Tell `activity` that the forward has settled when this guard goes (its answer recorded,
    /// or the mutation queued, by then).
    fn settles(mut self, activity: Arc<Activity>) -> Self {
        self.settling = Some(activity);
        self
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        if let Some(activity) = &self.settling {
            activity.settled(&self.key);
        }
        if let Ok(mut set) = self.set.lock() {
            set.remove(&self.key);
        }
    }
}

/// Validate an app's `Idempotency-Key`: 1–255 visible ASCII characters.
pub(crate) fn valid_key(v: &HeaderValue) -> Result<String, ProxyError> {
    let bytes = v.as_bytes();
    if bytes.is_empty() || bytes.len() > 255 || !bytes.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(ProxyError::BadRequest(
            "Idempotency-Key must be 1-255 visible ASCII characters".into(),
        ));
    }
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

/// A request body that could not be read: over `limit` (413), or broken (400).
pub(crate) fn body_error(e: crate::body::BoxError, limit: u64) -> ProxyError {
    if e.downcast_ref::<http_body_util::LengthLimitError>()
        .is_some()
    {
        ProxyError::BodyTooLarge { limit }
    } else {
        ProxyError::BadRequest(format!("could not read the request body: {e}"))
    }
}

/// The partition of a mutation.
pub fn partition_of(by: PartitionBy, path_and_query: &str) -> String {
    match by {
        PartitionBy::Upstream => "upstream".into(),
        PartitionBy::Path => {
            // Every spelling of a path is one resource: `/items/%70%31` queues behind
            // `/items/p1`, not beside it.
            let path = path_and_query.split('?').next().unwrap_or("/");
            format!("path:{}", crate::proxy::path::equivalence_form(path))
        }
    }
}

/// SHA-256 over method, path and body: a reused key must come with the same request.
pub fn fingerprint(method: &Method, path_and_query: &str, body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(method.as_str().as_bytes());
    h.update(b"\0");
    h.update(path_and_query.as_bytes());
    h.update(b"\0");
    h.update(body);
    h.finalize().into()
}

fn stored_response(stored: &StoredResponse) -> Response<ProxyBody> {
    let mut resp = Response::new(body::full(stored.body.clone()));
    *resp.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    for (n, v) in &stored.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            resp.headers_mut().append(n, v);
        }
    }
    resp.headers_mut().remove(header::CONTENT_LENGTH);
    resp
}

/// `bytes` in KiB, rounded up (at least one).
fn kib(bytes: u64) -> u64 {
    bytes.div_ceil(1024).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_uuid_v7_valid_and_distinct() {
        let a = generated_key();
        let b = generated_key();
        assert_ne!(a, b);
        let parsed = uuid::Uuid::parse_str(&a).expect("a UUID");
        assert_eq!(parsed.get_version_num(), 7);
        assert_eq!(parsed.hyphenated().to_string(), a, "lower-case, hyphenated");
        assert!(valid_key(&HeaderValue::from_str(&a).expect("header")).is_ok());
    }

    #[test]
    fn keys_are_validated() {
        assert!(valid_key(&HeaderValue::from_static("abc-123")).is_ok());
        assert!(valid_key(&HeaderValue::from_static("has space")).is_err());
        let long = "a".repeat(256);
        assert!(valid_key(&HeaderValue::from_str(&long).expect("value")).is_err());
        let max = "a".repeat(255);
        assert!(valid_key(&HeaderValue::from_str(&max).expect("value")).is_ok());
    }

    #[test]
    fn partitions() {
        assert_eq!(partition_of(PartitionBy::Upstream, "/a?b"), "upstream");
        assert_eq!(
            partition_of(PartitionBy::Path, "/orders/1?x=1"),
            "path:/orders/1"
        );
        assert_eq!(
            partition_of(PartitionBy::Path, "/orders/%31?x=1"),
            "path:/orders/1"
        );
    }
}
