//! The per-request context: what the proxy decided about one request, in one place.
//!
//! Built once when a request arrives (route, identity, client), filled in as the request
//! travels (idempotency key, source of the answer) and read once at the end for the access log.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use sha2::{Digest, Sha256};

use crate::route::Route;

/// Where the answer to a request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Forwarded to the upstream.
    Upstream,
    /// Served from the cache, fresh.
    Cache,
    /// Served from the cache because the upstream is unreachable.
    Stale,
    /// A mutation stored in the outbox (202).
    Queued,
    /// The stored answer of an earlier mutation with the same idempotency key.
    IdempotentReplay,
    /// Answered by outpost itself (reserved prefix, errors).
    Outpost,
}

impl Source {
    /// Name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Upstream => "upstream",
            Source::Cache => "cache",
            Source::Stale => "stale",
            Source::Queued => "queued",
            Source::IdempotentReplay => "idempotent_replay",
            Source::Outpost => "outpost",
        }
    }
}

/// Who is asking: a hash of the values of the route's identity headers (`cache.identity_headers`,
/// default `Authorization`, `Cookie`, `X-Api-Key`, `Api-Key`), so cached data never crosses
/// callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identity(pub [u8; 32]);

impl Identity {
    /// The identity of a request under the default identity headers (anonymous callers share
    /// one identity).
    pub fn of(headers: &HeaderMap) -> Self {
        use http::header::{AUTHORIZATION, COOKIE};
        static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
        static API_KEY: HeaderName = HeaderName::from_static("api-key");
        Self::from_headers(
            headers,
            &[AUTHORIZATION, COOKIE, X_API_KEY.clone(), API_KEY.clone()],
        )
    }

    /// The identity of a request given the headers that identify a caller (a route's
    /// `identity_headers`). Each name is hashed with its values, so the same value under
    /// another header is another identity.
    pub fn from_headers(headers: &HeaderMap, names: &[HeaderName]) -> Self {
        if !names.iter().any(|name| headers.contains_key(name)) {
            return Self::anonymous();
        }
        let mut h = Sha256::new();
        h.update(b"identity\0");
        for name in names {
            for v in headers.get_all(name) {
                h.update(name.as_str().as_bytes());
                h.update(b"\0");
                h.update(v.as_bytes());
                h.update(b"\0");
            }
        }
        Identity(h.finalize().into())
    }

    /// The identity of a caller that sends none of the identity headers.
    pub fn anonymous() -> Self {
        // The common anonymous caller: the hash of no values, computed once.
        static ANONYMOUS: std::sync::OnceLock<Identity> = std::sync::OnceLock::new();
        *ANONYMOUS.get_or_init(|| Identity(Sha256::digest(b"identity\0").into()))
    }

    /// Whether this is [`Self::anonymous`].
    pub fn is_anonymous(&self) -> bool {
        *self == Self::anonymous()
    }

    /// The identity used for public routes: the same for everyone.
    pub fn public() -> Self {
        Identity([0; 32])
    }
}

/// Everything the proxy knows and decided about one request.
#[derive(Debug)]
pub struct RequestContext {
    /// The matched route.
    pub route: Arc<Route>,
    /// Request method.
    pub method: Method,
    /// The host the app asked for (`Host`, or the h2 `:authority`), lower-case; forwarded as
    /// `X-Forwarded-Host`, so part of the cache key.
    pub host: String,
    /// Path and query as the app sent them, dot-segments removed.
    pub path_and_query: String,
    /// The caller's identity (or the public one on public routes).
    pub identity: Identity,
    /// The app's connection.
    pub client: ClientInfo,
    /// The mutation's idempotency key, once known.
    pub idempotency_key: Option<String>,
    /// Where the answer came from.
    pub source: Source,
    /// When the request arrived.
    pub started: Instant,
    /// A read that carries a body (a GraphQL query over POST, `QUERY`), buffered.
    pub read_body: Option<ReadBody>,
}

/// The body of a read that carries one: what is forwarded, and what its cache key holds.
#[derive(Debug, Clone)]
pub struct ReadBody {
    /// The body as the app sent it (forwarded unchanged).
    pub bytes: bytes::Bytes,
    /// The digest of its normalised form (see [`crate::graphql`]).
    pub digest: [u8; 32],
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn with(name: &'static str, value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_static(value));
        h
    }

    #[test]
    fn every_default_identity_header_separates_callers() {
        let anonymous = Identity::of(&HeaderMap::new());
        for name in ["authorization", "cookie", "x-api-key", "api-key"] {
            let alice = Identity::of(&with(name, "alice-key"));
            let mallory = Identity::of(&with(name, "mallory-key"));
            assert_ne!(alice, mallory, "{name}");
            assert_ne!(alice, anonymous, "{name}");
        }
        assert_eq!(Identity::of(&with("x-other", "v")), anonymous);
        // The same value under two names is two identities.
        assert_ne!(
            Identity::of(&with("x-api-key", "k")),
            Identity::of(&with("api-key", "k"))
        );
    }

    #[test]
    fn configured_names_replace_the_defaults() {
        let names = [HeaderName::from_static("x-tenant")];
        let a = Identity::from_headers(&with("x-tenant", "a"), &names);
        let b = Identity::from_headers(&with("x-tenant", "b"), &names);
        assert_ne!(a, b);
        assert_eq!(
            Identity::from_headers(&with("authorization", "x"), &names),
            Identity::from_headers(&HeaderMap::new(), &names)
        );
    }
}

/// What the proxy knows about the app's connection.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    /// The app's address.
    pub ip: IpAddr,
    /// `http` or `https` (listener with TLS).
    pub proto: &'static str,
    /// The app's address as a header value (made once per connection).
    pub ip_header: HeaderValue,
}

impl ClientInfo {
    /// Information about a connection from `ip`.
    pub fn new(ip: IpAddr, proto: &'static str) -> Self {
        let ip_header = HeaderValue::from_str(&ip.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self {
            ip,
            proto,
            ip_header,
        }
    }
}
