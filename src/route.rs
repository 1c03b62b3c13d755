//! Routes: `[[route]]` entries compiled once, matched in order by method and path.
//!
//! A request resolves to one [`Route`] (the first match, or the defaults), which carries every
//! per-route decision the data path needs: read strategy, write mode, partitioning, cache
//! lifetimes, the headers that identify a caller, and classification rules.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use globset::{GlobBuilder, GlobMatcher};
use http::{HeaderName, Method};

use crate::overlay::OverlayShape;

use crate::config::{
    ClassifyConfig, Config, ConfigError, ConflictPolicy, DEFAULT_ROUTE_NAME, PartitionBy,
    ReadStrategy, RouteConfig, WriteMode, check_classify, check_header_names, check_method,
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
    /// What a replayed mutation's conflict leads to.
    pub conflict: ConflictPolicy,
    /// JSON pointer set to the acceptance time in replayed JSON bodies (empty: none).
    pub accepted_at_field: String,
    /// Fold queued writes of one URI and caller (`coalesce = true`).
    pub coalesce: bool,
    /// Add the served copy's version as a precondition to queued writes (`capture_version`).
    pub capture_version: bool,
    /// Read your own writes (`overlay = true`): the item shape pending writes are applied to.
    pub overlay: Option<OverlayShape>,
    /// Longest wait for the upstream when a cached copy could answer (`network_timeout`).
    pub network_timeout: Option<Duration>,
    /// Longest wait for a forwarded mutation before a 202 (`write_timeout`).
    pub write_timeout: Option<Duration>,
    /// GraphQL over POST: `query` operations are reads (`graphql = true`).
    pub graphql: bool,
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
            conflict: rc.conflict,
            accepted_at_field: rc.accepted_at_field.clone(),
            coalesce: rc.coalesce,
            capture_version: rc.capture_version,
            overlay: overlay_shape(rc)?,
            network_timeout: rc.network_timeout,
            write_timeout: rc.write_timeout,
            graphql: rc.graphql,
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
    /// Validate and compile the `[[route]]` entries of a config: the one place routes are
    /// checked (errors name `route[N].key`).
    pub fn new(config: &Config) -> Result<Self, ConfigError> {
        validate(config)?;
        let compile = |i: Option<usize>, name: String, rc: &RouteConfig| {
            Route::compile(name, rc, config).map(Arc::new).map_err(|e| {
                let key = i.map_or_else(|| "route".to_string(), |i| format!("route[{i}]"));
                ConfigError::key(key, e)
            })
        };
        let routes = config
            .routes
            .iter()
            .enumerate()
            .map(|(i, rc)| compile(Some(i), rc.effective_name(), rc))
            .collect::<Result<_, _>>()?;
        let default = compile(None, DEFAULT_ROUTE_NAME.into(), &RouteConfig::default())?;
        Ok(RouteTable { routes, default })
    }

    /// The names of every route and of the default route (bounded: metric labels use them).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.routes
            .iter()
            .chain(std::iter::once(&self.default))
            .map(|r| r.name.as_str())
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

/// Parse and validate a whole config text, routes included (errors carry line and key).
pub fn parse(text: &str) -> Result<(Config, RouteTable), ConfigError> {
    let config = Config::parse(text)?;
    let routes = RouteTable::new(&config).map_err(|e| e.located_in(text))?;
    Ok((config, routes))
}

/// Read, parse and validate a config file, routes included (errors name file, line, key).
pub fn load(path: &Path) -> Result<(Config, RouteTable), ConfigError> {
    let text = crate::config::read_file(path)?;
    parse(&text).map_err(|e| e.in_file(path))
}

/// What the types of `[[route]]` entries cannot say: methods, paths, names, headers, rules.
fn validate(config: &Config) -> Result<(), ConfigError> {
    let mut names: Vec<String> = Vec::with_capacity(config.routes.len());
    for (i, route) in config.routes.iter().enumerate() {
        let at = |key: &str| format!("route[{i}].{key}");
        for m in &route.methods {
            check_method(m).map_err(|message| ConfigError::key(at("methods"), message))?;
        }
        if !route.accepted_at_field.is_empty() && !route.accepted_at_field.starts_with('/') {
            return Err(ConfigError::key(
                at("accepted_at_field"),
                "a JSON pointer starts with '/' (e.g. \"/client_time\")",
            ));
        }
        check_sync_keys(config, route, &at)?;
        if !route.path.is_empty() && !route.path.starts_with('/') {
            return Err(ConfigError::key(at("path"), "must start with '/'"));
        }
        PathMatcher::new(&route.path).map_err(|e| ConfigError::key(at("path"), e))?;
        if let Some(names) = &route.identity_headers {
            check_header_names(&at("identity_headers"), names)?;
        }
        if let Some(classify) = &route.classify {
            check_classify(&at("classify"), classify)?;
        }
        check_overlay(route, &at)?;
        check_graphql(route, &at)?;
        let name = route.effective_name();
        if name == DEFAULT_ROUTE_NAME {
            return Err(ConfigError::key(
                at("name"),
                format!(
                    "{name:?} is the name of the route for requests no [[route]] matches; choose another"
                ),
            ));
        }
        if let Some(first) = names.iter().position(|n| *n == name) {
            let message = if route.name.is_none() && config.routes[first].name.is_none() {
                format!(
                    "matches the same methods and path as route[{first}] ({name:?}), which \
                     comes first, so it is never used: remove it or change what it matches"
                )
            } else {
                format!(
                    "the name {name:?} is already route[{first}]'s; route names must be \
                     unique (queued mutations find their route's rules by name)"
                )
            };
            return Err(ConfigError::key(at("name"), message));
        }
        names.push(name);
    }
    Ok(())
}

/// The compiled overlay of a route (`overlay = true`), if on.
fn overlay_shape(rc: &RouteConfig) -> Result<Option<OverlayShape>, String> {
    match (&rc.item, rc.overlay) {
        (Some(item), true) => OverlayShape::new(
            item,
            rc.id_field.as_deref(),
            rc.list_pointer.as_deref(),
            rc.overlay_marker,
        )
        .map(Some),
        _ => Ok(None),
    }
}

/// Overlay keys that only make sense together: `overlay` needs `item` (and a route path that
/// matches it); `item`, `id_field`, `list_pointer`, `overlay_marker` need `overlay`.
fn check_overlay(route: &RouteConfig, at: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
    if !route.overlay {
        let stray = [
            ("item", route.item.is_some()),
            ("id_field", route.id_field.is_some()),
            ("list_pointer", route.list_pointer.is_some()),
            ("overlay_marker", route.overlay_marker),
        ];
        if let Some((key, _)) = stray.iter().find(|(_, set)| *set) {
            return Err(ConfigError::key(
                at(key),
                "is only used with overlay = true on the same route",
            ));
        }
        return Ok(());
    }
    let Some(item) = &route.item else {
        return Err(ConfigError::key(
            at("overlay"),
            "needs item = \"/collection/{id}\" to know which paths are items and which the \
             collection",
        ));
    };
    let shape = overlay_shape(route).map_err(|e| {
        let key = if e.starts_with("list_pointer") {
            "list_pointer"
        } else {
            "item"
        };
        ConfigError::key(at(key), e)
    })?;
    if let Some(shape) = shape {
        let (sample_item, collection) = shape.sample_paths();
        let matcher = PathMatcher::new(&route.path).map_err(|e| ConfigError::key(at("path"), e))?;
        if !matcher.matches(&sample_item) || !matcher.matches(&collection) {
            return Err(ConfigError::key(
                at("item"),
                format!(
                    "{item:?}: this route's path {:?} does not match both its items ({sample_item}) \
                     and its collection ({collection}), so its reads or writes would not be overlaid",
                    route.path
                ),
            ));
        }
        if route.write == WriteMode::PassThrough {
            return Err(ConfigError::key(
                at("overlay"),
                "write = \"pass-through\" never queues, so there is nothing pending to overlay",
            ));
        }
    }
    Ok(())
}

/// `graphql = true` only means something on a route that takes POSTs and may cache them.
fn check_graphql(route: &RouteConfig, at: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
    if !route.graphql {
        return Ok(());
    }
    if !route.methods.is_empty() && !route.methods.iter().any(|m| m == "POST") {
        return Err(ConfigError::key(
            at("graphql"),
            format!(
                "this route's methods {:?} do not include POST, so no GraphQL request reaches it",
                route.methods
            ),
        ));
    }
    if route.read == ReadStrategy::NetworkOnly {
        return Err(ConfigError::key(
            at("graphql"),
            "read = \"network-only\" never caches, so GraphQL queries would not be served \
             offline: choose another read strategy or drop graphql",
        ));
    }
    Ok(())
}

/// `coalesce` and `capture_version` act on queued PUT, PATCH and DELETE: refuse a route where
/// they could never act.
fn check_sync_keys(
    config: &Config,
    route: &RouteConfig,
    at: &dyn Fn(&str) -> String,
) -> Result<(), ConfigError> {
    let writes_no_put_patch_delete = !route.methods.is_empty()
        && !route
            .methods
            .iter()
            .any(|m| matches!(m.to_ascii_uppercase().as_str(), "PUT" | "PATCH" | "DELETE"));
    for (key, on) in [
        ("coalesce", route.coalesce),
        ("capture_version", route.capture_version),
    ] {
        if !on {
            continue;
        }
        if route.write == WriteMode::PassThrough {
            return Err(ConfigError::key(
                at(key),
                "write = \"pass-through\" never queues, and this acts on queued writes only",
            ));
        }
        if writes_no_put_patch_delete {
            return Err(ConfigError::key(
                at(key),
                "acts on PUT, PATCH and DELETE, and this route's methods name none of them",
            ));
        }
    }
    if route.capture_version && !config.cache.enabled {
        return Err(ConfigError::key(
            at("capture_version"),
            "needs the read cache (cache.enabled = true): the version is the served copy's",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::KNOWN_METHODS;

    /// A whole config text, routes included, as `check-config` reads it.
    fn parse_config(text: &str) -> Result<Config, ConfigError> {
        parse(text).map(|(config, _)| config)
    }

    #[test]
    fn coalesce_and_capture_version_refuse_routes_where_they_cannot_act() {
        let err =
            parse_config("[[route]]\npath = \"/a/\"\nwrite = \"pass-through\"\ncoalesce = true\n")
                .expect_err("pass-through");
        assert_eq!(err.key.as_deref(), Some("route[0].coalesce"));
        let err = parse_config("[[route]]\nmethods = [\"POST\"]\ncapture_version = true\n")
            .expect_err("POST only");
        assert_eq!(err.key.as_deref(), Some("route[0].capture_version"));
        let err = parse_config("[cache]\nenabled = false\n[[route]]\ncapture_version = true\n")
            .expect_err("no cache");
        assert_eq!(err.key.as_deref(), Some("route[0].capture_version"));
        parse_config(
            "[[route]]\nmethods = [\"PUT\", \"PATCH\"]\ncoalesce = true\ncapture_version = true\n",
        )
        .expect("valid");
    }

    #[test]
    fn classify_lists_hold_status_codes_only() {
        let err = parse_config("[replay.classify]\nconflict = [409]\nretryable = [503, 99]\n")
            .expect_err("99");
        assert_eq!(err.key.as_deref(), Some("replay.classify.retryable"));
        assert_eq!(err.line, Some(3));
        assert!(
            err.message.contains("99 is not an HTTP status code"),
            "{err}"
        );
        let err = parse_config("[[route]]\npath = \"/a/\"\n[route.classify]\npartial = [600]\n")
            .expect_err("600");
        assert_eq!(err.key.as_deref(), Some("route[0].classify.partial"));
        assert_eq!(err.line, Some(4));
        parse_config("[replay.classify]\nretryable = [100, 599]\n").expect("bounds");
        let err = parse_config(
            "[[route]]\n[[route.classify.body]]\npointer = \"/a\"\nclass = \"success\"\n\
             [[route.classify.body]]\npointer = \"b\"\nclass = \"success\"\n",
        )
        .expect_err("pointer");
        assert_eq!(
            err.key.as_deref(),
            Some("route[0].classify.body[1].pointer")
        );
        assert_eq!(err.line, Some(6));
    }

    /// Issue #15 point 7: a bad Redis URL says what is wrong, not only "InvalidClientConfig".
    #[test]
    fn duplicate_route_names_are_a_config_error() {
        let err = parse_config(
            "[[route]]\nname = \"api\"\npath = \"/a/\"\n[[route]]\npath = \"/b/\"\nname = \"api\"\n",
        )
        .expect_err("same name");
        assert_eq!(err.key.as_deref(), Some("route[1].name"));
        assert_eq!(err.line, Some(6));
        assert!(err.message.contains("already route[0]'s"), "{err}");
        let err = parse_config(
            "[[route]]\nmethods = [\"GET\"]\npath = \"/a/\"\n\n[[route]]\npath = \"/a/\"\nmethods = [\"GET\"]\n",
        )
        .expect_err("same match");
        assert_eq!(err.key.as_deref(), Some("route[1].name"));
        assert_eq!(err.line, Some(5), "the route's header: it has no name line");
        assert!(err.message.contains("never used"), "{err}");
        let err = parse_config("[[route]]\nname = \"default\"\n").expect_err("reserved");
        assert_eq!(err.key.as_deref(), Some("route[0].name"));
        parse_config("[[route]]\npath = \"/a/\"\n[[route]]\nmethods = [\"GET\"]\npath = \"/a/\"\n")
            .expect("other methods: another name");
    }

    #[test]
    fn route_keys_are_named_route_n_key_with_their_line() {
        let two = |second: &str| {
            format!("[[route]]\npath = \"/a/\"\nread = \"cache-first\"\n\n[[route]]\n{second}\n")
        };
        let err = parse_config(&two("path = \"/b/\"\nread = \"bogus\"")).expect_err("read");
        assert_eq!(err.key.as_deref(), Some("route[1].read"));
        assert_eq!(err.line, Some(7));
        let err = parse_config(&two("read = \"network-first\"\npath = \"b/\"")).expect_err("path");
        assert_eq!(err.key.as_deref(), Some("route[1].path"));
        assert_eq!(
            err.line,
            Some(7),
            "the second route's path, not the first's"
        );
        let err = parse_config(&two("pathh = \"/b/\"")).expect_err("unknown key");
        assert_eq!(err.key.as_deref(), Some("route[1].pathh"));
        assert_eq!(err.line, Some(6));
        let err = parse_config(&two("[route.classify]\nconflict = \"409\"")).expect_err("type");
        assert_eq!(err.key.as_deref(), Some("route[1].classify.conflict"));
        assert_eq!(err.line, Some(7));
    }

    /// Issue #15 point 7: route names are unique (queued mutations find their rules by it).
    #[test]
    fn security_keys_have_defaults_and_are_validated() {
        let c = parse_config("").expect("defaults");
        assert_eq!(c.proxy.max_connections, 10_000);
        assert_eq!(c.admin.max_connections, 64);
        assert_eq!(
            c.cache.identity_headers,
            ["Authorization", "Cookie", "X-Api-Key", "Api-Key"]
        );
        let c = parse_config(
            "[cache]\nidentity_headers = [\"X-Tenant\"]\n[admin]\nallowed_hosts = [\"outpost.lan\"]\n\
             [[route]]\npath = \"/a/\"\nidentity_headers = []\n",
        )
        .expect("valid");
        assert_eq!(c.routes[0].identity_headers.as_deref(), Some(&[][..]));
        let err =
            parse_config("[cache]\nidentity_headers = [\"bad header\"]\n").expect_err("bad name");
        assert_eq!(err.key.as_deref(), Some("cache.identity_headers"));
        assert_eq!(err.line, Some(2));
        let err = parse_config("[[route]]\nidentity_headers = [\"a:b\"]\n").expect_err("bad");
        assert_eq!(err.key.as_deref(), Some("route[0].identity_headers"));
        let err = parse_config("[proxy]\nmax_connections = 0\n").expect_err("zero");
        assert_eq!(err.key.as_deref(), Some("proxy.max_connections"));
        let err = parse_config("[admin]\nallowed_hosts = [\"http://x\"]\n").expect_err("url");
        assert_eq!(err.key.as_deref(), Some("admin.allowed_hosts"));
    }

    /// Issue #15 point 7: a typo'd method is refused, naming the key and its line.
    #[test]
    fn unknown_methods_are_refused_naming_the_key() {
        let text = "[[route]]\npath = \"/a/\"\n\n[[route]]\npath = \"/b/\"\nmethods = [\"GET\", \"GTE\"]\n";
        let err = parse_config(text).expect_err("GTE is not a method");
        assert_eq!(err.key.as_deref(), Some("route[1].methods"));
        assert_eq!(err.line, Some(6));
        assert!(
            err.message.contains("\"GTE\" is not an HTTP method"),
            "{err}"
        );
        let err = parse_config("[[route]]\nmethods = [\"get\"]\n").expect_err("case");
        assert!(err.message.contains("write \"GET\""), "{err}");
        for m in KNOWN_METHODS {
            parse_config(&format!("[[route]]\nmethods = [\"{m}\"]\n")).expect(m);
        }
    }

    /// Issue #15 point 7: classification lists hold status codes 100–599 only.

    #[test]
    fn inconsistent_overlay_setups_are_named() {
        let err =
            parse_config("[[route]]\npath = \"/orders\"\noverlay = true\n").expect_err("no item");
        assert_eq!(err.key.as_deref(), Some("route[0].overlay"));
        let err = parse_config("[[route]]\npath = \"/orders\"\nid_field = \"oid\"\n")
            .expect_err("no overlay");
        assert_eq!(err.key.as_deref(), Some("route[0].id_field"));
        let err =
            parse_config("[[route]]\npath = \"/shop/\"\noverlay = true\nitem = \"/orders/{id}\"\n")
                .expect_err("path does not match");
        assert_eq!(err.key.as_deref(), Some("route[0].item"));
        let err = parse_config(
            "[[route]]\npath = \"/orders\"\noverlay = true\nitem = \"/orders/{id}\"\nlist_pointer = \"x\"\n",
        )
        .expect_err("pointer");
        assert_eq!(err.key.as_deref(), Some("route[0].list_pointer"));
        let (_, table) =
            parse("[[route]]\npath = \"/orders\"\noverlay = true\nitem = \"/orders/{id}\"\n")
                .expect("valid");
        assert!(table.resolve(&Method::GET, "/orders/1").overlay.is_some());
    }

    #[test]
    fn graphql_routes_take_posts_and_cache() {
        let err =
            parse_config("[[route]]\npath = \"/graphql\"\nmethods = [\"GET\"]\ngraphql = true\n")
                .expect_err("no POST");
        assert_eq!(err.key.as_deref(), Some("route[0].graphql"));
        assert_eq!(err.line, Some(4));
        assert!(err.message.contains("POST"), "{err}");
        let err = parse_config(
            "[[route]]\npath = \"/graphql\"\nread = \"network-only\"\ngraphql = true\n",
        )
        .expect_err("never cached");
        assert_eq!(err.key.as_deref(), Some("route[0].graphql"));
        let (_, table) = parse(
            "[[route]]\npath = \"/graphql\"\nmethods = [\"POST\", \"GET\"]\ngraphql = true\n",
        )
        .expect("valid");
        assert!(table.resolve(&Method::POST, "/graphql").graphql);
        assert!(!table.resolve(&Method::POST, "/other").graphql);
    }

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
