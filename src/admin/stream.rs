//! `GET /events`: the event journal ([`Events`]) as server-sent events.
//!
//! Each event is one SSE message: `id: <id>` and `data: <JSON>` (the [`Stamped`] event: `id`,
//! `at_ms`, `type` and its fields), with no `event:` line, so that a plain `onmessage` handler
//! sees every type. A client reconnecting with `Last-Event-ID` (or `?since=<id>`; `since=0`
//! asks for everything still kept) first gets the kept events after that id; when some of
//! them are no longer kept it gets `data: {"type":"missed","after":<id>}` (no id) before them.
//! While nothing happens a comment line (`: keep-alive`) goes out every
//! `admin.events_heartbeat`, so proxies keep the stream open.
//!
//! The writer never blocks an emitter: it reads the journal under a short lock, is woken
//! through a `watch` of the newest id, and a client too slow to keep up simply falls behind
//! in the journal (and is told what it missed). The stream ends when outpost shuts down.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt as _, StreamBody};

use crate::body::{BoxError, ProxyBody};
use crate::events::{Event, Events, Stamped};
use crate::shutdown::Shutdown;

/// Most events written in one chunk.
const BATCH: usize = 256;

/// Where a new stream starts: after `Last-Event-ID` (or `?since=`), else at the newest event.
pub fn start_after(headers: &HeaderMap, query: Option<&str>, events: &Events) -> u64 {
    let from_query = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("since=")?.parse::<u64>().ok());
    let from_header = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let newest = events.newest_id();
    // An id from the future (another instance, a clock set back) would wait for ever.
    from_header.or(from_query).unwrap_or(newest).min(newest)
}

/// Decides whether one event goes to a stream (the app-facing stream shows a caller only the
/// events of its own mutations).
pub type EventFilter = Arc<dyn Fn(&Event) -> BoxFuture<'static, bool> + Send + Sync>;

/// The SSE response for a client that saw everything up to `after`.
pub fn response(
    events: Events,
    after: u64,
    heartbeat: Duration,
    shutdown: Shutdown,
) -> Response<ProxyBody> {
    filtered(events, after, heartbeat, shutdown, None)
}

/// Like [`response`], writing only the events `filter` lets through (all without one).
pub fn filtered(
    events: Events,
    after: u64,
    heartbeat: Duration,
    shutdown: Shutdown,
    filter: Option<EventFilter>,
) -> Response<ProxyBody> {
    let heartbeat = heartbeat.max(Duration::from_millis(10));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = Writer {
        newest: events.watch(),
        events,
        after,
        tick,
        shutdown,
        greeted: false,
        filter,
    };
    let stream = futures_util::stream::unfold(state, |mut w| async move {
        let chunk = w.next_chunk().await?;
        Some((chunk, w))
    })
    .map(|chunk| Ok::<_, BoxError>(http_body::Frame::data(chunk)));
    let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // nginx would otherwise buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

struct Writer {
    events: Events,
    newest: tokio::sync::watch::Receiver<u64>,
    /// The id of the last event written.
    after: u64,
    tick: tokio::time::Interval,
    shutdown: Shutdown,
    greeted: bool,
    filter: Option<EventFilter>,
}

impl Writer {
    /// The next bytes to write; `None` ends the stream (shutdown).
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if !self.greeted {
            self.greeted = true;
            // Sent at once, so that the client sees the stream is open.
            return Some(Bytes::from_static(b"retry: 2000\n: outpost events\n\n"));
        }
        loop {
            if self.shutdown.is_triggered() {
                return None;
            }
            self.newest.borrow_and_update();
            let since = self.events.since(self.after, BATCH);
            if since.missed || !since.events.is_empty() {
                let mut out = String::new();
                if since.missed {
                    out.push_str(&format!(
                        "data: {{\"type\":\"missed\",\"after\":{}}}\n\n",
                        self.after
                    ));
                }
                for e in &since.events {
                    if let Some(filter) = &self.filter
                        && !filter(&e.event).await
                    {
                        continue;
                    }
                    write_event(&mut out, e);
                }
                self.after = match since.events.last() {
                    Some(e) => e.id,
                    None => self.events.newest_id(),
                };
                if out.is_empty() {
                    continue;
                }
                return Some(Bytes::from(out));
            }
            tokio::select! {
                _ = self.shutdown.wait() => return None,
                changed = self.newest.changed() => if changed.is_err() { return None },
                _ = self.tick.tick() => return Some(Bytes::from_static(b": keep-alive\n\n")),
            }
        }
    }
}

fn write_event(out: &mut String, e: &Stamped) {
    // serde_json never writes a raw newline, so the data fits on one line.
    let json = serde_json::to_string(e).unwrap_or_else(|_| "{}".into());
    out.push_str("id: ");
    out.push_str(&e.id.to_string());
    out.push_str("\ndata: ");
    out.push_str(&json);
    out.push_str("\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn next_text(body: &mut ProxyBody) -> String {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("a frame in time")
            .expect("not ended")
            .expect("no error");
        String::from_utf8_lossy(&frame.into_data().expect("data")).into_owned()
    }

    #[tokio::test]
    async fn a_stream_sends_new_events_heartbeats_and_ends_on_shutdown() {
        let events = Events::with_capacity(8);
        let shutdown = Shutdown::new();
        let after = start_after(&HeaderMap::new(), None, &events);
        let resp = response(
            events.clone(),
            after,
            Duration::from_millis(50),
            shutdown.clone(),
        );
        let mut body = resp.into_body();
        assert!(next_text(&mut body).await.starts_with("retry: 2000"));
        events.emit(Event::Paused);
        let text = next_text(&mut body).await;
        assert!(
            text.starts_with(&format!("id: {}\ndata: {{", after + 1)),
            "{text}"
        );
        assert!(text.contains("\"type\":\"paused\""), "{text}");
        assert_eq!(next_text(&mut body).await, ": keep-alive\n\n");
        shutdown.trigger();
        let end = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("ends in time");
        assert!(end.is_none(), "the stream ends on shutdown");
    }

    #[tokio::test]
    async fn a_reconnecting_client_gets_what_it_missed_or_is_told_it_cannot() {
        let events = Events::with_capacity(2);
        let first = events.newest_id() + 1;
        for _ in 0..3 {
            events.emit(Event::Resumed);
        }
        let mut headers = HeaderMap::new();
        headers.insert("last-event-id", HeaderValue::from(first + 1));
        let after = start_after(&headers, None, &events);
        let mut body = response(
            events.clone(),
            after,
            Duration::from_secs(60),
            Shutdown::new(),
        )
        .into_body();
        next_text(&mut body).await;
        let text = next_text(&mut body).await;
        assert_eq!(text.matches("id: ").count(), 1, "{text}");
        assert!(text.contains(&format!("id: {}", first + 2)), "{text}");
        assert!(!text.contains("missed"), "{text}");

        let after = start_after(&HeaderMap::new(), Some("since=0"), &events);
        let mut body = response(
            events.clone(),
            after,
            Duration::from_secs(60),
            Shutdown::new(),
        )
        .into_body();
        next_text(&mut body).await;
        let text = next_text(&mut body).await;
        assert!(
            text.starts_with("data: {\"type\":\"missed\",\"after\":0}\n\n"),
            "{text}"
        );
        assert_eq!(text.matches("id: ").count(), 2, "{text}");
    }

    #[tokio::test]
    async fn a_client_that_reads_nothing_holds_up_no_emitter_and_learns_what_it_missed() {
        let events = Events::with_capacity(16);
        let after = events.newest_id();
        let mut body = response(
            events.clone(),
            after,
            Duration::from_secs(60),
            Shutdown::new(),
        )
        .into_body();
        next_text(&mut body).await;
        // Nobody reads while 100 000 events are emitted: emitting never waits for the client.
        for _ in 0..100_000 {
            events.emit(Event::Paused);
        }
        let text = next_text(&mut body).await;
        assert!(
            text.starts_with(&format!("data: {{\"type\":\"missed\",\"after\":{after}}}")),
            "{text}"
        );
        assert_eq!(text.matches("id: ").count(), 16, "only what is kept");
        assert!(text.contains(&format!("id: {}", after + 100_000)), "{text}");
    }
}
