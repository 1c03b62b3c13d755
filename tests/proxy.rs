//! End-to-end tests of the foundation (issue #3): the transparent proxy, its config, the
//! embedded store behind the read cache, and offline reads.
//!
//! Every test starts the real `outpost` binary in front of a real hyper upstream on loopback
//! ports (see `tests/common`), drives it over HTTP, and checks what the app and the upstream
//! observe. Nothing here talks to a non-loopback address.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt as _, StreamExt as _};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::Message;

const STORED: &str = "outpost; fwd=uri-miss; stored";
const MISS: &str = "outpost; fwd=uri-miss";
const HIT: &str = "outpost; hit";
const HIT_OFFLINE: &str = "outpost; hit; detail=offline";
const HIT_STALE: &str = "outpost; hit; detail=stale-while-revalidate";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A temp dir holding the data directory and the config file of one outpost.
struct Dirs {
    root: tempfile::TempDir,
}

impl Dirs {
    fn new() -> Self {
        Dirs { root: temp_dir() }
    }

    fn data(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// Writes `toml` as `outpost.toml` and returns its path.
    fn config(&self, toml: &str) -> PathBuf {
        write_file(self.root.path(), "outpost.toml", toml)
    }
}

fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// Starts outpost in front of `upstream` (`--upstream` flag) with `toml` as its config file.
async fn start_outpost(upstream: &Upstream, dirs: &Dirs, toml: &str) -> OutpostProcess {
    let config = dirs.config(toml);
    let config = config.display().to_string();
    let url = upstream.url();
    OutpostProcess::start(&["--config", &config, "--upstream", &url], &dirs.data()).await
}

/// Probe quickly so that tests which bring the upstream back do not wait long.
const FAST_PROBE: &str = "[upstream]\nprobe_interval = \"50ms\"\nprobe_interval_max = \"200ms\"\n";

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("response has no {name} header: {:?}", resp.headers()))
        .to_str()
        .expect("header is text")
}

fn cache_status(resp: &reqwest::Response) -> String {
    header(resp, "cache-status").to_owned()
}

async fn get(http: &reqwest::Client, url: &str) -> reqwest::Response {
    http.get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

async fn json_body(resp: reqwest::Response) -> Value {
    let text = resp.text().await.expect("read body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("body is not JSON ({e}): {text:?}"))
}

/// The admin `/status` document.
async fn status(outpost: &OutpostProcess) -> Value {
    let resp = get(&client(), &format!("{}/status", outpost.admin_url())).await;
    assert_eq!(resp.status(), 200, "admin /status");
    json_body(resp).await
}

/// Waits until the durable cache holds at least `n` entries (one per cached response).
async fn wait_cache_entries(outpost: &OutpostProcess, n: u64) {
    eventually(
        Duration::from_secs(10),
        &format!("{n} durable cache entries"),
        || async move { status(outpost).await["cache_entries"].as_u64().unwrap_or(0) >= n },
    )
    .await;
}

/// Asserts the contract's offline miss: 504 `{"error":"upstream_unreachable","cached":false}`.
async fn assert_offline_miss(resp: reqwest::Response, what: &str) {
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT, "{what}");
    assert!(resp.headers().contains_key("cache-status"), "{what}");
    assert_eq!(
        json_body(resp).await,
        json!({"error": "upstream_unreachable", "cached": false}),
        "{what}"
    );
}

/// Sends `request` as raw bytes to `addr` and returns everything read until the end of the
/// response head (or until the peer closes).
async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to outpost");
    stream.write_all(request).await.expect("write request");
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("outpost answered the raw request in time");
    String::from_utf8_lossy(&buf).into_owned()
}

/// Peak resident set size of process `pid` in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    text.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc status")
}

// ---------------------------------------------------------------------------------------------
// Transparent pass-through
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_passes_through_with_hop_by_hop_stripped_and_forwarded_headers_added() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let outpost = start_outpost(&upstream, &dirs, "").await;
    let http = client();

    let methods = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
    ];
    for method in methods {
        let name = method.as_str().to_ascii_lowercase();
        let body = match method {
            Method::GET | Method::HEAD | Method::OPTIONS => String::new(),
            _ => format!("{{\"sent_with\":\"{name}\"}}"),
        };
        let query = "a=1&b=x%20y&header=Connection:x-resp&header=X-Resp:gone&header=X-Kept:yes";
        let url = format!("{}/echo/m/{name}?{query}", outpost.url());
        upstream.clear_requests();
        let resp = http
            .request(method.clone(), &url)
            .header("X-End-To-End", "kept")
            .header("Authorization", "Bearer token-1")
            .header("Connection", "x-custom")
            .header("X-Custom", "must not reach the upstream")
            .header("Keep-Alive", "timeout=5")
            .header("TE", "trailers")
            .header("Proxy-Authorization", "Basic c2VjcmV0")
            .header("Upgrade", "not-asked-for")
            .body(body.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} through outpost: {e}"));
        assert_eq!(resp.status(), 200, "{method}: status");
        assert!(
            resp.headers().contains_key("cache-status"),
            "{method}: every response carries Cache-Status"
        );
        assert_eq!(
            header(&resp, "x-kept"),
            "yes",
            "{method}: end-to-end header"
        );
        assert!(
            !resp.headers().contains_key("x-resp"),
            "{method}: header named in the upstream's Connection must be stripped"
        );

        let seen = upstream.requests();
        assert_eq!(
            seen.len(),
            1,
            "{method}: the upstream saw exactly one request"
        );
        let seen = &seen[0];
        assert_eq!(seen.method, method, "{method}: method");
        assert_eq!(seen.path, format!("/echo/m/{name}"), "{method}: path");
        assert_eq!(seen.query.as_deref(), Some(query), "{method}: query");
        assert_eq!(seen.body_str(), body, "{method}: body");
        assert_eq!(seen.header("x-end-to-end"), Some("kept"), "{method}");
        assert_eq!(
            seen.header("authorization"),
            Some("Bearer token-1"),
            "{method}"
        );
        for hop in [
            "x-custom",
            "keep-alive",
            "te",
            "proxy-authorization",
            "upgrade",
        ] {
            assert!(
                seen.headers.get(hop).is_none(),
                "{method}: hop-by-hop {hop} reached the upstream: {:?}",
                seen.headers
            );
        }
        if let Some(conn) = seen.header("connection") {
            assert!(
                !conn.contains("x-custom"),
                "{method}: Connection reached the upstream as {conn:?}"
            );
        }
        assert_eq!(
            seen.header("host"),
            Some(upstream.addr().to_string().as_str()),
            "{method}: Host is the upstream's"
        );
        assert_eq!(
            seen.header("x-forwarded-for"),
            Some("127.0.0.1"),
            "{method}"
        );
        assert_eq!(seen.header("x-forwarded-proto"), Some("http"), "{method}");
        assert_eq!(
            seen.header("x-forwarded-host"),
            Some(outpost.addr().to_string().as_str()),
            "{method}: X-Forwarded-Host is what the app asked for"
        );
        if matches!(
            method,
            Method::POST | Method::PUT | Method::PATCH | Method::DELETE
        ) {
            let key = seen
                .header("idempotency-key")
                .unwrap_or_else(|| panic!("{method}: forwarded mutation has an Idempotency-Key"));
            assert_eq!(header(&resp, "idempotency-key"), key, "{method}");
        }
        if method != Method::HEAD {
            let echo = json_body(resp).await;
            assert_eq!(echo["method"], method.as_str(), "{method}: echo");
            assert_eq!(echo["query"], query, "{method}: echo");
            assert_eq!(echo["body"], body.as_str(), "{method}: echo");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_download_streams_through_byte_exact_without_being_buffered() {
    const N: u64 = 100 * 1024 * 1024;
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let outpost = start_outpost(&upstream, &dirs, "").await;
    let http = client();
    let pid = outpost.pid().expect("outpost runs");

    let resp = get(&http, &format!("{}/bytes/{N}", outpost.url())).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.content_length(),
        Some(N),
        "Content-Length passes through"
    );
    assert_eq!(
        cache_status(&resp),
        MISS,
        "larger than cache.max_entry_bytes: not stored"
    );
    let mut stream = resp.bytes_stream();
    let mut offset = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("download chunk");
        for (i, b) in chunk.iter().enumerate() {
            let at = offset + i as u64;
            assert_eq!(*b, pattern_byte(at), "byte {at} of the download differs");
        }
        offset += chunk.len() as u64;
    }
    assert_eq!(offset, N, "download length");

    // Streamed, not held whole: the process never came near the body's size.
    let peak_mib = peak_rss_kib(pid) / 1024;
    assert!(
        peak_mib < 80,
        "outpost peaked at {peak_mib} MiB resident for a 100 MiB download"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_download_over_the_cache_entry_limit_streams_through_uncached() {
    const N: u64 = 24 * 1024 * 1024;
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let outpost = start_outpost(&upstream, &dirs, "").await;
    let http = client();
    let url = format!("{}/bytes/{N}?chunked=1", outpost.url());

    let resp = get(&http, &url).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.content_length().is_none(), "no length: chunked");
    let body = resp.bytes().await.expect("chunked download");
    assert_eq!(body.len() as u64, N);
    assert!(
        body.iter()
            .enumerate()
            .all(|(i, b)| *b == pattern_byte(i as u64)),
        "chunked download is byte-exact"
    );

    // Over cache.max_entry_bytes (8 MiB): nothing may have been cached, so offline is a 504.
    upstream.stop().await;
    assert_offline_miss(get(&http, &url).await, "oversized body offline").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20_mb_upload_larger_than_the_queue_limit_streams_through_intact() {
    const N: u64 = 20 * 1024 * 1024;
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let outpost = start_outpost(&upstream, &dirs, "").await;
    let http = client();

    let resp = http
        .put(format!("{}/apply/big", outpost.url()))
        .header("Idempotency-Key", "upload-1")
        .body(pattern_bytes(N))
        .send()
        .await
        .expect("PUT 20 MB");
    assert_eq!(resp.status(), 201, "the upstream applied it");
    assert_eq!(header(&resp, "idempotency-key"), "upload-1");

    let applied = upstream.applied();
    assert_eq!(applied.len(), 1);
    assert_eq!(applied[0].key, "upload-1");
    assert_eq!(applied[0].method, "PUT");
    assert_eq!(applied[0].body.len() as u64, N, "upload length");
    assert!(
        applied[0]
            .body
            .iter()
            .enumerate()
            .all(|(i, b)| *b == pattern_byte(i as u64)),
        "upload arrived byte-exact"
    );
}

// ---------------------------------------------------------------------------------------------
// Offline reads and the cache
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_get_serves_cached_copy_with_cache_status_and_age() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let outpost = start_outpost(&upstream, &dirs, "").await;
    let http = client();
    let url = format!(
        "{}/echo/offline?x=1&header=Set-Cookie:sid%3Dsecret",
        outpost.url()
    );

    let first = get(&http, &url).await;
    assert_eq!(first.status(), 200);
    assert_eq!(cache_status(&first), STORED, "first online fetch");
    assert_eq!(header(&first, "set-cookie"), "sid=secret");
    let first_body = json_body(first).await;
    wait_cache_entries(&outpost, 1).await;

    upstream.stop().await;
    let started = Instant::now();
    let resp = get(&http, &url).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(cache_status(&resp), HIT_OFFLINE);
    let age: u64 = header(&resp, "age").parse().expect("Age is a number");
    assert!(age < 60, "Age {age}");
    assert!(
        !resp.headers().contains_key("set-cookie"),
        "a stored copy never replays Set-Cookie"
    );
    assert_eq!(json_body(resp).await, first_body, "the cached copy");

    // HEAD shares GET's entry.
    let resp = http.head(&url).send().await.expect("HEAD offline");
    assert_eq!(resp.status(), 200);
    assert_eq!(cache_status(&resp), HIT_OFFLINE);

    // Known offline now: the next read is answered from the cache at once.
    let resp = get(&http, &url).await;
    assert_eq!(cache_status(&resp), HIT_OFFLINE);
    assert_eq!(json_body(resp).await, first_body);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "offline reads took {:?}",
        started.elapsed()
    );
    assert_eq!(upstream.requests_to("/echo/offline").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_get_with_nothing_cached_is_504_json() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let outpost = start_outpost(&upstream, &dirs, "").await;
    let http = client();
    upstream.stop().await;

    let url = format!("{}/echo/never-fetched", outpost.url());
    assert_offline_miss(get(&http, &url).await, "first request after the outage").await;
    assert_offline_miss(get(&http, &url).await, "while known offline").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_callers_identity_never_gets_the_first_callers_cached_copy() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let outpost = start_outpost(&upstream, &dirs, "").await;
    let http = client();
    let url = format!("{}/echo/me?cc=private%2C%20max-age%3D60", outpost.url());

    let resp = http
        .get(&url)
        .header("Authorization", "Bearer alice")
        .send()
        .await
        .expect("alice online");
    assert_eq!(cache_status(&resp), STORED);
    let resp = http
        .get(&url)
        .header("Cookie", "session=carol")
        .send()
        .await
        .expect("carol online");
    assert_eq!(cache_status(&resp), STORED);
    wait_cache_entries(&outpost, 2).await;

    upstream.stop().await;
    let others = [
        ("Authorization", "Bearer bob"),
        ("Cookie", "session=mallory"),
        ("X-Nothing", "anonymous"),
    ];
    for (name, value) in others {
        let resp = http
            .get(&url)
            .header(name, value)
            .send()
            .await
            .expect("other caller");
        assert_offline_miss(resp, &format!("caller with {name}: {value}")).await;
    }

    let resp = http
        .get(&url)
        .header("Authorization", "Bearer alice")
        .send()
        .await
        .expect("alice offline");
    assert_eq!(resp.status(), 200);
    assert_eq!(cache_status(&resp), HIT_OFFLINE);
    let body = json_body(resp).await;
    assert_eq!(body["headers"]["authorization"], "Bearer alice");

    let resp = http
        .get(&url)
        .header("Cookie", "session=carol")
        .send()
        .await
        .expect("carol offline");
    assert_eq!(cache_status(&resp), HIT_OFFLINE);
    let body = json_body(resp).await;
    assert_eq!(body["headers"]["cookie"], "session=carol");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_store_answers_and_requests_are_never_served_from_cache() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let outpost = start_outpost(&upstream, &dirs, "").await;
    let http = client();
    let by_response = format!("{}/echo/ns?cc=no-store", outpost.url());
    let by_request = format!("{}/echo/ns-req", outpost.url());
    let control = format!("{}/echo/ns-control", outpost.url());

    let resp = get(&http, &by_response).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(cache_status(&resp), MISS, "no-store answer is not stored");
    let resp = http
        .get(&by_request)
        .header("Cache-Control", "no-store")
        .send()
        .await
        .expect("no-store request");
    assert_eq!(cache_status(&resp), MISS, "no-store request is not stored");
    let resp = get(&http, &control).await;
    assert_eq!(cache_status(&resp), STORED);
    wait_cache_entries(&outpost, 1).await;

    upstream.stop().await;
    let resp = get(&http, &control).await;
    assert_eq!(cache_status(&resp), HIT_OFFLINE, "the control is cached");
    assert_offline_miss(get(&http, &by_response).await, "no-store answer").await;
    assert_offline_miss(get(&http, &by_request).await, "no-store request").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_keeps_one_entry_per_value_of_the_named_request_headers() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let outpost = start_outpost(&upstream, &dirs, "").await;
    let http = client();
    let url = format!("{}/echo/lang?vary=Accept-Language", outpost.url());
    let fetch = |lang: &'static str| {
        let http = http.clone();
        let url = url.clone();
        async move {
            http.get(&url)
                .header("Accept-Language", lang)
                .send()
                .await
                .expect("GET with Accept-Language")
        }
    };

    for lang in ["en", "de"] {
        let resp = fetch(lang).await;
        assert_eq!(cache_status(&resp), STORED, "{lang} online");
    }
    wait_cache_entries(&outpost, 2).await;

    upstream.stop().await;
    for lang in ["en", "de"] {
        let resp = fetch(lang).await;
        assert_eq!(resp.status(), 200, "{lang} offline");
        assert_eq!(cache_status(&resp), HIT_OFFLINE, "{lang} offline");
        let body = json_body(resp).await;
        assert_eq!(
            body["headers"]["accept-language"], lang,
            "{lang}'s own copy"
        );
    }
    assert_offline_miss(fetch("fr").await, "a language never fetched").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_first_route_serves_a_fresh_entry_without_asking_the_upstream() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let toml = "[[route]]\nname = \"catalog\"\npath = \"/echo/cf/\"\nread = \"cache-first\"\ncache_ttl = \"60s\"\n";
    let outpost = start_outpost(&upstream, &dirs, toml).await;
    let http = client();
    let url = format!("{}/echo/cf/items", outpost.url());

    let first = get(&http, &url).await;
    assert_eq!(cache_status(&first), STORED);
    // The copy lands in the cache once its body has streamed through (until then a request
    // may go upstream and store a newer copy).
    wait_cache_entries(&outpost, 1).await;
    let resp = get(&http, &url).await;
    assert_eq!(cache_status(&resp), HIT);
    let cached_body = json_body(resp).await;

    let served = upstream.served_count();
    for _ in 0..3 {
        let resp = get(&http, &url).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(cache_status(&resp), HIT);
        assert!(resp.headers().contains_key("age"));
        assert_eq!(json_body(resp).await, cached_body);
    }
    assert_eq!(
        upstream.served_count(),
        served,
        "fresh hits must not contact the upstream"
    );

    // Other paths keep the default (network-first): they go upstream every time.
    let other = format!("{}/echo/elsewhere", outpost.url());
    get(&http, &other).await;
    let resp = get(&http, &other).await;
    assert_eq!(cache_status(&resp), STORED);
    assert_eq!(upstream.served_count(), served + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_serves_at_once_and_refreshes_in_the_background() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let toml = "[[route]]\npath = \"/echo/swr/\"\nread = \"stale-while-revalidate\"\n";
    let outpost = start_outpost(&upstream, &dirs, toml).await;
    let http = client();
    // max-age=0: every stored copy is stale at once.
    let url = format!("{}/echo/swr/feed?cc=max-age%3D0", outpost.url());

    let first = get(&http, &url).await;
    assert_eq!(cache_status(&first), STORED);
    let first_body = json_body(first).await;
    wait_cache_entries(&outpost, 1).await;

    // From now on the upstream is slow, and has news.
    upstream.script(
        "/echo/swr/",
        vec![
            ScriptedResponse::json(200, json!({"version": "refreshed"}))
                .header("Cache-Control", "max-age=0")
                .delay(Duration::from_millis(1500)),
        ],
    );
    // A slow upstream does not slow the app down: it gets the stale copy at once ...
    let started = Instant::now();
    let resp = get(&http, &url).await;
    let took = started.elapsed();
    assert_eq!(cache_status(&resp), HIT_STALE);
    assert!(resp.headers().contains_key("age"));
    assert!(
        took < Duration::from_millis(1000),
        "stale copy took {took:?} (upstream needs 1.5 s)"
    );
    assert_eq!(json_body(resp).await, first_body);

    // ... and the background refresh replaces the copy (the app never waits for it).
    eventually(
        Duration::from_secs(15),
        "the refreshed copy from the background revalidation",
        || async {
            let resp = get(&http, &url).await;
            assert_eq!(cache_status(&resp), HIT_STALE);
            json_body(resp).await["version"] == "refreshed"
        },
    )
    .await;
    upstream.clear_scripts();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_survives_a_graceful_restart_during_an_outage() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let mut outpost = start_outpost(&upstream, &dirs, "").await;
    let http = client();
    let url = format!("{}/echo/persist?v=graceful", outpost.url());

    let first = get(&http, &url).await;
    assert_eq!(cache_status(&first), STORED);
    let first_body = json_body(first).await;
    wait_cache_entries(&outpost, 1).await;

    outpost.terminate();
    let exit = outpost.wait_exit().await;
    assert!(exit.success(), "graceful exit: {exit}");
    upstream.stop().await;
    outpost.restart().await;

    let resp = get(&http, &url).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(cache_status(&resp), HIT_OFFLINE);
    assert!(resp.headers().contains_key("age"));
    assert_eq!(json_body(resp).await, first_body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_survives_kill_9_once_flushed_during_an_outage() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let mut outpost = start_outpost(&upstream, &dirs, "").await;
    let http = client();
    let url = format!("{}/echo/persist?v=kill9", outpost.url());

    let first = get(&http, &url).await;
    assert_eq!(cache_status(&first), STORED);
    let first_body = json_body(first).await;
    wait_cache_entries(&outpost, 1).await;
    // Cache blobs commit without fsync; the store makes them durable after 1 s without writes
    // (store/embedded/writer.rs, LAZY_FLUSH). Only then must they survive a crash.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    outpost.kill9().await;
    upstream.stop().await;
    outpost.restart().await;

    let resp = get(&http, &url).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(cache_status(&resp), HIT_OFFLINE);
    assert_eq!(json_body(resp).await, first_body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_routes_share_one_copy_but_never_store_private_answers() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let toml = "[[route]]\npath = \"/echo/pub/\"\npublic = true\n";
    let outpost = start_outpost(&upstream, &dirs, toml).await;
    let http = client();
    let shared = format!("{}/echo/pub/news", outpost.url());
    let private = format!("{}/echo/pub/mine?cc=private", outpost.url());

    for url in [&shared, &private] {
        let resp = http
            .get(url)
            .header("Authorization", "Bearer alice")
            .send()
            .await
            .expect("alice online");
        assert_eq!(resp.status(), 200);
    }
    wait_cache_entries(&outpost, 1).await;

    upstream.stop().await;
    let resp = http
        .get(&shared)
        .header("Authorization", "Bearer bob")
        .send()
        .await
        .expect("bob offline");
    assert_eq!(cache_status(&resp), HIT_OFFLINE, "public: one copy for all");
    let resp = http
        .get(&private)
        .header("Authorization", "Bearer alice")
        .send()
        .await
        .expect("alice offline");
    assert_offline_miss(resp, "private answer on a public route").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_times_out_upstream_is_served_from_cache() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let toml = "[upstream]\nrequest_timeout = \"300ms\"\n";
    let outpost = start_outpost(&upstream, &dirs, toml).await;
    let http = client();
    let cached = format!("{}/echo/late/cached", outpost.url());
    let uncached = format!("{}/echo/late/uncached", outpost.url());

    assert_eq!(cache_status(&get(&http, &cached).await), STORED);
    wait_cache_entries(&outpost, 1).await;

    upstream.script(
        "/echo/late/",
        vec![ScriptedResponse::passthrough().delay(Duration::from_secs(3))],
    );
    let started = Instant::now();
    let resp = get(&http, &cached).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(cache_status(&resp), HIT_OFFLINE);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered after {:?}",
        started.elapsed()
    );
    // Marked offline by the timeout; the probe (TCP) finds the upstream up again.
    eventually(Duration::from_secs(10), "back online", || async {
        status(&outpost).await["online"] == true
    })
    .await;
    let resp = get(&http, &uncached).await;
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    upstream.clear_scripts();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_copies_older_than_max_stale_are_not_served_offline() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let toml = "[cache]\nmax_stale = \"1s\"\n";
    let outpost = start_outpost(&upstream, &dirs, toml).await;
    let http = client();
    let url = format!("{}/echo/brief?cc=max-age%3D0", outpost.url());

    assert_eq!(cache_status(&get(&http, &url).await), STORED);
    wait_cache_entries(&outpost, 1).await;
    upstream.stop().await;
    assert_eq!(
        cache_status(&get(&http, &url).await),
        HIT_OFFLINE,
        "within max_stale"
    );
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_offline_miss(get(&http, &url).await, "beyond max_stale").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_durable_cache_evicts_the_least_recently_used_beyond_disk_bytes() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    // Room for two 8000-byte answers, not three.
    let toml = "[cache]\ndisk_bytes = 20000\n";
    let mut outpost = start_outpost(&upstream, &dirs, toml).await;
    let http = client();
    let base = outpost.url();
    let url = |k: &str| format!("{base}/bytes/8000?k={k}");

    for (i, k) in ["a", "b", "c"].into_iter().enumerate() {
        let resp = get(&http, &url(k)).await;
        assert_eq!(cache_status(&resp), STORED, "{k}");
        assert_eq!(resp.bytes().await.expect("body").len(), 8000);
        // One at a time, so that recency is well defined (room for two).
        let stored = (i as u64 + 1).min(2);
        eventually(Duration::from_secs(5), "the copy is stored", || async {
            let s = status(&outpost).await;
            s["cache_bytes"].as_u64().unwrap_or(0) > 0
                && s["cache_entries"].as_u64().unwrap_or(0) >= stored
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bytes = status(&outpost).await["cache_bytes"]
        .as_u64()
        .expect("cache_bytes");
    assert!(bytes <= 20000, "disk tier holds {bytes} bytes");

    outpost.terminate();
    assert!(outpost.wait_exit().await.success());
    upstream.stop().await;
    outpost.restart().await;

    assert_offline_miss(get(&http, &url("a")).await, "least recently used").await;
    for k in ["b", "c"] {
        let resp = get(&http, &url(k)).await;
        assert_eq!(cache_status(&resp), HIT_OFFLINE, "{k}");
        let body = resp.bytes().await.expect("body");
        assert_eq!(body.as_ref(), pattern_bytes(8000).as_slice(), "{k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reserved_prefix_is_answered_by_outpost_and_never_forwarded() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let outpost = start_outpost(&upstream, &dirs, "").await;
    let http = client();

    for path in ["/_outpost/mutations/no-such-key", "/_outpost/anything"] {
        let resp = get(&http, &format!("{}{path}", outpost.url())).await;
        assert_eq!(resp.status(), 404, "{path}");
        assert_eq!(json_body(resp).await["error"], "not_found", "{path}");
    }
    assert_eq!(upstream.served_count(), 0);
}

// ---------------------------------------------------------------------------------------------
// Health
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_brings_the_upstream_back_online() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let outpost = start_outpost(&upstream, &dirs, FAST_PROBE).await;
    let http = client();
    let url = format!("{}/echo/probe", outpost.url());

    assert_eq!(cache_status(&get(&http, &url).await), STORED);
    wait_cache_entries(&outpost, 1).await;
    assert_eq!(status(&outpost).await["online"], true);

    upstream.stop().await;
    assert_eq!(cache_status(&get(&http, &url).await), HIT_OFFLINE);
    assert_eq!(status(&outpost).await["online"], false, "marked offline");
    let before = upstream.requests_to("/echo/probe").len();

    upstream.restart().await;
    // Reads while offline never reach the upstream, so only the probe can find it again.
    eventually(
        Duration::from_secs(15),
        "reads going upstream again",
        || async { cache_status(&get(&http, &url).await).starts_with(MISS) },
    )
    .await;
    assert_eq!(status(&outpost).await["online"], true);
    let resp = get(&http, &url).await;
    assert_eq!(cache_status(&resp), STORED);
    assert!(upstream.requests_to("/echo/probe").len() > before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_path_is_what_the_probe_asks_while_offline() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let toml = "[upstream]\nprobe_path = \"/echo/health\"\nprobe_interval = \"50ms\"\nprobe_interval_max = \"200ms\"\n";
    let outpost = start_outpost(&upstream, &dirs, toml).await;
    let http = client();
    let url = format!("{}/echo/p2", outpost.url());

    // A probe answer of 500 or more does not count as online.
    upstream.script("/echo/health", vec![ScriptedResponse::new(503)]);
    upstream.stop().await;
    assert_offline_miss(get(&http, &url).await, "upstream stopped").await;
    upstream.restart().await;
    upstream
        .wait_requests("/echo/health", 2, Duration::from_secs(10))
        .await;
    assert_eq!(
        status(&outpost).await["online"],
        false,
        "503 probes keep it offline"
    );
    assert_offline_miss(get(&http, &url).await, "still offline").await;

    upstream.clear_scripts();
    eventually(
        Duration::from_secs(10),
        "online after a good probe",
        || async { status(&outpost).await["online"] == true },
    )
    .await;
    let probes = upstream.requests_to("/echo/health");
    assert!(probes.iter().all(|r| r.method == Method::GET));
    assert_eq!(probes[0].header("user-agent"), Some("outpost-probe"));
    assert_eq!(cache_status(&get(&http, &url).await), STORED);
}

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

#[test]
fn check_config_accepts_a_valid_file() {
    let dir = temp_dir();
    let path = write_file(
        dir.path(),
        "ok.toml",
        "[proxy]\nlisten = \"127.0.0.1:18080\"\n\n[[route]]\npath = \"/api/\"\nread = \"cache-first\"\n",
    );
    let out = run_outpost(&["check-config", path.to_str().expect("utf-8 path")]);
    assert_eq!(out.code(), Some(0), "stderr: {}", out.stderr_str());
}

#[test]
fn check_config_exits_2_naming_file_line_and_unknown_key() {
    let dir = temp_dir();
    let path = write_file(
        dir.path(),
        "unknown.toml",
        "[proxy]\nlisten = \"127.0.0.1:18080\"\nlisten_typo = 3\n",
    );
    let out = run_outpost(&["check-config", path.to_str().expect("utf-8 path")]);
    let stderr = out.stderr_str();
    assert_eq!(out.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("listen_typo"), "names the key: {stderr}");
    assert!(
        stderr.contains("unknown.toml:3"),
        "names file and line: {stderr}"
    );
}

#[test]
fn check_config_exits_2_naming_file_line_and_key_of_a_bad_value() {
    let dir = temp_dir();
    let path = write_file(
        dir.path(),
        "badvalue.toml",
        "[upstream]\nurl = \"http://127.0.0.1:1\"\nconnect_timeout = \"soon\"\n",
    );
    let out = run_outpost(&["check-config", path.to_str().expect("utf-8 path")]);
    let stderr = out.stderr_str();
    assert_eq!(out.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("upstream.connect_timeout"),
        "names the key: {stderr}"
    );
    assert!(
        stderr.contains("badvalue.toml:3"),
        "names file and line: {stderr}"
    );

    // A value that parses but does not validate is located too.
    let path = write_file(
        dir.path(),
        "scheme.toml",
        "[upstream]\n\nurl = \"ftp://x\"\n",
    );
    let out = run_outpost(&["check-config", path.to_str().expect("utf-8 path")]);
    let stderr = out.stderr_str();
    assert_eq!(out.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("upstream.url"), "names the key: {stderr}");
    assert!(
        stderr.contains("scheme.toml:3"),
        "names file and line: {stderr}"
    );
}

#[test]
fn serve_with_a_bad_config_exits_2_naming_the_key() {
    let dir = temp_dir();
    let path = write_file(
        dir.path(),
        "bad.toml",
        "[cache]\nenabled = true\nmax_entry_byte = 5\n",
    );
    let data = dir.path().join("data");
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let out = run_outpost_timeout(
        &[
            "serve",
            "--config",
            path.to_str().expect("utf-8 path"),
            "--listen",
            &listen,
            "--admin-listen",
            &admin,
            "--data-dir",
            data.to_str().expect("utf-8 path"),
        ],
        Duration::from_secs(20),
    );
    let stderr = out.stderr_str();
    assert_eq!(out.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("max_entry_byte"), "names the key: {stderr}");
    assert!(
        stderr.contains("bad.toml:3"),
        "names file and line: {stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// Not an open proxy
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_foreign_hosts_are_refused_and_never_reach_the_upstream() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let outpost = start_outpost(&upstream, &dirs, "").await;

    let absolute = raw_exchange(
        outpost.addr(),
        b"GET http://example.com/echo/foreign HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        absolute.starts_with("HTTP/1.1 403"),
        "absolute-form for a foreign host: {absolute:?}"
    );

    let connect = raw_exchange(
        outpost.addr(),
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    )
    .await;
    assert!(connect.starts_with("HTTP/1.1 403"), "CONNECT: {connect:?}");
    assert_eq!(upstream.served_count(), 0, "the upstream saw nothing");

    // Absolute-form naming the upstream itself is an ordinary request.
    let own = format!(
        "GET http://{}/echo/own HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        upstream.addr(),
        upstream.addr()
    );
    let own = raw_exchange(outpost.addr(), own.as_bytes()).await;
    assert!(
        own.starts_with("HTTP/1.1 200"),
        "absolute-form for the upstream: {own:?}"
    );
    assert_eq!(upstream.requests_to("/echo/own").len(), 1);
    assert_eq!(upstream.served_count(), 1);
}

// ---------------------------------------------------------------------------------------------
// Protocols: TLS, WebSocket, h2c
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_with_a_private_ca_works_over_h2() {
    let upstream = Upstream::start_tls().await;
    assert!(upstream.url().starts_with("https://localhost:"));
    let dirs = Dirs::new();
    let toml = format!(
        "[upstream]\nurl = \"{}\"\nca_file = \"{}\"\n",
        upstream.url(),
        upstream.ca_pem_path().display()
    );
    let config = dirs.config(&toml);
    let config = config.display().to_string();
    let outpost = OutpostProcess::start(&["--config", &config], &dirs.data()).await;
    let http = client();

    let resp = get(&http, &format!("{}/echo/tls?q=1", outpost.url())).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(cache_status(&resp), STORED);
    let echo = json_body(resp).await;
    assert_eq!(echo["path"], "/echo/tls");
    assert_eq!(echo["query"], "q=1");
    assert_eq!(echo["version"], "HTTP/2.0", "HTTP/2 by ALPN");

    let resp = http
        .post(format!("{}/apply/tls", outpost.url()))
        .body("over tls")
        .send()
        .await
        .expect("POST over TLS");
    assert_eq!(resp.status(), 201);
    let applied = upstream.applied();
    assert_eq!(applied.len(), 1);
    assert_eq!(applied[0].body_str(), "over tls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_terminates_tls_when_given_a_certificate() {
    let upstream = Upstream::start().await;
    let pki = TestPki::generate();
    let dirs = Dirs::new();
    let toml = format!(
        "[proxy]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        pki.cert_pem_path().display(),
        pki.key_pem_path().display()
    );
    let outpost = start_outpost(&upstream, &dirs, &toml).await;
    let https = client_with_ca(&pki.ca_pem_path());

    let resp = get(
        &https,
        &format!("https://localhost:{}/echo/edge", outpost.addr().port()),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_2, "h2 by ALPN");
    let seen = upstream.requests_to("/echo/edge");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("x-forwarded-proto"), Some("https"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_echo_passes_through() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let outpost = start_outpost(&upstream, &dirs, "").await;

    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", outpost.addr()))
        .await
        .expect("WebSocket handshake through outpost");
    assert_eq!(resp.status(), 101);

    ws.send(Message::text("hello through outpost"))
        .await
        .expect("send text");
    let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("echo in time")
        .expect("a message")
        .expect("a good message");
    assert_eq!(msg, Message::text("hello through outpost"));

    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .expect("send binary");
    let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("echo in time")
        .expect("a message")
        .expect("a good message");
    assert_eq!(msg, Message::binary(vec![0u8, 1, 2, 255]));
    ws.close(None).await.expect("close");

    let seen = upstream.requests_to("/ws");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("upgrade"), Some("websocket"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_clients_get_answers() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let outpost = start_outpost(&upstream, &dirs, "").await;
    let h2c = client_builder()
        .http2_prior_knowledge()
        .build()
        .expect("h2c client");

    let resp = get(&h2c, &format!("{}/echo/h2c?z=9", outpost.url())).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(cache_status(&resp), STORED);
    let echo = json_body(resp).await;
    assert_eq!(echo["path"], "/echo/h2c");
    assert_eq!(echo["query"], "z=9");
    assert_eq!(
        echo["headers"]["host"],
        upstream.addr().to_string(),
        "Host is the upstream's"
    );
    assert_eq!(
        echo["headers"]["x-forwarded-host"],
        outpost.addr().to_string(),
        "X-Forwarded-Host from :authority"
    );

    let resp = h2c
        .post(format!("{}/echo/h2c-post", outpost.url()))
        .body("h2c body")
        .send()
        .await
        .expect("h2c POST");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(json_body(resp).await["body"], "h2c body");
}

// ---------------------------------------------------------------------------------------------
// Limits and shutdown
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413_and_heads_over_the_limit_get_431() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let toml = "[proxy]\nmax_body_bytes = 4096\nmax_header_bytes = 4096\n\n[queue]\nmax_body_bytes = 2048\n";
    let outpost = start_outpost(&upstream, &dirs, toml).await;
    let http = client();
    let url = format!("{}/echo/limits", outpost.url());

    let resp = http
        .post(&url)
        .body(vec![b'a'; 1000])
        .send()
        .await
        .expect("small POST");
    assert_eq!(resp.status(), 200, "within the limit");

    let resp = http
        .post(&url)
        .body(vec![b'a'; 5000])
        .send()
        .await
        .expect("large POST");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(resp.headers().contains_key("cache-status"));
    assert_eq!(json_body(resp).await["error"], "body_too_large");

    let resp = http
        .get(&url)
        .header("X-Big", "h".repeat(1000))
        .send()
        .await
        .expect("modest head");
    assert_eq!(resp.status(), 200, "head within the limit");

    let resp = http
        .get(&url)
        .header("X-Big", "h".repeat(6000))
        .send()
        .await
        .expect("large head");
    assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert!(resp.headers().contains_key("cache-status"));

    let resp = http
        .get(&url)
        .header("X-Big", "h".repeat(70_000))
        .send()
        .await
        .expect("huge head");
    assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);

    let seen = upstream.requests_to("/echo/limits");
    assert!(
        seen.iter().all(|r| r.body.len() <= 4096),
        "nothing over the body limit reached the upstream"
    );
}

/// A chunked body of 10 000 bytes, more than the 4096 allowed by [`SMALL_LIMITS`].
fn oversized_chunked_body() -> reqwest::Body {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..10).map(|_| Ok(vec![b'c'; 1000])).collect();
    reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))
}

const SMALL_LIMITS: &str = "[proxy]\nmax_body_bytes = 4096\n\n[queue]\nmax_body_bytes = 2048\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_over_the_limit_is_413_and_not_held_against_the_upstream() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let outpost = start_outpost(&upstream, &dirs, SMALL_LIMITS).await;
    let http = client();

    // OPTIONS streams its body straight upstream (pass-through).
    let resp = http
        .request(Method::OPTIONS, format!("{}/echo/chunked", outpost.url()))
        .body(oversized_chunked_body())
        .send()
        .await
        .expect("chunked OPTIONS");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        status(&outpost).await["online"],
        true,
        "the app's oversized body is no sign of an outage"
    );
    assert!(upstream.requests_to("/echo/chunked").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn a_chunked_mutation_over_the_limit_is_413_and_not_held_against_the_upstream() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let outpost = start_outpost(&upstream, &dirs, SMALL_LIMITS).await;
    let http = client();

    // Over queue.max_body_bytes, so outbox streams it through, until proxy.max_body_bytes.
    let resp = http
        .post(format!("{}/echo/chunked", outpost.url()))
        .body(oversized_chunked_body())
        .send()
        .await
        .expect("chunked POST");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        status(&outpost).await["online"],
        true,
        "the app's oversized body is no sign of an outage"
    );
    assert!(upstream.requests_to("/echo/chunked").is_empty());
}

/// Wait at most `timeout` for outpost to exit after its SIGTERM, assert it exited 0, and say
/// how long it took since `since`.
async fn exits_cleanly(
    outpost: &mut OutpostProcess,
    timeout: Duration,
    since: Instant,
) -> Duration {
    let exit = outpost
        .wait_exit_timeout(timeout)
        .await
        .expect("outpost exits after SIGTERM");
    assert!(exit.success(), "exit status {exit}");
    since.elapsed()
}

/// A graceful stop waits for requests in flight (HTTP/1 and h2c), not for clients that have not
/// sent a whole request head: a connection with half a head (here with `header_read_timeout`
/// at 30 s and the grace at 10 s, the defaults) or none is closed at once, unanswered, and the
/// stop ends when the requests in flight are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_does_not_wait_for_a_client_that_has_not_sent_a_whole_request_head() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let mut outpost = start_outpost(&upstream, &dirs, "").await;
    let mut half = tokio::net::TcpStream::connect(outpost.addr())
        .await
        .expect("connect");
    half.write_all(b"GET /half HTTP/1.1\r\nHost: outpost\r\nAccept: */")
        .await
        .expect("half a head");
    let mut silent = tokio::net::TcpStream::connect(outpost.addr())
        .await
        .expect("connect");
    let h2 = client_builder()
        .http2_prior_knowledge()
        .build()
        .expect("h2c client");
    let slow = |http: reqwest::Client, url: String| {
        tokio::spawn(async move {
            let resp = http.get(url).send().await?;
            Ok::<_, reqwest::Error>((resp.version(), resp.status(), resp.text().await?))
        })
    };
    let h1_slow = slow(client(), format!("{}/slow?ms=1500", outpost.url()));
    let h2_slow = slow(h2, format!("{}/slow?ms=1500", outpost.url()));
    upstream
        .wait_requests("/slow", 2, Duration::from_secs(5))
        .await;

    let started = Instant::now();
    outpost.terminate();
    // Closed at once, without an answer: nothing of a request was in flight.
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), half.read_to_end(&mut got)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))) && got.is_empty(),
        "half a head: {read:?} {got:?}"
    );
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut got)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "silent: {read:?}");
    for (what, task, version) in [
        ("HTTP/1.1", h1_slow, reqwest::Version::HTTP_11),
        ("h2c", h2_slow, reqwest::Version::HTTP_2),
    ] {
        let (got_version, status, body) = task
            .await
            .expect("join")
            .unwrap_or_else(|e| panic!("{what}: the request in flight was answered: {e}"));
        assert_eq!((got_version, status), (version, StatusCode::OK), "{what}");
        assert!(body.contains("slept_ms"), "{what}: {body}");
    }
    let took = exits_cleanly(&mut outpost, Duration::from_secs(15), started).await;
    assert!(
        took < Duration::from_secs(8),
        "took {took:?}: waited for the half-sent head (the grace is 10 s)"
    );
    assert!(upstream.requests_to("/half").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_request_in_flight_and_exits_0_promptly() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let mut outpost = start_outpost(&upstream, &dirs, "").await;
    let http = client();

    let slow = tokio::spawn({
        let http = http.clone();
        let url = format!("{}/slow?ms=800", outpost.url());
        async move {
            let resp = http.get(url).send().await?;
            let status = resp.status();
            let body = resp.text().await?;
            Ok::<_, reqwest::Error>((status, body))
        }
    });
    upstream
        .wait_requests("/slow", 1, Duration::from_secs(5))
        .await;

    let started = Instant::now();
    outpost.terminate();
    let took = exits_cleanly(&mut outpost, Duration::from_secs(10), started).await;
    assert!(took < Duration::from_secs(5), "took {took:?} to exit");

    let (status, body) = slow
        .await
        .expect("join")
        .expect("the request in flight was answered");
    assert_eq!(status, 200);
    assert!(body.contains("slept_ms"), "{body}");
    assert!(
        tokio::net::TcpStream::connect(outpost.addr())
            .await
            .is_err(),
        "the listener is closed"
    );
}
