//! `outpost queue …`: a small client of the admin API for operators and scripts.
//!
//! Each [`Command`] is one or two admin calls (`GET /queue`, `POST /queue/{key}/retry`, …)
//! with `Authorization: Bearer $OUTPOST_ADMIN_TOKEN` when set. The answer is printed as a
//! table for people, or as the admin API's JSON with `--json`. Failures are [`ClientError`]s,
//! which the binary turns into exit code 1 with a one-line message (usage errors are clap's,
//! exit code 2).

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

/// How long one admin call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Pending items (`GET /queue`).
    List,
    /// One item's status document (`GET /mutations/{key}`).
    Show(String),
    /// Send a pending item now, or put a dead letter back (with an optional edit:
    /// `{"body": …, "headers": {…}}`).
    Retry {
        /// The idempotency key.
        key: String,
        /// The edit, for a dead letter.
        edit: Option<Value>,
    },
    /// Drop a pending item or a dead letter.
    Drop(String),
    /// The dead-letter list (`GET /dead-letters`).
    DeadLetters,
    /// Pause replay.
    Pause,
    /// Resume replay.
    Resume,
}

/// Why a command failed (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The admin URL is not `http://host:port`.
    #[error("--admin {0:?} is not an http:// URL")]
    BadUrl(String),
    /// Nothing answered.
    #[error("cannot reach the admin API at {url}: {reason}")]
    Unreachable {
        /// The admin base URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The key is not known (or not in a state the action applies to).
    #[error("{0}")]
    NotFound(String),
    /// The admin API refused (401, 403, 400, …).
    #[error("the admin API refused: {status} {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Its error message.
        message: String,
    },
    /// The answer was not what an admin API answers.
    #[error("unexpected answer from the admin API: {0}")]
    BadAnswer(String),
}

/// Run `command` against the admin API at `admin` and return what to print.
pub async fn run(
    admin: &str,
    token: Option<&str>,
    command: &Command,
    json: bool,
) -> Result<String, ClientError> {
    let api = Api::new(admin, token)?;
    match command {
        Command::List => {
            let doc = api.call(Method::GET, "/queue?limit=1000", None).await?.1;
            Ok(if json {
                pretty(&doc)
            } else {
                table_of_items(&doc, false)
            })
        }
        Command::DeadLetters => {
            let doc = api
                .call(Method::GET, "/dead-letters?limit=1000", None)
                .await?
                .1;
            Ok(if json {
                pretty(&doc)
            } else {
                table_of_items(&doc, true)
            })
        }
        Command::Show(key) => {
            let (status, doc) = api
                .call(Method::GET, &format!("/mutations/{}", enc(key)), None)
                .await?;
            if status == StatusCode::NOT_FOUND {
                return Err(ClientError::NotFound(format!(
                    "no mutation with key {key:?}"
                )));
            }
            Ok(if json { pretty(&doc) } else { describe(&doc) })
        }
        Command::Retry { key, edit } => {
            let mut answer = None;
            // A pending item first (unless edited: only dead letters take edits).
            if edit.is_none() {
                let (status, doc) = api
                    .call(Method::POST, &format!("/queue/{}/retry", enc(key)), None)
                    .await?;
                if status.is_success() {
                    answer = Some(doc);
                }
            }
            if answer.is_none() {
                let (status, doc) = api
                    .call(
                        Method::POST,
                        &format!("/dead-letters/{}/retry", enc(key)),
                        edit.clone(),
                    )
                    .await?;
                if status == StatusCode::NOT_FOUND {
                    return Err(ClientError::NotFound(format!(
                        "no pending item or dead letter with key {key:?}"
                    )));
                }
                answer = Some(doc);
            }
            let doc = answer.unwrap_or(Value::Null);
            Ok(if json {
                pretty(&doc)
            } else {
                match doc["new_key"].as_str() {
                    Some(new_key) => format!("retried {key} (edited) as {new_key}\n"),
                    None if doc["edited"] == true => format!("retried {key} (edited)\n"),
                    None => format!("retried {key}\n"),
                }
            })
        }
        Command::Drop(key) => {
            let (status, doc) = api
                .call(Method::DELETE, &format!("/queue/{}", enc(key)), None)
                .await?;
            if status == StatusCode::NOT_FOUND {
                return Err(ClientError::NotFound(format!(
                    "no pending item or dead letter with key {key:?}"
                )));
            }
            Ok(if json {
                pretty(&doc)
            } else {
                format!("dropped {key}\n")
            })
        }
        Command::Pause | Command::Resume => {
            let path = if *command == Command::Pause {
                "/sync/pause"
            } else {
                "/sync/resume"
            };
            let doc = api.call(Method::POST, path, None).await?.1;
            Ok(if json {
                pretty(&doc)
            } else if doc["paused"] == true {
                "replay paused\n".into()
            } else {
                "replay resumed\n".into()
            })
        }
    }
}

struct Api {
    base: String,
    token: Option<String>,
    http: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl Api {
    fn new(admin: &str, token: Option<&str>) -> Result<Self, ClientError> {
        let base = admin.trim_end_matches('/').to_string();
        let valid = base
            .strip_prefix("http://")
            .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'));
        if !valid || base.parse::<http::Uri>().is_err() {
            return Err(ClientError::BadUrl(admin.to_string()));
        }
        Ok(Self {
            base,
            token: token.filter(|t| !t.is_empty()).map(str::to_owned),
            http: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// One call; 2xx and 404 come back with their JSON, anything else is an error.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = Request::builder().method(method).uri(&url);
        if let Some(token) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let payload = match &body {
            Some(v) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(payload))
            .map_err(|e| ClientError::BadUrl(format!("{url}: {e}")))?;
        let unreachable = |reason: String| ClientError::Unreachable {
            url: self.base.clone(),
            reason,
        };
        let resp = match tokio::time::timeout(CALL_TIMEOUT, self.http.request(req)).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                let mut reason = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    reason = format!("{reason}: {s}");
                    source = s.source();
                }
                return Err(unreachable(reason));
            }
            Err(_) => return Err(unreachable(format!("no answer within {CALL_TIMEOUT:?}"))),
        };
        let status = resp.status();
        let bytes = match tokio::time::timeout(CALL_TIMEOUT, resp.into_body().collect()).await {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) => return Err(unreachable(e.to_string())),
            Err(_) => return Err(unreachable("the answer stalled".into())),
        };
        let doc: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() || status == StatusCode::NOT_FOUND {
            return Ok((status, doc));
        }
        let message = doc["message"]
            .as_str()
            .or(doc["error"].as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        let hint = if status == StatusCode::UNAUTHORIZED {
            " (set OUTPOST_ADMIN_TOKEN)"
        } else {
            ""
        };
        Err(ClientError::Refused {
            status: status.as_u16(),
            message: format!("{message}{hint}"),
        })
    }
}

fn enc(key: &str) -> String {
    utf8_percent_encode(key, NON_ALPHANUMERIC).to_string()
}

fn pretty(doc: &Value) -> String {
    let mut s = serde_json::to_string_pretty(doc).unwrap_or_else(|_| doc.to_string());
    s.push('\n');
    s
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A table of status documents (`items`): pending ones or dead letters.
fn table_of_items(doc: &Value, dead: bool) -> String {
    let items = doc["items"].as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        return if dead {
            "no dead letters\n".into()
        } else {
            "queue is empty\n".into()
        };
    }
    let header: &[&str] = if dead {
        &["KEY", "STATUS", "UPSTREAM", "OUTCOME", "ACCEPTED"]
    } else {
        &[
            "KEY",
            "STATUS",
            "ATTEMPTS",
            "PARTITION",
            "ACCEPTED",
            "NEXT ATTEMPT",
        ]
    };
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|d| {
            if dead {
                vec![
                    text(&d["idempotency_key"]),
                    text(&d["status"]),
                    text(&d["upstream_status"]),
                    shorten(&text(&d["outcome"]), 48),
                    text(&d["accepted_at"]),
                ]
            } else {
                vec![
                    text(&d["idempotency_key"]),
                    text(&d["status"]),
                    text(&d["attempts"]),
                    text(&d["partition"]),
                    text(&d["accepted_at"]),
                    text(&d["next_attempt_at"]),
                ]
            }
        })
        .collect();
    let mut out = render_table(header, &rows);
    out.push_str(&format!(
        "{} {}\n",
        rows.len(),
        if dead { "dead letter(s)" } else { "pending" }
    ));
    out
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let cut: String = s.chars().take(max.saturating_sub(1)).collect();
    format!("{cut}…")
}

fn render_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// One status document as `name: value` lines.
fn describe(doc: &Value) -> String {
    let Some(map) = doc.as_object() else {
        return pretty(doc);
    };
    let width = map.keys().map(String::len).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in map {
        let value = match v {
            Value::Object(_) | Value::Array(_) => v.to_string(),
            other => text(other),
        };
        out.push_str(&format!("{k:<width$}  {}\n", shorten(&value, 200)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_count_rows() {
        let doc = serde_json::json!({"items": [
            {"idempotency_key": "k1", "status": "queued", "attempts": 0, "partition": "upstream",
             "accepted_at": "2026-01-01T00:00:00.000Z", "next_attempt_at": null},
            {"idempotency_key": "a-longer-key", "status": "in_flight", "attempts": 2,
             "partition": "upstream", "accepted_at": "2026-01-01T00:00:01.000Z",
             "next_attempt_at": "2026-01-01T00:00:02.000Z"},
        ]});
        let t = table_of_items(&doc, false);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].starts_with("KEY           STATUS"), "{t}");
        assert!(lines[1].starts_with("k1            queued"), "{t}");
        assert_eq!(lines[3], "2 pending");
        assert_eq!(
            table_of_items(&serde_json::json!({"items": []}), true),
            "no dead letters\n"
        );
    }

    #[test]
    fn only_plain_http_admin_urls_are_taken() {
        for bad in [
            "127.0.0.1:9901",
            "https://x",
            "http://",
            "http://h/p",
            "ftp://h",
        ] {
            assert!(Api::new(bad, None).is_err(), "{bad}");
        }
        assert!(Api::new("http://127.0.0.1:9901/", Some("t")).is_ok());
    }
}
