//! Reliability suite (issue #21.2): injected upstream faults.
//!
//! A fault-injecting TCP proxy ([`FaultProxy`]) sits between the real `outpost` binary and the
//! test upstream. Each test runs steady write load and cached reads through outpost, switches
//! one fault on for a few seconds, then off again, and checks:
//!
//! - cached reads never fail: every GET of a path cached before the fault gets a `200` with the
//!   cached (or a fresh) answer, during and after the fault;
//! - writes are never lost or doubled: every acknowledged write reaches the upstream, which
//!   stands for one that IGNORES `Idempotency-Key` (every request counts), exactly once, except
//!   that a write whose answer the proxy kept from outpost (reset, stalled, truncated, or too
//!   late) may arrive again (counted as `redelivered`);
//! - replay resumes after recovery: the time from switching the fault off to the first replayed
//!   write is REPORTED (`recovery_to_replay_ms`), and bounded only generously here (15 s);
//! - health and metrics tell the truth: admin `/status` says `online: false` and `/metrics`
//!   `outpost_upstream_up 0` during an outage-like fault, and `online: true`,
//!   `outpost_upstream_up 1`, `outpost_queue_depth 0` after the drain.
//!
//! Half the writers write to `write-behind` routes (always queued, so replay meets the fault),
//! half to the default `queue-when-offline` routes (forwarded while the upstream answers). The
//! config sets `upstream.probe_path`, so that the health probe is an HTTP exchange that meets
//! the fault too (a bare TCP connect would call a 5xx storm "online").

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::faultproxy::{Fault, FaultProxy};
use common::reliability::{self, LoadSpec, Tally, WriteLoad, assert_writer_order, deliveries};
use common::*;
use serde_json::{Value, json};

/// Where the writes go (`/apply/f/0` and `/1` are write-behind, `/2` and `/3` not).
const PATH: &str = "/apply/f";
/// Paths (one partition each).
const PARTITIONS: usize = 4;
/// Cached reads.
const READS: usize = 3;

/// Small timeouts, an HTTP probe, fast backoff.
fn config() -> String {
    format!(
        r#"
[upstream]
connect_timeout = "500ms"
request_timeout = "1500ms"
probe_path = "/echo/probe"
probe_interval = "100ms"
probe_interval_max = "1s"

[replay]
initial_backoff = "100ms"
max_backoff = "1s"

[[route]]
path = "{PATH}/0"
write = "write-behind"
partition = "path"

[[route]]
path = "{PATH}/1"
write = "write-behind"
partition = "path"

[[route]]
path = "{PATH}/"
partition = "path"
"#
    )
}

/// What one scenario does.
struct Scenario {
    /// Name for the report.
    name: &'static str,
    /// The fault (ignored when `flap` is set).
    fault: Fault,
    /// Alternate between refusing and passing with this period instead.
    flap: Option<Duration>,
    /// How long the fault lasts.
    duration: Duration,
    /// Whether outpost must report the upstream offline during the fault.
    outage: bool,
}

/// The sum of the samples of metric `name` (over all its labels) in Prometheus text; `None`
/// when it has none.
fn metric(text: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = match rest.strip_prefix('{') {
                Some(labelled) => labelled.split_once("} ")?.1,
                None => rest.strip_prefix(' ')?,
            };
            value.trim().parse().ok()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Samples `/status` and `/metrics` while the fault lasts.
#[derive(Default)]
struct HealthSeen {
    offline: AtomicBool,
    up_zero: AtomicBool,
    samples: AtomicU64,
}

/// Reads of the cached paths; failures kept with the reason.
#[derive(Default)]
struct ReadsSeen {
    ok: AtomicU64,
    failed: Mutex<Vec<String>>,
}

/// GETs every cached path once; failures are recorded.
async fn read_all(http: &reqwest::Client, base: &str, seen: &ReadsSeen, phase: &str) {
    for i in 0..READS {
        let path = format!("/echo/cached/{i}?cc=max-age%3D60");
        let result = http.get(format!("{base}{path}")).send().await;
        let outcome = match result {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let cache = resp
                    .headers()
                    .get("cache-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                match resp.json::<Value>().await {
                    Ok(doc) if status == 200 && doc["path"] == format!("/echo/cached/{i}") => {
                        Ok(())
                    }
                    Ok(doc) => Err(format!("{status} ({cache}): {doc}")),
                    Err(e) => Err(format!("{status} ({cache}): body failed: {e}")),
                }
            }
            Err(e) => Err(format!("no answer: {e}")),
        };
        match outcome {
            Ok(()) => {
                seen.ok.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => seen
                .failed
                .lock()
                .expect("lock")
                .push(format!("{phase} GET {path}: {e}")),
        }
    }
}

/// `/status` and `/metrics` of the instance.
async fn health(http: &reqwest::Client, admin: &str) -> (Value, String) {
    let status = match http.get(format!("{admin}/status")).send().await {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    let metrics = match http.get(format!("{admin}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    (status, metrics)
}

async fn run(scenario: Scenario) {
    let upstream = Upstream::start().await;
    let proxy = FaultProxy::start(upstream.addr()).await;
    let s = Outpost::in_front_of_url(&proxy.url(), &config()).await;
    let (base, admin) = (s.outpost.url(), s.outpost.admin_url());
    let http = client();
    // A read that hangs is a failed read: give up on it after 5 s.
    let read_http = client_builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("read client");

    // Cache the reads while everything works.
    let reads = Arc::new(ReadsSeen::default());
    read_all(&read_http, &base, &reads, "before").await;
    assert!(
        reads.failed.lock().expect("lock").is_empty(),
        "reads before the fault: {:?}",
        reads.failed.lock().expect("lock")
    );

    let load = WriteLoad::start(
        &http,
        LoadSpec {
            writers: 2 * PARTITIONS,
            targets: vec![base.clone()],
            path: PATH.to_owned(),
            partitions: PARTITIONS,
            key_prefix: "f".to_owned(),
            pace: Duration::from_millis(20),
        },
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The fault, with readers and health samplers running.
    match scenario.flap {
        Some(period) => proxy.flap(period).await,
        None => proxy.set(scenario.fault.clone()).await,
    }
    let fault_started = Instant::now();
    let seen = Arc::new(HealthSeen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (http, admin, seen, stop) = (http.clone(), admin.clone(), seen.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let (status, metrics) = health(&http, &admin).await;
                if status["online"] == false {
                    seen.offline.store(true, Ordering::SeqCst);
                }
                if metric(&metrics, "outpost_upstream_up") == Some(0.0) {
                    seen.up_zero.store(true, Ordering::SeqCst);
                }
                seen.samples.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let reader = {
        let (http, base, reads, stop) =
            (read_http.clone(), base.clone(), reads.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                read_all(&http, &base, &reads, "during").await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(scenario.duration).await;
    stop.store(true, Ordering::SeqCst);
    sampler.await.expect("sampler");
    reader.await.expect("reader");
    let acked_in_fault = load.acked_keys();

    // Recovery.
    proxy.set(Fault::Pass).await;
    let recovered = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let retries = load.retries();
    let unexpected = load.unexpected();
    let (acked, attempted) = load.stop().await;
    assert!(unexpected.is_empty(), "unexpected answers: {unexpected:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let drained = loop {
        let delivered = deliveries(&upstream, PATH);
        let missing = acked
            .iter()
            .flatten()
            .filter(|k| !delivered.contains_key(*k))
            .count();
        let (status, metrics) = health(&http, &admin).await;
        if missing == 0
            && status["queue_depth"] == 0
            && status["online"] == true
            && metric(&metrics, "outpost_upstream_up") == Some(1.0)
            && metric(&metrics, "outpost_queue_depth") == Some(0.0)
        {
            break recovered.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{}: 30 s after recovery, {missing} acknowledged writes not delivered; /status {status}; \
             outpost_upstream_up {:?}, outpost_queue_depth {:?}",
            scenario.name,
            metric(&metrics, "outpost_upstream_up"),
            metric(&metrics, "outpost_queue_depth"),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    read_all(&read_http, &base, &reads, "after").await;

    // The ledger.
    let delivered = deliveries(&upstream, PATH);
    let eaten = proxy.eaten();
    let tally = Tally::count(&acked, &attempted, &delivered, |key, _| {
        eaten.get(key).copied().unwrap_or(0)
    });
    // The first write replayed after recovery: delivered after the switch, acknowledged
    // before it and not delivered before it.
    let first_replay = acked_in_fault
        .iter()
        .filter_map(|k| delivered.get(k))
        .filter(|times| times.iter().all(|t| *t >= recovered))
        .map(|times| times[0].saturating_duration_since(recovered))
        .min();
    let failed_reads = reads.failed.lock().expect("lock").clone();
    let exchanges: HashMap<String, u64> = proxy.exchanges();
    println!(
        "{}: {tally:?}; reads ok {}, failed {}; offline seen {}, upstream_up 0 seen {} ({} samples); \
         first replay {:?} after recovery; drained {:?} after; proxy exchanges {exchanges:?}",
        scenario.name,
        reads.ok.load(Ordering::SeqCst),
        failed_reads.len(),
        seen.offline.load(Ordering::SeqCst),
        seen.up_zero.load(Ordering::SeqCst),
        seen.samples.load(Ordering::SeqCst),
        first_replay,
        drained,
    );
    reliability::report(
        "faults",
        scenario.name,
        reliability::merge(
            tally.fields(),
            json!({
                "fault_kinds": 1,
                "fault_s": scenario.duration.as_secs_f64(),
                "reads_ok": reads.ok.load(Ordering::SeqCst),
                "reads_failed": failed_reads.len(),
                "offline_seen": seen.offline.load(Ordering::SeqCst),
                "recovery_to_replay_ms": first_replay.map(|d| d.as_millis() as u64),
                "recovery_to_drained_ms": drained.as_millis() as u64,
                "retried_attempts": retries,
                "faulted_exchanges": exchanges.get(&scenario.fault.name()).copied().unwrap_or(0),
            }),
        ),
    );

    assert!(
        failed_reads.is_empty(),
        "{}: cached reads failed ({} of {}): {:?}",
        scenario.name,
        failed_reads.len(),
        failed_reads.len() as u64 + reads.ok.load(Ordering::SeqCst),
        &failed_reads[..failed_reads.len().min(5)]
    );
    assert!(tally.acknowledged > 0, "no write was acknowledged");
    assert_eq!(tally.lost, 0, "{}: writes lost: {tally:?}", scenario.name);
    assert_eq!(
        tally.doubled, 0,
        "{}: writes doubled: {tally:?}",
        scenario.name
    );
    assert_eq!(
        tally.unknown, 0,
        "{}: unknown keys: {tally:?}",
        scenario.name
    );
    assert_writer_order(&acked, &delivered);
    if scenario.outage {
        assert!(
            seen.offline.load(Ordering::SeqCst),
            "{}: /status never said offline during the fault",
            scenario.name
        );
        assert!(
            seen.up_zero.load(Ordering::SeqCst),
            "{}: outpost_upstream_up never said 0 during the fault",
            scenario.name
        );
        let first = first_replay.unwrap_or_else(|| {
            panic!(
                "{}: no write queued during the fault was replayed after it",
                scenario.name
            )
        });
        assert!(
            first < Duration::from_secs(15),
            "{}: replay resumed {first:?} after recovery",
            scenario.name
        );
    }
    let _ = fault_started;
}

/// One test per fault kind; each lasts a few seconds.
fn scenario(name: &'static str, fault: Fault, outage: bool) -> Scenario {
    Scenario {
        name,
        fault,
        flap: None,
        duration: Duration::from_millis(2500),
        outage,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections() {
    run(scenario("refused connections", Fault::Refuse, true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_mid_request() {
    run(scenario("reset mid-request", Fault::ResetRequest, true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_mid_response() {
    run(scenario("reset mid-response", Fault::ResetResponse, true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_head_never_comes() {
    run(scenario(
        "response head never comes",
        Fault::NoResponseHead,
        true,
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_stalls() {
    // Each stalled exchange takes `request_timeout` (1.5 s) to be given up: a longer fault.
    let mut stalls = scenario("body stalls", Fault::StallBody, true);
    stalls.duration = Duration::from_secs(4);
    run(stalls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_truncated() {
    run(scenario("body truncated", Fault::TruncateBody, true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_trickle() {
    let fault = Fault::Trickle {
        bytes: 64,
        every: Duration::from_millis(10),
    };
    run(scenario("slow trickle", fault, false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_upstream() {
    run(Scenario {
        name: "flapping upstream",
        fault: Fault::Refuse,
        flap: Some(Duration::from_millis(700)),
        duration: Duration::from_millis(3000),
        outage: true,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_xx_storm() {
    let fault = Fault::Status {
        status: 503,
        retry_after: None,
    };
    run(scenario("5xx storm", fault, true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_storm() {
    let fault = Fault::Status {
        status: 429,
        retry_after: Some(1),
    };
    run(scenario("Retry-After storm", fault, true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn very_slow_replay_target() {
    run(scenario(
        "very slow upstream",
        Fault::Delay(Duration::from_millis(700)),
        false,
    ))
    .await;
}
