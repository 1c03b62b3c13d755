//! What the write path and the replayer share while running: a wake-up when a mutation is
//! queued, and which keys are being sent right now (reported `in_flight`, which the store does
//! not record).

use std::collections::HashSet;
use std::sync::Mutex;

use tokio::sync::Notify;

/// Replay activity, shared by the outbox, the replayer, the status documents and the admin API.
#[derive(Default)]
pub struct Activity {
    queued: Notify,
    in_flight: Mutex<HashSet<String>>,
}

impl Activity {
    /// A mutation was queued (or released by an operator): wake the replayer.
    pub fn wake(&self) {
        self.queued.notify_one();
    }

    /// Wait for [`Self::wake`].
    pub async fn woken(&self) {
        self.queued.notified().await;
    }

    /// Whether `key` is being sent right now.
    pub fn is_in_flight(&self, key: &str) -> bool {
        self.in_flight
            .lock()
            .map(|s| s.contains(key))
            .unwrap_or(false)
    }

    /// Note that `key` is being sent (`on`) or no longer is.
    pub fn set_in_flight(&self, key: &str, on: bool) {
        if let Ok(mut set) = self.in_flight.lock() {
            if on {
                set.insert(key.to_string());
            } else {
                set.remove(key);
            }
        }
    }
}
