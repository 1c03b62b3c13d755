//! `GET /`: the status page for people, served from the binary (no CDN, nothing fetched from
//! elsewhere).
//!
//! The page (`page/index.html`, `page/app.js`, `page/app.css`) asks for the admin token once
//! (when one is needed), keeps it in `sessionStorage`, and sends it as `Authorization: Bearer`
//! on every call. It reads `/status`, `/queue` and `/dead-letters`, and follows `/events` with
//! `fetch` and a stream reader rather than `EventSource`, which cannot send headers: the token
//! never goes into a URL (where logs, history and `Referer` would keep it). It reconnects with
//! `Last-Event-ID` itself. Its buttons call the admin API (retry, edit and retry, drop,
//! pause/resume) from the listener's own origin, which the `Origin` check lets through.
//!
//! These files need no token (they hold no data) but the `Host` rule still applies, and they
//! are sent with a strict `Content-Security-Policy` (scripts, styles and connections to this
//! origin only), `X-Frame-Options: DENY` (no clickjacking of the buttons) and
//! `Referrer-Policy: no-referrer`.

use http::{HeaderValue, Response, header};

use crate::body::{self, ProxyBody};

const INDEX_HTML: &str = include_str!("page/index.html");
const APP_JS: &str = include_str!("page/app.js");
const APP_CSS: &str = include_str!("page/app.css");

/// The response for a status page file at `path`, if it is one.
pub fn asset(path: &str) -> Option<Response<ProxyBody>> {
    let (content, content_type) = match path {
        "/" | "/index.html" => (INDEX_HTML, "text/html; charset=utf-8"),
        "/static/app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "/static/app.css" => (APP_CSS, "text/css; charset=utf-8"),
        _ => return None,
    };
    let mut resp = Response::new(body::full(content));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    Some(resp)
}
