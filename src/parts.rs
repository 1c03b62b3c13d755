//! The parts outpost is built from, made once in `app` and handed to each component, which
//! keeps what it needs (instead of one component reaching into another's fields).

use std::sync::Arc;

use http::HeaderName;

use crate::activity::Activity;
use crate::config::Config;
use crate::credentials::Credentials;
use crate::events::Events;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::mutations::MutationDocs;
use crate::route::RouteTable;
use crate::store::Store;
use crate::upstream::Upstream;

/// Everything the proxy, the outbox, the replayer and the admin API are built from.
#[derive(Clone)]
pub struct Parts {
    /// The configuration.
    pub config: Arc<Config>,
    /// The compiled routes.
    pub routes: Arc<RouteTable>,
    /// The storage backend.
    pub store: Arc<dyn Store>,
    /// The upstream client.
    pub upstream: Upstream,
    /// The upstream's reachability.
    pub health: Arc<Health>,
    /// The event stream.
    pub events: Events,
    /// Fresh credentials for mutations waiting after a 401.
    pub credentials: Arc<Credentials>,
    /// Queued wake-ups and keys in flight.
    pub activity: Arc<Activity>,
    /// Mutation status documents.
    pub docs: Arc<MutationDocs>,
    /// Prometheus metrics (handles registered per route).
    pub metrics: Arc<Metrics>,
    /// The HAR recorder, when `proxy.record_har` is set (set by `app` after start).
    pub recorder: Option<Arc<crate::record::Recorder>>,
}

impl Parts {
    /// Assemble the parts around a store, an upstream client and an event stream.
    pub fn new(
        config: Arc<Config>,
        routes: Arc<RouteTable>,
        store: Arc<dyn Store>,
        upstream: Upstream,
        events: Events,
    ) -> Self {
        let health = Arc::new(Health::new(events.clone(), &config.upstream));
        let credentials = Arc::new(Credentials::new(&config.replay.auth_principal));
        let activity = Arc::new(Activity::default());
        let identity_headers = config
            .cache
            .identity_headers
            .iter()
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect();
        let docs = Arc::new(MutationDocs::new(
            store.clone(),
            activity.clone(),
            &config.proxy.reserved_prefix,
            identity_headers,
        ));
        let metrics = Arc::new(Metrics::new(routes.names()));
        Self {
            config,
            routes,
            store,
            upstream,
            health,
            events,
            credentials,
            activity,
            docs,
            metrics,
            recorder: None,
        }
    }
}
