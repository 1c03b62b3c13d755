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
    /// `[[warm]]`: URLs fetched at start and kept fresh while online.
    pub warm: Vec<WarmConfig>,
}

/// `[[warm]]`: a URL outpost fetches at start and again every `interval` while the upstream is
/// online, so that it is served offline without the app having asked.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmConfig {
    /// Path and query to fetch, e.g. `/api/products?page=1`.
    pub path: String,
    /// Request headers to send (they choose the identity it is cached for, e.g.
    /// `Authorization`); `Host` defaults to the proxy's listen address.
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// How often it is fetched again while online.
    #[serde(with = "humantime_serde", default = "default_warm_interval")]
    pub interval: Duration,
}

fn default_warm_interval() -> Duration {
    Duration::from_secs(300)
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
    /// Record the traffic as HAR 1.2 to this file (`serve --record`); unset: no recording.
    pub record_har: Option<PathBuf>,
    /// Largest request or response body kept in a recorded entry; longer ones are cut and
    /// marked `_truncated`.
    pub record_max_body_bytes: u64,
    /// Headers written as `[redacted]` besides `Authorization`, `Cookie` and `Set-Cookie`.
    pub record_redact_headers: Vec<String>,
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
            record_har: None,
            record_max_body_bytes: 64 * 1024,
            record_redact_headers: Vec::new(),
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
    /// While offline, how often a cheap TCP connect checks whether the upstream is back (a
    /// success probes at once); keeps the return noticed within about this long whatever the
    /// probe backoff has grown to. 0 = off (only the backed-off probe).
    #[serde(with = "humantime_serde")]
    pub reconnect_check_interval: Duration,
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
            reconnect_check_interval: Duration::from_millis(250),
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

impl fmt::Display for Backend {
    /// The config's spelling: `embedded` or `redis`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Embedded => "embedded",
            Backend::Redis => "redis",
        })
    }
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
    /// Redis Sentinels (`host:port`) to ask for the current primary; empty = use `redis_url`.
    pub redis_sentinels: Vec<String>,
    /// The master name the Sentinels monitor (required with `redis_sentinels`).
    pub redis_sentinel_master: String,
    /// Username for `AUTH` to the Sentinels (empty: none, or the default user with a password).
    pub redis_sentinel_username: String,
    /// Password for `AUTH` to the Sentinels (`requirepass` of a Sentinel); empty: none.
    /// `OUTPOST_REDIS_SENTINEL_PASSWORD` overrides it, so it need not be in the file.
    pub redis_sentinel_password: String,
    /// Redis Cluster nodes (`host:port`; some of them suffice, the client finds the rest);
    /// empty = not a cluster.
    pub redis_cluster_nodes: Vec<String>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Embedded,
            data_dir: PathBuf::from("./outpost-data"),
            page_cache_bytes: crate::store::embedded::DEFAULT_PAGE_CACHE,
            redis_url: "redis://127.0.0.1:6379/".into(),
            redis_key_prefix: "outpost".into(),
            redis_min_replicas: 0,
            redis_replica_timeout: Duration::from_secs(1),
            redis_lease: Duration::from_secs(10),
            redis_sentinels: Vec::new(),
            redis_sentinel_master: String::new(),
            redis_sentinel_username: String::new(),
            redis_sentinel_password: String::new(),
            redis_cluster_nodes: Vec::new(),
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
    /// Mutation bodies held in memory at once (being read, forwarded or stored), in bytes: a
    /// mutation reserves its `Content-Length` (`max_body_bytes` when unknown) before its body
    /// is read, and waits while the reservations of others fill the budget. At least
    /// `max_body_bytes`.
    pub max_buffered_bytes: u64,
    /// Most pending mutations across the store (all instances sharing it); a write that would
    /// be queued beyond it gets `503 queue_full` with `Retry-After`. 0 = unlimited.
    pub max_depth: u64,
    /// Most bytes of pending mutation bodies across the store; a write whose body would take
    /// the queue beyond it gets `503 queue_full`. 0 = unlimited.
    pub max_bytes: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 10 * 1024 * 1024,
            max_age: Duration::from_secs(7 * 24 * 3600),
            idempotency_retention: Duration::from_secs(24 * 3600),
            max_buffered_bytes: 64 * 1024 * 1024,
            max_depth: 1_000_000,
            max_bytes: 1024 * 1024 * 1024,
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
    /// The header that tells the upstream when outpost accepted a replayed mutation (RFC 3339,
    /// ms); empty: not sent.
    pub accepted_at_header: String,
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
            accepted_at_header: "Outpost-Accepted-At".into(),
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
    /// What a replayed mutation's conflict (409, 412) leads to.
    pub conflict: ConflictPolicy,
    /// JSON pointer of a field that a replayed mutation's JSON body gets set to the time outpost
    /// accepted it (RFC 3339, ms), for upstreams that do last-write-wins by a field; empty: none.
    pub accepted_at_field: String,
    // --- Sync semantics (#20 points 2, 3) ---
    /// Queued PUT/PATCH/DELETE of one URI and caller fold into the pending PUT/PATCH of that
    /// URI (a newer PUT replaces it, a JSON merge patch is merged into it, a DELETE drops it);
    /// the folded key's status is `coalesced`.
    pub coalesce: bool,
    /// Remember the `ETag` (or `Last-Modified`) of the copy outpost served for a URI, and add
    /// `If-Match` (or `If-Unmodified-Since`) to a queued PUT/PATCH/DELETE of that URI that
    /// carries no precondition, so a change on the server meanwhile becomes a conflict.
    pub capture_version: bool,
    // --- end sync semantics ---
    /// Read your own writes: JSON reads reflect the caller's pending mutations on this route.
    pub overlay: bool,
    /// The item URI template, e.g. `/orders/{id}`; the collection is the template without its
    /// last segment. Required when `overlay` is on.
    pub item: Option<String>,
    /// The field of an item that holds its id (matched against the `{id}` segment).
    pub id_field: Option<String>,
    /// JSON pointer of the array in a collection answer; empty: the root.
    pub list_pointer: Option<String>,
    /// Mark overlaid elements with `_outpost: {"pending": true, "key": …}`.
    pub overlay_marker: bool,
    /// Poor links: a read with a cached copy waits at most this long for the upstream, then
    /// gets the copy (the late answer still refreshes the cache). Unset: no limit of its own.
    #[serde(with = "humantime_serde::option")]
    pub network_timeout: Option<Duration>,
    /// Poor links: a forwarded mutation slower than this is answered `202` under its key and
    /// settles in the background (never sent twice). Unset: the app waits for the answer.
    #[serde(with = "humantime_serde::option")]
    pub write_timeout: Option<Duration>,
    /// GraphQL over POST: a POST whose operation is a `query` is a read (cached under a hash of
    /// the normalised body); a `mutation` is a write.
    pub graphql: bool,
}

/// What a route does when the upstream answers a replayed mutation with a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ConflictPolicy {
    /// Keep it as a dead letter with the upstream's answer, for the app or an operator.
    #[default]
    DeadLetter,
    /// The server's state stands: record the conflict (`conflict`, not a dead letter) and go on.
    ServerWins,
    /// Send it once more without its preconditions (`If-Match`, `If-Unmodified-Since`,
    /// `If-None-Match`); a conflict without preconditions, or a second one, is a dead letter.
    ClientWins,
}

impl ConflictPolicy {
    /// The config's (and the metrics label's) name of the policy.
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictPolicy::DeadLetter => "dead-letter",
            ConflictPolicy::ServerWins => "server-wins",
            ConflictPolicy::ClientWins => "client-wins",
        }
    }
}

impl RouteConfig {
    /// The route's name: the configured one, else one derived from what it matches, e.g.
    /// `GET,HEAD /api/products/` or `* /orders/` (`*`: every method, or every path). Never its
    /// position: a queued mutation keeps its route's name and replay looks the rules up by
    /// it, so inserting a route must not hand other routes' rules to queued items.
    pub fn effective_name(&self) -> String {
        if let Some(name) = &self.name {
            return name.clone();
        }
        let mut methods = self.methods.clone();
        methods.sort();
        methods.dedup();
        let methods = if methods.is_empty() {
            "*".to_string()
        } else {
            methods.join(",")
        };
        let path = if self.path.is_empty() {
            "*"
        } else {
            &self.path
        };
        format!("{methods} {path}")
    }
}

/// The name of the route requests get when no `[[route]]` matches (reserved).
pub const DEFAULT_ROUTE_NAME: &str = "default";

/// Methods a route may name: RFC 9110's, PATCH (RFC 5789) and QUERY (the safe method with a
/// body). Anything else in a config is far more likely a typo (`GTE`) than a method.
pub const KNOWN_METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "QUERY", "OPTIONS", "TRACE", "CONNECT",
];

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

/// The text of a config file (an error naming the file when it cannot be read).
pub fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: Some(path.to_path_buf()),
        line: None,
        key: None,
        message: format!("cannot read: {e}"),
    })
}

impl ConfigError {
    /// The same error, said of the config file `path`.
    pub fn in_file(mut self, path: &Path) -> Self {
        self.file = Some(path.to_path_buf());
        self
    }

    /// Find the line of the error's key in the config `text` it came from.
    pub fn located_in(mut self, text: &str) -> Self {
        if self.line.is_none()
            && let Some(key) = &self.key
        {
            self.line = find_key_line(text, key);
        }
        self
    }

    /// An error about `key`.
    pub fn key(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            file: None,
            line: None,
            key: Some(key.into()),
            message: message.into(),
        }
    }
}

impl Config {
    /// Read and validate a config file (routes: see [`crate::route::load`]).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = read_file(path)?;
        Self::parse(&text).map_err(|e| e.in_file(path))
    }

    /// Parse and validate config text (errors carry line and key, not the file). The
    /// `[[route]]` entries are validated where they are compiled: [`crate::route::parse`]
    /// checks a whole config text, routes included.
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
        config.validate().map_err(|e| e.located_in(text))?;
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
        if self.queue.max_buffered_bytes < self.queue.max_body_bytes
            || self.queue.max_buffered_bytes / 1024 > u64::from(u32::MAX)
        {
            return Err(ConfigError::key(
                "queue.max_buffered_bytes",
                "must be at least queue.max_body_bytes and below 4 TiB",
            ));
        }
        let check = self.upstream.reconnect_check_interval;
        if !check.is_zero() && check < Duration::from_millis(10) {
            return Err(ConfigError::key(
                "upstream.reconnect_check_interval",
                "must be 0 (off) or at least 10ms",
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
        if !self.replay.accepted_at_header.is_empty()
            && http::HeaderName::from_bytes(self.replay.accepted_at_header.as_bytes()).is_err()
        {
            return Err(ConfigError::key(
                "replay.accepted_at_header",
                "must be a header name (or empty to send none)",
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
        if self.queue.max_bytes != 0 && self.queue.max_bytes < self.queue.max_body_bytes {
            return Err(ConfigError::key(
                "queue.max_bytes",
                "must be 0 (unlimited) or at least queue.max_body_bytes",
            ));
        }
        if self.store.backend == Backend::Redis {
            check_redis_url(&self.store.redis_url)
                .map_err(|message| ConfigError::key("store.redis_url", message))?;
        }
        check_sentinels(&self.store)?;
        check_cluster(&self.store)?;
        check_classify("replay.classify", &self.replay.classify)?;
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
        check_header_names(
            "proxy.record_redact_headers",
            &self.proxy.record_redact_headers,
        )?;
        if !self.admin.listen.ip().is_loopback() && self.admin.token.is_none() {
            return Err(ConfigError::key(
                "admin.token",
                "required when admin.listen is not a loopback address",
            ));
        }
        Ok(())
    }
}

/// A method a route may name: one of [`KNOWN_METHODS`], spelled as HTTP spells it.
pub(crate) fn check_method(m: &str) -> Result<(), String> {
    if KNOWN_METHODS.contains(&m) {
        return Ok(());
    }
    let upper = m.to_ascii_uppercase();
    if KNOWN_METHODS.contains(&upper.as_str()) {
        return Err(format!(
            "{m:?}: methods are case-sensitive, write {upper:?}"
        ));
    }
    Err(format!(
        "{m:?} is not an HTTP method outpost routes by; use {}",
        KNOWN_METHODS.join(", ")
    ))
}

/// Status lists hold HTTP status codes (100–599), and body rules JSON pointers; `prefix` is
/// where the rules sit (`replay.classify`, `route[2].classify`).
pub(crate) fn check_classify(prefix: &str, c: &ClassifyConfig) -> Result<(), ConfigError> {
    for (key, codes) in [
        ("retryable", &c.retryable),
        ("auth_required", &c.auth_required),
        ("conflict", &c.conflict),
        ("partial", &c.partial),
        ("validation", &c.validation),
    ] {
        if let Some(code) = codes.iter().find(|c| !(100..=599).contains(*c)) {
            return Err(ConfigError::key(
                format!("{prefix}.{key}"),
                format!("{code} is not an HTTP status code (100–599)"),
            ));
        }
    }
    for (j, rule) in c.body.iter().enumerate() {
        if !rule.pointer.is_empty() && !rule.pointer.starts_with('/') {
            return Err(ConfigError::key(
                format!("{prefix}.body[{j}].pointer"),
                "a JSON pointer starts with '/'",
            ));
        }
    }
    Ok(())
}

/// What is wrong with a Redis URL, said so an operator can fix it.
/// Sentinel settings: both keys or neither, `host:port` addresses, and no explicit URL as well.
fn check_sentinels(store: &StoreConfig) -> Result<(), ConfigError> {
    if store.redis_sentinels.is_empty() {
        for (key, value) in [
            ("store.redis_sentinel_master", &store.redis_sentinel_master),
            (
                "store.redis_sentinel_username",
                &store.redis_sentinel_username,
            ),
            (
                "store.redis_sentinel_password",
                &store.redis_sentinel_password,
            ),
        ] {
            if !value.is_empty() {
                return Err(ConfigError::key(
                    key,
                    "is set but store.redis_sentinels is empty",
                ));
            }
        }
        return Ok(());
    }
    if store.backend != Backend::Redis {
        return Err(ConfigError::key(
            "store.redis_sentinels",
            "is set but store.backend is not \"redis\"",
        ));
    }
    if store.redis_sentinel_master.is_empty() {
        return Err(ConfigError::key(
            "store.redis_sentinel_master",
            "must name the monitored master when store.redis_sentinels is set",
        ));
    }
    if store.redis_url != StoreConfig::default().redis_url {
        return Err(ConfigError::key(
            "store.redis_sentinels",
            "contradicts store.redis_url: with Sentinels the primary is asked of them; \
             remove store.redis_url",
        ));
    }
    for addr in &store.redis_sentinels {
        let port_ok = addr
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            return Err(ConfigError::key(
                "store.redis_sentinels",
                format!("{addr:?} is not host:port"),
            ));
        }
    }
    Ok(())
}

/// Redis Cluster settings: `host:port` nodes, the redis backend, and neither Sentinels nor an
/// explicit URL as well. Whether `store.redis_min_replicas` fits the replicas per shard only the
/// running cluster knows: that is checked when outpost connects (it exits naming the key).
fn check_cluster(store: &StoreConfig) -> Result<(), ConfigError> {
    if store.redis_cluster_nodes.is_empty() {
        return Ok(());
    }
    if store.backend != Backend::Redis {
        return Err(ConfigError::key(
            "store.redis_cluster_nodes",
            "is set but store.backend is not \"redis\"",
        ));
    }
    if !store.redis_sentinels.is_empty() {
        return Err(ConfigError::key(
            "store.redis_cluster_nodes",
            "contradicts store.redis_sentinels: use Redis Cluster or Sentinel, not both",
        ));
    }
    if store.redis_url != StoreConfig::default().redis_url {
        return Err(ConfigError::key(
            "store.redis_cluster_nodes",
            "contradicts store.redis_url: with a cluster the nodes are asked for the slots; \
             remove store.redis_url",
        ));
    }
    for addr in &store.redis_cluster_nodes {
        let port_ok = addr
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            return Err(ConfigError::key(
                "store.redis_cluster_nodes",
                format!("{addr:?} is not host:port"),
            ));
        }
    }
    Ok(())
}

fn check_redis_url(url: &str) -> Result<(), String> {
    const FORM: &str =
        "expected redis://[user:password@]host[:port][/db] or unix:///path/to/redis.sock";
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!("{url:?} is not a URL; {FORM}"));
    };
    match scheme {
        "redis" | "valkey" => {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
            let host_port = authority.rsplit('@').next().unwrap_or("");
            let (host, port) = match host_port.rsplit_once(':') {
                // An IPv6 literal's colons are inside its brackets.
                Some((h, p)) if !p.contains(']') => (h, Some(p)),
                _ => (host_port, None),
            };
            if host.is_empty() {
                return Err(format!("{url:?} names no host; {FORM}"));
            }
            if let Some(port) = port
                && port.parse::<u16>().is_err()
            {
                return Err(format!("{port:?} in {url:?} is not a port number"));
            }
            let db = rest[authority.len()..]
                .split(['?', '#'])
                .next()
                .unwrap_or("")
                .trim_matches('/');
            if !db.is_empty() && db.parse::<i64>().is_err() {
                return Err(format!(
                    "{db:?} in {url:?} is not a database number (the path is /0, /1, …)"
                ));
            }
        }
        "unix" | "redis+unix" | "valkey+unix" => {
            if !rest.starts_with('/') {
                return Err(format!(
                    "{url:?} needs an absolute socket path, e.g. unix:///run/redis/redis.sock"
                ));
            }
        }
        "rediss" | "valkeys" => {
            return Err(format!(
                "{scheme}:// (TLS) is not supported by this build; use redis:// on a trusted \
                 network or through a TLS tunnel"
            ));
        }
        other => return Err(format!("{other}:// is not a Redis URL scheme; {FORM}")),
    }
    // What the checks above miss, the client's own parser says (without its error kind).
    redis::Client::open(url).map(drop).map_err(|e| {
        let why = e.to_string().replace(" - InvalidClientConfig", "");
        format!("{url:?} is not a usable Redis URL: {why}")
    })
}

/// Every entry of `names` must be a valid HTTP header name.
pub(crate) fn check_header_names(key: &str, names: &[String]) -> Result<(), ConfigError> {
    for name in names {
        http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| ConfigError::key(key, format!("{name:?} is not a header name")))?;
    }
    Ok(())
}

/// One line of a TOML text as error messages name it: the table it is in, with the index of
/// each array-of-tables element (`route[1]`, `route[1].classify.body[0]`), and the key it sets.
/// One form everywhere: `route[N].key`, whether serde or validation found the error.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TomlLine {
    /// The table; empty for top-level keys.
    table: String,
    /// The (dotted) key this line sets, if it sets one.
    key: Option<String>,
    /// Whether the line is a table header (`[proxy]`, `[[route]]`).
    header: bool,
}

impl TomlLine {
    /// `table.key` (or the table, for its header).
    fn dotted(&self) -> Option<String> {
        match (&self.key, self.header) {
            (Some(key), _) if self.table.is_empty() => Some(key.clone()),
            (Some(key), _) => Some(format!("{}.{key}", self.table)),
            (None, true) => Some(self.table.clone()),
            (None, false) => None,
        }
    }
}

/// The [`TomlLine`] of every line of `text` (a line-based reading: good enough for config
/// files, where tables and keys start lines).
fn toml_outline(text: &str) -> Vec<TomlLine> {
    // Elements seen so far of each array of tables, by its indexed path (`route[1].classify.body`).
    let mut arrays: std::collections::HashMap<String, usize> = Default::default();
    let mut table = String::new();
    text.lines()
        .map(|line| {
            let t = line.trim();
            if let Some(name) = table_header(t, "[[", "]]") {
                let segments = key_segments(name);
                let (last, parents) = segments.split_last().unwrap_or((&"", &[]));
                let path = join_key(&indexed_path(&arrays, parents), last);
                let n = arrays.entry(path.clone()).or_insert(0);
                table = format!("{path}[{n}]");
                *n += 1;
                TomlLine {
                    table: table.clone(),
                    key: None,
                    header: true,
                }
            } else if let Some(name) = table_header(t, "[", "]") {
                table = indexed_path(&arrays, &key_segments(name));
                TomlLine {
                    table: table.clone(),
                    key: None,
                    header: true,
                }
            } else {
                let key = t
                    .split_once('=')
                    .map(|(k, _)| k.trim())
                    .filter(|k| is_key_path(k))
                    .map(|k| key_segments(k).join("."));
                TomlLine {
                    table: table.clone(),
                    key,
                    header: false,
                }
            }
        })
        .collect()
}

/// The name inside a table header line `open name close [# comment]`.
fn table_header<'a>(line: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(open)?;
    if open == "[" && rest.starts_with('[') {
        return None;
    }
    let (name, after) = rest.split_once(close)?;
    let after = after.trim_start();
    (is_key_path(name) && (after.is_empty() || after.starts_with('#'))).then_some(name)
}

/// Whether `s` looks like a TOML key path: bare or quoted keys joined by dots.
fn is_key_path(s: &str) -> bool {
    !s.trim().is_empty()
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ' ' | '\t' | '"' | '\'')
        })
}

/// The segments of a key path, trimmed and unquoted.
fn key_segments(path: &str) -> Vec<&str> {
    path.split('.')
        .map(|s| s.trim().trim_matches(|c| c == '"' || c == '\''))
        .collect()
}

fn join_key(table: &str, key: &str) -> String {
    if table.is_empty() {
        key.to_string()
    } else {
        format!("{table}.{key}")
    }
}

/// `segments` joined, each array of tables among them given its current element's index.
fn indexed_path(arrays: &std::collections::HashMap<String, usize>, segments: &[&str]) -> String {
    let mut path = String::new();
    for segment in segments {
        path = join_key(&path, segment);
        if let Some(n) = arrays.get(&path) {
            path = format!("{path}[{}]", n.saturating_sub(1));
        }
    }
    path
}

/// Line (1-based) and dotted key (`route[1].read`) of the byte offset `pos` in `text`.
fn locate_span(text: &str, pos: usize) -> (Option<usize>, Option<String>) {
    let pos = pos.min(text.len());
    let line_no = text[..pos].matches('\n').count() + 1;
    let outline = toml_outline(text);
    let Some(line) = outline.get(line_no - 1) else {
        return (Some(line_no), None);
    };
    // A value continued over several lines belongs to the key above it in the same table.
    let key = line.dotted().or_else(|| {
        outline[..line_no - 1]
            .iter()
            .rev()
            .take_while(|l| l.table == line.table)
            .find_map(|l| l.key.as_ref().and_then(|_| l.dotted()))
            .or_else(|| (!line.table.is_empty()).then(|| line.table.clone()))
    });
    (Some(line_no), key)
}

fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest.split('`').next()?.to_string())
}

/// Line of the dotted key (`route[1].path`) in `text`, for errors found after parsing; when
/// the key is not in the file (a default), the header of the nearest table it belongs to.
fn find_key_line(text: &str, dotted: &str) -> Option<usize> {
    let outline = toml_outline(text);
    if let Some(i) = outline
        .iter()
        .position(|l| !l.header && l.dotted().as_deref() == Some(dotted))
    {
        return Some(i + 1);
    }
    let mut table = dotted;
    loop {
        if let Some(i) = outline.iter().position(|l| l.header && l.table == table) {
            return Some(i + 1);
        }
        table = &table[..table.rfind('.')?];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multi_line_value_is_located_at_its_key() {
        assert_eq!(
            locate_span("[proxy]\nlisten = [\n  1,\n]\n", 20),
            (Some(3), Some("proxy.listen".into()))
        );
    }

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
    fn memory_and_reconnect_settings_are_checked_and_named() {
        for (text, key) in [
            (
                "[queue]\nmax_body_bytes = 2048\nmax_buffered_bytes = 1024\n",
                "queue.max_buffered_bytes",
            ),
            (
                "[upstream]\nreconnect_check_interval = \"1ms\"\n",
                "upstream.reconnect_check_interval",
            ),
        ] {
            let err = Config::parse(text).expect_err(text);
            assert_eq!(err.key.as_deref(), Some(key), "{text}: {err}");
        }
        let c = Config::parse("[upstream]\nreconnect_check_interval = \"0s\"\n").expect("0 = off");
        assert!(c.upstream.reconnect_check_interval.is_zero());
        let d = Config::default();
        assert_eq!(
            d.upstream.reconnect_check_interval,
            Duration::from_millis(250)
        );
        assert!(d.queue.max_buffered_bytes >= d.queue.max_body_bytes);
    }

    #[test]
    fn contradictory_sentinel_settings_name_the_key() {
        for (store, key, needle) in [
            (
                "redis_sentinels = [\"10.0.0.1:26379\"]\nredis_sentinel_master = \"m\"\nredis_url = \"redis://10.0.0.2/\"",
                "store.redis_sentinels",
                "contradicts store.redis_url",
            ),
            (
                "redis_sentinels = [\"10.0.0.1:26379\"]",
                "store.redis_sentinel_master",
                "must name",
            ),
            (
                "backend = \"embedded\"\nredis_sentinels = [\"10.0.0.1:26379\"]",
                "store.redis_sentinels",
                "store.backend",
            ),
            (
                "redis_sentinel_master = \"m\"",
                "store.redis_sentinel_master",
                "redis_sentinels is empty",
            ),
            (
                "redis_sentinels = [\"10.0.0.1\"]\nredis_sentinel_master = \"m\"",
                "store.redis_sentinels",
                "not host:port",
            ),
            (
                "redis_sentinel_password = \"pw\"",
                "store.redis_sentinel_password",
                "redis_sentinels is empty",
            ),
            (
                "redis_cluster_nodes = [\"10.0.0.1:7000\"]\nredis_url = \"redis://10.0.0.2/\"",
                "store.redis_cluster_nodes",
                "contradicts store.redis_url",
            ),
            (
                "redis_cluster_nodes = [\"10.0.0.1:7000\"]\nredis_sentinels = [\"10.0.0.1:26379\"]\nredis_sentinel_master = \"m\"",
                "store.redis_cluster_nodes",
                "contradicts store.redis_sentinels",
            ),
            (
                "redis_cluster_nodes = [\"10.0.0.1:7000\"]\nredis_sentinel_master = \"m\"",
                "store.redis_sentinel_master",
                "redis_sentinels is empty",
            ),
            (
                "backend = \"embedded\"\nredis_cluster_nodes = [\"10.0.0.1:7000\"]",
                "store.redis_cluster_nodes",
                "not \"redis\"",
            ),
            (
                "redis_cluster_nodes = [\"10.0.0.1\"]",
                "store.redis_cluster_nodes",
                "host:port",
            ),
        ] {
            let text = if store.starts_with("backend") {
                format!("[store]\n{store}\n")
            } else {
                format!("[store]\nbackend = \"redis\"\n{store}\n")
            };
            let err = Config::parse(&text).expect_err(store);
            assert_eq!(err.key.as_deref(), Some(key), "{store}");
            assert!(err.message.contains(needle), "{store}: {}", err.message);
        }
        let ok = "[store]\nbackend = \"redis\"\nredis_sentinels = [\"a:26379\", \"b:26379\"]\n\
                  redis_sentinel_master = \"m\"\n";
        let config = Config::parse(ok).expect("sentinels alone are valid");
        assert_eq!(config.store.redis_sentinels.len(), 2);
    }

    #[test]
    fn bad_redis_urls_say_what_is_wrong() {
        for (url, says) in [
            ("localhost:6379", "is not a URL"),
            ("http://localhost", "is not a Redis URL scheme"),
            ("redis://", "names no host"),
            ("redis://user:pw@:6379", "names no host"),
            ("redis://localhost:63a9", "is not a port number"),
            ("redis://localhost:6379/db", "is not a database number"),
            ("rediss://localhost", "TLS"),
            ("unix://relative.sock", "absolute socket path"),
            ("redis://0.0.0.0", "wildcard"),
        ] {
            let text = format!("[store]\nbackend = \"redis\"\nredis_url = \"{url}\"\n");
            let err = Config::parse(&text).expect_err(url);
            assert_eq!(err.key.as_deref(), Some("store.redis_url"), "{url}");
            assert_eq!(err.line, Some(3), "{url}");
            assert!(err.message.contains(says), "{url}: {err}");
            assert!(!err.message.contains("InvalidClientConfig"), "{url}: {err}");
        }
        for url in [
            "redis://localhost",
            "redis://:secret@10.0.0.5:6380/2",
            "redis://[::1]:6379/0",
            "unix:///run/redis.sock",
        ] {
            let text = format!("[store]\nbackend = \"redis\"\nredis_url = \"{url}\"\n");
            Config::parse(&text).unwrap_or_else(|e| panic!("{url}: {e}"));
        }
    }

    /// Issue #15 point 7: route keys are named one way, `route[N].key`, with the right line,
    /// whether the parser or the validation found the error.
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
