//! Regression tests for issue #13, "Exactly-once under faults": the real `outpost` binary in
//! front of a real upstream on loopback (`tests/common`) that misbehaves on cue.
//!
//! The upstream here stands for one that IGNORES `Idempotency-Key`: every copy of a mutation it
//! receives counts as an application. So deliveries are counted per key from the requests the
//! upstream recorded ([`Upstream::requests`]), not from the de-duplicating `/apply` endpoint; a
//! "double" is a key delivered more often than the contract allows.
//!
//! Faults are scripted answers of the test upstream ([`ScriptedResponse::hang_up`]: record the
//! request, then close the connection without answering; [`ScriptedResponse::reset`]: the same
//! with an RST; `delay`: record, then answer late) and [`Upstream::close_idle_after`] (a
//! server-side keep-alive timeout). The harsher tests say so in their names: three SIGKILL
//! outpost during a drain, one fills a small tmpfs under the data directory (needs `mount`,
//! i.e. root; skipped with a message otherwise).
//!
//! Tests that set `replay.max_attempts`, `replay.progress_sync`, `upstream.reset_threshold` or
//! `upstream.reset_window` need the configuration keys the fix for #13 adds.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{Value, json};

/// How long replay may take in the ordinary tests (generous: a slow CI box is not a failure).
const REPLAY_TIMEOUT: Duration = Duration::from_secs(20);

/// The config every test starts from: small timeouts, fast probes and backoff.
const DEFAULTS: &[(&str, &str, &str)] = &[
    ("upstream", "connect_timeout", r#""500ms""#),
    ("upstream", "request_timeout", r#""10s""#),
    ("upstream", "probe_interval", r#""50ms""#),
    ("upstream", "probe_interval_max", r#""500ms""#),
    ("replay", "initial_backoff", r#""100ms""#),
    ("replay", "max_backoff", r#""1s""#),
];

/// A config file: [`DEFAULTS`] with `overrides` (`"section.key"`, TOML value) applied, then
/// `rest` (e.g. `[[route]]` entries) appended.
fn config(overrides: &[(&str, &str)], rest: &str) -> String {
    let mut sections: Vec<(String, Vec<(String, String)>)> = Vec::new();
    let mut set = |section: &str, key: &str, value: &str| {
        let index = match sections.iter().position(|(s, _)| s == section) {
            Some(i) => i,
            None => {
                sections.push((section.to_owned(), Vec::new()));
                sections.len() - 1
            }
        };
        let keys = &mut sections[index].1;
        match keys.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value.to_owned(),
            None => keys.push((key.to_owned(), value.to_owned())),
        }
    };
    for (section, key, value) in DEFAULTS {
        set(section, key, value);
    }
    for (path, value) in overrides {
        let (section, key) = path
            .split_once('.')
            .unwrap_or_else(|| panic!("override {path:?} is not section.key"));
        set(section, key, value);
    }
    let mut text = String::new();
    for (section, keys) in &sections {
        text.push_str(&format!("[{section}]\n"));
        for (key, value) in keys {
            text.push_str(&format!("{key} = {value}\n"));
        }
        text.push('\n');
    }
    text.push_str(rest);
    text
}

/// One upstream, one outpost in front of it, and a client.
struct Setup {
    upstream: Upstream,
    outpost: OutpostProcess,
    http: reqwest::Client,
    _config_dir: tempfile::TempDir,
    _data_dir: Option<tempfile::TempDir>,
}

impl Setup {
    /// Upstream up, outpost started with `config_text`.
    async fn online(config_text: &str) -> Setup {
        Self::start(config_text, true, None).await
    }

    /// Upstream down (connection refused), outpost started with `config_text`.
    async fn offline(config_text: &str) -> Setup {
        Self::start(config_text, false, None).await
    }

    async fn start(config_text: &str, upstream_up: bool, data_dir: Option<PathBuf>) -> Setup {
        let upstream = Upstream::start().await;
        if !upstream_up {
            upstream.stop().await;
        }
        let config_dir = temp_dir();
        let config = config_dir.path().join("outpost.toml");
        std::fs::write(&config, config_text).expect("write config");
        let (data_dir, owned) = match data_dir {
            Some(dir) => (dir, None),
            None => {
                let dir = temp_dir();
                (dir.path().join("data"), Some(dir))
            }
        };
        let config_arg = config.display().to_string();
        let upstream_url = upstream.url();
        let outpost = OutpostProcess::start(
            &["--config", &config_arg, "--upstream", &upstream_url],
            &data_dir,
        )
        .await;
        Setup {
            upstream,
            outpost,
            http: client(),
            _config_dir: config_dir,
            _data_dir: owned,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.outpost.url())
    }

    /// `POST path` through outpost with `key` as `Idempotency-Key`.
    async fn post(&self, path: &str, key: &str, body: &str) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .header("Idempotency-Key", key)
            .header("Content-Type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path} ({key}) through outpost: {e}"))
    }

    /// `POST path` that must be queued: asserts the 202 under `key`.
    async fn post_queued(&self, path: &str, key: &str, body: &str) {
        let resp = self.post(path, key, body).await;
        let got = expect_queued(resp).await;
        assert_eq!(got, key, "the 202 names the app's key");
    }

    /// `GET path` through outpost.
    async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path} through outpost: {e}"))
    }

    /// `GET /_outpost/mutations/{key}`: status code and JSON document.
    async fn mutation(&self, key: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(self.url(&format!("/_outpost/mutations/{key}")))
            .send()
            .await
            .expect("GET /_outpost/mutations/{key}");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("mutation document");
        let doc = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, doc)
    }

    /// Waits until the mutation `key` reports `status`; returns its document.
    async fn wait_mutation(&self, key: &str, status: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (code, doc) = self.mutation(key).await;
            if code == 200 && doc["status"] == status {
                return doc;
            }
            if Instant::now() >= deadline {
                panic!(
                    "mutation {key} did not reach status {status:?} within {timeout:?}; last: {code} {doc}; \
                     delivered {} times",
                    deliveries_of(&self.upstream, key)
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// An admin API call; returns status and JSON body (`Null` if it is not JSON).
    async fn admin(&self, method: reqwest::Method, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .request(method, format!("{}{path}", self.outpost.admin_url()))
            .send()
            .await
            .expect("admin call");
        let status = resp.status().as_u16();
        let body = resp.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// The admin `GET /status` document (whatever its status code).
    async fn admin_status(&self) -> Value {
        self.admin(reqwest::Method::GET, "/status").await.1
    }

    /// The keys the admin API lists as dead letters, in its order.
    async fn dead_letter_keys(&self) -> Vec<String> {
        let (code, listed) = self.admin(reqwest::Method::GET, "/dead-letters").await;
        assert_eq!(code, 200, "{listed}");
        listed["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|d| d["idempotency_key"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until the upstream is seen online by outpost.
    async fn wait_online(&self) {
        eventually(REPLAY_TIMEOUT, "admin /status online", || async {
            self.admin_status().await["online"] == true
        })
        .await;
    }
}

/// Asserts a `202 Accepted` for a queued mutation; returns its key.
async fn expect_queued(resp: reqwest::Response) -> String {
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("202 body");
    assert_eq!(status, 202, "expected a queued 202, got {status}: {text}");
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .expect("a 202 carries Idempotency-Key")
        .to_owned();
    let body: Value = serde_json::from_str(&text).expect("202 body is JSON");
    assert_eq!(body["status"], "queued", "{body}");
    assert_eq!(body["idempotency_key"], key.as_str(), "{body}");
    key
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

// ---------------------------------------------------------------------------------------------
// Counting deliveries
// ---------------------------------------------------------------------------------------------

/// Deliveries per `Idempotency-Key` among the requests to `path_prefix`, each with its arrival
/// time, in arrival order.
fn deliveries(upstream: &Upstream, path_prefix: &str) -> HashMap<String, Vec<Instant>> {
    let mut out: HashMap<String, Vec<Instant>> = HashMap::new();
    for r in upstream.requests_to(path_prefix) {
        if let Some(key) = r.header("idempotency-key") {
            out.entry(key.to_owned()).or_default().push(r.at);
        }
    }
    out
}

/// How often the upstream received a request with `Idempotency-Key: key` (any path).
fn deliveries_of(upstream: &Upstream, key: &str) -> usize {
    upstream
        .requests()
        .iter()
        .filter(|r| r.header("idempotency-key") == Some(key))
        .count()
}

/// Keys delivered more than once, with their counts, sorted (for failure messages).
fn doubles(counts: &HashMap<String, Vec<Instant>>) -> Vec<(String, usize)> {
    let mut out: Vec<(String, usize)> = counts
        .iter()
        .filter(|(_, at)| at.len() > 1)
        .map(|(k, at)| (k.clone(), at.len()))
        .collect();
    out.sort();
    out
}

/// Samples admin `/status` in the background and remembers every sample that said offline.
struct OnlineWatch {
    offline: Arc<Mutex<Vec<String>>>,
    samples: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl OnlineWatch {
    /// Starts sampling every 10 ms (call once outpost has seen the upstream online).
    fn start(s: &Setup) -> OnlineWatch {
        let offline: Arc<Mutex<Vec<String>>> = Arc::default();
        let samples = Arc::new(AtomicUsize::new(0));
        let (http, url) = (s.http.clone(), format!("{}/status", s.outpost.admin_url()));
        let (seen, count) = (offline.clone(), samples.clone());
        let started = Instant::now();
        let task = tokio::spawn(async move {
            loop {
                if let Ok(resp) = http.get(&url).send().await
                    && let Ok(doc) = resp.json::<Value>().await
                    && doc["online"] == false
                {
                    seen.lock()
                        .expect("lock")
                        .push(format!("offline at +{:?}", started.elapsed()));
                }
                count.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        OnlineWatch {
            offline,
            samples,
            task,
        }
    }

    /// Asserts that no sample so far said offline (after one more sample was taken).
    async fn assert_never_offline(&self, what: &str) {
        let n = self.samples.load(Ordering::SeqCst);
        eventually(
            Duration::from_secs(5),
            "one more /status sample",
            || async { self.samples.load(Ordering::SeqCst) > n },
        )
        .await;
        let offline = self.offline.lock().expect("lock").clone();
        assert!(
            offline.is_empty(),
            "{what}: admin /status said offline {} times in {} samples: {:?}",
            offline.len(),
            self.samples.load(Ordering::SeqCst),
            &offline[..offline.len().min(10)]
        );
    }
}

impl Drop for OnlineWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Disk full during replay
// ---------------------------------------------------------------------------------------------

/// Writes `path` until the file system is full (chunks of 64 KiB, then of 4 KiB); returns
/// the bytes written.
fn fill_with_a_file(path: &Path) -> u64 {
    use std::io::Write as _;
    let mut file = std::fs::File::create(path).expect("create the filler file");
    let mut written = 0u64;
    for chunk in [64 * 1024, 4096] {
        let bytes = vec![0xa5u8; chunk];
        while file.write_all(&bytes).is_ok() {
            written += chunk as u64;
        }
    }
    let _ = file.sync_all();
    written
}

/// #13.1: 300 writes queued offline on a 2 MiB tmpfs, the disk filled, the upstream back for
/// 4 s while the disk stays full, then space freed: every acknowledged key is delivered exactly
/// once (an answer that could not be recorded is held, not re-sent), a refused one never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_does_not_resend_while_the_store_cannot_record_and_applies_each_key_once_after_disk_full()
 {
    const WRITES: usize = 300;
    let tmpfs = match Tmpfs::mount("2m") {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "SKIPPED replay_does_not_resend_while_the_store_cannot_record_...: cannot mount a \
                 tmpfs ({e}); run as root to exercise a full disk"
            );
            return;
        }
    };
    let s = Setup::start(&config(&[], ""), false, Some(tmpfs.path().join("data"))).await;

    // A few hundred writes queued while the upstream is down.
    let mut acked = Vec::new();
    for i in 0..WRITES {
        let key = format!("df-{i:03}");
        let body = json!({"n": i, "pad": "p".repeat(100)}).to_string();
        s.post_queued(&format!("/apply/df/{i}"), &key, &body).await;
        acked.push(key);
    }
    // Fill the disk: a file beside the data directory, then 64 KiB writes through outpost
    // until the store refuses one (the store itself cannot grow any more).
    let filler = tmpfs.path().join("filler");
    let filled = fill_with_a_file(&filler);
    let big = "f".repeat(64 * 1024);
    let mut refused = Vec::new();
    for i in 0..40 {
        let key = format!("df-big-{i:02}");
        let resp = s.post(&format!("/apply/df-big/{i}"), &key, &big).await;
        if resp.status() == 202 {
            acked.push(key);
            continue;
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        assert_eq!(
            status, 503,
            "a write that cannot be stored gets 503: {text}"
        );
        refused.push(key);
        break;
    }
    assert!(
        !refused.is_empty(),
        "the store refused a write once the disk was full"
    );
    eprintln!(
        "disk full: filler {filled} bytes, {} writes acknowledged, {} refused",
        acked.len(),
        refused.len()
    );

    // The upstream comes back while the disk is still full; replay gets its chance for a few
    // seconds (its first send, or outpost seeing the upstream online, shows it has begun).
    s.upstream.restart().await;
    let full_since = Instant::now();
    let mut seen_running = false;
    while full_since.elapsed() < Duration::from_secs(4) {
        if !seen_running
            && (s.admin_status().await["online"] == true
                || !s.upstream.requests_to("/apply/").is_empty())
        {
            seen_running = true;
            eprintln!("replay may run from +{:?}", full_since.elapsed());
        }
        let counts = deliveries(&s.upstream, "/apply/");
        let doubles = doubles(&counts);
        assert!(
            doubles.is_empty(),
            "while the disk is full, {} keys were delivered more than once (first: {:?}); \
             {} keys delivered so far",
            doubles.len(),
            &doubles[..doubles.len().min(5)],
            counts.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let during = deliveries(&s.upstream, "/apply/").len();
    eprintln!("{during} keys delivered while the disk was full");

    // Space is freed; the drain completes.
    std::fs::remove_file(&filler).expect("remove the filler file");
    tmpfs.resize("64m");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts = deliveries(&s.upstream, "/apply/");
        let missing = acked.iter().filter(|k| !counts.contains_key(*k)).count();
        let doubles = doubles(&counts);
        assert!(
            doubles.is_empty(),
            "{} acknowledged keys were delivered more than once (first: {:?}; most: {:?})",
            doubles.len(),
            &doubles[..doubles.len().min(5)],
            doubles.iter().map(|d| d.1).max()
        );
        if missing == 0 && s.admin_status().await["queue_depth"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} acknowledged keys not delivered within 30 s of freeing space; /status: {}",
            acked.len(),
            s.admin_status().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counts = deliveries(&s.upstream, "/apply/");
    for key in &acked {
        assert_eq!(
            counts.get(key).map(Vec::len),
            Some(1),
            "{key} delivered exactly once"
        );
    }
    for key in &refused {
        assert!(
            !counts.contains_key(key),
            "{key} got a 503 and was never to be applied"
        );
    }
    assert_eq!(counts.len(), acked.len(), "nothing else was delivered");
}

// ---------------------------------------------------------------------------------------------
// 2. Crash during a drain
// ---------------------------------------------------------------------------------------------

/// What [`drain_with_kills`] saw.
struct DrainReport {
    acked: Vec<String>,
    counts: HashMap<String, Vec<Instant>>,
    kills: usize,
    redeliveries: usize,
}

/// Queues `writes` mutations from 16 concurrent writers while the upstream is down (writer
/// `w` writes to `/apply/drain/{w % paths}`), brings the upstream back, SIGKILLs outpost at
/// four moments of the drain (about 12 %, 32 %, 52 % and 72 % of the deliveries, jittered),
/// restarting it on the same data directory each time, and waits until every acknowledged
/// key was delivered and the queue is empty.
async fn drain_with_kills(config_text: &str, writes: usize, paths: usize) -> DrainReport {
    const WRITERS: usize = 16;
    let mut s = Setup::offline(config_text).await;

    let acked: Arc<Mutex<Vec<Vec<String>>>> = Arc::new(Mutex::new(vec![Vec::new(); WRITERS]));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let (http, url) = (
            s.http.clone(),
            s.url(&format!("/apply/drain/{}", w % paths)),
        );
        let acked = acked.clone();
        let per_writer = writes / WRITERS + usize::from(w < writes % WRITERS);
        writers.spawn(async move {
            for n in 0..per_writer {
                let key = format!("drain-{w:02}-{n:04}");
                let resp = http
                    .post(&url)
                    .header("Idempotency-Key", &key)
                    .body(json!({"writer": w, "n": n}).to_string())
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("POST {key}: {e}"));
                assert_eq!(
                    resp.status(),
                    202,
                    "{key} is queued while the upstream is down"
                );
                acked.lock().expect("lock")[w].push(key);
            }
        });
    }
    while let Some(joined) = writers.join_next().await {
        joined.expect("writer task");
    }
    let per_writer = acked.lock().expect("lock").clone();
    let acked: Vec<String> = per_writer.iter().flatten().cloned().collect();
    assert_eq!(acked.len(), writes);

    // Kill points, jittered by the clock so that they land at varying moments.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as usize)
        .unwrap_or(0);
    let thresholds: Vec<u64> = [12usize, 32, 52, 72]
        .iter()
        .enumerate()
        .map(|(i, pct)| {
            let jitter = (nanos >> (i * 4)) % 9; // 0..=8 percentage points
            ((pct + jitter - 4) * writes / 100) as u64
        })
        .collect();

    s.upstream.restart().await;
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    for threshold in &thresholds {
        loop {
            let delivered = s.upstream.seen_requests();
            if delivered >= *threshold {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the drain stalled at {delivered} deliveries (next kill at {threshold})"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let delivered_keys = deliveries(&s.upstream, "/apply/drain/").len();
        if delivered_keys >= writes {
            break; // drained already: no more kills in the middle of it
        }
        s.outpost.kill9().await;
        kills += 1;
        eprintln!(
            "kill #{kills} at {} deliveries ({delivered_keys} distinct keys)",
            s.upstream.seen_requests()
        );
        s.outpost.restart().await;
    }

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let counts = deliveries(&s.upstream, "/apply/drain/");
        let missing = acked.iter().filter(|k| !counts.contains_key(*k)).count();
        if missing == 0 && s.admin_status().await["queue_depth"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {writes} acknowledged keys not delivered within 60 s; /status: {}",
            s.admin_status().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counts = deliveries(&s.upstream, "/apply/drain/");
    let known: HashSet<&str> = acked.iter().map(String::as_str).collect();
    for key in counts.keys() {
        assert!(
            known.contains(key.as_str()),
            "delivered an unknown key {key}"
        );
    }
    // Each writer's writes went one after another into one partition: first deliveries
    // keep that order.
    for (w, keys) in per_writer.iter().enumerate() {
        let firsts: Vec<Instant> = keys.iter().map(|k| counts[k][0]).collect();
        assert!(
            firsts.windows(2).all(|p| p[0] <= p[1]),
            "writer {w}'s writes were first delivered out of order"
        );
    }
    let redeliveries = counts.values().map(|at| at.len() - 1).sum();
    DrainReport {
        acked,
        counts,
        kills,
        redeliveries,
    }
}

/// #13.2: 3000 writes queued offline in the default partition, four SIGKILLs during the drain:
/// nothing lost, at most one re-delivery per kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkills_during_a_drain_resend_at_most_the_item_in_flight_of_each_partition() {
    let report = drain_with_kills(&config(&[], ""), 3000, 1).await;
    println!(
        "default progress_sync: {} kills, {} re-deliveries of {} keys; doubles: {:?}",
        report.kills,
        report.redeliveries,
        report.acked.len(),
        &doubles(&report.counts)[..doubles(&report.counts).len().min(5)]
    );
    assert!(
        report.kills >= 3,
        "the drain ended before three kills ({} kills)",
        report.kills
    );
    // One partition (the default): at most one item in flight per kill.
    assert!(
        report.redeliveries <= report.kills,
        "{} re-deliveries after {} kills of one partition (at most {} allowed)",
        report.redeliveries,
        report.kills,
        report.kills
    );
}

/// #13.2 with `partition = "path"`: 2000 writes over four paths, four SIGKILLs: at most one
/// re-delivery per partition and kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkills_during_a_drain_of_path_partitions_resend_at_most_one_item_per_partition_and_kill()
{
    const PATHS: usize = 4;
    let routes = "[[route]]\npath = \"/apply/drain/\"\npartition = \"path\"\n";
    let report = drain_with_kills(&config(&[], routes), 2000, PATHS).await;
    println!(
        "partition = \"path\" ({PATHS} partitions): {} kills, {} re-deliveries of {} keys",
        report.kills,
        report.redeliveries,
        report.acked.len()
    );
    assert!(
        report.kills >= 3,
        "the drain ended before three kills ({} kills)",
        report.kills
    );
    assert!(
        report.redeliveries <= report.kills * PATHS,
        "{} re-deliveries after {} kills of {PATHS} partitions (at most {} allowed)",
        report.redeliveries,
        report.kills,
        report.kills * PATHS
    );
}

/// #13.2 with `replay.progress_sync = "10ms"`: nothing lost after SIGKILLs; the re-deliveries
/// are printed, not bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_progress_sync_10ms_sigkills_during_a_drain_lose_nothing() {
    let report = drain_with_kills(
        &config(&[("replay.progress_sync", r#""10ms""#)], ""),
        3000,
        1,
    )
    .await;
    // Re-deliveries are the price of the faster drain; the count is reported, not bounded.
    println!(
        "progress_sync = 10ms: {} kills, {} re-deliveries of {} keys, every acknowledged key delivered",
        report.kills,
        report.redeliveries,
        report.acked.len()
    );
    assert!(report.kills >= 1, "at least one kill landed mid-drain");
}

// ---------------------------------------------------------------------------------------------
// 3. An ambiguous failure is not a tight retry loop
// ---------------------------------------------------------------------------------------------

/// #13.3: X is applied and then hung up on every time, on an upstream that answers everything
/// else: X goes `max_attempts` times on its own backoff, is dead-lettered with its reason, the
/// writes behind it go once each, and the upstream never counts as offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_the_upstream_applies_then_hangs_up_on_backs_off_and_is_dead_lettered_after_max_attempts()
 {
    const MAX_ATTEMPTS: usize = 3;
    let s = Setup::offline(&config(
        &[
            ("replay.max_attempts", "3"),
            ("replay.initial_backoff", r#""200ms""#),
            // X's three failures must not add up to an outage by way of the reset count
            // either: this test is about the item's own schedule.
            ("upstream.reset_threshold", "10"),
        ],
        "",
    ))
    .await;
    // The upstream applies X, then closes the connection without answering, every time;
    // everything else it answers.
    s.upstream
        .script("/apply/poison/", vec![ScriptedResponse::hang_up()]);
    s.post_queued("/apply/poison/x", "poison-x", r#"{"n":"x"}"#)
        .await;
    s.post_queued("/apply/ok/y", "after-y", r#"{"n":"y"}"#)
        .await;
    s.post_queued("/apply/ok/z", "after-z", r#"{"n":"z"}"#)
        .await;

    s.upstream.restart().await;
    s.wait_online().await;
    let watch = OnlineWatch::start(&s);
    let first = s
        .upstream
        .wait_requests("/apply/poison/", 1, REPLAY_TIMEOUT)
        .await[0]
        .at;

    // X is retried on its own backoff, never more than max_attempts times, then dead-lettered.
    let deadline = Instant::now() + REPLAY_TIMEOUT;
    let doc = loop {
        let n = deliveries_of(&s.upstream, "poison-x");
        assert!(
            n <= MAX_ATTEMPTS,
            "X was delivered {n} times within {:?} of its first delivery (max_attempts = {MAX_ATTEMPTS})",
            first.elapsed()
        );
        let (code, doc) = s.mutation("poison-x").await;
        if code == 200 && doc["status"] == "rejected" {
            break doc;
        }
        assert!(
            Instant::now() < deadline,
            "X was not dead-lettered within {REPLAY_TIMEOUT:?}: {doc}; delivered {n} times"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let x_at = deliveries(&s.upstream, "/apply/poison/")
        .remove("poison-x")
        .unwrap_or_default();
    let gaps: Vec<Duration> = x_at.windows(2).map(|w| w[1] - w[0]).collect();
    println!("X delivered {} times, gaps {gaps:?}", x_at.len());
    assert_eq!(x_at.len(), MAX_ATTEMPTS, "X delivered max_attempts times");
    assert_eq!(doc["attempts"], MAX_ATTEMPTS, "{doc}");
    let outcome = doc["outcome"].as_str().unwrap_or_default().to_lowercase();
    assert!(
        outcome.contains("attempt") || outcome.contains(&MAX_ATTEMPTS.to_string()),
        "the outcome says why it was given up (attempts / reason): {doc}"
    );
    assert_eq!(s.dead_letter_keys().await, ["poison-x"]);

    // The partition goes on: Y and Z once each, after X's last delivery.
    s.wait_mutation("after-y", "succeeded", REPLAY_TIMEOUT)
        .await;
    s.wait_mutation("after-z", "succeeded", REPLAY_TIMEOUT)
        .await;
    let counts = deliveries(&s.upstream, "/apply/ok/");
    let x_last = *x_at.last().expect("X was delivered");
    for key in ["after-y", "after-z"] {
        let at = &counts[key];
        assert_eq!(at.len(), 1, "{key} delivered once");
        assert!(at[0] > x_last, "{key} did not overtake X");
    }
    // A later write goes through at once; X is not sent again meanwhile.
    let resp = s.post("/apply/ok/w", "after-w", r#"{"n":"w"}"#).await;
    assert_eq!(
        resp.status(),
        201,
        "forwarded directly: the upstream is online"
    );
    assert_eq!(
        deliveries_of(&s.upstream, "poison-x"),
        MAX_ATTEMPTS,
        "not sent again"
    );
    // Not a tight loop: three seconds after its first delivery, X still went three times.
    while first.elapsed() < Duration::from_secs(3) {
        assert_eq!(
            deliveries_of(&s.upstream, "poison-x"),
            MAX_ATTEMPTS,
            "X is never sent again once dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watch
        .assert_never_offline("X's failures on an answering upstream")
        .await;
    assert_eq!(s.admin_status().await["queue_depth"], 0);
}

// ---------------------------------------------------------------------------------------------
// 4. An app that disconnects mid-forward
// ---------------------------------------------------------------------------------------------

/// Sends `POST path` with `key` and `body` on a raw connection to outpost, waits until the
/// upstream has received the forward, and drops the connection (the app gave up).
async fn post_and_disconnect_mid_forward(s: &Setup, path: &str, key: &str, body: &str) {
    use tokio::io::AsyncWriteExt as _;
    let mut stream = tokio::net::TcpStream::connect(s.outpost.addr())
        .await
        .expect("connect to outpost");
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nIdempotency-Key: {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        s.outpost.addr(),
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write the request");
    s.upstream.wait_requests(path, 1, REPLAY_TIMEOUT).await;
    drop(stream);
}

/// The app's retry with the same key and body, once the first is no longer being stored or
/// forwarded (a 409 says it still is); returns the final status, headers and body.
async fn retry_after_in_progress(
    s: &Setup,
    path: &str,
    key: &str,
    body: &str,
) -> (u16, reqwest::header::HeaderMap, String) {
    let deadline = Instant::now() + REPLAY_TIMEOUT;
    loop {
        let resp = s.post(path, key, body).await;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap_or_default();
        if status != 409 {
            return (status, headers, text);
        }
        assert!(
            Instant::now() < deadline,
            "still 409 (in progress) after {REPLAY_TIMEOUT:?}: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// #13.4: the app gives up on a forward the upstream has received and answers late; its retry
/// with the same key gets the upstream's stored answer, and the upstream saw the key once.
#[tokio::test]
async fn app_that_disconnects_mid_forward_gets_the_stored_answer_on_retry_and_the_key_is_delivered_once()
 {
    let s = Setup::online(&config(&[], "")).await;
    // Recorded (applied) at once, answered 1.5 s later.
    s.upstream.script(
        "/apply/slow/",
        vec![
            ScriptedResponse::passthrough().delay(Duration::from_millis(1500)),
            ScriptedResponse::passthrough(),
        ],
    );
    let body = r#"{"n":1}"#;
    post_and_disconnect_mid_forward(&s, "/apply/slow/1", "gone-1", body).await;
    let endings = s
        .upstream
        .wait_endings("/apply/slow/", 1, REPLAY_TIMEOUT)
        .await;
    println!(
        "the upstream's handling of the forward: {:?}",
        endings[0].how
    );

    let (status, headers, text) =
        retry_after_in_progress(&s, "/apply/slow/1", "gone-1", body).await;
    assert_eq!(
        deliveries_of(&s.upstream, "gone-1"),
        1,
        "the upstream saw the key once; the retry got {status} {text}"
    );
    assert_eq!(status, 201, "the upstream's own answer: {text}");
    let replayed = headers
        .get("idempotent-replayed")
        .and_then(|v| v.to_str().ok());
    assert_eq!(replayed, Some("true"), "{headers:?}");
    assert_eq!(
        headers.get("idempotency-key").and_then(|v| v.to_str().ok()),
        Some("gone-1")
    );
    let answer: Value = serde_json::from_str(&text).expect("JSON answer");
    assert_eq!(answer, json!({"applied": true, "key": "gone-1", "seq": 1}));
}

/// #13.4: the app gives up on a forward whose answer is then lost (applied, connection closed);
/// its retry is queued or answered from the final answer, never forwarded a second time.
#[tokio::test]
async fn app_that_disconnects_while_the_forwards_answer_is_lost_gets_a_202_or_the_final_answer_never_a_second_forward()
 {
    let s = Setup::online(&config(&[], "")).await;
    // Recorded (applied), then the connection is closed without an answer 1.5 s later.
    s.upstream.script(
        "/apply/lost/",
        vec![
            ScriptedResponse::hang_up().delay(Duration::from_millis(1500)),
            ScriptedResponse::passthrough(),
        ],
    );
    let body = r#"{"n":2}"#;
    post_and_disconnect_mid_forward(&s, "/apply/lost/1", "gone-2", body).await;
    let endings = s
        .upstream
        .wait_endings("/apply/lost/", 1, REPLAY_TIMEOUT)
        .await;
    println!(
        "the upstream's handling of the forward: {:?}",
        endings[0].how
    );

    let (status, headers, text) =
        retry_after_in_progress(&s, "/apply/lost/1", "gone-2", body).await;
    let replayed = headers
        .get("idempotent-replayed")
        .and_then(|v| v.to_str().ok())
        == Some("true");
    assert!(
        status == 202 || replayed,
        "the retry is queued (202) or answered from the stored final answer, not forwarded \
         again: got {status} {headers:?} {text}; the upstream saw the key {} times",
        deliveries_of(&s.upstream, "gone-2")
    );
    if status == 202 {
        assert_eq!(
            headers.get("idempotency-key").and_then(|v| v.to_str().ok()),
            Some("gone-2")
        );
    }
    // It settles through replay: the lost forward and one replay, nothing more.
    s.wait_mutation("gone-2", "succeeded", REPLAY_TIMEOUT).await;
    assert_eq!(
        deliveries_of(&s.upstream, "gone-2"),
        2,
        "the lost forward and one replay"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Dropped items stay dropped
// ---------------------------------------------------------------------------------------------

/// #13.5: the operator drops an item while its replay awaits a late 503; the replay's update
/// does not bring it back: it stays `rejected` ("dropped by operator") and is never sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_the_operator_drops_while_its_replay_is_in_flight_stays_dropped_and_is_never_sent_again()
 {
    let s = Setup::offline(&config(&[], "")).await;
    // Every delivery of the item is answered 503, a second late.
    s.upstream.script(
        "/apply/dropme/",
        vec![ScriptedResponse::json(503, json!({"error": "busy"})).delay(Duration::from_secs(1))],
    );
    s.post_queued("/apply/dropme/1", "dropme-1", "{}").await;
    s.upstream.restart().await;
    s.upstream
        .wait_requests("/apply/dropme/", 1, REPLAY_TIMEOUT)
        .await;

    // While the replay awaits its answer, the operator drops the item.
    let (code, body) = s.admin(reqwest::Method::DELETE, "/queue/dropme-1").await;
    assert_eq!(code, 200, "drop while in flight: {body}");
    s.upstream
        .wait_endings("/apply/dropme/", 1, REPLAY_TIMEOUT)
        .await;

    // A later write is applied: replay has acted on the 503 and gone on.
    let resp = s.post("/apply/later/1", "later-1", "{}").await;
    let later_status = resp.status().as_u16();
    assert!(
        later_status == 201 || later_status == 202,
        "later write: {later_status}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while deliveries_of(&s.upstream, "later-1") == 0 {
        let n = deliveries_of(&s.upstream, "dropme-1");
        let (_, doc) = s.mutation("dropme-1").await;
        assert!(
            n == 1,
            "the dropped item was sent again ({n} deliveries); its document: {doc}"
        );
        assert!(
            Instant::now() < deadline,
            "the later write was not applied within 10 s; the dropped item: {doc}; /status: {}",
            s.admin_status().await
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Watch a few backoff periods (max_backoff = 1 s) more.
    let watch_until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < watch_until {
        let (code, doc) = s.mutation("dropme-1").await;
        assert_eq!(code, 200, "{doc}");
        assert_eq!(doc["status"], "rejected", "dropped stays rejected: {doc}");
        assert_eq!(doc["outcome"], "dropped by operator", "{doc}");
        assert_eq!(
            deliveries_of(&s.upstream, "dropme-1"),
            1,
            "the dropped item is never sent again; its document: {doc}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = s.admin_status().await;
    assert_eq!(status["queue_depth"], 0, "{status}");
    let (_, queue) = s.admin(reqwest::Method::GET, "/queue").await;
    assert_eq!(queue["items"], json!([]), "{queue}");
}

// ---------------------------------------------------------------------------------------------
// 6. One reset is not an outage
// ---------------------------------------------------------------------------------------------

/// Slow probes: a wrong "offline" would last through the test instead of being healed by the
/// next probe within moments.
const SLOW_PROBES: &[(&str, &str)] = &[
    ("upstream.probe_interval", r#""3s""#),
    ("upstream.probe_interval_max", r#""3s""#),
];

/// #13.6a: one GET's connection closed without an answer is not an outage: the next mutations
/// are forwarded (the upstream's 201, not a 202) and `/status` stays online.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_get_whose_connection_closes_without_an_answer_is_not_an_outage_and_next_mutations_are_forwarded()
 {
    let s = Setup::online(&config(SLOW_PROBES, "")).await;
    let resp = s.get("/echo/warm").await;
    assert_eq!(resp.status(), 200);
    let watch = OnlineWatch::start(&s);
    s.upstream.script(
        "/echo/dropped",
        vec![ScriptedResponse::hang_up(), ScriptedResponse::passthrough()],
    );
    let resp = s.get("/echo/dropped").await;
    println!(
        "GET whose connection was closed: {} ({:?})",
        resp.status(),
        header(&resp, "cache-status")
    );
    for i in 0..3 {
        let key = format!("after-get-{i}");
        let resp = s.post(&format!("/apply/after-get/{i}"), &key, "{}").await;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        assert_eq!(
            status, 201,
            "{key} forwarded directly, the upstream's answer (not queued): {text}"
        );
        assert_eq!(deliveries_of(&s.upstream, &key), 1, "{key} delivered once");
    }
    watch
        .assert_never_offline("one GET closed without an answer")
        .await;
}

/// #13.6b: the upstream closes idle keep-alive connections after 500 ms; a GET and a POST after
/// about a second of idleness get the upstream's answers, each delivered once, no outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_the_upstream_closed_while_idle_are_replaced_and_requests_get_the_upstreams_answer()
 {
    let s = Setup::online(&config(SLOW_PROBES, "")).await;
    s.upstream
        .close_idle_after(Some(Duration::from_millis(500)));
    let watch = OnlineWatch::start(&s);
    for round in 0..3 {
        let resp = s.get(&format!("/echo/ka/{round}")).await;
        let status = resp.status();
        let cache_status = header(&resp, "cache-status");
        assert_eq!(status, 200, "round {round}: GET {cache_status:?}");
        let key = format!("ka-{round}");
        let resp = s.post(&format!("/apply/ka/{round}"), &key, "{}").await;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        assert_eq!(
            status, 201,
            "round {round}: POST, the upstream's answer: {text}"
        );
        assert_eq!(deliveries_of(&s.upstream, &key), 1, "{key} delivered once");
        // Idle for about a second: the upstream closes the pooled connections meanwhile.
        let closed = s.upstream.idle_closed_count();
        eventually(
            Duration::from_secs(5),
            "the upstream closed an idle connection",
            || async { s.upstream.idle_closed_count() > closed },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let resp = s.get("/echo/ka/last").await;
    assert_eq!(resp.status(), 200);
    let resp = s.post("/apply/ka/last", "ka-last", "{}").await;
    assert_eq!(resp.status(), 201);
    assert_eq!(deliveries_of(&s.upstream, "ka-last"), 1);
    println!(
        "idle connections closed by the upstream: {}",
        s.upstream.idle_closed_count()
    );
    watch
        .assert_never_offline("keep-alive connections closed by the upstream")
        .await;
}

/// #13.6c: a forwarded mutation's exchange is reset after the upstream recorded it: the app
/// gets a 202 under its key, and the mutation waits for its backoff (an hour here) or the
/// operator instead of going again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mutation_whose_exchange_is_reset_after_the_upstream_recorded_it_is_queued_and_not_sent_again_at_once()
 {
    // A first backoff of up to an hour: "at once" cannot hide behind a lucky jitter.
    let routes =
        "[[route]]\npath = \"/apply/wb/\"\nwrite = \"write-behind\"\npartition = \"path\"\n";
    let s = Setup::online(&config(
        &[
            ("replay.initial_backoff", r#""1h""#),
            ("replay.max_backoff", r#""1h""#),
        ],
        routes,
    ))
    .await;
    let watch = OnlineWatch::start(&s);
    s.upstream.script(
        "/apply/rst/",
        vec![ScriptedResponse::reset(), ScriptedResponse::passthrough()],
    );
    let resp = s.post("/apply/rst/1", "rst-1", r#"{"n":1}"#).await;
    let key = expect_queued(resp).await;
    assert_eq!(key, "rst-1", "queued under the app's key");

    // Replay runs meanwhile: a write-behind item in another partition is replayed.
    s.post_queued("/apply/wb/1", "wb-1", "{}").await;
    s.wait_mutation("wb-1", "succeeded", REPLAY_TIMEOUT).await;
    let (code, doc) = s.mutation("rst-1").await;
    assert_eq!(
        deliveries_of(&s.upstream, "rst-1"),
        1,
        "the reset exchange may have been applied: not re-sent at once; {code} {doc}"
    );
    assert_eq!(code, 200, "{doc}");
    assert_eq!(doc["status"], "queued", "waits for its backoff: {doc}");
    assert!(
        doc["next_attempt_at"].is_string(),
        "its next attempt is scheduled: {doc}"
    );

    // The operator sends it now: delivered a second time, and settled.
    let (code, body) = s.admin(reqwest::Method::POST, "/queue/rst-1/retry").await;
    assert_eq!(code, 200, "{body}");
    s.wait_mutation("rst-1", "succeeded", REPLAY_TIMEOUT).await;
    assert_eq!(deliveries_of(&s.upstream, "rst-1"), 2);
    watch.assert_never_offline("one reset exchange").await;
}

/// A `write_timeout` write is never sent twice (contract: "settles in the background, never
/// sent twice"). Its forward after the 202 gets no answer within `upstream.request_timeout`:
/// the upstream applied it and answers too late (or breaks the connection after reading it).
/// Its queued copy is not replayed: it goes to the dead letters saying why, and only an
/// operator's retry sends it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_timeout_forward_that_may_have_been_applied_is_dead_lettered_not_sent_again() {
    let routes =
        "[[route]]\npath = \"/apply/slow/\"\nwrite_timeout = \"200ms\"\npartition = \"path\"\n";
    let s = Setup::online(&config(&[("upstream.request_timeout", r#""1s""#)], routes)).await;
    // Applied at once, answered after 3 s: outpost gave up on it at 1 s. The second one is
    // applied and its connection closed without an answer.
    s.upstream.script(
        "/apply/slow/1",
        vec![ScriptedResponse::passthrough().delay(Duration::from_secs(3))],
    );
    s.upstream.script(
        "/apply/slow/2",
        vec![
            ScriptedResponse::hang_up().delay(Duration::from_millis(500)),
            ScriptedResponse::passthrough(),
        ],
    );
    for (path, key) in [("/apply/slow/1", "slow-1"), ("/apply/slow/2", "slow-2")] {
        let resp = s.post(path, key, r#"{"n":1}"#).await;
        assert_eq!(expect_queued(resp).await, key, "202 after write_timeout");
    }
    // Its status document goes from in flight to the forward's outcome, never back to
    // `queued` (its copy waits for replay, which waits for the upstream to be seen online).
    let deadline = Instant::now() + REPLAY_TIMEOUT;
    let mut seen = Vec::new();
    loop {
        let (_, doc) = s.mutation("slow-1").await;
        let status = doc["status"].as_str().unwrap_or_default().to_owned();
        if seen.last() != Some(&status) {
            seen.push(status.clone());
        }
        if status == "rejected" || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen, ["in_flight", "rejected"], "slow-1's statuses");
    for key in ["slow-1", "slow-2"] {
        let doc = s.wait_mutation(key, "rejected", REPLAY_TIMEOUT).await;
        let outcome = doc["outcome"].as_str().unwrap_or_default();
        assert!(
            outcome.contains("maybe applied") && outcome.contains("not sent again"),
            "the outcome says why: {doc}"
        );
    }
    // Well past the copies' due time and several backoffs: still one delivery each.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(deliveries_of(&s.upstream, "slow-1"), 1, "slow-1 sent once");
    assert_eq!(deliveries_of(&s.upstream, "slow-2"), 1, "slow-2 sent once");
    let mut listed = s.dead_letter_keys().await;
    listed.sort_unstable();
    assert_eq!(listed, ["slow-1", "slow-2"]);
    // The app's retry with the key: no success it could take for an answer (no upstream
    // answer came), its status document instead, and nothing sent.
    let retry = s.post("/apply/slow/1", "slow-1", r#"{"n":1}"#).await;
    assert_eq!(retry.status(), 409, "not a 2xx");
    assert_eq!(
        header(&retry, "idempotent-replayed").as_deref(),
        Some("true")
    );
    let doc: Value = retry.json().await.expect("status document");
    assert_eq!(doc["status"], "rejected", "{doc}");
    assert_eq!(deliveries_of(&s.upstream, "slow-1"), 1);
    assert_eq!(s.admin_status().await["queue_depth"], 0);

    // The operator knows better and sends it: that is the one way it goes again.
    let (code, body) = s
        .admin(reqwest::Method::POST, "/dead-letters/slow-2/retry")
        .await;
    assert_eq!(code, 200, "{body}");
    s.wait_mutation("slow-2", "succeeded", REPLAY_TIMEOUT).await;
    assert_eq!(deliveries_of(&s.upstream, "slow-2"), 2);
    assert_eq!(deliveries_of(&s.upstream, "slow-1"), 1);
}

/// A `write_timeout` write that outpost does send again, because its first send surely was
/// not applied (answered `503` after the 202), is not sent a third time when that send in turn
/// may have been applied without an answer: it is dead-lettered `maybe applied` like the
/// forward itself would be. One whose forward was cut short by a crash is not sent again at
/// all: the forward may have reached the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_timeout_write_sent_again_is_dead_lettered_when_that_send_may_have_been_applied() {
    let routes =
        "[[route]]\npath = \"/apply/slow/\"\nwrite_timeout = \"200ms\"\npartition = \"path\"\n";
    let mut s = Setup::online(&config(&[("upstream.request_timeout", r#""1s""#)], routes)).await;
    let late = || ScriptedResponse::passthrough().delay(Duration::from_secs(3));
    // 503 after the 202 (not applied), then its replay is applied and answered too late.
    s.upstream.script(
        "/apply/slow/3",
        vec![
            ScriptedResponse::new(503).delay(Duration::from_millis(500)),
            late(),
            ScriptedResponse::passthrough(),
        ],
    );
    let resp = s.post("/apply/slow/3", "slow-3", r#"{"n":3}"#).await;
    assert_eq!(expect_queued(resp).await, "slow-3");
    let doc = s.wait_mutation("slow-3", "rejected", REPLAY_TIMEOUT).await;
    assert!(
        doc["outcome"]
            .as_str()
            .is_some_and(|o| o.contains("maybe applied")),
        "{doc}"
    );

    // outpost killed while the forward is under way (the upstream has applied it and holds
    // the answer back): after the restart its copy is dead-lettered, not sent. (The timeout
    // just now marked the upstream offline: wait until it is seen back, so that this one is
    // forwarded, not queued.)
    s.wait_online().await;
    s.upstream.script(
        "/apply/slow/4",
        vec![late(), ScriptedResponse::passthrough()],
    );
    let resp = s.post("/apply/slow/4", "slow-4", r#"{"n":4}"#).await;
    assert_eq!(expect_queued(resp).await, "slow-4");
    assert_eq!(
        deliveries_of(&s.upstream, "slow-4"),
        1,
        "forwarded before its 202"
    );
    s.outpost.kill9().await;
    s.outpost.restart().await;
    let doc = s.wait_mutation("slow-4", "rejected", REPLAY_TIMEOUT).await;
    let outcome = doc["outcome"].as_str().unwrap_or_default();
    assert!(
        outcome.contains("maybe applied") && outcome.contains("outpost stopped"),
        "{doc}"
    );
    // Past several backoffs: no further sends.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        deliveries_of(&s.upstream, "slow-3"),
        2,
        "the 503, then one send"
    );
    assert_eq!(
        deliveries_of(&s.upstream, "slow-4"),
        1,
        "the forward cut by the crash, and no other send"
    );
    // The marker outpost keeps on the stored copy never reaches the upstream.
    for r in s.upstream.requests_to("/apply/slow/") {
        assert_eq!(r.header("outpost-forwarded-before-202"), None, "{r:?}");
    }
}

/// Several `write_timeout` forwards under way at once in one partition when outpost is
/// killed: each may have been applied (here every one was, its answer held back), and none
/// is sent again after the restart. Each is dead-lettered `maybe applied` at once (the data
/// directory is this process's alone, so the forwards ended with the process that ran them),
/// and the partition goes on with the writes behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_timeout_forwards_in_flight_at_a_crash_are_never_sent_again() {
    const N: usize = 8;
    let routes = "[[route]]\npath = \"/apply/slow/\"\nwrite_timeout = \"200ms\"\n";
    let mut s = Setup::online(&config(&[("upstream.request_timeout", r#""30s""#)], routes)).await;
    for i in 0..N {
        s.upstream.script(
            &format!("/apply/slow/{i}"),
            vec![
                ScriptedResponse::passthrough().delay(Duration::from_secs(20)),
                ScriptedResponse::passthrough(),
            ],
        );
    }
    let posts = (0..N).map(|i| {
        let s = &s;
        async move {
            let key = format!("cut-{i}");
            let resp = s
                .post(
                    &format!("/apply/slow/{i}"),
                    &key,
                    &format!(r#"{{"n":{i}}}"#),
                )
                .await;
            assert_eq!(expect_queued(resp).await, key, "202 after write_timeout");
        }
    });
    futures_util::future::join_all(posts).await;
    for i in 0..N {
        assert_eq!(deliveries_of(&s.upstream, &format!("cut-{i}")), 1);
    }
    s.outpost.kill9().await;
    s.outpost.restart().await;
    let started = Instant::now();
    for i in 0..N {
        let doc = s
            .wait_mutation(&format!("cut-{i}"), "rejected", REPLAY_TIMEOUT)
            .await;
        let outcome = doc["outcome"].as_str().unwrap_or_default();
        assert!(outcome.contains("maybe applied"), "{doc}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "settled without waiting for the forwards' 30 s request_timeout"
    );
    // The partition is not held up: a write after them is forwarded and applied.
    let resp = s.post("/apply/next", "after-cut", r#"{"n":99}"#).await;
    assert!(resp.status().is_success(), "{}", resp.status());
    s.wait_mutation("after-cut", "succeeded", REPLAY_TIMEOUT)
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..N {
        assert_eq!(
            deliveries_of(&s.upstream, &format!("cut-{i}")),
            1,
            "cut-{i}: the forward cut by the crash, and no other send"
        );
    }
    assert_eq!(s.dead_letter_keys().await.len(), N);
    assert_eq!(s.admin_status().await["queue_depth"], 0);
}

/// A graceful stop (SIGTERM) lets a forward under way settle within `proxy.shutdown_grace`:
/// a `write_timeout` write whose forward is still running when outpost is told to stop gets
/// its answer recorded, and is not sent again after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_settling_forward_finish_and_it_is_not_sent_again_after_the_restart() {
    let routes = "[[route]]\npath = \"/apply/slow/\"\nwrite_timeout = \"200ms\"\n";
    let mut s = Setup::online(&config(&[("proxy.shutdown_grace", r#""10s""#)], routes)).await;
    s.upstream.script(
        "/apply/slow/",
        vec![
            ScriptedResponse::passthrough().delay(Duration::from_millis(1500)),
            ScriptedResponse::passthrough(),
        ],
    );
    let resp = s.post("/apply/slow/5", "slow-5", r#"{"n":5}"#).await;
    assert_eq!(expect_queued(resp).await, "slow-5");
    s.outpost.terminate();
    let exit = s
        .outpost
        .wait_exit_timeout(Duration::from_secs(15))
        .await
        .expect("outpost stops within the grace");
    assert!(exit.success(), "{exit:?}");
    s.outpost.restart().await;
    let doc = s.wait_mutation("slow-5", "succeeded", REPLAY_TIMEOUT).await;
    assert_eq!(
        doc["upstream_status"], 201,
        "the forward's own answer: {doc}"
    );
    // Its queued copy was settled by the answer: nothing left to send.
    assert_eq!(s.admin_status().await["queue_depth"], 0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(deliveries_of(&s.upstream, "slow-5"), 1);
}

/// A graceful stop ends within `proxy.shutdown_grace` even while a replayed item waits for an
/// answer the upstream keeps back (it waited for `upstream.request_timeout`, however long).
/// The item is cut like one in flight at a crash: sent once more after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_replay_the_upstream_holds_ends_within_the_grace() {
    let routes = "[[route]]\npath = \"/apply/wb/\"\nwrite = \"write-behind\"\n";
    let mut s = Setup::online(&config(
        &[
            ("proxy.shutdown_grace", r#""1s""#),
            ("upstream.request_timeout", r#""30s""#),
        ],
        routes,
    ))
    .await;
    s.upstream.script(
        "/apply/wb/",
        vec![
            ScriptedResponse::passthrough().delay(Duration::from_secs(60)),
            ScriptedResponse::passthrough(),
        ],
    );
    s.post_queued("/apply/wb/1", "held-1", "{}").await;
    eventually(
        REPLAY_TIMEOUT,
        "the replay reached the upstream",
        || async { deliveries_of(&s.upstream, "held-1") == 1 },
    )
    .await;
    let asked = Instant::now();
    s.outpost.terminate();
    let exit = s
        .outpost
        .wait_exit_timeout(Duration::from_secs(20))
        .await
        .expect("outpost stops");
    let took = asked.elapsed();
    assert!(exit.success(), "{exit:?}");
    assert!(
        took < Duration::from_secs(10),
        "stopped within the 1 s grace (and its slack), not after request_timeout: {took:?}"
    );
    s.outpost.restart().await;
    s.wait_mutation("held-1", "succeeded", REPLAY_TIMEOUT).await;
    assert_eq!(
        deliveries_of(&s.upstream, "held-1"),
        2,
        "the cut replay, then one send"
    );
}

/// #13.6: single-exchange resets are an outage once `upstream.reset_threshold` of them happen
/// within `upstream.reset_window`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_resets_within_the_reset_window_are_an_outage() {
    let s = Setup::online(&config(
        &[
            ("upstream.reset_threshold", "2"),
            ("upstream.reset_window", r#""10s""#),
            ("upstream.probe_interval", r#""3s""#),
            ("upstream.probe_interval_max", r#""3s""#),
        ],
        "",
    ))
    .await;
    assert_eq!(s.get("/echo/warm").await.status(), 200);
    s.upstream
        .script("/echo/reset", vec![ScriptedResponse::hang_up()]);
    let mut gets = 0;
    while s.admin_status().await["online"] == true {
        assert!(
            gets < 2,
            "still online after {gets} GETs whose connections were closed without an answer \
             ({} exchanges; reset_threshold = 2)",
            s.upstream.requests_to("/echo/reset").len()
        );
        let _ = s.get(&format!("/echo/reset/{gets}")).await;
        gets += 1;
    }
    // Offline now: a mutation is queued.
    let resp = s
        .post("/apply/after-resets/1", "after-resets-1", "{}")
        .await;
    expect_queued(resp).await;
}

/// #13.6 (unchanged behaviour): a request timeout still marks the upstream offline at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_still_marks_the_upstream_offline_at_once() {
    let mut overrides = SLOW_PROBES.to_vec();
    overrides.push(("upstream.request_timeout", r#""300ms""#));
    let s = Setup::online(&config(&overrides, "")).await;
    assert_eq!(s.get("/echo/warm").await.status(), 200);

    // A timeout: the upstream holds the answer longer than request_timeout.
    s.upstream.script(
        "/echo/stall",
        vec![ScriptedResponse::new(200).delay(Duration::from_secs(2))],
    );
    let resp = s.get("/echo/stall").await;
    assert_eq!(resp.status(), 504, "nothing cached: 504");
    let status = s.admin_status().await;
    assert_eq!(status["online"], false, "a timeout is an outage: {status}");
    let resp = s
        .post("/apply/after-timeout/1", "after-timeout-1", "{}")
        .await;
    expect_queued(resp).await;
}

/// #13.6 (unchanged behaviour): a refused connection still marks the upstream offline at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_still_marks_the_upstream_offline_at_once() {
    let s = Setup::online(&config(SLOW_PROBES, "")).await;
    assert_eq!(s.get("/echo/warm").await.status(), 200);
    s.upstream.stop().await;
    let resp = s.get("/echo/refused").await;
    assert_eq!(resp.status(), 504, "nothing cached: 504");
    let status = s.admin_status().await;
    assert_eq!(
        status["online"], false,
        "a refused connection is an outage: {status}"
    );
    let resp = s
        .post("/apply/after-refused/1", "after-refused-1", "{}")
        .await;
    expect_queued(resp).await;
}

// ---------------------------------------------------------------------------------------------
// 7. No panic stops a partition
// ---------------------------------------------------------------------------------------------

/// Lines of outpost's log that report a panic.
fn panics_in_log(s: &Setup) -> Vec<String> {
    s.outpost
        .log()
        .lines()
        .filter(|l| l.contains("panicked"))
        .map(str::to_owned)
        .collect()
}

/// Asserts that outpost is running and nothing in its log panicked.
fn assert_no_panic(s: &mut Setup) {
    assert!(s.outpost.is_running(), "outpost is still running");
    let panics = panics_in_log(s);
    assert!(panics.is_empty(), "outpost panicked: {panics:?}");
}

/// Upstream-controlled numbers at and beyond `u64::MAX` seconds, for the read path.
const HUGE_FRESHNESS: &[(&str, &str)] = &[
    ("u64max", "cc=max-age%3D18446744073709551615"),
    ("u64max1", "cc=max-age%3D18446744073709551616"),
    ("huge", "cc=max-age%3D99999999999999999999"),
    (
        "smaxage",
        "cc=public%2C%20s-maxage%3D18446744073709551615%2C%20max-age%3D18446744073709551615",
    ),
    ("age", "cc=max-age%3D60&header=Age:18446744073709551615"),
    (
        "expires",
        "header=Expires:Fri,%2031%20Dec%209999%2023:59:59%20GMT",
    ),
];

/// #13.7: `max-age`/`s-maxage` at and beyond `u64::MAX`, a huge `Age`, `Expires` in 9999: the
/// reads are served (online, then from the cache offline) and nothing panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_answered_with_huge_max_age_age_and_expires_are_served_and_panic_nothing() {
    let mut s = Setup::online(&config(&[], "")).await;
    // Each twice: fetched and stored, then (if fresh) served from the cache.
    let mut failed = Vec::new();
    for (name, query) in HUGE_FRESHNESS {
        let path = format!("/echo/huge/{name}?{query}");
        for attempt in ["first", "again"] {
            match s.http.get(s.url(&path)).send().await {
                Ok(resp) if resp.status() == 200 => {
                    let _ = resp.text().await;
                }
                Ok(resp) => failed.push(format!("{name} ({attempt}): {}", resp.status())),
                Err(e) => failed.push(format!("{name} ({attempt}): no answer: {e}")),
            }
        }
    }
    let resp = s.get("/echo/plain").await;
    assert_eq!(resp.status(), 200, "later requests are served");
    assert!(
        failed.is_empty(),
        "GETs with huge freshness values did not get the upstream's 200: {failed:?}; \
         outpost's panics: {:?}",
        panics_in_log(&s)
    );

    // Offline, the stored copies are read again (age and freshness arithmetic).
    s.upstream.stop().await;
    for (name, query) in HUGE_FRESHNESS {
        let path = format!("/echo/huge/{name}?{query}");
        match s.http.get(s.url(&path)).send().await {
            Ok(resp) if [200, 504].contains(&resp.status().as_u16()) => {}
            Ok(resp) => failed.push(format!("{name} (offline): {}", resp.status())),
            Err(e) => failed.push(format!("{name} (offline): no answer: {e}")),
        }
    }
    assert!(failed.is_empty(), "offline: {failed:?}");
    assert_no_panic(&mut s);
}

/// #13.7: replayed answers with `Retry-After` of `u64::MAX` seconds, beyond it, and in 9999:
/// nothing panics, the item's status document renders, and after each operator retry the
/// partition goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_answers_with_huge_retry_after_panic_nothing_and_the_partition_goes_on_after_an_operator_retry()
 {
    // Backoff of up to an hour: whatever a fix makes of the huge values (a cap, or ignoring
    // them), the item waits for the operator's retry rather than going again by itself.
    let mut s = Setup::offline(&config(
        &[
            ("replay.initial_backoff", r#""1h""#),
            ("replay.max_backoff", r#""1h""#),
        ],
        "",
    ))
    .await;
    s.upstream.script(
        "/apply/ra/",
        vec![
            ScriptedResponse::new(503).header("Retry-After", "18446744073709551615"),
            ScriptedResponse::new(429).header("Retry-After", "99999999999999999999"),
            ScriptedResponse::new(503).header("Retry-After", "Fri, 31 Dec 9999 23:59:59 GMT"),
            ScriptedResponse::passthrough(),
        ],
    );
    s.post_queued("/apply/ra/1", "ra-1", "{}").await;
    s.post_queued("/apply/ra-next/1", "ra-next", "{}").await;
    s.upstream.restart().await;

    for round in 1..=3 {
        let deadline = Instant::now() + REPLAY_TIMEOUT;
        while deliveries_of(&s.upstream, "ra-1") < round {
            let (_, doc) = s.mutation("ra-1").await;
            assert!(
                Instant::now() < deadline,
                "ra-1 was not sent a {round}. time (after an operator retry); its document: {doc}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        // The retried item's status document renders, with its attempts.
        let deadline = Instant::now() + REPLAY_TIMEOUT;
        let doc = loop {
            let (code, doc) = s.mutation("ra-1").await;
            if code == 200 && doc["status"] == "queued" && doc["attempts"] == round {
                break doc;
            }
            let panics = panics_in_log(&s);
            assert!(
                panics.is_empty(),
                "outpost panicked on the answer to attempt {round}: {panics:?}; ra-1: {code} {doc}"
            );
            assert!(
                Instant::now() < deadline,
                "ra-1's document after attempt {round}: {code} {doc}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        println!("after attempt {round}: {doc}");
        // A retryable answer marks the upstream offline until the next probe: reads are
        // forwarded again once it is seen online.
        eventually(REPLAY_TIMEOUT, "a later GET forwarded (200)", || async {
            s.get("/echo/alive").await.status() == 200
        })
        .await;
        assert_no_panic(&mut s);
        // The upstream asked for a very long wait; the operator sends it now.
        let (code, body) = s.admin(reqwest::Method::POST, "/queue/ra-1/retry").await;
        assert_eq!(code, 200, "operator retry after attempt {round}: {body}");
    }
    s.wait_mutation("ra-1", "succeeded", REPLAY_TIMEOUT).await;
    s.wait_mutation("ra-next", "succeeded", REPLAY_TIMEOUT)
        .await;
    assert_eq!(deliveries_of(&s.upstream, "ra-1"), 4);
    assert_eq!(deliveries_of(&s.upstream, "ra-next"), 1);
    assert_no_panic(&mut s);
}

/// A forwarded write's answer is kept before the app gets it: SIGKILL right after the
/// upstream's 201 reached the app, restart, and the app's retry with the key gets the stored
/// answer, never a second send. Found by a hostile probe: the answer used to be stored after
/// the app had it (in 5 of 20 tries by default, and every time with `progress_sync = "10ms"`,
/// the retry was sent again). Both settings, a dozen kills each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_right_after_a_forwarded_writes_answer_then_a_retry_with_its_key_gets_the_stored_answer()
 {
    for (label, overrides) in [
        ("default", &[][..]),
        (
            "progress_sync-10ms",
            &[("replay.progress_sync", r#""10ms""#)][..],
        ),
    ] {
        let mut s = Setup::online(&config(overrides, "")).await;
        for i in 0..12 {
            let (path, key, body) = (
                format!("/apply/fwd/{i}"),
                format!("fwd-{label}-{i}"),
                format!(r#"{{"n":{i}}}"#),
            );
            let resp = s.post(&path, &key, &body).await;
            assert_eq!(
                resp.status(),
                201,
                "{label}: forwarded: {:?}",
                resp.text().await
            );
            s.outpost.kill9().await;
            s.outpost.restart().await;
            let (status, headers, text) = retry_after_in_progress(&s, &path, &key, &body).await;
            assert_eq!(
                deliveries_of(&s.upstream, &key),
                1,
                "{label}, try {i}: the retry after the crash was sent again ({status} {text})"
            );
            assert_eq!(status, 201, "{label}, try {i}: the stored answer: {text}");
            assert_eq!(
                headers
                    .get("idempotent-replayed")
                    .and_then(|v| v.to_str().ok()),
                Some("true"),
                "{label}, try {i}: {headers:?}"
            );
        }
    }
}

/// While a key is being forwarded, the same caller's duplicate gets 409 (in progress), but
/// another caller, or the same caller with another request, gets the 422 of a reused key:
/// nothing tells them the key is in use. The upstream sees the key once.
#[tokio::test]
async fn a_key_in_progress_is_409_only_for_its_callers_same_request() {
    let s = Setup::online(&config(&[], "")).await;
    s.upstream.script(
        "/apply/held/",
        vec![ScriptedResponse::passthrough().delay(Duration::from_millis(1500))],
    );
    let send = |who: &'static str, body: &'static str| {
        let http = s.http.clone();
        let url = s.url("/apply/held/1");
        async move {
            http.post(url)
                .header("Idempotency-Key", "held-1")
                .header("Authorization", format!("Bearer {who}"))
                .header("Content-Type", "application/json")
                .body(body)
                .send()
                .await
                .expect("POST through outpost")
        }
    };
    let first = tokio::spawn(send("alice", r#"{"n":1}"#));
    s.upstream
        .wait_requests("/apply/held/", 1, REPLAY_TIMEOUT)
        .await;
    let dup = send("alice", r#"{"n":1}"#).await;
    assert_eq!(dup.status(), 409, "the same caller's duplicate");
    let other_body = send("alice", r#"{"n":2}"#).await;
    assert_eq!(other_body.status(), 422, "the same key with another body");
    let other_caller = send("bob", r#"{"n":1}"#).await;
    assert_eq!(other_caller.status(), 422, "another caller's key");
    let first = first.await.expect("first request");
    assert_eq!(first.status(), 201);
    assert_eq!(deliveries_of(&s.upstream, "held-1"), 1);
}
