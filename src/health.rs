//! Upstream health: online or offline, judged passively and by an active probe.
//!
//! - Passive: the proxy and the replayer report every transport failure or timeout
//!   ([`Health::report_failure`]) and every answer ([`Health::report_success`]).
//! - Active: while offline, [`Health::run_probe`] checks the upstream (a GET of
//!   `upstream.probe_path`, any answer below 500 counting, or else a TCP connect) with
//!   exponential backoff from `probe_interval` up to `probe_interval_max`.
//!
//! While offline, reads go to the cache at once instead of waiting for a connect timeout.
//! Every state change is logged and published as an [`Event`]; the replayer watches
//! [`Health::watch`] to resume within moments of the upstream coming back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backon::BackoffBuilder;
use http::Request;
use tokio::sync::watch;

use crate::body;
use crate::config::UpstreamConfig;
use crate::events::{Event, Events};
use crate::proxy::forward::{ForwardError, Upstream};
use crate::shutdown::Shutdown;

/// The upstream's reachability.
pub struct Health {
    online: AtomicBool,
    state: watch::Sender<bool>,
    events: Events,
}

impl Health {
    /// Starts online: the first request finds out.
    pub fn new(events: Events) -> Self {
        let (state, _) = watch::channel(true);
        Self {
            online: AtomicBool::new(true),
            state,
            events,
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

    /// Judge the upstream by what one forwarded request got: an answer is online, a transport
    /// failure or timeout is offline, and a failure of the app's own request body says
    /// nothing about the upstream.
    pub fn observe<T>(&self, result: &Result<T, ForwardError>) {
        match result {
            Ok(_) => self.report_success(),
            Err(e) if e.request_body_failed() => {}
            Err(e) => self.report_failure(&e.to_string()),
        }
    }

    /// Probe the upstream whenever it is offline, until shutdown.
    pub async fn run_probe(
        self: Arc<Self>,
        upstream: Upstream,
        config: UpstreamConfig,
        shutdown: Shutdown,
    ) {
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
                .with_min_delay(config.probe_interval)
                .with_max_delay(config.probe_interval_max)
                .with_factor(2.0)
                .with_jitter()
                .without_max_times()
                .build();
            while !self.is_online() {
                let delay = delays.next().unwrap_or(config.probe_interval_max);
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tokio::time::sleep(delay.min(config.probe_interval_max)) => {}
                    // Passive success (a request got through) ends the wait too.
                    _ = state.changed() => {}
                }
                if self.is_online() {
                    break;
                }
                match probe(&upstream, &config).await {
                    Ok(()) => self.report_success(),
                    Err(e) => tracing::debug!("probe failed: {e}"),
                }
            }
        }
    }
}

/// One probe: GET `probe_path` (below 500 counts as online) or a TCP connect.
async fn probe(upstream: &Upstream, config: &UpstreamConfig) -> Result<(), String> {
    match &config.probe_path {
        Some(path) => {
            let req = Request::get(upstream.uri_for(path))
                .header(http::header::USER_AGENT, "outpost-probe")
                .body(body::empty())
                .map_err(|e| e.to_string())?;
            let resp = upstream.send(req).await.map_err(|e| e.to_string())?;
            if resp.status().is_server_error() {
                return Err(format!("probe answered {}", resp.status()));
            }
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
