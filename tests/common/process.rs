//! Running the real `outpost` binary from tests.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// Path of the `outpost` binary Cargo built for these tests.
pub const OUTPOST_BIN: &str = env!("CARGO_BIN_EXE_outpost");

/// How long [`OutpostProcess::start`] waits for the proxy port to accept connections.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Proxy-related environment variables removed from every spawned `outpost`, so that it
/// talks to the loopback test upstream directly.
const PROXY_ENV: &[&str] = &[
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
];

/// Applies the common environment to a command for the outpost binary.
fn prepare_env(cmd: &mut std::process::Command, env: &[(String, String)]) {
    for var in PROXY_ENV {
        cmd.env_remove(var);
    }
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info,outpost=debug");
    }
    cmd.env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
}

/// Last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A running `outpost serve` process with its own proxy and admin ports and a log file.
///
/// Started as `outpost serve --listen 127.0.0.1:P --admin-listen 127.0.0.1:Q --data-dir DIR
/// <args...>`; stdout and stderr go to a log file (see [`OutpostProcess::log`]), which is
/// printed when the process handle is dropped during a panic (or always, if the environment
/// variable `OUTPOST_TEST_LOG` is set). Dropping the handle kills the process (SIGKILL).
///
/// Must be used from within a tokio runtime.
pub struct OutpostProcess {
    child: Option<tokio::process::Child>,
    last_exit: Option<ExitStatus>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    data_dir: PathBuf,
    addr: SocketAddr,
    admin_addr: SocketAddr,
    log_dir: tempfile::TempDir,
    starts: u32,
    /// Set once a panic message already included the log, so Drop does not repeat it.
    log_shown: bool,
}

impl OutpostProcess {
    /// Spawns `outpost serve` with `args` appended (e.g. `["--upstream", &url]`) and waits until
    /// the proxy port accepts TCP connections (panics with the log tail after 20 s or if the
    /// process exits first).
    pub async fn start(args: &[&str], data_dir: &Path) -> OutpostProcess {
        Self::start_with_env(args, data_dir, &[]).await
    }

    /// Like [`OutpostProcess::start`], with extra environment variables for the process.
    pub async fn start_with_env(
        args: &[&str],
        data_dir: &Path,
        env: &[(&str, &str)],
    ) -> OutpostProcess {
        let proxy_port = free_port();
        let mut admin_port = free_port();
        while admin_port == proxy_port {
            admin_port = free_port();
        }
        let log_dir = tempfile::Builder::new()
            .prefix("outpost-test-log-")
            .tempdir()
            .expect("create temp dir for the outpost log");
        let mut process = OutpostProcess {
            child: None,
            last_exit: None,
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            data_dir: data_dir.to_owned(),
            addr: SocketAddr::from(([127, 0, 0, 1], proxy_port)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            log_dir,
            starts: 0,
            log_shown: false,
        };
        process.spawn();
        process.wait_ready().await;
        process
    }

    fn full_args(&self) -> Vec<String> {
        let mut args = vec![
            "serve".to_owned(),
            "--listen".to_owned(),
            self.addr.to_string(),
            "--admin-listen".to_owned(),
            self.admin_addr.to_string(),
            "--data-dir".to_owned(),
            self.data_dir.display().to_string(),
        ];
        args.extend(self.args.iter().cloned());
        args
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the outpost log file");
        let args = self.full_args();
        writeln!(
            log,
            "===== harness: start #{} of {OUTPOST_BIN} {} =====",
            self.starts,
            args.join(" ")
        )
        .expect("write to the outpost log file");
        let stderr = log.try_clone().expect("clone the outpost log file handle");

        let mut cmd = std::process::Command::new(OUTPOST_BIN);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr));
        prepare_env(&mut cmd, &self.env);
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {OUTPOST_BIN}: {e}"));
        self.child = Some(child);
        self.last_exit = None;
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                break;
            }
            if let Some(status) = self.try_exit_status() {
                self.log_shown = true;
                panic!(
                    "outpost exited with {status} before listening on {}\n--- log tail ---\n{}",
                    self.addr,
                    self.log_tail(60)
                );
            }
            if Instant::now() >= deadline {
                self.log_shown = true;
                panic!(
                    "outpost did not accept connections on {} within {START_TIMEOUT:?}\n--- log tail ---\n{}",
                    self.addr,
                    self.log_tail(60)
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        // The admin listener may come up a moment later; give it a short grace period, but do
        // not fail here (tests that need it will fail with a clearer message).
        let admin_deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < admin_deadline {
            if tokio::net::TcpStream::connect(self.admin_addr)
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The exit status if the process has exited (reaping it), without waiting.
    fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                self.last_exit = Some(status);
            }
        }
        self.last_exit
    }

    /// Proxy base URL: `http://127.0.0.1:P`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Proxy address `127.0.0.1:P` (stable across restarts).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Admin base URL: `http://127.0.0.1:Q`.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    /// Admin address `127.0.0.1:Q` (stable across restarts).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The data directory passed with `--data-dir`.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.try_exit_status().is_none() && self.child.is_some()
    }

    /// Path of the log file (stdout and stderr of every start, appended).
    pub fn log_path(&self) -> PathBuf {
        self.log_dir.path().join("outpost.log")
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log(), lines)
    }

    /// Kills the process with SIGKILL and waits for it; returns its exit status (or the earlier
    /// one if it had already exited).
    pub async fn kill9(&mut self) -> ExitStatus {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let status = child.wait().await.expect("wait for killed outpost");
            self.last_exit = Some(status);
        }
        self.last_exit
            .expect("kill9 on an outpost process that was never started")
    }

    /// Sends SIGTERM (via the `kill` command) without waiting; follow with
    /// [`OutpostProcess::wait_exit`]. No-op if the process is not running.
    pub fn terminate(&mut self) {
        if let Some(pid) = self.pid() {
            let status = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .expect("run `kill -TERM`");
            assert!(status.success(), "`kill -TERM {pid}` failed: {status}");
        }
    }

    /// Waits up to 30 s for the process to exit and returns its status (panics with the log
    /// tail on timeout).
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let timeout = Duration::from_secs(30);
        match self.wait_exit_timeout(timeout).await {
            Some(status) => status,
            None => {
                self.log_shown = true;
                panic!(
                    "outpost did not exit within {timeout:?}\n--- log tail ---\n{}",
                    self.log_tail(60)
                )
            }
        }
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub async fn wait_exit_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(child) = self.child.as_mut() {
            match tokio::time::timeout(timeout, child.wait()).await {
                Ok(status) => {
                    self.last_exit = Some(status.expect("wait for outpost"));
                    self.child = None;
                }
                Err(_) => return None,
            }
        }
        self.last_exit
    }

    /// Starts the process again with the same arguments, ports, data directory and log file,
    /// and waits until it listens. If it is still running it is killed (SIGKILL) first; call
    /// [`OutpostProcess::terminate`] and [`OutpostProcess::wait_exit`] before for a graceful
    /// restart.
    pub async fn restart(&mut self) {
        if self.child.is_some() {
            self.kill9().await;
        }
        self.spawn();
        self.wait_ready().await;
    }
}

impl Drop for OutpostProcess {
    fn drop(&mut self) {
        let failed = std::thread::panicking() && !self.log_shown;
        if failed || std::env::var_os("OUTPOST_TEST_LOG").is_some() {
            eprintln!(
                "===== outpost log ({}), last 200 lines =====\n{}\n===== end of outpost log =====",
                self.log_path().display(),
                self.log_tail(200)
            );
        }
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

impl std::fmt::Debug for OutpostProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutpostProcess")
            .field("url", &self.url())
            .field("admin_url", &self.admin_url())
            .field("pid", &self.pid())
            .field("args", &self.full_args())
            .finish()
    }
}

/// Runs `outpost ARGS...` to completion (for one-shot commands such as `check-config FILE`),
/// capturing stdout and stderr. Panics if it runs longer than 60 s.
pub fn run_outpost(args: &[&str]) -> Output {
    run_outpost_timeout(args, Duration::from_secs(60))
}

/// Like [`run_outpost`] with a custom time limit (the process is killed and the call panics
/// when it is exceeded).
pub fn run_outpost_timeout(args: &[&str], timeout: Duration) -> Output {
    run_outpost_with_env(args, &[], timeout)
}

/// Like [`run_outpost_timeout`] with extra environment variables (e.g. `OUTPOST_ADMIN_TOKEN`).
pub fn run_outpost_with_env(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Output {
    let mut cmd = std::process::Command::new(OUTPOST_BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    prepare_env(&mut cmd, &env);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {OUTPOST_BIN}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(output) => output.expect("wait for outpost output"),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!(
                "`outpost {}` did not finish within {timeout:?}",
                args.join(" ")
            );
        }
    }
}

/// Convenience accessors for a finished one-shot [`Output`].
pub trait OutputExt {
    /// Stdout as lossy UTF-8.
    fn stdout_str(&self) -> String;
    /// Stderr as lossy UTF-8.
    fn stderr_str(&self) -> String;
    /// The exit code (`None` if killed by a signal).
    fn code(&self) -> Option<i32>;
}

impl OutputExt for Output {
    fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    fn code(&self) -> Option<i32> {
        self.status.code()
    }
}
