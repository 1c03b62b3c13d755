//! Loading HAR files: outpost's own recordings (repaired when a crash cut them), and the
//! shapes Chrome/Chromium DevTools, Firefox and mitmproxy export.
//!
//! Lenient where exporters differ (missing optional fields, `-1` sizes and timings, base64
//! bodies, `postData.params`, times with microseconds or offsets), strict where replay needs a
//! value: a bad entry is an error naming its index and the field.

use base64::Engine;
use bytes::Bytes;
use serde_json::Value;

/// One request of a HAR, ready to be replayed, with what was answered to it.
#[derive(Debug, Clone)]
pub struct HarEntry {
    /// Milliseconds after the first entry's start (0 when the file has no times).
    pub offset_ms: f64,
    /// Request method.
    pub method: http::Method,
    /// Host (with port, if any) of the recorded URL.
    pub host: String,
    /// Path and query of the recorded URL.
    pub path_and_query: String,
    /// Request headers, in order.
    pub headers: Vec<(String, String)>,
    /// Request body.
    pub body: Bytes,
    /// The recorded answer's status (0 when the HAR has none).
    pub status: u16,
    /// The recorded answer's content type.
    pub response_mime: String,
    /// The recorded answer's body (empty when not recorded).
    pub response_body: Bytes,
}

/// Why a HAR could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum HarError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Not JSON (and not a cut recording that could be repaired).
    #[error("not a HAR file: {0}")]
    Json(#[source] serde_json::Error),
    /// A field is missing or wrong.
    #[error("{at}: {message}")]
    Field {
        /// Where: `log.entries[3].request.url`.
        at: String,
        /// What is wrong.
        message: String,
    },
}

fn field(index: usize, path: &str, message: impl Into<String>) -> HarError {
    HarError::Field {
        at: format!("log.entries[{index}].{path}"),
        message: message.into(),
    }
}

/// Read and parse a HAR file.
pub fn load(path: &std::path::Path) -> Result<Vec<HarEntry>, HarError> {
    let text = std::fs::read_to_string(path).map_err(|source| HarError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text)
}

/// Parse HAR text, repairing a recording cut by a crash (missing `]}}`, a partial last line).
pub fn parse(text: &str) -> Result<Vec<HarEntry>, HarError> {
    let doc: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => repair(text).ok_or(HarError::Json(e))?,
    };
    entries(&doc)
}

/// A file cut by a crash: drop a partial last line, close the brackets.
fn repair(text: &str) -> Option<Value> {
    let lines: Vec<&str> = text.lines().collect();
    let lowest = lines.len().saturating_sub(3);
    for keep in (lowest..=lines.len()).rev() {
        let mut head = lines[..keep].join("\n");
        let trimmed = head.trim_end().trim_end_matches(',').len();
        head.truncate(trimmed);
        for closing in ["]}}", "\n]}}", "}", "]}"] {
            if let Ok(v) = serde_json::from_str::<Value>(&format!("{head}{closing}")) {
                return Some(v);
            }
        }
    }
    None
}

fn entries(doc: &Value) -> Result<Vec<HarEntry>, HarError> {
    let list = doc
        .get("log")
        .and_then(|l| l.get("entries"))
        .and_then(Value::as_array)
        .ok_or_else(|| HarError::Field {
            at: "log.entries".into(),
            message: "missing or not an array".into(),
        })?;
    let mut out = Vec::with_capacity(list.len());
    let mut first: Option<time::OffsetDateTime> = None;
    for (i, e) in list.iter().enumerate() {
        let started = match e.get("startedDateTime") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(
                time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                    .map_err(|err| field(i, "startedDateTime", format!("not RFC 3339: {err}")))?,
            ),
            Some(_) => return Err(field(i, "startedDateTime", "not a string")),
        };
        let offset_ms = match (started, first) {
            (Some(t), Some(f)) => ((t - f).as_seconds_f64() * 1000.0).max(0.0),
            (Some(t), None) => {
                first = Some(t);
                0.0
            }
            _ => 0.0,
        };
        out.push(entry(i, e, offset_ms)?);
    }
    Ok(out)
}

fn entry(i: usize, e: &Value, offset_ms: f64) -> Result<HarEntry, HarError> {
    let req = e
        .get("request")
        .filter(|r| r.is_object())
        .ok_or_else(|| field(i, "request", "missing or not an object"))?;
    let method = req
        .get("method")
        .and_then(Value::as_str)
        .ok_or_else(|| field(i, "request.method", "missing or not a string"))?;
    let method = http::Method::from_bytes(method.as_bytes())
        .map_err(|_| field(i, "request.method", format!("{method:?} is not a method")))?;
    let url = req
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| field(i, "request.url", "missing or not a string"))?;
    let uri: http::Uri = url
        .parse()
        .map_err(|err| field(i, "request.url", format!("{url:?} is not a URL: {err}")))?;
    let host = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .ok_or_else(|| field(i, "request.url", format!("{url:?} is not an absolute URL")))?;
    let path_and_query = uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let headers = name_values(i, req.get("headers"), "request.headers")?;
    let body = match req.get("postData") {
        None | Some(Value::Null) => Bytes::new(),
        Some(post) => post_data(i, post)?,
    };
    let resp = e.get("response");
    let status = match resp.and_then(|r| r.get("status")) {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_i64().map(|_| 0))
            .and_then(|s| u16::try_from(s).ok())
            .ok_or_else(|| field(i, "response.status", "not a number"))?,
    };
    let content = resp.and_then(|r| r.get("content"));
    let response_mime = content
        .and_then(|c| c.get("mimeType"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let response_body = match content {
        Some(c) => text_of(i, c, "response.content")?,
        None => Bytes::new(),
    };
    Ok(HarEntry {
        offset_ms,
        method,
        host,
        path_and_query,
        headers,
        body,
        status,
        response_mime,
        response_body,
    })
}

fn name_values(i: usize, v: Option<&Value>, at: &str) -> Result<Vec<(String, String)>, HarError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let list = v.as_array().ok_or_else(|| field(i, at, "not an array"))?;
    let mut out = Vec::with_capacity(list.len());
    for (j, h) in list.iter().enumerate() {
        let name = h
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| field(i, &format!("{at}[{j}].name"), "missing or not a string"))?;
        let value = h.get("value").and_then(Value::as_str).unwrap_or("");
        out.push((name.to_owned(), value.to_owned()));
    }
    Ok(out)
}

/// `postData`: `text` (base64 when `encoding` says so), else `params` as a form.
fn post_data(i: usize, post: &Value) -> Result<Bytes, HarError> {
    if post.get("text").is_some_and(|t| !t.is_null()) {
        return text_of(i, post, "request.postData");
    }
    let params = name_values(i, post.get("params"), "request.postData.params")?;
    let form: Vec<String> = params
        .iter()
        .map(|(n, v)| {
            let enc = |s: &str| {
                percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC)
                    .to_string()
            };
            format!("{}={}", enc(n), enc(v))
        })
        .collect();
    Ok(Bytes::from(form.join("&")))
}

fn text_of(i: usize, v: &Value, at: &str) -> Result<Bytes, HarError> {
    let text = match v.get("text") {
        None | Some(Value::Null) => return Ok(Bytes::new()),
        Some(Value::String(s)) => s,
        Some(_) => return Err(field(i, &format!("{at}.text"), "not a string")),
    };
    match v.get("encoding").and_then(Value::as_str) {
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map(Bytes::from)
            .map_err(|err| field(i, &format!("{at}.text"), format!("bad base64: {err}"))),
        _ => Ok(Bytes::from(text.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CUT: &str = "{\"log\":{\"version\":\"1.2\",\"entries\":[\n\
        {\"startedDateTime\":\"2026-01-01T00:00:00.000Z\",\"request\":{\"method\":\"GET\",\"url\":\"http://a/x\"}},\n\
        {\"startedDateTime\":\"2026-01-01T00:00:01.5+00:00\",\"request\":{\"method\":\"POST\",\"url\":\"http://a/y?q=1\",\"postData\":{\"text\":\"aGk=\",\"encoding\":\"base64\"}}},\n\
        {\"startedDateTime\":\"2026-01-01T00:00:02Z\",\"request\":{\"meth";

    #[test]
    fn a_cut_recording_is_repaired_to_its_complete_entries() {
        let entries = parse(CUT).expect("repaired");
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].method, http::Method::POST);
        assert_eq!(entries[1].path_and_query, "/y?q=1");
        assert_eq!(entries[1].body, Bytes::from_static(b"hi"));
        assert!((entries[1].offset_ms - 1500.0).abs() < 0.01);
    }

    #[test]
    fn params_become_a_form_and_microsecond_times_with_offsets_parse() {
        let text = r#"{"log":{"entries":[{"startedDateTime":"2026-01-01T01:00:00.123456+01:00",
            "request":{"method":"POST","url":"https://h:8443/f","headers":[{"name":"A","value":"b"}],
            "postData":{"mimeType":"application/x-www-form-urlencoded","params":[{"name":"a b","value":"c&d"}]}},
            "response":{"status":201,"content":{"size":-1,"mimeType":"application/json","text":"{}"}},
            "timings":{"send":-1,"wait":-1,"receive":-1}}]}}"#;
        let e = parse(text).expect("parses");
        assert_eq!(e[0].body, Bytes::from_static(b"a%20b=c%26d"));
        assert_eq!(e[0].host, "h:8443");
        assert_eq!(e[0].status, 201);
        assert_eq!(e[0].headers, vec![("A".into(), "b".into())]);
    }

    #[test]
    fn a_bad_entry_names_its_index_and_field() {
        let text = r#"{"log":{"entries":[{"request":{"method":"GET","url":"http://a/"}},
            {"request":{"method":"GET","url":"/relative"}}]}}"#;
        let err = parse(text).expect_err("bad url").to_string();
        assert!(err.contains("log.entries[1].request.url"), "{err}");
        let text = r#"{"log":{"entries":[{"request":{"url":"http://a/"}}]}}"#;
        let err = parse(text).expect_err("no method").to_string();
        assert!(err.contains("log.entries[0].request.method"), "{err}");
        assert!(parse("not json").is_err());
    }
}
