//! Stored data across releases: a data directory written by an earlier release opens and
//! drains in this one.
//!
//! `tests/fixtures/store-format-0/outpost.redb` was written by the release of 2026-11-23
//! (record format 0, before records carried a version): three mutations queued while the
//! upstream was down (`fixture-1..3`, `POST /apply/fixture/N`, body `{"n":N}`, `Authorization:
//! Bearer token-N`) and a fourth (`fixture-dropped`) dropped by the operator. The test works on
//! a copy; the fixture itself is never written.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn a_store_written_by_the_previous_release_opens_and_drains_in_order() {
    let fixture = fixture();
    let dir = temp_dir();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    std::fs::copy(&fixture, data.join("outpost.redb")).expect("copy the fixture");

    let upstream = Upstream::start().await;
    let url = upstream.url();
    let mut outpost = OutpostProcess::start(&["--upstream", &url], &data).await;

    let applied = upstream.wait_applied(3, Duration::from_secs(20)).await;
    let keys: Vec<&str> = applied.iter().map(|a| a.key.as_str()).collect();
    assert_eq!(
        keys,
        ["fixture-1", "fixture-2", "fixture-3"],
        "in acceptance order"
    );
    for (i, a) in applied.iter().enumerate() {
        let n = i + 1;
        assert_eq!(a.path, format!("/apply/fixture/{n}"));
        assert_eq!(a.body_json(), serde_json::json!({ "n": n }));
        let auth = format!("Bearer token-{n}");
        assert_eq!(a.authorization.as_deref(), Some(auth.as_str()));
    }
    // Nothing else: the dropped one stays dropped, and nothing is sent twice.
    let http = client();
    let status_url = format!("{}/status", outpost.admin_url());
    eventually(Duration::from_secs(10), "queue drained", || async {
        let Ok(resp) = http.get(&status_url).send().await else {
            return false;
        };
        let status: serde_json::Value = resp.json().await.unwrap_or_default();
        status["queue_depth"] == 0
    })
    .await;
    assert_eq!(
        upstream.seen_requests(),
        3,
        "each delivered once, the dropped one never"
    );
    assert_eq!(upstream.seen_requests_for("fixture-dropped"), 0);
    // The directory is now marked with this build's layout.
    outpost.terminate();
    outpost.wait_exit().await;
    assert_eq!(meta(&data.join("outpost.redb"), "layout_version"), Some(1));
    let mut outpost = OutpostProcess::start(&["--upstream", &url], &data).await;
    // Format-0 records carry no owner: they answer no app (only the operator).
    let resp = http
        .get(format!("{}/_outpost/mutations/fixture-1", outpost.url()))
        .header("Authorization", "Bearer token-1")
        .send()
        .await
        .expect("status document");
    assert_eq!(resp.status(), 404);
    outpost.terminate();
    outpost.wait_exit().await;
}

/// A data directory written by a newer outpost (layout version 2) is refused with exit 1 and a
/// message naming both versions; nothing in it is changed.
#[tokio::test]
async fn a_data_directory_of_a_newer_layout_is_refused_naming_both_versions() {
    let dir = temp_dir();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    std::fs::copy(fixture(), data.join("outpost.redb")).expect("copy the fixture");
    set_meta(&data.join("outpost.redb"), "layout_version", 2);
    let data_arg = data.display().to_string();
    let out = run_outpost_timeout(
        &[
            "serve",
            "--data-dir",
            &data_arg,
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--admin-listen",
            &format!("127.0.0.1:{}", free_port()),
            "--upstream",
            "http://127.0.0.1:9",
        ],
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("data directory has format version 2")
            && stderr.contains("version 1 this outpost reads"),
        "{stderr}"
    );
    assert_eq!(meta(&data.join("outpost.redb"), "layout_version"), Some(2));
}

/// The same for a Redis key prefix marked by a newer outpost.
#[cfg_attr(
    not(has_redis_server),
    ignore = "redis-server not installed: apt-get install redis-server"
)]
#[tokio::test]
async fn a_redis_prefix_of_a_newer_layout_is_refused_naming_both_versions() {
    let redis = RedisServer::start();
    let out = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port().to_string(),
            "SET",
            "outpost:layout",
            "7",
        ])
        .output()
        .expect("redis-cli");
    assert!(out.status.success());
    let dir = temp_dir();
    let data_arg = dir.path().display().to_string();
    let out = run_outpost_timeout(
        &[
            "serve",
            "--redis",
            &redis.url(),
            "--data-dir",
            &data_arg,
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--admin-listen",
            &format!("127.0.0.1:{}", free_port()),
            "--upstream",
            "http://127.0.0.1:9",
        ],
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("redis key prefix has format version 7")
            && stderr.contains("version 2 this outpost reads"),
        "{stderr}"
    );
}

fn fixture() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/store-format-0/outpost.redb")
}

const META: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");

fn set_meta(path: &std::path::Path, key: &str, value: u64) {
    let db = redb::Database::create(path).expect("open the store");
    let txn = db.begin_write().expect("write");
    txn.open_table(META)
        .expect("meta")
        .insert(key, value)
        .expect("insert");
    txn.commit().expect("commit");
}

fn meta(path: &std::path::Path, key: &str) -> Option<u64> {
    use redb::ReadableDatabase as _;
    let db = redb::Database::create(path).expect("open the store");
    let read = db.begin_read().expect("read");
    let table = read.open_table(META).expect("meta");
    table.get(key).expect("get").map(|v| v.value())
}
