//! The single writer thread: group commit by durability class, and reopening the database
//! after an I/O error (module docs of [`super`], "Durability" and "Recovery"). Every write of
//! the embedded store is an [`Op`] sent here; readers use the shared handle directly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, WriteTransaction,
};

use super::cache::{cache_put, cache_touch};
use super::queue::{
    Seq, drop_mutation, enqueue, enqueue_coalesced, finish, purge, record_forwarded,
    retry_dead_letter, retry_pending, update,
};
use super::tables::Tables;
use super::{CACHE, CACHE_LRU, DEAD, FINISHED, META, MUTATIONS, QUEUE};
use crate::handoff;
use crate::store::{Coalesced, DeadLetterEdit, Enqueued, MutationRecord, StoreError, codec};

/// Most operations applied in one commit.
pub(super) const MAX_BATCH: usize = 4096;
/// Non-durable commits of lazy ops (cache) are made durable at the latest this long after the
/// first of them.
pub(super) const LAZY_FLUSH: Duration = Duration::from_secs(1);
/// Longest a durable group waits for more ops (see [`Writer::gather`]).
const GATHER_MAX: Duration = Duration::from_millis(2);
/// How long the writer lets replay progress gather while it holds a transaction open (see
/// [`Writer::linger`]).
const LINGER: Duration = Duration::from_micros(200);
/// First wait before reopening the database after an I/O error; doubles up to the maximum.
const REOPEN_BACKOFF_MIN: Duration = Duration::from_millis(100);
const REOPEN_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How the writer answers a caller: the proxy threads' answers of one commit group wake each
/// of their runtimes once (see [`crate::handoff`]).
pub(super) type Reply<T> = handoff::Sender<Result<T, StoreError>>;
/// Answers one caller once the fate of the commit holding its op is known (`Some(why)` when the
/// op was not written).
type Answer = Box<dyn FnOnce(Option<&str>) + Send>;

/// The database handle shared by the writer and the readers. The writer swaps it when it reopens
/// the database after an I/O error; readers clone the `Arc` and never read under the lock.
pub(super) type SharedDb = Arc<RwLock<DbHandle>>;

pub(super) enum DbHandle {
    Open(Arc<Database>),
    /// Closed after an I/O error (its message); the writer is reopening it.
    Reopening(String),
}

/// The current database, or why there is none right now.
pub(super) fn current(db: &RwLock<DbHandle>) -> Result<Arc<Database>, String> {
    match &*db
        .read()
        .map_err(|_| "database handle poisoned".to_owned())?
    {
        DbHandle::Open(db) => Ok(db.clone()),
        DbHandle::Reopening(cause) => Err(format!("reopening after an I/O error ({cause})")),
    }
}

/// One write, as the writer thread receives it.
pub(super) enum Op {
    Enqueue(Box<MutationRecord>, Reply<Enqueued>),
    /// A new record, the pending one it folds, the partition's tail seen.
    Coalesce(Box<(MutationRecord, MutationRecord)>, u64, Reply<Coalesced>),
    RecordForwarded(Box<MutationRecord>, Reply<()>),
    Update(Box<MutationRecord>, Reply<()>),
    Finish(Box<MutationRecord>, Reply<()>),
    RetryDeadLetter(String, Reply<bool>),
    RetryPending(String, Reply<bool>),
    Drop(String, Reply<bool>),
    EditDeadLetter(String, DeadLetterEdit, Reply<bool>),
    Purge(u64, Reply<u64>),
    CachePut(Vec<u8>, Bytes, u64),
    CacheTouch(Vec<u8>),
}

/// When an op's effect must be on disk (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Fsynced before the caller is answered.
    Now,
    /// Committed at once, answered once a durable commit covers it, which happens within the
    /// window.
    Within(Duration),
    /// Not answered, or answered at once; durable within [`LAZY_FLUSH`].
    Lazy,
}

impl Op {
    fn class(&self, progress_sync: Duration) -> Class {
        match self {
            // A forwarded write's answer is kept before the app hears it (its retry must find
            // it, even after a crash): not replay progress, whatever the window.
            Op::Enqueue(..)
            | Op::Coalesce(..)
            | Op::RecordForwarded(..)
            | Op::RetryDeadLetter(..)
            | Op::RetryPending(..)
            | Op::Drop(..)
            | Op::EditDeadLetter(..) => Class::Now,
            Op::Update(..) | Op::Finish(..) => {
                if progress_sync.is_zero() {
                    Class::Now
                } else {
                    Class::Within(progress_sync)
                }
            }
            Op::Purge(..) | Op::CachePut(..) | Op::CacheTouch(..) => Class::Lazy,
        }
    }

    /// A write an app waits for (queued, folded, or a forward's answer kept).
    fn is_apps_write(&self) -> bool {
        matches!(
            self,
            Op::Enqueue(..) | Op::Coalesce(..) | Op::RecordForwarded(..)
        )
    }

    /// Replay progress under a window (`update`, `finish`): such ops may wait in a transaction
    /// left open until their window ends (see [`Writer::commit_batch`]).
    fn may_wait_open(&self, progress_sync: Duration) -> bool {
        matches!(self, Op::Update(..) | Op::Finish(..)) && !progress_sync.is_zero()
    }

    /// Answer the caller with `why` without applying the op (no transaction could begin).
    fn refuse(self, why: &str) {
        fn refused<T>(why: &str) -> Result<T, StoreError> {
            Err(StoreError::Embedded(why.to_owned()))
        }
        match self {
            Op::Enqueue(_, reply) => {
                reply.send(refused(why));
            }
            Op::Coalesce(_, _, reply) => {
                reply.send(refused(why));
            }
            Op::RecordForwarded(_, reply) | Op::Update(_, reply) | Op::Finish(_, reply) => {
                reply.send(refused(why));
            }
            Op::RetryDeadLetter(_, reply)
            | Op::RetryPending(_, reply)
            | Op::Drop(_, reply)
            | Op::EditDeadLetter(_, _, reply) => {
                reply.send(refused(why));
            }
            Op::Purge(_, reply) => {
                reply.send(refused(why));
            }
            Op::CachePut(..) | Op::CacheTouch(..) => {}
        }
    }
}

/// What a committed op changed, applied to the in-memory counters after the commit.
/// Queue effects carry the partition and the body bytes of the item.
pub(super) enum Effect {
    None,
    Queued(String, u64),
    Unqueued(String, u64),
    /// Left its partition for the dead-letter list.
    DeadLettered(String, u64),
    DeadRevived(String, u64),
    /// Dropped from the dead-letter list by an operator.
    DeadDropped,
    /// A pending item's body replaced by another's (coalescing): the depth stays.
    Replaced {
        old: u64,
        new: u64,
    },
    Cache {
        entries: i64,
        bytes: i64,
    },
}

#[derive(Default)]
pub(super) struct Counters {
    /// Pending items per partition.
    pub(super) pending: HashMap<String, u64>,
    /// Body bytes of all pending items.
    pub(super) pending_bytes: u64,
    pub(super) dead_letters: u64,
    pub(super) cache_entries: u64,
    pub(super) cache_bytes: u64,
}

/// `meta` row holding the layout version of the data directory.
const LAYOUT_KEY: &str = "layout_version";

/// Open (or create) the database file and rebuild the in-memory counters from it.
pub(super) fn open_database(
    path: &Path,
    page_cache: usize,
) -> Result<(Database, Counters), StoreError> {
    let db = Database::builder()
        .set_cache_size(page_cache)
        .create(path)?;
    let counters = load_counters(&db)?;
    Ok((db, counters))
}

/// Rebuild in-memory counters from the tables (on every open).
fn load_counters(db: &Database) -> Result<Counters, StoreError> {
    let txn = db.begin_write()?;
    // The layout first: a newer one is refused before anything is touched (the transaction is
    // dropped uncommitted).
    {
        let mut meta = txn.open_table(META)?;
        let found = meta.get(LAYOUT_KEY)?.map(|v| v.value());
        let layout = codec::check_layout("data directory", found, codec::LAYOUT_VERSION)?;
        if found != Some(layout) {
            meta.insert(LAYOUT_KEY, layout)?;
        }
    }
    // Create every table so readers never meet a missing one.
    {
        txn.open_table(MUTATIONS)?;
        txn.open_table(QUEUE)?;
        txn.open_table(DEAD)?;
        txn.open_table(FINISHED)?;
        txn.open_table(CACHE)?;
        txn.open_table(CACHE_LRU)?;
    }
    txn.commit()?;
    let read = db.begin_read()?;
    let mut counters = Counters::default();
    let mutations = read.open_table(MUTATIONS)?;
    for item in read.open_table(QUEUE)?.iter()? {
        let (k, key) = item?;
        *counters.pending.entry(k.value().0.to_string()).or_default() += 1;
        if let Some(blob) = mutations.get(key.value())? {
            let record: MutationRecord = codec::decode(blob.value())?;
            counters.pending_bytes += super::queue::body_len(&record);
        }
    }
    counters.dead_letters = read.open_table(DEAD)?.len()?;
    counters.cache_bytes = read
        .open_table(META)?
        .get("cache_bytes")?
        .map(|v| v.value())
        .unwrap_or(0);
    counters.cache_entries = read.open_table(CACHE)?.len()?;
    Ok(counters)
}

/// The single writer: group commit, and reopening after an I/O error (see the module docs).
pub(super) struct Writer {
    db: SharedDb,
    path: PathBuf,
    page_cache: usize,
    counters: Arc<Mutex<Counters>>,
    cache_budget: u64,
    /// `replay.progress_sync`: zero makes progress ops durable before they are answered.
    progress_sync: Duration,
    /// Answers of committed but not yet durable ops, given once a durable commit covers them.
    awaiting: Vec<Answer>,
    /// Replay progress applied but not committed yet (see [`Writer::commit_batch`]).
    open: Option<Open>,
    /// The sequence counter, saved into each transaction before it commits.
    seqs: Seq,
    /// When the non-durable commits made so far must be made durable at the latest.
    flush_by: Option<Instant>,
    /// Set from an I/O error until the database is open again.
    reopening: Option<Reopening>,
    /// Wait before the next reopening attempt: grows while the database keeps failing, and is
    /// reset by a successful commit.
    backoff: Duration,
    /// Ops in the last durable group, and how long its commit took (see [`Writer::gather`]).
    last_group: usize,
    last_commit: Duration,
}

/// A write transaction left open with replay progress in it: committed, durably, when its
/// window ends or with the next op that may not wait.
struct Open {
    txn: WriteTransaction,
    /// The ops' answers, each with its class.
    replies: Vec<(Class, Answer)>,
    effects: Vec<Effect>,
}

/// The database failed with an I/O error and is closed until the writer reopens it.
struct Reopening {
    /// The failed handle, closed once no reader holds it any more.
    old: Option<Arc<Database>>,
    next_attempt: Instant,
}

impl Writer {
    /// A writer for the database in `db` (opened from `path` with `page_cache`), keeping
    /// `counters` and the cache within `cache_budget`, with `replay.progress_sync`.
    pub(super) fn new(
        db: SharedDb,
        path: PathBuf,
        page_cache: usize,
        counters: Arc<Mutex<Counters>>,
        cache_budget: u64,
        progress_sync: Duration,
    ) -> Self {
        Self {
            db,
            path,
            page_cache,
            counters,
            cache_budget,
            progress_sync,
            awaiting: Vec::new(),
            open: None,
            seqs: Seq::default(),
            flush_by: None,
            reopening: None,
            backoff: REOPEN_BACKOFF_MIN,
            last_group: 1,
            last_commit: Duration::ZERO,
        }
    }

    /// Apply ops as they arrive until every sender is gone, then make everything durable.
    pub(super) fn run(mut self, rx: mpsc::Receiver<Op>) {
        loop {
            let received = match self.wait() {
                Some(wait) => rx.recv_timeout(wait),
                None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
            };
            self.reopen_if_due();
            match received {
                Ok(first) => {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(op) => batch.push(op),
                            Err(_) => break,
                        }
                    }
                    self.gather(&rx, &mut batch);
                    // The group's answers go out when the batch ends (before any wait).
                    let answers = handoff::Batch::begin();
                    self.commit_batch(batch);
                    drop(answers);
                    self.linger();
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if self.flush_by.is_some_and(|by| Instant::now() >= by) {
                let _answers = handoff::Batch::begin();
                self.flush();
            }
        }
        if self.flush_by.is_some() {
            self.flush();
        }
    }

    /// Group commit across callers that come back in waves. A durable group smaller than the
    /// last one waits a moment for the rest of the callers that made the last one: drains of
    /// several partitions each send their next item once their answer is durable, and their
    /// next answers arrive spread over the upstream's round trip; committing the first of them
    /// alone would make the others wait for that fsync and then pay one of their own. The wait
    /// is at most half the last durable commit's time (the wait it saves the others) and
    /// [`GATHER_MAX`], and ends as soon as the group is as large as the last one. A lone caller
    /// (one partition, one writer) never waits: its last group was its own.
    ///
    /// Only replay progress gathers. A batch with an app's write in it commits at once: apps'
    /// writes arrive as the proxy threads parse them, spread over their CPU time, and
    /// committing the ones already here while the rest arrive overlaps the two; waiting for
    /// all of them left the writer idle meanwhile (64 concurrent writers, measured: 33 k/s
    /// with the wait, 37 k/s without).
    fn gather(&mut self, rx: &mpsc::Receiver<Op>, batch: &mut Vec<Op>) {
        let expected = self.last_group.min(MAX_BATCH);
        if batch.len() >= expected
            || !batch
                .iter()
                .any(|op| op.class(self.progress_sync) == Class::Now)
            || batch.iter().any(Op::is_apps_write)
        {
            return;
        }
        let deadline = Instant::now() + (self.last_commit / 2).min(GATHER_MAX);
        while batch.len() < expected {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match rx.recv_timeout(left) {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
    }

    /// While replay progress waits in the open transaction, sleep a moment before taking the
    /// next ops, instead of waiting on the channel: applying one op is quicker than the wake-up
    /// each op would cost the thread that sends it and this one (a drain sends one at a time;
    /// in a profile of 16 drains the futex calls went from 1% to 10% of the CPU when the
    /// writer, with no commit per batch to keep it busy, waited on the channel after each op).
    /// At most [`LINGER`], and never past the window; an op of class *now* that comes meanwhile
    /// waits at most that long.
    fn linger(&self) {
        if self.open.is_none() {
            return;
        }
        let left = self
            .flush_by
            .map_or(LINGER, |by| by.saturating_duration_since(Instant::now()));
        std::thread::sleep(left.min(LINGER));
    }

    /// How long to wait for the next op: until a flush is due or the next reopening attempt
    /// (`None`: nothing is due, wait for an op).
    fn wait(&self) -> Option<Duration> {
        let now = Instant::now();
        let flush = self.flush_by.map(|by| by.saturating_duration_since(now));
        let reopen = self
            .reopening
            .as_ref()
            .map(|r| r.next_attempt.saturating_duration_since(now));
        match (flush, reopen) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A durable commit: of the transaction left open with replay progress, or else an empty
    /// one. Makes earlier non-durable commits durable, and answers the ops that waited for it.
    fn flush(&mut self) {
        self.flush_by = None;
        if let Some(open) = self.open.take() {
            self.commit(open, true, 0, Instant::now());
            return;
        }
        // Nothing to flush while reopening: whatever was not durable is gone with the old
        // handle, and its callers were told when the database failed.
        let Ok(db) = current(&self.db) else {
            return;
        };
        let result = db
            .begin_write()
            .map_err(redb::Error::from)
            .and_then(|txn| txn.commit().map_err(redb::Error::from));
        drop(db);
        match result {
            Ok(()) => self.durable(None),
            Err(e) => {
                let why = self.failed(e);
                self.durable(Some(&why));
            }
        }
    }

    /// Answer every op that waited for a durable commit: done, or not written (`why`).
    fn durable(&mut self, not_written: Option<&str>) {
        for answer in self.awaiting.drain(..) {
            answer(not_written);
        }
    }

    /// Apply a batch, and commit it as its classes say. Replay progress under a window
    /// (`update`, `finish`) is not committed at once: it waits in the transaction left open
    /// until the window of the first of it ends (or an op that may not wait comes), and is then
    /// committed durably with everything else applied meanwhile: one commit per window instead
    /// of one per batch, which for a drain sending one item at a time was one per item. Its
    /// callers are answered only by a durable commit either way; what readers see of it lags
    /// by at most the window (the drain itself reads past the items it finished).
    fn commit_batch(&mut self, batch: Vec<Op>) {
        let durable = batch
            .iter()
            .any(|op| op.class(self.progress_sync) == Class::Now);
        let may_wait = batch.iter().all(|op| op.may_wait_open(self.progress_sync));
        let group = batch.len();
        let mut open = match self.open.take() {
            Some(open) => open,
            None => {
                let db = match current(&self.db) {
                    Ok(db) => db,
                    Err(why) => {
                        // Fail fast while the database is being reopened.
                        for op in batch {
                            op.refuse(&why);
                        }
                        return;
                    }
                };
                let txn = match begin(&db, durable) {
                    Ok(txn) => txn,
                    Err(e) => {
                        // E.g. redb refusing writes after an earlier I/O error: every caller
                        // hears why.
                        drop(db);
                        let why = self.failed(e);
                        self.durable(Some(&why));
                        for op in batch {
                            op.refuse(&why);
                        }
                        return;
                    }
                };
                Open {
                    txn,
                    replies: Vec::with_capacity(group),
                    effects: Vec::with_capacity(group),
                }
            }
        };
        let started = Instant::now();
        let mut tables = Tables::new(&open.txn);
        for op in batch {
            let class = op.class(self.progress_sync);
            let (effect, reply) = self.apply(&mut tables, op);
            open.effects.push(effect);
            open.replies.push((class, reply));
        }
        drop(tables);
        if may_wait && open.replies.len() < MAX_BATCH {
            let by = Instant::now() + self.progress_sync;
            self.flush_by = Some(self.flush_by.map_or(by, |b| b.min(by)));
            self.open = Some(open);
            return;
        }
        self.commit(open, durable, group, started);
    }

    /// Commit `open` (durably or not), then apply its effects and answer its callers as their
    /// classes say. `group` ops of it came in the last batch, applied from `started`.
    fn commit(&mut self, open: Open, durable: bool, group: usize, started: Instant) {
        let Open {
            mut txn,
            replies,
            effects,
        } = open;
        let result = self.seqs.save(&txn).and_then(|()| {
            if durable {
                txn.set_durability(Durability::Immediate)?;
            }
            txn.commit().map_err(redb::Error::from)
        });
        if let Err(e) = result {
            let why = self.failed(e);
            // Earlier non-durable commits may be lost with this one (a reopen rolls back to the
            // last durable commit): their callers must record again too.
            self.durable(Some(&why));
            for (_, reply) in replies {
                reply(Some(&why));
            }
            return;
        }
        self.backoff = REOPEN_BACKOFF_MIN;
        if let Ok(mut c) = self.counters.lock() {
            for e in effects {
                apply_effect(&mut c, e);
            }
        }
        if durable {
            if group > 0 {
                self.last_group = group;
                self.last_commit = started.elapsed();
            }
            self.flush_by = None;
            self.durable(None);
            for (_, reply) in replies {
                reply(None);
            }
            return;
        }
        let now = Instant::now();
        for (class, reply) in replies {
            let by = match class {
                Class::Within(window) => {
                    self.awaiting.push(reply);
                    now + window
                }
                Class::Lazy | Class::Now => {
                    reply(None);
                    now + LAZY_FLUSH
                }
            };
            self.flush_by = Some(self.flush_by.map_or(by, |b| b.min(by)));
        }
    }

    /// Log a failed begin or commit and say why for the callers. After an I/O error, take the
    /// database away from readers and plan to reopen it (redb refuses writes until then).
    fn failed(&mut self, e: redb::Error) -> String {
        self.flush_by = None;
        self.seqs.forget();
        let why = format!("commit failed: {e}");
        if !matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo) {
            tracing::error!("store {why}");
            return why;
        }
        tracing::error!(
            "store {why}; closing the database and reopening it in {:?}",
            self.backoff
        );
        let old = match self.db.write() {
            Ok(mut handle) => {
                match std::mem::replace(&mut *handle, DbHandle::Reopening(e.to_string())) {
                    DbHandle::Open(db) => Some(db),
                    DbHandle::Reopening(_) => None,
                }
            }
            Err(_) => None,
        };
        self.reopening = Some(Reopening {
            old,
            next_attempt: Instant::now() + self.backoff,
        });
        self.backoff = (self.backoff * 2).min(REOPEN_BACKOFF_MAX);
        why
    }

    /// One attempt to reopen the database, when one is due.
    fn reopen_if_due(&mut self) {
        let Some(reopening) = &mut self.reopening else {
            return;
        };
        if Instant::now() < reopening.next_attempt {
            return;
        }
        match reopen(reopening, &self.path, self.page_cache) {
            Ok((db, counters)) => {
                // Effects of lost commits were counted: count again from what is stored.
                if let Ok(mut c) = self.counters.lock() {
                    *c = counters;
                }
                if let Ok(mut handle) = self.db.write() {
                    *handle = DbHandle::Open(Arc::new(db));
                }
                self.reopening = None;
                tracing::info!("store database reopened after an I/O error");
            }
            Err(e) => {
                tracing::warn!(
                    "store database not reopened yet ({e}); next attempt in {:?}",
                    self.backoff
                );
                reopening.next_attempt = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(REOPEN_BACKOFF_MAX);
            }
        }
    }

    /// Apply one op inside the open transaction. The returned closure answers the caller once
    /// the commit's fate is known (an error then overrides the op's own result).
    fn apply(&mut self, t: &mut Tables<'_>, op: Op) -> (Effect, Answer) {
        fn answer<T: Send + 'static>(reply: Reply<T>, result: Result<T, StoreError>) -> Answer {
            Box::new(move |not_written| {
                let out = match not_written {
                    Some(why) => Err(StoreError::Embedded(why.to_owned())),
                    None => result,
                };
                reply.send(out);
            })
        }
        let noop = || -> Answer { Box::new(|_| {}) };
        match op {
            Op::Enqueue(record, reply) => match enqueue(t, &mut self.seqs, *record) {
                Ok((effect, result)) => (effect, answer(reply, Ok(result))),
                Err(e) => (Effect::None, answer(reply, Err(e))),
            },
            Op::Coalesce(pair, tail_seq, reply) => {
                let (record, folded) = *pair;
                let (new, old) = (
                    super::queue::body_len(&record),
                    super::queue::body_len(&folded),
                );
                match enqueue_coalesced(t, record, &folded, tail_seq) {
                    Ok(r @ Coalesced::Folded { .. }) => {
                        (Effect::Replaced { old, new }, answer(reply, Ok(r)))
                    }
                    r => (Effect::None, answer(reply, r)),
                }
            }
            Op::RecordForwarded(record, reply) => {
                let r = record_forwarded(t, &record);
                (Effect::None, answer(reply, r))
            }
            Op::Update(record, reply) => {
                let r = update(t, &record);
                (Effect::None, answer(reply, r))
            }
            Op::Finish(record, reply) => match finish(t, *record) {
                Ok(effect) => (effect, answer(reply, Ok(()))),
                Err(e) => (Effect::None, answer(reply, Err(e))),
            },
            Op::RetryDeadLetter(key, reply) => {
                match retry_dead_letter(t, &mut self.seqs, &key, None) {
                    Ok(Some(effect)) => (effect, answer(reply, Ok(true))),
                    Ok(None) => (Effect::None, answer(reply, Ok(false))),
                    Err(e) => (Effect::None, answer(reply, Err(e))),
                }
            }
            Op::RetryPending(key, reply) => {
                let r = retry_pending(t, &key);
                (Effect::None, answer(reply, r))
            }
            Op::Drop(key, reply) => match drop_mutation(t, &key, None) {
                Ok(Some(effect)) => (effect, answer(reply, Ok(true))),
                Ok(None) => (Effect::None, answer(reply, Ok(false))),
                Err(e) => (Effect::None, answer(reply, Err(e))),
            },
            Op::EditDeadLetter(key, edit, reply) => {
                let r = match edit {
                    DeadLetterEdit::Headers(h) => {
                        retry_dead_letter(t, &mut self.seqs, &key, Some(h))
                    }
                    DeadLetterEdit::Superseded(new) => drop_mutation(t, &key, Some(&new)),
                };
                match r {
                    Ok(Some(effect)) => (effect, answer(reply, Ok(true))),
                    Ok(None) => (Effect::None, answer(reply, Ok(false))),
                    Err(e) => (Effect::None, answer(reply, Err(e))),
                }
            }
            Op::Purge(before, reply) => {
                let r = purge(t, before);
                (Effect::None, answer(reply, r))
            }
            Op::CachePut(key, value, expires) => {
                match cache_put(t.txn(), &key, &value, expires, self.cache_budget) {
                    Ok(effect) => (effect, noop()),
                    Err(e) => {
                        tracing::warn!("cache write failed: {e}");
                        (Effect::None, noop())
                    }
                }
            }
            Op::CacheTouch(key) => {
                if let Err(e) = cache_touch(t.txn(), &key) {
                    tracing::debug!("cache touch failed: {e}");
                }
                (Effect::None, noop())
            }
        }
    }
}

fn begin(db: &Database, durable: bool) -> Result<WriteTransaction, redb::Error> {
    let mut txn = db.begin_write()?;
    if !durable {
        txn.set_durability(Durability::None)?;
    }
    Ok(txn)
}

/// Close the failed handle once no reader holds it (redb will not open a file twice in one
/// process), then open the file again.
fn reopen(
    reopening: &mut Reopening,
    path: &Path,
    page_cache: usize,
) -> Result<(Database, Counters), StoreError> {
    if let Some(old) = reopening.old.take() {
        match Arc::try_unwrap(old) {
            // After an I/O error redb writes nothing on close, and says so with an error.
            Ok(db) => {
                if let Err(e) = db.close() {
                    tracing::debug!("closing the failed store database: {e}");
                }
            }
            Err(old) => {
                reopening.old = Some(old);
                return Err(StoreError::Embedded(
                    "readers still hold the failed database".into(),
                ));
            }
        }
    }
    open_database(path, page_cache)
}

fn apply_effect(c: &mut Counters, effect: Effect) {
    match effect {
        Effect::None => {}
        Effect::Queued(p, bytes) => {
            *c.pending.entry(p).or_default() += 1;
            c.pending_bytes += bytes;
        }
        Effect::Unqueued(p, bytes) => {
            c.pending_bytes = c.pending_bytes.saturating_sub(bytes);
            if let Some(n) = c.pending.get_mut(&p) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.pending.remove(&p);
                }
            }
        }
        Effect::DeadLettered(p, bytes) => {
            apply_effect(c, Effect::Unqueued(p, bytes));
            c.dead_letters += 1;
        }
        Effect::DeadDropped => c.dead_letters = c.dead_letters.saturating_sub(1),
        Effect::Replaced { old, new } => {
            c.pending_bytes = c.pending_bytes.saturating_sub(old).saturating_add(new);
        }
        Effect::DeadRevived(p, bytes) => {
            c.dead_letters = c.dead_letters.saturating_sub(1);
            *c.pending.entry(p).or_default() += 1;
            c.pending_bytes += bytes;
        }
        Effect::Cache { entries, bytes } => {
            c.cache_entries = c.cache_entries.saturating_add_signed(entries);
            c.cache_bytes = c.cache_bytes.saturating_add_signed(bytes);
        }
    }
}
