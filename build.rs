//! Build-time facts for the tests: whether a `redis-server` is there to start.
//!
//! The Redis tests (`tests/redis_*.rs`) start their own `redis-server`. Without one they are
//! compiled as ignored, with the reason, so that `cargo test` does not count them as passed
//! after doing nothing: `cfg(has_redis_server)` is set when `REDIS_SERVER_BIN` is set or
//! `redis-server` is on `PATH`, and always when `CI` is set, where the tests must run (and fail
//! when it is missing). Installing or removing `redis-server` re-runs this script.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(has_redis_server)");
    println!("cargo::rerun-if-changed=build.rs");
    for var in ["CI", "REDIS_SERVER_BIN", "PATH"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let path_dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    let found = std::env::var_os("REDIS_SERVER_BIN")
        .map(PathBuf::from)
        .or_else(|| {
            path_dirs
                .iter()
                .map(|dir| dir.join("redis-server"))
                .find(|candidate| candidate.is_file())
        });
    match &found {
        // Removed or replaced: look again.
        Some(bin) => println!("cargo::rerun-if-changed={}", bin.display()),
        // Installed later into one of these: look again.
        None => {
            for dir in path_dirs.iter().filter(|d| d.is_absolute() && d.is_dir()) {
                println!("cargo::rerun-if-changed={}", dir.display());
            }
        }
    }
    if found.is_some() || std::env::var_os("CI").is_some() {
        println!("cargo::rustc-cfg=has_redis_server");
    }
}
