//! End-to-end tests of issue #14, "Security and hostile input": idle connections, cache keys,
//! path normalisation, strict HTTP/1 framing, the admin API against browsers, and data at rest.
//!
//! Every test starts the real `outpost` binary in front of a real hyper upstream on loopback
//! (see `tests/common`). Framing and idle-connection tests speak raw HTTP/1 over tokio
//! `TcpStream`s, since HTTP clients refuse to send what they check.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const STORED: &str = "outpost; fwd=uri-miss; stored";
const HIT_OFFLINE: &str = "outpost; hit; detail=offline";

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
        let path = self.root.path().join("outpost.toml");
        std::fs::write(&path, toml).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }
}

/// Starts outpost in front of `upstream_url` with `toml` as its config file.
async fn start(upstream_url: &str, dirs: &Dirs, toml: &str) -> OutpostProcess {
    let config = dirs.config(toml).display().to_string();
    OutpostProcess::start(
        &["--config", &config, "--upstream", upstream_url],
        &dirs.data(),
    )
    .await
}

async fn json_body(resp: reqwest::Response) -> Value {
    let text = resp.text().await.expect("read body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("body is not JSON ({e}): {text:?}"))
}

fn cache_status(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// The admin `/status` document.
async fn status(outpost: &OutpostProcess) -> Value {
    let resp = client()
        .get(format!("{}/status", outpost.admin_url()))
        .send()
        .await
        .expect("admin /status");
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

// ---------------------------------------------------------------------------------------------
// 3. The cache key covers everything that changes the answer
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_cached_for_one_api_key_is_never_served_to_another_key_or_to_no_key() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let outpost = start(&upstream.url(), &dirs, "").await;
    let http = client();
    let url = format!("{}/echo/keyed", outpost.url());

    for (name, value) in [("X-Api-Key", "alice-key"), ("Api-Key", "carol-key")] {
        let resp = http
            .get(&url)
            .header(name, value)
            .send()
            .await
            .expect("online");
        assert_eq!(cache_status(&resp), STORED, "{name}");
    }
    wait_cache_entries(&outpost, 2).await;
    upstream.stop().await;

    let others: [Option<(&str, &str)>; 4] = [
        Some(("X-Api-Key", "mallory-key")),
        Some(("Api-Key", "mallory-key")),
        Some(("Api-Key", "alice-key")),
        None,
    ];
    for other in others {
        let mut req = http.get(&url);
        if let Some((name, value)) = other {
            req = req.header(name, value);
        }
        let resp = req.send().await.expect("offline, other caller");
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT, "{other:?}");
        assert_eq!(
            json_body(resp).await,
            json!({"error": "upstream_unreachable", "cached": false}),
            "{other:?}"
        );
    }
    for (name, value) in [("X-Api-Key", "alice-key"), ("Api-Key", "carol-key")] {
        let resp = http
            .get(&url)
            .header(name, value)
            .send()
            .await
            .expect("owner");
        assert_eq!(resp.status(), 200, "{name}");
        assert_eq!(cache_status(&resp), HIT_OFFLINE, "{name}");
        let body = json_body(resp).await;
        assert_eq!(body["headers"][name.to_ascii_lowercase()], value);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_headers_are_configurable_globally_and_per_route() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let toml = "[cache]\nidentity_headers = [\"X-Session\"]\n\
                [[route]]\npath = \"/echo/tenant/\"\nidentity_headers = [\"X-Tenant\"]\n";
    let outpost = start(&upstream.url(), &dirs, toml).await;
    let http = client();
    let global = format!("{}/echo/global", outpost.url());
    let tenant = format!("{}/echo/tenant/x", outpost.url());

    let fetch = |url: &str, headers: &[(&str, &str)]| {
        let mut req = http.get(url);
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        req.send()
    };
    let resp = fetch(&global, &[("X-Session", "s-1")])
        .await
        .expect("global");
    assert_eq!(cache_status(&resp), STORED);
    let resp = fetch(
        &tenant,
        &[("X-Tenant", "acme"), ("Authorization", "Bearer a")],
    )
    .await
    .expect("tenant");
    assert_eq!(cache_status(&resp), STORED);
    wait_cache_entries(&outpost, 2).await;
    upstream.stop().await;

    // The global list replaced the defaults: another session is another caller, ...
    let resp = fetch(&global, &[("X-Session", "s-2")]).await.expect("s-2");
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    let resp = fetch(
        &global,
        &[("X-Session", "s-1"), ("Authorization", "Bearer z")],
    )
    .await
    .expect("s-1");
    // ... and Authorization is no longer one of the identity headers.
    assert_eq!(cache_status(&resp), HIT_OFFLINE);

    // The route's own list: the tenant decides, the session and Authorization do not.
    let resp = fetch(&tenant, &[("X-Tenant", "other")])
        .await
        .expect("other");
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    let resp = fetch(&tenant, &[("X-Tenant", "acme"), ("X-Session", "s-9")])
        .await
        .expect("acme");
    assert_eq!(cache_status(&resp), HIT_OFFLINE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_cached_for_a_forwarded_host_is_not_served_for_another_host() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let outpost = start(&upstream.url(), &dirs, "").await;
    let request = |host: &str| {
        format!("GET /echo/by-host HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
    };

    let first = raw(outpost.addr(), request("evil.example").as_bytes()).await;
    assert_eq!(first.status, 200, "{first:?}");
    assert!(first.head.contains(STORED), "{first:?}");
    let seen = upstream.requests_to("/echo/by-host");
    assert_eq!(seen[0].header("x-forwarded-host"), Some("evil.example"));
    wait_cache_entries(&outpost, 1).await;
    upstream.stop().await;

    let own_host = outpost.addr().to_string();
    let other = raw(outpost.addr(), request(&own_host).as_bytes()).await;
    assert_eq!(other.status, 504, "another host got the copy: {other:?}");
    let same = raw(outpost.addr(), request("EVIL.example").as_bytes()).await;
    assert_eq!(same.status, 200, "{same:?}");
    assert!(same.head.contains(HIT_OFFLINE), "{same:?}");
}

// ---------------------------------------------------------------------------------------------
// 4. No escaping the upstream path prefix
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_cannot_climb_out_of_the_upstream_prefix() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let prefixed = format!("{}/api", upstream.url());
    let outpost = start(&prefixed, &dirs, "").await;
    let get = |path: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: outpost.test\r\nConnection: close\r\n\r\n")
    };

    for path in [
        "/../internal/secret",
        "/%2e%2e/internal/secret",
        "/%2E./internal/secret",
        "/a/../../internal/secret",
        "/..%2finternal/secret",
        "/x/..%5C..%5Cinternal/secret",
        "/echo/a%00b",
    ] {
        let resp = raw(outpost.addr(), get(path).as_bytes()).await;
        assert_eq!(resp.status, 400, "{path}: {resp:?}");
        let body: Value = serde_json::from_str(&resp.body).expect("JSON error");
        assert_eq!(body["error"], "bad_request", "{path}");
    }
    assert!(
        upstream.requests().is_empty(),
        "refused paths reached the upstream: {:?}",
        upstream
            .requests()
            .iter()
            .map(|r| r.path_and_query())
            .collect::<Vec<_>>()
    );

    // Dot-segments that stay inside are resolved before the prefix is joined.
    for (path, forwarded) in [
        ("/a/../echo/x?q=1", "/api/echo/x?q=1"),
        ("/echo/%2e/y/%2E%2E/z", "/api/echo/z"),
    ] {
        let resp = raw(outpost.addr(), get(path).as_bytes()).await;
        assert_ne!(resp.status, 400, "{path}: {resp:?}");
        let last = upstream.requests().pop().expect("forwarded");
        assert_eq!(last.path_and_query(), forwarded, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dot_segment_cannot_borrow_a_public_routes_shared_cache_entry() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let toml = "[[route]]\npath = \"/echo/public/\"\npublic = true\n";
    let outpost = start(&upstream.url(), &dirs, toml).await;
    let get = |path: &str, auth: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: outpost.test\r\nAuthorization: {auth}\r\n\
             Connection: close\r\n\r\n"
        )
    };
    // Alice reads her private resource through a path that starts like the public route.
    let resp = raw(
        outpost.addr(),
        get("/echo/public/../private", "Bearer alice").as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(
        upstream.requests().pop().expect("forwarded").path,
        "/echo/private"
    );
    wait_cache_entries(&outpost, 1).await;
    upstream.stop().await;

    // Mallory asks for the same path: it is not the public route's copy.
    let resp = raw(
        outpost.addr(),
        get("/echo/public/../private", "Bearer mallory").as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 504, "{resp:?}");
}

// ---------------------------------------------------------------------------------------------
// 2. Idle connections cannot exhaust outpost
// ---------------------------------------------------------------------------------------------

/// A quick header-read timeout so that tests see it fire.
const QUICK_HEADERS: &str = "[proxy]\nheader_read_timeout = \"1s\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_complete_head_are_closed_and_a_partial_head_gets_408() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let outpost = start(&upstream.url(), &dirs, QUICK_HEADERS).await;

    let mut silent = TcpStream::connect(outpost.addr()).await.expect("connect");
    let mut partial = TcpStream::connect(outpost.addr()).await.expect("connect");
    partial
        .write_all(b"GET /echo/partial HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        .await
        .expect("write");
    // A keep-alive connection that goes quiet after one exchange.
    let mut kept = TcpStream::connect(outpost.addr()).await.expect("connect");
    kept.write_all(b"GET /echo/kept HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    assert_eq!(read_response(&mut kept).await.status, 200);

    let resp = read_response(&mut partial).await;
    assert_eq!(resp.status, 408, "{resp:?}");
    assert!(resp.head.to_ascii_lowercase().contains("connection: close"));
    let body: Value = serde_json::from_str(&resp.body).expect("JSON");
    assert_eq!(body["error"], "request_timeout");
    assert!(closed_within(&mut partial, Duration::from_secs(20)).await);

    // Nothing at all is written to a connection that sent nothing.
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(20), silent.read(&mut first))
        .await
        .expect("the silent connection is closed");
    assert!(matches!(n, Ok(0) | Err(_)), "silent connection got {n:?}");
    assert!(closed_within(&mut kept, Duration::from_secs(20)).await);

    let status = status(&outpost).await;
    assert!(status["header_timeouts"].as_u64() >= Some(3), "{status}");
    assert!(
        upstream.requests_to("/echo/partial").is_empty(),
        "the partial request was forwarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_answer_is_not_cut_by_the_header_read_timeout() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let outpost = start(&upstream.url(), &dirs, QUICK_HEADERS).await;
    let mut stream = TcpStream::connect(outpost.addr()).await.expect("connect");
    // The upstream takes twice the header-read timeout; a pipelined head waits meanwhile.
    stream
        .write_all(
            b"GET /slow?ms=2000 HTTP/1.1\r\nHost: a\r\n\r\nGET /echo/after HTTP/1.1\r\nHost: a\r\n\r\n",
        )
        .await
        .expect("write");
    let first = read_response(&mut stream).await;
    assert_eq!(first.status, 200, "{first:?}");
    assert!(first.body.contains("slept_ms"), "{first:?}");
    let second = read_response(&mut stream).await;
    assert_eq!(second.status, 200, "{second:?}");
    assert_eq!(status(&outpost).await["header_timeouts"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_keep_their_slot_and_a_refused_upgrade_is_timed_like_any_request() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let outpost = start(&upstream.url(), &dirs, QUICK_HEADERS).await;

    // An upgrade the upstream does not grant: HTTP/1 goes on, and so does the timeout.
    let mut refused = TcpStream::connect(outpost.addr()).await.expect("connect");
    refused
        .write_all(
            b"GET /echo/not-ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .expect("write");
    assert_eq!(read_response(&mut refused).await.status, 200);
    assert!(closed_within(&mut refused, Duration::from_secs(20)).await);
    eventually(
        Duration::from_secs(10),
        "the guard timed it out",
        || async { status(&outpost).await["header_timeouts"].as_u64() >= Some(1) },
    )
    .await;

    // A granted one is another protocol: quiet for longer than the header-read timeout, it
    // stays open, and it holds its slot in the budget all along.
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", outpost.addr()))
        .await
        .expect("WebSocket handshake through outpost");
    assert_eq!(resp.status(), 101);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(status(&outpost).await["connections_open"], 1);
    ws.send(Message::text("still here")).await.expect("send");
    let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("echo in time")
        .expect("a message")
        .expect("a good message");
    assert_eq!(msg, Message::text("still here"));
    ws.close(None).await.expect("close");
    drop(ws);
    eventually(
        Duration::from_secs(10),
        "the slot is given back",
        || async { status(&outpost).await["connections_open"] == 0 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_framing_the_guard_lost_is_still_timed_even_trickling() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let outpost = start(&upstream.url(), &dirs, QUICK_HEADERS).await;
    let mut stream = TcpStream::connect(outpost.addr()).await.expect("connect");
    // An upgrade request with the start of another head sent ahead of the answer: the guard
    // stops following the framing (those bytes could be the new protocol). The upstream
    // refuses the upgrade, HTTP/1 goes on, and the next head never completes.
    stream
        .write_all(
            b"GET /echo/not-ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n\
              GET /echo/never HTTP/1.1\r\nHost: a\r\nX-Slow: ",
        )
        .await
        .expect("write");
    assert_eq!(read_response(&mut stream).await.status, 200);
    // A byte every 200 ms does not keep it open: the deadline counts from the last answer.
    let began = std::time::Instant::now();
    let (mut reader, mut writer) = stream.into_split();
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            if writer.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    assert!(
        closed_within(&mut reader, Duration::from_secs(15)).await,
        "the connection stayed open while trickling"
    );
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "closed only after {:?}",
        began.elapsed()
    );
    trickle.abort();
    eventually(
        Duration::from_secs(10),
        "the timeout is counted",
        || async { status(&outpost).await["header_timeouts"].as_u64() >= Some(1) },
    )
    .await;
    assert!(
        upstream.requests_to("/echo/never").is_empty(),
        "the incomplete request was forwarded"
    );
}

/// Starts `outpost serve` under an open-file limit of `nofile` (via `sh -c 'ulimit -n'`),
/// logging to `log`; returns the child and its proxy and admin addresses.
async fn start_with_fd_limit(
    nofile: u32,
    upstream: &Upstream,
    dirs: &Dirs,
    toml: &str,
    log: &std::path::Path,
) -> (tokio::process::Child, SocketAddr, SocketAddr) {
    let proxy: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let config = dirs.config(toml);
    let log_file = std::fs::File::create(log).expect("create the log file");
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
        .arg(OUTPOST_BIN)
        .args(["serve", "--listen", &proxy.to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .arg("--data-dir")
        .arg(dirs.data())
        .arg("--config")
        .arg(&config)
        .args(["--upstream", &upstream.url()])
        .env("RUST_LOG", "info")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .stdin(std::process::Stdio::null())
        .stdout(log_file.try_clone().expect("clone the log file"))
        .stderr(log_file)
        .kill_on_drop(true);
    let child = cmd.spawn().expect("spawn outpost under sh");
    eventually(Duration::from_secs(20), "outpost listens", || async move {
        TcpStream::connect(admin).await.is_ok() && TcpStream::connect(proxy).await.is_ok()
    })
    .await;
    (child, proxy, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eleven_hundred_silent_connections_under_1024_descriptors_leave_both_listeners_working() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let log = dirs.root.path().join("outpost.log");
    // Long enough that only the connection limit closes anything here.
    let toml = "[proxy]\nheader_read_timeout = \"5m\"\n";
    let (_child, proxy, admin) = start_with_fd_limit(1024, &upstream, &dirs, toml, &log).await;
    let admin_status = || async move {
        let resp = client()
            .get(format!("http://{admin}/status"))
            .send()
            .await
            .expect("the admin listener answers");
        assert_eq!(resp.status(), 200);
        json_body(resp).await
    };
    let limit = admin_status().await["connections_limit"]
        .as_u64()
        .expect("connections_limit");
    assert!(limit < 1024 / 2, "the budget fits the descriptors: {limit}");

    let mut silent = Vec::with_capacity(1100);
    for _ in 0..1100 {
        silent.push(
            TcpStream::connect(proxy)
                .await
                .expect("connect a silent connection"),
        );
    }
    // The proxy keeps at most its budget, closing the longest-idle connections for newcomers.
    eventually(
        Duration::from_secs(30),
        "idle connections closed to make room",
        || async move { admin_status().await["connections_evicted"].as_u64() >= Some(1100 - limit) },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the closed connections gave their slots back",
        || async move { admin_status().await["connections_open"].as_u64() <= Some(limit) },
    )
    .await;
    let after = admin_status().await;
    eprintln!("after 1100 silent connections under 1024 descriptors: {after}");
    assert_eq!(after["connections_refused"], 0);

    // A real request still gets through (closing one more idle connection), ...
    let resp = client()
        .get(format!("http://{proxy}/echo/still-served"))
        .send()
        .await
        .expect("a request while 1100 silent connections were opened");
    assert_eq!(resp.status(), 200);
    // ... the oldest silent connections were closed, the newest are still open ...
    assert!(closed_within(&mut silent[0], Duration::from_secs(10)).await);
    let newest = silent.last_mut().expect("1100 connections");
    assert!(!closed_within(newest, Duration::from_millis(200)).await);
    // ... and the limit said so in the log.
    let text = std::fs::read_to_string(&log).expect("read the log");
    assert!(text.contains("closing the longest-idle"), "{text}");
    assert!(
        !text.contains("accept failed"),
        "ran out of descriptors: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_limit_with_nothing_idle_new_connections_get_503_and_admin_still_answers() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let outpost = start(&upstream.url(), &dirs, "[proxy]\nmax_connections = 4\n").await;
    // The start-up check's own connections must have given their slots back (on a loaded
    // machine that can take a moment), or one of the four below is refused.
    eventually(Duration::from_secs(10), "no connection open", || async {
        status(&outpost).await["connections_open"] == 0
    })
    .await;

    // Four connections each waiting for a slow answer: busy, not idle.
    let mut busy = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(outpost.addr()).await.expect("connect");
        s.write_all(b"GET /slow?ms=20000 HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("write");
        busy.push(s);
    }
    eventually(
        Duration::from_secs(30),
        "four requests in flight",
        || async { upstream.requests_to("/slow").len() == 4 },
    )
    .await;

    let mut refused = TcpStream::connect(outpost.addr()).await.expect("connect");
    let resp = read_response(&mut refused).await;
    assert_eq!(resp.status, 503, "{resp:?}");
    assert_eq!(
        serde_json::from_str::<Value>(&resp.body).expect("JSON"),
        json!({"error": "too_many_connections"})
    );
    // The admin listener has a budget of its own.
    let status_doc = status(&outpost).await;
    assert!(
        status_doc["connections_refused"].as_u64() >= Some(1),
        "{status_doc}"
    );
    assert!(
        outpost.log().contains("refusing new connections"),
        "{}",
        outpost.log_tail(20)
    );

    // Clients that go away give their slots back.
    drop(busy);
    eventually(
        Duration::from_secs(10),
        "a new request is served",
        || async {
            client()
                .get(format!("{}/echo/again", outpost.url()))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// 5. Strict HTTP/1 framing, like nginx
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_and_bad_host_lines_get_400_and_never_reach_the_upstream() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let outpost = start(&upstream.url(), &dirs, "").await;
    let cases: [(&str, &str); 7] = [
        (
            "POST /echo/te-cl HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "Content-Length together with Transfer-Encoding",
        ),
        (
            "POST /echo/cl-te HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
            "Content-Length together with Transfer-Encoding",
        ),
        (
            "POST /echo/cl-cl HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
            "more than one Content-Length",
        ),
        (
            "POST /echo/cl-cl2 HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd",
            "more than one Content-Length",
        ),
        (
            "POST /echo/cl-list HTTP/1.1\r\nHost: a\r\nContent-Length: 4, 4\r\n\r\nabcd",
            "more than one Content-Length",
        ),
        (
            "GET /echo/no-host HTTP/1.1\r\nAccept: */*\r\n\r\n",
            "HTTP/1.1 request without Host",
        ),
        (
            "GET /echo/two-hosts HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "more than one Host",
        ),
    ];
    for (request, message) in cases {
        let mut stream = TcpStream::connect(outpost.addr()).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        let resp = read_response(&mut stream).await;
        assert_eq!(resp.status, 400, "{request:?}: {resp:?}");
        assert!(resp.head.to_ascii_lowercase().contains("connection: close"));
        let body: Value = serde_json::from_str(&resp.body).expect("JSON");
        assert_eq!(body, json!({"error": "bad_request", "message": message}));
        assert!(
            closed_within(&mut stream, Duration::from_secs(10)).await,
            "{request:?}: connection left open"
        );
    }
    assert!(upstream.requests().is_empty(), "{:?}", upstream.requests());
    assert_eq!(status(&outpost).await["framing_refusals"], 7);

    // HTTP/1.0 may leave Host out.
    let resp = raw(outpost.addr(), b"GET /echo/old HTTP/1.0\r\n\r\n").await;
    assert_eq!(resp.status, 200, "{resp:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smuggled_request_behind_a_valid_one_is_refused_on_the_same_connection() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let outpost = start(&upstream.url(), &dirs, "").await;
    let mut stream = TcpStream::connect(outpost.addr()).await.expect("connect");
    // A chunked POST (with an extension and a trailer), a GET, then the smuggling attempt, in
    // one write: the bodies are followed, so the third head is read as a head.
    stream
        .write_all(
            b"POST /echo/one HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
              5;x=y\r\nhello\r\n0\r\nX-T: 1\r\n\r\n\
              GET /echo/two HTTP/1.1\r\nHost: a\r\n\r\n\
              POST /echo/three HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n\
              0\r\n\r\nGET /echo/smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        )
        .await
        .expect("write");
    let one = read_response(&mut stream).await;
    assert_eq!(one.status, 200, "{one:?}");
    let two = read_response(&mut stream).await;
    assert_eq!(two.status, 200, "{two:?}");
    let three = read_response(&mut stream).await;
    assert_eq!(three.status, 400, "{three:?}");
    assert!(closed_within(&mut stream, Duration::from_secs(10)).await);
    let paths: Vec<String> = upstream.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/echo/one", "/echo/two"]);
    assert_eq!(upstream.requests()[0].body_str(), "hello");
}

// ---------------------------------------------------------------------------------------------
// 6. The admin API resists browsers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_origin_posts_and_rebound_hosts_are_refused_by_the_admin_api() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let outpost = start(
        &upstream.url(),
        &dirs,
        "[admin]\nallowed_hosts = [\"outpost.lan\"]\n",
    )
    .await;
    let admin = outpost.admin_addr();
    let port = admin.port();
    let post = |host: String, origin: Option<&str>| {
        let origin = origin
            .map(|o| format!("Origin: {o}\r\n"))
            .unwrap_or_default();
        format!(
            "POST /sync/pause HTTP/1.1\r\nHost: {host}\r\n{origin}Content-Type: text/plain\r\n\
             Content-Length: 2\r\nConnection: close\r\n\r\nhi"
        )
    };

    // A page on another origin posting a "simple" request, no token configured (loopback).
    let resp = raw(
        admin,
        post(format!("127.0.0.1:{port}"), Some("https://evil.example")).as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 403, "{resp:?}");
    assert!(resp.body.contains("forbidden_origin"), "{resp:?}");
    let resp = raw(
        admin,
        post(format!("127.0.0.1:{port}"), Some("null")).as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 403, "{resp:?}");
    // DNS rebinding: the page's own name in Host, on any method.
    let resp = raw(admin, post(format!("evil.example:{port}"), None).as_bytes()).await;
    assert_eq!(resp.status, 403, "{resp:?}");
    assert!(resp.body.contains("forbidden_host"), "{resp:?}");
    let get =
        format!("GET /status HTTP/1.1\r\nHost: evil.example:{port}\r\nConnection: close\r\n\r\n");
    let resp = raw(admin, get.as_bytes()).await;
    assert_eq!(resp.status, 403, "{resp:?}");
    assert_eq!(status(&outpost).await["paused"], false, "sync was paused");

    // Tools (no Origin), same-origin pages and configured names are served.
    let resp = raw(admin, post(format!("localhost:{port}"), None).as_bytes()).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let resp = raw(
        admin,
        post(
            format!("127.0.0.1:{port}"),
            Some(&format!("http://127.0.0.1:{port}")),
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let get = "GET /status HTTP/1.1\r\nHost: outpost.lan\r\nConnection: close\r\n\r\n";
    let resp = raw(admin, get.as_bytes()).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(status(&outpost).await["paused"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_must_match_whole() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let outpost = start(
        &upstream.url(),
        &dirs,
        "[admin]\ntoken = \"s3cret-token\"\n",
    )
    .await;
    let http = client();
    let url = format!("{}/status", outpost.admin_url());
    for given in [
        None,
        Some("Bearer s3cret"),
        Some("Bearer s3cret-token-and-more"),
        Some("s3cret-token"),
    ] {
        let mut req = http.get(&url);
        if let Some(v) = given {
            req = req.header("Authorization", v);
        }
        let resp = req.send().await.expect("admin");
        assert_eq!(resp.status(), 401, "{given:?}");
    }
    let resp = http
        .get(&url)
        .header("Authorization", "Bearer s3cret-token")
        .send()
        .await
        .expect("admin");
    assert_eq!(resp.status(), 200);
}

// ---------------------------------------------------------------------------------------------
// 8. Data at rest
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_directory_and_the_store_are_private_to_the_owner() {
    use std::os::unix::fs::PermissionsExt;
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let mode = |p: &std::path::Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    let mut outpost = start(&upstream.url(), &dirs, "").await;
    let store = dirs.data().join("outpost.redb");
    assert_eq!(mode(&dirs.data()), 0o700);
    assert_eq!(mode(&store), 0o600);

    // Ones left open by an older version are tightened at the next start.
    outpost.terminate();
    outpost.wait_exit().await;
    std::fs::set_permissions(dirs.data(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    outpost.restart().await;
    assert_eq!(mode(&dirs.data()), 0o700);
    assert_eq!(mode(&store), 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_never_contain_credentials_or_bodies() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let config = dirs
        .config("[upstream]\nprobe_interval = \"50ms\"\nprobe_interval_max = \"200ms\"\n")
        .display()
        .to_string();
    let url = upstream.url();
    let outpost = OutpostProcess::start_with_env(
        &["--config", &config, "--upstream", &url],
        &dirs.data(),
        &[("RUST_LOG", "trace")],
    )
    .await;
    let http = client();
    let secrets = [
        ("Authorization", "Bearer tok-3f9a1c"),
        ("Cookie", "session=cookie-77b2"),
        ("X-Api-Key", "apikey-5e41"),
        ("Proxy-Authorization", "Basic cHJveHktc2VjcmV0"),
    ];
    let send = |method: reqwest::Method, path: &str, key: Option<&str>| {
        let mut req = http.request(method, format!("{}{path}", outpost.url()));
        for (n, v) in secrets {
            req = req.header(n, v);
        }
        if let Some(key) = key {
            req = req.header("Idempotency-Key", key);
        }
        req.body("{\"card\":\"body-secret-9d1\"}").send()
    };
    let resp = send(reqwest::Method::GET, "/echo/read", None)
        .await
        .expect("read");
    assert_eq!(resp.status(), 200);
    let resp = send(reqwest::Method::POST, "/apply/online", Some("k-online"))
        .await
        .expect("write");
    assert!(resp.status().is_success());
    upstream.stop().await;
    let resp = send(reqwest::Method::POST, "/apply/queued", Some("k-queued"))
        .await
        .expect("queue");
    assert_eq!(resp.status(), 202);
    upstream.restart().await;
    upstream.wait_applied(2, Duration::from_secs(20)).await;

    let log = outpost.log();
    assert!(
        log.contains("k-queued"),
        "the log is not verbose enough to tell: {log}"
    );
    for needle in [
        "tok-3f9a1c",
        "cookie-77b2",
        "apikey-5e41",
        "cHJveHktc2VjcmV0",
        "body-secret-9d1",
    ] {
        assert!(!log.contains(needle), "the log holds {needle:?}");
    }
}
