//! End-to-end tests of the Redis backend (issue #5): two or three real `outpost` processes share
//! one private `redis-server` (a free loopback port, never 6379; AOF with `appendfsync always`)
//! in front of one idempotent test upstream (`tests/common`).
//!
//! What they prove, each in its own test:
//! - writes accepted by different instances while the upstream is down are applied exactly once
//!   and in acceptance order, although the instance replaying them is SIGKILLed in the middle of
//!   a request: its partition lease expires and another instance takes the partition over;
//! - a read cached through one instance is served offline by another, to the same caller only;
//! - while Redis is down mutations get a 503 (never a 202) and reads still come from the
//!   instance's memory; when Redis is back, outpost recovers by itself and every write that got
//!   a 202 before or after the outage is applied exactly once;
//! - one idempotency key sent to two instances (one after the other, or at the same moment) is
//!   one queue entry, answered with the same 202 by both and applied once;
//! - an upstream answer slower than the lease does not let another instance take the partition
//!   and send the item again while it is in flight.
//!
//! "The upstream is down" means its listener and connections are closed (connection refused).
//! The `/apply/...` endpoint applies each idempotency key once and records the order, so
//! "exactly once, in order" is read from [`Upstream::applied`]; every request that reached it,
//! duplicates included, is in [`Upstream::requests_to`] (duplicates are allowed only with the
//! same key). Leases are 1 s here (`store.redis_lease`), so takeovers take moments. Without a
//! `redis-server` binary the tests print a loud SKIPPED notice (or fail when `CI` is set).

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// Small timings, so lease takeovers, outages and retries take moments.
fn config_toml(upstream_extra: &str, replay_extra: &str) -> String {
    format!(
        r#"
[store]
redis_lease = "1s"

[upstream]
connect_timeout = "500ms"
request_timeout = "20s"
probe_interval = "50ms"
probe_interval_max = "500ms"
{upstream_extra}

[replay]
initial_backoff = "100ms"
max_backoff = "1s"
{replay_extra}
"#
    )
}

/// How long replay may take (generous: a slow CI box is not a failure).
const REPLAY_TIMEOUT: Duration = Duration::from_secs(20);

/// One `outpost serve --redis ...` process with its own config file and (unused) data dir.
struct Instance {
    name: &'static str,
    process: OutpostProcess,
    _config_dir: tempfile::TempDir,
    _data_dir: tempfile::TempDir,
}

impl Instance {
    /// Starts an instance on `redis` in front of `upstream`; `upstream_extra` is added to the
    /// `[upstream]` table of its config.
    async fn start(
        name: &'static str,
        redis: &RedisServer,
        upstream: &Upstream,
        upstream_extra: &str,
    ) -> Instance {
        Self::start_with(name, redis, upstream, upstream_extra, "").await
    }

    /// [`Instance::start`] with `replay_extra` added to the `[replay]` table.
    async fn start_with(
        name: &'static str,
        redis: &RedisServer,
        upstream: &Upstream,
        upstream_extra: &str,
        replay_extra: &str,
    ) -> Instance {
        let config_dir = temp_dir();
        let config: PathBuf = config_dir.path().join("outpost.toml");
        std::fs::write(&config, config_toml(upstream_extra, replay_extra))
            .expect("write the config file");
        let data_dir = temp_dir();
        let config_arg = config.display().to_string();
        let process = OutpostProcess::start(
            &[
                "--config",
                &config_arg,
                "--redis",
                &redis.url(),
                "--upstream",
                &upstream.url(),
            ],
            data_dir.path(),
        )
        .await;
        Instance {
            name,
            process,
            _config_dir: config_dir,
            _data_dir: data_dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.process.url())
    }

    /// `GET /status` of the admin listener (panics unless it answers 200 JSON).
    async fn status(&self, http: &reqwest::Client) -> Value {
        let url = format!("{}/status", self.process.admin_url());
        let resp = http
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url} on instance {}: {e}", self.name));
        assert_eq!(resp.status(), 200, "GET /status on instance {}", self.name);
        resp.json().await.expect("status JSON")
    }

    /// `POST /apply/orders` with an explicit idempotency key and a JSON body.
    async fn post(&self, http: &reqwest::Client, key: &str, body: &Value) -> reqwest::Response {
        http.post(self.url("/apply/orders"))
            .header("idempotency-key", key)
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST via instance {} (key {key}): {e}", self.name))
    }
}

/// Reads a response as (status, headers, body text).
async fn read(resp: reqwest::Response) -> (u16, reqwest::header::HeaderMap, String) {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.text().await.expect("response body");
    (status, headers, body)
}

fn header<'a>(headers: &'a reqwest::header::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

/// Asserts a 202 for `key` with the contract's headers and body.
fn assert_queued(
    what: &str,
    status: u16,
    headers: &reqwest::header::HeaderMap,
    body: &str,
    key: &str,
) {
    assert_eq!(status, 202, "{what}: expected 202, got {status}: {body}");
    assert_eq!(header(headers, "idempotency-key"), Some(key), "{what}");
    let location = format!("/_outpost/mutations/{key}");
    assert_eq!(
        header(headers, "location"),
        Some(location.as_str()),
        "{what}"
    );
    let doc = json_of(body);
    assert_eq!(doc["status"], "queued", "{what}: {doc}");
    assert_eq!(doc["idempotency_key"], key, "{what}: {doc}");
}

async fn wait_queue_depth(instance: &Instance, http: &reqwest::Client, depth: u64, what: &str) {
    eventually(REPLAY_TIMEOUT, what, || async {
        instance.status(http).await["queue_depth"] == depth
    })
    .await;
}

#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test(flavor = "multi_thread")]
async fn writes_accepted_by_three_instances_offline_are_applied_once_in_acceptance_order_after_the_replaying_one_is_sigkilled()
 {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    upstream.stop().await;
    // Each instance probes its own path. B's and C's probes fail (503) until the test lets them
    // through, so that A alone sees the upstream come back and takes the partition's lease.
    upstream.script("/probe/b", vec![ScriptedResponse::new(503)]);
    upstream.script("/probe/c", vec![ScriptedResponse::new(503)]);
    let mut a = Instance::start("a", &redis, &upstream, r#"probe_path = "/probe/a""#).await;
    let b = Instance::start("b", &redis, &upstream, r#"probe_path = "/probe/b""#).await;
    let c = Instance::start("c", &redis, &upstream, r#"probe_path = "/probe/c""#).await;
    let http = client();

    // Sequential writes, round-robin over the instances: acceptance order is the order of the
    // 202s.
    let mut accepted: Vec<(String, Value)> = Vec::new();
    for n in 0..12 {
        let instance = [&a, &b, &c][n % 3];
        let key = format!("order-{n:02}-via-{}", instance.name);
        let body = json!({"n": n, "via": instance.name});
        let (status, headers, text) = read(instance.post(&http, &key, &body).await).await;
        assert_queued(
            &format!("write {n} via {}", instance.name),
            status,
            &headers,
            &text,
            &key,
        );
        accepted.push((key, body));
    }
    // One queue, seen alike by every instance.
    for instance in [&a, &b, &c] {
        let status = instance.status(&http).await;
        assert_eq!(
            status["queue_depth"], 12,
            "instance {}: {status}",
            instance.name
        );
    }

    // Every instance has found the upstream down (by a write or a replay attempt), so only A's
    // probe can bring one back online.
    for instance in [&a, &b, &c] {
        eventually(
            REPLAY_TIMEOUT,
            "every instance sees the upstream offline",
            || async { instance.status(&http).await["online"] == false },
        )
        .await;
    }

    // The upstream comes back; A sends the head of the queue and gets no answer for a while.
    upstream.script(
        "/apply",
        vec![
            ScriptedResponse::passthrough().delay(Duration::from_secs(5)),
            ScriptedResponse::passthrough(),
        ],
    );
    upstream.restart().await;
    let first = upstream.wait_requests("/apply", 1, REPLAY_TIMEOUT).await;
    assert_eq!(
        first[0].header("idempotency-key"),
        Some(accepted[0].0.as_str()),
        "replay must start with the first accepted write"
    );
    // A holds the lease and has the first item in flight: kill it there.
    a.process.kill9().await;
    let killed_at = Instant::now();
    assert!(
        upstream.applied().is_empty(),
        "nothing may be applied before the takeover: {:?}",
        upstream.applied()
    );
    assert_eq!(
        upstream.requests_to("/apply").len(),
        1,
        "while A held the lease, no other instance may have replayed"
    );
    upstream.clear_script("/probe/b");
    upstream.clear_script("/probe/c");

    // B or C takes the partition over once A's lease has expired, and replays everything.
    let applied = upstream.wait_applied(accepted.len(), REPLAY_TIMEOUT).await;
    let took_over_after = killed_at.elapsed();
    for instance in [&b, &c] {
        wait_queue_depth(instance, &http, 0, "the shared queue drained").await;
    }
    let applied_after = upstream.applied();
    assert_eq!(
        applied_after.len(),
        accepted.len(),
        "every acknowledged write applied, and nothing else: {:?}",
        applied_after.iter().map(|a| &a.key).collect::<Vec<_>>()
    );

    let applied_keys: Vec<&str> = applied.iter().map(|a| a.key.as_str()).collect();
    let accepted_keys: Vec<&str> = accepted.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        applied_keys, accepted_keys,
        "applied order must equal acceptance order (took over {took_over_after:?} after the kill)"
    );
    for (applied, (key, body)) in applied.iter().zip(&accepted) {
        assert_eq!(&applied.body_json(), body, "body of {key}");
        assert_eq!(applied.path, "/apply/orders", "path of {key}");
    }
    let stamps: Vec<&str> = applied
        .iter()
        .map(|a| {
            a.accepted_at
                .as_deref()
                .expect("Outpost-Accepted-At on every replay")
        })
        .collect();
    assert!(
        stamps.windows(2).all(|w| w[0] <= w[1]),
        "Outpost-Accepted-At must not decrease along the applied order: {stamps:?}"
    );

    // Whatever reached the upstream more than once carried the same key: only acknowledged keys
    // were ever sent, and the item A had in flight went again (with its key) after the takeover.
    // (Requests are recorded on arrival; `seen_requests_for` would miss A's, which never got
    // past its scripted delay.)
    let known: HashSet<&str> = accepted_keys.iter().copied().collect();
    let apply_requests = upstream.requests_to("/apply");
    let mut sent: Vec<&str> = Vec::new();
    for request in &apply_requests {
        let key = request
            .header("idempotency-key")
            .expect("every replayed mutation carries an Idempotency-Key");
        assert!(
            known.contains(key),
            "unexpected key {key:?} reached the upstream"
        );
        sent.push(key);
    }
    assert_eq!(
        &sent[..2],
        &[accepted_keys[0], accepted_keys[0]],
        "the item in flight at the kill must be the first one sent after the takeover"
    );
    // A took its lease just before sending; nobody else may send before it expired (1 s).
    let gap = apply_requests[1].at.duration_since(apply_requests[0].at);
    assert!(
        gap >= Duration::from_millis(700),
        "the next replay came {gap:?} after A's request: before A's 1 s lease could expire"
    );
    for instance in [&b, &c] {
        let status = instance.status(&http).await;
        assert_eq!(
            status["dead_letters"], 0,
            "instance {}: {status}",
            instance.name
        );
    }
}

#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test(flavor = "multi_thread")]
async fn a_read_cached_through_one_instance_is_served_offline_by_another_only_to_the_same_caller() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let a = Instance::start("a", &redis, &upstream, "").await;
    let b = Instance::start("b", &redis, &upstream, "").await;
    let http = client();
    let path = "/echo/site-report?cc=max-age%3D300";
    // The host the app asked for is part of the cache key: behind a load balancer every
    // instance sees the same one.
    let site = "outpost.site.example";

    let resp = http
        .get(a.url(path))
        .header("host", site)
        .header("authorization", "Bearer alice-token")
        .send()
        .await
        .expect("GET via A");
    let (status, headers, original) = read(resp).await;
    assert_eq!(status, 200, "{original}");
    assert_eq!(
        header(&headers, "cache-status"),
        Some("outpost; fwd=uri-miss; stored")
    );
    // The durable tier is written in the background: wait until Redis holds the entry.
    eventually(
        Duration::from_secs(10),
        "the cache entry reached Redis",
        || async { b.status(&http).await["cache_entries"].as_u64().unwrap_or(0) >= 1 },
    )
    .await;
    upstream.stop().await;

    let resp = http
        .get(b.url(path))
        .header("host", site)
        .header("authorization", "Bearer alice-token")
        .send()
        .await
        .expect("GET via B");
    let (status, headers, body) = read(resp).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        header(&headers, "cache-status"),
        Some("outpost; hit; detail=offline")
    );
    assert!(headers.contains_key("age"), "a cached answer carries Age");
    assert_eq!(
        body, original,
        "B must serve the copy A stored, byte for byte"
    );

    for other in [Some("Bearer mallory-token"), None] {
        let mut req = http.get(b.url(path)).header("host", site);
        if let Some(auth) = other {
            req = req.header("authorization", auth);
        }
        let (status, headers, body) = read(req.send().await.expect("GET via B")).await;
        assert_eq!(
            status, 504,
            "caller {other:?} must not get alice's copy: {body}"
        );
        assert_eq!(
            json_of(&body),
            json!({"error": "upstream_unreachable", "cached": false}),
            "caller {other:?}"
        );
        assert_ne!(
            header(&headers, "cache-status"),
            Some("outpost; hit; detail=offline"),
            "caller {other:?}"
        );
    }
    assert_eq!(
        upstream.requests_to("/echo").len(),
        1,
        "only A's first read reached the upstream"
    );
}

#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test(flavor = "multi_thread")]
async fn while_redis_is_down_mutations_get_503_and_reads_come_from_memory_and_outpost_recovers_without_losing_an_acknowledged_write()
 {
    let mut redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let a = Instance::start("a", &redis, &upstream, "").await;
    let http = client();
    let read_path = "/echo/profile?cc=max-age%3D300";
    let get_profile = || {
        http.get(a.url(read_path))
            .header("authorization", "Bearer alice-token")
            .send()
    };

    let (status, headers, profile) = read(get_profile().await.expect("GET profile")).await;
    assert_eq!(status, 200, "{profile}");
    assert_eq!(
        header(&headers, "cache-status"),
        Some("outpost; fwd=uri-miss; stored")
    );
    upstream.stop().await;

    let mut acknowledged = Vec::new();
    for key in ["before-outage-1", "before-outage-2"] {
        let (status, headers, body) = read(a.post(&http, key, &json!({"key": key})).await).await;
        assert_queued(key, status, &headers, &body, key);
        acknowledged.push(key.to_owned());
    }

    redis.stop();
    assert!(!redis.ping(), "redis must be down now");

    // Mutations would have to be queued, and cannot be stored: 503 JSON, never 202, and quickly.
    let refused = ["during-outage-1", "during-outage-2", "during-outage-3"];
    for key in refused {
        let started = Instant::now();
        let (status, headers, body) = read(a.post(&http, key, &json!({"key": key})).await).await;
        assert_eq!(status, 503, "{key} while redis is down: {body}");
        assert_eq!(
            header(&headers, "content-type"),
            Some("application/json"),
            "{key}"
        );
        assert_eq!(json_of(&body)["error"], "not_stored", "{key}: {body}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{key}: the 503 took {:?}",
            started.elapsed()
        );
    }
    // Reads still come from this instance's memory.
    let (status, headers, body) = read(get_profile().await.expect("GET profile")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        header(&headers, "cache-status"),
        Some("outpost; hit; detail=offline")
    );
    assert_eq!(body, profile);

    // Redis comes back (same port, AOF): outpost reconnects by itself.
    redis.restart();
    let recovered_key = "after-outage-1";
    let started = Instant::now();
    let mut answers = Vec::new();
    loop {
        let (status, headers, body) = read(
            a.post(&http, recovered_key, &json!({"key": recovered_key}))
                .await,
        )
        .await;
        if status == 202 {
            assert_queued(recovered_key, status, &headers, &body, recovered_key);
            break;
        }
        assert_eq!(status, 503, "while reconnecting: {body}");
        answers.push(status);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "outpost did not recover within 20 s of redis restarting ({} 503s)",
            answers.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    acknowledged.push(recovered_key.to_owned());
    let key = "after-outage-2";
    let (status, headers, body) = read(a.post(&http, key, &json!({"key": key})).await).await;
    assert_queued(key, status, &headers, &body, key);
    acknowledged.push(key.to_owned());
    let status = a.status(&http).await;
    assert_eq!(status["queue_depth"], 4, "{status}");

    upstream.restart().await;
    upstream
        .wait_applied(acknowledged.len(), REPLAY_TIMEOUT)
        .await;
    wait_queue_depth(&a, &http, 0, "the queue drained").await;
    let applied: Vec<String> = upstream.applied().into_iter().map(|a| a.key).collect();
    assert_eq!(
        applied, acknowledged,
        "every acknowledged write, exactly once, in order"
    );
    for key in refused {
        assert_eq!(
            upstream.seen_requests_for(key),
            0,
            "{key} got a 503: it was not stored and must never be sent"
        );
    }
}

#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test(flavor = "multi_thread")]
async fn one_idempotency_key_sent_to_two_instances_is_queued_once_and_applied_once() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    upstream.stop().await;
    let a = Instance::start("a", &redis, &upstream, "").await;
    let b = Instance::start("b", &redis, &upstream, "").await;
    let http = client();
    let key = "checkout-7f3a";
    let body = json!({"cart": 7, "total": "12.50"});

    let (status, headers_a, text_a) = read(a.post(&http, key, &body).await).await;
    assert_queued("first send, via A", status, &headers_a, &text_a, key);
    let (status, headers_b, text_b) = read(b.post(&http, key, &body).await).await;
    assert_queued("second send, via B", status, &headers_b, &text_b, key);
    assert_eq!(json_of(&text_a), json_of(&text_b), "the same 202 from both");
    for instance in [&a, &b] {
        let status = instance.status(&http).await;
        assert_eq!(status["queue_depth"], 1, "one queue entry: {status}");
    }
    let resp = http
        .get(b.url(&format!("/_outpost/mutations/{key}")))
        .send()
        .await
        .expect("mutation status via B");
    let (status, _, text) = read(resp).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(json_of(&text)["status"], "queued", "{text}");
    // The key with another body is refused by either instance.
    let (status, _, text) = read(b.post(&http, key, &json!({"cart": 8})).await).await;
    assert_eq!(status, 422, "{text}");

    // The same key sent to both instances at the same moment: still one entry. (A 409 "still
    // being stored" is allowed for one of the two; a second queue entry is not.)
    let racing: Vec<String> = (0..8).map(|n| format!("race-{n}")).collect();
    for key in &racing {
        let body = json!({"race": key});
        let (via_a, via_b) = tokio::join!(a.post(&http, key, &body), b.post(&http, key, &body));
        let (via_a, via_b) = (read(via_a).await, read(via_b).await);
        let mut queued = 0;
        for (name, (status, headers, text)) in [("A", &via_a), ("B", &via_b)] {
            match status {
                202 => {
                    assert_queued(&format!("{key} via {name}"), *status, headers, text, key);
                    queued += 1;
                }
                409 => {}
                other => panic!("{key} via {name}: expected 202 or 409, got {other}: {text}"),
            }
        }
        assert!(queued >= 1, "{key}: at least one send must be acknowledged");
    }
    for instance in [&a, &b] {
        let status = instance.status(&http).await;
        assert_eq!(
            status["queue_depth"],
            1 + racing.len(),
            "one queue entry per key: {status}"
        );
    }

    upstream.restart().await;
    upstream
        .wait_applied(1 + racing.len(), REPLAY_TIMEOUT)
        .await;
    for instance in [&a, &b] {
        wait_queue_depth(instance, &http, 0, "the queue drained").await;
    }
    let applied = upstream.applied();
    assert_eq!(
        applied.len(),
        1 + racing.len(),
        "applied once each: {applied:?}"
    );
    assert_eq!(applied[0].key, key);
    assert_eq!(applied[0].body_json(), body);
    let mut applied_racing: Vec<String> = applied[1..].iter().map(|a| a.key.clone()).collect();
    applied_racing.sort();
    assert_eq!(applied_racing, racing);

    // Once applied, both instances answer the key with the upstream's stored answer.
    for instance in [&a, &b] {
        let (status, headers, text) = read(instance.post(&http, key, &body).await).await;
        assert_eq!(status, 201, "instance {}: {text}", instance.name);
        assert_eq!(header(&headers, "idempotent-replayed"), Some("true"));
        assert_eq!(header(&headers, "idempotency-key"), Some(key));
        assert_eq!(
            header(&headers, "cache-status"),
            Some("outpost; hit; detail=idempotent-replay")
        );
        assert_eq!(json_of(&text)["applied"], true, "{text}");
    }
    assert_eq!(upstream.applied().len(), 1 + racing.len());
}

#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test(flavor = "multi_thread")]
async fn a_replay_slower_than_the_lease_keeps_its_partition_and_no_other_instance_sends_the_item_meanwhile()
 {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    upstream.stop().await;
    let a = Instance::start("a", &redis, &upstream, "").await;
    let b = Instance::start("b", &redis, &upstream, "").await;
    let http = client();
    let mut accepted = Vec::new();
    for n in 0..4 {
        let instance = [&a, &b][n % 2];
        let key = format!("slow-{n}-via-{}", instance.name);
        let body = json!({"n": n});
        let (status, headers, text) = read(instance.post(&http, &key, &body).await).await;
        assert_queued(&key, status, &headers, &text, &key);
        accepted.push(key);
    }

    // The first replayed request takes four leases' time to be answered; both instances are
    // online meanwhile and look for work every half second.
    let answer_delay = Duration::from_secs(4);
    upstream.script(
        "/apply",
        vec![
            ScriptedResponse::passthrough().delay(answer_delay),
            ScriptedResponse::passthrough(),
        ],
    );
    upstream.restart().await;
    let first = upstream.wait_requests("/apply", 1, REPLAY_TIMEOUT).await;
    assert_eq!(
        first[0].header("idempotency-key"),
        Some(accepted[0].as_str())
    );
    tokio::time::sleep(answer_delay - Duration::from_secs(1)).await;
    let sent: Vec<String> = upstream
        .requests_to("/apply")
        .iter()
        .filter_map(|r| r.header("idempotency-key").map(str::to_owned))
        .collect();
    assert_eq!(
        sent,
        [accepted[0].clone()],
        "while the head item is in flight, its lease must hold: nothing else may be sent"
    );

    let applied = upstream.wait_applied(accepted.len(), REPLAY_TIMEOUT).await;
    for instance in [&a, &b] {
        wait_queue_depth(instance, &http, 0, "the shared queue drained").await;
    }
    let applied: Vec<String> = applied.into_iter().map(|a| a.key).collect();
    assert_eq!(applied, accepted, "applied once each, in acceptance order");
    for key in &accepted {
        let sends = upstream
            .requests_to("/apply")
            .iter()
            .filter(|r| r.header("idempotency-key") == Some(key.as_str()))
            .count();
        assert_eq!(sends, 1, "{key} was sent {sends} times");
    }
}

/// After a 401 on replay, the item waits for fresh credentials; the app's next request may reach
/// any instance, not only the one replaying the partition.
#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test]
async fn fresh_credentials_offered_to_another_instance_release_a_mutation_waiting_after_a_401() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    upstream.script(
        "/apply/orders",
        vec![
            ScriptedResponse::json(401, json!({"error": "token expired"})),
            ScriptedResponse::passthrough(),
        ],
    );
    upstream.stop().await;
    // Only A runs while the item is queued and replayed, so A holds the partition. Opaque
    // tokens name no principal: one user, any fresh credentials release the item.
    let one_user = r#"auth_principal = "any""#;
    let a = Instance::start_with("a", &redis, &upstream, "", one_user).await;
    let http = client();
    let resp = http
        .post(a.url("/apply/orders"))
        .header("idempotency-key", "auth-elsewhere")
        .header("authorization", "Bearer old-token")
        .json(&json!({"cart": 1}))
        .send()
        .await
        .expect("POST via A");
    let (status, headers, text) = read(resp).await;
    assert_queued("queued via A", status, &headers, &text, "auth-elsewhere");
    upstream.restart().await;
    let doc_url = a.url("/_outpost/mutations/auth-elsewhere");
    eventually(REPLAY_TIMEOUT, "auth_required after the 401", || async {
        let doc: Value = http
            .get(&doc_url)
            .header("authorization", "Bearer old-token")
            .send()
            .await
            .expect("status")
            .json()
            .await
            .expect("json");
        doc["status"] == "auth_required"
    })
    .await;

    // B starts now; the app's next request, with fresh credentials, reaches B.
    let b = Instance::start_with("b", &redis, &upstream, "", one_user).await;
    eventually(REPLAY_TIMEOUT, "released via B", || async {
        let resp = http
            .get(b.url("/echo/profile"))
            .header("authorization", "Bearer new-token")
            .send()
            .await
            .expect("GET via B");
        assert_eq!(resp.status(), 200);
        !upstream.applied().is_empty()
    })
    .await;
    let applied = upstream.applied();
    assert_eq!(applied.len(), 1, "applied once");
    assert_eq!(applied[0].key, "auth-elsewhere");
    assert_eq!(
        applied[0].authorization.as_deref(),
        Some("Bearer new-token")
    );
    let sent: Vec<Option<String>> = upstream
        .requests_to("/apply/orders")
        .iter()
        .map(|r| r.header("authorization").map(str::to_string))
        .collect();
    assert_eq!(
        sent,
        [
            Some("Bearer old-token".to_string()),
            Some("Bearer new-token".to_string())
        ],
        "refused once with the old token, then replayed once with the new one"
    );
}

/// A write forwarded through instance A (upstream online) and retried with its key through B
/// the moment A's answer arrives: B gets the stored answer (or 409 while A is storing it),
/// and the upstream, which ignores `Idempotency-Key`, applies it once. Found by a hostile
/// probe: the answer used to reach Redis after the app had it, and B sent the write again in
/// about half the tries.
#[tokio::test(flavor = "multi_thread")]
async fn a_forwarded_write_retried_through_another_instance_right_after_its_answer_is_applied_once()
{
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let a = Instance::start("a", &redis, &upstream, "").await;
    let b = Instance::start("b", &redis, &upstream, "").await;
    let http = client();
    for n in 0..20 {
        let key = format!("fwd-ab-{n}");
        let body = json!({"n": n});
        let (status, _, text) = read(a.post(&http, &key, &body).await).await;
        assert_eq!(status, 201, "{key} forwarded via A: {text}");
        let deadline = Instant::now() + Duration::from_secs(10);
        let (status, headers, text) = loop {
            let (status, headers, text) = read(b.post(&http, &key, &body).await).await;
            if status != 409 || Instant::now() > deadline {
                break (status, headers, text);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let sent = upstream
            .requests()
            .iter()
            .filter(|r| r.header("idempotency-key") == Some(key.as_str()))
            .count();
        assert_eq!(
            sent, 1,
            "{key}: the retry via B was sent again ({status} {text})"
        );
        assert_eq!(status, 201, "{key}: the stored answer via B: {text}");
        assert_eq!(
            headers
                .get("idempotent-replayed")
                .and_then(|v| v.to_str().ok()),
            Some("true"),
            "{key}: {headers:?}"
        );
    }
}
