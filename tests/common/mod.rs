//! Shared end-to-end test harness for `outpost`.
//!
//! - [`Upstream`]: a scriptable hyper upstream (plain or TLS) that can be stopped and restarted
//!   on the same port.
//! - [`OutpostProcess`] / [`run_outpost`]: the real `outpost` binary as a child process.
//! - [`RedisServer`]: a private `redis-server` on a free loopback port.
//! - [`Browser`]: headless chromium through chromedriver (WebDriver), for the status page.
//! - [`faultproxy::FaultProxy`]: a fault-injecting TCP proxy between outpost and the upstream.
//! - [`reliability::report`]: the figures lines of the reliability suite (issue #21).
//! - [`client`], [`free_port`], [`eventually`]: small helpers.
//!
//! Everything binds to `127.0.0.1` only.
#![allow(dead_code, unused_imports)]

pub mod browser;
pub mod faultproxy;
pub mod process;
pub mod raw;
pub mod redis_server;
pub mod reliability;
pub mod setup;
pub mod tmpfs;
pub mod upstream;

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

pub use browser::Browser;
pub use process::{
    OUTPOST_BIN, OutpostProcess, OutputExt, run_outpost, run_outpost_timeout, run_outpost_with_env,
};
pub use raw::{RawResponse, closed_within, raw, read_response};
pub use redis_server::{RedisCluster, RedisOptions, RedisServer, redis_cli};
pub use setup::{FAST, Outpost, config_with_replay};
pub use tmpfs::Tmpfs;
pub use upstream::{
    Applied, BYTES_CHUNK, Ending, Fault, RecordedRequest, RequestEnd, ScriptedResponse, TestPki,
    Upstream, VersionedWrite, pattern_byte, pattern_bytes,
};

/// Ports this test process already handed out (to an upstream, which may be stopped and must
/// find its port free again on restart, or to a listener): never handed out twice, so one
/// test's stopped upstream port cannot become another test's listener.
static CLAIMED: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

/// Note that `port` belongs to a server of this test process; returns false if it already did.
pub fn claim_port(port: u16) -> bool {
    let mut claimed = CLAIMED.lock().unwrap_or_else(|e| e.into_inner());
    if claimed.contains(&port) {
        return false;
    }
    claimed.push(port);
    true
}

/// A currently free TCP port on `127.0.0.1` (bind to port 0, read it, release it), never one
/// handed out before in this process.
pub fn free_port() -> u16 {
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind 127.0.0.1:0 to find a free port");
        let port = listener
            .local_addr()
            .expect("local_addr of the probe listener")
            .port();
        if claim_port(port) {
            return port;
        }
    }
}

/// A fresh temporary directory (deleted on drop), e.g. for `--data-dir`.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("outpost-test-")
        .tempdir()
        .expect("create a temp dir")
}

/// The test client's settings: no proxy from the environment, 2 s connect timeout, 30 s total
/// timeout, no automatic redirects. Add to it (e.g. a CA) and `build()`.
pub fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
}

/// An HTTP client for tests (see [`client_builder`] for its settings).
pub fn client() -> reqwest::Client {
    client_builder()
        .build()
        .expect("build the test HTTP client")
}

/// A client that trusts only the CA in the PEM file `ca_pem_path` (e.g.
/// [`Upstream::ca_pem_path`]).
pub fn client_with_ca(ca_pem_path: &Path) -> reqwest::Client {
    let pem = std::fs::read(ca_pem_path)
        .unwrap_or_else(|e| panic!("read CA file {}: {e}", ca_pem_path.display()));
    let cert = reqwest::Certificate::from_pem(&pem).expect("parse the CA certificate PEM");
    client_builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(cert)
        .build()
        .expect("build the test HTTPS client")
}

/// Polls `check` every 20 ms until it returns `true`; panics with `what` after `timeout`.
///
/// ```ignore
/// eventually(Duration::from_secs(5), "queue drained", || async { depth().await == 0 }).await;
/// ```
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
