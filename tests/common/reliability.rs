//! Figures of the reliability suite (issue #21): every reliability test reports what it did with
//! [`report`], one line per figure set, and `tests/reliability/run.sh` collects the lines from
//! the tests' stdout into one table.
//!
//! The line format is fixed (other tools parse it): the literal prefix `RELIABILITY `, then one
//! JSON object on the same line with at least `"section"` (one of `crash`, `faults`,
//! `resources`, `hostile`, `fuzz`, `isolation`) and `"name"`, plus any numeric or string fields.
//! Fields the table totals when present: `acknowledged`, `applied_once`, `lost`, `doubled`,
//! `redelivered`, `cycles`, `fault_kinds`, `hostile_shapes`, `fuzz_executions`.
//!
//! ```text
//! RELIABILITY {"section":"crash","name":"embedded kill under load","cycles":4,"acknowledged":812,"applied_once":812,"lost":0,"doubled":0,"redelivered":0}
//! ```

/// Prefix of every figures line on stdout.
pub const PREFIX: &str = "RELIABILITY ";

/// Whether the full-size run was asked for (`OUTPOST_RELIABILITY_FULL=1`, as
/// `tests/reliability/run.sh --full` sets it); CI runs the reduced size.
pub fn full() -> bool {
    std::env::var("OUTPOST_RELIABILITY_FULL").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// `ci` normally, `full_size` when [`full`] is set.
pub fn size(ci: usize, full_size: usize) -> usize {
    if full() { full_size } else { ci }
}

/// The figures line for `section`/`name` with `fields` (a JSON object; other values are
/// reported under `"value"`), without printing it.
pub fn line(section: &str, name: &str, fields: serde_json::Value) -> String {
    let mut object = serde_json::Map::new();
    object.insert("section".to_owned(), section.into());
    object.insert("name".to_owned(), name.into());
    object.insert("size".to_owned(), if full() { "full" } else { "ci" }.into());
    match fields {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                if key != "section" && key != "name" {
                    object.insert(key, value);
                }
            }
        }
        serde_json::Value::Null => {}
        other => {
            object.insert("value".to_owned(), other);
        }
    }
    format!("{PREFIX}{}", serde_json::Value::Object(object))
}

/// Prints the figures line for `section`/`name` with `fields` to stdout with one `println!`
/// (captured like any test output; `--nocapture`, as `run.sh` passes, shows it).
///
/// ```ignore
/// common::reliability::report("crash", "embedded kill under load", serde_json::json!({
///     "cycles": 4, "acknowledged": 812, "applied_once": 812, "lost": 0, "doubled": 0,
///     "redelivered": 0,
/// }));
/// ```
pub fn report(section: &str, name: &str, fields: serde_json::Value) {
    println!("{}", line(section, name, fields));
}

// ---------------------------------------------------------------------------------------------
// Write load and the ledger of what was acknowledged
// ---------------------------------------------------------------------------------------------

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Upstream;

/// Steady concurrent write load: `writers` tasks, each sending `POST` mutations one after the
/// other (the next only once the previous one was acknowledged), writer `w` always to the same
/// path, so its writes share one partition and their order is that writer's order.
///
/// A write that gets no acknowledgement (connection refused or reset while outpost is down, a
/// `503` while its store is down, a `409` while an earlier attempt is still being stored) is
/// sent again with the same key and body (so is a transient upstream answer outpost passed on:
/// `429`, `502`–`504`), to the next of `targets` (outpost instances), until
/// it is acknowledged (any `2xx`: `202` queued, or the upstream's own answer) or the load is
/// stopped. Any other answer is recorded in [`WriteLoad::unexpected`].
pub struct WriteLoad {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Vec<String>>>>,
    attempted: Arc<Mutex<Vec<String>>>,
    retries: Arc<AtomicU64>,
    unexpected: Arc<Mutex<Vec<String>>>,
    tasks: tokio::task::JoinSet<()>,
}

/// What a [`WriteLoad`] sends.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// Number of concurrent writers.
    pub writers: usize,
    /// Base URLs of the outpost instances (`http://127.0.0.1:P`); writer `w` starts at
    /// `targets[w % len]` and moves to the next one after a failed attempt.
    pub targets: Vec<String>,
    /// Path prefix; writer `w` posts to `{path}/{w % partitions}`.
    pub path: String,
    /// Number of distinct paths (partitions, with `partition = "path"`).
    pub partitions: usize,
    /// Key prefix: keys are `{key_prefix}-{w:02}-{n:06}`.
    pub key_prefix: String,
    /// Pause between one writer's acknowledged writes.
    pub pace: Duration,
}

impl WriteLoad {
    /// Starts the writers.
    pub fn start(http: &reqwest::Client, spec: LoadSpec) -> WriteLoad {
        assert!(!spec.targets.is_empty(), "a write load needs a target");
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(vec![Vec::new(); spec.writers]));
        let attempted = Arc::new(Mutex::new(Vec::new()));
        let retries = Arc::new(AtomicU64::new(0));
        let unexpected = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..spec.writers {
            let (http, spec) = (http.clone(), spec.clone());
            let (stop, acked, attempted) = (stop.clone(), acked.clone(), attempted.clone());
            let (retries, unexpected) = (retries.clone(), unexpected.clone());
            tasks.spawn(async move {
                let path = format!("{}/{}", spec.path, w % spec.partitions.max(1));
                let mut target = w % spec.targets.len();
                let mut n = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    let key = format!("{}-{w:02}-{n:06}", spec.key_prefix);
                    let body = format!(r#"{{"writer":{w},"n":{n}}}"#);
                    attempted.lock().expect("lock").push(key.clone());
                    loop {
                        let url = format!("{}{path}", spec.targets[target]);
                        let sent = http
                            .post(&url)
                            .header("Idempotency-Key", &key)
                            .header("Content-Type", "application/json")
                            .body(body.clone())
                            .send()
                            .await;
                        let status = match sent {
                            Ok(resp) => {
                                let status = resp.status().as_u16();
                                let _ = resp.bytes().await;
                                Some(status)
                            }
                            Err(_) => None,
                        };
                        match status {
                            Some(s) if (200..300).contains(&s) => {
                                acked.lock().expect("lock")[w].push(key.clone());
                                break;
                            }
                            None | Some(409 | 429 | 502 | 503 | 504) => {
                                retries.fetch_add(1, Ordering::SeqCst);
                                if stop.load(Ordering::SeqCst) {
                                    return;
                                }
                                target = (target + 1) % spec.targets.len();
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            Some(s) => {
                                unexpected.lock().expect("lock").push(format!("{key}: {s}"));
                                break;
                            }
                        }
                    }
                    n += 1;
                    if !spec.pace.is_zero() {
                        tokio::time::sleep(spec.pace).await;
                    }
                }
            });
        }
        WriteLoad {
            stop,
            acked,
            attempted,
            retries,
            unexpected,
            tasks,
        }
    }

    /// Number of writes acknowledged so far.
    pub fn acked_count(&self) -> usize {
        self.acked.lock().expect("lock").iter().map(Vec::len).sum()
    }

    /// The keys acknowledged so far (all writers).
    pub fn acked_keys(&self) -> Vec<String> {
        self.acked
            .lock()
            .expect("lock")
            .iter()
            .flatten()
            .cloned()
            .collect()
    }

    /// Attempts that got no acknowledgement and were sent again.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::SeqCst)
    }

    /// Answers that were neither an acknowledgement nor a retryable refusal.
    pub fn unexpected(&self) -> Vec<String> {
        self.unexpected.lock().expect("lock").clone()
    }

    /// Stops the writers (each finishes or abandons its current write) and returns the
    /// acknowledged keys per writer, in each writer's order, and every key ever sent.
    pub async fn stop(mut self) -> (Vec<Vec<String>>, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        while let Some(joined) = self.tasks.join_next().await {
            joined.expect("writer task");
        }
        let acked = self.acked.lock().expect("lock").clone();
        let attempted = self.attempted.lock().expect("lock").clone();
        (acked, attempted)
    }
}

/// Deliveries per `Idempotency-Key` among the requests the upstream received under
/// `path_prefix` (an upstream that ignores the key applies each of them), with arrival times.
pub fn deliveries(upstream: &Upstream, path_prefix: &str) -> HashMap<String, Vec<Instant>> {
    let mut out: HashMap<String, Vec<Instant>> = HashMap::new();
    for r in upstream.requests_to(path_prefix) {
        if let Some(key) = r.header("idempotency-key") {
            out.entry(key.to_owned()).or_default().push(r.at);
        }
    }
    out
}

/// The exactly-once ledger of one run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Writes that got a `2xx`.
    pub acknowledged: usize,
    /// Acknowledged writes the upstream received exactly once.
    pub applied_once: usize,
    /// Acknowledged writes the upstream never received.
    pub lost: usize,
    /// Extra deliveries the contract allows (the item in flight at a crash, or an exchange
    /// whose answer never reached outpost), counted per extra delivery.
    pub redelivered: usize,
    /// Extra deliveries the contract does not allow, counted per extra delivery.
    pub doubled: usize,
    /// Deliveries of keys that were never sent by the load.
    pub unknown: usize,
}

impl Tally {
    /// Counts `acked` against `delivered`; `allowed(key, times)` says how many of a key's
    /// extra deliveries (beyond the first) the contract allows. Keys sent but never
    /// acknowledged may be delivered once (stored before the crash that lost their `202`);
    /// more often is doubled too. Keys not in `attempted` are `unknown`.
    pub fn count(
        acked: &[Vec<String>],
        attempted: &[String],
        delivered: &HashMap<String, Vec<Instant>>,
        mut allowed: impl FnMut(&str, &[Instant]) -> usize,
    ) -> Tally {
        let mut tally = Tally::default();
        for key in acked.iter().flatten() {
            tally.acknowledged += 1;
            match delivered.get(key).map_or(0, Vec::len) {
                0 => tally.lost += 1,
                1 => tally.applied_once += 1,
                _ => {}
            }
        }
        let known: std::collections::HashSet<&str> = attempted.iter().map(String::as_str).collect();
        for (key, times) in delivered {
            if !known.contains(key.as_str()) {
                tally.unknown += times.len();
                continue;
            }
            let extra = times.len() - 1;
            if extra > 0 {
                let ok = allowed(key, times).min(extra);
                tally.redelivered += ok;
                tally.doubled += extra - ok;
            }
        }
        tally
    }

    /// The tally as JSON fields for [`report`].
    pub fn fields(&self) -> serde_json::Value {
        serde_json::json!({
            "acknowledged": self.acknowledged,
            "applied_once": self.applied_once,
            "lost": self.lost,
            "doubled": self.doubled,
            "redelivered": self.redelivered,
        })
    }
}

/// Asserts that each writer's acknowledged writes were first delivered in the writer's order
/// (each writer writes to one partition).
pub fn assert_writer_order(acked: &[Vec<String>], delivered: &HashMap<String, Vec<Instant>>) {
    for (w, keys) in acked.iter().enumerate() {
        let firsts: Vec<(&str, Instant)> = keys
            .iter()
            .filter_map(|k| delivered.get(k).map(|t| (k.as_str(), t[0])))
            .collect();
        if let Some(pair) = firsts.windows(2).find(|p| p[0].1 > p[1].1) {
            panic!(
                "writer {w}: {} was first delivered after {}, though acknowledged before it",
                pair[0].0, pair[1].0
            );
        }
    }
}

/// Merges the fields of `extra` (a JSON object) into `fields` (a JSON object).
pub fn merge(mut fields: serde_json::Value, extra: serde_json::Value) -> serde_json::Value {
    if let (Some(into), serde_json::Value::Object(from)) = (fields.as_object_mut(), extra) {
        into.extend(from);
    }
    fields
}
