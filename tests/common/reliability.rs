//! Figures of the reliability suite (issue #21): every reliability test reports what it did with
//! [`report`], one line per figure set, and `tests/reliability/run.sh` collects the lines from
//! the tests' stdout into one table.
//!
//! The line format is fixed (other tools parse it): the literal prefix `RELIABILITY `, then one
//! JSON object on the same line with at least `"section"` (one of `crash`, `faults`,
//! `resources`, `hostile`, `fuzz`, `isolation`) and `"name"`, plus any numeric or string fields.
//! Fields the table totals when present: `acknowledged`, `applied_once`, `lost`, `doubled`,
//! `redelivered`, `cycles`, `fault_kinds`, `hostile_shapes`, `fuzz_executions`.
//!
//! ```text
//! RELIABILITY {"section":"crash","name":"embedded kill under load","cycles":4,"acknowledged":812,"applied_once":812,"lost":0,"doubled":0,"redelivered":0}
//! ```

/// Prefix of every figures line on stdout.
pub const PREFIX: &str = "RELIABILITY ";

/// Whether the full-size run was asked for (`OUTPOST_RELIABILITY_FULL=1`, as
/// `tests/reliability/run.sh --full` sets it); CI runs the reduced size.
pub fn full() -> bool {
    std::env::var("OUTPOST_RELIABILITY_FULL").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// `ci` normally, `full_size` when [`full`] is set.
pub fn size(ci: usize, full_size: usize) -> usize {
    if full() { full_size } else { ci }
}

/// The figures line for `section`/`name` with `fields` (a JSON object; other values are
/// reported under `"value"`), without printing it.
pub fn line(section: &str, name: &str, fields: serde_json::Value) -> String {
    let mut object = serde_json::Map::new();
    object.insert("section".to_owned(), section.into());
    object.insert("name".to_owned(), name.into());
    object.insert("size".to_owned(), if full() { "full" } else { "ci" }.into());
    match fields {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                if key != "section" && key != "name" {
                    object.insert(key, value);
                }
            }
        }
        serde_json::Value::Null => {}
        other => {
            object.insert("value".to_owned(), other);
        }
    }
    format!("{PREFIX}{}", serde_json::Value::Object(object))
}

/// Prints the figures line for `section`/`name` with `fields` to stdout with one `println!`
/// (captured like any test output; `--nocapture`, as `run.sh` passes, shows it).
///
/// ```ignore
/// common::reliability::report("crash", "embedded kill under load", serde_json::json!({
///     "cycles": 4, "acknowledged": 812, "applied_once": 812, "lost": 0, "doubled": 0,
///     "redelivered": 0,
/// }));
/// ```
pub fn report(section: &str, name: &str, fields: serde_json::Value) {
    println!("{}", line(section, name, fields));
}
