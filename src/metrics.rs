//! Prometheus metrics, served as text by the admin API's `GET /metrics`.
//!
//! The registry is `metrics-exporter-prometheus`'s recorder, owned by this struct rather than
//! installed as the process-wide recorder (several apps may run in one test process); its
//! [`PrometheusHandle::render`] writes the text format. Nothing here listens on a port.
//!
//! Three ways numbers get in:
//! - **On the data path**, through handles registered at start: [`Metrics::observe_request`]
//!   (called at the proxy's access-log point) finds the route's handles by name and bumps a
//!   counter and a histogram, with no allocation; the outbox times its durable enqueue
//!   ([`Metrics::store_commit`]).
//! - **From the event stream** ([`Metrics::run`]): queued, replay attempts and retries,
//!   outcomes by class, dead letters, expiries, auth waits, outages and their length.
//! - **At scrape time** ([`Metrics::render`]): gauges read from the store, the cache, health
//!   and the connection budgets.
//!
//! Label sets are bounded: routes by their configured name (plus `default`), sources and
//! classes from fixed lists, and partitions capped — the [`PARTITION_LABELS`] partitions with
//! the most pending items get a label of their own; the others are summed under
//! `partition="_other"`. A partition's series disappears a few minutes after it last held
//! anything (gauges idle for [`GAUGE_IDLE`] are dropped).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ::metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, SharedString, Unit,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use metrics_util::MetricKindMask;

use crate::context::Source;
use crate::events::{Event, Events};
use crate::server::ConnectionStats;
use crate::shutdown::Shutdown;
use crate::store::StoreStats;

/// Partitions labelled by name; the rest are summed under [`OTHER_PARTITIONS`].
pub const PARTITION_LABELS: usize = 20;
/// The label value of the partitions past [`PARTITION_LABELS`].
pub const OTHER_PARTITIONS: &str = "_other";
/// Gauges not set for this long leave the output (partitions that emptied).
pub const GAUGE_IDLE: Duration = Duration::from_secs(300);

/// Request latency buckets (seconds): sub-millisecond cache hits to slow upstreams.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static META: Metadata<'static> = Metadata::new("outpost", Level::INFO, Some(module_path!()));

/// Every answer source, in the order of [`source_index`].
const SOURCES: [Source; 6] = [
    Source::Upstream,
    Source::Cache,
    Source::Stale,
    Source::Queued,
    Source::IdempotentReplay,
    Source::Outpost,
];
/// The `policy` label of `outpost_conflicts_total`: a route's `conflict` setting.
const CONFLICT_POLICIES: [&str; 3] = ["dead-letter", "server-wins", "client-wins"];
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// Replay classes, as in `Event::Classified`.
const CLASSES: [&str; 6] = [
    "success",
    "partial",
    "validation",
    "conflict",
    "auth_required",
    "retryable",
];

fn source_index(source: Source) -> usize {
    match source {
        Source::Upstream => 0,
        Source::Cache => 1,
        Source::Stale => 2,
        Source::Queued => 3,
        Source::IdempotentReplay => 4,
        Source::Outpost => 5,
    }
}

/// The handles of one route and source.
struct SourceHandles {
    /// By status class (`1xx`..`5xx`).
    responses: [Counter; 5],
    latency: Histogram,
}

/// What `/metrics` needs from the rest of outpost at scrape time.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Upstream believed reachable.
    pub online: bool,
    /// Replay paused by an operator.
    pub paused: bool,
    /// Store counters (None when the store did not answer).
    pub store: Option<StoreStats>,
    /// Pending items per partition, with the acceptance time of the oldest (Unix ms) when
    /// known; any order.
    pub partitions: Vec<(String, u64, Option<u64>)>,
    /// Entries and bytes of the memory tier of the cache.
    pub cache_memory: (u64, u64),
    /// Proxy and admin connection budgets.
    pub connections: Vec<(&'static str, ConnectionStats)>,
    /// Whether the store takes writes now.
    pub store_writable: bool,
    /// Failovers of the store's servers followed since start (Redis Sentinel or Cluster).
    pub store_failovers: u64,
}

#[derive(Debug, Default)]
struct Outage {
    since: Option<Instant>,
    /// Length of the outages that ended.
    ended: Duration,
}

/// The metrics of one outpost (see the module docs).
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    routes: HashMap<String, Vec<SourceHandles>>,
    cache_lookups: [Counter; 3],
    store_commit: Histogram,
    queued: Counter,
    replay_attempts: Counter,
    replay_retries: Counter,
    outcomes: [Counter; 6],
    dead_lettered: Counter,
    /// Conflicts by route policy (`dead-letter`, `server-wins`, `client-wins`).
    conflicts: [Counter; 3],
    coalesced: Counter,
    expired: Counter,
    auth_required: Counter,
    outages: Counter,
    outage: Mutex<Outage>,
    /// Partition labels set at the last scrape: those gone since are set to 0 (and dropped
    /// once idle).
    labelled: Mutex<Vec<String>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("routes", &self.routes.len())
            .finish()
    }
}

impl Metrics {
    /// A registry with the handles of every route in `routes` registered.
    pub fn new<'a>(routes: impl IntoIterator<Item = &'a str>) -> Self {
        let builder = PrometheusBuilder::new()
            .idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE))
            .set_buckets(LATENCY_BUCKETS);
        let recorder = match builder {
            Ok(b) => b.build_recorder(),
            // Only an empty bucket list is refused.
            Err(_) => PrometheusBuilder::new().build_recorder(),
        };
        let handle = recorder.handle();
        describe(&recorder);
        let counter = |name: &'static str, labels: &[(&'static str, &str)]| {
            recorder.register_counter(&key(name, labels), &META)
        };
        let mut by_route = HashMap::new();
        for route in routes {
            let handles = SOURCES
                .iter()
                .map(|source| {
                    let labels = [("route", route), ("source", source.as_str())];
                    SourceHandles {
                        responses: STATUS_CLASSES.map(|class| {
                            counter(
                                "outpost_requests_total",
                                &[labels[0], labels[1], ("status", class)],
                            )
                        }),
                        latency: recorder.register_histogram(
                            &key("outpost_request_duration_seconds", &labels),
                            &META,
                        ),
                    }
                })
                .collect();
            by_route.insert(route.to_string(), handles);
        }
        let cache_lookups = ["hit", "stale", "miss"]
            .map(|result| counter("outpost_cache_lookups_total", &[("result", result)]));
        let outcomes =
            CLASSES.map(|class| counter("outpost_replay_outcomes_total", &[("class", class)]));
        Self {
            routes: by_route,
            cache_lookups,
            store_commit: recorder.register_histogram(
                &key("outpost_store_commit_seconds", &[("op", "enqueue")]),
                &META,
            ),
            queued: counter("outpost_queued_total", &[]),
            replay_attempts: counter("outpost_replay_attempts_total", &[]),
            replay_retries: counter("outpost_replay_retries_total", &[]),
            outcomes,
            dead_lettered: counter("outpost_dead_lettered_total", &[]),
            conflicts: CONFLICT_POLICIES
                .map(|policy| counter("outpost_conflicts_total", &[("policy", policy)])),
            coalesced: counter("outpost_coalesced_total", &[]),
            expired: counter("outpost_expired_total", &[]),
            auth_required: counter("outpost_auth_required_total", &[]),
            outages: counter("outpost_upstream_outages_total", &[]),
            outage: Mutex::new(Outage::default()),
            labelled: Mutex::new(Vec::new()),
            handle,
            recorder,
        }
    }

    /// Count one answered request (the proxy's access-log point). `cacheable_read`: a GET or
    /// HEAD on a route that caches, which counts as a cache hit, stale hit or miss.
    pub fn observe_request(
        &self,
        route: &str,
        source: Source,
        status: u16,
        elapsed: Duration,
        cacheable_read: bool,
    ) {
        if let Some(handles) = self
            .routes
            .get(route)
            .and_then(|r| r.get(source_index(source)))
        {
            let class = usize::from(status / 100).clamp(1, 5) - 1;
            handles.responses[class].increment(1);
            handles.latency.record(elapsed.as_secs_f64());
        }
        if cacheable_read {
            let result = match source {
                Source::Cache => 0,
                Source::Stale => 1,
                Source::Upstream | Source::Outpost => 2,
                Source::Queued | Source::IdempotentReplay => return,
            };
            self.cache_lookups[result].increment(1);
        }
    }

    /// The durable enqueue's latency histogram (the wait before a 202).
    pub fn store_commit(&self) -> &Histogram {
        &self.store_commit
    }

    /// Count what the event stream reports (as its observer: counting wakes no task), and run
    /// the registry's upkeep (histograms drained) every few seconds until shutdown.
    pub async fn run(self: std::sync::Arc<Self>, events: Events, shutdown: Shutdown) {
        let counting = self.clone();
        events.observe(move |event| counting.count(event));
        let mut upkeep = tokio::time::interval(Duration::from_secs(5));
        upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = upkeep.tick() => self.handle.run_upkeep(),
            }
        }
    }

    /// Count one event.
    fn count(&self, event: &Event) {
        match event {
            Event::Queued { .. } => self.queued.increment(1),
            Event::ReplayAttempt { attempt, .. } => {
                self.replay_attempts.increment(1);
                if *attempt > 1 {
                    self.replay_retries.increment(1);
                }
            }
            Event::Classified { class, .. } => {
                if let Some(i) = CLASSES.iter().position(|c| c == class) {
                    self.outcomes[i].increment(1);
                }
            }
            Event::DeadLettered { .. } => self.dead_lettered.increment(1),
            Event::Conflict { policy, .. } => {
                if let Some(i) = CONFLICT_POLICIES.iter().position(|p| p == policy) {
                    self.conflicts[i].increment(1);
                }
            }
            Event::Coalesced { .. } => self.coalesced.increment(1),
            Event::Expired { .. } => self.expired.increment(1),
            Event::AuthRequired { .. } => self.auth_required.increment(1),
            Event::Offline { .. } => {
                self.outages.increment(1);
                let mut o = self.outage.lock().unwrap_or_else(|e| e.into_inner());
                o.since.get_or_insert_with(Instant::now);
            }
            Event::Online => {
                let mut o = self.outage.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(since) = o.since.take() {
                    o.ended += since.elapsed();
                }
            }
            Event::Paused | Event::Resumed | Event::Operator { .. } => {}
        }
    }

    /// Set the gauges from `snapshot` and render everything in the Prometheus text format.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let gauge = |name: &'static str, labels: &[(&'static str, &str)]| -> Gauge {
            self.recorder.register_gauge(&key(name, labels), &META)
        };
        let counter = |name: &'static str, labels: &[(&'static str, &str)]| -> Counter {
            self.recorder.register_counter(&key(name, labels), &META)
        };
        gauge("outpost_upstream_up", &[]).set(f64::from(u8::from(snapshot.online)));
        gauge("outpost_replay_paused", &[]).set(f64::from(u8::from(snapshot.paused)));
        gauge("outpost_store_writable", &[]).set(f64::from(u8::from(snapshot.store_writable)));
        counter("outpost_store_failovers_total", &[]).absolute(snapshot.store_failovers);
        let (current, total) = {
            let o = self.outage.lock().unwrap_or_else(|e| e.into_inner());
            let current = o.since.map_or(Duration::ZERO, |s| s.elapsed());
            (current, o.ended + current)
        };
        gauge("outpost_upstream_outage_seconds", &[]).set(current.as_secs_f64());
        counter("outpost_upstream_outage_seconds_total", &[]).absolute(total.as_secs());
        if let Some(stats) = &snapshot.store {
            gauge("outpost_dead_letters", &[]).set(stats.dead_letters as f64);
            gauge("outpost_cache_entries", &[("tier", "store")]).set(stats.cache_entries as f64);
            gauge("outpost_cache_bytes", &[("tier", "store")]).set(stats.cache_bytes as f64);
        }
        let (entries, bytes) = snapshot.cache_memory;
        gauge("outpost_cache_entries", &[("tier", "memory")]).set(entries as f64);
        gauge("outpost_cache_bytes", &[("tier", "memory")]).set(bytes as f64);
        let global_oldest = snapshot.store.as_ref().and_then(|s| s.oldest_pending_ms);
        let capped = capped_partitions(&snapshot.partitions, global_oldest);
        let mut labelled = self.labelled.lock().unwrap_or_else(|e| e.into_inner());
        for gone in labelled
            .iter()
            .filter(|p| !capped.iter().any(|(c, _, _)| c == p))
        {
            gauge("outpost_queue_depth", &[("partition", gone)]).set(0.0);
            gauge("outpost_queue_oldest_age_seconds", &[("partition", gone)]).set(0.0);
        }
        for (partition, depth, oldest) in &capped {
            gauge("outpost_queue_depth", &[("partition", partition)]).set(*depth as f64);
            let age = oldest.map_or(0.0, |t| age_seconds(t, crate::store::now_ms()));
            gauge(
                "outpost_queue_oldest_age_seconds",
                &[("partition", partition)],
            )
            .set(age);
        }
        *labelled = capped.iter().map(|(p, _, _)| p.to_string()).collect();
        drop(labelled);
        for (listener, c) in &snapshot.connections {
            let l = [("listener", *listener)];
            gauge("outpost_connections_open", &l).set(c.open as f64);
            gauge("outpost_connections_limit", &l).set(c.limit as f64);
            counter("outpost_connections_refused_total", &l).absolute(c.refused);
            counter("outpost_connections_evicted_total", &l).absolute(c.evicted);
            counter("outpost_header_timeouts_total", &l).absolute(c.header_timeouts);
            counter("outpost_framing_refusals_total", &l).absolute(c.framing_refusals);
        }
        self.handle.render()
    }
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    Key::from_parts(
        name,
        labels
            .iter()
            .map(|(k, v)| Label::new(*k, v.to_string()))
            .collect::<Vec<_>>(),
    )
}

fn age_seconds(since_ms: u64, now_ms: u64) -> f64 {
    now_ms.saturating_sub(since_ms) as f64 / 1000.0
}

/// The [`PARTITION_LABELS`] deepest partitions by name, and the rest summed under
/// [`OTHER_PARTITIONS`]. The oldest item of the rest is known when it is the oldest of all
/// (`global_oldest` older than every labelled head); then `max()` over the series is exact,
/// and otherwise it is exact too because the oldest item is in a labelled partition.
fn capped_partitions(
    all: &[(String, u64, Option<u64>)],
    global_oldest: Option<u64>,
) -> Vec<(&str, u64, Option<u64>)> {
    let mut sorted: Vec<&(String, u64, Option<u64>)> = all.iter().collect();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut out: Vec<(&str, u64, Option<u64>)> = sorted
        .iter()
        .take(PARTITION_LABELS)
        .map(|(p, d, o)| (p.as_str(), *d, *o))
        .collect();
    let rest = &sorted[sorted.len().min(PARTITION_LABELS)..];
    if !rest.is_empty() {
        let depth = rest.iter().map(|(_, d, _)| d).sum();
        let labelled_oldest = out.iter().filter_map(|(_, _, o)| *o).min();
        let oldest = global_oldest.filter(|g| labelled_oldest.is_none_or(|l| *g < l));
        out.push((OTHER_PARTITIONS, depth, oldest));
    }
    out
}

fn describe(recorder: &PrometheusRecorder) {
    let help: &[(&'static str, Option<Unit>, &'static str, char)] = &[
        (
            "outpost_requests_total",
            None,
            "Requests answered by the proxy, by route, source of the answer (upstream, cache, stale, queued, idempotent_replay, outpost) and status class.",
            'c',
        ),
        (
            "outpost_request_duration_seconds",
            Some(Unit::Seconds),
            "Time from a request's arrival to its response head, by route and source.",
            'h',
        ),
        (
            "outpost_cache_lookups_total",
            None,
            "Cacheable reads by result: hit (fresh copy), stale (copy served while the upstream is unreachable), miss.",
            'c',
        ),
        (
            "outpost_cache_entries",
            None,
            "Cache entries, by tier (memory, store).",
            'g',
        ),
        (
            "outpost_cache_bytes",
            Some(Unit::Bytes),
            "Bytes of cache entries, by tier (memory, store).",
            'g',
        ),
        (
            "outpost_queue_depth",
            None,
            "Pending mutations per partition (the 20 deepest by name, the rest summed as _other; sum() is the whole queue).",
            'g',
        ),
        (
            "outpost_queue_oldest_age_seconds",
            Some(Unit::Seconds),
            "Age of the oldest pending mutation per partition, labelled as outpost_queue_depth (max() is the oldest overall).",
            'g',
        ),
        (
            "outpost_queued_total",
            None,
            "Mutations stored durably and acknowledged with a 202.",
            'c',
        ),
        (
            "outpost_store_commit_seconds",
            Some(Unit::Seconds),
            "Time a durable enqueue took (the wait before a 202: group commit with fsync, or Redis).",
            'h',
        ),
        (
            "outpost_replay_attempts_total",
            None,
            "Queued mutations sent upstream (every attempt).",
            'c',
        ),
        (
            "outpost_replay_retries_total",
            None,
            "Replay attempts after the first of the same mutation.",
            'c',
        ),
        (
            "outpost_replay_outcomes_total",
            None,
            "Classified answers to replayed mutations, by class.",
            'c',
        ),
        (
            "outpost_conflicts_total",
            None,
            "Conflicts (409, 412) of replayed mutations, by the route's conflict policy.",
            'c',
        ),
        (
            "outpost_coalesced_total",
            None,
            "Queued mutations folded into a newer one of the same URI (route coalesce).",
            'c',
        ),
        (
            "outpost_dead_lettered_total",
            None,
            "Mutations that went to the dead-letter list.",
            'c',
        ),
        (
            "outpost_dead_letters",
            None,
            "Mutations on the dead-letter list now.",
            'g',
        ),
        (
            "outpost_expired_total",
            None,
            "Mutations older than queue.max_age, no longer retried.",
            'c',
        ),
        (
            "outpost_auth_required_total",
            None,
            "Replayed mutations answered 401, waiting for fresh credentials.",
            'c',
        ),
        (
            "outpost_upstream_up",
            None,
            "1 while the upstream is believed reachable, else 0.",
            'g',
        ),
        (
            "outpost_upstream_outages_total",
            None,
            "Times the upstream was marked offline.",
            'c',
        ),
        (
            "outpost_upstream_outage_seconds",
            Some(Unit::Seconds),
            "Length of the current outage (0 while online).",
            'g',
        ),
        (
            "outpost_store_failovers_total",
            None,
            "Failovers of the store's Redis servers followed since start (a Sentinel naming a new primary, or a cluster replica promoted).",
            'c',
        ),
        (
            "outpost_upstream_outage_seconds_total",
            Some(Unit::Seconds),
            "Seconds the upstream was offline since start (whole seconds).",
            'c',
        ),
        (
            "outpost_replay_paused",
            None,
            "1 while an operator has paused replay.",
            'g',
        ),
        (
            "outpost_store_writable",
            None,
            "1 while the store takes writes.",
            'g',
        ),
        (
            "outpost_connections_open",
            None,
            "Open connections, by listener (proxy, admin).",
            'g',
        ),
        (
            "outpost_connections_limit",
            None,
            "Connection budget, by listener.",
            'g',
        ),
        (
            "outpost_connections_refused_total",
            None,
            "Connections refused at the limit with none idle, by listener.",
            'c',
        ),
        (
            "outpost_connections_evicted_total",
            None,
            "Idle connections closed to make room, by listener.",
            'c',
        ),
        (
            "outpost_header_timeouts_total",
            None,
            "Connections closed for sending no complete request head in time, by listener.",
            'c',
        ),
        (
            "outpost_framing_refusals_total",
            None,
            "Request heads refused for ambiguous framing or Host, by listener.",
            'c',
        ),
    ];
    for (name, unit, text, kind) in help {
        let (name, text) = (KeyName::from_const_str(name), SharedString::const_str(text));
        match kind {
            'c' => recorder.describe_counter(name, *unit, text),
            'h' => recorder.describe_histogram(name, *unit, text),
            _ => recorder.describe_gauge(name, *unit, text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_past_the_cap_are_summed_as_other() {
        let all: Vec<(String, u64, Option<u64>)> = (0..25u64)
            .map(|i| (format!("p{i:02}"), i + 1, Some(1000 + i)))
            .collect();
        let capped = capped_partitions(&all, Some(1000));
        assert_eq!(capped.len(), PARTITION_LABELS + 1);
        assert_eq!(capped[0], ("p24", 25, Some(1024)));
        let other = capped.last().copied().expect("other");
        // p00..p04 hold 1..=5 items, and the oldest of all.
        assert_eq!(other, (OTHER_PARTITIONS, 15, Some(1000)));
        // When the oldest item is in a labelled partition, _other's oldest is not known.
        let other = capped_partitions(&all, Some(1005)).last().copied();
        assert_eq!(other, Some((OTHER_PARTITIONS, 15, None)));
        assert_eq!(capped_partitions(&all[..3], None).len(), 3);
    }

    #[test]
    fn requests_and_events_show_in_the_text_format() {
        let m = Metrics::new(["orders", "default"]);
        m.observe_request("orders", Source::Stale, 200, Duration::from_millis(3), true);
        m.observe_request(
            "default",
            Source::Queued,
            202,
            Duration::from_millis(1),
            false,
        );
        m.count(&Event::Classified {
            key: "k".into(),
            class: "conflict".into(),
            status: Some(409),
        });
        m.count(&Event::ReplayAttempt {
            key: "k".into(),
            attempt: 2,
        });
        let text = m.render(&Snapshot {
            partitions: vec![("upstream".into(), 3, Some(crate::store::now_ms()))],
            ..Snapshot::default()
        });
        for line in [
            "outpost_requests_total{route=\"orders\",source=\"stale\",status=\"2xx\"} 1",
            "outpost_requests_total{route=\"default\",source=\"queued\",status=\"2xx\"} 1",
            "outpost_cache_lookups_total{result=\"stale\"} 1",
            "outpost_replay_outcomes_total{class=\"conflict\"} 1",
            "outpost_replay_retries_total 1",
            "outpost_queue_depth{partition=\"upstream\"} 3",
            "outpost_upstream_up 0",
            "# TYPE outpost_request_duration_seconds histogram",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert!(
            text.contains(
                "outpost_request_duration_seconds_bucket{route=\"orders\",source=\"stale\",le=\"0.005\"} 1"
            ),
            "{text}"
        );
    }
}
