//! One upstream, one outpost in front of it with a config text, and a client: the set-up most
//! end-to-end tests start from.

use tempfile::TempDir;

use super::{OutpostProcess, Upstream, client, temp_dir};

/// Fast probes and backoff, so that tests wait little (add sections after it; extend
/// `[replay]` with [`config_with_replay`]).
pub const FAST: &str = r#"
[upstream]
connect_timeout = "500ms"
probe_interval = "50ms"
probe_interval_max = "500ms"

[replay]
initial_backoff = "100ms"
max_backoff = "1s"
"#;

/// [`FAST`] with `replay` lines added to its `[replay]` table, then `rest` (e.g. routes).
pub fn config_with_replay(replay: &str, rest: &str) -> String {
    format!(
        "{}\n{rest}",
        FAST.replace("[replay]\n", &format!("[replay]\n{replay}\n"))
    )
}

/// A running outpost (with its config and data directories) in front of a test upstream.
pub struct Outpost {
    /// The upstream.
    pub upstream: Upstream,
    /// outpost, pointed at it.
    pub outpost: OutpostProcess,
    /// A client for both.
    pub http: reqwest::Client,
    _dirs: (TempDir, TempDir),
}

impl Outpost {
    /// The upstream stopped (connection refused), outpost started with `config`.
    pub async fn offline(config: &str) -> Outpost {
        let upstream = Upstream::start().await;
        upstream.stop().await;
        Self::in_front_of(upstream, config).await
    }

    /// outpost started with `config` in front of `upstream`.
    pub async fn in_front_of(upstream: Upstream, config: &str) -> Outpost {
        let config_dir = temp_dir();
        let path = config_dir.path().join("outpost.toml");
        std::fs::write(&path, config).expect("write the config file");
        let data = temp_dir();
        let (config_arg, url) = (path.display().to_string(), upstream.url());
        let outpost =
            OutpostProcess::start(&["--config", &config_arg, "--upstream", &url], data.path())
                .await;
        Outpost {
            upstream,
            outpost,
            http: client(),
            _dirs: (config_dir, data),
        }
    }

    /// outpost started with `config` in front of the upstream at `url` (e.g. a
    /// [`super::faultproxy::FaultProxy`] in front of a test upstream); the [`Outpost::upstream`]
    /// of the result is a stopped placeholder.
    pub async fn in_front_of_url(url: &str, config: &str) -> Outpost {
        let config_dir = temp_dir();
        let path = config_dir.path().join("outpost.toml");
        std::fs::write(&path, config).expect("write the config file");
        let data = temp_dir();
        let config_arg = path.display().to_string();
        let outpost =
            OutpostProcess::start(&["--config", &config_arg, "--upstream", url], data.path()).await;
        let placeholder = Upstream::start().await;
        placeholder.stop().await;
        Outpost {
            upstream: placeholder,
            outpost,
            http: client(),
            _dirs: (config_dir, data),
        }
    }

    /// A URL on outpost's proxy listener.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.outpost.url())
    }

    /// A URL on outpost's admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        format!("{}{path}", self.outpost.admin_url())
    }
}
