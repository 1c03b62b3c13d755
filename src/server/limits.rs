//! How many connections a listener holds, and what happens at the limit.
//!
//! Each listener has its own [`Connections`] budget (the proxy's `proxy.max_connections`
//! across all its threads, the admin's `admin.max_connections`), so a flood on the proxy
//! port never starves the admin API. At the limit a new connection makes room by closing the
//! connection that has been idle longest (waiting for a request head, none of it received,
//! nothing in flight — the keep-alive connections nginx reuses in the same situation); when
//! no connection is idle, the new one is refused (a best-effort `503` on plain HTTP, then
//! closed). Either way a warning is logged at most every few seconds, and the counters are on
//! the admin `/status` document.
//!
//! [`fit_to_open_files`] runs at start: it raises the soft open-file limit towards the hard one
//! when the budgets need more descriptors, and lowers the proxy budget (with a warning) when
//! the hard limit cannot hold it, so that accepting never fails for want of descriptors and
//! the admin listener keeps some of its own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::guard::ConnShared;

/// Descriptors kept for everything but client connections: listeners, the store, the event
/// loop, Redis, probes.
const RESERVED_FDS: u64 = 128;
/// Least time between two warnings about the limit.
const WARN_EVERY: Duration = Duration::from_secs(5);

/// The counters of a [`Connections`] budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ConnectionStats {
    /// Connections open now.
    pub open: usize,
    /// The budget.
    pub limit: usize,
    /// Connections refused at the limit (none was idle).
    pub refused: u64,
    /// Idle connections closed to make room for new ones.
    pub evicted: u64,
    /// Connections closed for sending no complete request head in time (408 or silent).
    pub header_timeouts: u64,
    /// Request heads refused for ambiguous framing or a bad `Host` (400).
    pub framing_refusals: u64,
}

/// One listener's connection budget (see the module docs).
#[derive(Debug)]
pub struct Connections {
    name: &'static str,
    limit: usize,
    epoch: Instant,
    open: AtomicUsize,
    refused: AtomicU64,
    evicted: AtomicU64,
    header_timeouts: AtomicU64,
    framing_refusals: AtomicU64,
    next_id: AtomicU64,
    open_conns: Mutex<HashMap<u64, Arc<ConnShared>>>,
    /// When the last warning about closing idle connections was logged (ms since `epoch`,
    /// plus one; 0 = never).
    last_eviction_warning: AtomicU64,
    /// The same for refusing connections.
    last_refusal_warning: AtomicU64,
}

impl Connections {
    /// A budget of `limit` connections for the listener called `name` (for logs).
    pub fn new(name: &'static str, limit: usize) -> Arc<Self> {
        Arc::new(Self {
            name,
            limit: limit.max(1),
            epoch: Instant::now(),
            open: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            header_timeouts: AtomicU64::new(0),
            framing_refusals: AtomicU64::new(0),
            next_id: AtomicU64::new(0),
            open_conns: Mutex::new(HashMap::new()),
            last_eviction_warning: AtomicU64::new(0),
            last_refusal_warning: AtomicU64::new(0),
        })
    }

    /// The counters.
    pub fn stats(&self) -> ConnectionStats {
        ConnectionStats {
            open: self.open.load(Ordering::Relaxed),
            limit: self.limit,
            refused: self.refused.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
            header_timeouts: self.header_timeouts.load(Ordering::Relaxed),
            framing_refusals: self.framing_refusals.load(Ordering::Relaxed),
        }
    }

    /// Admit a new connection, closing the longest-idle one at the limit; `None` when the
    /// limit is reached and nothing is idle (the caller closes the new connection).
    pub fn admit(self: &Arc<Self>) -> Option<Admission> {
        let open = self.open.fetch_add(1, Ordering::AcqRel) + 1;
        if open > self.limit {
            match self.claim_longest_idle() {
                Some(victim) => {
                    // Its slot frees as soon as its task sees the notice.
                    victim.close.notify_one();
                    let n = self.evicted.fetch_add(1, Ordering::Relaxed) + 1;
                    self.warn(&self.last_eviction_warning, |name, limit| {
                        tracing::warn!(
                            "{name} listener at its limit of {limit} connections: closing the \
                             longest-idle ones to make room ({n} so far)"
                        )
                    });
                }
                None => {
                    self.open.fetch_sub(1, Ordering::AcqRel);
                    let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
                    self.warn(&self.last_refusal_warning, |name, limit| {
                        tracing::warn!(
                            "{name} listener at its limit of {limit} connections, none idle: \
                             refusing new connections ({n} refused so far)"
                        )
                    });
                    return None;
                }
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(ConnShared::new(self.now_ms()));
        if let Ok(mut conns) = self.open_conns.lock() {
            conns.insert(id, shared.clone());
        }
        Some(Admission {
            id,
            shared,
            owner: self.clone(),
            made_room: open > self.limit,
        })
    }

    fn claim_longest_idle(&self) -> Option<Arc<ConnShared>> {
        let conns = self.open_conns.lock().ok()?;
        let mut idle: Vec<(u64, &Arc<ConnShared>)> = conns
            .values()
            .filter_map(|c| Some((c.idle_since()?, c)))
            .collect();
        idle.sort_unstable_by_key(|(since, _)| *since);
        // Claiming can lose a race with another thread's admission: try the next one.
        idle.into_iter()
            .map(|(_, c)| c)
            .find(|c| c.claim_for_closing())
            .cloned()
    }

    /// Log with `log` unless `last` says this warning was logged less than [`WARN_EVERY`] ago.
    fn warn(&self, last_warning: &AtomicU64, log: impl FnOnce(&str, usize)) {
        let now = self.now_ms() + 1;
        let last = last_warning.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= WARN_EVERY.as_millis() as u64;
        if due
            && last_warning
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            log(self.name, self.limit);
        }
    }

    /// Milliseconds since this budget was made (a monotonic clock for idle times).
    pub(super) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub(super) fn count_timeout(&self) {
        self.header_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn count_refused_head(&self) {
        self.framing_refusals.fetch_add(1, Ordering::Relaxed);
    }
}

/// An admitted connection: holds its slot until dropped.
#[derive(Debug)]
pub struct Admission {
    id: u64,
    shared: Arc<ConnShared>,
    owner: Arc<Connections>,
    made_room: bool,
}

impl Admission {
    /// The state the connection's guard and service share.
    pub fn shared(&self) -> &Arc<ConnShared> {
        &self.shared
    }

    /// The budget it belongs to.
    pub fn connections(&self) -> &Arc<Connections> {
        &self.owner
    }

    /// Whether another connection was closed to admit this one (it still holds its slot
    /// until its task sees the notice).
    pub fn made_room(&self) -> bool {
        self.made_room
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Ok(mut conns) = self.owner.open_conns.lock() {
            conns.remove(&self.id);
        }
        self.owner.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The proxy connection budget the open-file limit can hold, given `proxy` wanted and `admin`
/// for the admin listener; raises the soft limit towards the hard one first when needed.
pub fn fit_to_open_files(proxy: usize, admin: usize) -> usize {
    use rustix::process::{Resource, getrlimit, setrlimit};
    // Two descriptors per proxy connection: the app's and, while it is forwarded, the
    // upstream's.
    let wanted = 2 * proxy as u64 + admin as u64 + RESERVED_FDS;
    let limit = getrlimit(Resource::Nofile);
    let Some(soft) = limit.current else {
        return proxy;
    };
    let mut usable = soft;
    if soft < wanted {
        let target = limit.maximum.map_or(wanted, |hard| hard.min(wanted));
        if target > soft {
            let raised = rustix::process::Rlimit {
                current: Some(target),
                maximum: limit.maximum,
            };
            match setrlimit(Resource::Nofile, raised) {
                Ok(()) => {
                    tracing::info!("open-file limit raised from {soft} to {target}");
                    usable = target;
                }
                Err(e) => tracing::warn!("cannot raise the open-file limit from {soft}: {e}"),
            }
        }
    }
    let fits = usize::try_from(usable.saturating_sub(admin as u64 + RESERVED_FDS) / 2)
        .unwrap_or(usize::MAX)
        .max(1);
    if fits < proxy {
        tracing::warn!(
            "proxy.max_connections lowered from {proxy} to {fits}: the open-file limit is \
             {usable} (raise it, e.g. `ulimit -n` or systemd's LimitNOFILE=)"
        );
        return fits;
    }
    proxy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_limit_the_longest_idle_connection_makes_room() {
        let conns = Connections::new("test", 2);
        let a = conns.admit().expect("first");
        std::thread::sleep(Duration::from_millis(5));
        let b = conns.admit().expect("second");
        // Both idle (fresh connections wait for their first head): `a` longest.
        let c = conns.admit().expect("third, by closing an idle one");
        assert!(!a.shared().claim_for_closing(), "a was claimed");
        assert!(b.shared().claim_for_closing(), "b was not");
        assert_eq!(conns.stats().evicted, 1);
        // `b` is claimed now too: the next newcomer closes `c`, the longest-idle one left.
        let d = conns.admit().expect("fourth closes c");
        assert!(!c.shared().claim_for_closing(), "c was claimed");
        // With `d` busy, nothing idle and unclaimed is left: refused.
        let _busy = crate::server::guard::Finished::new(d.shared().clone());
        d.shared().begin_for_test();
        assert!(conns.admit().is_none());
        let stats = conns.stats();
        assert_eq!((stats.refused, stats.evicted, stats.open), (1, 2, 4));
        drop((a, b, c, d, _busy));
        assert_eq!(conns.stats().open, 0);
    }

    #[test]
    fn busy_connections_are_not_closed() {
        let conns = Connections::new("test", 1);
        let a = conns.admit().expect("first");
        let _busy = crate::server::guard::Finished::new(a.shared().clone());
        a.shared().begin_for_test();
        assert!(conns.admit().is_none());
        assert_eq!(conns.stats().refused, 1);
    }

    #[test]
    fn the_proxy_budget_fits_the_open_file_limit() {
        let admin = 64;
        let fits = fit_to_open_files(usize::MAX / 4, admin);
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        if let Some(soft) = soft {
            assert!(fits == 1 || 2 * fits as u64 + admin as u64 + RESERVED_FDS <= soft);
        }
        assert_eq!(fit_to_open_files(10, admin), 10);
    }
}
