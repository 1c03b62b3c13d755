//! The credentials vault: fresh credentials the app offers, for mutations that got a 401 on
//! replay.
//!
//! The principal of a mutation is read from its request when it is accepted
//! (`replay.auth_principal`: the `sub` of a bearer JWT, read without verifying; a header; or
//! everybody). While one of its mutations waits, the next request of the same principal through
//! outpost that carries credentials leaves them here for the replayer; with a shared store they
//! are also shared with the other instances. A mutation whose principal cannot be told is never
//! released by anybody's credentials.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use base64::Engine;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use tokio::sync::Notify;

use crate::store::now_ms;

/// Fresh credentials offered by the app, for mutations that got a 401 on replay.
///
/// The principal of a mutation is read from its request when it is accepted
/// (`replay.auth_principal`); while one of its mutations waits, the next request of the same
/// principal through outpost that carries credentials leaves them here for the replayer.
pub struct Credentials {
    mode: PrincipalMode,
    waiting: Mutex<HashSet<String>>,
    any_waiting: AtomicUsize,
    /// Another instance (shared store) has a mutation waiting for credentials.
    elsewhere_waiting: AtomicBool,
    fresh: Mutex<HashMap<String, Offered>>,
    /// Woken when credentials are offered while mutations wait.
    pub offered: Notify,
}

/// Credential headers offered by a principal, and when (Unix ms).
type Offered = (Vec<(String, Bytes)>, u64);

/// What [`Credentials::offer`] kept: principal, credential headers, when.
pub type Kept = (String, Vec<(String, Bytes)>, u64);

enum PrincipalMode {
    JwtSub,
    Header(HeaderName),
    Any,
}

impl Credentials {
    /// A vault for `replay.auth_principal = mode`.
    pub fn new(mode: &str) -> Self {
        let mode = match mode.strip_prefix("header:") {
            Some(name) => HeaderName::from_bytes(name.trim().as_bytes())
                .map(PrincipalMode::Header)
                .unwrap_or(PrincipalMode::Any),
            None if mode == "jwt-sub" => PrincipalMode::JwtSub,
            None => PrincipalMode::Any,
        };
        Self {
            mode,
            waiting: Mutex::default(),
            any_waiting: AtomicUsize::new(0),
            elsewhere_waiting: AtomicBool::new(false),
            fresh: Mutex::default(),
            offered: Notify::new(),
        }
    }

    /// The principal a request belongs to: `*` (everybody) when `replay.auth_principal =
    /// "any"`, else the JWT subject or header value, or `None` when it cannot be told. A
    /// mutation of an unknown principal is never released by anybody's fresh credentials:
    /// that could send Alice's write as Bob. It waits for an operator's retry, or expires.
    pub fn principal_of(&self, headers: &HeaderMap) -> Option<String> {
        match &self.mode {
            PrincipalMode::Any => Some("*".into()),
            PrincipalMode::Header(name) => headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            PrincipalMode::JwtSub => jwt_sub(headers),
        }
    }

    /// Whether credentials may be looked up for a mutation of `principal` (a known principal,
    /// or everybody when the mode says so; `*` stored by an older release counts only then).
    pub fn may_release(&self, principal: Option<&str>) -> bool {
        match principal {
            None => false,
            Some("*") => matches!(self.mode, PrincipalMode::Any),
            Some(_) => true,
        }
    }

    /// Note that the mutation `key` waits for credentials.
    pub fn mark_waiting(&self, key: &str) {
        if let Ok(mut w) = self.waiting.lock() {
            w.insert(key.to_string());
            self.any_waiting.store(w.len(), Ordering::Release);
        }
    }

    /// Note that the mutation `key` no longer waits.
    pub fn unmark_waiting(&self, key: &str) {
        if let Ok(mut w) = self.waiting.lock() {
            w.remove(key);
            self.any_waiting.store(w.len(), Ordering::Release);
        }
    }

    /// Keep the credentials of a request while mutations wait for some (here or, as the
    /// store says, on another instance); returns what was kept, to be shared.
    pub fn offer(&self, headers: &HeaderMap) -> Option<Kept> {
        if self.any_waiting.load(Ordering::Acquire) == 0
            && !self.elsewhere_waiting.load(Ordering::Acquire)
        {
            return None;
        }
        let creds: Vec<(String, Bytes)> = [header::AUTHORIZATION, header::COOKIE]
            .iter()
            .flat_map(|n| {
                headers
                    .get_all(n)
                    .iter()
                    .map(move |v| (n.as_str().to_string(), Bytes::copy_from_slice(v.as_bytes())))
            })
            .collect();
        if creds.is_empty() {
            return None;
        }
        let principal = self.principal_of(headers)?;
        let at = now_ms();
        if let Ok(mut fresh) = self.fresh.lock() {
            fresh.insert(principal.clone(), (creds.clone(), at));
        }
        self.offered.notify_waiters();
        Some((principal, creds, at))
    }

    /// Note whether another instance has a mutation waiting for credentials.
    pub fn set_elsewhere_waiting(&self, waiting: bool) {
        self.elsewhere_waiting.store(waiting, Ordering::Release);
    }

    /// Credentials of `principal` offered after `since_ms`, if any (`*` takes anyone's).
    pub fn fresh_for(
        &self,
        principal: Option<&str>,
        since_ms: u64,
    ) -> Option<Vec<(String, Bytes)>> {
        if !self.may_release(principal) {
            return None;
        }
        let fresh = self.fresh.lock().ok()?;
        let principal = principal?;
        fresh
            .iter()
            .filter(|(p, (_, at))| (principal == "*" || p.as_str() == principal) && *at > since_ms)
            .max_by_key(|(_, (_, at))| *at)
            .map(|(_, (c, _))| c.clone())
    }
}

/// The `sub` claim of a bearer JWT, read without verifying (it only groups mutations).
fn jwt_sub(headers: &HeaderMap) -> Option<String> {
    let auth = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = auth
        .strip_prefix("Bearer ")
        .or_else(|| auth.strip_prefix("bearer "))?;
    let payload = token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&json).ok()?;
    // An empty (or blank) sub names nobody, and `*` is the legacy "anybody": neither may
    // stand for a principal, or two callers with such tokens would release each other's writes.
    let sub = claims.get("sub")?.as_str()?;
    (!sub.trim().is_empty() && sub != "*").then(|| sub.to_string())
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn jwt_sub_is_the_principal() {
        let payload =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"sub":"alice"}"#);
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer x.{payload}.sig")).expect("value"),
        );
        let c = Credentials::new("jwt-sub");
        assert_eq!(c.principal_of(&h).as_deref(), Some("alice"));
        assert_eq!(
            c.principal_of(&HeaderMap::new()),
            None,
            "unknown, not everybody"
        );
    }

    #[test]
    fn an_empty_blank_or_wildcard_sub_is_no_principal() {
        let c = Credentials::new("jwt-sub");
        for sub in [r#""""#, r#"" ""#, r#""*""#] {
            let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(format!(r#"{{"sub":{sub}}}"#));
            let mut h = HeaderMap::new();
            h.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer x.{payload}.sig")).expect("value"),
            );
            assert_eq!(c.principal_of(&h), None, "sub {sub}");
            c.mark_waiting("k");
            assert!(c.offer(&h).is_none(), "sub {sub}: kept for nobody");
        }
    }

    #[test]
    fn unknown_principals_are_never_released_by_someone_elses_credentials() {
        let c = Credentials::new("jwt-sub");
        c.mark_waiting("k");
        let mut bob = HeaderMap::new();
        bob.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer opaque-token-of-bob"),
        );
        // Bob's opaque token has no principal: kept nowhere.
        assert!(c.offer(&bob).is_none());
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"sub":"bob"}"#);
        bob.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer x.{payload}.sig")).expect("value"),
        );
        assert!(c.offer(&bob).is_some());
        assert!(c.fresh_for(None, 0).is_none(), "unknown principal: never");
        assert!(
            c.fresh_for(Some("*"), 0).is_none(),
            "legacy '*': not in jwt-sub mode"
        );
        assert!(c.fresh_for(Some("alice"), 0).is_none(), "not Alice's");
        assert!(c.fresh_for(Some("bob"), 0).is_some());
        let any = Credentials::new("any");
        any.mark_waiting("k");
        assert!(any.offer(&bob).is_some());
        assert!(
            any.fresh_for(Some("*"), 0).is_some(),
            "explicitly one principal"
        );
    }
}
