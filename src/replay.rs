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
//! Wake-ups: a new mutation queued (`Outbox::queued`), the upstream coming back online
//! ([`Health::watch`]), credentials offered by the app, and a half-second tick (which also
//! finds items other instances queued in a shared Redis).
//!
//! Crash safety: progress is saved after each answer. An item whose answer was lost to a crash
//! is sent again with the same `Idempotency-Key`, so the upstream applies it once.

pub mod backoff;
pub mod classify;

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http::header::{self, HeaderName, HeaderValue};
use tokio::task::JoinSet;

use crate::body::{self, Collected};
use crate::config::Config;
use crate::events::{Event, Events};
use crate::health::Health;
use crate::outbox::{IDEMPOTENCY_KEY, Outbox, header_pairs, rfc3339_ms};
use crate::proxy::forward::Upstream;
use crate::route::RouteTable;
use crate::shutdown::Shutdown;
use crate::store::{
    Lease, MutationRecord, MutationStatus, Store, StoreError, StoredResponse, now_ms,
};
use classify::Outcome;

/// `Outpost-Accepted-At`: when outpost accepted a replayed mutation.
pub static OUTPOST_ACCEPTED_AT: HeaderName = HeaderName::from_static("outpost-accepted-at");

/// Items read from a partition at a time.
const PEEK_BATCH: usize = 64;
/// How often the supervisor looks for partitions without being woken.
const TICK: Duration = Duration::from_millis(500);
/// How long an announced wait for credentials lasts unless renewed (the drain renews it
/// about every second while the item waits).
const AUTH_ANNOUNCE: Duration = Duration::from_secs(5);
/// How often finished records past retention are purged.
const PURGE_EVERY: Duration = Duration::from_secs(60);

/// What a drain does after one item.
enum Step {
    /// Go on with the next item.
    Next,
    /// The partition waits (until the given time at the latest).
    Wait(u64),
}

/// The replay engine.
pub struct Replayer {
    store: Arc<dyn Store>,
    upstream: Upstream,
    health: Arc<Health>,
    events: Events,
    config: Arc<Config>,
    routes: Arc<RouteTable>,
    outbox: Arc<Outbox>,
    limiter: Option<DefaultDirectRateLimiter>,
    paused: AtomicBool,
    shutdown: Shutdown,
}

impl Replayer {
    /// A replayer draining `outbox`'s store, through the outbox's upstream client, health and
    /// event stream.
    pub fn new(outbox: Arc<Outbox>, routes: Arc<RouteTable>, shutdown: Shutdown) -> Self {
        let config = outbox.config.clone();
        let limiter = NonZeroU32::new(config.replay.rate_limit).map(|rate| {
            let burst = NonZeroU32::new(config.replay.rate_burst).unwrap_or(rate);
            RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
        });
        Self {
            store: outbox.store.clone(),
            upstream: outbox.upstream.clone(),
            health: outbox.health.clone(),
            events: outbox.events.clone(),
            config,
            routes,
            outbox,
            limiter,
            paused: AtomicBool::new(false),
            shutdown,
        }
    }

    /// Stop replaying (drains finish their current item).
    pub fn pause(&self) {
        self.paused.store(true, Ordering::Release);
    }

    /// Resume replaying at once.
    pub fn resume(&self) {
        self.paused.store(false, Ordering::Release);
        self.outbox.queued.notify_one();
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
        let mut drains: JoinSet<String> = JoinSet::new();
        let mut running: HashSet<String> = HashSet::new();
        let mut health = self.health.watch();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_purge = Instant::now();
        loop {
            if self.may_run() {
                self.start_drains(&mut drains, &mut running).await;
            }
            match self.store.anyone_waiting().await {
                Ok(waiting) => self.outbox.credentials.set_elsewhere_waiting(waiting),
                Err(e) => tracing::debug!("cannot tell whether credentials are wanted: {e}"),
            }
            if last_purge.elapsed() >= PURGE_EVERY {
                last_purge = Instant::now();
                self.purge().await;
            }
            tokio::select! {
                _ = self.shutdown.wait() => break,
                _ = self.outbox.queued.notified() => {}
                _ = health.changed() => {}
                Some(done) = drains.join_next() => {
                    if let Ok(partition) = done {
                        running.remove(&partition);
                    }
                }
                _ = tick.tick() => {}
            }
        }
        // Drains see the shutdown too; let them finish the item in hand.
        while drains.join_next().await.is_some() {}
    }

    async fn start_drains(
        self: &Arc<Self>,
        drains: &mut JoinSet<String>,
        running: &mut HashSet<String>,
    ) {
        let partitions = match self.store.pending_partitions().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("cannot list partitions: {e}");
                return;
            }
        };
        for partition in partitions {
            if running.len() >= self.config.replay.concurrency {
                break;
            }
            if running.contains(&partition) {
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
            running.insert(partition.clone());
            let this = self.clone();
            drains.spawn(async move {
                if let Err(e) = this.drain(&lease).await {
                    tracing::warn!(partition = %lease.partition, "replay stopped: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                if let Err(e) = this.store.release(&lease).await {
                    tracing::debug!("lease release failed: {e}");
                }
                lease.partition
            });
        }
    }

    /// Replay one partition head-first until it is empty or must wait.
    async fn drain(&self, lease: &Lease) -> Result<(), StoreError> {
        let mut finishing = JoinSet::new();
        let result = self.drain_batches(lease, &mut finishing).await;
        // Finished items must be recorded before the lease is given back.
        let settled = settle(&mut finishing).await;
        result.and(settled)
    }

    /// The drain loop: a batch of items head-first, their bookkeeping written in the
    /// background (and settled before the next batch is read), then the next batch.
    async fn drain_batches(
        &self,
        lease: &Lease,
        finishing: &mut JoinSet<Result<(), StoreError>>,
    ) -> Result<(), StoreError> {
        let renew_every = self.config.store.redis_lease / 3;
        let mut renewed = Instant::now();
        loop {
            if !self.may_run() {
                return Ok(());
            }
            let items = self.store.peek(&lease.partition, PEEK_BATCH).await?;
            if items.is_empty() {
                return Ok(());
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
                    Step::Next => {}
                    Step::Wait(until) => {
                        wait_until = Some(until);
                        break;
                    }
                }
            }
            // The next peek must not see items whose answers are still being recorded.
            settle(finishing).await?;
            if let Some(until) = wait_until {
                // Give the lease back while waiting long, so another instance can pick it up
                // later; short waits keep it.
                let ms = until.saturating_sub(now_ms());
                if ms > 0 {
                    let renew_cap = renew_every.max(Duration::from_millis(100));
                    let mut health = self.health.watch();
                    tokio::select! {
                        _ = self.shutdown.wait() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_millis(ms).min(renew_cap)) => {}
                        _ = health.changed() => {}
                        _ = self.outbox.credentials.offered.notified() => {}
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
        finishing: &mut JoinSet<Result<(), StoreError>>,
    ) -> Result<Step, StoreError> {
        let now = now_ms();
        if now.saturating_sub(item.accepted_at_ms) > self.config.queue.max_age.as_millis() as u64 {
            item.status = MutationStatus::Expired;
            item.outcome = Some("expired".into());
            item.finished_at_ms = Some(now);
            self.finish_later(finishing, lease, item);
            self.outbox.credentials.unmark_waiting(&item.key);
            self.events.emit(Event::Expired {
                key: item.key.clone(),
            });
            tracing::warn!(key = %item.key, "mutation expired (queue.max_age)");
            return Ok(Step::Next);
        }
        if item.status == MutationStatus::AuthRequired {
            let Some(creds) = self.fresh_credentials(item).await else {
                self.outbox.credentials.mark_waiting(&item.key);
                // Tell the other instances (shared store) to pass on what the app offers them.
                if let Err(e) = self.store.announce_waiting(AUTH_ANNOUNCE).await {
                    tracing::debug!("could not announce a wait for credentials: {e}");
                }
                return Ok(Step::Wait(now + 1000));
            };
            replace_credentials(item, creds);
            self.outbox.credentials.unmark_waiting(&item.key);
            item.status = MutationStatus::Queued;
        } else if item.next_attempt_at_ms > now && !retry_when_online(item) {
            return Ok(Step::Wait(item.next_attempt_at_ms));
        }
        if let Some(limiter) = &self.limiter {
            limiter.until_ready().await;
        }
        item.attempts += 1;
        self.mark_in_flight(&item.key, true);
        self.events.emit(Event::ReplayAttempt {
            key: item.key.clone(),
            attempt: item.attempts,
        });
        let (outcome, response, transport_error) = self.send_holding(lease, item).await;
        self.mark_in_flight(&item.key, false);
        self.events.emit(Event::Classified {
            key: item.key.clone(),
            class: outcome.class().into(),
            status: response.as_ref().map(|r| r.status),
        });
        tracing::debug!(key = %item.key, class = outcome.class(), attempt = item.attempts, "replayed");
        let now = now_ms();
        match outcome {
            Outcome::Success | Outcome::Partial => {
                item.status = outcome.final_status().unwrap_or(MutationStatus::Succeeded);
                item.outcome = Some(outcome.class().into());
                item.response = response;
                item.finished_at_ms = Some(now);
                self.finish_later(finishing, lease, item);
                Ok(Step::Next)
            }
            Outcome::Validation | Outcome::Conflict => {
                item.status = outcome.final_status().unwrap_or(MutationStatus::Rejected);
                item.outcome = Some(outcome.class().into());
                item.response = response;
                item.finished_at_ms = Some(now);
                self.finish_later(finishing, lease, item);
                self.events.emit(Event::DeadLettered {
                    key: item.key.clone(),
                    status: item.status.as_str().into(),
                });
                tracing::warn!(key = %item.key, status = item.status.as_str(), "dead-lettered");
                Ok(Step::Next)
            }
            Outcome::AuthRequired => {
                item.status = MutationStatus::AuthRequired;
                item.outcome = Some("auth_required".into());
                item.response = response;
                // Credentials offered after this moment count as fresh.
                item.next_attempt_at_ms = now;
                self.store.update(lease, item).await?;
                self.outbox.credentials.mark_waiting(&item.key);
                self.events.emit(Event::AuthRequired {
                    key: item.key.clone(),
                    principal: item.principal.clone().unwrap_or_else(|| "*".into()),
                });
                Ok(Step::Wait(now + 1000))
            }
            Outcome::Retryable { after } => {
                let delay = backoff::delay(&self.config.replay, item.attempts, after);
                item.status = MutationStatus::Queued;
                item.outcome = Some(match (&transport_error, &response) {
                    (Some(e), _) => format!("retryable: transport: {e}"),
                    (None, Some(r)) => format!("retryable: status {}", r.status),
                    (None, None) => "retryable".into(),
                });
                item.response = response;
                item.next_attempt_at_ms = now + delay.as_millis() as u64;
                self.store.update(lease, item).await?;
                // The contract: a retryable answer marks the upstream offline until a probe or
                // a replay succeeds.
                self.health
                    .report_failure(item.outcome.as_deref().unwrap_or("retryable"));
                Ok(Step::Wait(item.next_attempt_at_ms))
            }
        }
    }

    /// [`Self::send`], renewing the lease while the answer is awaited: an upstream slower than
    /// the lease must not let another instance take the partition and send this item again, or
    /// the ones behind it, while it is still in flight.
    async fn send_holding(
        &self,
        lease: &Lease,
        item: &MutationRecord,
    ) -> (Outcome, Option<StoredResponse>, Option<String>) {
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

    /// Send a stored mutation; classify the answer (or the transport error).
    async fn send(
        &self,
        item: &MutationRecord,
    ) -> (Outcome, Option<StoredResponse>, Option<String>) {
        let mut extra = vec![(
            OUTPOST_ACCEPTED_AT.clone(),
            HeaderValue::from_str(&rfc3339_ms(item.accepted_at_ms))
                .unwrap_or(HeaderValue::from_static("")),
        )];
        if let Ok(key) = HeaderValue::from_str(&item.key) {
            extra.push((IDEMPOTENCY_KEY.clone(), key));
        }
        let req = self.upstream.request_from_stored(&item.request, &extra);
        let resp = match self.upstream.send(req).await {
            Ok(resp) => resp,
            Err(e) => {
                self.health.report_failure(&e.to_string());
                return (
                    Outcome::Retryable { after: None },
                    None,
                    Some(e.to_string()),
                );
            }
        };
        let (parts, incoming) = resp.into_parts();
        let limit = self.config.queue.max_body_bytes;
        let body = match body::collect_limited(incoming, limit).await {
            Ok(Collected::Whole(b)) => b,
            Ok(Collected::TooLarge { prefix, .. }) => prefix,
            Err(e) => {
                // The head arrived but the body broke: the answer is unknown, try again.
                self.health.report_failure(&e.to_string());
                return (
                    Outcome::Retryable { after: None },
                    None,
                    Some(e.to_string()),
                );
            }
        };
        let route = self.routes.by_name(&item.route);
        let outcome = classify::classify(&route.classify, parts.status, &parts.headers, &body);
        if !matches!(outcome, Outcome::Retryable { .. }) {
            self.health.report_success();
        }
        let mut headers = parts.headers;
        crate::proxy::forward::strip_hop_by_hop(&mut headers);
        headers.remove(header::CONTENT_LENGTH);
        let stored = StoredResponse {
            status: parts.status.as_u16(),
            headers: header_pairs(&headers),
            body,
        };
        (outcome, Some(stored), None)
    }

    /// Record a finished item without holding up the next send: replaying in order needs the
    /// answer classified, not its bookkeeping committed, and a crash before the commit only
    /// means a second delivery under the same idempotency key. Concurrent finishes share
    /// commits (group commit) instead of costing one each.
    fn finish_later(
        &self,
        finishing: &mut JoinSet<Result<(), StoreError>>,
        lease: &Lease,
        item: &MutationRecord,
    ) {
        let (store, lease, item) = (self.store.clone(), lease.clone(), item.clone());
        finishing.spawn(async move { store.finish(&lease, &item).await });
    }

    /// Credentials offered after the item's 401: to this instance, or shared by another.
    async fn fresh_credentials(&self, item: &MutationRecord) -> Option<Vec<(String, Bytes)>> {
        let since = item.next_attempt_at_ms;
        if let Some(creds) = self
            .outbox
            .credentials
            .fresh_for(item.principal.as_deref(), since)
        {
            return Some(creds);
        }
        let principal = item.principal.as_deref().unwrap_or("*");
        match self.store.shared_credentials(principal, since).await {
            Ok(found) => found,
            Err(e) => {
                tracing::debug!("cannot read shared credentials: {e}");
                None
            }
        }
    }

    fn mark_in_flight(&self, key: &str, on: bool) {
        if let Ok(mut set) = self.outbox.in_flight.lock() {
            if on {
                set.insert(key.to_string());
            } else {
                set.remove(key);
            }
        }
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

/// Wait for every background finish; the first error wins.
async fn settle(finishing: &mut JoinSet<Result<(), StoreError>>) -> Result<(), StoreError> {
    let mut result = Ok(());
    while let Some(done) = finishing.join_next().await {
        let outcome = done.map_err(|e| StoreError::Task(e.to_string()))?;
        if result.is_ok() {
            result = outcome;
        }
    }
    result
}

/// A transport failure waits for the upstream, not for the backoff: once it is seen online
/// again, the item goes at once.
fn retry_when_online(item: &MutationRecord) -> bool {
    item.outcome
        .as_deref()
        .is_some_and(|o| o.starts_with("retryable: transport"))
}

/// Swap the stored `Authorization`/`Cookie` for fresh ones.
fn replace_credentials(item: &mut MutationRecord, creds: Vec<(String, Bytes)>) {
    item.request
        .headers
        .retain(|(n, _)| n != "authorization" && n != "cookie");
    item.request.headers.extend(creds);
}
