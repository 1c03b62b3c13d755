//! Draining the outbox: per-partition FIFO replay with backoff, a rate limit and
//! classification.
//!
//! One supervisor loop ([`Replayer::run`]) starts a drain task per partition that has pending
//! items (at most `replay.concurrency` at once), after taking the partition's lease from the
//! store (always granted by the embedded store; exclusive across instances with Redis). A drain
//! walks its partition head-first and never skips an item: a retryable answer, or a 401 waiting
//! for fresh credentials, stops the partition until that item can go again, so nothing
//! overtakes it. Dead letters leave the partition and the drain goes on.
//!
//! Wake-ups: a new mutation queued ([`Activity::wake`]), the upstream coming back online
//! ([`Health::watch`]), credentials offered by the app, and a half-second tick (which also
//! finds items other instances queued in a shared Redis).
//!
//! Crash safety: progress is saved after each answer. An item whose answer was lost to a crash
//! is sent again with the same `Idempotency-Key`, so the upstream applies it once.

pub mod backoff;
pub mod classify;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http::header::{self, HeaderName, HeaderValue};
use tokio::task::JoinSet;

use crate::activity::Activity;
use crate::body::{self, Collected};
use crate::config::{Config, ConflictPolicy};
use crate::credentials::Credentials;
use crate::error::report;
use crate::events::{Event, Events};
use crate::health::Health;
use crate::outbox::{
    AWAITING_FORWARD, CAPTURED_VERSION, FORWARDED_BEFORE_202, answer_key, mark_maybe_applied,
};
use crate::parts::Parts;
use crate::route::RouteTable;
use crate::shutdown::Shutdown;
use crate::store::{
    Lease, MutationRecord, MutationStatus, SERVER_WINS, Store, StoreError, StoredRequest,
    StoredResponse, millis, now_ms, rfc3339_ms,
};
use crate::upstream::{
    ForwardError, IDEMPOTENCY_KEY, UnsendableRequest, Upstream, UpstreamService, header_pairs,
};
use classify::Outcome;

/// Items read from a partition at a time.
const PEEK_BATCH: usize = 64;
/// Most answers a drain leaves to background recording (progress window) before it waits.
const MAX_UNSETTLED: usize = 1024;
/// How often the supervisor looks for partitions without being woken.
const TICK: Duration = Duration::from_millis(500);
/// How long an announced wait for credentials lasts unless renewed (the drain renews it
/// about every second while the item waits).
const AUTH_ANNOUNCE: Duration = Duration::from_secs(5);
/// How often finished records past retention are purged.
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// First wait before recording an answer again after the store refused it; doubles up to
/// [`STORE_RETRY_MAX`].
const STORE_RETRY: Duration = Duration::from_millis(100);
const STORE_RETRY_MAX: Duration = Duration::from_secs(5);

/// What a drain does after one item.
enum Step {
    /// Go on with the next item: this one is done with (finished, or no longer queued), and
    /// the drain does not read it again.
    Next,
    /// The partition waits (until the given time at the latest).
    Wait(u64),
}

/// How one send went, before classification.
enum Sent {
    /// The upstream answered (the body may be cut at `queue.max_body_bytes`).
    Answered {
        outcome: Outcome,
        response: StoredResponse,
    },
    /// No connection could be made: the request certainly did not leave.
    Refused(String),
    /// The exchange broke after the request may have been sent, or no answer came in time:
    /// the upstream may have applied it.
    Ambiguous { reason: String, timeout: bool },
    /// The stored request cannot be rebuilt as the app sent it: nothing was sent.
    Unsendable(UnsendableRequest),
}

/// Which write records an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// The item stays pending with a new state (`Store::update`).
    Update,
    /// The item is done (`Store::finish`).
    Finish,
}

/// One finish recorded in the background: hands back its key once durable, or its record (and
/// why) when it must be recorded again.
type Recording =
    Pin<Box<dyn Future<Output = Result<String, (Box<MutationRecord>, StoreError)>> + Send>>;

/// Finishes recorded in the background under a progress window, and the keys they are for
/// (skipped by the next peeks until they are settled). The drain polls them itself (when it
/// records one, before each send, and when it settles) instead of spawning a task per item:
/// a task per answer cost a spawn, a join and often a wake-up of another worker thread.
#[derive(Default)]
struct Finishing {
    tasks: FuturesUnordered<Recording>,
    keys: HashSet<String>,
    /// URIs (with the caller) this drain wrote successfully: a later item of the same URI and
    /// caller drops the version outpost captured for it (`capture_version`), which outpost's own
    /// write has moved on. Forgotten with the drain: after a restart such an item meets a
    /// conflict instead (the safe side).
    written: HashSet<(Option<[u8; 32]>, String)>,
}

/// Most URIs a drain remembers in [`Finishing::written`] before it starts afresh.
const MAX_WRITTEN: usize = 100_000;

/// The replay engine.
pub struct Replayer {
    store: Arc<dyn Store>,
    /// Builds the requests (URI, `Host`, stored headers).
    upstream: Upstream,
    /// Sends them.
    service: UpstreamService,
    health: Arc<Health>,
    events: Events,
    config: Arc<Config>,
    routes: Arc<RouteTable>,
    credentials: Arc<Credentials>,
    activity: Arc<Activity>,
    limiter: Option<DefaultDirectRateLimiter>,
    /// `replay.accepted_at_header` (`None` when empty).
    accepted_at_header: Option<HeaderName>,
    paused: AtomicBool,
    shutdown: Shutdown,
    /// When this replayer was made (ms): what an exclusive store holds from before then was
    /// left by an earlier process (see [`Self::settle_awaiting`]).
    started_at_ms: u64,
}

impl Replayer {
    /// A replayer draining the store of `parts` through its upstream client, until `shutdown`.
    pub fn new(parts: &Parts, shutdown: Shutdown) -> Self {
        Self::with_service(parts, parts.upstream.service(), shutdown)
    }

    /// A replayer that sends through `service` (a fake upstream in unit tests).
    pub fn with_service(parts: &Parts, service: UpstreamService, shutdown: Shutdown) -> Self {
        let config = parts.config.clone();
        let limiter = NonZeroU32::new(config.replay.rate_limit).map(|rate| {
            let burst = NonZeroU32::new(config.replay.rate_burst).unwrap_or(rate);
            RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
        });
        Self {
            store: parts.store.clone(),
            upstream: parts.upstream.clone(),
            service,
            health: parts.health.clone(),
            events: parts.events.clone(),
            config,
            routes: parts.routes.clone(),
            credentials: parts.credentials.clone(),
            activity: parts.activity.clone(),
            limiter,
            accepted_at_header: HeaderName::from_bytes(
                parts.config.replay.accepted_at_header.as_bytes(),
            )
            .ok(),
            paused: AtomicBool::new(false),
            shutdown,
            started_at_ms: now_ms(),
        }
    }

    /// Stop replaying (drains finish their current item).
    pub fn pause(&self) {
        self.paused.store(true, Ordering::Release);
    }

    /// Resume replaying at once.
    pub fn resume(&self) {
        self.paused.store(false, Ordering::Release);
        self.activity.wake();
    }

    /// Whether replay is paused.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    fn may_run(&self) -> bool {
        !self.is_paused() && self.health.is_online() && !self.shutdown.is_triggered()
    }

    /// Supervise drains until shutdown.
    pub async fn run(self: Arc<Self>) {
        let mut drains = Drains::default();
        let mut health = self.health.watch();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_purge = Instant::now();
        loop {
            if self.may_run() {
                self.start_drains(&mut drains).await;
            }
            match self.store.anyone_waiting().await {
                Ok(waiting) => self.credentials.set_elsewhere_waiting(waiting),
                Err(e) => tracing::debug!("cannot tell whether credentials are wanted: {e}"),
            }
            if last_purge.elapsed() >= PURGE_EVERY {
                last_purge = Instant::now();
                self.purge().await;
            }
            tokio::select! {
                _ = self.shutdown.wait() => break,
                _ = self.activity.woken() => {}
                _ = health.changed() => {}
                Some(done) = drains.tasks.join_next_with_id() => self.drain_ended(&mut drains, done).await,
                _ = tick.tick() => {}
            }
        }
        // Drains see the shutdown too; let them finish the item in hand, within
        // `proxy.shutdown_grace` (an upstream that keeps an item's answer back would otherwise
        // hold the stop for up to `upstream.request_timeout`). An item still in flight then is
        // cut like one at a crash: sent again after the restart, the contract's one re-delivery.
        let grace = tokio::time::sleep(self.config.proxy.shutdown_grace);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                done = drains.tasks.join_next_with_id() => match done {
                    Some(done) => self.drain_ended(&mut drains, done).await,
                    None => break,
                },
                () = &mut grace => {
                    tracing::warn!(
                        drains = drains.tasks.len(),
                        "shutdown grace elapsed with replays in flight; they are cut (each \
                         item is sent again after the restart)"
                    );
                    drains.tasks.abort_all();
                    break;
                }
            }
        }
    }

    /// A drain task ended; one that panicked is logged, its lease released, and its partition
    /// left alone for a while instead of staying "running" for ever.
    async fn drain_ended(
        &self,
        drains: &mut Drains,
        done: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
    ) {
        let id = match &done {
            Ok((id, ())) => *id,
            Err(e) => e.id(),
        };
        let Some(lease) = drains.running.remove(&id) else {
            return;
        };
        if done.is_ok() {
            drains.resting.remove(&lease.partition);
        }
        if let Err(e) = done {
            let pause = drains.pause_after_failure(&lease.partition);
            tracing::error!(
                partition = %lease.partition,
                "replay of the partition failed ({e}); starting it again in {pause:?}"
            );
            if let Err(e) = self.store.release(&lease).await {
                tracing::debug!("lease release failed: {e}");
            }
        }
    }

    async fn start_drains(self: &Arc<Self>, drains: &mut Drains) {
        let partitions = match self.store.pending_partitions().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("cannot list partitions: {e}");
                return;
            }
        };
        for partition in partitions {
            if drains.running.len() >= self.config.replay.concurrency {
                break;
            }
            if drains.is_running(&partition) || drains.is_resting(&partition) {
                continue;
            }
            let lease = match self.store.acquire(&partition).await {
                Ok(Some(lease)) => lease,
                Ok(None) => continue, // another instance replays it
                Err(e) => {
                    tracing::warn!(partition, "cannot take lease: {e}");
                    continue;
                }
            };
            let this = self.clone();
            let task_lease = lease.clone();
            let handle = drains.tasks.spawn(async move {
                let lease = task_lease;
                if let Err(e) = this.drain(&lease).await {
                    tracing::warn!(partition = %lease.partition, "replay stopped: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                if let Err(e) = this.store.release(&lease).await {
                    tracing::debug!("lease release failed: {e}");
                }
            });
            drains.running.insert(handle.id(), lease);
        }
    }

    /// Replay one partition head-first until it is empty or must wait.
    async fn drain(&self, lease: &Lease) -> Result<(), StoreError> {
        let mut finishing = Finishing::default();
        let result = self.drain_batches(lease, &mut finishing).await;
        // Finished items must be recorded before the lease is given back.
        let settled = self.settle(lease, &mut finishing).await;
        result.and(settled)
    }

    /// The drain loop: a batch of items head-first (their answers recorded as the progress
    /// setting says), then the next batch.
    async fn drain_batches(
        &self,
        lease: &Lease,
        finishing: &mut Finishing,
    ) -> Result<(), StoreError> {
        let renew_every = self.config.store.redis_lease / 3;
        let mut renewed = Instant::now();
        // The sequence number of the last item done with (finished, or no longer queued): the
        // items before it are never read again. Those whose answers are still being recorded
        // in the background are not sent again either way.
        let mut done_with = 0;
        loop {
            if !self.may_run() {
                return Ok(());
            }
            let mut items = self
                .store
                .peek_after(&lease.partition, done_with, PEEK_BATCH)
                .await?;
            items.retain(|item| !finishing.keys.contains(&item.key));
            if items.is_empty() {
                if finishing.keys.is_empty() {
                    return Ok(());
                }
                self.settle(lease, finishing).await?;
                continue;
            }
            let mut wait_until = None;
            for mut item in items {
                if renewed.elapsed() >= renew_every {
                    if !self.store.renew(lease).await? {
                        tracing::warn!(partition = %lease.partition, "lease lost");
                        return Ok(());
                    }
                    renewed = Instant::now();
                }
                if !self.may_run() {
                    return Ok(());
                }
                match self.replay_one(lease, &mut item, finishing).await? {
                    Step::Next => done_with = done_with.max(item.seq),
                    Step::Wait(until) => {
                        wait_until = Some(until);
                        break;
                    }
                }
            }
            if wait_until.is_some() || finishing.keys.len() >= MAX_UNSETTLED {
                self.settle(lease, finishing).await?;
            }
            if let Some(until) = wait_until {
                // Short waits keep the lease; it is renewed on the next round.
                let ms = until.saturating_sub(now_ms());
                if ms > 0 {
                    let renew_cap = renew_every.max(Duration::from_millis(100));
                    let mut health = self.health.watch();
                    tokio::select! {
                        _ = self.shutdown.wait() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_millis(ms).min(renew_cap)) => {}
                        _ = health.changed() => {}
                        _ = self.credentials.offered.notified() => {}
                    }
                }
            }
        }
    }

    /// Send one item and act on the answer.
    async fn replay_one(
        &self,
        lease: &Lease,
        item: &mut MutationRecord,
        finishing: &mut Finishing,
    ) -> Result<Step, StoreError> {
        let now = now_ms();
        if now.saturating_sub(item.accepted_at_ms) > millis(self.config.queue.max_age) {
            item.status = MutationStatus::Expired;
            item.outcome = Some("expired".into());
            item.finished_at_ms = Some(now);
            self.record(lease, item, Progress::Finish, finishing)
                .await?;
            self.credentials.unmark_waiting(&item.key);
            self.events.emit(Event::Expired {
                key: item.key.clone(),
            });
            tracing::warn!(key = %item.key, "mutation expired (queue.max_age)");
            return Ok(Step::Next);
        }
        if item.outcome.as_deref() == Some(AWAITING_FORWARD)
            && let Some(step) = self.settle_awaiting(lease, item, now, finishing).await?
        {
            return Ok(step);
        }
        if item.status == MutationStatus::AuthRequired {
            let Some(creds) = self.fresh_credentials(item).await else {
                self.credentials.mark_waiting(&item.key);
                // Tell the other instances (shared store) to pass on what the app offers them.
                if let Err(e) = self.store.announce_waiting(AUTH_ANNOUNCE).await {
                    tracing::debug!("could not announce a wait for credentials: {e}");
                }
                return Ok(Step::Wait(now.saturating_add(1000)));
            };
            replace_credentials(item, creds);
            self.credentials.unmark_waiting(&item.key);
            item.status = MutationStatus::Queued;
        } else if item.next_attempt_at_ms > now {
            return Ok(Step::Wait(item.next_attempt_at_ms));
        }
        // Send nothing whose answer could not be recorded (store reopening after an I/O
        // error, or a background finish that just failed).
        if !self.store.writable() {
            return Ok(Step::Wait(
                now.saturating_add(STORE_RETRY.as_millis() as u64),
            ));
        }
        self.re_record_failed(lease, finishing).await?;
        if finishing
            .written
            .contains(&(item.identity, item.request.path_and_query.clone()))
        {
            drop_captured_version(&mut item.request);
        }
        if let Some(limiter) = &self.limiter {
            limiter.until_ready().await;
        }
        item.attempts = item.attempts.saturating_add(1);
        self.mark_in_flight(&item.key, true);
        self.events.emit(Event::ReplayAttempt {
            key: item.key.clone(),
            attempt: item.attempts,
        });
        let sent = self.send_holding(lease, item).await;
        self.mark_in_flight(&item.key, false);
        let now = now_ms();
        let (outcome, response) = match sent {
            Sent::Refused(reason) => {
                // It never left: not an attempt. The upstream is offline, and the item goes
                // again as soon as it is seen online.
                item.attempts = item.attempts.saturating_sub(1);
                self.health.report_failure(&reason);
                self.events.emit(Event::Classified {
                    key: item.key.clone(),
                    class: "retryable".into(),
                    status: None,
                });
                item.outcome = Some(format!("retryable: not sent: {reason}"));
                item.next_attempt_at_ms = now;
                self.record(lease, item, Progress::Update, finishing)
                    .await?;
                return Ok(Step::Wait(now.saturating_add(1000)));
            }
            Sent::Ambiguous { reason, timeout } => {
                if timeout {
                    self.health.report_failure(&reason);
                } else {
                    self.health.report_reset(&reason, Some(&item.key));
                }
                let never_again = has_header(&item.request, FORWARDED_BEFORE_202);
                self.events.emit(Event::Classified {
                    key: item.key.clone(),
                    class: if never_again {
                        "validation"
                    } else {
                        "retryable"
                    }
                    .into(),
                    status: None,
                });
                if never_again {
                    // Forwarded before its `write_timeout` 202: never sent twice.
                    mark_maybe_applied(item, &format!("its replay got no answer ({reason})"), now);
                    self.dead_letter(lease, item, finishing).await?;
                    return Ok(Step::Next);
                }
                let reason = format!("retryable: maybe applied: {reason}");
                return self
                    .retry_later(lease, item, reason, None, None, true, finishing)
                    .await;
            }
            Sent::Unsendable(e) => {
                // Sent as anything else it would not be the app's request: an operator decides.
                item.attempts = item.attempts.saturating_sub(1);
                item.status = MutationStatus::Rejected;
                item.outcome = Some(format!("not sent: {e}"));
                item.finished_at_ms = Some(now);
                self.dead_letter(lease, item, finishing).await?;
                return Ok(Step::Next);
            }
            Sent::Answered { outcome, response } => (outcome, response),
        };
        self.events.emit(Event::Classified {
            key: item.key.clone(),
            class: outcome.class().into(),
            status: Some(response.status),
        });
        tracing::debug!(key = %item.key, class = outcome.class(), attempt = item.attempts, "replayed");
        match outcome {
            Outcome::Success | Outcome::Partial => {
                self.health.report_success();
                if finishing.written.len() >= MAX_WRITTEN {
                    finishing.written.clear();
                }
                finishing
                    .written
                    .insert((item.identity, item.request.path_and_query.clone()));
                item.status = outcome.final_status().unwrap_or(MutationStatus::Succeeded);
                item.outcome = Some(outcome.class().into());
                item.response = Some(response);
                item.finished_at_ms = Some(now);
                self.record(lease, item, Progress::Finish, finishing)
                    .await?;
                Ok(Step::Next)
            }
            Outcome::Conflict => {
                self.health.report_success();
                item.response = Some(response);
                self.resolve_conflict(lease, item, finishing).await
            }
            Outcome::Validation => {
                self.health.report_success();
                item.status = outcome.final_status().unwrap_or(MutationStatus::Rejected);
                item.outcome = Some(outcome.class().into());
                item.response = Some(response);
                item.finished_at_ms = Some(now);
                self.dead_letter(lease, item, finishing).await?;
                Ok(Step::Next)
            }
            Outcome::AuthRequired => {
                self.health.report_success();
                item.status = MutationStatus::AuthRequired;
                item.outcome = Some("auth_required".into());
                item.response = Some(response);
                // Credentials offered after this moment count as fresh.
                item.next_attempt_at_ms = now;
                if !self
                    .record(lease, item, Progress::Update, finishing)
                    .await?
                {
                    return Ok(Step::Next);
                }
                self.credentials.mark_waiting(&item.key);
                if !self.credentials.may_release(item.principal.as_deref()) {
                    tracing::warn!(
                        key = %item.key,
                        "credentials refused and the principal is unknown: the mutation waits \
                         for an operator's retry (or set replay.auth_principal = \"any\" for a \
                         single-user app)"
                    );
                }
                self.events.emit(Event::AuthRequired {
                    key: item.key.clone(),
                    principal: item.principal.clone().unwrap_or_else(|| "unknown".into()),
                });
                Ok(Step::Wait(now.saturating_add(1000)))
            }
            Outcome::Retryable { after } => {
                let status = response.status;
                // The contract: a retryable answer marks the upstream offline until a probe or
                // a replay succeeds.
                self.health
                    .report_failure(&format!("replayed mutation answered {status}"));
                // 429 and 503 ask everybody to come back later: not this item's fault.
                let counts = status != 429 && status != 503;
                let reason = format!("retryable: status {status}");
                self.retry_later(
                    lease,
                    item,
                    reason,
                    Some(response),
                    after,
                    counts,
                    finishing,
                )
                .await
            }
        }
    }

    /// A conflict (409, 412), acted on as the item's route says (`conflict`).
    async fn resolve_conflict(
        &self,
        lease: &Lease,
        item: &mut MutationRecord,
        finishing: &mut Finishing,
    ) -> Result<Step, StoreError> {
        let now = now_ms();
        item.status = MutationStatus::Conflict;
        item.finished_at_ms = Some(now);
        let policy = self.routes.by_name(&item.route).conflict;
        self.events.emit(Event::Conflict {
            key: item.key.clone(),
            policy: policy.as_str().into(),
        });
        match policy {
            ConflictPolicy::DeadLetter => {
                item.outcome = Some("conflict".into());
                self.dead_letter(lease, item, finishing).await?;
            }
            ConflictPolicy::ServerWins => {
                item.outcome = Some(SERVER_WINS.into());
                self.record(lease, item, Progress::Finish, finishing)
                    .await?;
                tracing::info!(key = %item.key, "conflict: the server's state stands (server-wins)");
            }
            ConflictPolicy::ClientWins => {
                let before = item.request.headers.len();
                item.request
                    .headers
                    .retain(|(name, _)| !PRECONDITIONS.contains(&name.as_str()));
                if item.request.headers.len() == before {
                    // Nothing to drop: sending it again would meet the same conflict.
                    item.outcome = Some(
                        "conflict (client-wins: no precondition to drop, kept as a dead letter)"
                            .into(),
                    );
                    self.dead_letter(lease, item, finishing).await?;
                    return Ok(Step::Next);
                }
                item.status = MutationStatus::Queued;
                item.finished_at_ms = None;
                item.next_attempt_at_ms = now;
                item.outcome =
                    Some("conflict: client wins, sent again without its preconditions".into());
                if !self
                    .record(lease, item, Progress::Update, finishing)
                    .await?
                {
                    return Ok(Step::Next);
                }
                tracing::info!(key = %item.key, "conflict: sent again without preconditions (client-wins)");
                // The same item goes again at once (the next peek finds it at the head).
                return Ok(Step::Wait(now));
            }
        }
        Ok(Step::Next)
    }

    /// Try the item again after its backoff (at least `after`), or dead-letter it when its
    /// own attempts are used up (`counts`: this failure is one of its own).
    #[allow(clippy::too_many_arguments)]
    async fn retry_later(
        &self,
        lease: &Lease,
        item: &mut MutationRecord,
        reason: String,
        response: Option<StoredResponse>,
        after: Option<Duration>,
        counts: bool,
        finishing: &mut Finishing,
    ) -> Result<Step, StoreError> {
        let now = now_ms();
        let max = self.config.replay.max_attempts;
        item.response = response;
        if counts && max > 0 && item.attempts >= max {
            item.status = MutationStatus::Rejected;
            item.outcome = Some(format!(
                "gave up after {} attempts (replay.max_attempts); last: {reason}",
                item.attempts
            ));
            item.finished_at_ms = Some(now);
            self.dead_letter(lease, item, finishing).await?;
            return Ok(Step::Next);
        }
        let delay = backoff::delay(&self.config.replay, item.attempts, after);
        item.status = MutationStatus::Queued;
        item.outcome = Some(reason);
        item.next_attempt_at_ms = now.saturating_add(millis(delay));
        if !self
            .record(lease, item, Progress::Update, finishing)
            .await?
        {
            return Ok(Step::Next);
        }
        Ok(Step::Wait(item.next_attempt_at_ms))
    }

    /// A copy queued for a `write_timeout` 202 while its forward went on: what that forward
    /// left under [`answer_key`] settles it. `None`: the forward ended without effect (a refused
    /// connection, a transient answer) and the copy goes like any queued write, from what the
    /// forward recorded. A forward still under way (here, or on another instance sharing the
    /// store, until `upstream.request_timeout` and a second after the copy was stored) is
    /// waited for. One that left nothing once it is surely over was cut short by a stop of the
    /// outpost that ran it (`kill -9`, power loss, or a forward still running at the end of
    /// `proxy.shutdown_grace`): its request may have reached the upstream, and a `write_timeout`
    /// write is never sent twice, so it is dead-lettered as `maybe applied` instead of sent
    /// (at once when an earlier process left it in a store that is this process's alone).
    async fn settle_awaiting(
        &self,
        lease: &Lease,
        item: &mut MutationRecord,
        now: u64,
        finishing: &mut Finishing,
    ) -> Result<Option<Step>, StoreError> {
        if self.activity.is_forwarding(&item.key) {
            return Ok(Some(Step::Wait(now.saturating_add(100))));
        }
        match self.store.mutation(&answer_key(&item.key)).await? {
            Some(unsent) if unsent.status.is_pending() => {
                item.outcome = unsent.outcome;
                item.next_attempt_at_ms = unsent.next_attempt_at_ms;
                Ok(None)
            }
            Some(answer) => {
                self.finish_from_forward(lease, item, answer, finishing)
                    .await?;
                Ok(Some(Step::Next))
            }
            None if item.next_attempt_at_ms > now && !self.left_by_an_earlier_process(item) => {
                Ok(Some(Step::Wait(item.next_attempt_at_ms)))
            }
            None => {
                self.events.emit(Event::Classified {
                    key: item.key.clone(),
                    class: "validation".into(),
                    status: None,
                });
                mark_maybe_applied(
                    item,
                    "outpost stopped while its forward after the 202 was under way, before an \
                     answer came",
                    now,
                );
                self.dead_letter(lease, item, finishing).await?;
                Ok(Some(Step::Next))
            }
        }
    }

    /// Whether `item`'s forward surely ran in a process before this one: it was accepted
    /// before this replayer was made, and the store is this process's alone (with a shared
    /// store, another instance may have accepted it and still be forwarding it). Its copy then
    /// need not wait for the forward's time to run out.
    fn left_by_an_earlier_process(&self, item: &MutationRecord) -> bool {
        self.store.exclusive() && item.accepted_at_ms < self.started_at_ms
    }

    /// Finish a copy queued for a `write_timeout` 202 with the answer its forward got.
    async fn finish_from_forward(
        &self,
        lease: &Lease,
        item: &mut MutationRecord,
        answer: MutationRecord,
        finishing: &mut Finishing,
    ) -> Result<(), StoreError> {
        item.status = answer.status;
        item.outcome = answer.outcome;
        item.response = answer.response;
        item.finished_at_ms = Some(answer.finished_at_ms.unwrap_or_else(now_ms));
        let class = match item.status {
            MutationStatus::Succeeded => "success",
            MutationStatus::Partial => "partial",
            MutationStatus::Conflict => "conflict",
            _ => "validation",
        };
        self.events.emit(Event::Classified {
            key: item.key.clone(),
            class: class.into(),
            status: item.response.as_ref().map(|r| r.status),
        });
        tracing::debug!(key = %item.key, class, "a queued copy settled by its forward's answer");
        if item.goes_to_dead_letters() {
            self.dead_letter(lease, item, finishing).await
        } else {
            self.record(lease, item, Progress::Finish, finishing)
                .await
                .map(|_| ())
        }
    }

    /// Finish an item as a dead letter, and say so.
    async fn dead_letter(
        &self,
        lease: &Lease,
        item: &mut MutationRecord,
        finishing: &mut Finishing,
    ) -> Result<(), StoreError> {
        self.record(lease, item, Progress::Finish, finishing)
            .await?;
        self.events.emit(Event::DeadLettered {
            key: item.key.clone(),
            status: item.status.as_str().into(),
        });
        tracing::warn!(
            key = %item.key,
            status = item.status.as_str(),
            outcome = item.outcome.as_deref().unwrap_or(""),
            "dead-lettered"
        );
        Ok(())
    }

    /// Record an answer. Finishes under a progress window go to the background (they are
    /// answered once durable, and settled before the next peek); everything else is recorded
    /// before the drain goes on. Returns whether the item is still on its queue.
    async fn record(
        &self,
        lease: &Lease,
        item: &MutationRecord,
        progress: Progress,
        finishing: &mut Finishing,
    ) -> Result<bool, StoreError> {
        if progress == Progress::Finish && !self.config.replay.progress_sync.is_zero() {
            // What the store keeps of it is all the task needs (not every header's copy).
            let (store, task_lease, item) =
                (self.store.clone(), lease.clone(), item.finished_copy());
            finishing.keys.insert(item.key.clone());
            finishing.tasks.push(Box::pin(async move {
                match store.finish(&task_lease, &item).await {
                    Ok(()) => Ok(item.key),
                    Err(e) => Err((Box::new(item), e)),
                }
            }));
            // Polled once now, so that the store has the write at once (the embedded store
            // sends it to its writer on the first poll).
            self.re_record_failed(lease, finishing).await?;
            return Ok(true);
        }
        self.record_now(lease, item, progress).await
    }

    /// Record an answer now, holding it (and sending nothing else) until the store takes it:
    /// an answer that is not recorded would make the item go again. Gives up only when the
    /// lease is lost or outpost shuts down (the item then counts as in flight).
    async fn record_now(
        &self,
        lease: &Lease,
        item: &MutationRecord,
        progress: Progress,
    ) -> Result<bool, StoreError> {
        let mut wait = STORE_RETRY;
        loop {
            let result = match progress {
                Progress::Update => self.store.update(lease, item).await,
                Progress::Finish => self.store.finish(lease, item).await,
            };
            let e = match result {
                Ok(()) => return Ok(true),
                // Dropped by an operator (or finished elsewhere) meanwhile: nothing to keep.
                Err(StoreError::NotQueued { .. }) => return Ok(false),
                Err(e) if !e.retryable() => return Err(e),
                Err(e) => e,
            };
            tracing::warn!(
                key = %item.key,
                "cannot record the answer ({e}); holding it and sending nothing else of the \
                 partition until the store takes it (next try in {wait:?})"
            );
            tokio::select! {
                _ = self.shutdown.wait() => return Err(e),
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(STORE_RETRY_MAX);
        }
    }

    /// Poll the background finishes without waiting for them: those done leave, and those that
    /// failed are recorded again, in place, before the next send.
    async fn re_record_failed(
        &self,
        lease: &Lease,
        finishing: &mut Finishing,
    ) -> Result<(), StoreError> {
        loop {
            let done = std::future::poll_fn(|cx| {
                Poll::Ready(match finishing.tasks.poll_next_unpin(cx) {
                    Poll::Ready(done) => done,
                    Poll::Pending => None,
                })
            })
            .await;
            let Some(done) = done else {
                return Ok(());
            };
            self.re_record(lease, finishing, done).await?;
        }
    }

    /// Wait for every background finish, recording again those that failed.
    async fn settle(&self, lease: &Lease, finishing: &mut Finishing) -> Result<(), StoreError> {
        while let Some(done) = finishing.tasks.next().await {
            self.re_record(lease, finishing, done).await?;
        }
        Ok(())
    }

    async fn re_record(
        &self,
        lease: &Lease,
        finishing: &mut Finishing,
        done: Result<String, (Box<MutationRecord>, StoreError)>,
    ) -> Result<(), StoreError> {
        match done {
            Ok(key) => {
                finishing.keys.remove(&key);
                Ok(())
            }
            Err((_, e @ StoreError::LeaseLost { .. })) => Err(e),
            Err((item, e)) => {
                tracing::warn!(key = %item.key, "recording the answer failed ({e}); again");
                self.record_now(lease, &item, Progress::Finish).await?;
                finishing.keys.remove(&item.key);
                Ok(())
            }
        }
    }

    /// [`Self::send`], renewing the lease while the answer is awaited: an upstream slower than
    /// the lease must not let another instance take the partition and send this item again, or
    /// the ones behind it, while it is still in flight.
    async fn send_holding(&self, lease: &Lease, item: &MutationRecord) -> Sent {
        let every = (self.config.store.redis_lease / 3).max(Duration::from_millis(10));
        let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let send = self.send(item);
        tokio::pin!(send);
        loop {
            tokio::select! {
                answer = &mut send => return answer,
                _ = renew.tick() => match self.store.renew(lease).await {
                    Ok(true) => {}
                    // Keep waiting for the answer; saving it will fail with `LeaseLost`.
                    Ok(false) => tracing::warn!(partition = %lease.partition, key = %item.key, "lease lost while in flight"),
                    Err(e) => tracing::debug!("lease renewal failed: {e}"),
                },
            }
        }
    }

    /// Send a stored mutation; classify the answer.
    async fn send(&self, item: &MutationRecord) -> Sent {
        let route = self.routes.by_name(&item.route);
        let accepted_at = rfc3339_ms(item.accepted_at_ms);
        let mut extra = Vec::with_capacity(2);
        if let Some(name) = &self.accepted_at_header
            && let Ok(value) = HeaderValue::from_str(&accepted_at)
        {
            extra.push((name.clone(), value));
        }
        if let Ok(key) = HeaderValue::from_str(&item.key) {
            extra.push((IDEMPOTENCY_KEY.clone(), key));
        }
        let stamped;
        let request = if route.accepted_at_field.is_empty()
            && !item.request.headers.iter().any(|(n, _)| is_internal(n))
        {
            &item.request
        } else {
            let mut request = stamp_body(&item.request, &route.accepted_at_field, &accepted_at);
            request.headers.retain(|(n, _)| !is_internal(n));
            stamped = request;
            &stamped
        };
        let req = match self.upstream.request_from_stored(request, &extra) {
            Ok(req) => req,
            Err(e) => return Sent::Unsendable(e),
        };
        let resp = match crate::upstream::call(&self.service, req).await {
            Ok(resp) => resp,
            Err(e @ ForwardError::Connect(_)) => return Sent::Refused(report(&e)),
            Err(e @ ForwardError::Timeout(_)) => {
                return Sent::Ambiguous {
                    reason: report(&e),
                    timeout: true,
                };
            }
            Err(e @ ForwardError::Transport(_)) => {
                return Sent::Ambiguous {
                    reason: report(&e),
                    timeout: false,
                };
            }
        };
        let (parts, incoming) = resp.into_parts();
        let limit = self.config.queue.max_body_bytes;
        let deadline = self.config.upstream.request_timeout;
        let body = match body::collect_within(incoming, limit, deadline).await {
            Ok(Collected::Whole(b)) => b,
            Ok(Collected::TooLarge { prefix, .. }) => prefix,
            Err(e) => {
                // The head arrived, so the upstream handled the request: its status decides,
                // the body is lost. Sending it again could apply it twice. A body that broke
                // off or stalled is a reset exchange for the upstream's health.
                tracing::warn!(key = %item.key, status = parts.status.as_u16(), "the answer's body broke off ({e}); classified by its status");
                self.health.report_body_failure(&e, Some(&item.key));
                Bytes::new()
            }
        };
        let route = self.routes.by_name(&item.route);
        let outcome = classify::classify(&route.classify, parts.status, &parts.headers, &body);
        let mut headers = parts.headers;
        crate::upstream::strip_hop_by_hop(&mut headers);
        headers.remove(header::CONTENT_LENGTH);
        let response = StoredResponse {
            status: parts.status.as_u16(),
            headers: header_pairs(&headers),
            body,
        };
        Sent::Answered { outcome, response }
    }

    /// Credentials offered after the item's 401: to this instance, or shared by another.
    async fn fresh_credentials(&self, item: &MutationRecord) -> Option<Vec<(String, Bytes)>> {
        let since = item.next_attempt_at_ms;
        if let Some(creds) = self.credentials.fresh_for(item.principal.as_deref(), since) {
            return Some(creds);
        }
        let principal = item.principal.as_deref();
        if !self.credentials.may_release(principal) {
            return None;
        }
        let principal = principal?;
        match self.store.shared_credentials(principal, since).await {
            Ok(found) => found,
            Err(e) => {
                tracing::debug!("cannot read shared credentials: {e}");
                None
            }
        }
    }

    fn mark_in_flight(&self, key: &str, on: bool) {
        self.activity.set_in_flight(key, on);
    }

    async fn purge(&self) {
        let before =
            now_ms().saturating_sub(self.config.queue.idempotency_retention.as_millis() as u64);
        match self.store.purge_finished(before).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(purged = n, "purged finished mutations past retention"),
            Err(e) => tracing::warn!("purge failed: {e}"),
        }
    }
}

// Request headers that make a write conditional (dropped by `conflict = "client-wins"`).
use crate::coalesce::PRECONDITIONS;

/// Whether a stored request header is outpost's own marker, never sent upstream.
fn is_internal(name: &str) -> bool {
    name == CAPTURED_VERSION || name == FORWARDED_BEFORE_202
}

/// Whether the stored request has the header `name` (one of outpost's markers: a copy
/// forwarded before its `write_timeout` 202, a precondition from `capture_version`).
fn has_header(request: &StoredRequest, name: &str) -> bool {
    request.headers.iter().any(|(n, _)| n == name)
}

/// Drop the precondition outpost added to the request (`capture_version`), if it did.
fn drop_captured_version(request: &mut StoredRequest) {
    if has_header(request, CAPTURED_VERSION) {
        request
            .headers
            .retain(|(n, _)| n != CAPTURED_VERSION && !PRECONDITIONS.contains(&n.as_str()));
    }
}

/// The request with the JSON pointer `pointer` of its JSON object body set to `value` (the body
/// unchanged when it is not JSON, the pointer's parent is not an object, or `pointer` is
/// empty).
fn stamp_body(request: &StoredRequest, pointer: &str, value: &str) -> StoredRequest {
    let mut stamped = request.clone();
    if pointer.is_empty() {
        return stamped;
    }
    let Ok(mut json) = serde_json::from_slice::<serde_json::Value>(&request.body) else {
        return stamped;
    };
    let (parent, field) = match pointer.rsplit_once('/') {
        Some((parent, field)) => (parent, field.replace("~1", "/").replace("~0", "~")),
        None => return stamped,
    };
    let Some(serde_json::Value::Object(object)) = json.pointer_mut(parent) else {
        return stamped;
    };
    object.insert(field, serde_json::Value::String(value.to_string()));
    if let Ok(body) = serde_json::to_vec(&json) {
        stamped.body = Bytes::from(body);
    }
    stamped
}

/// Partitions being drained, and those resting after a failed drain.
#[derive(Default)]
struct Drains {
    tasks: JoinSet<()>,
    running: HashMap<tokio::task::Id, Lease>,
    /// Partition → (failures in a row, not before).
    resting: HashMap<String, (u32, Instant)>,
}

impl Drains {
    fn is_running(&self, partition: &str) -> bool {
        self.running.values().any(|l| l.partition == partition)
    }

    fn is_resting(&mut self, partition: &str) -> bool {
        match self.resting.get(partition) {
            Some((_, until)) if Instant::now() < *until => true,
            Some(_) => false,
            None => false,
        }
    }

    /// Note a failed drain; returns how long the partition rests (doubling, at most a minute).
    fn pause_after_failure(&mut self, partition: &str) -> Duration {
        let failures = self.resting.get(partition).map_or(0, |(n, _)| *n) + 1;
        let pause = Duration::from_secs(1 << failures.min(6)).min(Duration::from_secs(60));
        self.resting
            .insert(partition.to_string(), (failures, Instant::now() + pause));
        pause
    }
}

/// Swap the stored `Authorization`/`Cookie` for fresh ones.
fn replace_credentials(item: &mut MutationRecord, creds: Vec<(String, Bytes)>) {
    item.request
        .headers
        .retain(|(n, _)| n != "authorization" && n != "cookie");
    item.request.headers.extend(creds);
}
