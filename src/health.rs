//! Upstream health: online or offline, judged passively and by an active probe.
//!
//! - Passive: the proxy and the replayer report every answer ([`Health::report_success`]),
//!   every refused connection or timeout ([`Health::report_failure`]: offline at once), and
//!   every exchange that broke after the request may have been sent ([`Health::report_reset`]):
//!   one such reset is that request's failure (an upstream handler dropping its socket, a
//!   keep-alive connection closed under it), so only `upstream.reset_threshold` of them within
//!   `upstream.reset_window` mark the upstream offline.
//! - Active: while offline, [`Health::run_probe`] checks the upstream (a GET of
//!   `upstream.probe_path`, any answer below 500 counting, or else a TCP connect) with
//!   exponential backoff from `probe_interval` up to `probe_interval_max`.
//!
//! While offline, reads go to the cache at once instead of waiting for a connect timeout.
//! Every state change is logged and published as an [`Event`]; the replayer watches
//! [`Health::watch`] to resume within moments of the upstream coming back.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use http::Request;
use tokio::sync::watch;

use crate::body;
use crate::config::UpstreamConfig;
use crate::error::report;
use crate::events::{Event, Events};
use crate::shutdown::Shutdown;
use crate::upstream::{ForwardError, Upstream, UpstreamService};

/// The upstream's reachability.
pub struct Health {
    online: AtomicBool,
    state: watch::Sender<bool>,
    events: Events,
    /// Recent resets and what failed, oldest first (at most `reset_threshold` kept).
    resets: Mutex<VecDeque<(Instant, Option<String>)>>,
    reset_threshold: usize,
    reset_window: Duration,
}

impl Health {
    /// Starts online: the first request finds out. Resets count as an outage per `config`
    /// (`reset_threshold` within `reset_window`).
    pub fn new(events: Events, config: &UpstreamConfig) -> Self {
        let (state, _) = watch::channel(true);
        Self {
            online: AtomicBool::new(true),
            state,
            events,
            resets: Mutex::new(VecDeque::new()),
            reset_threshold: config.reset_threshold.max(1) as usize,
            reset_window: config.reset_window,
        }
    }

    /// One exchange broke after its request may have been sent (connection reset or closed
    /// without an answer). Marks the upstream offline only when it is the
    /// `reset_threshold`-th within `reset_window`. `subject` names what failed (a mutation's
    /// key): one item failing again and again is that item's problem, so it counts once.
    pub fn report_reset(&self, reason: &str, subject: Option<&str>) {
        let now = Instant::now();
        let outage = match self.resets.lock() {
            Ok(mut resets) => {
                while resets
                    .front()
                    .is_some_and(|(t, _)| now.saturating_duration_since(*t) > self.reset_window)
                {
                    resets.pop_front();
                }
                let again = subject
                    .is_some_and(|s| resets.iter().any(|(_, seen)| seen.as_deref() == Some(s)));
                if !again {
                    resets.push_back((now, subject.map(str::to_owned)));
                }
                if resets.len() >= self.reset_threshold {
                    resets.clear();
                    true
                } else {
                    false
                }
            }
            Err(_) => true,
        };
        if outage {
            self.report_failure(reason);
        } else {
            tracing::info!(reason, "upstream reset one exchange (not an outage)");
        }
    }

    /// An answer's head came but its body did not complete: one that stalled (see
    /// [`body::BodyStalled`]) is a timeout, an outage at once; one that broke off is a reset
    /// (see [`Self::report_reset`]).
    pub fn report_body_failure(&self, e: &body::BoxError, subject: Option<&str>) {
        let reason = format!("an answer's body failed: {e}");
        if e.is::<body::BodyStalled>() {
            self.report_failure(&reason);
        } else {
            self.report_reset(&reason, subject);
        }
    }

    /// Whether the upstream is believed reachable.
    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Acquire)
    }

    /// Watch the state (true = online).
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.state.subscribe()
    }

    /// The upstream failed to answer: mark it offline (once) and let the probe take over.
    pub fn report_failure(&self, reason: &str) {
        if self.online.swap(false, Ordering::AcqRel) {
            tracing::warn!(reason, "upstream offline");
            self.state.send_replace(false);
            self.events.emit(Event::Offline {
                reason: reason.to_string(),
            });
        }
    }

    /// The upstream answered: mark it online (once).
    pub fn report_success(&self) {
        if !self.online.load(Ordering::Acquire) && !self.online.swap(true, Ordering::AcqRel) {
            tracing::info!("upstream online");
            self.state.send_replace(true);
            self.events.emit(Event::Online);
        }
    }

    /// Judge the upstream by what one forwarded request got: an answer is online, a refused
    /// connection or a timeout is offline, a reset counts towards an outage, and a failure of
    /// the app's own request body says nothing about the upstream.
    pub fn observe<T>(&self, result: &Result<T, ForwardError>) {
        self.observe_for(result, None);
    }

    /// [`Self::observe`] for a request about `subject` (a mutation's key; see
    /// [`Self::report_reset`]).
    pub fn observe_for<T>(&self, result: &Result<T, ForwardError>, subject: Option<&str>) {
        match result {
            Ok(_) => self.report_success(),
            Err(e) if e.request_body_failed() => {}
            Err(e @ ForwardError::Transport(_)) => self.report_reset(&report(e), subject),
            Err(e) => self.report_failure(&report(e)),
        }
    }

    /// Probe the upstream whenever it is offline, until shutdown.
    pub async fn run_probe(
        self: Arc<Self>,
        upstream: Upstream,
        config: UpstreamConfig,
        shutdown: Shutdown,
    ) {
        let service = upstream.service();
        let (interval, max) = (config.probe_interval, config.probe_interval_max);
        self.run_probe_with(interval, max, shutdown, move || {
            let (upstream, service, config) = (upstream.clone(), service.clone(), config.clone());
            async move { probe(&upstream, &service, &config).await }
        })
        .await;
    }

    /// [`Self::run_probe`] with the probe itself given: `probe` runs after a delay growing from
    /// `interval` to `max` (full jitter) while the upstream is offline; `Ok` marks it online.
    pub async fn run_probe_with<F, Fut>(
        self: Arc<Self>,
        interval: Duration,
        max: Duration,
        shutdown: Shutdown,
        mut probe: F,
    ) where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let mut state = self.watch();
        loop {
            // Wait for the upstream to go offline.
            while *state.borrow_and_update() {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    changed = state.changed() => if changed.is_err() { return },
                }
            }
            let mut delays = backon::ExponentialBuilder::default()
                .with_min_delay(interval)
                .with_max_delay(max)
                .with_factor(2.0)
                .with_jitter()
                .without_max_times()
                .build();
            while !self.is_online() {
                let delay = delays.next().unwrap_or(max);
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tokio::time::sleep(delay.min(max)) => {}
                    // Passive success (a request got through) ends the wait too.
                    _ = state.changed() => {}
                }
                if self.is_online() {
                    break;
                }
                match probe().await {
                    Ok(()) => self.report_success(),
                    Err(e) => tracing::debug!("probe failed: {e}"),
                }
            }
        }
    }
}

/// One probe: GET `probe_path` (below 500 counts as online) or a TCP connect.
async fn probe(
    upstream: &Upstream,
    service: &UpstreamService,
    config: &UpstreamConfig,
) -> Result<(), String> {
    match &config.probe_path {
        Some(path) => {
            let req = Request::get(upstream.uri_for(path))
                .header(http::header::USER_AGENT, "outpost-probe")
                .body(body::empty())
                .map_err(|e| e.to_string())?;
            let resp = crate::upstream::call(service, req)
                .await
                .map_err(|e| report(&e))?;
            if resp.status().is_server_error() {
                return Err(format!("probe answered {}", resp.status()));
            }
            // A whole answer: a head followed by a body that stalls or breaks off is no sign
            // of an upstream that serves.
            body::collect_within(resp.into_body(), 64 * 1024, config.request_timeout)
                .await
                .map_err(|e| format!("probe answer's body failed: {e}"))?;
            Ok(())
        }
        None => {
            let host = upstream
                .authority()
                .host()
                .trim_matches(|c| c == '[' || c == ']');
            let addr = (host.to_string(), upstream.port());
            match tokio::time::timeout(
                upstream.connect_timeout().max(Duration::from_millis(100)),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("connect timed out".into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shutdown::Shutdown;

    fn health(threshold: u32, window: Duration) -> Health {
        let config = UpstreamConfig {
            reset_threshold: threshold,
            reset_window: window,
            ..UpstreamConfig::default()
        };
        Health::new(Events::new(), &config)
    }

    #[test]
    fn one_reset_is_not_an_outage_but_several_within_the_window_are() {
        let h = health(3, Duration::from_secs(60));
        h.report_reset("reset", None);
        h.report_reset("reset", None);
        assert!(h.is_online(), "two resets stay online");
        h.report_reset("reset", None);
        assert!(!h.is_online(), "the third within the window is an outage");
        h.report_success();
        assert!(h.is_online());
        h.report_reset("reset", None);
        assert!(h.is_online(), "the count starts again after an outage");
    }

    #[test]
    fn resets_older_than_the_window_do_not_count() {
        let h = health(2, Duration::from_millis(1));
        h.report_reset("reset", None);
        std::thread::sleep(Duration::from_millis(5));
        h.report_reset("reset", None);
        assert!(h.is_online());
    }

    #[tokio::test(start_paused = true)]
    async fn the_probe_backs_off_up_to_its_cap_and_brings_the_upstream_back() {
        let h = Arc::new(health(3, Duration::from_secs(10)));
        let shutdown = Shutdown::new();
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = calls.clone();
        let start = tokio::time::Instant::now();
        let probe = h.clone().run_probe_with(
            Duration::from_millis(100),
            Duration::from_secs(1),
            shutdown.clone(),
            move || {
                let seen = seen.clone();
                async move {
                    let mut seen = seen.lock().map_err(|_| "poisoned".to_string())?;
                    seen.push(start.elapsed());
                    // The upstream answers from the eighth probe on.
                    if seen.len() >= 8 {
                        Ok(())
                    } else {
                        Err("refused".into())
                    }
                }
            },
        );
        let task = tokio::spawn(probe);
        h.report_failure("down");
        let mut state = h.watch();
        tokio::time::timeout(Duration::from_secs(60), async {
            while !*state.borrow_and_update() {
                let _ = state.changed().await;
            }
        })
        .await
        .expect("back online");
        let calls = calls.lock().expect("calls").clone();
        assert_eq!(calls.len(), 8, "{calls:?}");
        // Never more often than the first interval allows, never further apart than the cap.
        for pair in calls.windows(2) {
            assert!(pair[1] - pair[0] <= Duration::from_secs(1) + Duration::from_millis(1));
        }
        assert!(*calls.last().expect("last") <= Duration::from_secs(8));
        shutdown.trigger();
        task.await.expect("the probe ends at shutdown");
    }

    #[test]
    fn one_item_failing_again_and_again_counts_once() {
        let h = health(2, Duration::from_secs(60));
        for _ in 0..10 {
            h.report_reset("reset", Some("poison-key"));
        }
        assert!(h.is_online(), "one poison item is not an outage");
        h.report_reset("reset", Some("another-key"));
        assert!(!h.is_online(), "two different items failing are");
    }

    #[test]
    fn refused_connections_and_timeouts_are_an_outage_at_once() {
        let h = health(3, Duration::from_secs(60));
        h.observe::<()>(&Err(ForwardError::Connect("refused".into())));
        assert!(!h.is_online());
        h.report_success();
        h.observe::<()>(&Err(ForwardError::Timeout(Duration::from_secs(1))));
        assert!(!h.is_online());
    }
}
