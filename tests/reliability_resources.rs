//! Reliability suite, resource faults (issue #21, point 3), against the real `outpost` binary:
//!
//! - the queue limits (`queue.max_depth`, `queue.max_bytes`): `503 queue_full` with
//!   `Retry-After` and nothing stored, never a 202 that is dropped; pass-through forwards are
//!   not limited; room again once the queue drains; the same across two instances on one Redis;
//! - a full disk (tmpfs, needs `mount`) and an unwritable store (Redis made a read-only
//!   replica): new writes get `503 not_stored` with `Retry-After`, cached reads go on, and
//!   writes are accepted again without a restart once the store can write;
//! - memory under a burst of concurrent large bodies and under 10 000 idle connections, read
//!   from `/proc/PID/status` of the outpost process and printed as `RELIABILITY` figures; only a
//!   generous bound is asserted.
//!
//! (Disk-full recovery of acknowledged writes in order is in `outbox.rs` and `exactly_once.rs`.)

mod common;

use std::time::Duration;

use common::reliability::report;
use common::*;
use serde_json::{Value, json};
use tokio::net::TcpStream;

const REPLAY_TIMEOUT: Duration = Duration::from_secs(30);

/// VmRSS and VmHWM (peak) of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn post(
    s: &setup::Outpost,
    path: &str,
    key: &str,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    s.http
        .post(s.url(path))
        .header("Idempotency-Key", key)
        .header("Content-Type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .expect("POST through outpost")
}

/// Checks a `503 queue_full` answer and returns its JSON.
async fn expect_queue_full(resp: reqwest::Response) -> Value {
    assert_eq!(resp.status(), 503);
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("5")
    );
    let body: Value = resp.json().await.expect("JSON error");
    assert_eq!(body["error"], "queue_full", "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("queue is full")),
        "{body}"
    );
    body
}

async fn queue_depth(s: &setup::Outpost) -> u64 {
    let status: Value = s
        .http
        .get(s.admin_url("/status"))
        .send()
        .await
        .expect("admin /status")
        .json()
        .await
        .expect("JSON");
    status["queue_depth"].as_u64().expect("queue_depth")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_queue_limits_writes_get_503_queue_full_nothing_is_stored_and_pass_through_is_not_limited()
 {
    let config = format!(
        "{FAST}\n[queue]\nmax_body_bytes = 1000\nmax_depth = 5\nmax_bytes = 3000\n\n\
         [[route]]\npath = \"/apply/direct/\"\nwrite = \"pass-through\"\n"
    );
    let s = setup::Outpost::offline(&config).await;
    let big = "b".repeat(900);
    // Bytes: three 900-byte bodies fit in 3000, a fourth does not.
    for i in 0..3 {
        let resp = post(&s, "/apply/limit", &format!("big-{i}"), big.clone()).await;
        assert_eq!(resp.status(), 202, "big-{i}");
    }
    let refused = expect_queue_full(post(&s, "/apply/limit", "big-3", big.clone()).await).await;
    assert_eq!(
        (
            refused["queue_depth"].as_u64(),
            refused["queue_bytes"].as_u64()
        ),
        (Some(3), Some(2700)),
        "{refused}"
    );
    assert_eq!(
        (refused["max_depth"].as_u64(), refused["max_bytes"].as_u64()),
        (Some(5), Some(3000))
    );
    // Depth: two small ones fit (5 items), a sixth does not.
    for i in 0..2 {
        let resp = post(&s, "/apply/limit", &format!("small-{i}"), "s").await;
        assert_eq!(resp.status(), 202, "small-{i}");
    }
    let refused = expect_queue_full(post(&s, "/apply/limit", "small-2", "s").await).await;
    assert_eq!(refused["queue_depth"].as_u64(), Some(5), "{refused}");
    // Refused keys were not stored: unknown to the status endpoint, and not queued.
    for key in ["big-3", "small-2"] {
        let resp = s
            .http
            .get(s.url(&format!("/_outpost/mutations/{key}")))
            .send()
            .await
            .expect("status document");
        assert_eq!(resp.status(), 404, "{key} was stored");
    }
    assert_eq!(queue_depth(&s).await, 5);

    // The upstream is back: pass-through forwards are not limited even while the queue is full
    // (the queue drains meanwhile, so they are sent before it is empty).
    s.upstream.restart().await;
    let resp = post(&s, "/apply/direct/x", "direct-1", "d").await;
    assert!(
        resp.status().is_success(),
        "pass-through: {}",
        resp.status()
    );

    // Drained: every acknowledged write applied once; the refused ones never.
    let applied = s.upstream.wait_applied(6, REPLAY_TIMEOUT).await;
    let mut keys: Vec<String> = applied.iter().map(|a| a.key.clone()).collect();
    keys.sort();
    assert_eq!(
        keys,
        ["big-0", "big-1", "big-2", "direct-1", "small-0", "small-1"]
    );
    eventually(REPLAY_TIMEOUT, "drained", || async {
        queue_depth(&s).await == 0
    })
    .await;
    // Room again: the refused write, retried with its key, goes through.
    let resp = post(&s, "/apply/limit", "small-2", "s").await;
    assert!(
        resp.status().is_success(),
        "retry after the drain: {}",
        resp.status()
    );
    s.upstream.wait_applied(7, REPLAY_TIMEOUT).await;
    assert_eq!(s.upstream.seen_requests_for("big-3"), 0);
    report(
        "resources",
        "queue limit (embedded)",
        json!({"accepted": 5, "refused_queue_full": 2, "applied": 7, "lost": 0}),
    );
}

#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_limit_holds_across_two_instances_on_one_redis() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    upstream.stop().await;
    let config = format!("{FAST}\n[queue]\nmax_depth = 4\n");
    let dirs = (temp_dir(), temp_dir(), temp_dir());
    let path = dirs.0.path().join("outpost.toml");
    std::fs::write(&path, &config).expect("write config");
    let start = |data: std::path::PathBuf| {
        let (path, up, redis) = (path.display().to_string(), upstream.url(), redis.url());
        async move {
            OutpostProcess::start(
                &["--config", &path, "--upstream", &up, "--redis", &redis],
                &data,
            )
            .await
        }
    };
    let a = start(dirs.1.path().to_path_buf()).await;
    let b = start(dirs.2.path().to_path_buf()).await;
    let http = client();
    let send = |o: &OutpostProcess, key: &str| {
        http.post(format!("{}/apply/shared", o.url()))
            .header("Idempotency-Key", key)
            .body(format!("body of {key}"))
            .send()
    };
    for (o, key) in [(&a, "a-1"), (&b, "b-1"), (&a, "a-2"), (&b, "b-2")] {
        let resp = send(o, key).await.expect("POST");
        assert_eq!(resp.status(), 202, "{key}");
    }
    // Each instance reads the shared totals at least every 100 ms (admission.rs).
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (o, key) in [(&a, "a-3"), (&b, "b-3")] {
        let refused = expect_queue_full(send(o, key).await.expect("POST")).await;
        assert_eq!(refused["queue_depth"].as_u64(), Some(4), "{key}: {refused}");
    }
    upstream.restart().await;
    let applied = upstream.wait_applied(4, REPLAY_TIMEOUT).await;
    let mut keys: Vec<&str> = applied.iter().map(|a| a.key.as_str()).collect();
    keys.sort();
    assert_eq!(keys, ["a-1", "a-2", "b-1", "b-2"]);
    assert_eq!(
        upstream.seen_requests_for("a-3") + upstream.seen_requests_for("b-3"),
        0
    );
    report(
        "resources",
        "queue limit (redis, two instances)",
        json!({"accepted": 4, "refused_queue_full": 2, "applied": 4, "lost": 0}),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_concurrent_large_bodies_keeps_memory_bounded() {
    // 10x a burst of 4 writers: 40 concurrent writes at the queue's body limit (queued) and 40
    // at four times the limit (refused 413 while offline), upstream down.
    const LIMIT: usize = 1024 * 1024;
    const WRITERS: usize = 40;
    let config = format!("{FAST}\n[queue]\nmax_body_bytes = {LIMIT}\n");
    let s = setup::Outpost::offline(&config).await;
    let pid = s.outpost.pid().expect("pid");
    let (rss_before, _) = memory_kib(pid);
    let fits = bytes::Bytes::from(vec![b'f'; LIMIT]);
    let too_big = bytes::Bytes::from(vec![b't'; 4 * LIMIT]);
    let mut tasks = Vec::new();
    for i in 0..WRITERS {
        for (kind, body) in [("fits", fits.clone()), ("big", too_big.clone())] {
            let url = s.url(&format!("/apply/burst/{kind}/{i}"));
            tasks.push(tokio::spawn(async move {
                // A connection of its own: one outpost closes after a 413 is never reused.
                let http = client_builder()
                    .pool_max_idle_per_host(0)
                    .build()
                    .expect("client");
                http.post(url)
                    .header("Idempotency-Key", format!("{kind}-{i}"))
                    .body(body)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or_else(|e| {
                        eprintln!("{kind}-{i}: {e:?}");
                        0
                    })
            }));
        }
    }
    let mut statuses = std::collections::BTreeMap::new();
    for t in tasks {
        *statuses.entry(t.await.expect("task")).or_insert(0) += 1;
    }
    let (rss_after, peak) = memory_kib(pid);
    eprintln!("statuses {statuses:?}; RSS {rss_before} KiB -> {rss_after} KiB, peak {peak} KiB");
    assert_eq!(statuses.get(&202), Some(&WRITERS), "{statuses:?}");
    // The too-large ones are refused (413), or cut off (0) when outpost answers before the
    // client finished sending.
    assert_eq!(
        statuses.get(&413).copied().unwrap_or(0) + statuses.get(&0).copied().unwrap_or(0),
        WRITERS,
        "{statuses:?}"
    );
    // Sent: 200 MiB. Held at once at most: each body up to the limit. Generous bound.
    assert!(peak < 512 * 1024, "peak RSS {peak} KiB");
    report(
        "resources",
        "burst of large bodies",
        json!({
            "writers": 2 * WRITERS,
            "mib_sent": (WRITERS * 5 * LIMIT) / (1024 * 1024),
            "rss_before_kib": rss_before,
            "rss_after_kib": rss_after,
            "rss_peak_kib": peak,
        }),
    );
}

/// Raise this process's open-file limit to its hard limit (10 000 client sockets).
fn raise_nofile() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    setrlimit(Resource::Nofile, limit).expect("raise RLIMIT_NOFILE");
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_over_the_limit_are_closed_cleanly_and_outpost_keeps_serving()
{
    const IDLE: usize = 10_000;
    let nofile = raise_nofile();
    if nofile < IDLE as u64 + 1000 {
        eprintln!(
            "SKIPPED: open-file hard limit {nofile} cannot hold {IDLE} connections on both ends"
        );
        return;
    }
    // outpost inherits the raised limit; its budget is below the connections opened.
    let config = "[proxy]\nmax_connections = 2000\nheader_read_timeout = \"5m\"\n";
    let s = setup::Outpost::in_front_of(Upstream::start().await, config).await;
    let pid = s.outpost.pid().expect("pid");
    let (rss_before, _) = memory_kib(pid);
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        match TcpStream::connect(s.outpost.addr()).await {
            Ok(c) => idle.push(c),
            Err(e) => panic!("connect {} failed: {e}", idle.len()),
        }
    }
    let status = || async {
        let v: Value = s
            .http
            .get(s.admin_url("/status"))
            .send()
            .await
            .expect("the admin listener answers")
            .json()
            .await
            .expect("JSON");
        v
    };
    eventually(
        Duration::from_secs(60),
        "idle connections over the limit closed",
        || async { status().await["connections_evicted"].as_u64() >= Some((IDLE - 2000) as u64) },
    )
    .await;
    let after = status().await;
    assert!(after["connections_open"].as_u64() <= Some(2000), "{after}");
    // Still serving, with all of them still connected from our side.
    for i in 0..5 {
        let resp = s
            .http
            .get(s.url(&format!("/echo/still-{i}")))
            .send()
            .await
            .expect("a request while 10 000 idle connections were opened");
        assert_eq!(resp.status(), 200);
    }
    let (rss_after, peak) = memory_kib(pid);
    assert!(peak < 512 * 1024, "peak RSS {peak} KiB");
    assert!(
        !s.outpost.log().contains("accept failed"),
        "{}",
        s.outpost.log_tail(20)
    );
    report(
        "resources",
        "10000 idle connections",
        json!({
            "connections": IDLE,
            "max_connections": 2000,
            "evicted": after["connections_evicted"],
            "refused": after["connections_refused"],
            "rss_before_kib": rss_before,
            "rss_after_kib": rss_after,
            "rss_peak_kib": peak,
        }),
    );
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_full_disk_writes_get_503_with_retry_after_cached_reads_go_on_and_writes_resume_without_restart()
 {
    let tmpfs = match Tmpfs::mount("4m") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("SKIPPED: cannot mount a tmpfs ({e}); run as root to exercise a full disk");
            return;
        }
    };
    let upstream = Upstream::start().await;
    let config_dir = temp_dir();
    let path = config_dir.path().join("outpost.toml");
    std::fs::write(&path, FAST).expect("write config");
    let data = tmpfs.path().join("data");
    let (path, url) = (path.display().to_string(), upstream.url());
    let mut outpost = OutpostProcess::start(&["--config", &path, "--upstream", &url], &data).await;
    let pid = outpost.pid();
    let http = client();
    let get = || http.get(format!("{}/echo/cached", outpost.url())).send();
    assert_eq!(get().await.expect("online read").status(), 200);
    upstream.stop().await;
    // Wait until the copy is in the durable tier too, then fill the disk.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let filler = tmpfs.path().join("filler");
    let mut written = 0u64;
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&filler).expect("create filler");
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {
            written += chunk.len() as u64;
        }
        let _ = f.sync_all();
    }
    let body = "w".repeat(64 * 1024);
    let mut refused = None;
    for i in 0..100 {
        let resp = http
            .post(format!("{}/apply/disk/{i}", outpost.url()))
            .header("Idempotency-Key", format!("disk-{i}"))
            .body(body.clone())
            .send()
            .await
            .expect("POST");
        if resp.status() == 503 {
            refused = Some(resp);
            break;
        }
        assert_eq!(
            resp.status(),
            202,
            "a write is stored or refused, nothing else"
        );
    }
    let refused = refused.expect("a write refused on the full disk");
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let doc: Value = refused.json().await.expect("JSON");
    assert_eq!(doc["error"], "not_stored", "{doc}");
    // Reads go on: the cached copy is served offline.
    let resp = get().await.expect("offline read on a full disk");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("cache-status")
            .and_then(|v| v.to_str().ok()),
        Some("outpost; hit; detail=offline")
    );
    // Space comes back; no restart.
    std::fs::remove_file(&filler).expect("free the space");
    let mut resumed = false;
    for _ in 0..150 {
        let resp = http
            .post(format!("{}/apply/disk/after", outpost.url()))
            .header("Idempotency-Key", "disk-after")
            .body("a")
            .send()
            .await
            .expect("POST");
        if resp.status() == 202 {
            resumed = true;
            break;
        }
        assert_eq!(resp.status(), 503);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        resumed,
        "writes resumed after space came back: {}",
        outpost.log_tail(20)
    );
    assert!(outpost.is_running());
    assert_eq!(outpost.pid(), pid, "no restart");
    report(
        "resources",
        "disk full",
        json!({"filler_bytes": written, "reads_served": 1, "resumed_without_restart": 1}),
    );
}

#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_redis_store_gets_503_reads_go_on_and_writes_resume_when_it_is_writable() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let config_dir = temp_dir();
    let data = temp_dir();
    let path = config_dir.path().join("outpost.toml");
    std::fs::write(&path, FAST).expect("write config");
    let (path, url, redis_url) = (path.display().to_string(), upstream.url(), redis.url());
    let outpost = OutpostProcess::start(
        &["--config", &path, "--upstream", &url, "--redis", &redis_url],
        data.path(),
    )
    .await;
    let http = client();
    let get = || http.get(format!("{}/echo/cached", outpost.url())).send();
    assert_eq!(get().await.expect("online read").status(), 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    upstream.stop().await;

    // Redis becomes a read-only replica of a server that does not exist: every write fails.
    let client = redis::Client::open(redis.url()).expect("redis client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    let nowhere = free_port();
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(nowhere)
        .query_async(&mut conn)
        .await
        .expect("REPLICAOF");
    let post = |key: &'static str| {
        http.post(format!("{}/apply/ro", outpost.url()))
            .header("Idempotency-Key", key)
            .body("x")
            .send()
    };
    let resp = post("ro-1").await.expect("POST");
    assert_eq!(resp.status(), 503, "a read-only store cannot take writes");
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let doc: Value = resp.json().await.expect("JSON");
    assert_eq!(doc["error"], "not_stored", "{doc}");
    let resp = get().await.expect("offline read, read-only store");
    assert_eq!(resp.status(), 200, "cached reads go on");

    let _: () = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query_async(&mut conn)
        .await
        .expect("REPLICAOF NO ONE");
    let mut status = 0;
    for _ in 0..100 {
        status = post("ro-2").await.expect("POST").status().as_u16();
        if status == 202 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 202, "writes resume without a restart");
    upstream.restart().await;
    let applied = upstream.wait_applied(1, REPLAY_TIMEOUT).await;
    assert_eq!(applied[0].key, "ro-2");
    assert_eq!(
        upstream.seen_requests_for("ro-1"),
        0,
        "the refused write was never sent"
    );
    report(
        "resources",
        "unwritable store (redis read-only)",
        json!({"refused_not_stored": 1, "reads_served": 1, "resumed_without_restart": 1}),
    );
}
