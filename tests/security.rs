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

/// Waits until the durable cache holds at least `n` entries (one cached URI is 2 entries: its
/// Vary names and the response).
async fn wait_cache_entries(outpost: &OutpostProcess, n: u64) {
    eventually(
        Duration::from_secs(10),
        &format!("{n} durable cache entries"),
        || async move { status(outpost).await["cache_entries"].as_u64().unwrap_or(0) >= n },
    )
    .await;
}

/// A raw HTTP/1 answer: status code, head and body as text.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    head: String,
    body: String,
}

/// Reads one HTTP/1 response (head, then a `Content-Length` body) from `stream`.
async fn read_response(stream: &mut TcpStream) -> RawResponse {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("an answer within 10 s")
            .expect("read the answer");
        assert!(
            n > 0,
            "connection closed before a complete response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("the body within 10 s")
            .expect("read the body");
        assert!(n > 0, "connection closed inside the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).into_owned();
    RawResponse { status, head, body }
}

/// Sends raw bytes on a new connection and reads one response.
async fn raw(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write the request");
    read_response(&mut stream).await
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
    wait_cache_entries(&outpost, 4).await;
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
    wait_cache_entries(&outpost, 4).await;
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
    wait_cache_entries(&outpost, 2).await;
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
    wait_cache_entries(&outpost, 2).await;
    upstream.stop().await;

    // Mallory asks for the same path: it is not the public route's copy.
    let resp = raw(
        outpost.addr(),
        get("/echo/public/../private", "Bearer mallory").as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 504, "{resp:?}");
}
