//! Wires the parts together and runs them until shutdown.
//!
//! [`App::start`] opens the store, builds the upstream client, health, cache, outbox, replayer
//! and proxy, binds the listeners, and spawns the tasks (proxy server, admin server, probe,
//! replayer, event log). [`App::wait`] returns when they have all stopped after the shutdown
//! signal, with the store flushed. Tests start and stop the whole app in-process this way.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::JoinSet;

use crate::admin::{self, Access, AdminState};
use crate::cache::Cache;
use crate::config::{Backend, Config};
use crate::events::{Event, Events};
use crate::outbox::Outbox;
use crate::parts::Parts;
use crate::proxy::Proxy;
use crate::record::Recorder;
use crate::replay::Replayer;
use crate::route::RouteTable;
use crate::server::{self, Connections};
use crate::shutdown::Shutdown;
use crate::store::Store;
use crate::store::embedded::EmbeddedStore;
use crate::store::redis::RedisStore;
use crate::upstream::Upstream;

/// Why outpost could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid (exit code 2).
    #[error("config: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// The store could not be opened or reached.
    #[error("store")]
    Store(#[from] crate::error::StoreError),
    /// A listener could not be bound.
    #[error("cannot listen")]
    Bind(#[from] std::io::Error),
    /// The upstream client could not be set up.
    #[error("upstream client")]
    Upstream(#[from] crate::upstream::SetupError),
    /// The proxy listener's TLS could not be set up.
    #[error("proxy listener")]
    Tls(#[from] server::TlsError),
    /// The HAR recording could not be started.
    #[error("recording")]
    Record(#[from] crate::record::RecordError),
    /// `outpost demo` failed.
    #[error("demo")]
    Demo(#[source] crate::demo::DemoError),
}

/// A running outpost.
pub struct App {
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    events: Events,
    shutdown: Shutdown,
    tasks: JoinSet<()>,
    proxy_threads: Vec<std::thread::JoinHandle<()>>,
    embedded: Option<Arc<EmbeddedStore>>,
}

impl App {
    /// Start everything; listeners are bound when this returns.
    pub async fn start(config: Config, shutdown: Shutdown) -> Result<App, StartError> {
        let config = Arc::new(config);
        let routes = Arc::new(RouteTable::new(&config).map_err(StartError::Config)?);
        let events = Events::with_capacity(config.admin.events_buffer);
        let (store, embedded): (Arc<dyn Store>, Option<Arc<EmbeddedStore>>) =
            match config.store.backend {
                Backend::Embedded => {
                    let s = Arc::new(EmbeddedStore::open_with_page_cache(
                        &config.store.data_dir,
                        config.cache.disk_bytes,
                        config.store.page_cache_bytes,
                        config.replay.progress_sync,
                    )?);
                    (s.clone(), Some(s))
                }
                Backend::Redis => (
                    Arc::new(RedisStore::connect(&config.store, config.cache.disk_bytes).await?),
                    None,
                ),
            };
        let upstream = Upstream::new(&config.upstream)?;
        let tls = server::tls_acceptor(&config.proxy)?;
        let mut parts = Parts::new(
            config.clone(),
            routes.clone(),
            store.clone(),
            upstream.clone(),
            events.clone(),
        );
        let mut recording = None;
        if let Some(path) = &config.proxy.record_har {
            let (recorder, writer) = Recorder::start(
                path,
                config.proxy.record_max_body_bytes,
                &config.proxy.record_redact_headers,
                shutdown.clone(),
                config.proxy.shutdown_grace,
            )?;
            parts.recorder = Some(recorder);
            recording = Some(writer);
        }
        let health = parts.health.clone();
        let cache = Arc::new(Cache::new(&config.cache, store.clone()));
        let outbox = Arc::new(Outbox::new(&parts, cache.clone()));
        let replayer = Arc::new(Replayer::new(&parts, shutdown.clone()));
        let workers = match config.proxy.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let proxy_listeners = server::bind_shards(config.proxy.listen, workers)?;
        let admin_listener = server::bind(config.admin.listen).await?;
        let proxy_addr = proxy_listeners
            .first()
            .ok_or_else(|| std::io::Error::other("no proxy listener was bound"))?
            .local_addr()?;
        let admin_addr = admin_listener.local_addr()?;
        let proxy_connections = Connections::new(
            "proxy",
            server::limits::fit_to_open_files(
                config.proxy.max_connections,
                config.admin.max_connections,
            ),
        );
        let admin_connections = Connections::new("admin", config.admin.max_connections);
        // One proxy (and upstream pool) per proxy thread.
        let proxy_threads = server::spawn_shards(
            proxy_listeners,
            tls,
            || {
                Arc::new(
                    Proxy::new(
                        &parts,
                        upstream.with_own_pool(),
                        cache.clone(),
                        outbox.clone(),
                    )
                    .with_shutdown(shutdown.clone()),
                )
            },
            &proxy_connections,
            &config.proxy,
            &shutdown,
        )?;

        let mut tasks = JoinSet::new();
        if !config.warm.is_empty() {
            let proxy = Arc::new(
                Proxy::new(
                    &parts,
                    upstream.with_own_pool(),
                    cache.clone(),
                    outbox.clone(),
                )
                .with_shutdown(shutdown.clone()),
            );
            for entry in &config.warm {
                tasks.spawn(crate::warm::run(
                    entry.clone(),
                    proxy.clone(),
                    health.clone(),
                    proxy_addr,
                    shutdown.clone(),
                ));
            }
        }
        if let Some(writer) = recording {
            tasks.spawn(writer);
        }
        events.observe(log_event);
        tasks.spawn(parts.metrics.clone().run(events.clone(), shutdown.clone()));
        tasks.spawn(admin::serve(
            admin_listener,
            AdminState {
                store: store.clone(),
                health: health.clone(),
                cache,
                replayer: replayer.clone(),
                docs: parts.docs.clone(),
                activity: parts.activity.clone(),
                events: events.clone(),
                access: Access::new(
                    admin_addr,
                    &config.admin.allowed_hosts,
                    config.admin.token.as_deref(),
                ),
                proxy_connections,
                admin_connections,
                metrics: parts.metrics.clone(),
                recorder: parts.recorder.clone(),
                events_heartbeat: config.admin.events_heartbeat,
                max_body_bytes: config.queue.max_body_bytes.saturating_mul(2) + 64 * 1024,
                shutdown: shutdown.clone(),
            },
            config.proxy.header_read_timeout,
            shutdown.clone(),
        ));
        tasks.spawn(
            health
                .clone()
                .run_probe(upstream, config.upstream.clone(), shutdown.clone()),
        );
        tasks.spawn(replayer.run());
        for route in &config.routes {
            if let Some(limit) = route.write_timeout
                && limit >= config.upstream.request_timeout
            {
                tracing::warn!(
                    route = route.name.as_deref().unwrap_or(&route.path),
                    "route write_timeout ({limit:?}) is not below upstream.request_timeout \
                     ({:?}): a slow forward times out before its 202 and is queued and \
                     retried like any ambiguous failure, not settled in the background",
                    config.upstream.request_timeout
                );
            }
        }
        tracing::info!(
            proxy = %proxy_addr,
            admin = %admin_addr,
            upstream = %config.upstream.url,
            backend = %config.store.backend,
            "outpost started"
        );
        Ok(App {
            proxy_addr,
            admin_addr,
            events,
            shutdown,
            tasks,
            proxy_threads,
            embedded,
        })
    }

    /// Where the proxy listens.
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    /// Where the admin API listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The event stream.
    pub fn events(&self) -> &Events {
        &self.events
    }

    /// Trigger shutdown.
    pub fn shutdown(&self) {
        self.shutdown.trigger();
    }

    /// Wait until every task has stopped (after shutdown), then flush the store.
    pub async fn wait(mut self) {
        while let Some(res) = self.tasks.join_next().await {
            if let Err(e) = res
                && e.is_panic()
            {
                tracing::error!("a task panicked: {e}");
                self.shutdown.trigger();
            }
        }
        let threads = std::mem::take(&mut self.proxy_threads);
        let joined =
            tokio::task::spawn_blocking(move || threads.into_iter().all(|t| t.join().is_ok()))
                .await;
        if !matches!(joined, Ok(true)) {
            tracing::error!("a proxy thread panicked");
        }
        if let Some(store) = self.embedded.take() {
            // The writer thread joins here: its last commit is durable.
            tokio::task::spawn_blocking(move || store.close())
                .await
                .ok();
        }
        tracing::info!("outpost stopped");
    }
}

/// Log what happens, at a level that fits (the admin API subscribes separately).
/// An observer of the event stream: the line is written on the emitting thread, so that an
/// event wakes no logging task (see [`Events::observe`]). Logged under this module's target, as
/// when a task of its own logged them.
fn log_event(event: &Event) {
    // One line per happening: what the emitter already logs (with more detail) is not
    // logged again here.
    match event {
        Event::Queued { key, partition } => {
            tracing::info!(key = %key, partition = %partition, "queued")
        }
        // `status` is absent when no answer came (a transport failure).
        Event::Classified { key, class, status } => {
            tracing::info!(key = %key, class = %class, status, "replayed")
        }
        Event::AuthRequired { key, principal } => {
            tracing::info!(key = %key, principal = %principal, "waiting for fresh credentials")
        }
        Event::Coalesced { key, into } => {
            tracing::info!(key = %key, into = %into, "coalesced into a newer write")
        }
        Event::Paused => tracing::info!("replay paused by an operator"),
        Event::Resumed => tracing::info!("replay resumed by an operator"),
        Event::Operator {
            key,
            action,
            new_key,
        } => tracing::info!(
            key = %key,
            action = %action,
            new_key = new_key.as_deref().unwrap_or(""),
            "operator action"
        ),
        // Health logs online/offline; replay logs dead letters (with the outcome) and
        // expiries itself.
        Event::ReplayAttempt { .. }
        | Event::Online
        | Event::Offline { .. }
        | Event::DeadLettered { .. }
        | Event::Conflict { .. }
        | Event::Expired { .. } => {}
    }
}
