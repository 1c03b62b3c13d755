//! The internal event stream: everything observable that outpost does, as one broadcast.
//!
//! Producers (health, outbox, replay) call [`Events::emit`]; it never blocks and never fails:
//! with no subscriber the event is dropped, and a slow subscriber loses the oldest events
//! (it sees `RecvError::Lagged`). The log subscriber is started by `app`; the admin API's
//! `/events` and `/metrics` subscribe here too.

use serde::Serialize;
use tokio::sync::broadcast;

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
}

/// The broadcast every part of outpost emits into.
#[derive(Debug, Clone)]
pub struct Events {
    tx: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}

impl Events {
    /// A new stream; subscribers lag after 4096 unread events.
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(4096);
        Self { tx }
    }

    /// Publish an event (dropped when nobody listens).
    pub fn emit(&self, event: Event) {
        let _ = self.tx.send(event);
    }

    /// Receive every event emitted from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}
