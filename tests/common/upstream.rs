//! A scriptable upstream HTTP server for end-to-end tests.
//!
//! [`Upstream`] is a real hyper 1.x server bound to `127.0.0.1`. It can be stopped (listener and
//! every open connection closed, so a proxy in front of it sees connection refused / reset) and
//! restarted on the same port, keeping everything it recorded.
//!
//! Endpoints:
//! - `ANY /echo...`: 200 JSON describing the request (see [`Upstream`]).
//! - `GET /bytes/{n}`: `n` deterministic bytes (see [`pattern_byte`]).
//! - `POST|PUT|PATCH|DELETE /apply/...`: an idempotent mutation applier keyed by `Idempotency-Key`.
//! - `GET|PUT|PATCH|DELETE /versioned/...`: a record store that keeps an `ETag` version per
//!   path and *ignores* `Idempotency-Key` (every write is applied): `GET` answers the JSON
//!   record with `ETag: "v<n>"` (404 when absent); `PUT` replaces, `PATCH` merges (RFC 7396),
//!   `DELETE` removes; a write whose `If-Match` is not the current version (or names a missing
//!   record) is answered 412 and changes nothing. See [`Upstream::versioned_writes`].
//! - `GET /slow?ms=N`: answers 200 after `N` ms.
//! - `GET /ws`: WebSocket echo.
//! - anything else: 404 JSON.
//!
//! Scripts ([`Upstream::script`]) take precedence over all of these. A scripted answer may be a
//! [`Fault`] instead: the request is recorded (= applied, for an upstream that ignores
//! `Idempotency-Key`), then the connection is closed without an answer (FIN) or reset (RST).
//! [`Upstream::close_idle_after`] makes the server close idle keep-alive connections, as a
//! server-side keep-alive timeout does. How each request ended is kept in
//! [`Upstream::endings`].

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;

/// Size of the chunks `/bytes/{n}` streams.
pub const BYTES_CHUNK: usize = 64 * 1024;

type RespBody = UnsyncBoxBody<Bytes, Infallible>;

/// Locks a mutex, ignoring poisoning (a panicking test must not hide the real failure).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The byte at offset `i` of every `/bytes/{n}` answer: `(i % 251) as u8`.
pub fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

/// The full body `/bytes/{n}` answers with, for comparisons.
pub fn pattern_bytes(n: u64) -> Vec<u8> {
    (0..n).map(pattern_byte).collect()
}

// ---------------------------------------------------------------------------------------------
// Public data types
// ---------------------------------------------------------------------------------------------

/// A write `/versioned/...` received, and what it answered.
#[derive(Clone, Debug)]
pub struct VersionedWrite {
    /// `PUT`, `PATCH` or `DELETE`.
    pub method: String,
    /// The path.
    pub path: String,
    /// The body (JSON for PUT and PATCH).
    pub body: Bytes,
    /// Its `If-Match`, if any.
    pub if_match: Option<String>,
    /// Its `Idempotency-Key`, if any.
    pub key: Option<String>,
    /// The status answered (412: not applied).
    pub status: u16,
}

impl VersionedWrite {
    /// The body as JSON (`null` when it is not).
    pub fn body_json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A request the upstream received (every request is recorded, whatever the endpoint).
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// HTTP method.
    pub method: Method,
    /// Path without the query string.
    pub path: String,
    /// Raw query string (without `?`), if any.
    pub query: Option<String>,
    /// All request headers.
    pub headers: HeaderMap,
    /// The complete request body.
    pub body: Bytes,
    /// HTTP version the request arrived with.
    pub version: Version,
    /// When the request arrived (after its body was read).
    pub at: Instant,
}

impl RecordedRequest {
    /// First value of header `name` (case-insensitive), if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Path plus `?query` if there is one.
    pub fn path_and_query(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }

    /// The body as (lossy) UTF-8.
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON (panics with a clear message if it is not JSON).
    pub fn body_json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "request body of {} {} is not JSON ({e}): {:?}",
                self.method,
                self.path,
                self.body_str()
            )
        })
    }
}

/// A mutation the `/apply/...` endpoint applied (once per idempotency key).
#[derive(Clone, Debug)]
pub struct Applied {
    /// The `Idempotency-Key` it was applied under.
    pub key: String,
    /// HTTP method (`POST`, `PUT`, `PATCH` or `DELETE`).
    pub method: String,
    /// Path plus `?query` if there was one.
    pub path: String,
    /// Request body.
    pub body: Bytes,
    /// Order index, 1-based: the n-th distinct key applied by this upstream.
    pub seq: u64,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The `Outpost-Accepted-At` header, if any.
    pub accepted_at: Option<String>,
    /// All request headers, for anything else a test wants to look at.
    pub headers: HeaderMap,
}

impl Applied {
    /// The body as (lossy) UTF-8.
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON (panics with a clear message if it is not JSON).
    pub fn body_json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "applied body for key {} is not JSON ({e}): {:?}",
                self.key,
                self.body_str()
            )
        })
    }
}

/// One scripted answer; see [`Upstream::script`].
#[derive(Clone, Debug)]
pub struct ScriptedResponse {
    /// Status code.
    pub status: u16,
    /// Response headers, in order (the same name may repeat).
    pub headers: Vec<(String, String)>,
    /// Response body.
    pub body: Bytes,
    /// Wait this long before answering (to provoke timeouts).
    pub delay: Duration,
    /// If set, the request is handled by the normal endpoints instead (status/headers/body
    /// are ignored; `delay` still applies). Lets a script say "fail twice, then really apply".
    pub passthrough: bool,
    /// If set, no answer at all: after `delay` the connection is closed or reset (see
    /// [`Fault`]); status, headers, body and `passthrough` are ignored.
    pub fault: Option<Fault>,
}

/// A scripted failure of one exchange, after the request was read and recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Close the connection without answering (FIN): "applied, then the answer was lost".
    HangUp,
    /// Reset the connection without answering (RST, `SO_LINGER` 0), nothing written.
    Reset,
}

/// How the upstream's handling of one request ended; see [`Upstream::endings`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// An answer with this status was handed to the connection to be written.
    Answered(u16),
    /// The scripted [`Fault`] was carried out.
    Faulted(Fault),
    /// The client went away before the answer was ready (the handler was dropped).
    Abandoned,
}

/// The end of one request's handling (see [`Upstream::endings`]).
#[derive(Clone, Debug)]
pub struct RequestEnd {
    /// Path without the query string.
    pub path: String,
    /// The request's `Idempotency-Key`, if any.
    pub key: Option<String>,
    /// How it ended.
    pub how: Ending,
    /// When it ended.
    pub at: Instant,
}

impl ScriptedResponse {
    /// An answer with `status`, no headers and an empty body.
    pub fn new(status: u16) -> Self {
        ScriptedResponse {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
            delay: Duration::ZERO,
            passthrough: false,
            fault: None,
        }
    }

    /// An answer with `status` and a JSON body (`Content-Type: application/json`).
    pub fn json(status: u16, body: serde_json::Value) -> Self {
        Self::new(status)
            .header("content-type", "application/json")
            .body(body.to_string())
    }

    /// An answer with `status` and a text body (`Content-Type: text/plain`).
    pub fn text(status: u16, body: &str) -> Self {
        Self::new(status)
            .header("content-type", "text/plain; charset=utf-8")
            .body(body.to_owned())
    }

    /// Not an answer: hand the request to the normal endpoints (`/apply`, `/echo`, ...).
    pub fn passthrough() -> Self {
        ScriptedResponse {
            passthrough: true,
            ..Self::new(0)
        }
    }

    /// Not an answer: record the request (the upstream applied it), then close the connection
    /// without answering (after `delay`, if set).
    pub fn hang_up() -> Self {
        ScriptedResponse {
            fault: Some(Fault::HangUp),
            ..Self::new(0)
        }
    }

    /// Not an answer: record the request, then reset the connection (RST) without writing a
    /// byte (after `delay`, if set).
    pub fn reset() -> Self {
        ScriptedResponse {
            fault: Some(Fault::Reset),
            ..Self::new(0)
        }
    }

    /// Adds a response header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// Delays the answer.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Shared state (survives stop/restart)
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Shared {
    /// Requests served so far (all endpoints); the value of `X-Upstream-Count`.
    served: AtomicU64,
    /// Server-side keep-alive timeout in ms (0 = keep idle connections open).
    idle_timeout_ms: AtomicU64,
    /// Connections closed because they were idle for `idle_timeout_ms`.
    idle_closed: AtomicU64,
    inner: Mutex<Inner>,
}

impl Shared {
    fn idle_timeout(&self) -> Option<Duration> {
        match self.idle_timeout_ms.load(Ordering::SeqCst) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    fn record_end(&self, path: &str, key: Option<String>, how: Ending) {
        lock(&self.inner).endings.push(RequestEnd {
            path: path.to_owned(),
            key,
            how,
            at: Instant::now(),
        });
    }
}

#[derive(Default)]
struct Inner {
    requests: Vec<RecordedRequest>,
    /// `/versioned/...`: path → (version, record).
    versioned: HashMap<String, (u64, serde_json::Value)>,
    /// `/versioned/...` writes in arrival order.
    versioned_writes: Vec<VersionedWrite>,
    applied: Vec<Applied>,
    /// Stored first answer per idempotency key: (status, body).
    answers: HashMap<String, (u16, Bytes)>,
    apply_seen: u64,
    apply_seen_per_key: HashMap<String, u64>,
    scripts: Vec<Script>,
    endings: Vec<RequestEnd>,
}

struct Script {
    prefix: String,
    queue: VecDeque<ScriptedResponse>,
}

impl Inner {
    /// Next scripted answer for `path` (longest matching prefix wins), if any.
    fn next_scripted(&mut self, path: &str) -> Option<ScriptedResponse> {
        let script = self
            .scripts
            .iter_mut()
            .filter(|s| path.starts_with(&s.prefix))
            .max_by_key(|s| s.prefix.len())?;
        if script.queue.len() > 1 {
            script.queue.pop_front()
        } else {
            script.queue.front().cloned()
        }
    }
}

/// Connection tasks of one running generation; `None` once stopped.
type ConnSet = Arc<Mutex<Option<JoinSet<()>>>>;

fn spawn_tracked<F>(conns: &ConnSet, fut: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let mut guard = lock(conns);
    if let Some(set) = guard.as_mut() {
        while set.try_join_next().is_some() {}
        set.spawn(fut);
    }
}

struct Running {
    accept: JoinHandle<()>,
    conns: ConnSet,
}

// ---------------------------------------------------------------------------------------------
// TLS material
// ---------------------------------------------------------------------------------------------

/// A throw-away PKI: a self-signed CA and a leaf for `localhost` and `127.0.0.1` signed by it,
/// written as PEM files into a temporary directory (deleted on drop).
///
/// Used by [`Upstream::start_tls`]; tests can also use it for outpost's own TLS listener
/// (`proxy.tls_cert` = [`TestPki::cert_pem_path`], `proxy.tls_key` = [`TestPki::key_pem_path`]).
pub struct TestPki {
    dir: tempfile::TempDir,
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    leaf_der: CertificateDer<'static>,
    leaf_key_der: Vec<u8>,
}

impl TestPki {
    /// Generates a fresh CA and leaf certificate and writes `ca.pem`, `cert.pem` (leaf then CA)
    /// and `key.pem` (PKCS#8).
    pub fn generate() -> TestPki {
        let ca_key = KeyPair::generate().expect("generate CA key");
        let mut ca_params =
            CertificateParams::new(Vec::<String>::new()).expect("CA certificate params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "outpost test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .expect("self-sign CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf_key = KeyPair::generate().expect("generate leaf key");
        let mut leaf_params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("leaf certificate params");
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        leaf_params.use_authority_key_identifier_extension = true;
        leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_cert = leaf_params
            .signed_by(&leaf_key, &issuer)
            .expect("sign leaf certificate");

        let dir = tempfile::Builder::new()
            .prefix("outpost-test-pki-")
            .tempdir()
            .expect("create temp dir for test PKI");
        let ca_pem = ca_cert.pem();
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).expect("write ca.pem");
        std::fs::write(
            dir.path().join("cert.pem"),
            format!("{}{}", leaf_cert.pem(), ca_pem),
        )
        .expect("write cert.pem");
        std::fs::write(dir.path().join("key.pem"), leaf_key.serialize_pem())
            .expect("write key.pem");

        TestPki {
            dir,
            ca_pem,
            ca_der: ca_cert.der().clone(),
            leaf_der: leaf_cert.der().clone(),
            leaf_key_der: leaf_key.serialize_der(),
        }
    }

    /// The CA certificate as PEM text.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Path of the CA certificate (PEM).
    pub fn ca_pem_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Path of the leaf certificate chain (PEM: leaf, then CA).
    pub fn cert_pem_path(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// Path of the leaf private key (PEM, PKCS#8).
    pub fn key_pem_path(&self) -> PathBuf {
        self.dir.path().join("key.pem")
    }

    /// A rustls server config (ring provider) presenting the leaf, with ALPN `h2`, `http/1.1`.
    pub fn server_config(&self) -> rustls::ServerConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key_der.clone()));
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("rustls protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![self.leaf_der.clone(), self.ca_der.clone()], key)
            .expect("rustls server certificate");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config
    }
}

// ---------------------------------------------------------------------------------------------
// Upstream
// ---------------------------------------------------------------------------------------------

/// A test upstream on `127.0.0.1` (see the module docs for its endpoints).
///
/// `ANY /echo...` answers 200 JSON
/// `{"method","path","query","headers":{lowercased name: value},"body","body_base64","body_len",
/// "version","count"}` (`body` is UTF-8 text, or base64 with `body_base64: true`; repeated
/// headers are joined with `", "`). Query parameters shape the answer:
/// `cc=` sets `Cache-Control`, `vary=` sets `Vary`, `etag=` sets `ETag` (and a matching
/// `If-None-Match` gets a 304), `status=` sets the status, `header=Name:Value` (repeatable) adds
/// a header. Every answer carries `X-Upstream-Count`: requests served so far, this one included.
///
/// Must be started and used from within a tokio runtime; dropping it stops it.
pub struct Upstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    tls: Option<(TestPki, TlsAcceptor)>,
    running: Mutex<Option<Running>>,
}

impl Upstream {
    /// Starts a plain HTTP upstream (HTTP/1.1, and h2c with prior knowledge) on a free port.
    pub async fn start() -> Upstream {
        Self::start_inner(None).await
    }

    /// Starts a TLS upstream (ALPN `h2` and `http/1.1`) with a freshly generated CA; see
    /// [`Upstream::ca_pem_path`]. Its [`Upstream::url`] is `https://localhost:PORT`.
    pub async fn start_tls() -> Upstream {
        let pki = TestPki::generate();
        let acceptor = TlsAcceptor::from(Arc::new(pki.server_config()));
        Self::start_inner(Some((pki, acceptor))).await
    }

    async fn start_inner(tls: Option<(TestPki, TlsAcceptor)>) -> Upstream {
        // A port no other server of this process had: its listeners take theirs from
        // `free_port`, which then never hands this one out, even while the upstream is stopped.
        let (listener, addr) = loop {
            let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .expect("bind upstream on 127.0.0.1:0");
            let addr = listener.local_addr().expect("upstream local_addr");
            if super::claim_port(addr.port()) {
                break (listener, addr);
            }
        };
        let upstream = Upstream {
            addr,
            shared: Arc::new(Shared::default()),
            tls,
            running: Mutex::new(None),
        };
        upstream.serve(listener);
        upstream
    }

    fn serve(&self, listener: TcpListener) {
        let conns: ConnSet = Arc::new(Mutex::new(Some(JoinSet::new())));
        let accept = tokio::spawn(accept_loop(
            listener,
            self.shared.clone(),
            conns.clone(),
            self.tls.as_ref().map(|(_, acceptor)| acceptor.clone()),
        ));
        *lock(&self.running) = Some(Running { accept, conns });
    }

    /// Stops serving: closes the listener and every open connection (including WebSockets and
    /// requests in progress). Returns once all of them are closed. No-op if already stopped.
    pub async fn stop(&self) {
        let running = lock(&self.running).take();
        if let Some(running) = running {
            running.accept.abort();
            let _ = running.accept.await;
            let set = lock(&running.conns).take();
            if let Some(mut set) = set {
                set.shutdown().await;
            }
        }
    }

    /// Starts serving again on the same port, keeping all recorded state (requests, applied
    /// mutations, scripts, counter). Stops first if running. Retries the bind for up to 10 s.
    pub async fn restart(&self) {
        self.stop().await;
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!(
                        "upstream restart: bind {} failed ({e}); retrying",
                        self.addr
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("upstream restart: cannot bind {} again: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    /// Whether the upstream is currently serving.
    pub fn is_running(&self) -> bool {
        lock(&self.running).is_some()
    }

    /// The listening address (`127.0.0.1:PORT`), stable across restarts.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port, stable across restarts.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Base URL without trailing slash: `http://127.0.0.1:PORT`, or `https://localhost:PORT`
    /// for a TLS upstream.
    pub fn url(&self) -> String {
        if self.tls.is_some() {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    /// Base URL by IP: `http://127.0.0.1:PORT` or `https://127.0.0.1:PORT` (the TLS certificate
    /// is valid for the IP too).
    pub fn url_ip(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// WebSocket echo URL: `ws://127.0.0.1:PORT/ws` (or `wss://localhost:PORT/ws`).
    pub fn ws_url(&self) -> String {
        if self.tls.is_some() {
            format!("wss://localhost:{}/ws", self.addr.port())
        } else {
            format!("ws://{}/ws", self.addr)
        }
    }

    /// Whether this is a TLS upstream.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The test PKI of a TLS upstream (panics for a plain one).
    pub fn pki(&self) -> &TestPki {
        &self
            .tls
            .as_ref()
            .expect("pki() called on a plain-HTTP upstream; use Upstream::start_tls")
            .0
    }

    /// Path of the PEM file holding the CA that signed a TLS upstream's certificate.
    pub fn ca_pem_path(&self) -> PathBuf {
        self.pki().ca_pem_path()
    }

    /// The CA certificate of a TLS upstream as PEM text.
    pub fn ca_pem(&self) -> String {
        self.pki().ca_pem().to_owned()
    }

    /// Scripts the answers for every request whose path starts with `path_prefix`: each
    /// request takes the next answer, the last one repeats once the list runs out. The longest
    /// matching prefix wins; scripting a prefix again replaces its script. Scripted requests are
    /// still recorded in [`Upstream::requests`].
    pub fn script(&self, path_prefix: &str, answers: Vec<ScriptedResponse>) {
        assert!(
            !answers.is_empty(),
            "script({path_prefix:?}) needs at least one answer"
        );
        let mut inner = lock(&self.shared.inner);
        inner.scripts.retain(|s| s.prefix != path_prefix);
        inner.scripts.push(Script {
            prefix: path_prefix.to_owned(),
            queue: answers.into(),
        });
    }

    /// Removes the script for `path_prefix`, if any.
    pub fn clear_script(&self, path_prefix: &str) {
        lock(&self.shared.inner)
            .scripts
            .retain(|s| s.prefix != path_prefix);
    }

    /// Removes all scripts.
    pub fn clear_scripts(&self) {
        lock(&self.shared.inner).scripts.clear();
    }

    /// Every request received so far (all endpoints), in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.inner).requests.clone()
    }

    /// Requests received so far whose path starts with `path_prefix`.
    pub fn requests_to(&self, path_prefix: &str) -> Vec<RecordedRequest> {
        lock(&self.shared.inner)
            .requests
            .iter()
            .filter(|r| r.path.starts_with(path_prefix))
            .cloned()
            .collect()
    }

    /// Forgets the recorded requests (applied mutations and the counter are kept).
    pub fn clear_requests(&self) {
        lock(&self.shared.inner).requests.clear();
    }

    /// Number of requests served so far (the last `X-Upstream-Count` value).
    pub fn served_count(&self) -> u64 {
        self.shared.served.load(Ordering::SeqCst)
    }

    /// Writes `/versioned/...` received, in arrival order (412s included, with their status).
    pub fn versioned_writes(&self) -> Vec<VersionedWrite> {
        lock(&self.shared.inner).versioned_writes.clone()
    }

    /// The `/versioned/...` record at `path`: its version and value.
    pub fn versioned(&self, path: &str) -> Option<(u64, serde_json::Value)> {
        lock(&self.shared.inner).versioned.get(path).cloned()
    }

    /// Waits until `/versioned/...` received at least `n` writes (panics after `timeout`).
    pub async fn wait_versioned_writes(&self, n: usize, timeout: Duration) -> Vec<VersionedWrite> {
        let deadline = Instant::now() + timeout;
        loop {
            let writes = self.versioned_writes();
            if writes.len() >= n {
                return writes;
            }
            if Instant::now() >= deadline {
                panic!("upstream: expected {n} versioned writes within {timeout:?}: {writes:#?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Mutations applied by `/apply/...`, one per distinct idempotency key, in order.
    pub fn applied(&self) -> Vec<Applied> {
        lock(&self.shared.inner).applied.clone()
    }

    /// Number of `/apply/...` requests that carried an `Idempotency-Key`, duplicates included.
    pub fn seen_requests(&self) -> u64 {
        lock(&self.shared.inner).apply_seen
    }

    /// Number of `/apply/...` requests seen with idempotency key `key`, duplicates included.
    pub fn seen_requests_for(&self, key: &str) -> u64 {
        lock(&self.shared.inner)
            .apply_seen_per_key
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// Waits until at least `n` mutations are applied (panics after `timeout`) and returns them.
    pub async fn wait_applied(&self, n: usize, timeout: Duration) -> Vec<Applied> {
        let deadline = Instant::now() + timeout;
        loop {
            let applied = self.applied();
            if applied.len() >= n {
                return applied;
            }
            if Instant::now() >= deadline {
                panic!(
                    "upstream: expected at least {n} applied mutations within {timeout:?}, got {}: {:#?}",
                    applied.len(),
                    applied
                        .iter()
                        .map(|a| format!("{} {} {}", a.method, a.path, a.key))
                        .collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until at least `n` requests with a path starting with `path_prefix` arrived
    /// (panics after `timeout`) and returns them.
    pub async fn wait_requests(
        &self,
        path_prefix: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<RecordedRequest> {
        let deadline = Instant::now() + timeout;
        loop {
            let requests = self.requests_to(path_prefix);
            if requests.len() >= n {
                return requests;
            }
            if Instant::now() >= deadline {
                panic!(
                    "upstream: expected at least {n} requests to {path_prefix:?} within {timeout:?}, got {}",
                    requests.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    /// Makes the server close keep-alive connections that carried no request for `timeout`
    /// (`None`: keep them, the default), like a server-side keep-alive timeout: the upstream
    /// closes its end (FIN) while the client holds the connection in its pool. Applies to
    /// every connection from its next read on; see [`Upstream::idle_closed_count`].
    pub fn close_idle_after(&self, timeout: Option<Duration>) {
        let ms = timeout.map_or(0, |t| (t.as_millis() as u64).max(1));
        self.shared.idle_timeout_ms.store(ms, Ordering::SeqCst);
    }

    /// Number of connections the server closed for being idle (see
    /// [`Upstream::close_idle_after`]).
    pub fn idle_closed_count(&self) -> u64 {
        self.shared.idle_closed.load(Ordering::SeqCst)
    }

    /// How each request's handling ended so far (answered, faulted, abandoned by the client),
    /// in the order they ended. A request still being handled has no entry yet.
    pub fn endings(&self) -> Vec<RequestEnd> {
        lock(&self.shared.inner).endings.clone()
    }

    /// [`Upstream::endings`] of the requests whose path starts with `path_prefix`.
    pub fn endings_to(&self, path_prefix: &str) -> Vec<RequestEnd> {
        lock(&self.shared.inner)
            .endings
            .iter()
            .filter(|e| e.path.starts_with(path_prefix))
            .cloned()
            .collect()
    }

    /// Waits until at least `n` requests to `path_prefix` ended (answered, faulted or
    /// abandoned; panics after `timeout`) and returns their endings.
    pub async fn wait_endings(
        &self,
        path_prefix: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<RequestEnd> {
        let deadline = Instant::now() + timeout;
        loop {
            let endings = self.endings_to(path_prefix);
            if endings.len() >= n {
                return endings;
            }
            if Instant::now() >= deadline {
                panic!(
                    "upstream: expected at least {n} finished requests to {path_prefix:?} within {timeout:?}, got {endings:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(running) = lock(&self.running).take() {
            running.accept.abort();
            // Dropping the JoinSet aborts every connection task.
            drop(lock(&running.conns).take());
        }
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("url", &self.url())
            .field("running", &self.is_running())
            .finish()
    }
}

/// Binds a listener with `SO_REUSEADDR` so a restart can take the same port at once.
async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    conns: ConnSet,
    tls: Option<TlsAcceptor>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("upstream accept error: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = Arc::new(ConnState::default());
        let io = FaultIo::new(stream, conn.clone(), shared.clone());
        let shared = shared.clone();
        let task_conns = conns.clone();
        let tls = tls.clone();
        spawn_tracked(&conns, async move {
            match tls {
                Some(acceptor) => match acceptor.accept(io).await {
                    Ok(stream) => serve_connection(stream, shared, conn, task_conns).await,
                    Err(e) => eprintln!("upstream TLS handshake failed: {e}"),
                },
                None => serve_connection(io, shared, conn, task_conns).await,
            }
        });
    }
}

async fn serve_connection<I>(io: I, shared: Arc<Shared>, conn: Arc<ConnState>, conns: ConnSet)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        handle(shared.clone(), conn.clone(), conns.clone(), req)
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    // Errors here are client-side resets, scripted faults and the like; nothing for a test
    // to see.
    let _ = builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await;
}

// ---------------------------------------------------------------------------------------------
// Connection faults
// ---------------------------------------------------------------------------------------------

/// What one connection's requests and its I/O share.
#[derive(Default)]
struct ConnState {
    /// Set by a handler carrying out a scripted [`Fault`]; from then on the connection
    /// neither reads nor writes, and a reset closes with `SO_LINGER` 0.
    fault: Mutex<Option<Fault>>,
    /// Requests being handled on this connection (an idle timeout does not run meanwhile).
    busy: AtomicU64,
}

impl ConnState {
    fn fault(&self) -> Option<Fault> {
        *lock(&self.fault)
    }
}

/// The server side of one TCP connection: passes bytes through until a scripted fault, and
/// ends the connection (EOF to hyper, which closes it) once it was idle for the upstream's
/// keep-alive timeout.
struct FaultIo {
    inner: tokio::net::TcpStream,
    conn: Arc<ConnState>,
    shared: Arc<Shared>,
    last_activity: tokio::time::Instant,
    idle_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    idle_closed: bool,
}

impl FaultIo {
    fn new(inner: tokio::net::TcpStream, conn: Arc<ConnState>, shared: Arc<Shared>) -> Self {
        FaultIo {
            inner,
            conn,
            shared,
            last_activity: tokio::time::Instant::now(),
            idle_timer: None,
            idle_closed: false,
        }
    }

    fn fault_error(fault: Fault) -> std::io::Error {
        let kind = match fault {
            Fault::HangUp => std::io::ErrorKind::BrokenPipe,
            Fault::Reset => std::io::ErrorKind::ConnectionReset,
        };
        std::io::Error::new(kind, format!("scripted fault: {fault:?}"))
    }

    /// Whether the keep-alive timeout ran out (arms the timer otherwise). The timer also runs
    /// while a request is being handled, only to wake the connection again: hyper reads the
    /// next request head only when woken, and the timeout counts from the last byte read or
    /// written.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(timeout) = self.shared.idle_timeout() else {
            self.idle_timer = None;
            return false;
        };
        let deadline = self.last_activity + timeout;
        let timer = self
            .idle_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() < deadline {
            timer.as_mut().reset(deadline);
        }
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            if self.conn.busy.load(Ordering::SeqCst) == 0 {
                return true;
            }
            timer.as_mut().reset(tokio::time::Instant::now() + timeout);
        }
    }
}

impl AsyncRead for FaultIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Some(fault) = this.conn.fault() {
            return Poll::Ready(Err(Self::fault_error(fault)));
        }
        if this.idle_closed {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.last_activity = tokio::time::Instant::now();
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                if this.idle_expired(cx) {
                    // EOF: hyper ends the connection and closes the socket (FIN).
                    this.idle_closed = true;
                    this.idle_timer = None;
                    this.shared.idle_closed.fetch_add(1, Ordering::SeqCst);
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for FaultIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if let Some(fault) = this.conn.fault() {
            return Poll::Ready(Err(Self::fault_error(fault)));
        }
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.last_activity = tokio::time::Instant::now();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if let Some(fault) = this.conn.fault() {
            return Poll::Ready(Err(Self::fault_error(fault)));
        }
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.last_activity = tokio::time::Instant::now();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if let Some(fault) = self.conn.fault() {
            return Poll::Ready(Err(Self::fault_error(fault)));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.conn.fault() {
            // No FIN before the RST.
            Some(Fault::Reset) => Poll::Ready(Err(Self::fault_error(Fault::Reset))),
            _ => Pin::new(&mut self.inner).poll_shutdown(cx),
        }
    }
}

impl Drop for FaultIo {
    fn drop(&mut self) {
        if self.conn.fault() == Some(Fault::Reset) {
            // Closing with a zero linger time sends RST instead of FIN.
            let _ = self.inner.set_zero_linger();
        }
    }
}

/// The error a handler returns to make hyper drop the connection without answering.
#[derive(Debug)]
struct FaultInjected(Fault);

impl std::fmt::Display for FaultInjected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "scripted fault: {:?}", self.0)
    }
}

impl std::error::Error for FaultInjected {}

/// Counts a request as busy on its connection while it is handled, and records how its
/// handling ended (as [`Ending::Abandoned`] if it is dropped before it ends).
struct Handling {
    shared: Arc<Shared>,
    conn: Arc<ConnState>,
    path: String,
    key: Option<String>,
    ended: bool,
}

impl Handling {
    fn start(shared: &Arc<Shared>, conn: &Arc<ConnState>, req: &RecordedRequest) -> Self {
        conn.busy.fetch_add(1, Ordering::SeqCst);
        Handling {
            shared: shared.clone(),
            conn: conn.clone(),
            path: req.path.clone(),
            key: req.header("idempotency-key").map(str::to_owned),
            ended: false,
        }
    }

    fn end(mut self, how: Ending) {
        self.ended = true;
        self.shared.record_end(&self.path, self.key.take(), how);
    }
}

impl Drop for Handling {
    fn drop(&mut self) {
        if !self.ended {
            self.shared
                .record_end(&self.path, self.key.take(), Ending::Abandoned);
        }
        self.conn.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// Request handling
// ---------------------------------------------------------------------------------------------

fn full(body: impl Into<Bytes>) -> RespBody {
    Full::new(body.into()).boxed_unsync()
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<RespBody> {
    let mut resp = Response::new(full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn insert_header(headers: &mut HeaderMap, name: &str, value: &str) {
    if let (Ok(name), Ok(value)) = (
        HeaderName::from_bytes(name.as_bytes()),
        HeaderValue::from_str(value),
    ) {
        headers.append(name, value);
    }
}

/// Decodes `application/x-www-form-urlencoded` text (`%XX` and `+`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Decoded query parameters, in order.
fn query_params(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnState>,
    conns: ConnSet,
    mut req: Request<Incoming>,
) -> Result<Response<RespBody>, FaultInjected> {
    let count = shared.served.fetch_add(1, Ordering::SeqCst) + 1;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            let value = serde_json::json!({"error": "bad_request_body", "detail": e.to_string()});
            return Ok(json_response(StatusCode::BAD_REQUEST, &value));
        }
    };
    let recorded = RecordedRequest {
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers.clone(),
        body,
        version: parts.version,
        at: Instant::now(),
    };
    let handling = Handling::start(&shared, &conn, &recorded);
    let scripted = {
        let mut inner = lock(&shared.inner);
        inner.requests.push(recorded.clone());
        inner.next_scripted(&recorded.path)
    };

    let mut response = match scripted {
        Some(answer) => {
            if !answer.delay.is_zero() {
                tokio::time::sleep(answer.delay).await;
            }
            if let Some(fault) = answer.fault {
                *lock(&conn.fault) = Some(fault);
                handling.end(Ending::Faulted(fault));
                return Err(FaultInjected(fault));
            }
            if answer.passthrough {
                route(&shared, &conns, &recorded, on_upgrade, count).await
            } else {
                scripted_response(&answer)
            }
        }
        None => route(&shared, &conns, &recorded, on_upgrade, count).await,
    };
    if !response.headers().contains_key("x-upstream-count") {
        insert_header(
            response.headers_mut(),
            "x-upstream-count",
            &count.to_string(),
        );
    }
    handling.end(Ending::Answered(response.status().as_u16()));
    Ok(response)
}

fn scripted_response(answer: &ScriptedResponse) -> Response<RespBody> {
    let mut resp = Response::new(full(answer.body.clone()));
    *resp.status_mut() = StatusCode::from_u16(answer.status).unwrap_or_else(|_| {
        panic!(
            "scripted status {} is not a valid status code",
            answer.status
        )
    });
    for (name, value) in &answer.headers {
        insert_header(resp.headers_mut(), name, value);
    }
    resp
}

async fn route(
    shared: &Shared,
    conns: &ConnSet,
    req: &RecordedRequest,
    on_upgrade: hyper::upgrade::OnUpgrade,
    count: u64,
) -> Response<RespBody> {
    let path = req.path.as_str();
    if path.starts_with("/echo") {
        echo(req, count)
    } else if let Some(n) = path.strip_prefix("/bytes/") {
        bytes_endpoint(req, n)
    } else if path == "/apply" || path.starts_with("/apply/") {
        apply(shared, req)
    } else if path.starts_with("/versioned/") {
        versioned(shared, req)
    } else if path == "/slow" {
        let params = query_params(req.query.as_deref());
        let ms: u64 = param(&params, "ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        json_response(StatusCode::OK, &serde_json::json!({"slept_ms": ms}))
    } else if path == "/ws" {
        websocket(conns, req, on_upgrade)
    } else {
        json_response(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "not_found", "path": path}),
        )
    }
}

fn echo(req: &RecordedRequest, count: u64) -> Response<RespBody> {
    let mut headers = serde_json::Map::new();
    for name in req.headers.keys() {
        let joined = req
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(", ");
        headers.insert(name.as_str().to_owned(), serde_json::Value::String(joined));
    }
    let (body, body_base64) = match std::str::from_utf8(&req.body) {
        Ok(text) => (text.to_owned(), false),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(&req.body),
            true,
        ),
    };
    let value = serde_json::json!({
        "method": req.method.as_str(),
        "path": req.path,
        "query": req.query,
        "headers": headers,
        "body": body,
        "body_base64": body_base64,
        "body_len": req.body.len(),
        "version": format!("{:?}", req.version),
        "count": count,
    });

    let params = query_params(req.query.as_deref());
    let status = param(&params, "status")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let mut resp = json_response(status, &value);
    let h = resp.headers_mut();
    if let Some(cc) = param(&params, "cc") {
        insert_header(h, "cache-control", cc);
    }
    if let Some(vary) = param(&params, "vary") {
        insert_header(h, "vary", vary);
    }
    for (k, v) in &params {
        if k == "header" {
            if let Some((name, value)) = v.split_once(':') {
                insert_header(h, name.trim(), value.trim());
            }
        }
    }
    if let Some(etag) = param(&params, "etag") {
        let etag = if etag.starts_with('"') || etag.starts_with("W/") {
            etag.to_owned()
        } else {
            format!("\"{etag}\"")
        };
        insert_header(h, "etag", &etag);
        let matches = req
            .header("if-none-match")
            .is_some_and(|inm| inm.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
        if matches {
            let mut not_modified = Response::new(full(Bytes::new()));
            *not_modified.status_mut() = StatusCode::NOT_MODIFIED;
            for (name, value) in resp.headers() {
                if name != header::CONTENT_TYPE {
                    not_modified
                        .headers_mut()
                        .append(name.clone(), value.clone());
                }
            }
            return not_modified;
        }
    }
    resp
}

fn bytes_endpoint(req: &RecordedRequest, n: &str) -> Response<RespBody> {
    let Ok(len) = n.parse::<u64>() else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"error": "bad_length", "path": req.path}),
        );
    };
    let params = query_params(req.query.as_deref());
    let chunked = param(&params, "chunked").is_some_and(|v| v == "1" || v == "true");
    let delay = param(&params, "chunk_delay_ms")
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis);
    let body = PatternBody {
        pos: 0,
        len,
        exact: !chunked,
        delay,
        sleep: None,
    };
    let mut resp = Response::new(body.boxed_unsync());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if !chunked {
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    resp
}

/// Streams `len` bytes of the `/bytes` pattern in [`BYTES_CHUNK`]-sized frames, optionally
/// sleeping between frames.
struct PatternBody {
    pos: u64,
    len: u64,
    exact: bool,
    delay: Option<Duration>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if this.pos >= this.len {
            return Poll::Ready(None);
        }
        if let (Some(delay), true) = (this.delay, this.pos > 0) {
            let sleep = this
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.sleep = None;
        }
        let n = (this.len - this.pos).min(BYTES_CHUNK as u64);
        let chunk: Vec<u8> = (this.pos..this.pos + n).map(pattern_byte).collect();
        this.pos += n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.len
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.len - self.pos)
        } else {
            SizeHint::default()
        }
    }
}

/// RFC 7396 merge patch (the upstream's own, independent of outpost's).
fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    let serde_json::Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = serde_json::json!({});
    }
    if let serde_json::Value::Object(map) = target {
        for (k, v) in patch {
            if v.is_null() {
                map.remove(k);
            } else {
                merge_patch(map.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
    }
}

fn versioned(shared: &Shared, req: &RecordedRequest) -> Response<RespBody> {
    let path = req.path.clone();
    let mut inner = lock(&shared.inner);
    let current = inner.versioned.get(&path).cloned();
    let etag = |v: u64| format!("\"v{v}\"");
    if req.method == Method::GET {
        return match current {
            Some((v, record)) => {
                let mut resp = json_response(StatusCode::OK, &record);
                insert_header(resp.headers_mut(), "etag", &etag(v));
                resp
            }
            None => json_response(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"error": "not_found"}),
            ),
        };
    }
    if !matches!(req.method, Method::PUT | Method::PATCH | Method::DELETE) {
        return json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({"error": "method_not_allowed"}),
        );
    }
    let if_match = req.header("if-match").map(str::to_owned);
    let precondition_failed = match (&if_match, &current) {
        (Some(m), Some((v, _))) => m.trim() != "*" && m.trim() != etag(*v),
        (Some(_), None) => true,
        (None, _) => false,
    };
    let parsed: Option<serde_json::Value> = serde_json::from_slice(&req.body).ok();
    let (status, answer) = if precondition_failed {
        let now = current.as_ref().map(|(v, _)| etag(*v));
        (
            412,
            serde_json::json!({"error": "precondition_failed", "current": now}),
        )
    } else {
        let version = current.as_ref().map_or(0, |(v, _)| *v) + 1;
        match req.method {
            Method::DELETE => {
                inner.versioned.remove(&path);
                (204, serde_json::Value::Null)
            }
            _ => {
                let Some(body) = parsed else {
                    return json_response(
                        StatusCode::BAD_REQUEST,
                        &serde_json::json!({"error": "not JSON"}),
                    );
                };
                let record = if req.method == Method::PATCH {
                    let mut record = current.map_or(serde_json::json!({}), |(_, r)| r);
                    merge_patch(&mut record, &body);
                    record
                } else {
                    body
                };
                inner
                    .versioned
                    .insert(path.clone(), (version, record.clone()));
                (200, record)
            }
        }
    };
    inner.versioned_writes.push(VersionedWrite {
        method: req.method.as_str().to_owned(),
        path: path.clone(),
        body: req.body.clone(),
        if_match,
        key: req.header("idempotency-key").map(str::to_owned),
        status,
    });
    let version = inner.versioned.get(&path).map(|(v, _)| *v);
    drop(inner);
    let mut resp = if status == 204 {
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::NO_CONTENT;
        r
    } else {
        json_response(
            StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
            &answer,
        )
    };
    if let (Some(v), true) = (version, status == 200) {
        insert_header(resp.headers_mut(), "etag", &etag(v));
    }
    resp
}

fn apply(shared: &Shared, req: &RecordedRequest) -> Response<RespBody> {
    if !matches!(
        req.method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    ) {
        return json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({"error": "method_not_allowed", "method": req.method.as_str()}),
        );
    }
    let Some(key) = req.header("idempotency-key").map(str::to_owned) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"error": "missing Idempotency-Key header"}),
        );
    };

    let mut inner = lock(&shared.inner);
    inner.apply_seen += 1;
    *inner.apply_seen_per_key.entry(key.clone()).or_insert(0) += 1;

    let (status, body, replayed) = match inner.answers.get(&key) {
        Some((status, body)) => (*status, body.clone(), true),
        None => {
            let seq = inner.applied.len() as u64 + 1;
            inner.applied.push(Applied {
                key: key.clone(),
                method: req.method.as_str().to_owned(),
                path: req.path_and_query(),
                body: req.body.clone(),
                seq,
                authorization: req.header("authorization").map(str::to_owned),
                accepted_at: req.header("outpost-accepted-at").map(str::to_owned),
                headers: req.headers.clone(),
            });
            let body = Bytes::from(
                serde_json::json!({"applied": true, "key": key, "seq": seq}).to_string(),
            );
            inner.answers.insert(key.clone(), (201, body.clone()));
            (201, body, false)
        }
    };
    drop(inner);

    let mut resp = Response::new(full(body));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::CREATED);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    insert_header(h, "idempotency-key", &key);
    if replayed {
        h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    resp
}

fn websocket(
    conns: &ConnSet,
    req: &RecordedRequest,
    on_upgrade: hyper::upgrade::OnUpgrade,
) -> Response<RespBody> {
    let is_upgrade = req
        .header("upgrade")
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = req.header("sec-websocket-key");
    let (true, Some(key)) = (is_upgrade, key) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"error": "expected a WebSocket upgrade"}),
        );
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());

    spawn_tracked(conns, async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                eprintln!("upstream: WebSocket upgrade failed: {e}");
                return;
            }
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
            // Pings are answered and closes completed by tungstenite itself.
        }
    });

    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    insert_header(h, "sec-websocket-accept", &accept);
    resp
}
