//! A private `redis-server` for tests, on a free loopback port with its own directory.

use std::fs::OpenOptions;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// Options for [`RedisServer::start_with`].
#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// Value of `--appendfsync` (`always`, `everysec` or `no`). Default `always`.
    pub appendfsync: String,
    /// Further `redis-server` arguments, e.g. `["--maxmemory", "10mb"]`.
    pub extra_args: Vec<String>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            appendfsync: "always".to_owned(),
            extra_args: Vec::new(),
        }
    }
}

/// A `redis-server` child process bound to `127.0.0.1` on a free port (never 6379), with AOF
/// persistence in a private temporary directory, so data survives [`RedisServer::restart`].
/// Dropping it kills the server and deletes the directory.
pub struct RedisServer {
    child: Option<Child>,
    bin: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    opts: RedisOptions,
}

/// Finds `redis-server` (`REDIS_SERVER_BIN`, else `PATH`), or panics. Tests that start one
/// are marked `#[cfg_attr(not(has_redis_server), ignore = ...)]`: `build.rs` compiles them as
/// ignored when no `redis-server` was found (unless `CI` is set), so a test that runs and finds
/// none is a failure, never a silent pass.
fn find_redis_server() -> PathBuf {
    if let Some(bin) = std::env::var_os("REDIS_SERVER_BIN") {
        return PathBuf::from(bin);
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("redis-server"))
                .find(|candidate| candidate.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "redis-server not found in PATH (set REDIS_SERVER_BIN, or install it: \
                 apt-get install redis-server); without it and without CI set, the Redis tests \
                 are built as ignored"
            )
        })
}

impl RedisServer {
    /// Starts a server with default options (AOF, `appendfsync always`) and waits for PING.
    /// Panics when `redis-server` is not installed (tests that call this are ignored then).
    pub fn start() -> RedisServer {
        Self::start_with(RedisOptions::default())
    }

    /// Like [`RedisServer::start`] with custom options.
    pub fn start_with(opts: RedisOptions) -> RedisServer {
        let bin = find_redis_server();
        let mut port = free_port();
        while port == 6379 {
            port = free_port();
        }
        let dir = tempfile::Builder::new()
            .prefix("outpost-test-redis-")
            .tempdir()
            .expect("create temp dir for redis-server");
        let mut server = RedisServer {
            child: None,
            bin,
            port,
            dir,
            opts,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the redis-server log file");
        let stderr = log.try_clone().expect("clone the redis log file handle");
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--save", "", "--appendonly", "yes", "--appendfsync"])
            .arg(&self.opts.appendfsync)
            .args(["--daemonize", "no", "--logfile", ""])
            .args(&self.opts.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        self.child = Some(child);

        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.ping() {
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    panic!(
                        "redis-server exited with {status} before answering PING\n--- log ---\n{}",
                        self.log()
                    );
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "redis-server on port {} did not answer PING within 10 s\n--- log ---\n{}",
                    self.port,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends one inline command and returns the first reply line (e.g. `+PONG`), if any.
    fn inline_command(&self, command: &str) -> Option<String> {
        let mut stream =
            TcpStream::connect_timeout(&self.addr(), Duration::from_millis(500)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream.write_all(format!("{command}\r\n").as_bytes()).ok()?;
        let mut buf = [0u8; 256];
        let n = stream.read(&mut buf).ok()?;
        let reply = String::from_utf8_lossy(&buf[..n]);
        reply.lines().next().map(str::to_owned)
    }

    /// Whether the server answers `PING` with `+PONG` right now.
    pub fn ping(&self) -> bool {
        self.inline_command("PING").as_deref() == Some("+PONG")
    }

    /// `redis://127.0.0.1:P/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The port (stable across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:P`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The server's data directory (holds the AOF and the log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Path of the server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Stops the server with `SHUTDOWN NOSAVE` (the AOF keeps the data), falling back to
    /// SIGKILL after 5 s. No-op if it is not running.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = self.inline_command("SHUTDOWN NOSAVE");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => break,
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills the server with SIGKILL (a crash) and waits for it. No-op if it is not running.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and directory (stopping it first if running)
    /// and waits for PING; the AOF brings the data back.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "===== redis-server log ({}) =====\n{}\n===== end of redis-server log =====",
                self.log_path().display(),
                self.log()
            );
        }
        self.kill9();
    }
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisServer")
            .field("url", &self.url())
            .field("dir", &self.dir())
            .finish()
    }
}

/// `redis-cli` (next to `REDIS_SERVER_BIN` if that is set, else from `PATH`).
fn redis_cli_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("REDIS_SERVER_BIN") {
        if let Some(dir) = Path::new(&bin).parent() {
            let candidate = dir.join("redis-cli");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from("redis-cli")
}

/// Runs `redis-cli -h 127.0.0.1 -p port args...` and returns its standard output.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new(redis_cli_bin())
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A Redis Cluster of private `redis-server`s on free loopback ports (`--cluster-enabled yes`,
/// node timeout 1 s so that a failover takes seconds), made with `redis-cli --cluster create`.
pub struct RedisCluster {
    /// Every node, in the order given to `redis-cli --cluster create` (primaries first).
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `primaries` primaries with `replicas` replicas each and waits until every node
    /// reports `cluster_state:ok` and knows every replica.
    pub fn start(primaries: usize, replicas: usize) -> RedisCluster {
        let total = primaries * (1 + replicas);
        let nodes: Vec<RedisServer> = (0..total)
            .map(|_| {
                RedisServer::start_with(RedisOptions {
                    extra_args: [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "1000",
                    ]
                    .map(String::from)
                    .to_vec(),
                    ..RedisOptions::default()
                })
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let out = Command::new(redis_cli_bin())
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = cluster.nodes.iter().all(|n| {
                redis_cli(n.port(), &["CLUSTER", "INFO"]).contains("cluster_state:ok")
                    && redis_cli(n.port(), &["CLUSTER", "NODES"])
                        .lines()
                        .filter(|l| l.contains("slave"))
                        .count()
                        == primaries * replicas
            });
            let synced = cluster.nodes.iter().all(|n| {
                let info = redis_cli(n.port(), &["INFO", "replication"]);
                info.contains("role:master") || info.contains("master_link_status:up")
            });
            if ready && synced {
                return cluster;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not form within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `host:port` of every node.
    pub fn addrs(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect()
    }

    /// The index in [`Self::nodes`] of the running node that serves `key`'s slot as primary.
    pub fn primary_of(&self, key: &str) -> usize {
        let any = self
            .nodes
            .iter()
            .find(|n| n.ping())
            .expect("a node is running");
        let slot: u16 = redis_cli(any.port(), &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .expect("CLUSTER KEYSLOT");
        self.nodes
            .iter()
            .position(|n| {
                n.ping()
                    && redis_cli(n.port(), &["INFO", "replication"]).contains("role:master")
                    && redis_cli(n.port(), &["CLUSTER", "NODES"]).lines().any(|l| {
                        l.contains("myself")
                            && l.split_whitespace()
                                .skip(8)
                                .any(|range| slot_in(range, slot))
                    })
            })
            .expect("a primary serves the slot")
    }

    /// The node's cluster id.
    pub fn id(&self, node: usize) -> String {
        redis_cli(self.nodes[node].port(), &["CLUSTER", "MYID"])
            .trim()
            .to_owned()
    }
}

/// Whether a `CLUSTER NODES` slot field (`5`, `0-5460`, or an importing/migrating marker)
/// holds `slot`.
fn slot_in(range: &str, slot: u16) -> bool {
    if range.starts_with('[') {
        return false;
    }
    match range.split_once('-') {
        Some((a, b)) => {
            a.parse::<u16>().is_ok_and(|a| a <= slot) && b.parse::<u16>().is_ok_and(|b| slot <= b)
        }
        None => range.parse::<u16>() == Ok(slot),
    }
}
