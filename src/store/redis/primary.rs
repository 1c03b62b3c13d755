//! The connection to the Redis primary: either the fixed `store.redis_url`, or the primary that
//! Redis Sentinel names (`store.redis_sentinels`, `store.redis_sentinel_master`), re-resolved
//! after a failover.
//!
//! [`Conn`] wraps a [`ConnectionManager`] and implements [`ConnectionLike`], so every command and
//! script of the store runs on it unchanged. With Sentinels, a command that fails with a
//! connection error, a timeout or `READONLY` (the old primary came back as a replica) makes the
//! connection ask the Sentinels for the current primary (`SENTINEL get-master-addr-by-name`);
//! when it moved, a new manager to it replaces the old one. The failed command is *not* retried:
//! it may have been applied before the connection broke, so the caller sees the error (an
//! enqueue answers 503, replay pauses and backs off) and the next call goes to the new primary.
//! At most one re-resolution runs at a time per connection, and at most one per
//! [`RESOLVE_EVERY`].

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{
    Cmd, ErrorKind, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, RedisResult, Value,
};

use super::answers::redis_error;
use super::cluster::ClusterConn;
use super::{CALL_DEADLINE, COMMAND_TIMEOUT};
use crate::store::StoreError;

/// Minimum time between two questions to the Sentinels from one connection.
const RESOLVE_EVERY: Duration = Duration::from_millis(200);

/// Where the primary is: a fixed address, or what the Sentinels say.
pub(super) struct Sentinels {
    /// `host:port` of each Sentinel.
    pub addrs: Vec<String>,
    /// The monitored master's name.
    pub master: String,
    /// `AUTH` for the Sentinels (`store.redis_sentinel_username`, `store.redis_sentinel_password`);
    /// not for the data nodes.
    pub username: Option<String>,
    /// See `username`.
    pub password: Option<String>,
}

impl std::fmt::Debug for Sentinels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sentinels")
            .field("addrs", &self.addrs)
            .field("master", &self.master)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Sentinels {
    /// Ask the Sentinels, one after the other, for the current primary's `host:port`.
    pub async fn primary(&self) -> Result<String, StoreError> {
        let mut last = String::from("no sentinel configured");
        for addr in &self.addrs {
            match tokio::time::timeout(COMMAND_TIMEOUT, self.ask(addr)).await {
                Ok(Ok(Some(primary))) => return Ok(primary),
                Ok(Ok(None)) => last = format!("{addr}: does not know master {:?}", self.master),
                Ok(Err(e)) => last = format!("{addr}: {e}"),
                Err(_) => last = format!("{addr}: no answer within {COMMAND_TIMEOUT:?}"),
            }
        }
        Err(redis_error(
            ErrorKind::MasterNameNotFoundBySentinel,
            "no sentinel named the primary",
            last,
        ))
    }

    async fn ask(&self, addr: &str) -> RedisResult<Option<String>> {
        let mut info = format!("redis://{addr}/").into_connection_info()?;
        let mut settings = info.redis_settings().clone();
        if let Some(username) = &self.username {
            settings = settings.set_username(username);
        }
        if let Some(password) = &self.password {
            settings = settings.set_password(password);
        }
        info = info.set_redis_settings(settings);
        let client = redis::Client::open(info)?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let answer: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master)
            .query_async(&mut conn)
            .await?;
        Ok(answer.map(|(host, port)| {
            if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            }
        }))
    }
}

/// The servers in use and the failovers this process saw (for `/status`, `/readyz`).
#[derive(Debug, Clone, Default)]
pub struct FailoverInfo {
    /// The primary in use (`host:port`, or the URL's address); empty with a cluster.
    pub primary: String,
    /// With a cluster: each primary (`host:port`) and how many healthy replicas it has.
    pub cluster_primaries: Vec<(String, usize)>,
    /// Failovers followed since start.
    pub failovers: u64,
    /// When the last one was followed (ms since the Unix epoch), if any.
    pub last_failover_ms: Option<u64>,
}

impl FailoverInfo {
    /// Count a failover now.
    pub(super) fn failover_seen(&mut self) {
        self.failovers += 1;
        self.last_failover_ms = Some(crate::store::now_ms());
    }
}

/// A connection to Redis: to the one primary, or to a Redis Cluster (cheap to clone; clones
/// share the connection). Every command and script of the store runs on it unchanged.
#[derive(Clone)]
pub(super) enum Conn {
    /// The fixed primary of `store.redis_url`, or the one the Sentinels name.
    Primary(PrimaryConn),
    /// The nodes of `store.redis_cluster_nodes` ([`super::cluster`]).
    Cluster(ClusterConn),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Primary(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Primary(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Primary(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// A connection to the current primary (cheap to clone; clones share the connection).
#[derive(Clone)]
pub(super) struct PrimaryConn {
    inner: Arc<Inner>,
}

struct Inner {
    current: RwLock<(String, ConnectionManager)>,
    config: ConnectionManagerConfig,
    sentinels: Option<Arc<Sentinels>>,
    /// Last re-resolution; held while one runs.
    resolving: tokio::sync::Mutex<Option<Instant>>,
    /// What `/status` shows; shared by the store's connections.
    info: Arc<Mutex<FailoverInfo>>,
}

impl PrimaryConn {
    /// Connect to `addr` (`url` is its `redis://` URL), following failovers when `sentinels` is
    /// given.
    pub async fn open(
        url: &str,
        addr: String,
        config: ConnectionManagerConfig,
        sentinels: Option<Arc<Sentinels>>,
        info: Arc<Mutex<FailoverInfo>>,
    ) -> Result<PrimaryConn, StoreError> {
        let manager = open_manager(url, &addr, config.clone()).await?;
        if let Ok(mut info) = info.lock() {
            info.primary = addr.clone();
        }
        Ok(PrimaryConn {
            inner: Arc::new(Inner {
                current: RwLock::new((addr, manager)),
                config,
                sentinels,
                resolving: tokio::sync::Mutex::new(None),
                info,
            }),
        })
    }

    /// The address of the primary this connection uses.
    pub fn addr(&self) -> String {
        match self.inner.current.read() {
            Ok(current) => current.0.clone(),
            Err(poisoned) => poisoned.into_inner().0.clone(),
        }
    }

    fn manager(&self) -> ConnectionManager {
        match self.inner.current.read() {
            Ok(current) => current.1.clone(),
            Err(poisoned) => poisoned.into_inner().1.clone(),
        }
    }

    /// The manager to use now: when another connection of this store already followed a
    /// failover, this one moves to the same primary first (so it does not fail a call on the
    /// old primary before noticing).
    async fn current(&self) -> ConnectionManager {
        if self.inner.sentinels.is_some() {
            let shared = match self.inner.info.lock() {
                Ok(info) => info.primary.clone(),
                Err(poisoned) => poisoned.into_inner().primary.clone(),
            };
            if !shared.is_empty() && shared != self.addr() {
                if let Ok(_guard) = self.inner.resolving.try_lock() {
                    if shared != self.addr() {
                        self.switch_to(shared).await;
                    }
                }
            }
        }
        self.manager()
    }

    /// After `error`, ask the Sentinels whether the primary moved, and follow it.
    async fn after_error(&self, error: &RedisError) {
        let Some(sentinels) = &self.inner.sentinels else {
            return;
        };
        if !needs_resolve(error) {
            return;
        }
        // Someone else is asking already: their answer serves this call too.
        let Ok(mut last) = self.inner.resolving.try_lock() else {
            return;
        };
        if last.is_some_and(|at| at.elapsed() < RESOLVE_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        let primary = match sentinels.primary().await {
            Ok(primary) => primary,
            Err(e) => {
                tracing::warn!(error = %e, "redis failover: cannot resolve the primary");
                return;
            }
        };
        if primary == self.addr() {
            return;
        }
        self.switch_to(primary).await;
    }

    /// Replace the manager by one to `primary` (the caller holds `resolving`).
    async fn switch_to(&self, primary: String) {
        let old = self.addr();
        let url = format!("redis://{primary}/");
        match open_manager(&url, &primary, self.inner.config.clone()).await {
            Ok(manager) => {
                if let Ok(mut current) = self.inner.current.write() {
                    *current = (primary.clone(), manager);
                }
                if let Ok(mut info) = self.inner.info.lock() {
                    if info.primary != primary {
                        info.primary = primary.clone();
                        info.failover_seen();
                    }
                }
                tracing::warn!(
                    from = %old,
                    to = %primary,
                    "redis failover: following the new primary"
                );
            }
            Err(e) => {
                tracing::warn!(primary = %primary, error = %e, "redis failover: cannot connect")
            }
        }
    }
}

/// Errors after which the primary may have moved.
fn needs_resolve(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || matches!(
            error.kind(),
            ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        )
        || error.to_string().contains("READONLY")
}

impl ConnectionLike for PrimaryConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let mut manager = self.current().await;
            let result = manager.req_packed_command(cmd).await;
            if let Err(e) = &result {
                self.after_error(e).await;
            }
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let mut manager = self.current().await;
            let result = manager.req_packed_commands(cmd, offset, count).await;
            match &result {
                Err(e) => self.after_error(e).await,
                Ok(values) => {
                    let readonly = values.iter().find_map(|v| match v {
                        Value::ServerError(e) if e.code() == "READONLY" => {
                            Some(RedisError::from(e.clone()))
                        }
                        _ => None,
                    });
                    if let Some(e) = readonly {
                        self.after_error(&e).await;
                    }
                }
            }
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.manager().get_db()
    }
}

/// A connection manager to `addr`, or an error naming it, within [`CALL_DEADLINE`].
async fn open_manager(
    url: &str,
    addr: &str,
    config: ConnectionManagerConfig,
) -> Result<ConnectionManager, StoreError> {
    let client = redis::Client::open(url)?;
    match tokio::time::timeout(
        CALL_DEADLINE,
        ConnectionManager::new_with_config(client, config),
    )
    .await
    {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(redis_error(
            e.kind(),
            "cannot connect to redis",
            format!("{addr}: {e}"),
        )),
        Err(_) => Err(redis_error(
            ErrorKind::Io,
            "cannot connect to redis",
            format!("{addr}: no answer within {CALL_DEADLINE:?}"),
        )),
    }
}
