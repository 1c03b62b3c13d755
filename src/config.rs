//! The typed configuration: every key, its default, loading from TOML and validation.
//!
//! Every key has a default (`Config::default()` is a working sidecar set-up); unknown keys are
//! rejected (`deny_unknown_fields`). Errors name the file, the line and the key, so
//! `outpost check-config` and `outpost serve` can exit 2 with a message an operator can act on.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The whole configuration of one outpost instance.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The proxy listener the app talks to.
    pub proxy: ProxyConfig,
    /// The upstream API outpost fronts.
    pub upstream: UpstreamConfig,
    /// Where queued mutations, idempotency records and the durable cache live.
    pub store: StoreConfig,
    /// The read cache.
    pub cache: CacheConfig,
    /// The outbox of queued mutations.
    pub queue: QueueConfig,
    /// Replay of queued mutations and classification of the answers.
    pub replay: ReplayConfig,
    /// The admin listener.
    pub admin: AdminConfig,
    /// Per-route settings, matched in order; the first match wins.
    #[serde(rename = "route")]
    pub routes: Vec<RouteConfig>,
}

/// `[proxy]`: the listener the app talks to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Address of the proxy listener.
    pub listen: SocketAddr,
    /// Largest request body accepted (413 above).
    pub max_body_bytes: u64,
    /// Largest request head (request line and headers) accepted (431 above).
    pub max_header_bytes: usize,
    /// Time a connection has to deliver a complete request head whenever nothing is in flight
    /// on it: from accept (TLS handshake included) and from the end of each response. A partial
    /// head is answered 408; a silent connection is closed.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Reserved path prefix outpost answers itself and never forwards.
    pub reserved_prefix: String,
    /// PEM certificate chain; with `tls_key`, the listener terminates TLS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// How long graceful shutdown waits for open requests before closing them.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Proxy threads, each with its own listener socket (SO_REUSEPORT), event loop and
    /// upstream connection pool; 0 = one per CPU core.
    pub workers: usize,
    /// Most client connections open at once, across all proxy threads. At the limit, the
    /// longest-idle connection (one waiting for a request head with nothing in flight) is
    /// closed to make room; when none is idle the new connection gets a 503 and is closed.
    /// Lowered at start when the open-file limit cannot hold it (two descriptors per
    /// connection: the app's and the upstream's).
    pub max_connections: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 100 * 1024 * 1024,
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(30),
            reserved_prefix: "/_outpost/".into(),
            tls_cert: None,
            tls_key: None,
            shutdown_grace: Duration::from_secs(10),
            workers: 0,
            max_connections: 10_000,
        }
    }
}

/// `[upstream]`: the API outpost fronts, and how its health is judged.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Base URL, `http://` or `https://`; a path prefix is prepended to every request path.
    pub url: String,
    /// Timeout for establishing a connection (TCP and TLS).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Timeout from sending a request to receiving the response head.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Extra PEM CA certificates to trust (a private CA), besides the system and webpki roots.
    pub ca_file: Option<PathBuf>,
    /// Path the health probe GETs (any answer below 500 counts as online); unset: TCP connect.
    pub probe_path: Option<String>,
    /// First probe delay after the upstream went offline.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// Cap of the probe backoff.
    #[serde(with = "humantime_serde")]
    pub probe_interval_max: Duration,
    /// Idle keep-alive connections kept per upstream host.
    pub pool_max_idle: usize,
    /// How long an idle upstream connection is kept.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Resets (a connection closed or reset during one exchange) within `reset_window` that
    /// mark the upstream offline; fewer are one request's failure, not an outage. Refused
    /// connections and timeouts mark it offline at once.
    pub reset_threshold: u32,
    /// The window `reset_threshold` counts resets in.
    #[serde(with = "humantime_serde")]
    pub reset_window: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:3000".into(),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(30),
            ca_file: None,
            probe_path: None,
            probe_interval: Duration::from_millis(250),
            probe_interval_max: Duration::from_secs(10),
            pool_max_idle: 512,
            pool_idle_timeout: Duration::from_secs(90),
            reset_threshold: 3,
            reset_window: Duration::from_secs(10),
        }
    }
}

/// Which storage backend holds the outbox and the durable cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// One local data directory (redb).
    #[default]
    Embedded,
    /// A Redis server shared by several outpost instances.
    Redis,
}

/// `[store]`: the storage backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `embedded` (default) or `redis`.
    pub backend: Backend,
    /// Data directory of the embedded store.
    pub data_dir: PathBuf,
    /// Page cache of the embedded store (memory does not grow with the queue beyond it).
    pub page_cache_bytes: usize,
    /// Redis URL for the `redis` backend.
    pub redis_url: String,
    /// Prefix of every Redis key outpost writes.
    pub redis_key_prefix: String,
    /// Replicas that must confirm a queued mutation (`WAIT`) before the 202; 0 = don't wait.
    pub redis_min_replicas: i64,
    /// How long to wait for `redis_min_replicas`.
    #[serde(with = "humantime_serde")]
    pub redis_replica_timeout: Duration,
    /// How long a replaying instance holds a partition without renewing its lease.
    #[serde(with = "humantime_serde")]
    pub redis_lease: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Embedded,
            data_dir: PathBuf::from("./outpost-data"),
            page_cache_bytes: 32 * 1024 * 1024,
            redis_url: "redis://127.0.0.1:6379/".into(),
            redis_key_prefix: "outpost".into(),
            redis_min_replicas: 0,
            redis_replica_timeout: Duration::from_secs(1),
            redis_lease: Duration::from_secs(10),
        }
    }
}

/// `[cache]`: the read cache (memory tier over the durable tier).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Whether reads are cached at all.
    pub enabled: bool,
    /// Bytes of responses held in memory (moka, weighted by size).
    pub memory_bytes: u64,
    /// Bytes of responses held on disk (least recently used evicted first).
    pub disk_bytes: u64,
    /// Largest response body that is cached; larger ones stream through uncached.
    pub max_entry_bytes: u64,
    /// How long a stored copy may be served while the upstream is unreachable.
    #[serde(with = "humantime_serde")]
    pub max_stale: Duration,
    /// Freshness lifetime for responses without `max-age`/`Expires` (cache-first, SWR).
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    /// Request headers that say who the caller is: their values (hashed) are part of every
    /// cache key, so one caller's copy is never served to another. Routes may override it
    /// (`identity_headers`); public routes use none.
    pub identity_headers: Vec<String>,
}

/// The default `cache.identity_headers`: credentials in common use.
pub const DEFAULT_IDENTITY_HEADERS: [&str; 4] = ["Authorization", "Cookie", "X-Api-Key", "Api-Key"];

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            memory_bytes: 64 * 1024 * 1024,
            disk_bytes: 1024 * 1024 * 1024,
            max_entry_bytes: 8 * 1024 * 1024,
            max_stale: Duration::from_secs(7 * 24 * 3600),
            default_ttl: Duration::ZERO,
            identity_headers: DEFAULT_IDENTITY_HEADERS.map(String::from).to_vec(),
        }
    }
}

/// `[queue]`: the outbox.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Largest mutation body that can be queued (413 when it would have to be queued).
    pub max_body_bytes: u64,
    /// Items older than this stop being retried and become `expired`.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// How long a completed mutation's answer is kept for idempotent replays.
    #[serde(with = "humantime_serde")]
    pub idempotency_retention: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 10 * 1024 * 1024,
            max_age: Duration::from_secs(7 * 24 * 3600),
            idempotency_retention: Duration::from_secs(24 * 3600),
        }
    }
}

/// `[replay]`: draining the outbox.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplayConfig {
    /// First retry delay.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Growth factor of the retry delay.
    pub backoff_multiplier: f32,
    /// Cap of the retry delay.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Replayed requests per second across all partitions (governor); 0 = unlimited.
    pub rate_limit: u32,
    /// Burst allowed above `rate_limit`.
    pub rate_burst: u32,
    /// Partitions replayed concurrently.
    pub concurrency: usize,
    /// Who a queued mutation belongs to, for waiting on fresh credentials after a 401:
    /// `"jwt-sub"` (the `sub` claim of a bearer JWT, read without verifying), `"header:NAME"`,
    /// or `"any"` (one principal for the whole app).
    pub auth_principal: String,
    /// Default classification rules (routes may override).
    pub classify: ClassifyConfig,
    /// How soon a replayed item's answer is durable. `0s` (default): before the partition's
    /// next item is sent, so a crash re-sends at most the item in flight of each partition.
    /// A window (`"10ms"`) lets the drain run ahead of the fsync: a crash may re-send the
    /// answers of the last window.
    #[serde(with = "humantime_serde")]
    pub progress_sync: Duration,
    /// Attempts after which an item whose own sends keep failing (ambiguous transport failures,
    /// retryable statuses other than 429 and 503) is dead-lettered with its last reason
    /// instead of blocking its partition; 0 = never.
    pub max_attempts: u32,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(500),
            backoff_multiplier: 2.0,
            max_backoff: Duration::from_secs(300),
            rate_limit: 1000,
            rate_burst: 100,
            concurrency: 16,
            auth_principal: "jwt-sub".into(),
            classify: ClassifyConfig::default(),
            progress_sync: Duration::ZERO,
            max_attempts: 25,
        }
    }
}

/// Status sets and body checks that classify an upstream answer to a replayed mutation.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClassifyConfig {
    /// Statuses that are retried with backoff.
    pub retryable: Vec<u16>,
    /// Statuses that mean the item waits for fresh credentials.
    pub auth_required: Vec<u16>,
    /// Statuses that are a conflict (dead-lettered).
    pub conflict: Vec<u16>,
    /// Statuses that are a partial success.
    pub partial: Vec<u16>,
    /// Statuses (beyond other 4xx, 501 and 505) that are validation errors.
    pub validation: Vec<u16>,
    /// Body checks on 2xx answers, tried in order before the default GraphQL-style rule.
    pub body: Vec<BodyRule>,
}

impl Default for ClassifyConfig {
    fn default() -> Self {
        Self {
            retryable: vec![408, 425, 429, 500, 502, 503, 504],
            auth_required: vec![401],
            conflict: vec![409, 412],
            partial: vec![207],
            validation: vec![501, 505],
            body: Vec::new(),
        }
    }
}

/// A JSON-pointer check on a 2xx body: when it matches, the answer gets `class`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BodyRule {
    /// RFC 6901 JSON pointer, e.g. `/result/status`.
    pub pointer: String,
    /// Matches when the value equals this JSON value.
    pub equals: Option<serde_json::Value>,
    /// Matches when the value exists and is not null, false, empty string, array or object.
    #[serde(default)]
    pub non_empty: bool,
    /// The class given on a match.
    pub class: RuleClass,
}

/// Classes a body rule can assign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuleClass {
    /// Done.
    Success,
    /// Done, with errors recorded.
    Partial,
    /// Dead-lettered as a validation error.
    Validation,
    /// Dead-lettered as a conflict.
    Conflict,
    /// Retried with backoff.
    Retryable,
}

/// `[admin]`: the admin listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin listener.
    pub listen: SocketAddr,
    /// Bearer token; required when `listen` is not a loopback address.
    pub token: Option<String>,
    /// Host names the admin API answers to besides the listen address (and `localhost` when
    /// that is a loopback or unspecified address); other `Host` and `Origin` values are
    /// refused, which defeats DNS rebinding and cross-site requests from browsers.
    pub allowed_hosts: Vec<String>,
    /// Most admin connections open at once: a budget of its own, so that a saturated proxy
    /// listener never starves the admin API.
    pub max_connections: usize,
    /// How often `GET /events` sends a comment line while nothing happens, so that proxies
    /// and load balancers keep the stream open.
    #[serde(with = "humantime_serde")]
    pub events_heartbeat: Duration,
    /// Events kept for clients that reconnect with `Last-Event-ID` (the newest ones).
    pub events_buffer: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9901)),
            token: None,
            allowed_hosts: Vec::new(),
            max_connections: 64,
            events_heartbeat: Duration::from_secs(15),
            events_buffer: 1024,
        }
    }
}

/// How reads (GET, HEAD) on a route use the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ReadStrategy {
    /// Go upstream; on a transport failure, timeout or known outage serve the cached copy.
    #[default]
    NetworkFirst,
    /// Serve the cached copy at once (even stale) and refresh it in the background.
    StaleWhileRevalidate,
    /// Serve a fresh cached copy without asking upstream; otherwise as network-first.
    CacheFirst,
    /// Never cache; offline is a 504.
    NetworkOnly,
}

/// How mutations (POST, PUT, PATCH, DELETE) on a route are handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum WriteMode {
    /// Forward while the upstream answers; queue when it does not.
    #[default]
    QueueWhenOffline,
    /// Always queue and acknowledge at once; replay in the background.
    WriteBehind,
    /// Always forward; offline is a 504 (nothing queued).
    PassThrough,
}

/// How queued mutations of a route are grouped for ordering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PartitionBy {
    /// One FIFO for the whole upstream.
    #[default]
    Upstream,
    /// One FIFO per resource path (independent paths replay concurrently).
    Path,
}

/// `[[route]]`: settings for requests matching a method set and a path prefix or glob.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RouteConfig {
    /// A name for logs and metrics.
    pub name: Option<String>,
    /// Methods this route matches; empty matches all.
    pub methods: Vec<String>,
    /// Path prefix (`/api/`) or glob (`/api/*/items/**`) this route matches; empty matches all.
    pub path: String,
    /// Read strategy for GET and HEAD.
    pub read: ReadStrategy,
    /// Write mode for mutations.
    pub write: WriteMode,
    /// The resource is the same for every caller: cache it without the caller's identity.
    pub public: bool,
    /// Ordering partition for queued mutations.
    pub partition: PartitionBy,
    /// Overrides `cache.default_ttl`.
    #[serde(with = "humantime_serde::option")]
    pub cache_ttl: Option<Duration>,
    /// Overrides `cache.max_stale`.
    #[serde(with = "humantime_serde::option")]
    pub max_stale: Option<Duration>,
    /// Overrides `replay.classify` for mutations of this route.
    pub classify: Option<ClassifyConfig>,
    /// Overrides `cache.identity_headers` for this route (ignored when `public`).
    pub identity_headers: Option<Vec<String>>,
}

/// A configuration error, located in its file where possible.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The config file, if the error came from one.
    pub file: Option<PathBuf>,
    /// 1-based line in that file.
    pub line: Option<usize>,
    /// The dotted key, e.g. `upstream.connect_timeout`.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{}:{line}: ", file.display())?,
            (Some(file), None) => write!(f, "{}: ", file.display())?,
            _ => {}
        }
        if let Some(key) = &self.key {
            write!(f, "key `{key}`: ")?;
        }
        f.write_str(&self.message)
    }
}

impl ConfigError {
    fn key(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            file: None,
            line: None,
            key: Some(key.into()),
            message: message.into(),
        }
    }
}

impl Config {
    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_path_buf()),
            line: None,
            key: None,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&text).map_err(|mut e| {
            e.file = Some(path.to_path_buf());
            e
        })
    }

    /// Parse and validate config text (errors carry line and key, not the file).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let (line, key) = match e.span() {
                Some(span) => locate_span(text, span.start),
                None => (None, None),
            };
            let message = e.message().to_string();
            let key = key.or_else(|| unknown_field(&message));
            ConfigError {
                file: None,
                line,
                key,
                message,
            }
        })?;
        config.validate().map_err(|mut e| {
            if let Some(key) = &e.key {
                e.line = find_key_line(text, key);
            }
            e
        })?;
        Ok(config)
    }

    /// Check what the types alone cannot: URLs, paths, globs, value ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let url: http::Uri = self
            .upstream
            .url
            .parse()
            .map_err(|e| ConfigError::key("upstream.url", format!("not a URL: {e}")))?;
        match url.scheme_str() {
            Some("http") | Some("https") => {}
            _ => {
                return Err(ConfigError::key(
                    "upstream.url",
                    "must start with http:// or https://",
                ));
            }
        }
        if url.host().is_none() {
            return Err(ConfigError::key("upstream.url", "has no host"));
        }
        if url.query().is_some() {
            return Err(ConfigError::key("upstream.url", "must not have a query"));
        }
        if !self.proxy.reserved_prefix.starts_with('/')
            || !self.proxy.reserved_prefix.ends_with('/')
        {
            return Err(ConfigError::key(
                "proxy.reserved_prefix",
                "must start and end with '/'",
            ));
        }
        if self.proxy.tls_cert.is_some() != self.proxy.tls_key.is_some() {
            return Err(ConfigError::key(
                "proxy.tls_cert",
                "tls_cert and tls_key must be set together",
            ));
        }
        if let Some(p) = &self.upstream.probe_path
            && !p.starts_with('/')
        {
            return Err(ConfigError::key(
                "upstream.probe_path",
                "must start with '/'",
            ));
        }
        if self.upstream.probe_interval.is_zero()
            || self.upstream.probe_interval > self.upstream.probe_interval_max
        {
            return Err(ConfigError::key(
                "upstream.probe_interval",
                "must be above zero and at most upstream.probe_interval_max",
            ));
        }
        if self.replay.backoff_multiplier < 1.0 {
            return Err(ConfigError::key(
                "replay.backoff_multiplier",
                "must be >= 1.0",
            ));
        }
        if self.upstream.reset_threshold == 0 {
            return Err(ConfigError::key(
                "upstream.reset_threshold",
                "must be at least 1",
            ));
        }
        if self.replay.progress_sync > Duration::from_secs(10) {
            return Err(ConfigError::key(
                "replay.progress_sync",
                "must be at most 10s (it bounds what a crash re-sends)",
            ));
        }
        if self.replay.concurrency == 0 {
            return Err(ConfigError::key("replay.concurrency", "must be at least 1"));
        }
        if self.replay.auth_principal != "jwt-sub"
            && self.replay.auth_principal != "any"
            && !self.replay.auth_principal.starts_with("header:")
        {
            return Err(ConfigError::key(
                "replay.auth_principal",
                "must be \"jwt-sub\", \"any\" or \"header:NAME\"",
            ));
        }
        if self.queue.max_body_bytes > self.proxy.max_body_bytes {
            return Err(ConfigError::key(
                "queue.max_body_bytes",
                "must not exceed proxy.max_body_bytes",
            ));
        }
        if self.store.backend == Backend::Redis {
            redis::Client::open(self.store.redis_url.as_str())
                .map_err(|e| ConfigError::key("store.redis_url", e.to_string()))?;
        }
        if self.proxy.max_connections == 0 {
            return Err(ConfigError::key(
                "proxy.max_connections",
                "must be at least 1",
            ));
        }
        if self.admin.max_connections == 0 {
            return Err(ConfigError::key(
                "admin.max_connections",
                "must be at least 1",
            ));
        }
        for name in &self.admin.allowed_hosts {
            if name.is_empty() || name.contains(['/', ':', ' ', '@']) {
                return Err(ConfigError::key(
                    "admin.allowed_hosts",
                    format!("{name:?} is not a host name (no scheme, port or path)"),
                ));
            }
        }
        check_header_names("cache.identity_headers", &self.cache.identity_headers)?;
        if !self.admin.listen.ip().is_loopback() && self.admin.token.is_none() {
            return Err(ConfigError::key(
                "admin.token",
                "required when admin.listen is not a loopback address",
            ));
        }
        for (i, route) in self.routes.iter().enumerate() {
            for m in &route.methods {
                http::Method::from_bytes(m.as_bytes()).map_err(|_| {
                    ConfigError::key(format!("route[{i}].methods"), format!("bad method {m:?}"))
                })?;
            }
            if !route.path.is_empty() && !route.path.starts_with('/') {
                return Err(ConfigError::key(
                    format!("route[{i}].path"),
                    "must start with '/'",
                ));
            }
            crate::route::PathMatcher::new(&route.path)
                .map_err(|e| ConfigError::key(format!("route[{i}].path"), e))?;
            if let Some(names) = &route.identity_headers {
                check_header_names(&format!("route[{i}].identity_headers"), names)?;
            }
            for rule in route.classify.iter().flat_map(|c| &c.body) {
                if !rule.pointer.is_empty() && !rule.pointer.starts_with('/') {
                    return Err(ConfigError::key(
                        format!("route[{i}].classify.body.pointer"),
                        "a JSON pointer starts with '/'",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Every entry of `names` must be a valid HTTP header name.
fn check_header_names(key: &str, names: &[String]) -> Result<(), ConfigError> {
    for name in names {
        http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| ConfigError::key(key, format!("{name:?} is not a header name")))?;
    }
    Ok(())
}

/// Line (1-based) and `section.key` of the byte offset `pos` in `text`.
fn locate_span(text: &str, pos: usize) -> (Option<usize>, Option<String>) {
    let pos = pos.min(text.len());
    let line_no = text[..pos].matches('\n').count() + 1;
    let mut section = String::new();
    let mut key = None;
    for (i, line) in text.lines().enumerate() {
        if i + 1 > line_no {
            break;
        }
        let t = line.trim();
        if t.starts_with('[') {
            section = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
            key = None;
        }
        if i + 1 == line_no
            && let Some((k, _)) = t.split_once('=')
        {
            key = Some(k.trim().to_string());
        }
    }
    let dotted = match (section.is_empty(), key) {
        (_, None) if section.is_empty() => None,
        (_, None) => Some(section),
        (true, Some(k)) => Some(k),
        (false, Some(k)) => Some(format!("{section}.{k}")),
    };
    (Some(line_no), dotted)
}

fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest.split('`').next()?.to_string())
}

/// Best-effort line of `section.key` in `text` (for errors found after parsing).
fn find_key_line(text: &str, dotted: &str) -> Option<usize> {
    let (section, key) = dotted.rsplit_once('.')?;
    let section = section.split('[').next().unwrap_or(section);
    let key = key.trim_end_matches(']');
    let mut in_section = false;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            let name = t.trim_matches(|c| c == '[' || c == ']').trim();
            in_section = name == section;
        } else if in_section
            && let Some((k, _)) = t.split_once('=')
            && k.trim() == key
        {
            return Some(i + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().expect("defaults validate");
        let c = Config::parse("").expect("empty config is all defaults");
        assert_eq!(c.proxy.listen.port(), 8080);
        assert_eq!(c.admin.listen.port(), 9901);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = Config::parse("[proxy]\nlisten = \"127.0.0.1:1\"\nlisten_typo = 3\n")
            .expect_err("unknown key rejected");
        assert_eq!(err.line, Some(3));
        assert!(err.to_string().contains("listen_typo"), "{err}");
    }

    #[test]
    fn bad_value_names_section_and_key() {
        let err =
            Config::parse("[upstream]\nconnect_timeout = \"soon\"\n").expect_err("bad duration");
        assert_eq!(err.line, Some(2));
        assert_eq!(err.key.as_deref(), Some("upstream.connect_timeout"));
    }

    #[test]
    fn validation_error_finds_line() {
        let err = Config::parse("[upstream]\n\nurl = \"ftp://x\"\n").expect_err("bad scheme");
        assert_eq!(err.key.as_deref(), Some("upstream.url"));
        assert_eq!(err.line, Some(3));
    }

    #[test]
    fn security_keys_have_defaults_and_are_validated() {
        let c = Config::parse("").expect("defaults");
        assert_eq!(c.proxy.max_connections, 10_000);
        assert_eq!(c.admin.max_connections, 64);
        assert_eq!(
            c.cache.identity_headers,
            ["Authorization", "Cookie", "X-Api-Key", "Api-Key"]
        );
        let c = Config::parse(
            "[cache]\nidentity_headers = [\"X-Tenant\"]\n[admin]\nallowed_hosts = [\"outpost.lan\"]\n\
             [[route]]\npath = \"/a/\"\nidentity_headers = []\n",
        )
        .expect("valid");
        assert_eq!(c.routes[0].identity_headers.as_deref(), Some(&[][..]));
        let err =
            Config::parse("[cache]\nidentity_headers = [\"bad header\"]\n").expect_err("bad name");
        assert_eq!(err.key.as_deref(), Some("cache.identity_headers"));
        assert_eq!(err.line, Some(2));
        let err = Config::parse("[[route]]\nidentity_headers = [\"a:b\"]\n").expect_err("bad");
        assert_eq!(err.key.as_deref(), Some("route[0].identity_headers"));
        let err = Config::parse("[proxy]\nmax_connections = 0\n").expect_err("zero");
        assert_eq!(err.key.as_deref(), Some("proxy.max_connections"));
        let err = Config::parse("[admin]\nallowed_hosts = [\"http://x\"]\n").expect_err("url");
        assert_eq!(err.key.as_deref(), Some("admin.allowed_hosts"));
    }

    #[test]
    fn routes_parse() {
        let c = Config::parse(
            "[[route]]\nmethods=[\"GET\"]\npath=\"/api/*/items\"\nread=\"cache-first\"\npublic=true\n\
             [[route]]\npath=\"/orders/\"\nwrite=\"write-behind\"\npartition=\"path\"\n",
        )
        .expect("routes");
        assert_eq!(c.routes.len(), 2);
        assert_eq!(c.routes[0].read, ReadStrategy::CacheFirst);
        assert_eq!(c.routes[1].partition, PartitionBy::Path);
    }
}
