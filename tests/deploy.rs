//! Checks of the files in `deploy/` that can be checked without Docker or a cluster (#16
//! point 7): every outpost config there is valid, every YAML file parses, every `outpost serve`
//! flag they use exists, the systemd unit passes `systemd-analyze verify` (where systemd is
//! installed; skipped with a message otherwise), and the unit's stop timeout covers the
//! configured shutdown grace.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde::Deserialize as _;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Every file under `deploy/`, recursively.
fn deploy_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read deploy dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&deploy_dir(), &mut out);
    out.sort();
    out
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The documents of a YAML file, as JSON values.
fn yaml_documents(path: &Path) -> Vec<serde_json::Value> {
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            serde_json::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} does not parse as YAML: {e}", path.display()))
        })
        .collect()
}

/// Outpost configs embedded in YAML (a ConfigMap's `outpost.toml`).
fn embedded_configs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match v.as_str() {
                    Some(text) if k.ends_with(".toml") => out.push(text.to_string()),
                    _ => embedded_configs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| embedded_configs(v, out)),
        _ => {}
    }
}

/// `--flags` after `serve` in every command line of a YAML value (`args`, `command`).
fn yaml_serve_flags(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Array(items) => {
            let words: Vec<&str> = items.iter().filter_map(|v| v.as_str()).collect();
            if let Some(at) = words.iter().position(|w| *w == "serve") {
                out.extend(
                    words[at..]
                        .iter()
                        .filter(|w| w.starts_with("--"))
                        .map(|w| w.to_string()),
                );
            }
            items.iter().for_each(|v| yaml_serve_flags(v, out));
        }
        serde_json::Value::Object(map) => map.values().for_each(|v| yaml_serve_flags(v, out)),
        _ => {}
    }
}

/// `--flags` after `serve` on a shell-like command line.
fn line_serve_flags(line: &str, out: &mut Vec<String>) {
    let words: Vec<&str> = line
        .split(|c: char| c.is_whitespace() || matches!(c, '[' | ']' | ',' | '"'))
        .filter(|w| !w.is_empty())
        .collect();
    if let Some(at) = words.iter().position(|w| *w == "serve") {
        out.extend(
            words[at..]
                .iter()
                .filter(|w| w.starts_with("--"))
                .map(|w| w.split('=').next().unwrap_or(w).to_string()),
        );
    }
}

#[test]
fn every_outpost_config_under_deploy_is_valid() {
    let mut configs: Vec<(String, String)> = Vec::new();
    for path in deploy_files() {
        let name = path.display().to_string();
        match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => configs.push((name, read(&path))),
            Some("yaml" | "yml") => {
                let mut found = Vec::new();
                for doc in yaml_documents(&path) {
                    embedded_configs(&doc, &mut found);
                }
                configs.extend(found.into_iter().map(|text| (name.clone(), text)));
            }
            _ => {}
        }
    }
    assert!(configs.len() >= 3, "configs found: {configs:?}");
    for (name, text) in &configs {
        // These files leave the token to OUTPOST_ADMIN_TOKEN, which `serve` reads into
        // admin.token before validating: do the same.
        let text = if text.contains("token =") {
            text.clone()
        } else {
            text.replace("[admin]\n", "[admin]\ntoken = \"from-the-environment\"\n")
        };
        if let Err(e) = outpost::config::Config::parse(&text) {
            panic!("{name}: {e}");
        }
    }
}

#[test]
fn every_yaml_file_under_deploy_parses() {
    let mut n = 0;
    for path in deploy_files() {
        if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            assert!(!yaml_documents(&path).is_empty(), "{}", path.display());
            n += 1;
        }
    }
    assert!(n >= 2, "the Kubernetes example and the compose file");
}

#[test]
fn every_serve_flag_used_under_deploy_exists() {
    let help = run_outpost(&["serve", "--help"]);
    assert_eq!(help.code(), Some(0));
    let help = help.stdout_str();
    let mut used: Vec<(String, String)> = Vec::new();
    for path in deploy_files() {
        let name = path.display().to_string();
        let mut flags = Vec::new();
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => {
                for doc in yaml_documents(&path) {
                    yaml_serve_flags(&doc, &mut flags);
                }
            }
            Some("toml" | "conf") => {}
            _ => read(&path)
                .lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .for_each(|l| line_serve_flags(l, &mut flags)),
        }
        used.extend(flags.into_iter().map(|f| (name.clone(), f)));
    }
    assert!(
        used.iter().any(|(_, f)| f == "--config"),
        "flags found: {used:?}"
    );
    for (name, flag) in &used {
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "{name} uses {flag}, which `outpost serve --help` does not list:\n{help}"
        );
    }
}

#[test]
fn the_systemd_unit_verifies_and_waits_out_the_shutdown_grace() {
    let unit = deploy_dir().join("systemd/outpost.service");
    let text = read(&unit);
    let grace = outpost::config::Config::default().proxy.shutdown_grace;
    let stop = text
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.trim().strip_suffix('s'))
        .and_then(|v| v.parse::<u64>().ok())
        .expect("TimeoutStopSec=<n>s");
    assert!(
        stop > grace.as_secs(),
        "TimeoutStopSec={stop}s must exceed proxy.shutdown_grace ({grace:?})"
    );
    for key in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=outpost",
        "DynamicUser=yes",
        "Restart=on-failure",
    ] {
        assert!(text.contains(key), "{key} missing");
    }
    let analyze = Path::new("/usr/bin/systemd-analyze");
    if !analyze.exists() {
        eprintln!("SKIPPED systemd-analyze verify: systemd-analyze is not installed");
        return;
    }
    // verify checks that ExecStart's binary exists: point it at the one cargo built.
    let dir = temp_dir();
    let copy = dir.path().join("outpost.service");
    std::fs::write(&copy, text.replace("/usr/local/bin/outpost", OUTPOST_BIN))
        .expect("write the unit copy");
    let out = std::process::Command::new(analyze)
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("run systemd-analyze verify");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "systemd-analyze verify: {said}");
    // It warns (exit 0) about unknown keys and bad values: none allowed.
    assert!(
        said.trim().is_empty(),
        "systemd-analyze verify said: {said}"
    );
}
