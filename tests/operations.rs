//! End-to-end tests of the operations surface (issue #16): the admin API's `/events`,
//! `/metrics`, `/healthz`, `/readyz`, the status page, dead-letter edits and the
//! `outpost queue` CLI — the real binary in front of a real upstream on loopback.
//!
//! The browser test (`status_page_in_a_headless_browser_…`) drives Debian's chromium through
//! chromedriver (WebDriver, `fantoccini`); without them it fails when `CI` is set and is
//! skipped with a message otherwise (`.ci/run` installs both).

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt as _;
use serde_json::{Value, json};

/// Small timeouts and fast backoff, so outages and retries take moments; a fast heartbeat.
const BASE_CONFIG: &str = r#"
[upstream]
connect_timeout = "500ms"
request_timeout = "10s"
probe_interval = "50ms"
probe_interval_max = "300ms"

[replay]
initial_backoff = "100ms"
max_backoff = "1s"

[admin]
events_heartbeat = "300ms"
"#;

const WAIT: Duration = Duration::from_secs(20);

struct Setup {
    upstream: Upstream,
    outpost: OutpostProcess,
    http: reqwest::Client,
    token: Option<String>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl Setup {
    async fn start(extra: &str, upstream_up: bool) -> Setup {
        let upstream = Upstream::start().await;
        if !upstream_up {
            upstream.stop().await;
        }
        let config_dir = temp_dir();
        let data_dir = temp_dir();
        let config = config_dir.path().join("outpost.toml");
        std::fs::write(&config, format!("{BASE_CONFIG}\n{extra}")).expect("write config");
        let token = extra
            .lines()
            .find_map(|l| l.strip_prefix("token = \""))
            .map(|t| t.trim_end_matches('"').to_string());
        let outpost = OutpostProcess::start(
            &[
                "--config",
                &config.display().to_string(),
                "--upstream",
                &upstream.url(),
            ],
            &data_dir.path().join("data"),
        )
        .await;
        Setup {
            upstream,
            outpost,
            http: client(),
            token,
            _dirs: (config_dir, data_dir),
        }
    }

    fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self
            .http
            .request(method, format!("{}{path}", self.outpost.admin_url()));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    async fn admin_json(&self, method: reqwest::Method, path: &str) -> (u16, Value) {
        let resp = self.admin(method, path).send().await.expect("admin call");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn status(&self) -> Value {
        self.admin_json(reqwest::Method::GET, "/status").await.1
    }

    async fn metrics(&self) -> String {
        let resp = self
            .admin(reqwest::Method::GET, "/metrics")
            .send()
            .await
            .expect("GET /metrics");
        assert_eq!(resp.status(), 200);
        resp.text().await.expect("metrics text")
    }

    /// POST through outpost while the upstream is down: a 202.
    async fn queue(&self, path: &str, key: &str, body: &str) {
        let resp = self
            .http
            .post(format!("{}{path}", self.outpost.url()))
            .header("Idempotency-Key", key)
            .body(body.to_string())
            .send()
            .await
            .expect("POST through outpost");
        assert_eq!(resp.status(), 202, "{key} queued");
    }

    async fn events(&self, last_event_id: Option<u64>) -> EventReader {
        let mut req = self.admin(reqwest::Method::GET, "/events");
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id.to_string());
        }
        let resp = req.send().await.expect("GET /events");
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"].to_str().ok(),
            Some("text/event-stream")
        );
        let mut reader = EventReader {
            stream: Box::pin(resp.bytes_stream()),
            buf: String::new(),
        };
        // The greeting shows the stream is open (and subscribed) before the test acts.
        let first = reader.next(WAIT).await.expect("greeting");
        assert!(first.comments.iter().any(|c| c == "outpost events"));
        reader
    }

    async fn wait_status(&self, what: &str, check: impl Fn(&Value) -> bool) {
        eventually(WAIT, what, || async { check(&self.status().await) }).await;
    }
}

/// One SSE message: its id, its JSON data, and comment lines.
#[derive(Debug, Default)]
struct Message {
    id: Option<u64>,
    data: Option<Value>,
    comments: Vec<String>,
}

type ByteStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>;

struct EventReader {
    stream: ByteStream,
    buf: String,
}

impl EventReader {
    /// The next message (`None` when the stream ended); panics after `timeout`.
    async fn next(&mut self, timeout: Duration) -> Option<Message> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut m = Message::default();
                for line in block.lines() {
                    if let Some(c) = line.strip_prefix(": ") {
                        m.comments.push(c.to_string());
                    } else if let Some(id) = line.strip_prefix("id: ") {
                        m.id = id.parse().ok();
                    } else if let Some(data) = line.strip_prefix("data: ") {
                        m.data = Some(serde_json::from_str(data).expect("data is JSON"));
                    }
                }
                return Some(m);
            }
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Ok(Some(Ok(chunk))) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(Some(Err(_))) | Ok(None) => return None,
                Err(_) => panic!("no event within {timeout:?}; buffered: {:?}", self.buf),
            }
        }
    }

    /// Events (with data) until one has `type` == `until`, inclusive.
    async fn until(&mut self, until: &str) -> Vec<(Option<u64>, Value)> {
        let mut seen = Vec::new();
        loop {
            let m = self
                .next(WAIT)
                .await
                .unwrap_or_else(|| panic!("stream ended before {until}: {seen:?}"));
            if let Some(data) = m.data {
                let done = data["type"] == until;
                seen.push((m.id, data));
                if done {
                    return seen;
                }
            }
        }
    }
}

fn types(events: &[(Option<u64>, Value)]) -> Vec<String> {
    events
        .iter()
        .map(|(_, d)| d["type"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// The value of the sample `series` (name and labels exactly as rendered) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// #16 points 1-4: every admin route needs the token but the probes and the page's files;
/// the Host rule holds for all of them.
#[tokio::test]
async fn admin_routes_need_the_token_except_probes_and_the_page_files() {
    let s = Setup::start("token = \"s3cret\"", true).await;
    let url = |p: &str| format!("{}{p}", s.outpost.admin_url());
    for path in [
        "/status",
        "/queue",
        "/dead-letters",
        "/metrics",
        "/events",
        "/mutations/x",
    ] {
        let resp = s.http.get(url(path)).send().await.expect("GET");
        assert_eq!(resp.status(), 401, "{path} without the token");
        let resp = s
            .http
            .get(url(path))
            .bearer_auth("wrong")
            .send()
            .await
            .expect("GET");
        assert_eq!(resp.status(), 401, "{path} with a wrong token");
    }
    for (method, path) in [
        (reqwest::Method::POST, "/sync/pause"),
        (reqwest::Method::POST, "/sync/resume"),
        (reqwest::Method::POST, "/queue/x/retry"),
        (reqwest::Method::DELETE, "/queue/x"),
        (reqwest::Method::POST, "/dead-letters/x/retry"),
        (reqwest::Method::DELETE, "/dead-letters/x"),
    ] {
        let resp = s
            .http
            .request(method, url(path))
            .send()
            .await
            .expect("call");
        assert_eq!(resp.status(), 401, "{path}");
    }
    for path in ["/status", "/queue", "/dead-letters", "/metrics"] {
        let resp = s
            .admin(reqwest::Method::GET, path)
            .send()
            .await
            .expect("GET");
        assert_eq!(resp.status(), 200, "{path} with the token");
    }
    let (status, _) = s.admin_json(reqwest::Method::GET, "/mutations/none").await;
    assert_eq!(status, 404);
    for (method, path) in [
        (reqwest::Method::POST, "/queue/none/retry"),
        (reqwest::Method::DELETE, "/queue/none"),
        (reqwest::Method::POST, "/dead-letters/none/retry"),
        (reqwest::Method::DELETE, "/dead-letters/none"),
    ] {
        let (status, _) = s.admin_json(method, path).await;
        assert_eq!(
            status, 404,
            "{path} with the token: passed the check, key unknown"
        );
    }
    for path in ["/sync/pause", "/sync/resume"] {
        let (status, _) = s.admin_json(reqwest::Method::POST, path).await;
        assert_eq!(status, 200, "{path} with the token");
    }
    for path in [
        "/healthz",
        "/readyz",
        "/",
        "/static/app.js",
        "/static/app.css",
    ] {
        let resp = s.http.get(url(path)).send().await.expect("GET");
        assert_eq!(resp.status(), 200, "{path} needs no token");
    }
    let page = s.http.get(url("/")).send().await.expect("GET /");
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .expect("csp")
        .to_string();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    let html = page.text().await.expect("html");
    assert!(html.contains("/static/app.js"), "{html}");
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no CDN"
    );
    // DNS rebinding: the page and the probes are refused under a foreign Host too.
    for path in ["/", "/healthz", "/events"] {
        let resp = s
            .http
            .get(url(path))
            .header("Host", "evil.example")
            .bearer_auth("s3cret")
            .send()
            .await
            .expect("GET");
        assert_eq!(resp.status(), 403, "{path}");
    }
    // A page of another origin cannot pause replay, even with the token.
    let resp = s
        .admin(reqwest::Method::POST, "/sync/pause")
        .header("Origin", "https://evil.example")
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 403);
    let resp = s
        .admin(reqwest::Method::POST, "/sync/pause")
        .header("Origin", s.outpost.admin_url())
        .send()
        .await
        .expect("POST");
    assert_eq!(resp.status(), 200, "the page's own origin may");
}

/// #16 point 3: an upstream outage is not unready; alive and ready say so in JSON.
#[tokio::test]
async fn readyz_stays_ready_through_an_upstream_outage() {
    let s = Setup::start("", false).await;
    // Find out the upstream is down.
    let resp = s
        .http
        .get(format!("{}/echo/x", s.outpost.url()))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 504);
    s.wait_status("offline", |st| st["online"] == false).await;
    let (status, ready) = s.admin_json(reqwest::Method::GET, "/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["ready"], true, "{ready}");
    assert_eq!(ready["store_writable"], true, "{ready}");
    assert_eq!(ready["upstream_online"], false, "{ready}");
    let (status, alive) = s.admin_json(reqwest::Method::GET, "/healthz").await;
    assert_eq!((status, alive), (200, json!({"ok": true})));
}

/// #16 point 1: the stream tells an outage, the queueing, the replay and its classification,
/// with growing ids; a client reconnecting with `Last-Event-ID` gets exactly what it missed;
/// heartbeats flow while nothing happens; the stream ends when outpost shuts down.
#[tokio::test]
async fn event_stream_follows_an_outage_and_a_replay_and_resumes_from_last_event_id() {
    let s = Setup::start("", true).await;
    let mut events = s.events(None).await;
    // Heartbeats while nothing happens (admin.events_heartbeat = 300ms).
    let beat = events.next(WAIT).await.expect("heartbeat");
    assert_eq!(beat.comments, ["keep-alive"]);

    s.upstream.stop().await;
    let resp = s
        .http
        .get(format!("{}/echo/down", s.outpost.url()))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 504);
    let seen = events.until("offline").await;
    assert_eq!(types(&seen), ["offline"]);
    s.queue("/apply/ev/1", "ev-1", "{}").await;
    let seen = events.until("queued").await;
    assert_eq!(seen[0].1["key"], "ev-1");
    assert_eq!(seen[0].1["partition"], "upstream", "{seen:?}");
    s.upstream.restart().await;
    let seen = events.until("classified").await;
    let kinds = types(&seen);
    assert!(kinds.contains(&"online".to_string()), "{kinds:?}");
    assert!(kinds.contains(&"replay_attempt".to_string()), "{kinds:?}");
    let classified = &seen.last().expect("classified").1;
    assert_eq!(classified["class"], "success", "{classified}");
    assert_eq!(classified["status"], 201, "{classified}");
    let ids: Vec<u64> = seen.iter().filter_map(|(id, _)| *id).collect();
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
    let last_seen = *ids.last().expect("an id");
    drop(events);

    // Missed while disconnected: a pause and a resume.
    s.admin(reqwest::Method::POST, "/sync/pause")
        .send()
        .await
        .expect("pause");
    s.admin(reqwest::Method::POST, "/sync/resume")
        .send()
        .await
        .expect("resume");
    let mut again = s.events(Some(last_seen)).await;
    let seen = again.until("resumed").await;
    assert_eq!(types(&seen), ["paused", "resumed"], "{seen:?}");
    assert_eq!(seen[0].0, Some(last_seen + 1));

    // An id older than anything kept: told so, then everything kept.
    let mut old = s.events(Some(1)).await;
    let first = old.next(WAIT).await.expect("a message");
    assert_eq!(
        first.data,
        Some(json!({"type": "missed", "after": 1})),
        "{first:?}"
    );
    drop(old);

    let mut outpost = s.outpost;
    outpost.terminate();
    let status = outpost.wait_exit().await;
    assert!(status.success(), "{status}");
    // The stream ended with the process (never hanging the shutdown).
    loop {
        match again.next(WAIT).await {
            None => break,
            Some(m) => assert!(m.data.is_none() || m.comments.is_empty()),
        }
    }
}

/// #16 point 2: metric names follow the conventions and their values move with requests,
/// an outage, queueing and the replay.
#[tokio::test]
async fn metrics_move_with_requests_an_outage_and_the_replay() {
    let s = Setup::start("", true).await;
    let get = |path: &str| s.http.get(format!("{}{path}", s.outpost.url())).send();
    assert_eq!(get("/echo/m").await.expect("GET").status(), 200);
    let text = s.metrics().await;
    for name in [
        "# TYPE outpost_requests_total counter",
        "# TYPE outpost_request_duration_seconds histogram",
        "# HELP outpost_replay_outcomes_total",
        "# TYPE outpost_connections_open gauge",
        "# TYPE outpost_store_commit_seconds histogram",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    assert_eq!(
        sample(
            &text,
            "outpost_requests_total{route=\"default\",source=\"upstream\",status=\"2xx\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "outpost_cache_lookups_total{result=\"miss\"}"),
        Some(1.0)
    );
    assert_eq!(sample(&text, "outpost_upstream_up"), Some(1.0));
    assert_eq!(
        sample(&text, "outpost_connections_open{listener=\"admin\"}"),
        Some(1.0),
        "{text}"
    );
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        assert!(line.starts_with("outpost_"), "{line}");
    }

    s.upstream.stop().await;
    assert_eq!(get("/echo/m").await.expect("GET").status(), 200, "stale");
    s.queue("/apply/met/1", "met-1", "{}").await;
    s.queue("/apply/met/2", "met-2", "{}").await;
    let text = s.metrics().await;
    assert_eq!(sample(&text, "outpost_upstream_up"), Some(0.0));
    assert_eq!(sample(&text, "outpost_upstream_outages_total"), Some(1.0));
    assert_eq!(
        sample(
            &text,
            "outpost_requests_total{route=\"default\",source=\"stale\",status=\"2xx\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "outpost_requests_total{route=\"default\",source=\"queued\",status=\"2xx\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, "outpost_cache_lookups_total{result=\"stale\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "outpost_queue_depth{partition=\"upstream\"}"),
        Some(2.0),
        "{text}"
    );
    assert!(text.contains("# TYPE outpost_queue_depth gauge"), "{text}");
    assert!(
        sample(
            &text,
            "outpost_queue_oldest_age_seconds{partition=\"upstream\"}"
        )
        .is_some(),
        "{text}"
    );
    assert_eq!(
        sample(&text, "outpost_store_commit_seconds_count{op=\"enqueue\"}"),
        Some(2.0)
    );
    eventually(WAIT, "queued counted", || async {
        sample(&s.metrics().await, "outpost_queued_total") == Some(2.0)
    })
    .await;

    s.upstream.restart().await;
    eventually(WAIT, "replayed and counted", || async {
        let text = s.metrics().await;
        sample(&text, "outpost_replay_outcomes_total{class=\"success\"}") == Some(2.0)
            && sample(&text, "outpost_queue_depth{partition=\"upstream\"}") == Some(0.0)
            && sample(&text, "outpost_upstream_up") == Some(1.0)
    })
    .await;
    let text = s.metrics().await;
    assert_eq!(sample(&text, "outpost_replay_attempts_total"), Some(2.0));
    assert_eq!(sample(&text, "outpost_upstream_outage_seconds"), Some(0.0));
    assert_eq!(sample(&text, "outpost_dead_letters"), Some(0.0));
}

/// Two dead letters (422), each retried with an edit: the same body keeps the key (headers
/// edited); another body gets `<key>.edit-1`, and the old record points to it.
async fn dead_letters(s: &Setup, keys: &[&str]) {
    if s.upstream.is_running() {
        s.upstream.stop().await;
    }
    for key in keys {
        s.upstream.script(
            &format!("/apply/dl/{key}"),
            vec![
                ScriptedResponse::json(
                    422,
                    json!({"errors": [{"message": "qty must be positive"}]}),
                ),
                ScriptedResponse::passthrough(),
            ],
        );
        s.queue(&format!("/apply/dl/{key}"), key, r#"{"qty":0}"#)
            .await;
    }
    s.upstream.restart().await;
    let n = keys.len() as u64;
    s.wait_status("dead-lettered", |st| {
        st["dead_letters"] == n && st["queue_depth"] == 0
    })
    .await;
}

/// #16 point 5: edit-and-retry of dead letters.
#[tokio::test]
async fn dead_letter_retry_with_an_edit_keeps_the_key_only_for_the_same_body() {
    let s = Setup::start("", false).await;
    dead_letters(&s, &["dle-a", "dle-b"]).await;
    let (_, listed) = s.admin_json(reqwest::Method::GET, "/dead-letters").await;
    assert_eq!(listed["items"][0]["upstream_status"], 422, "{listed}");
    assert_eq!(
        listed["items"][0]["upstream_body"]["errors"][0]["message"],
        "qty must be positive"
    );

    // Same body, one header edited: same key.
    let resp = s
        .admin(reqwest::Method::POST, "/dead-letters/dle-a/retry")
        .json(&json!({"body": {"qty": 0}, "headers": {"X-Fix": "1"}}))
        .send()
        .await
        .expect("retry");
    let status = resp.status();
    let body: Value = resp.json().await.expect("json");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["new_key"], Value::Null, "{body}");
    // Another body: a new key.
    let resp = s
        .admin(reqwest::Method::POST, "/dead-letters/dle-b/retry")
        .json(&json!({"body": {"qty": 2}}))
        .send()
        .await
        .expect("retry");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["new_key"], "dle-b.edit-1", "{body}");

    let applied = s.upstream.wait_applied(2, WAIT).await;
    let a = applied
        .iter()
        .find(|a| a.key == "dle-a")
        .expect("dle-a applied");
    let b = applied
        .iter()
        .find(|a| a.key == "dle-b.edit-1")
        .expect("edited dle-b applied under its new key");
    assert_eq!(b.body_json(), json!({"qty": 2}));
    assert_eq!(a.body_json(), json!({"qty": 0}));
    let sent_a = s.upstream.requests_to("/apply/dl/dle-a");
    let last = sent_a.last().expect("sent");
    assert_eq!(last.header("x-fix"), Some("1"));
    assert_eq!(last.header("outpost-edited-from"), Some("dle-a"));

    s.wait_status("both finished", |st| st["queue_depth"] == 0)
        .await;
    let (_, old) = s.admin_json(reqwest::Method::GET, "/mutations/dle-b").await;
    assert_eq!(old["status"], "rejected", "{old}");
    assert_eq!(old["superseded_by"], "dle-b.edit-1", "{old}");
    assert_eq!(old["edited"], true, "{old}");
    let (_, new) = s
        .admin_json(reqwest::Method::GET, "/mutations/dle-b.edit-1")
        .await;
    assert_eq!(new["edited_from"], "dle-b", "{new}");
    assert_eq!(new["status"], "succeeded", "{new}");
    let (_, same) = s.admin_json(reqwest::Method::GET, "/mutations/dle-a").await;
    assert_eq!(same["edited_from"], "dle-a", "{same}");
    assert_eq!(same["status"], "succeeded", "{same}");
    assert_eq!(s.status().await["dead_letters"], 0);

    // Bad edits are refused and change nothing.
    dead_letters(&s, &["dle-c"]).await;
    for edit in [
        json!({"headers": {"Idempotency-Key": "other"}}),
        json!({"headers": {"bad name": "x"}}),
        json!({"bdy": 1}),
    ] {
        let resp = s
            .admin(reqwest::Method::POST, "/dead-letters/dle-c/retry")
            .json(&edit)
            .send()
            .await
            .expect("retry");
        assert_eq!(resp.status(), 400, "{edit}");
    }
    assert_eq!(s.status().await["dead_letters"], 1);
}

/// #16 point 6: `outpost queue` against a running instance: tables, `--json`, exit codes.
#[tokio::test]
async fn queue_cli_lists_shows_retries_drops_pauses_and_says_what_happened() {
    let s = Setup::start("token = \"cli-token\"", false).await;
    let admin = s.outpost.admin_url();
    let cli = |args: &[&str], token: Option<&str>| {
        let mut all: Vec<&str> = vec!["queue"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--admin", &admin]);
        let env: Vec<(&str, &str)> = token
            .map(|t| vec![("OUTPOST_ADMIN_TOKEN", t)])
            .unwrap_or_default();
        run_outpost_with_env(&all, &env, Duration::from_secs(30))
    };
    let ok = |args: &[&str]| {
        let out = cli(args, Some("cli-token"));
        assert_eq!(out.code(), Some(0), "{args:?}: {}", out.stderr_str());
        out.stdout_str()
    };
    assert_eq!(ok(&["list"]), "queue is empty\n");
    s.queue("/apply/cli/1", "cli-1", "{}").await;
    s.queue("/apply/cli/2", "cli-2", "{}").await;
    let table = ok(&["list"]);
    println!("outpost queue list:\n{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("KEY    STATUS  ATTEMPTS  PARTITION"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("cli-1  queued  0         upstream"),
        "{table}"
    );
    assert_eq!(lines.last().copied(), Some("2 pending"));
    let json_out = ok(&["list", "--json"]);
    println!("outpost queue list --json:\n{json_out}");
    let doc: Value = serde_json::from_str(&json_out).expect("--json is JSON");
    assert_eq!(doc["items"][1]["idempotency_key"], "cli-2");
    let shown = ok(&["show", "cli-1"]);
    assert!(shown.contains("idempotency_key  cli-1"), "{shown}");
    let shown: Value = serde_json::from_str(&ok(&["show", "cli-2", "--json"])).expect("json");
    assert_eq!(shown["status"], "queued");

    // Not found, refused, unreachable: 1 with a message; usage: 2.
    let out = cli(&["show", "nope"], Some("cli-token"));
    assert_eq!(out.code(), Some(1));
    assert!(
        out.stderr_str().contains("no mutation with key \"nope\""),
        "{}",
        out.stderr_str()
    );
    let out = cli(&["drop", "nope"], Some("cli-token"));
    assert_eq!(out.code(), Some(1));
    let out = cli(&["list"], None);
    assert_eq!(out.code(), Some(1));
    assert!(out.stderr_str().contains("401"), "{}", out.stderr_str());
    assert!(
        out.stderr_str().contains("OUTPOST_ADMIN_TOKEN"),
        "{}",
        out.stderr_str()
    );
    let gone = format!("http://127.0.0.1:{}", free_port());
    let out = run_outpost_with_env(
        &["queue", "list", "--admin", &gone],
        &[("OUTPOST_ADMIN_TOKEN", "cli-token")],
        Duration::from_secs(30),
    );
    assert_eq!(out.code(), Some(1));
    assert!(
        out.stderr_str().contains("cannot reach the admin API"),
        "{}",
        out.stderr_str()
    );
    assert_eq!(cli(&["frobnicate"], Some("cli-token")).code(), Some(2));
    assert_eq!(cli(&["show"], Some("cli-token")).code(), Some(2));

    // Pause, drop one, resume: the other is replayed; a dead letter is retried edited.
    assert_eq!(ok(&["pause"]), "replay paused\n");
    assert_eq!(s.status().await["paused"], true);
    assert_eq!(ok(&["drop", "cli-2"]), "dropped cli-2\n");
    s.upstream.script(
        "/apply/cli/3",
        vec![
            ScriptedResponse::json(409, json!({"error": "stale version"})),
            ScriptedResponse::passthrough(),
        ],
    );
    s.queue("/apply/cli/3", "cli-3", r#"{"v":1}"#).await;
    s.upstream.restart().await;
    assert_eq!(ok(&["resume"]), "replay resumed\n");
    s.wait_status("drained", |st| {
        st["queue_depth"] == 0 && st["dead_letters"] == 1
    })
    .await;
    let dead = ok(&["dead-letters"]);
    println!("outpost queue dead-letters:\n{dead}");
    assert!(dead.contains("cli-3  conflict  409"), "{dead}");
    let dead_json: Value = serde_json::from_str(&ok(&["dead-letters", "--json"])).expect("json");
    assert_eq!(
        dead_json["items"][0]["upstream_body"]["error"],
        "stale version"
    );
    let out = ok(&[
        "retry",
        "cli-3",
        "--body",
        r#"{"v":2}"#,
        "--header",
        "If-Match: \"2\"",
    ]);
    assert_eq!(out, "retried cli-3 (edited) as cli-3.edit-1\n");
    s.upstream.wait_applied(2, WAIT).await;
    let keys: Vec<String> = s.upstream.applied().into_iter().map(|a| a.key).collect();
    assert_eq!(keys, ["cli-1", "cli-3.edit-1"]);
    let sent = s.upstream.requests_to("/apply/cli/3");
    assert_eq!(
        sent.last().and_then(|r| r.header("if-match")),
        Some("\"2\"")
    );
    let out = cli(&["retry", "cli-3"], Some("cli-token"));
    assert_eq!(out.code(), Some(1), "no longer a dead letter");
}

/// #16 point 4: the status page in a real headless browser (chromium via chromedriver): it
/// asks for the token once, shows the queue depth change when a write is queued during an
/// outage, and retries a dead letter from its button; pause and resume work from the page.
#[tokio::test]
async fn status_page_in_a_headless_browser_shows_the_queue_and_retries_a_dead_letter() {
    let browser = match Browser::start().await {
        Ok(b) => b,
        Err(why) if std::env::var_os("CI").is_some() => panic!("status page test needs: {why}"),
        Err(why) => {
            eprintln!("SKIPPED status_page_in_a_headless_browser_…: {why}");
            return;
        }
    };
    let s = Setup::start("token = \"page-token\"", false).await;
    let t = Duration::from_secs(20);
    browser.goto(&format!("{}/", s.outpost.admin_url())).await;
    browser.wait_for("#token-form", t).await;
    browser.type_into("#token-input", "page-token").await;
    browser.click("#token-form button[type=submit]").await;
    browser.wait_for("#main", t).await;
    browser.wait_text("#queue-depth", t, |v| v == "0").await;
    browser.wait_text("#stream-state", t, |v| v == "live").await;
    assert_eq!(
        browser
            .eval("return sessionStorage.getItem('outpost-admin-token')")
            .await,
        json!("page-token")
    );

    s.upstream.script(
        "/apply/page/a",
        vec![
            ScriptedResponse::json(
                422,
                json!({"errors": [{"message": "qty must be positive"}]}),
            ),
            ScriptedResponse::passthrough(),
        ],
    );
    s.queue("/apply/page/a", "page-a", r#"{"qty":0}"#).await;
    browser.wait_text("#queue-depth", t, |v| v == "1").await;
    browser
        .wait_text("#upstream-state", t, |v| v.contains("offline"))
        .await;
    browser
        .wait_text("#queue tbody", t, |v| v.contains("page-a"))
        .await;
    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page-outage.png");
    std::fs::write(&shot, png).expect("write the screenshot");
    eprintln!("screenshot during the outage: {}", shot.display());

    s.upstream.restart().await;
    let row = "#dead-letters tbody tr[data-key=\"page-a\"]";
    browser.wait_for(row, t).await;
    browser.wait_text("#dead-count", t, |v| v == "1").await;
    browser.wait_text(row, t, |v| v.contains("422")).await;
    browser
        .wait_text("#upstream-state", t, |v| v.contains("online"))
        .await;
    browser.click(&format!("{row} button.retry")).await;
    browser.wait_text("#dead-count", t, |v| v == "0").await;
    let applied = s.upstream.wait_applied(1, WAIT).await;
    assert_eq!(applied[0].key, "page-a");
    browser
        .wait_text("#recent", t, |v| v.contains("page-a → success (201)"))
        .await;

    browser.click("#pause").await;
    browser.wait_for("#paused-state", t).await;
    assert_eq!(s.status().await["paused"], true);
    browser.click("#resume").await;
    s.wait_status("resumed", |st| st["paused"] == false).await;
    browser.quit().await;
}
