//! The internal event stream: everything observable that outpost does, as one broadcast, and
//! a journal of the latest events with ids for the admin API's `GET /events`.
//!
//! Producers (health, outbox, replay, admin) call [`Events::emit`]; it never blocks on a
//! consumer and never fails:
//! - **observers** ([`Events::observe`]) are called with each event on the emitter's thread:
//!   for consumers that only count or log it (metrics, the log), so that an event costs no
//!   wake-up of another task (on the write path that wake-up was a tenth of the CPU per
//!   acknowledged write);
//! - the **broadcast** ([`Events::subscribe`]) is for in-process consumers that run as tasks
//!   of their own (the admin's event stream, the demo): with no subscriber the event is dropped, and a slow subscriber loses the oldest
//!   events (it sees `RecvError::Lagged`);
//! - the **journal** ([`Events::since`], [`Events::watch`]) keeps the last `admin.events_buffer`
//!   events, each [`Stamped`] with an id that only grows, so that a reconnecting client
//!   (`Last-Event-ID`) gets what it missed. Readers copy out of it under a short lock and are
//!   woken through a `watch` of the newest id, so an SSE writer stuck on a slow client holds
//!   nothing the emitters need. A reader that fell further behind than the buffer is told so
//!   ([`Since::missed`]).
//!
//! Ids start at the process's start time in milliseconds × 1000 and count up by one per event,
//! so they keep growing across restarts (unless a run emits more than a thousand events per
//! millisecond on average): a client that reconnects to a restarted outpost with an old id is
//! told that it missed events instead of silently skipping the new ones.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;
use tokio::sync::{broadcast, watch};

/// One thing that happened.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The upstream answered after being offline.
    Online,
    /// The upstream stopped answering.
    Offline {
        /// Why it is considered offline.
        reason: String,
    },
    /// A mutation was stored durably and acknowledged with a 202.
    Queued {
        /// Its idempotency key.
        key: String,
        /// Its ordering partition.
        partition: String,
    },
    /// A queued mutation is being sent upstream.
    ReplayAttempt {
        /// Its idempotency key.
        key: String,
        /// 1-based attempt number.
        attempt: u32,
    },
    /// The upstream's answer to a replayed mutation was classified.
    Classified {
        /// Its idempotency key.
        key: String,
        /// `success`, `partial`, `validation`, `conflict`, `auth_required` or `retryable`.
        class: String,
        /// Upstream status, absent for transport errors.
        status: Option<u16>,
    },
    /// A mutation went to the dead-letter list.
    DeadLettered {
        /// Its idempotency key.
        key: String,
        /// `rejected` or `conflict`.
        status: String,
    },
    /// A replayed mutation met a conflict (409, 412), acted on as its route's `conflict` says.
    Conflict {
        /// Its idempotency key.
        key: String,
        /// `dead-letter`, `server-wins` or `client-wins`.
        policy: String,
    },
    /// A queued mutation was folded into a newer one of the same URI (route `coalesce`).
    Coalesced {
        /// The folded mutation's idempotency key (its status is now `coalesced`).
        key: String,
        /// The key that carries its change now.
        into: String,
    },
    /// A mutation waits for fresh credentials of its principal.
    AuthRequired {
        /// Its idempotency key.
        key: String,
        /// The principal whose credentials are needed.
        principal: String,
    },
    /// A mutation was older than `queue.max_age` and is no longer retried.
    Expired {
        /// Its idempotency key.
        key: String,
    },
    /// An operator paused replay.
    Paused,
    /// An operator resumed replay.
    Resumed,
    /// An operator acted on an item: `retried`, `retried_edited` or `dropped`.
    Operator {
        /// Its idempotency key.
        key: String,
        /// What was done.
        action: String,
        /// The key it goes on under, when an edit gave it a new one.
        #[serde(skip_serializing_if = "Option::is_none")]
        new_key: Option<String>,
    },
}

/// An event with its id and time, as kept in the journal.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Stamped {
    /// Grows by one per event (see the module docs).
    pub id: u64,
    /// When it was emitted (Unix ms).
    pub at_ms: u64,
    /// What happened.
    #[serde(flatten)]
    pub event: Event,
}

/// What [`Events::since`] found.
#[derive(Debug, Clone, Default)]
pub struct Since {
    /// The events after the given id that are still kept, oldest first.
    pub events: Vec<Arc<Stamped>>,
    /// Some events after the given id are no longer kept.
    pub missed: bool,
}

#[derive(Debug)]
struct Journal {
    capacity: usize,
    /// The id the next event gets.
    next_id: u64,
    kept: VecDeque<Arc<Stamped>>,
}

/// A consumer called with every event, on the emitter's thread ([`Events::observe`]).
type Observer = Arc<dyn Fn(&Event) + Send + Sync>;

/// The broadcast every part of outpost emits into, with its journal.
#[derive(Clone)]
pub struct Events {
    tx: broadcast::Sender<Event>,
    observers: Arc<RwLock<Vec<Observer>>>,
    journal: Arc<Mutex<Journal>>,
    /// The id of the newest event (the first id minus one before any).
    newest: Arc<watch::Sender<u64>>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("newest", &self.newest_id())
            .finish_non_exhaustive()
    }
}

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}

impl Events {
    /// A new stream keeping the last 1024 events; subscribers lag after 4096 unread events.
    pub fn new() -> Self {
        Self::with_capacity(1024)
    }

    /// A new stream whose journal keeps the last `kept` events (at least one).
    pub fn with_capacity(kept: usize) -> Self {
        let (tx, _) = broadcast::channel(4096);
        let first = crate::store::now_ms().saturating_mul(1000).max(1);
        let (newest, _) = watch::channel(first - 1);
        Self {
            tx,
            observers: Arc::default(),
            journal: Arc::new(Mutex::new(Journal {
                capacity: kept.max(1),
                next_id: first,
                kept: VecDeque::with_capacity(kept.clamp(1, 4096)),
            })),
            newest: Arc::new(newest),
        }
    }

    /// Publish an event: to the observers, the journal and the broadcast (which drops it when
    /// nobody listens).
    pub fn emit(&self, event: Event) {
        {
            let mut journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
            let stamped = Arc::new(Stamped {
                id: journal.next_id,
                at_ms: crate::store::now_ms(),
                event: event.clone(),
            });
            journal.next_id += 1;
            if journal.kept.len() >= journal.capacity {
                journal.kept.pop_front();
            }
            // Under the lock, so that the newest id never goes backwards.
            self.newest.send_replace(stamped.id);
            journal.kept.push_back(stamped);
        }
        for observer in self
            .observers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            observer(&event);
        }
        let _ = self.tx.send(event);
    }

    /// Call `observe` with every event emitted from now on, on the emitting thread, before the
    /// broadcast. For consumers that are cheap and never block (counting, logging): unlike a
    /// subscriber, an observer costs no task wake-up per event and never lags. It must not
    /// emit events itself.
    pub fn observe(&self, observe: impl Fn(&Event) + Send + Sync + 'static) {
        self.observers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(observe));
    }

    /// Receive every event emitted from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    /// The id of the newest event; changes whenever one is emitted.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.newest.subscribe()
    }

    /// The id of the newest event (before any: one less than the first id).
    pub fn newest_id(&self) -> u64 {
        *self.newest.borrow()
    }

    /// The kept events after `after` (an id a client saw last), at most `limit` of them.
    pub fn since(&self, after: u64, limit: usize) -> Since {
        let journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = journal.kept.front().map_or(journal.next_id, |e| e.id);
        // Ids are consecutive, so the position of `after + 1` is known without a search.
        let skip =
            usize::try_from(after.saturating_add(1).saturating_sub(oldest)).unwrap_or(usize::MAX);
        Since {
            events: journal
                .kept
                .iter()
                .skip(skip)
                .take(limit)
                .cloned()
                .collect(),
            missed: after.saturating_add(1) < oldest,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_keeps_the_newest_events_with_growing_ids() {
        let events = Events::with_capacity(3);
        let start = events.newest_id();
        for i in 0..5 {
            events.emit(Event::Expired {
                key: format!("k{i}"),
            });
        }
        assert_eq!(events.newest_id(), start + 5);
        let all = events.since(0, usize::MAX);
        assert!(all.missed, "the first two are gone");
        let ids: Vec<u64> = all.events.iter().map(|e| e.id).collect();
        assert_eq!(ids, [start + 3, start + 4, start + 5]);
        let after = events.since(start + 3, usize::MAX);
        assert!(!after.missed);
        assert_eq!(after.events.len(), 2);
        assert_eq!(after.events[0].event, Event::Expired { key: "k3".into() });
        let none = events.since(start + 5, usize::MAX);
        assert!(!none.missed && none.events.is_empty());
        assert_eq!(events.since(start + 3, 1).events.len(), 1);
        // An id from the future (another run) sees nothing and misses nothing it could get.
        assert!(events.since(u64::MAX, 10).events.is_empty());
    }

    #[test]
    fn a_stamped_event_serialises_flat() {
        let s = Stamped {
            id: 7,
            at_ms: 1,
            event: Event::Classified {
                key: "k".into(),
                class: "success".into(),
                status: Some(201),
            },
        };
        let v = serde_json::to_value(&s).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"id": 7, "at_ms": 1, "type": "classified", "key": "k",
                "class": "success", "status": 201})
        );
    }
}
