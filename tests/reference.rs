//! The config keys of `docs/REFERENCE.md`, `config/outpost.toml` and `src/config.rs` are the
//! same, with the same defaults (issue #15 point 8).
//!
//! Keys are written as the reference writes them: `proxy.listen`, `route[].path`,
//! `replay.classify.body[].pointer`. `[route.classify]` has the keys of `[replay.classify]`
//! (one struct), so `route[].classify.*` counts as `replay.classify.*`. The keys `src/config.rs`
//! knows are read from its own parser: an unknown key's error lists every key of its table.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use outpost::config::Config;

/// Every table of the config, as the reference names it, and a header that opens it.
const TABLES: [(&str, &str); 12] = [
    ("", ""),
    ("proxy", "[proxy]"),
    ("upstream", "[upstream]"),
    ("store", "[store]"),
    ("cache", "[cache]"),
    ("queue", "[queue]"),
    ("replay", "[replay]"),
    ("replay.classify", "[replay.classify]"),
    ("replay.classify.body[]", "[[replay.classify.body]]"),
    ("admin", "[admin]"),
    ("route[]", "[[route]]"),
    ("warm[]", "[[warm]]"),
];

fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn join(table: &str, key: &str) -> String {
    if table.is_empty() {
        key.to_owned()
    } else {
        format!("{table}.{key}")
    }
}

/// `route[].classify.x` is `replay.classify.x` (the same struct).
fn fold(key: &str) -> String {
    match key.strip_prefix("route[].classify.") {
        Some(rest) => format!("replay.classify.{rest}"),
        None => key.to_owned(),
    }
}

fn is_table(path: &str) -> bool {
    TABLES
        .iter()
        .any(|(t, _)| *t == path || *t == format!("{path}[]"))
        || path == "route[].classify"
}

/// The keys `src/config.rs` accepts, table by table, from its unknown-key errors.
fn config_rs_keys() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for (table, header) in TABLES {
        let err = Config::parse(&format!("{header}\nnot_a_key_at_all = 1\n"))
            .expect_err("an unknown key is an error");
        let (_, expected) = err
            .message
            .split_once("expected")
            .unwrap_or_else(|| panic!("no key list in {err}"));
        let fields: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        assert!(!fields.is_empty(), "no key list in {err}");
        for field in fields {
            let key = join(table, field);
            if table.is_empty() {
                assert!(
                    is_table(&key),
                    "a new top-level table `{key}`: add it to TABLES"
                );
            } else if !is_table(&key) {
                keys.insert(fold(&key));
            }
        }
    }
    keys
}

/// The keys of the reference's tables (under "## Configuration"), with their default cells.
fn reference_keys() -> BTreeMap<String, String> {
    let text = read("docs/REFERENCE.md");
    let (_, section) = text
        .split_once("\n## Configuration\n")
        .expect("a \"## Configuration\" section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut keys = BTreeMap::new();
    for line in section.lines() {
        let cells: Vec<&str> = line.split(" | ").collect();
        let Some(key) = cells
            .first()
            .and_then(|c| c.strip_prefix("| `"))
            .and_then(|c| c.strip_suffix('`'))
        else {
            continue;
        };
        let default = cells.get(1).copied().unwrap_or_default().to_owned();
        assert!(
            keys.insert(fold(key), default).is_none(),
            "{key} is listed twice"
        );
    }
    keys
}

/// A key path as config/outpost.toml writes it (`a.b`), or None for prose.
fn key_path(s: &str) -> Option<&str> {
    let s = s.trim();
    let ok = !s.is_empty()
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.');
    ok.then_some(s)
}

/// The keys of config/outpost.toml, commented-out examples included, with the values of the
/// ones that are set (the defaults).
fn example_keys() -> BTreeMap<String, Option<String>> {
    let text = read("config/outpost.toml");
    let mut arrays: BTreeSet<String> = BTreeSet::new();
    let mut table = String::new();
    let mut keys = BTreeMap::new();
    for line in text.lines() {
        let (commented, body) = match line.trim().strip_prefix('#') {
            Some(rest) => (true, rest.trim()),
            None => (false, line.trim()),
        };
        let header = |open: &str, close: &str| {
            body.strip_prefix(open)?
                .split_once(close)
                .and_then(|(name, _)| key_path(name))
        };
        if let Some(name) = header("[[", "]]") {
            let path = indexed(&arrays, name);
            arrays.insert(path.clone());
            table = format!("{path}[]");
        } else if let Some(name) = header("[", "]") {
            table = indexed(&arrays, name);
        } else if let Some((key, value)) = body.split_once('=')
            && let Some(key) = key_path(key)
        {
            let value = value.split(" #").next().unwrap_or(value).trim().to_owned();
            keys.insert(fold(&join(&table, key)), (!commented).then_some(value));
        }
    }
    keys
}

/// `name` with `[]` after each part that is an array of tables.
fn indexed(arrays: &BTreeSet<String>, name: &str) -> String {
    let mut path = String::new();
    for part in name.split('.') {
        path = join(&path, part);
        if arrays.contains(&path) {
            path.push_str("[]");
        }
    }
    path
}

fn difference<'a>(a: impl Iterator<Item = &'a String>, b: &BTreeSet<&String>) -> Vec<String> {
    a.filter(|k| !b.contains(k)).cloned().collect()
}

#[test]
fn the_reference_and_the_example_config_list_every_key_of_src_config_rs() {
    let known = config_rs_keys();
    let reference = reference_keys();
    let example = example_keys();
    assert!(
        known.len() > 50,
        "read {} keys from src/config.rs",
        known.len()
    );

    let known_set: BTreeSet<&String> = known.iter().collect();
    let reference_set: BTreeSet<&String> = reference.keys().collect();
    let example_set: BTreeSet<&String> = example.keys().collect();
    assert_eq!(
        (
            difference(known.iter(), &reference_set),
            difference(reference.keys(), &known_set)
        ),
        (vec![], vec![]),
        "docs/REFERENCE.md: (keys missing, keys src/config.rs does not know)"
    );
    assert_eq!(
        (
            difference(known.iter(), &example_set),
            difference(example.keys(), &known_set)
        ),
        (vec![], vec![]),
        "config/outpost.toml: (keys missing, keys src/config.rs does not know)"
    );
}

#[test]
fn the_example_config_holds_the_defaults_and_the_reference_says_the_same() {
    let example = Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config/outpost.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        format!("{example:#?}"),
        format!("{:#?}", Config::default()),
        "config/outpost.toml sets every key to its default"
    );
    let reference = reference_keys();
    for (key, value) in example_keys() {
        let Some(value) = value else { continue };
        let documented = reference.get(&key).map(String::as_str).unwrap_or_default();
        assert!(
            documented.starts_with(&format!("`{value}`")),
            "{key}: config/outpost.toml sets {value}, docs/REFERENCE.md says {documented:?}"
        );
    }
}

#[test]
fn the_readme_links_the_reference_inside_the_repository() {
    let readme = read("README.md");
    assert!(
        readme.contains("(docs/REFERENCE.md)"),
        "README links docs/REFERENCE.md"
    );
    assert!(
        !readme.contains("](../") && !readme.contains("shared/CONTRACT"),
        "README links nothing outside the repository"
    );
}
