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
        let schedule = ProbeSchedule::from(&config);
        let check_upstream = upstream.clone();
        self.run_probe_with(
            schedule,
            shutdown,
            move || {
                let (upstream, service, config) =
                    (upstream.clone(), service.clone(), config.clone());
                async move { probe(&upstream, &service, &config).await }
            },
            move || {
                let upstream = check_upstream.clone();
                async move { connect(&upstream).await }
            },
        )
        .await;
    }

    /// [`Self::run_probe`] with the probe and the reconnect check given. While the upstream
    /// is offline:
    /// - `probe` runs after a delay growing from `schedule.interval` to `schedule.max` (full
    ///   jitter); `Ok` marks the upstream online;
    /// - `check` (cheap: a TCP connect) runs every `schedule.check_interval` (zero: never);
    ///   when it succeeds after failing (or for the first time in an outage), `probe` runs at
    ///   once, so the upstream's return is noticed within about one check interval however
    ///   long the outage lasted. A check that keeps succeeding triggers no further probes
    ///   (the upstream accepts connections but the probe fails: the backoff judges it).
    pub async fn run_probe_with<F, Fut, C, CFut>(
        self: Arc<Self>,
        schedule: ProbeSchedule,
        shutdown: Shutdown,
        mut probe: F,
        mut check: C,
    ) where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
        C: FnMut() -> CFut,
        CFut: std::future::Future<Output = Result<(), String>>,
    {
        let ProbeSchedule {
            interval,
            max,
            check_interval,
        } = schedule;
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
            let mut next_probe =
                tokio::time::Instant::now() + delays.next().unwrap_or(max).min(max);
            let mut checks = (!check_interval.is_zero()).then(|| {
                let mut t = tokio::time::interval_at(
                    tokio::time::Instant::now() + check_interval,
                    check_interval,
                );
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            // Whether the last check connected: only a failure → success edge probes.
            let mut reachable = false;
            while !self.is_online() {
                let due = tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tokio::time::sleep_until(next_probe) => {
                        next_probe = tokio::time::Instant::now()
                            + delays.next().unwrap_or(max).min(max);
                        true
                    }
                    _ = tick(&mut checks) => {
                        let was = std::mem::replace(&mut reachable, check().await.is_ok());
                        reachable && !was
                    }
                    // Passive success (a request got through) ends the wait too.
                    _ = state.changed() => false,
                };
                if !due || self.is_online() {
                    continue;
                }
                match probe().await {
                    Ok(()) => self.report_success(),
                    Err(e) => tracing::debug!("probe failed: {e}"),
                }
            }
        }
    }
}

/// When the health probe runs while the upstream is offline (see [`Health::run_probe_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSchedule {
    /// First probe delay (`upstream.probe_interval`).
    pub interval: Duration,
    /// Cap of the probe backoff (`upstream.probe_interval_max`).
    pub max: Duration,
    /// Period of the cheap reconnect check (`upstream.reconnect_check_interval`; zero: off).
    pub check_interval: Duration,
}

impl From<&UpstreamConfig> for ProbeSchedule {
    fn from(config: &UpstreamConfig) -> Self {
        Self {
            interval: config.probe_interval,
            max: config.probe_interval_max,
            check_interval: config.reconnect_check_interval,
        }
    }
}

/// The next tick of the reconnect check, or never when it is off.
async fn tick(checks: &mut Option<tokio::time::Interval>) {
    match checks {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The reconnect check: a TCP connect to the upstream's address, closed at once (no request
/// is sent, so it costs the upstream an accept and nothing more).
async fn connect(upstream: &Upstream) -> Result<(), String> {
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
        None => connect(upstream).await,
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
            ProbeSchedule {
                interval: Duration::from_millis(100),
                max: Duration::from_secs(1),
                check_interval: Duration::ZERO,
            },
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
            || async { Err("no check".to_string()) },
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

    /// Counts the calls of the probe and the reconnect check, which both succeed while `up`
    /// (or, for the check, while `port_open`).
    #[derive(Clone, Default)]
    struct Target {
        up: Arc<AtomicBool>,
        port_open: Arc<AtomicBool>,
        probes: Arc<std::sync::atomic::AtomicUsize>,
        checks: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Target {
        fn run(&self, h: &Arc<Health>, schedule: ProbeSchedule, shutdown: &Shutdown) {
            let (p, c) = (self.clone(), self.clone());
            tokio::spawn(h.clone().run_probe_with(
                schedule,
                shutdown.clone(),
                move || {
                    let p = p.clone();
                    async move {
                        p.probes.fetch_add(1, Ordering::SeqCst);
                        if p.up.load(Ordering::SeqCst) {
                            Ok(())
                        } else {
                            Err("refused".to_string())
                        }
                    }
                },
                move || {
                    let c = c.clone();
                    async move {
                        c.checks.fetch_add(1, Ordering::SeqCst);
                        if c.up.load(Ordering::SeqCst) || c.port_open.load(Ordering::SeqCst) {
                            Ok(())
                        } else {
                            Err("refused".to_string())
                        }
                    }
                },
            ));
        }

        fn probes(&self) -> usize {
            self.probes.load(Ordering::SeqCst)
        }

        fn checks(&self) -> usize {
            self.checks.load(Ordering::SeqCst)
        }
    }

    /// The default schedule: probes back off from 250 ms to 10 s, the check runs every 250 ms.
    fn defaults() -> ProbeSchedule {
        ProbeSchedule::from(&UpstreamConfig::default())
    }

    /// Virtual time until `h` is online (at most `limit`).
    async fn time_to_online(h: &Health, limit: Duration) -> Duration {
        let start = tokio::time::Instant::now();
        let mut state = h.watch();
        tokio::time::timeout(limit, async {
            while !*state.borrow_and_update() {
                let _ = state.changed().await;
            }
        })
        .await
        .expect("back online");
        start.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_long_outage_the_reconnect_check_sees_the_return_within_one_check_interval() {
        let h = Arc::new(health(3, Duration::from_secs(10)));
        let shutdown = Shutdown::new();
        let target = Target::default();
        let schedule = defaults();
        assert_eq!(schedule.check_interval, Duration::from_millis(250));
        assert_eq!(schedule.max, Duration::from_secs(10));
        target.run(&h, schedule, &shutdown);
        h.report_failure("down");
        // Two minutes down: the probe has backed off to its 10 s cap by now.
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(!h.is_online());
        let (probes, checks) = (target.probes(), target.checks());
        // 250 ms, 500 ms, ... up to 10 s (jitter only lengthens a delay): at most ~17 probes;
        // the failing checks triggered none.
        assert!(probes <= 20, "{probes} probes in two minutes");
        assert!(
            checks >= 470,
            "{checks} checks in two minutes (one per 250 ms)"
        );
        target.up.store(true, Ordering::SeqCst);
        let took = time_to_online(&h, Duration::from_secs(30)).await;
        assert!(
            took <= schedule.check_interval + Duration::from_millis(1),
            "back after {took:?}, not within one check interval"
        );
        assert_eq!(
            target.probes(),
            probes + 1,
            "one probe, triggered by the check"
        );
        shutdown.trigger();
    }

    #[tokio::test(start_paused = true)]
    async fn a_check_that_keeps_connecting_triggers_one_probe_not_one_per_check() {
        let h = Arc::new(health(3, Duration::from_secs(10)));
        let shutdown = Shutdown::new();
        // The port accepts connections, but the probe (e.g. GET probe_path) keeps failing.
        let target = Target::default();
        target.port_open.store(true, Ordering::SeqCst);
        target.run(&h, defaults(), &shutdown);
        h.report_failure("answers 503");
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(!h.is_online());
        let (probes, checks) = (target.probes(), target.checks());
        assert!(checks >= 470, "{checks} checks");
        // The backed-off probes (at most ~17) plus the one the first successful check ran.
        assert!(
            probes <= 21,
            "{probes} probes: the check must not probe on every success"
        );
        // The port closes and opens again: that edge probes at once.
        target.port_open.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(600)).await;
        let before = target.probes();
        target.up.store(true, Ordering::SeqCst);
        let took = time_to_online(&h, Duration::from_secs(30)).await;
        assert!(took <= Duration::from_millis(251), "back after {took:?}");
        assert_eq!(target.probes(), before + 1);
        shutdown.trigger();
    }

    #[tokio::test(start_paused = true)]
    async fn with_the_check_off_only_the_backed_off_probe_sees_the_return() {
        let h = Arc::new(health(3, Duration::from_secs(10)));
        let shutdown = Shutdown::new();
        let target = Target::default();
        let schedule = ProbeSchedule {
            check_interval: Duration::ZERO,
            ..defaults()
        };
        target.run(&h, schedule, &shutdown);
        h.report_failure("down");
        tokio::time::sleep(Duration::from_secs(120)).await;
        target.up.store(true, Ordering::SeqCst);
        let took = time_to_online(&h, Duration::from_secs(30)).await;
        assert_eq!(target.checks(), 0, "the check is off");
        assert!(
            took <= schedule.max,
            "the probe still comes, at most its cap later"
        );
        shutdown.trigger();
    }
}
