//! `outpost loadtest`: replay a HAR file as load against a target, and account for every
//! mutation when the upstream is the built-in mock.
//!
//! Requests keep their method, path, query, headers (less hop-by-hop ones, `Host`,
//! `Content-Length` and HTTP/2 pseudo-headers) and body; scheme and host become the target's.
//! Every mutation gets the tool's own `Idempotency-Key`, so an acknowledgement (2xx, 202
//! included) can be matched against the mock upstream's ledger after the queue drained:
//! `lost` = acknowledged and never applied, `applied_twice` = applied more than once. Either
//! makes the exit code 1.
//!
//! Closed loop (`--concurrency N` workers, each sending its next request when the last one is
//! answered) or open loop (`--rate R` requests per second, whatever the answers do);
//! `--speed X` paces requests at the recorded offsets divided by X.

pub mod har;
pub mod mock;
pub mod plot;
pub mod report;

use std::collections::HashSet;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use har::HarEntry;
use mock::{Mock, MockServer};
use report::{Mutations, Report, Stats};

/// Flags of `outpost loadtest`.
#[derive(Debug, clap::Args)]
pub struct LoadtestArgs {
    /// The HAR file to replay (a recording cut by a crash is repaired).
    #[arg(long)]
    pub har: PathBuf,
    /// Where to send the requests (scheme and host replace the recorded ones).
    #[arg(long)]
    pub target: String,
    /// Replay only the entries recorded for this host (with or without its port).
    #[arg(long)]
    pub only_host: Option<String>,
    /// Closed loop: this many requests in flight (default 1).
    #[arg(long, conflicts_with = "rate")]
    pub concurrency: Option<usize>,
    /// Open loop: this many requests per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Run this long (e.g. `10s`), cycling through the HAR.
    #[arg(long, value_parser = humantime_serde::re::humantime::parse_duration, conflicts_with = "requests")]
    pub duration: Option<Duration>,
    /// Send this many requests, cycling through the HAR (default: each entry once).
    #[arg(long)]
    pub requests: Option<u64>,
    /// Keep the recorded pacing, this many times faster.
    #[arg(long)]
    pub speed: Option<f64>,
    /// Start a built-in upstream on this loopback address that answers the HAR's requests and
    /// keeps a ledger of applied mutations.
    #[arg(long)]
    pub mock_upstream: Option<SocketAddr>,
    /// Take the mock upstream down at AT for FOR (e.g. `2s+3s`); repeatable.
    #[arg(long, value_parser = parse_outage, requires = "mock_upstream")]
    pub outage: Vec<Outage>,
    /// Admin API of the outpost under test: wait for its queue to drain after the run.
    #[arg(long)]
    pub admin: Option<String>,
    /// How long to wait for the queue to drain.
    #[arg(long, value_parser = humantime_serde::re::humantime::parse_duration, default_value = "60s")]
    pub drain_timeout: Duration,
    /// Extra CA certificates (PEM) to trust for an `https://` target, besides the system's.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Write `latency.svg` and `throughput.svg` (per second, outages shaded) to this directory.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// One outage of the mock upstream: down at `at` after the start, for `length`.
#[derive(Debug, Clone, Copy)]
pub struct Outage {
    /// When it starts, after the run's start.
    pub at: Duration,
    /// How long it lasts.
    pub length: Duration,
}

fn parse_outage(s: &str) -> Result<Outage, String> {
    let (at, length) = s
        .split_once('+')
        .ok_or_else(|| format!("{s:?} is not AT+FOR (e.g. 2s+3s)"))?;
    let parse = |d: &str| {
        humantime_serde::re::humantime::parse_duration(d.trim()).map_err(|e| format!("{d:?}: {e}"))
    };
    Ok(Outage {
        at: parse(at)?,
        length: parse(length)?,
    })
}

/// Why a load test could not run.
#[derive(Debug, thiserror::Error)]
pub enum LoadtestError {
    /// The HAR could not be loaded (exit 2).
    #[error("{path}")]
    Har {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: har::HarError,
    },
    /// Bad flags (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The mock upstream could not start (exit 2 for a non-loopback address).
    #[error("mock upstream")]
    Mock(#[from] mock::MockError),
    /// Anything else (exit 1).
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Run `outpost loadtest`; returns the exit code (0 ok, 1 loss or failure, 2 usage).
pub fn main(args: LoadtestArgs) -> u8 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("error: {}", crate::error::report(&e));
            match e {
                LoadtestError::Har { .. }
                | LoadtestError::Usage(_)
                | LoadtestError::Mock(mock::MockError::NotLoopback(_)) => 2,
                _ => 1,
            }
        }
    }
}

/// Headers not replayed: hop-by-hop ones, and those the client sets itself.
const SKIPPED: [&str; 11] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "host",
    "content-length",
    "idempotency-key",
    "http2-settings",
];

struct Shared {
    entries: Vec<HarEntry>,
    scheme: String,
    authority: String,
    client: Client<Connector, Full<Bytes>>,
    next: AtomicU64,
    limit: u64,
    deadline: Option<Instant>,
    start: Instant,
    speed: Option<f64>,
    span_ms: f64,
    stats: Mutex<Stats>,
    acknowledged: Mutex<HashSet<String>>,
    mutations_sent: AtomicU64,
}

/// Run a load test; `Ok(false)` when a mutation was lost or applied twice (or never drained).
pub async fn run(args: LoadtestArgs) -> Result<bool, LoadtestError> {
    let path = args.har.display().to_string();
    let mut entries = har::load(&args.har).map_err(|source| LoadtestError::Har { path, source })?;
    if let Some(host) = &args.only_host {
        entries.retain(|e| {
            e.host.eq_ignore_ascii_case(host)
                || e.host
                    .rsplit_once(':')
                    .is_some_and(|(h, _)| h.eq_ignore_ascii_case(host))
        });
    }
    if entries.is_empty() {
        return Err(LoadtestError::Usage(
            "the HAR has no requests to replay".into(),
        ));
    }
    let target: http::Uri = args
        .target
        .parse()
        .map_err(|e| LoadtestError::Usage(format!("--target {}: {e}", args.target)))?;
    let (Some(scheme), Some(authority)) = (target.scheme_str(), target.authority()) else {
        return Err(LoadtestError::Usage(format!(
            "--target {}: needs a scheme and a host",
            args.target
        )));
    };
    if scheme != "http" && scheme != "https" {
        return Err(LoadtestError::Usage(format!(
            "--target {}: the scheme must be http or https",
            args.target
        )));
    }
    if args.rate.is_some_and(|r| r <= 0.0) || args.speed.is_some_and(|s| s <= 0.0) {
        return Err(LoadtestError::Usage(
            "--rate and --speed must be > 0".into(),
        ));
    }
    let mock = match args.mock_upstream {
        Some(addr) => {
            let ledger = Arc::new(Mock::new(&entries));
            Some(Arc::new(tokio::sync::Mutex::new(
                MockServer::start(addr, ledger).await?,
            )))
        }
        None => None,
    };
    let limit = match (args.requests, args.duration) {
        (Some(n), _) => n,
        (None, Some(_)) => u64::MAX,
        (None, None) => entries.len() as u64,
    };
    let start = Instant::now();
    let span_ms = entries.iter().map(|e| e.offset_ms).fold(0.0, f64::max) + 1.0;
    let connector = connector(args.ca_file.as_deref())?;
    let shared = Arc::new(Shared {
        entries,
        scheme: scheme.to_owned(),
        authority: authority.as_str().to_owned(),
        client: Client::builder(TokioExecutor::new()).build(connector),
        next: AtomicU64::new(0),
        limit,
        deadline: args.duration.map(|d| start + d),
        start,
        speed: args.speed,
        span_ms,
        stats: Mutex::new(Stats::new()),
        acknowledged: Mutex::new(HashSet::new()),
        mutations_sent: AtomicU64::new(0),
    });

    // Outages, relative to the start.
    let mut outages = args.outage.clone();
    outages.sort_by_key(|o| o.at);
    let outage_task = mock.clone().map(|server| {
        let outages = outages.clone();
        tokio::spawn(async move {
            for o in outages {
                tokio::time::sleep_until((start + o.at).into()).await;
                server.lock().await.down();
                tracing::info!(at = ?o.at, "mock upstream down");
                tokio::time::sleep_until((start + o.at + o.length).into()).await;
                if let Err(e) = server.lock().await.up().await {
                    tracing::error!("mock upstream cannot come back: {e}");
                }
                tracing::info!(at = ?(o.at + o.length), "mock upstream up");
            }
        })
    });

    let progress = Progress::start(shared.clone(), args.duration);
    match args.rate {
        None => {
            let mut workers = tokio::task::JoinSet::new();
            for _ in 0..args.concurrency.unwrap_or(1).max(1) {
                let shared = shared.clone();
                workers.spawn(async move {
                    while let Some(i) = shared.claim() {
                        shared.send(i).await;
                    }
                });
            }
            while workers.join_next().await.is_some() {}
        }
        Some(rate) => {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut inflight = tokio::task::JoinSet::new();
            loop {
                tick.tick().await;
                let Some(i) = shared.claim() else { break };
                let shared = shared.clone();
                inflight.spawn(async move { shared.send(i).await });
                while inflight.try_join_next().is_some() {}
            }
            while inflight.join_next().await.is_some() {}
        }
    }
    let elapsed = start.elapsed();
    progress.finish();

    let stats = shared.stats.lock().map(|s| s.clone()).unwrap_or_default();
    let mut report = Report::new(&stats, elapsed);
    report.outages_ms = outages
        .iter()
        .map(|o| {
            let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            [ms(o.at), ms(o.at + o.length)]
        })
        .collect();
    let mut ok = true;
    if let Some(server) = &mock {
        if let Some(task) = outage_task {
            // Outages scheduled past the run still happen, so the mock is up afterwards.
            let _ = task.await;
        }
        let last_up = outages
            .iter()
            .map(|o| start + o.at + o.length)
            .max()
            .unwrap_or(start + elapsed)
            .max(start + elapsed);
        let drained_at = match &args.admin {
            Some(admin) => wait_for_drain(&shared.client, admin, args.drain_timeout).await,
            None => None,
        };
        let ledger = server.lock().await.mock().ledger();
        let acknowledged = shared
            .acknowledged
            .lock()
            .map(|a| a.clone())
            .unwrap_or_default();
        let m = Mutations {
            sent: shared.mutations_sent.load(Ordering::Relaxed),
            acknowledged: acknowledged.len() as u64,
            applied: ledger.len() as u64,
            applications: ledger.values().sum(),
            lost: acknowledged
                .iter()
                .filter(|k| !ledger.contains_key(*k))
                .count() as u64,
            applied_twice: ledger.values().filter(|n| **n > 1).count() as u64,
            drain_ms: drained_at.map(|t| {
                u64::try_from(t.saturating_duration_since(last_up).as_millis()).unwrap_or(u64::MAX)
            }),
            drained: drained_at.is_some(),
        };
        ok = m.lost == 0 && m.applied_twice == 0 && (args.admin.is_none() || m.drained);
        report.mutations = Some(m);
    }
    print!("{}", report.table());
    if let Some(dir) = &args.plot {
        plot::write(dir, &stats, &report.outages_ms).map_err(|e| {
            LoadtestError::Io(std::io::Error::other(format!(
                "--plot {}: {e}",
                dir.display()
            )))
        })?;
    }
    if let Some(path) = &args.report {
        let json = serde_json::to_vec_pretty(&report).map_err(std::io::Error::other)?;
        std::fs::write(path, json)?;
    }
    Ok(ok)
}

impl Shared {
    /// The next request to send, or `None` when the run is over.
    fn claim(&self) -> Option<u64> {
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        (i < self.limit).then_some(i)
    }

    async fn send(&self, i: u64) {
        let n = self.entries.len() as u64;
        let Some(entry) = usize::try_from(i % n.max(1))
            .ok()
            .and_then(|k| self.entries.get(k))
        else {
            return;
        };
        if let Some(speed) = self.speed {
            let cycle = (i / n.max(1)) as f64;
            let at_ms = (cycle * self.span_ms + entry.offset_ms) / speed;
            let at = self.start + Duration::from_secs_f64(at_ms / 1000.0);
            if self.deadline.is_some_and(|d| at >= d) {
                return;
            }
            tokio::time::sleep_until(at.into()).await;
        }
        let mutation = matches!(
            entry.method,
            Method::POST | Method::PUT | Method::PATCH | Method::DELETE
        );
        let key = mutation.then(|| uuid::Uuid::now_v7().to_string());
        let Some(req) = self.request(entry, key.as_deref()) else {
            return;
        };
        if mutation {
            self.mutations_sent.fetch_add(1, Ordering::Relaxed);
        }
        let sent = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(30), async {
            let resp = self.client.request(req).await.ok()?;
            let status = resp.status().as_u16();
            let cache_status = resp
                .headers()
                .get("cache-status")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            // The latency includes the whole body.
            resp.into_body().collect().await.ok()?;
            Some((status, cache_status))
        })
        .await
        .ok()
        .flatten();
        let latency = sent.elapsed();
        if let (Some(key), Some((status, _))) = (key, &answer)
            && (200..300).contains(status)
            && let Ok(mut acked) = self.acknowledged.lock()
        {
            acked.insert(key);
        }
        if let Ok(mut stats) = self.stats.lock() {
            stats.record(latency, answer.as_ref().map(|(s, c)| (*s, c.as_deref())));
        }
    }

    fn request(&self, entry: &HarEntry, key: Option<&str>) -> Option<Request<Full<Bytes>>> {
        let uri = format!(
            "{}://{}{}",
            self.scheme, self.authority, entry.path_and_query
        );
        let mut req = Request::builder()
            .method(entry.method.clone())
            .uri(uri)
            .body(Full::new(entry.body.clone()))
            .ok()?;
        let headers = req.headers_mut();
        for (name, value) in &entry.headers {
            let lower = name.to_ascii_lowercase();
            if lower.starts_with(':') || SKIPPED.contains(&lower.as_str()) {
                continue;
            }
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(lower.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                headers.append(n, v);
            }
        }
        if let Some(key) = key
            && let Ok(v) = HeaderValue::from_str(key)
        {
            headers.insert("idempotency-key", v);
        }
        Some(req)
    }
}

/// The load client's connector: plain HTTP, or TLS (HTTP/1.1 or HTTP/2 by ALPN) for an
/// `https://` target.
type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

fn connector(ca_file: Option<&Path>) -> Result<Connector, LoadtestError> {
    use crate::upstream::SetupError;
    let tls = crate::upstream::tls_config(ca_file).map_err(|e| {
        LoadtestError::Usage(match e {
            SetupError::CaFile { path, source } => {
                format!("--ca-file {}: cannot read: {source}", path.display())
            }
            SetupError::CaCertificate { path, source } => {
                format!("--ca-file {}: bad certificate: {source}", path.display())
            }
            SetupError::NoCertificates(path) => {
                format!("--ca-file {}: no PEM certificates found", path.display())
            }
            other => format!("TLS set-up: {}", crate::error::report(&other)),
        })
    })?;
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http))
}

/// Poll the admin `/status` until `queue_depth` is 0; when it was, or `None` at the deadline.
async fn wait_for_drain(
    client: &Client<Connector, Full<Bytes>>,
    admin: &str,
    timeout: Duration,
) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    let url = format!("{}/status", admin.trim_end_matches('/'));
    while Instant::now() < deadline {
        let depth = async {
            let req = Request::get(&url).body(Full::new(Bytes::new())).ok()?;
            let resp = client.request(req).await.ok()?;
            let body = resp.into_body().collect().await.ok()?.to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
            v.get("queue_depth")?.as_u64()
        }
        .await;
        if depth == Some(0) {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// A progress bar on a terminal, a plain line a second otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    fn start(shared: Arc<Shared>, duration: Option<Duration>) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = match (duration, shared.limit) {
                (Some(d), _) => indicatif::ProgressBar::new(d.as_secs().max(1)),
                (None, n) => indicatif::ProgressBar::new(n),
            };
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:40}] {pos}/{len} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        let handle = bar.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(if handle.is_some() {
                200
            } else {
                1000
            }));
            tick.tick().await;
            loop {
                tick.tick().await;
                let (requests, errors) = shared
                    .stats
                    .lock()
                    .map(|s| (s.requests, s.errors))
                    .unwrap_or_default();
                match &handle {
                    Some(bar) => {
                        bar.set_position(if duration.is_some() {
                            shared.start.elapsed().as_secs()
                        } else {
                            requests
                        });
                        bar.set_message(format!("{requests} requests, {errors} errors"));
                    }
                    None => eprintln!(
                        "progress: {:.1}s {requests} requests, {errors} errors",
                        shared.start.elapsed().as_secs_f64()
                    ),
                }
            }
        });
        Self { bar, task }
    }

    fn finish(self) {
        self.task.abort();
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}
