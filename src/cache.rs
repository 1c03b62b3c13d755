//! The read cache: keys, what may be stored (an RFC 9111 subset), and two tiers.
//!
//! - **Key**: method (HEAD shares GET's entries) + the host the app asked for (forwarded as
//!   `X-Forwarded-Host`, so the upstream may answer by it) + path and query (dot-segments
//!   removed) + the caller's [`Identity`] (the route's identity headers; none on public
//!   routes) + for reads with a body (GraphQL queries over POST, `QUERY`) a digest of the
//!   normalised body ([`crate::graphql`]), and then the request's values of the headers
//!   named by the stored response's `Vary`.
//! - **Policy**: only answers to GET (and to reads with a body) with a cacheable status are
//!   stored; `no-store` (request or response) never is; `Vary: *` never is; `private`
//!   answers only for a caller who sent identity headers ([`Audience`]); on public routes
//!   answers that set cookies are not stored, and stored copies never replay `Set-Cookie`.
//!   Freshness: `s-maxage`/`max-age`/`Expires`, else the route's TTL; `no-cache` makes a copy
//!   stale at once (it is still served while offline).
//! - **Tiers**: a moka cache in memory, weighted by bytes, over the store's durable tier (redb
//!   or Redis), so cached reads survive a restart during an outage. Memory holds an answer
//!   without `Vary` (most) under its primary key, so reading it is one lookup and one hash.
//!   Writes go to memory at once and to the durable tier in the background, one resource's
//!   in the order they were made; a copy identical to the one stored moments ago is not
//!   rewritten to disk, which keeps the online hot path off the disk.
//! - **Durable layout**: every blob is one response, so the store's entry count (admin
//!   `/status` `cache_entries`) counts responses. The primary key's slot (`r:` + primary key)
//!   holds one response with its full key, and is read first: for answers without `Vary` (most)
//!   it is the only read. Further variants of a resource with `Vary` get blobs of their own
//!   (`e:` + full key), found through the Vary names the slot's response carries. Earlier
//!   releases kept the names in an index blob (`v:`), still read when there is no slot.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::body::{self, ProxyBody};
use crate::config::CacheConfig;
use crate::context::Identity;
use crate::store::codec;
use crate::store::{Store, now_ms};

/// How often an unchanged entry is rewritten to the durable tier at most.
const DISK_REFRESH_MS: u64 = 5_000;

/// The primary key: method, host, URI, identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PrimaryKey([u8; 32]);

/// The full key: primary key plus the request's values of the `Vary` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

impl PrimaryKey {
    /// Key for `method host path_and_query` as seen by `identity`.
    pub fn new(method: &Method, host: &str, path_and_query: &str, identity: &Identity) -> Self {
        let method = if method == Method::HEAD {
            &Method::GET
        } else {
            method
        };
        let mut h = Sha256::new();
        h.update(method.as_str().as_bytes());
        h.update(b"\0");
        h.update(host.as_bytes());
        h.update(b"\0");
        h.update(path_and_query.as_bytes());
        h.update(b"\0");
        h.update(identity.0);
        PrimaryKey(h.finalize().into())
    }

    /// The key of a read that carries a body (a GraphQL query over POST, `QUERY`): this key
    /// with the digest of the (normalised) body, so each body has entries of its own.
    pub fn with_body(&self, digest: &[u8; 32]) -> Self {
        let mut h = Sha256::new();
        h.update(self.0);
        h.update(b"\0body\0");
        h.update(digest);
        PrimaryKey(h.finalize().into())
    }

    /// The full key given the Vary header names and the request's headers.
    pub fn with_vary(&self, vary: &[String], request: &HeaderMap) -> CacheKey {
        let mut h = Sha256::new();
        h.update(self.0);
        for name in vary {
            h.update(name.as_bytes());
            h.update(b":");
            for v in request.get_all(name.as_str()) {
                h.update(v.as_bytes());
                h.update(b",");
            }
            h.update(b"\0");
        }
        CacheKey(h.finalize().into())
    }
}

/// A stored response.
#[derive(Debug, Serialize, Deserialize)]
pub struct CachedResponse {
    /// Status code.
    pub status: u16,
    /// End-to-end headers, without `Set-Cookie`.
    pub headers: Vec<(String, Bytes)>,
    /// The whole body.
    pub body: Bytes,
    /// When it was stored or last confirmed unchanged by the upstream (Unix ms).
    pub stored_at_ms: AtomicU64,
    /// Age the upstream reported when it was stored, in seconds.
    pub initial_age_s: u64,
    /// Fresh until (Unix ms); after that it is stale (still served offline).
    pub fresh_until_ms: AtomicU64,
    /// Header names from the response's `Vary`, lower-case.
    pub vary: Vec<String>,
    /// When this content was last written to the durable tier (memory only).
    #[serde(skip)]
    pub persisted_at_ms: AtomicU64,
    /// `headers` as a header map, made at the first answer from this entry and cloned for
    /// each one after (memory only): parsing every name again on each hit costs more.
    #[serde(skip)]
    pub prepared: std::sync::OnceLock<HeaderMap>,
}

impl CachedResponse {
    /// Seconds since the upstream produced it (the `Age` header).
    pub fn age_s(&self, now_ms: u64) -> u64 {
        let stored = self.stored_at_ms.load(Ordering::Relaxed);
        self.initial_age_s
            .saturating_add(now_ms.saturating_sub(stored) / 1000)
    }

    /// Whether it is still fresh.
    pub fn is_fresh(&self, now_ms: u64) -> bool {
        now_ms < self.fresh_until()
    }

    /// Fresh until (Unix ms).
    pub fn fresh_until(&self) -> u64 {
        self.fresh_until_ms.load(Ordering::Relaxed)
    }

    /// Whether an upstream answer has exactly this content (status, end-to-end headers but
    /// `Date`, body), compared without allocating.
    fn same_content(&self, status: u16, headers: &HeaderMap, body: &[u8]) -> bool {
        if self.status != status || self.body.as_ref() != body {
            return false;
        }
        let mut stored = self.headers.iter().filter(|(n, _)| n != "date");
        let mut fresh = headers
            .iter()
            .filter(|(n, _)| keep_header(n) && *n != header::DATE);
        loop {
            match (stored.next(), fresh.next()) {
                (None, None) => return true,
                (Some((sn, sv)), Some((fname, fv))) => {
                    if sn.as_str() != fname.as_str() || sv.as_ref() != fv.as_bytes() {
                        return false;
                    }
                }
                _ => return false,
            }
        }
    }

    /// Build the response the app sees, with `Cache-Status` and `Age`.
    pub fn to_response(&self, head_only: bool, cache_status: &'static str) -> Response<ProxyBody> {
        let mut resp = Response::new(if head_only {
            body::empty()
        } else {
            body::full(self.body.clone())
        });
        *resp.status_mut() = StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK);
        *resp.headers_mut() = self
            .prepared
            .get_or_init(|| {
                // Room for the two headers added below.
                let mut map = HeaderMap::with_capacity(self.headers.len() + 2);
                for (name, value) in &self.headers {
                    if let (Ok(n), Ok(v)) = (
                        HeaderName::from_bytes(name.as_bytes()),
                        HeaderValue::from_bytes(value),
                    ) {
                        map.append(n, v);
                    }
                }
                map
            })
            .clone();
        let headers = resp.headers_mut();
        headers.insert(header::AGE, HeaderValue::from(self.age_s(now_ms())));
        headers.insert(CACHE_STATUS.clone(), HeaderValue::from_static(cache_status));
        resp
    }
}

/// The `Cache-Status` header name (RFC 9211).
pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// Cache-Status values outpost sends.
pub mod status {
    /// Fetched upstream and stored.
    pub const STORED: &str = "outpost; fwd=uri-miss; stored";
    /// Fetched upstream, not stored.
    pub const MISS: &str = "outpost; fwd=uri-miss";
    /// Served from cache, fresh.
    pub const HIT: &str = "outpost; hit";
    /// Served from cache because the upstream is unreachable.
    pub const HIT_OFFLINE: &str = "outpost; hit; detail=offline";
    /// Served from cache, changed by the caller's pending writes.
    pub const HIT_OVERLAY: &str = "outpost; hit; detail=overlay";
    /// Fetched upstream, changed by the caller's pending writes.
    pub const FWD_OVERLAY: &str = "outpost; fwd=uri-miss; detail=overlay";
    /// Served from cache because the upstream took longer than the route's `network_timeout`.
    pub const HIT_NETWORK_TIMEOUT: &str = "outpost; hit; detail=network-timeout";
    /// Served stale while a background refresh runs.
    pub const HIT_STALE: &str = "outpost; hit; detail=stale-while-revalidate";
    /// The route or request bypasses the cache.
    pub const BYPASS: &str = "outpost; fwd=bypass";
    /// Not a cacheable method (mutations).
    pub const METHOD: &str = "outpost; fwd=method";
    /// A mutation stored in the outbox.
    pub const QUEUED: &str = "outpost; fwd=method; detail=queued";
    /// The stored answer of an earlier mutation with the same key.
    pub const IDEMPOTENT: &str = "outpost; hit; detail=idempotent-replay";
    /// Offline and nothing cached.
    pub const OFFLINE_MISS: &str = "outpost; fwd=uri-miss; detail=offline";
}

/// Set `Cache-Status` unless the response already has one.
pub fn with_cache_status(
    mut resp: Response<ProxyBody>,
    value: &'static str,
) -> Response<ProxyBody> {
    if !resp.headers().contains_key(&CACHE_STATUS) {
        resp.headers_mut()
            .insert(CACHE_STATUS.clone(), HeaderValue::from_static(value));
    }
    resp
}

/// Whether an answer may be stored, and under which terms.
#[derive(Debug, Clone)]
pub struct Storable {
    /// Header names from `Vary`.
    pub vary: Vec<String>,
    /// Freshness lifetime from now.
    pub fresh_for: Duration,
    /// The upstream's `Age`.
    pub initial_age_s: u64,
}

/// Whom a stored copy answers: what decides whether `private` answers and answers that set
/// cookies may be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// Every caller (a `public` route): neither is stored; `s-maxage` applies.
    Everyone,
    /// Callers that send no identity headers, on a route that is not public: they share one
    /// copy, so a `private` answer (meant for one user, whom outpost cannot tell apart) is not
    /// stored.
    Anonymous,
    /// One identity: both are stored (never replaying `Set-Cookie`).
    Caller,
}

impl Audience {
    /// The audience of a request on a route (`public` or not) from the caller `identity`.
    pub fn of(public_route: bool, identity: &Identity) -> Self {
        if public_route {
            Audience::Everyone
        } else if identity.is_anonymous() {
            Audience::Anonymous
        } else {
            Audience::Caller
        }
    }
}

/// Decide whether an answer to a GET (or to a read with a body) may be stored (see the module
/// docs).
pub fn storable(
    request: &HeaderMap,
    status: StatusCode,
    headers: &HeaderMap,
    audience: Audience,
    default_ttl: Duration,
) -> Option<Storable> {
    const CACHEABLE: [u16; 8] = [200, 203, 204, 300, 301, 308, 404, 410];
    if !CACHEABLE.contains(&status.as_u16()) {
        return None;
    }
    let req_cc = CacheControl::of(request);
    let cc = CacheControl::of(headers);
    if req_cc.no_store || cc.no_store {
        return None;
    }
    // A private answer is one caller's; one that sets cookies is not stored for everyone.
    if (cc.private && audience != Audience::Caller)
        || (audience == Audience::Everyone && headers.contains_key(header::SET_COOKIE))
    {
        return None;
    }
    let mut vary = Vec::new();
    for name in headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        if name == "*" {
            return None;
        }
        vary.push(name.to_ascii_lowercase());
    }
    let fresh_for = if cc.no_cache {
        Duration::ZERO
    } else if let Some(s) = cc.s_maxage.filter(|_| audience == Audience::Everyone) {
        Duration::from_secs(s)
    } else if let Some(s) = cc.max_age {
        Duration::from_secs(s)
    } else if let Some(expires) = headers
        .get(header::EXPIRES)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
    {
        expires
            .duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO)
    } else {
        default_ttl
    };
    let initial_age_s = headers
        .get(header::AGE)
        .and_then(|v| delta_seconds(v.to_str().ok()?))
        .unwrap_or(0);
    let fresh_for = fresh_for.min(Duration::from_secs(DELTA_SECONDS_MAX));
    Some(Storable {
        vary,
        fresh_for,
        initial_age_s,
    })
}

/// The largest delta-seconds value (RFC 9111 §1.2.2: larger ones count as 2^31), so that
/// upstream-controlled lifetimes never overflow time arithmetic.
const DELTA_SECONDS_MAX: u64 = 1 << 31;

/// A delta-seconds value (`max-age`, `s-maxage`, `Age`): digits only, capped at 2^31.
fn delta_seconds(v: &str) -> Option<u64> {
    let v = v.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        v.parse::<u64>()
            .map_or(DELTA_SECONDS_MAX, |n| n.min(DELTA_SECONDS_MAX)),
    )
}

/// The `Cache-Control` directives the cache acts on, parsed without allocating.
#[derive(Debug, Default)]
struct CacheControl {
    no_store: bool,
    no_cache: bool,
    private: bool,
    max_age: Option<u64>,
    s_maxage: Option<u64>,
}

impl CacheControl {
    fn of(headers: &HeaderMap) -> Self {
        let mut cc = CacheControl::default();
        for directive in headers
            .get_all(header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
        {
            let (name, value) = match directive.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                None => (directive.trim(), None),
            };
            let seconds = || value.and_then(delta_seconds);
            if name.eq_ignore_ascii_case("no-store") {
                cc.no_store = true;
            } else if name.eq_ignore_ascii_case("no-cache") {
                cc.no_cache = true;
            } else if name.eq_ignore_ascii_case("private") {
                cc.private = true;
            } else if name.eq_ignore_ascii_case("max-age") {
                cc.max_age = seconds();
            } else if name.eq_ignore_ascii_case("s-maxage") {
                cc.s_maxage = seconds();
            }
        }
        cc
    }
}

/// Headers a stored copy keeps (not `Set-Cookie`, `Age`, or our own `Cache-Status`).
fn keep_header(name: &HeaderName) -> bool {
    *name != header::SET_COOKIE && *name != header::AGE && *name != CACHE_STATUS
}

/// The durable primary slot as written: one response and the full key it answers.
#[derive(Serialize)]
struct SlotRef<'a> {
    key: [u8; 32],
    entry: &'a CachedResponse,
}

/// The durable primary slot as read.
#[derive(Deserialize)]
struct SlotBlob {
    key: [u8; 32],
    entry: CachedResponse,
}

/// What this process knows about a primary key: the Vary names of its answers, and which
/// variant the durable primary slot holds (`None`: not known, e.g. names read from an index
/// blob of an earlier release).
#[derive(Debug)]
struct Primary {
    vary: Vec<String>,
    slot: Option<CacheKey>,
}

/// Where a response is written in the durable tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// The primary slot.
    Slot,
    /// A blob of its own under its full key (another variant holds the slot).
    Variant,
    /// Not known yet (after a restart): the write reads the durable slot first.
    Ask,
}

/// Hashes a key that is a SHA-256 digest already ([`PrimaryKey`], [`CacheKey`]): its first
/// eight bytes are as uniform as any hash of it, so the in-memory maps need not hash it again
/// (SipHash over 32 bytes, on every lookup of every request).
#[derive(Debug, Clone, Copy, Default)]
struct DigestHash;

impl std::hash::BuildHasher for DigestHash {
    type Hasher = DigestHasher;

    fn build_hasher(&self) -> DigestHasher {
        DigestHasher(0)
    }
}

/// See [`DigestHash`].
#[derive(Debug, Default)]
struct DigestHasher(u64);

impl std::hash::Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // A digest arrives whole: its first eight bytes. (Choosing inputs whose digests share
        // them takes about 2^32 hashes for one pair: a slower bucket, nothing worse.)
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(word);
    }

    fn write_usize(&mut self, _len: usize) {
        // The array's length prefix: the same for every key.
    }
}

/// An entry [`Cache::find`] found, and the key memory holds it under.
#[derive(Debug, Clone)]
pub struct Found {
    /// The cached response.
    pub entry: Arc<CachedResponse>,
    /// Its memory key ([`memory_key`]).
    key: CacheKey,
}

/// The key memory holds a response under: for an answer without `Vary` (most), the primary
/// key itself, so that a read of it is one lookup and no second hash; for one with `Vary`, its
/// full key. (The durable tier keys every response by its full key, as earlier releases did.)
fn memory_key(primary: &PrimaryKey, vary: &[String], request: &HeaderMap) -> CacheKey {
    if vary.is_empty() {
        CacheKey(primary.0)
    } else {
        primary.with_vary(vary, request)
    }
}

/// The two-tier cache.
pub struct Cache {
    memory: moka::sync::Cache<CacheKey, Arc<CachedResponse>, DigestHash>,
    primaries: moka::sync::Cache<PrimaryKey, Arc<Primary>, DigestHash>,
    store: Arc<dyn Store>,
    config: CacheConfig,
    /// Durable writes not yet made, per resource whose writes are under way (see
    /// [`Cache::persist`]).
    persisting: Mutex<HashMap<PrimaryKey, VecDeque<Persist>, DigestHash>>,
}

/// A durable write waiting for the one before it, of the same resource.
struct Persist {
    key: CacheKey,
    entry: Arc<CachedResponse>,
    ttl: Duration,
    place: Place,
}

impl Cache {
    /// A cache holding `config.memory_bytes` in memory over `store`'s durable tier.
    pub fn new(config: &CacheConfig, store: Arc<dyn Store>) -> Self {
        let memory = moka::sync::Cache::builder()
            .max_capacity(config.memory_bytes)
            .weigher(|_k, v: &Arc<CachedResponse>| {
                let headers: usize = v.headers.iter().map(|(n, v)| n.len() + v.len()).sum();
                u32::try_from(v.body.len() + headers + 128).unwrap_or(u32::MAX)
            })
            .build_with_hasher(DigestHash);
        let primaries = moka::sync::Cache::builder()
            .max_capacity(100_000)
            .build_with_hasher(DigestHash);
        Self {
            memory,
            primaries,
            store,
            config: config.clone(),
            persisting: Mutex::new(HashMap::with_hasher(DigestHash)),
        }
    }

    /// Whether caching is on.
    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// Largest body that is cached.
    pub fn max_entry_bytes(&self) -> u64 {
        self.config.max_entry_bytes
    }

    /// Entries and weighted bytes in memory.
    pub fn memory_usage(&self) -> (u64, u64) {
        (self.memory.entry_count(), self.memory.weighted_size())
    }

    /// Look up the entry for a request (memory first, then the durable tier).
    pub async fn get(
        &self,
        primary: &PrimaryKey,
        request: &HeaderMap,
    ) -> Option<Arc<CachedResponse>> {
        self.find(primary, request).await.map(|found| found.entry)
    }

    /// [`Self::get`], with the key the entry was found under (for [`Self::put`] after the
    /// upstream answered the same request).
    pub async fn find(&self, primary: &PrimaryKey, request: &HeaderMap) -> Option<Found> {
        if !self.config.enabled {
            return None;
        }
        // An answer without Vary: memory holds it under the primary key.
        let plain = CacheKey(primary.0);
        if let Some(entry) = self.memory.get(&plain) {
            return Some(Found { entry, key: plain });
        }
        let known = self.primaries.get(primary);
        if let Some(known) = &known
            && !known.vary.is_empty()
        {
            let key = primary.with_vary(&known.vary, request);
            if let Some(entry) = self.memory.get(&key) {
                return Some(Found { entry, key });
            }
        }
        let slot = self
            .durable_get(&durable_slot_key(primary))
            .await
            .and_then(|blob| codec::decode_cached::<SlotBlob>(&blob).ok());
        let key = match (slot, known) {
            // This process stored answers under other Vary names since the slot was written
            // (its write is still on the way, or failed): the slot's copy is older than what
            // this process knows, and only a variant of the current names may answer.
            (Some(slot), Some(known)) if known.vary != slot.entry.vary => {
                primary.with_vary(&known.vary, request)
            }
            (Some(slot), _) => {
                let key = primary.with_vary(&slot.entry.vary, request);
                let holder = CacheKey(slot.key);
                self.learn(*primary, &slot.entry.vary, Some(holder));
                if key == holder {
                    return Some(self.remember(primary, request, slot.entry));
                }
                key
            }
            (None, _) => {
                // Stored by an earlier release: the Vary names in an index blob of their own.
                let blob = self.durable_get(&legacy_vary_key(primary)).await?;
                let names: Vec<String> = codec::decode_cached(&blob).ok()?;
                self.learn(*primary, &names, None);
                primary.with_vary(&names, request)
            }
        };
        let blob = self.durable_get(&durable_entry_key(&key)).await?;
        let entry: CachedResponse = codec::decode_cached(&blob).ok()?;
        Some(self.remember(primary, request, entry))
    }

    /// Keep an entry read from the durable tier in memory.
    fn remember(&self, primary: &PrimaryKey, request: &HeaderMap, entry: CachedResponse) -> Found {
        let key = memory_key(primary, &entry.vary, request);
        let entry = Arc::new(entry);
        self.memory.insert(key, entry.clone());
        Found { entry, key }
    }

    /// Note what the durable tier says about `primary`, unless this process knows already
    /// (its own writes are newer).
    fn learn(&self, primary: PrimaryKey, vary: &[String], slot: Option<CacheKey>) {
        self.primaries.entry(primary).or_insert_with(|| {
            Arc::new(Primary {
                vary: vary.to_vec(),
                slot,
            })
        });
    }

    /// Where the response for `key` (answers of `primary` vary by `vary`) is written, noting
    /// a claim of the slot.
    fn place(&self, primary: PrimaryKey, key: CacheKey, vary: &[String]) -> Place {
        let known = self.primaries.get(&primary);
        let place = match known.as_deref() {
            // Without Vary there is one variant: the slot is its.
            _ if vary.is_empty() => Place::Slot,
            // The names changed: what the slot holds was stored under the old ones.
            Some(p) if p.vary != vary => Place::Slot,
            Some(Primary {
                slot: Some(holder), ..
            }) if *holder == key => Place::Slot,
            Some(Primary { slot: Some(_), .. }) => return Place::Variant,
            // Not known: claim it here (so that variants stored meanwhile get blobs of their
            // own) and let the write look at the durable slot.
            Some(Primary { slot: None, .. }) | None => Place::Ask,
        };
        self.primaries.insert(
            primary,
            Arc::new(Primary {
                vary: vary.to_vec(),
                slot: Some(key),
            }),
        );
        place
    }

    /// Settle [`Place::Ask`]: a variant with the same Vary names already in the durable slot
    /// (stored before a restart) keeps it; else the slot is `key`'s.
    async fn ask_slot(&self, primary: PrimaryKey, key: CacheKey, vary: &[String]) -> Place {
        let holder = self
            .durable_get(&durable_slot_key(&primary))
            .await
            .and_then(|blob| codec::decode_cached::<SlotBlob>(&blob).ok())
            .filter(|slot| slot.key != key.0 && slot.entry.vary == vary)
            .map(|slot| CacheKey(slot.key));
        match holder {
            Some(holder) => {
                self.primaries.insert(
                    primary,
                    Arc::new(Primary {
                        vary: vary.to_vec(),
                        slot: Some(holder),
                    }),
                );
                Place::Variant
            }
            None => Place::Slot,
        }
    }

    async fn durable_get(&self, key: &[u8]) -> Option<Bytes> {
        match self.store.cache_get(key).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!("durable cache read failed: {e}");
                None
            }
        }
    }

    /// Store a complete response (called when its body has streamed through). Memory is
    /// updated at once; the durable tier in the background, and only when the content changed
    /// or was last written more than a few seconds ago. `found`: the copy [`Self::find`] gave
    /// for this same request, if any; when the answer varies by the same header names, the
    /// copy is the entry under the answer's key, compared without hashing the key and looking
    /// it up again. (Should another read have replaced that entry meanwhile, or memory evicted
    /// it, an unchanged answer refreshes the found copy only: the next read finds what memory,
    /// or else the durable tier, holds, as before.)
    // The parts of one response and its storage terms; a struct for them would only be unpacked.
    #[allow(clippy::too_many_arguments)]
    pub fn put(
        self: &Arc<Self>,
        primary: PrimaryKey,
        request: &HeaderMap,
        status: u16,
        headers: &HeaderMap,
        body_bytes: Bytes,
        terms: Storable,
        max_stale: Duration,
        found: Option<&Found>,
    ) {
        let now = now_ms();
        let (key, old) = match found {
            Some(found) if found.entry.vary == terms.vary => (found.key, Some(found.entry.clone())),
            _ => {
                if !terms.vary.is_empty() {
                    // The answers vary (again): a copy kept from when they did not must not
                    // answer reads (memory looks under the primary key first).
                    self.memory.invalidate(&CacheKey(primary.0));
                }
                let key = memory_key(&primary, &terms.vary, request);
                (key, self.memory.get(&key))
            }
        };
        // The key the durable tier knows the response by.
        let durable_key = || {
            if terms.vary.is_empty() {
                primary.with_vary(&[], request)
            } else {
                key
            }
        };
        let fresh_until = now.saturating_add(terms.fresh_for.as_millis() as u64);
        if let Some(old) = old
            && old.same_content(status, headers, &body_bytes)
        {
            // The upstream confirmed the copy: refresh its times in place (no new entry).
            old.stored_at_ms.store(now, Ordering::Relaxed);
            old.fresh_until_ms.store(fresh_until, Ordering::Relaxed);
            let persisted = old.persisted_at_ms.load(Ordering::Relaxed);
            if now.saturating_sub(persisted) < DISK_REFRESH_MS
                && self.slot_layout_is(&primary, &terms.vary)
            {
                // The same content reached the durable tier moments ago: spare the disk.
                return;
            }
            old.persisted_at_ms.store(now, Ordering::Relaxed);
            let key = durable_key();
            let place = self.place(primary, key, &terms.vary);
            self.persist(primary, key, old, terms, max_stale, place);
            return;
        }
        let stored_headers: Vec<(String, Bytes)> = headers
            .iter()
            .filter(|(n, _)| keep_header(n))
            .map(|(n, v)| (n.as_str().to_string(), Bytes::copy_from_slice(v.as_bytes())))
            .collect();
        let entry = Arc::new(CachedResponse {
            status,
            headers: stored_headers,
            // A copy of its own: the bytes may be a slice of a connection's read buffer,
            // which a long-lived entry must not keep alive.
            body: Bytes::copy_from_slice(&body_bytes),
            stored_at_ms: AtomicU64::new(now),
            initial_age_s: terms.initial_age_s,
            fresh_until_ms: AtomicU64::new(fresh_until),
            vary: terms.vary.clone(),
            persisted_at_ms: AtomicU64::new(now),
            prepared: Default::default(),
        });
        self.memory.insert(key, entry.clone());
        let key = durable_key();
        let place = self.place(primary, key, &terms.vary);
        self.persist(primary, key, entry, terms, max_stale, place);
    }

    /// Whether the durable slot of `primary` was last written for answers varying by `vary`,
    /// as far as this process knows, so that an unchanged copy written moments ago need not be
    /// written again. Without Vary it was: a copy found under the primary key is dropped from
    /// memory as soon as an answer that varies is stored. With Vary, the answers may have
    /// stopped varying and started again meanwhile (the slot then holds the copy without
    /// Vary, and must be written again).
    fn slot_layout_is(&self, primary: &PrimaryKey, vary: &[String]) -> bool {
        vary.is_empty()
            || self
                .primaries
                .get(primary)
                .is_some_and(|known| known.vary == vary)
    }

    /// Write an entry to the durable tier in the background, at `place`. The writes of one
    /// resource reach the store in the order they were made, one at a time: a write that had
    /// to read the durable slot first (after a restart) landed after a later one, so that the
    /// slot kept an older answer than memory (found as a flaky test under load). A write
    /// waiting behind another replaces the waiting one of the same variant, so what waits is
    /// at most one write per variant.
    fn persist(
        self: &Arc<Self>,
        primary: PrimaryKey,
        key: CacheKey,
        entry: Arc<CachedResponse>,
        terms: Storable,
        max_stale: Duration,
        place: Place,
    ) {
        let job = Persist {
            key,
            entry,
            ttl: terms.fresh_for.saturating_add(max_stale),
            place,
        };
        {
            let mut persisting = self.persisting.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(waiting) = persisting.get_mut(&primary) {
                waiting.retain(|w| w.key != key);
                waiting.push_back(job);
                return;
            }
            persisting.insert(primary, VecDeque::new());
        }
        let this = self.clone();
        tokio::spawn(async move {
            // Should this task end early (its runtime stopping), later writes of the resource
            // must not wait behind it for ever.
            let mut done = Persisting {
                cache: &this,
                primary,
                finished: false,
            };
            let mut job = job;
            loop {
                this.write_durable(primary, job).await;
                let mut persisting = this.persisting.lock().unwrap_or_else(|e| e.into_inner());
                match persisting.get_mut(&primary).and_then(VecDeque::pop_front) {
                    Some(next) => job = next,
                    None => {
                        persisting.remove(&primary);
                        done.finished = true;
                        return;
                    }
                }
            }
        });
    }

    /// One durable write (see [`Cache::persist`]).
    async fn write_durable(&self, primary: PrimaryKey, job: Persist) {
        let Persist {
            key,
            entry,
            ttl,
            place,
        } = job;
        let place = match place {
            Place::Ask => self.ask_slot(primary, key, &entry.vary).await,
            place => place,
        };
        let (durable_key, blob) = match place {
            Place::Slot => (
                durable_slot_key(&primary),
                codec::encode_cached(&SlotRef {
                    key: key.0,
                    entry: &entry,
                }),
            ),
            Place::Variant | Place::Ask => (durable_entry_key(&key), codec::encode_cached(&*entry)),
        };
        match blob {
            Ok(blob) => {
                if let Err(e) = self
                    .store
                    .cache_put(&durable_key, Bytes::from(blob), ttl)
                    .await
                {
                    tracing::warn!("durable cache write failed: {e}");
                }
            }
            Err(e) => tracing::warn!("cache encode failed: {e}"),
        }
    }
}

/// Clears a resource's waiting writes when the task writing them ends without finishing.
struct Persisting<'a> {
    cache: &'a Cache,
    primary: PrimaryKey,
    finished: bool,
}

impl Drop for Persisting<'_> {
    fn drop(&mut self) {
        if !self.finished {
            let mut persisting = self
                .cache
                .persisting
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            persisting.remove(&self.primary);
        }
    }
}

fn durable_slot_key(primary: &PrimaryKey) -> Vec<u8> {
    let mut k = b"r:".to_vec();
    k.extend_from_slice(&primary.0);
    k
}

/// The index blob of Vary names earlier releases wrote beside each response (read only).
fn legacy_vary_key(primary: &PrimaryKey) -> Vec<u8> {
    let mut k = b"v:".to_vec();
    k.extend_from_slice(&primary.0);
    k
}

fn durable_entry_key(key: &CacheKey) -> Vec<u8> {
    let mut k = b"e:".to_vec();
    k.extend_from_slice(&key.0);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache over an embedded store in `dir` (a new one per "process"), once the previous
    /// one has let go of it (its last background write holds it a moment longer).
    async fn cache_in(dir: &std::path::Path) -> (Arc<Cache>, Arc<dyn Store>) {
        let mut tries = 0;
        let store: Arc<dyn Store> = loop {
            match crate::store::embedded::EmbeddedStore::open(dir, 1 << 20) {
                Ok(store) => break Arc::new(store),
                Err(e) if tries < 500 => {
                    tries += 1;
                    tracing::debug!("store still held ({e}); again");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("open the store: {e}"),
            }
        };
        let cache = Arc::new(Cache::new(&CacheConfig::default(), store.clone()));
        (cache, store)
    }

    /// Waits until the durable tier (read through a cache with empty memory) answers `path`
    /// for `request` with `body`.
    async fn wait_durable(store: &Arc<dyn Store>, path: &str, request: &HeaderMap, body: &str) {
        for _ in 0..500 {
            let fresh = Cache::new(&CacheConfig::default(), store.clone());
            if body_of(&fresh, path, request).await.as_deref() == Some(body) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{path} never read {body:?} from the durable tier");
    }

    async fn wait_entries(store: &Arc<dyn Store>, n: u64) -> u64 {
        for _ in 0..500 {
            let entries = store.stats().await.expect("stats").cache_entries;
            if entries >= n {
                return entries;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{n} durable cache entries never arrived");
    }

    fn lang(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT_LANGUAGE,
            HeaderValue::from_str(value).expect("value"),
        );
        h
    }

    fn put(cache: &Arc<Cache>, path: &str, request: &HeaderMap, vary: bool, body: &str) {
        put_over(cache, path, request, vary, body, None);
    }

    /// [`put`] after the upstream answered a request whose copy `find` gave.
    fn put_over(
        cache: &Arc<Cache>,
        path: &str,
        request: &HeaderMap,
        vary: bool,
        body: &str,
        found: Option<&Found>,
    ) {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=60"),
        );
        if vary {
            headers.insert(header::VARY, HeaderValue::from_static("Accept-Language"));
        }
        let terms = storable(
            request,
            StatusCode::OK,
            &headers,
            Audience::Caller,
            Duration::ZERO,
        )
        .expect("storable");
        let primary = PrimaryKey::new(&Method::GET, "h", path, &Identity([0; 32]));
        cache.put(
            primary,
            request,
            200,
            &headers,
            Bytes::from(body.to_string()),
            terms,
            Duration::from_secs(60),
            found,
        );
    }

    async fn body_of(cache: &Cache, path: &str, request: &HeaderMap) -> Option<String> {
        let primary = PrimaryKey::new(&Method::GET, "h", path, &Identity([0; 32]));
        let hit = cache.get(&primary, request).await?;
        Some(String::from_utf8_lossy(&hit.body).into_owned())
    }

    /// The first durable write of a resource after a start reads the durable slot before it
    /// writes (slowly here, as over a network); a later write of the same resource needs no
    /// read, and must still land after it: the slot then holds the newest answer, not the
    /// older one that finished its read last.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn durable_writes_of_a_resource_land_in_the_order_they_were_made() {
        let store: Arc<dyn Store> = Arc::new(
            crate::store::memory::MemoryStore::new(1 << 20, Duration::from_secs(30))
                .with_cache_read_delay(Duration::from_millis(300)),
        );
        let cache = Arc::new(Cache::new(&CacheConfig::default(), store.clone()));
        let primary = PrimaryKey::new(&Method::GET, "h", "/v", &Identity([0; 32]));
        put(&cache, "/v", &lang("en"), true, "en");
        let found = cache.find(&primary, &lang("en")).await;
        put_over(&cache, "/v", &lang("en"), false, "plain", found.as_ref());
        // Both writes are done well within this (each durable read takes 0.3 s).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let fresh = Cache::new(&CacheConfig::default(), store.clone());
        for language in ["fr", "en"] {
            assert_eq!(
                body_of(&fresh, "/v", &lang(language)).await.as_deref(),
                Some("plain"),
                "{language}: the durable slot holds the newest answer"
            );
        }
        assert!(
            cache
                .persisting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty(),
            "nothing is left waiting"
        );
    }

    /// Issue #15 point 7: the durable tier holds one blob per response (no index blobs), so
    /// the store's entry count is the number of cached responses; variants are found again
    /// after a restart, and a variant stored after one keeps the slot's holder in place.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_durable_tier_holds_one_blob_per_response() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let (cache, store) = cache_in(dir.path()).await;
            put(&cache, "/a", &HeaderMap::new(), false, "a");
            assert_eq!(wait_entries(&store, 1).await, 1);
            put(&cache, "/b", &HeaderMap::new(), false, "b");
            assert_eq!(wait_entries(&store, 2).await, 2);
            put(&cache, "/lang", &lang("en"), true, "en");
            assert_eq!(wait_entries(&store, 3).await, 3);
            put(&cache, "/lang", &lang("de"), true, "de");
            assert_eq!(wait_entries(&store, 4).await, 4);
            // New content for stored keys replaces them where they are.
            put(&cache, "/a", &HeaderMap::new(), false, "a2");
            put(&cache, "/lang", &lang("de"), true, "de2");
            wait_durable(&store, "/a", &HeaderMap::new(), "a2").await;
            wait_durable(&store, "/lang", &lang("de"), "de2").await;
        }
        {
            // A restart (the store was closed, its writes done): memory empty, everything
            // found in the durable tier.
            let (cache, store) = cache_in(dir.path()).await;
            assert_eq!(store.stats().await.expect("stats").cache_entries, 4);
            assert_eq!(
                body_of(&cache, "/a", &HeaderMap::new()).await.as_deref(),
                Some("a2")
            );
            assert_eq!(
                body_of(&cache, "/b", &HeaderMap::new()).await.as_deref(),
                Some("b")
            );
            assert_eq!(
                body_of(&cache, "/lang", &lang("en")).await.as_deref(),
                Some("en")
            );
            assert_eq!(
                body_of(&cache, "/lang", &lang("de")).await.as_deref(),
                Some("de2")
            );
            assert_eq!(body_of(&cache, "/lang", &lang("fr")).await, None);
            assert_eq!(body_of(&cache, "/c", &HeaderMap::new()).await, None);
        }
        {
            // A variant first stored after a restart, before anything was read.
            let (cache, store) = cache_in(dir.path()).await;
            put(&cache, "/lang", &lang("fr"), true, "fr");
            assert_eq!(wait_entries(&store, 5).await, 5);
        }
        let (cache, _store) = cache_in(dir.path()).await;
        for (value, body) in [("en", "en"), ("de", "de2"), ("fr", "fr")] {
            assert_eq!(
                body_of(&cache, "/lang", &lang(value)).await.as_deref(),
                Some(body)
            );
        }
    }

    /// A put given the copy `find` found for the same request: the same content refreshes
    /// that entry in place, new content replaces it, and an answer that now varies by a header
    /// is stored under its own key (the found copy's key is used only for the same Vary names).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_put_over_a_found_copy_refreshes_replaces_or_rekeys() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cache, _store) = cache_in(dir.path()).await;
        let primary = PrimaryKey::new(&Method::GET, "h", "/p", &Identity([0; 32]));
        let none = HeaderMap::new();
        put(&cache, "/p", &none, false, "one");
        let found = cache.find(&primary, &none).await.expect("found");
        assert_eq!(
            found.key,
            CacheKey(primary.0),
            "memory keys it by its primary key"
        );
        found.entry.stored_at_ms.store(1, Ordering::Relaxed);

        put_over(&cache, "/p", &none, false, "one", Some(&found));
        let again = cache.find(&primary, &none).await.expect("found");
        assert!(
            Arc::ptr_eq(&again.entry, &found.entry),
            "refreshed in place"
        );
        assert!(found.entry.stored_at_ms.load(Ordering::Relaxed) > 1);

        put_over(&cache, "/p", &none, false, "two", Some(&found));
        assert_eq!(body_of(&cache, "/p", &none).await.as_deref(), Some("two"));

        // The answer now varies by Accept-Language: stored under the "en" key, not the
        // found copy's (which has no Vary), so a "de" request does not get it.
        let found = cache.find(&primary, &lang("en")).await.expect("found");
        put_over(&cache, "/p", &lang("en"), true, "en", Some(&found));
        assert!(
            cache.memory.get(&CacheKey(primary.0)).is_none(),
            "the copy from before the answers varied no longer answers from memory"
        );
        assert_eq!(
            body_of(&cache, "/p", &lang("en")).await.as_deref(),
            Some("en")
        );
        assert_ne!(
            body_of(&cache, "/p", &lang("de")).await.as_deref(),
            Some("en")
        );
    }

    /// Answers that vary, stop varying, and vary again with the same content, each step
    /// right after the last (within the durable tier's refresh interval): every language gets
    /// its own copy again, from memory and after a restart, and an unknown one none (the copy
    /// from when the answers did not vary answers neither).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_that_vary_again_are_not_hidden_by_the_copy_from_between() {
        let dir = tempfile::tempdir().expect("temp dir");
        let primary = PrimaryKey::new(&Method::GET, "h", "/v", &Identity([0; 32]));
        // As the proxy does: the copy found for the request, then the upstream's answer.
        let fetch = |cache: Arc<Cache>, language: &'static str, vary: bool, body: &'static str| async move {
            let found = cache.find(&primary, &lang(language)).await;
            put_over(&cache, "/v", &lang(language), vary, body, found.as_ref());
        };
        let store = {
            let (cache, store) = cache_in(dir.path()).await;
            fetch(cache.clone(), "en", true, "en").await;
            fetch(cache.clone(), "de", true, "de").await;
            fetch(cache.clone(), "en", false, "plain").await;
            wait_durable(&store, "/v", &lang("fr"), "plain").await;
            fetch(cache.clone(), "en", true, "en").await;
            fetch(cache.clone(), "de", true, "de").await;
            for (language, body) in [("en", Some("en")), ("de", Some("de")), ("fr", None)] {
                assert_eq!(
                    body_of(&cache, "/v", &lang(language)).await.as_deref(),
                    body,
                    "{language} from memory"
                );
            }
            wait_durable(&store, "/v", &lang("en"), "en").await;
            store
        };
        drop(store);
        let (cache, _store) = cache_in(dir.path()).await;
        for (language, body) in [("en", Some("en")), ("de", Some("de")), ("fr", None)] {
            assert_eq!(
                body_of(&cache, "/v", &lang(language)).await.as_deref(),
                body,
                "{language} after a restart"
            );
        }
    }

    /// A durable slot older than what this process stored since (the write of a varying answer
    /// still on its way, or failed) does not answer a read, nor come back into memory.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slot_behind_what_this_process_stored_does_not_answer() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cache, store) = cache_in(dir.path()).await;
        let primary = PrimaryKey::new(&Method::GET, "h", "/s", &Identity([0; 32]));
        put(&cache, "/s", &lang("en"), false, "plain");
        wait_durable(&store, "/s", &lang("fr"), "plain").await;
        // What storing an answer that varies leaves in memory before its write lands.
        cache.memory.invalidate(&CacheKey(primary.0));
        cache.primaries.insert(
            primary,
            Arc::new(Primary {
                vary: vec!["accept-language".to_string()],
                slot: None,
            }),
        );
        assert_eq!(body_of(&cache, "/s", &lang("fr")).await, None);
        assert!(cache.memory.get(&CacheKey(primary.0)).is_none());
    }

    /// Entries stored by earlier releases (Vary names in an index blob) are still found.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn entries_of_earlier_releases_are_still_found() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cache, store) = cache_in(dir.path()).await;
        let primary = PrimaryKey::new(&Method::GET, "h", "/old", &Identity([0; 32]));
        let names = vec!["accept-language".to_string()];
        let key = primary.with_vary(&names, &lang("en"));
        let entry = CachedResponse {
            status: 200,
            headers: Vec::new(),
            body: Bytes::from_static(b"old"),
            stored_at_ms: AtomicU64::new(now_ms()),
            initial_age_s: 0,
            fresh_until_ms: AtomicU64::new(now_ms() + 60_000),
            vary: names.clone(),
            persisted_at_ms: AtomicU64::new(0),
            prepared: Default::default(),
        };
        let ttl = Duration::from_secs(60);
        let index = postcard::to_stdvec(&names).expect("encode");
        let blob = postcard::to_stdvec(&entry).expect("encode");
        store
            .cache_put(&legacy_vary_key(&primary), Bytes::from(index), ttl)
            .await
            .expect("put");
        store
            .cache_put(&durable_entry_key(&key), Bytes::from(blob), ttl)
            .await
            .expect("put");
        wait_entries(&store, 2).await;
        assert_eq!(
            body_of(&cache, "/old", &lang("en")).await.as_deref(),
            Some("old")
        );
        assert_eq!(body_of(&cache, "/old", &lang("de")).await, None);
    }

    #[test]
    fn huge_lifetimes_saturate_instead_of_overflowing() {
        for v in [
            "max-age=18446744073709551615",
            "max-age=18446744073709551616",
            "max-age=99999999999999999999999999",
            "s-maxage=18446744073709551615, max-age=1",
        ] {
            let mut h = HeaderMap::new();
            h.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_str(v).expect("value"),
            );
            h.insert(
                header::AGE,
                HeaderValue::from_static("18446744073709551615"),
            );
            let terms = storable(
                &HeaderMap::new(),
                StatusCode::OK,
                &h,
                Audience::Everyone,
                Duration::ZERO,
            )
            .expect("storable");
            assert!(
                terms.fresh_for <= Duration::from_secs(DELTA_SECONDS_MAX),
                "{v}"
            );
            assert_eq!(terms.initial_age_s, DELTA_SECONDS_MAX);
        }
        assert_eq!(delta_seconds("12"), Some(12));
        assert_eq!(delta_seconds("-1"), None);
        assert_eq!(delta_seconds("1e3"), None);
    }

    fn check(
        request: &HeaderMap,
        r: &Response<()>,
        public: bool,
        ttl: Duration,
    ) -> Option<Storable> {
        let audience = if public {
            Audience::Everyone
        } else {
            Audience::Caller
        };
        storable(request, r.status(), r.headers(), audience, ttl)
    }

    fn resp(headers: &[(&str, &str)]) -> Response<()> {
        let mut r = Response::new(());
        for (n, v) in headers {
            r.headers_mut().append(
                HeaderName::from_bytes(n.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        r
    }

    #[test]
    fn no_store_is_never_stored() {
        let req = HeaderMap::new();
        assert!(
            check(
                &req,
                &resp(&[("cache-control", "no-store")]),
                false,
                Duration::ZERO
            )
            .is_none()
        );
        let mut req_ns = HeaderMap::new();
        req_ns.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        assert!(check(&req_ns, &resp(&[]), false, Duration::ZERO).is_none());
    }

    #[test]
    fn private_is_stored_only_per_identity() {
        let req = HeaderMap::new();
        let r = resp(&[("cache-control", "private, max-age=60")]);
        assert!(check(&req, &r, true, Duration::ZERO).is_none());
        let terms = check(&req, &r, false, Duration::ZERO).expect("per identity");
        assert_eq!(terms.fresh_for, Duration::from_secs(60));
        // A caller without identity headers shares the anonymous copy: not stored for them.
        assert!(
            storable(
                &req,
                r.status(),
                r.headers(),
                Audience::Anonymous,
                Duration::ZERO
            )
            .is_none()
        );
        let mut authorized = HeaderMap::new();
        authorized.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer a"));
        for (headers, public, audience) in [
            (&req, false, Audience::Anonymous),
            (&authorized, false, Audience::Caller),
            (&authorized, true, Audience::Everyone),
        ] {
            assert_eq!(Audience::of(public, &Identity::of(headers)), audience);
        }
        // Answers that set cookies are stored for the anonymous caller (without the cookie).
        let cookie = resp(&[("set-cookie", "lb=1"), ("cache-control", "max-age=60")]);
        assert!(
            storable(
                &req,
                cookie.status(),
                cookie.headers(),
                Audience::Anonymous,
                Duration::ZERO
            )
            .is_some()
        );
    }

    #[test]
    fn vary_star_and_uncacheable_status_are_not_stored() {
        let req = HeaderMap::new();
        assert!(check(&req, &resp(&[("vary", "*")]), false, Duration::ZERO).is_none());
        let mut r = resp(&[]);
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        assert!(check(&req, &r, false, Duration::ZERO).is_none());
    }

    #[test]
    fn key_separates_identities_and_vary_values() {
        let mut alice = HeaderMap::new();
        alice.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer alice"),
        );
        let mut bob = HeaderMap::new();
        bob.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer bob"),
        );
        let ka = PrimaryKey::new(&Method::GET, "h", "/x", &Identity::of(&alice));
        let kb = PrimaryKey::new(&Method::GET, "h", "/x", &Identity::of(&bob));
        assert_ne!(ka, kb);
        assert_eq!(
            ka,
            PrimaryKey::new(&Method::HEAD, "h", "/x", &Identity::of(&alice))
        );
        assert_ne!(
            ka,
            PrimaryKey::new(&Method::GET, "evil.example", "/x", &Identity::of(&alice))
        );
        let mut en = HeaderMap::new();
        en.insert(header::ACCEPT_LANGUAGE, HeaderValue::from_static("en"));
        let mut de = HeaderMap::new();
        de.insert(header::ACCEPT_LANGUAGE, HeaderValue::from_static("de"));
        let vary = vec!["accept-language".to_string()];
        assert_ne!(ka.with_vary(&vary, &en), ka.with_vary(&vary, &de));
        assert_eq!(ka.with_vary(&[], &en), ka.with_vary(&[], &de));
    }

    #[test]
    fn cache_control_is_parsed_case_insensitively_with_values() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("Public, MAX-AGE=\"60\", s-maxage=5, No-Cache"),
        );
        let cc = CacheControl::of(&h);
        assert_eq!((cc.max_age, cc.s_maxage), (Some(60), Some(5)));
        assert!(cc.no_cache && !cc.no_store && !cc.private);
    }

    #[test]
    fn same_content_ignores_date_but_not_other_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            header::DATE,
            HeaderValue::from_static("Mon, 23 Nov 2026 10:00:00 GMT"),
        );
        let entry = CachedResponse {
            status: 200,
            headers: h
                .iter()
                .map(|(n, v)| (n.as_str().to_string(), Bytes::copy_from_slice(v.as_bytes())))
                .collect(),
            body: Bytes::from_static(b"{}"),
            stored_at_ms: AtomicU64::new(0),
            initial_age_s: 0,
            fresh_until_ms: AtomicU64::new(0),
            vary: Vec::new(),
            persisted_at_ms: AtomicU64::new(0),
            prepared: Default::default(),
        };
        let mut later = h.clone();
        later.insert(
            header::DATE,
            HeaderValue::from_static("Mon, 23 Nov 2026 10:00:09 GMT"),
        );
        assert!(entry.same_content(200, &later, b"{}"));
        assert!(!entry.same_content(200, &later, b"{ }"));
        assert!(!entry.same_content(201, &later, b"{}"));
        later.insert(header::ETAG, HeaderValue::from_static("\"v2\""));
        assert!(!entry.same_content(200, &later, b"{}"));
    }
}
