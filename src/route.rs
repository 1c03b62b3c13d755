//! Routes: `[[route]]` entries compiled once, matched in order by method and path.
//!
//! A request resolves to one [`Route`] (the first match, or the defaults), which carries every
//! per-route decision the data path needs: read strategy, write mode, partitioning, cache
//! lifetimes, the headers that identify a caller, and classification rules.

use std::sync::Arc;
use std::time::Duration;

use globset::{GlobBuilder, GlobMatcher};
use http::{HeaderName, Method};

use crate::config::{
    ClassifyConfig, Config, DEFAULT_ROUTE_NAME, PartitionBy, ReadStrategy, RouteConfig, WriteMode,
};

/// How a route's `path` is matched.
#[derive(Debug, Clone)]
pub enum PathMatcher {
    /// Matches every path.
    Any,
    /// Matches paths starting with this prefix.
    Prefix(String),
    /// Matches paths by glob (`*` within a segment, `**` across segments).
    Glob(GlobMatcher),
}

impl PathMatcher {
    /// Compile a route path: empty → any, with glob metacharacters → glob, else prefix.
    pub fn new(path: &str) -> Result<Self, String> {
        if path.is_empty() {
            return Ok(PathMatcher::Any);
        }
        if path.contains(['*', '?', '[', '{']) {
            let glob = GlobBuilder::new(path)
                .literal_separator(true)
                .build()
                .map_err(|e| e.to_string())?;
            return Ok(PathMatcher::Glob(glob.compile_matcher()));
        }
        Ok(PathMatcher::Prefix(path.to_string()))
    }

    /// Whether `path` matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatcher::Any => true,
            PathMatcher::Prefix(p) => path.starts_with(p.as_str()),
            PathMatcher::Glob(g) => g.is_match(path),
        }
    }
}

/// One compiled route: everything the data path decides per route.
#[derive(Debug)]
pub struct Route {
    /// Name for logs and for queued mutations: the configured one, one derived from what the
    /// route matches ([`RouteConfig::effective_name`]), or `default`.
    pub name: String,
    /// Whether the name was configured (not derived).
    named: bool,
    methods: Vec<Method>,
    path: PathMatcher,
    /// Read strategy for GET/HEAD.
    pub read: ReadStrategy,
    /// Write mode for mutations.
    pub write: WriteMode,
    /// Cache without the caller's identity.
    pub public: bool,
    /// Ordering partition of queued mutations.
    pub partition: PartitionBy,
    /// Freshness lifetime when the upstream gives none.
    pub cache_ttl: Duration,
    /// How long a stale copy may be served offline.
    pub max_stale: Duration,
    /// Classification rules for replayed answers.
    pub classify: ClassifyConfig,
    /// Request headers whose values identify the caller (empty on public routes).
    pub identity_headers: Vec<HeaderName>,
}

impl Route {
    fn compile(name: String, rc: &RouteConfig, config: &Config) -> Result<Self, String> {
        let identity_headers = if rc.public {
            Vec::new()
        } else {
            rc.identity_headers
                .as_ref()
                .unwrap_or(&config.cache.identity_headers)
                .iter()
                .map(|n| HeaderName::from_bytes(n.as_bytes()).map_err(|e| format!("{n:?}: {e}")))
                .collect::<Result<_, _>>()?
        };
        Ok(Route {
            name,
            named: rc.name.is_some(),
            methods: rc
                .methods
                .iter()
                .map(|m| Method::from_bytes(m.as_bytes()).map_err(|e| e.to_string()))
                .collect::<Result<_, _>>()?,
            path: PathMatcher::new(&rc.path)?,
            read: rc.read,
            write: rc.write,
            public: rc.public,
            partition: rc.partition,
            cache_ttl: rc.cache_ttl.unwrap_or(config.cache.default_ttl),
            max_stale: rc.max_stale.unwrap_or(config.cache.max_stale),
            classify: rc
                .classify
                .clone()
                .unwrap_or_else(|| config.replay.classify.clone()),
            identity_headers,
        })
    }

    fn matches(&self, method: &Method, path: &str) -> bool {
        (self.methods.is_empty() || self.methods.contains(method)) && self.path.matches(path)
    }
}

/// All routes in match order, plus the default route for requests no entry matches.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
    default: Arc<Route>,
}

impl RouteTable {
    /// Compile the `[[route]]` entries of a (validated) config.
    pub fn new(config: &Config) -> Result<Self, String> {
        let routes = config
            .routes
            .iter()
            .map(|rc| Route::compile(rc.effective_name(), rc, config).map(Arc::new))
            .collect::<Result<_, _>>()?;
        let default = Arc::new(Route::compile(
            DEFAULT_ROUTE_NAME.into(),
            &RouteConfig::default(),
            config,
        )?);
        Ok(RouteTable { routes, default })
    }

    /// The route named `name` (as recorded on a queued mutation), else the default route.
    pub fn by_name(&self, name: &str) -> Arc<Route> {
        if let Some(route) = self.routes.iter().find(|r| r.name == name) {
            return route.clone();
        }
        // Mutations queued by earlier releases name an unnamed route by its position.
        if let Some(route) = name
            .strip_prefix("route[")
            .and_then(|rest| rest.strip_suffix(']'))
            .and_then(|i| i.parse::<usize>().ok())
            .and_then(|i| self.routes.get(i))
            .filter(|r| !r.named)
        {
            return route.clone();
        }
        self.default.clone()
    }

    /// The first route matching `method` and `path`, else the default route.
    pub fn resolve(&self, method: &Method, path: &str) -> Arc<Route> {
        self.routes
            .iter()
            .find(|r| r.matches(method, path))
            .unwrap_or(&self.default)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_matching_route_wins() {
        let config = Config::parse(
            "[[route]]\nname=\"items\"\nmethods=[\"GET\"]\npath=\"/api/*/items\"\nread=\"cache-first\"\n\
             [[route]]\nname=\"api\"\npath=\"/api/\"\nwrite=\"pass-through\"\n",
        )
        .expect("config");
        let table = RouteTable::new(&config).expect("routes");
        assert_eq!(table.resolve(&Method::GET, "/api/v1/items").name, "items");
        assert_eq!(table.resolve(&Method::POST, "/api/v1/items").name, "api");
        assert_eq!(table.resolve(&Method::GET, "/api/v1/x/items").name, "api");
        assert_eq!(table.resolve(&Method::GET, "/other").name, "default");
    }

    /// Issue #15 point 7: an unnamed route's name comes from what it matches, so a route
    /// inserted before it does not hand its rules to mutations queued under it.
    #[test]
    fn inserting_a_route_keeps_the_rules_of_queued_items() {
        let before =
            Config::parse("[[route]]\npath=\"/orders/\"\n[route.classify]\nconflict=[418]\n")
                .expect("config");
        let queued_under = RouteTable::new(&before)
            .expect("routes")
            .resolve(&Method::POST, "/orders/1")
            .name
            .clone();
        assert_eq!(queued_under, "* /orders/");
        let after = Config::parse(
            "[[route]]\npath=\"/other/\"\nwrite=\"pass-through\"\n\
             [[route]]\npath=\"/orders/\"\n[route.classify]\nconflict=[418]\n",
        )
        .expect("config");
        let table = RouteTable::new(&after).expect("routes");
        assert_eq!(table.by_name(&queued_under).classify.conflict, [418]);
        assert_eq!(
            table.resolve(&Method::GET, "/other/x").name,
            "* /other/",
            "derived from what it matches"
        );
        let named = Config::parse(
            "[[route]]\nmethods=[\"PUT\", \"GET\", \"GET\"]\npath=\"/a/\"\n\
             [[route]]\nname=\"b\"\npath=\"/b/\"\n[[route]]\nmethods=[\"GET\"]\n",
        )
        .expect("config");
        let names: Vec<_> = named.routes.iter().map(|r| r.effective_name()).collect();
        assert_eq!(names, ["GET,PUT /a/", "b", "GET *"]);
    }

    #[test]
    fn positional_names_of_earlier_releases_still_find_unnamed_routes() {
        let config = Config::parse(
            "[[route]]\nname=\"a\"\npath=\"/a/\"\n\
             [[route]]\npath=\"/b/\"\n[route.classify]\nconflict=[418]\n",
        )
        .expect("config");
        let table = RouteTable::new(&config).expect("routes");
        assert_eq!(table.by_name("route[1]").name, "* /b/");
        assert_eq!(
            table.by_name("route[0]").name,
            "default",
            "route[0] has a name"
        );
        assert_eq!(table.by_name("route[7]").name, "default");
        assert_eq!(table.by_name("gone").name, "default");
    }

    #[test]
    fn identity_headers_come_from_the_cache_section_or_the_route() {
        let config = Config::parse(
            "[cache]\nidentity_headers = [\"Authorization\", \"X-Tenant\"]\n\
             [[route]]\nname=\"own\"\npath=\"/own/\"\nidentity_headers=[\"X-Session\"]\n\
             [[route]]\nname=\"pub\"\npath=\"/pub/\"\npublic=true\nidentity_headers=[\"X-Session\"]\n",
        )
        .expect("config");
        let table = RouteTable::new(&config).expect("routes");
        let names = |path: &str| {
            table
                .resolve(&Method::GET, path)
                .identity_headers
                .iter()
                .map(|n| n.as_str().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(names("/other"), ["authorization", "x-tenant"]);
        assert_eq!(names("/own/x"), ["x-session"]);
        assert!(names("/pub/x").is_empty());
        let defaults = RouteTable::new(&Config::default()).expect("routes");
        let d: Vec<_> = defaults
            .resolve(&Method::GET, "/")
            .identity_headers
            .iter()
            .map(|n| n.as_str().to_owned())
            .collect();
        assert_eq!(d, ["authorization", "cookie", "x-api-key", "api-key"]);
    }
}
