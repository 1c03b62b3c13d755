//! Figures of the reliability suite: every reliability test prints its figures as one line
//! `RELIABILITY {"section":…,"name":…, …}` on stdout, which `tests/reliability/run.sh` collects
//! into one table.

use serde_json::{Value, json};

/// Print one figure line: `section` (`crash`, `faults`, `resources`, `fuzz`, `hostile`,
/// `isolation`), `name`, then the keys of `fields` (an object).
pub fn report(section: &str, name: &str, fields: Value) {
    let mut line = json!({"section": section, "name": name});
    if let (Some(line), Value::Object(fields)) = (line.as_object_mut(), fields) {
        for (k, v) in fields {
            line.insert(k, v);
        }
    }
    println!("RELIABILITY {line}");
}

/// Whether the suite runs at full size (`OUTPOST_RELIABILITY_FULL=1`) rather than CI size.
pub fn full() -> bool {
    std::env::var("OUTPOST_RELIABILITY_FULL").is_ok_and(|v| v == "1")
}
