//! HAR recording (`serve --record`) and the load tool (`outpost loadtest`), end to end with the
//! real binary on loopback (issue #17).

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::{OutpostProcess, Upstream, run_outpost_timeout, temp_dir};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/har")
        .join(name)
}

/// `outpost ARGS` off the runtime's threads (the in-process upstream keeps answering).
async fn outpost(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_outpost_timeout(&args, Duration::from_secs(28))
    })
    .await
    .expect("join")
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("read report")).expect("report is JSON")
}

async fn replay(har: &Path, target: &str, report: &Path) -> Output {
    outpost(vec![
        "loadtest".into(),
        "--har".into(),
        har.display().to_string(),
        "--target".into(),
        target.into(),
        "--concurrency".into(),
        "2".into(),
        "--report".into(),
        report.display().to_string(),
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_har_is_redacted_replays_and_is_repaired_when_cut() {
    let upstream = Upstream::start().await;
    let dir = temp_dir();
    let har = dir.path().join("traffic.har");
    let data = dir.path().join("data");
    let config = dir.path().join("outpost.toml");
    std::fs::write(
        &config,
        "[proxy]\nrecord_redact_headers = [\"X-Api-Secret\"]\n",
    )
    .expect("write config");
    let mut proxy = OutpostProcess::start(
        &[
            "--config",
            &config.display().to_string(),
            "--upstream",
            &upstream.url(),
            "--record",
            &har.display().to_string(),
        ],
        &data,
    )
    .await;
    let client = common::client();
    for i in 0..3 {
        let resp = client
            .get(format!("{}/items/{i}", proxy.url()))
            .header("authorization", "Bearer SECRET-TOKEN-123")
            .header("cookie", "session=SECRET-COOKIE")
            .send()
            .await
            .expect("GET");
        resp.bytes().await.expect("body");
        let resp = client
            .post(format!("{}/items", proxy.url()))
            .header("x-api-secret", "SECRET-CONFIGURED")
            .header("content-type", "application/json")
            .body(format!("{{\"n\":{i}}}"))
            .send()
            .await
            .expect("POST");
        resp.bytes().await.expect("body");
    }
    // Set-Cookie in an answer is redacted too.
    let resp = client
        .get(format!(
            "{}/echo/cookie?header=Set-Cookie:sid%3Dabc",
            proxy.url()
        ))
        .send()
        .await
        .expect("GET cookie");
    assert!(resp.headers().contains_key("set-cookie"));
    resp.bytes().await.expect("body");
    // A body over record_max_body_bytes (64 KiB) is cut and marked.
    let big = "x".repeat(100 * 1024);
    let resp = client
        .post(format!("{}/big", proxy.url()))
        .body(big)
        .send()
        .await
        .expect("POST big");
    resp.bytes().await.expect("body");
    // Entries are flushed as they happen, before shutdown.
    common::eventually(Duration::from_secs(5), "8 entries flushed", || async {
        std::fs::read_to_string(&har)
            .map(|t| t.matches("\"startedDateTime\"").count() >= 8)
            .unwrap_or(false)
    })
    .await;
    let flushed = std::fs::read_to_string(&har).expect("read HAR");
    let status: Value = client
        .get(format!("{}/status", proxy.admin_url()))
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("status JSON");
    assert_eq!(status["record_dropped"], 0, "{status}");
    proxy.terminate();
    proxy.wait_exit().await;

    let text = std::fs::read_to_string(&har).expect("read HAR");
    assert!(!text.contains("SECRET-TOKEN-123"), "token leaked:\n{text}");
    assert!(!text.contains("SECRET-COOKIE"), "cookie leaked");
    assert!(
        !text.contains("SECRET-CONFIGURED"),
        "configured header leaked"
    );
    assert!(text.contains("[redacted]"));
    let doc: Value = serde_json::from_str(&text).expect("closed HAR is JSON");
    let entries = doc["log"]["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 8, "{text}");
    assert_eq!(doc["log"]["version"], "1.2");
    let first = &entries[0];
    assert_eq!(
        first["request"]["headers"][0]["value"], "[redacted]",
        "{first}"
    );
    assert_eq!(first["_outpost"]["source"], "upstream");
    assert!(
        first["_outpost"]["cache_status"]
            .as_str()
            .is_some_and(|c| c.starts_with("outpost")),
        "{first}"
    );
    assert!(first["timings"]["wait"].is_number());
    let post = &entries[1];
    assert_eq!(post["request"]["method"], "POST");
    assert_eq!(post["request"]["postData"]["text"], "{\"n\":0}");
    let cookie = &entries[6];
    let set_cookie = cookie["response"]["headers"]
        .as_array()
        .and_then(|h| h.iter().find(|h| h["name"] == "set-cookie"))
        .expect("set-cookie recorded");
    assert_eq!(set_cookie["value"], "[redacted]");
    let big = &entries[7];
    assert_eq!(big["request"]["postData"]["_truncated"], true, "{big:.300}");
    assert_eq!(
        big["request"]["postData"]["text"]
            .as_str()
            .map(str::len)
            .unwrap_or(0),
        64 * 1024
    );

    // Replay the recording (against the upstream directly).
    let report = dir.path().join("report.json");
    let out = replay(&har, &upstream.url(), &report).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let r = read_json(&report);
    assert_eq!(r["requests"], 8, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    let seen = upstream.requests().len();
    assert_eq!(seen, 16, "recorded 8 + replayed 8");

    // Cut mid-entry, as a crash leaves it: the loader keeps the complete entries.
    let cut = dir.path().join("cut.har");
    let at = flushed.rfind("\"response\"").expect("an entry");
    std::fs::write(&cut, &flushed[..at]).expect("write cut HAR");
    let out = replay(&cut, &upstream.url(), &report).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(read_json(&report)["requests"], 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chrome_firefox_and_mitmproxy_exports_load_and_replay() {
    let upstream = Upstream::start().await;
    let dir = temp_dir();
    let report = dir.path().join("report.json");
    for name in ["chrome.har", "firefox.har", "mitmproxy.har"] {
        upstream.clear_requests();
        let out = replay(&fixture(name), &upstream.url(), &report).await;
        assert_eq!(out.status.code(), Some(0), "{name}: {}", describe(&out));
        let r = read_json(&report);
        assert_eq!(r["requests"], 2, "{name}: {r}");
        assert_eq!(r["errors"], 0, "{name}: {r}");
        let seen = upstream.requests();
        assert_eq!(seen.len(), 2, "{name}");
        match name {
            "chrome.har" => {
                let post = seen.iter().find(|r| r.method == "POST").expect("POST");
                assert_eq!(post.body_str(), "{\"item\":\"tea\"}");
                assert!(post.header("idempotency-key").is_some());
            }
            "firefox.har" => {
                let post = seen.iter().find(|r| r.method == "POST").expect("POST");
                assert_eq!(post.body_str(), "user=ada&note=a%20b%26c");
            }
            _ => {
                let put = seen.iter().find(|r| r.method == "PUT").expect("PUT");
                assert_eq!(put.body.as_ref(), &[0xde, 0xad, 0xbe, 0xef]);
                assert_eq!(put.path_and_query(), "/items/7?v=2");
            }
        }
    }
    // --speed keeps the recorded pacing (the POST was 400 ms after the GET), scaled.
    let out = outpost(vec![
        "loadtest".into(),
        "--har".into(),
        fixture("chrome.har").display().to_string(),
        "--target".into(),
        upstream.url(),
        "--speed".into(),
        "2".into(),
        "--report".into(),
        report.display().to_string(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let ms = read_json(&report)["duration_ms"].as_u64().unwrap_or(0);
    assert!((200..2000).contains(&ms), "400 ms at speed 2 took {ms} ms");
    // --only-host keeps only that host's entries.
    let out = outpost(vec![
        "loadtest".into(),
        "--har".into(),
        fixture("chrome.har").display().to_string(),
        "--target".into(),
        upstream.url(),
        "--only-host".into(),
        "elsewhere.example".into(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_har_exits_2_naming_entry_and_field() {
    let out = outpost(vec![
        "loadtest".into(),
        "--har".into(),
        fixture("malformed.har").display().to_string(),
        "--target".into(),
        "http://127.0.0.1:9".into(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("log.entries[1].request.url"), "{err}");
    // A non-loopback mock upstream is refused.
    let out = outpost(vec![
        "loadtest".into(),
        "--har".into(),
        fixture("chrome.har").display().to_string(),
        "--target".into(),
        "http://127.0.0.1:9".into(),
        "--mock-upstream".into(),
        "0.0.0.0:0".into(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_outages_through_outpost_lose_nothing_and_apply_nothing_twice() {
    let port = common::free_port();
    let mock = format!("127.0.0.1:{port}");
    let dir = temp_dir();
    let proxy = OutpostProcess::start(
        &["--upstream", &format!("http://{mock}")],
        &dir.path().join("data"),
    )
    .await;
    let report = dir.path().join("report.json");
    let out = outpost(vec![
        "loadtest".into(),
        "--har".into(),
        fixture("chrome.har").display().to_string(),
        "--target".into(),
        proxy.url(),
        "--mock-upstream".into(),
        mock,
        "--outage".into(),
        "1s+1500ms".into(),
        "--outage".into(),
        "3500ms+1500ms".into(),
        "--duration".into(),
        "6s".into(),
        "--rate".into(),
        "40".into(),
        "--admin".into(),
        proxy.admin_url(),
        "--drain-timeout".into(),
        "15s".into(),
        "--report".into(),
        report.display().to_string(),
        "--plot".into(),
        dir.path().join("plots").display().to_string(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    for svg in ["latency.svg", "throughput.svg"] {
        let text = std::fs::read_to_string(dir.path().join("plots").join(svg)).expect(svg);
        assert!(
            text.contains("<svg") && text.contains("upstream down"),
            "{svg}"
        );
    }
    let r = read_json(&report);
    for field in [
        "requests",
        "errors",
        "status_counts",
        "latency_ms",
        "throughput_rps",
        "sources",
        "duration_ms",
        "outages_ms",
        "mutations",
    ] {
        assert!(r.get(field).is_some(), "report lacks {field}: {r}");
    }
    for p in ["p50", "p90", "p99", "p999", "max"] {
        assert!(r["latency_ms"][p].is_number(), "{p}: {r}");
    }
    let m = &r["mutations"];
    assert_eq!(m["lost"], 0, "{r}");
    assert_eq!(m["applied_twice"], 0, "{r}");
    assert_eq!(m["drained"], true, "{r}");
    assert!(m["drain_ms"].is_number(), "{r}");
    assert!(m["acknowledged"].as_u64().unwrap_or(0) > 50, "{r}");
    assert!(m["applied"].as_u64() >= m["acknowledged"].as_u64(), "{r}");
    // The outages were seen: some writes were queued, some reads served stale.
    assert!(r["sources"]["queued"].as_u64().unwrap_or(0) > 0, "{r}");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("mut. lost"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_targets_replay_with_a_ca_file_and_a_bad_ca_file_is_a_usage_error() {
    let upstream = Upstream::start_tls().await;
    let dir = temp_dir();
    let report = dir.path().join("report.json");
    let ca = upstream.ca_pem_path().display().to_string();
    let args = |ca_file: Option<&str>| {
        let mut args = vec![
            "loadtest".to_owned(),
            "--har".into(),
            fixture("chrome.har").display().to_string(),
            "--target".into(),
            upstream.url(),
            "--report".into(),
            report.display().to_string(),
        ];
        if let Some(ca) = ca_file {
            args.extend(["--ca-file".to_owned(), ca.to_owned()]);
        }
        args
    };
    let out = outpost(args(Some(&ca))).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let r = read_json(&report);
    assert_eq!(r["requests"], 2, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    let seen = upstream.requests();
    assert_eq!(seen.len(), 2, "both entries reached the TLS upstream");
    let post = seen.iter().find(|r| r.method == "POST").expect("POST");
    assert_eq!(post.body_str(), "{\"item\":\"tea\"}");

    // Without the CA the certificate is not trusted: every request is an error, none arrives.
    upstream.clear_requests();
    let out = outpost(args(None)).await;
    assert_eq!(read_json(&report)["errors"], 2, "{}", describe(&out));
    assert!(upstream.requests().is_empty());

    let missing = dir.path().join("no-such-ca.pem").display().to_string();
    let out = outpost(args(Some(&missing))).await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--ca-file") && stderr.contains("no-such-ca.pem"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_answered_during_the_shutdown_grace_is_recorded() {
    let upstream = Upstream::start().await;
    let dir = temp_dir();
    let har = dir.path().join("traffic.har");
    let mut proxy = OutpostProcess::start(
        &[
            "--upstream",
            &upstream.url(),
            "--record",
            &har.display().to_string(),
        ],
        &dir.path().join("data"),
    )
    .await;
    // Stop outpost while the slow GET (3 s) is in flight.
    let url = format!("{}/slow?ms=3000", proxy.url());
    let slow = tokio::spawn(async move { common::client().get(url).send().await });
    common::eventually(
        Duration::from_secs(5),
        "the slow GET reached the upstream",
        || async { !upstream.requests_to("/slow").is_empty() },
    )
    .await;
    assert!(!slow.is_finished(), "still in flight");
    proxy.terminate();
    let resp = slow
        .await
        .expect("join")
        .expect("the slow GET is answered in the grace");
    assert_eq!(resp.status(), 200);
    let status = proxy.wait_exit().await;
    assert!(status.success(), "{status:?}");
    let text = std::fs::read_to_string(&har).expect("read HAR");
    let har: Value = serde_json::from_str(&text).expect("the HAR is closed and parses");
    let entries = har["log"]["entries"].as_array().expect("entries");
    assert!(
        entries.iter().any(|e| e["request"]["url"]
            .as_str()
            .is_some_and(|u| u.contains("/slow"))),
        "the request finished in the grace is in the HAR: {text}"
    );
}
