//! Request paths made safe to route, cache and join to the upstream's path prefix.
//!
//! [`normalize`] runs before anything looks at a path (reserved prefix, routes, cache key,
//! forwarding), so that `/public/../account` is routed, cached and forwarded as `/account`:
//! - dot-segments are removed as RFC 3986 §5.2.4 says, counting `%2e`/`%2E` as `.` (they are
//!   equivalent: `.` is unreserved), so `/%2e%2e/` is `..` too;
//! - a path that would climb above the root (`/../x`, `/a/../../x`) is refused rather than
//!   clamped: no client of a real API sends one;
//! - `%00` is refused (a NUL cuts paths short in C-based upstreams);
//! - a `..` that only appears once `%2f`, `%5c` or `\` are read as separators (`/..%2fsecret`)
//!   is refused too, since an upstream that decodes those would climb with it.
//!
//! The query is left as it is. Everything else in the path keeps its bytes and its encoding.

use std::borrow::Cow;

/// Why a path was refused (a 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// `..` segments would climb above the root.
    #[error("the path climbs above the root")]
    AboveRoot,
    /// The path holds `%00`.
    #[error("the path holds an encoded NUL (%00)")]
    Nul,
    /// The path holds a `..` made of encoded separators.
    #[error("the path holds a '..' segment behind encoded separators")]
    EncodedDotSegment,
}

/// The path with dot-segments removed, or why it is refused (see the module docs). Paths that
/// do not start with `/` (`*` of `OPTIONS *`) are returned unchanged.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Ok(Cow::Borrowed(path));
    }
    if contains_ignore_case(path, "%00") {
        return Err(PathError::Nul);
    }
    let needs_work = path
        .split('/')
        .skip(1)
        .any(|segment| dot_segment(segment).is_some());
    let normalized = if needs_work {
        Cow::Owned(remove_dot_segments(path)?)
    } else {
        Cow::Borrowed(path)
    };
    if hides_dot_segment(&normalized) {
        return Err(PathError::EncodedDotSegment);
    }
    Ok(normalized)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dot {
    One,
    Two,
}

/// Whether `segment` is `.` or `..`, counting `%2e` as `.`.
fn dot_segment(segment: &str) -> Option<Dot> {
    let rest = strip_dot(segment)?;
    if rest.is_empty() {
        return Some(Dot::One);
    }
    match strip_dot(rest) {
        Some("") => Some(Dot::Two),
        _ => None,
    }
}

fn strip_dot(s: &str) -> Option<&str> {
    if let Some(rest) = s.strip_prefix('.') {
        return Some(rest);
    }
    let head = s.get(..3)?;
    head.eq_ignore_ascii_case("%2e").then(|| &s[3..])
}

/// RFC 3986 §5.2.4 on an absolute path, refusing to climb above the root.
fn remove_dot_segments(path: &str) -> Result<String, PathError> {
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, segment) in segments.into_iter().enumerate() {
        match dot_segment(segment) {
            Some(Dot::One) => {}
            Some(Dot::Two) => {
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            None => {
                out.push(segment);
                continue;
            }
        }
        // A trailing dot-segment leaves a trailing slash: `/a/b/..` is `/a/`.
        if i == last {
            out.push("");
        }
    }
    Ok(format!("/{}", out.join("/")))
}

/// The path in the form RFC 3986 §6.2.2 calls equivalent for every spelling of it: percent-
/// encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) decoded, other percent-encodings with
/// upper-case hex digits. `/items/%70%31` and `/items/p1` are one resource (one partition, one
/// FIFO), while `%2F` stays encoded (not a separator). Borrowed when nothing changes.
pub fn equivalence_form(path: &str) -> Cow<'_, str> {
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            let c = char::from(u8::try_from(hi * 16 + lo).unwrap_or(0));
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~') {
                out.push(c);
            } else {
                out.push('%');
                out.push((bytes[i + 1] as char).to_ascii_uppercase());
                out.push((bytes[i + 2] as char).to_ascii_uppercase());
            }
            i += 3;
            continue;
        }
        // Copy up to the next '%' (a char boundary: '%' is ASCII).
        let next = path[i + 1..].find('%').map_or(path.len(), |n| i + 1 + n);
        out.push_str(&path[i..next]);
        i = next;
    }
    Cow::Owned(out)
}

/// Whether fully decoding the path (and reading `\` as `/`) shows a `..` segment.
fn hides_dot_segment(path: &str) -> bool {
    if !path.contains(['%', '\\']) {
        return false;
    }
    let decoded = percent_encoding::percent_decode_str(path).collect::<Vec<u8>>();
    decoded
        .split(|&b| b == b'/' || b == b'\\')
        .any(|segment| segment == b"..")
}

fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    haystack
        .as_bytes()
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equivalent_spellings_have_one_form() {
        assert_eq!(equivalence_form("/items/p1"), "/items/p1");
        assert_eq!(equivalence_form("/items/%70%31"), "/items/p1");
        assert_eq!(equivalence_form("/items/%7e%2D%2e_"), "/items/~-._");
        assert_eq!(equivalence_form("/a%2fb%c3%a9"), "/a%2Fb%C3%A9");
        assert_eq!(equivalence_form("/a%2Fb"), "/a%2Fb");
        // Not an escape: kept as it is.
        assert_eq!(equivalence_form("/50%"), "/50%");
        assert_eq!(equivalence_form("/50%z1/é%41"), "/50%z1/éA");
        assert_eq!(equivalence_form("/%4"), "/%4");
    }

    fn ok(path: &str) -> String {
        normalize(path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .into_owned()
    }

    #[test]
    fn dot_segments_are_removed() {
        assert_eq!(ok("/"), "/");
        assert_eq!(ok("/a/b/c"), "/a/b/c");
        assert_eq!(ok("/a/./b"), "/a/b");
        assert_eq!(ok("/a/b/../c"), "/a/c");
        assert_eq!(ok("/a/b/.."), "/a/");
        assert_eq!(ok("/a/b/."), "/a/b/");
        assert_eq!(ok("/a/.."), "/");
        assert_eq!(ok("/public/../account"), "/account");
        assert_eq!(ok("/a/%2e%2E/b"), "/b");
        assert_eq!(ok("/a/.%2e/b"), "/b");
        assert_eq!(ok("/a/%2e/b"), "/a/b");
        assert_eq!(ok("//a//b/"), "//a//b/");
        assert_eq!(ok("*"), "*");
    }

    #[test]
    fn names_that_only_look_like_dots_are_kept() {
        assert_eq!(ok("/a/.../b"), "/a/.../b");
        assert_eq!(ok("/a/..b/.c/%2ex"), "/a/..b/.c/%2ex");
        assert_eq!(ok("/files/a%2Fb"), "/files/a%2Fb");
        assert_eq!(ok("/q%20x"), "/q%20x");
    }

    #[test]
    fn climbing_above_the_root_is_refused() {
        for path in [
            "/..",
            "/../internal/secret",
            "/a/../../x",
            "/%2e%2e/x",
            "/%2E./x",
        ] {
            assert_eq!(normalize(path), Err(PathError::AboveRoot), "{path}");
        }
    }

    #[test]
    fn nul_and_hidden_dot_segments_are_refused() {
        assert_eq!(normalize("/a%00b"), Err(PathError::Nul));
        assert_eq!(normalize("/a/%00"), Err(PathError::Nul));
        for path in [
            "/api/..%2fsecret",
            "/..%5Csecret",
            "/a/%2e%2e%2fb",
            "/x/..%2F",
        ] {
            assert_eq!(normalize(path), Err(PathError::EncodedDotSegment), "{path}");
        }
    }
}
