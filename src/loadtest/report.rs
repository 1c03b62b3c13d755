//! What a load test measured: counts, an HDR latency histogram, answer sources, and the
//! mutation accounting; as the `--report` JSON and as the summary table.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Counts of one run, filled as answers arrive.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Latencies in microseconds.
    latency_us: Histogram<u64>,
    /// Requests sent.
    pub requests: u64,
    /// Requests that got no answer (transport errors, timeouts).
    pub errors: u64,
    /// Answers by status code.
    pub status_counts: BTreeMap<u16, u64>,
    /// Answers by outpost's source (from `Cache-Status`), `none` when there was none.
    pub sources: BTreeMap<String, u64>,
    /// Latencies per second of the run (by when the answer came), for `--plot`.
    pub timeline: Vec<Histogram<u64>>,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    /// Empty stats (latencies from 1 µs to 10 min, 3 significant digits).
    pub fn new() -> Self {
        // Constant, valid bounds: this cannot fail.
        let latency_us =
            Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds");
        Self {
            latency_us,
            requests: 0,
            errors: 0,
            status_counts: BTreeMap::new(),
            sources: BTreeMap::new(),
            timeline: Vec::new(),
        }
    }

    /// Like [`Stats::record`], also noting the answer in second `at` of the run's timeline.
    pub fn record_at(
        &mut self,
        at: Duration,
        latency: Duration,
        answer: Option<(u16, Option<&str>)>,
    ) {
        self.record(latency, answer);
        let second = usize::try_from(at.as_secs())
            .unwrap_or(usize::MAX)
            .min(86_400);
        while self.timeline.len() <= second {
            let empty =
                Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds");
            self.timeline.push(empty);
        }
        if let Some(h) = self.timeline.get_mut(second) {
            let us = u64::try_from(latency.as_micros())
                .unwrap_or(u64::MAX)
                .max(1);
            h.saturating_record(us);
        }
    }

    /// One answer (`Some(status, Cache-Status)`) or failure (`None`) after `latency`.
    pub fn record(&mut self, latency: Duration, answer: Option<(u16, Option<&str>)>) {
        self.requests += 1;
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        self.latency_us.saturating_record(us);
        match answer {
            None => self.errors += 1,
            Some((status, cache_status)) => {
                *self.status_counts.entry(status).or_default() += 1;
                *self
                    .sources
                    .entry(source_of(status, cache_status).to_owned())
                    .or_default() += 1;
            }
        }
    }

    /// Latency percentiles in milliseconds.
    pub fn latency(&self) -> Latency {
        let q = |p: f64| self.latency_us.value_at_quantile(p) as f64 / 1000.0;
        Latency {
            p50: q(0.50),
            p90: q(0.90),
            p99: q(0.99),
            p999: q(0.999),
            max: self.latency_us.max() as f64 / 1000.0,
        }
    }
}

/// Where outpost says an answer came from, by its `Cache-Status` (RFC 9211).
pub fn source_of(status: u16, cache_status: Option<&str>) -> &'static str {
    let Some(cs) = cache_status.filter(|c| c.starts_with("outpost")) else {
        return "none";
    };
    if cs.contains("detail=idempotent-replay") {
        "idempotent_replay"
    } else if cs.contains("detail=queued") || (status == 202 && cs.contains("fwd=method")) {
        "queued"
    } else if cs.contains("hit") && cs.contains("detail=offline") {
        "stale"
    } else if cs.contains("hit") {
        "cache"
    } else if cs.contains("detail=offline") {
        "outpost"
    } else {
        "upstream"
    }
}

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Slowest.
    pub max: f64,
}

/// The mutation accounting against the mock upstream's ledger.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Mutations {
    /// Mutations the tool sent (each with its own `Idempotency-Key`).
    pub sent: u64,
    /// Keys answered 2xx (202 included).
    pub acknowledged: u64,
    /// Distinct keys the mock applied.
    pub applied: u64,
    /// Every application, copies included.
    pub applications: u64,
    /// Acknowledged keys never applied.
    pub lost: u64,
    /// Keys applied more than once.
    pub applied_twice: u64,
    /// From the end of the last outage (or of the run) until the queue was empty; `None` when
    /// it did not drain in time or no admin URL was given.
    pub drain_ms: Option<u64>,
    /// Whether the queue drained before the deadline.
    pub drained: bool,
}

/// The `--report` document.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Requests sent.
    pub requests: u64,
    /// Requests without an answer.
    pub errors: u64,
    /// Answers by status.
    pub status_counts: BTreeMap<String, u64>,
    /// Latency percentiles, ms.
    pub latency_ms: Latency,
    /// Requests per second over the run.
    pub throughput_rps: f64,
    /// Answers by outpost's source.
    pub sources: BTreeMap<String, u64>,
    /// Run length, ms.
    pub duration_ms: u64,
    /// Outage windows of the mock upstream, ms after the start: `[start, end]`.
    pub outages_ms: Vec<[u64; 2]>,
    /// The mutation accounting (with `--mock-upstream`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mutations: Option<Mutations>,
}

impl Report {
    /// The report of `stats` over a run of `elapsed`.
    pub fn new(stats: &Stats, elapsed: Duration) -> Self {
        let secs = elapsed.as_secs_f64().max(1e-9);
        Self {
            requests: stats.requests,
            errors: stats.errors,
            status_counts: stats
                .status_counts
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            latency_ms: stats.latency(),
            throughput_rps: (stats.requests as f64 / secs * 10.0).round() / 10.0,
            sources: stats.sources.clone(),
            duration_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            outages_ms: Vec::new(),
            mutations: None,
        }
    }

    /// The summary table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let l = &self.latency_ms;
        let _ = writeln!(s, "{:<16} {:>12}", "requests", self.requests);
        let _ = writeln!(s, "{:<16} {:>12}", "errors", self.errors);
        let _ = writeln!(s, "{:<16} {:>12.1}", "throughput rps", self.throughput_rps);
        let _ = writeln!(s, "{:<16} {:>12}", "duration ms", self.duration_ms);
        for (name, v) in [
            ("latency p50 ms", l.p50),
            ("latency p90 ms", l.p90),
            ("latency p99 ms", l.p99),
            ("latency p999 ms", l.p999),
            ("latency max ms", l.max),
        ] {
            let _ = writeln!(s, "{name:<16} {v:>12.2}");
        }
        for (status, n) in &self.status_counts {
            let _ = writeln!(s, "{:<16} {n:>12}", format!("status {status}"));
        }
        for (source, n) in &self.sources {
            let _ = writeln!(s, "{:<16} {n:>12}", format!("source {source}"));
        }
        if let Some(m) = &self.mutations {
            for (name, v) in [
                ("mut. sent", m.sent),
                ("mut. acked", m.acknowledged),
                ("mut. applied", m.applied),
                ("mut. lost", m.lost),
                ("mut. twice", m.applied_twice),
            ] {
                let _ = writeln!(s, "{name:<16} {v:>12}");
            }
            match m.drain_ms {
                Some(d) => {
                    let _ = writeln!(s, "{:<16} {d:>12}", "drain ms");
                }
                None => {
                    let _ = writeln!(s, "{:<16} {:>12}", "drain ms", "-");
                }
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_histogram() {
        let mut stats = Stats::new();
        for ms in 1..=1000u64 {
            stats.record(
                Duration::from_millis(ms),
                Some((200, Some("outpost; fwd=uri-miss; stored"))),
            );
        }
        stats.record(Duration::from_millis(5), None);
        let r = Report::new(&stats, Duration::from_secs(2));
        assert_eq!(r.requests, 1001);
        assert_eq!(r.errors, 1);
        assert_eq!(r.status_counts.get("200"), Some(&1000));
        assert_eq!(r.sources.get("upstream"), Some(&1000));
        assert!((r.latency_ms.p50 - 500.0).abs() < 2.0, "{:?}", r.latency_ms);
        assert!((r.latency_ms.p99 - 990.0).abs() < 2.0, "{:?}", r.latency_ms);
        assert!(
            (r.latency_ms.max - 1000.0).abs() < 2.0,
            "{:?}",
            r.latency_ms
        );
        assert!((r.throughput_rps - 500.5).abs() < 0.1);
        let table = r.table();
        assert!(table.contains("latency p999 ms"), "{table}");
    }

    #[test]
    fn cache_status_names_the_source() {
        assert_eq!(source_of(200, Some("outpost; hit")), "cache");
        assert_eq!(
            source_of(200, Some("outpost; hit; detail=offline")),
            "stale"
        );
        assert_eq!(
            source_of(202, Some("outpost; fwd=method; detail=queued")),
            "queued"
        );
        assert_eq!(
            source_of(201, Some("outpost; hit; detail=idempotent-replay")),
            "idempotent_replay"
        );
        assert_eq!(source_of(201, Some("outpost; fwd=method")), "upstream");
        assert_eq!(source_of(200, None), "none");
    }
}
