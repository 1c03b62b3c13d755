//! End-to-end tests of issue #15 point 7, "small defects found while trying it": each test
//! failed before its fix. The real `outpost` binary runs in front of an upstream on loopback
//! (the scriptable one of `tests/common`, or a raw one written here for what it cannot do).

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

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

/// Starts outpost in front of `upstream_url` with `toml` as its config file and `env`.
async fn start(
    upstream_url: &str,
    dirs: &Dirs,
    toml: &str,
    env: &[(&str, &str)],
) -> OutpostProcess {
    let config = dirs.config(toml).display().to_string();
    OutpostProcess::start_with_env(
        &["--config", &config, "--upstream", upstream_url],
        &dirs.data(),
        env,
    )
    .await
}

/// A raw HTTP/1 answer: the head as text and the decoded body.
#[derive(Debug)]
struct RawResponse {
    head: String,
    body: Vec<u8>,
}

impl RawResponse {
    /// The value of header `name` (first one), if present.
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Reads one byte at a time until `buf` ends with `end` (or the peer closes).
async fn read_until(stream: &mut TcpStream, end: &[u8]) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(end) {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
            .await
            .expect("bytes within 10 s")
            .expect("read");
        if n == 0 {
            break;
        }
        buf.push(byte[0]);
    }
    buf
}

/// Reads exactly one HTTP/1.1 response (head, then a `Content-Length` or chunked body) from
/// `stream`, leaving the connection open for the next exchange.
async fn read_response(stream: &mut TcpStream) -> RawResponse {
    let head = String::from_utf8_lossy(&read_until(stream, b"\r\n\r\n").await).into_owned();
    assert!(
        head.ends_with("\r\n\r\n"),
        "incomplete response head {head:?}"
    );
    let mut response = RawResponse {
        head,
        body: Vec::new(),
    };
    if let Some(length) = response.header("content-length") {
        let mut body = vec![0u8; length.parse().expect("Content-Length is a number")];
        stream.read_exact(&mut body).await.expect("read the body");
        response.body = body;
    } else if response
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let line = read_until(stream, b"\r\n").await;
            let size = std::str::from_utf8(&line)
                .ok()
                .and_then(|l| usize::from_str_radix(l.trim(), 16).ok())
                .unwrap_or_else(|| panic!("bad chunk size line {line:?}"));
            let mut chunk = vec![0u8; size + 2];
            stream.read_exact(&mut chunk).await.expect("read a chunk");
            if size == 0 {
                break;
            }
            response.body.extend_from_slice(&chunk[..size]);
        }
    }
    response
}

// ---------------------------------------------------------------------------------------------
// An HTTP/1.0 upstream does not downgrade the app's connection
// ---------------------------------------------------------------------------------------------

/// An upstream that speaks HTTP/1.0 only: it reads one request head per connection, answers
/// `HTTP/1.0 200` and closes. `/sized` answers with a `Content-Length`; anything else without
/// one (the body ends when the connection does, as HTTP/1.0 allows).
async fn http10_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the HTTP/1.0 upstream");
    let addr = listener.local_addr().expect("upstream address");
    claim_port(addr.port());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let head = read_until(&mut stream, b"\r\n\r\n").await;
                let head = String::from_utf8_lossy(&head);
                let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                let body = format!("hello from {path}");
                let answer = if path == "/sized" {
                    format!(
                        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    format!("HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n{body}")
                };
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// Issue #15 point 7: the app's keep-alive HTTP/1.1 connection stays HTTP/1.1 and open when
/// the upstream answers in HTTP/1.0, with and without a `Content-Length`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_upstream_answers_reach_the_app_as_keep_alive_http11() {
    let upstream = http10_upstream().await;
    let dirs = Dirs::new();
    let outpost = start(&format!("http://{upstream}"), &dirs, "", &[]).await;
    let mut app = TcpStream::connect(outpost.addr())
        .await
        .expect("connect to outpost");
    for path in ["/sized", "/streamed", "/sized"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: app.test\r\n\r\n");
        app.write_all(request.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("send GET {path} on the kept-alive connection: {e}"));
        let response = read_response(&mut app).await;
        assert!(
            response.head.starts_with("HTTP/1.1 200"),
            "GET {path}: the app's connection must stay HTTP/1.1: {:?}",
            response.head
        );
        assert!(
            !response
                .header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close")),
            "GET {path}: the app's connection must stay open: {:?}",
            response.head
        );
        assert_eq!(
            String::from_utf8_lossy(&response.body),
            format!("hello from {path}"),
            "GET {path}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A stored record with a bad method is dead-lettered, never sent as a POST
// ---------------------------------------------------------------------------------------------

/// A queued mutation record as the outbox stores it.
fn record(key: &str, method: &str, path: &str) -> outpost::store::MutationRecord {
    use outpost::store::{MutationRecord, MutationStatus, StoredRequest};
    MutationRecord {
        key: key.to_owned(),
        fingerprint: [0; 32],
        partition: "upstream".into(),
        seq: 0,
        accepted_at_ms: outpost::store::now_ms(),
        status: MutationStatus::Queued,
        attempts: 0,
        next_attempt_at_ms: 0,
        principal: None,
        route: "default".into(),
        request: StoredRequest {
            method: method.to_owned(),
            path_and_query: path.to_owned(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: "{}".into(),
        },
        outcome: None,
        response: None,
        finished_at_ms: None,
        identity: None,
    }
}

/// Issue #15 point 7: a stored method that is not an HTTP method (a damaged or hand-edited
/// store) used to be sent as a POST. Now the item is dead-lettered with the reason, nothing
/// of it reaches the upstream, and its partition goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_mutation_with_a_bad_method_is_dead_lettered_not_sent_as_post() {
    let dirs = Dirs::new();
    {
        let store = outpost::store::embedded::EmbeddedStore::open(&dirs.data(), 1 << 20)
            .expect("open the store");
        use outpost::store::Queue as _;
        for r in [
            record("bad-method", "PO ST", "/apply/bad"),
            record("after-it", "PUT", "/apply/after"),
        ] {
            store.enqueue(r).await.expect("enqueue");
        }
        store.close();
    }
    let upstream = Upstream::start().await;
    let outpost = start(&upstream.url(), &dirs, "", &[]).await;

    let applied = upstream.wait_applied(1, Duration::from_secs(20)).await;
    assert_eq!(applied[0].key, "after-it", "the partition goes on");
    let http = client();
    let dead: serde_json::Value = http
        .get(format!("{}/dead-letters", outpost.admin_url()))
        .send()
        .await
        .expect("admin /dead-letters")
        .json()
        .await
        .expect("dead letters are JSON");
    let dead = dead["items"].as_array().cloned().unwrap_or_default();
    let item = dead
        .iter()
        .find(|d| d["idempotency_key"] == "bad-method")
        .unwrap_or_else(|| panic!("bad-method is a dead letter: {dead:?}"));
    assert_eq!(item["status"], "rejected", "{item}");
    let outcome = item["outcome"].as_str().unwrap_or_default();
    assert!(
        outcome.contains("\"PO ST\" is not an HTTP method"),
        "the reason names the method: {outcome:?}"
    );
    assert!(
        upstream.requests_to("/apply/bad").is_empty(),
        "nothing of it was sent: {:?}",
        upstream.requests_to("/apply/bad")
    );
}

// ---------------------------------------------------------------------------------------------
// check-config
// ---------------------------------------------------------------------------------------------

/// Issue #15 point 7: `outpost check-config` refuses a typo'd method, a status code outside
/// 100–599 and a bad Redis URL, saying what is wrong, and names route keys one way
/// (`route[N].key`) with the line, exiting 2.
#[test]
fn check_config_names_the_file_line_and_route_n_key_of_each_mistake() {
    let dir = temp_dir();
    let cases = [
        (
            "[[route]]\npath = \"/a/\"\n\n[[route]]\npath = \"/b/\"\nmethods = [\"GTE\"]\n",
            ":6: key `route[1].methods`: \"GTE\" is not an HTTP method",
        ),
        (
            "[[route]]\npath = \"/a/\"\n[route.classify]\nconflict = [409, 99]\n",
            ":4: key `route[0].classify.conflict`: 99 is not an HTTP status code (100–599)",
        ),
        (
            "[store]\nbackend = \"redis\"\nredis_url = \"redis//localhost\"\n",
            ":3: key `store.redis_url`: \"redis//localhost\" is not a URL",
        ),
        (
            "[[route]]\npath = \"/a/\"\n[[route]]\npath = \"/b/\"\nread = \"cache-frist\"\n",
            ":5: key `route[1].read`: unknown variant `cache-frist`",
        ),
        (
            "[[route]]\npath = \"/a/\"\n[[route]]\nread = \"cache-first\"\npath = \"b/\"\n",
            ":5: key `route[1].path`: must start with '/'",
        ),
        (
            "[[route]]\npath = \"/a/\"\n[[route]]\npath = \"/a/\"\n",
            ":3: key `route[1].name`: matches the same methods and path as route[0]",
        ),
    ];
    for (i, (text, says)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("case{i}.toml"));
        std::fs::write(&file, text).expect("write the config");
        let file = file.display().to_string();
        let out = run_outpost(&["check-config", &file]);
        assert_eq!(out.code(), Some(2), "{text}\n{}", out.stderr_str());
        let expected = format!("{file}{says}");
        assert!(
            out.stderr_str().contains(&expected),
            "expected {expected:?} in {:?}",
            out.stderr_str()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------

/// Small timeouts and fast backoff, so an outage and the replay take moments.
const FAST: &str = r#"
[upstream]
connect_timeout = "500ms"
probe_interval = "50ms"
probe_interval_max = "200ms"

[replay]
initial_backoff = "50ms"
max_backoff = "200ms"
"#;

/// Log lines (of the whole log file) that contain every one of `parts`.
fn lines_with<'a>(log: &'a str, parts: &[&str]) -> Vec<&'a str> {
    log.lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .collect()
}

/// Issue #15 point 7: a log written to a file (stderr not a terminal) carries no ANSI colours,
/// even with `NO_COLOR` set but empty (which tracing-subscriber reads as "colours on"); values
/// are logged as Display (`status=201`, `backend=embedded`), never Debug (`Some(201)`,
/// `Embedded`); and each dead letter is logged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_logs_are_plain_text_with_display_values_and_one_line_per_dead_letter() {
    let upstream = Upstream::start().await;
    upstream.stop().await;
    let dirs = Dirs::new();
    let outpost = start(&upstream.url(), &dirs, FAST, &[("NO_COLOR", "")]).await;
    let http = client();
    // The rejected one first: the other replays after it is dead-lettered, so once the other's
    // "replayed" line is logged, every line about the dead letter has been logged too.
    for (key, path) in [("log-bad", "/apply/bad"), ("log-ok", "/apply/ok")] {
        let resp = http
            .post(format!("{}{path}", outpost.url()))
            .header("Idempotency-Key", key)
            .body("{}")
            .send()
            .await
            .expect("POST through outpost");
        assert_eq!(
            resp.status(),
            202,
            "{key} queued while the upstream is down"
        );
    }
    upstream.script(
        "/apply/bad",
        vec![ScriptedResponse::json(
            422,
            serde_json::json!({"error": "invalid"}),
        )],
    );
    upstream.restart().await;
    eventually(
        Duration::from_secs(20),
        "log-ok replayed and logged",
        || async { !lines_with(&outpost.log(), &["replayed", "log-ok"]).is_empty() },
    )
    .await;

    let log = outpost.log();
    assert!(
        !log.contains('\u{1b}'),
        "no ANSI escapes in a log file:\n{log}"
    );
    assert_eq!(
        lines_with(&log, &["outpost started", "backend=embedded"]).len(),
        1,
        "the backend as configured:\n{log}"
    );
    let replayed = lines_with(&log, &["outpost::app", "replayed", "log-ok"]);
    assert!(
        replayed.len() == 1 && replayed[0].contains("status=201"),
        "the status as a number: {replayed:?}"
    );
    assert!(!log.contains("Some("), "no Debug Options:\n{log}");
    assert!(!log.contains("Embedded"), "no Debug enums:\n{log}");
    let dead = lines_with(&log, &["dead-letter", "log-bad"]);
    let dead = [dead, lines_with(&log, &["DeadLettered", "log-bad"])].concat();
    assert_eq!(dead.len(), 1, "one line per dead letter: {dead:#?}");
    assert!(
        dead[0].contains("rejected") && dead[0].contains("validation"),
        "the dead letter's line says why: {}",
        dead[0]
    );
}

// ---------------------------------------------------------------------------------------------
// Admin /status counts cached responses
// ---------------------------------------------------------------------------------------------

/// The admin `/status` document.
async fn admin_status(outpost: &OutpostProcess) -> serde_json::Value {
    client()
        .get(format!("{}/status", outpost.admin_url()))
        .send()
        .await
        .expect("admin /status")
        .json()
        .await
        .expect("/status is JSON")
}

/// Issue #15 point 7: `cache_entries` counts cached responses. It used to count an index blob
/// (the response's Vary names) beside every cached URI as an entry of its own. The responses
/// are still found after a restart during an outage, every variant included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_status_counts_cached_responses_not_index_entries() {
    let upstream = Upstream::start().await;
    let dirs = Dirs::new();
    let mut outpost = start(&upstream.url(), &dirs, "", &[]).await;
    let http = client();
    let requests = [
        ("/echo/one", ""),
        ("/echo/two", ""),
        ("/echo/lang?vary=Accept-Language", "en"),
        ("/echo/lang?vary=Accept-Language", "de"),
    ];
    let base = outpost.url();
    let fetch = |path: &'static str, lang: &'static str| {
        let mut req = http.get(format!("{base}{path}"));
        if !lang.is_empty() {
            req = req.header("Accept-Language", lang);
        }
        req.send()
    };
    for (n, (path, lang)) in requests.iter().enumerate() {
        let resp = fetch(path, lang).await.expect("GET through outpost");
        assert_eq!(
            resp.headers()["cache-status"],
            "outpost; fwd=uri-miss; stored",
            "{path} {lang}"
        );
        resp.bytes()
            .await
            .expect("the body (stored once it streamed through)");
        // Each stored response is on disk before the next is fetched.
        let stored = n as u64 + 1;
        eventually(
            Duration::from_secs(10),
            &format!("{stored} responses in the durable cache"),
            || async {
                admin_status(&outpost).await["cache_entries"]
                    .as_u64()
                    .unwrap_or(0)
                    >= stored
            },
        )
        .await;
    }
    let status = admin_status(&outpost).await;
    assert_eq!(status["cache_entries"], 4, "one per response: {status}");

    upstream.stop().await;
    outpost.terminate();
    outpost.wait_exit().await;
    outpost.restart().await;
    for (path, lang) in requests {
        let resp = fetch(path, lang).await.expect("GET offline");
        assert_eq!(resp.status(), 200, "{path} {lang} offline after a restart");
        assert_eq!(
            resp.headers()["cache-status"],
            "outpost; hit; detail=offline",
            "{path} {lang}"
        );
        if !lang.is_empty() {
            let body: serde_json::Value = resp.json().await.expect("JSON");
            assert_eq!(
                body["headers"]["accept-language"], lang,
                "{lang}'s own copy"
            );
        }
    }
    assert_eq!(admin_status(&outpost).await["cache_entries"], 4);
}

// ---------------------------------------------------------------------------------------------
// Route names
// ---------------------------------------------------------------------------------------------

/// Issue #15 point 7: a queued mutation keeps its route's rules when a route is inserted
/// before that route while it waits. Unnamed routes used to be named by position
/// (`route[0]`), so the item found the inserted route's rules after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_inserted_while_mutations_wait_does_not_change_their_rules() {
    let upstream = Upstream::start().await;
    upstream.stop().await;
    let dirs = Dirs::new();
    let orders = "[[route]]\npath = \"/apply/orders/\"\n[route.classify]\nconflict = [418]\n";
    let mut outpost = start(&upstream.url(), &dirs, &format!("{FAST}\n{orders}"), &[]).await;
    let resp = client()
        .post(format!("{}/apply/orders/1", outpost.url()))
        .header("Idempotency-Key", "teapot-order")
        .body("{}")
        .send()
        .await
        .expect("POST through outpost");
    assert_eq!(resp.status(), 202, "queued while the upstream is down");
    outpost.terminate();
    outpost.wait_exit().await;

    // The operator inserts a route before it; the upstream comes back answering 418.
    let other = "[[route]]\npath = \"/apply/other/\"\nwrite = \"pass-through\"\n";
    dirs.config(&format!("{FAST}\n{other}\n{orders}"));
    upstream.script(
        "/apply/orders/",
        vec![ScriptedResponse::json(
            418,
            serde_json::json!({"error": "teapot"}),
        )],
    );
    upstream.restart().await;
    outpost.restart().await;

    let http = client();
    let dead_letters = format!("{}/dead-letters", outpost.admin_url());
    let dead_letter = || async {
        let resp = http.get(&dead_letters).send().await.ok()?;
        let doc: serde_json::Value = resp.json().await.ok()?;
        Some(doc["items"][0].clone()).filter(|d| d["idempotency_key"] == "teapot-order")
    };
    eventually(
        Duration::from_secs(20),
        "teapot-order dead-lettered",
        || async { dead_letter().await.is_some() },
    )
    .await;
    let last = dead_letter().await.unwrap_or_default();
    assert_eq!(
        last["status"], "conflict",
        "418 is a conflict under its own route's rules: {last}"
    );
}
